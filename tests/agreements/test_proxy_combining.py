"""Charge combining (issue #18): the concurrent calls of one agreement in one process are charged together, one
row lock and one write for all of them, and each still gets its own event and signed receipt. A queued call that
waits has its answer recorded (one charged at once is recorded by its charge), and whatever goes wrong with a
batch, each call ends charged or released."""

import threading
import time
from concurrent.futures import ThreadPoolExecutor
from types import SimpleNamespace

import pytest
from django.db import OperationalError, connections
from django.test import Client

from agreements import metering, monitoring
from agreements.models import CallIntent, UsageAgreement
from tests.agreements.test_proxy_leases import PRICE, agreement_for, assert_books_exact
from tests.conftest import read_to_its_end

pytestmark = [pytest.mark.chain, pytest.mark.postgres, pytest.mark.django_db(transaction=True)]

CALLS = 6


@pytest.fixture
def parties(escrow_chain, http_server, settings):
    settings.PROXY_CALL_LEASE_MAX = 1  # each call reserves on its own: only the charges are combined
    return agreement_for(escrow_chain, http_server, 100)


@pytest.fixture
def first_charge_waits_for_the_others(monkeypatch):
    """The first charge of the test waits until the other calls' charges have queued behind it (or 10 s), then
    runs `first_charge_waits_for_the_others.then()` (by default nothing) before charging."""
    charge_alone, first = metering._charge_alone, threading.Lock()

    def held(reservation, charge, **kwargs):
        if first.acquire(blocking=False):
            deadline = time.monotonic() + 10
            while len(metering._charge_queues.get(reservation.agreement_id, ())) < CALLS - 1:
                assert time.monotonic() < deadline, "the other calls never queued"
                time.sleep(0.01)
            hold.then()
        return charge_alone(reservation, charge, **kwargs)

    hold = SimpleNamespace(then=lambda: None)
    monkeypatch.setattr(metering, "_charge_alone", held)
    return hold


def called_at_once(parties, *, interrupted: type[BaseException] | None = None) -> list:
    """CALLS proxied calls of the parties' agreement, each from its own thread, at once; a call whose thread raised
    `interrupted` is that exception instead of a response."""
    url = f"/metered-proxy/{parties.agreement_id}/work"

    def one(_):
        try:
            return read_to_its_end(Client().get(url, HTTP_AUTHORIZATION=f"Bearer {parties.buyer_api.secret}"))
        except BaseException as exc:
            if interrupted is None or not isinstance(exc, interrupted):
                raise
            return exc
        finally:
            connections.close_all()  # this thread's

    with ThreadPoolExecutor(max_workers=CALLS) as pool:
        return list(pool.map(one, range(CALLS)))


def batches_fail_with(monkeypatch, error: Exception) -> None:
    """Charging more than one call together raises `error` before it writes anything."""
    charge_together = metering._charge_in_two_round_trips

    def failing(reservations, charges, **kwargs):
        if len(reservations) > 1:
            raise error
        return charge_together(reservations, charges, **kwargs)

    monkeypatch.setattr(metering, "_charge_in_two_round_trips", failing)


def combined_batches() -> float:
    return sum(sample.value for sample in monitoring.CHARGES_COMBINED.collect()[0].samples
               if sample.name.endswith("_count"))


def test_concurrent_calls_of_one_agreement_are_charged_together_each_with_its_receipt(
        parties, escrow_chain, first_charge_waits_for_the_others):
    batches_before = combined_batches()

    responses = called_at_once(parties)

    assert sorted(int(response["X-Usage-Seq"]) for response in responses) == list(range(1, CALLS + 1))
    assert {response.status_code for response in responses} == {200}
    assert {response["X-Usage-Cost"] for response in responses} == {str(PRICE)}
    # The first call was charged alone; the five queued behind it, together.
    assert combined_batches() - batches_before == 1
    assert_books_exact(parties, escrow_chain, calls=CALLS)  # every event's receipt verified, gap-free
    events = UsageAgreement.objects.get(pk=parties.agreement_id).usage_events.order_by("seq")
    assert all(event.receipt_signature for event in events)
    assert not metering._charge_queues


