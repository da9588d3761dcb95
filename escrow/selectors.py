import threading
import time
import uuid
from dataclasses import dataclass
from datetime import timedelta
from enum import StrEnum

from django.conf import settings
from django.utils.timesince import timesince, timeuntil
from django.db.models import (Count, DateTimeField, Exists, ExpressionWrapper, F, OuterRef, Q, Subquery, Sum,
                              Value)
from django.db.models.functions import Coalesce, Least, Length
from web3 import Web3

from agreements import services as agreement_services
from agreements.models import (AgreementEvent, AgreementStatus, InvocationMoney, SettlementModel, SkillInvocation,
                               UsageAgreement, is_paid_out)
from escrow import chain, relayer
from escrow.models import (ChainEvent, ChainTransaction, Dispute, EventEffect, IndexerCursor, MasumiPaymentRequest,
                           MasumiPurchase, TxAttempt, TxPurpose, TxStatus)
from marketplace import chainconfig
from marketplace.errors import DependencyUnavailable, NotFound

S = AgreementStatus


def blockchain_identifier_to_agreement_id(blockchain_identifier: str) -> uuid.UUID | None:
    value = int(blockchain_identifier, 16)
    return uuid.UUID(int=value) if value < 2**128 else None


def chain_configured_require() -> None:
    if not (chainconfig.escrow_address() and chainconfig.usdc_address()):
        raise DependencyUnavailable("No escrow contract is configured on this marketplace.",
                                    code="chain_not_configured")


def network_config() -> dict:
    """What an SDK on a dev chain may pin (`NetworkConfig.from_marketplace(url, trust_server=True)`)."""
    chain_configured_require()
    with chain.unavailable_as_503():
        name, version = chain.token_domain()
    schedule = agreement_services.fee_schedule_current()
    return {
        "chain_id": settings.CHAIN_ID, "escrow_address": chainconfig.escrow_address(),
        "token_address": chainconfig.usdc_address(), "token_domain": {"name": name, "version": version},
        "receipt_signer": chainconfig.receipt_signer_address(),
        "retired_receipt_signers": chainconfig.retired_receipt_signer_addresses(),
        "gas_wallet": chainconfig.relayer_address(),
        "fee_schedule": {"percent_bps": schedule.percent_bps, "fixed_atomic": schedule.fixed_atomic,
                         "minimum_atomic": schedule.minimum_atomic},
        "escrow_deployment_block": chainconfig.escrow_deployment_block(),
    }


def live_transactions(*, purpose: str):
    """Transactions of `purpose` under way or done, i.e. not failed: an agreement has at most one."""
    return ChainTransaction.objects.filter(purpose=purpose).exclude(status=TxStatus.FAILED)


_UNMINED = [TxStatus.QUEUED, TxStatus.SUBMITTED]


def _tokens_named(token: str) -> list[str]:
    """The spellings of `token` on an agreement: its address, or blank for the default token."""
    default = Web3.to_checksum_address(chain.token_address())
    token = Web3.to_checksum_address(token or default)
    return [token, ""] if token == default else [token]


def wallet_unmined_amount(*, wallet: str, token: str = "", exclude_agreement=None) -> int:
    """What the relayed payments of `wallet` queued or sent, not mined yet as the books know, will pull from it in
    `token` (blank: the default one): its activations (deposit plus fee each) and its direct purchases being paid
    (each step not mined yet: the fee, which its permit lets the relayer collect, and the payment; also while one
    step is concluded and the next not queued yet), `exclude_agreement`'s aside, and its skill invocations' payments.
    Its balance does not show that yet: each passes its own balance check and simulation alone, and all but what the
    balance covers would revert at the relayer's gas. Read under the wallet's lock (`services.wallet_payments_turn`)."""
    agreements = UsageAgreement.objects.filter(buyer_wallet_address__iexact=wallet,
                                               token_address__in=_tokens_named(token)).exclude(pk=exclude_agreement)
    activations = agreements.filter(
        chain_transactions__purpose=TxPurpose.ACTIVATE, chain_transactions__status__in=_UNMINED,
    ).aggregate(total=Sum(F("deposit_amount") + F("infra_fee")))["total"] or 0
    paying = agreements.filter(settlement_model=SettlementModel.DIRECT_PAYMENT, status=S.PAYING)
    direct = 0
    for purpose, amount in ((TxPurpose.DIRECT_FEE, "infra_fee"), (TxPurpose.DIRECT_PAYMENT, "deposit_amount")):
        mined = ChainTransaction.objects.filter(agreement_id=OuterRef("pk"), purpose=purpose,
                                                status__in=[TxStatus.MINED, TxStatus.CONFIRMED])
        direct += paying.exclude(Exists(mined)).aggregate(total=Sum(amount))["total"] or 0
    authorized = {str(pk): amount for pk, amount in SkillInvocation.objects.filter(
        authorization__payer__iexact=wallet, authorization__token_address__iexact=_tokens_named(token)[0],
        money=InvocationMoney.AUTHORIZED).values_list("pk", "amount")}
    invocations = ChainTransaction.objects.filter(purpose=TxPurpose.INVOCATION_PAYMENT, status__in=_UNMINED,
                                                  context__invocation_id__in=list(authorized))
    return activations + direct + sum(authorized[invocation_id] for invocation_id in
                                      set(invocations.values_list("context__invocation_id", flat=True)))


