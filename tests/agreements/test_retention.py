"""Rows written per proxied call or per event that are operational, not money history: deleted by a beat task once
their retention has passed, without losing what they guaranteed."""

from datetime import timedelta

import pytest
from django.utils import timezone

from agreements import services, tasks
from agreements.models import AgreementStatus, ProxyReplay, UsageAgreement, UsageEvent
from tests.conftest import error_code
from tests.escrow.test_settlement import tick

pytestmark = [pytest.mark.chain, pytest.mark.django_db]


def settle(parties, chain, capture) -> None:
    """Completed, proposed, the challenge window passed, finalized: settled on the chain."""
    assert parties.buyer_api.post(f"/usage-agreements/{parties.agreement_id}/complete").status_code == 200
    assert tick(capture)["proposed"] == 1
    chain.increase_time(3601)
    assert tick(capture)["finalizing"] == 1
    assert parties.agreement(parties.agreement_id)["status"] == AgreementStatus.SETTLED


def settled_days_ago(agreement_id, days: float) -> None:
    """As if the agreement had settled `days` ago, and its calls were made (their replies stored) before."""
    settled_at = timezone.now() - timedelta(days=days)
    UsageAgreement.objects.filter(pk=agreement_id).update(settled_at=settled_at)
    ProxyReplay.objects.filter(agreement_id=agreement_id).update(created_at=settled_at - timedelta(hours=2))


def test_the_stored_replies_of_a_settled_agreement_are_deleted_past_their_retention_and_a_retry_is_not_charged(
        active, http_server, escrow_chain, django_capture_on_commit_callbacks, settings):
    """A reply stored for X-Request-Nonce retries (up to PROXY_REPLAY_MAX_BYTES per call) was kept for ever, long
    after its agreement was settled and no retry could be charged."""
    settings.PROXY_REPLAY_KEEP_DAYS = 7
    nonce = {"X-Request-Nonce": "call-1"}
    http_server.responses.append((200, {"n": 1}))
    assert active.buyer_api.post(f"{active.proxy}/x", {"a": 1}, headers=nonce).status_code == 200
    settle(active, escrow_chain, django_capture_on_commit_callbacks)
    settled = UsageAgreement.objects.get(pk=active.agreement_id)
    assert (settled.used, UsageEvent.objects.filter(agreement=settled).count()) == (20_000, 1)

    settled_days_ago(active.agreement_id, 6)  # within its retention: a retry still gets its answer
    assert tasks.purge_proxy_replays() == 0
    replayed = active.buyer_api.post(f"{active.proxy}/x", {"a": 1}, headers=nonce)
    assert (replayed.status_code, replayed["X-Replayed"]) == (200, "true")

    settled_days_ago(active.agreement_id, 8)
    assert tasks.purge_proxy_replays() == 1
    assert not ProxyReplay.objects.filter(agreement_id=active.agreement_id).exists()
    assert tasks.purge_proxy_replays() == 0  # safe to run twice

    # The retry after the purge is neither forwarded nor charged: the agreement takes no calls.
    retried = active.buyer_api.post(f"{active.proxy}/x", {"a": 1}, headers=nonce)
    assert retried.status_code == 409 and error_code(retried) == "agreement_not_active"
    again = active.buyer_api.post(f"{active.proxy}/x", {"a": 1}, headers=nonce)
    assert (again.status_code, error_code(again)) == (502, "reply_lost")  # the call was charged once, before
    assert len(http_server.requests) == 1
    settled.refresh_from_db()
    assert (settled.used, settled.reserved, UsageEvent.objects.filter(agreement=settled).count()) == (20_000, 0, 1)
    # What the retries stored (the reply_lost note) goes the same way, its retention on.
    ProxyReplay.objects.update(created_at=timezone.now() - timedelta(days=8))
    assert tasks.purge_proxy_replays() == 1
    assert not ProxyReplay.objects.filter(agreement_id=active.agreement_id).exists()


def test_the_stored_replies_of_an_active_agreement_are_kept(active, http_server, settings):
    """An agreement still taking calls keeps every reply: a retry of an old nonce must replay, never be charged."""
    settings.PROXY_REPLAY_KEEP_DAYS = 0
    http_server.responses.append((200, {"n": 1}))
    assert active.buyer_api.get(f"{active.proxy}/x", headers={"X-Request-Nonce": "old"}).status_code == 200
    ProxyReplay.objects.update(created_at=timezone.now() - timedelta(days=400))
    assert tasks.purge_proxy_replays() == 0
    replayed = active.buyer_api.get(f"{active.proxy}/x", headers={"X-Request-Nonce": "old"})
    assert (replayed.status_code, replayed["X-Replayed"]) == (200, "true")
    assert UsageAgreement.objects.get(pk=active.agreement_id).used == 20_000


