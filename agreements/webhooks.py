"""Signed webhooks for agreement events.

Deliveries are written in the transaction that records the event (an outbox) and sent by a Celery task after
commit; failures are retried with exponential backoff, and a beat task picks up anything whose message was lost.
Signed as `sdk.webhook_signature` describes and checks (like Stripe's `t=..,v1=..`, a second `v1` during a secret
rotation's overlap); receivers should reject timestamps older than 300 s and dedupe on the event's id: the body's
signed `id`, which `Marketplace-Event-Id` repeats (the header is not signed: `verify(..., event_id=...)` holds it to the
body's).
"""

import contextlib
import json
import secrets
import time
from collections.abc import Collection
from datetime import datetime, timedelta

import httpx
from django.conf import settings
from django.core.serializers.json import DjangoJSONEncoder
from django.db import transaction
from django.db.models import Exists, OuterRef, Q, Value
from django.db.models.functions import Coalesce
from django.utils import timezone

from agreements.models import (
    AgentEventAck,
    AgreementEvent,
    DeliveryStatus,
    PauseReason,
    UsageAgreement,
    WebhookDelivery,
    WebhookSubscription,
)
from catalog import services as catalog_services
from catalog.models import Agent, ApiKey, OwnerToken
from marketplace import outbound, outbound_slots, rotation, sweeps
from marketplace.errors import Conflict, NotFound
from sdk import webhook_signature

_BACKOFF_BASE_SECONDS = 10
RETRY_SWEEP_BATCH = 500  # due deliveries the retry sweep queues a run
_LEASE_MARGIN_SECONDS = 30  # a claimed delivery is not sent by anyone else for its post's timeout plus this
_client = outbound.guarded_client(timeout=httpx.Timeout(10.0))  # each post passes WEBHOOK_TIMEOUT_SECONDS


def _new_secret() -> str:
    return f"whsec_{secrets.token_urlsafe(32)}"


def subscription_create(*, agent: Agent, url: str, event_types: list[str], secret: str = "",
                        created_with: ApiKey | OwnerToken | None = None) -> WebhookSubscription:
    """`secret`: the receiver's own signing secret (the Pægents SDK lets the caller choose it); else a new one.
    `created_with`: the credential of the request (its revocation pauses the subscription:
    `subscriptions_of_revoked_credentials_pause`)."""
    outbound.url_check(url)
    with transaction.atomic():
        # The agent's row, locked, orders two subscriptions at once, so neither passes the count the other makes.
        Agent.objects.select_for_update().filter(pk=agent.pk).first()
        live = WebhookSubscription.objects.filter(agent=agent, is_active=True).count()
        if live >= settings.WEBHOOK_SUBSCRIPTIONS_PER_AGENT:
            raise Conflict(f"The agent already has {live} webhook subscriptions; delete one first.",
                           code="webhook_limit_reached",
                           details={"max_subscriptions": settings.WEBHOOK_SUBSCRIPTIONS_PER_AGENT})
        return WebhookSubscription.objects.create(
            agent=agent, url=url, event_types=event_types, secret=secret or _new_secret(),
            created_with_key=created_with if isinstance(created_with, ApiKey) else None,
            created_with_token=created_with if isinstance(created_with, OwnerToken) else None,
        )


def subscriptions_of_revoked_credentials_pause(*, api_key_ids: list, owner_token_ids: list) -> int:
    """Pause the live subscriptions created with these credentials, which a revocation covers (catalog's
    `credential_revoke`, inside its transaction: registered from AgreementsConfig.ready): one a thief made with a
    stolen token or key sent the victim's agreement events to its URL after the credential was revoked. Paused, not
    deleted: events stay in the agent's inbox, and the owner resumes (with a live credential) what was theirs. One
    already paused keeps its time and now says the revocation (`paused_reason`): its owner, told why, does not resume
    a thief's. How many it marked so, those paused before included."""
    if not api_key_ids and not owner_token_ids:
        return 0
    return WebhookSubscription.objects.filter(
        Q(created_with_key__in=api_key_ids) | Q(created_with_token__in=owner_token_ids), is_active=True,
    ).update(paused_at=Coalesce("paused_at", Value(timezone.now())), paused_reason=PauseReason.CREDENTIAL_REVOKED)


