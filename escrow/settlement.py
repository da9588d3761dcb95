"""Settlement on-chain: propose (with the last signed usage receipt), challenge, resolve, finalize, reclaim.

`settlement_tick` (a beat task) moves every agreement that is due; the relayer's outcome handlers move the
agreement when each transaction confirms. Deadlines are compared with the chain's clock, which is the one
the contract enforces (escrow.chain_clock).
"""

import functools
import logging
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from django.conf import settings
from django.contrib.auth.base_user import AbstractBaseUser
from django.db import transaction
from django.utils import timezone
from web3 import Web3
from web3.logs import DISCARD

from agreements import selectors as agreement_selectors
from agreements import services as agreement_services
from agreements.models import (
    AgreementStatus,
    UsageAgreement,
    can_challenge,
    can_propose_settlement,
    can_reclaim,
    can_resolve,
    is_settling,
)
from catalog.models import Agent
from escrow import chain, chain_clock, relayer, selectors
from escrow.models import ChainTransaction, TxPurpose, TxStatus
from marketplace import chainconfig, sweeps
from marketplace.errors import Conflict, Forbidden, InvalidInput
from marketplace.logging import agreement_context, logs_name_the_agreement
from marketplace.signatures import receipt_sign, signer_require
from sdk import receipts, typed_data

logger = logging.getLogger(__name__)


def _enqueue(agreement: UsageAgreement, purpose: str, fn_name: str, args: list, context: dict | None = None):
    data = chain.escrow_contract().encode_abi(fn_name, args=args)
    return relayer.transaction_enqueue(purpose=purpose, to=chainconfig.escrow_address(), data=data,
                                       agreement_id=agreement.pk, context=context or {})


# --- propose -------------------------------------------------------------------------------------------------

def _final_receipt(agreement: UsageAgreement, *, terms: tuple) -> tuple[int, int, str, str]:
    """(seq, cumulative, usage digest, signature) of the agreement's last usage event, or a zero receipt, signed by
    the receipt signer its escrow's `terms` name when its key is kept (`chainconfig.receipt_signer_key`): the books
    signed each receipt with the key configured then, which a rotation may have replaced since. Else the books'
    own signature (or, for the zero receipt, the current key's)."""
    last = agreement_selectors.last_usage_event(agreement=agreement)
    seq, cumulative, digest, signature = (last.seq, last.cumulative, last.usage_digest, last.receipt_signature) \
        if last is not None else (0, 0, receipts.ZERO_DIGEST, "")
    key = chainconfig.receipt_signer_key(terms[3]) or (None if signature else settings.RECEIPT_SIGNER_PRIVATE_KEY)
    if key is not None:
        signature = receipt_sign(key, receipts.usage_receipt_digest(
            chain_id=agreement.chain_id, escrow_address=chainconfig.escrow_address(),
            agreement_id=agreement.onchain_id, seq=seq, cumulative_amount=cumulative, usage_digest=digest))
    return seq, cumulative, digest, signature


@logs_name_the_agreement
def settlement_propose(*, agreement_id, now: int) -> ChainTransaction | None:
    """Queue proposeSettlement with the last receipt, once no call is in flight. Safe to call repeatedly.

    `now`: the chain's clock, read by the caller. None once it has reached the escrow's reclaimAfter: the contract
    refuses a first proposal from then on (ProposalPeriodOver), and the settlement tick reclaims the deposit."""
    agreement = UsageAgreement.objects.get(pk=agreement_id)
    if not can_propose_settlement(agreement) or agreement.completion_requested_at is None:
        return None
    if _refund_request_stranded(agreement, now=now):
        return None
    terms = selectors.escrow_terms(agreement=agreement)  # a chain read: before the row lock
    if _proposal_period_over(terms, now=now):
        return None
    with transaction.atomic():
        agreement = UsageAgreement.objects.select_for_update().get(pk=agreement_id)
        if not can_propose_settlement(agreement) or agreement.completion_requested_at is None:
            return None
        if (selectors.live_transaction(agreement_id=agreement.pk, purpose=TxPurpose.PROPOSE_SETTLEMENT)
                or selectors.live_transaction(agreement_id=agreement.pk, purpose=TxPurpose.RECLAIM)
                or _challenge_under_way(agreement)):
            return None
        if not _proposal_due(selectors.proposal_failures(agreement_id=agreement.pk)):
            return None
        # Only reservations of calls that died with their process survive a full proxy timeout, but for a call a
        # stalled process is settling right now: proposed without it, its charge landed after the receipt proposed,
        # and an agreement's proposal is sent once (the escrow paid the seller less than the books charged). It waits
        # for the next tick: the call's charge goes on once this transaction ends (were it never to end, the reclaim
        # at reclaimAfter says what the seller lost).
        if agreement.reserved and not agreement_services.reservations_settle_stale(agreement=agreement):
            logger.info("settlement proposal waits: a call of the agreement is being charged or released")
            return None
        seq, cumulative, digest, signature = _final_receipt(agreement, terms=terms)
        return _enqueue(agreement, TxPurpose.PROPOSE_SETTLEMENT, "proposeSettlement",
                        [agreement.onchain_id, terms, seq, cumulative, digest, signature],
                        {"seq": seq, "cumulative": cumulative})


def _refund_request_stranded(agreement: UsageAgreement, *, now: int) -> bool:
    """A Masumi purchase whose buyer asked for its refund before the result, its challenge signed until unlockTime
    (the SDK signs no later: DESIGN 8b): a result's proposal from MASUMI_MIN_DISPUTE_SECONDS before unlockTime on
    (delayed: the node down) can no longer be disputed with it (`signature_expired`, then `unlock_time_passed`), and
    would pay the seller at its window's end. Left unproposed, the escrow is reclaimed for the buyer after the
    contract's grace, as a refund without a result that late is (`purchases_tick`). Not a request asked after the
    result (`selectors.purchase_signed_refund_unlock_time`): the result is the seller's claim, proposed."""
    unlock = selectors.purchase_signed_refund_unlock_time(agreement_id=agreement.pk)
    return unlock is not None and now + settings.MASUMI_MIN_DISPUTE_SECONDS > unlock


