"""The SDK's parsers of what a compromised marketplace (or a seller behind its proxy, or whoever calls a seller's
webhook) sends, fed arbitrary bytes (hypothesis): each returns a value or raises its documented refusal, never
another exception. Reproducible: derandomized, so CI runs the same examples; the nasty seeds are `@example`s."""

from __future__ import annotations

import base64
import itertools
import json
import string
import time
import warnings
from typing import Any

import httpx
import pytest
from hypothesis import HealthCheck, example, given, settings
from eth_account import Account
from hypothesis import strategies as st

from sdk import (AgreedTerms, AgreementFailed, MarketplaceClient, MarketplaceError, SellerUnverified, SigningRefused,
                 bounded_http, bounded_json, proxy_signature, webhook_signature)
from sdk.activation import sign_activation_package
from sdk.bounded_http import AnswerRefused, BoundedHttp
from sdk.client import _check_masumi_timers
from sdk.hmac_check import canonical_int
from sdk.onchain import ChainReader, RpcError
from sdk.x402_signing import sign_payment_required
from tests.sdk.test_payee_and_node_answers import honest_agreement, honest_package
from tests.sdk.test_signing_bounds import AGREEMENT_ID, DOMAIN, KEY, NETWORK, onchain_id_of, payment_required

HOSTILE = settings(max_examples=200, deadline=None, derandomize=True, database=None,
                   suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])

# JSON values as a server may send them: any nesting, any text, integers beyond any machine word.
json_values = st.recursive(
    st.none() | st.booleans() | st.integers(min_value=-2**300, max_value=2**300) | st.floats(allow_nan=False,
                                                                                            allow_infinity=False)
    | st.text(max_size=20),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=12)
# Text close to JSON: its punctuation, escapes and number parts, where a parser's edge cases are.
json_ish = st.text(alphabet=st.sampled_from(list('{}[]",:\\u0123456789eE+-.tfnrlsaNIyi ') + ["\ufeff", "\x00", "\ud800",
                                                                                               "\u2028"]), max_size=60)
NASTY_JSON = [b"\xef\xbb\xbf{}", b"[" * 100_000, b"1" * 5_000, b"1e400", b"-1e400", b"NaN", b"-Infinity",
              b'"\\ud800"', b'"\\udc00\\ud800"', b"\xed\xa0\x80", b'{"a":1,"a":2}', b'"\\u0000"', b"\xff\xfe[]",
              b"0" * 5_000 + b".5", b"1e" + b"9" * 5_000, b'"' + b"\\" * 9_999 + b'"']


def nasty_examples(values):
    def decorate(test):
        for value in values:
            test = example(value)(test)
        return test
    return decorate


@HOSTILE
@nasty_examples(NASTY_JSON)
@given(st.one_of(st.binary(max_size=200), json_ish.map(lambda text: text.encode("utf-8", "surrogatepass"))))
def test_bounded_json_parses_or_refuses_any_bytes(data):
    try:
        bounded_json.loads(data)
    except bounded_json.InvalidJSON as refusal:
        assert refusal.reason in {"malformed", "too_deep"}


@HOSTILE
@given(json_values)
def test_bounded_json_reads_back_any_json_it_is_sent(value):
    assert bounded_json.loads(json.dumps(value)) == value


@HOSTILE
@nasty_examples(["", "0", "00", "+1", "1_0", "٣", "²", " 1", "1" * 5_000, "-0"])
@given(st.text(max_size=30))
def test_canonical_int_reads_digits_or_refuses(text):
    try:
        number = canonical_int(text)
    except ValueError:
        return
    assert str(number) == text


HEADER_NAMES = ["X-Marketplace-Agreement", "X-Marketplace-Call-Seq", "X-Marketplace-Timestamp",
                "X-Marketplace-Signature", "X-Marketplace-Signature-Previous", "x-marketplace-call-seq", "Other"]


@HOSTILE
@example({"X-Marketplace-Agreement": "a", "X-Marketplace-Call-Seq": "1", "X-Marketplace-Timestamp": "9" * 5_000,
          "X-Marketplace-Signature": "v1=é"})
@example({"X-Marketplace-Agreement": "a", "X-Marketplace-Call-Seq": "1", "X-Marketplace-Timestamp": "1",
          "X-Marketplace-Signature": "\ud800"})
