"""Writes of policies and approvals.

Approvals hold something another app owns (a usage agreement). That app registers a decision handler for its
subject type at start-up, so the decision is carried out in the same transaction without policies importing it.
"""

from collections.abc import Callable
from datetime import datetime
from uuid import UUID

from django.conf import settings
from django.core.exceptions import ImproperlyConfigured
from django.db import transaction
from django.utils import timezone

from catalog import services as catalog_services
from catalog.models import Agent
from marketplace import sweeps
from marketplace.errors import Conflict, InvalidInput
from policies import selectors
from policies.models import ApprovalRequest, ApprovalStatus, Policy

# (subject_id=, outcome=, actor=, note=) -> None, or the Conflict to answer when the subject could no longer be
# decided so and ended instead (its request then ends `expired`, committed before the Conflict is raised).
DecisionHandler = Callable[..., Conflict | None]
_handlers: dict[str, DecisionHandler] = {}

LIMIT_FIELDS = ("max_per_agreement", "daily_cap", "monthly_cap", "approval_threshold")
POLICY_FIELDS = (
    "max_per_agreement", "daily_cap", "monthly_cap", "approval_threshold", "allowed_sellers", "blocked_sellers",
    "allowed_services", "blocked_services", "allowed_tags", "blocked_tags", "allowed_tokens",
)


def approval_handler_register(*, subject_type: str, handler: DecisionHandler) -> None:
    _handlers[subject_type] = handler


def policy_update(*, agent: Agent, actor, changes: dict) -> Policy:
    """Change the fields of the agent's policy that `changes` gives (None: no limit, []: no list) and keep the others:
    a field left out never lifts a cap. Nothing to change is 400 `empty_policy_update` (a client's empty body sent by
    mistake wiped every cap the owner had set when it replaced the policy)."""
    if not changes:
        raise InvalidInput("Give the policy fields to change (null lifts a limit, [] empties a list).",
                           code="empty_policy_update", details={"fields": list(POLICY_FIELDS)})
    return _policy_write(agent=agent, actor=actor, data=changes)[0]


def policy_operator_check(*, agent: Agent, operator, does: str = "changes this policy") -> None:
    """403 `operator_owns_a_seller` when an operator who owns a seller agent would change the policy of another
    owner's agent, or decide its approval requests (`does` says which): loosened, it let that owner's buyer pay their
    seller past the owner's rules (without the approval `approver_owns_the_seller` refuses them); tightened, or a
    purchase rejected, it blocked their competitors."""
    catalog_services.operator_owns_a_seller_check(owner_id=agent.owner_id, operator=operator, does=does)


def policy_set_by_operator(*, agent: Agent, operator, shown: dict, data: dict) -> dict[str, tuple]:
    """What an operator changed of the agent's policy from its page as shown (`shown`: each field as the page showed
    it; `data`: the form's every field), refused as `policy_operator_check` says: a limit changed is written, a list
    changed has its additions and removals applied to the list as stored now, and a field left as shown keeps what
    is stored, so what the owner changed while the page was open stays (the form's every field, written, dropped a
    seller the owner had allowed meanwhile). Answers what changed, {field: (before, after)}, read under the lock, for
    the audit."""
    policy_operator_check(agent=agent, operator=operator)
    return _policy_write(agent=agent, actor=operator, data=data, shown=shown)[1]


def policy_as_shown(policy: Policy) -> dict:
    """The policy's fields as its admin page shows them (JSON: `policy_set_by_operator`'s `shown`)."""
    return {name: int(value) if name in LIMIT_FIELDS and value is not None else value
            for name in POLICY_FIELDS for value in [getattr(policy, name)]}


def _policy_write(*, agent: Agent, actor, data: dict, shown: dict | None = None) -> tuple[Policy, dict[str, tuple]]:
    """`data`'s fields written, those it leaves out kept; with `shown` (an operator's page), only those `data` changes
    from it, a list by its edits (`_list_edited`)."""
    with transaction.atomic():
        Agent.objects.select_for_update().get(pk=agent.pk)  # the same lock proposals take: no race with a cap
        policy, _ = Policy.objects.get_or_create(agent=agent)  # a new one starts unlimited, as no policy is
        changes = {}
        for name in POLICY_FIELDS:
            before = getattr(policy, name)
            after = data.get(name, before)
            if shown is not None and name in data:
                after = before if after == shown.get(name) else _list_edited(before, shown.get(name), after)
            if before != after:
                changes[name] = (before, after)
            setattr(policy, name, after)
        policy.blocked_service_identities = selectors.blocked_service_identities(
            blocked=policy.blocked_services, recorded=policy.blocked_service_identities)
        policy.updated_by = actor
        policy.save()
    return policy, changes


