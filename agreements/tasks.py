from celery import shared_task
from django.conf import settings

from agreements import invocations, metering, services, webhooks
from catalog.models import SKILL_TIMEOUT_MAX_SECONDS


@shared_task
def expire_proposals() -> int:
    return services.agreements_expire_proposals()


@shared_task
def expire_unfunded_past_term() -> int:
    return services.agreements_expire_unfunded_past_term()


@shared_task
def recheck_closed_direct_proposal(agreement_id: str) -> None:
    services.closed_direct_proposal_recheck(agreement_id=agreement_id)


@shared_task
def watch_closed_direct_proposals() -> int:
    return services.closed_direct_proposals_watch()


@shared_task(time_limit=settings.WEBHOOK_TIMEOUT_SECONDS + settings.OUTBOUND_TASK_TIME_LIMIT_MARGIN_SECONDS)
def deliver_webhook(delivery_id: str) -> None:
    webhooks.delivery_attempt(delivery_id=delivery_id)


@shared_task
def retry_due_webhooks() -> int:
    return webhooks.deliveries_retry_due()


@shared_task
def purge_webhook_deliveries() -> int:
    return webhooks.deliveries_purge()


@shared_task
def erase_replaced_webhook_secrets() -> int:
    return webhooks.replaced_secrets_erase()


@shared_task(time_limit=SKILL_TIMEOUT_MAX_SECONDS + settings.OUTBOUND_TASK_TIME_LIMIT_MARGIN_SECONDS)
def run_invocation(invocation_id: str) -> None:
    invocations.invocation_run_in_worker(invocation_id=invocation_id)


@shared_task
def sweep_invocations() -> dict:
    return invocations.invocations_sweep()


@shared_task
def reap_call_intents() -> dict:
    return metering.intents_reap()


@shared_task
def purge_proxy_replays() -> int:
    return services.proxy_replays_purge()
