"""What a PostgreSQL session is doing, seen from another connection (pg_stat_activity)."""

import psycopg
from django.db import connection


def backend_pid() -> int:
    with connection.cursor() as cursor:
        cursor.execute("SELECT pg_backend_pid()")
        return cursor.fetchone()[0]


def session_state(pid: int) -> str:
    """'idle', 'active', or 'idle in transaction' (a transaction left open while the client does something else)."""
    db = connection.settings_dict
    with psycopg.connect(host=db["HOST"] or "127.0.0.1", port=db["PORT"] or 5432, user=db["USER"],
                         password=db["PASSWORD"] or None, dbname=db["NAME"], autocommit=True) as probe:
        return probe.execute("SELECT state FROM pg_stat_activity WHERE pid = %s", [pid]).fetchone()[0]