def subscription_rotate_secret(*, subscription: WebhookSubscription,
                               previous_secret_valid_for_seconds: int) -> WebhookSubscription:
    """A new signing secret, used from the next delivery on; the replaced one signs beside it for the seconds given
    (marketplace.rotation). 404 once deleted: a deletion committed since the subscription was read erased its
    secrets, which a rotation written after it would give back to a row that signs nothing."""
    with transaction.atomic():
        # The live row, locked: a deletion waits for the rotation, or the rotation sees it deleted.
        if not WebhookSubscription.objects.select_for_update().filter(pk=subscription.pk, is_active=True).exists():
            raise NotFound("No such webhook subscription.", code="webhook_not_found")
        rotation.rotate(subscription, secret_field="secret", new_secret=_new_secret(),
                        overlap_seconds=previous_secret_valid_for_seconds)
    return subscription


def replaced_secrets_erase(*, now: datetime | None = None) -> int:
    """Erase the secrets rotations replaced whose overlap has ended (beat); how many."""
    return rotation.replaced_secrets_erase(WebhookSubscription, secret_field="secret", now=now)


def subscription_pause(*, subscription: WebhookSubscription, paused: bool) -> WebhookSubscription:
    """Paused: events are not delivered (the agent's inbox, GET /agents/{id}/events, still has them). Idempotent.
    404 once deleted: a deletion committed since the subscription was read left nothing to pause or resume."""
    with transaction.atomic():
        # The live row, locked: a deletion waits for the pause, or the pause sees it deleted.
        live = WebhookSubscription.objects.select_for_update().filter(pk=subscription.pk, is_active=True).first()
        if live is None:
            raise NotFound("No such webhook subscription.", code="webhook_not_found")
        if (live.paused_at is None) == paused:
            live.paused_at = timezone.now() if paused else None
            live.paused_reason = PauseReason.PAUSED_BY_REQUEST if paused else ""
            live.save(update_fields=["paused_at", "paused_reason"])
    return live


def test_event_send(*, agent: Agent) -> list[WebhookDelivery]:
    """Queue a `webhook.test` event to each of the agent's live subscriptions, signed like any other; not to one whose
    last test is still being tried, so that test sends (however many keys make them) keep at most one test delivery,
    with its retries, per subscription in flight."""
    payload = {"id": f"evt_test_{secrets.token_hex(8)}", "type": "webhook.test",
               "created_at": timezone.now().isoformat(), "data": {"agent_id": str(agent.pk)}}
    test_pending = WebhookDelivery.objects.filter(subscription=OuterRef("pk"), event_type="webhook.test",
                                                  status=DeliveryStatus.PENDING)
    deliveries = []
    for subscription in WebhookSubscription.objects.filter(agent=agent, is_active=True, paused_at=None).exclude(
            Exists(test_pending)):
        delivery = WebhookDelivery.objects.create(subscription=subscription, event_type="webhook.test",
                                                  payload=payload, next_attempt_at=timezone.now())
        _send_after_commit(delivery.pk)
        deliveries.append(delivery)
    return deliveries


def event_ack(*, agent: Agent, event: AgreementEvent) -> AgentEventAck:
    """Mark an inbox event handled. Idempotent."""
    ack, _ = AgentEventAck.objects.get_or_create(agent=agent, event=event)
    return ack


# Set at creation and changed by operators alone: written as the operator's form has them.
_OPERATOR_FIELDS = ("url", "event_types")
# Changed by the API too: written only when the operator changed them, else a save of the row read as the operator's
# post began undid what the API committed since (a deletion: the row live again; a pause or resume).
_OPERATOR_TOGGLES = ("is_active", "paused_at")


