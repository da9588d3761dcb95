"""The boundary between metered calls and the settlement: a call still being charged when the proposal is read,
or when the reclaim's refund is recorded."""

import threading
import time
from datetime import timedelta

import pytest
from django.utils import timezone

from agreements import metering
from agreements import selectors as agreement_selectors
from agreements import services as agreement_services
from agreements.models import CallIntent, UsageAgreement
from escrow import settlement
from escrow.models import ChainTransaction, TxPurpose
from marketplace.errors import DependencyUnavailable
from tests.escrow.flow import confirm_all
from tests.escrow.test_settlement import (  # noqa: F401
    assert_reclaimed_for_the_buyer,
    call_n,
    funded,
    reclaim_after,
    tick,
)
from tests.support.db_activity import sessions_waiting_for_a_lock

pytestmark = [pytest.mark.chain, pytest.mark.django_db(transaction=True)]  # the charge runs on a connection of its own


def _stalled_call(agreement_id) -> metering.Reservation:
    """A call reserved before its agreement's completion, answered by the upstream, whose process stalled past the
    reaper's deadline and is charging it now: both backdated to before `calls_stale_before`."""
    reservation = metering.reservation_take(agreement=UsageAgreement.objects.get(pk=agreement_id), amount=20_000,
                                            request_id="req-stalled", request_nonce="stalled", method="GET",
                                            path="/work")
    long_ago = agreement_selectors.calls_stale_before(now=timezone.now()) - timedelta(seconds=1)
    UsageAgreement.objects.filter(pk=agreement_id).update(completion_requested_at=long_ago,
                                                          completion_reason="buyer")
    CallIntent.objects.filter(pk=reservation.intent_id).update(created_at=long_ago)
    return reservation


def _charge_under_way_while_calls_are_settled(monkeypatch, reservation, outcome: list) -> None:
    """Once the settlement (a proposal, a refund) holds the agreement's row lock and settles its reserved calls, the
    call's charge starts in two round trips (no chain head known here): its first closes the intent (a DELETE: the
    intent's row lock) and waits for the agreement's row. `outcome` gets the charge's thread, then its event or the
    DependencyUnavailable it raised."""
    metering._known_heads.pop(reservation.agreement_id, None)
    real = agreement_services.reservations_settle_stale

    def charge() -> None:
        try:
            outcome.append(metering.reservation_commit(
                reservation=reservation, units=1, cost=20_000, request_id="req-stalled", request_nonce="stalled",
                method="GET", path="/work", upstream_status=200, latency_ms=5))
        except DependencyUnavailable as error:
            outcome.append(error)
        finally:
            from django.db import connection
            connection.close()

    def settle_with_the_charge_under_way(*, agreement):
        thread = threading.Thread(target=charge)
        thread.start()
        outcome.append(thread)
        deadline = time.monotonic() + 10
        while sessions_waiting_for_a_lock() < 1:
            assert time.monotonic() < deadline, "the charge never waited for the agreement's row lock"
            time.sleep(0.01)
        monkeypatch.setattr(agreement_services, "reservations_settle_stale", real)
        return real(agreement=agreement)

    monkeypatch.setattr(agreement_services, "reservations_settle_stale", settle_with_the_charge_under_way)


def test_a_call_charged_while_the_settlement_is_proposed_is_in_the_proposal_not_after_it(
        funded, escrow_chain, django_capture_on_commit_callbacks, monkeypatch, settings):  # noqa: F811
    """3 calls charged (60000), then a 4th whose charge is under way (its intent locked) when the settlement tick
    proposes. The proposal skipped the locked intent and went out at 60000 with 20000 still reserved; the charge
    landed just after it, the books saying 80000 used. No re-proposal followed (an agreement's own proposal is sent
    once: `settlement_repropose` is for another's earlier receipt), and at the window's end the escrow paid the seller
    60000 for 80000 charged, nothing saying so. The proposal now waits for the next tick while a call is being
    settled: it goes out once the charge is in, at 80000."""
    chain, capture = escrow_chain, django_capture_on_commit_callbacks
    settings.PROXY_CALL_LEASE_MAX = 1  # no calls leased ahead: the only open intent is the stalled call's
    call_n(funded, 3)
    reservation = _stalled_call(funded.agreement_id)
    charged: list = []
    _charge_under_way_while_calls_are_settled(monkeypatch, reservation, charged)

    first = tick(capture)
    charged[0].join(10)
    assert charged[1].cost == 20_000
    agreement = UsageAgreement.objects.get(pk=funded.agreement_id)
    assert (agreement.used, agreement.reserved) == (80_000, 0)
    proposals = [tx.context["cumulative"] for tx in ChainTransaction.objects.filter(
        agreement_id=funded.agreement_id, purpose=TxPurpose.PROPOSE_SETTLEMENT).order_by("created_at")]
    assert (first["proposed"], proposals) == (0, []), "proposed while a call was being charged"

    assert tick(capture)["proposed"] == 1
    chain.increase_time(3601)
    assert tick(capture)["finalizing"] == 1
    settled = funded.agreement(funded.agreement_id)
    assert (settled["status"], settled["seller_payout_atomic"]) == ("settled", 80_000)


def test_a_call_charged_while_the_escrow_is_reclaimed_is_released_not_charged_after_the_refund(
        funded, escrow_chain, django_capture_on_commit_callbacks, monkeypatch, settings):  # noqa: F811
    """3 calls charged (60000), then a 4th (20000, answered) whose charge is under way (its intent closed, waiting for
    the agreement's row) when the escrow, never proposed by its reclaimAfter, is reclaimed for the buyer. The refund
    settled every call it could lock but skipped that one and said the seller was not paid 60000; the charge landed
    just after it, the books saying 80000 used on an escrow that paid the seller nothing and the buyer everything.
    The charge now finds the agreement refunded and releases the call: nothing charged that the chain refunded."""
    chain, capture = escrow_chain, django_capture_on_commit_callbacks
    settings.PROXY_CALL_LEASE_MAX = 1  # no calls leased ahead: the only open intent is the stalled call's
    call_n(funded, 3)
    reservation = metering.reservation_take(agreement=UsageAgreement.objects.get(pk=funded.agreement_id),
                                            amount=20_000, request_id="req-stalled", request_nonce="stalled",
                                            method="GET", path="/work")
    chain.increase_time(reclaim_after(funded.agreement_id) - chain.now())
    with capture(execute=True):
        assert settlement.settlement_tick()["reclaiming"] == 1

    outcome: list = []
    _charge_under_way_while_calls_are_settled(monkeypatch, reservation, outcome)
    confirm_all(capture)
    outcome[0].join(10)
    assert isinstance(outcome[1], DependencyUnavailable) and outcome[1].code == "call_expired", outcome[1]
    agreement = UsageAgreement.objects.get(pk=funded.agreement_id)
    assert (agreement.used, agreement.reserved) == (60_000, 0)
    assert not agreement.usage_events.filter(request_id="req-stalled").exists()
    assert_reclaimed_for_the_buyer(funded, chain, funded.agreement_id, seller_unpaid=60_000)
