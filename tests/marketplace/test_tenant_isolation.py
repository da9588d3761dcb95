"""Object-level authorization across tenants, for every operation of the published API.

Tenant A (an owner with a buyer and a seller agent, agreements between them, a webhook subscription with a delivery,
an approval, inbox events, keys) and tenant B (another owner, its agents' keys of every scope, its owner token). Every
operation whose path names an object is called by each of B's principals with A's object in the path, and again with
an id nothing has: both answers must be the same refusal (404, or the 403 the route gives every caller of that kind),
so a caller learns nothing of A's objects, and no row of the apps changes. Tenant A's own call reaches each object
(the matrix is not vacuous). Every operation of the schema is classified (PUBLIC, OWN_ROWS or OBJECTS, with the
party and narrowest key scope that reach it): one added to the API without a row here fails
`test_every_operation_is_classified`, a routed view left out of the schema
`test_every_routed_view_is_in_the_schema_or_named_outside_it`. Objects named in a body or a query (REFERENCES,
every such field of the schema) are held to the same rule, or said why they name no tenant's object.
"""

import functools
import re
import uuid
from dataclasses import dataclass, field
from datetime import timedelta

import pytest
from django.apps import apps
from django.contrib.auth.models import Permission
from django.db import transaction
from django.urls import URLPattern, URLResolver, get_resolver
from django.utils import timezone
from drf_spectacular.generators import EndpointEnumerator, SchemaGenerator

from agreements.models import AgreementEvent, WebhookDelivery
from catalog import services
from catalog.models import SCOPE_RANK, ApiKey, KeyScope, OwnerScope, OwnerToken
from escrow.models import MasumiPaymentRequest, MasumiPurchase
from policies.models import ApprovalRequest
from tests.agreements.helpers import propose
from tests.catalog.factories import AgentFactory, UserFactory, issue_key, issue_owner_token, register_service
from tests.conftest import Api

pytestmark = pytest.mark.django_db

# Operations answering callers without credentials.
PUBLIC = {
    "healthz": "liveness",
    "readyz": "readiness",
    "network_config": "the chain's public configuration",
    "wallet_recovery_challenge": "not offered: 403 wallet_recovery_not_offered to anyone",
    "wallet_recover": "not offered: 403 wallet_recovery_not_offered to anyone",
    "services_invoke": "x402: anyone pays a listed skill by handle",
    "services_invocation_get": "an invocation by its unguessable public id, the x402 client's receipt",
}

# Operations naming no object in their path: each lists or creates the caller's own rows (a list is checked below
# to show none of tenant A's ids), or names its object in the body, scoped to the caller by the selector named.
OWN_ROWS = {
    "catalog_search": "the public catalog, for any key",
    "masumi_payment_information": "how to pay a listed service: the public catalog, for any key",
    "agents_list": "agents_of_owner(owner=caller)",
    "agents_create": "creates an agent of the caller",
    "owner_tokens_list": "owner_tokens_of(owner=caller)",
    "owner_tokens_issue": "issues a token of the caller",
    "agent_me": "the calling key's agent",
    "services_list_own": "services_of_seller(seller=caller)",
    "services_register": "creates a service of the caller",
    "agreements_list": "agreements_of_agent(agent=caller)",
    "agreements_propose": "the caller as buyer; a service by id is public catalog",
    "payment_requirements": "a listed service's x402 terms",
    "webhooks_list": "webhook_subscriptions_of(agent=caller)",
    "webhooks_create": "creates a subscription of the caller",
    "masumi_registry_list": "registered services and the caller's own",
    "masumi_registry_register": "registers the caller's service",
    "masumi_registry_deregister": "service by body id, service_deregister(actor=caller)",
    "masumi_purchase_list": "purchases_of_buyer(buyer=caller)",
    "masumi_purchase_create": "the caller as buyer; a payment request by its blockchainIdentifier (a bearer reference)",
    "masumi_purchase_request_refund": "purchase_get(buyer=caller) by body id",
    "masumi_purchase_request_refund_post": "purchase_get(buyer=caller) by body id",
    "masumi_purchase_cancel_refund_request": "purchase_get(buyer=caller) by body id",
    "masumi_purchase_lock_funds": "purchase_get(buyer=caller) by body id",
    "masumi_payment_list": "payments_of_seller(seller=caller)",
    "masumi_payment_create": "service_of_seller(seller=caller) by body id",
    "masumi_payment_resolve": "payment_get(seller=caller) by body id",
    "masumi_payment_submit_result": "payment_get(seller=caller) by body id",
    "masumi_payment_authorize_refund": "payment_get(seller=caller) by body id",
    "masumi_payment_source_list": "the marketplace's payment source",
}

# GET operations of OWN_ROWS that list rows (with their required query): tenant B's answer must name none of
# tenant A's objects.
MASUMI_QUERY = {"network": "Preprod"}
LISTINGS = {"/agents": {}, "/owner-tokens": {}, "/agents/me": {}, "/agents/services": {}, "/usage-agreements": {}, "/webhooks": {},
            "/registry/": MASUMI_QUERY, "/purchase/": MASUMI_QUERY, "/payment/": MASUMI_QUERY}


OPERATOR = "operator"


