"""Escrow activation: the package the buyer signs, off-chain verification, queuing the relayer, outcomes.

Activation intent nonce: the contract's intent nonces are unordered, so the platform derives one per agreement
(`keccak256("activation" ‖ agreementId)`). A reverted activation does not spend it, so re-signing after
`activation_failed` reuses it, and no two agreements can collide. A buyer who revoked it on-chain
(`cancelIntentNonce`) is handed the agreement's next one (`intent_nonce_renew`).

Also operators' acknowledgements of what `reconcile` reports on escrow's rows (`findings_acknowledge`).
"""

from collections.abc import Callable

from django.conf import settings
from django.contrib.auth.base_user import AbstractBaseUser
from django.db import connection, transaction
from django.db.models import QuerySet
from django.utils import timezone
from web3 import Web3

from agreements import services as agreement_services
from agreements.models import UsageAgreement, can_activate
from catalog.models import Agent, Service
from escrow import chain, chain_clock, relayer, selectors
from escrow.models import ChainEvent, ChainTransaction, MasumiPurchase, TxPurpose, TxStatus
from marketplace import chainconfig
from marketplace.chainconfig import receipt_signer_address
from marketplace.errors import Conflict, Forbidden, InvalidInput, PaymentRequired
from marketplace.logging import logs_name_the_agreement
from marketplace.signatures import signer_require
from sdk import typed_data
from sdk.activation import activation_intent_nonce


def intent_nonce(agreement: UsageAgreement) -> int:
    return activation_intent_nonce(agreement.onchain_id, agreement.intent_nonce_round)


def intent_nonce_renew(*, agreement: UsageAgreement) -> UsageAgreement:
    """Before an activation package is handed out: when the buyer cancelled the agreement's intent nonce on-chain
    (`cancelIntentNonce`; used, and no escrow of the buyer's under the agreement's id), the agreement moves to a fresh
    one (`agreement_intent_nonce_renew`), so that the buyer can sign again. A nonce used because its intent funded
    the escrow (relayed by anyone, not indexed yet) is kept. Chain reads before any transaction: one while the nonce
    is unused (every activation), and a used one is read again with the escrow's terms at one block."""
    if not can_activate(agreement):
        return agreement
    selectors.chain_configured_require()
    escrow, buyer = chain.escrow_contract(), Web3.to_checksum_address(agreement.buyer_wallet_address)

    def used(block="latest") -> bool:
        return chain.call(lambda: escrow.functions.intentNonceUsed(buyer, intent_nonce(agreement)).call(
            block_identifier=block))

    with chain.unavailable_as_503():
        if not used():
            return agreement
        block = chain.latest_block_number()
        if not used(block):
            return agreement
        funded = chain.call(lambda: escrow.functions.termsDigest(buyer, agreement.onchain_id).call(
            block_identifier=block))
    if int.from_bytes(funded, "big"):
        return agreement
    with transaction.atomic():
        return agreement_services.agreement_intent_nonce_renew(agreement_id=agreement.pk,
                                                               from_round=agreement.intent_nonce_round)


def escrow_expires_at(agreement: UsageAgreement) -> int:
    """The escrow's expiresAt (unix seconds): the agreement's term rounded down to its second, as its buyer's intent
    carries it."""
    return int(agreement.expires_at.timestamp())


def _intent(agreement: UsageAgreement, deadline: int) -> dict:
    return typed_data.activation_intent(
        chain_id=settings.CHAIN_ID, escrow_address=chainconfig.escrow_address(), agreement_id=agreement.onchain_id,
        buyer=agreement.buyer_wallet_address, seller=agreement.seller_wallet_address,
        token=agreement.token_address or chainconfig.usdc_address(), quantity=agreement.quantity,
        price_per_unit=agreement.price_per_unit, deposit_amount=agreement.deposit_amount,
        infra_fee=agreement.infra_fee, receipt_signer=receipt_signer_address(),
        challenge_window=agreement.challenge_window_seconds, expires_at=escrow_expires_at(agreement),
        terms_hash=agreement.terms_hash, nonce=intent_nonce(agreement), deadline=deadline,
    )


