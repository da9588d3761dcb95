"""A reorg deeper than the confirmation depth under a skill invocation: its payment (buyer -> treasury) or its
payout or refund (treasury -> seller or buyer) is taken off the chain after the platform counted it confirmed, and
the relayer sends the same bytes again on the new branch, where they may no longer run. The invocation must say
what the chain did, and money the treasury paid out without having received it must reach an operator."""

import io
import logging
from datetime import timedelta

import pytest
from django.contrib.auth import get_user_model
from django.core.management import call_command
from django.core.management.base import CommandError
from django.urls import reverse
from django.utils import timezone
from x402.http import decode_payment_signature_header

from agreements import invocations
from agreements.models import SkillInvocation
from escrow import chain as gateway
from escrow import relayer, x402_onchain
from escrow.models import ChainTransaction, RelayerAccount, TxPurpose, TxStatus
from marketplace.errors import Conflict
from marketplace.sweeps import RowsFailed
from sdk import typed_data
from tests.agreements.helpers import proposal
from tests.agreements.test_invocations import FEE, PRICE, Market, cancelled_on_chain
from tests.catalog.factories import AgentFactory, issue_key
from tests.conftest import Api
from tests.escrow.flow import (USDC, check_raises_once_mined, check_times_out_once_mined, confirm_all, fund,
                               mined_what_was_sent, usdc_balance)
from tests.escrow.test_indexer import mined
from tests.escrow.test_relayer_faults import relayer_nonce_on_chain
from tests.marketplace.conftest import scrape
from tests.support.rpc_relay import node_relayed
from tests.support.server_clock import server_clock_drifted
from tests.support.operators import form_as_shown, staff_account

pytestmark = [pytest.mark.chain, pytest.mark.django_db]

SETTLED = {"completed": ((200, {"translation": "bonjour"}), TxPurpose.INVOCATION_PAYOUT, "paid_out"),
           "failed": ((500, {"error": "model crashed"}), TxPurpose.INVOCATION_REFUND, "refunded")}


@pytest.fixture
def market(escrow_chain, http_server, settings):
    settings.CHAIN_REBROADCAST_AFTER = timedelta(0)  # a reopened transaction is sent again at the next poll
    market = Market(escrow_chain, http_server)
    fund(escrow_chain, market.treasury, USDC)  # the treasury's float for payouts and refunds
    return market


def invocation_of(market, invocation_id: str) -> dict:
    return market.caller.get(f"/services/{invocation_id}").json()


def spend_all_but(chain, account: str, *, keep: int = 0) -> int:
    """`account` moves its USDC but `keep` to the stranger (on whichever branch the chain is on now); returns how
    much."""
    spent = usdc_balance(chain, account) - keep
    mined(chain, chain.usdc.functions.transfer(chain.accounts.stranger.address, spent).transact({"from": account}))
    return spent


def polls_until_concluded(capture, *transactions: ChainTransaction) -> None:
    for _ in range(4):
        confirm_all(capture)
        if all(ChainTransaction.objects.get(pk=tx.pk).status in (TxStatus.CONFIRMED, TxStatus.FAILED)
               for tx in transactions):
            return
    raise AssertionError("the reopened transactions were not concluded after 4 polls")


def paid_and_taken_by_its_worker(market) -> tuple[str, ChainTransaction, str]:
    """An async invocation paid, taken by its worker and calling the seller (its run never ends here), on a branch a
    snapshot taken just before the payment can undo. Returns the invocation id, the payment and the snapshot."""
    header = market.pay("render")
    before_fork = market.chain.snapshot()
    invocation_id = market.call("render", header).json()["invocation_id"]  # its worker never runs
    SkillInvocation.objects.filter(pk=invocation_id.removeprefix("inv_")).update(
        status="processing", started_at=timezone.now(), deadline_at=timezone.now() + timedelta(seconds=30))
    return invocation_id, ChainTransaction.objects.get(purpose=TxPurpose.INVOCATION_PAYMENT), before_fork


def paid_and_settled_on_a_branch(market, capture, outcome: str, api=None) -> tuple[str, str]:
    """A sync invocation paid, run (answered as `outcome` says) and its payout or refund confirmed, all on a branch
    a snapshot taken just before the payment can undo; called anonymously, or as the agent whose key `api` holds.
    Returns the invocation id and the snapshot."""
    upstream, _, money = SETTLED[outcome]
    market.upstream.responses.append(upstream)
    payment = market.pay("translate")
    before_fork = market.chain.snapshot()
    with capture(execute=True):
        response = market.call("translate", payment, api=api)
    confirm_all(capture)  # the payout or refund
    invocation_id = response.json().get("invocation_id") or response.json()["error"]["details"]["invocation_id"]
    invocation = invocation_of(market, invocation_id)
    assert (invocation["status"], invocation["payment"]["status"]) == (outcome, money)
    return invocation_id, before_fork


def payout_stands_after_its_payment_reverted(market, invocation_id: str, payment: ChainTransaction,
                                             payout: ChainTransaction) -> None:
    """The payment failed reverted, its payout confirmed (no nonce fill took its nonce), the invocation recorded
    payment_reverted with that payout's transaction."""
    payment.refresh_from_db()
    payout.refresh_from_db()
    assert (payment.status, payment.receipt_status) == (TxStatus.FAILED, 0)
    assert not ChainTransaction.objects.filter(purpose=TxPurpose.NONCE_FILL).exists()
    assert payout.status == TxStatus.CONFIRMED
    invocation = invocation_of(market, invocation_id)
    assert invocation["payment"]["status"] == "payment_reverted"
    assert invocation["payment"]["settlement_tx_hash"] == payout.mined_tx_hash


def polls_checking_first(capture, first: ChainTransaction, *transactions: ChainTransaction) -> None:
    """`polls_until_concluded`, each poll checking `first` before the others (a poll checks the transactions it
    reads least recently written first)."""
    for _ in range(4):
        ChainTransaction.objects.filter(pk=first.pk).update(updated_at=timezone.now() - timedelta(days=1))
        confirm_all(capture)
        if all(ChainTransaction.objects.get(pk=tx.pk).status in (TxStatus.CONFIRMED, TxStatus.FAILED)
               for tx in (first, *transactions)):
            return
    raise AssertionError("the reopened transactions were not concluded after 4 polls")


@pytest.mark.parametrize("checked_first", ["payment", "settlement", "payment_settlement_timed_out"])
@pytest.mark.parametrize("outcome", ["completed", "failed"])
def test_a_payment_a_reorg_took_after_the_payout_that_cannot_run_again_is_recorded_until_acknowledged(
        market, outcome, checked_first, monkeypatch, caplog, admin_client, django_capture_on_commit_callbacks):
    """The new branch has neither the payment nor its payout (or refund); there the buyer spends its USDC before
    the relayer sends the payment again, which reverts, while the payout, sent again too, pays the seller (or the
    buyer) from the treasury's float. The treasury paid out money it never received: the invocation says so, an
    error is logged, the dashboard and the metrics show it and reconcile fails until an operator acknowledges it.
    Nothing runs or pays again. Whichever of the two a poll checks first, and when the payout's check times out:
    the payment's failure, concluded first, withdrew the payout the chain already had at its depth, and a nonce fill
    of its nonce reported its bytes as run in the fill's place (reconcile's second mismatch)."""
    chain, capture = market.chain, django_capture_on_commit_callbacks
    invocation_id, before_fork = paid_and_settled_on_a_branch(market, capture, outcome)
    _, purpose, money = SETTLED[outcome]
    payment, settlement = (ChainTransaction.objects.get(purpose=TxPurpose.INVOCATION_PAYMENT),
                           ChainTransaction.objects.get(purpose=purpose))
    treasury = usdc_balance(chain, market.treasury)

    chain.reorg(before_fork)  # another branch wins, deeper than CHAIN_CONFIRMATIONS (1)
    # Nothing left: the refund's stored bytes, estimated for a balance that was not empty, fill an empty slot.
    spend_all_but(chain, market.buyer.address, keep=0)
    chain.mine(3)
    first, other = (settlement, payment) if checked_first == "settlement" else (payment, settlement)
    if checked_first == "payment_settlement_timed_out":
        check_times_out_once_mined(monkeypatch, settlement)
    with caplog.at_level(logging.ERROR, logger="agreements.invocations"):
        polls_checking_first(capture, first, other)
    confirm_all(capture)  # what the outcome sent (a nonce fill), concluded

    payment.refresh_from_db()
    settlement.refresh_from_db()
    assert (payment.status, payment.receipt_status) == (TxStatus.FAILED, 0)
    assert settlement.status == TxStatus.CONFIRMED
    assert usdc_balance(chain, market.treasury) == treasury - PRICE  # paid out, never paid in
    invocation = invocation_of(market, invocation_id)
    assert invocation["status"] == outcome and invocation["payment"]["status"] == "payment_reverted"
    assert invocation["payment"]["settlement_tx_hash"] == settlement.mined_tx_hash
    [logged] = [record for record in caplog.records
                if record.name == "agreements.invocations" and record.levelno == logging.ERROR]
    assert logged.invocation_id == invocation_id and logged.tx_hash == payment.mined_tx_hash
    assert len(market.upstream.requests) == 1  # the seller was called once
    assert ChainTransaction.objects.filter(purpose=purpose).count() == 1  # and nothing paid out again
    assert not ChainTransaction.objects.filter(purpose=TxPurpose.NONCE_FILL).exists()

    dashboard = admin_client.get("/admin/dashboard/").content.decode()
    assert "skill invocation payment reverted" in dashboard and invocation_id in dashboard
    metrics = admin_client.get("/metrics").content.decode()
    assert 'marketplace_invocation_payments_reverted{acknowledged="false"} 1.0' in metrics
    with pytest.raises(CommandError, match="1 mismatch"):
        call_command("reconcile", stdout=io.StringIO())
    out = io.StringIO()
    call_command("reconcile", "--acknowledge-invocation", invocation_id, "--reason", "the platform bears it",
                 "--operator", staff_account(), stdout=out)
    assert "Acknowledged 1 reverted invocation payment(s)." in out.getvalue() and "Consistent" in out.getvalue()
    assert "acknowledged by ops at " in out.getvalue() and invocation_id in out.getvalue()
    assert invocation_of(market, invocation_id)["payment"]["status"] == "payment_reverted"


def settlements_sent_from_a_new_relayer_wallet(chain, settings, monkeypatch) -> str:
    """The operators replace the relayer key (the old one kept retired) once the invocation's payment is signed: its
    payout or refund goes from the new wallet, a treasury with a float. Returns the new wallet's address."""
    new_wallet, old_key = chain.accounts.spare, settings.RELAYER_PRIVATE_KEY
    fund(chain, new_wallet.address, USDC)
    submit = relayer.transaction_submit

    def rotate_then_submit(*, transaction_id):
        if ChainTransaction.objects.get(pk=transaction_id).purpose != TxPurpose.INVOCATION_PAYMENT:
            settings.RELAYER_PRIVATE_KEY, settings.RELAYER_RETIRED_PRIVATE_KEYS = new_wallet.key, [old_key]
        return submit(transaction_id=transaction_id)

    monkeypatch.setattr(relayer, "transaction_submit", rotate_then_submit)
    return new_wallet.address


