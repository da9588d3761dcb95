"""Concurrent proposals against one spend cap, on real PostgreSQL with one connection per thread."""

import threading

import pytest
from django.db import connections

from agreements.models import UsageAgreement
from catalog.models import Agent, Service
from tests.agreements.helpers import proposal
from tests.catalog.factories import AgentFactory, UserFactory, issue_key, issue_owner_token, register_service
from tests.conftest import Api
from tests.policies.helpers import whole_policy

pytestmark = [pytest.mark.postgres, pytest.mark.django_db(transaction=True)]


def test_concurrent_proposals_cannot_both_slip_under_a_cap():
    owner = UserFactory()
    buyer = AgentFactory(owner=owner, is_buyer=True, is_seller=False)
    service = register_service(AgentFactory(is_seller=True))  # 10 calls: 200_000 + 100_000 fee each
    Api(issue_owner_token(owner)).put(f"/agents/{buyer.pk}/policies", {"daily_cap_atomic": 900_000})
    statuses = proposed_at_once(issue_key(buyer), service, count=8)

    assert sorted(statuses) == [201] * 3 + [403] * 5
    assert UsageAgreement.objects.filter(buyer=buyer).count() == 3
    assert Agent.objects.count() == 2 and Service.objects.count() == 1




def test_concurrent_proposals_cannot_all_slip_under_the_bound_on_pending_approvals(settings):
    """The bound on the approval requests a buyer agent has waiting (APPROVALS_PENDING_PER_AGENT) is counted under the
    agent's row lock its policy check takes: proposals sent at once cannot each see a free place."""
    settings.APPROVALS_PENDING_PER_AGENT = 2
    owner = UserFactory()
    buyer = AgentFactory(owner=owner, is_buyer=True, is_seller=False)
    service = register_service(AgentFactory(is_seller=True))
    Api(issue_owner_token(owner)).put(f"/agents/{buyer.pk}/policies", {"approval_threshold_atomic": 1})
    statuses = proposed_at_once(issue_key(buyer), service, count=6)

    assert sorted(statuses) == [201] * 2 + [409] * 4
    assert UsageAgreement.objects.filter(buyer=buyer, status="pending_approval").count() == 2