def _permit(agreement: UsageAgreement, *, value: int, nonce: int, deadline: int) -> dict:
    token = agreement.token_address or chainconfig.usdc_address()
    with chain.unavailable_as_503():
        name, version = chain.token_domain(token)
    return typed_data.erc2612_permit(
        chain_id=settings.CHAIN_ID, token_address=token, owner=agreement.buyer_wallet_address,
        spender=chainconfig.escrow_address(), value=value, nonce=nonce, deadline=deadline, token_name=name,
        token_version=version,
    )


def _token_nonce(owner: str, token_address: str | None = None) -> int:
    """The token's EIP-2612 `nonces(owner)`: the nonce the owner's next permit must carry."""
    token = chain.token_contract(token_address)
    with chain.unavailable_as_503():
        return chain.call(token.functions.nonces(Web3.to_checksum_address(owner)).call)


def _permit_nonce(agreement: UsageAgreement) -> int:
    return _token_nonce(agreement.buyer_wallet_address, agreement.token_address or None)


def buyer_permit_nonce(*, buyer: Agent) -> int:
    """The nonce the buyer's next permit of the platform's token carries, for `activation_package` inside a
    transaction: chain reads, so made before it opens (the token's EIP-712 domain, cached once read, as well)."""
    with chain.unavailable_as_503():
        chain.token_domain()
    return _token_nonce(buyer.wallet_address)


def activation_package(*, agreement: UsageAgreement, buyer: Agent, deadline: int | None = None,
                       permit_nonce: int | None = None) -> dict:
    """Everything the buyer signs to activate: the intent and ONE EIP-2612 permit for the deposit plus the fee
    (the contract's combined path: a front-runner who submits the permit only grants the allowance activation
    uses, so it cannot make activation revert).

    `deadline` (unix time) overrides the default signature lifetime, e.g. a Masumi purchase's payByTime;
    `permit_nonce`, the buyer's token nonce read before the caller's transaction opened (`buyer_permit_nonce`)."""
    selectors.chain_configured_require()
    if agreement.buyer_id != buyer.pk:
        raise Forbidden("Only the buyer activates the escrow.", code="buyer_only")
    if not can_activate(agreement):
        raise Conflict(f"Nothing to sign while the agreement is {agreement.status}.", code="invalid_transition",
                       details={"status": agreement.status})
    deadline = deadline or chain_clock.deadline_clock() + settings.ACTIVATION_SIGNATURE_TTL
    return {
        "agreement_id": agreement.pk,
        "onchain_id": agreement.onchain_id,
        "chain_id": settings.CHAIN_ID,
        "escrow_contract": chainconfig.escrow_address(),
        "token_address": agreement.token_address or chainconfig.usdc_address(),
        "deposit_amount_atomic": agreement.deposit_amount,
        "infra_fee_atomic": agreement.infra_fee,
        "deadline": deadline,
        "intent": _intent(agreement, deadline),
        "escrow_permit": _permit(agreement, value=agreement.deposit_amount + agreement.infra_fee,
                                 nonce=_permit_nonce(agreement) if permit_nonce is None else permit_nonce,
                                 deadline=deadline),
        # Only once the buyer cancelled the first nonce: SDKs before 0.4.5 refuse a package with a field they lack.
        **({"intent_nonce_round": agreement.intent_nonce_round} if agreement.intent_nonce_round else {}),
    }


def _allowance(agreement: UsageAgreement) -> int:
    token = chain.token_contract(agreement.token_address or None)
    return chain.call(token.functions.allowance(Web3.to_checksum_address(agreement.buyer_wallet_address),
                                                Web3.to_checksum_address(chainconfig.escrow_address())).call)