@dataclass(frozen=True)
class Reach:
    """How tenant A reaches an object operation: its principal (`buyer`, `seller`, `owner` or `operator`) and the
    narrowest key scope the operation takes (None: an owner's credentials only)."""

    party: str
    scope: str | None
    body: dict = field(default_factory=dict)
    headers: dict = field(default_factory=dict)


READ, PAY, ADMIN = KeyScope.READ, KeyScope.PAY, KeyScope.ADMIN
# A plain usage report, which RecordUsageView serves on its own fast path (agent_key_holder).
PLAIN_REPORT = {"body": {"units": 1}, "headers": {"Idempotency-Key": "tenant-isolation"}}

# Every operation with an object in its path, and who of tenant A may call it.
OBJECTS = {
    "api_keys_list": Reach("owner", None),
    "api_keys_issue": Reach("owner", None, {"scope": "read"}),
    "api_keys_revoke": Reach("owner", None),
    "agents_wallet_prove": Reach("owner", None),
    "owner_tokens_revoke": Reach("owner", None),
    "approvals_list": Reach("owner", None),
    "approvals_approve": Reach("owner", None),
    "approvals_reject": Reach("owner", None),
    "policies_get": Reach("owner", None),
    "policies_put": Reach("owner", None, {"approval_threshold_atomic": 5}),
    "agent_events": Reach("buyer", READ),
    "agent_events_ack": Reach("buyer", PAY),
    "agent_webhooks_list": Reach("buyer", ADMIN),
    "agent_webhooks_create": Reach("buyer", ADMIN, {"url": "https://hooks.example.com/b"}),
    "agent_webhooks_pause": Reach("buyer", ADMIN),
    "agent_webhooks_resume": Reach("buyer", ADMIN),
    "agent_webhooks_rotate": Reach("buyer", ADMIN, {"previous_secret_valid_for_seconds": 0}),
    "agent_webhooks_deliveries": Reach("buyer", ADMIN),
    "agent_webhooks_replay": Reach("buyer", ADMIN),
    "agent_webhooks_test": Reach("buyer", ADMIN),
    "agreements_of_agent": Reach("buyer", READ),
    "services_get": Reach("seller", READ),
    "services_update": Reach("seller", PAY, {"name": "Taken over"}),
    "services_update_put": Reach("seller", PAY, {"name": "Taken over"}),
    "services_deregister": Reach("seller", PAY),
    "services_proxy_secret_rotate": Reach("seller", PAY, {"previous_secret_valid_for_seconds": 0}),
    "webhooks_delete": Reach("seller", ADMIN),
    "webhooks_deliveries": Reach("seller", ADMIN),
    "agreements_get": Reach("buyer", READ),
    "agreements_events": Reach("buyer", READ),
    "agreements_accept": Reach("seller", PAY),
    "agreements_reject": Reach("seller", PAY, {"reason": "no"}),
    "agreements_cancel": Reach("buyer", PAY, {"reason": "no"}),
    "agreements_usage": Reach("buyer", READ),
    "agreements_record_usage": Reach("seller", PAY, **PLAIN_REPORT),
    "agreements_complete": Reach("buyer", PAY),
    "agreements_call_proofs": Reach("buyer", READ),
    "agreements_cumulative_receipts": Reach("buyer", READ),
    "escrow_activation_package": Reach("buyer", PAY),
    "escrow_activate": Reach("buyer", PAY),
    "escrow_status": Reach("buyer", READ),
    "escrow_challenge_package": Reach("buyer", PAY),
    "escrow_challenge": Reach("buyer", PAY),
    "escrow_dispute": Reach("buyer", PAY),
    "escrow_deposit_params": Reach("buyer", READ),
    "escrow_claim_instructions": Reach("buyer", READ),
    "escrow_resolve": Reach(OPERATOR, None),
    "direct_payment_authorization_cancel_package": Reach("buyer", PAY),
    "direct_payment_authorization_cancel": Reach("buyer", PAY),
    "metered_proxy_status": Reach("buyer", READ),
    "metered_proxy_get": Reach("buyer", PAY),  # a proxied call is charged, whatever its method
    "metered_proxy_post": Reach("buyer", PAY),
    "metered_proxy_put": Reach("buyer", PAY),
    "metered_proxy_patch": Reach("buyer", PAY),
    "metered_proxy_delete": Reach("buyer", PAY),
    "masumi_purchase_get": Reach("buyer", READ),
}

# Operations for one party of an agreement: the other party's key (admin scope) is refused with the code.
ONE_PARTY_ONLY = {
    "agreements_accept": "seller_only", "agreements_reject": "seller_only", "agreements_record_usage": "seller_only",
    "agreements_cancel": "buyer_only", "direct_payment_authorization_cancel_package": "buyer_only",
    **{f"metered_proxy_{verb}": "buyer_only" for verb in ("get", "post", "put", "patch", "delete")},
}
# escrow_activate, escrow_challenge and escrow_dispute refuse the seller (buyer_only) once a signed body is checked
# against the chain: tests/escrow/test_activation.py and test_disputes.py.

# Routes outside the API's schema, none about a tenant's objects (the admin's, under admin/, are operators' only).
NOT_IN_SCHEMA = {"metrics", "/api/schema/", "/api/docs/"}


