"""A service that is not listed (deregistered, or its seller or the seller's owner deactivated) is, to any party but
the seller's owner, an id nobody has: every endpoint taking a service id answers for it exactly as for an id that
never existed. A proposal or a Masumi purchase naming one was 400 `service_deregistered` / `seller_deactivated`
(404 `service_not_found` for a made-up id): anyone could tell which ids are services, and which sellers were
deactivated."""

import uuid

import pytest
from django.utils import timezone

from catalog import services as catalog_services
from catalog.models import Agent
from tests.catalog.factories import AgentFactory, issue_key, register_service
from tests.conftest import Api, error_code

pytestmark = [pytest.mark.chain, pytest.mark.django_db]


def _hide(service, how: str) -> None:
    if how == "deregistered":
        catalog_services.service_deregister(service=service, actor=service.seller)
    elif how == "seller deactivated":
        Agent.objects.filter(pk=service.seller_id).update(is_active=False)
    else:
        service.seller.owner.is_active = False
        service.seller.owner.save()


def _answers(api: Api, service_id: str, seller_id: str) -> dict[str, tuple[int, str]]:
    """(status, code) of every endpoint taking a service's (or its seller's) id, for `service_id`."""
    expires_at = (timezone.now() + timezone.timedelta(days=2)).isoformat()
    calls = {
        "proposal": api.post("/usage-agreements", {"service_id": service_id, "quantity": 1,
                                                   "expires_at": expires_at}),
        "direct purchase": api.post("/usage-agreements", {
            "service_id": service_id, "quantity": 1, "settlement_model": "direct_payment",
            "payment_header": "0x" + "00" * 65, "expires_at": expires_at,
            "fee_permit": {"value": 1, "nonce": 0, "deadline": 2**40, "signature": "0x" + "00" * 65}}),
        "proposal by seller": api.post("/usage-agreements", {"seller_agent_id": seller_id, "quantity": 1,
                                                             "expires_at": expires_at}),
        "masumi purchase": api.post("/purchase", {"network": "Preprod", "agentIdentifier": service_id,
                                                  "input_data": {"text": "hi"}}),
        "payment information": api.get("/payment-information", {"agentIdentifier": service_id}),
        "service": api.get(f"/agents/services/{service_id}"),
        "registry deregister": api.delete("/registry/", {"agentIdentifier": service_id, "network": "Preprod"}),
        "skill invocation": api.post(f"/agents/{seller_id}/translate", {"input": {"text": "hi"}}),
    }
    return {name: (response.status_code, error_code(response)) for name, response in calls.items()}


@pytest.mark.parametrize("how", ["deregistered", "seller deactivated", "owner deactivated"])
def test_a_hidden_service_answers_as_one_that_never_existed(escrow_chain, how):
    seller = AgentFactory(is_buyer=False, is_seller=True)
    service = register_service(seller, upstream_protocol="masumi", skills=[
        {"name": "translate", "description": "Translate a text", "price_atomic": 20000}])
    buyer = AgentFactory(is_buyer=True, is_seller=False)
    api = Api(issue_key(buyer))
    never = _answers(api, str(uuid.uuid4()), str(uuid.uuid4()))
    assert {answer[0] for answer in never.values()} == {404}, never
    _hide(service, how)

    hidden = _answers(api, str(service.pk), str(seller.pk))

    assert hidden == never


def test_the_sellers_owner_still_learns_why_its_own_service_cannot_be_bought(escrow_chain):
    seller = AgentFactory(is_buyer=False, is_seller=True)
    service = register_service(seller, skills=[])
    sibling = AgentFactory(is_buyer=True, is_seller=False, owner=seller.owner)
    catalog_services.service_deregister(service=service, actor=seller)

    refused = Api(issue_key(sibling)).post("/usage-agreements", {
        "service_id": str(service.pk), "quantity": 1,
        "expires_at": (timezone.now() + timezone.timedelta(days=2)).isoformat()})

    assert refused.status_code == 400 and error_code(refused) == "service_deregistered", refused.content
