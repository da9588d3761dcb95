"""A per-process limit on how many requests of one kind run at once (a bulkhead), for work whose cost is CPU in the
database: beyond the limit a request waits its turn, briefly, and past that is refused with 503 and Retry-After.

Why: a search costs PostgreSQL 2-5 ms of CPU at 100,000 services. When more searches run at once than the database
has cores, each takes longer, and the slowest far longer: on a two-core host serving search beside the web server
from three worker processes, four searches at once kept every query type's p99 under 50 ms in 1 of 8 runs, one per
process (three at once) in 8 of 9 (bench/catalog_search.py; bench/HISTORY.md). Queueing the rest in the process
keeps the ones running fast. Requests that only wait on I/O, like the metered proxy's, are not limited by it.

The waiting is bounded twice, so that a burst of one kind cannot hold the worker's threads that other requests
need: a request waits at most the setting's seconds, and no more than the setting's count wait at once; either way it
is answered 503 with its code and `Retry-After`.

`SlowPeers` bounds how many threads may wait on peers found slow, so that a slow peer cannot take them all.

`PeerSlots` bounds how many threads may wait on one peer, and on all, at once, never waiting for a slot.

`Deadlines` bounds blocking socket reads in all, where a socket's timeout bounds each read only.
"""

import heapq
import itertools
import os
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

from django.conf import settings

from marketplace.errors import DependencyUnavailable
from marketplace.metrics import REQUESTS_SHED


class Busy(DependencyUnavailable):
    retry_after = 1


class Bulkhead:
    """At most `settings.<limit>` holders of a slot at a time in this process (0: no limit); others wait for one, up
    to `settings.<wait_seconds>` seconds and `settings.<waiting_max>` waiting at once, else `Busy` with `code`.
    Waiters are woken in the order they came (threading.Condition), though one arriving as a slot frees may take it
    first."""

    def __init__(self, name: str, *, code: str = "", limit: str, wait_seconds: str = "", waiting_max: str = ""):
        self.name, self.code = name, code
        self._settings = (limit, wait_seconds, waiting_max)  # the last two: for `slot`, which waits
        self._condition = threading.Condition()
        self._running = 0
        self._waiting = 0
        self._shed = REQUESTS_SHED.labels(bulkhead=name)

    @contextmanager
    def slot(self) -> Iterator[None]:
        limit, wait_seconds, waiting_max = (getattr(settings, name) for name in self._settings)
        if limit <= 0:
            yield
            return
        with self._condition:
            if self._running >= limit:
                if self._waiting >= waiting_max:
                    raise self._busy(f"{self._waiting} {self.name} requests are already waiting here.")
                self._waiting += 1
                try:
                    free = self._condition.wait_for(lambda: self._running < limit, timeout=wait_seconds)
                finally:
                    self._waiting -= 1
                if not free:
                    raise self._busy(f"No {self.name} slot freed within {wait_seconds:g} s.")
            self._running += 1
        try:
            yield
        finally:
            with self._condition:
                self._running -= 1
                self._condition.notify()

    @contextmanager
    def slot_if_free(self) -> Iterator[bool]:
        """A slot if one is free now (True), else False at once, never waiting: for work that can go elsewhere."""
        limit = getattr(settings, self._settings[0])
        with self._condition:
            held = limit <= 0 or self._running < limit
            if held:
                self._running += 1
        try:
            yield held
        finally:
            if held:
                with self._condition:
                    self._running -= 1
                    self._condition.notify()

    def _busy(self, why: str) -> Busy:
        self._shed.inc()
        return Busy(f"Too many {self.name} requests at once on this server: {why} Retry shortly.", code=self.code,
                    details={"retry_after_seconds": Busy.retry_after})