@logs_name_the_agreement
def activation_submit(*, agreement: UsageAgreement, buyer: Agent, intent_signature: str, deadline: int,
                      escrow_permit: dict, queued_with: Callable[[], None] | None = None) -> ChainTransaction:
    """Verify the buyer's signatures off-chain, move to `submitting` and queue `activate` for the relayer.

    One permit covers deposit + fee, exactly. A permit whose token nonce is already spent (a front-runner submitted it)
    is accepted while the allowance it granted still covers both: the contract then skips it. An intent nonce the
    buyer revoked on-chain (`cancelIntentNonce`) is replaced first (`intent_nonce_renew`, as the package does), so an
    intent signed under it is refused (`wrong_signer`), not relayed to revert IntentNonceUsed at the relayer's
    expense, as often as it is posted. A buyer whose relayed transactions keep reverting is refused first
    (`relayer.relay_budget_check`). An agreement whose term ended on the chain's clock is 409 `agreement_expired`.

    `queued_with()`: the caller's own writes, made in the transaction that queues the activation, so that they are
    kept exactly when it is (a worker killed once it committed loses neither)."""
    selectors.chain_configured_require()
    if agreement.buyer_id == buyer.pk:  # else refused at agreement_activation_begin
        _purchase_offer_stands(agreement)
    payer = relayer.relay_payer(agent=buyer, wallet=agreement.buyer_wallet_address)
    relayer.relay_budget_check(payer)
    if agreement.buyer_id == buyer.pk:  # else refused at agreement_activation_begin
        agreement = intent_nonce_renew(agreement=agreement)
    # Not the node's pending time alone: one it answers in the future refused a valid activation as expired.
    now = chain_clock.next_block_clock_for_refusal()
    if agreement.buyer_id == buyer.pk and can_activate(agreement) and escrow_expires_at(agreement) <= now:
        # The contract refuses an escrow past its expiresAt by the chain's clock (InvalidExpiry), which may be ahead
        # of ours (agreement_activation_begin's): refused here, before the relayer is given it. Its expiresAt, in
        # whole seconds: the term's fraction of a second is no time the contract gives.
        raise Conflict("The agreement's term has ended on the chain's clock.", code="agreement_expired",
                       details={"status": agreement.status})
    for field, signature_deadline in (("deadline", deadline), ("escrow_permit.deadline", escrow_permit["deadline"])):
        if signature_deadline <= now:
            raise InvalidInput(f"{field} has passed.", code="signature_expired", details={"field": field})
    wallet = agreement.buyer_wallet_address
    intent = _intent(agreement, deadline)
    signer_require(typed=intent, signature=intent_signature, expected=wallet, field="intent_signature")

    required = agreement.deposit_amount + agreement.infra_fee
    if escrow_permit["value"] < required:
        raise InvalidInput(f"escrow_permit.value must be at least the deposit plus the fee, {required}.",
                           code="permit_value_too_low", details={"field": "escrow_permit", "required": required})
    if escrow_permit["value"] > required:
        # The permit sets the escrow's allowance: what activation leaves of it, anyone can spend with another intent
        # the buyer signed (a reverted one, public; one of an agreement closed since), sent with no permit.
        raise InvalidInput(f"escrow_permit.value must be the deposit plus the fee, {required}: no more.",
                           code="permit_value_too_high", details={"field": "escrow_permit", "required": required})
    chain_nonce = _permit_nonce(agreement)
    front_run = escrow_permit["nonce"] < chain_nonce and _allowance(agreement) >= required
    if escrow_permit["nonce"] != chain_nonce and not front_run:
        raise InvalidInput(f"escrow_permit.nonce must be {chain_nonce} (the token's current permit nonce).",
                           code="wrong_permit_nonce", details={"field": "escrow_permit", "expected": chain_nonce})
    typed = _permit(agreement, value=escrow_permit["value"], nonce=escrow_permit["nonce"],
                    deadline=escrow_permit["deadline"])
    signer_require(typed=typed, signature=escrow_permit["signature"], expected=wallet, field="escrow_permit.signature")
    # A permit someone else already submitted granted the allowance: the contract is given none to run.
    onchain_permit = typed_data.EMPTY_PERMIT if front_run else typed_data.onchain_permit(
        value=escrow_permit["value"], deadline=escrow_permit["deadline"], signature=escrow_permit["signature"])

    balance = chain.call(chain.token_contract(agreement.token_address or None).functions.balanceOf(
        Web3.to_checksum_address(wallet)).call)

    data = chain.escrow_contract().encode_abi(
        "activate", args=[typed_data.message_tuple(intent), intent_signature, onchain_permit, typed_data.EMPTY_PERMIT]
    )
    with transaction.atomic():
        agreement_services.agreement_activation_begin(agreement_id=agreement.pk, buyer=buyer,
                                                      receipt_signer=intent["message"]["receiptSigner"])
        wallet_balance_require(wallet=wallet, balance=balance, required=required, token=agreement.token_address,
                               exclude_agreement=agreement.pk)
        _wallet_permit_alone_require(agreement, token_nonce=chain_nonce)
        if queued_with is not None:
            queued_with()
        return relayer.transaction_enqueue(
            purpose=TxPurpose.ACTIVATE, to=chainconfig.escrow_address(), data=data, agreement_id=agreement.pk,
            relayed_for=payer, context={selectors.ACTIVATION_PERMIT_NONCE: escrow_permit["nonce"]},
        )


