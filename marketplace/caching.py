"""What the hot paths read on every request and may see a second late (an API key, an agreement's terms, a tag's
id): cached per process for CREDENTIAL_CACHE_SECONDS, so a revocation, a changed upstream or a renamed tag takes
effect within that time. And the check that the cache shared by every process (Django's default) is one."""

import threading
import time

from cachetools import TTLCache, cached
from django.conf import settings
from django.core import checks
from django.core.cache.backends.memcached import BaseMemcachedCache
from django.core.cache.backends.redis import RedisCache
from django.utils.module_loading import import_string


def kept_for_a_second() -> TTLCache:
    """A cache whose entries are kept for CREDENTIAL_CACHE_SECONDS (not thread-safe: guard it with a lock)."""
    return TTLCache(maxsize=10_000, ttl=settings.CREDENTIAL_CACHE_SECONDS, timer=time.monotonic)


def for_a_second(*, key):
    """Decorator: the function's answers (None included) kept per process for CREDENTIAL_CACHE_SECONDS, by `key`."""
    return cached(kept_for_a_second(), key=key, lock=threading.Lock())


def shared_cache_check(app_configs=None, **kwargs) -> list[checks.CheckMessage]:
    """Deployment system check (`manage.py check --deploy`, E003): the default cache is one every process shares.
    The outbound in-flight caps (marketplace.outbound_slots), the rate limits (marketplace.throttling) and the x402
    quotes are kept there; in one each process keeps to itself (the default local-memory cache, no CACHE_URL), every
    process counted on its own and the limits silently multiplied by the processes. Deploy-only: `make run` and the
    tests run with that default, and a single-process deployment may silence it (SILENCED_SYSTEM_CHECKS)."""
    backend = import_string(settings.CACHES["default"]["BACKEND"])
    if issubclass(backend, RedisCache | BaseMemcachedCache):
        return []
    return [checks.Error(
        f"The default cache ({backend.__name__}) is not shared between processes: the outbound in-flight caps, the "
        "rate limits and the x402 quotes would each be counted per process.",
        hint="Set CACHE_URL to Redis (redis://host:6379/2).", id="marketplace.E003")]
