"""Masumi purchases end to end on Anvil, against a real Masumi-style seller service started by the test."""

import hashlib
import json
import logging
import threading
import time
from collections import deque
from datetime import timedelta

import pytest
from django.db import connection
from django.utils import timezone
from django.contrib.auth.models import Permission
from django.core.management import call_command

from agreements.models import AgreementEvent, UsageEvent, WebhookDelivery, WebhookSubscription
from catalog.models import Service
from escrow import chain as gateway
from escrow import indexer, purchases, relayer, settlement
from escrow import selectors as escrow_selectors
from escrow.models import ChainTransaction, MasumiPurchase, TxPurpose
from marketplace import shown_text
from marketplace.errors import Conflict
from sdk.typed_data import sign_typed_data
from tests.catalog.factories import UserFactory, issue_owner_token
from tests.conftest import Api, codes_at, error_code
from tests.escrow.conftest import Escrows, escrow_terms
from tests.escrow.flow import USDC, Parties, confirm_all, deadline_clock, pay_fees, sign_activation, usdc_balance
from tests.escrow.test_relayer_faults import rpc_relay  # noqa: F401
from tests.support.http_server import RecordingServer
from tests.support.masumi_service import MasumiService, result_for
from tests.support.poison_rows import first_row_always_fails, sweep_runs

pytestmark = [pytest.mark.chain, pytest.mark.django_db]

PRICE = 5 * USDC
FEE = 103_000  # max(ceil(5 USDC × 2%) + 0.003, 0.10) USDC
INPUT = {"text": "the quarterly report", "language": "en"}


@pytest.fixture
def seller_service():
    service = MasumiService().start()
    yield service
    service.stop()


def run(capture, fn, **kwargs):
    """A beat task's service, with its after-commit work, then one relayer poll."""
    with capture(execute=True):
        result = fn(**kwargs)
    confirm_all(capture)
    return result


class Purchase:
    """A buyer who bought one job from the Masumi service and got the funds locked."""

    def __init__(self, chain, capture, seller_service, masumi_protocol_version="1", parties=None, input_data=INPUT,
                 **timers):
        """`parties`: another purchase's (the same buyer and service); else new ones."""
        self.chain, self.capture = chain, capture
        self.parties = parties or Parties(
            chain, upstream_base_url=seller_service.url, upstream_protocol="masumi",
            masumi_protocol_version=masumi_protocol_version, skills=[],
            pricing={"type": "per_call", "unit_name": "job", "unit_price_atomic": PRICE, "token": "USDC"})
        now = deadline_clock(chain)
        self.timers = {"payByTime": now + 600, "submitResultTime": now + 1200, "unlockTime": now + 2400,
                       "externalDisputeUnlockTime": now + 4800, **timers}
        self.balances = self.read_balances()
        created = self.parties.buyer_api.post("/purchase", {
            "network": "Preprod", "agentIdentifier": str(self.parties.service.pk), "input_data": input_data,
            "identifierFromPurchaser": "order-17",
            **{name: str(seconds * 1000) for name, seconds in self.timers.items()}})
        assert created.status_code == 200, created.content
        self.created = created.json()["data"]
        self.id = self.created["blockchainIdentifier"]
        signed = sign_activation(chain, self.created["ActivationPackage"],
                                 self.parties.agreement(self.created["agreementId"]), self.parties.buyer_account.key)
        with capture(execute=True):
            locked = self.parties.buyer_api.post("/purchase/lock-funds", {
                "network": "Preprod", "blockchainIdentifier": self.id, **signed})
        assert locked.status_code == 202, locked.content
        confirm_all(capture)

    def read_balances(self) -> dict:
        return {name: usdc_balance(self.chain, address) for name, address in {
            "buyer": self.parties.buyer_account.address, "seller": self.parties.seller_account.address,
            "fee": self.chain.accounts.fee_recipient.address, "escrow": self.chain.addresses["escrow"]}.items()}

    def get(self) -> dict:
        response = self.parties.buyer_api.get("/purchase", {"network": "Preprod", "blockchainIdentifier": self.id})
        assert response.status_code == 200, response.content
        [purchase] = response.json()["data"]["Purchases"]
        return purchase

    def onchain(self) -> dict:
        return self.parties.buyer_api.get(f"/usage-agreements/{self.created['agreementId']}/escrow-status",
                                          {"verify": "true"}).json()["onchain"]

    def tick(self) -> dict:
        """Both beat tasks of Masumi purchases: the sellers' jobs, then the rest."""
        return {**run(self.capture, purchases.purchases_jobs_tick), **run(self.capture, purchases.purchases_tick)}

    def settle(self) -> dict:
        return run(self.capture, settlement.settlement_tick)

    def assert_moved(self, *, seller: int, buyer: int) -> None:
        """On-chain balances against the ones before the purchase: the fee is taken once, the escrow is empty."""
        pay_fees(self.chain)
        after = self.read_balances()
        assert after["seller"] - self.balances["seller"] == seller
        assert after["buyer"] - self.balances["buyer"] == buyer - PRICE - FEE
        assert after["fee"] - self.balances["fee"] == FEE
        assert after["escrow"] == self.balances["escrow"] == 0


def test_result_before_submit_time_pays_the_seller_after_unlock_time(
        escrow_chain, seller_service, django_capture_on_commit_callbacks):
    chain = escrow_chain
    purchase = Purchase(chain, django_capture_on_commit_callbacks, seller_service)
    assert purchase.created["onChainState"] is None
    # MIP-004, as the masumi library computes it (tests/compat checks against the library): sha256(id;JCS(input)).
    assert purchase.created["inputHash"] == hashlib.sha256(
        b'order-17;{"language":"en","text":"the quarterly report"}').hexdigest()
    assert purchase.created["PaidFunds"] == [{"amount": str(PRICE), "unit": "USDC"}]
    assert purchase.created["ActivationPackage"]["deadline"] == purchase.timers["payByTime"]
    assert purchase.created["submitResultTime"] == str(purchase.timers["submitResultTime"] * 1000)
    locked = purchase.get()
    assert locked["onChainState"] == "FundsLocked" and locked["jobId"] is None
    onchain = purchase.onchain()
    assert onchain["state"] == "active" and int(onchain["depositAmount"]) == PRICE
    assert int(onchain["expiresAt"]) == purchase.timers["submitResultTime"]

    assert purchase.tick()["started"] == 1  # start_job, then a first status check: still running
    assert seller_service.started == [INPUT]
    running = purchase.get()
    assert running["jobId"] and running["paymentId"] == f"pay-{running['jobId']}"
    assert running["jobStatus"] == "running" and running["onChainState"] == "FundsLocked"

    assert purchase.tick()["results"] == 1
    submitted = purchase.get()
    # sha256(id;result), the result JSON-escaped (its quotes as \").
    result_hash = hashlib.sha256(f"order-17;{json.dumps(result_for(INPUT))[1:-1]}".encode()).hexdigest()
    assert submitted["onChainState"] == "ResultSubmitted"
    assert (submitted["result"], submitted["resultHash"]) == (result_for(INPUT), result_hash)
    onchain = purchase.onchain()
    assert onchain["state"] == "proposed" and onchain["usageDigest"] == "0x" + result_hash
    assert int(onchain["settledAmount"]) == PRICE
    assert int(onchain["challengeDeadline"]) >= purchase.timers["unlockTime"]
    assert purchase.tick() == {"expired": 0, "started": 0, "results": 0, "disputed": 0,
                               "released": 0, "refunding": 0}  # nothing twice

    chain.increase_time(purchase.timers["unlockTime"] - chain.now() - 5)
    assert purchase.settle()["finalizing"] == 0  # before unlockTime the seller is not paid
    chain.increase_time(int(onchain["challengeDeadline"]) - chain.now())
    assert purchase.settle()["finalizing"] == 1
    assert purchase.get()["onChainState"] == "Withdrawn"
    purchase.assert_moved(seller=PRICE, buyer=0)
    late = purchase.parties.buyer_api.patch("/purchase", {
        "network": "Preprod", "blockchainIdentifier": purchase.id,
        "signature": sign_typed_data(purchase.parties.buyer_account.key, submitted["refundRequestTypedData"])})
    assert late.status_code == 409 and error_code(late) == "refund_not_possible"
    call_command("reconcile")


def test_no_result_by_submit_time_refunds_the_buyer(escrow_chain, seller_service,
                                                     django_capture_on_commit_callbacks):
    chain = escrow_chain
    seller_service.mode = "never"
    purchase = Purchase(chain, django_capture_on_commit_callbacks, seller_service)
    assert purchase.tick()["started"] == 1
    assert purchase.tick()["results"] == 0
    assert purchase.get()["jobStatus"] == "running"

    chain.increase_time(purchase.timers["submitResultTime"] - chain.now())
    seller_service.mode = "result"  # too late: a result after submitResultTime is not taken
    assert purchase.tick()["results"] == 0
    assert purchase.settle()["reclaiming"] == 0  # the contract's reclaim grace is still running
    chain.increase_time(chain.reclaim_grace)
    assert purchase.settle()["reclaiming"] == 1
    refunded = purchase.get()
    assert refunded["onChainState"] == "RefundWithdrawn" and refunded["resultHash"] is None
    assert purchase.onchain()["state"] == "reclaimed"
    purchase.assert_moved(seller=0, buyer=PRICE)
    call_command("reconcile")


def test_a_result_the_seller_answers_after_submit_result_time_is_not_charged_and_the_buyer_is_refunded(
        escrow_chain, seller_service, django_capture_on_commit_callbacks):
    """The tick checked submitResultTime before calling the seller's /status (a call that may last
    MASUMI_SERVICE_TIMEOUT), then charged and proposed the result it answered with no second check."""
    chain = escrow_chain
    purchase = Purchase(chain, django_capture_on_commit_callbacks, seller_service)
    assert purchase.tick()["started"] == 1  # started, then running
    seller_service.before_status = lambda: chain.increase_time(purchase.timers["submitResultTime"] - chain.now())
    assert purchase.tick()["results"] == 0  # "completed", answered once submitResultTime had passed
    seller_service.before_status = None
    late = row(purchase)
    assert (late.result, late.result_hash, late.job_status) == ("", "", "completed")
    assert "submitResultTime" in late.last_error
    assert not UsageEvent.objects.filter(agreement_id=late.agreement_id).exists()
    assert not ChainTransaction.objects.filter(agreement_id=late.agreement_id,
                                               purpose=TxPurpose.PROPOSE_SETTLEMENT).exists()
    shown = purchase.get()
    assert shown["onChainState"] == "FundsLocked" and shown["NextAction"]["errorType"] == "SellerServiceError"
    submitted = purchase.parties.seller_api.post("/payment/submit-result", {
        "network": "Preprod", "blockchainIdentifier": purchase.id, "submitResultHash": "c" * 64})
    assert submitted.status_code == 409 and error_code(submitted) == "submit_result_time_passed"

    assert purchase.settle()["reclaiming"] == 0  # the contract's reclaim grace is still running
    chain.increase_time(chain.reclaim_grace)
    assert purchase.settle()["reclaiming"] == 1
    assert purchase.get()["onChainState"] == "RefundWithdrawn"
    purchase.assert_moved(seller=0, buyer=PRICE)
    call_command("reconcile")


def test_refund_requested_and_no_result_by_submit_time_pays_the_buyer_back_by_the_purchases_timers(
        escrow_chain, seller_service, django_capture_on_commit_callbacks):
    """The connect seed: no result by submitResultTime, refund requested -> the buyer is paid back before unlockTime,
    not after the contract's reclaim grace (a day on the dev deployment)."""
    chain = escrow_chain
    seller_service.mode = "never"
    purchase = Purchase(chain, django_capture_on_commit_callbacks, seller_service)
    assert purchase.tick()["started"] == 1
    assert purchase.get()["jobStatus"] == "running"

    # As the seed has it: the job is still pending when submitResultTime passes, so the buyer asks for a refund.
    chain.increase_time(purchase.timers["submitResultTime"] - chain.now())
    typed = purchase.get()["refundRequestTypedData"]
    with purchase.capture(execute=True):
        requested = purchase.parties.buyer_api.patch("/purchase/", {
            "network": "Preprod", "blockchainIdentifier": purchase.id,
            "signature": sign_typed_data(purchase.parties.buyer_account.key, typed)})
    assert requested.status_code == 200, requested.content
    assert requested.json()["data"]["onChainState"] == "RefundRequested"
    assert purchase.tick()["refunding"] == 1  # a zero proposal, confirmed by the relayer poll
    assert purchase.tick()["disputed"] == 1  # the buyer's signed request challenges it
    assert purchase.tick()["released"] == 1  # no result at all: the arbiter resolves it wholly to the buyer
    confirm_all(purchase.capture)  # finalize after the resolution
    refunded = purchase.get()
    assert refunded["onChainState"] == "RefundWithdrawn" and refunded["resultHash"] is None
    assert chain.now() < purchase.timers["unlockTime"]
    purchase.assert_moved(seller=0, buyer=PRICE)
    assert purchase.tick() == {"expired": 0, "started": 0, "results": 0, "disputed": 0, "released": 0,
                               "refunding": 0}
    call_command("reconcile")


def test_a_refund_requested_too_close_to_unlock_time_for_its_dispute_is_paid_back_by_reclaim_not_held_a_window(
        escrow_chain, seller_service, django_capture_on_commit_callbacks):
    """No result, a refund asked for in unlockTime's last minute: the tick proposed the zero settlement, whose
    challenge (signed until unlockTime) could no longer be mined, so the buyer's money waited for the proposal's
    window (unlockTime − purchase time, up to 30 days), the contract's reclaim being closed to a proposed escrow;
    left alone, it comes back by reclaim after the contract's grace."""
    chain = escrow_chain
    seller_service.mode = "never"
    submit = deadline_clock(chain) + 2 * chain.reclaim_grace
    purchase = Purchase(chain, django_capture_on_commit_callbacks, seller_service, submitResultTime=submit,
                        unlockTime=submit + 300, externalDisputeUnlockTime=submit + 3600)
    assert purchase.tick()["started"] == 1

    chain.increase_time(purchase.timers["unlockTime"] - 50 - chain.now())
    with purchase.capture(execute=True):
        requested = purchase.parties.buyer_api.patch("/purchase/", {
            "network": "Preprod", "blockchainIdentifier": purchase.id, "signature": sign_typed_data(
                purchase.parties.buyer_account.key, purchase.get()["refundRequestTypedData"])})
    assert requested.status_code == 200, requested.content
    assert purchase.tick()["refunding"] == 0  # was 1: the zero proposal, whose challenge was then signature_expired
    assert row(purchase).last_error == ""
    chain.increase_time(submit + chain.reclaim_grace - chain.now())
    assert purchase.settle()["reclaiming"] == 1
    assert purchase.get()["onChainState"] == "RefundWithdrawn"
    purchase.assert_moved(seller=0, buyer=PRICE)


