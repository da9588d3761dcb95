"""What the checks of the marketplace's HMAC signatures share (proxied calls, webhook deliveries)."""

import hmac
import time
from collections.abc import Iterable


def canonical_int(value: str) -> int:
    """ASCII digits as the marketplace writes them: one spelling per number, so a receiver's "already served" check
    cannot be passed by `012`, `+12` or `1_2` under call 12's signature."""
    if not (value.isascii() and value.isdigit()) or str(int(value)) != value:
        raise ValueError(f"not a canonical integer: {value!r}")
    return int(value)


def any_signature_matches(expected: str, signatures: Iterable[str]) -> bool:
    """Whether one of a message's signatures is `expected`: during a secret rotation's overlap a message carries the
    new secret's and the replaced one's, and the receiver holds either. A non-ASCII signature matches nothing
    (hmac.compare_digest raises on one)."""
    return any(given.isascii() and hmac.compare_digest(expected, given) for given in signatures)


def within_tolerance(timestamp: int, tolerance: int, now: float | None = None) -> bool:
    """Whether `timestamp` (unix seconds) is at most `tolerance` seconds from `now` (this machine's clock). Compared,
    not subtracted: a timestamp of hundreds of digits is out of a float's range (OverflowError)."""
    now = time.time() if now is None else now
    return now - tolerance <= timestamp <= now + tolerance
