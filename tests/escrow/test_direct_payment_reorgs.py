"""A reorg deeper than the confirmation depth under a direct purchase: the x402 payment (buyer -> seller) that made
it paid, ours or someone else's copy of the authorization, is taken off the chain after the platform counted the
purchase paid. The purchase must go back to paying while the relayer sends the payment again, end paid by the
transaction the new branch has, or, where the payment cannot run there, reach an operator. A failed payment the reorg
takes may run there: the fee refund it queued must then not land as well, and must still land if it fails again."""

import io
import logging
import threading
from datetime import timedelta

import pytest
from django.contrib.auth import get_user_model
from django.core.management import call_command
from django.db import connection, connections
from django.test.utils import CaptureQueriesContext
from django.core.management.base import CommandError
from django.urls import reverse
from django.utils import timezone
from x402.http import decode_payment_signature_header

from escrow import chain as gateway
from agreements import services as agreement_services
from agreements.models import UsageAgreement
from catalog.models import Agent, Service
from escrow import relayer
from escrow.models import ChainTransaction, RelayerAccount, TxPurpose, TxStatus
from marketplace.sweeps import RowsFailed
from sdk import typed_data
from tests.agreements.helpers import propose
from tests.agreements.test_direct_payments import AMOUNT, FEE, Purchase
from tests.catalog.factories import register_service
from tests.escrow.flow import (USDC, check_raises_once_mined, check_times_out_once_mined, confirm_all, fund,
                               mined_what_was_sent, poll_mined, usdc_balance)
from tests.escrow.test_indexer import mined
from tests.escrow.test_relayer_faults import relayer_nonce_on_chain
from tests.support.operators import form_as_shown, staff_account

pytestmark = [pytest.mark.chain, pytest.mark.django_db]


def copy_the_payment(purchase, body: dict) -> str:
    """Whoever holds the authorization (here the buyer itself) gets it mined from its own account; its hash."""
    payload = decode_payment_signature_header(body["payment_header"]).payload
    auth = payload["authorization"]
    v, r, s = typed_data.split_signature(payload["signature"])
    copied = purchase.chain.usdc.functions.transferWithAuthorization(
        auth["from"], auth["to"], int(auth["value"]), int(auth["validAfter"]), int(auth["validBefore"]),
        bytes.fromhex(auth["nonce"][2:]), v, bytes.fromhex(r[2:]), bytes.fromhex(s[2:]),
    ).transact({"from": purchase.buyer.address})
    mined(purchase.chain, copied)
    return "0x" + copied.hex().removeprefix("0x")


def paid_by_a_copy_on_a_branch(purchase, capture, body: dict | None = None) -> tuple[dict, str, str]:
    """A direct purchase (proposed with `body`, else a new one) whose fee is collected, then paid by a copy of its
    authorization mined before the relayer sends its own (which then fails: the authorization is used), on a branch
    a snapshot taken just before the copy can undo. Returns the agreement, the copy's hash and the snapshot."""
    body = body or purchase.body()
    agreement = purchase.propose(body)
    purchase.accept(agreement["id"], capture)
    confirm_all(capture)  # the fee permit confirmed; the fee's transfer is sent
    mined_what_was_sent()  # and mined before the fork
    before_fork = purchase.chain.snapshot()
    copy = copy_the_payment(purchase, body)
    for _ in range(2):
        confirm_all(capture)
    paid = purchase.parties.agreement(agreement["id"])
    assert (paid["status"], paid["payment_tx_hash"]) == ("paid", copy)
    payment = ChainTransaction.objects.get(purpose=TxPurpose.DIRECT_PAYMENT)
    assert payment.status == TxStatus.FAILED and payment.outcome_evidence["used_by"] == copy
    return agreement, copy, before_fork


def polls(capture, count: int = 4) -> None:
    for _ in range(count):
        confirm_all(capture)


def test_a_purchase_paid_by_a_copy_a_reorg_took_is_paid_by_our_payment_sent_again(
        escrow_chain, django_capture_on_commit_callbacks):
    """The copy is not on the new branch, where the buyer's funds still are: the relayer sends our payment again
    and the purchase is paid by it, naming it (not the copy no longer on the chain); the seller is paid once."""
    chain, capture = escrow_chain, django_capture_on_commit_callbacks
    purchase = Purchase(chain)
    agreement, copy, before_fork = paid_by_a_copy_on_a_branch(purchase, capture)

    chain.reorg(before_fork)
    chain.mine(3)
    seller = usdc_balance(chain, purchase.parties.seller_account.address)
    polls(capture)

    payment = ChainTransaction.objects.get(purpose=TxPurpose.DIRECT_PAYMENT)
    assert payment.status == TxStatus.CONFIRMED
    paid = purchase.parties.agreement(agreement["id"])
    assert (paid["status"], paid["payment_tx_hash"]) == ("paid", payment.mined_tx_hash)
    assert paid["payment_tx_hash"] != copy and paid["payment_reverted_at"] is None
    assert usdc_balance(chain, purchase.parties.seller_account.address) == seller + AMOUNT
    assert not ChainTransaction.objects.filter(purpose=TxPurpose.DIRECT_FEE_REFUND).exists()
    call_command("reconcile", stdout=io.StringIO())



def test_a_reorg_that_takes_only_the_block_of_our_payment_that_reverted_after_the_copy_leaves_the_purchase_paid(
        escrow_chain, django_capture_on_commit_callbacks, monkeypatch):
    """The copy of the authorization was mined a block before our payment, which reverted; a reorg takes only our
    payment's block, the copy stays on the chain (the seller paid by it). The purchase is still paid by the copy: a
    reorg of a block its outcome does not rest on undoes nothing."""
    chain, capture = escrow_chain, django_capture_on_commit_callbacks
    purchase = Purchase(chain)
    body = purchase.body()
    agreement = purchase.propose(body)
    send, seen = gateway.broadcast, {}

    def copy_first(raw):  # mined between the relayer's simulation of our payment and its broadcast
        ours = ChainTransaction.objects.filter(purpose=TxPurpose.DIRECT_PAYMENT, attempts__raw_transaction=raw)
        if not seen and ours.exists():
            seen["copy"] = copy_the_payment(purchase, body)
            seen["after_the_copy"] = chain.snapshot()
        return send(raw)

    monkeypatch.setattr(gateway, "broadcast", copy_first)
    purchase.accept(agreement["id"], capture)
    polls(capture)
    monkeypatch.setattr(gateway, "broadcast", send)
    payment = ChainTransaction.objects.get(purpose=TxPurpose.DIRECT_PAYMENT)
    assert payment.status == TxStatus.FAILED and payment.mined_block_number is not None, payment.failure_reason
    paid = purchase.parties.agreement(agreement["id"])
    assert (paid["status"], paid["payment_tx_hash"]) == ("paid", seen["copy"])

    chain.reorg(seen["after_the_copy"])  # our payment's block taken, the copy's kept
    with capture(execute=True):
        assert relayer.transactions_reopen_reorged() == 1

    paid = purchase.parties.agreement(agreement["id"])
    assert (paid["status"], paid["payment_tx_hash"]) == ("paid", seen["copy"])
    seller = usdc_balance(chain, purchase.parties.seller_account.address)
    polls(capture)  # ours, sent again, reverts again
    paid = purchase.parties.agreement(agreement["id"])
    assert (paid["status"], paid["payment_tx_hash"]) == ("paid", seen["copy"])
    assert usdc_balance(chain, purchase.parties.seller_account.address) == seller
    assert not ChainTransaction.objects.filter(purpose=TxPurpose.DIRECT_FEE_REFUND).exists()


