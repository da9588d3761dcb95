"""The web server's reload waits for a new worker to listen (marketplace.serve.Server; the reload itself is tested
against the real server in tests/faults/test_web_server_stopped.py)."""

import os
import socket
import subprocess
import sys
import time

import pytest

from marketplace.serve import listens_on, wait_until_every_worker_listens, workers_listening

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
