"""Credentials written into a URL a user registers (`https://user:password@host/`): refused when saved, never sent
by any of the marketplace's clients, never shown to anyone but the URL's owner."""

import json

import pytest
from django.contrib.auth import get_user_model
from django.contrib.auth.models import Permission
from django.utils import timezone

from agreements.models import WebhookDelivery, WebhookSubscription
from catalog.models import Service
from marketplace import masumi_agentic_client, outbound_slots
from tests.agreements.helpers import proposal
from tests.catalog.factories import register_service, service_data
from tests.catalog.test_registry import assets, register, registration
from tests.conftest import error_code

pytestmark = pytest.mark.django_db

WITH_CREDENTIALS = "https://seller:hunter2@translator.example.com/api"


def test_an_upstream_or_webhook_url_with_credentials_is_refused_with_400_credentials_in_url(seller, seller_api):
    service = seller_api.post("/agents/services", service_data(upstream_base_url=WITH_CREDENTIALS))
    assert service.status_code == 400, service.content
    assert error_code(service) == "credentials_in_url"
    listed = seller_api.post("/agents/services", service_data()).json()
    update = seller_api.patch(f"/agents/services/{listed['id']}", {"upstream_base_url": WITH_CREDENTIALS})
    assert update.status_code == 400 and error_code(update) == "credentials_in_url", update.content
    masumi = seller_api.post("/registry", registration(seller, apiBaseUrl="https://agent:hunter2@api.example.com"))
    assert masumi.status_code == 400 and error_code(masumi) == "credentials_in_url", masumi.content
    for url in ("https://hooks:hunter2@hooks.example.com/x", "https://token@hooks.example.com/x"):
        webhook = seller_api.post("/webhooks", {"url": url})
        assert webhook.status_code == 400 and error_code(webhook) == "credentials_in_url", webhook.content
    assert not WebhookSubscription.objects.exists()
    assert "hunter2" not in Service.objects.get().upstream_base_url


def test_an_operator_cannot_write_credentials_into_a_webhook_url(operator, seller, seller_api):
    webhook = seller_api.post("/webhooks", {"url": "https://hooks.example.com/x"}).json()
    page = f"/admin/agreements/webhooksubscription/{webhook['id']}/change/"
    response = operator.post(page, {"event_types": "[]", "is_active": "on", "deliveries-TOTAL_FORMS": 0,
                                    "deliveries-INITIAL_FORMS": 0, "agent": seller.pk,
                                    "url": "https://hooks:hunter2@hooks.example.com/x"})
    assert response.status_code == 200  # the form again, with the error
    assert "credentials_in_url" in response.content.decode()
    assert WebhookSubscription.objects.get(pk=webhook["id"]).url == "https://hooks.example.com/x"


def _with_credentials(url: str) -> str:
    scheme, rest = url.split("//", 1)
    return f"{scheme}//seller:hunter2@{rest}"


def test_a_stored_webhook_url_with_credentials_is_called_without_them(buyer_api, seller, seller_api, http_server,
                                                                      django_capture_on_commit_callbacks):
    # Saved before registration refused them: the proxy (http.client) sent none, the httpx clients Basic.
    webhook = seller_api.post("/webhooks", {"url": f"{http_server.url}/hooks"}).json()
    WebhookSubscription.objects.filter(pk=webhook["id"]).update(url=_with_credentials(f"{http_server.url}/hooks"))
    with django_capture_on_commit_callbacks(execute=True):
        buyer_api.post("/usage-agreements", proposal(register_service(seller)))
    [request] = http_server.requests
    assert "Authorization" not in request.headers, request.headers["Authorization"]
    assert WebhookDelivery.objects.get().status == "delivered"


def test_a_stored_masumi_url_with_credentials_is_called_without_them(http_server):
    http_server.responses.append((200, json.dumps({"status": "available"}).encode(), 0,
                                  {"Content-Type": "application/json"}))
    answer = masumi_agentic_client.availability(base_url=_with_credentials(http_server.url))
    assert answer.available, answer
    [request] = http_server.requests
    assert "Authorization" not in request.headers, request.headers["Authorization"]