def test_a_payment_a_reorg_took_after_a_payout_of_the_new_relayer_wallet_leaves_that_payout_confirmed(
        market, settings, monkeypatch, django_capture_on_commit_callbacks):
    """As above, the relayer key replaced between the payment (the old wallet's) and the payout (the new wallet's),
    and the poll that finds the payment reverted at its depth times out on the payout's check. The payment's failure
    waited only for its own wallet's later nonces: concluded in that poll, it withdrew the payout the chain had at its
    depth, and a nonce fill of the new wallet was given its nonce. It waits for what it can withdraw, whatever the
    wallet: the payout is confirmed and stands."""
    chain, capture = market.chain, django_capture_on_commit_callbacks
    new_wallet = settlements_sent_from_a_new_relayer_wallet(chain, settings, monkeypatch)
    invocation_id, before_fork = paid_and_settled_on_a_branch(market, capture, "completed")
    payment, payout = (ChainTransaction.objects.get(purpose=TxPurpose.INVOCATION_PAYMENT),
                       ChainTransaction.objects.get(purpose=TxPurpose.INVOCATION_PAYOUT))
    assert (payment.relayer.address, payout.relayer.address) == (market.treasury, new_wallet)

    chain.reorg(before_fork)
    spend_all_but(chain, market.buyer.address, keep=0)
    chain.mine(3)
    check_times_out_once_mined(monkeypatch, payout)
    polls_checking_first(capture, payment, payout)
    confirm_all(capture)

    payout_stands_after_its_payment_reverted(market, invocation_id, payment, payout)


@pytest.mark.parametrize("payout_unread", ["out_of_the_polls_batch", "its_check_raised"])
def test_a_payment_a_reorg_took_after_a_payout_the_poll_did_not_read_leaves_that_payout_confirmed(
        market, payout_unread, monkeypatch, django_capture_on_commit_callbacks):
    """As above, the payment and its payout both sent again on the new branch and mined there at their depth, and the
    poll that finds the payment reverted does not read the payout: it is not among the POLL_BATCH least recently
    polled that the poll takes up (more in flight than that, here a batch of one that never holds the payout), or its
    check raised other than a chain error (logged and skipped). The payment's failure waited only for a payout whose
    check failed on the chain: concluded in that poll, it withdrew the payout the chain had at its depth, and a nonce
    fill was given its nonce. It waits until every in-flight transaction of its invocation was read in its poll, which
    reads those of a failure's agreement or invocation that its batch left out: the payout is confirmed and stands."""
    chain, capture = market.chain, django_capture_on_commit_callbacks
    invocation_id, before_fork = paid_and_settled_on_a_branch(market, capture, "completed")
    payment, payout = (ChainTransaction.objects.get(purpose=TxPurpose.INVOCATION_PAYMENT),
                       ChainTransaction.objects.get(purpose=TxPurpose.INVOCATION_PAYOUT))

    chain.reorg(before_fork)
    spend_all_but(chain, market.buyer.address, keep=0)
    chain.mine(3)
    confirm_all(capture)  # both reopened and their bytes sent again: the node mines them
    mined_what_was_sent()
    assert all(relayer._first_receipt(ChainTransaction.objects.get(pk=tx.pk)) for tx in (payment, payout))
    if payout_unread == "out_of_the_polls_batch":
        monkeypatch.setattr(relayer, "POLL_BATCH", 1)
    else:
        check_raises_once_mined(monkeypatch, payout, RuntimeError("this outcome cannot be applied"))
    rows_failed = []
    for _ in range(4):
        # The payment is the least recently polled, so the batch of one is the payment alone at every poll.
        ChainTransaction.objects.filter(pk=payment.pk).update(polled_at=timezone.now() - timedelta(days=1),
                                                              updated_at=timezone.now() - timedelta(days=1))
        try:
            confirm_all(capture)
        except RowsFailed as failed:
            rows_failed.append(failed.failed)
        if ChainTransaction.objects.get(pk=payment.pk).status == TxStatus.FAILED:
            break
    confirm_all(capture)

    assert rows_failed == ([[payout.pk]] if payout_unread == "its_check_raised" else [])
    payout_stands_after_its_payment_reverted(market, invocation_id, payment, payout)


def test_a_payment_a_reorg_took_that_someone_else_sent_on_the_new_branch_is_paid_by_that_transaction(
        market, django_capture_on_commit_callbacks):
    """On the new branch whoever held the authorization (it was public in the old branch's block) gets it mined
    first: the buyer paid all the same, by another transaction; ours, sent again, reverts. The invocation stays
    paid, and names the transaction that paid."""
    chain, capture = market.chain, django_capture_on_commit_callbacks
    invocation_id, before_fork = paid_and_settled_on_a_branch(market, capture, "completed")
    payment, payout = (ChainTransaction.objects.get(purpose=TxPurpose.INVOCATION_PAYMENT),
                       ChainTransaction.objects.get(purpose=TxPurpose.INVOCATION_PAYOUT))

    chain.reorg(before_fork)
    copied = chain.w3.eth.send_transaction({"from": chain.accounts.stranger.address, "to": payment.to_address,
                                            "data": payment.data, "gas": 200_000})
    mined(chain, copied)
    chain.mine(3)
    polls_until_concluded(capture, payment, payout)

    payment.refresh_from_db()
    assert payment.status == TxStatus.FAILED and payment.outcome_evidence["used_by"] == "0x" + copied.hex()
    invocation = invocation_of(market, invocation_id)
    assert invocation["payment"]["status"] == "paid_out"
    assert invocation["payment"]["tx_hash"] == "0x" + copied.hex()
    assert invocation["payment"]["settlement_tx_hash"] == ChainTransaction.objects.get(pk=payout.pk).mined_tx_hash
    call_command("reconcile", stdout=io.StringIO())


@pytest.mark.parametrize("outcome", ["completed", "failed"])
def test_a_payout_a_reorg_took_that_cannot_run_again_leaves_the_invocation_paying_out_until_retried(
        market, outcome, django_capture_on_commit_callbacks):
    """The new branch keeps the payment but not the payout (or refund); there the treasury's USDC is spent before
    the relayer sends the payout again, which fails. The invocation no longer names a payout the chain does not
    have: it is being paid out (refunded) again, and an operator's retry of the failed transaction settles it."""
    chain, capture = market.chain, django_capture_on_commit_callbacks
    upstream, purpose, money = SETTLED[outcome]
    market.upstream.responses.append(upstream)
    payment = market.pay("translate")
    with capture(execute=False) as settle:  # paid and run; the payout (refund) is not sent yet
        response = market.call("translate", payment)
    invocation_id = response.json().get("invocation_id") or response.json()["error"]["details"]["invocation_id"]
    before_fork = chain.snapshot()
    with capture(execute=True):
        for callback in settle:
            callback()
    confirm_all(capture)
    settlement = ChainTransaction.objects.get(purpose=purpose)
    assert invocation_of(market, invocation_id)["payment"]["status"] == money

    chain.reorg(before_fork)
    spent = spend_all_but(chain, market.treasury)  # the treasury is the relayer wallet: the payout's nonce too
    chain.mine(3)
    polls_until_concluded(capture, settlement)

    settlement.refresh_from_db()
    assert settlement.status == TxStatus.FAILED
    invocation = invocation_of(market, invocation_id)
    assert invocation["payment"]["status"] == {"paid_out": "paying_out", "refunded": "refunding"}[money]
    assert invocation["payment"]["settlement_tx_hash"] == ""

    mined(chain, chain.usdc.functions.transfer(market.treasury, spent).transact(  # not from the relayer wallet
        {"from": chain.accounts.stranger.address}))
    with capture(execute=True):
        retry = relayer.transaction_retry(tx=settlement, operator=get_user_model().objects.get(username=staff_account()))
    confirm_all(capture)
    retry.refresh_from_db()
    invocation = invocation_of(market, invocation_id)
    assert (invocation["payment"]["status"], invocation["payment"]["settlement_tx_hash"]) == (
        money, retry.mined_tx_hash)


def test_a_payment_a_reorg_took_before_the_invocation_ran_holds_the_run_until_it_is_confirmed_again(
        market, django_capture_on_commit_callbacks):
    """The payment of an async invocation whose worker has not run yet is taken off the chain: the seller is not
    called on it; when the payment then cannot run again, the invocation failed for want of payment, nothing
    charged and nothing to refund, as any payment that did not execute."""
    chain, capture = market.chain, django_capture_on_commit_callbacks
    payment = market.pay("render")
    before_fork = chain.snapshot()
    with capture(execute=False) as worker:  # paid; its worker's run is queued
        response = market.call("render", payment)
    invocation_id = response.json()["invocation_id"]
    payment_tx = ChainTransaction.objects.get(purpose=TxPurpose.INVOCATION_PAYMENT)
    assert invocation_of(market, invocation_id)["payment"]["status"] == "held"

    chain.reorg(before_fork)
    spend_all_but(chain, market.buyer.address, keep=1)  # less than the price
    chain.mine(3)
    with capture(execute=True):
        relayer.transactions_reopen_reorged()
    assert invocation_of(market, invocation_id)["payment"]["status"] == "authorized"
    with capture(execute=True):
        for callback in worker:  # the worker runs now: not on a payment the chain does not have
            callback()
    assert market.upstream.requests == []
    polls_until_concluded(capture, payment_tx)

    invocation = invocation_of(market, invocation_id)
    assert (invocation["status"], invocation["payment"]["status"]) == ("failed", "payment_failed")
    assert market.upstream.requests == []
    assert not ChainTransaction.objects.exclude(purpose=TxPurpose.INVOCATION_PAYMENT).exists()
    call_command("reconcile", stdout=io.StringIO())


def test_a_payment_a_reorg_took_while_the_seller_ran_is_neither_paid_out_nor_refunded(
        market, admin_client, admin_user, django_capture_on_commit_callbacks):
    """The worker had taken the invocation when its payment was taken off the chain, and the payment cannot run
    again: the treasury holds nothing for it, so its end queues no payout or refund; the seller worked unpaid, which
    an operator is told of as of any reverted payment."""
    chain, capture = market.chain, django_capture_on_commit_callbacks
    invocation_id, payment_tx, before_fork = paid_and_taken_by_its_worker(market)
    pk = invocation_id.removeprefix("inv_")

    chain.reorg(before_fork)
    spend_all_but(chain, market.buyer.address, keep=1)  # less than the price
    chain.mine(3)
    polls_until_concluded(capture, payment_tx)
    with capture(execute=True):  # the worker's call ends: here, past its deadline
        assert invocations.invocations_sweep(now=timezone.now() + timedelta(minutes=1))["timed_out"] == 1
    confirm_all(capture)

    invocation = invocation_of(market, invocation_id)
    assert (invocation["status"], invocation["payment"]["status"]) == ("timeout", "payment_reverted")
    assert not ChainTransaction.objects.exclude(purpose=TxPurpose.INVOCATION_PAYMENT).exists()
    with pytest.raises(CommandError, match="1 mismatch"):
        call_command("reconcile", stdout=io.StringIO())

    changelist = reverse("admin:agreements_skillinvocation_changelist")
    selected = {"action": "acknowledge_reverted_payment", "_selected_action": [pk]}
    asked = admin_client.post(changelist, selected)
    assert asked.status_code == 200 and invocation_id in asked.content.decode()
    assert admin_client.post(changelist, {**form_as_shown(asked.content.decode(), "acknowledge-form"), "reason": "seller paid by hand"}
                             ).status_code == 302
    acknowledged = SkillInvocation.objects.get(pk=pk)
    assert (acknowledged.payment_reversal_acknowledged_by, acknowledged.payment_reversal_acknowledgement_reason) == (
        admin_user.username, "seller paid by hand")
    call_command("reconcile", stdout=io.StringIO())
    assert invocation_of(market, invocation_id)["payment"]["status"] == "payment_reverted"