def subscription_operator_check(*, subscription: WebhookSubscription, operator) -> None:
    """403 `operator_owns_a_seller` when an operator who owns a seller agent would change another owner's
    subscription (`catalog_services.operator_owns_a_seller_check`): pointed at their own server, a competitor's
    sales and buyers reached them as they happened; deleted or paused, the competitor heard of none."""
    catalog_services.operator_owns_a_seller_check(owner_id=subscription.agent.owner_id, operator=operator,
                                                  does="changes this webhook subscription")


def subscription_update_by_operator(*, subscription: WebhookSubscription, changed: Collection[str]) -> None:
    """An operator's save (the admin's form) of `subscription`, whose fields hold the form's values; `changed` names
    those the operator changed. Never its secrets (a rotation committed since stays); a subscription unticked is
    deleted as the API deletes it (its secrets erased, its deliveries ended)."""
    fields = [*_OPERATOR_FIELDS, *(name for name in _OPERATOR_TOGGLES if name in changed)]
    if "paused_at" in fields:
        subscription.paused_reason = PauseReason.PAUSED_BY_OPERATOR if subscription.paused_at else ""
        fields.append("paused_reason")
    subscription.save(update_fields=fields)
    if "is_active" in fields and not subscription.is_active:
        subscription_delete(subscription=subscription)


_SUBSCRIPTION_DELETED = "the subscription was deleted"
# A pending delivery a worker takes: its subscription's, unless paused; or one of a deleted subscription, which is
# ended as failed. An event's transaction may write a delivery after the deletion that ended the pending ones
# committed (it read the subscription live before): the delivery's own send, or the retry sweep, ends it.
_TAKEN = Q(subscription__paused_at=None) | Q(subscription__is_active=False)


def subscription_delete(*, subscription: WebhookSubscription) -> None:
    """Nothing more goes to its URL: its pending deliveries end as failed, saying why, rather than pending for ever.
    It signs nothing more, so its secrets are erased (a replay of its creation then answers the secret null)."""
    with transaction.atomic():
        WebhookSubscription.objects.filter(pk=subscription.pk).update(
            is_active=False, deleted_at=timezone.now(), secret="", previous_secret="", previous_secret_expires_at=None)
        WebhookDelivery.objects.filter(subscription_id=subscription.pk, status=DeliveryStatus.PENDING).update(
            status=DeliveryStatus.FAILED, last_error=_SUBSCRIPTION_DELETED)


# The type of an event saying that a reorg deeper than the confirmation depth undid a status the parties were told of
# (`agreement_chain_rollback`: an activation, a payout the chain no longer holds): `data.from_status` is the status
# undone, `data.status` the one the agreement is back in until the chain has it again. Typed by its status, it read as
# a step forward (`agreement.settling` after `agreement.settled`), and a subscriber of the undone status alone, who may
# have acted on it, was told nothing.
UNDONE_EVENT_TYPE = "agreement.undone"


def event_type_of(event: AgreementEvent) -> str:
    """`agreement.<status>`, or `agreement.undone` for a reorg's move back."""
    return UNDONE_EVENT_TYPE if event.data.get("reorg") else f"agreement.{event.to_status}"


def event_types_told(event: AgreementEvent) -> set[str]:
    """The subscribed types an event is sent for: its own; an undo also to whoever subscribed to the status undone
    (it may have acted on it) or to the one the agreement is back in."""
    event_type = event_type_of(event)
    if event_type != UNDONE_EVENT_TYPE:
        return {event_type}
    return {event_type, f"agreement.{event.from_status}", f"agreement.{event.to_status}"}


def event_payload(agreement: UsageAgreement, event: AgreementEvent, event_type: str) -> dict:
    """The event as both parties are told it; `data.used_by` when it names the transfer that paid the seller (a closed
    direct purchase found paid keeps its status: the status alone would read as a repeat of its close); `data.code`
    when it names why (a direct purchase's payment failed, an accept its buyer's policy refused)."""
    used_by, code = event.data.get("used_by"), event.data.get("code")
    return {
        "id": f"evt_{event.pk}",
        "type": event_type,
        "created_at": event.created_at.isoformat(),
        "data": {
            "agreement_id": str(agreement.pk),
            "status": event.to_status,  # the event's, as it was sent: an inbox read later gives the same
            "from_status": event.from_status,
            "reason": event.reason,
            "buyer": agreement.buyer.handle,
            "seller": agreement.seller.handle,
            "service_id": str(agreement.service_id),
            **({"used_by": used_by} if used_by else {}),
            **({"code": code} if code else {}),  # a failure's or refusal's machine-readable code
        },
    }


