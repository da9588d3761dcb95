import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import UTC, timedelta
from functools import lru_cache

from django.conf import settings
from django.core.exceptions import ValidationError
from django.db import connection
from django.db.models import Count, Exists, F, OuterRef, Q, QuerySet, Sum
from django.db.models.functions import TruncDay, TruncHour

from agreements import x402_protocol
from agreements.invocations import invocation_payment_status as invocation_payment_status
from agreements.invocations import invocation_pk as invocation_pk
from agreements.invocations import invocation_price as invocation_price
from agreements.invocations import invocation_seller_share as invocation_seller_share
from agreements.models import (
    APPROVAL_SUBJECT,
    AUTHORIZATION_WATCHED,
    ONCHAIN_STATUSES,
    TRANSITIONS,
    AgentEventAck,
    AgreementEvent,
    AgreementStatus,
    DeliveryStatus,
    InvocationMoney,
    SettlementModel,
    SkillInvocation,
    UsageAgreement,
    UsageEvent,
    WebhookDelivery,
    WebhookSubscription,
)
from agreements.webhooks import UNDONE_EVENT_TYPE
from catalog.models import Agent, Service
from marketplace import chainconfig, rotation
from marketplace.caching import for_a_second
from marketplace.errors import NotFound
from marketplace.pagination import cursor_after, paginate
from marketplace.postgresql import prepared_cursor
from marketplace.rows import model_columns
from policies.models import ApprovalRequest


def _with_relations(agreements: QuerySet[UsageAgreement]) -> QuerySet[UsageAgreement]:
    return agreements.select_related("buyer", "seller", "service")


def agreements_of_agent(*, agent: Agent, role: str | None = None, status: str | None = None
                        ) -> QuerySet[UsageAgreement]:
    parties = {"buyer": Q(buyer=agent), "seller": Q(seller=agent)}
    visible = parties[role] if role else parties["buyer"] | parties["seller"]
    agreements = UsageAgreement.objects.filter(visible)
    if status:
        agreements = agreements.filter(status=status)
    return _with_relations(agreements)


AGREEMENT_LISTING_ORDER = ["-created_at", "id"]


def agreements_page_of_agent(*, agent: Agent, role: str | None, status: str | None, cursor: str | None,
                             limit: int) -> tuple[list[UsageAgreement], str | None]:
    """A page of the agent's agreements, newest first, and the cursor of the next. Each role's are read by range in
    that party's index; without a role, "buyer or seller" is in no index's order (a page read and sorted every
    agreement the agent had), so a page of each role is read and the two merged (no agreement is in both)."""
    if role:
        return paginate(agreements_of_agent(agent=agent, role=role, status=status),
                        ordering=AGREEMENT_LISTING_ORDER, cursor=cursor, limit=limit)
    pages = [paginate(agreements_of_agent(agent=agent, role=party, status=status),
                      ordering=AGREEMENT_LISTING_ORDER, cursor=cursor, limit=limit) for party in ("buyer", "seller")]
    rows = sorted((row for page, _ in pages for row in page), key=lambda row: row.id)
    rows.sort(key=lambda row: row.created_at, reverse=True)  # stable: newest first, then by id
    more = len(rows) > limit or any(after is not None for _, after in pages)
    rows = rows[:limit]
    if not more or not rows:
        return rows, None
    return rows, cursor_after([rows[-1].created_at, rows[-1].id], ordering=AGREEMENT_LISTING_ORDER)


def usage_events_and_signer_of_party(*, agreement_id, agent: Agent) -> tuple[QuerySet[UsageEvent], str]:
    """The usage events of an agreement the agent is party to (404 otherwise, as agreement_get), with the address that
    signs its receipts (`receipt_signer_of`): one read of the agreement's own row, not of its parties and service,
    which was most of a usage page's CPU."""
    found = list(agreements_of_agent(agent=agent).filter(pk=agreement_id).values_list("receipt_signer", flat=True)[:1])
    if not found:
        raise NotFound("No such agreement.", code="agreement_not_found")
    return UsageEvent.objects.filter(agreement_id=agreement_id), receipt_signer_of(found[0])


