"""Shared input fields, through the endpoints that use them: integers are JSON integers, addresses are accounts."""

import pytest

from agreements.models import UsageAgreement
from catalog.models import Service
from tests.agreements.helpers import proposal
from tests.catalog.factories import register_service, service_data
from tests.conftest import codes_at

pytestmark = pytest.mark.django_db


@pytest.mark.parametrize("quantity", ["1", 1000.0, 1.5, True, "1e3", None])
def test_a_quantity_is_a_json_integer(buyer_api, seller, quantity):
    service = register_service(seller)

    response = buyer_api.post("/usage-agreements", proposal(service, quantity=quantity))

    assert codes_at(response, "quantity") <= {"invalid", "null"} and codes_at(response, "quantity")
    assert not UsageAgreement.objects.exists()


@pytest.mark.parametrize("price", ["10", 10.0, False])
def test_a_token_amount_is_a_json_integer(seller_api, price):
    pricing = {"type": "per_call", "unit_name": "call", "unit_price_atomic": price, "token": "USDC"}

    response = seller_api.post("/agents/services", service_data(pricing=pricing))

    assert codes_at(response, "pricing", "unit_price_atomic") == {"invalid"}
    assert not Service.objects.exists()


@pytest.mark.parametrize("address", ["0x" + "0" * 40, "0X" + "0" * 40])
def test_the_zero_address_is_not_a_wallet(buyer_api, seller, address):
    service = register_service(seller)

    response = buyer_api.post("/usage-agreements", proposal(service, buyer_wallet_address=address))

    assert codes_at(response, "buyer_wallet_address") <= {"zero_address", "invalid_address"}
    assert not UsageAgreement.objects.exists()


def test_query_strings_still_take_digits(buyer_api):
    assert buyer_api.get("/usage-agreements", {"limit": "5"}).status_code == 200
    for limit in ("5.0", " 5", "５"):
        assert codes_at(buyer_api.get("/usage-agreements", {"limit": limit}), "limit") == {"invalid"}


NOT_TEXT = [5, 1.5, True, {"a": "b"}, ["x"]]


@pytest.mark.parametrize("value", NOT_TEXT)
@pytest.mark.parametrize("field", ["name", "description"])
def test_a_services_text_is_a_json_string(seller_api, field, value):
    response = seller_api.post("/agents/services", service_data(**{field: value}))

    assert response.status_code == 400 and codes_at(response, field) == {"invalid"}, response.content
    assert not Service.objects.exists()


@pytest.mark.parametrize("value", NOT_TEXT)
def test_text_nested_in_a_service_or_in_a_list_is_a_json_string(seller_api, value):
    for body, path in ((service_data(tags=["translation", value]), ("tags",)),
                       (service_data(capability={"name": value, "version": "1.0.0"}), ("capability", "name")),
                       (service_data(pricing={"type": "per_call", "unit_name": value, "unit_price_atomic": 20000,
                                              "token": "USDC"}), ("pricing", "unit_name"))):
        response = seller_api.post("/agents/services", body)

        assert response.status_code == 400 and codes_at(response, *path) == {"invalid"}, (path, response.content)
    assert not Service.objects.exists()


@pytest.mark.parametrize("value", NOT_TEXT)
def test_a_proposals_note_is_a_json_string(buyer_api, seller, value):
    service = register_service(seller)

    response = buyer_api.post("/usage-agreements", proposal(service, note=value))

    assert response.status_code == 400 and codes_at(response, "note") == {"invalid"}, response.content
    assert not UsageAgreement.objects.exists()


@pytest.mark.parametrize("value", NOT_TEXT)
def test_an_agents_and_a_keys_names_are_json_strings(owner_api, buyer, value):
    agent = owner_api.post("/agents", {"handle": "new-agent", "display_name": value,
                                       "wallet_address": "0x70997970C51812dc3A010C7d01b50e0d17dc79C8",
                                       "roles": ["buyer"]})
    assert agent.status_code == 400 and codes_at(agent, "display_name") == {"invalid"}, agent.content

    key = owner_api.post(f"/agents/{buyer.id}/api-keys", {"name": value})
    assert key.status_code == 400 and codes_at(key, "name") == {"invalid"}, key.content


@pytest.mark.parametrize("padding", ["\n", " ", "\t"], ids=["newline", "space", "tab"])
def test_an_address_with_whitespace_after_it_is_refused_not_trimmed(buyer_api, seller, buyer, padding):
    """An address is 0x and 40 hex digits, nothing after them: a trailing newline passed the pattern (`$` matches
    before one) or was trimmed away, and the request went on with an address it did not send."""
    service = register_service(seller)

    response = buyer_api.post("/usage-agreements", proposal(service, buyer_wallet_address=buyer.wallet_address
                                                            + padding))

    assert response.status_code == 400, response.content
    assert codes_at(response, "buyer_wallet_address") == {"invalid_address"}
    assert not UsageAgreement.objects.exists()


def test_is_address_refuses_a_trailing_newline():
    from marketplace.fields import is_address
    assert is_address("0x" + "ab" * 20) and not is_address("0x" + "ab" * 20 + "\n")


@pytest.mark.parametrize("request_id", ["call-44\n", "call-44\r\n"], ids=["newline", "crlf"])
def test_a_request_id_with_a_line_break_after_it_is_replaced_not_echoed(buyer_api, request_id):
    """`$` matches before a trailing newline: the caller's id passed as well-formed and was echoed as a response
    header, which Django refuses to write (BadHeaderError: a 500)."""
    response = buyer_api.get("/usage-agreements", headers={"X-Request-Id": request_id})

    assert response.status_code == 200
    assert response["X-Request-Id"].startswith("req_")
