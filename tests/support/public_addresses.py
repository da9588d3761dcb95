"""Public addresses and names that tests can reach: the platform's own (its load balancer, a host's public address)
and a seller's, stood in for by a server on loopback, so that the SSRF guard judges the public address while the
connection, where it is let through, lands on the test's server."""

import ipaddress
import socket
from collections.abc import Iterator
from contextlib import contextmanager


@contextmanager
def routed(public: str, to: str, *, names: tuple[str, ...] = ()) -> Iterator[None]:
    """Connections to the address `public` (on any port) land on the same port of `to` (a loopback address), as if
    the network routed it there; each of `names` resolves to `public` alone."""
    real_connect, real_resolve = socket.create_connection, socket.getaddrinfo
    routed_address = ipaddress.ip_address(public)

    def is_routed(host: str) -> bool:
        try:
            return ipaddress.ip_address(host) == routed_address
        except ValueError:  # a name
            return False

    def create_connection(address, *args, **kwargs):
        host, port = address[:2]
        return real_connect((to if is_routed(host) else host, port), *args, **kwargs)

    def getaddrinfo(host, port, *args, **kwargs):
        name = host.decode() if isinstance(host, bytes) else str(host)
        if name.rstrip(".").lower() not in names:
            return real_resolve(host, port, *args, **kwargs)
        family = socket.AF_INET6 if ":" in public else socket.AF_INET
        endpoint = (public, int(port or 0), 0, 0) if family == socket.AF_INET6 else (public, int(port or 0))
        return [(family, socket.SOCK_STREAM, socket.IPPROTO_TCP, "", endpoint)]

    socket.create_connection, socket.getaddrinfo = create_connection, getaddrinfo
    try:
        yield
    finally:
        socket.create_connection, socket.getaddrinfo = real_connect, real_resolve