def wallet_permit_pending(*, wallet: str, token: str = "", token_nonce: int, exclude_agreement=None):
    """The id of an agreement whose relayed permit from `wallet` in `token` is queued or sent, not mined yet as the
    books know, and not spent by the token (its nonce `>= token_nonce`, the token's `nonces(wallet)` read before):
    an activation's (its nonce in the context) or a direct purchase's fee permit; `exclude_agreement` aside; else
    None. A permit signed meanwhile carries the same nonce, so whichever runs first voids the other (and an
    activation's sets the escrow's allowance anew, which its pull takes). Read under the wallet's lock
    (`services.wallet_payments_turn`)."""
    unmined = {"status__in": _UNMINED, "agreement__buyer_wallet_address__iexact": wallet,
               "agreement__token_address__in": _tokens_named(token)}
    activations = ChainTransaction.objects.filter(
        purpose=TxPurpose.ACTIVATE, **unmined, **{f"context__{ACTIVATION_PERMIT_NONCE}__gte": token_nonce})
    fee_permits = ChainTransaction.objects.filter(purpose=TxPurpose.DIRECT_FEE_PERMIT, **unmined,
                                                  agreement__fee_permit__nonce__gte=token_nonce)
    return (activations | fee_permits).exclude(
        agreement_id=exclude_agreement).values_list("agreement_id", flat=True).first()


# The context key of an activation's token permit nonce (the one the buyer's permit carries).
ACTIVATION_PERMIT_NONCE = "permit_nonce"


def live_transaction(*, agreement_id, purpose: str) -> ChainTransaction | None:
    """The agreement's transaction of `purpose` under way or done, if any."""
    return live_transactions(purpose=purpose).filter(agreement_id=agreement_id).first()


def transaction_signed(*, agreement_id, purpose: str) -> bool:
    """Whether a transaction of the agreement's `purpose` was ever signed (broadcast, perhaps; whatever its status
    now): its calldata may be public."""
    return TxAttempt.objects.filter(transaction__agreement_id=agreement_id, transaction__purpose=purpose).exists()


def cancelled_may_still_run(*, agreement_id, purpose: str) -> bool:
    """Whether a transaction of the agreement's `purpose` was cancelled (`relayer._cancel`) and the nonce fill that
    took its nonce is not concluded yet: its own old bytes may still be mined in the fill's place."""
    cancelled = ChainTransaction.objects.filter(agreement_id=agreement_id, purpose=purpose, status=TxStatus.FAILED)
    return ChainTransaction.objects.filter(
        purpose=TxPurpose.NONCE_FILL, **{f"context__{relayer.CANCELS}__in": [str(pk) for pk in cancelled.values_list(
            "pk", flat=True)]}).exclude(status__in=[TxStatus.CONFIRMED, TxStatus.FAILED]).exists()


# The proposals a failure of which waits the proposal backoff, and the agreement status in which each is sent.
_PROPOSALS_BACKED_OFF = {TxPurpose.PROPOSE_SETTLEMENT: AgreementStatus.ACTIVE,
                         TxPurpose.MASUMI_REFUND_PROPOSAL: AgreementStatus.IN_CHALLENGE,
                         TxPurpose.RESOLVE: AgreementStatus.DISPUTED}  # the purchases tick's releases
# What else must hold for one given up to be worth an operator's retry: a zero refund proposal carries out a refund
# request the buyer may withdraw since (`masumi_refund_requested`), and then its retry is refused.
_PROPOSALS_STILL_WANTED = {
    TxPurpose.MASUMI_REFUND_PROPOSAL: Q(agreement__masumi_purchase__refund_requested_at__isnull=False)}


def masumi_refund_requested(*, agreement_id) -> bool:
    """Whether the buyer of the Masumi purchase paid through this agreement asked for its refund and has not
    withdrawn the request (cancel-refund-request). Asked under the agreement's lock, which the withdrawal takes too,
    by what carries the request out: the challenge, the zero proposal, an operator's retry of it."""
    return MasumiPurchase.objects.filter(agreement_id=agreement_id, refund_requested_at__isnull=False).exists()


# The context key of a proposal never built because the receipt signer its escrow names has no key configured
# (`settlement.settlement_propose_refund`): that signer's address.
RECEIPT_SIGNER_MISSING = "receipt_signer_missing"


def proposal_unsignable(failures: list[ChainTransaction]) -> str | None:
    """The receipt signer whose key the newest of `failures` (`proposal_failures`) could not be signed without, while
    that key is still not configured: nothing is tried until it is (put back in RECEIPT_SIGNER_RETIRED_PRIVATE_KEYS),
    and the dashboard lists it (`proposals_given_up`). None otherwise."""
    signer = failures[0].context.get(RECEIPT_SIGNER_MISSING) if failures else None
    return signer if signer and chainconfig.receipt_signer_key(signer) is None else None


def proposal_attempts(failures: list[ChainTransaction]) -> list[ChainTransaction]:
    """Of `failures` (`proposal_failures`), those sent: the attempts SETTLEMENT_PROPOSE_MAX_ATTEMPTS and the backoff
    count. Not one never built (`relayer.UNSENT`: its receipt signer's key missing), which `proposal_unsignable`
    holds back while the key is missing: counted, the key put back at the last attempt, the ticks sent nothing and
    the operator's retry the dashboard offered was refused (nothing to send)."""
    return [tx for tx in failures if relayer.UNSENT not in tx.context]


