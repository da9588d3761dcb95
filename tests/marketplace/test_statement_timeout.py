"""Every PostgreSQL connection has a statement timeout (DB_STATEMENT_TIMEOUT_SECONDS): one slow statement (a plan
gone wrong, a lock never released) held its connection, and the web thread or worker slot waiting on it, for ever."""

import copy

import pytest
from django.db import OperationalError, connection

pytestmark = [pytest.mark.postgres, pytest.mark.django_db]


def _statement_timeout(wrapper) -> str:
    with wrapper.cursor() as cursor:
        cursor.execute("SHOW statement_timeout")
        return cursor.fetchone()[0]


def test_every_connection_has_the_statement_timeout_set(settings):
    assert settings.DB_STATEMENT_TIMEOUT_SECONDS > 0
    assert _statement_timeout(connection) == f"{settings.DB_STATEMENT_TIMEOUT_SECONDS}s"


def test_a_statement_running_past_the_timeout_is_cancelled_and_the_connection_stays_usable(settings):
    """The settings' connection options, with the timeout shortened, on a connection of their own."""
    options = connection.settings_dict["OPTIONS"]["options"]
    short = options.replace(f"statement_timeout={settings.DB_STATEMENT_TIMEOUT_SECONDS * 1000}",
                            "statement_timeout=200")
    assert short != options
    other = connection.copy()
    other.settings_dict = copy.deepcopy(connection.settings_dict)
    other.settings_dict["OPTIONS"]["options"] = short
    try:
        with pytest.raises(OperationalError, match="statement timeout"), other.cursor() as cursor:
            cursor.execute("SELECT pg_sleep(5)")
        assert _statement_timeout(other) == "200ms"
    finally:
        other.close()


def test_migrations_run_without_the_statement_timeout_and_leave_the_connection_as_it_was(settings, monkeypatch):
    """A schema change or data migration on a large table takes what it takes: cancelled half-way at the serving
    processes' timeout, it is rolled back and starts again at every deploy."""
    from django.core.management import call_command
    from django.core.management.commands.migrate import Command as DjangoMigrate

    seen = []
    monkeypatch.setattr(DjangoMigrate, "handle", lambda self, *args, **options: seen.append(
        _statement_timeout(connection)))
    call_command("migrate", verbosity=0)
    assert seen == ["0"]
    assert _statement_timeout(connection) == f"{settings.DB_STATEMENT_TIMEOUT_SECONDS}s"
