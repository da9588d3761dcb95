"""The relayer against the faults DESIGN section 6 names, on a real Anvil node and PostgreSQL."""

import io
import logging
from datetime import timedelta

import pytest
from django.core.exceptions import ImproperlyConfigured
from django.core.management import call_command
from django.core.management.base import CommandError
from django.db import transaction
from django.test import Client
from django.urls import reverse
from django.utils import timezone
from web3.exceptions import Web3RPCError

from agreements.models import UsageAgreement
from escrow import chain as gateway
from escrow import indexer, relayer
from escrow.models import (ChainEvent, ChainTransaction, EventEffect, RelayerAccount, RelayRevert, TxAttempt, TxPurpose,
                           TxStatus)
from escrow.tasks import poll_confirmations, submit_transaction
from marketplace.sweeps import RowsFailed
from tests.marketplace.conftest import scrape
from tests.escrow.flow import USDC, Parties, confirm_all, fund, mined_what_was_sent, onchain_escrow, usdc_balance
from tests.support.operators import form_as_shown, staff_account

pytestmark = [pytest.mark.chain, pytest.mark.django_db]


@pytest.fixture
def parties(escrow_chain):
    return Parties(escrow_chain)


def queue_activation(parties, capture):
    """POST activate-escrow but keep the after-commit submission for the test to run."""
    agreement = parties.accepted_agreement()
    body = parties.signed_activation(agreement["id"])
    with capture(execute=False) as callbacks:
        response = parties.buyer_api.post(f"/usage-agreements/{agreement['id']}/activate-escrow", body)
    assert response.status_code == 202, response.content
    return agreement, ChainTransaction.objects.get(agreement_id=agreement["id"]), callbacks


def relayer_nonce_on_chain(chain) -> int:
    return chain.w3.eth.get_transaction_count(chain.accounts.deployer.address)


def test_rpc_down_while_submitting_loses_nothing_and_sends_once(parties, escrow_chain, settings,
                                                               django_capture_on_commit_callbacks):
    agreement, tx, _ = queue_activation(parties, django_capture_on_commit_callbacks)
    rpc_url = settings.CHAIN_RPC_URL
    settings.CHAIN_RPC_URL = "http://127.0.0.1:9"  # nothing listens there
    with pytest.raises(gateway.RpcUnavailable):
        relayer.transaction_submit(transaction_id=tx.pk)
    tx.refresh_from_db()
    assert (tx.status, tx.nonce, tx.attempts.count()) == (TxStatus.QUEUED, None, 0)
    assert not RelayerAccount.objects.exists()

    settings.CHAIN_RPC_URL = rpc_url
    nonce_before = relayer_nonce_on_chain(escrow_chain)
    with django_capture_on_commit_callbacks(execute=True):
        relayer.transaction_submit(transaction_id=tx.pk)
        relayer.transaction_submit(transaction_id=tx.pk)  # a redelivered task: a no-op
    confirm_all(django_capture_on_commit_callbacks)
    assert parties.agreement(agreement["id"])["status"] == "active"
    assert relayer_nonce_on_chain(escrow_chain) == nonce_before + 1
    assert TxAttempt.objects.filter(transaction=tx).count() == 1


def test_worker_killed_between_saving_and_broadcasting(parties, escrow_chain, monkeypatch, settings,
                                                       django_capture_on_commit_callbacks):
    agreement, tx, _ = queue_activation(parties, django_capture_on_commit_callbacks)
    # The process dies right after committing the signed attempt: the broadcast never happens.
    monkeypatch.setattr(relayer, "_broadcast", lambda attempt: None)
    relayer.transaction_submit(transaction_id=tx.pk)
    monkeypatch.undo()
    tx.refresh_from_db()
    assert tx.status == TxStatus.SUBMITTED and tx.attempts.get().broadcast_at is None
    assert gateway.receipt(tx.attempts.get().tx_hash) is None

    confirm_all(django_capture_on_commit_callbacks)  # rebroadcasts the stored bytes
    confirm_all(django_capture_on_commit_callbacks)
    tx.refresh_from_db()
    assert tx.status == TxStatus.CONFIRMED
    assert tx.attempts.count() == 1  # the same signed transaction, no second one
    assert RelayerAccount.objects.get().next_nonce == relayer_nonce_on_chain(escrow_chain)
    assert parties.agreement(agreement["id"])["status"] == "active"


def test_dropped_transaction_is_rebroadcast_then_replaced_with_higher_fees(parties, escrow_chain, settings,
                                                                           django_capture_on_commit_callbacks):
    chain = escrow_chain
    agreement, tx, callbacks = queue_activation(parties, django_capture_on_commit_callbacks)
    chain.rpc("evm_setAutomine", [False])
    try:
        with django_capture_on_commit_callbacks(execute=True):
            for callback in callbacks:
                callback()
        first = TxAttempt.objects.get(transaction=tx)
        chain.rpc("anvil_dropTransaction", [first.tx_hash])  # evicted from the mempool

        settings.CHAIN_REBROADCAST_AFTER = timedelta(0)
        confirm_all(django_capture_on_commit_callbacks)
        assert TxAttempt.objects.filter(transaction=tx).count() == 1  # same bytes sent again

        chain.rpc("anvil_dropTransaction", [first.tx_hash])
        settings.CHAIN_REPLACE_AFTER = timedelta(0)
        confirm_all(django_capture_on_commit_callbacks)
        attempts = list(TxAttempt.objects.filter(transaction=tx))
        assert len(attempts) == 2 and attempts[0].nonce == attempts[1].nonce
        assert attempts[1].max_fee_per_gas >= attempts[0].max_fee_per_gas * 110 // 100
        assert attempts[1].max_priority_fee_per_gas >= attempts[0].max_priority_fee_per_gas * 110 // 100
        chain.mine()
    finally:
        chain.rpc("evm_setAutomine", [True])
    confirm_all(django_capture_on_commit_callbacks)
    tx.refresh_from_db()
    assert tx.status == TxStatus.CONFIRMED and tx.mined_tx_hash == attempts[1].tx_hash
    assert parties.agreement(agreement["id"])["status"] == "active"


def submitted_on_a_branch(parties, chain, capture):
    """An activation submitted and polled once, on a branch that a snapshot taken just before it can undo (the
    indexer has read the chain up to the snapshot, so it has a block before the fork to roll back to)."""
    agreement, tx, callbacks = queue_activation(parties, capture)
    with capture(execute=True):
        indexer.index_pass()
    before_fork = chain.snapshot()
    with capture(execute=True):
        for callback in callbacks:
            callback()
    confirm_all(capture)
    tx.refresh_from_db()
    return agreement, tx, before_fork


def test_reorg_before_confirmation_depth_is_noticed(parties, escrow_chain, settings,
                                                    django_capture_on_commit_callbacks):
    chain = escrow_chain
    settings.CHAIN_CONFIRMATIONS = 3
    agreement, tx, before_fork = submitted_on_a_branch(parties, chain, django_capture_on_commit_callbacks)
    assert tx.status == TxStatus.MINED  # depth 1 of 3
    mined_hash = tx.mined_block_hash

    # Another branch wins: the block with our transaction disappears and the chain grows past it.
    chain.reorg(before_fork)
    chain.mine(2)
    confirm_all(django_capture_on_commit_callbacks)
    tx.refresh_from_db()
    assert tx.status == TxStatus.SUBMITTED and tx.mined_block_hash == ""
    assert parties.agreement(agreement["id"])["status"] == "submitting"

    settings.CHAIN_REBROADCAST_AFTER = timedelta(0)
    confirm_all(django_capture_on_commit_callbacks)  # rebroadcast, mined again in a new block
    confirm_all(django_capture_on_commit_callbacks)
    tx.refresh_from_db()
    assert tx.status == TxStatus.MINED and tx.mined_block_hash != mined_hash
    chain.mine(2)
    confirm_all(django_capture_on_commit_callbacks)
    tx.refresh_from_db()
    assert tx.status == TxStatus.CONFIRMED
    assert parties.agreement(agreement["id"])["status"] == "active"


def test_reorg_deeper_than_the_confirmation_depth_reopens_the_confirmed_transaction(
        parties, escrow_chain, settings, django_capture_on_commit_callbacks):
    """The indexer rolls the agreement back and the relayer's confirmed row follows: the same signed bytes are mined
    again on the new branch, once, and the agreement and the transaction agree with the chain."""
    chain, capture = escrow_chain, django_capture_on_commit_callbacks
    agreement, tx, before_fork = submitted_on_a_branch(parties, chain, capture)
    assert tx.status == TxStatus.CONFIRMED and tx.outcome_applied  # depth 1 of 1
    assert parties.agreement(agreement["id"])["status"] == "active"
    with capture(execute=True):
        indexer.index_pass()
    assert ChainEvent.objects.get(name="Activated").effect == EventEffect.ALREADY
    mined_hash, mined_tx = tx.mined_block_hash, tx.mined_tx_hash
    nonce_before = relayer_nonce_on_chain(chain)

    chain.reorg(before_fork)  # another branch wins, deeper than CHAIN_CONFIRMATIONS (1)
    chain.mine(3)
    with capture(execute=True):
        assert indexer.index_pass().rolled_back >= 1
    assert parties.agreement(agreement["id"])["status"] == "submitting"
    tx.refresh_from_db()
    assert (tx.status, tx.mined_block_hash, tx.outcome_applied) == (TxStatus.SUBMITTED, "", False)

    settings.CHAIN_REBROADCAST_AFTER = timedelta(0)
    confirm_all(capture)  # the stored bytes, rebroadcast
    confirm_all(capture)
    tx.refresh_from_db()
    assert tx.status == TxStatus.CONFIRMED and tx.mined_block_hash != mined_hash
    assert tx.mined_tx_hash == mined_tx and tx.attempts.count() == 1  # the same signed transaction
    assert relayer_nonce_on_chain(chain) == nonce_before  # nonce_before counted it once; so does the new branch
    assert parties.agreement(agreement["id"])["status"] == "active"
    with capture(execute=True):
        indexer.index_pass()
    assert ChainEvent.objects.get(name="Activated", removed_at=None).effect == EventEffect.ALREADY
    call_command("reconcile", stdout=io.StringIO())


def test_relayer_poll_alone_notices_a_confirmed_transaction_reorged_out(parties, escrow_chain, settings,
                                                                        django_capture_on_commit_callbacks):
    chain, capture = escrow_chain, django_capture_on_commit_callbacks
    agreement, tx, before_fork = submitted_on_a_branch(parties, chain, capture)
    assert tx.status == TxStatus.CONFIRMED and tx.outcome_applied  # depth 1 of 1
    assert parties.agreement(agreement["id"])["status"] == "active"
    mined_hash = tx.mined_block_hash
    chain.reorg(before_fork)
    chain.mine(3)
    settings.CHAIN_REBROADCAST_AFTER = timedelta(0)
    confirm_all(capture)  # reopened and rebroadcast in one poll
    tx.refresh_from_db()
    assert tx.status in (TxStatus.SUBMITTED, TxStatus.MINED, TxStatus.CONFIRMED)
    confirm_all(capture)
    tx.refresh_from_db()
    assert tx.status == TxStatus.CONFIRMED and tx.mined_block_hash != mined_hash and tx.attempts.count() == 1
    assert onchain_escrow(chain, UsageAgreement.objects.get(pk=agreement["id"]).onchain_id).state == "active"
    with capture(execute=True):
        indexer.index_pass()
    assert parties.agreement(agreement["id"])["status"] == "active"
    call_command("reconcile", stdout=io.StringIO())


def test_sweeper_requeues_transactions_whose_task_was_lost(parties, django_capture_on_commit_callbacks):
    agreement, tx, _ = queue_activation(parties, django_capture_on_commit_callbacks)  # the task never ran
    ChainTransaction.objects.filter(pk=tx.pk).update(updated_at=tx.updated_at - timedelta(minutes=5))
    with django_capture_on_commit_callbacks(execute=True):
        assert relayer.transactions_sweep_queued() == 1
    confirm_all(django_capture_on_commit_callbacks)
    assert parties.agreement(agreement["id"])["status"] == "active"



def test_a_submission_retrying_while_the_node_is_down_is_done_retrying_before_the_sweep_sends_it_again(settings):
    """The sweep sends every transaction queued longer than CHAIN_SWEEP_AFTER, at each run; a submission that finds
    the node down retries itself, with backoff. Retries outlasting a sweep interval added a chain of them per row at
    every run: 20 retries spanning an hour, so a node down for an hour left ~120 chains per queued transaction, each
    retry holding a worker of the default queue for an RPC timeout, ahead of the poll and the settlement."""
    longest = getattr(submit_transaction, "retry_backoff_max", 600)  # Celery's default (celery.app.autoretry)
    retries = [min(submit_transaction.retry_backoff * 2 ** n, longest) for n in range(submit_transaction.max_retries)]
    assert sum(retries) < settings.CHAIN_SWEEP_AFTER.total_seconds()


def two_activations_sent(parties, capture) -> tuple[dict, ChainTransaction, dict, ChainTransaction]:
    """Two agreements' activations sent, their receipts not looked up yet (the first mined before the second is
    signed: its permit is signed on the token's next nonce)."""
    first, first_tx, first_sent = queue_activation(parties, capture)
    with capture(execute=True):
        for callback in first_sent:
            callback()
    mined_what_was_sent()
    second, second_tx, second_sent = queue_activation(parties, capture)
    with capture(execute=True):
        for callback in second_sent:
            callback()
    return first, first_tx, second, second_tx


def check_raises_for(monkeypatch, poisoned_tx: ChainTransaction) -> None:
    """The relayer's check of `poisoned_tx` raises what is not a chain error (an outcome the state machine refuses);
    the others are checked as before."""
    check = relayer.transaction_check

    def poisoned(*, transaction_id):
        if transaction_id == poisoned_tx.pk:
            raise RuntimeError("this outcome cannot be applied")
        return check(transaction_id=transaction_id)

    monkeypatch.setattr(relayer, "transaction_check", poisoned)


def test_a_transaction_whose_check_fails_does_not_stop_the_poll_for_the_others(parties, escrow_chain, monkeypatch,
                                                                             django_capture_on_commit_callbacks):
    """Rows are polled oldest first: one that raised something other than a chain error (an outcome refused by
    the state machine, an integrity error) ended every poll there, and no transaction after it was ever checked."""
    capture = django_capture_on_commit_callbacks
    first, first_tx, second, second_tx = two_activations_sent(parties, capture)
    check_raises_for(monkeypatch, first_tx)
    for _ in range(2):
        with pytest.raises(RowsFailed) as failed:  # logged with its id, and the poll's task fails at its end
            confirm_all(capture)
        assert failed.value.failed == [first_tx.pk]
    assert parties.agreement(second["id"])["status"] == "active"
    first_tx.refresh_from_db()
    assert first_tx.status == TxStatus.SUBMITTED  # still in flight, tried again at the next poll
    monkeypatch.undo()
    confirm_all(capture)
    assert parties.agreement(first["id"])["status"] == "active"


