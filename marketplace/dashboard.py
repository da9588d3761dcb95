"""The operators' dashboard in the admin (/admin/dashboard/): what is overdue, the platform wallets' balances,
usage and volume over time as charts, live counts per status and recent failures.

Each app registers what it shows from its `monitoring` module (`counts_register`, `failures_register`,
`overdue_register`, `gauges_register`, `series_register`), so this page knows no app's models and the dependency
direction stays one way. Charts are inline SVG drawn here: no script, nothing fetched from elsewhere.
"""

from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta

from django.contrib import admin
from django.core.exceptions import PermissionDenied
from django.db.models import QuerySet
from django.template.response import TemplateResponse
from django.utils import timezone
from django.utils.html import format_html, format_html_join

RECENT_FAILURES = 20
OVERDUE_LIMIT = 50
COUNT_LIMIT = 10_000  # a count by status stops past this many rows: "more than 10000"


@dataclass(frozen=True)
class Failure:
    at: datetime
    kind: str
    subject: str
    reason: str
    admin_url: str


@dataclass(frozen=True)
class Overdue:
    """Something that should have moved on by now: `since` is when it became due."""

    since: datetime
    kind: str
    subject: str
    detail: str
    admin_url: str


@dataclass(frozen=True)
class Gauge:
    """A balance or level with its warning threshold; `ok` None when it could not be read."""

    label: str
    value: str
    threshold: str
    ok: bool | None
    detail: str = ""


@dataclass(frozen=True)
class Period:
    """The charts' time axis: `buckets` buckets of `step`, the last one containing now."""

    name: str
    label: str
    step: timedelta
    buckets: int

    def starts(self, now: datetime) -> list[datetime]:
        if self.step >= timedelta(days=1):
            last = now.replace(hour=0, minute=0, second=0, microsecond=0)
        else:
            last = now.replace(minute=0, second=0, microsecond=0)
        return [last - self.step * i for i in reversed(range(self.buckets))]


PERIODS = {
    "24h": Period("24h", "last 24 hours, per hour", timedelta(hours=1), 24),
    "30d": Period("30d", "last 30 days, per day", timedelta(days=1), 30),
}

# series(since, step) -> {bucket start: value}; `unit` formats a value for people (e.g. token units).
Series = Callable[[datetime, timedelta], dict[datetime, int]]

_counts: list[tuple[str, Callable[[], dict[str, int]]]] = []
_failures: list[Callable[[int], list[Failure]]] = []
_overdue: list[Callable[[datetime], list[Overdue]]] = []
_gauges: list[Callable[[], list[Gauge]]] = []
_series: list[tuple[str, Series, Callable[[int], str]]] = []


def counts_register(*, title: str, counts: Callable[[], dict[str, int]]) -> None:
    """A table on the dashboard: `counts()` gives label -> count."""
    _counts.append((title, counts))


def counts_up_to_limit(rows: QuerySet, *, field: str, values) -> dict[str, int]:
    """`rows` per value of `field` among `values` (those with none left out), each counted up to COUNT_LIMIT + 1 rows
    (the dashboard shows "more than COUNT_LIMIT") from an index leading with `field`. A GROUP BY counted every row of
    the table on each view of the dashboard (35-65 ms a table with 100,000 rows, growing with them); this stops at the
    limit, so a status of a few rows (failed, pending) is still counted exactly."""
    counted = {value: rows.order_by().filter(**{field: value}).values(field)[:COUNT_LIMIT + 1].count()
               for value in values}
    return {value: count for value, count in counted.items() if count}


def failures_register(*, recent: Callable[[int], list[Failure]]) -> None:
    """`recent(limit)` gives the source's latest failures, newest first."""
    _failures.append(recent)


def overdue_register(*, overdue: Callable[[datetime], list[Overdue]]) -> None:
    """`overdue(now)` gives what is overdue at `now` (at most OVERDUE_LIMIT items)."""
    _overdue.append(overdue)


def gauges_register(*, gauges: Callable[[], list[Gauge]]) -> None:
    _gauges.append(gauges)


def series_register(*, title: str, series: Series, unit: Callable[[int], str] = str) -> None:
    """A chart: `series(since, step)` sums values into buckets starting at `since`, each `step` long."""
    _series.append((title, series, unit))


