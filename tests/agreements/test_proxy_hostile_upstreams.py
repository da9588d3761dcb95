"""The metered proxy against sellers' hosts that answer before reading what they were sent: a request that may have
reached the upstream is never sent again, and a connection whose upstream answered early is not used again."""

import hashlib
import io
import socket
import ssl
import threading
import time
import tracemalloc
from collections.abc import Iterator
from contextlib import contextmanager
from urllib.parse import urljoin

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


def _answering_each(answer, connections: list[int]):
    """An upstream answering each call with `answer(its path)` on a connection kept alive; notes in `connections` the
    number of the connection each request came on."""

    def serve(connection, number):
        with connection:
            received = b""
            while (request := _head(connection, received)) is not None:
                head, received = request
                connections.append(number)
                connection.sendall(answer(head.split(b" ")[1]))

    return _upstream(serve)


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


def _books(parties) -> tuple[int, int]:
    agreement = UsageAgreement.objects.get(pk=parties.agreement_id)
    return agreement.used, agreement.reserved


def _framed_upstream(first_answer: bytes, rest: bytes, connections: list[int]):
    """An upstream answering the call to `/framed` with `first_answer` and, once the next request on the same
    connection is in (past the pool's check that an idle connection holds nothing unread), `rest` before that
    request's own answer (its path, with a Content-Length); every other call with its own answer. Notes in
    `connections` the number of the connection each request came on."""

    def serve(connection, number):
        with connection:
            received, pending = b"", b""
            while (request := _head(connection, received)) is not None:
                head, received = request
                connections.append(number)
                path = head.split(b" ")[1]
                if path.endswith(b"/framed"):
                    connection.sendall(first_answer)
                    if not rest:
                        return  # an answer delimited by its close
                    pending = rest
                    continue
                connection.sendall(pending + b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(path), path))
                pending = b""

    return _upstream(serve)


_CHUNKED_BODY = b"5\r\nfirst\r\n0\r\n\r\n"


@pytest.mark.parametrize("framing, length", [
    (b"Transfer-Encoding: gzip, chunked", 8),
    (b"Transfer-Encoding: chunked, gzip", 8),
    (b"Transfer-Encoding: gzip\r\nTransfer-Encoding: chunked", 8),
    (b"Transfer-Encoding: chunked, chunked", 8),
    (b"Transfer-Encoding: gzip, chunked", None),
    (b"Transfer-Encoding: chunked, gzip", None),
], ids=["gzip-chunked-with-length", "chunked-gzip-with-length", "two-fields-with-length", "chunked-twice-with-length",
        "gzip-chunked-to-close", "chunked-gzip-to-close"])
def test_an_answer_framed_by_transfer_codings_other_than_chunked_alone_is_502_charges_nothing_and_desyncs_nothing(
        escrow_chain, django_capture_on_commit_callbacks, framing, length):
    """http.client takes an answer as chunked only when its first Transfer-Encoding is exactly `chunked`: any other
    (`gzip, chunked`, `chunked, gzip`, two fields) was read by its Content-Length, which RFC 9112 6.3 says to ignore
    beside a Transfer-Encoding, or to its close, and passed on with its chunk sizes and transfer coding in it,
    charged. Read by a Content-Length, the rest of the body stayed on the kept-alive connection and was read as the
    answer to the buyer's next call (a 502 for it here; any answer a seller puts there). Go's client and nginx read
    `chunked` alone; so does the proxy now."""
    head = b"HTTP/1.1 200 OK\r\n" + framing + (b"\r\nContent-Length: %d" % length if length else b"") + b"\r\n\r\n"
    first_answer, rest = (head + _CHUNKED_BODY[:length], _CHUNKED_BODY[length:]) if length else (
        head + _CHUNKED_BODY, b"")
    connections: list[int] = []
    with _framed_upstream(first_answer, rest, connections) as url:
        active = active_agreement(escrow_chain, django_capture_on_commit_callbacks, url)
        framed = _call(active, "get", f"{active.proxy}/framed")
        assert framed.status_code == 502, (framed.status_code, _body(framed), _books(active))
        assert error_code(framed) == "upstream_unavailable"
        assert _books(active) == (0, 0) and not UsageEvent.objects.exists()
        mine = _call(active, "get", f"{active.proxy}/mine")
    assert (mine.status_code, _body(mine)) == (200, b"/api/mine")
    assert connections == [1, 2]  # the connection of the refused answer was not used again
    assert _books(active) == (PRICE, 0)


