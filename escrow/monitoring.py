"""What operators watch of the escrow: chain transactions in Prometheus and on the admin dashboard."""

from django.conf import settings
from django.urls import reverse
from django.utils import timezone

from escrow import chain, relayer, selectors
from escrow.models import ChainTransaction, TxPurpose, TxStatus
from marketplace import chainconfig, dashboard, health, metrics, money

# How the dashboard names a proposal the ticks gave up on (`selectors.proposals_given_up`).
_PROPOSAL_KINDS = {TxPurpose.PROPOSE_SETTLEMENT: "settlement proposal",
                   TxPurpose.MASUMI_REFUND_PROPOSAL: "masumi refund proposal", TxPurpose.RESOLVE: "dispute resolution"}

def _chain_answers(timeout: float) -> None:
    chain.latest_block_number()  # bounded by CHAIN_RPC_TIMEOUT; /readyz stops waiting after its own timeout


def _relayer_keys_usable(timeout: float) -> None:
    """The relayer's key and the retired ones are well-formed: a malformed one signs nothing (the current: no
    transaction; a retired one: what its wallet has in flight is never replaced, and its transfers are not indexed)."""
    problems = chainconfig.signing_key_problems("RELAYER_PRIVATE_KEY")
    if problems:
        raise RuntimeError("; ".join(problems))


def _payouts_can_be_released(timeout: float) -> None:
    """Under PAYOUT_HEAD_TAG the node must answer its tagged block: otherwise no payout or refund of the treasury is
    ever sent (held, not lost), which a deployment must not go live with unnoticed."""
    blocker = selectors.payout_release_blocker()
    if blocker:
        raise RuntimeError(f"payouts and refunds cannot be released: {blocker}")


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
    failures += [dashboard.Failure(at=fill.confirmed_at, kind="nonce fill outrun by the bytes it cancels",
                                   subject=str(fill.context.get(relayer.CANCELS)),
                                   reason=f"tx {fill.mined_tx_hash} ran in the fill's place",
                                   admin_url=_tx_url(fill))
                 for fill in selectors.nonce_fills_outrun().reverse()[:limit]]
    failures += [dashboard.Failure(at=event.created_at, kind="escrow payout deferred",
                                   subject=str(event.agreement_id),
                                   reason=f"the token refused {event.args['amount']} base units to "
                                          f"{event.args['party']}: claimable in the escrow until withdrawn",
                                   admin_url=reverse("admin:escrow_chainevent_change", args=[event.pk]))
                 for event in selectors.payouts_deferred()[:limit]]
    return failures


def _tx_url(tx) -> str:
    return reverse("admin:escrow_chaintransaction_change", args=[tx.pk])


def _overdue(now) -> list[dashboard.Overdue]:
    """Transactions unconfirmed for too long, those stuck at the fee cap or refused for the relayer's gas, those whose
    outcome the node leaves undecided, and settlement proposals given up on."""
    at_cap = list(selectors.transactions_at_fee_cap()
                  [:dashboard.OVERDUE_LIMIT])
    items = [dashboard.Overdue(since=tx.updated_at, kind=f"{tx.purpose} stuck at the fee cap",
                               subject=str(tx.agreement_id or tx.pk),
                               detail=f"bids the cap of {settings.CHAIN_MAX_FEE_PER_GAS / 10**9:g} gwei; "
                                      f"rebroadcast only", admin_url=_tx_url(tx)) for tx in at_cap]
    unfunded = list(selectors.transactions_unfunded()[:dashboard.OVERDUE_LIMIT])
    items += [dashboard.Overdue(since=tx.updated_at, kind=f"{tx.purpose} refused: the relayer's wallet cannot pay its gas",
                                subject=str(tx.agreement_id or tx.pk),
                                detail=f"top up {tx.relayer.address}: nonce {tx.nonce} and those after it wait, "
                                       "sent again as signed", admin_url=_tx_url(tx)) for tx in unfunded]
    undecided = list(selectors.transactions_undecided().filter(
        undecided_since__lt=now - settings.OVERDUE_SUBMITTING_AFTER)[:dashboard.OVERDUE_LIMIT])
    items += [dashboard.Overdue(since=tx.undecided_since, kind=f"{tx.purpose} outcome undecided",
                                subject=str(tx.agreement_id or tx.context.get("invocation_id") or tx.pk),
                                detail=f"{tx.undecided_reason}; read again at each poll, nothing guessed: a node that "
                                       "keeps the logs (CHAIN_RPC_URL) decides it", admin_url=_tx_url(tx))
              for tx in undecided]
    capped = {tx.pk for tx in at_cap + unfunded + undecided}
    items += [dashboard.Overdue(since=tx.updated_at, kind=f"{tx.purpose} of a relayer key not configured",
                                subject=str(tx.agreement_id or tx.pk),
                                detail=f"{tx.relayer.address}'s key is in neither RELAYER_PRIVATE_KEY nor "
                                       "RELAYER_RETIRED_PRIVATE_KEYS: rebroadcast only, never replaced or cancelled",
                                admin_url=_tx_url(tx))
              for tx in selectors.transactions_of_unconfigured_relayers()[:dashboard.OVERDUE_LIMIT]]
    items += [dashboard.Overdue(since=tx.updated_at, kind=f"{tx.purpose} {tx.status}, not confirmed",
                                subject=str(tx.agreement_id or tx.pk),
                                detail=f"nonce {tx.nonce}" if tx.nonce is not None else
                                "; ".join(filter(None, ["no nonce yet", tx.submit_error])),
                                admin_url=_tx_url(tx))
              for tx in selectors.transactions_unconfirmed_since(before=now - settings.OVERDUE_SUBMITTING_AFTER)
              [:dashboard.OVERDUE_LIMIT] if tx.pk not in capped]
    items += [dashboard.Overdue(since=tx.updated_at, kind=_proposal_given_up_kind(tx, failures),
                                subject=str(tx.agreement_id), detail=tx.failure_reason, admin_url=_tx_url(tx))
              for tx, failures in selectors.proposals_given_up(limit=dashboard.OVERDUE_LIMIT)]
    return _payouts_unreleasable(now) + items + _payouts_held_too_long(now) + _disputes_timing_out(now)


