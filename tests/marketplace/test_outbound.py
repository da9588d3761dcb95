"""The SSRF guard: seller upstreams and webhook URLs may not point inside the platform's network; the proxy's
kept-alive connections to upstreams."""

import gzip
import json
import os
import socket
import ssl
import struct
import threading
import time
import tracemalloc
import zlib
from http.server import BaseHTTPRequestHandler

import httpx
import pytest
import trustme
from prometheus_client import REGISTRY

from agreements.models import UsageAgreement, WebhookDelivery
from marketplace import masumi_agentic_client, outbound
from marketplace.concurrency import Deadlines
from tests.agreements.helpers import proposal
from tests.catalog.factories import register_service, service_data
from tests.catalog.test_registry import registration
from tests.conftest import error_code
from tests.marketplace.conftest import active_agreement, refused_by_the_guard
from tests.support.public_addresses import routed
from tests.support.http_server import DribblesItsHead, RecordingServer, serving
from tests.support.unanswered_names import UNANSWERED, unanswered_names

pytestmark = pytest.mark.django_db

INTERNAL = [
    "http://127.0.0.1:8080",  # loopback
    "http://localhost:6379",  # loopback by name
    "http://api.localhost",
    "http://10.1.2.3/api",  # private
    "http://192.168.0.10",
    "http://172.16.5.4",
    "http://169.254.169.254/latest/meta-data",  # link-local: cloud metadata
    "http://100.64.0.1",  # shared address space (carrier-grade NAT)
    "http://0.0.0.0:8000",  # unspecified
    "http://224.0.0.1",  # multicast
    "http://240.0.0.1",  # reserved
    "http://[::1]:8000",
    "http://[fe80::1]",
    "http://[fd00::1]",
    "http://[::ffff:127.0.0.1]",  # IPv4-mapped loopback
    "http://[::127.0.0.1]:8000",  # IPv4-compatible loopback
    "http://[::a9fe:a9fe]",  # IPv4-compatible metadata (169.254.169.254)
    "http://[::ffff:a00:1]",  # IPv4-mapped private, in hex
    "http://[64:ff9b::7f00:1]",  # NAT64 of loopback
    "http://[64:ff9b::10.0.0.1]",  # NAT64 of a private address
    "http://[64:ff9b:1::8.8.8.8]",  # local-use NAT64: a translator inside someone's network
    "http://[2002:a9fe:a9fe::1]",  # 6to4 of the metadata address
    "http://[fec0::1]",  # site-local (deprecated, still routed inside some networks)
    "http://[::ffff:0:7f00:1]",  # IPv4-translated loopback (SIIT)
    "http://[::ffff:0:a9fe:a9fe]",  # IPv4-translated metadata address
    "http://[2001:0:4136:e378:8000:63bf:3fff:fdd2]",  # Teredo (RFC 4380's example: a public server and client)
    "http://hooks.example.com@127.0.0.1/",  # a public name as userinfo: the host is what follows the @
    "http://user:password@169.254.169.254/",
]


@pytest.mark.parametrize("url", INTERNAL)
def test_a_service_cannot_point_its_upstream_inside_the_platform(guard_on, seller_api, url):
    response = seller_api.post("/agents/services", service_data(upstream_base_url=url))
    assert response.status_code == 400, response.content
    assert error_code(response) == "address_not_allowed"


@pytest.mark.parametrize("url", ["https://93.184.215.14/api", "https://translator.example.com/api",
                                 "https://[64:ff9b::5db8:d70e]/api"])  # NAT64 of a public address
def test_public_and_not_yet_resolvable_upstreams_are_accepted(guard_on, seller_api, url):
    # A name that does not resolve yet is accepted: every connection is checked again when it is made.
    response = seller_api.post("/agents/services", service_data(upstream_base_url=url))
    assert response.status_code == 201, response.content


def test_an_international_name_is_checked_as_the_name_that_is_called(guard_on, seller_api):
    # By IDNA 2008, as httpx encodes it, straße.example is xn--strae-oqa.example; the check resolved the text by
    # Python's codec (IDNA 2003), another name: strasse.example.
    with routed("10.0.0.1", "127.0.0.1", names=("xn--strae-oqa.example",)):
        response = seller_api.post("/agents/services", service_data(upstream_base_url="https://straße.example/api"))
    assert response.status_code == 400, response.content
    assert error_code(response) == "address_not_allowed"


def test_an_update_cannot_move_the_upstream_inside(guard_on, seller_api):
    service = seller_api.post("/agents/services", service_data()).json()
    response = seller_api.patch(f"/agents/services/{service['id']}", {"upstream_base_url": "http://10.0.0.7"})
    assert response.status_code == 400
    assert error_code(response) == "address_not_allowed"


