from celery import shared_task

from marketplace import second_factor


@shared_task
def prune_admin_access_logs() -> int:
    return second_factor.admin_access_logs_prune()
