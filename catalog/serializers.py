import copy
from collections.abc import Mapping

from django.conf import settings
from rest_framework import serializers

from catalog.models import (
    HANDLE_VALIDATOR,
    SKILL_NAME_VALIDATOR,
    SKILL_TIMEOUT_MAX_SECONDS,
    Availability,
    KeyScope,
    MasumiProtocolVersion,
    OwnerScope,
    PricingType,
    UpstreamProtocol,
)
from marketplace.pagination import PageQuerySerializer, page_serializer
from marketplace.serializers import (
    AddressSerializerField,
    AgentSummarySerializer,
    AtomicAmountField,
    CentsField,
    REPLAYED_SECRET_HELP,
    OverlapEndField,
    StrictBooleanField,
    StrictIntegerField,
    StrictSerializer,
    TagListField,
    cents_of,
    http_url,
    json_size_bounded,
)
from marketplace.tags import tag_normalise

# --- agents and keys -----------------------------------------------------------------------------------------


class WalletProofSerializer(StrictSerializer):
    signature = serializers.RegexField(r"\A0x[0-9a-fA-F]{130}\Z", help_text=(
        "The wallet's EIP-712 signature (65 bytes, 0x-hex) of `WalletProof {handle, wallet, ownerId, expiresAt}` in "
        "the domain `{name, version: \"2\", chainId, verifyingContract: <this deployment's escrow contract>}` (the "
        "Python SDK's `sign_wallet_proof`; another deployment's proof is 400 `wallet_proof_mismatch`); a request without "
        "`wallet_proof` is 400 `wallet_proof_required` whose `details.typed_data` is the message to sign."))
    expires_at = StrictIntegerField(min_value=0, help_text="`expiresAt` as signed: unix seconds, at most a day away.")


class AgentCreateSerializer(StrictSerializer):
    handle = serializers.CharField(max_length=64, validators=[HANDLE_VALIDATOR])
    display_name = serializers.CharField(max_length=120)
    wallet_address = AddressSerializerField()
    wallet_proof = WalletProofSerializer(required=False, help_text=(
        "The wallet's proof that it is this agent's: required (400 `wallet_proof_required` without it); a wallet "
        "another owner's active agent proved is 409 `wallet_taken`."))
    roles = serializers.MultipleChoiceField(choices=["buyer", "seller"], allow_empty=False)


class AgentWalletProveSerializer(StrictSerializer):
    wallet_proof = WalletProofSerializer(required=False, help_text=(
        "The wallet's proof that it is this agent's (its handle, its wallet, its owner): 400 "
        "`wallet_proof_required` without it, whose `details.typed_data` is the message to sign."))


class AgentSerializer(serializers.Serializer):
    id = serializers.UUIDField()
    handle = serializers.CharField()
    display_name = serializers.CharField()
    wallet_address = serializers.CharField()
    wallet_proven_at = serializers.DateTimeField(allow_null=True, help_text=(
        "When the wallet signed that it is this agent's; null for an agent from before proofs were asked for, which "
        "nothing finds by its wallet (the registry's `walletVKey`) and which cannot register through `/registry`."))
    roles = serializers.ListField(child=serializers.ChoiceField(choices=["buyer", "seller"]))
    is_active = serializers.BooleanField()
    created_at = serializers.DateTimeField()


class ApiKeyCreateSerializer(StrictSerializer):
    name = serializers.CharField(max_length=100, required=False, default="")
    scope = serializers.ChoiceField(choices=KeyScope.choices, default=KeyScope.PAY)
    expires_at = serializers.DateTimeField(required=False, allow_null=True, default=None)


class ApiKeySerializer(serializers.Serializer):
    id = serializers.IntegerField()
    name = serializers.CharField()
    prefix = serializers.CharField()
    scopes = serializers.ListField(child=serializers.CharField())
    created_at = serializers.DateTimeField()
    expires_at = serializers.DateTimeField(allow_null=True)
    revoked_at = serializers.DateTimeField(allow_null=True)
    last_used_at = serializers.DateTimeField(allow_null=True)
    issued_with = serializers.IntegerField(allow_null=True, help_text=(
        "The id of the owner token this was issued with: revoking that token revoked, or revokes, this too. Null "
        "when an operator issued it (or an admin session), or it was issued before issuers were recorded."))


