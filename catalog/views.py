from drf_spectacular.utils import OpenApiExample, extend_schema
from rest_framework import status
from rest_framework.exceptions import Throttled
from rest_framework.permissions import AllowAny
from rest_framework.response import Response
from rest_framework.views import APIView

from catalog import selectors, services
from catalog.authentication import (
    agent_key_holder,
    agent_scope,
    calling_agent,
    owner_scope,
    owner_scope_by_method,
    owner_token_scope_check,
    presents_agent_key,
)
from catalog.models import KeyScope, OwnerScope, OwnerToken
from catalog.serializers import (
    AgentCreateSerializer,
    AgentSerializer,
    AgentWalletProveSerializer,
    ApiKeyCreateSerializer,
    ApiKeyIssuedSerializer,
    ApiKeyListQuery,
    ApiKeyPageSerializer,
    ApiKeySerializer,
    CredentialRevokeSerializer,
    OwnerTokenCreateSerializer,
    OwnerTokenIssuedSerializer,
    OwnerTokenPageSerializer,
    OwnerTokenSerializer,
    OwnServicePageSerializer,
    OwnServiceSerializer,
    OwnServicesQuery,
    ProxySecretRotatedSerializer,
    ServiceSearchPageSerializer,
    ServiceSearchSerializer,
    ServiceSerializer,
    ServiceRegisteredSerializer,
    ServiceWriteSerializer,
)
from marketplace.concurrency import Bulkhead
from marketplace.errors import Forbidden, error_response
from marketplace.idempotency import idempotent, shown_once
from marketplace.pagination import paginate
from marketplace.parsers import BoundedJSONParser, plain_json_post
from marketplace.renderers import rendered_response
from marketplace.serializers import SecretRotationSerializer, error_responses
from marketplace.throttling import agent_budgets, windows_wait

OWNER = [{"OwnerToken": []}]

SERVICE_EXAMPLE = OpenApiExample(
    "translation service",
    request_only=True,
    value={
        "name": "Fast translator",
        "description": "Translates text between 40 languages.",
        "tags": ["translation", "nlp"],
        "capability": {"name": "translate", "version": "1.2.0"},
        "author": {"name": "Ada", "organization": "Acme", "contact_email": "ada@example.com"},
        "legal": {"terms": "https://example.com/terms"},
        "example_outputs": [{"name": "sample", "url": "https://example.com/out.json", "mime_type": "application/json"}],
        "pricing": {"type": "per_call", "unit_name": "call", "unit_price_atomic": 20000, "token": "USDC"},
        "upstream_base_url": "https://translator.example.com/api",
        "upstream_protocol": "http",
        "skills": [{"name": "translate", "description": "Translate a text", "price_atomic": 20000}],
    },
)


def _agent_payload(agent) -> dict:
    return AgentSerializer(
        {**{f: getattr(agent, f) for f in ("id", "handle", "display_name", "wallet_address",
                                           "wallet_proven_at", "is_active", "created_at")}, "roles": agent.roles}
    ).data


def _credential_fields(credential) -> dict:
    """What an API key or an owner token shows of itself (never its digest)."""
    return {**{f: getattr(credential, f)
               for f in ("id", "name", "prefix", "scopes", "created_at", "expires_at", "revoked_at", "last_used_at")},
            "issued_with": credential.issued_with_id}


def _key_payload(key, secret: str | None = None) -> dict:
    data = _credential_fields(key)
    if secret is None:
        return ApiKeySerializer(data).data
    return ApiKeyIssuedSerializer({**data, "secret": secret}).data


class MyAgentView(APIView):
    permission_classes = [agent_scope(KeyScope.READ)]

    @extend_schema(operation_id="agent_me", summary="The agent the API key belongs to",
                   responses={200: AgentSerializer, **error_responses()}, tags=["agents"])
    def get(self, request):
        return Response(_agent_payload(calling_agent(request)))


class OwnerAgentsView(APIView):
    permission_classes = [owner_scope_by_method(write=OwnerScope.ADMIN)]

    @extend_schema(operation_id="agents_list", summary="Your agents (owner)", responses={
        200: AgentSerializer(many=True), **error_responses()}, tags=["agents"], auth=OWNER)
    def get(self, request):
        return Response([_agent_payload(a) for a in selectors.agents_of_owner(owner=request.user)])

    @extend_schema(operation_id="agents_create", summary="Create an agent (owner)", request=AgentCreateSerializer,
                   responses={201: AgentSerializer, **error_responses(409, 422)}, tags=["agents"], auth=OWNER)
    @idempotent()
    def post(self, request):
        body = AgentCreateSerializer(data=request.data)
        body.is_valid(raise_exception=True)
        roles = body.validated_data.pop("roles")
        proof = body.validated_data.pop("wallet_proof", None)
        agent = services.agent_create(owner=request.user, is_buyer="buyer" in roles, is_seller="seller" in roles,
                                      wallet_proof=services.WalletProof(**proof) if proof else None,
                                      **body.validated_data)
        return Response(_agent_payload(agent), status=status.HTTP_201_CREATED)