def dispute(purchase) -> dict:
    assert purchase.tick()["started"] == 1
    assert purchase.tick()["results"] == 1
    submitted = purchase.get()
    body = {"network": "Preprod", "blockchainIdentifier": purchase.id,
            "signature": sign_typed_data(purchase.parties.buyer_account.key, submitted["refundRequestTypedData"])}
    stranger = purchase.parties.buyer_api.patch("/purchase", {
        **body, "signature": sign_typed_data(purchase.chain.accounts.stranger.key,
                                             submitted["refundRequestTypedData"])})
    assert stranger.status_code == 400 and error_code(stranger) == "wrong_signer"
    with purchase.capture(execute=True):
        requested = purchase.parties.buyer_api.patch("/purchase", body)
    assert requested.status_code == 200, requested.content
    assert requested.json()["data"]["onChainState"] == "RefundRequested"
    confirm_all(purchase.capture)
    disputed = purchase.get()
    assert disputed["onChainState"] == "Disputed"
    assert disputed["NextAction"]["requestedAction"] == "WaitingForExternalAction"
    assert purchase.onchain()["state"] == "disputed"
    return disputed


def test_refund_requested_after_a_result_is_disputed_and_resolved_by_an_operator(
        escrow_chain, seller_service, django_capture_on_commit_callbacks):
    chain, capture = escrow_chain, django_capture_on_commit_callbacks
    purchase = Purchase(chain, capture, seller_service)
    disputed = dispute(purchase)
    chain.increase_time(purchase.timers["unlockTime"] - chain.now() + 3600)
    assert purchase.settle()["finalizing"] == 0  # a dispute waits for a decision

    staff = UserFactory(is_staff=True)
    staff.user_permissions.add(Permission.objects.get(content_type__app_label="escrow", codename="change_dispute"))
    operator = Api(issue_owner_token(staff))
    with capture(execute=True):
        resolved = operator.post(f"/usage-agreements/{disputed['agreementId']}/resolve",
                                 {"seller_amount_atomic": 2 * USDC})
    assert resolved.status_code == 202, resolved.content
    confirm_all(capture)  # resolve confirmed -> finalize queued
    confirm_all(capture)  # finalize confirmed
    assert purchase.get()["onChainState"] == "DisputedWithdrawn"
    purchase.assert_moved(seller=2 * USDC, buyer=3 * USDC)
    call_command("reconcile")


def test_unresolved_dispute_refunds_the_buyer_after_external_dispute_unlock_time(
        escrow_chain, seller_service, django_capture_on_commit_callbacks):
    chain = escrow_chain
    purchase = Purchase(chain, django_capture_on_commit_callbacks, seller_service)
    dispute(purchase)
    chain.increase_time(purchase.timers["externalDisputeUnlockTime"] - chain.now() - 10)
    assert purchase.tick()["released"] == 0
    chain.increase_time(10)
    assert purchase.tick()["released"] == 1
    confirm_all(purchase.capture)  # finalize after the resolution
    assert purchase.get()["onChainState"] == "DisputedWithdrawn"
    purchase.assert_moved(seller=0, buyer=PRICE)
    call_command("reconcile")


def test_a_dispute_past_the_contracts_timeout_before_external_dispute_unlock_time_is_refunded_by_the_timeout(
        escrow_chain, seller_service, django_capture_on_commit_callbacks):
    """externalDisputeUnlockTime up to 30 days after unlockTime may fall after the contract's own dispute timeout (30
    days from the challenge): the arbiter's `resolve` reverts then. The release does not count it an error (the
    purchase's last_error stays empty), and the settlement tick refunds the buyer whole, as the release would have."""
    chain = escrow_chain
    purchase = Purchase(chain, django_capture_on_commit_callbacks, seller_service,
                        externalDisputeUnlockTime=deadline_clock(chain) + 2400 + 30 * 24 * 3600 - 60)
    disputed = dispute(purchase)
    chain.increase_time(purchase.timers["externalDisputeUnlockTime"] - chain.now())
    assert purchase.tick()["released"] == 0  # the dispute timed out on-chain: no resolution is sent
    assert MasumiPurchase.objects.get(agreement_id=disputed["agreementId"]).last_error == ""
    assert not ChainTransaction.objects.filter(agreement_id=disputed["agreementId"], purpose=TxPurpose.RESOLVE).exists()
    assert purchase.settle()["finalizing"] == 1
    assert purchase.get()["onChainState"] == "DisputedWithdrawn"
    purchase.assert_moved(seller=0, buyer=PRICE)
    call_command("reconcile")


def test_refund_requested_before_the_result_disputes_a_late_result(escrow_chain, seller_service,
                                                                   django_capture_on_commit_callbacks):
    chain = escrow_chain
    seller_service.mode = "never"
    purchase = Purchase(chain, django_capture_on_commit_callbacks, seller_service)
    purchase.tick()
    typed = purchase.get()["refundRequestTypedData"]
    requested = purchase.parties.buyer_api.patch("/purchase", {
        "network": "Preprod", "blockchainIdentifier": purchase.id,
        "signature": sign_typed_data(purchase.parties.buyer_account.key, typed)})
    assert requested.json()["data"]["onChainState"] == "RefundRequested"
    seller_service.mode = "result"
    ticked = purchase.tick()  # the result's proposal, confirmed by the relayer poll, then its dispute
    assert (ticked["results"], ticked["disputed"]) == (1, 1)
    assert purchase.get()["onChainState"] == "Disputed"
    call_command("reconcile")


class ChainCallsWatch:
    """Every JSON-RPC method the marketplace sends while the test's database session has a transaction open (a row
    lock held across a node call waits as long as the node does)."""

    def __init__(self, chain, settings):
        from tests.support.db_activity import backend_pid, session_state
        from tests.support.rpc_relay import RpcRelay

        self.relay = RpcRelay(chain.node.rpc_url).start()
        settings.CHAIN_RPC_URL = self.relay.url
        pid, self.inside = backend_pid(), []
        self.relay.observers.append(lambda call: session_state(pid) == "idle in transaction"
                                    and self.inside.append(call["method"]))

    def taken(self) -> list[str]:
        inside, self.inside = self.inside, []
        return inside


@pytest.mark.postgres
@pytest.mark.django_db(transaction=True)
def test_a_result_and_a_refund_request_after_it_ask_the_chain_with_no_database_transaction_open(
        escrow_chain, seller_service, settings, django_capture_on_commit_callbacks):
    """The result's settlement proposal and the refund request's challenge read the chain (its clock, the escrow's
    terms): they did so under the purchase's and the agreement's row locks."""
    purchase = Purchase(escrow_chain, django_capture_on_commit_callbacks, seller_service)
    assert purchase.tick()["started"] == 1
    watch = ChainCallsWatch(escrow_chain, settings)
    try:
        assert purchase.tick()["results"] == 1
        assert watch.taken() == []
        assert purchase.onchain()["state"] == "proposed"
        body = {"network": "Preprod", "blockchainIdentifier": purchase.id,
                "signature": sign_typed_data(purchase.parties.buyer_account.key,
                                             purchase.get()["refundRequestTypedData"])}
        with purchase.capture(execute=True):
            requested = purchase.parties.buyer_api.patch("/purchase", body)
        assert requested.status_code == 200, requested.content
        assert watch.taken() == []
        confirm_all(purchase.capture)
        assert purchase.get()["onChainState"] == "Disputed"
    finally:
        watch.relay.stop()


@pytest.mark.postgres
@pytest.mark.django_db(transaction=True)
def test_the_refund_by_the_purchases_timers_asks_the_chain_with_no_database_transaction_open(
        escrow_chain, seller_service, settings, django_capture_on_commit_callbacks):
    """The zero proposal and the challenge of it the beat task sends read the chain outside any transaction."""
    seller_service.mode = "never"
    purchase = Purchase(escrow_chain, django_capture_on_commit_callbacks, seller_service)
    assert purchase.tick()["started"] == 1
    escrow_chain.increase_time(purchase.timers["submitResultTime"] - escrow_chain.now())
    requested = purchase.parties.buyer_api.patch("/purchase/", {
        "network": "Preprod", "blockchainIdentifier": purchase.id,
        "signature": sign_typed_data(purchase.parties.buyer_account.key, purchase.get()["refundRequestTypedData"])})
    assert requested.status_code == 200, requested.content
    watch = ChainCallsWatch(escrow_chain, settings)
    try:
        assert purchase.tick()["refunding"] == 1
        assert watch.taken() == []
        assert purchase.tick()["disputed"] == 1
        assert watch.taken() == []
        assert purchase.tick()["released"] == 1
        confirm_all(purchase.capture)
        assert purchase.get()["onChainState"] == "RefundWithdrawn"
    finally:
        watch.relay.stop()
    purchase.assert_moved(seller=0, buyer=PRICE)


def test_a_page_of_purchases_holds_a_bounded_amount_of_results(escrow_chain, seller_service, settings,
                                                             django_capture_on_commit_callbacks):
    """A result is whatever the seller answered, up to UPSTREAM_ANSWER_MAX_BYTES (2 MiB): a page of 100 purchases
    was read and rendered whole, ~200 MiB in a web process per request, which a seller's results (its own purchases,
    say) could make every page. A page stops once its results reach MASUMI_PURCHASES_PAGE_RESULT_CHARACTERS (at
    least one purchase), and the next page goes on from its last."""
    settings.MASUMI_PURCHASES_PAGE_RESULT_CHARACTERS = 2_500
    first = Purchase(escrow_chain, django_capture_on_commit_callbacks, seller_service)
    bought = [first] + [Purchase(escrow_chain, django_capture_on_commit_callbacks, seller_service,
                                 parties=first.parties) for _ in range(2)]
    MasumiPurchase.objects.filter(pk__in=[row(p).pk for p in bought]).update(result="r" * 1_000)
    query = {"network": "Preprod", "limit": 10}

    page = first.parties.buyer_api.get("/purchase", query).json()["data"]["Purchases"]
    rest = first.parties.buyer_api.get("/purchase", {**query, "cursorId": page[-1]["id"]}).json()["data"]["Purchases"]

    assert [len(page), len(rest)] == [2, 1]
    assert {p["id"] for p in page + rest} == {str(row(p).pk) for p in bought}


def test_bad_purchases_are_refused(escrow_chain, seller_service, http_server):
    chain = escrow_chain
    parties = Parties(chain, upstream_base_url=seller_service.url, upstream_protocol="masumi", skills=[])
    now = deadline_clock(chain)
    body = {"network": "Preprod", "agentIdentifier": str(parties.service.pk), "input_data": INPUT}
    disordered = parties.buyer_api.post("/purchase", {**body, "submitResultTime": str((now + 60) * 1000),
                                                      "unlockTime": str((now + 30) * 1000)})
    assert disordered.status_code == 400 and error_code(disordered) == "invalid_timers"
    wrong_hash = parties.buyer_api.post("/purchase", {**body, "inputHash": "0" * 64})
    assert wrong_hash.status_code == 400 and error_code(wrong_hash) == "input_hash_mismatch"
    wrong_network = parties.buyer_api.post("/purchase", {**body, "network": "Mainnet"})
    assert wrong_network.status_code == 400 and error_code(wrong_network) == "wrong_network"
    plain = Parties(chain, buyer_funds=0, upstream_base_url=http_server.url)
    not_masumi = plain.buyer_api.post("/purchase", {**body, "agentIdentifier": str(plain.service.pk)})
    assert not_masumi.status_code == 400 and error_code(not_masumi) == "not_a_masumi_service"
    unknown = parties.buyer_api.get("/purchase", {"network": "Preprod", "blockchainIdentifier": "0x" + "ab" * 32})
    assert unknown.status_code == 404 and error_code(unknown) == "purchase_not_found"


def test_a_service_whose_sellers_owner_is_deactivated_is_not_bought(escrow_chain, seller_service):
    """The seller's owner deactivated (its agents' keys refused): a purchase naming its service was accepted and
    the job started at its upstream."""
    parties = Parties(escrow_chain, upstream_base_url=seller_service.url, upstream_protocol="masumi", skills=[])
    owner = parties.seller.owner
    owner.is_active = False
    owner.save()
    refused = parties.buyer_api.post("/purchase", {"network": "Preprod", "agentIdentifier": str(parties.service.pk),
                                                   "input_data": INPUT})
    assert refused.status_code == 404 and error_code(refused) == "service_not_found"
    assert seller_service.started == []


def _unfunded_purchases_past_their_deadline(chain, seller_service, *, count: int) -> None:
    """`count` Masumi purchases of one service, never funded, the chain's clock moved past their deadline."""
    parties = Parties(chain, upstream_base_url=seller_service.url, upstream_protocol="masumi", skills=[])
    created = [parties.buyer_api.post("/purchase", {"network": "Preprod", "input_data": INPUT,
                                                    "agentIdentifier": str(parties.service.pk)}).json()["data"]
               for _ in range(count)]
    chain.increase_time(max(c["ActivationPackage"]["deadline"] for c in created) - chain.now())


def test_an_unfunded_purchase_whose_expiry_raises_is_logged_and_skipped_and_the_others_expire(
        escrow_chain, seller_service, django_capture_on_commit_callbacks, monkeypatch, caplog):
    """One purchase whose expiry always raised (bad data, a bug) ended the Masumi tick at every run: no purchase
    after it expired, and no refund, dispute or release below it was done."""
    from agreements import services as agreement_services
    from marketplace.sweeps import RowsFailed

    _unfunded_purchases_past_their_deadline(escrow_chain, seller_service, count=2)
    poisoned = MasumiPurchase.objects.values_list("agreement_id", flat=True).first()
    real_expire = agreement_services.agreement_expire_unfunded

    def expire_unfunded(*, agreement_id, reason, code):
        if agreement_id == poisoned:
            raise RuntimeError("this purchase always fails")
        return real_expire(agreement_id=agreement_id, reason=reason, code=code)

    monkeypatch.setattr(agreement_services, "agreement_expire_unfunded", expire_unfunded)
    with pytest.raises(RowsFailed) as failed:
        run(django_capture_on_commit_callbacks, purchases.purchases_tick)
    assert failed.value.failed == [poisoned] and failed.value.applied == 1
    statuses = dict(MasumiPurchase.objects.values_list("agreement_id", "agreement__status"))
    assert statuses.pop(poisoned) != "expired" and list(statuses.values()) == ["expired"]
    assert str(poisoned) in caplog.text