@logs_name_the_agreement
def settlement_propose_refund(*, agreement_id, now: int,
                              still_wanted: Callable[[], bool] = lambda: True
                              ) -> ChainTransaction | None:
    """A Masumi purchase whose buyer asked for its refund before the result, the result's proposal queued in time
    but mined by the relayer too late for the buyer's challenge (signed until unlockTime) to dispute it: the
    platform proposes a zero receipt above it (the receipt signer's, seq + 1), which restarts the window, and at its
    end `finalize` pays the buyer the whole deposit, as the reclaim of a proposal never sent that late does
    (`_refund_request_stranded`). Once; None when nothing is left to do (`now`: the chain's clock), or when
    `still_wanted()`, asked under the agreement's lock, says what asked for it was withdrawn meanwhile (the
    buyer's refund request, whose withdrawal takes that lock too)."""
    agreement = UsageAgreement.objects.get(pk=agreement_id)
    if not _refund_proposal_may_run(agreement):
        return None
    terms = selectors.escrow_terms(agreement=agreement)  # chain reads: before the row lock
    state, deadline, last_seq, amount = chain.call(
        chain.escrow_contract().functions.getEscrow(agreement.onchain_id, terms).call)[:4]
    if list(selectors.EscrowState)[state] != selectors.EscrowState.PROPOSED or deadline <= now or amount == 0:
        return None
    key = chainconfig.receipt_signer_key(terms[3])
    if key is None:
        _refund_proposal_unsignable(agreement_id, signer=terms[3], still_wanted=still_wanted)
        return None
    seq = int(last_seq) + 1
    signature = receipt_sign(key, receipts.usage_receipt_digest(
        chain_id=agreement.chain_id, escrow_address=chainconfig.escrow_address(), agreement_id=agreement.onchain_id,
        seq=seq, cumulative_amount=0, usage_digest=receipts.ZERO_DIGEST))
    with transaction.atomic():
        agreement = UsageAgreement.objects.select_for_update().get(pk=agreement_id)
        if not _refund_proposal_may_run(agreement) or not still_wanted():
            return None
        return _enqueue(agreement, TxPurpose.MASUMI_REFUND_PROPOSAL, "proposeSettlement",
                        [agreement.onchain_id, terms, seq, 0, receipts.ZERO_DIGEST, signature],
                        {"seq": seq, "cumulative": 0})


def _refund_proposal_unsignable(agreement_id, *, signer: str, still_wanted: Callable[[], bool]) -> None:
    """No key of `signer`, the receipt signer the escrow names (rotated away, not kept in
    RECEIPT_SIGNER_RETIRED_PRIVATE_KEYS), signs the zero proposal: recorded once as a proposal never built, which the
    dashboard lists until the key is configured again; the ticks try nothing meanwhile (`_refund_proposal_may_run`).
    Each logged an error and did nothing, for the whole window. Nothing is queued: the buyer may still withdraw its
    request, and the key put back, the next tick proposes."""
    with transaction.atomic():
        agreement = UsageAgreement.objects.select_for_update().get(pk=agreement_id)
        if not _refund_proposal_may_run(agreement) or not still_wanted():
            return
        reason = (f"the escrow's receipt signer {signer} has no key configured (RECEIPT_SIGNER_PRIVATE_KEY or "
                  "RECEIPT_SIGNER_RETIRED_PRIVATE_KEYS): the zero proposal refunding the buyer cannot be signed, and "
                  "the result's proposal pays the seller at its window's end")
        relayer.transaction_record_unsent(purpose=TxPurpose.MASUMI_REFUND_PROPOSAL, to=chainconfig.escrow_address(),
                                          agreement_id=agreement.pk, reason=reason,
                                          context={selectors.RECEIPT_SIGNER_MISSING: signer})
    logger.error("masumi refund proposal not sent: the escrow's receipt signer key is not kept",
                 extra={"agreement_id": str(agreement_id), "receipt_signer": signer})


def _refund_proposal_may_run(agreement: UsageAgreement) -> bool:
    """In the window, no challenge nor proposal under way, and no refund proposal sent before (once). One that failed
    is sent again as a settlement proposal is (`_proposal_due`): one reverting for good (the relayer's key without
    the operator role) was queued again at every tick, a failed transaction a tick for the whole window. None while
    the receipt signer's key it lacked is still missing (`selectors.proposal_unsignable`)."""
    if (agreement.status != AgreementStatus.IN_CHALLENGE or _challenge_under_way(agreement)
            or ChainTransaction.objects.filter(
                agreement_id=agreement.pk, purpose=TxPurpose.PROPOSE_SETTLEMENT,
                status__in=[TxStatus.QUEUED, TxStatus.SUBMITTED, TxStatus.MINED]).exists()
            or selectors.live_transaction(agreement_id=agreement.pk, purpose=TxPurpose.MASUMI_REFUND_PROPOSAL)):
        return False
    failures = selectors.proposal_failures(agreement_id=agreement.pk, purpose=TxPurpose.MASUMI_REFUND_PROPOSAL)
    return _proposal_due(failures) and not selectors.proposal_unsignable(failures)


@logs_name_the_agreement
def settlement_repropose(*, agreement_id, now: int) -> ChainTransaction | None:
    """Queue proposeSettlement with the agreement's last receipt when the proposal on-chain is an earlier one and its
    window is open. Anyone's proposal with a higher seq restarts the contract's window, so a seller that proposes its
    own receipts one at a time, each just before the window closes, would hold the buyer's refund for as many
    windows as it has receipts: once the last receipt is proposed there is none higher, and the escrow settles one
    window later at what was used (the buyer has that window to challenge the amount). Safe to call repeatedly.

    `now`: the chain's clock, read by the caller."""
    agreement = UsageAgreement.objects.get(pk=agreement_id)
    if not _repropose_may_run(agreement):
        return None
    terms = selectors.escrow_terms(agreement=agreement)  # chain reads: before the row lock
    # The chain, not our copy of it, says what is proposed and until when.
    state, challenge_deadline, last_seq = chain.call(
        chain.escrow_contract().functions.getEscrow(agreement.onchain_id, terms).call)[:3]
    if list(selectors.EscrowState)[state] != selectors.EscrowState.PROPOSED or challenge_deadline <= now:
        return None
    with transaction.atomic():
        agreement = UsageAgreement.objects.select_for_update().get(pk=agreement_id)
        if not _repropose_may_run(agreement) or _challenge_goes_first(agreement, window_end=challenge_deadline,
                                                                      now=now):
            return None
        seq, cumulative, digest, signature = _final_receipt(agreement, terms=terms)
        if seq <= last_seq or not _proposal_due(selectors.proposal_failures(agreement_id=agreement.pk)):
            return None
        return _enqueue(agreement, TxPurpose.PROPOSE_SETTLEMENT, "proposeSettlement",
                        [agreement.onchain_id, terms, seq, cumulative, digest, signature],
                        {"seq": seq, "cumulative": cumulative})


def _repropose_may_run(agreement: UsageAgreement) -> bool:
    return agreement.status == AgreementStatus.IN_CHALLENGE and not selectors.live_transaction(
        agreement_id=agreement.pk, purpose=TxPurpose.PROPOSE_SETTLEMENT)


