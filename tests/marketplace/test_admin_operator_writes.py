"""What an operator writes in the admin is held to the rules the API holds agents and owners to, and an operator's
action that moves money names who ran it."""

import pytest

from agreements.models import FeeSchedule

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
