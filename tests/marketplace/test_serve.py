"""The web server: its reload waits for a new worker to listen (marketplace.serve.Server; the reload itself is tested
against the real server in tests/faults/test_web_server_stopped.py), and a worker serves as many slow calls at once
as it is handed connections."""

import http.client
import json
import os
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from marketplace.serve import command, listens_on, wait_until_every_worker_listens, workers_listening

# A stand-in for a granian worker: binds its own socket on the port (SO_REUSEPORT), after a while, and listens.
_WORKER = """
import socket, sys, time
time.sleep(float(sys.argv[2]))
sock = socket.socket()
sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
sock.bind(("127.0.0.1", int(sys.argv[1])))
sock.listen()
time.sleep(60)
"""


def test_a_process_listens_on_a_port_once_its_socket_listens():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
        assert not listens_on(os.getpid(), port)  # bound is not listening
        sock.listen()
        assert listens_on(os.getpid(), port)
        assert not listens_on(os.getpid(), port + 1 if port < 65535 else port - 1)


def test_a_process_that_is_gone_listens_on_nothing():
    assert not listens_on(2**22 + 1, 8000)  # above the kernel's largest process id


@pytest.fixture
def port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_the_wait_for_the_workers_ends_once_the_last_one_listens(port):
    """bench/load.py's 32 connections all landed on the one of three workers that listened first, when the bench
    started as soon as the server answered: half the throughput of a run whose connections were spread."""
    workers = [subprocess.Popen([sys.executable, "-c", _WORKER, str(port), str(delay)]) for delay in (0, 1.5)]
    try:
        started = time.monotonic()
        wait_until_every_worker_listens(os.getpid(), port, 2, timeout=30)
        assert time.monotonic() - started >= 1.4  # the slow one too
        assert workers_listening(os.getpid(), port) == 2
        with pytest.raises(TimeoutError):
            wait_until_every_worker_listens(os.getpid(), port, 3, timeout=0.5)
    finally:
        for worker in workers:
            worker.kill()
            worker.wait()
    assert workers_listening(os.getpid(), port) == 0


# A WSGI application whose every call waits, as a metered call waits for the seller's upstream.
_SLOW_APPLICATION = """
import time

def application(environ, start_response):
    time.sleep(1)
    start_response("200 OK", [("Content-Type", "text/plain")])
    return [b"served"]
"""


def test_one_worker_serves_sixteen_slow_calls_at_once(port, tmp_path):
    """A metered call holds its thread while the upstream works, and the kernel hands each worker the connections
    that hash to its socket, unevenly. With 8 threads a worker handed more than 8 of 16 callers' connections kept
    the rest waiting a whole call: one worker serving 16 callers at a 20 ms upstream carried 0.46x direct
    throughput (bench/proxy.py --workers 1), 0.82-0.85x with 16 threads, the default now."""
    (tmp_path / "slow_application.py").write_text(_SLOW_APPLICATION)
    root = Path(__file__).resolve().parents[2]
    server = subprocess.Popen(command(port=port, workers=1, application="slow_application:application"),
                              cwd=tmp_path, env={**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), str(root)])})

    def call(_) -> int:
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        try:
            connection.request("GET", "/")
            return connection.getresponse().status
        finally:
            connection.close()

    try:
        wait_until_every_worker_listens(server.pid, port, 1, timeout=60)
        call(None)  # the worker's threads and the application loaded
        started = time.monotonic()
        with ThreadPoolExecutor(16) as callers:
            statuses = list(callers.map(call, range(16)))
        elapsed = time.monotonic() - started
    finally:
        server.terminate()
        server.wait(timeout=30)
    assert statuses == [200] * 16
    assert elapsed < 1.6  # one call's time, not two (8 threads: 2 s and more)


def test_the_servers_own_environment_is_no_part_of_a_request(port):
    """granian starts each request's environ from the worker's os.environ: a variable of the server's named like a
    header (`HTTP_AUTHORIZATION` here; `HTTP_PROXY`, set on hosts behind an egress proxy, is common) was that header
    on every request that did not send one (read as the client's, forwarded by the metered proxy to sellers), and
    the process's secrets were in every request's META."""
    root = Path(__file__).resolve().parents[2]
    server = subprocess.Popen(command(port=port, workers=1), cwd=root,
                              env={**os.environ, "HTTP_AUTHORIZATION": "Bearer mk_from_the_servers_environment",
                                   "DJANGO_SETTINGS_MODULE": "marketplace.settings"})

    def agent_me(headers: dict) -> tuple[int, str]:
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        try:
            connection.request("GET", "/agents/me", headers=headers)
            answer = connection.getresponse()
            return answer.status, json.loads(answer.read())["error"]["code"]
        finally:
            connection.close()

    try:
        wait_until_every_worker_listens(server.pid, port, 1, timeout=60)
        anonymous, malformed = agent_me({}), agent_me({"Authorization": "Bearer garbage"})
    finally:
        server.terminate()
        server.wait(timeout=30)
    assert anonymous == (401, "not_authenticated")  # (401, "invalid_credentials"): the server's variable, as a header
    assert malformed == (401, "invalid_credentials")  # a header the request sends is the request's


_ENVIRON_APPLICATION = """
import json


def application(environ, start_response):
    start_response("200 OK", [("Content-Type", "application/json")])
    return [json.dumps({key: value for key, value in environ.items() if isinstance(value, str)}).encode()]
"""


def test_the_server_hands_over_the_path_decoded_as_latin1_and_the_query_string_as_sent(port, tmp_path):
    """What the metered proxy's forwarded path rests on (agreements.proxy.upstream_path): granian decodes the path's
    escapes, `%2F` too, and hands the bytes over as latin-1 text (PEP 3333), the query string as it came, and no raw
    request target (no RAW_URI or REQUEST_URI, as gunicorn or uWSGI give): a `%2F` cannot be told from a `/`."""
    (tmp_path / "environ_application.py").write_text(_ENVIRON_APPLICATION)
    root = Path(__file__).resolve().parents[2]
    server = subprocess.Popen(command(port=port, workers=1, application="environ_application:application"),
                              cwd=tmp_path, env={**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), str(root)])})

    def environ(target: str) -> dict:
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        try:
            connection.putrequest("GET", target, skip_accept_encoding=True)
            connection.endheaders()
            return json.loads(connection.getresponse().read())
        finally:
            connection.close()

    try:
        wait_until_every_worker_listens(server.pid, port, 1, timeout=60)
        seen = {target: environ(target) for target in ("/caf%E9", "/caf%C3%A9", "/a%2Fb%3B;c", "/x%25E9?q=%E9+a%2B")}
    finally:
        server.terminate()
        server.wait(timeout=30)
    assert {target: (seen[target]["PATH_INFO"], seen[target]["QUERY_STRING"]) for target in seen} == {
        "/caf%E9": ("/caf\xe9", ""), "/caf%C3%A9": ("/caf\xc3\xa9", ""), "/a%2Fb%3B;c": ("/a/b;;c", ""),
        "/x%25E9?q=%E9+a%2B": ("/x%E9", "q=%E9+a%2B")}
    assert not {"RAW_URI", "REQUEST_URI", "RAW_PATH"} & set(seen["/caf%E9"])
