"""The pure policy decision, rule by rule."""

from dataclasses import replace

import pytest

from policies.evaluation import Outcome, Purchase, Spend, evaluate
from policies.models import Policy

SERVICE_1, SERVICE_2 = "6f1c3a52-0000-4000-8000-000000000001", "6f1c3a52-0000-4000-8000-000000000002"
PURCHASE = Purchase(seller_handle="acme", service_id=SERVICE_1, tags=frozenset({"nlp", "translation"}), token="USDC",
                    amount=1_000)
NO_SPEND = Spend(last_day=0, last_month=0)


def decide(purchase=PURCHASE, spend=NO_SPEND, **policy):
    return evaluate(Policy(**policy), purchase, spend)


def test_no_policy_allows():
    assert evaluate(None, PURCHASE, NO_SPEND).outcome == Outcome.ALLOW
    assert decide().outcome == Outcome.ALLOW


@pytest.mark.parametrize(("policy", "rule"), [
    ({"blocked_sellers": ["acme"]}, "blocked_sellers"),
    ({"allowed_sellers": ["other"]}, "allowed_sellers"),
    ({"blocked_services": [SERVICE_1]}, "blocked_services"),
    ({"allowed_services": [SERVICE_2]}, "allowed_services"),
    ({"blocked_tags": ["nlp"]}, "blocked_tags"),
    ({"allowed_tags": ["images"]}, "allowed_tags"),
    ({"allowed_tokens": ["EURC"]}, "allowed_tokens"),
    ({"max_per_agreement": 999}, "max_per_agreement"),
])
def test_each_deny_rule(policy, rule):
    decision = decide(**policy)
    assert (decision.outcome, decision.rule) == (Outcome.DENY, rule)


@pytest.mark.parametrize("policy", [
    {"allowed_sellers": ["acme"]}, {"allowed_services": [SERVICE_1]}, {"allowed_tags": ["nlp", "x"]},
    {"allowed_tokens": ["USDC"]}, {"max_per_agreement": 1_000}, {"blocked_sellers": ["other"]},
])
def test_allow_lists_and_limits_that_admit(policy):
    assert decide(**policy).outcome == Outcome.ALLOW


def test_a_seller_kin_to_a_blocked_one_is_blocked_but_not_allowed_by_an_allowed_ones_kinship():
    """Kin: another agent of the seller's owner, or of its proven wallet (`selectors._blocked_kin_of`)."""
    kin = replace(PURCHASE, seller_kin_handles=frozenset({"acme-old"}))
    decision = decide(kin, blocked_sellers=["acme-old"])
    assert (decision.outcome, decision.rule, decision.details) == (Outcome.DENY, "blocked_sellers", {"seller": "acme"})
    assert decide(kin, allowed_sellers=["acme-old"]).rule == "allowed_sellers"


def test_daily_and_monthly_caps_count_what_was_already_committed():
    assert decide(spend=Spend(last_day=9_000, last_month=9_000), daily_cap=10_000).outcome == Outcome.ALLOW
    over_day = decide(spend=Spend(last_day=9_001, last_month=9_001), daily_cap=10_000)
    assert (over_day.outcome, over_day.rule) == (Outcome.DENY, "daily_cap")
    assert over_day.details == {"spent": 9_001, "amount": 1_000, "limit": 10_000}
    over_month = decide(spend=Spend(last_day=0, last_month=50_000), daily_cap=10_000, monthly_cap=50_500)
    assert (over_month.outcome, over_month.rule) == (Outcome.DENY, "monthly_cap")


def test_approval_threshold_is_inclusive_and_comes_after_denials():
    assert decide(approval_threshold=1_001).outcome == Outcome.ALLOW
    held = decide(approval_threshold=1_000)
    assert (held.outcome, held.rule) == (Outcome.NEEDS_APPROVAL, "approval_threshold")
    assert decide(approval_threshold=1, blocked_sellers=["acme"]).outcome == Outcome.DENY


@pytest.mark.parametrize(("updated_by_id", "outcome"), [
    (7, Outcome.NEEDS_APPROVAL),  # set last by the seller's owner, an operator: the buyer's owner approves
    (1, Outcome.ALLOW),  # by the buyer's owner, who also owns the seller
    (3, Outcome.ALLOW),  # by another operator
    (None, Outcome.ALLOW),
])
def test_a_purchase_from_the_seller_of_whoever_set_the_policy_last_needs_approval(updated_by_id, outcome):
    purchase = Purchase(seller_handle="acme", service_id=SERVICE_1, tags=frozenset(), token="USDC", amount=1_000,
                        seller_owner_id=1 if updated_by_id == 1 else 7, buyer_owner_id=1)
    decision = decide(purchase, updated_by_id=updated_by_id)
    assert decision.outcome == outcome
    assert decide(purchase, updated_by_id=updated_by_id, blocked_sellers=["acme"]).outcome == Outcome.DENY
    if outcome == Outcome.NEEDS_APPROVAL:
        assert decision.rule == "policy_set_by_seller_owner"


@pytest.mark.parametrize(("policy", "rule"), [
    ({"blocked_sellers": ["OTHER"]}, "blocked_sellers"),
    ({"blocked_sellers": "other"}, "blocked_sellers"),
    ({"allowed_sellers": 5}, "allowed_sellers"),
    ({"blocked_services": [SERVICE_2.upper()]}, "blocked_services"),
    ({"allowed_services": ["svc-1"]}, "allowed_services"),
    ({"blocked_tags": [{"tag": "nlp"}]}, "blocked_tags"),
    ({"allowed_tags": ["NLP"]}, "allowed_tags"),
    ({"allowed_tokens": [None]}, "allowed_tokens"),
])
def test_a_rule_not_in_the_form_the_api_writes_denies_whatever_it_names(policy, rule):
    """Not read as its owner may have meant (migration 0005 rewrote those it could): it fails closed, naming itself."""
    decision = decide(**policy)
    assert (decision.outcome, decision.rule, decision.details) == (Outcome.DENY, rule, {"reason": "rule_unreadable"})


def test_a_listing_again_of_a_blocked_service_is_denied_naming_both():
    decision = decide(replace(PURCHASE, listing_of_blocked_service=SERVICE_2), blocked_services=[SERVICE_2])
    assert (decision.outcome, decision.rule, decision.details) == (
        Outcome.DENY, "blocked_services", {"service": SERVICE_1, "listing_of": SERVICE_2})


@pytest.mark.parametrize("spelt", ["https://api.example.com/v1", "HTTP://API.Example.COM:80/v1/", "https://api.example.com:443//v1",
                                   "https://user:pw@api.example.com./v1?x=1#f", "https://API.example.com/V1"])
def test_an_upstream_is_one_service_whatever_its_spelling(spelt):
    from policies.rules import upstream_identity

    assert upstream_identity(spelt) == "api.example.com/v1"


@pytest.mark.parametrize("other", ["https://api.example.com/v2", "https://api.example.com:8443/v1",
                                   "https://api2.example.com/v1"])
def test_another_path_port_or_host_is_another_upstream(other):
    from policies.rules import upstream_identity

    assert upstream_identity(other) != "api.example.com/v1"