@pytest.mark.parametrize("coding", [b"chunked", b"Chunked", b"CHUNKED", b"  chunked", b"chunked \t", b"chunked,"],
                         ids=["lower", "capitalised", "upper", "spaces-before", "spaces-after", "empty-list-element"])
def test_chunked_coding_in_any_case_or_spacing_frames_the_answer_on_a_kept_alive_connection(
        escrow_chain, settings, django_capture_on_commit_callbacks, coding):
    """A coding name is case-insensitive and a field's value may end in spaces (RFC 9110 5.5): http.client compared
    the value with `chunked` as it came, spaces after it included, and read such an answer to its connection's close
    with its chunk sizes in it (the call waiting out PROXY_TIMEOUT on a connection kept alive)."""
    settings.PROXY_TIMEOUT = 1
    connections: list[int] = []

    def chunked(path: bytes) -> bytes:
        return (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: " + coding + b"\r\n\r\n"
                + b"%x\r\n%s\r\n0\r\n\r\n" % (len(path), path))

    with _answering_each(chunked, connections) as url:
        active = active_agreement(escrow_chain, django_capture_on_commit_callbacks, url)
        first, second = (_call(active, "get", f"{active.proxy}/{name}") for name in ("first", "second"))
    assert (first.status_code, _body(first), second.status_code, _body(second)) == (
        200, b"/api/first", 200, b"/api/second")
    assert connections == [1, 1]
    assert _books(active) == (2 * PRICE, 0)


@pytest.mark.parametrize("head", [
    b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nContent-Length: 50\r\n\r\n",
    b"HTTP/1.0 200 OK\r\nTransfer-Encoding: chunked\r\nConnection: keep-alive\r\n\r\n",
], ids=["chunked-beside-a-length", "chunked-in-http-1.0"])
def test_an_answer_whose_framing_rfc_9112_says_to_close_after_is_passed_on_and_its_connection_not_used_again(
        escrow_chain, django_capture_on_commit_callbacks, head):
    """Chunked coding beside a Content-Length (a sign of request smuggling or response splitting) and a
    Transfer-Encoding in an HTTP/1.0 answer: RFC 9112 6.1 and 6.3 read the body by its chunks, then close the
    connection. The proxy kept it alive for the buyer's next call."""
    connections: list[int] = []

    with _answering_each(lambda path: head + b"2\r\nab\r\n0\r\n\r\n", connections) as url:
        active = active_agreement(escrow_chain, django_capture_on_commit_callbacks, url)
        first, second = (_call(active, "get", f"{active.proxy}/{name}") for name in ("first", "second"))
    assert (first.status_code, _body(first), first.get("Content-Length")) == (200, b"ab", None)
    assert (second.status_code, _body(second)) == (200, b"ab")
    assert connections == [1, 2]
    assert _books(active) == (2 * PRICE, 0)


