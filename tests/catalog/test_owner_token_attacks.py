"""Owner tokens attacked: by a narrower token of the same owner, by another owner, with an `Idempotency-Key` of
another's request, after revocation or expiry, and two decisions of one held purchase at once. (Every operation of
the API with a narrower token: tests/marketplace/test_tenant_isolation.py.)"""

import uuid
from datetime import timedelta

import pytest
from django.utils import timezone
from rest_framework.exceptions import AuthenticationFailed

from agreements.models import UsageAgreement
from catalog import services
from catalog.models import OwnerToken
from marketplace.keys import digest_secret
from marketplace.models import IdempotencyRecord
from policies.models import ApprovalRequest
from tests.agreements.helpers import propose
from tests.catalog.factories import AgentFactory, UserFactory, issue_key, issue_owner_token, register_service
from tests.conftest import Api, error_code
from tests.support.at_once import answered_at_once

pytestmark = pytest.mark.django_db


def issued(api: Api, scope: str, **fields):
    response = api.post("/owner-tokens", {"scope": scope, **fields})
    assert response.status_code == 201, response.content
    return response.json()


def held_purchase(owner_api, buyer, service) -> tuple[str, dict]:
    """A purchase of `buyer` held for its owner's approval, and the approval's URL."""
    assert owner_api.put(f"/agents/{buyer.pk}/policies", {"approval_threshold_atomic": 1}).status_code == 200
    held = propose(Api(services.api_key_issue(agent=buyer).secret), service, quantity=10)
    approval = ApprovalRequest.objects.get(subject_id=held["id"])
    return f"/agents/{buyer.pk}/approvals/{approval.pk}", held


def test_an_idempotent_token_issue_is_replayed_to_its_owners_admin_tokens_only_and_never_with_the_secret(owner_api):
    key = {"Idempotency-Key": "issue-1"}
    first = owner_api.post("/owner-tokens", {"scope": "admin"}, headers=key)
    assert first.status_code == 201 and first.json()["secret"].startswith("ot_")
    read, sibling = Api(issued(owner_api, "read")["secret"]), Api(issued(owner_api, "admin")["secret"])

    by_read = read.post("/owner-tokens", {"scope": "admin"}, headers=key)
    assert by_read.status_code == 403 and error_code(by_read) == "insufficient_scope", by_read.content
    again = sibling.post("/owner-tokens", {"scope": "admin"}, headers=key)
    assert again.status_code == 201 and again["Idempotent-Replayed"] == "true"
    assert again.json()["id"] == first.json()["id"] and again.json()["secret"] is None
    assert again["Idempotent-Secret-Withheld"] == "not_kept"
    stored = IdempotencyRecord.objects.get(key="issue-1")
    assert stored.response_body["secret"] is None and first.json()["secret"] not in str(stored.response_body)
    other_body = owner_api.post("/owner-tokens", {"scope": "read"}, headers=key)
    assert other_body.status_code == 422 and error_code(other_body) == "idempotency_key_reused"

    stranger = Api(issue_owner_token(UserFactory()))
    theirs = stranger.post("/owner-tokens", {"scope": "admin"}, headers=key)
    assert theirs.status_code == 201 and "Idempotent-Replayed" not in theirs
    assert theirs.json()["id"] != first.json()["id"]
    assert OwnerToken.objects.get(pk=theirs.json()["id"]).owner_id != OwnerToken.objects.get(
        pk=first.json()["id"]).owner_id


def test_a_token_lists_no_secret_nor_digest_of_any_token(owner, owner_api):
    secrets = [issued(owner_api, scope)["secret"] for scope in ("read", "approve", "admin")]
    read = Api(secrets[0])
    assert read.post(f"/owner-tokens/{OwnerToken.objects.latest('id').pk}/revoke").status_code == 403
    owner_api.post(f"/owner-tokens/{OwnerToken.objects.filter(scope='approve').get().pk}/revoke")
    listed = read.get("/owner-tokens", {"include_revoked": "true"})
    assert listed.status_code == 200 and len(listed.json()["results"]) == 4
    text = listed.content.decode()
    for secret in secrets:
        assert secret not in text and secret.split("_", 2)[2] not in text and digest_secret(secret) not in text
    assert {field for token in listed.json()["results"] for field in token} == {
        "id", "name", "prefix", "scopes", "created_at", "expires_at", "revoked_at", "last_used_at", "is_this_token",
        "issued_with"}


