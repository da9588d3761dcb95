"""A fee schedule checked when it was saved is checked again once AGREEMENT_MAX_AMOUNT is raised past what it can
price: the largest agreement with its fee must fit a uint256 (the buyer's permit and the escrow's activation carry
both)."""

import pytest
from django.core.management import call_command
from django.core.management.base import SystemCheckError

from agreements.models import FeeSchedule, UsageAgreement
from marketplace.fields import MAX_AMOUNT
from tests.agreements.helpers import proposal
from tests.catalog.factories import register_service
from tests.conftest import error_code

pytestmark = pytest.mark.django_db

SAVED_UNDER = 10**12  # AGREEMENT_MAX_AMOUNT's default, when the schedule was saved


@pytest.fixture
def schedule_at_the_old_limit():
    """A fixed fee that, with the largest agreement of the time, fills a uint256 exactly: valid when saved."""
    return FeeSchedule.objects.update_or_create(pk=1, defaults={
        "percent_bps": 0, "fixed_atomic": MAX_AMOUNT - SAVED_UNDER, "minimum_atomic": 0})[0]


def test_a_fee_schedule_valid_when_saved_is_an_error_once_the_limit_is_raised(settings, schedule_at_the_old_limit):
    call_command("check", "--database", "default")  # valid under the limit it was saved under
    settings.AGREEMENT_MAX_AMOUNT = 10 * SAVED_UNDER
    with pytest.raises(SystemCheckError, match="agreements.E004"):
        call_command("check", "--database", "default")


def test_no_agreement_is_proposed_at_a_total_past_uint256(settings, seller, buyer_api, schedule_at_the_old_limit):
    settings.AGREEMENT_MAX_AMOUNT = 10 * SAVED_UNDER
    service = register_service(seller, pricing={"type": "per_call", "unit_price_atomic": SAVED_UNDER})
    response = buyer_api.post("/usage-agreements", proposal(service, quantity=2))
    assert response.status_code == 503, response.content
    assert error_code(response) == "fee_schedule_invalid"
    assert not UsageAgreement.objects.exists()


def test_no_total_past_uint256_is_quoted(settings, buyer_api, schedule_at_the_old_limit):
    settings.AGREEMENT_MAX_AMOUNT = 10 * SAVED_UNDER
    response = buyer_api.get("/payment-requirements", {"amount_atomic": 2 * SAVED_UNDER})
    assert response.status_code == 503, response.content
    assert error_code(response) == "fee_schedule_invalid"
