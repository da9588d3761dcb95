"""How a webhook receiver checks that a delivery came from the marketplace.

Every delivery carries, like Stripe's:
  Marketplace-Signature   t=<unix seconds>,v1=<hex HMAC-SHA256(secret, "<t>.<body>")>
  Marketplace-Event-Id    the event's id (a delivery may come more than once: dedupe on it)
The secret is the subscription's, shown when it is created or rotated. Reject timestamps more than 300 s away from
your clock.

While a rotation's overlap runs (POST /agents/{agent_id}/webhooks/{id}/rotate, at most a day) a second `v1=`
follows the first, signed with the secret the rotation replaced. The first is always the current secret's, so a
verifier that reads only the first `v1` (the Pægents SDK's `verify_webhook_signature`) passes with the new secret;
`verify` passes with either, so a receiver deploys the new secret when it is ready.
"""

import hashlib
import hmac
import time

from sdk.hmac_check import any_signature_matches, canonical_int

SIGNATURE_HEADER = "Marketplace-Signature"
TOLERANCE_SECONDS = 300


def _mac(secret: str, body: bytes, timestamp: int) -> str:
    return hmac.new(secret.encode(), f"{timestamp}.".encode() + body, hashlib.sha256).hexdigest()


def sign(secret: str, body: bytes, timestamp: int, *, previous_secret: str = "") -> str:
    """The header's value; with `previous_secret` (a rotation's overlap), its signature second."""
    header = f"t={timestamp},v1={_mac(secret, body, timestamp)}"
    return f"{header},v1={_mac(previous_secret, body, timestamp)}" if previous_secret else header


def verify(secret: str, body: bytes, header: str, *, now: float | None = None) -> bool:
    """Whether `secret` made one of the header's `v1` signatures of `body`, within the tolerance. Other schemes
    (`v0=`...) are skipped; a header with no timestamp, two, or one in another spelling than its digits is refused."""
    try:
        items = [item.split("=", 1) for item in header.replace(" ", "").split(",")]
        [timestamp] = [canonical_int(value) for name, value in items if name == "t"]
    except ValueError:  # an item without "=", no "t" or several, a "t" that is not canonical digits
        return False
    if abs((now or time.time()) - timestamp) > TOLERANCE_SECONDS:
        return False
    return any_signature_matches(_mac(secret, body, timestamp), [value for name, value in items if name == "v1"])
