"""What operators watch of the escrow: chain transactions in Prometheus and on the admin dashboard."""

from collections import Counter

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


def _failures(limit: int) -> list[dashboard.Failure]:
    return [dashboard.Failure(at=tx.updated_at, kind=f"chain transaction {tx.purpose} failed",
                              subject=str(tx.agreement_id or tx.pk), reason=tx.failure_reason,
                              admin_url=reverse("admin:escrow_chaintransaction_change", args=[tx.pk]))
            for tx in selectors.transactions_failed_recently(limit=limit)]


metrics.scrape_collector_register(
    name="marketplace_chain_transactions",
    documentation="Relayer chain transactions by purpose and status (counted at scrape time).",
    labels=("purpose", "status"), counts=selectors.transaction_counts_by_purpose_and_status)
metrics.scrape_collector_register(
    name="marketplace_chain_transactions_stuck_at_fee_cap",
    documentation="Submitted chain transactions whose fees reached CHAIN_MAX_FEE_PER_GAS_WEI: the same bytes are "
                  "rebroadcast until mined (top the relayer up, or wait for lower base fees).",
    labels=("purpose",), counts=selectors.transaction_counts_stuck_at_fee_cap)
dashboard.counts_register(title="Chain transactions by status", counts=_by_status)
dashboard.failures_register(recent=_failures)
health.readiness_check_register(name="chain", check=_chain_answers)
