"""Every HTTP exchange the SDK makes ends within a deadline and reads a bounded answer.

The server at the other end may be compromised or broken (the marketplace, a seller's service behind the metered
proxy, an RPC node), and any byte of its answer may be hostile. httpx bounds each network operation only (its
`timeout` is per read): a server that trickles its answer a byte at a time, each byte within the read timeout,
would hold the agent's call for ever, and an answer read whole may be gigabytes. So `BoundedHttp`, the one client
the SDK's HTTP goes through, enforces

- a deadline per request (`deadline` seconds, retries included: `deadline_within`): resolving the host's name, every
  connect, TLS handshake, write and read of the exchange waits at most until it (`_DeadlineBackend`, httpcore's
  network backend wrapped; names resolved by `sdk.name_resolution`, the system resolver having no timeout), so does
  the wait for a free connection of the client's pool (httpx's pool timeout, cut to the time left), and the
  answer's body is read only while it lasts; then `DeadlineExceeded`. httpx has no total timeout for sync clients
  (encode/httpx#1450); a transport that is not httpx's own (a `MockTransport`, a WSGI app) is checked between the
  chunks of the body only;
- a maximum answer size (`max_answer_bytes`): the body is streamed and the exchange abandoned as soon as it would
  exceed the budget (`AnswerTooLarge`), so an endless answer costs at most that much memory. The budget counts
  decoded bytes, and a compressed answer reaches httpx's decoder 1 KiB at a time (`InSmallPieces`): gzip inflates
  a piece to at most ~1 MiB, where a whole 64 KiB read could become 64 MiB. So the SDK asks for gzip or deflate
  only (`Accept-Encoding`, `ACCEPTED_ENCODINGS`), and refuses, undecoded, an answer in another coding (brotli and
  zstandard inflate further, and httpx decodes them once their packages are installed) or in several stacked
  (each layer multiplies the last): `UnrequestedEncoding`. The head is bounded by httpcore (100 KiB).

JSON answers are parsed by `sdk.bounded_json` (`json_answer`): no nesting deeper than `JSON_MAX_DEPTH`. An answer's
text (httpx's `.text`, `iter_text`, `iter_lines`) is decoded in the charset its Content-Type names only if that is a
charset of text (`text_encoding`), else as UTF-8: the name is the server's (a metered call's, the seller's), and
Python's codec of that name may be none (punycode decodes in quadratic time, bz2's decoder raises AssertionError).
"""

from __future__ import annotations

import codecs
import ipaddress
import time
from collections.abc import Iterator, Iterable
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Any

import httpcore
import httpx

from sdk import bounded_json
from sdk.name_resolution import BoundedResolver

__all__ = ["ACCEPTED_ENCODINGS", "DEFAULT_DEADLINE_SECONDS", "DEFAULT_MAX_ANSWER_BYTES", "ERROR_TEXT_CHARS",
           "AnswerRefused", "InSmallPieces", "AnswerTooLarge", "BoundedHttp", "DeadlineExceeded", "InsecureUrl",
           "UndecodableAnswer", "UnexpectedAnswer", "UnrequestedEncoding", "deadline_passed", "deadline_within",
           "json_answer", "one_line", "require_https", "text_codec", "text_encoding", "time_left"]

# A metered call may take as long as the marketplace lets a seller answer (its PROXY_ANSWER_TIMEOUT_SECONDS, 300).
DEFAULT_DEADLINE_SECONDS = 300.0
# Well above any API page or RPC read the SDK makes; a seller's larger answers need a larger bound.
DEFAULT_MAX_ANSWER_BYTES = 16 * 1024 * 1024

# Names the SDK's connections resolve, RESOLVER_THREADS at once at most: a lookup that outlasts its request's deadline
# keeps its thread until the system resolver gives up, and another name is refused meanwhile (`ResolverBusy`, an
# httpx ConnectError) rather than given a thread more.
RESOLVER_THREADS = 8
_RESOLVER = BoundedResolver(threads=RESOLVER_THREADS, name="sdk")

