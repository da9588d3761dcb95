"""Beat messages a run of their task has made needless, dropped unrun.

Why: the beat sends each task at its period whether or not a worker took the last one. With the default queue's
workers down (a deploy, a crash) or behind (a slow node), up to a minute of them waited (their expiry, settings'
CELERY_BEAT_SCHEDULE), and once a worker was free each ran in turn: twenty full polls of the relayer's transactions,
six settlement ticks, ahead of the submissions queued behind them. Every beat task is a sweep of the database's rows,
so a run that started after a message was published did all that message asks.

Each message carries when it was published (`published_at`, stamped by marketplace.celery on every publish, a
retry's too); each run of a beat task records when it started, in the cache. A message published more than
BEAT_SUPERSEDED_MARGIN_SECONDS (clocks of the beat's host and the workers' apart) before the last start is dropped.
The record is an optimisation only: lost (Redis restarted, flushed, down), the next message runs, as before.
"""

import functools
import logging
import math
import time

from django.conf import settings
from django.core.cache import cache

logger = logging.getLogger(__name__)


@functools.cache
def _expiry_of_beat_tasks() -> dict[str, float]:
    """Each beat task's message expiry (seconds): how long its run's start is worth keeping."""
    expiries: dict[str, float] = {}
    for entry in settings.CELERY_BEAT_SCHEDULE.values():
        expiries[entry["task"]] = max(expiries.get(entry["task"], 0), entry["options"]["expires"])
    return expiries


def superseded(*, task_name: str, published_at) -> bool:
    """Whether a message of `task_name` published at `published_at` (seconds since the epoch; None: unknown) is one
    of a beat task whose run started since: then True, to be dropped. Otherwise this run's start is recorded."""
    expiry = _expiry_of_beat_tasks().get(task_name)
    if expiry is None:
        return False
    key = f"beat-run-started:{task_name}"
    try:
        started = cache.get(key)
        if (published_at is not None and started is not None
                and float(published_at) < started - settings.BEAT_SUPERSEDED_MARGIN_SECONDS):
            logger.debug("beat message dropped: a run of its task started since it was published",
                         extra={"task": task_name})
            return True
        cache.set(key, time.time(), timeout=math.ceil(expiry))
    except Exception:  # the cache is down: the message runs, as every one did
        logger.warning("beat runs not recorded: the message runs", exc_info=True)
    return False