def queue_for_event(agreement: UsageAgreement, event: AgreementEvent) -> None:
    event_type, told = event_type_of(event), event_types_told(event)
    subscriptions = WebhookSubscription.objects.filter(
        agent_id__in=[agreement.buyer_id, agreement.seller_id], is_active=True, paused_at=None
    )
    payload = event_payload(agreement, event, event_type)
    for subscription in subscriptions:
        if subscription.event_types and told.isdisjoint(subscription.event_types):
            continue
        delivery = WebhookDelivery.objects.create(
            subscription=subscription, event_type=event_type, payload=payload, next_attempt_at=timezone.now()
        )
        _send_after_commit(delivery.pk)


def _send_after_commit(delivery_id, countdown: float = 0) -> None:
    from agreements.tasks import deliver_webhook

    # robust: with the broker down the delivery stays pending and the retry sweep sends it.
    transaction.on_commit(lambda: deliver_webhook.apply_async((str(delivery_id),), countdown=countdown), robust=True)


def delivery_attempt(*, delivery_id) -> WebhookDelivery | None:
    """Send one delivery if it is due, with no database lock or transaction held while posting.

    Shared fairly: an attempt is made only while its receiving host and its subscription's owner each have fewer
    than their share of attempts in flight (WEBHOOK_ATTEMPTS_IN_FLIGHT_PER_HOST, _PER_OWNER; marketplace.outbound_slots);
    otherwise it is put off (not counted as an attempt; `outbound_slots.put_off_seconds`), so that receivers that never answer hold
    no more than those shares of the outbound workers.

    The attempt is claimed first and committed: `attempts` counts it and `next_attempt_at` moves past the post's
    timeout (a lease), so no other worker sends it meanwhile. The outcome is written only while that claim is
    still the row's. A worker that dies mid-post leaves the lease to run out and the retry sweep sends again:
    delivery is at least once, and receivers dedupe on `Marketplace-Event-Id`. A delivery claimed
    WEBHOOK_MAX_ATTEMPTS times ends failed at its next claim, whether or not its last attempt wrote an outcome."""
    with contextlib.ExitStack() as slots:  # the attempt's slots, given back as it ends
        return _attempt(delivery_id, slots)


def _shares(subscription: WebhookSubscription) -> list[tuple[str, int]]:
    return [(f"webhook-host:{outbound_slots.host_of(subscription.url)}", settings.WEBHOOK_ATTEMPTS_IN_FLIGHT_PER_HOST),
            (f"webhook-owner:{subscription.agent.owner_id}", settings.WEBHOOK_ATTEMPTS_IN_FLIGHT_PER_OWNER)]