def proposal_failures(*, agreement_id, purpose: str = TxPurpose.PROPOSE_SETTLEMENT) -> list[ChainTransaction]:
    """The agreement's failed proposals of `purpose` (a settlement's, or a Masumi refund's zero one) since an operator
    last retried one (that retry included), newest first: the attempts the ticks count against
    SETTLEMENT_PROPOSE_MAX_ATTEMPTS. Not those another's proposal of the same or a higher receipt, mined first, made
    fail (their evidence names its block, relayer.EVIDENCE_BLOCK: `settlement._proposed_by_another`)."""
    proposals = ChainTransaction.objects.filter(agreement_id=agreement_id, purpose=purpose)
    last_retry = proposals.filter(context__has_key=relayer.OPERATOR_RETRY_OF).order_by("-created_at").first()
    if last_retry is not None:
        proposals = proposals.filter(created_at__gte=last_retry.created_at)
    return list(proposals.filter(status=TxStatus.FAILED).exclude(outcome_evidence__has_key=relayer.EVIDENCE_BLOCK)
                .order_by("-created_at"))


def proposals_given_up(*, limit: int) -> list[tuple[ChainTransaction, int]]:
    """Proposals the ticks no longer try (SETTLEMENT_PROPOSE_MAX_ATTEMPTS failed since an operator's last retry, or
    one whose receipt signer's key is missing: `proposal_unsignable`): (the
    latest failed transaction, the failures) per agreement still where they are sent (`_PROPOSALS_BACKED_OFF`) and
    still wanted (`_PROPOSALS_STILL_WANTED`), oldest first."""
    given_up = []
    for purpose, status in _PROPOSALS_BACKED_OFF.items():
        live = live_transactions(purpose=purpose).filter(agreement_id=OuterRef("agreement_id"))
        candidates = (ChainTransaction.objects.filter(_PROPOSALS_STILL_WANTED.get(purpose, Q()), purpose=purpose,
                                                      status=TxStatus.FAILED, agreement__status=status)
                      .exclude(Exists(live)).order_by().values_list("agreement_id", flat=True).distinct())
        for agreement_id in candidates:
            failures = proposal_failures(agreement_id=agreement_id, purpose=purpose)
            attempts = proposal_attempts(failures)
            if proposal_unsignable(failures):
                given_up.append((failures[0], len(attempts)))
            elif len(attempts) >= settings.SETTLEMENT_PROPOSE_MAX_ATTEMPTS:  # the latest sent: the one to retry
                given_up.append((attempts[0], len(attempts)))
    return sorted(given_up, key=lambda item: item[0].updated_at)[:limit]


def disputes():
    """Disputed agreements (open disputes), annotated as `disputes_ever`."""
    return _dispute_outlines(Dispute.objects.filter(status=S.DISPUTED))


def disputes_ever():
    """Every agreement ever disputed, for the operators who arbitrate, each with `resolving` (a resolution has been
    submitted already), `disputed_at` (when the books recorded the challenge), `times_out_at` (the books' estimate of
    the dispute's on-chain timeout), and how it ended: `ended_reason` and `timed_out` (settled for the buyer because
    nobody resolved it in time: the settlement tick's finalize, or anyone's)."""
    # The agreements a challenge event names (a partial index of those events), with those disputed now, by key: an
    # OR of the status and an EXISTS per agreement was a scan of every agreement (1.2 s with 100,000).
    challenged = AgreementEvent.objects.filter(to_status=S.DISPUTED).order_by().values("agreement_id")
    disputed_now = Dispute.objects.filter(status=S.DISPUTED).order_by().values("pk")
    return _dispute_outlines(Dispute.objects.filter(pk__in=challenged.union(disputed_now)))


def _dispute_outlines(queryset):
    """`times_out_at` is the challenge plus DISPUTE_TIMEOUT, the challenge taken as the earlier of the moment the books
    recorded it and the end of the challenge window it was mined in (the chain's time; getEscrow's challengeDeadline
    while Disputed is the exact timeout, read live on the agreement's page): late by the indexer's delay at most."""
    resolution = live_transactions(purpose=TxPurpose.RESOLVE).filter(agreement_id=OuterRef("pk"))
    events = AgreementEvent.objects.transitions().filter(agreement_id=OuterRef("pk"))
    challenged = events.filter(to_status=S.DISPUTED).order_by("-id")
    ended = events.filter(from_status=S.DISPUTED).order_by("id")
    return queryset.annotate(
        resolving=Exists(resolution),
        disputed_at=Subquery(challenged.values("created_at")[:1]),
        challenged_by=Least(Coalesce("disputed_at", "challenge_deadline"), Coalesce("challenge_deadline",
                                                                                     "disputed_at")),
        times_out_at=ExpressionWrapper(F("challenged_by") + Value(DISPUTE_TIMEOUT), output_field=DateTimeField()),
        ended_reason=Subquery(ended.values("reason")[:1]),
        # Settled from disputed directly (anyone's finalize), or finalized by the settlement tick on its timeout.
        timed_out=Exists(ended.filter(Q(to_status=S.SETTLED) | Q(data__has_key=DISPUTE_TIMED_OUT_AT))))


def dispute_evidence(dispute) -> str:
    """What the buyer gave as evidence with its challenge (kept on the event that recorded the dispute), for the
    arbiter."""
    challenged = dispute.events.transitions().filter(to_status=S.DISPUTED).order_by("-id").first()
    return (challenged.data or {}).get("evidence", "") if challenged is not None else ""


