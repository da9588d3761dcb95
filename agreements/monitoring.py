"""What operators watch of agreements: Prometheus metrics and the admin dashboard's panels."""

from datetime import UTC, datetime
from functools import lru_cache

from django.conf import settings
from django.core import checks
from django.db import DatabaseError
from django.urls import reverse
from django.utils import timezone
from prometheus_client import Counter, Histogram

from agreements import selectors
from agreements.models import CLOSED_PROPOSAL_LATE_USE_MARGIN_SECONDS, AgreementStatus, SkillInvocation, UsageAgreement
from marketplace import chainconfig, dashboard, health, metrics, money, url_credentials

PROXY_UPSTREAM_SECONDS = Histogram(
    "marketplace_proxy_upstream_seconds", "Time the seller's upstream took to answer a proxied call (headers), "
    "by outcome: ok (< 500), error (5xx), timeout, unreachable, blocked (address not allowed).", ["outcome"],
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60))
CHARGES = Counter("marketplace_charges_total", "Usage events charged to escrows, by source (proxy or "
                  "seller_report).", ["source"])
CHARGES_COMBINED = Histogram(
    "marketplace_proxy_charges_combined", "Proxied calls of one agreement charged together by one process (one row "
    "lock and one write for them all), per batch of more than one.", buckets=(2, 4, 8, 16, 32, 64))
CHARGED = Counter("marketplace_charged_base_units_total", "Amount charged to escrows in token base units "
                  "(USDC: 1000000 = 1 USDC), by source and token.", ["source", "token"])


# A metric's child per label values, looked up once: `labels()` checks and locks on every call (5% of a proxied
# call's samples in py-spy). The label values are few: sources, tokens, outcomes.
@lru_cache(maxsize=256)
def _child(metric, *values: str):
    return metric.labels(*values)


def upstream_observe(*, outcome: str, seconds: float) -> None:
    _child(PROXY_UPSTREAM_SECONDS, outcome).observe(seconds)


def charges_observe(*, source: str, token: str, events: int, amount: int) -> None:
    """Call once the charge is committed."""
    _child(CHARGES, source).inc(events)
    _child(CHARGED, source, token).inc(amount)


def charges_combined_observe(calls: int) -> None:
    CHARGES_COMBINED.observe(calls)


def _failures(limit: int) -> list[dashboard.Failure]:
    failures = [dashboard.Failure(at=agreement.updated_at, kind=f"agreement {agreement.status}",
                                  subject=str(agreement.pk), reason=agreement.status_reason,
                                  admin_url=reverse("admin:agreements_usageagreement_change", args=[agreement.pk]))
                for agreement in selectors.agreements_failed_recently(limit=limit)]
    failures += [dashboard.Failure(at=delivery.created_at, kind="webhook delivery failed",
                                   subject=f"{delivery.event_type} → "
                                           f"{url_credentials.path_masked(delivery.subscription.url)}",
                                   reason=delivery.last_error,
                                   admin_url=reverse("admin:agreements_webhookdelivery_change", args=[delivery.pk]))
                 for delivery in selectors.webhook_deliveries_failed_recently(limit=limit)]
    failures += [dashboard.Failure(at=invocation.payment_reverted_at, kind="skill invocation payment reverted",
                                   subject=f"{invocation.public_id} ({invocation.skill.name} of "
                                           f"{invocation.seller.handle}, {invocation.money})",
                                   reason=invocation.payment_reverted_reason,
                                   admin_url=reverse("admin:agreements_skillinvocation_change", args=[invocation.pk]))
                 for invocation in selectors.payments_reverted(of=SkillInvocation).reverse()[:limit]]
    failures += [dashboard.Failure(at=agreement.payment_reverted_at, kind="direct purchase payment reverted",
                                   subject=f"{agreement.pk} ({agreement.service.name} of {agreement.seller.handle})",
                                   reason=agreement.payment_reverted_reason, admin_url=_agreement_url(agreement))
                 for agreement in selectors.payments_reverted(of=UsageAgreement).reverse()[:limit]]
    failures += [dashboard.Failure(at=agreement.settled_at, kind="escrow reclaimed with the seller unpaid",
                                   subject=str(agreement.pk), reason=agreement.status_reason,
                                   admin_url=_agreement_url(agreement))
                 for agreement in selectors.agreements_reclaimed_with_seller_unpaid()[:limit]]
    failures += [dashboard.Failure(at=agreement.updated_at, kind="settlement proposed above the recorded usage",
                                   subject=str(agreement.pk), reason=_above_usage_detail(agreement),
                                   admin_url=_agreement_url(agreement))
                 for agreement in selectors.agreements_proposed_above_their_usage()[:limit]]
    failures += [dashboard.Failure(at=agreement.settled_at, kind="escrow settled below the usage charged",
                                   subject=str(agreement.pk),
                                   reason=f"the escrow paid the seller {agreement.seller_payout} of the {agreement.used} "
                                          f"base units charged: receipt {agreement.proposed_seq} of "
                                          f"{agreement.usage_seq} was the last proposed",
                                   admin_url=_agreement_url(agreement))
                 for agreement in selectors.agreements_settled_below_their_usage()[:limit]]
    return failures


