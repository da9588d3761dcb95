"""Security properties through the API: hashed keys compared in constant time, no secret in logs or the admin,
signatures that cannot be replayed (proxy calls, escrow activation)."""

import hashlib
import time

import pytest

from agreements.models import WebhookSubscription
from catalog.models import ApiKey
from escrow.models import ChainTransaction
from marketplace import keys
from sdk import proxy_signature
from tests.catalog.factories import service_data
from tests.agreements.helpers import proposal
from tests.conftest import Api, error_code
from tests.escrow.flow import Parties
from tests.marketplace.conftest import active_agreement

pytestmark = pytest.mark.django_db


def test_api_keys_are_stored_hashed_and_compared_in_constant_time(owner_api, buyer, monkeypatch):
    secret = owner_api.post(f"/agents/{buyer.pk}/api-keys", {"name": "ci"}).json()["secret"]
    key = ApiKey.objects.get(agent=buyer)
    assert key.secret_digest == hashlib.sha256(secret.encode()).hexdigest()
    stored = {field.attname: str(getattr(key, field.attname)) for field in ApiKey._meta.fields}
    # The random part whole (token_urlsafe may hold "_": split at the first two only, or a stray letter is checked).
    assert not any(secret in value or secret.split("_", 2)[2] in value for value in stored.values())

    compared = []
    real_compare = keys.hmac.compare_digest
    monkeypatch.setattr(keys.hmac, "compare_digest", lambda a, b: compared.append((a, b)) or real_compare(a, b))
    forged = secret[:-4] + ("AAAA" if not secret.endswith("AAAA") else "BBBB")  # right prefix, wrong secret
    response = Api(forged).get("/agents/me")
    assert response.status_code == 401 and error_code(response) == "invalid_credentials"
    assert compared == [(hashlib.sha256(forged.encode()).hexdigest(), key.secret_digest)]
    assert Api(secret).get("/agents/me").status_code == 200


def test_the_admin_never_shows_the_proxy_or_webhook_secrets(operator, seller, seller_api):
    service = seller_api.post("/agents/services", service_data()).json()
    proxy_secret = seller_api.get(f"/agents/services/{service['id']}").json()["proxy_secret"]
    webhook = seller_api.post("/webhooks", {"url": "https://hooks.example.com/x"}).json()

    service_page = operator.get(f"/admin/catalog/service/{service['id']}/change/")
    webhook_page = operator.get(f"/admin/agreements/webhooksubscription/{webhook['id']}/change/")
    assert service_page.status_code == webhook_page.status_code == 200
    assert proxy_secret not in service_page.content.decode()
    assert webhook["secret"] not in webhook_page.content.decode()


def test_the_admin_shows_no_more_of_a_secret_the_agent_chose_than_of_one_it_was_given(operator, seller, seller_api):
    # A chosen secret has no `whsec_` prefix: a hint of its first ten characters showed ten of its sixteen.
    chosen = "Kq7rZ2mXv9LpW4tB"
    webhook = seller_api.post(f"/agents/{seller.pk}/webhooks",
                              {"url": "https://hooks.example.com/x", "secret": chosen}).json()
    given = seller_api.post(f"/agents/{seller.pk}/webhooks", {"url": "https://hooks.example.com/y"}).json()
    for subscription, secret in ((webhook, chosen), (given, given["secret"].removeprefix("whsec_"))):
        content = operator.get(f"/admin/agreements/webhooksubscription/{subscription['id']}/change/").content.decode()
        assert secret[:4] in content  # the hint: enough to tell secrets apart
        assert secret[:5] not in content


def test_the_admin_shows_a_rotations_overlap_but_neither_secret(operator, seller, seller_api):
    service = seller_api.post("/agents/services", service_data()).json()
    webhook = seller_api.post(f"/agents/{seller.pk}/webhooks", {"url": "https://hooks.example.com/x"}).json()
    service_page = f"/admin/catalog/service/{service['id']}/change/"
    webhook_page = f"/admin/agreements/webhooksubscription/{webhook['id']}/change/"
    assert "no overlap running" in operator.get(service_page).content.decode()
    assert "no overlap running" in operator.get(webhook_page).content.decode()

    body = {"previous_secret_valid_for_seconds": 600}
    new_proxy_secret = seller_api.post(f"/agents/services/{service['id']}/proxy-secret/rotate",
                                       body).json()["proxy_secret"]
    new_webhook_secret = seller_api.post(f"/agents/{seller.pk}/webhooks/{webhook['id']}/rotate",
                                         body).json()["secret"]
    for page, secrets in ((service_page, [service["proxy_secret"], new_proxy_secret]),
                          (webhook_page, [webhook["secret"][10:], new_webhook_secret[10:]])):  # past the hint
        content = operator.get(page).content.decode()
        assert "overlap running: the replaced secret signs too until" in content
        assert not [secret for secret in secrets if secret in content]