@functools.cache
def published_schema() -> dict:
    """The API's schema, as drf-spectacular publishes it (generated once: ~0.2 s each)."""
    return SchemaGenerator().get_schema(request=None, public=True)


@functools.cache
def schema_operations() -> dict[str, tuple[str, str]]:
    """operationId: (method, path template)."""
    return {operation["operationId"]: (method.upper(), path)
            for path, operations in published_schema()["paths"].items() for method, operation in operations.items()}


def test_every_operation_is_classified():
    classified = set(PUBLIC) | set(OWN_ROWS) | set(OBJECTS)
    assert not set(PUBLIC) & set(OWN_ROWS) and not (set(PUBLIC) | set(OWN_ROWS)) & set(OBJECTS)
    published = set(schema_operations())
    assert published - classified == set(), "operations without a tenant-isolation row"
    assert classified - published == set(), "rows for operations the API no longer has"
    for operation_id, (_, path) in schema_operations().items():
        if operation_id in OBJECTS:
            assert "{" in path, operation_id
        elif "{" in path:
            assert operation_id in PUBLIC, operation_id


def _routes(resolver=None, prefix=""):
    for pattern in (resolver or get_resolver()).url_patterns:
        if isinstance(pattern, URLResolver):
            yield from _routes(pattern, prefix + str(pattern.pattern))
        elif isinstance(pattern, URLPattern):
            yield prefix + str(pattern.pattern), pattern


def test_every_routed_view_is_in_the_schema_or_named_outside_it():
    """A view routed but left out of the schema (not a DRF view, or excluded from it) would escape the
    classification above."""
    endpoints = EndpointEnumerator().get_api_endpoints()
    described = {getattr(callback, "cls", None) for _, _, _, callback in endpoints}
    outside = {route for route, pattern in _routes() if not route.startswith("admin/")
               and (getattr(pattern.callback, "view_class", None) or getattr(pattern.callback, "cls", None))
               not in described}
    published = {(method, path) for method, path in schema_operations().values()}
    excluded = {path for path, _, method, _ in endpoints if (method, path) not in published}
    assert outside | excluded == NOT_IN_SCHEMA


class Tenant:
    def __init__(self, name: str, server_url: str):
        self.upstream = f"{server_url}/{name}-api"
        self.owner = UserFactory(username=f"tenant-{name}")
        self.buyer = AgentFactory(owner=self.owner, handle=f"{name}-buyer", is_buyer=True, is_seller=False)
        self.seller = AgentFactory(owner=self.owner, handle=f"{name}-seller", is_buyer=False, is_seller=True)
        self.owner_api = Api(issue_owner_token(self.owner))
        self.buyer_api = Api(issue_key(self.buyer, scope=KeyScope.ADMIN))
        self.seller_api = Api(issue_key(self.seller, scope=KeyScope.ADMIN))
        self.service = register_service(self.seller, upstream_base_url=self.upstream)


@pytest.fixture
def tenant_a(http_server):
    a = Tenant("a", http_server.url)
    hook = a.buyer_api.post(f"/agents/{a.buyer.pk}/webhooks", {"url": http_server.url + "/hook"})
    assert hook.status_code == 201, hook.content
    a.subscription_id = hook.json()["id"]
    assert a.buyer_api.post(f"/agents/{a.buyer.pk}/webhooks/test").status_code == 202
    seller_hook = a.seller_api.post("/webhooks", {"url": http_server.url + "/seller-hook"})
    assert seller_hook.status_code == 201, seller_hook.content
    a.seller_subscription_id = seller_hook.json()["id"]
    a.agreement_id = propose(a.buyer_api, a.service)["id"]
    assert a.owner_api.put(f"/agents/{a.buyer.pk}/policies", {"approval_threshold_atomic": 1}).status_code == 200
    held = propose(a.buyer_api, a.service)
    a.approval_id = ApprovalRequest.objects.get(subject_id=held["id"]).pk
    a.delivery_id = WebhookDelivery.objects.filter(subscription_id=a.subscription_id).first().pk
    a.event_id = AgreementEvent.objects.filter(agreement_id=a.agreement_id).first().pk
    a.key_id = a.buyer.api_keys.first().pk
    a.token_id = a.owner.owner_tokens.first().pk
    # A service of A's taken off the catalog: only its seller sees it.
    a.unlisted = register_service(a.seller, name="Unlisted", skills=[{"name": "hidden", "description": "Hidden",
                                                                       "price_atomic": 1}],
                                  upstream_base_url=a.upstream)
    assert a.seller_api.delete(f"/agents/services/{a.unlisted.pk}").status_code == 200
    # Its Masumi rows, as the chain-backed flows leave them (tests/escrow/test_masumi_node.py makes them through the
    # API): a purchase of its buyer's from its seller, and its seller's payment request.
    now = timezone.now()
    timers = {name: now + timedelta(hours=hours) for hours, name in enumerate(
        ["pay_by_time", "submit_result_time", "unlock_time", "external_dispute_unlock_time"], start=1)}
    a.purchase_agreement_id = uuid.UUID(propose(a.buyer_api, a.service)["id"])
    a.purchase_id = MasumiPurchase.objects.create(agreement_id=a.purchase_agreement_id, input_hash="ab" * 32,
                                                  created_chain_time=now, **timers).pk
    a.payment_request_id = MasumiPaymentRequest.objects.create(
        service=a.service, identifier_from_purchaser="a-job", unit_price=1, token="USDC", **timers).pk
    return a


