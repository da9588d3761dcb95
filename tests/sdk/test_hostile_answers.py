"""The SDK against a server that is compromised or broken: an answer trickled a byte at a time, an endless or huge
body, JSON nested to crash the parser. Every place the SDK makes a request is tried (the marketplace's API, a
metered call, a skill, the RPC, the network configuration): each call ends within the client's bounds with the
SDK's own exception (`sdk.bounded_http`, `sdk.bounded_json`).

The servers are real sockets on loopback, so the bounds are checked against httpx's own transport; every call runs
in a thread joined with a time limit, so a call the SDK fails to bound fails its test instead of hanging the suite.
"""

from __future__ import annotations

import base64
import functools
import gc
import gzip
import json
import logging
import socket
import subprocess
import sys
import threading
import time
import traceback
import tracemalloc
import uuid
import zlib
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler
from pathlib import Path
from typing import Any

import httpcore
import httpx
import pytest
from eth_account import Account

from sdk import (AgreementFailed, AnswerRefused, AnswerTooLarge, DeadlineExceeded, InsecureUrl, InvalidJSON,
                 ListingTooLong, MarketplaceClient, MarketplaceError, UndecodableAnswer, UnrequestedEncoding)
from sdk.client import LISTING_MAX_ITEMS
from sdk.networks import BASE_SEPOLIA, NetworkConfig
from sdk.onchain import ChainReader, RpcError
from tests.support.http_server import serving
from tests.support.unanswered_names import UNANSWERED, unanswered_names

ROOT = Path(__file__).resolve().parents[2]
READ_TIMEOUT = 0.5  # httpx's bound on each read
EPSILON = 0.2
DEADLINE = 1.5  # the SDK's bound on a whole request
NETWORK = NetworkConfig.pinned(BASE_SEPOLIA, escrow_address=Account.create().address,
                               receipt_signer=Account.create().address, gas_wallet=Account.create().address)


def marketplace(url: str, **bounds: Any) -> MarketplaceClient:
    return MarketplaceClient(url, "mk_test", network=NETWORK, timeout=READ_TIMEOUT, retry_backoff=0.05, **bounds)


# Every kind of request the SDK makes, against the server at `url`.
CALLS: dict[str, Callable[..., Any]] = {
    "api": lambda url, **bounds: marketplace(url, **bounds).me(),
    "metered call": lambda url, **bounds: marketplace(url, **bounds).call_metered(uuid.uuid4(), "run"),
    "skill": lambda url, **bounds: marketplace(url, **bounds).invoke_skill(
        "seller", "translate", {"text": "hi"}, private_key=Account.create().key.hex(), max_amount_atomic=1),
    "rpc": lambda url, **bounds: ChainReader(url, timeout=READ_TIMEOUT, **bounds).chain_id(),
    "network config": lambda url, **bounds: NetworkConfig.from_marketplace(url, trust_server=True, **bounds),
}


class Outcome:
    """What a call run in a thread did: its `error` (None when it returned), and how long it took."""

    def __init__(self) -> None:
        self.error: BaseException | None = None
        self.seconds = 0.0


def run_bounded(call: Callable[[], Any], *, limit: float) -> Outcome:
    """Run `call` in a thread and wait at most `limit` seconds for it: a call still running then fails the test."""
    outcome = Outcome()

    def run() -> None:
        started = time.monotonic()
        try:
            call()
        except BaseException as error:  # noqa: BLE001 - handed to the test thread
            outcome.error = error
        outcome.seconds = time.monotonic() - started

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(timeout=limit)
    assert not thread.is_alive(), f"the SDK's call was still running after {limit:g} s"
    return outcome


class Hostile(BaseHTTPRequestHandler):
    """A server answering every request with `answer()`, until `stop` is set (then it hangs up)."""

    protocol_version = "HTTP/1.1"
    stop = threading.Event()
    sent = 0

    def answer(self) -> Iterator[bytes]:
        raise NotImplementedError

    def _handle(self) -> None:
        self.rfile.read(int(self.headers.get("Content-Length") or 0))
        try:
            for data in self.answer():
                if self.stop.is_set():
                    return
                self.wfile.write(data)
                type(self).sent += len(data)
        except OSError:
            pass  # the SDK hung up

    do_GET = do_POST = _handle

    def log_message(self, *args: Any) -> None:
        pass


@contextmanager
def hostile(handler: type[Hostile]) -> Iterator[str]:
    handler.stop = threading.Event()
    handler.sent = 0
    with serving(handler) as url:
        try:
            yield url
        finally:
            handler.stop.set()


def trickled(data: bytes) -> Iterator[bytes]:
    """`data` a byte at a time, each within httpx's read timeout."""
    for byte in data:
        time.sleep(READ_TIMEOUT - EPSILON)
        yield bytes([byte])


class TricklesItsHead(Hostile):
    def answer(self) -> Iterator[bytes]:
        yield from trickled(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nX-Pad: " + b"a" * 1000
                            + b"\r\nContent-Length: 2\r\n\r\n{}")


class TricklesItsBody(Hostile):
    def answer(self) -> Iterator[bytes]:
        body = b'{"pad": "' + b"a" * 1000 + b'"}'
        yield b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n" % len(body)
        yield from trickled(body)


@pytest.mark.parametrize("handler", [TricklesItsHead, TricklesItsBody])
@pytest.mark.parametrize("call", CALLS)
def test_an_answer_trickled_within_the_read_timeout_ends_at_the_deadline(handler, call):
    """Each byte comes before httpx's read timeout, so only a bound on the whole exchange ends the call: the head
    alone would take 5 minutes, and the SDK read it to the end."""
    with hostile(handler) as url:
        outcome = run_bounded(lambda: CALLS[call](url, deadline=DEADLINE), limit=DEADLINE + 5)
    assert isinstance(outcome.error, DeadlineExceeded), outcome.error
    assert isinstance(outcome.error, httpx.TimeoutException)  # what callers caught before
    assert outcome.seconds < DEADLINE + 1


@pytest.mark.parametrize("call", CALLS)
def test_a_server_whose_name_never_resolves_ends_at_the_deadline(call):
    """The deadline bounded connecting, not resolving the server's name first: a name whose DNS server never answers
    held the call for as long as the system resolver kept asking, whatever the deadline."""
    deadline = READ_TIMEOUT - EPSILON  # httpx's connect timeout is READ_TIMEOUT
    with unanswered_names() as lookups:
        outcome = run_bounded(lambda: CALLS[call](f"https://{UNANSWERED}", deadline=deadline), limit=DEADLINE + 5)
        assert lookups.began == 1
    assert isinstance(outcome.error, DeadlineExceeded), outcome.error
    assert outcome.seconds < deadline + EPSILON, f"the call took {outcome.seconds:.1f} s"


