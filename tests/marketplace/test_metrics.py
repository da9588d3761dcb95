"""GET /metrics: Prometheus text for operators only, with request, proxy, charge, chain and task metrics."""

import pytest
from django.core.cache import cache
from django.test import Client

from agreements.tasks import deliver_webhook
from escrow.models import TxStatus
from tests.agreements.helpers import propose
from tests.catalog.factories import register_service
from tests.conftest import Api, error_code
from tests.marketplace.conftest import active_agreement, scrape

pytestmark = pytest.mark.django_db


def test_metrics_are_for_operators_only(settings, buyer_api, owner, operator):
    settings.METRICS_TOKEN = "scrape-token-with-enough-entropy"
    assert Client().get("/metrics").status_code == 403
    assert buyer_api.client.get("/metrics").status_code == 403  # an agent's key is not an operator
    assert Client().get("/metrics", HTTP_AUTHORIZATION="Bearer wrong").status_code == 403
    owner_session = Client()
    owner_session.force_login(owner)  # logged in, but not staff
    assert owner_session.get("/metrics").status_code == 403

    assert Client().get("/metrics", HTTP_AUTHORIZATION="Bearer scrape-token-with-enough-entropy").status_code == 200
    assert operator.get("/metrics").status_code == 200


def test_guessing_the_scrape_token_is_limited_per_client(settings):
    """METRICS_TOKEN is the operator's choice, perhaps a short one: wrong tokens count against the client's budget
    of failed authentications (RATE_LIMIT_AUTH_FAILURES), the right one then tells a guesser nothing."""
    settings.METRICS_TOKEN = "scrape-token"
    settings.REST_FRAMEWORK = {**settings.REST_FRAMEWORK, "DEFAULT_THROTTLE_RATES": {
        **settings.REST_FRAMEWORK["DEFAULT_THROTTLE_RATES"], "auth_failures": "2/hour"}}
    cache.clear()
    guesser = Client(REMOTE_ADDR="198.51.100.7")
    for guess in ("scrape-tokem", "scrape-tokel"):
        assert guesser.get("/metrics", HTTP_AUTHORIZATION=f"Bearer {guess}").status_code == 403
    for token in ("scrape-tokek", "scrape-token"):
        response = guesser.get("/metrics", HTTP_AUTHORIZATION=f"Bearer {token}")
        assert response.status_code == 429
        assert error_code(response) == "authentication_failures_limited"
        assert int(response["Retry-After"]) > 0
    scraper = Client(REMOTE_ADDR="203.0.113.9")
    assert scraper.get("/metrics", HTTP_AUTHORIZATION="Bearer scrape-token").status_code == 200
    cache.clear()


def test_no_token_configured_means_no_token_is_accepted(settings):
    settings.METRICS_TOKEN = ""
    assert Client().get("/metrics", HTTP_AUTHORIZATION="Bearer ").status_code == 403


def test_request_latency_is_recorded_by_route(operator, buyer_api):
    view = "agreements.views.AgreementsView"
    key = ("django_http_requests_latency_seconds_by_view_method_count", (("method", "GET"), ("view", view)))
    before = scrape(operator).get(key, 0)
    assert buyer_api.get("/usage-agreements").status_code == 200
    assert scrape(operator)[key] == before + 1
    statuses = scrape(operator)
    assert statuses[("django_http_responses_total_by_status_view_method_total",
                     (("method", "GET"), ("status", "200"), ("view", view)))] >= 1


def test_agreements_and_approvals_are_counted_by_status(operator, owner_api, buyer, buyer_api, seller):
    service = register_service(seller)
    owner_api.put(f"/agents/{buyer.pk}/policies", {"approval_threshold_atomic": 250_000})
    propose(buyer_api, service, quantity=1)
    propose(buyer_api, service, quantity=1)
    propose(buyer_api, service, quantity=100)  # held for the owner's approval
    metrics = scrape(operator)
    assert metrics[("marketplace_agreements", (("status", "proposed"),))] == 2
    assert metrics[("marketplace_agreements", (("status", "pending_approval"),))] == 1
    assert metrics[("marketplace_approval_requests", (("status", "pending"),))] == 1


def test_celery_task_failures_are_counted_by_task(operator):
    key = ("marketplace_celery_task_failures_total", (("task", "agreements.tasks.deliver_webhook"),))
    before = scrape(operator).get(key, 0)
    result = deliver_webhook.apply(args=["not-a-uuid"], throw=False)
    assert result.failed()
    assert scrape(operator)[key] == before + 1


@pytest.mark.chain
def test_proxy_latency_charges_and_chain_transactions(operator, escrow_chain, http_server,
                                                      django_capture_on_commit_callbacks):
    active = active_agreement(escrow_chain, django_capture_on_commit_callbacks, http_server.url + "/api")
    before = scrape(operator)
    http_server.responses.extend([(200, {}), (503, {})])
    with django_capture_on_commit_callbacks(execute=True):
        assert active.buyer_api.get(f"{active.proxy}/a").status_code == 200
        assert active.buyer_api.get(f"{active.proxy}/b").status_code == 503  # released, not charged
    with django_capture_on_commit_callbacks(execute=True):
        response = active.seller_api.post(f"/usage-agreements/{active.agreement_id}/record-usage",
                                          {"events": [{"units": 1}, {"units": 2}]},
                                          headers={"Idempotency-Key": "report-1"})
        assert response.status_code == 201, response.content
    after = scrape(operator)

    def delta(name, **labels):
        key = (name, tuple(sorted(labels.items())))
        return after.get(key, 0) - before.get(key, 0)

    assert delta("marketplace_proxy_upstream_seconds_count", outcome="ok") == 1
    assert delta("marketplace_proxy_upstream_seconds_count", outcome="error") == 1
    assert delta("marketplace_charges_total", source="proxy") == 1
    assert delta("marketplace_charged_base_units_total", source="proxy", token="USDC") == 20_000
    assert delta("marketplace_charges_total", source="seller_report") == 2
    assert delta("marketplace_charged_base_units_total", source="seller_report", token="USDC") == 3 * 20_000
    assert after[("marketplace_chain_transactions", (("purpose", "activate"), ("status", TxStatus.CONFIRMED)))] == 1


def test_an_agent_key_cannot_read_metrics_even_with_the_token_header_elsewhere(settings, buyer):
    settings.METRICS_TOKEN = "scrape-token-with-enough-entropy"
    api = Api("scrape-token-with-enough-entropy")  # the token is only accepted on /metrics, never as a key
    assert api.get("/usage-agreements").status_code == 401