@pytest.fixture
def tenant_b(http_server):
    return Tenant("b", http_server.url)


def b_principals(b: Tenant) -> dict[str, Api]:
    principals = {f"buyer key ({scope})": Api(issue_key(b.buyer, scope=scope)) for scope in KeyScope}
    principals["seller key (admin)"] = b.seller_api
    principals["owner token"] = b.owner_api
    return principals


def path_values(a: Tenant, template: str, *, agent_id) -> dict:
    """Tenant A's objects for the path `template`: its seller's subscription under /webhooks/ (an agent key's own),
    its buyer's under /agents/{agent_id}/webhooks/."""
    subscription_id = a.seller_subscription_id if template.startswith("/webhooks/") else a.subscription_id
    return {"agent_id": agent_id, "key_id": a.key_id, "token_id": a.token_id, "request_id": a.approval_id, "event_id": f"evt_{a.event_id}",
            "subscription_id": subscription_id, "delivery_id": a.delivery_id, "agreement_id": a.agreement_id,
            "service_id": a.unlisted.pk, "purchase_ref": a.purchase_id, "path": "translate"}


def a_path(a: Tenant, template: str) -> str:
    """`template` naming tenant A's objects, under its buyer."""
    return filled(template, path_values(a, template, agent_id=a.buyer.pk))


NOBODYS = {"agent_id": uuid.UUID(int=1), "key_id": 2**31 - 1, "token_id": 2**31 - 1, "request_id": uuid.UUID(int=2),
           "event_id": "evt_999999999", "subscription_id": uuid.UUID(int=3), "delivery_id": uuid.UUID(int=4),
           "agreement_id": uuid.UUID(int=5), "service_id": uuid.UUID(int=6), "purchase_ref": uuid.UUID(int=7),
           "path": "translate"}


def nested_object(template: str) -> bool:
    """Whether the path names an object under /agents/{agent_id}/ (an approval, a subscription, a key...)."""
    return "{agent_id}" in template and any("{" + name + "}" in template for name in NOBODYS
                                            if name not in ("agent_id", "path"))


def filled(template: str, values: dict) -> str:
    return template.format(**{name: values[name] for name in values if "{" + name + "}" in template})


def call(api: Api, method: str, path: str, reach: Reach):
    if method == "GET":
        return api.get(path, headers=reach.headers)
    return getattr(api, method.lower())(path, reach.body, headers=reach.headers)


def refusal(response) -> tuple[int, str | None]:
    body = response.json() if response["Content-Type"].startswith("application/json") else {}
    return response.status_code, body.get("error", {}).get("code") if isinstance(body, dict) else None


def rows() -> dict:
    """Every row of the apps holding tenants' objects (a key's last use aside)."""
    return {model._meta.label: sorted(map(repr, (
        {k: v for k, v in row.items() if k != "last_used_at"} for row in model.objects.values())))
        for label in ("catalog", "agreements", "policies", "escrow")
        for model in apps.get_app_config(label).get_models()}


def test_another_tenant_gets_the_same_refusal_as_for_an_object_nobody_has(tenant_a, tenant_b, admin_client):
    """Every operation naming an object, one set-up for all (each operation's own call by A rolled back)."""
    a, b = tenant_a, tenant_b
    principals = b_principals(b)
    for operation_id in sorted(OBJECTS):
        method, template = schema_operations()[operation_id]
        reach = OBJECTS[operation_id]
        before = rows()
        for name, api in principals.items():
            # A's objects under A's agent, and under B's own agent (a nested id checked against its parent only).
            for agent_id, nobodys_agent in ((a.buyer.pk, NOBODYS["agent_id"]), (b.buyer.pk, b.buyer.pk)):
                if agent_id == b.buyer.pk and not nested_object(template):
                    continue  # B's own agent's collection: checked in the listings test below to hold none of A's
                theirs = call(api, method, filled(template, path_values(a, template, agent_id=agent_id)), reach)
                nobodys = call(api, method, filled(template, {**NOBODYS, "agent_id": nobodys_agent}), reach)
                assert theirs.status_code in (403, 404), (operation_id, name, agent_id, theirs.status_code,
                                                          theirs.content[:300])
                assert refusal(theirs) == refusal(nobodys), (operation_id, name, agent_id, theirs.content[:300],
                                                             nobodys.content[:300])
        assert rows() == before, f"another tenant's call of {operation_id} changed rows"
        party = {"buyer": a.buyer_api, "seller": a.seller_api, "owner": a.owner_api}.get(reach.party)
        path = a_path(a, template)
        with transaction.atomic():  # what A's own call changes is undone for the next operation
            own = (admin_client.generic(method, path, content_type="application/json") if party is None
                   else call(party, method, path, reach))
            transaction.set_rollback(True)
        assert own.status_code != 404, (operation_id, own.content[:300])


