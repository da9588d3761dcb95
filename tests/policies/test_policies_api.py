import importlib
from datetime import timedelta

import pytest
from django.db import transaction
from django.utils import timezone

from agreements import services as agreement_services
from agreements.models import UsageAgreement
from marketplace.sweeps import RowsFailed
from policies.models import ApprovalRequest
from tests.agreements.helpers import proposal, propose
from tests.catalog.factories import AgentFactory, UserFactory, issue_owner_token, register_service
from tests.conftest import Api, codes_at, error_code
from tests.policies.helpers import whole_policy
from tests.support.openapi import assert_documented

pytestmark = pytest.mark.django_db


@pytest.fixture
def service(seller):
    return register_service(seller)  # 0.02 USDC per call


def test_get_default_and_put_policy(owner_api, buyer):
    url = f"/agents/{buyer.pk}/policies"
    assert owner_api.get(url).json()["daily_cap_atomic"] is None
    body = {"daily_cap_atomic": 5_000_000, "blocked_tags": ["Gambling"], "allowed_tokens": ["USDC"]}
    response = owner_api.put(url, body)
    assert response.status_code == 200, response.content
    assert response.json()["daily_cap_atomic"] == 5_000_000
    assert response.json()["blocked_tags"] == ["gambling"]
    # What a PUT leaves out is kept (it was reset: `test_a_policy_put_changes_the_fields_given_and_keeps_the_others`).
    assert owner_api.put(url, {"monthly_cap_atomic": 1}).json()["daily_cap_atomic"] == 5_000_000


def test_the_default_policy_has_every_documented_field(owner_api, buyer):
    """Found by schemathesis: with no policy yet, `updated_at` was missing from the answer."""
    response = owner_api.get(f"/agents/{buyer.pk}/policies")
    assert response.json()["updated_at"] is None
    assert_documented(response, "get", "/agents/{agent_id}/policies")


@pytest.mark.parametrize(("body", "field", "code"), [
    ({"daily_cap_atomic": -1}, "daily_cap_atomic", "negative"),
    ({"daily_cap_atomic": 1.5}, "daily_cap_atomic", "invalid"),
    ({"allowed_services": ["not-a-uuid"]}, "allowed_services", "invalid"),
    ({"allowed_sellers": ["Bad Handle"]}, "allowed_sellers", "invalid_handle"),
    ({"allowed_tokens": ["DOGE"]}, "allowed_tokens", "invalid_choice"),
    ({"max_spend": 1}, "max_spend", "unknown_field"),
])
def test_policy_validation(owner_api, buyer, body, field, code):
    assert code in codes_at(owner_api.put(f"/agents/{buyer.pk}/policies", body), field)


def test_a_list_of_tags_too_long_for_a_policy_names_the_policys_limit(owner_api, buyer):
    """The message was a listing's limit (15 tags): an owner told so could trim a block list of 500 to 15."""
    response = owner_api.put(f"/agents/{buyer.pk}/policies", {"blocked_tags": [f"tag-{n}" for n in range(501)]})
    [error] = response.json()["error"]["details"]["fields"]["blocked_tags"]
    assert error["code"] == "max_length" and error["message"] == "At most 500 tags are allowed."


def test_only_the_owner_reaches_policies(buyer, buyer_api):
    agent_key = buyer_api.get(f"/agents/{buyer.pk}/policies")
    assert agent_key.status_code == 403 and error_code(agent_key) == "owner_credentials_required"
    stranger = Api(issue_owner_token(UserFactory()))
    assert stranger.get(f"/agents/{buyer.pk}/policies").status_code == 404


def test_denied_proposal_names_the_rule_and_creates_nothing(owner_api, buyer, buyer_api, service):
    owner_api.put(f"/agents/{buyer.pk}/policies", {"blocked_sellers": [service.seller.handle]})
    response = buyer_api.post("/usage-agreements", proposal(service))
    assert response.status_code == 403
    assert error_code(response) == "policy_denied"
    assert response.json()["error"]["details"]["rule"] == "blocked_sellers"
    assert not UsageAgreement.objects.exists()


def test_a_blocked_seller_does_not_escape_the_block_under_another_agent_of_its_owner_or_wallet(
        owner_api, buyer, buyer_api, service):
    """A handle never changes, but a blocked seller's owner made another agent (its own wallet proof is its
    owner's, the same wallet allowed) and sold the same thing under that handle; or another owner's agent took over
    its wallet once it was deactivated. Both are the blocked seller, 403 `blocked_sellers` naming the handle bought
    from; a seller of another owner and wallet is not, nor is the buyer's owner's own other seller when it blocked
    one of its own."""
    blocked = service.seller
    owner_api.put(f"/agents/{buyer.pk}/policies", {"blocked_sellers": [blocked.handle]})
    same_owner = AgentFactory(owner=blocked.owner, handle="seller-renamed", is_buyer=False, is_seller=True)
    same_wallet = AgentFactory(handle="seller-moved", is_buyer=False, is_seller=True,
                               wallet_address=blocked.wallet_address)
    for seller in (same_owner, same_wallet):
        response = buyer_api.post("/usage-agreements", proposal(register_service(seller)))
        assert response.status_code == 403, response.content
        assert response.json()["error"]["details"] == {"rule": "blocked_sellers", "seller": seller.handle}
    assert not UsageAgreement.objects.exists()
    propose(buyer_api, register_service(AgentFactory(handle="seller-other", is_buyer=False, is_seller=True)))
    own_blocked, own_other = (AgentFactory(owner=buyer.owner, handle=handle, is_buyer=False, is_seller=True)
                              for handle in ("own-seller-old", "own-seller-new"))
    owner_api.put(f"/agents/{buyer.pk}/policies", {"blocked_sellers": [blocked.handle, own_blocked.handle]})
    propose(buyer_api, register_service(own_other))