class ApiKeyListQuery(PageQuerySerializer, StrictSerializer):
    include_revoked = serializers.ChoiceField(choices=["true", "false"], required=False, default="false",
                                              help_text="`true` lists revoked keys too (newest first with the "
                                                        "others); by default only unrevoked ones.")


ApiKeyPageSerializer = page_serializer(ApiKeySerializer, "ApiKeyPage")


def _issued_secret_field(what: str) -> serializers.CharField:
    return serializers.CharField(allow_null=True, help_text=(
        f"The {what} itself, shown once: store it now. Null on an idempotent replay of this request (the platform "
        f"keeps only its digest; header `Idempotent-Secret-Withheld: not_kept`)."))


class ApiKeyIssuedSerializer(ApiKeySerializer):
    secret = _issued_secret_field("key")


class OwnerTokenCreateSerializer(StrictSerializer):
    name = serializers.CharField(max_length=100, required=False, default="")
    scope = serializers.ChoiceField(choices=OwnerScope.choices, default=OwnerScope.READ, help_text=(
        "`read` sees agents, keys, policies and approvals; `approve` also decides held purchases; `admin` also "
        "changes them (agents, keys, policies, webhooks, owner tokens). Least power by default."))
    expires_at = serializers.DateTimeField(required=False, allow_null=True, default=None, help_text=(
        "No later than the issuing token's expiry (400 `expiry_beyond_issuer`); left out, that expiry (a token "
        "without one issues tokens that never expire)."))


class CredentialRevokeSerializer(StrictSerializer):
    keep_issued = StrictBooleanField(required=False, default=False, help_text=(
        "A retirement, not a leak: revoke this credential alone; what was issued or created with it (owner tokens, "
        "agent API keys, webhook subscriptions) lives on. Left out: they are revoked, or paused, with it."))


class OwnerTokenSerializer(ApiKeySerializer):
    """An owner token as its owner sees it: the same fields as an agent's API key, with the owner's scopes."""

    is_this_token = serializers.BooleanField(help_text="Whether this is the token the request was made with.")


class OwnerTokenIssuedSerializer(OwnerTokenSerializer):
    secret = _issued_secret_field("token")


OwnerTokenPageSerializer = page_serializer(OwnerTokenSerializer, "OwnerTokenPage")


# --- services ------------------------------------------------------------------------------------------------


class CapabilitySerializer(StrictSerializer):
    name = serializers.CharField(max_length=250)
    version = serializers.CharField(max_length=100)


class AuthorSerializer(StrictSerializer):
    name = serializers.CharField(max_length=250)
    organization = serializers.CharField(max_length=250, required=False, allow_blank=True)
    contact_email = serializers.EmailField(max_length=250, required=False, allow_blank=True)
    contact_other = serializers.CharField(max_length=250, required=False, allow_blank=True)


class LegalSerializer(StrictSerializer):
    privacy_policy = serializers.CharField(max_length=500, required=False, allow_blank=True)
    terms = serializers.CharField(max_length=500, required=False, allow_blank=True)
    other = serializers.CharField(max_length=500, required=False, allow_blank=True)


class ExampleOutputSerializer(StrictSerializer):
    name = serializers.CharField(max_length=250)
    url = serializers.URLField(max_length=500)
    mime_type = serializers.CharField(max_length=100)


class PricingSerializer(StrictSerializer):
    type = serializers.ChoiceField(choices=PricingType.choices)
    unit_name = serializers.CharField(max_length=50, required=False,
                                      help_text="What one unit is (`call`, `token`, `page`…).")
    unit_price_atomic = AtomicAmountField(help_text="Price of one unit in token base units.")
    token = serializers.CharField(max_length=16, default="USDC")

    def validate_token(self, value):
        if value not in settings.SUPPORTED_TOKENS:
            raise serializers.ValidationError(
                f"Unsupported token; supported: {', '.join(settings.SUPPORTED_TOKENS)}.", code="unsupported_token"
            )
        return value


