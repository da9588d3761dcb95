"""Host names whose authoritative DNS server never answers: the system resolver (getaddrinfo) waits for it until its
own timeouts, attempts and name servers run out, tens of seconds at the least, longer when the seller's server answers
just in time to be asked again."""

import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

UNANSWERED = "never-answers.example"
# How long a lookup of it blocks before failing as a resolver that gave up (EAI_AGAIN): far past every bound under
# test, so a bound that does not hold shows as a call taking this long, rather than as a suite that hangs.
RESOLVER_GIVES_UP_AFTER = 10.0


class Lookups:
    """The lookups of `UNANSWERED` under way: how many are blocked now, and how many began."""

    def __init__(self) -> None:
        self.blocked = 0
        self.began = 0
        self.lock = threading.Lock()
        self.released = threading.Event()


@contextmanager
def unanswered_names() -> Iterator[Lookups]:
    """`socket.getaddrinfo` of `UNANSWERED` (or any name under it) blocks until the block ends, then fails as the
    system resolver does when it gives up; every other name and address resolves as usual. On leaving, the blocked
    lookups are released and waited for (briefly), so that the next test starts with the resolvers' threads free."""
    real = socket.getaddrinfo
    lookups = Lookups()

    def getaddrinfo(host, *args, **kwargs):
        flags = kwargs.get("flags", args[4] if len(args) > 4 else 0)
        name = host.decode() if isinstance(host, bytes) else str(host)
        if flags & socket.AI_NUMERICHOST or not (name == UNANSWERED or name.endswith("." + UNANSWERED)):
            return real(host, *args, **kwargs)
        with lookups.lock:
            lookups.blocked += 1
            lookups.began += 1
        try:
            lookups.released.wait(RESOLVER_GIVES_UP_AFTER)
        finally:
            with lookups.lock:
                lookups.blocked -= 1
        raise socket.gaierror(socket.EAI_AGAIN, "Temporary failure in name resolution")

    socket.getaddrinfo = getaddrinfo
    try:
        yield lookups
    finally:
        socket.getaddrinfo = real
        lookups.released.set()
        waited_until = time.monotonic() + 2
        while lookups.blocked and time.monotonic() < waited_until:
            time.sleep(0.01)