# The data key of the event of the settlement tick's finalize of a dispute past its timeout (its unix time; written by
# settlement._finalize_timed_out_dispute).
DISPUTE_TIMED_OUT_AT = "dispute_timed_out_at"


def dispute_time_left(dispute, *, now) -> str:
    """How long the arbiter has left to decide an open dispute from `disputes_ever`, for people."""
    if dispute.times_out_at is None:
        return "unknown"
    if dispute.times_out_at <= now:
        return f"timed out {timesince(dispute.times_out_at, now)} ago: the buyer gets the whole deposit back"
    return f"{timeuntil(dispute.times_out_at, now)} left"


def disputes_timing_out(*, before):
    """Open disputes whose (estimated) timeout is before `before`, soonest first: past it, the buyer gets the whole
    deposit back and the arbiter may no longer resolve."""
    return disputes().filter(times_out_at__lte=before).order_by("times_out_at", "pk")


def transactions_of_agreement(*, agreement_id):
    return ChainTransaction.objects.filter(agreement_id=agreement_id).prefetch_related("attempts").order_by(
        "created_at")


def escrow_terms(*, agreement: UsageAgreement) -> tuple:
    """The `EscrowTerms` every call on the agreement's escrow after activation carries: from the indexed Activated
    event of its buyer's escrow under its id, else read from the chain (a node call: make it outside any database
    transaction). The contract keys escrows by (buyer, id): another buyer's escrow under the same id is not this
    agreement's, whoever opened it first."""
    buyer = Web3.to_checksum_address(agreement.buyer_wallet_address)
    indexed = ChainEvent.objects.filter(
        name="Activated", removed_at=None, contract=Web3.to_checksum_address(chainconfig.escrow_address()),
        args__agreementId=agreement.onchain_id.lower(), args__buyer=buyer).order_by("-block_number").first()
    if indexed is not None:
        return chain.terms_of_activation(indexed.args)
    return chain.escrow_terms(agreement.onchain_id, buyer=buyer, from_block=_activation_search_start(agreement.pk))


def activation_transaction(*, agreement: UsageAgreement) -> dict | None:
    """The transaction that funded the agreement's escrow on-chain, whoever sent it, and its block
    (`chain.activation_transaction`; raises chain.ChainError when unreachable)."""
    buyer = Web3.to_checksum_address(agreement.buyer_wallet_address)
    return chain.activation_transaction(agreement.onchain_id, buyer=buyer,
                                        from_block=_activation_search_start(agreement.pk))


def _activation_search_start(agreement_id) -> int | None:
    """Where the escrow's Activated event can first be, when the relayer saw the activation mined or the indexer
    applied it: CHAIN_CONFIRMATIONS blocks before that (a reorg no deeper than the confirmation depth can only move it
    later). None: unknown (the chain reads then start at the deployment block)."""
    # Only an activation that ran (receipt status 1) bounds where the escrow's Activated event is: one of ours that
    # reverted AgreementExists was mined after it (a front-runner's copy, anyone relaying the buyer's intent).
    mined = (ChainTransaction.objects.filter(agreement_id=agreement_id, purpose=TxPurpose.ACTIVATE,
                                             mined_block_number__isnull=False, receipt_status=1)
             .order_by("mined_block_number").values_list("mined_block_number", flat=True).first())
    # Or one anyone else sent (the buyer's intent relayed by another) that the indexer applied to the agreement, so
    # the buyer's own: each read searched from the deployment block again.
    indexed = (ChainEvent.objects.filter(agreement_id=agreement_id, name="Activated", removed_at=None,
                                         effect__in=[EventEffect.APPLIED, EventEffect.ALREADY])
               .order_by("block_number").values_list("block_number", flat=True).first())
    found = [block for block in (mined, indexed) if block is not None]
    if not found:
        return None
    return max(min(found) - settings.CHAIN_CONFIRMATIONS, chainconfig.escrow_deployment_block())


class EscrowState(StrEnum):
    """The contract's `State` of an escrow, in its declaration order."""

    NONE = "none"
    ACTIVE = "active"
    PROPOSED = "proposed"
    DISPUTED = "disputed"
    RESOLVED = "resolved"
    SETTLED = "settled"
    RECLAIMED = "reclaimed"


ESCROW_CLOSED_STATES = frozenset({EscrowState.SETTLED, EscrowState.RECLAIMED})
# UsageEscrow.DISPUTE_TIMEOUT: how long after its challenge a dispute waits for the arbiter; from then on `resolve`
# reverts and `finalize` refunds the buyer the whole deposit. The escrow's own moment is getEscrow's challengeDeadline
# while Disputed (this only narrows which agreements the settlement tick asks the chain about: a test checks it).
DISPUTE_TIMEOUT = timedelta(days=30)


def onchain_escrow(*, agreement: UsageAgreement) -> dict:
    """The contract's record of the agreement's escrow: its buyer's under its id (raises chain.ChainError when
    unreachable)."""
    record = chain.escrow_record(agreement.onchain_id, buyer=Web3.to_checksum_address(agreement.buyer_wallet_address),
                                 from_block=_activation_search_start(agreement.pk))
    record["state"] = list(EscrowState)[record["state"]]
    return record