def capped_buyer_agent(market, owner, owner_api, *, daily_cap: int) -> Api:
    """The buyer's wallet as an agent of `owner`, whose policy caps its day at `daily_cap`; its API."""
    agent = AgentFactory(owner=owner, handle="buyer-one", is_buyer=True, is_seller=False,
                         wallet_address=market.buyer.address)
    assert owner_api.put(f"/agents/{agent.pk}/policies", {"daily_cap_atomic": daily_cap}).status_code == 200
    return Api(issue_key(agent))


def assert_over_the_cap(response, *, spent: int) -> None:
    assert response.status_code == 403, response.content
    assert response.json()["error"]["details"]["rule"] == "daily_cap"
    assert response.json()["error"]["details"]["spent"] == spent


def authorization_ran_out(market, invocation_id: str, monkeypatch) -> None:
    """The chain's clock, and ours, past the invocation's authorization's validBefore by the margin a late use needs
    to be found at the confirmation depth: it can no longer pay."""
    valid_before = SkillInvocation.objects.select_related("authorization").get(
        pk=invocation_id.removeprefix("inv_")).authorization.valid_before
    later = valid_before - market.chain.now() + x402_onchain.LATE_USE_MARGIN_SECONDS + 1
    market.chain.increase_time(later)
    market.chain.mine(1)
    server_clock_drifted(monkeypatch, later)


def test_a_reverted_payment_counts_against_its_owners_spend_cap_while_its_authorization_may_still_pay(
        market, owner_api, owner, monkeypatch, django_capture_on_commit_callbacks):
    """The buyer's agent pays an invocation with its API key, the seller is paid out, then a reorg takes the payment
    off the chain and it cannot run again (the buyer's funds spent first on the new branch): the money has not left
    the buyer's wallet. But the signed authorization is unused and valid, its bytes public (they paid once), and
    anyone may get it mined once the wallet holds funds again: the price reaches the treasury, which paid the seller
    already. Released at the reversal, the buyer called again a cap's worth, and a stranger's copy of the first took
    the first price on top, past the cap. It counts until the authorization can no longer pay (its validBefore past
    by the margin a use needs to be found); the treasury's loss stays in front of the operator meanwhile."""
    chain, capture = market.chain, django_capture_on_commit_callbacks
    agent_api = capped_buyer_agent(market, owner, owner_api, daily_cap=PRICE)  # one call a day
    market.upstream.responses.append(SETTLED["completed"][0])
    first = market.pay("translate")
    before_fork = chain.snapshot()
    with capture(execute=True):
        invocation_id = market.call("translate", first, api=agent_api).json()["invocation_id"]
    confirm_all(capture)  # the payout
    payment, payout = (ChainTransaction.objects.get(purpose=TxPurpose.INVOCATION_PAYMENT),
                       ChainTransaction.objects.get(purpose=TxPurpose.INVOCATION_PAYOUT))
    chain.reorg(before_fork)
    spend_all_but(chain, market.buyer.address, keep=0)
    chain.mine(3)
    polls_until_concluded(capture, payment, payout)
    assert invocation_of(market, invocation_id)["payment"]["status"] == "payment_reverted"
    with pytest.raises(CommandError, match="1 mismatch"):
        call_command("reconcile", stdout=io.StringIO())
    fund(chain, market.buyer.address, 10 * USDC)  # the wallet holds funds again
    market.upstream.responses.append(SETTLED["completed"][0])

    with capture(execute=True):
        second = market.call("translate", market.pay("translate"), api=agent_api)

    assert_over_the_cap(second, spent=PRICE)
    # Anyone may still get it paid, which is why it counts: the buyer pays the price the seller was paid.
    before_copy = chain.snapshot()
    buyer = usdc_balance(chain, market.buyer.address)
    mine_a_copy(chain, first)
    assert usdc_balance(chain, market.buyer.address) == buyer - PRICE
    chain.reorg(before_copy)
    # Past its validBefore, with the margin, it can no longer pay: the budget is back.
    authorization_ran_out(market, invocation_id, monkeypatch)
    with capture(execute=True):
        assert market.call("translate", market.pay("translate"), api=agent_api).status_code == 200


def test_a_failed_payment_counts_against_its_owners_spend_cap_while_its_authorization_may_still_pay(
        market, owner_api, owner, monkeypatch, django_capture_on_commit_callbacks):
    """The buyer's wallet is emptied between the relayer's estimate of the payment and its mining: the payment reverts
    and the invocation fails, nothing charged. Its authorization is unused and valid, its calldata public in the
    reverted transaction: anyone may get it mined once the wallet holds funds again, and the price leaves the wallet
    (the treasury refunds it once the relayer finds the copy at the confirmation depth). Released at the failure,
    the buyer called again a cap's worth, and the copy took the first price on top, past the cap. It counts while
    the authorization may pay; once found used and refunded it counts nothing."""
    chain, capture = market.chain, django_capture_on_commit_callbacks
    agent_api = capped_buyer_agent(market, owner, owner_api, daily_cap=PRICE)  # one call a day
    first = market.pay("translate")
    invocation_id, _ = failed_on_its_own(market, monkeypatch, capture, first, api=agent_api)
    assert invocation_of(market, invocation_id)["payment"]["status"] == "payment_failed"
    fund(chain, market.buyer.address, 10 * USDC)  # the wallet holds funds again
    market.upstream.responses.append(SETTLED["completed"][0])

    with capture(execute=True):
        second = market.call("translate", market.pay("translate"), api=agent_api)

    assert_over_the_cap(second, spent=PRICE)
    buyer = usdc_balance(chain, market.buyer.address)
    mine_a_copy(chain, first)  # a stranger gets it mined: the price leaves the wallet
    assert usdc_balance(chain, market.buyer.address) == buyer - PRICE
    chain.mine(3)
    confirm_all(capture)
    with capture(execute=True):  # still counted while the refund is under way
        assert_over_the_cap(market.call("translate", market.pay("translate"), api=agent_api), spent=PRICE)
    polls_until_concluded(capture, ChainTransaction.objects.get(purpose=TxPurpose.INVOCATION_REFUND))
    assert invocation_of(market, invocation_id)["payment"]["status"] == "refunded"
    assert usdc_balance(chain, market.buyer.address) == buyer
    market.upstream.responses.append(SETTLED["completed"][0])
    with capture(execute=True):
        assert market.call("translate", market.pay("translate"), api=agent_api).status_code == 200


def test_a_failed_payment_no_longer_counts_against_its_owners_spend_cap_once_its_authorization_ran_out(
        market, owner_api, owner, monkeypatch, django_capture_on_commit_callbacks):
    chain, capture = market.chain, django_capture_on_commit_callbacks
    agent_api = capped_buyer_agent(market, owner, owner_api, daily_cap=PRICE)
    invocation_id, _ = failed_on_its_own(market, monkeypatch, capture, market.pay("translate"), api=agent_api)
    fund(chain, market.buyer.address, 10 * USDC)
    with capture(execute=True):
        assert_over_the_cap(market.call("translate", market.pay("translate"), api=agent_api), spent=PRICE)

    authorization_ran_out(market, invocation_id, monkeypatch)

    market.upstream.responses.append(SETTLED["completed"][0])
    with capture(execute=True):
        assert market.call("translate", market.pay("translate"), api=agent_api).status_code == 200


@pytest.mark.parametrize("how", ["cancelled", "used_elsewhere"])
def test_a_failed_payment_no_longer_counts_against_its_owners_spend_cap_once_its_authorization_is_closed_on_chain(
        market, owner_api, owner, monkeypatch, settings, how, django_capture_on_commit_callbacks):
    """The payment failed and its authorization, valid for hours yet, counted against the buyer's cap until then. The
    buyer closes it on the token itself: EIP-3009's cancelAuthorization (`cancelled`), or another transfer it signed
    under the same nonce, to a wallet of its own (`used_elsewhere`). Nobody can get it mined any more, yet the watch
    of failed payments recorded nothing and the budget stayed held until its validBefore. Once the poll finds the
    close at the confirmation depth, the cap is free; before that depth it still counts (a reorg may take it)."""
    chain, capture = market.chain, django_capture_on_commit_callbacks
    agent_api = capped_buyer_agent(market, owner, owner_api, daily_cap=PRICE)
    first = market.pay("translate")
    failed_on_its_own(market, monkeypatch, capture, first, api=agent_api)
    fund(chain, market.buyer.address, 10 * USDC)
    with capture(execute=True):
        assert_over_the_cap(market.call("translate", market.pay("translate"), api=agent_api), spent=PRICE)

    confirmations, settings.CHAIN_CONFIRMATIONS = settings.CHAIN_CONFIRMATIONS, 3
    if how == "cancelled":
        cancelled_on_chain(market, first)
    else:
        used_elsewhere(market, first)
    confirm_all(capture)  # the watch reads it in a block a reorg may still take: it still counts
    with capture(execute=True):
        assert_over_the_cap(market.call("translate", market.pay("translate"), api=agent_api), spent=PRICE)
    chain.mine(2)
    settings.CHAIN_CONFIRMATIONS = confirmations
    confirm_all(capture)

    market.upstream.responses.append(SETTLED["completed"][0])
    with capture(execute=True):
        freed = market.call("translate", market.pay("translate"), api=agent_api)
    assert freed.status_code == 200, freed.content


def test_a_poll_of_a_watched_payment_reads_its_authorizations_state_once(
        market, monkeypatch, settings, django_capture_on_commit_callbacks):
    """A failed payment's authorization the buyer cancelled, the cancel not yet at the confirmation depth: the watch
    asks the token's `authorizationState` once per poll, the use and the close then read from its logs. (Before: twice,
    once for the use and once again for the close.)"""
    chain, capture = market.chain, django_capture_on_commit_callbacks
    first = market.pay("translate")
    failed_on_its_own(market, monkeypatch, capture, first)
    settings.CHAIN_CONFIRMATIONS = 3
    cancelled_on_chain(market, first)
    state_reads = []
    with node_relayed(chain.node.rpc_url, settings) as relay:
        relay.observers.append(lambda call: state_reads.append(call) if call.get("method") == "eth_call" and call[
            "params"][0].get("data", "").startswith("0xe94a0102") else None)  # authorizationState(address,bytes32)
        confirm_all(capture)
    assert len(state_reads) == 1
    assert SkillInvocation.objects.get().authorization_closed_by == ""  # not at the confirmation depth yet