def test_unfunded_purchases_whose_expiry_raises_do_not_keep_the_others_from_their_turn(
        escrow_chain, seller_service, django_capture_on_commit_callbacks, monkeypatch):
    """The tick expires a bounded number of unfunded purchases a run: those whose expiry always raised stayed due,
    and, as many as the bound, were the ones taken at every run, so no other purchase past its payByTime expired.
    Each run takes up after the last."""
    from agreements import services as agreement_services

    _unfunded_purchases_past_their_deadline(escrow_chain, seller_service, count=2)
    monkeypatch.setattr(purchases, "UNFUNDED_PURCHASES_EXPIRED_PER_RUN", 1)
    monkeypatch.setattr(agreement_services, "agreement_expire_unfunded",
                        first_row_always_fails(agreement_services.agreement_expire_unfunded, row="agreement_id"))
    sweep_runs(lambda: run(django_capture_on_commit_callbacks, purchases.purchases_tick), runs=2)
    assert sorted(status == "expired" for status in MasumiPurchase.objects.values_list(
        "agreement__status", flat=True)) == [False, True]


def test_purchase_never_funded_by_pay_by_time_expires(escrow_chain, seller_service,
                                                      django_capture_on_commit_callbacks):
    chain = escrow_chain
    parties = Parties(chain, upstream_base_url=seller_service.url, upstream_protocol="masumi", skills=[])
    created = parties.buyer_api.post("/purchase", {"network": "Preprod", "input_data": INPUT,
                                                   "agentIdentifier": str(parties.service.pk)}).json()["data"]
    assert created["NextAction"]["requestedAction"] == "FundsLockingRequested"
    signed = sign_activation(chain, created["ActivationPackage"], parties.agreement(created["agreementId"]),
                             parties.buyer_account.key)
    chain.increase_time(created["ActivationPackage"]["deadline"] - chain.now())
    assert run(django_capture_on_commit_callbacks, purchases.purchases_tick)["expired"] == 1
    late = parties.buyer_api.post("/purchase/lock-funds", {"network": "Preprod",
                                                          "blockchainIdentifier": created["blockchainIdentifier"],
                                                          **signed})
    assert late.status_code in (400, 409), late.content
    expired = parties.buyer_api.get("/purchase", {"network": "Preprod"}).json()["data"]["Purchases"][0]
    assert expired["onChainState"] is None and expired["NextAction"]["errorType"] == "Closed"
    assert seller_service.started == []


def test_unavailable_service_drops_out_of_search_and_cannot_be_bought(escrow_chain, seller_service, anon,
                                                                       django_capture_on_commit_callbacks):
    parties = Parties(escrow_chain, upstream_base_url=seller_service.url, upstream_protocol="masumi", skills=[],
                      name="Quarterly report summarizer")

    def found() -> list[str]:
        response = parties.buyer_api.post("/catalog/search", {"q": "summarizer"})
        assert response.status_code == 200, response.content
        return [service["id"] for service in response.json()["results"]]

    def availability() -> str:
        return parties.buyer_api.get(f"/agents/services/{parties.service.pk}").json()["availability"]

    assert found() == [str(parties.service.pk)] and availability() == "unknown"
    seller_service.mode = "unavailable"
    call_command_poll = run(django_capture_on_commit_callbacks, catalog_poll)
    assert call_command_poll == 1
    assert found() == [] and availability() == "unavailable"
    refused = parties.buyer_api.post("/purchase", {"network": "Preprod", "agentIdentifier": str(parties.service.pk),
                                                   "input_data": INPUT})
    assert refused.status_code == 409 and error_code(refused) == "service_unavailable"

    seller_service.mode = "result"
    run(django_capture_on_commit_callbacks, catalog_poll)
    assert found() == [str(parties.service.pk)] and availability() == "available"


def catalog_poll() -> int:
    from catalog.tasks import poll_availability

    return poll_availability.delay().get()


# --- the sellers' calls: scheduled per purchase, a tick bounded -------------------------------------------------

HANG_SECONDS = 3  # a hanging seller's delay; the tests set MASUMI_SERVICE_TIMEOUT to 1 s


@pytest.fixture
def hanging_seller():
    """A seller whose every answer comes HANG_SECONDS late: each call ends at MASUMI_SERVICE_TIMEOUT."""
    server = RecordingServer(responses=deque([(200, {}, HANG_SECONDS)] * 50)).start()
    yield server
    server.stop()


def moved_to(purchase: Purchase, seller) -> None:
    Service.objects.filter(pk=purchase.parties.service.pk).update(upstream_base_url=seller.url)


def row(purchase: Purchase) -> MasumiPurchase:
    return MasumiPurchase.objects.get(agreement_id=purchase.created["agreementId"])


_real_now = timezone.now


def wall_clock_ahead(monkeypatch, seconds: float) -> None:
    """Our clock (not the chain's) `seconds` ahead of the real one: a seller's backoff runs by it."""
    monkeypatch.setattr(timezone, "now", lambda: _real_now() + timedelta(seconds=seconds))


def timed_jobs_tick(capture) -> tuple[dict, float]:
    started = time.monotonic()
    ticked = run(capture, purchases.purchases_jobs_tick)
    return ticked, time.monotonic() - started


def test_a_seller_hanging_on_three_purchases_holds_a_tick_one_timeout_and_waits_its_backoff(
        escrow_chain, seller_service, hanging_seller, django_capture_on_commit_callbacks, settings, monkeypatch):
    """Before: the tick called each purchase's seller in turn, 3 x the timeout here, every tick, and the honest
    seller's result waited behind them."""
    capture = django_capture_on_commit_callbacks
    settings.MASUMI_SERVICE_TIMEOUT = 1
    slow = [Purchase(escrow_chain, capture, seller_service) for _ in range(3)]
    honest = Purchase(escrow_chain, capture, seller_service)
    confirm_all(capture)  # the last activation is confirmed by a further relayer poll
    assert timed_jobs_tick(capture)[0]["started"] == 4  # each started, then a first status check: running
    for purchase in slow:
        moved_to(purchase, hanging_seller)

    ticked, seconds = timed_jobs_tick(capture)
    # In turn it takes 3 x 1 s at least; at once one timeout, and a loaded machine's slack (2.25 s seen in CI).
    assert seconds < 3 * settings.MASUMI_SERVICE_TIMEOUT <= HANG_SECONDS
    assert ticked["results"] == 1 and honest.get()["result"] == result_for(INPUT)  # not delayed by the others
    assert len(hanging_seller.requests) == 3
    for purchase in slow:
        failed = row(purchase)
        assert failed.job_call_failures == 1 and "Timeout" in failed.last_error
        assert failed.job_next_call_at >= timezone.now() + timedelta(seconds=15)  # tick interval x 2

    # Not called again before its backoff; then called again, and backed off longer.
    assert timed_jobs_tick(capture)[1] < settings.MASUMI_SERVICE_TIMEOUT
    assert len(hanging_seller.requests) == 3
    wall_clock_ahead(monkeypatch, 21)
    timed_jobs_tick(capture)
    assert len(hanging_seller.requests) == 6
    assert {row(purchase).job_call_failures for purchase in slow} == {2}
    assert all(row(purchase).job_next_call_at >= timezone.now() + timedelta(seconds=35) for purchase in slow)


def test_a_seller_back_after_a_long_outage_has_its_result_recorded_before_submit_result_time(
        escrow_chain, seller_service, hanging_seller, django_capture_on_commit_callbacks, settings, monkeypatch):
    capture = django_capture_on_commit_callbacks
    settings.MASUMI_SERVICE_TIMEOUT = 1
    now = deadline_clock(escrow_chain)
    purchase = Purchase(escrow_chain, capture, seller_service, payByTime=now + 120, submitResultTime=now + 240)
    assert timed_jobs_tick(capture)[0]["started"] == 1
    moved_to(purchase, hanging_seller)
    MasumiPurchase.objects.filter(pk=row(purchase).pk).update(job_call_failures=7)  # down for a while: 10 x 2^8 s
    timed_jobs_tick(capture)
    failed = row(purchase)
    assert failed.job_call_failures == 8
    wait = (failed.job_next_call_at - timezone.now()).total_seconds()
    assert 0 < wait < purchase.timers["submitResultTime"] - escrow_chain.now()  # not 300 s: before the timer

    moved_to(purchase, seller_service)  # back up
    wall_clock_ahead(monkeypatch, wait - 2)
    escrow_chain.increase_time(int(wait) - 2)
    assert timed_jobs_tick(capture)[0]["results"] == 0  # still backing off
    wall_clock_ahead(monkeypatch, wait + 1)
    escrow_chain.increase_time(3)
    assert escrow_chain.now() < purchase.timers["submitResultTime"]
    assert timed_jobs_tick(capture)[0]["results"] == 1
    assert purchase.get()["result"] == result_for(INPUT)
    assert row(purchase).job_call_failures == 0


@pytest.mark.django_db(transaction=True)  # the two ticks run on connections of their own
def test_two_ticks_at_once_call_a_purchases_seller_once(
        escrow_chain, seller_service, hanging_seller, django_capture_on_commit_callbacks, settings):
    capture = django_capture_on_commit_callbacks
    settings.MASUMI_SERVICE_TIMEOUT = 1
    purchase = Purchase(escrow_chain, capture, seller_service)
    assert timed_jobs_tick(capture)[0]["started"] == 1
    moved_to(purchase, hanging_seller)

    def tick():
        try:
            purchases.purchases_jobs_tick()
        finally:
            connection.close()

    ticks = [threading.Thread(target=tick) for _ in range(2)]
    for thread in ticks:
        thread.start()
    for thread in ticks:
        thread.join()
    assert len(hanging_seller.requests) == 1
    assert row(purchase).job_call_failures == 1


def test_a_status_answer_naming_another_job_is_not_taken_as_this_purchases_result(
        escrow_chain, seller_service, http_server, django_capture_on_commit_callbacks):
    """A seller's /status answering for another job (a cache keyed wrong, a hostile seller): its result was charged
    as this purchase's, and shown to this buyer."""
    purchase = Purchase(escrow_chain, django_capture_on_commit_callbacks, seller_service)
    assert purchase.tick()["started"] == 1
    moved_to(purchase, http_server)
    http_server.responses.append((200, {"job_id": "another-buyers-job", "status": "completed",
                                        "result": "another buyer's report"}))

    assert purchase.tick()["results"] == 0
    refused = row(purchase)
    assert (refused.result, refused.result_hash) == ("", "")
    assert "another job" in refused.last_error and refused.job_call_failures == 1
    assert not UsageEvent.objects.filter(agreement_id=refused.agreement_id).exists()


def test_a_sellers_longest_job_id_is_charged_and_stops_no_tick(escrow_chain, http_server,
                                                                django_capture_on_commit_callbacks):
    """A job id may be 250 characters; the result's charge was keyed `masumi-job:<job id>`, beyond the usage
    event's 128: the database refused it, and the error (no ApplicationError) ended every tick at that answer,
    the other calls' answers lost, until submitResultTime."""
    http_server.responses.extend([(200, {"job_id": "j" * 250, "payment_id": "p" * 250}),
                                  (200, {"job_id": "j" * 250, "status": "completed", "result": "the report"})])
    purchase = Purchase(escrow_chain, django_capture_on_commit_callbacks, http_server)
    assert purchase.tick()["started"] == 1
    assert purchase.get()["result"] == "the report"
    assert purchase.get()["onChainState"] == "ResultSubmitted"


def test_a_result_whose_proposal_finds_the_node_down_is_charged_and_stops_no_tick(
        escrow_chain, http_server, monkeypatch, django_capture_on_commit_callbacks):
    """The proposal right after a recorded result reads the escrow's terms from the chain; a node timing out there
    raised out of the jobs tick (only an ApplicationError was deferred), the other calls' answers of that tick lost.
    The settlement tick proposes it later."""
    http_server.responses.extend([(200, {"job_id": "job-1", "payment_id": "pay-1"}),
                                  (200, {"job_id": "job-1", "status": "completed", "result": "the report"})])
    purchase = Purchase(escrow_chain, django_capture_on_commit_callbacks, http_server)

    def node_down(**_):
        raise gateway.RpcUnavailable("read timed out")

    with monkeypatch.context() as patched:  # the job started, then its status polled at once, in one tick
        patched.setattr(settlement.selectors, "escrow_terms", node_down)
        done = run(django_capture_on_commit_callbacks, purchases.purchases_jobs_tick)

    assert (done["started"], done["results"]) == (1, 1)
    assert purchase.get()["result"] == "the report"
    purchase.settle()
    assert purchase.get()["onChainState"] == "ResultSubmitted"


def test_a_job_id_the_seller_gave_another_purchase_is_not_taken_for_a_second_one(
        escrow_chain, http_server, django_capture_on_commit_callbacks):
    """A seller answering /start_job with a job id it gave another purchase of the service: both purchases polled
    that one job, its result charged twice (the seller paid twice for one job) and the first buyer's result shown
    to the second."""
    capture = django_capture_on_commit_callbacks
    first = Purchase(escrow_chain, capture, http_server)
    http_server.responses.extend([(200, {"job_id": "job-1", "payment_id": "pay-1"}),
                                  (200, {"job_id": "job-1", "status": "running"})])
    assert first.tick()["started"] == 1
    second = Purchase(escrow_chain, capture, http_server, parties=first.parties)
    # The second's start and the first's status check, in either order.
    http_server.responses.extend([(200, {"job_id": "job-1", "payment_id": "pay-2", "status": "running"})] * 2)

    assert second.tick()["started"] == 0
    refused = row(second)
    assert refused.job_id == "" and "another purchase" in refused.last_error and refused.job_call_failures == 1
    assert row(first).job_id == "job-1"


