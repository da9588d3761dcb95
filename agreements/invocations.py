"""Skill invocations: `POST /agents/{handle}/{skill}` paid with x402, read back at `GET /services/{invocation_id}`.

Where the money goes (the escrow app moves it; see escrow.x402_onchain): the buyer's EIP-3009 authorization pays the
platform treasury (the relayer wallet, `payTo` of the 402), not the seller. The treasury forwards the price to
the seller once the invocation completed, and refunds the buyer when it failed or timed out; each movement is
its own relayer ChainTransaction. So a failed call is refunded without the seller's cooperation, and a seller is
paid only for work delivered.

    money:  authorized -> held -> paying_out -> paid_out
                               -> refunding  -> refunded
            authorized -> payment_failed            (the authorization did not execute: nothing charged)
    status: pending -> processing -> completed | failed | timeout
            pending -> failed                        (payment failed; the seller is never called)

A reorg deeper than the confirmation depth can take a confirmed payment, payout or refund off the chain; the
relayer sends it again (see escrow.relayer). Meanwhile a payment not run on yet goes back to authorized (held ->
authorized: the seller is called only on a payment the chain has) and a payout or refund back to paying_out or
refunding. A payment that then cannot run again after the seller was called (the buyer's funds spent on the new
branch, the authorization expired) leaves the treasury holding nothing for the invocation: `payment_reverted_at`
records it for an operator, money still held becomes payment_failed (so nothing is paid out or refunded), a payout
or refund not yet confirmed is withdrawn (payment_failed too once nothing of it ran: a signed one's nonce goes to a
nonce fill first), and what was paid out or refunded (its signed bytes too, when mined in the fill's place) came
from the treasury's own funds (only with the escrow app's PAYOUT_HEAD_TAG empty: under it a payout or refund is sent
once its payment's block is final, so a reorg finds it unsent). Found on the chain after all (another reorg,
or a copy of the authorization mined since), the reversal is cleared and the money is held again, or the run's
end settled now (`_reverted_payment_recovered`).

Never twice: the authorization's nonce is unique in the database (a replay is refused before any chain call);
`status` and `money` change only under a row lock from the expected value; the seller is called only by whoever
moves pending -> processing (one conditional UPDATE); a payout or refund is queued only on the single
held -> paying_out | refunding change.
"""

import logging
import math
import time
import uuid
from collections.abc import Callable
from datetime import datetime, timedelta

import httpx
from django.conf import settings
from django.core import checks
from django.core.exceptions import ImproperlyConfigured
from django.db import transaction
from django.db.models import F, Q
from django.utils import timezone

from agreements import x402_protocol
from agreements.models import (
    NO_PAYMENT_REVERSAL,
    InvocationMoney,
    InvocationSellerFailure,
    InvocationStatus,
    SkillInvocation,
)
from catalog.models import Agent, Skill
from marketplace import bounded_json, money, outbound, outbound_slots, rotation, sweeps
from marketplace.concurrency import Bulkhead
from marketplace.errors import Conflict, NotFound, TooManyRequests
from sdk import proxy_signature

logger = logging.getLogger(__name__)

Status, Money = InvocationStatus, InvocationMoney
SettlementHandler = Callable[[SkillInvocation], None]
_settlement_handler: list[SettlementHandler] = []

# Seller URLs are chosen by sellers: every connection passes the SSRF guard. Each call passes the skill's timeout.
_client = outbound.guarded_client(timeout=httpx.Timeout(30.0, connect=5.0),
                                  limits=httpx.Limits(max_connections=100, max_keepalive_connections=20))


def settlement_handler_register(*, handler: SettlementHandler) -> None:
    """`handler(invocation)` queues the payout (money paying_out) or refund (refunding), inside the transaction
    that made the change. Registered by the escrow app."""
    _settlement_handler[:] = [handler]


def settlement_handler_check(app_configs=None, **kwargs) -> list[checks.CheckMessage]:
    """System check: a paid invocation's payout or refund has someone to queue it."""
    if _settlement_handler:
        return []
    return [checks.Error("No invocation settlement handler is registered with agreements.", obj=__name__,
                         id="agreements.E002", hint="The escrow app registers it in EscrowConfig.ready().")]


def invocation_price(skill: Skill) -> int:
    return skill.price if skill.price is not None else skill.service.unit_price