def _proposal_given_up_kind(tx, failures: int) -> str:
    if selectors.proposal_unsignable([tx]):
        return f"{_PROPOSAL_KINDS[tx.purpose]} not signed: its receipt signer's key is not kept"
    return f"{_PROPOSAL_KINDS[tx.purpose]} failed {failures} times, not retried"


def _disputes_timing_out(now) -> list[dashboard.Overdue]:
    """Disputes within DISPUTE_TIMEOUT_WARNING of their on-chain timeout, due since they entered it: unresolved by
    then, the buyer gets the whole deposit back, whatever the seller was owed."""
    warning = settings.DISPUTE_TIMEOUT_WARNING
    return [dashboard.Overdue(since=dispute.times_out_at - warning,
                              kind=f"dispute times out: {selectors.dispute_time_left(dispute, now=now)}",
                              subject=str(dispute.pk),
                              detail=f"times out about {dispute.times_out_at:%Y-%m-%d %H:%M:%S %Z}; "
                                     + ("a resolution was submitted" if dispute.resolving else
                                        "resolve it, or the buyer gets the whole deposit back"),
                              admin_url=reverse("admin:escrow_dispute_resolve", args=[dispute.pk]))
            for dispute in selectors.disputes_timing_out(before=now + warning)[:dashboard.OVERDUE_LIMIT]]


def _disputes_open() -> dict[tuple, int]:
    return {(): selectors.disputes().count()}


def _disputes_timing_out_count() -> dict[tuple, int]:
    return {(): selectors.disputes_timing_out(before=timezone.now() + settings.DISPUTE_TIMEOUT_WARNING).count()}


def _payouts_unreleasable(now) -> list[dashboard.Overdue]:
    """The node does not answer its PAYOUT_HEAD_TAG block: every payout waiting for its payment's finality waits on."""
    blocker = selectors.payout_release_blocker()
    if not blocker:
        return []
    held = selectors.transactions_waiting_for_finality()
    oldest = held.order_by("created_at").first()
    return [dashboard.Overdue(since=oldest.created_at if oldest else now,
                              kind="Payouts and refunds cannot be released", subject=f"{held.count()} held",
                              detail=blocker, admin_url=reverse("admin:escrow_chaintransaction_changelist")
                              + "?held_until_block__isempty=0&status__exact=queued")]


def _payouts_held_too_long(now) -> list[dashboard.Overdue]:
    """Held for their payment's finality longer than finality takes: the node's tag stalled, or it is wrong."""
    return [dashboard.Overdue(since=tx.created_at, kind=f"{tx.purpose} held for its payment's finality",
                              subject=str(tx.agreement_id or tx.context.get("invocation_id") or tx.pk),
                              detail=selectors.finality_wait_of(tx=tx), admin_url=_tx_url(tx))
            for tx in selectors.transactions_held_since(before=now - settings.PAYOUT_HELD_OVERDUE_AFTER)
            [:dashboard.OVERDUE_LIMIT]]