def test_daily_cap_counts_live_commitments_and_ignores_released_ones(owner_api, buyer, buyer_api, seller_api,
                                                                      service):
    # Each proposal of 10 calls commits 200_000 + the 100_000 minimum fee.
    owner_api.put(f"/agents/{buyer.pk}/policies", {"daily_cap_atomic": 600_000})
    first = propose(buyer_api, service)
    propose(buyer_api, service)
    third = buyer_api.post("/usage-agreements", proposal(service))
    assert third.status_code == 403 and third.json()["error"]["details"]["rule"] == "daily_cap"
    buyer_api.post(f"/usage-agreements/{first['id']}/cancel")  # released commitments no longer count
    propose(buyer_api, service)


def test_an_agreement_whose_activation_failed_still_counts_against_the_caps(owner_api, buyer, buyer_api, seller_api,
                                                                           service):
    """A failed activation may be signed again, or its intent relayed by anyone, and become active: it counted as
    nothing, so a second proposal passed the cap and both were funded."""
    owner_api.put(f"/agents/{buyer.pk}/policies", {"daily_cap_atomic": 300_000})  # one proposal of 10 calls
    first = propose(buyer_api, service)
    seller_api.put(f"/usage-agreements/{first['id']}/accept")
    with transaction.atomic():
        agreement_services.agreement_activation_begin(agreement_id=first["id"], buyer=buyer)
    with transaction.atomic():
        agreement_services.agreement_activation_failed(agreement_id=first["id"], reason="activate reverted",
                                                        code="activation_reverted")
    second = buyer_api.post("/usage-agreements", proposal(service))
    assert second.status_code == 403 and second.json()["error"]["details"]["rule"] == "daily_cap"
    buyer_api.post(f"/usage-agreements/{first['id']}/cancel")  # cancelled, it is released
    propose(buyer_api, service)


def test_a_settled_agreement_counts_what_the_seller_was_paid_not_what_was_metered(owner_api, buyer, buyer_api,
                                                                                  seller_api, service):
    """A settled agreement counted its fee and its metered usage, while an arbiter resolving a dispute may pay the
    seller up to the whole deposit: 200_000 left the wallet, 0 was counted, and the next proposal passed the cap."""
    owner_api.put(f"/agents/{buyer.pk}/policies", {"daily_cap_atomic": 500_000})  # one proposal of 10 calls: 300_000
    first = propose(buyer_api, service)
    seller_api.put(f"/usage-agreements/{first['id']}/accept")
    with transaction.atomic():
        agreement_services.agreement_activation_begin(agreement_id=first["id"], buyer=buyer)
        agreement_services.agreement_activation_confirmed(agreement_id=first["id"], tx_hash="0x" + "a" * 64)
        agreement_services.agreement_settlement_proposed(
            agreement_id=first["id"], challenge_deadline=timezone.now() + timedelta(hours=1), amount=0, seq=1,
            tx_hash="0x" + "b" * 64)
        agreement_services.agreement_disputed(agreement_id=first["id"], reason="not delivered",
                                              tx_hash="0x" + "c" * 64)
        agreement_services.agreement_settling(agreement_id=first["id"], reason="arbiter resolved: 200000 to the seller")
        agreement_services.agreement_settled(agreement_id=first["id"], seller_payout=200_000, buyer_refund=0,
                                             tx_hash="0x" + "d" * 64)

    second = buyer_api.post("/usage-agreements", proposal(service))
    assert second.status_code == 403, second.content
    assert second.json()["error"]["details"] == {"rule": "daily_cap", "spent": 300_000, "amount": 300_000,
                                                 "limit": 500_000}


def test_spend_caps_count_the_last_day_and_the_last_thirty_days(owner_api, buyer, buyer_api, service):
    # Each proposal of 10 calls commits 200_000 + the 100_000 minimum fee.
    owner_api.put(f"/agents/{buyer.pk}/policies", {"daily_cap_atomic": 600_000, "monthly_cap_atomic": 700_000})
    for days_ago in (2, 31):  # the month's cap counts the first, neither cap the second
        made = propose(buyer_api, service)
        UsageAgreement.objects.filter(pk=made["id"]).update(created_at=timezone.now() - timedelta(days=days_ago))
    assert propose(buyer_api, service)["status"] == "proposed"  # day 300_000, month 600_000
    over = buyer_api.post("/usage-agreements", proposal(service))  # day 600_000, month 900_000
    assert over.status_code == 403 and over.json()["error"]["details"]["rule"] == "monthly_cap"


def test_approval_flow(owner_api, buyer, buyer_api, seller_api, service):
    owner_api.put(f"/agents/{buyer.pk}/policies", {"approval_threshold_atomic": 250_000})
    small = buyer_api.post("/usage-agreements", proposal(service, quantity=1)).json()
    assert small["status"] == "proposed"
    held = propose(buyer_api, service, quantity=10)
    assert held["status"] == "pending_approval"
    assert held["approval"]["status"] == "pending"

    # Not yet visible to the seller as acceptable.
    early = seller_api.put(f"/usage-agreements/{held['id']}/accept")
    assert early.status_code == 409

    approvals = owner_api.get(f"/agents/{buyer.pk}/approvals", {"status": "pending"}).json()["results"]
    assert [a["subject_id"] for a in approvals] == [held["id"]]
    assert approvals[0]["amount_atomic"] == 300_000 and approvals[0]["rule"] == "approval_threshold"
    url = f"/agents/{buyer.pk}/approvals/{approvals[0]['id']}"

    # The agent cannot approve its own purchase.
    agent_try = buyer_api.post(f"{url}/approve")
    assert agent_try.status_code == 403 and error_code(agent_try) == "owner_credentials_required"

    approved = owner_api.post(f"{url}/approve", {"note": "ok for this week"})
    assert approved.status_code == 200 and approved.json()["status"] == "approved"
    assert owner_api.post(f"{url}/approve").status_code == 200  # idempotent
    reverse = owner_api.post(f"{url}/reject")
    assert reverse.status_code == 409 and error_code(reverse) == "approval_already_decided"

    agreement = buyer_api.get(f"/usage-agreements/{held['id']}").json()
    assert agreement["status"] == "proposed" and agreement["approval"]["status"] == "approved"
    assert seller_api.put(f"/usage-agreements/{held['id']}/accept").json()["status"] == "accepted"


