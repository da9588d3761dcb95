"""x402 payments on-chain: checks against the chain, execution through the relayer, and the treasury's payouts.

- Checks: agreements.x402_protocol does everything that needs no chain; here the authorization's transfer is
  simulated (`eth_call` of `transferWithAuthorization` from the relayer) with the x402 package's facilitator
  helpers, which name the failure (nonce already used, balance too low, expired).
- Skill invocations (see agreements.invocations for the flow): the authorization pays the treasury (the relayer
  wallet); `invocation_pay` records it and queues `invocation_payment`; a confirmed payment lets the invocation
  run; its end queues `invocation_payout` (token.transfer to the seller) or `invocation_refund` (to the payer), sent
  once the payment's block is final under PAYOUT_HEAD_TAG (`_invocation_payment_block`, see escrow.relayer).
- Direct payments (see agreements.services): on accept, a simulation first (a payment that cannot run fails with
  nothing taken), then `direct_fee_permit` (the buyer's EIP-2612 permit, spender the relayer), `direct_fee`
  (transferFrom buyer -> fee recipient), `direct_payment` (the x402 authorization, buyer -> seller). When the
  payment fails after the fee was taken, `direct_fee_refund` returns the fee from the treasury (once: see
  `_direct_fee_refund_when_due`). Once the purchase is off, `direct_authorization_cancel` relays the buyer's signed
  `cancelAuthorization` (`direct_auth_cancel`), so the authorization can no longer move the buyer's money.
Every movement is one ChainTransaction; each is queued once, by the state change that calls for it.
"""

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

from django.conf import settings
from django.db import transaction
from django.db.models import QuerySet
from eth_utils import to_checksum_address
from x402.mechanisms.evm import constants as evm
from x402.mechanisms.evm.erc6492 import parse_erc6492_signature
from x402.mechanisms.evm.exact.eip3009_utils import (
    ParsedEIP3009Authorization,
    parse_eip3009_transfer_error,
    simulate_eip3009_transfer_result,
)
from x402.mechanisms.evm.utils import hex_to_bytes

from agreements import selectors as agreement_selectors
from agreements import services as agreement_services
from agreements.models import InvocationMoney, SkillInvocation, UsageAgreement
from catalog.models import Agent, Skill
from escrow import chain, chain_clock, relayer, selectors, services
from escrow.models import ChainTransaction, TxPurpose, TxStatus
from marketplace import chainconfig
from marketplace.errors import Conflict, DependencyUnavailable, PaymentRequired, TooManyRequests
from sdk import typed_data

logger = logging.getLogger(__name__)

# How long an invocation's authorization must stay valid: time to get it mined, with room to spare.
INVOCATION_AUTHORIZATION_SECONDS = 300


class ChainReader:
    """The read side of x402's `FacilitatorEvmSigner` over our chain gateway; the platform never lets x402 send
    transactions (the relayer does, exactly once)."""

    def get_addresses(self) -> list[str]:
        return [chainconfig.relayer_address()]

    def read_contract(self, address: str, abi: list, function_name: str, *args):
        contract = chain.w3().eth.contract(address=to_checksum_address(address), abi=abi)
        call = getattr(contract.functions, function_name)(*args).call
        try:
            return chain.call(lambda: call({"from": chainconfig.relayer_address()}))
        except chain.Reverted as reverted:
            # x402 recognises reverts by this wording, and the failure by the reason after it.
            raise RuntimeError(f"execution reverted: {reverted.reason}") from reverted

    def get_code(self, address: str) -> bytes:
        return bytes(chain.call(lambda: chain.w3().eth.get_code(to_checksum_address(address))))


def _require_chain() -> None:
    if not (chainconfig.usdc_address() and chainconfig.relayer_address()):
        raise DependencyUnavailable("No token or relayer is configured on this marketplace.",
                                    code="chain_not_configured")


def simulate(authorization: agreement_services.Authorization) -> None:
    """Raise InvalidPayment when `transferWithAuthorization` would revert now (used nonce, low balance, ...); 503
    `chain_unavailable` when the node gives no verdict (no answer, an error of its own)."""
    parsed = ParsedEIP3009Authorization(
        from_address=to_checksum_address(authorization.payer), to=to_checksum_address(authorization.pay_to),
        value=authorization.amount, valid_after=authorization.valid_after, valid_before=authorization.valid_before,
        nonce=hex_to_bytes(authorization.nonce))
    with chain.unavailable_as_503():
        ok, error = simulate_eip3009_transfer_result(ChainReader(), chainconfig.usdc_address(), parsed,
                                                     parse_erc6492_signature(hex_to_bytes(authorization.signature)))
    if ok:
        return
    # x402 hands back what the read raised (a multicall wraps it). A revert reaches it as the RuntimeError
    # `ChainReader.read_contract` makes of it (its cause the Reverted); any other chain error is the node's (no answer, a
    # JSON-RPC error of its own, a malformed answer): no verdict. Taken for one, a provider's -32603 failed a direct
    # purchase at its accept for good.
    if any(isinstance(raised, chain.ChainError) and not isinstance(raised, chain.Reverted)
           for raised in (error, error.__cause__)):
        raise chain.unavailable() from error
    reason = parse_eip3009_transfer_error(error)
    if reason == evm.ERR_TRANSACTION_FAILED:
        reason = evm.ERR_TRANSACTION_SIMULATION_FAILED
    raise agreement_services.simulation_rejection(reason, f"The payment would not execute: {error}")


# --- calldata ------------------------------------------------------------------------------------------------

def _transfer_with_authorization_data(authorization) -> str:
    v, r, s = typed_data.split_signature(authorization.signature)
    return chain.token_contract().encode_abi("transferWithAuthorization", args=[
        to_checksum_address(authorization.payer), to_checksum_address(authorization.pay_to),
        int(authorization.amount), int(authorization.valid_after), int(authorization.valid_before),
        hex_to_bytes(authorization.nonce), v, hex_to_bytes(r), hex_to_bytes(s)])


def _transfer_data(to: str, amount: int) -> str:
    return chain.token_contract().encode_abi("transfer", args=[to_checksum_address(to), amount])


def _enqueue_transfer_from_treasury(*, purpose: str, to: str, amount: int, agreement_id=None,
                                    context: dict | None = None) -> ChainTransaction:
    return relayer.transaction_enqueue(purpose=purpose, to=chainconfig.usdc_address(),
                                       data=_transfer_data(to, amount), agreement_id=agreement_id,
                                       context={"to": to, "amount": amount, **(context or {})})


