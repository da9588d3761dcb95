"""The metered proxy against sellers' hosts that answer before reading what they were sent: a request that may have
reached the upstream is never sent again, and a connection whose upstream answered early is not used again."""

import hashlib
import socket
import ssl
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

import pytest
import trustme

from agreements.models import ProxyReplay, UsageAgreement, UsageEvent
from marketplace import outbound
from tests.conftest import error_code, read_to_its_end
from tests.marketplace.conftest import active_agreement

pytestmark = [pytest.mark.chain, pytest.mark.django_db]
PRICE = 20_000
BIG = 12 * 2**20  # past what the sockets' buffers hold (4 MiB ours at most): the proxy is still writing it


def _call(parties, method: str, path: str, **extra):
    response = getattr(parties.buyer_api.client, method)(
        path, HTTP_AUTHORIZATION=f"Bearer {parties.buyer_api.secret}", **extra)
    return read_to_its_end(response)


def _body(response) -> bytes:
    return b"".join(response.streaming_content) if response.streaming else response.content


def _head(connection: socket.socket, received: bytes) -> tuple[bytes, bytes] | None:
    """(the next request's head, what was received after it), or None once the connection is closed."""
    while b"\r\n\r\n" not in received:
        more = connection.recv(65536)
        if not more:
            return None
        received += more
    head, rest = received.split(b"\r\n\r\n", 1)
    return head, rest


def _content_length(head: bytes) -> int:
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            return int(value)
    return 0


@contextmanager
def _upstream(serve) -> Iterator[str]:
    """A raw upstream on loopback, `serve(connection, number)` on each connection (numbered from 1) in a thread of its
    own; its receive buffer small, so a large body waits on it. Yields its base URL."""
    listener = socket.create_server(("127.0.0.1", 0))
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 65536)

    def accept():
        for number in range(1, 100):
            try:
                connection, _ = listener.accept()
            except OSError:
                return
            threading.Thread(target=serve, args=(connection, number), daemon=True).start()

    threading.Thread(target=accept, daemon=True).start()
    with listener:
        yield f"http://127.0.0.1:{listener.getsockname()[1]}/api"


def test_a_request_that_reached_the_upstream_on_a_reused_connection_is_never_sent_again(
        escrow_chain, settings, django_capture_on_commit_callbacks):
    """The upstream answers the first call and keeps its connection; the second call, down that connection, it
    answers as soon as its head is in and closes without reading its body (a reset: the body unread). The proxy,
    still writing the body, took the reset for a connection closed before the request reached the upstream and
    sent it again on a new one: the seller acted on it twice."""
    settings.PROXY_MAX_REQUEST_BYTES = settings.DATA_UPLOAD_MAX_MEMORY_SIZE = 2 * BIG
    heads: list[bytes] = []

    def serve(connection, number):
        with connection:
            received = b""
            while (request := _head(connection, received)) is not None:
                head, received = request
                heads.append(head.split(b"\r\n")[0])
                if head.startswith(b"POST /api/act "):  # answered early, then closed on the unread body
                    connection.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nearly")
                    time.sleep(0.3)
                    return
                length = _content_length(head)
                while len(received) < length:
                    received += connection.recv(65536)
                received = received[length:]
                connection.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n{}")

    with _upstream(serve) as url:
        active = active_agreement(escrow_chain, django_capture_on_commit_callbacks, url)
        first = _call(active, "post", f"{active.proxy}/first", data=b"{}", content_type="application/json")
        assert (first.status_code, _body(first)) == (200, b"{}")
        second = _call(active, "post", f"{active.proxy}/act", data=b"x" * BIG, content_type="text/plain")
    assert heads.count(b"POST /api/act HTTP/1.1") == 1, heads  # never sent again
    assert (second.status_code, error_code(second)) == (502, "upstream_unavailable")
    agreement = UsageAgreement.objects.get(pk=active.agreement_id)
    assert (agreement.used, agreement.reserved) == (PRICE, 0)  # the first call only


def test_a_connection_whose_upstream_answered_before_the_body_was_written_is_not_used_again(
        escrow_chain, settings, django_capture_on_commit_callbacks):
    """A host answering each request once its head is in, and reading the body that follows as the next request
    (a handler that does not read it, on a server that keeps the connection alive): its answer to what the body held
    went to the buyer's next call down the connection, which was charged for it."""
    settings.PROXY_MAX_REQUEST_BYTES = settings.DATA_UPLOAD_MAX_MEMORY_SIZE = 2 * BIG

    def serve(connection, number):
        with connection:
            received = b""
            while (request := _head(connection, received)) is not None:
                head, received = request
                path = head.split(b" ")[1]
                if path.endswith(b"/smuggled"):
                    time.sleep(0.5)  # past the check of the connection before it is used again
                connection.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(path), path))
                if path.endswith(b"/x"):
                    time.sleep(0.3)  # the body still on its way

    smuggled = b"GET /api/smuggled HTTP/1.1\r\nHost: seller.example\r\n\r\n"
    with _upstream(serve) as url:
        active = active_agreement(escrow_chain, django_capture_on_commit_callbacks, url)
        first = _call(active, "post", f"{active.proxy}/x", data=b"x" * BIG + smuggled, content_type="text/plain")
        assert (first.status_code, _body(first)) == (200, b"/api/x")
        second = _call(active, "get", f"{active.proxy}/mine")
    assert (second.status_code, _body(second)) == (200, b"/api/mine")
    assert UsageEvent.objects.count() == 2


