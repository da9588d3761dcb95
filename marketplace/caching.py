"""What the hot paths read on every request and may see a second late (an API key, an agreement's terms, a tag's
id): cached per process for CREDENTIAL_CACHE_SECONDS, so a revocation, a changed upstream or a renamed tag takes
effect within that time."""

import threading
import time

from cachetools import TTLCache, cached
from django.conf import settings


def kept_for_a_second() -> TTLCache:
    """A cache whose entries are kept for CREDENTIAL_CACHE_SECONDS (not thread-safe: guard it with a lock)."""
    return TTLCache(maxsize=10_000, ttl=settings.CREDENTIAL_CACHE_SECONDS, timer=time.monotonic)


def for_a_second(*, key):
    """Decorator: the function's answers (None included) kept per process for CREDENTIAL_CACHE_SECONDS, by `key`."""
    return cached(kept_for_a_second(), key=key, lock=threading.Lock())