def test_the_approval_request_of_an_agreement_ends_with_its_term(owner_api, buyer, buyer_api, service):
    """The request waited APPROVAL_TTL_HOURS whatever it held: the owner was shown a deadline a day away for an
    agreement whose term ended in an hour, and approving it then answered 200 `approved` for an agreement that could
    no longer be funded (activation is 409 `agreement_expired`)."""
    owner_api.put(f"/agents/{buyer.pk}/policies", {"approval_threshold_atomic": 1})
    held = propose(buyer_api, service, expires_at=(timezone.now() + timedelta(hours=1)).isoformat())

    [approval] = owner_api.get(f"/agents/{buyer.pk}/approvals").json()["results"]
    assert approval["expires_at"] == held["expires_at"]


def test_rejected_approval_rejects_the_agreement(owner_api, buyer, buyer_api, service):
    owner_api.put(f"/agents/{buyer.pk}/policies", {"approval_threshold_atomic": 1})
    held = propose(buyer_api, service)
    approval = ApprovalRequest.objects.get(subject_id=held["id"])
    response = owner_api.post(f"/agents/{buyer.pk}/approvals/{approval.pk}/reject", {"note": "too pricey"})
    assert response.json()["status"] == "rejected" and response.json()["decision_note"] == "too pricey"
    agreement = buyer_api.get(f"/usage-agreements/{held['id']}").json()
    assert agreement["status"] == "rejected" and agreement["status_reason"] == "rejected by the buyer's owner"


@pytest.mark.parametrize("decision", ["approve", "reject"])
def test_the_owners_decision_note_is_not_told_to_the_seller(owner_api, buyer, buyer_api, seller, seller_api, service,
                                                            decision):
    """The buyer's owner's note on their decision (an internal note: "their price is twice the other's") became the
    agreement's reason, which the seller read on the agreement, its audit trail, its inbox and its webhooks. The seller
    is told the owner decided; the owner keeps the note on the approval request."""
    owner_api.put(f"/agents/{buyer.pk}/policies", {"approval_threshold_atomic": 1})
    held = propose(buyer_api, service)
    approval = ApprovalRequest.objects.get(subject_id=held["id"])
    note = "internal: their price is twice the other seller's"
    decided = owner_api.post(f"/agents/{buyer.pk}/approvals/{approval.pk}/{decision}", {"note": note})
    assert decided.status_code == 200 and decided.json()["decision_note"] == note

    seen_by_seller = [seller_api.get(f"/usage-agreements/{held['id']}"),
                      seller_api.get(f"/usage-agreements/{held['id']}/events"),
                      seller_api.get(f"/agents/{seller.pk}/events")]
    for response in seen_by_seller:
        assert response.status_code == 200, response.content
        assert "internal" not in response.content.decode()
    outcome = {"approve": "approved", "reject": "rejected"}[decision]
    assert seen_by_seller[0].json()["status_reason"] == f"{outcome} by the buyer's owner"
    [kept] = owner_api.get(f"/agents/{buyer.pk}/approvals").json()["results"]
    assert kept["decision_note"] == note


def test_approvals_expire(owner_api, buyer, buyer_api, service):
    owner_api.put(f"/agents/{buyer.pk}/policies", {"approval_threshold_atomic": 1})
    held = propose(buyer_api, service)
    approval = ApprovalRequest.objects.get(subject_id=held["id"])
    ApprovalRequest.objects.filter(pk=approval.pk).update(expires_at=timezone.now() - timedelta(seconds=1))

    late = owner_api.post(f"/agents/{buyer.pk}/approvals/{approval.pk}/approve")
    assert late.status_code == 409 and late.json()["error"]["details"]["status"] == "expired"
    assert UsageAgreement.objects.get(pk=held["id"]).status == "expired"

    other = propose(buyer_api, service)
    ApprovalRequest.objects.filter(subject_id=other["id"]).update(expires_at=timezone.now() - timedelta(seconds=1))
    from policies.tasks import expire_approvals

    assert expire_approvals() == 1
    assert expire_approvals() == 0
    assert UsageAgreement.objects.get(pk=other["id"]).status == "expired"


def test_an_approval_request_whose_expiry_raises_is_skipped_and_logged_and_the_others_still_expire(
        owner_api, buyer, buyer_api, service, monkeypatch, caplog):
    """The subject's hook refusing one expiry (raising) stopped the sweep, and every request after it stayed pending
    at every run."""
    from policies.tasks import expire_approvals

    owner_api.put(f"/agents/{buyer.pk}/policies", {"approval_threshold_atomic": 1})
    held = [propose(buyer_api, service)["id"] for _ in range(3)]
    ApprovalRequest.objects.filter(subject_id__in=held).update(expires_at=timezone.now() - timedelta(seconds=1))
    poisoned = ApprovalRequest.objects.filter(subject_id__in=held).values_list("pk", flat=True).first()
    poisoned_subject = ApprovalRequest.objects.get(pk=poisoned).subject_id
    real_transition = agreement_services._transition

    def transition(agreement_id, **kwargs):
        if agreement_id == poisoned_subject:
            raise RuntimeError("the subject's hook refuses this one")
        return real_transition(agreement_id, **kwargs)

    monkeypatch.setattr(agreement_services, "_transition", transition)
    with pytest.raises(RowsFailed) as failed:
        expire_approvals()
    assert failed.value.failed == [poisoned] and failed.value.applied == 2
    assert ApprovalRequest.objects.get(pk=poisoned).status == "pending"  # its own transaction rolled back
    assert ApprovalRequest.objects.filter(subject_id__in=held, status="expired").count() == 2
    assert UsageAgreement.objects.filter(pk__in=held, status="expired").count() == 2
    assert str(poisoned) in caplog.text


