import contextlib
import gzip
import json
import socket
import threading
import time
import tracemalloc
import uuid
from collections import deque
from datetime import timedelta
from http.server import BaseHTTPRequestHandler

import pytest
from django.utils import timezone

from agreements import webhooks
from agreements.models import DeliveryStatus, WebhookDelivery, WebhookSubscription
from agreements.tasks import deliver_webhook, purge_webhook_deliveries, retry_due_webhooks
from sdk import webhook_signature
from tests.agreements.helpers import proposal
from tests.catalog.factories import AgentFactory, issue_key
from tests.conftest import Api, codes_at, error_code
from tests.support.db_activity import backend_pid, session_state
from tests.support.http_server import DribblesItsHead, serving
from tests.support.idempotency import records_hold

pytestmark = pytest.mark.django_db


def subscribe(api, url, **extra) -> dict:
    response = api.post("/webhooks", {"url": url, **extra})
    assert response.status_code == 201, response.content
    return response.json()


def test_events_are_delivered_signed_after_commit(buyer_api, seller_api, service, http_server,
                                                  django_capture_on_commit_callbacks):
    subscription = subscribe(seller_api, f"{http_server.url}/hooks")
    assert subscription["secret"].startswith("whsec_")
    assert "secret" not in seller_api.get("/webhooks").json()[0]

    with django_capture_on_commit_callbacks(execute=True) as callbacks:
        agreement = buyer_api.post("/usage-agreements", proposal(service)).json()
        assert http_server.requests == []  # nothing leaves before the transaction commits
    assert callbacks

    [request] = http_server.requests
    body = json.loads(request.body)
    assert body["type"] == "agreement.proposed"
    assert body["data"]["agreement_id"] == agreement["id"]
    assert request.headers["Marketplace-Event-Id"] == body["id"]
    header = request.headers["Marketplace-Signature"]
    assert webhook_signature.verify(subscription["secret"], request.body, header)
    assert not webhook_signature.verify("whsec_wrong", request.body, header)
    assert not webhook_signature.verify(subscription["secret"], request.body + b" ", header)
    stale_time = int(header.split(",")[0][2:]) + 301
    assert not webhook_signature.verify(subscription["secret"], request.body, header, now=stale_time)

    log = seller_api.get(f"/webhooks/{subscription['id']}/deliveries").json()["results"]
    assert log[0]["status"] == "delivered" and log[0]["attempts"] == 1


def test_failed_deliveries_are_retried_with_backoff(buyer_api, seller_api, service, http_server,
                                                    django_capture_on_commit_callbacks):
    subscribe(seller_api, http_server.url, event_types=["agreement.proposed"])
    http_server.responses.extend([(500, {}), (503, {})])
    with django_capture_on_commit_callbacks(execute=True):
        buyer_api.post("/usage-agreements", proposal(service))
    delivery = WebhookDelivery.objects.get()
    assert (delivery.status, delivery.attempts, delivery.last_status_code) == (DeliveryStatus.PENDING, 1, 500)
    assert delivery.next_attempt_at > timezone.now() + timedelta(seconds=5)

    assert retry_due_webhooks() == 0  # not due yet
    for expected_attempts in (2, 3):
        WebhookDelivery.objects.update(next_attempt_at=timezone.now(), queued_at=None)  # its message lost
        with django_capture_on_commit_callbacks(execute=True):
            retry_due_webhooks()
        delivery.refresh_from_db()
        assert delivery.attempts == expected_attempts
    assert delivery.status == DeliveryStatus.DELIVERED
    assert len(http_server.requests) == 3
    assert len({r.headers["Marketplace-Event-Id"] for r in http_server.requests}) == 1  # receivers can dedupe


def test_delivery_gives_up_after_max_attempts(buyer_api, seller_api, service, settings,
                                              django_capture_on_commit_callbacks):
    settings.WEBHOOK_MAX_ATTEMPTS = 2
    subscribe(seller_api, "http://127.0.0.1:9/unreachable")
    with django_capture_on_commit_callbacks(execute=True):
        buyer_api.post("/usage-agreements", proposal(service))
    WebhookDelivery.objects.update(next_attempt_at=timezone.now(), queued_at=None)  # its message lost
    with django_capture_on_commit_callbacks(execute=True):
        retry_due_webhooks()
    delivery = WebhookDelivery.objects.get()
    assert delivery.status == DeliveryStatus.FAILED and delivery.attempts == 2
    assert "ConnectError" in delivery.last_error


def test_event_type_filter_and_unsubscribe(buyer_api, seller_api, service, http_server,
                                           django_capture_on_commit_callbacks):
    subscription = subscribe(seller_api, http_server.url, event_types=["agreement.accepted"])
    with django_capture_on_commit_callbacks(execute=True):
        agreement = buyer_api.post("/usage-agreements", proposal(service)).json()
        seller_api.put(f"/usage-agreements/{agreement['id']}/accept")
    assert [json.loads(r.body)["type"] for r in http_server.requests] == ["agreement.accepted"]
    assert seller_api.delete(f"/webhooks/{subscription['id']}").status_code == 204
    assert seller_api.get("/webhooks").json() == []


@pytest.mark.parametrize("stopped_by", ["deleting", "pausing"])
def test_a_deleted_or_paused_subscription_gets_none_of_its_pending_retries(
        buyer_api, seller_api, seller, service, http_server, django_capture_on_commit_callbacks, stopped_by):
    subscription = subscribe(seller_api, http_server.url, event_types=["agreement.proposed"])
    http_server.responses.append((503, {}))
    with django_capture_on_commit_callbacks(execute=True):
        buyer_api.post("/usage-agreements", proposal(service))
    delivery = WebhookDelivery.objects.get()
    assert (delivery.status, delivery.attempts) == (DeliveryStatus.PENDING, 1)  # a retry is due later

    if stopped_by == "deleting":
        assert seller_api.delete(f"/webhooks/{subscription['id']}").status_code == 204
    else:
        paused = seller_api.post(f"/agents/{seller.pk}/webhooks/{subscription['id']}/pause")
        assert paused.status_code == 200, paused.content
    WebhookDelivery.objects.update(next_attempt_at=timezone.now(), queued_at=None)  # its message lost
    with django_capture_on_commit_callbacks(execute=True):
        assert retry_due_webhooks() == 0
    webhooks.delivery_attempt(delivery_id=delivery.pk)  # a task queued before: it sends nothing either
    assert len(http_server.requests) == 1
    delivery.refresh_from_db()
    if stopped_by == "deleting":  # ended, saying why, not pending for ever
        assert (delivery.status, delivery.last_error) == (DeliveryStatus.FAILED, "the subscription was deleted")
    else:
        assert delivery.status == DeliveryStatus.PENDING

    if stopped_by == "pausing":  # resumed: the retry goes out
        assert seller_api.post(f"/agents/{seller.pk}/webhooks/{subscription['id']}/resume").status_code == 200
        with django_capture_on_commit_callbacks(execute=True):
            retry_due_webhooks()
        assert len(http_server.requests) == 2
        assert WebhookDelivery.objects.get().status == DeliveryStatus.DELIVERED


