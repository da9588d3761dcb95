"""Tasks that call a webhook receiver or a seller run on the outbound queue, apart from the chain and settlement
tasks: two slow receivers held both workers of `--concurrency 2` while submission, confirmation and settlement
waited behind them."""

import socket
import threading
import time
from datetime import timedelta

import pytest
from django.conf import settings

from agreements.tasks import deliver_webhook, run_invocation
from catalog.tasks import check_availability
from escrow.tasks import submit_transaction
from marketplace.celery import app

OUTBOUND_TASKS = {"agreements.tasks.deliver_webhook", "agreements.tasks.run_invocation",
                  "catalog.tasks.check_availability", "escrow.tasks.masumi_jobs_tick"}
MONEY_TASKS = {"escrow.tasks.submit_transaction", "escrow.tasks.poll_confirmations", "escrow.tasks.sweep_queued",
               "escrow.tasks.settlement_tick", "escrow.tasks.pay_fees", "escrow.tasks.masumi_purchases_tick",
               "escrow.tasks.index_chain", "agreements.tasks.sweep_invocations", "agreements.tasks.reap_call_intents",
               "agreements.tasks.retry_due_webhooks"}


def _queue(task_name: str) -> str:
    return app.amqp.router.route({}, task_name)["queue"].name


def test_tasks_that_call_third_parties_go_to_the_outbound_queue_and_every_other_to_the_default_one():
    app.loader.import_default_modules()  # every app's tasks module, as a worker imports them
    ours = {name for name in app.tasks if not name.startswith("celery.")}
    assert OUTBOUND_TASKS | MONEY_TASKS <= ours
    assert {name: _queue(name) for name in ours} == {
        name: settings.OUTBOUND_QUEUE if name in OUTBOUND_TASKS else settings.CELERY_TASK_DEFAULT_QUEUE
        for name in ours}


def test_the_outbound_tasks_have_a_hard_time_limit_past_their_exchanges_deadline():
    margin = settings.OUTBOUND_TASK_TIME_LIMIT_MARGIN_SECONDS
    assert deliver_webhook.time_limit == settings.WEBHOOK_TIMEOUT_SECONDS + margin
    assert run_invocation.time_limit == 3600 + margin  # the longest skill timeout a seller may set
    assert check_availability.time_limit == settings.MASUMI_SERVICE_TIMEOUT + margin


# What finds again the rows whose task message was lost (Redis keeps none across a restart, nor a publish while it is
# down): submissions left queued, in-flight transactions (and payouts held for their payment's finality), settlement
# steps, Masumi purchase steps, webhook deliveries due, paid invocations not run, the infra fees. Each must be on the
# beat: a lost message is otherwise never sent again.
REDRIVING_TASKS = {"escrow.tasks.sweep_queued", "escrow.tasks.poll_confirmations", "escrow.tasks.settlement_tick",
                   "escrow.tasks.masumi_purchases_tick", "escrow.tasks.masumi_jobs_tick",
                   "agreements.tasks.retry_due_webhooks", "agreements.tasks.sweep_invocations"}


def test_every_task_finding_again_the_rows_of_lost_messages_is_on_the_beat_at_most_a_minute_apart():
    every = {entry["task"]: entry["schedule"] for entry in settings.CELERY_BEAT_SCHEDULE.values()}
    assert {name: every.get(name, timedelta.max) <= timedelta(minutes=1) for name in REDRIVING_TASKS} == dict.fromkeys(
        REDRIVING_TASKS, True)
    assert every["escrow.tasks.pay_fees"] <= timedelta(minutes=5)  # fees accrue in the escrow meanwhile

@pytest.fixture
def published():
    """Messages published to an in-memory broker, by queue: the task names each holds."""
    app.conf.task_always_eager = False
    with app.connection_for_write("memory://") as connection:
        def queued(queue: str) -> list[str]:
            simple = connection.SimpleQueue(queue)
            names = []
            while True:
                try:
                    message = simple.get(block=False)
                except simple.Empty:
                    break
                names.append(message.headers["task"])
                message.ack()
            simple.close()
            return names

        try:
            yield connection, queued
        finally:
            app.conf.task_always_eager = True  # as the suite runs tasks (tests/conftest.py)


def test_a_queued_webhook_delivery_waits_on_the_outbound_queue_and_a_transaction_on_the_default_one(published):
    connection, queued = published
    deliver_webhook.apply_async(("delivery-1",), connection=connection)
    submit_transaction.apply_async(("transaction-1",), connection=connection)
    assert queued(settings.OUTBOUND_QUEUE) == ["agreements.tasks.deliver_webhook"]
    assert queued(settings.CELERY_TASK_DEFAULT_QUEUE) == ["escrow.tasks.submit_transaction"]



def _worker_runs(connection, queue: str) -> int:
    """Each message waiting on `queue` taken and run as a worker runs it (its headers its request): how many."""
    from celery.app.trace import build_tracer

    simple, taken = connection.SimpleQueue(queue), 0
    try:
        while True:
            try:
                message = simple.get(block=False)
            except simple.Empty:
                return taken
            args, kwargs, _ = message.decode()
            task = app.tasks[message.headers["task"]]
            build_tracer(task.name, task, app=app, propagate=True)(
                message.headers["id"], args, kwargs, {**message.headers, "delivery_info": {}})
            message.ack()
            taken += 1
    finally:
        simple.close()