def escrows_naming_unconfigured_signers() -> dict[str, int]:
    """{receipt signer: open escrows naming it} for the signers whose key is configured neither as
    RECEIPT_SIGNER_PRIVATE_KEY nor among RECEIPT_SIGNER_RETIRED_PRIVATE_KEYS: their usage cannot be charged (no
    receipt the buyer or the contract accepts can be signed) and their settlement proposes only the receipts signed
    before the key went. /readyz, `manage.py check --database default` and `reconcile` report them."""
    open_statuses = [status for status in ONCHAIN_STATUSES if TRANSITIONS.get(status)]
    named = (UsageAgreement.objects.filter(status__in=open_statuses).exclude(receipt_signer="")
             .values("receipt_signer").annotate(escrows=Count("id")).values_list("receipt_signer", "escrows"))
    return {signer: escrows for signer, escrows in named if chainconfig.receipt_signer_key(signer) is None}


def receipt_signer_of(receipt_signer: str) -> str:
    """The address that signs the receipts of an agreement whose escrow names `receipt_signer` (blank: not recorded,
    the current signer)."""
    return receipt_signer or chainconfig.receipt_signer_address()


def agreement_get(*, agreement_id, agent: Agent | None) -> UsageAgreement:
    """An agreement the agent is party to (404 otherwise, so existence does not leak); any when agent is None."""
    agreements = UsageAgreement.objects.all() if agent is None else agreements_of_agent(agent=agent)
    agreement = _with_relations(agreements).filter(pk=agreement_id).first()
    if agreement is None:
        raise NotFound("No such agreement.", code="agreement_not_found")
    return agreement


_PARTY_SUMMARY = ("id", "handle", "display_name", "wallet_address")


# The reverse side of a Masumi purchase's agreement (escrow's model, reached through the relation, not imported).
_MASUMI_PURCHASE = UsageAgreement._meta.get_field("masumi_purchase")


@lru_cache(maxsize=2)
def _report_statement(*, lock: bool) -> tuple[str, list]:
    """agreement_for_report's SELECT (by agreement id and party) and the columns of what it reads: built once per
    process (compiling the same query with select_related and only() per request cost more CPU than running it).
    With `lock`, every field of the agreement, under its row lock."""
    quote, agreement_model = connection.ops.quote_name, UsageAgreement
    purchase = _MASUMI_PURCHASE.related_model._meta
    parts = [model_columns(agreement_model, "a", None if lock else ("id", "buyer", "seller", "service")),
             model_columns(Agent, "b", _PARTY_SUMMARY), model_columns(Agent, "s", _PARTY_SUMMARY),
             model_columns(Service, "v", ("id", "name", "upstream_protocol")),
             model_columns(purchase.model, "m", ("id", "agreement")), model_columns(ApprovalRequest, "r")]
    meta, approval = agreement_model._meta, ApprovalRequest._meta
    column = {name: f"a.{quote(meta.get_field(name).column)}" for name in ("id", "buyer", "seller", "service")}
    agents, services = quote(Agent._meta.db_table), quote(Service._meta.db_table)
    return (f"SELECT {', '.join(part.select for part in parts)} FROM {quote(meta.db_table)} a "  # noqa: S608
            f"JOIN {agents} b ON b.{quote(Agent._meta.pk.column)} = {column['buyer']} "
            f"JOIN {agents} s ON s.{quote(Agent._meta.pk.column)} = {column['seller']} "
            f"JOIN {services} v ON v.{quote(Service._meta.pk.column)} = {column['service']} "
            f"LEFT JOIN {quote(purchase.db_table)} m ON m.{quote(purchase.get_field('agreement').column)} = "
            f"{column['id']} "
            f"LEFT JOIN {quote(approval.db_table)} r ON r.{quote(approval.get_field('subject_type').column)} = %s "
            f"AND r.{quote(approval.get_field('subject_id').column)} = {column['id']} "
            f"WHERE {column['id']} = %s AND ({column['buyer']} = %s OR {column['seller']} = %s)"
            + (_row_lock_clause() if lock else ""), parts)