def one_confirmed_and_one_in_flight(parties, capture) -> tuple[ChainTransaction, dict, ChainTransaction]:
    """The first activation confirmed; the second sent, its receipt not looked up yet."""
    first, first_tx, first_sent = queue_activation(parties, capture)
    with capture(execute=True):
        for callback in first_sent:
            callback()
    confirm_all(capture)
    first_tx.refresh_from_db()
    assert first_tx.status == TxStatus.CONFIRMED
    second, second_tx, second_sent = queue_activation(parties, capture)
    with capture(execute=True):
        for callback in second_sent:
            callback()
    return first_tx, second, second_tx


def test_transactions_whose_checks_raise_do_not_count_as_a_node_answering_nothing(
        parties, escrow_chain, monkeypatch, django_capture_on_commit_callbacks):
    """The poll gives up when its first _POLL_GIVES_UP_AFTER (5) checks all failed, for a node that answers nothing;
    rows whose check raised something else (a bug, bad data) counted too. They are polled oldest first and stay the
    oldest, so five of them ended every poll before any other transaction was checked; and the failures were only
    logged, the task succeeding."""
    capture = django_capture_on_commit_callbacks
    monkeypatch.setattr(relayer, "_POLL_GIVES_UP_AFTER", 1)  # one such row stands for five
    first, first_tx, second, second_tx = two_activations_sent(parties, capture)
    ChainTransaction.objects.filter(pk=first_tx.pk).update(updated_at=second_tx.updated_at - timedelta(minutes=1))
    check_raises_for(monkeypatch, first_tx)
    with pytest.raises(RowsFailed) as failed:
        confirm_all(capture)
    assert failed.value.failed == [first_tx.pk] and failed.value.applied == 1
    assert parties.agreement(second["id"])["status"] == "active"


@pytest.mark.parametrize("step", ["reopening a reorged transaction", "reading a watched failure again"])
def test_a_transaction_whose_reorg_or_watch_step_raises_does_not_stop_the_poll(
        step, parties, escrow_chain, monkeypatch, django_capture_on_commit_callbacks, caplog):
    """Before checking the transactions in flight, the poll reopens those a reorg took the block of, and reads again
    the evidence of failed ones their domain watches; one of those that raised other than a chain error (a domain's
    handler refusing it, bad data) ended the whole poll there, at every beat: no transaction was checked any more."""
    capture = django_capture_on_commit_callbacks
    first_tx, second, second_tx = one_confirmed_and_one_in_flight(parties, capture)

    def raises(tx, *args, **kwargs):
        assert tx.pk == first_tx.pk
        raise RuntimeError("its domain refuses it")

    if step == "reopening a reorged transaction":
        monkeypatch.setattr(relayer, "_replaced", lambda number, block_hash: number == first_tx.mined_block_number)
        monkeypatch.setattr(relayer, "_receipt_still_in_its_block", lambda tx: False)  # the reorg took it too
        monkeypatch.setattr(relayer, "_reopen", raises)
    else:
        ChainTransaction.objects.filter(pk=first_tx.pk).update(status=TxStatus.FAILED)
        monkeypatch.setitem(relayer._failure_watches, first_tx.purpose,
                            lambda: ChainTransaction.objects.filter(pk=first_tx.pk))
        monkeypatch.setattr(relayer, "_evidence_renewed", raises)
    with pytest.raises(RowsFailed) as failed:
        confirm_all(capture)
    assert failed.value.failed == [first_tx.pk]
    assert str(first_tx.pk) in caplog.text
    assert parties.agreement(second["id"])["status"] == "active"


def test_a_transfer_whose_recipient_emptied_its_balance_after_the_estimate_is_mined_not_out_of_gas(
        escrow_chain, monkeypatch, django_capture_on_commit_callbacks):
    """A token transfer to an account holding tokens rewrites its balance; to an empty one it fills the slot, about
    17,100 gas more. The recipient may empty its balance between the relayer's estimate and the mining (a seller
    griefing its payout; the same signed bytes sent again after a reorg, on a branch where it holds nothing): the
    25% headroom on a transfer's ~35,000 gas did not cover that, and the transfer failed out of gas, the relayer
    paying for it. (A transfer from the relayer's wallet, as a payout or refund is; its purpose here has no
    outcome to apply.)"""
    chain, recipient = escrow_chain, escrow_chain.accounts.stranger
    fund(chain, chain.accounts.deployer.address, 10 * USDC)
    fund(chain, recipient.address, USDC)
    estimate = gateway.simulate

    def estimate_then_recipient_empties_its_balance(**transaction):
        gas = estimate(**transaction)
        emptied = chain.usdc.functions.transfer(chain.accounts.fee_recipient.address, usdc_balance(
            chain, recipient.address)).transact({"from": recipient.address})
        assert chain.w3.eth.wait_for_transaction_receipt(emptied)["status"] == 1
        return gas

    monkeypatch.setattr(gateway, "simulate", estimate_then_recipient_empties_its_balance)
    with django_capture_on_commit_callbacks(execute=False):
        tx = relayer.transaction_enqueue(purpose=TxPurpose.NONCE_FILL, to=chain.addresses["usdc"],
                                         data=chain.usdc.encode_abi("transfer", args=[recipient.address, 2 * USDC]))
    relayer.transaction_submit(transaction_id=tx.pk)
    confirm_all(django_capture_on_commit_callbacks)
    tx.refresh_from_db()
    assert (tx.status, tx.failure_reason) == (TxStatus.CONFIRMED, "")
    assert usdc_balance(chain, recipient.address) == 2 * USDC


def spent_by_the_buyer_once_estimated(chain, monkeypatch) -> None:
    """The next transaction the relayer estimates reverts when mined: right after the estimate the buyer moves all
    its USDC to the stranger (in a block before the relayer's), as anyone may change the chain in between."""
    estimate = gateway.simulate

    def estimate_then_buyer_spends(**transaction):
        gas = estimate(**transaction)
        monkeypatch.setattr(gateway, "simulate", estimate)
        buyer = chain.accounts.buyer.address
        spent = chain.usdc.functions.transfer(chain.accounts.stranger.address, usdc_balance(chain, buyer)).transact(
            {"from": buyer})
        assert chain.w3.eth.wait_for_transaction_receipt(spent)["status"] == 1
        return gas

    monkeypatch.setattr(gateway, "simulate", estimate_then_buyer_spends)


def relayer_transfer(chain, capture, recipient: str, amount: int) -> ChainTransaction:
    """A payout of the relayer's, as any: a token transfer from its wallet, queued and submitted."""
    with capture(execute=True):
        tx = relayer.transaction_enqueue(purpose=TxPurpose.NONCE_FILL, to=chain.addresses["usdc"],
                                         data=chain.usdc.encode_abi("transfer", args=[recipient, amount]))
    tx.refresh_from_db()
    return tx


def later_transaction(chain, capture) -> ChainTransaction:
    """Any transaction of the relayer's after the reorg (a payout, a settlement): here a transfer of nothing."""
    with capture(execute=True):
        return relayer.transaction_enqueue(purpose=TxPurpose.NONCE_FILL, to=chain.addresses["usdc"],
                                           data=chain.usdc.encode_abi("transfer", args=[
                                               chain.accounts.stranger.address, 0]))


def activation_reverted_on_its_own(parties, chain, capture, monkeypatch):
    """An activation mined and reverted (the buyer spent its funds between the estimate and the mining), on a branch
    a snapshot taken before it can undo. Returns the agreement, the failed transaction and the snapshot."""
    agreement = parties.accepted_agreement()
    body = parties.signed_activation(agreement["id"])
    before_fork = chain.snapshot()
    spent_by_the_buyer_once_estimated(chain, monkeypatch)
    parties.activate(agreement["id"], capture, body)
    failed = ChainTransaction.objects.get(agreement_id=agreement["id"])
    assert (failed.status, failed.receipt_status) == (TxStatus.FAILED, 0)
    return agreement, failed, before_fork


def test_a_transaction_that_reverted_on_its_own_is_reopened_when_a_reorg_takes_its_block(
        parties, escrow_chain, settings, monkeypatch, django_capture_on_commit_callbacks):
    """The activation was mined and reverted (the buyer spent its funds between the estimate and the mining): failed,
    its nonce used, the agreement activation_failed. A reorg deeper than the confirmation depth takes its block: on
    the new branch its nonce is unused (every later transaction of the relayer waits behind it) and its signed bytes
    may run there. It is reopened as a confirmed one is: the same bytes go out again, run on the new branch where
    the buyer holds its funds, and the agreement is active; the relayer's later transaction is mined behind it."""
    chain, capture = escrow_chain, django_capture_on_commit_callbacks
    settings.CHAIN_REBROADCAST_AFTER = timedelta(0)
    agreement, activation, before_fork = activation_reverted_on_its_own(parties, chain, capture, monkeypatch)
    assert parties.agreement(agreement["id"])["status"] == "activation_failed"

    chain.reorg(before_fork)  # another branch wins, deeper than CHAIN_CONFIRMATIONS (1): the buyer never spent
    chain.mine(3)
    later = later_transaction(chain, capture)
    for _ in range(3):
        confirm_all(capture)

    assert ChainTransaction.objects.get(pk=later.pk).status == TxStatus.CONFIRMED  # not held behind a nonce gap
    activation.refresh_from_db()
    assert (activation.status, activation.receipt_status, activation.attempts.count()) == (TxStatus.CONFIRMED, 1, 1)
    assert parties.agreement(agreement["id"])["status"] == "active"
    assert onchain_escrow(chain, UsageAgreement.objects.get(pk=agreement["id"]).onchain_id).state == "active"
    assert relayer_nonce_on_chain(chain) == RelayerAccount.objects.get().next_nonce
    with capture(execute=True):
        indexer.index_pass()
    call_command("reconcile", stdout=io.StringIO())


def failed_then_activated_again_on_a_branch(parties, chain, capture, monkeypatch):
    """An activation that reverted on its own (the buyer spent its funds between the estimate and the mining), then
    the buyer's new activation, confirmed, on a branch a snapshot taken before both can undo. Returns the agreement,
    both transactions and the snapshot."""
    agreement, failed, before_fork = activation_reverted_on_its_own(parties, chain, capture, monkeypatch)
    stranger = chain.accounts.stranger.address
    returned = chain.usdc.functions.transfer(parties.buyer_account.address, usdc_balance(chain, stranger)).transact(
        {"from": stranger})
    assert chain.w3.eth.wait_for_transaction_receipt(returned)["status"] == 1
    parties.activate(agreement["id"], capture)
    successor = ChainTransaction.objects.exclude(pk=failed.pk).get(agreement_id=agreement["id"])
    assert successor.status == TxStatus.CONFIRMED and parties.agreement(agreement["id"])["status"] == "active"
    return agreement, failed, successor, before_fork


def test_a_failed_transaction_something_took_the_place_of_is_cancelled_when_a_reorg_takes_its_block(
        parties, escrow_chain, settings, monkeypatch, django_capture_on_commit_callbacks):
    """The activation reverted on its own and the buyer activated again (a new transaction, confirmed). A reorg
    takes both blocks. The failed one must not run again in its successor's place (a payout an operator retried
    would pay twice; here a second live activation of the agreement is refused by the database): its nonce goes to a
    nonce fill that transfers nothing, and the successor is mined behind it with the same bytes."""
    chain, capture = escrow_chain, django_capture_on_commit_callbacks
    settings.CHAIN_REBROADCAST_AFTER = timedelta(0)
    agreement, failed, successor, before_fork = failed_then_activated_again_on_a_branch(parties, chain, capture,
                                                                                        monkeypatch)

    chain.reorg(before_fork)  # neither is on the new branch
    chain.mine(3)
    for _ in range(3):
        confirm_all(capture)

    fill = ChainTransaction.objects.get(purpose=TxPurpose.NONCE_FILL)
    failed.refresh_from_db()
    successor.refresh_from_db()
    assert (fill.status, fill.context, fill.mined_tx_hash) == (
        TxStatus.CONFIRMED, {relayer.CANCELS: str(failed.pk)}, fill.attempts.get().tx_hash)
    assert fill.attempts.get().nonce == failed.attempts.get().nonce
    assert (failed.status, failed.nonce, failed.mined_block_hash) == (TxStatus.FAILED, None, "")
    assert successor.status == TxStatus.CONFIRMED and successor.attempts.count() == 1
    assert parties.agreement(agreement["id"])["status"] == "active"
    assert onchain_escrow(chain, UsageAgreement.objects.get(pk=agreement["id"]).onchain_id).state == "active"
    assert relayer_nonce_on_chain(chain) == RelayerAccount.objects.get().next_nonce
    for _ in range(2):  # nothing further: the cancelled one is not reopened again
        confirm_all(capture)
    assert ChainTransaction.objects.filter(purpose=TxPurpose.NONCE_FILL).count() == 1
    call_command("reconcile", stdout=io.StringIO())  # the fill took the nonce: nothing for an operator


@pytest.mark.parametrize("acknowledged_in", ["reconcile", "admin"])
def test_the_old_bytes_of_a_cancelled_transaction_mined_first_are_named_by_its_fill_and_reported_until_acknowledged(
        parties, escrow_chain, settings, monkeypatch, caplog, acknowledged_in, admin_client, admin_user,
        django_capture_on_commit_callbacks):
    """Anyone holding the superseded activation's signed bytes gets them mined on the new branch before the relayer
    sends its fill: they run (the buyer holds its funds there). The fill finds them under its nonce, names them and
    logs an error; reconcile reports it (what they did may be done twice: a payout and its retry) until an operator
    acknowledges it. The successor, behind it, meets AgreementExists on the buyer's own intent and the agreement is
    active."""
    chain, capture = escrow_chain, django_capture_on_commit_callbacks
    settings.CHAIN_REBROADCAST_AFTER = timedelta(0)
    agreement, failed, successor, before_fork = failed_then_activated_again_on_a_branch(parties, chain, capture,
                                                                                        monkeypatch)

    chain.reorg(before_fork)
    chain.mine(3)
    assert relayer.transactions_reopen_reorged() == 2
    old_bytes = failed.attempts.get()
    chain.w3.eth.send_raw_transaction(old_bytes.raw_transaction)
    mined_what_was_sent()  # before the relayer's polls read its nonce (Anvil answers a send before it mines it)
    with caplog.at_level(logging.ERROR, logger="escrow.relayer"):
        for _ in range(4):
            confirm_all(capture)

    fill = ChainTransaction.objects.get(purpose=TxPurpose.NONCE_FILL)
    assert (fill.status, fill.mined_tx_hash, fill.receipt_status) == (TxStatus.CONFIRMED, old_bytes.tx_hash, 1)
    [logged] = [record for record in caplog.records if record.levelno == logging.ERROR]
    assert (logged.tx_id, logged.fill_id, logged.tx_hash) == (str(failed.pk), str(fill.pk), old_bytes.tx_hash)
    assert ChainTransaction.objects.get(pk=failed.pk).status == TxStatus.FAILED
    assert ChainTransaction.objects.get(pk=successor.pk).status == TxStatus.FAILED  # AgreementExists, the intent's
    assert parties.agreement(agreement["id"])["status"] == "active"
    assert relayer_nonce_on_chain(chain) == RelayerAccount.objects.get().next_nonce
    out = io.StringIO()
    with pytest.raises(CommandError, match="1 mismatch"):
        call_command("reconcile", stdout=out)
    assert f"nonce fill {fill.pk}" in out.getvalue() and str(failed.pk) in out.getvalue()
    assert old_bytes.tx_hash in out.getvalue()
    dashboard = admin_client.get("/admin/dashboard/").content.decode()
    assert "nonce fill outrun by the bytes it cancels" in dashboard and str(failed.pk) in dashboard
    with pytest.raises(CommandError, match="reason_required"):
        call_command("reconcile", "--acknowledge-nonce-fill", str(fill.pk), "--operator", staff_account(),
                     stdout=io.StringIO())
    out = io.StringIO()
    if acknowledged_in == "admin":
        changelist = reverse("admin:escrow_chaintransaction_changelist")
        selected = {"action": "acknowledge_outrun_fills", "_selected_action": [str(fill.pk), str(successor.pk)]}
        asked = admin_client.post(changelist, selected)
        assert asked.status_code == 200 and old_bytes.tx_hash in asked.content.decode()
        assert admin_client.post(changelist, {**form_as_shown(asked.content.decode(), "acknowledge-form"), "reason": "the activation ran once"}
                                 ).status_code == 302
        call_command("reconcile", stdout=out)
        operator = admin_user.username
    else:
        call_command("reconcile", "--acknowledge-nonce-fill", str(fill.pk), str(successor.pk), "--reason",
                     "the activation ran once", "--operator", staff_account(), stdout=out)
        assert "Acknowledged 1 nonce fill(s)." in out.getvalue()
        operator = "ops"
    assert "Consistent" in out.getvalue()
    assert f"acknowledged by {operator} at " in out.getvalue() and "(the activation ran once)" in out.getvalue()
    assert ChainTransaction.objects.get(pk=successor.pk).acknowledged_at is None  # not a fill: left
    assert f"nonce fill {fill.pk}" in out.getvalue()


