"""Every retention purge, as the beat runs it: a bounded number of rows a run, the next run going on with the rest
(a backlog held a worker until the task's time limit)."""

from datetime import timedelta

import pytest
from axes.models import AccessLog
from django.conf import settings
from django.utils import timezone

from agreements.models import DeliveryStatus, WebhookDelivery, WebhookSubscription
from marketplace.celery import app as celery_app
from marketplace.models import IdempotencyRecord, RedeliveredTask
from tests.catalog.factories import AgentFactory
from tests.support.db_activity import row_locked

pytestmark = pytest.mark.django_db


def long_ago(days: int) -> timezone.datetime:
    return timezone.now() - timedelta(days=days, minutes=1)


def idempotency_records(count: int) -> None:
    for n in range(count):
        IdempotencyRecord.objects.create(scope="agent:x", key=f"key-{n}", request_fingerprint="f")
    IdempotencyRecord.objects.update(created_at=timezone.now() - settings.IDEMPOTENCY_KEY_TTL - timedelta(minutes=1))


def dead_letters(count: int) -> None:
    for n in range(count):
        RedeliveredTask.objects.create(task_id=f"task-{n}", task_name="catalog.tasks.check_availability")
    RedeliveredTask.objects.update(updated_at=long_ago(settings.DEAD_LETTER_KEEP_DAYS))


def admin_access_logs(count: int) -> None:
    for n in range(count):
        AccessLog.objects.create(username=f"operator-{n}", user_agent="browser", ip_address="127.0.0.1")
    AccessLog.objects.update(attempt_time=long_ago(settings.ADMIN_ACCESS_LOG_KEEP_DAYS))


def webhook_deliveries(count: int) -> None:
    subscription = WebhookSubscription.objects.create(agent=AgentFactory(), url="https://hooks.example/a",
                                                      secret="whsec_test")
    for _ in range(count):
        WebhookDelivery.objects.create(subscription=subscription, event_type="test", payload={},
                                       status=DeliveryStatus.DELIVERED, next_attempt_at=timezone.now())
    WebhookDelivery.objects.update(next_attempt_at=long_ago(settings.WEBHOOK_DELIVERY_KEEP_DAYS))


@pytest.mark.parametrize(("beat_entry", "stage", "model"), [
    ("purge-expired-idempotency-records", idempotency_records, IdempotencyRecord),
    ("prune-dead-letters", dead_letters, RedeliveredTask),
    ("prune-admin-access-logs", admin_access_logs, AccessLog),
    ("purge-webhook-deliveries", webhook_deliveries, WebhookDelivery),
])
def test_a_purge_deletes_a_bounded_number_of_rows_a_run_and_the_next_run_goes_on(beat_entry, stage, model, settings):
    """Each purge looped until nothing was left in one run: a backlog of millions (a purge off for a while, a burst)
    held a worker, and the transaction of its statement, until the task's time limit killed it, at every run."""
    settings.RETENTION_PURGE_BATCH, settings.RETENTION_PURGE_BATCHES_PER_RUN = 2, 2
    stage(5)
    celery_app.loader.import_default_modules()  # as a worker starts: the apps' tasks modules
    task = celery_app.tasks[settings.CELERY_BEAT_SCHEDULE[beat_entry]["task"]]

    assert [task.delay().get() for _ in range(3)] == [4, 1, 0]
    assert not model.objects.exists()


@pytest.mark.django_db(transaction=True)
def test_two_runs_at_once_delete_different_rows_and_neither_waits_on_the_other(settings):
    """A run's batch holds its rows' locks until committed: another run at once (the beat's next message, a run the
    time limit is killing) skips them and deletes the rest, waiting on nothing; what the first held is there for the
    next run, if it died."""
    settings.RETENTION_PURGE_BATCH, settings.RETENTION_PURGE_BATCHES_PER_RUN = 2, 2
    idempotency_records(5)
    oldest = list(IdempotencyRecord.objects.order_by("pk").values_list("pk", flat=True))
    for age, pk in enumerate(oldest):  # the first ones the oldest: the first batch's
        IdempotencyRecord.objects.filter(pk=pk).update(
            created_at=timezone.now() - settings.IDEMPOTENCY_KEY_TTL - timedelta(minutes=10 - age))
    celery_app.loader.import_default_modules()
    task = celery_app.tasks[settings.CELERY_BEAT_SCHEDULE["purge-expired-idempotency-records"]["task"]]
    with row_locked(IdempotencyRecord, oldest[0]), row_locked(IdempotencyRecord, oldest[1]):
        assert task.delay().get() == 3
    assert task.delay().get() == 2
    assert not IdempotencyRecord.objects.exists()
