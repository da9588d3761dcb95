"""Direct stablecoin purchases (x402 payment + EIP-2612 fee permit), end to end on Anvil through the relayer."""

import base64
import json
import threading
import time
from datetime import timedelta

import pytest
from django.contrib.auth import get_user_model
from django.db import connections
from django.utils import timezone
from web3 import Web3
from x402.http import decode_payment_signature_header

from agreements import services as agreement_services
from agreements import tasks as agreement_tasks
from agreements.models import AgreementEvent, UsageAgreement, WebhookDelivery, WebhookSubscription
from escrow import chain as gateway
from escrow import relayer
from escrow import selectors as escrow_selectors
from escrow.models import ChainTransaction, RelayRevert, TxAttempt
from sdk import typed_data
from sdk.x402_signing import build_direct_stablecoin_agreement, sign_payment_required
from tests.chain_fixtures import TOKEN_NAMES
from policies.models import ApprovalRequest
from tests.catalog.factories import AgentFactory, issue_key, issue_owner_token
from tests.conftest import Api, error_code
from tests.support.operators import staff_account
from tests.support.rpc_relay import node_relayed
from tests.marketplace.conftest import scrape
from tests.support.server_clock import SERVER_CLOCK_DRIFT, server_clock_drifted
from tests.escrow.flow import (USDC, Parties, confirm_all, fund, mined_what_was_sent, network_of, poll_mined,
                               usdc_balance)

pytestmark = [pytest.mark.chain, pytest.mark.django_db]

QUANTITY = 500  # × 0.02 USDC = 10 USDC
AMOUNT = 10 * USDC
FEE = 203_000  # ceil(10 USDC × 2%) + 0.003 USDC = 0.203 USDC, above the 0.10 minimum


class Purchase:
    def __init__(self, chain):
        self.chain = chain
        self.parties = Parties(chain, buyer_funds=20 * USDC)
        self.buyer = self.parties.buyer_account
        self.fee_recipient = chain.accounts.fee_recipient.address
        self.treasury = chain.accounts.deployer.address

    def body(self, **overrides) -> dict:
        requirements = self.parties.buyer_api.get("/payment-requirements", {"amount_atomic": AMOUNT}).json()
        arguments = dict(
            service_id=str(self.parties.service.pk), quantity=QUANTITY, unit_price_atomic=20_000,
            seller_wallet_address=self.parties.seller_account.address, payment_requirements=requirements,
            wallet=self.buyer.key, permit_nonce=self.chain.usdc.functions.nonces(self.buyer.address).call(),
            network=network_of(self.chain), token_domain=network_of(self.chain).token_domain, now=self.chain.now())
        arguments.update(overrides)
        return build_direct_stablecoin_agreement(**arguments)

    def propose(self, body: dict | None = None) -> dict:
        response = self.parties.buyer_api.post("/usage-agreements", body or self.body())
        assert response.status_code == 201, response.content
        return response.json()

    def accept(self, agreement_id: str, capture) -> dict:
        with capture(execute=True):
            response = self.parties.seller_api.put(f"/usage-agreements/{agreement_id}/accept")
        assert response.status_code == 200, response.content
        return response.json()

    def balances(self) -> tuple[int, int, int, int]:
        return tuple(usdc_balance(self.chain, a) for a in (
            self.buyer.address, self.parties.seller_account.address, self.fee_recipient, self.treasury))

    def cancel_authorization(self, body: dict) -> None:
        nonce = decode_payment_signature_header(body["payment_header"]).payload["authorization"]["nonce"]
        typed = typed_data.cancel_authorization(chain_id=self.chain.chain_id, token_address=self.chain.usdc.address,
                                                authorizer=self.buyer.address, nonce=nonce)
        signature = typed_data.sign_typed_data(self.buyer.key, typed)
        self.chain.usdc.functions.cancelAuthorization(self.buyer.address, bytes.fromhex(nonce[2:]),
                                                      bytes.fromhex(signature[2:])).transact(
            {"from": self.chain.accounts.stranger.address})
        mined_what_was_sent()  # before what follows reads the chain (Anvil answers a send before it mines it)


@pytest.fixture
def purchase(escrow_chain):
    return Purchase(escrow_chain)


@pytest.mark.parametrize("chain", TOKEN_NAMES, indirect=True)  # "USDC": Base Sepolia's name
def test_direct_purchase_collects_the_fee_then_pays_the_seller(purchase, django_capture_on_commit_callbacks):
    agreement = purchase.propose()
    assert agreement["status"] == "proposed" and agreement["settlement_model"] == "direct_payment"
    assert agreement["deposit_amount_atomic"] == AMOUNT and agreement["infra_fee_atomic"] == FEE
    buyer, seller, fee_recipient, treasury = purchase.balances()

    accepted = purchase.accept(agreement["id"], django_capture_on_commit_callbacks)
    assert accepted["status"] == "paying"
    for _ in range(3):  # fee permit, fee transfer, x402 payment: each queued when the previous one confirms
        confirm_all(django_capture_on_commit_callbacks)

    paid = purchase.parties.agreement(agreement["id"])
    assert paid["status"] == "paid"
    assert purchase.balances() == (buyer - AMOUNT - FEE, seller + AMOUNT, fee_recipient + FEE, treasury)
    txs = {tx.purpose: tx for tx in ChainTransaction.objects.filter(agreement_id=agreement["id"])}
    assert sorted(txs) == ["direct_fee", "direct_fee_permit", "direct_payment"]
    assert all(tx.status == "confirmed" for tx in txs.values())
    assert paid["fee_tx_hash"] == txs["direct_fee"].mined_tx_hash
    assert paid["payment_tx_hash"] == txs["direct_payment"].mined_tx_hash
    assert list(AgreementEvent.objects.filter(agreement_id=agreement["id"]).values_list("to_status", flat=True)) == [
        "proposed", "accepted", "paying", "paid"]


def failed_at_accept(purchase, agreement_id, capture, *, reason: str, balances) -> None:
    """The seller's accept fails the purchase for `reason` with nothing sent and nothing moved."""
    failed = purchase.accept(agreement_id, capture)
    assert failed["status"] == "payment_failed"
    assert reason in failed["status_reason"]
    assert not ChainTransaction.objects.filter(agreement_id=agreement_id).exists()
    assert purchase.balances() == balances


def test_a_payment_that_cannot_run_fails_at_accept_with_the_fee_never_taken(
        purchase, django_capture_on_commit_callbacks):
    body = purchase.body()
    agreement = purchase.propose(body)
    purchase.cancel_authorization(body)  # the buyer withdraws the x402 authorization before the seller accepts
    before = purchase.balances()

    failed_at_accept(purchase, agreement["id"], django_capture_on_commit_callbacks, reason="authorization_already_used",
                     balances=before)


def test_a_payment_failing_after_the_fee_was_taken_gets_the_fee_refunded(
        purchase, django_capture_on_commit_callbacks):
    fund(purchase.chain, purchase.treasury, USDC)  # the platform treasury's float for refunds
    body = purchase.body()
    agreement = purchase.propose(body)
    buyer, seller, fee_recipient, treasury = purchase.balances()
    purchase.accept(agreement["id"], django_capture_on_commit_callbacks)
    confirm_all(django_capture_on_commit_callbacks)  # permit confirmed; the fee transfer is sent
    purchase.cancel_authorization(body)  # ... and the buyer cancels the payment before it runs

    for _ in range(2):  # fee confirmed -> the payment reverts in simulation -> the treasury refunds the fee
        confirm_all(django_capture_on_commit_callbacks)

    failed = purchase.parties.agreement(agreement["id"])
    assert failed["status"] == "payment_failed"
    assert failed["buyer_refund_atomic"] == FEE
    assert purchase.balances() == (buyer, seller, fee_recipient + FEE, treasury - FEE)
    assert ChainTransaction.objects.get(agreement_id=agreement["id"], purpose="direct_payment").status == "failed"


def test_a_buyer_whose_direct_payment_it_made_revert_at_the_relayers_gas_buys_no_more_until_its_budget_is_back(
        purchase, settings, monkeypatch, django_capture_on_commit_callbacks):
    """The buyer cancels its authorization between the relayer's simulation of the payment and its mining: the
    payment reverts at the relayer's gas, and the treasury refunds the fee at its gas too; the buyer then proposes
    again. With RELAY_REVERTS_PER_PARTY (here 1) such reverts within the window, its next purchase fails at the
    seller's accept (payment_failed: relay_budget_exhausted) with nothing sent and nothing charged."""
    capture = django_capture_on_commit_callbacks
    settings.RELAY_REVERTS_PER_PARTY = 1
    fund(purchase.chain, purchase.treasury, USDC)  # the platform treasury's float for refunds
    body = purchase.body()
    agreement = purchase.propose(body)
    purchase.accept(agreement["id"], capture)
    confirm_all(capture)  # the permit confirmed; the fee transfer is sent
    estimate = gateway.simulate

    def estimate_then_cancel(**transaction):
        gas = estimate(**transaction)
        monkeypatch.setattr(gateway, "simulate", estimate)
        purchase.cancel_authorization(body)
        return gas

    monkeypatch.setattr(gateway, "simulate", estimate_then_cancel)
    for _ in range(3):  # the fee confirmed -> the payment estimated, cancelled, mined reverted -> the fee refunded
        confirm_all(capture)
    assert purchase.parties.agreement(agreement["id"])["status"] == "payment_failed"
    assert ChainTransaction.objects.get(agreement_id=agreement["id"], purpose="direct_payment").receipt_status == 0
    before = purchase.balances()

    failed_at_accept(purchase, purchase.propose()["id"], capture, reason="relay_budget_exhausted", balances=before)


def test_a_buyer_that_cancels_its_payment_once_the_fee_is_taken_buys_no_more_until_its_budget_is_back(
        purchase, settings, django_capture_on_commit_callbacks):
    """The buyer cancels its authorization once the fee is taken, before the relayer sends the payment: the payment
    fails at the relayer's simulation, nothing mined, but the fee permit and the fee's collection were at the relayer's
    gas and the treasury refunds the fee at its gas too. Not counted against the buyer (only a revert mined was), it
    could do so again and again at no cost of its own, with no timing to get right."""
    capture = django_capture_on_commit_callbacks
    settings.RELAY_REVERTS_PER_PARTY = 1
    fund(purchase.chain, purchase.treasury, USDC)  # the platform treasury's float for refunds
    body = purchase.body()
    agreement = purchase.propose(body)
    purchase.accept(agreement["id"], capture)
    confirm_all(capture)  # the permit confirmed; the fee transfer is sent
    purchase.cancel_authorization(body)
    for _ in range(2):  # the fee confirmed -> the payment refused at its simulation -> the fee refunded
        confirm_all(capture)
    failed = purchase.parties.agreement(agreement["id"])
    assert failed["status"] == "payment_failed" and failed["buyer_refund_atomic"] == FEE
    before = purchase.balances()

    failed_at_accept(purchase, purchase.propose()["id"], capture, reason="relay_budget_exhausted", balances=before)


def test_an_operators_retry_of_a_payment_the_buyer_cancelled_is_not_charged_to_the_buyer_again(
        purchase, django_capture_on_commit_callbacks):
    """The refusal of the payment the buyer cancelled once the fee was taken is its revert, once: an operator's retry,
    refused at the simulation again, ran no step at the relayer's gas for it."""
    capture = django_capture_on_commit_callbacks
    fund(purchase.chain, purchase.treasury, USDC)
    body = purchase.body()
    agreement = purchase.propose(body)
    purchase.accept(agreement["id"], capture)
    confirm_all(capture)
    purchase.cancel_authorization(body)
    for _ in range(2):
        confirm_all(capture)
    failed = ChainTransaction.objects.get(agreement_id=agreement["id"], purpose="direct_payment")
    assert RelayRevert.objects.filter(transaction=failed).exists()
    with capture(execute=True):
        retry = relayer.transaction_retry(tx=failed, operator=get_user_model().objects.get(username=staff_account()))
    confirm_all(capture)
    retry.refresh_from_db()
    assert retry.status == "failed" and retry.nonce is None
    assert RelayRevert.objects.count() == 1


def test_a_payment_whose_authorization_ran_out_before_the_relayer_sent_it_is_not_charged_to_the_buyer(
        purchase, django_capture_on_commit_callbacks):
    """The relayer got to the payment only after its authorization's validBefore (the node down, a queue behind):
    refused at the simulation for the relayer's delay, not the buyer's doing, so no revert is counted against it."""
    capture = django_capture_on_commit_callbacks
    fund(purchase.chain, purchase.treasury, USDC)
    body = purchase.body()
    agreement = purchase.propose(body)
    purchase.accept(agreement["id"], capture)
    confirm_all(capture)  # the permit confirmed; the fee transfer is sent
    valid_before = int(decode_payment_signature_header(body["payment_header"]).payload["authorization"]["validBefore"])
    purchase.chain.increase_time(valid_before - purchase.chain.now() + 1)
    for _ in range(2):  # the fee confirmed -> the payment refused at its simulation -> the fee refunded
        confirm_all(capture)
    payment = ChainTransaction.objects.get(agreement_id=agreement["id"], purpose="direct_payment")
    assert payment.status == "failed" and payment.nonce is None
    assert not RelayRevert.objects.filter(transaction=payment).exists()


@pytest.mark.parametrize("max_lead", [None, 30], ids=["clock_unbounded", "clock_bounded"])
def test_a_payment_refused_while_the_node_answers_a_pending_block_past_its_authorization_is_not_charged_to_the_buyer(
        purchase, settings, django_capture_on_commit_callbacks, max_lead):
    """Whether a payment refused at the relayer's simulation is the buyer's revert reads the node's pending block's
    time uncapped (unlike a refusal of a caller's request, `chain_clock.next_block_clock_for_refusal`): the node's
    estimate runs in its pending block, so one whose pending time is past validBefore refuses the payment as expired
    by its own clock, the buyer's doing or not. In doubt the refusal is not counted against the buyer's relay budget:
    a misbehaving node costs the relayer one purchase's gas, while a charge would refuse an honest buyer's purchases.
    Nor bounded by CHAIN_CLOCK_MAX_LEAD_SECONDS (on off the dev chain), which would read that time as now + the lead."""
    settings.CHAIN_CLOCK_MAX_LEAD_SECONDS = max_lead

    capture = django_capture_on_commit_callbacks
    fund(purchase.chain, purchase.treasury, USDC)
    body = purchase.body()
    agreement = purchase.propose(body)
    purchase.accept(agreement["id"], capture)
    confirm_all(capture)  # the permit confirmed; the fee transfer is sent
    purchase.cancel_authorization(body)  # the payment is refused at its simulation
    valid_before = int(decode_payment_signature_header(body["payment_header"]).payload["authorization"]["validBefore"])
    with node_relayed(purchase.chain.node.rpc_url, settings) as relay:
        relay.rewrite(lambda call: call.get("method") == "eth_getBlockByNumber" and call["params"][0] == "pending",
                      lambda answer: {**answer, "result": {**answer["result"], "timestamp": hex(valid_before + 60)}})
        for _ in range(2):  # the fee confirmed -> the payment refused at its simulation -> the fee refunded
            confirm_all(capture)
    payment = ChainTransaction.objects.get(agreement_id=agreement["id"], purpose="direct_payment")
    assert payment.status == "failed" and payment.nonce is None
    assert not RelayRevert.objects.filter(transaction=payment).exists()


@pytest.mark.parametrize("change, status, code", [
    (lambda p: p.body(seller_wallet_address=p.chain.accounts.stranger.address), 400, "wrong_recipient"),
    (lambda p: {**p.body(), "quantity": QUANTITY + 1}, 400, "wrong_amount"),
    (lambda p: p.body(validity_seconds=60), 400, "authorization_expired"),
    (lambda p: {**p.body(wallet=p.chain.accounts.stranger.key), "buyer_wallet_address": p.buyer.address},
     400, "wrong_payer"),
    (lambda p: {**p.body(), "fee_permit": {**p.body()["fee_permit"], "value": FEE - 1}}, 400,
     "permit_value_too_low"),
    (lambda p: {**p.body(), "fee_permit": {**p.body()["fee_permit"], "nonce": 7}}, 400, "invalid_signature"),
    (lambda p: {**p.body(), "fee_permit": {**p.body()["fee_permit"], "nonce": 2**256}}, 400, "validation_error"),
    (lambda p: {**p.body(), "fee_permit": {**p.body()["fee_permit"], "deadline": 2**256}}, 400, "validation_error"),
])
def test_bad_direct_payments_are_refused_at_proposal(purchase, change, status, code):
    response = purchase.parties.buyer_api.post("/usage-agreements", change(purchase))

    assert response.status_code == status, response.content
    assert response.json()["error"]["code"] == code


def test_a_replayed_payment_header_is_refused(purchase):
    body = purchase.body()
    purchase.propose(body)

    response = purchase.parties.buyer_api.post("/usage-agreements", body)

    assert response.status_code == 409
    assert response.json()["error"]["code"] == "authorization_already_used"


def test_a_payment_header_replayed_with_its_nonce_spelled_otherwise_is_refused(purchase):
    """Without its 0x the nonce is the same bytes32 on-chain; recorded as another authorization, both purchases were
    counted paid by the one transfer (the second's copy reverts: nonce used) and the seller served twice."""
    body = purchase.body()
    purchase.propose(body)
    payload = json.loads(base64.b64decode(body["payment_header"]))
    authorization = payload["payload"]["authorization"]
    authorization["nonce"] = authorization["nonce"].removeprefix("0x")

    response = purchase.parties.buyer_api.post("/usage-agreements", {
        **body, "payment_header": base64.b64encode(json.dumps(payload).encode()).decode()})

    assert response.status_code == 409, response.content
    assert response.json()["error"]["code"] == "authorization_already_used"


def _signed_valid_until(purchase: Purchase, valid_before: int) -> dict:
    """A proposal's body whose payment authorization the buyer signed valid until `valid_before` (the SDK signs at
    most a day: a client of its own signs what it likes)."""
    body = purchase.body()
    payload = json.loads(base64.b64decode(body["payment_header"]))
    authorization = {**payload["payload"]["authorization"], "validBefore": str(valid_before)}
    typed = typed_data.transfer_with_authorization(
        chain_id=purchase.chain.chain_id, token_address=purchase.chain.usdc.address,
        from_address=authorization["from"], to_address=authorization["to"], value=int(authorization["value"]),
        valid_after=int(authorization["validAfter"]), valid_before=valid_before, nonce=authorization["nonce"],
        token_name=purchase.chain.usdc.functions.name().call())
    payload["payload"] = {"authorization": authorization,
                          "signature": typed_data.sign_typed_data(purchase.buyer.key, typed)}
    return {**body, "payment_header": base64.b64encode(json.dumps(payload).encode()).decode()}


def test_a_payment_valid_beyond_what_the_database_records_is_400_not_500(purchase):
    """validBefore is a uint256 the buyer signs; one past 2^63 - 1 failed the record's insert (500)."""
    response = purchase.parties.buyer_api.post("/usage-agreements", _signed_valid_until(purchase, 2**63))

    assert response.status_code == 400, response.content
    assert response.json()["error"]["code"] == "malformed_payment"