def test_the_connect_timeout_bounds_resolving_the_servers_name_too():
    with unanswered_names():
        outcome = run_bounded(lambda: marketplace(f"https://{UNANSWERED}", deadline=DEADLINE).call_metered(
            uuid.uuid4(), "run"), limit=DEADLINE + 5)
    assert isinstance(outcome.error, httpx.ConnectTimeout), outcome.error
    assert str(outcome.error) == f"resolving {UNANSWERED} took longer than {READ_TIMEOUT:g} s"
    assert outcome.seconds < READ_TIMEOUT + EPSILON, f"the call took {outcome.seconds:.1f} s"


def test_a_deadline_bounds_a_request_and_its_retries_together():
    """A 503 is retried; retries after the deadline would outlast it."""
    attempts = []

    def unavailable(request: httpx.Request) -> httpx.Response:
        attempts.append(time.monotonic())
        time.sleep(0.4)
        return httpx.Response(503, json={"error": {"code": "chain_unavailable", "message": "down"}})

    client = MarketplaceClient("https://marketplace.example", "mk_test", retries=10, retry_backoff=0.1, deadline=1.0,
                               transport=httpx.MockTransport(unavailable))
    started = time.monotonic()
    with pytest.raises((MarketplaceError, DeadlineExceeded)):
        client.me()
    assert time.monotonic() - started < 1.5
    assert 1 < len(attempts) < 4


class EndlessBody(Hostile):
    """Spaces without end (JSON allows them before a value), as fast as the socket takes them."""

    def answer(self) -> Iterator[bytes]:
        yield b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n"
        chunk = b" " * 65536
        framed = b"%x\r\n" % len(chunk) + chunk + b"\r\n"
        while True:
            yield framed


class HundredMegabytes(Hostile):
    """100 MB of spaces then `{}`: valid JSON, read whole before."""

    def answer(self) -> Iterator[bytes]:
        size = 100 * 1024 * 1024
        yield b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n" % (size + 2)
        chunk = b" " * 65536
        for _ in range(size // len(chunk)):
            yield chunk
        yield b"{}"


@functools.cache
def gzipped_spaces(megabytes: int) -> bytes:
    compressor = zlib.compressobj(9, zlib.DEFLATED, 31)  # gzip
    megabyte = b" " * 2**20
    return b"".join(compressor.compress(megabyte) for _ in range(megabytes)) + compressor.flush()


class CompressedHundredMegabytes(Hostile):
    """100 kB on the wire, gzipped: 100 MB of spaces once decoded (each 64 kB read would inflate to 64 MB)."""

    def answer(self) -> Iterator[bytes]:
        body = gzipped_spaces(100)
        yield (b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Encoding: gzip\r\n"
               b"Content-Length: %d\r\n\r\n%s" % (len(body), body))


@pytest.mark.parametrize("handler", [HundredMegabytes, EndlessBody, CompressedHundredMegabytes])
@pytest.mark.parametrize("call", CALLS)
def test_an_answer_larger_than_the_bound_is_abandoned_using_little_memory(handler, call):
    max_answer_bytes = 1024 * 1024
    # Compressed here, once: in the server's thread under tracemalloc, 100 MB took longer than the SDK's read
    # timeout on a loaded machine (ReadTimeout, not the refusal under test).
    gzipped_spaces(100)
    tracemalloc.start()
    try:
        with hostile(handler) as url:
            outcome = run_bounded(lambda: CALLS[call](url, max_answer_bytes=max_answer_bytes), limit=30)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert isinstance(outcome.error, AnswerTooLarge), outcome.error
    assert peak < 8 * max_answer_bytes, f"{peak / 2**20:.0f} MiB held for a {max_answer_bytes / 2**20:.0f} MiB bound"
    assert handler.sent < 16 * max_answer_bytes  # the SDK stopped reading (what the socket buffers held aside)


@functools.cache
def json_in_two_byte_chunks(size: int) -> bytes:
    """An answer of `size` bytes of JSON, chunked 2 bytes a chunk (built once, outside the traced window)."""
    document = b'{"result": "' + b"0" * (size - 16) + b'"}'
    return (b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n"
            + b"".join(b"2\r\n" + document[at:at + 2] + b"\r\n" for at in range(0, len(document), 2)) + b"0\r\n\r\n")


class HalfAMegabyteInTwoByteChunks(Hostile):
    def answer(self) -> Iterator[bytes]:
        yield json_in_two_byte_chunks(512 * 1024)


@pytest.mark.parametrize("call", ["api", "metered call"])
def test_an_answer_in_tiny_chunks_holds_about_its_size_not_an_object_per_chunk(call):
    """Within the bound, but each 2-byte chunk a piece httpx yields: kept as a list of pieces, ~40 bytes of objects
    held per 2 bytes counted (a 1 MiB bound held ~20 MiB)."""
    max_answer_bytes = 1024 * 1024
    json_in_two_byte_chunks(512 * 1024)
    tracemalloc.start()
    try:
        with hostile(HalfAMegabyteInTwoByteChunks) as url:
            run_bounded(lambda: CALLS[call](url, max_answer_bytes=max_answer_bytes), limit=60)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 8 * max_answer_bytes, f"{peak / 2**20:.1f} MiB held for a half-megabyte answer"


def deep(levels: int) -> bytes:
    return b"[" * levels + b"]" * levels


class DeepJSON(Hostile):
    def answer(self) -> Iterator[bytes]:
        body = deep(100_000)
        yield b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body)


class NotANumber(Hostile):
    def answer(self) -> Iterator[bytes]:
        body = b'{"jsonrpc": "2.0", "id": 1, "result": NaN, "chain_id": NaN}'
        yield b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body)


@pytest.mark.parametrize("handler", [DeepJSON, NotANumber])
@pytest.mark.parametrize("call", [name for name in CALLS if name != "metered call"])  # answered as it came
def test_hostile_json_is_refused_as_invalid_json(handler, call):
    with hostile(handler) as url:
        outcome = run_bounded(lambda: CALLS[call](url), limit=30)
    assert isinstance(outcome.error, InvalidJSON), outcome.error


