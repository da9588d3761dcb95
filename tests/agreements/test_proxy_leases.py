"""Call leases (issue #18): a process serving many calls of one agreement reserves them ahead, each with its intent,
so most calls make one round trip to the database instead of two. The books stay exact, the calls a lease did not
use are given back by the process once they lapse, a process that dies with a lease loses nothing, and a lease
takes no more than 1/64 of the budget left, so the end of a budget is served call by call."""

import time
import uuid
from datetime import timedelta

import pytest
from django.db import OperationalError, connection
from django.test.utils import CaptureQueriesContext
from django.utils import timezone

from agreements import metering
from agreements.models import CallIntent, UsageAgreement, UsageEvent
from sdk import receipts
from tests.conftest import error_code
from tests.escrow.flow import USDC, Parties, onchain_escrow, poll_mined

pytestmark = [pytest.mark.chain, pytest.mark.postgres, pytest.mark.django_db(transaction=True)]

PRICE = 20_000
LEASE = "generate_series"  # in the reservation statement: the calls it reserves


@pytest.fixture(autouse=True)
def short_leases(settings, monkeypatch):
    settings.PROXY_CALL_LEASE_SECONDS = 1.0
    monkeypatch.setattr(metering, "_call_leases", {})  # this test's process: no leases of an earlier test's


def agreement_for(escrow_chain, http_server, calls: int) -> Parties:
    parties = Parties(escrow_chain, upstream_base_url=http_server.url, buyer_funds=1_000 * USDC)
    agreement = parties.accepted_agreement(quantity=calls)
    assert parties.buyer_api.post(f"/usage-agreements/{agreement['id']}/activate-escrow",
                                  parties.signed_activation(agreement["id"])).status_code == 202
    poll_mined()
    parties.agreement_id = agreement["id"]
    http_server.responses.extend([(200, {})] * (calls + 5))
    return parties


def call(parties, path="work"):
    return parties.buyer_api.get(f"/metered-proxy/{parties.agreement_id}/{path}")


def served(parties, calls: int) -> None:
    for _ in range(calls):
        assert call(parties).status_code == 200


def leases_taken(queries) -> int:
    return sum(LEASE in query["sql"] for query in queries)


def reserved_calls(parties) -> int:
    return UsageAgreement.objects.get(pk=parties.agreement_id).reserved // PRICE


def lapsed(parties, *, within: float = 2.5) -> float:
    """Seconds until nothing is reserved on the agreement any more (the process gave its leases back)."""
    started = time.monotonic()
    while reserved_calls(parties):
        assert time.monotonic() - started < within, f"{reserved_calls(parties)} calls still reserved"
        time.sleep(0.05)
    return time.monotonic() - started


def assert_books_exact(parties, chain, *, calls: int) -> None:
    agreement = UsageAgreement.objects.get(pk=parties.agreement_id)
    assert (agreement.used, agreement.reserved) == (calls * PRICE, 0)
    assert not CallIntent.objects.filter(agreement_id=agreement.pk).exists()
    usage, cursor = [], ""
    while cursor is not None:
        page = parties.buyer_api.get(f"/usage-agreements/{parties.agreement_id}/usage?limit=100"
                                     + (f"&cursor={cursor}" if cursor else "")).json()
        usage, cursor = usage + page["results"], page["next_cursor"]
    assert [event["seq"] for event in usage] == list(range(1, calls + 1))
    verified = receipts.verify_usage(usage, agreement_id=agreement.onchain_id, chain_id=chain.chain_id,
                                     escrow_address=chain.addresses["escrow"],
                                     escrow=onchain_escrow(chain, agreement.onchain_id), price_per_unit=PRICE,
                                     pinned_receipt_signers=chain.accounts.receipt_signer.address)
    assert verified.cumulative_amount == calls * PRICE


