"""Outbound HTTP to addresses that agents choose (seller upstreams, webhook URLs): the SSRF guard.

A seller could point its upstream or webhook at the platform's own network (the metadata service at
169.254.169.254, the database, Redis, an admin port on loopback). Two checks stop that:

- `url_check` when the URL is saved: a literal IP, `localhost` or a name that resolves to a disallowed address
  is refused with 400 `address_not_allowed`. A name that does not resolve yet is accepted (DNS may come later).
- `guarded_client` at connection time, on every new connection: the host is resolved, every address it
  resolves to must be allowed, and the socket connects to the vetted addresses themselves (TLS still verifies the
  host name), so a DNS answer that changes after registration (DNS rebinding) cannot reach inside.

Allowed means globally routable unicast: no loopback, private, link-local, shared (CGNAT), multicast,
reserved or unspecified address, nor one IANA marks not globally reachable that `ipaddress` calls global
(`_NOT_GLOBAL`: 192.0.0.192, a cloud's metadata service, say). An IPv6 address that carries an IPv4 one
(IPv4-mapped `::ffff:a.b.c.d`, IPv4-compatible `::a.b.c.d`, NAT64 `64:ff9b::a.b.c.d` and under the hosts' network's
own NAT64 prefixes, OUTBOUND_NAT64_PREFIXES, decoded per RFC 6052, 6to4 `2002:aabb:ccdd::`) is judged by the IPv4
address it reaches;
local-use NAT64 (64:ff9b:1::/48, unless it is one of those prefixes) and Teredo (2001::/32) are refused.
`ALLOW_PRIVATE_UPSTREAMS` turns these checks off for development and tests, whose upstreams run on loopback.

The guard cannot tell the platform's own public addresses (its load balancer, its hosts', a database's public
endpoint) from a seller's: the operator lists them in OUTBOUND_DENIED_NETWORKS, and an address in one, or reaching
one, is refused as a private one is, with ALLOW_PRIVATE_UPSTREAMS on too. Both settings are read once per resolution
(`_address_check`), where the private-address check runs: a kept-alive connection is not checked again per call.

Resolving the host is part of connecting, and bounded with it (the proxy's PROXY_CONNECT_TIMEOUT, a client's connect
timeout and its `deadline`): the system resolver has no timeout, and whoever chose the URL chose the DNS server that
answers for its name, which may never answer. Names are resolved by `RESOLVER` (sdk.name_resolution), on at most
OUTBOUND_RESOLVER_THREADS threads of the process; an address (an IP literal) needs none.

Every exchange of a `guarded_client` runs inside `with deadline(seconds):`, which bounds it in all: connecting,
sending, the answer's head and whatever of its body the caller reads inside the block. A timeout bounds each
socket read only, and a peer sending its answer a byte at a time passes every one of them (h11 reads up to 16 KiB
of head), holding the worker that settles money behind it for hours.

The guard's errors reach the agent who chose the URL (a webhook's delivery log, a purchase's error): they name
the host only, never the addresses it resolved to or the resolver's answer, which would map how the platform
resolves names; those go to the operator's log.
"""

import functools
import http.client
import ipaddress
import logging
import select
import socket
import ssl
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import h11
import httpcore
import httpx
from django.conf import settings
from django.core import checks

from marketplace import bounded_json, outbound_networks
from marketplace.url_credentials import has_credentials
from marketplace.concurrency import Deadlines
from marketplace.errors import InvalidInput
from marketplace.metrics import UPSTREAM_REQUESTS_RESENT
from sdk.bounded_http import ACCEPTED_ENCODINGS, InSmallPieces
from sdk.name_resolution import BoundedResolver, ResolverBusy

logger = logging.getLogger(__name__)


_NAT64 = ipaddress.ip_network("64:ff9b::/96")
_IPV4_TRANSLATED = ipaddress.ip_network("::ffff:0:0:0/96")  # SIIT (RFC 6145): reaches the IPv4 address it embeds
# A translator inside someone's network (local-use NAT64, unless it is one of the hosts' own NAT64 prefixes), and a
# Teredo tunnel (reaching its client's IPv4 address through whichever relay answers): refused, whatever they embed.
_REACHING_UNKNOWN = (ipaddress.ip_network("64:ff9b:1::/48"), ipaddress.ip_network("2001::/32"))
# Blocks IANA's special-purpose registries mark not globally reachable that `ipaddress` (its tables as of Python
# 3.11) calls global: the IETF protocol assignments but their two anycast addresses (Oracle Cloud Classic's metadata
# service is 192.0.0.192), IPv6's documentation prefix (RFC 9637), SRv6 SIDs (RFC 9602) and the dummy prefix (RFC 9780).
_NOT_GLOBAL = tuple(ipaddress.ip_network(block) for block in ("192.0.0.0/24", "3fff::/20", "5f00::/16",
                                                              "100:0:0:1::/64"))
_GLOBAL_IN_NOT_GLOBAL = frozenset(ipaddress.ip_address(address) for address in ("192.0.0.9", "192.0.0.10"))

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


class AddressNotAllowed(httpcore.ConnectError):
    """Raised while connecting; httpx re-raises it as `httpx.ConnectError` with this as `__cause__`."""


def _reached(ip: IPAddress, nat64_prefixes: tuple[ipaddress.IPv6Network, ...]) -> IPAddress | None:
    """The address a connection to `ip` ends up at: the IPv4 address an IPv6 one embeds, else `ip`; None when it
    cannot be told."""
    if ip.version == 4:
        return ip
    if ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    if int(ip) >> 32 == 0 or ip in _NAT64 or ip in _IPV4_TRANSLATED:  # IPv4-compatible (:: and ::1 included)
        return ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
    for prefix in nat64_prefixes:
        if ip in prefix:
            return outbound_networks.embedded_ipv4(ip, prefix)
    if any(ip in network for network in _REACHING_UNKNOWN):
        return None
    return ip.sixtofour or ip


