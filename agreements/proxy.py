"""`ANY /metered-proxy/{agreement_id}/{path}`: forward a buyer's call to the seller and bill it to the escrow.

Reserve the price (one conditional UPDATE) → forward with httpx (pooled, timeouts, streamed) → commit the charge
when the upstream answered below 500, release it on 5xx, a redirect (3xx but 304), timeout or connection error. Pricing: per call, or per
unit where the upstream reports the units it served in `X-Usage-Units` (capped by the buyer's `X-Max-Units`,
default 1, which is what is reserved). A retry carrying the same `X-Request-Nonce` gets the first answer again
and is charged once (409 `request_in_progress` while the first runs); a retry of a call not charged (a 5xx) is a new
call. The nonce on any other call (method, path or body) is 422 `nonce_reused`.

Bounds (SECURITY.md, "Hostile input"): the path is percent-decoded, its backslashes read as slashes, its dot
segments resolved and its leading empty segments dropped (never a `//host` target), and must stay under the
service's base path and hold no CR or LF and no overlong UTF-8 sequence (else 400 `invalid_upstream_path`); its
bytes are forwarded escaped, UTF-8 or not (the web server decodes `%2F` into a `/` before the marketplace sees it);
the body is
read up to PROXY_MAX_REQUEST_BYTES (413 beyond), chunked or not, and forwarded with its length; the path and query
string as forwarded are at most PROXY_MAX_URL_BYTES (414 `upstream_url_too_long` beyond); integer headers
are ASCII digits; headers named in `Connection:` are dropped both ways; the buyer's forwarding headers, and those
that servers read as the request's path, host or method (`X-Original-URL`, `X-HTTP-Method-Override`), are replaced
by the platform's own `X-Forwarded-For`; an `Expect` is met here, not forwarded; the upstream's `Set-Cookie` never
reaches the buyer (the buyer talks to the marketplace, not to the seller's site, and a seller's cookie would be set on
the marketplace's host), nor do the seller's other policies for the marketplace's origin (HSTS, Alt-Svc, NEL), nor
the orders a web server in front acts on (`X-Accel-*`, `X-Sendfile`). Redirects are
never followed, and not charged (a 304 but); an answer's `Location`, `Content-Location` or `Link` target (a 3xx's, a
201's, any) reaches the buyer only under this agreement's proxy path or on another host than the marketplace's.
The upstream's answer head is read up to PROXY_MAX_ANSWER_HEAD_BYTES (502 `upstream_answer_head_too_large` beyond)
and its body framed as RFC 9112 says, or it is no answer (502 `upstream_unavailable`); neither is charged.
"""

import functools
import hashlib
import hmac
import itertools
import json
import logging
import re
import time
from urllib.parse import quote, unquote, urljoin, urlsplit, urlunsplit

from django.conf import settings
from django.core.exceptions import DisallowedHost
from django.db import IntegrityError, transaction
from django.http import HttpResponse, StreamingHttpResponse
from drf_spectacular.utils import OpenApiParameter, OpenApiResponse, extend_schema
from rest_framework.exceptions import MethodNotAllowed, Throttled
from rest_framework.views import APIView

from agreements import metering, monitoring, selectors
from agreements.models import ProxyReplay
from catalog.authentication import KeyHolder, agent_key_holder, agent_scope
from catalog.models import KeyScope, PricingType
from marketplace import outbound
from marketplace.concurrency import SlowPeers
from marketplace.errors import (ApplicationError, Conflict, Forbidden, InvalidInput, PayloadTooLarge, Unprocessable,
                                error_body, error_response)
from marketplace.logging import agreement_id_var
from marketplace.middleware import SERVER_PATH_INFO
from marketplace.serializers import error_responses
from marketplace.throttling import agent_budgets, client_address, windows_wait
from sdk import proxy_signature

logger = logging.getLogger(__name__)

_HOP_BY_HOP = {"connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "te", "trailer",
               "trailers", "transfer-encoding", "upgrade", "host"}
# Who the client is, as the buyer claims it: replaced by what the platform saw. With them the headers servers and
# frameworks read as the request's path, host, scheme or method in place of its request line and Host (IIS and older
# Symfony, Zend and Laminas: X-Original-URL, X-Rewrite-URL; Spring: X-Forwarded-Prefix; Traefik: X-Forwarded-Uri): a
# buyer's called another path (or method) than the one the proxy confined under the base path and signed.
_FORWARDING = {"forwarded", "x-forwarded-for", "x-forwarded-host", "x-forwarded-port", "x-forwarded-proto",
               "x-real-ip", "x-original-url", "x-rewrite-url", "x-original-uri", "x-forwarded-uri", "x-forwarded-path",
               "x-forwarded-prefix", "x-envoy-original-path", "x-forwarded-server", "x-host", "x-original-host",
               "x-forwarded-scheme", "x-forwarded-ssl", "x-url-scheme", "front-end-https",
               # and those read as its method (Express's, Rails', Symfony's, ASP.NET's, OData's method overrides)
               "x-http-method-override", "x-http-method", "x-method-override"}
# Never forwarded upstream: the buyer's credentials, our own control headers, the body's length (the body is
# forwarded as bytes: httpx sets it), and an `Expect: 100-continue`, met on the buyer's hop (the body is read whole
# before the seller is called, and sent with the head; a server refusing expectations answered 417, charged).
_REQUEST_DROPPED = _HOP_BY_HOP | _FORWARDING | {"authorization", "token", "cookie", "x-request-nonce", "x-max-units",
                                                "idempotency-key", "content-length", "expect"}
