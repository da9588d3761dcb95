"""The one loop of the periodic expiry sweeps (proposals, approval requests), and the one way a sweep queues task
messages for the rows it found due."""

from collections.abc import Callable
from datetime import datetime

from django.db import transaction
from django.db.models import Model, QuerySet

# Rows handled per run; the beat comes back for the rest.
SWEEP_BATCH = 1000


def due_rows_apply(*, due: QuerySet, apply: Callable[[Model], None]) -> int:
    """`apply(row)` to each row of `due`, each in its own transaction under the row's lock, once the row is shown
    still due there (a row another worker holds is skipped, so concurrent sweeps never wait on each other). Safe
    to run twice. Returns how many rows it applied to."""
    applied = 0
    for pk in list(due.values_list("pk", flat=True)[:SWEEP_BATCH]):
        with transaction.atomic():
            row = due.filter(pk=pk).select_for_update(skip_locked=True).first()
            if row is not None:
                apply(row)
                applied += 1
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