def transaction_await(*, transaction_id, timeout: float) -> ChainTransaction:
    """Submit now (a no-op if a worker already did) and follow the transaction until it is confirmed or failed,
    or `timeout` seconds pass. For a caller that answers when the money has moved."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            relayer.transaction_submit(transaction_id=transaction_id)
            relayer.transaction_check(transaction_id=transaction_id)
        except chain.ChainError:
            # The node timed out or answered an error of its own (a provider's JSON-RPC error): the payment is
            # recorded and queued already, so the caller is answered with its invocation; the worker's submit task
            # and the confirmation poll retry it.
            pass
        tx = ChainTransaction.objects.get(pk=transaction_id)
        if tx.status in (TxStatus.CONFIRMED, TxStatus.FAILED) or time.monotonic() >= deadline:
            return tx
        time.sleep(0.2)


# --- skill invocations -----------------------------------------------------------------------------------------

def invocation_requirements(skill: Skill):
    """What the skill's 402 asks for, bound to the skill (every skill pays the same treasury). They name the token's
    EIP-712 domain, read from the token once per process: 503 while the node does not answer."""
    _require_chain()
    with chain.unavailable_as_503():
        return agreement_services.invocation_payment_requirements(
            skill, pay_to=chainconfig.relayer_address(), max_timeout_seconds=INVOCATION_AUTHORIZATION_SECONDS)


def invocation_payment_required(skill: Skill, *, holder: str, absolute_url: Callable[[str], str], error: str):
    """The skill's 402 (`PaymentRequired` body and headers, its resource's URL made by `absolute_url`), its
    authorization quoted for `holder` valid from the chain's clock (`chain_clock.quote_clock`): the token checks the
    window by it, and a quote counted from our clock, behind the chain's by more than the window, had expired on the
    chain when handed out."""
    requirements = invocation_requirements(skill)
    return agreement_services.payment_required_quote(
        requirements, holder=holder, url=absolute_url(requirements.extra["resource"]),
        description=skill.description or skill.name, error=error, now=chain_clock.quote_clock())


@dataclass(frozen=True)
class SignedPayment:
    """What a paid request carries: the payment header, and for a bare signature who pays and who was quoted."""

    header: str
    payer: str | None = None  # the calling agent's wallet, else X-Payment-From
    holder: str = ""  # whom the 402 quoted (agreements' x402 quote)
    retry_proof: str = ""  # an anonymous payer's retry: its signature proving the payment is its own


def invocation_pay(*, skill: Skill, buyer: Agent | None, input: dict, payment: SignedPayment, client: str = ""
                   ) -> tuple[SkillInvocation, ChainTransaction]:
    """Check the signed payment (raises InvalidPayment, nothing recorded) and that the buyer party may still invoke
    this seller (`invocation_failures_check`: its payer is known now), record the invocation and queue the payment
    to the treasury. `client`: the network the call came from, an anonymous payer's (no `buyer`) relay budget
    (`relayer.relay_budget_check`) and failed invocations' bound."""
    requirements = invocation_requirements(skill)
    authorization = agreement_services.payment_verify(
        payment.header, requirements, payer=payment.payer, holder=payment.holder,
        chain_clock=chain_clock.signature_window_clock,
        is_retry=lambda seen: agreement_services.invocation_is_retry(seen, buyer=buyer, input=input,
                                                                   retry_proof=payment.retry_proof))
    agreement_services.invocation_failures_check(seller=skill.service.seller, buyer=buyer, payer=authorization.payer,
                                                 client=client)
    payer = relayer.relay_payer(agent=buyer, wallet=authorization.payer, client=client)
    relayer.relay_budget_check(payer)
    with chain.unavailable_as_503():
        balance = chain.call(chain.token_contract().functions.balanceOf(to_checksum_address(authorization.payer)).call)
    simulate(authorization)
    with transaction.atomic():
        # The buyer's row lock (its owner policy's check) before the wallet's, as an accept or activation takes them.
        invocation = agreement_services.invocation_create(skill=skill, buyer=buyer, input=input,
                                                          authorization=authorization, client=client)
        _payments_in_flight_check(authorization, balance=balance)
        tx = relayer.transaction_enqueue(
            purpose=TxPurpose.INVOCATION_PAYMENT, to=chainconfig.usdc_address(),
            data=_transfer_with_authorization_data(authorization), context={"invocation_id": str(invocation.pk)},
            relayed_for=payer)
    return invocation, tx


def _payments_in_flight_check(authorization, *, balance: int) -> None:
    """Inside the transaction queueing the payment: `services.wallet_balance_require` (the payer's other payments not
    mined yet counted against `balance`, read before, under the wallet's lock), refused as an x402 payment is (402
    `insufficient_balance` with `details.committed`, answered with a fresh quote). Skills are paid in the default
    token."""
    try:
        services.wallet_balance_require(wallet=authorization.payer, balance=balance, required=authorization.amount)
    except PaymentRequired as short:
        raise agreement_services.InvalidPayment(short.code, short.message, details=short.details) from short


@dataclass(frozen=True)
class InvocationOutcome:
    invocation: SkillInvocation
    payment_failure: str = ""  # the payment did not execute (nothing was charged, the seller was not called)
    in_background: bool = False  # a worker runs it: async skill, payment still confirming, beyond the inline bounds


def invocation_invoke(*, skill: Skill, buyer: Agent | None, input: dict, payment: SignedPayment,
                      wait_seconds: float, client: str = "") -> InvocationOutcome:
    """Pay (see `invocation_pay`), wait up to `wait_seconds` for the payment to confirm, then run a sync skill
    here within the inline bounds (`invocation_run_paid`); an async skill, a payment still confirming, or a sync
    skill beyond those bounds is left to a worker."""
    invocation, tx = invocation_pay(skill=skill, buyer=buyer, input=input, payment=payment, client=client)
    tx = transaction_await(transaction_id=tx.pk, timeout=wait_seconds)
    invocation.refresh_from_db()
    paid = invocation.money == InvocationMoney.HELD  # our transaction, or a copy someone else got mined first
    if tx.status == TxStatus.FAILED and not paid:
        return InvocationOutcome(invocation, payment_failure=tx.failure_reason or "reverted")
    if not paid or skill.is_async:
        agreement_services.invocation_run_in_background(invocation_id=invocation.pk)
        invocation.refresh_from_db()
        return InvocationOutcome(invocation, in_background=True)
    invocation = agreement_services.invocation_run_paid(invocation_id=invocation.pk,
                                                        timeout_seconds=skill.timeout_seconds)
    return InvocationOutcome(invocation, in_background=invocation.run_in_background)


def _invocation_id(tx: ChainTransaction):
    return tx.context["invocation_id"]


def _invocation_payment_evidence(tx: ChainTransaction) -> dict:
    """A payment that reverted may have run all the same: anyone who saw the relayer's pending transaction can
    submit the authorization first, and the price is then in the treasury. The copy's block is named
    (relayer.EVIDENCE_BLOCK): a reorg that takes it reopens the payment, which is then sent again."""
    if tx.status == TxStatus.CONFIRMED:
        return {}
    invocation = SkillInvocation.objects.select_related("authorization").get(pk=_invocation_id(tx))
    authorization = invocation.authorization
    if not _authorization_spent(authorization):  # read once per poll of the watch, before any log search
        return {"used_by": None}
    if use := _spent_authorization_use(authorization):
        return use
    if not invocation.authorization_closed_by and (closed_by := _authorization_closed_by(authorization)):
        # Nobody can get it mined any more: its price stops counting against the buyer's caps before its validBefore.
        agreement_services.invocation_payment_authorization_closed(invocation_id=invocation.pk, closed_by=closed_by)
    return {"used_by": None}


