import contextlib
import zlib

from django.db import DatabaseError, connection


def prepared_cursor():
    """A cursor of the default database whose statements are bound and prepared on the server
    (`base.PreparedCursor`) on PostgreSQL; elsewhere Django's own cursor."""
    prepared = getattr(connection, "prepared_cursor", None)
    return connection.cursor() if prepared is None else prepared()


@contextlib.contextmanager
def transaction_in_pipelines():
    """PostgreSQL, outside any transaction of the caller's: a transaction the caller writes out itself, so that its
    BEGIN and COMMIT travel in the same pipelines (round trips) as its statements. Yields `(cursor, control,
    pipeline)`: `control` runs BEGIN and COMMIT, so `cursor` keeps the result of its own last statement; the two
    queue their statements inside `with pipeline():` blocks. Any error rolls the transaction back and goes on.

    psycopg raises a statement's error where it reads the result: at the statement (through Django's cursor wrapper)
    or at the end of its pipeline (outside it), as timing has it. Both arrive as Django's database errors, which is
    what callers catch (a lost connection is `django.db.OperationalError`)."""
    with prepared_cursor() as cursor, prepared_cursor() as control:
        try:
            with connection.wrap_database_errors:
                yield cursor, control, connection.connection.pipeline  # connected by now (prepared_cursor)
        except BaseException:
            with contextlib.suppress(DatabaseError):
                control.execute("ROLLBACK")
            raise


@contextlib.contextmanager
def alone(name: str):
    """Whether this process is the only one running `name` now: on PostgreSQL a session advisory lock keyed by the
    name (no transaction held open, released when the process dies), tried, never waited for. Elsewhere (the
    SQLite dev default) always True: the caller's own claims must then keep two runners from acting twice."""
    if connection.vendor != "postgresql":
        yield True
        return
    key = zlib.crc32(name.encode())
    with connection.cursor() as db:
        db.execute("SELECT pg_try_advisory_lock(%s)", [key])
        acquired = db.fetchone()[0]
    try:
        yield acquired
    finally:
        if acquired:
            with connection.cursor() as db:
                db.execute("SELECT pg_advisory_unlock(%s)", [key])
