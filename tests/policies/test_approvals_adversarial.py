import uuid
import pytest

from agreements.models import UsageAgreement
from policies.models import ApprovalRequest, Policy
from tests.agreements.helpers import proposal, propose
from tests.agreements.test_webhooks import subscribe
from tests.catalog.factories import AgentFactory, register_service

pytestmark = pytest.mark.django_db


@pytest.fixture
def service(seller):
    return register_service(seller)  # 0.02 USDC per call


@pytest.mark.parametrize("rule", ["approval_threshold", "policy_set_by_seller_owner"])
def test_a_held_proposal_tells_the_seller_only_that_it_awaits_the_buyers_approval(
        owner_api, buyer, buyer_api, seller, seller_api, service, http_server, django_capture_on_commit_callbacks,
        rule):
    """The proposal's event named the policy rule that held it (`approval_threshold`: the buyer's owner set one at
    or below this price), which the seller read on the agreement's trail, its inbox and its webhooks: a seller
    probing with its prices learnt the buyer's owner's limits. It is told the purchase awaits the buyer's approval."""
    if rule == "approval_threshold":
        owner_api.put(f"/agents/{buyer.pk}/policies", {"approval_threshold_atomic": 250_000})
    else:
        Policy.objects.create(agent=buyer, updated_by=seller.owner)
    subscribe(seller_api, http_server.url)
    with django_capture_on_commit_callbacks(execute=True):
        held = propose(buyer_api, service, quantity=10)
    assert held["status"] == "pending_approval"
    seen_by_seller = [seller_api.get(f"/usage-agreements/{held['id']}"),
                      seller_api.get(f"/usage-agreements/{held['id']}/events"),
                      seller_api.get(f"/agents/{seller.pk}/events"),
                      seller_api.get(f"/usage-agreements/agents/{seller.pk}/agreements")]
    bodies = [response.content.decode() for response in seen_by_seller]
    bodies += [request.body.decode() for request in http_server.requests]
    assert len(bodies) > 4
    for body in bodies:
        assert rule not in body and "threshold" not in body and "250000" not in body, body
    [event] = [event for event in seen_by_seller[1].json()["results"] if event["to_status"] == "pending_approval"]
    assert event["reason"] == "awaiting the buyer's owner's approval"
    # The buyer's owner still reads the rule on its approval request.
    assert ApprovalRequest.objects.get(subject_id=held["id"]).rule == rule


def _listed(seller, name: str, upstream: str):
    return register_service(seller, name=name, upstream_base_url=upstream,
                            skills=[{"name": f"skill-{uuid.uuid4().hex[:8]}", "description": "A skill",
                                     "price_atomic": 20000}])


def test_a_blocked_service_listed_again_under_a_new_id_is_still_blocked(owner_api, buyer, buyer_api, seller,
                                                                         seller_api, service):
    """`blocked_services` held the service's id: its seller deregistered it and listed the same thing again (same
    upstream, or same name) under a new id, and the owner's buyer bought it. A blocked service blocks its listings
    again: the same upstream (spelt in another case, a trailing slash) whoever lists it, and its seller's owner's
    services of the same name, also once the blocked one was changed to look like something else."""
    owner_api.put(f"/agents/{buyer.pk}/policies", {"blocked_services": [str(service.pk)]})
    moved = seller_api.patch(f"/agents/services/{service.pk}", {"name": "Something else",
                                                               "upstream_base_url": "https://other.example.net/x"})
    assert moved.status_code == 200, moved.content
    same_owner = AgentFactory(owner=seller.owner, handle="seller-again", is_buyer=False, is_seller=True)
    another_owner = AgentFactory(handle="seller-reseller", is_buyer=False, is_seller=True)
    relistings = [_listed(seller, "Fast translator v2", "HTTPS://Translator.EXAMPLE.com:443/api/"),
                  _listed(same_owner, " fast  TRANSLATOR ", "https://new-host.example.org/"),
                  _listed(another_owner, "Reseller", "https://translator.example.com/api"),
                  _listed(seller, "Renamed away", "https://other.example.net/x")]
    for relisting in relistings:
        response = buyer_api.post("/usage-agreements", proposal(relisting))
        assert response.status_code == 403, (relisting.name, response.content)
        assert response.json()["error"]["details"] == {"rule": "blocked_services", "service": str(relisting.pk),
                                                       "listing_of": str(service.pk)}
    assert not UsageAgreement.objects.exists()
    for unrelated in (_listed(seller, "Summariser", "https://translator.example.com/summarise"),
                      _listed(another_owner, "Fast translator", "https://reseller.example.com/api")):
        assert propose(buyer_api, unrelated)["status"] == "proposed"