def _wallet_permit_alone_require(agreement: UsageAgreement, *, token_nonce: int) -> None:
    """Under the wallet's lock (`wallet_payments_turn`): 409 `wallet_activation_in_progress` while another activation,
    or a direct purchase's fee permit, from the buyer's wallet is not mined and its permit not spent (`token_nonce`:
    the token's `nonces(buyer)` read before). A package signed meanwhile carries that permit's nonce, or counts on an
    allowance that permit replaces: relayed, it reverted InsufficientAllowance at the relayer's gas. Signed again once
    the other is mined, it carries the next nonce."""
    pending = selectors.wallet_permit_pending(
        wallet=agreement.buyer_wallet_address, token=agreement.token_address, token_nonce=token_nonce,
        exclude_agreement=agreement.pk)
    if pending is not None:
        raise Conflict("Another permit from this wallet (an activation's, a direct purchase's fee permit) is not mined "
                       "yet: it spends the token nonce this one was signed with. Fetch a new package and sign it once "
                       "that one is mined.",
                       code="wallet_activation_in_progress", details={"agreement_id": str(pending)})


def wallet_payments_turn(*, wallet: str, token: str = "", exclude_agreement=None) -> int:
    """Inside the transaction that queues a relayed payment from `wallet`, before its balance check: what the
    wallet's relayed payments not mined yet will pull (`selectors.wallet_unmined_amount`, `exclude_agreement`'s
    aside). The wallet's concurrent payments take their turn here (a lock until the transaction ends, keyed by the
    wallet, taken after any row lock), so each counts those queued before it."""
    if not transaction.get_connection().in_atomic_block:
        raise RuntimeError("A wallet's turn lasts until its transaction ends: take it inside one.")
    wallet = Web3.to_checksum_address(wallet)
    if connection.vendor == "postgresql":  # SQLite (`make run`) has one writer at a time
        with connection.cursor() as cursor:
            cursor.execute("SELECT pg_advisory_xact_lock(hashtext(%s))", [f"relayed-payments:{wallet}"])
    return selectors.wallet_unmined_amount(wallet=wallet, token=token, exclude_agreement=exclude_agreement)


def wallet_balance_require(*, wallet: str, balance: int, required: int, token: str = "",
                           exclude_agreement=None) -> None:
    """An agreement's payment of `required` from `wallet`, whose `balance` was read before the transaction: 402
    `insufficient_balance` (`details.committed`) when what its payments under way will take leaves too little
    (`wallet_payments_turn`, whose lock then covers the queueing)."""
    committed = wallet_payments_turn(wallet=wallet, token=token, exclude_agreement=exclude_agreement)
    if balance - committed < required:
        raise PaymentRequired("The buyer's wallet holds too little for this payment, besides what its payments "
                              "under way will take.", code="insufficient_balance",
                              details={"balance": balance, "required": required, "committed": committed})