class AgentWalletProofView(APIView):
    permission_classes = [owner_scope(OwnerScope.ADMIN)]

    @extend_schema(operation_id="agents_wallet_prove", summary="Prove an agent's wallet (owner)",
                   description="For an agent from before `POST /agents` asked for its wallet's proof: with it, the "
                               "agent is found by its wallet and registers through Masumi. Proving it again changes "
                               "nothing.", request=AgentWalletProveSerializer,
                   responses={200: AgentSerializer, **error_responses(404, 409)}, tags=["agents"], auth=OWNER)
    def post(self, request, agent_id):
        agent = selectors.agent_get(agent_id=agent_id, owner=request.user)
        body = AgentWalletProveSerializer(data=request.data)
        body.is_valid(raise_exception=True)
        proof = body.validated_data.get("wallet_proof")
        agent = services.agent_wallet_prove(agent=agent, wallet_proof=services.WalletProof(**proof) if proof else None)
        return Response(_agent_payload(agent))


class AgentApiKeysView(APIView):
    permission_classes = [owner_scope_by_method(write=OwnerScope.ADMIN)]

    @extend_schema(operation_id="api_keys_list", summary="An agent's API keys (owner), newest first, a page at a time",
                   parameters=[ApiKeyListQuery],
                   responses={200: ApiKeyPageSerializer, **error_responses(404)}, tags=["agents"], auth=OWNER)
    def get(self, request, agent_id):
        agent = selectors.agent_get(agent_id=agent_id, owner=request.user)
        query = ApiKeyListQuery(data=request.query_params)
        query.is_valid(raise_exception=True)
        keys = selectors.api_keys_of_agent(agent=agent,
                                           include_revoked=query.validated_data["include_revoked"] == "true")
        rows, next_cursor = paginate(keys, ordering=selectors.API_KEY_ORDERING,
                                     cursor=query.validated_data.get("cursor"), limit=query.validated_data["limit"])
        return Response({"results": [_key_payload(key) for key in rows], "next_cursor": next_cursor})

    @extend_schema(operation_id="api_keys_issue", summary="Issue an API key for an agent (owner); shown once",
                   request=ApiKeyCreateSerializer,
                   responses={201: ApiKeyIssuedSerializer, **error_responses(404, 409, 422)}, tags=["agents"], auth=OWNER)
    @idempotent()
    def post(self, request, agent_id):
        agent = selectors.agent_get(agent_id=agent_id, owner=request.user)
        body = ApiKeyCreateSerializer(data=request.data)
        body.is_valid(raise_exception=True)
        issued = services.api_key_issue(
            agent=agent, issued_with=request.auth if isinstance(request.auth, OwnerToken) else None,
            **body.validated_data)
        # Keys are kept as digests only: no row keeps the secret for a replay.
        return shown_once(Response(_key_payload(issued.credential, issued.secret), status=status.HTTP_201_CREATED),
                          "secret")


class AgentApiKeyRevokeView(APIView):
    permission_classes = [owner_scope(OwnerScope.ADMIN)]

    @extend_schema(operation_id="api_keys_revoke", summary="Revoke an API key (owner); idempotent",
                   description="Pauses also the webhook subscriptions created with the key, unless `keep_issued`.",
                   request=CredentialRevokeSerializer, responses={200: ApiKeySerializer, **error_responses(404)},
                   tags=["agents"], auth=OWNER)
    def post(self, request, agent_id, key_id):
        body = CredentialRevokeSerializer(data=request.data)
        body.is_valid(raise_exception=True)
        agent = selectors.agent_get(agent_id=agent_id, owner=request.user)
        key = selectors.api_key_get(agent=agent, key_id=key_id)
        return Response(_key_payload(services.credential_revoke(credential=key, **body.validated_data)))


def _is_presented(request, token) -> bool:
    return isinstance(request.auth, OwnerToken) and request.auth.pk == token.pk