def test_a_refusal_nested_too_deep_is_a_marketplace_error_with_its_text():
    client = MarketplaceClient("https://marketplace.example", "mk_test", retries=0, transport=httpx.MockTransport(
        lambda request: httpx.Response(400, content=deep(100_000))))
    with pytest.raises(MarketplaceError) as refusal:
        client.me()
    assert refusal.value.code == "http_400"


def test_a_402_whose_payment_header_nests_too_deep_is_refused_before_signing():
    """The PAYMENT-REQUIRED header is base64 JSON the x402 package parses: 75 kB of `[` fit in a head."""
    header = base64.b64encode(deep(30_000)).decode()
    client = MarketplaceClient("https://marketplace.example", "mk_test", network=NETWORK, transport=httpx.MockTransport(
        lambda request: httpx.Response(402, headers={"PAYMENT-REQUIRED": header}, json={"error": "payment_required"})))
    with pytest.raises(InvalidJSON):
        client.invoke_skill("seller", "translate", {}, private_key=Account.create().key.hex(), max_amount_atomic=1)


def test_an_agent_process_survives_json_nested_100000_deep():
    """In an agent's own process (the SDK, no Django), eth_account's py_ecc raised the recursion limit to 100,000 on
    import, and the SDK's parse of a deeply nested answer overflowed the C stack: SIGSEGV, the agent gone. Importing
    the SDK now leaves the limit as it was, and the SDK refuses the answer."""
    script = """
import sys
limit = sys.getrecursionlimit()
import httpcore
import httpx
from sdk import InvalidJSON, MarketplaceClient
body = b"[" * 100_000 + b"]" * 100_000
client = MarketplaceClient("https://marketplace.example", "mk_test",
                           transport=httpx.MockTransport(lambda request: httpx.Response(200, content=body)))
try:
    client.me()
except InvalidJSON as error:
    print(error.reason, sys.getrecursionlimit() == limit)
"""
    result = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=120,
                            env={"PATH": "/usr/bin:/bin", "HOME": str(ROOT)})
    assert result.returncode == 0, f"exit {result.returncode}: {result.stderr[-2000:]}"
    assert result.stdout.split() == ["too_deep", "True"]


@pytest.mark.parametrize("encoding", ["identity", "gzip", "deflate", "identity, GZIP"])
def test_an_answer_within_the_bounds_reads_as_before_compressed_or_not(encoding):
    body = b'{"handle": "buyer", "pad": "' + b"a" * 100_000 + b'"}'
    headers = {"Content-Encoding": encoding, "X-Usage-Cost": "20000"}
    content = {"gzip": gzip.compress, "deflate": zlib.compress}.get(encoding.split(", ")[-1].lower(), bytes)(body)
    client = MarketplaceClient("https://marketplace.example", "mk_test", transport=httpx.MockTransport(
        lambda request: httpx.Response(200, headers=headers, content=content)))
    assert client.me()["handle"] == "buyer"
    answer = client.call_metered(uuid.uuid4(), "run")
    assert answer.content == body and answer.json()["handle"] == "buyer"
    assert answer.headers["Content-Encoding"] == encoding and answer.headers["X-Usage-Cost"] == "20000"


class UndecodableGzip(Hostile):
    """Answers every request with a body its Content-Encoding (gzip) does not decode, counting the requests."""

    requests = 0

    def answer(self) -> Iterator[bytes]:
        type(self).requests += 1
        body = b"\x1f\x8b not gzip at all"
        yield (b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\nContent-Encoding: gzip\r\n"
               b"Content-Length: %d\r\n\r\n%s" % (len(body), body))


@pytest.mark.parametrize("call", CALLS)
def test_an_answer_that_does_not_decode_in_its_content_coding_is_refused_not_retried(call):
    """httpx's DecodingError (a gzip body that is not gzip) came out of the SDK as is, not as its refusal
    (`AnswerRefused`): a caller handling the SDK's refusals saw an httpx error no method documents. Answered 503,
    which the client retries, the same bytes are not asked for again either."""
    UndecodableGzip.requests = 0
    with hostile(UndecodableGzip) as url:
        outcome = run_bounded(lambda: CALLS[call](url), limit=30)
    assert isinstance(outcome.error, UndecodableAnswer) and isinstance(outcome.error, AnswerRefused), outcome.error
    assert isinstance(outcome.error, httpx.DecodingError)  # what callers caught before, still caught
    assert UndecodableGzip.requests == 1


class AnswersWhenStopped(Hostile):
    """Keeps every call waiting for its answer until the test ends: each holds its connection meanwhile."""

    def answer(self) -> Iterator[bytes]:
        self.stop.wait(30)
        yield b""


def test_a_call_waiting_for_a_free_connection_of_the_pool_ends_at_its_deadline():
    """httpcore waits for a free connection of the pool for as long as httpx's pool timeout (the client's `timeout`),
    outside every network operation the deadline bounded: a client sharing its pool with calls to a slow server
    waited that long whatever its deadline."""
    pool = httpx.HTTPTransport(limits=httpx.Limits(max_connections=1))
    with hostile(AnswersWhenStopped) as url:
        patient = MarketplaceClient(url, "mk_test", timeout=10, deadline=10, retries=0, transport=pool)
        occupying = threading.Thread(target=lambda: run_bounded(patient.me, limit=12), daemon=True)
        occupying.start()
        time.sleep(0.3)  # the patient call holds the pool's one connection
        hurried = MarketplaceClient(url, "mk_test", timeout=5, deadline=0.5, retries=0, transport=pool)
        outcome = run_bounded(hurried.me, limit=10)
    assert isinstance(outcome.error, DeadlineExceeded), outcome.error
    assert outcome.seconds < 0.5 + EPSILON, f"the call took {outcome.seconds:.1f} s"


class BombDecoder(httpx._decoders.ContentDecoder):
    """Stands in for brotli's or zstandard's decoder (neither is installed here): 1 KiB on the wire, 32 MiB decoded
    at once, an expansion the SDK's bound would only see afterwards."""

    def decode(self, data: bytes) -> bytes:
        return b" " * (len(data) * 32 * 1024)

    def flush(self) -> bytes:
        return b""


@pytest.fixture
def brotli_and_zstandard_installed(monkeypatch):
    """httpx as it is where the optional brotli and zstandard packages are installed: it asks for them and decodes
    them."""
    monkeypatch.setattr(httpx._client, "ACCEPT_ENCODING", "gzip, deflate, br, zstd")
    for encoding in ("br", "zstd"):
        monkeypatch.setitem(httpx._decoders.SUPPORTED_DECODERS, encoding, BombDecoder)


