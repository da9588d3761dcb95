"""The metered proxy under hostile requests and hostile upstream answers: nothing escapes the seller's base path,
no malformed header or body turns into a 500 or leaves budget reserved, no header crosses that should not."""

import json
import logging
import socket
import struct
import threading
import time
import tracemalloc
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import timedelta
from io import BytesIO

import pytest
from django.utils import timezone

from agreements import metering, proxy
from agreements.models import CallIntent, ProxyReplay, UsageAgreement, UsageEvent
from catalog.models import Service
from marketplace import outbound
from marketplace.errors import DependencyUnavailable
from tests.conftest import error_code, read_to_its_end
from tests.escrow.flow import Parties
from tests.agreements.test_proxy_slow_buyers import another_buyer
from tests.marketplace.conftest import active_agreement
from tests.support.poison_rows import first_row_always_fails, sweep_runs
from tests.support.public_addresses import routed
from tests.support.unanswered_names import UNANSWERED, unanswered_names

pytestmark = [pytest.mark.chain, pytest.mark.django_db]
PRICE = 20_000


def _active(escrow_chain, http_server, capture, base_path="/base", **service):
    parties = Parties(escrow_chain, upstream_base_url=http_server.url + base_path, **service)
    agreement = parties.accepted_agreement(quantity=5)
    assert parties.activate(agreement["id"], capture).status_code == 202
    parties.agreement_id = agreement["id"]
    parties.proxy = f"/metered-proxy/{agreement['id']}"
    return parties


@pytest.fixture
def active(escrow_chain, http_server, django_capture_on_commit_callbacks):
    return _active(escrow_chain, http_server, django_capture_on_commit_callbacks)


@pytest.fixture
def per_unit(escrow_chain, http_server, django_capture_on_commit_callbacks):
    return _active(escrow_chain, http_server, django_capture_on_commit_callbacks,
                   pricing={"type": "per_unit", "unit_name": "page", "unit_price_atomic": 10_000})


def unread(parties, method: str, path: str, **extra):
    """The call's answer as the test client gives it: a streamed body not yet read, the call still waiting."""
    return getattr(parties.buyer_api.client, method)(path, HTTP_AUTHORIZATION=f"Bearer {parties.buyer_api.secret}",
                                                     **extra)


def raw(parties, method: str, path: str, **extra):
    return read_to_its_end(unread(parties, method, path, **extra))


def books(parties) -> tuple[int, int]:
    agreement = UsageAgreement.objects.get(pk=parties.agreement_id)
    return agreement.used, agreement.reserved


def _body(response) -> bytes:
    return b"".join(response.streaming_content) if response.streaming else response.content


def no_errors_logged(caplog) -> bool:
    return not [record for record in caplog.records if record.levelno >= logging.ERROR]


@pytest.mark.parametrize("path", [
    "%2e%2e/%2e%2e/internal/admin?x=1",  # the finding: reached /internal/admin, charged, signed
    "..%5C..%5Cinternal%5Cadmin",
    "a/../../internal",
    "%252e%252e/internal",  # decoded once more by the seller's server
    "a/%252E%252e%255Cinternal",
    "..;/internal",  # a dot segment with parameters: Tomcat and Spring read `..`
    "a/..;x=1/..;/internal",
    "%2e%2e;/internal",
])
def test_a_path_that_leaves_the_base_path_is_400_and_never_forwarded(active, http_server, path, caplog):
    response = raw(active, "get", f"{active.proxy}/{path}")
    assert response.status_code == 400, response.content
    assert error_code(response) == "invalid_upstream_path"
    assert http_server.requests == []
    assert books(active) == (0, 0) and not CallIntent.objects.exists()
    assert no_errors_logged(caplog)


def test_dot_segments_within_the_base_path_are_resolved(active, http_server):
    assert raw(active, "get", f"{active.proxy}/a/./b/../c%5Cd?q=1").status_code == 200
    [forwarded] = http_server.requests
    assert forwarded.path == "/base/a/c/d?q=1"


def test_a_non_ascii_digit_in_x_max_units_is_400_and_reserves_nothing(per_unit, http_server):
    for value in ["²", "١", "9" * 5000]:
        response = raw(per_unit, "get", f"{per_unit.proxy}/pages", HTTP_X_MAX_UNITS=value)
        assert response.status_code == 400 and error_code(response) == "invalid_max_units"
    assert http_server.requests == [] and books(per_unit) == (0, 0)


def test_a_non_ascii_digit_in_x_usage_units_charges_one_unit(per_unit, http_server):
    http_server.responses.append((200, {}, 0, {"X-Usage-Units": "²"}))
    http_server.responses.append((200, {}, 0, {"X-Usage-Units": "3"}))
    first = raw(per_unit, "get", f"{per_unit.proxy}/pages", HTTP_X_MAX_UNITS="4")
    second = raw(per_unit, "get", f"{per_unit.proxy}/pages", HTTP_X_MAX_UNITS="4")
    assert (first.status_code, first["X-Usage-Cost"]) == (200, "10000")
    assert (second.status_code, second["X-Usage-Cost"]) == (200, "30000")
    assert books(per_unit) == (40_000, 0)


def test_a_chunked_body_is_forwarded_and_charged_once(active, http_server):
    body = b'{"text": "' + b"x" * 100_000 + b'"}'
    response = raw(active, "post", f"{active.proxy}/translate", data=b"", content_type="application/json",
                   HTTP_TRANSFER_ENCODING="chunked", CONTENT_LENGTH="",
                   **{"wsgi.input": BytesIO(body), "wsgi.input_terminated": True})
    assert response.status_code == 200, response.content
    [forwarded] = http_server.requests
    assert forwarded.body == body and forwarded.headers["Content-Length"] == str(len(body))
    assert books(active) == (PRICE, 0)


def test_a_chunked_body_the_server_cannot_delimit_is_411(active, http_server):
    response = raw(active, "post", f"{active.proxy}/translate", data=b"", content_type="application/json",
                   HTTP_TRANSFER_ENCODING="chunked", CONTENT_LENGTH="", **{"wsgi.input": BytesIO(b"{}")})
    assert response.status_code == 411 and error_code(response) == "length_required"
    assert http_server.requests == [] and books(active) == (0, 0)


def test_an_oversized_body_is_413_in_the_error_shape_without_a_traceback(active, http_server, settings, caplog):
    body = b"x" * (settings.PROXY_MAX_REQUEST_BYTES + 1)
    plain = raw(active, "post", f"{active.proxy}/upload", data=body, content_type="application/octet-stream")
    chunked = raw(active, "post", f"{active.proxy}/upload", data=b"", content_type="application/octet-stream",
                  HTTP_TRANSFER_ENCODING="chunked", CONTENT_LENGTH="",
                  **{"wsgi.input": BytesIO(body), "wsgi.input_terminated": True})
    for response in (plain, chunked):
        assert response.status_code == 413, response.content
        assert error_code(response) == "request_too_large"
    assert http_server.requests == [] and books(active) == (0, 0)
    assert no_errors_logged(caplog)


def test_hop_by_hop_forwarding_and_cookie_headers_do_not_cross(active, http_server):
    http_server.responses.append((200, {}, 0, {"Connection": "X-Upstream-Hop", "X-Upstream-Hop": "1",
                                               "Set-Cookie": "session=seller; Path=/", "X-Kept": "1"}))
    response = raw(active, "get", f"{active.proxy}/x", HTTP_CONNECTION="keep-alive, X-Buyer-Hop",
                   HTTP_X_BUYER_HOP="1", HTTP_X_FORWARDED_FOR="6.6.6.6", HTTP_FORWARDED="for=6.6.6.6",
                   HTTP_X_REAL_IP="6.6.6.6", HTTP_X_FORWARDED_HOST="evil.example", REMOTE_ADDR="198.51.100.7")
    assert response.status_code == 200
    [forwarded] = http_server.requests
    names = {name.lower() for name in forwarded.headers}
    assert not names & {"x-buyer-hop", "forwarded", "x-real-ip", "x-forwarded-host"}
    assert forwarded.headers["X-Forwarded-For"] == "198.51.100.7"  # what the platform saw, not what was claimed
    assert not response.has_header("Set-Cookie") and not response.has_header("X-Upstream-Hop")
    assert response["X-Kept"] == "1"


