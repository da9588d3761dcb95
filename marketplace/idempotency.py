"""`Idempotency-Key` for POSTs, as Stripe does it.

The first request claims the key (a committed row), then runs inside one database transaction together with
saving its response, so either both the effect and the stored response exist or neither does. A retry with the
same key and body gets the stored response (`Idempotent-Replayed: true`); the same key with another body is 422;
a retry while the first is still running is 409. Responses of 5xx are not stored: the key is released.

A handler that talks to the chain or another service before it writes is declared `atomic=False`: no
transaction is held open across its network calls (its service commits its own writes), and the response is
stored right after. A process that dies in between leaves the claim to go stale; the retry then runs the
handler again, which its service makes safe (activation: the agreement has moved on from `accepted`, so the retry
is answered 409 and no second transaction is queued).

A handler whose writes must stay atomic but need facts from the chain first declares `prepare`: it runs after
the key is claimed and before the transaction opens, and the handler receives what it returns as `prepared`. A
replay is answered from the stored response, so it asks the chain nothing.

An answer showing a secret once (an API key, a proxy or webhook secret; `shown_once`) is stored without it. A
replay reads the secret again from the row that keeps it, while that row's secret is still the one issued; else it
answers null, the `Idempotent-Secret-Withheld` header saying why (`not_kept`: no row keeps it, as an API key is
kept as a digest; `replaced`: rotated since; `deleted`: the row was deleted since, or its secret erased, as a
deleted webhook subscription's is).
"""

import contextlib
import functools
import hashlib
import hmac
import json
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime

from django.apps import apps
from django.conf import settings
from django.db import IntegrityError, connection, models, transaction
from django.utils import timezone
from rest_framework.response import Response

from marketplace import bounded_json, sweeps
from marketplace.errors import Conflict, InvalidInput, Unprocessable
from marketplace.models import IdempotencyRecord
from marketplace.postgresql import prepared_cursor
from marketplace.renderers import render_for_storing

HEADER = "Idempotency-Key"
SECRET_WITHHELD_HEADER = "Idempotent-Secret-Withheld"
_SHOWN_ONCE = "idempotency_shown_once"  # a response's attribute: the `_ShownOnce` of its secret
MAX_KEY_LENGTH = 255


@dataclass(frozen=True)
class _ShownOnce:
    """Where a replay finds the secret an answer showed once, in the answer's `field`."""
    field: str
    row: str  # "<app_label>.<Model>:<pk>" of the row keeping it as `field`; "" when none does
    digest: str  # `_secret_digest` of the secret issued; "" when no row keeps it


def shown_once(response, secret_field: str, *, kept_by: models.Model | None = None):
    """`response`, whose `secret_field` holds a secret shown once: no record keeps it. Its replays read it from
    `kept_by` (the row keeping it under the same field name) while that row still holds the secret issued, else
    answer null (see the module's docstring)."""
    secret = response.data[secret_field]
    setattr(response, _SHOWN_ONCE, _ShownOnce(
        field=secret_field, row="" if kept_by is None else f"{kept_by._meta.label}:{kept_by.pk}",
        digest="" if kept_by is None else _secret_digest(secret)))
    return response


def _secret_digest(secret: str) -> str:
    # Keyed: a webhook secret may be chosen by its owner, so a plain hash of it could be guessed from the table.
    return hmac.new(settings.SECRET_KEY.encode(), secret.encode(), hashlib.sha256).hexdigest()


def _replay(record: IdempotencyRecord) -> Response:
    body, headers = record.response_body, {"Idempotent-Replayed": "true"}
    if record.secret_field:
        secret, withheld = _secret_if_still_issued(record) if record.secret_row else (None, "not_kept")
        body = {**body, record.secret_field: secret}
        if secret is None:
            headers[SECRET_WITHHELD_HEADER] = withheld
    return Response(body, status=record.response_status, headers=headers)