class RecordsAcceptEncoding(Hostile):
    asked: list[str] = []

    def answer(self) -> Iterator[bytes]:
        type(self).asked.append(self.headers.get("Accept-Encoding", ""))
        yield b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 2\r\n\r\n{}"


@pytest.mark.usefixtures("brotli_and_zstandard_installed")
@pytest.mark.parametrize("call", CALLS)
def test_the_sdk_asks_only_for_the_encodings_whose_expansion_it_bounds(call):
    RecordsAcceptEncoding.asked = []
    with hostile(RecordsAcceptEncoding) as url:
        run_bounded(lambda: CALLS[call](url), limit=30)
    assert RecordsAcceptEncoding.asked and set(RecordsAcceptEncoding.asked) == {"gzip, deflate"}


def encoded_as(encoding: str, body: bytes) -> type[Hostile]:
    class EncodedAnswer(Hostile):
        def answer(self) -> Iterator[bytes]:
            yield (b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Encoding: %s\r\n"
                   b"Content-Length: %d\r\n\r\n%s" % (encoding.encode(), len(body), body))

    return EncodedAnswer


@functools.cache
def gzipped_twice(megabytes: int) -> bytes:
    return gzip.compress(gzipped_spaces(megabytes), compresslevel=9)


@pytest.mark.parametrize("installed", [False, True], ids=["decoders absent", "brotli and zstandard installed"])
@pytest.mark.parametrize("encoding", ["br", "zstd", "compress", "gzip, gzip", "gzip, br"])
@pytest.mark.parametrize("call", CALLS)
def test_an_answer_in_an_encoding_the_sdk_did_not_ask_for_is_refused_undecoded(call, encoding, installed, request):
    """An encoding httpx does not know was passed on as it came (garbage to the JSON parser, and to a metered call's
    caller); one it decodes with an optional package inflated whole pieces before the bound saw them; and codings
    stacked multiplied: `gzip, gzip` sent 269 bytes, which the first layer inflated to 64 kB and the second, at once,
    to 64 MB."""
    if installed:
        request.getfixturevalue("brotli_and_zstandard_installed")
    body = gzipped_twice(64) if encoding == "gzip, gzip" else b"\x1b" * 4096
    max_answer_bytes = 1024 * 1024
    tracemalloc.start()
    try:
        with hostile(encoded_as(encoding, body)) as url:
            outcome = run_bounded(lambda: CALLS[call](url, max_answer_bytes=max_answer_bytes), limit=30)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 8 * max_answer_bytes, f"{peak / 2**20:.0f} MiB held for a {max_answer_bytes / 2**20:.0f} MiB bound"
    assert isinstance(outcome.error, UnrequestedEncoding), outcome.error
    assert isinstance(outcome.error, AnswerRefused)
    assert f"encoded {encoding}" in str(outcome.error)


WAIT = 1.0
WAITS: dict[str, Callable[[MarketplaceClient], Any]] = {
    "agreement": lambda client: client.wait_until(uuid.uuid4(), timeout=WAIT),
    "purchase": lambda client: client.wait_for_purchase("purchase", timeout=WAIT),
    "invocation": lambda client: client.wait_for_invocation("invocation", timeout=WAIT),
}


@pytest.mark.parametrize("wait", WAITS)
def test_a_wait_ends_at_its_timeout_however_slowly_the_server_answers(wait):
    """A wait polls with requests each bounded by the client's deadline: the one under way when the wait's timeout
    passed ran on to that deadline (300 s by default), and the wait with it."""
    with hostile(TricklesItsBody) as url:
        outcome = run_bounded(lambda: WAITS[wait](marketplace(url, deadline=5)), limit=10)
    assert isinstance(outcome.error, TimeoutError), outcome.error
    # The defect ran on to the request's 5 s deadline; a loaded machine adds a few tenths to a wait that ends in time.
    assert outcome.seconds < WAIT + 1.0, f"the wait took {outcome.seconds:.1f} s"


class EndlessEmptyPages(Hostile):
    """Pages without results, each naming a next one (the marketplace's pages name one only when full)."""

    def answer(self) -> Iterator[bytes]:
        body = b'{"results": [], "next_cursor": "%s"}' % uuid.uuid4().hex.encode()
        yield b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body)


LISTINGS: dict[str, Callable[[MarketplaceClient], Any]] = {
    "services": lambda client: next(client.search_services("translate"), None),
    "agreements": lambda client: next(client.list_agreements(), None),
    "usage": lambda client: next(client.usage(uuid.uuid4()), None),
}


@pytest.mark.parametrize("listing", LISTINGS)
def test_an_empty_page_naming_a_next_one_is_refused(listing):
    """The SDK followed such pages for ever: asking for the first item of a listing (or verifying usage) never
    returned, each request within the deadline."""
    with hostile(EndlessEmptyPages) as url:
        outcome = run_bounded(lambda: LISTINGS[listing](marketplace(url)), limit=10)
    assert isinstance(outcome.error, AnswerRefused), outcome.error
    assert "no results" in str(outcome.error)


class RepeatedPages(Hostile):
    """The same full page for ever, naming itself as the next one (or the one before it: a cycle of two)."""

    cycle = ("a",)
    served = 0

    def answer(self) -> Iterator[bytes]:
        cursor = self.cycle[type(self).served % len(self.cycle)]
        type(self).served += 1
        body = b'{"results": [{"id": "1"}], "next_cursor": "%s"}' % cursor.encode()
        yield b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body)


@pytest.mark.parametrize("cycle", [("a",), ("a", "b")], ids=["itself", "a cycle of two"])
@pytest.mark.parametrize("listing", ["services", "agreements", "usage"])
def test_a_page_naming_a_cursor_already_followed_is_refused(listing, cycle):
    """A compromised marketplace naming, as the next page, a page already read had the SDK read it again for ever:
    reading a listing whole (`list(client.usage(id))`, a caller's own check of its charges) never returned, holding
    ever more memory, each request within the deadline."""
    RepeatedPages.cycle, RepeatedPages.served = cycle, 0
    every = {"services": lambda client: list(client.search_services("translate")),
             "agreements": lambda client: list(client.list_agreements()),
             "usage": lambda client: list(client.usage(uuid.uuid4()))}[listing]
    with hostile(RepeatedPages) as url:
        outcome = run_bounded(lambda: every(marketplace(url)), limit=10)
    assert isinstance(outcome.error, AnswerRefused), outcome.error
    assert "already" in str(outcome.error)
    assert RepeatedPages.served == len(cycle) + 1