# Headers that servers and frameworks read as the request's path, host or scheme in place of its request line and Host
# (IIS and older Symfony, Zend and Laminas read X-Original-URL and X-Rewrite-URL as the path; Spring X-Forwarded-Prefix,
# Traefik X-Forwarded-Uri; others the host or scheme): from a buyer, a way past the proxy's confinement of the path.
REQUEST_LINE_OVERRIDES = {"X-Original-URL": "/internal/admin", "X-Rewrite-URL": "/internal/admin",
                          "X-Original-URI": "/internal/admin", "X-Forwarded-Uri": "/internal/admin",
                          "X-Forwarded-Path": "/internal/admin", "X-Forwarded-Prefix": "/internal",
                          "X-Envoy-Original-Path": "/internal/admin", "X-Forwarded-Server": "evil.example",
                          "X-Host": "evil.example", "X-Original-Host": "evil.example", "X-Forwarded-Scheme": "https",
                          "X-Forwarded-Ssl": "on", "X-Url-Scheme": "https", "Front-End-Https": "on"}


def test_a_buyers_headers_overriding_the_request_line_or_host_never_reach_the_seller(active, http_server):
    """The proxy confines the path under the service's base path and signs it; a buyer's `X-Original-URL:
    /internal/admin` reached the seller beside it, and a server that reads it called that path instead, the call
    signed for the confined one and charged."""
    http_server.responses.append((200, {}, 0))
    response = raw(active, "get", f"{active.proxy}/x", **{
        "HTTP_" + name.upper().replace("-", "_"): value for name, value in REQUEST_LINE_OVERRIDES.items()})
    assert response.status_code == 200
    [forwarded] = http_server.requests
    assert {name.lower() for name in forwarded.headers} & {name.lower() for name in REQUEST_LINE_OVERRIDES} == set()

# Headers that servers and frameworks read as the request's method in place of its request line (Express's and Rails'
# method-override, Symfony's and ASP.NET's X-HTTP-Method-Override, OData's X-HTTP-Method).
METHOD_OVERRIDES = {"X-HTTP-Method-Override": "DELETE", "X-HTTP-Method": "DELETE", "X-Method-Override": "DELETE"}


def test_a_buyers_method_override_never_reaches_the_seller(active, http_server):
    """The proxy signs the call's method and its usage event records it; a buyer's `X-HTTP-Method-Override: DELETE`
    on a POST reached the seller, and a server that reads it ran a DELETE signed, recorded and charged as a POST (or
    a method the proxy does not forward: TRACE, CONNECT)."""
    response = raw(active, "post", f"{active.proxy}/items/7", data=b"{}", content_type="application/json", **{
        "HTTP_" + name.upper().replace("-", "_"): value for name, value in METHOD_OVERRIDES.items()})
    assert response.status_code == 200
    [forwarded] = http_server.requests
    assert {name.lower() for name in forwarded.headers} & {name.lower() for name in METHOD_OVERRIDES} == set()


def test_a_buyers_expectation_is_met_by_the_proxy_not_passed_to_the_seller(active, http_server):
    """The proxy reads the buyer's body whole before it calls the seller, and sends it with the request's head: an
    `Expect: 100-continue` (curl sends one with a larger body) is met on the buyer's hop. Passed on, a seller's
    server that refuses expectations (417 Expectation Failed, as lighttpd did) failed the call, charged as a 4xx."""
    response = raw(active, "post", f"{active.proxy}/upload", data=b"x" * 2048, content_type="application/octet-stream",
                   HTTP_EXPECT="100-continue")
    assert response.status_code == 200
    [forwarded] = http_server.requests
    assert "expect" not in {name.lower() for name in forwarded.headers} and forwarded.body == b"x" * 2048


@pytest.mark.parametrize("method", ["HEAD", "OPTIONS", "TRACE", "CONNECT", "PROPFIND"])
def test_a_method_the_proxy_does_not_forward_is_405_and_charges_nothing(active, http_server, method):
    """TRACE echoes the request (its headers, the platform's signature among them) back; CONNECT asks the seller's
    server for a tunnel; a HEAD's answer has no body whatever its length says. Only GET, POST, PUT, PATCH and DELETE
    are forwarded."""
    response = active.buyer_api.client.generic(method, f"{active.proxy}/x",
                                               HTTP_AUTHORIZATION=f"Bearer {active.buyer_api.secret}")
    assert response.status_code == 405
    assert method == "HEAD" or error_code(response) == "method_not_allowed"  # a HEAD's answer has no body
    assert http_server.requests == [] and books(active) == (0, 0) and not CallIntent.objects.exists()


# What a web server in front (nginx, Apache, lighttpd: README, Operations) takes from the application's answer as an
# order: an internal redirect to any of its locations (`internal` ones too) with the buyer's request and credentials,
# a file of its disk, a crawl of a rate, buffering off, a cache time.
FRONT_SERVER_ORDERS = {"X-Accel-Redirect": "/internal/keys", "X-Accel-Limit-Rate": "1", "X-Accel-Buffering": "no",
                       "X-Accel-Expires": "86400", "X-Accel-Charset": "utf-7", "X-Sendfile": "/etc/passwd",
                       "X-Sendfile2": "/etc/passwd 0-", "X-LIGHTTPD-send-file": "/etc/passwd"}


@pytest.mark.parametrize("nonce", ["", "front-orders-1"])
def test_a_sellers_answer_gives_no_order_to_the_web_server_in_front(active, http_server, nonce):
    http_server.responses.append((200, {}, 0, {**FRONT_SERVER_ORDERS, "X-Kept": "1"}))
    extra = {"HTTP_X_REQUEST_NONCE": nonce} if nonce else {}
    response = raw(active, "get", f"{active.proxy}/x", **extra)
    assert response.status_code == 200, response.content
    assert [name for name in FRONT_SERVER_ORDERS if response.has_header(name)] == []
    assert response["X-Kept"] == "1"
    if nonce:  # the stored reply, answered to a retry; one stored with them before they were dropped, too
        stored = ProxyReplay.objects.get(request_nonce=nonce)
        assert [name for name in FRONT_SERVER_ORDERS if name in stored.headers] == []
        stored.headers = {**stored.headers, **FRONT_SERVER_ORDERS}
        stored.save(update_fields=["headers"])
        again = raw(active, "get", f"{active.proxy}/x", **extra)
        assert again["X-Replayed"] == "true" and again["X-Kept"] == "1"
        assert [name for name in FRONT_SERVER_ORDERS if again.has_header(name)] == []


# What a browser keeps for the whole origin that answered (the marketplace's, every proxied answer's), not for the one
# answer: as the seller's Set-Cookie, the seller's say over the marketplace's host.
ORIGIN_POLICIES = {"Strict-Transport-Security": "max-age=0",  # the marketplace's HSTS cleared: HTTPS stripped after
                   "Alt-Svc": 'h2="seller.example:443"; ma=2592000',  # the origin's connections sent to the seller's host
                   "Clear-Site-Data": '"cookies", "storage"',  # the operator's admin session cleared
                   "NEL": '{"report_to": "s", "max_age": 2592000, "success_fraction": 1.0}',  # every request's URL...
                   "Report-To": '{"group": "s", "max_age": 2592000, "endpoints": [{"url": "https://seller.example/r"}]}',
                   "Public-Key-Pins": 'pin-sha256="AAAA"; max-age=2592000', "Expect-CT": "max-age=2592000, enforce"}


@pytest.mark.parametrize("nonce", ["", "origin-policies-1"])
def test_a_sellers_answer_sets_no_policy_of_the_marketplaces_origin(active, http_server, nonce):
    """A browser (an owner's page calling the proxy) keeps these for the whole origin that answered, the
    marketplace's: `Strict-Transport-Security: max-age=0` cleared its HSTS, `Alt-Svc` sent its connections to the
    seller's host, `NEL` with `Report-To` had every request's URL reported to the seller for a month,
    `Clear-Site-Data` logged an operator out. They are dropped, as `Set-Cookie` is."""
    http_server.responses.append((200, {}, 0, {**ORIGIN_POLICIES, "X-Kept": "1"}))
    extra = {"HTTP_X_REQUEST_NONCE": nonce} if nonce else {}
    response = raw(active, "get", f"{active.proxy}/x", **extra)
    assert (response.status_code, response["X-Kept"]) == (200, "1")
    assert [name for name in ORIGIN_POLICIES if response.has_header(name)] == []
    assert books(active) == (PRICE, 0)
    if nonce:  # the stored reply, answered to a retry; one stored with them before they were dropped, too
        stored = ProxyReplay.objects.get(request_nonce=nonce)
        assert [name for name in ORIGIN_POLICIES if name in stored.headers] == []
        stored.headers = {**stored.headers, **ORIGIN_POLICIES}
        stored.save(update_fields=["headers"])
        again = raw(active, "get", f"{active.proxy}/x", **extra)
        assert again["X-Replayed"] == "true" and again["X-Kept"] == "1"
        assert [name for name in ORIGIN_POLICIES if again.has_header(name)] == []


