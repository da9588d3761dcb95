from datetime import datetime
from functools import lru_cache

from django.db import connection
from django.db.models import Count, Q

from catalog.models import Agent, Service
from marketplace.errors import NotFound
from marketplace.postgresql import prepared_cursor
from marketplace.rows import ModelColumns, model_columns
from policies import rules
from policies.evaluation import Decision, Purchase, Spend, evaluate
from policies.models import ApprovalRequest, ApprovalStatus, Policy


def policy_of(*, agent: Agent) -> Policy | None:
    return Policy.objects.filter(agent=agent).first()


def purchase_decision(*, agent: Agent, service: Service, tags: frozenset[str], token: str,
                      amount: int, spent_last_day: int, spent_last_month: int) -> Decision:
    """The agent's owner policy on a purchase of `amount` (everything that can leave the wallet) of `service`, given
    what the agent committed in the last day and month."""
    policy = policy_of(agent=agent)
    seller = service.seller
    return evaluate(policy,
                    Purchase(seller_handle=seller.handle, service_id=str(service.pk), tags=tags, token=token,
                             amount=amount, seller_owner_id=seller.owner_id, buyer_owner_id=agent.owner_id,
                             seller_kin_handles=_blocked_kin_of(policy, seller=seller, buyer=agent),
                             listing_of_blocked_service=_blocked_service_listed_again(policy, service=service,
                                                                                      buyer=agent)),
                    Spend(last_day=spent_last_day, last_month=spent_last_month))


def _current_identities(service_ids) -> list[dict]:
    return [rules.service_identity(service_id=pk, upstream_base_url=upstream, name=name, seller_owner_id=owner_id)
            for pk, upstream, name, owner_id in Service.objects.filter(pk__in=service_ids).values_list(
                "pk", "upstream_base_url", "name", "seller__owner_id")]


def blocked_service_identities(*, blocked, recorded: list) -> list[dict]:
    """`Policy.blocked_service_identities` for the blocked ids `blocked`: what was recorded of those still blocked,
    and the identity now of those newly blocked (what their owner saw when blocking them)."""
    if not blocked or not rules.rule_is_canonical("blocked_services", blocked):
        return []
    kept = [identity for identity in recorded if identity.get("service") in blocked]
    known = {identity["service"] for identity in kept}
    return kept + _current_identities([service_id for service_id in blocked if service_id not in known])


def _blocked_service_listed_again(policy: Policy | None, *, service: Service, buyer: Agent) -> str:
    """The id of the blocked service that `service` lists again (`rules.service_identity`: its upstream, whoever
    lists it; its name, within its seller's owner), as it was when blocked or as it is now; "" when none. Read only
    when the policy blocks services and not this one by its id; not for the buyer's owner's own services, which that
    owner tells apart."""
    blocked = policy.blocked_services if policy is not None else []
    if (not blocked or not rules.rule_is_canonical("blocked_services", blocked) or str(service.pk) in blocked
            or service.seller.owner_id == buyer.owner_id):
        return ""
    upstream, name = rules.upstream_identity(service.upstream_base_url), rules.name_identity(service.name)
    for identity in [*policy.blocked_service_identities, *_current_identities(blocked)]:
        if identity.get("upstream") == upstream or (identity.get("seller_owner") == service.seller.owner_id
                                                    and identity.get("name") == name):
            return str(identity.get("service", ""))
    return ""


def _blocked_kin_of(policy: Policy | None, *, seller: Agent, buyer: Agent) -> frozenset[str]:
    """The handles `policy` blocks of other agents of the seller's owner, or of agents whose proven wallet is the
    seller's proven one: a handle never changes, but a blocked seller's owner makes another agent (an owner's agents
    may share a wallet), or another owner's agent proves its wallet once it is deactivated, and sells as before. Read
    only when the policy blocks sellers and not this one by its handle; not for the buyer's owner's own sellers,
    which that owner tells apart."""
    blocked = policy.blocked_sellers if policy is not None else []
    if (not blocked or not rules.rule_is_canonical("blocked_sellers", blocked) or seller.handle in blocked
            or seller.owner_id == buyer.owner_id):
        return frozenset()
    kin = Q(owner_id=seller.owner_id)
    if seller.wallet_proven_at is not None:
        kin |= Q(wallet_address=seller.wallet_address, wallet_proven_at__isnull=False)
    return frozenset(Agent.objects.filter(kin, handle__in=blocked).values_list("handle", flat=True))


def wallet_bound_by_an_owner(*, wallet_address: str) -> bool:
    """Whether an agent that proved `wallet_address` is bound by its owner: its owner set it a policy, or stopped it
    (the agent, or its owner, deactivated). Such an agent holds the wallet's key: its payments made without its API
    key (an anonymous x402 payment) would escape what its owner set. An agent merely naming the wallet (unproven)
    binds nobody's payments from it."""
    return Agent.objects.filter(
        Q(policy__isnull=False) | Q(is_active=False) | Q(owner_is_active=False),
        wallet_address=wallet_address, wallet_proven_at__isnull=False).exists()


def approval_given(*, subject_type: str, subject_id) -> bool:
    """Whether the owner approved this subject (its one approval request)."""
    return ApprovalRequest.objects.filter(subject_type=subject_type, subject_id=subject_id,
                                          status=ApprovalStatus.APPROVED).exists()


def approvals_pending_count(*, agent: Agent, now: datetime) -> int:
    """How many of the agent's approval requests wait for its owner (pending and not past their deadline)."""
    return ApprovalRequest.objects.filter(agent=agent, status=ApprovalStatus.PENDING, expires_at__gt=now).count()


def approvals_of_agent(*, agent: Agent, status: str | None = None):
    approvals = ApprovalRequest.objects.filter(agent=agent)
    return approvals.filter(status=status) if status else approvals


def approval_get(*, agent: Agent, approval_id) -> ApprovalRequest:
    approval = ApprovalRequest.objects.filter(agent=agent, pk=approval_id).first()
    if approval is None:
        raise NotFound("No such approval request.", code="approval_not_found")
    return approval


@lru_cache(maxsize=1)
def _approvals_statement() -> tuple[str, ModelColumns]:
    """The SELECT of the approval requests of some subjects (an array), built once per process: every answer that
    shows an agreement runs it, and compiling it cost more CPU than running it."""
    quote, meta = connection.ops.quote_name, ApprovalRequest._meta
    columns = model_columns(ApprovalRequest, "r")
    return (f"SELECT {columns.select} FROM {quote(meta.db_table)} r "  # noqa: S608
            f"WHERE r.{quote(meta.get_field('subject_type').column)} = %s "
            f"AND r.{quote(meta.get_field('subject_id').column)} = ANY(%s)", columns)


def approvals_for_subjects(*, subject_type: str, subject_ids: list) -> dict:
    """{subject id: its approval request} for the subjects that have one (at most one each), in one query."""
    if connection.vendor != "postgresql":
        requests = ApprovalRequest.objects.filter(subject_type=subject_type, subject_id__in=subject_ids)
        return {request.subject_id: request for request in requests}
    sql, columns = _approvals_statement()
    subject = ApprovalRequest._meta.get_field("subject_id")
    with prepared_cursor() as cursor:
        cursor.execute(sql, [subject_type, [subject.get_db_prep_value(subject_id, connection)
                                            for subject_id in subject_ids]])
        rows = cursor.fetchall()
    requests = [columns.instance(iter(row)) for row in rows]
    return {request.subject_id: request for request in requests}


def approval_counts_by_status() -> dict[str, int]:
    return dict(ApprovalRequest.objects.order_by().values_list("status").annotate(count=Count("pk")))