def answered_intents(parties) -> int:
    return CallIntent.objects.filter(agreement_id=parties.agreement_id, answered_at__isnull=False).count()


def test_a_queued_call_has_its_answer_recorded_while_it_waits(
        parties, escrow_chain, first_charge_waits_for_the_others):
    """Should the process die while calls wait behind a charge, the reaper charges them from their intents."""
    seen = []

    def all_recorded_while_the_first_charge_waits():
        deadline = time.monotonic() + 10
        while answered_intents(parties) < CALLS - 1 and time.monotonic() < deadline:
            time.sleep(0.01)
        seen.append(answered_intents(parties))

    first_charge_waits_for_the_others.then = all_recorded_while_the_first_charge_waits

    responses = called_at_once(parties)

    assert seen == [CALLS - 1]
    assert {response.status_code for response in responses} == {200}
    assert_books_exact(parties, escrow_chain, calls=CALLS)


def answers_recorded_by_the_batches(monkeypatch) -> list[bool]:
    """Per call charged in two round trips, whether it came `answered` (else those round trips record its answer)."""
    flags, charge_together = [], metering._charge_in_two_round_trips

    def spied(reservations, charges, *, answered):
        flags.extend(answered)
        return charge_together(reservations, charges, answered=answered)

    monkeypatch.setattr(metering, "_charge_in_two_round_trips", spied)
    return flags


def test_a_queued_call_charged_before_its_wait_runs_out_costs_no_statement_of_its_own(
        parties, escrow_chain, first_charge_waits_for_the_others, monkeypatch):
    """Its batch records its answer, as a lone call's charge does: recording it apart cost most calls of a hot
    agreement a statement (bench/proxy.py)."""
    monkeypatch.setattr(metering, "QUEUED_ANSWER_AFTER_SECONDS", 30)
    recorded_apart = []
    record = metering.reservation_answered

    def counted(**kwargs):
        recorded_apart.append(kwargs["reservation"])
        return record(**kwargs)

    monkeypatch.setattr(metering, "reservation_answered", counted)
    came_answered = answers_recorded_by_the_batches(monkeypatch)

    responses = called_at_once(parties)

    assert {response.status_code for response in responses} == {200}
    assert recorded_apart == []
    assert came_answered == [False] * CALLS  # so the batches recorded every answer themselves
    assert_books_exact(parties, escrow_chain, calls=CALLS)


def test_a_queued_answer_the_database_did_not_take_is_recorded_by_its_batch(
        parties, escrow_chain, first_charge_waits_for_the_others, monkeypatch):
    monkeypatch.setattr(metering, "QUEUED_ANSWER_AFTER_SECONDS", 0.001)
    monkeypatch.setattr(metering, "reservation_answered", lambda **kwargs: False)  # the database went away
    came_answered = answers_recorded_by_the_batches(monkeypatch)

    responses = called_at_once(parties)

    assert {response.status_code for response in responses} == {200}
    assert came_answered == [False] * CALLS
    assert_books_exact(parties, escrow_chain, calls=CALLS)


def test_a_queued_call_whose_answer_cannot_be_recorded_is_charged_with_the_others(
        parties, escrow_chain, first_charge_waits_for_the_others, monkeypatch):
    """An error while a queued call records its answer (say, a read-only standby after a failover) made it leave
    with a 500 and its reservation released, though its batch could still charge it; made leader, it left the
    agreement's queue without one."""
    monkeypatch.setattr(metering, "QUEUED_ANSWER_AFTER_SECONDS", 0.001)

    def refused(**kwargs):
        raise ValueError("cannot execute UPDATE in a read-only transaction")

    monkeypatch.setattr(metering, "reservation_answered", refused)

    responses = called_at_once(parties)

    assert {response.status_code for response in responses} == {200}
    assert_books_exact(parties, escrow_chain, calls=CALLS)
    assert not metering._charge_queues


