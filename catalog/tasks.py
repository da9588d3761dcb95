from celery import shared_task

from catalog import services


@shared_task
def expire_api_keys() -> int:
    return services.api_keys_expire()


@shared_task
def poll_availability() -> int:
    return services.services_availability_poll()