class SlowPeers:
    """How many of this process's threads may wait on peers that answer slowly (an upstream a call waits on).

    Why: a thread waiting on a peer serves no one else, and a peer can keep it waiting up to the call's timeout.
    A buyer calling a slow upstream (its own, say, whose timeouts are not charged) held as many web threads as it
    made calls at once, and the other buyers' calls waited for a thread. A call to a peer found slow is therefore
    admitted only while that peer has fewer than `settings.<per_peer>` calls waiting here and peers found slow
    have fewer than `settings.<in_all>` in all; otherwise it is refused at once (`Busy` with `code`), before any
    work. A call waits from `admit` to `end()` (for the metered proxy: until its answer's body is read). A peer
    counts as slow while one of its calls has waited longer than `settings.<slow_after>` seconds, and
    for `settings.<remember>` seconds after such a call ended (a timeout included); only time clears it, so a fast
    answer now and then does not. Calls to other peers are never refused, however many wait at once: a fast peer
    under a burst (16 callers on one agreement) is not held to a slow peer's share. A limit of 0: no limit."""

    def __init__(self, name: str, *, code: str, slow_after: str, remember: str, per_peer: str, in_all: str):
        self.name, self.code = name, code
        self._settings = (slow_after, remember, per_peer, in_all)
        self._lock = threading.Lock()
        self._waiting: dict[object, dict[object, float]] = {}  # peer -> {call: when it began}, oldest first
        self._slow_until: dict[object, float] = {}  # peer -> until when it counts as slow
        self._slow_waiting = 0  # calls admitted to peers found slow, still waiting
        self._shed = REQUESTS_SHED.labels(bulkhead=name)

    def admit(self, peer: object) -> "PeerWait":
        """A call to `peer`, admitted (its wait ends with `end()`, or with the block when used in `with`), or
        `Busy` at once."""
        wait = PeerWait(self, peer)
        self._admit(wait)
        return wait

    def _admit(self, wait: "PeerWait") -> None:
        peer, began, slow_after = wait.peer, wait.began, wait.slow_after
        with self._lock:
            calls = self._waiting.get(peer)
            if self._slow_until.get(peer, 0.0) > began or (
                    calls is not None and began - next(iter(calls.values())) > slow_after):
                per_peer, in_all = getattr(settings, self._settings[2]), getattr(settings, self._settings[3])
                if 0 < per_peer <= len(calls or ()):
                    raise self._busy(f"it has as many calls waiting here as it may ({len(calls)}).")
                if 0 < in_all <= self._slow_waiting:
                    raise self._busy(f"slow {self.name}s have as many calls waiting here as they may "
                                     f"({self._slow_waiting}).")
                self._slow_waiting += 1
                wait.counted = True
            if calls is None:
                calls = self._waiting[peer] = {}
            calls[wait] = began

    def _end(self, wait: "PeerWait") -> None:
        peer, ended = wait.peer, time.monotonic()
        with self._lock:
            if wait.ended:
                return
            wait.ended = True
            calls = self._waiting[peer]
            del calls[wait]
            if not calls:
                del self._waiting[peer]
            if wait.counted:
                self._slow_waiting -= 1
            if ended - wait.began > wait.slow_after:
                if len(self._slow_until) > 10_000:  # forget the peers no longer slow
                    self._slow_until = {key: until for key, until in self._slow_until.items() if until > ended}
                self._slow_until[peer] = ended + getattr(settings, self._settings[1])

    def _busy(self, why: str) -> Busy:
        self._shed.inc()
        return Busy(f"This {self.name} is answering slowly and {why} Retry shortly; nothing was charged.",
                    code=self.code, details={"retry_after_seconds": Busy.retry_after})


class PeerSlots:
    """At most `settings.<per_peer>` slots held at once per peer and `settings.<in_all>` in all, in this process; a
    request for one beyond either is refused at once (`Busy` with `code`), never waiting: for waits that may never
    end (a client that stops sending its request's body), where a waiting request would hold a thread as well. A
    limit of 0: no limit."""

    def __init__(self, name: str, *, code: str, per_peer: str, in_all: str):
        self.name, self.code = name, code
        self._settings = (per_peer, in_all)
        self._lock = threading.Lock()
        self._held: dict[object, int] = {}  # peer -> slots it holds
        self._held_in_all = 0
        self._shed = REQUESTS_SHED.labels(bulkhead=name)

    def take(self, peer: object) -> "PeerSlot":
        per_peer, in_all = (getattr(settings, name) for name in self._settings)
        with self._lock:
            held = self._held.get(peer, 0)
            if 0 < per_peer <= held:
                raise self._busy(f"this client already has {held} of them under way here.")
            if 0 < in_all <= self._held_in_all:
                raise self._busy(f"{self._held_in_all} of them are already under way here.")
            self._held[peer] = held + 1
            self._held_in_all += 1
        return PeerSlot(self, peer)

    def _give_back(self, peer: object) -> None:
        with self._lock:
            held = self._held.pop(peer) - 1
            if held:
                self._held[peer] = held
            self._held_in_all -= 1

    def _busy(self, why: str) -> Busy:
        self._shed.inc()
        return Busy(f"Too many {self.name} at once on this server: {why} Retry shortly.", code=self.code,
                    details={"retry_after_seconds": Busy.retry_after})