class FreshCursors(Hostile):
    """Full pages for ever, each naming a next one never named before (`results` items a page, the cursor
    `cursor_bytes` long): no page is empty and no cursor repeats, so neither refusal above applies."""

    results = 1
    cursor_bytes = 32
    served = 0

    def answer(self) -> Iterator[bytes]:
        type(self).served += 1
        cursor = b"%d-" % self.served + b"c" * self.cursor_bytes
        items = b",".join([b'{"id": "1"}'] * self.results)
        body = b'{"results": [%s], "next_cursor": "%s"}' % (items, cursor)
        yield b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body)


BOUNDED_LISTINGS: dict[str, Callable[..., Iterator[dict[str, Any]]]] = {
    "services": lambda client, **bound: client.search_services("translate", **bound),
    "agreements": lambda client, **bound: client.list_agreements(**bound),
    "usage": lambda client, **bound: client.usage(uuid.uuid4(), **bound),
}


@pytest.mark.parametrize("listing", BOUNDED_LISTINGS)
def test_a_listing_naming_fresh_pages_for_ever_ends_at_its_max_items(listing):
    """A compromised marketplace naming a new cursor after every full page had the SDK follow it for ever: reading
    a listing whole never returned (only an empty page or a cursor named twice was refused), holding every cursor
    followed and every item yielded. Past `max_items` the listing raises `ListingTooLong` (an `AnswerRefused`)."""
    FreshCursors.results, FreshCursors.cursor_bytes, FreshCursors.served = 1, 32, 0
    read: list[dict[str, Any]] = []
    with hostile(FreshCursors) as url:
        outcome = run_bounded(lambda: read.extend(BOUNDED_LISTINGS[listing](marketplace(url), max_items=5)), limit=10)
    assert isinstance(outcome.error, ListingTooLong), outcome.error
    assert isinstance(outcome.error, AnswerRefused)
    assert "max_items" in str(outcome.error) and "5" in str(outcome.error)
    assert len(read) == 5
    assert FreshCursors.served == 6


def test_a_listing_is_bounded_by_default():
    FreshCursors.results, FreshCursors.cursor_bytes, FreshCursors.served = 1000, 32, 0
    with hostile(FreshCursors) as url:
        outcome = run_bounded(lambda: sum(1 for _ in marketplace(url).usage(uuid.uuid4())), limit=60)
    assert isinstance(outcome.error, ListingTooLong), outcome.error
    assert FreshCursors.served == LISTING_MAX_ITEMS // 1000 + 1


def test_the_cursors_a_listing_followed_are_not_held_whole():
    """Every cursor followed was kept whole to refuse one named again: a listing under way held a megabyte more each
    page that named a megabyte's cursor (the server chooses their length), whatever its bound."""
    FreshCursors.results, FreshCursors.cursor_bytes, FreshCursors.served = 1, 1024 * 1024, 0
    with hostile(FreshCursors) as url:
        listing = marketplace(url).search_services("translate")
        tracemalloc.start()
        try:
            outcome = run_bounded(lambda: [next(listing) for _ in range(30)], limit=60)
            gc.collect()
            held, _ = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
    assert outcome.error is None, outcome.error
    assert held < 8 * 1024 * 1024, f"{held / 2**20:.0f} MiB held after 30 pages"


class Unavailable(Hostile):
    def answer(self) -> Iterator[bytes]:
        yield b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: 0\r\n\r\n"


def closed_port_url() -> str:
    with socket.socket() as closed:
        closed.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{closed.getsockname()[1]}"


@contextmanager
def refusing() -> Iterator[str]:
    yield closed_port_url()


# A node that fails each way, and the bounds under which the RPC is read.
FAILING_NODES: dict[str, tuple[Callable[[], Any], dict[str, Any]]] = {
    "refuses connections": (refusing, {}),
    "answers 503": (lambda: hostile(Unavailable), {}),
    "outlasts the deadline": (lambda: hostile(TricklesItsBody), {"deadline": 1.0}),
    "answers too much": (lambda: hostile(HundredMegabytes), {"max_answer_bytes": 1024}),
}
KEYED_URLS: dict[str, Callable[[str], str]] = {
    "path": lambda url: f"{url}/v2/SECRET-KEY",
    "query": lambda url: f"{url}/rpc?apikey=SECRET-KEY",
    "path and query": lambda url: f"{url}/v3/SECRET-KEY?token=SECRET-KEY2",
    "password": lambda url: url.replace("//", "//user:SECRET-KEY@", 1) + "/",
}


@pytest.mark.parametrize("keyed", KEYED_URLS)
@pytest.mark.parametrize("failure", FAILING_NODES)
def test_the_rpc_urls_api_key_is_never_in_an_sdk_error(failure, keyed):
    """RPC providers put the buyer's API key in the URL's path, query or password: the SDK's errors (httpx's "Server
    error '503 Service Unavailable' for url ...", the deadline's and the answer bound's "POST <url> ...") named the
    URL whole, and an agent logs or shows its errors."""
    node, bounds = FAILING_NODES[failure]
    with node() as url:
        rpc_url = KEYED_URLS[keyed](url)
        outcome = run_bounded(lambda: ChainReader(rpc_url, timeout=READ_TIMEOUT, **bounds).chain_id(), limit=15)
    assert outcome.error is not None
    shown = "".join(traceback.format_exception(outcome.error))  # its causes included
    assert "SECRET-KEY" not in shown, shown
    assert "127.0.0.1" in str(outcome.error) or failure == "refuses connections"  # still says which node failed


@pytest.mark.parametrize("api_key", ["mk_SECRET-KEY\n", "mk_SECRET-KEY\r\nX-Forwarded-For: 1.2.3.4", "mk_SECRET\x00-KEY",
                                     "mk_SECRET-K\u00c9Y"],
                         ids=["trailing newline", "header injected", "nul", "not ascii"])
def test_an_api_key_no_header_can_carry_is_refused_without_its_text(http_server, api_key):
    """An API key read from a file with its newline (or any control character) was sent as it came: h11 refused the
    header, and httpx's LocalProtocolError ("Illegal header value b'Bearer mk_...'") carried the key whole into the
    agent's logs, after three attempts. It is refused before anything is sent, its text left out."""
    with pytest.raises(ValueError) as refusal:
        MarketplaceClient(http_server.url, api_key).me()
    shown = "".join(traceback.format_exception(refusal.value))
    assert "SECRET" not in shown, shown
    assert http_server.requests == []