def used_elsewhere(market, payment: str) -> None:
    """The payer signs another transfer under the payment's nonce, to itself, and gets it mined: the nonce is spent,
    nothing reached payTo."""
    authorization = decode_payment_signature_header(payment).payload["authorization"]
    valid_before = int(authorization["validBefore"])
    typed = typed_data.transfer_with_authorization(
        chain_id=market.chain.chain_id, token_address=market.chain.usdc.address, from_address=market.buyer.address,
        to_address=market.buyer.address, value=1, valid_after=0, valid_before=valid_before, nonce=authorization["nonce"])
    signature = bytes.fromhex(typed_data.sign_typed_data(market.buyer.key, typed)[2:])
    sent = market.chain.usdc.get_function_by_signature(
        "transferWithAuthorization(address,address,uint256,uint256,uint256,bytes32,bytes)")(
        market.buyer.address, market.buyer.address, 1, 0, valid_before, bytes.fromhex(authorization["nonce"][2:]),
        signature).transact({"from": market.buyer.address})
    assert market.chain.w3.eth.wait_for_transaction_receipt(sent)["status"] == 1


@pytest.mark.parametrize("outcome", ["completed", "failed"])
def test_a_payout_not_yet_sent_when_its_payment_is_found_reverted_is_withdrawn_and_pays_nothing(
        market, outcome, django_capture_on_commit_callbacks):
    """The invocation ran on a confirmed payment and its payout (or refund) is queued, not yet signed (its submit
    task not run: a busy worker, the broker down), when a reorg takes the payment and it cannot run again. Nothing
    of the payout was sent, and the treasury never received what it would send: it is withdrawn, and neither the
    sweeper nor an operator's retry sends it. The invocation stays recorded for the operator (the seller worked
    unpaid, or the buyer was not refunded a payment it never made)."""
    chain, capture = market.chain, django_capture_on_commit_callbacks
    upstream, purpose, _ = SETTLED[outcome]
    market.upstream.responses.append(upstream)
    payment = market.pay("translate")
    before_fork = chain.snapshot()
    with capture(execute=False) as settle:  # paid and run; the payout's (refund's) submit task is not run yet
        response = market.call("translate", payment)
    invocation_id = response.json().get("invocation_id") or response.json()["error"]["details"]["invocation_id"]
    payment_tx, settlement = (ChainTransaction.objects.get(purpose=TxPurpose.INVOCATION_PAYMENT),
                              ChainTransaction.objects.get(purpose=purpose))
    assert settlement.status == TxStatus.QUEUED
    treasury = usdc_balance(chain, market.treasury)

    chain.reorg(before_fork)
    spend_all_but(chain, market.buyer.address, keep=0)
    chain.mine(3)
    polls_until_concluded(capture, payment_tx)
    with capture(execute=True):
        for callback in settle:  # the payout's submit task runs at last
            callback()
        relayer.transactions_sweep_queued()
    confirm_all(capture)

    settlement.refresh_from_db()
    assert (settlement.status, settlement.nonce) == (TxStatus.FAILED, None)
    assert not settlement.attempts.exists()
    assert usdc_balance(chain, market.treasury) == treasury - PRICE  # only what the buyer's payment brought in
    invocation = invocation_of(market, invocation_id)
    assert invocation["payment"]["status"] == "payment_reverted"
    assert invocation["payment"]["settlement_tx_hash"] == ""
    assert SkillInvocation.objects.get(pk=invocation_id.removeprefix("inv_")).money == "payment_failed"
    with pytest.raises(Conflict) as refused:
        relayer.transaction_retry(tx=settlement, operator=get_user_model().objects.get(username=staff_account()))
    assert refused.value.code == "withdrawn"
    with pytest.raises(CommandError, match="1 mismatch"):
        call_command("reconcile", stdout=io.StringIO())


def signed_not_sent_on_a_branch(market, capture, monkeypatch, outcome: str) -> tuple[str, str]:
    """A sync invocation paid (confirmed) and run on a branch a snapshot taken just before the payment can undo; its
    payout (or refund) signed, its nonce taken and its bytes stored, but its worker died before broadcasting them.
    Returns the invocation id and the snapshot."""
    upstream, purpose, _ = SETTLED[outcome]
    market.upstream.responses.append(upstream)
    payment = market.pay("translate")
    before_fork = market.chain.snapshot()
    with capture(execute=False) as settle:
        response = market.call("translate", payment)
    invocation_id = response.json().get("invocation_id") or response.json()["error"]["details"]["invocation_id"]
    monkeypatch.setattr(relayer, "_broadcast", lambda attempt: None)  # the worker dies after signing
    with capture(execute=True):
        for callback in settle:
            callback()
    monkeypatch.undo()
    settlement = ChainTransaction.objects.get(purpose=purpose)
    assert settlement.status == TxStatus.SUBMITTED and settlement.attempts.get().broadcast_at is None
    return invocation_id, before_fork


def signed_then_back_where_the_buyer_spent(market, capture, monkeypatch, outcome: str
                                           ) -> tuple[str, ChainTransaction, ChainTransaction]:
    """`signed_not_sent_on_a_branch`, then back to its fork, where the buyer spends its funds: the payment cannot run
    again. Returns the invocation id, the payment and the payout (or refund)."""
    invocation_id, before_fork = signed_not_sent_on_a_branch(market, capture, monkeypatch, outcome)
    payment_tx, settlement = (ChainTransaction.objects.get(purpose=TxPurpose.INVOCATION_PAYMENT),
                              ChainTransaction.objects.get(purpose=SETTLED[outcome][1]))
    market.chain.reorg(before_fork)
    spend_all_but(market.chain, market.buyer.address, keep=0)
    market.chain.mine(3)
    return invocation_id, payment_tx, settlement


def payment_found_reverted_first(capture, payment: ChainTransaction) -> None:
    """The relayer sends the payment the reorg took again and finds it reverted before it looks at the payout (which
    waits behind the payment's nonce)."""
    with capture(execute=True):
        relayer.transaction_check(transaction_id=payment.pk)  # sent again
        mined_what_was_sent()
        relayer.transaction_check(transaction_id=payment.pk)  # reverted: the buyer spent its funds
    payment.refresh_from_db()
    assert (payment.status, payment.receipt_status) == (TxStatus.FAILED, 0)


@pytest.mark.parametrize("outcome", ["completed", "failed"])
def test_a_payout_signed_when_its_payment_is_found_reverted_is_cancelled_by_a_nonce_fill_and_pays_nothing(
        market, outcome, monkeypatch, django_capture_on_commit_callbacks):
    """The payout (or refund) was signed but not broadcast when a reorg takes the payment and it cannot run again.
    The treasury never received what it would send: it is withdrawn, and as its bytes may be out all the same (a
    broadcast the node took though the answer was lost) its nonce goes to a nonce fill, which takes it. Nothing left
    the treasury: the invocation's money is as for a payout withdrawn before it was signed, an operator's retry is
    refused, and reconcile reports the reverted payment alone."""
    chain, capture = market.chain, django_capture_on_commit_callbacks
    invocation_id, payment_tx, settlement = signed_then_back_where_the_buyer_spent(market, capture, monkeypatch, outcome)
    treasury = usdc_balance(chain, market.treasury)
    assert relayer.transactions_reopen_reorged() == 1  # the payment
    payment_found_reverted_first(capture, payment_tx)
    for _ in range(3):
        confirm_all(capture)

    settlement.refresh_from_db()
    fill = ChainTransaction.objects.get(purpose=TxPurpose.NONCE_FILL)
    assert (settlement.status, settlement.nonce, settlement.attempts.count()) == (TxStatus.FAILED, None, 1)
    assert relayer.WITHDRAWN in settlement.context
    assert (fill.status, fill.context, fill.mined_tx_hash) == (
        TxStatus.CONFIRMED, {relayer.CANCELS: str(settlement.pk)}, fill.attempts.get().tx_hash)
    assert fill.attempts.get().nonce == settlement.attempts.get().nonce
    assert relayer_nonce_on_chain(chain) == RelayerAccount.objects.get().next_nonce
    assert usdc_balance(chain, market.treasury) == treasury  # nothing paid in, nothing paid out
    invocation = invocation_of(market, invocation_id)
    assert (invocation["payment"]["status"], invocation["payment"]["settlement_tx_hash"]) == ("payment_reverted", "")
    assert SkillInvocation.objects.get(pk=invocation_id.removeprefix("inv_")).money == "payment_failed"
    with pytest.raises(Conflict) as refused:
        relayer.transaction_retry(tx=settlement, operator=get_user_model().objects.get(username=staff_account()))
    assert (refused.value.code, refused.value.status_code) == ("withdrawn", 409)
    out = io.StringIO()
    with pytest.raises(CommandError, match="1 mismatch"):
        call_command("reconcile", stdout=out)
    assert invocation_id in out.getvalue() and f"nonce fill {fill.pk}" not in out.getvalue()


def test_a_signed_payout_cancelled_whose_old_bytes_are_mined_first_is_recorded_as_made(
        market, monkeypatch, django_capture_on_commit_callbacks):
    """As above, but the payout's signed bytes reached the node before the reorg was noticed (anyone holding them may
    send them), and are mined on the new branch in its fill's place: the seller was paid from the treasury's own
    funds. The invocation names the payout the chain has, as one made before the reorg; reconcile reports both the
    reverted payment and the fill until an operator acknowledges each."""
    chain, capture = market.chain, django_capture_on_commit_callbacks
    invocation_id, before_fork = signed_not_sent_on_a_branch(market, capture, monkeypatch, "completed")
    payment_tx, payout = (ChainTransaction.objects.get(purpose=TxPurpose.INVOCATION_PAYMENT),
                          ChainTransaction.objects.get(purpose=TxPurpose.INVOCATION_PAYOUT))

    chain.reorg(before_fork)
    spend_all_but(chain, market.buyer.address, keep=0)
    chain.mine(3)
    treasury = usdc_balance(chain, market.treasury)
    old_payout = payout.attempts.get()
    for old in (payment_tx.attempts.get(), old_payout):
        chain.w3.eth.send_raw_transaction(old.raw_transaction)
    mined_what_was_sent()
    assert relayer.transactions_reopen_reorged() == 1  # the payment
    payment_found_reverted_first(capture, payment_tx)
    for _ in range(3):
        confirm_all(capture)

    assert_paid_out_by_the_cancelled_payout(market, invocation_id, payout, old_payout, treasury=treasury)


def test_a_payout_the_reorg_took_and_mined_again_when_its_payment_is_found_reverted_is_recorded_as_made(
        market, django_capture_on_commit_callbacks):
    """The payout was confirmed before the reorg; on the new branch it is sent again with the payment and mined (not
    yet at its depth) when the payment is found reverted: it is withdrawn, and its fill finds it mined in its place.
    The invocation names that payout, and reconcile reports the reverted payment and the fill."""
    chain, capture = market.chain, django_capture_on_commit_callbacks
    invocation_id, before_fork = paid_and_settled_on_a_branch(market, capture, "completed")
    payment_tx, payout = (ChainTransaction.objects.get(purpose=TxPurpose.INVOCATION_PAYMENT),
                          ChainTransaction.objects.get(purpose=TxPurpose.INVOCATION_PAYOUT))
    # Queued when the depth was 3 (the node may mine an empty block after the payout's: 2 would not hold it mined).
    ChainTransaction.objects.filter(pk=payout.pk).update(confirmations_required=3)

    chain.reorg(before_fork)
    spend_all_but(chain, market.buyer.address, keep=0)
    chain.mine(3)
    treasury = usdc_balance(chain, market.treasury)
    assert relayer.transactions_reopen_reorged() == 2
    with capture(execute=True):
        for tx in (payout, payment_tx):  # both sent again: the payout waits behind the payment's nonce
            relayer.transaction_check(transaction_id=tx.pk)
        mined_what_was_sent()
        relayer.transaction_check(transaction_id=payout.pk)
        assert ChainTransaction.objects.get(pk=payout.pk).status == TxStatus.MINED  # not yet at its depth
    payment_found_reverted_first(capture, payment_tx)
    for _ in range(4):
        chain.mine(1)
        confirm_all(capture)

    assert_paid_out_by_the_cancelled_payout(market, invocation_id, payout, payout.attempts.get(), treasury=treasury)