def _secret_if_still_issued(record: IdempotencyRecord) -> tuple[str, None] | tuple[None, str]:
    """The secret issued, read from the row keeping it, or None and why not (the header's value)."""
    label, pk = record.secret_row.rsplit(":", 1)
    current = apps.get_model(label)._default_manager.filter(pk=pk).values_list(
        record.secret_field, flat=True).first()
    if not current:
        return None, "deleted"
    if not hmac.compare_digest(_secret_digest(current), record.secret_digest):
        return None, "replaced"
    return current, None


def _fingerprint(request) -> str:
    body = request.body
    try:
        data = bounded_json.loads(body or b"null")
    except bounded_json.InvalidJSON:  # the parser refuses it with its own error when the view reads it
        return _digest(request, body)
    return fingerprint_of(request, data)


def fingerprint_of(request, data) -> str:
    """The fingerprint of `request` whose body parsed to `data`, for a view that parsed it already."""
    return _digest(request, json.dumps(data, sort_keys=True, separators=(",", ":")).encode())


def _digest(request, canonical: bytes) -> str:
    # Keyed, as `_secret_digest`: a body may hold a secret its sender chose (a webhook's), which a plain hash kept 24
    # hours would let a reader of the database test guesses of offline.
    return hmac.new(settings.SECRET_KEY.encode(),
                    request.method.encode() + b" " + request.path.encode() + b"\n" + canonical,
                    hashlib.sha256).hexdigest()


def _scope(request) -> str:
    agent = getattr(request.auth, "agent", None)
    return f"agent:{agent.pk}" if agent is not None else f"owner:{request.user.pk}"


@dataclass(frozen=True)
class _Claim:
    """A request's hold on its key: the record, and when this request claimed it. Taking a stale or expired claim over
    dates the record anew, so the request that held it before releases nothing (`_release`)."""
    pk: int
    at: datetime


def _claim_insert(scope: str, key: str, fingerprint: str) -> _Claim | None:
    """Claim the key, or None when it is taken. One statement in its own transaction.

    On PostgreSQL its commit does not wait for the WAL flush: a claim is no money, and WAL is flushed in order, so
    the request's own (synchronous) commit, which stores its answer on this record, makes the claim durable with
    it; a crash of the database before then loses at most a claim whose request had no effect yet."""
    if connection.vendor != "postgresql":
        try:
            with transaction.atomic():
                record = IdempotencyRecord.objects.create(scope=scope, key=key, request_fingerprint=fingerprint)
        except IntegrityError:
            return None
        return _Claim(record.pk, record.created_at)
    now = timezone.now()
    quote = connection.ops.quote_name
    flush = "" if connection.in_atomic_block else " FROM (SELECT set_config('synchronous_commit', 'off', true)) AS flush"
    with prepared_cursor() as cursor:
        cursor.execute(f"INSERT INTO {quote(IdempotencyRecord._meta.db_table)} "  # noqa: S608
                       f"({quote('scope')}, {quote('key')}, {quote('request_fingerprint')}, {quote('created_at')}) "
                       f"SELECT %s, %s, %s, %s{flush} ON CONFLICT ({quote('scope')}, {quote('key')}) DO NOTHING "
                       f"RETURNING {quote('id')}", [scope, key, fingerprint, now])
        row = cursor.fetchone()
    return None if row is None else _Claim(row[0], now)


