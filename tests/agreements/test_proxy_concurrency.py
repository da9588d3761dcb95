"""No overspend: many concurrent proxied calls through a real HTTP server against a budget for fewer."""

import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from agreements.models import UsageAgreement, UsageEvent
from tests.escrow.flow import Parties, poll_mined

pytestmark = [pytest.mark.chain, pytest.mark.postgres, pytest.mark.django_db(transaction=True)]


def test_concurrent_calls_charge_exactly_the_budget(escrow_chain, http_server, live_server):
    budget_calls, attempts = 7, 40
    parties = Parties(escrow_chain, upstream_base_url=http_server.url)
    agreement = parties.accepted_agreement(quantity=budget_calls)
    response = parties.buyer_api.post(f"/usage-agreements/{agreement['id']}/activate-escrow",
                                      parties.signed_activation(agreement["id"]))
    assert response.status_code == 202
    poll_mined()
    assert parties.agreement(agreement["id"])["status"] == "active"

    url = f"{live_server.url}/metered-proxy/{agreement['id']}/work"
    headers = {"Authorization": f"Bearer {parties.buyer_api.secret}"}
    with httpx.Client(timeout=30) as client, ThreadPoolExecutor(max_workers=12) as pool:
        responses = list(pool.map(lambda _: client.get(url, headers=headers), range(attempts)))
    statuses = [r.status_code for r in responses]

    assert statuses.count(200) == budget_calls, responses[0].text
    assert statuses.count(402) == attempts - budget_calls
    agreement_row = UsageAgreement.objects.get(pk=agreement["id"])
    events = UsageEvent.objects.filter(agreement=agreement_row).order_by("seq")
    assert agreement_row.used == agreement_row.deposit_amount == sum(e.cost for e in events)
    assert agreement_row.reserved == 0
    assert [e.seq for e in events] == list(range(1, budget_calls + 1))  # gap-free
    assert len(http_server.requests) == budget_calls  # refused calls never reached the seller


def test_a_retry_while_the_first_call_runs_is_409_request_in_progress_and_charged_once(
        escrow_chain, http_server, live_server):
    parties, agreement, url = _active_agreement_proxy_url(escrow_chain, http_server, live_server)
    headers = {"Authorization": f"Bearer {parties.buyer_api.secret}", "X-Request-Nonce": "job-7"}
    http_server.responses.append((200, {"done": True}, 5))  # the seller takes its time over the first call

    with httpx.Client(timeout=30) as client, ThreadPoolExecutor(max_workers=1) as pool:
        first = _first_call_at_the_seller(pool, client, url, headers, http_server)
        in_flight = client.get(url, headers=headers)
        answered = first.result()
        replayed = client.get(url, headers=headers)

    assert in_flight.status_code == 409 and in_flight.json()["error"]["code"] == "request_in_progress"
    assert answered.status_code == 200 and answered.json() == {"done": True}
    assert replayed.status_code == 200 and replayed.headers["X-Replayed"] == "true"
    assert replayed.json() == {"done": True}
    assert len(http_server.requests) == 1
    agreement_row = UsageAgreement.objects.get(pk=agreement["id"])
    assert (agreement_row.used, agreement_row.reserved) == (parties.service.unit_price, 0)
    assert UsageEvent.objects.filter(agreement=agreement_row).count() == 1


def test_a_retry_while_a_call_that_fails_runs_is_409_and_one_after_its_5xx_is_forwarded_and_charged_once(
        escrow_chain, http_server, live_server):
    """The nonce of a call not charged (its upstream answered 5xx) is released once it has answered, not while it
    runs: a retry meanwhile is still 409 `request_in_progress`."""
    parties, agreement, url = _active_agreement_proxy_url(escrow_chain, http_server, live_server)
    headers = {"Authorization": f"Bearer {parties.buyer_api.secret}", "X-Request-Nonce": "job-8"}
    http_server.responses.extend([(503, {"error": "busy"}, 5), (200, {"done": True})])

    with httpx.Client(timeout=30) as client, ThreadPoolExecutor(max_workers=1) as pool:
        first = _first_call_at_the_seller(pool, client, url, headers, http_server)
        in_flight = client.get(url, headers=headers)
        failed = first.result()
        retried = client.get(url, headers=headers)
        replayed = client.get(url, headers=headers)

    assert in_flight.status_code == 409 and in_flight.json()["error"]["code"] == "request_in_progress"
    assert (failed.status_code, failed.headers["X-Usage-Cost"]) == (503, "0")
    assert retried.status_code == 200 and "X-Replayed" not in retried.headers and retried.json() == {"done": True}
    assert replayed.status_code == 200 and replayed.headers["X-Replayed"] == "true"
    assert len(http_server.requests) == 2
    agreement_row = UsageAgreement.objects.get(pk=agreement["id"])
    assert (agreement_row.used, agreement_row.reserved) == (parties.service.unit_price, 0)
    assert UsageEvent.objects.filter(agreement=agreement_row).count() == 1


def _active_agreement_proxy_url(escrow_chain, http_server, live_server):
    """(parties, agreement, the proxy URL of its `work` path) of an agreement funded on-chain."""
    parties = Parties(escrow_chain, upstream_base_url=http_server.url)
    agreement = parties.accepted_agreement(quantity=5)
    assert parties.buyer_api.post(f"/usage-agreements/{agreement['id']}/activate-escrow",
                                  parties.signed_activation(agreement["id"])).status_code == 202
    poll_mined()
    return parties, agreement, f"{live_server.url}/metered-proxy/{agreement['id']}/work"


def _first_call_at_the_seller(pool, client, url, headers, http_server):
    """The first call, sent on the pool, once it has reached the seller (which takes its time answering it)."""
    first = pool.submit(client.get, url, headers=headers)
    deadline = time.monotonic() + 20
    while not http_server.requests:
        assert time.monotonic() < deadline and not first.done(), "the first call never reached the seller"
        time.sleep(0.05)
    return first
