"""A client's failed authentications (secrets no credential has) are budgeted: past RATE_LIMIT_AUTH_FAILURES it is
answered 429 `authentication_failures_limited` with Retry-After until the window ends, whatever it presents, so a
secret it guesses right tells it nothing meanwhile. Counted per client, never per credential: a stranger sending a
victim's key prefix with wrong secrets does not lock the victim out."""

import uuid

import pytest
from django.core.cache import cache

from tests.catalog.factories import issue_key, issue_owner_token
from tests.conftest import Api, error_code

pytestmark = pytest.mark.django_db

ATTACKER, VICTIM = "198.51.100.7", "203.0.113.9"


@pytest.fixture(params=["locmem", "redis"])
def failures_allowed(request, settings):
    """Every test below runs with the counts in memory and in Redis (production's CACHE_URL)."""
    if request.param == "redis":
        settings.CACHES = {"default": {"BACKEND": "django.core.cache.backends.redis.RedisCache",
                                       "LOCATION": request.getfixturevalue("redis_server").url}}

    def allow(rate: str) -> None:
        settings.REST_FRAMEWORK = {**settings.REST_FRAMEWORK, "DEFAULT_THROTTLE_RATES": {
            **settings.REST_FRAMEWORK["DEFAULT_THROTTLE_RATES"], "auth_failures": rate}}

    cache.clear()
    yield allow
    cache.clear()


def call(secret: str, path: str = "/agents/me", address: str = ATTACKER):
    return Api(secret).client.get(path, REMOTE_ADDR=address)


def wrong_secret_of(secret: str) -> str:
    """The same kind and prefix (shown in listings), another random part."""
    kind, prefix, _ = secret.split("_", 2)
    return f"{kind}_{prefix}_{'x' * 43}"


def assert_limited(response):
    assert response.status_code == 429, response.content
    assert error_code(response) == "authentication_failures_limited"
    assert 0 < int(response["Retry-After"]) <= 3600


def test_a_client_guessing_keys_is_refused_past_its_budget_even_with_a_right_one(failures_allowed, buyer):
    failures_allowed("3/hour")
    key = issue_key(buyer)
    for guess in (wrong_secret_of(key), "mk_0123456789_guess", "garbage"):
        assert call(guess).status_code == 401
    assert_limited(call("mk_9876543210_guess"))
    assert_limited(call(key))  # a right guess now is not told apart from a wrong one

    # Another client, the key's own, is not affected.
    assert call(key, address=VICTIM).status_code == 200


def test_owner_token_guesses_count_too(failures_allowed, owner):
    failures_allowed("2/hour")
    token = issue_owner_token(owner)
    for _ in range(2):
        assert call(wrong_secret_of(token), path="/owner-tokens").status_code == 401
    assert call(token, path="/owner-tokens").status_code == 200  # within the budget: failures alone spend it
    assert_limited(call(wrong_secret_of(token), path="/owner-tokens"))
    assert_limited(call(token, path="/owner-tokens"))
    assert call(token, path="/owner-tokens", address=VICTIM).status_code == 200


def test_the_metered_proxy_counts_failures_and_refuses_a_spent_client(failures_allowed, buyer):
    failures_allowed("2/hour")
    key = issue_key(buyer)
    proxy = f"/metered-proxy/{uuid.uuid4()}/work"
    for _ in range(2):
        response = call(wrong_secret_of(key), path=proxy)
        assert response.status_code == 401
        assert error_code(response) == "invalid_credentials"
    assert_limited(call(wrong_secret_of(key), path=proxy))
    assert_limited(call(key, path=proxy))
    assert_limited(call(key))  # the same budget as the API's
    assert call(key, path=proxy, address=VICTIM).status_code == 404  # no such agreement: the key itself works


def test_real_credentials_that_no_longer_work_are_not_guesses(failures_allowed, buyer, owner_api):
    """A revoked key was issued, not guessed: its client (a deployment still holding it) is told 401
    `credentials_revoked` on every call, not throttled as a guesser."""
    failures_allowed("1/hour")
    key = issue_key(buyer)
    key_id = owner_api.get(f"/agents/{buyer.id}/api-keys").json()["results"][0]["id"]
    assert owner_api.post(f"/agents/{buyer.id}/api-keys/{key_id}/revoke").status_code == 200
    for _ in range(3):
        response = call(key)
        assert response.status_code == 401
        assert error_code(response) == "credentials_revoked"