def _paid_by(tx: ChainTransaction) -> str | None:
    """The hash of the transaction whose transfer paid: ours once confirmed, else whoever used the authorization
    first (`_authorization_use`, read as the outcome's evidence); None when no transfer ran."""
    return tx.mined_tx_hash if tx.status == TxStatus.CONFIRMED else tx.outcome_evidence.get("used_by")


def _invocation_payment_outcome(tx: ChainTransaction) -> None:
    if paid_by := _paid_by(tx):
        agreement_services.invocation_payment_confirmed(invocation_id=_invocation_id(tx), tx_hash=paid_by)
        return
    agreement_services.invocation_payment_failed(invocation_id=_invocation_id(tx), reason=tx.failure_reason)
    _invocation_settlement_withdraw(_invocation_id(tx))


def _invocation_settlement_withdraw(invocation_id) -> None:
    """The payment failed after the invocation's payout or refund was queued (a reorg took it, and it could not run
    again): the treasury never received what that would send, so it is withdrawn unless concluded already (see
    `relayer.transaction_withdraw`): one signed already has its nonce cancelled by a nonce fill, whose outcome says
    whether its bytes ran all the same (`_settlement_cancelled`). The reverted payment records the rest for an
    operator."""
    live = ChainTransaction.objects.filter(
        purpose__in=[TxPurpose.INVOCATION_PAYOUT, TxPurpose.INVOCATION_REFUND],
        status__in=[TxStatus.QUEUED, TxStatus.SUBMITTED, TxStatus.MINED],
        context__invocation_id=str(invocation_id)).values_list("pk", flat=True)
    for settlement_id in live:
        relayer.transaction_withdraw(transaction_id=settlement_id,
                                     reason="the payment it would forward was taken off the chain by a reorg")


def _invocation_payment_reopened(tx: ChainTransaction) -> None:
    agreement_services.invocation_payment_reopened(invocation_id=_invocation_id(tx), tx_hash=_paid_by(tx))


def _invocation_settlement_reopened(tx: ChainTransaction) -> None:
    agreement_services.invocation_settlement_reopened(invocation_id=_invocation_id(tx), tx_hash=tx.mined_tx_hash)


def _invocation_settle(invocation: SkillInvocation) -> None:
    payout = invocation.money == InvocationMoney.PAYING_OUT
    _enqueue_transfer_from_treasury(
        purpose=TxPurpose.INVOCATION_PAYOUT if payout else TxPurpose.INVOCATION_REFUND,
        to=invocation.seller_wallet_address if payout else invocation.authorization.payer,
        amount=agreement_selectors.invocation_seller_share(invocation) if payout else invocation.amount,
        context={"invocation_id": str(invocation.pk), **({"fee": invocation.fee} if payout else {})})


def _invocation_payment_block(tx: ChainTransaction) -> tuple[int, str] | None:
    """The block of the payment whose money the payout or refund `tx` forwards (relayer.finality_wait_register): ours
    confirmed, or someone else's copy of its authorization that paid in its place (the failed payment's evidence);
    None while the chain has neither at the confirmation depth (a reorg reopened the payment)."""
    for payment in ChainTransaction.objects.filter(purpose=TxPurpose.INVOCATION_PAYMENT,
                                                   context__invocation_id=tx.context["invocation_id"]):
        if payment.status == TxStatus.CONFIRMED:
            return payment.mined_block_number, payment.mined_block_hash
        copy = payment.outcome_evidence.get(relayer.EVIDENCE_BLOCK)
        if payment.status == TxStatus.FAILED and copy is not None:
            return copy["number"], copy["hash"]
    return None


def _settlement_outcome(record):
    def outcome(tx: ChainTransaction) -> None:
        if tx.status == TxStatus.CONFIRMED:
            record(invocation_id=_invocation_id(tx), tx_hash=tx.mined_tx_hash)
        else:  # the treasury could not pay (e.g. out of gas money): an operator retries it from the admin
            logger.error("treasury transfer failed", extra={"tx_id": str(tx.pk), "purpose": tx.purpose,
                                                            "reason": tx.failure_reason})
    return outcome


def _settlement_cancelled(tx: ChainTransaction, *, ran_as: str | None) -> None:
    """A payout or refund withdrawn when its payment was found reverted (or a failed one superseded since a reorg took
    its block) is cancelled for good: its own old bytes ran in its nonce fill's place (anyone holding them could send
    them first), and it is recorded as made, by the hash the chain has (reconcile reports the fill until an operator
    acknowledges it); or nothing of it ran, and unless another pays it, the invocation is told
    (`invocation_settlement_withdrawn`: nothing will leave the treasury, or, the payment found on the chain again
    meanwhile, the run's end is settled anew). Told again when a deep reorg took the fill's block and it is concluded
    anew (a payout recorded made by those old bytes moved back first: `relayer.nonce_fill_reopened`)."""
    invocation_id = _invocation_id(tx)
    if ran_as:
        agreement_services.invocation_cancelled_settlement_ran(
            invocation_id=invocation_id, tx_hash=ran_as, refund=tx.purpose == TxPurpose.INVOCATION_REFUND)
    elif not ChainTransaction.objects.filter(
            purpose__in=[TxPurpose.INVOCATION_PAYOUT, TxPurpose.INVOCATION_REFUND],
            context__invocation_id=str(invocation_id)).exclude(pk=tx.pk).exclude(status=TxStatus.FAILED).exists():
        # Nothing else pays it (an operator's retry of a superseded one would): the invocation decides.
        agreement_services.invocation_settlement_withdrawn(invocation_id=invocation_id)


# --- direct payments -----------------------------------------------------------------------------------------

@chain.unavailable_as_503()
def _direct_payment_preflight(agreement: UsageAgreement) -> agreement_services.DirectPaymentPreflight:
    """Whether an accepted direct payment can run, asked of the chain (registered with agreements, which calls it
    before locking the agreement): the payment's simulation, the fee permit's nonce, the buyer's balance. An
    authorization a transfer used as it says before the accept (anyone may send it, the buyer too) is this purchase's
    payment, made (`paid_by`): the purchase goes on with the fee, and its payment step concludes on that transfer once
    it is at the confirmation depth, as on a copy mined after the accept. A node that does not answer, or answers no
    verdict (`_authorization_use`), is 503: nothing is decided (the accept's purchase stays proposed)."""
    _require_chain()
    paid_by = None

    def cannot_run(code: str, message: str) -> agreement_services.DirectPaymentPreflight:
        return agreement_services.DirectPaymentPreflight(None, paid_by=paid_by).refused(code, message)

    try:
        relayer.relay_budget_check(_buyer_payer(agreement))
    except TooManyRequests as exhausted:
        return cannot_run(exhausted.code, exhausted.message)
    buyer = to_checksum_address(agreement.buyer_wallet_address)
    token = chain.token_contract()
    authorization = agreement_selectors.payment_authorization_of(agreement=agreement)
    try:
        simulate(authorization)
    except agreement_services.InvalidPayment as invalid:
        paid_by = (_authorization_use(authorization) or {}).get("used_by")
        if paid_by is None:
            return cannot_run(invalid.code, invalid.message)
    permit = agreement.fee_permit
    nonce = chain.call(token.functions.nonces(buyer).call)
    front_run = permit["nonce"] < nonce and _relayer_allowance(buyer) >= agreement.infra_fee
    if permit["nonce"] != nonce and not front_run:  # a permit someone else submitted granted the allowance
        return cannot_run("fee_permit_stale", f"the fee permit's nonce is {permit['nonce']}, the token's is now {nonce}")
    balance = chain.call(token.functions.balanceOf(buyer).call)
    required = _direct_payment_required(agreement, paid_by=paid_by)
    if balance < required:
        return cannot_run("insufficient_balance", f"the buyer holds {balance}, needs {required}")
    return agreement_services.DirectPaymentPreflight(None, buyer_balance=balance, paid_by=paid_by)