# The content codings the SDK asks for and decodes: one of them, since their expansion is bounded piece by piece
# (`InSmallPieces`). httpx would ask for brotli and zstandard too where those packages are installed, and decodes
# stacked codings, each multiplying the one before, at once.
ACCEPTED_ENCODINGS = ("gzip", "deflate")

# Codecs Python finds by a charset's name that decode no text with replacement, in linear time: punycode is quadratic
# (and raises on a byte above 127), idna and undefined raise whatever the bytes. The codecs of bytes to bytes (bz2,
# zlib, base64, hex, ...) and of text to text (rot13) say so themselves (`_is_text_encoding`).
_NO_TEXT_CODECS = frozenset({"punycode", "idna", "undefined"})
# Codecs whose incremental decoder (httpx's) raises on a text without a byte order mark; RFC 2781 reads it big-endian.
_WITHOUT_BOM = {"utf-16": (codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE, "utf-16-be"),
                "utf-32": (codecs.BOM_UTF32_LE, codecs.BOM_UTF32_BE, "utf-32-be")}

# How much of a server's text (a refusal's code and message, a proxy's page, a node's error) an SDK error keeps.
ERROR_TEXT_CHARS = 500

# When the running request must be over (time.monotonic()), in this thread or task; None outside a request.
_DEADLINE: ContextVar[float | None] = ContextVar("sdk_http_deadline", default=None)


class AnswerRefused(Exception):
    """An answer broke one of the SDK's bounds; the exchange was abandoned and is not retried."""


class DeadlineExceeded(AnswerRefused, httpx.TimeoutException):
    """The request, answer included (and its retries), outlasted the client's `deadline`."""


class AnswerTooLarge(AnswerRefused):
    """The answer's body is larger than the client's `max_answer_bytes`."""


class UndecodableAnswer(AnswerRefused, httpx.DecodingError):
    """The answer's body does not decode in the content coding it names (a gzip or deflate stream that is not one):
    the same bytes would not decode on a retry either."""


class UnexpectedAnswer(AnswerRefused):
    """The answer is JSON, but not of the shape the SDK reads (a field missing, an object where a list belongs)."""


class UnrequestedEncoding(AnswerRefused):
    """The answer is encoded otherwise than the SDK asked for (`Accept-Encoding`): in a coding whose expansion it does
    not bound, or in several stacked. It was not decoded."""


class InsecureUrl(ValueError):
    """A server's URL that is not https, and not plain http to this machine (loopback): nothing was sent to it."""


def one_line(text: str) -> str:
    """A server's text (a marketplace's refusal, an RPC node's error) as one line of at most `ERROR_TEXT_CHARS`
    characters, what is not printable (newlines, line separators, terminal escapes) shown as a space: it goes into
    exceptions, and so into the agent's log, where it could forge lines or fill it."""
    return "".join(character if character.isprintable() else " " for character in text[:ERROR_TEXT_CHARS])


def require_https(url: str | httpx.URL, *, what: str, allow_insecure_http: bool) -> None:
    """Refuse (`InsecureUrl`) a URL the SDK would talk to in clear across a network: plain http (or any scheme but
    https) to a host other than this machine's loopback (`_is_loopback`: localhost, *.localhost, 127.0.0.0/8, ::1),
    unless the caller says `allow_insecure_http=True`. In clear, the marketplace's API key (a bearer token) is
    anyone's on the path, and any answer the SDK checks a signature against (a package, a 402, the token's nonces,
    the chain's clock, the network configuration) could be rewritten on the way. The error names the scheme and host only: an RPC URL's
    path, query and user info often hold its provider's key (`sdk.onchain.redacted`)."""
    if allow_insecure_http:
        return
    try:
        parsed = httpx.URL(url)
    except httpx.InvalidURL:
        raise InsecureUrl(f"{what}: not a URL") from None
    if parsed.scheme == "https" or parsed.scheme == "http" and _is_loopback(parsed.host):
        return
    host = f"[{parsed.host}]" if ":" in parsed.host else parsed.host  # an IPv6 address, bracketed as in a URL
    server = host if parsed.port is None else f"{host}:{parsed.port}"
    raise InsecureUrl(f"{what}: {parsed.scheme or 'no scheme'}://{server} is not https (plain http is for this "
                      "machine only): pass allow_insecure_http=True to send to it anyway")


