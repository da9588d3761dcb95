"""The operators' dashboard in the admin (/admin/dashboard/): live counts per status and recent failures.

Each app registers what it shows (`counts_register`, `failures_register`) from its `monitoring` module, so this
page knows no app's models and the dependency direction stays one way.
"""

from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime

from django.contrib import admin
from django.template.response import TemplateResponse

RECENT_FAILURES = 20


@dataclass(frozen=True)
class Failure:
    at: datetime
    kind: str
    subject: str
    reason: str
    admin_url: str


_counts: list[tuple[str, Callable[[], dict[str, int]]]] = []
_failures: list[Callable[[int], list[Failure]]] = []


def counts_register(*, title: str, counts: Callable[[], dict[str, int]]) -> None:
    """A table on the dashboard: `counts()` gives label -> count."""
    _counts.append((title, counts))


def failures_register(*, recent: Callable[[int], list[Failure]]) -> None:
    """`recent(limit)` gives the source's latest failures, newest first."""
    _failures.append(recent)


def dashboard_view(request):
    tables = []
    for title, counts in _counts:
        rows = counts()
        tables.append({"title": title, "rows": sorted(rows.items()), "total": sum(rows.values())})
    failures = sorted((f for recent in _failures for f in recent(RECENT_FAILURES)), key=lambda f: f.at,
                      reverse=True)[:RECENT_FAILURES]
    context = {**admin.site.each_context(request), "title": "Marketplace dashboard", "tables": tables,
               "failures": failures}
    return TemplateResponse(request, "admin/marketplace_dashboard.html", context)