def test_the_calls_of_a_busy_agreement_are_reserved_in_leases(escrow_chain, http_server):
    parties = agreement_for(escrow_chain, http_server, 2_000)
    with CaptureQueriesContext(connection) as queries:
        responses = [call(parties) for _ in range(40)]

    assert [(response.status_code, response["X-Usage-Seq"]) for response in responses] == [
        (200, str(seq)) for seq in range(1, 41)]
    # Leases of 1, 2, 4, 8, 16, then 9 of the next: 6 reservations for 40 calls, not 40.
    assert leases_taken(queries.captured_queries) == 6
    # What the last lease did not use is given back by the process once it lapses, without the reaper.
    assert reserved_calls(parties) == 16 - 9
    lapsed(parties)
    assert_books_exact(parties, escrow_chain, calls=40)


def test_an_agreement_called_now_and_then_reserves_one_call_at_a_time(escrow_chain, http_server):
    parties = agreement_for(escrow_chain, http_server, 2_000)
    served(parties, 4)
    assert reserved_calls(parties) == 3  # leases of 1, 2, 4: the last one holds 3 more
    lapsed(parties)

    with CaptureQueriesContext(connection) as queries:
        assert call(parties).status_code == 200
    assert leases_taken(queries.captured_queries) == 1 and reserved_calls(parties) == 0  # it shrank to one call
    assert call(parties).status_code == 200 and reserved_calls(parties) == 1  # and grows again while used in time
    lapsed(parties)
    assert_books_exact(parties, escrow_chain, calls=6)


def test_a_lease_takes_at_most_a_64th_of_the_budget_left(escrow_chain, http_server):
    parties = agreement_for(escrow_chain, http_server, 300)
    for _ in range(30):
        assert call(parties).status_code == 200
        agreement = UsageAgreement.objects.get(pk=parties.agreement_id)
        assert agreement.reserved // PRICE <= max(1, agreement.remaining // PRICE // 64)


def test_the_end_of_a_budget_is_served_call_by_call_to_its_last_call(escrow_chain, http_server):
    parties = agreement_for(escrow_chain, http_server, 200)
    responses = [call(parties) for _ in range(200)]
    assert {response.status_code for response in responses} == {200}
    assert responses[-1]["X-Escrow-Remaining"] == "0"
    agreement = UsageAgreement.objects.get(pk=parties.agreement_id)
    assert agreement.completion_requested_at is not None and agreement.completion_reason == "budget_used_up"

    refused = call(parties)
    assert refused.status_code == 402 and error_code(refused) == "budget_exhausted"
    assert_books_exact(parties, escrow_chain, calls=200)


def test_budget_another_process_holds_leased_is_not_taken_for_used_up(escrow_chain, http_server, monkeypatch):
    """Two processes on one agreement. When the second spends all it can reserve, the first still holds a lease it
    has not used: the agreement is not completed for a used-up budget, and once that lease lapses and is given
    back, its calls are served."""
    parties = agreement_for(escrow_chain, http_server, 200)
    served(parties, 20)
    first_process_holds = reserved_calls(parties)
    assert 0 < first_process_holds <= 180 // 64

    first_process = metering._call_leases
    monkeypatch.setattr(metering, "_call_leases", {})  # the other process: it knows nothing of those leases
    by_the_other = 0
    while (response := call(parties)).status_code == 200:
        by_the_other += 1
    assert by_the_other == 200 - 20 - first_process_holds
    assert response.status_code == 402 and error_code(response) == "budget_exhausted"
    assert UsageAgreement.objects.get(pk=parties.agreement_id).completion_requested_at is None

    # Back in the first process: its lease lapsed; it gives it back, and the buyer can use that budget.
    monkeypatch.setattr(metering, "_call_leases", first_process)
    with metering._leases_lock:
        metering._sweeper_start()
    lapsed(parties)
    for left in range(first_process_holds - 1, -1, -1):
        response = call(parties)
        assert (response.status_code, response["X-Escrow-Remaining"]) == (200, str(left * PRICE))
    agreement = UsageAgreement.objects.get(pk=parties.agreement_id)
    assert agreement.completion_requested_at is not None and agreement.completion_reason == "budget_used_up"
    assert_books_exact(parties, escrow_chain, calls=200)


