"""Resolving a host name within a time limit, on a bounded number of threads.

The system resolver (`socket.getaddrinfo`) takes no timeout: a name whose DNS server never answers, or answers
slowly, holds the caller for as long as the resolver's timeout, attempts and name servers allow (tens of seconds, and
more through a search list), past any connect timeout or deadline. Whoever chooses the name (a seller, a webhook's
receiver, the marketplace for the SDK) chooses that server.

So `BoundedResolver` asks the system resolver in a thread of its own and waits for the answer at most `timeout`
seconds (then `ResolutionTimeout`, a TimeoutError), leaving a lookup still running to end in its thread, its answer
dropped. Callers asking for the same name while its lookup runs wait for that lookup rather than start another, so a
name that never resolves holds one thread however often it is asked for. At most `threads` lookups run at once:
once all of them wait on such servers, a lookup of another name is refused at once (`ResolverBusy`, an OSError)
rather than queued behind them or given a thread more, until the system resolver gives up on one. An address (an IP
literal) needs no lookup: it is answered in the caller's thread. Nothing is cached: a lookup that ended is not
answered again, every one asks the system resolver, which honours the names' TTLs (or a caching daemon of the host
does).
"""

from __future__ import annotations

import os
import socket
import threading
from typing import Any

__all__ = ["BoundedResolver", "ResolutionTimeout", "ResolverBusy"]

AddressInfo = tuple[Any, Any, int, str, tuple[Any, ...]]  # what socket.getaddrinfo lists


class ResolutionTimeout(TimeoutError):
    """The host name was not resolved within the timeout."""


class ResolverBusy(OSError):
    """Every thread of the resolver is waiting on a lookup already: the host name was not looked up."""


class _Lookup:
    __slots__ = ("arguments", "done", "answer", "error")

    def __init__(self, arguments: tuple[Any, ...]):
        self.arguments = arguments
        self.done = threading.Event()
        self.answer: list[AddressInfo] = []
        self.error: BaseException | None = None


class BoundedResolver:
    """`socket.getaddrinfo` with a timeout (module docstring), on at most `threads` threads of this process, started
    as lookups need them and kept for the next ones."""

    def __init__(self, *, threads: int, name: str = "resolver"):
        if threads < 1:
            raise ValueError("threads must be at least 1")
        self.threads = threads
        self.name = name
        self._reset()
        # A process forked with lookups under way has none of their threads: it starts its own.
        os.register_at_fork(after_in_child=self._reset)

    def _reset(self) -> None:
        self._lock = threading.Lock()
        self._work = threading.Condition(self._lock)
        self._running: dict[tuple[Any, ...], _Lookup] = {}  # handed over and not yet answered, by their arguments
        self._waiting: list[_Lookup] = []  # handed over, not yet taken by a thread
        self._started = 0  # threads started in this process

    def getaddrinfo(self, host: str, port: int | str | None, family: int = 0, type: int = 0, proto: int = 0,
                    flags: int = 0, *, timeout: float | None) -> list[AddressInfo]:
        """What `socket.getaddrinfo` answers, within `timeout` seconds (None: as long as the system resolver takes,
        in the caller's thread). Raises `ResolutionTimeout`, `ResolverBusy` or the resolver's own error
        (`socket.gaierror`)."""
        try:  # an address: parsed, no lookup (glibc asks no server with AI_NUMERICHOST)
            return socket.getaddrinfo(host, port, family, type, proto, flags | socket.AI_NUMERICHOST)
        except socket.gaierror:
            pass
        if timeout is None:
            return socket.getaddrinfo(host, port, family, type, proto, flags)
        arguments = (host, port, family, type, proto, flags)
        with self._lock:
            lookup = self._running.get(arguments)
            if lookup is None:
                lookup = self._hand_over(arguments)
        if not lookup.done.wait(timeout):
            raise ResolutionTimeout(f"resolving {host} took longer than {timeout:.3g} s")
        if lookup.error is not None:
            raise lookup.error
        return lookup.answer

    def _hand_over(self, arguments: tuple[Any, ...]) -> _Lookup:
        """A new lookup, handed to a thread (the lock held)."""
        if len(self._running) >= self.threads:
            raise ResolverBusy(f"cannot resolve {arguments[0]} now: {len(self._running)} host names are being "
                               f"resolved already, the most this process resolves at once")
        lookup = self._running[arguments] = _Lookup(arguments)
        self._waiting.append(lookup)
        if self._started < len(self._running):  # every thread started is busy with a lookup
            self._started += 1
            threading.Thread(target=self._serve, name=f"resolver-{self.name}-{self._started}", daemon=True).start()
        else:
            self._work.notify()
        return lookup

    def _serve(self) -> None:
        while True:
            with self._lock:
                while not self._waiting:
                    self._work.wait()
                lookup = self._waiting.pop(0)
            try:
                lookup.answer = socket.getaddrinfo(*lookup.arguments)
            except BaseException as error:  # noqa: BLE001 - the callers' to raise
                lookup.error = error
            with self._lock:
                del self._running[lookup.arguments]
            lookup.done.set()

    def stream_addresses(self, host: str, port: int, *, timeout: float | None) -> list[str]:
        """The distinct addresses a TCP connection to `host` may go to, in the resolver's order of preference."""
        infos = self.getaddrinfo(host, port, type=socket.SOCK_STREAM, timeout=timeout)
        return list(dict.fromkeys(info[4][0] for info in infos))