def test_a_subscription_an_operator_deletes_in_the_admin_keeps_no_secret_and_stays_deleted(operator, seller,
                                                                                            seller_api):
    webhook = seller_api.post("/webhooks", {"url": "https://hooks.example.com/x"}).json()
    page = f"/admin/agreements/webhooksubscription/{webhook['id']}/change/"
    form = {"agent": seller.pk, "url": webhook["url"], "event_types": "[]",
            "deliveries-TOTAL_FORMS": 0, "deliveries-INITIAL_FORMS": 0}
    assert operator.post(page, form).status_code == 302  # is_active left unticked
    stored = WebhookSubscription.objects.get(pk=webhook["id"])
    assert (stored.is_active, stored.secret, stored.previous_secret) == (False, "", "")

    # Ticked again, it would sign with an empty key: the box is gone and the field read-only.
    assert 'name="is_active"' not in operator.get(page).content.decode()
    assert operator.post(page, {**form, "is_active": "on"}).status_code == 302
    assert not WebhookSubscription.objects.get(pk=webhook["id"]).is_active


@pytest.mark.chain
def test_no_secret_reaches_the_logs(escrow_chain, http_server, json_logs, django_capture_on_commit_callbacks,
                                    settings):
    active = active_agreement(escrow_chain, django_capture_on_commit_callbacks, http_server.url + "/api")
    proxy_secret = active.service.proxy_secret
    webhook = active.seller_api.post("/webhooks", {"url": f"{http_server.url}/hooks"}).json()
    json_logs.clear()

    http_server.responses.extend([(200, {}), (503, {}), (200, {})])
    active.buyer_api.get(f"{active.proxy}/translate?api_key=buyer-query-secret")
    active.buyer_api.get(f"{active.proxy}/translate?api_key=buyer-query-secret")  # a failure is logged
    with django_capture_on_commit_callbacks(execute=True):  # a proposal fires a signed webhook delivery
        assert active.buyer_api.post("/usage-agreements", proposal(active.service)).status_code == 201
    Api(active.buyer_api.secret[:-2] + "xx").get("/agents/me")  # a failed login

    signatures = [r.headers["X-Marketplace-Signature"] for r in http_server.requests if "X-Marketplace-Signature"
                  in r.headers]
    signatures += [r.headers["Marketplace-Signature"] for r in http_server.requests if "Marketplace-Signature"
                   in r.headers]
    assert len(signatures) >= 3
    logged = "\n".join(json_logs)
    assert "Service Unavailable" in logged  # the log was captured
    for secret in [active.buyer_api.secret, active.seller_api.secret, proxy_secret, webhook["secret"],
                   "buyer-query-secret", *signatures, settings.RELAYER_PRIVATE_KEY[2:],
                   settings.RECEIPT_SIGNER_PRIVATE_KEY[2:]]:
        assert secret not in logged


@pytest.mark.chain
def test_proxied_calls_cannot_be_replayed_to_the_seller(escrow_chain, http_server,
                                                        django_capture_on_commit_callbacks):
    active = active_agreement(escrow_chain, django_capture_on_commit_callbacks, http_server.url + "/api")
    active.buyer_api.get(f"{active.proxy}/translate")
    active.buyer_api.get(f"{active.proxy}/translate")
    first, second = (request.headers for request in http_server.requests)
    secret = active.service.proxy_secret
    assert proxy_signature.verify(secret, first, method="GET", path="/translate")
    # Each call has its own number for the seller to dedupe, and a signature older than 300 s is refused.
    assert int(second["X-Marketplace-Call-Seq"]) > int(first["X-Marketplace-Call-Seq"])
    late = int(first["X-Marketplace-Timestamp"]) + proxy_signature.TOLERANCE_SECONDS + 1
    assert not proxy_signature.verify(secret, first, method="GET", path="/translate", now=late)
    # A signature is bound to its method and path.
    assert not proxy_signature.verify(secret, first, method="POST", path="/translate", now=time.time())
    assert not proxy_signature.verify(secret, first, method="GET", path="/admin", now=time.time())


@pytest.mark.chain
def test_signed_activations_cannot_be_replayed(escrow_chain, django_capture_on_commit_callbacks):
    parties = Parties(escrow_chain)
    first = parties.accepted_agreement()
    second = parties.accepted_agreement()
    signed_for_first = parties.signed_activation(first["id"])
    assert parties.activate(first["id"], django_capture_on_commit_callbacks, signed_for_first).status_code == 202
    assert parties.agreement(first["id"])["status"] == "active"

    # The same signatures again, for the same agreement: nothing is sent twice.
    again = parties.buyer_api.post(f"/usage-agreements/{first['id']}/activate-escrow", signed_for_first)
    assert again.status_code in (400, 409), again.content  # the permit nonce is spent; the agreement is active
    # ...or for another agreement with the same parties and terms: the intent names its agreement id.
    other = parties.buyer_api.post(f"/usage-agreements/{second['id']}/activate-escrow", signed_for_first)
    assert other.status_code == 400 and error_code(other) in {"wrong_signer", "wrong_permit_nonce"}, other.content
    assert ChainTransaction.objects.count() == 1
    assert parties.agreement(second["id"])["status"] == "accepted"
