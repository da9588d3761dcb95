"""The Masumi registry wire format (`/registry`) over the same catalog rows as `/agents/services`.

Field names, casing and the `{"status": "success", "data": ...}` envelope follow the Masumi Payment Service.
`network` is the Masumi network name this deployment answers to (MASUMI_NETWORK) or the chain's own name.
"""

from django.conf import settings
from drf_spectacular.utils import OpenApiExample, extend_schema
from rest_framework import serializers
from rest_framework.response import Response
from rest_framework.views import APIView

from catalog import selectors, services
from catalog.authentication import agent_scope, calling_agent
from catalog.models import KeyScope, MasumiProtocolVersion, PricingType, Service, ServiceState, UpstreamProtocol
from catalog.serializers import CapabilitySerializer, http_base_url
from marketplace import url_credentials
from marketplace.errors import Forbidden, InvalidInput
from marketplace.idempotency import idempotent
from marketplace.masumi_format import check_network as _check_network
from marketplace.masumi_format import network_field as _network_field
from marketplace.masumi_format import timestamp as _timestamp
from marketplace.pagination import MAX_LIMIT, paginate
from marketplace.serializers import (
    MAX_AMOUNT,
    AddressSerializerField,
    DigitsField,
    StrictIntegerField,
    StrictSerializer,
    TagListField,
    error_responses,
)

_STATES = {ServiceState.REGISTERED: "RegistrationConfirmed", ServiceState.DEREGISTERED: "DeregistrationConfirmed"}


class MasumiCapability(CapabilitySerializer):
    """The catalog's capability, bounded as its columns keep it (a longer version was a 500, the column's DataError)."""


class MasumiAuthor(StrictSerializer):
    name = serializers.CharField(max_length=250)
    contact = serializers.CharField(max_length=250, required=False, allow_blank=True, allow_null=True,
                                    help_text="masumi-crewai's single contact field: kept as contactOther.")
    contactEmail = serializers.EmailField(max_length=250, required=False, allow_blank=True, allow_null=True)
    contactOther = serializers.CharField(max_length=250, required=False, allow_blank=True, allow_null=True)
    organization = serializers.CharField(max_length=250, required=False, allow_blank=True, allow_null=True)


class MasumiLegal(StrictSerializer):
    privacyPolicy = serializers.CharField(max_length=250, required=False, allow_blank=True, allow_null=True)
    terms = serializers.CharField(max_length=250, required=False, allow_blank=True, allow_null=True)
    other = serializers.CharField(max_length=250, required=False, allow_blank=True, allow_null=True)


class MasumiExampleOutput(StrictSerializer):
    name = serializers.CharField(max_length=60)
    url = serializers.URLField(max_length=250)
    mimeType = serializers.CharField(max_length=60)


class MasumiPrice(StrictSerializer):
    unit = serializers.CharField(max_length=250, allow_blank=True,
                                 help_text='Token symbol or address; "" means USDC.')
    amount = DigitsField(max_digits=78, help_text="Base units, as a string of digits (a JSON integer is read as its "
                                                  "digits).")

    def validate_amount(self, value):
        # 78 digits also spell numbers above uint256, which no token amount (nor the escrow contract) can hold.
        if int(value) > MAX_AMOUNT:
            raise serializers.ValidationError("Too large.", code="too_large")
        return value


class MasumiPricing(StrictSerializer):
    pricingType = serializers.ChoiceField(choices=["Fixed", "Free"])
    Pricing = MasumiPrice(many=True, required=False, max_length=1)


class MasumiWallet(serializers.Serializer):
    walletVkey = serializers.CharField()
    walletAddress = serializers.CharField()