def test_a_purchase_cancelled_while_waiting_for_approval_cancels_its_request_which_is_then_not_approved(
        owner_api, buyer, buyer_api, service):
    """The buyer's cancel left the request pending in the owner's queue until it expired, and approving it answered
    200 `approved`: the owner was told they had consented to a purchase that no longer existed."""
    owner_api.put(f"/agents/{buyer.pk}/policies", {"approval_threshold_atomic": 1})
    held = propose(buyer_api, service)
    assert buyer_api.post(f"/usage-agreements/{held['id']}/cancel").json()["status"] == "cancelled"

    assert owner_api.get(f"/agents/{buyer.pk}/approvals", {"status": "pending"}).json()["results"] == []
    [approval] = owner_api.get(f"/agents/{buyer.pk}/approvals", {"status": "cancelled"}).json()["results"]
    assert approval["subject_id"] == held["id"]
    late = owner_api.post(f"/agents/{buyer.pk}/approvals/{approval['id']}/approve")
    assert late.status_code == 409 and error_code(late) == "approval_already_decided"
    assert late.json()["error"]["details"]["status"] == "cancelled"
    assert buyer_api.get(f"/usage-agreements/{held['id']}").json()["approval"]["status"] == "cancelled"
    assert UsageAgreement.objects.get(pk=held["id"]).status == "cancelled"


def test_the_seller_is_not_told_who_the_buyers_owner_is(owner, owner_api, buyer, buyer_api, seller_api, service):
    """The owner's decision was recorded under their login name, which the agreement's audit trail showed to the
    other party (a seller is untrusted): it says an owner decided, not which account."""
    owner_api.put(f"/agents/{buyer.pk}/policies", {"approval_threshold_atomic": 1})
    held = propose(buyer_api, service)
    approval = ApprovalRequest.objects.get(subject_id=held["id"])
    assert owner_api.post(f"/agents/{buyer.pk}/approvals/{approval.pk}/approve").status_code == 200

    events = seller_api.get(f"/usage-agreements/{held['id']}/events")
    assert events.status_code == 200
    decided = [event for event in events.json()["results"] if event["to_status"] == "proposed"]
    assert [event["actor_kind"] for event in decided] == ["owner"]
    assert owner.username not in events.content.decode()


@pytest.mark.parametrize(("tightened", "rule"), [
    ({"blocked_sellers": ["{seller}"]}, "blocked_sellers"),
    ({"max_per_agreement_atomic": 1}, "max_per_agreement"),
    ({"daily_cap_atomic": 1}, "daily_cap"),
    ({"blocked_tags": ["translation"]}, "blocked_tags"),
])
def test_approving_a_purchase_the_policy_now_denies_is_409_and_leaves_the_request_pending(
        owner_api, buyer, buyer_api, seller_api, service, tightened, rule):
    """The owner approved a request whose purchase the policy had since come to deny (a seller blocked, a cap
    lowered): 200 `approved`, the purchase offered to the seller, and refused only when its money would move. The
    owner is told at the decision, the rule named; the request waits for the policy to change, or a rejection."""
    policy_url = f"/agents/{buyer.pk}/policies"
    owner_api.put(policy_url, {"approval_threshold_atomic": 1})
    held = propose(buyer_api, service)
    approval = ApprovalRequest.objects.get(subject_id=held["id"])
    tightened = {name: [service.seller.handle] if value == ["{seller}"] else value
                 for name, value in tightened.items()}
    owner_api.put(policy_url, whole_policy({"approval_threshold_atomic": 1, **tightened}))

    refused = owner_api.post(f"/agents/{buyer.pk}/approvals/{approval.pk}/approve")

    assert refused.status_code == 409, refused.content
    assert error_code(refused) == "policy_denies_now"
    assert refused.json()["error"]["details"]["rule"] == rule
    assert ApprovalRequest.objects.get(pk=approval.pk).status == "pending"
    assert UsageAgreement.objects.get(pk=held["id"]).status == "pending_approval"
    assert seller_api.put(f"/usage-agreements/{held['id']}/accept").status_code == 409

    owner_api.put(policy_url, whole_policy({"approval_threshold_atomic": 1}))
    approved = owner_api.post(f"/agents/{buyer.pk}/approvals/{approval.pk}/approve")
    assert approved.status_code == 200 and approved.json()["status"] == "approved"
    assert UsageAgreement.objects.get(pk=held["id"]).status == "proposed"


def test_rejecting_a_purchase_the_policy_now_denies_is_allowed(owner_api, buyer, buyer_api, service):
    owner_api.put(f"/agents/{buyer.pk}/policies", {"approval_threshold_atomic": 1})
    held = propose(buyer_api, service)
    approval = ApprovalRequest.objects.get(subject_id=held["id"])
    owner_api.put(f"/agents/{buyer.pk}/policies",
                  {"approval_threshold_atomic": 1, "blocked_sellers": [service.seller.handle]})

    rejected = owner_api.post(f"/agents/{buyer.pk}/approvals/{approval.pk}/reject")

    assert rejected.status_code == 200 and rejected.json()["status"] == "rejected"
    assert UsageAgreement.objects.get(pk=held["id"]).status == "rejected"


