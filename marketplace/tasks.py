from celery import shared_task

from marketplace import dead_letters, idempotency, second_factor


@shared_task
def prune_admin_access_logs() -> int:
    return second_factor.admin_access_logs_prune()


@shared_task
def purge_expired_idempotency_records() -> int:
    return idempotency.expired_records_purge()


@shared_task
def prune_dead_letters() -> int:
    return dead_letters.records_prune()
