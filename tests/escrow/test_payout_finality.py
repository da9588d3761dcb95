"""Under PAYOUT_HEAD_TAG money leaves the treasury only once the block of the payment it gives back or forwards is at
or below the node's tagged block (`finalized`: on Anvil 64 blocks behind the head): a skill invocation's payout (or
refund) of its payment, a direct purchase's refund of its fee. A reorg deeper than the confirmation depth can then no
longer take a payment the treasury already paid out."""

import io
import runpy
from datetime import timedelta

import pytest
from django.core.exceptions import ImproperlyConfigured
from django.core.management import call_command
from django.core.management.base import CommandError
from django.test import Client
from django.urls import reverse

import marketplace.settings

from escrow import relayer
from escrow.models import ChainTransaction, TxPurpose, TxStatus
from tests.agreements.test_direct_payments import AMOUNT, FEE, Purchase
from tests.agreements.test_invocations import FEE as INVOCATION_FEE
from tests.agreements.test_invocations import PRICE
from tests.escrow.flow import USDC, fund, mined_what_was_sent
from tests.escrow.flow import confirm_all, poll_mined, usdc_balance
from tests.escrow import test_invocation_reorgs, test_relayer_evidence
from tests.escrow.test_invocation_reorgs import SETTLED, invocation_of, polls_until_concluded, spend_all_but

pytestmark = [pytest.mark.chain, pytest.mark.django_db]

# The reorg tests' market: the treasury holds a float, and a reopened transaction is sent again at the next poll.
market = test_invocation_reorgs.market

# Anvil's `finalized` block is this many blocks behind its head.
ANVIL_FINALITY_LAG = 64


@pytest.fixture
def finalized_payouts(settings):
    settings.PAYOUT_HEAD_TAG = "finalized"


def run_paid(market, capture, outcome: str) -> tuple[str, str]:
    """A sync invocation paid (confirmed at CHAIN_CONFIRMATIONS) and run, its seller answering as `outcome` says.
    Returns its id and the purpose of its payout (or refund)."""
    upstream, purpose, _ = SETTLED[outcome]
    market.upstream.responses.append(upstream)
    payment = market.pay("translate")
    with capture(execute=True):
        response = market.call("translate", payment)
    invocation_id = response.json().get("invocation_id") or response.json()["error"]["details"]["invocation_id"]
    return invocation_id, purpose