def test_a_payout_whose_receipt_a_lagging_node_does_not_have_yet_is_not_sent_again_under_a_new_nonce(
        escrow_chain, monkeypatch, settings, django_capture_on_commit_callbacks):
    """A load-balanced provider: the backend answering the receipt lookups is a few blocks behind the one that
    answers nonces and rebroadcasts. The payout (a transfer from the relayer's wallet) was mined; the rebroadcast
    is told "nonce too low", the nonce is used at the confirmation depth, and the lagging backend has no receipt
    for any attempt: that is no proof that the nonce went to a transaction that is not ours, and sending the
    payout again under a new nonce pays it twice."""
    chain, recipient = escrow_chain, escrow_chain.accounts.stranger
    fund(chain, chain.accounts.deployer.address, 10 * USDC)
    before = usdc_balance(chain, recipient.address)
    tx = relayer_transfer(chain, django_capture_on_commit_callbacks, recipient.address, 2 * USDC)
    mined_what_was_sent()
    chain.mine()  # a block on top: the payout's is at the confirmation depth on the fresh backend
    assert usdc_balance(chain, chain.accounts.stranger.address) == before + 2 * USDC

    monkeypatch.setattr(gateway, "receipt", lambda tx_hash: None)  # the lagging backend: not mined yet
    settings.CHAIN_REBROADCAST_AFTER = timedelta(0)
    with django_capture_on_commit_callbacks(execute=True):
        relayer.transactions_poll()
    mined_what_was_sent()
    monkeypatch.undo()
    for _ in range(3):
        confirm_all(django_capture_on_commit_callbacks)
    tx.refresh_from_db()
    assert usdc_balance(chain, chain.accounts.stranger.address) == before + 2 * USDC, "the payout was sent twice"
    assert tx.status == TxStatus.CONFIRMED and tx.attempts.count() == 1


def test_a_payout_whose_nonce_another_transaction_of_the_wallet_took_is_sent_again_under_a_new_nonce(
        escrow_chain, settings, django_capture_on_commit_callbacks):
    """The relayer's wallet used elsewhere: its payout was dropped from the pool and another transaction of the
    wallet took the nonce. That transaction, read from its block, is none of the payout's attempts: the payout goes
    out again under a new nonce, once."""
    chain, recipient = escrow_chain, escrow_chain.accounts.stranger
    fund(chain, chain.accounts.deployer.address, 10 * USDC)
    before = usdc_balance(chain, recipient.address)
    chain.rpc("evm_setAutomine", [False])
    try:
        tx = relayer_transfer(chain, django_capture_on_commit_callbacks, recipient.address, 2 * USDC)
        chain.rpc("anvil_dropTransaction", [tx.attempts.get().tx_hash])
        chain.w3.eth.send_transaction({"from": chain.accounts.deployer.address, "to": chain.accounts.deployer.address,
                                       "value": 0, "nonce": tx.nonce})
        chain.mine()
        chain.mine()
    finally:
        chain.rpc("evm_setAutomine", [True])
    settings.CHAIN_REBROADCAST_AFTER = timedelta(0)
    for _ in range(3):
        confirm_all(django_capture_on_commit_callbacks)
    tx.refresh_from_db()
    assert tx.status == TxStatus.CONFIRMED and tx.attempts.count() == 2
    assert usdc_balance(chain, chain.accounts.stranger.address) == before + 2 * USDC


def test_a_node_answering_an_error_for_a_confirmed_payouts_block_is_no_reorg(
        escrow_chain, monkeypatch, django_capture_on_commit_callbacks):
    """A provider answering the block lookup with a JSON-RPC error (rate limited, an overloaded backend) said nothing
    about the block: the confirmed payout is not reopened (its domain told to move back) as if a reorg had taken its
    block, and concluded again."""
    chain, recipient = escrow_chain, escrow_chain.accounts.stranger
    tx = _a_transfer_mined(chain, recipient, django_capture_on_commit_callbacks)
    assert tx.status == TxStatus.CONFIRMED
    node = gateway.w3().eth
    get_block = node.get_block

    def rate_limited(block_identifier, *args, **kwargs):
        if block_identifier == tx.mined_block_number:
            raise Web3RPCError("{'code': -32005, 'message': 'rate limit exceeded'}")
        return get_block(block_identifier, *args, **kwargs)

    monkeypatch.setattr(node, "get_block", rate_limited)
    with django_capture_on_commit_callbacks(execute=True):
        relayer.transactions_poll()
    concluded = (tx.status, tx.confirmed_at)
    tx.refresh_from_db()
    assert (tx.status, tx.confirmed_at) == concluded, "reopened and concluded again"


def test_a_node_behind_that_has_not_a_confirmed_payouts_block_yet_is_no_reorg(
        escrow_chain, monkeypatch, django_capture_on_commit_callbacks):
    """The backend asked for the block of a confirmed payout is behind the one that confirmed it and has no block at
    that height yet: no other block took its place, so the payout is not reopened (its domain moved back)."""
    chain, recipient = escrow_chain, escrow_chain.accounts.stranger
    tx = _a_transfer_mined(chain, recipient, django_capture_on_commit_callbacks)
    assert tx.status == TxStatus.CONFIRMED
    canonical_block_hash = gateway.canonical_block_hash
    monkeypatch.setattr(gateway, "canonical_block_hash",
                        lambda number: canonical_block_hash(number) if number < tx.mined_block_number else None)
    assert relayer.transactions_reopen_reorged() == 0
    tx.refresh_from_db()
    assert tx.status == TxStatus.CONFIRMED


def test_a_node_behind_that_has_not_a_mined_payouts_block_yet_does_not_forget_it(
        escrow_chain, settings, monkeypatch, django_capture_on_commit_callbacks):
    """The same lagging backend asked for the block of a payout mined but not yet at the confirmation depth: the
    receipt is not forgotten (the payout back to submitted, as if a reorg had taken its block); it is concluded once
    the backend has the block and it is deep enough."""
    chain, recipient = escrow_chain, escrow_chain.accounts.stranger
    settings.CHAIN_CONFIRMATIONS = 3
    tx = _a_transfer_mined(chain, recipient, django_capture_on_commit_callbacks)
    assert tx.status == TxStatus.MINED  # depth 1 of 3
    mined = (tx.mined_block_number, tx.mined_block_hash)
    canonical_block_hash = gateway.canonical_block_hash
    monkeypatch.setattr(gateway, "canonical_block_hash",
                        lambda number: canonical_block_hash(number) if number < tx.mined_block_number else None)
    confirm_all(django_capture_on_commit_callbacks)
    tx.refresh_from_db()
    assert (tx.status, tx.mined_block_number, tx.mined_block_hash) == (TxStatus.MINED, *mined)
    monkeypatch.undo()
    chain.mine(2)
    confirm_all(django_capture_on_commit_callbacks)
    tx.refresh_from_db()
    assert (tx.status, tx.mined_block_hash, tx.attempts.count()) == (TxStatus.CONFIRMED, mined[1], 1)


def _a_transfer_mined(chain, recipient, capture) -> ChainTransaction:
    """2 USDC sent by the relayer to `recipient` and polled until mined (confirmed at the default depth)."""
    fund(chain, chain.accounts.deployer.address, 10 * USDC)
    tx = relayer_transfer(chain, capture, recipient.address, 2 * USDC)
    confirm_all(capture)
    tx.refresh_from_db()
    return tx


def reverted_activation(parties, chain, capture, monkeypatch, agreement_id: str):
    """The buyer's activation relayed and mined reverted: the buyer moved its USDC away between the relayer's
    simulation and the mining, then got it back for the next try. Returns the POST's response."""
    spent_by_the_buyer_once_estimated(chain, monkeypatch)
    response = parties.activate(agreement_id, capture)
    stranger = chain.accounts.stranger.address
    returned = chain.usdc.functions.transfer(parties.buyer_account.address, usdc_balance(chain, stranger)).transact(
        {"from": stranger})
    assert chain.w3.eth.wait_for_transaction_receipt(returned)["status"] == 1
    return response


def test_a_buyer_whose_relayed_activations_keep_reverting_is_refused_relaying_once_its_revert_budget_is_spent(
        parties, escrow_chain, settings, monkeypatch, admin_client, django_capture_on_commit_callbacks):
    """Each activation passes the API's checks and the relayer's simulation, then the buyer empties its wallet before
    it is mined: the revert costs the relayer's gas, and the buyer asks again. The reverts are the buyer's: after
    RELAY_REVERTS_PER_PARTY of them within RELAY_REVERT_WINDOW the relayer sends nothing more for it (429
    relay_budget_exhausted, with when to try again), and an operator sees them listed (admin) under the buyer."""
    chain, capture = escrow_chain, django_capture_on_commit_callbacks
    settings.RELAY_REVERTS_PER_PARTY = 2
    agreement = parties.accepted_agreement()
    for _ in range(2):
        assert reverted_activation(parties, chain, capture, monkeypatch, agreement["id"]).status_code == 202
        shown = parties.agreement(agreement["id"])
        assert shown["status"] == "activation_failed"
        assert shown["status_reason"] == "activation reverted: ERC20InsufficientBalance"  # the buyer is told why
    assert ChainTransaction.objects.filter(agreement_id=agreement["id"], receipt_status=0).count() == 2
    sent = relayer_nonce_on_chain(chain)

    with capture(execute=True):
        refused = parties.buyer_api.post(f"/usage-agreements/{agreement['id']}/activate-escrow",
                                         parties.signed_activation(agreement["id"]))
    assert refused.status_code == 429, refused.content
    error = refused.json()["error"]
    assert error["code"] == "relay_budget_exhausted"
    window = int(settings.RELAY_REVERT_WINDOW.total_seconds())
    assert 0 < error["details"]["retry_after_seconds"] <= window
    assert int(refused["Retry-After"]) == error["details"]["retry_after_seconds"]
    assert relayer_nonce_on_chain(chain) == sent
    assert parties.agreement(agreement["id"])["status"] == "activation_failed"

    party = f"agent:{UsageAgreement.objects.get(pk=agreement['id']).buyer_id}"
    listed = admin_client.get(reverse("admin:escrow_relayrevert_changelist") + f"?q={party}")
    assert listed.status_code == 200
    assert listed.context["cl"].result_count == 2


def test_an_activation_that_ran_out_of_the_gas_the_relayer_gave_it_is_not_charged_to_the_buyer(
        parties, escrow_chain, settings, monkeypatch, django_capture_on_commit_callbacks):
    """The relayer's gas limit fell short (an estimate too low): the activation is mined out of gas, using all of it.
    That revert is the relayer's own, not the buyer's: nothing is charged to the buyer, whose next activation is
    relayed and runs."""
    capture = django_capture_on_commit_callbacks
    settings.RELAY_REVERTS_PER_PARTY = 1
    agreement = parties.accepted_agreement()
    estimate = gateway.simulate

    def estimated_short(**transaction):
        monkeypatch.setattr(gateway, "simulate", estimate)
        return estimate(**transaction) // 2

    monkeypatch.setattr(relayer, "_SLOT_FILL_GAS", 0)
    monkeypatch.setattr(gateway, "simulate", estimated_short)
    parties.activate(agreement["id"], capture)
    failed = ChainTransaction.objects.get(agreement_id=agreement["id"])
    assert (failed.status, failed.receipt_status) == (TxStatus.FAILED, 0)
    assert parties.agreement(agreement["id"])["status"] == "activation_failed"
    assert not RelayRevert.objects.exists()

    assert parties.activate(agreement["id"], capture).status_code == 202
    assert parties.agreement(agreement["id"])["status"] == "active"


def test_a_buyer_with_its_limit_of_relayed_transactions_in_flight_is_refused_another_until_one_concludes(
        parties, escrow_chain, settings, django_capture_on_commit_callbacks):
    """Reverts are counted once mined: a buyer posting many activations at once (one per agreement) passed the revert
    budget with none recorded yet, and one transfer of its funds then made all of them revert at the relayer's gas.
    Its relayed transactions not concluded yet count: at RELAY_IN_FLIGHT_PER_PARTY the next is 429
    relay_in_flight_limit_reached, nothing queued, until one concludes."""
    capture = django_capture_on_commit_callbacks
    settings.RELAY_IN_FLIGHT_PER_PARTY = 1
    first, _, submit = queue_activation(parties, capture)
    second = parties.accepted_agreement()

    refused = parties.buyer_api.post(f"/usage-agreements/{second['id']}/activate-escrow",
                                     parties.signed_activation(second["id"]))

    assert refused.status_code == 429, refused.content
    assert refused.json()["error"]["code"] == "relay_in_flight_limit_reached"
    assert refused.json()["error"]["details"]["retry_after_seconds"] > 0
    assert not ChainTransaction.objects.filter(agreement_id=second["id"]).exists()
    with capture(execute=True):
        for callback in submit:
            callback()
    confirm_all(capture)
    assert parties.agreement(first["id"])["status"] == "active"
    assert parties.activate(second["id"], capture).status_code == 202
    assert parties.agreement(second["id"])["status"] == "active"


