"""The metering books' money invariants, as a stateful property (hypothesis): whatever a buyer's proxied calls (the
upstream answering 200, 500 or too late; with or without X-Request-Nonce, retried), the seller's usage reports
(batches, their Idempotency-Key replays, running totals), completion, server processes dying mid-call and the
reaper do to an active agreement, in any order, after every step the books read from the database hold:

- used is the sum of the usage events' costs, and what the rules saw charged: each call answered 200 with its own
  event, no 5xx or timeout charged, a nonce's call forwarded and charged once however often it is replayed;
- the events' seq runs gap-free from 1, each cumulative the running sum, every receipt verifying (sdk.receipts)
  against the escrow's on-chain receipt signer;
- used + reserved <= deposit, and reserved is what the live intents hold;
- once completion is requested no call is reserved and nothing is charged but the calls reserved before it.

Time passing is modelled as the server would see it: the process's leased calls lapse and are given back, and the
reaper runs past its staleness rule."""

import time
from datetime import timedelta
from collections import Counter
from itertools import count

import pytest
from django.db import connection
from django.utils import timezone
from hypothesis import HealthCheck
from hypothesis import settings as hypothesis_settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule, run_state_machine_as_test

from agreements import metering, proxy, selectors
from agreements.models import CallIntent, ProxyReplay, UsageAgreement, UsageEvent, UsageSource
from marketplace.errors import Conflict, PaymentRequired
from sdk import receipts
from tests.agreements.conftest import activated_through_the_api
from tests.conftest import error_code
from tests.escrow.flow import onchain_escrow

pytestmark = [pytest.mark.chain, pytest.mark.postgres, pytest.mark.slow, pytest.mark.django_db(transaction=True)]

PER_CALL_PRICE = 20_000
PER_UNIT_PRICE = 10_000
PROXY_TIMEOUT = 0.5  # not less: a loaded machine (`make test`'s workers) must not time out the answers on time
TOO_LATE = 0.8  # the upstream's delay on a call that times out
EXAMPLES, STEPS = 20, 25
# What a seller's upstream says it served (X-Usage-Units): a count (of up to 18 digits), or anything else, which
# counts as 1 unit; never more than the buyer's X-Max-Units.
UNITS = st.sampled_from(["0", "1", "2", "4", "abc", "-1", "\u00b2", "99999999999999999999"])
SETTLING_IN = 8  # steps before an example may ask for completion (else most examples complete at once)


