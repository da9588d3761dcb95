"""Rate limits per credential: each API key (or owner token) has its own budget per scope.

A view opts in with `throttle_scope = "proxy"` (every method) or a mapping such as `{"POST": "payments"}`;
rates come from `REST_FRAMEWORK["DEFAULT_THROTTLE_RATES"]`, read on each request so settings can change them.
Counts live in the Django cache: set CACHE_URL to Redis in production so every process shares them. An exceeded
limit is 429 `rate_limited` with Retry-After (marketplace.errors).
"""

from rest_framework.settings import api_settings
from rest_framework.throttling import ScopedRateThrottle


class CredentialRateThrottle(ScopedRateThrottle):
    def allow_request(self, request, view):
        scope = getattr(view, self.scope_attr, None)
        if isinstance(scope, dict):
            scope = scope.get(request.method)
        if not scope:
            return True
        self.scope = scope
        self.rate = self.get_rate()
        self.num_requests, self.duration = self.parse_rate(self.rate)
        return super(ScopedRateThrottle, self).allow_request(request, view)

    def get_rate(self):
        return api_settings.DEFAULT_THROTTLE_RATES[self.scope]

    def get_cache_key(self, request, view):
        # The credential's prefix, not the owner: two agents of one owner have separate budgets.
        prefix = getattr(request.auth, "prefix", None)
        if prefix:
            ident = f"{type(request.auth).__name__}:{prefix}"
        elif request.user and request.user.is_authenticated:
            ident = f"user:{request.user.pk}"
        else:
            ident = self.get_ident(request)
        return self.cache_format % {"scope": self.scope, "ident": ident}
