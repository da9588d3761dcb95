"""A per-call price is known before the upstream answers, and so is everything a call's receipt signs: the proxy
chains the call's event and signs its receipt while the upstream works (issue #18), and fills in what the upstream
answered once it has. Whatever happens meanwhile (an upstream failure, a head that moves, a charge ahead that fails),
the call is charged as it would have been without it: the chain gap-free, every receipt verified, the books exact."""

import time
from dataclasses import replace

import pytest
from django.db import connection
from django.test.utils import CaptureQueriesContext
from django.utils import timezone

from agreements import metering, monitoring
from agreements.models import CallIntent, UsageAgreement, UsageEvent
from marketplace import outbound, signatures
from tests.agreements.test_proxy_known_head import (PRICE, assert_books_exact, call, known_head_statements)

pytestmark = [pytest.mark.chain, pytest.mark.postgres, pytest.mark.django_db(transaction=True)]
UPSTREAM_SECONDS = 0.3


@pytest.fixture
def active(active_outside_transaction):
    return active_outside_transaction


@pytest.fixture(autouse=True)
def charging_ahead(monkeypatch):
    """This test's own calls chained ahead: one left behind elsewhere would not be this test's."""
    monkeypatch.setattr(metering, "_charging_ahead", {})


@pytest.fixture
def signed_at(monkeypatch):
    """When each receipt was signed (monotonic seconds)."""
    times = []
    sign = signatures.receipt_sign

    def recorded(*args, **kwargs):
        times.append(time.monotonic())
        return sign(*args, **kwargs)

    monkeypatch.setattr(signatures, "receipt_sign", recorded)
    return times


def slow_call(parties, http_server, status=200) -> tuple:
    """A call whose upstream takes UPSTREAM_SECONDS: its answer, and when the upstream answered at the earliest."""
    http_server.responses.append((status, {}, UPSTREAM_SECONDS))
    started = time.monotonic()
    return call(parties), started + UPSTREAM_SECONDS


def test_a_per_call_charge_is_chained_and_signed_while_the_upstream_answers(active, http_server, escrow_chain,
                                                                              signed_at):
    http_server.responses.append((200, {}))
    assert call(active)["X-Usage-Seq"] == "1"  # no head known yet: nothing to chain on
    signed_at.clear()

    before = timezone.now()
    response, answered = slow_call(active, http_server)
    assert (response.status_code, response["X-Usage-Seq"]) == (200, "2")
    assert len(signed_at) == 1 and signed_at[0] < answered  # signed before the upstream had answered
    # What the upstream answered is the event's, filled in after the answer: status, latency, time.
    event = UsageEvent.objects.get(agreement_id=active.agreement_id, seq=2)
    assert event.upstream_status == 200 and event.latency_ms >= UPSTREAM_SECONDS * 1000
    assert (event.created_at - before).total_seconds() >= UPSTREAM_SECONDS
    assert_books_exact(active, escrow_chain, used=2 * PRICE)


def test_a_call_the_upstream_failed_is_not_charged_and_the_next_one_is_chained_ahead_again(active, http_server,
                                                                                     escrow_chain, signed_at):
    http_server.responses.append((200, {}))
    assert call(active).status_code == 200
    failed, _ = slow_call(active, http_server, status=503)
    assert (failed.status_code, failed["X-Usage-Cost"]) == (503, "0")
    signed_at.clear()

    response, answered = slow_call(active, http_server)
    assert (response.status_code, response["X-Usage-Seq"]) == (200, "2")
    assert len(signed_at) == 1 and signed_at[0] < answered
    assert not metering._charging_ahead  # each call's charge ahead ended with it
    assert_books_exact(active, escrow_chain, used=2 * PRICE)


def test_a_head_moved_while_the_upstream_answered_is_charged_on_the_head_as_it_is(active, http_server, escrow_chain,
                                                                                 monkeypatch):
    http_server.responses.append((200, {}))
    assert call(active)["X-Usage-Seq"] == "1"
    charge_ahead = metering.charge_ahead

    def then_the_seller_reports(**kwargs):
        ahead = charge_ahead(**kwargs)
        assert ahead is not None
        reported = active.seller_api.post(f"/usage-agreements/{active.agreement_id}/record-usage",
                                          {"events": [{"units": 1}]}, headers={"Idempotency-Key": "moved"})
        assert reported.status_code == 201  # seq 2, while the call's event was chained ahead as seq 2
        return ahead

    monkeypatch.setattr(metering, "charge_ahead", then_the_seller_reports)
    with CaptureQueriesContext(connection) as moved:
        response, _ = slow_call(active, http_server)
    assert (response.status_code, response["X-Usage-Seq"]) == (200, "3")
    assert known_head_statements(moved.captured_queries) == 2  # missed on the head chained on, charged on the new one
    assert_books_exact(active, escrow_chain, used=3 * PRICE)