@pytest.mark.parametrize("outcome", ["completed", "failed"])
def test_a_payout_waits_for_its_payments_finality_then_is_sent(
        market, finalized_payouts, outcome, admin_client, settings, django_capture_on_commit_callbacks):
    """The buyer waits only for the payment's confirmation depth: the skill runs at once. Its payout (refund) is
    queued at once too, but not signed or broadcast while the payment's block is newer than the node's finalized
    block; the admin and the metrics say it waits for that. Once the tag passes the block, the relayer's poll sends
    it, and it is confirmed."""
    chain, capture = market.chain, django_capture_on_commit_callbacks
    buyer, seller, treasury = market.balances()
    invocation_id, purpose = run_paid(market, capture, outcome)
    payment = ChainTransaction.objects.get(purpose=TxPurpose.INVOCATION_PAYMENT)
    assert invocation_of(market, invocation_id)["status"] == outcome

    confirm_all(capture)
    settlement = ChainTransaction.objects.get(purpose=purpose)
    assert (settlement.status, settlement.attempts.count()) == (TxStatus.QUEUED, 0), \
        "the payout was sent before its payment was final"
    assert settlement.held_until_block == payment.mined_block_number
    held = invocation_of(market, invocation_id)["payment"]
    assert held["status"] == {"completed": "paying_out", "failed": "refunding"}[outcome]
    assert held["waiting_for_finality"] == {"block_number": payment.mined_block_number, "tag": "finalized"}
    page = admin_client.get(f"/admin/escrow/chaintransaction/{settlement.pk}/change/").content.decode()
    assert f"waiting for block {payment.mined_block_number} to be finalized" in page
    metrics = admin_client.get("/metrics").content.decode()
    assert f'marketplace_chain_transactions_waiting_for_finality{{purpose="{purpose}"}} 1.0' in metrics
    dashboard = admin_client.get("/admin/dashboard/").content.decode()
    assert "Payouts and refunds waiting for their payment&#x27;s finality" in dashboard
    report = io.StringIO()
    call_command("reconcile", stdout=report)  # waiting is no mismatch; it is reported
    assert (f"Payouts: 1 held for their payment's finality, the oldest waiting for block {payment.mined_block_number}; "
            f"the node's finalized block is ") in report.getvalue()
    settings.CHAIN_SWEEP_AFTER = timedelta(0)
    assert relayer.transactions_sweep_queued() == 0  # waiting is not stuck: nothing to send again

    chain.mine(ANVIL_FINALITY_LAG - 2)  # the finalized block is still below the payment's
    confirm_all(capture)
    assert ChainTransaction.objects.get(pk=settlement.pk).status == TxStatus.QUEUED

    chain.mine(2)
    confirm_all(capture)  # released and sent
    confirm_all(capture)  # confirmed
    settlement.refresh_from_db()
    assert settlement.status == TxStatus.CONFIRMED and settlement.held_until_block is None
    invocation = invocation_of(market, invocation_id)
    assert invocation["payment"]["status"] == SETTLED[outcome][2]
    assert invocation["payment"]["settlement_tx_hash"] == settlement.mined_tx_hash
    assert invocation["payment"]["waiting_for_finality"] is None
    if outcome == "completed":
        assert market.balances() == (buyer - PRICE, seller + PRICE - INVOCATION_FEE, treasury + INVOCATION_FEE)
    else:
        assert market.balances() == (buyer, seller, treasury)
    call_command("reconcile", stdout=io.StringIO())


@pytest.mark.parametrize("outcome", ["completed", "failed"])
def test_a_payment_a_deep_reorg_takes_before_its_finality_is_never_paid_out(
        market, finalized_payouts, outcome, django_capture_on_commit_callbacks):
    """The payment is confirmed at the depth, the seller runs, and a reorg deeper than the depth takes the payment
    before it is final; on the new branch the buyer spends its USDC and the payment cannot run again. The payout
    (refund) was waiting for the payment's finality: it is withdrawn without ever being signed, and the treasury
    pays nothing out for money it never received (before: the payout was sent at once, and the treasury bore it)."""
    chain, capture = market.chain, django_capture_on_commit_callbacks
    seller, treasury = usdc_balance(chain, market.seller.wallet_address), usdc_balance(chain, market.treasury)
    before_fork = chain.snapshot()
    invocation_id, purpose = run_paid(market, capture, outcome)
    confirm_all(capture)
    payment, settlement = (ChainTransaction.objects.get(purpose=TxPurpose.INVOCATION_PAYMENT),
                           ChainTransaction.objects.get(purpose=purpose))

    chain.reorg(before_fork)  # another branch wins, deeper than CHAIN_CONFIRMATIONS (1)
    spend_all_but(chain, market.buyer.address, keep=0)
    chain.mine(ANVIL_FINALITY_LAG + 3)  # the finalized block passes where the payment was
    polls_until_concluded(capture, payment, settlement)

    payment.refresh_from_db()
    settlement.refresh_from_db()
    assert payment.status == TxStatus.FAILED
    assert settlement.status == TxStatus.FAILED and settlement.attempts.count() == 0, \
        "the payout was sent on a payment the chain no longer has"
    assert usdc_balance(chain, market.treasury) == treasury
    assert usdc_balance(chain, market.seller.wallet_address) == seller
    invocation = invocation_of(market, invocation_id)
    assert invocation["status"] == outcome and invocation["payment"]["status"] == "payment_reverted"
    assert invocation["payment"]["settlement_tx_hash"] in ("", None)
    assert len(market.upstream.requests) == 1