FORGED_LINE = "\n2026-12-07 23:00:00 INFO agent: payment confirmed, seller paid"


@pytest.mark.parametrize("body", [
    {"error": {"code": "payment_failed", "message": "refused" + FORGED_LINE + "x" * 100_000}},
    {"error": {"code": "payment_failed" + FORGED_LINE, "message": "refused"}},
    {"error": "payment_failed", "message": "refused\u2028" + FORGED_LINE + "\x1b[2K" + "x" * 100_000},
    "refused" + FORGED_LINE,
], ids=["message", "code", "x402 message", "not json"])
def test_a_refusals_text_is_one_bounded_line(body):
    """A refusal's code and message were the marketplace's JSON as it came, of any length (only a refusal that was
    not JSON kept 500 characters): a compromised marketplace forged lines in the agent's log (a newline, a line
    separator, a terminal escape) and filled it (100 kB of message). Both are read as one line of at most
    `sdk.bounded_http.ERROR_TEXT_CHARS` characters, controls shown as spaces."""
    content = body.encode() if isinstance(body, str) else json.dumps(body).encode()
    client = MarketplaceClient("https://marketplace.example", "mk_test", retries=0, transport=httpx.MockTransport(
        lambda request: httpx.Response(402, content=content,
                                       headers={"Content-Type": "text/plain" if isinstance(body, str)
                                                else "application/json"})))
    with pytest.raises(MarketplaceError) as refusal:
        client.me()
    shown = str(refusal.value)
    assert shown.isprintable() and len(shown) <= 1_100, (len(shown), shown[:200])
    assert refusal.value.message.isprintable() and refusal.value.code.isprintable()
    assert refusal.value.code.startswith(("payment_failed", "http_402"))


def test_a_failed_agreements_reason_is_one_bounded_line():
    """`AgreementFailed` showed the agreement's `status_reason` as the marketplace wrote it."""
    failed = {"id": "a1", "status": "activation_failed", "status_reason": "reverted" + FORGED_LINE * 2_000}
    client = MarketplaceClient("https://marketplace.example", "mk_test", transport=httpx.MockTransport(
        lambda request: httpx.Response(200, json=failed)))
    with pytest.raises(AgreementFailed) as failure:
        client.wait_until("a1", timeout=5)
    assert str(failure.value).isprintable() and len(str(failure.value)) <= 1_100
    assert failure.value.reason.isprintable() and failure.value.agreement == failed


@pytest.mark.parametrize("wait", ["agreement", "invocation"])
def test_a_waits_timeout_names_the_status_as_one_bounded_line(wait):
    """A wait's `TimeoutError` named the status it was still in as the marketplace wrote it ("agreement a1 is still
    <status> after 0.2 s"): a status of newlines and a hundred kilobytes forged lines in the agent's log and filled
    it, as a refusal's text did before SDK 0.4.20."""
    status = "pending" + FORGED_LINE * 2_000
    answer = {"id": "a1", "invocation_id": "a1", "status": status}
    client = MarketplaceClient("https://marketplace.example", "mk_test", transport=httpx.MockTransport(
        lambda request: httpx.Response(200, json=answer)))
    with pytest.raises(TimeoutError) as late:
        if wait == "agreement":
            client.wait_until("a1", timeout=0.2, poll_interval=0.05)
        else:
            client.wait_for_invocation("a1", timeout=0.2, poll_interval=0.05)
    assert "still pending" in str(late.value)
    assert str(late.value).isprintable() and len(str(late.value)) <= 1_100


@pytest.mark.parametrize("charset", ["punycode", "bz2", "zlib"])
def test_a_refusals_text_in_a_charset_that_is_no_text_coding_is_a_marketplace_error_within_the_deadline(charset):
    """A refusal that is not the API's JSON keeps its text, decoded as its `Content-Type` charset said: Python's
    codec of that name, whatever it is. punycode decodes in quadratic time (a few hundred kB held the agent for
    minutes, past every deadline: the body was read in time, the decoding is after), and bz2's or zlib's decoder
    raised an AssertionError a caller catching MarketplaceError did not catch. The text is read as UTF-8."""
    body = b"a" * 150_000 + b"-" + b"9" * 150_000
    client = MarketplaceClient("https://marketplace.example", "mk_test", retries=0, deadline=DEADLINE,
                               transport=httpx.MockTransport(lambda request: httpx.Response(
                                   500, headers={"Content-Type": f"text/plain; charset={charset}"}, content=body)))
    outcome = run_bounded(client.me, limit=60)
    assert isinstance(outcome.error, MarketplaceError), repr(outcome.error)
    assert outcome.error.code == "http_500" and outcome.error.message.startswith("aaa")
    assert outcome.seconds < DEADLINE, f"{outcome.seconds:.1f} s"


def metered_answer(content_type: str, body: bytes) -> httpx.Response:
    client = MarketplaceClient("https://marketplace.example", "mk_test", retries=0, deadline=DEADLINE,
                               transport=httpx.MockTransport(lambda request: httpx.Response(
                                   200, headers={"Content-Type": content_type}, content=body)))
    return client.call_metered(uuid.uuid4(), "run")


@pytest.mark.parametrize("charset", ["punycode", "bz2", "zlib", "rot13", "base64", "hex", "uu", "quopri", "idna",
                                     "undefined"])
def test_a_metered_answers_text_in_a_charset_that_is_no_text_coding_reads_as_utf8_within_the_deadline(charset):
    """A metered call's answer is the seller's, its Content-Type too, and httpx's `.text` (`iter_text`,
    `iter_lines`) decoded it with Python's codec of the charset named, whatever it is: punycode in quadratic time
    (a few hundred kB held the agent for minutes after the answer was read), bz2, zlib, base64, hex, uu and
    quopri raised AssertionError, rot13 TypeError, idna and undefined UnicodeError. Read as UTF-8 instead."""
    body = b"a" * 150_000 + b"-" + b"9" * 150_000
    answer = metered_answer(f"text/plain; charset={charset}", body)
    outcome = run_bounded(lambda: (answer.text, list(answer.iter_lines())), limit=10)
    assert outcome.error is None, repr(outcome.error)
    assert answer.text == body.decode() and outcome.seconds < DEADLINE, f"{outcome.seconds:.1f} s"
    assert answer.headers["Content-Type"] == f"text/plain; charset={charset}"  # passed on as it came


