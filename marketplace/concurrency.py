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
    """How many of this process's threads may wait on peers that are slow: an upstream answering slowly, a client
    reading its answer slowly (whatever a call waits on).

    Why: a thread waiting on a peer serves no one else, and a peer can keep it waiting up to the call's timeout.
    A buyer calling a slow upstream (its own, say, whose timeouts are not charged) held as many web threads as it
    made calls at once, and the other buyers' calls waited for a thread. A call to a peer found slow is therefore
    admitted only while that peer has fewer than `settings.<per_peer>` calls waiting on it here and peers found slow
    have fewer than `settings.<in_all>` in all; otherwise it is refused at once (`Busy` with `code`), before any
    work. A call waits on its peer from `admit` to `end()`, but for the time it waits on another (from `pause()` to
    `resume()`): a metered proxy's call waits on its seller while it reads the upstream's answer and on its buyer
    while the server hands the answer over, each at its own pace, and neither is held to the other's share. A peer
    counts as slow while one of its calls has waited on it longer than `settings.<slow_after>` seconds in all, and
    for `settings.<remember>` seconds after such a call ended (a timeout included); only time clears it, so a fast
    answer now and then does not. Calls to other peers are never refused, however many wait at once: a fast peer
    under a burst (16 callers on one agreement) is not held to a slow peer's share. A limit of 0: no limit.

    SlowPeers made `alongside` another share its bound in all (and its lock): the calls waiting on either's slow
    peers count together, so that slow peers of both kinds hold no more threads than one kind could."""

    def __init__(self, name: str, *, code: str, slowly: str, slow_after: str, remember: str, per_peer: str,
                 in_all: str, alongside: "SlowPeers | None" = None):
        self.name, self.code, self.slowly = name, code, slowly  # slowly: what the peer does slowly, for its refusal
        self._settings = (slow_after, remember, per_peer, in_all)
        self._calls: dict[object, set[PeerWait]] = {}  # peer -> its calls admitted and not ended, paused or not
        self._slow_until: dict[object, float] = {}  # peer -> until when it counts as slow
        if alongside is None:
            self._lock = threading.Lock()
            self._slow_calls: set[PeerWait] = set()  # calls admitted to peers found slow, not ended, paused or not
            self._kinds = [f"{name}s"]
        else:
            self._lock, self._slow_calls, self._kinds = alongside._lock, alongside._slow_calls, alongside._kinds
            self._kinds.append(f"{name}s")
        self._shed = REQUESTS_SHED.labels(bulkhead=name)

    def admit(self, peer: object, *, waiting: bool = True) -> "PeerWait":
        """A call to `peer`, admitted (its wait ends with `end()`, or with the block when used in `with`), or
        `Busy` at once. `waiting=False`: admitted now, waiting on the peer only from `resume()`."""
        now = time.monotonic()
        wait = PeerWait(self, peer, now if waiting else None)
        slow_after = wait.slow_after
        with self._lock:
            calls = self._calls.get(peer)
            if self._slow_until.get(peer, 0.0) > now or (
                    calls is not None and any(call.waited_by(now) > slow_after for call in calls)):
                per_peer, in_all = getattr(settings, self._settings[2]), getattr(settings, self._settings[3])
                waiting_on_it = sum(call.began is not None for call in calls or ())
                if 0 < per_peer <= waiting_on_it:
                    raise self._busy(f"it has as many calls waiting on it here as it may ({waiting_on_it}).")
                slow_waiting = sum(call.began is not None for call in self._slow_calls)
                if 0 < in_all <= slow_waiting:
                    raise self._busy(f"slow {' and '.join(self._kinds)} have as many calls waiting here as they may "
                                     f"({slow_waiting}).")
                self._slow_calls.add(wait)
            if calls is None:
                calls = self._calls[peer] = set()
            calls.add(wait)
        return wait

    def _end(self, wait: "PeerWait") -> None:
        peer, ended = wait.peer, time.monotonic()
        with self._lock:
            if wait.ended:
                return
            wait.ended = True
            calls = self._calls[peer]
            calls.discard(wait)
            if not calls:
                del self._calls[peer]
            self._slow_calls.discard(wait)
            if wait.waited_by(ended) > wait.slow_after:
                if len(self._slow_until) > 10_000:  # forget the peers no longer slow
                    self._slow_until = {key: until for key, until in self._slow_until.items() if until > ended}
                self._slow_until[peer] = ended + getattr(settings, self._settings[1])

    def _busy(self, why: str) -> Busy:
        self._shed.inc()
        return Busy(f"This {self.name} is {self.slowly} and {why} Retry shortly; nothing was charged.",
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
    """One call admitted by `SlowPeers.admit`, waiting on its peer until `end()` (idempotent), but from `pause()` to
    `resume()`.

    Pausing and resuming take no lock: the call's own thread alone writes `began` and `waited`, and others read
    `began` first (one attribute, written last on pause), so that they never add a pause's time twice."""

    __slots__ = ("peers", "peer", "began", "waited", "slow_after", "ended")

    def __init__(self, peers: SlowPeers, peer: object, began: float | None):
        self.peers, self.peer, self.ended = peers, peer, False
        self.began = began  # when it would have begun, had it waited without pauses; None while paused
        self.waited = 0.0  # seconds it waited before its pause; read while paused only
        self.slow_after = getattr(settings, peers._settings[0])

    def waited_by(self, now: float) -> float:
        """Seconds it has waited on its peer by `now`."""
        began = self.began
        return self.waited if began is None else now - began

    def pause(self) -> None:
        """The call waits on something else now (a paused call is neither counted nor aging for its peer)."""
        began = self.began
        if began is not None:
            self.waited = time.monotonic() - began
            self.began = None

    def resume(self) -> None:
        if self.began is None:
            self.began = time.monotonic() - self.waited

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