def test_a_masumi_registration_cannot_point_inside(guard_on, seller, seller_api):
    response = seller_api.post("/registry", registration(seller, apiBaseUrl="http://127.0.0.1:3001"))
    assert response.status_code == 400
    assert error_code(response) == "address_not_allowed"


@pytest.mark.parametrize("url", INTERNAL)
def test_a_webhook_cannot_point_inside(guard_on, seller_api, url):
    response = seller_api.post("/webhooks", {"url": url})
    assert response.status_code == 400, response.content
    assert error_code(response) == "address_not_allowed"


@pytest.mark.parametrize("private_allowed", [False, True])
def test_a_url_whose_port_is_beyond_65535_is_400_not_500(settings, seller_api, private_allowed):
    """`urlsplit(url).port` raises ValueError above 65535, which Django's URL validator lets through."""
    settings.ALLOW_PRIVATE_UPSTREAMS = private_allowed
    service = seller_api.post("/agents/services", service_data(upstream_base_url="https://example.com:99999/api"))
    assert service.status_code == 400 and error_code(service) == "invalid_port", service.content
    webhook = seller_api.post("/webhooks", {"url": "https://example.com:65536/hook"})
    assert webhook.status_code == 400 and error_code(webhook) == "invalid_port", webhook.content


@pytest.mark.parametrize("private_allowed", [False, True])
def test_a_url_whose_port_is_0_is_400_invalid_port_not_called_on_another_port(settings, seller_api, private_allowed):
    """Port 0 is no port a server listens on: the skill, Masumi and webhook clients failed every call to it (a socket
    error per attempt), while the metered proxy read it as "no port" and called the scheme's default."""
    settings.ALLOW_PRIVATE_UPSTREAMS = private_allowed
    service = seller_api.post("/agents/services", service_data(upstream_base_url="https://example.com:0/api"))
    assert service.status_code == 400 and error_code(service) == "invalid_port", service.content
    webhook = seller_api.post("/webhooks", {"url": "https://example.com:00/hook"})
    assert webhook.status_code == 400 and error_code(webhook) == "invalid_port", webhook.content


# Special-purpose blocks IANA's registries mark not globally reachable that this Python's `ipaddress` (3.11) still
# calls global: the IETF protocol assignments block (192.0.0.0/24; Oracle Cloud Classic's metadata service is
# 192.0.0.192), IPv6's documentation prefix of RFC 9637 and SRv6's SIDs (RFC 9602).
NOT_GLOBAL_BUT_FOR_IPADDRESS = ["192.0.0.192", "192.0.0.8", "3fff::1", "5f00::1"]


@pytest.mark.parametrize("address", NOT_GLOBAL_BUT_FOR_IPADDRESS)
def test_special_purpose_addresses_ipaddress_calls_global_are_refused_when_saved(guard_on, seller_api, address):
    url = f"http://[{address}]/hook" if ":" in address else f"http://{address}/hook"
    service = seller_api.post("/agents/services", service_data(upstream_base_url=url))
    assert service.status_code == 400 and error_code(service) == "address_not_allowed", service.content
    webhook = seller_api.post("/webhooks", {"url": url})
    assert webhook.status_code == 400 and error_code(webhook) == "address_not_allowed", webhook.content


@pytest.mark.parametrize("allowed_by_iana", ["192.0.0.9", "192.0.0.10"])  # PCP anycast, TURN anycast: global
def test_the_global_addresses_of_the_ietf_protocol_block_are_accepted(guard_on, seller_api, allowed_by_iana):
    response = seller_api.post("/webhooks", {"url": f"http://{allowed_by_iana}/hook"})
    assert response.status_code == 201, response.content


def test_a_webhook_whose_name_moved_to_the_metadata_address_192_0_0_192_is_not_posted_to(
        settings, seller, seller_api, buyer_api, http_server, django_capture_on_commit_callbacks):
    service = register_service(seller)
    port = http_server.url.rsplit(":", 1)[1]
    # Saved while its name resolved elsewhere; it now resolves to Oracle Cloud Classic's metadata address.
    assert seller_api.post("/webhooks", {"url": f"http://meta.hooks.example:{port}/hooks"}).status_code == 201
    settings.ALLOW_PRIVATE_UPSTREAMS = False
    with (routed("192.0.0.192", "127.0.0.1", names=("meta.hooks.example",)),
          django_capture_on_commit_callbacks(execute=True)):
        assert buyer_api.post("/usage-agreements", proposal(service)).status_code == 201
    assert http_server.requests == []
    [delivery] = WebhookDelivery.objects.all()
    assert "not allowed" in delivery.last_error and delivery.status == "pending", delivery.last_error


def test_the_dev_setting_allows_loopback(seller_api):
    response = seller_api.post("/agents/services", service_data(upstream_base_url="http://127.0.0.1:8080"))
    assert response.status_code == 201, response.content


