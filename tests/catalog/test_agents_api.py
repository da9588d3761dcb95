import json
import threading

import pytest
from django.contrib.auth import get_user_model
from django.db import connections

from catalog import services
from catalog.models import Agent, ApiKey
from marketplace.models import IdempotencyRecord
from eth_account import Account

from tests.catalog.factories import AgentFactory, agent_body, issue_owner_token
from tests.conftest import Api, codes_at, error_code

pytestmark = pytest.mark.django_db

WALLET = "0x70997970C51812dc3A010C7d01b50e0d17dc79C8"


def test_an_operator_creates_an_agent_from_their_admin_session(settings):
    """An admin session acts in the API as its user, an owner: creating an agent with it was a 500 (the owner's row
    was locked through the session's lazy user's class, which has no manager)."""
    from tests.support.operators import operator_client

    settings.PASSWORD_HASHERS = ["django.contrib.auth.hashers.MD5PasswordHasher"]
    user = get_user_model().objects.create_user("operator", "operator@example.com", "operator-password",
                                                is_staff=True)
    operator = operator_client("operator", "operator-password")

    created = operator.post("/agents", agent_body("ops-bot", owner=user), content_type="application/json")

    assert created.status_code == 201, created.content
    assert Agent.objects.get(handle="ops-bot").owner.username == "operator"


def test_owner_creates_an_agent_and_issues_a_key_shown_once(owner, owner_api):
    wallet = Account.create()
    response = owner_api.post("/agents", agent_body("my-bot", owner=owner, account=wallet, roles=["buyer", "seller"],
                                                    wallet_address=wallet.address.lower()))
    assert response.status_code == 201, response.content
    agent = response.json()
    assert agent["wallet_address"] == wallet.address  # stored checksummed
    assert sorted(agent["roles"]) == ["buyer", "seller"]

    issued = owner_api.post(f"/agents/{agent['id']}/api-keys", {"name": "ci", "scope": "read"})
    assert issued.status_code == 201
    secret = issued.json()["secret"]
    assert issued.json()["scopes"] == ["read"]
    assert Api(secret).get("/agents/me").json()["handle"] == "my-bot"

    listed = owner_api.get(f"/agents/{agent['id']}/api-keys").json()["results"]
    assert "secret" not in listed[0]

    revoked = owner_api.post(f"/agents/{agent['id']}/api-keys/{listed[0]['id']}/revoke")
    assert revoked.status_code == 200 and revoked.json()["revoked_at"]
    again = owner_api.post(f"/agents/{agent['id']}/api-keys/{listed[0]['id']}/revoke")
    assert again.json()["revoked_at"] == revoked.json()["revoked_at"]
    assert Api(secret).get("/agents/me").status_code == 401


@pytest.mark.parametrize(("body", "field", "code"), [
    ({"wallet_address": "0x123"}, "wallet_address", "invalid_address"),
    ({"wallet_address": "0x70997970c51812dc3a010c7d01b50e0d17dc79C8"}, "wallet_address", "invalid_address"),
    ({"handle": "Bad Handle"}, "handle", "invalid_handle"),
    # Handles are ASCII: none can look like another's in another script or width, nor differ by _ from one with -.
    ({"handle": "\u0430cme-bot"}, "handle", "invalid_handle"),  # Cyrillic а
    ({"handle": "\uff41cme-bot"}, "handle", "invalid_handle"),  # fullwidth ａ
    ({"handle": "acme_bot"}, "handle", "invalid_handle"),
    ({"handle": "x" * 65}, "handle", "max_length"),
    ({"roles": []}, "roles", "empty"),
    ({"extra": 1}, "extra", "unknown_field"),
])
def test_agent_validation(owner_api, body, field, code):
    data = {"handle": "my-bot", "display_name": "My bot", "wallet_address": WALLET, "roles": ["buyer"], **body}
    response = owner_api.post("/agents", data)
    assert code in codes_at(response, field)
    assert not Agent.objects.exists()


def test_handle_taken_and_reserved(owner, owner_api):
    data = agent_body("my-bot", owner=owner)
    assert owner_api.post("/agents", data).status_code == 201
    taken = owner_api.post("/agents", data)
    assert taken.status_code == 409 and error_code(taken) == "handle_taken"
    reserved = owner_api.post("/agents", {**data, "handle": "services"})
    assert reserved.status_code == 400 and error_code(reserved) == "handle_reserved"