class RegistryRegisterSerializer(StrictSerializer):
    network = _network_field()
    sellingWalletVkey = AddressSerializerField(help_text="The seller agent's wallet address.")
    Tags = TagListField()
    name = serializers.CharField(max_length=250)
    apiBaseUrl = serializers.URLField(max_length=250)
    description = serializers.CharField(max_length=250)
    ExampleOutputs = MasumiExampleOutput(many=True, required=False, max_length=20)
    Author = MasumiAuthor()
    Legal = MasumiLegal(required=False)
    Capability = MasumiCapability()
    AgentPricing = MasumiPricing()
    requestsPerHour = serializers.CharField(max_length=30, required=False, allow_blank=True, allow_null=True,
                                            help_text="masumi-crewai sends it; accepted and not enforced (the "
                                                      "marketplace's own rate limits apply).")
    masumiProtocolVersion = serializers.ChoiceField(
        choices=MasumiProtocolVersion.choices, default=MasumiProtocolVersion.PURCHASER_ID,
        help_text="The MIP-003 the agent's /start_job speaks; agents built with the masumi library speak 2.")

    def validate_apiBaseUrl(self, value):
        return http_base_url(value)

    def validate_AgentPricing(self, value):
        prices = value.get("Pricing") or []
        if value["pricingType"] == "Fixed" and not prices:
            raise serializers.ValidationError("Fixed pricing needs one Pricing entry.", code="missing_price")
        if prices and prices[0]["unit"] not in ("", *settings.SUPPORTED_TOKENS):
            raise serializers.ValidationError("Unsupported pricing unit.", code="unsupported_token")
        return value


class RegistryDeregisterSerializer(StrictSerializer):
    agentIdentifier = serializers.UUIDField(help_text="The `agentIdentifier` (= `id`) of the registration.")
    network = _network_field()
    smartContractAddress = serializers.CharField(max_length=250, required=False, allow_blank=True)


class RegistryListQuery(StrictSerializer):
    network = _network_field()
    walletVKey = AddressSerializerField(required=False, help_text="Only this seller wallet's registrations (your "
                                                                  "own: your agent's wallet address).")
    cursorId = serializers.UUIDField(required=False, help_text="Id of the last asset of the previous page.")
    limit = StrictIntegerField(required=False, min_value=1, max_value=MAX_LIMIT, default=10)


class MasumiAsset(serializers.Serializer):
    error = serializers.CharField(allow_null=True)
    id = serializers.CharField()
    agentIdentifier = serializers.CharField()
    name = serializers.CharField()
    description = serializers.CharField()
    apiBaseUrl = serializers.CharField(help_text=(
        "A masumi service's own URL (call /start_job there), and your own services' upstream; another seller's "
        "proxied service's entry in this marketplace (/agents/services/{id}: its upstream is shown to its seller "
        "only)."))
    state = serializers.ChoiceField(choices=list(_STATES.values()))
    Tags = serializers.ListField(child=serializers.CharField())
    Capability = MasumiCapability()
    Author = MasumiAuthor()
    Legal = MasumiLegal()
    ExampleOutputs = MasumiExampleOutput(many=True)
    AgentPricing = MasumiPricing()
    SmartContractWallet = MasumiWallet()
    CurrentTransaction = serializers.JSONField(allow_null=True)
    createdAt = serializers.DateTimeField()
    updatedAt = serializers.DateTimeField()
    lastCheckedAt = serializers.DateTimeField(allow_null=True)


def _envelope(name: str, data_serializer) -> type[serializers.Serializer]:
    return type(name, (serializers.Serializer,), {"status": serializers.ChoiceField(choices=["success"]),
                                                  "data": data_serializer})


AssetListEnvelope = _envelope("MasumiAssetListEnvelope", type(
    "MasumiAssetList", (serializers.Serializer,), {"Assets": MasumiAsset(many=True)})())
AssetEnvelope = _envelope("MasumiAssetEnvelope", MasumiAsset())


