"""What the metered proxy reads on every call and may see a second late (an API key, an agreement's terms): cached
per process for CREDENTIAL_CACHE_SECONDS, so a revocation or a changed upstream takes effect within that time."""

import threading
import time

from cachetools import TTLCache, cached
from django.conf import settings


def for_a_second(*, key):
    """Decorator: the function's answers (None included) kept per process for CREDENTIAL_CACHE_SECONDS, by `key`."""
    return cached(TTLCache(maxsize=10_000, ttl=settings.CREDENTIAL_CACHE_SECONDS, timer=time.monotonic),
                  key=key, lock=threading.Lock())
