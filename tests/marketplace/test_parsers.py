"""Request bodies: when there is one, it is a JSON object, for every endpoint (not coerced to "no fields")."""

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