class SkillSerializer(StrictSerializer):
    name = serializers.CharField(max_length=64, validators=[SKILL_NAME_VALIDATOR])
    description = serializers.CharField(max_length=500, required=False, allow_blank=True, default="")
    price_atomic = AtomicAmountField(required=False, allow_null=True, default=None,
                                     help_text="Price of one invocation; the service's unit price when absent.")
    # Blank is allowed by allow_blank; the pattern matches only non-blank paths, so the documented
    # "pattern or blank" alternatives never both match.
    path = serializers.RegexField(r"^(/[A-Za-z0-9._~!$&'()*+,;=:@%-]*)+$", max_length=200, required=False,
                                  allow_blank=True, default="")
    is_async = serializers.BooleanField(required=False, default=False)
    timeout_seconds = StrictIntegerField(min_value=1, max_value=SKILL_TIMEOUT_MAX_SECONDS, required=False,
                                         default=60)

    def to_internal_value(self, data):
        value = super().to_internal_value(data)
        value["price"] = value.pop("price_atomic")
        return value


def http_base_url(value: str) -> str:
    """An upstream the metered proxy can call: http(s) only, no trailing slash; no query or fragment, which the
    paths called under it (a buyer's, a skill's, /start_job) are appended to, and would end up in."""
    if "?" in http_url(value) or "#" in value:  # unescaped, each begins the query or the fragment
        raise serializers.ValidationError("A base URL has no query or fragment: paths are appended to it.",
                                          code="invalid_base_url")
    return value.rstrip("/")


def _alias(data: dict, sdk_name: str, name: str, convert=lambda value: value) -> None:
    """Move the Pægents SDK's `sdk_name` onto our `name`; both at once is ambiguous."""
    if sdk_name not in data:
        return
    if name in data:
        raise serializers.ValidationError({sdk_name: [serializers.ErrorDetail(
            f"Give either {sdk_name} or {name}, not both.", code="duplicate_field")]})
    data[name] = convert(data.pop(sdk_name))


PAEGENTS_PRICE_MODELS = {"per_unit": PricingType.PER_UNIT, "per_call": PricingType.PER_CALL}


def _free_form_bounded(value: dict) -> dict:
    """A free-form field is shown as given in every search result: at most SERVICE_FREE_FORM_MAX_BYTES of JSON."""
    return json_size_bounded(value, limit=settings.SERVICE_FREE_FORM_MAX_BYTES)