class Books(RuleBasedStateMachine):
    """One active agreement per example, and what the rules saw happen to it."""

    chain = upstream = None  # the test's Anvil chain and the agreement's upstream (a RecordingServer)
    names = count()
    seen: Counter = Counter()  # what the rules saw, over all examples (printed by the test)

    @initialize(per_unit=st.booleans(), quantity=st.sampled_from([3, 8, 300]))
    def agreement(self, per_unit, quantity):
        pricing = {"pricing": {"type": "per_unit", "unit_name": "page", "unit_price_atomic": PER_UNIT_PRICE}} \
            if per_unit else {}
        self.parties = activated_through_the_api(self.chain, self.upstream.url, quantity=quantity, **pricing)
        self.id = self.parties.agreement_id
        agreement = UsageAgreement.objects.get(pk=self.id)
        assert agreement.status == "active"
        self.per_unit, self.price, self.deposit = per_unit, agreement.price_per_unit, agreement.deposit_amount
        self.onchain_id, self.escrow = agreement.onchain_id, onchain_escrow(self.chain, agreement.onchain_id)
        self.used = self.events = self.seller_units = 0
        self.forwarded = len(self.upstream.requests)
        self.answered_200: dict[int, int] = {}  # event id -> the cost the buyer was told
        self.replies: dict[str, dict] = {}  # nonce -> the stored answer a replay must get
        self.free_nonces: dict[str, str] = {}  # nonce whose call ended unanswered -> its path: usable again
        self.pending_nonces: dict[str, str] = {}  # nonce a dead process claimed -> its path
        self.reports: list[tuple[str, dict, dict]] = []  # (Idempotency-Key, body, answer)
        self.dead: list[dict] = []  # calls of processes that died, not yet settled
        self.dead_nonces: list[dict] = []  # their nonces, not yet settled by the reaper
        self.at_completion: tuple[int, set[int], int] | None = None  # (call counter, live calls, events)
        self.steps = 0

    def teardown(self):
        # Nothing of this example left for the next one's reaper.
        metering._leases_release_all()
        metering.intents_reap(now=timezone.now() + timedelta(days=1))

    # --- what the database holds ---------------------------------------------------------------------------------

    def head(self) -> dict:
        with connection.cursor() as cursor:
            cursor.execute(
                "SELECT used, reserved, call_counter, completion_requested_at, status, usage_seq, usage_digest, "
                "(SELECT COALESCE(SUM(amount), 0) FROM agreements_callintent WHERE agreement_id = a.id), "
                "ARRAY(SELECT call_seq FROM agreements_callintent WHERE agreement_id = a.id) "
                "FROM agreements_usageagreement a WHERE id = %s", [self.id])
            row = cursor.fetchone()
        return dict(zip(("used", "reserved", "call_counter", "completion_requested_at", "status", "usage_seq",
                         "usage_digest", "live_amount", "live_calls"), row, strict=True))

    def fits(self, amount: int) -> bool:
        head = self.head()
        return head["used"] + head["reserved"] + amount <= self.deposit

    def completing(self) -> bool:
        head = self.head()
        return head["completion_requested_at"] is not None or head["status"] != "active"

    # --- the buyer's calls -----------------------------------------------------------------------------------------

    def proxied(self, *, outcome: str, units: str, max_units: int, nonce: str, path: str):
        """A call whose upstream answers as `outcome` says: "ok" (200) and "rejected" (404: served, so charged)
        reporting `units` (X-Usage-Units, any text), "failed" (500) or "timeout"."""
        headers = {"X-Max-Units": str(max_units)} if self.per_unit else {}
        if nonce:
            headers["X-Request-Nonce"] = nonce
        if outcome in ("ok", "rejected"):
            self.upstream.responses.append((200 if outcome == "ok" else 404, {"ok": outcome == "ok"}, 0,
                                            {"X-Usage-Units": units}))
        elif outcome == "failed":
            self.upstream.responses.append((500, {"error": "boom"}))
        else:
            self.upstream.responses.append((200, {"late": True}, TOO_LATE))
        amount = (max_units if self.per_unit else 1) * self.price
        could, completing = self.fits(amount), self.completing()
        events = UsageEvent.objects.filter(agreement_id=self.id).count()

        response = self.parties.buyer_api.get(f"/metered-proxy/{self.id}{path}", headers=headers)

        forwarded = len(self.upstream.requests) - self.forwarded == 1
        self.seen[f"call {outcome if forwarded else 'refused'}: {response.status_code}"
                  f"{' while completing' if completing else ''}"] += 1
        self.forwarded += forwarded
        if not forwarded:
            self.upstream.responses.pop()  # never asked for
            assert response.status_code in (402, 409), response.content
            if response.status_code == 402:
                assert error_code(response) == "budget_exhausted" and not could
            else:
                assert completing, response.content
            assert UsageEvent.objects.filter(agreement_id=self.id).count() == events
            if nonce:
                self.free_nonces[nonce] = path
            return
        if outcome == "timeout":
            assert (response.status_code, error_code(response)) == (504, "upstream_timeout")
            assert UsageEvent.objects.filter(agreement_id=self.id).count() == events
            if nonce:
                self.free_nonces[nonce] = path
            return
        if outcome == "failed":
            assert response.status_code == 500 and response["X-Usage-Cost"] == "0"
            assert not response.has_header("X-Usage-Event-Id")
            assert UsageEvent.objects.filter(agreement_id=self.id).count() == events
            if nonce:  # not charged: nothing stored, a retry is a call of its own
                self.free_nonces[nonce] = path
            return
        else:
            served = min(int(units) if units.isascii() and units.isdigit() and len(units) <= 18 else 1, max_units)
            cost = (served if self.per_unit else 1) * self.price
            status = 200 if outcome == "ok" else 404
            assert response.status_code == status and response["X-Usage-Cost"] == str(cost), response.content
            event = UsageEvent.objects.get(pk=response["X-Usage-Event-Id"])
            assert (str(event.agreement_id), event.cost, event.upstream_status, event.request_nonce) == (
                self.id, cost, status, nonce)
            assert response["X-Usage-Seq"] == str(event.seq)
            assert response["X-Escrow-Remaining"] == str(self.deposit - event.cumulative)
            self.answered_200[event.pk] = cost
            self.used += cost
            self.events += 1
        if nonce:
            self.replies[nonce] = {"path": path, "status": response.status_code, "body": response.content,
                                   "cost": response["X-Usage-Cost"]}

    @rule(calls=st.lists(st.tuples(st.sampled_from(["ok", "ok", "ok", "rejected", "failed", "timeout"]), UNITS,
                                   st.integers(1, 3), st.booleans()), min_size=1, max_size=4))
    def calls(self, calls):
        """Calls in a row: (what the upstream does, the units it serves, the buyer's X-Max-Units, with a nonce)."""
        for outcome, units, max_units, with_nonce in calls:
            name = next(self.names)
            self.proxied(outcome=outcome, units=units, max_units=max_units,
                         nonce=f"n-{name}" if with_nonce else "", path=f"/work/{name}")

    @rule(ok=st.booleans(), units=UNITS, max_units=st.integers(1, 3))
    def a_call_with_a_nonce(self, ok, units, max_units):
        name = next(self.names)
        self.proxied(outcome="ok" if ok else "failed", units=units, max_units=max_units, nonce=f"n-{name}",
                     path=f"/work/{name}")

    @rule(timeout=st.booleans())
    def a_call_the_upstream_fails(self, timeout):
        name = next(self.names)
        self.proxied(outcome="timeout" if timeout else "failed", units="1", max_units=1, nonce="",
                     path=f"/work/{name}")

    @precondition(lambda self: self.replies or self.free_nonces or self.pending_nonces)
    @rule(data=st.data(), elsewhere=st.booleans(), outcome=st.sampled_from(["ok", "failed", "timeout"]))
    def retry_with_a_nonce(self, data, elsewhere, outcome):
        nonce = data.draw(st.sampled_from(sorted([*self.replies, *self.free_nonces, *self.pending_nonces])))
        if nonce in self.free_nonces:  # its call was not answered: a retry is a call of its own
            self.proxied(outcome=outcome, units="1", max_units=1, nonce=nonce, path=self.free_nonces.pop(nonce))
            return
        path = (self.replies.get(nonce) or {"path": self.pending_nonces.get(nonce)})["path"]
        events = UsageEvent.objects.filter(agreement_id=self.id).count()
        response = self.parties.buyer_api.get(f"/metered-proxy/{self.id}{path}{'/other' if elsewhere else ''}",
                                              headers={"X-Request-Nonce": nonce})
        self.seen[f"nonce retried: {response.status_code}"] += 1
        if elsewhere:
            assert (response.status_code, error_code(response)) == (422, "nonce_reused")
        elif nonce in self.pending_nonces:
            assert (response.status_code, error_code(response)) == (409, "request_in_progress")
        else:
            stored = self.replies[nonce]
            assert (response.status_code, response["X-Replayed"], response["X-Usage-Cost"]) == (
                stored["status"], "true", stored["cost"])
            if stored["body"] is None:
                assert error_code(response) == "reply_lost"
            else:
                assert response.content == stored["body"]
        assert len(self.upstream.requests) == self.forwarded  # never forwarded again
        assert UsageEvent.objects.filter(agreement_id=self.id).count() == events

    # --- the seller's reports -------------------------------------------------------------------------------------

    @rule(units=st.lists(st.one_of(st.integers(1, 3), st.integers(1, 3), st.integers(4, 60)), min_size=1,
                         max_size=3))
    def seller_reports(self, units):
        self.report(f"report-{next(self.names)}", {"events": [{"units": n} for n in units]})

    @precondition(lambda self: self.reports)
    @rule(data=st.data())
    def seller_reports_again(self, data):
        """The same Idempotency-Key and body: the first answer, charged once; or, the first refused (its key
        released, as for any error), the report runs again."""
        key, body, answer = data.draw(st.sampled_from(self.reports))
        if "error" in answer:
            self.report(key, body)
            return
        response = self.parties.seller_api.post(f"/usage-agreements/{self.id}/record-usage", body,
                                                headers={"Idempotency-Key": key})
        assert response.json() == answer

    def report(self, key: str, body: dict) -> None:
        units = [entry["units"] for entry in body["events"]]
        total = sum(units) * self.price
        could, completing = self.fits(total), self.completing()
        response = self.parties.seller_api.post(f"/usage-agreements/{self.id}/record-usage", body,
                                                headers={"Idempotency-Key": key})
        self.seen[f"seller report: {response.status_code}"] += 1
        if completing:
            assert (response.status_code, error_code(response)) == (409, "agreement_completing")
        elif could:
            assert response.status_code == 201, response.content
            self.used, self.events, self.seller_units = self.used + total, self.events + len(units), \
                self.seller_units + sum(units)
            assert response.json()["used_atomic"] == self.used
        else:
            assert (response.status_code, error_code(response)) == (402, "budget_exhausted")
        self.reports.append((key, body, response.json()))

    @rule(more=st.one_of(st.integers(-2, 3), st.integers(0, 3), st.integers(4, 60)), completed=st.booleans())
    def seller_reports_its_running_total(self, more, completed):
        total = max(0, self.seller_units + more)
        cost = (total - self.seller_units) * self.price
        could, completing = self.fits(cost), self.completing()
        completed = completed and self.steps >= SETTLING_IN
        response = self.parties.seller_api.post(f"/usage-agreements/{self.id}/record-usage",
                                                {"units_used": total, "completed": completed})
        self.seen[f"seller running total: {response.status_code}"] += 1
        if total < self.seller_units:
            assert (response.status_code, error_code(response)) == (409, "usage_total_decreased")
        elif total == self.seller_units:
            assert response.status_code == 201, response.content
        elif completing:
            assert (response.status_code, error_code(response)) == (409, "agreement_completing")
        elif could:
            assert response.status_code == 201, response.content
            self.used, self.events, self.seller_units = self.used + cost, self.events + 1, total
        else:
            assert (response.status_code, error_code(response)) == (402, "budget_exhausted")

    # --- completion, dead processes, the reaper ------------------------------------------------------------------

    @precondition(lambda self: self.steps >= SETTLING_IN)
    @rule(by_the_buyer=st.booleans())
    def complete(self, by_the_buyer):
        api = self.parties.buyer_api if by_the_buyer else self.parties.seller_api
        response = api.post(f"/usage-agreements/{self.id}/complete", {})
        assert response.status_code == 200 and response.json()["completion_requested_at"], response.content

    @rule(calls=st.lists(st.tuples(st.booleans(), st.integers(0, 3), st.booleans()), min_size=1, max_size=3))
    def a_process_dies_mid_call(self, calls):
        """Another server process reserves calls (a lease of its own), the upstream answering some (recorded on
        their intents), and dies before charging any."""
        live, metering._call_leases = metering._call_leases, {}
        try:
            for answered, units, with_nonce in calls:
                name = next(self.names)
                nonce, path = (f"dead-{name}" if with_nonce else ""), f"/dead/{name}"
                max_units = max(1, units) if self.per_unit else 1
                agreement = UsageAgreement.objects.get(pk=self.id)
                if nonce:
                    ProxyReplay.objects.create(agreement=agreement, request_nonce=nonce,
                                               request_fingerprint=proxy.request_fingerprint("GET", path, b""))
                try:
                    reservation = metering.reservation_take(agreement=agreement, amount=max_units * self.price,
                                                            request_id=f"req-{name}", request_nonce=nonce,
                                                            method="GET", path=path)
                except (PaymentRequired, Conflict):
                    ProxyReplay.objects.filter(agreement=agreement, request_nonce=nonce).delete()
                    continue
                cost = (units if self.per_unit else 1) * self.price
                if answered:
                    assert metering.reservation_answered(reservation=reservation, charge={
                        "units": units if self.per_unit else 1, "cost": cost, "upstream_status": 200,
                        "latency_ms": 5, "request_id": f"req-{name}", "request_nonce": nonce, "method": "GET",
                        "path": path})
                self.seen[f"dead call {'answered' if answered else 'unanswered'}"] += 1
                dead = {"call_seq": reservation.call_seq, "answered": answered, "cost": cost, "nonce": nonce,
                        "path": path}
                self.dead.append(dead)
                if nonce:
                    self.pending_nonces[nonce] = path
                    self.dead_nonces.append(dead)
        finally:
            metering._call_leases = live

    @precondition(lambda self: self.dead or self.dead_nonces
                  or any(leases.calls for leases in metering._call_leases.values()))
    @rule(settle=st.booleans())
    def time_passes_and_the_reaper_runs(self, settle):
        """Past the reaper's staleness rule: this process's leased calls lapsed and were given back; the calls of
        processes that died are charged when answered, else released, and their nonces answered. Completing, the
        settlement may settle the calls first (reservations_settle_stale), by the reaper's rule."""
        metering._leases_release_all()
        answered = [dead for dead in self.dead if dead["answered"]]
        settling = settle and self.completing()
        if settling:
            metering.reservations_settle_stale(agreement=UsageAgreement.objects.get(pk=self.id))
        else:
            later = timezone.now() + timedelta(seconds=1)
            later += timezone.now() - selectors.calls_stale_before(now=timezone.now())
            done = metering.intents_reap(now=later)
            assert done["charged"] == len(answered)
            self.seen[f"reaper charged {done['charged']}, released {done['released']}"] += 1
            metering.intents_reap(now=later)  # idempotent: the invariants say nothing moved
        for dead in answered:
            event = UsageEvent.objects.get(agreement_id=self.id, call_seq=dead["call_seq"])
            assert (event.cost, event.request_nonce, event.path) == (dead["cost"], dead["nonce"], dead["path"])
            self.used += dead["cost"]
            self.events += 1
        self.dead = []
        if settling:  # the nonces wait for the reaper
            return
        for dead in self.dead_nonces:
            del self.pending_nonces[dead["nonce"]]
            if dead["answered"]:
                # Charged, its answer lost with its process: a retry is told so, and not forwarded.
                self.replies[dead["nonce"]] = {"path": dead["path"], "status": 502, "cost": str(dead["cost"]),
                                               "body": None}
            else:
                self.free_nonces[dead["nonce"]] = dead["path"]
        self.dead_nonces = []
        assert not CallIntent.objects.filter(agreement_id=self.id).exists()

    # --- the invariants --------------------------------------------------------------------------------------------

    @invariant()
    def the_books_hold(self):
        if not hasattr(self, "parties"):
            return
        self.steps += 1
        head = self.head()
        events = list(UsageEvent.objects.filter(agreement_id=self.id).order_by("seq").values(
            "id", "seq", "cost", "units", "cumulative", "usage_digest", "source", "call_seq", "request_nonce"))
        assert [event["seq"] for event in events] == list(range(1, len(events) + 1))
        running = 0
        for event in events:
            running += event["cost"]
            assert event["cumulative"] == running and event["cost"] == event["units"] * self.price
        assert head["used"] == running == self.used and len(events) == self.events
        assert head["usage_seq"] == len(events)
        if events:
            assert head["usage_digest"] == events[-1]["usage_digest"]
        assert 0 <= head["reserved"] == head["live_amount"]
        assert head["used"] + head["reserved"] <= self.deposit
        by_id = {event["id"]: event for event in events}
        assert all(by_id[event_id]["cost"] == cost for event_id, cost in self.answered_200.items())
        nonces = [event["request_nonce"] for event in events if event["request_nonce"]]
        assert len(nonces) == len(set(nonces)), "a nonce charged twice"
        assert len(self.upstream.requests) == self.forwarded
        self.receipts_verify()
        if self.at_completion is None:
            if head["completion_requested_at"] is not None:
                self.at_completion = (head["call_counter"], set(head["live_calls"]), len(events))
                self.seen[f"completed with {len(head['live_calls'])} calls reserved"] += 1
        else:
            counter, live, charged = self.at_completion
            assert head["call_counter"] == counter, "a call reserved after completion"
            assert all(event["source"] == UsageSource.PROXY and event["call_seq"] in live
                       for event in events[charged:]), "charged after completion"

    def receipts_verify(self):
        usage, cursor = [], ""
        while cursor is not None:
            page = self.parties.buyer_api.get(f"/usage-agreements/{self.id}/usage?limit=100"
                                              + (f"&cursor={cursor}" if cursor else "")).json()
            usage, cursor = usage + page["results"], page["next_cursor"]
        verified = receipts.verify_usage(usage, agreement_id=self.onchain_id, chain_id=self.chain.chain_id,
                                         escrow_address=self.chain.addresses["escrow"], escrow=self.escrow,
                                         price_per_unit=self.price,
                                         pinned_receipt_signers=self.chain.accounts.receipt_signer.address)
        assert verified.cumulative_amount == self.used


def test_the_books_hold_whatever_the_calls_reports_crashes_and_reaper_do(escrow_chain, http_server, settings,
                                                                        monkeypatch):
    settings.PROXY_TIMEOUT = PROXY_TIMEOUT
    # Leases lapse when the rules say time passes, not while a step runs.
    settings.PROXY_CALL_LEASE_SECONDS = 600.0
    monkeypatch.setattr(metering, "_sweeper_start", lambda: None)  # given back by `time_passes_...` alone
    monkeypatch.setattr(metering, "_call_leases", {})
    monkeypatch.setattr(metering, "_charging_ahead", {})
    machine = type("BooksOfThisChain", (Books,), {"chain": escrow_chain, "upstream": http_server, "seen": Counter()})
    started = time.monotonic()
    run_state_machine_as_test(machine, settings=hypothesis_settings(
        # No example database: the run leaves no files behind; a failure prints its steps, shrunk.
        max_examples=EXAMPLES, stateful_step_count=STEPS, deadline=None, database=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much]))
    print(f"{EXAMPLES} examples of up to {STEPS} steps in {time.monotonic() - started:.1f} s:",
          dict(sorted(machine.seen.items())))
