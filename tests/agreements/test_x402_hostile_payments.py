"""Hostile spellings of an x402 payment at the skill route: every one is 402 with a code, nothing recorded, nothing
sent, and never paid with a meaning other than its plain spelling's."""

import base64
import json
import re

import pytest

from agreements.models import SkillInvocation
from escrow.models import ChainTransaction
from tests.agreements.test_invocations import Market, _with_payload

pytestmark = [pytest.mark.chain, pytest.mark.django_db]


@pytest.fixture
def market(escrow_chain, http_server):
    return Market(escrow_chain, http_server)


def _refused(market, payment: str, code: str = "malformed_payment") -> None:
    before = market.balances()
    response = market.call("translate", payment)
    assert response.status_code == 402, response.content
    assert response.json()["error"] == code, response.content
    assert market.upstream.requests == []
    assert not SkillInvocation.objects.exists() and not ChainTransaction.objects.exists()
    assert market.balances() == before


def _authorization(**fields):
    return lambda payload: payload["payload"]["authorization"].update(fields)


@pytest.mark.parametrize("field", ["value", "validAfter", "validBefore"])
@pytest.mark.parametrize("spelling", [
    lambda n: "".join(chr(0x0660 + int(d)) for d in str(n)),  # Arabic-Indic digits: int() reads them
    lambda n: "".join(chr(0xFF10 + int(d)) for d in str(n)),  # fullwidth digits
    lambda n: f"{n:_}" if n >= 1000 else f"0_{n}",  # int("20_000") is 20000, int("0_0") 0
    lambda n: f" {n}\n",  # int() trims whitespace
    lambda n: f"+{n}",
    lambda n: float(n),  # a JSON number with a fraction part: int(20000.0)
    lambda n: f"{n}.0",
], ids=["arabic-indic", "fullwidth", "underscores", "whitespace", "plus-sign", "json-float", "decimal-point"])
def test_an_authorizations_numbers_are_read_only_as_plain_ascii_digits(market, field, spelling):
    """The signature is over the integers x402 reads with `int()`, which also reads "٢٠٠٠٠", "20_000", " 20000 "
    and 20000.0: a payment respelled so was paid, its authorization meaning one thing to us and another (or
    nothing) to any other reader of it."""
    payment = market.pay("translate")
    signed = json.loads(base64.b64decode(payment))["payload"]["authorization"][field]
    _refused(market, _with_payload(payment, _authorization(**{field: spelling(int(signed))})))


def test_a_payment_header_with_a_key_given_twice_is_refused(market):
    """x402 parses the header with json.loads, which keeps the last of two keys (other parsers the first): a
    payment must mean one thing, as a request body must."""
    payment = market.pay("translate")
    text = base64.b64decode(payment).decode()
    doubled = re.sub(r'"value":\s*', '"value": "1", "value": ', text, count=1)
    assert doubled != text
    _refused(market, base64.b64encode(doubled.encode()).decode())


@pytest.mark.parametrize("version", [3, 0, "2", 2.0, True, None], ids=["3", "0", "string", "json-float", "true", "null"])
def test_a_payment_in_an_x402_version_this_server_does_not_speak_is_refused(market, version):
    """x402 reads `x402Version` loosely: 1 (or anything equal to it, `true`, `1.0`) as v1, anything else as v2, so a
    payment announcing version 3 (a protocol this server does not speak), "2" or 2.0 was paid as v2. The version is
    the JSON integer 1 or 2."""
    _refused(market, _with_payload(market.pay("translate"), lambda payload: payload.update(x402Version=version)),
             code="unsupported_x402_version")


@pytest.mark.parametrize("change", [
    _authorization(nonce="0xabc"),  # odd length
    lambda p: p["payload"]["authorization"].update(nonce="0X" + p["payload"]["authorization"]["nonce"][2:]),
    lambda p: p["payload"]["authorization"].update(nonce=p["payload"]["authorization"]["nonce"] + "00"),  # 33 B
    lambda p: p["payload"]["authorization"].update(**{"from": p["payload"]["authorization"]["from"] + "00"}),
    lambda p: p["payload"]["authorization"].update(to=p["payload"]["authorization"]["to"] + "00"),
    _authorization(value=str(2**256)), _authorization(value="-20000"), _authorization(value=True),
    _authorization(validBefore=str(2**64)), _authorization(validAfter="-1"), _authorization(validBefore=None),
    lambda p: p["payload"]["authorization"].update(nonce="0x" + "\u0660" * 64),
    lambda p: p["payload"].update(signature=p["payload"]["signature"] + "\x00"),
], ids=["nonce-odd", "nonce-0X", "nonce-33-bytes", "from-21-bytes", "to-21-bytes", "value-beyond-uint256",
        "value-negative", "value-bool", "valid-before-2**64", "valid-after-negative", "valid-before-null",
        "nonce-unicode", "signature-nul"])
def test_malformed_authorization_fields_are_402_malformed(market, change):
    payment = market.pay("translate")
    response = market.call("translate", _with_payload(payment, change))
    assert response.status_code == 402, response.content
    assert response.json()["error"] in ("malformed_payment", "wrong_recipient", "wrong_amount",
                                        "authorization_expired", "invalid_signature"), response.content
    assert market.upstream.requests == []
    assert not SkillInvocation.objects.exists() and not ChainTransaction.objects.exists()


@pytest.mark.parametrize("header", [
    "=" * 8, "!!!!", base64.urlsafe_b64encode(b'{"x402Version": 2, "payload": "\xff\xfe"}').decode(),
    base64.b64encode(b"[" * 100_000 + b"]" * 100_000).decode(),
    base64.b64encode(json.dumps({"x": "a" * 1_000_000}).encode()).decode(),
    "A" * 1_000_000, base64.b64encode("\u0660".encode()).decode(),
], ids=["padding-only", "not-base64", "url-safe-bad-utf8", "depth-bomb", "one-megabyte", "one-megabyte-of-A",
        "unicode-digit"])
def test_hostile_payment_headers_are_402_malformed(market, header):
    _refused(market, header)


def test_a_payment_in_the_url_safe_alphabet_or_without_padding_is_refused_not_misread(market):
    """b64decode drops characters outside its alphabet: a URL-safe spelling decodes to other bytes."""
    payment = market.pay("translate")
    raw = base64.b64decode(payment)
    for spelling in (base64.urlsafe_b64encode(raw).decode(), payment.rstrip("=")):
        if spelling == payment:
            continue
        response = market.call("translate", spelling)
        assert response.status_code in (200, 402), response.content
        if response.status_code == 402:
            assert response.json()["error"] == "malformed_payment", response.content
    assert market.upstream.requests == [] or SkillInvocation.objects.count() == 1
