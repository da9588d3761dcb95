"""The metered proxy and seller-reported usage, against a real upstream HTTP server and the escrow on Anvil."""

import json
import threading
import time
from datetime import timedelta

import pytest
from django.db import connection
from django.utils import timezone

from agreements import metering
from agreements.models import ProxyReplay, UsageAgreement, UsageEvent
from sdk import proxy_signature, receipts
from tests.conftest import codes_at, error_code, read_to_its_end
from tests.escrow.flow import Parties, onchain_escrow

pytestmark = [pytest.mark.chain, pytest.mark.django_db]


def test_a_proxied_call_is_forwarded_signed_and_billed(active, http_server, escrow_chain):
    http_server.responses.append((200, {"translated": "hallo"}))
    response = read_to_its_end(active.buyer_api.client.post(
        f"{active.proxy}/translate?lang=de", data=json.dumps({"text": "hi"}), content_type="application/json",
        HTTP_AUTHORIZATION=f"Bearer {active.buyer_api.secret}", HTTP_X_CUSTOM="kept"))
    assert response.status_code == 200
    assert json.loads(b"".join(response.streaming_content)) == {"translated": "hallo"}
    assert response["X-Usage-Cost"] == "20000"
    assert response["X-Escrow-Remaining"] == str(5 * 20_000 - 20_000)
    assert response["X-Usage-Seq"] == "1"

    [forwarded] = http_server.requests
    assert (forwarded.method, forwarded.path) == ("POST", "/api/translate?lang=de")
    assert json.loads(forwarded.body) == {"text": "hi"}
    assert forwarded.headers["X-Custom"] == "kept"
    assert "Authorization" not in forwarded.headers  # the buyer's key never reaches the seller
    assert proxy_signature.verify(active.service.proxy_secret, forwarded.headers, method="POST",
                                  path="/api/translate?lang=de".removeprefix("/api"))
    assert not proxy_signature.verify("psk_wrong", forwarded.headers, method="POST", path="/translate?lang=de")

    usage = active.buyer_api.get(f"/usage-agreements/{active.agreement_id}/usage").json()["results"]
    assert [(e["seq"], e["cost_atomic"], e["cumulative_atomic"]) for e in usage] == [(1, 20_000, 20_000)]
    onchain_id = UsageAgreement.objects.get(pk=active.agreement_id).onchain_id
    verified = receipts.verify_usage(usage, agreement_id=onchain_id, chain_id=escrow_chain.chain_id,
                                     escrow_address=escrow_chain.addresses["escrow"],
                                     escrow=onchain_escrow(escrow_chain, onchain_id), price_per_unit=20_000,
                                     pinned_receipt_signers=escrow_chain.accounts.receipt_signer.address)
    assert verified.cumulative_amount == 20_000
    # The contract computes the same receipt digest.
    onchain = escrow_chain.escrow.functions.usageReceiptDigest(
        UsageAgreement.objects.get(pk=active.agreement_id).onchain_id, 1, 20_000, usage[0]["usage_digest"]).call()
    assert onchain == receipts.usage_receipt_digest(
        chain_id=escrow_chain.chain_id, escrow_address=escrow_chain.addresses["escrow"],
        agreement_id=UsageAgreement.objects.get(pk=active.agreement_id).onchain_id, seq=1, cumulative_amount=20_000,
        usage_digest=usage[0]["usage_digest"])


def test_budget_exhaustion_is_402_and_nothing_more_is_charged(active, http_server):
    for _ in range(5):
        assert active.buyer_api.get(f"{active.proxy}/x").status_code == 200
    refused = active.buyer_api.get(f"{active.proxy}/x")
    assert refused.status_code == 402 and error_code(refused) == "budget_exhausted"
    agreement = UsageAgreement.objects.get(pk=active.agreement_id)
    assert agreement.used == agreement.deposit_amount and agreement.reserved == 0
    assert agreement.completion_reason == "budget_used_up"
    assert len(http_server.requests) == 5


