"""The published Masumi clients, unmodified, against the live test server: PyPI `masumi` 1.2.0 (the buyer's
`Purchase`, the seller's `Payment`, and its own seller server `create_masumi_app`) and `masumi-crewai` 0.1.26 (the
registry `Agent`), run from their own virtual environment (masumi_env.py). The chain is the test Anvil; the
relayer's confirmations run in a background thread, as beat would run them.

What they cannot do unchanged (the buyer signs its EVM escrow, which no Masumi client knows how to do) goes
through the marketplace's own addition: `POST /purchase/lock-funds` with the signed package.
"""

import json
import time

import httpx
import pytest

from escrow import purchases, settlement
from escrow.models import MasumiPurchase
from sdk.typed_data import sign_typed_data
from tests.catalog.factories import AgentFactory, issue_key
from tests.compat.masumi_env import MasumiSeller, call, masumi_python
from tests.conftest import Api
from tests.escrow.flow import USDC, Parties, pay_fees, usdc_balance
from tests.sdk.test_client import relayer_polling

pytestmark = [pytest.mark.slow, pytest.mark.chain, pytest.mark.django_db(transaction=True)]

PRICE = 5 * USDC
FEE = 103_000  # max(ceil(5 USDC × 2%) + 0.003, 0.10) USDC
INPUT = {"text": "the quarterly report", "language": "en"}


def result_for(input_data) -> str:
    """What masumi_seller_app.py's job answers."""
    return f"summary of {json.dumps(input_data, sort_keys=True)}"


@pytest.fixture(scope="session")
def masumi():
    return masumi_python()


def eventually(read, until, *, seconds: float = 60.0):
    """Poll `read()` until `until(value)`; the seller's library checks its payments every 10 s."""
    deadline = time.monotonic() + seconds
    while True:
        value = read()
        if until(value):
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"not reached in {seconds} s; last: {value}")
        time.sleep(0.5)


@pytest.fixture
def stock_seller(masumi, live_server, escrow_chain):
    """A masumi service whose seller runs the masumi library's server, with this marketplace as its node."""
    parties = Parties(escrow_chain, upstream_base_url="http://127.0.0.1:9", upstream_protocol="masumi",
                      masumi_protocol_version="2", skills=[],
                      pricing={"type": "per_call", "unit_name": "job", "unit_price_atomic": PRICE, "token": "USDC"})
    parties.seller_key, parties.buyer_key, parties.node = issue_key(parties.seller), parties.buyer_api.secret, \
        live_server.url
    parties.seller_server = MasumiSeller(masumi, node_url=live_server.url, api_key=parties.seller_key,
                                         agent_identifier=str(parties.service.pk),
                                         seller_wallet=parties.seller_account.address).start()
    try:
        moved = parties.seller_api.patch(f"/agents/services/{parties.service.pk}",
                                         {"upstream_base_url": parties.seller_server.url})
        assert moved.status_code == 200, moved.content
        yield parties
    finally:
        parties.seller_server.stop()


def balances(parties) -> dict:
    chain = parties.chain
    return {"buyer": usdc_balance(chain, parties.buyer_account.address),
            "seller": usdc_balance(chain, parties.seller_account.address),
            "escrow": usdc_balance(chain, chain.addresses["escrow"])}


def node_purchase(masumi, parties, purchase_id: str) -> dict:
    """GET /purchase/{id}, through the masumi library's own call for it."""
    answer = call(masumi, "purchase_status", node=parties.node, key=parties.buyer_key,
                  agent_identifier=str(parties.service.pk), purchase_id=purchase_id)
    assert answer["status"] == "success"
    return answer["data"]


def watched_purchase(parties, purchase_id: str) -> dict:
    """The same GET, made directly: polled often, where a process per call would be slow."""
    answer = httpx.get(f"{parties.node}/purchase/{purchase_id}", headers={"token": parties.buyer_key}, timeout=30)
    assert answer.status_code == 200, answer.text
    return answer.json()["data"]


