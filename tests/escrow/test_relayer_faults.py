"""The relayer against the faults DESIGN section 6 names, on a real Anvil node and PostgreSQL."""

from datetime import timedelta

import pytest

from escrow import chain as gateway
from escrow import relayer
from escrow.models import ChainTransaction, RelayerAccount, TxAttempt, TxStatus
from tests.escrow.flow import Parties, confirm_all

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


def test_reorg_before_confirmation_depth_is_noticed(parties, escrow_chain, settings,
                                                    django_capture_on_commit_callbacks):
    chain = escrow_chain
    settings.CHAIN_CONFIRMATIONS = 3
    agreement, tx, callbacks = queue_activation(parties, django_capture_on_commit_callbacks)
    before_fork = chain.snapshot()
    with django_capture_on_commit_callbacks(execute=True):
        for callback in callbacks:
            callback()
    confirm_all(django_capture_on_commit_callbacks)
    tx.refresh_from_db()
    assert tx.status == TxStatus.MINED  # depth 1 of 3
    mined_hash = tx.mined_block_hash

    # Another branch wins: the block with our transaction disappears and the chain grows past it.
    chain.revert(before_fork)
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


def test_sweeper_requeues_transactions_whose_task_was_lost(parties, django_capture_on_commit_callbacks):
    agreement, tx, _ = queue_activation(parties, django_capture_on_commit_callbacks)  # the task never ran
    ChainTransaction.objects.filter(pk=tx.pk).update(updated_at=tx.updated_at - timedelta(minutes=5))
    with django_capture_on_commit_callbacks(execute=True):
        assert relayer.transactions_sweep_queued() == 1
    confirm_all(django_capture_on_commit_callbacks)
    assert parties.agreement(agreement["id"])["status"] == "active"
