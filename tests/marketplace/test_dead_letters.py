"""A message whose process dies on every delivery is run a bounded number of times, then dead-lettered: visible
in the admin and the metrics. (The real crash loop, with a worker process killed on each delivery, is in
tests/faults/test_hostile_answers.py.)"""

import pytest

from marketplace import dead_letters
from marketplace.models import RedeliveredTask
from tests.marketplace.conftest import scrape

pytestmark = pytest.mark.django_db


def test_redeliveries_are_bounded_then_dead_lettered(settings, operator):
    settings.TASK_MAX_REDELIVERIES = 2
    allowed = [dead_letters.redelivery_allowed(task_id="t-1", task_name="catalog.tasks.check_availability",
                                               args=["s-1"], kwargs={}) for _ in range(4)]
    assert allowed == [True, True, False, False]
    letter = RedeliveredTask.objects.get(task_id="t-1")
    assert letter.redeliveries == 3 and letter.dead_lettered_at is not None and letter.args == ["s-1"]

    listed = operator.get("/admin/marketplace/redeliveredtask/?dead=yes")
    assert listed.status_code == 200 and b"t-1" in listed.content
    samples = scrape(operator)
    assert samples[("marketplace_celery_dead_letters", (("task", "catalog.tasks.check_availability"),))] == 1


def test_a_redelivery_of_a_message_a_stopping_worker_gave_back_unrun_is_not_counted_once(settings):
    """A stopping worker notes the messages it gives back unrun (marketplace.celery.GivenBackUnrunNoted; the real
    worker in tests/faults/test_hostile_input.py): their next redelivery is not counted, a later one is."""
    settings.TASK_MAX_REDELIVERIES = 0
    dead_letters.given_back_unrun_note(task_ids=["held-1"])
    assert dead_letters.redelivery_allowed(task_id="held-1", task_name="agreements.tasks.deliver_webhook",
                                           args=["d-1"], kwargs={})
    assert not RedeliveredTask.objects.filter(task_id="held-1").exists()
    # Its process died on this run: counted (and here, with no redelivery allowed, a dead letter).
    assert not dead_letters.redelivery_allowed(task_id="held-1", task_name="agreements.tasks.deliver_webhook",
                                               args=["d-1"], kwargs={})


def test_no_task_runs_or_waits_for_its_countdown_longer_than_the_brokers_visibility_timeout(settings):
    """Redis delivers a message again, to another worker, once it is unacknowledged for the visibility timeout,
    whether or not the worker holding it died: while it still runs (an invocation of a skill with an hour's timeout)
    or still waits for its countdown (a webhook's last retry, 640 s on). Each such redelivery was counted, and past
    TASK_MAX_REDELIVERIES the message dead-lettered (logged at ERROR, in the metrics) though no process had died."""
    from agreements import webhooks
    from marketplace.celery import app

    visibility_timeout = settings.CELERY_BROKER_TRANSPORT_OPTIONS["visibility_timeout"]
    app.loader.import_default_modules()
    longest_run = max(task.time_limit or 0 for task in app.tasks.values())
    longest_countdown = max(webhooks._BACKOFF_BASE_SECONDS * 2 ** (settings.WEBHOOK_MAX_ATTEMPTS - 2),
                            2 * settings.OUTBOUND_PUT_OFF_SECONDS, 2 * settings.OUTBOUND_PUT_OFF_MAX_SECONDS)
    assert longest_run < visibility_timeout
    assert longest_countdown < visibility_timeout


def test_dead_letters_and_redelivery_counts_are_deleted_past_their_retention_by_a_beat_task(settings):
    """Every redelivered message left a row, and nothing deleted it: the table grew for ever. The hourly beat task
    deletes those whose last redelivery was more than DEAD_LETTER_KEEP_DAYS ago, and keeps the rest."""
    from datetime import timedelta

    from django.utils import timezone

    from marketplace import tasks

    settings.TASK_MAX_REDELIVERIES = 0
    for task_id in ("old-dead", "old-counted", "recent-dead"):
        dead_letters.redelivery_allowed(task_id=task_id, task_name="catalog.tasks.check_availability", args=[],
                                        kwargs={})
    RedeliveredTask.objects.filter(task_id="old-counted").update(dead_lettered_at=None)  # ran at its next delivery
    long_ago = timezone.now() - timedelta(days=settings.DEAD_LETTER_KEEP_DAYS, minutes=1)
    RedeliveredTask.objects.filter(task_id__startswith="old-").update(updated_at=long_ago, dead_lettered_at=None)
    RedeliveredTask.objects.filter(task_id="old-dead").update(dead_lettered_at=long_ago)

    entry = next(entry for entry in settings.CELERY_BEAT_SCHEDULE.values()
                 if entry["task"] == "marketplace.tasks.prune_dead_letters")
    assert entry["schedule"] <= timedelta(days=1)
    assert tasks.prune_dead_letters.delay().get() == 2
    assert list(RedeliveredTask.objects.values_list("task_id", flat=True)) == ["recent-dead"]
    assert tasks.prune_dead_letters.delay().get() == 0  # safe twice