@pytest.mark.parametrize("declared", ["ｆｉｎａｎｃｅ", "FINANCE", "𝐟𝐢𝐧𝐚𝐧𝐜𝐞"])
def test_a_blocked_tag_is_not_avoided_by_a_full_width_or_styled_spelling(owner_api, buyer, buyer_api, seller,
                                                                          declared):
    """Tags were compared after trimming and lower-casing only: a seller declaring `ｆｉｎａｎｃｅ` passed an owner's
    `blocked_tags: ["finance"]`. Both are kept, and compared, in NFKC and case-folded."""
    service = register_service(seller, tags=[declared])
    assert [tag.name for tag in service.tags.all()] == ["finance"]
    owner_api.put(f"/agents/{buyer.pk}/policies", {"blocked_tags": ["Ｆｉｎａｎｃｅ"]})
    assert owner_api.get(f"/agents/{buyer.pk}/policies").json()["blocked_tags"] == ["finance"]

    response = buyer_api.post("/usage-agreements", proposal(service))

    assert response.status_code == 403 and error_code(response) == "policy_denied"
    assert response.json()["error"]["details"] == {"rule": "blocked_tags", "tags": ["finance"]}


def test_a_tag_mixing_scripts_is_refused_to_a_listing_and_to_a_policy(owner_api, buyer, seller_api):
    """A Cyrillic `а` in `finаnce` made a tag that looked like `finance` and matched no owner's `blocked_tags`."""
    from tests.catalog.factories import service_data

    listing = seller_api.post("/agents/services", service_data(tags=["fin\u0430nce"]))
    assert listing.status_code == 400 and "tag_mixed_scripts" in codes_at(listing, "tags")
    policy = owner_api.put(f"/agents/{buyer.pk}/policies", {"blocked_tags": ["fin\u0430nce"]})
    assert policy.status_code == 400 and "tag_mixed_scripts" in codes_at(policy, "blocked_tags")
    # One script, or scripts one language writes together, are tags like any other.
    assert seller_api.post("/agents/services", service_data(tags=["финансы", "東京タワー"])).status_code == 201


def test_the_migration_puts_stored_tag_rules_in_the_normal_form(buyer):
    import importlib

    from django.apps import apps

    from policies.models import Policy

    Policy.objects.create(agent=buyer, blocked_tags=["ｆｉｎａｎｃｅ", "finance", "Gambling"], allowed_tags=["ＡＩ"])
    importlib.import_module("policies.migrations.0003_policy_tags_normalised").normalise_policy_tags(apps, None)
    policy = Policy.objects.get(agent=buyer)
    assert policy.blocked_tags == ["finance", "gambling"] and policy.allowed_tags == ["ai"]


def test_a_tag_rule_stored_unnormalised_still_matches(owner_api, buyer, buyer_api, service):
    """The comparison normalises both sides too: a rule written before the migration, or around the API, holds."""
    from policies.models import Policy

    Policy.objects.create(agent=buyer, blocked_tags=["ＴＲＡＮＳＬＡＴＩＯＮ"])
    response = buyer_api.post("/usage-agreements", proposal(service))
    assert response.status_code == 403 and response.json()["error"]["details"]["rule"] == "blocked_tags"


def test_approving_the_purchase_of_a_buyer_deactivated_since_is_409_and_leaves_the_request_pending(
        owner_api, buyer, buyer_api, service):
    """A buyer agent deactivated while its purchase waited (its owner stopping it) had the purchase approved (200) and
    offered to the seller, whose accept of a direct purchase then paid it."""
    from catalog.models import Agent

    owner_api.put(f"/agents/{buyer.pk}/policies", {"approval_threshold_atomic": 1})
    held = propose(buyer_api, service)
    approval = ApprovalRequest.objects.get(subject_id=held["id"])
    Agent.objects.filter(pk=buyer.pk).update(is_active=False)

    refused = owner_api.post(f"/agents/{buyer.pk}/approvals/{approval.pk}/approve")

    assert refused.status_code == 409, refused.content
    assert error_code(refused) == "policy_denies_now"
    assert refused.json()["error"]["details"]["rule"] == "buyer_deactivated"
    assert ApprovalRequest.objects.get(pk=approval.pk).status == "pending"
    assert UsageAgreement.objects.get(pk=held["id"]).status == "pending_approval"


@pytest.mark.parametrize("gone", ["service_deregistered", "seller_deactivated"])
def test_approving_a_purchase_whose_service_or_seller_went_away_since_is_409(owner_api, buyer, buyer_api, service,
                                                                             gone):
    """Approved, a purchase of a service deregistered (or from a seller deactivated) while it waited answered 200
    `approved`: the owner consented to something that can no longer be bought (no new proposal of it is taken)."""
    from catalog import services as catalog_services
    from catalog.models import Agent

    owner_api.put(f"/agents/{buyer.pk}/policies", {"approval_threshold_atomic": 1})
    held = propose(buyer_api, service)
    approval = ApprovalRequest.objects.get(subject_id=held["id"])
    if gone == "service_deregistered":
        catalog_services.service_deregister(service=service, actor=service.seller)
    else:
        Agent.objects.filter(pk=service.seller_id).update(is_active=False)

    refused = owner_api.post(f"/agents/{buyer.pk}/approvals/{approval.pk}/approve")

    assert refused.status_code == 409 and error_code(refused) == gone, refused.content
    assert ApprovalRequest.objects.get(pk=approval.pk).status == "pending"
    assert owner_api.post(f"/agents/{buyer.pk}/approvals/{approval.pk}/reject").json()["status"] == "rejected"


def test_a_paegents_category_becomes_a_tag_in_the_normal_form_and_a_mixed_script_one_is_refused(
        owner_api, buyer, buyer_api, seller, seller_api):
    """A Pægents `category` is also kept as a tag: it was lower-cased only, so `Ｆｉｎａｎｃｅ` passed
    `blocked_tags: ["finance"]` by that way too."""
    from tests.catalog.factories import service_data

    service = register_service(seller, category="Ｆｉｎａｎｃｅ")
    assert "finance" in {tag.name for tag in service.tags.all()}
    owner_api.put(f"/agents/{buyer.pk}/policies", {"blocked_tags": ["finance"]})
    assert error_code(buyer_api.post("/usage-agreements", proposal(service))) == "policy_denied"

    mixed = seller_api.post("/agents/services", service_data(category="fin\u0430nce"))
    assert mixed.status_code == 400 and "tag_mixed_scripts" in codes_at(mixed, "category")


