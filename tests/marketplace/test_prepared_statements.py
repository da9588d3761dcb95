"""marketplace.postgresql.prepared_cursor: the hot statements built once per process are bound and prepared on the
server (once per connection), logged with their parameters like any statement, and only bound, not prepared, with
DATABASE_PREPARED_STATEMENTS off (a pooler that cannot keep them)."""

import pytest
from django.db import connection
from django.test.utils import CaptureQueriesContext, override_settings

from marketplace.postgresql import prepared_cursor

pytestmark = [pytest.mark.postgres, pytest.mark.django_db]

STATEMENT = "SELECT %s::int + 1, %s::text || 'ok'"


def _prepared() -> list[str]:
    with connection.cursor() as cursor:
        cursor.execute("SELECT statement FROM pg_prepared_statements WHERE statement LIKE %s",
                       ["%::int + 1, $2::text%"])
        return [row[0] for row in cursor.fetchall()]


def test_a_statement_is_prepared_on_its_first_execution_and_logged_with_its_parameters():
    with CaptureQueriesContext(connection) as captured:
        for number in (1, 2, 3):
            with prepared_cursor() as cursor:
                cursor.execute(STATEMENT, [number, "it's "])
                assert cursor.fetchone() == (number + 1, "it's ok")
    assert len(_prepared()) == 1
    assert [query["sql"] for query in captured.captured_queries] == [
        f"SELECT {number}::int + 1, 'it''s '::text || 'ok'" for number in (1, 2, 3)]


def test_with_prepared_statements_off_a_statement_is_bound_but_not_prepared(monkeypatch):
    connection.ensure_connection()
    monkeypatch.setattr(connection.connection, "prepare_threshold", None)  # as Django connects
    with override_settings(DATABASE_PREPARED_STATEMENTS=False):
        for number in (1, 2):
            with prepared_cursor() as cursor:
                cursor.execute(STATEMENT, [number, "it's "])
                assert cursor.fetchone() == (number + 1, "it's ok")
    assert _prepared() == []
    assert connection.connection.prepare_threshold is None