@given(st.dictionaries(st.sampled_from(HEADER_NAMES) | st.text(max_size=10), st.text(max_size=40), max_size=7))
def test_a_proxied_calls_signature_check_answers_yes_or_no_to_any_headers(headers):
    assert proxy_signature.verify("secret", headers, method="GET", path="/x") in (True, False)


@HOSTILE
@example(b"{}", "t=" + "9" * 5_000 + ",v1=ab")
@example(b'{"id": "\\ud800"}', "t=1,v1=\ud800")
@example(b"[" * 100_000, "t=1,,=,v1")
@given(st.binary(max_size=100), st.lists(st.sampled_from(list("tv019=, é\ud800") + ["v1=", "t="]), max_size=30)
       .map("".join))
def test_a_webhook_signature_check_answers_yes_or_no_to_any_delivery(body, header):
    assert webhook_signature.verify("secret", body, header, event_id="evt", event_type="t") in (True, False)


def answer(content: bytes, headers: dict[str, str]) -> httpx.Response:
    # A stream, read by the SDK: `content=` would be decoded by httpx.Response in the transport, before the SDK reads.
    transport = httpx.MockTransport(lambda request: httpx.Response(200, headers=headers,
                                                                   stream=httpx.ByteStream(content)))
    return BoundedHttp(deadline=10, max_answer_bytes=10_000, transport=transport).request("GET", "http://m/x")


@HOSTILE
@example(b"\x1f\x8b garbage", {"Content-Encoding": "gzip"})
@example(b"garbage", {"Content-Encoding": "deflate"})
@example(b"{}", {"Content-Encoding": "br, gzip"})
@example(b"\xff\xfe{\x00}\x00", {"Content-Type": "application/json; charset=utf-16"})
@example(b"{}", {"Content-Type": "text/plain; charset=punycode"})
@example(b"{}", {"Content-Type": "text/plain; charset=bz2_codec"})
@given(st.binary(max_size=200), st.dictionaries(
    st.sampled_from(["Content-Encoding", "Content-Type", "Content-Length"]),
    st.sampled_from(["gzip", "deflate", "identity", "br", "gzip, gzip", "application/json; charset=utf-16",
                     "text/plain; charset=rot13", "text/plain; charset=\x00", "text/plain; charset=idna"])
    | st.text(alphabet=string.printable.strip(), max_size=30), max_size=3))
def test_an_sdk_answer_is_read_parsed_and_decoded_or_refused(content, headers):
    try:
        response = answer(content, headers)
    except AnswerRefused:  # UndecodableAnswer: a body its Content-Encoding does not decode
        return
    response.text  # noqa: B018 - decoded in whatever charset the server names
    try:
        bounded_http.json_answer(response)
    except bounded_json.InvalidJSON:
        pass


@HOSTILE
@example("text/plain; charset=utf-7", b"+AGEA-+\xff")
@given(st.text(max_size=30) | st.sampled_from(["utf-16", "utf-32", "punycode", "idna", "rot13", "hex", "base64",
                                               "zlib", "uu", "undefined", "utf-7", "mbcs", "cp65001"]),
       st.binary(max_size=100))
def test_an_answers_text_decodes_in_the_charset_it_names_or_utf8(charset, content):
    content.decode(bounded_http.text_encoding(charset, content), errors="replace")


def package_variants() -> st.SearchStrategy:
    """An honest activation package with fields replaced by, or added as, arbitrary JSON; or no object at all."""
    fields = st.sampled_from(["agreement_id", "onchain_id", "chain_id", "escrow_contract", "token_address",
                              "deposit_amount_atomic", "infra_fee_atomic", "deadline", "intent", "escrow_permit",
                              "intent_nonce_round"]) | st.text(max_size=8)
    return st.one_of(st.dictionaries(fields, json_values, max_size=3).map(lambda changes: ("merge", changes)),
                     json_values.map(lambda value: ("whole", value)))


@HOSTILE
@example(("whole", "agreement_id"))
@example(("whole", [{}]))
@example(("whole", None))
@example(("merge", {"deposit_amount_atomic": "1" * 5_000}))
@example(("merge", {"agreement_id": "1" * 5_000}))
@example(("merge", {"intent": {"message": {"deadline": "1" * 5_000}}}))
@given(package_variants())
def test_an_activation_package_is_signed_or_refused(variant):
    honest, terms = honest_package()
    kind, value = variant
    package: Any = {**honest, **value} if kind == "merge" else value
    try:
        sign_activation_package(package, KEY, terms=terms, network=NETWORK, token_domain=DOMAIN, permit_nonce=0)
    except SigningRefused:
        pass