# Orders a web server in front (README, Operations) takes from the application's answer and acts on, never passing
# them on: nginx's X-Accel-* (an internal redirect to any of its locations, `internal` ones too, with the buyer's
# request and credentials; a rate; buffering; a cache time), Apache's and lighttpd's files of its disk. A seller's
# copy of one is the seller ordering the platform's web server.
_FRONT_SERVER_ORDERS = {"x-sendfile", "x-sendfile2", "x-lighttpd-send-file"}
# What a browser keeps for the whole origin that answered, the marketplace's, not for the one answer: as a seller's
# cookie, a seller's HSTS (`max-age=0`: cleared), Alt-Svc (the origin's connections to another host), NEL and
# Report-To (every request's URL reported to the seller), Clear-Site-Data (an operator's session cleared).
_ORIGIN_POLICIES = {"set-cookie", "strict-transport-security", "alt-svc", "clear-site-data", "nel", "report-to",
                    "public-key-pins", "public-key-pins-report-only", "expect-ct"}
_RESPONSE_DROPPED = _HOP_BY_HOP | _ORIGIN_POLICIES


def _front_server_order(lowercase_name: str) -> bool:
    """Whether an answer header is an order to the web server in front: dropped from every answer, and from the
    replies stored before it was."""
    return lowercase_name in _FRONT_SERVER_ORDERS or lowercase_name.startswith("x-accel-")


# The marketplace's own answer headers: a seller's copy of one (in any case) never reaches the buyer.
# X-Usage-Units among them: the units charged, not the seller's claim (capped by X-Max-Units, or no count at all).
_MARKETPLACE_ANSWER_HEADERS = {"x-usage-cost", "x-usage-units", "x-escrow-remaining", "x-usage-event-id", "x-usage-seq",
                               "x-replayed"}
# A header value we cannot pass on: a line break (an obs-fold http.client keeps) or a NUL (PostgreSQL stores none).
_UNSAFE_HEADER_VALUE = re.compile(r"[\x00\r\n]")
UNITS_HEADER = "X-Usage-Units"
_PATH_SAFE = "/:@!$&'()*+,;=-._~"  # RFC 3986 pchar and "/": kept as they are; everything else is escaped
# Overlong UTF-8 (the path as latin-1 text of its bytes): lead bytes C0 and C1, E0 then 80-9F, F0 then 80-8F. No encoder
# writes them, and a server decoding them anyway reads `.`, `/` or `\` where the proxy saw none.
_OVERLONG_UTF8 = re.compile("[\xc0\xc1]|\xe0[\x80-\x9f]|\xf0[\x80-\x8f]")
# A URL's authority every parser reads alike: a name or an IPv4 or bracketed IPv6 address, a port; no userinfo.
_PLAIN_AUTHORITY = re.compile(r"(?:[A-Za-z0-9.-]+|\[[0-9A-Fa-f:.]+\])(?::[0-9]{1,5})?")
_MAX_HEADER_DIGITS = 18  # any count or amount we accept in a header fits; longer is refused before int()

_upstreams = outbound.UpstreamPool(max_idle_per_upstream=50)
_slow_sellers = SlowPeers("seller", code="upstream_busy", slowly="answering slowly", slow_after="PROXY_SLOW_SECONDS",
                          remember="PROXY_SLOW_REMEMBER_SECONDS", per_peer="PROXY_SLOW_CALLS_PER_SELLER",
                          in_all="PROXY_SLOW_CALLS")
_slow_buyers = SlowPeers("buyer", code="buyer_busy", slowly="reading its answers slowly",
                         slow_after="PROXY_SLOW_SECONDS", remember="PROXY_SLOW_REMEMBER_SECONDS",
                         per_peer="PROXY_SLOW_CALLS_PER_BUYER", in_all="PROXY_SLOW_CALLS", alongside=_slow_sellers)


class LengthRequired(ApplicationError):
    status_code = 411
    code = "length_required"


class UpstreamUrlTooLong(ApplicationError):
    status_code = 414
    code = "upstream_url_too_long"


class UpstreamFailed(ApplicationError):
    status_code = 502
    code = "upstream_unavailable"


class UpstreamNotAllowed(UpstreamFailed):
    code = "upstream_address_not_allowed"


class UpstreamTimeout(UpstreamFailed):
    status_code = 504
    code = "upstream_timeout"


class UpstreamAnswerCutShort(UpstreamFailed):
    code = "upstream_answer_cut_short"


class UpstreamAnswerHeadTooLarge(UpstreamFailed):
    code = "upstream_answer_head_too_large"


def _named_in_connection(values) -> set[str]:
    """Headers the sender declared hop-by-hop by naming them in `Connection:` (RFC 9110 7.6.1), given its `values`:
    every line of it (a dict of an answer's headers kept the last line's names only)."""
    return {token.strip().lower() for value in values for token in value.split(",")} - {""}


