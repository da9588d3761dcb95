"""Rate limits per API key on the proxy and on purchase and payment endpoints: 429 `rate_limited`."""

import pytest
from django.core.cache import cache

from agreements.models import UsageAgreement
from tests.agreements.helpers import proposal
from tests.catalog.factories import AgentFactory, issue_key, register_service
from tests.conftest import Api, error_code
from tests.marketplace.conftest import active_agreement

pytestmark = pytest.mark.django_db


@pytest.fixture
def limits(settings):
    cache.clear()

    def set_rates(**rates):
        settings.REST_FRAMEWORK = {**settings.REST_FRAMEWORK, "DEFAULT_THROTTLE_RATES": {
            **settings.REST_FRAMEWORK["DEFAULT_THROTTLE_RATES"], **rates}}

    yield set_rates
    cache.clear()


def assert_rate_limited(response):
    assert response.status_code == 429, response.content
    assert error_code(response) == "rate_limited"
    assert 0 < int(response["Retry-After"]) <= 24 * 3600  # until the window (here: the day) ends


def test_proposals_are_limited_per_key(limits, buyer, buyer_api, seller):
    limits(payments="2/day")
    service = register_service(seller)
    for _ in range(2):
        assert buyer_api.post("/usage-agreements", proposal(service)).status_code == 201
    assert_rate_limited(buyer_api.post("/usage-agreements", proposal(service)))
    assert UsageAgreement.objects.count() == 2

    # Reads are not purchases; another key (even of the same agent's owner) has its own budget.
    assert buyer_api.get("/usage-agreements").status_code == 200
    other = Api(issue_key(AgentFactory(owner=buyer.owner, is_seller=False)))
    assert other.post("/usage-agreements", proposal(service)).status_code == 201


def test_escrow_activation_is_limited_before_the_body_is_read(limits, buyer_api):
    limits(payments="1/day")
    url = "/usage-agreements/00000000-0000-0000-0000-000000000000/activate-escrow"
    assert buyer_api.post(url, {}).status_code in (400, 404)
    assert_rate_limited(buyer_api.post(url, {}))


def test_seller_usage_reports_are_limited(limits, seller_api):
    limits(payments="1/day")
    url = "/usage-agreements/00000000-0000-0000-0000-000000000000/record-usage"
    headers = {"Idempotency-Key": "k1"}
    assert seller_api.post(url, {"units": 1}, headers=headers).status_code == 404
    assert_rate_limited(seller_api.post(url, {"units": 1}, headers={"Idempotency-Key": "k2"}))


@pytest.mark.chain
def test_proxied_calls_are_limited_and_a_refused_call_costs_nothing(limits, escrow_chain, http_server,
                                                                     django_capture_on_commit_callbacks):
    active = active_agreement(escrow_chain, django_capture_on_commit_callbacks, http_server.url + "/api")
    limits(proxy="2/day")
    for _ in range(2):
        assert active.buyer_api.get(f"{active.proxy}/translate").status_code == 200
    assert_rate_limited(active.buyer_api.get(f"{active.proxy}/translate"))
    assert len(http_server.requests) == 2
    assert UsageAgreement.objects.get(pk=active.agreement_id).used == 2 * 20_000