def test_the_host_header_names_the_upstreams_host_not_the_credentials_in_its_url(escrow_chain, http_server,
                                                                                django_capture_on_commit_callbacks):
    # RFC 9110 4.2.4: no userinfo in a field value. The Host was the URL's netloc, credentials and all. (A URL saved
    # with credentials before they were refused, 400 credentials_in_url: sent by no client, as Basic neither.)
    host = http_server.url.split("//")[1]
    parties = Parties(escrow_chain, upstream_base_url=f"http://{host}/base")
    Service.objects.filter(pk=parties.service.pk).update(upstream_base_url=f"http://seller:hunter2@{host}/base")
    agreement = parties.accepted_agreement(quantity=5)
    assert parties.activate(agreement["id"], django_capture_on_commit_callbacks).status_code == 202
    assert parties.buyer_api.get(f"/metered-proxy/{agreement['id']}/x").status_code == 200
    [forwarded] = http_server.requests
    assert forwarded.headers["Host"] == host and "Authorization" not in forwarded.headers


@pytest.mark.parametrize(("name", "a_label"), [("bücher.example", "xn--bcher-kva.example"),
                                               ("中文.example", "xn--fiq228c.example"),
                                               # IDNA 2003 (Python's codec) made it strasse.example, another name
                                               ("straße.example", "xn--strae-oqa.example")])
def test_the_host_header_of_an_upstream_with_an_international_name_is_its_a_labels(
        escrow_chain, http_server, django_capture_on_commit_callbacks, name, a_label):
    # The Host was the name as typed, sent as latin-1 (a "ü" byte) or not at all (any other script: 502).
    port = http_server.url.rsplit(":", 1)[1]
    parties = Parties(escrow_chain, upstream_base_url=f"http://{name}:{port}/base")
    agreement = parties.accepted_agreement(quantity=5)
    assert parties.activate(agreement["id"], django_capture_on_commit_callbacks).status_code == 202
    with routed("127.0.0.1", "127.0.0.1", names=(a_label,)):  # the name as the skills' calls resolve it
        response = parties.buyer_api.get(f"/metered-proxy/{agreement['id']}/x")
    assert response.status_code == 200, response.content
    [forwarded] = http_server.requests
    assert forwarded.headers["Host"] == f"{a_label}:{port}"


def test_behind_a_trusted_proxy_the_seller_is_told_the_clients_address_not_the_balancers(active, http_server,
                                                                                          settings):
    settings.REST_FRAMEWORK = {**settings.REST_FRAMEWORK, "NUM_PROXIES": 1}  # TRUSTED_PROXY_COUNT=1
    response = raw(active, "get", f"{active.proxy}/x", HTTP_X_FORWARDED_FOR="6.6.6.6, 203.0.113.9",
                   REMOTE_ADDR="10.0.0.2")  # the balancer appended the client's address to what the client claimed
    assert response.status_code == 200
    [forwarded] = http_server.requests
    assert forwarded.headers["X-Forwarded-For"] == "203.0.113.9"


def test_the_seller_cannot_forge_the_marketplaces_own_answer_headers(active, http_server):
    """Its X-Usage-Cost or X-Escrow-Remaining (in another case than ours) reached the buyer on a replay beside ours,
    and its X-Usage-Event-Id and X-Usage-Seq on a call that was not charged."""
    http_server.responses.append((200, {}, 0, {"x-usage-cost": "0", "x-escrow-remaining": "999999999",
                                               "x-replayed": "false"}))
    http_server.responses.append((503, {}, 0, {"X-Usage-Event-Id": "4242", "X-Usage-Seq": "7"}))
    first = raw(active, "get", f"{active.proxy}/report", HTTP_X_REQUEST_NONCE="forge-1")
    again = raw(active, "get", f"{active.proxy}/report", HTTP_X_REQUEST_NONCE="forge-1")
    assert (first["X-Usage-Cost"], first["X-Escrow-Remaining"]) == (str(PRICE), str(4 * PRICE))
    assert (again["X-Usage-Cost"], again["X-Escrow-Remaining"], again["X-Replayed"]) == (
        str(PRICE), str(4 * PRICE), "true")
    uncharged = raw(active, "get", f"{active.proxy}/report")
    assert (uncharged.status_code, uncharged["X-Usage-Cost"]) == (503, "0")
    assert not uncharged.has_header("X-Usage-Event-Id") and not uncharged.has_header("X-Usage-Seq")
    assert books(active) == (PRICE, 0)


@pytest.mark.parametrize("value", ["a\r\n b", "a\x00b"], ids=["folded", "nul"])
def test_an_upstream_header_with_a_line_break_or_nul_is_dropped_not_a_500_after_the_charge(active, http_server,
                                                                                          value):
    """http.client keeps an obs-folded header's line break, which Django refuses to send; PostgreSQL stores no NUL
    (the reply kept for X-Request-Nonce): either was a 500 after the call was charged."""
    http_server.responses.append((200, {"n": 1}, 0, {"X-Note": value, "X-Kept": "1"}))
    first = raw(active, "get", f"{active.proxy}/x", HTTP_X_REQUEST_NONCE="note-1")
    again = raw(active, "get", f"{active.proxy}/x", HTTP_X_REQUEST_NONCE="note-1")
    assert (first.status_code, again.status_code, again["X-Replayed"]) == (200, 200, "true")
    assert not first.has_header("X-Note") and first["X-Kept"] == again["X-Kept"] == "1"
    assert len(http_server.requests) == 1 and books(active) == (PRICE, 0)


@pytest.mark.parametrize("query", ["q=\u00e9", "q=a b", "q=\x01"])
def test_a_query_string_not_percent_encoded_is_400_and_never_forwarded(active, http_server, query):
    """http.client refuses to send it: the call was answered 502, as if the seller could not be reached."""
    response = raw(active, "get", f"{active.proxy}/work", QUERY_STRING=query)
    assert (response.status_code, error_code(response)) == (400, "invalid_upstream_path")
    assert http_server.requests == [] and books(active) == (0, 0)


@contextmanager
def _dribbling(head: bytes, *, drip: bytes, times: int, pause: float, tail: bytes = b"",
               reset: bool = False) -> Iterator[str]:
    """An upstream answering one call with `head`, then `drip` every `pause` seconds `times` times, then `tail`,
    then closing the connection (resetting it when `reset`); yields its base URL."""
    listener = socket.create_server(("127.0.0.1", 0))

    def dribble():
        upstream, _ = listener.accept()
        with upstream:
            upstream.recv(65536)
            try:
                upstream.sendall(head)
                for _ in range(times):
                    time.sleep(pause)
                    upstream.sendall(drip)
                upstream.sendall(tail)
                if reset:  # closed with a RST rather than a FIN
                    upstream.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            except OSError:
                pass  # cut off

    threading.Thread(target=dribble, daemon=True).start()
    with listener:
        yield f"http://127.0.0.1:{listener.getsockname()[1]}/api"


def test_an_upstream_dribbling_its_answer_head_is_cut_off_at_the_proxy_timeout(escrow_chain, settings,
                                                                             django_capture_on_commit_callbacks):
    """PROXY_TIMEOUT bounded each read of the socket only: an upstream sending its head a byte at a time held the
    call, and its reservation, for as long as it liked (past the reaper's rule)."""
    # A byte every 0.25 s: each read is quick, the head takes 3 s.
    with _dribbling(b"HTTP/1.1 200 OK\r\nX-Slow: ", drip=b"a", times=12, pause=0.25,
                    tail=b"\r\nContent-Length: 2\r\n\r\n{}") as upstream_url:
        active = active_agreement(escrow_chain, django_capture_on_commit_callbacks, upstream_url)
        settings.PROXY_TIMEOUT = 0.5
        started = time.monotonic()
        response = raw(active, "get", f"{active.proxy}/slow")
        elapsed = time.monotonic() - started
    assert (response.status_code, error_code(response)) == (504, "upstream_timeout")
    assert elapsed < 1.5 and books(active) == (0, 0)


def test_a_nonce_reused_on_another_call_is_422(active, http_server):
    nonce = {"HTTP_X_REQUEST_NONCE": "n-1"}
    first = raw(active, "post", f"{active.proxy}/a", data=b'{"a": 1}', content_type="application/json", **nonce)
    assert first.status_code == 200
    others = [raw(active, "post", f"{active.proxy}/b", data=b'{"a": 1}', content_type="application/json", **nonce),
              raw(active, "put", f"{active.proxy}/a", data=b'{"a": 1}', content_type="application/json", **nonce),
              raw(active, "post", f"{active.proxy}/a", data=b'{"a": 2}', content_type="application/json", **nonce),
              raw(active, "post", f"{active.proxy}/a?q=1", data=b'{"a": 1}', content_type="application/json",
                  **nonce)]
    for response in others:
        assert response.status_code == 422, response.content
        assert error_code(response) == "nonce_reused"
    again = raw(active, "post", f"{active.proxy}/a", data=b'{"a": 1}', content_type="application/json", **nonce)
    assert again.status_code == 200 and again["X-Replayed"] == "true"
    assert len(http_server.requests) == 1 and books(active) == (PRICE, 0)