def test_webhook_deliveries_are_checked_when_they_connect(settings, seller, seller_api, buyer_api, http_server,
                                                          django_capture_on_commit_callbacks):
    service = register_service(seller)
    # Saved while allowed (or while its name resolved elsewhere); now the name resolves to loopback.
    url = http_server.url.replace("127.0.0.1", "localhost") + "/hooks"
    assert seller_api.post("/webhooks", {"url": url}).status_code == 201
    settings.ALLOW_PRIVATE_UPSTREAMS = False
    with django_capture_on_commit_callbacks(execute=True):
        assert buyer_api.post("/usage-agreements", proposal(service)).status_code == 201
    assert http_server.requests == []
    [delivery] = WebhookDelivery.objects.all()
    assert "not allowed" in delivery.last_error and delivery.status == "pending"  # retried later, like any failure


@pytest.mark.parametrize("host", ["localhost.", "2130706433", "0177.0.0.1", "0x7f.1", "127.1"])
def test_a_webhook_saved_with_another_spelling_of_loopback_is_not_posted_to(settings, seller, http_server, host):
    """Held (not a defect): spellings of loopback the API's URL field refuses (400 `validation_error`: the root's
    dot, one decimal number, octal, hex, short forms, which the system resolver reads as inet_aton does), saved some
    other way, are never posted to: the delivery's connection checks the address they resolve to."""
    from django.utils import timezone

    from agreements import webhooks
    from agreements.models import WebhookSubscription

    url = http_server.url.replace("127.0.0.1", host) + "/hooks"
    subscription = WebhookSubscription.objects.create(agent=seller, url=url, secret="s")
    delivery = WebhookDelivery.objects.create(subscription=subscription, event_type="agreement.accepted",
                                              payload={"id": "evt_1"}, next_attempt_at=timezone.now())
    settings.ALLOW_PRIVATE_UPSTREAMS = False
    webhooks.delivery_attempt(delivery_id=delivery.pk)
    delivery.refresh_from_db()
    assert http_server.requests == []
    # httpx refuses some (an octal part), the resolver answers none for others here (the root's dot), and the
    # address it answers for the rest is refused: a failed attempt, retried as any.
    assert (delivery.status, delivery.attempts) == ("pending", 1), delivery.last_error
    assert delivery.last_error.startswith(("ConnectError", "InvalidURL")), delivery.last_error


@pytest.mark.chain
def test_the_proxy_checks_the_address_on_every_connection(escrow_chain, http_server, settings,
                                                          django_capture_on_commit_callbacks):
    # Registered by name while it resolved publicly (here: while allowed); DNS now answers with loopback.
    active = active_agreement(escrow_chain, django_capture_on_commit_callbacks,
                              http_server.url.replace("127.0.0.1", "localhost") + "/api")
    settings.ALLOW_PRIVATE_UPSTREAMS = False
    refused_by_the_guard(active, http_server)

    settings.ALLOW_PRIVATE_UPSTREAMS = True
    assert active.buyer_api.get(f"{active.proxy}/translate").status_code == 200


@pytest.fixture
def tls_upstream():
    """An HTTPS upstream on loopback whose certificate, for `localhost`, a test CA issued."""
    authority = trustme.CA()
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    authority.issue_cert("localhost").configure_cert(context)
    server = RecordingServer(tls=context).start()
    yield authority, server
    server.stop()


@pytest.mark.chain
def test_the_proxy_calls_tls_upstreams_whose_certificate_it_trusts_and_no_others(
        escrow_chain, tls_upstream, monkeypatch, django_capture_on_commit_callbacks):
    authority, upstream = tls_upstream
    active = active_agreement(escrow_chain, django_capture_on_commit_callbacks,
                              upstream.url.replace("127.0.0.1", "localhost") + "/api")
    response = active.buyer_api.get(f"{active.proxy}/translate")
    assert response.status_code == 502 and error_code(response) == "upstream_unavailable"
    assert upstream.requests == []
    agreement = UsageAgreement.objects.get(pk=active.agreement_id)
    assert (agreement.used, agreement.reserved) == (0, 0)  # nothing charged, nothing held

    trusting = ssl.create_default_context()
    authority.configure_trust(trusting)
    monkeypatch.setattr(outbound._GuardedTLSConnection, "_context", trusting)  # as if the CA were a public one
    response = active.buyer_api.get(f"{active.proxy}/translate")
    assert response.status_code == 200 and response["X-Usage-Seq"] == "1"
    [forwarded] = upstream.requests
    assert (forwarded.path, forwarded.headers["Host"]) == ("/api/translate", upstream.url.split("//")[1].replace(
        "127.0.0.1", "localhost"))