def _direct_payment_made_by(agreement: UsageAgreement, *, confirmed: bool = False) -> str | None:
    """The transfer that used a direct purchase's payment authorization as it says (`_authorization_use`), else None
    (registered with agreements, which asks it before a seller's reject). `confirmed`: only one mined at the
    confirmation depth, which no reorg the platform waits out takes back. A node that does not answer is 503."""
    _require_chain()
    with chain.unavailable_as_503():
        return (_authorization_use(agreement_selectors.payment_authorization_of(agreement=agreement),
                                   confirmed=confirmed) or {}).get("used_by")


def _direct_payment_required(agreement: UsageAgreement, *, paid_by: str | None) -> int:
    """What the buyer's wallet must hold for the purchase: its fee, and its price unless paid already."""
    return agreement.infra_fee + (0 if paid_by else agreement.deposit_amount)


def _direct_payment_queue(agreement: UsageAgreement, preflight: agreement_services.DirectPaymentPreflight) -> None:
    """Queue the fee permit, the first of a direct payment's transactions (in the accept's DB transaction), unless
    the buyer's balance read at the preflight does not cover its fee and payment besides the wallet's other payments
    under way (`services.wallet_balance_require`: 402 insufficient_balance, the accept rolled back). A purchase whose
    balance alone falls short failed at the preflight already."""
    services.wallet_balance_require(wallet=agreement.buyer_wallet_address, balance=preflight.buyer_balance,
                                    required=_direct_payment_required(agreement, paid_by=preflight.paid_by),
                                    token=agreement.token_address, exclude_agreement=agreement.pk)
    buyer = to_checksum_address(agreement.buyer_wallet_address)
    permit = agreement.fee_permit
    v, r, s = typed_data.split_signature(permit["signature"])
    data = chain.token_contract().encode_abi("permit", args=[
        buyer, to_checksum_address(chainconfig.relayer_address()), permit["value"], permit["deadline"], v,
        hex_to_bytes(r), hex_to_bytes(s)])
    relayer.transaction_enqueue(purpose=TxPurpose.DIRECT_FEE_PERMIT, to=chainconfig.usdc_address(), data=data,
                                agreement_id=agreement.pk, relayed_for=_buyer_payer(agreement))


def _buyer_payer(agreement: UsageAgreement) -> relayer.RelayPayer:
    """Who a direct purchase's relayed transactions are charged to: its buyer, paying from the agreement's wallet."""
    return relayer.relay_payer(agent=agreement.buyer, wallet=agreement.buyer_wallet_address)


def _agreement(tx: ChainTransaction) -> UsageAgreement:
    return agreement_selectors.agreement_get(agreement_id=tx.agreement_id, agent=None)


def _direct_fee_permit_evidence(tx: ChainTransaction) -> dict:
    """A fee permit that reverted: someone may have submitted it first (it is public once broadcast), which
    granted the relayer the allowance all the same. Read from the token, outside any DB transaction."""
    if tx.status == TxStatus.CONFIRMED:
        return {}
    agreement = _agreement(tx)
    allowance = _relayer_allowance(agreement.buyer_wallet_address)
    return {"allowance": allowance, relayer.DONE_BY_ANOTHER: allowance >= agreement.infra_fee,
            **_direct_fee_evidence(tx)}


def _direct_fee_evidence(tx: ChainTransaction) -> dict:
    """A fee step that failed, of a purchase whose price reached the seller already (the buyer, or anyone holding the
    authorization, sent it before the accept or since): that transfer (`paid_by`), for the failure to name and count
    it, read at the confirmation depth (a use at the chain's head a reorg may take, named, stayed named for good). A
    step refused at its simulation is asked first, still queued: a use of the authorization not yet that deep (its
    EVIDENCE_BLOCK) holds it queued until it is (`relayer._done_by_a_copy_not_deep_yet`), then it is concluded naming
    the use, or simulated again (and may run) when a reorg took it."""
    if tx.status == TxStatus.CONFIRMED:
        return {}
    authorization = agreement_selectors.payment_authorization_of(agreement=_agreement(tx))
    if tx.status == TxStatus.QUEUED:
        use = _authorization_use(authorization) or {}
        return {relayer.EVIDENCE_BLOCK: use[relayer.EVIDENCE_BLOCK]} if use else {}
    return {"paid_by": (_authorization_use(authorization, confirmed=True) or {}).get("used_by")}


def _relayer_allowance(buyer: str) -> int:
    """What the buyer's token allowance lets the relayer (the platform treasury) collect."""
    return chain.call(chain.token_contract().functions.allowance(
        to_checksum_address(buyer), to_checksum_address(chainconfig.relayer_address())).call)


def _direct_fee_permit_outcome(tx: ChainTransaction) -> None:
    front_run = tx.outcome_evidence.get("allowance", 0) >= _agreement(tx).infra_fee
    if tx.status != TxStatus.CONFIRMED and not front_run:
        agreement_services.agreement_direct_payment_failed(
            agreement_id=tx.agreement_id, paid_by=(paid_by := tx.outcome_evidence.get("paid_by")),
            code="fee_permit_reverted",
            reason=f"fee permit reverted{'' if paid_by else ', nothing was charged'}: {tx.failure_reason}")
        return
    agreement = _agreement(tx)
    _direct_step_enqueue(agreement, TxPurpose.DIRECT_FEE, chain.token_contract().encode_abi("transferFrom", args=[
        to_checksum_address(agreement.buyer_wallet_address), to_checksum_address(agreement.fee_recipient),
        agreement.infra_fee]))


def _direct_step_enqueue(agreement: UsageAgreement, purpose: str, data: str) -> None:
    """Queue a direct purchase's next transaction, unless it is under way or done: after a reorg the step before it
    is concluded again, and the next one, reopened too, is the same transaction sent again."""
    if selectors.live_transaction(agreement_id=agreement.pk, purpose=purpose) is None:
        relayer.transaction_enqueue(purpose=purpose, to=chainconfig.usdc_address(), data=data,
                                    agreement_id=agreement.pk,
                                    relayed_for=_buyer_payer(agreement))