def test_a_dead_call_the_reaper_cannot_settle_is_logged_and_skipped_and_the_others_are_settled(
        active, settings, monkeypatch, caplog):
    """One nonce replay whose settling raised (bad data, a bug) ended the reaper's run at every beat: every replay
    after it kept its nonce claimed, its retries 409 `request_in_progress` for ever."""
    from agreements import tasks
    from marketplace.sweeps import RowsFailed

    agreement = UsageAgreement.objects.get(pk=active.agreement_id)
    for nonce in ("poisoned", "dead-1", "dead-2"):
        ProxyReplay.objects.create(agreement=agreement, request_nonce=nonce,
                                   request_fingerprint=proxy.request_fingerprint("GET", "/work", b""))
    ProxyReplay.objects.update(created_at=timezone.now() - timedelta(hours=1))
    real_settle = metering.replay_settle

    def replay_settle(*, agreement_id, request_nonce):
        if request_nonce == "poisoned":
            raise RuntimeError("this replay always fails")
        return real_settle(agreement_id=agreement_id, request_nonce=request_nonce)

    monkeypatch.setattr(metering, "replay_settle", replay_settle)
    with pytest.raises(RowsFailed) as failed:
        tasks.reap_call_intents()
    poisoned = ProxyReplay.objects.get(request_nonce="poisoned")
    assert failed.value.failed == [poisoned.pk] and failed.value.applied == 2
    assert list(ProxyReplay.objects.values_list("request_nonce", flat=True)) == ["poisoned"]
    assert str(poisoned.pk) in caplog.text and "this replay always fails" in caplog.text


def test_an_agreement_whose_dead_calls_the_reaper_cannot_settle_leaves_the_other_agreements_settled(
        active, escrow_chain, http_server, monkeypatch):
    """The reaper took its agreements from the first 500 stale intents, not the first 500 agreements: one agreement
    with 500 dead calls whose settling raised (bad data, a bug) filled that window at every run, oldest first, and
    no other agreement's dead call was settled again, its budget reserved and its nonce claimed for ever."""
    from agreements import tasks
    from marketplace.sweeps import RowsFailed

    other = Parties(escrow_chain, upstream_base_url=http_server.url + "/base")
    poisoned = UsageAgreement.objects.get(pk=other.accepted_agreement(quantity=5)["id"])
    CallIntent.objects.bulk_create(
        CallIntent(agreement=poisoned, amount=PRICE, call_seq=seq, request_id=f"req-{seq}", method="GET",
                   path="/work", created_at=timezone.now() - timedelta(hours=2)) for seq in range(1, 501))
    agreement = UsageAgreement.objects.get(pk=active.agreement_id)
    metering.reservation_take(agreement=agreement, amount=PRICE, request_id="req-dead", request_nonce="",
                              method="GET", path="/work")
    CallIntent.objects.filter(agreement=agreement).update(created_at=timezone.now() - timedelta(hours=1))
    assert books(active) == (0, PRICE)
    settle = metering._intents_settle

    def intents_settle(*, agreement_id, created_before):
        if agreement_id == poisoned.pk:
            raise RuntimeError("this agreement's dead calls always fail")
        return settle(agreement_id=agreement_id, created_before=created_before)

    monkeypatch.setattr(metering, "_intents_settle", intents_settle)
    with pytest.raises(RowsFailed) as failed:
        tasks.reap_call_intents()
    assert failed.value.failed == [poisoned.pk]
    assert books(active) == (0, 0) and not CallIntent.objects.filter(agreement=agreement).exists()


def test_agreements_whose_dead_calls_the_reaper_cannot_settle_do_not_keep_the_others_from_their_turn(
        active, escrow_chain, http_server, monkeypatch):
    """The reaper settles a bounded number of agreements' dead calls a run: those whose settling always raised stayed
    due and, as many as the bound, were the ones taken at every run (in no order), so no other agreement's dead call
    was ever settled, its budget reserved for ever. Each run takes up after the last."""
    from agreements import tasks

    other = Parties(escrow_chain, upstream_base_url=http_server.url + "/base")
    dead = [active.agreement_id, other.accepted_agreement(quantity=5)["id"]]
    for agreement_id in dead:  # a call reserved, whose process died (the other's, as the reaper finds it)
        UsageAgreement.objects.filter(pk=agreement_id).update(reserved=PRICE)
        CallIntent.objects.create(agreement_id=agreement_id, amount=PRICE, call_seq=1, request_id="req-dead",
                                  method="GET", path="/work", created_at=timezone.now() - timedelta(hours=1))
    monkeypatch.setattr(metering, "AGREEMENTS_REAPED_PER_RUN", 1)
    monkeypatch.setattr(metering, "_intents_settle", first_row_always_fails(metering._intents_settle,
                                                                            row="agreement_id"))
    sweep_runs(tasks.reap_call_intents, runs=2)
    assert CallIntent.objects.filter(agreement_id__in=dead).count() == 1  # the poisoned agreement's alone


def test_nonce_replays_the_reaper_cannot_settle_do_not_keep_the_others_from_their_turn(active, monkeypatch):
    """Likewise the nonce replays of dead calls, a bounded number a run: as many whose settling always raised were
    the ones taken at every run, and no other nonce was answered again (its retries 409 `request_in_progress`)."""
    from agreements import tasks

    agreement = UsageAgreement.objects.get(pk=active.agreement_id)
    for nonce in ("dead-1", "dead-2"):
        ProxyReplay.objects.create(agreement=agreement, request_nonce=nonce,
                                   request_fingerprint=proxy.request_fingerprint("GET", "/work", b""))
    ProxyReplay.objects.update(created_at=timezone.now() - timedelta(hours=1))
    monkeypatch.setattr(metering, "REPLAYS_REAPED_PER_RUN", 1)
    monkeypatch.setattr(metering, "replay_settle", first_row_always_fails(metering.replay_settle,
                                                                          row="request_nonce"))
    sweep_runs(tasks.reap_call_intents, runs=2)
    assert ProxyReplay.objects.count() == 1  # the poisoned one alone


def test_nonces_of_dead_calls_the_reaper_cannot_settle_leave_the_other_nonces_answered(
        active, escrow_chain, http_server, monkeypatch):
    """The reaper read the first 500 unanswered nonce replays and skipped those whose call was not settled yet: 500
    of one agreement whose dead calls fail to settle filled that window at every run, and no other agreement's
    nonce was answered again, its retries 409 `request_in_progress` for ever."""
    from agreements import tasks
    from marketplace.sweeps import RowsFailed

    other = Parties(escrow_chain, upstream_base_url=http_server.url + "/base")
    poisoned = UsageAgreement.objects.get(pk=other.accepted_agreement(quantity=5)["id"])
    fingerprint = proxy.request_fingerprint("GET", "/work", b"")
    ProxyReplay.objects.bulk_create(ProxyReplay(agreement=poisoned, request_nonce=f"n-{seq}",
                                                request_fingerprint=fingerprint) for seq in range(1, 501))
    CallIntent.objects.bulk_create(
        CallIntent(agreement=poisoned, amount=PRICE, call_seq=seq, request_id=f"req-{seq}", request_nonce=f"n-{seq}",
                   method="GET", path="/work", created_at=timezone.now()) for seq in range(1, 501))
    agreement = UsageAgreement.objects.get(pk=active.agreement_id)
    ProxyReplay.objects.create(agreement=agreement, request_nonce="dead", request_fingerprint=fingerprint)
    metering.reservation_take(agreement=agreement, amount=PRICE, request_id="req-dead", request_nonce="dead",
                              method="GET", path="/work")
    ProxyReplay.objects.update(created_at=timezone.now() - timedelta(hours=1))
    CallIntent.objects.update(created_at=timezone.now() - timedelta(hours=1))
    settle = metering._intents_settle

    def intents_settle(*, agreement_id, created_before):
        if agreement_id == poisoned.pk:
            raise RuntimeError("this agreement's dead calls always fail")
        return settle(agreement_id=agreement_id, created_before=created_before)

    monkeypatch.setattr(metering, "_intents_settle", intents_settle)
    with pytest.raises(RowsFailed) as failed:
        tasks.reap_call_intents()
    assert failed.value.failed == [poisoned.pk]
    assert books(active) == (0, 0)
    assert not ProxyReplay.objects.filter(agreement=agreement).exists()  # released: the nonce is free again
    assert ProxyReplay.objects.filter(agreement=poisoned).count() == 500  # theirs wait for their calls