def _row_lock_clause() -> str:
    """The agreement's row lock (not its parties' or service's), as far as the database has one."""
    features = connection.features
    return " FOR UPDATE OF a" if features.has_select_for_update_of else \
        " FOR UPDATE" if features.has_select_for_update else ""


def agreement_for_report(*, agreement_id, agent_id: uuid.UUID, lock: bool = False) -> tuple[UsageAgreement, dict]:
    """What a seller's usage report reads of the agreement, in one statement: the agreement if the agent is party
    to it (404 otherwise, as agreement_get), with the parties and service its answer names, its Masumi purchase if
    it is one (cached as `masumi_purchase`, None included: a report on one is refused), and its approval
    request ({agreement id: approval}, as `agreement_payload` takes them; no charge changes it).

    Without `lock` its own fields are left deferred: `metering.usage_record` (or `usage_record_running_total`)
    reads them under the row lock, and a report that stops before (invalid, not the seller's) never reads them.
    With `lock` (in a transaction) they are read under the row lock, held to the commit: what
    `metering.usage_record(locked=True)` takes. Half the CPU of agreement_get, in Python and in PostgreSQL's
    planning of the wider join; the statement is built once (`_report_statement`) and prepared on the server."""
    sql, (agreement_part, buyer_part, seller_part, service_part, purchase_part, approval_part) = \
        _report_statement(lock=lock)
    try:
        agreement_pk = UsageAgreement._meta.pk.to_python(agreement_id)
    except ValidationError:
        raise NotFound("No such agreement.", code="agreement_not_found") from None
    pk = UsageAgreement._meta.pk.get_db_prep_value(agreement_pk, connection)
    agent_pk = Agent._meta.pk.get_db_prep_value(agent_id, connection)
    with prepared_cursor() as cursor:
        cursor.execute(sql, [APPROVAL_SUBJECT, pk, agent_pk, agent_pk])
        row = cursor.fetchone()
    if row is None:
        raise NotFound("No such agreement.", code="agreement_not_found")
    values = iter(row)
    agreement = agreement_part.instance(values)
    for part, relation in ((buyer_part, "buyer"), (seller_part, "seller"), (service_part, "service")):
        UsageAgreement._meta.get_field(relation).set_cached_value(agreement, part.instance(values))
    # Cached even when there is none, so that `hasattr(agreement, "masumi_purchase")` asks nothing more.
    purchase = purchase_part.instance(values)
    _MASUMI_PURCHASE.set_cached_value(agreement, purchase if purchase.pk is not None else None)
    approval = approval_part.instance(values) if row[-len(approval_part.attnames)] is not None else None
    return agreement, {} if approval is None else {agreement.pk: approval}


@dataclass(frozen=True)
class CallTerms:
    """What forwarding and billing a metered call read of its agreement: fixed once it is active (parties, price,
    deposit, chain identity) and the service's upstream and proxy secrets, which a seller may change (seen within
    CREDENTIAL_CACHE_SECONDS). Its status and counters are not here: the reservation checks them in the database,
    for each call or each lease of calls (agreements.metering, "Call leases")."""

    pk: uuid.UUID
    onchain_id: str
    chain_id: int
    token: str
    buyer_id: uuid.UUID
    seller_id: uuid.UUID
    pricing_type: str
    price_per_unit: int
    deposit_amount: int
    upstream_base_url: str
    proxy_secret: str
    previous_proxy_secret: str  # "" unless a rotation's overlap ran when the terms were read
    receipt_signer: str  # the escrow's (blank: not recorded, the current one): its key signs the call's receipt
    masumi_purchase: bool  # a Masumi purchase's agreement: paid for by its job result alone, no proxied call


_CALL_TERMS_OF_AGREEMENT = ("id", "chain_id", "token", "buyer", "seller", "pricing_type", "price_per_unit",
                            "deposit_amount", "receipt_signer")
_CALL_TERMS_OF_SERVICE = ("id", "upstream_base_url", "proxy_secret", "previous_proxy_secret",
                          "previous_proxy_secret_expires_at")


