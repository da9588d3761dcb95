
import pytest

from policies.models import ApprovalRequest, Policy
from tests.agreements.helpers import propose
from tests.agreements.test_webhooks import subscribe
from tests.catalog.factories import register_service

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
