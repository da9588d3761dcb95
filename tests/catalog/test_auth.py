import secrets
from datetime import timedelta

import pytest
from django.test import RequestFactory
from django.utils import timezone
from rest_framework.exceptions import AuthenticationFailed

from catalog import services
from catalog.authentication import BearerKeyAuthentication
from catalog.models import ApiKey, OwnerToken
from tests.catalog.factories import AgentFactory, issue_key, issue_owner_token
from tests.conftest import Api, error_code

pytestmark = pytest.mark.django_db


def test_missing_credentials_is_401(anon):
    response = anon.get("/agents/me")
    assert response.status_code == 401
    assert error_code(response) == "not_authenticated"
    assert response["WWW-Authenticate"].startswith("Bearer")


@pytest.mark.parametrize("secret", ["garbage", "mk_short_x", "mk_0123456789_wrongsecret", "zz_0123456789_abc"])
def test_bad_credentials_are_401(secret):
    response = Api(secret).get("/agents/me")
    assert response.status_code == 401
    assert error_code(response) == "invalid_credentials"


def test_valid_key_identifies_the_agent(buyer, buyer_api):
    response = buyer_api.get("/agents/me")
    assert response.status_code == 200
    assert response.json()["handle"] == buyer.handle
    assert response["X-Request-Id"].startswith("req_")


def test_masumi_token_header_is_accepted(buyer):
    client = Api()
    response = client.client.get("/agents/me", HTTP_TOKEN=issue_key(buyer))
    assert response.status_code == 200


def test_revoked_key_is_rejected(buyer):
    secret = issue_key(buyer)
    services.credential_revoke(credential=ApiKey.objects.get(agent=buyer))
    response = Api(secret).get("/agents/me")
    assert response.status_code == 401
    assert error_code(response) == "credentials_revoked"


def test_expired_key_is_rejected_and_swept_by_the_periodic_task(buyer):
    issued = services.api_key_issue(agent=buyer, expires_at=timezone.now() + timedelta(seconds=30))
    ApiKey.objects.filter(pk=issued.credential.pk).update(expires_at=timezone.now() - timedelta(seconds=1))
    response = Api(issued.secret).get("/agents/me")
    assert response.status_code == 401
    assert error_code(response) == "credentials_expired"

    from catalog.tasks import expire_api_keys

    assert expire_api_keys() == 1
    assert ApiKey.objects.get(pk=issued.credential.pk).revoked_at is not None
    assert expire_api_keys() == 0  # safe to run twice


def test_inactive_agent_is_rejected(buyer, buyer_api):
    buyer.is_active = False
    buyer.save()
    response = buyer_api.get("/agents/me")
    assert response.status_code == 401
    assert error_code(response) == "agent_inactive"


def test_read_scope_cannot_register_services(seller):
    response = Api(issue_key(seller, scope="read")).post("/agents/services", {})
    assert response.status_code == 403
    assert error_code(response) == "insufficient_scope"


def test_owner_token_cannot_act_as_an_agent(owner_api):
    response = owner_api.get("/agents/me")
    assert response.status_code == 403
    assert error_code(response) == "agent_key_required"


def test_agent_key_cannot_act_as_owner(buyer_api):
    response = buyer_api.get("/agents")
    assert response.status_code == 403
    assert error_code(response) == "owner_credentials_required"


def test_last_used_is_recorded(buyer):
    secret = issue_key(buyer)
    Api(secret).get("/agents/me")
    assert ApiKey.objects.get(agent=buyer).last_used_at is not None


@pytest.mark.parametrize("kind", ["agent key", "owner token"])
def test_a_credential_is_read_with_its_holders_in_one_statement(kind, django_assert_num_queries):
    """BearerKeyAuthentication reads the credential, its agent and the owner in one precompiled statement
    (catalog.authentication.credential_with_holders): the same objects select_related would give."""
    agent = AgentFactory()
    secret = issue_key(agent) if kind == "agent key" else issue_owner_token(agent.owner)
    model = ApiKey if kind == "agent key" else OwnerToken
    ApiKey.objects.update(last_used_at=timezone.now())  # no touch write in the counted block
    OwnerToken.objects.update(last_used_at=timezone.now())
    request = RequestFactory().get("/agents/me", HTTP_AUTHORIZATION=f"Bearer {secret}")
    with django_assert_num_queries(1):
        user, credential = BearerKeyAuthentication().authenticate(request)
        holder = credential.agent if kind == "agent key" else None
        assert user == agent.owner and user.is_active and isinstance(credential, model)
        if holder is not None:
            assert (holder.pk, holder.handle, holder.wallet_address, holder.owner) == (
                agent.pk, agent.handle, agent.wallet_address, agent.owner)
    expected = model.objects.select_related("agent__owner" if model is ApiKey else "owner").get(pk=credential.pk)
    assert [getattr(credential, f.attname) for f in model._meta.concrete_fields] == [
        getattr(expected, f.attname) for f in model._meta.concrete_fields]


@pytest.mark.parametrize("path", ["BearerKeyAuthentication", "agent_key_holder (the metered proxy)"])
def test_an_unknown_key_prefix_is_hashed_as_a_known_one_with_a_wrong_secret(path, buyer, monkeypatch,
                                                                            django_assert_num_queries):
    """An unknown prefix was refused without hashing the secret, a known one with a wrong secret after hashing it:
    the time of the answer told whether a prefix exists. Both now cost one hash (against a fixed digest when no key
    has the prefix) and one read, and write nothing."""
    from catalog import authentication
    from marketplace import keys

    hashed = []
    real_digest = keys.digest_secret

    def digest_secret(plaintext):
        hashed.append(plaintext)
        return real_digest(plaintext)

    monkeypatch.setattr(keys, "digest_secret", digest_secret)
    monkeypatch.setattr(authentication, "digest_secret", digest_secret)
    known_prefix = keys.parse_secret(issue_key(buyer))[1]
    unknown_prefix = secrets.token_hex(keys.PREFIX_LENGTH // 2)  # none cached by an earlier run
    for prefix in (known_prefix, unknown_prefix):
        secret, hashed[:] = f"mk_{prefix}_{secrets.token_urlsafe(32)}", []
        request = RequestFactory().get("/agents/me", HTTP_AUTHORIZATION=f"Bearer {secret}")
        with django_assert_num_queries(1), pytest.raises(AuthenticationFailed) as refused:
            if path == "BearerKeyAuthentication":
                BearerKeyAuthentication().authenticate(request)
            else:
                authentication.agent_key_holder(request, scope="read")
        assert refused.value.get_codes() == "invalid_credentials"
        assert hashed == [secret], prefix