@pytest.mark.parametrize("acknowledged_in", ["reconcile", "admin"])
def test_a_purchase_paid_by_a_copy_a_reorg_took_that_cannot_run_again_is_recorded_until_acknowledged(
        escrow_chain, acknowledged_in, admin_client, admin_user, django_capture_on_commit_callbacks):
    """On the new branch the buyer spent its funds before the relayer sends the payment again: it cannot run, and
    the seller, told the purchase was paid, is not. The purchase fails, recorded as a payment a reorg took after it
    was counted paid (its fee is not refunded: an operator decides), and reconcile fails until an operator
    acknowledges it."""
    chain, capture = escrow_chain, django_capture_on_commit_callbacks
    purchase = Purchase(chain)
    fund(chain, purchase.treasury, USDC)  # a float the treasury would refund the fee from
    agreement, copy, before_fork = paid_by_a_copy_on_a_branch(purchase, capture)

    chain.reorg(before_fork)
    buyer = purchase.buyer.address
    mined(chain, chain.usdc.functions.transfer(chain.accounts.stranger.address, usdc_balance(chain, buyer)).transact(
        {"from": buyer}))
    chain.mine(3)
    polls(capture)

    failed = purchase.parties.agreement(agreement["id"])
    assert failed["status"] == "payment_failed" and failed["payment_tx_hash"] == ""
    assert "counted paid" in failed["status_reason"]
    assert failed["payment_reverted_at"] is not None  # the buyer and the seller see it, as an invocation's payment
    assert purchase.parties.seller_api.get(f"/usage-agreements/{agreement['id']}").json()["payment_reverted_at"] == (
        failed["payment_reverted_at"])
    assert not ChainTransaction.objects.filter(purpose=TxPurpose.DIRECT_FEE_REFUND).exists()
    assert failed["buyer_refund_atomic"] is None  # the fee, collected before the fork, stays collected
    assert ChainTransaction.objects.get(purpose=TxPurpose.DIRECT_FEE).status == TxStatus.CONFIRMED
    with pytest.raises(CommandError, match="1 mismatch"):
        call_command("reconcile", stdout=io.StringIO())
    dashboard = admin_client.get("/admin/dashboard/").content.decode()
    assert "direct purchase payment reverted" in dashboard and agreement["id"] in dashboard
    metrics = admin_client.get("/metrics").content.decode()
    assert 'marketplace_direct_payments_reverted{acknowledged="false"} 1.0' in metrics
    out = io.StringIO()
    if acknowledged_in == "admin":
        changelist = reverse("admin:agreements_usageagreement_changelist")
        selected = {"action": "acknowledge_reverted_direct_payment", "_selected_action": [agreement["id"]]}
        asked = admin_client.post(changelist, selected)
        assert asked.status_code == 200 and agreement["id"] in asked.content.decode()
        assert admin_client.post(changelist, {**form_as_shown(asked.content.decode(), "acknowledge-form"), "reason": "seller paid off-chain"}
                                 ).status_code == 302
        call_command("reconcile", stdout=out)
        operator = admin_user.username
    else:
        call_command("reconcile", "--acknowledge-agreement", agreement["id"], "--reason", "seller paid off-chain",
                     "--operator", staff_account(), stdout=out)
        assert "Acknowledged 1 reverted direct payment(s)." in out.getvalue()
        operator = "ops"
    assert "Consistent" in out.getvalue() and agreement["id"] in out.getvalue()
    assert f"acknowledged by {operator} at " in out.getvalue() and "(seller paid off-chain)" in out.getvalue()
    assert purchase.parties.agreement(agreement["id"])["status"] == "payment_failed"
    metrics = admin_client.get("/metrics").content.decode()
    assert 'marketplace_direct_payments_reverted{acknowledged="true"} 1.0' in metrics
    assert 'marketplace_direct_payments_reverted{acknowledged="false"} 0.0' in metrics


def test_a_payment_that_reverted_on_its_own_is_sent_again_after_a_reorg_and_its_fee_refund_withdrawn(
        escrow_chain, monkeypatch, settings, django_capture_on_commit_callbacks):
    """The buyer spent its funds between the relayer's estimate and the mining: our payment was mined and reverted,
    the purchase failed and the fee's refund was queued (not yet signed). A reorg deeper than the confirmation depth
    takes the payment's block: on the new branch the buyer never spent. The purchase goes back to paying, the refund
    is withdrawn, and the payment's same bytes, sent again, pay the seller: paid, its fee kept."""
    chain, capture = escrow_chain, django_capture_on_commit_callbacks
    settings.CHAIN_REBROADCAST_AFTER = timedelta(0)  # a reopened transaction is sent again at the next poll
    purchase = Purchase(chain)
    fund(chain, purchase.treasury, USDC)  # the treasury's float for refunds
    agreement = purchase.propose()
    purchase.accept(agreement["id"], capture)
    confirm_all(capture)  # the fee permit confirmed; the fee's transfer is sent
    mined_what_was_sent()  # and mined before the fork
    before_fork = chain.snapshot()
    estimate = gateway.simulate

    def estimate_then_buyer_spends(**transaction):
        gas = estimate(**transaction)
        monkeypatch.setattr(gateway, "simulate", estimate)
        buyer = purchase.buyer.address
        mined(chain, chain.usdc.functions.transfer(chain.accounts.stranger.address, usdc_balance(
            chain, buyer)).transact({"from": buyer}))
        return gas

    monkeypatch.setattr(gateway, "simulate", estimate_then_buyer_spends)
    confirm_all(capture)  # the fee confirmed; the payment is sent, and reverts
    with capture(execute=False) as refund_submission:
        poll_mined()  # the payment failed; the fee's refund is queued, its submit task not run yet
    payment = ChainTransaction.objects.get(purpose=TxPurpose.DIRECT_PAYMENT)
    refund = ChainTransaction.objects.get(purpose=TxPurpose.DIRECT_FEE_REFUND)
    assert (payment.status, payment.receipt_status, refund.status) == (TxStatus.FAILED, 0, TxStatus.QUEUED)
    assert purchase.parties.agreement(agreement["id"])["status"] == "payment_failed"

    chain.reorg(before_fork)
    chain.mine(3)
    seller = usdc_balance(chain, purchase.parties.seller_account.address)
    polls(capture)
    with capture(execute=True):
        for callback in refund_submission:  # the refund's submit task runs at last
            callback()
    polls(capture, 1)

    payment.refresh_from_db()
    refund.refresh_from_db()
    assert (payment.status, payment.attempts.count()) == (TxStatus.CONFIRMED, 1)
    assert (refund.status, refund.attempts.exists()) == (TxStatus.FAILED, False)  # withdrawn: never sent
    paid = purchase.parties.agreement(agreement["id"])
    assert (paid["status"], paid["payment_tx_hash"], paid["buyer_refund_atomic"]) == (
        "paid", payment.mined_tx_hash, None)
    assert usdc_balance(chain, purchase.parties.seller_account.address) == seller + AMOUNT
    call_command("reconcile", stdout=io.StringIO())


def test_a_purchase_paid_by_our_payment_a_reorg_took_names_the_copy_that_paid_on_the_new_branch(
        escrow_chain, settings, django_capture_on_commit_callbacks):
    """Our payment paid the purchase; a reorg takes it, and on the new branch someone holding the authorization
    (public in the old branch's block) gets it mined first: ours, sent again, reverts. The purchase is paid all the
    same, by that transaction, which it names (not ours, no longer on the chain); no fee is refunded."""
    chain, capture = escrow_chain, django_capture_on_commit_callbacks
    settings.CHAIN_REBROADCAST_AFTER = timedelta(0)
    purchase = Purchase(chain)
    body = purchase.body()
    agreement = purchase.propose(body)
    purchase.accept(agreement["id"], capture)
    confirm_all(capture)  # the fee permit confirmed; the fee's transfer is sent
    mined_what_was_sent()  # and mined before the fork
    before_fork = chain.snapshot()
    polls(capture, 2)
    ours = ChainTransaction.objects.get(purpose=TxPurpose.DIRECT_PAYMENT)
    assert purchase.parties.agreement(agreement["id"])["payment_tx_hash"] == ours.mined_tx_hash

    chain.reorg(before_fork)
    copy = copy_the_payment(purchase, body)
    chain.mine(3)
    seller = usdc_balance(chain, purchase.parties.seller_account.address)
    polls(capture)

    ours.refresh_from_db()
    assert ours.status == TxStatus.FAILED and ours.outcome_evidence["used_by"] == copy
    paid = purchase.parties.agreement(agreement["id"])
    assert (paid["status"], paid["payment_tx_hash"], paid["buyer_refund_atomic"]) == ("paid", copy, None)
    assert usdc_balance(chain, purchase.parties.seller_account.address) == seller  # paid by the copy, once
    assert not ChainTransaction.objects.filter(purpose=TxPurpose.DIRECT_FEE_REFUND).exists()
    call_command("reconcile", stdout=io.StringIO())


