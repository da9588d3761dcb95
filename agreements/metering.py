"""Writes of metering: reserve → commit | release for proxied calls, seller-reported usage, completion.

Overspend is impossible by construction: a reservation is one conditional UPDATE
(`used + reserved + cost <= deposit_amount`), so concurrent calls never commit more than the deposit, and the
database's CHECK constraint says the same. Commits take the agreement's row lock only to extend the gap-free
usage chain (seq, digest, signed receipt) — never while waiting for the upstream.

No served call is lost when a process dies: each reservation is written together with the call's intent
(`CallIntent`), the upstream's answer is recorded on it before the charge (or by the same statement as the charge,
which then records it only when it cannot charge), and the charge or the release deletes it. Only the
transaction that deletes the intent changes the counters, so a call is settled once whoever settles it.
`intents_reap` (a beat task) settles the intents of dead processes by one rule:

    an intent older than the proxy's timeout plus PROXY_CALL_LEASE_SECONDS plus PROXY_INTENT_GRACE_SECONDS
    belongs to a process that died;
    when its answer was received and recorded, the call is charged as the proxy would have charged it;
    otherwise its reservation is released (nothing was recorded as served, so nothing is charged).
"""

import contextlib
import copy
import dataclasses
import json
import logging
import re
import threading
import time
import uuid
from collections import deque
from contextlib import contextmanager
from dataclasses import dataclass, replace
from datetime import datetime
from functools import lru_cache
from multiprocessing import util as multiprocessing_util

import orjson
from django.conf import settings
from django.db import (
    DEFAULT_DB_ALIAS,
    InterfaceError,
    OperationalError,
    connection,
    connections,
    transaction,
)
from django.db.models import Exists, F, OuterRef, signals
from django.db.models.base import ModelState
from django.utils import timezone

from agreements import monitoring, selectors
from agreements.models import AgreementStatus, CallIntent, ProxyReplay, UsageAgreement, UsageEvent, UsageSource
from marketplace import chainconfig, signatures, sweeps
from marketplace.errors import Conflict, DependencyUnavailable, Forbidden, PaymentRequired, error_body
from marketplace.logging import logs_name_the_agreement
from marketplace.postgresql import prepared_cursor, transaction_in_pipelines
from sdk import receipts

S = AgreementStatus
logger = logging.getLogger(__name__)
BUDGET_USED_UP = "budget_used_up"
_BASE_TYPE = re.compile(r"\(.*\)")  # varchar(16) -> varchar, numeric(78, 0) -> numeric
_REQUEST_ID_MAX = UsageEvent._meta.get_field("request_id").max_length
# What extending the usage chain reads under the row lock: no more, so the locked read stays short
# (`token` labels the charge in the metrics, `status` tells a refunded agreement: `_released_if_refunded`).
_CHAIN_FIELDS = ("id", "chain_id", "deposit_amount", "used", "reserved", "usage_seq", "usage_digest",
                 "completion_requested_at", "token", "receipt_signer", "status")


@dataclass(frozen=True)
class Reservation:
    agreement_id: uuid.UUID
    amount: int
    call_seq: int
    intent_id: int


def _seller_report_require(agreement: UsageAgreement, seller_id: uuid.UUID) -> None:
    """The seller may report usage on the agreement: it is the agreement's seller, and the agreement is not a Masumi
    purchase, which is paid for its job result alone (`job_result_charge`): a report charged the price without one.
    Whatever its service's protocol is now (its seller may have changed it since the purchase); the purchase is read
    with the report's agreement (`selectors.agreement_for_report`), else looked up here."""
    if agreement.seller_id != seller_id:
        raise Forbidden("Only the seller reports usage.", code="seller_only")
    if hasattr(agreement, "masumi_purchase"):
        raise Conflict("A Masumi purchase is charged by its job result only; usage cannot be reported on it.",
                       code="job_result_only")


def party_completion_request(*, agreement: UsageAgreement, reason: str) -> UsageAgreement:
    """A party ends the agreement (`POST /usage-agreements/{id}/complete`). Not a Masumi purchase: it ends by its job
    result (`job_result_charge` asks for completion) or its timers, and a completion asked for before the result
    refused the result and proposed nothing charged: the buyer refunded whole, without the dispute a refund request
    is, for a job the seller was told was paid."""
    if hasattr(agreement, "masumi_purchase"):
        raise Conflict("A Masumi purchase ends by its job result or its timers; request a refund instead.",
                       code="job_result_only")
    return completion_request(agreement=agreement, reason=reason)


def _not_chargeable(agreement: UsageAgreement) -> Conflict:
    return Conflict(f"The agreement is {agreement.status}; calls are billed only while it is active.",
                    code="agreement_not_active", details={"status": agreement.status})


def _autocommit_postgresql() -> bool:
    """PostgreSQL, outside any transaction of the caller's. The thread's connection looked up once: each attribute
    read through `django.db.connection` looks it up again (asgiref's Local, ~3.5 us a read in a slow phase of this
    machine kind), and a proxied call asked this three times over, twice each."""
    db = connections[DEFAULT_DB_ALIAS]
    return db.vendor == "postgresql" and not db.in_atomic_block


@contextmanager
def _transaction_without_flush_wait():
    """One transaction for a reservation change whose COMMIT does not wait for the WAL flush, so the agreement's
    row lock is not held through an fsync (the hot path of every proxied call).

    Safe because WAL is flushed in order: a charge's (synchronous) commit also makes durable every reservation
    change before it; a crash of the database can only lose a reservation (with its intent) whose call was never
    charged, or a release (whose intent the reaper then settles again). Inside a caller's transaction, or off
    PostgreSQL, the caller's own commit decides.
    """
    outermost = not connection.in_atomic_block
    with transaction.atomic():
        if outermost and connection.vendor == "postgresql":
            with connection.cursor() as cursor:
                cursor.execute("SET LOCAL synchronous_commit TO OFF")
        yield


_RESERVE = ("UPDATE {agreements} SET reserved = reserved + %s, call_counter = call_counter + %s "
            "WHERE id = %s AND status = %s AND completion_requested_at IS NULL AND expires_at > %s "
            "AND used + reserved + %s <= deposit_amount "  # the calls' amount, or the headroom a lease needs
            "RETURNING id, call_counter, deposit_amount - used - reserved AS free, expires_at")
_INTENT_COLUMNS = "agreement_id, call_seq, amount, request_id, request_nonce, method, path, created_at"
_INTENT_INSERT = "INSERT INTO {intents} (" + _INTENT_COLUMNS + ") "


@lru_cache(maxsize=2)
def _lease_statement(*, skip_flush_wait: bool) -> str:
    """PostgreSQL: reserve the budget and call numbers of `calls` calls, record an intent for each and (with
    `skip_flush_wait`, outside a caller's transaction) commit without waiting for the WAL flush, as
    _transaction_without_flush_wait explains; one statement, prepared on the server, so one round trip that is
    parsed and planned once per connection. Answers (call_seq, intent id, budget left unreserved, expires_at) per
    call, in call order."""
    flush = "flush AS (SELECT set_config('synchronous_commit', 'off', true)), " if skip_flush_wait else ""
    reserve = _RESERVE.format(agreements=UsageAgreement._meta.db_table)
    return (f"WITH {flush}taken AS ({reserve}), "  # noqa: S608
            f"made AS ({_INTENT_INSERT.format(intents=CallIntent._meta.db_table)}"
            f"SELECT taken.id, taken.call_counter - %s::int + n, %s, %s, %s, %s, %s, %s "
            f"FROM taken, generate_series(1, %s::int) AS n{', flush' if flush else ''} RETURNING call_seq, id) "
            f"SELECT made.call_seq, made.id, taken.free, taken.expires_at FROM made, taken ORDER BY made.call_seq")


def _lease(agreement, amount: int, calls: int, intent: list) -> list[tuple]:
    """Reserve `calls` calls of `amount` on the agreement (PostgreSQL): `_lease_statement`'s rows, none when the
    agreement is not active or its budget does not cover them."""
    now = intent[-1]
    # A lease of several calls is taken only while they are at most 1/LEASE_SHARE of the budget left unreserved.
    headroom = amount * calls * (LEASE_SHARE if calls > 1 else 1)
    params = [amount * calls, calls, agreement.pk, S.ACTIVE, now, headroom, calls, *intent, calls]
    with prepared_cursor() as cursor:
        cursor.execute(_lease_statement(skip_flush_wait=not connection.in_atomic_block), params)
        return cursor.fetchall()