@pytest.mark.parametrize(("charset", "body", "text"), [
    ("iso-8859-1", "café".encode("latin-1"), "café"),
    ("windows-1252", "€ café".encode("cp1252"), "€ café"),
    ("shift_jis", "日本".encode("shift_jis"), "日本"),
    ("utf-16", "text".encode("utf-16"), "text"),  # a BOM says its byte order
    ("utf-16", "text".encode("utf-16-be"), "text"),  # none: big-endian (RFC 2781)
    ("UTF-32", "text".encode("utf-32-be"), "text"),
    ("utf-8", b"caf\xc3\xa9 \xff", "café \ufffd"),
    ("no-such-charset", "café".encode(), "café"),
])
def test_a_metered_answers_text_in_a_real_charset_reads_in_it(charset, body, text):
    """The charsets of text still decode as named; UTF-16 and UTF-32 without a byte order mark raised UnicodeError
    ("stream does not start with BOM") from httpx's decoder."""
    answer = metered_answer(f"text/plain; charset={charset}", body)
    assert answer.text == text and "".join(answer.iter_text()) == text


def test_an_accept_a_server_asks_to_retry_at_once_waits_its_poll_interval(http_server):
    """A compromised server naming a retry_after_seconds of a nanosecond on every `payment_not_final` made the SDK's
    accept send again in a tight loop for the whole wait: the named wait is taken only when longer than the
    client's own `poll_interval`."""
    refusal = (409, {"error": {"code": "payment_not_final", "message": "not final",
                               "details": {"retry_after_seconds": 1e-9}}})
    http_server.responses.extend([refusal] * 1_000)

    with pytest.raises(MarketplaceError) as refused:
        marketplace(http_server.url).accept_agreement(uuid.uuid4(), payment_final_wait=1.0, poll_interval=0.25)

    assert refused.value.code == "payment_not_final"
    assert len(http_server.requests) <= 6, f"{len(http_server.requests)} accepts sent in a 1 s wait"


def test_an_accept_a_server_asks_to_retry_after_an_integer_past_any_float_ends_with_the_servers_refusal(http_server):
    """A compromised server naming a retry_after_seconds too large for a float (a JSON integer of 400 digits) made
    the SDK's accept raise OverflowError (`float()` of it) instead of waiting within `payment_final_wait` and
    raising the server's refusal."""
    refusal = (409, {"error": {"code": "payment_not_final", "message": "not final",
                               "details": {"retry_after_seconds": 10**400}}})
    http_server.responses.extend([refusal] * 100)

    with pytest.raises(MarketplaceError) as refused:
        marketplace(http_server.url).accept_agreement(uuid.uuid4(), payment_final_wait=0.3, poll_interval=0.1)

    assert refused.value.code == "payment_not_final"


# --- plain http ----------------------------------------------------------------------------------------------------

def recorded(sent: list[httpx.Request]) -> httpx.MockTransport:
    """A server answering every request with an empty object, `sent` the requests that reached it."""
    return httpx.MockTransport(lambda request: sent.append(request) or httpx.Response(200, json={}))


# Every client the SDK makes, at `url`, in plain http: what it sends first there.
PLAIN_HTTP: dict[str, Callable[..., Any]] = {
    "api": lambda url, transport, **options: MarketplaceClient(url, "mk_SECRET", transport=transport, retries=0,
                                                               **options).me(),
    "rpc": lambda url, transport, **options: ChainReader(url, transport=transport, **options).chain_id(),
    "network config": lambda url, transport, **options: NetworkConfig.from_marketplace(
        url, trust_server=True, transport=transport, **options),
}


@pytest.mark.parametrize("url", ["http://marketplace.example", "http://10.0.0.5:8000", "http://localhost.example",
                                 "http://127.0.0.1.nip.io", "HTTP://marketplace.example", "ftp://marketplace.example"])
@pytest.mark.parametrize("client", PLAIN_HTTP)
def test_plain_http_to_another_machine_is_refused_before_anything_is_sent(client, url):
    """The SDK sent its requests in plain http to any host it was given: the marketplace's API key (a bearer token)
    crossed the network in clear, and every answer the SDK checks a signature against (a package, a 402, the token's
    nonces and domain, the chain's clock, the whole network configuration) could be rewritten on the way."""
    sent: list[httpx.Request] = []
    with pytest.raises(InsecureUrl) as refused:
        PLAIN_HTTP[client](url, recorded(sent))
    assert sent == []
    assert "allow_insecure_http" in str(refused.value)


@pytest.mark.parametrize(("url", "shown"), [
    ("http://[2001:db8::1]:8545/v2/SECRET-KEY", "http://[2001:db8::1]:8545 is not https"),
    ("http://user:SECRET-KEY@[2001:db8::1]/", "http://[2001:db8::1] is not https"),
    ("http://node.example:8545/SECRET-KEY", "http://node.example:8545 is not https"),
])
def test_an_insecure_urls_refusal_names_its_host_as_a_url_would(url, shown):
    """An IPv6 host was shown unbracketed ("http://2001:db8::1:8545"), which reads as another address and port."""
    with pytest.raises(InsecureUrl) as refused:
        ChainReader(url)
    assert shown in str(refused.value)
    assert "SECRET-KEY" not in str(refused.value)


def test_an_rpc_url_in_plain_http_is_refused_without_its_key_in_the_error():
    with pytest.raises(InsecureUrl) as refused:
        MarketplaceClient("https://marketplace.example", "mk_test", network=NETWORK,
                          rpc_url="http://node.example/v2/SECRET-KEY?apikey=SECRET-KEY")
    shown = "".join(traceback.format_exception(refused.value))
    assert "SECRET-KEY" not in shown and "node.example" in shown


@pytest.mark.parametrize("url", ["http://127.0.0.1:8000", "http://127.8.9.10", "http://localhost:8000",
                                 "http://[::1]:8000", "http://api.localhost", "https://marketplace.example",
                                 # spelled otherwise: refused as another machine before (InsecureUrl)
                                 "http://localhost.:8000", "http://LocalHost.:8000", "http://api.localhost.:8000",
                                 "http://[::ffff:127.0.0.1]:8000", "http://[::ffff:7f00:1]:8545"])
