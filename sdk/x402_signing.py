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

import re
import secrets
import time
from collections.abc import Mapping
from typing import Any

from eth_account import Account
from eth_account.messages import encode_defunct
from eth_keys.exceptions import BadSignature
from eth_utils import to_checksum_address
from eth_utils.exceptions import ValidationError as EthValidationError
from x402 import PaymentPayload, PaymentRequirements, x402ClientSync
from x402.http import decode_payment_required_header, encode_payment_signature_header, safe_base64_decode
from x402.mechanisms.evm.exact import ExactEvmScheme
from x402.mechanisms.evm.signers import EthAccountSigner
from x402.mechanisms.evm.types import ExactEIP3009Authorization, ExactEIP3009Payload

from sdk import bounded_json, typed_data
from sdk.networks import NetworkConfig, TokenDomain
from sdk.safety import DEADLINE_MAX_SECONDS, DeadlineOutOfRange, SigningRefused, Wallet, as_wallet, require_equal

__all__ = ["RETRY_PROOF_HEADER", "build_direct_stablecoin_agreement", "new_authorization_nonce",
           "retry_proof_message", "retry_proof_signer", "sign_authorization", "sign_payment_required",
           "sign_retry_proof"]

# An anonymous payer's retry of a skill call whose answer it lost sends the same payment header and this one: the
# payer's signature of `retry_proof_message`. The payment itself proves nothing (its transaction shows it whole).
RETRY_PROOF_HEADER = "X-Payment-Retry-Proof"
_RECOVERABLE_SIGNATURE = re.compile(r"(0x)?[0-9a-fA-F]{130}")
# A uint256 has at most 78 decimal digits; int() raises past 4300.
_AMOUNT_MAX_DIGITS = 78


def _check_requirements(requirements: PaymentRequirements, field: str, network: NetworkConfig,
                        token_domain: TokenDomain, *, pay_to: str, max_validity_seconds: int,
                        max_amount_atomic: int) -> None:
    """A 402's payment requirement must be for the pinned chain and token, with the token's real domain, paid to
    `pay_to` (a skill pays the platform treasury: the pinned gas wallet), valid for at most `max_validity_seconds`
    (x402 signs validBefore = now + maxTimeoutSeconds), and signed as the token's own EIP-3009 authorization in
    the "exact" scheme (the one x402 is given; another raised x402's NoMatchingRequirementsError): x402 signs a
    Permit2 transfer instead when `extra.assetTransferMethod` says "permit2". Its amount must be ASCII
    digits, at most `max_amount_atomic`: x402's own cap raised its NoMatchingRequirementsError (no SDK refusal),
    and let through digits of other scripts, which int() reads."""
    amount = requirements.amount
    if not (amount.isascii() and amount.isdigit() and len(amount) <= _AMOUNT_MAX_DIGITS
            and int(amount) <= max_amount_atomic):
        raise SigningRefused(f"{field}.amount", f"at most {max_amount_atomic} (base units, in ASCII digits)",
                             amount if len(amount) <= 100 else f"{amount[:20]}... ({len(amount)} characters)")
    require_equal(requirements.scheme, "exact", f"{field}.scheme")  # x402 is given this scheme only to sign with
    require_equal(requirements.network, f"eip155:{network.chain_id}", f"{field}.network")
    require_equal(requirements.asset, network.token_address, f"{field}.asset")
    extra = requirements.extra or {}
    require_equal(extra.get("assetTransferMethod", "eip3009"), "eip3009", f"{field}.extra.assetTransferMethod")
    require_equal(extra.get("name"), token_domain.name, f"{field}.extra.name")
    require_equal(extra.get("version"), token_domain.version, f"{field}.extra.version")
    require_equal(requirements.pay_to, pay_to, f"{field}.pay_to")
    if not 0 < requirements.max_timeout_seconds <= max_validity_seconds:
        raise DeadlineOutOfRange(f"{field}.max_timeout_seconds", f"at most {max_validity_seconds} s",
                                 requirements.max_timeout_seconds)