class _DripsItsAnswer(BaseHTTPRequestHandler):
    """Answers 200, then a byte of body every half second for 8 s: never a read timeout."""

    protocol_version = "HTTP/1.1"

    def do_POST(self):
        self.rfile.read(int(self.headers.get("Content-Length") or 0))
        self.send_response(200)
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        deadline = time.monotonic() + 8
        try:
            while time.monotonic() < deadline:
                self.wfile.write(b"1\r\n \r\n")
                self.wfile.flush()
                time.sleep(0.5)
            self.wfile.write(b"0\r\n\r\n")
        except OSError:
            pass  # the client hung up

    def log_message(self, *args):
        pass


def _timed_delivery(buyer_api, seller_api, service, capture, receiver) -> float:
    """Seconds one attempt took to deliver an `agreement.proposed` to the `receiver` server."""
    with serving(receiver) as url:
        subscribe(seller_api, url, event_types=["agreement.proposed"])
        with capture(execute=False):
            buyer_api.post("/usage-agreements", proposal(service))
        started = time.monotonic()
        webhooks.delivery_attempt(delivery_id=WebhookDelivery.objects.get().pk)
        return time.monotonic() - started


def test_a_receiver_dripping_its_answer_does_not_hold_the_worker(buyer_api, seller_api, service, settings,
                                                                 django_capture_on_commit_callbacks):
    """Only the status is used: the answer's body is never read, so a receiver cannot hold the worker past the
    timeout (and the delivery's lease, WEBHOOK_TIMEOUT_SECONDS + 30 s) by dripping it."""
    settings.WEBHOOK_TIMEOUT_SECONDS = 1.0
    elapsed = _timed_delivery(buyer_api, seller_api, service, django_capture_on_commit_callbacks, _DripsItsAnswer)
    assert elapsed < 4, f"the delivery took {elapsed:.1f} s with WEBHOOK_TIMEOUT_SECONDS=1"
    assert WebhookDelivery.objects.get().status == DeliveryStatus.DELIVERED


def test_a_receiver_dribbling_its_answer_head_is_cut_off_at_the_webhook_timeout(
        buyer_api, seller_api, service, settings, django_capture_on_commit_callbacks):
    """WEBHOOK_TIMEOUT_SECONDS bounded each read only: a receiver sending its head a byte at a time held the worker
    (and the settlement tasks queued behind it) for as long as it liked."""
    settings.WEBHOOK_TIMEOUT_SECONDS = 0.5
    elapsed = _timed_delivery(buyer_api, seller_api, service, django_capture_on_commit_callbacks, DribblesItsHead)
    assert elapsed < 1.5, f"the delivery took {elapsed:.1f} s with WEBHOOK_TIMEOUT_SECONDS=0.5"
    delivery = WebhookDelivery.objects.get()
    assert (delivery.status, delivery.attempts, delivery.last_status_code) == (DeliveryStatus.PENDING, 1, None)
    assert delivery.last_error == "ReadTimeout: the exchange took longer than its 0.5 s in all"


def test_a_receivers_gzip_bomb_answer_is_not_read(buyer_api, seller_api, service, http_server,
                                                  django_capture_on_commit_callbacks):
    bomb = gzip.compress(bytes(64 << 20), compresslevel=1)  # ~64 kB on the wire, 64 MiB decoded
    http_server.responses.append((200, bomb, 0, {"Content-Encoding": "gzip"}))
    subscribe(seller_api, http_server.url, event_types=["agreement.proposed"])
    with django_capture_on_commit_callbacks(execute=False):
        buyer_api.post("/usage-agreements", proposal(service))
    tracemalloc.start()
    try:
        webhooks.delivery_attempt(delivery_id=WebhookDelivery.objects.get().pk)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 8 << 20, f"posting one webhook held {peak / 2**20:.0f} MiB"
    assert WebhookDelivery.objects.get().status == DeliveryStatus.DELIVERED


@pytest.mark.parametrize("route", ["/webhooks", "/agents/{agent}/webhooks"])
def test_a_replayed_subscription_answers_the_secret_no_record_keeps_until_it_is_rotated(seller, seller_api,
                                                                                        http_server, route):
    """The stored answer of an `Idempotency-Key` subscription kept its signing secret in clear; a replay now reads
    it from the subscription, while it is still the one issued."""
    path, headers = route.format(agent=seller.pk), {"Idempotency-Key": "subscribe-once"}
    first = seller_api.post(path, {"url": http_server.url}, headers=headers)
    assert first.status_code == 201, first.content
    issued = first.json()["secret"]
    assert issued and not records_hold(issued)

    replay = seller_api.post(path, {"url": http_server.url}, headers=headers)
    assert replay.status_code == 201 and replay["Idempotent-Replayed"] == "true"
    assert replay.json() == first.json() and "Idempotent-Secret-Withheld" not in replay
    assert WebhookSubscription.objects.count() == 1

    rotated = seller_api.post(f"/agents/{seller.pk}/webhooks/{first.json()['id']}/rotate",
                              {"previous_secret_valid_for_seconds": 0})
    assert rotated.status_code == 200, rotated.content
    after = seller_api.post(path, {"url": http_server.url}, headers=headers)
    assert after.status_code == 201 and after.json() == {**first.json(), "secret": None}
    assert after["Idempotent-Secret-Withheld"] == "replaced"
    assert not records_hold(issued) and not records_hold(rotated.json()["secret"])