def private_addresses_check(app_configs=None, **kwargs) -> list[checks.CheckMessage]:
    """Deployment system check (`manage.py check --deploy`, E004): ALLOW_PRIVATE_UPSTREAMS, a development setting
    (on while DEBUG: `make run` and the tests call upstreams on loopback), is off once DEBUG is. Set on its own in a
    production environment (copied from a development one), it turned the guard off with no sign: every seller's and
    webhook's URL could name the metadata service, the database or Redis. A deployment that means it (sellers on its
    own private network) silences it (SILENCED_SYSTEM_CHECKS)."""
    if not settings.ALLOW_PRIVATE_UPSTREAMS or settings.DEBUG:
        return []
    return [checks.Error(
        "ALLOW_PRIVATE_UPSTREAMS is on with DEBUG off: the SSRF guard lets sellers' upstreams and webhooks call "
        "loopback, private and link-local addresses (the metadata service, the database, Redis).",
        hint="Unset ALLOW_PRIVATE_UPSTREAMS (it follows DEBUG), or silence marketplace.E004 if every private "
             "address the platform reaches may be called by any seller.", id="marketplace.E004")]


@functools.lru_cache(maxsize=4)
def _operator_networks(denied: tuple[str, ...], nat64_prefixes: tuple[str, ...]):
    """The settings' networks, parsed once per value (settings.py refused a bad one at start)."""
    return (outbound_networks.networks("OUTBOUND_DENIED_NETWORKS", list(denied)),
            outbound_networks.nat64_prefixes("OUTBOUND_NAT64_PREFIXES", list(nat64_prefixes)))


def _address_check() -> Callable[[str], bool]:
    """Whether the platform may connect to an address, by the settings as they are now: read once for all the
    addresses a host resolves to. Allowed means globally routable unicast (no loopback, private, link-local, shared,
    multicast, reserved, unspecified, site-local or `_NOT_GLOBAL` address) or any address while
    ALLOW_PRIVATE_UPSTREAMS is on, judged by the address it reaches; and outside OUTBOUND_DENIED_NETWORKS, itself and
    the address it reaches."""
    denied, nat64_prefixes = _operator_networks(tuple(settings.OUTBOUND_DENIED_NETWORKS),
                                                tuple(settings.OUTBOUND_NAT64_PREFIXES))
    private_allowed = settings.ALLOW_PRIVATE_UPSTREAMS

    def allowed(address: str) -> bool:
        ip = ipaddress.ip_address(address.split("%", 1)[0])  # drop an IPv6 zone id
        reached = _reached(ip, nat64_prefixes)
        if any(ip in network or reached is not None and reached in network for network in denied):
            return False
        if private_allowed:
            return True
        return (reached is not None and reached.is_global and not reached.is_multicast
                and not (reached.version == 6 and reached.is_site_local)
                and (reached in _GLOBAL_IN_NOT_GLOBAL or not any(reached in block for block in _NOT_GLOBAL)))

    return allowed


# Every name the platform's outbound connections resolve (seller upstreams, webhooks, skills, Masumi services; the
# chain's RPC has its own): a lookup that outlasts its connection's timeout keeps its thread until the system resolver
# gives up.
# What an httpx call to a saved address raises when the address cannot be reached: its HTTPErrors, and (for one
# saved before url_check refused hosts IDNA forbids) InvalidURL and the IDNA codec's UnicodeError.
HTTPX_UNREACHABLE = (httpx.HTTPError, httpx.InvalidURL, UnicodeError)

RESOLVER = BoundedResolver(threads=settings.OUTBOUND_RESOLVER_THREADS, name="outbound")
# The names of URLs being saved, apart: registering URLs whose names never resolve must not take the threads the
# connections resolve on. A name not resolved in time, or while these are all taken, is accepted as not yet resolvable.
_SAVED_URLS_RESOLVER = BoundedResolver(threads=4, name="url-check")