def test_a_payout_in_flight_when_the_relayer_key_is_replaced_is_not_signed_again_by_the_new_key(
        escrow_chain, settings, django_capture_on_commit_callbacks):
    """The operators replace RELAYER_PRIVATE_KEY (a new gas wallet and treasury, funded) while a payout signed by the
    old one waits in the pool. Its nonce is the old wallet's: a replacement signed by the new key is another wallet's
    transaction, which the old bytes do not exclude, so both ran and the payout was made twice. The old bytes are
    sent again as they are (only the old wallet's nonce can replace them), and the payout is made once."""
    chain, recipient, replacement_wallet = escrow_chain, escrow_chain.accounts.stranger, escrow_chain.accounts.spare
    fund(chain, chain.accounts.deployer.address, 10 * USDC)
    fund(chain, replacement_wallet.address, 10 * USDC)
    before = usdc_balance(chain, recipient.address)
    chain.rpc("evm_setAutomine", [False])
    try:
        tx = relayer_transfer(chain, django_capture_on_commit_callbacks, recipient.address, 2 * USDC)
        assert tx.status == TxStatus.SUBMITTED
        # The new wallet has sent as many transactions as the old one had: the old nonce is its next one too.
        chain.rpc("anvil_setNonce", [replacement_wallet.address, hex(tx.nonce)])
        settings.RELAYER_PRIVATE_KEY = replacement_wallet.key
        settings.CHAIN_REPLACE_AFTER = timedelta(0)
        with django_capture_on_commit_callbacks(execute=True):
            relayer.transactions_poll()
        chain.mine()
    finally:
        chain.rpc("evm_setAutomine", [True])
    for _ in range(2):
        confirm_all(django_capture_on_commit_callbacks)
    tx.refresh_from_db()
    assert usdc_balance(chain, chain.accounts.stranger.address) == before + 2 * USDC, "the payout was made twice"
    assert tx.status == TxStatus.CONFIRMED and tx.attempts.count() == 1


def test_a_transaction_of_a_replaced_relayer_key_is_not_cancelled_by_a_nonce_fill_the_new_key_signs(
        escrow_chain, settings, django_capture_on_commit_callbacks):
    """A fill takes a withdrawn transaction's nonce so that its old bytes cannot run; signed by a new key it is another
    wallet's transaction, excludes nothing, and the domain told "nothing ran" would send anew beside those bytes. The
    withdrawal fails loudly instead, nothing written."""
    chain, recipient = escrow_chain, escrow_chain.accounts.stranger
    fund(chain, chain.accounts.deployer.address, 10 * USDC)
    chain.rpc("evm_setAutomine", [False])
    try:
        tx = relayer_transfer(chain, django_capture_on_commit_callbacks, recipient.address, 2 * USDC)
        settings.RELAYER_PRIVATE_KEY = chain.accounts.spare.key
        with pytest.raises(ImproperlyConfigured, match="Neither RELAYER_PRIVATE_KEY nor RELAYER_RETIRED_PRIVATE_KEYS"):
            with transaction.atomic():
                relayer.transaction_withdraw(transaction_id=tx.pk, reason="test")
    finally:
        chain.rpc("evm_setAutomine", [True])
    tx.refresh_from_db()
    assert tx.status == TxStatus.SUBMITTED and tx.nonce is not None
    assert not ChainTransaction.objects.filter(purpose=TxPurpose.NONCE_FILL).exclude(pk=tx.pk).exists()


def test_a_transaction_the_base_fee_outgrew_is_replaced_at_the_fees_the_chain_asks_now(
        escrow_chain, settings, django_capture_on_commit_callbacks):
    """The base fee rose past the transaction's max fee (a spike of demand) and stays there: no block can include
    it. A replacement 13% above its own fees was still below the base fee, one more every CHAIN_REPLACE_AFTER, so a
    challenge due within the window, a payout or a refund waited for as many rounds as the spike was high. The
    replacement pays at least what the chain asks now, and is mined."""
    chain, recipient = escrow_chain, escrow_chain.accounts.stranger
    fund(chain, chain.accounts.deployer.address, 10 * USDC)
    before = usdc_balance(chain, recipient.address)
    chain.rpc("evm_setAutomine", [False])
    try:
        tx = relayer_transfer(chain, django_capture_on_commit_callbacks, recipient.address, 2 * USDC)
        first = TxAttempt.objects.get(transaction=tx)
        spiked = 10 * int(first.max_fee_per_gas)
        chain.rpc("anvil_setNextBlockBaseFeePerGas", [hex(spiked)])
        chain.mine()
        assert chain.w3.eth.get_block("latest")["baseFeePerGas"] == spiked
        assert gateway.receipt(first.tx_hash) is None  # its max fee is below the base fee: left out
        settings.CHAIN_REPLACE_AFTER = timedelta(0)
        with django_capture_on_commit_callbacks(execute=True):
            relayer.transactions_poll()
        replacement = TxAttempt.objects.filter(transaction=tx).order_by("created_at", "pk").last()
        assert replacement.pk != first.pk
        chain.mine()
    finally:
        chain.rpc("evm_setAutomine", [True])
    confirm_all(django_capture_on_commit_callbacks)
    tx.refresh_from_db()
    assert int(replacement.max_fee_per_gas) > spiked, "replaced below the base fee: still left out of every block"
    assert (tx.status, tx.mined_tx_hash) == (TxStatus.CONFIRMED, replacement.tx_hash)
    assert usdc_balance(chain, chain.accounts.stranger.address) == before + 2 * USDC


def test_a_payout_in_flight_when_the_relayer_key_is_replaced_is_replaced_by_the_old_key_kept_as_retired(
        escrow_chain, settings, django_capture_on_commit_callbacks):
    """The operators replace RELAYER_PRIVATE_KEY and keep the old one in RELAYER_RETIRED_PRIVATE_KEYS: a payout the
    old wallet signed, left out of the blocks, is replaced with higher fees signed by the old key (its nonce is that
    wallet's), and paid once; new transactions go from the new wallet."""
    chain, recipient, replacement_wallet = escrow_chain, escrow_chain.accounts.stranger, escrow_chain.accounts.spare
    fund(chain, chain.accounts.deployer.address, 10 * USDC)
    fund(chain, replacement_wallet.address, 10 * USDC)
    before = usdc_balance(chain, recipient.address)
    old_key = settings.RELAYER_PRIVATE_KEY
    chain.rpc("evm_setAutomine", [False])
    try:
        tx = relayer_transfer(chain, django_capture_on_commit_callbacks, recipient.address, 2 * USDC)
        settings.RELAYER_PRIVATE_KEY, settings.RELAYER_RETIRED_PRIVATE_KEYS = replacement_wallet.key, [old_key]
        settings.CHAIN_REPLACE_AFTER = timedelta(0)
        with django_capture_on_commit_callbacks(execute=True):
            relayer.transactions_poll()
        assert tx.attempts.count() == 2, "not replaced with higher fees"
        later = relayer_transfer(chain, django_capture_on_commit_callbacks, recipient.address, 1 * USDC)
        chain.mine()
    finally:
        chain.rpc("evm_setAutomine", [True])
    for _ in range(2):
        confirm_all(django_capture_on_commit_callbacks)
    tx.refresh_from_db()
    later.refresh_from_db()
    assert usdc_balance(chain, recipient.address) == before + 3 * USDC
    assert tx.status == TxStatus.CONFIRMED
    assert chain.w3.eth.get_transaction(tx.mined_tx_hash)["from"] == chain.accounts.deployer.address
    assert later.status == TxStatus.CONFIRMED and later.relayer.address == replacement_wallet.address



def test_a_receipt_a_node_answers_for_another_transaction_is_not_taken_for_the_payouts(
        escrow_chain, monkeypatch, settings, django_capture_on_commit_callbacks):
    """A buggy node (a caching proxy mixing its answers up) answers the payout's receipt lookup with the receipt of
    another transaction, which reverted. Taken for the payout's, the payout was concluded failed while it was
    still pending and then mined: the books said unpaid what the recipient had received (an operator's retry paid
    it twice). The receipt names the transaction it is of: another's is no answer, and the payout is concluded by
    its own."""
    chain, recipient, stranger = escrow_chain, escrow_chain.accounts.stranger, escrow_chain.accounts.stranger.address
    fund(chain, chain.accounts.deployer.address, 10 * USDC)
    before = usdc_balance(chain, recipient.address)
    reverted = chain.w3.eth.send_transaction({"from": stranger, "to": chain.addresses["usdc"], "gas": 100_000,
                                              "data": chain.usdc.encode_abi("transfer", args=[stranger, 10**30])})
    assert chain.w3.eth.wait_for_transaction_receipt(reverted)["status"] == 0
    chain.rpc("evm_setAutomine", [False])
    try:
        with django_capture_on_commit_callbacks(execute=True):
            tx = relayer.transaction_enqueue(purpose=TxPurpose.NONCE_FILL, to=chain.addresses["usdc"],
                                             data=chain.usdc.encode_abi("transfer", args=[recipient.address, 2 * USDC]))
        node = gateway.w3().eth
        monkeypatch.setattr(node, "get_transaction_receipt", lambda tx_hash: chain.w3.eth.get_transaction_receipt(
            reverted))
        with django_capture_on_commit_callbacks(execute=True):
            relayer.transactions_poll()
        monkeypatch.undo()
        tx.refresh_from_db()
        assert tx.status == TxStatus.SUBMITTED
        chain.mine()
    finally:
        chain.rpc("evm_setAutomine", [True])
    for _ in range(2):
        confirm_all(django_capture_on_commit_callbacks)
    tx.refresh_from_db()
    assert usdc_balance(chain, chain.accounts.stranger.address) == before + 2 * USDC
    assert tx.status == TxStatus.CONFIRMED and tx.attempts.count() == 1


@pytest.fixture
def rpc_relay(escrow_chain, settings):
    """The marketplace talks to Anvil through a relay the test controls (`rewrite`: the node's answers altered)."""
    from tests.support.rpc_relay import RpcRelay

    relay = RpcRelay(escrow_chain.node.rpc_url).start()
    settings.CHAIN_RPC_URL = relay.url
    settings.CHAIN_RPC_RETRY_BACKOFF = 0.01
    yield relay
    relay.stop()


def _block_asked(number: int):
    return lambda call: call.get("method") == "eth_getBlockByNumber" and call["params"][0] == hex(number)


def _hashless(answer: dict, *, missing: bool) -> dict:
    block = dict(answer["result"])
    if missing:
        del block["hash"]
    else:
        block["hash"] = None
    return {**answer, "result": block}


@pytest.mark.parametrize("hostility", ["null_hash", "missing_hash", "another_number"])
def test_a_node_answering_a_block_without_its_hash_or_of_another_height_ends_no_poll(
        escrow_chain, rpc_relay, settings, django_capture_on_commit_callbacks, hostility):
    """A node (or a proxy mixing its answers up) answers the lookup of a confirmed payout's block with a block whose
    hash is null or missing, or with the block of another height. The hash was read outside the gateway's error
    mapping: KeyError or AttributeError ended the relayer's poll before any transaction was checked; and another
    height's block, taken for the one asked, passed for a reorg and reopened the payout. Such an answer is no answer
    (UntrustedAnswer): the payout stays confirmed, and the poll goes on."""
    chain, recipient = escrow_chain, escrow_chain.accounts.stranger
    tx = _a_transfer_mined(chain, recipient, django_capture_on_commit_callbacks)
    assert tx.status == TxStatus.CONFIRMED
    chain.mine()
    if hostility == "another_number":
        other = rpc_relay.node("eth_getBlockByNumber", [hex(tx.mined_block_number + 1), False])
        rpc_relay.rewrite(_block_asked(tx.mined_block_number), lambda answer: {**answer, "result": other})
    else:
        rpc_relay.rewrite(_block_asked(tx.mined_block_number),
                          lambda answer: _hashless(answer, missing=hostility == "missing_hash"))
    with django_capture_on_commit_callbacks(execute=True):
        relayer.transactions_poll()
    concluded = (tx.status, tx.confirmed_at)
    tx.refresh_from_db()
    assert (tx.status, tx.confirmed_at) == concluded, "reopened"
    with pytest.raises(gateway.UntrustedAnswer):
        gateway.canonical_block_hash(tx.mined_block_number)


@pytest.mark.parametrize("hostility", ["beyond_the_head", "another_block_at_its_height"])
def test_a_receipt_of_a_block_the_chain_does_not_hold_does_not_conclude_the_payout(
        escrow_chain, rpc_relay, django_capture_on_commit_callbacks, hostility):
    """A node (or a proxy mixing its answers up) answers the pending payout's receipt lookup with a receipt of
    status 1 in a block beyond its head, or in a block that is not the chain's at that height (a stale branch's).
    Its depth was counted from the receipt's block number alone: the payout was concluded confirmed while it was
    not mined (its domain told it was paid). A receipt concludes only once its block is the node's canonical block
    at its height; until then the payout waits, and is concluded by its real receipt."""
    chain, recipient = escrow_chain, escrow_chain.accounts.stranger
    fund(chain, chain.accounts.deployer.address, 10 * USDC)
    before = usdc_balance(chain, recipient.address)
    head = chain.block_number()
    chain.rpc("evm_setAutomine", [False])
    try:
        tx = relayer_transfer(chain, django_capture_on_commit_callbacks, recipient.address, 2 * USDC)
        attempt = tx.attempts.get().tx_hash
        template = rpc_relay.node("eth_getTransactionReceipt",
                                  [rpc_relay.node("eth_getBlockByNumber", [hex(head), False])["transactions"][0]])
        forged = {**template, "transactionHash": attempt, "status": "0x1", "logs": [],
                  "blockNumber": hex(head + 1000) if hostility == "beyond_the_head" else template["blockNumber"],
                  "blockHash": "0x" + "11" * 32}
        rpc_relay.rewrite(lambda call: call.get("method") == "eth_getTransactionReceipt"
                          and call["params"][0] == attempt, lambda answer: {**answer, "result": forged})
        with django_capture_on_commit_callbacks(execute=True):
            relayer.transactions_poll()
        tx.refresh_from_db()
        assert tx.status == TxStatus.SUBMITTED, "concluded on a receipt of no block of the chain"
        rpc_relay.rewrite_none()
        chain.mine()
    finally:
        chain.rpc("evm_setAutomine", [True])
    for _ in range(2):
        confirm_all(django_capture_on_commit_callbacks)
    tx.refresh_from_db()
    assert tx.status == TxStatus.CONFIRMED and tx.attempts.count() == 1
    assert usdc_balance(chain, chain.accounts.stranger.address) == before + 2 * USDC


def stale_backend_answers(relay, attempt: str, receipt: dict, block: dict) -> None:
    """A backend of a load-balanced provider left on a branch the chain dropped answers `attempt`'s receipt and the
    block at its height as that branch has them; the others (the head's number, the blocks above) are the chain's."""
    relay.rewrite(lambda call: call.get("method") == "eth_getTransactionReceipt" and call["params"][0] == attempt,
                  lambda answer: {**answer, "result": receipt})
    relay.rewrite(lambda call: call.get("method") == "eth_getBlockByNumber" and call["params"][0] == block["number"],
                  lambda answer: {**answer, "result": block})