@pytest.mark.parametrize("client", PLAIN_HTTP)
def test_https_and_plain_http_to_this_machine_are_sent(client, url):
    """This machine's loopback may be named as a fully qualified name too (`localhost.`, which resolves to loopback
    only, RFC 6761) or as an IPv4-mapped IPv6 address (`[::ffff:127.0.0.1]`, what a dual-stack server prints): those
    were refused, and a local marketplace or dev chain so named needed allow_insecure_http, which also lets plain
    http to any host through."""
    sent: list[httpx.Request] = []
    try:
        PLAIN_HTTP[client](url, recorded(sent))
    except (KeyError, TypeError, ValueError, AnswerRefused, RpcError):  # the empty answer: not what each reads
        pass
    assert len(sent) == 1


@pytest.mark.parametrize("client", PLAIN_HTTP)
def test_plain_http_to_another_machine_is_sent_when_the_caller_allows_it(client):
    sent: list[httpx.Request] = []
    try:
        PLAIN_HTTP[client]("http://marketplace.example", recorded(sent), allow_insecure_http=True)
    except (KeyError, TypeError, ValueError, AnswerRefused, RpcError):
        pass
    assert len(sent) == 1


@pytest.mark.parametrize("keyed", KEYED_URLS)
def test_the_rpc_urls_api_key_is_never_in_a_log_record(keyed, caplog):
    """httpx logs every request at INFO ("HTTP Request: POST <url> ..."), the RPC's URL whole, its provider's key
    with it: an agent logging at INFO wrote the key of every chain read its SDK made to its logs, which the SDK's
    errors keep it out of."""
    rpc_url = KEYED_URLS[keyed]("https://node.example")
    node = httpx.MockTransport(lambda request: httpx.Response(200, json={"jsonrpc": "2.0", "id": 1, "result": "0x1"}))
    with caplog.at_level(logging.DEBUG, logger="httpx"), caplog.at_level(logging.DEBUG, logger="httpcore"):
        assert ChainReader(rpc_url, transport=node).chain_id() == 1
        with MarketplaceClient("https://marketplace.example", "mk_test", transport=recorded([])) as client:
            client.me()
    shown = "\n".join(record.getMessage() for record in caplog.records)
    assert "HTTP Request: POST https://" in shown and "node.example" in shown  # still logged, saying which node
    assert "HTTP Request: GET https://marketplace.example/agents/me" in shown  # other requests as they were
    assert "SECRET-KEY" not in shown, shown


@pytest.mark.parametrize("status", [301, 302, 303, 307, 308])
def test_a_redirect_to_another_host_is_not_followed(status):
    """A compromised marketplace redirecting the SDK elsewhere (to have its API key, or a signed payment, sent to
    another host) gets a `MarketplaceError`: httpx follows no redirect unless told, and the SDK does not tell it."""
    sent: list[httpx.Request] = []

    def marketplace(request: httpx.Request) -> httpx.Response:
        sent.append(request)
        return httpx.Response(status, headers={"Location": f"https://elsewhere.example{request.url.path}"})

    with MarketplaceClient("https://marketplace.example", "mk_SECRET", network=NETWORK, retries=0,
                           transport=httpx.MockTransport(marketplace)) as client:
        for call in (client.me, lambda: client.invoke_skill("seller", "translate", {}, private_key=KEY_FOR_SKILLS,
                                                            max_amount_atomic=1)):
            with pytest.raises(MarketplaceError) as refused:
                call()
            assert refused.value.code == f"http_{status}"
    assert {request.url.host for request in sent} == {"marketplace.example"}


KEY_FOR_SKILLS = Account.create().key.hex()


@pytest.mark.parametrize("url", ["http://marketplace.localhost:8000", "http://localhost.:8000",
                                 "https://marketplace.localhost"])
def test_a_localhost_name_a_resolver_answers_with_another_machine_is_not_connected_to(monkeypatch, url):
    """Plain http is sent to this machine only, and `*.localhost` passes as this machine's (RFC 6761), but the system
    resolver (glibc's "files dns") asks DNS for such a name: a hostile DNS answer (the network attacker plain http is
    refused for) naming its own host had the SDK send the API key there in clear. A localhost name is connected to
    at loopback addresses only; none: `httpx.ConnectError`, nothing sent."""
    system_getaddrinfo = socket.getaddrinfo

    def hostile_dns(host: Any, port: Any, *args: Any, **kwargs: Any) -> Any:
        if str(host).lower().rstrip(".").endswith("localhost"):  # as DNS answers it: another machine, and loopback
            return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", ("203.0.113.7", port)),
                    (socket.AF_INET, socket.SOCK_STREAM, 6, "", ("127.0.0.1", port))][:1 if "marketplace" in
                                                                                         str(host) else 2]
        return system_getaddrinfo(host, port, *args, **kwargs)

    connected_to: list[str] = []

    def refusing_connect(self: Any, host: str, port: int, *args: Any, **kwargs: Any) -> Any:
        connected_to.append(host)
        raise httpcore.ConnectError(f"{host}:{port} refused (test)")

    monkeypatch.setattr(socket, "getaddrinfo", hostile_dns)
    monkeypatch.setattr(httpcore.SyncBackend, "connect_tcp", refusing_connect)
    with MarketplaceClient(url, "mk_SECRET", network=NETWORK, retries=0) as client:
        with pytest.raises(httpx.ConnectError):
            client.me()
    assert connected_to == ([] if "marketplace" in url else ["127.0.0.1"])


class ErrsInSeveralLines(Hostile):
    """A JSON-RPC node whose refusal's text forges log lines: a newline, a line separator, a terminal escape."""

    def answer(self) -> Iterator[bytes]:
        body = json.dumps({"jsonrpc": "2.0", "id": 1, "error": (
            "header not found\n2026-12-08 01:00:00 INFO sdk: payment confirmed, seller paid\u2028\x1b[2Kdone"
            + "x" * 100_000)}).encode()
        yield (b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: " + str(len(body)).encode()
               + b"\r\n\r\n" + body)


def test_an_rpc_nodes_refusal_is_one_bounded_line_in_the_sdks_errors():
    """A node's JSON-RPC `error`, when text, went into the `RpcError` as it came (its first 500 characters), and so
    into the agent's log, where its newlines forged lines, as a marketplace's refusal did before SDK 0.4.20. It is one
    line of at most 500 characters, what is not printable shown as a space."""
    with hostile(ErrsInSeveralLines) as rpc_url:
        with MarketplaceClient("https://marketplace.example", "mk_test", network=NETWORK, rpc_url=rpc_url) as client:
            with pytest.raises(RpcError) as refused:
                client.token_domain()
    shown = str(refused.value)
    assert shown.isprintable() and "header not found" in shown and "payment confirmed" in shown
    assert len(shown) <= 600