def test_another_seller_reads_a_listed_service_as_the_catalog_shows_it_and_cannot_change_it(tenant_a, tenant_b):
    """A registered service is public (search shows it): another seller is told it is not the owner, 403, rather than
    404, and reads it without its upstream or proxy secret."""
    service_path = f"/agents/services/{tenant_a.service.pk}"
    before = rows()
    for method, path, body in [("PATCH", service_path, {"name": "Taken over"}), ("PUT", service_path, {"name": "X"}),
                               ("DELETE", service_path, {}),
                               ("POST", f"{service_path}/proxy-secret/rotate", {"previous_secret_valid_for_seconds": 0})]:
        response = call(tenant_b.seller_api, method, path, Reach("seller", PAY, body))
        assert refusal(response) == (403, "not_service_owner"), (method, path, response.content[:300])
    assert rows() == before
    shown = tenant_b.seller_api.get(service_path)
    assert shown.status_code == 200
    assert not {"upstream_base_url", "proxy_secret"} & set(shown.json())
    assert tenant_a.upstream not in shown.content.decode()


def widening_filters(a: Tenant) -> dict:
    """Filters a listing might take to name another tenant's rows: each listing refuses them as unknown (400) or
    ignores them (a view reading no query)."""
    return {"buyer": a.buyer.pk, "seller": a.seller.pk, "agent": a.buyer.pk, "agent_id": a.buyer.pk,
            "buyer_id": a.buyer.pk, "seller_id": a.seller.pk, "owner": a.owner.pk}


@pytest.mark.parametrize("widened", [False, True], ids=["plain", "with another tenant's ids as filters"])
def test_another_tenants_listings_name_none_of_its_objects_nor_its_upstream(tenant_a, tenant_b, widened):
    a = tenant_a  # its registered service is the public catalog's; its unlisted one is not
    a_ids = {str(i) for i in (a.buyer.pk, a.seller.pk, a.agreement_id, a.subscription_id, a.seller_subscription_id,
                              a.unlisted.pk, a.approval_id, a.delivery_id)}
    own_paths = [f"/agents/{tenant_b.buyer.pk}/{tail}"
                 for tail in ("webhooks", "events", "approvals", "webhooks/deliveries", "api-keys", "policies")]
    own_paths.append(f"/usage-agreements/agents/{tenant_b.buyer.pk}/agreements")
    extra = widening_filters(a) if widened else {}
    answered = set()
    for name, api in b_principals(tenant_b).items():
        responses = [api.get(path, {**query, **extra}) for path, query in LISTINGS.items()]
        for response in responses + [api.get(p, extra) for p in own_paths]:
            if response.status_code == 200:
                answered.add(response.wsgi_request.path)
            text = response.content.decode()
            assert not {i for i in a_ids if i in text}, (name, response.wsgi_request.path, text[:300])
            assert a.upstream not in text, (name, response.wsgi_request.path)
    if not widened:
        assert answered == set(LISTINGS) | set(own_paths)  # each read by some principal of B's


def test_the_table_gives_no_read_only_key_a_write():
    for operation_id, reach in OBJECTS.items():
        method, _ = schema_operations()[operation_id]
        assert method == "GET" or reach.scope != READ, operation_id


def test_a_key_of_the_party_narrower_than_the_operation_takes_is_refused_and_changes_nothing(tenant_a):
    keys = {agent.pk: {scope: Api(issue_key(agent, scope=scope)) for scope in KeyScope}
            for agent in (tenant_a.buyer, tenant_a.seller)}
    before = rows()
    for operation_id, reach in sorted(OBJECTS.items()):
        if reach.party == OPERATOR:
            continue
        method, template = schema_operations()[operation_id]
        agent = tenant_a.seller if reach.party == "seller" else tenant_a.buyer
        narrower = list(KeyScope) if reach.scope is None else [
            s for s in KeyScope if SCOPE_RANK[s] < SCOPE_RANK[KeyScope(reach.scope)]]
        for scope in narrower:
            response = call(keys[agent.pk][scope], method, a_path(tenant_a, template), reach)
            expected = "owner_credentials_required" if reach.scope is None else "insufficient_scope"
            assert refusal(response) == (403, expected), (operation_id, scope, response.content[:300])
        assert rows() == before, f"a narrower key's call of {operation_id} changed rows"


# Operations of OWN_ROWS that POST a read (a search, a lookup by body): a `read` key may call them.
READS_BY_POST = {"catalog_search", "masumi_payment_resolve"}


def test_a_read_key_is_refused_every_write_that_names_no_object_and_changes_nothing(tenant_a):
    read_keys = [Api(issue_key(agent, scope=KeyScope.READ)) for agent in (tenant_a.buyer, tenant_a.seller)]
    before = rows()
    for operation_id, (method, path) in sorted(schema_operations().items()):
        if operation_id not in OWN_ROWS or method == "GET" or operation_id in READS_BY_POST:
            continue
        for api in read_keys:
            response = call(api, method, path, Reach("buyer", None))
            expected = ("owner_credentials_required" if operation_id in ("agents_create", "owner_tokens_issue")
                        else "insufficient_scope")
            assert refusal(response) == (403, expected), (operation_id, response.content[:300])
    assert rows() == before