def _term_ended(agreement_id) -> None:
    """The agreement's term ended a minute ago (its proposal's window with it)."""
    ended = timezone.now() - timedelta(minutes=1)
    UsageAgreement.objects.filter(pk=agreement_id).update(expires_at=ended, proposal_expires_at=ended)


@pytest.mark.parametrize("accepted", [False, True], ids=["proposed", "accepted"])
def test_an_agreement_whose_term_ended_unfunded_no_longer_counts_against_the_caps(
        owner_api, buyer, buyer_api, seller_api, service, accepted):
    """An agreement whose term ended before it was funded can no longer be activated (the contract refuses an
    escrow past its expiry), yet it counted against the buyer's caps for 30 days, until the buyer cancelled it."""
    owner_api.put(f"/agents/{buyer.pk}/policies", {"daily_cap_atomic": 300_000})  # one proposal of 10 calls
    first = propose(buyer_api, service)
    if accepted:
        assert seller_api.put(f"/usage-agreements/{first['id']}/accept").status_code == 200
    refused = buyer_api.post("/usage-agreements", proposal(service))
    assert refused.status_code == 403 and refused.json()["error"]["details"]["rule"] == "daily_cap"

    _term_ended(first["id"])
    assert propose(buyer_api, service)["status"] == "proposed"


def test_approving_a_purchase_near_its_term_end_leaves_the_seller_no_time_past_it(owner_api, buyer, buyer_api,
                                                                                    seller_api, service):
    """An approval opened the seller's acceptance for 72 hours whatever the term: approved an hour before its end,
    the purchase could be accepted days after it, when it could no longer be funded."""
    owner_api.put(f"/agents/{buyer.pk}/policies", {"approval_threshold_atomic": 1})
    held = propose(buyer_api, service, expires_at=(timezone.now() + timedelta(hours=1)).isoformat())
    approval = ApprovalRequest.objects.get(subject_id=held["id"])
    assert owner_api.post(f"/agents/{buyer.pk}/approvals/{approval.pk}/approve").status_code == 200
    approved = buyer_api.get(f"/usage-agreements/{held['id']}").json()
    assert approved["status"] == "proposed"
    assert approved["proposal_expires_at"] == approved["expires_at"]


def test_approving_a_purchase_whose_term_ended_is_409(owner_api, buyer, buyer_api, service):
    owner_api.put(f"/agents/{buyer.pk}/policies", {"approval_threshold_atomic": 1})
    held = propose(buyer_api, service, expires_at=(timezone.now() + timedelta(hours=1)).isoformat())
    approval = ApprovalRequest.objects.get(subject_id=held["id"])
    _term_ended(held["id"])
    ApprovalRequest.objects.filter(pk=approval.pk).update(expires_at=timezone.now() - timedelta(minutes=1))

    late = owner_api.post(f"/agents/{buyer.pk}/approvals/{approval.pk}/approve")
    assert late.status_code == 409 and error_code(late) == "approval_already_decided"
    assert late.json()["error"]["details"] == {"status": "expired"}
    assert buyer_api.get(f"/usage-agreements/{held['id']}").json()["status"] == "expired"


@pytest.mark.parametrize("body", [None, {}], ids=["no_body", "empty_object"])
def test_an_empty_policy_put_is_400_and_leaves_the_caps(owner_api, buyer, body):
    """PUT replaced the whole policy, every field left out reset to 'no limit': a client sending an empty body by
    mistake wiped every cap the owner had set."""
    url = f"/agents/{buyer.pk}/policies"
    caps = {"daily_cap_atomic": 5_000_000, "monthly_cap_atomic": 20_000_000, "blocked_sellers": ["seller-one"]}
    assert owner_api.put(url, caps).status_code == 200

    response = owner_api.put(url, body)
    assert response.status_code == 400, response.content
    assert error_code(response) == "empty_policy_update"
    kept = owner_api.get(url).json()
    assert {name: kept[name] for name in caps} == caps


def test_a_policy_put_changes_the_fields_given_and_keeps_the_others(owner_api, buyer):
    """A field left out was reset to 'no limit': an owner (or the Pægents SDK's update_agent_policies) setting one
    cap lifted all the others. Null is the explicit 'no limit', [] the explicit empty list."""
    url = f"/agents/{buyer.pk}/policies"
    owner_api.put(url, {"daily_cap_atomic": 5_000_000, "monthly_cap_atomic": 20_000_000, "allowed_tokens": ["USDC"]})

    changed = owner_api.put(url, {"daily_cap_atomic": 1_000_000})
    assert changed.status_code == 200, changed.content
    assert changed.json()["daily_cap_atomic"] == 1_000_000
    assert changed.json()["monthly_cap_atomic"] == 20_000_000 and changed.json()["allowed_tokens"] == ["USDC"]

    lifted = owner_api.put(url, {"monthly_cap_atomic": None, "allowed_tokens": []}).json()
    assert lifted["monthly_cap_atomic"] is None and lifted["allowed_tokens"] == []
    assert lifted["daily_cap_atomic"] == 1_000_000