@pytest.fixture
def stored_with_credentials(seller, seller_api):
    """A webhook subscription and a masumi service whose URLs were saved with credentials (before they were
    refused)."""
    webhook = seller_api.post("/webhooks", {"url": "https://hooks.example.com/x"}).json()
    WebhookSubscription.objects.filter(pk=webhook["id"]).update(url="https://hooks:hunter2@hooks.example.com/x")
    register(seller_api, seller)
    service = Service.objects.get()
    Service.objects.filter(pk=service.pk).update(upstream_base_url="https://agent:hunter2@api.example.com")
    return webhook, service


def test_the_admin_never_shows_the_credentials_in_a_stored_url(operator, stored_with_credentials):
    webhook, service = stored_with_credentials
    delivery = WebhookDelivery.objects.create(subscription_id=webhook["id"], event_type="agreement.proposed",
                                              payload={}, status="failed", last_error="HTTP 500",
                                              next_attempt_at=timezone.now())
    pages = ["/admin/agreements/webhooksubscription/", "/admin/agreements/webhooksubscription/?q=hooks",
             f"/admin/agreements/webhooksubscription/{webhook['id']}/change/",
             f"/admin/agreements/webhookdelivery/{delivery.pk}/change/", "/admin/dashboard/",
             f"/admin/catalog/service/{service.pk}/change/"]
    for page in pages:
        response = operator.get(page)
        assert response.status_code == 200, page
        content = response.content.decode()
        assert "hunter2" not in content, page
        assert "hooks.example.com" in content or "api.example.com" in content, page


def test_staff_cannot_recover_stored_credentials_by_searching_or_filtering_the_admin_lists(
        settings, stored_with_credentials):
    """The pages mask a stored URL's userinfo, but the lists searched and filtered on the whole URL: whether a row
    was still listed for `?q=hooks:h`, `?q=hooks:hu`, … (or `?url__startswith=`, `?upstream_base_url__contains=`)
    told staff with view permission only the password a character at a time. A URL is searched by its host (the part
    after any userinfo) and filtered on by nothing."""
    from tests.marketplace.test_admin_operator_writes import staff_client

    webhook, _ = stored_with_credentials
    WebhookDelivery.objects.create(subscription_id=webhook["id"], event_type="agreement.proposed", payload={},
                                   status="failed", last_error="HTTP 500", next_attempt_at=timezone.now())
    staff = staff_client(settings, "view_webhooksubscription", "view_webhookdelivery", "view_service")

    def listed(page: str, query: dict) -> int | None:
        response = staff.get(page, query)
        return response.context["cl"].result_count if response.status_code == 200 else None

    for page in ("/admin/agreements/webhooksubscription/", "/admin/agreements/webhookdelivery/"):
        assert listed(page, {"q": "hooks.example"}) == 1, page  # by its host, as operators look one up
        for guess in ("hunter2", "hooks:h", "hunter2@hooks.example.com", "hooks:hunter2@hooks"):
            assert listed(page, {"q": guess}) == 0, (page, guess)
    assert listed("/admin/agreements/webhooksubscription/", {"url__startswith": "https://hooks:h"}) is None
    assert listed("/admin/catalog/service/", {"upstream_base_url__contains": "hunter2"}) is None


def test_an_operator_saving_a_webhook_with_stored_credentials_keeps_its_address_without_them(
        operator, seller, stored_with_credentials):
    webhook, _ = stored_with_credentials
    page = f"/admin/agreements/webhooksubscription/{webhook['id']}/change/"
    form = {"event_types": "[]", "deliveries-TOTAL_FORMS": 0, "deliveries-INITIAL_FORMS": 0, "agent": seller.pk,
            "url": "https://hooks.example.com/x"}  # the form as shown, is_active unticked
    assert operator.post(page, form).status_code == 302
    subscription = WebhookSubscription.objects.get(pk=webhook["id"])
    assert (subscription.url, subscription.is_active) == ("https://hooks.example.com/x", False)