def test_a_204_with_chunked_coding_ends_with_its_head(escrow_chain, settings, django_capture_on_commit_callbacks):
    """A 204 has no body, whatever its head says (RFC 9112 6.3): http.client read chunks after a 204 that named
    chunked coding, and the call waited for them until PROXY_TIMEOUT: 502 upstream_answer_cut_short, charged."""
    settings.PROXY_TIMEOUT = 1
    connections: list[int] = []

    def empty_or_path(path: bytes) -> bytes:
        return (b"HTTP/1.1 204 No Content\r\nTransfer-Encoding: chunked\r\n\r\n" if path.endswith(b"/empty")
                else b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(path), path))

    with _answering_each(empty_or_path, connections) as url:
        active = active_agreement(escrow_chain, django_capture_on_commit_callbacks, url)
        started = time.monotonic()
        empty = _call(active, "get", f"{active.proxy}/empty")
        took = time.monotonic() - started
        mine = _call(active, "get", f"{active.proxy}/mine")
    assert (empty.status_code, _body(empty)) == (204, b"") and took < 1
    assert (mine.status_code, _body(mine)) == (200, b"/api/mine")
    assert connections == [1, 2]  # a 204 naming a transfer coding (RFC 9112 6.1: a server must not) is not trusted
    assert _books(active) == (2 * PRICE, 0)


@pytest.mark.parametrize("forged_size", [6, 100_000], ids=["within-the-read-buffer", "past-the-read-buffer"])
def test_a_body_after_a_204_or_304_is_never_the_next_calls_answer(
        escrow_chain, django_capture_on_commit_callbacks, forged_size):
    """A 204 or 304 ends with its head whatever its Content-Length says (RFC 9112 6.3). What a seller sends after it
    on the kept-alive connection (here a forged answer) is never read as the buyer's next answer: bytes read ahead
    with the head are dropped with that answer's reader, and bytes still on the connection make the pool close it."""
    connections: list[int] = []

    def bodiless_with_a_body(path: bytes) -> bytes:
        status = {b"/api/no-content": b"204 No Content", b"/api/not-modified": b"304 Not Modified"}.get(path)
        if status is None:
            return b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(path), path)
        forged = b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (forged_size, b"f" * forged_size)
        return b"HTTP/1.1 %s\r\nContent-Length: %d\r\n\r\n%s" % (status, len(forged), forged)

    with _answering_each(bodiless_with_a_body, connections) as url:
        active = active_agreement(escrow_chain, django_capture_on_commit_callbacks, url)
        answers = [_call(active, "get", f"{active.proxy}/{name}") for name in ("no-content", "not-modified", "mine")]
    assert [(answer.status_code, _body(answer)) for answer in answers] == [(204, b""), (304, b""), (200, b"/api/mine")]
    if forged_size > io.DEFAULT_BUFFER_SIZE:  # more than the answer's reader reads ahead: some left on the connection
        assert connections == [1, 2, 3]
    assert _books(active) == (3 * PRICE, 0)


def _answering_with(answer: bytes):
    """An upstream answering every call with `answer` (on a connection kept alive)."""

    def serve(connection, number):
        with connection:
            received = b""
            try:
                while (request := _head(connection, received)) is not None:
                    received = request[1]
                    connection.sendall(answer)
            except OSError:
                pass  # closed before the answer was read whole

    return _upstream(serve)


_PADDED_HEAD = b"HTTP/1.1 200 OK\r\n" + b"".join(b"X-Pad-%02d: %s\r\n" % (number, b"a" * 65_000) for number in range(98))


def test_an_answer_head_larger_than_the_proxy_reads_is_502_charges_nothing_and_holds_about_the_bound(
        escrow_chain, django_capture_on_commit_callbacks):
    """http.client bounds an answer's head by its lines only (100 of 64 KiB): a seller answering with 98 headers of
    64 KB had its ~6.4 MB read, parsed and passed on to the buyer, and was charged: 51 MB held at the peak of one call
    (tracemalloc, the test client's copy included), times the web threads; 0.2 MB now."""
    answer = _PADDED_HEAD + b"Content-Length: 2\r\n\r\n{}"
    with _answering_with(answer) as url:
        active = active_agreement(escrow_chain, django_capture_on_commit_callbacks, url)
        tracemalloc.start()
        try:
            response = _call(active, "get", f"{active.proxy}/headers")
            held = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
    assert response.status_code == 502, (response.status_code, len(response.serialize_headers()), held)
    assert (error_code(response), response.json()["error"]["details"]) == (
        "upstream_answer_head_too_large", {"max_bytes": 64 * 1024})
    assert held < 2_000_000, f"{held / 2**20:.1f} MiB held for a {len(answer) / 2**20:.1f} MiB head"
    assert _books(active) == (0, 0) and not UsageEvent.objects.exists()


