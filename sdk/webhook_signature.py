"""How a webhook receiver checks that a delivery came from the marketplace.

Every delivery carries, like Stripe's:
  Marketplace-Signature   t=<unix seconds>,v1=<hex HMAC-SHA256(secret, "<t>.<body>")>
  Marketplace-Event-Id    the event's id (a delivery may come more than once: dedupe on it)
The secret is the subscription's, shown when it is created or rotated. Reject timestamps more than 300 s away from
your clock. The signature covers the body, whose `id` the `Marketplace-Event-Id` header repeats, not the header:
dedupe on the body's `id`, or pass the header to `verify` as `event_id`, which refuses a delivery whose header is
not its body's `id` (a delivery replayed within the tolerance under another event id). Likewise dispatch on the
body's `type`, or pass `Marketplace-Event-Type` to `verify` as `event_type`.

While a rotation's overlap runs (POST /agents/{agent_id}/webhooks/{id}/rotate, at most a day) a second `v1=`
follows the first, signed with the secret the rotation replaced. The first is always the current secret's, so a
verifier that reads only the first `v1` (the Pægents SDK's `verify_webhook_signature`) passes with the new secret;
`verify` passes with either, so a receiver deploys the new secret when it is ready.
"""

import hashlib
import hmac

from sdk import bounded_json
from sdk.hmac_check import any_signature_matches, canonical_int, within_tolerance

SIGNATURE_HEADER = "Marketplace-Signature"
TOLERANCE_SECONDS = 300


def _mac(secret: str, body: bytes, timestamp: int) -> str:
    return hmac.new(secret.encode(), f"{timestamp}.".encode() + body, hashlib.sha256).hexdigest()


def sign(secret: str, body: bytes, timestamp: int, *, previous_secret: str = "") -> str:
    """The header's value; with `previous_secret` (a rotation's overlap), its signature second."""
    header = f"t={timestamp},v1={_mac(secret, body, timestamp)}"
    return f"{header},v1={_mac(previous_secret, body, timestamp)}" if previous_secret else header


def verify(secret: str, body: bytes, header: str, *, now: float | None = None, event_id: str | None = None,
           event_type: str | None = None) -> bool:
    """Whether `secret` made one of the header's `v1` signatures of `body`, within the tolerance. Other schemes
    (`v0=`...) are skipped; a header with no timestamp, two, or one in another spelling than its digits is refused.
    With `event_id` (the delivery's `Marketplace-Event-Id`), the body must also be a JSON object whose `id` is it;
    with `event_type` (its `Marketplace-Event-Type`), one whose `type` is it.
    An empty secret (a setting left unset) verifies nothing: anyone can sign with it."""
    if not secret:
        return False
    if event_id is not None or event_type is not None:
        fields = _body_fields(body)
        if event_id is not None and fields.get("id") != event_id:
            return False
        if event_type is not None and fields.get("type") != event_type:
            return False
    try:
        items = [item.split("=", 1) for item in header.replace(" ", "").split(",")]
        [timestamp] = [canonical_int(value) for name, value in items if name == "t"]
    except ValueError:  # an item without "=", no "t" or several, a "t" that is not canonical digits
        return False
    if not within_tolerance(timestamp, TOLERANCE_SECONDS, now):
        return False
    return any_signature_matches(_mac(secret, body, timestamp), [value for name, value in items if name == "v1"])


def _body_fields(body: bytes) -> dict[str, str]:
    """The body's signed `id` and `type`, those that are strings (none when it is not a JSON object)."""
    try:
        event = bounded_json.loads(body)
    except ValueError:
        return {}
    if not isinstance(event, dict):
        return {}
    return {name: event[name] for name in ("id", "type") if isinstance(event.get(name), str)}