def spend_the_buyers_funds(purchase) -> None:
    buyer = purchase.buyer.address
    mined(purchase.chain, purchase.chain.usdc.functions.transfer(
        purchase.chain.accounts.stranger.address, usdc_balance(purchase.chain, buyer)).transact({"from": buyer}))


def buyer_spends_once_the_payment_is_estimated(purchase, monkeypatch) -> None:
    """The buyer spends its funds between the relayer's estimate of the payment and its mining: it reverts."""
    estimate = gateway.simulate

    def estimate_then_buyer_spends(**transaction):
        gas = estimate(**transaction)
        monkeypatch.setattr(gateway, "simulate", estimate)
        spend_the_buyers_funds(purchase)
        return gas

    monkeypatch.setattr(gateway, "simulate", estimate_then_buyer_spends)


def failed_with_its_fee_refund_signed(purchase, capture, monkeypatch, *, refund_confirmed: bool = False):
    """A direct purchase whose fee was collected before the fork, and whose payment then reverted on its own (the buyer
    spent its funds between the relayer's estimate and the mining): payment_failed, and the fee's refund signed and
    mined on that branch, not yet polled (or, `refund_confirmed`, confirmed: the buyer shown refunded). Returns the
    agreement, the payment, the refund and the snapshot taken at the fork."""
    fund(purchase.chain, purchase.treasury, USDC)  # the treasury's float for refunds
    agreement = purchase.propose()
    purchase.accept(agreement["id"], capture)
    confirm_all(capture)  # the fee permit confirmed; the fee's transfer is sent
    mined_what_was_sent()  # and mined before the fork
    before_fork = purchase.chain.snapshot()
    buyer_spends_once_the_payment_is_estimated(purchase, monkeypatch)
    confirm_all(capture)  # the fee confirmed; the payment is sent, and reverts
    confirm_all(capture)  # the payment failed; the fee's refund is queued, signed and sent
    mined_what_was_sent()
    payment = ChainTransaction.objects.get(purpose=TxPurpose.DIRECT_PAYMENT)
    refund = ChainTransaction.objects.get(purpose=TxPurpose.DIRECT_FEE_REFUND)
    assert (payment.status, payment.receipt_status, refund.status) == (TxStatus.FAILED, 0, TxStatus.SUBMITTED)
    if refund_confirmed:
        confirm_all(capture)
        refund.refresh_from_db()
        assert refund.status == TxStatus.CONFIRMED
        assert purchase.parties.agreement(agreement["id"])["buyer_refund_atomic"] == FEE
    assert purchase.parties.agreement(agreement["id"])["status"] == "payment_failed"
    return agreement, payment, refund, before_fork


@pytest.mark.parametrize("refund_before_the_reorg", ["signed", "confirmed"])
def test_a_fee_refund_signed_for_a_failed_payment_a_reorg_reopens_is_cancelled_and_the_payment_pays(
        escrow_chain, refund_before_the_reorg, monkeypatch, settings, django_capture_on_commit_callbacks):
    """The payment reverted on its own and the fee's refund was signed (its nonce taken, its bytes out), or confirmed.
    A reorg deeper than the confirmation depth takes the payment's block, and the refund's after it: on the new branch
    the buyer never spent, and the payment's same bytes pay the seller. The refund must not land as well (the buyer
    would have the purchase and its fee back): its nonce goes to a nonce fill, and the purchase is paid, its fee kept
    (not shown refunded); the books add up and reconcile has nothing to report."""
    chain, capture = escrow_chain, django_capture_on_commit_callbacks
    settings.CHAIN_REBROADCAST_AFTER = timedelta(0)
    purchase = Purchase(chain)
    agreement, payment, refund, before_fork = failed_with_its_fee_refund_signed(
        purchase, capture, monkeypatch, refund_confirmed=refund_before_the_reorg == "confirmed")

    chain.reorg(before_fork)
    chain.mine(3)
    buyer, seller, fee_recipient, treasury = purchase.balances()
    polls(capture)

    payment.refresh_from_db()
    paid = purchase.parties.agreement(agreement["id"])
    assert (paid["status"], paid["payment_tx_hash"], paid["buyer_refund_atomic"]) == (
        "paid", payment.mined_tx_hash, None)
    assert purchase.balances() == (buyer - AMOUNT, seller + AMOUNT, fee_recipient, treasury)
    refund.refresh_from_db()
    fill = ChainTransaction.objects.get(purpose=TxPurpose.NONCE_FILL)
    assert (payment.status, payment.attempts.count()) == (TxStatus.CONFIRMED, 1)
    assert (refund.status, refund.nonce, refund.outcome_applied) == (TxStatus.FAILED, None, True)
    assert relayer.WITHDRAWN in refund.context
    assert (fill.status, fill.context, fill.mined_tx_hash) == (
        TxStatus.CONFIRMED, {relayer.CANCELS: str(refund.pk)}, fill.attempts.get().tx_hash)
    assert fill.attempts.get().nonce == refund.attempts.get().nonce
    assert relayer_nonce_on_chain(chain) == RelayerAccount.objects.get().next_nonce
    call_command("reconcile", stdout=io.StringIO())


def reverted_to_a_branch_where_it_fails_again(chain, capture, monkeypatch):
    """`failed_with_its_fee_refund_signed`, then back to its fork, where the buyer spends its funds again before the
    payment's bytes are mined: they will revert again. Returns the purchase, the agreement, the payment and the
    refund."""
    purchase = Purchase(chain)
    agreement, payment, refund, before_fork = failed_with_its_fee_refund_signed(purchase, capture, monkeypatch)
    chain.reorg(before_fork)
    spend_the_buyers_funds(purchase)
    chain.mine(3)
    return purchase, agreement, payment, refund


def test_a_cancelled_fee_refund_whose_old_bytes_are_mined_first_is_shown_and_reported_until_acknowledged(
        escrow_chain, admin_client, caplog, monkeypatch, settings, django_capture_on_commit_callbacks):
    """As above, but anyone holding the old branch's signed bytes (public there) gets the payment's and the refund's
    mined on the new branch before the relayer sends its fill: the seller is paid and the buyer gets its fee back.
    The fill finds the refund's bytes under its nonce and names them; the purchase is paid and shows the fee refunded
    (the platform bore it), and reconcile and the dashboard report the fill until an operator acknowledges it."""
    chain, capture = escrow_chain, django_capture_on_commit_callbacks
    settings.CHAIN_REBROADCAST_AFTER = timedelta(0)
    purchase = Purchase(chain)
    agreement, payment, refund, before_fork = failed_with_its_fee_refund_signed(purchase, capture, monkeypatch)

    chain.reorg(before_fork)
    chain.mine(3)
    buyer, seller, fee_recipient, treasury = purchase.balances()
    old_refund = refund.attempts.get()
    for old in (payment.attempts.get(), old_refund):
        chain.w3.eth.send_raw_transaction(old.raw_transaction)
    mined_what_was_sent()
    with caplog.at_level(logging.ERROR, logger="escrow.relayer"):
        polls(capture)

    paid = purchase.parties.agreement(agreement["id"])
    assert (paid["status"], paid["payment_tx_hash"], paid["buyer_refund_atomic"]) == (
        "paid", payment.attempts.get().tx_hash, FEE)
    assert purchase.balances() == (buyer - AMOUNT + FEE, seller + AMOUNT, fee_recipient, treasury - FEE)
    out = io.StringIO()
    with pytest.raises(CommandError, match="1 mismatch"):
        call_command("reconcile", stdout=out)
    fill = ChainTransaction.objects.get(purpose=TxPurpose.NONCE_FILL)
    assert f"nonce fill {fill.pk}" in out.getvalue() and str(refund.pk) in out.getvalue()
    assert (fill.status, fill.mined_tx_hash, fill.receipt_status) == (TxStatus.CONFIRMED, old_refund.tx_hash, 1)
    [logged] = [record for record in caplog.records if record.levelno == logging.ERROR]
    assert (logged.tx_id, logged.fill_id) == (str(refund.pk), str(fill.pk))
    assert ChainTransaction.objects.get(pk=refund.pk).status == TxStatus.FAILED
    assert ChainTransaction.objects.filter(purpose=TxPurpose.DIRECT_FEE_REFUND).count() == 1  # not sent again
    dashboard = admin_client.get("/admin/dashboard/").content.decode()
    assert "nonce fill outrun by the bytes it cancels" in dashboard and str(refund.pk) in dashboard
    out = io.StringIO()
    call_command("reconcile", "--acknowledge-nonce-fill", str(fill.pk), "--reason", "the platform bears the fee",
                 "--operator", staff_account(), stdout=out)
    assert "Consistent" in out.getvalue()


