"""The platform's parsers of bytes a hostile party sends (a caller's body and headers, a buyer's payment header, a
seller's upstream answer), fed arbitrary input (hypothesis): each returns a value or raises its documented refusal
(a 4xx with a `code`, an upstream error the proxy answers 502), never another exception. Derandomized, so CI runs
the same examples; the nasty seeds are `@example`s. The SDK's parsers: tests/sdk/test_hostile_bytes.py."""

import base64
import gzip
import http.client
import io
import json
import time
import zlib

import httpx
import pytest
from django.conf import settings as django_settings
from django.http import StreamingHttpResponse
from eth_account import Account
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from x402 import PaymentPayload, PaymentRequirements

from agreements import proxy, x402_protocol
from agreements.x402_protocol import InvalidPayment
from marketplace import bounded_json, outbound
from marketplace.outbound import UPSTREAM_ERRORS, _FinalAnswer
from tests.catalog.factories import AgentFactory, issue_key
from tests.conftest import Api, error_code
from tests.sdk.test_hostile_bytes import NASTY_JSON, json_ish, json_values, nasty_examples

HOSTILE = settings(max_examples=200, deadline=None, derandomize=True, database=None,
                   suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
JSON_REFUSALS = {"malformed", "too_deep", "too_large", "nul_character", "surrogate", "duplicate_key"}


def storable(value) -> bool:
    """Whether PostgreSQL's text and jsonb take every string of `value`: UTF-8 encodable, no NUL."""
    text = json.dumps(value, ensure_ascii=False)
    text.encode()  # a lone surrogate raises
    return "\\u0000" not in text and "\x00" not in text


@HOSTILE
@nasty_examples([*NASTY_JSON, b'{"a\\u0000": 1}', b'["\\ud800\\udc00"]', b'{"\\udfff": 1}', b'"\\u0000"' * 2])
@given(st.one_of(st.binary(max_size=200), json_ish.map(lambda text: text.encode("utf-8", "surrogatepass"))))
def test_the_platforms_json_parser_returns_storable_json_or_refuses(data):
    try:
        value = bounded_json.loads(data, max_bytes=150_000, duplicate_keys=False)
    except bounded_json.InvalidJSON as refusal:
        assert refusal.reason in JSON_REFUSALS
        return
    assert storable(value)


@HOSTILE
@given(json_values)
def test_the_platforms_json_parser_reads_back_storable_json(value):
    try:
        assert bounded_json.loads(json.dumps(value)) == value
    except bounded_json.InvalidJSON as refusal:  # hypothesis's text holds NULs and lone surrogates
        assert refusal.reason in {"nul_character", "surrogate"}


# --- a buyer's x402 payment header ------------------------------------------------------------------------------

PAYER, TREASURY, TOKEN = (Account.create().address for _ in range(3))
RESOURCE = "/agents/s/t"


@pytest.fixture(autouse=True)
def token_domain_known():
    """The chain's token domain, as the escrow app would read it (only `check`'s signature check asks)."""
    kept = list(x402_protocol._token_domain_reader)
    x402_protocol.token_domain_reader_register(reader=lambda: ("USDC", "2"))
    yield
    x402_protocol._token_domain_reader[:] = kept


def requirements() -> PaymentRequirements:
    return PaymentRequirements(scheme="exact", network=x402_protocol.network(), asset=TOKEN, amount="20000",
                               pay_to=TREASURY, max_timeout_seconds=300,
                               extra={"name": "USDC", "version": "2", "resource": RESOURCE})


def honest_payload() -> dict:
    return {"x402Version": 2, "resource": {"url": f"http://m{RESOURCE}"},
            "accepted": requirements().model_dump(by_alias=True),
            "payload": {"signature": "0x" + "11" * 65, "authorization": {
                "from": PAYER, "to": TREASURY, "value": "20000", "validAfter": "0",
                "validBefore": str(int(time.time()) + 300), "nonce": "0x" + "22" * 32}}}


def header_of(value) -> str:
    return base64.b64encode(json.dumps(value).encode()).decode()


AUTHORIZATION_FIELDS = ["from", "to", "value", "validAfter", "validBefore", "nonce"]
hostile_scalars = json_values | st.sampled_from(["", "0x", "0x" + "ff" * 33, "1" * 5_000, "-1", "1e3", "0x1",
                                                 "nan", "\ud800", " 1", "١", str(2**256)])


def tampered_payloads() -> st.SearchStrategy:
    """The honest payload with one field of its authorization, its signature, its echoed requirements or its top
    level replaced by hostile JSON."""
    def replaced(path_and_value):
        (where, name), value = path_and_value
        payload = honest_payload()
        target = {"top": payload, "accepted": payload["accepted"], "payload": payload["payload"],
                  "authorization": payload["payload"]["authorization"]}[where]
        target[name] = value
        return payload
    paths = st.one_of(st.tuples(st.just("authorization"), st.sampled_from(AUTHORIZATION_FIELDS)),
                      st.tuples(st.just("payload"), st.sampled_from(["signature", "authorization"])),
                      st.tuples(st.just("accepted"), st.sampled_from(["scheme", "network", "asset", "extra",
                                                                      "amount", "payTo"])),
                      st.tuples(st.just("top"), st.sampled_from(["x402Version", "resource", "accepted", "payload"])))
    return st.tuples(paths, hostile_scalars).map(replaced)


def verify_or_refuse(header: str) -> None:
    try:
        x402_protocol.check(x402_protocol.decode(header), requirements(), max_validity_seconds=3600)
    except InvalidPayment as refusal:
        assert refusal.code and refusal.message


@HOSTILE
@example("")
@example("=")
@example("é")
@example(base64.b64encode(b"[" * 100_000).decode())
@example(base64.b64encode(b"\xff\xfe").decode())
@example(header_of([]))
@example(header_of({"x402Version": 1}))
@example(header_of({"x402Version": "2", "payload": None}))
@given(st.one_of(st.text(max_size=80), json_values.map(header_of),
                 st.dictionaries(st.sampled_from(["x402Version", "payload", "accepted", "resource", "scheme",
                                                  "network"]), json_values).map(header_of)))
def test_any_payment_header_decodes_or_is_refused(header):
    verify_or_refuse(header)


@HOSTILE
@given(tampered_payloads())
def test_a_tampered_payment_payload_is_refused_with_a_code(payload):
    verify_or_refuse(header_of(payload))


def test_the_honest_payload_passes_every_check_but_its_signature():
    """The tampered payloads above start from one that only its (made-up) signature fails."""
    with pytest.raises(InvalidPayment) as refusal:
        x402_protocol.check(x402_protocol.decode(header_of(honest_payload())), requirements(), max_validity_seconds=3600)
    assert refusal.value.code == "invalid_signature"
    assert isinstance(x402_protocol.decode(header_of(honest_payload())), PaymentPayload)


# --- a seller's upstream answer head and body ---------------------------------------------------------------------

class _Received:
    """A socket that has received `data` and nothing more (then the upstream closed)."""

    def __init__(self, data: bytes):
        self.data = data

    def makefile(self, mode):
        return io.BytesIO(self.data)


def read_answer(data: bytes) -> None:
    """As the proxy reads an upstream's answer (UpstreamPool, UpstreamAnswer): its head past informational ones,
    its headers, then its body in pieces to its announced end."""
    response = _FinalAnswer(_Received(data), method="POST", max_head_bytes=django_settings.PROXY_MAX_ANSWER_HEAD_BYTES)
    response.begin()
    passed_on = StreamingHttpResponse(iter(()))
    for name, value in response.getheaders():  # as the proxy passes them to the buyer
        if not proxy._UNSAFE_HEADER_VALUE.search(value):
            passed_on[name] = value
        if name.lower() == proxy.UNITS_HEADER.lower():
            assert proxy.header_integer(value) is None or 0 <= proxy.header_integer(value) < 10**18
    while response.read1(65536):
        pass
    if response.length:
        raise http.client.IncompleteRead(b"", response.length)


HEAD_PARTS = ["HTTP/1.1 200 OK\r\n", "HTTP/1.1 103 Early Hints\r\n", "HTTP/1.1 101 Switching\r\n", "HTTP/1.0 ",
              "HTTP/1.1 99999999999999999999 x\r\n", "HTTP/1.1 -1 x\r\n", "HTTP/9.9 200 OK\r\n", "ICY 200 OK\r\n",
              "Content-Length: 5\r\n", "Content-Length: -1\r\n", "Content-Length: 1" + "0" * 5_000 + "\r\n",
              "Content-Length: 3, 4\r\n", "Content-Length: ٣\r\n", "Content-Length: 0x10\r\n",
              "Transfer-Encoding: chunked\r\n", "Transfer-Encoding: gzip, chunked\r\n", "Transfer-Encoding: x\r\n",
              "Connection: close\r\n", " folded\r\n", "X: \xff\r\n", "\r\n", "\n", "5\r\n", "hello\r\n",
              "0\r\n", "ffffffffffffffffffff\r\n", "5;ext=1\r\n", "-5\r\n", "1" + "0" * 5_000 + "\r\n", "abc",
              "Key: " + "v" * 70_000 + "\r\n", "X-Usage-Units: \x85\r\n", "V: a\x0bb\r\n", "V: \x00\r\n",
              "V: a\rb\r\n", "\xff: x\r\n"]


@HOSTILE
@example(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n" + b"1" + b"0" * 5_000 + b"\r\n")
@example(b"HTTP/1.1 200 OK\r\nContent-Length: 1" + b"0" * 5_000 + b"\r\n\r\nx")
@example(b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\nContent-Length: 4\r\n\r\nabcd")
@example(b"HTTP/1.1 103 Early Hints\r\n" * 1_000 + b"HTTP/1.1 200 OK\r\n\r\n")
@example(b"HTTP/1.1 200 OK\r\n" + b"X: y\r\n" * 101 + b"\r\n")
@given(st.one_of(st.binary(max_size=300),
                 st.lists(st.sampled_from(HEAD_PARTS), max_size=12).map(lambda parts: "".join(parts).encode())))
def test_an_upstream_answer_is_read_or_is_an_upstream_error(data):
    try:
        read_answer(data)
    except UPSTREAM_ERRORS:
        pass


def streamed(content: bytes, headers: dict[str, str]) -> httpx.Response:
    """An answer as the guarded client hands it over: its body not read yet."""
    return httpx.Response(200, headers=headers, stream=httpx.ByteStream(content))


@HOSTILE
@example(zlib.compress(b"[" * 100_000), {"Content-Encoding": "deflate"})
@example(gzip.compress(b"0" * 200_000), {"Content-Encoding": "gzip"})
@example(b"\x1f\x8b not gzip", {"Content-Encoding": "gzip"})
@example(b"{}", {"Content-Encoding": "gzip, gzip"})
@example(b"{}", {"Content-Encoding": "br"})
@example(b"{}", {"Content-Encoding": "\xff"})
@given(st.one_of(st.binary(max_size=200), json_ish.map(lambda text: text.encode("utf-8", "surrogatepass"))
                 .map(gzip.compress)),
       st.dictionaries(st.just("Content-Encoding"), st.sampled_from(["gzip", "deflate", "identity", "", "br", "zstd",
                                                                     "gzip, deflate", "GZIP", " gzip "]), max_size=1))
def test_a_sellers_json_answer_is_read_within_its_bound_or_refused(content, headers):
    """The agentic services' and the registry's answers (outbound.json_answer): a value, InvalidJSON, or a body its
    coding does not decode (httpx.DecodingError, among the errors of an unreachable service)."""
    try:
        outbound.json_answer(streamed(content, headers), max_bytes=100_000)
    except bounded_json.InvalidJSON as refusal:
        assert refusal.reason in JSON_REFUSALS | {"unsupported_encoding"}
    except outbound.HTTPX_UNREACHABLE:
        pass


# --- a caller's search: its body and its cursor ---------------------------------------------------------------------

@pytest.fixture
def reader(db):
    return Api(issue_key(AgentFactory(), scope="read"))


@settings(HOSTILE, max_examples=60)
@example(cursor="")
@example(cursor="a:b:c")
@example(cursor="é:ü")
@example(cursor="\x00")
@example(cursor="x" * 3_000)
@example(cursor=json.dumps({"o": [], "v": []}))
@given(cursor=st.text(max_size=200) | st.text(alphabet="abcdefABCDEF0123456789:_-.", max_size=200))
def test_a_forged_search_cursor_is_a_400_with_a_code(reader, cursor):
    response = reader.post("/catalog/search", {"q": "x", "cursor": cursor})
    assert response.status_code in (200, 400), response.content
    if response.status_code == 400:
        assert error_code(response)


@settings(HOSTILE, max_examples=60)
@example(body={"q": "x", "limit": 10**400})
@example(body={"q": "\ud800"})
@example(body={"q": ["a"] * 10})
@example(body={"tags": [{"a": 1}]})
@given(body=st.dictionaries(st.sampled_from(["q", "cursor", "limit", "tags", "order_by", "min_price_atomic",
                                             "max_price_atomic", "pricing_type", "fuzzy"]) | st.text(max_size=5),
                            json_values, max_size=4))
def test_any_search_body_is_answered_or_refused_with_a_code(reader, body):
    try:
        raw = json.dumps(body).encode()
    except ValueError:
        return
    response = reader.client.post("/catalog/search", data=raw, content_type="application/json")
    assert response.status_code in (200, 400), response.content
    if response.status_code == 400:
        assert error_code(response)


def test_the_upstream_reader_reads_an_honest_answer():
    read_answer(b"HTTP/1.1 103 Early Hints\r\nLink: </a>\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")


# --- a caller's headers -------------------------------------------------------------------------------------------

# What a header value may hold as the web server (granian) hands it over: latin-1 text without control characters
# (the HTTP parser refuses a NUL, CR or LF), tab and obs-text included.
header_values = st.text(alphabet=st.sampled_from(["\t", *map(chr, range(0x20, 0x7F)), *map(chr, range(0x80, 0x100))]),
                        max_size=300)


def answered_with_a_code(response) -> None:
    assert response.status_code < 500, response.content
    if response.status_code >= 400:
        assert error_code(response)


@settings(HOSTILE, max_examples=60)
@example(key="", request_id="", authorization="Bearer ")
@example(key="k" * 10_000, request_id="r" * 10_000, authorization="Bearer " + "é" * 300)
@example(key="ÿ" * 255, request_id="req_\x85", authorization="bearer\tmk_x_y")
@given(key=header_values, request_id=header_values, authorization=header_values)
def test_any_idempotency_key_request_id_or_credentials_are_answered_or_refused_with_a_code(owner_api, key,
                                                                                          request_id, authorization):
    headers = {"HTTP_IDEMPOTENCY_KEY": key, "HTTP_X_REQUEST_ID": request_id}
    answered_with_a_code(owner_api.client.post("/agents", data={"handle": "x"}, format="json", **headers))
    answered_with_a_code(Api().client.get("/agents/me", HTTP_AUTHORIZATION=authorization, **headers))