def _above_usage_detail(agreement) -> str:
    paid = agreement.seller_payout if agreement.status == AgreementStatus.SETTLED else None
    amount = f"paid the seller {paid}" if paid is not None else f"proposed {agreement.proposed_amount}"
    return f"{agreement.status}: {amount} base units on-chain, usage recorded {agreement.used}"


def _agreement_url(agreement) -> str:
    return reverse("admin:agreements_usageagreement_change", args=[agreement.pk])


def _stuck_detail(agreement) -> str:
    if agreement.status == AgreementStatus.SETTLING:
        return "finalize not confirmed"
    if agreement.activation_tx_hash:
        return f"activation transaction {agreement.activation_tx_hash}"
    return "no transaction hash yet"


def _overdue(now) -> list[dashboard.Overdue]:
    """Past the challenge deadline and not finalized; submitting or settling for too long; a direct purchase's
    authorization the node leaves undecided past its validBefore."""
    late = selectors.agreements_in_challenge_past_deadline(deadline_before=now - settings.OVERDUE_FINALIZE_AFTER)
    items = [dashboard.Overdue(since=agreement.challenge_deadline, kind="challenge window over, not finalized",
                               subject=str(agreement.pk),
                               detail=f"deadline passed; used {money.token_units(agreement.used, agreement.token)}",
                               admin_url=_agreement_url(agreement))
             for agreement in late[:dashboard.OVERDUE_LIMIT]]
    stuck = selectors.agreements_unchanged_since(statuses=[AgreementStatus.SUBMITTING, AgreementStatus.SETTLING],
                                                 before=now - settings.OVERDUE_SUBMITTING_AFTER)
    items += [dashboard.Overdue(since=agreement.updated_at, kind=f"stuck {agreement.status}",
                                subject=str(agreement.pk), detail=_stuck_detail(agreement),
                                admin_url=_agreement_url(agreement))
              for agreement in stuck[:dashboard.OVERDUE_LIMIT]]
    items += [dashboard.Overdue(since=ran_out, kind="direct purchase's authorization undecided",
                                subject=str(agreement.pk),
                                detail=f"{'proposed' if agreement.status == AgreementStatus.PROPOSED else 'watched'} "
                                       "past its validBefore: the node shows no verdict on its use (spent, yet no log "
                                       "of it: a node without old logs?); nothing recorded until one does",
                                admin_url=_agreement_url(agreement))
              for agreement, ran_out in _direct_authorizations_undecided(now)]
    return items


def _direct_authorizations_undecided(now) -> list[tuple[UsageAgreement, datetime]]:
    """The first of `_direct_authorizations_watched_past`, with when each ran out."""
    return [(agreement, datetime.fromtimestamp(agreement.payment_authorization.valid_before
                                               + CLOSED_PROPOSAL_LATE_USE_MARGIN_SECONDS, tz=UTC))
            for agreement in _direct_authorizations_watched_past(now)[:dashboard.OVERDUE_LIMIT]]


def _direct_authorizations_watched_past(now):
    """`selectors.direct_authorizations_watched_past` for more than OVERDUE_SUBMITTING_AFTER."""
    margin = CLOSED_PROPOSAL_LATE_USE_MARGIN_SECONDS + int(settings.OVERDUE_SUBMITTING_AFTER.total_seconds())
    return selectors.direct_authorizations_watched_past(ran_out_before=int(now.timestamp()) - margin)


def _usdc(amount: int) -> str:
    return money.token_units(amount, "USDC")