def encoded(value: Any) -> str:
    return base64.b64encode(json.dumps(value).encode()).decode()


@HOSTILE
@example("")
@example("not base64!")
@example(base64.b64encode(b"[" * 100_000).decode())
@example(encoded({"x402Version": 2, "accepts": [{"scheme": "exact", "amount": "1" * 5_000}]}))
@example(encoded({"x402Version": 2, "accepts": "x"}))
@example(encoded({"x402Version": 1, "accepts": [{}]}))
@example(encoded([]))
@example(encoded({"x402Version": 2, "accepts": []}))
@example(encoded({"x402Version": 1, "accepts": []}))
@given(st.one_of(st.text(max_size=60), json_values.map(encoded),
                 st.dictionaries(st.sampled_from(["x402Version", "accepts", "error", "resource"]), json_values)
                 .map(encoded)))
def test_a_402_header_is_signed_or_refused(header):
    try:
        sign_payment_required(header, KEY, max_amount_atomic=10**6, network=NETWORK, token_domain=DOMAIN)
    except ValueError:  # SigningRefused, InvalidJSON, and x402's own refusal of what is no PaymentRequired
        pass


@pytest.fixture(scope="module", autouse=True)
def _honest_402_still_signs():
    """The properties above would pass for a signer that refuses everything."""
    assert sign_payment_required(payment_required(), KEY, max_amount_atomic=10**6, network=NETWORK,
                                 token_domain=DOMAIN)
    honest, terms = honest_package()
    assert sign_activation_package(honest, KEY, terms=terms, network=NETWORK, token_domain=DOMAIN, permit_nonce=0)


AGREEMENT_FIELDS = ["id", "onchain_id", "service", "quantity", "price_per_unit_atomic", "deposit_amount_atomic",
                    "infra_fee_atomic", "chain_id", "token_address", "settlement_model", "pricing_type", "unit_name",
                    "token", "buyer_wallet_address", "seller_wallet_address", "fee_recipient", "expires_at",
                    "challenge_window_seconds"]
# Values near what each field holds, where their parsers' edges are (digits beyond int()'s limit, a date without its
# UTC offset, an address of the wrong length...).
near_values = json_values | st.sampled_from(["1" * 5_000, "٣", "-1", "1e3", "2026-01-01", "2026-01-01T00:00:00",
                                             "2026-01-01T00:00:00+99:00", "9999-12-31T23:59:59+00:00", "0x", "0x12",
                                             "0x" + "g" * 40, str(2**256), "\ud800", {"id": None}, {"id": []}])


@HOSTILE
@example({"quantity": "1" * 5_000})
@example({"expires_at": "1" * 5_000})
@example({"service": None})
@example({"id": None})
@given(st.dictionaries(st.sampled_from(AGREEMENT_FIELDS), near_values | st.just(...), max_size=3))
def test_an_agreements_terms_are_read_or_refused(changes):
    """The marketplace's statement of an agreement (its `propose_agreement` answer): `...` removes the field."""
    agreement = {**honest_agreement(), **changes}
    agreement = {name: value for name, value in agreement.items() if value is not ...}
    try:
        AgreedTerms.from_agreement(agreement, NETWORK)
    except SigningRefused:
        pass


@HOSTILE
@example(b'{"error": {"code": {"a": 1}, "details": [1]}}', 402)
@example(b'{"error": "x", "details": "y"}', 402)
@example(b'{"error": null}', 500)
@example(b"[" * 100_000, 500)
@example(b"\xff\xfe", 400)
@given(st.one_of(st.binary(max_size=100), json_values.map(lambda value: json.dumps(value).encode()),
                 st.dictionaries(st.sampled_from(["error", "code", "message", "details"]), json_values)
                 .map(lambda value: json.dumps({"error": value} if "error" not in value else value).encode())),
       st.sampled_from([400, 402, 404, 409, 500, 503]))
def test_any_refusal_the_marketplace_answers_is_a_marketplace_error(content, status):
    error = MarketplaceError.from_response(httpx.Response(status, content=content))
    assert error.status == status and isinstance(error.code, str) and isinstance(error.details, dict)