def test_a_call_chained_ahead_on_a_head_its_process_moved_since_is_chained_again_before_its_statement(active,
                                                                                                http_server,
                                                                                                escrow_chain):
    http_server.responses.append((200, {}))
    assert call(active)["X-Usage-Seq"] == "1"
    terms = UsageAgreement.objects.get(pk=active.agreement_id)
    call_fields = {"request_nonce": "", "method": "GET", "path": "/work"}
    first = metering.reservation_take(agreement=terms, amount=PRICE, request_id="req-first", **call_fields)
    ahead = metering.charge_ahead(reservation=first, units=1, cost=PRICE, request_id="req-first", **call_fields)
    second = metering.reservation_take(agreement=terms, amount=PRICE, request_id="req-second", **call_fields)
    # One call of an agreement is chained ahead at a time in a process: its head moves before the others are charged.
    assert metering.charge_ahead(reservation=second, units=1, cost=PRICE, request_id="req-second",
                                   **call_fields) is None
    charged = {"units": 1, "cost": PRICE, "upstream_status": 200, "latency_ms": 5, **call_fields}
    assert metering.reservation_commit(reservation=second, request_id="req-second", **charged).seq == 2

    with CaptureQueriesContext(connection) as first_charged:
        event = metering.reservation_commit(reservation=first, request_id="req-first", ahead=ahead, **charged)
    assert event.seq == 3
    assert known_head_statements(first_charged.captured_queries) == 1  # chained on the head the second call wrote
    assert_books_exact(active, escrow_chain, used=3 * PRICE)


def test_a_charge_ahead_that_fails_leaves_the_charge_to_be_chained_when_charged(active, http_server, escrow_chain,
                                                                               monkeypatch, caplog):
    http_server.responses.append((200, {}))
    assert call(active)["X-Usage-Seq"] == "1"
    sign, failures = signatures.receipt_sign, []

    def fails_once(*args, **kwargs):
        if not failures:
            failures.append(1)
            raise RuntimeError("signer unavailable")
        return sign(*args, **kwargs)

    monkeypatch.setattr(signatures, "receipt_sign", fails_once)
    response, _ = slow_call(active, http_server)
    assert (response.status_code, response["X-Usage-Seq"]) == (200, "2")
    assert failures and "chaining a charge ahead of the answer failed" in caplog.text
    assert not metering._charging_ahead
    assert_books_exact(active, escrow_chain, used=2 * PRICE)


def test_an_event_chained_ahead_is_used_only_for_the_charge_it_was_chained_for_and_once(active, http_server):
    http_server.responses.append((200, {}))
    assert call(active)["X-Usage-Seq"] == "1"
    terms = UsageAgreement.objects.get(pk=active.agreement_id)
    reservation = metering.reservation_take(agreement=terms, amount=PRICE, request_id="req-1", request_nonce="",
                                            method="GET", path="/work")
    ahead = metering.charge_ahead(reservation=reservation, units=1, cost=PRICE, request_id="req-1",
                                       request_nonce="", method="GET", path="/work")
    known = metering._known_heads[terms.pk]
    charge = {"units": 1, "cost": PRICE, "request_id": "req-1", "request_nonce": "", "method": "GET",
              "path": "/work", "upstream_status": 201, "latency_ms": 7}
    assert "receipt_signature" not in repr(ahead)
    assert ahead.take(replace(known), charge) is None  # not the head it was chained on
    ahead = metering.charge_ahead(reservation=reservation, units=1, cost=PRICE, request_id="req-1",
                                  request_nonce="", method="GET", path="/work")
    assert ahead is None  # one call at a time: this one's is still running
    metering._charge_ahead_end(reservation)
    ahead = metering.charge_ahead(reservation=reservation, units=1, cost=PRICE, request_id="req-1",
                                  request_nonce="", method="GET", path="/work")
    assert ahead.take(known, {**charge, "units": 2, "cost": 2 * PRICE}) is None  # not the charge it was chained for
    metering._charge_ahead_end(reservation)
    ahead = metering.charge_ahead(reservation=reservation, units=1, cost=PRICE, request_id="req-1",
                                  request_nonce="", method="GET", path="/work")
    head, [row] = ahead.take(known, charge)
    assert (head.usage_seq, row["seq"], row["upstream_status"], row["latency_ms"]) == (2, 2, 201, 7)
    assert ahead.take(known, charge) is None  # taken once
    metering.reservation_release(reservation=reservation)
    assert not metering._charging_ahead


def test_an_error_between_the_answer_and_the_charge_releases_the_call_and_ends_its_charge_ahead(
        active, http_server, escrow_chain, monkeypatch, signed_at):
    http_server.responses.append((200, {}))
    assert call(active)["X-Usage-Seq"] == "1"
    observe, failures = monitoring.upstream_observe, []

    def fails_once(**kwargs):
        if not failures:
            failures.append(1)
            raise RuntimeError("metrics unavailable")
        observe(**kwargs)

    monkeypatch.setattr(monitoring, "upstream_observe", fails_once)
    failed, _ = slow_call(active, http_server)
    assert failed.status_code == 500 and failures
    agreement = UsageAgreement.objects.get(pk=active.agreement_id)
    assert agreement.reserved == 0 and not CallIntent.objects.exists()  # released at once, not left to the reaper
    signed_at.clear()

    response, answered = slow_call(active, http_server)
    assert (response.status_code, response["X-Usage-Seq"]) == (200, "2")
    assert len(signed_at) == 1 and signed_at[0] < answered  # chained ahead again
    assert_books_exact(active, escrow_chain, used=2 * PRICE)


def test_an_error_of_the_work_done_meanwhile_is_not_taken_for_the_upstreams(http_server, settings):
    settings.ALLOW_PRIVATE_UPSTREAMS = True

    def fails():
        raise ValueError("not the upstream's")

    with pytest.raises(ValueError, match="not the upstream's"):
        outbound.UpstreamPool(max_idle_per_upstream=1).request(
            "GET", f"{http_server.url}/work", headers=[], body=b"", connect_timeout=5, read_timeout=5, answer_timeout=5,
            meanwhile=fails)
