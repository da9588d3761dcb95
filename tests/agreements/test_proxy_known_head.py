"""A proxied call's charge on the usage-chain head its process wrote last takes one round trip instead of two
(issue #18), its event chained and its receipt signed before the row is locked. Whatever moved the head meanwhile
(another process's charge, the seller's report, the reaper), the chain stays gap-free, every receipt verifies and
the books are exact."""

import uuid
from datetime import timedelta
from types import SimpleNamespace

import pytest
from django.db import connection
from django.test.utils import CaptureQueriesContext
from django.utils import timezone
from psycopg.pq import TransactionStatus

from agreements import metering
from agreements.models import CallIntent, UsageAgreement
from marketplace.errors import DependencyUnavailable
from sdk import receipts
from tests.conftest import error_code
from tests.escrow.flow import onchain_escrow

pytestmark = [pytest.mark.chain, pytest.mark.postgres, pytest.mark.django_db(transaction=True)]

PRICE = 20_000
LOCK_THEN_WRITE = "ARRAY(SELECT id FROM closed)"  # the two round trips' first statement
ON_KNOWN_HEAD = "EXISTS (SELECT FROM closed)"  # the one round trip's statement


@pytest.fixture
def active(active_outside_transaction):
    """Here every agreement is charged as the server charges it: outside any transaction of the test's."""
    return active_outside_transaction


def call(parties):
    return parties.buyer_api.get(f"/metered-proxy/{parties.agreement_id}/work")


def charged_with(queries) -> set[str]:
    return {name for name, marker in (("two round trips", LOCK_THEN_WRITE), ("known head", ON_KNOWN_HEAD))
            if any(marker in query["sql"] for query in queries)}


def assert_books_exact(parties, chain, *, used: int) -> None:
    agreement = UsageAgreement.objects.get(pk=parties.agreement_id)
    assert (agreement.used, agreement.reserved) == (used, 0) and not CallIntent.objects.exists()
    usage = parties.buyer_api.get(f"/usage-agreements/{parties.agreement_id}/usage").json()["results"]
    assert [event["seq"] for event in usage] == list(range(1, len(usage) + 1))
    verified = receipts.verify_usage(usage, agreement_id=agreement.onchain_id, chain_id=chain.chain_id,
                                     escrow_address=chain.addresses["escrow"],
                                     escrow=onchain_escrow(chain, agreement.onchain_id), price_per_unit=PRICE,
                                     pinned_receipt_signers=chain.accounts.receipt_signer.address)
    assert verified.cumulative_amount == used


def test_the_next_charge_of_an_agreement_takes_one_round_trip(active, http_server, escrow_chain):
    http_server.responses.extend([(200, {})] * 3)
    with CaptureQueriesContext(connection) as first:
        assert call(active)["X-Usage-Seq"] == "1"
    for seq in ("2", "3"):
        with CaptureQueriesContext(connection) as next_one:
            response = call(active)
        assert (response.status_code, response["X-Usage-Seq"]) == (200, seq)
        assert response["X-Escrow-Remaining"] == str((5 - int(seq)) * PRICE)
        assert charged_with(next_one.captured_queries) == {"known head"}
    assert charged_with(first.captured_queries) == {"two round trips"}  # nothing known of it yet
    assert_books_exact(active, escrow_chain, used=3 * PRICE)


def known_head_statements(queries) -> int:
    return sum(ON_KNOWN_HEAD in query["sql"] for query in queries)


def test_a_head_moved_by_someone_else_is_charged_on_the_head_the_miss_answered(active, http_server, escrow_chain):
    http_server.responses.extend([(200, {})] * 3)
    assert call(active)["X-Usage-Seq"] == "1"
    reported = active.seller_api.post(f"/usage-agreements/{active.agreement_id}/record-usage",
                                      {"events": [{"units": 1}]}, headers={"Idempotency-Key": "moved"})
    assert reported.status_code == 201  # seq 2: the head this process wrote is no longer the head

    with CaptureQueriesContext(connection) as moved:
        response = call(active)
    assert (response.status_code, response["X-Usage-Seq"]) == (200, "3")
    # The first statement missed and answered the head as it is; the second charged on it.
    assert charged_with(moved.captured_queries) == {"known head"}
    assert known_head_statements(moved.captured_queries) == 2
    with CaptureQueriesContext(connection) as next_one:
        assert call(active)["X-Usage-Seq"] == "4"
    assert known_head_statements(next_one.captured_queries) == 1
    assert_books_exact(active, escrow_chain, used=4 * PRICE)


def test_after_a_miss_the_next_charge_tries_the_head_the_two_round_trips_found(active, http_server, escrow_chain,
                                                                                 monkeypatch):
    monkeypatch.setattr(metering, "KNOWN_HEAD_ATTEMPTS", 1)  # one statement on a head that moved, then two round trips
    http_server.responses.extend([(200, {})] * 3)
    assert call(active)["X-Usage-Seq"] == "1"
    assert active.seller_api.post(f"/usage-agreements/{active.agreement_id}/record-usage",
                                  {"events": [{"units": 1}]}, headers={"Idempotency-Key": "moved"}).status_code == 201

    with CaptureQueriesContext(connection) as missed:
        assert call(active)["X-Usage-Seq"] == "3"
    assert charged_with(missed.captured_queries) == {"known head", "two round trips"}
    with CaptureQueriesContext(connection) as after:
        assert call(active)["X-Usage-Seq"] == "4"
    assert charged_with(after.captured_queries) == {"known head"}
    assert_books_exact(active, escrow_chain, used=4 * PRICE)


