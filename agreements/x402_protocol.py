"""x402 "exact" payments on EVM (EIP-3009 `transferWithAuthorization`): what the platform asks for, reading the
payment header, and every check that needs no chain.

Wire formats are the `x402` package's: requirements are `x402.PaymentRequirements`, the 402 body is
`x402.PaymentRequired`, a payment header is x402's base64 JSON `PaymentPayload` (v2; v1 payloads are read too).
The chain-side checks (the authorization's nonce unused, the payer's balance) are escrow's (escrow.x402_onchain),
which simulates the transfer. Rejections carry our own stable codes (`REASON_CODES`) and x402's reason.

Binding to a resource: every skill's payment goes to the same treasury, so payTo and amount alone would let an
authorization quoted by one skill's 402 pay for any other skill of that price. A resource's requirements name it
in `extra.resource` (its path, e.g. "/agents/sol/translate"); x402 clients echo the requirements they accepted
(and the 402's `resource`) in the payload, and a payment whose echo names another resource is refused
(`wrong_resource`), as x402 resource servers match `accepted` against their own requirements.
"""

import binascii
import time
from dataclasses import dataclass
from urllib.parse import urlsplit

from django.conf import settings
from django.db import IntegrityError, transaction
from pydantic import ValidationError
from x402 import PaymentPayload, PaymentRequired, PaymentRequirements, ResourceInfo
from x402.http import decode_payment_signature_header, encode_payment_required_header
from x402.http.utils import safe_base64_decode
from x402.mechanisms.evm import constants as evm
from x402.mechanisms.evm.eip712 import hash_eip3009_authorization
from x402.mechanisms.evm.types import ExactEIP3009Payload
from x402.mechanisms.evm.utils import format_amount, hex_to_bytes
from x402.mechanisms.evm.verify import verify_eoa_signature

from agreements.models import PaymentAuthorization
from marketplace import bounded_json, chainconfig
from marketplace.fields import is_address
from sdk.typed_data import USDC_DOMAIN_NAME, USDC_DOMAIN_VERSION

USDC_DECIMALS = 6
# Headers a buyer may send its signed payment in: x402 v2, x402 v1, and the Services API seed's name.
PAYMENT_HEADERS = ("PAYMENT-SIGNATURE", "X-PAYMENT", "X-Payment-Signature")

# x402's verification reasons -> our codes (the x402 reason is kept in the error's details).
REASON_CODES = {
    evm.ERR_UNSUPPORTED_SCHEME: "unsupported_scheme",
    evm.ERR_NETWORK_MISMATCH: "wrong_network",
    evm.ERR_RECIPIENT_MISMATCH: "wrong_recipient",
    evm.ERR_AUTHORIZATION_VALUE_MISMATCH: "wrong_amount",
    evm.ERR_VALID_BEFORE_EXPIRED: "authorization_expired",
    evm.ERR_VALID_AFTER_FUTURE: "authorization_not_yet_valid",
    evm.ERR_INVALID_SIGNATURE: "invalid_signature",
    evm.ERR_FAILED_TO_VERIFY_SIGNATURE: "invalid_signature",
    evm.ERR_NONCE_ALREADY_USED: "authorization_already_used",
    evm.ERR_INSUFFICIENT_BALANCE: "insufficient_balance",
}


class InvalidPayment(Exception):
    """A payment the platform will not execute; `code` is ours, `reason` x402's when it has one."""

    def __init__(self, code: str, message: str, reason: str = "", details: dict | None = None):
        self.code, self.message, self.reason, self.details = code, message, reason, details or {}
        super().__init__(message)


def _reject(reason: str, message: str) -> InvalidPayment:
    return InvalidPayment(REASON_CODES.get(reason, "payment_invalid"), message, reason)


@dataclass(frozen=True)
class Authorization:
    """A decoded EIP-3009 authorization with its signature (values as the contract takes them)."""

    payer: str
    pay_to: str
    amount: int
    valid_after: int
    valid_before: int
    nonce: str
    signature: str


def network() -> str:
    """This marketplace's chain as a CAIP-2 id, x402's network naming (e.g. "eip155:8453" for Base)."""
    return f"eip155:{settings.CHAIN_ID}"