@pytest.mark.parametrize("route", ["/webhooks", "/agents/{agent}/webhooks"])
def test_a_deleted_subscriptions_secret_is_erased_and_its_creations_replay_answers_none(seller, seller_api,
                                                                                      http_server, route):
    """A deleted subscription signs nothing more, so it keeps no secret: not in its row, not in a replay of the
    request that created it."""
    path, headers = route.format(agent=seller.pk), {"Idempotency-Key": "subscribe-once"}
    first = seller_api.post(path, {"url": http_server.url}, headers=headers)
    assert first.status_code == 201, first.content
    assert seller_api.delete(f"/webhooks/{first.json()['id']}").status_code == 204

    replay = seller_api.post(path, {"url": http_server.url}, headers=headers)
    assert replay.status_code == 201 and replay["Idempotent-Replayed"] == "true"
    assert replay.json() == {**first.json(), "secret": None} and replay["Idempotent-Secret-Withheld"] == "deleted"
    assert WebhookSubscription.objects.filter(pk=first.json()["id"]).values_list("secret", flat=True).get() == ""


def test_deleting_a_subscription_during_a_rotations_overlap_erases_the_replaced_secret_too(seller, seller_api,
                                                                                          http_server):
    subscription = subscribe(seller_api, http_server.url)
    rotated = seller_api.post(f"/agents/{seller.pk}/webhooks/{subscription['id']}/rotate",
                              {"previous_secret_valid_for_seconds": 600})
    assert rotated.status_code == 200, rotated.content
    assert seller_api.delete(f"/webhooks/{subscription['id']}").status_code == 204
    stored = WebhookSubscription.objects.get(pk=subscription["id"])
    assert (stored.is_active, stored.secret, stored.previous_secret, stored.previous_secret_expires_at) == (
        False, "", "", None)


def test_webhook_validation(seller_api, buyer_api):
    assert "invalid" in codes_at(seller_api.post("/webhooks", {"url": "nope"}), "url")
    assert "invalid_choice" in codes_at(seller_api.post("/webhooks", {"url": "https://x.io",
                                                                     "event_types": ["bogus"]}), "event_types")
    assert buyer_api.post("/webhooks", {"url": "https://x.io"}).status_code == 403  # needs the admin scope


@pytest.mark.django_db(transaction=True)
def test_no_lock_or_transaction_is_held_while_posting(buyer_api, seller_api, service, http_server):
    subscribe(seller_api, http_server.url, event_types=["agreement.proposed"])
    http_server.responses.append((200, {}, 1.0))  # a slow receiver
    pid = backend_pid()
    seen = []

    def look_while_the_receiver_answers():
        deadline = time.monotonic() + 10
        while not http_server.requests and time.monotonic() < deadline:
            time.sleep(0.02)
        seen.append(session_state(pid))

    watcher = threading.Thread(target=look_while_the_receiver_answers)
    watcher.start()
    buyer_api.post("/usage-agreements", proposal(service))  # delivered after commit, in this process
    watcher.join()
    assert seen and seen[0] != "idle in transaction"
    assert WebhookDelivery.objects.get().status == DeliveryStatus.DELIVERED


def test_an_agent_keeps_at_most_the_limits_webhook_subscriptions_so_one_event_is_not_sent_to_a_url_without_bound(
        seller, seller_api, settings):
    """Each live subscription gets its own post of every event and of every test send: without a bound, one agent
    subscribing a victim's URL a thousand times made one `webhooks/test` call a thousand posts to it (each retried)."""
    settings.WEBHOOK_SUBSCRIPTIONS_PER_AGENT = 3
    first = subscribe(seller_api, "https://victim.example/hook")
    subscribe(seller_api, "https://victim.example/hook")
    assert seller_api.post(f"/agents/{seller.pk}/webhooks", {"url": "https://victim.example/hook"}).status_code == 201

    for route in ("/webhooks", f"/agents/{seller.pk}/webhooks"):
        refused = seller_api.post(route, {"url": "https://victim.example/hook"})
        assert refused.status_code == 409, refused.content
        assert error_code(refused) == "webhook_limit_reached"
        assert refused.json()["error"]["details"] == {"max_subscriptions": 3}
    assert WebhookSubscription.objects.filter(agent=seller).count() == 3
    sent = seller_api.post(f"/agents/{seller.pk}/webhooks/test")
    assert sent.status_code == 202 and len(sent.json()) == 3

    # A deleted subscription frees its place.
    assert seller_api.delete(f"/webhooks/{first['id']}").status_code == 204
    subscribe(seller_api, "https://receiver.example/hook")


@pytest.mark.parametrize("url", ["ftp://receiver.example/hook", "ftps://receiver.example/hook"])
def test_a_webhook_address_is_http_or_https(seller, seller_api, url):
    """URLField takes ftp too: such a subscription was saved, and every delivery to it failed (httpx speaks no ftp)."""
    for route in ("/webhooks", f"/agents/{seller.pk}/webhooks"):
        assert "invalid_url_scheme" in codes_at(seller_api.post(route, {"url": url}), "url"), route
    assert not WebhookSubscription.objects.exists()


def test_a_deleted_subscriptions_delivery_is_not_replayed_into_a_pending_that_never_goes(
        buyer_api, seller_api, seller, service, http_server, django_capture_on_commit_callbacks):
    """A replay made the delivery pending again, and the sweep sends nothing of a deleted subscription: it stayed
    pending for ever, its log saying it was queued."""
    subscription = subscribe(seller_api, http_server.url, event_types=["agreement.proposed"])
    with django_capture_on_commit_callbacks(execute=True):
        buyer_api.post("/usage-agreements", proposal(service))
    delivery = WebhookDelivery.objects.get()
    assert seller_api.delete(f"/webhooks/{subscription['id']}").status_code == 204

    refused = seller_api.post(f"/agents/{seller.pk}/webhooks/deliveries/{delivery.pk}/replay")
    assert refused.status_code == 409, refused.content
    assert error_code(refused) == "webhook_subscription_deleted"
    delivery.refresh_from_db()
    assert (delivery.status, delivery.attempts) == (DeliveryStatus.DELIVERED, 1)