def test_other_agents_are_never_shown_the_credentials_in_a_masumi_services_url(buyer_api, stored_with_credentials):
    _, service = stored_with_credentials
    [listed] = assets(buyer_api)
    assert listed["apiBaseUrl"] == "https://api.example.com"
    information = buyer_api.get("/payment-information", {"agentIdentifier": str(service.pk)})
    assert information.status_code == 200, information.content
    assert information.json()["data"]["apiBaseUrl"] == "https://api.example.com"


@pytest.mark.parametrize(("one", "other"), [("https://straße.example/api", "https://xn--strae-oqa.example/api"),
                                            ("https://bücher.example/api", "https://XN--BCHER-KVA.example/api")])
def test_two_spellings_of_one_host_share_its_slots(settings, one, other):
    # The calls go to the IDNA 2008 name (outbound.dns_name); the share was urlsplit's hostname, another per spelling.
    settings.SELLER_CALLS_IN_FLIGHT_PER_HOST = 1
    with outbound_slots.held(outbound_slots.seller_shares(base_url=one, owner_id=1), lease_seconds=30) as first:
        assert first
        with outbound_slots.held(outbound_slots.seller_shares(base_url=other, owner_id=2), lease_seconds=30) as second:
            assert not second


def test_staff_who_may_only_view_a_webhook_subscription_see_its_host_not_its_path(settings, seller, seller_api):
    """A Slack- or Discord-style webhook's path is its credential (https://hooks.slack.com/services/T…/B…/secret):
    anyone who reads it posts into the channel. Staff with view permission read it in full on the subscriptions'
    list, the subscription's page, its deliveries' pages and the dashboard's failures. They see its host and a masked
    path; staff who may change the subscription see the address on its form."""
    from tests.marketplace.test_admin_operator_writes import staff_client

    webhook = seller_api.post("/webhooks", {"url": "https://hooks.example.com/x"}).json()
    WebhookSubscription.objects.filter(pk=webhook["id"]).update(
        url="https://hooks.example.com/services/T0001/B0002/slacksecret?token=querysecret")
    delivery = WebhookDelivery.objects.create(subscription_id=webhook["id"], event_type="agreement.proposed",
                                              payload={}, status="failed", last_error="HTTP 500",
                                              next_attempt_at=timezone.now())
    staff = staff_client(settings, "view_webhooksubscription", "view_webhookdelivery", "view_dashboard")
    change_page = f"/admin/agreements/webhooksubscription/{webhook['id']}/change/"

    for page in ["/admin/agreements/webhooksubscription/", change_page, "/admin/agreements/webhookdelivery/",
                 f"/admin/agreements/webhookdelivery/{delivery.pk}/change/", "/admin/dashboard/"]:
        response = staff.get(page)
        assert response.status_code == 200, page
        content = response.content.decode()
        assert "slacksecret" not in content and "querysecret" not in content and "T0001" not in content, page
    assert "https://hooks.example.com/***" in staff.get(change_page).content.decode()
    get_user_model().objects.get(username="staff").user_permissions.add(
        Permission.objects.get(codename="change_webhooksubscription"))
    assert "slacksecret" in staff.get(change_page).content.decode()


