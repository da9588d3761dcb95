"""A reorg deeper than the confirmation depth under a skill invocation: its payment (buyer -> treasury) or its
payout or refund (treasury -> seller or buyer) is taken off the chain after the platform counted it confirmed, and
the relayer sends the same bytes again on the new branch, where they may no longer run. The invocation must say
what the chain did, and money the treasury paid out without having received it must reach an operator."""

import io
from datetime import timedelta

import pytest
from django.core.management import call_command

from escrow import relayer
from escrow.models import ChainTransaction, TxPurpose, TxStatus
from tests.agreements.test_invocations import Market
from tests.escrow.flow import USDC, confirm_all, fund, usdc_balance
from tests.escrow.test_indexer import mined

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

    chain.revert(before_fork)
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
        retry = relayer.transaction_retry(tx=settlement)
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

    chain.revert(before_fork)
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