def test_a_payout_mined_on_a_branch_only_a_stale_backend_holds_is_not_confirmed_by_the_chains_head(
        escrow_chain, rpc_relay, settings, django_capture_on_commit_callbacks):
    """A load-balanced provider: one backend still on a branch the chain dropped (the payout mined there, in its head
    block), the others on the chain, which grew past it without the payout. The receipt and the block at its height
    came from the stale backend, the head's number from a fresh one: the depth counted from that number concluded the
    payout confirmed (its domain told it was paid) with no payout on the chain. The depth is counted only over blocks
    that descend from the payout's, each the parent of the next; the payout waits, and goes out again once every
    backend shows the branch gone."""
    chain, recipient = escrow_chain, escrow_chain.accounts.stranger
    settings.CHAIN_CONFIRMATIONS = 3
    fund(chain, chain.accounts.deployer.address, 10 * USDC)
    before = usdc_balance(chain, recipient.address)
    chain.rpc("evm_setAutomine", [False])
    try:
        fork = chain.snapshot()
        tx = relayer_transfer(chain, django_capture_on_commit_callbacks, recipient.address, 2 * USDC)
        attempt = tx.attempts.get().tx_hash
        chain.mine()
        receipt = rpc_relay.node("eth_getTransactionReceipt", [attempt])
        block = rpc_relay.node("eth_getBlockByNumber", [receipt["blockNumber"], False])
        chain.revert(fork)  # the chain drops that branch and grows another, without the payout
        chain.rpc("anvil_dropTransaction", [attempt])
        chain.mine(3)
        assert usdc_balance(chain, recipient.address) == before
        stale_backend_answers(rpc_relay, attempt, receipt, block)
        for _ in range(2):
            with django_capture_on_commit_callbacks(execute=True):
                poll_confirmations()
        tx.refresh_from_db()
        assert tx.status != TxStatus.CONFIRMED, "confirmed on a stale backend's branch: no payout on the chain"
        rpc_relay.rewrite_none()
    finally:
        chain.rpc("evm_setAutomine", [True])
    settings.CHAIN_REBROADCAST_AFTER = timedelta(0)
    for _ in range(4):
        confirm_all(django_capture_on_commit_callbacks)
        chain.mine()
    tx.refresh_from_db()
    assert tx.status == TxStatus.CONFIRMED and tx.attempts.count() == 1
    assert usdc_balance(chain, recipient.address) == before + 2 * USDC


def test_a_confirmed_payouts_block_a_stale_backend_answers_with_another_branchs_is_not_reopened(
        escrow_chain, rpc_relay, django_capture_on_commit_callbacks):
    """A load-balanced provider: one backend stuck on a branch the chain dropped answers the confirmed payout's height
    with that branch's block, while the others still hold the payout's block and its receipt. Taken for a reorg
    deeper than the confirmation depth, the payout was reopened (its domain told to move back what it recorded of it)
    and concluded again a poll later. A block another answers at that height reopens nothing while the node still
    answers the payout's receipt in its own block: a real reorg takes both."""
    chain, recipient = escrow_chain, escrow_chain.accounts.stranger
    fund(chain, chain.accounts.deployer.address, 10 * USDC)
    before = usdc_balance(chain, recipient.address)
    fork = chain.snapshot()
    chain.mine()
    stale = rpc_relay.node("eth_getBlockByNumber", ["latest", False])  # the dropped branch's block
    chain.revert(fork)
    tx = relayer_transfer(chain, django_capture_on_commit_callbacks, recipient.address, 2 * USDC)
    confirm_all(django_capture_on_commit_callbacks)
    tx.refresh_from_db()
    assert tx.status == TxStatus.CONFIRMED and hex(tx.mined_block_number) == stale["number"]
    rpc_relay.rewrite(lambda call: call.get("method") == "eth_getBlockByNumber" and call["params"][0] == stale["number"],
                      lambda answer: {**answer, "result": stale})
    with django_capture_on_commit_callbacks(execute=True):
        poll_confirmations()
    tx.refresh_from_db()
    assert tx.status == TxStatus.CONFIRMED, "reopened on a stale backend's block while its receipt stands"
    rpc_relay.rewrite_none()
    confirm_all(django_capture_on_commit_callbacks)
    tx.refresh_from_db()
    assert tx.status == TxStatus.CONFIRMED and tx.attempts.count() == 1
    assert usdc_balance(chain, recipient.address) == before + 2 * USDC


@pytest.mark.parametrize("hostility", ["null_block_hash", "missing_block_hash", "missing_gas_used", "missing_logs"])
def test_a_receipt_missing_its_block_hash_gas_or_logs_ends_no_poll_and_concludes_nothing(
        escrow_chain, rpc_relay, django_capture_on_commit_callbacks, hostility):
    """A node (or a proxy) answers a mined payout's receipt without its block hash (null or missing), its gas used or
    its logs. They were read past the gateway's error mapping: AttributeError or KeyError, the poll's row failing
    (RowsFailed), not a chain error, so the payout counted as read for whatever the poll concluded beside it. Such a
    receipt is no answer (UntrustedAnswer): the payout waits, and is concluded by its real receipt, once."""
    chain, recipient = escrow_chain, escrow_chain.accounts.stranger
    fund(chain, chain.accounts.deployer.address, 10 * USDC)
    before = usdc_balance(chain, recipient.address)
    tx = relayer_transfer(chain, django_capture_on_commit_callbacks, recipient.address, 2 * USDC)
    attempt = tx.attempts.get().tx_hash
    field = {"null_block_hash": "blockHash", "missing_block_hash": "blockHash", "missing_gas_used": "gasUsed",
             "missing_logs": "logs"}[hostility]

    def malformed(answer: dict) -> dict:
        receipt = dict(answer["result"])
        if hostility == "null_block_hash":
            receipt[field] = None
        else:
            del receipt[field]
        return {**answer, "result": receipt}

    rpc_relay.rewrite(lambda call: call.get("method") == "eth_getTransactionReceipt" and call["params"][0] == attempt,
                      malformed)
    mined_what_was_sent()
    with django_capture_on_commit_callbacks(execute=True):
        relayer.transactions_poll()
    tx.refresh_from_db()
    assert tx.status == TxStatus.SUBMITTED
    with pytest.raises(gateway.UntrustedAnswer):
        gateway.receipt(attempt)
    rpc_relay.rewrite_none()
    for _ in range(2):
        confirm_all(django_capture_on_commit_callbacks)
    tx.refresh_from_db()
    assert tx.status == TxStatus.CONFIRMED and tx.attempts.count() == 1
    assert usdc_balance(chain, recipient.address) == before + 2 * USDC


def test_a_relayer_pointed_at_a_node_of_another_chain_signs_and_checks_nothing(
        escrow_chain, rpc_relay, settings, django_capture_on_commit_callbacks):
    """CHAIN_RPC_URL naming a node of another chain than CHAIN_ID: the relayer simulated there (a revert on that
    chain concluded the payout failed), seeded its wallet's nonce row from that chain's nonce (a gap or a reused
    nonce on this one), signed and sent there, and its poll read that chain's blocks: every confirmed transaction's
    block "replaced", reopened. The node's chain id is checked first (asked once per client): WrongChain, loudly,
    and nothing is signed, concluded or reopened."""
    chain, recipient = escrow_chain, escrow_chain.accounts.stranger
    confirmed = _a_transfer_mined(chain, recipient, django_capture_on_commit_callbacks)
    assert confirmed.status == TxStatus.CONFIRMED
    settings.CHAIN_ID = 8453  # the node is Anvil's 31337
    asked = []
    rpc_relay.observers.append(lambda call: asked.append(call.get("method")))
    with django_capture_on_commit_callbacks(execute=False):
        queued = relayer.transaction_enqueue(purpose=TxPurpose.NONCE_FILL, to=chain.addresses["usdc"],
                                             data=chain.usdc.encode_abi("transfer", args=[recipient.address, 1]))
    with pytest.raises(gateway.WrongChain, match="chain id"):
        relayer.transaction_submit(transaction_id=queued.pk)
    with pytest.raises(gateway.WrongChain, match="chain id"):
        relayer.transactions_poll()
    queued.refresh_from_db()
    assert (queued.status, queued.nonce, queued.attempts.count()) == (TxStatus.QUEUED, None, 0)
    assert not RelayerAccount.objects.filter(chain_id=8453).exists()
    assert set(asked) <= {"eth_chainId"}


def test_a_node_switched_to_another_chain_mid_run_reopens_nothing_of_this_one(
        escrow_chain, rpc_relay, settings, django_capture_on_commit_callbacks):
    """The provider behind CHAIN_RPC_URL moves to another network mid-run (its endpoint edited to the testnet's, a DNS
    or load balancer change): the node's chain id was asked once per process, so the relayer went on reading that
    chain's blocks and receipts as this one's, and a confirmed payout whose block that chain holds another block at
    was reopened, its domain told to move back what it recorded. The chain id is believed for
    CHAIN_ID_RECHECK_SECONDS only: the poll after the switch raises WrongChain and reopens nothing."""
    chain, recipient = escrow_chain, escrow_chain.accounts.stranger
    confirmed = _a_transfer_mined(chain, recipient, django_capture_on_commit_callbacks)
    assert confirmed.status == TxStatus.CONFIRMED
    settings.CHAIN_ID_RECHECK_SECONDS = 0
    gateway.node_chain_check()  # asked while the node is of this chain
    rpc_relay.rewrite(lambda call: call.get("method") == "eth_chainId",
                      lambda answer: {**answer, "result": hex(84532)})
    rpc_relay.rewrite(_block_asked(confirmed.mined_block_number),
                      lambda answer: {**answer, "result": {**answer["result"], "hash": "0x" + "ab" * 32}})
    rpc_relay.rewrite(lambda call: call.get("method") == "eth_getTransactionReceipt",
                      lambda answer: {**answer, "result": None})
    with pytest.raises(gateway.WrongChain, match="chain id"):
        relayer.transactions_poll()
    confirmed.refresh_from_db()
    assert (confirmed.status, confirmed.mined_tx_hash) == (TxStatus.CONFIRMED, confirmed.attempts.get().tx_hash)


def test_a_node_answering_another_heights_block_in_the_nonce_scan_does_not_send_a_mined_payout_again(
        escrow_chain, rpc_relay, settings, django_capture_on_commit_callbacks):
    """A load-balanced provider: the backend answering the receipt lookup is behind (no receipt yet), the node keeps
    recent state only (it refuses nonces at older blocks), and a proxy answers the lookup of the payout's block with
    the block of another height (one without the payout). The blocks since the payout was signed were read by
    number without checking that each answer was the block asked: none of them held the payout, and it went out
    again under a new nonce (paid twice). Such an answer is no answer (UntrustedAnswer): the payout waits, and is
    concluded by its own receipt."""
    chain, recipient = escrow_chain, escrow_chain.accounts.stranger
    fund(chain, chain.accounts.deployer.address, 10 * USDC)
    before = usdc_balance(chain, recipient.address)
    tx = relayer_transfer(chain, django_capture_on_commit_callbacks, recipient.address, 2 * USDC)
    mined_what_was_sent()
    attempt = tx.attempts.get().tx_hash
    mined_in = int(rpc_relay.node("eth_getTransactionReceipt", [attempt])["blockNumber"], 16)
    chain.mine()  # an empty block after the payout's, which the proxy answers for the payout's
    assert usdc_balance(chain, chain.accounts.stranger.address) == before + 2 * USDC
    other = rpc_relay.node("eth_getBlockByNumber", [hex(mined_in + 1), False])
    head = int(rpc_relay.node("eth_blockNumber"), 16)

    rpc_relay.receipt_hidden_and_state_pruned(attempt, below=head)
    rpc_relay.rewrite(_block_asked(mined_in), lambda answer: {**answer, "result": other})
    settings.CHAIN_REBROADCAST_AFTER = timedelta(0)
    with django_capture_on_commit_callbacks(execute=True):
        relayer.transactions_poll()  # rebroadcast: nonce too low; no receipt; the scan meets the other block
    mined_what_was_sent()
    rpc_relay.rewrite_none()
    for _ in range(3):
        confirm_all(django_capture_on_commit_callbacks)
    tx.refresh_from_db()
    assert usdc_balance(chain, chain.accounts.stranger.address) == before + 2 * USDC, "the payout was sent twice"
    assert tx.status == TxStatus.CONFIRMED and tx.attempts.count() == 1
    with pytest.raises(gateway.UntrustedAnswer):
        rpc_relay.rewrite(_block_asked(mined_in), lambda answer: {**answer, "result": other})
        gateway.block_transaction_hashes(mined_in)


def test_a_node_answering_another_heights_block_for_the_block_that_took_the_nonce_sends_nothing_again(
        escrow_chain, rpc_relay, settings, django_capture_on_commit_callbacks):
    """The payout was dropped from the pool and another transaction of the relayer's wallet took its nonce; a proxy
    answers the lookup of the block that took it (`chain.nonce_taken_by`) with the block of another height. That block
    holds no transaction of the wallet under the nonce: the payout waits, is not sent again on it, and goes out again
    under a new nonce, once, when the block is answered right."""
    chain, recipient = escrow_chain, escrow_chain.accounts.stranger
    fund(chain, chain.accounts.deployer.address, 10 * USDC)
    before = usdc_balance(chain, recipient.address)
    chain.rpc("evm_setAutomine", [False])
    try:
        tx = relayer_transfer(chain, django_capture_on_commit_callbacks, recipient.address, 2 * USDC)
        chain.rpc("anvil_dropTransaction", [tx.attempts.get().tx_hash])
        taker = chain.w3.eth.send_transaction({"from": chain.accounts.deployer.address,
                                               "to": chain.accounts.deployer.address, "value": 0, "nonce": tx.nonce})
        chain.mine()
        chain.mine()
    finally:
        chain.rpc("evm_setAutomine", [True])
    taken_in = chain.w3.eth.get_transaction_receipt(taker)["blockNumber"]
    other = rpc_relay.node("eth_getBlockByNumber", [hex(taken_in + 1), True])
    rpc_relay.rewrite(_block_asked(taken_in), lambda answer: {**answer, "result": other})
    settings.CHAIN_REBROADCAST_AFTER = timedelta(0)
    for _ in range(2):
        confirm_all(django_capture_on_commit_callbacks)
    tx.refresh_from_db()
    assert (tx.status, tx.attempts.count()) == (TxStatus.SUBMITTED, 1)
    assert usdc_balance(chain, recipient.address) == before
    with pytest.raises(gateway.UntrustedAnswer):
        gateway.nonce_taken_by(chain.accounts.deployer.address, tx.nonce, used_at=taken_in + 1)
    rpc_relay.rewrite_none()
    for _ in range(3):
        confirm_all(django_capture_on_commit_callbacks)
    tx.refresh_from_db()
    assert tx.status == TxStatus.CONFIRMED and tx.attempts.count() == 2
    assert usdc_balance(chain, chain.accounts.stranger.address) == before + 2 * USDC


