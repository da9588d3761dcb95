import copy
from collections.abc import Mapping

from django.conf import settings
from rest_framework import serializers

from catalog.models import (
    HANDLE_VALIDATOR,
    SKILL_NAME_VALIDATOR,
    Availability,
    KeyScope,
    MasumiProtocolVersion,
    PricingType,
    UpstreamProtocol,
)
from marketplace.pagination import PageQuerySerializer
from marketplace.serializers import AddressSerializerField, AtomicAmountField, StrictIntegerField, StrictSerializer

# --- agents and keys -----------------------------------------------------------------------------------------


class AgentCreateSerializer(StrictSerializer):
    handle = serializers.CharField(max_length=64, validators=[HANDLE_VALIDATOR])
    display_name = serializers.CharField(max_length=120)
    wallet_address = AddressSerializerField()
    roles = serializers.MultipleChoiceField(choices=["buyer", "seller"], allow_empty=False)


class AgentSerializer(serializers.Serializer):
    id = serializers.UUIDField()
    handle = serializers.CharField()
    display_name = serializers.CharField()
    wallet_address = serializers.CharField()
    roles = serializers.ListField(child=serializers.ChoiceField(choices=["buyer", "seller"]))
    is_active = serializers.BooleanField()
    created_at = serializers.DateTimeField()


class AgentSummarySerializer(serializers.Serializer):
    id = serializers.UUIDField()
    handle = serializers.CharField()
    display_name = serializers.CharField()
    wallet_address = serializers.CharField()


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


class ApiKeyIssuedSerializer(ApiKeySerializer):
    secret = serializers.CharField(help_text="The key itself. Shown only in this response; store it now.")


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
    timeout_seconds = StrictIntegerField(min_value=1, max_value=3600, required=False, default=60)

    def to_internal_value(self, data):
        value = super().to_internal_value(data)
        value["price"] = value.pop("price_atomic")
        return value


class TagListField(serializers.ListField):
    child = serializers.CharField(max_length=50)
    default_error_messages = {
        "min_length": "At least one tag is required.",
        "max_length": "At most 15 tags are allowed.",
    }

    def __init__(self, **kwargs):
        kwargs.setdefault("min_length", 1)
        kwargs.setdefault("max_length", 15)
        super().__init__(**kwargs)

    def to_internal_value(self, data):
        tags = super().to_internal_value(data)
        return list(dict.fromkeys(tag.strip().lower() for tag in tags))


def http_base_url(value: str) -> str:
    """An upstream the metered proxy can call: http(s) only (URLField also lets ftp through), no trailing slash."""
    if not value.lower().startswith(("http://", "https://")):
        raise serializers.ValidationError("Must be an http(s) URL.", code="invalid_url_scheme")
    return value.rstrip("/")


class ServiceWriteSerializer(StrictSerializer):
    name = serializers.CharField(max_length=250)
    description = serializers.CharField(max_length=5000, required=False, allow_blank=True, default="")
    tags = TagListField()
    capability = CapabilitySerializer()
    author = AuthorSerializer(required=False)
    legal = LegalSerializer(required=False)
    example_outputs = ExampleOutputSerializer(many=True, required=False, max_length=20)
    pricing = PricingSerializer()
    upstream_base_url = serializers.URLField(max_length=500)
    upstream_protocol = serializers.ChoiceField(choices=UpstreamProtocol.choices, default=UpstreamProtocol.HTTP)
    masumi_protocol_version = serializers.ChoiceField(
        choices=MasumiProtocolVersion.choices, default=MasumiProtocolVersion.SEED,
        help_text="`masumi` services: the MIP-003 its /start_job speaks.")
    skills = SkillSerializer(many=True, required=False, max_length=50)

    def validate_upstream_base_url(self, value):
        return http_base_url(value)

    def to_internal_value(self, data):
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
    created_at = serializers.DateTimeField()
    updated_at = serializers.DateTimeField()

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
    """What the listing seller sees: also where calls are forwarded."""

    upstream_base_url = serializers.CharField()
    proxy_secret = serializers.CharField(help_text="Verifies X-Marketplace-Signature on proxied calls.")


class ServiceSearchSerializer(StrictSerializer, PageQuerySerializer):
    q = serializers.CharField(
        max_length=500, required=False, allow_blank=True, default="",
        help_text=(
            "Free text over name, description, tags, capability and skills, in web-search syntax: every word must "
            'match (in any form: "translating" finds "translation"), `"a phrase"` in order, `-word` excluded, '
            "`a or b` either. A name match ranks above a tag or capability match, which ranks above a description "
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


class ServiceSearchResultSerializer(ServiceSerializer):
    relevance = serializers.FloatField(required=False, help_text="Present when searching by text.")