def test_a_payment_a_deep_reorg_takes_and_mines_again_holds_its_payout_until_the_new_block_is_final(
        market, finalized_payouts, django_capture_on_commit_callbacks):
    """The reorg takes the payment before it is final, and the relayer gets it mined again on the new branch (the
    buyer still holds the funds), in another block: the payout waits for that block's finality, not the old one's,
    and is paid once."""
    chain, capture = market.chain, django_capture_on_commit_callbacks
    buyer, seller, treasury = market.balances()
    before_fork = chain.snapshot()
    invocation_id, purpose = run_paid(market, capture, "completed")
    confirm_all(capture)
    payment, payout = (ChainTransaction.objects.get(purpose=TxPurpose.INVOCATION_PAYMENT),
                       ChainTransaction.objects.get(purpose=purpose))
    old_block = payment.mined_block_number

    chain.reorg(before_fork)
    chain.mine(5)  # the new branch is longer; the payment is sent again and mined above the old block
    polls_until_concluded(capture, payment)
    payment.refresh_from_db()
    assert payment.status == TxStatus.CONFIRMED and payment.mined_block_number > old_block
    chain.mine(ANVIL_FINALITY_LAG - (payment.mined_block_number - old_block))  # the old block final, not the new
    confirm_all(capture)
    confirm_all(capture)
    payout.refresh_from_db()
    assert (payout.status, payout.attempts.count()) == (TxStatus.QUEUED, 0)
    assert payout.held_until_block == payment.mined_block_number

    chain.mine(payment.mined_block_number - old_block)
    confirm_all(capture)
    confirm_all(capture)
    assert ChainTransaction.objects.get(pk=payout.pk).status == TxStatus.CONFIRMED
    assert invocation_of(market, invocation_id)["payment"]["status"] == "paid_out"
    assert market.balances() == (buyer - PRICE, seller + PRICE - INVOCATION_FEE, treasury + INVOCATION_FEE)
    call_command("reconcile", stdout=io.StringIO())


def test_a_payout_released_whose_task_is_lost_is_sent_by_the_sweeper(
        market, finalized_payouts, settings, django_capture_on_commit_callbacks):
    """The poll clears the hold and enqueues the submit after commit; a worker that dies before sending it loses no
    payout: released, it is an ordinary queued transaction, which the sweeper sends again."""
    chain, capture = market.chain, django_capture_on_commit_callbacks
    invocation_id, purpose = run_paid(market, capture, "completed")
    confirm_all(capture)
    settlement = ChainTransaction.objects.get(purpose=purpose)
    chain.mine(ANVIL_FINALITY_LAG)
    with capture(execute=False):  # released, its task message lost
        poll_mined()
    settlement.refresh_from_db()
    assert (settlement.status, settlement.held_until_block) == (TxStatus.QUEUED, None)

    settings.CHAIN_SWEEP_AFTER = timedelta(0)
    with capture(execute=True):
        assert relayer.transactions_sweep_queued() == 1
    confirm_all(capture)
    assert ChainTransaction.objects.get(pk=settlement.pk).status == TxStatus.CONFIRMED
    assert invocation_of(market, invocation_id)["payment"]["status"] == "paid_out"


@pytest.mark.parametrize(("environment", "tag"), [
    ({}, ""),  # the dev chain (31337): sent at once, as before
    ({"CHAIN_ID": "8453"}, "finalized"),  # Base
    ({"CHAIN_ID": "84532"}, "finalized"),  # Base Sepolia
    ({"CHAIN_ID": "8453", "PAYOUT_HEAD_TAG": "safe"}, "safe"),
    ({"CHAIN_ID": "8453", "PAYOUT_HEAD_TAG": ""}, ""),
    ({"PAYOUT_HEAD_TAG": "finalized"}, "finalized"),
])
def test_payouts_wait_for_finality_by_default_off_the_dev_chain(monkeypatch, environment, tag):
    for name in ("CHAIN_ID", "PAYOUT_HEAD_TAG"):
        monkeypatch.delenv(name, raising=False)
    for name, value in environment.items():
        monkeypatch.setenv(name, value)
    assert runpy.run_path(marketplace.settings.__file__)["PAYOUT_HEAD_TAG"] == tag