def test_a_process_that_saw_more_budget_than_is_left_leases_no_more_than_its_share(escrow_chain, http_server):
    parties = agreement_for(escrow_chain, http_server, 300)
    served(parties, 10)
    metering._leases_give_back()
    lapsed(parties)
    for leases in metering._call_leases.values():
        leases.free, leases.size = 10**12, 16  # as seen before other processes spent the budget

    assert call(parties).status_code == 200
    agreement = UsageAgreement.objects.get(pk=parties.agreement_id)
    assert agreement.reserved // PRICE <= max(1, agreement.remaining // PRICE // 64)


def test_a_database_failure_gives_back_what_the_process_leased(escrow_chain, http_server, monkeypatch):
    """A lease's commit does not wait for the flush: a database crash can lose it. After a database failure the
    process serves no call from what it leased before; it gives it back and leases anew."""
    parties = agreement_for(escrow_chain, http_server, 2_000)
    served(parties, 4)
    assert reserved_calls(parties) == 3

    def database_gone(*args, **kwargs):
        raise OperationalError("server closed the connection unexpectedly")

    monkeypatch.setattr(metering, "_charge_on_known_head", database_gone)
    failed = call(parties)
    assert failed.status_code == 503 and error_code(failed) == "database_unavailable"
    monkeypatch.undo()
    lapsed(parties, within=1.0)  # given back at the next sweep, not when the lease would have lapsed

    with CaptureQueriesContext(connection) as queries:
        assert call(parties).status_code == 200
    assert leases_taken(queries.captured_queries) == 1
    lapsed(parties)
    assert_books_exact(parties, escrow_chain, calls=5)


def test_an_agreement_that_stops_being_active_is_refused_once_the_lease_lapses(escrow_chain, http_server, settings):
    parties = agreement_for(escrow_chain, http_server, 2_000)
    served(parties, 4)
    UsageAgreement.objects.filter(pk=parties.agreement_id).update(status="in_challenge")
    assert call(parties).status_code == 200  # from the process's lease, within PROXY_CALL_LEASE_SECONDS
    time.sleep(settings.PROXY_CALL_LEASE_SECONDS + 0.05)

    response = call(parties)
    assert response.status_code == 409 and error_code(response) == "agreement_not_active"
    assert len(http_server.requests) == 5


def test_a_process_that_dies_holding_a_lease_loses_nothing(escrow_chain, http_server, monkeypatch):
    parties = agreement_for(escrow_chain, http_server, 2_000)
    served(parties, 8)
    held = reserved_calls(parties)
    assert held == 15 - 8

    # The process dies: nothing of it gives its lease back. The reaper releases the leased calls, charging none.
    monkeypatch.setattr(metering, "_call_leases", {})
    assert metering.intents_reap(now=timezone.now() + timedelta(hours=1)) == {"charged": 0, "released": held,
                                                                              "replays": 0}
    assert_books_exact(parties, escrow_chain, calls=8)


