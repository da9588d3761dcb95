"""The floor bench/proxy.py compares the metered proxy with: a WSGI application with no framework that does, per
call, what a metered call cannot do without (one statement on PostgreSQL that commits durably, one call to the
upstream over a kept-alive connection, one secp256k1 signature over what it answered), served by the same granian
command as the marketplace (marketplace.serve). What the machine charges for that I/O alone: the proxy's own cost
is what it spends above it.

Configured by the environment bench/proxy.py starts it with: BENCH_FLOOR_UPSTREAM (host:port) and
BENCH_FLOOR_DATABASE_URL (a database holding the table `bench_proxy_floor (id int primary key, calls bigint)`).
"""

import hashlib
import http.client
import os
import threading

import coincurve
import psycopg

_KEY = coincurve.PrivateKey(hashlib.sha256(b"bench/proxy_floor").digest())
_HOST, _, _PORT = os.environ.get("BENCH_FLOOR_UPSTREAM", "127.0.0.1:0").rpartition(":")
_per_thread = threading.local()


def _connections() -> tuple[psycopg.Connection, http.client.HTTPConnection]:
    if not hasattr(_per_thread, "database"):
        _per_thread.database = psycopg.connect(os.environ["BENCH_FLOOR_DATABASE_URL"], autocommit=True)
        _per_thread.upstream = http.client.HTTPConnection(_HOST, int(_PORT), timeout=30)
    return _per_thread.database, _per_thread.upstream


def application(environ, start_response):
    database, upstream = _connections()
    (calls,) = database.execute("UPDATE bench_proxy_floor SET calls = calls + 1 WHERE id = 1 RETURNING calls",
                                prepare=True).fetchone()
    query = environ.get("QUERY_STRING", "")
    upstream.request(environ["REQUEST_METHOD"], "/work" + (f"?{query}" if query else ""))
    answer = upstream.getresponse()
    body = answer.read()
    signature = _KEY.sign_recoverable(hashlib.sha256(body + str(calls).encode()).digest(), hasher=None)
    start_response(f"{answer.status} {answer.reason}", [("Content-Type", "application/json"),
                                                         ("X-Floor-Signature", signature.hex())])
    return [body]