def test_a_payout_head_tag_the_node_does_not_know_is_refused_at_start(monkeypatch):
    monkeypatch.setenv("PAYOUT_HEAD_TAG", "latest")
    with pytest.raises(ImproperlyConfigured, match="PAYOUT_HEAD_TAG"):
        runpy.run_path(marketplace.settings.__file__)


# --- a direct purchase's fee refund -----------------------------------------------------------------------------------

def fee_collected_then_payment_refused(purchase, capture) -> tuple[dict, ChainTransaction, str]:
    """A direct purchase whose fee was collected and whose payment then failed for good (the buyer cancelled its
    authorization once the fee was collected: the payment fails its simulation): its fee's refund is due. Returns
    the agreement, the fee's collection and a snapshot taken before the fee was sent."""
    fund(purchase.chain, purchase.treasury, USDC)  # the treasury's float for refunds
    body = purchase.body()
    agreement = purchase.propose(body)
    purchase.accept(agreement["id"], capture)
    with capture(execute=False) as fee_submission:
        poll_mined()  # the fee permit confirmed; the fee's transfer queued, not sent yet
    before_fee = purchase.chain.snapshot()
    with capture(execute=True):
        for callback in fee_submission:
            callback()
    purchase.cancel_authorization(body)
    confirm_all(capture)  # the fee confirmed; the payment fails in its simulation; the refund is queued
    mined_what_was_sent()
    return agreement, ChainTransaction.objects.get(purpose=TxPurpose.DIRECT_FEE), before_fee


def test_a_direct_purchases_fee_refund_waits_for_the_fees_finality_then_is_sent(
        escrow_chain, finalized_payouts, django_capture_on_commit_callbacks):
    """The fee's refund leaves the treasury only once the block of the fee's collection is final (before: signed and
    sent at once, so a deep reorg taking the collection cost the platform the fee)."""
    chain, capture = escrow_chain, django_capture_on_commit_callbacks
    purchase = Purchase(chain)
    agreement, fee, _ = fee_collected_then_payment_refused(purchase, capture)
    refund = ChainTransaction.objects.get(purpose=TxPurpose.DIRECT_FEE_REFUND)
    assert (refund.status, refund.attempts.count()) == (TxStatus.QUEUED, 0), \
        "the fee's refund was sent before its collection was final"
    assert refund.held_until_block == fee.mined_block_number
    failed = purchase.parties.agreement(agreement["id"])
    assert failed["status"] == "payment_failed"
    assert failed["buyer_refund_waiting_for_finality"] == {"block_number": fee.mined_block_number, "tag": "finalized"}
    listed = purchase.parties.buyer_api.get("/usage-agreements").json()["results"]
    assert [row["buyer_refund_waiting_for_finality"] for row in listed] == [failed["buyer_refund_waiting_for_finality"]]
    buyer, seller, fee_recipient, treasury = purchase.balances()

    chain.mine(ANVIL_FINALITY_LAG)
    confirm_all(capture)  # released and sent
    confirm_all(capture)  # confirmed
    refund.refresh_from_db()
    assert refund.status == TxStatus.CONFIRMED
    refunded = purchase.parties.agreement(agreement["id"])
    assert (refunded["buyer_refund_atomic"], refunded["buyer_refund_waiting_for_finality"]) == (FEE, None)
    assert purchase.balances() == (buyer + FEE, seller, fee_recipient, treasury - FEE)
    call_command("reconcile", stdout=io.StringIO())


