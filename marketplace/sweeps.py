"""The one loop of the periodic expiry sweeps (proposals, approval requests)."""

from collections.abc import Callable

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