def test_a_stored_nonce_fingerprint_does_not_confirm_a_guessed_body_of_its_call(
        escrow_chain, http_server, django_capture_on_commit_callbacks):
    """The fingerprint kept with a nonce's reply (for PROXY_REPLAY_KEEP_DAYS past the agreement's settlement) was a
    plain SHA-256 of the call's method, path and body: a reader of the database could test guesses of a body (a
    password or key the buyer passes to the seller's service) offline, as with the Idempotency-Key table's once."""
    active = active_agreement(escrow_chain, django_capture_on_commit_callbacks, f"{http_server.url}/base")
    body = b'{"api_key": "sk-1234"}'
    answer = _call(active, "post", f"{active.proxy}/login", data=body, content_type="application/json",
                   HTTP_X_REQUEST_NONCE="login-1")
    assert answer.status_code == 200
    stored = ProxyReplay.objects.get(request_nonce="login-1").request_fingerprint
    assert stored != hashlib.sha256(b"POST /base/login\n" + body).hexdigest()
    assert stored != hashlib.sha256(b"POST /login\n" + body).hexdigest()
    again = _call(active, "post", f"{active.proxy}/login", data=body, content_type="application/json",
                  HTTP_X_REQUEST_NONCE="login-1")
    assert (again.status_code, again["X-Replayed"]) == (200, "true")


@contextmanager
def _tls_upstream(monkeypatch, answer: bytes, *, close_notify: bool) -> Iterator[str]:
    """An HTTPS upstream answering one call with `answer`, then closing: with TLS's close_notify, or cutting the TCP
    connection under it. Yields its base URL; the proxy trusts its certificate."""
    authority = trustme.CA()
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    authority.issue_cert("localhost").configure_cert(context)
    trusting = ssl.create_default_context()
    authority.configure_trust(trusting)
    monkeypatch.setattr(outbound._GuardedTLSConnection, "_context", trusting)
    listener = socket.create_server(("127.0.0.1", 0))

    def serve():
        raw_connection, _ = listener.accept()
        try:
            connection = context.wrap_socket(raw_connection, server_side=True)
            _head(connection, b"")
            connection.sendall(answer)
            if close_notify:
                connection.unwrap()
        except OSError:
            pass
        finally:
            raw_connection.close()  # no close_notify unless unwrapped

    threading.Thread(target=serve, daemon=True).start()
    with listener:
        yield f"https://localhost:{listener.getsockname()[1]}/api"


@pytest.mark.parametrize("close_notify", [True, False], ids=["closed_by_tls", "cut_under_tls"])
def test_a_tls_answer_delimited_by_its_close_is_whole_only_when_tls_says_so(
        escrow_chain, monkeypatch, django_capture_on_commit_callbacks, close_notify):
    """An answer with neither Content-Length nor chunked coding ends where its connection does (RFC 9112 6.3); over
    TLS, a close without close_notify is an incomplete one (RFC 9112 8, 9.8): whoever cut the connection (a middlebox,
    an attacker on the path) cut the answer. Python reads it as the end (suppress_ragged_eofs), so a truncated answer
    was passed on, stored for the nonce's replays, and charged as whole."""
    answer = b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nConnection: close\r\n\r\nthe first half"
    with _tls_upstream(monkeypatch, answer, close_notify=close_notify) as url:
        active = active_agreement(escrow_chain, django_capture_on_commit_callbacks, url)
        response = _call(active, "get", f"{active.proxy}/report", HTTP_X_REQUEST_NONCE="report-1")
    if close_notify:
        assert (response.status_code, _body(response)) == (200, b"the first half")
    else:
        assert (response.status_code, error_code(response)) == (502, "upstream_answer_cut_short")
        assert ProxyReplay.objects.get(request_nonce="report-1").body != b"the first half"
    assert UsageEvent.objects.count() == 1  # the seller answered: charged either way, the cut named to the buyer


def test_an_upstream_flooding_informational_answers_is_502_at_once_and_charges_nothing(
        escrow_chain, settings, django_capture_on_commit_callbacks):
    """Informational answers (103 Early Hints) were skipped without bound: an upstream sending them endlessly kept the
    web thread parsing heads, holding the GIL, until PROXY_TIMEOUT (60 s), then 504. Past five, as Go's client reads,
    the answer is refused."""
    settings.PROXY_TIMEOUT = 2
    sent = []

    def serve(connection, number):
        with connection:
            _head(connection, b"")
            try:
                while True:
                    connection.sendall(b"HTTP/1.1 103 Early Hints\r\nLink: </a.css>; rel=preload\r\n\r\n" * 100)
                    sent.append(100)
            except OSError:
                pass

    with _upstream(serve) as url:
        active = active_agreement(escrow_chain, django_capture_on_commit_callbacks, url)
        started = time.monotonic()
        response = _call(active, "get", f"{active.proxy}/hints")
        took = time.monotonic() - started
    assert (response.status_code, error_code(response)) == (502, "upstream_unavailable")
    assert took < 1
    agreement = UsageAgreement.objects.get(pk=active.agreement_id)
    assert (agreement.used, agreement.reserved) == (0, 0)