def test_a_guessed_secret_of_a_real_prefix_is_refused_as_an_unknown_one(owner_api):
    token = issued(owner_api, "admin")
    _, prefix, _ = token["secret"].split("_", 2)
    guessed = Api(f"ot_{prefix}_{'x' * 43}").get("/owner-tokens")
    nobodys = Api(f"ot_{'0' * 10}_{'x' * 43}").get("/owner-tokens")
    assert (guessed.status_code, error_code(guessed)) == (nobodys.status_code, error_code(nobodys)) == (
        401, "invalid_credentials")
    services.credential_revoke(credential=OwnerToken.objects.get(pk=token["id"]))
    # A revoked token's prefix is not told apart from an unknown one either, without its secret.
    guessed = Api(f"ot_{prefix}_{'x' * 43}").get("/owner-tokens")
    assert error_code(guessed) == "invalid_credentials"


@pytest.mark.parametrize("how", ["revoked", "expired"])
def test_a_revoked_or_expired_token_is_refused_at_once_on_every_owner_route(owner_api, buyer, how):
    token = issued(owner_api, "admin")
    api = Api(token["secret"])
    routes = ["/agents", f"/agents/{buyer.pk}/policies", f"/agents/{buyer.pk}/approvals",
              f"/agents/{buyer.pk}/api-keys", "/owner-tokens", f"/agents/{buyer.pk}/events",
              f"/agents/{buyer.pk}/webhooks"]
    for path in routes:  # the process has read the token: nothing it keeps may answer for it afterwards
        assert api.get(path).status_code == 200, path
    if how == "revoked":
        assert owner_api.post(f"/owner-tokens/{token['id']}/revoke").status_code == 200
    else:
        OwnerToken.objects.filter(pk=token["id"]).update(expires_at=timezone.now() - timedelta(seconds=1))
    code = "credentials_revoked" if how == "revoked" else "credentials_expired"
    for path in routes:
        response = api.get(path)
        assert response.status_code == 401 and error_code(response) == code, path
    refused = api.post("/owner-tokens", {"scope": "admin"})
    assert refused.status_code == 401 and error_code(refused) == code


def test_a_read_token_revokes_neither_a_sibling_nor_another_owners_token(owner, owner_api):
    read = Api(issued(owner_api, "read")["secret"])
    sibling = OwnerToken.objects.filter(owner=owner, scope="admin").get()
    issue_owner_token(UserFactory())
    stranger = OwnerToken.objects.latest("id")
    by_read = read.post(f"/owner-tokens/{sibling.pk}/revoke")
    assert by_read.status_code == 403 and error_code(by_read) == "insufficient_scope"
    theirs = read.post(f"/owner-tokens/{stranger.pk}/revoke")
    assert theirs.status_code == 404 and error_code(theirs) == "owner_token_not_found"
    assert not OwnerToken.objects.filter(pk__in=[sibling.pk, stranger.pk]).exclude(revoked_at=None).exists()


def test_a_token_issues_no_token_outliving_it(owner):
    """An admin token given for a day (an operator's for a contractor, say) minted one that never expired: the
    owner's time limit was gone with one call."""
    ends = timezone.now() + timedelta(days=1)
    short = Api(services.owner_token_issue(owner=owner, scope="admin", expires_at=ends).secret)
    later = short.post("/owner-tokens", {"scope": "read", "expires_at": (ends + timedelta(days=30)).isoformat()})
    assert later.status_code == 400 and error_code(later) == "expiry_beyond_issuer", later.content
    assert later.json()["error"]["details"] == {"latest_expiry": ends.isoformat().replace("+00:00", "Z")}
    unlimited = short.post("/owner-tokens", {"scope": "admin"})
    assert unlimited.status_code == 201, unlimited.content
    assert unlimited.json()["expires_at"] == ends.isoformat().replace("+00:00", "Z"), unlimited.content
    within = short.post("/owner-tokens", {"scope": "read", "expires_at": (ends - timedelta(hours=1)).isoformat()})
    assert within.status_code == 201
    assert OwnerToken.objects.filter(owner=owner, expires_at=None).count() == 0