def _attempt(delivery_id, slots: contextlib.ExitStack) -> WebhookDelivery | None:
    now = timezone.now()
    lease_seconds = settings.WEBHOOK_TIMEOUT_SECONDS + _LEASE_MARGIN_SECONDS
    with transaction.atomic():
        # The delivery's row alone: its subscription's too (skip-locked) made a claim of another delivery to it at
        # the same moment, a common pair (two events of one commit), skip it until the retry sweep. A deletion or
        # pause committed meanwhile is read by the next claim; one committed before is seen here.
        delivery = (
            WebhookDelivery.objects.select_for_update(skip_locked=True, of=("self",))
            .select_related("subscription__agent")
            .filter(_TAKEN, pk=delivery_id, status=DeliveryStatus.PENDING, next_attempt_at__lte=now).first()
        )
        if delivery is None:
            return None
        if not delivery.subscription.is_active:  # nothing more goes to its URL
            delivery.status, delivery.last_error = DeliveryStatus.FAILED, _SUBSCRIPTION_DELETED
            delivery.save(update_fields=["status", "last_error"])
            return delivery
        if delivery.attempts >= settings.WEBHOOK_MAX_ATTEMPTS:  # the last claim ended with no outcome: its worker died
            delivery.status = DeliveryStatus.FAILED
            delivery.last_error = f"gave up after {delivery.attempts} attempts, the last with no outcome recorded"
            delivery.save(update_fields=["status", "last_error"])
            return delivery
        if not slots.enter_context(outbound_slots.held(_shares(delivery.subscription), lease_seconds=lease_seconds)):
            delay = outbound_slots.put_off_seconds(delivery.put_offs)
            # Its message queued again, due then: the sweep queues no other unless that one is lost.
            delivery.next_attempt_at = delivery.queued_at = now + timedelta(seconds=delay)
            delivery.put_offs += 1
            delivery.save(update_fields=["next_attempt_at", "queued_at", "put_offs"])
            _send_after_commit(delivery.pk, countdown=delay)
            return delivery
        delivery.attempts += 1
        delivery.next_attempt_at, delivery.queued_at = now + timedelta(seconds=lease_seconds), None
        delivery.save(update_fields=["attempts", "next_attempt_at", "queued_at"])
    body = json.dumps(delivery.payload, cls=DjangoJSONEncoder, separators=(",", ":")).encode()
    subscription = delivery.subscription
    headers = {
        "Content-Type": "application/json",
        webhook_signature.SIGNATURE_HEADER: webhook_signature.sign(
            subscription.secret, body, int(time.time()),
            previous_secret=rotation.previous_secret(subscription, "secret", now=now)),
        "Marketplace-Event-Id": delivery.payload["id"],
        "Marketplace-Event-Type": delivery.event_type,
        "User-Agent": "agent-escrow-marketplace-webhooks/1",
    }
    status_code = None
    try:
        # Streamed and closed unread: only the status matters, and a receiver's body (endless, dripped, a gzip
        # bomb) must neither hold the worker past its lease nor fill its memory. The deadline bounds the whole
        # post, a head sent a byte at a time included.
        with (outbound.deadline(settings.WEBHOOK_TIMEOUT_SECONDS),
              _client.stream("POST", subscription.url, content=body, headers=headers,
                             timeout=settings.WEBHOOK_TIMEOUT_SECONDS) as response):
            status_code = response.status_code
        ok, error = response.is_success, "" if response.is_success else f"HTTP {response.status_code}"
    except outbound.HTTPX_UNREACHABLE as exc:
        ok, error = False, f"{type(exc).__name__}: {exc}"[:500]
    with transaction.atomic():
        claimed = WebhookDelivery.objects.select_for_update().filter(
            pk=delivery.pk, status=DeliveryStatus.PENDING, attempts=delivery.attempts,
            next_attempt_at=delivery.next_attempt_at).exists()
        if not claimed:
            return None  # the lease ran out and another worker took over, or an operator asked to redeliver
        delivery.last_status_code = status_code if status_code is not None else delivery.last_status_code
        delivery.last_error = error
        if ok:
            delivery.status = DeliveryStatus.DELIVERED
            delivery.delivered_at = timezone.now()
        elif delivery.attempts >= settings.WEBHOOK_MAX_ATTEMPTS:
            delivery.status = DeliveryStatus.FAILED
        else:
            delay = _BACKOFF_BASE_SECONDS * 2 ** (delivery.attempts - 1)
            # Its retry's message is queued, due then: the sweep queues no other unless that one is lost.
            delivery.next_attempt_at = delivery.queued_at = timezone.now() + timedelta(seconds=delay)
            _send_after_commit(delivery.pk, countdown=delay)
        delivery.save()
    return delivery