class _ClosesKeptAliveConnections(BaseHTTPRequestHandler):
    """Answers as HTTP/1.1 without `Connection: close`, then closes the connection anyway, as an upstream closes
    the idle connections it kept alive."""

    protocol_version = "HTTP/1.1"
    answered = 0

    def do_GET(self):
        type(self).answered += 1
        self.send_response(200)
        self.send_header("Content-Length", "2")
        self.end_headers()
        self.wfile.write(b"{}")
        self.close_connection = True

    def log_message(self, *args):
        pass


@pytest.mark.chain
def test_a_kept_alive_connection_the_upstream_closed_is_not_used_again(escrow_chain,
                                                                      django_capture_on_commit_callbacks):
    with serving(_ClosesKeptAliveConnections) as url:
        active = active_agreement(escrow_chain, django_capture_on_commit_callbacks, f"{url}/api")
        for seq in ("1", "2"):
            response = active.buyer_api.get(f"{active.proxy}/translate")
            assert response.status_code == 200 and response["X-Usage-Seq"] == seq
            assert b"".join(response.streaming_content) == b"{}"  # read to its end: the connection is kept
    assert _ClosesKeptAliveConnections.answered == 2


class _ClosesMidBody(BaseHTTPRequestHandler):
    """Announces 100 bytes, sends 10 and closes."""

    def do_GET(self):
        self.send_response(200)
        self.send_header("Content-Length", "100")
        self.end_headers()
        self.wfile.write(b"x" * 10)

    def log_message(self, *args):
        pass


@pytest.mark.chain
def test_an_answer_cut_short_is_never_stored_as_the_calls_reply(escrow_chain, django_capture_on_commit_callbacks):
    with serving(_ClosesMidBody) as url:
        active = active_agreement(escrow_chain, django_capture_on_commit_callbacks, f"{url}/api")
        headers = {"HTTP_AUTHORIZATION": f"Bearer {active.buyer_api.secret}", "HTTP_X_REQUEST_NONCE": "cut-1"}
        first = active.buyer_api.client.get(f"{active.proxy}/translate", **headers)
        again = active.buyer_api.client.get(f"{active.proxy}/translate", **headers)
    assert first.status_code >= 500 and again.status_code != 200, (first.status_code, again.status_code)


@pytest.mark.parametrize("host", ["[::127.0.0.1]", "[64:ff9b::127.0.0.1]", "localhost"])
def test_webhook_connections_decode_embedded_addresses_and_tell_the_subscriber_nothing_of_them(
        settings, seller, seller_api, buyer_api, http_server, django_capture_on_commit_callbacks, host):
    service = register_service(seller)
    port = http_server.url.rsplit(":", 1)[1]
    subscription = seller_api.post("/webhooks", {"url": f"http://{host}:{port}/hooks"}).json()  # saved while allowed
    settings.ALLOW_PRIVATE_UPSTREAMS = False
    with django_capture_on_commit_callbacks(execute=True):
        assert buyer_api.post("/usage-agreements", proposal(service)).status_code == 201

    [delivery] = seller_api.get(f"/webhooks/{subscription['id']}/deliveries").json()["results"]
    assert "resolves to an address that is not allowed" in delivery["last_error"]
    assert "127.0.0.1" not in delivery["last_error"].replace(host.strip("[]"), "")  # not what the name resolved to
    assert http_server.requests == []


def test_a_webhook_that_cannot_be_resolved_shows_no_resolver_answer(
        settings, seller, seller_api, buyer_api, django_capture_on_commit_callbacks):
    service = register_service(seller)
    subscription = seller_api.post("/webhooks", {"url": "http://hooks.invalid/x"}).json()
    settings.ALLOW_PRIVATE_UPSTREAMS = False
    with django_capture_on_commit_callbacks(execute=True):
        assert buyer_api.post("/usage-agreements", proposal(service)).status_code == 201

    [delivery] = seller_api.get(f"/webhooks/{subscription['id']}/deliveries").json()["results"]
    assert delivery["last_error"] == "ConnectError: cannot resolve hooks.invalid"  # not the resolver's answer


def _closes_as_the_next_request_arrives() -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        """Answers the first request of each connection and keeps the connection alive (HTTP/1.1), then closes it
        as the next request arrives, unanswered: an upstream whose keep-alive timeout ran out while that request
        was on its way."""

        protocol_version = "HTTP/1.1"
        received: list[str] = []  # every request's method as it arrived, "unanswered" for those closed on

        def handle(self):
            self.handle_one_request()
            if self.rfile.readline():
                self.received.append("unanswered")

        def answer(self):
            self.rfile.read(int(self.headers.get("Content-Length") or 0))
            self.received.append(self.command)
            self.send_response(200)
            self.send_header("Content-Length", "2")
            self.end_headers()
            self.wfile.write(b"{}")

        do_GET = do_POST = answer

        def log_message(self, *args):
            pass

    return Handler


