"""Rotating a service's proxy secret and a webhook subscription's secret with an overlap (marketplace.rotation):
through the API the owner calls, checked on real proxied calls and real webhook deliveries with the SDK's
verifiers, as a receiver holding the old secret, the new one, or a verifier of the first signature only would."""

import hashlib
import hmac
import time
from datetime import datetime, timedelta
from uuid import UUID

import pytest
from django.utils import timezone

from agreements.models import WebhookSubscription
from agreements.tasks import erase_replaced_webhook_secrets
from catalog.models import Service
from catalog.tasks import erase_replaced_proxy_secrets
from sdk import proxy_signature, webhook_signature
from tests.catalog.factories import AgentFactory, issue_key, issue_owner_token, register_service
from tests.conftest import Api, codes_at, error_code
from tests.support.idempotency import records_hold

pytestmark = pytest.mark.django_db

OVERLAP = {"previous_secret_valid_for_seconds": 600}


# --- webhooks ----------------------------------------------------------------------------------------------------

def subscribe(seller, seller_api, url: str) -> dict:
    response = seller_api.post(f"/agents/{seller.pk}/webhooks", {"url": url})
    assert response.status_code == 201, response.content
    return response.json()


def rotate_webhook(seller, api, subscription: dict, body: dict | None = None, **headers):
    return api.post(f"/agents/{seller.pk}/webhooks/{subscription['id']}/rotate", body, headers=headers or None)


def delivered(seller, seller_api, http_server, capture):
    """A `webhook.test` event sent to the subscription: (body, Marketplace-Signature) as the receiver got them."""
    before = len(http_server.requests)
    with capture(execute=True):
        assert seller_api.post(f"/agents/{seller.pk}/webhooks/test").status_code == 202
    [request] = http_server.requests[before:]
    return request.body, request.headers["Marketplace-Signature"]


def first_v1_verifies(secret: str, body: bytes, header: str) -> bool:
    """A verifier that reads the first `v1` only, as the Pægents SDK's `verify_webhook_signature` does."""
    parts = [part.strip() for part in header.split(",")]
    timestamp = next(p for p in parts if p.startswith("t="))[2:]
    first = next(p for p in parts if p.startswith("v1="))[3:]
    return hmac.compare_digest(
        hmac.new(secret.encode(), f"{timestamp}.".encode() + body, hashlib.sha256).hexdigest(), first)


def overlap_ended(model, **filters):
    """As if the overlap's time had passed (the rule compares the expiry with the clock)."""
    field = "previous_proxy_secret_expires_at" if model is Service else "previous_secret_expires_at"
    model.objects.filter(**filters).update(**{field: timezone.now() - timedelta(seconds=1)})


def test_a_webhook_rotation_signs_deliveries_with_both_secrets_until_the_overlap_ends(
        seller, seller_api, http_server, django_capture_on_commit_callbacks):
    subscription = subscribe(seller, seller_api, f"{http_server.url}/hooks")
    old = subscription["secret"]
    rotated = rotate_webhook(seller, seller_api, subscription, OVERLAP)
    assert rotated.status_code == 200, rotated.content
    new = rotated.json()["secret"]
    assert new.startswith("whsec_") and new != old
    ends = datetime.fromisoformat(rotated.json()["previous_secret_expires_at"])
    assert abs((ends - timezone.now()).total_seconds() - 600) < 30
    assert seller_api.get(f"/agents/{seller.pk}/webhooks").json()[0]["previous_secret_expires_at"] is not None

    body, header = delivered(seller, seller_api, http_server, django_capture_on_commit_callbacks)
    assert header.count("v1=") == 2
    assert webhook_signature.verify(old, body, header)  # a receiver that has not switched yet
    assert webhook_signature.verify(new, body, header)  # one that has
    assert first_v1_verifies(new, body, header)  # a verifier of the first signature, holding the new secret

    overlap_ended(WebhookSubscription, pk=subscription["id"])
    body, header = delivered(seller, seller_api, http_server, django_capture_on_commit_callbacks)
    assert header.count("v1=") == 1
    assert webhook_signature.verify(new, body, header) and first_v1_verifies(new, body, header)
    assert not webhook_signature.verify(old, body, header)
    assert seller_api.get(f"/agents/{seller.pk}/webhooks").json()[0]["previous_secret_expires_at"] is None