@lru_cache(maxsize=1)
def _call_terms_statement() -> tuple[str, list]:
    """_call_terms' SELECT and the columns it reads, built once per process: it runs once a second per agreement in
    every process, and the ORM's query (select_related and only) took 0.72 ms of CPU against 0.16 ms for this one
    (1.81 against 0.66 ms after an idle wait; bench/HISTORY.md, fifteenth session)."""
    quote, meta = connection.ops.quote_name, UsageAgreement._meta
    parts = [model_columns(UsageAgreement, "a", _CALL_TERMS_OF_AGREEMENT),
             model_columns(Service, "v", _CALL_TERMS_OF_SERVICE)]
    purchase = meta.get_field("masumi_purchase")  # escrow's MasumiPurchase (one at most), by its relation
    purchases = purchase.related_model._meta
    columns = f"{', '.join(part.select for part in parts)}, p.{quote(purchases.pk.column)} IS NOT NULL"
    return (f"SELECT {columns} FROM {quote(meta.db_table)} a "  # noqa: S608
            f"JOIN {quote(Service._meta.db_table)} v ON v.{quote(Service._meta.pk.column)} = "
            f"a.{quote(meta.get_field('service').column)} "
            f"LEFT JOIN {quote(purchases.db_table)} p ON p.{quote(purchase.field.column)} = a.{quote(meta.pk.column)} "
            f"WHERE a.{quote(meta.pk.column)} = %s", parts)


@for_a_second(key=lambda agreement_id: agreement_id)
def _call_terms(agreement_id) -> CallTerms | None:
    sql, (agreement_part, service_part) = _call_terms_statement()
    try:
        pk = UsageAgreement._meta.pk.get_db_prep_value(UsageAgreement._meta.pk.to_python(agreement_id), connection)
    except ValidationError:
        return None
    with prepared_cursor() as cursor:
        cursor.execute(sql, [pk])
        row = cursor.fetchone()
    if row is None:
        return None
    values = iter(row)
    agreement, service = agreement_part.instance(values), service_part.instance(values)
    return CallTerms(pk=agreement.pk, onchain_id=agreement.onchain_id, chain_id=agreement.chain_id,
                     token=agreement.token, buyer_id=agreement.buyer_id, seller_id=agreement.seller_id,
                     pricing_type=agreement.pricing_type, price_per_unit=agreement.price_per_unit,
                     deposit_amount=agreement.deposit_amount, upstream_base_url=service.upstream_base_url,
                     proxy_secret=service.proxy_secret,
                     previous_proxy_secret=rotation.previous_secret(service, "proxy_secret"),
                     receipt_signer=agreement.receipt_signer, masumi_purchase=bool(next(values)))


def agreement_for_call(*, agreement_id, agent_id) -> CallTerms:
    """The call terms of an agreement the agent is party to, read at most once a second per process (this runs on
    every proxied call); 404 otherwise, as agreement_get."""
    terms = _call_terms(agreement_id)
    if terms is None or agent_id not in (terms.buyer_id, terms.seller_id):
        raise NotFound("No such agreement.", code="agreement_not_found")
    return terms


def agreement_events(*, agreement: UsageAgreement) -> QuerySet[AgreementEvent]:
    return agreement.events.all()


def webhook_subscriptions_of(*, agent: Agent) -> QuerySet[WebhookSubscription]:
    return agent.webhook_subscriptions.filter(is_active=True).order_by("-created_at")


def webhook_subscription_get(*, agent: Agent, subscription_id) -> WebhookSubscription:
    subscription = webhook_subscriptions_of(agent=agent).filter(pk=subscription_id).first()
    if subscription is None:
        raise NotFound("No such webhook subscription.", code="webhook_not_found")
    return subscription


def webhook_deliveries(*, subscription: WebhookSubscription) -> QuerySet[WebhookDelivery]:
    return subscription.deliveries.all()


def usage_events(*, agreement: UsageAgreement):
    return agreement.usage_events.all()


def last_usage_event(*, agreement: UsageAgreement) -> UsageEvent | None:
    return agreement.usage_events.order_by("-seq").first()