CHART_WIDTH, CHART_HEIGHT, CHART_TOP = 640, 150, 18


def chart_svg(*, title: str, points: list[tuple[datetime, int]], unit: Callable[[int], str], step: timedelta):
    """A bar chart as inline SVG: one bar per bucket, its value in the bar's tooltip, the largest value and the
    first and last bucket written on the axes."""
    peak = max((value for _, value in points), default=0)
    slot = CHART_WIDTH / max(len(points), 1)
    label_format = "%m-%d" if step >= timedelta(days=1) else "%m-%d %H:%M"
    bars = format_html_join("", '<rect x="{}" y="{}" width="{}" height="{}" class="bar">'
                                '<title>{}: {}</title></rect>', (
        (f"{i * slot + 1:.1f}", f"{CHART_TOP + CHART_HEIGHT - height:.1f}", f"{max(slot - 2, 1):.1f}", f"{height:.1f}",
         start.strftime("%Y-%m-%d %H:%M UTC"), unit(value))
        for i, (start, value) in enumerate(points)
        for height in [(CHART_HEIGHT * value / peak) if peak else 0]))
    first = points[0][0].strftime(label_format) if points else ""
    last = points[-1][0].strftime(label_format) if points else ""
    total = sum(value for _, value in points)
    return format_html(
        '<svg class="chart" role="img" aria-label="{title}" viewBox="0 0 {w} {h}" width="100%" '
        'preserveAspectRatio="none" style="max-width:{w}px;height:{h}px">'
        '<text x="0" y="12" class="axis">max {peak}</text>'
        '<line x1="0" y1="{base}" x2="{w}" y2="{base}" class="axis-line"/>{bars}'
        '<text x="0" y="{label_y}" class="axis">{first}</text>'
        '<text x="{w}" y="{label_y}" text-anchor="end" class="axis">{last}</text></svg>'
        '<p class="chart-total">Total: {total}</p>',
        title=title, w=CHART_WIDTH, h=CHART_TOP + CHART_HEIGHT + 16, peak=unit(peak), base=CHART_TOP + CHART_HEIGHT,
        bars=bars, label_y=CHART_TOP + CHART_HEIGHT + 14, first=first, last=last, total=unit(total))


def _charts(period: Period, now: datetime) -> list[dict]:
    starts = period.starts(now)
    charts = []
    for title, series, unit in _series:
        values = series(starts[0], period.step)
        points = [(start, values.get(start, 0)) for start in starts]
        charts.append({"title": title, "svg": chart_svg(title=title, points=points, unit=unit, step=period.step)})
    return charts


DASHBOARD_PERMISSION = "marketplace.view_dashboard"


def dashboard_view(request):
    # Not every staff account: its failures show every agent's status reasons and delivery errors.
    if not request.user.has_perm(DASHBOARD_PERMISSION):
        raise PermissionDenied
    now = timezone.now()
    period = PERIODS.get(request.GET.get("period", ""), PERIODS["24h"])
    tables = []
    for title, counts in _counts:
        rows = counts()
        # Past the limit, a count and the total are "more than" what was counted.
        tables.append({"title": title, "rows": sorted(rows.items()),
                       "total": sum(min(count, COUNT_LIMIT) for count in rows.values()),
                       "total_more": any(count > COUNT_LIMIT for count in rows.values())})
    failures = sorted((f for recent in _failures for f in recent(RECENT_FAILURES)), key=lambda f: f.at,
                      reverse=True)[:RECENT_FAILURES]
    overdue = sorted((item for source in _overdue for item in source(now)), key=lambda item: item.since)
    context = {**admin.site.each_context(request), "title": "Marketplace dashboard", "tables": tables,
               "failures": failures, "overdue": overdue[:OVERDUE_LIMIT], "overdue_total": len(overdue),
               "gauges": [gauge for source in _gauges for gauge in source()],
               "charts": _charts(period, now), "period": period, "periods": PERIODS.values(), "now": now,
               "count_limit": COUNT_LIMIT}
    return TemplateResponse(request, "admin/marketplace_dashboard.html", context)