def test_a_token_without_expiry_issues_tokens_of_any_expiry(owner_api):
    assert issued(owner_api, "admin")["expires_at"] is None
    later = timezone.now() + timedelta(days=400)
    assert issued(owner_api, "read", expires_at=later.isoformat())["expires_at"] is not None


def test_an_approve_token_decides_only_its_agents_approvals_each_under_its_own_agent(owner, owner_api, buyer, seller):
    service = register_service(seller)
    approval_url, held = held_purchase(owner_api, buyer, service)
    approval_id = approval_url.rsplit("/", 1)[1]
    approve = Api(issued(owner_api, "approve")["secret"])
    other_agent = AgentFactory(owner=owner, handle="buyer-two")
    under_other = approve.post(f"/agents/{other_agent.pk}/approvals/{approval_id}/approve")
    assert under_other.status_code == 404 and error_code(under_other) == "approval_not_found"
    stranger_agent = AgentFactory(owner=UserFactory(), handle="their-buyer")
    stranger_url, _ = held_purchase(Api(issue_owner_token(stranger_agent.owner)), stranger_agent, service)
    theirs = approve.post(f"{stranger_url}/approve")
    assert theirs.status_code == 404 and error_code(theirs) == "agent_not_found"
    assert ApprovalRequest.objects.filter(status="pending").count() == 2


@pytest.mark.postgres
@pytest.mark.django_db(transaction=True)
def test_an_approval_and_a_rejection_at_once_decide_the_purchase_once(owner, owner_api, buyer, seller):
    approval_url, held = held_purchase(owner_api, buyer, register_service(seller))
    approve = issued(owner_api, "approve")["secret"]
    answers = answered_at_once({verb: (lambda verb=verb: Api(approve).post(f"{approval_url}/{verb}"))
                                for verb in ("approve", "reject")})
    statuses = {verb: answer.status_code for verb, answer in answers.items()}
    assert statuses in ({"approve": 200, "reject": 409}, {"approve": 409, "reject": 200}), [
        answer.content for answer in answers.values()]
    winner = next(verb for verb, status in statuses.items() if status == 200)
    loser = answers["reject" if winner == "approve" else "approve"]
    assert error_code(loser) == "approval_already_decided"
    approval = ApprovalRequest.objects.get(subject_id=held["id"])
    assert approval.status == {"approve": "approved", "reject": "rejected"}[winner]
    assert UsageAgreement.objects.get(pk=held["id"]).status == {"approve": "proposed", "reject": "rejected"}[winner]


def test_an_operator_signed_in_to_the_admin_issues_and_lists_its_own_tokens(admin_client, admin_user):
    """An admin session acts as its person with every scope (IsOwner): its user is a lazy object, whose class has no
    manager to lock the owner's row with."""
    response = admin_client.post("/owner-tokens", {"scope": "read"}, content_type="application/json")
    assert response.status_code == 201, response.content[:300]
    assert OwnerToken.objects.get(pk=response.json()["id"]).owner_id == admin_user.pk
    listed = admin_client.get("/owner-tokens")
    assert [token["is_this_token"] for token in listed.json()["results"]] == [False]
    revoked = admin_client.post(f"/owner-tokens/{response.json()['id']}/revoke", content_type="application/json")
    assert revoked.status_code == 200 and revoked.json()["revoked_at"] is not None


def test_an_operator_signed_in_to_the_admin_makes_each_owners_write_of_its_own(admin_client, admin_user, seller):
    buyer = AgentFactory(owner=admin_user, handle="operators-buyer")
    as_json = {"content_type": "application/json"}
    key = admin_client.post(f"/agents/{buyer.pk}/api-keys", {"scope": "read"}, **as_json)
    assert key.status_code == 201, key.content[:300]
    assert admin_client.post(f"/agents/{buyer.pk}/api-keys/{key.json()['id']}/revoke",
                             content_type="application/json").status_code == 200
    hook = admin_client.post(f"/agents/{buyer.pk}/webhooks", {"url": "https://hooks.example.com/a"}, **as_json)
    assert hook.status_code == 201, hook.content[:300]
    policy = admin_client.put(f"/agents/{buyer.pk}/policies", {"approval_threshold_atomic": 1}, **as_json)
    assert policy.status_code == 200, policy.content[:300]
    held = propose(Api(services.api_key_issue(agent=buyer).secret), register_service(seller), quantity=10)
    approval = ApprovalRequest.objects.get(subject_id=held["id"])
    decided = admin_client.post(f"/agents/{buyer.pk}/approvals/{approval.pk}/approve", **as_json)
    assert decided.status_code == 200 and decided.json()["status"] == "approved", decided.content[:300]