def _api_base_url(service: Service, *, viewer, request) -> str:
    """Where the service is called: a masumi service's upstream (its buyers call /start_job there) or the viewer's own
    service's. A proxied service's upstream is where the metered proxy forwards paid calls, shown to its seller only
    (as /agents/services and search do); others are given its entry in this marketplace."""
    if service.seller_id == viewer.pk:
        return service.upstream_base_url
    if service.upstream_protocol == UpstreamProtocol.MASUMI:
        return url_credentials.without_credentials(service.upstream_base_url)  # saved before they were refused
    return request.build_absolute_uri(f"/agents/services/{service.pk}")


def asset(service: Service, *, viewer, request) -> dict:
    author = service.author or {}
    legal = service.legal or {}
    return {
        "error": None,
        "id": str(service.pk),
        "agentIdentifier": str(service.pk),
        "name": service.name,
        "description": service.description,
        "apiBaseUrl": _api_base_url(service, viewer=viewer, request=request),
        "state": _STATES[ServiceState(service.state)],
        "Tags": [tag.name for tag in service.tags.all()],
        "Capability": {"name": service.capability_name, "version": service.capability_version},
        "Author": {"name": author.get("name", ""), "contactEmail": author.get("contact_email"),
                   "contactOther": author.get("contact_other"), "organization": author.get("organization")},
        "Legal": {"privacyPolicy": legal.get("privacy_policy"), "terms": legal.get("terms"),
                  "other": legal.get("other")},
        "ExampleOutputs": [{"name": o["name"], "url": o["url"], "mimeType": o["mime_type"]}
                           for o in service.example_outputs],
        "AgentPricing": {"pricingType": "Fixed" if service.unit_price else "Free",
                         "Pricing": [{"unit": service.token, "amount": str(service.unit_price)}]},
        "SmartContractWallet": {"walletVkey": service.seller.wallet_address,
                                "walletAddress": service.seller.wallet_address},
        "CurrentTransaction": None,
        "createdAt": _timestamp(service.created_at),
        "updatedAt": _timestamp(service.updated_at),
        "lastCheckedAt": _timestamp(service.availability_checked_at),
    }


def _catalog_data(body: dict) -> dict:
    """A Masumi registration as the catalog's own service data."""
    author, legal = body["Author"], body.get("Legal") or {}
    prices = body["AgentPricing"].get("Pricing") or [{"unit": "", "amount": "0"}]
    free = body["AgentPricing"]["pricingType"] == "Free"
    return {
        "name": body["name"],
        "description": body["description"],
        "tags": body["Tags"],
        "capability": dict(body["Capability"]),
        "author": {k: v for k, v in {"name": author["name"], "organization": author.get("organization"),
                                     "contact_email": author.get("contactEmail"),
                                     "contact_other": author.get("contactOther") or author.get("contact")}.items()
                   if v},
        "legal": {k: v for k, v in {"privacy_policy": legal.get("privacyPolicy"), "terms": legal.get("terms"),
                                    "other": legal.get("other")}.items() if v},
        "example_outputs": [{"name": o["name"], "url": o["url"], "mime_type": o["mimeType"]}
                            for o in body.get("ExampleOutputs", [])],
        "pricing": {"type": PricingType.PER_CALL, "unit_name": "call",
                    "unit_price_atomic": 0 if free else int(prices[0]["amount"]),
                    "token": prices[0]["unit"] or "USDC"},
        "upstream_base_url": body["apiBaseUrl"],
        "upstream_protocol": "masumi",
        "masumi_protocol_version": body["masumiProtocolVersion"],
    }