def _direct_fee_outcome(tx: ChainTransaction) -> None:
    if tx.status != TxStatus.CONFIRMED:
        agreement_services.agreement_direct_payment_failed(
            agreement_id=tx.agreement_id, paid_by=(paid_by := tx.outcome_evidence.get("paid_by")),
            code="fee_collection_reverted",
            reason=f"fee collection reverted{'' if paid_by else ', nothing was charged'}: {tx.failure_reason}")
        return
    agreement_services.agreement_direct_fee_collected(agreement_id=tx.agreement_id, tx_hash=tx.mined_tx_hash)
    agreement = _agreement(tx)
    _direct_step_enqueue(agreement, TxPurpose.DIRECT_PAYMENT,
                         _transfer_with_authorization_data(agreement.payment_authorization))


def _authorization_spent(authorization) -> bool:
    """The token's `authorizationState`: whether the authorization was used or cancelled. Read before its logs, so
    that an unused one costs no log search."""
    token = chain.token_contract()
    return chain.call(token.functions.authorizationState(to_checksum_address(authorization.payer),
                                                         hex_to_bytes(authorization.nonce)).call)


def _proposed_authorization_spent(authorization) -> bool:
    """`_authorization_spent` of a direct proposal's payment, before it is recorded; 503 when the node does not
    answer."""
    _require_chain()
    with chain.unavailable_as_503():
        return _authorization_spent(authorization)


def _authorization_use(authorization, *, confirmed: bool = False) -> dict | None:
    """The transaction that used the x402 authorization (its transfer ran: AuthorizationUsed), as evidence: its
    hash (`used_by`) and block (relayer.EVIDENCE_BLOCK); None when none did (unused, or closed:
    `_authorization_closed_by`). Anyone holding it may submit it. See `_spent_authorization_use`."""
    return _spent_authorization_use(authorization, confirmed=confirmed) if _authorization_spent(authorization) else None


def _spent_authorization_use(authorization, *, confirmed: bool = False) -> dict | None:
    """`_authorization_use` of an authorization the token counts spent (`_authorization_spent`): its logs are read,
    newest first, so the search ends at the span that holds the latest of them (not a scan from the deployment
    block). `confirmed`: the logs up to the block CHAIN_CONFIRMATIONS deep only (a use in a newer block is None
    until it is that deep).

    Spent, with neither event found up to the head the node names, is no answer (UntrustedAnswer): the state and the
    head came from two backends of a provider's pool, the head's behind the use, or the node prunes old logs. Taken
    for "none", it failed a purchase the buyer had paid as "nothing charged", and recorded a used authorization
    cancelled, ending its watch. `confirmed` alike: none at the depth is None only when one is found above it (a use
    not that deep yet); else the closed proposals' watch ended on it, a use whose logs were pruned taken for none."""
    found = _authorization_logs(authorization, confirmed=confirmed)
    if not found and (not confirmed or not _authorization_logs(authorization, confirmed=False)):
        raise chain.UntrustedAnswer("the token counts the authorization spent, but the node shows no use nor cancel of "
                                    "it up to the head it names (a backend behind, or old logs pruned)")
    if not found or _topic_of(found[-1]) != chain.event_topic(chain.token_contract().events.AuthorizationUsed()) \
            or not _transferred_as_authorized(found[-1], authorization):
        return None
    latest = found[-1]
    return {"used_by": _hex32(latest["transactionHash"]),
            relayer.EVIDENCE_BLOCK: {"number": latest["blockNumber"], "hash": _hex32(latest["blockHash"])}}


def _authorization_logs(authorization, *, confirmed: bool) -> list:
    """The span of the token's AuthorizationUsed and AuthorizationCanceled logs of the authorization's payer and nonce
    that holds the latest of them, oldest first (`chain.first_logs`); `confirmed`: up to the block CHAIN_CONFIRMATIONS
    deep only."""
    token = chain.token_contract()
    payer, nonce = to_checksum_address(authorization.payer), hex_to_bytes(authorization.nonce)
    return chain.first_logs(
        address=token.address, topics=[[chain.event_topic(token.events.AuthorizationUsed()),
                                        chain.event_topic(token.events.AuthorizationCanceled())],
                                       chain.address_topic(payer), "0x" + nonce.hex()],
        from_block=chainconfig.escrow_deployment_block(),
        to_block=chain.latest_block_number() - (max(settings.CHAIN_CONFIRMATIONS, 1) - 1 if confirmed else 0),
        newest_first=True)


def _authorization_closed_by(authorization) -> str | None:
    """Of an authorization the token counts spent (`_authorization_spent`): the transaction that closed it without its
    transfer, if the latest of its logs at the confirmation depth is such a one: the payer's cancelAuthorization
    (AuthorizationCanceled), or another transfer it signed under the same nonce (an AuthorizationUsed that did not
    move what the authorization says: `_transferred_as_authorized`). None while it is used as authorized, or closed
    in a block a reorg may still take, or no log of it is found: a spent nonce whose use is not found is never
    closed (the node answering the logs may be behind the one that answered `authorizationState`, a load-balanced
    provider, or prune old logs)."""
    found = _authorization_logs(authorization, confirmed=True)
    if not found:
        return None
    latest = found[-1]
    if _topic_of(latest) == chain.event_topic(chain.token_contract().events.AuthorizationUsed()) and \
            _transferred_as_authorized(latest, authorization):
        return None
    return _hex32(latest["transactionHash"])


def _transferred_as_authorized(used_log, authorization) -> bool:
    """Whether the use `used_log` (an AuthorizationUsed) moved what the authorization says. The event names the payer
    and the nonce only, and the payer may sign another transfer under the same nonce (to a wallet of its own, or a
    smaller amount) and get it mined first: the token marks the nonce used alike, and the relayer's copy reverts, but
    nothing reached payTo. EIP-3009's token emits the transfer's Transfer right after AuthorizationUsed. The use's
    block is read by its hash (`chain.block_logs`), which a node without that block refuses: asked by number, a
    backend behind answered it empty, and the use was taken for a transfer elsewhere (none)."""
    token = chain.token_contract()
    transfer = [chain.event_topic(token.events.Transfer()), chain.address_topic(authorization.payer),
                chain.address_topic(authorization.pay_to)]
    transfers = [log for log in chain.block_logs(block_hash=_hex32(used_log["blockHash"]), addresses=[token.address])
                 if [chain.hex_text(topic).lower() for topic in log["topics"][:3]] == transfer]
    return any(log["transactionHash"] == used_log["transactionHash"] and log["logIndex"] == used_log["logIndex"] + 1
               and int.from_bytes(bytes(log["data"]), "big") == int(authorization.amount) for log in transfers)


def _hex32(value) -> str:
    return "0x" + bytes(value).hex().removeprefix("0x")


def _topic_of(log) -> str:
    return "0x" + bytes(log["topics"][0]).hex().removeprefix("0x")


def _direct_payment_evidence(tx: ChainTransaction) -> dict:
    """A payment that reverted may have run all the same, sent by someone else holding the authorization. The copy's
    block is named (relayer.EVIDENCE_BLOCK): a reorg that takes it reopens the payment, which is then sent again."""
    if tx.status == TxStatus.CONFIRMED:
        return {}
    authorization = agreement_selectors.payment_authorization_of(agreement=_agreement(tx))
    return _authorization_use(authorization) or {"used_by": None}