def test_a_webhook_rotation_with_no_overlap_stops_the_old_secret_at_once(
        seller, seller_api, http_server, django_capture_on_commit_callbacks):
    subscription = subscribe(seller, seller_api, f"{http_server.url}/hooks")
    rotated = rotate_webhook(seller, seller_api, subscription, {"previous_secret_valid_for_seconds": 0}).json()
    assert rotated["previous_secret_expires_at"] is None
    body, header = delivered(seller, seller_api, http_server, django_capture_on_commit_callbacks)
    assert webhook_signature.verify(rotated["secret"], body, header)
    assert not webhook_signature.verify(subscription["secret"], body, header)


def test_a_rotation_within_the_overlap_replaces_the_previous_secret_with_the_one_it_retires(
        seller, seller_api, http_server, django_capture_on_commit_callbacks):
    subscription = subscribe(seller, seller_api, f"{http_server.url}/hooks")
    first = rotate_webhook(seller, seller_api, subscription, OVERLAP).json()["secret"]
    second = rotate_webhook(seller, seller_api, subscription, OVERLAP).json()["secret"]
    body, header = delivered(seller, seller_api, http_server, django_capture_on_commit_callbacks)
    assert header.count("v1=") == 2
    assert webhook_signature.verify(second, body, header) and webhook_signature.verify(first, body, header)
    assert not webhook_signature.verify(subscription["secret"], body, header)  # two rotations back: gone


def test_a_webhook_rotation_without_a_body_keeps_the_old_secret_an_hour(seller, seller_api, owner, http_server):
    """As the Pægents SDK's `rotate_webhook_secret` calls it; the agent's owner may rotate too."""
    seller.owner = owner
    seller.save(update_fields=["owner"])
    subscription = subscribe(seller, seller_api, f"{http_server.url}/hooks")
    rotated = rotate_webhook(seller, Api(issue_owner_token(owner)), subscription)
    assert rotated.status_code == 200, rotated.content
    ends = datetime.fromisoformat(rotated.json()["previous_secret_expires_at"])
    assert abs((ends - timezone.now()).total_seconds() - 3600) < 30


def test_a_replayed_webhook_rotation_answers_the_new_secret_no_record_keeps_until_the_next_rotation(
        seller, seller_api, http_server):
    subscription = subscribe(seller, seller_api, f"{http_server.url}/hooks")
    first = rotate_webhook(seller, seller_api, subscription, OVERLAP, **{"Idempotency-Key": "rotate-1"})
    replay = rotate_webhook(seller, seller_api, subscription, OVERLAP, **{"Idempotency-Key": "rotate-1"})
    assert first.status_code == replay.status_code == 200
    assert replay["Idempotent-Replayed"] == "true"
    new = first.json()["secret"]
    assert replay.json() == first.json()  # read from the subscription, not from the record
    stored = WebhookSubscription.objects.get(pk=subscription["id"])
    assert (stored.secret, stored.previous_secret) == (new, subscription["secret"])  # rotated once
    assert not records_hold(new) and not records_hold(subscription["secret"])

    rotate_webhook(seller, seller_api, subscription, OVERLAP, **{"Idempotency-Key": "rotate-2"})
    again = rotate_webhook(seller, seller_api, subscription, OVERLAP, **{"Idempotency-Key": "rotate-1"})
    assert again.json() == {**first.json(), "secret": None} and again["Idempotent-Secret-Withheld"] == "replaced"


def test_a_replaced_webhook_secret_is_erased_once_its_overlap_ends(seller, seller_api, http_server):
    """It signs nothing after its overlap, so the beat task erases it: a database read no longer gives it."""
    ended, running = (subscribe(seller, seller_api, f"{http_server.url}/hooks") for _ in range(2))
    for subscription in (ended, running):
        assert rotate_webhook(seller, seller_api, subscription, OVERLAP).status_code == 200
    assert erase_replaced_webhook_secrets() == 0  # both overlaps run: both replaced secrets still sign

    overlap_ended(WebhookSubscription, pk=ended["id"])
    assert erase_replaced_webhook_secrets() == 1
    assert erase_replaced_webhook_secrets() == 0  # idempotent
    replaced = dict(WebhookSubscription.objects.values_list("pk", "previous_secret"))
    assert replaced == {UUID(ended["id"]): "", UUID(running["id"]): running["secret"]}
    assert WebhookSubscription.objects.get(pk=ended["id"]).previous_secret_expires_at is None
    listed = seller_api.get(f"/agents/{seller.pk}/webhooks").json()
    shown = {row["id"]: row["previous_secret_expires_at"] for row in listed}
    assert shown[ended["id"]] is None and shown[running["id"]] is not None


