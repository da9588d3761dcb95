"""Concurrent proposals against one spend cap, on real PostgreSQL with one connection per thread."""

import threading

import pytest
from django.db import connections

from agreements.models import UsageAgreement
from catalog.models import Agent, Service
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