def _purchase_offer_stands(agreement: UsageAgreement) -> None:
    """A Masumi purchase was accepted on the seller's behalf (a listed service is a standing offer): a service
    deregistered, or a seller deactivated, before the funds are locked has withdrawn it, and no money is locked for
    a job the marketplace would start at a service that is gone. (An agreement the seller accepted itself goes on.)"""
    if not MasumiPurchase.objects.filter(agreement_id=agreement.pk).exists():
        return
    agreement_services.offer_withdrawn_check(Service.objects.select_related("seller").get(pk=agreement.service_id),
                                             then="since this purchase: its funds are not locked")


def _activation_signed(tx: ChainTransaction) -> None:
    agreement_services.agreement_activation_signed(agreement_id=tx.agreement_id,
                                                   tx_hash=tx.attempts.order_by("created_at", "pk").last().tx_hash)


def intent_differences(agreement: UsageAgreement, onchain: dict) -> list[str]:
    """The fields in which the escrow on-chain differs from the intent this agreement's buyer signs."""
    expected = {
        "buyer": agreement.buyer_wallet_address, "seller": agreement.seller_wallet_address,
        "token": agreement.token_address or chainconfig.usdc_address(),
        # The signer of the intent the buyer signed (a rotation since leaves it the escrow's), else the current one.
        "receiptSigner": agreement.receipt_signer or receipt_signer_address(),
        "depositAmount": agreement.deposit_amount, "infraFee": agreement.infra_fee,
        "challengeWindow": agreement.challenge_window_seconds, "expiresAt": escrow_expires_at(agreement),
        "termsHash": agreement.terms_hash,
    }
    return [field for field, value in expected.items() if str(onchain[field]).lower() != str(value).lower()]


def _activation_evidence(tx: ChainTransaction) -> dict:
    """An activation that meets AgreementExists: is the escrow under this id the one this buyer signed for (an
    earlier attempt mined, or anyone relaying the buyer's signed intent), and which transaction funded it
    (`activated_by`: the agreement's activation, not ours that reverted)? Read from the contract. One still queued
    (refused at its simulation, `relayer._done_by_a_copy_not_deep_yet`) is asked too: the escrow this buyer signed
    for, funded by a copy, names the copy's block (relayer.EVIDENCE_BLOCK), so that ours is concluded on it only at
    its confirmation depth (concluded at once, a shallow reorg took the escrow of an agreement made active), and
    reopened when a reorg takes it. One whose revert reason the node did not give (a pruned node refusing to replay
    it: `chain.REASON_NOT_READ`) is asked too, and is a failure of its own only with no escrow there: taken for one,
    the agreement failed while a copy's escrow held the buyer's deposit."""
    reason_not_read = tx.failure_reason.startswith(chain.REASON_NOT_READ)
    if tx.status == TxStatus.CONFIRMED or (tx.status == TxStatus.FAILED and "AgreementExists" not in tx.failure_reason
                                           and not reason_not_read):
        return {}
    onchain = selectors.onchain_escrow(agreement=tx.agreement)
    if (tx.status != TxStatus.FAILED or reason_not_read) and onchain["state"] == selectors.EscrowState.NONE:
        return {}
    differences = intent_differences(tx.agreement, onchain)
    activation = selectors.activation_transaction(agreement=tx.agreement)
    evidence = {"agreement_exists": {"state": onchain["state"], "differences": differences,
                                     "activated_by": activation and activation["tx_hash"]},
                relayer.DONE_BY_ANOTHER: not differences}
    if activation is not None and not differences:
        evidence[relayer.EVIDENCE_BLOCK] = activation["block"]
    return evidence