def _forward_headers(request, caller: KeyHolder, terms: selectors.CallTerms, reservation, max_units: int, path: str,
                     body: bytes) -> list[tuple[str, str]]:
    # META, not request.headers, for a header usually absent: the headers' view answers a miss by raising KeyError.
    dropped = _REQUEST_DROPPED | _named_in_connection((request.META.get("HTTP_CONNECTION", ""),))  # lines joined
    # WSGI servers present absent CONTENT_LENGTH/CONTENT_TYPE as empty strings: those are not headers.
    headers = {key: value for key, value in request.headers.items()
               if value and key.lower() not in dropped and not key.lower().startswith("x-marketplace-")}
    timestamp = int(time.time())
    headers.update({
        "Host": outbound.host_header(terms.upstream_base_url),
        "X-Forwarded-For": client_address(request),
        "X-Marketplace-Agreement": str(terms.pk),
        "X-Marketplace-Call-Seq": str(reservation.call_seq),
        "X-Marketplace-Timestamp": str(timestamp),
        "X-Marketplace-Buyer": caller.agent_handle,  # the caller: only the buyer gets this far
        "X-Marketplace-Max-Units": str(max_units),
        "X-Marketplace-Request-Id": request.request_id,
    })
    headers.update(proxy_signature.signature_headers(
        terms.proxy_secret, terms.previous_proxy_secret, agreement_id=str(terms.pk), call_seq=reservation.call_seq,
        timestamp=timestamp, method=request.method, path=path))
    if body:
        headers["Content-Length"] = str(len(body))
    # WSGI hands header values over as latin-1 text, which http.client sends as those bytes again.
    return list(headers.items())


def _observe_upstream(outcome: str, started: float) -> float:
    seconds = time.monotonic() - started
    monitoring.upstream_observe(outcome=outcome, seconds=seconds)
    return seconds


def header_integer(raw: str) -> int | None:
    """A header's whole number: ASCII digits only ("²".isdigit() is true, and int() refuses it), bounded in length
    (int() of thousands of digits is slow or refused). None when it is anything else."""
    if raw.isascii() and raw.isdigit() and len(raw) <= _MAX_HEADER_DIGITS:
        return int(raw)
    return None


def _requested_units(request, terms: selectors.CallTerms) -> int:
    if terms.pricing_type != PricingType.PER_UNIT:
        return 1
    units = header_integer(request.headers.get("X-Max-Units", "1"))
    if units is None or not 1 <= units <= settings.PROXY_MAX_UNITS_PER_CALL:
        raise InvalidInput(f"X-Max-Units must be a whole number from 1 to {settings.PROXY_MAX_UNITS_PER_CALL}.",
                           code="invalid_max_units")
    return units


def _header(headers: list[tuple[str, str]], lowercase_name: str, default: str) -> str:
    return next((value for name, value in headers if name.lower() == lowercase_name), default)


def _served_units(upstream_headers: list[tuple[str, str]], terms: selectors.CallTerms, max_units: int) -> int:
    if terms.pricing_type != PricingType.PER_UNIT:
        return 1
    units = header_integer(_header(upstream_headers, UNITS_HEADER.lower(), "1"))
    return min(1 if units is None else units, max_units)  # never more than the buyer agreed to pay for this call


def _hides_a_dot_segment(segment: str) -> bool:
    """Whether decoding the segment further, or dropping its parameters (`..;x`: Java servers read `..`), as the
    seller's server might, makes a `.` or `..` of it."""
    if ";" in segment and unquote(segment.split(";", 1)[0]) in {".", ".."}:
        return True
    for _ in range(3):
        decoded = unquote(segment)
        if decoded == segment:
            return False
        segment = decoded
        if {".", ".."} & set(segment.replace("\\", "/").split("/")):
            return True
    return True  # still encoded after three decodings: no legitimate call looks like that


def upstream_path(path: str) -> str:
    """The path to call under the service's base URL, escaped, or 400 `invalid_upstream_path` when it would leave
    the base path.

    `path` is the path as the web server hands it over (PEP 3333): percent-decoded once, latin-1 text of its bytes,
    so `%2e%2e` is `..` here, and each byte is escaped again as the byte it is (`%E9`, UTF-8 or not). Backslashes
    count as slashes (as some servers read them), dot segments are resolved (RFC 3986 5.2.4) and a `..` that would
    climb above the base path is refused, as is a segment that becomes a dot segment only when decoded once more, an
    overlong UTF-8 sequence, and a CR or LF (never forwarded, even escaped, as when no route took them). Empty
    segments at the start are dropped: a target starting with `//` is origin-form (RFC 9112), yet many servers and
    proxies read it as a host (`//evil.example/x`), and under a base URL with no path it is what the seller's server
    would get. The result is escaped again, or an escaped "?" or "#" would change what is called and a control
    character would make no URL. A `%2F` reached the application as `/` (the web server decodes it): it is
    forwarded as one.
    """
    if "\n" in path or "\r" in path:
        raise InvalidInput("The path holds a line break.", code="invalid_upstream_path")
    if not path.isascii() and _OVERLONG_UTF8.search(path):
        raise InvalidInput("The path holds an overlong UTF-8 sequence.", code="invalid_upstream_path")
    segments: list[str] = []
    for segment in path.replace("\\", "/").split("/"):
        if segment == "..":
            if not segments:
                raise InvalidInput("The path leaves the service's base path.", code="invalid_upstream_path")
            segments.pop()
        elif _hides_a_dot_segment(segment):
            raise InvalidInput("The path holds an encoded dot segment.", code="invalid_upstream_path")
        elif segment != ".":
            segments.append(segment)
    return "/" + quote("/".join(segments).lstrip("/"), safe=_PATH_SAFE, encoding="latin-1")


