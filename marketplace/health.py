"""`/healthz` (liveness: the process answers, no dependency is touched) and `/readyz` (readiness: the database,
the Celery broker and the chain RPC answer, each within READINESS_TIMEOUT_SECONDS, checked in parallel, and the
chain indexer is at most INDEXER_MAX_LAG_BLOCKS behind the chain head; under PAYOUT_HEAD_TAG the node answers its
tagged block, without which no payout or refund of the treasury is ever sent).

A load balancer stops routing to an instance whose `/readyz` is 503; an orchestrator restarts one whose
`/healthz` does not answer. The 503 names the dependencies that failed (details go to the log, not to the
unauthenticated caller). A run's answer is kept READINESS_CACHE_SECONDS per process (`readiness_shared`). Apps add
their own dependencies with `readiness_check_register` (escrow: the chain, the indexer's lag, the payouts' finality
tag and the relayer keys; agreements: the receipt signer keys the open escrows name).
"""

import contextvars
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from django.conf import settings
from django.db import connections
from drf_spectacular.utils import OpenApiResponse, extend_schema, inline_serializer
from rest_framework import serializers
from rest_framework.permissions import AllowAny
from rest_framework.response import Response
from rest_framework.views import APIView

from marketplace.errors import error_body
from marketplace.serializers import ErrorSerializer

logger = logging.getLogger(__name__)

Check = Callable[[float], None]  # raises when the dependency is not usable; gets the timeout in seconds
_checks: dict[str, Check] = {}


def readiness_check_register(*, name: str, check: Check) -> None:
    _checks[name] = check


def _database(timeout: float) -> None:
    with connections["default"].cursor() as cursor:
        cursor.execute("SELECT 1")


def _broker(timeout: float) -> None:
    from marketplace.celery import app

    with app.connection_for_write(url=settings.CELERY_BROKER_URL, connect_timeout=timeout) as connection:
        connection.ensure_connection(max_retries=1, interval_start=0, timeout=timeout)


readiness_check_register(name="database", check=_database)
readiness_check_register(name="broker", check=_broker)


def readiness() -> dict[str, str]:
    """{dependency: "ok" | "failed" | "timeout"}; never waits much longer than the timeout."""
    timeout = settings.READINESS_TIMEOUT_SECONDS
    results: dict[str, str] = {}

    def run(name: str, check: Check) -> None:
        try:
            check(timeout)
            results[name] = "ok"
        except Exception as exc:  # noqa: BLE001 - any failure means not ready
            logger.warning("readiness check failed", extra={"dependency": name, "error": repr(exc)[:500]})
            results[name] = "failed"
        finally:
            # The connections this thread opened, whatever the check read: left to the garbage collector, every
            # probe kept one open on the database for minutes.
            connections.close_all()

    # Daemon threads: a dependency that hangs past its own timeouts cannot hold the answer or the process.
    threads = [threading.Thread(target=contextvars.copy_context().run, args=(run, *item), daemon=True)
               for item in _checks.items()]  # each in a copy of this context: its log lines keep the request id
    deadline = time.monotonic() + timeout
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(max(0.0, deadline - time.monotonic()))
    return {name: results.get(name, "timeout") for name in _checks}


@dataclass(frozen=True)
class _Run:
    finished_at: float  # time.monotonic()
    checks: dict[str, str]


_last_run: _Run | None = None
_run_lock = threading.Lock()


def readiness_shared() -> dict[str, str]:
    """`readiness()`, run by one probe at a time per process: a probe that waited for a run finishing after it
    arrived takes that run's answer, and any probe takes an answer finished less than READINESS_CACHE_SECONDS ago.
    /readyz answers anyone, and each run opens database and broker connections and calls the chain node: a client
    probing in a loop, or many at once, made the dependencies do that work at its pace."""
    global _last_run
    asked_at = time.monotonic()
    with _run_lock:
        last = _last_run
        if last is not None and (last.finished_at >= asked_at
                                 or asked_at - last.finished_at < settings.READINESS_CACHE_SECONDS):
            return last.checks
        checks = readiness()
        _last_run = _Run(finished_at=time.monotonic(), checks=checks)
        return checks


_status = inline_serializer("Liveness", {"status": serializers.ChoiceField(choices=["ok"])})
_ready = inline_serializer("Readiness", {
    "status": serializers.ChoiceField(choices=["ready"]),
    "checks": serializers.DictField(child=serializers.ChoiceField(choices=["ok", "failed", "timeout"])),
})


class HealthzView(APIView):
    authentication_classes = []
    throttle_classes = []  # a load balancer's probes, maybe from the clients' address: never refused
    permission_classes = [AllowAny]

    @extend_schema(operation_id="healthz", tags=["operations"], auth=[],
                   summary="Liveness: 200 while the process serves requests; touches no dependency",
                   responses={200: _status})
    def get(self, request):
        return Response({"status": "ok"})


class ReadyzView(APIView):
    authentication_classes = []
    throttle_classes = []  # a load balancer's probes, maybe from the clients' address: never refused
    permission_classes = [AllowAny]

    @extend_schema(operation_id="readyz", tags=["operations"], auth=[],
                   summary="Readiness: database, broker and chain RPC answer, the chain indexer keeps up, the node "
                           "answers the payouts' finality tag; 503 `not_ready` names the failed ones",
                   responses={200: _ready, 503: OpenApiResponse(ErrorSerializer, description="A dependency is down; "
                                                                "`details.checks` says which.")})
    def get(self, request):
        checks = readiness_shared()
        failed = sorted(name for name, result in checks.items() if result != "ok")
        if failed:
            return Response(error_body("not_ready", f"Not ready: {', '.join(failed)} unavailable.",
                                       {"checks": checks, "failed": failed}), status=503)
        return Response({"status": "ready", "checks": checks})