@pytest.mark.parametrize("raises_in", ["the call", "the answer's record"])
def test_a_purchase_whose_job_call_raises_is_logged_and_skipped_and_the_others_answers_are_recorded(
        raises_in, escrow_chain, seller_service, django_capture_on_commit_callbacks, monkeypatch, caplog):
    """An error other than a seller's (AgenticServiceError) from one purchase's call or from recording its answer (a
    bug, bad data, a database error on its row) ended the whole jobs tick: the answers of the others' calls already
    made were lost, and the purchases still due not called, at every tick while that purchase stayed due."""
    from marketplace.sweeps import RowsFailed

    capture = django_capture_on_commit_callbacks
    poisoned, healthy = (Purchase(escrow_chain, capture, seller_service) for _ in range(2))
    confirm_all(capture)  # the last activation is confirmed by a further relayer poll
    poisoned_id = row(poisoned).pk
    real_exchange, real_answered = purchases._JobCall.exchange, purchases._job_call_answered

    def exchange(call):
        if call.purchase.pk == poisoned_id:
            raise KeyError("job_id")  # e.g. the client library choking on an answer
        return real_exchange(call)

    def answered(call, answer, *, now):
        if call.purchase.pk == poisoned_id:
            raise RuntimeError("this purchase always fails")
        return real_answered(call, answer, now=now)

    with monkeypatch.context() as patched:
        if raises_in == "the call":
            patched.setattr(purchases._JobCall, "exchange", exchange)
        else:
            patched.setattr(purchases, "_job_call_answered", answered)
        with pytest.raises(RowsFailed) as failed:
            run(capture, purchases.purchases_jobs_tick)
    assert failed.value.failed == [poisoned_id] and failed.value.applied == 1
    assert str(poisoned_id) in caplog.text
    assert row(healthy).job_id and row(healthy).job_status == "running"  # started, and checked at once
    skipped = row(poisoned)
    # Backed off as a failed call; nothing shown to the buyer (the error is ours); its start still claimed, so the
    # next start is counted as one whose answer may have been lost (the seller may have taken the job).
    assert skipped.job_id == "" and skipped.job_call_failures == 1 and skipped.last_error == ""
    assert skipped.job_start_claimed_at is not None and skipped.job_next_call_at > timezone.now()

    wall_clock_ahead(monkeypatch, purchases.JOB_CALL_BACKOFF_MAX_SECONDS + 1)
    assert run(capture, purchases.purchases_jobs_tick) == {"started": 1, "results": 1}
    assert row(poisoned).job_id and row(poisoned).job_starts_unanswered == 1
    assert healthy.get()["result"] == result_for(INPUT)


class TickKilled(BaseException):
    """The jobs tick's worker killed (its time limit, a deploy) between the seller's answer and its record."""


def killed_after_start_job(capture, monkeypatch) -> None:
    """One jobs tick killed once the seller answered /start_job, before the job id was saved; then its lease
    (MASUMI_SERVICE_TIMEOUT + 30 s) passes on our clock."""
    def killed(*args, **kwargs):
        raise TickKilled

    with monkeypatch.context() as patched:
        patched.setattr(purchases, "_job_call_answered", killed)
        with pytest.raises(TickKilled):
            run(capture, purchases.purchases_jobs_tick)
    wall_clock_ahead(monkeypatch, purchases._job_call_lease_seconds() + 1)


def test_a_start_job_answer_lost_to_a_killed_tick_is_not_started_again_once_the_seller_took_the_job(
        escrow_chain, seller_service, django_capture_on_commit_callbacks, monkeypatch):
    """A masumi-library seller asks this node for the job's payment (POST /payment) from its /start_job, before it
    answers: the node then knows the seller took the job. Before: the next tick started it again after the lease,
    the seller running it twice for one payment."""
    capture = django_capture_on_commit_callbacks
    purchase = Purchase(escrow_chain, capture, seller_service, masumi_protocol_version="2")
    killed_after_start_job(capture, monkeypatch)
    # What the seller's /start_job did before answering (the masumi library's Payment.create_payment_request).
    asked = purchase.parties.seller_api.post("/payment", {
        "agentIdentifier": str(purchase.parties.service.pk), "network": "Preprod",
        "identifierFromPurchaser": "order-17", "inputHash": purchase.created["inputHash"]})
    assert asked.status_code == 200 and asked.json()["data"]["blockchainIdentifier"] == purchase.id, asked.content

    assert purchase.tick()["started"] == 0
    assert len(seller_service.started) == 1  # the seller has the job, and submits its result itself
    submitted = purchase.parties.seller_api.post("/payment/submit-result", {
        "network": "Preprod", "blockchainIdentifier": purchase.id, "submitResultHash": "c" * 64})
    assert submitted.status_code == 200, submitted.content
    assert purchase.get()["onChainState"] == "ResultSubmitted"


def test_two_jobs_bought_under_one_purchaser_identifier_and_started_at_once_are_each_paid_by_their_own_purchase(
        escrow_chain, seller_service, django_capture_on_commit_callbacks, monkeypatch):
    """A buyer bought two jobs with one identifierFromPurchaser and one input (Masumi leaves both to the buyer). One
    tick starts both (two calls per seller at once), and a masumi-library seller asks this node for each job's
    payment (POST /payment) before it answers either /start_job. Both were answered with the older purchase: the
    seller's second job named the first purchase's blockchainIdentifier, and the second purchase was never marked
    taken (a start of it whose answer is lost was made again)."""
    capture = django_capture_on_commit_callbacks
    first = Purchase(escrow_chain, capture, seller_service, masumi_protocol_version="2")
    second = Purchase(escrow_chain, capture, seller_service, parties=first.parties)
    asked = []
    answered = purchases._job_call_answered

    def seller_asked_for_both_payments_first(call, answer, **kwargs):
        if not asked:  # both /start_job in flight, each asking for its job's payment
            asked.extend(first.parties.seller_api.post("/payment", {
                "agentIdentifier": str(first.parties.service.pk), "network": "Preprod",
                "identifierFromPurchaser": "order-17", "inputHash": first.created["inputHash"]}) for _ in range(2))
        return answered(call, answer, **kwargs)

    monkeypatch.setattr(purchases, "_job_call_answered", seller_asked_for_both_payments_first)
    assert run(capture, purchases.purchases_jobs_tick)["started"] == 2
    assert [answer.status_code for answer in asked] == [200, 200]
    assert sorted(answer.json()["data"]["blockchainIdentifier"] for answer in asked) == sorted([first.id, second.id])
    assert row(first).job_start_acknowledged_at and row(second).job_start_acknowledged_at


@pytest.mark.postgres
@pytest.mark.django_db(transaction=True)  # the seller's two requests run on connections of their own
def test_two_jobs_of_one_purchaser_identifier_asked_for_at_the_same_moment_are_each_paid_by_their_own_purchase(
        escrow_chain, seller_service, django_capture_on_commit_callbacks, monkeypatch):
    """As above, the seller's two POST /payment at the same moment: each takes its own purchase."""
    capture = django_capture_on_commit_callbacks
    first = Purchase(escrow_chain, capture, seller_service, masumi_protocol_version="2")
    second = Purchase(escrow_chain, capture, seller_service, parties=first.parties)
    both_arrived = threading.Barrier(2, timeout=10)
    checked = purchases.check_listed_price
    monkeypatch.setattr(purchases, "check_listed_price", lambda **kwargs: (both_arrived.wait(), checked(**kwargs)))
    asked = []

    def ask():
        try:
            asked.append(first.parties.seller_api.post("/payment", {
                "agentIdentifier": str(first.parties.service.pk), "network": "Preprod",
                "identifierFromPurchaser": "order-17", "inputHash": first.created["inputHash"]}))
        finally:
            connection.close()

    answered = purchases._job_call_answered

    def seller_asked_for_both_payments_first(call, answer, **kwargs):
        if not asked:
            threads = [threading.Thread(target=ask) for _ in range(2)]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join()
        return answered(call, answer, **kwargs)

    monkeypatch.setattr(purchases, "_job_call_answered", seller_asked_for_both_payments_first)
    assert run(capture, purchases.purchases_jobs_tick)["started"] == 2
    assert [answer.status_code for answer in asked] == [200, 200]
    assert sorted(answer.json()["data"]["blockchainIdentifier"] for answer in asked) == sorted([first.id, second.id])


def test_a_start_job_answer_lost_to_a_killed_tick_is_started_again_when_the_seller_never_took_the_job(
        escrow_chain, seller_service, django_capture_on_commit_callbacks, monkeypatch):
    """No payment asked for: a masumi-library seller has no job (it asks before creating one)."""
    capture = django_capture_on_commit_callbacks
    purchase = Purchase(escrow_chain, capture, seller_service, masumi_protocol_version="2")
    killed_after_start_job(capture, monkeypatch)
    assert purchase.tick()["started"] == 1
    assert len(seller_service.started) == 2
    assert row(purchase).job_id


def test_a_start_job_answer_lost_to_a_killed_tick_is_recorded_for_operators_before_the_job_is_started_again(
        escrow_chain, seller_service, django_capture_on_commit_callbacks, monkeypatch, caplog):
    """The seed's /start_job carries nothing the seller could recognise a second call by, and its /status knows only
    the seller's job id: the job is started again (the buyer still gets a result; the seller, paid once, ran it
    twice at worst). Before: silently, nothing told the seller's operators."""
    capture = django_capture_on_commit_callbacks
    purchase = Purchase(escrow_chain, capture, seller_service)
    killed_after_start_job(capture, monkeypatch)
    assert purchase.tick()["started"] == 1
    assert len(seller_service.started) == 2
    assert row(purchase).job_starts_unanswered == 1
    [lost] = [record for record in caplog.records if "start_job answer was lost" in record.getMessage()]
    assert lost.levelname == "ERROR" and lost.purchase_id == str(row(purchase).pk)
    assert purchase.tick()["results"] == 1


@pytest.mark.parametrize("report", [{"units": 1}, {"events": [{"units": 1}]}, {"units_used": 1, "completed": True}])
def test_a_purchases_seller_cannot_charge_it_by_reporting_usage(escrow_chain, seller_service,
                                                                 django_capture_on_commit_callbacks, report):
    # A purchase is paid for its result: a usage report of one job charged the whole price with no result, and the
    # settlement tick proposed it (the buyer's only recourse a refund request within the window).
    purchase = Purchase(escrow_chain, django_capture_on_commit_callbacks, seller_service)
    agreement_id = purchase.created["agreementId"]
    refused = purchase.parties.seller_api.post(f"/usage-agreements/{agreement_id}/record-usage", report,
                                               headers={"Idempotency-Key": "no-result"})
    assert refused.status_code == 409 and error_code(refused) == "job_result_only", refused.content
    assert not UsageEvent.objects.filter(agreement_id=agreement_id).exists()
    assert purchase.parties.agreement(agreement_id)["completion_requested_at"] is None

    assert purchase.tick()["started"] == 1
    assert purchase.tick()["results"] == 1  # the result is still the purchase's charge
    assert purchase.get()["onChainState"] == "ResultSubmitted"


def test_a_buyer_who_cancelled_its_purchases_intent_nonce_locks_the_funds_with_a_fresh_one(
        escrow_chain, seller_service, django_capture_on_commit_callbacks):
    """The package handed out at purchase creation names the agreement's first intent nonce; a buyer who revoked it
    on-chain (`cancelIntentNonce`) gets the next one from the agreement's activation package, with the purchase's
    payByTime as its deadline (what lock-funds requires), and the revoked intent is refused, not relayed to revert."""
    chain, capture = escrow_chain, django_capture_on_commit_callbacks
    parties = Parties(chain, upstream_base_url=seller_service.url, upstream_protocol="masumi", skills=[])
    created = parties.buyer_api.post("/purchase", {"network": "Preprod", "input_data": INPUT,
                                                   "agentIdentifier": str(parties.service.pk)}).json()["data"]
    agreement = parties.agreement(created["agreementId"])
    old_signed = sign_activation(chain, created["ActivationPackage"], agreement, parties.buyer_account.key)
    old_nonce = created["ActivationPackage"]["intent"]["message"]["nonce"]
    Escrows(chain).tx(chain.escrow.functions.cancelIntentNonce(old_nonce), parties.buyer_account)

    lock = {"network": "Preprod", "blockchainIdentifier": created["blockchainIdentifier"]}
    with capture(execute=True):
        refused = parties.buyer_api.post("/purchase/lock-funds", {**lock, **old_signed})
    assert refused.status_code == 400 and error_code(refused) == "wrong_signer", refused.content
    assert not ChainTransaction.objects.filter(agreement_id=created["agreementId"]).exists()

    package = parties.buyer_api.get(f"/usage-agreements/{created['agreementId']}/activation-package")
    assert package.status_code == 200, package.content
    assert package.json()["intent"]["message"]["nonce"] != old_nonce
    assert package.json()["deadline"] == created["ActivationPackage"]["deadline"]  # the purchase's payByTime
    signed = sign_activation(chain, package.json(), agreement, parties.buyer_account.key)
    with capture(execute=True):
        locked = parties.buyer_api.post("/purchase/lock-funds", {**lock, **signed})
    assert locked.status_code == 202, locked.content
    confirm_all(capture)
    purchase = parties.buyer_api.get("/purchase", {"network": "Preprod"}).json()["data"]["Purchases"][0]
    assert purchase["onChainState"] == "FundsLocked", purchase
    locked_amount = agreement["deposit_amount_atomic"] + agreement["infra_fee_atomic"]
    assert usdc_balance(chain, chain.addresses["escrow"]) == locked_amount


def test_a_purchases_input_data_is_bounded_in_size(escrow_chain, seller_service, settings):
    """Stored with the purchase and sent to the seller's /start_job: bounded by the request body's limit only, a
    buyer stored 2.5 MiB per purchase (many purchases a minute, each free until funded)."""
    settings.MASUMI_INPUT_DATA_MAX_BYTES = 1024
    parties = Parties(escrow_chain, upstream_base_url=seller_service.url, upstream_protocol="masumi", skills=[])
    body = {"network": "Preprod", "agentIdentifier": str(parties.service.pk)}

    refused = parties.buyer_api.post("/purchase", {**body, "input_data": {"text": "x" * 2000}})

    assert refused.status_code == 400, refused.content
    assert codes_at(refused, "input_data") == {"too_large"}, refused.content
    assert not MasumiPurchase.objects.exists()
    fits = parties.buyer_api.post("/purchase", {**body, "input_data": {"text": "x" * 900}})
    assert fits.status_code == 200, fits.content