def test_an_events_data_is_the_same_in_the_inbox_as_in_its_webhook(buyer_api, seller_api, seller, service,
                                                                  http_server, django_capture_on_commit_callbacks):
    """One event id, one body: the inbox gave an event's `status` as the agreement's current one, so a poller read
    `agreement.proposed` of an accepted agreement as `status: accepted`, unlike its webhook."""
    subscribe(seller_api, http_server.url, event_types=["agreement.proposed"])
    with django_capture_on_commit_callbacks(execute=True):
        agreement = buyer_api.post("/usage-agreements", proposal(service)).json()
        assert seller_api.put(f"/usage-agreements/{agreement['id']}/accept").status_code == 200
    [request] = http_server.requests
    sent = json.loads(request.body)
    [proposed] = [event for event in seller_api.get(f"/agents/{seller.pk}/events").json()
                  if event["event_id"] == sent["id"]]
    assert proposed["payload"] == sent["data"]


@pytest.mark.parametrize("url", ["http://\u2603.example/hook", "http://\uff41\uff42\uff43.example/hook",
                                 "http://xn--zz.example/hook"])
def test_a_webhook_address_whose_host_is_no_idna_name_is_refused(seller, seller_api, url):
    """URLField takes any character above U+00A0 in a host name; the HTTP client refuses those IDNA forbids
    (a snowman, full-width letters, a bad punycode label) only when it sends: saved, every delivery then crashed."""
    for route in ("/webhooks", f"/agents/{seller.pk}/webhooks"):
        refused = seller_api.post(route, {"url": url})
        assert refused.status_code == 400, refused.content
        assert error_code(refused) == "invalid_url"
    assert subscribe(seller_api, "http://ex\u00e4mple.com/hook")["url"] == "http://ex\u00e4mple.com/hook"


@pytest.mark.parametrize("host", ["\u2603.example", "xn--zz.example"])
def test_a_delivery_to_an_address_saved_before_it_was_checked_fails_as_an_attempt(
        buyer_api, seller, service, django_capture_on_commit_callbacks, host):
    """Such an address raised out of the task (InvalidURL, IDNAError: no HTTPError) with the attempt claimed: the
    delivery stayed pending, each sweep sending it again past WEBHOOK_MAX_ATTEMPTS, for ever."""
    WebhookSubscription.objects.create(agent=seller, url=f"http://{host}/hook", secret="whsec_saved_before")
    with django_capture_on_commit_callbacks(execute=False):
        buyer_api.post("/usage-agreements", proposal(service))
    delivery = WebhookDelivery.objects.get()
    webhooks.delivery_attempt(delivery_id=delivery.pk)
    delivery.refresh_from_db()
    assert (delivery.status, delivery.attempts) == (DeliveryStatus.PENDING, 1)
    assert delivery.last_error.startswith(("InvalidURL: ", "IDNAError: ")), delivery.last_error


def test_a_delivery_whose_every_attempt_died_unrecorded_is_given_up_at_the_max_attempts(
        buyer_api, seller_api, service, http_server, settings, django_capture_on_commit_callbacks):
    """`attempts` counts the claims; only an attempt that ends writes whether to give up. One whose worker died (or
    whose post raised) wrote nothing, and the sweep claimed it again when its lease ran out, past the limit, for as
    long as that went on."""
    settings.WEBHOOK_MAX_ATTEMPTS = 3
    subscribe(seller_api, http_server.url, event_types=["agreement.proposed"])
    with django_capture_on_commit_callbacks(execute=False):
        buyer_api.post("/usage-agreements", proposal(service))
    # As three workers that died mid-post leave it: claimed three times, its lease over, no outcome written.
    WebhookDelivery.objects.update(attempts=3, next_attempt_at=timezone.now())

    with django_capture_on_commit_callbacks(execute=True):
        retry_due_webhooks()
    assert http_server.requests == []
    delivery = WebhookDelivery.objects.get()
    assert (delivery.status, delivery.attempts) == (DeliveryStatus.FAILED, 3)
    assert delivery.last_error == "gave up after 3 attempts, the last with no outcome recorded"


def test_a_test_send_adds_no_post_to_a_subscription_whose_last_test_is_still_being_tried(
        seller, seller_api, http_server, django_capture_on_commit_callbacks):
    """Each test send queued a post to every subscription, each retried up to WEBHOOK_MAX_ATTEMPTS times for the
    receiver's whole timeout: with the sends' budget per key (and 25 keys), one agent kept a receiver that never
    answers, and the outbound workers every tenant's webhooks wait on, busy without bound."""
    subscribe(seller_api, http_server.url)
    http_server.responses.append((503, {}))
    with django_capture_on_commit_callbacks(execute=True):
        first = seller_api.post(f"/agents/{seller.pk}/webhooks/test")
    assert first.status_code == 202 and [d["status"] for d in first.json()] == ["pending"]  # a retry is due

    with django_capture_on_commit_callbacks(execute=True):
        again = seller_api.post(f"/agents/{seller.pk}/webhooks/test")
    assert again.status_code == 202 and again.json() == []
    assert len(http_server.requests) == 1 and WebhookDelivery.objects.count() == 1

    WebhookDelivery.objects.update(next_attempt_at=timezone.now(), queued_at=None)  # its message lost
    with django_capture_on_commit_callbacks(execute=True):
        retry_due_webhooks()  # delivered: the next test send goes out
        assert len(seller_api.post(f"/agents/{seller.pk}/webhooks/test").json()) == 1
    assert len(http_server.requests) == 3


def test_a_pending_delivery_is_not_replayed(buyer_api, seller_api, seller, service, http_server,
                                            django_capture_on_commit_callbacks):
    """A replay reset a pending delivery's attempts and queued a post at once: replayed again and again, one delivery
    to a receiver that never answers was posted without end, each post holding an outbound worker its timeout."""
    subscribe(seller_api, http_server.url, event_types=["agreement.proposed"])
    http_server.responses.append((503, {}))
    with django_capture_on_commit_callbacks(execute=True):
        buyer_api.post("/usage-agreements", proposal(service))
    delivery = WebhookDelivery.objects.get()
    assert (delivery.status, delivery.attempts) == (DeliveryStatus.PENDING, 1)

    with django_capture_on_commit_callbacks(execute=True):
        refused = seller_api.post(f"/agents/{seller.pk}/webhooks/deliveries/{delivery.pk}/replay")
    assert refused.status_code == 409, refused.content
    assert error_code(refused) == "webhook_delivery_pending"
    assert len(http_server.requests) == 1
    delivery.refresh_from_db()
    assert (delivery.status, delivery.attempts) == (DeliveryStatus.PENDING, 1)