@pytest.mark.parametrize("kind", ["ot", "mk"])
def test_a_nul_in_a_presented_prefix_is_malformed_credentials_not_a_500(kind, owner):
    """PostgreSQL's text holds no NUL: the prefix's lookup raised (a 500) on DRF's path and on the fast paths."""
    api = Api(f"{kind}_abcd\x00fghij_{'x' * 43}")
    for response in (api.get("/owner-tokens"), api.post("/catalog/search", {"q": "translate"}),
                     api.get(f"/metered-proxy/{uuid.uuid4()}/translate")):
        assert response.status_code == 401 and error_code(response) == "invalid_credentials", response.content[:200]


def test_an_agents_admin_key_issues_no_owner_token_and_revokes_none(owner, owner_api, buyer):
    key = Api(services.api_key_issue(agent=buyer, scope="admin").secret)
    token = OwnerToken.objects.get(owner=owner)
    for response in (key.post("/owner-tokens", {"scope": "read"}), key.get("/owner-tokens"),
                     key.post(f"/owner-tokens/{token.pk}/revoke")):
        assert response.status_code == 403 and error_code(response) == "owner_credentials_required"
    assert OwnerToken.objects.filter(owner=owner, revoked_at=None).count() == 1


@pytest.mark.postgres
@pytest.mark.django_db(transaction=True)
def test_two_issues_at_once_hold_the_live_token_bound(owner, owner_api, settings):
    settings.OWNER_TOKENS_PER_OWNER = 2
    answers = answered_at_once({name: (lambda: Api(owner_api.secret).post("/owner-tokens", {"scope": "read"}))
                                for name in ("one", "two")})
    assert sorted(answer.status_code for answer in answers.values()) == [201, 409]
    assert OwnerToken.objects.filter(owner=owner, revoked_at=None).count() == 2


def test_revoking_a_token_revokes_every_token_and_agent_key_issued_from_it_at_once(owner_api, buyer):
    """A leaked token's revocation kills what the thief minted with it: its tokens, theirs in turn, and the agent
    keys any of them issued. What the owner issued otherwise lives on; revoking again changes nothing."""
    parent = issued(owner_api, "admin")
    parent_api = Api(parent["secret"])
    child = issued(parent_api, "admin")
    child_api = Api(child["secret"])
    grandchild_api = Api(issued(child_api, "read")["secret"])
    keys = [api.post(f"/agents/{buyer.pk}/api-keys", {"scope": "pay"}).json()["secret"]
            for api in (parent_api, child_api, owner_api)]
    sibling_api = Api(issued(owner_api, "read")["secret"])
    assert grandchild_api.get("/owner-tokens").status_code == 200
    assert Api(keys[1]).get("/agents/me").status_code == 200

    assert child["issued_with"] == parent["id"] and parent["issued_with"] is not None
    listed = owner_api.get(f"/agents/{buyer.pk}/api-keys").json()["results"]
    assert sorted(key["issued_with"] for key in listed) == sorted([parent["id"], child["id"], parent["issued_with"]])

    revoked = owner_api.post(f"/owner-tokens/{parent['id']}/revoke")
    assert revoked.status_code == 200 and revoked.json()["revoked_at"] is not None

    for api in (parent_api, child_api, grandchild_api):
        refused = api.get("/owner-tokens")
        assert refused.status_code == 401 and error_code(refused) == "credentials_revoked", refused.content
    for key in keys[:2]:
        refused = Api(key).get("/agents/me")
        assert refused.status_code == 401 and error_code(refused) == "credentials_revoked", refused.content
    assert Api(keys[2]).get("/agents/me").status_code == 200
    assert sibling_api.get("/owner-tokens").status_code == 200 and owner_api.get("/owner-tokens").status_code == 200
    again = owner_api.post(f"/owner-tokens/{parent['id']}/revoke")
    assert again.status_code == 200 and again.json()["revoked_at"] == revoked.json()["revoked_at"]
    child_revoked_at = OwnerToken.objects.get(pk=child["id"]).revoked_at
    assert child_revoked_at is not None and OwnerToken.objects.filter(revoked_at=child_revoked_at).count() == 3