def _is_loopback(host: str) -> bool:
    """Whether `host` names this machine's loopback only: localhost and its subdomains, fully qualified too (a
    trailing dot; RFC 6761: resolved to loopback only, which `_DeadlineBackend` holds the resolver to), a loopback
    address, an IPv4-mapped one included (`::ffff:127.0.0.1`, as a dual-stack server names itself)."""
    return _is_localhost_name(host) or _is_loopback_address(host)


def _is_localhost_name(host: str) -> bool:
    name = host.lower().removesuffix(".")
    return name == "localhost" or name.endswith(".localhost")


def _is_loopback_address(host: str) -> bool:
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return False
    mapped = getattr(address, "ipv4_mapped", None)
    return address.is_loopback or (mapped is not None and mapped.is_loopback)


@contextmanager
def deadline_within(seconds: float) -> Iterator[float]:
    """Requests made inside end within `seconds` from now, or the deadline already running if that is sooner (a
    request's retries share its deadline). Yields the deadline (a `time.monotonic()` time)."""
    running = _DEADLINE.get()
    deadline = time.monotonic() + seconds
    token = _DEADLINE.set(deadline if running is None else min(running, deadline))
    try:
        yield deadline
    finally:
        _DEADLINE.reset(token)


def time_left() -> float | None:
    """Seconds until the running deadline (negative once passed); None outside `deadline_within`."""
    deadline = _DEADLINE.get()
    return None if deadline is None else deadline - time.monotonic()


def _bounded(timeout: float | None, expired: type[httpcore.TimeoutException]) -> float | None:
    """An operation's timeout, cut to the time left before the running deadline; `expired` once it has passed."""
    left = time_left()
    if left is None:
        return timeout
    if left <= 0:
        raise expired("the request's deadline has passed")
    return left if timeout is None else min(timeout, left)


class _DeadlineStream(httpcore.NetworkStream):
    def __init__(self, stream: httpcore.NetworkStream):
        self._stream = stream

    def read(self, max_bytes: int, timeout: float | None = None) -> bytes:
        return self._stream.read(max_bytes, _bounded(timeout, httpcore.ReadTimeout))

    def write(self, buffer: bytes, timeout: float | None = None) -> None:
        self._stream.write(buffer, _bounded(timeout, httpcore.WriteTimeout))

    def close(self) -> None:
        self._stream.close()

    def start_tls(self, ssl_context: Any, server_hostname: str | None = None,
                  timeout: float | None = None) -> httpcore.NetworkStream:
        return _DeadlineStream(self._stream.start_tls(ssl_context, server_hostname,
                                                      _bounded(timeout, httpcore.ConnectTimeout)))

    def get_extra_info(self, info: str) -> Any:
        return self._stream.get_extra_info(info)


