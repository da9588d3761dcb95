"""What an operator writes in the admin is held to the rules the API holds agents and owners to, and an operator's
action that moves money names who ran it."""

import pytest

from agreements.models import FeeSchedule
from policies.models import Policy
from tests.agreements.helpers import proposal
from tests.catalog.factories import register_service

pytestmark = pytest.mark.django_db


def test_an_operator_changes_the_fee_schedule_in_token_base_units(operator):
    """Saving an amount in the admin was a 500 (Django's digit check read the field's int as a Decimal)."""
    schedule = FeeSchedule.objects.create()
    page = f"/admin/agreements/feeschedule/{schedule.pk}/change/"
    form = {"percent_bps": 150, "fixed_atomic": 2_000, "minimum_atomic": 50_000, "fee_recipient": ""}

    assert operator.post(page, form).status_code == 302
    schedule.refresh_from_db()
    assert (schedule.percent_bps, schedule.fixed_atomic, schedule.minimum_atomic) == (150, 2_000, 50_000)

    refused = operator.post(page, {**form, "fixed_atomic": -1})
    assert refused.status_code == 200 and "Must not be negative" in refused.content.decode()
    schedule.refresh_from_db()
    assert schedule.fixed_atomic == 2_000



POLICY_FORM = {"allowed_sellers": "[]", "blocked_sellers": "[]", "allowed_services": "[]", "blocked_services": "[]",
               "allowed_tags": "[]", "blocked_tags": "[]", "allowed_tokens": "[]"}


def test_an_operator_sets_a_policy_through_the_service_recording_who(operator, buyer, buyer_api, seller):
    service = register_service(seller)
    response = operator.post("/admin/policies/policy/add/", {
        **POLICY_FORM, "agent": buyer.pk, "daily_cap": 1_000_000, "blocked_sellers": f'["{seller.handle}"]'})

    assert response.status_code == 302, response.context["adminform"].form.errors
    policy = Policy.objects.get(agent=buyer)
    assert (policy.daily_cap, policy.blocked_sellers, policy.updated_by.username) == (
        1_000_000, [seller.handle], "operator")
    assert buyer_api.post("/usage-agreements", proposal(service)).status_code == 403


@pytest.mark.parametrize(("field", "value"), [("blocked_sellers", "5"), ("allowed_sellers", '"seller-one"'),
                                              ("allowed_services", '["not-a-service-id"]')])
def test_a_policy_the_api_would_refuse_is_refused_in_the_admin(operator, buyer, buyer_api, seller, field, value):
    """The API refuses a list of the wrong shape (400); saved from the admin, a number made every proposal of the
    buyer a 500, a string matched any handle it contains."""
    service = register_service(seller)
    response = operator.post("/admin/policies/policy/add/", {**POLICY_FORM, "agent": buyer.pk, field: value})

    assert response.status_code == 200  # the form again, with the error
    assert not Policy.objects.filter(agent=buyer).exists()
    assert buyer_api.post("/usage-agreements", proposal(service)).status_code == 201


def test_a_policys_agent_is_not_changed_in_the_admin(operator, buyer, seller):
    """The agent is the policy's key: changed on a policy's page, the other agent's policy was replaced by this one
    and this one left as it was."""
    Policy.objects.create(agent=buyer, daily_cap=5_000_000)
    Policy.objects.create(agent=seller, daily_cap=1_000)

    operator.post(f"/admin/policies/policy/{buyer.pk}/change/",
                  {**POLICY_FORM, "agent": seller.pk, "daily_cap": 5_000_000})

    assert Policy.objects.get(agent=seller).daily_cap == 1_000