def test_a_call_that_does_not_fit_the_remaining_budget_is_402(escrow_chain, http_server,
                                                               django_capture_on_commit_callbacks):
    parties = Parties(escrow_chain, upstream_base_url=http_server.url,
                      pricing={"type": "per_unit", "unit_name": "page", "unit_price_atomic": 10_000})
    agreement = parties.accepted_agreement(quantity=10)
    parties.activate(agreement["id"], django_capture_on_commit_callbacks)
    proxy = f"/metered-proxy/{agreement['id']}/pages"
    too_many = parties.buyer_api.get(proxy, headers={"X-Max-Units": "11"})
    assert too_many.status_code == 402 and error_code(too_many) == "budget_exhausted"
    assert http_server.requests == []

    http_server.responses.append((200, {}))
    http_server.responses[-1] = (200, {})
    ok = parties.buyer_api.get(proxy, headers={"X-Max-Units": "4"})
    assert ok.status_code == 200 and ok["X-Usage-Cost"] == "10000"  # no X-Usage-Units header: one unit
    bad = parties.buyer_api.get(proxy, headers={"X-Max-Units": "zero"})
    assert bad.status_code == 400 and error_code(bad) == "invalid_max_units"


def test_upstream_failures_release_the_reservation(active, http_server):
    http_server.responses.append((503, {"error": "overloaded"}))
    failed = active.buyer_api.get(f"{active.proxy}/x")
    assert failed.status_code == 503 and failed["X-Usage-Cost"] == "0"
    agreement = UsageAgreement.objects.get(pk=active.agreement_id)
    assert (agreement.used, agreement.reserved) == (0, 0)
    assert not UsageEvent.objects.exists()

    http_server.stop()
    unreachable = active.buyer_api.get(f"{active.proxy}/x")
    assert unreachable.status_code == 502 and error_code(unreachable) == "upstream_unavailable"
    agreement.refresh_from_db()
    assert (agreement.used, agreement.reserved) == (0, 0)
    http_server.start()  # the fixture stops it again


def test_request_nonce_replays_without_a_second_charge(active, http_server):
    http_server.responses.append((200, {"n": 1}))
    first = active.buyer_api.post(f"{active.proxy}/x", {"a": 1}, headers={"X-Request-Nonce": "retry-1"})
    second = active.buyer_api.post(f"{active.proxy}/x", {"a": 1}, headers={"X-Request-Nonce": "retry-1"})
    assert first.status_code == second.status_code == 200
    assert first.content == second.content and second["X-Replayed"] == "true"
    assert second["X-Usage-Event-Id"] == first["X-Usage-Event-Id"]
    assert len(http_server.requests) == 1
    assert UsageAgreement.objects.get(pk=active.agreement_id).used == 20_000


def test_a_nonce_retry_of_an_uncharged_5xx_call_is_a_new_call_forwarded_and_charged_once(active, http_server):
    """A call with X-Request-Nonce whose upstream answered 5xx was not charged, but its answer was stored whole for
    replays: a retry got the stored 5xx (X-Replayed) and was never forwarded, the row holding the body for nothing."""
    http_server.responses.extend([(503, {"error": "overloaded"}), (200, {"n": 1})])
    nonce = {"X-Request-Nonce": "flaky-1"}
    failed = active.buyer_api.get(f"{active.proxy}/x", headers=nonce)
    assert (failed.status_code, failed["X-Usage-Cost"]) == (503, "0")
    assert json.loads(b"".join(failed.streaming_content)) == {"error": "overloaded"}  # answered as any 5xx
    assert not ProxyReplay.objects.filter(request_nonce="flaky-1").exists()  # released: nothing stored

    retried = active.buyer_api.get(f"{active.proxy}/x", headers=nonce)
    assert retried.status_code == 200 and not retried.has_header("X-Replayed")
    assert (retried.json(), retried["X-Usage-Cost"]) == ({"n": 1}, "20000")
    again = active.buyer_api.get(f"{active.proxy}/x", headers=nonce)  # charged now: replayed, as any
    assert (again.status_code, again["X-Replayed"], again.content) == (200, "true", retried.content)
    assert again["X-Usage-Event-Id"] == retried["X-Usage-Event-Id"]
    assert len(http_server.requests) == 2
    assert UsageAgreement.objects.get(pk=active.agreement_id).used == 20_000
    assert UsageEvent.objects.filter(request_nonce="flaky-1").count() == 1


