"""Request bodies: when there is one, it is a JSON object, for every endpoint (not coerced to "no fields")."""

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