def sign_payment_required(payment_required_header: str, private_key: str, *, max_amount_atomic: int,
                          network: NetworkConfig, token_domain: TokenDomain, pay_to: str | None = None,
                          max_validity_seconds: int = DEADLINE_MAX_SECONDS) -> str:
    """The payment header (base64 x402 PaymentPayload) answering a 402's PAYMENT-REQUIRED header.

    Refuses (`SigningRefused`) a requirement for another chain, token or token domain than the pinned ones, for
    another payee than `pay_to` (by default the pinned gas wallet, the platform treasury every skill pays), valid
    longer than `max_validity_seconds`, or for an amount above `max_amount_atomic` base units or not in ASCII digits
    (field "accepts[i].amount"; x402's spend controls hold the same cap behind).
    The header is the server's JSON: nested deeper than `bounded_json.JSON_MAX_DEPTH`, it raises `InvalidJSON`.
    """
    # Parsed before x402's json.loads recurses into it; x402 reads any other JSON than an object with .get().
    if not isinstance(bounded_json.loads(safe_base64_decode(payment_required_header)), dict):
        raise SigningRefused("payment_required", "an x402 PaymentRequired object", payment_required_header)
    required = decode_payment_required_header(payment_required_header)
    if not required.accepts:  # x402's client raises its own NoMatchingRequirementsError on none
        raise SigningRefused("accepts", "at least one payment requirement", required.accepts)
    for index, requirements in enumerate(required.accepts):
        if not isinstance(requirements, PaymentRequirements):  # an x402 v1 shape: not what this SDK pays
            raise SigningRefused(f"accepts[{index}]", "x402 v2 payment requirements", type(requirements).__name__)
        _check_requirements(requirements, f"accepts[{index}]", network, token_domain,
                            pay_to=pay_to or network.gas_wallet, max_validity_seconds=max_validity_seconds,
                            max_amount_atomic=max_amount_atomic)
    client = x402ClientSync()
    client.register(f"eip155:{network.chain_id}", ExactEvmScheme(EthAccountSigner(Account.from_key(private_key))))
    client.set_spend_controls({"allowed_assets": [
        {"network": r.network, "asset": r.asset, "max_amount_per_payment": str(max_amount_atomic)}
        for r in required.accepts]})
    return encode_payment_signature_header(client.create_payment_payload(required))


def sign_authorization(requirements: PaymentRequirements, wallet: str | bytes | Wallet, *, valid_before: int,
                       nonce: str | None = None) -> str:
    """A payment header for `requirements` whose authorization stays valid until `valid_before` (unix time), under
    the authorization `nonce` (a bytes32; random when omitted).

    For payments executed later than x402's usual minutes (a direct purchase waits for the seller's accept).
    The caller has checked `requirements` (chain, token and its domain in `extra`, payee, amount).
    """
    wallet = as_wallet(wallet)
    authorization = ExactEIP3009Authorization(
        from_address=wallet.address, to=requirements.pay_to, value=requirements.amount, valid_after="0",
        valid_before=str(valid_before), nonce=nonce or new_authorization_nonce())
    typed = typed_data.transfer_with_authorization(
        chain_id=int(requirements.network.split(":")[1]), token_address=requirements.asset,
        from_address=wallet.address, to_address=requirements.pay_to, value=int(requirements.amount),
        valid_after=0, valid_before=valid_before, nonce=authorization.nonce, token_name=requirements.extra["name"],
        token_version=requirements.extra["version"])
    signature = wallet.sign_typed_data(typed)
    payload = PaymentPayload(payload=ExactEIP3009Payload(authorization, signature).to_dict(), accepted=requirements)
    return encode_payment_signature_header(payload)


def retry_proof_message(*, payer: str, nonce: str) -> str:
    """What a payer signs (EIP-191) to retry the skill call its authorization `nonce` paid."""
    return f"Retry the skill invocation paid by x402 authorization {nonce.lower()} from {payer.lower()}"


def sign_retry_proof(payment_header: str, private_key: str | bytes) -> str:
    """The `RETRY_PROOF_HEADER` value for a retry with `payment_header` (which `private_key` signed): a lost answer's
    retry is 402 `authorization_already_used` naming the invocation the payment bought only with it (or an agent's
    API key)."""
    authorization = PaymentPayload.model_validate_json(safe_base64_decode(payment_header)).payload["authorization"]
    message = retry_proof_message(payer=authorization["from"], nonce=authorization["nonce"])
    return "0x" + Account.sign_message(encode_defunct(text=message), private_key).signature.hex()