@pytest.mark.parametrize(("body", "code"), [
    ({"previous_secret_valid_for_seconds": -1}, "min_value"),
    ({"previous_secret_valid_for_seconds": 86_401}, "max_value"),
    ({"previous_secret_valid_for_seconds": "3600"}, "invalid"),
    ({"previous_secret_valid_for_seconds": 60.5}, "invalid"),
    ({"previous_secret_valid_for_seconds": True}, "invalid"),
    ({"previous_secret_valid_for_seconds": None}, "null"),
    ({"previous_secret_valid_for": 60}, "unknown_field"),
])
def test_a_webhook_rotation_with_a_bad_overlap_is_400_and_rotates_nothing(seller, seller_api, http_server, body,
                                                                          code):
    subscription = subscribe(seller, seller_api, f"{http_server.url}/hooks")
    response = rotate_webhook(seller, seller_api, subscription, body)
    assert code in codes_at(response, next(iter(body)))
    assert WebhookSubscription.objects.get(pk=subscription["id"]).secret == subscription["secret"]


def test_only_the_subscriptions_agent_or_owner_rotates_its_secret(seller, seller_api, http_server):
    subscription = subscribe(seller, seller_api, f"{http_server.url}/hooks")
    other = AgentFactory()
    other_api = Api(issue_key(other, scope="admin"))
    as_itself = other_api.post(f"/agents/{other.pk}/webhooks/{subscription['id']}/rotate", OVERLAP)
    assert as_itself.status_code == 404 and error_code(as_itself) == "webhook_not_found"
    as_the_seller = rotate_webhook(seller, other_api, subscription, OVERLAP)
    assert as_the_seller.status_code == 404 and error_code(as_the_seller) == "agent_not_found"
    as_its_owner = rotate_webhook(seller, Api(issue_owner_token(other.owner)), subscription, OVERLAP)
    assert as_its_owner.status_code == 404
    not_admin = rotate_webhook(seller, Api(issue_key(seller, scope="pay")), subscription, OVERLAP)
    assert not_admin.status_code == 403 and error_code(not_admin) == "insufficient_scope"
    assert WebhookSubscription.objects.get(pk=subscription["id"]).secret == subscription["secret"]



def test_a_subscription_deleted_while_its_rotation_runs_gets_no_new_secret(seller, seller_api, http_server,
                                                                          deleted_once_read):
    """A DELETE committed between the rotation's read of the live subscription and its write: the rotation gave the
    deleted row (its secrets erased, signing nothing) a new secret, kept in the database and shown to the caller."""
    subscription = subscribe(seller, seller_api, f"{http_server.url}/hooks")
    deleted_once_read()
    response = rotate_webhook(seller, seller_api, subscription, OVERLAP)
    assert response.status_code == 404 and error_code(response) == "webhook_not_found", response.content
    row = WebhookSubscription.objects.get(pk=subscription["id"])
    assert (row.is_active, row.secret, row.previous_secret) == (False, "", "")

# --- proxy secrets -----------------------------------------------------------------------------------------------

def rotate_proxy_secret(api, service_id, body: dict | None = None, **headers):
    return api.post(f"/agents/services/{service_id}/proxy-secret/rotate", body, headers=headers or None)


def proxied(active, http_server):
    """The headers of a call as the seller's upstream received them."""
    before = len(http_server.requests)
    response = active.buyer_api.get(f"{active.proxy}/translate")
    assert response.status_code == 200, response.content
    [request] = http_server.requests[before:]
    return request.headers


def verifies(secret: str, headers: dict) -> bool:
    return proxy_signature.verify(secret, headers, method="GET", path="/translate")