def test_a_payment_signature_spelled_with_whitespace_is_recorded_as_its_65_bytes(purchase):
    """bytes.fromhex reads "0xab  cd.." as the signature: it verified, and was recorded as written, padded past the
    record's 2000-character column (a 500)."""
    body = purchase.body()
    payload = json.loads(base64.b64decode(body["payment_header"]))
    signature = payload["payload"]["signature"]
    payload["payload"]["signature"] = "0x" + (" " * 32).join(signature[i:i + 2] for i in range(2, len(signature), 2))

    response = purchase.parties.buyer_api.post("/usage-agreements", {
        **body, "payment_header": base64.b64encode(json.dumps(payload).encode()).decode()})

    assert response.status_code == 201, response.content
    assert UsageAgreement.objects.get().payment_authorization.signature == signature.lower()


def test_a_payment_signed_high_s_is_refused_at_proposal_not_failed_at_the_accept(purchase):
    """The payment's signature with s replaced by n - s (v flipped) recovers to the buyer in Python, so the proposal
    was taken, but the token refuses any s above n/2: the seller was offered a purchase whose payment can never run.
    It is 400 `invalid_signature`, as every other signature of the buyer's, nothing recorded."""
    body = purchase.body()
    payload = json.loads(base64.b64decode(body["payment_header"]))
    payload["payload"]["signature"] = _high_s(payload["payload"]["signature"])

    response = purchase.parties.buyer_api.post("/usage-agreements", {
        **body, "payment_header": base64.b64encode(json.dumps(payload).encode()).decode()})

    assert response.status_code == 400, response.content
    assert error_code(response) == "invalid_signature"
    assert not UsageAgreement.objects.exists()


@pytest.mark.parametrize("spent_by", ["a transfer", "its cancellation"])
def test_a_payment_authorization_spent_on_chain_before_the_proposal_is_refused(purchase, spent_by,
                                                                             django_capture_on_commit_callbacks):
    """An authorization the chain shows used (the buyer paid the seller's wallet with it elsewhere: its own x402
    endpoint, another marketplace) or cancelled before the purchase was proposed: the proposal was taken, and the
    seller's accept took the old transfer for this purchase's payment (paid, the fee collected), so the seller
    delivered twice for one payment. Refused 409 `authorization_already_used`, nothing recorded."""
    body = purchase.body()
    if spent_by == "its cancellation":
        purchase.cancel_authorization(body)
    else:
        signed = decode_payment_signature_header(body["payment_header"]).payload
        authorization = signed["authorization"]
        _send_authorization(purchase.chain, purchase.chain.accounts.stranger.address, payer=authorization["from"],
                            pay_to=authorization["to"], amount=authorization["value"],
                            valid_after=authorization["validAfter"], valid_before=authorization["validBefore"],
                            nonce=authorization["nonce"], signature=signed["signature"])

    response = purchase.parties.buyer_api.post("/usage-agreements", body)

    assert response.status_code == 409, response.content
    assert error_code(response) == "authorization_already_used"
    assert not UsageAgreement.objects.exists()


def test_a_payment_authorization_valid_for_longer_than_a_day_is_refused(purchase, settings):
    """A closed proposal's authorization is watched until its validBefore (and a failed payment's, by the relayer):
    one signed valid for years was read from the chain at every turn of the watch for years, never ended, each such
    proposal (a cancel away for the buyer) lengthening every other's turn. Refused at proposal (400
    `payment_valid_too_long`, nothing recorded), as the SDK refuses to sign one."""
    ten_years = purchase.chain.now() + 10 * 365 * 24 * 3600

    response = purchase.parties.buyer_api.post("/usage-agreements", _signed_valid_until(purchase, ten_years))

    assert response.status_code == 400, response.content
    error = response.json()["error"]
    assert error["code"] == "payment_valid_too_long", error
    assert error["details"] == {"field": "payment_header", "x402_reason": "",
                                "max_seconds": settings.DIRECT_PAYMENT_MAX_VALIDITY}
    assert not UsageAgreement.objects.filter(buyer=purchase.parties.buyer).exists()
    day = purchase.parties.buyer_api.post("/usage-agreements",
                                          _signed_valid_until(purchase, purchase.chain.now() + 24 * 3600))
    assert day.status_code == 201, day.content


def test_direct_payment_needs_its_signatures_and_escrow_refuses_them(purchase):
    body = purchase.body()
    missing = {k: v for k, v in body.items() if k != "fee_permit"}
    assert purchase.parties.buyer_api.post("/usage-agreements", missing).status_code == 400
    escrow = {**body, "settlement_model": "escrow"}
    assert purchase.parties.buyer_api.post("/usage-agreements", escrow).status_code == 400


@pytest.mark.parametrize("chain", TOKEN_NAMES, indirect=True)  # "USDC": Base Sepolia's name
def test_the_paegents_sdk_shape_pays_alike(purchase, django_capture_on_commit_callbacks):
    """Pægents' body: the payment under payment_method, the fee permit as signature and deadline only (the server
    fills in the fee and the token's nonce), the terms restated in cents."""
    ours = purchase.body()
    service = purchase.parties.service
    body = {
        "seller_agent_id": str(service.seller_id), "service_id": str(service.pk), "quantity": QUANTITY,
        "unit": "call", "price_per_unit_cents": 2, "settlement_model": "direct_payment",
        "payment_method": {"rail": "stablecoin", "payment_header": ours["payment_header"]},
        "buyer_wallet_address": purchase.buyer.address, "activation_version": "v2", "expires_in_seconds": 86_400,
        "buyer_infra_fee_permit_signature": ours["fee_permit"]["signature"],
        "buyer_infra_fee_permit_deadline": ours["fee_permit"]["deadline"],
    }
    agreement = purchase.propose(body)
    assert (agreement["infra_fee_atomic"], agreement["total_cents"], agreement["agreement_id"]) == (
        FEE, 1000, agreement["id"])
    buyer, seller, fee_recipient, treasury = purchase.balances()

    purchase.accept(agreement["id"], django_capture_on_commit_callbacks)
    for _ in range(3):
        confirm_all(django_capture_on_commit_callbacks)

    assert purchase.parties.agreement(agreement["id"])["status"] == "paid"
    assert purchase.balances() == (buyer - AMOUNT - FEE, seller + AMOUNT, fee_recipient + FEE, treasury)


def test_a_paegents_fee_permit_signed_at_another_nonce_is_refused(purchase):
    ours = purchase.body(permit_nonce=purchase.chain.usdc.functions.nonces(purchase.buyer.address).call() + 1)
    body = {key: value for key, value in ours.items() if key != "fee_permit"}
    body.update(buyer_infra_fee_permit_signature=ours["fee_permit"]["signature"],
                buyer_infra_fee_permit_deadline=ours["fee_permit"]["deadline"])
    response = purchase.parties.buyer_api.post("/usage-agreements", body)
    assert response.status_code == 400 and response.json()["error"]["code"] == "invalid_signature"


@pytest.mark.postgres
@pytest.mark.django_db(transaction=True)
def test_accepting_asks_the_chain_with_no_database_transaction_open(escrow_chain, settings,
                                                                    django_capture_on_commit_callbacks):
    """The accept's checks against the chain (simulation, nonce, balance) run before the agreement's row is locked:
    no row lock ever waits on the node."""
    from tests.support.db_activity import backend_pid, session_state
    with node_relayed(escrow_chain.node.rpc_url, settings) as relay:
        purchase = Purchase(escrow_chain)
        agreement = purchase.propose()
        pid = backend_pid()
        asked_inside_a_transaction = []
        relay.observers.append(lambda call: session_state(pid) == "idle in transaction"
                               and asked_inside_a_transaction.append(call["method"]))
        assert purchase.accept(agreement["id"], django_capture_on_commit_callbacks)["status"] == "paying"
        assert asked_inside_a_transaction == []


@pytest.mark.postgres
@pytest.mark.django_db(transaction=True)
def test_proposing_with_a_paegents_fee_permit_asks_the_chain_with_no_database_transaction_open(escrow_chain,
                                                                                             settings):
    """The fee permit given as signature and deadline only is completed with the token's nonce, read from the
    chain before the idempotent request's transaction opens; the replay answers the same without asking again."""
    from tests.support.db_activity import backend_pid, session_state
    with node_relayed(escrow_chain.node.rpc_url, settings) as relay:
        purchase = Purchase(escrow_chain)
        ours = purchase.body()
        body = {key: value for key, value in ours.items() if key != "fee_permit"}
        body.update(buyer_infra_fee_permit_signature=ours["fee_permit"]["signature"],
                    buyer_infra_fee_permit_deadline=ours["fee_permit"]["deadline"])
        headers = {"Idempotency-Key": "paegents-proposal-1"}
        pid = backend_pid()
        asked, asked_inside_a_transaction = [], []
        relay.observers.append(lambda call: asked.append(call["method"]))
        relay.observers.append(lambda call: session_state(pid) == "idle in transaction"
                               and asked_inside_a_transaction.append(call["method"]))

        first = purchase.parties.buyer_api.post("/usage-agreements", body, headers=headers)
        assert first.status_code == 201, first.content
        assert first.json()["infra_fee_atomic"] == FEE
        assert asked and asked_inside_a_transaction == []

        asked.clear()
        replay = purchase.parties.buyer_api.post("/usage-agreements", body, headers=headers)
        assert replay.status_code == 201 and replay["Idempotent-Replayed"] == "true"
        assert replay.json() == first.json()
        assert asked == []


def test_an_approved_direct_purchase_is_open_to_accept_no_longer_than_its_signatures_allow(purchase):
    """A direct purchase must be accepted while its payment and fee permit still run (its proposal ends half the
    minimum validity before they do); the owner's approval reopened it for the full proposal time, so that the
    seller could accept it when its payment could not be executed in time, or not at all."""
    owner_api = Api(issue_owner_token(purchase.parties.buyer.owner))
    owner_api.put(f"/agents/{purchase.parties.buyer.pk}/policies", {"approval_threshold_atomic": 1})
    held = purchase.propose()
    assert held["status"] == "pending_approval"
    bound = UsageAgreement.objects.get(pk=held["id"]).proposal_expires_at

    approval = ApprovalRequest.objects.get(subject_id=held["id"])
    approved = owner_api.post(f"/agents/{purchase.parties.buyer.pk}/approvals/{approval.pk}/approve")
    assert approved.status_code == 200, approved.content
    agreement = UsageAgreement.objects.get(pk=held["id"])
    assert agreement.status == "proposed" and agreement.proposal_expires_at <= bound


def test_the_approval_request_of_a_direct_purchase_ends_when_its_signatures_can_no_longer_be_accepted(purchase):
    """The request waited APPROVAL_TTL_HOURS whatever it held: the owner was shown a deadline a day away for a
    purchase whose signatures ran out in minutes, and approving it then answered 200 `approved` for a purchase that
    had expired."""
    owner_api = Api(issue_owner_token(purchase.parties.buyer.owner))
    owner_api.put(f"/agents/{purchase.parties.buyer.pk}/policies", {"approval_threshold_atomic": 1})
    held = purchase.propose()

    [approval] = owner_api.get(f"/agents/{purchase.parties.buyer.pk}/approvals").json()["results"]
    assert approval["expires_at"] == held["proposal_expires_at"]


def test_a_direct_purchase_approved_once_its_signatures_ran_out_expires(purchase):
    """Approved when its payment could no longer run in time, it is expired rather than offered to the seller, and the
    owner is told so (it answered 200 `approved`)."""
    owner_api = Api(issue_owner_token(purchase.parties.buyer.owner))
    owner_api.put(f"/agents/{purchase.parties.buyer.pk}/policies", {"approval_threshold_atomic": 1})
    held = purchase.propose()
    # Its signatures' acceptance deadline, counted on our clock at proposal, passed (the approval still open: racing).
    UsageAgreement.objects.filter(pk=held["id"]).update(proposal_expires_at=timezone.now() - timedelta(seconds=1))

    approval = ApprovalRequest.objects.get(subject_id=held["id"])
    approved = owner_api.post(f"/agents/{purchase.parties.buyer.pk}/approvals/{approval.pk}/approve")
    assert approved.status_code == 409 and error_code(approved) == "proposal_expired", approved.content
    assert approved.json()["error"]["details"] == {"status": "expired"}
    assert ApprovalRequest.objects.get(pk=approval.pk).status == "expired"
    agreement = UsageAgreement.objects.get(pk=held["id"])
    assert agreement.status == "expired" and "signatures" in agreement.status_reason
    refused = purchase.parties.seller_api.put(f"/usage-agreements/{held['id']}/accept")
    assert refused.status_code == 409


def _use_authorization(chain, agreement_id: str, sender: str):
    """Anyone holding the buyer's signed authorization (the platform's records, a log) sends it to the token, from
    `sender`; returns the transaction's hash once it is mined. Anvil answers a send before it mines it: a read just
    after could see the balances before it or, read by read, half of it (the seller paid, the buyer not charged)."""
    record = UsageAgreement.objects.select_related("payment_authorization").get(pk=agreement_id).payment_authorization
    return _send_authorization(chain, sender, payer=record.payer, pay_to=record.pay_to, amount=record.amount,
                               valid_after=record.valid_after, valid_before=record.valid_before, nonce=record.nonce,
                               signature=record.signature)


def _send_authorization(chain, sender: str, *, payer, pay_to, amount, valid_after, valid_before, nonce, signature):
    v, r, s = typed_data.split_signature(signature)
    tx_hash = chain.usdc.functions.transferWithAuthorization(
        chain.w3.to_checksum_address(payer), chain.w3.to_checksum_address(pay_to), int(amount), int(valid_after),
        int(valid_before), bytes.fromhex(nonce[2:]), v, bytes.fromhex(r[2:]), bytes.fromhex(s[2:])).transact(
        {"from": sender})
    mined_what_was_sent()
    return tx_hash


def _cancel_signature(purchase: Purchase, agreement_id: str, key: str | None = None) -> str:
    nonce = UsageAgreement.objects.select_related("payment_authorization").get(pk=agreement_id).payment_authorization.nonce
    typed = typed_data.cancel_authorization(chain_id=purchase.chain.chain_id, token_address=purchase.chain.usdc.address,
                                            authorizer=purchase.buyer.address, nonce=nonce)
    return typed_data.sign_typed_data(key or purchase.buyer.key, typed)


def cancelled_on_chain(purchase, agreement_id, capture) -> None:
    """The buyer's signed cancel of the purchase's payment authorization is relayed, confirmed, and the token counts
    the authorization used."""
    with capture(execute=True):
        cancelled = purchase.parties.buyer_api.post(f"/usage-agreements/{agreement_id}/cancel-payment-authorization",
                                                    {"signature": _cancel_signature(purchase, agreement_id)})
    assert cancelled.status_code == 202, cancelled.content
    confirm_all(capture)
    nonce = UsageAgreement.objects.get(pk=agreement_id).payment_authorization.nonce
    assert purchase.chain.usdc.functions.authorizationState(purchase.buyer.address, bytes.fromhex(nonce[2:])).call()


@pytest.mark.parametrize("close", ["reject", "cancel", "expire"])
def test_a_closed_direct_purchases_authorization_is_cancelled_on_chain_for_the_buyer(
        purchase, close, django_capture_on_commit_callbacks):
    """Rejected, cancelled or expired, a direct purchase leaves the buyer's signed authorization valid until its
    validBefore (a day): whoever holds it could move the buyer's money to the seller with no purchase. The buyer's
    signed CancelAuthorization is relayed by the platform (the buyer holds no gas), and the authorization is dead."""
    agreement = purchase.propose()
    path = f"/usage-agreements/{agreement['id']}"
    if close == "reject":
        assert purchase.parties.seller_api.put(f"{path}/reject", {"reason": "busy"}).status_code == 200
    elif close == "cancel":
        assert purchase.parties.buyer_api.post(f"{path}/cancel", {"reason": "changed my mind"}).status_code == 200
    else:
        UsageAgreement.objects.filter(pk=agreement["id"]).update(proposal_expires_at=timezone.now())
        agreement_services.agreements_expire_proposals()
    assert purchase.parties.agreement(agreement["id"])["status"] in ("rejected", "cancelled", "expired")
    before = purchase.balances()

    cancelled_on_chain(purchase, agreement["id"], django_capture_on_commit_callbacks)
    with pytest.raises(Exception):  # noqa: B017 - the token refuses it: AuthorizationUsedOrCanceled
        _use_authorization(purchase.chain, agreement["id"], purchase.chain.accounts.stranger.address)
    assert purchase.balances() == before
    assert ChainTransaction.objects.get(agreement_id=agreement["id"]).status == "confirmed"
    shown = purchase.parties.agreement(agreement["id"])
    assert shown["payment_authorization_cancel_tx_hash"].startswith("0x"), shown
    assert UsageAgreement.objects.get(pk=agreement["id"]).payment_authorization_watch_ended_at  # dead: not read again


def test_a_buyer_past_its_relay_revert_budget_still_cancels_its_payment_authorization(
        purchase, settings, django_capture_on_commit_callbacks):
    """The relay budget stops a buyer making its relayed purchases revert at the relayer's gas; the cancellation of
    a closed purchase's authorization is the buyer's defence of its money (the authorization is bearer until its
    validBefore), once per purchase. Refused by the budget, the authorization stayed live."""
    settings.RELAY_REVERTS_PER_PARTY = 1
    agreement = purchase.propose()
    path = f"/usage-agreements/{agreement['id']}"
    assert purchase.parties.seller_api.put(f"{path}/reject", {"reason": "busy"}).status_code == 200
    buyer_id = UsageAgreement.objects.get(pk=agreement["id"]).buyer_id
    RelayRevert.objects.create(  # a relayed transaction of the buyer's that it made revert, a minute ago
        transaction=ChainTransaction.objects.create(purpose="activate", to_address=purchase.chain.usdc.address,
                                                    data="0x", chain_id=purchase.chain.chain_id, status="failed"),
        party=relayer.relay_party(agent_id=buyer_id), reverted_at=timezone.now() - timedelta(minutes=1))

    cancelled_on_chain(purchase, agreement["id"], django_capture_on_commit_callbacks)