@HOSTILE
@example({"challenge_window_seconds": ...})
@example({"expires_at": ...})
@given(st.dictionaries(st.sampled_from(["expires_at", "challenge_window_seconds"]), near_values | st.just(...),
                       max_size=2))
def test_a_masumi_jobs_timers_are_checked_or_refused(changes):
    """The marketplace's agreement for a Masumi job, against the buyer's own timers."""
    honest = honest_agreement()
    agreement = {name: value for name, value in {**honest, **changes}.items() if value is not ...}
    try:
        _check_masumi_timers(agreement, {"submitResultTime": str(honest["expires_at"] * 1000)}, now=int(time.time()))
    except SigningRefused:
        pass


# --- the client's public methods, against a marketplace and a node answering JSON of any shape ----------------------

# Keys the client reads in the marketplace's answers, so that generated objects hold some of them.
ANSWER_KEYS = ["data", "agreementId", "ActivationPackage", "blockchainIdentifier", "Purchases", "onChainState",
               "unlockTime", "id", "onchain_id", "service", "status", "quantity", "results", "next_cursor",
               "invocation_id", "result", "deadline", "challenge", "cancel_authorization", "seller", "pricing",
               "wallet_address", "unit_price_atomic", "error"]
shaped_answers = st.recursive(
    st.none() | st.booleans() | st.integers(min_value=-2**70, max_value=2**70) | st.text(max_size=8)
    | st.sampled_from([AGREEMENT_ID, "s1", "0x" + "00" * 20, "1"]),
    lambda children: st.lists(children, max_size=3) | st.dictionaries(st.sampled_from(ANSWER_KEYS), children,
                                                                          max_size=5),
    max_leaves=16)
BUYER_KEY_ADDRESS = Account.from_key(KEY).address
PUBLIC_READS = {
    "me": lambda client: client.me(),
    "get_agreement": lambda client: client.get_agreement(AGREEMENT_ID),
    "search_services": lambda client: list(itertools.islice(client.search_services("x"), 50)),
    "list_agreements": lambda client: list(itertools.islice(client.list_agreements(), 50)),
    "usage": lambda client: list(itertools.islice(client.usage(AGREEMENT_ID), 50)),
    "escrow_status": lambda client: client.escrow_status(AGREEMENT_ID),
    "payment_requirements": lambda client: client.payment_requirements(amount_atomic=1),
    "wait_until": lambda client: client.wait_until(AGREEMENT_ID, timeout=0.05, poll_interval=0.01),
    "get_purchase": lambda client: client.get_purchase("b1"),
    "wait_for_purchase": lambda client: client.wait_for_purchase("b1", timeout=0.05, poll_interval=0.01),
    "wait_for_invocation": lambda client: client.wait_for_invocation("i1", timeout=0.05, poll_interval=0.01),
    "get_invocation": lambda client: client.get_invocation("i1"),
    "propose_agreement": lambda client: client.propose_agreement("s1", 1, max_unit_price_atomic=10**6),
    "propose_direct_purchase": lambda client: client.propose_direct_purchase(
        "s1", 1, wallet=KEY, max_unit_price_atomic=10**6, permit_nonce=0),
    "cancel_payment_authorization": lambda client: client.cancel_payment_authorization(
        AGREEMENT_ID, KEY, authorization_nonce="0x" + "11" * 32),
    "purchase_masumi_job": lambda client: client.purchase_masumi_job("s1", {}, KEY, max_price_atomic=10**6,
                                                                     permit_nonce=0),
    "request_refund": lambda client: client.request_refund("b1", KEY, agreement_id=AGREEMENT_ID),
    "challenge": lambda client: client.challenge(
        {"id": AGREEMENT_ID, "onchain_id": onchain_id_of(AGREEMENT_ID), "challenge_window_seconds": 3600}, KEY, "x"),
    "activate_escrow": lambda client: client.activate_escrow(honest_agreement(), KEY, quantity=10,
                                                             max_unit_price_atomic=10**6, permit_nonce=0),
    "invoke_skill": lambda client: client.invoke_skill("h", "s", {}, private_key=KEY, max_amount_atomic=1,
                                                       timeout=0.05, poll_interval=0.01),
}
# What a public method may raise at a hostile answer: the SDK's documented refusals (and a wait's end).
REFUSALS = (SigningRefused, AnswerRefused, MarketplaceError, AgreementFailed, TimeoutError, bounded_json.InvalidJSON)