def _direct_payment_refusal_charged(tx: ChainTransaction) -> bool:
    """A payment refused at the relayer's simulation after the fee was taken is the buyer's doing (it cancelled the
    authorization, moved its funds), unless the authorization ran out while the relayer was getting to it."""
    authorization = agreement_selectors.payment_authorization_of(agreement=_agreement(tx))
    # The node's pending time as it answers it, bounded by nothing (not `next_block_clock_for_refusal`, nor
    # `chain_clock`'s CHAIN_CLOCK_MAX_LEAD_SECONDS): its estimate ran in that pending block, so one answering a time
    # past validBefore refused the payment as expired by its own clock. In doubt the buyer is not charged: a
    # misbehaving node costs the relayer one purchase's gas; a charge would refuse an honest buyer.
    return chain.next_block_timestamp() < authorization.valid_before


def _direct_payment_outcome(tx: ChainTransaction) -> None:
    if paid_by := _paid_by(tx):
        agreement_services.agreement_direct_paid(agreement_id=tx.agreement_id, tx_hash=paid_by)
        # Found used after it failed (a copy mined later): the fee's refund not yet made is withdrawn, the fee kept
        # as for any paid purchase; one made already stands (the platform bore the fee).
        _direct_fee_refund_withdraw(tx.agreement_id, reason="the failed payment it refunds the fee of was made later")
        return
    agreement_services.agreement_direct_payment_failed(
        agreement_id=tx.agreement_id, code="payment_reverted",
        reason=f"x402 payment reverted; the fee is refunded: {tx.failure_reason}")
    _direct_fee_refund_when_due(tx.agreement_id)


def _direct_fee_refund_when_due(agreement_id) -> None:
    """Queue the fee's refund of a direct purchase whose payment failed for good, as the agreement says
    (`agreement_direct_fee_refund_due`), once the chain has the fee: not a fee it does not have (a reorg took its
    collection too), nor twice (a refund under way or done), nor while one cancelled when a reorg reopened the payment
    may still run in its nonce fill's place: the fill's outcome decides (`_direct_fee_refund_cancelled`)."""
    agreement = agreement_services.agreement_direct_fee_refund_due(agreement_id=agreement_id)
    if agreement is None:
        return
    fee = selectors.live_transaction(agreement_id=agreement_id, purpose=TxPurpose.DIRECT_FEE)
    if (fee is None or fee.status != TxStatus.CONFIRMED
            or selectors.live_transaction(agreement_id=agreement_id, purpose=TxPurpose.DIRECT_FEE_REFUND)
            or selectors.cancelled_may_still_run(agreement_id=agreement_id, purpose=TxPurpose.DIRECT_FEE_REFUND)):
        return
    _enqueue_transfer_from_treasury(purpose=TxPurpose.DIRECT_FEE_REFUND, to=agreement.buyer_wallet_address,
                                    amount=agreement.infra_fee, agreement_id=agreement_id)


# How long after an authorization's validBefore (by the chain's clock) a failed payment is still looked for: a use
# mined just before it needs the confirmation depth's blocks (10 on Base: about 20 s) and a relayer poll to be found,
# with room to spare for a poll that is late.
LATE_USE_MARGIN_SECONDS = 600


def _payments_failed_watched(of: type[SkillInvocation] | type[UsageAgreement]) -> list:
    return agreement_selectors.payments_failed_watched(
        of=of, usable_after=chain_clock.chain_now() - LATE_USE_MARGIN_SECONDS)


def _invocation_payments_watched() -> QuerySet[ChainTransaction]:
    """Failed payments of invocations whose authorization may yet be found used (relayer.watch_failed)."""
    watched = _payments_failed_watched(SkillInvocation)
    return ChainTransaction.objects.filter(context__invocation_id__in=[str(pk) for pk in watched])


def _direct_payments_watched() -> QuerySet[ChainTransaction]:
    """Failed payments of direct purchases whose authorization may yet be found used."""
    return ChainTransaction.objects.filter(agreement_id__in=_payments_failed_watched(UsageAgreement))


_DIRECT_STEPS = {TxPurpose.DIRECT_FEE_PERMIT: "the fee permit", TxPurpose.DIRECT_FEE: "the fee's collection",
                 TxPurpose.DIRECT_PAYMENT: "the payment"}


def _direct_purchase_reopened(tx: ChainTransaction) -> None:
    """A reorg took a step of a direct purchase (confirmed, or failed on its own or because the authorization was
    used by a copy the reorg took): the purchase goes back to paying while the step is sent again. The fee's refund
    for a failed payment, not concluded (a confirmed one's block the reorg took too, newer: it was reopened first), is
    withdrawn: never sent when still queued, its nonce cancelled by a nonce fill when signed, so that a payment that
    runs now does not leave the buyer its fee as well (`_direct_fee_refund_cancelled` says what came of it). Not
    called when the reorg took only the block of a step that reverted after a copy of the authorization did it: the
    copy, still on the chain, is what the outcome rests on (`relayer._outcome_stands`)."""
    paid_by = _paid_by(tx) if tx.purpose == TxPurpose.DIRECT_PAYMENT else None
    if tx.purpose == TxPurpose.DIRECT_FEE:
        agreement_services.agreement_direct_fee_reopened(agreement_id=tx.agreement_id)
    agreement_services.agreement_direct_payment_reopened(agreement_id=tx.agreement_id, what=_DIRECT_STEPS[tx.purpose],
                                                         tx_hash=paid_by or tx.mined_tx_hash)
    _direct_fee_refund_withdraw(tx.agreement_id, reason=f"a reorg took {_DIRECT_STEPS[tx.purpose]} of the failed "
                                                        "purchase it refunds the fee of")


def _direct_purchase_retry(tx: ChainTransaction) -> None:
    """An operator's retry of a failed step moves the buyer's money again: its owner policy decides now. Not once the
    buyer asked for its payment authorization's cancellation (`direct_authorization_cancel`, under way or done): the
    retry, sent first, would take the fee and pay the seller against the buyer's revocation (409)."""
    agreement_services.agreement_direct_payment_retry_begin(  # locks the agreement
        agreement_id=tx.agreement_id, step=_DIRECT_STEPS[tx.purpose])
    cancel = selectors.live_transaction(agreement_id=tx.agreement_id, purpose=TxPurpose.DIRECT_AUTHORIZATION_CANCEL)
    if cancel is not None:
        raise Conflict("The buyer asked to cancel this purchase's payment authorization: its payment is not sent "
                       "again.", code="payment_authorization_cancelled",
                       details={"cancel_transaction_id": str(cancel.pk)})


def _direct_fee_refund_rerun_wanted(tx: ChainTransaction) -> bool:
    """A failed fee refund is sent again (an operator's retry) only while the agreement says the fee is to go back
    (`agreement_direct_fee_refund_due`, which locks it): a purchase found paid since (its authorization used after
    the payment failed) keeps its fee, and the retry gave it back to the buyer."""
    return agreement_services.agreement_direct_fee_refund_due(agreement_id=tx.agreement_id) is not None


