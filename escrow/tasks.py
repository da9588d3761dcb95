"""Thin Celery wrappers around the relayer. Tasks pass ids only and are safe to run twice."""

import logging

from celery import shared_task

from escrow import chain, fees, indexer, purchases, relayer, settlement

logger = logging.getLogger(__name__)


# Retries end (2 + 4 + 8 s) before the sweep sends a row still queued again (CHAIN_SWEEP_AFTER): retries outlasting
# it added a chain of them per row at every sweep while the node was down.
@shared_task(autoretry_for=(chain.RpcUnavailable,), retry_backoff=2, max_retries=3)
def submit_transaction(transaction_id: str) -> None:
    relayer.transaction_submit(transaction_id=transaction_id)


@shared_task
def poll_confirmations() -> int:
    return relayer.transactions_poll()


@shared_task
def sweep_queued() -> int:
    return relayer.transactions_sweep_queued()


@shared_task(autoretry_for=(chain.RpcUnavailable,), retry_backoff=5, max_retries=3)
def settlement_tick() -> dict:
    return settlement.settlement_tick()


@shared_task(autoretry_for=(chain.RpcUnavailable,), retry_backoff=5, max_retries=3)
def pay_fees() -> str | None:
    tx = fees.fees_pay()
    return str(tx.pk) if tx else None


@shared_task(autoretry_for=(chain.RpcUnavailable,), retry_backoff=5, max_retries=3)
def masumi_purchases_tick() -> dict:
    return purchases.purchases_tick()


@shared_task
def purge_expired_payment_requests() -> int:
    return purchases.expired_payment_requests_purge()


# On the outbound queue. Killed at its time limit, its steps are claimed or repeatable: the next tick goes on.
@shared_task(autoretry_for=(chain.RpcUnavailable,), retry_backoff=5, max_retries=3, time_limit=600)
def masumi_jobs_tick() -> dict:
    return purchases.purchases_jobs_tick()


# A bounded slice per run (the beat comes back in INDEXER_POLL_SECONDS); a second run meanwhile is a no-op.
INDEX_RANGES_PER_TASK = 20


@shared_task
def index_chain() -> dict:
    try:
        return indexer.index_pass(max_ranges=INDEX_RANGES_PER_TASK).as_dict()
    except chain.RpcUnavailable as error:  # the beat runs it again shortly; the cursor shows the error meanwhile
        logger.warning("chain RPC unavailable while indexing; will retry", extra={"error": str(error)})
        return {"error": str(error)}