@pytest.mark.chain
def test_a_call_the_upstream_closed_its_connection_on_is_sent_again_when_it_may_be(
        escrow_chain, django_capture_on_commit_callbacks):
    handler = _closes_as_the_next_request_arrives()
    with serving(handler) as url:
        active = active_agreement(escrow_chain, django_capture_on_commit_callbacks, f"{url}/api")
        for seq in ("1", "2"):
            response = active.buyer_api.get(f"{active.proxy}/translate")
            assert response.status_code == 200 and response["X-Usage-Seq"] == seq
            assert b"".join(response.streaming_content) == b"{}"
    # The second call went down the kept-alive connection as the upstream closed it, then down a new one.
    assert handler.received == ["GET", "unanswered", "GET"]
    assert UsageAgreement.objects.get(pk=active.agreement_id).used == 2 * active.service.unit_price


@pytest.mark.chain
def test_a_call_that_may_have_been_acted_on_is_not_sent_again(escrow_chain, django_capture_on_commit_callbacks):
    handler = _closes_as_the_next_request_arrives()
    with serving(handler) as url:
        active = active_agreement(escrow_chain, django_capture_on_commit_callbacks, f"{url}/api")
        first = active.buyer_api.post(f"{active.proxy}/translate", {"text": "hi"})
        assert first.status_code == 200 and b"".join(first.streaming_content) == b"{}"
        response = active.buyer_api.post(f"{active.proxy}/translate", {"text": "hi"})
    assert response.status_code == 502 and error_code(response) == "upstream_unavailable"
    assert handler.received == ["POST", "unanswered"]
    assert UsageAgreement.objects.get(pk=active.agreement_id).used == active.service.unit_price  # the first only


def _resent(reason: str) -> float:
    return REGISTRY.get_sample_value("marketplace_upstream_requests_resent_total", {"reason": reason}) or 0


def test_a_request_with_its_own_idempotency_key_is_sent_again(settings):
    settings.ALLOW_PRIVATE_UPSTREAMS = True
    handler = _closes_as_the_next_request_arrives()
    pool = outbound.UpstreamPool(max_idle_per_upstream=1)
    before = _resent("replayable")
    with serving(handler) as url:
        for key in ("first", "second"):
            answer = pool.request("POST", f"{url}/work", headers=[("Idempotency-Key", key), ("Content-Length", "2")], body=b"{}",
                                  connect_timeout=5, read_timeout=5, answer_timeout=5)
            assert answer.status == 200 and b"".join(answer) == b"{}"
            answer.close()
    assert handler.received == ["POST", "unanswered", "POST"]
    assert _resent("replayable") == before + 1  # operators see how often sellers close connections under calls


def test_a_connection_idle_too_long_is_not_used_again(settings, monkeypatch):
    settings.ALLOW_PRIVATE_UPSTREAMS = True
    monkeypatch.setattr(outbound, "IDLE_SECONDS", 0.05)
    handler = _closes_as_the_next_request_arrives()
    pool = outbound.UpstreamPool(max_idle_per_upstream=1)
    with serving(handler) as url:
        for _ in range(2):
            answer = pool.request("POST", f"{url}/work", headers=[("Content-Length", "2")], body=b"{}", connect_timeout=5, read_timeout=5, answer_timeout=5)
            assert answer.status == 200 and b"".join(answer) == b"{}"
            answer.close()
            time.sleep(0.1)
    assert handler.received == ["POST", "POST"]  # the second on a new connection: none closed on it


def test_partitions_never_share_a_connection_and_idle_ones_of_every_partition_are_closed(settings, monkeypatch):
    """Connections kept apart per buyer: one that stops calling left its idle connections open until its next call
    (they were closed only as a call of the same partition took one)."""
    settings.ALLOW_PRIVATE_UPSTREAMS = True
    monkeypatch.setattr(outbound, "IDLE_SECONDS", 0.05)
    pool = outbound.UpstreamPool(max_idle_per_upstream=1)
    with serving(_closes_as_the_next_request_arrives()) as url:
        def call(partition: str):
            answer = pool.request("POST", f"{url}/work", headers=[("Content-Length", "2")], body=b"{}",
                                  connect_timeout=5, read_timeout=5, answer_timeout=5, partition=partition)
            connection = answer._connection
            assert answer.status == 200 and b"".join(answer) == b"{}"
            answer.close()
            return connection

        first = call("buyer-a")
        assert call("buyer-b") is not first and first.sock is not None  # kept for buyer-a alone
        time.sleep(0.1)
        call("buyer-c")
    assert first.sock is None  # closed, though buyer-a never called again