class _DeadlineBackend(httpcore.NetworkBackend):
    """httpcore's network backend, every operation of a connection bounded by the running request's deadline."""

    def __init__(self, backend: httpcore.NetworkBackend):
        self._backend = backend

    def connect_tcp(self, host: str, port: int, timeout: float | None = None, local_address: str | None = None,
                    socket_options: Iterable[Any] | None = None) -> httpcore.NetworkStream:
        """Resolves `host` and connects to its addresses in turn, all within `timeout` and the deadline."""
        timeout = _bounded(timeout, httpcore.ConnectTimeout)
        ends_at = None if timeout is None else time.monotonic() + timeout
        try:
            addresses = _RESOLVER.stream_addresses(host, port, timeout=timeout)
        except TimeoutError as error:
            raise httpcore.ConnectTimeout(str(error)) from error
        except (OSError, UnicodeError) as error:
            raise httpcore.ConnectError(str(error)) from error
        if _is_localhost_name(host):
            # This machine's by RFC 6761, so sent plain http; but the system resolver may ask DNS for it (glibc's
            # "files dns"), whose answer is anyone's: a localhost name is connected to at loopback addresses only.
            addresses = [address for address in addresses if _is_loopback_address(address)]
            if not addresses:
                raise httpcore.ConnectError(f"{host} resolves to no loopback address: not connected to")
        failure: httpcore.ConnectError | None = None
        for address in addresses:  # as socket.create_connection tries them, but within the time left
            left = None if ends_at is None else ends_at - time.monotonic()
            if left is not None and left <= 0:
                break
            try:
                return _DeadlineStream(self._backend.connect_tcp(address, port, _bounded(left, httpcore.ConnectTimeout),
                                                                 local_address, socket_options))
            except httpcore.ConnectError as error:
                failure = error
        raise failure or httpcore.ConnectTimeout(f"no time left to connect to {host}")

    def connect_unix_socket(self, path: str, timeout: float | None = None,
                            socket_options: Iterable[Any] | None = None) -> httpcore.NetworkStream:
        return _DeadlineStream(self._backend.connect_unix_socket(path, _bounded(timeout, httpcore.ConnectTimeout),
                                                                 socket_options))

    def sleep(self, seconds: float) -> None:
        self._backend.sleep(seconds)


def _with_deadlines(transport: httpx.BaseTransport | None) -> httpx.BaseTransport:
    """`transport` (httpx's own by default) with its connections' operations bounded by the running deadline. httpx
    offers no option for a network backend: its connection pool's is wrapped (the SDK pins httpx 0.28)."""
    transport = httpx.HTTPTransport() if transport is None else transport
    if isinstance(transport, httpx.HTTPTransport):
        pool = transport._pool
        if not isinstance(pool._network_backend, _DeadlineBackend):
            pool._network_backend = _DeadlineBackend(pool._network_backend)
    return transport


class InSmallPieces(httpx.SyncByteStream):
    """A response's raw stream in pieces of at most `PIECE` bytes: what one call of httpx's decoder inflates."""

    PIECE = 1024

    def __init__(self, stream: httpx.SyncByteStream):
        self._stream = stream

    def __iter__(self) -> Iterator[bytes]:
        for chunk in self._stream:
            for start in range(0, len(chunk), self.PIECE):
                yield chunk[start:start + self.PIECE]

    def close(self) -> None:
        self._stream.close()


def deadline_passed() -> bool:
    """Whether the running deadline has passed (False outside `deadline_within`)."""
    left = time_left()
    return left is not None and left <= 0


