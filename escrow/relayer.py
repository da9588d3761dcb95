"""The relayer: gets ChainTransactions mined exactly once, whatever fails in between.

- `transaction_enqueue` writes the row in the caller's DB transaction and submits after commit.
- `transaction_submit` simulates, allocates the nonce from the DB (row lock), signs, stores the attempt's hash
  and raw bytes, commits, and only then broadcasts: a worker killed at any point leaves either nothing
  (rolled back, the task runs again) or a stored attempt that `transaction_check` rebroadcasts.
- `transaction_check` (driven by the `poll_confirmations` beat task) finds receipts of any attempt, counts
  confirmations, notices reorgs (the mined block is no longer canonical), rebroadcasts dropped transactions and
  replaces stuck ones with the same nonce and bumped fees. Final outcomes go to the domain exactly once.
"""

import functools
import logging
from collections.abc import Callable

from django.conf import settings
from django.db import IntegrityError, transaction
from django.utils import timezone

from escrow import chain
from escrow.models import ChainTransaction, RelayerAccount, TxAttempt, TxStatus
from marketplace.logging import agreement_context

logger = logging.getLogger(__name__)

OutcomeHandler = Callable[[ChainTransaction], None]
_outcome_handlers: dict[str, OutcomeHandler] = {}
_submitted_handlers: dict[str, OutcomeHandler] = {}
_GAS_HEADROOM_PERCENT = 25


def outcome_handler_register(*, purpose: str, on_outcome: OutcomeHandler,
                             on_submitted: OutcomeHandler | None = None) -> None:
    """`on_outcome(tx)` runs in the DB transaction that makes `tx` confirmed or failed; `on_submitted(tx)` in the
    one that signs its first attempt (its hash is then known)."""
    _outcome_handlers[purpose] = on_outcome
    if on_submitted is not None:
        _submitted_handlers[purpose] = on_submitted


def transaction_enqueue(*, purpose: str, to: str, data: str, agreement_id=None, context: dict | None = None,
                        confirmations: int | None = None) -> ChainTransaction:
    """Create the row inside the caller's DB transaction; it is submitted after that transaction commits."""
    tx = ChainTransaction.objects.create(
        purpose=purpose, agreement_id=agreement_id, to_address=to, data=data, chain_id=settings.CHAIN_ID,
        confirmations_required=confirmations or settings.CHAIN_CONFIRMATIONS, context=context or {},
    )
    _submit_after_commit(tx.pk)
    return tx


def _submit_after_commit(tx_id) -> None:
    from escrow.tasks import submit_transaction

    # robust: with the broker down the request still succeeds; the row stays queued and the sweeper sends it.
    transaction.on_commit(lambda: submit_transaction.delay(str(tx_id)), robust=True)


def _relayer_locked() -> RelayerAccount:
    address = chain.relayer_account().address
    relayer = RelayerAccount.objects.select_for_update().filter(address=address, chain_id=settings.CHAIN_ID).first()
    if relayer is not None:
        return relayer
    try:
        with transaction.atomic():
            RelayerAccount.objects.create(address=address, chain_id=settings.CHAIN_ID,
                                          next_nonce=chain.pending_nonce(address))
    except IntegrityError:
        pass  # created concurrently
    return RelayerAccount.objects.select_for_update().get(address=address, chain_id=settings.CHAIN_ID)


def _fail(tx: ChainTransaction, reason: str) -> None:
    tx.status = TxStatus.FAILED
    tx.failure_reason = reason[:500]
    tx.save(update_fields=["status", "failure_reason", "updated_at"])
    _apply_outcome(tx)


def _apply_outcome(tx: ChainTransaction) -> None:
    if tx.outcome_applied:
        return
    handler = _outcome_handlers.get(tx.purpose)
    if handler is not None:
        handler(tx)
    tx.outcome_applied = True
    tx.save(update_fields=["outcome_applied", "updated_at"])


def _new_attempt(tx: ChainTransaction, fees: chain.Fees) -> TxAttempt:
    signed = chain.sign(to=tx.to_address, data=tx.data, nonce=tx.nonce, gas=tx.gas_limit, fees=fees)
    return TxAttempt.objects.create(
        transaction=tx, tx_hash=signed.tx_hash, raw_transaction=signed.raw, nonce=tx.nonce,
        max_fee_per_gas=fees.max_fee_per_gas, max_priority_fee_per_gas=fees.max_priority_fee_per_gas,
    )