def test_an_approval_landing_as_the_term_ends_expires_the_purchase(owner_api, buyer, buyer_api, seller_api, service):
    """The request's deadline is the term's, read a moment before the purchase is moved: an approval in between
    opened a window already closed. The purchase expires instead (the owner's decision stays recorded)."""
    owner_api.put(f"/agents/{buyer.pk}/policies", {"approval_threshold_atomic": 1})
    held = propose(buyer_api, service)
    approval = ApprovalRequest.objects.get(subject_id=held["id"])
    _term_ended(held["id"])  # the request's own deadline not reached yet: the moment in between

    late = owner_api.post(f"/agents/{buyer.pk}/approvals/{approval.pk}/approve")
    # It answered 200 `approved` for a purchase that expired instead: the owner was told the purchase went ahead.
    assert late.status_code == 409 and error_code(late) == "agreement_expired", late.content
    assert late.json()["error"]["details"] == {"status": "expired"}
    assert buyer_api.get(f"/usage-agreements/{held['id']}").json()["status"] == "expired"
    assert seller_api.put(f"/usage-agreements/{held['id']}/accept").status_code == 409
    [closed] = owner_api.get(f"/agents/{buyer.pk}/approvals").json()["results"]
    assert closed["status"] == "expired"
    again = owner_api.post(f"/agents/{buyer.pk}/approvals/{approval.pk}/approve")  # a retry is told the same
    assert again.status_code == 409 and again.json()["error"]["details"] == {"status": "expired"}


def test_approving_a_purchase_above_a_since_lowered_platform_limit_is_400_and_leaves_the_request_pending(
        owner_api, buyer, buyer_api, seller_api, service, settings):
    """The owner approved a purchase whose price the operator had since put above AGREEMENT_MAX_AMOUNT: 200, the
    purchase offered to the seller, refused only when its money would move. The ceiling in force binds at the
    approval, as at the seller's accept: 400 `amount_too_large`, nothing written (the request pending, the purchase
    awaiting it); at the limit it is approved."""
    owner_api.put(f"/agents/{buyer.pk}/policies", {"approval_threshold_atomic": 1})
    held = propose(buyer_api, service)
    approval = ApprovalRequest.objects.get(subject_id=held["id"])
    deposit = int(held["deposit_amount_atomic"])
    settings.AGREEMENT_MAX_AMOUNT = deposit - 1

    refused = owner_api.post(f"/agents/{buyer.pk}/approvals/{approval.pk}/approve")

    assert refused.status_code == 400 and error_code(refused) == "amount_too_large", refused.content
    assert refused.json()["error"]["details"] == {"max_amount_atomic": deposit - 1}
    assert ApprovalRequest.objects.get(pk=approval.pk).status == "pending"
    assert UsageAgreement.objects.get(pk=held["id"]).status == "pending_approval"
    assert UsageAgreement.objects.get(pk=held["id"]).events.count() == 1
    settings.AGREEMENT_MAX_AMOUNT = deposit
    approved = owner_api.post(f"/agents/{buyer.pk}/approvals/{approval.pk}/approve")
    assert approved.status_code == 200 and approved.json()["status"] == "approved", approved.content
    assert UsageAgreement.objects.get(pk=held["id"]).status == "proposed"


def _rules_canonical_migration():
    return importlib.import_module("policies.migrations.0005_policy_rules_canonical")


def _spelt(values, service):
    spellings = {"service_id": str(service.pk), "service_id_upper": str(service.pk).upper(),
                 "service_id_hex": service.pk.hex}
    if isinstance(values, list):
        return [_spelt(value, service) for value in values]
    return values.format(**spellings) if isinstance(values, str) else values


@pytest.mark.parametrize("migrated", [False, True], ids=["stored_after_the_migration", "migrated"])
@pytest.mark.parametrize(("rules", "rule"), [
    ({"blocked_services": ["{service_id_upper}"]}, "blocked_services"),
    ({"blocked_services": ["{service_id_hex}"]}, "blocked_services"),
    ({"blocked_sellers": ["SELLER-ONE"]}, "blocked_sellers"),
    ({"blocked_sellers": [" seller-one"]}, "blocked_sellers"),
    ({"allowed_sellers": "seller-one-trusted"}, "allowed_sellers"),
    ({"allowed_services": "{service_id}0"}, "allowed_services"),
    ({"allowed_sellers": 5}, "allowed_sellers"),
    ({"blocked_tags": "translation"}, "blocked_tags"),
    ({"blocked_sellers": {"seller-one": True}}, "blocked_sellers"),
    ({"blocked_sellers": [["seller-one"]]}, "blocked_sellers"),
    ({"blocked_services": [None]}, "blocked_services"),
])
def test_a_seller_or_service_rule_stored_in_another_spelling_still_holds(buyer, buyer_api, service, rules, rule,
                                                                         migrated):
    """Rules written in the admin before its form was checked (`api_rules_check`) or around the API: an id in capitals
    or without hyphens, a handle in capitals or spaced, blocked nothing (201); a lone string where a list goes allowed
    any seller or service whose name it contains, and blocked no tag (201); a number made every proposal a 500; a
    mapping or a list nested in a blocked list blocked nothing (201). Migrated (0005: rewritten in the form the API
    writes, or left as it was when it cannot be), or written so after the migration, each still holds: a rule not in
    the form the API writes denies every purchase (fails closed)."""
    from django.apps import apps

    from policies.models import Policy

    Policy.objects.create(agent=buyer, **{name: _spelt(values, service) for name, values in rules.items()})
    if migrated:
        _rules_canonical_migration().policy_rules_canonical(apps, None)
    response = buyer_api.post("/usage-agreements", proposal(service))
    assert response.status_code == 403, response.content
    assert response.json()["error"]["details"]["rule"] == rule
    assert not UsageAgreement.objects.exists()


