import os

from celery import Celery
from celery.signals import task_prerun

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "marketplace.settings")

app = Celery("marketplace")
app.config_from_object("django.conf:settings", namespace="CELERY")
app.autodiscover_tasks()


@task_prerun.connect
def _log_lines_name_the_task(task_id=None, task=None, **kwargs):
    """In a worker, log records carry the task's id where a request's would be (eager tasks keep the request's)."""
    if not task.request.is_eager:
        from marketplace.logging import agreement_id_var, request_id_var

        request_id_var.set(f"task_{task_id}")
        agreement_id_var.set(None)