# The head `chain_head_shown` read last: [CHAIN_RPC_URL, monotonic time of the read, head or None].
_head_shown: list = [None, 0.0, None]
_head_shown_lock = threading.Lock()


def chain_head_shown() -> int | None:
    """The chain's head, as the API counts a transaction's confirmations against for its callers (escrow-status): read
    from the node at most once per CHAIN_HEAD_SHOWN_SECONDS per process, a failed read (None) too. Read for each
    request, any caller with a read key multiplied the calls the platform pays a metered RPC provider for, and a node
    down held each request for its RPC timeout. What the relayer decides on is read afresh (`relayer`)."""
    now = time.monotonic()
    with _head_shown_lock:
        url, read_at, head = _head_shown
    if url == settings.CHAIN_RPC_URL and now - read_at < settings.CHAIN_HEAD_SHOWN_SECONDS:
        return head
    try:
        head = chain.latest_block_number()
    except chain.ChainError:
        head = None
    with _head_shown_lock:
        _head_shown[:] = [settings.CHAIN_RPC_URL, now, head]
    return head


def chain_head_shown_forget() -> None:
    """The next `chain_head_shown` reads the node (a test's chain reverted to a snapshot)."""
    with _head_shown_lock:
        _head_shown[:] = [None, 0.0, None]


def confirmations(*, tx: ChainTransaction, latest_block: int | None) -> int:
    if tx.mined_block_number is None or latest_block is None:
        return 0
    return max(0, latest_block - tx.mined_block_number + 1)


# What the contract must say for each marketplace status (several when a transaction may be in flight).
_EXPECTED_STATES = {
    S.ACTIVE: {EscrowState.ACTIVE},
    S.IN_CHALLENGE: {EscrowState.PROPOSED},
    S.DISPUTED: {EscrowState.DISPUTED, EscrowState.RESOLVED},
    # Disputed: a dispute past its timeout, its finalize (for the buyer) in flight.
    S.SETTLING: {EscrowState.PROPOSED, EscrowState.DISPUTED, EscrowState.RESOLVED, EscrowState.SETTLED},
    S.SETTLED: {EscrowState.SETTLED},
    S.REFUNDED: {EscrowState.RECLAIMED},
}


def reconciliation_mismatches(*, agreements) -> list[str]:
    """Every difference between our records and the escrow contract, as readable lines (empty: consistent)."""
    mismatches = []
    for agreement in agreements:
        expected = _EXPECTED_STATES.get(agreement.status)
        if expected is None:
            continue
        onchain = onchain_escrow(agreement=agreement)
        label = f"agreement {agreement.pk} ({agreement.status})"
        if onchain["state"] not in expected:
            mismatches.append(f"{label}: contract state {onchain['state']}, expected {sorted(expected)}")
            continue
        if int(onchain["depositAmount"]) != agreement.deposit_amount:
            mismatches.append(f"{label}: deposit {onchain['depositAmount']} on-chain, {agreement.deposit_amount} here")
        if agreement.status == S.IN_CHALLENGE and int(onchain["settledAmount"]) != agreement.used:
            mismatches.append(f"{label}: proposed amount {onchain['settledAmount']} on-chain, used {agreement.used}")
        if agreement.status == S.SETTLED and int(onchain["settledAmount"]) != agreement.seller_payout:
            mismatches.append(f"{label}: seller payout {agreement.seller_payout} here, "
                              f"{onchain['settledAmount']} on-chain")
        if is_paid_out(agreement) and (agreement.seller_payout or 0) + (
                agreement.buyer_refund or 0) != agreement.deposit_amount:
            mismatches.append(f"{label}: payout + refund != deposit")
    return mismatches


def purchases_of_buyer(*, buyer):
    return MasumiPurchase.objects.filter(agreement__buyer=buyer).select_related(
        "agreement", "agreement__service", "agreement__seller")


def purchases_page(*, buyer, after=None, limit: int) -> list[MasumiPurchase]:
    """The buyer's purchases after the one `after`, in id order: at most `limit`, and once their results (a seller's
    answers, each up to UPSTREAM_ANSWER_MAX_BYTES) reach MASUMI_PURCHASES_PAGE_RESULT_CHARACTERS no more but the
    first, so that a page never holds a hundred of them in a web process. The sizes are read first, the rows then."""
    queryset = purchases_of_buyer(buyer=buyer).order_by("id")
    if after is not None:
        queryset = queryset.filter(pk__gt=after)
    ids, total = [], 0
    for pk, characters in queryset.annotate(result_characters=Length("result")).values_list(
            "pk", "result_characters")[:limit]:
        total += characters
        if ids and total > settings.MASUMI_PURCHASES_PAGE_RESULT_CHARACTERS:
            break
        ids.append(pk)
    return list(queryset.filter(pk__in=ids))


def _by_blockchain_identifier(blockchain_identifier: str) -> Q:
    """A purchase's blockchainIdentifier: its escrow's agreementId, or the seller's payment request it pays."""
    uid = blockchain_identifier_to_agreement_id(blockchain_identifier)
    if uid is None:  # above 128 bits: no id of ours (`agreement__pk=None` would match every purchase without one)
        return Q(pk__in=[])
    return Q(agreement__pk=uid) | Q(payment_request__pk=uid)


def purchase_pay_by_time(*, agreement_id) -> int | None:
    """The payByTime (unix) of the Masumi purchase bought as this agreement: its activation's deadline; None when the
    agreement is no purchase."""
    pay_by = MasumiPurchase.objects.filter(agreement_id=agreement_id).values_list("pay_by_time", flat=True).first()
    return None if pay_by is None else int(pay_by.timestamp())