def _activation_outcome(tx: ChainTransaction) -> None:
    existing = tx.outcome_evidence.get("agreement_exists")
    if tx.status == TxStatus.CONFIRMED or (existing is not None and not existing["differences"]):
        activated_by = (existing or {}).get("activated_by")
        agreement_services.agreement_activation_confirmed(
            agreement_id=tx.agreement_id, tx_hash=activated_by or tx.mined_tx_hash or tx.agreement.activation_tx_hash)
    elif existing is not None:
        agreement_services.agreement_activation_failed(
            agreement_id=tx.agreement_id,
            reason=f"another escrow holds this agreement id on-chain (it differs in: "
                   f"{', '.join(existing['differences'])})", code="agreement_id_taken")
    else:
        agreement_services.agreement_activation_failed(agreement_id=tx.agreement_id,
                                                       reason=f"activation reverted: {tx.failure_reason}",
                                                       code="activation_reverted")


def _activation_reopened(tx: ChainTransaction) -> None:
    """A failed activation left no event, so its agreement is moved back here. One that made the agreement active
    (ours confirmed, or concluded on a copy of the buyer's intent: `activated_by`) the indexer moves back itself once
    it applied the Activated event; a reorg it had not applied yet leaves that to this handler."""
    if tx.status == TxStatus.FAILED:
        agreement_services.agreement_activation_reopened(agreement_id=tx.agreement_id, tx_hash=tx.mined_tx_hash)
    activated_by = (tx.mined_tx_hash if tx.status == TxStatus.CONFIRMED
                    else (tx.outcome_evidence.get("agreement_exists") or {}).get("activated_by"))
    if activated_by:
        agreement_services.agreement_activation_undone(agreement_id=tx.agreement_id, tx_hash=activated_by)


def _activation_rerun_wanted(tx: ChainTransaction) -> bool:
    return agreement_services.agreement_activation_wanted(agreement_id=tx.agreement_id)


def _activation_retry(tx: ChainTransaction) -> None:
    agreement_services.agreement_activation_retry_begin(agreement_id=tx.agreement_id)


def findings_acknowledge(*, findings: QuerySet[ChainEvent] | QuerySet[ChainTransaction], operator: str,
                         reason: str) -> int:
    """Operator action: rows reconcile reports (`findings`: only those it reports) someone looked into and accepted
    are kept and stay visible, but no longer fail `reconcile` or the dashboard. Records who, when and why; returns
    how many were acknowledged now (those acknowledged already are left)."""
    reason = reason.strip()
    if not reason:
        raise InvalidInput("Say why it is acknowledged.", code="reason_required")
    return findings.model.objects.filter(pk__in=findings.values("pk"), acknowledged_at=None).update(
        acknowledged_at=timezone.now(), acknowledged_by=operator[:150], acknowledgement_reason=reason[:500])


def nonce_fills_acknowledge(*, fills: QuerySet[ChainTransaction], operator: AbstractBaseUser, reason: str) -> int:
    """Operator action: nonce fills the old bytes of the transaction they cancel were mined in place of
    (`selectors.nonce_fills_outrun`; other rows of `fills` are left), once someone checked that what those bytes did
    is not done twice (a payout and its retry) or dealt with it. `operator` (the admin's user, reconcile's
    `--operator`): 403 `operator_owns_a_party`, nothing acknowledged, when it owns a party of the cancelled
    transaction's money (its seller may have been paid twice)."""
    outrun = selectors.nonce_fills_outrun().filter(pk__in=fills.values("pk"))
    agreement_services.operator_owns_no_party_require(operator=operator, **relayer.transactions_parties(outrun))
    return findings_acknowledge(findings=outrun, operator=operator.get_username(), reason=reason)


def handlers_register() -> None:
    """Called once, from EscrowConfig.ready()."""
    relayer.outcome_handler_register(purpose=TxPurpose.ACTIVATE, on_outcome=_activation_outcome,
                                     on_submitted=_activation_signed, read_evidence=_activation_evidence,
                                     on_reopened=_activation_reopened, rerun_wanted=_activation_rerun_wanted,
                                     on_retry=_activation_retry)
    # Fee permits given as signature and deadline only (the Pægents SDK's direct purchase) are read at this nonce.
    agreement_services.permit_nonce_reader_register(reader=_token_nonce)