class _ResetsOnceAnswered(BaseHTTPRequestHandler):
    """Answers as HTTP/1.1 without `Connection: close`, then resets the connection."""

    protocol_version = "HTTP/1.1"

    def do_POST(self):
        self.rfile.read(int(self.headers["Content-Length"]))
        self.send_response(200)
        self.send_header("Content-Length", "2")
        self.end_headers()
        self.wfile.write(b"{}")
        self.wfile.flush()
        self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))  # close: RST
        self.close_connection = True

    def log_message(self, *args):
        pass


def test_a_request_not_written_whole_before_the_upstream_closed_is_sent_again(settings, monkeypatch):
    settings.ALLOW_PRIVATE_UPSTREAMS = True
    pool = outbound.UpstreamPool(max_idle_per_upstream=1)
    with serving(_ResetsOnceAnswered) as url:
        answer = pool.request("POST", f"{url}/work", headers=[("Content-Length", "2")], body=b"{}",
                              connect_timeout=5, read_timeout=5, answer_timeout=5)
        assert b"".join(answer) == b"{}"
        answer.close()
        time.sleep(0.1)  # the reset has arrived
        monkeypatch.setattr(outbound, "_closed_by_peer", lambda sock: False)  # ...just after the check before use
        before = _resent("not_written")
        answer = pool.request("POST", f"{url}/work", headers=[("Content-Length", "2")], body=b"{}",
                              connect_timeout=5, read_timeout=5, answer_timeout=5)
        assert answer.status == 200 and b"".join(answer) == b"{}"
    assert _resent("not_written") == before + 1


def _cut_off(deadlines: Deadlines, seconds: float) -> float:
    """How long a read that gets nothing took to be cut off by `deadlines`."""
    ours, theirs = socket.socketpair()
    with ours, theirs:
        ours.settimeout(3)  # each read's own bound, had the watchdog not run
        started = time.monotonic()
        with pytest.raises(TimeoutError), deadlines.bound(ours, seconds):
            assert ours.recv(1) == b""  # shut down under it
        return time.monotonic() - started


def test_a_deadline_cuts_off_reads_still_running_past_it_and_no_others():
    """The answer head's bound (PROXY_TIMEOUT in all): one watchdog thread per process for every bound."""
    deadlines = Deadlines("test")
    ours, theirs = socket.socketpair()
    with ours, theirs:
        for _ in range(3):
            theirs.sendall(b"x")
            with deadlines.bound(ours, 0.2):
                assert ours.recv(1) == b"x"
        time.sleep(0.3)  # past the deadlines of the bounds that ended: the socket is left alone
        theirs.sendall(b"y")
        assert ours.recv(1) == b"y"
    assert 0.15 < _cut_off(deadlines, 0.2) < 1.5
    assert deadlines._heap == []
    assert [thread.name for thread in threading.enumerate()].count("deadlines-test") == 1


def test_a_process_forked_after_a_deadline_was_used_gets_its_own_watchdog():
    """gunicorn forks its workers after import: the parent's watchdog thread does not survive the fork."""
    deadlines = Deadlines("test-fork")
    _cut_off(deadlines, 0.05)
    child = os.fork()
    if child == 0:  # pragma: no cover - the child's result is its exit status
        try:
            os._exit(0 if _cut_off(deadlines, 0.1) < 1.5 else 1)
        except BaseException:
            os._exit(2)
    assert os.waitpid(child, 0)[1] == 0


class _AnswersThenDribbles(DribblesItsHead):
    """Answers a connection's first request at once and keeps the connection; dribbles the ones after it."""

    connections = 0

    def setup(self):
        super().setup()
        type(self).connections += 1
        self.answered = False

    def _handle(self):
        if self.answered:
            return super()._handle()
        self.answered = True
        self.rfile.read(int(self.headers.get("Content-Length") or 0))
        self.send_response(200)
        self.send_header("Content-Length", "2")
        self.end_headers()
        self.wfile.write(b"{}")

    do_GET = do_POST = _handle


def test_a_guarded_exchange_ends_by_its_deadline_on_a_kept_alive_connection_too():
    """A per-read timeout lets a peer dribbling its answer hold the caller for ever; the deadline bounds the whole
    exchange, also on a pooled connection opened under an earlier, longer deadline."""
    client = outbound.guarded_client(timeout=httpx.Timeout(5.0))
    with serving(_AnswersThenDribbles) as url, client:
        with outbound.deadline(5):
            assert client.get(url).status_code == 200
        started = time.monotonic()
        with pytest.raises(httpx.ReadTimeout, match=r"longer than its 0\.5 s in all"), outbound.deadline(0.5):
            client.get(url)
        assert time.monotonic() - started < 1.5
    assert _AnswersThenDribbles.connections == 1