class ServiceWriteSerializer(StrictSerializer):
    """Our fields, or the Pægents SDK's (`service_name`, `category`, `price_model`, `base_price_cents`, `unit`,
    `api_base_url`): both name the same things, and either may be given (not both for one thing)."""

    name = serializers.CharField(max_length=250)
    description = serializers.CharField(max_length=5000, required=False, allow_blank=True, default="")
    tags = TagListField()
    capability = CapabilitySerializer()
    author = AuthorSerializer(required=False)
    legal = LegalSerializer(required=False)
    example_outputs = ExampleOutputSerializer(many=True, required=False, max_length=20)
    pricing = PricingSerializer(required=False, help_text="Required unless price_model and base_price_cents are given.")
    upstream_base_url = serializers.URLField(max_length=500)
    upstream_protocol = serializers.ChoiceField(choices=UpstreamProtocol.choices, default=UpstreamProtocol.HTTP)
    masumi_protocol_version = serializers.ChoiceField(
        choices=MasumiProtocolVersion.choices, default=MasumiProtocolVersion.SEED,
        help_text="`masumi` services: the MIP-003 its /start_job speaks.")
    skills = SkillSerializer(many=True, required=False, max_length=50)
    category = serializers.CharField(max_length=50, required=False, allow_blank=True,
                                     help_text="Also added to the tags, so search by tag finds it.")
    min_quantity = StrictIntegerField(min_value=1, max_value=10**18, required=False,
                                            help_text="Fewest units one agreement may buy (default 1).")
    max_quantity = StrictIntegerField(min_value=1, max_value=10**18, required=False, allow_null=True,
                                            help_text="Most units one agreement may buy; null: no limit.")
    capabilities = serializers.DictField(required=False, help_text="Free-form, shown as given.")
    metadata = serializers.DictField(required=False, help_text="Free-form, shown as given.")
    api_auth_header = serializers.CharField(
        max_length=100, required=False, write_only=True,
        help_text="Accepted and ignored (the Pægents SDK always sends it): the marketplace never forwards a stored "
                  "seller key; it signs every proxied call with X-Marketplace-Signature (see `proxy_secret`).")
    price_model = serializers.ChoiceField(choices=["per_unit", "per_call", "subscription", "tiered"], required=False,
                                          write_only=True, help_text="Pægents' name for `pricing.type`.")
    base_price_cents = CentsField(required=False, write_only=True,
                                  help_text="Pægents' unit price in cents (1 cent = 10000 base units).")
    unit = serializers.CharField(max_length=50, required=False, write_only=True,
                                 help_text="Pægents' name for `pricing.unit_name`.")

    def validate_upstream_base_url(self, value):
        return http_base_url(value)

    def validate_capabilities(self, value):
        return _free_form_bounded(value)

    def validate_metadata(self, value):
        return _free_form_bounded(value)

    def validate_price_model(self, value):
        if value not in PAEGENTS_PRICE_MODELS:
            raise serializers.ValidationError(f"{value} pricing is not offered; use per_unit or per_call.",
                                              code="unsupported_price_model")
        return PAEGENTS_PRICE_MODELS[value]

    def _from_paegents(self, data: dict) -> dict:
        data = dict(data)
        _alias(data, "service_name", "name")
        _alias(data, "api_base_url", "upstream_base_url")
        if "api_key" in data:
            raise serializers.ValidationError({"api_key": [serializers.ErrorDetail(
                "The marketplace does not store sellers' upstream keys: verify X-Marketplace-Signature with the "
                "service's proxy_secret instead.", code="upstream_api_key_unsupported")]})
        category = data.get("category")
        # At registration a category is also the tag (and capability) Pægents services have no other way to give.
        if not self.partial and isinstance(category, str) and category.strip():
            if "tags" not in data:
                data["tags"] = [category]
            if "capability" not in data:
                data["capability"] = {"name": category, "version": "1"}
        return data

    def validate(self, attrs):
        attrs = super().validate(attrs)
        price_fields = {"price_model", "base_price_cents", "unit"} & set(attrs)
        if price_fields and "pricing" in attrs:
            raise serializers.ValidationError({"pricing": [serializers.ErrorDetail(
                "Give either pricing or price_model/base_price_cents/unit, not both.", code="duplicate_field")]})
        if not self.partial and "pricing" not in attrs:
            missing = [name for name in ("price_model", "base_price_cents") if name not in attrs]
            if missing:
                raise serializers.ValidationError({"pricing": [serializers.ErrorDetail(
                    "Required (or price_model and base_price_cents).", code="required")]})
        if attrs.get("category"):
            try:  # it becomes a tag (catalog.services): the tags' checks
                TagListField().to_internal_value([attrs["category"]])
            except serializers.ValidationError as error:
                raise serializers.ValidationError({"category": error.detail}) from None
        attrs.pop("api_auth_header", None)
        low, high = attrs.get("min_quantity"), attrs.get("max_quantity")
        if low is not None and high is not None and high < low:
            raise serializers.ValidationError({"max_quantity": [serializers.ErrorDetail(
                "Must be at least min_quantity.", code="invalid_quantity_bounds")]})
        return attrs

    def to_internal_value(self, data):
        if isinstance(data, Mapping):
            data = self._from_paegents(data)
        if not self.partial or not isinstance(data, Mapping):
            return super().to_internal_value(data)
        # A PATCH replaces each field it gives whole, so nested objects are validated as complete ones (DRF would
        # let `partial` reach them and accept e.g. a pricing without its type).
        whole = {name: copy.deepcopy(field) for name, field in self.fields.items()
                 if isinstance(field, serializers.BaseSerializer) and name in data}
        value, errors = {}, {}
        try:
            value = super().to_internal_value({key: item for key, item in data.items() if key not in whole})
        except serializers.ValidationError as exc:
            errors.update(exc.detail)
        for name, field in whole.items():
            try:
                value[name] = field.run_validation(data[name])
            except serializers.ValidationError as exc:
                errors[name] = exc.detail
        if errors:
            raise serializers.ValidationError(errors)
        return value