def test_beat_messages_that_piled_up_while_no_worker_took_them_run_once_not_each(published, monkeypatch, settings):
    """The beat sends a poll every 3 s (a settlement tick every 10, ...) whether or not a worker took the last: with
    the default queue's workers down or behind, up to a minute of them (their expiry) waited, and once a worker was
    free each ran in turn, the same full pass twenty times over (500 transactions read from the node each), ahead of
    the submissions queued behind them. A beat message published before a run of its task started is dropped: that
    run did its work."""
    from escrow import relayer
    from escrow.tasks import poll_confirmations

    settings.BEAT_SUPERSEDED_MARGIN_SECONDS = 0  # the beat's clock and the worker's one (one host here)
    connection, _ = published
    polls = []
    monkeypatch.setattr(relayer, "transactions_poll", lambda: polls.append(1) or 0)
    for _ in range(20):  # a minute of the beat's polls, no worker taking them
        poll_confirmations.apply_async(connection=connection, expires=60)
    assert _worker_runs(connection, settings.CELERY_TASK_DEFAULT_QUEUE) == 20
    assert len(polls) == 1

    poll_confirmations.apply_async(connection=connection, expires=60)  # the next beat, once the pile is done
    submit_transaction.apply_async(("transaction-1",), connection=connection)  # no beat task: never dropped
    monkeypatch.setattr(relayer, "transaction_submit", lambda **kwargs: polls.append("submit"))
    assert _worker_runs(connection, settings.CELERY_TASK_DEFAULT_QUEUE) == 2
    assert polls == [1, 1, "submit"]

@pytest.fixture
def silent_broker():
    """A Redis that takes connections and never answers (a primary hung, or lost mid-failover): the URL."""
    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen()
    try:
        yield f"redis://127.0.0.1:{silent.getsockname()[1]}/0"
    finally:
        silent.close()


@pytest.mark.skipif(not settings.CELERY_BROKER_URL.startswith("redis://"), reason="the Redis transport's options")
def test_a_publish_to_a_broker_that_never_answers_gives_up_within_seconds(silent_broker):
    """A task is published after its commit, in the request that committed it (robustly: a broker that refuses is
    logged, and the sweeps send the message later). A broker that took the connection and answered nothing held the
    publish, and so the web server's thread, for good: every request that queued a task (an activation, a paid
    skill call) hung, until the threads ran out and the metered proxy, which needs no broker, hung with them."""
    app.conf.task_always_eager = False
    outcome = []

    def publish():
        try:
            with app.connection_for_write(silent_broker) as connection:
                submit_transaction.apply_async(("transaction-1",), connection=connection)
            outcome.append("published")
        except Exception as error:  # noqa: BLE001 - what the after-commit hook's `robust` logs
            outcome.append(type(error).__name__)

    try:
        started = time.monotonic()
        publisher = threading.Thread(target=publish, daemon=True)
        publisher.start()
        publisher.join(timeout=60)
        elapsed = time.monotonic() - started
    finally:
        app.conf.task_always_eager = True
    assert outcome == ["OperationalError"], f"the publish still waited after {elapsed:.0f} s"
    assert elapsed < settings.BROKER_SOCKET_TIMEOUT_SECONDS * 5


def test_a_beat_message_no_worker_took_in_time_is_dropped_not_run_late_in_a_pile():
    """The beat sends each task at its period whether or not a worker took the last one: with the default queue's
    workers down (a deploy, a crash) or behind (a slow node: a poll of 500 transactions outlasting its 3 s), polls and
    ticks piled up by the thousand, and once workers were back every stale one ran, one after another, ahead of the
    submissions queued behind them. Each beat message now expires after its period (at least a minute, for clocks a
    little apart): a worker drops it unrun, and the next beat does the same work."""
    from celery.beat import Scheduler

    for name, entry in settings.CELERY_BEAT_SCHEDULE.items():
        period = entry["schedule"].total_seconds()
        assert entry.get("options", {}).get("expires") == max(period, 60), name

    published = []
    scheduler = Scheduler(app, schedule={}, lazy=True)
    scheduler.update_from_dict({"poll": settings.CELERY_BEAT_SCHEDULE["poll-confirmations"]})
    task = app.tasks["escrow.tasks.poll_confirmations"]
    original = task.apply_async
    task.apply_async = lambda *args, **options: published.append(options)
    try:
        scheduler.apply_async(scheduler.schedule["poll"], producer=None)
    finally:
        task.apply_async = original
    assert published[0]["expires"] == 60


def test_every_task_is_killed_past_a_hard_time_limit_its_queue_sets_inside_the_brokers_visibility_timeout():
    """A default-queue task had no time limit: one hung on a node, a lock or a statement held its worker slot for
    ever (two slots a worker by default), and the submissions, confirmations and settlements behind it waited. Each
    now has TASK_TIME_LIMIT_SECONDS (the outbound tasks their own, past their exchange's deadline), all of them
    inside the visibility timeout (else Redis delivers a message still running again)."""
    app.loader.import_default_modules()
    ours = {name: task for name, task in app.tasks.items() if not name.startswith("celery.")}
    default_queue = {name for name in ours if _queue(name) == settings.CELERY_TASK_DEFAULT_QUEUE}
    assert MONEY_TASKS <= default_queue
    assert {name: ours[name].time_limit for name in default_queue} == dict.fromkeys(
        default_queue, settings.TASK_TIME_LIMIT_SECONDS)
    assert all(ours[name].time_limit for name in OUTBOUND_TASKS)
    visibility_timeout = settings.CELERY_BROKER_TRANSPORT_OPTIONS["visibility_timeout"]
    assert max(task.time_limit for task in ours.values()) < visibility_timeout
    # The hard limit only: a soft one is an exception raised inside the task, which handlers made for a node's
    # failure would take for one (chain.call's mapping, then an autoretry; the indexer keeping an event as failed).
    assert {name for name, task in ours.items() if task.soft_time_limit} == set()