def test_a_guarded_exchange_needs_a_deadline(http_server):
    """Every caller bounds its exchanges in all: a peer chose the address, and may dribble."""
    with outbound.guarded_client(timeout=httpx.Timeout(5.0)) as client, pytest.raises(RuntimeError, match="deadline"):
        client.get(http_server.url)
    assert http_server.requests == []


def test_a_proxy_named_in_the_environment_takes_no_guarded_exchange_elsewhere(http_server, monkeypatch):
    """A host's egress proxy variables (HTTP_PROXY, ALL_PROXY) would send a webhook, skill or Masumi call through a
    proxy the guard never checks, to whichever address the proxy resolves: a guarded client ignores them and
    connects to the vetted addresses itself."""
    proxy = RecordingServer().start()
    try:
        for name in ("NO_PROXY", "no_proxy"):
            monkeypatch.delenv(name, raising=False)
        for name in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy", "all_proxy"):
            monkeypatch.setenv(name, proxy.url)
        with outbound.guarded_client(timeout=httpx.Timeout(5.0)) as client, outbound.deadline(5.0):
            assert client.post(f"{http_server.url}/hook", content=b"{}").status_code == 200
    finally:
        proxy.stop()
    assert [request.path for request in http_server.requests] == ["/hook"]
    assert proxy.requests == []


def test_a_masumi_seller_dribbling_its_answer_is_unavailable_within_the_service_timeout(settings):
    settings.MASUMI_SERVICE_TIMEOUT = 0.5
    with serving(DribblesItsHead) as url:
        started = time.monotonic()
        answer = masumi_agentic_client.availability(base_url=url)
        elapsed = time.monotonic() - started
    assert not answer.available and "ReadTimeout" in answer.message
    assert elapsed < 1.5, f"the check took {elapsed:.1f} s with MASUMI_SERVICE_TIMEOUT=0.5"


class _StatusThenAnother(BaseHTTPRequestHandler):
    """A Masumi seller keeping its connection alive whose first answer to `/status` comes with a second one, in the
    same write: the result of no job asked about."""

    protocol_version = "HTTP/1.1"
    answered = 0

    def do_GET(self):
        job_id = self.path.partition("job_id=")[2]
        answers = [{"status": "completed", "result": f"the result of {job_id}"}]
        self.answered += 1
        if self.answered == 1:
            answers.append({"status": "completed", "result": "the result of no job asked about"})
        self.wfile.write(b"".join(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n%s"
                                  % (len(body), body) for body in (json.dumps(answer).encode() for answer in answers)))

    def log_message(self, *args):
        pass


def test_a_masumi_sellers_answer_past_its_end_is_not_the_status_of_the_next_job_asked_about():
    """The Masumi client keeps connections alive across purchases (any buyer's): a second answer sent with the first
    was read as the status of the next job asked about down the connection, its result another buyer's."""
    with serving(_StatusThenAnother) as url:
        statuses = [masumi_agentic_client.job_status(base_url=url, job_id=job_id) for job_id in ("job-a", "job-b")]
    assert [status.result for status in statuses] == ["the result of job-a", "the result of job-b"]


@pytest.mark.parametrize("guard", ["on", "off"])
def test_a_webhook_whose_name_never_resolves_fails_within_the_webhook_timeout(
        settings, seller, seller_api, buyer_api, django_capture_on_commit_callbacks, guard):
    """The deadline bounded connecting, not resolving the name first: a receiver whose DNS server never answers held
    the outbound worker for as long as the system resolver kept asking."""
    service = register_service(seller)
    subscription = seller_api.post("/webhooks", {"url": f"http://hooks.{UNANSWERED}/x"}).json()
    settings.ALLOW_PRIVATE_UPSTREAMS = guard == "off"
    settings.WEBHOOK_TIMEOUT_SECONDS = 0.5
    with unanswered_names() as lookups:
        started = time.monotonic()
        with django_capture_on_commit_callbacks(execute=True):
            assert buyer_api.post("/usage-agreements", proposal(service)).status_code == 201
        elapsed = time.monotonic() - started
    assert lookups.began == 1
    assert elapsed < 1.5, f"the delivery took {elapsed:.1f} s with WEBHOOK_TIMEOUT_SECONDS=0.5"
    [delivery] = seller_api.get(f"/webhooks/{subscription['id']}/deliveries").json()["results"]
    assert delivery["status"] == "pending"  # retried later, like any failure
    assert delivery["last_error"] == "ConnectTimeout: the exchange took longer than its 0.5 s in all"


def test_a_masumi_seller_whose_name_never_resolves_is_unavailable_within_the_service_timeout(settings):
    settings.MASUMI_SERVICE_TIMEOUT = 0.5
    with unanswered_names():
        started = time.monotonic()
        answer = masumi_agentic_client.availability(base_url=f"http://{UNANSWERED}")
        elapsed = time.monotonic() - started
    assert not answer.available and "ConnectTimeout" in answer.message
    assert elapsed < 1.0, f"the check took {elapsed:.1f} s with MASUMI_SERVICE_TIMEOUT=0.5"


