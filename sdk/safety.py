"""The SDK's refusal to sign what the buyer did not agree to.

Every typed-data object the SDK signs is built here from the agreed terms and the pinned `NetworkConfig`; what
the marketplace sent is only compared with it, field by field, and any difference raises `SigningRefused`
naming the field (`escrow_permit.message.spender`, `challenge.primaryType`, ...). The signature is then made
over the SDK's own object, never over the server's.
"""

from __future__ import annotations

import sys
import time
import warnings
from collections.abc import Mapping
from typing import Any, Protocol

from eth_account import Account

from sdk import typed_data

__all__ = ["DEADLINE_MAX_SECONDS", "DEADLINE_MIN_SECONDS", "DeadlineOutOfRange", "LocalWallet", "SellerUnverified",
           "SigningRefused", "Wallet", "as_wallet", "check_deadline", "check_same", "check_typed_data", "require_equal",
           "typed_message", "warn_seller_unverified"]

# An activation signature must stay usable long enough to be mined, and not lie around for a day.
DEADLINE_MIN_SECONDS = 60
DEADLINE_MAX_SECONDS = 3600


class SigningRefused(ValueError):
    """What the marketplace asked to sign differs from what the buyer agreed to; nothing was signed.

    `field` names the first difference (dotted path), `expected` is the SDK's value, `received` the server's.
    """

    def __init__(self, field: str, expected: Any, received: Any, reason: str = ""):
        self.field = field
        self.expected = expected
        self.received = received
        super().__init__(f"refusing to sign: {field} is {_shown(received)}, expected {_shown(expected)}"
                         + (f" ({reason})" if reason else ""))


# How much of a value a refusal's text shows: the marketplace's may be a hundred kilobytes, and the text is logged.
_SHOWN_CHARS = 200


def _shown(value: Any) -> str:
    """`value`'s repr in a refusal's text, at most `_SHOWN_CHARS` characters of it."""
    text = repr(value)
    if len(text) <= _SHOWN_CHARS:
        return text
    return f"{text[:_SHOWN_CHARS]}... ({len(value) if isinstance(value, str) else len(text)} characters)"


class DeadlineOutOfRange(SigningRefused):
    """A signature deadline too close (unusable) or too far away (a long-lived authorization)."""


class SellerUnverified(UserWarning):
    """A payment or deposit is about to be signed to the seller's wallet the marketplace names, which the buyer did
    not name (`expected_seller_wallet_address=`): a compromised marketplace could name its own. `payee` is that
    wallet, `field` where the marketplace named it. Turn it into an error to sign nothing unverified:
    `warnings.simplefilter("error", SellerUnverified)`."""

    def __init__(self, field: str, payee: Any):
        self.field, self.payee = field, payee
        super().__init__(f"signing a payment to {payee!r}, the seller's wallet as the marketplace names it ({field}), "
                         "unverified: pass expected_seller_wallet_address= (the seller's own word)")


def warn_seller_unverified(field: str, payee: Any) -> None:
    """Warn (`SellerUnverified`) before signing to a payee the buyer did not name, attributed to the caller's own
    line (the first frame outside the SDK), so that each call site is reported and filters can name it."""
    level, frame = 2, sys._getframe(1)
    while frame.f_back is not None and frame.f_globals.get("__name__", "").partition(".")[0] == "sdk":
        level, frame = level + 1, frame.f_back
    warnings.warn(SellerUnverified(field, payee), stacklevel=level)


class Wallet(Protocol):
    """What the SDK needs of a wallet: its address and EIP-712 signing (a local key, a hardware wallet...)."""

    @property
    def address(self) -> str: ...

    def sign_typed_data(self, typed: dict[str, Any]) -> str: ...


class LocalWallet:
    """A private key held in this process."""

    def __init__(self, private_key: str | bytes):
        self._account = Account.from_key(private_key)

    @property
    def address(self) -> str:
        return str(self._account.address)

    def sign_typed_data(self, typed: dict[str, Any]) -> str:
        return typed_data.sign_typed_data(bytes(self._account.key), typed)


def as_wallet(wallet: str | bytes | Wallet) -> Wallet:
    return LocalWallet(wallet) if isinstance(wallet, (str, bytes)) else wallet


def _same_scalar(expected: Any, received: Any) -> bool:
    if isinstance(received, bool) or isinstance(expected, bool):
        return expected is received
    if isinstance(expected, int):
        # JSON may carry a uint256 as a decimal string. Compared as digits: int() raises on one of thousands.
        return isinstance(received, int) and received == expected or (
            isinstance(received, str) and received.isascii() and received.isdigit() and expected >= 0
            and received.lstrip("0") == str(expected).lstrip("0"))
    if isinstance(expected, str) and isinstance(received, str) and expected.startswith("0x"):
        return expected.lower() == received.lower()  # addresses (checksum case) and hex bytes
    return bool(expected == received)


def check_same(received: Any, expected: Any, field: str) -> None:
    """Raise `SigningRefused` at the first path where `received` differs from `expected`: an unknown or missing
    key, another list length, or another value. Mappings are walked in `expected`'s key order, so the first
    difference named is stable (primaryType before types, domain before message)."""
    if isinstance(expected, Mapping):
        if not isinstance(received, Mapping):
            raise SigningRefused(field, "an object", received)
        for key in expected:
            if key not in received:
                raise SigningRefused(f"{field}.{key}", expected[key], None, "missing")
        for key in expected:
            check_same(received[key], expected[key], f"{field}.{key}")
        for key in received:
            if key not in expected:
                raise SigningRefused(f"{field}.{key}", None, received[key], "unknown field")
    elif isinstance(expected, list):
        if not isinstance(received, list) or len(received) != len(expected):
            raise SigningRefused(field, expected, received)
        for index, (got, want) in enumerate(zip(received, expected, strict=True)):
            check_same(got, want, f"{field}[{index}]")
    elif not _same_scalar(expected, received):
        raise SigningRefused(field, expected, received)


def check_typed_data(received: Any, expected: dict[str, Any], field: str) -> None:
    """`check_same` for an EIP-712 full message: what is signed (primaryType, domain, types) first."""
    ordered = {key: expected[key] for key in ("primaryType", "domain", "types", "message")}
    check_same(received, ordered, field)


def require_equal(received: Any, expected: Any, field: str, reason: str = "") -> None:
    if not _same_scalar(expected, received):
        raise SigningRefused(field, expected, received, reason)


def check_deadline(received: Any, field: str, *, now: int | None = None, min_seconds: int = DEADLINE_MIN_SECONDS,
                   max_seconds: int = DEADLINE_MAX_SECONDS) -> int:
    """The server-chosen deadline, if it lies in [now + min_seconds, now + max_seconds]."""
    now = int(time.time()) if now is None else now
    if isinstance(received, bool) or not isinstance(received, int):
        raise DeadlineOutOfRange(field, "a unix time", received)
    if not now + min_seconds <= received <= now + max_seconds:
        raise DeadlineOutOfRange(field, f"between now+{min_seconds} s and now+{max_seconds} s", received,
                                 f"now is {now}")
    return received


def typed_message(received: Any, field: str) -> Mapping[str, Any]:
    """The `message` of a server-sent typed-data object, before it is compared (to read its deadline/nonce)."""
    if not isinstance(received, Mapping) or not isinstance(received.get("message"), Mapping):
        raise SigningRefused(field, "EIP-712 typed data", received)
    message: Mapping[str, Any] = received["message"]
    return message
