"""A buyer that reads its answers slowly, or not at all, holds its own share of the web threads, and no seller's
(SECURITY.md, hostile input): its unread answers counted as waits on the seller, so that an honest seller counted
as slow and its other buyers were held to a slow seller's share."""

import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from agreements.models import UsageAgreement
from tests.agreements.conftest import activated_through_the_api
from tests.escrow.flow import Parties, poll_mined

pytestmark = [pytest.mark.chain, pytest.mark.postgres, pytest.mark.django_db(transaction=True)]


def another_buyer(chain, seller: Parties) -> Parties:
    """A buyer of its own with an active agreement for 10 calls to `seller`'s service (the same seller agent)."""
    parties = Parties(chain)
    parties.seller, parties.seller_api, parties.service = seller.seller, seller.seller_api, seller.service
    agreement = parties.accepted_agreement(quantity=10)
    assert parties.buyer_api.post(f"/usage-agreements/{agreement['id']}/activate-escrow",
                                  parties.signed_activation(agreement["id"])).status_code == 202
    for _ in range(5):
        poll_mined()
        if parties.agreement(agreement["id"])["status"] == "active":
            break
    parties.agreement_id = agreement["id"]
    return parties


def unread_call(parties: Parties):
    """A call whose answer the buyer does not read (the test client streams an answer only as the test reads it)."""
    return parties.buyer_api.client.get(f"/metered-proxy/{parties.agreement_id}/work")


def test_a_buyer_not_reading_its_answers_does_not_make_a_fast_seller_slow_for_other_buyers(
        settings, escrow_chain, http_server, live_server):
    settings.PROXY_SLOW_SECONDS, settings.PROXY_SLOW_REMEMBER_SECONDS = 1.0, 60.0
    settings.PROXY_SLOW_CALLS_PER_SELLER, settings.PROXY_SLOW_CALLS_PER_BUYER, settings.PROXY_SLOW_CALLS = 2, 2, 4
    first = activated_through_the_api(escrow_chain, http_server.url, quantity=10)
    second = another_buyer(escrow_chain, first)

    unread = [unread_call(first) for _ in range(2)]
    assert [response.status_code for response in unread] == [200, 200]
    time.sleep(1.3)  # the answers have waited on their buyer longer than PROXY_SLOW_SECONDS

    http_server.responses.extend([(200, {"n": n}, 0.2) for n in range(4)])  # a fast seller, 4 calls at once
    url = f"{live_server.url}/metered-proxy/{second.agreement_id}/work"
    headers = {"Authorization": f"Bearer {second.buyer_api.secret}"}
    with httpx.Client(timeout=30) as client, ThreadPoolExecutor(max_workers=4) as pool:
        answered = list(pool.map(lambda _: client.get(url, headers=headers), range(4)))
    for response in unread:
        response.close()

    assert [response.status_code for response in answered] == [200] * 4, [r.text for r in answered]
    assert sorted(response.json()["n"] for response in answered) == [0, 1, 2, 3]


def test_a_buyer_not_reading_its_answers_holds_its_share_of_the_threads_and_no_more(
        settings, escrow_chain, http_server):
    settings.PROXY_SLOW_SECONDS, settings.PROXY_SLOW_REMEMBER_SECONDS = 0.3, 60.0
    settings.PROXY_SLOW_CALLS_PER_SELLER, settings.PROXY_SLOW_CALLS_PER_BUYER, settings.PROXY_SLOW_CALLS = 2, 2, 4
    slow_reader = activated_through_the_api(escrow_chain, http_server.url, quantity=10)
    other = another_buyer(escrow_chain, slow_reader)
    price = slow_reader.service.unit_price

    unread = [unread_call(slow_reader) for _ in range(2)]
    assert [response.status_code for response in unread] == [200, 200]
    time.sleep(0.5)  # the answers have waited on their buyer longer than PROXY_SLOW_SECONDS: its share is full

    began = time.monotonic()
    refused = unread_call(slow_reader)
    refused_in = time.monotonic() - began
    agreement = UsageAgreement.objects.get(pk=slow_reader.agreement_id)
    assert refused.status_code == 503, refused.content
    assert refused.json()["error"]["code"] == "buyer_busy"
    assert refused["Retry-After"] == "1"
    assert refused_in < 1.0
    assert len(http_server.requests) == 2  # the refused call never reached the seller
    assert (agreement.used, agreement.reserved) == (2 * price, 0)  # nothing reserved or charged for it

    others = [unread_call(other) for _ in range(3)]  # another buyer of the same seller is not held to it
    assert [response.status_code for response in others] == [200] * 3

    assert b"".join(unread.pop().streaming_content)  # read at last: a thread of its share comes back
    unread.append(unread_call(slow_reader))
    assert unread[-1].status_code == 200
    for response in unread + others:
        response.close()
