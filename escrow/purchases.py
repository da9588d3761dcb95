"""Masumi purchases: one job of a `masumi` service, bought the way a Masumi payment node sells it, paid through
the same UsageEscrow contract, relayer and agreement lifecycle as every other escrow.

A purchase is an escrow agreement for quantity 1 × the service's price, proposed by the buyer and accepted at once
on the seller's behalf (a listed Masumi service is a standing offer). Flow:

1. `POST /purchase` (buyer, `input_data`): the marketplace records the input hash and the timers and answers with
   the activation package (EIP-712 ActivationIntent + one EIP-2612 permit, deadline = payByTime) to sign.
2. `POST /purchase/lock-funds` (the signed package): the relayer submits `activate`; the agreement becomes active.
3. `masumi_purchases_tick` (beat): starts the job on the seller (`POST /start_job` with the input) once the funds
   are locked, polls `GET /status`, and records a completed job's result before submitResultTime; that charges the
   price as one usage event and proposes the settlement on-chain.
4. `settlement_tick` (beat) pays out or refunds as for any agreement; this module adds refund requests, disputes
   and the external-dispute release.

Masumi field ↔ contract:

- blockchainIdentifier: the escrow's bytes32 `agreementId`.
- inputHash / resultHash: sha256 (hex) of the canonical JSON of the input (sorted keys, no spaces) / of the result
  string as the seller's /status returned it. The result hash is committed on-chain as the `usageDigest` of
  `proposeSettlement(id, seq 1, price, 0x‖resultHash, receipt signature)`.
- payByTime: `ActivationIntent.deadline` (and the permit's deadline): `activate` reverts after it.
- submitResultTime: `ActivationIntent.expiresAt`. A result is accepted only before it. Without one the buyer is
  refunded by `reclaim`, which the contract allows from expiresAt + reclaimGrace: the grace lets a result that
  arrived just before submitResultTime still be proposed (the contract never lets proposal and reclaim race).
- unlockTime: `challengeWindow = unlockTime − purchase time` (chain clock). A proposal at time t ≥ purchase time
  opens the window until t + challengeWindow ≥ unlockTime, so the seller is paid by `finalize` never before
  unlockTime (at result time + challengeWindow), and a refund request, accepted until unlockTime, always reaches
  the chain while the window is open.
- PATCH /purchase (refund request): the buyer's EIP-712 `Challenge{agreementId, deadline: unlockTime}`. After a
  result it is submitted at once with `challengeWithSig` (→ Disputed). Before a result it is kept: a result that
  still arrives is proposed and then challenged with it (→ Disputed); no result → the reclaim refunds the buyer.
- externalDisputeUnlockTime: a dispute no operator resolved by then is resolved for the buyer: the relayer (which
  must hold ARBITER_ROLE) sends `resolve(id, 0)` then `finalize`. Before it an operator decides through
  `POST /usage-agreements/{id}/resolve` (or the admin) with any split.

onChainState (Masumi's names): FundsLocked (active, no result), ResultSubmitted (result committed or being
committed), RefundRequested (refund asked, not yet disputed), Disputed, Withdrawn (seller paid), RefundWithdrawn
(buyer refunded), DisputedWithdrawn (a dispute paid out). null until the funds are locked.
"""

import hashlib
import json
import logging
import uuid
from datetime import UTC, datetime

from django.conf import settings
from django.db import transaction
from django.db.models import Q
from django.utils import timezone

from agreements import metering
from agreements import services as agreement_services
from agreements.models import AgreementStatus, UsageAgreement
from catalog.models import Agent, Availability, Service, UpstreamProtocol
from escrow import services, settlement
from escrow.models import ChainTransaction, MasumiPurchase, TxPurpose, TxStatus
from marketplace import agentic_service
from marketplace.errors import ApplicationError, Conflict, DependencyUnavailable, Forbidden, InvalidInput
from sdk import typed_data

