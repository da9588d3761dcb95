"""bench/proxy_floor.py, the floor bench/proxy.py measures the proxy against: a call on a kept-alive connection that
the upstream closed while it was idle is answered, not failed (a run of bench/proxy.py with 40 s phases counted one
such error against the floor: aiohttp closes a connection idle for 75 s)."""

import socket
import threading

import psycopg
import pytest
from django.db import connection
from psycopg.conninfo import make_conninfo

from bench import proxy_floor

pytestmark = [pytest.mark.postgres, pytest.mark.django_db]


class ClosingUpstream:
    """Answers the first request of each connection, then closes it without saying so, as an upstream closes a
    connection idle beyond its keep-alive timeout."""

    def __init__(self):
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.connections = 0
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                accepted, _ = self.listener.accept()
            except OSError:  # closed: the test is over
                return
            with accepted:
                self.connections += 1
                accepted.recv(65536)
                accepted.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 2\r\n\r\n{}")


@pytest.fixture
def floor(monkeypatch):
    upstream = ClosingUpstream()
    settings = connection.settings_dict
    database_url = make_conninfo(dbname=settings["NAME"], host=settings["HOST"], port=settings["PORT"],
                                 user=settings["USER"], password=settings["PASSWORD"])
    monkeypatch.setenv("BENCH_FLOOR_DATABASE_URL", database_url)
    monkeypatch.setattr(proxy_floor, "_HOST", "127.0.0.1")
    monkeypatch.setattr(proxy_floor, "_PORT", str(upstream.port))
    monkeypatch.setattr(proxy_floor, "_per_thread", threading.local())
    proxy_floor.create_table(database_url, rows=1)
    yield upstream
    upstream.listener.close()
    proxy_floor._per_thread.database.close()
    proxy_floor._per_thread.upstream.close()
    with psycopg.connect(database_url, autocommit=True) as database:
        database.execute("DROP TABLE bench_proxy_floor")


def call_floor() -> str:
    answer = {}
    body = b"".join(proxy_floor.application({"REQUEST_METHOD": "GET", "QUERY_STRING": ""},
                                            lambda status, headers: answer.update(status=status)))
    return f"{answer['status']} {body.decode()}"


def test_a_call_on_a_connection_the_upstream_closed_is_sent_again_on_a_new_one(floor):
    assert call_floor() == "200 OK {}"
    assert call_floor() == "200 OK {}"  # its kept-alive connection was closed by the upstream meanwhile
    assert floor.connections == 2