def _payments_reverted_gauge_register(*, name: str, documentation: str,
                                      of: type[SkillInvocation] | type[UsageAgreement]) -> None:
    metrics.scrape_collector_register(
        name=name, documentation=documentation, labels=("acknowledged",),
        counts=lambda: {(str(acknowledged).lower(),): count
                        for acknowledged, count in selectors.payments_reverted_counts(of=of).items()})


def _receipt_signers_configured(timeout: float) -> None:
    """Every open escrow's receipt signer has its key configured (a retired one taken out too early leaves their
    usage uncharged), and no configured key is malformed."""
    problems = chainconfig.signing_key_problems("RECEIPT_SIGNER_PRIVATE_KEY") + [
        f"{escrows} open escrow(s) name receipt signer {signer}, whose key is not configured"
        for signer, escrows in selectors.escrows_naming_unconfigured_signers().items()]
    if problems:
        raise RuntimeError("; ".join(problems))


def receipt_signers_check(app_configs=None, databases=None, **kwargs) -> list[checks.CheckMessage]:
    """Django system check, with `--database`: no open escrow names a receipt signer whose key is configured nowhere
    (E003: its usage cannot be charged)."""
    if not databases:
        return []
    try:
        unconfigured = selectors.escrows_naming_unconfigured_signers()
    except DatabaseError:
        # `migrate` runs the database checks before it migrates: the table, or its receipt_signer column, may not be
        # there yet (a fresh database, an upgrade). Nothing can name a signer then; /readyz and `reconcile` check the
        # migrated database.
        return []
    return [checks.Error(
        f"{escrows} open escrow(s) name receipt signer {signer}, whose key is configured neither as "
        "RECEIPT_SIGNER_PRIVATE_KEY nor in RECEIPT_SIGNER_RETIRED_PRIVATE_KEYS: their usage cannot be charged.",
        hint="Put the key back in RECEIPT_SIGNER_RETIRED_PRIVATE_KEYS until those escrows are settled.",
        obj=__name__, id="agreements.E003") for signer, escrows in unconfigured.items()]


def panels_register() -> None:
    """Called once, from the AppConfig.ready(): metrics, dashboard panels and readiness checks."""
    metrics.scrape_collector_register(
        name="marketplace_agreements", documentation="Usage agreements by status (counted at scrape time).",
        labels=("status",),
        counts=lambda: {(status,): count for status, count in selectors.agreement_counts_by_status().items()})
    _payments_reverted_gauge_register(
        name="marketplace_invocation_payments_reverted", of=SkillInvocation,
        documentation="Skill invocations whose payment a chain reorg took after their seller was called (the "
                      "treasury holds nothing for them), by whether an operator acknowledged them.")
    _payments_reverted_gauge_register(
        name="marketplace_direct_payments_reverted", of=UsageAgreement,
        documentation="Direct purchases whose payment a chain reorg took after they were counted paid (the seller "
                      "holds nothing for them), by whether an operator acknowledged them.")
    metrics.scrape_collector_register(
        name="marketplace_direct_authorizations_undecided",
        documentation="Direct purchases whose buyer's authorization is watched (or still proposed) past its "
                      "validBefore for more than OVERDUE_SUBMITTING_AFTER_SECONDS: the node shows no verdict on its "
                      "use (spent, yet no log of it: a node without old logs?), nothing recorded until one does (at "
                      "scrape time).",
        labels=(), counts=lambda: {(): _direct_authorizations_watched_past(timezone.now()).count()})
    dashboard.counts_register(title="Agreements by status", counts=lambda: dashboard.counts_up_to_limit(
        UsageAgreement.objects, field="status", values=AgreementStatus.values))
    dashboard.failures_register(recent=_failures)
    dashboard.overdue_register(overdue=_overdue)
    health.readiness_check_register(name="receipt_signer", check=_receipt_signers_configured)
    dashboard.series_register(title="Metered calls (usage events)",
                              series=lambda since, step: selectors.usage_calls_by_bucket(since=since, step=step))
    dashboard.series_register(title="Usage charged", unit=_usdc,
                              series=lambda since, step: selectors.usage_charged_by_bucket(since=since, step=step))
    dashboard.series_register(title="Volume (escrow deposits, direct payments, skill invocations)", unit=_usdc,
                              series=lambda since, step: selectors.volume_by_bucket(since=since, step=step))