def test_a_token_revoking_itself_revokes_what_it_issued_not_its_issuer(owner_api):
    parent_api = Api(issued(owner_api, "admin")["secret"])
    child = issued(parent_api, "admin")
    child_api = Api(child["secret"])
    grandchild_api = Api(issued(child_api, "approve")["secret"])
    assert child_api.post(f"/owner-tokens/{child['id']}/revoke").status_code == 200
    refused = grandchild_api.get("/owner-tokens")
    assert refused.status_code == 401 and error_code(refused) == "credentials_revoked"
    assert parent_api.get("/owner-tokens").status_code == 200


def test_a_token_revoked_while_it_issues_issues_nothing(owner, buyer):
    """Authenticated just before its revocation committed, a token's issue is refused in the issuing transaction:
    nothing outlives the revocation that missed it."""
    issuer = services.owner_token_issue(owner=owner, scope="admin").credential
    stale = OwnerToken.objects.get(pk=issuer.pk)  # as the request authenticated it, unrevoked
    services.credential_revoke(credential=issuer)
    tokens, keys = OwnerToken.objects.count(), buyer.api_keys.count()
    with pytest.raises(AuthenticationFailed) as refused:
        services.owner_token_issue(owner=owner, scope="read", issued_with=stale)
    assert refused.value.get_codes() == "credentials_revoked"
    with pytest.raises(AuthenticationFailed):
        services.api_key_issue(agent=buyer, issued_with=stale)
    assert OwnerToken.objects.count() == tokens and buyer.api_keys.count() == keys


def test_a_token_past_its_expiry_ends_the_tokens_it_issued_and_revoked_then_its_keys_too(owner_api, buyer):
    """Expiry is routine: the tokens a token issued end with it (they cannot outlive it), the agent keys it issued do
    not. Found leaked afterwards, it is revoked all the same (the sweep marked it revoked): its keys then end."""
    parent = issued(owner_api, "admin", expires_at=(timezone.now() + timedelta(hours=1)).isoformat())
    parent_api = Api(parent["secret"])
    child_api = Api(issued(parent_api, "read")["secret"])
    key = parent_api.post(f"/agents/{buyer.pk}/api-keys", {"scope": "pay"}).json()["secret"]
    OwnerToken.objects.filter(pk=parent["id"]).update(expires_at=timezone.now() - timedelta(seconds=1))
    OwnerToken.objects.filter(issued_with=parent["id"]).update(expires_at=timezone.now() - timedelta(seconds=1))
    services.api_keys_expire()
    assert OwnerToken.objects.get(pk=parent["id"]).revoked_at is not None  # the sweep's
    assert child_api.get("/owner-tokens").status_code == 401
    assert Api(key).get("/agents/me").status_code == 200

    assert owner_api.post(f"/owner-tokens/{parent['id']}/revoke").status_code == 200
    refused = Api(key).get("/agents/me")
    assert refused.status_code == 401 and error_code(refused) == "credentials_revoked"


@pytest.mark.postgres
@pytest.mark.django_db(transaction=True)
def test_what_a_token_issues_while_it_is_revoked_is_refused_or_revoked_with_it(owner, owner_api, buyer):
    """A thief's token minting while the owner revokes it: each issue is refused (401) or revoked with it; nothing
    it issued outlives the revocation, whichever commits first."""
    parent = issued(owner_api, "admin")
    thief = parent["secret"]
    answers = answered_at_once({
        "revoke": lambda: Api(owner_api.secret).post(f"/owner-tokens/{parent['id']}/revoke"),
        "token": lambda: Api(thief).post("/owner-tokens", {"scope": "admin"}),
        "key": lambda: Api(thief).post(f"/agents/{buyer.pk}/api-keys", {"scope": "pay"}),
    })
    assert answers["revoke"].status_code == 200
    assert {answers["token"].status_code, answers["key"].status_code} <= {201, 401}, [
        answer.content for answer in answers.values()]
    assert not OwnerToken.objects.filter(issued_with=parent["id"], revoked_at=None).exists()
    assert not buyer.api_keys.filter(issued_with=parent["id"], revoked_at=None).exists()
    for name, path in (("token", "/owner-tokens"), ("key", "/agents/me")):
        if answers[name].status_code == 201:
            assert Api(answers[name].json()["secret"]).get(path).status_code == 401