def test_a_buyer_cannot_have_the_relayer_cancel_authorizations_it_proposed_and_cancelled_over_and_over(
        purchase, settings, django_capture_on_commit_callbacks):
    """Propose, cancel, have the relayer send the cancelAuthorization: nothing on-chain is the buyer's, each loop is a
    transaction at the relayer's gas. An authorization only the platform ever held (never sent: the seller never
    saw it) is cancelled for the buyer at most RELAY_AUTHORIZATION_CANCELS_PER_PARTY times within the window; then
    429 `relay_cancel_budget_exhausted`, nothing queued, and the buyer cancels it itself from its wallet."""
    settings.RELAY_AUTHORIZATION_CANCELS_PER_PARTY = 2
    relayer_address = gateway.relayer_account().address
    sent_before = purchase.chain.w3.eth.get_transaction_count(relayer_address)
    for _ in range(2):
        agreement = purchase.propose()
        assert purchase.parties.buyer_api.post(f"/usage-agreements/{agreement['id']}/cancel").status_code == 200
        cancelled_on_chain(purchase, agreement["id"], django_capture_on_commit_callbacks)
    assert purchase.chain.w3.eth.get_transaction_count(relayer_address) == sent_before + 2  # the relayer's gas

    body = purchase.body()
    agreement = purchase.propose(body)
    path = f"/usage-agreements/{agreement['id']}"
    assert purchase.parties.buyer_api.post(f"{path}/cancel").status_code == 200
    with django_capture_on_commit_callbacks(execute=True):
        refused = purchase.parties.buyer_api.post(f"{path}/cancel-payment-authorization",
                                                  {"signature": _cancel_signature(purchase, agreement["id"])})
    assert refused.status_code == 429 and error_code(refused) == "relay_cancel_budget_exhausted", refused.content
    assert refused.json()["error"]["details"]["bound"] == "party", refused.content
    assert not ChainTransaction.objects.filter(agreement_id=agreement["id"]).exists()
    assert purchase.chain.w3.eth.get_transaction_count(relayer_address) == sent_before + 2
    purchase.cancel_authorization(body)  # the buyer's defence stays: its own signed cancel, sent by anyone
    with pytest.raises(Exception):  # noqa: B017 - the token refuses it: AuthorizationUsedOrCanceled
        _use_authorization(purchase.chain, agreement["id"], purchase.chain.accounts.stranger.address)


def test_a_buyer_past_its_relayed_cancels_still_has_an_authorization_its_failed_payment_made_public_cancelled(
        purchase, settings, django_capture_on_commit_callbacks):
    """The cancel budget bounds authorizations only the platform held: one whose payment the relayer signed and sent
    (its calldata public, in the mempool or a reverted transaction) is cancelled for the buyer whatever the count."""
    settings.RELAY_AUTHORIZATION_CANCELS_PER_PARTY = 1
    spent = purchase.propose()
    assert purchase.parties.buyer_api.post(f"/usage-agreements/{spent['id']}/cancel").status_code == 200
    cancelled_on_chain(purchase, spent["id"], django_capture_on_commit_callbacks)

    agreement = purchase.propose()
    UsageAgreement.objects.filter(pk=agreement["id"]).update(status="payment_failed")  # its payment was sent, failed
    sent = ChainTransaction.objects.create(purpose="direct_payment", agreement_id=agreement["id"], data="0x",
                                           to_address=purchase.chain.usdc.address, chain_id=purchase.chain.chain_id,
                                           status="failed")
    TxAttempt.objects.create(transaction=sent, tx_hash="0x" + "ab" * 32, raw_transaction="0x", nonce=0,
                             max_fee_per_gas=1, max_priority_fee_per_gas=1)
    cancelled_on_chain(purchase, agreement["id"], django_capture_on_commit_callbacks)


def test_a_payment_authorization_is_cancelled_only_by_its_buyer_and_only_once_the_purchase_is_off(
        purchase, django_capture_on_commit_callbacks):
    agreement = purchase.propose()
    path = f"/usage-agreements/{agreement['id']}/cancel-payment-authorization"
    signature = _cancel_signature(purchase, agreement["id"])
    open_purchase = purchase.parties.buyer_api.post(path, {"signature": signature})
    assert open_purchase.status_code == 409 and error_code(open_purchase) == "purchase_still_open", open_purchase.content
    assert purchase.parties.seller_api.put(f"/usage-agreements/{agreement['id']}/reject").status_code == 200
    by_seller = purchase.parties.seller_api.post(path, {"signature": signature})
    assert by_seller.status_code in (403, 404), by_seller.content
    forged = purchase.parties.buyer_api.post(path, {"signature": _cancel_signature(
        purchase, agreement["id"], key=purchase.chain.accounts.stranger.key)})
    assert forged.status_code == 400 and error_code(forged) == "wrong_signer", forged.content
    assert not ChainTransaction.objects.filter(agreement_id=agreement["id"]).exists()

    with django_capture_on_commit_callbacks(execute=True):
        first = purchase.parties.buyer_api.post(path, {"signature": signature})
        again = purchase.parties.buyer_api.post(path, {"signature": signature})
    assert first.status_code == again.status_code == 202, (first.content, again.content)
    assert ChainTransaction.objects.filter(agreement_id=agreement["id"]).count() == 1

    paid = purchase.propose()
    purchase.accept(paid["id"], django_capture_on_commit_callbacks)
    for _ in range(3):
        confirm_all(django_capture_on_commit_callbacks)
    refused = purchase.parties.buyer_api.post(f"/usage-agreements/{paid['id']}/cancel-payment-authorization",
                                              {"signature": _cancel_signature(purchase, paid["id"])})
    assert refused.status_code == 409 and error_code(refused) == "purchase_still_open", refused.content


def test_an_authorization_used_after_the_purchase_was_rejected_is_named_when_the_buyer_would_cancel_it(
        purchase, django_capture_on_commit_callbacks):
    """Before the buyer revokes it, whoever holds the authorization of a rejected purchase can still send it: the
    buyer's money goes to the seller with no purchase. The buyer's cancellation is then refused naming that
    transaction (an operator's matter: the money is with the seller, not the platform)."""
    agreement = purchase.propose()
    assert purchase.parties.seller_api.put(f"/usage-agreements/{agreement['id']}/reject").status_code == 200
    buyer, seller, _, _ = purchase.balances()
    tx_hash = _use_authorization(purchase.chain, agreement["id"], purchase.chain.accounts.stranger.address)
    assert purchase.balances()[:2] == (buyer - AMOUNT, seller + AMOUNT)

    refused = purchase.parties.buyer_api.post(f"/usage-agreements/{agreement['id']}/cancel-payment-authorization",
                                              {"signature": _cancel_signature(purchase, agreement["id"])})
    assert refused.status_code == 409 and error_code(refused) == "authorization_already_used", refused.content
    assert refused.json()["error"]["details"]["used_by"] == "0x" + bytes(tx_hash).hex().removeprefix("0x")
    assert not ChainTransaction.objects.filter(agreement_id=agreement["id"]).exists()


def test_an_authorization_whose_nonce_the_buyer_spent_on_another_transfer_is_found_closed_when_it_would_cancel_it(
        purchase):
    """After the purchase was rejected, the buyer signs another transfer under its authorization's nonce, to a wallet
    of its own, and gets it mined: the token counts the nonce used (AuthorizationUsed), nothing reached the seller,
    and nobody can move the buyer's money with the authorization any more. Asked to cancel it, the platform answers
    409 naming no use, and records it closed by that transfer (the watch of closed direct proposals ends), as for the
    buyer's own cancelAuthorization. (Before: only a cancel counted as closed there, where the skill invocations'
    watch counted both: this one was read again at every run of the watch until its validBefore.)"""
    agreement = purchase.propose()
    assert purchase.parties.seller_api.put(f"/usage-agreements/{agreement['id']}/reject").status_code == 200
    record = UsageAgreement.objects.select_related("payment_authorization").get(pk=agreement["id"]).payment_authorization
    own_wallet = purchase.chain.accounts.stranger.address
    typed = typed_data.transfer_with_authorization(
        chain_id=purchase.chain.chain_id, token_address=purchase.chain.usdc.address, from_address=purchase.buyer.address,
        to_address=own_wallet, value=USDC, valid_after=0, valid_before=int(record.valid_before), nonce=record.nonce,
        token_name=purchase.chain.usdc.functions.name().call())
    v, r, s = typed_data.split_signature(typed_data.sign_typed_data(purchase.buyer.key, typed))
    closed_by = _hash(purchase.chain.usdc.functions.transferWithAuthorization(
        purchase.buyer.address, own_wallet, USDC, 0, int(record.valid_before), bytes.fromhex(record.nonce[2:]), v,
        bytes.fromhex(r[2:]), bytes.fromhex(s[2:])).transact({"from": purchase.buyer.address}))
    mined_what_was_sent()

    refused = purchase.parties.buyer_api.post(f"/usage-agreements/{agreement['id']}/cancel-payment-authorization",
                                              {"signature": _cancel_signature(purchase, agreement["id"])})

    assert refused.status_code == 409 and error_code(refused) == "authorization_already_used", refused.content
    assert refused.json()["error"]["details"]["used_by"] is None
    closed = UsageAgreement.objects.get(pk=agreement["id"])
    assert closed.payment_authorization_watch_ended_at is not None and not closed.payment_tx_hash
    assert AgreementEvent.objects.filter(agreement_id=agreement["id"], data__closed_by=closed_by).exists()
    assert not ChainTransaction.objects.filter(agreement_id=agreement["id"]).exists()


def test_a_use_a_lagging_node_does_not_show_yet_when_the_buyer_would_cancel_does_not_end_the_watch(
        purchase, monkeypatch, django_capture_on_commit_callbacks):
    """A stranger uses a rejected purchase's authorization; the buyer's cancellation is asked of a provider whose node
    answering the logs is a block behind the one answering `authorizationState` (a load-balanced RPC): spent, but
    no use found. That was taken for the buyer's own cancellation: the watch of closed direct proposals ended, so the
    transfer to the seller was never named nor counted against the buyer's caps. Now no verdict (503: spent with no
    use nor cancel found is no answer), and only a cancellation the chain shows ends the watch, which finds the use
    once the node catches up."""
    agreement = purchase.propose()
    assert purchase.parties.seller_api.put(f"/usage-agreements/{agreement['id']}/reject").status_code == 200
    used_by = _hash(_use_authorization(purchase.chain, agreement["id"], purchase.chain.accounts.stranger.address))
    latest = gateway.latest_block_number
    monkeypatch.setattr(gateway, "latest_block_number", lambda: latest() - 1)

    unanswered = purchase.parties.buyer_api.post(f"/usage-agreements/{agreement['id']}/cancel-payment-authorization",
                                                 {"signature": _cancel_signature(purchase, agreement["id"])})

    assert unanswered.status_code == 503 and error_code(unanswered) == "chain_unavailable", unanswered.content
    monkeypatch.setattr(gateway, "latest_block_number", latest)  # the node caught up
    agreement_tasks.watch_closed_direct_proposals()
    rejected = purchase.parties.agreement(agreement["id"])
    assert rejected["payment_tx_hash"] == used_by, rejected
    _next_purchase_over_the_daily_cap_refused(purchase)


def test_a_node_error_answering_the_accepts_simulation_of_the_payment_does_not_fail_the_purchase(
        purchase, settings, django_capture_on_commit_callbacks):
    """The node answers the simulation of the buyer's transferWithAuthorization with a JSON-RPC error of its own (an
    overloaded provider's -32603), no revert: taken for the token refusing the payment, the accept failed the
    purchase for good ("payment cannot run"). No verdict instead: 503, the purchase still proposed, and accepted
    once the node answers."""
    capture = django_capture_on_commit_callbacks
    agreement = purchase.propose()
    with node_relayed(purchase.chain.node.rpc_url, settings) as relay:
        relay.rewrite(lambda call: call.get("method") == "eth_call"
                      and call["params"][0].get("data", "").startswith("0xe3ee160e"),  # transferWithAuthorization
                      lambda answer: {"jsonrpc": "2.0", "id": answer.get("id"),
                                      "error": {"code": -32603, "message": "internal error"}})
        erred = purchase.parties.seller_api.put(f"/usage-agreements/{agreement['id']}/accept")
        assert erred.status_code == 503 and error_code(erred) == "chain_unavailable", erred.content
        assert purchase.parties.agreement(agreement["id"])["status"] == "proposed"

    assert purchase.accept(agreement["id"], capture)["status"] == "paying"
    for _ in range(3):
        confirm_all(capture)
    assert purchase.parties.agreement(agreement["id"])["status"] == "paid"


def test_a_cancel_read_from_a_backend_behind_the_use_of_the_authorization_does_not_record_it_cancelled(
        purchase, settings):
    """The token counts the rejected purchase's authorization spent (its use, in the newest block, sent by whoever
    held it), and the head the node names for the search of that use is a backend's one block behind: no use found
    below it. Taken for the buyer's own cancel, the agreement recorded the authorization cancelled and its watch
    ended, so the transfer to the seller was never named nor counted against the buyer's caps. No verdict instead:
    503, nothing recorded, and asked again once the node answers alike, 409 naming the use."""
    agreement = purchase.propose()
    assert purchase.parties.seller_api.put(f"/usage-agreements/{agreement['id']}/reject").status_code == 200
    used_by = _hash(_use_authorization(purchase.chain, agreement["id"], purchase.chain.accounts.stranger.address))
    path = f"/usage-agreements/{agreement['id']}/cancel-payment-authorization"
    with node_relayed(purchase.chain.node.rpc_url, settings) as relay:
        relay.head_named_behind(1)
        behind = purchase.parties.buyer_api.post(path, {"signature": _cancel_signature(purchase, agreement["id"])})
        assert behind.status_code == 503 and error_code(behind) == "chain_unavailable", behind.content
        watched = UsageAgreement.objects.get(pk=agreement["id"])
        assert watched.payment_authorization_watch_ended_at is None and not watched.payment_tx_hash

        relay.rewrite_none()
        refused = purchase.parties.buyer_api.post(path, {"signature": _cancel_signature(purchase, agreement["id"])})
    assert refused.status_code == 409 and error_code(refused) == "authorization_already_used", refused.content
    assert refused.json()["error"]["details"]["used_by"] == used_by


def test_a_cancel_whose_search_of_the_uses_transfer_reaches_a_backend_without_its_block_does_not_record_it_cancelled(
        purchase, settings):
    """The use of the rejected purchase's authorization is found (AuthorizationUsed), and whether it moved what the
    authorization says is read from the Transfer logs of its block, which the backend answering that call lacks: asked
    by block number, it answered none, and the use was taken for a transfer elsewhere, the authorization recorded
    cancelled and its watch ended. Asked by the block's hash, that backend refuses: 503, nothing recorded."""
    agreement = purchase.propose()
    assert purchase.parties.seller_api.put(f"/usage-agreements/{agreement['id']}/reject").status_code == 200
    receipt = purchase.chain.w3.eth.get_transaction_receipt(
        _use_authorization(purchase.chain, agreement["id"], purchase.chain.accounts.stranger.address))
    block_hash = _hash(receipt["blockHash"]).lower()
    transfer = _hash(Web3.keccak(text="Transfer(address,address,uint256)"))
    with node_relayed(purchase.chain.node.rpc_url, settings) as relay:
        # The backend lacking the block: asked for it by hash, it refuses; over a range, it answers the others' logs.
        relay.rewrite(lambda call: call.get("method") == "eth_getLogs"
                      and call["params"][0].get("blockHash", "").lower() == block_hash,
                      lambda answer: {"jsonrpc": "2.0", "id": answer.get("id"),
                                      "error": {"code": -32000, "message": "unknown block"}})
        relay.rewrite(lambda call: call.get("method") == "eth_getLogs"
                      and (call["params"][0].get("topics") or [None])[0] == transfer,
                      lambda answer: {**answer, "result": [log for log in answer["result"]
                                                           if log["blockHash"].lower() != block_hash]})
        behind = purchase.parties.buyer_api.post(f"/usage-agreements/{agreement['id']}/cancel-payment-authorization",
                                                 {"signature": _cancel_signature(purchase, agreement["id"])})
    assert behind.status_code == 503 and error_code(behind) == "chain_unavailable", behind.content
    watched = UsageAgreement.objects.get(pk=agreement["id"])
    assert watched.payment_authorization_watch_ended_at is None and not watched.payment_tx_hash


def test_a_sellers_accept_read_from_a_backend_behind_the_buyers_payment_does_not_fail_the_purchase_it_paid(
        purchase, settings, django_capture_on_commit_callbacks):
    """The buyer sent its payment to the seller before the accept (in the newest block): the purchase goes on as paid
    by it. Asked of a node whose answers come from two backends, the token's simulation refusing the authorization as
    used and the head named for the search of that use one block behind, no use was found: the accept failed the
    purchase, "nothing was charged", the price with the seller for good. No verdict instead: 503, the purchase still
    proposed, and accepted again once the node answers alike, paid by the buyer's transfer."""
    capture = django_capture_on_commit_callbacks
    agreement = purchase.propose()
    buyer, seller, fee_recipient, treasury = purchase.balances()
    used_by = _hash(_use_authorization(purchase.chain, agreement["id"], purchase.buyer.address))
    with node_relayed(purchase.chain.node.rpc_url, settings) as relay:
        relay.head_named_behind(1)
        behind = purchase.parties.seller_api.put(f"/usage-agreements/{agreement['id']}/accept")
        assert behind.status_code == 503 and error_code(behind) == "chain_unavailable", behind.content
        assert purchase.parties.agreement(agreement["id"])["status"] == "proposed"

    assert purchase.accept(agreement["id"], capture)["status"] == "paying"
    for _ in range(2):
        confirm_all(capture)
    paid = purchase.parties.agreement(agreement["id"])
    assert paid["status"] == "paid" and paid["payment_tx_hash"] == used_by, paid
    assert purchase.balances() == (buyer - AMOUNT - FEE, seller + AMOUNT, fee_recipient + FEE, treasury)


def test_a_cancellation_outrun_by_a_use_of_the_authorization_records_that_use(
        purchase, django_capture_on_commit_callbacks):
    """The authorization is used between the buyer's cancellation and the relayer's send: the cancellation fails and
    the agreement's events name the transaction that moved the buyer's money."""
    agreement = purchase.propose()
    assert purchase.parties.seller_api.put(f"/usage-agreements/{agreement['id']}/reject").status_code == 200
    with django_capture_on_commit_callbacks(execute=False):  # queued, not sent yet
        queued = purchase.parties.buyer_api.post(f"/usage-agreements/{agreement['id']}/cancel-payment-authorization",
                                                 {"signature": _cancel_signature(purchase, agreement["id"])})
    assert queued.status_code == 202, queued.content
    used_by = _use_authorization(purchase.chain, agreement["id"], purchase.chain.accounts.stranger.address)
    with django_capture_on_commit_callbacks(execute=True):
        relayer.transaction_submit(transaction_id=queued.json()["transaction"]["id"])
    for _ in range(2):
        confirm_all(django_capture_on_commit_callbacks)

    assert ChainTransaction.objects.get(agreement_id=agreement["id"]).status == "failed"
    event = AgreementEvent.objects.filter(agreement_id=agreement["id"]).order_by("-pk").first()
    assert event.data["used_by"] == "0x" + bytes(used_by).hex().removeprefix("0x"), event.reason
    rejected = purchase.parties.agreement(agreement["id"])
    assert rejected["payment_authorization_cancel_tx_hash"] == ""
    assert rejected["payment_tx_hash"] == event.data["used_by"], rejected  # the price left the wallet: counted
    _next_purchase_over_the_daily_cap_refused(purchase)


