from celery import shared_task
from django.conf import settings

from catalog import services


@shared_task
def expire_api_keys() -> int:
    return services.api_keys_expire()


@shared_task
def collect_unused_search_terms() -> int:
    """Beat: the names and tags no registered service bears."""
    return services.search_terms_collect()


@shared_task
def erase_replaced_proxy_secrets() -> int:
    return services.replaced_proxy_secrets_erase()


@shared_task
def poll_availability() -> int:
    """Beat: one check per Masumi service, each its own task, so a slow seller delays no other."""
    return services.services_availability_poll()


@shared_task(time_limit=settings.MASUMI_SERVICE_TIMEOUT + settings.OUTBOUND_TASK_TIME_LIMIT_MARGIN_SECONDS)
def check_availability(service_id: str) -> None:
    services.service_availability_check(service_id=service_id)
