"""A default-queue task that never ends is killed at TASK_TIME_LIMIT_SECONDS by a real prefork worker, as in
production, and the worker slot serves the next message: one hung on a node, a lock or a statement held it for
ever."""

import os
from pathlib import Path

import pytest
from celery import Celery

from marketplace.celery import app
from tests.faults.processes import BIN, Service, wait_until

pytestmark = [pytest.mark.slow, pytest.mark.faults, pytest.mark.postgres, pytest.mark.django_db(transaction=True)]

HANG = "tests.faults.poison_tasks.hang"


def test_a_hung_default_queue_task_is_killed_at_its_time_limit_and_the_slot_serves_the_next(
        redis_server, tmp_path: Path, settings, monkeypatch):
    assert app.amqp.router.route({}, HANG)["queue"].name == settings.CELERY_TASK_DEFAULT_QUEUE
    env = {**os.environ, "CELERY_BROKER_URL": redis_server.url, "CELERY_TASK_ALWAYS_EAGER": "false",
           "TASK_TIME_LIMIT_SECONDS": "2"}
    worker = Service("worker", [str(BIN / "celery"), "-A", "marketplace", "worker", "--pool", "prefork",
                                "--concurrency", "1", "--include", "tests.faults.poison_tasks",
                                "--queues", settings.CELERY_TASK_DEFAULT_QUEUE, "--without-gossip", "--without-mingle",
                                "--without-heartbeat", "--loglevel", "info"], env, tmp_path).start()
    try:
        first, second = tmp_path / "first", tmp_path / "second"
        monkeypatch.delenv("CELERY_BROKER_URL", raising=False)  # as test_hostile_input: the stack's broker wins
        with Celery(broker=redis_server.url, set_as_current=False) as client:
            for runs in (first, second):
                client.send_task(HANG, args=[str(runs)], queue=settings.CELERY_TASK_DEFAULT_QUEUE)
        # One slot: the second runs only once the first was killed, and is killed in its turn.
        wait_until(lambda: second.exists() and worker.log().count("Hard time limit (2") >= 2, timeout=60,
                   what=f"both hung tasks killed\n--- worker log tail ---\n{worker.log()[-3000:]}")
        assert first.read_text() == second.read_text() == "run\n"  # each ran once: acknowledged, not redelivered
        assert worker.process.poll() is None
    finally:
        worker.stop()
