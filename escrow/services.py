"""Escrow activation: the package the buyer signs, off-chain verification, queuing the relayer, outcomes.

Activation intent nonce: the contract's intent nonces are unordered, so the platform derives one per agreement
(`keccak256("activation" ‖ agreementId)`). A reverted activation does not spend it, so re-signing after
`activation_failed` reuses it, and no two agreements can collide.
"""

from django.conf import settings
from django.db import transaction
from eth_utils import keccak
from web3 import Web3

from agreements import services as agreement_services
from agreements.models import UsageAgreement
from catalog.models import Agent
from escrow import chain, relayer
from escrow.models import ChainTransaction, TxPurpose
from marketplace import chainconfig
from marketplace.chainconfig import receipt_signer_address
from marketplace.errors import Conflict, DependencyUnavailable, Forbidden, InvalidInput, PaymentRequired
from marketplace.logging import logs_name_the_agreement
from sdk import typed_data


def _require_chain() -> None:
    if not (chainconfig.escrow_address() and chainconfig.usdc_address()):
        raise DependencyUnavailable("No escrow contract is configured on this marketplace.",
                                    code="chain_not_configured")


def _chain_now() -> int:
    """The chain's clock (deadlines are checked against block time, which may run ahead of ours on a dev chain)."""
    try:
        return int(chain.w3().eth.get_block("latest")["timestamp"])
    except Exception as exc:  # noqa: BLE001
        raise DependencyUnavailable("The chain RPC is unavailable.", code="chain_unavailable") from exc


def intent_nonce(agreement: UsageAgreement) -> int:
    return int.from_bytes(keccak(b"activation" + bytes.fromhex(agreement.onchain_id[2:])), "big")


def _intent(agreement: UsageAgreement, deadline: int) -> dict:
    return typed_data.activation_intent(
        chain_id=settings.CHAIN_ID, escrow_address=chainconfig.escrow_address(), agreement_id=agreement.onchain_id,
        buyer=agreement.buyer_wallet_address, seller=agreement.seller_wallet_address,
        token=agreement.token_address or chainconfig.usdc_address(), quantity=agreement.quantity,
        price_per_unit=agreement.price_per_unit, deposit_amount=agreement.deposit_amount,
        infra_fee=agreement.infra_fee, receipt_signer=receipt_signer_address(),
        challenge_window=agreement.challenge_window_seconds, expires_at=int(agreement.expires_at.timestamp()),
        terms_hash=agreement.terms_hash, nonce=intent_nonce(agreement), deadline=deadline,
    )


def _permit(agreement: UsageAgreement, *, value: int, nonce: int, deadline: int) -> dict:
    return typed_data.erc2612_permit(
        chain_id=settings.CHAIN_ID, token_address=agreement.token_address or chainconfig.usdc_address(),
        owner=agreement.buyer_wallet_address, spender=chainconfig.escrow_address(), value=value, nonce=nonce,
        deadline=deadline,
    )


def _token_nonce(owner: str, token_address: str | None = None) -> int:
    """The token's EIP-2612 `nonces(owner)`: the nonce the owner's next permit must carry."""
    token = chain.token_contract(token_address)
    try:
        return chain.call(token.functions.nonces(Web3.to_checksum_address(owner)).call)
    except chain.ChainError as error:
        raise DependencyUnavailable("The chain RPC is unavailable.", code="chain_unavailable") from error


def _permit_nonce(agreement: UsageAgreement) -> int:
    return _token_nonce(agreement.buyer_wallet_address, agreement.token_address or None)


def activation_package(*, agreement: UsageAgreement, buyer: Agent, deadline: int | None = None) -> dict:
    """Everything the buyer signs to activate: the intent and EIP-2612 permits for the deposit and the fee.

    `deadline` (unix time) overrides the default signature lifetime, e.g. a Masumi purchase's payByTime."""
    _require_chain()
    if agreement.buyer_id != buyer.pk:
        raise Forbidden("Only the buyer activates the escrow.", code="buyer_only")
    if agreement.status not in ("accepted", "activation_failed"):
        raise Conflict(f"Nothing to sign while the agreement is {agreement.status}.", code="invalid_transition",
                       details={"status": agreement.status})
    deadline = deadline or _chain_now() + settings.ACTIVATION_SIGNATURE_TTL
    nonce = _permit_nonce(agreement)
    fee_pending = agreement.infra_fee > 0
    return {
        "agreement_id": agreement.pk,
        "onchain_id": agreement.onchain_id,
        "chain_id": settings.CHAIN_ID,
        "escrow_contract": chainconfig.escrow_address(),
        "token_address": agreement.token_address or chainconfig.usdc_address(),
        "deposit_amount_atomic": agreement.deposit_amount,
        "infra_fee_atomic": agreement.infra_fee,
        "fee_pending": fee_pending,
        "deadline": deadline,
        "intent": _intent(agreement, deadline),
        "escrow_permit": _permit(agreement, value=agreement.deposit_amount, nonce=nonce, deadline=deadline),
        "fee_permit": _permit(agreement, value=agreement.infra_fee, nonce=nonce + 1, deadline=deadline)
        if fee_pending else None,
    }