def reservation_take(*, agreement, amount: int, request_id: str, request_nonce: str, method: str,
                     path: str) -> Reservation:
    """Hold `amount` of the budget for one call and record the call's intent with it, or 402 when it would exceed
    the deposit. Outside a caller's transaction on PostgreSQL, from the process's lease of calls when it holds one
    (`_CallLeases`)."""
    now, clock = timezone.now(), time.monotonic()
    intent = [amount, request_id, request_nonce, method, path[:500], now]
    row, db = None, connections[DEFAULT_DB_ALIAS]
    if db.vendor == "postgresql":
        leasing = not db.in_atomic_block and settings.PROXY_CALL_LEASE_MAX > 1
        calls = 1
        if leasing:
            leased, calls = _leased_call(agreement.pk, amount)
            if leased is not None:
                return leased
        try:
            rows = _lease(agreement, amount, calls, intent)
            if not rows and calls > 1:  # too little budget left to lease: it may still cover this one call
                rows = _lease(agreement, amount, 1, intent)
        except (OperationalError, InterfaceError):
            _leases_give_back()  # the database failed: what this process leased may be lost with it
            raise
        finally:
            if calls > 1:
                _lease_done(agreement.pk, amount)
        if rows:
            row = rows[0]
            if leasing:
                _leases_keep(agreement.pk, amount, rows, now=now, clock=clock)
    else:
        with transaction.atomic(), connection.cursor() as cursor:
            cursor.execute(_RESERVE.format(agreements=UsageAgreement._meta.db_table),
                           [amount, 1, UsageAgreement._meta.pk.get_db_prep_value(agreement.pk, connection), S.ACTIVE,
                            now, amount])
            taken = cursor.fetchone()
            if taken is not None:
                cursor.execute(  # noqa: S608
                    f"{_INTENT_INSERT.format(intents=CallIntent._meta.db_table)}VALUES (%s, %s, %s, %s, %s, %s, %s, %s) "
                    "RETURNING call_seq, id", [*taken[:2], *intent])
                row = cursor.fetchone()
    if row is not None:
        return Reservation(agreement_id=agreement.pk, amount=amount, call_seq=row[0], intent_id=row[1])
    current = UsageAgreement.objects.get(pk=agreement.pk)
    if current.status != S.ACTIVE:
        raise _not_chargeable(current)
    exhausted = current.completion_reason == BUDGET_USED_UP or current.remaining < amount
    if not exhausted and (current.completion_requested_at is not None or current.expires_at <= timezone.now()):
        raise Conflict("The agreement is completing; no new calls are billed.", code="agreement_completing",
                       details={"status": current.status})
    raise PaymentRequired("The escrow's remaining budget does not cover this call.", code="budget_exhausted",
                          details={"remaining_atomic": current.remaining, "cost_atomic": amount})


# Call leases. A process serving many calls of one agreement reserves them ahead in one statement (`_lease`): the
# budget and call numbers of up to PROXY_CALL_LEASE_MAX calls, each with its intent, which it then serves from
# memory for PROXY_CALL_LEASE_SECONDS, so most calls make one round trip to the database instead of two (on one hot
# agreement the two row-locking writes per call were what limited it, bench/proxy.py). What a lease changes:
# - Overspend stays impossible: a leased call's budget is reserved, as any call's.
# - Crash safety stays intent-based: a leased call has its intent from the start, so the reaper releases those of a
#   process that died (never charged: nothing was answered on them); the answer records the call's request.
# - A status change, the agreement's expiry or the budget used up elsewhere takes effect within
#   PROXY_CALL_LEASE_SECONDS instead of at the next call (as the API keys' and terms' caches do).
# - Calls a lease did not use are released by the process when they lapse (`_sweep`), so they hold the budget for at
#   most that long; a completion waits for them as for calls in flight.
# A lease doubles while the last one was used up in time and shrinks by what lapsed unused, so an agreement called
# now and then leases one call at a time (as without leases); and it takes at most 1/LEASE_SHARE of the budget left
# unreserved, so near the end of a budget calls are reserved one by one.
LEASE_SHARE = 64
_LEASES_KEPT = 10_000  # agreements (at a price) leased per process; beyond, calls are reserved one by one


@dataclass
class _CallLeases:
    """A process's leased calls of one agreement at one amount."""

    calls: deque  # (call_seq, intent_id, lapses at: monotonic seconds), in call order
    size: int = 1  # calls the next lease asks for
    leasing: bool = False  # a thread is taking a lease of several calls: the others reserve theirs one by one
    lapsed: int = 0  # leased calls that lapsed unused since the last lease
    free: int | None = None  # the agreement's budget left unreserved after the last lease


_call_leases: dict[tuple[uuid.UUID, int], _CallLeases] = {}
_lapsed_calls: list[tuple[uuid.UUID, int]] = []  # (agreement_id, intent_id): to release
_leases_lock = threading.Lock()
_sweeper: threading.Thread | None = None


