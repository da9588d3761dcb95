"""Outbound HTTP to addresses that agents choose (seller upstreams, webhook URLs): the SSRF guard.

A seller could point its upstream or webhook at the platform's own network (the metadata service at
169.254.169.254, the database, Redis, an admin port on loopback). Two checks stop that:

- `url_check` when the URL is saved: a literal IP, `localhost` or a name that resolves to a disallowed address
  is refused with 400 `address_not_allowed`. A name that does not resolve yet is accepted (DNS may come later).
- `guarded_client` at connection time, on every new connection: the host is resolved, every address it
  resolves to must be allowed, and the socket connects to the vetted address itself (TLS still verifies the
  host name), so a DNS answer that changes after registration (DNS rebinding) cannot reach inside.

Allowed means globally routable unicast: no loopback, private, link-local, shared (CGNAT), multicast,
reserved or unspecified address. An IPv6 address that carries an IPv4 one (IPv4-mapped `::ffff:a.b.c.d`,
IPv4-compatible `::a.b.c.d`, NAT64 `64:ff9b::a.b.c.d`, 6to4 `2002:aabb:ccdd::`) is judged by the IPv4 address it
reaches; local-use NAT64 (64:ff9b:1::/48) is refused. `ALLOW_PRIVATE_UPSTREAMS` turns both checks off for
development and tests, whose upstreams run on loopback.

The guard's errors reach the agent who chose the URL (a webhook's delivery log, a purchase's error): they name
the host only, never the addresses it resolved to or the resolver's answer, which would map how the platform
resolves names; those go to the operator's log.
"""

import ipaddress
import logging
import socket
from urllib.parse import urlsplit

import httpcore
import httpx
from django.conf import settings

from marketplace import bounded_json
from marketplace.errors import InvalidInput

logger = logging.getLogger(__name__)


_NAT64 = ipaddress.ip_network("64:ff9b::/96")
_LOCAL_NAT64 = ipaddress.ip_network("64:ff9b:1::/48")


class AddressNotAllowed(httpcore.ConnectError):
    """Raised while connecting; httpx re-raises it as `httpx.ConnectError` with this as `__cause__`."""


def _reached(ip: ipaddress.IPv4Address | ipaddress.IPv6Address):
    """The address a connection to `ip` ends up at: the IPv4 address an IPv6 one embeds, else `ip`."""
    if ip.version == 4:
        return ip
    if ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    if int(ip) >> 32 == 0 or ip in _NAT64:  # IPv4-compatible (:: and ::1 included), NAT64
        return ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
    return ip.sixtofour or ip


def address_allowed(address: str) -> bool:
    ip = ipaddress.ip_address(address.split("%", 1)[0])  # drop an IPv6 zone id
    if ip in _LOCAL_NAT64:
        return False
    ip = _reached(ip)
    return ip.is_global and not ip.is_multicast


def _resolve(host: str, port: int) -> list[str]:
    return list(dict.fromkeys(info[4][0] for info in socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)))


def _is_ip_literal(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def url_check(url: str) -> None:
    """400 `address_not_allowed` when the URL's host is (or resolves to) an address the platform must not call."""
    if settings.ALLOW_PRIVATE_UPSTREAMS:
        return
    parts = urlsplit(url)
    host = (parts.hostname or "").rstrip(".").lower()
    refused = InvalidInput("The URL points at a loopback, private or otherwise internal address, which the "
                           "marketplace does not call.", code="address_not_allowed", details={"host": host})
    if not host or host == "localhost" or host.endswith(".localhost"):
        raise refused
    if _is_ip_literal(host):
        addresses = [host]
    else:
        try:
            addresses = _resolve(host, parts.port or (443 if parts.scheme == "https" else 80))
        except (OSError, UnicodeError):
            return  # not resolvable now; checked again on every connection
    if not all(address_allowed(address) for address in addresses):
        raise refused


class _GuardedBackend(httpcore.SyncBackend):
    def connect_tcp(self, host, port, timeout=None, local_address=None, socket_options=None):
        if not settings.ALLOW_PRIVATE_UPSTREAMS:
            try:
                addresses = _resolve(host, port)
            except (OSError, UnicodeError) as exc:
                logger.warning("outbound host not resolved", extra={"host": host, "error": str(exc)})
                raise httpcore.ConnectError(f"cannot resolve {host}") from None
            refused = [address for address in addresses if not address_allowed(address)]
            if refused:
                logger.warning("outbound address refused", extra={"host": host, "address": refused[0]})
                raise AddressNotAllowed(f"{host} resolves to an address that is not allowed")
            host = addresses[0]  # connect to the address we checked, not to a fresh lookup
        return super().connect_tcp(host, port, timeout=timeout, local_address=local_address,
                                   socket_options=socket_options)


def guarded_client(*, timeout: httpx.Timeout, limits: httpx.Limits | None = None,
                   follow_redirects: bool = False) -> httpx.Client:
    """An httpx client whose every new connection goes through the address check."""
    transport = httpx.HTTPTransport(limits=limits or httpx.Limits())
    # httpx does not expose httpcore's network_backend; set it on the pool the transport built.
    transport._pool._network_backend = _GuardedBackend()
    return httpx.Client(transport=transport, timeout=timeout, follow_redirects=follow_redirects, trust_env=False)


def guarded_pool(*, max_connections: int, max_keepalive_connections: int) -> httpcore.ConnectionPool:
    """An httpcore pool (no httpx client on top) whose every new connection goes through the address check."""
    return httpcore.ConnectionPool(max_connections=max_connections,
                                   max_keepalive_connections=max_keepalive_connections,
                                   network_backend=_GuardedBackend())


def blocked(exc: BaseException) -> bool:
    """Whether an httpx or httpcore error was the guard refusing an address."""
    return isinstance(exc, AddressNotAllowed) or isinstance(exc.__cause__, AddressNotAllowed)



def json_answer(response: httpx.Response, *, max_bytes: int):
    """The JSON body of a streamed answer, read up to `max_bytes` (decoded) and parsed by `bounded_json`: a seller's
    answer can neither exhaust memory nor the parser. Raises `bounded_json.InvalidJSON`."""
    chunks, size = [], 0
    for chunk in response.iter_bytes():
        size += len(chunk)
        if size > max_bytes:
            raise bounded_json.InvalidJSON(f"The answer is larger than {max_bytes} bytes.", reason="too_large")
        chunks.append(chunk)
    return bounded_json.loads(b"".join(chunks))
