"""The web server stops (a deploy, a scale-down) while its workers hold leases of calls (agreements.metering, "Call
leases"): each worker gives back what it leased as it stops, so the buyer's budget is not held, and a completion not
kept waiting, until the reaper's grace has passed."""

import pytest

from agreements.models import CallIntent, UsageAgreement
from tests.faults.conftest import assert_books_balance
from tests.faults.test_dependencies_down import active_agreement

pytestmark = [pytest.mark.slow, pytest.mark.faults, pytest.mark.chain, pytest.mark.postgres,
              pytest.mark.django_db(transaction=True)]


@pytest.fixture
def stack_env() -> dict:
    # Leases that outlast the test: only the stopping worker can give them back (the reaper's grace grows with them).
    return {"PROXY_CALL_LEASE_SECONDS": "300"}


def test_a_stopping_web_server_gives_back_the_calls_it_leased(stack, parties, upstream):
    with stack.api(parties.buyer_api.secret) as api:
        agreement = active_agreement(stack, api, parties, quantity=1_000)
        for _ in range(4):  # leases of 1, 2 and 4 calls: the last one holds 3 more
            assert api.get(f"/metered-proxy/{agreement['id']}/work").status_code == 200
    price = parties.service.unit_price
    assert UsageAgreement.objects.get(pk=agreement["id"]).reserved == 3 * price

    stack.worker.terminate()  # no reaper from here on
    stack.worker.wait_stopped()
    stack.web.terminate()
    stack.web.wait_stopped()

    assert not CallIntent.objects.filter(agreement_id=agreement["id"]).exists()
    assert_books_balance(agreement["id"])  # nothing reserved, every served call charged once
    assert UsageAgreement.objects.get(pk=agreement["id"]).used == 4 * price == upstream.served * price