def test_a_fee_refund_waiting_when_a_reorg_takes_the_fees_collection_is_withdrawn_unsigned_and_the_purchase_pays(
        escrow_chain, finalized_payouts, settings, django_capture_on_commit_callbacks):
    """A reorg takes the fee's block while its refund waits; on the new branch the buyer never cancelled, the fee's
    same bytes collect it again and the payment pays the seller. The refund, never signed, is withdrawn: no nonce to
    cancel, nothing for anyone to get mined in its place (before: it was signed at once, and only a nonce fill, which
    its old bytes could outrun, kept the platform from refunding a fee it kept)."""
    chain, capture = escrow_chain, django_capture_on_commit_callbacks
    settings.CHAIN_REBROADCAST_AFTER = timedelta(0)
    purchase = Purchase(chain)
    agreement, _, before_fee = fee_collected_then_payment_refused(purchase, capture)
    refund = ChainTransaction.objects.get(purpose=TxPurpose.DIRECT_FEE_REFUND)

    chain.reorg(before_fee)
    chain.mine(3)
    buyer, seller, fee_recipient, treasury = purchase.balances()
    for _ in range(6):
        confirm_all(capture)

    paid = purchase.parties.agreement(agreement["id"])
    assert (paid["status"], paid["buyer_refund_atomic"]) == ("paid", None)
    refund.refresh_from_db()
    assert (refund.status, refund.nonce, refund.attempts.count()) == (TxStatus.FAILED, None, 0)
    assert not ChainTransaction.objects.filter(purpose=TxPurpose.NONCE_FILL).exists()
    assert purchase.balances() == (buyer - AMOUNT - FEE, seller + AMOUNT, fee_recipient + FEE, treasury)
    call_command("reconcile", stdout=io.StringIO())


# --- a node whose tag cannot be trusted -------------------------------------------------------------------------------

# The marketplace talks to Anvil through a relay the test controls.
rpc_relay = test_relayer_evidence.rpc_relay


def asks_for_tag(call) -> bool:
    return call.get("method") == "eth_getBlockByNumber" and call["params"][0] in ("finalized", "safe")


def tag_answered_as(relay, how: str):
    """What a node that cannot be trusted answers for its `finalized` block: an error (a provider or a chain that
    does not serve the tag), nothing, or a block beyond its own head (a provider switched to another network)."""
    def answer(node_answer: dict) -> dict:
        if how == "refused":
            return {"jsonrpc": "2.0", "id": node_answer["id"],
                    "error": {"code": -32602, "message": "invalid block tag finalized"}}
        if how == "null":
            return {**node_answer, "result": None}
        head = int(relay.node("eth_blockNumber"), 16)
        return {**node_answer, "result": {**node_answer["result"], "number": hex(head + 1000)}}
    return answer


def waiting_for_finality(market, invocation_id: str):
    return invocation_of(market, invocation_id)["payment"]["waiting_for_finality"]


@pytest.mark.parametrize("how", ["refused", "null", "ahead_of_the_head"])
def test_a_node_whose_tag_cannot_be_trusted_holds_every_payout_and_says_so_until_it_answers(
        market, finalized_payouts, rpc_relay, how, admin_client, django_capture_on_commit_callbacks):
    """The node refuses the `finalized` tag, answers nothing for it, or names a block beyond its own head: no payout
    is ever sent on it, and that is not silent. The payout is held naming the payment's block (the API shows it to
    the seller and the buyer), /readyz is not ready (`payout_finality`), the dashboard lists payouts that cannot be
    released with the node's error, and reconcile fails saying so. Once the node answers a tag that passes the
    payment's block, the payout is sent."""
    chain, capture = market.chain, django_capture_on_commit_callbacks
    rpc_relay.rewrite(asks_for_tag, tag_answered_as(rpc_relay, how))
    invocation_id, purpose = run_paid(market, capture, "completed")
    confirm_all(capture)
    chain.mine(ANVIL_FINALITY_LAG + 2)  # the payment's block is final: the node does not say so
    confirm_all(capture)
    confirm_all(capture)
    payment, payout = (ChainTransaction.objects.get(purpose=TxPurpose.INVOCATION_PAYMENT),
                       ChainTransaction.objects.get(purpose=purpose))
    assert (payout.status, payout.attempts.count()) == (TxStatus.QUEUED, 0), "the payout was sent on the node's word"
    assert payout.held_until_block == payment.mined_block_number
    assert waiting_for_finality(market, invocation_id) == {"block_number": payment.mined_block_number,
                                                           "tag": "finalized"}

    readiness = Client().get("/readyz")
    assert readiness.status_code == 503
    assert readiness.json()["error"]["details"]["checks"]["payout_finality"] == "failed"
    dashboard = admin_client.get("/admin/dashboard/").content.decode()
    assert "Payouts and refunds cannot be released" in dashboard
    assert "finalized" in dashboard
    assert "marketplace_payouts_releasable 0.0" in admin_client.get("/metrics").content.decode()
    report = io.StringIO()
    with pytest.raises(CommandError):
        call_command("reconcile", stdout=report)
    assert "1 payout(s) or refund(s) cannot be released: the node's finalized block" in report.getvalue()

    rpc_relay.rewrite_none()
    confirm_all(capture)  # released and sent
    confirm_all(capture)  # confirmed
    assert ChainTransaction.objects.get(pk=payout.pk).status == TxStatus.CONFIRMED
    assert waiting_for_finality(market, invocation_id) is None
    assert Client().get("/readyz").json()["checks"]["payout_finality"] == "ok"
    assert "marketplace_payouts_releasable 1.0" in admin_client.get("/metrics").content.decode()
    call_command("reconcile", stdout=io.StringIO())


