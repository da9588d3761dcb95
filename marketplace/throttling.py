"""Rate limits per agent and per owner: every API key of an agent counts against the agent's one budget per scope
(counted per key, an agent's API_KEYS_PER_AGENT keys were that many budgets), an owner's tokens and admin session
against the owner's.

Every authenticated request counts against its agent's or owner's `api` budget (API_RATE_LIMIT), and against its
owner's total (API_RATE_LIMIT_PER_OWNER: the owner's own requests and all its agents' together); a request without
a credential to a route that names no scope counts against its client's `anonymous` budget (RATE_LIMIT_ANONYMOUS).
On top of that, a view opts in to a narrower budget with `throttle_scope = "proxy"` (every method) or a mapping such as `{"POST": "payments"}`;
rates come from `REST_FRAMEWORK["DEFAULT_THROTTLE_RATES"]`, read on each request so settings can change them.
Counts live in the Django cache: set CACHE_URL to Redis in production so every process shares them. An exceeded
limit is 429 `rate_limited` with Retry-After (marketplace.errors).

Fixed windows counted with one atomic `incr` (DRF's default keeps every request's timestamp in one cache value,
which is read, rewritten and raced on each call; at thousands of calls a minute that is most of the cost). A
burst at a window's edge may reach twice the rate over a short span, which is fine for abuse control.

On Redis every budget a request counts against is counted in one round trip, by one script (`_COUNT_WINDOWS`):
Django's cache API would take two per window (its `incr` asks `EXISTS` first), so four per metered call. The
Redis client is made once per connection pool, where Django's backend builds a new one (copying redis-py's table
of ~170 reply callbacks) for every call. One throttle
class counts both of a request's budgets (`api` and the view's), so a DRF view also counts them in one round trip.

Far from its limit, a process counts a budget's window in leases (`_Lease`): it adds up to LEASE_MAX requests to
the shared count at once and serves that many from memory, so a busy key asks Redis once per LEASE_MAX requests,
not on every one (a metered call's round trip to Redis was 0.13 ms of its CPU). A lease is at most 1/64 of what
the window has left and shrinks to a single request near the limit, so the limit stays exact; what a process
leased and did not use in a window counts as used (at most LEASE_MAX - 1 requests per process and budget).
"""

import ipaddress
import math
import threading
import time
from dataclasses import dataclass
from functools import lru_cache

import redis

from django.core.cache import DEFAULT_CACHE_ALIAS, caches
from django.core.cache.backends.redis import RedisCache
from rest_framework.settings import api_settings
from rest_framework.throttling import ScopedRateThrottle


@lru_cache(maxsize=32)
def _parsed(rate: str) -> tuple[int, int]:
    return ScopedRateThrottle().parse_rate(rate)


LEASE_MAX = 16
LEASE_SHARE = 64  # a lease takes at most this fraction (1/64) of what its window has left


@dataclass
class _Lease:
    """Requests this process counted in a budget's window ahead of serving them."""

    window_key: str
    left: int  # counted in Redis, not served yet
    count: int  # the window's count as Redis last answered it


_leases: dict[str, _Lease] = {}  # budget key -> its lease in the current window
_LEASES_KEPT = 10_000
_leases_lock = threading.Lock()