REGISTER_EXAMPLE = OpenApiExample("register", request_only=True, value={
    "network": "Preprod", "sellingWalletVkey": "0x70997970C51812dc3A010C7d01b50e0d17dc79C8",
    "Tags": ["tag1", "tag2"], "name": "Agent Name", "description": "Agent Description",
    "apiBaseUrl": "https://api.example.com",
    "Author": {"name": "Author Name", "contactEmail": "author@example.com", "organization": "Author Organization"},
    "Legal": {"privacyPolicy": "Privacy Policy URL", "terms": "Terms of Service URL"},
    "Capability": {"name": "Capability Name", "version": "1.0.0"},
    "ExampleOutputs": [{"name": "example_output_name", "url": "https://example.com/example_output",
                        "mimeType": "application/json"}],
    "AgentPricing": {"pricingType": "Fixed", "Pricing": [{"unit": "", "amount": "10000000"}]},
})


class RegistryView(APIView):
    def get_permissions(self):
        # Writes take `pay`, as /agents/services' (registering, changing and deregistering a listing alike).
        scope = KeyScope.READ if self.request.method == "GET" else KeyScope.PAY
        return [agent_scope(scope)()]

    @extend_schema(operation_id="masumi_registry_list",
                   summary="Masumi: every agent registered on the network (the caller's own with walletVKey)",
                   parameters=[RegistryListQuery], tags=["masumi registry"],
                   responses={200: AssetListEnvelope, **error_responses()})
    def get(self, request):
        query = RegistryListQuery(data=request.query_params)
        query.is_valid(raise_exception=True)
        _check_network(query.validated_data["network"])
        viewer = calling_agent(request)
        services_qs = selectors.registry_services(viewer=viewer, seller_wallet=query.validated_data.get("walletVKey"))
        cursor_id = query.validated_data.get("cursorId")
        if cursor_id is not None:
            services_qs = services_qs.filter(pk__gt=cursor_id)
        rows, _ = paginate(services_qs, ordering=["id"], cursor=None, limit=query.validated_data["limit"])
        return Response({"status": "success",
                         "data": {"Assets": [asset(s, viewer=viewer, request=request) for s in rows]}})

    @extend_schema(operation_id="masumi_registry_register", summary="Masumi: register an agentic service",
                   request=RegistryRegisterSerializer, examples=[REGISTER_EXAMPLE], tags=["masumi registry"],
                   responses={200: AssetEnvelope, **error_responses(409, 422)})
    @idempotent()  # as POST /agents/services: a retried registration must not list the service twice
    def post(self, request):
        body = RegistryRegisterSerializer(data=request.data)
        body.is_valid(raise_exception=True)
        _check_network(body.validated_data["network"])
        agent = calling_agent(request)
        if body.validated_data["sellingWalletVkey"] != agent.wallet_address:
            raise InvalidInput("sellingWalletVkey must be the calling agent's wallet address.",
                               code="wallet_mismatch")
        if agent.wallet_proven_at is None:  # Masumi names a seller by its wallet: only one proven its
            raise Forbidden("Your agent's wallet is unproven: Masumi names a seller by its wallet, so only an agent "
                            "created with its wallet's proof (POST /agents, wallet_proof) or proven since (POST "
                            "/agents/{id}/wallet-proof) registers here.",
                            code="wallet_unproven")
        service = services.service_register(seller=agent, data=_catalog_data(body.validated_data))
        service = selectors.service_shown(service_id=service.pk, viewer=agent)
        return Response({"status": "success", "data": asset(service, viewer=agent, request=request)})

    @extend_schema(operation_id="masumi_registry_deregister", summary="Masumi: deregister an agentic service",
                   request=RegistryDeregisterSerializer, tags=["masumi registry"],
                   responses={200: AssetEnvelope, **error_responses(404)})
    def delete(self, request):
        body = RegistryDeregisterSerializer(data=request.data)
        body.is_valid(raise_exception=True)
        _check_network(body.validated_data["network"])
        agent = calling_agent(request)
        service = selectors.service_shown(service_id=body.validated_data["agentIdentifier"], viewer=agent)
        services.service_deregister(service=service, actor=agent)
        return Response({"status": "success",
                         "data": asset(selectors.service_shown(service_id=service.pk, viewer=agent), viewer=agent,
                                       request=request)})
