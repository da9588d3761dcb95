"""Masumi purchases: one job of a `masumi` service, bought the way a Masumi payment node sells it, paid through
the same UsageEscrow contract, relayer and agreement lifecycle as every other escrow.

A purchase is an escrow agreement for quantity 1 × the service's price, proposed by the buyer and accepted at once
on the seller's behalf (a listed Masumi service is a standing offer). Flow:

1. `POST /purchase` (buyer), either
   - with `input_data`: the marketplace starts the job itself once the funds are locked (step 3), or
   - with a seller's `blockchainIdentifier` (the masumi library's flow: the buyer called the seller's /start_job, the
     seller asked this node for a payment with `POST /payment`): the purchase pays that payment request, and must
     match it (service, identifierFromPurchaser, inputHash, timers, seller wallet).
   The marketplace records the input hash and the timers and answers with the activation package (EIP-712
   ActivationIntent + one EIP-2612 permit, deadline = payByTime) to sign.
2. `POST /purchase/lock-funds` (the signed package): the relayer submits `activate`; the agreement becomes active.
3. `masumi_jobs_tick` (beat, on the outbound queue): starts the job on the seller (`POST /start_job` with the
   input, in the service's MIP-003 version) once the funds are locked, polls `GET /status` (each purchase's calls
   by its own backoff, a tick bounded in time), and records a completed job's result before submitResultTime; that charges the price as one usage event and proposes the settlement
   on-chain. A seller whose payment node is this marketplace may instead submit the result hash itself
   (`POST /payment/submit-result`). `masumi_purchases_tick` (beat) does the rest, calling no seller: expiry, refund
   requests, disputes and their release.
4. `settlement_tick` (beat) pays out or refunds as for any agreement; this module adds refund requests, disputes,
   the refund by the purchase's own timers and the external-dispute release.

Masumi field ↔ contract:

- blockchainIdentifier: the escrow's bytes32 `agreementId`; for a purchase paying a seller's payment request, the
  request's id as 32 bytes (both resolve to the purchase).
- inputHash / resultHash (MIP-004, as the masumi library computes them): sha256 (hex) of
  `identifierFromPurchaser;JCS(input)` (sorted keys, no spaces, UTF-8) / of `identifierFromPurchaser;result` (the
  result string JSON-escaped, without quotes). The result hash is committed on-chain as the `usageDigest` of
  `proposeSettlement(id, seq 1, price, 0x‖resultHash, receipt signature)`.
- payByTime: `ActivationIntent.deadline` (and the permit's deadline): `activate` reverts after it.
- submitResultTime: `ActivationIntent.expiresAt`. A result is accepted only before it. Without one the buyer is
  refunded by `reclaim`, which the contract allows from expiresAt + reclaimGrace: the grace lets a result that
  arrived just before submitResultTime still be proposed (the contract never lets proposal and reclaim race).
- unlockTime: `challengeWindow = unlockTime − purchase time`, the purchase time by the chain's clock (a chain that
  lags ours only lengthens the window). A proposal at time t ≥ purchase time
  opens the window until t + challengeWindow ≥ unlockTime, so the seller is paid by `finalize` never before
  unlockTime (at result time + challengeWindow), and a refund request, accepted until unlockTime, always reaches
  the chain while the window is open.
- PATCH /purchase (refund request): the buyer's EIP-712 `Challenge{agreementId, deadline: unlockTime}`. After a
  result it is submitted at once with `challengeWithSig` (→ Disputed). Before a result it is kept: a result that
  still arrives is proposed and then challenged with it (→ Disputed), proposed only while unlockTime is
  MASUMI_MIN_DISPUTE_SECONDS away (later, delayed, it could no longer be disputed: the escrow is reclaimed; one
  queued in time that the relayer mined too late to be disputed is outbid by a zero proposal, paying the buyer
  everything at its window's end: `settlement.settlement_propose_refund`). No
  result by submitResultTime → the refund is paid by the purchase's own timers, not the contract's reclaim grace:
  the platform proposes a zero settlement (receipt seq 0), submits the buyer's challenge, and its arbiter resolves
  `resolve(id, 0)`, then `finalize`: the buyer has everything back a few blocks after submitResultTime, before
  unlockTime (from MASUMI_MIN_DISPUTE_SECONDS before unlockTime on, too late for the challenge, the refund is left
  to reclaim). A request without the buyer's signature (the masumi library's `request-refund` has none) uses the
  one given at lock-funds (`refundSignature`); with neither, the buyer is refunded by `reclaim` after the
  contract's grace.
- externalDisputeUnlockTime: a dispute no operator resolved by then is resolved for the buyer: the relayer (which
  must hold ARBITER_ROLE) sends `resolve(id, 0)` then `finalize`. Before it an operator decides through
  `POST /usage-agreements/{id}/resolve` (or the admin) with any split. A result's dispute is dated by its block
  (`disputed_at`): the contract's window runs past unlockTime, where the buyer's own `challenge` still lands, and
  one mined after unlockTime (the signed refund request is valid through its second) is resolved for the seller at
  once (`resolve(id, proposed amount)`), as Masumi pays it, unless a refund was requested before unlockTime (an
  unsigned request the buyer's own challenge carries out).

onChainState (Masumi's names): FundsLocked (active, no result), ResultSubmitted (result committed or being
committed), RefundRequested (refund asked, not yet disputed), Disputed, Withdrawn (seller paid), RefundWithdrawn
(buyer refunded), DisputedWithdrawn (a dispute paid out). null until the funds are locked.
"""

import functools
import hashlib
import json
import logging
import secrets
import time
from collections import Counter
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from django.conf import settings
from django.db import transaction
from django.db.models import F, Q
from django.utils import timezone

from agreements import services as agreement_services
from agreements.models import (
    AWAITING_FUNDING_STATUSES,
    FUNDED_AFTER_CLOSE,
    AgreementStatus,
    UsageAgreement,
    can_activate,
    is_closed,
)
from catalog.models import Agent, Availability, Service, ServiceState, UpstreamProtocol
from escrow import chain, chain_clock, selectors, services, settlement
from escrow.models import ChainTransaction, MasumiPaymentRequest, MasumiPurchase, TxPurpose
from marketplace import chainconfig, masumi_agentic_client, postgresql, shown_text, sweeps
from marketplace.errors import ApplicationError, Conflict, Forbidden, InvalidInput, NotFound
from marketplace.signatures import signer_require

logger = logging.getLogger(__name__)
S = AgreementStatus
MAX_LOCK_SECONDS = settings.ESCROW_CHALLENGE_WINDOW_MAX  # it bounds unlockTime − purchase time
COMPLETED = "completed"


# The timers handed out count from `chain_clock.deadline_clock()` (the later of our clock and the chain's next
# block: an idle chain's old latest block would hand out a payByTime already past); the challenge window, and
# what falls due, by the chain's clock, as the contract judges them.
def _moment(unix: int) -> datetime:
    return datetime.fromtimestamp(unix, tz=UTC)


def _unix(moment: datetime) -> int:
    return int(moment.timestamp())