@pytest.mark.parametrize("operation_id", sorted(ONE_PARTY_ONLY))
def test_the_other_party_of_the_agreement_is_refused_and_changes_nothing(operation_id, tenant_a):
    method, template = schema_operations()[operation_id]
    reach = OBJECTS[operation_id]
    other = tenant_a.buyer_api if reach.party == "seller" else tenant_a.seller_api
    before = rows()
    response = call(other, method, a_path(tenant_a, template), reach)
    assert refusal(response) == (403, ONE_PARTY_ONLY[operation_id]), response.content[:300]
    assert rows() == before


# Writes an owner's `approve` token may make: deciding held purchases, and acknowledging its agents' inbox events
# (routes an agent's `pay` key may call take `approve` of its owner's token: README, Operations).
APPROVE_WRITES = {"approvals_approve", "approvals_reject", "agent_events_ack"}


@pytest.mark.parametrize("scope", [OwnerScope.READ, OwnerScope.APPROVE])
def test_an_owners_narrower_token_is_refused_every_write_beyond_its_scope_and_changes_nothing(tenant_a, scope):
    """Every unsafe method of every routed view (drf-spectacular's enumeration of the URL resolver), each found in the
    schema, called with a narrower token of tenant A's owner (an operator with every operator permission) on A's own
    objects: refused 403 (`insufficient_scope` where an owner's token may come, `agent_key_required` where only an
    agent's key does), and no row changes."""
    a = tenant_a
    a.owner.is_staff = True
    a.owner.save()
    a.owner.user_permissions.add(*Permission.objects.filter(content_type__app_label__in=("escrow", "catalog",
                                                                                        "policies", "agreements")))
    token = Api(issue_owner_token(a.owner, scope=scope))
    by_route = {route: operation_id for operation_id, route in schema_operations().items()}
    before, tried = rows(), set()
    for path, _, method, _ in EndpointEnumerator().get_api_endpoints():
        operation_id = by_route.get((method, path))
        if method in ("GET", "HEAD", "OPTIONS") or path in NOT_IN_SCHEMA:
            continue
        assert operation_id is not None, (method, path)
        if operation_id in PUBLIC or (scope == OwnerScope.APPROVE and operation_id in APPROVE_WRITES):
            continue
        reach = OBJECTS.get(operation_id) or FAST_PATH_BODIES.get(operation_id) or Reach("owner", None)
        response = call(token, method, a_path(a, path), reach)
        assert refusal(response) in ((403, "insufficient_scope"), (403, "agent_key_required")), (
            operation_id, scope, response.content[:300])
        tried.add(operation_id)
    assert rows() == before
    owners_writes = {"agents_create", "owner_tokens_issue", "api_keys_issue", "api_keys_revoke", "owner_tokens_revoke",
                     "policies_put", "escrow_resolve", "agent_webhooks_create", "approvals_approve"}
    assert owners_writes - (APPROVE_WRITES if scope == OwnerScope.APPROVE else set()) <= tried


def test_an_owners_token_opens_no_admin_page(tenant_a):
    """The admin takes a signed-in operator's session (with a second factor), never a bearer token, of any scope."""
    tenant_a.owner.is_staff = tenant_a.owner.is_superuser = True
    tenant_a.owner.save()
    response = Api(issue_owner_token(tenant_a.owner)).client.get("/admin/catalog/ownertoken/")
    assert response.status_code == 302 and "/admin/login/" in response["Location"]


def unusable_credentials(a: Tenant) -> dict[str, tuple[Api, str]]:
    """Credentials of tenant A's that no longer authenticate, and the code each is refused with."""
    revoked = services.api_key_issue(agent=a.buyer, scope=KeyScope.ADMIN)
    services.credential_revoke(credential=revoked.credential)
    expired = services.api_key_issue(agent=a.buyer, scope=KeyScope.ADMIN,
                                     expires_at=timezone.now() + timedelta(seconds=30))
    ApiKey.objects.filter(pk=expired.credential.pk).update(expires_at=timezone.now() - timedelta(seconds=1))
    idle = AgentFactory(owner=a.owner, handle="a-idle")
    idle_key = issue_key(idle, scope=KeyScope.ADMIN)
    idle.is_active = False
    idle.save()
    gone = UserFactory(username="tenant-gone")
    gone_key, gone_token = issue_key(AgentFactory(owner=gone, handle="gone-agent"), scope=KeyScope.ADMIN), \
        issue_owner_token(gone)
    gone.is_active = False
    gone.save()
    revoked_token = services.owner_token_issue(owner=a.owner, scope=OwnerScope.ADMIN)
    services.credential_revoke(credential=revoked_token.credential)
    expired_token = services.owner_token_issue(owner=a.owner, scope=OwnerScope.ADMIN,
                                               expires_at=timezone.now() + timedelta(seconds=30))
    OwnerToken.objects.filter(pk=expired_token.credential.pk).update(expires_at=timezone.now() - timedelta(seconds=1))
    return {"revoked owner token": (Api(revoked_token.secret), "credentials_revoked"),
            "expired owner token": (Api(expired_token.secret), "credentials_expired"),
            "revoked key": (Api(revoked.secret), "credentials_revoked"),
            "expired key": (Api(expired.secret), "credentials_expired"),
            "deactivated agent's key": (Api(idle_key), "agent_inactive"),
            "deactivated owner's key": (Api(gone_key), "owner_inactive"),
            "deactivated owner's token": (Api(gone_token), "owner_inactive")}