@pytest.mark.parametrize("spelling", [str, lambda agent_id: agent_id.hex])
def test_a_handle_spelling_an_agent_id_is_refused(owner_api, seller, spelling):
    """The skill route names a seller by its handle or its id: a handle spelling another agent's id took its calls."""
    data = {"handle": spelling(seller.pk), "display_name": "Bot", "wallet_address": WALLET, "roles": ["seller"]}
    refused = owner_api.post("/agents", data)
    assert refused.status_code == 400 and error_code(refused) == "handle_reserved"
    assert not Agent.objects.filter(handle=data["handle"]).exists()


@pytest.mark.postgres
def agents_created_at_once_by_two_owners(body_of) -> list:
    """Two new owners' `POST /agents` of `body_of(owner)`, each on its own thread: their answers."""
    owners = [get_user_model().objects.create_user(f"owner-{n}") for n in range(2)]
    answers = []

    def create(owner):
        try:
            answers.append(Api(issue_owner_token(owner)).post("/agents", body_of(owner)))
        finally:
            connections.close_all()

    threads = [threading.Thread(target=create, args=(owner,)) for owner in owners]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    return answers


@pytest.mark.django_db(transaction=True)
def test_two_owners_creating_one_handle_at_once_get_201_and_409_not_500(monkeypatch):
    """Both find the handle free, then both insert: the unique constraint refuses the second (a 500 before)."""
    both_checked, checksum_address = threading.Barrier(2, timeout=10), services.checksum_address

    def after_the_handle_check(address):  # runs after the handle was found free, before the insert
        both_checked.wait()
        return checksum_address(address)

    monkeypatch.setattr(services, "checksum_address", after_the_handle_check)
    answers = agents_created_at_once_by_two_owners(lambda owner: agent_body("same-handle", owner=owner))
    assert sorted(answer.status_code for answer in answers) == [201, 409], [a.content for a in answers]
    assert {error_code(answer) for answer in answers if answer.status_code == 409} == {"handle_taken"}
    assert Agent.objects.filter(handle="same-handle").count() == 1


def test_a_replayed_key_issue_answers_the_key_without_its_secret_which_no_record_keeps(owner_api, buyer):
    """API keys are kept as digests; the stored answer of an `Idempotency-Key` request kept the secret in clear."""
    headers = {"Idempotency-Key": "issue-once"}
    issued = owner_api.post(f"/agents/{buyer.pk}/api-keys", {"name": "ci"}, headers=headers)
    assert issued.status_code == 201, issued.content
    secret = issued.json()["secret"]
    assert secret not in json.dumps(list(IdempotencyRecord.objects.values_list("response_body", flat=True)))
    assert Api(secret).get("/agents/me").status_code == 200

    replay = owner_api.post(f"/agents/{buyer.pk}/api-keys", {"name": "ci"}, headers=headers)
    assert replay.status_code == 201 and replay["Idempotent-Replayed"] == "true"
    assert replay.json() == {**issued.json(), "secret": None} and replay["Idempotent-Secret-Withheld"] == "not_kept"
    assert ApiKey.objects.filter(agent=buyer).count() == 1
    schema = Api().get("/api/schema/", {"format": "json"}).json()
    secret_field = schema["components"]["schemas"]["ApiKeyIssued"]["properties"]["secret"]
    assert secret_field["nullable"] is True and "replay" in secret_field["description"]


def test_owner_sees_only_own_agents(owner_api, seller):
    assert owner_api.get(f"/agents/{seller.pk}/api-keys").status_code == 404
    assert error_code(owner_api.post(f"/agents/{seller.pk}/api-keys", {})) == "agent_not_found"


def test_an_agent_holds_at_most_the_limits_live_api_keys(owner_api, buyer, settings):
    """Rate limits count per key: an agent minting keys without bound had as many budgets as it liked."""
    from datetime import timedelta

    from django.utils import timezone

    settings.API_KEYS_PER_AGENT = 3
    ApiKey.objects.filter(agent=buyer).delete()
    keys = [owner_api.post(f"/agents/{buyer.pk}/api-keys", {"name": f"k{i}"}) for i in range(3)]
    assert [k.status_code for k in keys] == [201, 201, 201]

    refused = owner_api.post(f"/agents/{buyer.pk}/api-keys", {"name": "one-more"})
    assert refused.status_code == 409, refused.content
    assert error_code(refused) == "api_key_limit_reached"
    assert refused.json()["error"]["details"] == {"max_keys": 3}
    assert ApiKey.objects.filter(agent=buyer).count() == 3

    # A revoked or expired key frees its place.
    assert owner_api.post(f"/agents/{buyer.pk}/api-keys/{keys[0].json()['id']}/revoke").status_code == 200
    assert owner_api.post(f"/agents/{buyer.pk}/api-keys", {"name": "after-revoke"}).status_code == 201
    ApiKey.objects.filter(pk=keys[1].json()["id"]).update(expires_at=timezone.now() - timedelta(seconds=1))
    assert owner_api.post(f"/agents/{buyer.pk}/api-keys", {"name": "after-expiry"}).status_code == 201