@pytest.mark.chain
def test_a_proxy_secret_rotation_signs_calls_with_both_secrets_until_the_overlap_ends(active, http_server,
                                                                                     settings):
    old = active.service.proxy_secret
    rotated = rotate_proxy_secret(active.seller_api, active.service.pk, OVERLAP)
    assert rotated.status_code == 200, rotated.content
    new = rotated.json()["proxy_secret"]
    assert new.startswith("psk_") and new != old
    assert rotated.json()["previous_proxy_secret_expires_at"] is not None

    headers = proxied(active, http_server)
    assert verifies(old, headers) and verifies(new, headers)
    # What a seller's verifier of the one header compares, with the new secret, is unchanged.
    timestamp = int(headers["X-Marketplace-Timestamp"])
    assert headers["X-Marketplace-Signature"] == proxy_signature.sign(
        new, agreement_id=active.agreement_id, call_seq=int(headers["X-Marketplace-Call-Seq"]), timestamp=timestamp,
        method="GET", path="/translate")

    overlap_ended(Service, pk=active.service.pk)
    time.sleep(settings.CREDENTIAL_CACHE_SECONDS + 0.1)  # the proxy reads a service's secrets once a second
    headers = proxied(active, http_server)
    assert proxy_signature.PREVIOUS_SIGNATURE_HEADER not in headers
    assert verifies(new, headers) and not verifies(old, headers)


@pytest.mark.chain
def test_a_proxy_secret_rotation_with_no_overlap_stops_the_old_secret_at_once(active, http_server):
    old = active.service.proxy_secret
    rotated = rotate_proxy_secret(active.seller_api, active.service.pk, {"previous_secret_valid_for_seconds": 0})
    assert rotated.json()["previous_proxy_secret_expires_at"] is None
    headers = proxied(active, http_server)
    assert verifies(rotated.json()["proxy_secret"], headers) and not verifies(old, headers)


def test_a_replayed_proxy_secret_rotation_answers_the_new_secret_no_record_keeps_until_the_next_rotation(
        service, seller_api):
    old = service.proxy_secret
    first = rotate_proxy_secret(seller_api, service.pk, OVERLAP, **{"Idempotency-Key": "rotate-1"})
    replay = rotate_proxy_secret(seller_api, service.pk, OVERLAP, **{"Idempotency-Key": "rotate-1"})
    assert first.status_code == replay.status_code == 200
    assert replay["Idempotent-Replayed"] == "true"
    new = first.json()["proxy_secret"]
    assert replay.json() == first.json()  # read from the service, not from the record
    service.refresh_from_db()
    assert (service.proxy_secret, service.previous_proxy_secret) == (new, old)  # rotated once
    assert seller_api.get(f"/agents/services/{service.pk}").json()["proxy_secret"] == new  # the seller reads it
    assert not records_hold(new) and not records_hold(old)

    rotate_proxy_secret(seller_api, service.pk, OVERLAP, **{"Idempotency-Key": "rotate-2"})
    again = rotate_proxy_secret(seller_api, service.pk, OVERLAP, **{"Idempotency-Key": "rotate-1"})
    assert again.json() == {**first.json(), "proxy_secret": None}
    assert again["Idempotent-Secret-Withheld"] == "replaced"


def test_a_replaced_proxy_secret_is_erased_once_its_overlap_ends(service, seller, seller_api):
    """It signs nothing after its overlap, so the beat task erases it: a database read no longer gives it."""
    running = register_service(seller, name="Another translator", skills=[])
    replaced = {service.pk: service.proxy_secret, running.pk: running.proxy_secret}
    for service_id in replaced:
        assert rotate_proxy_secret(seller_api, service_id, OVERLAP).status_code == 200
    assert erase_replaced_proxy_secrets() == 0  # both overlaps run: both replaced secrets still sign

    overlap_ended(Service, pk=service.pk)
    assert erase_replaced_proxy_secrets() == 1
    assert erase_replaced_proxy_secrets() == 0  # idempotent
    kept = dict(Service.objects.values_list("pk", "previous_proxy_secret"))
    assert kept == {service.pk: "", running.pk: replaced[running.pk]}
    assert Service.objects.get(pk=service.pk).previous_proxy_secret_expires_at is None
    assert seller_api.get(f"/agents/services/{service.pk}").json()["previous_proxy_secret_expires_at"] is None
    assert seller_api.get(f"/agents/services/{running.pk}").json()["previous_proxy_secret_expires_at"] is not None