def purchase_signed_refund_unlock_time(*, agreement_id) -> int | None:
    """The unlockTime (unix) of the Masumi purchase bought as this agreement when its buyer's refund request, signed
    until then and asked before the result, waits to dispute the result's proposal; None otherwise. Not one asked
    after the result: the result submitted in time is the seller's claim, proposed however late (left unproposed, the
    escrow was reclaimed for the buyer holding the result); that request disputes it while it still can."""
    unlock = MasumiPurchase.objects.filter(
        Q(result_submitted_at=None) | Q(refund_requested_at__lt=F("result_submitted_at")),
        agreement_id=agreement_id, refund_requested_at__isnull=False,
    ).exclude(refund_signature="").values_list("unlock_time", flat=True).first()
    return None if unlock is None else int(unlock.timestamp())


def purchase_unlock_time(*, agreement_id) -> int | None:
    """The unlockTime (unix) of the Masumi purchase bought as this agreement; None when the agreement is no purchase."""
    unlock = MasumiPurchase.objects.filter(agreement_id=agreement_id).values_list("unlock_time", flat=True).first()
    return None if unlock is None else int(unlock.timestamp())


def purchase_get(*, buyer, blockchain_identifier: str) -> MasumiPurchase:
    """The buyer's purchase with this blockchainIdentifier, else 404."""
    purchase = purchases_of_buyer(buyer=buyer).filter(_by_blockchain_identifier(blockchain_identifier)).first()
    if purchase is None:
        raise NotFound("No such purchase.", code="purchase_not_found")
    return purchase


def purchase_get_by_id(*, buyer, purchase_id) -> MasumiPurchase:
    purchase = purchases_of_buyer(buyer=buyer).filter(pk=purchase_id).first()
    if purchase is None:
        raise NotFound("No such purchase.", code="purchase_not_found")
    return purchase


def payment_request_get(*, blockchain_identifier: str) -> MasumiPaymentRequest:
    """A seller's payment request, for the buyer who pays it (anyone holding its blockchainIdentifier)."""
    request = MasumiPaymentRequest.objects.select_related("service", "service__seller").filter(
        pk=blockchain_identifier_to_agreement_id(blockchain_identifier)).first()
    if request is None:
        raise NotFound("No payment request of this marketplace has this blockchainIdentifier.",
                       code="payment_not_found")
    return request


def payments_of_seller(*, seller):
    """The seller's side: its purchased jobs (as MasumiPurchase) and its unpaid payment requests."""
    paid = MasumiPurchase.objects.filter(agreement__seller=seller).select_related(
        "agreement", "agreement__service", "payment_request")
    unpaid = MasumiPaymentRequest.objects.filter(service__seller=seller, purchase__isnull=True).select_related(
        "service", "service__seller")
    return paid, unpaid


def payments_page(*, seller, after=None, limit: int) -> list[MasumiPurchase | MasumiPaymentRequest]:
    """The seller's payments as a Masumi node pages them: its purchased jobs, then its unpaid requests, each newest
    first, at most `limit`, after the payment whose id is `after` (the previous page's last: a purchase's, or a
    request's, paid since or not). Another id is 404 `payment_not_found`."""
    paid, unpaid = payments_of_seller(seller=seller)
    paid, unpaid = paid.order_by("-created_at", "-id"), unpaid.order_by("-created_at", "-id")
    if after is not None:
        if (last := paid.filter(pk=after).values_list("created_at", flat=True).first()) is not None:
            paid = paid.filter(Q(created_at__lt=last) | Q(created_at=last, pk__lt=after))
        elif (last := MasumiPaymentRequest.objects.filter(service__seller=seller, pk=after).values_list(
                "created_at", flat=True).first()) is not None:
            paid = paid.none()
            unpaid = unpaid.filter(Q(created_at__lt=last) | Q(created_at=last, pk__lt=after))
        else:
            raise NotFound("No payment of yours has this id.", code="payment_not_found",
                           details={"fields": ["cursorId"]})
    rows: list[MasumiPurchase | MasumiPaymentRequest] = list(paid[:limit])
    return rows + list(unpaid[:limit - len(rows)])


def payment_get(*, seller, blockchain_identifier: str) -> MasumiPurchase | MasumiPaymentRequest:
    """The seller's payment with this blockchainIdentifier: the purchase paying it, else the unpaid request."""
    paid, unpaid = payments_of_seller(seller=seller)
    found = paid.filter(_by_blockchain_identifier(blockchain_identifier)).first() or unpaid.filter(
        pk=blockchain_identifier_to_agreement_id(blockchain_identifier)).first()
    if found is None:
        raise NotFound("No such payment.", code="payment_not_found")
    return found


def transaction_counts_by_purpose_and_status() -> dict[tuple[str, str], int]:
    rows = ChainTransaction.objects.order_by().values_list("purpose", "status").annotate(count=Count("pk"))
    return {(purpose, status): count for purpose, status, count in rows}


def transaction_counts_stuck_at_fee_cap() -> dict[tuple[str], int]:
    """In-flight transactions whose fees reached the cap, by purpose (their bytes are being rebroadcast)."""
    rows = (ChainTransaction.objects.filter(status=TxStatus.SUBMITTED, fee_cap_reached_at__isnull=False)
            .order_by().values_list("purpose").annotate(count=Count("pk")))
    return {(purpose,): count for purpose, count in rows}