def payment_requirements(*, amount: int, pay_to: str, max_timeout_seconds: int,
                         resource: str | None = None) -> PaymentRequirements:
    """x402 "exact" requirements for `amount` USDC base units paid to `pay_to`; with `resource` (a path), only a
    payment quoted for that resource meets them."""
    extra = {"name": USDC_DOMAIN_NAME, "version": USDC_DOMAIN_VERSION}
    if resource:
        extra["resource"] = resource
    return PaymentRequirements(
        scheme=evm.SCHEME_EXACT, network=network(), asset=chainconfig.usdc_address(), amount=str(amount),
        pay_to=pay_to, max_timeout_seconds=max_timeout_seconds, extra=extra,
    )


def payment_required(*, requirements: PaymentRequirements, url: str, description: str,
                     error: str | None = None) -> PaymentRequired:
    return PaymentRequired(error=error, resource=ResourceInfo(url=url, description=description,
                                                              mime_type="application/json"),
                           accepts=[requirements])


def payment_required_headers(*, requirements: PaymentRequirements, required: PaymentRequired) -> dict[str, str]:
    """The Services API seed's X-Payment-* headers and x402 v2's PAYMENT-REQUIRED header."""
    return {
        "X-Payment-Amount": format_amount(int(requirements.amount), USDC_DECIMALS),
        "X-Payment-Currency": "USDC",
        "X-Payment-Address": requirements.pay_to,
        "X-Payment-Chain": settings.CHAIN_NETWORK,
        "PAYMENT-REQUIRED": encode_payment_required_header(required),
    }


def payment_header(headers) -> str | None:
    """The signed payment a request carries, from whichever of `PAYMENT_HEADERS` it used."""
    for name in PAYMENT_HEADERS:
        if headers.get(name):
            return headers[name].strip()
    return None


def decode(header: str) -> PaymentPayload:
    """x402's base64 JSON payment payload (v1 payloads are normalised to v2's shape)."""
    try:
        bounded_json.loads(safe_base64_decode(header))  # x402 parses it with json.loads, which has no depth limit
        payload = decode_payment_signature_header(header)
    except (binascii.Error, UnicodeDecodeError, ValidationError, ValueError, AttributeError, TypeError) as exc:
        raise InvalidPayment("malformed_payment", "The payment header is not a base64 x402 payment payload "
                                                  "(a bare signature cannot be executed: EIP-3009 needs the "
                                                  "authorization it signs).") from exc
    if isinstance(payload, PaymentPayload):
        return payload
    # v1: scheme and network at the top level; the authorization is the same.
    return PaymentPayload(payload=payload.payload, accepted=PaymentRequirements(
        scheme=payload.scheme, network=payload.network, asset="", amount="0", pay_to="", max_timeout_seconds=0))