def test_a_refund_request_withdrawn_while_its_dispute_is_being_prepared_is_not_disputed(
        escrow_chain, seller_service, django_capture_on_commit_callbacks, monkeypatch):
    """The dispute of a refund request after the result is sent once the request is recorded, outside its
    transaction (it reads the chain). The buyer's cancel-refund-request arriving meanwhile found no challenge queued
    and answered 200 (the request withdrawn), and the challenge was queued all the same: the payment disputed (and
    released to the buyer at externalDisputeUnlockTime) after the buyer withdrew its request."""
    from escrow import relayer

    chain, capture = escrow_chain, django_capture_on_commit_callbacks
    purchase = Purchase(chain, capture, seller_service)
    assert purchase.tick()["started"] == 1
    assert purchase.tick()["results"] == 1
    submitted = purchase.get()
    body = {"network": "Preprod", "blockchainIdentifier": purchase.id}
    preflight, withdrawn = relayer.transaction_preflight, []

    def cancel_meanwhile(**kwargs):
        if not withdrawn:
            withdrawn.append(purchase.parties.buyer_api.post("/purchase/cancel-refund-request", body))
        return preflight(**kwargs)

    monkeypatch.setattr(relayer, "transaction_preflight", cancel_meanwhile)
    with capture(execute=True):
        requested = purchase.parties.buyer_api.patch("/purchase", {**body, "signature": sign_typed_data(
            purchase.parties.buyer_account.key, submitted["refundRequestTypedData"])})
    assert requested.status_code == 200, requested.content
    [cancelled] = withdrawn
    assert cancelled.status_code == 200, cancelled.content
    confirm_all(capture)
    assert purchase.tick()["disputed"] == 0
    after = purchase.get()
    assert after["onChainState"] == "ResultSubmitted" and after["refundRequestedAt"] is None, after
    assert after["NextAction"]["errorType"] is None, after["NextAction"]
    assert not ChainTransaction.objects.filter(agreement_id=submitted["agreementId"],
                                               purpose=TxPurpose.CHALLENGE).exists()
    assert purchase.onchain()["state"] != "disputed"