def proposed_at_once(buyer_key: str, service: Service, *, count: int) -> list[int]:
    """The status codes of `count` proposals of `service` by the buyer, from one thread each, released together."""
    barrier = threading.Barrier(count)
    statuses: list[int] = []

    def propose():
        try:
            api = Api(buyer_key)
            barrier.wait()
            statuses.append(api.post("/usage-agreements", proposal(service)).status_code)
        finally:
            connections.close_all()

    threads = [threading.Thread(target=propose) for _ in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return statuses


def posted_at_once(*calls: tuple[Api, str]) -> list[int]:
    """The status codes of POSTs (client, path) sent from one thread each, released together."""
    barrier = threading.Barrier(len(calls))
    statuses: list[int] = [0] * len(calls)

    def post(index: int, api: Api, path: str) -> None:
        try:
            barrier.wait()
            statuses[index] = api.post(path).status_code
        finally:
            connections.close_all()

    threads = [threading.Thread(target=post, args=(index, *call)) for index, call in enumerate(calls)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return statuses


def test_an_owners_approval_and_the_buyers_cancel_at_once_both_answer_and_agree():
    """The cancel closes the purchase's approval request (`approval_withdraw`), locking it before the agreement as an
    approval does: in the other order the two deadlocked, and the approval answered 503."""
    owner = UserFactory()
    buyer = AgentFactory(owner=owner, is_buyer=True, is_seller=False)
    service = register_service(AgentFactory(is_seller=True))
    owner_api, buyer_api = Api(issue_owner_token(owner)), Api(issue_key(buyer))
    owner_api.put(f"/agents/{buyer.pk}/policies", {"approval_threshold_atomic": 1})

    for _ in range(5):
        held = buyer_api.post("/usage-agreements", proposal(service)).json()
        [approval] = owner_api.get(f"/agents/{buyer.pk}/approvals", {"status": "pending"}).json()["results"]
        approved, cancelled = posted_at_once(
            (owner_api, f"/agents/{buyer.pk}/approvals/{approval['id']}/approve"),
            (buyer_api, f"/usage-agreements/{held['id']}/cancel"))

        assert cancelled == 200 and approved in (200, 409), (approved, cancelled)
        assert UsageAgreement.objects.get(pk=held["id"]).status == "cancelled"
        decided = owner_api.get(f"/agents/{buyer.pk}/approvals").json()["results"][0]
        assert decided["status"] == ("approved" if approved == 200 else "cancelled")


def test_an_approval_and_a_rejection_at_once_one_wins_and_the_request_and_purchase_agree():
    """The buyer's owner and an operator (or two sessions of the owner) deciding one request at once: the request's
    lock orders them, the second answers 409 `approval_already_decided`, and the purchase follows the first."""
    owner = UserFactory()
    buyer = AgentFactory(owner=owner, is_buyer=True, is_seller=False)
    service = register_service(AgentFactory(is_seller=True))
    owner_api, buyer_api = Api(issue_owner_token(owner)), Api(issue_key(buyer))
    other_session = Api(issue_owner_token(owner))
    owner_api.put(f"/agents/{buyer.pk}/policies", {"approval_threshold_atomic": 1})

    for _ in range(5):
        held = buyer_api.post("/usage-agreements", proposal(service)).json()
        [approval] = owner_api.get(f"/agents/{buyer.pk}/approvals", {"status": "pending"}).json()["results"]
        url = f"/agents/{buyer.pk}/approvals/{approval['id']}"
        approved, rejected = posted_at_once((owner_api, f"{url}/approve"), (other_session, f"{url}/reject"))

        assert sorted([approved, rejected]) == [200, 409], (approved, rejected)
        decided = owner_api.get(f"/agents/{buyer.pk}/approvals").json()["results"][0]
        assert decided["status"] == ("approved" if approved == 200 else "rejected")
        assert UsageAgreement.objects.get(pk=held["id"]).status == ("proposed" if approved == 200 else "rejected")
        buyer_api.post(f"/usage-agreements/{held['id']}/cancel")


def test_an_approval_and_a_policy_blocking_the_seller_at_once_never_leave_an_approval_the_policy_denied():
    """The approval's policy check and the policy's write lock the buyer's row: the approval sees the policy before
    or after the change, never half of it, and is 409 `policy_denies_now` (left pending) when it comes after."""
    owner = UserFactory()
    buyer = AgentFactory(owner=owner, is_buyer=True, is_seller=False)
    service = register_service(AgentFactory(is_seller=True))
    owner_api, buyer_api = Api(issue_owner_token(owner)), Api(issue_key(buyer))
    policy_url = f"/agents/{buyer.pk}/policies"

    for _ in range(5):
        owner_api.put(policy_url, whole_policy({"approval_threshold_atomic": 1}))
        held = buyer_api.post("/usage-agreements", proposal(service)).json()
        [approval] = owner_api.get(f"/agents/{buyer.pk}/approvals", {"status": "pending"}).json()["results"]
        barrier = threading.Barrier(2)
        statuses: dict[str, int] = {}

        def approve(approval_id=approval["id"], barrier=barrier, statuses=statuses):
            try:
                barrier.wait()
                statuses["approve"] = owner_api.post(f"/agents/{buyer.pk}/approvals/{approval_id}/approve").status_code
            finally:
                connections.close_all()

        def block(barrier=barrier, statuses=statuses):
            try:
                barrier.wait()
                statuses["block"] = Api(issue_owner_token(owner)).put(policy_url, {
                    "approval_threshold_atomic": 1, "blocked_sellers": [service.seller.handle]}).status_code
            finally:
                connections.close_all()

        threads = [threading.Thread(target=approve), threading.Thread(target=block)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()

        assert statuses["block"] == 200 and statuses["approve"] in (200, 409), statuses
        status = UsageAgreement.objects.get(pk=held["id"]).status
        assert status == ("proposed" if statuses["approve"] == 200 else "pending_approval")
        buyer_api.post(f"/usage-agreements/{held['id']}/cancel")