def _leased_call(agreement_id: uuid.UUID, amount: int) -> tuple[Reservation | None, int]:
    """A call from the process's lease for the agreement at `amount`, or None with the size of the lease to take."""
    clock = time.monotonic()
    with _leases_lock:
        leases = _call_leases.get((agreement_id, amount))
        if leases is None:
            return None, 1
        while leases.calls:
            call_seq, intent_id, lapses_at = leases.calls.popleft()
            if lapses_at > clock:
                return Reservation(agreement_id=agreement_id, amount=amount, call_seq=call_seq,
                                   intent_id=intent_id), 0
            _lapsed_calls.append((agreement_id, intent_id))
            leases.lapsed += 1
        if _lapsed_calls:
            _sweeper_start()
        if leases.leasing:
            return None, 1
        if leases.lapsed:
            leases.size, leases.lapsed = max(1, leases.size - leases.lapsed), 0
        else:
            leases.size = min(settings.PROXY_CALL_LEASE_MAX, leases.size * 2)
        # What this process last saw left bounds the lease it asks for; the statement checks the row itself.
        calls = leases.size if leases.free is None else min(leases.size, max(1, leases.free // max(1, amount * LEASE_SHARE)))
        leases.leasing = calls > 1
        return None, calls


def _lease_done(agreement_id: uuid.UUID, amount: int) -> None:
    with _leases_lock:
        leases = _call_leases.get((agreement_id, amount))
        if leases is not None:
            leases.leasing = False


def _leases_keep(agreement_id: uuid.UUID, amount: int, rows: list[tuple], *, now: datetime, clock: float) -> None:
    """Keep a lease's calls but the first (the caller's) until they lapse: PROXY_CALL_LEASE_SECONDS after the lease
    was asked for (`now`, `clock`: the intents' time, the monotonic one), or when the agreement expires if that is
    sooner."""
    free, expires_at = rows[0][2], rows[0][3]
    with _leases_lock:
        leases = _call_leases.get((agreement_id, amount))
        if leases is None:
            if len(_call_leases) >= _LEASES_KEPT:
                _leases_forget_idle()
            if len(_call_leases) < _LEASES_KEPT:
                leases = _call_leases[(agreement_id, amount)] = _CallLeases(calls=deque())
        if leases is None:  # too many agreements leased here: given back at once
            _lapsed_calls.extend((agreement_id, intent_id) for _, intent_id, *_ in rows[1:])
        else:
            leases.free = int(free)
            lapses_at = clock + min(settings.PROXY_CALL_LEASE_SECONDS, (expires_at - now).total_seconds())
            leases.calls.extend((call_seq, intent_id, lapses_at) for call_seq, intent_id, *_ in rows[1:])
        if _lapsed_calls or (leases is not None and leases.calls):
            _sweeper_start()


def _leases_give_back(agreement_id: uuid.UUID | None = None) -> None:
    """Stop serving the calls leased here (of one agreement, or of all), and release them: after a database failure
    a lease may have been lost with the unflushed commit that wrote it (`_transaction_without_flush_wait`), and a
    call served from it would be forwarded without a reservation. Releasing one that was lost changes nothing."""
    with _leases_lock:
        for (leased_agreement, _), leases in _call_leases.items():
            if agreement_id is None or leased_agreement == agreement_id:
                _lapsed_calls.extend((leased_agreement, call[1]) for call in leases.calls)
                leases.calls.clear()
        if _lapsed_calls:
            _sweeper_start()


def _leases_forget_idle() -> None:
    """(Under _leases_lock.) Forget the agreements whose leases hold no calls."""
    for key in [key for key, leases in _call_leases.items() if not leases.calls]:
        del _call_leases[key]


def _sweeper_start() -> None:
    """(Under _leases_lock.) Start the thread releasing lapsed calls unless it runs."""
    global _sweeper
    if _sweeper is None or not _sweeper.is_alive():
        _sweeper = threading.Thread(target=_sweep, name="call-lease-sweeper", daemon=True)
        _sweeper.start()


def _lapsed_take(clock: float) -> list[tuple[uuid.UUID, int]]:
    """Take every leased call that lapsed by `clock` out of the leases (with those found lapsed already)."""
    with _leases_lock:
        lapsed, _lapsed_calls[:] = list(_lapsed_calls), []
        for (agreement_id, _), leases in _call_leases.items():
            while leases.calls and leases.calls[0][2] <= clock:
                lapsed.append((agreement_id, leases.calls.popleft()[1]))
                leases.lapsed += 1
        return lapsed


def _sweep() -> None:
    """The process's thread releasing lapsed leased calls, a quarter of PROXY_CALL_LEASE_SECONDS after they lapse at
    the latest; it stops when no lease holds a call (`_sweeper_start` starts it again). A release that fails leaves
    the calls to the reaper, which releases them as calls of a process that died."""
    global _sweeper
    while True:
        time.sleep(max(settings.PROXY_CALL_LEASE_SECONDS / 4, 0.05))
        try:
            lapsed = _lapsed_take(time.monotonic())
            if lapsed:
                _lapsed_release(lapsed)
        except Exception:
            logger.exception("releasing lapsed leased calls failed; the reaper will release them")
        finally:
            with contextlib.suppress(Exception):
                connection.close()  # this thread's own: a sweep is seldom, and a test may drop its database meanwhile
        with _leases_lock:
            if not _lapsed_calls and not any(leases.calls for leases in _call_leases.values()):
                _sweeper = None
                return


@lru_cache(maxsize=1)
def _lapsed_release_sql() -> str:
    agreements, intents = UsageAgreement._meta.db_table, CallIntent._meta.db_table
    return ("WITH flush AS (SELECT set_config('synchronous_commit', 'off', true)), "  # noqa: S608
            f"gone AS (DELETE FROM {intents} WHERE id = ANY(%s) AND answered_at IS NULL RETURNING amount) "
            f"UPDATE {agreements} SET reserved = reserved - (SELECT COALESCE(SUM(amount), 0) FROM gone) "
            "FROM flush WHERE id = %s")


def _lapsed_release(lapsed: list[tuple[uuid.UUID, int]]) -> None:
    """Release leased calls nobody used, per agreement in one statement, its own transaction (without waiting for
    the flush, as reservation_release). Calls the reaper released already are gone, and not released twice."""
    by_agreement: dict[uuid.UUID, list[int]] = {}
    for agreement_id, intent_id in lapsed:
        by_agreement.setdefault(agreement_id, []).append(intent_id)
    with connection.cursor() as cursor:
        for agreement_id, intent_ids in by_agreement.items():
            cursor.execute(_lapsed_release_sql(), [intent_ids, agreement_id])


def _leases_release_all() -> None:
    """At the process's exit: release the calls its leases hold (else the reaper does, after its grace)."""
    lapsed = _lapsed_take(float("inf"))
    if lapsed:
        with contextlib.suppress(Exception):
            _lapsed_release(lapsed)


# Not `atexit`: the web server's workers are multiprocessing children (granian), which leave by os._exit() once
# stopped, running multiprocessing's finalizers but not atexit's; a process of its own runs these at exit as well.
multiprocessing_util.Finalize(None, _leases_release_all, exitpriority=0)


def _intent_close(reservation: Reservation) -> bool:
    """Delete the call's intent; False when it is already gone (the reaper settled the call)."""
    with connection.cursor() as cursor:
        cursor.execute(f"DELETE FROM {CallIntent._meta.db_table} WHERE id = %s",  # noqa: S608
                       [reservation.intent_id])
        return cursor.rowcount == 1


# With what was answered, the call's request: a leased call's intent was written before its request was known.
_ANSWERED = f"UPDATE {CallIntent._meta.db_table} SET answered_at = %s, units = %s, cost = %s, " \
            "upstream_status = %s, latency_ms = %s, request_id = %s, request_nonce = %s, method = %s, path = %s "  # noqa: S608


def _answered_values(charge: dict) -> list:
    return [timezone.now(), charge["units"], charge["cost"], charge["upstream_status"], charge["latency_ms"],
            charge["request_id"], charge["request_nonce"], charge["method"], charge["path"]]


def _answered_statement(reservation: Reservation, charge: dict, *, skip_flush_wait: bool) -> tuple[str, list]:
    return (_ANSWERED
            + ("FROM (SELECT set_config('synchronous_commit', 'off', true)) AS flush " if skip_flush_wait else "")
            + "WHERE id = %s", [*_answered_values(charge), reservation.intent_id])


def reservation_answered(*, reservation: Reservation, charge: dict) -> bool:
    """Record what the upstream answered (`charge`, as reservation_commit builds it) before charging it: should this
    process die before the charge is written, the reaper charges the call from this record. False when the database
    went away before it was recorded."""
    # One statement, its own transaction; on PostgreSQL set_config(..., true) lets its commit skip the flush wait.
    statement = _answered_statement(reservation, charge, skip_flush_wait=_autocommit_postgresql())
    try:
        with connection.cursor() as cursor:
            cursor.execute(*statement)
    except (OperationalError, InterfaceError):
        return False  # the database went away: the charge that follows finds out, and settles the call by itself
    return True


def reservation_release(*, reservation: Reservation) -> None:
    _charge_ahead_end(reservation)
    with _transaction_without_flush_wait():
        if _intent_close(reservation):
            UsageAgreement.objects.filter(pk=reservation.agreement_id).update(
                reserved=F("reserved") - reservation.amount)


def agreement_used(*, agreement_id) -> int:
    return UsageAgreement.objects.filter(pk=agreement_id).values_list("used", flat=True).get()


def _call_event(reservation: Reservation, charge: dict) -> UsageEvent | None:
    """The call's event, whoever charged it (this process, or the reaper from the answer recorded on its intent): by
    its call number and its request. Not by the number alone: a crash of the database can lose a lease (its commit
    does not wait for the flush) with the numbers it took, which later calls take again while the process that
    leased them still serves them; the event under such a number is another call's."""
    return UsageEvent.objects.filter(agreement_id=reservation.agreement_id, call_seq=reservation.call_seq,
                                     request_id=charge["request_id"], request_nonce=charge["request_nonce"]).first()


def _resolve_unknown_commit(*, reservation: Reservation, charge: dict) -> UsageEvent | None:
    """After a commit whose outcome is unknown (the database connection was lost): the call's event when the commit
    went through, else None with the reservation released — never both, never neither."""
    connection.close()  # the database dropped it; the next query opens a new connection
    with transaction.atomic():
        UsageAgreement.objects.select_for_update().filter(pk=reservation.agreement_id).first()
        event = _call_event(reservation, charge)
        if event is None:
            reservation_release(reservation=reservation)
    return event


def _append_events(agreement: UsageAgreement, charges: list[dict], *, source: UsageSource) -> list[UsageEvent]:
    """Extend the usage chain under the row lock the caller holds and write the events; the last event gets a
    signed receipt. The caller saves the agreement's counters."""
    return _write_events(agreement, _extend_chain(agreement, charges, source=source))


@lru_cache(maxsize=1)
def _event_fields() -> tuple[list, dict]:
    """UsageEvent's columns but the id, and the defaults of those a charge may leave out."""
    fields = [field for field in UsageEvent._meta.concrete_fields if not field.primary_key]
    return fields, {field.attname: field.get_default() for field in fields if not field.is_relation}


def _extend_chain(agreement, charges: list[dict], *, source: UsageSource, receipt_each: bool = False) -> list[dict]:
    """The events' rows (UsageEvent attribute names) extending the agreement's usage chain, the last one (or with
    `receipt_each`, each one: proxied calls, whose callers each get a receipt) with a signed receipt; the
    agreement's seq, used and digest move to the last event (in memory: `_write_events` writes them). `agreement`
    is a UsageAgreement or a proxied call's `_ChainHead`."""
    rows, seq, cumulative = [], agreement.usage_seq, agreement.used
    defaults, onchain_id, now = _event_fields()[1], agreement.onchain_id, timezone.now()
    # The source's plain value: psycopg finds no dumper for the enum's class and walks its MRO on every statement.
    shared = {"agreement_id": agreement.pk, "source": source.value, "created_at": now}
    for charge in charges:
        seq += 1
        cumulative += charge["cost"]
        rows.append({**defaults, **charge, **shared, "seq": seq, "cumulative": cumulative})
    digests = receipts.usage_digests(agreement.usage_digest, agreement_id=onchain_id, events=[
        (row["seq"], row["units"], row["cost"], row["cumulative"], row["request_id"]) for row in rows])
    for row, digest in zip(rows, digests, strict=True):
        row["usage_digest"] = digest
    key = _receipt_signer_key(agreement)
    for row in rows if receipt_each else rows[-1:]:
        row["receipt_signature"] = signatures.receipt_sign(
            key, receipts.usage_receipt_digest(
                chain_id=agreement.chain_id, escrow_address=chainconfig.escrow_address(), agreement_id=onchain_id,
                seq=row["seq"], cumulative_amount=row["cumulative"], usage_digest=row["usage_digest"]))
    agreement.usage_seq, agreement.used, agreement.usage_digest = seq, cumulative, rows[-1]["usage_digest"]
    return rows


def _receipt_signer_key(agreement) -> str:
    return receipt_signer_key_require(agreement_id=agreement.pk, receipt_signer=agreement.receipt_signer)


def receipt_signer_key_require(*, agreement_id, receipt_signer: str) -> str:
    """The key of the receipt signer an agreement's escrow names (a retired one after a rotation): the buyer's SDK and
    the contract accept no other. 503 `receipt_signer_key_missing` when it is not configured: nothing is charged (a
    receipt of another key would be unverifiable), and the proxy asks before forwarding, so no call is served
    unpaid. A dict lookup (`chainconfig.receipt_signer_key`)."""
    key = chainconfig.agreement_receipt_signer_key(receipt_signer)
    if key is None:
        logger.error("receipt signer key missing", extra={"agreement_id": str(agreement_id),
                                                          "receipt_signer": receipt_signer})
        raise DependencyUnavailable("The key of the receipt signer this agreement's escrow names is not configured; "
                                    "no usage is charged until it is.", code="receipt_signer_key_missing",
                                    details={"receipt_signer": receipt_signer})
    return key


# The events of one write share these (`_extend_chain` sets them once for all): sent once, as parameters.
_SHARED_EVENT_COLUMNS = ("agreement_id", "source", "created_at")


@lru_cache(maxsize=2)
def _events_insert_sql(where: str = "") -> tuple[str, list, list]:
    """PostgreSQL's INSERT of UsageEvent rows from one JSON document (`_write_events`), returning seq and id, when
    the SQL condition `where` holds (if one is given); with the fields that are parameters of their own
    (`_SHARED_EVENT_COLUMNS`) and the columns in the document (column, attribute name, the default the document
    leaves out). Both in the order of the model's fields, as in the SELECT."""
    fields, defaults, quote = *_event_fields(), connection.ops.quote_name
    shared = [field for field in fields if field.attname in _SHARED_EVENT_COLUMNS]
    per_event = [field for field in fields if field not in shared]

    def base_type(field) -> str:
        return _BASE_TYPE.sub("", field.db_type(connection))

    def value(field) -> str:
        if field in shared:
            return f"%s::{base_type(field)}"
        # The document leaves out a value equal to its column's default: '' here, or NULL (a key left out).
        return f"COALESCE(event.{quote(field.column)}, '')" if defaults.get(field.attname) == "" else \
            f"event.{quote(field.column)}"

    record = ", ".join(f"{quote(field.column)} {base_type(field)}" for field in per_event)
    return (f"INSERT INTO {quote(UsageEvent._meta.db_table)} ({', '.join(quote(field.column) for field in fields)}) "
            f"SELECT {', '.join(value(field) for field in fields)} "  # noqa: S608
            f"FROM json_to_recordset(%s::json) AS event({record}) "
            f"{f'WHERE {where} ' if where else ''}RETURNING seq, id",
            shared, [(field.column, field.attname, defaults.get(field.attname)) for field in per_event])


def _events_document(rows: list[dict], per_event: list[tuple]) -> str:
    """The events' rows as the JSON document `_events_insert_sql` reads: the columns `per_event` names, each left out
    where it holds its column's default. Encoded by orjson (a batch of 100 in ~15 us against json's ~200 us), by
    json where orjson refuses (an integer beyond 64 bits, a lone surrogate): PostgreSQL reads either alike."""
    document = [{column: value for column, attname, default in per_event if (value := row[attname]) != default}
                for row in rows]
    try:
        return orjson.dumps(document, default=str).decode()
    except orjson.JSONEncodeError:
        return json.dumps(document, default=str, separators=(",", ":"))


def _events_write_statement(agreement, rows: list[dict], counters: list[str]) -> tuple[str, list]:
    """PostgreSQL: the statement inserting the events' rows and, with `counters`, writing those fields of the
    agreement, answering (seq, id) per event.

    `UsageEvent.objects.bulk_create` without Django's per-value preparation, which was most of a batch's CPU: one
    `INSERT ... SELECT FROM json_to_recordset(<the rows as one JSON document>) RETURNING`. One JSON document
    (json.dumps, in C) costs a fraction of adapting one array per column value by value; what every row shares
    (the agreement, source, time) is a parameter of its own, and values equal to their column's default are left
    out of it, so both sides encode and parse half as much. `json`, not `jsonb`: it is read once, and jsonb's
    parse builds a tree first. The record's columns are of the columns' base types (varchar, numeric), so lengths
    and precision are checked by the insert's assignment casts, as for any INSERT; the values are the ones the
    chain code just computed, of the columns' Python types (uuid and datetime as their text forms)."""
    sql, shared, per_event = _events_insert_sql()
    first = rows[0]
    document = _events_document(rows, per_event)
    update, update_params = "", []
    if counters:
        update = _counters_update_sql(tuple(counters))
        # The counters' values as psycopg adapts them (ints, text, aware datetimes): exact for these columns, and
        # without DecimalField's preparation of each int.
        update_params = [*(getattr(agreement, name) for name in counters), agreement.pk]
    return (f"WITH inserted AS ({sql}){update} SELECT seq, id FROM inserted",
            [*(first[field.attname] for field in shared), document, *update_params])


@lru_cache(maxsize=16)
def _counters_update_sql(counters: tuple[str, ...]) -> str:
    """The part of `_events_write_statement` that writes `counters` of the agreement."""
    quote, meta = connection.ops.quote_name, UsageAgreement._meta
    return (f", counters AS (UPDATE {quote(meta.db_table)} SET "  # noqa: S608
            + ", ".join(f"{quote(meta.get_field(name).column)} = %s" for name in counters)
            + f" WHERE {quote(meta.pk.column)} = %s)")


@lru_cache(maxsize=1)
def _event_attnames() -> tuple[list[str], set[str]]:
    """UsageEvent's columns' attribute names, and those but the id."""
    attnames = [field.attname for field in UsageEvent._meta.concrete_fields]
    return attnames, set(attnames) - {"id"}


def _events_saved(rows: list[dict], ids: dict[int, int]) -> list[UsageEvent]:
    """The written rows as UsageEvent instances, given their ids by seq: what `UsageEvent.from_db` builds, without
    Model.__init__'s walk over every field per instance (most of the CPU of answering a batch of 100 in Python).
    With an init signal receiver for UsageEvent, the instances are built by `from_db`, which sends it."""
    alias, (attnames, columns) = DEFAULT_DB_ALIAS, _event_attnames()  # `connection`'s alias
    if signals.pre_init.has_listeners(UsageEvent) or signals.post_init.has_listeners(UsageEvent):
        return [UsageEvent.from_db(alias, attnames, [ids[row["seq"]] if name == "id" else row[name]
                                                     for name in attnames]) for row in rows]
    events = []
    for row in rows:
        event = UsageEvent.__new__(UsageEvent)
        # A row holds exactly the other columns (`_extend_chain`); anything else would not be an attribute.
        event.__dict__.update(row if row.keys() == columns else {name: row[name] for name in columns},
                              id=ids[row["seq"]])
        state = event._state = ModelState()
        state.adding, state.db = False, alias
        events.append(event)
    return events


def _write_events(agreement, rows: list[dict], *, counters: list[str] = ()) -> list[UsageEvent]:
    """Insert the events' rows, and with `counters` write those fields of the agreement (on PostgreSQL in the same
    statement, `_events_write_statement`)."""
    if connection.vendor != "postgresql":
        events = UsageEvent.objects.bulk_create([UsageEvent(**row) for row in rows])
        if counters:
            UsageAgreement.objects.filter(pk=agreement.pk).update(**{name: getattr(agreement, name)
                                                                     for name in counters})
        return events
    with prepared_cursor() as cursor:
        cursor.execute(*_events_write_statement(agreement, rows, list(counters)))
        return _events_saved(rows, dict(cursor.fetchall()))


def _complete_if_used_up(agreement: UsageAgreement, fields: list[str]) -> None:
    """Request completion once the budget is spent. Spent, not reserved: a reservation may still be released (an
    upstream failure, or calls a process leased and did not use), and then its budget is the buyer's to use."""
    if agreement.used >= agreement.deposit_amount and agreement.completion_requested_at is None:
        agreement.completion_requested_at = timezone.now()
        agreement.completion_reason = BUDGET_USED_UP
        fields += ["completion_requested_at", "completion_reason"]


def _observe_after_commit(agreement: UsageAgreement, events: list[UsageEvent], *, source: str) -> None:
    amount = sum(event.cost for event in events)
    transaction.on_commit(lambda: monitoring.charges_observe(source=source, token=agreement.token,
                                                             events=len(events), amount=amount))


class _SettledByTheReaper(Exception):
    pass


_LOCKED_FIELDS = [name for name in _CHAIN_FIELDS if name != "id"]


@lru_cache(maxsize=2)
def _head_select(extra: str = "") -> str:
    """SELECT of what a charge reads of its agreement (`_LOCKED_FIELDS`, then `extra` columns), by id."""
    meta, quote = UsageAgreement._meta, connection.ops.quote_name
    columns = ", ".join(quote(meta.get_field(name).column) for name in _LOCKED_FIELDS)
    return f"SELECT {columns}{extra} FROM {quote(meta.db_table)} WHERE id = %s"  # noqa: S608


def _lock_statement(reservations: list[Reservation]) -> tuple[str, list]:
    """PostgreSQL: close the calls' intents and lock their agreement's row, reading what extending the usage chain
    needs and the intents that were still there (an array of their ids), in one statement."""
    return _lock_sql(), [[reservation.intent_id for reservation in reservations], reservations[0].agreement_id]


@lru_cache(maxsize=1)
def _lock_sql() -> str:
    return (f"WITH closed AS (DELETE FROM {CallIntent._meta.db_table} WHERE id = ANY(%s) RETURNING id) "  # noqa: S608
            f"{_head_select(', ARRAY(SELECT id FROM closed)')} FOR UPDATE")


@dataclass
class _ChainHead:
    """What a proxied call's charge reads of its agreement under the row lock, and moves: not a model instance,
    whose construction (defaults for every field) cost more than the charge's own statements."""

    id: uuid.UUID
    chain_id: int
    token: str
    deposit_amount: int
    used: int
    reserved: int
    usage_seq: int
    usage_digest: str
    completion_requested_at: datetime | None
    receipt_signer: str
    status: str
    completion_reason: str = ""

    pk = property(lambda self: self.id)
    onchain_id = UsageAgreement.onchain_id


def _agreement_read(reservation: Reservation, row) -> _ChainHead:
    fields = [UsageAgreement._meta.get_field(name) for name in _LOCKED_FIELDS]
    return _ChainHead(id=reservation.agreement_id, **{field.attname: field.to_python(value)
                                                       for field, value in zip(fields, row, strict=True)})


def _locked_for_charge(reservation: Reservation) -> _ChainHead | None:
    """Close the call's intent and lock its agreement's row (in the caller's transaction); None when the intent
    was already gone (the reaper settled the call)."""
    with connection.cursor() as cursor:
        if connection.vendor == "postgresql":
            cursor.execute(*_lock_statement([reservation]))
            *row, closed = cursor.fetchone()
        else:
            closed = _intent_close(reservation)
            cursor.execute(_head_select(), [UsageAgreement._meta.pk.get_db_prep_value(reservation.agreement_id,
                                                                                      connection)])
            row = cursor.fetchone()
    return _agreement_read(reservation, row) if closed else None


def _released_if_refunded(agreement: _ChainHead, reservations: list[Reservation]) -> bool:
    """Release the calls instead of charging them when their charge, which closed their intents and then waited for
    the agreement's row, finds it refunded: the escrow was reclaimed meanwhile (`agreement_refunded`, which settles
    every call whose intent it can lock, not those), the whole deposit went back to the buyer and the refund's event
    said what the seller was not paid. Charged after it, the books' used passed that, charging the buyer for money
    the chain refunded. In the caller's transaction, under the row lock."""
    if agreement.status != S.REFUNDED:
        return False
    UsageAgreement.objects.filter(pk=agreement.pk).update(
        reserved=F("reserved") - sum(reservation.amount for reservation in reservations))
    return True


def _charge_prepare(agreement: _ChainHead, reservations: list[Reservation],
                    charges: list[dict]) -> tuple[list[dict], list[str]]:
    """The calls' usage events (chained, each with its signed receipt, as rows) and the agreement's counters after
    them: what to write."""
    rows = _extend_chain(agreement, charges, source=UsageSource.PROXY, receipt_each=True)
    agreement.reserved -= sum(reservation.amount for reservation in reservations)
    fields = ["usage_seq", "used", "usage_digest", "reserved"]
    _complete_if_used_up(agreement, fields)
    return rows, fields


# The chain head this process last wrote, per agreement: the next charge of that agreement here assumes it is
# still the head and writes itself in one statement (`_charge_on_known_head`). When another process (or the seller's
# usage report) moved the head meanwhile, that statement answers the head as it is and the charge tries once more on
# it; when that misses too, the call is charged in two round trips (`_charge_in_two_round_trips`), which wait their
# turn for the row lock and write the head they found, and the next charge tries that head again.
# No pause after a miss: since a process charges each agreement from one thread at a time (the charge combining
# below; but for calls charged alone after their batch failed or their queue stalled), a hot agreement has one
# such charge per process in flight, and a miss costs less than two round trips for every call would
# (bench/proxy.py, 16 callers on one agreement, servers instrumented to count charges: 1.64-1.66 ms of server CPU
# per call against 1.74-1.79 with a one-second pause after each miss).
KNOWN_HEAD_ATTEMPTS = 2  # statements a charge tries on a known head before the two round trips
_KNOWN_HEADS_MAX = 10_000  # agreements remembered per process (beyond: forgotten, and charged in two round trips)
_known_heads: dict[uuid.UUID, _ChainHead] = {}  # `_extend_chain` moves copies; a head is replaced once written


def _known_head_written(head: _ChainHead) -> None:
    if len(_known_heads) >= _KNOWN_HEADS_MAX:
        _known_heads.clear()
    _known_heads[head.id] = head


_INTENT_CLOSED = "EXISTS (SELECT FROM closed)"  # in `_known_head_charge_sql`: the statement is charging


@lru_cache(maxsize=1)
def _known_head_charge_sql() -> str:
    """One statement: when the agreement's head is still (seq, used, digest) and the call's intent is still open,
    lock the row, close the intent, insert the event and move the counters (with `_complete_if_used_up`'s rule);
    else record the answer on the intent (as reservation_answered does), and change
    nothing more. Answers one row: the event's (seq, id, NULL, NULL, NULL), or (NULL, NULL, seq, used, digest) of the
    head as it is now."""
    quote, meta = connection.ops.quote_name, UsageAgreement._meta

    def column(name: str) -> str:
        return quote(meta.get_field(name).column)

    agreements, intents = quote(meta.db_table), quote(CallIntent._meta.db_table)
    used_up = f"{column('completion_requested_at')} IS NULL AND %s >= {column('deposit_amount')}"
    insert = _events_insert_sql(_INTENT_CLOSED)[0]
    return (f"WITH locked AS (SELECT id FROM {agreements} WHERE id = %s AND {column('usage_seq')} = %s "  # noqa: S608
            f"AND {column('used')} = %s AND {column('usage_digest')} = %s FOR UPDATE), "
            f"closed AS (DELETE FROM {intents} WHERE id = %s AND EXISTS (SELECT FROM locked) RETURNING id), "
            f"answered AS ({_ANSWERED}WHERE id = %s AND NOT {_INTENT_CLOSED}), "
            f"inserted AS ({insert}), "
            f"moved AS (UPDATE {agreements} SET {column('usage_seq')} = %s, {column('used')} = %s, "
            f"{column('usage_digest')} = %s, {column('reserved')} = {column('reserved')} - %s, "
            f"{column('completion_requested_at')} = CASE WHEN {used_up} THEN %s "
            f"ELSE {column('completion_requested_at')} END, "
            f"{column('completion_reason')} = CASE WHEN {used_up} THEN %s ELSE {column('completion_reason')} END "
            f"WHERE id = %s AND {_INTENT_CLOSED}), "
            # Not charged: the head as it is now (KEY SHARE reads its latest version, not this statement's snapshot).
            f"head AS (SELECT {column('usage_seq')}, {column('used')}, {column('usage_digest')} FROM {agreements} "
            f"WHERE id = %s AND NOT {_INTENT_CLOSED} FOR KEY SHARE) "
            f"SELECT seq, id, NULL, NULL, NULL FROM inserted UNION ALL SELECT NULL, NULL, * FROM head")


def _known_head_charge_statement(reservation: Reservation, known: _ChainHead, head: _ChainHead,
                                 rows: list[dict]) -> tuple[str, list]:
    """`_known_head_charge_sql` with its values: `known` is the head assumed, `head` the one after the event."""
    _, shared, per_event = _events_insert_sql(_INTENT_CLOSED)
    used_up = [head.used]
    return _known_head_charge_sql(), [
        reservation.agreement_id, known.usage_seq, known.used, known.usage_digest,
        reservation.intent_id,
        *_answered_values(rows[0]), reservation.intent_id,
        *(rows[0][field.attname] for field in shared), _events_document(rows, per_event),
        head.usage_seq, head.used, head.usage_digest, reservation.amount,
        *used_up, timezone.now(), *used_up, BUDGET_USED_UP, reservation.agreement_id, reservation.agreement_id]


def _charge_on_known_head(reservation: Reservation, charge: dict, known: _ChainHead,
                          chained: tuple[_ChainHead, list[dict]] | None = None) -> UsageEvent | None:
    """PostgreSQL outside any transaction of the caller's: the charge in one statement (`_known_head_charge_sql`),
    its own transaction, durable before the answer leaves, on the head this process wrote last (`known`), else on
    the head that statement answered, up to KNOWN_HEAD_ATTEMPTS statements; or None, having recorded only the answer,
    when the head kept moving (or the reaper closed the intent: the two round trips then find out which). The event
    is chained and its receipt signed before the row is locked, so the row lock is held for one statement and its
    commit. `chained`: the first attempt's head after the event and the event's row, chained ahead already."""
    for _ in range(KNOWN_HEAD_ATTEMPTS):
        if chained is None:
            head = replace(known)
            rows = _extend_chain(head, [charge], source=UsageSource.PROXY)
        else:  # the first attempt's, chained on `known` while the upstream answered (`charge_ahead`)
            (head, rows), chained = chained, None
        with prepared_cursor() as cursor:
            cursor.execute(*_known_head_charge_statement(reservation, known, head, rows))
            seq, event_id, *now = cursor.fetchone() or (None, None, None, None, None)  # no row: no agreement
        if event_id is not None or now[0] is None:
            break
        moved = replace(known, usage_seq=now[0], used=int(now[1]), usage_digest=now[2])
        if moved == known:  # the head did not move: the intent is gone, which the two round trips sort out
            break
        known = moved
    if event_id is None:
        _known_heads.pop(reservation.agreement_id, None)  # the two round trips write the head they find
        return None
    _known_head_written(head)
    [event] = _events_saved(rows, {seq: event_id})
    monitoring.charges_observe(source=UsageSource.PROXY, token=head.token, events=1, amount=event.cost)
    return event


# --- Charges chained ahead of the upstream's answer ------------------------------------------------------------------
# A per-call price is known before the upstream answers, and so is everything a proxied call's receipt signs (seq,
# units, cost, cumulative, request id): what the upstream answers (status, latency) is recorded on the event, not
# signed. So once the request is sent, the proxy chains the call's event on the head this process knows and signs its
# receipt while the upstream works; once the answer is in, only the statement is left to build and send. That takes
# the chain and the signature off the latency a call adds, and runs them before the wait rather than after it, when
# the same code costs more CPU (bench/idle_cpu.py). One call per agreement at a time is chained ahead in a process,
# and none while that agreement is being charged here: with more calls in flight the head moves before most of them
# are charged, and they are charged together (charge combining), so what was chained ahead would be thrown away.

@dataclass(eq=False)
class ChargeAhead:
    """A call's event chained, and its receipt signed, ahead of the upstream's answer (`charge_ahead`)."""

    known: _ChainHead  # the known head it is chained on (`_known_heads`' own object: replaced once the head moves)
    # The head after the event, and the event's row (the upstream's status and latency still 0); until used. Never
    # printed: a signed receipt is a claim on-chain.
    chained: tuple[_ChainHead, list[dict]] | None = dataclasses.field(repr=False)

    def take(self, known: _ChainHead | None, charge: dict) -> tuple[_ChainHead, list[dict]] | None:
        """The head and event row to charge `charge` with on `known`, with the upstream's answer filled in, when this
        was chained on that head for that call (else None: the charge chains anew). Taken once."""
        chained, self.chained = self.chained, None
        if chained is None or known is not self.known:
            return None
        head, rows = chained
        if any(rows[0][key] != charge[key] for key in _AHEAD_KEYS):
            return None
        rows[0].update(upstream_status=charge["upstream_status"], latency_ms=charge["latency_ms"],
                       created_at=timezone.now())
        return head, rows


# What the commit does not fill in: a charge that differs on them is not the one chained ahead.
_AHEAD_KEYS = ("units", "cost", "request_id", "request_nonce", "method", "path")
_charging_ahead: dict[uuid.UUID, Reservation] = {}  # agreement -> its call chained ahead in this process
_charging_ahead_lock = threading.Lock()


def charge_ahead(*, reservation: Reservation, units: int, cost: int, request_id: str, request_nonce: str,
                 method: str, path: str) -> ChargeAhead | None:
    """While the upstream answers the call: its event, chained on the head this process knows, receipt signed, for
    reservation_commit (which fills in the upstream's status and latency). None when there is nothing to chain on:
    outside PostgreSQL's autocommit, no head known, another call of the agreement chained ahead or its charge running
    here. Never raises: a charge not chained ahead is chained when it is charged."""
    agreement_id = reservation.agreement_id
    if not _autocommit_postgresql():
        return None
    with _charging_ahead_lock:
        known = _known_heads.get(agreement_id)
        if known is None or agreement_id in _charging_ahead or agreement_id in _charge_queues:
            return None
        _charging_ahead[agreement_id] = reservation
    try:
        charge = _charge_fields(units=units, cost=cost, request_id=request_id, request_nonce=request_nonce,
                                method=method, path=path, upstream_status=0, latency_ms=0,
                                call_seq=reservation.call_seq)
        head = replace(known)
        return ChargeAhead(known, (head, _extend_chain(head, [charge], source=UsageSource.PROXY)))
    except Exception:
        logger.exception("chaining a charge ahead of the answer failed; it is chained when charged")
        _charge_ahead_end(reservation)
        return None


def _charge_ahead_end(reservation: Reservation) -> None:
    """The call is charged or released: another call of its agreement may be chained ahead."""
    if _charging_ahead:  # no lock while nothing is chained ahead in the process
        with _charging_ahead_lock:
            if _charging_ahead.get(reservation.agreement_id) == reservation:
                del _charging_ahead[reservation.agreement_id]


def _charge_in_two_round_trips(reservations: list[Reservation], charges: list[dict], *,
                               answered: list[bool]) -> list[UsageEvent | None]:
    """PostgreSQL outside any transaction of the caller's: the proxy's charges of calls of one agreement in two round
    trips instead of five (every wait for the database costs a proxied call CPU as well as time), each a pipeline
    of statements prepared on the server once per connection (written out as text, they were parsed and planned
    again at every charge: a third of the database's CPU per call, bench/proxy.py). `control` runs the
    transaction statements, so `cursor` keeps the result of its own last statement:

        1. BEGIN; record the answers; COMMIT (without waiting for the flush); BEGIN; close the intents and lock
           the row
        2. insert the events and move the counters; COMMIT (durable before the answers leave)

    The answers are thus committed before the charge waits for the row lock, as reservation_answered would (but
    those `answered` already: by a charge on a known head that missed, or by a queued call that waited). Answers each
    call's event, or None for a call whose intent the reaper had settled already."""
    lock_sql, lock_params = _lock_statement(reservations)
    unanswered = [(reservation, charge) for reservation, charge, done in zip(reservations, charges, answered,
                                                                             strict=True) if not done]
    with transaction_in_pipelines() as (cursor, control, pipeline):
        with pipeline():
            if unanswered:
                control.execute("BEGIN")
                for reservation, charge in unanswered:
                    control.execute(*_answered_statement(reservation, charge, skip_flush_wait=True))
                control.execute("COMMIT")
            control.execute("BEGIN")
            cursor.execute(lock_sql, lock_params)
        *row, closed = cursor.fetchone()
        closed = set(closed)
        charged = [(reservation, charge) for reservation, charge in zip(reservations, charges, strict=True)
                   if reservation.intent_id in closed]
        if not charged:
            control.execute("COMMIT")
            return [None] * len(reservations)
        agreement = _agreement_read(reservations[0], row)
        if _released_if_refunded(agreement, [reservation for reservation, _ in charged]):
            control.execute("COMMIT")
            return [None] * len(reservations)
        rows, fields = _charge_prepare(agreement, [reservation for reservation, _ in charged],
                                       [charge for _, charge in charged])
        with pipeline():
            cursor.execute(*_events_write_statement(agreement, rows, fields))
            control.execute("COMMIT")
        ids = dict(cursor.fetchall())
    # Committed: nothing after this may pass for the charge having failed.
    events = _events_saved(rows, ids)
    _known_head_written(agreement)
    monitoring.charges_observe(source=UsageSource.PROXY, token=agreement.token, events=len(events),
                               amount=sum(event.cost for event in events))
    by_intent = {reservation.intent_id: event for (reservation, _), event in zip(charged, events, strict=True)}
    return [by_intent.get(reservation.intent_id) for reservation in reservations]


def _charge_alone(reservation: Reservation, charge: dict, *, answered: bool = False,
                  ahead: ChargeAhead | None = None) -> UsageEvent:
    """PostgreSQL outside any transaction of the caller's: one call's charge, in one statement on the head this
    process knows (with the event chained `ahead` on it, when that still is the head known), else in two round
    trips."""
    known = _known_heads.get(reservation.agreement_id)
    chained = None if ahead is None else ahead.take(known, charge)
    event = None if known is None else _charge_on_known_head(reservation, charge, known, chained)
    if event is None:
        [event] = _charge_in_two_round_trips([reservation], [charge], answered=[answered or known is not None])
        if event is None:
            raise _SettledByTheReaper
    return event


# --- Charge combining -----------------------------------------------------------------------------------------------
# The charges of one agreement's concurrent calls in one process queue up, and the thread charging that agreement
# takes the whole queue at once: one lock of the row and one write for all of them, each event with its own signed
# receipt. Without it, the threads serving one hot agreement each tried their own statement on the same known head,
# all but one missed it, and most calls took two transactions (bench/proxy.py). A lone call is charged alone.
# A queued call charged within QUEUED_ANSWER_AFTER_SECONDS has its answer recorded by its charge, as a lone call
# has: unrecorded only for as long as a charge takes to be signed and sent. One that waits longer (a slow database,
# a charge that does not end) records its answer then, so that should the process die while it waits, the reaper
# charges it. Recording every queued call's answer at once cost a statement for most calls of a hot agreement
# (bench/proxy.py, 16 callers on one agreement, servers instrumented to count charges: 1.42-1.46 ms of server CPU
# per call without those statements, 1.60 with them).

CHARGES_COMBINED_MAX = 64  # charges written together at most (their receipts are signed under the row lock)
QUEUED_ANSWER_AFTER_SECONDS = 0.005


class _OutcomeUnknown(InterfaceError):
    """The charge of a queued call ended without saying how (the thread charging it was interrupted): the caller
    finds out from the database, as after a lost connection (`_resolve_unknown_commit`)."""


class _ChargeAlone(Exception):
    """The batch failed for a reason of its own calls (not the database's): each call is charged alone."""


@dataclass(eq=False)
class _QueuedCharge:
    reservation: Reservation
    charge: dict
    answered: bool = False  # its answer is recorded on its intent
    ahead: ChargeAhead | None = None  # its event, chained while the upstream answered: used when charged alone
    # Set when its outcome is in, or when it is to lead. A waiter's only: a call that leads its queue from the
    # start is never waited for (so a lone call creates none, ~5 us).
    settled: threading.Event | None = None
    leads: bool = False  # woken to charge the queue, not with its own outcome
    event: UsageEvent | None = None
    error: BaseException | None = None

    def wake(self) -> None:
        if self.settled is not None:
            self.settled.set()

    def outcome(self) -> UsageEvent:
        error, self.error = self.error, None
        if isinstance(error, _ChargeAlone):
            return _charge_alone(self.reservation, self.charge, answered=self.answered)
        if error is not None:
            raise error
        if self.event is None:
            raise _OutcomeUnknown("The charge of this call ended without an outcome.")
        return self.event


_charge_queues: dict[uuid.UUID, deque] = {}  # agreement being charged in this process -> its queued charges
_charge_queues_lock = threading.Lock()


def _queued(mine: _QueuedCharge) -> deque:
    """(Under _charge_queues_lock.) Queue `mine` behind the agreement's charge in progress, or lead a new queue."""
    queue = _charge_queues.get(mine.reservation.agreement_id)
    if queue is None:
        queue = _charge_queues[mine.reservation.agreement_id] = deque()
        mine.leads = True
    else:
        mine.settled = threading.Event()
    queue.append(mine)
    return queue


def _charge_queued(reservation: Reservation, charge: dict, ahead: ChargeAhead | None) -> UsageEvent:
    """Charge the call, alone or with the calls of its agreement queued meanwhile in this process, by whichever of
    their threads is charging that agreement; the others wait for their outcome."""
    mine = _QueuedCharge(reservation, charge, ahead=ahead)
    with _charge_queues_lock:
        queue = _queued(mine)
    if not mine.leads:
        try:
            _wait_settled(mine, queue)
        except BaseException:
            _queue_leave(mine, queue)
            raise
        if not mine.leads:
            return mine.outcome()
    with _charge_queues_lock:
        batch = [queue.popleft() for _ in range(min(len(queue), CHARGES_COMBINED_MAX))]
    try:
        _charge_batch(batch)
    finally:
        with _charge_queues_lock:
            _lead_pass(queue, reservation.agreement_id)
        for queued in batch:
            queued.wake()
    return mine.outcome()


def _queue_leave(mine: _QueuedCharge, queue: deque) -> None:
    """A queued call whose thread stops waiting (interrupted): out of the queue, and the lead it was given passed on,
    so that the calls behind it are still charged."""
    with _charge_queues_lock:
        if mine not in queue:
            return  # taken into a batch: that batch gives it its outcome
        queue.remove(mine)
        if mine.leads:
            _lead_pass(queue, mine.reservation.agreement_id)


def _lead_pass(queue: deque, agreement_id: uuid.UUID) -> None:
    """(Under _charge_queues_lock.) The next in line charges what queued meanwhile; with nobody left, the
    agreement's queue ends."""
    if queue:
        queue[0].leads = True
        queue[0].wake()
    else:
        del _charge_queues[agreement_id]


def _copied(exc: Exception) -> Exception:
    copied = copy.copy(exc)
    copied.__cause__ = exc
    return copied


def _wait_settled(mine: _QueuedCharge, queue: deque) -> None:
    """Wait for the call's outcome, or to lead its queue. Still waiting after QUEUED_ANSWER_AFTER_SECONDS, it
    records its answer; still queued after PROXY_TIMEOUT (the charge ahead of it does not end), it leaves the queue
    to be charged alone."""
    settled = mine.settled
    if settled is None:  # it leads its queue from the start (`_queued`): nothing to wait for
        return
    if not settled.wait(QUEUED_ANSWER_AFTER_SECONDS):
        # Its batch may be charging it meanwhile: then the intent is gone (nothing to record), or the answer is
        # recorded twice, the same. Whatever fails here leaves the call queued: its charge records the answer.
        try:
            mine.answered = reservation_answered(reservation=mine.reservation, charge=mine.charge)
        except Exception:
            logger.exception("recording a queued call's answer failed; its charge records it")
    while not settled.wait(settings.PROXY_TIMEOUT):
        with _charge_queues_lock:
            if settled.is_set():
                return
            if mine in queue:  # not taken into a batch yet (one taken gets its outcome when the batch ends)
                queue.remove(mine)
                mine.error = _ChargeAlone()
                return


def _charge_batch(batch: list[_QueuedCharge]) -> None:
    """Charge the queued calls of one agreement, giving each its outcome: its event, or the error its own thread
    raises and handles as if it had charged alone (a copy each: one exception raised in many threads would mix
    their tracebacks)."""
    for queued in batch:
        queued.leads = False
    if len(batch) == 1:
        try:
            batch[0].event = _charge_alone(batch[0].reservation, batch[0].charge, answered=batch[0].answered,
                                           ahead=batch[0].ahead)
        except Exception as exc:  # noqa: BLE001 (raised in the caller's own thread)
            batch[0].error = exc
        return
    try:
        monitoring.charges_combined_observe(len(batch))
        events = _charge_in_two_round_trips([queued.reservation for queued in batch],
                                            [queued.charge for queued in batch],
                                            answered=[queued.answered for queued in batch])
    except (OperationalError, InterfaceError) as exc:
        events = [_copied(exc) for _ in batch]  # each call finds out whether it was charged (reservation_commit)
    except Exception:  # noqa: BLE001 (not the database going away: the calls' own, so each is charged alone)
        logger.exception("charging %s calls together failed; charging each alone", len(batch))
        events = [_ChargeAlone() for _ in batch]
    except BaseException:
        for queued in batch:
            queued.error = _OutcomeUnknown("The thread charging this call was interrupted.")
        raise
    for queued, event in zip(batch, events, strict=True):
        if isinstance(event, BaseException):
            queued.error = event
        elif event is None:
            queued.error = _SettledByTheReaper()
        else:
            queued.event = event


def _charge_fields(*, units: int, cost: int, request_id: str, request_nonce: str, method: str, path: str,
                   upstream_status: int, latency_ms: int, call_seq: int) -> dict:
    return {"units": units, "cost": cost, "request_id": request_id, "request_nonce": request_nonce,
            "method": method, "path": path[:500], "upstream_status": upstream_status, "latency_ms": latency_ms,
            "call_seq": call_seq}


def reservation_commit(*, reservation: Reservation, units: int, cost: int, request_id: str, request_nonce: str,
                       method: str, path: str, upstream_status: int, latency_ms: int,
                       ahead: ChargeAhead | None = None) -> UsageEvent:
    """Record the upstream's answer (reservation_answered), then turn the reservation into a usage event charging
    `cost` (<= the reservation); the rest is released. When the charge cannot be written the whole reservation is
    released instead (503 `database_unavailable` when the database went away), so a failed commit never leaves
    budget held. `ahead`: what `charge_ahead` chained for the call, if anything."""
    charge = _charge_fields(units=units, cost=cost, request_id=request_id, request_nonce=request_nonce, method=method,
                            path=path, upstream_status=upstream_status, latency_ms=latency_ms,
                            call_seq=reservation.call_seq)
    try:
        if _autocommit_postgresql():
            event = _charge_queued(reservation, charge, ahead)
        else:
            reservation_answered(reservation=reservation, charge=charge)
            with transaction.atomic():
                agreement = _locked_for_charge(reservation)
                charging = agreement is not None and not _released_if_refunded(agreement, [reservation])
                if charging:
                    rows, fields = _charge_prepare(agreement, [reservation], [charge])
                    [event] = _write_events(agreement, rows, counters=fields)
                    _observe_after_commit(agreement, [event], source=UsageSource.PROXY)
            if not charging:
                raise _SettledByTheReaper
    except _SettledByTheReaper:
        _leases_give_back(reservation.agreement_id)  # its other leased calls may be gone too
        event = _call_event(reservation, charge)
        if event is None:
            raise DependencyUnavailable("The call took too long to record and was released; nothing was charged.",
                                        code="call_expired") from None
    except (OperationalError, InterfaceError):
        _leases_give_back()
        event = _resolve_unknown_commit(reservation=reservation, charge=charge)
        if event is None:
            raise DependencyUnavailable("The call could not be recorded; nothing was charged.",
                                        code="database_unavailable") from None
    except BaseException:
        reservation_release(reservation=reservation)
        raise
    finally:
        _charge_ahead_end(reservation)
    return event


def _intents_settle(*, agreement_id, created_before: datetime) -> tuple[int, int]:
    """Settle the agreement's intents created before `created_before` by the rule in this module's docstring:
    (charged, released)."""
    with transaction.atomic():
        agreement = UsageAgreement.objects.select_for_update().only(*_CHAIN_FIELDS).get(pk=agreement_id)
        # Skipping locked rows: an intent being released right now is its releaser's to settle.
        intents = list(CallIntent.objects.select_for_update(skip_locked=True)
                       .filter(agreement_id=agreement_id, created_at__lt=created_before).order_by("id"))
        if not intents:
            return 0, 0
        answered = [intent for intent in intents if intent.answered_at is not None]
        fields = ["reserved"]
        if answered:
            events = _append_events(agreement, [{
                "units": intent.units, "cost": intent.cost, "request_id": intent.request_id,
                "request_nonce": intent.request_nonce, "method": intent.method, "path": intent.path,
                "upstream_status": intent.upstream_status, "latency_ms": intent.latency_ms, "call_seq": intent.call_seq,
                "description": "charged by the reaper: the server process died after the upstream answered",
            } for intent in answered], source=UsageSource.PROXY)
            fields += ["usage_seq", "used", "usage_digest"]
            _observe_after_commit(agreement, events, source=UsageSource.PROXY)
        agreement.reserved -= sum(intent.amount for intent in intents)
        _complete_if_used_up(agreement, fields)
        agreement.save(update_fields=fields)
        CallIntent.objects.filter(pk__in=[intent.pk for intent in intents]).delete()
    return len(answered), len(intents) - len(answered)


def _replays_settle(*, created_before: datetime, failures: sweeps.RowFailures) -> int:
    """X-Request-Nonce replays whose first call died unanswered: one that was charged stores a note saying so (its
    answer is lost), any other is dropped so the nonce can be used again."""
    settled = 0
    # Not those whose call is not settled yet, in the query: skipped after it, 500 of them (one agreement's dead calls
    # that fail to settle) filled the window at every run, and no other nonce was answered.
    call_unsettled = CallIntent.objects.filter(agreement_id=OuterRef("agreement_id"),
                                               request_nonce=OuterRef("request_nonce"))
    # In turn, not the first of the table's order: as many replays whose settling always raised filled it alike.
    unanswered = ProxyReplay.objects.filter(status_code=None, created_at__lt=created_before).exclude(
        Exists(call_unsettled)).only("pk", "agreement_id", "request_nonce")
    for replay in sweeps.rows_in_turn(unanswered, turn="reap-call-intents:replays", by="pk",
                                      size=REPLAYS_REAPED_PER_RUN):
        with failures.row(replay.pk):
            settled += replay_settle(agreement_id=replay.agreement_id, request_nonce=replay.request_nonce)
    return settled


def replay_settle(*, agreement_id, request_nonce: str) -> int:
    """An X-Request-Nonce replay whose call ended without a stored answer: a note saying so when the call was
    charged (its answer is lost, a retry must not be forwarded and charged again), else dropped so that the nonce
    can be used again."""
    event = UsageEvent.objects.filter(agreement_id=agreement_id, request_nonce=request_nonce).first()
    if event is None:
        return ProxyReplay.objects.filter(agreement_id=agreement_id, request_nonce=request_nonce,
                                          status_code=None).delete()[0]
    body = error_body("reply_lost", "The call was served and charged, but its answer could not be delivered.",
                      {"usage_event_id": event.pk})
    return ProxyReplay.objects.filter(agreement_id=agreement_id, request_nonce=request_nonce, status_code=None).update(
        status_code=502, headers={"Content-Type": "application/json", "X-Usage-Cost": str(event.cost),
                                  "X-Usage-Units": str(event.units), "X-Usage-Event-Id": str(event.pk),
                                  "X-Usage-Seq": str(event.seq)},
        body=json.dumps(body).encode())


# Agreements whose dead calls, and nonce replays of dead calls, the reaper settles per run; the next run takes up
# after the last.
AGREEMENTS_REAPED_PER_RUN = 500
REPLAYS_REAPED_PER_RUN = 500


def intents_reap(*, now: datetime | None = None) -> dict:
    """The beat task: settle what dead server processes left (intents, then their nonce replays). Idempotent. An
    agreement or a replay whose settling raises is logged and skipped, the others settled, and RowsFailed raised at
    the end (sweeps.RowFailures): one that always raised left every one after it unsettled, at every run."""
    stale = selectors.calls_stale_before(now=now or timezone.now())
    charged = released = 0
    failures = sweeps.RowFailures("proxy call reaper")
    # Up to AGREEMENTS_REAPED_PER_RUN agreements, not the agreements of the first intents: one agreement's dead calls
    # that fail to settle (they stay, the oldest) filled that window at every run, and no other agreement's were
    # settled. In turn, not the first of the table's order: as many agreements failing to settle filled it alike.
    dead = UsageAgreement.objects.filter(pk__in=CallIntent.objects.filter(created_at__lt=stale).values("agreement_id"))
    agreement_ids = [agreement.pk for agreement in sweeps.rows_in_turn(
        dead.only("pk"), turn="reap-call-intents:agreements", by="pk", size=AGREEMENTS_REAPED_PER_RUN)]
    for agreement_id in agreement_ids:
        with failures.row(agreement_id):
            done = _intents_settle(agreement_id=agreement_id, created_before=stale)
            charged, released = charged + done[0], released + done[1]
    replays = _replays_settle(created_before=stale, failures=failures)
    failures.raise_if_any(applied=charged + released + replays)
    return {"charged": charged, "released": released, "replays": replays}


def reservations_settle_stale(*, agreement: UsageAgreement) -> bool:
    """Settle every call still reserved on an agreement whose completion waited out the proxy's timeout (their
    processes died), by the reaper's rule: holding them would block the settlement forever. False when a call was
    left to its own process, whose charge or release holds the call's intent right now (and waits for the agreement's
    row, which the caller holds): its usage is not final until that lands."""
    _intents_settle(agreement_id=agreement.pk, created_before=timezone.now())
    agreement.refresh_from_db()
    return not CallIntent.objects.filter(agreement_id=agreement.pk).exists()


@lru_cache(maxsize=1)
def _own_fields_read() -> tuple[str, list[str], list[tuple]]:
    """The locked read of the agreement's own fields (not its parties, service or authorization, which no charge
    changes): its SELECT, their attribute names, and those with converters from database values, each with its
    column expression and converters (all depend on the database's vendor only)."""
    ops, quote, meta = connection.ops, connection.ops.quote_name, UsageAgreement._meta
    fields = [field for field in meta.concrete_fields if not field.is_relation]
    for_update = " FOR UPDATE" if connection.features.has_select_for_update else ""
    converting = []
    for index, field in enumerate(fields):
        column = field.get_col(meta.db_table)
        converters = ops.get_db_converters(column) + field.get_db_converters(connection)
        if converters:
            converting.append((index, column, converters))
    return (f"SELECT {', '.join(quote(field.column) for field in fields)} FROM {quote(meta.db_table)} "  # noqa: S608
            f"WHERE {quote(meta.pk.column)} = %s{for_update}", [field.attname for field in fields], converting)


def _lock_and_read(agreement: UsageAgreement) -> None:
    """Take the agreement's row lock and read its own fields again into `agreement`, in one statement without the
    ORM's query compilation (which cost more than the rest of a small report): from here to the commit, what
    `agreement` says is what the row holds."""
    sql, attnames, converting = _own_fields_read()
    db = connections[DEFAULT_DB_ALIAS]
    with prepared_cursor() as cursor:
        cursor.execute(sql, [UsageAgreement._meta.pk.get_db_prep_value(agreement.pk, db)])
        row = cursor.fetchone()
    if row is None:
        raise UsageAgreement.DoesNotExist
    values = list(row)
    for index, column, converters in converting:
        for convert in converters:
            values[index] = convert(values[index], column, db)
    # Plain (non-relation) fields: their descriptors read the instance's __dict__, as setattr would write it.
    agreement.__dict__.update(zip(attnames, values, strict=True))


@logs_name_the_agreement
def usage_record(*, agreement: UsageAgreement, seller_id: uuid.UUID, entries: list[dict], request_id: str,
                 locked: bool = False) -> list[UsageEvent]:
    """Seller-reported usage: all entries or none, under the same cap and receipt chain as proxied calls.
    `agreement` is read again under its row lock, unless `locked` says the caller's transaction read it under
    that lock already (`selectors.agreement_for_report(lock=True)`), and left as written."""
    _seller_report_require(agreement, seller_id)
    # No savepoint when nested (the request's transaction): a failure here fails the caller's transaction too.
    with transaction.atomic(savepoint=False):
        if not locked:
            _lock_and_read(agreement)
        if agreement.status != S.ACTIVE:
            raise _not_chargeable(agreement)
        # Past its expiry an agreement stays active until the beat task completes (or reclaims) it: no usage is
        # added then, as no proxied call is reserved (`reservation_take`).
        if agreement.completion_requested_at is not None or agreement.expires_at <= timezone.now():
            raise Conflict("The agreement is completing; usage can no longer be added.", code="agreement_completing",
                           details={"status": agreement.status})
        # Each event's request id is the request's and its index, within the column (a well-formed X-Request-Id
        # may take all of it).
        base = request_id[:_REQUEST_ID_MAX - len(f":{len(entries) - 1}")]
        charges = [{"units": entry["units"], "cost": entry["units"] * agreement.price_per_unit,
                    "description": entry.get("description", ""), "request_id": f"{base}:{index}"}
                   for index, entry in enumerate(entries)]
        total = sum(charge["cost"] for charge in charges)
        if agreement.used + agreement.reserved + total > agreement.deposit_amount:
            raise PaymentRequired("The usage exceeds the escrow's remaining budget; nothing was recorded.",
                                  code="budget_exhausted",
                                  details={"remaining_atomic": agreement.remaining, "cost_atomic": total})
        rows = _extend_chain(agreement, charges, source=UsageSource.SELLER_REPORT)
        agreement.units_reported += sum(charge["units"] for charge in charges)
        fields = ["usage_seq", "used", "usage_digest", "units_reported"]
        _complete_if_used_up(agreement, fields)
        events = _write_events(agreement, rows, counters=fields)
        _observe_after_commit(agreement, events, source=UsageSource.SELLER_REPORT)
    return events


@logs_name_the_agreement
def completion_request(*, agreement: UsageAgreement, reason: str, now: datetime | None = None) -> UsageAgreement:
    """Stop new charges; the settlement is proposed as soon as no call is in flight. Idempotent."""
    UsageAgreement.objects.filter(pk=agreement.pk, status=S.ACTIVE, completion_requested_at=None).update(
        completion_requested_at=now or timezone.now(), completion_reason=reason[:100])
    agreement.refresh_from_db()
    if agreement.status != S.ACTIVE and agreement.completion_requested_at is None:
        raise _not_chargeable(agreement)
    return agreement


def job_result_charge(*, agreement_id, result_hash: str, request_id: str, chain_now: int) -> UsageEvent:
    """A one-shot job (a Masumi purchase) delivered its result: charge the whole deposit as one usage event whose
    digest is the result hash itself, and ask for completion. The settlement proposal then commits the result hash
    on-chain as its `usageDigest` (as a Masumi node commits it in the escrow datum). Idempotent per agreement.

    `chain_now`: the chain's clock, read by the caller before any transaction (no row lock waits on the node). A
    result at or after the agreement's expiry (a purchase's submitResultTime) is refused: the buyer is owed its
    refund from then, and the contract's reclaim grace is no licence to charge."""
    with transaction.atomic():
        agreement = UsageAgreement.objects.select_for_update().get(pk=agreement_id)
        existing = agreement.usage_events.filter(request_id=request_id).first()
        if existing is not None:
            return existing
        if agreement.status != S.ACTIVE:
            raise _not_chargeable(agreement)
        if chain_now >= agreement.expires_at.timestamp():
            raise Conflict("submitResultTime (the agreement's expiry) has passed by the chain's clock; the result "
                           "is not charged.", code="submit_result_time_passed",
                           details={"chain_time": chain_now, "expires_at": int(agreement.expires_at.timestamp())})
        if agreement.used or agreement.reserved or agreement.completion_requested_at is not None:
            raise Conflict("The agreement already has other usage; a job result is its only charge.",
                           code="agreement_already_used", details={"used_atomic": agreement.used})
        signature = signatures.receipt_sign(_receipt_signer_key(agreement), receipts.usage_receipt_digest(
            chain_id=agreement.chain_id, escrow_address=chainconfig.escrow_address(),
            agreement_id=agreement.onchain_id, seq=1, cumulative_amount=agreement.deposit_amount,
            usage_digest=result_hash))
        event = UsageEvent.objects.create(
            agreement=agreement, seq=1, source=UsageSource.SELLER_REPORT, units=agreement.quantity,
            cost=agreement.deposit_amount, cumulative=agreement.deposit_amount, usage_digest=result_hash,
            receipt_signature=signature, request_id=request_id, description="job result")
        agreement.usage_seq, agreement.used, agreement.usage_digest = 1, agreement.deposit_amount, result_hash
        agreement.units_reported = agreement.quantity
        agreement.completion_requested_at = timezone.now()
        agreement.completion_reason = "job result submitted"
        agreement.save(update_fields=["usage_seq", "used", "usage_digest", "units_reported",
                                      "completion_requested_at", "completion_reason"])
    return event


@logs_name_the_agreement
def usage_record_running_total(*, agreement: UsageAgreement, seller_id: uuid.UUID, units_used: int,
                               request_id: str, description: str) -> list[UsageEvent]:
    """The seller's running total of reported units (the Pægents SDK's `units_used`): charges the units beyond the
    total reported so far, described by the seller's `description` if it gave one; the same total again charges
    nothing, so a retry is harmless without an Idempotency-Key. A total below what was reported is refused: a
    charge is never taken back here."""
    _seller_report_require(agreement, seller_id)
    with transaction.atomic():
        _lock_and_read(agreement)
        # A counter of the agreement (read with it under its lock): summing its events grew with its history.
        reported = agreement.units_reported
        if units_used < reported:
            raise Conflict(f"{reported} units were already reported; units_used is the running total.",
                           code="usage_total_decreased", details={"units_reported": reported})
        if units_used == reported:
            return []
        return usage_record(agreement=agreement, seller_id=seller_id, request_id=request_id, locked=True, entries=[
            {"units": units_used - reported, "description": description or f"running total {units_used} units"}])