def retry_proof_signer(proof: str, *, payer: str, nonce: str) -> str | None:
    """The address that signed the retry `proof` for the authorization `nonce` of `payer`; None when it is no
    signature: not 65 bytes of hex (0x or not), or none a key recovers from (eth-keys raises BadSignature, not
    ValueError)."""
    if not _RECOVERABLE_SIGNATURE.fullmatch(proof):
        return None
    try:
        return str(Account.recover_message(encode_defunct(text=retry_proof_message(payer=payer, nonce=nonce)),
                                           signature=bytes.fromhex(proof.removeprefix("0x"))))
    except (BadSignature, EthValidationError, ValueError):
        return None


def new_authorization_nonce() -> str:
    """A random EIP-3009 authorization nonce (bytes32), as x402 draws one."""
    return "0x" + secrets.token_hex(32)


def _stated(answer: Any, path: str) -> Any:
    """`answer`'s value at the dotted `path`, None where the server's JSON has none (another shape, a field missing):
    compared, that is a refusal naming the field, not a KeyError or TypeError."""
    for step in path.split("."):
        answer = answer.get(step) if isinstance(answer, Mapping) else None
    return answer


def build_direct_stablecoin_agreement(
    *,
    service_id: str,
    quantity: int,
    unit_price_atomic: int,
    seller_wallet_address: str,
    payment_requirements: Mapping[str, Any],
    wallet: str | bytes | Wallet,
    permit_nonce: int,
    network: NetworkConfig,
    token_domain: TokenDomain,
    validity_seconds: int = 3600,
    now: int | None = None,
    authorization_nonce: str | None = None,
) -> dict[str, Any]:
    """The body of `POST /usage-agreements` for a direct stablecoin purchase, both signatures made here.

    `payment_requirements` is `GET /payment-requirements?amount_atomic=<quantity × unit price>`; it is only
    compared with what the SDK computes from the pinned `network` (chain, token, the fee from the published
    schedule, the gas wallet the fee permit is for) and refused (`SigningRefused`) on any difference, a field
    missing or an answer of another shape included. `seller_wallet_address` must be an address (else
    `SigningRefused` on "seller_wallet_address").
    `permit_nonce` is the token's `nonces(buyer)`. The seller must accept within `validity_seconds`. The payment's
    authorization is signed under `authorization_nonce` (random when omitted): the one its cancellation revokes.
    """
    wallet = as_wallet(wallet)
    amount = quantity * unit_price_atomic
    fee = network.fee_schedule.fee_for(amount)
    for path, expected in (("amount_atomic", amount), ("fee_atomic", fee), ("chain_id", network.chain_id),
                           ("token.address", network.token_address), ("gas_wallet_address", network.gas_wallet)):
        require_equal(_stated(payment_requirements, path), expected, f"payment_requirements.{path}")
    try:
        seller_wallet_address = to_checksum_address(seller_wallet_address)
    except (TypeError, ValueError):
        raise SigningRefused("seller_wallet_address", "an address", seller_wallet_address) from None
    if not 0 < validity_seconds <= 24 * 3600:
        raise SigningRefused("validity_seconds", "at most a day", validity_seconds)
    deadline = (now or int(time.time())) + validity_seconds
    requirements = PaymentRequirements(
        scheme="exact", network=f"eip155:{network.chain_id}", asset=network.token_address, amount=str(amount),
        pay_to=seller_wallet_address, max_timeout_seconds=validity_seconds,
        extra={"name": token_domain.name, "version": token_domain.version})
    permit = typed_data.erc2612_permit(
        chain_id=network.chain_id, token_address=network.token_address, owner=wallet.address,
        spender=network.gas_wallet, value=fee, nonce=permit_nonce, deadline=deadline, token_name=token_domain.name,
        token_version=token_domain.version)
    return {
        "service_id": str(service_id),
        "quantity": quantity,
        "settlement_model": "direct_payment",
        "buyer_wallet_address": wallet.address,
        "payment_header": sign_authorization(requirements, wallet, valid_before=deadline,
                                             nonce=authorization_nonce),
        "fee_permit": {"value": fee, "nonce": permit_nonce, "deadline": deadline,
                       "signature": wallet.sign_typed_data(permit)},
    }
