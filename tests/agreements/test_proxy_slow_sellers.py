"""A slow seller's calls hold a share of the web threads, not all of them (SECURITY.md, hostile input): a buyer
calling a slow upstream (its own, say, whose timeouts are not charged) held as many threads as it made calls at
once, and every other buyer's calls waited for one."""

import queue
import time
from concurrent.futures import ThreadPoolExecutor
from http.server import BaseHTTPRequestHandler

import httpx
import pytest

from agreements import proxy
from agreements.models import UsageAgreement
from tests.agreements.conftest import activated_through_the_api
from tests.support.http_server import RecordingServer, serving

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


def test_a_fast_seller_under_a_burst_is_never_refused(slow_share, settings, escrow_chain, http_server, live_server):
    # Answers of 0.1 s against the setting's default, not slow_share's 0.3 s: a call's wait includes this process's
    # own work on it, and 12 calls at once on a loaded 2-core machine began up to 0.16 s apart (one still waiting),
    # too close to 0.3 s. Per seller and in all, the slow share (2 and 3 calls) stays what 12 calls would exceed.
    settings.PROXY_SLOW_SECONDS = 2.0
    parties = activated_through_the_api(escrow_chain, http_server.url, quantity=20)
    url = f"{live_server.url}/metered-proxy/{parties.agreement_id}/work"
    headers = {"Authorization": f"Bearer {parties.buyer_api.secret}"}
    http_server.responses.extend([(200, {}, 0.1)] * 12)
    with httpx.Client(timeout=30) as client, ThreadPoolExecutor(max_workers=12) as pool:
        statuses = [r.status_code for r in pool.map(lambda _: client.get(url, headers=headers), range(12))]
    assert statuses == [200] * 12


class DribblingBodies(BaseHTTPRequestHandler):
    """Answers its head at once, then its body a byte every `pause` seconds (`bytes` of them)."""

    pause, size = 0.1, 10

    def do_GET(self):
        self.send_response(200)
        self.send_header("Content-Length", str(self.size))
        self.end_headers()
        self.wfile.flush()
        try:
            for _ in range(self.size):
                time.sleep(self.pause)
                self.wfile.write(b"a")
                self.wfile.flush()
        except OSError:
            pass

    def log_message(self, *args):
        pass


def test_a_seller_answering_heads_at_once_and_dribbling_bodies_holds_its_share_and_no_more(
        slow_share, escrow_chain, live_server):
    """A seller counted as slow by its answers' heads alone escaped the share with fast heads and slow bodies: the
    threads streaming its bodies are held as long as those waiting for a head."""
    DribblingBodies.pause, DribblingBodies.size = 0.1, 10  # 1 s per answer
    with serving(DribblingBodies) as upstream_url:
        parties = activated_through_the_api(escrow_chain, upstream_url, quantity=10)
        url = f"{live_server.url}/metered-proxy/{parties.agreement_id}/work"
        headers = {"Authorization": f"Bearer {parties.buyer_api.secret}"}
        heads = queue.Queue()

        def streamed(client) -> bytes:
            with client.stream("GET", url, headers=headers) as response:
                heads.put(response.status_code)  # the buyer has the head: the proxy is streaming the body
                return response.read()

        with httpx.Client(timeout=30) as client, ThreadPoolExecutor(max_workers=2) as pool:
            assert client.get(url, headers=headers).content == b"a" * 10  # 1 s: the seller is slow from now on
            DribblingBodies.pause, DribblingBodies.size = 0.1, 30  # 3 s each
            streaming = [pool.submit(streamed, client) for _ in range(2)]
            assert [heads.get(timeout=20) for _ in streaming] == [200, 200]  # both heads are in, bodies streaming
            began = time.monotonic()
            refused = client.get(url, headers=headers)
            refused_in = time.monotonic() - began
            answered = [future.result() for future in streaming]

    assert refused.status_code == 503, refused.text
    assert refused.json()["error"]["code"] == "upstream_busy"
    assert refused_in < 1.0
    assert answered == [b"a" * 30] * 2
    agreement = UsageAgreement.objects.get(pk=parties.agreement_id)
    assert (agreement.used, agreement.reserved) == (3 * parties.service.unit_price, 0)


def test_an_answer_closed_unread_ends_its_call_for_the_share(slow_share, settings, escrow_chain, http_server):
    """A streamed answer the server closes without iterating it (its client gone first) ends the call's wait on
    the seller: left counted, a slow seller's share would shrink for good with every such call."""
    settings.PROXY_SLOW_SECONDS, settings.PROXY_SLOW_CALLS_PER_SELLER = 0, 1  # every call slow; one at a time
    parties = activated_through_the_api(escrow_chain, http_server.url, quantity=5)
    auth = {"HTTP_AUTHORIZATION": f"Bearer {parties.buyer_api.secret}"}
    first = parties.buyer_api.client.get(f"/metered-proxy/{parties.agreement_id}/work", **auth)
    assert first.status_code == 200 and first.streaming
    first.close()  # as the server does, however the request ended
    second = parties.buyer_api.client.get(f"/metered-proxy/{parties.agreement_id}/work", **auth)
    assert second.status_code == 200, second.content
    b"".join(second.streaming_content)  # read to its end, as the server does: the test client closes it then
    assert parties.seller.pk not in proxy._slow_sellers._calls  # no wait left for a later call to count
    assert parties.buyer.pk not in proxy._slow_buyers._calls