def transaction_counts_unfunded() -> dict[tuple[str], int]:
    """`transactions_unfunded`, by purpose."""
    rows = transactions_unfunded().select_related(None).order_by().values_list("purpose").annotate(count=Count("pk"))
    return {(purpose,): count for purpose, count in rows}


def transactions_waiting_for_finality():
    """Queued transactions held until the block of the payment they forward is at or below the node's PAYOUT_HEAD_TAG
    block (relayer._waits_for_finality), oldest hold first."""
    return (ChainTransaction.objects.filter(status=TxStatus.QUEUED, held_until_block__isnull=False)
            .order_by("updated_at"))


def transaction_counts_waiting_for_finality() -> dict[tuple[str], int]:
    rows = transactions_waiting_for_finality().order_by().values_list("purpose").annotate(count=Count("pk"))
    return {(purpose,): count for purpose, count in rows}


def transactions_held_since(*, before):
    """Held for their payment's finality since before `before` (queued then: the payment was confirmed already)."""
    return transactions_waiting_for_finality().filter(created_at__lt=before).order_by("created_at")


def payout_tag_block() -> tuple[int | None, str]:
    """The node's PAYOUT_HEAD_TAG block, and why no payout or refund waiting for its payment's finality can be
    released now: (None, the node's error on that block: refused, nothing, a block beyond its head) when it cannot be
    read; (block, "") when it can; (None, "") when no tag is set."""
    if not settings.PAYOUT_HEAD_TAG:
        return None, ""
    try:
        return chain.final_block_number(settings.PAYOUT_HEAD_TAG), ""
    except chain.ChainError as error:
        return None, f"the node's {settings.PAYOUT_HEAD_TAG} block cannot be read: {error}"


def payout_release_blocker() -> str:
    """Why no payout or refund waiting for its payment's finality can be released now (`payout_tag_block`); empty
    when the node answers its tag, or no tag is set."""
    return payout_tag_block()[1]


def finality_waits(*, invocation_ids=(), agreement_ids=()) -> dict[str, dict]:
    """What the API shows of payouts and refunds held for their payment's finality: {invocation id or agreement id
    (as strings): {"block_number", "tag"}} for the invocations' payouts or refunds and the direct purchases' fee
    refunds held now; the others are absent."""
    if not settings.PAYOUT_HEAD_TAG:
        return {}  # emptied since: what is held is sent at the next poll
    held = transactions_waiting_for_finality()
    rows = [*((row["context"]["invocation_id"], row["held_until_block"]) for row in held.filter(
                purpose__in=[TxPurpose.INVOCATION_PAYOUT, TxPurpose.INVOCATION_REFUND],
                context__invocation_id__in=[str(each) for each in invocation_ids]).values("context", "held_until_block")),
            *((str(agreement_id), block) for agreement_id, block in held.filter(
                purpose=TxPurpose.DIRECT_FEE_REFUND, agreement_id__in=list(agreement_ids))
              .values_list("agreement_id", "held_until_block"))]
    return {subject: {"block_number": block, "tag": settings.PAYOUT_HEAD_TAG} for subject, block in rows}


def finality_wait_of(*, tx: ChainTransaction) -> str:
    """What an operator reads on a transaction held for its payment's finality; empty for any other."""
    if tx.status != TxStatus.QUEUED or tx.held_until_block is None:
        return ""
    if not settings.PAYOUT_HEAD_TAG:
        return "waiting for the payment's finality no longer (PAYOUT_HEAD_TAG emptied): sent at the next poll"
    return f"waiting for block {tx.held_until_block} to be {settings.PAYOUT_HEAD_TAG} (the payment's finality)"


def transactions_failed_recently(*, limit: int):
    """Failed transactions, newest first; not those whose evidence names someone else's transaction that did what
    they would have (relayer.EVIDENCE_BLOCK: a finalize another was mined first, a copy of a payment's
    authorization): nothing for an operator to look into."""
    return (ChainTransaction.objects.filter(status=TxStatus.FAILED)
            .exclude(outcome_evidence__has_key=relayer.EVIDENCE_BLOCK).order_by("-updated_at")[:limit])


def nonce_fills_outrun(*, acknowledged: bool = False):
    """Concluded nonce fills mined as the old bytes of the transaction they cancel (`relayer._cancel`: someone sent
    them first, or a node held them), which ran: what they did may be done twice (a payout and its retry). Oldest
    first: those no operator acknowledged yet, or (`acknowledged`) those one did."""
    others_attempt = TxAttempt.objects.filter(tx_hash=OuterRef("mined_tx_hash")).exclude(
        transaction_id=OuterRef("pk"))
    return (ChainTransaction.objects.filter(purpose=TxPurpose.NONCE_FILL, status=TxStatus.CONFIRMED,
                                            acknowledged_at__isnull=not acknowledged)
            .filter(Exists(others_attempt)).order_by("confirmed_at"))


# --- the chain indexer ---------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class IndexerLag:
    head: int  # the chain head (or, when the node cannot be asked, the head the indexer last saw)
    indexed_to: int  # every event up to this block is applied
    lag: int  # blocks behind the head