def test_the_charge_that_uses_up_the_budget_on_a_known_head_requests_completion(active, http_server):
    http_server.responses.extend([(200, {})] * 5)
    for _ in range(4):
        assert call(active).status_code == 200
    assert UsageAgreement.objects.get(pk=active.agreement_id).completion_requested_at is None
    with CaptureQueriesContext(connection) as last:
        assert call(active)["X-Escrow-Remaining"] == "0"
    assert charged_with(last.captured_queries) == {"known head"}

    agreement = UsageAgreement.objects.get(pk=active.agreement_id)
    assert agreement.completion_requested_at is not None and agreement.completion_reason == "budget_used_up"
    refused = call(active)
    assert refused.status_code == 402 and error_code(refused) == "budget_exhausted"
    assert len(http_server.requests) == 5


def test_a_call_the_reaper_settled_is_not_charged_on_a_known_head(active, http_server, escrow_chain):
    http_server.responses.append((200, {}))
    assert call(active)["X-Usage-Seq"] == "1"
    terms = UsageAgreement.objects.get(pk=active.agreement_id)
    late = metering.reservation_take(agreement=terms, amount=PRICE, request_id="req-late", request_nonce="",
                                     method="GET", path="/work")
    # Its process looked dead (no answer recorded): the reaper released the reservation.
    assert metering.intents_reap(now=timezone.now() + timedelta(hours=1)) == {"charged": 0, "released": 1,
                                                                              "replays": 0}

    with pytest.raises(DependencyUnavailable) as expired:
        metering.reservation_commit(reservation=late, units=1, cost=PRICE, request_id="req-late", request_nonce="",
                                    method="GET", path="/work", upstream_status=200, latency_ms=5)
    assert expired.value.code == "call_expired"
    assert_books_exact(active, escrow_chain, used=PRICE)


def test_a_miss_records_the_answer_so_the_reaper_charges_a_call_whose_process_dies_then(active, http_server,
                                                                                       escrow_chain, monkeypatch):
    monkeypatch.setattr(metering, "KNOWN_HEAD_ATTEMPTS", 1)
    http_server.responses.append((200, {}))
    assert call(active)["X-Usage-Seq"] == "1"
    assert active.seller_api.post(f"/usage-agreements/{active.agreement_id}/record-usage",
                                   {"events": [{"units": 1}]}, headers={"Idempotency-Key": "moved"}).status_code == 201
    terms = UsageAgreement.objects.get(pk=active.agreement_id)
    served = metering.reservation_take(agreement=terms, amount=PRICE, request_id="req-served", request_nonce="",
                                       method="GET", path="/work")
    charge = {"units": 1, "cost": PRICE, "request_id": "req-served", "request_nonce": "", "method": "GET",
              "path": "/work", "upstream_status": 200, "latency_ms": 5}

    assert metering._charge_on_known_head(served, charge, metering._known_heads[terms.pk]) is None  # the head moved
    intent = CallIntent.objects.get(pk=served.intent_id)
    assert intent.answered_at is not None and (intent.units, intent.cost) == (1, PRICE)
    # The process dies before its two round trips: the reaper charges the call the seller served.
    assert metering.intents_reap(now=timezone.now() + timedelta(hours=1)) == {"charged": 1, "released": 0,
                                                                              "replays": 0}
    assert_books_exact(active, escrow_chain, used=3 * PRICE)


def test_what_a_process_remembers_of_its_agreements_is_bounded(monkeypatch):
    monkeypatch.setattr(metering, "_KNOWN_HEADS_MAX", 3)
    for _ in range(10):
        metering._known_head_written(SimpleNamespace(id=uuid.uuid4()))
    assert len(metering._known_heads) <= 3


def test_a_charge_that_fails_in_its_two_round_trips_is_rolled_back_and_the_next_one_charged(
        active, http_server, escrow_chain, monkeypatch):
    http_server.responses.extend([(200, {})] * 2)
    with monkeypatch.context() as failing:
        failing.setattr(metering, "_events_write_statement", lambda *args: ("SELECT 1 / 0", []))
        failed = call(active)  # nothing known of the agreement yet: charged in two round trips, the row locked
    assert failed.status_code >= 500 and "X-Usage-Seq" not in failed
    # Rolled back: the row's lock released, and the connection out of the failed transaction.
    assert connection.connection.info.transaction_status == TransactionStatus.IDLE
    assert UsageAgreement.objects.get(pk=active.agreement_id).used == 0

    assert call(active)["X-Usage-Seq"] == "1"
    metering.intents_reap(now=timezone.now() + timedelta(hours=1))  # the failed call's intent, if it is left
    assert_books_exact(active, escrow_chain, used=PRICE)