def _challenge_goes_first(agreement: UsageAgreement, *, window_end: int, now: int) -> bool:
    """The buyer's challenge is under way (`_challenge_under_way`) and may still be mined in the window ending at
    `window_end` (the chain's): until CHALLENGE_REPROPOSE_MARGIN_SECONDS (at most half the agreement's window) before
    its end, by the chain's clock `now`. It was held back until the window closed: a challenge stuck in the relayer
    (a gas spike, the node down, the fee cap) had the seller's lower proposal finalized, though it held receipts for
    more. From then on the re-proposal goes: it restarts the window, and the challenge mined after it disputes it (a
    signature expired meanwhile fails, told to the buyer, who has the new window to challenge again)."""
    margin = min(settings.CHALLENGE_REPROPOSE_MARGIN_SECONDS, agreement.challenge_window_seconds // 2)
    return now < window_end - margin and _challenge_under_way(agreement)


def _challenge_under_way(agreement: UsageAgreement) -> bool:
    """The buyer's challenge is being sent: it disputes whatever is proposed when it is mined, and a proposal of ours
    mined after it reverts (InvalidState: disputed) at the relayer's gas. One that fails leaves the way open again."""
    return selectors.live_transaction(agreement_id=agreement.pk, purpose=TxPurpose.CHALLENGE) is not None


def _proposal_period_over(terms: tuple, *, now: int) -> bool:
    """The chain's clock has reached the escrow's reclaimAfter (snapshotted at activation, in its terms): no first
    proposal can run any more, and `reclaim` can."""
    return now >= chain.terms_reclaim_after(terms)


def _proposal_due(failures: list[ChainTransaction]) -> bool:
    """After a failed proposal the next waits SETTLEMENT_PROPOSE_BACKOFF_SECONDS, doubling each time; after
    SETTLEMENT_PROPOSE_MAX_ATTEMPTS failures none is sent until an operator retries (the dashboard lists it). Only
    those sent count (`selectors.proposal_attempts`)."""
    attempts = selectors.proposal_attempts(failures)
    if not attempts:
        return True
    if len(attempts) >= settings.SETTLEMENT_PROPOSE_MAX_ATTEMPTS:
        return False
    backoff = settings.SETTLEMENT_PROPOSE_BACKOFF_SECONDS * 2 ** (len(attempts) - 1)
    return timezone.now() >= attempts[0].updated_at + timedelta(seconds=backoff)


def resolution_due(*, agreement_id) -> bool:
    """Whether the platform's own decision of a dispute (a Masumi purchase's release, `purchases.purchases_tick`) may
    be queued: its failed resolves back off and stop as proposals do (`_proposal_due`), then wait for an operator's
    retry (the dashboard lists them). Queued again at every tick, one the chain refused every time (the relayer
    without the arbiter role) failed for ever, unseen."""
    return _proposal_due(selectors.proposal_failures(agreement_id=agreement_id, purpose=TxPurpose.RESOLVE))


def resolution_given_up(*, agreement_id) -> ChainTransaction | None:
    """The latest of the failed resolves after which `resolution_due` waits for an operator; None while it does not."""
    attempts = selectors.proposal_attempts(selectors.proposal_failures(agreement_id=agreement_id,
                                                                       purpose=TxPurpose.RESOLVE))
    return attempts[0] if len(attempts) >= settings.SETTLEMENT_PROPOSE_MAX_ATTEMPTS else None


def _proposal_evidence(tx: ChainTransaction) -> dict:
    if tx.status != TxStatus.CONFIRMED:
        # The seller (or anyone with the operator role) may propose too: ours failed (StaleReceipt, InvalidState)
        # because theirs of the same or a higher receipt was mined first, which did what ours would have. Then no
        # failure on the dashboard, none the proposal backoff counts (`selectors.proposal_failures`).
        ours = tx.context.get("seq")
        return _done_by_another(tx, covers=lambda args: ours is not None and int(args["seq"]) >= int(ours))
    # The window's end from our proposal's own event: the escrow's challengeDeadline word is the dispute's timeout
    # once the buyer challenged it, which it may have before this receipt is read (the relayer acts at depth).
    mined = relayer.concluded_receipt(tx)
    [proposed] = _escrow_events(tx, "SettlementProposed", mined)
    return {"challenge_deadline": int(proposed["args"]["challengeDeadline"])}


def _escrow_events(tx: ChainTransaction, name: str, mined: chain.Receipt) -> list:
    """Escrow event `name` in the receipt `mined`, of the escrow contract and `tx`'s agreement."""
    escrow = chain.escrow_contract()
    return [event for event in getattr(escrow.events, name)().process_receipt({"logs": mined.logs}, errors=DISCARD)
            if event["address"] == escrow.address and _hex32(event["args"]["agreementId"]) == tx.agreement.onchain_id]


def _proposal_outcome(tx: ChainTransaction) -> None:
    if tx.status != TxStatus.CONFIRMED:
        if tx.outcome_evidence.get(DONE_BY):
            # The indexer applies their proposal; the tick re-proposes a higher receipt, if any, without backing off.
            logger.info("settlement proposal not needed: another transaction proposed the receipt first",
                        extra={"agreement_id": str(tx.agreement_id), "done_by": tx.outcome_evidence[DONE_BY]})
            return
        logger.error("settlement proposal failed", extra={"agreement_id": str(tx.agreement_id),
                                                          "reason": tx.failure_reason})
        return  # stays active with completion requested: the tick tries again (`_proposal_due`)
    deadline = datetime.fromtimestamp(tx.outcome_evidence["challenge_deadline"], tz=UTC)
    agreement_services.agreement_settlement_proposed(
        agreement_id=tx.agreement_id, challenge_deadline=deadline, amount=tx.context["cumulative"],
        seq=tx.context["seq"], tx_hash=tx.mined_tx_hash)


# --- challenge and resolve -----------------------------------------------------------------------------------

def challenge_typed_data(*, agreement: UsageAgreement, deadline: int) -> dict:
    return typed_data.challenge(chain_id=agreement.chain_id, escrow_address=chainconfig.escrow_address(),
                                agreement_id=agreement.onchain_id, deadline=deadline)


def _books_may_lag(agreement: UsageAgreement, *, now: int) -> bool:
    """Whether a proposal may be on the escrow that our books do not hold yet (the indexer acts at depth): the
    agreement is still active (the seller, or anyone with the operator role, proposed itself), or its window in
    the books is over (a re-proposal with a higher receipt restarted it on-chain)."""
    if agreement.status == AgreementStatus.ACTIVE:
        return True
    return (can_challenge(agreement) and agreement.challenge_deadline is not None
            and agreement.challenge_deadline.timestamp() <= now)


def _unindexed_proposal(agreement: UsageAgreement, *, now: int) -> dict | None:
    """The proposal on the escrow, read from the chain where our books may lag behind it (`_books_may_lag`; a node
    call: outside any database transaction); None when they cannot or nothing is proposed there.
    {"challenge_deadline", "seq", "amount"} of the proposal."""
    if not _books_may_lag(agreement, now=now):
        return None
    terms = selectors.escrow_terms(agreement=agreement)
    state, challenge_deadline, seq, amount = chain.call(
        chain.escrow_contract().functions.getEscrow(agreement.onchain_id, terms).call)[:4]
    if list(selectors.EscrowState)[state] != selectors.EscrowState.PROPOSED:
        return None
    return {"challenge_deadline": int(challenge_deadline), "seq": int(seq), "amount": int(amount)}


def _nothing_to_challenge(agreement: UsageAgreement) -> Conflict:
    return Conflict(f"Nothing to challenge while the agreement is {agreement.status}.", code="invalid_transition",
                    details={"status": agreement.status})


def challenge_deadline(*, agreement: UsageAgreement) -> datetime:
    """The end of the challenge window the buyer may challenge in now: the books' or, where they may lag behind the
    chain, the chain's (`_unindexed_proposal`). Conflict invalid_transition when nothing is proposed."""
    if not can_challenge(agreement) and agreement.status != AgreementStatus.ACTIVE:
        raise _nothing_to_challenge(agreement)
    proposal = _unindexed_proposal(agreement, now=chain_clock.chain_now_for_request())
    if proposal is not None:
        return datetime.fromtimestamp(proposal["challenge_deadline"], tz=UTC)
    if not can_challenge(agreement):
        raise _nothing_to_challenge(agreement)
    return agreement.challenge_deadline


@logs_name_the_agreement
def settlement_challenge(*, agreement: UsageAgreement, buyer: Agent, signature: str, deadline: int,
                         reason: str, evidence: str = "",
                         still_wanted: Callable[[], bool] = lambda: True) -> ChainTransaction:
    """The buyer disputes the proposed amount within the window; submitted on-chain with its signature.

    Where the books may lag behind the chain (`_books_may_lag`: a proposal the seller sent itself, a re-proposal
    that restarted the window, neither indexed yet) the window is the chain's: the transaction carries the
    proposal read, and its confirmation records it first when the books still say active.

    `still_wanted()`: asked under the agreement's lock before the challenge is queued; false when what asked for it
    was withdrawn meanwhile (a Masumi refund request: 409 `refund_request_withdrawn`, nothing queued)."""
    if agreement.buyer_id != buyer.pk:
        raise Forbidden("Only the buyer challenges a settlement.", code="buyer_only")
    # Not refused by, nor charged to, the relay budget (relayer.relay_budget_check): a challenge is the buyer's
    # defence, and what reverts one after its simulation (mined past its deadline or the window) is mostly not the
    # buyer's doing; an escrow is disputed once, which bounds them.
    if not can_challenge(agreement) and agreement.status != AgreementStatus.ACTIVE:
        raise _nothing_to_challenge(agreement)  # checked again under the lock; first so that nothing is read
    # The block a transaction sent now gets: the contract refuses a challenge from the deadline's second on.
    now = chain_clock.next_block_clock_for_refusal()
    _purchase_unlock_check(agreement, now=now)
    proposal = _unindexed_proposal(agreement, now=now)
    if proposal is None and not can_challenge(agreement):
        raise _nothing_to_challenge(agreement)
    terms = selectors.escrow_terms(agreement=agreement)
    args = [agreement.onchain_id, terms, deadline, signature]
    _challenge_check(agreement, proposal=proposal, now=now, deadline=deadline, signature=signature)
    # Checked, then simulated as the relayer would send it, outside any DB transaction (it asks the chain): the escrow
    # challenged or finalized on-chain while the books lag is 409 transaction_would_revert, nothing queued.
    relayer.transaction_preflight(to=chainconfig.escrow_address(),
                                  data=chain.escrow_contract().encode_abi("challengeWithSig", args=args))
    with transaction.atomic():
        agreement = UsageAgreement.objects.select_for_update().get(pk=agreement.pk)
        _challenge_check(agreement, proposal=proposal, now=now, deadline=deadline, signature=signature)
        if not still_wanted():
            raise Conflict("The refund request was withdrawn.", code="refund_request_withdrawn")
        context = {"reason": reason, "evidence": evidence}
        if proposal is not None:
            context[UNINDEXED_PROPOSAL] = proposal
        return _enqueue(agreement, TxPurpose.CHALLENGE, "challengeWithSig", args, context)


def _purchase_unlock_check(agreement: UsageAgreement, *, now: int) -> None:
    """A Masumi purchase's seller is paid from its unlockTime on (its refund requests end there). The window of a
    result's proposal runs unlockTime − purchase time from the proposal, past unlockTime by as long as the result
    took: a dispute there, through these endpoints, took a delivered result's payment to the buyer."""
    unlock = selectors.purchase_unlock_time(agreement_id=agreement.pk)
    if unlock is not None and now >= unlock:
        raise Conflict("unlockTime has passed; the seller's payment can no longer be disputed.",
                       code="unlock_time_passed", details={"unlock_time": unlock})


def _challenge_check(agreement: UsageAgreement, *, proposal: dict | None, now: int, deadline: int,
                     signature: str) -> None:
    """What `settlement_challenge` refuses before it asks the chain, and again under the agreement's lock."""
    if proposal is not None and (can_challenge(agreement) or agreement.status == AgreementStatus.ACTIVE):
        window_end = datetime.fromtimestamp(proposal["challenge_deadline"], tz=UTC)
    elif can_challenge(agreement):
        window_end = agreement.challenge_deadline
    else:
        raise _nothing_to_challenge(agreement)
    if window_end and window_end.timestamp() <= now:
        raise Conflict("The challenge window has closed.", code="challenge_window_closed",
                       details={"challenge_deadline": window_end.isoformat()})
    if deadline <= now:
        raise InvalidInput("The signature's deadline has passed.", code="signature_expired")
    # A deadline the relayer's send may not make (SignatureExpired) reverts at its expense and leaves the escrow
    # undisputed, asked again as often as the buyer likes: the window's end, or at least this far ahead.
    soonest = now + settings.CHALLENGE_SIGNATURE_MIN_VALIDITY
    if window_end is not None:
        soonest = min(soonest, int(window_end.timestamp()))
    if deadline < soonest:
        raise InvalidInput(f"The signature's deadline is too soon for the challenge to be mined: sign one at least "
                           f"{soonest - now} s ahead (the package's deadline, the window's end).",
                           code="signature_expired", details={"deadline_at_least": soonest})
    signer_require(typed=challenge_typed_data(agreement=agreement, deadline=deadline), signature=signature,
                   expected=agreement.buyer_wallet_address, field="signature")
    if selectors.live_transaction(agreement_id=agreement.pk, purpose=TxPurpose.CHALLENGE):
        raise Conflict("A challenge is already being submitted.", code="challenge_in_progress")


# The context key of a challenge of a proposal the indexer had not applied when it was queued.
UNINDEXED_PROPOSAL = "unindexed_proposal"
DEFAULT_CHALLENGE_REASON = "challenged on-chain by the buyer"


def challenge_statement(*, agreement_id, tx_hash: str) -> tuple[str, str]:
    """The reason and the evidence the buyer gave for the challenge mined in `tx_hash`: those of our challenge
    transaction sent as `tx_hash`, else of our latest one (a copy of the buyer's signed challenge mined first, ours
    reverting; the buyer's own call), else a generic reason. An escrow is disputed once, so every challenge the buyer
    asked us for is of that dispute. So the indexer applying the Challenged event before the relayer's receipt keeps
    them."""
    ours = ChainTransaction.objects.filter(agreement_id=agreement_id, purpose=TxPurpose.CHALLENGE)
    sent = ours.filter(attempts__tx_hash=tx_hash).first() if tx_hash else None
    if sent is None:
        sent = ours.order_by("-created_at", "-pk").first()
    context = sent.context if sent is not None else {}
    return context.get("reason") or DEFAULT_CHALLENGE_REASON, context.get("evidence") or ""


def _challenge_evidence(tx: ChainTransaction) -> dict:
    """For one that failed, whoever challenged the escrow in its place (`_done_by_another`): the buyer's signed
    challenge is bearer, and a copy read from our pending transaction, or the buyer's own call, may be mined first."""
    return {} if tx.status == TxStatus.CONFIRMED else _done_by_another(tx)


def _challenge_outcome(tx: ChainTransaction) -> None:
    mined_as = tx.mined_tx_hash
    if tx.status != TxStatus.CONFIRMED:
        mined_as = tx.outcome_evidence.get(DONE_BY)
        if not mined_as:
            agreement_services.agreement_challenge_failed(agreement_id=tx.agreement_id, transaction_id=tx.pk,
                                                          failure=tx.failure_reason)
            return
        logger.info("challenge not needed: another transaction challenged the escrow first",
                    extra={"agreement_id": str(tx.agreement_id), "done_by": mined_as})
    proposal = tx.context.get(UNINDEXED_PROPOSAL)
    if proposal and UsageAgreement.objects.select_for_update().get(pk=tx.agreement_id).status == AgreementStatus.ACTIVE:
        # The seller's own proposal, still not indexed: the challenge that disputed it is proof it was there.
        agreement_services.agreement_settlement_proposed(
            agreement_id=tx.agreement_id, challenge_deadline=datetime.fromtimestamp(proposal["challenge_deadline"],
                                                                                    tz=UTC),
            amount=proposal["amount"], seq=proposal["seq"], tx_hash="")
    agreement_services.agreement_disputed(agreement_id=tx.agreement_id,
                                          reason=tx.context.get("reason") or DEFAULT_CHALLENGE_REASON,
                                          evidence=tx.context.get("evidence") or "", tx_hash=mined_as)


# The code of a resolution refused because the dispute's on-chain timeout is over (the escrow is the buyer's).
DISPUTE_TIMED_OUT = "dispute_timed_out"


@dataclass(frozen=True)
class Resolution:
    """An arbiter's decision checked against the chain (`settlement_resolution_prepare`): what
    `settlement_resolution_record` queues, with the escrow's terms it is sent with."""

    agreement: UsageAgreement
    seller_amount: int
    terms: tuple


@logs_name_the_agreement
def settlement_resolve(*, agreement: UsageAgreement, seller_amount: int,
                       operator: AbstractBaseUser | None) -> ChainTransaction:
    """The arbiter's decision of a dispute: `settlement_resolution_prepare` (reads the chain: call outside any
    database transaction), then `settlement_resolution_record`."""
    return settlement_resolution_record(
        resolution=settlement_resolution_prepare(agreement=agreement, seller_amount=seller_amount), operator=operator)


@logs_name_the_agreement
def settlement_resolution_prepare(*, agreement: UsageAgreement, seller_amount: int) -> Resolution:
    """The arbiter's decision of a dispute checked against the chain (a chain read: before any database transaction
    opens, an idempotent request's too). Not once the dispute timed out (409 `dispute_timed_out`): the contract's
    `resolve` reverts from then on, and the escrow is the buyer's (`_finalize_timed_out_dispute`). Not more to the
    seller than the proposal the buyer disputed (400 `amount_exceeds_proposal`): what its signed receipts add up to
    is all the seller claimed, and the dispute asks whether that is too much (the contract's `resolve` reverts
    AmountExceedsProposal too; a deployment from before that bound it by the deposit only)."""
    if seller_amount > agreement.deposit_amount:
        raise InvalidInput("The seller amount exceeds the deposit.", code="amount_exceeds_deposit")
    # The terms too from the chain: from the node while the indexer has not applied the activation.
    with chain.unavailable_as_503():
        terms = selectors.escrow_terms(agreement=agreement)
        escrow = _escrow_read(agreement, terms=terms)
        timeout = _dispute_timed_out_at(agreement, escrow=escrow)
        if timeout is not None:
            raise Conflict("The dispute timed out: the arbiter may no longer resolve it, and the whole deposit goes "
                           "back to the buyer.", code=DISPUTE_TIMED_OUT,
                           details={"timed_out_at": datetime.fromtimestamp(timeout, tz=UTC).isoformat()})
    # While Disputed the escrow's settledAmount is the disputed proposal's cumulative amount.
    state, _deadline, proposed = escrow
    if state == selectors.EscrowState.DISPUTED and seller_amount > proposed:
        raise InvalidInput("The seller amount exceeds the settlement the seller proposed and the buyer disputed.",
                           code="amount_exceeds_proposal", details={"proposed_atomic": int(proposed)})
    return Resolution(agreement=agreement, seller_amount=seller_amount, terms=terms)


def settlement_resolution_record(*, resolution: Resolution, operator: AbstractBaseUser | None) -> ChainTransaction:
    """The resolve transaction queued (no chain call: inside an idempotent request's transaction too). Not by an
    operator who owns the buyer or the seller (403 `operator_owns_a_party`,
    `agreement_services.operator_owns_no_party_require`), who would decide their own dispute (`operator`: the staff
    user deciding, None for the platform's own refunds); another operator does."""
    seller_amount = resolution.seller_amount
    with transaction.atomic():
        agreement = UsageAgreement.objects.select_for_update().get(pk=resolution.agreement.pk)
        agreement_services.operator_owns_no_party_require(operator=operator, agreement_ids=[agreement.pk])
        if not can_resolve(agreement):
            raise Conflict(f"Only a disputed agreement is resolved; this one is {agreement.status}.",
                           code="invalid_transition", details={"status": agreement.status})
        if selectors.live_transaction(agreement_id=agreement.pk, purpose=TxPurpose.RESOLVE):
            raise Conflict("A resolution is already being submitted.", code="resolution_in_progress")
        return _enqueue(agreement, TxPurpose.RESOLVE, "resolve",
                        [agreement.onchain_id, resolution.terms, seller_amount],
                        {"seller_amount": seller_amount, "operator": getattr(operator, "username", "")})


def settlement_uphold(*, agreement: UsageAgreement) -> ChainTransaction:
    """The platform's decision of a dispute for the seller: the arbiter resolves it with the whole proposal the buyer
    disputed (the escrow's settledAmount while Disputed), refused as `settlement_resolve` refuses."""
    with chain.unavailable_as_503():
        _state, _deadline, proposed = _escrow_read(agreement, terms=selectors.escrow_terms(agreement=agreement))
    return settlement_resolve(agreement=agreement, seller_amount=proposed, operator=None)


def settlement_resolved(*, agreement_id, seller_amount: int, tx_hash: str, terms: tuple, operator: str = "") -> None:
    """The arbiter's resolution is on-chain (our relayer's or anyone's): settling, and finalize queued once, with
    the escrow's `terms` (read before: no chain call here). Call inside a DB transaction."""
    agreement = agreement_services.agreement_settling(
        agreement_id=agreement_id, reason=f"arbiter resolved: {seller_amount} to the seller",
        data={"tx_hash": tx_hash, "operator": operator})
    if is_settling(agreement) and not selectors.live_transaction(agreement_id=agreement_id,
                                                                        purpose=TxPurpose.FINALIZE):
        _enqueue(agreement, TxPurpose.FINALIZE, "finalize", [agreement.onchain_id, terms])


def _resolve_evidence(tx: ChainTransaction) -> dict:
    if tx.status != TxStatus.CONFIRMED:
        return {}
    return {"terms": chain.to_json(selectors.escrow_terms(agreement=tx.agreement))}


def _resolve_outcome(tx: ChainTransaction) -> None:
    if tx.status == TxStatus.CONFIRMED:
        settlement_resolved(agreement_id=tx.agreement_id, seller_amount=tx.context["seller_amount"],
                            tx_hash=tx.mined_tx_hash, terms=tuple(tx.outcome_evidence["terms"]),
                            operator=tx.context.get("operator", ""))


# --- finalize and reclaim ------------------------------------------------------------------------------------

def _finalize_evidence(tx: ChainTransaction) -> dict:
    """The payouts, from the Settled event and the token transfers in the receipt; for one that failed, whoever
    settled the escrow in its place (`_done_by_another`)."""
    if tx.status != TxStatus.CONFIRMED:
        return _done_by_another(tx)
    seller_amount, buyer_amount, consistent = _payouts(tx)
    return {"seller_amount": seller_amount, "buyer_amount": buyer_amount, "transfers_match": consistent}


def _done_by_another(tx: ChainTransaction, *, covers=lambda args: True) -> dict:
    """Anyone may call finalize and reclaim, propose a receipt and send the buyer's signed challenge: a failed one of
    ours may have failed because another was mined first (InvalidState: the escrow is settled, or reclaimed), which
    did what ours would have (`covers` its event's args: a proposal of a receipt as high as ours). Then that
    transaction and its block (relayer.EVIDENCE_BLOCK: a reorg that takes it reopens ours, sent again) and what its
    event says; else nothing. The escrow's state is read first, so one that failed for another reason reads no logs."""
    done_states, event = _CLOSES[tx.purpose]
    agreement = tx.agreement
    terms = selectors.escrow_terms(agreement=agreement)
    state = chain.call(chain.escrow_contract().functions.getEscrow(agreement.onchain_id, terms).call)[0]
    if list(selectors.EscrowState)[state] not in done_states:
        return {}
    closed = chain.escrow_closing_event(event, agreement.onchain_id,
                                        buyer=Web3.to_checksum_address(agreement.buyer_wallet_address))
    if closed is None or not covers(closed["args"]):
        return {}
    return {DONE_BY: _hex32(closed["transactionHash"]),
            relayer.EVIDENCE_BLOCK: {"number": closed["blockNumber"], "hash": _hex32(closed["blockHash"])},
            "event": event, "args": chain.to_json(dict(closed["args"]))}


# What a finalize, a reclaim, a challenge and a proposal leave the escrow in (a disputed escrow may be resolved and
# settled since), and the event that says so (the newest: a proposal's seq is the escrow's lastSeq).
_CLOSES = {TxPurpose.PROPOSE_SETTLEMENT: ({selectors.EscrowState.PROPOSED, selectors.EscrowState.DISPUTED,
                                          selectors.EscrowState.RESOLVED, selectors.EscrowState.SETTLED},
                                         "SettlementProposed"),
           TxPurpose.FINALIZE: ({selectors.EscrowState.SETTLED}, "Settled"),
           TxPurpose.RECLAIM: ({selectors.EscrowState.RECLAIMED}, "Reclaimed"),
           TxPurpose.CHALLENGE: ({selectors.EscrowState.DISPUTED, selectors.EscrowState.RESOLVED,
                                  selectors.EscrowState.SETTLED}, "Challenged")}
_CLOSES[TxPurpose.MASUMI_REFUND_PROPOSAL] = _CLOSES[TxPurpose.PROPOSE_SETTLEMENT]
# The evidence key of a failed transaction of ours naming the one that did its job (`_done_by_another`).
DONE_BY = "done_by"


def _hex32(value) -> str:
    return "0x" + bytes(value).hex().removeprefix("0x")


def _payouts(tx: ChainTransaction) -> tuple[int, int, bool]:
    """(seller amount, buyer amount, whether the token transfers in the receipt account for them)."""
    receipt = relayer.concluded_receipt(tx)
    escrow, token = chain.escrow_contract(), chain.token_contract(tx.agreement.token_address or None)
    [settled] = _escrow_events(tx, "Settled", receipt)
    seller_amount, buyer_amount = settled["args"]["sellerAmount"], settled["args"]["buyerAmount"]
    moved = {}
    for transfer in token.events.Transfer().process_receipt({"logs": receipt.logs}, errors=DISCARD):
        if transfer["address"] == token.address and transfer["args"]["from"] == escrow.address:
            moved[transfer["args"]["to"]] = moved.get(transfer["args"]["to"], 0) + transfer["args"]["value"]
    for deferred in _escrow_events(tx, "PayoutDeferred", receipt):
        party = deferred["args"]["party"]
        moved[party] = moved.get(party, 0) + deferred["args"]["amount"]
    seller = Web3.to_checksum_address(tx.agreement.seller_wallet_address)
    buyer = Web3.to_checksum_address(tx.agreement.buyer_wallet_address)
    consistent = moved.get(seller, 0) == seller_amount and moved.get(buyer, 0) == buyer_amount
    return seller_amount, buyer_amount, consistent


def _finalize_outcome(tx: ChainTransaction) -> None:
    if tx.status != TxStatus.CONFIRMED:
        if tx.outcome_evidence.get(DONE_BY):
            logger.info("finalize not needed: another transaction settled the escrow first",
                        extra={"agreement_id": str(tx.agreement_id), "done_by": tx.outcome_evidence[DONE_BY]})
        else:
            logger.error("finalize failed", extra={"agreement_id": str(tx.agreement_id), "reason": tx.failure_reason})
        return
    payouts = tx.outcome_evidence
    if not payouts["transfers_match"]:
        logger.error("payout transfers do not match the Settled event", extra={"agreement_id": str(tx.agreement_id)})
    agreement_services.agreement_settled(agreement_id=tx.agreement_id, seller_payout=payouts["seller_amount"],
                                         buyer_refund=payouts["buyer_amount"], tx_hash=tx.mined_tx_hash)


def _reclaim_evidence(tx: ChainTransaction) -> dict:
    """For one that failed, whoever reclaimed the escrow in its place (`_done_by_another`)."""
    return {} if tx.status == TxStatus.CONFIRMED else _done_by_another(tx)


def _reclaim_outcome(tx: ChainTransaction) -> None:
    if tx.status == TxStatus.CONFIRMED:
        agreement_services.agreement_refunded(agreement_id=tx.agreement_id, amount=tx.agreement.deposit_amount,
                                              tx_hash=tx.mined_tx_hash)


def _payout_reopened(tx: ChainTransaction) -> None:
    """A confirmed finalize or reclaim whose block a reorg took: the indexer moves its agreement back itself once it
    applied the Settled or Reclaimed event; a reorg it had not applied yet leaves that to this handler."""
    if tx.status == TxStatus.CONFIRMED:
        agreement_services.agreement_payout_undone(agreement_id=tx.agreement_id, tx_hash=tx.mined_tx_hash)


def settlement_tick(*, now: int | None = None) -> dict[str, int]:
    """Everything due, in one pass (the beat task), at most SETTLEMENT_TICK_BATCH agreements a step (`_in_turn`: the
    next tick takes the rest). Each step is idempotent and safe to run concurrently. A node of
    another chain than CHAIN_ID has nothing read from it (`chain.node_chain_check`: WrongChain, the task failing
    loudly): its escrows' states moved ours (a finalize's agreement to settling, a reclaim's completion asked for)."""
    chain.node_chain_check()
    now = now if now is not None else chain_clock.chain_now()
    now_dt = datetime.fromtimestamp(now, tz=UTC)
    done = {"expired": 0, "proposed": 0, "finalizing": 0, "reclaiming": 0}
    failures = sweeps.RowFailures("settlement tick")
    # Active agreements past their end: used ones complete (the proposal below); from the escrow's reclaimAfter on,
    # when nothing can be proposed any more, every one whose escrow has nothing proposed is reclaimed for the buyer.
    # A chain read that fails for one agreement (a node timing out, an escrow a reorg took) is logged and the others
    # go on: raised, it would leave every agreement after it undone at every tick.
    for agreement in _in_turn(agreement_selectors.agreements_past_expiry(now=now_dt), "expiry", by="expires_at"):
        with agreement_context(agreement.pk), _goes_on_after_chain_error("expiry", agreement.pk, failures):
            terms = selectors.escrow_terms(agreement=agreement)
            if _proposal_period_over(terms, now=now):
                if _reclaim(agreement, terms=terms, now=now):
                    done["reclaiming"] += 1
            elif (agreement.used or agreement.reserved) and agreement.completion_requested_at is None:
                agreement_services.completion_request(agreement=agreement, reason="expired")
                done["expired"] += 1
    stale = agreement_selectors.calls_stale_before(now=timezone.now())
    for agreement in _in_turn(agreement_selectors.agreements_ready_to_propose(stale_reservation_before=stale),
                              "proposal", by="completion_requested_at"):
        with agreement_context(agreement.pk), _goes_on_after_chain_error("proposal", agreement.pk, failures):
            if settlement_propose(agreement_id=agreement.pk, now=now):
                done["proposed"] += 1
    for agreement in _in_turn(agreement_selectors.agreements_proposed_below_their_last_receipt(now=now_dt),
                              "re-proposal", by="challenge_deadline"):
        with agreement_context(agreement.pk), _goes_on_after_chain_error("proposal", agreement.pk, failures):
            if settlement_repropose(agreement_id=agreement.pk, now=now):
                done["proposed"] += 1
    for agreement in _in_turn(agreement_selectors.agreements_in_status(status=AgreementStatus.IN_CHALLENGE).filter(
            challenge_deadline__lte=now_dt), "finalize", by="challenge_deadline"):
        with agreement_context(agreement.pk), _goes_on_after_chain_error("finalize", agreement.pk, failures):
            if _finalize(agreement, now=now):
                done["finalizing"] += 1
    for agreement in _disputes_maybe_timed_out(now=now_dt):
        with agreement_context(agreement.pk), _goes_on_after_chain_error("dispute timeout", agreement.pk, failures):
            if _finalize_timed_out_dispute(agreement, now=now):
                done["finalizing"] += 1
    failures.raise_if_any(applied=sum(done.values()))
    return done


def _in_turn(due, step: str, *, by: str) -> list[UsageAgreement]:
    """At most SETTLEMENT_TICK_BATCH of the agreements due for a step of the tick, the longest due (`by`) first, the
    next tick taking up after the last (`sweeps.rows_in_turn`). All of them at once (thousands due together: windows
    ending in the same minute, the workers back after an outage) held a worker for all their chain reads, past the
    task's time limit, and a run killed there started over from the first."""
    return sweeps.rows_in_turn(due, turn=f"settlement-tick:{step}", by=by, size=settings.SETTLEMENT_TICK_BATCH)


@contextmanager
def _goes_on_after_chain_error(step: str, agreement_id, failures: sweeps.RowFailures) -> Iterator[None]:
    """One agreement's step of the settlement tick: a chain error is logged (with the agreement, from the log
    context) and the tick goes on; the step is tried again at the next tick. A node that cannot be reached at all
    (RpcUnreachable) stops the tick, as it stops the relayer's poll: walking on, every agreement would wait on it.
    Any other error is logged with the agreement and counted, the tick goes on, and it raises RowsFailed at its
    end: raised at once, one agreement that always failed (bad data, a bug) left every one after it unsettled."""
    with failures.row(agreement_id, reraise=(chain.RpcUnreachable,), atomic=False):
        try:
            yield
        except chain.RpcUnreachable:
            raise  # nothing answers: every other agreement's read fails the same way (the task retries later)
        except chain.ChainError as error:
            logger.warning("settlement step not done: the chain read failed", extra={
                "step": step, "error": f"{type(error).__name__}: {error}"[:500]})


def _reclaim(agreement: UsageAgreement, *, terms: tuple, now: int) -> ChainTransaction | None:
    """Queue `reclaim` for an escrow past its reclaimAfter (by the chain's clock, `now`) on which nothing was
    proposed, whatever we know of the agreement (completion asked for, usage charged): the contract allows nothing
    else, and the seller's pay for usage never proposed is lost (`agreement_refunded` records it). A proposal of
    ours still in flight cannot run any more (ProposalPeriodOver). After a failed one, as a proposal
    (`_proposal_due`: SETTLEMENT_PROPOSE_BACKOFF_SECONDS doubling, at most SETTLEMENT_PROPOSE_MAX_ATTEMPTS, then an
    operator's retry)."""
    if selectors.live_transaction(agreement_id=agreement.pk, purpose=TxPurpose.RECLAIM):
        return None  # under way: no chain read at every tick (checked again under the lock)
    # Failed reclaims back off as proposals do: the escrow still active past reclaimAfter, one failing every time (out
    # of gas on an estimate a node gave short) was sent again at every tick, at the relayer's gas each time.
    if not _proposal_due(selectors.proposal_failures(agreement_id=agreement.pk, purpose=TxPurpose.RECLAIM)):
        return None
    # The chain, not our copy of it, says whether anything was proposed: one mined before reclaimAfter may not be
    # indexed yet (the indexer acts at depth), and a reclaim then reverts. Read at one block, by that block's clock
    # (`_escrow_at_head`): `now` and an escrow read `at latest` may come from two backends, the escrow from one
    # lacking the proposal mined just before reclaimAfter.
    state, _deadline, _seller_amount, clock = _escrow_at_head(agreement, terms=terms, now=now)
    if state != selectors.EscrowState.ACTIVE or not _proposal_period_over(terms, now=clock):
        return None
    with transaction.atomic():
        agreement = UsageAgreement.objects.select_for_update().get(pk=agreement.pk)
        if not can_reclaim(agreement) or selectors.live_transaction(agreement_id=agreement.pk,
                                                                    purpose=TxPurpose.RECLAIM):
            return None
        agreement_services.completion_request(
            agreement=agreement, reason="nothing proposed by reclaimAfter" if agreement.used else "expired unused")
        return _enqueue(agreement, TxPurpose.RECLAIM, "reclaim", [agreement.onchain_id, terms])


def _finalize(agreement: UsageAgreement, *, now: int) -> ChainTransaction | None:
    terms = selectors.escrow_terms(agreement=agreement)
    # The chain, not our copy of it, says whether the window is over: a challenge the buyer sent itself, or a
    # re-proposal that restarted the window, may be mined and not indexed yet (the indexer acts at depth). Read at one
    # block, by that block's clock (`_escrow_at_head`).
    state, challenge_deadline, _seller_amount, clock = _escrow_at_head(agreement, terms=terms, now=now)
    if state != selectors.EscrowState.PROPOSED or challenge_deadline > clock:
        return None
    with transaction.atomic():
        agreement = UsageAgreement.objects.select_for_update().get(pk=agreement.pk)
        if not can_challenge(agreement) or selectors.live_transaction(
                agreement_id=agreement.pk, purpose=TxPurpose.CHALLENGE):
            return None
        agreement_services.agreement_settling(agreement_id=agreement.pk, reason="challenge window over")
        if selectors.live_transaction(agreement_id=agreement.pk, purpose=TxPurpose.FINALIZE):
            # Ours, whose block a deep reorg took after the indexer applied its Settled event (whose rollback put the
            # agreement back in challenge), sent again by the relayer: settling on it, not on a second one.
            return None
        return _enqueue(agreement, TxPurpose.FINALIZE, "finalize", [agreement.onchain_id, terms])


def _escrow_read(agreement: UsageAgreement, *, terms: tuple,
                 block: int | str = "latest") -> tuple[selectors.EscrowState, int, int]:
    """The escrow as the chain has it at `block` (a chain read: outside any database transaction): its state, its
    challengeDeadline (while Disputed, the dispute's timeout: the challenge's block time plus DISPUTE_TIMEOUT) and its
    seller's amount (while Disputed, the disputed proposal's)."""
    state, deadline, _seq, seller_amount = chain.call(functools.partial(
        chain.escrow_contract().functions.getEscrow(agreement.onchain_id, terms).call, block_identifier=block))[:4]
    return list(selectors.EscrowState)[state], int(deadline), int(seller_amount)


def _escrow_at_head(agreement: UsageAgreement, *, terms: tuple, now: int) -> tuple[selectors.EscrowState, int, int,
                                                                                   int]:
    """`_escrow_read` at the node's latest block, and the clock to judge its deadline by: that block's time, no later
    than `now`. Before a step the contract refuses while a window is open (finalize): the escrow read `at latest` and
    the clock from separate answers may come from two backends of a provider's pool, the clock past the window's end
    and the escrow from one lacking the re-proposal that restarted it, and the agreement was left settling with its
    finalize reverted (ChallengeWindowOpen) while the chain's window was open. A backend without the block refuses."""
    number, timestamp = chain.head()
    return (*_escrow_read(agreement, terms=terms, block=number), min(now, timestamp))


def _dispute_timed_out_at(agreement: UsageAgreement, *, escrow: tuple[selectors.EscrowState, int, int]) -> int | None:
    """When the escrow's dispute timed out, if it did for a resolution sent now (`escrow`: `_escrow_read`): Disputed
    and its timeout reached by the next block, or already settled on-chain for the buyer while the books still say
    disputed (anyone's finalize of the timed-out dispute, not indexed yet: a resolve would revert InvalidState). None
    on a deployment from before the timeout, whose disputes wait for the arbiter alone."""
    if not chain.escrow_has_dispute_timeout():
        return None
    state, deadline, seller_amount = escrow
    # Not the node's pending time alone: one it answers in the future refused the arbiter's decision as timed out,
    # and the seller's upheld share went back to the buyer at the real timeout.
    if state == selectors.EscrowState.DISPUTED and deadline <= chain_clock.next_block_clock_for_refusal():
        return deadline
    # Settled from Disputed with nothing to the seller (the challenge's deadline word still holds the timeout), or a
    # resolution of 0 finalized, neither indexed yet: the buyer refunded whole either way, and no resolve can run.
    if state == selectors.EscrowState.SETTLED and seller_amount == 0 and can_resolve(agreement):
        return deadline
    return None


def _disputes_maybe_timed_out(*, now: datetime) -> Iterator[UsageAgreement]:
    """Disputed agreements whose dispute may have timed out by `now` (the chain's clock), of a batch in turn; the
    others are not read from the chain at every tick. The challenge came after the escrow's last proposal, which
    started a window ending no sooner than the one the books hold (the chain's time, from its event): the timeout is
    at least that end, less the window, plus DISPUTE_TIMEOUT."""
    for agreement in _in_turn(agreement_selectors.agreements_in_status(status=AgreementStatus.DISPUTED),
                              "dispute-timeout", by="created_at"):
        if (agreement.challenge_deadline is None or agreement.challenge_deadline + selectors.DISPUTE_TIMEOUT
                - timedelta(seconds=agreement.challenge_window_seconds) <= now):
            yield agreement


def _finalize_timed_out_dispute(agreement: UsageAgreement, *, now: int) -> ChainTransaction | None:
    """Queue `finalize` of a dispute the arbiter did not resolve by its timeout, by the chain's clock (`now`): the
    contract refunds the buyer the whole deposit (the seller's disputed proposal was never upheld) and refuses a
    resolution from then on, so the money moves even when nobody else calls it, and a resolution of ours still in
    flight reverts rather than race it."""
    terms = selectors.escrow_terms(agreement=agreement)
    if not chain.escrow_has_dispute_timeout():
        return None
    state, timeout, _seller_amount, clock = _escrow_at_head(agreement, terms=terms, now=now)
    if state != selectors.EscrowState.DISPUTED or timeout > clock:
        return None
    with transaction.atomic():
        agreement = UsageAgreement.objects.select_for_update().get(pk=agreement.pk)
        if not can_resolve(agreement) or selectors.live_transaction(agreement_id=agreement.pk,
                                                                    purpose=TxPurpose.FINALIZE):
            return None
        agreement_services.agreement_settling(
            agreement_id=agreement.pk, reason="dispute not resolved by its timeout: the whole deposit goes back to "
                                              "the buyer", data={selectors.DISPUTE_TIMED_OUT_AT: timeout})
        return _enqueue(agreement, TxPurpose.FINALIZE, "finalize", [agreement.onchain_id, terms])


def _refund_still_requested(tx: ChainTransaction) -> bool:
    """A failed zero refund proposal is sent again (an operator's retry) only while the buyer's refund request it
    carries out stands: withdrawn since (cancel-refund-request, allowed once the proposal failed), the retry refunded
    the buyer in full against its withdrawal, the seller unpaid for its result. Locks the agreement until the caller's
    transaction ends, as the withdrawal does: one arriving meanwhile finds the retry queued (409
    `refund_already_submitted`)."""
    UsageAgreement.objects.select_for_update().get(pk=tx.agreement_id)
    return selectors.masumi_refund_requested(agreement_id=tx.agreement_id)


def handlers_register() -> None:
    """Called once, from EscrowConfig.ready()."""
    relayer.outcome_handler_register(purpose=TxPurpose.PROPOSE_SETTLEMENT, on_outcome=_proposal_outcome,
                                     read_evidence=_proposal_evidence)
    relayer.outcome_handler_register(purpose=TxPurpose.MASUMI_REFUND_PROPOSAL, on_outcome=_proposal_outcome,
                                     read_evidence=_proposal_evidence, rerun_wanted=_refund_still_requested)
    relayer.outcome_handler_register(purpose=TxPurpose.CHALLENGE, on_outcome=_challenge_outcome,
                                     read_evidence=_challenge_evidence)
    relayer.outcome_handler_register(purpose=TxPurpose.RESOLVE, on_outcome=_resolve_outcome,
                                     read_evidence=_resolve_evidence)
    relayer.outcome_handler_register(purpose=TxPurpose.FINALIZE, on_outcome=_finalize_outcome,
                                     read_evidence=_finalize_evidence, on_reopened=_payout_reopened)
    relayer.outcome_handler_register(purpose=TxPurpose.RECLAIM, on_outcome=_reclaim_outcome,
                                     read_evidence=_reclaim_evidence, on_reopened=_payout_reopened)