def _recover(typed: dict, signature: str, field: str) -> str:
    try:
        return typed_data.recover_typed_data_signer(typed, signature)
    except Exception as exc:  # noqa: BLE001 - any malformed signature is the caller's input error
        raise InvalidInput(f"{field}: not a valid 65-byte signature.", code="invalid_signature",
                           details={"field": field}) from exc


def _check_signer(typed: dict, signature: str, expected: str, field: str) -> None:
    signer = _recover(typed, signature, field)
    if signer.lower() != expected.lower():
        raise InvalidInput(f"{field} was signed by {signer}, not by the buyer's wallet {expected}.",
                           code="wrong_signer", details={"field": field, "signer": signer, "expected": expected})


@logs_name_the_agreement
def activation_submit(*, agreement: UsageAgreement, buyer: Agent, intent_signature: str, deadline: int,
                      escrow_permit: dict, fee_permit: dict | None) -> ChainTransaction:
    """Verify the buyer's signatures off-chain, move to `submitting` and queue `activate` for the relayer."""
    _require_chain()
    now = _chain_now()
    for field, permit_deadline in (("deadline", deadline), ("escrow_permit.deadline", escrow_permit["deadline"]),
                                   ("fee_permit.deadline", (fee_permit or {}).get("deadline", now + 1))):
        if permit_deadline <= now:
            raise InvalidInput(f"{field} has passed.", code="signature_expired", details={"field": field})
    wallet = agreement.buyer_wallet_address
    intent = _intent(agreement, deadline)
    _check_signer(intent, intent_signature, wallet, "intent_signature")

    chain_nonce = _permit_nonce(agreement)
    permits = [("escrow_permit", escrow_permit, agreement.deposit_amount, chain_nonce)]
    if agreement.infra_fee > 0:
        if fee_permit is None:
            raise InvalidInput("The infra fee is pending: a fee_permit is required.", code="fee_permit_required")
        permits.append(("fee_permit", fee_permit, agreement.infra_fee, chain_nonce + 1))
    onchain_permits = []
    for field, permit, needed, expected_nonce in permits:
        if permit["nonce"] != expected_nonce:
            raise InvalidInput(f"{field}.nonce must be {expected_nonce} (the token's current permit nonce"
                               f"{' + 1' if field == 'fee_permit' else ''}).", code="wrong_permit_nonce",
                               details={"field": field, "expected": expected_nonce})
        if permit["value"] < needed:
            raise InvalidInput(f"{field}.value must be at least {needed}.", code="permit_value_too_low",
                               details={"field": field, "required": needed})
        typed = _permit(agreement, value=permit["value"], nonce=permit["nonce"], deadline=permit["deadline"])
        _check_signer(typed, permit["signature"], wallet, f"{field}.signature")
        onchain_permits.append(typed_data.onchain_permit(value=permit["value"], deadline=permit["deadline"],
                                                         signature=permit["signature"]))
    if len(onchain_permits) == 1:
        onchain_permits.append(typed_data.EMPTY_PERMIT)

    balance = chain.call(chain.token_contract(agreement.token_address or None).functions.balanceOf(
        Web3.to_checksum_address(wallet)).call)
    required = agreement.deposit_amount + agreement.infra_fee
    if balance < required:
        raise PaymentRequired("The buyer's wallet holds too little to fund the escrow and fee.",
                              code="insufficient_balance", details={"balance": balance, "required": required})

    data = chain.escrow_contract().encode_abi(
        "activate", args=[typed_data.message_tuple(intent), intent_signature, *onchain_permits]
    )
    with transaction.atomic():
        agreement_services.agreement_activation_begin(agreement_id=agreement.pk, buyer=buyer)
        return relayer.transaction_enqueue(
            purpose=TxPurpose.ACTIVATE, to=chainconfig.escrow_address(), data=data, agreement_id=agreement.pk,
        )


def _activation_signed(tx: ChainTransaction) -> None:
    agreement_services.agreement_activation_signed(agreement_id=tx.agreement_id,
                                                   tx_hash=tx.attempts.first().tx_hash)


def _activation_outcome(tx: ChainTransaction) -> None:
    if tx.status == "confirmed":
        agreement_services.agreement_activation_confirmed(agreement_id=tx.agreement_id, tx_hash=tx.mined_tx_hash)
    else:
        agreement_services.agreement_activation_failed(agreement_id=tx.agreement_id,
                                                       reason=f"activation reverted: {tx.failure_reason}")


relayer.outcome_handler_register(purpose=TxPurpose.ACTIVATE, on_outcome=_activation_outcome,
                                 on_submitted=_activation_signed)


# Fee permits given as signature and deadline only (the Pægents SDK's direct purchase) are read at this nonce.
agreement_services.permit_nonce_reader_register(reader=_token_nonce)
