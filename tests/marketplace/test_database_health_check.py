"""marketplace.postgresql: the per-request health check of a persistent connection (CONN_HEALTH_CHECKS) costs no
round trip while the connection is idle and sound, and still finds a connection the server closed."""

import time

import pytest
from django.db import connection, connections

pytestmark = [pytest.mark.postgres, pytest.mark.django_db(transaction=True)]


def _terminated_by_the_server() -> int:
    """Open the connection, have the server terminate its backend; its pid."""
    connection.ensure_connection()
    pid = connection.connection.info.backend_pid
    killer = connections.create_connection("default")
    try:
        with killer.cursor() as cursor:
            cursor.execute("SELECT pg_terminate_backend(%s)", [pid])
    finally:
        killer.close()
    return pid


def test_an_idle_sound_connection_is_usable_without_a_round_trip(monkeypatch):
    connection.ensure_connection()
    monkeypatch.setattr(type(connection.connection), "cursor", lambda *args, **kwargs: pytest.fail("a round trip"))
    assert connection.is_usable()


def test_a_connection_the_server_closed_is_not_usable_and_the_next_request_reconnects():
    pid = _terminated_by_the_server()
    time.sleep(0.2)  # the server's goodbye reaches the socket
    assert not connection.is_usable()

    connection.close_if_unusable_or_obsolete()  # what Django does when a request starts
    with connection.cursor() as cursor:
        cursor.execute("SELECT pg_backend_pid()")
        assert cursor.fetchone()[0] != pid


def test_a_request_whose_first_statement_is_prepared_checks_the_connection_first():
    """Django checks a persistent connection before a request's first cursor (`close_if_health_check_failed`);
    `prepared_cursor` must too, or a later plain cursor of the same request would check, reconnect, and run in
    another session than the statements before it."""
    from marketplace.postgresql import prepared_cursor

    pid = _terminated_by_the_server()
    time.sleep(0.2)
    connection.health_check_enabled, connection.health_check_done = True, False  # a request starts

    with prepared_cursor() as cursor:  # checked first: a new connection, not the dead one
        cursor.execute("SELECT pg_backend_pid()")
        assert cursor.fetchone()[0] != pid
    assert connection.health_check_done
