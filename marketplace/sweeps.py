"""The one loop of the periodic expiry sweeps (proposals, approval requests), the one way a sweep queues task
messages for the rows it found due, and the one loop of the retention purges."""

import logging
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from datetime import datetime

from django.conf import settings
from django.core.cache import cache
from django.db import transaction
from django.db.models import Model, Q, QuerySet

logger = logging.getLogger(__name__)

# Rows handled per run; the beat comes back for the rest.
SWEEP_BATCH = 1000


class RowsFailed(Exception):
    """A sweep's run in which some rows raised: raised at its end, once every other row was done, so that the task
    fails where monitoring sees it (`marketplace_celery_task_failures_total`), each row's error logged with its id."""

    def __init__(self, *, sweep: str, failed: list, applied: int):
        self.sweep, self.failed, self.applied = sweep, failed, applied
        super().__init__(f"{sweep}: {len(failed)} rows failed ({', '.join(map(str, failed[:10]))}"
                         f"{', ...' if len(failed) > 10 else ''}), {applied} done")


class RowFailures:
    """One sweep's rows, each alone: a row that raises is logged with its id, counted and skipped (what it wrote
    rolled back), and the sweep goes on; `raise_if_any` at the end. A row that always raised (bad data, a bug,
    another app's hook refusing it) stopped the run at every beat, and every row after it was never done."""

    def __init__(self, sweep: str):
        self.sweep, self.failed = sweep, []

    @contextmanager
    def row(self, row_id, *, reraise: tuple[type[BaseException], ...] = (), atomic: bool = True) -> Iterator[None]:
        """One row's work in its own transaction (a savepoint inside one), or, `atomic` False, in the transactions
        it takes itself (a step that reads the chain outside any). `reraise`: errors that end the run (a node that
        cannot be reached: every row after it would fail the same way)."""
        try:
            with transaction.atomic() if atomic else nullcontext():
                yield
        except reraise:
            raise
        except Exception:
            logger.exception("%s: row %s failed; skipped until the next run", self.sweep, row_id,
                             extra={"sweep": self.sweep, "row_id": str(row_id)})
            self.failed.append(row_id)

    def raise_if_any(self, *, applied: int) -> None:
        if self.failed:
            raise RowsFailed(sweep=self.sweep, failed=self.failed, applied=applied)


def due_rows_apply(*, due: QuerySet, apply: Callable[[Model], None], turn: str) -> int:
    """`apply(row)` to each row of `due`, each in its own transaction under the row's lock, once the row is shown
    still due there (a row another worker holds is skipped, so concurrent sweeps never wait on each other). Safe
    to run twice. Returns how many rows it applied to; a row whose `apply` raises is rolled back, logged and
    skipped, the others applied, and RowsFailed raised at the end. At most SWEEP_BATCH rows a run, in turn
    (`rows_in_turn`, by `turn`): the first of the table's order, rows that always raised filled the batch at every
    run and no other row was ever done."""
    applied = 0
    failures = RowFailures(f"{due.model._meta.label} sweep")
    for pk in [row.pk for row in rows_in_turn(due.only("pk"), turn=turn, by="pk", size=SWEEP_BATCH)]:
        with failures.row(pk):
            row = due.filter(pk=pk).select_for_update(skip_locked=True).first()
            if row is not None:
                apply(row)
                applied += 1
    failures.raise_if_any(applied=applied)
    return applied


def marked_rows_publish(*, model: type[Model], pks: list, marked: str, now: datetime,
                        publish: Callable[[str], None]) -> None:
    """`publish(pk)` a task message for each row, each marked queued first (`marked` = `now`), so that a sweep
    queues a row again only once its mark is old enough for the message to be lost, not on every run while the queue
    is behind. A broker refusing a publish unmarks the rows not sent yet (due to the next run) and raises."""
    model.objects.filter(pk__in=pks).update(**{marked: now})
    for index, pk in enumerate(pks):
        try:
            publish(str(pk))
        except Exception:
            model.objects.filter(pk__in=pks[index:], **{marked: now}).update(**{marked: None})
            raise


def rows_purge(*, deletable: QuerySet, order_by: tuple[str, ...], resume_turn: str | None = None) -> int:
    """Delete the rows of `deletable`, RETENTION_PURGE_BATCH at a time, at most RETENTION_PURGE_BATCHES_PER_RUN
    batches a run (the beat comes back for the rest: a backlog held a worker until its time limit); how many.
    `deletable` selects only rows to delete, in the order of an index (`order_by`), so that no row kept is read;
    its condition is applied again on delete (a row live again meanwhile is kept). Each batch is committed under its
    rows' locks, skipping rows another run holds: two runs at once delete different rows, one dying mid-run loses
    only its batch. Safe twice.

    `resume_turn`, for rows kept for ever among the deletable ones in the index's order (the query reads past them
    all at every run): the next run reads on from the last row deleted, by `order_by[0]` (`turn_cursor`). Only for
    rows that never become deletable behind it, in that order; a batch then waits for rows another holds, rather
    than leave them behind for good."""
    deleted, size, by = 0, settings.RETENTION_PURGE_BATCH, order_by[0]
    if resume_turn is not None and (after := turn_cursor(resume_turn)) is not None:
        deletable = deletable.filter(**{f"{by}__gte": after})
    for _ in range(settings.RETENTION_PURGE_BATCHES_PER_RUN):
        with transaction.atomic():
            rows = list(deletable.order_by(*order_by).select_for_update(skip_locked=resume_turn is None, of=("self",))
                        .values_list("pk", by)[:size])
            if rows:
                deleted += deletable.filter(pk__in=[pk for pk, _ in rows]).delete()[0]
        if rows and resume_turn is not None:
            turn_cursor_keep(resume_turn, rows[-1][1])
        if len(rows) < size:
            break
    return deleted


def turn_cursor(turn: str):
    """Where the previous run of `turn` ended (kept in the cache), or None: never run, at its end, or lost (Redis
    restarted, flushed, down)."""
    try:
        return cache.get(f"rows-in-turn:{turn}")
    except Exception:  # the cache is down: from the first, as with nothing kept
        logger.warning("%s: where the last run ended is not known; from the first row", turn, exc_info=True)
        return None


def turn_cursor_keep(turn: str, after) -> None:
    """Keeps where this run of `turn` ended (None: at the end, the next run starts from the first row)."""
    try:
        cache.set(f"rows-in-turn:{turn}", after, timeout=None)
    except Exception:
        logger.warning("%s: where this run ended is not kept", turn, exc_info=True)


def rows_in_turn(due: QuerySet, *, turn: str, by: str, size: int) -> list:
    """At most `size` rows of `due`, in the order of `by` (never null), then pk: those after the last row the previous
    run of `turn` took, then, the end reached, from the first on again. A run takes a bounded batch, and rows that stay
    due without moving on (a step waiting on the chain) never keep the ones after them from their turn. Where the
    previous run ended is kept in the cache: lost (Redis restarted, flushed, down), the run starts from the first."""
    ordered = due.order_by(by, "pk")
    after = turn_cursor(turn)
    rows = []
    if after is not None:
        value, pk = after
        rows = list(ordered.filter(Q(**{f"{by}__gt": value}) | Q(**{by: value, "pk__gt": pk}))[:size])
    if len(rows) < size:
        rows += list(ordered.exclude(pk__in=[row.pk for row in rows])[:size - len(rows)])
    turn_cursor_keep(turn, (getattr(rows[-1], by), rows[-1].pk) if len(rows) == size else None)
    return rows