class PeerSlot:
    """One slot of `PeerSlots.take`, held until `give_back()` (idempotent)."""

    __slots__ = ("slots", "peer", "held")

    def __init__(self, slots: PeerSlots, peer: object):
        self.slots, self.peer, self.held = slots, peer, True

    def give_back(self) -> None:
        if self.held:
            self.held = False
            self.slots._give_back(self.peer)


class PeerWait:
    """One call admitted by `SlowPeers.admit`, waiting on its peer until `end()` (idempotent)."""

    __slots__ = ("peers", "peer", "began", "slow_after", "counted", "ended")

    def __init__(self, peers: SlowPeers, peer: object):
        self.peers, self.peer, self.counted, self.ended = peers, peer, False, False
        self.slow_after = getattr(settings, peers._settings[0])
        self.began = time.monotonic()

    def end(self) -> None:
        self.peers._end(self)

    def __enter__(self) -> "PeerWait":
        return self

    def __exit__(self, exc_type, exc, traceback) -> None:
        self.end()


class Deadlines:
    """Cuts off a socket still in use past its deadline: `with deadlines.bound(sock, seconds): <blocking reads>`
    raises TimeoutError when the reads took longer than `seconds` in all (an upstream sending its answer a byte at a
    time passes every per-read timeout). Overdue, the socket is shut down, so the blocked read returns at once; the
    caller must then close it.

    One watchdog thread per process serves every bound, so that a bound costs a few microseconds (a heap push and
    a flag) rather than a thread of its own. It starts on first use in each process: a server that forks its
    workers after import gets one per worker, never a copy of the parent's, which does not survive the fork."""

    def __init__(self, name: str):
        self.name = name
        self._reset()
        os.register_at_fork(after_in_child=self._reset)  # the parent's lock may have been held as it forked

    def _reset(self) -> None:
        self._condition = threading.Condition()
        self._heap: list[tuple[float, int, Bound]] = []  # (deadline, order, bound); ended bounds left to pop
        self._order = itertools.count()
        self._wakes_at = float("inf")  # when the watchdog looks next: a later deadline need not wake it
        self._pid = 0  # the process whose watchdog runs

    def bound(self, sock: socket.socket, seconds: float) -> "Bound":
        return Bound(self, sock, seconds)

    def _add(self, bound: "Bound", deadline: float) -> None:
        with self._condition:
            if self._pid != os.getpid():  # first use in this process (also after a fork not through os.fork)
                self._pid = os.getpid()
                threading.Thread(target=self._watch, name=f"deadlines-{self.name}", daemon=True).start()
            heapq.heappush(self._heap, (deadline, next(self._order), bound))
            if deadline < self._wakes_at:
                self._condition.notify()

    def _end(self, bound: "Bound") -> bool:
        """Whether the bound was cut off."""
        with self._condition:
            bound.ended = True
            heap = self._heap
            while heap and heap[0][2].ended:  # calls mostly end in the order they began: the heap stays small
                heapq.heappop(heap)
            return bound.cut

    def _watch(self) -> None:
        with self._condition:
            while True:
                now, heap = time.monotonic(), self._heap
                while heap and (heap[0][2].ended or heap[0][0] <= now):
                    overdue = heapq.heappop(heap)[2]
                    if not overdue.ended:
                        overdue.cut = True
                        # Under the lock, so the owner cannot close the socket (and its descriptor be reused)
                        # meanwhile. The plain socket's shutdown: an SSLSocket's would drop its TLS state under
                        # the reading thread.
                        try:
                            socket.socket.shutdown(overdue.sock, socket.SHUT_RDWR)
                        except OSError:
                            pass  # closed already
                self._wakes_at = heap[0][0] if heap else float("inf")
                self._condition.wait(None if not heap else self._wakes_at - now)


class Bound:
    """One `Deadlines.bound`: a context manager."""

    __slots__ = ("deadlines", "sock", "seconds", "ended", "cut")

    def __init__(self, deadlines: Deadlines, sock: socket.socket, seconds: float):
        self.deadlines, self.sock, self.seconds = deadlines, sock, seconds
        self.ended = self.cut = False

    def __enter__(self) -> "Bound":
        self.deadlines._add(self, time.monotonic() + self.seconds)
        return self

    def __exit__(self, exc_type, exc, traceback) -> None:
        if self.deadlines._end(self):  # whatever the reads raised, or returned as the cut came, is its doing
            raise TimeoutError(f"{self.deadlines.name}: not done within {self.seconds:g} s") from exc
