"""How a seller checks that a call came through the marketplace's metered proxy.

Every proxied request carries:
  X-Marketplace-Agreement   the agreement id
  X-Marketplace-Call-Seq    the agreement's call number (unique; concurrent calls may arrive out of order, a retry
                            of a failed call gets a new one)
  X-Marketplace-Timestamp   unix seconds when the proxy sent it
  X-Marketplace-Signature   v1=<hex HMAC-SHA256(proxy_secret, "<agreement>.<call seq>.<timestamp>.<METHOD>.<path?query>")>
The proxy secret is the service's `proxy_secret` (GET /agents/services/{id} as the seller). Reject timestamps
more than 300 s away from your clock, and call numbers you have already served.
"""

import hashlib
import hmac
import time
from collections.abc import Mapping

TOLERANCE_SECONDS = 300


def _message(agreement_id: str, call_seq: int, timestamp: int, method: str, path: str) -> bytes:
    return f"{agreement_id}.{call_seq}.{timestamp}.{method.upper()}.{path}".encode()


def sign(secret: str, *, agreement_id: str, call_seq: int, timestamp: int, method: str, path: str) -> str:
    mac = hmac.new(secret.encode(), _message(agreement_id, call_seq, timestamp, method, path), hashlib.sha256)
    return f"v1={mac.hexdigest()}"


def _canonical_int(value: str) -> int:
    """ASCII digits as the proxy writes them: one spelling per number, so a seller's "already served" check on
    the header cannot be passed by `012`, `+12` or `1_2` under call 12's signature."""
    if not (value.isascii() and value.isdigit()) or str(int(value)) != value:
        raise ValueError(f"not a canonical integer: {value!r}")
    return int(value)


def verify(secret: str, headers: Mapping[str, str], *, method: str, path: str, now: float | None = None) -> bool:
    """`headers` as the seller received them (case-insensitive mapping or plain dict with canonical names)."""
    lowered = {key.lower(): value for key, value in headers.items()}
    try:
        agreement_id = lowered["x-marketplace-agreement"]
        call_seq = _canonical_int(lowered["x-marketplace-call-seq"])
        timestamp = _canonical_int(lowered["x-marketplace-timestamp"])
        signature = lowered["x-marketplace-signature"]
    except (KeyError, ValueError):
        return False
    if abs((now or time.time()) - timestamp) > TOLERANCE_SECONDS:
        return False
    expected = sign(secret, agreement_id=agreement_id, call_seq=call_seq, timestamp=timestamp, method=method,
                    path=path)
    return hmac.compare_digest(expected, signature)