def test_a_payout_released_is_held_again_when_the_tag_at_signing_is_below_its_payments_block(
        market, finalized_payouts, rpc_relay, django_capture_on_commit_callbacks):
    """The poll releases the payout against the node's finalized block; by the time its task signs, the node (another
    provider behind the same URL, a node resynced) answers an older finalized block, below the payment's: the submit
    asks the tag again and holds the payout, unsigned, until the tag passes the payment's block once more."""
    chain, capture = market.chain, django_capture_on_commit_callbacks
    invocation_id, purpose = run_paid(market, capture, "completed")
    confirm_all(capture)
    payment, payout = (ChainTransaction.objects.get(purpose=TxPurpose.INVOCATION_PAYMENT),
                       ChainTransaction.objects.get(purpose=purpose))
    chain.mine(ANVIL_FINALITY_LAG)
    with capture(execute=False) as released:
        poll_mined()
    assert ChainTransaction.objects.get(pk=payout.pk).held_until_block is None

    older = rpc_relay.node("eth_getBlockByNumber", [hex(payment.mined_block_number - 1), False])
    rpc_relay.rewrite(asks_for_tag, lambda node_answer: {**node_answer, "result": older})
    with capture(execute=True):
        for callback in released:
            callback()
    payout.refresh_from_db()
    assert (payout.status, payout.attempts.count()) == (TxStatus.QUEUED, 0), "signed against a tag that went back"
    assert payout.held_until_block == payment.mined_block_number

    rpc_relay.rewrite_none()
    confirm_all(capture)
    confirm_all(capture)
    assert ChainTransaction.objects.get(pk=payout.pk).status == TxStatus.CONFIRMED
    assert invocation_of(market, invocation_id)["payment"]["status"] == "paid_out"


def test_a_payout_held_longer_than_finality_takes_is_overdue_on_the_dashboard(
        market, finalized_payouts, settings, admin_client, django_capture_on_commit_callbacks):
    """A node whose finalized block stalls (its L1 connection lost) answers the tag, always the same: payouts wait
    on. Waiting is not overdue on Base for about 15 minutes; past PAYOUT_HELD_OVERDUE_AFTER it is (before: a held
    payout was never listed as overdue, however long it waited)."""
    capture = django_capture_on_commit_callbacks
    run_paid(market, capture, "completed")
    confirm_all(capture)
    payment = ChainTransaction.objects.get(purpose=TxPurpose.INVOCATION_PAYMENT)
    settings.PAYOUT_HELD_OVERDUE_AFTER = timedelta(0)
    dashboard = admin_client.get("/admin/dashboard/").content.decode()
    assert f"waiting for block {payment.mined_block_number} to be finalized" in dashboard
    assert "invocation_payout held for its payment&#x27;s finality" in dashboard