@pytest.mark.parametrize("informational", [False, True], ids=["final-head", "with-early-hints"])
def test_an_answer_head_is_read_up_to_proxy_max_answer_head_bytes_exactly(
        escrow_chain, settings, django_capture_on_commit_callbacks, informational):
    """The bound counts the whole head, status lines and informational answers' heads included, to the byte."""
    head = (b"HTTP/1.1 103 Early Hints\r\nLink: </a.css>; rel=preload\r\n\r\n" if informational else b"") + (
        b"HTTP/1.1 200 OK\r\nX-Pad: " + b"a" * 3000 + b"\r\nContent-Length: 2\r\n\r\n")
    with _answering_with(head + b"{}") as url:
        active = active_agreement(escrow_chain, django_capture_on_commit_callbacks, url)
        settings.PROXY_MAX_ANSWER_HEAD_BYTES = len(head)
        whole = _call(active, "get", f"{active.proxy}/fits")
        settings.PROXY_MAX_ANSWER_HEAD_BYTES = len(head) - 1
        over = _call(active, "get", f"{active.proxy}/over")
    assert (whole.status_code, _body(whole)) == (200, b"{}")
    assert (over.status_code, error_code(over)) == (502, "upstream_answer_head_too_large")
    assert _books(active) == (PRICE, 0)


@pytest.mark.parametrize("length", [b"%d, %d", b"%d,%d"], ids=["list", "list-unspaced"])
def test_an_answer_whose_content_length_repeats_one_value_in_a_list_is_read_by_it_on_a_kept_alive_connection(
        escrow_chain, settings, django_capture_on_commit_callbacks, length):
    """`Content-Length: 9, 9` (one value repeated, as a proxy merging two fields writes it) passed the framing
    check as one length, but http.client read the field as a single integer, found none, and read the body to the
    connection's close: on a connection kept alive the buyer had a 200 whose body never ended (the stream broke at
    PROXY_TIMEOUT), for each of the seller's honest answers. RFC 9110 8.6 lets the recipient take the
    repeated value as the length: the proxy reads the body by it."""
    settings.PROXY_TIMEOUT = 1
    connections: list[int] = []

    def repeated_length(path: bytes) -> bytes:
        field = length % ((len(path),) * length.count(b"%d"))
        return b"HTTP/1.1 200 OK\r\nContent-Length: " + field + b"\r\n\r\n" + path

    with _answering_each(repeated_length, connections) as url:
        active = active_agreement(escrow_chain, django_capture_on_commit_callbacks, url)
        first, second = (_call(active, "get", f"{active.proxy}/{name}") for name in ("first", "second"))
    assert (first.status_code, _body(first), second.status_code, _body(second)) == (
        200, b"/api/first", 200, b"/api/second"), (_body(first), _body(second))
    assert connections == [1, 1]
    assert _books(active) == (2 * PRICE, 0)


@pytest.mark.parametrize("nonce", [False, True], ids=["streamed", "stored"])
@pytest.mark.parametrize("fields", [b"Content-Length: %d, %d\r\n", b"Content-Length: %d\r\ncontent-length: %d\r\n"],
                         ids=["list", "two-fields"])