def _token_payload(request, token, secret: str | None = None) -> dict:
    data = {**_credential_fields(token), "is_this_token": _is_presented(request, token)}
    if secret is None:
        return OwnerTokenSerializer(data).data
    return OwnerTokenIssuedSerializer({**data, "secret": secret}).data


class OwnerTokensView(APIView):
    permission_classes = [owner_scope_by_method(write=OwnerScope.ADMIN)]

    @extend_schema(operation_id="owner_tokens_list", summary="Your owner tokens (owner), newest first, a page at a time",
                   parameters=[ApiKeyListQuery], responses={200: OwnerTokenPageSerializer, **error_responses()},
                   tags=["owners"], auth=OWNER)
    def get(self, request):
        query = ApiKeyListQuery(data=request.query_params)
        query.is_valid(raise_exception=True)
        tokens = selectors.owner_tokens_of(owner=request.user,
                                           include_revoked=query.validated_data["include_revoked"] == "true")
        rows, next_cursor = paginate(tokens, ordering=selectors.API_KEY_ORDERING,
                                     cursor=query.validated_data.get("cursor"), limit=query.validated_data["limit"])
        return Response({"results": [_token_payload(request, token) for token in rows], "next_cursor": next_cursor})

    @extend_schema(operation_id="owner_tokens_issue",
                   summary="Issue an owner token (owner, `admin` scope); shown once",
                   description="A narrower token for what needs less: `read` for a dashboard, `approve` for an "
                               "approvals app. The first token of an owner is issued by an operator "
                               "(`manage.py owner_token_issue`). A token expires no later than the token issuing "
                               "it: without `expires_at` it ends with it, a later one is 400 `expiry_beyond_issuer`.",
                   request=OwnerTokenCreateSerializer,
                   responses={201: OwnerTokenIssuedSerializer, **error_responses(409, 422)}, tags=["owners"],
                   auth=OWNER)
    @idempotent()
    def post(self, request):
        body = OwnerTokenCreateSerializer(data=request.data)
        body.is_valid(raise_exception=True)
        issued = services.owner_token_issue(
            owner=request.user, issued_with=request.auth if isinstance(request.auth, OwnerToken) else None,
            **body.validated_data)
        return shown_once(Response(_token_payload(request, issued.credential, issued.secret),
                                   status=status.HTTP_201_CREATED), "secret")


class OwnerTokenRevokeView(APIView):
    permission_classes = [owner_scope(OwnerScope.READ)]

    @extend_schema(operation_id="owner_tokens_revoke",
                   summary="Revoke an owner token (owner: `admin` scope, or any token revoking itself); idempotent",
                   description="Revokes also, at once, every owner token issued with it (and theirs in turn) and "
                               "every agent API key any of them issued, and pauses the webhook subscriptions any of "
                               "them created: what was minted with a leaked token dies with it. `keep_issued: true` "
                               "retires the token alone (a rotation).",
                   request=CredentialRevokeSerializer, responses={200: OwnerTokenSerializer, **error_responses(404)},
                   tags=["owners"], auth=OWNER)
    def post(self, request, token_id):
        body = CredentialRevokeSerializer(data=request.data)
        body.is_valid(raise_exception=True)
        token = selectors.owner_token_get(owner=request.user, token_id=token_id)
        if not _is_presented(request, token):
            owner_token_scope_check(request, OwnerScope.ADMIN)
        return Response(_token_payload(request, services.credential_revoke(credential=token, **body.validated_data)))


def _secret_context(request) -> dict:
    """A seller's proxy secret is shown to keys that may also rotate it (`pay`), not to read-only ones."""
    return {"proxy_secret_shown": request.auth.grants(KeyScope.PAY)}


class ServicesView(APIView):
    def get_permissions(self):
        scope = KeyScope.READ if self.request.method == "GET" else KeyScope.PAY
        return [agent_scope(scope)()]

    @extend_schema(operation_id="services_list_own", summary="The calling seller's services, in any state",
                   parameters=[OwnServicesQuery],
                   responses={200: OwnServicePageSerializer, **error_responses()}, tags=["catalog"])
    def get(self, request):
        query = OwnServicesQuery(data=request.query_params)
        query.is_valid(raise_exception=True)
        own = selectors.services_of_seller(seller=calling_agent(request))
        ordering, limit = ["-created_at", "id"], query.validated_data["limit"]
        if "offset" in query.validated_data:
            start = query.validated_data["offset"]
            rows, next_cursor = list(own.order_by(*ordering)[start:start + limit]), None
        else:
            rows, next_cursor = paginate(own, ordering=ordering, cursor=query.validated_data.get("cursor"),
                                         limit=limit)
        services_data = OwnServiceSerializer(rows, many=True, context=_secret_context(request)).data
        return Response({"results": services_data, "services": services_data, "next_cursor": next_cursor})

    @extend_schema(operation_id="services_register", summary="Register a service for the calling seller agent",
                   request=ServiceWriteSerializer, examples=[SERVICE_EXAMPLE],
                   responses={201: ServiceRegisteredSerializer, **error_responses(409, 422)}, tags=["catalog"])
    @idempotent()
    def post(self, request):
        body = ServiceWriteSerializer(data=request.data)
        body.is_valid(raise_exception=True)
        service = services.service_register(seller=calling_agent(request), data=body.validated_data)
        service = selectors.service_shown(service_id=service.pk, viewer=calling_agent(request))
        return shown_once(Response(ServiceRegisteredSerializer(service).data, status=status.HTTP_201_CREATED),
                          "proxy_secret", kept_by=service)