def test_a_reorg_between_the_submits_reads_of_the_node_never_sends_the_payout(
        market, finalized_payouts, rpc_relay, django_capture_on_commit_callbacks):
    """The submit reads the node twice: the payment's block hash, and the tagged block. A reorg that takes the
    payment between the two (the node slow to answer while the other branch wins and finalizes) must not leave a
    'canonical' read from before it and a 'final' read from after it: the tag is read first, so a block final by it
    that still holds the payment is final for good (before: the hash was read first, and the payout was sent on a
    payment the chain no longer had, from the treasury's own funds)."""
    chain, capture = market.chain, django_capture_on_commit_callbacks
    seller, treasury = usdc_balance(chain, market.seller.wallet_address), usdc_balance(chain, market.treasury)
    before_fork = chain.snapshot()
    run_paid(market, capture, "completed")
    confirm_all(capture)
    payout = ChainTransaction.objects.get(purpose=TxPurpose.INVOCATION_PAYOUT)
    chain.mine(ANVIL_FINALITY_LAG)
    with capture(execute=False) as released:
        poll_mined()

    def other_branch_wins_and_finalizes():
        chain.reorg(before_fork)
        spend_all_but(chain, market.buyer.address, keep=0)
        chain.mine(ANVIL_FINALITY_LAG + 10)

    rpc_relay.before_once(asks_for_tag, other_branch_wins_and_finalizes)
    with capture(execute=True):
        for callback in released:
            callback()
    payout.refresh_from_db()
    assert (payout.status, payout.attempts.count()) == (TxStatus.QUEUED, 0), "paid out on a payment the chain lost"
    mined_what_was_sent()
    assert usdc_balance(chain, market.treasury) == treasury
    assert usdc_balance(chain, market.seller.wallet_address) == seller


def test_a_failed_payout_the_operator_retries_waits_for_the_tag_as_the_first_did(
        market, finalized_payouts, rpc_relay, admin_client, django_capture_on_commit_callbacks):
    """The payout, released once its payment was final, fails (the treasury's float was spent); the operator tops the
    treasury up and retries it from the admin. The retry is a new transaction: it passes the same gate, so while the
    node does not answer its tag it is held too, never sent on the operator's word alone."""
    chain, capture = market.chain, django_capture_on_commit_callbacks
    invocation_id, purpose = run_paid(market, capture, "completed")
    confirm_all(capture)
    payment, payout = (ChainTransaction.objects.get(purpose=TxPurpose.INVOCATION_PAYMENT),
                       ChainTransaction.objects.get(purpose=purpose))
    float_ = spend_all_but(chain, market.treasury, keep=0)
    chain.mine(ANVIL_FINALITY_LAG)
    confirm_all(capture)  # released; its simulation reverts
    confirm_all(capture)
    payout.refresh_from_db()
    assert payout.status == TxStatus.FAILED
    assert invocation_of(market, invocation_id)["payment"]["status"] == "paying_out"

    fund(chain, market.treasury, float_)
    rpc_relay.rewrite(asks_for_tag, tag_answered_as(rpc_relay, "refused"))
    with capture(execute=True):
        response = admin_client.post(reverse("admin:escrow_chaintransaction_changelist"),
                                     {"action": "retry_failed", "_selected_action": [str(payout.pk)]}, follow=True)
    assert "Queued 1 transaction(s) again." in response.content.decode()
    retry = ChainTransaction.objects.get(purpose=purpose, status=TxStatus.QUEUED)
    assert (retry.attempts.count(), retry.held_until_block) == (0, payment.mined_block_number)

    rpc_relay.rewrite_none()
    polls_until_concluded(capture, retry)  # the treasury's own sends above took nonces the relayer had counted on
    assert ChainTransaction.objects.get(pk=retry.pk).status == TxStatus.CONFIRMED
    assert invocation_of(market, invocation_id)["payment"]["status"] == "paid_out"