def test_a_fee_refund_cancelled_when_its_payment_was_reopened_is_sent_again_once_the_payment_fails_for_good(
        escrow_chain, monkeypatch, settings, django_capture_on_commit_callbacks):
    """On the new branch the buyer spends its funds again before the payment's same bytes are mined: they revert
    again, and the purchase fails for good. The refund cancelled when the payment was reopened must still reach the
    buyer: while its nonce fill is not concluded its old bytes may still land, so the fill decides; it took the nonce,
    and a new refund is sent. The buyer gets its fee back once; the books add up."""
    chain, capture = escrow_chain, django_capture_on_commit_callbacks
    settings.CHAIN_REBROADCAST_AFTER = timedelta(0)
    purchase, agreement, payment, refund = reverted_to_a_branch_where_it_fails_again(chain, capture, monkeypatch)
    buyer, seller, fee_recipient, treasury = purchase.balances()
    assert relayer.transactions_reopen_reorged() == 1
    assert purchase.parties.agreement(agreement["id"])["status"] == "paying"
    with capture(execute=True):
        for _ in range(2):  # the payment, sent again before anything else, reverts again
            mined_what_was_sent()
            relayer.transaction_check(transaction_id=payment.pk)
    payment.refresh_from_db()
    assert (payment.status, payment.receipt_status) == (TxStatus.FAILED, 0)
    assert purchase.parties.agreement(agreement["id"])["status"] == "payment_failed"
    assert ChainTransaction.objects.filter(purpose=TxPurpose.DIRECT_FEE_REFUND).count() == 1  # the fill decides
    polls(capture)

    refunds = list(ChainTransaction.objects.filter(purpose=TxPurpose.DIRECT_FEE_REFUND).order_by("created_at"))
    assert [(tx.pk, tx.status) for tx in refunds] == [(refund.pk, TxStatus.FAILED), (refunds[-1].pk, TxStatus.CONFIRMED)]
    fill = ChainTransaction.objects.get(purpose=TxPurpose.NONCE_FILL)
    assert (fill.status, fill.mined_tx_hash) == (TxStatus.CONFIRMED, fill.attempts.get().tx_hash)
    failed = purchase.parties.agreement(agreement["id"])
    assert (failed["status"], failed["buyer_refund_atomic"]) == ("payment_failed", FEE)
    assert purchase.balances() == (buyer + FEE, seller, fee_recipient, treasury - FEE)
    assert relayer_nonce_on_chain(chain) == RelayerAccount.objects.get().next_nonce
    call_command("reconcile", stdout=io.StringIO())


def test_a_cancelled_fee_refund_whose_old_bytes_are_mined_first_is_not_sent_again_when_the_payment_fails_for_good(
        escrow_chain, monkeypatch, settings, django_capture_on_commit_callbacks):
    """The payment fails again on the new branch, and the cancelled refund's old bytes were mined there in its fill's
    place: the buyer has its fee back, shown as such, and no second refund is sent; reconcile reports the fill (what
    its bytes did may be done twice) until an operator who checked the purchase acknowledges it."""
    chain, capture = escrow_chain, django_capture_on_commit_callbacks
    settings.CHAIN_REBROADCAST_AFTER = timedelta(0)
    purchase, agreement, payment, refund = reverted_to_a_branch_where_it_fails_again(chain, capture, monkeypatch)
    buyer, seller, fee_recipient, treasury = purchase.balances()
    for old in (payment.attempts.get(), refund.attempts.get()):
        chain.w3.eth.send_raw_transaction(old.raw_transaction)
    mined_what_was_sent()
    polls(capture)

    assert ChainTransaction.objects.get(pk=payment.pk).status == TxStatus.FAILED
    failed = purchase.parties.agreement(agreement["id"])
    assert (failed["status"], failed["buyer_refund_atomic"]) == ("payment_failed", FEE)
    assert purchase.balances() == (buyer + FEE, seller, fee_recipient, treasury - FEE)
    assert ChainTransaction.objects.filter(purpose=TxPurpose.DIRECT_FEE_REFUND).count() == 1
    with pytest.raises(CommandError, match="1 mismatch"):
        call_command("reconcile", stdout=io.StringIO())
    fill = ChainTransaction.objects.get(purpose=TxPurpose.NONCE_FILL)
    assert fill.mined_tx_hash == refund.attempts.get().tx_hash


def refund_cancelled_on_the_new_branch(chain, capture, monkeypatch, *, pays: bool):
    """`failed_with_its_fee_refund_signed`, then back to its fork, where the payment's same bytes will pay (`pays`),
    or revert again (`reverted_to_a_branch_where_it_fails_again`). Returns the purchase, the agreement, the payment
    and the refund."""
    if not pays:
        return reverted_to_a_branch_where_it_fails_again(chain, capture, monkeypatch)
    purchase = Purchase(chain)
    agreement, payment, refund, before_fork = failed_with_its_fee_refund_signed(purchase, capture, monkeypatch)
    chain.reorg(before_fork)
    chain.mine(3)
    return purchase, agreement, payment, refund


def old_bytes_mined_on_the_new_branch(chain, payment, refund) -> str:
    """Anyone holding the old branch's signed bytes gets the payment's mined on the new branch, then the cancelled
    refund's, each in a block of its own. Returns a snapshot taken between the two."""
    chain.w3.eth.send_raw_transaction(payment.attempts.get().raw_transaction)
    mined_what_was_sent()
    before_the_old_refund = chain.snapshot()
    chain.w3.eth.send_raw_transaction(refund.attempts.get().raw_transaction)
    mined_what_was_sent()
    return before_the_old_refund


@pytest.mark.parametrize("payment_on_the_new_branch", ["pays", "fails_again"])
def test_a_cancelled_fee_refund_whose_old_bytes_a_second_reorg_takes_is_no_longer_shown_made(
        escrow_chain, payment_on_the_new_branch, monkeypatch, settings, django_capture_on_commit_callbacks):
    """The refund cancelled when a reorg reopened its payment was outrun by its old bytes on the new branch: shown
    refunded, its fill reported. A second deep reorg takes the block of those old bytes, and the fill is mined at their
    nonce instead: the chain has no such refund. The purchase follows it: a paid one keeps its fee (not shown
    refunded); one whose payment failed for good has a new refund sent, the buyer's fee back once. Reconcile no
    longer reports the fill, whose own bytes took the nonce."""
    chain, capture = escrow_chain, django_capture_on_commit_callbacks
    settings.CHAIN_REBROADCAST_AFTER = timedelta(0)
    pays = payment_on_the_new_branch == "pays"
    purchase, agreement, payment, refund = refund_cancelled_on_the_new_branch(chain, capture, monkeypatch, pays=pays)
    buyer, seller, fee_recipient, treasury = purchase.balances()
    before_the_old_refund = old_bytes_mined_on_the_new_branch(chain, payment, refund)
    polls(capture)
    shown = purchase.parties.agreement(agreement["id"])
    assert (shown["status"], shown["buyer_refund_atomic"]) == ("paid" if pays else "payment_failed", FEE)
    fill = ChainTransaction.objects.get(purpose=TxPurpose.NONCE_FILL)
    assert fill.mined_tx_hash == refund.attempts.get().tx_hash
    with pytest.raises(CommandError, match="1 mismatch"):
        call_command("reconcile", stdout=io.StringIO())

    chain.reorg(before_the_old_refund)
    chain.mine(3)
    polls(capture)

    fill.refresh_from_db()
    assert (fill.status, fill.receipt_status) == (TxStatus.CONFIRMED, 1)
    assert fill.attempts.filter(tx_hash=fill.mined_tx_hash).exists()  # the fill's own bytes took the nonce
    shown = purchase.parties.agreement(agreement["id"])
    refunds = ChainTransaction.objects.filter(purpose=TxPurpose.DIRECT_FEE_REFUND).exclude(pk=refund.pk)
    if pays:
        assert (shown["status"], shown["payment_tx_hash"], shown["buyer_refund_atomic"]) == (
            "paid", payment.attempts.get().tx_hash, None)
        assert purchase.balances() == (buyer - AMOUNT, seller + AMOUNT, fee_recipient, treasury)
        assert not refunds.exists()
    else:
        assert (shown["status"], shown["buyer_refund_atomic"]) == ("payment_failed", FEE)
        assert [tx.status for tx in refunds] == [TxStatus.CONFIRMED]  # sent anew, once
        assert purchase.balances() == (buyer + FEE, seller, fee_recipient, treasury - FEE)
    assert relayer_nonce_on_chain(chain) == RelayerAccount.objects.get().next_nonce
    call_command("reconcile", stdout=io.StringIO())
    polls(capture, 2)  # concluding nothing anew changes nothing
    assert purchase.parties.agreement(agreement["id"])["buyer_refund_atomic"] == (None if pays else FEE)
    assert ChainTransaction.objects.filter(purpose=TxPurpose.DIRECT_FEE_REFUND).count() == (1 if pays else 2)


