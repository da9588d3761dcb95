"""Hostile JSON: nesting deep enough to exhaust the parser's recursion, a NUL character or a lone surrogate
PostgreSQL cannot store, NaN and numbers beyond a float that jsonb cannot, a body larger than the platform reads.
Each is a 4xx in the error shape, never a 500 or a dead process."""

import base64
import json
import logging
import subprocess
import sys
from pathlib import Path

import pytest

from catalog.models import Service
from marketplace import bounded_json
from tests.catalog.factories import AgentFactory, issue_key, issue_owner_token, register_service, service_data
from tests.conftest import Api, codes_at, error_code

ROOT = Path(__file__).resolve().parents[2]
PROJECT_PACKAGES = ["marketplace", "catalog", "policies", "agreements", "escrow", "sdk"]


def deep(levels: int) -> bytes:
    return b"[" * levels + b"]" * levels


def test_no_import_leaves_the_recursion_limit_raised():
    """py_ecc (under web3 and eth_account) raises it to 100,000 on import, which turns deep JSON into a SIGSEGV.
    A fresh interpreter imports every project module and the chain and payment libraries: the limit is Python's."""
    script = f"""
import importlib, pkgutil, sys
default = sys.getrecursionlimit()
import django
django.setup()
for package in {PROJECT_PACKAGES!r}:
    module = importlib.import_module(package)
    for info in pkgutil.walk_packages(module.__path__, package + "."):
        importlib.import_module(info.name)
for name in ["web3", "eth_account", "x402", "x402.http", "py_ecc.bn128", "py_ecc.optimized_bn128"]:
    importlib.import_module(name)
print(default, sys.getrecursionlimit())
"""
    env = {"DJANGO_SETTINGS_MODULE": "marketplace.settings", "PATH": "/usr/bin:/bin", "HOME": str(ROOT)}
    result = subprocess.run([sys.executable, "-c", script], cwd=ROOT, env=env, capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    default, after = result.stdout.split()
    assert after == default == "1000"


@pytest.mark.parametrize("text, depth", [
    ("1", 0), ("[]", 1), ('{"a": [1, {"b": []}]}', 4), ('["[[[[", "]"]', 1), ('["\\"[[["]', 1), ('"[[[', 0),
])
def test_depth_is_measured_outside_strings(text, depth):
    assert bounded_json.depth(text) == depth


def test_the_parser_refuses_what_it_must_not_parse(settings):
    settings.JSON_MAX_DEPTH = 3
    assert bounded_json.loads(b'{"a": [[1]]}') == {"a": [[1]]}
    refusals = {b'{"a": [[[1]]]}': "too_deep", deep(100_000): "too_deep", b'{"a": "x\\u0000"}': "nul_character",
                b'{"a\\u0000": 1}': "nul_character", b"[1,": "malformed", b"\xff": "malformed",
                b'{"a": NaN}': "malformed", b"[-Infinity]": "malformed", b"[1e400]": "malformed",
                b'{"a": "x\\ud800"}': "surrogate", b'{"\\udc00": 1}': "surrogate"}
    for body, reason in refusals.items():
        with pytest.raises(bounded_json.InvalidJSON) as refused:
            bounded_json.loads(body)
        assert refused.value.reason == reason
    assert bounded_json.loads(b'["\\\\u0000"]') == ["\\u0000"]  # an escaped backslash, then "u0000": no NUL
    with pytest.raises(bounded_json.InvalidJSON) as refused:
        bounded_json.loads(b'{"a": [1, {"b": "\\u0000"}]}')
    assert refused.value.path == ("a", 1, "b")
    assert bounded_json.loads(b'["\\ud83d\\ude00", 1e308]') == ["\U0001f600", 1e308]  # a pair is one character
    with pytest.raises(bounded_json.InvalidJSON) as refused:
        bounded_json.loads(b'{"a": [{"b": "\\ude00\\ud83d"}]}')  # a pair the wrong way round: two lone halves
    assert refused.value.path == ("a", 0, "b")
    with pytest.raises(bounded_json.InvalidJSON) as refused:
        bounded_json.loads(b"[1, 2]", max_bytes=5)
    assert refused.value.reason == "too_large"


@pytest.fixture
def skill_route(db):
    seller = AgentFactory(handle="deep-seller", is_buyer=False, is_seller=True)
    register_service(seller)
    return "/agents/deep-seller/translate"


def post_raw(api: Api, path: str, body: bytes):
    return api.client.post(path, data=body, content_type="application/json")


def test_deep_json_to_the_unauthenticated_skill_route_is_400(skill_route, caplog):
    response = post_raw(Api(), skill_route, b'{"input": ' + deep(5_000) + b"}")
    assert response.status_code == 400, response.content
    assert error_code(response) == "invalid_json"
    assert response.json()["error"]["details"] == {"max_depth": 64}


def test_deep_json_to_the_search_is_400(db):
    reader = Api(issue_key(AgentFactory(), scope="read"))
    response = post_raw(reader, "/catalog/search", b'{"q": ' + deep(5_000) + b"}")
    assert response.status_code == 400 and error_code(response) == "invalid_json"


def test_a_nul_character_in_a_json_field_is_400_naming_the_field_not_500(skill_route, caplog):
    """PostgreSQL stores no NUL in text or jsonb: the skill's input (a JSON field) failed the insert with a 500."""
    response = post_raw(Api(), skill_route, json.dumps({"input": {"items": ["ok", {"text": "a\u0000b"}]}}).encode())
    assert codes_at(response, "input", "items", 1, "text") == {"null_characters_not_allowed"}
    in_a_key = post_raw(Api(), skill_route, json.dumps({"input": {"a\u0000": 1}}).encode())
    assert codes_at(in_a_key, "input") == {"null_characters_not_allowed"}
    assert not [record for record in caplog.records if record.levelno >= logging.ERROR]


def test_a_lone_surrogate_in_a_json_field_is_400_naming_the_field_not_500(seller_api, caplog):
    """UTF-8 encodes no lone surrogate (`"\\ud800"`): PostgreSQL refused the service's metadata with a 500."""
    body = json.dumps(service_data())[:-1] + ', "metadata": {"note": "x\\ud800"}}'
    response = post_raw(seller_api, "/agents/services", body.encode())
    assert codes_at(response, "metadata", "note") == {"surrogate_characters_not_allowed"}
    assert not Service.objects.exists()
    assert not [record for record in caplog.records if record.levelno >= logging.ERROR]


@pytest.mark.parametrize("number", ["NaN", "Infinity", "-Infinity", "1e400"])
def test_nan_infinity_and_numbers_beyond_a_float_are_400_malformed_json_not_500(seller_api, caplog, number):
    """Python's json reads them as floats that jsonb stores none of (and the renderer writes none of): a 500."""
    body = json.dumps(service_data())[:-1] + f', "metadata": {{"score": {number}}}}}'
    response = post_raw(seller_api, "/agents/services", body.encode())
    assert response.status_code == 400, response.content
    assert error_code(response) == "malformed_json"
    assert not Service.objects.exists()
    assert not [record for record in caplog.records if record.levelno >= logging.ERROR]


@pytest.mark.parametrize("where", ["top", "nested"])
def test_a_key_given_twice_in_a_body_is_400_duplicate_key(seller_api, caplog, where):
    """Python's json takes the last of two same-named keys, other parsers (a proxy's, a log's, another SDK's) the
    first: a payments API must not read a body otherwise than whoever checked or signed it did."""
    data = service_data()
    if where == "top":
        body = json.dumps(data)[:-1] + ', "name": "other-name"}'
    else:
        body = json.dumps(data)[:-1] + ', "metadata": {"tier": "gold", "tier": "free"}}'

    response = post_raw(seller_api, "/agents/services", body.encode())

    assert response.status_code == 400, response.content
    assert error_code(response) == "duplicate_key"
    assert response.json()["error"]["details"] == {"key": "name" if where == "top" else "tier"}
    assert not Service.objects.exists()
    assert not [record for record in caplog.records if record.levelno >= logging.ERROR]
    assert post_raw(seller_api, "/agents/services", json.dumps(data).encode()).status_code == 201


def test_the_answers_the_platform_reads_keep_their_duplicate_keys_readable():
    """Only a caller's request body is refused for them: a seller's or a chain node's answer is read as before."""
    assert bounded_json.loads(b'{"a": 1, "a": 2}') == {"a": 2}
    with pytest.raises(bounded_json.InvalidJSON) as refused:
        bounded_json.loads(b'{"b": {"a": 1, "a": 2}}', duplicate_keys=False)
    assert refused.value.reason == "duplicate_key" and refused.value.key == "a"


def test_a_body_over_the_upload_limit_is_413_without_a_traceback(skill_route, settings, caplog):
    body = json.dumps({"input": {"text": "x" * (settings.DATA_UPLOAD_MAX_MEMORY_SIZE + 10)}}).encode()
    for headers in ({}, {"HTTP_IDEMPOTENCY_KEY": "big-1"}):
        response = Api().client.post(skill_route, data=body, content_type="application/json", **headers)
        assert response.status_code == 413, response.content
        assert error_code(response) == "request_too_large"
    assert not [record for record in caplog.records if record.levelno >= logging.ERROR]


@pytest.mark.chain
def test_a_deep_payment_header_is_a_malformed_payment(escrow_chain, skill_route):
    """The x402 payment header is base64 JSON, parsed by the x402 library with the unbounded json.loads."""
    header = base64.b64encode(b'{"x402Version": 2, "payload": ' + deep(5_000) + b"}").decode()
    response = Api().client.post(skill_route, data=json.dumps({"input": {"text": "hi"}}),
                                 content_type="application/json", HTTP_X_PAYMENT_SIGNATURE=header)
    assert response.status_code == 402, response.content
    assert response.json()["error"] == "malformed_payment"


@pytest.mark.parametrize("path", ["/catalog/search", "/owner-tokens"])
def test_a_body_of_many_unknown_fields_is_refused_naming_a_few_not_echoing_every_one(db, path):
    """A body within the upload limit made of unknown fields (2.3 MB: 200,000 keys `{"0": 0, "1": 0, ...}`) was
    answered with every one of them named, each with its code and message: a 12 MB answer, built and rendered by a
    web thread for ~20 s of CPU, from one request any key holder sends. The refusal names the first
    UNKNOWN_FIELDS_NAMED (in sorted order) and says how many there were."""
    from marketplace.serializers import UNKNOWN_FIELDS_NAMED

    buyer = AgentFactory(is_buyer=True)
    api = Api(issue_key(buyer)) if path == "/catalog/search" else Api(issue_owner_token(buyer.owner))
    body = json.dumps({f"{n:x}": 0 for n in range(200_000)}).encode()
    response = api.client.generic("POST", path, body, content_type="application/json")
    assert response.status_code == 400
    fields = response.json()["error"]["details"]["fields"]
    unknown = sorted(name for name, errors in fields.items() if errors[0]["code"] == "unknown_field")
    assert unknown == sorted(f"{n:x}" for n in range(200_000))[:UNKNOWN_FIELDS_NAMED]
    assert fields["non_field_errors"][0]["code"] == "too_many_unknown_fields"
    assert "200000" in fields["non_field_errors"][0]["message"]
    assert len(response.content) < 4096
    few = api.post(path, {"q": "x", "zz": 0})  # a few: each named, as before
    assert codes_at(few, "zz") == {"unknown_field"} and "non_field_errors" not in few.json()["error"]["details"]["fields"]


@pytest.mark.parametrize(("path", "field", "item"), [
    ("/agents", "roles", 1),  # not a string: the text check's per-item errors
    ("/agents", "roles", "zz"),  # a string, not a choice: DRF's per-item errors
    ("policies", "blocked_sellers", 1),  # a list bounded (500) only once every item was checked
    ("policies", "allowed_tokens", "XYZ"),
], ids=["roles-number", "roles-unknown", "blocked-sellers-number", "tokens-unknown"])
def test_a_long_list_of_wrong_items_is_refused_naming_a_few_not_each(db, path, field, item):
    """A list of 200,000 wrong items (600 kB of `[1, 1, ...]`) in a field taking a list was answered naming each
    item's error: a 12.9 MB answer, built and rendered for 11-13 s of a web thread's CPU. A list longer than its
    field's bound is refused before its items are read; the errors of at most LIST_ITEM_ERRORS_NAMED items are
    named."""
    from marketplace.serializers import LIST_ITEM_ERRORS_NAMED

    buyer = AgentFactory(is_buyer=True)
    api = Api(issue_owner_token(buyer.owner))
    data = {field: [item] * 200_000}
    if path == "/agents":
        data.update(handle="many-items", display_name="x", wallet_address="0x" + "1" * 40)
        method = "POST"
    else:
        path, method = f"/agents/{buyer.pk}/policies", "PUT"
    response = api.client.generic(method, path, json.dumps(data).encode(), content_type="application/json")
    assert response.status_code == 400, response.content[:300]
    assert len(response.content) < 8192, response.content[:300]
    errors = response.json()["error"]["details"]["fields"][field]
    assert isinstance(errors, list) or len(errors) <= LIST_ITEM_ERRORS_NAMED
