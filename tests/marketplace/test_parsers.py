"""Request bodies: when there is one, it is a JSON object, for every endpoint (not coerced to "no fields")."""

import gzip
import json
import time

import pytest

from agreements.models import AgreementStatus, UsageAgreement
from policies.models import ApprovalRequest, ApprovalStatus
from tests.agreements.helpers import propose
from tests.catalog.factories import register_service
from tests.conftest import error_code

pytestmark = pytest.mark.django_db

NOT_OBJECTS = ["false", "[]", '"cancel"', "0", "null"]


@pytest.mark.parametrize("body", NOT_OBJECTS)
def test_an_action_body_must_be_an_object(buyer_api, seller, body):
    agreement = propose(buyer_api, register_service(seller))

    response = buyer_api.client.post(f"/usage-agreements/{agreement['id']}/cancel", data=body, content_type="application/json")

    assert response.status_code == 400, response.content
    assert error_code(response) == "body_not_object"
    assert UsageAgreement.objects.get(pk=agreement["id"]).status == AgreementStatus.PROPOSED
    # No body at all is still "no fields".
    assert buyer_api.post(f"/usage-agreements/{agreement['id']}/cancel").status_code == 200


@pytest.mark.parametrize("body", NOT_OBJECTS)
def test_an_approval_body_must_be_an_object(owner_api, buyer, buyer_api, seller, body):
    owner_api.put(f"/agents/{buyer.pk}/policies", {"approval_threshold_atomic": 1})
    propose(buyer_api, register_service(seller))
    approval = ApprovalRequest.objects.get()
    url = f"/agents/{buyer.pk}/approvals/{approval.pk}/approve"

    response = owner_api.client.post(url, data=body, content_type="application/json")

    assert response.status_code == 400, response.content
    assert error_code(response) == "body_not_object"
    assert ApprovalRequest.objects.get().status == ApprovalStatus.PENDING


NO_TEXT_CHARSETS = ["punycode", "bz2", "rot13", "idna", "undefined"]


def login_form(**fields: bytes) -> bytes:
    parts = [b'--XyZ\r\nContent-Disposition: form-data; name="%s"\r\n\r\n%s\r\n' % (name.encode(), value)
             for name, value in fields.items()]
    return b"".join(parts) + b"--XyZ--\r\n"


@pytest.mark.parametrize("charset", NO_TEXT_CHARSETS)
def test_a_form_in_a_charset_that_is_no_text_coding_is_read_as_utf8_at_once(client, charset):
    """Django reads a form in the charset its Content-Type names, whatever Python codec has that name: a multipart
    login form (anyone may post one) whose fields are punycode decoded in quadratic time (400 kB held a web thread
    8.5 s, 2.5 MB for many minutes) and bz2's or rot13's codec raised LookupError (500). Read as UTF-8 instead."""
    started = time.monotonic()
    form = login_form(username=b"bob", password=b"x", pad=b"-" + b"a" * 300_000)
    response = client.generic("POST", "/admin/login/", data=form,  # sent as it is: .post encodes it in the charset
                              content_type=f"multipart/form-data; boundary=XyZ; charset={charset}")
    assert response.status_code == 200  # the login form again: no such user
    assert time.monotonic() - started < 3



# A body read by DRF's parser, and one read by a view on its hot path (`plain_json_post`: a search; a plain usage
# report hands what it cannot read to DRF's). Each holds a letter beyond ASCII.
BODY_PATHS = {"drf": ("/agents/services", {"name": "café"}), "plain": ("/catalog/search", {"q": "café"})}


def post_body(api, path: str, body: bytes, content_type: str = "application/json", **headers):
    return api.client.generic("POST", BODY_PATHS[path][0], body, content_type=content_type,
                              HTTP_IDEMPOTENCY_KEY="k-1", **headers)


def utf8(path: str) -> bytes:
    return json.dumps(BODY_PATHS[path][1], ensure_ascii=False).encode()


@pytest.mark.parametrize("path", BODY_PATHS)
@pytest.mark.parametrize("coding", ["gzip", "br", "deflate, gzip"])
def test_a_compressed_body_is_415_naming_its_content_encoding(seller_api, path, coding):
    """A body the client compressed was answered 400 malformed_json, which tells the client its JSON is wrong: it is
    the Content-Encoding that is not read."""
    response = post_body(seller_api, path, gzip.compress(utf8(path)), HTTP_CONTENT_ENCODING=coding)
    assert (response.status_code, error_code(response)) == (415, "unsupported_content_encoding"), response.content
    assert response.json()["error"]["details"] == {"content_encoding": coding}


@pytest.mark.parametrize("path", BODY_PATHS)
def test_a_plain_body_is_read_whatever_content_encoding_it_names(seller_api, path):
    """Only a body that is not JSON as it came is refused for its Content-Encoding: `identity`, or a client naming
    its charset there, are answered as before."""
    plain = post_body(seller_api, path, utf8(path))
    for coding in ("identity", "utf-8"):
        named = post_body(seller_api, path, utf8(path), HTTP_CONTENT_ENCODING=coding)
        assert (named.status_code, named.json().get("error", {}).get("code")) == (
            plain.status_code, plain.json().get("error", {}).get("code"))
    assert plain.status_code != 415


@pytest.mark.parametrize("path", BODY_PATHS)
@pytest.mark.parametrize(("encoding", "declared", "named"), [
    ("utf-16", "utf-16", "utf-16"), ("utf-16-le", "", "utf-16-le"), ("utf-16-be", "", "utf-16-be"),
    ("utf-16", "", "utf-16"), ("utf-32", "", "utf-32"), ("latin-1", "ISO-8859-1", "ISO-8859-1")])
def test_a_body_in_another_charset_than_utf8_is_415_naming_it(seller_api, path, encoding, declared, named):
    """JSON is UTF-8 (RFC 8259); a body in UTF-16, declared or not, or in Latin-1, was 400 malformed_json."""
    content_type = f"application/json; charset={declared}" if declared else "application/json"
    body = json.dumps(BODY_PATHS[path][1], ensure_ascii=False).encode(encoding)
    response = post_body(seller_api, path, body, content_type)
    assert (response.status_code, error_code(response)) == (415, "unsupported_charset"), response.content
    assert response.json()["error"]["details"] == {"charset": named}


@pytest.mark.parametrize("path", BODY_PATHS)
def test_a_body_that_reads_as_utf8_is_read_whatever_charset_it_names(seller_api, path):
    """As before: a body that is UTF-8 is read, its declared charset aside (an ASCII body declared Latin-1)."""
    body = json.dumps(BODY_PATHS[path][1]).encode()  # ASCII: \u escapes
    plain = post_body(seller_api, path, body)
    assert plain.status_code != 415
    for charset in ("utf-8", "UTF8", "iso-8859-1"):
        declared = post_body(seller_api, path, body, f"application/json; charset={charset}")
        assert declared.status_code == plain.status_code, declared.content
