"""Hostile values in every field of the Masumi node's creates (`POST /purchase`, `POST /payment`, `POST /registry`):
each is a 400 with a code, nothing written, and never read as another value than its plain spelling's."""

import uuid

import pytest

from catalog.models import Service
from escrow.models import MasumiPaymentRequest, MasumiPurchase
from tests.conftest import codes_at, error_code
from tests.escrow import test_masumi_node
from tests.escrow.flow import deadline_clock

pytestmark = [pytest.mark.chain, pytest.mark.django_db]

PRICE = test_masumi_node.PRICE


parties = test_masumi_node.parties  # a Masumi seller's service at PRICE


def arabic_indic(text: str) -> str:
    """`text` with its ASCII digits written as Arabic-Indic ones, which int() and uuid.UUID() read alike."""
    return "".join(chr(0x0660 + int(c)) if c.isascii() and c.isdigit() else c for c in text)


def _timer_values(now_ms: int) -> list:
    return [arabic_indic(str(now_ms + 3_600_000)), f"{now_ms + 3_600_000:_}", f" {now_ms + 3_600_000}", "1e30",
            "-1", -1, float(now_ms + 3_600_000), True, 10**40, "10000-01-01T00:00:00Z", "0x10", "\x00",
            "2026-12-07T10:00:00", "a" * 100_000]


def _refused(response, before: tuple[int, int]) -> None:
    assert 400 <= response.status_code < 500, (response.status_code, response.content[:300])
    assert error_code(response), response.content[:300]
    assert (MasumiPurchase.objects.count(), MasumiPaymentRequest.objects.count()) == before


def _each_refused(api, path: str, base: dict, hostile: dict) -> None:
    """POST `base` with each hostile value of each field in turn: every one refused, nothing written."""
    before = (MasumiPurchase.objects.count(), MasumiPaymentRequest.objects.count())
    for field, values in hostile.items():
        for value in values:
            try:
                _refused(api.post(path, {**base, field: value}), before)
            except AssertionError as error:
                raise AssertionError(f"{field}={value!r:.80}: {error}") from None


def test_hostile_purchase_fields_are_400_and_nothing_is_written(parties, escrow_chain):
    now_ms = deadline_clock(escrow_chain) * 1000
    service_id = str(parties.service.pk)
    base = {"network": "Preprod", "agentIdentifier": service_id, "input_data": {"text": "hi"}}
    hostile = {
        "agentIdentifier": [arabic_indic(service_id), int(uuid.UUID(service_id)), service_id + "\x00",
                            "x" * 100_000, service_id[:-1] + "\u0430"],  # a Cyrillic a (ends any id)
        "identifierFromPurchaser": ["a\x00b", "a" * 251, 5],
        "metadata": ["\x00", 5],
        "inputHash": ["A" * 64, "0x" + "a" * 64, "a" * 63, arabic_indic("1" * 64)],
        "Amounts": [[{"amount": arabic_indic(str(PRICE)), "unit": "USDC"}], [{"amount": f"{PRICE:_}", "unit": ""}],
                    [{"amount": "5e6", "unit": ""}], [{"amount": -PRICE, "unit": ""}],
                    [{"amount": float(PRICE), "unit": ""}], [{"amount": str(2**300), "unit": ""}]],
        "smartContractAddress": [parties.chain.addresses["escrow"] + "00"],
        **{timer: _timer_values(now_ms) for timer in ("payByTime", "submitResultTime", "unlockTime",
                                                      "externalDisputeUnlockTime")},
    }
    _each_refused(parties.buyer_api, "/purchase", base, hostile)


def test_hostile_payment_request_fields_are_400_and_nothing_is_written(parties, escrow_chain):
    now_ms = deadline_clock(escrow_chain) * 1000
    service_id = str(parties.service.pk)
    base = {"network": "Preprod", "agentIdentifier": service_id, "identifierFromPurchaser": "order-9",
            "inputHash": "a" * 64}
    hostile = {
        "agentIdentifier": [arabic_indic(service_id), int(uuid.UUID(service_id))],
        "RequestedFunds": [[{"amount": arabic_indic(str(PRICE)), "unit": "USDC"}],
                           [{"amount": f" {PRICE}", "unit": "USDC"}]],
        **{timer: _timer_values(now_ms) for timer in ("payByTime", "submitResultTime")},
    }
    _each_refused(parties.seller_api, "/payment", base, hostile)