@pytest.mark.parametrize("read", sorted(PUBLIC_READS))
@settings(HOSTILE, max_examples=60)
@example(status=200, value={"data": {}})
@example(status=200, value={"data": {"agreementId": AGREEMENT_ID}})
@example(status=200, value={"data": {"Purchases": [{"agreementId": AGREEMENT_ID, "unlockTime": "1"}]}})
@example(status=200, value={"results": {}, "next_cursor": None})
@example(status=200, value={"results": [], "next_cursor": 7})
@example(status=200, value={"id": AGREEMENT_ID, "service": None})
@example(status=200, value=[])
@example(status=402, value={})
@given(status=st.sampled_from([200, 200, 200, 201, 402, 409]), value=shaped_answers)
def test_a_public_method_answers_or_refuses_a_marketplace_answering_json_of_any_shape(read, status, value):
    """Every answer of the marketplace is `value`: the method returns, or raises one of the SDK's refusals, never
    KeyError, IndexError, TypeError or AttributeError (nor signs what it cannot check)."""
    transport = httpx.MockTransport(lambda request: httpx.Response(status, content=json.dumps(value).encode()))
    with MarketplaceClient("https://marketplace.example", "mk_test", network=NETWORK, transport=transport,
                           retries=0) as client, warnings.catch_warnings():
        warnings.simplefilter("ignore", SellerUnverified)
        try:
            PUBLIC_READS[read](client)
        except REFUSALS:
            pass


def escrow_node_answers() -> st.SearchStrategy:
    """What a node answers the escrow's reads with: an Activated log of any shape (or none), any `getEscrow` data."""
    hex_data = st.binary(max_size=12 * 32).map(lambda raw: "0x" + raw.hex())
    topic = st.sampled_from(["0x" + "00" * 32, "0x12", "zz"]) | st.text(max_size=4)
    log = st.fixed_dictionaries({}, optional={"topics": st.lists(topic, max_size=5) | json_values,
                                              "data": hex_data | json_values,
                                              "blockNumber": st.sampled_from(["0x1", "soon"]) | json_values})
    return st.fixed_dictionaries({"eth_getLogs": st.lists(log, max_size=2) | json_values,
                                  "eth_call": hex_data | json_values,
                                  "eth_blockNumber": st.sampled_from(["0x10"]) | json_values,
                                  "whole": st.none() | st.just(...) | json_values})


@settings(HOSTILE, max_examples=150)
@example({"eth_getLogs": [{"topics": ["0x" + "00" * 32]}], "eth_call": "0x", "eth_blockNumber": "0x10",
          "whole": None})
@example({"eth_getLogs": [{"topics": ["0x" + "00" * 32] * 4, "data": "0x" + "00" * 288}],
          "eth_call": "0x" + "ff" * 192, "eth_blockNumber": "0x10", "whole": None})
@example({"eth_getLogs": [], "eth_call": "0x", "eth_blockNumber": "0x10", "whole": []})
@example({"eth_getLogs": [], "eth_call": "0x", "eth_blockNumber": "0x10", "whole": ...})
@given(escrow_node_answers())
def test_an_escrow_read_through_a_node_answering_anything_reads_or_is_a_malformed_answer(answers):
    """`ChainReader.escrow` (what `verify_usage` and `challenge` read) of a node answering each method with the
    shape drawn; `whole` replaces the whole JSON-RPC answer (`...`: an answer without a result)."""
    def node(request: httpx.Request) -> httpx.Response:
        call = json.loads(request.content)
        if answers["whole"] is ...:
            return httpx.Response(200, json={"jsonrpc": "2.0", "id": call["id"]})
        if answers["whole"] is not None:
            return httpx.Response(200, json=answers["whole"])
        return httpx.Response(200, json={"jsonrpc": "2.0", "id": call["id"], "result": answers[call["method"]]})

    reader = ChainReader("https://node.invalid", transport=httpx.MockTransport(node))
    try:
        reader.escrow(NETWORK.escrow_address, onchain_id_of(AGREEMENT_ID), buyer=BUYER_KEY_ADDRESS)
    except RpcError:  # MalformedAnswer among them
        pass
    finally:
        reader.close()