class ServiceDetailView(APIView):
    def get_permissions(self):
        scope = KeyScope.READ if self.request.method == "GET" else KeyScope.PAY
        return [agent_scope(scope)()]

    def _serialize(self, request, service):
        own = service.seller_id == calling_agent(request).pk
        if not own:
            return ServiceSerializer(service).data
        return OwnServiceSerializer(service, context=_secret_context(request)).data

    @extend_schema(operation_id="services_get", summary="A service (listed: registered, its seller and owner active; or your own in any state)",
                   responses={200: ServiceSerializer, **error_responses(404)}, tags=["catalog"])
    def get(self, request, service_id):
        service = selectors.service_shown(service_id=service_id, viewer=calling_agent(request))
        return Response(self._serialize(request, service))

    @extend_schema(operation_id="services_update", summary="Change your service (fields given are replaced)",
                   request=ServiceWriteSerializer(partial=True),
                   responses={200: OwnServiceSerializer, **error_responses(404, 409)}, tags=["catalog"])
    def patch(self, request, service_id):
        return self._update(request, service_id)

    @extend_schema(operation_id="services_update_put",
                   summary="Change your service, as PATCH does (the Pægents SDK updates with PUT): fields given are "
                           "replaced, the others kept",
                   request=ServiceWriteSerializer(partial=True),
                   responses={200: OwnServiceSerializer, **error_responses(404, 409)}, tags=["catalog"])
    def put(self, request, service_id):
        return self._update(request, service_id)

    def _update(self, request, service_id):
        agent = calling_agent(request)
        service = selectors.service_shown(service_id=service_id, viewer=agent)
        body = ServiceWriteSerializer(data=request.data, partial=True)
        body.is_valid(raise_exception=True)
        services.service_update(service=service, actor=agent, data=body.validated_data)
        return Response(self._serialize(request, selectors.service_shown(service_id=service_id, viewer=agent)))

    @extend_schema(operation_id="services_deregister",
                   summary="Deregister your service: hidden from search, kept for history; idempotent",
                   responses={200: OwnServiceSerializer, **error_responses(404)}, tags=["catalog"])
    def delete(self, request, service_id):
        agent = calling_agent(request)
        service = selectors.service_shown(service_id=service_id, viewer=agent)
        services.service_deregister(service=service, actor=agent)
        return Response(self._serialize(request, selectors.service_shown(service_id=service_id, viewer=agent)))


class ServiceProxySecretRotateView(APIView):
    permission_classes = [agent_scope(KeyScope.PAY)]

    @extend_schema(operation_id="services_proxy_secret_rotate",
                   summary="A new proxy secret for your service; the replaced one also signs proxied calls "
                           "(X-Marketplace-Signature-Previous) for the overlap asked for",
                   request=SecretRotationSerializer,
                   responses={200: ProxySecretRotatedSerializer, **error_responses(404, 422)}, tags=["catalog"])
    @idempotent()
    def post(self, request, service_id):
        agent = calling_agent(request)
        service = selectors.service_shown(service_id=service_id, viewer=agent)
        body = SecretRotationSerializer(data=request.data)
        body.is_valid(raise_exception=True)
        service = services.service_proxy_secret_rotate(service=service, actor=agent, **body.validated_data)
        return shown_once(Response(ProxySecretRotatedSerializer(service).data), "proxy_secret", kept_by=service)


