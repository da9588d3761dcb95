"""What a PostgreSQL session is doing, seen from another connection (pg_stat_activity)."""

import contextlib
from collections.abc import Iterator

import psycopg
from django.db import connection


def backend_pid() -> int:
    with connection.cursor() as cursor:
        cursor.execute("SELECT pg_backend_pid()")
        return cursor.fetchone()[0]


def _session(*, autocommit: bool) -> psycopg.Connection:
    """A session of its own on the test database, outside Django's connections."""
    db = connection.settings_dict
    return psycopg.connect(host=db["HOST"] or "127.0.0.1", port=db["PORT"] or 5432, user=db["USER"],
                           password=db["PASSWORD"] or None, dbname=db["NAME"], autocommit=autocommit)


def session_state(pid: int) -> str:
    """'idle', 'active', or 'idle in transaction' (a transaction left open while the client does something else)."""
    with _session(autocommit=True) as probe:
        return probe.execute("SELECT state FROM pg_stat_activity WHERE pid = %s", [pid]).fetchone()[0]


def sessions_waiting_for_a_lock() -> int:
    with _session(autocommit=True) as probe:
        return probe.execute("SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
                             "AND wait_event_type = 'Lock'").fetchone()[0]


@contextlib.contextmanager
def row_locked(model, pk) -> Iterator[None]:
    """Hold `model`'s row `pk` locked FOR UPDATE from another session until the block ends, as a concurrent
    request would."""
    with _session(autocommit=False) as holder:
        holder.execute(f'SELECT 1 FROM "{model._meta.db_table}" WHERE id = %s FOR UPDATE', [pk])
        try:
            yield
        finally:
            holder.rollback()