logger = logging.getLogger(__name__)
S = AgreementStatus
MAX_LOCK_SECONDS = 30 * 24 * 3600  # the contract's MAX_CHALLENGE_WINDOW bounds unlockTime − purchase time
COMPLETED = "completed"
# A start_job call claimed longer ago than this died with its worker; the job may be started again.
START_CLAIM_STALE_SECONDS = 120


def _chain_now() -> int:
    try:
        return settlement.chain_now()
    except Exception as exc:  # noqa: BLE001 - any RPC failure means the chain cannot be read now
        raise DependencyUnavailable("The chain RPC is unavailable.", code="chain_unavailable") from exc


def _moment(unix: int) -> datetime:
    return datetime.fromtimestamp(unix, tz=UTC)


def _unix(moment: datetime) -> int:
    return int(moment.timestamp())


def input_hash_of(input_data) -> str:
    return hashlib.sha256(json.dumps(input_data, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def result_hash_of(result: str) -> str:
    return hashlib.sha256(result.encode()).hexdigest()


def blockchain_identifier_to_agreement_id(blockchain_identifier: str) -> uuid.UUID | None:
    value = int(blockchain_identifier, 16)
    return uuid.UUID(int=value) if value < 2**128 else None


def _timers(now: int, requested: dict[str, int | None]) -> dict[str, int]:
    """Unix seconds; a missing timer follows the previous one by its configured default."""
    defaults = [("pay_by_time", settings.MASUMI_PAY_BY_SECONDS),
                ("submit_result_time", settings.MASUMI_SUBMIT_RESULT_SECONDS),
                ("unlock_time", settings.MASUMI_UNLOCK_SECONDS),
                ("external_dispute_unlock_time", settings.MASUMI_EXTERNAL_DISPUTE_SECONDS)]
    timers, previous = {}, now
    for name, default in defaults:
        value = requested.get(name) or previous + default
        if value <= previous:
            raise InvalidInput("Timers must be in the future and in order: payByTime < submitResultTime < "
                               "unlockTime < externalDisputeUnlockTime.", code="invalid_timers",
                               details={"timer": name, "chain_time": now})
        timers[name] = previous = value
    if timers["unlock_time"] - now > MAX_LOCK_SECONDS:
        raise InvalidInput("unlockTime may be at most 30 days ahead.", code="invalid_timers",
                           details={"timer": "unlock_time", "max_seconds": MAX_LOCK_SECONDS})
    return timers


# --- buyer actions ---------------------------------------------------------------------------------------------

def purchase_create(*, buyer: Agent, service: Service, input_data, input_hash: str | None = None,
                    identifier_from_purchaser: str = "", metadata: str = "",
                    timers: dict[str, int | None] | None = None) -> tuple[MasumiPurchase, dict]:
    """Record the purchase and its escrow agreement (accepted); returns it with the package the buyer signs."""
    if service.upstream_protocol != UpstreamProtocol.MASUMI:
        raise InvalidInput("Only services with the masumi protocol are purchased here.", code="not_a_masumi_service")
    if service.availability == Availability.UNAVAILABLE:
        raise Conflict("The service reports it is unavailable.", code="service_unavailable",
                       details={"message": service.availability_message})
    computed = input_hash_of(input_data)
    if input_hash is not None and input_hash != computed:
        raise InvalidInput("inputHash is not the sha256 of the canonical JSON of input_data.",
                           code="input_hash_mismatch", details={"expected": computed})
    now = _chain_now()
    at = _timers(now, timers or {})
    with transaction.atomic():
        agreement = agreement_services.agreement_propose(
            buyer=buyer, service=service, quantity=1, expires_at=_moment(at["submit_result_time"]),
            challenge_window_seconds=at["unlock_time"] - now, note="masumi purchase")
        if agreement.status != S.PROPOSED:
            # A purchase is paid at once; one that needs the owner's approval is refused (and not recorded).
            raise Forbidden("The buyer's policy requires an owner's approval for this purchase.",
                            code="approval_required")
        agreement = agreement_services.agreement_accept(agreement=agreement, seller=service.seller)
        purchase = MasumiPurchase.objects.create(
            agreement=agreement, identifier_from_purchaser=identifier_from_purchaser, metadata=metadata,
            input_data=input_data, input_hash=computed, created_chain_time=_moment(now),
            **{name: _moment(value) for name, value in at.items()})
        package = services.activation_package(agreement=agreement, buyer=buyer, deadline=at["pay_by_time"])
    return purchase, package


def purchase_lock_funds(*, purchase: MasumiPurchase, buyer: Agent, intent_signature: str, deadline: int,
                        escrow_permit: dict) -> ChainTransaction:
    """Submit the signed package: the relayer activates the escrow (FundsLocked once confirmed)."""
    if deadline != _unix(purchase.pay_by_time):
        raise InvalidInput("deadline must be the purchase's payByTime.", code="deadline_mismatch",
                           details={"expected": _unix(purchase.pay_by_time)})
    return services.activation_submit(agreement=purchase.agreement, buyer=buyer, intent_signature=intent_signature,
                                      deadline=deadline, escrow_permit=escrow_permit)


def refund_request_typed_data(*, purchase: MasumiPurchase) -> dict:
    return settlement.challenge_typed_data(agreement=purchase.agreement, deadline=_unix(purchase.unlock_time))


def purchase_request_refund(*, purchase: MasumiPurchase, buyer: Agent, signature: str) -> MasumiPurchase:
    """The buyer asks for its money back (before unlockTime). Idempotent."""
    now = _chain_now()
    with transaction.atomic():
        purchase = MasumiPurchase.objects.select_for_update().select_related("agreement").get(pk=purchase.pk)
        agreement = purchase.agreement
        if agreement.buyer_id != buyer.pk:
            raise Forbidden("Only the buyer requests a refund.", code="buyer_only")
        if purchase.refund_requested_at is not None:
            return purchase
        if agreement.status not in (S.ACTIVE, S.IN_CHALLENGE):
            raise Conflict(f"No refund can be requested while the escrow is {agreement.status}.",
                           code="refund_not_possible", details={"status": agreement.status})
        if now >= _unix(purchase.unlock_time):
            raise Conflict("unlockTime has passed; the seller's payment can no longer be disputed.",
                           code="unlock_time_passed")
        try:
            signer = typed_data.recover_typed_data_signer(refund_request_typed_data(purchase=purchase), signature)
        except Exception as exc:  # noqa: BLE001 - a malformed signature is the caller's input error
            raise InvalidInput("Not a valid 65-byte signature.", code="invalid_signature") from exc
        if signer.lower() != agreement.buyer_wallet_address.lower():
            raise InvalidInput("The refund request must be signed by the buyer's wallet.", code="wrong_signer",
                               details={"signer": signer, "expected": agreement.buyer_wallet_address})
        purchase.refund_requested_at = timezone.now()
        purchase.refund_signature = signature
        purchase.save(update_fields=["refund_requested_at", "refund_signature", "updated_at"])
        if agreement.status == S.IN_CHALLENGE:
            _dispute(purchase)
    return purchase


def _dispute(purchase: MasumiPurchase) -> ChainTransaction:
    return settlement.settlement_challenge(
        agreement=purchase.agreement, buyer=purchase.agreement.buyer, signature=purchase.refund_signature,
        deadline=_unix(purchase.unlock_time), reason="refund requested after the result was submitted")


# --- the marketplace driving the seller's job (beat) -----------------------------------------------------------

def _base_url(purchase: MasumiPurchase) -> str:
    return purchase.agreement.service.upstream_base_url


def _record_error(purchase_id, error: Exception) -> None:
    MasumiPurchase.objects.filter(pk=purchase_id).update(last_error=f"{type(error).__name__}: {error}"[:500],
                                                         updated_at=timezone.now())


def purchase_job_start(*, purchase_id) -> MasumiPurchase | None:
    """POST /start_job on the seller once the funds are locked. Claimed first, so two workers never both start it."""
    stale = timezone.now() - timezone.timedelta(seconds=START_CLAIM_STALE_SECONDS)
    claimed = MasumiPurchase.objects.filter(
        Q(job_start_claimed_at__isnull=True) | Q(job_start_claimed_at__lt=stale), pk=purchase_id, job_id="",
        agreement__status=S.ACTIVE).update(job_start_claimed_at=timezone.now())
    if not claimed:
        return None
    purchase = MasumiPurchase.objects.select_related("agreement__service").get(pk=purchase_id)
    try:
        job = agentic_service.start_job(base_url=_base_url(purchase), input_data=purchase.input_data)
    except agentic_service.AgenticServiceError as error:
        MasumiPurchase.objects.filter(pk=purchase_id).update(job_start_claimed_at=None)  # retried next tick
        _record_error(purchase_id, error)
        return None
    MasumiPurchase.objects.filter(pk=purchase_id).update(job_id=job.job_id, payment_id=job.payment_id,
                                                         last_error="", updated_at=timezone.now())
    purchase.refresh_from_db()
    return purchase


def purchase_job_poll(*, purchase_id, now: int) -> MasumiPurchase | None:
    """GET /status; a completed job's result is recorded while submitResultTime has not passed."""
    purchase = MasumiPurchase.objects.select_related("agreement__service").get(pk=purchase_id)
    if not purchase.job_id or purchase.result_hash or now >= _unix(purchase.submit_result_time):
        return None
    try:
        status = agentic_service.job_status(base_url=_base_url(purchase), job_id=purchase.job_id)
    except agentic_service.AgenticServiceError as error:
        _record_error(purchase_id, error)
        return None
    MasumiPurchase.objects.filter(pk=purchase_id).update(job_status=status.status[:50], updated_at=timezone.now())
    if status.status == COMPLETED and status.result is not None:
        try:
            return purchase_result_record(purchase_id=purchase_id, result=status.result)
        except ApplicationError as error:  # e.g. the agreement was used through the proxy meanwhile
            _record_error(purchase_id, error)
    return purchase


def purchase_result_record(*, purchase_id, result: str) -> MasumiPurchase:
    """Keep the result and its hash, charge the price and propose the settlement that commits the hash."""
    result_hash = result_hash_of(result)
    with transaction.atomic():
        purchase = MasumiPurchase.objects.select_for_update().get(pk=purchase_id)
        if purchase.result_hash:
            return purchase
        purchase.result, purchase.result_hash, purchase.result_submitted_at = result, result_hash, timezone.now()
        purchase.last_error = ""
        purchase.save(update_fields=["result", "result_hash", "result_submitted_at", "last_error", "updated_at"])
        metering.job_result_charge(agreement_id=purchase.agreement_id, result_hash="0x" + result_hash,
                                   request_id=f"masumi-job:{purchase.job_id}")
        settlement.settlement_propose(agreement_id=purchase.agreement_id)
    return purchase


def _live(agreement_id, purpose: str) -> bool:
    return ChainTransaction.objects.filter(agreement_id=agreement_id, purpose=purpose).exclude(
        status=TxStatus.FAILED).exists()


def purchases_tick(*, now: int | None = None) -> dict[str, int]:
    """Everything due on Masumi purchases, in one pass (the beat task). Each step is idempotent."""
    now = now if now is not None else _chain_now()
    now_dt = _moment(now)
    done = {"expired": 0, "started": 0, "results": 0, "disputed": 0, "released": 0}
    # Never funded by payByTime: the signed intent can no longer be mined, so the purchase is over.
    unfunded = MasumiPurchase.objects.filter(agreement__status__in=[S.ACCEPTED, S.ACTIVATION_FAILED],
                                             pay_by_time__lte=now_dt)
    for agreement_id in list(unfunded.values_list("agreement_id", flat=True)[:500]):
        if agreement_services.agreement_expire_unfunded(agreement_id=agreement_id,
                                                        reason="payByTime passed before the funds were locked"):
            done["expired"] += 1
    open_jobs = MasumiPurchase.objects.filter(agreement__status=S.ACTIVE, result_hash="",
                                              submit_result_time__gt=now_dt)
    for purchase_id in list(open_jobs.filter(job_id="").values_list("pk", flat=True)[:500]):
        if purchase_job_start(purchase_id=purchase_id):
            done["started"] += 1
    for purchase_id in list(open_jobs.exclude(job_id="").values_list("pk", flat=True)[:500]):
        polled = purchase_job_poll(purchase_id=purchase_id, now=now)
        if polled is not None and polled.result_hash:
            done["results"] += 1
    # A refund asked for before the result: dispute the result once its proposal is on-chain.
    for purchase in MasumiPurchase.objects.filter(refund_requested_at__isnull=False,
                                                  agreement__status=S.IN_CHALLENGE).select_related("agreement"):
        if _live(purchase.agreement_id, TxPurpose.CHALLENGE):
            continue
        try:
            with transaction.atomic():
                _dispute(purchase)
            done["disputed"] += 1
        except ApplicationError as error:
            _record_error(purchase.pk, error)
    # Disputes nobody resolved by externalDisputeUnlockTime go to the buyer.
    for purchase in MasumiPurchase.objects.filter(agreement__status=S.DISPUTED,
                                                  external_dispute_unlock_time__lte=now_dt).select_related(
                                                      "agreement"):
        if _live(purchase.agreement_id, TxPurpose.RESOLVE):
            continue
        try:
            settlement.settlement_resolve(agreement=purchase.agreement, seller_amount=0, operator=None)
            done["released"] += 1
        except ApplicationError as error:
            _record_error(purchase.pk, error)
    return done


# --- reads -----------------------------------------------------------------------------------------------------

def purchase_onchain_state(purchase: MasumiPurchase) -> str | None:
    agreement: UsageAgreement = purchase.agreement
    status, result, refund = agreement.status, bool(purchase.result_hash), purchase.refund_requested_at is not None
    if status == S.REFUNDED:
        return "RefundWithdrawn"
    if status == S.SETTLED:
        if result and refund:
            return "DisputedWithdrawn"
        return "Withdrawn" if agreement.seller_payout else "RefundWithdrawn"
    if status == S.DISPUTED or (status == S.SETTLING and result and refund):
        return "Disputed"
    if status in (S.ACTIVE, S.IN_CHALLENGE, S.SETTLING):
        if refund:
            return "RefundRequested"
        return "ResultSubmitted" if result else "FundsLocked"
    return None


def purchase_next_action(purchase: MasumiPurchase) -> dict:
    agreement = purchase.agreement
    action, error_type, note = "None", None, None
    if agreement.status in (S.ACCEPTED, S.ACTIVATION_FAILED):
        action = "FundsLockingRequested"
        if agreement.status == S.ACTIVATION_FAILED:
            error_type, note = "FundsLockingFailed", agreement.status_reason
    elif agreement.status == S.SUBMITTING:
        action = "FundsLockingInitiated"
    elif agreement.status == S.DISPUTED:
        action = "WaitingForExternalAction"
    elif agreement.status == S.SETTLING:
        action = "WithdrawInitiated"
    elif purchase.refund_requested_at is not None and agreement.status in (S.ACTIVE, S.IN_CHALLENGE):
        action = "SetRefundRequestedInitiated" if purchase.result_hash else "WaitingForExternalAction"
    elif agreement.status in (S.EXPIRED, S.CANCELLED, S.REJECTED):
        error_type, note = "Closed", agreement.status_reason or agreement.status
    if purchase.last_error and error_type is None:
        error_type, note = "SellerServiceError", purchase.last_error
    return {"requestedAction": action, "errorType": error_type, "errorNote": note}


def purchase_current_transaction(purchase: MasumiPurchase) -> ChainTransaction | None:
    return ChainTransaction.objects.filter(agreement_id=purchase.agreement_id).prefetch_related(
        "attempts").order_by("-created_at").first()