def windows_wait(budgets: list[tuple[str, str]]) -> int | None:
    """Count one request against each (key, scope) budget: None while within all of them, else the seconds until
    the last exceeded window ends (Retry-After)."""
    now = time.time()
    windows = []  # (budget key, window key, limit, window, duration)
    for key, scope in budgets:
        limit, duration = _parsed(api_settings.DEFAULT_THROTTLE_RATES[scope])
        window = int(now // duration)
        windows.append((key, f"{key}:{window}", limit, window, duration))
    backend = caches[DEFAULT_CACHE_ALIAS]
    if isinstance(backend, RedisCache):
        exceeded = _redis_exceeded(backend, windows)
    else:
        exceeded = [(window, duration) for _, window_key, limit, window, duration in windows
                    if _cache_count(backend, window_key, duration + 1) > limit]
    waits = [math.ceil((window + 1) * duration - now) for window, duration in exceeded]
    return max(waits) if waits else None


def _redis_exceeded(backend: RedisCache, windows: list[tuple]) -> list[tuple[int, int]]:
    """The (window, duration) of the budgets this request exceeds, counting it from the process's leases where
    they have requests left and in one round trip to Redis for the others."""
    asked = []  # (budget key, window key, limit, window, duration, requests counted)
    with _leases_lock:
        for budget in windows:
            key, window_key, limit = budget[:3]
            lease = _leases.get(key)
            if lease is not None and lease.window_key == window_key and lease.left:
                lease.left -= 1
                continue
            known = lease.count if lease is not None and lease.window_key == window_key else limit
            asked.append((*budget, max(1, min(LEASE_MAX, (limit - known) // LEASE_SHARE))))
    if not asked:
        return []
    counts = _redis_counts(backend, [(window_key, duration + 1, size)
                                     for _, window_key, _, _, duration, size in asked])
    exceeded = []
    with _leases_lock:
        if len(_leases) > _LEASES_KEPT:
            _leases.clear()  # the keys of past windows; a live lease dropped here counts as used
        for (key, window_key, limit, window, duration, size), count in zip(asked, counts, strict=True):
            first = count - size + 1  # this request's place in the window; the lease's others follow it
            _leases[key] = _Lease(window_key, left=max(0, min(count, limit) - first), count=count)
            if first > limit:
                exceeded.append((window, duration))
    return exceeded


# Per key: add its lease, and give a window its expiry when this request created it (ARGV: per key, the lease's
# size, then the TTL).
_COUNT_WINDOWS = """
local counts = {}
for i, key in ipairs(KEYS) do
  local size = tonumber(ARGV[2 * i - 1])
  counts[i] = redis.call('INCRBY', key, size)
  if counts[i] == size then redis.call('EXPIRE', key, ARGV[2 * i]) end
end
return counts
"""


@lru_cache(maxsize=8)
def _window_counter(pool):
    """The counting script on a client of `pool` (made once: see the module's note)."""
    return redis.Redis(connection_pool=pool).register_script(_COUNT_WINDOWS)


def _redis_counts(backend: RedisCache, windows: list[tuple[str, int, int]]) -> list[int]:
    """Add (window key, TTL, requests) to each window's count: the counts after."""
    keys = [backend.make_and_validate_key(window_key) for window_key, _, _ in windows]
    pool = backend._cache._get_connection_pool(write=True)
    return _window_counter(pool)(keys=keys, args=[value for _, ttl, size in windows for value in (size, ttl)])


def _cache_count(backend, window_key: str, ttl: int) -> int:
    try:
        return backend.incr(window_key)
    except ValueError:  # the window's first request (add is atomic: a concurrent first one then increments)
        return 1 if backend.add(window_key, 1, timeout=ttl) else backend.incr(window_key)


def client_address(request) -> str:
    """The client's address, as the rate limits count it: the socket's peer, or behind TRUSTED_PROXY_COUNT reverse
    proxies the address the outermost trusted one appended to X-Forwarded-For (what a client writes there itself
    is never taken)."""
    return _ADDRESSES.get_ident(request)


def client_network(request) -> str:
    """Who the client is, for counting it (rate limits without a credential, the admin's failed logins, the web
    threads waiting on its request bodies): its address (`client_address`), or for IPv6 the /64 the address is in,
    written as the /64's first address (an address still, as the failed logins' column wants). A host is usually
    given a whole /64 and can send from any of its 2^64 addresses: counted per address, each would be a client of
    its own. An IPv4 address written as IPv6 (`::ffff:192.0.2.1`) is that IPv4 address."""
    address = client_address(request)
    try:
        parsed = ipaddress.ip_address(address)
    except ValueError:  # not an address (a trusted proxy's header gave something else): counted as written
        return address
    if parsed.version == 4:
        return address
    if parsed.ipv4_mapped is not None:
        return str(parsed.ipv4_mapped)
    return str(ipaddress.IPv6Network((parsed, 64), strict=False).network_address)


_ADDRESSES = ScopedRateThrottle()


def agent_budget_key(scope: str, agent_id) -> str:
    """The agent's budget for `scope`, which every API key of the agent counts against: keys do not multiply it."""
    return ScopedRateThrottle.cache_format % {"scope": scope, "ident": f"agent:{agent_id}"}


OWNER_SCOPE = "owner_api"
# Requests without a credential to a route that names no scope of its own (an invocation's state, the network
# configuration), counted per client (`client_network`). Health probes opt out (`throttle_classes = []`).
ANONYMOUS_SCOPE = "anonymous"
# Scopes whose budget an owner's agents share with the owner, as its tokens do: each request of them makes the
# platform post to URLs the agents chose, anyone's.
OWNER_SHARED_SCOPES = frozenset({"webhook_sends"})


def owner_budget(owner_id, scope: str = OWNER_SCOPE) -> tuple[str, str]:
    """The (key, scope) of what an owner and all its agents spend together: `owner_api` (API_RATE_LIMIT_PER_OWNER;
    counted per agent only, an owner creating AGENTS_PER_OWNER agents had that many `api` budgets), or a scope of
    OWNER_SHARED_SCOPES (the owner's own budget of it)."""
    return ScopedRateThrottle.cache_format % {"scope": scope, "ident": f"user:{owner_id}"}, scope


def agent_budgets(*, agent_id, owner_id, scopes: tuple[str, ...]) -> list[tuple[str, str]]:
    """The budgets an agent's request counts against: the agent's for each of `scopes`, and its owner's."""
    return [*((agent_budget_key(scope, agent_id), scope) for scope in scopes), owner_budget(owner_id)]


# Failed authentications (a bearer secret no credential has) per client (`client_network`): RATE_LIMIT_AUTH_FAILURES.
AUTH_FAILURES_SCOPE = "auth_failures"
# Client -> when (time.time()) its spent budget of failed authentications frees it, as this process learnt it.
_refused_until: dict[str, float] = {}
_REFUSED_KEPT = 10_000


def authentication_failure_count(request) -> int | None:
    """Count a failed authentication against the client's budget: None while within it, else the seconds until it
    may authenticate again, every request of it refused meanwhile (`authentication_refused_wait`)."""
    client = client_network(request)
    wait = windows_wait([(ScopedRateThrottle.cache_format % {"scope": AUTH_FAILURES_SCOPE, "ident": client},
                          AUTH_FAILURES_SCOPE)])
    if wait is not None:
        if len(_refused_until) > _REFUSED_KEPT:
            _refused_until.clear()  # a refusal dropped here is learnt again from the client's next failure
        _refused_until[client] = time.time() + wait
    return wait


def authentication_refused_wait(request) -> int | None:
    """The seconds until a client that spent its budget of failed authentications may authenticate again, else None:
    refused whatever it presents, a right guess included, which would otherwise tell a guesser it found a secret.

    Kept per process, learnt from the client's own failures (each process that answers one counts it in the shared
    budget): no read of the cache, so a valid key's call costs one test of an empty dict and no round trip. A client
    spread over N processes gets at most N failures past its budget before all of them refuse it."""
    if not _refused_until:
        return None
    client = client_network(request)
    until = _refused_until.get(client)
    if until is None:
        return None
    wait = math.ceil(until - time.time())
    if wait <= 0:
        _refused_until.pop(client, None)
        return None
    return wait


class CredentialRateThrottle(ScopedRateThrottle):
    """A request's budgets, counted together (`windows_wait`): the credential's `api` budget and its owner's total
    when the request carries one, the view's own scope when it names one, else the client's `anonymous` budget."""

    def scope_for(self, request, view) -> str | None:
        scope = getattr(view, self.scope_attr, None)
        return scope.get(request.method) if isinstance(scope, dict) else scope

    def allow_request(self, request, view):
        authenticated = request.auth is not None or request.user.is_authenticated
        scopes = ["api"] if authenticated else []
        scope = self.scope_for(request, view)
        if scope:
            scopes.append(scope)
        if not scopes:  # a route answering anyone, called without a credential: per client
            scopes.append(ANONYMOUS_SCOPE)
        budgets = [(self.budget_key(request, name), name) for name in scopes]
        if authenticated:  # an agent's key or its owner's credentials: the owner's total too
            budgets.append(owner_budget(request.user.pk))
        if getattr(request.auth, "agent_id", None) is not None:  # an owner's credentials count there already
            budgets += [owner_budget(request.user.pk, name) for name in scopes if name in OWNER_SHARED_SCOPES]
        self.window_ends = windows_wait(budgets)
        return self.window_ends is None

    def wait(self):
        return self.window_ends

    def budget_key(self, request, scope: str) -> str:
        # The agent, not its key nor its owner: two agents of one owner have separate budgets, two keys of one agent
        # share one. An owner's tokens and session share the owner's.
        agent_id = getattr(request.auth, "agent_id", None)
        if agent_id is not None:
            return agent_budget_key(scope, agent_id)
        if request.user and request.user.is_authenticated:
            ident = f"user:{request.user.pk}"
        else:
            ident = client_network(request)
        return self.cache_format % {"scope": scope, "ident": ident}