def calls_stale_before(*, now):
    """Calls reserved before this belong to a process that died (agreements.metering's rule): a call may start up
    to PROXY_CALL_LEASE_SECONDS after its reservation (a leased one) and run for the proxy's timeout, and
    PROXY_INTENT_GRACE_SECONDS more are allowed for."""
    return now - timedelta(seconds=settings.PROXY_TIMEOUT + settings.PROXY_CALL_LEASE_SECONDS
                           + settings.PROXY_INTENT_GRACE_SECONDS)


def agreements_ready_to_propose(*, stale_reservation_before):
    """Active agreements asked to complete, with no call in flight (or only reservations older than any call)."""
    return UsageAgreement.objects.filter(status=AgreementStatus.ACTIVE, completion_requested_at__isnull=False).filter(
        Q(reserved=0) | Q(completion_requested_at__lt=stale_reservation_before))


def agreements_proposed_below_their_last_receipt(*, now):
    """In challenge, the window still open, with a usage receipt of a higher seq than the one proposed on-chain (a
    seller's proposal of one of its earlier receipts), or with receipts and no record of the seq proposed (one in
    challenge before `proposed_seq` was kept, that agreements 0020 found no evidence for): the re-proposal reads the
    chain's lastSeq, and proposes only a higher receipt."""
    return UsageAgreement.objects.filter(status=AgreementStatus.IN_CHALLENGE, challenge_deadline__gt=now).filter(
        Q(proposed_seq__lt=F("usage_seq")) | Q(proposed_seq__isnull=True, usage_seq__gt=0))


def agreements_past_expiry(*, now):
    return UsageAgreement.objects.filter(status=AgreementStatus.ACTIVE, expires_at__lte=now)


def agreements_reclaimed_with_seller_unpaid():
    """Refunded agreements that had usage charged: nothing was proposed on-chain before the escrow's reclaimAfter,
    the deposit went back to the buyer and the seller was not paid what it earned (`used`). Newest first."""
    return UsageAgreement.objects.filter(status=AgreementStatus.REFUNDED, used__gt=0).order_by("-settled_at")


def agreements_proposed_above_their_usage():
    """Agreements whose escrow has a proposal above the usage recorded (`services.agreement_settlement_proposed`),
    or paid the seller more than it: backed by no receipt of the books. Newest first."""
    return UsageAgreement.objects.filter(
        Q(status__in=[AgreementStatus.IN_CHALLENGE, AgreementStatus.DISPUTED, AgreementStatus.SETTLING],
          proposed_amount__gt=F("used")) | Q(status=AgreementStatus.SETTLED, seller_payout__gt=F("used")),
    ).order_by("-updated_at")


def agreements_settled_below_their_usage():
    """Settled agreements whose escrow paid the seller less than the books charged, at an earlier receipt than their
    last (`proposed_seq`, the last proposal on-chain): a seller's proposal of one of its earlier receipts not
    re-proposed before the window closed (the settlement tick not run meanwhile). Not those an arbiter decided (a
    dispute's outcome is its own). Newest first."""
    disputed = AgreementEvent.objects.filter(agreement_id=OuterRef("pk"), to_status=AgreementStatus.DISPUTED)
    return UsageAgreement.objects.filter(status=AgreementStatus.SETTLED, seller_payout__lt=F("used"),
                                         proposed_seq__lt=F("usage_seq")).exclude(Exists(disputed)).order_by(
        "-settled_at")


def agreements_in_status(*, status: str):
    return UsageAgreement.objects.filter(status=status)


def agreement_counts_by_status() -> dict[str, int]:
    return dict(UsageAgreement.objects.order_by().values_list("status").annotate(count=Count("pk")))


def agreements_failed_recently(*, limit: int) -> QuerySet[UsageAgreement]:
    failed = [AgreementStatus.ACTIVATION_FAILED, AgreementStatus.PAYMENT_FAILED]
    return UsageAgreement.objects.filter(status__in=failed).order_by("-updated_at")[:limit]


def webhook_deliveries_failed_recently(*, limit: int) -> QuerySet[WebhookDelivery]:
    return (WebhookDelivery.objects.filter(status=DeliveryStatus.FAILED).select_related("subscription")
            .order_by("-created_at")[:limit])


# What a reverted payment's list shows beside it.
_REVERTED_PAYMENT_RELATED = {SkillInvocation: ("skill", "seller"), UsageAgreement: ("service", "seller")}