@pytest.mark.parametrize("after_the_fill", ["paid", "refunded_anew", "refund_queued_anew"])
def test_a_cancelled_fee_refund_whose_fill_a_second_reorg_takes_for_its_old_bytes_is_shown_made_once(
        escrow_chain, after_the_fill, monkeypatch, settings, django_capture_on_commit_callbacks):
    """The reverse: the fill took the refund's nonce; the purchase was paid, its fee kept, or its payment failed for
    good and a new refund was sent (confirmed, or still queued). A second deep reorg takes the fill's block (and the new
    refund's, after it), and the cancelled refund's old bytes are mined at its nonce instead: the buyer has its fee
    back. The purchase shows it refunded (a paid one: the platform bore the fee), the new refund is withdrawn rather
    than sent (again) beside them and none is queued while the fill is undecided: the fee is not refunded twice.
    Reconcile reports the fill until acknowledged."""
    chain, capture = escrow_chain, django_capture_on_commit_callbacks
    settings.CHAIN_REBROADCAST_AFTER = timedelta(0)
    pays = after_the_fill == "paid"
    purchase, agreement, payment, refund = refund_cancelled_on_the_new_branch(chain, capture, monkeypatch, pays=pays)
    buyer, seller, fee_recipient, treasury = purchase.balances()
    chain.w3.eth.send_raw_transaction(payment.attempts.get().raw_transaction)
    mined_what_was_sent()
    before_the_fill = chain.snapshot()
    new_refund_submission = []
    if after_the_fill == "refund_queued_anew":
        with capture(execute=False) as new_refund_submission:
            for _ in range(4):
                poll_mined()
    else:
        polls(capture)
    fill = ChainTransaction.objects.get(purpose=TxPurpose.NONCE_FILL)
    assert fill.status == TxStatus.CONFIRMED and fill.attempts.filter(tx_hash=fill.mined_tx_hash).exists()
    new_refunds = ChainTransaction.objects.filter(purpose=TxPurpose.DIRECT_FEE_REFUND).exclude(pk=refund.pk)
    assert [tx.status for tx in new_refunds] == {"paid": [], "refunded_anew": [TxStatus.CONFIRMED],
                                                 "refund_queued_anew": [TxStatus.QUEUED]}[after_the_fill]
    assert purchase.parties.agreement(agreement["id"])["buyer_refund_atomic"] == (
        FEE if after_the_fill == "refunded_anew" else None)

    chain.reorg(before_the_fill)
    chain.w3.eth.send_raw_transaction(refund.attempts.get().raw_transaction)
    mined_what_was_sent()
    chain.mine(3)
    polls(capture)
    with capture(execute=True):
        for callback in new_refund_submission:  # a new refund's submit task, if it was held, runs at last
            callback()
    polls(capture, 1)

    fill.refresh_from_db()
    assert (fill.status, fill.mined_tx_hash) == (TxStatus.CONFIRMED, refund.attempts.get().tx_hash)
    shown = purchase.parties.agreement(agreement["id"])
    assert (shown["status"], shown["buyer_refund_atomic"]) == ("paid" if pays else "payment_failed", FEE)
    assert purchase.balances() == (buyer - (AMOUNT if pays else 0) + FEE, seller + (AMOUNT if pays else 0),
                                   fee_recipient, treasury - FEE)
    assert not ChainTransaction.objects.filter(purpose=TxPurpose.DIRECT_FEE_REFUND).exclude(
        status=TxStatus.FAILED).exists()
    assert relayer_nonce_on_chain(chain) == RelayerAccount.objects.get().next_nonce
    with pytest.raises(CommandError, match="1 mismatch"):
        call_command("reconcile", stdout=io.StringIO())


def test_a_fee_refund_signed_when_a_reorg_takes_the_fees_collection_is_cancelled_and_the_payment_pays(
        escrow_chain, settings, django_capture_on_commit_callbacks):
    """The buyer cancelled the authorization once the fee was collected: the payment failed in its simulation (never
    mined: nothing of it rests on a block) and the fee's refund was signed. A reorg takes the fee's block, where the
    buyer never cancelled: the fee's same bytes collect it again and a new payment pays the seller. The refund, of a
    fee the new branch collected anew for a purchase now paid, must not land: its nonce goes to a nonce fill."""
    chain, capture = escrow_chain, django_capture_on_commit_callbacks
    settings.CHAIN_REBROADCAST_AFTER = timedelta(0)
    purchase = Purchase(chain)
    fund(chain, purchase.treasury, USDC)
    body = purchase.body()
    agreement = purchase.propose(body)
    purchase.accept(agreement["id"], capture)
    with capture(execute=False) as fee_submission:
        poll_mined()  # the fee permit confirmed; the fee's transfer queued, not sent yet
    before_fork = chain.snapshot()
    with capture(execute=True):
        for callback in fee_submission:
            callback()
    purchase.cancel_authorization(body)
    confirm_all(capture)  # the fee confirmed; the payment fails in its simulation; the refund is signed and sent
    mined_what_was_sent()
    payment = ChainTransaction.objects.get(purpose=TxPurpose.DIRECT_PAYMENT)
    refund = ChainTransaction.objects.get(purpose=TxPurpose.DIRECT_FEE_REFUND)
    assert (payment.status, payment.nonce, refund.status) == (TxStatus.FAILED, None, TxStatus.SUBMITTED)

    chain.reorg(before_fork)
    chain.mine(3)
    buyer, seller, fee_recipient, treasury = purchase.balances()
    polls(capture, 5)

    paid = purchase.parties.agreement(agreement["id"])
    assert (paid["status"], paid["buyer_refund_atomic"]) == ("paid", None)
    assert purchase.balances() == (buyer - AMOUNT - FEE, seller + AMOUNT, fee_recipient + FEE, treasury)
    refund.refresh_from_db()
    fill = ChainTransaction.objects.get(purpose=TxPurpose.NONCE_FILL)
    assert (refund.status, fill.status, fill.context) == (
        TxStatus.FAILED, TxStatus.CONFIRMED, {relayer.CANCELS: str(refund.pk)})
    assert relayer_nonce_on_chain(chain) == RelayerAccount.objects.get().next_nonce
    call_command("reconcile", stdout=io.StringIO())


# --- a payment recorded reverted that the chain has again ----------------------------------------------------------

def reverted_on_a_second_branch(purchase, capture, agreement_id: str) -> str:
    """At the fork the test reverted to, the buyer spends its USDC before the relayer sends the payment again: it
    cannot run, and the purchase, counted paid before, is recorded reverted. Returns a snapshot of that fork."""
    chain = purchase.chain
    second_fork = chain.snapshot()
    spend_the_buyers_funds(purchase)
    chain.mine(3)
    polls(capture)
    reverted = purchase.parties.agreement(agreement_id)
    assert reverted["status"] == "payment_failed" and reverted["payment_reverted_at"] is not None
    return second_fork


def assert_recorded_reverted(purchase, admin_client, agreement_id: str) -> None:
    assert purchase.parties.agreement(agreement_id)["payment_reverted_at"] is not None
    metrics = admin_client.get("/metrics").content.decode()
    assert 'marketplace_direct_payments_reverted{acknowledged="false"} 1.0' in metrics
    with pytest.raises(CommandError, match="1 mismatch"):
        call_command("reconcile", stdout=io.StringIO())


