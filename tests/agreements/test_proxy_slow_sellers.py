"""A slow seller's calls hold a share of the web threads, not all of them (SECURITY.md, hostile input): a buyer
calling a slow upstream (its own, say, whose timeouts are not charged) held as many threads as it made calls at
once, and every other buyer's calls waited for one."""

import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from agreements.models import UsageAgreement
from tests.agreements.conftest import activated_through_the_api
from tests.support.http_server import RecordingServer

pytestmark = [pytest.mark.chain, pytest.mark.postgres, pytest.mark.django_db(transaction=True)]


@pytest.fixture
def slow_share(settings):
    settings.PROXY_SLOW_SECONDS, settings.PROXY_SLOW_REMEMBER_SECONDS = 0.3, 60.0
    settings.PROXY_SLOW_CALLS_PER_SELLER, settings.PROXY_SLOW_CALLS = 2, 3


@pytest.fixture
def other_upstream():
    server = RecordingServer().start()
    yield server
    server.stop()


def test_a_slow_seller_holds_its_share_of_the_threads_and_further_calls_are_refused_at_once(
        slow_share, escrow_chain, http_server, other_upstream, live_server):
    slow = activated_through_the_api(escrow_chain, http_server.url, quantity=10)
    fast = activated_through_the_api(escrow_chain, other_upstream.url, quantity=10)

    def call(client, parties):
        return client.get(f"{live_server.url}/metered-proxy/{parties.agreement_id}/work",
                          headers={"Authorization": f"Bearer {parties.buyer_api.secret}"})

    http_server.responses.extend([(200, {"n": 1}, 0.5), (200, {"n": 2}, 3), (200, {"n": 3}, 3)])

    with httpx.Client(timeout=30) as client, ThreadPoolExecutor(max_workers=2) as pool:
        assert call(client, slow).status_code == 200  # answered in 0.5 s: the seller is slow from now on
        waiting = [pool.submit(call, client, slow) for _ in range(2)]
        deadline = time.monotonic() + 20
        while len(http_server.requests) < 3:
            assert time.monotonic() < deadline, "the calls never reached the seller"
            time.sleep(0.02)

        began = time.monotonic()
        refused = call(client, slow)
        refused_in = time.monotonic() - began
        reserved_meanwhile = UsageAgreement.objects.get(pk=slow.agreement_id).reserved
        other = call(client, fast)
        answered = [future.result() for future in waiting]

    assert refused.status_code == 503, refused.text
    assert refused.json()["error"]["code"] == "upstream_busy"
    assert refused.headers["Retry-After"] == "1"
    assert refused_in < 1.0
    assert len(http_server.requests) == 3  # the refused call never reached the seller
    assert reserved_meanwhile == 2 * slow.service.unit_price  # the two waiting calls' only: nothing held for it
    assert other.status_code == 200  # another seller's buyers are served meanwhile
    assert [response.json() for response in answered] in ([{"n": 2}, {"n": 3}], [{"n": 3}, {"n": 2}])
    agreement = UsageAgreement.objects.get(pk=slow.agreement_id)
    assert (agreement.used, agreement.reserved) == (3 * slow.service.unit_price, 0)


def test_a_fast_seller_under_a_burst_is_never_refused(slow_share, escrow_chain, http_server, live_server):
    parties = activated_through_the_api(escrow_chain, http_server.url, quantity=20)
    url = f"{live_server.url}/metered-proxy/{parties.agreement_id}/work"
    headers = {"Authorization": f"Bearer {parties.buyer_api.secret}"}
    http_server.responses.extend([(200, {}, 0.1)] * 12)
    with httpx.Client(timeout=30) as client, ThreadPoolExecutor(max_workers=12) as pool:
        statuses = [r.status_code for r in pool.map(lambda _: client.get(url, headers=headers), range(12))]
    assert statuses == [200] * 12
