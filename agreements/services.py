"""Writes of usage agreements: proposal (with policy and approval), every status transition, fees, webhooks.

Every status change goes through `_transition`, under a row lock, checked against `TRANSITIONS` (in
agreements.models), and writes one `AgreementEvent` (plus webhook deliveries, sent after commit). A repeated
identical request is a no-op.
"""

import logging
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta
from functools import lru_cache
from typing import Protocol

from django.conf import settings
from django.contrib.auth.base_user import AbstractBaseUser
from django.core import checks
from django.db import DatabaseError, connection, transaction
from django.db.models import Exists, OuterRef, Q
from django.db.models.functions import Coalesce
from django.utils import timezone
from django.utils.crypto import salted_hmac

from agreements import invocations, selectors, webhooks, x402_protocol
# Skill invocations' and x402 payments' writes the escrow app drives (paying, settling), offered here as well.
from agreements.invocations import invocation_failures_check as invocation_failures_check
from agreements.invocations import invocation_is_retry as invocation_is_retry
from agreements.invocations import invocation_paid_out as invocation_paid_out
from agreements.invocations import invocation_payment_authorization_closed as invocation_payment_authorization_closed
from agreements.invocations import invocation_payment_confirmed as invocation_payment_confirmed
from agreements.invocations import invocation_payment_failed as invocation_payment_failed
from agreements.invocations import invocation_payment_reopened as invocation_payment_reopened
from agreements.invocations import invocation_payment_requirements as invocation_payment_requirements
from agreements.invocations import invocation_priced_check as invocation_priced_check
from agreements.invocations import invocation_refunded as invocation_refunded
from agreements.invocations import invocation_run as invocation_run
from agreements.invocations import invocation_run_paid as invocation_run_paid
from agreements.invocations import invocation_run_in_background as invocation_run_in_background
from agreements.invocations import invocation_settlement_reopened as invocation_settlement_reopened
from agreements.invocations import invocation_settlement_withdrawn as invocation_settlement_withdrawn
from agreements.invocations import invocation_cancelled_settlement_ran as invocation_cancelled_settlement_ran
from agreements.invocations import settlement_handler_register as settlement_handler_register
# Usage writes the escrow app drives (settlement, Masumi purchases), offered here with the other services.
from agreements.metering import completion_request as completion_request
from agreements.metering import job_result_charge as job_result_charge
from agreements.metering import reservations_settle_stale as reservations_settle_stale
from agreements.models import (
    APPROVAL_SUBJECT,
    AUTHORIZATION_WATCHED,
    AWAITING_FUNDING_STATUSES,
    CLOSED_PROPOSAL_LATE_USE_MARGIN_SECONDS,
    CLOSED_STATUSES,
    FUNDED_AFTER_CLOSE,
    NO_PAYMENT_REVERSAL,
    TRANSITIONS,
    UNFUNDED_LAPSED_STATUSES,
    UNFUNDED_OPEN_STATUSES,
    AgreementEvent,
    AgreementStatus,
    FeeSchedule,
    InvocationMoney,
    PaymentAuthorization,
    ProxyReplay,
    SettlementModel,
    SkillInvocation,
    UsageAgreement,
    UsageEvent,
    authorization_watched,
    acceptance_deadline,
    can_activate,
    is_closed,
    is_funded,
    statuses_after,
)
from agreements.x402_protocol import PAYER_HEADER as PAYER_HEADER
from agreements.x402_protocol import RETRY_PROOF_HEADER as RETRY_PROOF_HEADER
from agreements.x402_protocol import PAYMENT_HEADERS as PAYMENT_HEADERS
from agreements.x402_protocol import Authorization as Authorization
from agreements.x402_protocol import InvalidPayment as InvalidPayment
from agreements.x402_protocol import payment_header as payment_header
from agreements.x402_protocol import payment_required_quote as payment_required_quote
from agreements.x402_protocol import payment_response_header as payment_response_header
from agreements.x402_protocol import payment_verify as payment_verify
from agreements.x402_protocol import simulation_rejection as simulation_rejection
from agreements.x402_protocol import token_domain_reader_register as token_domain_reader_register
from catalog.models import Agent, Service, ServiceState, Skill
from marketplace import chainconfig, money, sweeps
from sdk import typed_data
from sdk.terms import terms_hash
from marketplace.errors import (ApplicationError, Conflict, DependencyUnavailable, Forbidden, InvalidInput,
                                NotFound)
from marketplace.fields import MAX_AMOUNT, amount_column_max
from marketplace.postgresql import prepared_cursor
from marketplace.signatures import signer_require
from policies import selectors as policy_selectors
from policies import services as policy_services

S = AgreementStatus

logger = logging.getLogger(__name__)

_TIMESTAMPS = {
    S.ACCEPTED: "accepted_at",
    S.REJECTED: "closed_at",
    S.CANCELLED: "closed_at",
    S.EXPIRED: "closed_at",
    S.ACTIVE: "activated_at",
    S.SETTLED: "settled_at",
    S.REFUNDED: "settled_at",
    S.PAID: "settled_at",
}
# What an agreement in each status counts against the buyer's spend caps (see `_committed_spends`).
# Not ACTIVATION_FAILED: within its term it may still be signed again, or its intent relayed by anyone, and become
# active.
# PAYMENT_FAILED counts nothing but a fee collected and not refunded yet (that fee is out of the buyer's wallet), once
# its authorization can no longer pay; until then (unused, valid, not cancelled) its price too: the platform tried to
# move that money, and anyone holding the authorization (its calldata is public once a payment reverted) may still.
NOTHING_COMMITTED = (*sorted(CLOSED_STATUSES), S.PAYMENT_FAILED)
# ... but a direct purchase closed, or failed, after its buyer's payment reached the seller (its payment_tx_hash names
# the transfer: a cancel, or an accept whose fee could not be collected) counts its price: it left the wallet.
PRICE_PAID_WHEN_NAMED = NOTHING_COMMITTED
# ... nor does an escrow agreement still unfunded once its term ended: the contract refuses an escrow past its
# expiresAt (InvalidExpiry), so it can no longer be activated (the sweep expires it; a chain whose clock lags ours
# that funds it all the same makes it active, counted again from then).
UNFUNDED_PAST_TERM = tuple(sorted(UNFUNDED_OPEN_STATUSES))
# What a skill invocation counts: its price from the moment its authorization is accepted (authorized, held, paying
# out or paid out, refunding until the refund is confirmed), nothing once refunded. One whose payment failed, or a
# reorg took it and it could not run again (`payment_reverted_at`), has not taken the buyer's money, but its
# authorization may still pay until its validBefore (with CLOSED_PROPOSAL_LATE_USE_MARGIN_SECONDS): its signed bytes
# are public once sent, and anyone may get them mined once the wallet holds funds (the treasury then holds the price:
# paid out to a seller called already, else refunded once found). It counts its price until then, as a failed direct
# purchase does; the platform offers no cancellation of an invocation's authorization, whose window is short (the
# 402's maxTimeoutSeconds). What the treasury paid out on a reverted payment is the platform's loss, which reconcile
# shows the operator.
INVOCATION_RELEASED = InvocationMoney.REFUNDED
INVOCATION_PAYMENT_FAILED = InvocationMoney.PAYMENT_FAILED


@dataclass(frozen=True)
class Actor:
    kind: str  # AgreementEvent.ActorKind
    label: str = ""

    @classmethod
    def agent(cls, agent: Agent, role: str) -> "Actor":
        return cls(role, agent.handle)

    @classmethod
    def person(cls, user, kind: str = AgreementEvent.ActorKind.OWNER) -> "Actor":
        return cls(kind, getattr(user, "username", "") if user else "")


SYSTEM = Actor(AgreementEvent.ActorKind.SYSTEM, "system")


# --- fees ----------------------------------------------------------------------------------------------------

def fee_schedule_current() -> FeeSchedule:
    schedule, _ = FeeSchedule.objects.get_or_create(pk=1)
    return schedule