@pytest.mark.parametrize("status", [301, 302, 303, 307, 308])
def test_a_receivers_redirect_is_a_failed_attempt_not_followed(buyer_api, seller_api, service, http_server,
                                                               django_capture_on_commit_callbacks, status):
    """A redirect would take the signed post to an address the guard never saw when the URL was saved (the metadata
    service, say): it is not followed."""
    from tests.support.http_server import RecordingServer

    elsewhere = RecordingServer().start()
    try:
        subscribe(seller_api, http_server.url, event_types=["agreement.proposed"])
        http_server.responses.append((status, {}, 0, {"Location": f"{elsewhere.url}/inside"}))
        with django_capture_on_commit_callbacks(execute=True):
            buyer_api.post("/usage-agreements", proposal(service))
        assert elsewhere.requests == [] and len(http_server.requests) == 1
    finally:
        elsewhere.stop()
    delivery = WebhookDelivery.objects.get()
    assert (delivery.status, delivery.last_status_code, delivery.last_error) == (
        DeliveryStatus.PENDING, status, f"HTTP {status}")


class _NeverAnswers:
    """A receiver on `host` that takes every connection and never answers: each post to it holds its worker for
    WEBHOOK_TIMEOUT_SECONDS. Each connection it takes is noted in `arrivals`."""

    def __init__(self, host: str, arrivals: list):
        self.listener = socket.create_server((host, 0))
        self.url = f"http://{host}:{self.listener.getsockname()[1]}/hook"
        self.held = []
        threading.Thread(target=self._take, args=(arrivals,), daemon=True).start()

    def _take(self, arrivals: list) -> None:
        while True:
            try:
                connection, _ = self.listener.accept()
            except OSError:
                return
            self.held.append(connection)
            arrivals.append(self.url)

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.listener.shutdown(socket.SHUT_RDWR)
        self.listener.close()
        for connection in self.held:
            connection.close()


def _outbound_workers(queue: deque, *, workers: int) -> None:
    """`workers` outbound workers running the queue's deliver_webhook messages in order until it is empty."""
    from django.db import connection

    def work():
        try:
            while True:
                try:
                    delivery_id = queue.popleft()
                except IndexError:
                    return
                deliver_webhook(delivery_id)
        finally:
            connection.close()

    threads = [threading.Thread(target=work) for _ in range(workers)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)


@pytest.mark.django_db(transaction=True)
@pytest.mark.parametrize("receivers, per_host, per_tenant", [
    ("one host", 1, 0),  # the receiving host's share alone keeps the other agent's delivery from waiting
    ("a host each", 0, 1),  # the attacking tenant's share alone, however many hosts it points at
])
def test_an_agents_receivers_that_never_answer_do_not_hold_every_outbound_worker_from_another_agents_delivery(
        buyer, buyer_api, seller_api, service, settings, monkeypatch, receivers, per_host, per_tenant):
    """The outbound workers took deliveries first come first served: a tenant whose four subscriptions point at
    receivers that never answer had the two workers posting to them for WEBHOOK_TIMEOUT_SECONDS each, twice over,
    before another agent's delivery, queued behind, was posted. Now an attempt beyond its receiving host's or its
    owner's share in flight is put off (not counted as an attempt) and the worker goes on with the next message."""
    settings.WEBHOOK_TIMEOUT_SECONDS = 0.5
    settings.WEBHOOK_ATTEMPTS_IN_FLIGHT_PER_HOST = per_host
    settings.WEBHOOK_ATTEMPTS_IN_FLIGHT_PER_OWNER = per_tenant
    arrivals = []

    class Answers(BaseHTTPRequestHandler):
        def do_POST(self):
            self.rfile.read(int(self.headers.get("Content-Length") or 0))
            arrivals.append("victim")
            self.send_response(204)
            self.end_headers()

        def log_message(self, *args):
            pass

    hosts = ["127.0.0.2"] * 4 if receivers == "one host" else ["127.0.0.2", "127.0.0.3", "127.0.0.4", "127.0.0.5"]
    silent = [_NeverAnswers(host, arrivals) for host in dict.fromkeys(hosts)]
    queue = deque()
    monkeypatch.setattr(deliver_webhook, "apply_async", lambda args, countdown=0, **_: queue.append(args[0]))
    try:
        with serving(Answers) as victim_url:
            for host in hosts:
                subscribe(seller_api, next(each.url for each in silent if f"//{host}:" in each.url),
                          event_types=["agreement.proposed"])
            subscribe(Api(issue_key(buyer, scope="admin")), victim_url, event_types=["agreement.proposed"])
            assert buyer_api.post("/usage-agreements", proposal(service)).status_code == 201
            victims = set(WebhookDelivery.objects.filter(subscription__agent=buyer).values_list("pk", flat=True))
            queue = deque(sorted(queue, key=lambda pk: pk in {str(v) for v in victims}))  # the attacker's first
            assert len(queue) == 5
            _outbound_workers(queue, workers=2)
    finally:
        for each in silent:
            each.close()

    assert "victim" in arrivals
    assert arrivals.index("victim") == 1, arrivals  # one attacker post under way, not four
    assert WebhookDelivery.objects.get(pk__in=victims).status == DeliveryStatus.DELIVERED
    put_off = WebhookDelivery.objects.exclude(pk__in=victims).filter(attempts=0)
    assert put_off.count() == 3  # not counted as attempts, still pending, due again shortly
    assert {d.status for d in put_off} == {DeliveryStatus.PENDING}
    assert all(d.next_attempt_at > timezone.now() for d in put_off)
    swept = []  # their messages are queued again: once due, the sweep adds none beside them
    monkeypatch.setattr(deliver_webhook, "delay", swept.append)
    webhooks.deliveries_retry_due(now=timezone.now() + timedelta(seconds=30))
    assert not {str(d.pk) for d in put_off} & set(swept)