def _list_edited(stored, shown, edited):
    """`stored` with the additions and removals that make `edited` of `shown`, in `stored`'s order then the
    additions'; `edited` itself where any is not a list (a limit, or a list rule stored in a form the API does not
    write, which the operator's value replaces)."""
    if not all(isinstance(value, list) for value in (stored, shown, edited)):
        return edited
    removed = [value for value in shown if value not in edited]
    added = [value for value in edited if value not in shown and value not in stored]
    return [value for value in stored if value not in removed] + added


def approval_request_create(*, agent: Agent, subject_type: str, subject_id: UUID, amount: int, rule: str,
                            summary: dict, possible_until: datetime) -> ApprovalRequest:
    """A request open for APPROVAL_TTL, and never past `possible_until`, when the subject can no longer be bought:
    a later approval would consent to nothing, and the owner is shown the deadline that really holds.
    409 `pending_approvals_limit_reached` (nothing created) when the agent has APPROVALS_PENDING_PER_AGENT requests
    waiting already: the bound on its unfunded agreements is per seller, and an agent proposing to every seller
    filled its owner's queue. Call with the agent's row locked (the proposal's policy check locks it), so that
    concurrent proposals cannot all slip under the bound."""
    now = timezone.now()
    limit = settings.APPROVALS_PENDING_PER_AGENT
    if selectors.approvals_pending_count(agent=agent, now=now) >= limit:
        raise Conflict(f"{limit} purchases of this agent already wait for its owner's approval: wait for the owner "
                       "to decide them (or cancel some) before proposing another that needs one.",
                       code="pending_approvals_limit_reached", details={"max_pending_approvals": limit})
    return ApprovalRequest.objects.create(
        agent=agent, subject_type=subject_type, subject_id=subject_id, amount=amount, rule=rule, summary=summary,
        expires_at=min(now + settings.APPROVAL_TTL, possible_until),
    )


def _decide(request: ApprovalRequest, *, status: str, actor, note: str) -> Conflict | None:
    """The decision recorded and carried out; the handler's refusal (the subject ended instead) leaves the request
    `expired`, the owner's note kept."""
    request.status = status
    request.decided_at = timezone.now()
    request.decided_by = actor
    request.decision_note = note
    request.save(update_fields=["status", "decided_at", "decided_by", "decision_note"])
    handler = _handlers.get(request.subject_type)
    if handler is None:
        raise ImproperlyConfigured(f"No approval handler for {request.subject_type}: the app that owns it registers "
                                   "one in its AppConfig.ready().")
    refusal = handler(subject_id=request.subject_id, outcome=status, actor=actor, note=note)
    if refusal is not None:
        request.status = ApprovalStatus.EXPIRED
        request.save(update_fields=["status"])
    return refusal


def approval_decide(*, approval: ApprovalRequest, actor, approve: bool, note: str = "") -> ApprovalRequest:
    """Approve or reject; repeating the same decision is a no-op, reversing one (or deciding too late) is 409."""
    wanted = ApprovalStatus.APPROVED if approve else ApprovalStatus.REJECTED
    with transaction.atomic():
        approval = ApprovalRequest.objects.select_for_update().get(pk=approval.pk)
        refusal = None
        if approval.status == wanted:
            return approval
        if approval.status == ApprovalStatus.PENDING and approval.expires_at > timezone.now():
            # Committed before answering: an approval that came too late for its subject leaves both expired.
            refusal = _decide(approval, status=wanted, actor=actor, note=note)
            if refusal is None:
                return approval
        elif approval.status == ApprovalStatus.PENDING:
            # Committed before answering: a late decision leaves the request (and its subject) visibly expired.
            _decide(approval, status=ApprovalStatus.EXPIRED, actor=None, note="expired before the decision")
    if refusal is not None:
        raise refusal
    raise Conflict(f"This approval request is already {approval.status}.", code="approval_already_decided",
                   details={"status": approval.status})


def approval_withdraw(*, subject_type: str, subject_id: UUID, reason: str) -> None:
    """The subject's app cancels what waits for a decision: its pending request is closed `cancelled`, so the owner
    is not asked to approve, nor told they approved, a purchase that no longer exists. Call before locking the
    subject, inside the transaction that cancels it: an owner's decision locks the request, then the subject."""
    approval = ApprovalRequest.objects.select_for_update().filter(
        subject_type=subject_type, subject_id=subject_id, status=ApprovalStatus.PENDING).first()
    if approval is not None:
        approval.status, approval.decided_at, approval.decision_note = (
            ApprovalStatus.CANCELLED, timezone.now(), reason[:500])
        approval.save(update_fields=["status", "decided_at", "decision_note"])


def approvals_expire(*, now: datetime | None = None) -> int:
    """Expire pending requests past their deadline, each in its own transaction. Safe to run twice."""
    return sweeps.due_rows_apply(
        due=ApprovalRequest.objects.filter(status=ApprovalStatus.PENDING, expires_at__lte=now or timezone.now()),
        apply=lambda approval: _decide(approval, status=ApprovalStatus.EXPIRED, actor=None, note="expired"),
        turn="expire-approvals")