def _strangers_copy_runs_first(purchase, capture, ours: ChainTransaction) -> str:
    """A stranger sends a copy of the relayer's queued `ours` and gets it mined first; then ours is sent and both
    concluded: the copy's hash."""
    chain = purchase.chain
    copy = _hash(chain.w3.eth.send_transaction({"from": chain.accounts.stranger.address, "to": ours.to_address,
                                                "data": ours.data}))
    mined_what_was_sent()
    with capture(execute=True):
        relayer.transaction_submit(transaction_id=ours.pk)
    for _ in range(2):
        confirm_all(capture)
    return copy


def test_a_cancellation_a_strangers_copy_of_it_ran_first_is_recorded_done_not_failed(
        purchase, django_capture_on_commit_callbacks):
    """The relayed cancelAuthorization is bearer: a stranger copies the buyer's signed cancel from the relayer's
    pending transaction and gets it mined first, so ours reverts. The authorization is dead all the same, by the
    copy: the purchase names the copy as its cancellation (and the watch of closed proposals ends), and the revert
    is no failure on the operators' list. It was recorded as "the payment authorization's cancellation reverted",
    no cancellation named, and listed as a failed transaction."""
    capture = django_capture_on_commit_callbacks
    agreement = purchase.propose()
    assert purchase.parties.seller_api.put(f"/usage-agreements/{agreement['id']}/reject").status_code == 200
    with capture(execute=False):  # queued, not sent yet
        queued = purchase.parties.buyer_api.post(f"/usage-agreements/{agreement['id']}/cancel-payment-authorization",
                                                 {"signature": _cancel_signature(purchase, agreement["id"])})
    assert queued.status_code == 202, queued.content
    ours = ChainTransaction.objects.get(pk=queued.json()["transaction"]["id"])
    copy = _strangers_copy_runs_first(purchase, capture, ours)

    ours.refresh_from_db()
    assert ours.status == "failed" and ours.mined_tx_hash != copy
    rejected = purchase.parties.agreement(agreement["id"])
    assert (rejected["payment_tx_hash"], rejected["payment_authorization_cancel_tx_hash"]) == ("", copy), rejected
    assert UsageAgreement.objects.get(pk=agreement["id"]).payment_authorization_watch_ended_at is not None
    assert ours not in escrow_selectors.transactions_failed_recently(limit=50)


def test_a_cancellation_concluded_on_a_strangers_copy_a_reorg_takes_is_sent_again_and_named(
        purchase, django_capture_on_commit_callbacks):
    """The copy of the buyer's signed cancel that outran ours is named as the purchase's cancellation; a reorg takes
    the copy's block: nothing cancels the authorization on the new branch, so the purchase names no cancellation,
    is watched again, and ours, sent again, runs and is named."""
    capture = django_capture_on_commit_callbacks
    agreement = purchase.propose()
    assert purchase.parties.seller_api.put(f"/usage-agreements/{agreement['id']}/reject").status_code == 200
    with capture(execute=False):
        queued = purchase.parties.buyer_api.post(f"/usage-agreements/{agreement['id']}/cancel-payment-authorization",
                                                 {"signature": _cancel_signature(purchase, agreement["id"])})
    ours = ChainTransaction.objects.get(pk=queued.json()["transaction"]["id"])
    chain = purchase.chain
    before_the_copy = chain.snapshot()
    copy = _strangers_copy_runs_first(purchase, capture, ours)
    assert purchase.parties.agreement(agreement["id"])["payment_authorization_cancel_tx_hash"] == copy

    chain.reorg(before_the_copy)
    for _ in range(3):
        confirm_all(capture)

    ours.refresh_from_db()
    assert ours.status == "confirmed", (ours.status, ours.failure_reason)
    assert purchase.parties.agreement(agreement["id"])["payment_authorization_cancel_tx_hash"] == ours.mined_tx_hash
    nonce = UsageAgreement.objects.get(pk=agreement["id"]).payment_authorization.nonce
    assert chain.usdc.functions.authorizationState(purchase.buyer.address, bytes.fromhex(nonce[2:])).call()


def test_a_cancellation_outrun_by_a_use_a_reorg_takes_names_no_transfer_and_the_cancellation_that_ran(
        purchase, django_capture_on_commit_callbacks):
    """The use that outran the buyer's cancellation is named by the purchase (payment_tx_hash) and counted against
    its caps; a reorg takes the use's block (and the failed cancellation's after it): the relayer sends the
    cancellation again and it runs on the new branch. The purchase went on naming a transfer the chain no longer had,
    its price counted though it never left the buyer's wallet. It names none, and the cancellation."""
    capture = django_capture_on_commit_callbacks
    agreement = purchase.propose()
    assert purchase.parties.seller_api.put(f"/usage-agreements/{agreement['id']}/reject").status_code == 200
    buyer_balance = purchase.balances()[0]
    with capture(execute=False):  # queued, not sent yet
        queued = purchase.parties.buyer_api.post(f"/usage-agreements/{agreement['id']}/cancel-payment-authorization",
                                                 {"signature": _cancel_signature(purchase, agreement["id"])})
    before_the_use = purchase.chain.snapshot()
    used_by = _hash(_use_authorization(purchase.chain, agreement["id"], purchase.chain.accounts.stranger.address))
    with capture(execute=True):
        relayer.transaction_submit(transaction_id=queued.json()["transaction"]["id"])
    for _ in range(2):
        confirm_all(capture)
    assert purchase.parties.agreement(agreement["id"])["payment_tx_hash"] == used_by

    purchase.chain.reorg(before_the_use)
    for _ in range(3):
        confirm_all(capture)

    rejected = purchase.parties.agreement(agreement["id"])
    cancel = ChainTransaction.objects.get(agreement_id=agreement["id"])
    assert cancel.status == "confirmed" and purchase.balances()[0] == buyer_balance
    assert (rejected["payment_tx_hash"], rejected["payment_authorization_cancel_tx_hash"]) == (
        "", cancel.mined_tx_hash), rejected
    event = AgreementEvent.objects.filter(agreement_id=agreement["id"], data__reorg=True).get()
    assert used_by in event.reason



def test_a_reorg_that_takes_the_failed_cancellations_block_but_not_the_use_before_it_keeps_the_use_named(
        purchase, django_capture_on_commit_callbacks, monkeypatch):
    """The use that outran the buyer's cancellation was mined a block before it, and stays on the chain; a reorg
    takes only the block of the cancellation that reverted after it. The purchase stopped naming the use and counting
    its price, and both parties were told that a reorg took the transfer, of a use that still stands. Only a reorg
    that takes the use's block undoes it."""
    capture = django_capture_on_commit_callbacks
    agreement = purchase.propose()
    assert purchase.parties.seller_api.put(f"/usage-agreements/{agreement['id']}/reject").status_code == 200
    with capture(execute=False):  # queued, not sent yet
        queued = purchase.parties.buyer_api.post(f"/usage-agreements/{agreement['id']}/cancel-payment-authorization",
                                                 {"signature": _cancel_signature(purchase, agreement["id"])})
    send, seen = gateway.broadcast, {}

    def use_first(raw):  # mined between the relayer's simulation of the cancellation and its broadcast
        if not seen:
            seen["used_by"] = _hash(_use_authorization(purchase.chain, agreement["id"],
                                                       purchase.chain.accounts.stranger.address))
            seen["after_the_use"] = purchase.chain.snapshot()
        return send(raw)

    monkeypatch.setattr(gateway, "broadcast", use_first)
    with capture(execute=True):
        relayer.transaction_submit(transaction_id=queued.json()["transaction"]["id"])
    monkeypatch.setattr(gateway, "broadcast", send)
    for _ in range(2):
        confirm_all(capture)
    cancel = ChainTransaction.objects.get(agreement_id=agreement["id"])
    assert cancel.status == "failed" and cancel.mined_block_number is not None, cancel.failure_reason
    assert purchase.parties.agreement(agreement["id"])["payment_tx_hash"] == seen["used_by"]

    purchase.chain.reorg(seen["after_the_use"])  # the cancellation's block taken, the use's kept
    with capture(execute=True):
        assert relayer.transactions_reopen_reorged() == 1

    assert purchase.parties.agreement(agreement["id"])["payment_tx_hash"] == seen["used_by"]
    for _ in range(3):  # the cancellation is sent again
        confirm_all(capture)
    assert purchase.parties.agreement(agreement["id"])["payment_tx_hash"] == seen["used_by"]
    assert not AgreementEvent.objects.filter(agreement_id=agreement["id"], data__reorg=True).exists()


_SECP256K1_N = 0xFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFEBAAEDCE6AF48A03BBFD25E8CD0364141


def _high_s(signature: str) -> str:
    """The same signature with s replaced by n - s (and v flipped): it recovers to the same signer in Python, but the
    token (OpenZeppelin's ECDSA, as USDC's ECRecover) refuses any s above n/2."""
    raw = bytes.fromhex(signature[2:])
    s, v = int.from_bytes(raw[32:64], "big"), raw[64]
    return "0x" + (raw[:32] + (_SECP256K1_N - s).to_bytes(32, "big") + bytes([55 - v])).hex()


def test_a_cancellation_the_token_would_refuse_is_not_relayed_so_it_cannot_spend_the_relayers_gas_in_a_loop(
        purchase, django_capture_on_commit_callbacks):
    """A high-s signature (n - s) recovers to the buyer's wallet in Python, so it passed the check, but the token
    refuses it: relayed, it reverted at the relayer's expense and left the authorization live, so the buyer could ask
    again and again, each time costing gas. It is refused before anything is queued."""
    agreement = purchase.propose()
    assert purchase.parties.seller_api.put(f"/usage-agreements/{agreement['id']}/reject").status_code == 200
    path = f"/usage-agreements/{agreement['id']}/cancel-payment-authorization"
    malleable = _high_s(_cancel_signature(purchase, agreement["id"]))
    assert typed_data.recover_typed_data_signer(typed_data.cancel_authorization(
        chain_id=purchase.chain.chain_id, token_address=purchase.chain.usdc.address,
        authorizer=purchase.buyer.address,
        nonce=UsageAgreement.objects.get(pk=agreement["id"]).payment_authorization.nonce),
        malleable) == purchase.buyer.address
    with django_capture_on_commit_callbacks(execute=True):
        refused = purchase.parties.buyer_api.post(path, {"signature": malleable})
    assert refused.status_code == 400 and error_code(refused) == "invalid_signature", refused.content
    assert not ChainTransaction.objects.filter(agreement_id=agreement["id"]).exists()


@pytest.mark.parametrize("method", ["get", "post"])
def test_a_payment_authorizations_cancellation_is_503_not_500_when_the_token_cannot_be_read(
        purchase, method, monkeypatch):
    """The cancellation's typed data is in the token's EIP-712 domain, read from the token (cached once read): a
    node that does not answer then is 503 chain_unavailable, not a 500."""

    agreement = purchase.propose()
    assert purchase.parties.seller_api.put(f"/usage-agreements/{agreement['id']}/reject").status_code == 200
    signature = _cancel_signature(purchase, agreement["id"])

    def unavailable(*args):
        raise gateway.RpcUnavailable("read timed out")

    monkeypatch.setattr(gateway, "_token_domain", unavailable)
    path = f"/usage-agreements/{agreement['id']}/cancel-payment-authorization"
    api = purchase.parties.buyer_api
    answer = api.get(path) if method == "get" else api.post(path, {"signature": signature})
    assert answer.status_code == 503 and error_code(answer) == "chain_unavailable", answer.content
    assert not ChainTransaction.objects.filter(agreement_id=agreement["id"]).exists()


def test_a_cancellation_the_token_would_revert_for_a_reason_the_api_does_not_check_is_refused_with_nothing_queued(
        purchase, django_capture_on_commit_callbacks, monkeypatch):
    """The API checks who, when, the signature and whether the authorization is spent; the token may still refuse
    (paused, say). Relayed, the cancellation reverted at the relayer's expense, and the buyer could ask again and
    again. It is simulated from the relayer's address first: a revert is 409 `transaction_would_revert` naming the
    reason, nothing queued; a node that does not answer is 503."""

    agreement = purchase.propose()
    assert purchase.parties.seller_api.put(f"/usage-agreements/{agreement['id']}/reject").status_code == 200
    path = f"/usage-agreements/{agreement['id']}/cancel-payment-authorization"
    signature = _cancel_signature(purchase, agreement["id"])
    simulated = []

    def paused(*, sender, to, data):
        simulated.append((sender, to))
        raise gateway.Reverted("Pausable: paused")

    monkeypatch.setattr(gateway, "simulate", paused)
    with django_capture_on_commit_callbacks(execute=True):
        refused = purchase.parties.buyer_api.post(path, {"signature": signature})
    assert refused.status_code == 409 and error_code(refused) == "transaction_would_revert", refused.content
    assert refused.json()["error"]["details"]["revert_reason"] == "Pausable: paused"
    assert simulated == [(gateway.relayer_account().address, purchase.chain.usdc.address)]
    assert not ChainTransaction.objects.filter(agreement_id=agreement["id"]).exists()

    def unreachable(*, sender, to, data):
        raise gateway.RpcUnavailable("read timed out")

    monkeypatch.setattr(gateway, "simulate", unreachable)
    answer = purchase.parties.buyer_api.post(path, {"signature": signature})
    assert answer.status_code == 503 and error_code(answer) == "chain_unavailable", answer.content
    assert not ChainTransaction.objects.filter(agreement_id=agreement["id"]).exists()
    assert purchase.parties.agreement(agreement["id"])["status"] == "rejected"


# --- a wallet's payments in flight, summed against its balance --------------------------------------------------

def _keep_only(purchase, amount: int) -> None:
    """Leave the buyer's wallet holding `amount`, the rest sent away."""
    chain = purchase.chain
    sent = chain.usdc.functions.transfer(chain.accounts.stranger.address,
                                         usdc_balance(chain, purchase.buyer.address) - amount
                                         ).transact({"from": purchase.buyer.address})
    assert chain.w3.eth.wait_for_transaction_receipt(sent)["status"] == 1


def _accept_unsent(purchase, agreement_id: str, capture) -> list:
    """The seller's accept, its transactions queued and not sent (what the commit would start is returned)."""
    with capture(execute=False) as sends:
        accepted = purchase.parties.seller_api.put(f"/usage-agreements/{agreement_id}/accept")
    assert accepted.status_code == 200, accepted.content
    assert accepted.json()["status"] == "paying"
    return list(sends)


def test_a_buyer_funded_for_one_direct_purchase_has_a_second_accepted_before_the_first_is_mined_refused(
        purchase, django_capture_on_commit_callbacks):
    """Each accept's simulation and balance check see the balance alone: two purchases accepted back to back both
    passed, and the second's fee and payment reverted at the relayer's gas. The wallet's payments not mined yet
    count (the first's fee and payment, which its wallet pays): the second is 402 insufficient_balance naming them
    (`committed`), nothing queued, and it stays proposed, for the seller to accept again once the funds suffice."""
    capture = django_capture_on_commit_callbacks
    first, second = purchase.propose(), purchase.propose()
    balance = AMOUNT + FEE + AMOUNT // 2
    _keep_only(purchase, balance)
    sends = _accept_unsent(purchase, first["id"], capture)

    with capture(execute=True):
        refused = purchase.parties.seller_api.put(f"/usage-agreements/{second['id']}/accept")

    assert refused.status_code == 402, refused.content
    assert error_code(refused) == "insufficient_balance"
    assert refused.json()["error"]["details"] == {"balance": balance, "required": AMOUNT + FEE,
                                                  "committed": AMOUNT + FEE}
    assert not ChainTransaction.objects.filter(agreement_id=second["id"]).exists()
    assert purchase.parties.agreement(second["id"])["status"] == "proposed"
    with capture(execute=True):
        for send in sends:
            send()
    for _ in range(3):
        confirm_all(capture)
    assert purchase.parties.agreement(first["id"])["status"] == "paid"
    assert not ChainTransaction.objects.filter(receipt_status=0).exists()


def test_a_direct_purchase_whose_fee_was_collected_counts_its_payment_alone(
        purchase, django_capture_on_commit_callbacks):
    """The first purchase's fee is mined, its payment not yet: what it will still pull is its payment alone."""
    capture = django_capture_on_commit_callbacks
    first = purchase.propose()
    balance = AMOUNT + FEE + AMOUNT // 2
    _keep_only(purchase, balance)
    purchase.accept(first["id"], capture)
    confirm_all(capture)  # the permit confirmed: the fee sent
    with capture(execute=False):
        poll_mined()  # the fee confirmed: the payment queued, not sent
    assert ChainTransaction.objects.get(agreement_id=first["id"], purpose="direct_payment").status == "queued"
    balance -= FEE
    second = purchase.propose()  # its fee permit signed at the token's nonce now

    refused = purchase.parties.seller_api.put(f"/usage-agreements/{second['id']}/accept")

    assert refused.status_code == 402, refused.content
    assert refused.json()["error"]["details"] == {"balance": balance, "required": AMOUNT + FEE, "committed": AMOUNT}


