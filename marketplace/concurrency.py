"""A per-process limit on how many requests of one kind run at once (a bulkhead), for work whose cost is CPU in the
database: beyond the limit a request waits its turn, briefly, and past that is refused with 503 and Retry-After.

Why: a search costs PostgreSQL 2-5 ms of CPU at 100,000 services. When more searches run at once than the database
has cores, each takes longer, and the slowest far longer: on a two-core host serving search beside the web server
from three worker processes, four searches at once kept every query type's p99 under 50 ms in 1 of 8 runs, one per
process (three at once) in 8 of 9 (bench/catalog_search.py; bench/HISTORY.md). Queueing the rest in the process
keeps the ones running fast. Requests that only wait on I/O, like the metered proxy's, are not limited.

The waiting is bounded twice, so that a burst of one kind cannot hold the worker's threads that other requests
need: a request waits at most the setting's seconds, and no more than the setting's count wait at once; either way it
is answered 503 with its code and `Retry-After`.
"""

import threading
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

    def __init__(self, name: str, *, code: str, limit: str, wait_seconds: str, waiting_max: str):
        self.name, self.code = name, code
        self._settings = (limit, wait_seconds, waiting_max)
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

    def _busy(self, why: str) -> Busy:
        self._shed.inc()
        return Busy(f"Too many {self.name} requests at once on this server: {why} Retry shortly.", code=self.code,
                    details={"retry_after_seconds": Busy.retry_after})