def test_the_retry_sweep_queues_a_due_delivery_again_only_once_its_message_may_be_lost_and_the_longest_due_first(
        seller, seller_api, http_server, settings, monkeypatch, django_capture_on_commit_callbacks):
    """The sweep (every 30 s) queued every due delivery again on each run, whether or not its message still waited
    in the queue: with the outbound workers behind, the queue grew by the same deliveries every run (up to 500 a
    run), and its first 500, in no order, could be the same rows each time while the others waited."""
    settings.WEBHOOK_REQUEUE_AFTER_SECONDS = 120
    monkeypatch.setattr(webhooks, "RETRY_SWEEP_BATCH", 2, raising=False)
    for _ in range(3):
        subscribe(seller_api, http_server.url)
    with django_capture_on_commit_callbacks(execute=False):  # their messages lost
        seller_api.post(f"/agents/{seller.pk}/webhooks/test")
    oldest, older, newest = WebhookDelivery.objects.all()
    now = timezone.now()
    for index, delivery in enumerate((oldest, older, newest)):
        WebhookDelivery.objects.filter(pk=delivery.pk).update(next_attempt_at=now - timedelta(seconds=10 - index))
    queued = []
    monkeypatch.setattr(deliver_webhook, "delay", queued.append)  # the queue, its workers behind

    assert webhooks.deliveries_retry_due(now=now) == 2
    assert queued == [str(oldest.pk), str(older.pk)]
    assert webhooks.deliveries_retry_due(now=now + timedelta(seconds=30)) == 1  # the next run: the one left
    assert webhooks.deliveries_retry_due(now=now + timedelta(seconds=60)) == 0  # theirs wait in the queue
    assert queued == [str(oldest.pk), str(older.pk), str(newest.pk)]

    deliver_webhook(str(oldest.pk))  # a worker takes one: delivered
    later = now + timedelta(seconds=30 + 121)  # the others' messages not taken in all that time: lost, queued again
    assert webhooks.deliveries_retry_due(now=later) == 2
    assert queued[3:] == [str(older.pk), str(newest.pk)]
    assert len(http_server.requests) == 1
def test_ended_deliveries_are_deleted_past_their_retention_and_their_events_stay_in_the_inbox(
        buyer_api, seller_api, seller, service, http_server, settings, django_capture_on_commit_callbacks):
    """Each event made one delivery (its payload) per subscription, and test sends one each, kept for ever once
    delivered or given up."""
    settings.WEBHOOK_DELIVERY_KEEP_DAYS = 30
    subscription = subscribe(seller_api, http_server.url)
    with django_capture_on_commit_callbacks(execute=True):
        buyer_api.post("/usage-agreements", proposal(service))  # delivered
    http_server.responses.append((503, {}))
    with django_capture_on_commit_callbacks(execute=True):
        seller_api.post(f"/agents/{seller.pk}/webhooks/test")  # pending: its retry is due
    delivered = WebhookDelivery.objects.get(status=DeliveryStatus.DELIVERED)
    pending = WebhookDelivery.objects.get(status=DeliveryStatus.PENDING)
    failed = WebhookDelivery.objects.create(subscription_id=subscription["id"], event_type="test", payload={},
                                            status=DeliveryStatus.FAILED, next_attempt_at=timezone.now())
    long_ago = timezone.now() - timedelta(days=31)
    WebhookDelivery.objects.filter(pk__in=[delivered.pk, failed.pk]).update(next_attempt_at=long_ago)
    WebhookDelivery.objects.filter(pk=pending.pk).update(next_attempt_at=long_ago)  # retried however late

    assert purge_webhook_deliveries() == 2
    assert list(WebhookDelivery.objects.values_list("pk", flat=True)) == [pending.pk]
    assert purge_webhook_deliveries() == 0  # safe to run twice
    [event] = seller_api.get(f"/agents/{seller.pk}/events").json()
    assert event["type"] == "agreement.proposed"


def test_ended_deliveries_within_their_retention_are_kept(buyer_api, seller_api, service, http_server, settings,
                                                          django_capture_on_commit_callbacks):
    settings.WEBHOOK_DELIVERY_KEEP_DAYS = 30
    subscribe(seller_api, http_server.url)
    with django_capture_on_commit_callbacks(execute=True):
        buyer_api.post("/usage-agreements", proposal(service))
    WebhookDelivery.objects.update(next_attempt_at=timezone.now() - timedelta(days=29))
    assert purge_webhook_deliveries() == 0
    assert WebhookDelivery.objects.get().status == DeliveryStatus.DELIVERED


def test_a_deleted_subscription_is_deleted_once_its_deliveries_are_past_their_retention(
        buyer_api, seller_api, service, http_server, settings, django_capture_on_commit_callbacks):
    """A deleted subscription's row (its secrets erased) was kept for ever: an agent creating and deleting
    subscriptions in a loop grew the table at its rate limit."""
    settings.WEBHOOK_DELIVERY_KEEP_DAYS = 30
    deleted, live = subscribe(seller_api, http_server.url), subscribe(seller_api, http_server.url)
    with django_capture_on_commit_callbacks(execute=True):
        buyer_api.post("/usage-agreements", proposal(service))  # one delivery to each
    assert seller_api.delete(f"/webhooks/{deleted['id']}").status_code == 204
    assert purge_webhook_deliveries() == 0  # deleted just now: its deliveries are still listed

    long_ago = timezone.now() - timedelta(days=31)
    WebhookDelivery.objects.update(next_attempt_at=long_ago)
    WebhookSubscription.objects.filter(pk=deleted["id"]).update(deleted_at=long_ago)
    assert purge_webhook_deliveries() == 3  # both deliveries, and the deleted subscription
    assert list(WebhookSubscription.objects.values_list("pk", flat=True)) == [uuid.UUID(live["id"])]
    assert [s["id"] for s in seller_api.get("/webhooks").json()] == [live["id"]]
    assert purge_webhook_deliveries() == 0