class ServiceSerializer(serializers.Serializer):
    id = serializers.UUIDField()
    seller = AgentSummarySerializer()
    name = serializers.CharField()
    description = serializers.CharField()
    tags = serializers.SerializerMethodField()
    capability = serializers.SerializerMethodField()
    author = serializers.JSONField()
    legal = serializers.JSONField()
    example_outputs = serializers.JSONField()
    pricing = serializers.SerializerMethodField()
    upstream_protocol = serializers.CharField()
    masumi_protocol_version = serializers.ChoiceField(choices=MasumiProtocolVersion.choices)
    skills = serializers.SerializerMethodField()
    state = serializers.CharField()
    availability = serializers.ChoiceField(
        choices=Availability.choices,
        help_text="`masumi` services: what GET /availability last answered (unavailable ones are not in search).")
    availability_checked_at = serializers.DateTimeField(allow_null=True)
    category = serializers.CharField()
    min_quantity = serializers.IntegerField()
    max_quantity = serializers.IntegerField(allow_null=True)
    capabilities = serializers.JSONField()
    metadata = serializers.JSONField()
    created_at = serializers.DateTimeField()
    updated_at = serializers.DateTimeField()
    # The Pægents SDK's names for fields above (its ServiceDetails), kept beside ours.
    service_id = serializers.UUIDField(source="id", help_text="= id (Pægents' name).")
    agent_id = serializers.UUIDField(source="seller_id", help_text="= seller.id (Pægents' name).")
    service_name = serializers.CharField(source="name", help_text="= name (Pægents' name).")
    price_model = serializers.CharField(source="pricing_type", help_text="= pricing.type (Pægents' name).")
    unit = serializers.CharField(source="unit_name", help_text="= pricing.unit_name (Pægents' name).")
    base_price_cents = serializers.SerializerMethodField(
        help_text="pricing.unit_price_atomic in cents; null when it is not a whole number of cents.")
    is_active = serializers.SerializerMethodField(help_text="state is `registered`.")

    def get_base_price_cents(self, service) -> int | None:
        return cents_of(service.unit_price)

    def get_is_active(self, service) -> bool:
        return service.state == "registered"

    def get_tags(self, service) -> list[str]:
        return [tag.name for tag in service.tags.all()]

    def get_capability(self, service) -> CapabilitySerializer:
        return {"name": service.capability_name, "version": service.capability_version}

    def get_pricing(self, service) -> PricingSerializer:
        return {"type": service.pricing_type, "unit_name": service.unit_name,
                "unit_price_atomic": service.unit_price, "token": service.token}

    def get_skills(self, service) -> SkillSerializer(many=True):
        return [
            {"name": s.name, "description": s.description, "price_atomic": s.price, "path": s.path,
             "is_async": s.is_async, "timeout_seconds": s.timeout_seconds}
            for s in service.skills.all()
        ]


class OwnServiceSerializer(ServiceSerializer):
    """What the listing seller sees: also where calls are forwarded, and the proxy secret unless the context says
    `proxy_secret_shown: False` (a read key: the secret is a credential, rotated with the `pay` scope)."""

    upstream_base_url = serializers.CharField()
    proxy_secret = serializers.CharField(allow_null=True, help_text=(
        "Verifies X-Marketplace-Signature on proxied calls; null to a key with the `read` scope only."))
    previous_proxy_secret_expires_at = OverlapEndField(
        secret_field="proxy_secret",
        help_text="While a rotation's overlap runs, the replaced secret also signs proxied calls "
                  "(X-Marketplace-Signature-Previous) until then; null when none runs.")

    def to_representation(self, service):
        data = super().to_representation(service)
        if not self.context.get("proxy_secret_shown", True):
            data["proxy_secret"] = None
        return data


class ServiceRegisteredSerializer(OwnServiceSerializer):
    proxy_secret = serializers.CharField(allow_null=True, help_text=(
        "Verifies X-Marketplace-Signature on proxied calls (also read with GET /agents/services/{id} by a key with "
        "the `pay` scope)."
        + REPLAYED_SECRET_HELP))


class ProxySecretRotatedSerializer(serializers.Serializer):
    service_id = serializers.UUIDField(source="pk")
    proxy_secret = serializers.CharField(allow_null=True, help_text=(
        "The new proxy secret, signing proxied calls from now on (also read with GET /agents/services/{id} by a key "
        "with the `pay` scope)."
        + REPLAYED_SECRET_HELP))
    previous_proxy_secret_expires_at = OverlapEndField(
        secret_field="proxy_secret",
        help_text="Until then the replaced secret also signs proxied calls (X-Marketplace-Signature-Previous); null "
                  "when it stopped at once.")