def _claim(scope: str, key: str, fingerprint: str) -> _Claim | Response:
    """Either a fresh claim on the key, or the response to give instead of running the request. A key whose record is
    older than IDEMPOTENCY_KEY_TTL is a new key: its record is taken over."""
    while True:
        claimed = _claim_insert(scope, key, fingerprint)
        if claimed is not None:
            return claimed
        record = IdempotencyRecord.objects.filter(scope=scope, key=key).first()
        if record is None:
            continue  # released (its request failed) between the insert and this read: claim it afresh
        now = timezone.now()
        expired_before = now - settings.IDEMPOTENCY_KEY_TTL
        if record.created_at >= expired_before:
            break
        if IdempotencyRecord.objects.filter(pk=record.pk, created_at__lt=expired_before).update(
                request_fingerprint=fingerprint, response_status=None, response_body=None, secret_field="",
                secret_row="", secret_digest="", created_at=now):
            return _Claim(record.pk, now)
        # Another request took it over first: read it again.
    if record.request_fingerprint != fingerprint:
        raise Unprocessable(
            "This Idempotency-Key was used with a different request.", code="idempotency_key_reused",
        )
    if record.response_status is not None:
        return _replay(record)
    now = timezone.now()
    stale_before = now - settings.IDEMPOTENCY_STALE_CLAIM
    # A claim left by a process that died mid-request: its transaction rolled back, so it is safe to take over.
    taken = IdempotencyRecord.objects.filter(pk=record.pk, response_status=None, created_at__lt=stale_before).update(
        created_at=now
    )
    if taken:
        return _Claim(record.pk, now)
    raise Conflict("A request with this Idempotency-Key is still in progress.", code="idempotency_in_progress")


def _store(claim: _Claim, request, response, *, commit: bool = False) -> None:
    """The answer onto its claim, in the request's transaction (one statement, no ORM query compilation). On
    PostgreSQL the answer goes as the JSON the response will send (`render_for_storing`: encoded once for both), as
    text cast to jsonb: psycopg's Jsonb adapter took three times as long to quote the ~45 kB answer to a batch of
    usage; and as a parameter bound on the server, not quoted into the statement, which PostgreSQL then lexed byte
    by byte.

    With `commit` (the caller's `transaction.atomic()` block is the transaction and ends right after), on
    PostgreSQL the COMMIT travels with the statement in one pipeline: one round trip less while the request's row
    locks are held (a hot agreement's usage reports wait for each other's, bench/usage.py). The block's own commit
    then finds no transaction open and does nothing; an error of the COMMIT is raised here, in the block, which
    then rolls back (nothing: the transaction has ended) as after a failed commit."""
    fields = IdempotencyRecord._meta
    status, body = fields.get_field("response_status"), fields.get_field("response_body")
    quote = connection.ops.quote_name
    shown = getattr(response, _SHOWN_ONCE, None)
    data = response.data if shown is None else {**response.data, shown.field: None}
    if connection.vendor == "postgresql":
        answer, placeholder = render_for_storing(request, data).decode(), "%s::jsonb"
    else:
        answer, placeholder = body.get_db_prep_save(data, connection), "%s"
    assignments, values = [f"{quote(status.column)} = %s", f"{quote(body.column)} = {placeholder}"], [
        response.status_code, answer]
    if shown is not None:  # the secret itself is left out above
        assignments += [f"{quote(fields.get_field(name).column)} = %s"
                        for name in ("secret_field", "secret_row", "secret_digest")]
        values += [shown.field, shown.row, shown.digest]
    sql = f"UPDATE {quote(fields.db_table)} SET {', '.join(assignments)} WHERE {quote(fields.pk.column)} = %s"  # noqa: S608
    if not (commit and connection.vendor == "postgresql"):
        with prepared_cursor() as cursor:
            cursor.execute(sql, [*values, claim.pk])
        return
    with prepared_cursor() as cursor, prepared_cursor() as control, connection.wrap_database_errors, \
            connection.connection.pipeline():
        cursor.execute(sql, [*values, claim.pk])
        control.execute("COMMIT")


def _release(claim: _Claim) -> None:
    # Not a claim holding its answer: a COMMIT that reached the server but whose reply was lost raises as a failed
    # one does, and releasing its answer had the client's retry run the request again. (Its row lock, held until
    # that transaction ends, makes this wait for it.) Nor one a retry took over since (dated anew): releasing it left
    # the retry's answer unstored, and the next retry with the key ran the request again.
    IdempotencyRecord.objects.filter(pk=claim.pk, created_at=claim.at, response_status__isnull=True).delete()


