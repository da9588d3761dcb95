"""Django's PostgreSQL backend with a health check that costs no round trip when there is nothing to check, and
cursors whose statements are prepared on the server, for the hot statements that are built once per process.

CONN_HEALTH_CHECKS makes Django ask `is_usable()` of a persistent connection once per request, before its first
query; Django's own check is a `SELECT 1`, a round trip on every request (on the metered proxy's path a fifth of
its waits for the database). An idle connection has nothing to say to us: when its socket has nothing to read, the
server has not closed it, and it is usable. When something is readable (the server's goodbye on a terminated
backend, end of file, a notice), Django's `SELECT 1` decides, as before. A connection that died without a word
(the host vanished) is still found by the first statement, which fails as it would have after a passing check."""

import select

from django.conf import settings
from django.db.backends.postgresql import base, operations
from psycopg.errors import DataError


class PreparedCursor(base.ServerBindingCursor):
    """Binds its parameters on the server and prepares each statement on its first execution in a connection
    (psycopg keeps up to `prepared_max`, 100, per connection, least recently used out first). Django's own cursor
    writes the parameters into the statement's text on the client (psycopg's ClientCursor), so PostgreSQL parses and
    plans every statement again, and lexes every byte of a large parameter as SQL text: planning was most of the
    database's CPU for a small read, and lexing a ~45 kB JSON literal most of an insert's."""

    def execute(self, query, params=None, *, prepare=None, binary=None):
        return super().execute(query, params, prepare=True if prepare is None else prepare, binary=binary)


class DatabaseOperations(operations.DatabaseOperations):
    def last_executed_query(self, cursor, sql, params):
        """A PreparedCursor's statement for the query log (DEBUG, tests) with its parameters written in, as Django's
        own statements are logged (psycopg keeps no text of a prepared statement's execution)."""
        if isinstance(cursor, PreparedCursor):
            try:
                return self.compose_sql(sql, params)
            except DataError:
                return None
        return super().last_executed_query(cursor, sql, params)


class DatabaseWrapper(base.DatabaseWrapper):
    ops_class = DatabaseOperations

    def is_usable(self):
        if self.connection is None or self.connection.closed:
            return False
        try:
            readable, _, _ = select.select([self.connection.fileno()], [], [], 0)
        except (OSError, ValueError):
            return False
        return not readable or super().is_usable()

    def prepared_cursor(self):
        """A cursor (wrapped as `cursor()` wraps its own: errors, logging) of `PreparedCursor`, for statements built
        once per process with `%s` placeholders; each placeholder is one value (no client-side expansion of lists
        or of several statements in one execute). With DATABASE_PREPARED_STATEMENTS off its statements are bound
        on the server but not prepared."""
        self.close_if_health_check_failed()  # as `cursor()` does before a request's first statement
        self.ensure_connection()
        connection = self.connection
        if connection.prepare_threshold is None and settings.DATABASE_PREPARED_STATEMENTS:
            # Django connects with preparation off (None), which psycopg applies to explicit requests too. A
            # threshold no statement reaches prepares only what asks for it: PreparedCursor's statements (Django's
            # own cursors bind on the client, so never prepare anyway).
            connection.prepare_threshold = _PREPARE_ONLY_WHEN_ASKED
        with self.wrap_database_errors:
            return self._prepare_cursor(PreparedCursor(connection))


_PREPARE_ONLY_WHEN_ASKED = 2**62