@pytest.mark.parametrize(("body", "code"), [
    ({"previous_secret_valid_for_seconds": -1}, "min_value"),
    ({"previous_secret_valid_for_seconds": 86_401}, "max_value"),
    ({"previous_secret_valid_for_seconds": "60"}, "invalid"),
    ({"previous_secret_valid_for_seconds": 1e3}, "invalid"),
    ({"previous": 60}, "unknown_field"),
])
def test_a_proxy_secret_rotation_with_a_bad_overlap_is_400_and_rotates_nothing(service, seller_api, body, code):
    response = rotate_proxy_secret(seller_api, service.pk, body)
    assert code in codes_at(response, next(iter(body)))
    assert Service.objects.get(pk=service.pk).proxy_secret == service.proxy_secret


def test_a_proxy_secret_rotation_keeps_the_old_secret_an_hour_unless_told(service, seller_api):
    rotated = rotate_proxy_secret(seller_api, service.pk)
    assert rotated.status_code == 200, rotated.content
    ends = datetime.fromisoformat(rotated.json()["previous_proxy_secret_expires_at"])
    assert abs((ends - timezone.now()).total_seconds() - 3600) < 30
    shown = seller_api.get(f"/agents/services/{service.pk}").json()
    assert shown["previous_proxy_secret_expires_at"] == rotated.json()["previous_proxy_secret_expires_at"]


def test_only_the_services_seller_rotates_its_proxy_secret(service, seller_api):
    other = Api(issue_key(AgentFactory(), scope="admin"))
    response = rotate_proxy_secret(other, service.pk, OVERLAP)
    assert response.status_code == 403 and error_code(response) == "not_service_owner"
    response = rotate_proxy_secret(seller_api, "00000000-0000-0000-0000-000000000000", OVERLAP)
    assert response.status_code == 404 and error_code(response) == "service_not_found"
    response = rotate_proxy_secret(Api(issue_key(service.seller, scope="read")), service.pk, OVERLAP)
    assert response.status_code == 403
    assert Service.objects.get(pk=service.pk).proxy_secret == service.proxy_secret


@pytest.mark.parametrize("scope", ["read", "pay"])
def test_a_narrower_key_of_the_agent_cannot_replay_an_admin_keys_request_for_its_secret(seller, seller_api,
                                                                                      http_server, scope):
    """The stored answers of `Idempotency-Key` requests are the agent's; the routes under /agents/{id}/webhooks
    checked a key's scope in the handler, which a replay never runs: a read key that repeated an admin key's
    subscription or rotation (same key, path and body) was answered its live signing secret."""
    narrower = Api(issue_key(seller, scope=scope))
    body, headers = {"url": f"{http_server.url}/hooks"}, {"Idempotency-Key": "subscribe-once"}
    created = seller_api.post(f"/agents/{seller.pk}/webhooks", body, headers=headers)
    assert created.status_code == 201, created.content
    replayed = narrower.post(f"/agents/{seller.pk}/webhooks", body, headers=headers)
    assert created.json()["secret"] not in replayed.content.decode()
    assert replayed.status_code == 403 and error_code(replayed) == "insufficient_scope"

    rotated = rotate_webhook(seller, seller_api, created.json(), OVERLAP, **{"Idempotency-Key": "rotate-once"})
    assert rotated.status_code == 200, rotated.content
    replayed = rotate_webhook(seller, narrower, created.json(), OVERLAP, **{"Idempotency-Key": "rotate-once"})
    assert replayed.status_code == 403 and error_code(replayed) == "insufficient_scope"
    assert rotated.json()["secret"] not in replayed.content.decode()


def test_an_agents_own_webhook_secret_signs_as_given_spaces_and_all(seller, seller_api, http_server,
                                                                      django_capture_on_commit_callbacks):
    """DRF trims a CharField's whitespace: a secret given with a space at either end was stored trimmed, and the
    deliveries were signed with a secret the agent does not hold (every signature failed its check)."""
    secret = "  my-own-secret-0123456789\t"
    created = seller_api.post(f"/agents/{seller.pk}/webhooks", {"url": f"{http_server.url}/hooks", "secret": secret})
    assert created.status_code == 201, created.content

    body, header = delivered(seller, seller_api, http_server, django_capture_on_commit_callbacks)

    assert first_v1_verifies(secret, body, header)