def _is_ip_literal(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def url_check(url: str) -> None:
    """400 `address_not_allowed` when the URL's host is (or resolves to) an address the platform must not call;
    `credentials_in_url` when it holds userinfo, which no client sends (`without_credentials`); `invalid_port` (0,
    or beyond 65535), `invalid_url` when it could not be called at all."""
    parts = urlsplit(url)
    try:
        port = parts.port
    except ValueError:  # beyond 65535: urlsplit refuses to read it, and the socket to connect to it
        port = 0
    # Port 0 is no server's: httpx connects to it and fails every call, the metered proxy reads it as the default.
    if port == 0:
        raise InvalidInput("The URL's port is not one from 1 to 65535.", code="invalid_port")
    # URLField takes any character above U+00A0 in a host, and any xn-- label; httpx refuses those IDNA forbids
    # when it sends, in reading the URL's host (which decodes an A-label).
    try:
        _ = httpx.URL(url).host
    except (httpx.InvalidURL, UnicodeError):
        raise InvalidInput("The URL's host is not a name IDNA allows.", code="invalid_url") from None
    _address_check_of_saved(url, parts, port)
    if has_credentials(url):
        raise InvalidInput("The URL holds credentials (user:password@): the marketplace never sends them; it signs "
                           "its calls instead (X-Marketplace-Signature, Marketplace-Signature), which the receiver "
                           "checks with the secret it was given.", code="credentials_in_url")


def _address_check_of_saved(url: str, parts, port: int | None) -> None:
    """url_check's 400 `address_not_allowed`."""
    if settings.ALLOW_PRIVATE_UPSTREAMS and not settings.OUTBOUND_DENIED_NETWORKS:
        return
    host = (parts.hostname or "").rstrip(".").lower()
    refused = InvalidInput("The URL points at a loopback, private or otherwise internal address, which the "
                           "marketplace does not call.", code="address_not_allowed", details={"host": host})
    if not settings.ALLOW_PRIVATE_UPSTREAMS and (not host or host == "localhost" or host.endswith(".localhost")):
        raise refused
    if _is_ip_literal(host):
        addresses = [host]
    else:
        try:
            addresses = _SAVED_URLS_RESOLVER.stream_addresses(dns_name(url), port or (443 if parts.scheme == "https" else 80),
                                                              timeout=settings.PROXY_CONNECT_TIMEOUT)
        except (OSError, UnicodeError):  # a timeout too
            return  # not resolvable now; checked again on every connection
    allowed = _address_check()
    if not all(allowed(address) for address in addresses):
        raise refused


@functools.lru_cache(maxsize=4096)
def _host_as_called(scheme: str, netloc: str) -> tuple[str, str]:
    """(the host as DNS knows it, the Host header) of a URL with this scheme and netloc, as httpx reads it; read once
    per upstream (httpx's parse costs ~20 µs, on every proxied call). http.client.HTTPException for a host IDNA
    forbids (a URL saved before `url_check` refused those)."""
    try:
        url = httpx.URL(f"{scheme}://{netloc}/")
    except (httpx.InvalidURL, UnicodeError) as exc:
        raise http.client.HTTPException(f"cannot call {scheme}://{netloc}: {exc}") from None
    return url.raw_host.decode("ascii"), url.netloc.decode("ascii")


def dns_name(url: str) -> str:
    """The host of `url` as DNS knows it: an international name's A-labels by IDNA 2008, as httpx (the skills' and
    webhooks' calls) encodes it. Given as text, http.client and the socket module encode it by IDNA 2003, which makes
    some names other ones (straße.example is strasse.example there)."""
    parts = urlsplit(url)
    return _host_as_called(parts.scheme, parts.netloc)[0]


def host_header(url: str) -> str:
    """The Host header of a call to `url`: its host as DNS knows it (`dns_name`) and its port, never its userinfo
    (RFC 9110 4.2.4)."""
    parts = urlsplit(url)
    return _host_as_called(parts.scheme, parts.netloc)[1]


def vetted_addresses(host: str, port: int, *, timeout: float) -> list[str]:
    """The addresses to connect to for `host`, in turn: those it resolves to within `timeout` seconds, once every
    one of them is allowed (`_address_check`). Raises ResolutionTimeout (a TimeoutError) past
    `timeout`, AddressNotAllowed, or httpcore.ConnectError when it does not resolve."""
    try:
        addresses = RESOLVER.stream_addresses(host, port, timeout=timeout)
    except TimeoutError:
        logger.warning("outbound host not resolved in time", extra={"host": host, "timeout": timeout})
        raise
    except ResolverBusy as exc:
        logger.warning("outbound host not resolved: resolver busy", extra={"host": host, "error": str(exc)})
        raise httpcore.ConnectError(f"cannot resolve {host} now: too many host names are being resolved") from None
    except (OSError, UnicodeError) as exc:
        logger.warning("outbound host not resolved", extra={"host": host, "error": str(exc)})
        raise httpcore.ConnectError(f"cannot resolve {host}") from None
    allowed = _address_check()
    refused = [address for address in addresses if not allowed(address)]
    if refused:
        logger.warning("outbound address refused", extra={"host": host, "address": refused[0]})
        raise AddressNotAllowed(f"{host} resolves to an address that is not allowed")
    return addresses  # connect to the addresses we checked, not to a fresh lookup


@dataclass(frozen=True)
class _Deadline:
    ends_at: float  # time.monotonic()
    seconds: float


_deadline: ContextVar[_Deadline | None] = ContextVar("outbound_deadline", default=None)


@contextmanager
def deadline(seconds: float) -> Iterator[None]:
    """Every guarded exchange inside the block ends within `seconds` from its start, or raises httpx's timeout
    error (ConnectTimeout, ReadTimeout or WriteTimeout). A deadline inside another never outlasts it."""
    outer = _deadline.get()
    ends_at = time.monotonic() + seconds
    if outer is not None and outer.ends_at <= ends_at:
        yield
        return
    token = _deadline.set(_Deadline(ends_at, seconds))
    try:
        yield
    finally:
        _deadline.reset(token)


@contextmanager
def _within_deadline(timeout: float | None, timeout_error: type[httpcore.TimeoutException]) -> Iterator[float]:
    """The timeout for one socket operation: `timeout`, shortened to what is left of the exchange's deadline; the
    deadline's own error once it has passed."""
    current = _deadline.get()
    if current is None:
        raise RuntimeError("A guarded outbound exchange runs inside `outbound.deadline(seconds)`: a peer that "
                           "dribbles its answer passes every per-read timeout.")
    left = current.ends_at - time.monotonic()
    past = f"the exchange took longer than its {current.seconds:g} s in all"
    if left <= 0:
        raise timeout_error(past)
    try:
        yield left if timeout is None else min(timeout, left)
    except timeout_error:
        if time.monotonic() >= current.ends_at:
            raise timeout_error(past) from None
        raise


class _DeadlineStream(httpcore.NetworkStream):
    """A connection's stream whose every operation ends by the deadline of the exchange using it: read when it is
    used, so a pooled connection honours the deadline of each exchange it serves."""

    def __init__(self, stream: httpcore.NetworkStream):
        self._stream = stream

    def read(self, max_bytes: int, timeout: float | None = None) -> bytes:
        with _within_deadline(timeout, httpcore.ReadTimeout) as bounded:
            return self._stream.read(max_bytes, bounded)

    def write(self, buffer: bytes, timeout: float | None = None) -> None:
        with _within_deadline(timeout, httpcore.WriteTimeout) as bounded:
            self._stream.write(buffer, bounded)

    def start_tls(self, ssl_context: ssl.SSLContext, server_hostname: str | None = None,
                  timeout: float | None = None) -> "_DeadlineStream":
        with _within_deadline(timeout, httpcore.ConnectTimeout) as bounded:
            return _DeadlineStream(self._stream.start_tls(ssl_context, server_hostname, bounded))

    def close(self) -> None:
        self._stream.close()

    def get_extra_info(self, info: str) -> Any:
        return self._stream.get_extra_info(info)


def _left(ends_at: float, host: str, timeout_error: type[Exception] = httpcore.ConnectTimeout) -> float:
    """The time left to connect by `ends_at`; `timeout_error` once none is."""
    left = ends_at - time.monotonic()
    if left <= 0:
        raise timeout_error(f"connecting to {host} took longer than its timeout")
    return left


class _GuardedBackend(httpcore.SyncBackend):
    def connect_tcp(self, host, port, timeout=None, local_address=None, socket_options=None):
        """Resolves `host` and connects to its vetted addresses in turn, all within `timeout` and the deadline."""
        with _within_deadline(timeout, httpcore.ConnectTimeout) as bounded:
            ends_at = time.monotonic() + bounded
            try:
                addresses = vetted_addresses(host, port, timeout=bounded)
            except TimeoutError as exc:
                raise httpcore.ConnectTimeout(str(exc)) from None
            failure = None
            for address in addresses:  # as socket.create_connection tries them, but within the time left
                try:
                    stream = super().connect_tcp(address, port, timeout=_left(ends_at, host),
                                                 local_address=local_address, socket_options=socket_options)
                except httpcore.ConnectError as exc:
                    failure = exc
                else:
                    return _DeadlineStream(stream)
            raise failure


class _WithoutUrlCredentials(httpx.Auth):
    """A guarded client's auth: the request's URL without its userinfo, which httpx otherwise sends as
    `Authorization: Basic`; the metered proxy (http.client) sends none either (`url_check` refuses them now, a URL
    saved before is called as the others are)."""

    def auth_flow(self, request: httpx.Request):
        if request.url.userinfo:
            request.url = request.url.copy_with(userinfo=b"")
        yield request


class _FinalAnswerHTTP11(httpcore.HTTP11Connection):
    """httpcore's HTTP/1.1 connection, its answers read past at most `_FinalAnswer.MAX_INFORMATIONAL` informational
    ones (as the metered proxy's): httpcore skipped them without bound, and a seller or receiver sending 103 Early
    Hints endlessly kept the thread (a web thread, for a synchronous skill) parsing heads, the GIL held, until the
    exchange's deadline (a skill's limit, up to an hour in a worker)."""

    _informational = 0  # informational answers to the request being answered

    def _receive_event(self, timeout: float | None = None):
        event = super()._receive_event(timeout=timeout)
        if isinstance(event, h11.InformationalResponse):
            self._informational += 1
            if self._informational > _FinalAnswer.MAX_INFORMATIONAL:
                raise httpcore.RemoteProtocolError(
                    f"more than {_FinalAnswer.MAX_INFORMATIONAL} informational answers")
        elif isinstance(event, h11.Response):
            self._informational = 0
        return event

    def _response_closed(self) -> None:
        """Kept alive only when nothing came past the answer's end: bytes read after it (a second answer, a body
        longer than its Content-Length, sent in the same write) were kept by h11 and read as the answer to the next
        request down the connection, another buyer's skill call or another subscriber's delivery (bytes arriving
        after this, while the connection is idle, make the pool close it: httpcore's `has_expired`)."""
        with self._state_lock:
            past_the_end = self._h11_state.their_state is h11.DONE and self._h11_state.trailing_data[0]
        if past_the_end:
            self.close()
            return
        super()._response_closed()


class _GuardedHTTPConnection(httpcore.HTTPConnection):
    """httpcore's connection, speaking HTTP/1.1 through `_FinalAnswerHTTP11` (a guarded client never asks for
    HTTP/2)."""

    def handle_request(self, request: httpcore.Request) -> httpcore.Response:
        with self._request_lock:
            if self._connection is None:
                try:
                    stream = self._connect(request)
                except BaseException:
                    self._connect_failed = True
                    raise
                self._connection = _FinalAnswerHTTP11(origin=self._origin, stream=stream,
                                                      keepalive_expiry=self._keepalive_expiry)
        return super().handle_request(request)


class _GuardedPool(httpcore.ConnectionPool):
    """The pool of a guarded client: its connections are `_GuardedHTTPConnection`s (no proxy: trust_env is off)."""

    def create_connection(self, origin: httpcore.Origin) -> httpcore.ConnectionInterface:
        return _GuardedHTTPConnection(
            origin=origin, ssl_context=self._ssl_context, keepalive_expiry=self._keepalive_expiry, http1=self._http1,
            http2=self._http2, retries=self._retries, local_address=self._local_address, uds=self._uds,
            network_backend=self._network_backend, socket_options=self._socket_options)


def guarded_client(*, timeout: httpx.Timeout, limits: httpx.Limits | None = None,
                   follow_redirects: bool = False) -> httpx.Client:
    """An httpx client whose every new connection goes through the address check, and whose every exchange runs
    inside `deadline(seconds)` (a RuntimeError otherwise). `timeout` still bounds each operation and the wait for
    a pooled connection."""
    transport = httpx.HTTPTransport(limits=limits or httpx.Limits())
    # httpx does not expose httpcore's pool: its network backend, and its class (which makes its connections), are set
    # on the pool the transport built.
    transport._pool._network_backend = _GuardedBackend()
    transport._pool.__class__ = _GuardedPool
    # Ask for the codings `json_answer` decodes (httpx's default adds br and zstd once their packages are installed).
    return httpx.Client(transport=transport, timeout=timeout, follow_redirects=follow_redirects, trust_env=False,
                        auth=_WithoutUrlCredentials(),
                        headers={"Accept-Encoding": ", ".join(ACCEPTED_ENCODINGS)})


class AnswerHeadTooLarge(http.client.HTTPException):
    """An answer whose head is larger than the call allows."""


class _BoundedHead:
    """An answer's socket file while its head is read (http.client reads it by lines): at most `max_bytes` in all,
    AnswerHeadTooLarge past them, never reading beyond."""

    __slots__ = ("_fp", "_left", "_max_bytes")

    def __init__(self, fp, max_bytes: int):
        self._fp, self._left, self._max_bytes = fp, max_bytes, max_bytes

    def readline(self, limit: int = -1) -> bytes:
        line = self._fp.readline(self._left + 1 if limit < 0 else min(limit, self._left + 1))
        self._left -= len(line)
        if self._left < 0:
            raise AnswerHeadTooLarge(f"an answer head larger than {self._max_bytes} bytes")
        return line

    def close(self) -> None:
        self._fp.close()


class _FinalAnswer(http.client.HTTPResponse):
    """An answer read past any informational one (1xx but 101), as http.client skips only 100 Continue: a 103 Early
    Hints or a 102 taken for the answer left the real one unread on a kept-alive connection, for the next call on it
    (another buyer's) to be given. A 101 (a protocol switch nothing here follows) or a status past 599 (which no
    answer of ours can carry) is no answer: BadStatusLine, as for a status below 100. So are more than
    MAX_INFORMATIONAL informational answers (as Go's client reads): skipped without bound, an upstream sending them
    endlessly kept the thread parsing heads (the GIL held) until the head's timeout."""

    MAX_INFORMATIONAL = 5

    def __init__(self, sock, debuglevel=0, method=None, url=None, *, max_head_bytes: int):
        super().__init__(sock, debuglevel, method, url)
        self.max_head_bytes = max_head_bytes

    def _read_status(self):
        while True:
            version, status, reason = super()._read_status()
            if status == 101 or status > 599:
                raise http.client.BadStatusLine(f"status {status} is not an answer that can be passed on")
            if not 100 <= status < 200:
                return version, status, reason
            self.informational = getattr(self, "informational", 0) + 1
            if self.informational > self.MAX_INFORMATIONAL:
                raise http.client.HTTPException(f"more than {self.MAX_INFORMATIONAL} informational answers")
            if status == 100:  # begin() skips its head
                return version, status, reason
            http.client.parse_headers(self.fp)  # the informational answer's head, bounded as any head; dropped

    def begin(self):
        """As http.client's, with the head bounded and the body's framing made one (RFC 9112 6.1, 6.3).

        The head, informational answers' included, is read up to `max_head_bytes` (AnswerHeadTooLarge beyond):
        http.client bounds only its lines (64 KiB) and their count (100), ~6.4 MB per answer. An answer with a
        Transfer-Encoding is framed by chunked coding alone (`_framed_by_chunks`). Content-Length values that differ
        or are no number are refused as a malformed answer (http.client read the body by the first, the proxy passed
        on the last); one value repeated (`9, 9`) is the length. So is a head the email parser could not read whole
        (a space before a colon, a first line folded): it took every header after the bad line for a body, and the
        proxy charged an answer cut off at its timeout."""
        fp = self.fp
        self.fp = _BoundedHead(fp, self.max_head_bytes)
        try:
            super().begin()
        finally:
            if self.fp is not None:  # None once http.client closed it (a status line that is no HTTP)
                self.fp = fp
        if self.msg.defects:
            raise http.client.HTTPException(f"a head not read whole: {type(self.msg.defects[0]).__name__}")
        if "transfer-encoding" in self.msg:
            self._framed_by_chunks()
            return
        lengths = {part.strip() for value in self.msg.get_all("content-length", ()) for part in value.split(",")}
        if len(lengths) > 1 or any(not (length.isascii() and length.isdigit()) for length in lengths):
            raise http.client.HTTPException(f"Content-Length {sorted(lengths)} frames no body")
        if lengths:
            (length,) = lengths
            if self.length is None:
                # One value listed more than once (`9, 9`, RFC 9110 8.6): http.client read the field as one integer,
                # found none, and read the body to the connection's close (a kept-alive one's never came).
                if len(length) > 18:  # no body a call carries; int() of thousands of digits raises ValueError
                    raise http.client.HTTPException(f"Content-Length {length[:20]}... frames no body")
                self.length, self.will_close = int(length), self._check_close()
                # Passed on as one field of that one value: `9, 9` is no length to Python's http.client, Go's client
                # or nginx, and granian writes the field as the application gives it. (A field repeated whole is
                # passed on once already; a plain length is left as it is: no rewrite on every answer.)
                del self.msg["content-length"]
                self.msg["Content-Length"] = length

    def _read_and_discard_trailer(self) -> None:
        """The trailer section after a chunked body's last chunk, dropped, read up to `max_head_bytes` as a head is:
        http.client read its lines without bound, and an upstream sending them endlessly kept the thread parsing them
        (the GIL held) until the answer's timeout, then cut the answer short. Beyond the bound the body, whole by then,
        ends there, and the connection, the rest of the section unread in it, is not used again."""
        section = _BoundedHead(self.fp, self.max_head_bytes)
        try:
            while section.readline() not in (b"\r\n", b"\n", b""):
                pass
        except AnswerHeadTooLarge:
            self.will_close = True

    def _framed_by_chunks(self) -> None:
        """An answer with a Transfer-Encoding: its body read by its chunks, `chunked` in any case with spaces around
        it (http.client compared the field as it came: `chunked ` was no coding, the body read to the close with its
        chunk sizes in it). Any other coding, or `chunked` not alone (`gzip, chunked`, `chunked, gzip`, two fields),
        is a malformed answer, as for Go's client and nginx: http.client read those by their Content-Length, which
        RFC 9112 6.3 says to ignore beside a Transfer-Encoding, and left the rest of the body on the kept-alive
        connection as the next call's answer. An answer RFC 9112 says to close the connection after (chunked beside a
        Content-Length, a Transfer-Encoding in HTTP/1.0 or on an answer without a body) leaves its connection unused
        again; that Content-Length is dropped (passed on, it described bytes the caller never gets)."""
        codings = [coding for coding in (part.strip().lower() for value in self.msg.get_all("transfer-encoding")
                                         for part in value.split(",")) if coding]  # empty list elements ignored
        if codings != ["chunked"]:
            raise http.client.HTTPException(f"Transfer-Encoding {codings} frames no body read here")
        beside_length = "content-length" in self.msg
        del self.msg["content-length"]
        # A 204, a 304 or the answer to a HEAD ends with its head, whatever it says (RFC 9112 6.3).
        no_body = self.status in (http.client.NO_CONTENT, http.client.NOT_MODIFIED) or self._method == "HEAD"
        self.chunked, self.chunk_left, self.length = not no_body, None, 0 if no_body else None
        self.will_close = self._check_close() or beside_length or self.version != 11 or no_body


class _GuardedConnection(http.client.HTTPConnection):
    """http.client's connection, connecting to the vetted addresses (`vetted_addresses`) of its host, its answers
    read past informational ones (`_FinalAnswer`)."""

    def __init__(self, host: str, port: int, *, connect_timeout: float, read_timeout: float):
        super().__init__(host, port, timeout=connect_timeout)
        self.read_timeout = read_timeout
        self.max_head_bytes = 0  # the answer's head, at most: each call's (set by `_response_within`)
        self.written = 0  # bytes of the request being sent that the socket took (reset by `_send`)
        self.waited = False  # whether they waited on the upstream to read them (reset by `_send`)

    def response_class(self, sock: socket.socket, debuglevel: int = 0, method: str | None = None) -> _FinalAnswer:
        """What http.client's `getresponse` reads the answer with: a _FinalAnswer bounded by this call's head bound."""
        return _FinalAnswer(sock, debuglevel, method, max_head_bytes=self.max_head_bytes)

    def send(self, data: bytes) -> None:
        """As http.client's (bytes only), counting in `written` what the socket took: a request that failed before
        any byte of it was taken never reached the upstream; one that failed after may have (sendall tells neither).
        A large piece is sent in parts, each noting in `waited` whether the socket had room for it at once."""
        if self.sock is None:
            self.connect()  # http.client's auto_open
        sock, view = self.sock, memoryview(data)
        while view:
            if len(view) > _PART and not self.waited and not _ready(sock, select.POLLOUT):
                self.waited = True
            taken = sock.send(view[:_PART])
            self.written += taken
            view = view[taken:]

    def connect(self) -> None:
        """Resolves the host and connects to its vetted addresses in turn, all within the connect timeout."""
        ends_at = time.monotonic() + self.timeout
        self.sock = None
        for address in vetted_addresses(self.host, self.port, timeout=self.timeout):
            try:  # as socket.create_connection tries them, but within the time left
                self.sock = socket.create_connection((address, self.port), _left(ends_at, self.host, TimeoutError))
                break
            except OSError as exc:
                failure = exc
        if self.sock is None:
            raise failure
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.sock.settimeout(self.read_timeout)


class _GuardedTLSConnection(_GuardedConnection):
    """The same over TLS: the certificate is verified for the host's name, whatever address it was reached at. The
    connection closed without TLS's close_notify is an error (ssl.SSLEOFError), not the end of what was read: an
    answer delimited by its connection's close (neither Content-Length nor chunked) cut there is incomplete (RFC 9112
    8, 9.8), whoever cut it."""

    _context = ssl.create_default_context()

    def connect(self) -> None:
        super().connect()
        self.sock = self._context.wrap_socket(self.sock, server_hostname=self.host, suppress_ragged_eofs=False)


# What UpstreamPool raises, TimeoutError aside, for a call left without an answer: the address check refused it
# (AddressNotAllowed) or its host did not resolve (httpcore.ConnectError, as the httpx clients' check raises them),
# the connection failed (OSError), or what came back was not HTTP (http.client.HTTPException).
UPSTREAM_ERRORS = (httpcore.ConnectError, OSError, http.client.HTTPException)


class UpstreamAnswer:
    """An upstream's answer: its status and headers (latin-1 text, as received), and its body as an iterator of
    chunks. `close()` gives the connection back to its pool when the body was read to its end, else closes it."""

    def __init__(self, pool: "UpstreamPool", key: tuple, connection: _GuardedConnection,
                 response: http.client.HTTPResponse, meanwhile: Any, ends_by: float):
        self.status = response.status
        self.headers = response.getheaders()
        self.meanwhile = meanwhile  # what the request's `meanwhile` returned
        self.on_close: Callable[[], None] | None = None  # called once, as the exchange ends
        self._pool, self._key, self._connection, self._response = pool, key, connection, response
        self._ends_by = ends_by  # time.monotonic() by which the whole answer must be read

    def __iter__(self) -> Iterator[bytes]:
        """The body, read by `ends_by` in all (TimeoutError past it), whoever is slow: the upstream sending it or
        the caller taking it."""
        response = self._response
        with _ANSWERS.bound(self._connection.sock, self._ends_by - time.monotonic()):
            while chunk := response.read1(65536):
                yield chunk
        if response.length:  # http.client's read1 ends quietly where the upstream closed before its Content-Length
            raise http.client.IncompleteRead(b"", response.length)
        response.close()  # read to its end (read1 leaves a Content-Length body open): the connection may serve again

    def close(self) -> None:
        if self._connection is None:
            return
        connection, self._connection = self._connection, None
        try:
            if self._response.isclosed() and not self._response.will_close and connection.sock is not None:
                self._pool.give_back(self._key, connection)
            else:
                self._response.close()
                connection.close()
        finally:
            if self.on_close is not None:
                self.on_close()


# A connection the upstream closed as our request reached it (its keep-alive timeout ran out on the way): the
# request went unanswered. RemoteDisconnected is a ConnectionResetError; over TLS, a close without close_notify is an
# SSLEOFError.
_CLOSED_UNANSWERED = (ConnectionResetError, BrokenPipeError, ssl.SSLEOFError)
# Requests sent again on a new connection when a kept-alive one closed unanswered after any byte of them was
# written: the upstream may have acted on them. As Go's HTTP client: the safe methods, or a request that carries its
# own key.
_REPLAYABLE_METHODS = {"GET", "HEAD", "OPTIONS", "TRACE"}
_IDEMPOTENCY_HEADERS = {"idempotency-key", "x-idempotency-key"}
# A connection idle longer than this is closed rather than used again: under the shortest keep-alive timeout common
# among HTTP servers (gunicorn's 2 s; uvicorn's and Node.js's 5 s), so a call is not sent down a connection its
# upstream is closing. Calls that follow each other closer than that keep their connection.
IDLE_SECONDS = 1.5
_RESENT_NOT_WRITTEN = UPSTREAM_REQUESTS_RESENT.labels(reason="not_written")
_RESENT_REPLAYABLE = UPSTREAM_REQUESTS_RESENT.labels(reason="replayable")


class UpstreamPool:
    """Kept-alive HTTP/1.1 connections to sellers' upstreams, on the standard library's http.client, every new one
    through the address check. The metered proxy's client: httpcore (with h11, in Python) and urllib3 each cost
    0.15-0.25 ms of CPU per call on loopback, 0.65-0.8 ms when the upstream takes 20 ms; http.client 0.07 and
    0.38-0.47 ms (bench/HISTORY.md). http.client also bounds what it reads of an answer's head (100 headers,
    64 KiB a line; `_FinalAnswer` bounds it in all) and decodes chunked bodies.

    A kept-alive connection that the upstream closed is never used (checked before each use, and closed once idle
    for IDLE_SECONDS); one that closes as a request reaches it sends the request again on a new connection when no
    byte of it was written (any byte may have reached the upstream, which may act on it), or when it may be repeated
    (_REPLAYABLE_METHODS, _IDEMPOTENCY_HEADERS). One whose upstream answered before reading a body it kept waiting
    is closed once answered, not used again.

    Connections are kept apart by the request's `partition` (the metered proxy's: the buyer): a host that does not
    read a request's body (and keeps the connection) reads it as the next request, and its answer to that went to
    the next call sent down the connection, whoever made it. Idle connections of every partition are closed once
    idle for IDLE_SECONDS, swept at most once per IDLE_SECONDS as connections are given back.

    Errors: TimeoutError when connecting, a read or the whole answer head took longer than its timeout, or the whole
    answer longer than its `answer_timeout` (reading its body), else one of UPSTREAM_ERRORS."""

    def __init__(self, *, max_idle_per_upstream: int):
        self.max_idle_per_upstream = max_idle_per_upstream
        self._idle: dict[tuple, list[tuple[float, _GuardedConnection]]] = {}
        self._lock = threading.Lock()
        self._next_sweep = 0.0  # time.monotonic()

    def request(self, method: str, url: str, *, headers: list[tuple[str, str]], body: bytes,
                connect_timeout: float, read_timeout: float, answer_timeout: float,
                max_head_bytes: int = 64 * 1024,
                meanwhile: Callable[[], Any] | None = None, partition: object = None) -> UpstreamAnswer:
        """`meanwhile` is called once the request is sent, before its answer is read: work that overlaps the
        upstream's, whose result is the answer's `meanwhile`. It must not raise (what it raises is not the
        upstream's error); if it does, the connection is closed and the error propagates. It is called once,
        even when the request is sent again. The whole answer, head and body, must be read within `answer_timeout`
        of now; its head (informational answers' included) is at most `max_head_bytes`, else AnswerHeadTooLarge."""
        ends_by = time.monotonic() + answer_timeout
        parts = urlsplit(url)
        tls = parts.scheme == "https"
        key = (tls, dns_name(url), parts.port or (443 if tls else 80), partition)
        target = parts.path + (f"?{parts.query}" if parts.query else "") or "/"
        replayable = method in _REPLAYABLE_METHODS or any(name.lower() in _IDEMPOTENCY_HEADERS for name, _ in headers)

        def connect() -> _GuardedConnection:
            return (_GuardedTLSConnection if tls else _GuardedConnection)(
                key[1], key[2], connect_timeout=connect_timeout, read_timeout=read_timeout)

        connection = self._take(key)
        reused = connection is not None
        if reused:
            connection.sock.settimeout(read_timeout)  # this call's, not the one's that opened the connection
        else:
            connection = connect()
        sent, done_meanwhile = False, None
        try:
            while True:  # twice at most: only a reused connection is replaced
                try:
                    _send(connection, method, target, headers, body)
                except _CLOSED_UNANSWERED:
                    if not reused:
                        raise
                    if not connection.written:
                        resent = _RESENT_NOT_WRITTEN  # closed before any byte of the request was taken: not received
                    elif replayable:  # some of it may have reached the upstream, which may have acted on it
                        resent = _RESENT_REPLAYABLE
                    else:
                        raise
                else:
                    # A body the upstream kept waiting, and an answer readable as soon as it is written: the upstream
                    # answered before it had read the body, whose bytes it may read as the next request and answer
                    # that to the next call down the connection. (An answer to a body written at once arrives after
                    # it, early or not: that cannot be told, see SECURITY.md.)
                    answered_early = connection.waited and _ready(connection.sock, select.POLLIN)
                    if not sent:
                        sent, done_meanwhile = True, None if meanwhile is None else meanwhile()
                    try:
                        response = _response_within(connection, read_timeout, max_head_bytes)
                        if answered_early:
                            response.will_close = True  # closed once answered, never given back
                        return UpstreamAnswer(self, key, connection, response, done_meanwhile, ends_by)
                    except _CLOSED_UNANSWERED:
                        if not (reused and replayable):
                            raise
                        resent = _RESENT_REPLAYABLE
                connection.close()
                connection, reused = connect(), False
                resent.inc()
        except BaseException:
            connection.close()
            raise

    def _take(self, key: tuple) -> _GuardedConnection | None:
        while True:
            with self._lock:
                idle = self._idle.get(key)
                if not idle:
                    return None
                idle_since, connection = idle.pop()  # the most recently used
                if time.monotonic() - idle_since >= IDLE_SECONDS:  # and so is every older one
                    expired = [connection, *(older for _, older in idle)]
                    idle.clear()
                    break
            if not _closed_by_peer(connection.sock):
                return connection
            connection.close()
        for each in expired:
            each.close()
        return None

    def give_back(self, key: tuple, connection: _GuardedConnection) -> None:
        now = time.monotonic()
        expired: list[_GuardedConnection] = []
        with self._lock:
            if now >= self._next_sweep:
                self._next_sweep = now + IDLE_SECONDS
                expired = self._expired(now)
            idle = self._idle.setdefault(key, [])
            if len(idle) < self.max_idle_per_upstream:
                idle.append((now, connection))
            else:
                expired.append(connection)
        for each in expired:
            each.close()

    def _expired(self, now: float) -> list[_GuardedConnection]:
        """Takes out the connections idle for IDLE_SECONDS, and the partitions left with none (under the lock)."""
        expired = []
        for key, idle in list(self._idle.items()):
            fresh = [(since, connection) for since, connection in idle if now - since < IDLE_SECONDS]
            expired.extend(connection for since, connection in idle if now - since >= IDLE_SECONDS)
            if fresh:
                idle[:] = fresh
            else:
                del self._idle[key]
        return expired


# The socket's timeout bounds each read only: an upstream sending its answer's head a byte at a time would hold the
# call (and its reservation, past the reaper's rule) for ever, one sending its body so the thread streaming it.
# These bound the head, and the whole answer, in all.
_ANSWERS = Deadlines("upstream answer")


def _response_within(connection: _GuardedConnection, seconds: float,
                     max_head_bytes: int) -> http.client.HTTPResponse:
    """The answer's head, read within `seconds` in all, else TimeoutError, and at most `max_head_bytes`, else
    AnswerHeadTooLarge (the connection is then unusable)."""
    connection.max_head_bytes = max_head_bytes
    with _ANSWERS.bound(connection.sock, seconds):
        return connection.getresponse()


def _send(connection: _GuardedConnection, method: str, target: str, headers: list[tuple[str, str]],
          body: bytes) -> None:
    connection.written, connection.waited = 0, False
    try:
        connection.putrequest(method, target, skip_host=True, skip_accept_encoding=True)
        for name, value in headers:
            connection.putheader(name, value)
        connection.endheaders(body or None)
    except ValueError as exc:  # a header http.client refuses to send (a line break in its value)
        raise http.client.HTTPException(str(exc)) from exc


_PART = 65536  # bytes sent at a time, of a request's large body


def _ready(sock: socket.socket, event: int) -> bool:
    """Whether the socket is ready for `event` (select.POLLIN: something to read, or closed by its peer; POLLOUT:
    room to write) at once."""
    poller = select.poll()
    poller.register(sock, event)
    return bool(poller.poll(0))


def _closed_by_peer(sock: socket.socket) -> bool:
    """Whether an idle kept-alive connection can no longer be used: readable while no request is outstanding means
    the upstream closed it (or sent what nobody asked for)."""
    return _ready(sock, select.POLLIN)


def blocked(exc: BaseException) -> bool:
    """Whether an httpx or httpcore error was the guard refusing an address."""
    return isinstance(exc, AddressNotAllowed) or isinstance(exc.__cause__, AddressNotAllowed)



def json_answer(response: httpx.Response, *, max_bytes: int):
    """The JSON body of a streamed answer, read up to `max_bytes` (decoded: a compressed answer inflated piece by
    piece, in one of the SDK's ACCEPTED_ENCODINGS only: stacked codings multiply each other's inflation, and brotli
    or zstandard, decoded by httpx once their packages are installed, inflate further) and parsed by `bounded_json`:
    a seller's answer can neither exhaust memory nor the parser. Raises `bounded_json.InvalidJSON`."""
    codings = [coding for coding in (value.strip().lower() for value in
                                     response.headers.get_list("Content-Encoding", split_commas=True))
               if coding not in ("", "identity")]
    if len(codings) > 1 or any(coding not in ACCEPTED_ENCODINGS for coding in codings):
        raise bounded_json.InvalidJSON(f"The answer is encoded {', '.join(codings)}; only one of "
                                       f"{', '.join(ACCEPTED_ENCODINGS)} is decoded.", reason="unsupported_encoding")
    if codings:
        response.stream = InSmallPieces(response.stream)
    # One buffer, not a list of the pieces: a chunked body yields a piece per chunk, and 2-byte chunks kept as
    # objects held ~50 bytes per 2 counted.
    body = bytearray()
    for chunk in response.iter_bytes():
        if len(body) + len(chunk) > max_bytes:
            raise bounded_json.InvalidJSON(f"The answer is larger than {max_bytes} bytes.", reason="too_large")
        body += chunk
    return bounded_json.loads(body)
