from celery import shared_task

from policies import services


@shared_task
def expire_approvals() -> int:
    return services.approvals_expire()