def test_the_migration_rewrites_each_rule_in_the_form_the_api_writes_and_flags_what_it_cannot(buyer, service,
                                                                                              caplog):
    """0005: each list rule as `PUT /agents/{id}/policies` writes it (a lone string a list of it, handles lowercase and
    trimmed, service ids hyphenated lowercase, tags normalised); a rule that cannot be (a number, a mapping, an entry
    that is no text or no service id) is left as it was, logged, and denies every purchase (above)."""
    from django.apps import apps

    from policies.models import Policy

    Policy.objects.create(
        agent=buyer, allowed_sellers="Seller-One ", blocked_sellers=["SELLER-TWO", "seller-two"],
        allowed_services=[str(service.pk).upper(), service.pk.hex], blocked_services=5, allowed_tags="Ｎlp",
        blocked_tags=[{"tag": "x"}], allowed_tokens=["USDC"])
    with caplog.at_level("WARNING", logger="policies"):
        _rules_canonical_migration().policy_rules_canonical(apps, None)
    policy = Policy.objects.get(agent=buyer)
    assert (policy.allowed_sellers, policy.blocked_sellers, policy.allowed_services, policy.allowed_tags,
            policy.allowed_tokens) == (["seller-one"], ["seller-two"], [str(service.pk)], ["nlp"], ["USDC"])
    assert (policy.blocked_services, policy.blocked_tags) == (5, [{"tag": "x"}])
    flagged = [record for record in caplog.records if record.getMessage().startswith("policy rule not normalised")]
    assert sorted(record.rule for record in flagged) == ["blocked_services", "blocked_tags"]
    assert {record.agent_id for record in flagged} == {str(buyer.pk)}


def test_the_api_writes_each_list_rule_in_the_form_evaluation_reads(owner_api, buyer, service):
    """What a PUT stores (the admin's form stores it through the same serializer) is what evaluation takes as read."""
    from policies import rules
    from policies.models import Policy

    response = owner_api.put(f"/agents/{buyer.pk}/policies", {
        "allowed_sellers": ["seller-one"], "blocked_sellers": ["seller-two"],
        "allowed_services": [str(service.pk).upper()], "blocked_services": [service.pk.hex],
        "allowed_tags": ["Ｎlp", "nlp"], "blocked_tags": ["Gambling"], "allowed_tokens": ["USDC"]})
    assert response.status_code == 200, response.content
    policy = Policy.objects.get(agent=buyer)
    assert all(rules.rule_is_canonical(name, getattr(policy, name)) for name in rules.LIST_RULES)


@pytest.mark.parametrize(("stored", "rule"), [
    ({"blocked_services": 5}, "blocked_services"),
    ({"blocked_sellers": {"seller-one": True}}, "blocked_sellers"),
    ({"allowed_tags": [{"tag": "x"}]}, "allowed_tags"),
    ({"blocked_sellers": ["SELLER-ONE"]}, "blocked_sellers"),  # stored around the API after the migration
])
def test_a_rule_stored_in_a_form_the_api_does_not_write_is_shown_flagged_not_as_if_it_held(
        owner_api, buyer, buyer_api, service, stored, rule):
    """A rule migration 0005 could not rewrite (a number, a mapping, an entry that is no text), or one written around
    the API since, denies every purchase of the agent (fails closed); its owner's GET showed it as stored, as if it
    were a rule like any other (a number where the schema says a list), with nothing saying why every purchase was
    refused. It is shown null and named in `unreadable_rules` with evaluation's code, until its owner sets it again."""
    from policies.models import Policy

    Policy.objects.create(agent=buyer, daily_cap=7, **stored)
    url = f"/agents/{buyer.pk}/policies"
    shown = owner_api.get(url)
    assert shown.status_code == 200, shown.content
    assert shown.json()["unreadable_rules"] == [{"rule": rule, "code": "rule_unreadable"}], shown.content
    assert shown.json()[rule] is None and shown.json()["daily_cap_atomic"] == 7
    assert_documented(shown, "get", "/agents/{agent_id}/policies")
    denied = buyer_api.post("/usage-agreements", proposal(service))
    assert denied.status_code == 403 and denied.json()["error"]["details"]["rule"] == rule

    kept = owner_api.put(url, {"daily_cap_atomic": 8})  # what a PUT leaves out is kept: still flagged
    assert kept.status_code == 200 and kept.json()["unreadable_rules"] == [{"rule": rule, "code": "rule_unreadable"}]
    set_again = owner_api.put(url, {rule: []})
    assert set_again.status_code == 200, set_again.content
    assert set_again.json()["unreadable_rules"] == [] and set_again.json()[rule] == []
    assert owner_api.get(url).json()["unreadable_rules"] == []


def test_a_buyer_agent_cannot_flood_its_owner_with_approval_requests(owner_api, buyer, buyer_api, settings):
    """The only bound on what a buyer agent put in its owner's approval queue was per seller (its unfunded
    agreements with each, `UNFUNDED_AGREEMENTS_PER_SELLER`): an agent gone wrong, or talked into it by a seller's
    text, proposing to every seller of the catalogue filled its owner's queue with thousands of pending requests, the
    owner's real one lost among them. Past `APPROVALS_PENDING_PER_AGENT` a proposal that would wait is 409, nothing
    recorded; one the policy allows outright still goes through, and a decision frees a place."""
    settings.UNFUNDED_AGREEMENTS_PER_SELLER = 2
    settings.APPROVALS_PENDING_PER_AGENT = 3
    services = [register_service(AgentFactory(handle=f"flood-seller-{index}", is_buyer=False, is_seller=True))
                for index in range(3)]
    owner_api.put(f"/agents/{buyer.pk}/policies", {"approval_threshold_atomic": 250_000})
    held = [propose(buyer_api, service)["id"] for service in (services[0], services[0], services[1])]

    flood = buyer_api.post("/usage-agreements", proposal(services[2]))

    assert flood.status_code == 409, flood.content
    assert error_code(flood) == "pending_approvals_limit_reached"
    assert flood.json()["error"]["details"] == {"max_pending_approvals": 3}
    assert UsageAgreement.objects.filter(buyer=buyer).count() == 3
    assert propose(buyer_api, services[2], quantity=1)["status"] == "proposed"  # below the threshold: not held
    approval = ApprovalRequest.objects.get(subject_id=held[0])
    assert owner_api.post(f"/agents/{buyer.pk}/approvals/{approval.pk}/reject").status_code == 200
    assert propose(buyer_api, services[2])["status"] == "pending_approval"
