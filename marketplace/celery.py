import os
import time

from celery import Celery, Task, bootsteps
from celery.signals import before_task_publish, task_prerun, worker_shutting_down

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "marketplace.settings")


class BoundedRedeliveryTask(Task):
    """Every task: a message redelivered because its process died runs at most TASK_MAX_REDELIVERIES more times,
    then is a dead letter (marketplace.dead_letters); a beat task's message published before a run of it started is
    dropped (marketplace.beat_runs)."""

    def __call__(self, *args, **kwargs):
        if self.request.called_directly:  # a plain function call, not a delivered message
            return super().__call__(*args, **kwargs)
        if not self.request.is_eager:
            from marketplace import beat_runs

            if beat_runs.superseded(task_name=self.name, published_at=self.request.get("published_at")):
                return None
        if not self.request.is_eager and (self.request.delivery_info or {}).get("redelivered"):
            from marketplace import dead_letters

            if not dead_letters.redelivery_allowed(task_id=self.request.id, task_name=self.name, args=args,
                                                   kwargs=kwargs):
                return None
        # As Celery's tracer calls a task without a __call__ of its own: under the request it pushed (retries use it).
        return self.run(*args, **kwargs)


app = Celery("marketplace", task_cls=BoundedRedeliveryTask)
app.config_from_object("django.conf:settings", namespace="CELERY")
app.autodiscover_tasks()


# The requests a worker held when told to stop (marketplace.dead_letters.given_back_unrun_note).
_held_when_stopping: list = []


@worker_shutting_down.connect
def _requests_held_when_stopping_kept(**kwargs):
    """Run inside the signal handler: a snapshot only, no I/O (the main thread may be inside a cache call)."""
    from celery.worker import state

    _held_when_stopping[:] = [*state.reserved_requests, *state.scheduled_requests]


class GivenBackUnrunNoted(bootsteps.StartStopStep):
    """At the consumer's shutdown, before its connection closes and gives the broker back the messages it holds
    unacknowledged: those of the requests held when the worker was told to stop that never started, noted so that
    their redelivery counts no step towards a dead letter. The consumer's own close has forgotten them by then,
    hence the snapshot. One that started since (its pool process took it during the warm shutdown) is not noted."""

    requires = ("celery.worker.consumer.tasks:Tasks",)  # shut down before the connection is

    def shutdown(self, c):
        from marketplace import dead_letters

        dead_letters.given_back_unrun_note(
            task_ids=[request.id for request in _held_when_stopping if request.time_start is None])
        _held_when_stopping.clear()


app.steps["consumer"].add(GivenBackUnrunNoted)


@before_task_publish.connect
def _messages_carry_when_they_were_published(headers=None, **kwargs):
    """Each publish stamped with its own time (a retry's anew), for marketplace.beat_runs."""
    if headers is not None:
        headers["published_at"] = time.time()


@task_prerun.connect
def _log_lines_name_the_task(task_id=None, task=None, **kwargs):
    """In a worker, log records carry the task's id where a request's would be (eager tasks keep the request's)."""
    if not task.request.is_eager:
        from marketplace.logging import agreement_id_var, request_id_var

        request_id_var.set(f"task_{task_id}")
        agreement_id_var.set(None)
