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

The token's EIP-712 domain (`extra.name`/`extra.version`, and every signature check) is read from the token
contract by the escrow app, which registers the reader here (`token_domain_reader_register`): Base's USDC is
"USD Coin", Base Sepolia's "USDC".

A bare signature (the Services API seed's `X-Payment-Signature: 0x...`): EIP-3009 needs the authorization it
signs, so a resource's 402 issues one (`quote_issue`: a random nonce and a validity window in `extra`, and the
X-Payment-Nonce / -Valid-After / -Valid-Before headers), remembered for the caller for the window. A bare signature
from a known payer (the calling agent's wallet, or `X-Payment-From`) is checked against the authorizations the
same caller was quoted (`quoted_authorization`), newest first.
"""

import binascii
import re
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass
from urllib.parse import urlsplit

from django.conf import settings
from django.core.cache import cache
from django.db import IntegrityError, transaction
from eth_utils import to_checksum_address
from pydantic import ValidationError
from x402 import PaymentPayload, PaymentRequired, PaymentRequirements, ResourceInfo, SettleResponse
from x402.http import (
    decode_payment_signature_header,
    encode_payment_required_header,
    encode_payment_response_header,
)
from x402.http.utils import safe_base64_decode
from x402.mechanisms.evm import constants as evm
from x402.mechanisms.evm.eip712 import hash_eip3009_authorization
from x402.mechanisms.evm.types import ExactEIP3009Authorization, ExactEIP3009Payload
from x402.mechanisms.evm.utils import format_amount, hex_to_bytes
from x402.mechanisms.evm.verify import verify_eoa_signature

from agreements.models import PaymentAuthorization, SkillInvocation
from marketplace import bounded_json, chainconfig, signatures
from marketplace.errors import DependencyUnavailable
from marketplace.fields import is_address
from sdk import x402_signing

USDC_DECIMALS = 6
X402_VERSIONS = [1, 2]  # the payment payloads read (v1 normalised to v2's shape)
# Headers a buyer may send its signed payment in: x402 v2, x402 v1, and the Services API seed's name.
PAYMENT_HEADERS = ("PAYMENT-SIGNATURE", "X-PAYMENT", "X-Payment-Signature")
# The payer of a bare signature, for a caller without an agent API key.
PAYER_HEADER = "X-Payment-From"
# An anonymous payer's proof that a replayed payment is its own retry (sdk.x402_signing.sign_retry_proof).
RETRY_PROOF_HEADER = x402_signing.RETRY_PROOF_HEADER
BARE_SIGNATURE = re.compile(r"^0x[0-9a-fA-F]{130}$")
UINT_DIGITS = re.compile(r"[0-9]{1,78}")  # a uint256's digits
# The latest validBefore the platform records (its record's bigint): a uint256 the buyer signs, far beyond any real
# expiry (EIP-3009 takes any).
MAX_VALID_BEFORE = 2**63 - 1
# How much further than a 402's maxTimeoutSeconds a payer's validBefore may be (its clock ahead of ours).
VALIDITY_DRIFT_SECONDS = 600
# Authorizations quoted per caller and resource that a bare signature is checked against (newest first).
QUOTES_KEPT = 16

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


def simulation_rejection(reason: str, message: str) -> InvalidPayment:
    """The refusal of a payment whose simulated transfer reverted, for x402's `reason`."""
    return InvalidPayment(REASON_CODES.get(reason, "payment_simulation_failed"), message, reason)


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


# Whether a call paying with an authorization already taken is the retry of the invocation it bought.
RetryCheck = Callable[[SkillInvocation], bool]
TokenDomainReader = Callable[[], tuple[str, str]]
_token_domain_reader: list[TokenDomainReader] = []


def token_domain_reader_register(*, reader: TokenDomainReader) -> None:
    """`reader()` is the configured token's EIP-712 domain (name, version): the escrow app reads it from the token
    contract (EIP-5267), cached per chain and token."""
    _token_domain_reader[:] = [reader]


def token_domain_reader_registered() -> bool:
    return bool(_token_domain_reader)


def token_domain() -> tuple[str, str]:
    """The token's EIP-712 (name, version), as the token contract says."""
    if not _token_domain_reader:
        raise DependencyUnavailable("No token is configured on this marketplace.", code="chain_not_configured")
    return _token_domain_reader[0]()


def network() -> str:
    """This marketplace's chain as a CAIP-2 id, x402's network naming (e.g. "eip155:8453" for Base)."""
    return f"eip155:{settings.CHAIN_ID}"


def payment_requirements(*, amount: int, pay_to: str, max_timeout_seconds: int,
                         resource: str | None = None) -> PaymentRequirements:
    """x402 "exact" requirements for `amount` USDC base units paid to `pay_to`; with `resource` (a path), only a
    payment quoted for that resource meets them."""
    name, version = token_domain()
    extra = {"name": name, "version": version}
    if resource:
        extra["resource"] = resource
    return PaymentRequirements(
        scheme=evm.SCHEME_EXACT, network=network(), asset=chainconfig.usdc_address(), amount=str(amount),
        pay_to=pay_to, max_timeout_seconds=max_timeout_seconds, extra=extra,
    )


def payment_required(*, requirements: PaymentRequirements, url: str, description: str,
                     error: str | None = None) -> PaymentRequired:
    """x402's 402 body; `error` is x402's string: our error code."""
    return PaymentRequired(error=error, resource=ResourceInfo(url=url, description=description,
                                                              mime_type="application/json"),
                           accepts=[requirements])


def payment_required_headers(*, requirements: PaymentRequirements, required: PaymentRequired) -> dict[str, str]:
    """The Services API seed's X-Payment-* headers (with the quoted authorization's nonce and window, which a bare
    signature signs) and x402 v2's PAYMENT-REQUIRED header."""
    headers = {
        "X-Payment-Amount": format_amount(int(requirements.amount), USDC_DECIMALS),
        "X-Payment-Currency": "USDC",
        "X-Payment-Address": requirements.pay_to,
        "X-Payment-Chain": settings.CHAIN_NETWORK,
        "PAYMENT-REQUIRED": encode_payment_required_header(required),
    }
    extra = requirements.extra or {}
    if "nonce" in extra:
        headers.update({"X-Payment-Nonce": extra["nonce"], "X-Payment-Valid-After": str(extra["validAfter"]),
                        "X-Payment-Valid-Before": str(extra["validBefore"])})
    return headers


def payment_response_header(authorization: Authorization, *, tx_hash: str) -> dict[str, str]:
    """x402 v2's PAYMENT-RESPONSE header (its SettleResponse, base64): the payment's transaction, network, payer."""
    settled = SettleResponse(success=True, transaction=tx_hash, network=network(), payer=authorization.payer,
                             amount=str(authorization.amount))
    return {"PAYMENT-RESPONSE": encode_payment_response_header(settled)}


def payment_required_quote(requirements: PaymentRequirements, *, holder: str, url: str, description: str,
                           error: str, now: int | None = None) -> tuple[PaymentRequired, dict[str, str]]:
    """x402's 402 for `requirements`, with an authorization quoted for `holder` (`quote_issue`, its window counted
    from `now`): its `PaymentRequired` body and headers."""
    quoted = quote_issue(requirements, holder=holder, now=now)
    required = payment_required(requirements=quoted, url=url, description=description, error=error)
    return required, payment_required_headers(requirements=quoted, required=required)


def payment_header(headers) -> str | None:
    """The signed payment a request carries, from whichever of `PAYMENT_HEADERS` it used."""
    for name in PAYMENT_HEADERS:
        if headers.get(name):
            return headers[name].strip()
    return None


def _quotes_key(resource: str, holder: str) -> str:
    return f"x402-quotes:{resource}:{holder}"


def quote_issue(requirements: PaymentRequirements, *, holder: str, now: int | None = None) -> PaymentRequirements:
    """`requirements` with one authorization quoted in `extra` (`nonce`, `validAfter`, `validBefore`), kept for
    `holder` (who asked: an agent, or a client address) so that a bare signature of it can be rebuilt. x402
    clients ignore these and sign their own nonce."""
    now = int(time.time()) if now is None else now
    quote = {"nonce": "0x" + secrets.token_hex(32), "validAfter": 0, "validBefore": now + requirements.max_timeout_seconds}
    key = _quotes_key(requirements.extra["resource"], holder)
    kept = [q for q in cache.get(key, []) if q["validBefore"] > now][-(QUOTES_KEPT - 1):]
    cache.set(key, [*kept, quote], timeout=requirements.max_timeout_seconds)
    return requirements.model_copy(update={"extra": {**requirements.extra, **quote}})


def is_bare_signature(header: str) -> bool:
    return bool(BARE_SIGNATURE.match(header))


def quoted_authorization(signature: str, requirements: PaymentRequirements, *, payer: str | None,
                         holder: str, chain_clock: Callable[[], int] | None = None) -> Authorization:
    """The authorization a bare signature signs: one that this resource's 402 quoted `holder`, from `payer`."""
    if not payer:
        raise InvalidPayment("payer_unknown", f"A bare signature needs its payer: call with your agent's API key, "
                                              f"or name the paying wallet in {PAYER_HEADER}.")
    if not is_address(payer):
        raise InvalidPayment("malformed_payment", f"{PAYER_HEADER} is not an address.")
    for quote in reversed(cache.get(_quotes_key(requirements.extra["resource"], holder), [])):
        authorization = ExactEIP3009Authorization(
            from_address=payer, to=requirements.pay_to, value=requirements.amount,
            valid_after=str(quote["validAfter"]), valid_before=str(quote["validBefore"]), nonce=quote["nonce"])
        if _signed_by(authorization, signature, asset=requirements.asset):
            return check(PaymentPayload(payload=ExactEIP3009Payload(authorization, signature).to_dict(),
                                        accepted=requirements), requirements,
                         max_validity_seconds=_validity_asked(requirements), chain_clock=chain_clock)
    raise InvalidPayment("no_quoted_authorization", "This signature is not the payer's over any authorization "
                                                    "this resource quoted you: sign the 402's nonce and window "
                                                    "(X-Payment-Nonce, -Valid-After, -Valid-Before), from the "
                                                    "same caller.", evm.ERR_INVALID_SIGNATURE)


def payment_verify(header: str, requirements: PaymentRequirements, *, payer: str | None, holder: str,
                   is_retry: RetryCheck | None = None, chain_clock: Callable[[], int] | None = None) -> Authorization:
    """The authorization a signed payment carries, checked against `requirements` without the chain (but its clock,
    `chain_clock`, when ours refuses the window: see `check`): an x402 payment payload, or a bare signature of an
    authorization quoted to `holder` from `payer`. An authorization the platform already took is refused (naming
    what it bought when `is_retry` says the call is its caller's retry). Raises InvalidPayment."""
    if is_bare_signature(header):
        authorization = quoted_authorization(header, requirements, payer=payer, holder=holder,
                                             chain_clock=chain_clock)
    else:
        authorization = check(decode(header), requirements, max_validity_seconds=_validity_asked(requirements),
                              chain_clock=chain_clock)
    authorization_refuse_replay(authorization, is_retry=is_retry)
    return authorization


def _validity_asked(requirements: PaymentRequirements) -> int:
    """How far a payment's validBefore may be: what the 402 asked for (x402 clients sign now + maxTimeoutSeconds),
    give or take a clock's drift."""
    return requirements.max_timeout_seconds + VALIDITY_DRIFT_SECONDS


def decode(header: str) -> PaymentPayload:
    """x402's base64 JSON payment payload (v1 payloads are normalised to v2's shape)."""
    try:
        # x402 parses it with json.loads, which has no depth limit and keeps the last of a key given twice (other
        # parsers the first): a payment means one thing.
        data = bounded_json.loads(safe_base64_decode(header), duplicate_keys=False)
        version = data.get("x402Version", 2) if isinstance(data, dict) else 2
        # x402 reads anything equal to 1 (`true`, `1.0`) as v1 and anything else (3, "2", 2.0) as v2: a payment
        # says which protocol it speaks in one spelling, one this server speaks.
        if type(version) is not int or version not in X402_VERSIONS:
            raise InvalidPayment("unsupported_x402_version", f"x402Version must be one of {list(X402_VERSIONS)}, "
                                                             f"a JSON integer.", details={"supported": X402_VERSIONS})
        payload = decode_payment_signature_header(header)
    except (binascii.Error, UnicodeDecodeError, ValidationError, ValueError, AttributeError, TypeError) as exc:
        raise InvalidPayment("malformed_payment", "The payment header is neither a base64 x402 payment payload "
                                                  "nor a bare 65-byte signature.") from exc
    if isinstance(payload, PaymentPayload):
        return payload
    # v1: scheme and network at the top level; the authorization is the same.
    return PaymentPayload(payload=payload.payload, accepted=PaymentRequirements(
        scheme=payload.scheme, network=payload.network, asset="", amount="0", pay_to="", max_timeout_seconds=0))


def check(payload: PaymentPayload, requirements: PaymentRequirements, *, max_validity_seconds: int,
          min_validity_seconds: int = 6, now: int | None = None,
          chain_clock: Callable[[], int] | None = None) -> Authorization:
    """Everything but the chain: scheme, network, recipient, amount, validity window and the payer's signature.
    `max_validity_seconds`: the furthest validBefore may be (400/402 `payment_valid_too_long` beyond): an authorization
    is bearer until then whatever becomes of its purchase, and a closed or failed one is watched from the chain that
    long. The window is checked at `now` (our clock by default); refused there, at `chain_clock()` (the next block's
    time) when given, which decides."""
    if payload.accepted.scheme != evm.SCHEME_EXACT:
        raise _reject(evm.ERR_UNSUPPORTED_SCHEME, "Only the x402 'exact' scheme is accepted.")
    if payload.accepted.network not in (requirements.network, settings.CHAIN_NETWORK):
        raise _reject(evm.ERR_NETWORK_MISMATCH, f"Pay on {requirements.network}.")
    if payload.accepted.asset and payload.accepted.asset.lower() != requirements.asset.lower():
        raise InvalidPayment("wrong_asset", f"Pay in USDC at {requirements.asset}.")
    try:
        evm_payload = ExactEIP3009Payload.from_dict(payload.payload)
        authorization = evm_payload.authorization
        nonce = hex_to_bytes(authorization.nonce)
        signature = hex_to_bytes(evm_payload.signature or "")
        values = Authorization(
            payer=authorization.from_address, pay_to=authorization.to, amount=_uint(authorization.value),
            valid_after=_uint(authorization.valid_after), valid_before=_uint(authorization.valid_before),
            # One spelling per byte string (0x, lowercase, no spaces): the nonce keys the replay check, the
            # signature is recorded (a spelling padded with spaces outgrew its column) and compared by a retry;
            # the chain reads "ab..", "0xAB.." and "0xab .." alike.
            nonce="0x" + nonce.hex(), signature="0x" + signature.hex() if signature else "",
        )
        nonce_length = len(nonce)
    except (AttributeError, TypeError, ValueError) as exc:
        raise InvalidPayment("malformed_payment", "The authorization's fields are not valid numbers/hex.") from exc
    if not (is_address(values.payer) and is_address(values.pay_to)):
        raise InvalidPayment("malformed_payment", "The authorization's from/to are not addresses.")
    if nonce_length != 32 or not values.signature:
        raise InvalidPayment("malformed_payment", "The authorization needs a 32-byte nonce and a signature.")
    if values.valid_after < 0 or values.valid_before > MAX_VALID_BEFORE:
        raise InvalidPayment("malformed_payment", f"validAfter and validBefore must be times from 0 to "
                                                  f"{MAX_VALID_BEFORE}.")
    if requirements.extra.get("resource"):
        _require_resource(payload, requirements.extra["resource"])
    if values.pay_to.lower() != requirements.pay_to.lower():
        raise _reject(evm.ERR_RECIPIENT_MISMATCH, f"The authorization must pay {requirements.pay_to}.")
    if values.amount != int(requirements.amount):
        raise _reject(evm.ERR_AUTHORIZATION_VALUE_MISMATCH,
                      f"The authorization must be for exactly {requirements.amount} base units.")
    window = dict(min_validity_seconds=min_validity_seconds, max_validity_seconds=max_validity_seconds)
    refused = _window_refusal(values, now=int(time.time()) if now is None else now, **window)
    signed = None
    if refused is not None and chain_clock is not None:
        # Our clock may have drifted from the chain's, the one the token contract checks the window against (and the
        # buyer signed by): it decides. Read only when ours refuses, so a paid call asks the node nothing more; and
        # only for an authorization its payer signed, so a forged one (anyone's to send) makes it read nothing.
        signed = _signed_by(authorization, values.signature, asset=requirements.asset)
        if signed:
            refused = _window_refusal(values, now=chain_clock(), **window)
    if refused is not None:
        raise refused
    if not (signed or _signed_by(authorization, values.signature, asset=requirements.asset)):
        raise _reject(evm.ERR_INVALID_SIGNATURE, "The signature is not the payer's over this authorization.")
    return values


def _uint(value) -> int:
    """An authorization's number as x402 spells it: a string of ASCII digits (or a JSON integer). Python's int(),
    which x402 reads it with, also takes "٢٠٠٠٠", "20_000", " +20000 " and 20000.0: one payment spelled many ways,
    read by us as a number another reader of the header does not see."""
    if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
        return value
    if isinstance(value, str) and UINT_DIGITS.fullmatch(value):
        return int(value)
    raise ValueError(f"not a string of digits: {value!r}")


def _window_refusal(values: Authorization, *, now: int, min_validity_seconds: int,
                    max_validity_seconds: int) -> InvalidPayment | None:
    """Why the authorization's validity window is refused at `now` (the earliest `block.timestamp` a transaction
    sent now meets), or None. The token takes an authorization only in a block strictly after its validAfter: one
    valid from `now` itself reverts in a block mined at `now`."""
    if values.valid_before < now + min_validity_seconds:
        return _reject(evm.ERR_VALID_BEFORE_EXPIRED,
                       f"validBefore must be at least {min_validity_seconds} s in the future.")
    if values.valid_after >= now:
        return _reject(evm.ERR_VALID_AFTER_FUTURE, "validAfter must be in the past: the token takes the "
                                                   "authorization only after it.")
    if values.valid_before > now + max_validity_seconds:
        return InvalidPayment("payment_valid_too_long", f"validBefore must be at most {max_validity_seconds} s away.",
                              details={"max_seconds": max_validity_seconds})
    return None


def _signed_by(authorization: ExactEIP3009Authorization, signature: str, *, asset: str) -> bool:
    """Whether `signature` is the authorization's payer's, under the token's EIP-712 domain, as the token takes it
    (a high-s twin, or a v of 0 or 1, recovers to the payer in Python and reverts on the chain: a direct purchase so
    signed was offered to its seller and failed at the accept)."""
    name, version = token_domain()
    try:
        raw = hex_to_bytes(signature)
        if not signatures.contracts_take(raw):
            return False
        digest = hash_eip3009_authorization(authorization, settings.CHAIN_ID, asset, name, version)
        return verify_eoa_signature(digest, raw, authorization.from_address)
    except Exception:  # noqa: BLE001 - whatever a malformed signature raises, it is not the payer's
        return False


def _require_resource(payload: PaymentPayload, resource: str) -> None:
    """The payload's accepted requirements, and its resource when it names one, must be `resource`'s (a v1
    payload echoes neither, so it cannot pay for a bound resource)."""
    quoted = (payload.accepted.extra or {}).get("resource")
    named = _path_of(payload.resource.url) if payload.resource is not None else resource
    if quoted != resource or named != resource:
        raise InvalidPayment("wrong_resource", f"This payment was quoted for {quoted or named or 'no resource'}, "
                                               f"not {resource}: sign what this resource's 402 asks for.",
                             details={"resource": resource})


def _path_of(url: str) -> str | None:
    """The path of the payload's resource URL; None for one that is no URL (urlsplit raises on "http://[::1")."""
    try:
        return urlsplit(url).path
    except ValueError:
        return None


def _already_used(authorization: Authorization, seen: PaymentAuthorization | None,
                  is_retry: RetryCheck | None = None) -> InvalidPayment:
    details = {}
    # A retry after a lost answer learns what it bought: the same signed payment, from the same caller with the same
    # request (`is_retry`). Not the signed payment alone: its transaction's calldata shows it to anyone, who would
    # read the paid result at the invocation's id.
    if seen is not None and is_retry is not None and seen.signature.lower() == authorization.signature.lower():
        invocation = getattr(seen, "invocation", None)
        if invocation is not None and is_retry(invocation):
            details["invocation_id"] = invocation.public_id
    return InvalidPayment("authorization_already_used", "This authorization was already submitted; it is executed "
                                                        "once.", evm.ERR_NONCE_ALREADY_USED, details)


def authorization_refuse_replay(authorization: Authorization, *, is_retry: RetryCheck | None = None) -> None:
    """Refuse an authorization the platform already took, before asking the chain anything."""
    seen = PaymentAuthorization.objects.filter(token_address=chainconfig.usdc_address(), payer=authorization.payer,
                                               nonce=authorization.nonce).first()
    if seen is not None:
        raise _already_used(authorization, seen, is_retry)


def retry_proof_valid(record: PaymentAuthorization, proof: str) -> bool:
    """Whether `proof` is the payer's signature of its retry of what `record` paid: only the payer's key makes one,
    where the signed payment itself is anyone's once its transaction is sent."""
    return bool(proof) and x402_signing.retry_proof_signer(proof, payer=record.payer, nonce=record.nonce) == \
        to_checksum_address(record.payer)


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