def test_a_nonce_retry_of_a_charged_call_whose_answer_failed_is_reply_lost_not_forwarded_again(active, http_server):
    """The nonce of a call charged before its answer failed was freed: the retry was forwarded and charged again."""
    # Content-Length: 100, 10 bytes sent, then the connection closes.
    http_server.responses.extend([(200, b"x" * 10, 0, {"Content-Length": "100"})] * 2)
    nonce = {"X-Request-Nonce": "cut-1"}
    first = active.buyer_api.get(f"{active.proxy}/x", headers=nonce)
    assert first.status_code >= 500 and UsageEvent.objects.count() == 1  # charged: the head came whole
    again = active.buyer_api.get(f"{active.proxy}/x", headers=nonce)
    assert (again.status_code, error_code(again), again["X-Replayed"]) == (502, "reply_lost", "true")
    event = UsageEvent.objects.get()
    # The charge's headers, as the first answer's (the seq and units too, to match the usage event and its receipt).
    charge = ("X-Usage-Cost", "X-Usage-Units", "X-Usage-Event-Id", "X-Usage-Seq")
    assert [again[name] for name in charge] == [first[name] for name in charge] == [
        "20000", "1", str(event.pk), str(event.seq)]
    assert len(http_server.requests) == 1
    assert UsageAgreement.objects.get(pk=active.agreement_id).used == 20_000


@pytest.mark.postgres
@pytest.mark.django_db(transaction=True)  # the reaper's transactions and the call's, side by side
def test_a_call_the_reaper_released_is_not_answered_as_charged_by_an_earlier_call_with_its_request_id(
        active_outside_transaction, http_server):
    """A call that came back after the reaper released it looked for its charge by X-Request-Id, which the buyer
    chooses: it found an earlier call's event and was answered 200 as charged, for nothing charged."""
    parties = active_outside_transaction
    proxy = f"/metered-proxy/{parties.agreement_id}/x"
    http_server.responses.extend([(200, {}), (200, {}, 2.0)])  # the second is slow: reaped meanwhile
    assert parties.buyer_api.get(proxy, headers={"X-Request-Id": "same"})["X-Usage-Seq"] == "1"

    def reap():
        time.sleep(0.7)
        try:
            metering.intents_reap(now=timezone.now() + timedelta(hours=1))
        finally:
            connection.close()

    reaper = threading.Thread(target=reap)
    reaper.start()
    late = parties.buyer_api.get(proxy, headers={"X-Request-Id": "same"})
    reaper.join()
    assert (late.status_code, error_code(late)) == (503, "call_expired")
    assert not late.has_header("X-Usage-Event-Id") and UsageEvent.objects.count() == 1
    assert UsageAgreement.objects.get(pk=parties.agreement_id).used == 20_000


def test_only_the_buyer_uses_the_proxy(active):
    response = active.seller_api.get(f"{active.proxy}/x")
    assert response.status_code == 403 and error_code(response) == "buyer_only"


def test_seller_records_usage_all_or_nothing(active, escrow_chain):
    url = f"/usage-agreements/{active.agreement_id}/record-usage"
    missing_key = active.seller_api.post(url, {"units": 1})
    assert missing_key.status_code == 400 and error_code(missing_key) == "idempotency_key_required"

    batch = {"events": [{"units": 1, "description": f"job {i}"} for i in range(3)]}
    recorded = active.seller_api.post(url, batch, headers={"Idempotency-Key": "b1"})
    assert recorded.status_code == 201, recorded.content
    assert recorded.json()["used_atomic"] == 60_000
    replay = active.seller_api.post(url, batch, headers={"Idempotency-Key": "b1"})
    assert replay.json() == recorded.json()

    too_much = active.seller_api.post(url, {"events": [{"units": 1}] * 3}, headers={"Idempotency-Key": "b2"})
    assert too_much.status_code == 402 and error_code(too_much) == "budget_exhausted"
    assert UsageEvent.objects.count() == 3

    buyer_try = active.buyer_api.post(url, {"units": 1}, headers={"Idempotency-Key": "b3"})
    assert buyer_try.status_code == 403 and error_code(buyer_try) == "seller_only"  # as on accept

    usage = active.buyer_api.get(f"/usage-agreements/{active.agreement_id}/usage").json()["results"]
    assert [bool(e["receipt_signature"]) for e in usage] == [False, False, True]  # one receipt per batch
    onchain_id = UsageAgreement.objects.get(pk=active.agreement_id).onchain_id
    receipts.verify_usage(usage, agreement_id=onchain_id, chain_id=escrow_chain.chain_id,
                          escrow_address=escrow_chain.addresses["escrow"],
                          escrow=onchain_escrow(escrow_chain, onchain_id), price_per_unit=20_000,
                          pinned_receipt_signers=escrow_chain.accounts.receipt_signer.address)