def _direct_fee_refund_withdraw(agreement_id, *, reason: str) -> None:
    """The fee's refund not concluded yet is withdrawn: never sent when still queued, its nonce cancelled by a nonce
    fill when signed (`_direct_fee_refund_cancelled` says what came of it). One confirmed stands."""
    refund = selectors.live_transaction(agreement_id=agreement_id, purpose=TxPurpose.DIRECT_FEE_REFUND)
    if refund is not None:
        relayer.transaction_withdraw(transaction_id=refund.pk, reason=reason)


def _direct_fee_refund_outcome(tx: ChainTransaction) -> None:
    if tx.status == TxStatus.CONFIRMED:
        agreement_services.agreement_direct_fee_refunded(agreement_id=tx.agreement_id, amount=tx.context["amount"])
    else:
        logger.error("fee refund failed", extra={"tx_id": str(tx.pk), "reason": tx.failure_reason})


def _direct_fee_refund_reopened(tx: ChainTransaction) -> None:
    """A reorg took the refund's block (or, of one cancelled, that of its old bytes which ran in its nonce fill's place:
    `relayer.nonce_fill_reopened`): the fee is not back with the buyer on the new branch until a refund runs again."""
    if tx.status == TxStatus.CONFIRMED:
        agreement_services.agreement_direct_fee_refund_reopened(agreement_id=tx.agreement_id)


def _direct_fee_refund_cancelled(tx: ChainTransaction, *, ran_as: str | None) -> None:
    """The nonce fill that took the nonce of a refund withdrawn when a reorg reopened its payment is concluded (or the
    refund, never signed, was withdrawn). The refund's old bytes ran in its place (anyone holding them could send them
    first): the fee is back with the buyer, shown as such, on a purchase perhaps paid since (the platform bore the
    fee; reconcile reports the fill until an operator acknowledges it). Else nothing of it ran, and a purchase whose
    payment failed for good gets its refund queued now (none while it is reopened: paying). Told again when a reorg
    took the fill's block and it is concluded anew (what those old bytes did moved back first, if they ran)."""
    if ran_as:
        agreement_services.agreement_direct_fee_refunded(agreement_id=tx.agreement_id, amount=tx.context["amount"])
    else:
        _direct_fee_refund_when_due(tx.agreement_id)


def _direct_fee_block(tx: ChainTransaction) -> tuple[int, str] | None:
    """The block of the fee's collection whose money the refund `tx` gives back (relayer.finality_wait_register); None
    while the chain has none at the confirmation depth (a reorg reopened it: the refund is then withdrawn)."""
    fee = selectors.live_transaction(agreement_id=tx.agreement_id, purpose=TxPurpose.DIRECT_FEE)
    if fee is None or fee.status != TxStatus.CONFIRMED:
        return None
    return fee.mined_block_number, fee.mined_block_hash


def _direct_fee_refund_cancel_undecided(tx: ChainTransaction) -> None:
    """A reorg took the block of the nonce fill that took the nonce of a refund withdrawn when a reorg reopened its
    payment: the refund's old bytes may run in its place now. A refund sent since (the purchase failed for good: that
    block's reorg reopened it too, being later) is withdrawn rather than sent again beside them; the fill's outcome
    decides anew (`_direct_fee_refund_cancelled`)."""
    _direct_fee_refund_withdraw(tx.agreement_id, reason="a reorg took the nonce fill of the refund cancelled before it, "
                                                        "whose old bytes may run")


# --- a closed direct purchase's authorization, cancelled for the buyer -----------------------------------------

def direct_authorization_cancel(*, agreement: UsageAgreement, buyer: Agent, signature: str) -> ChainTransaction:
    """Relay the buyer's signed EIP-3009 `cancelAuthorization` of its direct purchase's payment authorization, once
    the purchase is off (agreements checks who, when, and the signature): no one holding the authorization can then
    move the buyer's money. Asked again, the cancellation under way or done is answered. An authorization the token
    counts used or cancelled already is 409 `authorization_already_used` (nothing to cancel), naming the transaction
    that used it (`used_by`: its transfer to the seller ran with no purchase; logged as an error), else null. One
    the token would refuse otherwise is 409 `transaction_would_revert` (`relayer.transaction_preflight`)."""
    _require_chain()
    authorization = agreement_services.agreement_payment_authorization_cancel_check(
        agreement=agreement, buyer=buyer, signature=signature)
    live = selectors.live_transaction(agreement_id=agreement.pk, purpose=TxPurpose.DIRECT_AUTHORIZATION_CANCEL)
    if live is not None:
        return live
    # Not refused by, nor charged to, the relay budget (relayer.relay_budget_check): the buyer's defence of its money,
    # once per purchase (a revert's cause, a use of the authorization, makes the next ask 409). An authorization only
    # the platform ever held (its payment never sent) costs the buyer nothing to sign and cancel again and again:
    # those cancels are bounded per buyer (relayer.relay_cancel_budget_check); past it the buyer sends its own. One
    # whose payment was sent is public (the mempool, a reverted transaction's calldata): relayed whatever the count.
    token = chain.token_contract(agreement.payment_authorization.token_address)
    payer, nonce = to_checksum_address(authorization.payer), hex_to_bytes(authorization.nonce)
    with chain.unavailable_as_503():
        spent = _authorization_spent(authorization)
    if spent:
        # Used (the transfer to the seller ran, sent by whoever held it: no purchase paid it), or closed already.
        with chain.unavailable_as_503():
            used_by = (_spent_authorization_use(authorization) or {}).get("used_by")
            closed_by = None if used_by else _authorization_closed_by(authorization)
        if used_by:
            logger.error("a closed direct purchase's payment authorization was used",
                         extra={"agreement_id": str(agreement.pk), "tx_hash": used_by})
        elif closed_by:  # by the buyer itself: recorded, its failed payment's price no longer held against its caps
            agreement_services.agreement_payment_authorization_found_closed(agreement_id=agreement.pk,
                                                                            closed_by=closed_by)
        raise Conflict("The payment authorization was used or cancelled already.", code="authorization_already_used",
                       details={"used_by": used_by})
    # After the used check: a buyer past the budget still learns its authorization was used (409, `used_by`).
    budgeted = not selectors.transaction_signed(agreement_id=agreement.pk, purpose=TxPurpose.DIRECT_PAYMENT)
    if budgeted:  # refused before the chain is asked; counted again in the buyer's turn, as it is queued
        relayer.relay_cancel_budget_check(_buyer_payer(agreement), purpose=TxPurpose.DIRECT_AUTHORIZATION_CANCEL)
    v, r, s = typed_data.split_signature(signature)
    data = token.encode_abi("cancelAuthorization", args=[payer, nonce, v, hex_to_bytes(r), hex_to_bytes(s)])
    relayer.transaction_preflight(to=token.address, data=data)  # e.g. the token paused: 409, nothing queued
    with transaction.atomic():
        agreement_services.agreement_payment_authorization_cancel_begin(agreement_id=agreement.pk)
        live = selectors.live_transaction(agreement_id=agreement.pk, purpose=TxPurpose.DIRECT_AUTHORIZATION_CANCEL)
        if live is not None:
            return live
        if budgeted:
            relayer.relay_cancel_budget_check(_buyer_payer(agreement), purpose=TxPurpose.DIRECT_AUTHORIZATION_CANCEL)
        return relayer.transaction_enqueue(purpose=TxPurpose.DIRECT_AUTHORIZATION_CANCEL, to=token.address,
                                           data=data, agreement_id=agreement.pk, cancel_for=_buyer_payer(agreement))


