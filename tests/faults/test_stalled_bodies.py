"""Clients that send a request's head and then its body slowly, or never (the production web server hands the
request to a Python thread once its head is in, and has no body read timeout): each client holds its share of the
threads, clients in all half of them, and the server goes on answering everyone else (marketplace.request_bodies).
Every client here is a loopback address of its own (127.0.0.N), calling with the buyer's key: an authenticated
POST is one whose view reads the body (an anonymous one is refused before it)."""

import contextlib
import http.client
import json
import socket
import time

import pytest

pytestmark = [pytest.mark.slow, pytest.mark.faults, pytest.mark.chain, pytest.mark.postgres,
              pytest.mark.django_db(transaction=True)]

# The web server of the fault suite runs 16 threads: the defaults are a quarter of them per client, half in all.
PER_CLIENT, IN_ALL = 4, 8


class _SourceConnection(http.client.HTTPConnection):
    """A connection from a loopback address of its own: a client the server tells apart."""

    def __init__(self, port: int, source: str):
        super().__init__("127.0.0.1", port, timeout=5, source_address=(source, 0))


def _port(stack) -> int:
    return int(stack.url.rsplit(":", 1)[1])


@contextlib.contextmanager
def _stalled(stack, secret: str, source: str, count: int):
    """`count` requests from `source` whose heads promise a body that never comes, held open."""
    sockets = []
    try:
        for _ in range(count):
            sock = socket.create_connection(("127.0.0.1", _port(stack)), timeout=5, source_address=(source, 0))
            sock.sendall(b"POST /usage-agreements HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                         b"Authorization: Bearer " + secret.encode() + b"\r\nContent-Length: 1000\r\n\r\n")
            sockets.append(sock)
        time.sleep(1)  # every head in, and handed to a thread
        yield
    finally:
        for sock in sockets:
            sock.close()


def _call(stack, secret: str, source: str, method: str, body: bytes | None = None) -> tuple[int, http.client.HTTPMessage, dict]:
    connection = _SourceConnection(_port(stack), source)
    try:
        connection.request(method, "/usage-agreements", body=body, headers={
            "Content-Type": "application/json", "Authorization": f"Bearer {secret}"})
        answer = connection.getresponse()
        return answer.status, answer.headers, json.loads(answer.read() or b"{}")
    finally:
        connection.close()


def _answered_after_stalls_end(stack, secret: str, source: str) -> int:
    """The status of a POST from `source`, once the server noticed the stalled clients went away."""
    deadline = time.monotonic() + 10
    while True:
        status, _, _ = _call(stack, secret, source, "POST", b"{}")
        if status != 503 or time.monotonic() > deadline:
            return status
        time.sleep(0.2)


def test_a_client_stalling_its_bodies_holds_its_share_of_the_threads_and_everyone_else_is_answered(stack, parties):
    """Before: 20 stalled requests from one client held all 16 threads, and nothing was answered until they went
    away (a GET timed out)."""
    secret = parties.buyer_api.secret
    with _stalled(stack, secret, "127.0.0.1", 20):
        status, _, _ = _call(stack, secret, "127.0.0.1", "GET")
        assert status == 200  # answered, by a thread the stalled client does not hold
        status, _, _ = _call(stack, secret, "127.0.0.2", "POST", b"{}")
        assert status == 400  # another client's body is read and its request answered (an invalid proposal)
        status, headers, body = _call(stack, secret, "127.0.0.1", "POST", b"{}")
        assert status == 503  # the stalling client's own: refused at once, unread
        assert body["error"]["code"] == "request_bodies_busy"
        assert headers["Retry-After"] == "1"
    assert _answered_after_stalls_end(stack, secret, "127.0.0.1") == 400  # its slots given back as its connections closed


def test_many_clients_stalling_their_bodies_hold_half_the_threads_and_requests_without_a_body_are_answered(stack, parties):
    """Before: three clients' stalled requests held all 16 threads, and a GET timed out."""
    secret = parties.buyer_api.secret
    with _stalled(stack, secret, "127.0.0.2", PER_CLIENT), _stalled(stack, secret, "127.0.0.3", PER_CLIENT), \
            _stalled(stack, secret, "127.0.0.4", 16 - 2 * PER_CLIENT):
        for _ in range(IN_ALL):  # more than the threads left after the stalled ones, one after another
            status, _, _ = _call(stack, secret, "127.0.0.5", "GET")
            assert status == 200
        status, _, body = _call(stack, secret, "127.0.0.5", "POST", b"{}")
        assert status == 503  # half the threads wait on bodies already
        assert body["error"]["code"] == "request_bodies_busy"
    assert _answered_after_stalls_end(stack, secret, "127.0.0.5") == 400