def _gauges() -> list[dashboard.Gauge]:
    gas_warn = money.native_units(settings.RELAYER_GAS_WARN_WEI)
    float_warn = money.token_units(settings.TREASURY_USDC_WARN_ATOMIC)
    try:
        balances = selectors.platform_wallet_balances()
    except (chain.ChainError, ValueError) as exc:
        return [dashboard.Gauge("Relayer gas", "-", gas_warn, None, f"chain unreachable: {exc}"),
                dashboard.Gauge("Treasury USDC float", "-", float_warn, None, f"chain unreachable: {exc}")]
    return [
        dashboard.Gauge("Relayer gas", money.native_units(balances["gas_wei"]), gas_warn,
                        balances["gas_wei"] >= settings.RELAYER_GAS_WARN_WEI, "pays for every transaction"),
        dashboard.Gauge("Treasury USDC float", money.token_units(balances["usdc"]), float_warn,
                        balances["usdc"] >= settings.TREASURY_USDC_WARN_ATOMIC,
                        "pays invocation payouts, refunds and returned fees"),
    ]


def panels_register() -> None:
    """Called once, from the AppConfig.ready(): metrics, dashboard panels and readiness checks."""
    metrics.scrape_collector_register(
        name="marketplace_chain_transactions",
        documentation="Relayer chain transactions by purpose and status (counted at scrape time).",
        labels=("purpose", "status"), counts=selectors.transaction_counts_by_purpose_and_status)
    metrics.scrape_collector_register(
        name="marketplace_chain_transactions_stuck_at_fee_cap",
        documentation="Submitted chain transactions whose fees reached CHAIN_MAX_FEE_PER_GAS_WEI: the same bytes are "
                      "rebroadcast until mined (top the relayer up, or wait for lower base fees).",
        labels=("purpose",), counts=selectors.transaction_counts_stuck_at_fee_cap)
    metrics.scrape_collector_register(
        name="marketplace_chain_transactions_unfunded",
        documentation="Submitted chain transactions the node refused because the relayer's wallet cannot pay their "
                      "gas: their signed bytes are sent again, not bid up, until the wallet is topped up.",
        labels=("purpose",), counts=selectors.transaction_counts_unfunded)
    metrics.scrape_collector_register(
        name="marketplace_chain_transactions_undecided",
        documentation="Chain transactions whose outcome the node's answers cannot decide (the token counts a payment's "
                      "authorization spent, yet shows no log of it: a backend behind, old logs pruned): read again at "
                      "each poll, nothing guessed, until a node that keeps the logs answers.",
        labels=("purpose",), counts=selectors.transaction_counts_undecided)
    metrics.scrape_collector_register(
        name="marketplace_chain_transactions_waiting_for_finality",
        documentation="Queued payouts and refunds held until the block of the payment they forward is at or below "
                      "the node's PAYOUT_HEAD_TAG block (one growing while no block finalizes: the node's tag stalled).",
        labels=("purpose",), counts=selectors.transaction_counts_waiting_for_finality)
    metrics.scrape_collector_register(
        name="marketplace_payouts_releasable",
        documentation="1 when the node answers its PAYOUT_HEAD_TAG block (or no tag is set), 0 when it does not: no "
                      "payout or refund waiting for its payment's finality is sent then (asked at scrape time).",
        labels=(), counts=lambda: {(): 0 if selectors.payout_release_blocker() else 1})
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
    metrics.scrape_collector_register(
        name="marketplace_disputes_open",
        documentation="Disputes waiting for the arbiter (the operators) to resolve them.",
        labels=(), counts=_disputes_open)
    metrics.scrape_collector_register(
        name="marketplace_disputes_timing_out",
        documentation="Open disputes within DISPUTE_TIMEOUT_WARNING_SECONDS of their on-chain timeout (or past it, the "
                      "settlement tick's finalize pending): unresolved then, the buyer gets the whole deposit back.",
        labels=(), counts=_disputes_timing_out_count)
    dashboard.counts_register(title="Chain transactions by status", counts=lambda: dashboard.counts_up_to_limit(
        ChainTransaction.objects, field="status", values=TxStatus.values))
    dashboard.counts_register(title="Payouts and refunds waiting for their payment's finality",
                              counts=lambda: {purpose: count for (purpose,), count
                                              in selectors.transaction_counts_waiting_for_finality().items()})
    dashboard.failures_register(recent=_failures)
    dashboard.overdue_register(overdue=_overdue)
    dashboard.gauges_register(gauges=_gauges)
    health.readiness_check_register(name="chain", check=_chain_answers)
    health.readiness_check_register(name="indexer", check=_indexer_keeps_up)
    health.readiness_check_register(name="payout_finality", check=_payouts_can_be_released)
    health.readiness_check_register(name="relayer_keys", check=_relayer_keys_usable)