def _direct_authorization_cancel_evidence(tx: ChainTransaction) -> dict:
    """A cancellation that reverted: the authorization was used, by whom, or cancelled by whom (`CANCELLED_BY`)."""
    if tx.status == TxStatus.CONFIRMED:
        return {}
    authorization = agreement_selectors.payment_authorization_of(agreement=_agreement(tx))
    return _authorization_use(authorization) or _authorization_cancel(authorization) or {"used_by": None}


def _authorization_cancel(authorization) -> dict | None:
    """The transaction that cancelled the authorization, when the latest of its logs is an AuthorizationCanceled (the
    buyer's signed cancel: ours, copied from the pending transaction and mined first by anyone, or one the buyer sent
    itself), as evidence of a cancellation of ours that reverted: it was done all the same (relayer.DONE_BY_ANOTHER),
    in that block (relayer.EVIDENCE_BLOCK: a reorg that takes it reopens ours, sent again)."""
    found = _authorization_logs(authorization, confirmed=False)
    if not found or _topic_of(found[-1]) != chain.event_topic(chain.token_contract().events.AuthorizationCanceled()):
        return None
    latest = found[-1]
    return {CANCELLED_BY: _hex32(latest["transactionHash"]), relayer.DONE_BY_ANOTHER: True,
            relayer.EVIDENCE_BLOCK: {"number": latest["blockNumber"], "hash": _hex32(latest["blockHash"])}}


# The evidence key of a cancellation of ours that reverted because the authorization was cancelled by another
# transaction first: that transaction's hash.
CANCELLED_BY = "cancelled_by"


def _direct_authorization_cancel_outcome(tx: ChainTransaction) -> None:
    if tx.status == TxStatus.CONFIRMED or tx.outcome_evidence.get(CANCELLED_BY):
        agreement_services.agreement_payment_authorization_cancelled(
            agreement_id=tx.agreement_id, tx_hash=tx.mined_tx_hash if tx.status == TxStatus.CONFIRMED
            else tx.outcome_evidence[CANCELLED_BY])
    else:
        agreement_services.agreement_payment_authorization_cancel_failed(
            agreement_id=tx.agreement_id, reason=tx.failure_reason, used_by=tx.outcome_evidence.get("used_by"))


def _direct_authorization_cancel_reopened(tx: ChainTransaction) -> None:
    """A reorg took the cancellation's block (ours, or the copy of it that outran ours), or, of one a use outran, that
    use's block: what it recorded is undone.
    Not called when only the block of the cancellation that reverted after the use was taken: the use stands
    (`relayer._outcome_stands`; the cancellation, sent again, fails again)."""
    if tx.status == TxStatus.CONFIRMED or tx.outcome_evidence.get(CANCELLED_BY):
        agreement_services.agreement_payment_authorization_cancel_reopened(agreement_id=tx.agreement_id)
    elif used_by := tx.outcome_evidence.get("used_by"):
        agreement_services.agreement_payment_authorization_use_reopened(agreement_id=tx.agreement_id, used_by=used_by)


def handlers_register() -> None:
    """Called once, from EscrowConfig.ready()."""
    agreement_services.token_domain_reader_register(reader=chain.token_domain)
    agreement_services.settlement_handler_register(handler=_invocation_settle)
    agreement_selectors.finality_wait_reader_register(reader=selectors.finality_waits)
    agreement_services.direct_payment_executor_register(check=_direct_payment_preflight, queue=_direct_payment_queue)
    agreement_services.payment_authorization_use_reader_register(reader=_direct_payment_made_by)
    agreement_services.authorization_spent_reader_register(reader=_proposed_authorization_spent)
    agreement_services.chain_clock_reader_register(reader=chain_clock.chain_now,
                                                   next_block_reader=chain_clock.signature_window_clock)
    relayer.outcome_handler_register(purpose=TxPurpose.INVOCATION_PAYMENT, on_outcome=_invocation_payment_outcome,
                                     read_evidence=_invocation_payment_evidence,
                                     on_reopened=_invocation_payment_reopened,
                                     watch_failed=_invocation_payments_watched)
    for purpose, record in ((TxPurpose.INVOCATION_PAYOUT, agreement_services.invocation_paid_out),
                            (TxPurpose.INVOCATION_REFUND, agreement_services.invocation_refunded)):
        relayer.outcome_handler_register(purpose=purpose, on_outcome=_settlement_outcome(record),
                                         on_reopened=_invocation_settlement_reopened,
                                         on_cancelled=_settlement_cancelled)
        relayer.finality_wait_register(purpose=purpose, spent_block=_invocation_payment_block)
    relayer.outcome_handler_register(purpose=TxPurpose.DIRECT_FEE_PERMIT, on_outcome=_direct_fee_permit_outcome,
                                     read_evidence=_direct_fee_permit_evidence, on_reopened=_direct_purchase_reopened,
                                     on_retry=_direct_purchase_retry)
    relayer.outcome_handler_register(purpose=TxPurpose.DIRECT_FEE, on_outcome=_direct_fee_outcome,
                                     read_evidence=_direct_fee_evidence, on_reopened=_direct_purchase_reopened, on_retry=_direct_purchase_retry,
                                     refusal_charged=lambda tx: True)
    relayer.outcome_handler_register(purpose=TxPurpose.DIRECT_PAYMENT, on_outcome=_direct_payment_outcome,
                                     read_evidence=_direct_payment_evidence, on_reopened=_direct_purchase_reopened,
                                     on_retry=_direct_purchase_retry, watch_failed=_direct_payments_watched,
                                     refusal_charged=_direct_payment_refusal_charged)
    relayer.outcome_handler_register(purpose=TxPurpose.DIRECT_FEE_REFUND, on_outcome=_direct_fee_refund_outcome,
                                     on_reopened=_direct_fee_refund_reopened, on_cancelled=_direct_fee_refund_cancelled,
                                     rerun_wanted=_direct_fee_refund_rerun_wanted,
                                     on_cancel_undecided=_direct_fee_refund_cancel_undecided)
    relayer.finality_wait_register(purpose=TxPurpose.DIRECT_FEE_REFUND, spent_block=_direct_fee_block)
    relayer.outcome_handler_register(purpose=TxPurpose.DIRECT_AUTHORIZATION_CANCEL,
                                     on_outcome=_direct_authorization_cancel_outcome,
                                     read_evidence=_direct_authorization_cancel_evidence,
                                     on_reopened=_direct_authorization_cancel_reopened)
