"""Rolling a signing secret as payment platforms do (Stripe's "roll secret"), for services' proxy secrets and
webhook subscriptions' secrets: the new secret signs at once, and the one it replaced keeps signing beside it for
an overlap its owner chooses (at most a day), so a receiver switches to the new secret when it is ready.

A rotation during an overlap retires the current secret in its turn: the one before it stops signing at once. So a
message carries at most two signatures, and a rotation with no overlap ends a running one (a leaked secret).

Once its overlap has ended the replaced secret signs nothing, and a beat task erases it (`replaced_secrets_erase`),
so a database read no longer gives it.
"""

from datetime import datetime, timedelta

from django.db.models import F
from django.utils import timezone

OVERLAP_MAX_SECONDS = 86_400
# A receiver that has not deployed the new secret yet refuses what it gets; a seller's upstream that refuses a
# proxied call still has it charged (4xx): so a rotation keeps the old secret an hour unless told otherwise.
OVERLAP_DEFAULT_SECONDS = 3_600


def rotate(instance, *, secret_field: str, new_secret: str, overlap_seconds: int) -> None:
    """Roll `instance`'s `secret_field` to `new_secret`, the replaced one kept in `previous_<secret_field>` until
    `previous_<secret_field>_expires_at`, in one UPDATE that reads the secret it retires itself (of two rotations at
    once, the second retires the first's secret, never a stale copy); `instance` is then read again."""
    previous, expires = f"previous_{secret_field}", f"previous_{secret_field}_expires_at"
    if overlap_seconds == 0:
        changes = {secret_field: new_secret, previous: "", expires: None}
    else:
        changes = {secret_field: new_secret, previous: F(secret_field),
                   expires: timezone.now() + timedelta(seconds=overlap_seconds)}
    type(instance)._default_manager.filter(pk=instance.pk).update(**changes)
    instance.refresh_from_db(fields=list(changes))


def previous_secret(row, secret_field: str, *, now: datetime | None = None) -> str:
    """The secret `row`'s last rotation replaced while its overlap runs (it signs too), else ""."""
    previous, expires_at = getattr(row, f"previous_{secret_field}"), getattr(row, f"previous_{secret_field}_expires_at")
    return previous if previous and expires_at is not None and (now or timezone.now()) < expires_at else ""


def overlap_ends_at(row, secret_field: str) -> datetime | None:
    """When `row`'s running overlap ends; None when none runs."""
    return getattr(row, f"previous_{secret_field}_expires_at") if previous_secret(row, secret_field) else None


def replaced_secrets_erase(model, *, secret_field: str, now: datetime | None = None) -> int:
    """Erase the replaced `secret_field` of every `model` row whose overlap has ended, in one UPDATE; how many rows.
    Safe to run twice. A rotation committed meanwhile gives its row a later expiry, which PostgreSQL's UPDATE reads
    again on the row it waited for: that row's replaced secret is kept."""
    previous, expires = f"previous_{secret_field}", f"previous_{secret_field}_expires_at"
    return model._default_manager.filter(**{f"{expires}__lte": now or timezone.now()}).update(
        **{previous: "", expires: None})
