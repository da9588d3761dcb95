"""The one check of a signature a caller sends: recover its EIP-712 signer, compare, refuse with a 400."""

from marketplace.errors import InvalidInput
from sdk.typed_data import recover_typed_data_signer


def signer_require(*, typed: dict, signature: str, expected: str, field: str,
                   mismatch_code: str = "wrong_signer") -> None:
    """`signature` must be `expected`'s signature of `typed`. InvalidInput `invalid_signature` when it is not a
    signature at all; `mismatch_code` when it recovers to another address (any change to the signed fields does
    too, so a permit whose fields the caller states says `invalid_signature`)."""
    try:
        signer = recover_typed_data_signer(typed, signature)
    except Exception as exc:  # noqa: BLE001 - any malformed signature is the caller's input error
        raise InvalidInput(f"{field}: not a valid 65-byte signature.", code="invalid_signature",
                           details={"field": field}) from exc
    if signer.lower() != expected.lower():
        raise InvalidInput(f"{field} was signed by {signer}, not by the buyer's wallet {expected}.",
                           code=mismatch_code, details={"field": field, "signer": signer, "expected": expected})