# DRF describes this view (the schema) and serves the requests out of the ordinary, but a plain search (an agent key,
# a JSON object, nothing to negotiate) is dispatched without DRF's request wrapping, negotiation and rendering, which
# cost more CPU than the search itself. Its answers are DRF's: the same authentication and scope rules
# (`agent_key_holder`, read at most once a second per process like the metered proxy's), rate limit (`windows_wait`),
# parser, validation, error shape and bytes (the API's renderer). A comment, not a docstring: the OpenAPI schema would
# show a docstring as the operation's description.
class CatalogSearchView(APIView):
    permission_classes = [agent_scope(KeyScope.READ)]

    def dispatch(self, request, *args, **kwargs):
        if not _plain_search(request):
            return super().dispatch(request, *args, **kwargs)
        try:
            holder = agent_key_holder(request, scope=KeyScope.READ)
            wait = windows_wait(agent_budgets(agent_id=holder.agent_id, owner_id=holder.owner_id, scopes=("api",)))
            if wait is not None:
                raise Throttled(wait)
            response = rendered_response(_search_answer(BoundedJSONParser().parse(request)))
        except Exception as exc:  # every failure answers in the one error shape, as DRF's handler would
            response = error_response(exc)
        response["Allow"] = _SEARCH_ALLOW
        return response

    @extend_schema(
        operation_id="catalog_search",
        summary="Search registered services",
        request=ServiceSearchSerializer,
        examples=[OpenApiExample("translation under 0.05 USDC", request_only=True, value={
            "q": "translate german", "tags_any": ["translation"], "max_unit_price_atomic": 50000,
            "order_by": "relevance", "limit": 20})],
        responses={200: ServiceSearchPageSerializer, **error_responses(429, 503)},
        tags=["catalog"],
    )
    def post(self, request):
        return Response(_search_answer(request.data))


_SEARCH_ALLOW = "POST, OPTIONS"  # what DRF answers in `Allow` for this view
# Searches running at once in this process (SEARCH_CONCURRENCY): the database's CPU is what a search costs.
_SEARCH_SLOTS = Bulkhead("search", code="search_busy", limit="SEARCH_CONCURRENCY",
                         wait_seconds="SEARCH_WAIT_SECONDS", waiting_max="SEARCH_WAITING_MAX")
# The search body's validator, its fields bound once per process (DRF deep-copies them for every serializer):
# validation keeps no state on the serializer, only what `is_valid` would store.
_SEARCH_BODY = ServiceSearchSerializer()


def _plain_search(request) -> bool:
    """A plain JSON POST with an agent key. Anything else (another method, a session, an owner token, no body) is
    served by DRF itself."""
    return plain_json_post(request) and presents_agent_key(request)


def _search_answer(data) -> dict:
    params = dict(_SEARCH_BODY.run_validation(data))
    cursor, limit, offset = params.pop("cursor", None), params.pop("limit"), params.pop("offset", None)
    search = selectors.ServiceSearch(text=params.pop("q"), max_unit_price=params.pop("max_unit_price_atomic"),
                                     **params)
    with _SEARCH_SLOTS.slot():
        found = selectors.service_search(search=search, cursor=cursor, limit=limit, offset=offset)
    if offset is None:
        results, next_cursor = found
        return {"results": results, "next_cursor": next_cursor}
    return {
        "results": found.results, "next_cursor": None,
        "total": found.total, "has_more": found.next_offset is not None, "next_offset": found.next_offset,
        "query": {key: value for key, value in data.items() if key not in ("limit", "offset")},
    }


class WalletRecoveryChallengeView(APIView):
    """The Pægents SDK's `recover_credentials` (a wallet signature buys a new API key) is not offered: keys are
    issued by the agent's owner, and a wallet signature never mints a credential here."""

    permission_classes = [AllowAny]
    authentication_classes = []

    @extend_schema(operation_id="wallet_recovery_challenge", summary="Not offered: API keys are issued by the "
                   "agent's owner (POST /agents/{id}/api-keys); 403 `wallet_recovery_not_offered`",
                   responses={**error_responses()}, tags=["agents"], auth=[])
    def get(self, request):
        raise _recovery_not_offered()


class WalletRecoverView(APIView):
    permission_classes = [AllowAny]
    authentication_classes = []

    @extend_schema(operation_id="wallet_recover", request=None, summary="Not offered; see GET "
                   "/wallet/recovery-challenge", responses={**error_responses()}, tags=["agents"], auth=[])
    def post(self, request):
        raise _recovery_not_offered()


def _recovery_not_offered() -> Forbidden:
    return Forbidden("Credentials are not recovered by wallet signature: the agent's owner issues a new API key "
                     "(POST /agents/{agent_id}/api-keys with an owner token).", code="wallet_recovery_not_offered")