def _call_path(path: str, query: str) -> str:
    """The path and query string to call under the service's base URL, at most PROXY_MAX_URL_BYTES (414 beyond).
    Unbounded, a URL longer than the seller's server reads was forwarded whole and refused there (414, say), and the
    call was charged as answered below 500. Measured before escaping too, so a huge path is not escaped first."""
    limit = settings.PROXY_MAX_URL_BYTES
    if len(path) + len(query) <= limit:
        call_path = upstream_path(path) + (f"?{query}" if query else "")
        if len(call_path) <= limit:  # ASCII once escaped: its length is its size in bytes
            return call_path
    raise UpstreamUrlTooLong(f"The path and query string forwarded are longer than {limit} bytes.",
                             details={"max_bytes": limit})


def _path_as_sent(request, path: str) -> str:
    """The route's `path` as the web server handed it over (latin-1 text of its bytes), not as Django read it:
    `path_info` escapes again the bytes that are not UTF-8 (`%E9` for the byte E9, as for a buyer's `%25E9`), and the
    proxy escaped that once more (`%25E9`): another resource than the buyer's, and charged. The route's prefix is
    ASCII, the same length in both."""
    sent = request.META.get(SERVER_PATH_INFO)
    if sent is not None:
        return sent[len(request.path_info) - len(path):]
    # An ASCII path (Django's is the same), or none kept (no WSGI environ): Django's, as its UTF-8 bytes.
    return path if path.isascii() else path.encode().decode("latin-1")


def request_body(request) -> bytes:
    """The buyer's body, at most PROXY_MAX_REQUEST_BYTES (413 beyond), whether sent with a length or chunked."""
    limit = settings.PROXY_MAX_REQUEST_BYTES
    meta = request.META
    if "chunked" in meta.get("HTTP_TRANSFER_ENCODING", "").lower():
        if not meta.get("wsgi.input_terminated"):  # the server cannot tell where a chunked body ends
            raise LengthRequired("This server cannot read a chunked body here: send it with a Content-Length.")
        stream, chunks, size = meta["wsgi.input"], [], 0
        while chunk := stream.read(65536):
            size += len(chunk)
            if size > limit:
                raise _too_large(limit)
            chunks.append(chunk)
        return b"".join(chunks)
    length = header_integer(meta.get("CONTENT_LENGTH") or "0")
    if length == 0:  # what Django reads then (most calls: a GET), without its stream and checks
        return b""
    if length is not None and length > limit:
        raise _too_large(limit)
    return request.body


def _too_large(limit: int) -> PayloadTooLarge:
    return PayloadTooLarge(f"The request body is larger than {limit} bytes.", details={"max_bytes": limit})


@functools.lru_cache(maxsize=2)
def _fingerprint_key(secret_key: str):
    return hmac.new(secret_key.encode(), digestmod=hashlib.sha256)


def request_fingerprint(method: str, path: str, body: bytes) -> str:
    """HMAC-SHA256 under SECRET_KEY of the call's method, path and body, as the Idempotency-Key's fingerprint: a body
    may hold a secret the buyer passes to the seller, which a plain hash kept with the nonce's reply would let a
    reader of the database test guesses of offline. A retry straddling a SECRET_KEY change is 422 `nonce_reused`."""
    digest = _fingerprint_key(settings.SECRET_KEY).copy()  # the key's pads computed once (~2 us a call saved)
    digest.update(f"{method} {path}\n".encode())
    digest.update(body)
    return digest.hexdigest()


def _claim_nonce(agreement_id, nonce: str, fingerprint: str) -> HttpResponse | None:
    """None when this call may run; else the stored answer (or 409 while the first call is running, 422 when the
    nonce was used on another call)."""
    if len(nonce) > 128:
        raise InvalidInput("X-Request-Nonce is at most 128 characters.", code="invalid_request_nonce")
    try:
        with transaction.atomic():
            ProxyReplay.objects.create(agreement_id=agreement_id, request_nonce=nonce,
                                       request_fingerprint=fingerprint)
        return None
    except IntegrityError:
        replay = ProxyReplay.objects.get(agreement_id=agreement_id, request_nonce=nonce)
    if replay.request_fingerprint != fingerprint:
        raise Unprocessable("This X-Request-Nonce was used on another call (method, path or body).",
                            code="nonce_reused")
    if replay.status_code is None:
        raise Conflict("A call with this X-Request-Nonce is still running.", code="request_in_progress")
    response = HttpResponse(bytes(replay.body), status=replay.status_code)
    for key, value in replay.headers.items():
        lower = key.lower()  # a reply stored before these were dropped from answers: dropped from it too
        if not _front_server_order(lower) and lower not in _ORIGIN_POLICIES:
            response[key] = value
    response["X-Replayed"] = "true"
    return response


def _proxy_method(method: str):
    def handler(self, request, agreement_id, path=""):
        return self.dispatch_proxy(request, agreement_id, path)

    return extend_schema(
        operation_id=f"metered_proxy_{method}", tags=["metered proxy"],
        summary="Call the seller's service through the marketplace; each call is billed to the escrow",
        description=__doc__,
        parameters=[
            OpenApiParameter("X-Request-Nonce", str, OpenApiParameter.HEADER,
                             description="Retry key: a repeat gets the first answer and is charged once."),
            OpenApiParameter("X-Max-Units", int, OpenApiParameter.HEADER,
                             description="Per-unit services: most units this call may be charged (default 1)."),
        ],
        request=None,
        responses={
            (200, "*/*"): OpenApiResponse(description="The upstream's answer, with X-Usage-Cost, "
                                                      "X-Escrow-Remaining and X-Usage-Event-Id."),
            **error_responses(402, 404, 409, 413, 414, 422, 429, 503), 502: error_responses(503)[503],
            504: error_responses(503)[503],
        },
    )(handler)