class Interrupted(BaseException):
    """What stops a thread that is not an error of its own (as KeyboardInterrupt or SystemExit)."""


def test_a_queued_call_interrupted_when_given_the_lead_passes_it_on(
        parties, escrow_chain, settings, first_charge_waits_for_the_others, monkeypatch):
    """The first call charges alone and hands the calls queued behind it to the first of them; that one's thread
    is interrupted then. Had it kept the lead, the others would wait PROXY_TIMEOUT and the agreement would keep a
    queue nobody charges, for the process's lifetime."""
    settings.PROXY_TIMEOUT = 0.5
    wait, interrupted = metering._wait_settled, []

    def interrupted_when_leading(mine, queue):
        wait(mine, queue)
        if mine.leads and not interrupted:
            interrupted.append(mine.reservation)
            raise Interrupted

    monkeypatch.setattr(metering, "_wait_settled", interrupted_when_leading)

    outcomes = called_at_once(parties, interrupted=Interrupted)

    assert len(interrupted) == 1
    answered = [outcome for outcome in outcomes if not isinstance(outcome, Interrupted)]
    assert [response.status_code for response in answered] == [200] * (CALLS - 1)
    assert not metering._charge_queues
    assert_books_exact(parties, escrow_chain, calls=CALLS - 1)  # the interrupted call's reservation released


def test_a_call_the_reaper_settled_while_queued_is_not_charged_with_the_others(
        parties, escrow_chain, first_charge_waits_for_the_others, monkeypatch):
    charge_together, reaped = metering._charge_in_two_round_trips, []

    def one_reaped(reservations, charges, **kwargs):
        if len(reservations) > 1:  # the reaper releases one of the queued calls first
            reaped.append(reservations[-1])
            metering.reservation_release(reservation=reservations[-1])
        return charge_together(reservations, charges, **kwargs)

    monkeypatch.setattr(metering, "_charge_in_two_round_trips", one_reaped)
    responses = called_at_once(parties)

    assert len(reaped) == 1
    assert sorted(response.status_code for response in responses) == [200] * (CALLS - 1) + [503]
    assert [r.json()["error"]["code"] for r in responses if r.status_code == 503] == ["call_expired"]
    assert_books_exact(parties, escrow_chain, calls=CALLS - 1)


def test_a_database_failure_while_charging_together_charges_none_of_them_and_releases_each(
        parties, escrow_chain, first_charge_waits_for_the_others, monkeypatch):
    batches_fail_with(monkeypatch, OperationalError("server closed the connection unexpectedly"))

    responses = called_at_once(parties)

    assert sorted(response.status_code for response in responses) == [200] + [503] * (CALLS - 1)
    assert {r.json()["error"]["code"] for r in responses if r.status_code == 503} == {"database_unavailable"}
    assert_books_exact(parties, escrow_chain, calls=1)


def test_a_batch_that_fails_for_its_own_reasons_is_charged_call_by_call(
        parties, escrow_chain, first_charge_waits_for_the_others, monkeypatch):
    batches_fail_with(monkeypatch, ValueError("a value the statement refused"))

    responses = called_at_once(parties)

    assert {response.status_code for response in responses} == {200}
    assert_books_exact(parties, escrow_chain, calls=CALLS)


def test_calls_queued_behind_a_charge_that_does_not_end_are_charged_alone(
        parties, escrow_chain, settings, first_charge_waits_for_the_others):
    settings.PROXY_TIMEOUT = 0.3
    first_charge_waits_for_the_others.then = lambda: time.sleep(1.5)
    batches_before = combined_batches()

    responses = called_at_once(parties)

    assert {response.status_code for response in responses} == {200}
    assert combined_batches() == batches_before  # they left the queue, each charged by its own thread
    assert_books_exact(parties, escrow_chain, calls=CALLS)
    assert not metering._charge_queues
