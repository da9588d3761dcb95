"""The policy decision, as a pure function: no database, no clock. Tested rule by rule."""

from dataclasses import dataclass, field
from enum import StrEnum

from marketplace.tags import tag_normalise
from policies import rules
from policies.models import Policy


class Outcome(StrEnum):
    ALLOW = "allow"
    DENY = "deny"
    NEEDS_APPROVAL = "needs_approval"


@dataclass(frozen=True)
class Purchase:
    seller_handle: str
    service_id: str
    tags: frozenset[str]
    token: str
    amount: int  # the commitment: everything that can leave the buyer's wallet (max amount + fee)
    seller_owner_id: int | None = None
    buyer_owner_id: int | None = None
    # Handles of other agents of the seller's owner, or paid to its proven wallet: a blocked one blocks this seller.
    seller_kin_handles: frozenset[str] = frozenset()
    # The blocked service this one lists again (the same upstream, or its seller's owner's same name): blocked too.
    listing_of_blocked_service: str = ""


@dataclass(frozen=True)
class Spend:
    last_day: int
    last_month: int


@dataclass(frozen=True)
class Decision:
    outcome: Outcome
    rule: str = ""
    message: str = ""
    details: dict = field(default_factory=dict)

    @property
    def denied(self) -> bool:
        return self.outcome == Outcome.DENY

    @property
    def needs_approval(self) -> bool:
        return self.outcome == Outcome.NEEDS_APPROVAL


ALLOW = Decision(Outcome.ALLOW)

# The rules that hold a purchase for its owner's approval: an ApprovalRequest's `rule` (the admin's filter offers them).
RULE_SET_BY_SELLER_OWNER = "policy_set_by_seller_owner"
RULE_APPROVAL_THRESHOLD = "approval_threshold"
APPROVAL_RULES = (RULE_SET_BY_SELLER_OWNER, RULE_APPROVAL_THRESHOLD)


def evaluate(policy: Policy | None, purchase: Purchase, spend: Spend) -> Decision:
    """Deny rules first (lists, token, limits, caps), then approval: of any purchase from a seller whose owner set the
    policy last (an operator, in the admin, before they owned it), and past the threshold."""
    if policy is None:
        return ALLOW

    def deny(rule: str, message: str, **details) -> Decision:
        return Decision(Outcome.DENY, rule, message, details)

    # A rule stored in a form the API does not write (around the API and the admin's form, after migration 0005
    # rewrote the others): what its owner meant is not guessed; it denies (a misread one let purchases through).
    unreadable = rules.rules_unreadable(policy)
    if unreadable:
        return deny(unreadable[0], "The policy's rule is stored in a form it cannot be read in: its owner must set it again.",
                    reason=rules.RULE_UNREADABLE)
    if purchase.seller_handle in policy.blocked_sellers or purchase.seller_kin_handles & set(policy.blocked_sellers):
        return deny("blocked_sellers", "The seller is blocked by policy.", seller=purchase.seller_handle)
    if policy.allowed_sellers and purchase.seller_handle not in policy.allowed_sellers:
        return deny("allowed_sellers", "The seller is not on the allowed list.", seller=purchase.seller_handle)
    if purchase.service_id in policy.blocked_services:
        return deny("blocked_services", "The service is blocked by policy.", service=purchase.service_id)
    if purchase.listing_of_blocked_service:
        return deny("blocked_services", "The service lists a service blocked by policy again.",
                    service=purchase.service_id, listing_of=purchase.listing_of_blocked_service)
    if policy.allowed_services and purchase.service_id not in policy.allowed_services:
        return deny("allowed_services", "The service is not on the allowed list.", service=purchase.service_id)
    tags = {tag_normalise(tag) for tag in purchase.tags}
    blocked_tags = sorted(tags & set(policy.blocked_tags))
    if blocked_tags:
        return deny("blocked_tags", "The service has a blocked tag.", tags=blocked_tags)
    if policy.allowed_tags and not tags & set(policy.allowed_tags):
        return deny("allowed_tags", "The service has none of the allowed tags.")
    if policy.allowed_tokens and purchase.token not in policy.allowed_tokens:
        return deny("allowed_tokens", "The token is not allowed by policy.", token=purchase.token)
    if policy.max_per_agreement is not None and purchase.amount > policy.max_per_agreement:
        return deny("max_per_agreement", "The commitment exceeds the maximum per agreement.",
                    amount=purchase.amount, limit=policy.max_per_agreement)
    if policy.daily_cap is not None and spend.last_day + purchase.amount > policy.daily_cap:
        return deny("daily_cap", "The commitment would exceed the daily spend cap.",
                    spent=spend.last_day, amount=purchase.amount, limit=policy.daily_cap)
    if policy.monthly_cap is not None and spend.last_month + purchase.amount > policy.monthly_cap:
        return deny("monthly_cap", "The commitment would exceed the monthly spend cap.",
                    spent=spend.last_month, amount=purchase.amount, limit=policy.monthly_cap)
    if policy.updated_by_id not in (None, purchase.buyer_owner_id) and policy.updated_by_id == purchase.seller_owner_id:
        # The seller's owner (an operator) set the buyer's rules last: not the buyer's owner's consent to pay them.
        return Decision(Outcome.NEEDS_APPROVAL, RULE_SET_BY_SELLER_OWNER,
                        "The policy was last changed by the seller's owner, not the buyer's: the buyer's owner must "
                        "approve this commitment.", {"amount": purchase.amount})
    if policy.approval_threshold is not None and purchase.amount >= policy.approval_threshold:
        return Decision(Outcome.NEEDS_APPROVAL, RULE_APPROVAL_THRESHOLD, "The owner must approve this commitment.",
                        {"amount": purchase.amount, "threshold": policy.approval_threshold})
    return ALLOW