def payments_reverted(*, of: type[SkillInvocation] | type[UsageAgreement],
                      acknowledged: bool = False) -> QuerySet:
    """Skill invocations (`of`) whose payment a reorg took after their seller was called (agreements.invocations), or
    direct purchases whose payment a reorg took after they were counted paid, that could not run again
    (agreements.services.agreement_direct_payment_failed); oldest first: those no operator acknowledged yet, or
    (`acknowledged`) those one did."""
    return (of.objects.filter(payment_reverted_at__isnull=False,
                              payment_reversal_acknowledged_at__isnull=not acknowledged)
            .select_related(*_REVERTED_PAYMENT_RELATED[of]).order_by("payment_reverted_at"))


# Where each kind of failed payment keeps its authorization, and what says it failed (before the seller was called,
# or the purchase counted paid).
_FAILED_PAYMENT_AUTHORIZATION = {SkillInvocation: "authorization", UsageAgreement: "payment_authorization"}
_PAYMENT_FAILED = {SkillInvocation: Q(money=InvocationMoney.PAYMENT_FAILED),
                   UsageAgreement: Q(status=AgreementStatus.PAYMENT_FAILED)}


def payments_failed_watched(*, of: type[SkillInvocation] | type[UsageAgreement], usable_after: int) -> list:
    """The primary keys of failed payments (of skill invocations or direct purchases, `of`) the chain may yet show
    made, which the escrow app keeps looking for: a signed authorization stays valid until its validBefore whatever
    became of the relayer's transaction, and anyone holding it (its calldata is public once broadcast) may get it
    mined once the buyer holds funds. Each payment recorded reverted (`payments_reverted`) no operator acknowledged
    yet, and every failed one, recorded reverted or failed before it was counted paid, while its authorization is
    valid after `usable_after` (unix seconds: the chain's clock less the time a use needs to reach the confirmation
    depth): bounded by the authorizations' lifetime, each half found by its own index."""
    reverted = Q(payment_reverted_at__isnull=False)
    unacknowledged = of.objects.filter(reverted, payment_reversal_acknowledged_at=None)
    usable = of.objects.filter(reverted | _PAYMENT_FAILED[of],
                               **{f"{_FAILED_PAYMENT_AUTHORIZATION[of]}__valid_before__gt": usable_after})
    # Unordered: SQLite (`make run`) refuses an ORDER BY (the models' default ordering) in a UNION's parts.
    return list(unacknowledged.order_by().values_list("pk", flat=True).union(
        usable.order_by().values_list("pk", flat=True)))


def direct_authorizations_watched_past(*, ran_out_before: int) -> QuerySet[UsageAgreement]:
    """Direct purchases whose buyer's authorization the watch of closed direct proposals still reads, though its
    validBefore (and the margin a use needs to be found) was over before `ran_out_before` (unix seconds): the read after
    that ends the watch once the chain decides, used or not, so the node has left it undecided (the token counts it
    spent, yet shows no log of it: old logs pruned) or answered nothing since. With them the proposals still proposed
    past it: the expiry sweep expires one only once the node says whether its buyer paid it already, so one left
    proposed so long is one the node leaves undecided alike. Oldest first."""
    return (UsageAgreement.objects.filter(AUTHORIZATION_WATCHED | Q(status=AgreementStatus.PROPOSED),
                                          settlement_model=SettlementModel.DIRECT_PAYMENT,
                                          payment_tx_hash="", payment_authorization_watch_ended_at=None,
                                          payment_authorization__valid_before__lt=ran_out_before)
            .select_related("payment_authorization").order_by("payment_authorization__valid_before"))


def payments_reverted_counts(*, of: type[SkillInvocation] | type[UsageAgreement]) -> dict[bool, int]:
    """How many reverted payments there are of skill invocations or of direct purchases (`of`), by whether an
    operator acknowledged them."""
    counts = of.objects.filter(payment_reverted_at__isnull=False).aggregate(
        acknowledged=Count("pk", filter=Q(payment_reversal_acknowledged_at__isnull=False)),
        unacknowledged=Count("pk", filter=Q(payment_reversal_acknowledged_at=None)))
    return {True: counts["acknowledged"], False: counts["unacknowledged"]}