def lock_funds(parties, created: dict) -> None:
    """The marketplace's addition: the buyer signs its escrow (and, for later, its refund request)."""
    signed = parties.signed_purchase(created)
    refund = sign_typed_data(parties.buyer_account.key, created["refundRequestTypedData"])
    locked = httpx.post(f"{parties.node}/purchase/lock-funds/", headers={"token": parties.buyer_key}, timeout=30,
                        json={"network": "Preprod", "blockchainIdentifier": created["blockchainIdentifier"],
                              "refundSignature": refund, **signed})
    assert locked.status_code == 202, locked.text


def test_masumi_purchase_flow_lock_result_refund_request(masumi, stock_seller):
    parties = stock_seller
    before = balances(parties)
    # The buyer starts the job on the seller (MIP-003); the seller's server asks this node for a payment.
    started = httpx.post(f"{parties.seller_server.url}/start_job", timeout=30,
                         json={"identifier_from_purchaser": "buyer-order-1", "input_data": INPUT})
    assert started.status_code == 200, started.text
    job = started.json()
    assert job["input_hash"] == call(masumi, "input_hash", input_data=INPUT, identifier="buyer-order-1")

    bought = {"node": parties.node, "key": parties.buyer_key, "purchase": {
        "blockchain_identifier": job["blockchainIdentifier"], "seller_vkey": job["sellerVKey"],
        "agent_identifier": job["agentIdentifier"], "pay_by_time": job["payByTime"],
        "submit_result_time": job["submitResultTime"], "unlock_time": job["unlockTime"],
        "external_dispute_unlock_time": job["externalDisputeUnlockTime"],
        "identifier_from_purchaser": "buyer-order-1", "input_data": INPUT}}
    created = call(masumi, "purchase_create", **bought)["data"]  # POST /purchase/ -> 200
    assert created["blockchainIdentifier"] == job["blockchainIdentifier"]
    assert created["inputHash"] == job["input_hash"] and created["onChainState"] is None

    with relayer_polling():
        lock_funds(parties, created)
        # The seller's library sees FundsLocked, runs the job and submits the MIP-004 result hash.
        status = eventually(lambda: httpx.get(f"{parties.seller_server.url}/status",
                                              params={"job_id": job["id"]}).json(),
                            lambda s: s["status"] == "completed")
        assert status["result"] == result_for(INPUT)
        submitted = eventually(lambda: watched_purchase(parties, job["blockchainIdentifier"]),
                               lambda p: p["onChainState"] == "ResultSubmitted"
                               and p["CurrentTransaction"]["status"] == "confirmed")
        assert submitted["resultHash"] == call(masumi, "output_hash", output=result_for(INPUT),
                                               identifier="buyer-order-1")
        assert node_purchase(masumi, parties, submitted["id"])["id"] == submitted["id"]  # by id as well

        # POST /purchase/request-refund (no signature: the one given at lock-funds is used).
        refund = call(masumi, "purchase_request_refund", **bought)["data"]
        assert refund["onChainState"] == "RefundRequested"
        eventually(lambda: watched_purchase(parties, job["blockchainIdentifier"]),
                   lambda p: p["onChainState"] == "Disputed")
        authorized = call(masumi, "payment_authorize_refund", node=parties.node, key=parties.seller_key,
                          agent_identifier=job["agentIdentifier"], blockchain_identifier=job["blockchainIdentifier"])
        assert authorized["data"]["onChainState"] == "Disputed"
        eventually(lambda: watched_purchase(parties, job["blockchainIdentifier"]),
                   lambda p: p["onChainState"] == "DisputedWithdrawn")
    pay_fees(parties.chain)  # the fee accrued in the escrow goes to the fee recipient
    after = balances(parties)
    assert after["seller"] == before["seller"] and after["escrow"] == before["escrow"] == 0
    assert after["buyer"] == before["buyer"] - FEE


