"""The operators' dashboard in the admin: live counts per status and recent failures."""

import pytest
from django.contrib.auth import get_user_model
from django.contrib.auth.models import Permission
from django.test import Client
from django.utils import timezone

from agreements.models import DeliveryStatus, WebhookDelivery, WebhookSubscription
from escrow.models import ChainTransaction, TxPurpose, TxStatus
from tests.agreements.helpers import propose
from tests.catalog.factories import register_service
from tests.support.operators import operator_client

pytestmark = pytest.mark.django_db


def test_the_admin_index_links_the_dashboard(operator):
    page = operator.get("/admin/")
    assert page.status_code == 200
    assert b'href="/admin/dashboard/"' in page.content


def test_the_dashboard_is_for_staff_only(owner):
    assert Client().get("/admin/dashboard/").status_code == 302  # to the admin login
    client = Client()
    client.force_login(owner)
    assert client.get("/admin/dashboard/").status_code == 302


@pytest.mark.parametrize("granted", [False, True], ids=["staff_alone", "with_the_permission"])
def test_the_dashboard_needs_its_permission(settings, granted):
    """It opened for any staff account, whatever it may view elsewhere: its failures list the status reasons and
    delivery errors of every agent's agreements and webhooks. A staff account needs `marketplace.view_dashboard`."""
    settings.PASSWORD_HASHERS = ["django.contrib.auth.hashers.MD5PasswordHasher"]
    staff = get_user_model().objects.create_user("clerk", "clerk@example.com", "clerk-password", is_staff=True)
    if granted:
        staff.user_permissions.add(Permission.objects.get(content_type__app_label="marketplace",
                                                          codename="view_dashboard"))
    page = operator_client("clerk", "clerk-password").get("/admin/dashboard/")
    assert page.status_code == (200 if granted else 403)
    index = operator_client("clerk", "clerk-password").get("/admin/")
    assert (b'href="/admin/dashboard/"' in index.content) == granted


def test_the_dashboard_counts_by_status_and_lists_recent_failures(operator, owner_api, buyer, buyer_api, seller):
    service = register_service(seller)
    owner_api.put(f"/agents/{buyer.pk}/policies", {"approval_threshold_atomic": 250_000})
    first = propose(buyer_api, service, quantity=1)
    propose(buyer_api, service, quantity=1)
    propose(buyer_api, service, quantity=100)  # pending approval
    failed_tx = ChainTransaction.objects.create(
        purpose=TxPurpose.ACTIVATE, agreement_id=first["id"], to_address="0x" + "11" * 20, data="0x", chain_id=31337,
        status=TxStatus.FAILED, failure_reason="execution reverted: InvalidSignature")
    subscription = WebhookSubscription.objects.create(agent=seller, url="https://hooks.example.com/x", secret="s")
    WebhookDelivery.objects.create(subscription=subscription, event_type="agreement.proposed", payload={},
                                   status=DeliveryStatus.FAILED, last_error="HTTP 500",
                                   next_attempt_at=timezone.now())

    page = operator.get("/admin/dashboard/")
    assert page.status_code == 200
    tables = {table["title"]: dict(table["rows"]) for table in page.context["tables"]}
    assert tables["Agreements by status"] == {"proposed": 2, "pending_approval": 1}
    assert tables["Approval requests by status"] == {"pending": 1}
    assert tables["Chain transactions by status"] == {"failed": 1}
    html = page.content.decode()
    assert "execution reverted: InvalidSignature" in html
    assert f"/admin/escrow/chaintransaction/{failed_tx.pk}/change/" in html
    assert "webhook delivery failed" in html and "HTTP 500" in html