def test_revoking_a_stolen_token_stops_the_webhooks_its_thief_subscribed_with_it_and_with_what_it_issued(
        owner_api, buyer, seller):
    """A thief with an owner token subscribes its own URL to the owner's agent (directly, and with an agent key it
    issued with the token): once the token is revoked (its keys with it), those subscriptions kept sending the
    victim's agreement events to the thief. They are paused with the revocation (resumed by the owner, with a live
    credential, if they were theirs); the owner's own subscription keeps delivering."""
    from agreements.models import WebhookDelivery, WebhookSubscription

    stolen = issued(owner_api, "admin")
    thief = Api(stolen["secret"])
    by_token = thief.post(f"/agents/{buyer.pk}/webhooks", {"url": "https://thief.example.com/t"})
    assert by_token.status_code == 201, by_token.content
    key = thief.post(f"/agents/{buyer.pk}/api-keys", {"scope": "admin"}).json()["secret"]
    by_key = Api(key).post("/webhooks", {"url": "https://thief.example.com/k"})
    assert by_key.status_code == 201, by_key.content
    own = owner_api.post(f"/agents/{buyer.pk}/webhooks", {"url": "https://owner.example.com/hook"}).json()

    assert owner_api.post(f"/owner-tokens/{stolen['id']}/revoke").status_code == 200
    propose(Api(issue_key(buyer, scope="admin")), register_service(seller))

    delivered = set(WebhookDelivery.objects.values_list("subscription_id", flat=True))
    assert delivered == {uuid.UUID(own["id"])}, delivered
    listed = {hook["id"]: hook for hook in owner_api.get(f"/agents/{buyer.pk}/webhooks").json()}
    assert listed[by_token.json()["id"]]["paused"] and listed[by_key.json()["id"]]["paused"]
    assert not listed[own["id"]]["paused"]
    assert WebhookSubscription.objects.filter(paused_at=None).count() == 1


def test_a_credential_retired_with_keep_issued_leaves_what_was_issued_and_created_with_it(owner_api, buyer):
    """A rotation is not a leak: an owner retiring a token (`keep_issued`) keeps the tokens and agent keys it issued
    and the webhook subscriptions made with it, and an agent key retired so keeps its subscriptions; left out, the
    revocation takes them (the tests above)."""
    from agreements.models import WebhookSubscription

    old = issued(owner_api, "admin")
    old_api = Api(old["secret"])
    child_api = Api(issued(old_api, "read")["secret"])
    key = old_api.post(f"/agents/{buyer.pk}/api-keys", {"scope": "admin"}).json()
    by_token = old_api.post(f"/agents/{buyer.pk}/webhooks", {"url": "https://owner.example.com/t"})
    by_key = Api(key["secret"]).post("/webhooks", {"url": "https://owner.example.com/k"})
    assert by_token.status_code == 201 and by_key.status_code == 201, (by_token.content, by_key.content)

    refused = owner_api.post(f"/owner-tokens/{old['id']}/revoke", {"keep_issued": "yes"})
    assert refused.status_code == 400 and old_api.get("/owner-tokens").status_code == 200, refused.content
    retired = owner_api.post(f"/owner-tokens/{old['id']}/revoke", {"keep_issued": True})
    assert retired.status_code == 200 and retired.json()["revoked_at"] is not None, retired.content
    assert old_api.get("/owner-tokens").status_code == 401
    assert child_api.get("/owner-tokens").status_code == 200
    assert Api(key["secret"]).get("/agents/me").status_code == 200
    assert WebhookSubscription.objects.filter(paused_at=None).count() == 2

    assert owner_api.post(f"/agents/{buyer.pk}/api-keys/{key['id']}/revoke", {"keep_issued": True}).status_code == 200
    assert Api(key["secret"]).get("/agents/me").status_code == 401
    assert WebhookSubscription.objects.filter(paused_at=None).count() == 2
