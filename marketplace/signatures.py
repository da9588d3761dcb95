"""Signatures: the one check of a signature a caller sends (recover its EIP-712 signer, compare, refuse with a 400),
and the platform's own signature of a usage receipt."""

from functools import lru_cache

from coincurve import PrivateKey

from marketplace.errors import InvalidInput
from sdk.typed_data import recover_typed_data_signer

# Half the secp256k1 group order: the contracts (OpenZeppelin's ECDSA, USDC's ECRecover) refuse a signature whose s
# is above it (the malleable twin of a valid one), which Python's recovery takes; as they refuse a v other than 27 or
# 28 in the bytes they are given (a challenge, an activation intent), which Python's recovery reads as 0 or 1.
_SECP256K1_HALF_N = 0x7FFFFFFFFFFFFFFFFFFFFFFFFFFFFFFF5D576E7357A4501DDFE92F46681B20A0


def contracts_take(raw: bytes) -> bool:
    """Whether the contracts take a 65-byte EOA signature as given: v 27 or 28, s at most n/2."""
    return len(raw) == 65 and raw[64] in (27, 28) and int.from_bytes(raw[32:64], "big") <= _SECP256K1_HALF_N


def signer_require(*, typed: dict, signature: str, expected: str, field: str,
                   mismatch_code: str = "wrong_signer") -> None:
    """`signature` must be `expected`'s signature of `typed`. InvalidInput `invalid_signature` when it is not a
    signature at all; `mismatch_code` when it recovers to another address (any change to the signed fields does
    too, so a permit whose fields the caller states says `invalid_signature`). A high-s signature, or one whose v is
    not 27 or 28, which the contracts refuse, is `invalid_signature` too: accepted, it would be relayed to revert at
    the relayer's expense, as often as the caller asked."""
    try:
        raw = bytes.fromhex(signature.removeprefix("0x"))
        if not contracts_take(raw):
            raise ValueError("not a 65-byte signature with v 27 or 28 and s at most n/2: refused by the contracts")
        signer = recover_typed_data_signer(typed, signature)
    except Exception as exc:  # noqa: BLE001 - any malformed signature is the caller's input error
        raise InvalidInput(f"{field}: not a valid 65-byte signature.", code="invalid_signature",
                           details={"field": field}) from exc
    if signer.lower() != expected.lower():
        raise InvalidInput(f"{field} was signed by {signer}, not by the wallet {expected}.",
                           code=mismatch_code, details={"field": field, "signer": signer, "expected": expected})


def receipt_sign(private_key: str | bytes, digest: bytes) -> str:
    """The platform's signature of a usage receipt's EIP-712 digest: r ‖ s ‖ v (v = 27 or 28), byte for byte what
    eth-account's `unsafe_sign_hash` makes (libsecp256k1, RFC 6979 nonces, low s). coincurve directly, because it
    runs once per proxied call and eth-account's layers cost ~5x the signature itself."""
    compact = _secp256k1_key(private_key).sign_recoverable(bytes(digest), hasher=None)
    return "0x" + compact[:64].hex() + format(27 + compact[64], "02x")


@lru_cache(maxsize=8)
def _secp256k1_key(private_key: str | bytes) -> PrivateKey:
    return PrivateKey(bytes.fromhex(private_key.removeprefix("0x")) if isinstance(private_key, str) else private_key)
