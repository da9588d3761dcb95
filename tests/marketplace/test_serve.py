"""The web server's reload waits for a new worker to listen (marketplace.serve.Server; the reload itself is tested
against the real server in tests/faults/test_web_server_stopped.py)."""

import os
import socket

from marketplace.serve import listens_on


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
