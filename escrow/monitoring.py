"""What operators watch of the escrow: chain transactions in Prometheus and on the admin dashboard."""

from collections import Counter

from django.conf import settings
from django.urls import reverse

from escrow import chain, selectors
from marketplace import dashboard, health, metrics


def _by_status() -> dict[str, int]:
    totals = Counter()
    for (_purpose, status), count in selectors.transaction_counts_by_purpose_and_status().items():
        totals[status] += count
    return dict(totals)


def _chain_answers(timeout: float) -> None:
    chain.latest_block_number()  # bounded by CHAIN_RPC_TIMEOUT; /readyz stops waiting after its own timeout


def _indexer_keeps_up(timeout: float) -> None:
    lag = selectors.indexer_lag()
    if lag is not None and lag.lag > settings.INDEXER_MAX_LAG_BLOCKS:
        raise RuntimeError(f"the chain indexer is {lag.lag} blocks behind (limit {settings.INDEXER_MAX_LAG_BLOCKS})")


def _indexer_lag() -> dict[tuple, int]:
    """At scrape time; when the node does not answer, against the head the indexer last saw."""
    try:
        lag = selectors.indexer_lag()
    except chain.ChainError:
        lag = selectors.indexer_lag(ask_chain=False)
    return {} if lag is None else {(): lag.lag}


def _failures(limit: int) -> list[dashboard.Failure]:
    failures = [dashboard.Failure(at=tx.updated_at, kind=f"chain transaction {tx.purpose} failed",
                                  subject=str(tx.agreement_id or tx.pk), reason=tx.failure_reason,
                                  admin_url=reverse("admin:escrow_chaintransaction_change", args=[tx.pk]))
                for tx in selectors.transactions_failed_recently(limit=limit)]
    failures += [dashboard.Failure(at=event.created_at, kind=f"chain event {event.name} not applied",
                                   subject=str(event.agreement_id or event.tx_hash), reason=event.error,
                                   admin_url=reverse("admin:escrow_chainevent_change", args=[event.pk]))
                 for event in selectors.indexer_unapplied_events().order_by("-created_at")[:limit]]
    return failures


metrics.scrape_collector_register(
    name="marketplace_chain_transactions",
    documentation="Relayer chain transactions by purpose and status (counted at scrape time).",
    labels=("purpose", "status"), counts=selectors.transaction_counts_by_purpose_and_status)
metrics.scrape_collector_register(
    name="marketplace_indexer_lag_blocks",
    documentation="Blocks between the chain head and the last block the chain indexer applied (at scrape time).",
    labels=(), counts=_indexer_lag)
metrics.scrape_collector_register(
    name="marketplace_indexer_events",
    documentation="Contract events the chain indexer holds (reorged ones left out), by effect: applied, already "
                  "(the relayer's receipt came first), recorded (no state to change), failed (not applied).",
    labels=("effect",),
    counts=lambda: {(effect,): count for effect, count in selectors.indexer_event_counts_by_effect().items()})
dashboard.counts_register(title="Chain transactions by status", counts=_by_status)
dashboard.failures_register(recent=_failures)
health.readiness_check_register(name="chain", check=_chain_answers)
health.readiness_check_register(name="indexer", check=_indexer_keeps_up)