def test_a_payment_a_stale_backend_still_holds_is_not_taken_final_on_a_fresh_backends_tag(
        market, finalized_payouts, rpc_relay, django_capture_on_commit_callbacks):
    """A load-balanced provider: one backend stuck on a branch the chain dropped still holds the payment (its block
    at that height, its receipt); the others, on the chain, which finalized another block there (the buyer spent its
    USDC on it: the payment cannot run again), answer the tag. The tag from one, the block at the payment's height
    from the other: the payout was released on a payment the finalized chain does not hold, and the treasury paid the
    seller money it never received. The payment's block must be the one the tagged block descends from (read by
    hash from the tagged block down, as every backend that has a block answers it): else the payout stays held."""
    from escrow.tasks import poll_confirmations
    from tests.escrow.test_relayer_faults import stale_backend_answers

    chain, capture = market.chain, django_capture_on_commit_callbacks
    seller, treasury = usdc_balance(chain, market.seller.wallet_address), usdc_balance(chain, market.treasury)
    before_fork = chain.snapshot()
    run_paid(market, capture, "completed")
    confirm_all(capture)
    payment, payout = (ChainTransaction.objects.get(purpose=TxPurpose.INVOCATION_PAYMENT),
                       ChainTransaction.objects.get(purpose=TxPurpose.INVOCATION_PAYOUT))
    assert payment.status == TxStatus.CONFIRMED and payout.status == TxStatus.QUEUED
    receipt = rpc_relay.node("eth_getTransactionReceipt", [payment.mined_tx_hash])
    block = rpc_relay.node("eth_getBlockByNumber", [hex(payment.mined_block_number), False])

    chain.reorg(before_fork)  # another branch wins, deeper than CHAIN_CONFIRMATIONS (1), and is finalized
    spend_all_but(chain, market.buyer.address, keep=0)
    chain.mine(ANVIL_FINALITY_LAG + 3)
    stale_backend_answers(rpc_relay, payment.mined_tx_hash, receipt, block)
    for _ in range(3):
        with capture(execute=True):
            mined_what_was_sent()
            poll_confirmations()
    payout.refresh_from_db()
    assert payout.attempts.count() == 0, "paid out on a payment only a stale backend holds"
    mined_what_was_sent()
    assert usdc_balance(chain, market.treasury) == treasury
    assert usdc_balance(chain, market.seller.wallet_address) == seller

    rpc_relay.rewrite_none()  # every backend on the chain: the payment is gone, the payout withdrawn unsigned
    polls_until_concluded(capture, payment, payout)
    payout.refresh_from_db()
    assert payout.status == TxStatus.FAILED and payout.attempts.count() == 0
    assert usdc_balance(chain, market.treasury) == treasury


def test_payouts_released_from_one_tag_read_each_block_below_it_once(
        market, finalized_payouts, rpc_relay, django_capture_on_commit_callbacks):
    """Each held payout's payment block is read from the tagged block down by hash, at release and again at signing.
    A block by its hash names its parent for ever: read again for each payout and each check, a relayer back from an
    hour away, its tag ~1,800 blocks above a hundred payments, asked the node 360,000 blocks in one poll."""
    capture = django_capture_on_commit_callbacks
    for _ in range(2):
        run_paid(market, capture, "completed")
    confirm_all(capture)
    held = ChainTransaction.objects.filter(purpose=TxPurpose.INVOCATION_PAYOUT)
    assert [payout.status for payout in held] == [TxStatus.QUEUED, TxStatus.QUEUED]
    market.chain.mine(ANVIL_FINALITY_LAG + 20)
    asked: list[str] = []
    rpc_relay.observers.append(lambda call: asked.append(call["params"][0].lower()) if (
        call.get("method") == "eth_getBlockByHash") else None)

    confirm_all(capture)  # released and sent
    confirm_all(capture)  # confirmed

    assert [payout.status for payout in held.all()] == [TxStatus.CONFIRMED, TxStatus.CONFIRMED]
    assert len(asked) > 20 and len(asked) == len(set(asked)), \
        f"{len(asked)} blocks asked by hash, {len(set(asked))} of them different"