class MeteredProxyView(APIView):
    """DRF describes this view (the schema) but does not dispatch it: `dispatch` below serves every call without
    DRF's request wrapping, negotiation and rendering, which were half of a proxied call's CPU. The answers are
    DRF's: the same authentication and scope rules (`agent_key_holder`), rate limits (`windows_wait`) and error
    shape (`error_response`)."""

    permission_classes = [agent_scope(KeyScope.PAY)]
    throttle_scope = "proxy"
    parser_classes = []  # the body is forwarded upstream untouched (request_body)

    get = _proxy_method("get")
    post = _proxy_method("post")
    put = _proxy_method("put")
    patch = _proxy_method("patch")
    delete = _proxy_method("delete")

    def dispatch(self, request, agreement_id, path=""):
        try:
            if request.method not in _METHODS:
                raise MethodNotAllowed(request.method)
            return _proxy_call(request, agreement_id, path)
        except Exception as exc:  # every failure answers in the one error shape, as DRF's handler would
            return error_response(exc)


_METHODS = frozenset({"GET", "POST", "PUT", "PATCH", "DELETE"})


def _proxy_call(request, agreement_id, path: str):
    # Not reset here: django.request logs a failed call after the view returns; the middleware clears it.
    agreement_id_var.set(str(agreement_id))
    caller = agent_key_holder(request, scope=KeyScope.PAY)
    wait = windows_wait(agent_budgets(agent_id=caller.agent_id, owner_id=caller.owner_id, scopes=("api", "proxy")))
    if wait is not None:
        raise Throttled(wait)
    terms = selectors.agreement_for_call(agreement_id=agreement_id, agent_id=caller.agent_id)
    if terms.buyer_id != caller.agent_id:
        raise Forbidden("Only the buyer calls through the proxy.", code="buyer_only")
    if terms.masumi_purchase:  # one call charged its whole price, and the seller's result was then refused
        raise Conflict("A Masumi purchase is paid for its job result alone; it takes no calls through the metered "
                       "proxy.", code="job_result_only")
    metering.receipt_signer_key_require(agreement_id=terms.pk, receipt_signer=terms.receipt_signer)
    path = _path_as_sent(request, path)
    body = request_body(request)
    query = request.META.get("QUERY_STRING", "")
    if not query.isascii() or not query.isprintable() or " " in query:
        raise InvalidInput("The query string must be percent-encoded ASCII.", code="invalid_upstream_path")
    call_path = _call_path(path, query)
    nonce = request.META.get("HTTP_X_REQUEST_NONCE", "")  # not request.headers: see _forward_headers
    if nonce:
        replayed = _claim_nonce(terms.pk, nonce, request_fingerprint(request.method, call_path, body))
        if replayed is not None:
            return replayed
    try:
        return _forward(request, caller, terms, call_path, body, nonce)
    except BaseException:
        if nonce:  # charged: a retry learns it (reply_lost), as from the reaper; else the nonce may be used again
            metering.replay_settle(agreement_id=terms.pk, request_nonce=nonce)
        raise


def _forward(request, caller: KeyHolder, terms: selectors.CallTerms, upstream_path: str, body: bytes, nonce: str):
    max_units = _requested_units(request, terms)
    waiting = _Waiting(terms)  # ends with the answer's body
    try:
        reservation = metering.reservation_take(
            agreement=terms, amount=max_units * terms.price_per_unit, request_id=request.request_id,
            request_nonce=nonce, method=request.method, path=upstream_path)
        started = time.monotonic()
        upstream = _upstream_answer(request, caller, terms, reservation, max_units, upstream_path, body, nonce,
                                    started)
    except BaseException:
        waiting.end()
        raise
    upstream.on_close = waiting.end
    try:
        return _charged_answer(request, terms, reservation, upstream, waiting, max_units, upstream_path, nonce,
                               started)
    except BaseException:  # the reservation released, or the charge found or left to the reaper, by the call
        upstream.close()
        raise