def test_a_sweep_sending_a_transaction_again_while_its_submission_runs_signs_it_once(
        parties, escrow_chain, monkeypatch, settings, django_capture_on_commit_callbacks):
    """The sweep sends a queued transaction again without marking it: its submission task, slow, is still between
    its simulation and its signing when the sweep's submission runs to the end. The signing takes the row's lock and
    reads it queued again: the slower one finds it submitted and signs nothing (one nonce, one attempt)."""
    capture = django_capture_on_commit_callbacks
    agreement, tx, callbacks = queue_activation(parties, capture)
    simulate, raced = gateway.simulate, []

    def simulated_while_the_sweep_sends_it(**kwargs):
        gas = simulate(**kwargs)
        if not raced:
            raced.append(True)
            settings.CHAIN_SWEEP_AFTER = timedelta(0)
            with capture(execute=True):
                assert relayer.transactions_sweep_queued() == 1
        return gas

    monkeypatch.setattr(gateway, "simulate", simulated_while_the_sweep_sends_it)
    with capture(execute=True):
        for callback in callbacks:
            callback()
    tx.refresh_from_db()
    assert raced and tx.status == TxStatus.SUBMITTED and tx.attempts.count() == 1
    confirm_all(capture)
    assert parties.agreement(agreement["id"])["status"] == "active"
    assert TxAttempt.objects.filter(transaction__agreement_id=agreement["id"]).count() == 1


def test_a_tip_the_node_suggests_above_the_fee_cap_does_not_make_the_first_attempt_invalid(
        escrow_chain, rpc_relay, settings, django_capture_on_commit_callbacks):
    """A spike of demand (or a node overstating it) makes the node suggest a priority fee above CHAIN_MAX_FEE_PER_GAS.
    The max fee was capped, the tip not: the first attempt was signed with a tip above its max fee, which no node
    accepts, and the payout waited CHAIN_REPLACE_AFTER for a replacement, its nonce holding every later transaction
    back. The tip is capped at the max fee: the first attempt is valid and mined."""
    chain, recipient = escrow_chain, escrow_chain.accounts.stranger
    fund(chain, chain.accounts.deployer.address, 10 * USDC)
    before = usdc_balance(chain, recipient.address)
    base_fee = chain.w3.eth.get_block("latest")["baseFeePerGas"]
    settings.CHAIN_MAX_FEE_PER_GAS = 4 * base_fee + 10**9
    rpc_relay.rewrite(lambda call: call.get("method") == "eth_maxPriorityFeePerGas",
                      lambda answer: {**answer, "result": hex(2 * settings.CHAIN_MAX_FEE_PER_GAS)})
    tx = relayer_transfer(chain, django_capture_on_commit_callbacks, recipient.address, 2 * USDC)
    confirm_all(django_capture_on_commit_callbacks)
    tx.refresh_from_db()
    first = tx.attempts.get()
    assert first.broadcast_error == "" and first.max_priority_fee_per_gas <= first.max_fee_per_gas
    assert (tx.status, tx.mined_tx_hash) == (TxStatus.CONFIRMED, first.tx_hash)
    assert usdc_balance(chain, chain.accounts.stranger.address) == before + 2 * USDC


def test_a_tip_a_hostile_node_suggests_far_above_the_chains_is_not_paid(
        escrow_chain, rpc_relay, settings, django_capture_on_commit_callbacks):
    """A node (compromised, or a provider answering in the wrong unit) suggests a priority fee of hundreds of gwei,
    below CHAIN_MAX_FEE_PER_GAS. The tip went out as suggested, and a tip is paid whole to the block's producer
    whatever the base fee: every transaction cost up to the fee cap per gas, thousands of times its price on Base. The
    node's suggestion is capped at CHAIN_MAX_PRIORITY_FEE_PER_GAS."""
    chain, recipient = escrow_chain, escrow_chain.accounts.stranger
    fund(chain, chain.accounts.deployer.address, 10 * USDC)
    settings.CHAIN_MAX_PRIORITY_FEE_PER_GAS = 2 * 10**9
    rpc_relay.rewrite(lambda call: call.get("method") == "eth_maxPriorityFeePerGas",
                      lambda answer: {**answer, "result": hex(400 * 10**9)})
    tx = relayer_transfer(chain, django_capture_on_commit_callbacks, recipient.address, 2 * USDC)
    confirm_all(django_capture_on_commit_callbacks)
    tx.refresh_from_db()
    first = tx.attempts.get()
    assert int(first.max_priority_fee_per_gas) == settings.CHAIN_MAX_PRIORITY_FEE_PER_GAS
    assert (tx.status, tx.mined_tx_hash) == (TxStatus.CONFIRMED, first.tx_hash)
    mined = chain.w3.eth.get_transaction_receipt(first.tx_hash)
    paid_tip = mined["effectiveGasPrice"] - chain.w3.eth.get_block(mined["blockNumber"])["baseFeePerGas"]
    assert paid_tip <= settings.CHAIN_MAX_PRIORITY_FEE_PER_GAS


def _refused_untrusted_then_sent(chain, rpc_relay, capture, recipient: str) -> None:
    """A payout of 2 USDC to `recipient` whose submission meets the node's untrusted answer (rewritten by the test):
    nothing signed, no nonce taken, queued with the reason the dashboard shows; sent and confirmed once the node
    answers right."""
    with capture(execute=False):
        tx = relayer.transaction_enqueue(purpose=TxPurpose.NONCE_FILL, to=chain.addresses["usdc"],
                                         data=chain.usdc.encode_abi("transfer", args=[recipient, 2 * USDC]))
    with pytest.raises(gateway.UntrustedAnswer):
        relayer.transaction_submit(transaction_id=tx.pk)
    tx.refresh_from_db()
    assert (tx.status, tx.nonce, tx.attempts.count()) == (TxStatus.QUEUED, None, 0)
    assert tx.submit_error.startswith("UntrustedAnswer"), "the dashboard's overdue item says why"
    rpc_relay.rewrite_none()
    relayer.transaction_submit(transaction_id=tx.pk)
    confirm_all(capture)
    tx.refresh_from_db()
    assert tx.status == TxStatus.CONFIRMED


@pytest.mark.parametrize("estimate", [10**9, 1], ids=["beyond_any_block", "below_intrinsic_gas"])
def test_a_gas_estimate_no_transaction_of_ours_can_take_takes_no_nonce(
        escrow_chain, rpc_relay, django_capture_on_commit_callbacks, estimate):
    """A node answers a transfer's gas estimate with a billion (beyond any block's gas limit) or with 1 (below the
    21,000 every transaction costs). The transaction was signed with that limit under the next nonce: refused by
    every node, round after round with the same limit, and every later transaction of the wallet waited behind its
    nonce for good. Such an estimate is no answer: the transaction stays queued, no nonce taken, and goes once the
    node answers one it can take."""
    chain, recipient = escrow_chain, escrow_chain.accounts.stranger
    fund(chain, chain.accounts.deployer.address, 10 * USDC)
    rpc_relay.rewrite(lambda call: call.get("method") == "eth_estimateGas",
                      lambda answer: {**answer, "result": hex(estimate)})
    _refused_untrusted_then_sent(chain, rpc_relay, django_capture_on_commit_callbacks, recipient.address)
    assert usdc_balance(chain, recipient.address) == 2 * USDC


@pytest.mark.parametrize(("answer", "recorded"), [
    ("AlreadyKnown", ""),  # Nethermind
    ("Known transaction", ""),  # Besu
    ("ALREADY_EXISTS: existing tx with same hash", ""),  # Erigon's pool
    ("Transaction with the same hash was already imported.", ""),  # OpenEthereum
    ("OldNonce, Current nonce: 7, nonce of rejected tx: 6", "NonceTooLow"),  # Nethermind
    ("nonce too low: next nonce 7, tx nonce 6", "NonceTooLow"),  # reth
    ("Upfront cost exceeds account balance", "InsufficientFunds"),  # Besu
    ("InsufficientFunds, Account balance: 5, cumulative cost: 9", "InsufficientFunds"),  # Nethermind
], ids=["nethermind_known", "besu_known", "erigon_known", "openethereum_known", "nethermind_nonce", "reth_nonce",
        "besu_funds", "nethermind_funds"])
def test_a_send_answered_in_another_clients_words_means_what_it_says(
        escrow_chain, rpc_relay, django_capture_on_commit_callbacks, answer, recorded):
    """The node took the transaction and answered the send with an error in its client's words (a provider's retry of
    a send whose first answer was lost, a backend of a pool that has it already). Read as an unknown error, a
    transaction a Nethermind or Besu node already holds was recorded refused (sent again only after the rebroadcast
    delay, its replacement at its time), a nonce used was not looked into until the replacement round, and a wallet
    that cannot pay its gas was bid up round after round, asking it for more (what geth's wording already avoids)."""
    chain, recipient = escrow_chain, escrow_chain.accounts.stranger
    fund(chain, chain.accounts.deployer.address, 10 * USDC)
    rpc_relay.rewrite(lambda call: call.get("method") == "eth_sendRawTransaction",
                      lambda node_answer: {"jsonrpc": "2.0", "id": node_answer.get("id"),
                                           "error": {"code": -32000, "message": answer}})
    tx = relayer_transfer(chain, django_capture_on_commit_callbacks, recipient.address, 2 * USDC)
    attempt = tx.attempts.get()
    assert attempt.broadcast_error.split(":", 1)[0] == recorded
    assert (attempt.broadcast_at is not None) == (recorded == "")
    rpc_relay.rewrite_none()
    confirm_all(django_capture_on_commit_callbacks)
    tx.refresh_from_db()
    assert (tx.status, tx.mined_tx_hash) == (TxStatus.CONFIRMED, attempt.tx_hash)


def _latest_block_without_base_fee(answer: dict) -> dict:
    return {**answer, "result": {key: value for key, value in answer["result"].items() if key != "baseFeePerGas"}}


def _latest_block_with_negative_base_fee(answer: dict) -> dict:
    return {**answer, "result": {**answer["result"], "baseFeePerGas": "-0x3b9aca00"}}


@pytest.mark.parametrize("malformed", [_latest_block_without_base_fee, _latest_block_with_negative_base_fee],
                         ids=["no_base_fee", "negative_base_fee"])
def test_a_latest_block_without_a_sane_base_fee_takes_no_nonce_and_fails_nothing_but_the_try(
        escrow_chain, rpc_relay, django_capture_on_commit_callbacks, malformed):
    """A node answers the latest block without its base fee, or with a negative one: the relayer's fee reading
    raised a bare ChainError (KeyError's) or signed fees no transaction can have (rlp's SerializationError, no chain
    error: the submission task failed as on a bug, the poll's replacement round logged a broken row). Such an answer
    is UntrustedAnswer (a node's fault, retried): nothing signed, the transaction stays queued and goes once the node
    answers a block with a base fee."""
    chain, recipient = escrow_chain, escrow_chain.accounts.stranger
    fund(chain, chain.accounts.deployer.address, 10 * USDC)
    rpc_relay.rewrite(lambda call: call.get("method") == "eth_getBlockByNumber" and call["params"][0] == "latest",
                      malformed)
    _refused_untrusted_then_sent(chain, rpc_relay, django_capture_on_commit_callbacks, recipient.address)


def test_a_relayer_wallet_out_of_gas_keeps_its_bytes_shows_why_and_sends_them_once_topped_up(
        escrow_chain, admin_client, settings, django_capture_on_commit_callbacks):
    """The relayer's wallet cannot pay a payout's gas: the node refuses it (insufficient funds). Each round replaced it
    with fees 13% higher, which asked the wallet for more still, up to the fee cap: a top-up covering what the
    payout costs at the chain's fees left it refused, and once mined it paid the tip of the round it reached. The
    dashboard said "stuck at the fee cap", not why. The signed bytes are kept and sent again (no replacement while
    the wallet cannot pay them), the dashboard says the wallet cannot pay its gas, and a top-up sends them as signed."""
    chain, recipient = escrow_chain, escrow_chain.accounts.stranger
    relayer_address = chain.accounts.deployer.address
    fund(chain, relayer_address, 10 * USDC)
    before = usdc_balance(chain, recipient.address)
    chain.rpc("anvil_setBalance", [relayer_address, hex(10**9)])  # one gwei's worth of gas: nothing
    settings.CHAIN_REBROADCAST_AFTER = settings.CHAIN_REPLACE_AFTER = timedelta(0)
    tx = relayer_transfer(chain, django_capture_on_commit_callbacks, recipient.address, 2 * USDC)
    first = tx.attempts.get()
    assert first.broadcast_error.startswith("InsufficientFunds")
    for _ in range(3):
        confirm_all(django_capture_on_commit_callbacks)
    tx.refresh_from_db()
    assert tx.status == TxStatus.SUBMITTED
    assert tx.attempts.count() == 1, "replaced with higher fees while the wallet cannot pay the first"
    overdue = admin_client.get("/admin/dashboard/").context["overdue"]
    assert f"{tx.purpose} refused: the relayer's wallet cannot pay its gas" in [item.kind for item in overdue]
    # Alerting sees it too, not the dashboard and the log alone.
    settings.METRICS_TOKEN = "metrics-token"
    unfunded = ("marketplace_chain_transactions_unfunded", (("purpose", tx.purpose),))
    assert scrape(Client(), HTTP_AUTHORIZATION="Bearer metrics-token").get(unfunded) == 1

    chain.rpc("anvil_setBalance", [relayer_address, hex(tx.gas_limit * int(first.max_fee_per_gas))])
    confirm_all(django_capture_on_commit_callbacks)
    confirm_all(django_capture_on_commit_callbacks)
    tx.refresh_from_db()
    assert (tx.status, tx.mined_tx_hash, tx.attempts.count()) == (TxStatus.CONFIRMED, first.tx_hash, 1)
    assert not scrape(Client(), HTTP_AUTHORIZATION="Bearer metrics-token").get(unfunded)
    assert usdc_balance(chain, chain.accounts.stranger.address) == before + 2 * USDC