def check(payload: PaymentPayload, requirements: PaymentRequirements, *, min_validity_seconds: int = 6,
          now: int | None = None) -> Authorization:
    """Everything but the chain: scheme, network, recipient, amount, validity window and the payer's signature."""
    if payload.accepted.scheme != evm.SCHEME_EXACT:
        raise _reject(evm.ERR_UNSUPPORTED_SCHEME, "Only the x402 'exact' scheme is accepted.")
    if payload.accepted.network not in (requirements.network, settings.CHAIN_NETWORK):
        raise _reject(evm.ERR_NETWORK_MISMATCH, f"Pay on {requirements.network}.")
    if payload.accepted.asset and payload.accepted.asset.lower() != requirements.asset.lower():
        raise InvalidPayment("wrong_asset", f"Pay in USDC at {requirements.asset}.")
    try:
        evm_payload = ExactEIP3009Payload.from_dict(payload.payload)
        authorization = evm_payload.authorization
        values = Authorization(
            payer=authorization.from_address, pay_to=authorization.to, amount=int(authorization.value),
            valid_after=int(authorization.valid_after), valid_before=int(authorization.valid_before),
            nonce=authorization.nonce.lower(), signature=evm_payload.signature or "",
        )
        nonce_length = len(hex_to_bytes(values.nonce))
        signature = hex_to_bytes(values.signature)
    except (AttributeError, TypeError, ValueError) as exc:
        raise InvalidPayment("malformed_payment", "The authorization's fields are not valid numbers/hex.") from exc
    if not (is_address(values.payer) and is_address(values.pay_to)):
        raise InvalidPayment("malformed_payment", "The authorization's from/to are not addresses.")
    if nonce_length != 32 or not values.signature:
        raise InvalidPayment("malformed_payment", "The authorization needs a 32-byte nonce and a signature.")
    if requirements.extra.get("resource"):
        _require_resource(payload, requirements.extra["resource"])
    if values.pay_to.lower() != requirements.pay_to.lower():
        raise _reject(evm.ERR_RECIPIENT_MISMATCH, f"The authorization must pay {requirements.pay_to}.")
    if values.amount != int(requirements.amount):
        raise _reject(evm.ERR_AUTHORIZATION_VALUE_MISMATCH,
                      f"The authorization must be for exactly {requirements.amount} base units.")
    now = int(time.time()) if now is None else now
    if values.valid_before < now + min_validity_seconds:
        raise _reject(evm.ERR_VALID_BEFORE_EXPIRED,
                      f"validBefore must be at least {min_validity_seconds} s in the future.")
    if values.valid_after > now:
        raise _reject(evm.ERR_VALID_AFTER_FUTURE, "validAfter is in the future.")
    try:
        digest = hash_eip3009_authorization(authorization, settings.CHAIN_ID, requirements.asset,
                                            USDC_DOMAIN_NAME, USDC_DOMAIN_VERSION)
        signed = verify_eoa_signature(digest, signature, values.payer)
    except Exception:  # noqa: BLE001 - whatever a malformed signature raises, it is not the payer's
        signed = False
    if not signed:
        raise _reject(evm.ERR_INVALID_SIGNATURE, "The signature is not the payer's over this authorization.")
    return values


def _require_resource(payload: PaymentPayload, resource: str) -> None:
    """The payload's accepted requirements, and its resource when it names one, must be `resource`'s (a v1
    payload echoes neither, so it cannot pay for a bound resource)."""
    quoted = (payload.accepted.extra or {}).get("resource")
    named = urlsplit(payload.resource.url).path if payload.resource is not None else resource
    if quoted != resource or named != resource:
        raise InvalidPayment("wrong_resource", f"This payment was quoted for {quoted or named or 'no resource'}, "
                                               f"not {resource}: sign what this resource's 402 asks for.",
                             details={"resource": resource})


def _already_used(authorization: Authorization, seen: PaymentAuthorization | None) -> InvalidPayment:
    details = {}
    # Whoever holds this very signed payment may learn what it bought (a retry after a lost answer).
    if seen is not None and seen.signature.lower() == authorization.signature.lower():
        invocation = getattr(seen, "invocation", None)
        if invocation is not None:
            details["invocation_id"] = invocation.public_id
    return InvalidPayment("authorization_already_used", "This authorization was already submitted; it is executed "
                                                        "once.", evm.ERR_NONCE_ALREADY_USED, details)


def authorization_refuse_replay(authorization: Authorization) -> None:
    """Refuse an authorization the platform already took, before asking the chain anything."""
    seen = PaymentAuthorization.objects.filter(token_address=chainconfig.usdc_address(), payer=authorization.payer,
                                               nonce=authorization.nonce).first()
    if seen is not None:
        raise _already_used(authorization, seen)


def authorization_record(authorization: Authorization) -> PaymentAuthorization:
    """Store the authorization; a nonce seen before (replay) is refused. Call inside the business transaction."""
    try:
        with transaction.atomic():
            return PaymentAuthorization.objects.create(
                token_address=chainconfig.usdc_address(), payer=authorization.payer, pay_to=authorization.pay_to,
                amount=authorization.amount, valid_after=authorization.valid_after,
                valid_before=authorization.valid_before, nonce=authorization.nonce,
                signature=authorization.signature,
            )
    except IntegrityError as exc:  # a concurrent request with the same authorization won
        raise _already_used(authorization, None) from exc