def _charged_answer(request, terms: selectors.CallTerms, reservation: metering.Reservation,
                    upstream: outbound.UpstreamAnswer, waiting: "_Waiting", max_units: int, upstream_path: str,
                    nonce: str, started: float) -> HttpResponse:
    """The buyer's answer to the upstream's: charged (or released, for a 5xx or a redirect), its body streamed or
    stored."""
    upstream_headers = upstream.headers
    try:
        latency_ms = int(_observe_upstream("error" if upstream.status >= 500 else "ok", started) * 1000)
        units = _served_units(upstream_headers, terms, max_units)
    except BaseException:
        metering.reservation_release(reservation=reservation)
        raise
    status = upstream.status
    # A 5xx served nothing, nor did a redirect (a 304 but: the buyer's copy is current): charged, a redirect to itself
    # was paid once per hop the buyer's client follows. Released as the upstream failing is; a 200 compares twice.
    if status >= 500 or (300 <= status < 400 and status != 304):
        metering.reservation_release(reservation=reservation)
        cost, event = 0, None
    else:
        cost = units * terms.price_per_unit
        event = metering.reservation_commit(
            reservation=reservation, units=units, cost=cost, request_id=request.request_id, request_nonce=nonce,
            method=request.method, path=upstream_path, upstream_status=upstream.status, latency_ms=latency_ms,
            ahead=upstream.meanwhile)
    # Bodies pass through as raw bytes, so Content-Encoding and Content-Length stay true.
    dropped = (_RESPONSE_DROPPED | _MARKETPLACE_ANSWER_HEADERS
               | _named_in_connection(value for name, value in upstream_headers if name.lower() == "connection"))
    headers, named = _passed_on(upstream_headers, dropped)
    # URLs the buyer's client may follow with its key: a redirect's, a 201's or 202's (the job to poll), any answer's
    # Content-Location or Link. Three lookups on a call that has none.
    for lowercase_name in _URL_HEADERS:
        if lowercase_name in named:
            _confine_urls(headers, named[lowercase_name], request, terms, upstream_path)
    headers["X-Usage-Cost"] = str(cost)
    used = event.cumulative if event else metering.agreement_used(agreement_id=terms.pk)
    headers["X-Escrow-Remaining"] = str(terms.deposit_amount - used)
    if event is not None:
        headers["X-Usage-Units"] = str(event.units)
        headers["X-Usage-Event-Id"] = str(event.pk)
        headers["X-Usage-Seq"] = str(event.seq)
    if nonce:
        if event is not None:
            return _stored_reply(terms.pk, nonce, upstream, waiting, headers)
        _nonce_release(terms.pk, nonce)
    read, rest = (), None
    if event is not None:
        # The first piece of body is read before the head goes to the server: an upstream failing before it is
        # answered 502 naming the charge, never a head the server may drop with the body's failure (_BuyerStream).
        rest = iter(upstream)
        try:
            read = (next(rest, b""),)
        except outbound.UPSTREAM_ERRORS as exc:  # a timeout too
            return _cut_short(terms.pk, nonce, upstream, headers, exc)
    response = StreamingHttpResponse(_BuyerStream(upstream, waiting, read=read, rest=rest), status=upstream.status)
    for key, value in headers.items():
        response[key] = value
    return response


def _passed_on(upstream_headers: list[tuple[str, str]], dropped: set[str]) -> tuple[dict[str, str], dict[str, str]]:
    """The upstream's answer headers the buyer gets, a field sent on several lines as one joined with commas (RFC 9110
    5.3; Set-Cookie, the one field that cannot be, is dropped): kept in a dict by name, only the last line of each
    reached the buyer (one of a 401's WWW-Authenticate challenges, of a Vary's). A line repeating the value so far is
    not added (a Content-Length sent twice whole, its one value: `9, 9` is no length to most clients). With them,
    each one's name as first sent by its lowercase name."""
    headers: dict[str, str] = {}
    named: dict[str, str] = {}  # lowercase name -> the name as first sent
    for name, value in upstream_headers:
        lower = name.lower()
        if lower in dropped or _front_server_order(lower) or _UNSAFE_HEADER_VALUE.search(value):
            continue
        first = named.setdefault(lower, name)
        so_far = headers.get(first)
        headers[first] = value if so_far is None or so_far == value else f"{so_far}, {value}"
    return headers, named


def _origin(url) -> tuple[str, str, int | None]:
    """(scheme, host, port) of a split URL, its port the scheme's default when none is written."""
    return url.scheme.lower(), (url.hostname or ""), url.port or {"http": 80, "https": 443}.get(url.scheme.lower())


# Answer headers holding URLs the buyer's client may call with its key: a redirect's target, a 201's new resource or
# a 202's job to poll (Location), the answer's own URL (Content-Location, which caches and clients read), the next page
# a paginating client follows (Link, RFC 8288: `<url>; rel="next"`).
_URL_HEADERS = ("location", "content-location", "link")
_LINK_TARGET = re.compile(r"<([^>]*)>")


def _confine_urls(headers: dict, name: str, request, terms: selectors.CallTerms, upstream_path: str) -> None:
    """`headers[name]`'s URLs as `_confined_url` passes them on; a Link with any URL dropped is dropped whole."""
    value = headers.pop(name)
    if name.lower() != "link":
        confined = _confined_url(value, request, terms, upstream_path)
    else:
        parts = _LINK_TARGET.split(value)  # every second part a link's target
        for index in range(1, len(parts), 2):
            target = _confined_url(parts[index], request, terms, upstream_path)
            if target is None:
                return
            parts[index] = f"<{target}>"
        confined = "".join(parts)
    if confined is not None:
        headers[name] = confined


