"""Prometheus metrics: the `/metrics` endpoint, scrape-time counts from the database, Celery task failures.

Request latency by route and status comes from django-prometheus' middleware
(`django_http_requests_latency_seconds_by_view_method`, `django_http_responses_total_by_status_view_method`);
each app defines its own domain metrics (agreements: proxy upstream latency and charges) and registers
collectors that count its rows by status when Prometheus scrapes (`scrape_collector_register`), so those numbers
are exact whichever process changed the rows.

Several processes (the web server's workers, Celery workers): set `PROMETHEUS_MULTIPROC_DIR` to one empty directory for
all of them on a host (see marketplace/serve.py); `/metrics` then adds up every process's counters.

`/metrics` is for operators: a staff session (its second factor verified, marketplace.second_factor), or
`Authorization: Bearer <METRICS_TOKEN>` for a scraper.
"""

import hmac
import logging
import os
from collections.abc import Callable, Iterable

from celery.signals import task_failure
from django.conf import settings
from django.core import checks
from django.db import DatabaseError
from django.http import HttpResponse, JsonResponse
from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, CollectorRegistry, Counter, generate_latest
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.multiprocess import MultiProcessCollector

from marketplace import second_factor
from marketplace.errors import AuthenticationFailuresLimited, error_body, error_response
from marketplace.throttling import authentication_failure_count, authentication_refused_wait

logger = logging.getLogger(__name__)

TASK_FAILURES = Counter("marketplace_celery_task_failures_total", "Celery tasks that raised (after any retries "
                        "they were allowed), by task name.", ["task"])


UPSTREAM_REQUESTS_RESENT = Counter(
    "marketplace_upstream_requests_resent_total", "Requests to sellers' upstreams sent again on a new connection "
    "after a kept-alive one closed unanswered (marketplace.outbound.UpstreamPool), by reason: not_written (closed "
    "before the request was written whole) or replayable (a safe method, or its own Idempotency-Key).", ["reason"])


REQUESTS_SHED = Counter(
    "marketplace_requests_shed_total", "Requests answered 503 because too many of their kind ran at once in their "
    "process (marketplace.concurrency.Bulkhead), by bulkhead.", ["bulkhead"])


def _count_task_failure(sender=None, **kwargs) -> None:
    TASK_FAILURES.labels(task=getattr(sender, "name", "unknown")).inc()


def task_failures_count() -> None:
    """Called once, from MarketplaceConfig.ready(): count every task failure."""
    task_failure.connect(_count_task_failure, dispatch_uid=__name__)


# --- scrape-time counts --------------------------------------------------------------------------------------

CountsByLabel = Callable[[], dict[tuple[str, ...], int]]
_gauges: list[tuple[str, str, tuple[str, ...], CountsByLabel]] = []


def scrape_collector_register(*, name: str, documentation: str, labels: tuple[str, ...],
                              counts: CountsByLabel) -> None:
    """Export `name{labels...}` as a gauge, computed by `counts()` (label values -> count) at each scrape."""
    _gauges.append((name, documentation, labels, counts))


class _DatabaseCounts:
    def collect(self) -> Iterable[Metric]:
        for name, documentation, labels, counts in _gauges:
            try:
                rows = counts()
            except DatabaseError:
                logger.warning("metrics: database unavailable", extra={"metric": name})
                continue
            gauge = GaugeMetricFamily(name, documentation, labels=labels)
            for values, count in sorted(rows.items()):
                gauge.add_metric(list(values), count)
            yield gauge


class _ThisProcess:
    def collect(self) -> Iterable[Metric]:
        return REGISTRY.collect()


def _registry() -> CollectorRegistry:
    registry = CollectorRegistry()
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        MultiProcessCollector(registry)
    else:
        registry.register(_ThisProcess())
    registry.register(_DatabaseCounts())
    return registry


METRICS_TOKEN_MIN_LENGTH = 32  # as long as `secrets.token_urlsafe(24)`'s: 192 random bits


def metrics_token_check(app_configs=None, **kwargs) -> list[checks.CheckMessage]:
    """Deployment system check (E005): METRICS_TOKEN, when set, is long enough not to be guessed. Wrong tokens are
    budgeted per client (RATE_LIMIT_AUTH_FAILURES), but a client with many addresses has that budget on each."""
    token = settings.METRICS_TOKEN
    if not token or len(token) >= METRICS_TOKEN_MIN_LENGTH:
        return []
    return [checks.Error(
        f"METRICS_TOKEN is {len(token)} characters: a token under {METRICS_TOKEN_MIN_LENGTH} may be guessed by a "
        "client with many addresses.",
        hint='Generate one: python -c "import secrets; print(secrets.token_urlsafe(32))".', id="marketplace.E005")]


def _presented_token(request) -> str | None:
    scheme, _, token = request.headers.get("Authorization", "").partition(" ")
    return token.strip() if scheme.lower() == "bearer" else None


def _authorized(request) -> bool:
    token = _presented_token(request)
    if settings.METRICS_TOKEN and token is not None:
        return hmac.compare_digest(token.encode(), settings.METRICS_TOKEN.encode())
    user = request.user
    return user.is_authenticated and user.is_staff and second_factor.session_verified(user)


def metrics_view(request):
    """A wrong bearer token (METRICS_TOKEN is the operator's choice, perhaps a guessable one) counts against the
    client's budget of failed authentications, as a wrong API key does (marketplace.throttling)."""
    wait = authentication_refused_wait(request)
    if wait is None and not _authorized(request):
        wait = authentication_failure_count(request) if _presented_token(request) is not None else None
        if wait is None:
            return JsonResponse(error_body("operator_required", "Metrics are for operators: a staff session (its "
                                           "second factor verified) or `Authorization: Bearer <METRICS_TOKEN>`."),
                                status=403)
    if wait is not None:
        return error_response(AuthenticationFailuresLimited(wait))
    return HttpResponse(generate_latest(_registry()), content_type=CONTENT_TYPE_LATEST)