def invocation_resource(skill: Skill) -> str:
    """The skill's x402 resource: the path it is invoked at, which its payments are bound to."""
    return f"/agents/{skill.service.seller.handle}/{skill.name}"


def invocation_payment_requirements(skill: Skill, *, pay_to: str, max_timeout_seconds: int):
    """What the skill's 402 asks for: its price, to `pay_to`, bound to the skill's resource."""
    return x402_protocol.payment_requirements(amount=invocation_price(skill), pay_to=pay_to,
                                             max_timeout_seconds=max_timeout_seconds,
                                             resource=invocation_resource(skill))


def invocation_fee(*, amount: int) -> int:
    """The platform's take on a skill invocation: the fee schedule's percentage and fixed part, as on a direct
    purchase, at least INVOCATION_FEE_MINIMUM_ATOMIC. `GET /payment-requirements?purpose=skill_invocation` quotes it.

    Why: each invocation costs the relayer two transactions' gas (the payment to the treasury, then the payout or
    refund). Without a fee a 1-base-unit skill an owner both sells and buys had the relayer pay that gas for nothing.
    The x402 "exact" payment moves exactly the price the skill lists, so the fee is cut from the seller's payout
    (price - fee: the treasury keeps it) and a price the fee would take whole is refused (`invocation_priced_check`).
    The minimum is its own setting, not the fee schedule's (0.10 USDC, sized for agreements): skills are
    micro-payments (the demo's cost 0.02 USDC). A failed or timed-out invocation refunds the whole price: the buyer
    did nothing wrong, and the platform bears that gas as it did (the rate limits and the relay budget bound it, and
    per buyer party the failures it may cause: `invocation_failures_check`)."""
    from agreements.models import FeeSchedule

    schedule, _ = FeeSchedule.objects.get_or_create(pk=1)
    percent = -(-amount * schedule.percent_bps // 10_000)  # integer ceiling, as `services.fee_for`
    return max(percent + schedule.fixed_atomic, settings.INVOCATION_FEE_MINIMUM_ATOMIC)


def invocation_priced_check(skill: Skill) -> tuple[int, int]:
    """The skill's price and fee, before anything is quoted or paid: 400 `amount_too_large` for a price above the
    platform's ceiling (lowered since it was published), 409 `skill_not_priced` for a free skill (x402
    pays positive amounts only), 409 `skill_price_below_fee` for one the fee would take whole (the seller would be
    paid nothing and the relayer pay the gas)."""
    price = invocation_price(skill)
    if not price:
        raise Conflict("This skill has no price: x402 pays positive amounts only.", code="skill_not_priced")
    money.amount_within_limit(price)
    return price, invocation_fee_above_price(price=price)


def invocation_fee_above_price(*, price: int) -> int:
    """The fee on a skill priced `price`; 409 `skill_price_below_fee` when it would take the price whole (what the
    skill route refuses, and `GET /payment-requirements?purpose=skill_invocation` quotes)."""
    fee = invocation_fee(amount=price)
    if price <= fee:
        raise Conflict(f"This skill's price, {price} base units, is not above the platform's fee on it, {fee}: the "
                       "seller must price it higher.", code="skill_price_below_fee",
                       details={"price_atomic": price, "fee_atomic": fee})
    return fee


def invocation_failures_check(*, seller: Agent, buyer: Agent | None, payer: str = "", client: str = "") -> None:
    """Before anything is quoted or paid: a buyer party with INVOCATION_FAILURES_PER_BUYER_SELLER invocations of
    `seller` failed within INVOCATION_FAILURE_WINDOW (`InvocationSellerFailure`: refunded whole, both transactions'
    gas the relayer's), or INVOCATION_FAILURES_PER_BUYER of every seller's together (a seller under many identities),
    is 429 `seller_failing_for_you` until the oldest of those leaves the window (`details.retry_after_seconds`,
    Retry-After; `details.bound`: seller or buyer). Else an owner whose seller agent always fails, called by its own
    buyer agents, had the relayer pay that gas for nothing at RATE_LIMIT_PAYMENTS per agent.

    The party is the buyer agent's owner (its agents together: creating agents does not multiply the bound) and the
    paying wallet (`payer`, whoever paid from it: an anonymous payer, unknown until it signs), as the relay budget
    counts them; an anonymous payer's also per `client` network (IPv6: its /64), since fresh wallets cost nothing. Counted per party, never per seller alone: a buyer whose input makes a seller fail
    stops only its own calls, not the seller's other buyers'. A 429 as `relay_budget_exhausted`: a budget of the
    caller's is spent, the seller is not unavailable."""
    party = Q()
    if buyer is not None:
        party |= Q(buyer_owner_id=buyer.owner_id)
    if payer:
        party |= Q(payer=payer)
    if buyer is None and client:
        party |= Q(anonymous_client=client)
    if not party:
        return
    now, window = timezone.now(), settings.INVOCATION_FAILURE_WINDOW
    failures = InvocationSellerFailure.objects.filter(party, failed_at__gt=now - window)
    bounds = (("seller", failures.filter(seller=seller), settings.INVOCATION_FAILURES_PER_BUYER_SELLER),
              ("buyer", failures, settings.INVOCATION_FAILURES_PER_BUYER))
    for bound, counted, allowed in bounds:
        if allowed <= 0:
            continue
        recent = list(counted.order_by("-failed_at").values_list("failed_at", flat=True)[:allowed])
        if len(recent) < allowed:
            continue
        retry_after = max(1, math.ceil((recent[-1] + window - now).total_seconds()))
        whose = "this seller's skills" if bound == "seller" else "skills"
        raise TooManyRequests(
            f"{allowed} of your invocations of {whose} failed within {int(window.total_seconds())} s and were "
            f"refunded, at the platform's gas: you may invoke {whose} again once the oldest is out of that window.",
            code="seller_failing_for_you", retry_after=retry_after,
            details={"bound": bound, "failures": allowed, "retry_after_seconds": retry_after})


PAYMENT_REVERTED = "payment_reverted"


def invocation_payment_status(invocation: SkillInvocation) -> str:
    """Where the buyer's payment is, as the API shows it: its money state, or payment_reverted once a reorg took
    a payment the seller was called on (whatever the treasury paid out or refunded, the buyer paid nothing)."""
    return PAYMENT_REVERTED if invocation.payment_reverted_at else invocation.money


def invocation_seller_share(invocation: SkillInvocation) -> int:
    """What the treasury forwards to the seller once the invocation completed."""
    return invocation.amount - invocation.fee


def invocation_pk(public_id: str) -> uuid.UUID | None:
    """The key a public id `inv_<hex>` names, or None when it is not one."""
    try:
        return uuid.UUID(public_id.removeprefix("inv_"))
    except ValueError:
        return None


def invocation_get(*, public_id: str) -> SkillInvocation:
    """By its public id `inv_<hex>` (unguessable: whoever holds it may read the invocation)."""
    pk = invocation_pk(public_id)
    invocation = SkillInvocation.objects.select_related("skill").filter(pk=pk).first() if pk else None
    if invocation is None:
        raise NotFound("No such invocation.", code="invocation_not_found")
    return invocation


def invocation_is_retry(invocation: SkillInvocation, *, buyer: Agent | None, input: dict,
                        retry_proof: str = "") -> bool:
    """Whether a call paying with `invocation`'s authorization again is its caller's retry (its answer lost), which
    may learn the invocation's id: the same input, from the same buyer agent (its API key), or anonymously with the
    payer's `retry_proof` (x402_protocol.RETRY_PROOF_HEADER, signed by the paying wallet's key). The signed payment
    proves nothing: the payment's transaction shows it whole to anyone. Nor does the caller's network: a shared NAT
    or proxy puts strangers on it."""
    if invocation.input != input or invocation.buyer_id != (buyer.pk if buyer else None):
        return False
    return buyer is not None or x402_protocol.retry_proof_valid(invocation.authorization, retry_proof)


def invocation_create(*, skill: Skill, buyer: Agent | None, input: dict, authorization: x402_protocol.Authorization,
                      client: str = "") -> SkillInvocation:
    """Record the invocation, its fee (frozen now: `invocation_priced_check`) and its authorization (a replayed nonce
    raises InvalidPayment). `client`: the caller's network, kept for an anonymous payer (invocation_failures_check).
    Call inside the transaction that queues the payment."""
    _, fee = invocation_priced_check(skill)
    record = x402_protocol.authorization_record(authorization)
    return SkillInvocation.objects.create(
        skill=skill, seller=skill.service.seller, buyer=buyer, input=input, authorization=record,
        amount=authorization.amount, fee=fee, seller_wallet_address=skill.service.seller.wallet_address,
        is_async=skill.is_async, run_in_background=skill.is_async, timeout_seconds=skill.timeout_seconds,
        anonymous_client=client if buyer is None else "",
    )


def _lock(invocation_id) -> SkillInvocation:
    return SkillInvocation.objects.select_for_update().select_related("authorization").get(pk=invocation_id)


def _run_after_commit(invocation_id) -> None:
    from agreements.tasks import run_invocation

    # robust: with the broker down the caller still gets its answer; the sweep runs the paid invocation (orphans).
    transaction.on_commit(lambda: run_invocation.delay(str(invocation_id)), robust=True)


# --- payment outcomes (called by the escrow app) -------------------------------------------------------------

def invocation_payment_confirmed(*, invocation_id, tx_hash: str) -> None:
    """The payment ran (`tx_hash` moved the money). Applied again after a reorg took it off the chain, to an
    invocation that went on meanwhile: it only names the transaction that paid on the new branch, which may be
    another (a copy of the authorization someone else got mined first). One that had failed before the seller was
    called is refunded (`_late_payment_refund`); one recorded reverted is paid again (`_reverted_payment_recovered`)."""
    invocation = _lock(invocation_id)
    if invocation.payment_reverted_at is not None:
        _reverted_payment_recovered(invocation, tx_hash=tx_hash)
        return
    if invocation.money == Money.PAYMENT_FAILED:
        _late_payment_refund(invocation, tx_hash=tx_hash)
        return
    if invocation.money != Money.AUTHORIZED:
        if invocation.payment_tx_hash not in ("", tx_hash):
            logger.warning("invocation payment confirmed again by another transaction",
                           extra={"invocation_id": invocation.public_id, "tx_hash": tx_hash,
                                  "replaced_tx_hash": invocation.payment_tx_hash})
            invocation.payment_tx_hash = tx_hash
            invocation.save(update_fields=["payment_tx_hash", "updated_at"])
        return
    invocation.money, invocation.paid_at, invocation.payment_tx_hash = Money.HELD, timezone.now(), tx_hash
    invocation.save(update_fields=["money", "paid_at", "payment_tx_hash", "updated_at"])
    if invocation.run_in_background:
        _run_after_commit(invocation.pk)


def _late_payment_refund(invocation: SkillInvocation, *, tx_hash: str) -> None:
    """A payment that failed before the seller was called ran after all (a reorg took the block where it reverted,
    and its bytes ran on the new branch; a copy of its authorization mined later, by anyone holding it, once the
    buyer held funds; or an operator's retry): the buyer was told nothing was charged, and may
    have paid for another call since, so the invocation stays failed and the treasury refunds the price."""
    logger.warning("a failed invocation payment ran after all: refunded",
                   extra={"invocation_id": invocation.public_id, "tx_hash": tx_hash})
    invocation.money, invocation.paid_at, invocation.payment_tx_hash = Money.REFUNDING, timezone.now(), tx_hash
    invocation.error = f"{invocation.error} (it ran after all, and is refunded)"[:500]
    invocation.save(update_fields=["money", "paid_at", "payment_tx_hash", "error", "updated_at"])
    _settle(invocation)


def _reverted_payment_recovered(invocation: SkillInvocation, *, tx_hash: str) -> None:
    """A payment recorded reverted is on the chain after all, at the confirmation depth (another deep reorg put a
    branch where it ran back, or someone's copy of the authorization was mined since): the treasury has the price,
    so the reversal (and any acknowledgement of it) no longer holds. Money it had stopped becomes what it would
    have been: held while the seller runs, else the run's end is settled now (paid out or refunded); a payout or
    refund that went on meanwhile stands. Recorded again if a reorg takes the payment once more."""
    logger.warning("a reverted invocation payment is on the chain after all: paid again",
                   extra={"invocation_id": invocation.public_id, "tx_hash": tx_hash, "money": invocation.money})
    for name, value in NO_PAYMENT_REVERSAL.items():
        setattr(invocation, name, value)
    invocation.payment_tx_hash, invocation.paid_at = tx_hash, invocation.paid_at or timezone.now()
    settle = invocation.money == Money.PAYMENT_FAILED and invocation.status != Status.PROCESSING
    if invocation.money == Money.PAYMENT_FAILED:  # stopped by the reversal: nothing was paid out or refunded
        invocation.money = _settling(invocation.status) if settle else Money.HELD
    invocation.save(update_fields=[*NO_PAYMENT_REVERSAL, "payment_tx_hash", "paid_at", "money", "updated_at"])
    if settle:
        _settle(invocation)


def invocation_payment_failed(*, invocation_id, reason: str) -> None:
    """The payment did not run: before the seller was called, the invocation fails and nothing was charged; after
    (a reorg took the confirmed payment off the chain and it could not run again), see `_payment_reverted`."""
    invocation = _lock(invocation_id)
    if invocation.money == Money.PAYMENT_FAILED or invocation.payment_reverted_at is not None:
        return  # recorded already (an operator's retry of the failed payment failed too)
    if invocation.status != Status.PENDING:
        _payment_reverted(invocation, reason=reason)
        return
    invocation.money, invocation.status = Money.PAYMENT_FAILED, Status.FAILED
    invocation.error = f"payment failed, nothing was charged: {reason}"[:500]
    invocation.completed_at = timezone.now()
    invocation.save(update_fields=["money", "status", "error", "completed_at", "updated_at"])


def _payment_reverted(invocation: SkillInvocation, *, reason: str) -> None:
    """The seller was called on a payment the chain no longer has: the treasury holds nothing for the invocation.
    A payment still held (the seller running) becomes payment_failed, so the run's end pays nothing out or back; a
    payout or refund not confirmed yet is withdrawn by the escrow app, which says what came of it
    (`invocation_settlement_withdrawn`, or paid out or refunded all the same); what was paid out or refunded came from
    the treasury's own funds. Never run or paid again: recorded for an operator, which reconcile and the dashboard
    show until one acknowledges it."""
    logger.error("a reorg took the payment of an invocation whose seller was called, and it could not run again",
                 extra={"invocation_id": invocation.public_id, "tx_hash": invocation.payment_tx_hash,
                        "money": invocation.money, "reason": reason})
    invocation.payment_reverted_at, invocation.payment_reverted_reason = timezone.now(), reason[:500]
    if invocation.money == Money.HELD:
        invocation.money = Money.PAYMENT_FAILED
    invocation.save(update_fields=["payment_reverted_at", "payment_reverted_reason", "money", "updated_at"])


def invocation_payment_authorization_closed(*, invocation_id, closed_by: str) -> None:
    """The chain shows the authorization of the invocation's failed (or reverted) payment closed at the confirmation
    depth by `closed_by` (the buyer's cancelAuthorization, or another transfer under its nonce): nobody can get it
    mined any more, so its price no longer counts against the buyer's caps (`services._committed_spends_sql`) before
    its validBefore. Recorded once. A reorg deeper than the confirmation depth that took the close is not undone here:
    the watch of failed payments keeps reading the authorization until its validBefore all the same, and a use it finds
    is applied as the payment made, which counts again."""
    SkillInvocation.objects.filter(pk=invocation_id, authorization_closed_by="").update(
        authorization_closed_by=closed_by, updated_at=timezone.now())


def invocation_payment_reopened(*, invocation_id, tx_hash: str) -> None:
    """A reorg took the confirmed payment `tx_hash` off the chain; the relayer sends it again. An invocation not run
    yet waits for it (authorized again: the run claims held invocations only); one run already is left as it is
    until the payment's outcome is applied again."""
    SkillInvocation.objects.filter(pk=invocation_id, status=Status.PENDING, money=Money.HELD,
                                   payment_tx_hash=tx_hash).update(
        money=Money.AUTHORIZED, paid_at=None, payment_tx_hash="", updated_at=timezone.now())


# A paid synchronous invocation runs in the caller's request only for a skill whose limit is at most
# INVOCATION_INLINE_MAX_SECONDS, and while fewer than INVOCATION_INLINE_CONCURRENCY do in this process; otherwise a
# worker of the outbound queue runs it and the caller gets 202 and the status URL. A seller picks its skill's limit
# (up to an hour) and a late answer is refunded: run in the request, slow or dribbling sellers held the web
# server's threads for free.
INLINE_RUNS = Bulkhead("inline invocation", limit="INVOCATION_INLINE_CONCURRENCY")


def invocation_run_paid(*, invocation_id, timeout_seconds: int) -> SkillInvocation:
    """Run a paid synchronous invocation here when the inline bounds allow it (see INLINE_RUNS), else hand it to a
    worker (`run_in_background` set)."""
    if timeout_seconds <= settings.INVOCATION_INLINE_MAX_SECONDS:
        with INLINE_RUNS.slot_if_free() as held:
            if held:
                return invocation_run(invocation_id=invocation_id)
    invocation_run_in_background(invocation_id=invocation_id)
    return SkillInvocation.objects.get(pk=invocation_id)


def invocation_run_in_background(*, invocation_id) -> None:
    """The caller stopped waiting for the payment: a worker runs the invocation once it is paid."""
    with transaction.atomic():
        invocation = _lock(invocation_id)
        invocation.run_in_background = True
        invocation.save(update_fields=["run_in_background", "updated_at"])
        if invocation.money == Money.HELD and invocation.status == Status.PENDING:
            _run_after_commit(invocation.pk)


def invocation_paid_out(*, invocation_id, tx_hash: str) -> None:
    SkillInvocation.objects.filter(pk=invocation_id, money=Money.PAYING_OUT).update(
        money=Money.PAID_OUT, settlement_tx_hash=tx_hash, updated_at=timezone.now())


def invocation_refunded(*, invocation_id, tx_hash: str) -> None:
    SkillInvocation.objects.filter(pk=invocation_id, money=Money.REFUNDING).update(
        money=Money.REFUNDED, settlement_tx_hash=tx_hash, updated_at=timezone.now())


def invocation_cancelled_settlement_ran(*, invocation_id, tx_hash: str, refund: bool) -> None:
    """The payout (or the `refund`) the escrow app cancelled (withdrawn when the invocation's payment was found
    reverted, or superseded) ran all the same: its own old bytes were mined in its nonce fill's place, as `tx_hash`.
    Recorded as made, also when the fill had taken the nonce first and the money was recorded payment_failed then
    (`invocation_settlement_withdrawn`), until a deep reorg took the fill's block and put those bytes in its place."""
    invocation = _lock(invocation_id)
    settling, settled = (Money.REFUNDING, Money.REFUNDED) if refund else (Money.PAYING_OUT, Money.PAID_OUT)
    nothing_ran_recorded = invocation.money == Money.PAYMENT_FAILED and invocation.payment_reverted_at is not None
    if invocation.money != settling and not nothing_ran_recorded:
        return
    invocation.money, invocation.settlement_tx_hash = settled, tx_hash
    invocation.save(update_fields=["money", "settlement_tx_hash", "updated_at"])


def invocation_settlement_withdrawn(*, invocation_id) -> None:
    """The payout or refund withdrawn when the invocation's payment was found reverted ran nothing (never signed, or
    its nonce taken by a nonce fill). With the payment still reverted nothing left the treasury for the invocation and
    nothing will (payment_failed, as a payment reverted while still held). With the payment found on the chain again
    while the fill was undecided (`_reverted_payment_recovered` let the withdrawn one stand then), the treasury holds
    the price after all: the run's end is settled now, anew."""
    invocation = _lock(invocation_id)
    if invocation.money not in (Money.PAYING_OUT, Money.REFUNDING):
        return
    if invocation.payment_reverted_at is None:
        _settle(invocation)
        return
    invocation.money = Money.PAYMENT_FAILED
    invocation.save(update_fields=["money", "updated_at"])


def invocation_settlement_reopened(*, invocation_id, tx_hash: str) -> None:
    """A reorg took the confirmed payout or refund `tx_hash` off the chain; the relayer sends it again: paying out
    (refunding) again until it is confirmed again, and naming no transaction meanwhile."""
    for settled, settling in ((Money.PAID_OUT, Money.PAYING_OUT), (Money.REFUNDED, Money.REFUNDING)):
        SkillInvocation.objects.filter(pk=invocation_id, money=settled, settlement_tx_hash=tx_hash).update(
            money=settling, settlement_tx_hash="", updated_at=timezone.now())


# --- running ---------------------------------------------------------------------------------------------------

def _upstream_request(invocation: SkillInvocation) -> tuple[str, dict]:
    service = invocation.skill.service
    path = invocation.skill.path or f"/{invocation.skill.name}"
    timestamp = int(time.time())
    headers = {
        # Signed as the metered proxy signs its calls (sdk.proxy_signature), with the invocation id in place of
        # the agreement id, so the seller can check the call came from the marketplace and was paid.
        "X-Marketplace-Agreement": invocation.public_id,
        "X-Marketplace-Invocation": invocation.public_id,
        "X-Marketplace-Call-Seq": "1",
        "X-Marketplace-Timestamp": str(timestamp),
        **proxy_signature.signature_headers(
            service.proxy_secret, rotation.previous_secret(service, "proxy_secret"),
            agreement_id=invocation.public_id, call_seq=1, timestamp=timestamp, method="POST", path=path),
    }
    if invocation.buyer_id:
        headers["X-Marketplace-Buyer"] = invocation.buyer.handle
    return service.upstream_base_url.rstrip("/") + path, headers


def call_shares(invocation: SkillInvocation) -> list[tuple[str, int]]:
    """The shares of calls in flight a worker's run of `invocation` takes a slot of (outbound_slots.seller_shares)."""
    return outbound_slots.seller_shares(base_url=invocation.skill.service.upstream_base_url,
                                        owner_id=invocation.seller.owner_id)


def invocation_run_in_worker(*, invocation_id) -> SkillInvocation:
    """An outbound worker's run (`invocation_run`), made only while the seller's host and the seller's owner each
    have fewer than their share of calls in flight (call_shares); otherwise put off (`outbound_slots.put_off_seconds`),
    still pending: a seller whose skill never answers holds at most those shares of the outbound
    workers for its timeout each, not every worker while other sellers' buyers wait."""
    invocation = SkillInvocation.objects.select_related("skill__service", "seller").get(pk=invocation_id)
    if invocation.status != Status.PENDING or invocation.money != Money.HELD:
        return invocation  # nothing to run (invocation_run would do nothing either)
    lease_seconds = invocation.timeout_seconds + settings.OUTBOUND_TASK_TIME_LIMIT_MARGIN_SECONDS
    with outbound_slots.held(call_shares(invocation), lease_seconds=lease_seconds) as held:
        if held:
            return invocation_run(invocation_id=invocation_id)
    from agreements.tasks import run_invocation

    delay = outbound_slots.put_off_seconds(invocation.put_offs)
    # Its message is queued, due then: the sweep does not queue another unless that one is lost.
    SkillInvocation.objects.filter(pk=invocation_id, status=Status.PENDING).update(
        queued_at=timezone.now() + timedelta(seconds=delay), put_offs=F("put_offs") + 1)
    run_invocation.apply_async((str(invocation_id),), countdown=delay)
    return invocation


def invocation_run(*, invocation_id) -> SkillInvocation:
    """pending -> processing, call the seller, then completed | failed | timeout. A no-op unless this call is the
    one that moved it to processing, so it is safe to run twice and concurrently."""
    now = timezone.now()
    invocation = SkillInvocation.objects.select_related("skill__service", "buyer").get(pk=invocation_id)
    claimed = SkillInvocation.objects.filter(pk=invocation_id, status=Status.PENDING, money=Money.HELD).update(
        status=Status.PROCESSING, started_at=now, deadline_at=now + timedelta(seconds=invocation.timeout_seconds),
        updated_at=now)
    if not claimed:
        return SkillInvocation.objects.get(pk=invocation_id)
    url, headers = _upstream_request(invocation)
    try:
        # The skill's limit bounds the whole call (a head or body sent a byte at a time included), not each read.
        with (outbound.deadline(invocation.timeout_seconds),
              _client.stream("POST", url, json={"input": invocation.input}, headers=headers,
                             timeout=httpx.Timeout(invocation.timeout_seconds, connect=5.0)) as response):
            if response.status_code >= 300:
                return _finish(invocation_id, to=Status.FAILED, error=f"the seller answered {response.status_code}")
            result = outbound.json_answer(response, max_bytes=settings.UPSTREAM_ANSWER_MAX_BYTES)
    except httpx.TimeoutException:
        return _finish(invocation_id, to=Status.TIMEOUT, error="the seller did not answer in time")
    except outbound.HTTPX_UNREACHABLE as error:
        return _finish(invocation_id, to=Status.FAILED, error=f"the seller is unreachable: {type(error).__name__}")
    except bounded_json.InvalidJSON as error:
        return _finish(invocation_id, to=Status.FAILED, error=f"the seller's answer is not usable JSON: {error}")
    return _finish(invocation_id, to=Status.COMPLETED, result=result)


def _finish(invocation_id, *, to: str, result=None, error: str = "", seller_failed: bool = True) -> SkillInvocation:
    """processing -> `to`, and queue the payout (completed) or the refund (otherwise) of the held payment. A run that
    did not complete counts against the buyer party (`_seller_failure_record`) unless `seller_failed` is False: the
    sweep's time-out of a run whose worker died (a deploy, a crash), which no call to the seller decided."""
    with transaction.atomic():
        invocation = _lock(invocation_id)
        if invocation.status != Status.PROCESSING:
            return invocation  # timed out meanwhile: the late answer is dropped, the buyer is being refunded
        invocation.status, invocation.result, invocation.error = to, result, error[:500]
        invocation.completed_at = timezone.now()
        settle = invocation.money == Money.HELD  # not when a reorg took the payment meanwhile (payment_failed)
        if settle:
            invocation.money = _settling(to)
        invocation.save(update_fields=["status", "result", "error", "completed_at", "money", "updated_at"])
        if settle:
            _settle(invocation)
            if to != Status.COMPLETED and seller_failed:
                _seller_failure_record(invocation)
    return invocation


def _seller_failure_record(invocation: SkillInvocation) -> None:
    """The seller failed `invocation`, refunded whole: counted against its buyer party (invocation_failures_check)."""
    owner_id = Agent.objects.filter(pk=invocation.buyer_id).values_list("owner_id", flat=True).first()
    InvocationSellerFailure.objects.create(invocation=invocation, seller_id=invocation.seller_id,
                                           buyer_owner_id=owner_id, payer=invocation.authorization.payer,
                                           anonymous_client=invocation.anonymous_client,
                                           failed_at=invocation.completed_at)


def _settling(status: str) -> str:
    """What the money of a run that ended in `status` does: paid out to the seller when completed, else refunded."""
    return Money.PAYING_OUT if status == Status.COMPLETED else Money.REFUNDING


def _settle(invocation: SkillInvocation) -> None:
    """Queue the payout (paying_out) or the refund (refunding) of the money the treasury holds for `invocation`."""
    if not _settlement_handler:
        raise ImproperlyConfigured("No invocation settlement handler is registered: the escrow app registers "
                                   "it in EscrowConfig.ready().")
    _settlement_handler[0](invocation)


# Overdue invocations timed out per run of the sweep; the next run takes up after the last (`sweeps.rows_in_turn`).
INVOCATIONS_TIMED_OUT_PER_RUN = 500


def invocations_sweep(*, now: datetime | None = None) -> dict:
    """The beat task: time out invocations past their deadline (refunded), and have a worker run paid ones whose
    caller went away before running them. One whose time-out raises is logged and skipped, the others done, and
    RowsFailed raised at the end (sweeps.RowFailures): it ended the run at every beat, and none after it was done."""
    now = now or timezone.now()
    overdue = SkillInvocation.objects.filter(status=Status.PROCESSING, deadline_at__lte=now)
    failures, timed_out = sweeps.RowFailures("invocations sweep"), []
    # In turn, not the first of the table's order: as many as a run takes whose time-out always raised were taken at
    # every run, and no other overdue invocation was timed out and refunded.
    for invocation in sweeps.rows_in_turn(overdue.only("pk", "deadline_at"), turn="invocations-sweep:overdue",
                                          by="deadline_at", size=INVOCATIONS_TIMED_OUT_PER_RUN):
        invocation_id = invocation.pk
        with failures.row(invocation_id):
            # A worker's own call ends at the skill's limit and counts a hang then; one still processing here mostly
            # died (a hang the sweep times out first, in the same instant, escapes the count).
            if _finish(invocation_id, to=Status.TIMEOUT, error="exceeded the skill's time limit",
                       seller_failed=False).status == Status.TIMEOUT:
                timed_out.append(invocation_id)
    # One queued here is queued again only once no worker took that message within INVOCATION_ORPHAN_AFTER (lost
    # too): while the outbound queue is behind, each run added the same invocations to it again.
    orphans = list(SkillInvocation.objects.filter(
        Q(queued_at=None) | Q(queued_at__lte=now - settings.INVOCATION_ORPHAN_AFTER),
        status=Status.PENDING, money=Money.HELD, paid_at__lte=now - settings.INVOCATION_ORPHAN_AFTER,
    ).order_by("paid_at").values_list("pk", flat=True)[:500])
    from agreements.tasks import run_invocation

    sweeps.marked_rows_publish(model=SkillInvocation, pks=orphans, marked="queued_at", now=now,
                               publish=run_invocation.delay)
    failures.raise_if_any(applied=len(timed_out) + len(orphans))
    return {"timed_out": len(timed_out), "orphans": len(orphans)}