@pytest.mark.parametrize("change", [{"upstream_base_url": "https://elsewhere.example.net/api"},
                                    {"name": "Something else entirely"},
                                    {"upstream_protocol": "masumi", "skills": []}],
                         ids=["upstream", "name", "protocol"])
def test_approving_a_purchase_whose_service_the_seller_changed_since_the_request_is_409_and_leaves_it_pending(
        owner_api, buyer, buyer_api, seller_api, service, change):
    """The agreement's price and quantity are its own from its proposal (the seller changing the service's price
    changes nothing of it), but the service it buys is the seller's to change: moved to another upstream, or renamed,
    between the request and the owner's decision, the owner's approval consented to a purchase of what the request
    showed, not of what it became. 409 `service_changed`, the request left pending (the owner rejects it; the buyer
    proposes again, the new request showing the service as it is)."""
    owner_api.put(f"/agents/{buyer.pk}/policies", {"approval_threshold_atomic": 1})
    held = propose(buyer_api, service)
    approval = ApprovalRequest.objects.get(subject_id=held["id"])
    repriced = seller_api.patch(f"/agents/services/{service.pk}", {
        "pricing": {"type": "per_call", "unit_name": "call", "unit_price_atomic": 90000, "token": "USDC"}})
    assert repriced.status_code == 200, repriced.content
    url = f"/agents/{buyer.pk}/approvals/{approval.pk}"
    changed = seller_api.patch(f"/agents/services/{service.pk}", change)
    assert changed.status_code == 200, changed.content

    refused = owner_api.post(f"{url}/approve")
    assert refused.status_code == 409, refused.content
    assert refused.json()["error"]["code"] == "service_changed"
    assert owner_api.get(f"/agents/{buyer.pk}/approvals").json()["results"][0]["status"] == "pending"
    assert UsageAgreement.objects.get(pk=held["id"]).status == "pending_approval"
    assert owner_api.post(f"{url}/reject").json()["status"] == "rejected"


def test_a_sellers_price_change_after_the_request_changes_nothing_the_owner_approves(owner_api, buyer, buyer_api,
                                                                                    seller_api, service):
    """Held: the approved purchase keeps the price, quantity and amount the request showed."""
    owner_api.put(f"/agents/{buyer.pk}/policies", {"approval_threshold_atomic": 1})
    held = propose(buyer_api, service, quantity=3)
    approval = ApprovalRequest.objects.get(subject_id=held["id"])
    assert seller_api.patch(f"/agents/services/{service.pk}", {
        "pricing": {"type": "per_call", "unit_name": "call", "unit_price_atomic": 90000,
                    "token": "USDC"}}).status_code == 200
    approved = owner_api.post(f"/agents/{buyer.pk}/approvals/{approval.pk}/approve")
    assert approved.status_code == 200, approved.content
    agreement = buyer_api.get(f"/usage-agreements/{held['id']}").json()
    assert (agreement["status"], agreement["price_per_unit_atomic"], agreement["quantity"]) == ("proposed", 20000, 3)
    assert agreement["deposit_amount_atomic"] + agreement["infra_fee_atomic"] == approval.amount


def test_the_migration_records_what_each_service_blocked_before_it_is_now(buyer, buyer_api, seller, service):
    """0006: a service blocked before its identity was kept is recorded as it is at the migration, so one changed
    afterwards still blocks the listings of what it was; a rule stored in another form is left (it denies all)."""
    import importlib

    from django.apps import apps

    migration = importlib.import_module("policies.migrations.0006_policy_blocked_service_identities")
    Policy.objects.create(agent=buyer, blocked_services=[str(service.pk)])
    migration.blocked_service_identities_record(apps, None)
    service.upstream_base_url, service.name = "https://other.example.net/x", "Something else"
    service.save()

    relisting = _listed(seller, "Fast translator", "https://translator.example.com/api")
    response = buyer_api.post("/usage-agreements", proposal(relisting))
    assert response.status_code == 403, response.content
    assert response.json()["error"]["details"]["listing_of"] == str(service.pk)