def test_a_payout_priced_out_by_a_base_fee_above_the_cap_does_not_bid_its_tip_up_to_the_cap(
        escrow_chain, admin_client, settings, django_capture_on_commit_callbacks):
    """The base fee spikes above CHAIN_MAX_FEE_PER_GAS: the payout's max fee is pinned at the cap, and no tip gets it
    into a block (nor is a replacement raising the tip alone accepted beside bytes a node holds). Each round replaced
    it all the same with a tip 13% higher, round after round up to the cap (a hundred attempts at the defaults), and
    once the spike was over it was mined paying that tip, up to the cap per gas where the chain asked a fraction of it.
    A replacement that cannot raise the max fee is not signed: the payout is stuck at the fee cap from the first round
    (the dashboard says so), and mined as first signed once the base fee falls back."""
    chain, recipient = escrow_chain, escrow_chain.accounts.stranger
    fund(chain, chain.accounts.deployer.address, 10 * USDC)
    before = usdc_balance(chain, recipient.address)
    base_fee = chain.w3.eth.get_block("latest")["baseFeePerGas"]
    settings.CHAIN_MAX_FEE_PER_GAS = 4 * base_fee + 10**9
    chain.rpc("anvil_setNextBlockBaseFeePerGas", [hex(10 * settings.CHAIN_MAX_FEE_PER_GAS)])
    chain.mine()
    settings.CHAIN_REBROADCAST_AFTER = settings.CHAIN_REPLACE_AFTER = timedelta(0)
    tx = relayer_transfer(chain, django_capture_on_commit_callbacks, recipient.address, 2 * USDC)
    first = tx.attempts.get()
    assert first.max_fee_per_gas == settings.CHAIN_MAX_FEE_PER_GAS and first.broadcast_error  # below the base fee
    for _ in range(3):
        confirm_all(django_capture_on_commit_callbacks)
    tx.refresh_from_db()
    assert [attempt.max_priority_fee_per_gas for attempt in tx.attempts.order_by("created_at", "pk")] == [
        first.max_priority_fee_per_gas], "its tip bid up while only the base fee kept it out"
    overdue = admin_client.get("/admin/dashboard/").context["overdue"]
    assert f"{tx.purpose} stuck at the fee cap" in [item.kind for item in overdue]

    chain.rpc("anvil_setNextBlockBaseFeePerGas", [hex(base_fee)])
    chain.mine()
    confirm_all(django_capture_on_commit_callbacks)
    confirm_all(django_capture_on_commit_callbacks)
    tx.refresh_from_db()
    assert (tx.status, tx.mined_tx_hash) == (TxStatus.CONFIRMED, first.tx_hash)
    assert usdc_balance(chain, chain.accounts.stranger.address) == before + 2 * USDC


def test_a_payout_waiting_behind_an_earlier_nonce_is_not_bid_up_while_it_waits(
        escrow_chain, settings, django_capture_on_commit_callbacks):
    """A payout dropped from the node's pool holds its nonce; the next one, signed under the nonce after it, cannot be
    mined before it whatever it pays. It was replaced with fees 13% higher every CHAIN_REPLACE_AFTER all the same (up
    to the cap while the first stayed stuck) and, once the first went through, mined paying them. Only the
    transaction holding the wallet's next nonce is replaced; those behind it are sent again as signed."""
    chain, recipient = escrow_chain, escrow_chain.accounts.stranger
    capture = django_capture_on_commit_callbacks
    fund(chain, chain.accounts.deployer.address, 10 * USDC)
    before = usdc_balance(chain, recipient.address)
    chain.rpc("evm_setAutomine", [False])
    try:
        first = relayer_transfer(chain, capture, recipient.address, USDC)
        behind = relayer_transfer(chain, capture, recipient.address, 2 * USDC)
        assert behind.nonce == first.nonce + 1
        chain.rpc("anvil_dropTransaction", [first.attempts.get().tx_hash])  # evicted from the pool
        settings.CHAIN_REBROADCAST_AFTER = settings.CHAIN_REPLACE_AFTER = timedelta(0)
        for _ in range(2):
            confirm_all(capture)
        assert behind.attempts.count() == 1, "bid up while it can only wait for the nonce before it"
        chain.mine()
    finally:
        chain.rpc("evm_setAutomine", [True])
    confirm_all(capture)
    first.refresh_from_db()
    behind.refresh_from_db()
    assert (first.status, behind.status) == (TxStatus.CONFIRMED, TxStatus.CONFIRMED)
    assert behind.mined_tx_hash == behind.attempts.get().tx_hash
    assert usdc_balance(chain, recipient.address) == before + 3 * USDC


def test_a_payout_at_the_fee_cap_withdrawn_is_cancelled_by_its_nonce_fill_not_run(
        escrow_chain, settings, django_capture_on_commit_callbacks):
    """A payout whose max fee is at the cap, still in the node's pool, is withdrawn (its domain no longer wants it: a
    reorg took the payment it forwards). Its nonce fill bumped its fees within the cap: the same max fee, which no
    node takes as a replacement, so the node kept the payout's bytes and mined them in the fill's place (paid when
    the platform said withdrawn). The fill, 21,000 gas, may bid one bump past the cap: it takes the nonce."""
    chain, recipient = escrow_chain, escrow_chain.accounts.stranger
    capture = django_capture_on_commit_callbacks
    fund(chain, chain.accounts.deployer.address, 10 * USDC)
    before = usdc_balance(chain, recipient.address)
    settings.CHAIN_MAX_FEE_PER_GAS = gateway.current_fees().max_fee_per_gas // 2
    chain.rpc("evm_setAutomine", [False])
    try:
        payout = relayer_transfer(chain, capture, recipient.address, 2 * USDC)
        assert payout.attempts.get().max_fee_per_gas == settings.CHAIN_MAX_FEE_PER_GAS
        assert payout.attempts.get().broadcast_error == ""  # in the pool
        with transaction.atomic():
            assert relayer.transaction_withdraw(transaction_id=payout.pk, reason="its payment was taken by a reorg")
        fill = ChainTransaction.objects.get(context__cancels=str(payout.pk))
        confirm_all(capture)  # the fill broadcast
        assert fill.attempts.get().broadcast_error == "", "the node kept the payout's bytes"
        chain.mine()
    finally:
        chain.rpc("evm_setAutomine", [True])
    confirm_all(capture)
    fill.refresh_from_db()
    assert (fill.status, fill.mined_tx_hash) == (TxStatus.CONFIRMED, fill.attempts.get().tx_hash)
    assert usdc_balance(chain, recipient.address) == before


def test_a_backend_without_a_block_the_nonce_scan_bisects_leaves_the_payout_waiting_without_failing_the_poll(
        escrow_chain, rpc_relay, settings, django_capture_on_commit_callbacks):
    """A load-balanced provider: the backend answering the receipt lookup is behind (no receipt yet), the node keeps
    recent state only (it refuses nonces at older blocks), and the backend asked for the blocks the scan's bisection
    reads (`chain.block_number_at`: the first block since the payout was signed) has none of them. web3's BlockNotFound
    escaped it, no ChainError: the poll took it for a bug in the row (RowsFailed, the task failing, the row logged as
    broken). It is a node behind: the payout waits, the poll ends cleanly, and its receipt concludes it later."""
    chain, recipient = escrow_chain, escrow_chain.accounts.stranger
    fund(chain, chain.accounts.deployer.address, 10 * USDC)
    before = usdc_balance(chain, recipient.address)
    tx = relayer_transfer(chain, django_capture_on_commit_callbacks, recipient.address, 2 * USDC)
    mined_what_was_sent()
    attempt = tx.attempts.get().tx_hash
    chain.mine()
    head = int(rpc_relay.node("eth_blockNumber"), 16)

    rpc_relay.receipt_hidden_and_state_pruned(attempt, below=head)
    rpc_relay.rewrite(lambda call: call.get("method") == "eth_getBlockByNumber" and call["params"][0].startswith("0x"),
                      lambda answer: {**answer, "result": None})
    settings.CHAIN_REBROADCAST_AFTER = timedelta(0)
    with django_capture_on_commit_callbacks(execute=True):
        relayer.transactions_poll()  # rebroadcast: nonce too low; no receipt; no block for the bisection
    tx.refresh_from_db()
    assert (tx.status, tx.attempts.count()) == (TxStatus.SUBMITTED, 1)
    rpc_relay.rewrite_none()
    for _ in range(3):
        confirm_all(django_capture_on_commit_callbacks)
    tx.refresh_from_db()
    assert tx.status == TxStatus.CONFIRMED and tx.attempts.count() == 1
    assert usdc_balance(chain, chain.accounts.stranger.address) == before + 2 * USDC


@pytest.mark.parametrize("refusal", [
    "transaction underpriced",  # geth, reth, op-geth (Base's sequencer), Alchemy, Infura
    "Gas price below configured minimum gas price",  # Besu
    "FeeTooLow, EffectivePriorityFeePerGas too low 1000 < 30000000000, BaseFee: 7",  # Nethermind
    "FEE_TOO_LOW: underpriced",  # Erigon's pool
], ids=["geth", "besu", "nethermind", "erigon"])
def test_a_first_attempt_refused_for_a_tip_below_the_providers_minimum_raises_its_tip_not_shown_stuck_at_the_cap(
        escrow_chain, rpc_relay, monkeypatch, settings, django_capture_on_commit_callbacks, refusal):
    """The provider refuses any transaction tipping below its own minimum ("transaction underpriced": Polygon's
    30 gwei, some providers' pools; each client words it its own way), above what the node suggests. Each round bumped both fees 12.5%: the max fee
    reached CHAIN_MAX_FEE_PER_GAS first, the tip still below the minimum, and from then on the same refused bytes were
    sent again and the payout shown "stuck at the fee cap", which raising the cap would not cure. An attempt the node
    refused as underpriced is in no pool, so no replacement rule binds its successor: its tip is raised alone, within
    the max fee, until the provider takes it."""
    from eth_account.typed_transactions import TypedTransaction
    from hexbytes import HexBytes

    chain, recipient = escrow_chain, escrow_chain.accounts.stranger
    fund(chain, chain.accounts.deployer.address, 10 * USDC)
    before = usdc_balance(chain, recipient.address)
    base_fee = chain.w3.eth.get_block("latest")["baseFeePerGas"]
    settings.CHAIN_MIN_PRIORITY_FEE = 1
    settings.CHAIN_MAX_FEE_PER_GAS = 4 * base_fee + 10**9
    minimum_tip = settings.CHAIN_MAX_FEE_PER_GAS // 2  # far above the node's suggestion
    rpc_relay.rewrite(lambda call: call.get("method") == "eth_maxPriorityFeePerGas",
                      lambda answer: {**answer, "result": hex(1000)})
    broadcast = gateway.broadcast

    def provider(raw: str) -> None:
        if TypedTransaction.from_bytes(HexBytes(raw)).as_dict()["maxPriorityFeePerGas"] < minimum_tip:
            raise gateway.classify(Web3RPCError(f"{{'code': -32000, 'message': '{refusal}'}}"))
        broadcast(raw)

    monkeypatch.setattr(gateway, "broadcast", provider)
    settings.CHAIN_REBROADCAST_AFTER = settings.CHAIN_REPLACE_AFTER = timedelta(0)
    tx = relayer_transfer(chain, django_capture_on_commit_callbacks, recipient.address, 2 * USDC)
    assert tx.attempts.get().broadcast_error.startswith("ReplacementUnderpriced")
    for _ in range(40):
        confirm_all(django_capture_on_commit_callbacks)
        tx.refresh_from_db()
        if tx.status != TxStatus.SUBMITTED:
            break
    for _ in range(3):
        confirm_all(django_capture_on_commit_callbacks)
    tx.refresh_from_db()
    assert (tx.status, tx.fee_cap_reached_at) == (TxStatus.CONFIRMED, None), [
        (attempt.max_fee_per_gas, attempt.max_priority_fee_per_gas, attempt.broadcast_error[:40])
        for attempt in tx.attempts.order_by("created_at", "pk")][-3:]
    assert usdc_balance(chain, chain.accounts.stranger.address) == before + 2 * USDC


def test_a_transaction_behind_more_stuck_ones_than_a_poll_reads_is_confirmed_within_a_few_polls(
        escrow_chain, monkeypatch, settings, django_capture_on_commit_callbacks):
    """Each poll read the POLL_BATCH in-flight transactions least recently updated, and a check that only sends the
    same bytes again (or waits) writes the attempt, not the transaction: with more stuck ones than that (a replaced
    key's payouts its wallet cannot pay the gas of), a payout of the new wallet behind them, mined, was never
    looked at, so never confirmed. Every in-flight transaction is checked within a few polls (one cursor per row)."""
    chain, recipient, replacement_wallet = escrow_chain, escrow_chain.accounts.stranger, escrow_chain.accounts.spare
    old_wallet, old_key = chain.accounts.deployer.address, settings.RELAYER_PRIVATE_KEY
    fund(chain, old_wallet, 10 * USDC)
    fund(chain, replacement_wallet.address, 10 * USDC)
    monkeypatch.setattr(relayer, "POLL_BATCH", 3)
    capture = django_capture_on_commit_callbacks
    chain.rpc("evm_setAutomine", [False])
    try:
        stuck = [relayer_transfer(chain, capture, recipient.address, USDC) for _ in range(4)]
        for tx in stuck:
            chain.rpc("anvil_dropTransaction", [tx.attempts.get().tx_hash])  # evicted from the pool
    finally:
        chain.rpc("evm_setAutomine", [True])
    chain.rpc("anvil_setBalance", [old_wallet, hex(10**9)])  # nor can the old wallet pay their gas again
    settings.RELAYER_PRIVATE_KEY, settings.RELAYER_RETIRED_PRIVATE_KEYS = replacement_wallet.key, [old_key]
    payout = relayer_transfer(chain, capture, recipient.address, 2 * USDC)
    assert payout.relayer.address == replacement_wallet.address
    for _ in range(3):
        confirm_all(capture)
    payout.refresh_from_db()
    assert payout.status == TxStatus.CONFIRMED, "never checked: the stuck transactions filled every poll"
    assert [tx.status for tx in ChainTransaction.objects.filter(pk__in=[tx.pk for tx in stuck])] == [
        TxStatus.SUBMITTED] * 4


def refused_for_its_gas(chain, capture, settings) -> tuple[ChainTransaction, int]:
    """A transfer of 2 USDC to the stranger that the relayer's wallet cannot pay the gas of: the node refused it, and
    it waits CHAIN_REBROADCAST_AFTER (300 s). Returns it and the stranger's balance before."""
    relayer_address, recipient = chain.accounts.deployer.address, chain.accounts.stranger.address
    fund(chain, relayer_address, 10 * USDC)
    before = usdc_balance(chain, recipient)
    chain.rpc("anvil_setBalance", [relayer_address, hex(10**9)])
    settings.CHAIN_REBROADCAST_AFTER = timedelta(seconds=300)
    tx = relayer_transfer(chain, capture, recipient, 2 * USDC)
    assert tx.attempts.get().broadcast_error.startswith("InsufficientFunds")
    return tx, before


def test_an_attempt_the_node_refused_is_sent_again_after_the_rebroadcast_delay_not_at_every_poll(
        escrow_chain, rpc_relay, settings, django_capture_on_commit_callbacks):
    """An attempt the node refused (here the wallet cannot pay its gas) was never accepted, and only an accepted one
    waited CHAIN_REBROADCAST_AFTER: the refused bytes were sent again at every poll, one call per stuck transaction
    per poll to a provider that bills or rate-limits them. They wait as accepted ones do, and go once the cause is
    gone and the delay passed."""
    chain, relayer_address = escrow_chain, escrow_chain.accounts.deployer.address
    tx, before = refused_for_its_gas(chain, django_capture_on_commit_callbacks, settings)
    first = tx.attempts.get()
    sent: list[dict] = []
    rpc_relay.observers.append(lambda call: call.get("method") == "eth_sendRawTransaction" and sent.append(call))
    for _ in range(4):
        confirm_all(django_capture_on_commit_callbacks)
    assert len(sent) == 0, f"the refused bytes were sent {len(sent)} times in 4 polls within CHAIN_REBROADCAST_AFTER"

    chain.rpc("anvil_setBalance", [relayer_address, hex(tx.gas_limit * int(first.max_fee_per_gas))])
    settings.CHAIN_REBROADCAST_AFTER = timedelta(0)  # the delay passed
    confirm_all(django_capture_on_commit_callbacks)
    confirm_all(django_capture_on_commit_callbacks)
    tx.refresh_from_db()
    assert (tx.status, tx.mined_tx_hash, tx.attempts.count()) == (TxStatus.CONFIRMED, first.tx_hash, 1)
    assert len(sent) == 1
    assert usdc_balance(chain, chain.accounts.stranger.address) == before + 2 * USDC


