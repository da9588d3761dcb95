"""Concurrent proposals against one spend cap, on real PostgreSQL with one connection per thread."""

import threading
import time

import pytest
from django.db import connection, connections, transaction

from agreements.models import UsageAgreement
from catalog.models import Agent, Service
from marketplace.models import IdempotencyRecord
from tests.agreements.helpers import proposal
from tests.catalog.factories import AgentFactory, UserFactory, issue_key, issue_owner_token, register_service
from tests.conftest import Api

pytestmark = [pytest.mark.postgres, pytest.mark.django_db(transaction=True)]


def test_concurrent_proposals_cannot_both_slip_under_a_cap():
    owner = UserFactory()
    buyer = AgentFactory(owner=owner, is_buyer=True, is_seller=False)
    service = register_service(AgentFactory(is_seller=True))  # 10 calls: 200_000 + 100_000 fee each
    Api(issue_owner_token(owner)).put(f"/agents/{buyer.pk}/policies", {"daily_cap_atomic": 900_000})
    buyer_key = issue_key(buyer)

    threads_count = 8
    barrier = threading.Barrier(threads_count)
    statuses: list[int] = []

    def propose():
        try:
            api = Api(buyer_key)
            barrier.wait()
            statuses.append(api.post("/usage-agreements", proposal(service)).status_code)
        finally:
            connections.close_all()

    threads = [threading.Thread(target=propose) for _ in range(threads_count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()

    assert sorted(statuses) == [201] * 3 + [403] * 5
    assert UsageAgreement.objects.filter(buyer=buyer).count() == 3
    assert Agent.objects.count() == 2 and Service.objects.count() == 1


def test_a_retry_while_the_first_request_runs_is_409_then_replays_its_answer():
    buyer = AgentFactory(is_buyer=True, is_seller=False)
    service = register_service(AgentFactory(is_seller=True))
    buyer_key = issue_key(buyer)
    body = proposal(service)
    answers: dict[str, object] = {}

    def post(name):
        try:
            answers[name] = Api(buyer_key).post("/usage-agreements", body,
                                                headers={"Idempotency-Key": "order-42"})
        finally:
            connections.close_all()

    first = threading.Thread(target=post, args=("first",))
    with transaction.atomic():  # the first request's insert waits on this lock, its key claimed and committed
        with connection.cursor() as cursor:
            cursor.execute(f"LOCK TABLE {UsageAgreement._meta.db_table} IN EXCLUSIVE MODE")
        first.start()
        deadline = time.monotonic() + 30
        while not IdempotencyRecord.objects.filter(key="order-42").exists():
            assert time.monotonic() < deadline, "the first request never claimed its key"
            time.sleep(0.05)
        retry = threading.Thread(target=post, args=("retry",))
        retry.start()
        retry.join(timeout=30)
        assert "retry" in answers, "the retry waited for the first request instead of answering"
    first.join()
    replay = threading.Thread(target=post, args=("replay",))
    replay.start()
    replay.join()

    assert answers["retry"].status_code == 409
    assert answers["retry"].json()["error"]["code"] == "idempotency_in_progress"
    assert answers["first"].status_code == 201
    assert answers["replay"].status_code == 201 and answers["replay"]["Idempotent-Replayed"] == "true"
    assert answers["replay"].json()["id"] == answers["first"].json()["id"]
    assert UsageAgreement.objects.count() == 1
