"""`Idempotency-Key` (marketplace/idempotency.py) under real concurrency: two requests with the same key, each
on its own PostgreSQL connection."""

import threading

import pytest
from django.db import connections

from agreements.models import UsageAgreement
from catalog.models import Agent
from tests.agreements.helpers import proposal
from tests.catalog.factories import AgentFactory, issue_key, register_service
from tests.conftest import Api, error_code
from tests.faults.processes import wait_until
from tests.support.db_activity import row_locked, sessions_waiting_for_a_lock

pytestmark = [pytest.mark.postgres, pytest.mark.django_db(transaction=True)]


def test_a_retry_while_the_first_request_runs_is_409_and_then_replays_the_first_answer():
    buyer = AgentFactory(is_buyer=True, is_seller=False)
    service = register_service(AgentFactory(is_seller=True))
    key = issue_key(buyer)
    body, headers = proposal(service), {"Idempotency-Key": "propose-once"}
    answers: dict = {}

    def post(name: str) -> threading.Thread:
        def run():
            try:
                answers[name] = Api(key).post("/usage-agreements", body, headers=headers)
            finally:
                connections.close_all()

        thread = threading.Thread(target=run)
        thread.start()
        return thread

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
    replay = Api(key).post("/usage-agreements", body, headers=headers)
    assert replay.status_code == 201 and replay["Idempotent-Replayed"] == "true"
    assert replay.json() == answers["first"].json()
    assert UsageAgreement.objects.filter(buyer=buyer).count() == 1