@pytest.mark.postgres
@pytest.mark.django_db(transaction=True)
def test_keys_issued_at_once_at_the_limit_do_not_pass_it_together(monkeypatch, settings):
    """Each issue counts the agent's live keys and then adds one: two at once at the last place both counted it
    free, but for the lock on the agent's row that orders them."""
    settings.API_KEYS_PER_AGENT = 2
    owner = get_user_model().objects.create_user("key-racer")
    agent = AgentFactory(owner=owner, handle="key-racer")
    services.api_key_issue(agent=agent)
    token, both_ready, issue_secret = issue_owner_token(owner), threading.Barrier(2, timeout=10), services.issue_secret

    def issued_once_both_are_ready(kind):  # before the count of live keys
        both_ready.wait()
        return issue_secret(kind)

    monkeypatch.setattr(services, "issue_secret", issued_once_both_are_ready)
    answers = []

    def issue():
        try:
            answers.append(Api(token).post(f"/agents/{agent.pk}/api-keys", {}))
        finally:
            connections.close_all()

    threads = [threading.Thread(target=issue) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    assert sorted(answer.status_code for answer in answers) == [201, 409], [a.content for a in answers]
    assert ApiKey.objects.filter(agent=agent, revoked_at=None).count() == 2


def test_an_owner_has_at_most_the_limits_agents(owner_api, owner, settings):
    """Handles are one namespace for every tenant: without a bound, one owner could take handle after handle (and
    its agent listing, one page, grew without end)."""
    settings.AGENTS_PER_OWNER = 2
    Agent.objects.filter(owner=owner).delete()

    wallet = Account.create()

    def create(handle):  # one wallet: an owner's agents may share it
        return owner_api.post("/agents", agent_body(handle, owner=owner, account=wallet))

    assert [create("bot-a").status_code, create("bot-b").status_code] == [201, 201]
    refused = create("bot-c")
    assert refused.status_code == 409, refused.content
    assert error_code(refused) == "agent_limit_reached"
    assert refused.json()["error"]["details"] == {"max_agents": 2}
    assert not Agent.objects.filter(handle="bot-c").exists()


def test_an_agents_key_listing_is_paged_and_leaves_revoked_keys_out_unless_asked(owner_api, buyer):
    """Revoked keys stay in the table for ever (the admin's record): listed whole, an agent that minted and revoked
    keys all day was answered all of them in one page."""
    ApiKey.objects.filter(agent=buyer).delete()
    issued = [owner_api.post(f"/agents/{buyer.pk}/api-keys", {"name": f"k{i}"}).json()["id"] for i in range(5)]
    for key_id in issued[:2]:
        assert owner_api.post(f"/agents/{buyer.pk}/api-keys/{key_id}/revoke").status_code == 200
    live = sorted(issued[2:], reverse=True)  # newest first

    def all_pages(**query) -> list[dict]:
        keys, cursor = [], None
        for _ in range(10):
            page = owner_api.get(f"/agents/{buyer.pk}/api-keys", {**query, "limit": 2,
                                                                   **({"cursor": cursor} if cursor else {})})
            assert page.status_code == 200, page.content
            assert set(page.json()) == {"results", "next_cursor"} and len(page.json()["results"]) <= 2
            keys += page.json()["results"]
            cursor = page.json()["next_cursor"]
            if cursor is None:
                return keys
        raise AssertionError("pages without end")

    assert [key["id"] for key in all_pages()] == live
    every = all_pages(include_revoked="true")
    assert [key["id"] for key in every] == sorted(issued, reverse=True)
    assert [bool(key["revoked_at"]) for key in every] == [False, False, False, True, True]
    assert "secret" not in every[0]

    for bad in ({"include_revoked": "yes"}, {"limit": "1000"}, {"cursor": "forged"}, {"other": "1"}):
        refused = owner_api.get(f"/agents/{buyer.pk}/api-keys", bad)
        assert refused.status_code == 400, (bad, refused.content)