def _broadcast(attempt: TxAttempt) -> None:
    """Broadcast and record the outcome; a failure is left for `transaction_check` to retry."""
    try:
        chain.broadcast(attempt.raw_transaction)
    except chain.ChainError as error:
        logger.warning("broadcast failed", extra={"tx_hash": attempt.tx_hash, "error": str(error)})
        TxAttempt.objects.filter(pk=attempt.pk).update(broadcast_error=f"{type(error).__name__}: {error}"[:500])
        return
    TxAttempt.objects.filter(pk=attempt.pk).update(broadcast_at=timezone.now(), broadcast_error="")


def _logs_name_the_agreement(function):
    """Log records of work on one transaction carry its agreement's id."""
    @functools.wraps(function)
    def wrapper(*, transaction_id):
        agreement_id = (ChainTransaction.objects.filter(pk=transaction_id)
                        .values_list("agreement_id", flat=True).first())
        with agreement_context(agreement_id):
            return function(transaction_id=transaction_id)

    return wrapper


@_logs_name_the_agreement
def transaction_submit(*, transaction_id) -> ChainTransaction | None:
    """Queued -> submitted. A no-op for any other status, so it is safe to run twice."""
    with transaction.atomic():
        tx = ChainTransaction.objects.select_for_update().filter(pk=transaction_id, status=TxStatus.QUEUED).first()
        if tx is None:
            return None
        sender = chain.relayer_account().address
        try:
            gas = chain.simulate(sender=sender, to=tx.to_address, data=tx.data)
        except chain.Reverted as reverted:
            _fail(tx, reverted.reason)
            return tx
        fees = chain.current_fees()
        relayer = _relayer_locked()
        tx.relayer = relayer
        tx.nonce = relayer.next_nonce
        tx.gas_limit = gas * (100 + _GAS_HEADROOM_PERCENT) // 100
        relayer.next_nonce += 1
        relayer.save(update_fields=["next_nonce"])
        attempt = _new_attempt(tx, fees)
        tx.status = TxStatus.SUBMITTED
        tx.save(update_fields=["relayer", "nonce", "gas_limit", "status", "updated_at"])
        if tx.purpose in _submitted_handlers:
            _submitted_handlers[tx.purpose](tx)
    _broadcast(attempt)
    return tx


def _record_mined(tx: ChainTransaction, attempt: TxAttempt, found: chain.Receipt) -> None:
    tx.status = TxStatus.MINED
    tx.mined_tx_hash = attempt.tx_hash
    tx.mined_block_number = found.block_number
    tx.mined_block_hash = found.block_hash
    tx.receipt_status = found.status
    tx.save(update_fields=["status", "mined_tx_hash", "mined_block_number", "mined_block_hash", "receipt_status",
                           "updated_at"])


def _forget_mined(tx: ChainTransaction) -> None:
    logger.warning("reorg: mined block no longer canonical", extra={"tx_id": str(tx.pk),
                                                                     "block": tx.mined_block_number})
    tx.status = TxStatus.SUBMITTED
    tx.mined_tx_hash = tx.mined_block_hash = ""
    tx.mined_block_number = tx.receipt_status = None
    tx.save(update_fields=["status", "mined_tx_hash", "mined_block_number", "mined_block_hash", "receipt_status",
                           "updated_at"])


def _settle_if_deep_enough(tx: ChainTransaction, latest: int) -> None:
    if latest - tx.mined_block_number + 1 < tx.confirmations_required:
        return
    if tx.receipt_status == 1:
        tx.status = TxStatus.CONFIRMED
        tx.confirmed_at = timezone.now()
        tx.save(update_fields=["status", "confirmed_at", "updated_at"])
        _apply_outcome(tx)
    else:
        _fail(tx, chain.revert_reason(sender=tx.relayer.address, to=tx.to_address, data=tx.data,
                                      block_number=tx.mined_block_number))