@pytest.mark.parametrize("body", [{"units": 1}, {"events": [{"units": 1}, {"units": 1}]}, {"units_used": 2}])
def test_a_seller_reports_no_usage_on_an_agreement_past_its_expiry(active, body):
    # Still active until the beat task completes it (or, unused, reclaims it after the grace): the proxy refuses
    # calls from the expiry on, and so must a seller's report, which would turn the buyer's reclaim into a payout.
    UsageAgreement.objects.filter(pk=active.agreement_id).update(expires_at=timezone.now() - timedelta(seconds=1))
    refused = active.seller_api.post(f"/usage-agreements/{active.agreement_id}/record-usage", body,
                                     headers={"Idempotency-Key": "late"})
    assert refused.status_code == 409 and error_code(refused) == "agreement_completing", refused.content
    assert not UsageEvent.objects.filter(agreement_id=active.agreement_id).exists()
    assert UsageAgreement.objects.get(pk=active.agreement_id).used == 0


@pytest.mark.parametrize("completed", ["true", "yes", "on", 1])
def test_a_running_total_ends_the_agreement_only_on_a_json_true(active, completed):
    """`completed` ends the agreement: a string or a number is refused, not read as DRF reads a form's "yes"."""
    refused = active.seller_api.post(f"/usage-agreements/{active.agreement_id}/record-usage",
                                     {"units_used": 1, "completed": completed})
    assert refused.status_code == 400 and codes_at(refused, "completed") == {"invalid"}, refused.content
    agreement = UsageAgreement.objects.get(pk=active.agreement_id)
    assert agreement.status == "active" and agreement.used == 0


def test_calls_before_activation_are_409(escrow_chain, http_server):
    parties = Parties(escrow_chain, upstream_base_url=http_server.url)
    agreement = parties.accepted_agreement()
    response = parties.buyer_api.get(f"/metered-proxy/{agreement['id']}/x")
    assert response.status_code == 409 and error_code(response) == "agreement_not_active"


@pytest.mark.parametrize("method", ["get", "post", "put", "patch", "delete"])
def test_an_id_shaped_like_no_uuid_is_404_not_500(buyer_api, method):
    """Found by schemathesis: 36 hex digits without dashes matched the proxy route and crashed the lookup."""
    response = getattr(buyer_api.client, method)("/metered-proxy/" + "0" * 36 + "/work")
    assert response.status_code == 404
    assert error_code(response) == "not_found"


def test_an_escaped_path_reaches_the_seller_escaped(active, http_server):
    """Found by schemathesis: the decoded path was forwarded as is (an escaped "?" split it; a control character
    made no URL, a 500 that also kept the call's budget reserved)."""
    response = active.buyer_api.get(f"{active.proxy}/a%3Fb/%06%C3%A9")
    assert response.status_code == 200
    [forwarded] = http_server.requests
    assert forwarded.path == "/api/a%3Fb/%06%C3%A9"
    agreement = UsageAgreement.objects.get(pk=active.agreement_id)
    assert (agreement.used, agreement.reserved) == (20_000, 0)


@pytest.mark.parametrize("description", [5, 1.5, True, {"text": "job"}, ["job"]])
def test_a_usage_description_is_a_json_string(active, description):
    url = f"/usage-agreements/{active.agreement_id}/record-usage"
    for number, (body, path) in enumerate((({"units": 1, "description": description}, ("description",)),
                                           ({"events": [{"units": 1, "description": description}]},
                                            ("events", 0, "description")))):
        refused = active.seller_api.post(url, body, headers={"Idempotency-Key": f"typed-{number}"})

        assert refused.status_code == 400 and codes_at(refused, *path) == {"invalid"}, refused.content
    assert not UsageEvent.objects.filter(agreement_id=active.agreement_id).exists()