def _confined_url(url: str, request, terms: selectors.CallTerms, upstream_path: str) -> str | None:
    """A URL of the seller's answer (a `Location`, `Content-Location`, `Link` target) as the buyer's client may follow
    it, or None. The seller writes it for the URL the proxy called, and the buyer's client resolves it against the
    marketplace's URL it called, keeping its Authorization on that host: passed on as written, `/usage-agreements`
    (or `../../..`, or the marketplace's own host) sent the buyer's key, and with a 307 or 308 its body, to another
    endpoint of the marketplace at the seller's order. So it is resolved against the URL called: under the service's
    base path it becomes this agreement's proxy path (a call the buyer's client makes, and is charged for, as any);
    elsewhere on the seller's host (whose address the buyer is not shown), on the marketplace's host, or read
    otherwise by other URL parsers (a dot segment encoded or behind a backslash, a host that is not a plain name or
    address), or unreadable, it is None; on another host it is that URL."""
    base = urlsplit(terms.upstream_base_url)
    try:
        target = urlsplit(urljoin(terms.upstream_base_url + upstream_path, url))
        upstream_origin, target_origin = _origin(base), _origin(target)
        marketplace_host = urlsplit(f"//{request.get_host()}").hostname
    except (ValueError, DisallowedHost):  # a port that is no number, a host the marketplace does not serve
        return None
    if target_origin == upstream_origin:
        base_path = base.path.rstrip("/")
        if target.path == base_path or target.path.startswith(f"{base_path}/"):
            rest = target.path[len(base_path) + 1:]
            # A WHATWG URL parser (browsers, Node's fetch) reads `\` as `/` and `%2e` as a dot: a dot segment there
            # climbs out of the proxy path once the buyer's client resolves it.
            if not any(segment in (".", "..") or _hides_a_dot_segment(segment)
                       for segment in rest.replace("\\", "/").split("/")):
                marker = f"/metered-proxy/{terms.pk}/"
                proxied = request.path[:request.path.index(marker) + len(marker)] + rest
                return urlunsplit(("", "", proxied, target.query, target.fragment))
        return None
    # Another host's, when every URL parser reads that host: a plain name or address (a WHATWG parser ends the host at
    # a `\`, where Python reads on to an `@` or a `/`), in ASCII (clients map a Unicode name to others by their IDNA).
    if target.scheme in ("http", "https") and _PLAIN_AUTHORITY.fullmatch(target.netloc) \
            and target.hostname.rstrip(".") != marketplace_host:
        return urlunsplit(target)
    return None


def _upstream_answer(request, caller: KeyHolder, terms: selectors.CallTerms, reservation: metering.Reservation,
                     max_units: int, upstream_path: str, body: bytes, nonce: str, started: float
                     ) -> outbound.UpstreamAnswer:
    """The upstream's answer head; whatever fails, the reservation is released (nothing was served)."""
    request_id = request.request_id
    # A per-call price is what the call costs whatever the upstream answers (but 5xx): its charge is chained while
    # the upstream works (metering.charge_ahead).
    charge_ahead = None if terms.pricing_type == PricingType.PER_UNIT else functools.partial(
        metering.charge_ahead, reservation=reservation, units=1, cost=terms.price_per_unit, request_id=request_id,
        request_nonce=nonce, method=request.method, path=upstream_path)
    try:
        upstream = _upstreams.request(
            request.method, terms.upstream_base_url + upstream_path, body=body,
            headers=_forward_headers(request, caller, terms, reservation, max_units, upstream_path, body),
            connect_timeout=settings.PROXY_CONNECT_TIMEOUT, read_timeout=settings.PROXY_TIMEOUT,
            answer_timeout=settings.PROXY_ANSWER_TIMEOUT, max_head_bytes=settings.PROXY_MAX_ANSWER_HEAD_BYTES,
            meanwhile=charge_ahead, partition=caller.agent_id)
    except TimeoutError as exc:
        metering.reservation_release(reservation=reservation)
        _observe_upstream("timeout", started)
        raise UpstreamTimeout("The seller's service did not answer in time; nothing was charged.") from exc
    except outbound.AnswerHeadTooLarge as exc:
        metering.reservation_release(reservation=reservation)
        _observe_upstream("unreachable", started)
        logger.warning("upstream answer head too large", extra={"agreement_id": str(terms.pk)})
        limit = settings.PROXY_MAX_ANSWER_HEAD_BYTES
        raise UpstreamAnswerHeadTooLarge(f"The seller's service answered with a head (status line and headers) "
                                         f"larger than {limit} bytes; nothing was charged.",
                                         details={"max_bytes": limit}) from exc
    except outbound.UPSTREAM_ERRORS as exc:
        metering.reservation_release(reservation=reservation)
        _observe_upstream("blocked" if outbound.blocked(exc) else "unreachable", started)
        if outbound.blocked(exc):
            logger.warning("upstream address not allowed", extra={"error": str(exc)})
            raise UpstreamNotAllowed("The seller's service resolves to an address the marketplace does not "
                                     "call; nothing was charged.") from exc
        logger.warning("upstream unreachable", extra={"agreement_id": str(terms.pk), "error": repr(exc)})
        raise UpstreamFailed("The seller's service could not be reached; nothing was charged.") from exc
    except BaseException:
        metering.reservation_release(reservation=reservation)  # nothing was served: the hold must not leak
        raise
    return upstream


def _nonce_release(agreement_id, nonce: str) -> None:
    """A call with X-Request-Nonce that was not charged (its upstream answered 5xx): nothing is stored, the nonce is
    free again once the call has answered, and a retry is a new call (forwarded, charged once if it is served).
    Stored, its 5xx was replayed to every retry and never forwarded again, and kept up to PROXY_REPLAY_MAX_BYTES
    for nothing. Until here a retry is 409 `request_in_progress`."""
    ProxyReplay.objects.filter(agreement_id=agreement_id, request_nonce=nonce, status_code=None).delete()