def test_a_content_length_repeating_one_value_reaches_the_buyer_as_that_one_value(
        escrow_chain, django_capture_on_commit_callbacks, nonce, fields):
    """The proxy reads `Content-Length: 9, 9` as the length 9 (RFC 9110 8.6), and passed the field on as the seller
    wrote it; granian writes an answer's headers as the application gives them. To Python's http.client, Go's
    client and nginx `9, 9` is no length: the buyer, charged, had a 200 whose body never ended on a kept-alive
    connection (as the proxy had before it read such a field), or a 502 from a proxy in front. The buyer is told
    the one value, once, for the answer and for its replays."""
    connections: list[int] = []

    def repeated_length(path: bytes) -> bytes:
        return b"HTTP/1.1 200 OK\r\n" + fields % (len(path), len(path)) + b"\r\n" + path

    extra = {"HTTP_X_REQUEST_NONCE": "n-1"} if nonce else {}
    with _answering_each(repeated_length, connections) as url:
        active = active_agreement(escrow_chain, django_capture_on_commit_callbacks, url)
        answers = [_call(active, "get", f"{active.proxy}/first", **extra) for _ in range(2 if nonce else 1)]
    for answer in answers:
        assert (answer.status_code, _body(answer)) == (200, b"/api/first")
        assert [value for name, value in answer.items() if name.lower() == "content-length"] == ["10"]
    assert _books(active) == (PRICE, 0)