def test_an_activation_counts_the_wallets_direct_purchase_in_flight(purchase, django_capture_on_commit_callbacks):
    capture = django_capture_on_commit_callbacks
    escrow = purchase.parties.accepted_agreement()
    required = escrow["deposit_amount_atomic"] + escrow["infra_fee_atomic"]
    direct = purchase.propose()
    _keep_only(purchase, AMOUNT + FEE + required // 2)
    _accept_unsent(purchase, direct["id"], capture)

    with capture(execute=True):
        refused = purchase.parties.buyer_api.post(f"/usage-agreements/{escrow['id']}/activate-escrow",
                                                  purchase.parties.signed_activation(escrow["id"]))

    assert refused.status_code == 402, refused.content
    assert error_code(refused) == "insufficient_balance"
    assert refused.json()["error"]["details"]["committed"] == AMOUNT + FEE
    assert not ChainTransaction.objects.filter(agreement_id=escrow["id"]).exists()


def test_an_activation_signed_while_a_direct_purchases_fee_permit_is_in_flight_is_refused_not_reverted(
        purchase, django_capture_on_commit_callbacks):
    """The accepted direct purchase's fee permit, queued and not mined, carries the token's current permit nonce; an
    activation signed meanwhile carries it too: whichever runs first voids the other (the fee permit first: the
    activation reverted InsufficientAllowance, `activation_failed`). The activation is 409
    `wallet_activation_in_progress` naming the purchase, nothing queued; signed again once the purchase is paid, it
    activates."""
    capture = django_capture_on_commit_callbacks
    escrow = purchase.parties.accepted_agreement()
    direct = purchase.propose()
    submit = _accept_unsent(purchase, direct["id"], capture)

    with capture(execute=False) as activation:
        refused = purchase.parties.buyer_api.post(f"/usage-agreements/{escrow['id']}/activate-escrow",
                                                  purchase.parties.signed_activation(escrow["id"]))
    for callback in [*submit, *activation]:
        with capture(execute=True):
            callback()
    for _ in range(3):
        confirm_all(capture)

    assert purchase.parties.agreement(direct["id"])["status"] == "paid"
    assert purchase.parties.agreement(escrow["id"])["status"] == "accepted"
    assert refused.status_code == 409, refused.content
    assert error_code(refused) == "wallet_activation_in_progress"
    assert refused.json()["error"]["details"]["agreement_id"] == direct["id"]
    assert not ChainTransaction.objects.filter(agreement_id=escrow["id"]).exists()
    assert purchase.parties.activate(escrow["id"], capture).status_code == 202
    assert purchase.parties.agreement(escrow["id"])["status"] == "active"


def test_a_skill_payment_counts_the_wallets_direct_purchase_in_flight(
        purchase, settings, django_capture_on_commit_callbacks):
    capture = django_capture_on_commit_callbacks
    settings.INVOCATION_PAYMENT_WAIT_SECONDS = 0
    direct = purchase.propose()
    price = 20_000  # the service's skill
    _keep_only(purchase, AMOUNT + FEE + price // 2)
    _accept_unsent(purchase, direct["id"], capture)
    skill = f"/agents/{purchase.parties.seller.handle}/translate"
    network = network_of(purchase.chain)
    payment = sign_payment_required(Api().post(skill, {"input": {"text": "hello"}})["PAYMENT-REQUIRED"],
                                    purchase.buyer.key, max_amount_atomic=USDC, network=network,
                                    token_domain=network.token_domain)

    with capture(execute=True):
        refused = Api().post(skill, {"input": {"text": "hello"}}, headers={"X-Payment-Signature": payment})

    assert refused.status_code == 402, refused.content
    assert refused.json()["error"] == "insufficient_balance"
    assert refused.json()["details"]["committed"] == AMOUNT + FEE
    assert not ChainTransaction.objects.filter(purpose="invocation_payment").exists()


@pytest.mark.postgres
@pytest.mark.django_db(transaction=True)
def test_two_direct_purchases_of_one_wallet_accepted_at_once_are_counted_one_after_the_other(escrow_chain,
                                                                                            monkeypatch):
    """Two buyer agents of different owners pay from one wallet (the buyer's lock, which its owner policy's check
    takes, does not order them). Both accepts asked the chain before either queued anything (the same balance, nothing
    in flight), and the first to count the wallet's payments under way lingers before queueing: the wallet's lock
    keeps the second from counting until the first is queued, and it counts it: one paying, one 402
    insufficient_balance."""
    purchase = Purchase(escrow_chain)
    other_buyer = Api(issue_key(AgentFactory(is_buyer=True, is_seller=False, wallet_address=purchase.buyer.address)))
    proposed = other_buyer.post("/usage-agreements", purchase.body())
    assert proposed.status_code == 201, proposed.content
    agreements = [purchase.propose(), proposed.json()]
    _keep_only(purchase, AMOUNT + FEE + AMOUNT // 2)
    both_checked, precheck = threading.Barrier(2, timeout=10), agreement_services._direct_payment_precheck
    second_counted, counts, unmined = threading.Event(), [], escrow_selectors.wallet_unmined_amount

    def precheck_then_wait(agreement):
        preflight = precheck(agreement)
        both_checked.wait()
        return preflight

    def count_then_linger(**arguments):
        counts.append(unmined(**arguments))
        if len(counts) == 1:
            second_counted.wait(timeout=2)  # the lock holds the second off: it counts after the first is queued
        else:
            second_counted.set()
        return counts[-1]

    monkeypatch.setattr(agreement_services, "_direct_payment_precheck", precheck_then_wait)
    monkeypatch.setattr(escrow_selectors, "wallet_unmined_amount", count_then_linger)
    answers = {}

    def accept(agreement_id):
        try:
            answers[agreement_id] = purchase.parties.seller_api.put(f"/usage-agreements/{agreement_id}/accept")
        finally:
            connections.close_all()

    threads = [threading.Thread(target=accept, args=(agreement["id"],)) for agreement in agreements]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)

    assert sorted(answer.status_code for answer in answers.values()) == [200, 402], answers
    [refused] = [agreement_id for agreement_id, answer in answers.items() if answer.status_code == 402]
    assert error_code(answers[refused]) == "insufficient_balance"
    assert answers[refused].json()["error"]["details"]["committed"] == AMOUNT + FEE
    assert not ChainTransaction.objects.filter(agreement_id=refused).exists()
    assert UsageAgreement.objects.get(pk=refused).status == "proposed"


@pytest.mark.postgres
@pytest.mark.django_db(transaction=True)
def test_a_skill_payment_and_a_direct_purchase_of_one_buyer_at_once_wait_for_each_other_not_deadlock(
        escrow_chain, settings, monkeypatch):
    """A skill payment and a direct purchase's accept of one buyer agent take its row (its owner policy's check) and
    its wallet's lock: the payment, taking the wallet's first, held it while the accept held the buyer and waited
    for the wallet: a deadlock, one answered 503 `database_unavailable`. Both take the buyer's row first: the accept
    waits, then counts the payment."""
    settings.INVOCATION_PAYMENT_WAIT_SECONDS = 0
    purchase = Purchase(escrow_chain)
    direct = purchase.propose()
    skill = f"/agents/{purchase.parties.seller.handle}/translate"
    network = network_of(purchase.chain)
    payment = sign_payment_required(
        purchase.parties.buyer_api.post(skill, {"input": {"text": "hello"}})["PAYMENT-REQUIRED"], purchase.buyer.key,
        max_amount_atomic=USDC, network=network, token_domain=network.token_domain)
    accept_started, precheck, unmined = threading.Event(), agreement_services._direct_payment_precheck, \
        escrow_selectors.wallet_unmined_amount

    def precheck_then_go(agreement):
        preflight = precheck(agreement)
        accept_started.set()
        return preflight

    def count_once_the_accept_started(**arguments):
        if threading.current_thread().name == "payment":
            accept_started.wait(timeout=5)
            time.sleep(0.5)  # the accept reaches its locks meanwhile
        return unmined(**arguments)

    monkeypatch.setattr(agreement_services, "_direct_payment_precheck", precheck_then_go)
    monkeypatch.setattr(escrow_selectors, "wallet_unmined_amount", count_once_the_accept_started)
    answers = {}

    def run(name, call):
        try:
            answers[name] = call()
        finally:
            connections.close_all()

    threads = [
        threading.Thread(name="payment", target=run, args=("payment", lambda: purchase.parties.buyer_api.post(
            skill, {"input": {"text": "hello"}}, headers={"X-Payment-Signature": payment}))),
        threading.Thread(name="accept", target=run, args=("accept", lambda: purchase.parties.seller_api.put(
            f"/usage-agreements/{direct['id']}/accept"))),
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)

    assert answers["accept"].status_code == 200, answers["accept"].content
    assert answers["payment"].status_code not in (500, 503), answers["payment"].content
    assert ChainTransaction.objects.filter(purpose="invocation_payment").count() == 1


@pytest.mark.parametrize("report", [{"units": 1}, {"events": [{"units": 1}]}, {"units_used": 1, "completed": True}])
def test_a_seller_cannot_charge_a_direct_purchase_again_by_reporting_usage(purchase, django_capture_on_commit_callbacks,
                                                                           report):
    # Paid whole at accept: no escrow holds anything a report could be charged against, while paying or once paid.
    agreement = purchase.propose()
    purchase.accept(agreement["id"], django_capture_on_commit_callbacks)
    url = f"/usage-agreements/{agreement['id']}/record-usage"
    for step in range(4):
        refused = purchase.parties.seller_api.post(url, report, headers={"Idempotency-Key": f"again-{step}"})
        assert refused.status_code == 409 and error_code(refused) == "agreement_not_active", refused.content
        confirm_all(django_capture_on_commit_callbacks)
    assert purchase.parties.agreement(agreement["id"])["status"] == "paid"
    assert not UsageAgreement.objects.get(pk=agreement["id"]).usage_events.exists()


def test_a_fee_permit_for_more_than_the_fee_is_refused_at_proposal(purchase):
    """The fee permit grants the relayer an allowance of its value: one above the fee left the relayer (the platform
    treasury) free to take the rest of it from the buyer's wallet once the fee was collected. The buyer grants the
    fee, exactly: more is 400 `permit_value_too_high`, nothing recorded."""
    body = purchase.body()
    permit = body["fee_permit"]
    token_domain = network_of(purchase.chain).token_domain
    typed = typed_data.erc2612_permit(
        chain_id=purchase.chain.chain_id, token_address=purchase.chain.usdc.address, owner=purchase.buyer.address,
        spender=gateway.relayer_account().address, value=FEE * 10, nonce=permit["nonce"], deadline=permit["deadline"],
        token_name=token_domain.name, token_version=token_domain.version)
    body["fee_permit"] = {**permit, "value": FEE * 10,
                          "signature": typed_data.sign_typed_data(purchase.buyer.key, typed)}

    response = purchase.parties.buyer_api.post("/usage-agreements", body)

    assert response.status_code == 400, response.content
    assert error_code(response) == "permit_value_too_high"
    assert response.json()["error"]["details"] == {"field": "fee_permit", "required": FEE}
    assert not UsageAgreement.objects.filter(buyer__wallet_address__iexact=purchase.buyer.address).exists()


def test_a_seller_cannot_reject_a_direct_purchase_the_buyer_paid_itself(purchase, django_capture_on_commit_callbacks):
    """The buyer (or anyone holding its authorization) sends the payment to the seller before the seller answers:
    the price is with the seller. A reject then closed the purchase with the money gone and no purchase (the buyer's
    later cancel 409 `authorization_already_used`, an error logged). The reject is refused 409
    `purchase_paid_already` naming the transfer; accepted, the purchase is paid by it, as any accept of a payment made
    before it, and the fee collected."""
    capture = django_capture_on_commit_callbacks
    agreement = purchase.propose()
    buyer, seller, fee_recipient, treasury = purchase.balances()
    used_by = _use_authorization(purchase.chain, agreement["id"], purchase.buyer.address)

    refused = purchase.parties.seller_api.put(f"/usage-agreements/{agreement['id']}/reject", {"reason": "busy"})

    assert refused.status_code == 409, refused.content
    assert error_code(refused) == "purchase_paid_already"
    assert refused.json()["error"]["details"]["used_by"] == "0x" + bytes(used_by).hex().removeprefix("0x")
    assert purchase.parties.agreement(agreement["id"])["status"] == "proposed"
    assert purchase.accept(agreement["id"], capture)["status"] == "paying"
    for _ in range(3):
        confirm_all(capture)
    paid = purchase.parties.agreement(agreement["id"])
    assert paid["status"] == "paid", paid
    assert purchase.balances() == (buyer - AMOUNT - FEE, seller + AMOUNT, fee_recipient + FEE, treasury)


@pytest.mark.postgres
@pytest.mark.django_db(transaction=True)
def test_two_relayed_authorization_cancels_at_once_stay_within_the_buyers_cancel_budget(escrow_chain, settings,
                                                                                       monkeypatch):
    """The buyer asks for the cancel of two closed purchases' authorizations at once, with room in its relayed cancel
    budget for one: both counted the cancels queued before either was queued, and both were relayed at the relayer's
    gas (a buyer firing many at once went past the budget by as many). The count and the queueing are one turn per
    buyer: one is relayed, the other 429 `relay_cancel_budget_exhausted` with nothing queued."""
    settings.RELAY_AUTHORIZATION_CANCELS_PER_PARTY = 1
    purchase = Purchase(escrow_chain)
    agreements = [purchase.propose()["id"] for _ in range(2)]
    for agreement_id in agreements:
        assert purchase.parties.buyer_api.post(f"/usage-agreements/{agreement_id}/cancel").status_code == 200
    signatures = {agreement_id: _cancel_signature(purchase, agreement_id) for agreement_id in agreements}
    both_checked, preflight = threading.Barrier(2, timeout=10), relayer.transaction_preflight

    def preflight_then_wait(**arguments):
        preflight(**arguments)
        both_checked.wait()  # both passed the budget's first check before either queued its cancel

    monkeypatch.setattr(relayer, "transaction_preflight", preflight_then_wait)
    answers = {}

    def cancel(agreement_id):
        try:
            answers[agreement_id] = purchase.parties.buyer_api.post(
                f"/usage-agreements/{agreement_id}/cancel-payment-authorization",
                {"signature": signatures[agreement_id]})
        finally:
            connections.close_all()

    threads = [threading.Thread(target=cancel, args=(agreement_id,)) for agreement_id in agreements]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)

    assert sorted(answer.status_code for answer in answers.values()) == [202, 429], answers
    [refused] = [agreement_id for agreement_id, answer in answers.items() if answer.status_code == 429]
    assert error_code(answers[refused]) == "relay_cancel_budget_exhausted"
    assert not ChainTransaction.objects.filter(agreement_id=refused).exists()
    assert ChainTransaction.objects.filter(purpose="direct_auth_cancel").count() == 1


def _hash(tx) -> str:
    return "0x" + bytes(tx).hex().removeprefix("0x")


def _spend_fee_permit_nonce(purchase: Purchase) -> None:
    """The buyer signs another permit and gets it mined: its fee permit's nonce is spent, the fee cannot be taken."""
    usdc, owner, stranger = purchase.chain.usdc, purchase.buyer.address, purchase.chain.accounts.stranger.address
    domain = network_of(purchase.chain).token_domain
    typed = typed_data.erc2612_permit(chain_id=purchase.chain.chain_id, token_address=usdc.address, owner=owner,
                                      spender=stranger, value=0, nonce=usdc.functions.nonces(owner).call(),
                                      deadline=2**40, token_name=domain.name, token_version=domain.version)
    v, r, s = typed_data.split_signature(typed_data.sign_typed_data(purchase.buyer.key, typed))
    usdc.functions.permit(owner, stranger, 0, 2**40, v, bytes.fromhex(r[2:]), bytes.fromhex(s[2:])).transact(
        {"from": owner})
    mined_what_was_sent()


def _next_purchase_over_the_daily_cap_refused(purchase: Purchase) -> None:
    """With a daily cap of one purchase, the buyer's next one is refused: the price that reached the seller counts."""
    owner_api = Api(issue_owner_token(purchase.parties.buyer.owner))
    assert owner_api.put(f"/agents/{purchase.parties.buyer.pk}/policies",
                         {"daily_cap_atomic": AMOUNT + FEE}).status_code == 200
    refused = purchase.parties.buyer_api.post("/usage-agreements", purchase.body())
    assert refused.status_code == 403, refused.content
    assert refused.json()["error"]["details"]["rule"] == "daily_cap"


def test_a_purchase_paid_before_the_accept_whose_fee_cannot_be_collected_fails_saying_the_seller_was_paid(
        purchase, django_capture_on_commit_callbacks):
    """The buyer sends its payment to the seller itself, then spends its fee permit's nonce: at the accept the fee
    cannot be collected. No status says "paid, fee not collected" (paid counts the fee taken): the purchase fails, but
    no longer says nothing was charged; its reason and event name the transfer that paid the seller."""
    agreement = purchase.propose()
    buyer, seller, fee_recipient, treasury = purchase.balances()
    used_by = _hash(_use_authorization(purchase.chain, agreement["id"], purchase.buyer.address))
    _spend_fee_permit_nonce(purchase)

    failed = purchase.accept(agreement["id"], django_capture_on_commit_callbacks)

    assert failed["status"] == "payment_failed"
    assert used_by in failed["status_reason"] and "fee_permit_stale" in failed["status_reason"], failed
    assert "nothing was charged" not in failed["status_reason"]
    assert AgreementEvent.objects.filter(agreement_id=agreement["id"]).order_by("-pk").first().data == {
        "used_by": used_by, "code": "fee_permit_stale"}
    assert purchase.balances() == (buyer - AMOUNT, seller + AMOUNT, fee_recipient, treasury)




def test_a_direct_proposal_the_buyer_paid_that_expires_unanswered_is_paid_not_expired(
        purchase, django_capture_on_commit_callbacks):
    """The buyer (or anyone holding its authorization) sends the payment before the seller answers, and the seller
    lets the proposal expire: the sweep closed it expired, the price with the seller and no purchase, no record of
    the transfer, nothing counted against the buyer's caps (a seller that submitted the authorization itself got the
    money with no purchase to deliver and no fee, what the refused reject closed). The sweep asks the chain first:
    the purchase is accepted as paid by that transfer, its fee collected, as on the seller's accept."""
    capture = django_capture_on_commit_callbacks
    agreement = purchase.propose()
    buyer, seller, fee_recipient, treasury = purchase.balances()
    used_by = _hash(_use_authorization(purchase.chain, agreement["id"], purchase.buyer.address))
    UsageAgreement.objects.filter(pk=agreement["id"]).update(proposal_expires_at=timezone.now())

    with capture(execute=True):
        agreement_services.agreements_expire_proposals()
    for _ in range(3):
        confirm_all(capture)

    paid = purchase.parties.agreement(agreement["id"])
    assert paid["status"] == "paid", paid
    assert paid["payment_tx_hash"] == used_by
    assert purchase.balances() == (buyer - AMOUNT - FEE, seller + AMOUNT, fee_recipient + FEE, treasury)
    [accepted] = AgreementEvent.objects.filter(agreement_id=agreement["id"], to_status="accepted")
    assert accepted.data == {"used_by": used_by} and used_by in accepted.reason


def test_a_sellers_late_accept_of_a_direct_proposal_the_buyer_paid_is_paid_not_expired(
        purchase, django_capture_on_commit_callbacks):
    """As with the sweep: the seller's accept past the proposal's expiry proceeds as paid by the buyer's transfer."""
    capture = django_capture_on_commit_callbacks
    agreement = purchase.propose()
    _use_authorization(purchase.chain, agreement["id"], purchase.buyer.address)
    UsageAgreement.objects.filter(pk=agreement["id"]).update(proposal_expires_at=timezone.now())

    assert purchase.accept(agreement["id"], capture)["status"] == "paying"
    for _ in range(2):
        confirm_all(capture)
    assert purchase.parties.agreement(agreement["id"])["status"] == "paid"


def test_an_expiring_direct_proposal_whose_authorization_the_chain_cannot_say_is_left_for_the_next_sweep(
        purchase, monkeypatch):
    """A node that does not answer: the proposal is not expired blind (it may be paid), the next sweep decides."""
    agreement = purchase.propose()
    UsageAgreement.objects.filter(pk=agreement["id"]).update(proposal_expires_at=timezone.now())

    def unavailable(agreement, **kwargs):
        raise agreement_services.DependencyUnavailable("node down", code="chain_unavailable")

    monkeypatch.setattr(agreement_services, "_payment_authorization_use_reader", [unavailable])
    agreement_services.agreements_expire_proposals()
    assert purchase.parties.agreement(agreement["id"])["status"] == "proposed"
    monkeypatch.undo()
    agreement_services.agreements_expire_proposals()
    assert purchase.parties.agreement(agreement["id"])["status"] == "expired"


def test_a_buyers_cancel_of_a_direct_purchase_it_paid_itself_names_the_transfer_and_counts_it(purchase):
    """The buyer sends its payment to the seller, then cancels its proposal: the money is with the seller. The cancel
    said nothing of it and the price was counted nowhere (the buyer's caps let it spend it again). The cancel names
    the transfer (event `used_by`, the purchase's payment_tx_hash) and the price counts against the buyer's caps."""
    agreement = purchase.propose()
    used_by = _hash(_use_authorization(purchase.chain, agreement["id"], purchase.buyer.address))

    cancelled = purchase.parties.buyer_api.post(f"/usage-agreements/{agreement['id']}/cancel", {"reason": "oops"})

    assert cancelled.status_code == 200, cancelled.content
    assert cancelled.json()["status"] == "cancelled"
    assert cancelled.json()["payment_tx_hash"] == used_by
    event = AgreementEvent.objects.filter(agreement_id=agreement["id"]).order_by("-pk").first()
    assert event.to_status == "cancelled" and event.data == {"used_by": used_by} and used_by in event.reason
    _next_purchase_over_the_daily_cap_refused(purchase)


def test_a_purchase_paid_before_the_accept_whose_fee_cannot_be_collected_counts_its_price_against_the_caps(
        purchase, django_capture_on_commit_callbacks):
    """Failed for its fee, the purchase's price is with the seller all the same: out of the buyer's wallet, it counted
    nothing against the buyer's caps (a failed purchase counts only a fee collected), and the buyer spent past them.
    The failure keeps the transfer as the purchase's payment_tx_hash, and its price counts."""
    agreement = purchase.propose()
    used_by = _hash(_use_authorization(purchase.chain, agreement["id"], purchase.buyer.address))
    _spend_fee_permit_nonce(purchase)

    failed = purchase.accept(agreement["id"], django_capture_on_commit_callbacks)

    assert failed["status"] == "payment_failed" and failed["payment_tx_hash"] == used_by, failed
    _next_purchase_over_the_daily_cap_refused(purchase)


def _paid_right_after_reading(monkeypatch, purchase, agreement, reader: str) -> list[str]:
    """The buyer's payment mined right after `agreement_services.<reader>` read the chain (the race these tests
    make): the hashes of the transfers sent, filled as the reader runs."""
    read_the_chain, sent = getattr(agreement_services, reader), []

    def paid_right_after_the_read(*args, **kwargs):
        answer = read_the_chain(*args, **kwargs)
        sent.append(_hash(_use_authorization(purchase.chain, agreement["id"], purchase.buyer.address)))
        return answer

    monkeypatch.setattr(agreement_services, reader, paid_right_after_the_read)
    return sent


def test_a_direct_proposal_paid_while_the_expiry_sweep_closes_it_is_paid_not_expired(
        purchase, django_capture_on_commit_callbacks, monkeypatch):
    """The sweep asks the chain whether the buyer's authorization was used, then expires the proposal under its lock:
    a transfer mined in between was missed, the proposal closed expired with the price at the seller, no record and
    nothing counted. The sweep asks again once the proposal is closed: it is accepted as paid by that transfer."""
    capture = django_capture_on_commit_callbacks
    agreement = purchase.propose()
    buyer, seller, fee_recipient, treasury = purchase.balances()
    UsageAgreement.objects.filter(pk=agreement["id"]).update(proposal_expires_at=timezone.now())
    sent = _paid_right_after_reading(monkeypatch, purchase, agreement, "_direct_proposals_paid")
    with capture(execute=True):
        agreement_services.agreements_expire_proposals()
    for _ in range(3):
        confirm_all(capture)

    paid = purchase.parties.agreement(agreement["id"])
    assert paid["status"] == "paid", paid
    assert paid["payment_tx_hash"] == sent[0]
    assert purchase.balances() == (buyer - AMOUNT - FEE, seller + AMOUNT, fee_recipient + FEE, treasury)


@pytest.mark.parametrize(("close", "status"), [("cancel", "cancelled"), ("reject", "rejected")])
def test_a_direct_proposal_paid_while_it_is_closed_names_the_transfer_and_counts_it(purchase, monkeypatch, close,
                                                                                     status):
    """The cancel and the reject ask the chain whether the buyer's payment was made, then close the proposal under its
    lock: a transfer mined in between left it closed with the price at the seller, no record, nothing counted. Asked
    again once closed, the purchase names the transfer (an event's `used_by`, its payment_tx_hash) and counts it."""
    agreement = purchase.propose()
    sent = _paid_right_after_reading(monkeypatch, purchase, agreement, "_direct_payment_made_by")
    path = f"/usage-agreements/{agreement['id']}/{close}"
    api = purchase.parties.buyer_api.post if close == "cancel" else purchase.parties.seller_api.put
    closed = api(path, {"reason": "oops"})
    monkeypatch.undo()

    assert closed.status_code == 200, closed.content
    assert purchase.parties.agreement(agreement["id"])["status"] == status
    assert purchase.parties.agreement(agreement["id"])["payment_tx_hash"] == sent[0]
    event = AgreementEvent.objects.filter(agreement_id=agreement["id"]).order_by("-pk").first()
    assert event.data == {"used_by": sent[0]} and sent[0] in event.reason
    _next_purchase_over_the_daily_cap_refused(purchase)


def test_a_sellers_late_accept_of_a_direct_proposal_paid_while_it_is_read_is_paid_not_expired(
        purchase, django_capture_on_commit_callbacks, monkeypatch):
    """The seller's accept past the proposal's expiry asks the chain, then, under the lock, expires a proposal it found
    unpaid: a transfer mined in between left it expired with the price at the seller. Asked again once expired, it is
    reopened and goes on as paid by that transfer, as an accept past the expiry of a proposal paid before does."""
    capture = django_capture_on_commit_callbacks
    agreement = purchase.propose()
    UsageAgreement.objects.filter(pk=agreement["id"]).update(proposal_expires_at=timezone.now())
    sent = _paid_right_after_reading(monkeypatch, purchase, agreement, "_direct_payment_precheck")
    assert purchase.accept(agreement["id"], capture)["status"] == "paying"
    monkeypatch.undo()
    for _ in range(2):
        confirm_all(capture)
    paid = purchase.parties.agreement(agreement["id"])
    assert paid["status"] == "paid" and paid["payment_tx_hash"] == sent[0], paid


def test_a_direct_purchase_paid_while_it_awaited_approval_that_the_owner_rejects_names_the_transfer_and_counts_it(
        purchase, django_capture_on_commit_callbacks):
    """The buyer sends its payment to the seller while its owner's approval is pending; the owner rejects the purchase:
    it closed rejected with no chain read, the price at the seller, no record, nothing counted against the caps. Once
    rejected, the chain is asked: the purchase names the transfer and counts it."""
    owner_api = Api(issue_owner_token(purchase.parties.buyer.owner))
    owner_api.put(f"/agents/{purchase.parties.buyer.pk}/policies", {"approval_threshold_atomic": 1})
    held = purchase.propose()
    used_by = _hash(_use_authorization(purchase.chain, held["id"], purchase.buyer.address))

    approval = ApprovalRequest.objects.get(subject_id=held["id"])
    with django_capture_on_commit_callbacks(execute=True):
        rejected = owner_api.post(f"/agents/{purchase.parties.buyer.pk}/approvals/{approval.pk}/reject")
    assert rejected.status_code == 200, rejected.content

    agreement = purchase.parties.agreement(held["id"])
    assert agreement["status"] == "rejected" and agreement["payment_tx_hash"] == used_by, agreement
    _next_purchase_over_the_daily_cap_refused(purchase)


def test_a_purchase_paid_before_the_accept_whose_fee_collection_reverts_names_the_transfer_and_counts_it(
        purchase, django_capture_on_commit_callbacks):
    """Accepted as paid by the buyer's own transfer, the purchase's fee collection reverts (the buyer moved its funds):
    it failed saying nothing was charged, the price at the seller counted nowhere. It names the transfer and counts it."""
    capture = django_capture_on_commit_callbacks
    agreement = purchase.propose()
    used_by = _hash(_use_authorization(purchase.chain, agreement["id"], purchase.buyer.address))
    assert purchase.accept(agreement["id"], capture)["status"] == "paying"
    usdc, owner = purchase.chain.usdc, purchase.buyer.address
    usdc.functions.transfer(purchase.chain.accounts.stranger.address, usdc.functions.balanceOf(owner).call()).transact(
        {"from": owner})
    mined_what_was_sent()
    for _ in range(3):
        confirm_all(capture)
    failed = purchase.parties.agreement(agreement["id"])
    assert failed["status"] == "payment_failed", failed
    assert failed["payment_tx_hash"] == used_by and "nothing was charged" not in failed["status_reason"], failed
    fund(purchase.chain, purchase.buyer.address, 20 * USDC)
    _next_purchase_over_the_daily_cap_refused(purchase)


def _close_unpaid(purchase: Purchase, agreement_id: str, close: str) -> None:
    """The proposal closed as production closes it, its one read of the chain at the close finding nothing used."""
    if close == "expire":
        UsageAgreement.objects.filter(pk=agreement_id).update(proposal_expires_at=timezone.now())
        agreement_tasks.expire_proposals()
    elif close == "cancel":
        assert purchase.parties.buyer_api.post(f"/usage-agreements/{agreement_id}/cancel").status_code == 200
    else:
        assert purchase.parties.seller_api.put(f"/usage-agreements/{agreement_id}/reject").status_code == 200


@pytest.mark.parametrize(("close", "status"), [("cancel", "cancelled"), ("reject", "rejected"),
                                               ("expire", "expired")])
def test_a_closed_direct_proposals_authorization_used_after_the_close_is_found_and_counted(purchase, close, status):
    """The buyer's signed authorization is bearer until its validBefore: used after the close's one read of the chain
    (by the buyer, the seller, anyone holding it), the price reached the seller with no purchase naming the transfer
    and nothing counted against the buyer's caps. The watch (a beat task) reads every closed direct proposal whose
    authorization may still be used: the purchase names the transfer (an event's `used_by`, its payment_tx_hash) and
    its price counts; a second run changes nothing."""
    agreement = purchase.propose()
    _close_unpaid(purchase, agreement["id"], close)
    assert purchase.parties.agreement(agreement["id"])["payment_tx_hash"] == ""
    used_by = _hash(_use_authorization(purchase.chain, agreement["id"], purchase.chain.accounts.stranger.address))

    agreement_tasks.watch_closed_direct_proposals()
    agreement_tasks.watch_closed_direct_proposals()

    closed = purchase.parties.agreement(agreement["id"])
    assert closed["status"] == status and closed["payment_tx_hash"] == used_by, closed
    found = AgreementEvent.objects.filter(agreement_id=agreement["id"], data__used_by=used_by)
    assert found.count() == 1 and used_by in found.get().reason
    _next_purchase_over_the_daily_cap_refused(purchase)


def test_the_closed_proposals_watch_reads_the_oldest_checked_first_and_ends_once_the_authorization_ran_out(
        purchase, settings, monkeypatch):
    """Bounded per run (CLOSED_DIRECT_PROPOSALS_CHECKED_PER_SWEEP), the least recently read first, so each is read in
    turn; a node that does not answer leaves it for the next run; once its validBefore has passed on the chain's
    clock (and the margin a use needs to be found), one last read, then it is no longer read."""
    first, second = purchase.propose(), purchase.propose()
    for agreement in (first, second):
        _close_unpaid(purchase, agreement["id"], "cancel")
    reads, read_the_chain = [], agreement_services._payment_authorization_use_reader[0]

    def counted(agreement, **kwargs):
        reads.append(str(agreement.pk))
        return read_the_chain(agreement, **kwargs)

    monkeypatch.setattr(agreement_services, "_payment_authorization_use_reader", [counted])
    settings.CLOSED_DIRECT_PROPOSALS_CHECKED_PER_SWEEP = 1
    for _ in range(3):
        agreement_tasks.watch_closed_direct_proposals()
    assert reads == [first["id"], second["id"], first["id"]]

    def unavailable(agreement, **kwargs):
        raise agreement_services.DependencyUnavailable("node down", code="chain_unavailable")

    monkeypatch.setattr(agreement_services, "_payment_authorization_use_reader", [unavailable])
    agreement_tasks.watch_closed_direct_proposals()  # second's turn: not read, so still its turn
    monkeypatch.setattr(agreement_services, "_payment_authorization_use_reader", [counted])
    agreement_tasks.watch_closed_direct_proposals()
    assert reads[-1] == second["id"]

    valid_before = UsageAgreement.objects.get(pk=first["id"]).payment_authorization.valid_before
    purchase.chain.increase_time(valid_before - purchase.chain.now()
                                 + agreement_services.CLOSED_PROPOSAL_LATE_USE_MARGIN_SECONDS + 1)
    settings.CLOSED_DIRECT_PROPOSALS_CHECKED_PER_SWEEP = 10
    reads.clear()
    agreement_tasks.watch_closed_direct_proposals()
    agreement_tasks.watch_closed_direct_proposals()
    assert sorted(reads) == sorted([first["id"], second["id"]])


_UNDECIDED = ("marketplace_direct_authorizations_undecided", ())


def _assert_listed_undecided(purchase, agreement_id, monkeypatch, settings, admin_client) -> None:
    """The purchase's authorization is listed undecided: the dashboard's overdue item (our clock where the chain's
    went, overdue at once) and the gauge."""
    server_clock_drifted(monkeypatch, purchase.chain.now() - time.time())
    settings.OVERDUE_SUBMITTING_AFTER = timedelta(0)
    overdue = admin_client.get("/admin/dashboard/").context["overdue"]
    assert [item.subject for item in overdue if item.kind == "direct purchase's authorization undecided"] == [
        agreement_id]
    assert scrape(admin_client)[_UNDECIDED] == 1


def test_a_closed_proposals_use_a_node_that_pruned_its_logs_does_not_show_is_not_taken_for_none_when_the_watch_ends(
        purchase, settings, monkeypatch, admin_client):
    """A stranger uses a rejected purchase's authorization. The provider answers no log of it (it prunes old ranges)
    while the token counts it spent. The watch's last read, once the authorization ran out, took "spent, no use found
    at the confirmation depth" for "not used" and ended the watch: the price at the seller, no purchase naming it, never
    counted. Spent with no log of it even up to the head is no answer: the watch is not ended, the dashboard lists the
    purchase's authorization as undecided (and a gauge counts it), and the watch names the use once a node that has
    the logs answers."""
    agreement = purchase.propose()
    assert purchase.parties.seller_api.put(f"/usage-agreements/{agreement['id']}/reject").status_code == 200
    used_by = _hash(_use_authorization(purchase.chain, agreement["id"], purchase.chain.accounts.stranger.address))
    valid_before = UsageAgreement.objects.get(pk=agreement["id"]).payment_authorization.valid_before
    purchase.chain.increase_time(valid_before - purchase.chain.now()
                                 + agreement_services.CLOSED_PROPOSAL_LATE_USE_MARGIN_SECONDS + 1)
    purchase.chain.mine(1)
    with node_relayed(purchase.chain.node.rpc_url, settings) as relay:
        relay.rewrite(lambda call: call.get("method") == "eth_getLogs", lambda answer: {**answer, "result": []})
        agreement_tasks.watch_closed_direct_proposals()
    watched = UsageAgreement.objects.get(pk=agreement["id"])
    assert watched.payment_authorization_watch_ended_at is None and not watched.payment_tx_hash
    _assert_listed_undecided(purchase, agreement["id"], monkeypatch, settings, admin_client)

    agreement_tasks.watch_closed_direct_proposals()
    assert purchase.parties.agreement(agreement["id"])["payment_tx_hash"] == used_by
    assert scrape(admin_client)[_UNDECIDED] == 0


def _node_erroring(answer: dict) -> dict:
    return {"jsonrpc": "2.0", "id": answer.get("id"), "error": {"code": -32603, "message": "internal error"}}


def test_an_expiring_proposals_use_a_node_that_pruned_its_logs_does_not_show_is_surfaced_not_guessed(
        purchase, settings, monkeypatch, admin_client):
    """A stranger uses a direct proposal's authorization; the provider answers no log of it (old ranges pruned) while
    the token counts it spent. The expiry sweep leaves the proposal proposed (no verdict: it may be paid) with a
    warning each run, and nothing told an operator, even long past the authorization's validBefore. It is listed as
    the closed proposals' undecided authorizations are (the dashboard's overdue item, the gauge), nothing guessed; a
    node with the logs decides it."""
    agreement = purchase.propose()
    used_by = _hash(_use_authorization(purchase.chain, agreement["id"], purchase.chain.accounts.stranger.address))
    UsageAgreement.objects.filter(pk=agreement["id"]).update(proposal_expires_at=timezone.now())
    valid_before = UsageAgreement.objects.get(pk=agreement["id"]).payment_authorization.valid_before
    purchase.chain.increase_time(valid_before - purchase.chain.now()
                                 + agreement_services.CLOSED_PROPOSAL_LATE_USE_MARGIN_SECONDS + 1)
    purchase.chain.mine(1)
    with node_relayed(purchase.chain.node.rpc_url, settings) as relay:
        relay.rewrite(lambda call: call.get("method") == "eth_getLogs", lambda answer: {**answer, "result": []})
        agreement_tasks.expire_proposals()
    assert purchase.parties.agreement(agreement["id"])["status"] == "proposed"
    _assert_listed_undecided(purchase, agreement["id"], monkeypatch, settings, admin_client)

    agreement_tasks.expire_proposals()
    decided = purchase.parties.agreement(agreement["id"])
    assert decided["status"] != "proposed" and decided["payment_tx_hash"] == used_by, decided
    assert scrape(admin_client)[_UNDECIDED] == 0


def test_a_direct_purchase_paid_while_it_awaited_approval_rejected_with_the_broker_down_is_found_by_the_watch(
        purchase, django_capture_on_commit_callbacks, monkeypatch):
    """The owner rejects a purchase the buyer paid while it awaited approval; the broker refuses the task that reads
    the chain once it is rejected (the owner is answered all the same): the price stayed at the seller with no record.
    The watch of closed direct proposals reads it: the purchase names the transfer and counts it."""
    owner_api = Api(issue_owner_token(purchase.parties.buyer.owner))
    owner_api.put(f"/agents/{purchase.parties.buyer.pk}/policies", {"approval_threshold_atomic": 1})
    held = purchase.propose()
    used_by = _hash(_use_authorization(purchase.chain, held["id"], purchase.buyer.address))

    def broker_down(*args, **kwargs):
        raise ConnectionError("broker down")

    monkeypatch.setattr(agreement_tasks.recheck_closed_direct_proposal, "delay", broker_down)
    approval = ApprovalRequest.objects.get(subject_id=held["id"])
    with django_capture_on_commit_callbacks(execute=True):
        rejected = owner_api.post(f"/agents/{purchase.parties.buyer.pk}/approvals/{approval.pk}/reject")
    assert rejected.status_code == 200, rejected.content
    assert purchase.parties.agreement(held["id"])["payment_tx_hash"] == ""

    agreement_tasks.watch_closed_direct_proposals()

    agreement = purchase.parties.agreement(held["id"])
    assert agreement["status"] == "rejected" and agreement["payment_tx_hash"] == used_by, agreement
    _next_purchase_over_the_daily_cap_refused(purchase)


@pytest.mark.parametrize("found_by", ["watch", "cancel"])
def test_a_use_of_a_closed_proposals_authorization_a_reorg_takes_is_not_recorded(purchase, settings, found_by):
    """The watch of closed direct proposals, and a cancel's reads, asked the chain's head: a use mined in a block not
    yet at the confirmation depth was recorded for good (the purchase named the transfer, its price counted against
    the buyer's caps, the watch ended), and a reorg that took it left the purchase naming a transaction the chain
    never had, the price counted while it stayed in the buyer's wallet. A use is recorded once at the confirmation
    depth; until then the watch goes on, and records it once it is."""
    settings.CHAIN_CONFIRMATIONS = 3
    agreement = purchase.propose()
    if found_by == "watch":
        _close_unpaid(purchase, agreement["id"], "cancel")
    before_the_use = purchase.chain.snapshot()
    _use_authorization(purchase.chain, agreement["id"], purchase.chain.accounts.stranger.address)
    if found_by == "cancel":
        _close_unpaid(purchase, agreement["id"], "cancel")
    agreement_tasks.watch_closed_direct_proposals()

    purchase.chain.reorg(before_the_use)
    agreement_tasks.watch_closed_direct_proposals()

    closed = purchase.parties.agreement(agreement["id"])
    assert (closed["status"], closed["payment_tx_hash"]) == ("cancelled", ""), closed
    assert UsageAgreement.objects.get(pk=agreement["id"]).payment_authorization_watch_ended_at is None
    used_by = _hash(_use_authorization(purchase.chain, agreement["id"], purchase.chain.accounts.stranger.address))
    agreement_tasks.watch_closed_direct_proposals()
    assert purchase.parties.agreement(agreement["id"])["payment_tx_hash"] == ""  # not deep enough yet
    purchase.chain.mine(settings.CHAIN_CONFIRMATIONS - 1)
    agreement_tasks.watch_closed_direct_proposals()
    assert purchase.parties.agreement(agreement["id"])["payment_tx_hash"] == used_by


@pytest.mark.parametrize("found_by", ["watch", "cancel"])
def test_a_closed_direct_proposals_price_found_paid_a_day_after_its_proposal_counts_in_the_days_cap(
        purchase, found_by):
    """A closed proposal found paid counted its price from its proposal (no funds_moved_at): its authorization valid
    for a day and more, a use found a day after the proposal was out of the day's window at once, and the buyer's
    daily cap let it spend as much again on top of the price that had just left its wallet. It counts from when the
    transfer was found."""
    agreement = purchase.propose()
    UsageAgreement.objects.filter(pk=agreement["id"]).update(
        created_at=timezone.now() - timedelta(hours=24, minutes=5))
    if found_by == "watch":
        _close_unpaid(purchase, agreement["id"], "cancel")
    _use_authorization(purchase.chain, agreement["id"], purchase.chain.accounts.stranger.address)
    if found_by == "cancel":
        _close_unpaid(purchase, agreement["id"], "cancel")
    agreement_tasks.watch_closed_direct_proposals()
    assert purchase.parties.agreement(agreement["id"])["payment_tx_hash"]

    _next_purchase_over_the_daily_cap_refused(purchase)


def test_closed_direct_proposals_closed_run_after_run_do_not_starve_one_read_before(purchase, settings, monkeypatch):
    """The watch read those it never read first (payment_authorization_watched_at nulls first): proposals closed
    faster than it reads them (any buyer's, a cancel away each) kept an older one from ever being read again, its
    authorization free to be used unseen. One never read by the watch takes its turn from its close (the close's own
    read), so the one read before it, and not since, is read next."""
    settings.CLOSED_DIRECT_PROPOSALS_CHECKED_PER_SWEEP = 1
    reads, read_the_chain = [], agreement_services._payment_authorization_use_reader[0]

    def counted(agreement, **kwargs):
        reads.append(str(agreement.pk))
        return read_the_chain(agreement, **kwargs)

    monkeypatch.setattr(agreement_services, "_payment_authorization_use_reader", [counted])
    first = purchase.propose()
    _close_unpaid(purchase, first["id"], "cancel")
    agreement_tasks.watch_closed_direct_proposals()
    for _ in range(2):
        newer = purchase.propose()
        _close_unpaid(purchase, newer["id"], "cancel")
        reads.clear()
        agreement_tasks.watch_closed_direct_proposals()
        if reads == [first["id"]]:
            return
    pytest.fail(f"the proposal read first was not read again while newer ones closed: {reads}")


def test_the_parties_webhooks_name_the_transfer_that_paid_a_closed_proposal(purchase):
    """Found paid after its close, the purchase was sent to both parties' webhooks as its close again
    (`agreement.cancelled` from cancelled), the transfer named only in the reason's prose: a receiver could not tell
    "the price reached you" from a repeat of the close. The event's `data.used_by` names it, in the inbox alike."""
    for agent in (purchase.parties.buyer, purchase.parties.seller):
        WebhookSubscription.objects.create(agent=agent, url="https://hooks.example/agreements", secret="whsec_test")
    agreement = purchase.propose()
    _close_unpaid(purchase, agreement["id"], "cancel")
    used_by = _hash(_use_authorization(purchase.chain, agreement["id"], purchase.chain.accounts.stranger.address))

    agreement_tasks.watch_closed_direct_proposals()

    found = WebhookDelivery.objects.filter(payload__data__agreement_id=agreement["id"]).order_by("-created_at")[:2]
    assert {delivery.subscription.agent_id for delivery in found} == {purchase.parties.buyer.pk,
                                                                      purchase.parties.seller.pk}
    assert [delivery.payload["data"].get("used_by") for delivery in found] == [used_by, used_by]
    inbox = purchase.parties.seller_api.get(f"/agents/{purchase.parties.seller.pk}/events").json()
    assert any(item["payload"].get("used_by") == used_by for item in inbox), inbox


def test_a_direct_proposal_found_paid_as_it_expires_by_a_use_a_reorg_takes_stays_expired(
        purchase, django_capture_on_commit_callbacks, monkeypatch, settings):
    """The expiry sweep's second read (once the proposal is closed) asked the chain's head: a use mined right after
    its first read, not yet at the confirmation depth, reopened the expired proposal and accepted it as paid by that
    transfer; a reorg took the transfer, and the purchase went on all the same, the relayer paying the seller with the
    buyer's authorization (and taking the fee) for a proposal that expired unanswered and unpaid. The second read
    counts a use at the confirmation depth only; a newer one is the watch of closed direct proposals' to record."""
    settings.CHAIN_CONFIRMATIONS = 3
    capture = django_capture_on_commit_callbacks
    agreement = purchase.propose()
    balances = purchase.balances()
    UsageAgreement.objects.filter(pk=agreement["id"]).update(proposal_expires_at=timezone.now())
    before_the_use = purchase.chain.snapshot()
    _paid_right_after_reading(monkeypatch, purchase, agreement, "_direct_proposals_paid")
    with capture(execute=True):
        agreement_services.agreements_expire_proposals()
    monkeypatch.undo()

    purchase.chain.reorg(before_the_use)
    for _ in range(3):
        confirm_all(capture)
    agreement_tasks.watch_closed_direct_proposals()

    expired = purchase.parties.agreement(agreement["id"])
    assert (expired["status"], expired["payment_tx_hash"]) == ("expired", ""), expired
    assert purchase.balances() == balances


def test_an_accept_of_a_purchase_paid_by_a_use_a_reorg_takes_whose_fee_cannot_be_collected_names_no_transfer(
        purchase, django_capture_on_commit_callbacks, settings):
    """An accept of a purchase whose price reached the seller already but whose fee cannot be collected fails naming
    the transfer (its payment_tx_hash, counted against the buyer's caps). Read at the chain's head, a use a reorg took
    stayed named for good: a transaction the chain never had, its price counted while it is in the buyer's wallet.
    A use not yet at the confirmation depth is not acted on: the accept is 409 `payment_not_final`, to be sent again."""
    settings.CHAIN_CONFIRMATIONS = 3
    capture = django_capture_on_commit_callbacks
    agreement = purchase.propose()
    _spend_fee_permit_nonce(purchase)
    before_the_use = purchase.chain.snapshot()
    _use_authorization(purchase.chain, agreement["id"], purchase.chain.accounts.stranger.address)
    with capture(execute=True):
        early = purchase.parties.seller_api.put(f"/usage-agreements/{agreement['id']}/accept")
    assert (early.status_code, error_code(early)) == (409, "payment_not_final"), early.content

    purchase.chain.reorg(before_the_use)
    failed = purchase.accept(agreement["id"], capture)

    assert (failed["status"], failed["payment_tx_hash"]) == ("payment_failed", ""), failed
    assert "nothing was charged" in failed["status_reason"], failed


def test_an_expiring_direct_proposal_paid_by_a_use_not_yet_final_is_accepted_as_paid_once_it_is(
        purchase, django_capture_on_commit_callbacks, settings):
    """The sweep's first read finds the buyer's payment at the chain's head, not yet at the confirmation depth: the
    proposal is neither expired (its price is at the seller) nor accepted on a use a reorg may take; it is left
    proposed, and the run that finds the use final accepts it as paid by that transfer."""
    settings.CHAIN_CONFIRMATIONS = 3
    agreement = purchase.propose()
    used_by = _hash(_use_authorization(purchase.chain, agreement["id"], purchase.buyer.address))
    UsageAgreement.objects.filter(pk=agreement["id"]).update(proposal_expires_at=timezone.now())
    agreement_services.agreements_expire_proposals()
    assert purchase.parties.agreement(agreement["id"])["status"] == "proposed"

    purchase.chain.mine(settings.CHAIN_CONFIRMATIONS - 1)
    with django_capture_on_commit_callbacks(execute=True):
        agreement_services.agreements_expire_proposals()
    [accepted] = AgreementEvent.objects.filter(agreement_id=agreement["id"], to_status="accepted")
    assert accepted.data == {"used_by": used_by}
    assert purchase.parties.agreement(agreement["id"])["status"] == "paying"


@pytest.mark.parametrize("then", ["reorg", "final"])
@pytest.mark.parametrize("step", ["fee_permit", "fee"])
def test_a_fee_step_refused_after_a_use_not_yet_final_waits_for_it(
        purchase, django_capture_on_commit_callbacks, settings, step, then):
    """A use of the buyer's authorization mined after the seller's accept makes the fee step fail (`fee_permit`: the
    buyer spent the permit's nonce too; `fee`: the use left the buyer less than the fee). The failure's evidence read
    the use at the chain's head: a reorg that took it left the purchase failed naming, and counting, a transfer the
    chain no longer has. The step waits, queued, until the use is at the confirmation depth (`final`: then it fails
    naming it), or a reorg took it (`reorg`: then it is simulated again, and the purchase goes on as it can)."""
    settings.CHAIN_CONFIRMATIONS = 3
    capture = django_capture_on_commit_callbacks
    agreement = purchase.propose()
    sends = _accept_unsent(purchase, agreement["id"], capture)
    if step == "fee":
        with capture(execute=True):
            for send in sends:
                send()
        mined_what_was_sent()
        purchase.chain.mine(settings.CHAIN_CONFIRMATIONS - 1)
        with capture(execute=False) as held:
            poll_mined()  # the fee permit confirmed; the fee's transfer queued, not sent yet
        sends = list(held)
        assert ChainTransaction.objects.filter(agreement_id=agreement["id"], purpose="direct_fee").exists()
        _keep_only(purchase, AMOUNT)
    else:
        _spend_fee_permit_nonce(purchase)
    before_the_use = purchase.chain.snapshot()
    used_by = _hash(_use_authorization(purchase.chain, agreement["id"], purchase.chain.accounts.stranger.address))
    with capture(execute=True):
        for send in sends:
            send()
    confirm_all(capture)
    assert purchase.parties.agreement(agreement["id"])["status"] == "paying"  # the use is not final yet

    if then == "reorg":
        purchase.chain.reorg(before_the_use)
    else:
        purchase.chain.mine(settings.CHAIN_CONFIRMATIONS - 1)
    for _ in range(4):
        confirm_all(capture)
        purchase.chain.mine(settings.CHAIN_CONFIRMATIONS - 1)

    after = purchase.parties.agreement(agreement["id"])
    if then == "final":
        assert (after["status"], after["payment_tx_hash"]) == ("payment_failed", used_by), after
    else:  # `fee`: the buyer's funds are back, the fee is collected, the payment is short of funds and reverts
        assert (after["status"], after["payment_tx_hash"]) == ("payment_failed", ""), after
        assert {"fee_permit": "nothing was charged", "fee": "the fee is refunded"}[step] in after["status_reason"]


def _fee_step_fails(purchase: Purchase, agreement_id: str, capture, failed_at: str) -> None:
    """The purchase fails before its payment is sent, nothing charged: `fee_permit` (the buyer spent its permit's nonce
    after the accept), `fee` (its wallet short of the fee once the permit ran), `accept` (its permit's nonce spent
    before the accept: nothing sent). The buyer's authorization is left valid, and public once the seller accepted."""
    if failed_at == "accept":
        _spend_fee_permit_nonce(purchase)
        assert purchase.accept(agreement_id, capture)["status"] == "payment_failed"
        return
    sends = _accept_unsent(purchase, agreement_id, capture)
    if failed_at == "fee":
        with capture(execute=True):
            for send in sends:
                send()
        with capture(execute=False) as held:
            poll_mined()  # the fee permit confirmed; the fee's transfer queued, not sent yet
        sends = list(held)
        _keep_only(purchase, 0)
    else:
        _spend_fee_permit_nonce(purchase)
    with capture(execute=True):
        for send in sends:
            send()
    for _ in range(2):
        confirm_all(capture)
    failed = purchase.parties.agreement(agreement_id)
    assert (failed["status"], failed["payment_tx_hash"]) == ("payment_failed", ""), failed
    assert not ChainTransaction.objects.filter(agreement_id=agreement_id, purpose="direct_payment").exists()
    fund(purchase.chain, purchase.buyer.address, 20 * USDC)


@pytest.mark.parametrize("failed_at", ["fee_permit", "fee", "accept"])
def test_a_failed_direct_purchases_authorization_used_after_the_failure_is_found_and_counted(
        purchase, django_capture_on_commit_callbacks, failed_at):
    """A purchase that failed before its payment was sent leaves the buyer's authorization valid until its validBefore:
    the buyer, or anyone holding it (the seller saw it), gets it mined after the failure, and the price reaches the
    seller. Only a failed payment was watched (the relayer's watch of its failed transaction): this purchase named no
    transfer and its price counted nowhere, found a day after its accept. The watch of closed direct proposals (a beat
    task) reads it too: the purchase names the transfer, its price counts from when it was found, the parties told."""
    capture = django_capture_on_commit_callbacks
    for agent in (purchase.parties.buyer, purchase.parties.seller):
        WebhookSubscription.objects.create(agent=agent, url="https://hooks.example/agreements", secret="whsec_test")
    agreement = purchase.propose()
    _fee_step_fails(purchase, agreement["id"], capture, failed_at)
    a_day_ago = timezone.now() - timedelta(hours=24, minutes=5)
    UsageAgreement.objects.filter(pk=agreement["id"]).update(created_at=a_day_ago, accepted_at=a_day_ago,
                                                             funds_moved_at=a_day_ago)
    used_by = _hash(_use_authorization(purchase.chain, agreement["id"], purchase.chain.accounts.stranger.address))

    for _ in range(2):  # as beat runs them: the relayer's poll, the watch
        confirm_all(capture)
        with capture(execute=True):
            agreement_tasks.watch_closed_direct_proposals()

    failed = purchase.parties.agreement(agreement["id"])
    assert (failed["status"], failed["payment_tx_hash"]) == ("payment_failed", used_by), failed
    found = AgreementEvent.objects.filter(agreement_id=agreement["id"], data__used_by=used_by)
    assert found.count() == 1 and used_by in found.get().reason
    told = WebhookDelivery.objects.filter(payload__data__agreement_id=agreement["id"], payload__data__used_by=used_by)
    assert {delivery.subscription.agent_id for delivery in told} == {purchase.parties.buyer.pk,
                                                                     purchase.parties.seller.pk}
    assert UsageAgreement.objects.get(pk=agreement["id"]).payment_authorization_watch_ended_at  # found: not read again
    _next_purchase_over_the_daily_cap_refused(purchase)


def test_the_watch_of_a_failed_purchases_authorization_ends_once_it_ran_out(
        purchase, django_capture_on_commit_callbacks, monkeypatch):
    """A purchase whose fee step failed is read by the watch while its authorization may be used; once its validBefore
    (and the margin a use needs to be found) has passed on the chain's clock, one last read, then it is read no more."""
    agreement = purchase.propose()
    _fee_step_fails(purchase, agreement["id"], django_capture_on_commit_callbacks, "fee_permit")
    reads, read_the_chain = [], agreement_services._payment_authorization_use_reader[0]

    def counted(agreement, **kwargs):
        reads.append(str(agreement.pk))
        return read_the_chain(agreement, **kwargs)

    monkeypatch.setattr(agreement_services, "_payment_authorization_use_reader", [counted])
    agreement_tasks.watch_closed_direct_proposals()
    assert reads == [agreement["id"]]
    valid_before = UsageAgreement.objects.get(pk=agreement["id"]).payment_authorization.valid_before
    purchase.chain.increase_time(valid_before - purchase.chain.now()
                                 + agreement_services.CLOSED_PROPOSAL_LATE_USE_MARGIN_SECONDS + 1)

    for _ in range(2):
        agreement_tasks.watch_closed_direct_proposals()

    assert reads == [agreement["id"]] * 2
    assert UsageAgreement.objects.get(pk=agreement["id"]).payment_authorization_watch_ended_at


@pytest.mark.parametrize("failed_at", ["fee_permit", "fee"])
def test_an_operators_retry_of_a_failed_purchase_whose_authorization_was_used_since_is_refused(
        purchase, django_capture_on_commit_callbacks, settings, failed_at):
    """A purchase failed at a fee step, then the watch found its buyer's authorization used (it names that transfer,
    its payment_tx_hash): the chain shows the seller paid. An operator's retry of the failed step took the fee again
    and sent a payment the token refuses (or paid twice had the buyer signed anew): refused, 409
    `purchase_paid_already`, nothing queued, the purchase left as it is."""
    from tests.support.operators import operator_client

    capture = django_capture_on_commit_callbacks
    agreement = purchase.propose()
    _fee_step_fails(purchase, agreement["id"], capture, failed_at)
    used_by = _hash(_use_authorization(purchase.chain, agreement["id"], purchase.chain.accounts.stranger.address))
    for _ in range(2):
        confirm_all(capture)
        with capture(execute=True):
            agreement_tasks.watch_closed_direct_proposals()
    assert purchase.parties.agreement(agreement["id"])["payment_tx_hash"] == used_by
    failed = ChainTransaction.objects.get(agreement_id=agreement["id"], purpose=f"direct_{failed_at}", status="failed")
    settings.PASSWORD_HASHERS = ["django.contrib.auth.hashers.MD5PasswordHasher"]
    get_user_model().objects.create_superuser("operator", "operator@example.com", "operator-password")
    operator = operator_client("operator", "operator-password")

    with capture(execute=True):
        page = operator.post("/admin/escrow/chaintransaction/",
                             {"action": "retry_failed", "_selected_action": [str(failed.pk)]}, follow=True)

    told = [str(message) for message in page.context["messages"]]
    assert "Queued 0 transaction(s) again." in told and any("(purchase_paid_already)" in m for m in told), told
    assert ChainTransaction.objects.filter(agreement_id=agreement["id"], purpose=f"direct_{failed_at}").count() == 1
    after = purchase.parties.agreement(agreement["id"])
    assert (after["status"], after["payment_tx_hash"]) == ("payment_failed", used_by), after


# --- the chain's clock decides a direct purchase's signatures, not ours ------------------------------------------

@pytest.mark.parametrize("drift, validity", [(-SERVER_CLOCK_DRIFT, 24 * 3600), (SERVER_CLOCK_DRIFT, 800)],
                         ids=["server_behind", "server_ahead"])
def test_a_direct_purchase_valid_on_the_chains_clock_is_paid_whatever_the_servers_clock_says(
        purchase, monkeypatch, drift, validity, django_capture_on_commit_callbacks):
    """The payment's window and the fee permit's deadline were judged by the server's clock alone: one 700 s behind
    the chain's (which the token checks them by, and the SDK signs by) refused the SDK's day-long signatures, 400
    `payment_valid_too_long`; one 700 s ahead refused signatures valid 800 s, 400 `authorization_expired`, then
    `signature_expired` for the fee permit, then at the accept the proposal counted expired (409 `proposal_expired`:
    its acceptance deadline, the signatures' time on the chain's clock, was read on ours), then `fee_permit_expired`."""
    body = purchase.body(validity_seconds=validity)
    buyer, seller, fee_recipient, treasury = purchase.balances()
    server_clock_drifted(monkeypatch, drift)

    agreement = purchase.propose(body)
    assert purchase.accept(agreement["id"], django_capture_on_commit_callbacks)["status"] == "paying"
    for _ in range(3):  # fee permit, fee transfer, x402 payment
        confirm_all(django_capture_on_commit_callbacks)

    assert purchase.parties.agreement(agreement["id"])["status"] == "paid"
    assert purchase.balances() == (buyer - AMOUNT - FEE, seller + AMOUNT, fee_recipient + FEE, treasury)


def test_a_direct_payment_expired_on_the_chains_clock_is_refused_though_the_server_clock_is_behind(
        purchase, monkeypatch):
    """By the chain's clock the payment has 500 s left, less than the 600 s a seller needs to accept it; by the
    server's, 700 s behind, 1200 s: the proposal was recorded (201) and a seller's accept could only fail."""
    body = purchase.body(validity_seconds=900)
    server_clock_drifted(monkeypatch, -SERVER_CLOCK_DRIFT)
    purchase.chain.increase_time(400)

    response = purchase.parties.buyer_api.post("/usage-agreements", body)

    assert response.status_code == 400 and error_code(response) == "authorization_expired", response.content
    assert not UsageAgreement.objects.exists() and not ChainTransaction.objects.exists()


def test_a_fee_permit_expired_on_the_chains_clock_is_refused_though_the_server_clock_is_behind(
        purchase, monkeypatch):
    """The fee permit's deadline is 300 s away by the chain's clock (less than the 600 s required), 1000 s by the
    server's, 700 s behind: the proposal was recorded (201), its fee permit one the token refuses at the accept."""
    body = purchase.body()
    network = network_of(purchase.chain)
    permit = {**body["fee_permit"], "deadline": purchase.chain.now() + 300}
    permit["signature"] = typed_data.sign_typed_data(purchase.buyer.key, typed_data.erc2612_permit(
        chain_id=network.chain_id, token_address=network.token_address, owner=purchase.buyer.address,
        spender=network.gas_wallet, value=permit["value"], nonce=permit["nonce"], deadline=permit["deadline"],
        token_name=network.token_domain.name, token_version=network.token_domain.version))
    server_clock_drifted(monkeypatch, -SERVER_CLOCK_DRIFT)

    response = purchase.parties.buyer_api.post("/usage-agreements", {**body, "fee_permit": permit})

    assert response.status_code == 400 and error_code(response) == "signature_expired", response.content
    assert not UsageAgreement.objects.exists()


def test_a_direct_purchase_the_owner_approves_with_the_servers_clock_ahead_of_the_chains_is_offered_to_the_seller(
        purchase, monkeypatch):
    """The approval bounded the reopened proposal by its signatures' times read on our clock: 700 s ahead of the
    chain's, a payment with 800 s left on it counted run out, and the approved purchase expired (409
    `proposal_expired`)."""
    owner_api = Api(issue_owner_token(purchase.parties.buyer.owner))
    owner_api.put(f"/agents/{purchase.parties.buyer.pk}/policies", {"approval_threshold_atomic": 1})
    body = purchase.body(validity_seconds=800)
    server_clock_drifted(monkeypatch, SERVER_CLOCK_DRIFT)
    held = purchase.propose(body)
    assert held["status"] == "pending_approval"

    approval = ApprovalRequest.objects.get(subject_id=held["id"])
    approved = owner_api.post(f"/agents/{purchase.parties.buyer.pk}/approvals/{approval.pk}/approve")

    assert approved.status_code == 200, approved.content
    assert UsageAgreement.objects.get(pk=held["id"]).status == "proposed"


def test_an_operators_retry_of_a_failed_fee_refund_is_refused_once_the_purchase_was_found_paid(
        purchase, django_capture_on_commit_callbacks):
    """The payment failed (the buyer's wallet emptied once the fee was taken), the fee's refund failed too (the
    treasury without its float), then the buyer's authorization was found used (the purchase paid, the fee the
    platform's). An operator's retry of the failed refund queued it all the same: the buyer had its fee back on a paid
    purchase. Refused, 409 `no_longer_wanted`, nothing queued."""
    capture = django_capture_on_commit_callbacks
    chain = purchase.chain
    agreement = purchase.propose()
    buyer_funds = usdc_balance(chain, purchase.buyer.address)
    purchase.accept(agreement["id"], capture)
    confirm_all(capture)  # the permit confirmed; the fee's transfer sent
    _keep_only(purchase, 0)
    for _ in range(2):  # the fee confirmed -> the payment refused -> the fee's refund refused (no float)
        confirm_all(capture)
    [refund] = ChainTransaction.objects.filter(agreement_id=agreement["id"], purpose="direct_fee_refund")
    assert (ChainTransaction.objects.get(agreement_id=agreement["id"], purpose="direct_payment").status,
            refund.status) == ("failed", "failed")
    back = chain.usdc.functions.transfer(purchase.buyer.address, buyer_funds - FEE).transact(
        {"from": chain.accounts.stranger.address})
    assert chain.w3.eth.wait_for_transaction_receipt(back)["status"] == 1
    _use_authorization(chain, agreement["id"], chain.accounts.stranger.address)
    for _ in range(2):
        confirm_all(capture)
        with capture(execute=True):
            relayer.transactions_recheck_watched()
    assert purchase.parties.agreement(agreement["id"])["status"] == "paid"
    fund(chain, purchase.treasury, USDC)
    before = usdc_balance(chain, purchase.buyer.address)

    with pytest.raises(relayer.Conflict) as refused:
        relayer.transaction_retry(tx=refund, operator=get_user_model().objects.get(username=staff_account()))
    assert refused.value.code == "no_longer_wanted"
    confirm_all(capture)
    assert ChainTransaction.objects.filter(agreement_id=agreement["id"], purpose="direct_fee_refund").count() == 1
    assert usdc_balance(chain, purchase.buyer.address) == before


# --- a payment not yet valid, and the platform's ceiling lowered since the proposal --------------------------------

def _signed_valid_after(purchase: Purchase, valid_after: int) -> dict:
    """A proposal's body whose payment authorization the buyer signed valid only after `valid_after` (the SDK signs
    validAfter 0: a client of its own signs what it likes)."""
    body = purchase.body()
    payload = json.loads(base64.b64decode(body["payment_header"]))
    authorization = {**payload["payload"]["authorization"], "validAfter": str(valid_after)}
    typed = typed_data.transfer_with_authorization(
        chain_id=purchase.chain.chain_id, token_address=purchase.chain.usdc.address,
        from_address=authorization["from"], to_address=authorization["to"], value=int(authorization["value"]),
        valid_after=valid_after, valid_before=int(authorization["validBefore"]), nonce=authorization["nonce"],
        token_name=purchase.chain.usdc.functions.name().call())
    payload["payload"] = {"authorization": authorization,
                          "signature": typed_data.sign_typed_data(purchase.buyer.key, typed)}
    return {**body, "payment_header": base64.b64encode(json.dumps(payload).encode()).decode()}


def _approval_asked(purchase: Purchase) -> Api:
    owner_api = Api(issue_owner_token(purchase.parties.buyer.owner))
    owner_api.put(f"/agents/{purchase.parties.buyer.pk}/policies", {"approval_threshold_atomic": 1})
    return owner_api


@pytest.mark.parametrize("approval", [False, True], ids=["no_approval", "owner_approves"])
@pytest.mark.parametrize("drift", [0, -SERVER_CLOCK_DRIFT, SERVER_CLOCK_DRIFT],
                         ids=["clocks_agree", "server_behind", "server_ahead"])
def test_a_direct_payment_not_yet_valid_on_the_chains_clock_is_refused_with_nothing_recorded(
        purchase, monkeypatch, drift, approval):
    """A payment valid only from 300 s ahead on the chain's clock (by which the token checks validAfter; by the
    server's clock, 700 s ahead, it would be valid already): relayed at the accept it reverts, the fee taken and
    refunded at the treasury's gas. Refused at proposal, 400 `authorization_not_yet_valid` naming the field, nothing
    recorded (no purchase, no authorization, no approval request for the owner)."""
    if approval:
        _approval_asked(purchase)
    body = _signed_valid_after(purchase, purchase.chain.now() + 300)
    server_clock_drifted(monkeypatch, drift)

    response = purchase.parties.buyer_api.post("/usage-agreements", body)

    assert response.status_code == 400 and error_code(response) == "authorization_not_yet_valid", response.content
    assert response.json()["error"]["details"]["field"] == "payment_header"
    assert not UsageAgreement.objects.exists() and not ApprovalRequest.objects.exists()
    assert not ChainTransaction.objects.exists()


def test_a_direct_payment_valid_only_from_the_next_block_is_refused_and_one_valid_before_it_is_paid(
        purchase, django_capture_on_commit_callbacks):
    """The token takes an authorization in a block whose timestamp is strictly after validAfter. The proposal
    refused validAfter only past the next block's time, so one valid from exactly that time was recorded (201),
    though a payment mined in that block reverts. Refused (400 `authorization_not_yet_valid`); one valid from the
    second before is recorded and paid, its payment mined, never reverted."""
    chain = purchase.chain
    # The chain's clock ahead of ours: the server's next block is the latest block's next second, whatever the wall
    # clock does meanwhile (`chain_clock.next_block_clock_for_refusal`).
    latest = chain.increase_time(1000)
    next_block = latest + 1

    at = purchase.parties.buyer_api.post("/usage-agreements", _signed_valid_after(purchase, next_block))
    assert at.status_code == 400 and error_code(at) == "authorization_not_yet_valid", at.content
    assert not UsageAgreement.objects.exists()

    agreement = purchase.propose(_signed_valid_after(purchase, next_block - 1))
    buyer, seller, fee_recipient, treasury = purchase.balances()
    # That next block mined before the accept (a live chain's come every few seconds): the accept's simulation runs
    # at the latest block's time, which an idle chain would leave at validAfter itself (leftover: it fails the
    # purchase, nothing charged, where a transaction sent then would be mined valid).
    chain.set_next_timestamp(next_block)
    chain.mine()
    accepted = purchase.accept(agreement["id"], django_capture_on_commit_callbacks)
    assert accepted["status"] == "paying", accepted
    for _ in range(3):  # fee permit, fee transfer, x402 payment
        confirm_all(django_capture_on_commit_callbacks)
    assert purchase.parties.agreement(agreement["id"])["status"] == "paid"
    assert purchase.balances() == (buyer - AMOUNT - FEE, seller + AMOUNT, fee_recipient + FEE, treasury)
    assert not RelayRevert.objects.exists()


@pytest.mark.parametrize("approval", [False, True], ids=["no_approval", "owner_approved"])
def test_a_direct_purchase_above_a_since_lowered_platform_limit_is_refused_at_accept_with_nothing_moved(
        purchase, settings, approval, django_capture_on_commit_callbacks):
    """Proposed (and approved) under a higher AGREEMENT_MAX_AMOUNT, a direct purchase was still paid at the accept
    once the operator lowered it: only the proposal checked the ceiling. The ceiling in force when the money moves
    binds: the accept is 400 `amount_too_large` (as a proposal or a skill's payment above it), the purchase stays
    proposed, nothing queued or moved, the buyer's authorization unused; at the limit it is paid."""
    capture = django_capture_on_commit_callbacks
    if approval:
        owner_api = _approval_asked(purchase)
    agreement = purchase.propose()
    if approval:
        approval_request = ApprovalRequest.objects.get(subject_id=agreement["id"])
        approved = owner_api.post(f"/agents/{purchase.parties.buyer.pk}/approvals/{approval_request.pk}/approve")
        assert approved.status_code == 200, approved.content
    events = AgreementEvent.objects.filter(agreement_id=agreement["id"]).count()
    before = purchase.balances()
    settings.AGREEMENT_MAX_AMOUNT = AMOUNT - 1

    with capture(execute=True):
        refused = purchase.parties.seller_api.put(f"/usage-agreements/{agreement['id']}/accept")

    assert refused.status_code == 400 and error_code(refused) == "amount_too_large", refused.content
    assert refused.json()["error"]["details"] == {"max_amount_atomic": AMOUNT - 1}
    after = UsageAgreement.objects.get(pk=agreement["id"])
    assert (after.status, after.funds_moved_at) == ("proposed", None)
    assert AgreementEvent.objects.filter(agreement_id=agreement["id"]).count() == events
    assert not ChainTransaction.objects.exists() and purchase.balances() == before
    assert purchase.parties.agreement(agreement["id"])["status"] == "proposed"
    settings.AGREEMENT_MAX_AMOUNT = AMOUNT
    assert purchase.accept(agreement["id"], capture)["status"] == "paying"


def test_a_direct_proposal_the_buyer_paid_above_a_since_lowered_limit_expires_failed_naming_the_transfer(
        purchase, settings, django_capture_on_commit_callbacks):
    """The buyer sent its payment itself, the operator lowered AGREEMENT_MAX_AMOUNT below its price, and the seller
    let the proposal expire: the sweep accepts a paid proposal to collect its fee, but the ceiling in force binds the
    money the platform moves. It fails naming the transfer (the price is at the seller, counted against the buyer's
    caps), no fee collected, nothing queued."""
    capture = django_capture_on_commit_callbacks
    agreement = purchase.propose()
    used_by = _hash(_use_authorization(purchase.chain, agreement["id"], purchase.buyer.address))
    before = purchase.balances()
    settings.AGREEMENT_MAX_AMOUNT = AMOUNT - 1
    UsageAgreement.objects.filter(pk=agreement["id"]).update(proposal_expires_at=timezone.now())

    with capture(execute=True):
        agreement_services.agreements_expire_proposals()

    failed = purchase.parties.agreement(agreement["id"])
    assert (failed["status"], failed["payment_tx_hash"]) == ("payment_failed", used_by), failed
    assert "amount_too_large" in failed["status_reason"]
    assert not ChainTransaction.objects.filter(agreement_id=agreement["id"]).exists()
    assert purchase.balances() == before


def test_a_direct_purchase_is_not_judged_by_a_node_behind_the_chain(purchase, settings):
    """The proposal judges the payment's window by the chain's clock alone: a node 900 s behind the chain took a
    payment with 500 s left (201), counted its acceptance deadline 900 s too late, and simulated the accept's payment
    at its old time, so that the fee was taken and the payment reverted on the chain (the treasury refunding the fee,
    every step at the relayer's gas). A node further behind our clock than CHAIN_CLOCK_MAX_LAG_SECONDS judges none:
    503 `chain_unavailable` (`node_behind`), nothing recorded; once it is back, the purchase is taken."""
    from tests.support.rpc_relay import node_behind

    settings.CHAIN_CLOCK_MAX_LAG_SECONDS = 30
    body = purchase.body(validity_seconds=500)

    with node_behind(purchase.chain.node.rpc_url, settings, 900):
        response = purchase.parties.buyer_api.post("/usage-agreements", body)

    assert (response.status_code, error_code(response)) == (503, "chain_unavailable"), response.content
    assert response.json()["error"]["details"]["reason"] == "node_behind"
    assert not UsageAgreement.objects.exists() and not ChainTransaction.objects.exists()
    assert purchase.parties.buyer_api.post("/usage-agreements", purchase.body()).status_code == 201


def test_a_direct_purchase_failed_at_accept_tells_the_parties_its_machine_readable_code(
        purchase, django_capture_on_commit_callbacks):
    """A payment that cannot run fails the purchase at its accept; the parties' webhooks and inbox said why only in
    the reason's prose ("payment cannot run, nothing was charged: authorization_already_used: ..."): the event's
    `data.code` names it."""
    for agent in (purchase.parties.buyer, purchase.parties.seller):
        WebhookSubscription.objects.create(agent=agent, url="https://hooks.example/agreements", secret="whsec_test")
    body = purchase.body()
    agreement = purchase.propose(body)
    purchase.cancel_authorization(body)
    failed_at_accept(purchase, agreement["id"], django_capture_on_commit_callbacks,
                     reason="authorization_already_used", balances=purchase.balances())

    found = WebhookDelivery.objects.filter(payload__data__agreement_id=agreement["id"],
                                           event_type="agreement.payment_failed")
    assert found.count() == 2
    assert [delivery.payload["data"].get("code") for delivery in found] == ["authorization_already_used"] * 2
    inbox = purchase.parties.buyer_api.get(f"/agents/{purchase.parties.buyer.pk}/events").json()
    [shown] = [item for item in inbox if item["type"] == "agreement.payment_failed"]
    assert shown["payload"].get("code") == "authorization_already_used", shown


def test_a_failed_purchase_tells_its_code_in_the_agreement_itself(purchase, django_capture_on_commit_callbacks):
    """The machine-readable code of a payment_failed purchase is the agreement's own (`status_code`), not only its
    event's: a client polling GET /usage-agreements/{id} branches on it without parsing status_reason."""
    body = purchase.body()
    agreement = purchase.propose(body)
    assert agreement["status_code"] == ""
    purchase.cancel_authorization(body)
    purchase.accept(agreement["id"], django_capture_on_commit_callbacks)

    failed = purchase.parties.agreement(agreement["id"])
    assert failed["status"] == "payment_failed" and failed["status_code"] == "authorization_already_used", failed
    event = AgreementEvent.objects.filter(agreement_id=agreement["id"]).order_by("-pk").first()
    assert event.data["code"] == failed["status_code"]