def test_the_reaper_settles_calls_whose_process_died(active, settings):
    """What a server process that died mid-call leaves: a reservation with its intent, the answer recorded or not,
    a nonce claimed. The reaper charges the answered call, releases the other, and answers the nonces."""
    agreement = UsageAgreement.objects.get(pk=active.agreement_id)

    def dead_call(nonce: str):
        ProxyReplay.objects.create(agreement=agreement, request_nonce=nonce,
                                   request_fingerprint=proxy.request_fingerprint("GET", "/work", b""))
        return metering.reservation_take(agreement=agreement, amount=PRICE, request_id=f"req-{nonce}",
                                         request_nonce=nonce, method="GET", path="/work")

    answered, forwarding = dead_call("answered"), dead_call("forwarding")
    metering.reservation_answered(reservation=answered, charge={
        "units": 1, "cost": PRICE, "upstream_status": 200, "latency_ms": 5, "request_id": "req-answered",
        "request_nonce": "answered", "method": "GET", "path": "/work"})
    assert books(active) == (0, 2 * PRICE)

    assert metering.intents_reap() == {"charged": 0, "released": 0, "replays": 0}  # not stale yet: maybe alive
    later = timezone.now() + timedelta(seconds=settings.PROXY_TIMEOUT + settings.PROXY_INTENT_GRACE_SECONDS + 1)
    assert metering.intents_reap(now=later) == {"charged": 1, "released": 1, "replays": 2}
    assert metering.intents_reap(now=later) == {"charged": 0, "released": 0, "replays": 0}  # idempotent
    assert books(active) == (PRICE, 0) and not CallIntent.objects.exists()
    [event] = UsageEvent.objects.filter(agreement=agreement)
    assert (event.request_id, event.request_nonce, event.cost, event.seq) == ("req-answered", "answered", PRICE, 1)
    assert event.receipt_signature

    replayed = raw(active, "get", f"{active.proxy}/work", HTTP_X_REQUEST_NONCE="answered")
    assert (replayed.status_code, error_code(replayed)) == (502, "reply_lost")  # charged; the answer is lost
    assert replayed["X-Usage-Event-Id"] == str(event.pk) and replayed["X-Replayed"] == "true"
    assert not ProxyReplay.objects.filter(request_nonce="forwarding").exists()  # free to be used again

    # A process that comes back late finds its call settled: charged once, never twice.
    with pytest.raises(DependencyUnavailable) as late:
        metering.reservation_commit(reservation=forwarding, units=1, cost=PRICE, request_id="req-forwarding",
                                    request_nonce="forwarding", method="GET", path="/work", upstream_status=200,
                                    latency_ms=5)
    assert late.value.code == "call_expired"
    assert metering.reservation_commit(reservation=answered, units=1, cost=PRICE, request_id="req-answered",
                                       request_nonce="answered", method="GET", path="/work", upstream_status=200,
                                       latency_ms=5) == event
    metering.reservation_release(reservation=forwarding)
    assert books(active) == (PRICE, 0)


def test_per_unit_calls_charge_the_units_served_never_more_than_x_max_units(per_unit, http_server):
    http_server.responses.append((200, {}, 0, {"X-Usage-Units": "9"}))  # more than the buyer allowed
    http_server.responses.append((200, {}, 0, {"X-Usage-Units": "3"}))
    capped = raw(per_unit, "get", f"{per_unit.proxy}/pages", HTTP_X_MAX_UNITS="2")
    served = raw(per_unit, "get", f"{per_unit.proxy}/pages", HTTP_X_MAX_UNITS="3")
    assert (capped.status_code, capped["X-Usage-Cost"]) == (200, "20000")
    assert (served.status_code, served["X-Usage-Cost"]) == (200, "30000")
    assert [request.headers["X-Marketplace-Max-Units"] for request in http_server.requests] == ["2", "3"]
    assert [event.units for event in UsageEvent.objects.order_by("seq")] == [2, 3]
    assert books(per_unit) == (50_000, 0)
    refused = raw(per_unit, "get", f"{per_unit.proxy}/pages")  # the deposit is used up: nothing left to reserve
    assert refused.status_code == 402 and len(http_server.requests) == 2


def test_the_units_a_buyer_is_told_are_the_units_it_was_charged_not_the_sellers_claim(per_unit, http_server):
    """X-Usage-Units on the buyer's answer is the charge's, as X-Usage-Cost is: the seller's own header (more than
    the buyer allowed, or no count at all) passed on beside the cost of what was charged, and stored for the nonce's
    replays, told the buyer it was served other units than its usage event says."""
    http_server.responses.append((200, {}, 0, {"X-Usage-Units": "9"}))  # more than the buyer allowed
    http_server.responses.append((200, {}, 0, {"X-Usage-Units": "²"}))  # no count: one unit
    http_server.responses.append((500, {}, 0, {"X-Usage-Units": "3"}))  # not charged
    capped = raw(per_unit, "get", f"{per_unit.proxy}/pages", HTTP_X_MAX_UNITS="2", HTTP_X_REQUEST_NONCE="pages-1")
    replayed = raw(per_unit, "get", f"{per_unit.proxy}/pages", HTTP_X_MAX_UNITS="2", HTTP_X_REQUEST_NONCE="pages-1")
    uncounted = raw(per_unit, "get", f"{per_unit.proxy}/pages", HTTP_X_MAX_UNITS="2")
    failed = raw(per_unit, "get", f"{per_unit.proxy}/pages", HTTP_X_MAX_UNITS="2")
    units = {event.pk: event.units for event in UsageEvent.objects.all()}
    assert [(response.status_code, response.get("X-Usage-Units"), response["X-Usage-Cost"])
            for response in (capped, replayed, uncounted, failed)] == [
        (200, "2", "20000"), (200, "2", "20000"), (200, "1", "10000"), (500, None, "0")]
    assert [units[int(response["X-Usage-Event-Id"])] for response in (capped, uncounted)] == [2, 1]


def test_a_reply_too_large_to_store_is_answered_in_full_once_and_charged_once(active, http_server, settings):
    settings.PROXY_REPLAY_MAX_BYTES = 100
    http_server.responses.append((200, {"text": "x" * 500}))
    first = raw(active, "get", f"{active.proxy}/report", HTTP_X_REQUEST_NONCE="report-1")
    assert first.status_code == 200 and json.loads(b"".join(first.streaming_content)) == {"text": "x" * 500}
    again = raw(active, "get", f"{active.proxy}/report", HTTP_X_REQUEST_NONCE="report-1")
    assert again.status_code == 200 and again["X-Replayed"] == "true"
    assert error_code(again) == "reply_too_large_to_store"
    assert again["X-Usage-Cost"] == first["X-Usage-Cost"] and again["X-Usage-Seq"] == first["X-Usage-Seq"] == "1"
    assert len(http_server.requests) == 1
    assert books(active) == (int(first["X-Usage-Cost"]), 0) and UsageEvent.objects.count() == 1


def test_a_large_reply_with_a_nonce_is_answered_without_being_held_in_memory(active, http_server, settings):
    """A reply too large to store for replays was read whole into memory before it was answered: a seller's
    gigabyte answer to a call with an X-Request-Nonce held a gigabyte in the server process."""
    settings.PROXY_REPLAY_MAX_BYTES = 1000
    body = b"x" * 20_000_000
    http_server.responses.append((200, body))
    tracemalloc.start()
    try:
        first = unread(active, "get", f"{active.proxy}/archive", HTTP_X_REQUEST_NONCE="archive-1")
        held = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert first.status_code == 200 and first["X-Usage-Seq"] == "1"
    assert held < 2_000_000
    assert b"".join(first.streaming_content) == body
    again = raw(active, "get", f"{active.proxy}/archive", HTTP_X_REQUEST_NONCE="archive-1")
    assert again["X-Replayed"] == "true" and error_code(again) == "reply_too_large_to_store"
    assert len(http_server.requests) == 1 and UsageEvent.objects.count() == 1