def _resync_nonce(tx: ChainTransaction) -> None:
    """Our nonce was consumed by a transaction that is none of ours: take a fresh one."""
    relayer = RelayerAccount.objects.select_for_update().get(pk=tx.relayer_id)
    relayer.next_nonce = max(relayer.next_nonce, chain.pending_nonce(relayer.address))
    relayer.save(update_fields=["next_nonce"])
    # None of these hashes can ever be mined now (their nonce is spent), so they are not worth checking.
    tx.attempts.all().delete()
    tx.status, tx.nonce = TxStatus.QUEUED, None
    tx.save(update_fields=["status", "nonce", "updated_at"])
    _submit_after_commit(tx.pk)


@_logs_name_the_agreement
def transaction_check(*, transaction_id) -> ChainTransaction | None:
    """Advance a submitted or mined transaction by what the chain says now. Safe to run twice or concurrently."""
    with transaction.atomic():
        tx = (ChainTransaction.objects.select_for_update(skip_locked=True, of=("self",)).select_related("relayer")
              .filter(pk=transaction_id, status__in=[TxStatus.SUBMITTED, TxStatus.MINED]).first())
        if tx is None:
            return None
        latest = chain.latest_block_number()
        if tx.status == TxStatus.MINED:
            if chain.canonical_block_hash(tx.mined_block_number) == tx.mined_block_hash:
                _settle_if_deep_enough(tx, latest)
                return tx
            _forget_mined(tx)
        attempts = list(tx.attempts.all())
        for attempt in attempts:
            found = chain.receipt(attempt.tx_hash)
            if found is not None:
                _record_mined(tx, attempt, found)
                _settle_if_deep_enough(tx, latest=max(latest, found.block_number))
                return tx
        last = attempts[-1]
        now = timezone.now()
        if now - last.created_at >= settings.CHAIN_REPLACE_AFTER:
            fees = chain.Fees(last.max_fee_per_gas, last.max_priority_fee_per_gas).bumped(
                settings.CHAIN_FEE_BUMP_PERCENT, settings.CHAIN_MAX_FEE_PER_GAS)
            resend = _new_attempt(tx, fees)
        elif last.broadcast_at is None or now - last.broadcast_at >= settings.CHAIN_REBROADCAST_AFTER:
            resend = last
        else:
            return tx
        try:
            chain.broadcast(resend.raw_transaction)
        except chain.NonceTooLow:
            # No receipt for any of our hashes, yet the nonce is used: someone else used this key's nonce.
            _resync_nonce(tx)
            return tx
        except chain.ChainError as error:
            TxAttempt.objects.filter(pk=resend.pk).update(broadcast_error=f"{type(error).__name__}: {error}"[:500])
            return tx
        TxAttempt.objects.filter(pk=resend.pk).update(broadcast_at=now, broadcast_error="")
        return tx


def transactions_poll() -> int:
    """Check every in-flight transaction (the beat task). Returns how many were looked at."""
    pending = list(ChainTransaction.objects.filter(status__in=[TxStatus.SUBMITTED, TxStatus.MINED])
                   .order_by("updated_at").values_list("pk", flat=True)[:500])
    for tx_id in pending:
        try:
            transaction_check(transaction_id=tx_id)
        except chain.RpcUnavailable:
            logger.warning("chain RPC unavailable while polling; will retry")
            break
    return len(pending)


def transactions_sweep_queued() -> int:
    """Re-enqueue rows stuck in queued (their task message was lost, or never sent while the broker was down)."""
    from escrow.tasks import submit_transaction

    cutoff = timezone.now() - settings.CHAIN_SWEEP_AFTER
    stuck = list(ChainTransaction.objects.filter(status=TxStatus.QUEUED, updated_at__lt=cutoff)
                 .values_list("pk", flat=True)[:500])
    for tx_id in stuck:
        submit_transaction.delay(str(tx_id))
    return len(stuck)


def transaction_retry(*, tx: ChainTransaction) -> ChainTransaction:
    """Operator action: a failed transaction is queued again as a new row (the failed one stays for history)."""
    with transaction.atomic():
        return transaction_enqueue(purpose=tx.purpose, to=tx.to_address, data=tx.data,
                                   agreement_id=tx.agreement_id, context=tx.context,
                                   confirmations=tx.confirmations_required)