def webhook_deliveries_of_agreement(*, agreement_id, limit: int) -> QuerySet[WebhookDelivery]:
    """The latest webhook deliveries of the agreement's events (the payload names the agreement)."""
    return (WebhookDelivery.objects.filter(payload__data__agreement_id=str(agreement_id))
            .select_related("subscription", "subscription__agent").order_by("-created_at")[:limit])


def agreements_in_challenge_past_deadline(*, deadline_before) -> QuerySet[UsageAgreement]:
    """In the challenge window still, though the window closed before `deadline_before` (finalize is overdue)."""
    return UsageAgreement.objects.filter(status=AgreementStatus.IN_CHALLENGE,
                                         challenge_deadline__lt=deadline_before).order_by("challenge_deadline")


def agreements_unchanged_since(*, statuses: list[str], before) -> QuerySet[UsageAgreement]:
    """In one of `statuses` with no change since before `before` (submitting or settling for too long)."""
    return UsageAgreement.objects.filter(status__in=statuses, updated_at__lt=before).order_by("updated_at")


def _bucketed(queryset, *, field: str, since, step, value) -> dict:
    trunc = TruncDay if step >= timedelta(days=1) else TruncHour
    rows = (queryset.filter(**{f"{field}__gte": since}).order_by()
            .annotate(bucket=trunc(field, tzinfo=UTC)).values("bucket").annotate(value=value)
            .values_list("bucket", "value"))
    return {bucket: int(total or 0) for bucket, total in rows}


def usage_calls_by_bucket(*, since, step) -> dict:
    """How many charges (usage events) were recorded, per bucket of `step` from `since`."""
    return _bucketed(UsageEvent.objects.all(), field="created_at", since=since, step=step, value=Count("pk"))


def usage_charged_by_bucket(*, since, step) -> dict:
    """How much was charged to escrows (base units), per bucket."""
    return _bucketed(UsageEvent.objects.all(), field="created_at", since=since, step=step, value=Sum("cost"))


def volume_by_bucket(*, since, step) -> dict:
    """Money committed through the platform (base units), per bucket: escrow deposits when activated, direct
    payments when paid, skill invocations when their payment confirmed (and no reorg took it since)."""
    escrow = _bucketed(UsageAgreement.objects.filter(settlement_model=SettlementModel.ESCROW),
                       field="activated_at", since=since, step=step, value=Sum("deposit_amount"))
    direct = _bucketed(UsageAgreement.objects.filter(settlement_model=SettlementModel.DIRECT_PAYMENT,
                                                     status=AgreementStatus.PAID),
                       field="settled_at", since=since, step=step, value=Sum("deposit_amount"))
    invoked = _bucketed(SkillInvocation.objects.filter(payment_reverted_at=None), field="paid_at", since=since,
                        step=step, value=Sum("amount"))
    totals: dict = {}
    for part in (escrow, direct, invoked):
        for bucket, amount in part.items():
            totals[bucket] = totals.get(bucket, 0) + amount
    return totals


def webhook_deliveries_of_agent(*, agent: Agent, status: str | None = None) -> QuerySet[WebhookDelivery]:
    deliveries = WebhookDelivery.objects.filter(subscription__agent=agent)
    return deliveries.filter(status=status) if status else deliveries


def webhook_delivery_get(*, agent: Agent, delivery_id) -> WebhookDelivery:
    delivery = webhook_deliveries_of_agent(agent=agent).filter(pk=delivery_id).first()
    if delivery is None:
        raise NotFound("No such webhook delivery.", code="webhook_delivery_not_found")
    return delivery


