"""x402 payments from the buyer's side: sign what a 402 asks for, and build a direct stablecoin purchase.

Signing uses the `x402` package's client (EIP-3009 `transferWithAuthorization`, scheme "exact") with an
eth-account key that never leaves the process. Two uses:

- Skill invocation: `MarketplaceClient.invoke_skill` calls `sign_payment_required` with the 402's
  PAYMENT-REQUIRED header and retries with the signed payment.
- Direct purchase (no escrow): `build_direct_stablecoin_agreement` signs the x402 payment of quantity × unit price
  to the seller and the EIP-2612 permit of the platform fee to the platform's gas wallet, in one call, and returns
  the body of `POST /usage-agreements`.
"""

from __future__ import annotations

import secrets
import time
from collections.abc import Mapping
from typing import Any

from eth_account import Account
from x402 import PaymentPayload, PaymentRequirements, x402ClientSync
from x402.http import decode_payment_required_header, encode_payment_signature_header
from x402.mechanisms.evm.exact import ExactEvmScheme
from x402.mechanisms.evm.signers import EthAccountSigner
from x402.mechanisms.evm.types import ExactEIP3009Authorization, ExactEIP3009Payload

from sdk import typed_data

__all__ = ["build_direct_stablecoin_agreement", "sign_payment_required", "sign_authorization"]


def sign_payment_required(payment_required_header: str, private_key: str, *, max_amount_atomic: int) -> str:
    """The payment header (base64 x402 PaymentPayload) answering a 402's PAYMENT-REQUIRED header.

    Refuses (x402's spend controls) to sign anything above `max_amount_atomic` token base units.
    """
    required = decode_payment_required_header(payment_required_header)
    client = x402ClientSync()
    for requirements in required.accepts:
        client.register(requirements.network, ExactEvmScheme(EthAccountSigner(Account.from_key(private_key))))
    client.set_spend_controls({"allowed_assets": [
        {"network": r.network, "asset": r.asset, "max_amount_per_payment": str(max_amount_atomic)}
        for r in required.accepts]})
    return encode_payment_signature_header(client.create_payment_payload(required))


def sign_authorization(requirements: PaymentRequirements, private_key: str, *, valid_before: int) -> str:
    """A payment header for `requirements` whose authorization stays valid until `valid_before` (unix time).

    For payments executed later than x402's usual minutes (a direct purchase waits for the seller's accept).
    """
    account = Account.from_key(private_key)
    authorization = ExactEIP3009Authorization(
        from_address=account.address, to=requirements.pay_to, value=requirements.amount, valid_after="0",
        valid_before=str(valid_before), nonce="0x" + secrets.token_hex(32))
    typed = typed_data.transfer_with_authorization(
        chain_id=int(requirements.network.split(":")[1]), token_address=requirements.asset,
        from_address=account.address, to_address=requirements.pay_to, value=int(requirements.amount), valid_after=0,
        valid_before=valid_before, nonce=authorization.nonce, token_name=requirements.extra["name"],
        token_version=requirements.extra["version"])
    signature = typed_data.sign_typed_data(private_key, typed)
    payload = PaymentPayload(payload=ExactEIP3009Payload(authorization, signature).to_dict(), accepted=requirements)
    return encode_payment_signature_header(payload)


def build_direct_stablecoin_agreement(
    *,
    service_id: str,
    quantity: int,
    unit_price_atomic: int,
    seller_wallet_address: str,
    payment_requirements: Mapping[str, Any],
    private_key: str,
    permit_nonce: int,
    validity_seconds: int = 3600,
    now: int | None = None,
) -> dict[str, Any]:
    """The body of `POST /usage-agreements` for a direct stablecoin purchase, both signatures made here.

    `payment_requirements` is `GET /payment-requirements?amount_atomic=<quantity × unit price>` (fee, token,
    chain and the gas wallet the fee permit is for); `permit_nonce` is the token's `nonces(buyer)`. The seller
    must accept within `validity_seconds` (the proposal expires before the signatures do).
    """
    amount = quantity * unit_price_atomic
    if payment_requirements["amount_atomic"] != amount:
        raise ValueError(f"payment_requirements are for {payment_requirements['amount_atomic']}, not {amount}")
    token = payment_requirements["token"]["address"]
    chain_id = payment_requirements["chain_id"]
    deadline = (now or int(time.time())) + validity_seconds
    requirements = PaymentRequirements(
        scheme="exact", network=f"eip155:{chain_id}", asset=token, amount=str(amount), pay_to=seller_wallet_address,
        max_timeout_seconds=validity_seconds,
        extra={"name": typed_data.USDC_DOMAIN_NAME, "version": typed_data.USDC_DOMAIN_VERSION})
    fee = payment_requirements["fee_atomic"]
    permit = typed_data.erc2612_permit(
        chain_id=chain_id, token_address=token, owner=Account.from_key(private_key).address,
        spender=payment_requirements["gas_wallet_address"], value=fee, nonce=permit_nonce, deadline=deadline)
    return {
        "service_id": str(service_id),
        "quantity": quantity,
        "settlement_model": "direct_payment",
        "buyer_wallet_address": Account.from_key(private_key).address,
        "payment_header": sign_authorization(requirements, private_key, valid_before=deadline),
        "fee_permit": {"value": fee, "nonce": permit_nonce, "deadline": deadline,
                       "signature": typed_data.sign_typed_data(private_key, permit)},
    }
