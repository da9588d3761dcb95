"""`Idempotency-Key` (marketplace/idempotency.py) under real concurrency: two requests with the same key, each
on its own PostgreSQL connection."""

import threading
import uuid
import time
from datetime import timedelta

import pytest
from django.db import connections

from agreements.models import UsageAgreement
from catalog.models import Agent
from marketplace import idempotency
from marketplace.models import IdempotencyRecord
from tests.agreements.helpers import proposal
from tests.catalog.factories import AgentFactory, issue_key, register_service
from tests.conftest import Api, error_code
from tests.faults.processes import wait_until
from tests.support.db_activity import row_locked, sessions_waiting_for_a_lock

pytestmark = [pytest.mark.postgres, pytest.mark.django_db(transaction=True)]


def post_in_a_thread(answers: dict, name: str, key: str, body: dict, headers: dict) -> threading.Thread:
    """POST the proposal on a connection of its own; its answer lands in `answers[name]`."""
    def run():
        try:
            answers[name] = Api(key).post("/usage-agreements", body, headers=headers)
        finally:
            connections.close_all()

    thread = threading.Thread(target=run)
    thread.start()
    return thread


class Proposals:
    """A buyer's proposal under one Idempotency-Key, posted from threads (`post`), each answer kept by name."""

    def __init__(self, idempotency_key: str):
        self.buyer = AgentFactory(is_buyer=True, is_seller=False)
        self.key = issue_key(self.buyer)
        self.body = proposal(register_service(AgentFactory(is_seller=True)))
        self.headers = {"Idempotency-Key": idempotency_key}
        self.answers: dict = {}

    def post(self, name: str) -> threading.Thread:
        return post_in_a_thread(self.answers, name, self.key, self.body, self.headers)

    def replay(self):
        return Api(self.key).post("/usage-agreements", self.body, headers=self.headers)


def test_a_retry_while_the_first_request_runs_is_409_and_then_replays_the_first_answer():
    proposals = Proposals("propose-once")
    buyer, answers, post = proposals.buyer, proposals.answers, proposals.post

    # The first request claims the key, then waits for the buyer's row, held by another session (as a concurrent
    # proposal or policy edit holds it): it is in progress for as long as the test says.
    with row_locked(Agent, buyer.pk):
        first = post("first")
        wait_until(lambda: sessions_waiting_for_a_lock() == 1, timeout=60, what="the first request to wait for the lock")
        post("retry")
        wait_until(lambda: "retry" in answers, timeout=60, what="the retry's answer while the first request runs")

        assert answers["retry"].status_code == 409 and error_code(answers["retry"]) == "idempotency_in_progress"
        assert "first" not in answers
    first.join()

    assert answers["first"].status_code == 201, answers["first"].content
    replay = proposals.replay()
    assert replay.status_code == 201 and replay["Idempotent-Replayed"] == "true"
    assert replay.json() == answers["first"].json()
    assert UsageAgreement.objects.filter(buyer=buyer).count() == 1


def test_a_retry_while_the_first_request_runs_past_the_stale_claim_time_does_not_run_it_again(settings):
    """A claim older than IDEMPOTENCY_STALE_CLAIM is taken over as one whose process died. A request still running
    by then (a lock wait, a slow database) holds its claim's row locked: the retry waits for it and is not run a
    second time."""
    settings.IDEMPOTENCY_STALE_CLAIM = timedelta(seconds=0.5)
    proposals = Proposals("propose-once-slowly")
    buyer, answers, post = proposals.buyer, proposals.answers, proposals.post

    with row_locked(Agent, buyer.pk):
        first = post("first")
        wait_until(lambda: sessions_waiting_for_a_lock() == 1, timeout=60, what="the first request to wait for the lock")
        time.sleep(1)  # the first request's claim is stale now; the request is not dead
        retry = post("retry")
        wait_until(lambda: sessions_waiting_for_a_lock() == 2, timeout=60, what="the retry to wait")
    first.join(60)
    retry.join(60)

    assert answers["first"].status_code == 201, answers["first"].content
    assert answers["retry"].status_code == 409 and error_code(answers["retry"]) == "idempotency_in_progress"
    assert UsageAgreement.objects.filter(buyer=buyer).count() == 1
    replay = proposals.replay()
    assert replay["Idempotent-Replayed"] == "true" and replay.json() == answers["first"].json()


def test_a_claim_released_between_a_retrys_insert_and_its_read_is_claimed_afresh(monkeypatch):
    """The first request failed (its claim released) right after the retry's insert found the key taken: the
    retry's read of the claim found nothing, a 500."""
    buyer = AgentFactory(is_buyer=True, is_seller=False)
    service = register_service(AgentFactory(is_seller=True))
    key = issue_key(buyer)
    real_insert, inserts = idempotency._claim_insert, []

    def insert_while_another_request_fails(scope, key, fingerprint):
        inserts.append(key)
        if len(inserts) > 1:
            return real_insert(scope, key, fingerprint)
        held = IdempotencyRecord.objects.create(scope=scope, key=key, request_fingerprint=fingerprint)
        claimed = real_insert(scope, key, fingerprint)  # taken: None
        held.delete()  # the other request's `_release`
        return claimed

    monkeypatch.setattr(idempotency, "_claim_insert", insert_while_another_request_fails)
    response = Api(key).post("/usage-agreements", proposal(service), headers={"Idempotency-Key": "released"})
    assert response.status_code == 201, response.content
    assert len(inserts) == 2 and UsageAgreement.objects.filter(buyer=buyer).count() == 1