def _stored_reply(agreement_id, nonce, upstream: outbound.UpstreamAnswer, waiting: "_Waiting",
                  headers: dict) -> HttpResponse:
    """The answer to a call with X-Request-Nonce, stored for its replays: in full when it fits in
    PROXY_REPLAY_MAX_BYTES, else as a note saying so. Only that much of it is ever held in memory: a larger answer
    is streamed on from what was read."""
    limit = settings.PROXY_REPLAY_MAX_BYTES
    stream = iter(upstream)
    # One buffer: a list of the pieces the upstream sent held ~40 bytes of objects per piece (2-byte chunks: 20 times
    # the bound).
    head = bytearray()
    try:
        for chunk in stream:
            head += chunk
            if len(head) > limit:
                break
    except outbound.UPSTREAM_ERRORS as exc:  # a timeout too
        return _cut_short(agreement_id, nonce, upstream, headers, exc)
    if len(head) <= limit:  # read to its end
        upstream.close()
        body = bytes(head)
        ProxyReplay.objects.filter(agreement_id=agreement_id, request_nonce=nonce).update(
            status_code=upstream.status, headers=headers, body=body)
        response = HttpResponse(body, status=upstream.status)
    else:
        # Answered once in full; a replay gets this note instead of a half-stored body.
        note = json.dumps(error_body("reply_too_large_to_store", "The reply was charged but is too large to store "
                                     "for X-Request-Nonce replays.")).encode()
        # The note's own headers: not the upstream body's length, encoding or type.
        stored = {name: value for name, value in headers.items()
                  if name.lower() not in {"content-length", "content-encoding", "content-type"}}
        ProxyReplay.objects.filter(agreement_id=agreement_id, request_nonce=nonce).update(
            status_code=upstream.status, headers={**stored, "Content-Type": "application/json"}, body=note)
        response = StreamingHttpResponse(_BuyerStream(upstream, waiting, read=[bytes(head)], rest=stream),
                                         status=upstream.status)
    for key, value in headers.items():
        response[key] = value
    return response


def _cut_short(agreement_id, nonce, upstream: outbound.UpstreamAnswer, headers: dict, exc: Exception) -> HttpResponse:
    """The answer to a charged call whose upstream failed before its body was read whole (with X-Request-Nonce) or
    before its first piece (without): reset, closed short of its length or last chunk, past PROXY_ANSWER_TIMEOUT. 502
    with the charge's headers and event, so that the buyer knows what it paid for and which event to dispute (the
    seller answered: charged, as a body cut off mid-stream is). A nonce's retries are answered `reply_lost`."""
    upstream.close()
    if nonce:
        metering.replay_settle(agreement_id=agreement_id, request_nonce=nonce)
    logger.warning("upstream answer cut short", extra={"agreement_id": str(agreement_id), "error": repr(exc)})
    event_id = headers["X-Usage-Event-Id"]
    response = error_response(UpstreamAnswerCutShort(
        "The seller's service failed before its answer was read whole; the call was charged (the seller answered): "
        "dispute the usage event if it was not served.", details={"usage_event_id": int(event_id)}))
    for name in ("X-Usage-Cost", "X-Usage-Units", "X-Escrow-Remaining", "X-Usage-Event-Id", "X-Usage-Seq"):
        response[name] = headers[name]
    return response


class _Waiting:
    """Whom a proxied call waits on, one at a time, each held to a share of the threads (SlowPeers): its seller
    while the upstream's answer, head or body, is read; its buyer while the server hands the body over, at the
    buyer's pace. A buyer not reading its answers holds threads of its own share, and its seller does not count as
    slow for it (its other buyers would be held to a slow seller's share)."""

    __slots__ = ("seller", "buyer")

    def __init__(self, terms: selectors.CallTerms):
        # Refused at once, before any reservation, past a slow buyer's or a slow seller's share.
        self.buyer = _slow_buyers.admit(terms.buyer_id, waiting=False)
        try:
            self.seller = _slow_sellers.admit(terms.seller_id)
        except BaseException:
            self.buyer.end()
            raise

    def on_buyer(self) -> None:
        self.seller.pause()
        self.buyer.resume()

    def on_seller(self) -> None:
        self.buyer.pause()
        self.seller.resume()

    def end(self) -> None:
        self.seller.end()
        self.buyer.end()


class _BuyerStream:
    """The upstream's body for the buyer: what was `read` of it already, then the `rest` of its stream. A class with
    `close()` rather than a generator: Django hands `close()` to the server, which calls it however the request
    ends (PEP 3333), even when the body was never iterated (a generator's cleanup would not run then), and the
    exchange must end with it: its connection closed or given back, its waits ended.

    The call waits on its buyer from the moment the answer is made until the server asks for its body, and whenever
    the server has a chunk of it to hand over; on its seller while the next is read.

    A body that fails makes granian close the connection at once, dropping what it holds unwritten (hyper writes the
    head and the pieces handed to it only once it finds no next one waiting): an upstream reset right after a piece
    made the buyer see no answer at all, its charge unnamed (tests/faults/test_streamed_answers.py: 25 of 40 calls).
    The server gives no sign of having written them, so the failure waits HANDED_OVER_SECONDS before it is raised."""

    HANDED_OVER_SECONDS = 0.1  # on a failed body only; granian took ~5 ms to write what it held on a loaded machine

    def __init__(self, upstream: outbound.UpstreamAnswer, waiting: _Waiting, read=(), rest=None):
        self._upstream, self._waiting, self._read, self._rest = upstream, waiting, read, rest
        waiting.on_buyer()

    def __iter__(self):
        waiting = self._waiting
        try:
            waiting.on_seller()
            for chunk in itertools.chain(self._read, self._upstream if self._rest is None else self._rest):
                waiting.on_buyer()
                yield chunk
                waiting.on_seller()
        except outbound.UPSTREAM_ERRORS:  # a timeout too
            time.sleep(self.HANDED_OVER_SECONDS)
            raise
        finally:
            self._upstream.close()

    def close(self) -> None:
        self._upstream.close()