def test_staff_who_may_only_view_a_service_see_its_upstreams_host_not_its_path(settings, seller, seller_api):
    """A seller's upstream URL may carry a token in its path or query, as a webhook's does: staff with view
    permission read it in full on the service's page. They see its host and a masked path; staff who may change
    services read it whole."""
    from tests.marketplace.test_admin_operator_writes import staff_client

    service = register_service(seller)
    Service.objects.filter(pk=service.pk).update(
        upstream_base_url="https://api.example.com/tok_pathsecret/v1?key=querysecret")
    staff = staff_client(settings, "view_service")
    page = f"/admin/catalog/service/{service.pk}/change/"

    content = staff.get(page).content.decode()
    assert "pathsecret" not in content and "querysecret" not in content
    assert "https://api.example.com/***" in content
    get_user_model().objects.get(username="staff").user_permissions.add(
        Permission.objects.get(codename="change_service"))
    assert "tok_pathsecret" in staff.get(page).content.decode()


def test_the_admin_history_written_before_webhook_paths_were_masked_shows_them_masked(settings, seller, seller_api):
    """The admin's history entries keep the name of the row they are about (`object_repr`), as its `__str__` read
    then: a subscription's or a delivery's entries written before its address was masked (a redelivery, a save) hold
    its whole URL, its path a Slack-style webhook's credential, and the admin's "Recent actions" showed it to staff
    who may no longer read it. Those entries are masked (migration), as new ones are written."""
    import importlib

    from django.apps import apps
    from django.contrib.admin.models import CHANGE, LogEntry
    from django.contrib.contenttypes.models import ContentType

    from tests.marketplace.test_admin_operator_writes import staff_client

    url = "https://user:pass@hooks.example.com/services/T0001/B0002/slacksecret?token=querysecret"
    webhook = seller_api.post("/webhooks", {"url": "https://hooks.example.com/x"}).json()
    WebhookSubscription.objects.filter(pk=webhook["id"]).update(url=url)
    delivery = WebhookDelivery.objects.create(subscription_id=webhook["id"], event_type="agreement.proposed",
                                              payload={}, status="failed", next_attempt_at=timezone.now())
    staff = staff_client(settings, "view_webhooksubscription", "view_webhookdelivery", "change_webhookdelivery")
    account = get_user_model().objects.get(username="staff")
    for row, written_then in ((delivery, f"agreement.proposed → {url} (failed)"),
                              (WebhookSubscription.objects.get(pk=webhook["id"]), f"{seller.handle} → {url}")):
        LogEntry.objects.create(user=account, content_type=ContentType.objects.get_for_model(row),
                                object_id=str(row.pk), object_repr=written_then, action_flag=CHANGE,
                                change_message="Redelivered")
    # A delivery kept no longer: its history entry stays, naming the URL.
    LogEntry.objects.create(user=account, content_type=ContentType.objects.get_for_model(WebhookDelivery),
                            object_id="999999", object_repr=f"agreement.settled → {url} (delivered)",
                            action_flag=CHANGE, change_message="Redelivered")

    importlib.import_module("agreements.migrations.0032_admin_history_webhook_urls_masked").history_masked(apps, None)

    content = staff.get("/admin/").content.decode()
    assert "https://***@hooks.example.com/***" in content
    assert "slacksecret" not in content and "querysecret" not in content and "T0001" not in content
    assert not LogEntry.objects.filter(object_repr__contains="slacksecret").exists()


def test_an_operators_save_of_a_webhook_writes_its_admin_history_with_the_path_masked(operator, seller, seller_api):
    """New history entries name the subscription as its `__str__` does: its host and `/***`, never the path."""
    from django.contrib.admin.models import LogEntry

    webhook = seller_api.post("/webhooks", {"url": "https://hooks.example.com/x"}).json()
    page = f"/admin/agreements/webhooksubscription/{webhook['id']}/change/"
    form = {"event_types": "[]", "deliveries-TOTAL_FORMS": 0, "deliveries-INITIAL_FORMS": 0, "agent": seller.pk,
            "is_active": "on", "url": "https://hooks.example.com/services/T0001/B0002/slacksecret"}

    assert operator.post(page, form).status_code == 302
    [entry] = LogEntry.objects.filter(object_id=webhook["id"])
    assert entry.object_repr == f"{seller.handle} → https://hooks.example.com/***"
    assert "slacksecret" not in entry.change_message