def test_an_answer_whose_commit_fails_is_not_stored_and_its_effects_roll_back():
    """The request's transaction is committed together with storing its answer (one round trip): a COMMIT that fails
    (here a deferred foreign key, checked at COMMIT) raises, keeps none of the handler's writes, and releases the key
    so that a corrected retry runs; a handler whose COMMIT succeeds has its answer stored for replays."""
    from django.db import IntegrityError
    from django.test import RequestFactory
    from rest_framework.response import Response

    from agreements.models import UsageEvent

    def request():
        return RequestFactory().post("/usage-agreements/x/record-usage", {}, content_type="application/json")

    def dangling_event():
        UsageEvent.objects.create(agreement_id=uuid.uuid4(), seq=1, source="seller_report", units=1, cost=1,
                                  cumulative=1, usage_digest="0x" + "00" * 32, request_id="r")
        return Response({"recorded": True}, status=201)

    with pytest.raises(IntegrityError):
        idempotency.answer_once(request(), scope="agent:x", key="commit-fails", fingerprint="f", handler=dangling_event)

    assert not UsageEvent.objects.exists()
    assert not IdempotencyRecord.objects.filter(key="commit-fails").exists()
    answer = idempotency.answer_once(request(), scope="agent:x", key="commit-fails", fingerprint="f",
                                     handler=lambda: Response({"recorded": True}, status=201))
    assert answer.status_code == 201
    stored = IdempotencyRecord.objects.get(key="commit-fails")
    assert (stored.response_status, stored.response_body) == (201, {"recorded": True})


def test_a_request_whose_commit_answer_is_lost_after_it_committed_replays_and_is_not_run_again(monkeypatch):
    """The COMMIT that stores the answer (in the request's pipeline) reached the server, which committed, but its
    answer was lost (the connection dropped): the error released the key anyway, deleting the committed answer, and
    the client's retry with the same Idempotency-Key ran the request a second time (two agreements for one key)."""
    from django.db import OperationalError

    proposals = Proposals("commit-answer-lost")
    store = idempotency._store

    def committed_then_connection_lost(*args, **kwargs):
        store(*args, **kwargs)
        raise OperationalError("server closed the connection unexpectedly")

    monkeypatch.setattr(idempotency, "_store", committed_then_connection_lost)
    assert proposals.replay().status_code == 503  # database_unavailable: the client retries
    monkeypatch.setattr(idempotency, "_store", store)

    retry = proposals.replay()
    assert retry.status_code == 201, retry.content
    assert UsageAgreement.objects.filter(buyer=proposals.buyer).count() == 1
    assert retry.json()["id"] == str(UsageAgreement.objects.get(buyer=proposals.buyer).pk)


def test_a_first_request_failing_after_its_stale_claim_was_taken_over_leaves_the_retrys_claim(settings, monkeypatch):
    """The client gave up on a request still running (its claim stale, IDEMPOTENCY_STALE_CLAIM) and retried with the
    same key: the retry took the claim over once the first request's transaction ended. That request had failed (a
    5xx), and its release of the key deleted the claim the retry now held: the retry's answer was never stored, and
    the next retry with the key (its answer lost too) ran the proposal a second time."""
    from agreements import services as agreement_services
    from agreements import views as agreement_views

    settings.IDEMPOTENCY_STALE_CLAIM = timedelta(0)  # every claim is stale at once: no waiting in the test
    proposals = Proposals("stale-then-failed")
    first_inside, fail_first, first_done = threading.Event(), threading.Event(), threading.Event()
    propose, prepare = agreement_services.agreement_propose, agreement_views._proposal_prepared

    def first_fails_midway(**kwargs):
        if threading.current_thread().name != "first":
            return propose(**kwargs)
        first_inside.set()
        assert fail_first.wait(60)
        raise RuntimeError("the first request fails once its client retried")

    def retry_prepared_once_the_first_ended(request):
        if threading.current_thread().name == "retry":
            assert first_done.wait(60)
        return prepare(request)

    monkeypatch.setattr(agreement_services, "agreement_propose", first_fails_midway)
    monkeypatch.setattr(agreement_views, "_proposal_prepared", retry_prepared_once_the_first_ended)
    answers: dict = {}

    def send(name: str) -> None:
        try:
            answers[name] = proposals.replay()
        finally:
            if name == "first":
                first_done.set()
            connections.close_all()

    first = threading.Thread(target=send, args=("first",), name="first")
    first.start()
    assert first_inside.wait(60)
    retry = threading.Thread(target=send, args=("retry",), name="retry")
    retry.start()
    # The retry takes the stale claim over once the first request's transaction (holding the claim's row) ends.
    wait_until(lambda: sessions_waiting_for_a_lock() == 1, timeout=60, what="the retry to wait for the claim")
    fail_first.set()
    first.join(60)
    retry.join(60)

    assert answers["first"].status_code == 500
    assert answers["retry"].status_code == 201, answers["retry"].content
    again = proposals.replay()
    assert again.status_code == 201 and again.get("Idempotent-Replayed") == "true", again.content
    assert again.json() == answers["retry"].json()
    assert UsageAgreement.objects.filter(buyer=proposals.buyer).count() == 1