def test_hostile_blockchain_identifiers_and_wallets_are_400(parties):
    identifier = "0x" + "ab" * 32
    for value in ["0X" + "ab" * 32, "0x" + "ab" * 31 + "a", arabic_indic("0x" + "12" * 32), identifier + "\n",
                  identifier + "00", 5]:
        for path, body in [("/purchase/request-refund", {}), ("/purchase/cancel-refund-request", {})]:
            response = parties.buyer_api.post(path, {"network": "Preprod", "blockchainIdentifier": value, **body})
            # 404 purchase_not_found for a spelling of a well-formed id (trimmed): no purchase has it
            assert response.status_code in (400, 404) and error_code(response), (path, value, response.content[:300])
    for wallet in [parties.seller_account.address + "00", parties.seller_account.address[:-1],
                   "0X" + parties.seller_account.address[2:], arabic_indic(parties.seller_account.address)]:
        response = parties.buyer_api.get("/registry/", {"network": "Preprod", "walletVKey": wallet})
        assert response.status_code == 400 and error_code(response), (wallet, response.content[:300])
    assert Service.objects.count() == 1


@pytest.mark.parametrize("identifier", ["order-\u202e71", "order\u200b-9", "order\x1b[2J-9"])
def test_an_identifier_from_purchaser_shown_to_the_other_party_is_refused_with_invisible_characters(
        parties, identifier):
    """identifierFromPurchaser is the buyer's order reference, shown to the seller (its payments, its /start_job) and
    the seller's to the buyer: with a bidi override or a zero-width space it reads as another order, as a seller's
    name would (marketplace.shown_text). Refused on both sides, 400 `unsafe_characters`, nothing written."""
    before = (MasumiPurchase.objects.count(), MasumiPaymentRequest.objects.count())
    for api, path, body in [
            (parties.buyer_api, "/purchase", {"input_data": {"text": "hi"}}),
            (parties.seller_api, "/payment", {})]:
        refused = api.post(path, {"network": "Preprod", "agentIdentifier": str(parties.service.pk),
                                  "identifierFromPurchaser": identifier, **body})
        assert refused.status_code == 400 and error_code(refused) == "unsafe_characters", (path, refused.content)
        assert refused.json()["error"]["details"]["fields"] == ["identifierFromPurchaser"], refused.content
    assert (MasumiPurchase.objects.count(), MasumiPaymentRequest.objects.count()) == before


def test_a_query_parameter_given_twice_is_400_not_read_as_its_last_value(parties):
    """A query string's parameter given twice was read as its last value (`network=Mainnet&network=Preprod` answered
    for Preprod, `limit=0&limit=1` listed; the Pægents SDK's `status` filter alike): what a proxy or a log reads of the request (its first) was not what was
    answered, as with a JSON key given twice (400 `duplicate_key`). Refused alike, naming the parameter."""
    seller = parties.seller_account.address
    for api, path, query, name in [
            (parties.buyer_api, "/purchase", "network=Mainnet&network=Preprod", "network"),
            (parties.seller_api, "/payment", "network=Preprod&limit=0&limit=1", "limit"),
            (parties.buyer_api, "/registry", f"network=Preprod&walletVKey=0x{'1' * 40}&walletVKey={seller}",
             "walletVKey"),
            (parties.buyer_api, "/payment-information",
             f"agentIdentifier={uuid.uuid4()}&agentIdentifier={parties.service.pk}", "agentIdentifier"),
            (parties.buyer_api, "/usage-agreements", "status=active&status=proposed", "status")]:  # the Pægents SDK's
        response = api.client.get(f"{path}?{query}")
        assert codes_at(response, name) == {"duplicate_key"}, (path, response.content[:300])
    listed = parties.buyer_api.client.get("/purchase?network=Preprod&includeHistory=true&limit=1")
    assert listed.status_code == 200, listed.content