# Bodies that take an operation's own fast path (agent_key_holder rather than DRF's authentication).
FAST_PATH_BODIES = {"catalog_search": Reach("buyer", READ, {"q": "translate"})}


def test_unusable_credentials_are_refused_on_every_operation_that_takes_credentials(tenant_a):
    credentials = unusable_credentials(tenant_a)
    before = rows()
    for operation_id, (method, template) in sorted(schema_operations().items()):
        if operation_id in PUBLIC:
            continue
        reach = OBJECTS.get(operation_id) or FAST_PATH_BODIES.get(operation_id) or Reach("buyer", READ)
        path = a_path(tenant_a, template)
        for name, (api, code) in credentials.items():
            response = call(api, method, path, reach)
            assert refusal(response) == (401, code), (operation_id, name, response.content[:300])
    assert rows() == before



# --- objects named in a body or a query ---------------------------------------------------------------------------

# A request field or query parameter naming an object: an id, a registry id, a blockchainIdentifier, a wallet.
REFERENCE = re.compile(r"(^|_)id$|Identifier$|^(seller|buyer|agent|after|cursor|cursorId)$|vkey$|_(sellers|services)$",
                       re.IGNORECASE)


@dataclass(frozen=True)
class Named:
    """How an operation treats another tenant's object named in `field`: `refused`, the same refusal as for an
    object nobody has (A's object of the kind `a_ref`: a purchase's blockchainIdentifier is checked with its payment request's too; the rest of the body or query in `rest`), while A's `party`
    gets past the lookup;
    `listed`, a filter whose answer names none of A's unlisted objects; else `why` it names no tenant's object."""

    a_ref: str = ""
    rest: dict = field(default_factory=dict)
    party: str = ""  # tenant A's agent whose own call gets past the lookup (none: it cannot either)
    listed: bool = False
    why: str = ""


NETWORK = {"network": "Preprod"}
PERMIT = {"intent_signature": "0x" + "1" * 130, "deadline": 1,
          "escrow_permit": {"value": 1, "nonce": 0, "deadline": 1, "signature": "0x" + "1" * 130}}
REFERENCES = {
    ("agreements_propose", "service_id"): Named(why="the public catalog; a deregistered service or a deactivated "
                                                    "seller is named as such (README, Catalog)"),
    ("agreements_propose", "seller_agent_id"): Named(why="the public catalog: the seller's one listed service"),
    ("agreements_propose", "client_proposal_id"): Named(why="the caller's own label, kept in the terms"),
    ("policies_put", "allowed_sellers"): Named(why="the caller's own policy, matched against purchases, never read"),
    ("policies_put", "blocked_sellers"): Named(why="the caller's own policy, matched against purchases, never read"),
    ("policies_put", "allowed_services"): Named(why="the caller's own policy, matched against purchases, never read"),
    ("policies_put", "blocked_services"): Named(why="the caller's own policy, matched against purchases, never read"),
    ("agent_events", "after"): Named(why="a position in the caller's own inbox"),
    ("masumi_purchase_list", "cursorId"): Named(why="a position in the caller's own purchases"),
    ("masumi_payment_list", "cursorId"): Named(why="a position in the caller's own payments (another's id: 404)"),
    ("masumi_registry_list", "cursorId"): Named(why="a position in the registry's listing"),
    ("masumi_payment_source_list", "cursorId"): Named(why="a position in the node's one payment source"),
    ("masumi_registry_register", "sellingWalletVkey"): Named(why="must be the caller's own wallet (wallet_mismatch)"),
    ("masumi_purchase_create", "blockchainIdentifier"): Named(why="a seller's payment request: a bearer reference "
                                                                  "(Masumi), for the buyer who pays it"),
    ("masumi_purchase_create", "sellerVkey"): Named(why="checked against the payment request's seller"),
    ("catalog_search", "seller"): Named(listed=True),
    ("masumi_registry_list", "walletVKey"): Named(listed=True),
    ("masumi_payment_information", "agentIdentifier"): Named("unlisted", party="seller"),
    ("masumi_purchase_list", "blockchainIdentifier"): Named("purchase", NETWORK, "buyer"),
    ("masumi_purchase_create", "agentIdentifier"): Named("unlisted", {**NETWORK, "input_data": {"text": "hi"},
                                                                      "identifierFromPurchaser": "b-job"}),
    ("masumi_purchase_request_refund", "blockchainIdentifier"): Named("purchase", NETWORK, "buyer"),
    ("masumi_purchase_request_refund_post", "blockchainIdentifier"): Named("purchase", NETWORK, "buyer"),
    ("masumi_purchase_cancel_refund_request", "blockchainIdentifier"): Named("purchase", NETWORK, "buyer"),
    ("masumi_purchase_lock_funds", "blockchainIdentifier"): Named("purchase", {**NETWORK, **PERMIT}, "buyer"),
    ("masumi_payment_create", "agentIdentifier"): Named("service", {**NETWORK, "identifierFromPurchaser": "b-job"}, "seller"),
    ("masumi_payment_resolve", "blockchainIdentifier"): Named("purchase", NETWORK, "seller"),
    ("masumi_payment_submit_result", "blockchainIdentifier"): Named("purchase", {**NETWORK,
                                                                                 "submitResultHash": "c" * 64},
                                                                   "seller"),
    ("masumi_payment_authorize_refund", "blockchainIdentifier"): Named("purchase", NETWORK, "seller"),
    ("masumi_registry_deregister", "agentIdentifier"): Named("unlisted", NETWORK, "seller"),
    # A signed position (the sort values of the last row of a page), applied as a filter on the caller's own rows:
    # no row is looked up by it, so another tenant's cursor names nothing and a forged one is 400 `invalid_cursor`.
    **{(operation, "cursor"): Named(why="a signed position in the caller's own list (marketplace.pagination)")
       for operation in ("api_keys_list", "approvals_list", "agent_webhooks_deliveries", "services_list_own",
                         "catalog_search", "owner_tokens_list", "agreements_list", "agreements_call_proofs",
                         "agreements_cumulative_receipts", "agreements_events", "agreements_usage",
                         "agreements_of_agent", "webhooks_deliveries")},
}