def test_a_leased_call_the_reaper_charges_is_charged_for_its_own_request(escrow_chain, http_server, monkeypatch):
    """A leased call's intent was written by the call that took the lease: the answer records the call's own
    request, so a call whose process dies after the upstream answered is charged under its own request id."""
    parties = agreement_for(escrow_chain, http_server, 2_000)
    served(parties, 3)  # leases of 1 and 2: the next one reserves 4 calls
    terms = UsageAgreement.objects.get(pk=parties.agreement_id)
    take = {"agreement": terms, "amount": PRICE, "request_nonce": "", "method": "GET", "path": "/work"}
    leasing = metering.reservation_take(request_id="req-leasing", **take)
    leased = metering.reservation_take(request_id="req-leased", **{**take, "request_nonce": "n-1", "path": "/w?x=1"})
    assert CallIntent.objects.get(pk=leased.intent_id).request_id == "req-leasing"  # written by the lease

    metering.reservation_answered(reservation=leased, charge={
        "units": 1, "cost": PRICE, "upstream_status": 200, "latency_ms": 5, "request_id": "req-leased",
        "request_nonce": "n-1", "method": "GET", "path": "/w?x=1"})
    monkeypatch.setattr(metering, "_call_leases", {})  # the process dies
    assert metering.intents_reap(now=timezone.now() + timedelta(hours=1)) == {"charged": 1, "released": 3,
                                                                              "replays": 0}
    event = UsageEvent.objects.get(agreement_id=terms.pk, seq=4)
    assert (event.request_id, event.request_nonce, event.method, event.path) == ("req-leased", "n-1", "GET", "/w?x=1")
    assert leasing.intent_id != leased.intent_id and not CallIntent.objects.filter(agreement_id=terms.pk).exists()


def test_leases_are_kept_for_a_bounded_number_of_agreements(monkeypatch):
    monkeypatch.setattr(metering, "_LEASES_KEPT", 3)
    for _ in range(5):
        metering._leases_keep(uuid.uuid4(), PRICE, [(1, 1, 10**9, timezone.now() + timedelta(days=1))],
                              now=timezone.now(), clock=time.monotonic())
    assert len(metering._call_leases) <= 3


def test_a_leased_call_a_database_crash_lost_is_not_answered_with_another_calls_charge(escrow_chain, http_server,
                                                                                       monkeypatch):
    """A lease's commit does not wait for the flush: a crash of the database loses it (its intents, and the call
    numbers it took), while the process that took it still serves calls from it until it next meets the database.
    The call numbers come back: another process's calls take them and are charged. A call from the lost lease then
    finds its intent gone; it was charged by nobody, and the event under its call number is another call's."""
    parties = agreement_for(escrow_chain, http_server, 2_000)
    served(parties, 3)  # leases of 1 and 2: the next one reserves 4 calls
    terms = UsageAgreement.objects.get(pk=parties.agreement_id)
    leasing = metering.reservation_take(agreement=terms, amount=PRICE, request_id="req-leasing", request_nonce="",
                                        method="GET", path="/work")
    assert leasing.call_seq == 4 and reserved_calls(parties) == 4
    # The database crashes before any commit flushed that lease: it never happened there.
    CallIntent.objects.filter(agreement_id=terms.pk, call_seq__gte=4).delete()
    UsageAgreement.objects.filter(pk=terms.pk).update(call_counter=3, reserved=0)

    first_process = metering._call_leases
    monkeypatch.setattr(metering, "_call_leases", {})  # another process, after the restart: calls 4 and 5
    other = [parties.buyer_api.get(f"/metered-proxy/{parties.agreement_id}/work",
                                   headers={"X-Request-Id": f"req-other-{n}"}) for n in (1, 2)]
    assert [response.status_code for response in other] == [200, 200]
    other_event = UsageEvent.objects.get(agreement_id=terms.pk, call_seq=5)
    assert other_event.request_id == "req-other-2"
    metering._leases_give_back()  # that process's own lease (call 6), out of the way

    monkeypatch.setattr(metering, "_call_leases", first_process)  # back in the first process: call 5 from its lease
    lost = parties.buyer_api.get(f"/metered-proxy/{parties.agreement_id}/work", headers={"X-Request-Id": "req-lost"})
    assert http_server.requests[-1].headers["X-Marketplace-Call-Seq"] == "5"
    # Not charged: not answered as if it had been, naming the other call's charge.
    assert (lost.status_code, lost.get("X-Usage-Event-Id")) == (503, None), (lost.status_code, dict(lost.items()))
    assert error_code(lost) == "call_expired"
    assert not UsageEvent.objects.filter(agreement_id=terms.pk, request_id="req-lost").exists()
    metering._leases_give_back()
    lapsed(parties)
    assert_books_exact(parties, escrow_chain, calls=5)
