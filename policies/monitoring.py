"""What operators watch of policies: approval requests (pending ones wait for an owner)."""

from marketplace import dashboard, metrics
from policies import selectors
from policies.models import ApprovalRequest, ApprovalStatus


def panels_register() -> None:
    """Called once, from the AppConfig.ready(): metrics, dashboard panels and readiness checks."""
    metrics.scrape_collector_register(
        name="marketplace_approval_requests", documentation="Approval requests by status (counted at scrape time).",
        labels=("status",),
        counts=lambda: {(status,): count for status, count in selectors.approval_counts_by_status().items()})
    dashboard.counts_register(title="Approval requests by status", counts=lambda: dashboard.counts_up_to_limit(
        ApprovalRequest.objects, field="status", values=ApprovalStatus.values))