def assert_paid_out_by_the_cancelled_payout(market, invocation_id: str, payout, old_payout, *, treasury: int) -> None:
    payout.refresh_from_db()
    fill = ChainTransaction.objects.get(purpose=TxPurpose.NONCE_FILL)
    assert (payout.status, relayer.WITHDRAWN in payout.context) == (TxStatus.FAILED, True)
    assert (fill.status, fill.context, fill.mined_tx_hash) == (
        TxStatus.CONFIRMED, {relayer.CANCELS: str(payout.pk)}, old_payout.tx_hash)
    assert usdc_balance(market.chain, market.treasury) == treasury - (PRICE - FEE)  # paid out (less the fee), never paid in
    assert relayer_nonce_on_chain(market.chain) == RelayerAccount.objects.get().next_nonce
    invocation = invocation_of(market, invocation_id)
    assert (invocation["payment"]["status"], invocation["payment"]["settlement_tx_hash"]) == (
        "payment_reverted", old_payout.tx_hash)
    assert SkillInvocation.objects.get(pk=invocation_id.removeprefix("inv_")).money == "paid_out"
    assert ChainTransaction.objects.filter(purpose=TxPurpose.INVOCATION_PAYOUT).count() == 1  # not sent again
    out = io.StringIO()
    with pytest.raises(CommandError, match="2 mismatch"):
        call_command("reconcile", stdout=out)
    assert invocation_id in out.getvalue() and f"nonce fill {fill.pk}" in out.getvalue()
    call_command("reconcile", "--acknowledge-invocation", invocation_id, "--acknowledge-nonce-fill", str(fill.pk),
                 "--reason", "the platform bears it", "--operator", staff_account(), stdout=io.StringIO())
    call_command("reconcile", stdout=io.StringIO())


def cancelled_when_its_payment_is_found_reverted(market, capture, monkeypatch, outcome: str, *, old_bytes_first: bool
                                                 ) -> tuple[str, ChainTransaction, str]:
    """`signed_not_sent_on_a_branch`, then back to its fork, where the buyer spent its funds: the payment's old bytes
    are mined and revert, the payout (or refund) is withdrawn and its nonce passes to a nonce fill. `old_bytes_first`:
    anyone holding the payout's old signed bytes gets them mined in the fill's place, else the fill is mined. Returns
    the invocation id, the payout and a snapshot taken after the payment's old bytes, before whichever took the
    payout's nonce."""
    chain = market.chain
    invocation_id, payment_tx, settlement = signed_then_back_where_the_buyer_spent(market, capture, monkeypatch, outcome)
    chain.w3.eth.send_raw_transaction(payment_tx.attempts.get().raw_transaction)
    mined_what_was_sent()
    before_the_nonce_is_taken = chain.snapshot()
    if old_bytes_first:
        chain.w3.eth.send_raw_transaction(settlement.attempts.get().raw_transaction)
        mined_what_was_sent()
    assert relayer.transactions_reopen_reorged() == 1  # the payment
    payment_found_reverted_first(capture, payment_tx)
    for _ in range(3):
        confirm_all(capture)
    fill = ChainTransaction.objects.get(purpose=TxPurpose.NONCE_FILL)
    assert fill.status == TxStatus.CONFIRMED
    assert fill.mined_tx_hash == (settlement.attempts.get() if old_bytes_first else fill.attempts.get()).tx_hash
    return invocation_id, settlement, before_the_nonce_is_taken


@pytest.mark.parametrize("outcome", ["completed", "failed"])
def test_a_cancelled_payout_whose_old_bytes_a_second_reorg_takes_is_no_longer_recorded_as_made(
        market, outcome, monkeypatch, django_capture_on_commit_callbacks):
    """The payout (or refund) withdrawn when its payment was found reverted was outrun by its old bytes: recorded as
    made. A second deep reorg takes their block, and the fill is mined at their nonce instead: nothing left the
    treasury. The invocation follows the chain, as when the fill took the nonce the first time: its money
    payment_failed, naming no settlement; reconcile reports the reverted payment, no longer the fill."""
    chain, capture = market.chain, django_capture_on_commit_callbacks
    _, purpose, money = SETTLED[outcome]
    treasury = usdc_balance(chain, market.treasury)
    invocation_id, settlement, before_the_old_bytes = cancelled_when_its_payment_is_found_reverted(
        market, capture, monkeypatch, outcome, old_bytes_first=True)
    invocation = SkillInvocation.objects.get(pk=invocation_id.removeprefix("inv_"))
    assert (invocation.money, invocation.settlement_tx_hash) == (money, settlement.attempts.get().tx_hash)

    chain.reorg(before_the_old_bytes)
    chain.mine(3)
    for _ in range(3):
        confirm_all(capture)

    fill = ChainTransaction.objects.get(purpose=TxPurpose.NONCE_FILL)
    assert (fill.status, fill.mined_tx_hash) == (TxStatus.CONFIRMED, fill.attempts.get().tx_hash)
    assert usdc_balance(chain, market.treasury) == treasury  # nothing paid in, nothing paid out
    invocation = invocation_of(market, invocation_id)
    assert (invocation["payment"]["status"], invocation["payment"]["settlement_tx_hash"]) == ("payment_reverted", "")
    assert SkillInvocation.objects.get(pk=invocation_id.removeprefix("inv_")).money == "payment_failed"
    assert ChainTransaction.objects.filter(purpose=purpose).count() == 1  # not sent again
    assert relayer_nonce_on_chain(chain) == RelayerAccount.objects.get().next_nonce
    out = io.StringIO()
    with pytest.raises(CommandError, match="1 mismatch"):
        call_command("reconcile", stdout=out)
    assert invocation_id in out.getvalue() and f"nonce fill {fill.pk}" not in out.getvalue()


@pytest.mark.parametrize("outcome", ["completed", "failed"])
def test_a_cancelled_payout_whose_fill_a_second_reorg_takes_for_its_old_bytes_is_recorded_as_made(
        market, outcome, monkeypatch, django_capture_on_commit_callbacks):
    """The reverse: the fill took the withdrawn payout's (or refund's) nonce, and the invocation's money is
    payment_failed. A second deep reorg takes the fill's block, and the payout's old bytes are mined at its nonce
    instead: the treasury paid it out. The invocation names that payout, as one made before the reorg, and reconcile
    reports the reverted payment and the fill."""
    chain, capture = market.chain, django_capture_on_commit_callbacks
    _, purpose, money = SETTLED[outcome]
    invocation_id, settlement, before_the_fill = cancelled_when_its_payment_is_found_reverted(
        market, capture, monkeypatch, outcome, old_bytes_first=False)
    assert SkillInvocation.objects.get(pk=invocation_id.removeprefix("inv_")).money == "payment_failed"
    treasury = usdc_balance(chain, market.treasury)

    chain.reorg(before_the_fill)
    old_bytes = settlement.attempts.get()
    chain.w3.eth.send_raw_transaction(old_bytes.raw_transaction)
    mined_what_was_sent()
    chain.mine(3)
    for _ in range(3):
        confirm_all(capture)

    fill = ChainTransaction.objects.get(purpose=TxPurpose.NONCE_FILL)
    assert (fill.status, fill.mined_tx_hash) == (TxStatus.CONFIRMED, old_bytes.tx_hash)
    assert usdc_balance(chain, market.treasury) == treasury - (PRICE - FEE if outcome == "completed" else PRICE)  # paid out, never paid in
    invocation = invocation_of(market, invocation_id)
    assert (invocation["payment"]["status"], invocation["payment"]["settlement_tx_hash"]) == (
        "payment_reverted", old_bytes.tx_hash)
    assert SkillInvocation.objects.get(pk=invocation_id.removeprefix("inv_")).money == money
    assert ChainTransaction.objects.filter(purpose=purpose).count() == 1
    out = io.StringIO()
    with pytest.raises(CommandError, match="2 mismatch"):
        call_command("reconcile", stdout=out)
    assert invocation_id in out.getvalue() and f"nonce fill {fill.pk}" in out.getvalue()


def mine_a_copy(chain, payment: str) -> str:
    """Someone holding the signed payment header gets its authorization mined, from their own account; its hash."""
    payload = decode_payment_signature_header(payment).payload
    authorization = payload["authorization"]
    v, r, s = typed_data.split_signature(payload["signature"])
    copied = chain.usdc.functions.transferWithAuthorization(
        authorization["from"], authorization["to"], int(authorization["value"]), int(authorization["validAfter"]),
        int(authorization["validBefore"]), bytes.fromhex(authorization["nonce"][2:]), v, bytes.fromhex(r[2:]),
        bytes.fromhex(s[2:])).transact({"from": chain.accounts.stranger.address})
    mined(chain, copied)
    return "0x" + copied.hex().removeprefix("0x")


def front_run(market, monkeypatch, payment: str, *, when: str) -> None:
    """The copy is mined between the platform's check and the relayer's transaction (`before_sending`: ours then
    fails its simulation and is never sent), or just before ours reaches the node (`before_ours_is_mined`: ours is
    mined after it and reverts)."""
    if when == "before_sending":
        simulate = x402_onchain.simulate

        def simulated_then_front_run(authorization):
            simulate(authorization)
            mine_a_copy(market.chain, payment)

        monkeypatch.setattr(x402_onchain, "simulate", simulated_then_front_run)
        return
    broadcast = relayer._broadcast

    def front_run_then_broadcast(attempt):
        if attempt.transaction.purpose == TxPurpose.INVOCATION_PAYMENT:
            mine_a_copy(market.chain, payment)
        broadcast(attempt)

    monkeypatch.setattr(relayer, "_broadcast", front_run_then_broadcast)