def deliveries_retry_due(*, now: datetime | None = None) -> int:
    """Re-enqueue due deliveries whose task message was lost (worker killed, broker restarted), the longest due first,
    RETRY_SWEEP_BATCH a run. One whose message is queued (by this sweep, or with a countdown: a retry, a put-off)
    is queued again only once no worker took that message within WEBHOOK_REQUEUE_AFTER_SECONDS of its due time:
    while the outbound queue is behind, each run added the same deliveries to it again, and took the same first rows
    each time; and each retry falling due was queued twice, by its countdown and by the sweep."""
    now = now or timezone.now()
    due = (WebhookDelivery.objects.filter(_TAKEN, status=DeliveryStatus.PENDING, next_attempt_at__lte=now)
           .filter(Q(queued_at=None)
                   | Q(queued_at__lte=now - timedelta(seconds=settings.WEBHOOK_REQUEUE_AFTER_SECONDS))))
    pks = list(due.order_by("next_attempt_at").values_list("pk", flat=True)[:RETRY_SWEEP_BATCH])
    from agreements.tasks import deliver_webhook

    sweeps.marked_rows_publish(model=WebhookDelivery, pks=pks, marked="queued_at", now=now,
                               publish=deliver_webhook.delay)
    return len(pks)


def delivery_redeliver(*, delivery: WebhookDelivery) -> WebhookDelivery:
    """Operator or agent asks to send a delivered or failed event again. Not a pending one (409): replayed again and
    again, its attempts reset and a post queued each time, it was posted without end. Not a deleted subscription's:
    nothing more goes to its URL, and the delivery would stay pending for ever."""
    with transaction.atomic():
        # The subscription's row held until the delivery is pending: a deletion committed between the check and the
        # write left it pending (the 202 saying queued) for a subscription that sends nothing. A deletion now waits,
        # then ends it failed as it ends every pending one; one committed first is seen here.
        if not WebhookSubscription.objects.select_for_update().filter(
                pk=delivery.subscription_id, is_active=True).values_list("pk", flat=True):
            raise Conflict("The delivery's webhook subscription was deleted: nothing more is sent to it.",
                           code="webhook_subscription_deleted")
        ended = WebhookDelivery.objects.filter(pk=delivery.pk,
                                               status__in=[DeliveryStatus.DELIVERED, DeliveryStatus.FAILED])
        if not ended.update(status=DeliveryStatus.PENDING, next_attempt_at=timezone.now(), attempts=0, put_offs=0):
            raise Conflict("The delivery is still being tried; replay it once it is delivered or has failed.",
                           code="webhook_delivery_pending")
        _send_after_commit(delivery.pk)
    delivery.refresh_from_db()
    return delivery


def deliveries_purge(*, now: datetime | None = None) -> int:
    """Delete the deliveries delivered or given up whose last attempt was more than WEBHOOK_DELIVERY_KEEP_DAYS ago,
    then the subscriptions deleted that long ago with no delivery left, a bounded number of each a run
    (`sweeps.rows_purge`); how many rows (each event makes one delivery per subscription, and nothing else deleted
    them, nor deleted subscriptions). Their events stay in the agents' inboxes. A pending delivery is kept, however
    late; safe twice."""
    cutoff = (now or timezone.now()) - timedelta(days=settings.WEBHOOK_DELIVERY_KEEP_DAYS)
    # Each status a range of delivery_due_idx, which holds no pending delivery. The rule again on delete: one
    # redelivered meanwhile is pending, with a new next attempt.
    deleted = sum(sweeps.rows_purge(deletable=WebhookDelivery.objects.filter(status=status, next_attempt_at__lt=cutoff),
                                    order_by=("next_attempt_at",))
                  for status in (DeliveryStatus.DELIVERED, DeliveryStatus.FAILED))
    # Deleted that long ago: no event's transaction still holds it as live (a delivery to it would fail its commit).
    gone = WebhookSubscription.objects.filter(is_active=False, deleted_at__lt=cutoff).exclude(
        Exists(WebhookDelivery.objects.filter(subscription=OuterRef("pk"))))
    return deleted + sweeps.rows_purge(deletable=gone, order_by=("deleted_at",))