class BoundedHttp:
    """An httpx client whose every request ends within `deadline` seconds and reads at most `max_answer_bytes`
    (module docstring). `client_options` are httpx.Client's (base_url, headers, timeout: the per-operation bound
    within the deadline)."""

    def __init__(self, *, deadline: float = DEFAULT_DEADLINE_SECONDS,
                 max_answer_bytes: int = DEFAULT_MAX_ANSWER_BYTES, transport: httpx.BaseTransport | None = None,
                 **client_options: Any):
        if not deadline > 0:
            raise ValueError("deadline must be a positive number of seconds")
        if max_answer_bytes < 1:
            raise ValueError("max_answer_bytes must be at least 1")
        self.deadline = deadline
        self.max_answer_bytes = max_answer_bytes
        headers = httpx.Headers({"Accept-Encoding": ", ".join(ACCEPTED_ENCODINGS)})
        headers.update(client_options.pop("headers", None) or {})
        self._client = httpx.Client(transport=_with_deadlines(transport), headers=headers, **client_options)

    def close(self) -> None:
        self._client.close()

    def request(self, method: str, url: str, **request: Any) -> httpx.Response:
        """Send the request and read its answer whole, within the bounds: a read answer (`.content`, `.headers`)
        or `DeadlineExceeded` / `AnswerTooLarge` / `UnrequestedEncoding`. `request` takes httpx's arguments."""
        with deadline_within(self.deadline):
            left = time_left()
            assert left is not None
            if left <= 0:
                raise DeadlineExceeded(f"no time left for {method} {url} within the {self.deadline:g} s deadline")
            # Waiting for a free connection of the pool is no network operation: its own timeout is cut instead.
            timeout = httpx.Timeout(request.pop("timeout", self._client.timeout))
            pool_waits_until_deadline = timeout.pool is None or left <= timeout.pool
            timeout = httpx.Timeout(connect=timeout.connect, read=timeout.read, write=timeout.write,
                                    pool=left if pool_waits_until_deadline else timeout.pool)
            try:
                with self._client.stream(method, url, timeout=timeout, **request) as response:
                    return self._read(response)
            except httpx.TimeoutException as error:
                if isinstance(error, DeadlineExceeded):
                    raise
                if not (deadline_passed() or pool_waits_until_deadline and isinstance(error, httpx.PoolTimeout)):
                    raise
                raise DeadlineExceeded(f"{method} {url} outlasted the {self.deadline:g} s deadline",
                                       request=error.request) from error

    def _read(self, response: httpx.Response) -> httpx.Response:
        codings = [coding for coding in (value.strip().lower() for value in
                                         response.headers.get_list("Content-Encoding", split_commas=True))
                   if coding not in ("", "identity")]
        if len(codings) > 1 or any(coding not in ACCEPTED_ENCODINGS for coding in codings):
            raise UnrequestedEncoding(f"the answer to {response.request.method} {response.request.url} is encoded "
                                      f"{', '.join(codings)}; the SDK asked for one of {', '.join(ACCEPTED_ENCODINGS)}"
                                      f" and decodes nothing else")
        if codings:
            assert isinstance(response.stream, httpx.SyncByteStream)
            response.stream = InSmallPieces(response.stream)
        # One buffer: a list of the pieces httpx yields (one per chunk of a chunked body) held ~60 bytes of objects per
        # 2-byte chunk.
        body = bytearray()
        try:
            for chunk in response.iter_bytes():
                if len(body) + len(chunk) > self.max_answer_bytes:
                    raise AnswerTooLarge(f"the answer to {response.request.method} {response.request.url} is larger "
                                         f"than {self.max_answer_bytes} bytes")
                if deadline_passed():
                    raise DeadlineExceeded(f"the answer to {response.request.method} {response.request.url} "
                                           f"outlasted the {self.deadline:g} s deadline", request=response.request)
                body += chunk
        except httpx.DecodingError as undecodable:  # httpx's, which is no transport failure: not retried either
            raise UndecodableAnswer(f"the answer to {response.request.method} {response.request.url} does not decode "
                                    f"as {', '.join(codings)}: {undecodable}", request=response.request) from None
        # What httpx's own `Response.read()` keeps: the decoded body, the answer's headers left as they came.
        response._content = bytes(body)
        response.encoding = text_encoding(response.charset_encoding, response._content)
        return response


def text_codec(charset: str) -> str | None:
    """The codec named `charset` if it is one of text decoding any bytes with replacement in linear time, else None
    (no such codec, or one of bytes to bytes, text to text, or `_NO_TEXT_CODECS`)."""
    try:
        codec = codecs.lookup(charset)
    except (LookupError, ValueError):  # ValueError: a name with a NUL character
        return None
    if not codec._is_text_encoding or codec.name in _NO_TEXT_CODECS:
        return None
    return codec.name


def text_encoding(charset: str | None, content: bytes) -> str:
    """The codec an answer of `content` whose Content-Type names `charset` is read as text with: that charset's if it
    is a codec of text (`text_codec`; UTF-16 and UTF-32 without a byte order mark as big-endian), else UTF-8."""
    codec = text_codec(charset) if charset else None
    if codec is None:
        return "utf-8"
    if codec in _WITHOUT_BOM:
        little, big, without_bom = _WITHOUT_BOM[codec]
        return codec if content.startswith((little, big)) else without_bom
    return codec


def json_answer(response: httpx.Response) -> Any:
    """The answer's JSON, parsed by `sdk.bounded_json` (`InvalidJSON`, a ValueError, for what is not JSON or nests
    too deep)."""
    return bounded_json.loads(response.content)