def input_hash_of(input_data, identifier_from_purchaser: str) -> str:
    """MIP-004 (masumi.create_masumi_input_hash): sha256 of `identifier;JCS(input)`."""
    canonical = json.dumps(input_data, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(f"{identifier_from_purchaser};{canonical}".encode()).hexdigest()


def result_hash_of(result: str, identifier_from_purchaser: str) -> str:
    """MIP-004 (masumi.create_masumi_output_hash): sha256 of `identifier;result`, the result JSON-escaped."""
    escaped = json.dumps(result, ensure_ascii=False)[1:-1]
    return hashlib.sha256(f"{identifier_from_purchaser};{escaped}".encode()).hexdigest()


def new_identifier_from_purchaser() -> str:
    """As the masumi library's buyers make them: 26 hex digits."""
    return secrets.token_hex(13)


TIMER_NAMES = {"pay_by_time": "payByTime", "submit_result_time": "submitResultTime", "unlock_time": "unlockTime",
               "external_dispute_unlock_time": "externalDisputeUnlockTime"}


def _timers(now: int, requested: dict[str, int | None], *, chain_now: int) -> dict[str, int]:
    """Unix seconds after `now`; a missing timer follows the previous one by its configured default. unlockTime
    bounds the challenge window, which runs from the chain's clock `chain_now`."""
    defaults = [("pay_by_time", settings.MASUMI_PAY_BY_SECONDS),
                ("submit_result_time", settings.MASUMI_SUBMIT_RESULT_SECONDS),
                ("unlock_time", settings.MASUMI_UNLOCK_SECONDS),
                ("external_dispute_unlock_time", settings.MASUMI_EXTERNAL_DISPUTE_SECONDS)]
    timers, previous = {}, now
    for name, default in defaults:
        value = requested.get(name)
        if value is None:  # a timer given as 0 (the epoch) is in the past, not left out
            value = previous + default
        if value <= previous:
            raise InvalidInput("Timers must be in the future and in order: payByTime < submitResultTime < "
                               "unlockTime < externalDisputeUnlockTime.", code="invalid_timers",
                               details={"timer": name, "chain_time": str(now * 1000)})  # ms, as the timers
        timers[name] = previous = value
    # A result submitted at submitResultTime is disputed until unlockTime, by a challenge that must stay valid
    # CHALLENGE_SIGNATURE_MIN_VALIDITY to be mined: a shorter gap leaves the buyer no dispute of a last-moment result.
    if timers["unlock_time"] - timers["submit_result_time"] < settings.MASUMI_MIN_DISPUTE_SECONDS:
        raise InvalidInput("unlockTime must leave time to dispute a result submitted at submitResultTime.",
                           code="invalid_timers", details={
                               "timer": "unlock_time",
                               "min_seconds_after_submit_result_time": settings.MASUMI_MIN_DISPUTE_SECONDS})
    if timers["unlock_time"] - chain_now > MAX_LOCK_SECONDS:
        # Named as the caller gave it: an unlockTime left out follows the last timer given, which is the one too far.
        named = next((name for name in ("unlock_time", "submit_result_time", "pay_by_time")
                      if requested.get(name) is not None), "unlock_time")
        message = ("unlockTime may be at most 30 days ahead." if named == "unlock_time" else
                   f"{TIMER_NAMES[named]} is too far ahead: the unlockTime following it by default would be more "
                   "than 30 days ahead.")
        raise InvalidInput(message, code="invalid_timers", details={"timer": named, "max_seconds": MAX_LOCK_SECONDS})
    # The buyer's release from a dispute nobody resolves, as the purchase states it (the contract's DISPUTE_TIMEOUT
    # releases it 30 days after the challenge at the latest).
    if timers["external_dispute_unlock_time"] - timers["unlock_time"] > MAX_LOCK_SECONDS:
        raise InvalidInput("externalDisputeUnlockTime may be at most 30 days after unlockTime.",
                           code="invalid_timers",
                           details={"timer": "external_dispute_unlock_time", "max_seconds": MAX_LOCK_SECONDS})
    return timers


# --- buyer actions ---------------------------------------------------------------------------------------------

def _check_purchasable(service: Service) -> None:
    if service.upstream_protocol != UpstreamProtocol.MASUMI:
        raise InvalidInput("Only services with the masumi protocol are purchased here.", code="not_a_masumi_service")
    if service.availability == Availability.UNAVAILABLE:
        raise Conflict("The service reports it is unavailable.", code="service_unavailable",
                       details={"message": service.availability_message})


@dataclass(frozen=True)
class PurchasePlan:
    """A purchase checked, with what the chain says of it (its clock, the buyer's permit nonce) read before the
    purchase's transaction opens: no row lock ever waits on the node."""
    buyer: Agent
    service: Service
    chain_now: int
    at: dict[str, int]
    identifier_from_purchaser: str
    metadata: str
    input_data: Any
    input_hash: str
    payment_request: MasumiPaymentRequest | None
    permit_nonce: int


def purchase_prepare(*, buyer: Agent, service: Service, input_data, input_hash: str | None = None,
                     identifier_from_purchaser: str = "", metadata: str = "",
                     timers: dict[str, int | None] | None = None) -> PurchasePlan:
    """Buy a job the marketplace starts on the seller once the funds are locked: checked, and the chain read.
    `purchase_record` writes it."""
    _check_purchasable(service)
    identifier_from_purchaser = identifier_from_purchaser or new_identifier_from_purchaser()
    computed = input_hash_of(input_data, identifier_from_purchaser)
    if input_hash is not None and input_hash != computed:
        raise InvalidInput("inputHash is not sha256(identifierFromPurchaser;JCS(input_data)) (MIP-004).",
                           code="input_hash_mismatch", details={"expected": computed})
    chain_now = chain_clock.chain_now_for_request()
    at = _timers(chain_clock.deadline_clock(), timers or {}, chain_now=chain_now)
    return PurchasePlan(buyer=buyer, service=service, chain_now=chain_now, at=at,
                        identifier_from_purchaser=identifier_from_purchaser, metadata=metadata,
                        input_data=input_data, input_hash=computed, payment_request=None,
                        permit_nonce=services.buyer_permit_nonce(buyer=buyer))


def purchase_prepare_for_payment(*, buyer: Agent, payment_request: MasumiPaymentRequest, seller_wallet: str,
                                 identifier_from_purchaser: str, input_hash: str | None, metadata: str = "",
                                 timers: dict[str, int | None]) -> PurchasePlan:
    """Pay a seller's payment request (the masumi library's flow). What the buyer sends must be what the seller
    asked for: the buyer's library computed the input hash, the seller's library the one in the request."""
    service = payment_request.service
    _check_purchasable(service)
    if service.state != ServiceState.REGISTERED:
        raise InvalidInput("This service is deregistered.", code="service_deregistered")
    expected = {"sellerVkey": service.seller.wallet_address.lower(),
                "identifierFromPurchaser": payment_request.identifier_from_purchaser,
                "inputHash": payment_request.input_hash or input_hash,
                **{masumi_name: _unix(getattr(payment_request, name)) for name, masumi_name in TIMER_NAMES.items()}}
    given = {"sellerVkey": seller_wallet.lower(), "identifierFromPurchaser": identifier_from_purchaser,
             "inputHash": input_hash or payment_request.input_hash,
             **{masumi_name: _unix(getattr(payment_request, name)) if timers.get(name) is None else timers[name]
                for name, masumi_name in TIMER_NAMES.items()}}
    differ = sorted(name for name in expected if expected[name] != given[name])
    if differ:
        raise InvalidInput("The purchase does not match the seller's payment request.", code="payment_mismatch",
                           details={"fields": differ})
    if (service.unit_price, service.token) != (payment_request.unit_price, payment_request.token):
        raise Conflict("The seller changed the service's price since it requested this payment; ask it for a new "
                       "one.", code="payment_price_changed",
                       details={"requested": payment_request_funds(payment_request),
                                "listed": [{"amount": str(service.unit_price), "unit": service.token}]})
    at = {name: _unix(getattr(payment_request, name)) for name in TIMER_NAMES}
    if at["pay_by_time"] <= chain_clock.deadline_clock():
        raise Conflict("The payment request's payByTime has passed.", code="pay_by_time_passed")
    return PurchasePlan(buyer=buyer, service=service, chain_now=chain_clock.chain_now_for_request(), at=at,
                        identifier_from_purchaser=identifier_from_purchaser, metadata=metadata, input_data=None,
                        input_hash=given["inputHash"] or "", payment_request=payment_request,
                        permit_nonce=services.buyer_permit_nonce(buyer=buyer))


def payment_request_funds(payment_request: MasumiPaymentRequest) -> list[dict]:
    return [{"amount": str(payment_request.unit_price), "unit": payment_request.token}]


def purchase_record(*, plan: PurchasePlan) -> tuple[MasumiPurchase, dict]:
    """The purchase and its escrow agreement (accepted: a listed Masumi service is a standing offer), with the
    package the buyer signs. Asks the chain nothing (`purchase_prepare` did)."""
    buyer, service, payment_request, at = plan.buyer, plan.service, plan.payment_request, plan.at
    with transaction.atomic():
        if payment_request is not None:  # locked: two buyers paying one request, the second is told so
            MasumiPaymentRequest.objects.select_for_update().get(pk=payment_request.pk)
            paid_by = (MasumiPurchase.objects.filter(payment_request=payment_request)
                       .values_list("pk", "agreement__buyer_id").first())
            if paid_by is not None:
                # Its own purchase named to the buyer: a retry whose answer was lost (the masumi library sends no
                # Idempotency-Key) finds it; another buyer is told nothing of it.
                raise Conflict("This payment request is already being paid.", code="payment_already_purchased",
                               details={"purchase_id": str(paid_by[0])} if paid_by[1] == buyer.pk else {})
        agreement = agreement_services.agreement_propose(proposal=agreement_services.agreement_proposal_prepare(
            buyer=buyer, service=service, quantity=1, expires_at=_moment(at["submit_result_time"]),
            challenge_window_seconds=at["unlock_time"] - plan.chain_now, note="masumi purchase"),
            approval_can_wait=False)  # a purchase is paid at once: one the owner must approve is refused
        agreement = agreement_services.agreement_accept(agreement=agreement, seller=service.seller)
        purchase = MasumiPurchase.objects.create(
            agreement=agreement, payment_request=payment_request,
            identifier_from_purchaser=plan.identifier_from_purchaser, metadata=plan.metadata,
            input_data=plan.input_data, input_hash=plan.input_hash, created_chain_time=_moment(plan.chain_now),
            **{name: _moment(value) for name, value in at.items()})
        package = services.activation_package(agreement=agreement, buyer=buyer, deadline=at["pay_by_time"],
                                              permit_nonce=plan.permit_nonce)
    return purchase, package


def purchase_lock_funds(*, purchase: MasumiPurchase, buyer: Agent, intent_signature: str, deadline: int,
                        escrow_permit: dict, refund_signature: str | None = None) -> ChainTransaction:
    """Submit the signed package: the relayer activates the escrow (FundsLocked once confirmed).

    `refund_signature` (optional): the buyer's signed refundRequestTypedData, kept for a later refund request that
    comes without one (the masumi library's `request-refund`); it is used only when the buyer asks for a refund,
    and kept with the activation, in the transaction that queues it (a refused lock-funds records nothing).

    A service deregistered, or a seller deactivated, since the purchase is refused (`activation_submit`)."""
    agreement = purchase.agreement
    if agreement.buyer_id == buyer.pk and not can_activate(agreement):  # first: a retry once the funds are locked
        code = "activation_in_progress" if agreement.status == S.SUBMITTING else "invalid_transition"
        raise Conflict(f"Cannot lock the funds of a purchase whose escrow is {agreement.status}.", code=code,
                       details={"status": agreement.status, "requested": S.SUBMITTING})
    if deadline != _unix(purchase.pay_by_time):
        raise InvalidInput("deadline must be the purchase's payByTime.", code="deadline_mismatch",
                           details={"expected": _unix(purchase.pay_by_time)})
    if refund_signature is not None:
        _check_refund_signature(purchase, refund_signature)

    def refund_signature_keep() -> None:
        if refund_signature is not None:
            MasumiPurchase.objects.filter(pk=purchase.pk).update(refund_signature=refund_signature,
                                                                 updated_at=timezone.now())

    # An intent nonce the buyer revoked on-chain (`cancelIntentNonce`) is replaced first (activation_submit), so an
    # intent signed under it is refused (wrong_signer), not relayed to revert; the buyer signs the fresh one
    # (GET /usage-agreements/{agreementId}/activation-package, deadline payByTime).
    return services.activation_submit(agreement=purchase.agreement, buyer=buyer, intent_signature=intent_signature,
                                      deadline=deadline, escrow_permit=escrow_permit, queued_with=refund_signature_keep)



def refund_request_typed_data(*, purchase: MasumiPurchase) -> dict:
    return settlement.challenge_typed_data(agreement=purchase.agreement, deadline=_unix(purchase.unlock_time))


def _check_refund_signature(purchase: MasumiPurchase, signature: str) -> None:
    signer_require(typed=refund_request_typed_data(purchase=purchase), signature=signature,
                   expected=purchase.agreement.buyer_wallet_address, field="signature")


def purchase_request_refund(*, purchase: MasumiPurchase, buyer: Agent, signature: str | None) -> MasumiPurchase:
    """The buyer asks for its money back (before unlockTime). Idempotent. Without a signature, the one given at
    lock-funds is used; with neither the request is recorded and the money comes back by reclaim. A request made
    without one (the masumi library's) takes the signature the buyer sends afterwards, as its NextAction says; a
    signature that is not the buyer's is refused (`wrong_signer`) whenever it comes."""
    now = chain_clock.chain_now_for_request()
    with transaction.atomic():
        purchase = MasumiPurchase.objects.select_for_update().select_related("agreement").get(pk=purchase.pk)
        agreement = purchase.agreement
        if agreement.buyer_id != buyer.pk:
            raise Forbidden("Only the buyer requests a refund.", code="buyer_only")
        if signature is not None:
            _check_refund_signature(purchase, signature)
        if purchase.refund_requested_at is not None and (signature is None or purchase.refund_signature):
            return purchase
        if agreement.status not in (S.ACTIVE, S.IN_CHALLENGE):
            raise Conflict(f"No refund can be requested while the escrow is {agreement.status}.",
                           code="refund_not_possible", details={"status": agreement.status})
        if now >= _unix(purchase.unlock_time):
            raise Conflict("unlockTime has passed; the seller's payment can no longer be disputed.",
                           code="unlock_time_passed")
        # The dispute of a result is signed until unlockTime, and a challenge must stay valid this long to be mined.
        latest = _unix(purchase.unlock_time) - settings.CHALLENGE_SIGNATURE_MIN_VALIDITY
        if purchase.result_hash and now >= latest:
            raise Conflict("unlockTime is too close for a dispute of the result to be mined.",
                           code="unlock_time_too_close", details={"latest": str(latest * 1000)})
        if signature is not None:
            purchase.refund_signature = signature
        purchase.refund_requested_at = purchase.refund_requested_at or timezone.now()
        purchase.save(update_fields=["refund_requested_at", "refund_signature", "updated_at"])
    if agreement.status == S.IN_CHALLENGE and purchase.refund_signature:
        # After the commit: the challenge reads the chain, which no row lock may wait on. Should it fail, the
        # request stands and `purchases_tick` submits it.
        try:
            _dispute(purchase)
            _step_done(purchase)
        except ApplicationError as error:
            if error.code not in _DISPUTE_NOT_NEEDED:
                _record_error(purchase.pk, error)
    return purchase


def purchase_cancel_refund_request(*, purchase: MasumiPurchase, buyer: Agent) -> MasumiPurchase:
    """Withdraw a refund request that has not reached the chain yet (no challenge, nor zero proposal carrying it out,
    queued). The purchase's row and its agreement's are locked (one statement: FOR UPDATE of the join): a dispute (a
    zero proposal) being queued holds the agreement's and checks the request still stands (`_dispute`,
    `_refund_proposal`)."""
    with transaction.atomic():
        purchase = MasumiPurchase.objects.select_for_update().select_related("agreement").get(pk=purchase.pk)
        if purchase.agreement.buyer_id != buyer.pk:
            raise Forbidden("Only the buyer cancels its refund request.", code="buyer_only")
        if purchase.refund_requested_at is None:
            return purchase
        # On the chain once its challenge, or the zero proposal that carries it out (`_refund_proposal`), is queued.
        if purchase.agreement.status not in (S.ACTIVE, S.IN_CHALLENGE) or any(
                selectors.live_transaction(agreement_id=purchase.agreement_id, purpose=purpose)
                for purpose in (TxPurpose.CHALLENGE, TxPurpose.MASUMI_REFUND_PROPOSAL)):
            raise Conflict("The refund request is already on-chain.", code="refund_already_submitted",
                           details={"status": purchase.agreement.status})
        purchase.refund_requested_at = None
        purchase.save(update_fields=["refund_requested_at", "updated_at"])
    return purchase


# Refusals of a purchase's dispute (its release to the buyer) that are no error, not kept as the purchase's last one
# (its NextAction's errorType): the buyer's own cancel meanwhile, or the dispute (the resolution) another runner queued
# since this one read the purchase due (the buyer's request beside a tick, two ticks at once); for a release also a
# dispute timed out, which the settlement tick refunds whole, as this would.
_DISPUTE_NOT_NEEDED = frozenset({"refund_request_withdrawn", "challenge_in_progress"})
_RELEASE_NOT_NEEDED = frozenset({settlement.DISPUTE_TIMED_OUT, "resolution_in_progress"})
# Refusals of a refund request's dispute because the result's proposal was mined too late for its signature.
_DISPUTE_TOO_LATE = frozenset({"signature_expired", "unlock_time_passed"})
# A result's dispute (dated: `disputed_at`) the buyer may win: mined by unlockTime, or asked for before it.
# The refund request's challenge is signed until unlockTime, which the contract takes while block.timestamp <= it.
_DISPUTED_IN_TIME = Q(disputed_at__lte=F("unlock_time")) | Q(refund_requested_at__lt=F("unlock_time"))


def _asked_before_the_result(purchase: MasumiPurchase) -> bool:
    return purchase.refund_requested_at is not None and (
        purchase.result_submitted_at is None or purchase.refund_requested_at < purchase.result_submitted_at)


def _refund_proposal(purchase: MasumiPurchase, *, now: int) -> ChainTransaction | None:
    """The zero proposal carrying out a refund request the result's late proposal left no dispute for
    (`settlement.settlement_propose_refund`). Like `_dispute`, it reads the chain outside the request's lock: a
    cancel-refund-request meanwhile is seen under the agreement's lock, and nothing is proposed; once it is queued,
    the cancel is refused (409 `refund_already_submitted`)."""
    return settlement.settlement_propose_refund(
        agreement_id=purchase.agreement_id, now=now,
        still_wanted=lambda: selectors.masumi_refund_requested(agreement_id=purchase.agreement_id))


def _dispute(purchase: MasumiPurchase) -> ChainTransaction:
    """The refund request challenges the result. Sent outside the request's transaction (it reads the chain): a
    cancel-refund-request meanwhile is seen under the agreement's lock, which the cancel takes too, so either the
    request is withdrawn and nothing is queued (409 `refund_request_withdrawn`), or the cancel finds the challenge
    queued (409 `refund_already_submitted`)."""
    return settlement.settlement_challenge(
        agreement=purchase.agreement, buyer=purchase.agreement.buyer, signature=purchase.refund_signature,
        deadline=_unix(purchase.unlock_time), reason="refund requested after the result was submitted",
        still_wanted=lambda: selectors.masumi_refund_requested(agreement_id=purchase.agreement_id))


# --- seller actions (the /payment family: this marketplace as the seller's Masumi node) -------------------------

def check_listed_price(*, service: Service, funds: list[dict] | None) -> None:
    """Amounts a Masumi client names (masumi-crewai's RequestedFunds / Amounts) must be the listed price: one
    amount, in the service's token ("" meaning it). Cardano units ("lovelace") cannot apply."""
    if funds is not None and (len(funds) != 1 or funds[0]["amount"] != str(service.unit_price)
                              or funds[0]["unit"] not in ("", service.token)):
        raise InvalidInput("The amounts must be the service's listed price (one amount, in its token).",
                           code="requested_funds_mismatch",
                           details={"expected": [{"amount": str(service.unit_price), "unit": service.token}]})


def request_clock() -> tuple[int, int]:
    """(`deadline_clock()`, `chain_now_for_request()`): what new timers count from, read before a transaction."""
    return chain_clock.deadline_clock(), chain_clock.chain_now_for_request()


def payment_request_create(*, seller: Agent, service: Service, identifier_from_purchaser: str,
                           input_hash: str | None, metadata: str, timers: dict[str, int | None],
                           requested_funds: list[dict] | None,
                           clock: tuple[int, int] | None = None) -> MasumiPurchase | MasumiPaymentRequest:
    """A seller's payment request for one job (sent by a masumi seller from its /start_job).

    When the marketplace itself is starting that job for a purchase already funded (same service, purchaser
    identifier and input hash), the answer is that purchase: the job is paid already. Otherwise a new request, which
    the buyer pays with `POST /purchase` and its blockchainIdentifier. `clock`: `request_clock()`, read before the
    caller's transaction opened (else read here)."""
    if service.seller_id != seller.pk:
        raise NotFound("No such service of yours.", code="service_not_found")
    if service.upstream_protocol != UpstreamProtocol.MASUMI or service.state != ServiceState.REGISTERED:
        raise InvalidInput("Payments are requested for registered masumi services only.",
                           code="not_a_masumi_service")
    check_listed_price(service=service, funds=requested_funds)
    funded = MasumiPurchase.objects.filter(
        agreement__service=service, agreement__status=S.ACTIVE, identifier_from_purchaser=identifier_from_purchaser,
        payment_request__isnull=True, job_id="", job_start_claimed_at__isnull=False)
    if input_hash:
        funded = funded.filter(input_hash=input_hash)
    with transaction.atomic():
        # Each job the marketplace is starting is taken by one request: two purchases of one identifier and input
        # started at once were both answered with the older (the seller's second job named its blockchainIdentifier,
        # the newer never marked taken). One already taken answers again only once none is left (a retry).
        funded = funded.select_related("agreement").order_by("created_at")
        purchase = (funded.filter(job_start_acknowledged_at__isnull=True)
                    .select_for_update(of=("self",), skip_locked=True).first() or funded.first())
        if purchase is not None:  # the seller took the job: should its answer be lost, it is not started again
            MasumiPurchase.objects.filter(pk=purchase.pk, job_start_acknowledged_at__isnull=True).update(
                job_start_acknowledged_at=timezone.now())
            return purchase
    deadline_now, chain_now = clock or request_clock()
    at = _timers(deadline_now, timers, chain_now=chain_now)
    with transaction.atomic():
        _check_unpaid_payment_requests(seller)
        return MasumiPaymentRequest.objects.create(
            service=service, identifier_from_purchaser=identifier_from_purchaser, input_hash=input_hash or "",
            metadata=metadata, unit_price=service.unit_price, token=service.token,
            **{name: _moment(value) for name, value in at.items()})


UNPAID_PAYMENT_REQUESTS_WINDOW = timedelta(days=1)


def _check_unpaid_payment_requests(seller: Agent) -> None:
    """409 `payment_requests_limit_reached` once the seller has MASUMI_UNPAID_PAYMENT_REQUESTS_PER_SELLER unpaid
    payment requests still payable or requested within UNPAID_PAYMENT_REQUESTS_WINDOW: a request costs its seller
    nothing, so requesting in a loop (bounded only by the rate limit) grew the table without
    bound (unpaid ones are deleted MASUMI_PAYMENT_REQUEST_KEEP_DAYS after their payByTime,
    `expired_payment_requests_purge`). Call inside the transaction that writes the request: the seller's row is locked, so two requests at once
    cannot both slip under the bound."""
    Agent.objects.select_for_update().filter(pk=seller.pk).values_list("pk").get()
    now = timezone.now()
    limit = settings.MASUMI_UNPAID_PAYMENT_REQUESTS_PER_SELLER
    # One still payable was requested at most MAX_LOCK_SECONDS before its payByTime (its unlockTime is at most that
    # far ahead of the chain's clock, which leads the wall clock by less than a day): a range of the index on
    # (service, created_at), not every request the seller ever made.
    unpaid = (MasumiPaymentRequest.objects
              .filter(service__seller=seller, purchase__isnull=True,
                      created_at__gte=now - timedelta(seconds=MAX_LOCK_SECONDS) - UNPAID_PAYMENT_REQUESTS_WINDOW)
              .filter(Q(created_at__gte=now - UNPAID_PAYMENT_REQUESTS_WINDOW) | Q(pay_by_time__gt=now)))
    if unpaid[:limit].count() >= limit:
        raise Conflict(f"You have {limit} unpaid payment requests still payable or made in the last day; wait for "
                       "buyers to pay them, or for them to age out.", code="payment_requests_limit_reached",
                       details={"max_unpaid_payment_requests": limit,
                                "window_seconds": int(UNPAID_PAYMENT_REQUESTS_WINDOW.total_seconds())})


def expired_payment_requests_purge(*, now: datetime | None = None) -> int:
    """Delete the payment requests no buyer paid, MASUMI_PAYMENT_REQUEST_KEEP_DAYS after their payByTime: none of
    them can be paid any more (`purchase_prepare_for_payment` refuses one whose payByTime the deadline clock passed),
    and their seller's bound counts only those still payable or made within a day, so a seller requesting its bound
    each day grew the table without end. A paid one is the purchase's record (money history), kept. A bounded number
    of rows a run (`sweeps.rows_purge`), by the index on payByTime, waiting for one a purchase holds (and still
    unpaid when deleted), from the payByTime of the last one deleted: the paid ones, kept for ever, came first in that
    index, and every run read all of them before finding one to delete. (None becomes deletable behind that point: a
    request past its payByTime is never paid.) Safe twice. How many were deleted."""
    cutoff = (now or timezone.now()) - timedelta(days=settings.MASUMI_PAYMENT_REQUEST_KEEP_DAYS)
    return sweeps.rows_purge(deletable=MasumiPaymentRequest.objects.filter(pay_by_time__lt=cutoff,
                                                                           purchase__isnull=True),
                             order_by=("pay_by_time",), resume_turn="purge-expired-payment-requests")


def payment_submit_result(*, seller: Agent, purchase: MasumiPurchase, result_hash: str) -> MasumiPurchase:
    """The seller commits its result's hash (MIP-004) before submitResultTime: charged and proposed on-chain."""
    agreement = purchase.agreement
    if agreement.seller_id != seller.pk:
        raise NotFound("No such payment.", code="payment_not_found")
    if purchase.result_hash:
        if purchase.result_hash != result_hash:
            raise _result_already_submitted()
        return purchase
    if agreement.status != S.ACTIVE:
        raise Conflict(f"No result can be submitted while the escrow is {agreement.status}.",
                       code="funds_not_locked", details={"status": agreement.status})
    return purchase_result_record(purchase_id=purchase.pk, result_hash=result_hash)


def _result_already_submitted() -> Conflict:
    return Conflict("A different result hash was submitted already.", code="result_already_submitted")


def payment_authorize_refund(*, seller: Agent, purchase: MasumiPurchase) -> MasumiPurchase:
    """The seller agrees to refund a disputed purchase: the arbiter resolves it wholly to the buyer. Idempotent: once
    such a resolution is queued or done (this call's retry, one at once, the release at externalDisputeUnlockTime),
    the answer is the purchase, as to the first."""
    if purchase.agreement.seller_id != seller.pk:
        raise NotFound("No such payment.", code="payment_not_found")
    resolution = selectors.live_transaction(agreement_id=purchase.agreement_id, purpose=TxPurpose.RESOLVE)
    if resolution is not None:
        if resolution.context.get("seller_amount") == 0:
            return purchase
        # The arbiter decided a split: no refund of the whole is coming.
        raise Conflict("An operator's resolution of this dispute, paying the seller part, is under way.",
                       code="resolution_in_progress",
                       details={"seller_amount": str(resolution.context.get("seller_amount"))})
    if purchase.agreement.status != S.DISPUTED:
        raise Conflict("Only a disputed payment (a refund requested after the result) is refunded by its seller.",
                       code="no_refund_requested", details={"status": purchase.agreement.status})
    try:
        settlement.settlement_resolve(agreement=purchase.agreement, seller_amount=0, operator=None)
    except Conflict as error:
        # Queued at once by another (a timed-out dispute: the settlement tick refunds the buyer whole, as this would).
        if error.code not in _RELEASE_NOT_NEEDED:
            raise
    return purchase


# --- the marketplace driving the seller's job (beat) -----------------------------------------------------------

def _base_url(purchase: MasumiPurchase) -> str:
    return purchase.agreement.service.upstream_base_url


# The code of a seller's call that failed (a timeout, a non-2xx, an unusable answer: AgenticServiceError), kept as the
# purchase's last error code; a refusal keeps its own code. Shown as NextAction.errorCode.
SELLER_SERVICE_ERROR = "seller_service_error"
# The last error codes that are the seller's failure (NextAction.errorType `SellerServiceError`): its call failed, or
# its result came after submitResultTime. Any other is the refusal of a step of the purchase's own (a dispute, its
# release, a result the escrow's state no longer takes): `PurchaseStepRefused`, not the seller's.
SELLER_FAILURE_CODES = frozenset({SELLER_SERVICE_ERROR, "submit_result_time_passed"})
PURCHASE_STEP_REFUSED = "PurchaseStepRefused"


def _error_code(error: Exception) -> str:
    if isinstance(error, ApplicationError):
        return error.code
    if isinstance(error, masumi_agentic_client.AgenticServiceError):
        return SELLER_SERVICE_ERROR
    return "internal_error"


def _record_error(purchase_id, error: Exception) -> None:
    """Kept as the purchase's last error, with its machine-readable code (`last_error_code`, NextAction.errorCode:
    the refusal's own, `seller_service_error` for a seller's call that failed), a new code told to both parties
    (`agreement_error_tell`: a webhook, an inbox entry). Not the node not answering a step of
    ours (503 `chain_unavailable`: the next tick does it again): kept, it was shown to the buyer as the seller's
    failure, for good once the purchase was disputed (no call to the seller clears it)."""
    if isinstance(error, ApplicationError) and error.code == chain.unavailable().code:
        logger.warning("masumi purchase's step not done: the chain RPC is unavailable; the next tick tries again",
                       extra={"purchase_id": str(purchase_id)})
        return
    code, text = _error_code(error)[:64], f"{type(error).__name__}: {error}"[:500]
    with transaction.atomic():
        # The purchase's lock orders two errors recorded at once: a code is told to the parties (a webhook, an inbox
        # entry) once, when it replaces another or none. Then the agreement's, in the order purchase_result_record
        # takes them.
        agreement_id, told = MasumiPurchase.objects.select_for_update().filter(pk=purchase_id).values_list(
            "agreement_id", "last_error_code").get()
        MasumiPurchase.objects.filter(pk=purchase_id).update(last_error=text, last_error_code=code,
                                                             updated_at=timezone.now())
        if told != code:
            agreement_services.agreement_error_tell(agreement_id=agreement_id, code=code, reason=text)


def _step_done(purchase: MasumiPurchase) -> None:
    """A step of the purchase's own (a dispute, its release, a zero proposal) was queued: a refusal of such a step kept
    before (a code not the seller's) no longer holds, and is cleared, so the purchase does not show it while the step
    runs. A seller's failure stays (only its next answer clears it); a newer error recorded meanwhile too."""
    if purchase.last_error and purchase.last_error_code and purchase.last_error_code not in SELLER_FAILURE_CODES:
        MasumiPurchase.objects.filter(pk=purchase.pk, last_error_code=purchase.last_error_code).update(
            last_error="", last_error_code="", updated_at=timezone.now())


# A tick calls the due purchases' sellers concurrently (the HTTP exchanges on threads, every database access on the
# tick's own), at most this many at once per seller, so a seller that hangs holds a few slots and never the rest.
JOB_CALLS_AT_ONCE_PER_SELLER = 2
# A failed call (timeout, connection error, non-2xx, unusable answer) waits tick x 2^failures, at most this long.
JOB_CALL_BACKOFF_MAX_SECONDS = 300
# A call's lease: the call's deadline plus the database work around it, well inside a tick.
JOB_CALL_LEASE_MARGIN_SECONDS = 30


def _job_call_lease_seconds() -> float:
    return settings.MASUMI_SERVICE_TIMEOUT + JOB_CALL_LEASE_MARGIN_SECONDS


@dataclass(frozen=True)
class _JobCall:
    """One claimed call to a seller: what its thread needs, read beforehand (the thread touches no database)."""
    purchase: MasumiPurchase
    seller_id: Any

    @property
    def starts(self) -> bool:
        return not self.purchase.job_id

    def exchange(self) -> masumi_agentic_client.StartedJob | masumi_agentic_client.JobStatus:
        purchase = self.purchase
        if self.starts:
            return masumi_agentic_client.start_job(
                base_url=_base_url(purchase), protocol_version=purchase.agreement.service.masumi_protocol_version,
                input_data=purchase.input_data, identifier_from_purchaser=purchase.identifier_from_purchaser)
        return masumi_agentic_client.job_status(base_url=_base_url(purchase), job_id=purchase.job_id)


def _due_job_calls(now: int) -> list[tuple[Any, Any]]:
    """(purchase id, seller id) of the purchases whose seller is due a call, the longest waiting first: jobs the
    marketplace starts itself (a purchase paying a seller's payment request: the buyer started it), and jobs
    running without a result, while submitResultTime has not passed."""
    # Not once completion is asked for (a purchase funded after it expired is given back): its result is never charged.
    to_start = Q(agreement__status=S.ACTIVE, agreement__completion_requested_at__isnull=True, result_hash="",
                 job_id="", payment_request__isnull=True, job_start_acknowledged_at__isnull=True)
    to_poll = Q(agreement__status__in=[S.ACTIVE, S.IN_CHALLENGE], result="") & ~Q(job_id="")
    due = Q(job_next_call_at__isnull=True) | Q(job_next_call_at__lte=timezone.now())
    return list(MasumiPurchase.objects.filter(to_start | to_poll, due, submit_result_time__gt=_moment(now)).order_by(
        F("job_next_call_at").asc(nulls_first=True), "created_at").values_list("pk", "agreement__seller_id")[:500])


def _job_call_claim(purchase_id, seller_id, *, now: int) -> _JobCall | None:
    """The purchase's next call, leased (its next call moved past this one's timeout) so no other tick makes it
    meanwhile; None when it is not due, or there is nothing to call any more."""
    wall = timezone.now()
    leased = MasumiPurchase.objects.filter(
        Q(job_next_call_at__isnull=True) | Q(job_next_call_at__lte=wall), pk=purchase_id,
    ).update(job_next_call_at=wall + timezone.timedelta(seconds=_job_call_lease_seconds()))
    if not leased:
        return None
    purchase = MasumiPurchase.objects.select_related("agreement__service").get(pk=purchase_id)
    status = purchase.agreement.status
    if purchase.result or now >= _unix(purchase.submit_result_time):
        return None
    if not purchase.job_id:
        if (status != S.ACTIVE or purchase.agreement.completion_requested_at is not None or purchase.result_hash
                or purchase.payment_request_id is not None or purchase.job_start_acknowledged_at is not None):
            return None
        if purchase.job_start_claimed_at is not None:
            _job_start_answer_lost(purchase)
        # Read by `payment_request_create`: the seller's server asks this node for the payment while starting it.
        MasumiPurchase.objects.filter(pk=purchase_id).update(job_start_claimed_at=wall)
    elif status not in (S.ACTIVE, S.IN_CHALLENGE):
        return None
    return _JobCall(purchase=purchase, seller_id=seller_id)


def _job_start_answer_lost(purchase: MasumiPurchase) -> None:
    """The last start_job's tick ended before its answer was recorded (a failed call clears the claim). MIP-003 has
    no way to ask the seller for a job by anything but its own job id, so the job is started again: counted and
    logged for the seller's operators, since the seller, paid once, may run it twice. A masumi-library seller
    that took the job asked this node for its payment first (`payment_request_create`), and is not called again."""
    MasumiPurchase.objects.filter(pk=purchase.pk).update(job_starts_unanswered=F("job_starts_unanswered") + 1)
    logger.error("a seller's start_job answer was lost; starting the job again, which the seller may run twice",
                 extra={"purchase_id": str(purchase.pk), "agreement_id": str(purchase.agreement_id),
                        "service_id": str(purchase.agreement.service_id)})


def _job_call_failed(call: _JobCall, error: Exception, *, now: int, ours: bool = False) -> None:
    """Recorded, and the next call pushed back: tick x 2^failures, at most JOB_CALL_BACKOFF_MAX_SECONDS, and
    never so far that a seller back up misses submitResultTime (the last call still fits before it). `ours`: the
    error is not the seller's but the tick's (a bug, bad data, a database error: the tick logs it), so nothing is
    shown to the buyer, and a start's claim stays: the seller may have taken the job, and its next start is
    counted as one whose answer was lost (`_job_start_answer_lost`)."""
    failures = call.purchase.job_call_failures + 1
    backoff = min(settings.MASUMI_PURCHASE_TICK_SECONDS * 2 ** min(failures, 16), JOB_CALL_BACKOFF_MAX_SECONDS)
    room = _unix(call.purchase.submit_result_time) - now - _job_call_lease_seconds()
    wait = max(0, min(backoff, room))  # counted by the chain's clock, waited by ours
    changes = {"job_call_failures": failures, "job_next_call_at": timezone.now() + timezone.timedelta(seconds=wait)}
    if call.starts and not ours:
        changes["job_start_claimed_at"] = None
    MasumiPurchase.objects.filter(pk=call.purchase.pk).update(**changes)
    if not ours:
        _record_error(call.purchase.pk, error)


def _job_call_answered(call: _JobCall, answer, *, now: int) -> MasumiPurchase | None:
    """The seller's answer recorded; its next call due at once (the next tick, or this one after a start). A
    completed job's result is recorded (fetched too when the seller submitted only its hash). A job id the seller
    gave another purchase of the service still running is refused (AgenticServiceError), nothing recorded."""
    purchase_id = call.purchase.pk
    schedule = {"job_call_failures": 0, "job_next_call_at": timezone.now(), "updated_at": timezone.now()}
    if call.starts:
        # One job's result charged to two purchases. Only those still polled: a seller may reuse its old ids.
        if MasumiPurchase.objects.filter(agreement__service_id=call.purchase.agreement.service_id,
                                         job_id=answer.job_id, result="",
                                         agreement__status__in=[S.ACTIVE, S.IN_CHALLENGE]).exists():
            raise masumi_agentic_client.AgenticServiceError("/start_job: the job id is another purchase's")
        MasumiPurchase.objects.filter(pk=purchase_id).update(job_id=answer.job_id, payment_id=answer.payment_id,
                                                             last_error="", last_error_code="", **schedule)
        return None
    # Seller text the buyer reads (`jobStatus`), which no rule of a listing's checked: its invisible characters escaped.
    MasumiPurchase.objects.filter(pk=purchase_id).update(job_status=shown_text.printable(answer.status)[:50],
                                                         **schedule)
    if answer.status == COMPLETED and answer.result is not None:
        try:
            return purchase_result_record(purchase_id=purchase_id, result=answer.result, result_hash=result_hash_of(
                answer.result, call.purchase.identifier_from_purchaser))
        except ApplicationError as error:  # e.g. the agreement was used through the proxy meanwhile
            if error.code == "result_hash_mismatch":
                # The seller's answer contradicts the hash it committed: a failed call, backed off as one, not
                # asked again at every tick until submitResultTime.
                raise masumi_agentic_client.AgenticServiceError(f"/status: {error.message}") from error
            _record_error(purchase_id, error)
    return None


def purchase_result_record(*, purchase_id, result_hash: str, result: str = "") -> MasumiPurchase:
    """Keep the result hash (and the result, when the marketplace fetched it), charge the price and propose the
    settlement that commits the hash. A result whose hash differs from one already committed is kept aside as an
    error (the buyer disputes it), a seller's different hash alone refused (409 `result_already_submitted`); the
    committed hash never changes. A new result is refused (409
    `submit_result_time_passed`) once submitResultTime has passed by the chain's clock, however long the seller
    took to answer: `job_result_charge` decides it under the agreement's lock."""
    chain_now = chain_clock.chain_now_for_request()  # before the transaction: no row lock waits on the node
    with transaction.atomic():
        purchase = MasumiPurchase.objects.select_for_update().get(pk=purchase_id)
        if purchase.result_hash:
            if not result and result_hash != purchase.result_hash:  # the seller's, read before another committed
                raise _result_already_submitted()
            if result and not purchase.result:
                if result_hash != purchase.result_hash:
                    raise Conflict("The seller's result does not match the result hash it submitted.",
                                   code="result_hash_mismatch", details={"submitted": purchase.result_hash,
                                                                         "result": result_hash})
                purchase.result = result
                purchase.save(update_fields=["result", "updated_at"])
            return purchase
        purchase.result, purchase.result_hash, purchase.result_submitted_at = result, result_hash, timezone.now()
        purchase.last_error = purchase.last_error_code = ""
        purchase.save(update_fields=["result", "result_hash", "result_submitted_at", "last_error", "last_error_code",
                                     "updated_at"])
        agreement_services.job_result_charge(agreement_id=purchase.agreement_id, result_hash="0x" + result_hash,
                                             request_id=f"masumi-job:{purchase.pk}",  # a job id may be 250 characters
                                             chain_now=chain_now)
    # After the commit: the proposal reads the chain, which no row lock may wait on. The charge asked for
    # completion, so should the proposal fail here, settlement_tick proposes it.
    try:
        settlement.settlement_propose(agreement_id=purchase.agreement_id, now=chain_now)
    except (ApplicationError, chain.ChainError) as error:  # a node down too: the tick's other answers go on
        logger.warning("settlement proposal after a job result deferred to the settlement tick",
                       extra={"agreement_id": str(purchase.agreement_id), "error": str(error)})
    return purchase


def purchases_jobs_tick(*, now: int | None = None) -> dict[str, int]:
    """The sellers' jobs of Masumi purchases (a beat task of the outbound queue: it waits on sellers, so it never
    holds the workers that move money): start those due, poll those running, each purchase's calls scheduled by
    its own backoff. Calls run MASUMI_JOB_CALLS_AT_ONCE at a time, JOB_CALLS_AT_ONCE_PER_SELLER per seller, and
    none starts after MASUMI_PURCHASE_TICK_SECONDS: a tick ends within that plus one MASUMI_SERVICE_TIMEOUT, what
    did not fit waiting for the next. A second tick meanwhile is a no-op (a lock; each call's lease besides).
    A purchase whose claim, call or answer's record raises other than a seller's error (a bug, bad data, a database
    error on its row) is logged and skipped (its claim's lease lapses; a call's backs off as a failed one), the
    others' answers recorded and their calls made, and RowsFailed raised at the end (sweeps.RowFailures). A node of
    another chain than CHAIN_ID has nothing read from it (`chain.node_chain_check`): its clock started jobs."""
    chain.node_chain_check()
    now = now if now is not None else chain_clock.chain_now()
    done = {"started": 0, "results": 0}
    with postgresql.alone("escrow-masumi-jobs-tick") as first:  # each call's lease besides (SQLite: alone)
        if not first:
            return done
        # No transaction around a purchase's steps: a result's proposal reads the chain after its own commit.
        failures = sweeps.RowFailures("masumi jobs tick")
        starting_ends = time.monotonic() + settings.MASUMI_PURCHASE_TICK_SECONDS
        waiting = _due_job_calls(now)
        running: dict[Future, _JobCall] = {}
        per_seller: Counter = Counter()
        with ThreadPoolExecutor(max_workers=settings.MASUMI_JOB_CALLS_AT_ONCE,
                                thread_name_prefix="masumi-job-call") as pool:
            while True:
                for entry in list(waiting):
                    if len(running) >= settings.MASUMI_JOB_CALLS_AT_ONCE or time.monotonic() >= starting_ends:
                        break
                    purchase_id, seller_id = entry
                    if per_seller[seller_id] >= JOB_CALLS_AT_ONCE_PER_SELLER:
                        continue
                    waiting.remove(entry)
                    call = None
                    with failures.row(purchase_id, atomic=False):
                        call = _job_call_claim(purchase_id, seller_id, now=now)
                    if call is not None:
                        running[pool.submit(call.exchange)] = call
                        per_seller[seller_id] += 1
                if not running:
                    failures.raise_if_any(applied=sum(done.values()))
                    return done
                finished, _ = wait(running, return_when=FIRST_COMPLETED)
                for future in finished:
                    call = running.pop(future)
                    per_seller[call.seller_id] -= 1
                    with failures.row(call.purchase.pk, atomic=False):
                        try:
                            recorded = _job_call_answered(call, future.result(), now=now)
                        except masumi_agentic_client.AgenticServiceError as error:
                            _job_call_failed(call, error, now=now)
                            continue
                        except Exception as error:
                            _job_call_failed(call, error, now=now, ours=True)
                            raise
                        if recorded is not None:
                            done["results"] += 1
                        if call.starts:
                            done["started"] += 1
                            waiting.insert(0, (call.purchase.pk, call.seller_id))  # its first status check at once


# Unfunded purchases expired per run of the purchases tick; the next run takes up after the last.
UNFUNDED_PURCHASES_EXPIRED_PER_RUN = 500


def purchases_tick(*, now: int | None = None) -> dict[str, int]:
    """Everything else due on Masumi purchases, in one pass (the beat task): no seller is called. Each step is
    idempotent. A node of another chain than CHAIN_ID has nothing read from it (`chain.node_chain_check`: WrongChain):
    its clock expired purchases unfunded, its escrows' states moved ours."""
    chain.node_chain_check()
    now = now if now is not None else chain_clock.chain_now()
    now_dt = _moment(now)
    done = {"expired": 0, "disputed": 0, "released": 0, "refunding": 0}  # released: disputes resolved, either way
    # Each purchase alone: one that raises (bad data, a bug) is logged and skipped, the others done, and the tick
    # raises RowsFailed at its end; a node down (RpcUnavailable) still ends it (the task retries).
    failures = sweeps.RowFailures("masumi purchases tick")
    alone = functools.partial(failures.row, reraise=(chain.RpcUnavailable,), atomic=False)
    # Never funded by payByTime: the signed intent can no longer be mined, so the purchase is over.
    unfunded = MasumiPurchase.objects.filter(agreement__status__in=AWAITING_FUNDING_STATUSES,
                                             pay_by_time__lte=now_dt)
    # In turn: the first of the table's order, purchases whose expiry always raised filled the batch at every run.
    for agreement_id in [purchase.agreement_id for purchase in sweeps.rows_in_turn(
            unfunded.only("pk", "agreement_id", "pay_by_time"), turn="masumi-purchases-tick:unfunded",
            by="pay_by_time", size=UNFUNDED_PURCHASES_EXPIRED_PER_RUN)]:
        with failures.row(agreement_id):
            if agreement_services.agreement_expire_unfunded(agreement_id=agreement_id,
                                                            reason="payByTime passed before the funds were locked",
                                                            code="pay_by_time_passed"):
                done["expired"] += 1
    # A refund asked for and no result by submitResultTime: paid back now, by the purchase's own timers (a zero
    # proposal the buyer's signed request challenges, then the arbiter's resolve(0)), not the reclaim grace. Only
    # while that challenge, signed until unlockTime, can still be mined (as for a result submitted at
    # submitResultTime): a zero proposal left unchallenged holds the money for its window (unlockTime − purchase
    # time, up to 30 days) and closes the reclaim, which otherwise pays the buyer back after the contract's grace.
    unanswered = MasumiPurchase.objects.filter(
        agreement__status=S.ACTIVE, result_hash="", refund_requested_at__isnull=False,
        submit_result_time__lte=now_dt, unlock_time__gte=_moment(now + settings.MASUMI_MIN_DISPUTE_SECONDS),
    ).exclude(refund_signature="")
    for purchase in unanswered.select_related("agreement"):
        with alone(purchase.agreement_id):
            if _zero_proposal(purchase, now=now):
                _step_done(purchase)
                done["refunding"] += 1
    # A refund asked for before the result: dispute the result once its proposal is on-chain. One the relayer mined
    # too late for the buyer's challenge (signed until unlockTime) is refunded by a zero proposal above it.
    for purchase in MasumiPurchase.objects.filter(refund_requested_at__isnull=False, agreement__status=S.IN_CHALLENGE,
                                                  ).exclude(refund_signature="").select_related("agreement"):
        if selectors.live_transaction(agreement_id=purchase.agreement_id, purpose=TxPurpose.CHALLENGE):
            continue
        with alone(purchase.agreement_id):
            try:
                _dispute(purchase)  # no transaction around it: it reads the chain, then takes its own
                _step_done(purchase)
                done["disputed"] += 1
            except ApplicationError as error:
                if error.code in _DISPUTE_TOO_LATE and _asked_before_the_result(purchase):
                    if _refund_proposal(purchase, now=now):
                        _step_done(purchase)
                        done["refunding"] += 1
                elif error.code not in _DISPUTE_NOT_NEEDED:
                    _record_error(purchase.pk, error)
    # A result's dispute is dated by its block: a result's proposal opens its window past unlockTime (by as long as
    # the result took), where our endpoints refuse a dispute (409 `unlock_time_passed`) but the contract takes the
    # buyer's own `challenge`. Masumi pays the seller from unlockTime on: such a dispute is resolved for the seller,
    # unless it carries out a refund request made in time (an unsigned one, or its challenge mined at unlockTime).
    disputed_results = MasumiPurchase.objects.filter(agreement__status=S.DISPUTED).exclude(result_hash="")
    dated = disputed_results.filter(disputed_at__isnull=False)
    if dated.exists():  # a date whose block a reorg took is dated again (below) by the challenge the chain has now
        reorg_reach = chain.latest_block_number() - settings.INDEXER_REORG_WINDOW_BLOCKS
        for purchase in dated.filter(Q(disputed_block_number=None) | Q(disputed_block_number__gt=reorg_reach)):
            with alone(purchase.agreement_id):
                _dispute_date_check(purchase)
    for purchase in disputed_results.filter(disputed_at=None).select_related("agreement"):
        with alone(purchase.agreement_id):
            _dispute_date(purchase)
    for purchase in disputed_results.exclude(_DISPUTED_IN_TIME).filter(disputed_at__isnull=False).select_related(
            "agreement"):
        if not _release_due(purchase):
            continue
        with alone(purchase.agreement_id):
            try:
                settlement.settlement_uphold(agreement=purchase.agreement)
                _step_done(purchase)
                done["released"] += 1
            except ApplicationError as error:
                if error.code not in _RELEASE_NOT_NEEDED:
                    _record_error(purchase.pk, error)
    # Disputes nobody resolved by externalDisputeUnlockTime go to the buyer; so do disputes of no result at all.
    for purchase in MasumiPurchase.objects.filter(
            Q(_DISPUTED_IN_TIME, external_dispute_unlock_time__lte=now_dt) | Q(result_hash=""),
            agreement__status=S.DISPUTED).select_related("agreement"):
        if not _release_due(purchase):
            continue
        with alone(purchase.agreement_id):
            try:
                settlement.settlement_resolve(agreement=purchase.agreement, seller_amount=0, operator=None)
                _step_done(purchase)
                done["released"] += 1
            except ApplicationError as error:
                if error.code not in _RELEASE_NOT_NEEDED:
                    _record_error(purchase.pk, error)
    failures.raise_if_any(applied=sum(done.values()))
    return done


def _release_due(purchase: MasumiPurchase) -> bool:
    """A dispute's release (the arbiter's resolve) is queued unless one is under way, or those the chain refused back
    off or wait for an operator (`settlement.resolution_due`)."""
    return (not selectors.live_transaction(agreement_id=purchase.agreement_id, purpose=TxPurpose.RESOLVE)
            and settlement.resolution_due(agreement_id=purchase.agreement_id))


def _dispute_date(purchase: MasumiPurchase) -> None:
    """Records when the purchase's escrow was challenged, by the chain, and in which block (none found yet: left for
    the next tick, which searches from the last block searched, less the reorg window, not the whole chain again)."""
    agreement = purchase.agreement
    latest = chain.latest_block_number()
    start = chainconfig.escrow_deployment_block()
    if purchase.dispute_searched_block is not None:
        start = max(start, purchase.dispute_searched_block - settings.INDEXER_REORG_WINDOW_BLOCKS)
    found = chain.escrow_challenged_at(agreement.onchain_id, buyer=agreement.buyer_wallet_address,
                                       from_block=start, to_block=latest)
    undated = MasumiPurchase.objects.filter(pk=purchase.pk, disputed_at=None)
    if found is None:
        undated.update(dispute_searched_block=latest)
        return
    challenged_at = found["timestamp"]
    undated.update(disputed_at=_moment(challenged_at), disputed_block_number=found["number"],
                   disputed_block_hash=found["hash"], dispute_searched_block=latest)
    if challenged_at > _unix(purchase.unlock_time) and purchase.refund_requested_at is None:
        logger.warning("masumi purchase's result disputed after its unlockTime: resolved for the seller",
                       extra={"agreement_id": str(agreement.pk), "disputed_at": challenged_at,
                              "unlock_time": _unix(purchase.unlock_time)})


def _dispute_date_check(purchase: MasumiPurchase) -> None:
    """A dispute's date stands while its challenge's block is canonical; one a reorg took (or a date from before
    blocks were kept) is cleared, to be dated again by the challenge the chain has now."""
    if purchase.disputed_block_number is not None:
        canonical = chain.canonical_block_hash(purchase.disputed_block_number)
        if canonical is None or canonical.lower() == purchase.disputed_block_hash.lower():  # None: a node behind
            return
        logger.warning("masumi purchase's dispute date taken by a reorg: dated again",
                       extra={"agreement_id": str(purchase.agreement_id),
                              "block_number": purchase.disputed_block_number})
    MasumiPurchase.objects.filter(pk=purchase.pk, disputed_at=purchase.disputed_at).update(
        disputed_at=None, disputed_block_number=None, disputed_block_hash="")


def _zero_proposal(purchase: MasumiPurchase, *, now: int) -> ChainTransaction | None:
    with transaction.atomic():
        agreement = UsageAgreement.objects.select_for_update().get(pk=purchase.agreement_id)
        if agreement.status != S.ACTIVE or agreement.used:
            return None
        if agreement.completion_requested_at is None:
            agreement_services.completion_request(agreement=agreement,
                                                  reason="no result by submitResultTime; refund requested")
    # After the commit: the proposal reads the chain (and locks the agreement again to queue it).
    return settlement.settlement_propose(agreement_id=agreement.pk, now=now)


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


# NextAction's errorType of a disputed purchase whose release the ticks stopped trying (`settlement.resolution_due`).
DISPUTE_RELEASE_FAILED = "DisputeReleaseFailed"
# NextAction's errorType of a purchase its buyer funded itself that its owner's policy refuses (errorCode: the
# refusal's), or that it funded after the purchase closed: given back through a settlement of nothing.
REFUSED_BY_POLICY = "RefusedByPolicy"
FUNDED_AFTER_CLOSE_ERROR = "FundedAfterClose"


def purchase_next_action(purchase: MasumiPurchase) -> dict:
    """Masumi's NextAction, and `errorCode`: the machine-readable code of what `errorType` names (the last error's
    code, or one of its own for the states that have no code: the errorType in snake case)."""
    agreement = purchase.agreement
    action, error_type, note, code = "None", None, None, None
    if can_activate(agreement):
        action = "FundsLockingRequested"
        if agreement.status == S.ACTIVATION_FAILED:
            error_type, note = "FundsLockingFailed", agreement.status_reason
    elif agreement.status == S.SUBMITTING:
        action = "FundsLockingInitiated"
    elif agreement.status == S.DISPUTED:
        action = "WaitingForExternalAction"
        given_up = settlement.resolution_given_up(agreement_id=agreement.pk)
        if given_up is not None:
            error_type, note = DISPUTE_RELEASE_FAILED, (
                f"The dispute's resolution failed {settings.SETTLEMENT_PROPOSE_MAX_ATTEMPTS} times "
                f"({given_up.failure_reason or 'no reason recorded'}); an operator retries it.")
    elif agreement.status == S.SETTLING:
        action = "WithdrawInitiated"
    elif purchase.refund_requested_at is not None and agreement.status in (S.ACTIVE, S.IN_CHALLENGE):
        action = "SetRefundRequestedInitiated" if purchase.result_hash else "WaitingForExternalAction"
    elif is_closed(agreement):
        error_type, note = "Closed", agreement.status_reason or agreement.status
    if agreement.completion_code and error_type is None and agreement.status not in (S.SETTLED, S.REFUNDED):
        # Funded by the buyer itself past its owner's policy, or after the purchase closed: its job is never started
        # and a settlement of nothing gives the money back; FundsLocked alone left the buyer waiting for a result.
        error_type = FUNDED_AFTER_CLOSE_ERROR if agreement.completion_code == FUNDED_AFTER_CLOSE else REFUSED_BY_POLICY
        code, note = agreement.completion_code, agreement.completion_reason
    if purchase.refund_requested_at is not None and not purchase.refund_signature and error_type is None:
        error_type, note = "RefundSignatureMissing", ("Sign refundRequestTypedData and PATCH /purchase to be refunded "
                                                      "by the purchase's timers; else by reclaim after the grace.")
    if purchase.last_error and error_type is None:
        code = purchase.last_error_code or SELLER_SERVICE_ERROR  # one kept before codes were: a seller's call
        error_type = "SellerServiceError" if code in SELLER_FAILURE_CODES else PURCHASE_STEP_REFUSED
        note = purchase.last_error
    if error_type is not None and code is None:
        code = _ERROR_TYPE_CODES[error_type]
    return {"requestedAction": action, "errorType": error_type, "errorCode": code, "errorNote": note}


_ERROR_TYPE_CODES = {"FundsLockingFailed": "funds_locking_failed", DISPUTE_RELEASE_FAILED: "dispute_release_failed",
                     "Closed": "closed", "RefundSignatureMissing": "refund_signature_missing"}


def purchase_current_transaction(purchase: MasumiPurchase) -> ChainTransaction | None:
    return ChainTransaction.objects.filter(agreement_id=purchase.agreement_id).prefetch_related(
        "attempts").order_by("-created_at").first()