def fee_for(*, amount: int, schedule: FeeSchedule | None = None) -> int:
    """max(ceil(amount × bps / 10 000) + fixed, minimum): rounding always up, in the platform's favour by < 1 unit."""
    schedule = schedule or fee_schedule_current()
    percent = -(-amount * schedule.percent_bps // 10_000)  # integer ceiling: exact for any amount
    return max(percent + schedule.fixed_atomic, schedule.minimum_atomic)


def fee_schedule_problem(schedule: FeeSchedule) -> str | None:
    """Why `schedule` cannot price agreements, or None: the largest agreement (AGREEMENT_MAX_AMOUNT) and its fee must
    fit a uint256 together, as the buyer's permit and the escrow's activation carry deposit + fee (a fee grows with
    the amount, so every smaller agreement's fits then too)."""
    largest = settings.AGREEMENT_MAX_AMOUNT
    fee = fee_for(amount=largest, schedule=schedule)
    if largest + fee > MAX_AMOUNT:
        return (f"The fee on the largest agreement ({largest} base units, AGREEMENT_MAX_AMOUNT) with that agreement "
                "does not fit a uint256, which the buyer's permit and the escrow's activation carry.")
    if fee > amount_column_max():
        return (f"The fee on the largest agreement ({largest} base units, AGREEMENT_MAX_AMOUNT) is above what this "
                f"database's amount columns hold exactly ({amount_column_max()}).")
    return None


def fee_schedule_check(app_configs=None, databases=None, **kwargs) -> list[checks.CheckMessage]:
    """Django system check, with `--database` (as `migrate` runs it): the saved fee schedule still prices the largest
    agreement (E004), which AGREEMENT_MAX_AMOUNT may have raised since the schedule was saved and checked."""
    if not databases:
        return []
    try:
        schedule = FeeSchedule.objects.filter(pk=1).first()
    except DatabaseError:  # before `migrate` made the table
        return []
    problem = schedule and fee_schedule_problem(schedule)
    if not problem:
        return []
    return [checks.Error(problem, obj=__name__, id="agreements.E004",
                         hint="Lower the fee schedule's fixed or minimum fee in the admin, or AGREEMENT_MAX_AMOUNT.")]


def _fee_within_bounds(*, amount: int, schedule: FeeSchedule) -> int:
    """The fee on `amount`, refused (503 `fee_schedule_invalid`) when it cannot be carried with the amount: a schedule
    saved under a lower AGREEMENT_MAX_AMOUNT (system check agreements.E004), never a purchase the buyer may sign."""
    fee = fee_for(amount=amount, schedule=schedule)
    if amount + fee > MAX_AMOUNT or fee > amount_column_max():
        logger.error("fee schedule cannot price %s base units: %s", amount, fee_schedule_problem(schedule))
        raise DependencyUnavailable("The platform's fee schedule cannot price this amount; an operator must correct "
                                    "it.", code="fee_schedule_invalid")
    return fee


def fee_and_total_for(*, amount: int, purpose: str, schedule: FeeSchedule) -> tuple[int, int]:
    """(fee, what the buyer pays) for `amount`: a direct purchase pays the fee on top; a skill invocation's price
    includes its fee (x402 pays exactly the price; the fee is kept from the seller's payout), refused as the skill route
    refuses it when the fee would take it whole (409 `skill_price_below_fee`), and either above AGREEMENT_MAX_AMOUNT
    as its proposal or the skill's call refuses it (400 `amount_too_large`)."""
    money.amount_within_limit(amount)  # as its proposal or the skill's call would refuse it
    if purpose == "skill_invocation":
        return invocations.invocation_fee_above_price(price=amount), amount
    fee = _fee_within_bounds(amount=amount, schedule=schedule)
    return fee, amount + fee


def fee_recipient(schedule: FeeSchedule | None = None) -> str:
    schedule = schedule or fee_schedule_current()
    return schedule.fee_recipient or settings.FEE_RECIPIENT


# --- transitions ---------------------------------------------------------------------------------------------

def _lock(agreement_id) -> UsageAgreement:
    agreement = UsageAgreement.objects.select_for_update().filter(pk=agreement_id).first()
    if agreement is None:
        raise NotFound("No such agreement.", code="agreement_not_found")
    return agreement


def agreement_lock(*, agreement_id) -> None:
    """Inside the caller's DB transaction: the agreement's row locked, before the caller locks rows of its own that
    belong to it (the escrow app's chain transactions), so that every path takes the two in one order."""
    _lock(agreement_id)


def _record_event(agreement: UsageAgreement, *, actor: Actor, from_status: str, reason: str, data: dict) -> None:
    event = AgreementEvent.objects.create(
        agreement=agreement, actor_kind=actor.kind, actor_label=actor.label, from_status=from_status,
        to_status=agreement.status, reason=reason, data=data,
    )
    webhooks.queue_for_event(agreement, event)


def _transition(agreement_id, *, to: str, actor: Actor, reason: str = "", data: dict | None = None,
                changes: dict | None = None, code: str = "") -> UsageAgreement:
    """Move the agreement to `to` under a row lock; a no-op when it is already there. Call inside atomic().
    `code`: the machine-readable code of `reason` (or `data["code"]`), kept as the agreement's status_code and its
    event's data.code (webhooks, inbox); a step without one clears the previous status's."""
    agreement = _lock(agreement_id)
    if agreement.status == to:
        return agreement
    if to not in TRANSITIONS.get(agreement.status, set()):
        raise Conflict(
            f"Cannot move an agreement from {agreement.status} to {to}.", code="invalid_transition",
            details={"status": agreement.status, "requested": to},
        )
    from_status = agreement.status
    data = dict(data or {})
    code = code or data.get("code") or ""
    if code:
        data["code"] = code
    agreement.status = to
    agreement.status_reason = reason[:500]
    agreement.status_code = code
    fields = ["status", "status_reason", "status_code", "updated_at"]
    if to in _TIMESTAMPS:
        setattr(agreement, _TIMESTAMPS[to], timezone.now())
        fields.append(_TIMESTAMPS[to])
    for name, value in (changes or {}).items():
        setattr(agreement, name, value)
        fields.append(name)
    agreement.save(update_fields=fields)
    _record_event(agreement, actor=actor, from_status=from_status, reason=reason, data=data)
    return agreement


def _require_party(agreement: UsageAgreement, agent: Agent, role: str) -> None:
    party_id = agreement.buyer_id if role == "buyer" else agreement.seller_id
    if agent.pk == party_id:
        return
    if agent.pk in (agreement.buyer_id, agreement.seller_id):
        raise Forbidden(f"Only the {role} may do this.", code=f"{role}_only")
    raise NotFound("No such agreement.", code="agreement_not_found")


# --- proposal ------------------------------------------------------------------------------------------------

@lru_cache(maxsize=2)
def _committed_spends_sql(*, unfunded_count: bool = False) -> str:
    """The SELECT of `_committed_spends`, built once per process (the ORM's Case/Sum/filter expressions cost ~1 ms
    of CPU to compile at every proposal, most of the statement's cost). Plain SQL that SQLite runs too.
    `unfunded_count`: a third column, the buyer's unanswered or unfunded agreements with one seller, and those it
    proposed since a moment that it cancelled or let lapse unfunded."""
    quote, meta, invocation_meta = connection.ops.quote_name, UsageAgreement._meta, SkillInvocation._meta
    authorization_meta = PaymentAuthorization._meta
    column = {name: quote(meta.get_field(name).column)
              for name in ("id", "status", "infra_fee", "seller_payout", "used", "deposit_amount", "buyer", "seller",
                           "created_at", "funds_moved_at", "fee_tx_hash", "buyer_refund",
                           "payment_tx_hash", "settlement_model", "expires_at", "payment_authorization",
                           "payment_authorization_cancel_tx_hash", "payment_authorization_watch_ended_at")}
    invocation = {name: quote(invocation_meta.get_field(name).column)
                  for name in ("money", "amount", "buyer", "created_at", "payment_reverted_at", "authorization",
                               "authorization_closed_by")}

    def valid_before_of(authorization: str) -> str:
        """The validBefore of the payment authorization whose key is the column `authorization`."""
        return (f"(SELECT a.{quote(authorization_meta.get_field('valid_before').column)} "  # noqa: S608
                f"FROM {quote(authorization_meta.db_table)} a WHERE a.{quote(authorization_meta.pk.column)} = "
                f"{authorization})")

    fee_kept = (f"{column['fee_tx_hash']} <> '' AND {column['buyer_refund']} IS NULL")
    fee_if_kept = f"CASE WHEN {fee_kept} THEN {column['infra_fee']} ELSE 0 END"
    # A failed payment's authorization that may still pay (see `_committed_spends`): valid until %s (unix seconds).
    # One a reorg took after it was counted paid (payment_reverted_at) too: the bytes that paid are public.
    authorization_may_pay = (
        f"{column['payment_authorization_cancel_tx_hash']} = '' "
        f"AND {column['payment_authorization_watch_ended_at']} IS NULL "
        f"AND {valid_before_of(column['payment_authorization'])} > %s")
    committed = (f"CASE WHEN {column['status']} IN ({', '.join(['%s'] * len(PRICE_PAID_WHEN_NAMED))}) "
                 f"AND {column['payment_tx_hash']} <> '' THEN {column['deposit_amount']} + {fee_if_kept} "
                 f"WHEN {column['status']} = %s AND {authorization_may_pay} "
                 f"THEN {column['deposit_amount']} + {fee_if_kept} "
                 f"WHEN {column['status']} = %s AND {fee_kept} THEN {column['infra_fee']} "
                 f"WHEN {column['status']} IN ({', '.join(['%s'] * len(NOTHING_COMMITTED))}) THEN 0 "
                 f"WHEN {column['settlement_model']} = %s AND {column['expires_at']} <= %s "
                 f"AND {column['status']} IN ({', '.join(['%s'] * len(UNFUNDED_PAST_TERM))}) THEN 0 "
                 f"WHEN {column['status']} = %s THEN {column['infra_fee']} "
                 f"WHEN {column['status']} = %s THEN {column['infra_fee']} + "
                 f"COALESCE({column['seller_payout']}, {column['used']}) "
                 f"ELSE {column['infra_fee']} + {column['deposit_amount']} END")
    # An agreement counts from its proposal until the platform moves its money, then from that moment.
    counted_at = f"COALESCE({column['funds_moved_at']}, {column['created_at']})"
    spends = (f"SELECT {counted_at} AS committed_at, {committed} AS amount "  # noqa: S608
              f"FROM {quote(meta.db_table)} WHERE {column['buyer']} = %s AND {column['id']} <> %s "
              f"AND {counted_at} >= %s "
              f"UNION ALL SELECT {invocation['created_at']}, {invocation['amount']} "
              f"FROM {quote(invocation_meta.db_table)} WHERE {invocation['buyer']} = %s "
              f"AND {invocation['created_at']} >= %s AND {invocation['money']} <> %s "
              # One whose payment failed or was reverted while its authorization may still pay (valid until %s, and
              # not closed on the token since: `invocation_payment_authorization_closed`).
              f"AND (({invocation['money']} <> %s AND {invocation['payment_reverted_at']} IS NULL) "
              f"OR ({valid_before_of(invocation['authorization'])} > %s "
              f"AND {invocation['authorization_closed_by']} = ''))")
    with_seller = (f"SELECT COUNT(*) FROM {quote(meta.db_table)} WHERE {column['buyer']} = %s "  # noqa: S608
                   f"AND {column['seller']} = %s AND {column['status']} IN ")
    unfunded = (f", ({with_seller}({', '.join(['%s'] * len(UNFUNDED_OPEN_STATUSES))})) + "
                f"({with_seller}({', '.join(['%s'] * len(UNFUNDED_LAPSED_STATUSES))}) "
                f"AND {column['created_at']} >= %s)") if unfunded_count else ""
    return ("SELECT COALESCE(SUM(amount) FILTER (WHERE committed_at >= %s), 0), "  # noqa: S608
            f"COALESCE(SUM(amount), 0){unfunded} FROM ({spends}) spends")


_NO_AGREEMENT = uuid.UUID(int=0)


@dataclass(frozen=True)
class CommittedSpends:
    last_day: int
    last_month: int
    unfunded_with_seller: int | None  # counted only when a seller was given


def _committed_spends(buyer: Agent, *, at: datetime, day_since: datetime, month_since: datetime,
                      excluding: uuid.UUID | None = None, unfunded_with: Agent | None = None,
                      unfunded_since: datetime | None = None) -> CommittedSpends:
    """What the buyer committed since `day_since` and since `month_since` (the earlier), in one statement: its
    agreements (nothing once released but the price of a direct purchase closed or failed after its buyer's payment
    reached the seller, a failed direct purchase's price while its authorization may still pay (unused, not
    cancelled, its validBefore not past by CLOSED_PROPOSAL_LATE_USE_MARGIN_SECONDS; one whose payment a reorg took
    after it was counted paid too) and its fee collected until it is refunded, the fee once refunded, fee plus what
    the seller was paid once settled, which an arbiter may set above what was metered, else fee plus deposit; nothing
    for an escrow agreement still unfunded once its term ended by `at`), each at the moment the platform moved its
    money (or found its price paid) or, until then, at its proposal, but for the agreement `excluding` (the one being
    checked); and its skill invocations (the price, unless refunded, or unless the payment failed or was reverted and
    its authorization can no longer pay: its validBefore past by CLOSED_PROPOSAL_LATE_USE_MARGIN_SECONDS). With
    `unfunded_with`, also how many of its agreements with that seller are unanswered or unfunded
    (`UNFUNDED_OPEN_STATUSES`), or were proposed since `unfunded_since` and cancelled or expired unfunded
    (`UNFUNDED_LAPSED_STATUSES`), in the same statement."""
    # Its validBefore, with the margin the watch of closed proposals gives a use to reach the confirmation depth.
    may_pay_until = int(at.timestamp()) - CLOSED_PROPOSAL_LATE_USE_MARGIN_SECONDS
    committed = [*PRICE_PAID_WHEN_NAMED, S.PAYMENT_FAILED, may_pay_until, S.PAYMENT_FAILED, *NOTHING_COMMITTED,
                 SettlementModel.ESCROW,
                 connection.ops.adapt_datetimefield_value(at), *UNFUNDED_PAST_TERM, S.REFUNDED, S.SETTLED]
    since = connection.ops.adapt_datetimefield_value
    agent_id = UsageAgreement._meta.get_field("buyer").get_db_prep_value
    buyer_id = agent_id(buyer.pk, connection)
    excluded = UsageAgreement._meta.pk.get_db_prep_value(excluding or _NO_AGREEMENT, connection)
    if unfunded_with is not None:
        seller_id = agent_id(unfunded_with.pk, connection)
        unfunded = [buyer_id, seller_id, *sorted(UNFUNDED_OPEN_STATUSES), buyer_id, seller_id,
                    *sorted(UNFUNDED_LAPSED_STATUSES), since(unfunded_since)]
    else:
        unfunded = []
    with prepared_cursor() as cursor:
        cursor.execute(_committed_spends_sql(unfunded_count=unfunded_with is not None),
                       [since(day_since), *unfunded, *committed, buyer_id, excluded, since(month_since),
                        buyer_id, since(month_since), INVOCATION_RELEASED, INVOCATION_PAYMENT_FAILED,
                        may_pay_until])
        row = cursor.fetchone()
    return CommittedSpends(last_day=int(row[0]), last_month=int(row[1]),
                           unfunded_with_seller=int(row[2]) if unfunded_with is not None else None)


@dataclass(frozen=True)
class RestatedTerms:
    """Terms a proposal may restate (the Pægents SDK does): each given one must be the service's own."""

    seller_id: uuid.UUID | None = None
    unit: str | None = None
    price_per_unit: int | None = None  # base units

    def check(self, service: Service) -> None:
        if self.seller_id is not None and self.seller_id != service.seller_id:
            raise InvalidInput("seller_agent_id is not the service's seller.", code="seller_mismatch",
                               details={"seller_agent_id": str(service.seller_id)})
        if self.unit is not None and self.unit != service.unit_name:
            raise InvalidInput(f"The service is sold per {service.unit_name!r}.", code="unit_mismatch",
                               details={"unit": service.unit_name})
        if self.price_per_unit is not None and self.price_per_unit != service.unit_price:
            raise InvalidInput("price_per_unit_cents is not the service's unit price.", code="price_mismatch",
                               details={"price_per_unit_atomic": service.unit_price})


@dataclass(frozen=True)
class Proposal:
    """A proposal checked and priced, with its direct payment's signatures checked (against the chain's permit
    nonce where the buyer left it out): what `agreement_propose` puts to the owner's policy and records."""

    buyer: Agent
    service: Service
    proposed_at: datetime
    settlement_model: str
    quantity: int
    deposit: int  # base units, as the fee
    fee: int
    token: str
    challenge_window_seconds: int
    expires_at: datetime
    proposal_expires_at: datetime
    terms: dict  # what `terms_hash` commits to
    note: str
    direct: x402_protocol.Authorization | None = None
    fee_permit: dict = field(default_factory=dict)


def agreement_proposal_prepare(
    *,
    buyer: Agent,
    service: Service,
    restated: RestatedTerms = RestatedTerms(),
    quantity: int,
    settlement_model: str = SettlementModel.ESCROW,
    token: str | None = None,
    buyer_wallet_address: str | None = None,
    expires_at: datetime | None = None,
    challenge_window_seconds: int | None = None,
    note: str = "",
    payment_header: str = "",
    fee_permit: dict | None = None,
) -> Proposal:
    """Every check a proposal must pass before anything is written, and its priced terms. Records nothing; reads the
    chain for a direct payment's fee permit given without its nonce, so call it with no database transaction open."""
    _check_parties(buyer=buyer, service=service)
    restated.check(service)
    _check_quantity(service=service, quantity=quantity)
    token = _accepted_token(service=service, token=token)
    now = timezone.now()
    expires_at = _agreement_expiry(expires_at=expires_at, now=now)
    deposit = _deposit(service=service, quantity=quantity)
    schedule = fee_schedule_current()
    fee = _fee_within_bounds(amount=deposit, schedule=schedule)
    window = challenge_window_seconds or settings.CHALLENGE_WINDOW_DEFAULT
    terms = {
        "service_id": str(service.pk), "settlement_model": settlement_model, "pricing_type": service.pricing_type,
        "unit_name": service.unit_name, "price_per_unit": service.unit_price, "quantity": quantity,
        "deposit_amount": deposit, "infra_fee": fee, "token": token, "token_address": chainconfig.usdc_address(),
        "chain_id": settings.CHAIN_ID, "challenge_window_seconds": window,
        "expires_at": int(expires_at.timestamp()),
        "buyer_wallet_address": buyer_wallet_address or buyer.wallet_address,
        "seller_wallet_address": service.seller.wallet_address, "fee_recipient": fee_recipient(schedule),
    }
    proposal = Proposal(
        buyer=buyer, service=service, proposed_at=now, settlement_model=settlement_model, quantity=quantity,
        deposit=deposit, fee=fee, token=token, challenge_window_seconds=window, expires_at=expires_at,
        proposal_expires_at=min(now + settings.PROPOSAL_TTL, expires_at), terms=terms, note=note,
    )
    if settlement_model == SettlementModel.DIRECT_PAYMENT:
        return _with_direct_payment(proposal, payment_header=payment_header, fee_permit=fee_permit or {})
    return proposal


def _check_parties(*, buyer: Agent, service: Service) -> None:
    """A buyer buys another agent's service, while it is registered and its seller active."""
    _buyer_role_require(buyer)
    if service.seller_id == buyer.pk:
        raise InvalidInput("An agent cannot buy its own service.", code="own_service")
    if service.state != ServiceState.REGISTERED:
        raise InvalidInput("This service is deregistered.", code="service_deregistered")
    if not service.seller.sells:  # it or its owner deactivated: as search and the skill route hide it
        raise InvalidInput("This service's seller is deactivated.", code="seller_deactivated")


def _buyer_role_require(buyer: Agent) -> None:
    """Its owner made it a buyer: an agent created to sell only buys nothing, by proposal or by skill invocation."""
    if not buyer.is_buyer:
        raise Forbidden("Only agents with the buyer role can buy.", code="not_a_buyer")


def _check_quantity(*, service: Service, quantity: int) -> None:
    if quantity < service.min_quantity or (service.max_quantity is not None and quantity > service.max_quantity):
        raise InvalidInput("The quantity is outside what the service sells per agreement.",
                           code="quantity_out_of_range",
                           details={"min_quantity": service.min_quantity, "max_quantity": service.max_quantity})


def _accepted_token(*, service: Service, token: str | None) -> str:
    """The service's token: the only one it is priced in."""
    token = token or service.token
    if token != service.token:
        raise InvalidInput(f"This service is priced in {service.token}.", code="token_not_accepted",
                           details={"accepted": [service.token]})
    return token


def _agreement_expiry(*, expires_at: datetime | None, now: datetime) -> datetime:
    """The default duration when none is asked; otherwise in the future and within the platform's maximum."""
    expires_at = expires_at or now + settings.AGREEMENT_DEFAULT_DURATION
    if expires_at <= now:
        raise InvalidInput("expires_at is in the past.", code="expiry_in_past")
    if expires_at > now + settings.AGREEMENT_MAX_DURATION:
        raise InvalidInput("expires_at is too far in the future.", code="expiry_too_far",
                           details={"max_days": settings.AGREEMENT_MAX_DURATION.days})
    return expires_at


def _deposit(*, service: Service, quantity: int) -> int:
    """quantity × unit price: positive and within the platform's limit per agreement."""
    deposit = quantity * service.unit_price
    if deposit <= 0:
        raise InvalidInput("The agreement's amount must be positive.", code="amount_zero")
    money.amount_within_limit(deposit)
    return deposit


def _with_direct_payment(proposal: Proposal, *, payment_header: str, fee_permit: dict) -> Proposal:
    """The buyer's payment and fee permit checked; the seller must accept while both can still be executed."""
    payer = proposal.terms["buyer_wallet_address"]
    fee_permit = _fee_permit_completed(fee_permit, fee=proposal.fee, payer=payer)
    chain_now = _chain_next_block_now()
    direct = _direct_payment_check(payment_header=payment_header, fee_permit=fee_permit, amount=proposal.deposit,
                                   fee=proposal.fee, payer=payer, seller=proposal.terms["seller_wallet_address"],
                                   chain_now=chain_now)
    _direct_authorization_unspent_require(direct)
    return replace(proposal, direct=direct, fee_permit=fee_permit, proposal_expires_at=min(
        proposal.proposal_expires_at, _direct_acceptance_deadline(
            valid_before=direct.valid_before, fee_permit=fee_permit, chain_now=chain_now, now=proposal.proposed_at)))


def _direct_authorization_unspent_require(authorization: x402_protocol.Authorization) -> None:
    """An authorization the chain shows used or cancelled already is no payment of this purchase: the accept would
    take an earlier transfer under it (the buyer paying the seller's wallet elsewhere: its own x402 endpoint, another
    marketplace) for this purchase's payment, the seller delivering twice for one payment."""
    if not _authorization_spent_reader:
        raise DependencyUnavailable("Direct payments are not available.", code="direct_payments_unavailable")
    if _authorization_spent_reader[0](authorization):
        raise Conflict("payment_header: the chain shows this authorization used or cancelled already; sign a new "
                       "one.", code="authorization_already_used", details={"field": "payment_header"})


def _direct_acceptance_deadline(*, valid_before: int, fee_permit: dict, chain_now: int, now: datetime) -> datetime:
    """The last moment a direct purchase may be accepted, on our clock: its payment and fee permit must still run
    for half the minimum validity after. Their times are the chain's clock's (`chain_now`, read at `now`): the
    seconds left by it, counted from our `now`, so a clock of ours drifted from the chain's neither closes the
    proposal before the signatures run out nor keeps it open after."""
    valid_until = min(valid_before, fee_permit["deadline"]) - settings.DIRECT_PAYMENT_MIN_VALIDITY // 2
    return now + timedelta(seconds=valid_until - chain_now)


def agreement_propose(*, proposal: Proposal, approval_can_wait: bool = True) -> UsageAgreement:
    """Record a prepared proposal (`agreement_proposal_prepare`) as the buyer's owner policy decides: `proposed`, or
    `pending_approval` with an approval request. All or nothing; asks no other service, so it may run inside the
    caller's transaction. `approval_can_wait=False` (a purchase paid at once): a proposal the owner must approve is
    refused instead, 403 `approval_required` with the rule, and nothing recorded."""
    with transaction.atomic():
        decision = _owner_policy_decision(proposal)
        needs_approval = decision.needs_approval
        if needs_approval and not approval_can_wait:
            raise Forbidden("The owner's policy asks for an approval of this purchase, which is paid at once.",
                            code="approval_required", details={"rule": decision.rule, **decision.details})
        agreement = _agreement_record(proposal, status=S.PENDING_APPROVAL if needs_approval else S.PROPOSED)
        if needs_approval:
            policy_services.approval_request_create(
                agent=proposal.buyer, subject_type=APPROVAL_SUBJECT, subject_id=agreement.pk,
                amount=proposal.deposit + proposal.fee, rule=decision.rule,
                possible_until=_approval_possible_until(proposal),
                summary={"service": proposal.service.name, "seller": proposal.service.seller.handle,
                         "deposit_atomic": proposal.deposit, "infra_fee_atomic": proposal.fee,
                         "token": proposal.token, "service_version": _service_version(proposal.service)},
            )
        # Both parties read the trail: the seller learns the purchase waits for the buyer's owner, not the rule
        # (its threshold, or who edited the policy) that the owner reads on the approval request.
        _record_event(agreement, actor=Actor.agent(proposal.buyer, "buyer"), from_status="",
                      reason=_AWAITING_APPROVAL_REASON if needs_approval else "",
                      data={"policy": decision.outcome.value})
    return agreement


_AWAITING_APPROVAL_REASON = "awaiting the buyer's owner's approval"


def _service_version(service: Service) -> str:
    """What an owner's approval consents to of the service beyond the agreement's own terms (its name, upstream and
    protocol, which its seller may change while the purchase waits), as a keyed digest: the request's summary is
    shown to the buyer's owner, who is not shown the seller's upstream (nor given a digest to test guesses of it)."""
    return salted_hmac("agreements.approval.service_version",
                       "\n".join((service.name, service.upstream_base_url, service.upstream_protocol)),
                       algorithm="sha256").hexdigest()


def _approval_possible_until(proposal: Proposal) -> datetime:
    """Until when an approval can still make the purchase: its term, and a direct purchase's signatures (its
    proposal's deadline, which `_on_approval_decided` keeps)."""
    if proposal.settlement_model == SettlementModel.DIRECT_PAYMENT:
        return min(proposal.expires_at, proposal.proposal_expires_at)
    return proposal.expires_at


def _owner_policy_decision(proposal: Proposal) -> policy_selectors.Decision:
    """The owner's policy on this purchase (fee included); see `_buyer_policy_decision`."""
    return _buyer_policy_decision(buyer=proposal.buyer, service=proposal.service, token=proposal.token,
                                  amount=proposal.deposit + proposal.fee, at=proposal.proposed_at, new_agreement=True)


def _buyer_policy_decision(*, buyer: Agent, service: Service, token: str, amount: int, at: datetime,
                           agreement_id: uuid.UUID | None = None,
                           new_agreement: bool = False) -> policy_selectors.Decision:
    """The buyer's owner policy on a purchase of `amount` from `service`, given what the buyer committed in the
    last day and month (agreements and skill invocations, but the agreement `agreement_id` being paid); a denial is
    403 with the rule (`buyer_deactivated` when the buyer or its owner was deactivated). Call inside the transaction
    that records the purchase (or moves its money).
    `new_agreement`: the purchase is a new agreement with the service's seller, refused 409 beyond
    `UNFUNDED_AGREEMENTS_PER_SELLER` (a proposal costs the buyer nothing until it is funded, and each is in the
    seller's inbox, listing and webhooks), counting those cancelled or expired unfunded within
    `UNFUNDED_AGREEMENTS_WINDOW_SECONDS` of their proposal (else proposing and cancelling in a loop went round it)."""
    # Serialises this buyer's proposals, payments, invocations and policy edits, so two cannot both slip under a cap
    # (nor under the bound on unfunded agreements).
    [(is_active, owner_is_active)] = Agent.objects.select_for_update().filter(pk=buyer.pk).values_list(
        "is_active", "owner_is_active")
    if not (is_active and owner_is_active):
        # Its owner stopped it (or was stopped): nothing it proposed before moves money, nor is approved.
        raise Forbidden("The buyer agent is deactivated.", code="policy_denied", details={"rule": "buyer_deactivated"})
    window = settings.UNFUNDED_AGREEMENTS_WINDOW_SECONDS
    spends = _committed_spends(buyer, at=at, day_since=at - timedelta(days=1), month_since=at - timedelta(days=30),
                               excluding=agreement_id, unfunded_with=service.seller if new_agreement else None,
                               unfunded_since=at - timedelta(seconds=window))
    limit = settings.UNFUNDED_AGREEMENTS_PER_SELLER
    if spends.unfunded_with_seller is not None and spends.unfunded_with_seller >= limit:
        raise Conflict(f"You already have {spends.unfunded_with_seller} agreements with this seller that it has not "
                       f"answered or you have not funded (those you cancelled or let expire count for {window} "
                       "seconds after their proposal); wait for an answer, or for the older ones to age out.",
                       code="unfunded_agreements_limit_reached",
                       details={"max_unfunded_agreements": limit, "window_seconds": window})
    decision = policy_selectors.purchase_decision(
        agent=buyer, service=service,
        tags=frozenset(tag.name for tag in service.tags.all()), token=token,  # prefetched by the selectors
        amount=amount, spent_last_day=spends.last_day, spent_last_month=spends.last_month,
    )
    if decision.denied:
        raise Forbidden(decision.message, code="policy_denied", details={"rule": decision.rule, **decision.details})
    return decision


def _platform_limit_check(agreement: UsageAgreement) -> None:
    """400 `amount_too_large` (`money.amount_within_limit`) for an agreement whose amount is above the platform's
    ceiling in force now: an operator who lowered AGREEMENT_MAX_AMOUNT since the proposal expects it to bind at every
    step that leads to its money moving (the owner's approval, the seller's accept) as when it moves (an accept, an
    activation, an operator's retry), not let the parties go one step further to learn it at the last. Nothing is
    written: the agreement stays where it was, and proceeds once the ceiling allows it again."""
    money.amount_within_limit(agreement.deposit_amount)


def _payment_policy_refusal(agreement: UsageAgreement) -> Forbidden | None:
    """Why the buyer's owner policy, as it is now, refuses the platform moving this agreement's money now (None: it
    allows it): its deny rules and caps as at proposal, counting every agreement at the moment its money moved (until
    then at its proposal) but this one. An approval given at proposal stands; one the policy asks for only now is
    refused, as a skill invocation's: no payment waits for the owner. Call inside the transaction that moves the
    money, with the agreement locked: the buyer is locked too, until it commits.
    Raises 400 `amount_too_large` for an amount above the platform's ceiling in force now (`_platform_limit_check`),
    as it does a skill's payment, not only at the proposal."""
    _platform_limit_check(agreement)
    at = timezone.now()
    try:
        decision = _buyer_policy_decision(buyer=agreement.buyer, service=agreement.service, token=agreement.token,
                                          amount=agreement.deposit_amount + agreement.infra_fee, at=at,
                                          agreement_id=agreement.pk)
    except Forbidden as denied:
        return denied
    if decision.needs_approval and not policy_selectors.approval_given(subject_type=APPROVAL_SUBJECT,
                                                                       subject_id=agreement.pk):
        return Forbidden("The owner's policy now asks for an approval of this payment, which it was not given.",
                         code="approval_required", details={"rule": decision.rule, **decision.details})
    return None


def invocation_create(*, skill: Skill, buyer: Agent | None, input: dict,
                      authorization: x402_protocol.Authorization, client: str = "") -> SkillInvocation:
    """Record a skill invocation and its authorization (see `agreements.invocations.invocation_create`) once the
    calling agent is a buyer (else 403 `not_a_buyer`, as its proposals) and its owner policy allows its price, as a
    direct purchase's: a denial is 403 `policy_denied`, and a price the owner must approve is 403 `approval_required`
    (a synchronous paid call cannot wait for the owner), each with the rule; nothing is recorded. An anonymous caller
    (no API key) has no owner, hence no policy: but one paying from the wallet of an agent its owner bound (a policy,
    a deactivation: `wallet_bound_by_an_owner`) is that agent escaping its owner, 403 `agent_key_required`. Call
    inside the transaction that queues the payment: the buyer stays locked until it commits."""
    with transaction.atomic():
        if buyer is None and policy_selectors.wallet_bound_by_an_owner(wallet_address=authorization.payer):
            raise Forbidden("This wallet is a buyer agent's whose owner set it a policy or deactivated it: pay with "
                            "that agent's API key, under its owner's policy.", code="agent_key_required",
                            details={"wallet": authorization.payer})
        if buyer is not None:
            _buyer_role_require(buyer)
            decision = _buyer_policy_decision(buyer=buyer, service=skill.service, token=skill.service.token,
                                              amount=invocations.invocation_price(skill), at=timezone.now())
            if decision.needs_approval:
                raise Forbidden("The owner's policy asks for an approval of this payment, which a skill invocation "
                                "cannot wait for.", code="approval_required",
                                details={"rule": decision.rule, **decision.details})
        return invocations.invocation_create(skill=skill, buyer=buyer, input=input, authorization=authorization,
                                             client=client)


def _agreement_record(proposal: Proposal, *, status: str) -> UsageAgreement:
    terms = proposal.terms
    return UsageAgreement.objects.create(
        buyer=proposal.buyer, seller=proposal.service.seller, service=proposal.service, status=status,
        settlement_model=proposal.settlement_model, pricing_type=terms["pricing_type"],
        unit_name=terms["unit_name"], price_per_unit=terms["price_per_unit"], quantity=proposal.quantity,
        deposit_amount=proposal.deposit, infra_fee=proposal.fee, token=proposal.token,
        token_address=terms["token_address"], chain_id=terms["chain_id"],
        challenge_window_seconds=proposal.challenge_window_seconds, expires_at=proposal.expires_at,
        proposal_expires_at=proposal.proposal_expires_at, buyer_wallet_address=terms["buyer_wallet_address"],
        seller_wallet_address=terms["seller_wallet_address"], fee_recipient=terms["fee_recipient"],
        terms_hash=terms_hash(terms), note=proposal.note,
        payment_authorization=_direct_authorization_record(proposal.direct) if proposal.direct else None,
        fee_permit=proposal.fee_permit,
    )


# --- direct payments (settlement_model direct_payment) ------------------------------------------------------
#
# The buyer signs, at proposal, an x402 "exact" payment (EIP-3009 transferWithAuthorization of the price to the
# seller) and an EIP-2612 permit of the fee to the platform relayer. Both are checked here, off-chain, with
# precise codes. On accept the escrow app (registered below as the executor) first collects the fee (permit, then
# transferFrom to the fee recipient), then executes the payment: accepted -> paying -> paid | payment_failed.
#
# A payment that fails leaves the buyer's fee with the buyer: the executor simulates the payment before taking
# the fee, so a payment that cannot run fails with the fee never taken; if the payment still fails after the fee
# was taken (the buyer spent or cancelled the authorization in between), the platform treasury refunds the fee
# (`buyer_refund_atomic`).

@dataclass(frozen=True)
class DirectPaymentPreflight:
    """What the chain says of a direct payment about to be accepted: why it cannot run (None: it can), the buyer's
    balance, against which its queueing counts the wallet's other payments under way, and the transaction that used
    the payment's authorization already (anyone may send it, the buyer too: the price is with the seller), if any,
    named also when the rest cannot run (the fee's permit stale, the wallet short of the fee)."""

    problem: str | None
    buyer_balance: int = 0
    paid_by: str | None = None
    code: str = ""  # the problem's machine-readable code, told the parties as the failure event's `data.code`

    def refused(self, code: str, message: str) -> "DirectPaymentPreflight":
        """This preflight, saying it cannot run: `code` and its `message`."""
        return replace(self, problem=f"{code}: {message}", code=code)


DirectPaymentCheck = Callable[[UsageAgreement], DirectPaymentPreflight]
DirectPaymentQueue = Callable[[UsageAgreement, DirectPaymentPreflight], None]
_direct_payment_executor: list[tuple[DirectPaymentCheck, DirectPaymentQueue]] = []
PermitNonceReader = Callable[[str], int]
_permit_nonce_reader: list[PermitNonceReader] = []


class PaymentAuthorizationUseReader(Protocol):
    def __call__(self, agreement: UsageAgreement, *, confirmed: bool = False) -> str | None: ...


_payment_authorization_use_reader: list[PaymentAuthorizationUseReader] = []
AuthorizationSpentReader = Callable[[x402_protocol.Authorization], bool]
_authorization_spent_reader: list[AuthorizationSpentReader] = []
ChainClockReader = Callable[[], int]
_chain_clock_reader: list[ChainClockReader] = []
_next_block_clock_reader: list[ChainClockReader] = []


def permit_nonce_reader_register(*, reader: PermitNonceReader) -> None:
    """`reader(owner)` is the token's EIP-2612 `nonces(owner)`: the escrow app reads it from the chain."""
    _permit_nonce_reader[:] = [reader]


def payment_authorization_use_reader_register(*, reader: PaymentAuthorizationUseReader) -> None:
    """`reader(agreement, confirmed=...)` is the hash of the transfer that used the direct purchase's payment
    authorization as it says (its price paid to the seller), else None; `confirmed`: only a use mined at the
    confirmation depth. The escrow app reads it from the chain."""
    _payment_authorization_use_reader[:] = [reader]


def authorization_spent_reader_register(*, reader: AuthorizationSpentReader) -> None:
    """`reader(authorization)` is whether the token counts an EIP-3009 authorization used or cancelled (its
    `authorizationState`). The escrow app reads it from the chain."""
    _authorization_spent_reader[:] = [reader]


def chain_clock_reader_register(*, reader: ChainClockReader, next_block_reader: ChainClockReader) -> None:
    """`reader()` is the chain's clock (the latest block's timestamp, unix seconds); `next_block_reader()` the
    `block.timestamp` a transaction sent now would get, as a payment authorization's window is judged by it (503
    when the node does not answer, or is behind the chain: `chain_clock.signature_window_clock`). The escrow app
    reads them."""
    _chain_clock_reader[:] = [reader]
    _next_block_clock_reader[:] = [next_block_reader]


def _chain_next_block_now() -> int:
    """The time a direct purchase's signatures meet when relayed now: the token checks their windows (validAfter,
    validBefore, the fee permit's deadline) by the chain's clock, which the buyer signs by, not by ours. Read on
    every direct proposal and accept, which nothing simulates on the chain before it is recorded (where a skill's
    payment is judged by our clock first, `x402_protocol.check`, its simulation catching what ours let through)."""
    if not _next_block_clock_reader:
        raise DependencyUnavailable("Direct payments are not available.", code="direct_payments_unavailable")
    return _next_block_clock_reader[0]()


def _direct_payment_made_by(agreement: UsageAgreement, *, confirmed: bool = False) -> str | None:
    """The transfer that paid a proposed direct purchase's price to its seller already (the buyer, or anyone holding
    its authorization, sent it), else None. Asked of the chain: never under the row lock."""
    if agreement.settlement_model != SettlementModel.DIRECT_PAYMENT or agreement.status != S.PROPOSED:
        return None
    return _payment_authorization_used_by(agreement, confirmed=confirmed)


def _payment_authorization_used_by(agreement: UsageAgreement, *, confirmed: bool = False) -> str | None:
    """The transfer that used the direct purchase's payment authorization, whatever the purchase's status.
    `confirmed`: only one at the confirmation depth, for what a closed purchase records for good (a reorg takes back a
    newer one, and nothing would undo the record)."""
    if not _payment_authorization_use_reader:
        raise DependencyUnavailable("Direct payments are not available.", code="direct_payments_unavailable")
    return _payment_authorization_use_reader[0](agreement, confirmed=confirmed)


def _fee_permit_completed(fee_permit: dict, *, fee: int, payer: str) -> dict:
    """A fee permit given as signature and deadline only (the Pægents SDK's form) signs the fee at the token's
    current nonce: both filled in here, so the signature is checked against exactly that."""
    if "value" in fee_permit:
        return fee_permit
    if not _permit_nonce_reader:
        raise DependencyUnavailable("Direct payments are not available.", code="direct_payments_unavailable")
    return {**fee_permit, "value": fee, "nonce": _permit_nonce_reader[0](payer)}


def direct_payment_executor_register(*, check: DirectPaymentCheck, queue: DirectPaymentQueue) -> None:
    """`check(agreement)` asks the chain whether the payment can run (`DirectPaymentPreflight`); it runs before the
    accept locks the agreement, never under the lock. `queue(agreement, preflight)` runs inside the accept transaction
    and asks the chain nothing: it queues the on-chain steps, or raises (the accept rolled back: the purchase stays
    proposed) when the buyer's balance does not cover the payment besides the wallet's payments under way."""
    _direct_payment_executor[:] = [(check, queue)]


def _direct_payment_check(*, payment_header: str, fee_permit: dict, amount: int, fee: int, payer: str,
                          seller: str, chain_now: int) -> x402_protocol.Authorization:
    """The buyer's payment and fee permit checked without the chain, but for its clock (`chain_now`,
    `_chain_next_block_now`) their windows are judged by."""
    requirements = x402_protocol.payment_requirements(amount=amount, pay_to=seller,
                                                     max_timeout_seconds=settings.DIRECT_PAYMENT_MIN_VALIDITY)
    try:
        authorization = x402_protocol.check(x402_protocol.decode(payment_header), requirements,
                                           min_validity_seconds=settings.DIRECT_PAYMENT_MIN_VALIDITY,
                                           max_validity_seconds=settings.DIRECT_PAYMENT_MAX_VALIDITY, now=chain_now)
    except x402_protocol.InvalidPayment as invalid:
        raise InvalidInput(f"payment_header: {invalid.message}", code=invalid.code, details={
            "field": "payment_header", "x402_reason": invalid.reason, **invalid.details}) from invalid
    if authorization.payer.lower() != payer.lower():
        raise InvalidInput(f"payment_header: the payment must come from the buyer's wallet {payer}.",
                           code="wrong_payer", details={"field": "payment_header"})
    if fee_permit["value"] < fee:
        raise InvalidInput(f"fee_permit.value must be at least the fee, {fee}.", code="permit_value_too_low",
                           details={"field": "fee_permit", "required": fee})
    if fee_permit["value"] > fee:
        # The permit sets the relayer's allowance: whatever the fee's collection leaves of it, the platform could take.
        raise InvalidInput(f"fee_permit.value must be the fee, {fee}: no more.", code="permit_value_too_high",
                           details={"field": "fee_permit", "required": fee})
    if fee_permit["deadline"] < chain_now + settings.DIRECT_PAYMENT_MIN_VALIDITY:
        raise InvalidInput(f"fee_permit.deadline must be at least {settings.DIRECT_PAYMENT_MIN_VALIDITY} s away.",
                           code="signature_expired", details={"field": "fee_permit"})
    token_name, token_version = x402_protocol.token_domain()
    typed = typed_data.erc2612_permit(
        chain_id=settings.CHAIN_ID, token_address=chainconfig.usdc_address(), owner=payer,
        spender=chainconfig.relayer_address(), value=fee_permit["value"], nonce=fee_permit["nonce"],
        deadline=fee_permit["deadline"], token_name=token_name, token_version=token_version)
    signer_require(typed=typed, signature=fee_permit["signature"], expected=payer, field="fee_permit.signature",
                   mismatch_code="invalid_signature")
    return authorization


def _direct_authorization_record(authorization: x402_protocol.Authorization):
    try:
        return x402_protocol.authorization_record(authorization)
    except x402_protocol.InvalidPayment as invalid:
        raise Conflict(invalid.message, code=invalid.code, details={"field": "payment_header"}) from invalid


# What a fee permit must have left when the fee's collection is queued, for the relayer to get it mined.
FEE_PERMIT_MIN_LEFT_SECONDS = 120


def _direct_payment_precheck(agreement: UsageAgreement) -> DirectPaymentPreflight | None:
    """Whether a direct payment about to be accepted can run (None: no direct payment is due), asked of the chain
    before the accept takes its row lock. What it checks was fixed at proposal (the signed authorization and fee permit); a chain
    that changes in between is caught by the relayer's simulation and the fee permit's outcome."""
    if agreement.settlement_model != SettlementModel.DIRECT_PAYMENT or agreement.status != S.PROPOSED:
        return None
    return _direct_payment_preflight(agreement)


def _direct_payment_preflight(agreement: UsageAgreement, *, confirmed_use: str | None = None
                              ) -> DirectPaymentPreflight:
    """`_direct_payment_precheck`'s answer, whatever the purchase's status (one closed expired as it was being paid).
    `confirmed_use`: the use at the confirmation depth its caller read already (not read again)."""
    if not _direct_payment_executor:
        raise DependencyUnavailable("Direct payments are not available.", code="direct_payments_unavailable")
    check, _queue = _direct_payment_executor[0]
    preflight = check(agreement)
    if preflight.paid_by and preflight.paid_by != confirmed_use and \
            _payment_authorization_used_by(agreement, confirmed=True) != preflight.paid_by:
        # Not acted on until it is at the confirmation depth: what an accept of a purchase paid so records stays for
        # good (a failure naming the transfer, a closed proposal reopened as paid by it), and a reorg may yet take it.
        raise Conflict("The buyer's payment of this purchase is not final on the chain yet: accept it again shortly.",
                       code="payment_not_final", details={"used_by": preflight.paid_by})
    permit_deadline = agreement.fee_permit["deadline"]
    if preflight.problem is None and permit_deadline < _chain_next_block_now() + FEE_PERMIT_MIN_LEFT_SECONDS:
        # Only a purchase paid already is accepted past its acceptance deadline: its fee permit may be running out.
        return preflight.refused("fee_permit_expired", f"the fee permit's deadline {permit_deadline} is too near")
    return preflight


def _direct_payment_start(agreement_id, preflight: DirectPaymentPreflight) -> UsageAgreement:
    problem = preflight.problem
    # One paid already counts from now too, failed or not: the price left the buyer's wallet.
    agreement = _transition(agreement_id, to=S.PAYING, actor=SYSTEM, reason="collecting the fee, then paying",
                            changes=None if problem and not preflight.paid_by else {"funds_moved_at": timezone.now()})
    if problem and preflight.paid_by:
        # No status says "paid, fee not collected": failed, but saying so, for the parties and an operator.
        # Its payment_tx_hash names the transfer: the price is out of the buyer's wallet, counted against its caps.
        return _transition(agreement_id, to=S.PAYMENT_FAILED, actor=SYSTEM,
                           data={"used_by": preflight.paid_by, "code": preflight.code},
                           reason=f"the price reached the seller before the accept (tx {preflight.paid_by}), but the "
                                  f"fee cannot be collected, nothing more was charged: {problem}",
                           changes={"payment_tx_hash": preflight.paid_by})
    if problem:
        return _transition(agreement_id, to=S.PAYMENT_FAILED, actor=SYSTEM, data={"code": preflight.code},
                           reason=f"payment cannot run, nothing was charged: {problem}")
    _check, queue = _direct_payment_executor[0]
    queue(agreement, preflight)
    return agreement


def agreement_direct_fee_collected(*, agreement_id, tx_hash: str) -> None:
    UsageAgreement.objects.filter(pk=agreement_id).update(fee_tx_hash=tx_hash, updated_at=timezone.now())


def agreement_direct_paid(*, agreement_id, tx_hash: str) -> UsageAgreement:
    """paying (or payment_failed: see TRANSITIONS) -> paid by the transaction `tx_hash` (ours, or a copy of the
    authorization someone else got mined first). Applied again to a paid purchase, it names the transaction the chain
    has now, when that is another."""
    agreement = _lock(agreement_id)
    if agreement.status == S.PAID:
        if agreement.payment_tx_hash != tx_hash:
            replaced, agreement.payment_tx_hash = agreement.payment_tx_hash, tx_hash
            agreement.save(update_fields=["payment_tx_hash", "updated_at"])
            _record_event(agreement, actor=SYSTEM, from_status=S.PAID, reason="payment found under another transaction",
                          data={"tx_hash": tx_hash, "replaced_tx_hash": replaced})
        return agreement
    # A reversal recorded before (a reorg took the payment and it could not run then) no longer holds: the payment
    # ran. The agreement's events keep it.
    return _transition(agreement_id, to=S.PAID, actor=SYSTEM, reason="x402 payment executed on-chain",
                       data={"tx_hash": tx_hash}, changes={"payment_tx_hash": tx_hash,
                                                           "seller_payout": agreement.deposit_amount,
                                                           "used": agreement.deposit_amount,
                                                           **NO_PAYMENT_REVERSAL})


def agreement_direct_payment_failed(*, agreement_id, reason: str, code: str,
                                    paid_by: str | None = None) -> UsageAgreement:
    """paying -> payment_failed. A purchase counted paid before (a reorg took its payment off the chain since:
    `agreement_direct_payment_reopened`) whose payment could not run again is recorded for an operator
    (`payment_reverted_at`): its seller was told it was paid. Reconcile fails on it until one acknowledges it.
    `paid_by`: a fee step failed, but the price reached the seller by that transfer (sent before the accept): named
    as the purchase's payment_tx_hash, its price counts against the buyer's caps, as at an accept that failed so.
    `code`: the failure's machine-readable code, told the parties as the event's `data.code` (webhooks, inbox)."""
    agreement = _lock(agreement_id)
    if paid_by and agreement.status == S.PAYING and not agreement.payment_tx_hash:
        return _transition(agreement_id, to=S.PAYMENT_FAILED, actor=SYSTEM, data={"used_by": paid_by, "code": code},
                           reason=f"the price reached the seller before the accept (tx {paid_by}), but the fee "
                                  f"could not be collected: {reason}",
                           changes={"payment_tx_hash": paid_by})
    if agreement.status != S.PAYING or not AgreementEvent.objects.filter(agreement_id=agreement_id,
                                                                         to_status=S.PAID).exists():
        return _transition(agreement_id, to=S.PAYMENT_FAILED, actor=SYSTEM, reason=reason, data={"code": code})
    logger.error("a reorg took the payment of a direct purchase counted paid, and it could not run again",
                 extra={"agreement_id": str(agreement_id), "reason": reason})
    return _transition(agreement_id, to=S.PAYMENT_FAILED, actor=SYSTEM, data={"code": code},
                       reason=f"a reorg took the payment after the purchase was counted paid, and it could not run "
                              f"again: {reason}",
                       changes={"payment_reverted_at": timezone.now(), "payment_reverted_reason": reason[:500]})


def agreement_direct_payment_reopened(*, agreement_id, what: str, tx_hash: str) -> UsageAgreement | None:
    """A reorg took the block a direct purchase's outcome rests on (`what`: its fee permit, its fee's collection, or
    its payment, ours or the copy of the authorization that paid); the relayer sends it again. Paid or
    payment_failed -> paying, outside the transition table as every reorg's move back is (`agreement_chain_rollback`),
    naming no payment and paying nothing until the outcomes are applied again."""
    return agreement_chain_rollback(
        agreement_id=agreement_id, produced_by_removed={S.PAID, S.PAYMENT_FAILED}, back_to=S.PAYING,
        reason=f"a reorg took {what} off the chain (tx {tx_hash or 'not sent'}): it is sent again",
        changes={"payment_tx_hash": "", "seller_payout": None, "used": 0, "settled_at": None})


def operator_owns_no_party_require(*, operator: AbstractBaseUser | None, agreement_ids=(), invocation_ids=()) -> None:
    """403 `operator_owns_a_party` when the operator acting (the admin's user, reconcile's `--operator`; None: the
    platform itself) owns the buyer or the seller of one of these agreements or skill invocations: deciding a dispute
    of theirs, writing off their money or sending it again is then another operator's decision."""
    if operator is None:
        return
    owned = Q(buyer__owner=operator) | Q(seller__owner=operator)
    if (UsageAgreement.objects.filter(owned, pk__in=agreement_ids).exists()
            or SkillInvocation.objects.filter(owned, pk__in=invocation_ids).exists()):
        raise Forbidden("You own the buyer or the seller of what this decides: another operator does it.",
                        code="operator_owns_a_party")


def reverted_payments_acknowledge(*, payments, operator: AbstractBaseUser, reason: str) -> int:
    """Operator action: reverted payments (`payments`: a queryset of agreements' direct purchases or of skill
    invocations) someone looked into (the loss accepted, the seller paid another way, or the money recovered from
    the buyer) are kept and stay visible, but no longer fail `reconcile` or the dashboard. Records who, when and why;
    returns how many were acknowledged now (others, or those acknowledged already, are left). `operator` (the
    admin's user, reconcile's `--operator`): 403 `operator_owns_a_party`, nothing acknowledged, when it owns the buyer or the seller of
    one of them: acknowledging writes off what the buyer never paid and the seller was counted, another operator's
    decision."""
    reason = reason.strip()
    if not reason:
        raise InvalidInput("Say why the reverted payment is acknowledged.", code="reason_required")
    reverted = selectors.payments_reverted(of=payments.model).filter(pk__in=payments.values("pk"))
    operator_owns_no_party_require(operator=operator, **{
        "agreement_ids" if payments.model is UsageAgreement else "invocation_ids": reverted.values("pk")})
    return reverted.update(
        payment_reversal_acknowledged_at=timezone.now(), payment_reversal_acknowledged_by=operator.get_username()[:150],
        payment_reversal_acknowledgement_reason=reason[:500])


def agreement_direct_fee_reopened(*, agreement_id) -> None:
    """A reorg took the fee's collection off the chain: not counted collected (nor against the buyer's caps) until
    it is concluded again."""
    UsageAgreement.objects.filter(pk=agreement_id).update(fee_tx_hash="", updated_at=timezone.now())


def agreement_direct_fee_refund_due(*, agreement_id) -> UsageAgreement | None:
    """The direct purchase, locked until the caller's transaction ends, when its fee is to go back to the buyer as far
    as the agreement says: its payment failed for good (payment_failed), not after it was counted paid (a reorg took
    the payment: its seller may have delivered, and an operator decides), and no refund is counted yet. The escrow app
    checks the chain's side (the fee collected, no refund under way)."""
    agreement = _lock(agreement_id)
    if (agreement.status == S.PAYMENT_FAILED and agreement.payment_reverted_at is None
            and agreement.buyer_refund is None):
        return agreement
    return None


def agreement_direct_fee_refunded(*, agreement_id, amount: int) -> None:
    """The fee came back to the buyer (the refund's transaction is on the agreement's chain transactions). Also on a
    purchase paid since: a refund cancelled when a reorg reopened its failed payment that ran all the same (the
    platform bore the fee)."""
    UsageAgreement.objects.filter(pk=agreement_id).update(buyer_refund=amount, updated_at=timezone.now())


def agreement_direct_fee_refund_reopened(*, agreement_id) -> None:
    """A reorg took the fee's refund off the chain: not counted until it is concluded again."""
    UsageAgreement.objects.filter(pk=agreement_id).update(buyer_refund=None, updated_at=timezone.now())


# --- a direct purchase's payment authorization once the purchase is off ---------------------------------------
#
# The buyer's signed transferWithAuthorization stays valid on-chain until its validBefore (up to a day) whatever
# becomes of the purchase: anyone holding it (the platform's records, a log) could move the buyer's money to the
# seller with no purchase. Only the buyer's wallet can revoke it (EIP-3009 cancelAuthorization); the platform relays
# the buyer's signed cancellation, the buyer holding no gas.

def _payment_authorization_off(agreement: UsageAgreement) -> bool:
    """Whether the purchase will no longer use its payment authorization: rejected, cancelled, expired, or its payment
    failed with nothing reversed (one a reorg took after it was counted paid is an operator's to decide)."""
    if agreement.status == S.PAYMENT_FAILED:
        return agreement.payment_reverted_at is None
    return agreement.status in (S.REJECTED, S.CANCELLED, S.EXPIRED)


def agreement_payment_authorization_cancel_typed_data(*, agreement: UsageAgreement, buyer: Agent) -> dict:
    """What the buyer signs to revoke its direct purchase's payment authorization (EIP-3009 CancelAuthorization, in
    the token's domain): only the buyer, only once the purchase is off (409 `purchase_still_open` before)."""
    _require_party(agreement, buyer, "buyer")
    if agreement.settlement_model != SettlementModel.DIRECT_PAYMENT:
        raise Conflict("Only a direct purchase has a payment authorization.", code="not_a_direct_purchase")
    if not _payment_authorization_off(agreement):
        raise Conflict(f"The purchase is {agreement.status}: its payment authorization may still be used.",
                       code="purchase_still_open", details={"status": agreement.status})
    record = agreement.payment_authorization
    token_name, token_version = x402_protocol.token_domain()
    return typed_data.cancel_authorization(
        chain_id=settings.CHAIN_ID, token_address=record.token_address, authorizer=record.payer, nonce=record.nonce,
        token_name=token_name, token_version=token_version)


def agreement_payment_authorization_cancel_check(*, agreement: UsageAgreement, buyer: Agent,
                                                 signature: str) -> x402_protocol.Authorization:
    """The buyer's signed CancelAuthorization (`agreement_payment_authorization_cancel_typed_data`) checked: the
    buyer's, of a purchase that is off, signed by the authorization's payer. Returns the authorization."""
    typed = agreement_payment_authorization_cancel_typed_data(agreement=agreement, buyer=buyer)
    authorization = selectors.payment_authorization_of(agreement=agreement)
    signer_require(typed=typed, signature=signature, expected=authorization.payer, field="signature")
    return authorization


def agreement_payment_authorization_cancel_begin(*, agreement_id) -> UsageAgreement:
    """Lock the purchase and check again that it is off (an operator's retry of a failed payment, or a reorg, may have
    moved it back to paying since the check). Call inside the transaction that queues the cancellation."""
    agreement = _lock(agreement_id)
    if not _payment_authorization_off(agreement):
        raise Conflict(f"The purchase is {agreement.status}: its payment authorization may still be used.",
                       code="purchase_still_open", details={"status": agreement.status})
    return agreement


def agreement_payment_authorization_cancelled(*, agreement_id, tx_hash: str) -> None:
    """The buyer's cancellation ran on-chain: the authorization can no longer move money."""
    agreement = _lock(agreement_id)
    agreement.payment_authorization_cancel_tx_hash = tx_hash
    # Dead on-chain: the watch of closed direct proposals has nothing left to find.
    agreement.payment_authorization_watch_ended_at = timezone.now()
    agreement.save(update_fields=["payment_authorization_cancel_tx_hash", "payment_authorization_watch_ended_at",
                                  "updated_at"])
    _record_event(agreement, actor=SYSTEM, from_status=agreement.status, data={"tx_hash": tx_hash},
                  reason="the buyer's payment authorization was cancelled on-chain")


def agreement_payment_authorization_found_closed(*, agreement_id, closed_by: str) -> None:
    """The chain shows the purchase's payment authorization closed at its confirmation depth by `closed_by`: the
    buyer's own cancelAuthorization, outside the platform, or another transfer it signed under the same nonce (the
    escrow app reads that transaction, not just a spent nonce with no use found, which a node behind on its logs
    answers for a use). It can no longer move money, so a failed payment's price no longer counts against the buyer's
    caps (`_committed_spends`), and the watch of closed direct proposals has nothing left to find."""
    with transaction.atomic():
        agreement = _lock(agreement_id)
        if agreement.payment_tx_hash or agreement.payment_authorization_watch_ended_at is not None:
            return
        agreement.payment_authorization_watch_ended_at = timezone.now()
        agreement.save(update_fields=["payment_authorization_watch_ended_at", "updated_at"])
        _record_event(agreement, actor=SYSTEM, from_status=agreement.status, data={"closed_by": closed_by},
                      reason=f"the buyer's payment authorization was found closed on-chain (tx {closed_by}): "
                             "cancelled, or its nonce spent on another transfer")


def agreement_payment_authorization_cancel_failed(*, agreement_id, reason: str, used_by: str | None) -> None:
    """The cancellation reverted: the authorization was cancelled already, or used. Used by `used_by` after the
    purchase was off, the buyer's money went to the seller with no purchase: logged as an error and recorded on the
    agreement's events for an operator; a closed proposal (or one failed before its payment was sent) naming no
    transfer yet names it (its payment_tx_hash) and its price counts against the buyer's caps, as the watch of closed
    direct proposals would have it."""
    agreement = _lock(agreement_id)
    if used_by:
        logger.error("a closed direct purchase's payment authorization was used", extra={
            "agreement_id": str(agreement_id), "tx_hash": used_by})
        reason = f"the payment authorization was used by {used_by} after the purchase was {agreement.status}"
        if authorization_watched(agreement) and not agreement.payment_tx_hash:
            _closed_direct_proposal_paid_record(agreement, used_by=used_by, reason=reason)
            return
    else:
        reason = f"the payment authorization's cancellation reverted: {reason}"
    _record_event(agreement, actor=SYSTEM, from_status=agreement.status, data={"used_by": used_by},
                  reason=reason[:500])


def agreement_payment_authorization_use_reopened(*, agreement_id, used_by: str) -> None:
    """A reorg took the use of a closed direct proposal's authorization that outran its cancellation
    (`agreement_payment_authorization_cancel_failed`): the price is back in the buyer's wallet on the new branch. The
    purchase no longer names that transfer nor counts it, told to the parties as a reorg's undo, and is watched again
    (`closed_direct_proposals_watch`): the cancellation is sent again, or the authorization used again."""
    agreement = _lock(agreement_id)
    if not authorization_watched(agreement) or agreement.payment_tx_hash != used_by:
        return
    agreement.payment_tx_hash = ""
    agreement.payment_authorization_watch_ended_at = None
    agreement.save(update_fields=["payment_tx_hash", "payment_authorization_watch_ended_at", "updated_at"])
    _record_event(agreement, actor=SYSTEM, from_status=agreement.status, data={"reorg": True, "used_by": used_by},
                  reason=f"a reorg took the transfer that used the payment authorization (tx {used_by}): its price "
                         "is no longer counted")


def agreement_payment_authorization_cancel_reopened(*, agreement_id) -> None:
    """A reorg took the cancellation off the chain: not counted until it is concluded again, and the authorization
    watched again until then (the watch ends anyway once its validBefore passed)."""
    UsageAgreement.objects.filter(pk=agreement_id).update(
        payment_authorization_cancel_tx_hash="", payment_authorization_watch_ended_at=None, updated_at=timezone.now())


# --- party actions -------------------------------------------------------------------------------------------

def _last_event_is_refusal(agreement: UsageAgreement, refusal: Forbidden) -> bool:
    """Whether the agreement's last event records this refusal already (its code and rule)."""
    last = agreement.events.order_by("-pk").values_list("data", flat=True).first() or {}
    return last.get("code") == refusal.code and last.get("rule") == refusal.details.get("rule")


def agreement_accept(*, agreement: UsageAgreement, seller: Agent) -> UsageAgreement:
    _require_party(agreement, seller, "seller")
    preflight = _direct_payment_precheck(agreement)  # the chain is asked first: never under the row lock
    with transaction.atomic():
        current = _lock(agreement.pk)
        direct = current.settlement_model == SettlementModel.DIRECT_PAYMENT
        if direct and current.status in (S.PAYING, S.PAID, S.PAYMENT_FAILED):
            return current  # a repeated accept: the payment already started
        paid_already = preflight is not None and preflight.paid_by is not None
        expired = current.status == S.PROPOSED and acceptance_deadline(current) <= timezone.now() and not paid_already
        if current.status == S.PROPOSED and not expired:
            _platform_limit_check(current)  # escrow or direct alike: nothing written, it stays proposed
        if expired:
            # Committed before answering, so the seller's late accept leaves the agreement visibly expired. Not one
            # whose price reached the seller already: that one is accepted as paid, as the expiry sweep does.
            _transition(agreement.pk, to=S.EXPIRED, actor=SYSTEM, reason="proposal expired before acceptance",
                        code="proposal_expired")
            refusal: Forbidden | Conflict = Conflict("The proposal expired.", code="proposal_expired",
                                                     details={"status": S.EXPIRED})
        elif direct and current.status == S.PROPOSED and (denied := _payment_policy_refusal(current)):
            # The accept moves the buyer's money: refused, it stays proposed (the seller may accept again once the
            # buyer's policy allows it), with an event, committed before answering, that tells both parties why:
            # once per refusal, so a seller accepting again and again does not write a row (and a webhook) each time.
            # Both are told the rule alone: the rest of the refusal (what the buyer committed with every seller, its
            # owner's limits) is the buyer's, which the seller has no business reading.
            rule = denied.details.get("rule")
            if not _last_event_is_refusal(current, denied):
                _record_event(current, actor=SYSTEM, from_status=current.status,
                              reason=f"not paid: the buyer's owner policy refuses it now ({rule})",
                              data={"code": denied.code, "rule": rule})
            refusal = Forbidden(denied.message, code=denied.code, details={"rule": rule})
        elif direct and current.status == S.PROPOSED and preflight is None:
            # Approved by the buyer's owner since it was read: its payment was not asked of the chain.
            refusal = Conflict("The purchase was approved while being accepted: accept it again.",
                               code="agreement_changed", details={"status": current.status})
        else:
            accepted = _transition(agreement.pk, to=S.ACCEPTED, actor=Actor.agent(seller, "seller"))
            if direct:
                return _direct_payment_start(agreement.pk, preflight)
            return accepted
    if direct and refusal.code == "proposal_expired":
        # Expired as unpaid: a transfer mined since the chain was read goes on as paid by it, as the sweep's does.
        _expired_direct_proposals_recheck([agreement.pk])
        if (reopened := UsageAgreement.objects.get(pk=agreement.pk)).status != S.EXPIRED:
            return reopened
    raise refusal


def agreement_reject(*, agreement: UsageAgreement, seller: Agent, reason: str = "") -> UsageAgreement:
    """A direct purchase whose price reached the seller already (`_direct_payment_made_by`) is not rejected (409
    `purchase_paid_already`, naming the transfer): closed, the money stayed with the seller and no purchase was left
    to account for it. The seller accepts it (paid by that transfer, the fee collected) or settles with the buyer."""
    _require_party(agreement, seller, "seller")
    paid_by = _direct_payment_made_by(agreement)  # the chain is asked first: never under the row lock
    with transaction.atomic():
        current = _lock(agreement.pk)
        if current.status == S.PENDING_APPROVAL:
            raise Conflict("The buyer's owner has not approved this proposal yet.", code="invalid_transition",
                           details={"status": current.status, "requested": S.REJECTED})
        if paid_by and current.status == S.PROPOSED:
            raise Conflict("The buyer's payment of this purchase was made already: accept the purchase, it is paid.",
                           code="purchase_paid_already", details={"status": current.status, "used_by": paid_by})
        rejected = _transition(agreement.pk, to=S.REJECTED, actor=Actor.agent(seller, "seller"), reason=reason,
                               code="rejected_by_seller")
    return _closed_direct_proposal_recheck(rejected)


def agreement_cancel(*, agreement: UsageAgreement, buyer: Agent, reason: str = "") -> UsageAgreement:
    """A direct purchase whose price reached the seller already (the buyer, or anyone holding its authorization, sent
    it: `_direct_payment_made_by`) is cancelled all the same (the buyer's own doing), but the books say where the money
    went: the cancel's event names the transfer (`used_by`), the purchase keeps it as its payment_tx_hash, and its price
    counts against the buyer's caps (`_committed_spends`)."""
    _require_party(agreement, buyer, "buyer")
    # The chain is asked first, never under the row lock, for a use at the confirmation depth: a newer one is recorded
    # by the watch of closed direct proposals once it is that deep.
    paid_by = _direct_payment_made_by(agreement, confirmed=True)
    with transaction.atomic():
        # A pending approval request exists only while the agreement is pending_approval (a decision moves both).
        policy_services.approval_withdraw(subject_type=APPROVAL_SUBJECT, subject_id=agreement.pk,
                                          reason=reason or "the buyer cancelled the purchase")
        if paid_by and _lock(agreement.pk).status == S.PROPOSED:
            return _transition(agreement.pk, to=S.CANCELLED, actor=Actor.agent(buyer, "buyer"),
                               reason=f"{reason} (the buyer's payment reached the seller before the cancel: tx "
                                      f"{paid_by})".lstrip(), data={"used_by": paid_by},
                               changes={"payment_tx_hash": paid_by, "funds_moved_at": timezone.now()})
        cancelled = _transition(agreement.pk, to=S.CANCELLED, actor=Actor.agent(buyer, "buyer"), reason=reason)
    return _closed_direct_proposal_recheck(cancelled)


def closed_direct_proposal_recheck(*, agreement_id) -> None:
    """`_closed_direct_proposal_recheck` of a direct proposal its buyer's owner rejected, or whose approval expired,
    while it awaited approval (the decision reads no chain: it runs under the approval's lock), run by a task once the
    decision is committed: the buyer may have sent its payment to the seller meanwhile."""
    agreement = UsageAgreement.objects.filter(pk=agreement_id, status__in=(S.REJECTED, S.EXPIRED)).first()
    if agreement is not None:
        _closed_direct_proposal_recheck(agreement)


def _closed_direct_proposal_recheck_after_commit(agreement_id) -> None:
    from agreements.tasks import recheck_closed_direct_proposal

    # robust: with the broker down the owner still gets its answer; the close is read by the watch of closed direct
    # proposals instead (`closed_direct_proposals_watch`).
    transaction.on_commit(lambda: recheck_closed_direct_proposal.delay(str(agreement_id)), robust=True)


def _closed_direct_proposal_recheck(agreement: UsageAgreement) -> UsageAgreement:
    """A direct proposal just rejected or cancelled as unpaid, asked of the chain again now that it is closed (never
    under its row lock): a transfer mined between the first read and the close left the price at the seller with
    nothing to say so. One found names the transfer (an event's `used_by`, its payment_tx_hash), as a cancel of a
    proposal paid before does, and its price counts against the buyer's caps. A node that does not answer now leaves
    the close as it is, logged (it is committed already): `closed_direct_proposals_watch` reads it again."""
    if agreement.settlement_model != SettlementModel.DIRECT_PAYMENT or agreement.payment_tx_hash:
        return agreement
    try:
        used_by = _payment_authorization_used_by(agreement, confirmed=True)
    except Exception:
        logger.error("could not tell whether a direct proposal just closed was paid in the meantime",
                     extra={"agreement_id": str(agreement.pk)}, exc_info=True)
        return agreement
    if not used_by:
        return agreement
    return _closed_direct_proposal_paid_record(
        agreement, used_by=used_by,
        reason=f"the buyer's payment reached the seller as the purchase was closed (tx {used_by})")


def _closed_direct_proposal_paid_record(agreement: UsageAgreement, *, used_by: str, reason: str) -> UsageAgreement:
    """A closed direct proposal whose buyer's authorization the chain shows used (`used_by`): it names the transfer (its
    payment_tx_hash, an event's `used_by`, the parties' webhooks) and its price counts against the buyer's caps
    (`PRICE_PAID_WHEN_NAMED`). A no-op once it names one, or moved since it was read (reopened to be accepted)."""
    with transaction.atomic():
        current = _lock(agreement.pk)
        if current.status != agreement.status or current.payment_tx_hash or not authorization_watched(current):
            return current
        current.payment_tx_hash = used_by
        # Counted against the caps from now, not from the proposal: its authorization valid for a day, a use found
        # a day after it would be out of the day's window at once.
        current.funds_moved_at = current.payment_authorization_watch_ended_at = timezone.now()
        current.save(update_fields=["payment_tx_hash", "funds_moved_at", "payment_authorization_watch_ended_at",
                                    "updated_at"])
        _record_event(current, actor=SYSTEM, from_status=current.status, data={"used_by": used_by}, reason=reason)
    return current


def closed_direct_proposals_watch() -> int:
    """The closed direct proposals (rejected, cancelled, expired), and the direct purchases that failed before their
    payment was sent (`AUTHORIZATION_WATCHED`), whose buyer's authorization may yet be used, read from the chain
    again; how many were found used. The authorization is bearer until its validBefore whatever became
    of the purchase, and the platform cannot revoke it (only the buyer's signature can: the buyer's optional
    cancel), so the close's one read (`_closed_direct_proposal_recheck`, `_expired_direct_proposals_recheck`) missed a
    use mined after it, a node not answering it, a broker refusing its task: the price at the seller, no purchase
    naming it, nothing counted against the buyer's caps. One found used names the transfer and counts its price
    (`_closed_direct_proposal_paid_record`: an expired one is not reopened to be accepted, the seller never did and
    the proposal's time is over). Up to CLOSED_DIRECT_PROPOSALS_CHECKED_PER_SWEEP a run, the least recently read
    first, one the watch never read counted read at its close (the close's own read): not ahead of all, or proposals
    closed faster than the watch reads would keep one read before from its turn for good. One the node does not
    answer for keeps its turn. Once its validBefore (and
    CLOSED_PROPOSAL_LATE_USE_MARGIN_SECONDS) has passed on the chain's clock, read before the authorization, a read
    that finds it unused is the last: no use can be mined any more. Safe twice, and beside the close's own read."""
    watched = list(UsageAgreement.objects.filter(AUTHORIZATION_WATCHED, settlement_model=SettlementModel.DIRECT_PAYMENT,
                                                 payment_tx_hash="", payment_authorization_watch_ended_at=None)
                   .select_related("payment_authorization")
                   .order_by(Coalesce("payment_authorization_watched_at", "closed_at", "accepted_at"), "pk")
                   [:settings.CLOSED_DIRECT_PROPOSALS_CHECKED_PER_SWEEP])
    if not watched or not _chain_clock_reader:
        return 0
    try:
        chain_now = _chain_clock_reader[0]()
    except Exception:  # the node does not answer: the next run reads them all
        logger.warning("could not read the chain's clock: closed direct proposals left for the next run",
                       exc_info=True)
        return 0
    found = 0
    for agreement in watched:
        try:
            used_by = _payment_authorization_used_by(agreement, confirmed=True)
        except Exception:
            logger.warning("could not tell whether a closed direct proposal's authorization was used: read next run",
                           extra={"agreement_id": str(agreement.pk)}, exc_info=True)
            continue
        if used_by:
            paid = _closed_direct_proposal_paid_record(
                agreement, used_by=used_by,
                reason=f"the buyer's payment authorization was used after the purchase was {agreement.status} (tx "
                       f"{used_by}): its price reached the seller")
            found += paid.payment_tx_hash == used_by
            continue
        ran_out = agreement.payment_authorization.valid_before + CLOSED_PROPOSAL_LATE_USE_MARGIN_SECONDS <= chain_now
        now = timezone.now()
        # Not one whose watch a confirmed cancel ended meanwhile.
        UsageAgreement.objects.filter(pk=agreement.pk, payment_tx_hash="", payment_authorization_watch_ended_at=None
                                      ).update(
            payment_authorization_watched_at=now, payment_authorization_watch_ended_at=now if ran_out else None,
            updated_at=now)
    return found


# --- escrow activation (called by the escrow app) ----------------------------------------------------------

def agreement_activation_begin(*, agreement_id, buyer: Agent, receipt_signer: str = "") -> UsageAgreement:
    """accepted | activation_failed -> submitting, once the buyer's owner policy allows the money to move now
    (`_payment_policy_refusal`: else 403, or 400 `amount_too_large` above the platform's ceiling in force now, and
    nothing changes). Call inside the transaction that queues the chain work.
    `receipt_signer`: the one the buyer's signed intent names, which signs every receipt of the agreement.

    Unlike other transitions a repeat is 409, not a no-op: the caller must not queue a second transaction.
    """
    agreement = _lock(agreement_id)
    _require_party(agreement, buyer, "buyer")
    if agreement.settlement_model != SettlementModel.ESCROW:
        raise Conflict("Only escrow agreements are activated.", code="not_an_escrow_agreement")
    if not can_activate(agreement):
        code = "activation_in_progress" if agreement.status == S.SUBMITTING else "invalid_transition"
        raise Conflict(f"Cannot activate an agreement that is {agreement.status}.", code=code,
                       details={"status": agreement.status, "requested": S.SUBMITTING})
    if agreement.expires_at <= timezone.now():
        raise Conflict("The agreement has expired.", code="agreement_expired", details={"status": agreement.status})
    refusal = _payment_policy_refusal(agreement)
    if refusal is not None:
        raise refusal
    return _transition(agreement_id, to=S.SUBMITTING, actor=Actor.agent(buyer, "buyer"),
                       changes={"activation_tx_hash": "", "funds_moved_at": timezone.now(),
                                **({"receipt_signer": receipt_signer} if receipt_signer else {})})


def agreement_intent_nonce_renew(*, agreement_id, from_round: int) -> UsageAgreement:
    """The buyer cancelled the activation intent nonce of round `from_round` on-chain (`cancelIntentNonce`) and no
    escrow was funded under the agreement (the caller read both from the chain): the next round's nonce is the one
    signed from now on, so the agreement can still be funded; the cancelled intent stays dead on-chain and its
    signature no longer matches the intent the platform checks. Only while the agreement awaits funding and is
    still at `from_round` (two concurrent readers raise it once). Call inside atomic()."""
    agreement = _lock(agreement_id)
    if not can_activate(agreement) or agreement.intent_nonce_round != from_round:
        return agreement
    agreement.intent_nonce_round = from_round + 1
    agreement.save(update_fields=["intent_nonce_round", "updated_at"])
    _record_event(agreement, actor=SYSTEM, from_status=agreement.status,
                  reason="the buyer cancelled its activation intent's nonce on-chain: a fresh one is signed",
                  data={"intent_nonce_round": agreement.intent_nonce_round})
    return agreement


def agreement_error_tell(*, agreement_id, code: str, reason: str) -> None:
    """An error that moves no status (a Masumi purchase's seller call failed, a step of its own refused), told to both
    parties as an event of the agreement in its status (`data.code`): their webhooks and inboxes. Call inside
    atomic(), holding what orders the caller's decision that it is new (a purchase's row lock), so it is told
    once."""
    agreement = _lock(agreement_id)
    _record_event(agreement, actor=SYSTEM, from_status=agreement.status, reason=reason[:500], data={"code": code})


def agreement_activation_signed(*, agreement_id, tx_hash: str) -> None:
    UsageAgreement.objects.filter(pk=agreement_id).update(activation_tx_hash=tx_hash)


# --- chain outcomes (called by the escrow app: relayer receipts and indexed contract events) ---------------
#
# Two paths report the same on-chain fact: the relayer's receipt of its own transaction and the indexer's copy
# of the contract event (which also sees what others sent). Whichever comes first moves the agreement; the
# other finds it there, or already further along (`_chain_outcome`), and changes nothing.

def _chain_outcome(agreement_id, *, to: str, **kwargs) -> UsageAgreement:
    agreement = _lock(agreement_id)
    if agreement.status in statuses_after(to):
        return agreement  # the other path got there first and the agreement has moved on since
    return _transition(agreement_id, to=to, **kwargs)


def agreement_activation_confirmed(*, agreement_id, tx_hash: str, receipt_signer: str = "") -> UsageAgreement:
    """`receipt_signer`: the one the escrow names on-chain (its Activated event), recorded when none was (the buyer
    relayed its signed intent itself)."""
    agreement = _lock(agreement_id)
    if receipt_signer and not agreement.receipt_signer:
        UsageAgreement.objects.filter(pk=agreement_id).update(receipt_signer=receipt_signer)
    if can_activate(agreement):
        # An operator retried a failed activation, or someone relayed the buyer's signed intent themselves: the
        # buyer's own agent may fund past its owner's policy, which the platform then applies as the chain has it.
        refusal = _self_funding_policy_refusal(agreement)
        _transition(agreement_id, to=S.SUBMITTING, actor=SYSTEM, reason="activation mined",
                    changes={"funds_moved_at": timezone.now()})
        if refusal is not None:
            # As a funding after the close: active with its completion asked for at once, so that nothing is
            # metered and a settlement of nothing gives the whole deposit back.
            rule = refusal.details.get("rule") or refusal.code
            return _chain_outcome(agreement_id, to=S.ACTIVE, actor=SYSTEM, data={"tx_hash": tx_hash},
                                  reason=f"escrow funded on-chain past the buyer's owner policy ({rule}): its "
                                         "deposit goes back to the buyer through a settlement of nothing",
                                  changes={"activation_tx_hash": tx_hash, "completion_requested_at": timezone.now(),
                                           "completion_reason": f"funded past the buyer's owner policy: {rule}"[:100],
                                           "completion_code": refusal.code}, code=refusal.code)
    elif is_closed(agreement):
        # The buyer's signed intent ran after the agreement was closed (see TRANSITIONS). The escrow holds the deposit,
        # which only the contract can give back: completion is asked for in the same write, so nothing is charged
        # and the settlement tick proposes nothing for the seller; finalize then pays the buyer the whole deposit.
        return _transition(agreement_id, to=S.ACTIVE, actor=SYSTEM, data={"tx_hash": tx_hash},
                           reason=f"escrow funded on-chain after the agreement was {agreement.status}: its deposit "
                                  "goes back to the buyer through a settlement of nothing",
                           changes={"activation_tx_hash": tx_hash, "completion_requested_at": timezone.now(),
                                    "completion_reason": "funded after it was closed",
                                    "completion_code": FUNDED_AFTER_CLOSE}, code=FUNDED_AFTER_CLOSE)
    return _chain_outcome(agreement_id, to=S.ACTIVE, actor=SYSTEM, reason="escrow funded on-chain",
                          data={"tx_hash": tx_hash}, changes={"activation_tx_hash": tx_hash})


def _self_funding_policy_refusal(agreement: UsageAgreement) -> ApplicationError | None:
    """Why the buyer's owner policy (or the platform's ceiling), as it is now, refuses the escrow the chain funded
    without the platform's check (`_payment_policy_refusal`; an operator's retry was checked when it was sent, and
    is checked again here as its money moved). Raises nothing: the funding is a fact to apply either way."""
    try:
        return _payment_policy_refusal(agreement)
    except ApplicationError as refused:  # above the ceiling in force now
        return refused


def agreement_activation_failed(*, agreement_id, reason: str, code: str) -> UsageAgreement:
    """`code`: the failure's machine-readable code (the agreement's status_code)."""
    agreement = _lock(agreement_id)
    if is_funded(agreement) or is_closed(agreement):
        # Funded on-chain (another copy of the intent was mined): that wins. Closed since the activation was sent (an
        # operator's retry of one that failed before): nothing left to fail.
        return agreement
    return _transition(agreement_id, to=S.ACTIVATION_FAILED, actor=SYSTEM, reason=reason, code=code)


def agreement_activation_wanted(*, agreement_id) -> bool:
    """Whether an activation that failed may still be sent again (after a reorg took its block): not once the
    agreement is closed, so a buyer who cancelled is not charged by it. Locks the agreement until the caller's
    transaction ends, so that a cancel waits for the activation to be reopened (then refused: submitting)."""
    return not is_closed(_lock(agreement_id))


def agreement_activation_retry_begin(*, agreement_id) -> None:
    """An operator sends a failed activation's signed intent again: the platform moves the buyer's money now, so the
    buyer's owner policy as it is now must allow it, as at activate-escrow (`_payment_policy_refusal`: else 403
    naming the rule, and nothing changes); it then counts against the buyer's caps from now. Call inside the
    transaction that queues the retry."""
    agreement = _lock(agreement_id)
    if not can_activate(agreement):
        return  # funded since (the retry meets AgreementExists and moves nothing) or closed (its retry is refused)
    _retry_policy_check(agreement)


def agreement_direct_payment_retry_begin(*, agreement_id, step: str) -> None:
    """An operator sends a direct purchase's failed `step` (its fee permit, fee collection or payment) again: the
    platform moves the buyer's money now (the permit's allowance, the x402 authorization), so the buyer's owner policy
    as it is now must allow it, as at accept (`_payment_policy_refusal`: else 403 naming the rule, and nothing
    changes). The purchase is then paying again, outside the transition table as after a reorg: payment_failed counts
    nothing against the caps, and it counts from now while it is paid. Call inside the transaction that queues the
    retry. Refused (409 `purchase_paid_already`) once the purchase names a transfer (its payment_tx_hash: the watch
    found the buyer's authorization used after the failure): the chain shows the price paid, a retry pays it again."""
    agreement = _lock(agreement_id)
    if agreement.payment_tx_hash:
        raise Conflict(f"The chain shows this purchase paid (tx {agreement.payment_tx_hash}): {step} is not sent "
                       "again.", code="purchase_paid_already",
                       details={"agreement_id": str(agreement.pk), "payment_tx_hash": agreement.payment_tx_hash})
    _retry_policy_check(agreement)
    if agreement.status == S.PAYMENT_FAILED:
        _status_set_outside_table(agreement, to=S.PAYING, reason=f"an operator sent {step} again", fields={},
                                  data={"operator_retry": True})


def _retry_policy_check(agreement: UsageAgreement) -> None:
    """An operator's retry moves the buyer's money now: refused (403 naming the rule) unless its policy allows it."""
    refusal = _payment_policy_refusal(agreement)
    if refusal is not None:
        raise Forbidden(f"The buyer's owner policy refuses this payment now (rule {refusal.details.get('rule')}): "
                        f"{refusal.message}", code=refusal.code, details=refusal.details)
    UsageAgreement.objects.filter(pk=agreement.pk).update(funds_moved_at=timezone.now())


def agreement_activation_reopened(*, agreement_id, tx_hash: str) -> UsageAgreement:
    """A reorg took the block of the activation `tx_hash` that reverted; the relayer sends the same bytes again:
    activation_failed -> submitting (the buyer starts no other meanwhile) until its outcome is applied again. One
    closed since is not sent again (`agreement_activation_wanted`); one funded since (its intent relayed by someone
    else) is left where it is."""
    agreement = _lock(agreement_id)
    if agreement.status != S.ACTIVATION_FAILED:
        return agreement
    return _transition(agreement_id, to=S.SUBMITTING, actor=SYSTEM, data={"tx_hash": tx_hash},
                       reason="a reorg took the failed activation's block: it is sent again",
                       changes={"activation_tx_hash": tx_hash})


def agreement_activation_undone(*, agreement_id, tx_hash: str) -> UsageAgreement | None:
    """A reorg deeper than the confirmation depth took the block of the activation `tx_hash` the agreement was made
    active on (ours, or a copy of the buyer's intent ours was concluded on) before the indexer applied its Activated
    event (had it, it moved the agreement back itself): back to the status it was activated from (submitting; the
    closed one of an escrow funded after the close) until the activation the relayer sends again is concluded.
    Active, it was served against an escrow the chain does not hold. Left alone once it moved on, or when it is
    active on another activation."""
    agreement = _lock(agreement_id)
    if agreement.status != S.ACTIVE or agreement.activation_tx_hash.lower() != tx_hash.lower():
        return None
    activated = agreement.events.transitions().filter(to_status=S.ACTIVE).order_by("-id").first()
    return agreement_chain_rollback(
        agreement_id=agreement_id, produced_by_removed={S.ACTIVE},
        back_to=(activated and activated.from_status) or S.SUBMITTING,
        reason="a reorg took the block of the activation the escrow was funded by: waiting for it to be mined again")


def agreement_settlement_proposed(*, agreement_id, challenge_deadline: datetime, amount: int, seq: int,
                                  tx_hash: str) -> UsageAgreement:
    """A proposal on-chain (ours, the seller's, anyone's with the operator role). One above the usage recorded is
    backed by no receipt of the books (a receipt signer's key misused, the books restored from an older backup), and
    finalize would pay it at the window's end: its event says so to both parties (webhooks, inbox: the buyer
    challenges it within the window), it is logged as an error and the dashboard lists it
    (`selectors.agreements_proposed_above_their_usage`)."""
    agreement = _lock(agreement_id)
    data = {"amount_atomic": amount, "seq": seq, "tx_hash": tx_hash}
    # The chain's proposals only ever go up in seq: a lower one is an earlier proposal told late (the relayer's
    # receipt and the indexer race).
    if agreement.status == S.IN_CHALLENGE and agreement.proposed_seq is not None and seq < agreement.proposed_seq:
        return agreement
    changes = {"challenge_deadline": challenge_deadline, "proposed_seq": seq, "proposed_amount": amount}
    if agreement.status == S.IN_CHALLENGE:
        if (agreement.challenge_deadline, agreement.proposed_seq) == (challenge_deadline, seq):
            return agreement  # told already (the relayer's receipt and the indexer race)
        # A receipt with a higher seq replaced the proposal: the contract restarted the window.
        for name, value in changes.items():
            setattr(agreement, name, value)
        agreement.save(update_fields=[*changes, "updated_at"])
        _record_event(agreement, actor=SYSTEM, from_status=S.IN_CHALLENGE, data=data,
                      reason=_proposal_checked("settlement proposed again", agreement, amount=amount, data=data))
        return agreement
    if agreement.status in (S.DISPUTED, S.SETTLING) and agreement.proposed_seq is not None and seq > agreement.proposed_seq:
        # A re-proposal told after the challenge or the window's end that it came before (the chain takes none after
        # either): the relayer's receipt of a challenge recorded the proposal read when it was queued, and the
        # challenge disputed this one. The amount the arbiter may award and finalize pays is this one's.
        for name, value in changes.items():
            setattr(agreement, name, value)
        agreement.save(update_fields=[*changes, "updated_at"])
        _record_event(agreement, actor=SYSTEM, from_status=agreement.status, data=data, reason=_proposal_checked(
            f"settlement proposed again before the agreement was {agreement.status}", agreement, amount=amount,
            data=data))
        return agreement
    if agreement.status in statuses_after(S.IN_CHALLENGE):
        return agreement  # the other path got there first and the agreement has moved on since
    return _transition(agreement_id, to=S.IN_CHALLENGE, actor=SYSTEM, data=data, changes=changes,
                       reason=_proposal_checked("settlement proposed on-chain", agreement, amount=amount, data=data))


def _proposal_checked(reason: str, agreement: UsageAgreement, *, amount: int, data: dict) -> str:
    """The reason of the event recording a proposal of `amount`, and its `data` completed, once the proposal is
    compared with the usage recorded: every receipt the books sign is of usage they recorded first, so a proposal
    backed by one is never above it."""
    above = amount - agreement.used
    if above <= 0:
        return reason
    data["above_usage_atomic"] = above
    logger.error("settlement proposed on-chain above the usage recorded", extra={
        "agreement_id": str(agreement.pk), "amount": amount, "used": agreement.used, "seq": data["seq"],
        "tx_hash": data["tx_hash"]})
    return (f"{reason} for {amount} base units, {above} above the usage recorded ({agreement.used}): no usage receipt "
            "of the books backs it; the buyer may challenge it until the window's end")


def agreement_challenge_failed(*, agreement_id, transaction_id, failure: str) -> UsageAgreement:
    """The buyer's challenge the platform relayed was refused by the chain (mined or simulated once the window had
    closed, its signature expired) and nothing else disputed the escrow: the status does not move, but the buyer,
    told 202 and then nothing until the seller's amount was finalized, is sent an event saying so (webhook, inbox).
    Call inside a DB transaction."""
    agreement = _lock(agreement_id)
    _record_event(agreement, actor=SYSTEM, from_status=agreement.status,
                  reason=f"the buyer's challenge failed on-chain: {failure}",
                  data={"challenge_failed": str(transaction_id)})
    return agreement


def agreement_disputed(*, agreement_id, reason: str, tx_hash: str, evidence: str = "") -> UsageAgreement:
    """`evidence`: what the buyer gave with its challenge, kept on the event for the arbiter (`escrow.selectors.dispute_evidence`)."""
    return _chain_outcome(agreement_id, to=S.DISPUTED, actor=Actor(AgreementEvent.ActorKind.BUYER, "buyer"),
                          reason=reason, data={"tx_hash": tx_hash, **({"evidence": evidence} if evidence else {})})


def agreement_settling(*, agreement_id, reason: str, data: dict | None = None) -> UsageAgreement:
    return _chain_outcome(agreement_id, to=S.SETTLING, actor=SYSTEM, reason=reason, data=data)


def agreement_settled(*, agreement_id, seller_payout: int, buyer_refund: int, tx_hash: str) -> UsageAgreement:
    """The escrow paid out (its Settled event). From disputed directly: anyone finalized a dispute the arbiter did not
    resolve by its timeout, the buyer refunded the whole deposit."""
    status = _lock(agreement_id).status
    if status == S.IN_CHALLENGE:  # someone else finalized once the window was over
        _transition(agreement_id, to=S.SETTLING, actor=SYSTEM, reason="finalized on-chain")
    reason = ("dispute not resolved by its timeout: the whole deposit refunded to the buyer"
              if status == S.DISPUTED else "escrow paid out on-chain")
    return _chain_outcome(agreement_id, to=S.SETTLED, actor=SYSTEM, reason=reason,
                          data={"seller_payout_atomic": seller_payout, "buyer_refund_atomic": buyer_refund,
                                "tx_hash": tx_hash},
                          changes={"seller_payout": seller_payout, "buyer_refund": buyer_refund})


def agreement_refunded(*, agreement_id, amount: int, tx_hash: str) -> UsageAgreement:
    """The escrow was reclaimed (by the platform's relayer or the buyer itself): the whole deposit went back to the
    buyer. Usage charged on it was never proposed before the escrow's reclaimAfter, and the contract pays the seller
    nothing for it from then on: the event says so (`seller_unpaid_atomic`), to the parties' webhooks, and the
    dashboard and `reconcile` list it (`selectors.agreements_reclaimed_with_seller_unpaid`). Calls still reserved
    (past reclaimAfter, their processes died) are settled first, by the reaper's rule, so that what it says the seller
    lost counts the answered ones and nothing merely reserved; a call whose charge holds its intent right now is
    released by that charge once it finds the agreement refunded (`metering._released_if_refunded`)."""
    agreement = _lock(agreement_id)
    if agreement.reserved:
        reservations_settle_stale(agreement=agreement)
    used = agreement.used
    reason, data = "expired unused: deposit reclaimed", {"buyer_refund_atomic": amount, "tx_hash": tx_hash}
    if used:
        reason = (f"deposit reclaimed for the buyer: nothing was proposed on-chain before the escrow's reclaimAfter, "
                  f"so the seller was not paid the {used} base units it earned")
        data["seller_unpaid_atomic"] = used
    return _chain_outcome(agreement_id, to=S.REFUNDED, actor=SYSTEM, reason=reason, data=data,
                          changes={"seller_payout": 0, "buyer_refund": amount})


def agreement_payout_deferred(*, agreement_id, party: str, amount: int, tx_hash: str) -> None:
    """The token refused the escrow's transfer of `amount` to `party` ("seller" or "buyer") at its settlement or
    reclaim (a USDC-blacklisted address, a paused token): the contract credited it, claimable by `withdraw`. The
    settlement records the party's share as paid out; this event (webhooks, inbox) says the money stayed in the
    escrow, and the dashboard lists it until it is withdrawn (`escrow.selectors.payouts_deferred`). Once per
    transaction and party. Call inside a DB transaction."""
    _payout_notice(agreement_id, party=party, tx_hash=tx_hash, key="payout_deferred_atomic", amount=amount,
                   code="payout_deferred", reason=f"the token refused the escrow's transfer of {amount} base units to the {party}: it stays "
                          "claimable in the escrow (withdraw; see claim-instructions)")


def agreement_payout_withdrawn(*, agreement_id, party: str, amount: int, tx_hash: str) -> None:
    """A deferred payout (`agreement_payout_deferred`) reached `party` through the escrow's `withdraw` (anyone's).
    Once per transaction and party. Call inside a DB transaction."""
    _payout_notice(agreement_id, party=party, tx_hash=tx_hash, key="withdrawn_atomic", amount=amount,
                   code="payout_withdrawn", reason=f"the {amount} base units credited to the {party} in the escrow were withdrawn to it")


def _payout_notice(agreement_id, *, party: str, tx_hash: str, key: str, amount: int, code: str, reason: str) -> None:
    """An event in the agreement's unchanged status; `code` tells it from a repeat of the close in a webhook."""
    agreement = _lock(agreement_id)
    data = {key: amount, "party": party, "tx_hash": tx_hash, "code": code}
    if agreement.events.filter(data__has_key=key, data__party=party, data__tx_hash=tx_hash).exists():
        return  # told already (a reorg took its block, and the same transaction was mined again)
    _record_event(agreement, actor=SYSTEM, from_status=agreement.status, reason=reason, data=data)


def agreement_payout_undone(*, agreement_id, tx_hash: str) -> UsageAgreement | None:
    """A reorg deeper than the confirmation depth took the block of our finalize or reclaim `tx_hash` the agreement
    was recorded settled or refunded on, before the indexer applied its event (had it, it moved the agreement back
    itself): back to the status it was in before, its payouts cleared, until the transaction the relayer sends again
    is mined. It stayed settled, recording a payout the chain no longer made. Left alone when recorded on another."""
    agreement = _lock(agreement_id)
    if agreement.status not in (S.SETTLED, S.REFUNDED):
        return None
    closed = agreement.events.transitions().filter(to_status=agreement.status).order_by("-id").first()
    if closed is None or not closed.from_status or str(closed.data.get("tx_hash", "")).lower() != tx_hash.lower():
        return None
    return agreement_chain_rollback(
        agreement_id=agreement_id, produced_by_removed={agreement.status}, back_to=closed.from_status,
        reason=f"a reorg took the block of the transaction the escrow was {agreement.status} by: waiting for it to "
               "be mined again")


def agreement_chain_rollback(*, agreement_id, produced_by_removed: set[str], back_to: str, reason: str,
                             changes: dict | None = None) -> UsageAgreement | None:
    """A reorg took events off the chain: move the agreement back to `back_to` (what its remaining canonical
    events say), outside the transition table, but only while its status is one a removed event produced, so
    a step the marketplace took on its own since (a queued challenge, a finalize under way) is left alone.
    Returns the agreement when it changed."""
    agreement = _lock(agreement_id)
    if agreement.status not in produced_by_removed:
        return None
    fields = {name: value for name, value in (changes or {}).items() if getattr(agreement, name) != value}
    if back_to == S.ACTIVE:
        fields.update(challenge_deadline=None, proposed_seq=None, proposed_amount=None)
    if agreement.status in (S.SETTLED, S.REFUNDED) and back_to not in (S.SETTLED, S.REFUNDED):
        fields.update(seller_payout=None, buyer_refund=None, settled_at=None)
    if agreement.status == S.ACTIVE and back_to != S.ACTIVE:
        fields["activated_at"] = None
    if back_to in CLOSED_STATUSES:  # the escrow funded after the close is gone: nothing to complete
        fields.update(completion_requested_at=None, completion_reason="", completion_code="")
    if agreement.status == back_to and not fields:
        return None
    return _status_set_outside_table(agreement, to=back_to, reason=reason, fields=fields, data={"reorg": True})


def _status_set_outside_table(agreement: UsageAgreement, *, to: str, reason: str, fields: dict,
                              data: dict) -> UsageAgreement:
    """Move the locked `agreement` to `to` where the transition table has no edge: back to what a reorg left, or to
    paying when an operator sends a failed direct purchase's step again."""
    from_status = agreement.status
    agreement.status = to
    agreement.status_reason = reason[:500]
    agreement.status_code = data.get("code") or ""
    for name, value in fields.items():
        setattr(agreement, name, value)
    agreement.save(update_fields=["status", "status_reason", "status_code", "updated_at", *fields])
    _record_event(agreement, actor=SYSTEM, from_status=from_status, reason=reason, data=data)
    return agreement


# The agreement's reason for an owner's decision, which both parties read (its trail, the inbox, webhooks): the
# owner's note is theirs (kept on the approval request), not the seller's to read.
_DECIDED_REASONS = {"approved": "approved by the buyer's owner", "rejected": "rejected by the buyer's owner"}
_DECIDED_CODES = {S.REJECTED: "rejected_by_owner"}


def _on_approval_decided(*, subject_id, outcome: str, actor, note: str) -> Conflict | None:
    """The owner's decision carried out under the agreement's lock; an approval that could no longer make the
    purchase (its term, or a direct purchase's signatures, ended) expires it instead and answers the refusal the
    caller raises once that is committed."""
    to = {"approved": S.PROPOSED, "rejected": S.REJECTED, "expired": S.EXPIRED}[outcome]
    who = Actor.person(actor) if actor else SYSTEM
    agreement = _lock(subject_id)
    if agreement.status != S.PENDING_APPROVAL:
        return None  # cancelled by the buyer meanwhile: nothing left to decide
    if (outcome == "approved" and actor is not None and actor.pk == agreement.seller.owner_id
            and actor.pk != agreement.buyer.owner_id):
        # An operator who owns the seller would consent, for the buyer's owner, to a payment to their own agent.
        raise Forbidden("You own the seller of this purchase: the buyer's owner, or another operator, approves it.",
                        code="approver_owns_the_seller")
    if actor is not None:  # nor does one who owns another seller decide (a rejection blocked their competitors)
        policy_services.policy_operator_check(agent=agreement.buyer, operator=actor, does="decides this purchase")
    if outcome == "approved":
        _approval_policy_check(agreement)
    changes, reason, refusal = None, _DECIDED_REASONS.get(outcome) or note or f"owner {outcome}", None
    if to == S.PROPOSED:
        now = timezone.now()
        # Never past the term, as at proposal: an escrow past its expiresAt cannot be funded.
        open_until = min(now + settings.PROPOSAL_TTL, agreement.expires_at)
        if open_until <= now:
            to, reason = S.EXPIRED, "owner approved after the agreement's term ended"
            refusal = Conflict("The agreement's term ended before the approval: it expired.",
                               code="agreement_expired", details={"status": S.EXPIRED})
        elif agreement.settlement_model == SettlementModel.DIRECT_PAYMENT:
            # Never past what its signatures allow, as at proposal (`_direct_acceptance_deadline`, kept while it
            # awaited the approval, counted on our clock from the chain's, which is not read under the row lock).
            open_until = min(open_until, agreement.proposal_expires_at)
            if open_until <= now:
                to, reason = S.EXPIRED, "owner approved after the payment's signatures ran out"
                refusal = Conflict("The purchase's payment signatures ran out before the approval: it expired.",
                                   code="proposal_expired", details={"status": S.EXPIRED})
        changes = {"proposal_expires_at": open_until} if to == S.PROPOSED else None
    code = refusal.code if refusal is not None else _DECIDED_CODES.get(to, "")
    _transition(subject_id, to=to, actor=who, reason=reason, changes=changes, code=code)
    if to != S.PROPOSED and agreement.settlement_model == SettlementModel.DIRECT_PAYMENT:
        _closed_direct_proposal_recheck_after_commit(subject_id)
    return refusal


def offer_withdrawn_check(service: Service, *, then: str) -> None:
    """409 `service_deregistered` / `seller_deactivated` when the service's seller withdrew the offer a purchase was
    made on (the service deregistered, the seller deactivated) since: `then` says when, and what the caller does."""
    if service.state != ServiceState.REGISTERED:
        raise Conflict(f"This service was deregistered {then}.", code="service_deregistered")
    if not service.seller.sells:
        raise Conflict(f"This service's seller was deactivated {then}.", code="seller_deactivated")


def _approval_policy_check(agreement: UsageAgreement) -> None:
    """An approval consents to a purchase that can still be made and that the policy allows but for its threshold.
    One the policy has since come to deny (a seller blocked, a cap or limit lowered), or of a buyer deactivated since
    (its owner stopping it), is 409 `policy_denies_now` with the rule; one whose service was deregistered or seller
    deactivated since is 409 `service_deregistered` / `seller_deactivated`, as a new proposal of it would be, and
    one whose service its seller renamed, moved to another upstream or protocol since the request is 409
    `service_changed` (`_service_version`: the agreement's price and quantity are its own from its proposal). The
    request is left pending (the owner changes the policy and approves again, or rejects). The policy is checked as
    when the money moves (`_payment_policy_refusal`), which still holds then; the buyer is locked after the
    agreement, as there."""
    offer_withdrawn_check(agreement.service, then="while the purchase waited: reject it")
    request = policy_selectors.approvals_for_subjects(subject_type=APPROVAL_SUBJECT, subject_ids=[agreement.pk])
    requested = request[agreement.pk].summary.get("service_version") if agreement.pk in request else None
    if requested is not None and requested != _service_version(agreement.service):
        # Its seller moved or renamed it since the owner was asked: the approval would consent to something else.
        raise Conflict("The seller changed this service (its name, upstream or protocol) since the approval was asked "
                       "for: reject it; the buyer proposes again to be asked about the service as it is now.",
                       code="service_changed")
    _platform_limit_check(agreement)  # 400 `amount_too_large`: the request left pending, as the accept would refuse
    try:
        _buyer_policy_decision(buyer=agreement.buyer, service=agreement.service, token=agreement.token,
                               amount=agreement.deposit_amount + agreement.infra_fee, at=timezone.now(),
                               agreement_id=agreement.pk)
    except Forbidden as denied:
        rule = denied.details.get("rule", "")
        raise Conflict(f"The owner's policy now denies this purchase ({rule}: {denied.message}); change the policy "
                       "and approve again, or reject it.", code="policy_denies_now", details=denied.details) from None


def handlers_register() -> None:
    """Called once, from AgreementsConfig.ready()."""
    policy_services.approval_handler_register(subject_type=APPROVAL_SUBJECT, handler=_on_approval_decided)


def hooks_check(app_configs=None, **kwargs) -> list[checks.CheckMessage]:
    """System check: what the escrow app registers for agreements (chain reads and execution) is there."""
    hooks = {"direct payment executor": _direct_payment_executor, "permit nonce reader": _permit_nonce_reader,
             "token domain reader": x402_protocol.token_domain_reader_registered(),
             "finality wait reader": selectors.finality_wait_reader_registered(),
             "chain clock reader": bool(_chain_clock_reader),
             "authorization state reader": bool(_authorization_spent_reader)}
    return [checks.Error(f"No {name} is registered with agreements.", obj=__name__, id="agreements.E001",
                         hint="The escrow app registers it in EscrowConfig.ready().")
            for name, registered in hooks.items() if not registered]


def agreements_expire_proposals(*, now: datetime | None = None) -> int:
    """Proposals the seller did not answer in time become `expired`, but for a direct purchase whose buyer's payment
    reached the seller already (the buyer, or anyone holding its authorization, sent it): closed, the money stayed with
    the seller with no purchase to account for it (and a seller that sent it itself had the price with no purchase to
    deliver and no fee). That one is accepted as paid by the transfer (`_paid_proposal_accept`). The chain is asked
    of up to DIRECT_PROPOSALS_CHECKED_PER_SWEEP direct proposals a run, before any row is locked; one it could not
    be asked of waits for the next run. A transfer mined after that read, before the row was expired, is found by
    asking again once it is (`_expired_direct_proposals_recheck`). Each in its own transaction; safe twice."""
    now = now or timezone.now()
    # The term bounds the window (`acceptance_deadline`), also of proposals recorded before it did.
    due = UsageAgreement.objects.filter(Q(proposal_expires_at__lte=now) | Q(expires_at__lte=now), status=S.PROPOSED)
    checked = _direct_proposals_paid(due.filter(settlement_model=SettlementModel.DIRECT_PAYMENT))
    applied = sweeps.due_rows_apply(
        due=due.filter(~Q(settlement_model=SettlementModel.DIRECT_PAYMENT) | Q(pk__in=list(checked))),
        apply=lambda agreement: _proposal_expire(agreement, paid=checked.get(agreement.pk)), turn="expire-proposals")
    _expired_direct_proposals_recheck([pk for pk, paid in checked.items() if paid is None])
    return applied


def agreements_expire_unfunded_past_term(*, now: datetime | None = None) -> int:
    """Escrow agreements accepted (or whose activation failed) and still unfunded when their term ended become
    `expired`: the contract refuses an escrow past its expiresAt (InvalidExpiry), so they could never be activated,
    and left accepted they waited for the buyer's cancel. One the chain funds all the same (its clock behind ours)
    becomes active (expired -> active). Each in its own transaction; safe twice."""
    return sweeps.due_rows_apply(
        due=UsageAgreement.objects.filter(settlement_model=SettlementModel.ESCROW, status__in=AWAITING_FUNDING_STATUSES,
                                          expires_at__lte=now or timezone.now()),
        apply=lambda agreement: agreement_expire_unfunded(agreement_id=agreement.pk,
                                                          reason="its term ended before its escrow was funded",
                                                          code="term_ended_unfunded"),
        turn="expire-unfunded-past-term")


def _expired_direct_proposals_recheck(agreement_ids: list) -> None:
    """The chain asked again of direct proposals the sweep expired as unpaid, now that they are closed (never under
    their row lock): one whose buyer's payment was mined between the sweep's read and its write was closed with the
    price at the seller and no purchase to account for it. That one is reopened and accepted as paid by the transfer,
    as if the sweep had read the chain a moment later (`_paid_proposal_accept`). A node that does not answer leaves
    it expired, logged: a use found later is recorded by `closed_direct_proposals_watch`."""
    expired = UsageAgreement.objects.filter(pk__in=agreement_ids, status=S.EXPIRED, payment_tx_hash="")
    for agreement in expired.select_related("payment_authorization"):
        try:
            used = _payment_authorization_used_by(agreement, confirmed=True)  # a newer use: the watch records it
            preflight = _direct_payment_preflight(agreement, confirmed_use=used) if used else None
        except Exception:
            logger.error("could not tell whether a direct proposal just expired was paid in the meantime",
                         extra={"agreement_id": str(agreement.pk)}, exc_info=True)
            continue
        if preflight is None or not preflight.paid_by:
            continue
        with transaction.atomic():
            current = _lock(agreement.pk)
            if current.status != S.EXPIRED or current.payment_tx_hash:
                continue
            _status_set_outside_table(
                current, to=S.PROPOSED, fields={"closed_at": None}, data={"used_by": preflight.paid_by},
                reason=f"the buyer's payment reached the seller while the proposal was being expired (tx "
                       f"{preflight.paid_by}): reopened, to be accepted as paid by it")
            _paid_proposal_accept(agreement.pk, preflight)


def _direct_proposals_paid(due) -> dict:
    """{agreement id: its accept's preflight (`DirectPaymentPreflight`, `paid_by` set) when its payment reached the
    seller already, else None}, of the direct proposals `due` the chain answered for, the earliest first."""
    checked: dict = {}
    for agreement in due.order_by("proposal_expires_at")[:settings.DIRECT_PROPOSALS_CHECKED_PER_SWEEP]:
        try:
            preflight = _direct_payment_precheck(agreement) if _direct_payment_made_by(agreement) else None
        except Exception:  # a node that does not answer: the next run asks again
            logger.warning("could not tell whether an expiring direct proposal was paid: left proposed",
                           extra={"agreement_id": str(agreement.pk)}, exc_info=True)
            continue
        checked[agreement.pk] = preflight if preflight is not None and preflight.paid_by else None
    return checked


def _proposal_expire(agreement: UsageAgreement, *, paid: DirectPaymentPreflight | None) -> UsageAgreement:
    if paid is None:
        return _transition(agreement.pk, to=S.EXPIRED, actor=SYSTEM, reason="proposal expired before acceptance",
                           code="proposal_expired")
    return _paid_proposal_accept(agreement.pk, paid)


def _paid_proposal_accept(agreement_id, preflight: DirectPaymentPreflight) -> UsageAgreement:
    """A direct proposal unanswered until it expired whose price reached the seller already (`preflight.paid_by`): the
    system accepts it, its event naming the transfer, and it goes on as the seller's accept would (its fee collected,
    paid by that transfer). Where the buyer's owner policy refuses it now, or the fee's collection cannot run (the
    wallet's other payments under way included), it fails naming the transfer, nothing more charged
    (`_direct_payment_start`). Call inside the transaction holding the agreement's row lock."""
    try:
        refusal: ApplicationError | None = _payment_policy_refusal(_lock(agreement_id))
    except InvalidInput as above_limit:  # the ceiling lowered since: the fee is not collected either
        refusal = above_limit
    if refusal is not None:
        preflight = preflight.refused(refusal.code, refusal.details.get("rule") or refusal.message)
    _transition(agreement_id, to=S.ACCEPTED, actor=SYSTEM, data={"used_by": preflight.paid_by},
                reason=f"proposal expired unanswered, but the buyer's payment reached the seller already (tx "
                       f"{preflight.paid_by}): accepted as paid by it")
    try:
        with transaction.atomic():
            return _direct_payment_start(agreement_id, preflight)
    except ApplicationError as refused:  # the queue's check of the wallet's payments under way
        return _direct_payment_start(agreement_id, preflight.refused(refused.code, refused.message))


def agreement_expire_unfunded(*, agreement_id, reason: str, code: str) -> UsageAgreement | None:
    """An accepted agreement whose escrow was never funded in time becomes `expired` (e.g. a Masumi purchase
    past its payByTime). A no-op once it is funded, being funded or closed. `code`: the agreement's status_code."""
    with transaction.atomic():
        agreement = _lock(agreement_id)
        if not can_activate(agreement):
            return None
        return _transition(agreement_id, to=S.EXPIRED, actor=SYSTEM, reason=reason, code=code)


# Statuses no proxied call is billed in again (none leads back to active): a stored reply of such an agreement
# replays nothing a retry could be charged for (reservation_take bills only an active agreement, and a usage event is
# unique per nonce).
_CALLS_ENDED_STATUSES = frozenset({S.SETTLED, S.REFUNDED})
_REPLAYS_PURGE_TURN = "purge-proxy-replays"


def proxy_replays_purge(*, now: datetime | None = None) -> int:
    """Delete the replies stored for X-Request-Nonce retries (up to PROXY_REPLAY_MAX_BYTES each, one per call made
    with a nonce) once no retry could be charged for them, PROXY_REPLAY_KEEP_DAYS on; how many. Those of an
    agreement settled or refunded that long ago (a retry is then 409 `agreement_not_active`), and those of calls not
    charged (a 5xx) stored that long ago, whatever the agreement's status (a retry is then a new call, charged once):
    the proxy no longer stores those (it releases their nonce), but an earlier release did.
    A charged reply of an agreement still open is kept: a retry must replay it. Safe twice, and at once.

    Rows in id order by the primary key, RETENTION_PURGE_BATCH at a time (each batch's deletes committed), at most
    RETENTION_PURGE_BATCHES_PER_RUN batches a run, from where the last run ended (`sweeps.turn_cursor`): a run that
    started from the first row each time read the same kept replies of open agreements at every run, and, bounded,
    never reached the deletable ones after them. The pass ends at the first batch stored within the retention (a
    settled agreement's replies were all stored before its settlement); the next run starts from the first again."""
    cutoff = (now or timezone.now()) - timedelta(days=settings.PROXY_REPLAY_KEEP_DAYS)
    # By the partial unique index on (agreement, request_nonce), which a nonce's condition selects.
    charged = UsageEvent.objects.filter(agreement_id=OuterRef("agreement_id"), request_nonce=OuterRef("request_nonce")
                                        ).exclude(request_nonce="")
    old = ProxyReplay.objects.filter(created_at__lt=cutoff)
    # Two statements, not one with OR: each rule is then a join the planner reads by index.
    expired = (old.filter(agreement__status__in=_CALLS_ENDED_STATUSES, agreement__settled_at__lt=cutoff),
               old.filter(status_code__isnull=False).exclude(Exists(charged)))
    deleted, size, after = 0, settings.RETENTION_PURGE_BATCH, sweeps.turn_cursor(_REPLAYS_PURGE_TURN) or 0
    for _ in range(settings.RETENTION_PURGE_BATCHES_PER_RUN):
        rows = list(ProxyReplay.objects.filter(pk__gt=after).order_by("pk").values_list("pk", "created_at")[:size])
        # The rule again on delete: a reorg may have reopened a settlement meanwhile.
        deleted += sum(rule.filter(pk__in=[pk for pk, _ in rows]).delete()[0] for rule in expired)
        after = rows[-1][0] if len(rows) == size and rows[0][1] < cutoff else 0
        sweeps.turn_cursor_keep(_REPLAYS_PURGE_TURN, after or None)
        if not after:
            break
    return deleted