@pytest.mark.parametrize("when", ["before_sending", "before_ours_is_mined"])
@pytest.mark.parametrize("buyer_spends", [False, True])
def test_a_payment_counted_paid_by_someone_elses_copy_is_reopened_when_a_reorg_takes_that_copy(
        market, buyer_spends, when, monkeypatch, django_capture_on_commit_callbacks):
    """Our payment failed because someone else's copy of the authorization was mined first, and the invocation was
    counted paid by that copy, run, and paid out. A reorg deeper than the confirmation depth takes the copy (and the
    payout) off the chain: the payment is reopened and sent again, as a confirmed one would be. Where the buyer's
    funds are still there it pays the treasury now, by our transaction; where the buyer spent them first it
    cannot run, and the treasury's loss is recorded for the operator (not shown as paid by a transaction the chain
    no longer has)."""
    chain, capture = market.chain, django_capture_on_commit_callbacks
    market.upstream.responses.append((200, {"translation": "bonjour"}))
    payment = market.pay("translate")
    before_fork = chain.snapshot()
    front_run(market, monkeypatch, payment, when=when)
    with capture(execute=True):
        invocation_id = market.call("translate", payment).json()["invocation_id"]
    monkeypatch.undo()
    confirm_all(capture)  # the payout
    payment_tx, payout = (ChainTransaction.objects.get(purpose=TxPurpose.INVOCATION_PAYMENT),
                          ChainTransaction.objects.get(purpose=TxPurpose.INVOCATION_PAYOUT))
    copy = invocation_of(market, invocation_id)["payment"]["tx_hash"]
    assert payment_tx.status == TxStatus.FAILED and payment_tx.outcome_evidence["used_by"] == copy
    assert payment_tx.receipt_status == {"before_sending": None, "before_ours_is_mined": 0}[when]
    assert invocation_of(market, invocation_id)["payment"]["status"] == "paid_out"
    treasury = usdc_balance(chain, market.treasury)

    chain.reorg(before_fork)  # neither the copy nor the payout is on the new branch
    if buyer_spends:
        spend_all_but(chain, market.buyer.address, keep=0)
    chain.mine(3)
    polls_until_concluded(capture, payment_tx, payout)
    confirm_all(capture)

    payment_tx.refresh_from_db()
    invocation = invocation_of(market, invocation_id)
    assert len(market.upstream.requests) == 1
    payout.refresh_from_db()
    if buyer_spends:
        assert payment_tx.status == TxStatus.FAILED
        assert invocation["payment"]["status"] == "payment_reverted"
        assert usdc_balance(chain, market.treasury) == treasury - PRICE  # paid out, never paid in
        assert invocation["payment"]["settlement_tx_hash"] == payout.attempts.get().tx_hash
        if when == "before_sending":
            # Sent again from queued, the payment fails in its simulation after the payout's bytes were sent again,
            # before their receipt was seen: the payout is withdrawn, and its fill finds them mined in its place.
            fill = ChainTransaction.objects.get(purpose=TxPurpose.NONCE_FILL)
            assert (payout.status, fill.status, fill.mined_tx_hash) == (
                TxStatus.FAILED, TxStatus.CONFIRMED, payout.attempts.get().tx_hash)
        else:  # mined again, the payout is confirmed again before the payment's revert is found
            assert payout.status == TxStatus.CONFIRMED
        with pytest.raises(CommandError, match=f"{1 + (when == 'before_sending')} mismatch"):
            call_command("reconcile", stdout=io.StringIO())
    else:
        assert (payment_tx.status, payout.status) == (TxStatus.CONFIRMED, TxStatus.CONFIRMED)
        assert invocation["payment"]["status"] == "paid_out"
        assert invocation["payment"]["tx_hash"] == payment_tx.mined_tx_hash != copy
        assert usdc_balance(chain, market.treasury) == treasury  # paid in by ours, paid out again
        call_command("reconcile", stdout=io.StringIO())


def test_a_payment_that_reverted_on_its_own_and_runs_on_the_new_branch_is_refunded(
        market, monkeypatch, django_capture_on_commit_callbacks):
    """The buyer spent its funds between the relayer's estimate and the mining: our payment was mined and reverted,
    the invocation failed with nothing charged and the seller was not called. A reorg deeper than the confirmation
    depth takes that block; on the new branch the buyer never spent, and the same bytes, sent again, run: the
    treasury holds the price of an invocation that failed, and the buyer is refunded (it was told nothing was
    charged, and may have paid for another call since)."""
    chain, capture = market.chain, django_capture_on_commit_callbacks
    payment = market.pay("translate")
    buyer = usdc_balance(chain, market.buyer.address)
    before_fork = chain.snapshot()
    estimate = gateway.simulate

    def estimate_then_buyer_spends(**transaction):
        gas = estimate(**transaction)
        monkeypatch.setattr(gateway, "simulate", estimate)
        spend_all_but(chain, market.buyer.address)
        return gas

    monkeypatch.setattr(gateway, "simulate", estimate_then_buyer_spends)
    with capture(execute=True):
        response = market.call("translate", payment)
    assert response.status_code == 402 and response.json()["error"] == "payment_failed", response.content
    invocation_id = SkillInvocation.objects.get().public_id
    payment_tx = ChainTransaction.objects.get(purpose=TxPurpose.INVOCATION_PAYMENT)
    assert (payment_tx.status, payment_tx.receipt_status) == (TxStatus.FAILED, 0)
    assert invocation_of(market, invocation_id)["payment"]["status"] == "payment_failed"

    chain.reorg(before_fork)  # the buyer's spending is not on the new branch
    chain.mine(3)
    polls_until_concluded(capture, payment_tx)
    refund = ChainTransaction.objects.get(purpose=TxPurpose.INVOCATION_REFUND)
    polls_until_concluded(capture, refund)

    payment_tx.refresh_from_db()
    assert (payment_tx.status, payment_tx.attempts.count()) == (TxStatus.CONFIRMED, 1)
    invocation = invocation_of(market, invocation_id)
    assert invocation["status"] == "failed" and invocation["payment"]["status"] == "refunded"
    assert invocation["payment"]["tx_hash"] == payment_tx.mined_tx_hash
    assert invocation["payment"]["settlement_tx_hash"] == ChainTransaction.objects.get(pk=refund.pk).mined_tx_hash
    assert usdc_balance(chain, market.buyer.address) == buyer
    assert not market.upstream.requests  # the seller was never called
    call_command("reconcile", stdout=io.StringIO())


# --- a payment recorded reverted that the chain has again ----------------------------------------------------------

def paid_out_then_recorded_reverted(market, capture, admin_client, invocation_id: str, before_fork: str):
    """The invocation's payout confirmed, then back to `before_fork`, where the payment cannot run again: recorded
    reverted. Returns the payment, the payout and a snapshot of that second branch's fork."""
    confirm_all(capture)  # the payout
    payment, payout = (ChainTransaction.objects.get(purpose=TxPurpose.INVOCATION_PAYMENT),
                       ChainTransaction.objects.get(purpose=TxPurpose.INVOCATION_PAYOUT))
    market.chain.reorg(before_fork)
    second_fork = reverted_on_a_second_branch(market, capture, payment, payout)
    assert_recorded_reverted(market, admin_client, invocation_id, unacknowledged=1)
    return payment, payout, second_fork


def reverted_on_a_second_branch(market, capture, payment: ChainTransaction, *others: ChainTransaction) -> str:
    """The chain, at the fork the test reverted to, goes on along a branch where the buyer spends its USDC first:
    `payment`, sent again, reverts, and is recorded reverted. Returns a snapshot of that fork, so that a reorg
    can take this branch in turn."""
    chain = market.chain
    second_fork = chain.snapshot()
    spend_all_but(chain, market.buyer.address, keep=0)
    chain.mine(3)
    polls_until_concluded(capture, payment, *others)
    assert SkillInvocation.objects.get(pk=payment.context["invocation_id"]).payment_reverted_at is not None
    return second_fork


def assert_recorded_reverted(market, admin_client, invocation_id: str, *, unacknowledged: int) -> None:
    assert invocation_of(market, invocation_id)["payment"]["status"] == "payment_reverted"
    metrics = admin_client.get("/metrics").content.decode()
    assert f'marketplace_invocation_payments_reverted{{acknowledged="false"}} {unacknowledged}.0' in metrics
    with pytest.raises(CommandError, match="1 mismatch"):
        call_command("reconcile", stdout=io.StringIO())


@pytest.mark.parametrize("paid_by", ["ours", "a_copy"])
def test_a_reverted_payment_a_second_reorg_puts_back_on_the_chain_is_paid_again_and_recorded_again_if_taken_again(
        market, paid_by, owner_api, owner, admin_client, django_capture_on_commit_callbacks):
    """The payment was paid out, taken off the chain by a deep reorg, and recorded reverted on the branch where the
    buyer had spent its funds first. A second deep reorg takes that branch: on the one that wins, the buyer never
    spent, and the payment runs (our bytes sent again, or someone's copy of the authorization mined first). The
    treasury has the money: the invocation is paid out again, naming that transaction, its reversal no longer
    recorded, counted against the buyer's owner's cap (as it was while recorded reverted: its authorization could
    still pay), reconcile consistent and the gauge down. A third reorg that takes the payment once more, where it
    cannot run, records it again."""
    chain, capture = market.chain, django_capture_on_commit_callbacks
    agent = AgentFactory(owner=owner, handle="buyer-one", is_buyer=True, is_seller=False,
                         wallet_address=market.buyer.address)
    agent_api = Api(issue_key(agent))
    assert owner_api.put(f"/agents/{agent.pk}/policies", {"daily_cap_atomic": 300_000}).status_code == 200
    market.upstream.responses.append(SETTLED["completed"][0])
    header = market.pay("translate")
    before_fork = chain.snapshot()
    treasury = usdc_balance(chain, market.treasury)
    with capture(execute=True):
        invocation_id = market.call("translate", header, api=agent_api).json()["invocation_id"]
    payment, payout, second_fork = paid_out_then_recorded_reverted(market, capture, admin_client, invocation_id,
                                                                   before_fork)
    refused = agent_api.post("/usage-agreements", proposal(market.service))  # counted: its authorization may pay
    assert refused.status_code == 403 and refused.json()["error"]["details"]["spent"] == PRICE

    chain.reorg(second_fork)  # the buyer's spending is not on this branch
    third_fork = chain.snapshot()
    if paid_by == "a_copy":
        mine_a_copy(chain, header)
    chain.mine(3)
    polls_until_concluded(capture, payment, payout)
    confirm_all(capture)

    payment.refresh_from_db()
    invocation = invocation_of(market, invocation_id)
    assert invocation["status"] == "completed" and invocation["payment"]["status"] == "paid_out"
    paid_by_hash = payment.mined_tx_hash if paid_by == "ours" else payment.outcome_evidence["used_by"]
    assert paid_by_hash and invocation["payment"]["tx_hash"] == paid_by_hash
    assert invocation["payment"]["settlement_tx_hash"] == ChainTransaction.objects.get(pk=payout.pk).mined_tx_hash
    assert usdc_balance(chain, market.treasury) == treasury + FEE  # paid in, and paid out (less the fee) once on this branch
    assert SkillInvocation.objects.get(pk=invocation_id.removeprefix("inv_")).payment_reverted_reason == ""
    metrics = admin_client.get("/metrics").content.decode()
    assert 'marketplace_invocation_payments_reverted{acknowledged="false"} 0.0' in metrics
    call_command("reconcile", stdout=io.StringIO())
    refused = agent_api.post("/usage-agreements", proposal(market.service))
    assert refused.status_code == 403 and refused.json()["error"]["details"]["spent"] == PRICE  # paid: counted
    assert len(market.upstream.requests) == 1

    chain.reorg(third_fork)
    reverted_on_a_second_branch(market, capture, payment, payout)
    assert_recorded_reverted(market, admin_client, invocation_id, unacknowledged=1)
    assert len(market.upstream.requests) == 1