@pytest.mark.postgres
@pytest.mark.django_db(transaction=True)
def test_an_event_written_while_its_subscription_is_deleted_is_ended_not_left_pending_for_ever(
        seller, service, http_server, monkeypatch):
    """The event's transaction read the subscription live, its deletion committed (ending the deliveries pending
    then), and the event's delivery was written after: nothing sent it nor ended it, and the purge keeps a pending
    delivery (and so its deleted subscription, URL and all) for ever."""
    from django.db import connections

    buyer_api = Api(issue_key(AgentFactory(is_buyer=True, is_seller=False)))
    seller_api = Api(issue_key(seller, scope="admin"))
    subscription = subscribe(seller_api, http_server.url)
    create = WebhookDelivery.objects.create

    def deleted_meanwhile(**fields):
        def delete():
            try:
                assert seller_api.delete(f"/webhooks/{subscription['id']}").status_code == 204
            finally:
                connections.close_all()

        deleting = threading.Thread(target=delete)
        deleting.start()
        deleting.join()
        return create(**fields)

    monkeypatch.setattr(WebhookDelivery.objects, "create", deleted_meanwhile)
    assert buyer_api.post("/usage-agreements", proposal(service)).status_code == 201
    monkeypatch.undo()
    retry_due_webhooks()

    delivery = WebhookDelivery.objects.get()
    assert (delivery.status, delivery.last_error) == (DeliveryStatus.FAILED, "the subscription was deleted")
    assert http_server.requests == []


@pytest.mark.parametrize("verb", ["pause", "resume"])
def test_pausing_a_subscription_deleted_meanwhile_is_404(seller, seller_api, http_server, deleted_once_read, verb):
    """A DELETE committed between the pause's (or resume's) read of the live subscription and its write: it answered
    200 with the subscription, as though it were still there to pause or resume."""
    subscription = subscribe(seller_api, f"{http_server.url}/hooks")
    if verb == "resume":
        assert seller_api.post(f"/agents/{seller.pk}/webhooks/{subscription['id']}/pause").status_code == 200
    deleted_once_read()
    response = seller_api.post(f"/agents/{seller.pk}/webhooks/{subscription['id']}/{verb}")
    assert response.status_code == 404 and error_code(response) == "webhook_not_found", response.content
    assert not WebhookSubscription.objects.get(pk=subscription["id"]).is_active


@pytest.mark.postgres
@pytest.mark.django_db(transaction=True)
def test_a_replay_racing_its_subscriptions_deletion_leaves_no_delivery_pending(
        seller, service, http_server, monkeypatch):
    """The replay checked the subscription live, its deletion committed (ending the deliveries pending then, not this
    one, delivered), and the replay's write made it pending after: queued for a subscription that sends nothing (the 202 said
    queued), which a worker ended as failed later. The replay holds the subscription's row: the deletion waits for it, then ends it."""
    from django.db import connections

    buyer_api = Api(issue_key(AgentFactory(is_buyer=True, is_seller=False)))
    seller_api = Api(issue_key(seller, scope="admin"))
    subscription = subscribe(seller_api, http_server.url, event_types=["agreement.proposed"])
    assert buyer_api.post("/usage-agreements", proposal(service)).status_code == 201
    delivery = WebhookDelivery.objects.get()
    WebhookDelivery.objects.filter(pk=delivery.pk).update(status=DeliveryStatus.DELIVERED)
    deleting = threading.Thread(target=lambda: (
        seller_api.delete(f"/webhooks/{subscription['id']}"), connections.close_all()))
    filter_deliveries = WebhookDelivery.objects.filter

    def deleted_before_the_write(*args, **kwargs):
        if "status__in" in kwargs and not deleting.is_alive() and deleting.ident is None:
            deleting.start()
            deleting.join(timeout=2)  # done unless it waits for a lock the replay holds
        return filter_deliveries(*args, **kwargs)

    monkeypatch.setattr(WebhookDelivery.objects, "filter", deleted_before_the_write)
    # No worker: the state the two requests leave is what is read (a worker's send ended it failed later).
    monkeypatch.setattr(webhooks, "_send_after_commit", lambda delivery_id: None)
    replayed = seller_api.post(f"/agents/{seller.pk}/webhooks/deliveries/{delivery.pk}/replay")
    monkeypatch.undo()
    deleting.join(timeout=10)

    assert replayed.status_code == 202, replayed.content  # it took the row first; the deletion came after
    assert not WebhookSubscription.objects.get(pk=subscription["id"]).is_active
    delivery.refresh_from_db()
    assert (delivery.status, delivery.last_error) == (DeliveryStatus.FAILED, "the subscription was deleted")


@pytest.mark.postgres
@pytest.mark.django_db(transaction=True)
def test_two_deliveries_of_one_subscription_taken_at_once_are_both_sent(seller, http_server, monkeypatch):
    """A worker's claim of a delivery locked its subscription's row too, skip-locked: the other outbound worker's
    claim of another delivery to the same subscription meanwhile (two events of one commit: 14 and 18 pairs in 20,
    measured with two workers) found it locked and did nothing, the delivery left for the retry sweep (every 30 s).
    The claim locks the delivery alone: one delivery is still never sent by two workers at once."""
    from django.db import connections

    subscription = WebhookSubscription.objects.create(agent=seller, url=f"{http_server.url}/hooks", secret="s")
    first, second = (WebhookDelivery.objects.create(subscription=subscription, event_type="agreement.accepted",
                                                    payload={"id": f"evt_{n}"}, next_attempt_at=timezone.now())
                     for n in (1, 2))
    monkeypatch.setattr(deliver_webhook, "apply_async", lambda *args, **kwargs: None)  # no retry message: no worker
    held = webhooks.outbound_slots.held

    @contextlib.contextmanager
    def the_other_worker_meanwhile(shares, **kwargs):
        if not other.is_alive() and other.ident is None:  # inside the first claim's transaction
            other.start()
            other.join(timeout=10)
        with held(shares, **kwargs) as free:
            yield free

    other = threading.Thread(target=lambda: (deliver_webhook(str(second.pk)), connections.close_all()))
    monkeypatch.setattr(webhooks.outbound_slots, "held", the_other_worker_meanwhile)
    deliver_webhook(str(first.pk))

    assert sorted(WebhookDelivery.objects.values_list("status", flat=True)) == [DeliveryStatus.DELIVERED] * 2
    assert len(http_server.requests) == 2