def expired_records_purge() -> int:
    """Delete the records older than IDEMPOTENCY_KEY_TTL (they replay nothing), a bounded number a run
    (`sweeps.rows_purge`), by idempotency_created_idx: each POST with a new key adds one, and nothing else deleted
    them. How many were deleted."""
    # Only rows still expired when deleted: one taken over meanwhile (`_claim`) is a live claim again.
    return sweeps.rows_purge(
        deletable=IdempotencyRecord.objects.filter(created_at__lt=timezone.now() - settings.IDEMPOTENCY_KEY_TTL),
        order_by=("created_at",))


def idempotent(required: bool = False, atomic: bool = True, prepare: Callable | None = None):
    """Decorates a DRF view handler (post/put) so it honours `Idempotency-Key`; `atomic=False` for a handler that
    makes network calls, `prepare(view, request, *args, **kwargs)` for one that reads the network before its
    atomic writes (see the module's docstring)."""

    def decorator(handler):
        @functools.wraps(handler)
        def wrapper(view, request, *args, **kwargs):
            key = request.headers.get(HEADER)
            if key is None:
                if required:
                    raise InvalidInput(f"The {HEADER} header is required here.", code="idempotency_key_required")
                if prepare is not None:
                    kwargs["prepared"] = prepare(view, request, *args, **kwargs)
                return handler(view, request, *args, **kwargs)
            key_check(key)
            return answer_once(
                request, scope=_scope(request), key=key, fingerprint=_fingerprint(request), atomic=atomic,
                prepare=None if prepare is None else lambda: prepare(view, request, *args, **kwargs),
                handler=lambda **prepared: handler(view, request, *args, **kwargs, **prepared))

        return wrapper

    return decorator


def key_acceptable(key: str) -> bool:
    # No NUL: PostgreSQL's text cannot hold one (the claim's insert raised DataError, a 500).
    return 0 < len(key) <= MAX_KEY_LENGTH and "\x00" not in key


def key_check(key: str) -> None:
    if not key_acceptable(key):
        raise InvalidInput(f"{HEADER} must be 1-{MAX_KEY_LENGTH} characters, none of them NUL.",
                           code="invalid_idempotency_key")


def answer_once(request, *, scope: str, key: str, fingerprint: str, handler: Callable[..., Response],
                atomic: bool = True, prepare: Callable[[], object] | None = None) -> Response:
    """`handler()`'s answer under the claim of `key` (checked by `key_check`) in `scope`, or the stored answer to
    the request that claimed it: what `idempotent` does, for a view that dispatches requests itself. `handler`
    receives what `prepare()` returns as `prepared`."""
    claim = _claim(scope, key, fingerprint)
    if isinstance(claim, Response):
        return claim
    try:
        prepared = {} if prepare is None else {"prepared": prepare()}
        # This block is the request's transaction (not a savepoint in a caller's): storing the answer commits it.
        commits = atomic and not connection.in_atomic_block
        with transaction.atomic() if atomic else contextlib.nullcontext():
            if atomic:
                # Held until the answer is stored: a retry that finds the claim stale waits for this transaction
                # (then replays, or takes over a claim whose request rolled back) instead of running it twice.
                list(IdempotencyRecord.objects.select_for_update().filter(pk=claim.pk).values_list("pk", flat=True))
            response = handler(**prepared)
            if response.status_code >= 500:
                raise _DoNotStore(response)
            _store(claim, request, response, commit=commits)
            return response
    except _DoNotStore as failed:
        _release(claim)
        return failed.response
    except Exception:
        # The effects rolled back with the transaction: release the key so a corrected retry can run.
        _release(claim)
        raise


class _DoNotStore(Exception):
    def __init__(self, response):
        self.response = response