def test_a_reply_in_tiny_chunks_with_a_nonce_holds_about_its_size_not_an_object_per_chunk(escrow_chain, settings,
                                                                                       django_capture_on_commit_callbacks):
    """A reply kept for X-Request-Nonce replays was held as the list of the pieces the upstream sent it in: in 2-byte
    chunks, ~40 bytes of objects per 2 bytes, so PROXY_REPLAY_MAX_BYTES (10 MiB) held ~200 MB per call."""
    size = 200_000
    chunked = b"".join(b"2\r\nab\r\n" for _ in range(size // 2)) + b"0\r\n\r\n"
    with _dribbling(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n" + chunked,
                    drip=b"", times=0, pause=0) as upstream_url:
        active = active_agreement(escrow_chain, django_capture_on_commit_callbacks, upstream_url)
        settings.PROXY_REPLAY_MAX_BYTES = size
        tracemalloc.start()
        try:
            first = raw(active, "get", f"{active.proxy}/pieces", HTTP_X_REQUEST_NONCE="pieces-1")
            held = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
    assert first.status_code == 200 and _body(first) == b"ab" * (size // 2)
    assert held < 20 * size, f"{held / 2**20:.1f} MiB held for a {size // 1000} kB reply"  # 63 times before
    assert ProxyReplay.objects.get(request_nonce="pieces-1").body == b"ab" * (size // 2)


def test_an_upstreams_early_hints_are_skipped_and_each_call_gets_its_own_answer(escrow_chain, settings,
                                                                              django_capture_on_commit_callbacks):
    """http.client skips only 100 Continue: a 103 Early Hints (or a 102) was taken for the call's answer, empty, and
    its connection kept alive with the real answer unread in it, which the next call on that connection, another
    buyer's of the seller, was then given (and charged for)."""
    listener = socket.create_server(("127.0.0.1", 0))

    def upstream():
        connection, _ = listener.accept()
        with connection:
            for answer in (b"HTTP/1.1 103 Early Hints\r\nLink: </style.css>; rel=preload\r\n\r\n"
                           b"HTTP/1.1 102 Processing\r\n\r\n"
                           b"HTTP/1.1 200 OK\r\nContent-Length: 13\r\n\r\nfor-the-first",
                           b"HTTP/1.1 200 OK\r\nContent-Length: 14\r\n\r\nfor-the-second"):
                request = b""
                while b"\r\n\r\n" not in request:
                    request += connection.recv(65536)
                connection.sendall(answer)
            connection.recv(1)

    threading.Thread(target=upstream, daemon=True).start()
    with listener:
        active = active_agreement(escrow_chain, django_capture_on_commit_callbacks,
                                  f"http://127.0.0.1:{listener.getsockname()[1]}/api")
        first, second = (raw(active, "get", f"{active.proxy}/{name}") for name in ("first", "second"))
    assert (first.status_code, _body(first)) == (200, b"for-the-first")
    assert (second.status_code, _body(second)) == (200, b"for-the-second")
    assert books(active) == (2 * PRICE, 0)


@pytest.mark.parametrize("head", [
    b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\nnot-http",
    b"HTTP/1.1 600 Odd\r\nContent-Length: 2\r\n\r\n{}",
    b"HTTP/1.1 999 Odd\r\nContent-Length: 2\r\n\r\n{}",
    b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nContent-Length: 60\r\n\r\n{}",
    b"HTTP/1.1 200 OK\r\nContent-Length: -2\r\nConnection: close\r\n\r\n{}",
    b"HTTP/1.1 200 OK\r\nX-Usage-Cost : 999\r\nContent-Length: 2\r\n\r\n{}",
    b"HTTP/1.1 200 OK\r\n no-field-name\r\nContent-Length: 2\r\n\r\n{}",
], ids=["101", "600", "999", "content-lengths-differ", "content-length-no-number", "space-before-colon",
        "head-opens-with-a-continuation"])
def test_an_upstream_answer_no_reply_can_carry_is_502_and_charges_nothing(escrow_chain, head,
                                                                        django_capture_on_commit_callbacks):
    """A seller's 101 Switching Protocols was charged as served (the buyer given an empty 101, the connection kept
    for the next call with the other protocol in it); a status past 599 was a 500 internal_error (Django's answers
    carry 100-599 only); Content-Lengths that differ were charged, the body read by the first and the buyer told
    the last (a client waiting for bytes that never come), as was a length that is no number. A header line http.client
    cannot read (a space before its colon) ended its reading of the head: every header after it was taken for the body,
    the call charged and the buyer's answer cut off at the answer's timeout."""
    with _dribbling(head, drip=b"", times=0, pause=0) as upstream_url:
        active = active_agreement(escrow_chain, django_capture_on_commit_callbacks, upstream_url)
        answer = raw(active, "get", f"{active.proxy}/odd", HTTP_X_REQUEST_NONCE="odd-1")
    assert (answer.status_code, error_code(answer)) == (502, "upstream_unavailable"), answer.content
    assert books(active) == (0, 0) and not UsageEvent.objects.exists()
    assert not ProxyReplay.objects.exists()


def test_a_content_length_beside_chunked_coding_is_not_passed_on(escrow_chain, django_capture_on_commit_callbacks):
    """The proxy passed on the upstream's Content-Length beside `Transfer-Encoding: chunked`, while it streams the
    body de-chunked: the buyer was told 50 bytes and given 2 (RFC 9112 6.1: the length must be removed)."""
    head = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nContent-Length: 50\r\n\r\n2\r\nab\r\n0\r\n\r\n"
    with _dribbling(head, drip=b"", times=0, pause=0) as upstream_url:
        active = active_agreement(escrow_chain, django_capture_on_commit_callbacks, upstream_url)
        answer = raw(active, "get", f"{active.proxy}/chunks")
    assert (answer.status_code, _body(answer), answer.get("Content-Length")) == (200, b"ab", None)
    assert books(active) == (PRICE, 0)


def test_the_replayed_note_of_a_reply_too_large_to_store_has_its_own_length_and_type(active, http_server, settings):
    """The note was stored with the upstream body's Content-Length, Content-Encoding and Content-Type."""
    settings.PROXY_REPLAY_MAX_BYTES = 100
    http_server.responses.append((200, b"x" * 500, 0, {"Content-Type": "text/plain", "Content-Encoding": "identity"}))
    first = raw(active, "get", f"{active.proxy}/report", HTTP_X_REQUEST_NONCE="report-1")
    assert b"".join(first.streaming_content) == b"x" * 500
    again = raw(active, "get", f"{active.proxy}/report", HTTP_X_REQUEST_NONCE="report-1")
    assert error_code(again) == "reply_too_large_to_store"
    assert again.get("Content-Length") in (None, str(len(again.content)))
    assert not again.has_header("Content-Encoding") and again["Content-Type"] == "application/json"


def test_an_upstream_dribbling_its_answer_body_is_cut_off_at_the_answer_timeout(escrow_chain, settings,
                                                                               django_capture_on_commit_callbacks):
    """The body was bounded per read only (PROXY_TIMEOUT each): an upstream answering its head at once, then its
    body a byte at a time, held the web thread streaming it for as long as it liked, for one call's price."""
    # A byte every 0.1 s: each read is quick, the body takes 4 s.
    with _dribbling(b"HTTP/1.1 200 OK\r\nContent-Length: 40\r\n\r\n", drip=b"a", times=40, pause=0.1) as upstream_url:
        active = active_agreement(escrow_chain, django_capture_on_commit_callbacks, upstream_url)
        settings.PROXY_ANSWER_TIMEOUT = 0.8
        started = time.monotonic()
        response = unread(active, "get", f"{active.proxy}/slow")
        assert response.status_code == 200  # the head came in time: charged, its body streams
        with pytest.raises(TimeoutError):
            b"".join(response.streaming_content)
        elapsed = time.monotonic() - started
    assert elapsed < 2.0
    assert books(active) == (PRICE, 0)


@pytest.mark.parametrize("guard", ["on", "off"])
def test_an_upstream_whose_name_never_resolves_is_504_within_the_connect_timeout_and_charges_nothing(
        escrow_chain, settings, django_capture_on_commit_callbacks, guard):
    """The system resolver has no timeout: a seller pointing its upstream's name at a DNS server that never answers
    held the call, its web thread and its reservation for as long as the resolver kept asking (tens of seconds),
    past PROXY_CONNECT_TIMEOUT, whether the address guard resolved the name or the socket did (guard off)."""
    with unanswered_names() as lookups:
        active = active_agreement(escrow_chain, django_capture_on_commit_callbacks,
                                  f"http://{UNANSWERED}:8080/api")
        settings.ALLOW_PRIVATE_UPSTREAMS = guard == "off"
        settings.PROXY_CONNECT_TIMEOUT = 0.5
        started = time.monotonic()
        response = raw(active, "get", f"{active.proxy}/slow")
        elapsed = time.monotonic() - started
    assert lookups.began == 1
    assert elapsed < 1.0, f"the call took {elapsed:.1f} s with PROXY_CONNECT_TIMEOUT=0.5"
    assert (response.status_code, error_code(response)) == (504, "upstream_timeout")
    assert books(active) == (0, 0)


def test_calls_to_a_name_that_never_resolves_wait_on_one_lookup(escrow_chain, settings,
                                                               django_capture_on_commit_callbacks):
    """A lookup that outlasts its call keeps its thread until the system resolver gives up: calls to that name
    meanwhile wait on it rather than each start another (and take another thread)."""
    settings.PROXY_CONNECT_TIMEOUT = 0.3
    with unanswered_names() as lookups:
        stuck = active_agreement(escrow_chain, django_capture_on_commit_callbacks, f"http://{UNANSWERED}:8080/api")
        for _ in range(3):
            assert error_code(raw(stuck, "get", f"{stuck.proxy}/a")) == "upstream_timeout"
        assert (lookups.began, lookups.blocked) == (1, 1)
    assert books(stuck) == (0, 0)


def test_once_the_resolvers_threads_all_wait_a_call_to_another_name_is_refused_at_once(
        escrow_chain, settings, django_capture_on_commit_callbacks, monkeypatch):
    """Lookups that never end hold at most the resolver's threads: another name is then refused at once (502,
    nothing charged) rather than given a thread more or queued behind them."""
    monkeypatch.setattr(outbound.RESOLVER, "threads", 2)
    with unanswered_names() as lookups:
        stuck = active_agreement(escrow_chain, django_capture_on_commit_callbacks, f"http://{UNANSWERED}:8080/api")
        for name in ("a", "b"):  # other sellers' names, whose lookups outlasted their calls
            with pytest.raises(TimeoutError):
                outbound.RESOLVER.getaddrinfo(f"{name}.{UNANSWERED}", 80, timeout=0.01)
        started = time.monotonic()
        refused = raw(stuck, "get", f"{stuck.proxy}/a")
        elapsed = time.monotonic() - started
        assert (lookups.began, lookups.blocked) == (2, 2)
    assert (refused.status_code, error_code(refused)) == (502, "upstream_unavailable")
    assert elapsed < 1.0, f"the call took {elapsed:.1f} s (PROXY_CONNECT_TIMEOUT: {settings.PROXY_CONNECT_TIMEOUT:g})"
    assert books(stuck) == (0, 0)


def test_more_query_fields_than_django_reads_are_forwarded_as_they_are(active, http_server, settings, caplog):
    """The proxy does not parse the query string (the seller does): more fields than Django reads are no 500."""
    query = "&".join(f"f{n}=1" for n in range(settings.DATA_UPLOAD_MAX_NUMBER_FIELDS + 1))
    response = raw(active, "get", f"{active.proxy}/work?{query}")
    assert response.status_code == 200, response.content
    [forwarded] = http_server.requests
    assert forwarded.path == f"/base/work?{query}"
    assert books(active) == (PRICE, 0) and not [record for record in caplog.records if record.exc_info]  # no traceback


@pytest.mark.parametrize("size", [64 * 1024, 1024 * 1024])
def test_a_query_string_longer_than_the_proxy_forwards_is_414_and_never_forwarded(active, http_server, size,
                                                                                   caplog):
    """It was forwarded whole; the upstream refused it (414) and the call was charged as answered below 500."""
    response = raw(active, "get", f"{active.proxy}/work", QUERY_STRING="q=" + "a" * size)
    assert (response.status_code, error_code(response)) == (414, "upstream_url_too_long"), response.content
    assert http_server.requests == [] and books(active) == (0, 0) and not CallIntent.objects.exists()
    assert no_errors_logged(caplog)


def test_a_path_longer_than_the_proxy_forwards_is_414_and_never_forwarded(active, http_server, caplog):
    response = raw(active, "get", f"{active.proxy}/" + "%C3%A9/" * 2000)  # 6 bytes a segment once escaped
    assert (response.status_code, error_code(response)) == (414, "upstream_url_too_long"), response.content
    assert http_server.requests == [] and books(active) == (0, 0) and no_errors_logged(caplog)


@pytest.mark.parametrize(("path", "status", "forwarded_path"), [
    ("/evil.example/x", 200, "/base/evil.example/x"),  # a path on the seller's host, under its base path
    ("a%2F..%2F..%2Fx", 400, None),
    ("a/%0d%0aX-Injected:%201", 400, None),
    ("a%0a", 400, None),
    ("a%00b", 200, "/base/a%00b"),
])
def test_hostile_paths_stay_under_the_base_path_and_escaped(active, http_server, path, status, forwarded_path,
                                                            caplog):
    response = raw(active, "get", f"{active.proxy}/{path}")
    assert response.status_code == status, response.content
    assert status != 400 or error_code(response) == "invalid_upstream_path"
    assert [forwarded.path for forwarded in http_server.requests] == ([forwarded_path] if forwarded_path else [])
    assert books(active) == ((PRICE, 0) if forwarded_path else (0, 0)) and no_errors_logged(caplog)


@pytest.mark.parametrize("base_path", ["", "/base"], ids=["no_base_path", "base_path"])
@pytest.mark.parametrize("path", ["/evil.example/x", "%2F%2Fevil.example/x", "%5C%5Cevil.example/x",
                                  "a/..//evil.example/x", "./%2Fevil.example/x"])
def test_a_path_starting_with_slashes_is_never_forwarded_as_a_scheme_relative_target(
        escrow_chain, http_server, django_capture_on_commit_callbacks, base_path, path):
    """`//evil.example/x` is origin-form (RFC 9112), but many servers and proxies read it as a host to call or
    redirect to: the seller's server, called on its own host when its base URL has no path, could be led there."""
    parties = _active(escrow_chain, http_server, django_capture_on_commit_callbacks, base_path=base_path)
    assert raw(parties, "get", f"{parties.proxy}/{path}").status_code == 200
    assert [forwarded.path for forwarded in http_server.requests] == [f"{base_path}/evil.example/x"]


@pytest.mark.parametrize("query", ["q=%00", "q=%0d%0aX-Injected:%201", "q=a%26b"])
def test_percent_encoded_control_characters_in_the_query_are_forwarded_still_encoded(active, http_server, query):
    response = raw(active, "get", f"{active.proxy}/work?{query}")
    assert response.status_code == 200, response.content
    [forwarded] = http_server.requests
    assert forwarded.path == f"/base/work?{query}" and "X-Injected" not in forwarded.headers
    assert books(active) == (PRICE, 0)


@pytest.mark.parametrize(("path", "forwarded_path"), [
    ("caf%E9", "/base/caf%E9"),  # the finding: forwarded as /base/caf%25E9 (another resource), and charged
    ("caf%e9/%FF%FE", "/base/caf%E9/%FF%FE"),  # escapes' hex digits in upper case: the same URI (RFC 3986 6.2.2.1)
    ("caf%C3%A9", "/base/caf%C3%A9"),
    ("caf%25E9", "/base/caf%25E9"),  # an escaped "%" stays one: not the byte 0xE9
    ("%E9/./x/../%F0%9F%98%80", "/base/%E9/%F0%9F%98%80"),
])
def test_a_path_of_bytes_that_are_not_utf8_reaches_the_seller_as_the_buyer_sent_it(active, http_server, path,
                                                                                    forwarded_path):
    """The web server hands the path over percent-decoded, as latin-1 text of its bytes (granian and the test client
    alike: tests/marketplace/test_serve.py); Django's `path_info` re-escaped the bytes that are not UTF-8 and the
    proxy escaped that again."""
    response = raw(active, "get", f"{active.proxy}/{path}")
    assert response.status_code == 200, response.content
    assert [forwarded.path for forwarded in http_server.requests] == [forwarded_path]
    assert books(active) == (PRICE, 0)
    assert UsageEvent.objects.get(agreement_id=active.agreement_id).path == forwarded_path.removeprefix("/base")


@pytest.mark.parametrize("path", ["%C0%AE%C0%AE/admin", "x/%C0%AE%C0%AE/%C0%AE%C0%AE/admin", "%E0%80%AE%E0%80%AE/admin",
                                  "%C0%AF", "%C1%9C", "%F0%80%80%AE"])
def test_an_overlong_utf8_sequence_in_the_path_is_400_and_never_forwarded(active, http_server, path, caplog):
    """No UTF-8 encoder writes one, and a server that decodes them anyway reads `..`, `/` or a backslash: forwarded as
    the bytes they are, `%C0%AE%C0%AE` was a way out of the base path there."""
    response = raw(active, "get", f"{active.proxy}/{path}")
    assert (response.status_code, error_code(response)) == (400, "invalid_upstream_path"), response.content
    assert http_server.requests == [] and books(active) == (0, 0) and not CallIntent.objects.exists()
    assert no_errors_logged(caplog)


@pytest.mark.parametrize("query", ["q=%E9", "q=caf%C3%A9+au+lait&r=%2B%2F%25E9", "a+b=c+d&%FF"])
def test_a_query_string_with_escapes_that_are_not_utf8_or_pluses_is_forwarded_as_sent(active, http_server, query):
    response = raw(active, "get", f"{active.proxy}/work?{query}")
    assert response.status_code == 200, response.content
    assert [forwarded.path for forwarded in http_server.requests] == [f"/base/work?{query}"]
    assert books(active) == (PRICE, 0)


@pytest.mark.parametrize("path", ["../admin", "%2e%2e/admin", "%2E%2E%2Fadmin", "..%2fadmin", ".%2e/admin",
                                  "%2e%2e%5cadmin", "users/../../admin", "users/%2e%2e/%2e%2e/admin",
                                  "%E9/../../admin", "..%E9/../../admin"])
def test_a_path_cannot_leave_a_base_path_of_several_segments(escrow_chain, http_server,
                                                             django_capture_on_commit_callbacks, path):
    parties = _active(escrow_chain, http_server, django_capture_on_commit_callbacks, base_path="/api/v1")
    response = raw(parties, "get", f"{parties.proxy}/{path}")
    assert (response.status_code, error_code(response)) == (400, "invalid_upstream_path"), response.content
    assert http_server.requests == [] and books(parties) == (0, 0)


# Upstreams that die after their answer's head: the call is charged once the head is in (the seller answered), and
# the body is cut short.
_CUT_SHORT = {
    "chunked_cut_before_its_last_chunk": dict(head=b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n",
                                             drip=b"", times=0, pause=0),
    "shorter_than_its_content_length": dict(head=b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\nhello", drip=b"",
                                            times=0, pause=0),
    "reset_after_its_head": dict(head=b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\nhello", drip=b"", times=0,
                                 pause=0, reset=True),
    "stalled_past_the_answer_timeout": dict(head=b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\nhello",
                                            drip=b"a", times=15, pause=0.1),
}


@pytest.mark.parametrize("upstream", list(_CUT_SHORT))
def test_an_answer_cut_short_after_its_head_is_a_502_naming_the_charge_for_a_call_with_a_nonce(
        escrow_chain, settings, django_capture_on_commit_callbacks, caplog, upstream):
    """A call with X-Request-Nonce is answered once its reply is read (to store it): an upstream dying mid-body
    was answered 500 `internal_error` with a traceback logged, nothing saying the call was charged (X-Usage-Cost)
    nor which event to dispute, though it was."""
    with _dribbling(**_CUT_SHORT[upstream]) as upstream_url:
        active = active_agreement(escrow_chain, django_capture_on_commit_callbacks, upstream_url)
        settings.PROXY_ANSWER_TIMEOUT = 0.8
        first = raw(active, "get", f"{active.proxy}/x", HTTP_X_REQUEST_NONCE="cut-1")
    event = UsageEvent.objects.get()
    assert (first.status_code, error_code(first)) == (502, "upstream_answer_cut_short"), first.content
    assert json.loads(first.content)["error"]["details"] == {"usage_event_id": event.pk}
    assert (first["X-Usage-Cost"], first["X-Usage-Event-Id"], first["X-Escrow-Remaining"]) == (
        str(PRICE), str(event.pk), str(5 * PRICE - PRICE))
    assert books(active) == (PRICE, 0) and not [record for record in caplog.records if record.exc_info]  # no traceback
    again = raw(active, "get", f"{active.proxy}/x", HTTP_X_REQUEST_NONCE="cut-1")
    assert (again.status_code, error_code(again), again["X-Usage-Event-Id"]) == (502, "reply_lost", str(event.pk))


@pytest.mark.parametrize("upstream", list(_CUT_SHORT))
def test_an_answer_cut_short_after_its_head_is_streamed_cut_short_never_as_whole(
        escrow_chain, settings, django_capture_on_commit_callbacks, upstream):
    """Without a nonce the head (and its charge) is on its way to the buyer once the body's first piece is read: the
    body then ends in an error, on which the web server closes the connection without the last chunk (or short of the
    Content-Length), so the buyer's client raises rather than take the part for the whole."""
    with _dribbling(**_CUT_SHORT[upstream]) as upstream_url:
        active = active_agreement(escrow_chain, django_capture_on_commit_callbacks, upstream_url)
        settings.PROXY_ANSWER_TIMEOUT = 0.8
        response = unread(active, "get", f"{active.proxy}/x")
        assert (response.status_code, response["X-Usage-Cost"]) == (200, str(PRICE))
        with pytest.raises(outbound.UPSTREAM_ERRORS):
            b"".join(response.streaming_content)
    assert books(active) == (PRICE, 0)


@pytest.mark.parametrize("upstream", ["reset_before_any_body", "closed_before_any_body", "stalled_before_any_body"])
def test_an_answer_cut_short_before_any_body_is_a_502_naming_the_charge_without_a_nonce_too(
        escrow_chain, settings, django_capture_on_commit_callbacks, upstream):
    """Its head was handed to the web server and the body failed at once: granian drops a head it has not written
    yet when the body fails (tests/faults/test_streamed_answers.py), so the buyer saw no answer, its charge unnamed.
    The first piece of body is read before the head goes out: an upstream failing before it is a 502 naming the
    charge."""
    head = b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n"
    shape = {"reset_before_any_body": dict(drip=b"", times=0, pause=0, reset=True),
             "closed_before_any_body": dict(drip=b"", times=0, pause=0),
             "stalled_before_any_body": dict(drip=b"", times=1, pause=2)}[upstream]
    with _dribbling(head, **shape) as upstream_url:
        active = active_agreement(escrow_chain, django_capture_on_commit_callbacks, upstream_url)
        settings.PROXY_ANSWER_TIMEOUT = 0.8
        response = raw(active, "get", f"{active.proxy}/x")
    event = UsageEvent.objects.get()
    assert (response.status_code, error_code(response)) == (502, "upstream_answer_cut_short")
    assert json.loads(response.content)["error"]["details"] == {"usage_event_id": event.pk}
    assert (response["X-Usage-Cost"], response["X-Usage-Event-Id"]) == (str(PRICE), str(event.pk))
    assert books(active) == (PRICE, 0)


@contextmanager
def _reading_no_bodies() -> Iterator[str]:
    """A seller's host that answers each request once its head is in, never reading its body (a handler that does
    not read it, on a server that keeps the connection alive): the bytes of a body are read as the next request. Its
    answer's body is the path it was asked for; `/smuggled` is answered after 0.5 s. Yields its base URL."""
    listener = socket.create_server(("127.0.0.1", 0))

    def serve(connection):
        with connection:
            received = b""
            while True:
                while b"\r\n\r\n" not in received:
                    more = connection.recv(65536)
                    if not more:
                        return
                    received += more
                head, received = received.split(b"\r\n\r\n", 1)
                path = head.split(b" ")[1]
                if path.endswith(b"/smuggled"):
                    time.sleep(0.5)
                connection.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(path), path))

    def accept():
        while True:
            try:
                connection, _ = listener.accept()
            except OSError:
                return
            threading.Thread(target=serve, args=(connection,), daemon=True).start()

    threading.Thread(target=accept, daemon=True).start()
    with listener:
        yield f"http://127.0.0.1:{listener.getsockname()[1]}/api"


@pytest.mark.postgres
@pytest.mark.django_db(transaction=True)  # two agreements activated on the chain
def test_a_request_smuggled_in_one_buyers_body_is_never_answered_to_another_buyer(
        escrow_chain, django_capture_on_commit_callbacks):
    """Kept-alive connections to a seller's host were shared by every call to that host: where the host reads no
    body (and keeps the connection), a buyer's body holding a request is answered on the connection after its own
    call, and that answer went to the next call sent down it, another buyer's (another seller's on a shared host),
    who was charged for the answer to the attacker's request."""
    with _reading_no_bodies() as upstream_url:
        attacker = active_agreement(escrow_chain, django_capture_on_commit_callbacks, upstream_url)
        victim = another_buyer(escrow_chain, attacker)
        victim.proxy = f"/metered-proxy/{victim.agreement_id}"
        smuggled = b"GET /api/smuggled HTTP/1.1\r\nHost: seller.example\r\n\r\n"
        first = raw(attacker, "post", f"{attacker.proxy}/x", data=smuggled, content_type="text/plain")
        assert (first.status_code, _body(first)) == (200, b"/api/x")
        answer = raw(victim, "get", f"{victim.proxy}/mine")
    assert (answer.status_code, _body(answer)) == (200, b"/api/mine")