def test_an_attempt_refused_for_the_wallets_gas_goes_at_the_next_poll_once_a_top_up_covers_it(
        escrow_chain, settings, monkeypatch, django_capture_on_commit_callbacks):
    """An attempt the node refused because the relayer's wallet could not pay its gas waited CHAIN_REBROADCAST_AFTER
    (here 300 s) from its refusal even once the wallet was topped up. The wallet's balance, read once per poll while
    such an attempt waits, covering its max cost and above what it was at the refusal lets it go at the next poll. A
    node that refuses it again all the same is not asked at every poll: once per top-up, else after the delay."""
    chain, capture = escrow_chain, django_capture_on_commit_callbacks
    relayer_address = chain.accounts.deployer.address
    tx, before = refused_for_its_gas(chain, capture, settings)
    first = tx.attempts.get()
    max_cost = tx.gas_limit * int(first.max_fee_per_gas)
    broadcast, sent = gateway.broadcast, []

    def node_still_refusing(raw):
        sent.append(raw)
        raise gateway.InsufficientFunds("insufficient funds for gas * price + value")

    monkeypatch.setattr(gateway, "broadcast", node_still_refusing)
    confirm_all(capture)
    assert sent == []  # nothing changed: it waits
    chain.rpc("anvil_setBalance", [relayer_address, hex(max_cost)])
    for _ in range(3):
        confirm_all(capture)
    assert len(sent) == 1, f"sent {len(sent)} times in 3 polls: once for the top-up, then the delay"

    monkeypatch.setattr(gateway, "broadcast", broadcast)
    chain.rpc("anvil_setBalance", [relayer_address, hex(2 * max_cost)])  # topped up again; the node takes it now
    confirm_all(capture)
    confirm_all(capture)
    tx.refresh_from_db()
    assert (tx.status, tx.mined_tx_hash, tx.attempts.count()) == (TxStatus.CONFIRMED, first.tx_hash, 1), \
        "it waited CHAIN_REBROADCAST_AFTER from its refusal though the wallet was topped up"
    assert usdc_balance(chain, chain.accounts.stranger.address) == before + 2 * USDC


def test_the_queued_sweep_sends_a_transaction_again_only_once_its_message_may_be_lost_and_the_oldest_first(
        parties, settings, monkeypatch, django_capture_on_commit_callbacks):
    """The sweep (every 30 s) sent a submission for every transaction still queued, whether or not the last one it
    sent still waited in the queue: with the default queue behind (a node that hangs holds each submission for its
    RPC timeout), each run added every queued row again, up to 500, ahead of the poll and the settlement ticks, and
    its first 500, in no order, could be the same rows each time while the others waited."""
    monkeypatch.setattr(relayer, "SWEEP_QUEUED_BATCH", 2)
    chain = parties.chain
    with django_capture_on_commit_callbacks(execute=False):  # their messages lost
        queued_rows = [relayer.transaction_enqueue(purpose=TxPurpose.NONCE_FILL, to=chain.addresses["usdc"],
                                                   data=chain.usdc.encode_abi("transfer", args=[
                                                       chain.accounts.stranger.address, 0]))
                       for _ in range(3)]
    now = timezone.now()
    for age, tx in zip((300, 200, 100), queued_rows, strict=True):
        ChainTransaction.objects.filter(pk=tx.pk).update(updated_at=now - timedelta(seconds=age))
    oldest, older, newest = queued_rows
    sent = []
    monkeypatch.setattr(submit_transaction, "delay", sent.append)  # the queue, its workers behind

    assert relayer.transactions_sweep_queued(now=now) == 2
    assert sent == [str(oldest.pk), str(older.pk)]
    assert relayer.transactions_sweep_queued(now=now + timedelta(seconds=30)) == 1  # the next run: the one left
    assert relayer.transactions_sweep_queued(now=now + timedelta(seconds=60)) == 0  # theirs wait in the queue
    assert sent == [str(oldest.pk), str(older.pk), str(newest.pk)]

    with django_capture_on_commit_callbacks(execute=True):
        submit_transaction(str(oldest.pk))  # a worker takes one: sent
    later = now + timedelta(seconds=60) + settings.CHAIN_SUBMIT_REQUEUE_AFTER  # the others not taken: lost
    assert relayer.transactions_sweep_queued(now=later) == 2
    assert sent[3:] == [str(older.pk), str(newest.pk)]
    assert ChainTransaction.objects.get(pk=oldest.pk).status == TxStatus.SUBMITTED


@pytest.mark.parametrize("held", ["eth_call", "eth_estimateGas", "eth_sendRawTransaction"])
def test_a_call_whose_answer_never_comes_back_is_no_verdict_on_the_transaction(
        escrow_chain, rpc_relay, settings, django_capture_on_commit_callbacks, held):
    """The node does the work (runs the simulation, takes the transaction into its pool) but its answer never comes
    back: the call times out. A simulation that timed out is no revert (the payout failed for good, its domain told
    so), and a broadcast that timed out is no refusal nor a transaction to sign again: the submit leaves the payout
    queued (the sweeper sends it), or submitted with its one attempt, whose receipt the next poll finds. Sent once,
    paid once."""
    chain, capture, recipient = escrow_chain, django_capture_on_commit_callbacks, escrow_chain.accounts.stranger
    settings.CHAIN_RPC_TIMEOUT, settings.CHAIN_RPC_RETRIES = 1.0, 0
    fund(chain, chain.accounts.deployer.address, 10 * USDC)
    before, nonce_before = usdc_balance(chain, recipient.address), relayer_nonce_on_chain(chain)
    rpc_relay.hold(held)
    try:
        tx = relayer_transfer(chain, capture, recipient.address, 2 * USDC)  # the submit task runs and times out
    finally:
        rpc_relay.release()
    assert tx.status != TxStatus.FAILED, "a call that timed out taken for a revert"
    if held == "eth_sendRawTransaction":
        assert tx.status == TxStatus.SUBMITTED and tx.attempts.count() == 1
        assert "RpcUnavailable" in tx.attempts.get().broadcast_error
    else:
        assert (tx.status, tx.attempts.count()) == (TxStatus.QUEUED, 0)
        assert tx.submit_error.startswith("RpcUnavailable")
        settings.CHAIN_SWEEP_AFTER = timedelta(0)
        with capture(execute=True):
            relayer.transactions_sweep_queued()
    for _ in range(2):
        confirm_all(capture)
    tx.refresh_from_db()
    assert tx.status == TxStatus.CONFIRMED and tx.attempts.count() == 1
    assert relayer_nonce_on_chain(chain) == nonce_before + 1
    assert usdc_balance(chain, recipient.address) == before + 2 * USDC


def test_a_poll_reads_the_headers_above_a_block_once_for_every_transaction_mined_in_it(
        escrow_chain, rpc_relay, settings, django_capture_on_commit_callbacks):
    """Several payouts mined in one block, concluded by one poll at CHAIN_CONFIRMATIONS 4: the depth of each is counted
    over the blocks that descend from its block, each the parent of the next. Those headers were read again for each
    transaction (3 calls a payout: 300 for a poll concluding 100 payouts of a block); the poll reads each height once,
    and every payout is still concluded only over blocks that descend from its own."""
    chain, capture, recipient = escrow_chain, django_capture_on_commit_callbacks, escrow_chain.accounts.stranger
    settings.CHAIN_CONFIRMATIONS = 4
    fund(chain, chain.accounts.deployer.address, 10 * USDC)
    chain.rpc("evm_setAutomine", [False])
    try:
        payouts = [relayer_transfer(chain, capture, recipient.address, USDC) for _ in range(3)]
        chain.mine()
    finally:
        chain.rpc("evm_setAutomine", [True])
    confirm_all(capture)  # mined, not deep yet
    mined_in = {ChainTransaction.objects.get(pk=payout.pk).mined_block_number for payout in payouts}
    assert len(mined_in) == 1
    chain.mine(3)
    block = mined_in.pop()
    asked: list[int] = []
    rpc_relay.observers.append(lambda call: asked.append(int(call["params"][0], 16)) if (
        call.get("method") == "eth_getBlockByNumber" and call["params"][0].startswith("0x")) else None)
    confirm_all(capture)
    assert all(ChainTransaction.objects.get(pk=payout.pk).status == TxStatus.CONFIRMED for payout in payouts)
    above = [number for number in asked if number > block]
    assert sorted(above) == [block + 1, block + 2, block + 3], f"headers above the payouts' block read: {above}"


def _replays_refused_as_pruned(rpc_relay, selector: str) -> None:
    """`eth_call`s of `selector` at a numbered block refused as a node that keeps recent state only does."""
    def replayed(call) -> bool:
        if call.get("method") != "eth_call" or not str(call["params"][1]).startswith("0x"):
            return False
        asked = call["params"][0]
        return str(asked.get("data") or asked.get("input") or "").startswith(selector)

    rpc_relay.rewrite(replayed, lambda answer: {"jsonrpc": "2.0", "id": answer.get("id"), "error": {
        "code": -32000, "message": "missing trie node 6b3c (path ) state 0x6b3c is not available"}})


def test_an_activation_a_front_runner_copied_first_is_found_done_on_a_node_that_cannot_replay_its_block(
        escrow_chain, rpc_relay, http_server, settings, django_capture_on_commit_callbacks):
    """Our activation reverted AgreementExists after a stranger's copy of it funded the escrow; the node keeps recent
    state only (a pruned full node, most providers' default), and refuses the replay of our transaction at its
    block ("missing trie node"). That refusal was taken for the revert's reason: AgreementExists not in it, the
    escrow was not read, and the agreement was failed ("activation reverted: {'code': -32000, 'message': 'missing
    trie node ...'}") while the buyer's deposit sat in its escrow, funded. A replay the node refuses gives no reason:
    the activation's outcome is read from the escrow, and the reason recorded says it was not read."""
    from tests.escrow.test_front_running import _activation_copied_by_a_front_runner

    chain, capture = escrow_chain, django_capture_on_commit_callbacks
    settings.CHAIN_REBROADCAST_AFTER = timedelta(0)
    parties = Parties(chain, upstream_base_url=http_server.url)
    agreement, ours = _activation_copied_by_a_front_runner(chain, parties, capture)
    _replays_refused_as_pruned(rpc_relay, ours.data[:10])
    chain.mine(3)
    confirm_all(capture)  # no receipt: the relayer rebroadcasts its bytes, mined now and reverted
    confirm_all(capture)
    ours.refresh_from_db()
    assert ours.status == "failed" and ours.receipt_status == 0
    shown = parties.agreement(agreement["id"])
    assert shown["status"] == "active", shown.get("status_reason")
    assert ours.failure_reason.startswith(gateway.REASON_NOT_READ), ours.failure_reason


@pytest.mark.parametrize("refusal", ["transaction underpriced", "replacement transaction underpriced"],
                         ids=["underpriced", "replacement_underpriced"])
def test_a_node_refusing_every_attempt_as_underpriced_does_not_walk_the_fees_past_what_the_chain_asks(
        escrow_chain, rpc_relay, monkeypatch, settings, django_capture_on_commit_callbacks, refusal):
    """A hostile node (or provider) answers every broadcast "underpriced", whatever its fees. Each round replaced the
    payout with a tip doubled (or both fees 13% higher), round after round up to CHAIN_MAX_FEE_PER_GAS, and the node,
    taking the last, had it mined paying that tip per gas, paid whole to the block's producer: thousands of times what
    the chain asks. A replacement's tip stays within CHAIN_MAX_PRIORITY_FEE_PER_GAS and its max fee within what the
    chain's own base fee (from its latest block) asks with that tip; past them the payout is shown stuck at the fee
    cap, for an operator, and its bytes are sent again as they are."""
    chain, recipient = escrow_chain, escrow_chain.accounts.stranger
    fund(chain, chain.accounts.deployer.address, 10 * USDC)
    before = usdc_balance(chain, recipient.address)
    settings.CHAIN_MIN_PRIORITY_FEE, settings.CHAIN_MAX_PRIORITY_FEE_PER_GAS = 1, 10**6
    # A base fee the bounds are reached from within the rounds below, whatever the earlier tests left it at.
    chain.rpc("anvil_setNextBlockBaseFeePerGas", [hex(10**9)])
    chain.mine()
    rpc_relay.rewrite(lambda call: call.get("method") == "eth_maxPriorityFeePerGas",
                      lambda answer: {**answer, "result": hex(1000)})
    broadcast, hostile = gateway.broadcast, {"refusing": True}

    def node(raw: str) -> None:
        if hostile["refusing"]:
            raise gateway.classify(Web3RPCError(f"{{'code': -32000, 'message': '{refusal}'}}"))
        broadcast(raw)

    monkeypatch.setattr(gateway, "broadcast", node)
    settings.CHAIN_REBROADCAST_AFTER = settings.CHAIN_REPLACE_AFTER = timedelta(0)
    tx = relayer_transfer(chain, django_capture_on_commit_callbacks, recipient.address, 2 * USDC)
    for _ in range(25):
        confirm_all(django_capture_on_commit_callbacks)
    base_fee = chain.w3.eth.get_block("latest")["baseFeePerGas"]
    fees = [(int(attempt.max_fee_per_gas), int(attempt.max_priority_fee_per_gas))
            for attempt in tx.attempts.order_by("created_at", "pk")]
    assert max(tip for _, tip in fees) <= settings.CHAIN_MAX_PRIORITY_FEE_PER_GAS, fees
    assert max(max_fee for max_fee, _ in fees) <= 2 * base_fee + settings.CHAIN_MAX_PRIORITY_FEE_PER_GAS, fees
    tx.refresh_from_db()
    assert tx.fee_cap_reached_at is not None

    hostile["refusing"] = False
    for _ in range(3):
        confirm_all(django_capture_on_commit_callbacks)
    tx.refresh_from_db()
    assert tx.status == TxStatus.CONFIRMED
    assert usdc_balance(chain, recipient.address) == before + 2 * USDC
    mined = chain.w3.eth.get_transaction_receipt(tx.mined_tx_hash)
    paid_tip = mined["effectiveGasPrice"] - chain.w3.eth.get_block(mined["blockNumber"])["baseFeePerGas"]
    assert paid_tip <= settings.CHAIN_MAX_PRIORITY_FEE_PER_GAS