@pytest.mark.parametrize("nonce", [False, True], ids=["streamed", "stored"])
def test_an_upstream_flooding_its_answers_trailer_section_is_cut_at_the_head_bound_not_read_until_the_timeout(
        escrow_chain, settings, django_capture_on_commit_callbacks, nonce):
    """After a chunked body's last chunk, http.client read trailer lines without bound (dropping each): an upstream
    sending them endlessly kept the web thread parsing lines, holding the GIL, until PROXY_ANSWER_TIMEOUT (300 s), as
    informational answers did before they were bounded. The trailer section is read up to PROXY_MAX_ANSWER_HEAD_BYTES,
    as a head: the body, whole by then, is the answer, and the connection is not used again."""
    settings.PROXY_ANSWER_TIMEOUT = 3
    sent = []

    def serve(connection, number):
        with connection:
            _head(connection, b"")
            try:
                connection.sendall(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\n{}\r\n0\r\n")
                while True:
                    connection.sendall(b"X: y\r\n" * 1000)
                    sent.append(1000)
            except OSError:
                pass

    with _upstream(serve) as url:
        active = active_agreement(escrow_chain, django_capture_on_commit_callbacks, url)
        started = time.monotonic()
        response = _call(active, "get", f"{active.proxy}/trailers",
                         **({"HTTP_X_REQUEST_NONCE": "n-1"} if nonce else {}))
        body = _body(response)
        took = time.monotonic() - started
    assert (response.status_code, body) == (200, b"{}")
    assert took < 1, f"{took:.1f} s, {sum(sent)} trailer lines sent"
    assert _books(active) == (PRICE, 0) and UsageEvent.objects.count() == 1


def _locations_given(chain, capture, redirects: dict[bytes, bytes]):
    """(the agreement, the Location its buyer is given for each path) when the upstream answers a POST to each path of
    `redirects` 307 to its Location."""

    def redirect(path: bytes) -> bytes:
        return b"HTTP/1.1 307 Temporary Redirect\r\nLocation: %s\r\nContent-Length: 0\r\n\r\n" % redirects[path]

    with _answering_each(redirect, []) as url:
        active = active_agreement(chain, capture, url)
        locations = {}
        for path in redirects:
            response = _call(active, "post", f"{active.proxy}/{path.decode().removeprefix('/api/')}", data=b"{}",
                             content_type="application/json")
            assert response.status_code == 307, (response.status_code, _body(response))
            locations[path] = response.get("Location")
    return active, locations


_REDIRECTS = {  # the call's path: where its upstream redirects it (the upstream's base path is /api)
    b"/api/absolute-path": b"/usage-agreements",
    b"/api/a/climbing": b"../../../../usage-agreements",
    b"/api/marketplace-host": b"http://TestServer/usage-agreements",
    b"/api/within": b"/api/next?page=2#top",
    b"/api/elsewhere": b"https://other.example/next",
}


def test_a_sellers_redirect_never_sends_the_buyers_client_to_the_marketplaces_own_endpoints(
        escrow_chain, django_capture_on_commit_callbacks):
    """A seller's `Location` was passed on as written, and the buyer's client resolves it against the marketplace's
    URL it called: `307 Location: /usage-agreements` (or `../../..`, or the marketplace's own host) sent the buyer's
    client, which keeps its Authorization on the same host (requests follows redirects by default), to another
    endpoint of the marketplace with the buyer's key and body, at the seller's order. A Location is resolved against
    the URL the proxy called: under the service's base path it is the agreement's proxy path; on the marketplace's
    host (or the seller's host outside its base path) it is dropped; another host's is passed on (the buyer's
    client sends it no Authorization)."""
    active, locations = _locations_given(escrow_chain, django_capture_on_commit_callbacks, _REDIRECTS)
    followed = {path: location and urljoin(f"http://testserver{active.proxy}/{path.decode().removeprefix('/api/')}",
                                           location) for path, location in locations.items()}
    proxied = f"http://testserver{active.proxy}/"
    assert followed == {b"/api/absolute-path": None, b"/api/a/climbing": None, b"/api/marketplace-host": None,
                        b"/api/within": f"{proxied}next?page=2#top", b"/api/elsewhere": "https://other.example/next"}
    assert _books(active) == (0, 0)  # a redirect is not charged


def test_an_answer_header_repeated_reaches_the_buyer_with_every_value(escrow_chain, django_capture_on_commit_callbacks):
    """A field sent on several lines is one list (RFC 9110 5.3): the proxy kept the answer's headers in a dict by
    name, so only the last line of each reached the buyer (one of a 401's `WWW-Authenticate` challenges, one of a
    `Vary`'s, a `Link`), fresh and in a stored reply alike. Every line reaches it, as one field joined with commas."""
    answer = (b"HTTP/1.1 401 Unauthorized\r\nWWW-Authenticate: Basic realm=\"a\"\r\nVary: Accept\r\n"
              b"www-authenticate: Bearer\r\nvary: Origin\r\nContent-Length: 2\r\n\r\n{}")
    with _answering_with(answer) as url:
        active = active_agreement(escrow_chain, django_capture_on_commit_callbacks, url)
        fresh = _call(active, "get", f"{active.proxy}/private")
        stored = _call(active, "get", f"{active.proxy}/private", HTTP_X_REQUEST_NONCE="n-1")
        replayed = _call(active, "get", f"{active.proxy}/private", HTTP_X_REQUEST_NONCE="n-1")
    for response in (fresh, stored, replayed):
        assert (response.status_code, _body(response)) == (401, b"{}")
        assert (response.get("WWW-Authenticate"), response.get("Vary")) == ('Basic realm="a", Bearer', "Accept, Origin")
    assert replayed["X-Replayed"] == "true"
    assert _books(active) == (2 * PRICE, 0)


def test_headers_named_in_any_of_an_answers_connection_lines_never_reach_the_buyer(
        escrow_chain, django_capture_on_commit_callbacks):
    """`Connection` may come on several lines, each naming hop-by-hop headers (RFC 9110 5.3, 7.6.1): the proxy read
    the answer's headers into a dict by name, so only the last line's names were dropped, and the others' headers
    (the seller's hop to its own front server) reached the buyer."""
    answer = (b"HTTP/1.1 200 OK\r\nConnection: X-Hop-One\r\nX-Hop-One: 1\r\nconnection: x-hop-two, keep-alive\r\n"
              b"X-Hop-Two: 2\r\nX-End-To-End: 3\r\nContent-Length: 2\r\n\r\n{}")
    with _answering_with(answer) as url:
        active = active_agreement(escrow_chain, django_capture_on_commit_callbacks, url)
        response = _call(active, "get", f"{active.proxy}/hops")
    assert (response.status_code, _body(response)) == (200, b"{}")
    assert (response.get("X-Hop-One"), response.get("X-Hop-Two"), response.get("X-End-To-End")) == (None, None, "3")


_REDIRECTS_READ_OTHERWISE = {  # Locations that a WHATWG URL parser (browsers, Node's fetch) reads otherwise than Python
    b"/api/encoded-dots": b"/api/%2e%2E/.%2e/usage-agreements",  # `%2e` is a dot there: `..`, `..`
    b"/api/backslashes": b"a\\..\\..\\..\\usage-agreements",  # `\` is a `/` there
    b"/api/backslash-in-host": b"http://testserver\\usage-agreements?@other.example/",  # host `testserver`
    b"/api/backslash-before-at": b"http://testserver\\@other.example/x",  # host `testserver`
    b"/api/tab-in-slashes": b"/\t/testserver/usage-agreements",  # tabs removed: `//testserver/...`
}


def test_a_sellers_redirect_read_otherwise_by_other_url_parsers_is_dropped(
        escrow_chain, django_capture_on_commit_callbacks):
    """A Location is judged by how Python reads it, and a buyer's client may read it otherwise: in a WHATWG URL
    parser `%2e` is a dot and `\\` a slash, so a path under the base with encoded dots or backslashes became, under
    the agreement's proxy path, one that climbs out of it (`/metered-proxy/{id}/%2e%2E/.%2e/usage-agreements` is
    `/usage-agreements`), and `http://testserver\\usage-agreements?@other.example/`, another host to Python, is the
    marketplace's own there. Such a Location is dropped."""
    _, locations = _locations_given(escrow_chain, django_capture_on_commit_callbacks, _REDIRECTS_READ_OTHERWISE)
    assert locations == dict.fromkeys(_REDIRECTS_READ_OTHERWISE)


_CREATED_ANSWERS = {  # the call's path: the upstream's answer head to it (its base path is /api)
    b"/api/created": b"201 Created\r\nLocation: /usage-agreements\r\nContent-Location: /usage-agreements",
    b"/api/accepted": b"202 Accepted\r\nLocation: http://TestServer/usage-agreements\r\nContent-Location: /api/jobs/7",
    b"/api/job": b"202 Accepted\r\nlocation: /api/jobs/7?wait=1\r\nCONTENT-LOCATION: https://other.example/jobs/7",
    b"/api/plain": b"200 OK\r\nContent-Location: ../../../../usage-agreements",
}


def test_a_created_or_accepted_answers_location_never_sends_the_buyers_client_to_the_marketplaces_own_endpoints(
        escrow_chain, django_capture_on_commit_callbacks):
    """Only a 3xx's `Location` was confined: a 201's or a 202's (where a client polls the job it names, with its
    key), and a `Content-Location` on any answer, were passed on as written, so `201 Location: /usage-agreements`
    (or the marketplace's own host) sent the buyer's client, with its key, to the marketplace's own endpoints. Both
    are confined as a redirect's `Location` is, whatever the status."""

    def answer(path: bytes) -> bytes:
        return b"HTTP/1.1 %s\r\nContent-Length: 2\r\n\r\n{}" % _CREATED_ANSWERS[path]

    with _answering_each(answer, []) as url:
        active = active_agreement(escrow_chain, django_capture_on_commit_callbacks, url)
        given = {}
        for path in _CREATED_ANSWERS:
            response = _call(active, "post", f"{active.proxy}/{path.decode().removeprefix('/api/')}", data=b"{}",
                             content_type="application/json")
            assert _body(response) == b"{}"
            given[path] = (response.status_code, response.get("Location"), response.get("Content-Location"))
    assert given == {b"/api/created": (201, None, None),
                     b"/api/accepted": (202, None, f"{active.proxy}/jobs/7"),
                     b"/api/job": (202, f"{active.proxy}/jobs/7?wait=1", "https://other.example/jobs/7"),
                     b"/api/plain": (200, None, None)}
    assert _books(active) == (4 * PRICE, 0)


def test_a_sellers_redirect_is_not_charged_so_a_redirect_loop_costs_the_buyer_nothing(
        escrow_chain, django_capture_on_commit_callbacks):
    """A 3xx under the service's base path is a call the buyer's client makes again through the proxy, and each 3xx
    was charged as answered below 500: a seller redirecting a path to itself (or two paths to each other) was paid
    as many calls as the buyer's client follows (30 for Python's requests, 20 for a browser's fetch) for one call
    served, or for none. A redirect serves nothing: it is not charged, as a 5xx. A 304 Not Modified answers the
    buyer's conditional request (its copy is current): charged, as a 200."""

    def answer(path: bytes) -> bytes:
        if path == b"/api/cached":
            return b"HTTP/1.1 304 Not Modified\r\nETag: \"v1\"\r\n\r\n"
        return b"HTTP/1.1 307 Temporary Redirect\r\nLocation: /api/loop\r\nContent-Length: 0\r\n\r\n"

    with _answering_each(answer, []) as url:
        active = active_agreement(escrow_chain, django_capture_on_commit_callbacks, url)
        followed = []
        path = f"{active.proxy}/loop"
        for _ in range(4):  # a client following the redirects
            response = _call(active, "get", path, HTTP_X_REQUEST_NONCE=f"n-{len(followed)}")
            followed.append((response.status_code, response["X-Usage-Cost"], response.get("X-Usage-Event-Id")))
            path = response["Location"]
        cached = _call(active, "get", f"{active.proxy}/cached", HTTP_IF_NONE_MATCH='"v1"')
    assert followed == [(307, "0", None)] * 4
    assert path == f"{active.proxy}/loop"
    assert (cached.status_code, cached["X-Usage-Cost"]) == (304, str(PRICE))
    assert _books(active) == (PRICE, 0) and UsageEvent.objects.count() == 1
    assert not ProxyReplay.objects.exists()  # a nonce's call not charged stores nothing


_LINKS = {  # the call's path: the upstream's Link header on its 200 (its base path is /api)
    b"/api/page": b'</api/items?page=2>; rel="next", <https://other.example/docs>; rel="help"',
    b"/api/hostile": b'</api/items?page=2>; rel="prev", </usage-agreements?page=2>; rel="next"',
    b"/api/own-host": b'<http://TestServer/usage-agreements>; rel="next"',
}


def test_a_link_headers_urls_never_send_the_buyers_paginating_client_to_the_marketplaces_own_endpoints(
        escrow_chain, django_capture_on_commit_callbacks):
    """A `Link: <...>; rel="next"` is what paginating clients follow with their key (RFC 8288; GitHub-style APIs,
    requests' `response.links`), resolved against the marketplace's URL they called: passed on as written, a seller's
    `</usage-agreements?page=2>; rel="next"` sent the buyer's client to the marketplace's own endpoints. Its URLs are
    confined as a `Location` is, and a Link with any URL that would be dropped is dropped whole."""

    def answer(path: bytes) -> bytes:
        return b"HTTP/1.1 200 OK\r\nLink: %s\r\nContent-Length: 2\r\n\r\n{}" % _LINKS[path]

    with _answering_each(answer, []) as url:
        active = active_agreement(escrow_chain, django_capture_on_commit_callbacks, url)
        given = {path: _call(active, "get", f"{active.proxy}/{path.decode().removeprefix('/api/')}").get("Link")
                 for path in _LINKS}
    assert given == {
        b"/api/page": f'<{active.proxy}/items?page=2>; rel="next", <https://other.example/docs>; rel="help"',
        b"/api/hostile": None, b"/api/own-host": None}
    assert _books(active) == (3 * PRICE, 0)