def test_a_refund_request_too_late_for_its_dispute_to_be_mined_is_refused_not_recorded(
        escrow_chain, seller_service, django_capture_on_commit_callbacks, settings):
    """A challenge must be signed to stay valid CHALLENGE_SIGNATURE_MIN_VALIDITY_SECONDS (60) ahead, and a refund
    request's is signed until unlockTime. A refund request after the result in unlockTime's last minute was answered
    200 RefundRequested, its dispute refused (signature_expired) by every try, and the seller paid at unlockTime:
    the buyer told its refund was requested when it could no longer be."""
    chain, capture = escrow_chain, django_capture_on_commit_callbacks
    purchase = Purchase(chain, capture, seller_service)
    assert purchase.tick()["started"] == 1
    assert purchase.tick()["results"] == 1
    submitted = purchase.get()
    chain.increase_time(purchase.timers["unlockTime"] - chain.now() - settings.CHALLENGE_SIGNATURE_MIN_VALIDITY // 2)
    body = {"network": "Preprod", "blockchainIdentifier": purchase.id,
            "signature": sign_typed_data(purchase.parties.buyer_account.key, submitted["refundRequestTypedData"])}
    with capture(execute=True):
        late = purchase.parties.buyer_api.patch("/purchase", body)
    assert late.status_code == 409 and error_code(late) == "unlock_time_too_close", late.content
    assert late.json()["error"]["details"]["latest"] == (
        str((purchase.timers["unlockTime"] - settings.CHALLENGE_SIGNATURE_MIN_VALIDITY) * 1000))
    after = purchase.get()
    assert after["onChainState"] == "ResultSubmitted" and after["refundRequestedAt"] is None


class TickReadBeforeTheOtherCommitted:
    """escrow.selectors as a purchases tick saw them just before another runner (the buyer's request, a second tick)
    committed its challenge or resolution: none under way."""

    def __init__(self, selectors):
        self._selectors = selectors

    def __getattr__(self, name):
        return getattr(self._selectors, name)

    def live_transaction(self, *, agreement_id, purpose):
        return None


def test_a_tick_racing_the_buyers_refund_request_to_dispute_the_result_records_no_error(
        escrow_chain, seller_service, django_capture_on_commit_callbacks, monkeypatch):
    """The buyer's refund request disputes the result at once; a tick that had read the purchase due meanwhile asks
    the same: refused (`challenge_in_progress`), which is the dispute under way, not an error. It was kept as the
    purchase's last error, shown to the buyer as a seller's failure (`SellerServiceError`) for good."""
    chain, capture = escrow_chain, django_capture_on_commit_callbacks
    purchase = Purchase(chain, capture, seller_service)
    assert purchase.tick()["started"] == 1
    assert purchase.tick()["results"] == 1
    typed = purchase.get()["refundRequestTypedData"]
    with capture(execute=False) as requests_submission:
        requested = purchase.parties.buyer_api.patch("/purchase", {
            "network": "Preprod", "blockchainIdentifier": purchase.id,
            "signature": sign_typed_data(purchase.parties.buyer_account.key, typed)})
    assert requested.status_code == 200, requested.content
    monkeypatch.setattr(purchases, "selectors", TickReadBeforeTheOtherCommitted(purchases.selectors))
    with capture(execute=True):
        purchases.purchases_tick()
    monkeypatch.undo()
    assert ChainTransaction.objects.filter(agreement_id=purchase.created["agreementId"],
                                           purpose=TxPurpose.CHALLENGE).count() == 1
    assert purchase.get()["NextAction"]["errorType"] is None
    with capture(execute=True):
        for submit in requests_submission:
            submit()
    confirm_all(capture)
    assert purchase.get()["onChainState"] == "Disputed"


def test_two_ticks_releasing_one_unresolved_dispute_to_the_buyer_record_no_error(
        escrow_chain, seller_service, django_capture_on_commit_callbacks, monkeypatch):
    """Two ticks at once (a retried one beside the next beat) each read the dispute due for its release to the buyer:
    the second's resolution is refused (`resolution_in_progress`), the first's under way, which is no error."""
    chain = escrow_chain
    purchase = Purchase(chain, django_capture_on_commit_callbacks, seller_service)
    dispute(purchase)
    chain.increase_time(purchase.timers["externalDisputeUnlockTime"] - chain.now())
    with django_capture_on_commit_callbacks(execute=False) as first_ticks_submission:
        assert purchases.purchases_tick()["released"] == 1
    monkeypatch.setattr(purchases, "selectors", TickReadBeforeTheOtherCommitted(purchases.selectors))
    with django_capture_on_commit_callbacks(execute=True):
        purchases.purchases_tick()
    monkeypatch.undo()
    assert purchase.get()["NextAction"]["errorType"] is None
    with django_capture_on_commit_callbacks(execute=True):
        for submit in first_ticks_submission:
            submit()
    confirm_all(purchase.capture)  # the resolution, then its finalize
    confirm_all(purchase.capture)
    assert purchase.get()["onChainState"] == "DisputedWithdrawn"
    purchase.assert_moved(seller=0, buyer=PRICE)


def test_a_purchases_seller_cannot_charge_it_by_reporting_usage_after_moving_its_service_off_masumi(
        escrow_chain, seller_service, django_capture_on_commit_callbacks):
    # The report's check looked up the purchase only while the agreement's service was still a `masumi` one: a seller
    # who switched its service to `http` after the sale charged the whole price by a report, with no result.
    purchase = Purchase(escrow_chain, django_capture_on_commit_callbacks, seller_service)
    agreement_id = purchase.created["agreementId"]
    moved = purchase.parties.seller_api.patch(f"/agents/services/{purchase.parties.service.pk}",
                                              {"upstream_protocol": "http"})
    assert moved.status_code == 200, moved.content
    refused = purchase.parties.seller_api.post(f"/usage-agreements/{agreement_id}/record-usage", {"units": 1},
                                               headers={"Idempotency-Key": "no-result"})
    assert refused.status_code == 409 and error_code(refused) == "job_result_only", refused.content
    assert not UsageEvent.objects.filter(agreement_id=agreement_id).exists()
    assert purchase.parties.agreement(agreement_id)["completion_requested_at"] is None


def test_a_result_not_matching_the_hash_its_seller_submitted_backs_off_and_is_shown(
        escrow_chain, http_server, django_capture_on_commit_callbacks):
    """The seller committed a result hash (POST /payment/submit-result), then its /status answered a result of
    another hash: refused (`result_hash_mismatch`), but the call counted as a success, so the seller was asked
    again at every tick until submitResultTime, the same refused answer each time."""
    capture = django_capture_on_commit_callbacks
    http_server.responses.extend([(200, {"job_id": "job-1", "payment_id": "pay-1"}),
                                  (200, {"job_id": "job-1", "status": "running"})])
    purchase = Purchase(escrow_chain, capture, http_server)
    assert purchase.tick()["started"] == 1
    with capture(execute=True):
        submitted = purchase.parties.seller_api.post("/payment/submit-result", {
            "network": "Preprod", "blockchainIdentifier": purchase.id, "submitResultHash": "c" * 64})
    assert submitted.status_code == 200, submitted.content
    confirm_all(capture)
    http_server.responses.extend([(200, {"job_id": "job-1", "status": "completed", "result": "the report"})] * 5)
    calls = len(http_server.requests)

    assert purchase.tick()["results"] == 0
    assert len(http_server.requests) == calls + 1
    refused = row(purchase)
    assert refused.result == "" and refused.result_hash == "c" * 64
    assert "does not match" in refused.last_error and refused.job_call_failures == 1
    assert purchase.get()["NextAction"]["errorType"] == "SellerServiceError"
    assert refused.job_next_call_at >= timezone.now() + timedelta(seconds=15)  # tick interval x 2

    purchase.tick()
    assert len(http_server.requests) == calls + 1  # not asked again before its backoff


def test_a_purchases_tick_against_a_node_of_another_chain_expires_nothing(escrow_chain, seller_service, settings,
                                                                          django_capture_on_commit_callbacks):
    """CHAIN_RPC_URL naming a node of another chain than CHAIN_ID: the tick took that chain's clock for ours and
    expired purchases unfunded by it (their buyer's signed intent may still be mined on ours). The node's chain id
    is checked first: WrongChain, loudly, and nothing moves."""
    chain = escrow_chain
    parties = Parties(chain, upstream_base_url=seller_service.url, upstream_protocol="masumi", skills=[])
    created = parties.buyer_api.post("/purchase", {"network": "Preprod", "input_data": INPUT,
                                                   "agentIdentifier": str(parties.service.pk)}).json()["data"]
    chain.increase_time(created["ActivationPackage"]["deadline"] - chain.now())
    chain.mine()
    settings.CHAIN_ID = 8453  # the node is Anvil's 31337
    with django_capture_on_commit_callbacks(execute=False), pytest.raises(gateway.WrongChain, match="chain id"):
        purchases.purchases_tick()
    assert parties.agreement(created["agreementId"])["status"] != "expired"


@pytest.mark.parametrize("number", ["6.02e23", "1e16", "1e-05"])
def test_the_seller_is_sent_the_input_the_buyer_hashed_and_paid_for(
        escrow_chain, seller_service, django_capture_on_commit_callbacks, number):
    """MIP-004: the seller checks the input it is sent against the purchase's inputHash (the masumi library's seller
    asks for its payment by it). A float written with an exponent came back from the database as another number
    (jsonb keeps numbers as decimals: 6.02e+23 read back as the integer 602000000000000000000000), so the seller was
    sent an input whose hash was not the one the buyer paid for."""
    input_data = {"quantity": json.loads(number), "unit": "mol"}
    purchase = Purchase(escrow_chain, django_capture_on_commit_callbacks, seller_service, input_data=input_data)
    assert purchase.created["inputHash"] == purchases.input_hash_of(input_data, "order-17")
    purchase.tick()
    [sent] = seller_service.started
    assert purchases.input_hash_of(sent, "order-17") == purchase.created["inputHash"]
    assert json.dumps(sent, sort_keys=True) == json.dumps(input_data, sort_keys=True)


def test_an_input_the_database_cannot_keep_as_hashed_is_refused_and_floats_are_bounded_as_stored(
        escrow_chain, seller_service, settings):
    """Minus zero is stored as 0 (another inputHash): 400, nothing recorded. A float stored positionally (1e308: 309
    digits) counts at its stored size against MASUMI_INPUT_DATA_MAX_BYTES."""
    settings.MASUMI_INPUT_DATA_MAX_BYTES = 1000
    parties = Parties(escrow_chain, upstream_base_url=seller_service.url, upstream_protocol="masumi", skills=[],
                      pricing={"type": "per_call", "unit_name": "job", "unit_price_atomic": PRICE, "token": "USDC"})
    body = {"network": "Preprod", "agentIdentifier": str(parties.service.pk)}
    minus_zero = parties.buyer_api.post("/purchase", {**body, "input_data": {"offset": [1.5, -0.0]}})
    assert minus_zero.status_code == 400, minus_zero.content
    assert codes_at(minus_zero, "input_data") == {"minus_zero"}, minus_zero.content
    huge_floats = parties.buyer_api.post("/purchase", {**body, "input_data": [1e308] * 4})
    assert huge_floats.status_code == 400, huge_floats.content
    assert codes_at(huge_floats, "input_data") == {"too_large"}, huge_floats.content
    assert not MasumiPurchase.objects.exists()
    assert parties.buyer_api.post("/purchase", {**body, "input_data": [1e308] * 3}).status_code == 200


def test_a_purchase_is_not_charged_by_a_call_through_the_metered_proxy(escrow_chain, seller_service,
                                                                     django_capture_on_commit_callbacks):
    """A purchase is paid for its job result alone. Its buyer's call through the metered proxy (its agreement is an
    escrow agreement like any other, and its service's upstream the Masumi service) was forwarded and charged the
    job's whole price as one call: the budget used up, the seller's result then refused (`agreement_already_used`)
    and that call proposed for settlement, the buyer charged for no job."""
    purchase = Purchase(escrow_chain, django_capture_on_commit_callbacks, seller_service)
    agreement_id = purchase.created["agreementId"]
    called = purchase.parties.buyer_api.get(f"/metered-proxy/{agreement_id}/availability")
    assert (called.status_code, called.get("X-Usage-Cost")) == (409, None)
    assert error_code(called) == "job_result_only"
    assert not UsageEvent.objects.filter(agreement_id=agreement_id).exists()

    assert purchase.tick()["started"] == 1
    assert purchase.tick()["results"] == 1  # the result is the purchase's charge
    assert purchase.get()["onChainState"] == "ResultSubmitted"


@pytest.mark.parametrize("party", ["buyer", "seller"])
def test_a_purchase_is_not_ended_unpaid_by_completing_its_agreement(
        escrow_chain, seller_service, django_capture_on_commit_callbacks, party):
    """A purchase ends by its job result or its timers (a refund request disputes the result). The buyer's
    `POST /usage-agreements/{id}/complete` once the funds were locked (the seller told FundsLocked, running the job)
    asked for completion with nothing charged: the seller's result was refused (`agreement_already_used`) and a zero
    settlement proposed, the buyer refunded whole with no dispute, the result (a masumi-library seller's /status)
    its own."""
    purchase = Purchase(escrow_chain, django_capture_on_commit_callbacks, seller_service)
    agreement_id = purchase.created["agreementId"]
    api = purchase.parties.buyer_api if party == "buyer" else purchase.parties.seller_api
    refused = api.post(f"/usage-agreements/{agreement_id}/complete", {})
    assert refused.status_code == 409 and error_code(refused) == "job_result_only", refused.content
    assert purchase.parties.agreement(agreement_id)["completion_requested_at"] is None

    assert purchase.tick()["started"] == 1
    assert purchase.tick()["results"] == 1  # the result is the purchase's end
    assert purchase.get()["onChainState"] == "ResultSubmitted"



@pytest.mark.parametrize("path", ["dispute", "challenge"])
def test_a_purchases_result_is_not_disputed_after_unlock_time_through_the_escrow_endpoints(
        escrow_chain, seller_service, django_capture_on_commit_callbacks, path):
    """Masumi: the seller's payment is unlocked at unlockTime; a refund request after it is 409 `unlock_time_passed`.
    The proposal of a result that came after the purchase opens its window past unlockTime (by as long as the
    result took), and the escrow endpoints' dispute was accepted there (202, disputed): the seller's delivered
    result then released to the buyer at externalDisputeUnlockTime."""
    chain = escrow_chain
    purchase = Purchase(chain, django_capture_on_commit_callbacks, seller_service)
    assert purchase.tick()["started"] == 1
    chain.increase_time(900)  # the job takes a while: its proposal's window ends ~900 s past unlockTime
    assert purchase.tick()["results"] == 1
    assert purchase.get()["onChainState"] == "ResultSubmitted"
    agreement_id = purchase.created["agreementId"]
    chain.increase_time(purchase.timers["unlockTime"] + 60 - chain.now())

    asked = purchase.parties.buyer_api.post(f"/usage-agreements/{agreement_id}/dispute",
                                            {"reason": "the summary is wrong"})
    assert asked.status_code == 400 and error_code(asked) == "buyer_signature_required", asked.content
    details = asked.json()["error"]["details"]
    signature = sign_typed_data(purchase.parties.buyer_account.key, details["challenge"])
    with purchase.capture(execute=True):
        refused = purchase.parties.buyer_api.post(f"/usage-agreements/{agreement_id}/{path}", {
            "reason": "the summary is wrong", "deadline": details["deadline"], "signature": signature})
    assert refused.status_code == 409 and error_code(refused) == "unlock_time_passed", refused.content
    assert not ChainTransaction.objects.filter(agreement_id=agreement_id, purpose=TxPurpose.CHALLENGE).exists()


def _buyer_challenges_onchain_itself(purchase) -> None:
    """The buyer's own wallet calls the contract's `challenge` (its gas), then the indexer applies the event."""
    chain = purchase.chain
    agreement_onchain_id = MasumiPurchase.objects.get(agreement_id=purchase.created["agreementId"]).agreement.onchain_id
    sent = chain.escrow.functions.challenge(agreement_onchain_id, escrow_terms(chain.escrow, agreement_onchain_id)
                                            ).transact({"from": purchase.parties.buyer_account.address})
    assert chain.w3.eth.wait_for_transaction_receipt(sent, poll_latency=0.01)["status"] == 1
    with purchase.capture(execute=True):
        indexer.index_pass()
    assert purchase.get()["onChainState"] == "Disputed"


def test_a_buyers_own_onchain_challenge_after_unlock_time_does_not_take_the_sellers_payment(
        escrow_chain, seller_service, django_capture_on_commit_callbacks):
    """Masumi: from unlockTime on the seller's payment is unlocked, a refund request is 409 `unlock_time_passed` and
    so is a dispute through the escrow endpoints. The contract's window of a result's proposal runs past unlockTime
    (by as long as the result took), and the buyer may call `challenge` there with its own wallet: the dispute is
    dated by its block and resolved for the seller (the arbiter upholds the proposal), not released to the buyer at
    externalDisputeUnlockTime."""
    chain = escrow_chain
    purchase = Purchase(chain, django_capture_on_commit_callbacks, seller_service)
    assert purchase.tick()["started"] == 1
    chain.increase_time(900)  # the job takes a while: its proposal's window ends ~900 s past unlockTime
    assert purchase.tick()["results"] == 1
    chain.increase_time(purchase.timers["unlockTime"] + 60 - chain.now())
    _buyer_challenges_onchain_itself(purchase)
    assert purchase.tick()["released"] == 1  # resolved at once, the seller's payment unlocked since unlockTime
    disputed_at = MasumiPurchase.objects.get(agreement_id=purchase.created["agreementId"]).disputed_at
    assert disputed_at.timestamp() >= purchase.timers["unlockTime"]

    chain.increase_time(purchase.timers["externalDisputeUnlockTime"] - chain.now() + 60)
    purchase.tick()
    purchase.settle()
    confirm_all(purchase.capture)
    assert purchase.get()["onChainState"] == "Withdrawn"
    purchase.assert_moved(seller=PRICE, buyer=0)
    call_command("reconcile")


def test_a_buyers_own_onchain_challenge_before_unlock_time_is_released_to_it_at_external_dispute_unlock_time(
        escrow_chain, seller_service, django_capture_on_commit_callbacks):
    """The buyer's own `challenge` before unlockTime is a dispute as a refund request is: unresolved, it goes to the
    buyer at externalDisputeUnlockTime."""
    chain = escrow_chain
    purchase = Purchase(chain, django_capture_on_commit_callbacks, seller_service)
    assert purchase.tick()["started"] == 1
    assert purchase.tick()["results"] == 1
    chain.increase_time(purchase.timers["unlockTime"] - 120 - chain.now())
    _buyer_challenges_onchain_itself(purchase)
    assert purchase.tick()["released"] == 0

    chain.increase_time(purchase.timers["externalDisputeUnlockTime"] - chain.now())
    assert purchase.tick()["released"] == 1
    confirm_all(purchase.capture)
    assert purchase.get()["onChainState"] == "RefundWithdrawn"
    purchase.assert_moved(seller=0, buyer=PRICE)


def test_a_refund_requested_in_time_and_challenged_by_the_buyer_itself_after_unlock_time_stays_the_buyers(
        escrow_chain, seller_service, django_capture_on_commit_callbacks):
    """A refund requested before unlockTime stands (Masumi): one without the buyer's signature is not sent, and the
    buyer's own `challenge` after unlockTime carries it out; unresolved, it goes to the buyer at
    externalDisputeUnlockTime, not to the seller."""
    chain = escrow_chain
    purchase = Purchase(chain, django_capture_on_commit_callbacks, seller_service)
    assert purchase.tick()["started"] == 1
    chain.increase_time(900)
    assert purchase.tick()["results"] == 1
    requested = purchase.parties.buyer_api.post("/purchase/request-refund/", {
        "network": "Preprod", "blockchainIdentifier": purchase.id})
    assert requested.status_code == 200, requested.content
    assert requested.json()["data"]["NextAction"]["errorType"] == "RefundSignatureMissing"
    chain.increase_time(purchase.timers["unlockTime"] + 60 - chain.now())
    _buyer_challenges_onchain_itself(purchase)
    assert purchase.tick()["released"] == 0

    chain.increase_time(purchase.timers["externalDisputeUnlockTime"] - chain.now())
    assert purchase.tick()["released"] == 1
    confirm_all(purchase.capture)
    assert purchase.get()["onChainState"] == "DisputedWithdrawn"
    purchase.assert_moved(seller=0, buyer=PRICE)



@pytest.mark.parametrize("node_back_after_unlock_time", [-20, 60], ids=["in_its_last_seconds", "past_it"])
def test_a_refund_requested_before_the_result_stays_the_buyers_when_the_results_proposal_is_delayed_to_unlock_time(
        escrow_chain, seller_service, monkeypatch, django_capture_on_commit_callbacks, node_back_after_unlock_time):
    """A refund requested (signed until unlockTime) before the result is carried out by disputing the result's
    proposal. The proposal delayed (the node down) until unlockTime's last seconds, or past it, was still sent; its
    dispute was then refused (`signature_expired`, past unlockTime `unlock_time_passed`) at every tick, and the
    seller was paid at the proposal's window end: the buyer who asked in time lost its refund. Not proposed, the
    escrow is reclaimed for the buyer after the contract's grace."""
    chain, capture = escrow_chain, django_capture_on_commit_callbacks
    seller_service.mode = "never"
    purchase = Purchase(chain, capture, seller_service)
    assert purchase.tick()["started"] == 1
    typed = purchase.get()["refundRequestTypedData"]
    requested = purchase.parties.buyer_api.patch("/purchase", {
        "network": "Preprod", "blockchainIdentifier": purchase.id,
        "signature": sign_typed_data(purchase.parties.buyer_account.key, typed)})
    assert requested.status_code == 200 and requested.json()["data"]["onChainState"] == "RefundRequested"
    seller_service.mode = "result"

    def node_down(**_):
        raise gateway.RpcUnavailable("read timed out")

    with monkeypatch.context() as patched:  # the result recorded, its proposal deferred to the settlement tick
        patched.setattr(settlement.selectors, "escrow_terms", node_down)
        assert run(capture, purchases.purchases_jobs_tick)["results"] == 1
    chain.increase_time(purchase.timers["unlockTime"] + node_back_after_unlock_time - chain.now())
    assert purchase.settle()["proposed"] == 0  # was 1, its dispute then refused
    assert purchase.tick()["disputed"] == 0
    assert row(purchase).last_error == ""

    chain.increase_time(purchase.timers["submitResultTime"] + chain.reclaim_grace - chain.now())
    assert purchase.settle()["reclaiming"] == 1
    assert purchase.get()["onChainState"] == "RefundWithdrawn"
    purchase.assert_moved(seller=0, buyer=PRICE)
    call_command("reconcile")


@pytest.mark.parametrize(("node_back_after_unlock_time", "outcome"), [(-200, "Disputed"), (60, "Withdrawn")],
                         ids=["while_its_dispute_can_be_mined", "past_it"])
def test_a_refund_requested_after_the_result_does_not_take_the_sellers_pay_when_the_results_proposal_is_delayed(
        escrow_chain, seller_service, monkeypatch, django_capture_on_commit_callbacks, node_back_after_unlock_time,
        outcome):
    """The seller's result recorded before submitResultTime, its proposal deferred (the node down), and the buyer,
    holding the result, asks for its refund (signed) before the proposal is sent. The node back in unlockTime's last
    minutes, the proposal was held back as for a refund asked before the result (`_refund_request_stranded`), and the
    escrow reclaimed for the buyer after the contract's grace: the seller's work delivered in time went unpaid and
    undisputed. The result is the seller's claim: it is proposed, and the buyer's request disputes it while its
    signature can still be mined (an operator decides, as for a prompt proposal); past that, the buyer's own
    challenge is its recourse, and the seller is paid at the window's end."""
    chain, capture = escrow_chain, django_capture_on_commit_callbacks
    purchase = Purchase(chain, capture, seller_service)
    assert purchase.tick()["started"] == 1

    def node_down(**_):
        raise gateway.RpcUnavailable("read timed out")

    with monkeypatch.context() as patched:  # the result recorded, its proposal deferred to the settlement tick
        patched.setattr(settlement.selectors, "escrow_terms", node_down)
        assert run(capture, purchases.purchases_jobs_tick)["results"] == 1
    assert purchase.get()["result"]  # the buyer has it
    typed = purchase.get()["refundRequestTypedData"]
    requested = purchase.parties.buyer_api.patch("/purchase", {
        "network": "Preprod", "blockchainIdentifier": purchase.id,
        "signature": sign_typed_data(purchase.parties.buyer_account.key, typed)})
    assert requested.status_code == 200 and requested.json()["data"]["onChainState"] == "RefundRequested"

    chain.increase_time(purchase.timers["unlockTime"] + node_back_after_unlock_time - chain.now())
    assert purchase.settle()["proposed"] == 1  # was 0: held back, then reclaimed for the buyer
    purchase.tick()
    assert purchase.get()["onChainState"] == ("Disputed" if outcome == "Disputed" else "RefundRequested")
    chain.increase_time(purchase.timers["submitResultTime"] + chain.reclaim_grace - chain.now())
    assert purchase.settle()["reclaiming"] == 0
    if outcome == "Withdrawn":
        chain.increase_time(2 * (purchase.timers["unlockTime"] - purchase.timers["payByTime"]))
        assert purchase.settle()["finalizing"] == 1
        confirm_all(capture)
        purchase.assert_moved(seller=PRICE, buyer=0)
    assert purchase.onchain()["state"] != "reclaimed"
    call_command("reconcile")


def test_the_buyers_signed_refund_request_mined_at_unlock_time_itself_is_in_time(
        escrow_chain, seller_service, django_capture_on_commit_callbacks):
    """The refund request handed out (`refundRequestTypedData`) is signed until unlockTime, and the contract takes it
    while `block.timestamp <= deadline`: sent by the buyer itself (no PATCH /purchase) and mined at unlockTime's very
    second, its dispute was dated late (`disputed_at >= unlockTime`) and resolved for the seller at once."""
    chain = escrow_chain
    purchase = Purchase(chain, django_capture_on_commit_callbacks, seller_service)
    assert purchase.tick()["started"] == 1
    chain.increase_time(900)  # the result's proposal opens its window past unlockTime
    assert purchase.tick()["results"] == 1
    typed = purchase.get()["refundRequestTypedData"]
    signature = sign_typed_data(purchase.parties.buyer_account.key, typed)
    unlock = purchase.timers["unlockTime"]
    onchain_id = row(purchase).agreement.onchain_id
    chain.increase_time(unlock - 30 - chain.now())
    chain.set_next_timestamp(unlock)
    sent = chain.escrow.functions.challengeWithSig(
        onchain_id, escrow_terms(chain.escrow, onchain_id), unlock, signature,
    ).transact({"from": purchase.parties.buyer_account.address})
    assert chain.w3.eth.wait_for_transaction_receipt(sent, poll_latency=0.01)["status"] == 1
    with purchase.capture(execute=True):
        indexer.index_pass()
    assert purchase.get()["onChainState"] == "Disputed"
    assert purchase.tick()["released"] == 0  # was 1: upheld for the seller
    assert row(purchase).disputed_at.timestamp() == unlock

    chain.increase_time(purchase.timers["externalDisputeUnlockTime"] - chain.now())
    assert purchase.tick()["released"] == 1
    confirm_all(purchase.capture)
    purchase.assert_moved(seller=0, buyer=PRICE)


@pytest.mark.parametrize("mined_after_unlock_time", [-20, 60], ids=["in_its_last_seconds", "past_it"])
def test_a_refund_requested_before_the_result_stays_the_buyers_when_a_slow_relayer_mines_the_proposal_late(
        escrow_chain, seller_service, django_capture_on_commit_callbacks, mined_after_unlock_time):
    """The result's proposal queued in time (unlockTime far enough for its dispute), but the relayer sent it only in
    unlockTime's last seconds, or past it: its dispute was then refused (`signature_expired`, `unlock_time_passed`)
    at every tick and the seller was paid at the proposal's window end, the buyer who asked first losing its refund.
    The platform proposes a zero receipt above it instead: at that window's end the buyer has everything back."""
    chain, capture = escrow_chain, django_capture_on_commit_callbacks
    purchase = _result_proposal_mined_past_unlock_time(chain, capture, seller_service,
                                                       mined_after_unlock_time=mined_after_unlock_time)
    assert purchase.get()["onChainState"] == "RefundRequested"

    assert purchase.tick()["refunding"] == 1  # was 0: the dispute refused, the seller paid at the window's end
    assert purchase.tick()["refunding"] == 0  # once
    chain.increase_time(2 * (purchase.timers["unlockTime"] - purchase.timers["payByTime"]))
    assert purchase.settle()["finalizing"] == 1
    confirm_all(capture)
    assert purchase.get()["onChainState"] in ("RefundWithdrawn", "DisputedWithdrawn")
    purchase.assert_moved(seller=0, buyer=PRICE)
    call_command("reconcile")


def test_a_dispute_dated_by_a_challenge_a_reorg_takes_is_dated_again_by_the_one_on_the_new_branch(
        escrow_chain, seller_service, django_capture_on_commit_callbacks):
    """`disputed_at` stayed the block time of a challenge a reorg took: the buyer's challenge on the new branch, mined
    after unlockTime, counted as one before it and the seller's payment went to the buyer at
    externalDisputeUnlockTime."""
    chain = escrow_chain
    purchase = Purchase(chain, django_capture_on_commit_callbacks, seller_service)
    assert purchase.tick()["started"] == 1
    chain.increase_time(900)  # the result's proposal opens its window past unlockTime
    assert purchase.tick()["results"] == 1
    unlock = purchase.timers["unlockTime"]
    chain.increase_time(unlock - 120 - chain.now())
    before_the_challenge = chain.snapshot()
    _buyer_challenges_onchain_itself(purchase)
    assert purchase.tick()["released"] == 0
    assert row(purchase).disputed_at.timestamp() < unlock

    chain.reorg(before_the_challenge)
    chain.increase_time(unlock + 60 - chain.now())
    _buyer_challenges_onchain_itself(purchase)  # the indexer rolls the first back, applies this one
    assert purchase.tick()["released"] == 1  # was 0: dated by the challenge the reorg took
    assert row(purchase).disputed_at.timestamp() > unlock
    confirm_all(purchase.capture)
    assert purchase.get()["onChainState"] == "Withdrawn"
    purchase.assert_moved(seller=PRICE, buyer=0)


def test_a_dispute_whose_challenge_is_not_found_is_looked_for_from_where_the_last_tick_stopped(
        escrow_chain, seller_service, django_capture_on_commit_callbacks, monkeypatch, settings):
    """Books disputed and no Challenged event found (a node whose logs lag): each tick searched the chain's logs
    from the escrow's deployment block again, a cost growing with the chain for as long as it lasted."""
    chain = escrow_chain
    settings.INDEXER_REORG_WINDOW_BLOCKS = 2
    purchase = Purchase(chain, django_capture_on_commit_callbacks, seller_service)
    searched_from = []
    challenged = gateway.event_topic(gateway.escrow_contract().events.Challenged())
    first_logs = gateway.first_logs

    def logs_lagging(**kwargs):
        if kwargs["topics"][0] == challenged:
            searched_from.append(kwargs["from_block"])
            return []
        return first_logs(**kwargs)

    monkeypatch.setattr(gateway, "first_logs", logs_lagging)
    dispute(purchase)
    chain.mine(10)
    purchase.tick()
    chain.mine(10)
    purchase.tick()
    assert row(purchase).disputed_at is None
    assert len(searched_from) >= 2
    assert searched_from[-1] > chain.addresses["escrow_block"]  # was the deployment block at every tick
    assert searched_from[-1] > searched_from[0]


def _result_proposal_mined_past_unlock_time(chain, capture, seller_service, *,
                                            mined_after_unlock_time: int = 60) -> Purchase:
    """A refund asked for before the result; the result's proposal queued in time but mined by a slow relayer
    `mined_after_unlock_time` seconds after unlockTime (or before it, when negative), where the buyer's signed dispute
    can no longer run (the zero refund proposal's case)."""
    seller_service.mode = "never"
    purchase = Purchase(chain, capture, seller_service)
    assert purchase.tick()["started"] == 1
    requested = purchase.parties.buyer_api.patch("/purchase", {
        "network": "Preprod", "blockchainIdentifier": purchase.id,
        "signature": sign_typed_data(purchase.parties.buyer_account.key, purchase.get()["refundRequestTypedData"])})
    assert requested.status_code == 200, requested.content
    seller_service.mode = "result"
    with capture(execute=False):  # the proposal queued, its submission not run: a relayer behind
        assert purchases.purchases_jobs_tick()["results"] == 1
    [proposal] = ChainTransaction.objects.filter(agreement_id=purchase.created["agreementId"],
                                                 purpose=TxPurpose.PROPOSE_SETTLEMENT)
    chain.increase_time(purchase.timers["unlockTime"] + mined_after_unlock_time - chain.now())
    with capture(execute=True):
        relayer.transaction_submit(transaction_id=proposal.pk)
    confirm_all(capture)
    return purchase


def test_a_refund_request_carried_out_by_a_zero_proposal_cannot_be_withdrawn(
        escrow_chain, seller_service, django_capture_on_commit_callbacks):
    """The zero proposal that carries out a refund request is that request on the chain: withdrawn after it was
    queued, the buyer was answered 200 (its request withdrawn, the seller to be paid for the result) and the zero
    proposal refunded it all the same. 409 `refund_already_submitted`, as once its challenge is queued."""
    chain, capture = escrow_chain, django_capture_on_commit_callbacks
    purchase = _result_proposal_mined_past_unlock_time(chain, capture, seller_service)
    assert purchase.tick()["refunding"] == 1

    withdrawn = purchase.parties.buyer_api.post("/purchase/cancel-refund-request", {
        "network": "Preprod", "blockchainIdentifier": purchase.id})
    assert (withdrawn.status_code, error_code(withdrawn)) == (409, "refund_already_submitted"), withdrawn.content
    assert purchase.get()["refundRequestedAt"] is not None
    chain.increase_time(2 * (purchase.timers["unlockTime"] - purchase.timers["payByTime"]))
    assert purchase.settle()["finalizing"] == 1
    confirm_all(capture)
    purchase.assert_moved(seller=0, buyer=PRICE)


def test_a_refund_request_withdrawn_while_its_zero_proposal_is_prepared_is_not_proposed(
        escrow_chain, seller_service, django_capture_on_commit_callbacks, monkeypatch):
    """The zero proposal reads the escrow before it takes the agreement's lock; the buyer's cancel-refund-request
    arriving meanwhile found nothing queued and answered 200, and the zero proposal was queued all the same: the
    buyer refunded after it withdrew its request, the seller unpaid for its result. Withdrawn, nothing is proposed
    and the result's proposal pays the seller at its window's end."""
    chain, capture = escrow_chain, django_capture_on_commit_callbacks
    purchase = _result_proposal_mined_past_unlock_time(chain, capture, seller_service)
    escrow_terms_of, withdrawn = settlement.selectors.escrow_terms, []

    def withdrawn_meanwhile(**kwargs):
        if not withdrawn:
            withdrawn.append(purchase.parties.buyer_api.post("/purchase/cancel-refund-request", {
                "network": "Preprod", "blockchainIdentifier": purchase.id}))
        return escrow_terms_of(**kwargs)

    monkeypatch.setattr(settlement.selectors, "escrow_terms", withdrawn_meanwhile)
    assert purchase.tick()["refunding"] == 0
    monkeypatch.undo()
    [cancelled] = withdrawn
    assert cancelled.status_code == 200, cancelled.content
    assert not ChainTransaction.objects.filter(agreement_id=purchase.created["agreementId"],
                                               purpose=TxPurpose.MASUMI_REFUND_PROPOSAL).exists()
    chain.increase_time(2 * (purchase.timers["unlockTime"] - purchase.timers["payByTime"]))
    assert purchase.settle()["finalizing"] == 1
    confirm_all(capture)
    purchase.assert_moved(seller=PRICE, buyer=0)


def test_a_zero_refund_proposal_that_keeps_failing_is_sent_again_with_the_proposals_backoff(
        escrow_chain, seller_service, django_capture_on_commit_callbacks, settings):
    """The zero proposal carrying out a refund request reverts (the relayer's key lost the escrow's operator role, say):
    each tick of the purchases (every few seconds) queued another, a failed transaction a tick for as long as the
    result's window lasted (unlockTime less the purchase's time, up to 30 days). It waits as a settlement proposal's
    retry does (SETTLEMENT_PROPOSE_BACKOFF_SECONDS, doubling; none after SETTLEMENT_PROPOSE_MAX_ATTEMPTS)."""
    chain, capture = escrow_chain, django_capture_on_commit_callbacks
    settings.SETTLEMENT_PROPOSE_BACKOFF_SECONDS = 3600
    purchase = _result_proposal_mined_past_unlock_time(chain, capture, seller_service)
    role = chain.escrow.functions.OPERATOR_ROLE().call()
    relayer_address = gateway.relayer_account().address
    chain.escrow.functions.revokeRole(role, relayer_address).transact({"from": chain.accounts.deployer.address})

    for _ in range(3):
        purchase.tick()

    refunds = ChainTransaction.objects.filter(agreement_id=purchase.created["agreementId"],
                                              purpose=TxPurpose.MASUMI_REFUND_PROPOSAL)
    assert list(refunds.values_list("status", flat=True)) == ["failed"]  # was three
    assert "NotOperatorOrSeller" in refunds.get().failure_reason


def test_an_operators_retry_of_a_failed_zero_refund_proposal_is_refused_once_the_buyer_withdrew_its_request(
        escrow_chain, seller_service, django_capture_on_commit_callbacks, settings, admin_client):
    """The zero proposal carrying out a refund request failed (the relayer's key without the escrow's operator role);
    the buyer then withdrew its request (200: nothing of it on the chain), and the dashboard still listed the failed
    proposal as given up, for an operator to retry. Its retry queued the zero proposal all the same: the buyer
    refunded in full after it withdrew its request, the seller unpaid for its result. 409 `no_longer_wanted`, the
    dashboard lists it no more, and the result's proposal pays the seller at its window's end."""
    from django.contrib.auth import get_user_model

    from tests.support.operators import staff_account

    chain, capture = escrow_chain, django_capture_on_commit_callbacks
    purchase = _result_proposal_mined_past_unlock_time(chain, capture, seller_service)
    role = chain.escrow.functions.OPERATOR_ROLE().call()
    relayer_address = gateway.relayer_account().address
    chain.escrow.functions.revokeRole(role, relayer_address).transact({"from": chain.accounts.deployer.address})
    purchase.tick()
    [failed] = ChainTransaction.objects.filter(agreement_id=purchase.created["agreementId"],
                                               purpose=TxPurpose.MASUMI_REFUND_PROPOSAL, status="failed")
    chain.escrow.functions.grantRole(role, relayer_address).transact({"from": chain.accounts.deployer.address})
    settings.SETTLEMENT_PROPOSE_MAX_ATTEMPTS = 1

    def listed() -> list[str]:
        return [item.kind for item in admin_client.get("/admin/dashboard/").context["overdue"]
                if item.subject == purchase.created["agreementId"]]

    assert listed() == ["masumi refund proposal failed 1 times, not retried"]
    withdrawn = purchase.parties.buyer_api.post("/purchase/cancel-refund-request", {
        "network": "Preprod", "blockchainIdentifier": purchase.id})
    assert withdrawn.status_code == 200, withdrawn.content
    assert listed() == []

    with pytest.raises(relayer.Conflict) as refused:
        relayer.transaction_retry(tx=failed, operator=get_user_model().objects.get(username=staff_account()))
    assert refused.value.code == "no_longer_wanted"
    assert not ChainTransaction.objects.filter(agreement_id=purchase.created["agreementId"],
                                               purpose=TxPurpose.MASUMI_REFUND_PROPOSAL).exclude(pk=failed.pk).exists()
    confirm_all(capture)
    chain.increase_time(2 * (purchase.timers["unlockTime"] - purchase.timers["payByTime"]))
    assert purchase.settle()["finalizing"] == 1
    confirm_all(capture)
    purchase.assert_moved(seller=PRICE, buyer=0)


def test_a_zero_refund_proposal_whose_receipt_signer_key_is_gone_is_shown_once_and_sent_once_the_key_is_back(
        escrow_chain, seller_service, django_capture_on_commit_callbacks, settings, caplog, admin_client):
    """The escrow names a receipt signer whose key was rotated away and not kept (RECEIPT_SIGNER_RETIRED_PRIVATE_KEYS):
    the zero proposal carrying out the refund request cannot be signed. Each tick logged an error and did nothing,
    for the whole window, and no operator's view showed it. Recorded once (a failed proposal never sent, one error
    logged) and listed on the dashboard while the key is missing; nothing is queued or sent, and the buyer may still
    withdraw its request. The key put back, the next tick proposes, and the buyer is refunded."""
    chain, capture = escrow_chain, django_capture_on_commit_callbacks
    settings.SETTLEMENT_PROPOSE_BACKOFF_SECONDS = 0
    purchase = _result_proposal_mined_past_unlock_time(chain, capture, seller_service)
    signer_key = settings.RECEIPT_SIGNER_PRIVATE_KEY
    settings.RECEIPT_SIGNER_PRIVATE_KEY, settings.RECEIPT_SIGNER_RETIRED_PRIVATE_KEYS = "0x" + "42" * 32, []
    refunds = ChainTransaction.objects.filter(agreement_id=purchase.created["agreementId"],
                                              purpose=TxPurpose.MASUMI_REFUND_PROPOSAL)

    with caplog.at_level(logging.ERROR, logger="escrow.settlement"):
        for _ in range(3):
            assert purchase.tick()["refunding"] == 0
    assert len([record for record in caplog.records if record.name == "escrow.settlement"]) == 1  # was one a tick
    [unsigned] = refunds
    assert (unsigned.status, unsigned.nonce, unsigned.attempts.count()) == ("failed", None, 0)
    assert "receipt signer" in unsigned.failure_reason
    dashboard = admin_client.get("/admin/dashboard/")
    [shown] = [item for item in dashboard.context["overdue"] if item.subject == purchase.created["agreementId"]]
    assert shown.kind == "masumi refund proposal not signed: its receipt signer's key is not kept"
    assert shown.admin_url == f"/admin/escrow/chaintransaction/{unsigned.pk}/change/"
    retried = admin_client.post("/admin/escrow/chaintransaction/",
                                {"action": "retry_failed", "_selected_action": [str(unsigned.pk)]}, follow=True)
    assert "Queued 1 transaction(s) again." not in retried.content.decode()  # the key, not a retry, sends it

    settings.RECEIPT_SIGNER_RETIRED_PRIVATE_KEYS = [signer_key]
    assert purchase.tick()["refunding"] == 1
    confirm_all(capture)
    assert refunds.filter(status="confirmed").count() == 1
    dashboard = admin_client.get("/admin/dashboard/")
    assert not [item for item in dashboard.context["overdue"] if item.subject == purchase.created["agreementId"]]
    chain.increase_time(2 * (purchase.timers["unlockTime"] - purchase.timers["payByTime"]))
    assert purchase.settle()["finalizing"] == 1
    confirm_all(capture)
    purchase.assert_moved(seller=0, buyer=PRICE)


def test_a_zero_refund_proposal_never_built_for_a_missing_key_is_no_attempt_once_the_key_is_back(
        escrow_chain, seller_service, django_capture_on_commit_callbacks, settings, admin_client):
    """The record of a zero proposal never built (its receipt signer's key missing) counted as one of the
    SETTLEMENT_PROPOSE_MAX_ATTEMPTS failed attempts: at the last one, with the key put back, the ticks sent nothing,
    the dashboard offered that record for an operator's retry, and the retry was refused (409 `never_built`: nothing
    to send). Nothing else sent it: the result's proposal paid the seller at its window's end, the buyer's refund
    request unanswered. A record never sent is no attempt: the key back, the next tick proposes."""
    chain, capture = escrow_chain, django_capture_on_commit_callbacks
    settings.SETTLEMENT_PROPOSE_BACKOFF_SECONDS = 0
    settings.SETTLEMENT_PROPOSE_MAX_ATTEMPTS = 1
    purchase = _result_proposal_mined_past_unlock_time(chain, capture, seller_service)
    signer_key = settings.RECEIPT_SIGNER_PRIVATE_KEY
    settings.RECEIPT_SIGNER_PRIVATE_KEY, settings.RECEIPT_SIGNER_RETIRED_PRIVATE_KEYS = "0x" + "42" * 32, []
    refunds = ChainTransaction.objects.filter(agreement_id=purchase.created["agreementId"],
                                              purpose=TxPurpose.MASUMI_REFUND_PROPOSAL)
    assert purchase.tick()["refunding"] == 0
    assert list(refunds.values_list("status", flat=True)) == ["failed"]  # recorded, never sent

    settings.RECEIPT_SIGNER_RETIRED_PRIVATE_KEYS = [signer_key]
    proposed = purchase.tick()["refunding"]

    assert proposed == 1, [item.kind for item in admin_client.get("/admin/dashboard/").context["overdue"]]
    confirm_all(capture)
    assert refunds.filter(status="confirmed").count() == 1
    chain.increase_time(2 * (purchase.timers["unlockTime"] - purchase.timers["payByTime"]))
    assert purchase.settle()["finalizing"] == 1
    confirm_all(capture)
    purchase.assert_moved(seller=0, buyer=PRICE)


@pytest.mark.chain
def test_a_sellers_job_status_is_shown_to_the_buyer_with_its_invisible_characters_escaped(
        escrow_chain, seller_service, django_capture_on_commit_callbacks):
    """`GET /status`'s `status` is seller text the buyer reads (`jobStatus`): stored as answered, a bidi override
    or a terminal escape in it reached the buyer, which every listing field refuses (marketplace.shown_text)."""
    purchase = Purchase(escrow_chain, django_capture_on_commit_callbacks, seller_service)
    seller_service._status = lambda job_id: (200, {"job_id": job_id, "status": "running\u202e\x1b[2Jdone"})
    purchase.tick()
    job_status = purchase.get()["jobStatus"]
    assert shown_text.unsafe_characters(job_status) == [], job_status
    assert job_status == "running\\u202e\\x1b[2Jdone"


def test_a_dispute_release_the_chain_keeps_refusing_backs_off_stops_and_is_shown_to_the_operator(
        escrow_chain, seller_service, django_capture_on_commit_callbacks, settings, admin_client):
    """A dispute unresolved by externalDisputeUnlockTime is released to the buyer by the purchases tick (the arbiter's
    resolve). Refused by the chain every time (here: the relayer lost the arbiter role), a new resolve was queued at
    every tick for ever, each failing, and nothing told the buyer or the operator why. It backs off as a settlement
    proposal does (SETTLEMENT_PROPOSE_*), then waits for an operator: on the dashboard, and in the purchase's
    NextAction as a machine-readable `DisputeReleaseFailed`."""
    from tests.escrow.flow import mined_what_was_sent

    chain, capture = escrow_chain, django_capture_on_commit_callbacks
    settings.SETTLEMENT_PROPOSE_MAX_ATTEMPTS = 3
    settings.SETTLEMENT_PROPOSE_BACKOFF_SECONDS = 0
    purchase = Purchase(chain, capture, seller_service)
    dispute(purchase)
    escrow, accounts = chain.escrow, chain.accounts
    escrow.functions.grantRole(escrow.functions.DEFAULT_ADMIN_ROLE().call(), accounts.spare.address).transact(
        {"from": accounts.deployer.address})
    escrow.functions.revokeRole(escrow.functions.ARBITER_ROLE().call(), accounts.deployer.address).transact(
        {"from": accounts.spare.address})
    mined_what_was_sent()
    chain.increase_time(purchase.timers["externalDisputeUnlockTime"] - chain.now())
    resolves = ChainTransaction.objects.filter(agreement_id=purchase.created["agreementId"],
                                               purpose=TxPurpose.RESOLVE)

    for _ in range(6):
        purchase.tick()
    assert resolves.count() == 3, f"{resolves.count()} resolves queued in 6 ticks, each refused"
    assert not resolves.exclude(status="failed").exists()
    shown = purchase.get()
    assert shown["onChainState"] == "Disputed"
    assert shown["NextAction"]["errorType"] == "DisputeReleaseFailed", shown["NextAction"]
    [given_up] = [item for item in admin_client.get("/admin/dashboard/").context["overdue"]
                  if item.subject == purchase.created["agreementId"] and "resolution" in item.kind]
    assert given_up.kind == "dispute resolution failed 3 times, not retried"


def test_a_node_failing_under_a_dispute_release_is_not_shown_as_the_sellers_failure(
        escrow_chain, seller_service, django_capture_on_commit_callbacks, rpc_relay):  # noqa: F811
    """The node not answering the purchases tick's release of a dispute (503 `chain_unavailable`) was kept as the
    purchase's last error: its NextAction said `SellerServiceError` with the raw "DependencyUnavailable: ..." for
    good (a disputed purchase's seller is called no more, which would have cleared it). The next tick releases it."""
    chain, capture = escrow_chain, django_capture_on_commit_callbacks
    purchase = Purchase(chain, capture, seller_service)
    dispute(purchase)
    chain.increase_time(purchase.timers["externalDisputeUnlockTime"] - chain.now())
    rpc_relay.throttle(lambda call: call.get("method") == "eth_call")
    assert run(capture, purchases.purchases_tick)["released"] == 0
    rpc_relay.throttle(lambda call: False)
    shown = purchase.get()["NextAction"]
    assert shown["errorType"] is None, shown

    assert run(capture, purchases.purchases_tick)["released"] == 1
    assert purchase.get()["NextAction"]["errorType"] is None


def test_a_result_refused_by_the_jobs_tick_is_shown_with_its_machine_readable_code(
        escrow_chain, seller_service, django_capture_on_commit_callbacks, admin_client):
    """A seller's result the platform refused (409 `submit_result_time_passed`) was shown only as free text
    (`NextAction.errorNote`), under `SellerServiceError`: no code a client could act on. The purchase keeps the
    refusal's code (`last_error_code`), shown as `NextAction.errorCode` and in the admin."""
    chain = escrow_chain
    purchase = Purchase(chain, django_capture_on_commit_callbacks, seller_service)
    assert purchase.tick()["started"] == 1
    seller_service.before_status = lambda: chain.increase_time(purchase.timers["submitResultTime"] - chain.now())
    assert purchase.tick()["results"] == 0
    seller_service.before_status = None
    assert row(purchase).last_error_code == "submit_result_time_passed"
    shown = purchase.get()["NextAction"]
    assert shown["errorCode"] == "submit_result_time_passed", shown
    page = admin_client.get(f"/admin/escrow/masumipurchase/{row(purchase).pk}/change/")
    assert b"submit_result_time_passed" in page.content


def test_a_seller_call_failure_is_shown_with_the_seller_service_error_code(
        escrow_chain, seller_service, django_capture_on_commit_callbacks):
    """A seller that does not answer usably: its failure's code is `seller_service_error` (the text is free)."""
    purchase = Purchase(escrow_chain, django_capture_on_commit_callbacks, seller_service)
    seller_service.mode = "unavailable"
    purchase.tick()
    failed = row(purchase)
    assert failed.job_call_failures == 1 and failed.last_error_code == "seller_service_error", failed.last_error
    assert purchase.get()["NextAction"] == {"requestedAction": "None", "errorType": "SellerServiceError",
                                            "errorCode": "seller_service_error", "errorNote": failed.last_error}


def test_a_purchases_error_is_told_to_its_parties_webhooks_once_per_code(
        escrow_chain, seller_service, django_capture_on_commit_callbacks):
    """A purchase's error (the seller's job call failing, a step of its own refused) was kept on the purchase alone,
    shown by `GET /purchase` to a buyer polling it: a party subscribed to its agreement's webhooks was told nothing.
    Each new code is an agreement event (its status unchanged, `data.code`), so a webhook and an inbox entry; a call
    failing again with the same code adds none."""
    purchase = Purchase(escrow_chain, django_capture_on_commit_callbacks, seller_service)
    WebhookSubscription.objects.create(agent=purchase.parties.buyer, url="https://hooks.example.com/b", secret="s")
    seller_service.mode = "unavailable"
    purchase.tick()
    MasumiPurchase.objects.filter(pk=row(purchase).pk).update(job_next_call_at=timezone.now())
    purchase.tick()
    assert row(purchase).job_call_failures == 2
    told = [delivery.payload["data"] for delivery in WebhookDelivery.objects.filter(
        subscription__agent=purchase.parties.buyer, payload__data__code__isnull=False)]
    assert [(data["status"], data["from_status"], data["code"]) for data in told] == [
        ("active", "active", "seller_service_error")], told
    inbox = purchase.parties.buyer_api.get(f"/agents/{purchase.parties.buyer.pk}/events").json()
    assert [event["payload"]["code"] for event in inbox if "code" in event["payload"]] == ["seller_service_error"]


def _dispute_release_refused_once(chain, capture, seller_service, monkeypatch) -> "Purchase":
    """A disputed purchase past its unlock time whose release the purchases tick tried once and was refused
    (`amount_exceeds_deposit`)."""
    purchase = Purchase(chain, capture, seller_service)
    dispute(purchase)
    chain.increase_time(purchase.timers["externalDisputeUnlockTime"] - chain.now())

    def refused(**kwargs):
        raise Conflict("The seller amount exceeds the deposit.", code="amount_exceeds_deposit")

    monkeypatch.setattr(purchases.settlement, "settlement_resolve", refused)
    assert run(capture, purchases.purchases_tick)["released"] == 0
    monkeypatch.undo()
    return purchase


def test_a_dispute_release_the_purchases_tick_was_refused_is_shown_with_the_refusals_code(
        escrow_chain, seller_service, django_capture_on_commit_callbacks, monkeypatch):
    """The purchases tick's own steps (a dispute, its release) refused for another reason than those with their own
    field kept only "Conflict: ..." text, shown to the buyer as the seller's failure (`SellerServiceError`): the
    refusal's code is kept and shown (`errorCode`), and its type says it is the purchase's step, not the seller."""
    capture = django_capture_on_commit_callbacks
    purchase = _dispute_release_refused_once(escrow_chain, capture, seller_service, monkeypatch)
    assert row(purchase).last_error_code == "amount_exceeds_deposit"
    shown = purchase.get()["NextAction"]
    assert (shown["errorType"], shown["errorCode"]) == ("PurchaseStepRefused", "amount_exceeds_deposit"), shown


def test_a_disputed_purchases_refusal_told_to_its_parties_leaves_the_operators_dispute_open_and_dated(
        escrow_chain, seller_service, django_capture_on_commit_callbacks, monkeypatch):
    """A refusal told as an event in the agreement's unchanged status (`disputed` to `disputed`) read, in the
    operators' disputes list, as the dispute's end (the first event from `disputed`: its reason shown as how it
    ended) and as its challenge (the last event to `disputed`: dated, and timing out, from the refusal)."""
    capture = django_capture_on_commit_callbacks
    purchase = _dispute_release_refused_once(escrow_chain, capture, seller_service, monkeypatch)
    agreement_id = purchase.created["agreementId"]
    challenge = AgreementEvent.objects.filter(agreement_id=agreement_id, to_status="disputed").order_by("id").first()
    assert AgreementEvent.objects.filter(agreement_id=agreement_id, from_status="disputed",
                                         data__code="amount_exceeds_deposit").exists()
    [dispute] = [row for row in escrow_selectors.disputes() if str(row.pk) == agreement_id]
    assert (dispute.ended_reason, dispute.disputed_at) == (None, challenge.created_at)


def test_a_dispute_release_refused_once_then_done_no_longer_shows_the_refusal(
        escrow_chain, seller_service, django_capture_on_commit_callbacks, monkeypatch):
    """A refusal of the purchases tick's step was kept for good: the next tick released the dispute, and the purchase
    still showed the old refusal as its NextAction's error while its payout was under way. A step done clears it."""
    capture = django_capture_on_commit_callbacks
    purchase = _dispute_release_refused_once(escrow_chain, capture, seller_service, monkeypatch)
    assert purchase.get()["NextAction"]["errorCode"] == "amount_exceeds_deposit"

    assert run(capture, purchases.purchases_tick)["released"] == 1
    shown = purchase.get()["NextAction"]
    assert (shown["errorType"], shown["errorCode"], shown["errorNote"]) == (None, None, None), shown
    assert (row(purchase).last_error, row(purchase).last_error_code) == ("", "")