def indexer_lag(*, ask_chain: bool = True) -> IndexerLag | None:
    """How far the indexer is behind the chain head; None when no escrow is configured (or no head is known).
    Raises chain.ChainError when `ask_chain` and the node does not answer."""
    if not chainconfig.escrow_address():
        return None
    cursor = IndexerCursor.objects.filter(
        chain_id=settings.CHAIN_ID, escrow_address=Web3.to_checksum_address(chainconfig.escrow_address())).first()
    head = chain.latest_block_number() if ask_chain else (cursor.head_block if cursor else None)
    if head is None:
        return None
    if cursor is not None and cursor.last_block is not None:
        indexed_to = cursor.last_block
    else:  # never indexed: everything since the deployment is still to read
        indexed_to = (cursor.start_block if cursor else chainconfig.escrow_deployment_block()) - 1
    return IndexerLag(head=head, indexed_to=indexed_to, lag=max(0, head - indexed_to))


def indexer_unapplied_events(*, acknowledged: bool = False):
    """Indexed events (still canonical) the indexer could not apply, oldest first, each with its error: those no
    operator acknowledged yet, or (`acknowledged`) those one did."""
    return ChainEvent.objects.filter(effect=EventEffect.FAILED, removed_at=None,
                                     acknowledged_at__isnull=not acknowledged).order_by("block_number", "log_index")


def payouts_deferred():
    """Payouts the token refused at an agreement's settlement or reclaim (PayoutDeferred, still canonical), credited in
    the escrow and not withdrawn since (no Withdrawn of the same escrow and party): the books record them as paid out,
    the money is in the escrow. Newest first."""
    withdrawn = ChainEvent.objects.filter(name="Withdrawn", removed_at=None, agreement_id=OuterRef("agreement_id"),
                                          args__party=OuterRef("args__party"))
    return (ChainEvent.objects.filter(name="PayoutDeferred", removed_at=None, agreement__isnull=False)
            .exclude(Exists(withdrawn)).order_by("-block_number", "-log_index"))


def indexer_event_counts_by_effect() -> dict[str, int]:
    rows = ChainEvent.objects.filter(removed_at=None).order_by().values_list("effect").annotate(count=Count("pk"))
    return dict(rows)


def invocation_of_transaction(*, tx: ChainTransaction):
    """The skill invocation a payment, payout or refund transaction is for (named in its context), if any."""
    invocation_id = (tx.context or {}).get("invocation_id")
    if not invocation_id:
        return None
    return SkillInvocation.objects.select_related("skill", "seller").filter(pk=invocation_id).first()


def transactions_unconfirmed_since(*, before):
    """Queued, submitted or mined, with no change since before `before`; not those held for a payment's finality
    (`transactions_waiting_for_finality`: on Base finality takes about 15 minutes)."""
    return (ChainTransaction.objects.filter(status__in=[TxStatus.QUEUED, TxStatus.SUBMITTED, TxStatus.MINED],
                                            updated_at__lt=before)
            .exclude(status=TxStatus.QUEUED, held_until_block__isnull=False).order_by("updated_at"))


def transactions_at_fee_cap():
    """Submitted transactions whose fees reached the cap: the relayer only rebroadcasts them now, and an operator
    decides (top the relayer up, raise the cap, wait for fees to fall)."""
    return (ChainTransaction.objects.filter(status=TxStatus.SUBMITTED, fee_cap_reached_at__isnull=False)
            .order_by("fee_cap_reached_at"))


def transactions_undecided():
    """Transactions whose outcome's evidence the node cannot be believed on (`relayer._evidence_of`): read again at
    each poll, nothing guessed, until a node decides it. Oldest first."""
    return ChainTransaction.objects.filter(undecided_since__isnull=False).order_by("undecided_since")


def transaction_counts_undecided() -> dict[tuple[str], int]:
    rows = transactions_undecided().order_by().values_list("purpose").annotate(count=Count("pk"))
    return {(purpose,): count for purpose, count in rows}


def transactions_unfunded():
    """Submitted transactions the node refused because the relayer's wallet cannot pay their gas: their signed bytes
    are sent again, not replaced with higher fees, until an operator tops the wallet up."""
    refused = TxAttempt.objects.filter(transaction=OuterRef("pk"),
                                       broadcast_error__startswith=relayer.UNFUNDED_BROADCAST_ERROR)
    return (ChainTransaction.objects.filter(status=TxStatus.SUBMITTED).filter(Exists(refused))
            .select_related("relayer").order_by("updated_at"))


def transactions_of_unconfigured_relayers():
    """Submitted transactions whose wallet's key is configured nowhere (a replaced RELAYER_PRIVATE_KEY not kept in
    RELAYER_RETIRED_PRIVATE_KEYS): their stored bytes are sent again, never replaced with higher fees nor cancelled."""
    return (ChainTransaction.objects.filter(status=TxStatus.SUBMITTED, relayer__isnull=False)
            .exclude(relayer__address__in=chainconfig.relayer_addresses()).select_related("relayer")
            .order_by("updated_at"))


def platform_wallet_balances() -> dict[str, int]:
    """The relayer's gas (wei) and the treasury's USDC (base units); the relayer wallet is the treasury
    (invocation payments land there; payouts, refunds and returned fees leave from it). Raises chain.ChainError."""
    address = chainconfig.relayer_address()
    return {"gas_wei": chain.call(lambda: chain.w3().eth.get_balance(address)),
            "usdc": chain.call(chain.token_contract().functions.balanceOf(address).call)}
