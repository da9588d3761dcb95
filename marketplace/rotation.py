"""Rolling a signing secret as payment platforms do (Stripe's "roll secret"), for services' proxy secrets and
webhook subscriptions' secrets: the new secret signs at once, and the one it replaced keeps signing beside it for
an overlap its owner chooses (at most a day), so a receiver switches to the new secret when it is ready.

A rotation during an overlap retires the current secret in its turn: the one before it stops signing at once. So a
message carries at most two signatures, and a rotation with no overlap ends a running one (a leaked secret).
"""

from datetime import datetime, timedelta

from django.db.models import F

OVERLAP_MAX_SECONDS = 86_400
# A receiver that has not deployed the new secret yet refuses what it gets; a seller's upstream that refuses a
# proxied call still has it charged (4xx): so a rotation keeps the old secret an hour unless told otherwise.
OVERLAP_DEFAULT_SECONDS = 3_600


def rotation_assignments(*, secret_field: str, previous_field: str, expires_field: str, new_secret: str,
                         overlap_seconds: int, now: datetime) -> dict:
    """An UPDATE's assignments rolling `secret_field` to `new_secret`. The secret retired is read by the statement
    itself, so of two rotations at once the second retires the first's secret, never a stale copy."""
    if overlap_seconds == 0:
        return {secret_field: new_secret, previous_field: "", expires_field: None}
    return {secret_field: new_secret, previous_field: F(secret_field),
            expires_field: now + timedelta(seconds=overlap_seconds)}


def previous_secret_signing(previous_secret: str, expires_at: datetime | None, *, now: datetime) -> str:
    """The replaced secret while its overlap runs, else ""."""
    return previous_secret if previous_secret and expires_at is not None and now < expires_at else ""


def overlap_ends_at(previous_secret: str, expires_at: datetime | None, *, now: datetime) -> datetime | None:
    """When the running overlap ends; None when none runs."""
    return expires_at if previous_secret_signing(previous_secret, expires_at, now=now) else None