def _bomb(coding: str) -> bytes:
    """32 MiB of JSON, compressed to about 32 KiB: one network read."""
    document = b'{"result": "' + b"0" * (32 * 1024 * 1024) + b'"}'
    return gzip.compress(document) if coding == "gzip" else zlib.compress(document, 9)


@pytest.mark.parametrize("coding", ["gzip", "deflate"])
def test_a_compressed_answer_is_inflated_only_a_little_past_the_answer_bound(http_server, coding):
    """The bound counted decoded bytes, but httpx inflated each network read whole: ~64 KiB of gzip became 64 MiB
    (a 2 MiB bound held ~150 MiB) before it was counted, per seller answer being read."""
    http_server.responses.append((200, _bomb(coding), 0, {"Content-Encoding": coding}))
    limit = 256 * 1024
    tracemalloc.start()
    try:
        with httpx.Client() as client, client.stream("GET", http_server.url) as response:
            tracemalloc.reset_peak()
            with pytest.raises(outbound.bounded_json.InvalidJSON, match="larger than"):
                outbound.json_answer(response, max_bytes=limit)
            peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    # A 1 KiB piece of gzip inflates to ~1 MiB: that much past the bound, not what a whole network read inflates to.
    assert peak < limit + 3 * 2**20, f"{peak / 2**20:.0f} MiB held for a {limit // 1024} KiB bound"


def _answers_in_two_byte_chunks(document: bytes) -> type[BaseHTTPRequestHandler]:
    wire = b"".join(b"2\r\n" + document[at:at + 2] + b"\r\n" for at in range(0, len(document), 2)) + b"0\r\n\r\n"

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def do_GET(self):
            self.wfile.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                             b"Transfer-Encoding: chunked\r\n\r\n" + wire)

        def log_message(self, *args):
            pass

    return Handler


def test_an_answer_sent_in_tiny_chunks_holds_about_its_bound_not_an_object_per_chunk():
    """Each chunk of a chunked body is a piece httpx yields: kept as a list of pieces, an answer of 2-byte chunks held
    a Python object of ~50 bytes per 2 bytes it counted (~128 MiB for the 2 MiB bound, per answer being read)."""
    limit = 128 * 1024
    document = b'{"result": "' + b"0" * (limit - 16) + b'"}'
    expected = json.loads(document)
    with serving(_answers_in_two_byte_chunks(document)) as url:
        tracemalloc.start()
        try:
            with httpx.Client(timeout=60) as client, client.stream("GET", url) as response:
                tracemalloc.reset_peak()
                answer = outbound.json_answer(response, max_bytes=limit)
                peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
    assert answer == expected
    # The buffer, its growth's copy and the parsed document, with room for the machinery (~60 times before the fix).
    assert peak < 8 * limit, f"{peak / 2**20:.1f} MiB held for a {limit // 1024} KiB answer"


@pytest.mark.parametrize("codings", ["gzip, gzip", "br", "compress"])
def test_an_answer_in_codings_whose_inflation_is_unbounded_is_refused_undecoded(http_server, codings):
    """Stacked codings multiply each other's inflation, and brotli or zstandard (decoded by httpx once their packages
    are installed) inflate further than a piece-by-piece bound allows: refused, never decoded."""
    http_server.responses.append((200, b"\x00" * 16, 0, {"Content-Encoding": codings}))
    with httpx.Client() as client, client.stream("GET", http_server.url) as response:
        with pytest.raises(outbound.bounded_json.InvalidJSON, match="encoded") as refused:
            outbound.json_answer(response, max_bytes=1024)
    assert refused.value.reason == "unsupported_encoding"


def test_the_guarded_client_asks_sellers_only_for_the_codings_it_decodes():
    """httpx's default Accept-Encoding adds br and zstd once their packages are installed: a seller answering in
    what the client asked for would then be refused (`unsupported_encoding`), its buyer refunded for nothing."""
    with outbound.guarded_client(timeout=httpx.Timeout(5.0)) as client:
        assert client.headers["Accept-Encoding"] == "gzip, deflate"


@pytest.mark.parametrize("coding", ["gzip", "deflate", "identity"])
def test_an_honest_compressed_answer_is_read_whole(http_server, coding):
    document = {"result": "bonjour" * 1000}
    body = json.dumps(document).encode()
    body = {"gzip": gzip.compress, "deflate": zlib.compress}.get(coding, bytes)(body)
    http_server.responses.append((200, body, 0, {"Content-Encoding": coding}))
    with httpx.Client() as client, client.stream("GET", http_server.url) as response:
        assert outbound.json_answer(response, max_bytes=64 * 1024) == document