@pytest.mark.parametrize("outcome", ["completed", "failed"])
def test_a_reverted_payment_held_for_a_run_that_ended_meanwhile_is_settled_once_the_chain_has_it_again(
        market, outcome, admin_client, django_capture_on_commit_callbacks):
    """The payment was recorded reverted while the seller ran (nothing to pay out or refund when the run ended). A
    second deep reorg puts a branch where it ran back: the treasury holds the price again, so the run's end is
    settled now, paid out to the seller (or refunded to the buyer), once."""
    chain, capture = market.chain, django_capture_on_commit_callbacks
    upstream, purpose, money = SETTLED[outcome]
    market.upstream.responses.append(upstream)
    header = market.pay("translate")
    before_fork = chain.snapshot()
    with capture(execute=False) as settle:  # paid and run; the payout (refund) is queued, not sent
        response = market.call("translate", header)
    invocation_id = response.json().get("invocation_id") or response.json()["error"]["details"]["invocation_id"]
    payment = ChainTransaction.objects.get(purpose=TxPurpose.INVOCATION_PAYMENT)
    chain.reorg(before_fork)
    second_fork = reverted_on_a_second_branch(market, capture, payment)
    with capture(execute=True):
        for callback in settle:  # withdrawn: nothing of it is sent
            callback()
    assert SkillInvocation.objects.get(pk=invocation_id.removeprefix("inv_")).money == "payment_failed"
    assert_recorded_reverted(market, admin_client, invocation_id, unacknowledged=1)

    chain.reorg(second_fork)
    chain.mine(3)
    polls_until_concluded(capture, payment)
    [settlement] = ChainTransaction.objects.filter(purpose=purpose).exclude(status=TxStatus.FAILED)
    polls_until_concluded(capture, settlement)

    invocation = invocation_of(market, invocation_id)
    assert (invocation["status"], invocation["payment"]["status"]) == (outcome, money)
    assert invocation["payment"]["settlement_tx_hash"] == ChainTransaction.objects.get(pk=settlement.pk).mined_tx_hash
    assert len(market.upstream.requests) == 1
    call_command("reconcile", stdout=io.StringIO())


def test_a_reverted_payment_found_again_while_the_seller_runs_is_held_for_the_runs_end(
        market, django_capture_on_commit_callbacks):
    """The payment was recorded reverted while the worker called the seller (money payment_failed: its end would
    pay nothing out or back). A second deep reorg puts the branch where it ran back before the call ends: the money
    is held again, and the run's end settles it (here a time-out: refunded), once."""
    chain, capture = market.chain, django_capture_on_commit_callbacks
    invocation_id, payment, before_fork = paid_and_taken_by_its_worker(market)
    pk = invocation_id.removeprefix("inv_")
    chain.reorg(before_fork)
    second_fork = reverted_on_a_second_branch(market, capture, payment)
    assert SkillInvocation.objects.get(pk=pk).money == "payment_failed"

    chain.reorg(second_fork)
    chain.mine(3)
    polls_until_concluded(capture, payment)
    assert invocation_of(market, invocation_id)["payment"]["status"] == "held"
    with capture(execute=True):  # the worker's call ends: here, past its deadline
        assert invocations.invocations_sweep(now=timezone.now() + timedelta(minutes=1))["timed_out"] == 1
    polls_until_concluded(capture, ChainTransaction.objects.get(purpose=TxPurpose.INVOCATION_REFUND))

    invocation = invocation_of(market, invocation_id)
    assert (invocation["status"], invocation["payment"]["status"]) == ("timeout", "refunded")
    assert ChainTransaction.objects.filter(purpose=TxPurpose.INVOCATION_REFUND).count() == 1
    call_command("reconcile", stdout=io.StringIO())


@pytest.mark.parametrize("copy_mined", ["later_on_the_same_branch", "by_a_second_reorg"])
def test_a_reverted_payment_whose_authorization_a_copy_uses_later_is_paid_by_that_copy_until_a_reorg_takes_it(
        market, copy_mined, monkeypatch, admin_client, django_capture_on_commit_callbacks):
    """The payment is recorded reverted on a fact no block of ours holds: that its authorization is unused. It may
    be used after all, by anyone holding it: a copy mined later on the same branch, once the buyer holds funds again
    (`later_on_the_same_branch`), or a copy that paid the invocation first, taken off the chain by the first reorg
    and put back by a second (`by_a_second_reorg`: ours was never sent, it failed its simulation). Once the copy is
    at the confirmation depth the invocation is paid by it, its reversal (acknowledged meanwhile) no longer
    recorded; a reorg that takes the copy where the payment cannot run records it again, for an operator again."""
    chain, capture = market.chain, django_capture_on_commit_callbacks
    market.upstream.responses.append(SETTLED["completed"][0])
    header = market.pay("translate")
    before_fork = chain.snapshot()
    if copy_mined == "by_a_second_reorg":
        front_run(market, monkeypatch, header, when="before_sending")
    with capture(execute=True):
        invocation_id = market.call("translate", header).json()["invocation_id"]
    monkeypatch.undo()
    payment, payout, second_fork = paid_out_then_recorded_reverted(market, capture, admin_client, invocation_id,
                                                                   before_fork)
    assert payment.attempts.exists() == (copy_mined == "later_on_the_same_branch")  # else never sent: no block
    call_command("reconcile", "--acknowledge-invocation", invocation_id, "--reason", "the platform bears it",
                 "--operator", staff_account(), stdout=io.StringIO())  # followed all the same while it is valid

    if copy_mined == "by_a_second_reorg":
        chain.reorg(second_fork)
        before_copy = chain.snapshot()
    else:
        before_copy = chain.snapshot()
        fund(chain, market.buyer.address, 10 * USDC)
    copy = mine_a_copy(chain, header)
    chain.mine(3)
    polls_until_concluded(capture, payment, payout)
    confirm_all(capture)
    # The payout the second branch had withdrawn (its nonce filled) paid nothing there: the payment found again, the
    # run's end is paid out anew, once.
    polls_until_concluded(capture, *ChainTransaction.objects.filter(purpose=TxPurpose.INVOCATION_PAYOUT))

    invocation = invocation_of(market, invocation_id)
    assert invocation["payment"]["status"] == "paid_out"
    assert invocation["payment"]["tx_hash"] == copy
    assert ChainTransaction.objects.filter(purpose=TxPurpose.INVOCATION_PAYOUT,
                                           status=TxStatus.CONFIRMED).count() == 1
    metrics = admin_client.get("/metrics").content.decode()
    assert 'marketplace_invocation_payments_reverted{acknowledged="true"} 0.0' in metrics
    call_command("reconcile", stdout=io.StringIO())

    chain.reorg(before_copy)  # the copy is gone, and the buyer's funds with it
    spend_all_but(chain, market.buyer.address, keep=0)
    chain.mine(3)
    polls_until_concluded(capture, payment, payout)
    assert_recorded_reverted(market, admin_client, invocation_id, unacknowledged=1)
    assert len(market.upstream.requests) == 1


# --- an ordinary failure whose authorization is used later ----------------------------------------------------------

def failed_on_its_own(market, monkeypatch, capture, header: str, *, how: str = "reverted", api: Api | None = None
                      ) -> tuple[str, ChainTransaction]:
    """The buyer spends its funds after the platform's check: between the relayer's estimate and the mining
    (`reverted`: our payment is mined and reverts), or before the relayer's estimate (`failed_its_simulation`: ours
    is never sent). The invocation fails with nothing charged, its seller never called. Called anonymously, or as the
    agent whose key `api` holds. Returns its id and the payment."""
    if how == "reverted":
        estimate = gateway.simulate

        def estimate_then_buyer_spends(**transaction):
            gas = estimate(**transaction)
            monkeypatch.setattr(gateway, "simulate", estimate)
            spend_all_but(market.chain, market.buyer.address)
            return gas

        monkeypatch.setattr(gateway, "simulate", estimate_then_buyer_spends)
    else:
        simulate = x402_onchain.simulate

        def checked_then_buyer_spends(authorization):
            simulate(authorization)
            spend_all_but(market.chain, market.buyer.address)

        monkeypatch.setattr(x402_onchain, "simulate", checked_then_buyer_spends)
    with capture(execute=True):
        response = market.call("translate", header, api=api)
    monkeypatch.undo()
    assert response.status_code == 402 and response.json()["error"] == "payment_failed", response.content
    payment = ChainTransaction.objects.filter(purpose=TxPurpose.INVOCATION_PAYMENT).latest("created_at")
    assert (payment.status, payment.receipt_status) == (TxStatus.FAILED, 0 if how == "reverted" else None)
    return SkillInvocation.objects.latest("created_at").public_id, payment


@pytest.mark.parametrize("how", ["reverted", "failed_its_simulation"])
def test_a_failed_payment_whose_authorization_a_copy_uses_later_is_refunded_once(
        market, how, monkeypatch, django_capture_on_commit_callbacks):
    """The invocation failed without running: its payment reverted, or failed its simulation (the buyer lacked the
    funds then). The signed authorization is still valid, and its calldata is public in the reverted transaction (the
    buyer's software holds it anyway): once the buyer holds funds again anyone may get it mined. The treasury then
    holds the price of an invocation that failed: the relayer's polls find the copy at the confirmation depth and
    refund the buyer, once; the invocation stays failed and says it was paid by the copy and refunded."""
    chain, capture = market.chain, django_capture_on_commit_callbacks
    header = market.pay("translate")
    invocation_id, payment = failed_on_its_own(market, monkeypatch, capture, header, how=how)
    assert invocation_of(market, invocation_id)["payment"]["status"] == "payment_failed"
    confirm_all(capture)  # nothing to find yet

    fund(chain, market.buyer.address, 10 * USDC)
    buyer = usdc_balance(chain, market.buyer.address)
    copy = mine_a_copy(chain, header)
    assert usdc_balance(chain, market.buyer.address) == buyer - PRICE
    chain.mine(3)
    confirm_all(capture)
    refund = ChainTransaction.objects.get(purpose=TxPurpose.INVOCATION_REFUND)
    polls_until_concluded(capture, refund)
    confirm_all(capture)  # polled again: nothing more

    invocation = invocation_of(market, invocation_id)
    assert invocation["status"] == "failed" and invocation["payment"]["status"] == "refunded"
    assert invocation["payment"]["tx_hash"] == copy
    assert invocation["payment"]["settlement_tx_hash"] == ChainTransaction.objects.get(pk=refund.pk).mined_tx_hash
    assert "refunded" in invocation["error"]
    assert ChainTransaction.objects.filter(purpose=TxPurpose.INVOCATION_REFUND).count() == 1
    assert usdc_balance(chain, market.buyer.address) == buyer
    assert not market.upstream.requests  # the seller was never called
    call_command("reconcile", stdout=io.StringIO())