def assert_paid_by(purchase, admin_client, agreement_id: str, tx_hash: str) -> None:
    paid = purchase.parties.agreement(agreement_id)
    assert (paid["status"], paid["payment_tx_hash"], paid["payment_reverted_at"]) == ("paid", tx_hash, None)
    assert not ChainTransaction.objects.filter(purpose=TxPurpose.DIRECT_FEE_REFUND).exists()
    metrics = admin_client.get("/metrics").content.decode()
    assert 'marketplace_direct_payments_reverted{acknowledged="false"} 0.0' in metrics
    call_command("reconcile", stdout=io.StringIO())


@pytest.mark.parametrize("copy_mined", ["later_on_the_same_branch", "by_a_second_reorg"])
def test_a_reverted_purchase_whose_authorization_a_copy_uses_later_is_paid_by_that_copy_until_a_reorg_takes_it(
        escrow_chain, copy_mined, admin_client, django_capture_on_commit_callbacks):
    """The purchase, paid by a copy of its authorization (ours never sent: it failed its simulation), lost it to a
    deep reorg on a branch where the buyer spent its funds first: recorded reverted, resting on no block, only on
    the authorization being unused. A copy is mined after all: later on that branch once the buyer holds funds again,
    or on the branch a second deep reorg puts back. Once it is at the confirmation depth the purchase is paid by it,
    the reversal no longer recorded (reconcile consistent, the gauge down); a reorg that takes the copy where the
    payment cannot run records it again."""
    chain, capture = escrow_chain, django_capture_on_commit_callbacks
    purchase = Purchase(chain)
    body = purchase.body()
    agreement, _, before_fork = paid_by_a_copy_on_a_branch(purchase, capture, body)
    chain.reorg(before_fork)
    second_fork = reverted_on_a_second_branch(purchase, capture, agreement["id"])
    assert_recorded_reverted(purchase, admin_client, agreement["id"])

    if copy_mined == "by_a_second_reorg":
        chain.reorg(second_fork)
        before_copy = chain.snapshot()
    else:
        before_copy = chain.snapshot()
        fund(chain, purchase.buyer.address, AMOUNT)
    copy = copy_the_payment(purchase, body)
    chain.mine(3)
    seller = usdc_balance(chain, purchase.parties.seller_account.address)
    polls(capture)
    assert_paid_by(purchase, admin_client, agreement["id"], copy)
    assert usdc_balance(chain, purchase.parties.seller_account.address) == seller  # the copy paid it, once

    chain.reorg(before_copy)  # the copy is gone, and the buyer spends its funds first
    spend_the_buyers_funds(purchase)
    chain.mine(3)
    polls(capture)
    assert_recorded_reverted(purchase, admin_client, agreement["id"])


def test_a_reverted_purchase_a_second_reorg_puts_back_on_the_chain_is_paid_again(
        escrow_chain, admin_client, settings, django_capture_on_commit_callbacks):
    """Our payment paid the purchase; a deep reorg took it and, sent again on a branch where the buyer had spent its
    funds first, it reverted: recorded reverted. A second deep reorg takes that branch; on the one that wins the
    buyer never spent, and our payment, sent again, runs: paid by it, the reversal no longer recorded."""
    chain, capture = escrow_chain, django_capture_on_commit_callbacks
    settings.CHAIN_REBROADCAST_AFTER = timedelta(0)
    purchase = Purchase(chain)
    agreement = purchase.propose()
    purchase.accept(agreement["id"], capture)
    confirm_all(capture)  # the fee permit confirmed; the fee's transfer is sent
    mined_what_was_sent()  # and mined before the fork
    before_fork = chain.snapshot()
    polls(capture, 2)
    assert purchase.parties.agreement(agreement["id"])["status"] == "paid"
    chain.reorg(before_fork)
    second_fork = reverted_on_a_second_branch(purchase, capture, agreement["id"])
    payment = ChainTransaction.objects.get(purpose=TxPurpose.DIRECT_PAYMENT)
    assert (payment.status, payment.receipt_status) == (TxStatus.FAILED, 0)
    assert_recorded_reverted(purchase, admin_client, agreement["id"])

    chain.reorg(second_fork)
    chain.mine(3)
    polls(capture)

    payment.refresh_from_db()
    assert payment.status == TxStatus.CONFIRMED
    assert_paid_by(purchase, admin_client, agreement["id"], payment.mined_tx_hash)


# --- an ordinary failure whose authorization is used later ----------------------------------------------------------

@pytest.mark.parametrize("fee_refund", ["queued", "mined", "mined_check_timed_out", "mined_check_raised", "confirmed"])
def test_a_failed_purchase_whose_authorization_is_used_later_is_paid_by_that_use(
        escrow_chain, fee_refund, monkeypatch, django_capture_on_commit_callbacks):
    """The payment reverted on its own (the buyer lacked the funds then): the purchase failed and its fee's refund
    was queued (`queued`: not yet sent; `mined`: sent and mined, not yet polled; `confirmed`: the fee back with the
    buyer). The signed authorization is still
    valid and public in the reverted transaction: once the buyer holds funds, anyone (here the buyer's own software)
    gets it mined, and the seller is paid. The purchase follows the chain: paid by that transaction once it is at the
    confirmation depth. A refund not yet sent is withdrawn (the fee is kept, as for any paid purchase); one already
    made stands (the platform bore the fee, shown refunded), also when the poll that finds the copy has not read the
    refund's receipt yet: the watched payment was read again before the checks, withdrew the refund the chain had at
    its depth and gave its nonce to a nonce fill that its bytes then outran (reconcile failed on it). The same when
    that poll's check of the refund timed out (`mined_check_timed_out`), or raised other than a chain error
    (`mined_check_raised`: logged and skipped, the refund was not among those the poll counted unread, and its
    nonce went to a nonce fill): the payment is read again at a later poll."""
    chain, capture = escrow_chain, django_capture_on_commit_callbacks
    purchase = Purchase(chain)
    fund(chain, purchase.treasury, USDC)  # the treasury's float for refunds
    body = purchase.body()
    agreement = purchase.propose(body)
    purchase.accept(agreement["id"], capture)
    confirm_all(capture)  # the fee permit confirmed; the fee's transfer is sent
    mined_what_was_sent()
    buyer_spends_once_the_payment_is_estimated(purchase, monkeypatch)
    confirm_all(capture)  # the fee confirmed; the payment is sent, and reverts
    with capture(execute=False) as refund_submission:
        poll_mined()  # the payment failed; the fee's refund is queued, its submit task not run yet
    if fee_refund != "queued":
        with capture(execute=True):
            for callback in refund_submission:
                callback()
        mined_what_was_sent()
    if fee_refund == "confirmed":
        polls(capture, 1)
    refund = ChainTransaction.objects.get(purpose=TxPurpose.DIRECT_FEE_REFUND)
    assert refund.status == {"queued": TxStatus.QUEUED, "mined": TxStatus.SUBMITTED,
                             "mined_check_timed_out": TxStatus.SUBMITTED, "mined_check_raised": TxStatus.SUBMITTED,
                             "confirmed": TxStatus.CONFIRMED}[fee_refund]
    assert purchase.parties.agreement(agreement["id"])["status"] == "payment_failed"

    fund(chain, purchase.buyer.address, 10 * USDC)
    buyer, seller, fee_recipient, treasury = purchase.balances()
    copy = copy_the_payment(purchase, body)
    chain.mine(3)
    if fee_refund == "mined_check_timed_out":
        check_times_out_once_mined(monkeypatch, refund)
    if fee_refund == "mined_check_raised":
        check_raises_once_mined(monkeypatch, refund, RuntimeError("this outcome cannot be applied"))
        with pytest.raises(RowsFailed) as failed:
            confirm_all(capture)
        assert failed.value.failed == [refund.pk]
    polls(capture)
    if fee_refund == "queued":
        with capture(execute=True):
            for callback in refund_submission:  # the refund's submit task runs at last
                callback()
        polls(capture, 1)

    paid = purchase.parties.agreement(agreement["id"])
    assert (paid["status"], paid["payment_tx_hash"], paid["buyer_refund_atomic"]) == (
        "paid", copy, None if fee_refund == "queued" else FEE)
    assert purchase.balances() == (buyer - AMOUNT, seller + AMOUNT, fee_recipient, treasury)
    refund.refresh_from_db()
    if fee_refund == "queued":
        assert (refund.status, refund.attempts.exists()) == (TxStatus.FAILED, False)  # withdrawn: never sent
    assert ChainTransaction.objects.filter(purpose=TxPurpose.DIRECT_FEE_REFUND).count() == 1
    assert not ChainTransaction.objects.filter(purpose=TxPurpose.NONCE_FILL).exists()
    call_command("reconcile", stdout=io.StringIO())