def test_a_stock_masumi_sellers_job_is_bought_and_paid(masumi, stock_seller):
    parties = stock_seller
    chain = parties.chain
    before = balances(parties)
    created = parties.buyer_api.post("/purchase/", {"network": "Preprod", "agentIdentifier": str(parties.service.pk),
                                                   "input_data": INPUT, "identifierFromPurchaser": "order-2"})
    assert created.status_code == 200, created.content
    created = created.json()["data"]
    assert created["inputHash"] == call(masumi, "input_hash", input_data=INPUT, identifier="order-2")
    with relayer_polling():
        lock_funds(parties, created)
        eventually(lambda: watched_purchase(parties, created["blockchainIdentifier"]),
                   lambda p: p["onChainState"] == "FundsLocked")
        # MIP-003 v2 start_job; the seller's server asks this node for the payment: it is this funded purchase.
        assert purchases.purchases_jobs_tick()["started"] == 1
        started = node_purchase(masumi, parties, created["blockchainIdentifier"])
        assert started["paymentId"] == created["blockchainIdentifier"] and started["jobId"]
        # Asked before it answered: a start whose answer is lost is not made again (escrow.purchases).
        assert MasumiPurchase.objects.get(pk=created["id"]).job_start_acknowledged_at is not None

        def polled():
            purchases.purchases_jobs_tick()
            return watched_purchase(parties, created["blockchainIdentifier"])

        done = eventually(polled, lambda p: p["result"] and p["CurrentTransaction"]["status"] == "confirmed")
    assert done["onChainState"] == "ResultSubmitted" and done["result"] == result_for(INPUT)
    assert done["resultHash"] == call(masumi, "output_hash", output=result_for(INPUT), identifier="order-2")

    escrow = parties.buyer_api.get(f"/usage-agreements/{created['agreementId']}/escrow-status",
                                   {"verify": "true"}).json()
    chain.increase_time(int(escrow["onchain"]["challengeDeadline"]) - chain.now())
    with relayer_polling():
        assert settlement.settlement_tick()["finalizing"] == 1
        eventually(lambda: watched_purchase(parties, created["blockchainIdentifier"]),
                   lambda p: p["onChainState"] == "Withdrawn")
    after = balances(parties)
    assert after["seller"] - before["seller"] == PRICE
    assert after["buyer"] - before["buyer"] == -PRICE - FEE


def test_masumi_crewai_registers_and_finds_its_agent(masumi, live_server):
    seller = AgentFactory(is_buyer=False, is_seller=True)
    registration = {"node": live_server.url, "key": issue_key(seller), "agent": {
        "name": "Report summarizer", "description": "Summarizes reports",
        "example_output": [{"name": "sample", "url": "https://example.com/s.json", "mimeType": "application/json"}],
        "tags": ["summaries"], "api_base_url": "https://summarizer.example.com", "author_name": "Ada",
        "author_contact": "ada@example.com", "author_organization": "Example",
        "legal_privacy_policy": "https://example.com/p", "legal_terms": "https://example.com/t",
        "legal_other": "https://example.com/o", "capability_name": "summarize", "capability_version": "1.0.0",
        "requests_per_hour": "100", "pricing_unit": "", "pricing_quantity": "2500000"}}
    registered = call(masumi, "registry_register", **registration)  # GET /payment-source/, POST /registry/
    assert registered["status"] == "success" and registered["data"]["state"] == "RegistrationConfirmed"
    assert registered["data"]["Author"]["contactOther"] == "ada@example.com"
    info = Api(issue_key(AgentFactory())).get("/payment-information", {"agentIdentifier": registered["data"]["id"]})
    assert info.json()["data"]["masumiProtocolVersion"] == "2"  # a masumi-library agent: the library's MIP-003
    listed = call(masumi, "registry_check", wallet=seller.wallet_address, **registration)  # GET /registry/
    assert [a["name"] for a in listed["data"]["Assets"]] == ["Report summarizer"]
    assert listed["data"]["Assets"][0]["AgentPricing"]["Pricing"] == [{"unit": "USDC", "amount": "2500000"}]