def inbox_events(*, agent: Agent, types: list[str], after: int | None, limit: int) -> list[AgreementEvent]:
    """The agent's inbox: events of agreements it is party to, oldest first, each with `acked` set."""
    events = AgreementEvent.objects.filter(Q(agreement__buyer=agent) | Q(agreement__seller=agent))
    if types:  # as a webhook subscription of `types` is sent them (`webhooks.event_types_told`)
        statuses = [t.removeprefix("agreement.") for t in types if t != UNDONE_EVENT_TYPE]
        wanted = Q(to_status__in=statuses) | Q(data__reorg=True, from_status__in=statuses)
        events = events.filter(wanted | Q(data__reorg=True) if UNDONE_EVENT_TYPE in types else wanted)
    if after is not None:
        events = events.filter(pk__gt=after)
    acked = AgentEventAck.objects.filter(agent=agent, event=OuterRef("pk"))
    return list(events.select_related("agreement__buyer", "agreement__seller").annotate(acked=Exists(acked))
                .order_by("id")[:limit])


def inbox_event_get(*, agent: Agent, event_id: int) -> AgreementEvent:
    event = AgreementEvent.objects.filter(Q(agreement__buyer=agent) | Q(agreement__seller=agent),
                                          pk=event_id).first()
    if event is None:
        raise NotFound("No such event.", code="event_not_found")
    return event


def payment_authorization_of(*, agreement: UsageAgreement) -> x402_protocol.Authorization:
    """A direct payment's stored x402 authorization, as the token's `transferWithAuthorization` takes it."""
    record = agreement.payment_authorization
    return x402_protocol.Authorization(
        payer=record.payer, pay_to=record.pay_to, amount=record.amount, valid_after=record.valid_after,
        valid_before=record.valid_before, nonce=record.nonce, signature=record.signature)


_ESCROW_STATUS = {
    AgreementStatus.SUBMITTING: "funding", AgreementStatus.ACTIVATION_FAILED: "funding_failed",
    AgreementStatus.ACTIVE: "funded", AgreementStatus.IN_CHALLENGE: "in_challenge",
    AgreementStatus.DISPUTED: "disputed", AgreementStatus.SETTLING: "settling", AgreementStatus.SETTLED: "settled",
    AgreementStatus.REFUNDED: "refunded",
}


def escrow_status_of(agreement: UsageAgreement) -> str:
    """The Pægents SDK's `escrow_status`: where the agreement's money is, from its status."""
    if agreement.settlement_model == SettlementModel.DIRECT_PAYMENT:
        return "not_applicable"
    return _ESCROW_STATUS.get(agreement.status, "not_funded")


# The escrow app knows which payouts and refunds wait for their payment's finality (its PAYOUT_HEAD_TAG): it registers
# the reader here, and the API shows what it says (`waiting_for_finality`). Given invocation ids and agreement ids, it
# answers {id as a string: {"block_number", "tag"}} for those held now.
FinalityWaitReader = Callable[..., dict[str, dict]]
_finality_wait_reader: list[FinalityWaitReader] = []


def finality_wait_reader_register(*, reader: FinalityWaitReader) -> None:
    _finality_wait_reader[:] = [reader]


def finality_wait_reader_registered() -> bool:
    return bool(_finality_wait_reader)


def finality_waits(*, invocation_ids: Iterable = (), agreement_ids: Iterable = ()) -> dict[str, dict]:
    """The block whose finality (under the tag) each invocation's payout or refund, or each direct purchase's fee
    refund, waits for before the treasury sends it; absent for those not waiting."""
    if not _finality_wait_reader:
        return {}
    return _finality_wait_reader[0](invocation_ids=invocation_ids, agreement_ids=agreement_ids)


def invocation_finality_wait(invocation: SkillInvocation) -> dict | None:
    """The block whose finality the invocation's payout or refund waits for; None when none waits."""
    if invocation.money not in (InvocationMoney.PAYING_OUT, InvocationMoney.REFUNDING):
        return None
    return finality_waits(invocation_ids=[invocation.pk]).get(str(invocation.pk))


def agreements_finality_waits(agreements: Iterable[UsageAgreement]) -> dict[str, dict]:
    """{agreement id: the block whose finality its fee refund waits for} for the direct purchases among
    `agreements` whose fee refund is held; one read for them all."""
    purchases = [agreement.pk for agreement in agreements  # a fee refund is due only once the payment failed for good
                 if agreement.settlement_model == SettlementModel.DIRECT_PAYMENT
                 and agreement.status == AgreementStatus.PAYMENT_FAILED]
    return finality_waits(agreement_ids=purchases) if purchases else {}