def _row_locks(queries) -> list[str]:
    return [query["sql"] for query in queries if "FOR UPDATE" in query["sql"]]


def _locks_its_agreement_first(locks: list[str], *, tx, agreement_id: str) -> None:
    """The first lock taken on `tx`'s row comes right after one on its agreement's row."""
    first = next(index for index, sql in enumerate(locks) if "escrow_chaintransaction" in sql and tx.pk.hex in
                 sql.replace("-", ""))
    assert first > 0 and "agreements_usageagreement" in locks[first - 1] and agreement_id.replace("-", "") in \
        locks[first - 1].replace("-", ""), f"{tx.purpose} locked before its agreement: {locks[max(first - 1, 0)]}"


def test_a_reorg_reopening_a_payment_and_its_fee_refund_concluded_lock_the_agreement_before_its_transactions(
        escrow_chain, monkeypatch, settings, django_capture_on_commit_callbacks):
    """A reorg reopening a failed payment locks the payment, the agreement, then withdraws the fee's refund (its row);
    the refund concluded meanwhile by another worker locks its row, then writes the agreement: each held the other's
    next lock and PostgreSQL aborted one. Both lock the agreement's row before any of its transactions'."""
    chain, capture = escrow_chain, django_capture_on_commit_callbacks
    settings.CHAIN_REBROADCAST_AFTER = timedelta(0)
    purchase = Purchase(chain)
    agreement, payment, refund, before_fork = failed_with_its_fee_refund_signed(purchase, capture, monkeypatch)

    with CaptureQueriesContext(connection) as concluding:
        confirm_all(capture)
    refund.refresh_from_db()
    assert refund.status == TxStatus.CONFIRMED
    _locks_its_agreement_first(_row_locks(concluding.captured_queries), tx=refund, agreement_id=agreement["id"])

    chain.reorg(before_fork)
    chain.mine(3)
    with CaptureQueriesContext(connection) as reopening:
        polls(capture, 1)
    _locks_its_agreement_first(_row_locks(reopening.captured_queries), tx=payment, agreement_id=agreement["id"])


def test_an_acknowledged_outrun_fill_a_deep_reorg_reopens_is_reported_again_when_the_old_bytes_run_again(
        escrow_chain, monkeypatch, settings, django_capture_on_commit_callbacks):
    """An operator acknowledged the fill outrun by the cancelled refund's old bytes. A deep reorg takes their block,
    reopening the fill; whatever then takes the nonce is a new outcome the operator never looked at. The old bytes
    mined again on the new branch are reported again until acknowledged anew (the acknowledgement stayed set, and
    reconcile said nothing)."""
    chain, capture = escrow_chain, django_capture_on_commit_callbacks
    settings.CHAIN_REBROADCAST_AFTER = timedelta(0)
    purchase, agreement, payment, refund = refund_cancelled_on_the_new_branch(chain, capture, monkeypatch, pays=True)
    before_the_old_refund = old_bytes_mined_on_the_new_branch(chain, payment, refund)
    polls(capture)
    fill = ChainTransaction.objects.get(purpose=TxPurpose.NONCE_FILL)
    call_command("reconcile", "--acknowledge-nonce-fill", str(fill.pk), "--reason", "the platform bears the fee",
                 "--operator", staff_account(), stdout=io.StringIO())

    chain.reorg(before_the_old_refund)
    chain.mine(1)  # the old block's number now holds another block, whatever its timestamp
    chain.w3.eth.send_raw_transaction(refund.attempts.get().raw_transaction)
    mined_what_was_sent()
    chain.mine(3)
    polls(capture)

    fill.refresh_from_db()
    assert (fill.status, fill.mined_tx_hash) == (TxStatus.CONFIRMED, refund.attempts.get().tx_hash)
    out = io.StringIO()
    with pytest.raises(CommandError, match="1 mismatch"):
        call_command("reconcile", stdout=out)
    assert f"nonce fill {fill.pk}" in out.getvalue()
    assert (fill.acknowledged_at, fill.acknowledged_by, fill.acknowledgement_reason) == (None, "", "")