def published_references() -> set[tuple[str, str]]:
    """(operationId, field) for each query parameter or top-level body field of the schema that names an object."""
    schema = published_schema()
    components = schema["components"]["schemas"]
    found = set()
    for operations in schema["paths"].values():
        for operation in operations.values():
            names = [p["name"] for p in operation.get("parameters", []) if p["in"] == "query"]
            for content in operation.get("requestBody", {}).get("content", {}).values():
                ref = content["schema"].get("$ref", "")
                names += list(components.get(ref.rsplit("/", 1)[-1], {}).get("properties", {}))
            found |= {(operation["operationId"], name) for name in names if REFERENCE.search(name)}
    return found


def test_every_object_named_in_a_body_or_a_query_is_classified():
    assert set(REFERENCES) == published_references()
    assert all(bool(n.a_ref) + n.listed + bool(n.why) == 1 for n in REFERENCES.values())


def blockchain_identifier(pk: uuid.UUID) -> str:
    return "0x" + pk.hex.rjust(64, "0")


def sent(api: Api, method: str, path: str, data: dict):
    """`data` as the query of a GET, else as the body."""
    return api.get(path, data) if method == "GET" else call(api, method, path, Reach("buyer", None, data))


def test_another_tenants_object_named_in_a_body_or_a_query_gets_the_refusal_of_an_object_nobody_has(
        tenant_a, tenant_b):
    a = tenant_a
    a_values = {"purchase": blockchain_identifier(a.purchase_agreement_id),
                "request": blockchain_identifier(a.payment_request_id), "unlisted": str(a.unlisted.pk),
                "service": str(a.service.pk)}
    nobodys = {"purchase": blockchain_identifier(uuid.UUID(int=8)), "unlisted": str(uuid.UUID(int=9)),
               "service": str(uuid.UUID(int=9))}
    principals = b_principals(tenant_b)
    for (operation_id, name), named in sorted(REFERENCES.items()):
        if not named.a_ref:
            continue
        method, path = schema_operations()[operation_id]
        refs = [a_values[named.a_ref]] + ([a_values["request"]] if named.a_ref == "purchase" else [])
        before = rows()
        for principal, api in principals.items():
            nobodys_answer = sent(api, method, path, {**named.rest, name: nobodys[named.a_ref]})
            for ref in refs:
                theirs = sent(api, method, path, {**named.rest, name: ref})
                assert theirs.status_code in (403, 404), (operation_id, principal, ref, theirs.content[:300])
                assert refusal(theirs) == refusal(nobodys_answer), (operation_id, principal, ref,
                                                                    theirs.content[:300], nobodys_answer.content[:300])
        assert rows() == before, f"another tenant's call of {operation_id} naming A's {name} changed rows"
        if named.party:
            party = tenant_a.buyer_api if named.party == "buyer" else tenant_a.seller_api
            with transaction.atomic():  # what A's own call changes is undone for the next operation
                own = sent(party, method, path, {**named.rest, name: refs[0]})
                transaction.set_rollback(True)
            assert refusal(own) != refusal(nobodys_answer), (operation_id, own.content[:300])


def test_a_filter_naming_another_tenant_lists_none_of_its_unlisted_objects(tenant_a, tenant_b):
    a = tenant_a
    hidden = {str(a.unlisted.pk), a.upstream}
    filters = {("catalog_search", "seller"): [a.seller.handle, str(a.seller.pk)],
               ("masumi_registry_list", "walletVKey"): [a.seller.wallet_address]}
    assert set(filters) == {key for key, named in REFERENCES.items() if named.listed}
    for (operation_id, name), values in filters.items():
        method, path = schema_operations()[operation_id]
        for principal, api in b_principals(tenant_b).items():
            for value in values:
                response = sent(api, method, path,
                                {**NETWORK, name: value} if operation_id.startswith("masumi") else {name: value})
                text = response.content.decode()
                assert not {h for h in hidden if h in text}, (operation_id, principal, value, text[:300])
