"""The floor bench/proxy.py compares the metered proxy with: a WSGI application with no framework that does, per
call, what a metered call cannot do without (one statement on PostgreSQL that commits durably, one call to the
upstream over a kept-alive connection, one secp256k1 signature over what it answered), served by the same granian
command as the marketplace (marketplace.serve). What the machine charges for that I/O alone: the proxy's own cost
is what it spends above it.

`async_application` is the same floor on an event loop (ASGI: psycopg's async connections, aiohttp's client, one
loop per granian worker), for bench/proxy_event_loop.py: what serving the proxy asynchronously would cost at best.

Configured by the environment bench/proxy.py starts it with: BENCH_FLOOR_UPSTREAM (host:port) and
BENCH_FLOOR_DATABASE_URL (a database holding the table `bench_proxy_floor (id int primary key, calls bigint)`).
The query's `row` (default 1) is the row a call counts on (one per caller: no caller waits for another's row lock);
the rest of the query is passed on to the upstream.
"""

import asyncio
import hashlib
import http.client
import os
import threading
from urllib.parse import parse_qsl, urlencode

import coincurve
import psycopg

_KEY = coincurve.PrivateKey(hashlib.sha256(b"bench/proxy_floor").digest())
_UPSTREAM = os.environ.get("BENCH_FLOOR_UPSTREAM", "127.0.0.1:0")
_HOST, _, _PORT = _UPSTREAM.rpartition(":")
_COUNT = "UPDATE bench_proxy_floor SET calls = calls + 1 WHERE id = %s RETURNING calls"
_HEADERS = [("Content-Type", "application/json")]
_per_thread = threading.local()


def create_table(database_url: str, rows: int) -> None:
    """The floor's table, made anew with `rows` rows counting from 0 (ids 1..rows)."""
    with psycopg.connect(database_url, autocommit=True) as database:
        database.execute("DROP TABLE IF EXISTS bench_proxy_floor")
        database.execute("CREATE TABLE bench_proxy_floor (id int PRIMARY KEY, calls bigint NOT NULL)")
        database.execute("INSERT INTO bench_proxy_floor SELECT row, 0 FROM generate_series(1, %s) row", [rows])


def _call(query: str) -> tuple[int, str]:
    """The call's row and what to ask the upstream for."""
    parameters = parse_qsl(query)
    row = next((int(value) for name, value in parameters if name == "row"), 1)
    rest = urlencode([(name, value) for name, value in parameters if name != "row"])
    return row, "/work" + (f"?{rest}" if rest else "")


def _signature(body: bytes, calls: int) -> str:
    return _KEY.sign_recoverable(hashlib.sha256(body + str(calls).encode()).digest(), hasher=None).hex()


def _connections() -> tuple[psycopg.Connection, http.client.HTTPConnection]:
    if not hasattr(_per_thread, "database"):
        _per_thread.database = psycopg.connect(os.environ["BENCH_FLOOR_DATABASE_URL"], autocommit=True)
        _per_thread.upstream = http.client.HTTPConnection(_HOST, int(_PORT), timeout=30)
    return _per_thread.database, _per_thread.upstream


def _upstream_answer(upstream: http.client.HTTPConnection, method: str, target: str) -> http.client.HTTPResponse:
    """The upstream's answer, on the thread's kept-alive connection; one the upstream closed while it was idle (aiohttp
    closes a connection idle for 75 s: the one opened when bench/proxy.py first called the floor, before its direct
    and proxied phases) is opened again, once: the bench's calls are GETs, which the proxy's own pool sends again the
    same way."""
    try:
        upstream.request(method, target)
        return upstream.getresponse()
    except (ConnectionResetError, BrokenPipeError):  # http.client.RemoteDisconnected is a ConnectionResetError
        upstream.close()
        upstream.request(method, target)
        return upstream.getresponse()


def application(environ, start_response):
    database, upstream = _connections()
    row, target = _call(environ.get("QUERY_STRING", ""))
    (calls,) = database.execute(_COUNT, [row], prepare=True).fetchone()
    answer = _upstream_answer(upstream, environ["REQUEST_METHOD"], target)
    body = answer.read()
    start_response(f"{answer.status} {answer.reason}", [*_HEADERS, ("X-Floor-Signature", _signature(body, calls))])
    return [body]


class _EventLoopConnections:
    """A worker's connections on its event loop: PostgreSQL connections kept idle between calls (one per call in
    flight at most, as the WSGI floor keeps one per thread) and one aiohttp session (kept-alive upstream
    connections)."""

    def __init__(self):
        self.idle: list[psycopg.AsyncConnection] = []
        self.session = None

    async def database(self) -> psycopg.AsyncConnection:
        if self.idle:
            return self.idle.pop()
        return await psycopg.AsyncConnection.connect(os.environ["BENCH_FLOOR_DATABASE_URL"], autocommit=True)

    def upstream(self):
        if self.session is None:
            import aiohttp

            self.session = aiohttp.ClientSession(f"http://{_UPSTREAM}")
        return self.session


_on_loop: dict[asyncio.AbstractEventLoop, _EventLoopConnections] = {}


async def async_application(scope, receive, send):
    if scope["type"] == "lifespan":
        while (await receive())["type"] != "lifespan.shutdown":
            await send({"type": "lifespan.startup.complete"})
        await send({"type": "lifespan.shutdown.complete"})
        return
    connections = _on_loop.setdefault(asyncio.get_running_loop(), _EventLoopConnections())
    row, target = _call(scope["query_string"].decode("latin-1"))
    database = await connections.database()
    (calls,) = await (await database.execute(_COUNT, [row], prepare=True)).fetchone()
    connections.idle.append(database)  # kept for the next call only once it served this one
    async with connections.upstream().request(scope["method"], target) as answer:
        body = await answer.read()
    headers = [(name.encode(), value.encode()) for name, value in _HEADERS]
    await send({"type": "http.response.start", "status": answer.status,
                "headers": [*headers, (b"x-floor-signature", _signature(body, calls).encode())]})
    await send({"type": "http.response.body", "body": body})