@pytest.mark.django_db(transaction=True)
def test_a_reorg_reopening_a_payment_while_its_fee_refund_is_concluded_does_not_deadlock(
        escrow_chain, monkeypatch, settings, django_capture_on_commit_callbacks):
    """Two workers at once on one failed direct purchase: one reopens its payment a reorg took (it locked the payment,
    then the agreement, then the fee refund it withdraws), the other concludes that refund (it locked the refund, then
    wrote the agreement). Each is held, its first lock taken, until the other has its own: before, each then waited
    for the other's and PostgreSQL aborted one (deadlock detected). Both now take the agreement first: one waits."""
    chain, capture = escrow_chain, django_capture_on_commit_callbacks
    settings.CHAIN_REBROADCAST_AFTER = timedelta(0)
    purchase = Purchase(chain)
    _agreement, payment, refund, _before_fork = failed_with_its_fee_refund_signed(purchase, capture, monkeypatch)
    # Each waits (3 s at most: with one lock order, one of them waits on the other's lock instead) until the other
    # holds the lock it will want next: the reopening for the refund's, the refund for the agreement's.
    refund_locked, agreement_locked = threading.Event(), threading.Event()
    payment_reopened, refund_made = (agreement_services.agreement_direct_payment_reopened,
                                     agreement_services.agreement_direct_fee_refunded)

    def reopened_once_the_refund_is_locked(**kwargs):
        refund_locked.wait(timeout=3)
        reopened = payment_reopened(**kwargs)  # the agreement locked
        agreement_locked.set()
        return reopened

    def refunded_once_the_agreement_is_locked(**kwargs):
        refund_locked.set()
        agreement_locked.wait(timeout=3)
        return refund_made(**kwargs)

    monkeypatch.setattr(agreement_services, "agreement_direct_payment_reopened", reopened_once_the_refund_is_locked)
    monkeypatch.setattr(agreement_services, "agreement_direct_fee_refunded", refunded_once_the_agreement_is_locked)
    errors: list[BaseException] = []

    def worker(work, tx_id):
        try:
            work(ChainTransaction.objects.select_related("relayer").get(pk=tx_id))
        except BaseException as error:  # noqa: BLE001 - reported by the test's assertion
            errors.append(error)
        finally:
            connections.close_all()

    threads = [threading.Thread(target=worker, args=(relayer._reopen, payment.pk)),
               threading.Thread(target=worker, args=(relayer._conclude, refund.pk))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()

    assert errors == []
    payment.refresh_from_db()
    assert payment.status == TxStatus.SUBMITTED


def test_reconcile_prints_a_sellers_text_with_its_control_characters_escaped(escrow_chain, seller, buyer_api):
    """`reconcile` printed a reverted direct purchase's service name raw: a name a seller stored with a terminal
    escape sequence (before such names were refused, or by a path that does not check) rewrote the operator's
    terminal (colours, cleared screen, a forged line), and a bidi control reordered the line."""
    service = register_service(seller)
    agreement = propose(buyer_api, service)
    Service.objects.filter(pk=service.pk).update(name="Evil\x1b[2J\x1b[32mConsistent\u202e\x9b\r")
    UsageAgreement.objects.filter(pk=agreement["id"]).update(
        payment_reverted_at=timezone.now(), payment_reverted_reason="taken by a reorg")
    out = io.StringIO()
    with pytest.raises(CommandError, match="1 mismatch"):
        call_command("reconcile", stdout=out)
    [line] = [line for line in out.getvalue().splitlines() if agreement["id"] in line]
    assert "(Evil\\x1b[2J\\x1b[32mConsistent\\u202e\\x9b\\r of seller-one," in line, line
    assert not any(ord(char) < 32 or 0x7f <= ord(char) < 0xa0 or char == "\u202e" for char in line)


def test_reconcile_acknowledges_a_reverted_payment_only_for_a_staff_operator_who_may_and_owns_no_party(
        escrow_chain, seller, buyer_api):
    """Acknowledging a reverted payment writes off what the buyer never paid and the seller was counted. The admin's
    action takes the change permission and refuses an operator who owns a party (`operator_owns_a_party`); the
    command recorded whatever `--by` said (the OS user by default) and checked neither. It takes `--operator`, the
    operator's own account, held to the same rules, and records its username."""
    agreement = propose(buyer_api, register_service(seller))
    reverted = UsageAgreement.objects.filter(pk=agreement["id"])
    reverted.update(payment_reverted_at=timezone.now(), payment_reverted_reason="taken by a reorg")
    staff_account("viewer", "agreements.view_usageagreement")
    Agent.objects.filter(pk=seller.pk).update(owner=get_user_model().objects.get(
        username=staff_account("sellers-owner", "agreements.change_usageagreement")))
    get_user_model().objects.create_user("customer")  # not staff

    def acknowledge(*operator: str):
        call_command("reconcile", "--acknowledge-agreement", agreement["id"], "--reason", "seller paid off-chain",
                     *operator, stdout=io.StringIO())

    for operator, refusal in [((), "--operator USERNAME"), (("--operator", "nobody"), "No active staff account"),
                              (("--operator", "customer"), "No active staff account"),
                              (("--operator", "viewer"), "agreements.change_usageagreement"),
                              (("--operator", "sellers-owner"), "operator_owns_a_party")]:
        with pytest.raises(CommandError, match=refusal):
            acknowledge(*operator)
        assert reverted.get().payment_reversal_acknowledged_at is None, operator
    acknowledge("--operator", staff_account("colleague", "agreements.change_usageagreement"))
    assert reverted.get().payment_reversal_acknowledged_by == "colleague"


def test_a_fee_collection_a_reorg_takes_that_cannot_run_again_is_no_longer_counted_collected(
        escrow_chain, settings, django_capture_on_commit_callbacks):
    """The fee was collected (fee_tx_hash set), then a reorg took its block; on the new branch the buyer spent its
    funds and the fee's collection, sent again, reverts: nothing was charged. fee_tx_hash stayed, so the failed
    purchase counted its fee against the buyer's caps for 30 days. It is cleared when the reorg takes the fee."""
    chain, capture = escrow_chain, django_capture_on_commit_callbacks
    settings.CHAIN_REBROADCAST_AFTER = timedelta(0)
    purchase = Purchase(chain)
    agreement = purchase.propose()
    purchase.accept(agreement["id"], capture)
    with capture(execute=False) as fee_submission:
        poll_mined()  # the fee permit confirmed; the fee's transfer queued, not sent yet
    before_fork = chain.snapshot()
    with capture(execute=True):
        for callback in fee_submission:
            callback()
    polls(capture, 2)
    assert purchase.parties.agreement(agreement["id"])["fee_tx_hash"]

    chain.reorg(before_fork)
    spend_the_buyers_funds(purchase)
    chain.mine(3)
    polls(capture, 5)

    failed = purchase.parties.agreement(agreement["id"])
    assert failed["status"] == "payment_failed", failed
    assert ChainTransaction.objects.get(purpose=TxPurpose.DIRECT_FEE).status == TxStatus.FAILED
    assert failed["fee_tx_hash"] == "", failed


def test_an_operators_retry_of_a_failed_fee_refund_is_409_while_another_refund_of_the_fee_is_under_way(
        escrow_chain, monkeypatch, settings, django_capture_on_commit_callbacks):
    """The payment reverted on its own and the fee's refund failed (the treasury without its float). A reorg takes the
    payment's block; on the new branch it reverts again, and the purchase, failed for good, has its fee's refund
    queued anew. An operator's retry of the refund that failed first, wanted as far as the agreement says (no refund
    counted yet), raised IntegrityError out of the one-live-refund constraint (the admin's retry action a 500).
    Refused, 409 `superseded` naming the refund under way, nothing queued; the buyer gets its fee back once."""
    chain, capture = escrow_chain, django_capture_on_commit_callbacks
    settings.CHAIN_REBROADCAST_AFTER = timedelta(0)
    purchase = Purchase(chain)
    agreement = purchase.propose()
    purchase.accept(agreement["id"], capture)
    confirm_all(capture)  # the fee permit confirmed; the fee's transfer is sent
    mined_what_was_sent()  # and mined before the fork
    before_fork = chain.snapshot()
    buyer_spends_once_the_payment_is_estimated(purchase, monkeypatch)
    confirm_all(capture)  # the fee confirmed; the payment is sent, and reverts
    confirm_all(capture)  # the payment failed; the fee's refund refused (no float)
    payment = ChainTransaction.objects.get(purpose=TxPurpose.DIRECT_PAYMENT)
    [failed_refund] = ChainTransaction.objects.filter(purpose=TxPurpose.DIRECT_FEE_REFUND)
    assert (payment.status, failed_refund.status) == (TxStatus.FAILED, TxStatus.FAILED)
    chain.reorg(before_fork)
    spend_the_buyers_funds(purchase)
    chain.mine(3)
    buyer = usdc_balance(chain, purchase.buyer.address)
    fund(chain, purchase.treasury, USDC)  # the treasury's float, back
    assert relayer.transactions_reopen_reorged() == 1
    with capture(execute=True):
        for _ in range(2):  # the payment, sent again, reverts again: failed for good, its fee's refund queued anew
            mined_what_was_sent()
            relayer.transaction_check(transaction_id=payment.pk)
    assert purchase.parties.agreement(agreement["id"])["status"] == "payment_failed"
    assert ChainTransaction.objects.filter(purpose=TxPurpose.DIRECT_FEE_REFUND).exclude(
        status=TxStatus.FAILED).count() == 1

    with pytest.raises(relayer.Conflict) as refused:
        relayer.transaction_retry(tx=failed_refund, operator=get_user_model().objects.get(username=staff_account()))
    polls(capture)

    assert refused.value.code == "superseded"
    assert ChainTransaction.objects.filter(purpose=TxPurpose.DIRECT_FEE_REFUND).count() == 2  # the failed one, and one
    assert usdc_balance(chain, purchase.buyer.address) == buyer + FEE
    assert purchase.parties.agreement(agreement["id"])["buyer_refund_atomic"] == FEE


def test_a_purchase_paid_by_a_copy_a_reorg_took_counts_its_price_while_the_copy_may_run_again(
        escrow_chain, django_capture_on_commit_callbacks):
    """A reorg took the copy of the authorization that paid the purchase, and on the new branch the buyer's wallet
    cannot pay it again: payment_failed, recorded reverted. The copy's bytes are public (the old branch had them) and
    the authorization unused and valid: anyone may get them mined once the wallet holds funds. Its price was no longer
    counted against the buyer's caps (a failed payment's authorization that may pay counted, but not a reverted one):
    the buyer bought another cap's worth, and the copy mined again paid on top. It counts as any failed payment's."""
    from tests.catalog.factories import issue_owner_token
    from tests.conftest import Api

    chain, capture = escrow_chain, django_capture_on_commit_callbacks
    purchase = Purchase(chain)
    agreement, copy, before_fork = paid_by_a_copy_on_a_branch(purchase, capture)
    chain.reorg(before_fork)
    spend_the_buyers_funds(purchase)
    chain.mine(3)
    polls(capture)
    failed = purchase.parties.agreement(agreement["id"])
    assert failed["status"] == "payment_failed" and failed["payment_reverted_at"] is not None, failed
    owner_api = Api(issue_owner_token(purchase.parties.buyer.owner))
    # Room for one more purchase beside the fee kept, not beside the price too.
    assert owner_api.put(f"/agents/{purchase.parties.buyer.pk}/policies",
                         {"daily_cap_atomic": AMOUNT + 2 * FEE}).status_code == 200

    over = purchase.parties.buyer_api.post("/usage-agreements", purchase.body())

    assert over.status_code == 403, over.content
    assert over.json()["error"]["details"]["rule"] == "daily_cap"
    assert over.json()["error"]["details"]["spent"] == AMOUNT + FEE
