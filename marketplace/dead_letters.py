"""Poison messages never loop. A task whose process dies while running it (a segfault, the OOM killer) is
delivered again (acks_late + reject_on_worker_lost); one that kills every process that runs it would loop forever.
Each redelivery is counted in the database before the task runs (`RedeliveredTask`, committed first, so the count
survives the crash it is counting); past TASK_MAX_REDELIVERIES the message is a dead letter: recorded, logged,
acknowledged without running. Dead letters are listed in the admin and counted in the metrics
(`marketplace_celery_dead_letters`); an operator re-runs one after fixing its cause. Each record is deleted
DEAD_LETTER_KEEP_DAYS after its last redelivery (`records_prune`, an hourly beat task).

Only redeliveries are counted (the broker marks them: kombu's Redis transport sets `redelivered`), so a first
delivery costs no write. Not those of a message a stopping worker gave back unrun (a deploy's SIGTERM: a countdown's
message, a prefetched one), which Redis marks alike: the worker notes them in the cache as it stops
(`given_back_unrun_note`, marketplace.celery), and a redelivery noted so is not counted. Each rolling restart counted
one, and a webhook retry's message held across TASK_MAX_REDELIVERIES of them was dropped unrun as a poison message.
A note lost (the cache down, flushed) counts the redelivery, as before: never a crash left uncounted for long.
"""

import logging
from datetime import timedelta

from django.conf import settings
from django.core.cache import cache
from django.db import transaction
from django.db.models import Count
from django.utils import timezone

from marketplace import metrics, sweeps
from marketplace.models import RedeliveredTask

logger = logging.getLogger(__name__)


# How long a note of a message given back unrun waits for its redelivery: past the longest countdown, and a queue
# that is hours behind after an outage.
GIVEN_BACK_UNRUN_NOTE_SECONDS = 24 * 3600


def _given_back_unrun_key(task_id: str) -> str:
    return f"task-given-back-unrun:{task_id}"


def given_back_unrun_note(*, task_ids: list[str]) -> None:
    """Note the messages of `task_ids`, which a stopping worker gives back to the broker without having run them."""
    if not task_ids:
        return
    try:
        cache.set_many({_given_back_unrun_key(task_id): True for task_id in task_ids},
                       timeout=GIVEN_BACK_UNRUN_NOTE_SECONDS)
    except Exception:  # their redeliveries are counted, as every one was
        logger.warning("messages given back unrun not noted", exc_info=True)


def _given_back_unrun(task_id: str) -> bool:
    """Whether this redelivery is of a message a stopping worker gave back unrun (the note taken: once)."""
    try:
        return bool(cache.delete(_given_back_unrun_key(task_id)))
    except Exception:  # the cache is down: counted
        logger.warning("could not read whether a redelivered message was given back unrun", exc_info=True)
        return False


def redelivery_allowed(*, task_id: str, task_name: str, args, kwargs) -> bool:
    """Count one more redelivery of the task: True when it may run again, False once it is a dead letter. One of a
    message a stopping worker gave back unrun is not counted (`given_back_unrun_note`)."""
    if _given_back_unrun(task_id):
        return True
    with transaction.atomic():
        record, _ = RedeliveredTask.objects.select_for_update().get_or_create(
            task_id=task_id, defaults={"task_name": task_name, "args": list(args), "kwargs": dict(kwargs)})
        if record.dead_lettered_at is None:
            record.redeliveries += 1
            if record.redeliveries > settings.TASK_MAX_REDELIVERIES:
                record.dead_lettered_at = timezone.now()
                logger.error("task dead-lettered: its process died on every delivery",
                             extra={"task": task_name, "task_id": task_id, "redeliveries": record.redeliveries})
            record.save(update_fields=["redeliveries", "dead_lettered_at", "updated_at"])
    return record.dead_lettered_at is None


def records_prune() -> int:
    """Delete the records, dead letters or counts, last redelivered more than DEAD_LETTER_KEEP_DAYS ago, a bounded
    number a run (`sweeps.rows_purge`), by redelivered_task_updated_idx (every redelivered message adds one, and
    nothing else deleted them); how many. Safe twice."""
    # The rule again on delete: a message redelivered meanwhile is counted afresh.
    return sweeps.rows_purge(deletable=RedeliveredTask.objects.filter(
        updated_at__lt=timezone.now() - timedelta(days=settings.DEAD_LETTER_KEEP_DAYS)), order_by=("updated_at",))


def dead_letter_counts() -> dict[tuple[str], int]:
    rows = (RedeliveredTask.objects.filter(dead_lettered_at__isnull=False).values("task_name")
            .annotate(count=Count("id")))
    return {(row["task_name"],): row["count"] for row in rows}


def panels_register() -> None:
    """Called once, from MarketplaceConfig.ready()."""
    metrics.scrape_collector_register(
        name="marketplace_celery_dead_letters", labels=("task",), counts=dead_letter_counts,
        documentation="Task messages acknowledged without running after their process died on every delivery, "
                      "by task.")