def test_an_uncharged_reply_is_not_stored_and_one_stored_before_is_deleted_past_its_retention(
        active, http_server, settings):
    """A 5xx answer is not charged but was stored for its nonce all the same (up to PROXY_REPLAY_MAX_BYTES) for as
    long as the agreement lived: a buyer calling its own failing upstream with new nonces stored them for free. Now
    none is stored (its nonce is released); one stored before that goes at the retention, the agreement open."""
    settings.PROXY_REPLAY_KEEP_DAYS = 7
    http_server.responses.append((503, {"error": "overloaded"}))
    failed = active.buyer_api.get(f"{active.proxy}/x", headers={"X-Request-Nonce": "failed-1"})
    assert (failed.status_code, failed["X-Usage-Cost"]) == (503, "0")
    assert not ProxyReplay.objects.exists()
    ProxyReplay.objects.create(agreement_id=active.agreement_id, request_nonce="failed-0", request_fingerprint="f",
                               status_code=503, body=b'{"error": "overloaded"}')
    ProxyReplay.objects.update(created_at=timezone.now() - timedelta(days=8))

    assert tasks.purge_proxy_replays() == 1
    assert not ProxyReplay.objects.exists()
    # The nonce may be used again: nothing was charged for it, and the call is charged once now.
    http_server.responses.append((200, {"n": 1}))
    retried = active.buyer_api.get(f"{active.proxy}/x", headers={"X-Request-Nonce": "failed-1"})
    assert retried.status_code == 200 and retried["X-Usage-Cost"] == "20000"
    again = active.buyer_api.get(f"{active.proxy}/x", headers={"X-Request-Nonce": "failed-1"})
    assert (again.status_code, again["X-Replayed"]) == (200, "true")
    assert len(http_server.requests) == 2
    assert UsageAgreement.objects.get(pk=active.agreement_id).used == 20_000


def test_the_purge_deletes_a_bounded_batch_per_statement_and_keeps_what_is_within_the_retention(active, settings):
    settings.PROXY_REPLAY_KEEP_DAYS = 7
    old, recent = timezone.now() - timedelta(days=8), timezone.now() - timedelta(days=6)
    for n, created_at in enumerate([old, old, old, recent, old]):  # ids roughly in time order, not exactly
        ProxyReplay.objects.create(agreement_id=active.agreement_id, request_nonce=f"n{n}", request_fingerprint="f",
                                   status_code=503)
        ProxyReplay.objects.filter(request_nonce=f"n{n}").update(created_at=created_at)
    ProxyReplay.objects.create(agreement_id=active.agreement_id, request_nonce="running", request_fingerprint="f")
    ProxyReplay.objects.filter(request_nonce="running").update(created_at=old)  # its call is not settled yet

    settings.RETENTION_PURGE_BATCH = 2
    assert services.proxy_replays_purge() == 4
    assert sorted(ProxyReplay.objects.values_list("request_nonce", flat=True)) == ["n3", "running"]


def test_the_purge_goes_on_past_the_kept_replies_of_open_agreements_a_bounded_batch_a_run(active, settings):
    """The purge deleted everything due in one run, however large the backlog (a worker held until the task's time
    limit); bounded but started from the first row at each run, it read the same kept replies of open agreements
    every time and never reached the deletable ones after them. A run reads a bounded number of rows from where the
    last one ended, and the pass starts again from the first once it reaches the replies within their retention."""
    settings.PROXY_REPLAY_KEEP_DAYS = 7
    settings.RETENTION_PURGE_BATCH, settings.RETENTION_PURGE_BATCHES_PER_RUN = 2, 1
    old = timezone.now() - timedelta(days=8)
    staged = [("kept-0", None, old), ("kept-1", None, old), ("kept-2", None, old), ("kept-3", None, old),
              ("failed-0", 503, old), ("failed-1", 503, old), ("recent", 503, timezone.now())]
    for nonce, status_code, created_at in staged:  # in id order: the kept ones first
        ProxyReplay.objects.create(agreement_id=active.agreement_id, request_nonce=nonce, request_fingerprint="f",
                                   status_code=status_code)
        ProxyReplay.objects.filter(request_nonce=nonce).update(created_at=created_at)

    assert [tasks.purge_proxy_replays() for _ in range(5)] == [0, 0, 2, 0, 0]
    assert sorted(ProxyReplay.objects.values_list("request_nonce", flat=True)) == [
        "kept-0", "kept-1", "kept-2", "kept-3", "recent"]