def test_a_failed_payments_nonce_the_buyer_spends_later_on_a_transfer_to_itself_refunds_nothing(
        market, monkeypatch, django_capture_on_commit_callbacks):
    """A late use of a failed payment's authorization is refunded because the treasury received the price. The
    buyer may spend the nonce instead on another transfer it signs, to a wallet of its own: AuthorizationUsed(buyer,
    nonce) alike, nothing to the treasury. (Before: the treasury refunded a price it never received, repeatably.)"""
    chain, capture = market.chain, django_capture_on_commit_callbacks
    fund(chain, market.treasury, USDC)  # the treasury's float: what a refund would take from
    header = market.pay("translate")
    invocation_id, _ = failed_on_its_own(market, monkeypatch, capture, header)
    confirm_all(capture)
    fund(chain, market.buyer.address, 10 * USDC)
    buyer, seller, treasury = market.balances()
    auth = decode_payment_signature_header(header).payload["authorization"]
    own_wallet = chain.accounts.stranger.address
    typed = typed_data.transfer_with_authorization(
        chain_id=chain.chain_id, token_address=chain.usdc.address, from_address=market.buyer.address,
        to_address=own_wallet, value=PRICE, valid_after=0, valid_before=int(auth["validBefore"]), nonce=auth["nonce"],
        token_name=chain.usdc.functions.name().call())
    v, r, s = typed_data.split_signature(typed_data.sign_typed_data(market.buyer.key, typed))
    mined(chain, chain.usdc.functions.transferWithAuthorization(
        market.buyer.address, own_wallet, PRICE, 0, int(auth["validBefore"]), bytes.fromhex(auth["nonce"][2:]), v,
        bytes.fromhex(r[2:]), bytes.fromhex(s[2:])).transact({"from": market.buyer.address}))
    chain.mine(3)
    for _ in range(3):
        confirm_all(capture)

    assert market.balances() == (buyer - PRICE, seller, treasury)
    assert not ChainTransaction.objects.filter(purpose=TxPurpose.INVOCATION_REFUND).exists()
    assert invocation_of(market, invocation_id)["payment"]["status"] == "payment_failed"


def test_a_failed_payment_is_watched_only_until_its_authorization_expires_at_the_confirmation_depth(
        market, monkeypatch, django_capture_on_commit_callbacks):
    """The watch is bounded: a failed payment's authorization is looked for while the chain may still mine it
    (its validBefore, by the chain's clock, and the confirmation depth's margin after it), then never again."""
    chain, capture = market.chain, django_capture_on_commit_callbacks
    invocation_id, _ = failed_on_its_own(market, monkeypatch, capture, market.pay("translate"))
    reads = []
    authorization_spent = x402_onchain._authorization_spent
    monkeypatch.setattr(x402_onchain, "_authorization_spent",
                        lambda auth: reads.append(auth) or authorization_spent(auth))
    confirm_all(capture)
    assert len(reads) == 1

    valid_before = SkillInvocation.objects.select_related("authorization").get().authorization.valid_before
    chain.increase_time(valid_before - chain.now() + x402_onchain.LATE_USE_MARGIN_SECONDS)
    confirm_all(capture)
    assert len(reads) == 1
    assert invocation_of(market, invocation_id)["payment"]["status"] == "payment_failed"


def test_a_poll_reads_at_most_its_budget_of_watched_payments(market, monkeypatch, settings,
                                                             django_capture_on_commit_callbacks):
    """Failed payments are watched while their authorization is valid, and a buyer chooses how long that is (x402's
    validBefore has no upper bound) and can fail payments at will (spending its funds after the platform's check):
    one RPC call per watched payment at every poll would let it make the relayer's polls as long as it likes. A poll
    reads at most CHAIN_WATCHED_CHECKS_PER_POLL of them, a sample taken anew at each poll."""
    chain, capture = market.chain, django_capture_on_commit_callbacks
    for _ in range(3):
        fund(chain, market.buyer.address, 10 * USDC)
        failed_on_its_own(market, monkeypatch, capture, market.pay("translate"), how="failed_its_simulation")
    reads = []
    authorization_spent = x402_onchain._authorization_spent
    monkeypatch.setattr(x402_onchain, "_authorization_spent",
                        lambda auth: reads.append(auth) or authorization_spent(auth))
    settings.CHAIN_WATCHED_CHECKS_PER_POLL = 2
    confirm_all(capture)
    assert len(reads) == 2
    confirm_all(capture)
    assert len(reads) == 4


@pytest.mark.django_db
def test_the_budget_is_shared_by_every_kind_of_watched_payment(monkeypatch, settings):
    """Failed invocation payments outnumbering the budget (a buyer failing payments at will) must not starve the
    watch of direct purchases' payments: each poll samples all that are watched, of every kind."""
    def failed(purpose: str) -> ChainTransaction:
        return ChainTransaction.objects.create(purpose=purpose, chain_id=settings.CHAIN_ID, to_address="0x" + "11" * 20,
                                               data="0x", status=TxStatus.FAILED)

    many = [failed(TxPurpose.INVOCATION_PAYMENT) for _ in range(3)]
    one = failed(TxPurpose.DIRECT_PAYMENT)
    read = []
    monkeypatch.setattr(relayer, "_failure_watches", {
        TxPurpose.INVOCATION_PAYMENT: lambda: ChainTransaction.objects.filter(pk__in=[tx.pk for tx in many]),
        TxPurpose.DIRECT_PAYMENT: lambda: ChainTransaction.objects.filter(pk=one.pk)})
    monkeypatch.setitem(relayer._evidence_readers, TxPurpose.INVOCATION_PAYMENT, lambda tx: read.append(tx.pk) or {})
    monkeypatch.setitem(relayer._evidence_readers, TxPurpose.DIRECT_PAYMENT, lambda tx: read.append(tx.pk) or {})
    settings.CHAIN_WATCHED_CHECKS_PER_POLL = 2
    for _ in range(20):
        relayer.transactions_recheck_watched()
    assert len(read) == 40
    assert one.pk in read  # sampled in 20 polls but with a chance of (1/2) ** 20


def test_a_reorg_that_takes_only_the_block_of_our_payment_that_reverted_after_the_copy_leaves_the_invocation_paid(
        market, monkeypatch, django_capture_on_commit_callbacks):
    """Someone's copy of the authorization was mined a block before our payment, which reverted; the invocation is
    paid by the copy, its run not started yet. A reorg takes only our payment's block, the copy stays on the chain
    (the treasury holds the price): the invocation is still paid by the copy, and ours, sent again, reverts again."""
    chain, capture = market.chain, django_capture_on_commit_callbacks
    payment = market.pay("render")
    broadcast, seen = relayer._broadcast, {}

    def copy_first(attempt):  # mined between the relayer's simulation of our payment and its broadcast
        if attempt.transaction.purpose == TxPurpose.INVOCATION_PAYMENT and not seen:
            seen["copy"] = mine_a_copy(chain, payment)
            seen["after_the_copy"] = chain.snapshot()
        broadcast(attempt)

    monkeypatch.setattr(relayer, "_broadcast", copy_first)
    with capture(execute=False):  # its worker's run is queued, never run here
        invocation_id = market.call("render", payment).json()["invocation_id"]
    monkeypatch.undo()
    payment_tx = ChainTransaction.objects.get(purpose=TxPurpose.INVOCATION_PAYMENT)
    assert payment_tx.status == TxStatus.FAILED and payment_tx.receipt_status == 0, payment_tx.failure_reason
    assert payment_tx.outcome_evidence["used_by"] == seen["copy"]
    held = invocation_of(market, invocation_id)["payment"]
    assert (held["status"], held["tx_hash"]) == ("held", seen["copy"])
    treasury = usdc_balance(chain, market.treasury)

    chain.reorg(seen["after_the_copy"])  # our payment's block taken, the copy's kept
    with capture(execute=True):
        assert relayer.transactions_reopen_reorged() == 1

    held = invocation_of(market, invocation_id)["payment"]
    assert (held["status"], held["tx_hash"]) == ("held", seen["copy"])
    polls_until_concluded(capture, payment_tx)  # ours, sent again, reverts again
    payment_tx.refresh_from_db()
    assert payment_tx.status == TxStatus.FAILED and payment_tx.outcome_evidence["used_by"] == seen["copy"]
    held = invocation_of(market, invocation_id)["payment"]
    assert (held["status"], held["tx_hash"]) == ("held", seen["copy"])
    assert usdc_balance(chain, market.treasury) == treasury
    assert not ChainTransaction.objects.exclude(purpose=TxPurpose.INVOCATION_PAYMENT).exists()


def test_a_watched_payment_whose_authorization_the_node_shows_spent_with_no_log_is_surfaced_until_decided(
        market, monkeypatch, settings, admin_client, django_capture_on_commit_callbacks):
    """The payment failed; a copy of its authorization is mined later (the treasury holds the price). The provider
    answers no log of it (it prunes old ranges, or a backend is behind): the token counts the authorization spent, no
    use nor cancel is found, and nothing may be guessed. That was a warning in the logs at each poll, nothing on the
    dashboard, the metrics or the admin, and once the authorization's validBefore (and the margin) passed, the watch
    dropped it: the price stayed in the treasury with nothing naming it. Now the payment is marked undecided (why,
    since when), shown as overdue on the dashboard, counted in a metric and filtered in the admin, and still watched
    past its window, until a node that has the logs decides it (the copy found: refunded) and the mark is cleared."""
    chain, capture = market.chain, django_capture_on_commit_callbacks
    header = market.pay("translate")
    invocation_id, payment = failed_on_its_own(market, monkeypatch, capture, header)
    fund(chain, market.buyer.address, 10 * USDC)
    buyer = usdc_balance(chain, market.buyer.address)
    copy = mine_a_copy(chain, header)
    chain.mine(3)
    settings.OVERDUE_SUBMITTING_AFTER = timedelta(0)
    undecided = ("marketplace_chain_transactions_undecided", (("purpose", TxPurpose.INVOCATION_PAYMENT),))
    with node_relayed(chain.node.rpc_url, settings) as relay:
        relay.rewrite(lambda call: call.get("method") == "eth_getLogs", lambda answer: {**answer, "result": []})
        confirm_all(capture)
        payment.refresh_from_db()
        assert payment.status == TxStatus.FAILED and payment.undecided_since is not None
        assert "no use nor cancel" in payment.undecided_reason
        overdue = admin_client.get("/admin/dashboard/").context["overdue"]
        assert f"{TxPurpose.INVOCATION_PAYMENT} outcome undecided" in [item.kind for item in overdue]
        assert scrape(admin_client)[undecided] == 1
        listing = admin_client.get(reverse("admin:escrow_chaintransaction_changelist") + "?undecided_since__isempty=0")
        assert listing.status_code == 200 and str(payment.pk) in listing.content.decode()
        assert invocation_of(market, invocation_id)["payment"]["status"] == "payment_failed"  # nothing guessed

        valid_before = SkillInvocation.objects.select_related("authorization").get().authorization.valid_before
        chain.increase_time(valid_before - chain.now() + x402_onchain.LATE_USE_MARGIN_SECONDS)
        chain.mine(1)
        confirm_all(capture)  # past its window: still read, still undecided
        assert ChainTransaction.objects.get(pk=payment.pk).undecided_since is not None

    confirm_all(capture)  # a node that has the logs
    refund = ChainTransaction.objects.get(purpose=TxPurpose.INVOCATION_REFUND)
    polls_until_concluded(capture, refund)
    invocation = invocation_of(market, invocation_id)
    assert (invocation["payment"]["status"], invocation["payment"]["tx_hash"]) == ("refunded", copy)
    assert usdc_balance(chain, market.buyer.address) == buyer
    payment.refresh_from_db()
    assert payment.undecided_since is None and payment.undecided_reason == ""
    assert not scrape(admin_client).get(undecided)