class ServiceSearchSerializer(StrictSerializer, PageQuerySerializer):
    """Our filters, or the Pægents SDK's (`query`, `category`, `min_price`/`max_price` in cents, `offset`)."""

    q = serializers.CharField(
        max_length=500, required=False, allow_blank=True, default="",
        help_text=(
            "Free text over name, description, tags, capability and skills, in web-search syntax: every word must "
            'match (in any form: "translating" finds "translation"), `"a phrase"` in order, `-word` excluded, '
            "`a or b` either (more than 16 exclusion marks with no word between them: 400 `query_too_complex`). "
            "A name match ranks above a tag or capability match, which ranks above a description "
            "match. When nothing matches every word (a typo), services whose name is spelt alike are returned, "
            "ranked by similarity; a cursor from one kind of result is not valid for the other."
        ),
    )
    tags_all = TagListField(required=False, min_length=0, default=list, help_text="Services having every tag.")
    tags_any = TagListField(required=False, min_length=0, default=list, help_text="Services having any tag.")
    capability = serializers.CharField(max_length=250, required=False, allow_blank=True, default="")
    max_unit_price_atomic = AtomicAmountField(required=False, allow_null=True, default=None)
    seller = serializers.CharField(max_length=64, required=False, allow_blank=True, default="",
                                   help_text="Seller handle.")
    protocol = serializers.ChoiceField(choices=UpstreamProtocol.choices, required=False, allow_blank=True,
                                       default="")
    skill = serializers.CharField(max_length=64, required=False, allow_blank=True, default="")
    token = serializers.CharField(max_length=16, required=False, allow_blank=True, default="")
    pricing_type = serializers.ChoiceField(choices=PricingType.choices, required=False, allow_blank=True, default="")
    order_by = serializers.ChoiceField(choices=["relevance", "price", "newest"], required=False, allow_blank=True,
                                       default="")
    category = serializers.CharField(max_length=50, required=False, allow_blank=True,
                                     help_text="Services with this category (a tag).")
    min_price = CentsField(required=False, help_text="Lowest unit price, in cents.")
    max_price = CentsField(required=False, help_text="Highest unit price, in cents.")
    offset = StrictIntegerField(min_value=0, max_value=10_000, required=False,
                                      help_text="Page by offset instead of cursor: the answer then has `total`, "
                                                "`has_more` and `next_offset`.")

    def to_internal_value(self, data):
        if isinstance(data, Mapping):
            data = dict(data)
            _alias(data, "query", "q")
        value = super().to_internal_value(data)
        if "offset" in value and value.get("cursor"):
            raise serializers.ValidationError({"offset": [serializers.ErrorDetail(
                "Give either offset or cursor.", code="duplicate_field")]})
        category = tag_normalise(value.pop("category", ""))
        if category:
            value["tags_all"] = [*value["tags_all"], category]
        if "max_price" in value:
            if value["max_unit_price_atomic"] is not None:
                raise serializers.ValidationError({"max_price": [serializers.ErrorDetail(
                    "Give either max_price or max_unit_price_atomic.", code="duplicate_field")]})
            value["max_unit_price_atomic"] = value.pop("max_price")
        value["min_unit_price"] = value.pop("min_price", None)
        return value


class ServiceSearchResultSerializer(ServiceSerializer):
    relevance = serializers.FloatField(required=False, help_text=(
        "Present when searching by text, from 0 to 1: the mean of the query words' weights in the service (a name "
        "match weighs most, then tags, capability and skills, then the description). When no service matches every "
        "word, the results are names spelt alike, and this is how alike."))


class ServiceSearchPageSerializer(serializers.Serializer):
    results = ServiceSearchResultSerializer(many=True)
    next_cursor = serializers.CharField(allow_null=True, help_text="Pass as `cursor` for the next page.")
    total = serializers.IntegerField(required=False, help_text="Paging by offset: all matching services.")
    has_more = serializers.BooleanField(required=False, help_text="Paging by offset.")
    next_offset = serializers.IntegerField(required=False, allow_null=True, help_text="Paging by offset.")
    query = serializers.DictField(required=False, help_text="Paging by offset: the search as understood.")


class OwnServicesQuery(PageQuerySerializer, StrictSerializer):
    offset = StrictIntegerField(min_value=0, max_value=10_000, required=False,
                                      help_text="Page by offset (the Pægents SDK) instead of cursor.")


class OwnServicePageSerializer(serializers.Serializer):
    results = OwnServiceSerializer(many=True)
    services = OwnServiceSerializer(many=True, help_text="= results (the Pægents SDK's name).")
    next_cursor = serializers.CharField(allow_null=True, help_text="Pass as `cursor` for the next page.")