def test_a_paused_subscription_says_why_and_since_when(owner_api, buyer):
    """An owner listing its agent's subscriptions tells one it paused from one a revocation paused (a thief's,
    made with a stolen credential, which it should delete rather than resume): `paused_reason` is a code,
    `paused_at` the time; both null once resumed."""
    by_key = subscribe(Api(issue_key(buyer, scope="admin")), "https://receiver.example.com/by-key")
    own = owner_api.post(f"/agents/{buyer.pk}/webhooks", {"url": "https://receiver.example.com/own"}).json()
    assert owner_api.post(f"/agents/{buyer.pk}/webhooks/{own['id']}/pause").status_code == 200
    # Paused before its credential is revoked: it keeps its time, and says the revocation.
    paused_at = owner_api.post(f"/agents/{buyer.pk}/webhooks/{by_key['id']}/pause").json()["paused_at"]
    key_id = WebhookSubscription.objects.get(pk=by_key["id"]).created_with_key_id
    revoked = owner_api.post(f"/agents/{buyer.pk}/api-keys/{key_id}/revoke")
    assert revoked.status_code == 200, revoked.content

    listed = {hook["id"]: hook for hook in owner_api.get(f"/agents/{buyer.pk}/webhooks").json()}
    assert (listed[own["id"]]["paused"], listed[own["id"]]["paused_reason"]) == (True, "paused_by_request")
    assert (listed[by_key["id"]]["paused"], listed[by_key["id"]]["paused_reason"]) == (True, "credential_revoked")
    assert listed[by_key["id"]]["paused_at"] == paused_at and listed[own["id"]]["paused_at"] is not None
    # The agent's own list says it too.
    (as_the_agent,) = [hook for hook in Api(issue_key(buyer, scope="admin")).get("/webhooks").json()
                       if hook["id"] == own["id"]]
    assert (as_the_agent["paused"], as_the_agent["paused_reason"]) == (True, "paused_by_request")

    resumed = owner_api.post(f"/agents/{buyer.pk}/webhooks/{by_key['id']}/resume").json()
    assert (resumed["paused"], resumed["paused_reason"], resumed["paused_at"]) == (False, None, None)


def test_a_delivery_put_off_again_and_again_waits_longer_each_time_up_to_a_cap(
        seller, settings, monkeypatch, django_capture_on_commit_callbacks):
    """A delivery beyond its host's or owner's share in flight was put off 5 to 10 s, again and again, for as long
    as the receivers holding the share kept it (a tenant's thousands of deliveries to receivers that never answer:
    each a task, a transaction and a slot check every few seconds, for hours). Each put-off now waits twice the
    last, up to OUTBOUND_PUT_OFF_MAX_SECONDS (then up to twice that, jittered), still not counted as an attempt; a
    replay starts it afresh."""
    settings.WEBHOOK_ATTEMPTS_IN_FLIGHT_PER_HOST, settings.OUTBOUND_PUT_OFF_SECONDS = 1, 5.0
    settings.OUTBOUND_PUT_OFF_MAX_SECONDS = 300
    subscription = WebhookSubscription.objects.create(agent=seller, url="https://receiver.example.com/h", secret="s")
    delivery = WebhookDelivery.objects.create(subscription=subscription, event_type="agreement.accepted",
                                              payload={"id": "evt_1"}, next_attempt_at=timezone.now())
    countdowns = []
    monkeypatch.setattr(deliver_webhook, "apply_async", lambda args, countdown=0, **_: countdowns.append(countdown))
    with webhooks.outbound_slots.held(webhooks._shares(subscription), lease_seconds=60) as held:  # never answering
        assert held
        for _ in range(10):
            WebhookDelivery.objects.filter(pk=delivery.pk).update(next_attempt_at=timezone.now())
            with django_capture_on_commit_callbacks(execute=True):
                deliver_webhook(str(delivery.pk))

    delivery.refresh_from_db()
    assert (delivery.status, delivery.attempts, len(countdowns)) == (DeliveryStatus.PENDING, 0, 10)
    assert all(5 * 2 ** n <= wait <= 10 * 2 ** n for n, wait in enumerate(countdowns[:6])), countdowns
    assert all(300 <= wait <= 600 for wait in countdowns[6:]), countdowns
    assert delivery.next_attempt_at >= timezone.now() + timedelta(seconds=290)
    swept = []  # its message comes back when it is due: the sweep adds none beside it until that may be lost
    monkeypatch.setattr(deliver_webhook, "delay", swept.append)
    assert webhooks.deliveries_retry_due(now=delivery.next_attempt_at + timedelta(seconds=1)) == 0
    lost = delivery.next_attempt_at + timedelta(seconds=settings.WEBHOOK_REQUEUE_AFTER_SECONDS + 1)
    assert webhooks.deliveries_retry_due(now=lost) == 1


def test_a_failed_attempts_retry_is_queued_once_not_again_by_the_sweep_as_it_falls_due(
        buyer_api, seller_api, service, http_server, monkeypatch, settings, django_capture_on_commit_callbacks):
    """A failed attempt queues its retry with the backoff as countdown; the sweep (every 30 s) queued it again as
    it fell due, its message not lost but about to run: two messages for each retry of every failing delivery. The
    sweep adds one only once the retry's message may be lost (WEBHOOK_REQUEUE_AFTER_SECONDS past its due time)."""
    subscribe(seller_api, http_server.url, event_types=["agreement.proposed"])
    http_server.responses.append((500, {}))
    with django_capture_on_commit_callbacks(execute=True):
        buyer_api.post("/usage-agreements", proposal(service))
    delivery = WebhookDelivery.objects.get()
    assert (delivery.status, delivery.attempts) == (DeliveryStatus.PENDING, 1)
    swept = []
    monkeypatch.setattr(deliver_webhook, "delay", swept.append)
    assert webhooks.deliveries_retry_due(now=delivery.next_attempt_at + timedelta(seconds=1)) == 0
    lost = delivery.next_attempt_at + timedelta(seconds=settings.WEBHOOK_REQUEUE_AFTER_SECONDS + 1)
    assert webhooks.deliveries_retry_due(now=lost) == 1
