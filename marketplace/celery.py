import os

from celery import Celery, Task
from celery.signals import task_prerun

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "marketplace.settings")


class BoundedRedeliveryTask(Task):
    """Every task: a message redelivered because its process died runs at most TASK_MAX_REDELIVERIES more times,
    then is a dead letter (marketplace.dead_letters)."""

    def __call__(self, *args, **kwargs):
        if self.request.called_directly:  # a plain function call, not a delivered message
            return super().__call__(*args, **kwargs)
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


@task_prerun.connect
def _log_lines_name_the_task(task_id=None, task=None, **kwargs):
    """In a worker, log records carry the task's id where a request's would be (eager tasks keep the request's)."""
    if not task.request.is_eager:
        from marketplace.logging import agreement_id_var, request_id_var

        request_id_var.set(f"task_{task_id}")
        agreement_id_var.set(None)
