"""Every PostgreSQL connection has a statement timeout (DB_STATEMENT_TIMEOUT_SECONDS): one slow statement (a plan
gone wrong, a lock never released) held its connection, and the web thread or worker slot waiting on it, for ever."""

import copy
import runpy

import pytest
from django.db import OperationalError, connection

import marketplace.settings

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


@pytest.mark.parametrize(("environment", "options"), [
    ({}, "-c statement_timeout=30000"),
    ({"DB_STATEMENT_TIMEOUT_SECONDS": "5"}, "-c statement_timeout=5000"),
    ({"DATABASE_URL": "postgres://mk@db:5432/mk?options=-c%20search_path%3Dmk"},
     "-c search_path=mk -c statement_timeout=30000"),
    # Behind PgBouncer (transaction pooling), which refuses a connection sending startup options ("unsupported
    # startup parameter: options"): none sent, the timeout set on the database's role (README, Operations).
    ({"DB_STATEMENT_TIMEOUT_SECONDS": "0"}, None),
    ({"DB_STATEMENT_TIMEOUT_SECONDS": "0", "DATABASE_URL": "postgres://mk@db:6432/mk?options=-c%20search_path%3Dmk"},
     "-c search_path=mk"),
])
def test_the_statement_timeout_is_a_startup_option_unless_it_is_zero(monkeypatch, environment, options):
    monkeypatch.delenv("DB_STATEMENT_TIMEOUT_SECONDS", raising=False)
    monkeypatch.setenv("DATABASE_URL", "postgres://mk@db:6432/mk")
    for name, value in environment.items():
        monkeypatch.setenv(name, value)
    assert runpy.run_path(marketplace.settings.__file__)["DATABASES"]["default"]["OPTIONS"].get("options") == options
