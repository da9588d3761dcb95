from django.conf import settings
from rest_framework import serializers

from catalog.models import HANDLE_VALIDATOR
from marketplace.pagination import PageQuerySerializer
from marketplace.serializers import AtomicAmountField, StrictSerializer, TagListField
from policies.models import ApprovalStatus

_LIMITS = {
    "max_per_agreement": "Largest commitment (max amount + fee) of one agreement.",
    "daily_cap": "Commitments in any rolling 24 hours.",
    "monthly_cap": "Commitments in any rolling 30 days.",
    "approval_threshold": "Commitments of at least this much wait for the owner's approval.",
}


def _limit_field(help_text: str):
    return AtomicAmountField(required=False, allow_null=True, help_text=f"{help_text} Null: none.")


class PolicySerializer(StrictSerializer):
    """The policy. A PUT changes the fields it gives and keeps those it leaves out (null: no limit, []: no list), so
    a client that leaves a cap out never lifts it; a body giving none is 400 `empty_policy_update`."""

    max_per_agreement_atomic = _limit_field(_LIMITS["max_per_agreement"])
    daily_cap_atomic = _limit_field(_LIMITS["daily_cap"])
    monthly_cap_atomic = _limit_field(_LIMITS["monthly_cap"])
    approval_threshold_atomic = _limit_field(_LIMITS["approval_threshold"])
    allowed_sellers = serializers.ListField(child=serializers.CharField(max_length=64, validators=[HANDLE_VALIDATOR]),
                                           required=False, max_length=500)
    blocked_sellers = serializers.ListField(child=serializers.CharField(max_length=64, validators=[HANDLE_VALIDATOR]),
                                           required=False, max_length=500)
    allowed_services = serializers.ListField(child=serializers.UUIDField(format="hex_verbose"), required=False,
                                             max_length=500)
    blocked_services = serializers.ListField(child=serializers.UUIDField(format="hex_verbose"), required=False,
                                             max_length=500)
    allowed_tags = TagListField(required=False, min_length=0, max_length=500)
    blocked_tags = TagListField(required=False, min_length=0, max_length=500)
    allowed_tokens = serializers.ListField(child=serializers.ChoiceField(choices=settings.SUPPORTED_TOKENS),
                                           required=False)
    updated_at = serializers.DateTimeField(read_only=True, allow_null=True)

    def to_internal_value(self, data):
        value = super().to_internal_value(data)
        for name in _LIMITS:
            if f"{name}_atomic" in value:
                value[name] = value.pop(f"{name}_atomic")
        for name in ("allowed_services", "blocked_services"):
            if name in value:
                value[name] = [str(service_id) for service_id in value[name]]
        return value

    def to_representation(self, policy):
        if policy is None:
            return {**{f"{name}_atomic": None for name in _LIMITS},
                    **{name: [] for name in ("allowed_sellers", "blocked_sellers", "allowed_services",
                                             "blocked_services", "allowed_tags", "blocked_tags", "allowed_tokens")},
                    "updated_at": None}
        return {
            **{f"{name}_atomic": getattr(policy, name) for name in _LIMITS},
            **{name: getattr(policy, name) for name in ("allowed_sellers", "blocked_sellers", "allowed_services",
                                                        "blocked_services", "allowed_tags", "blocked_tags",
                                                        "allowed_tokens")},
            "updated_at": policy.updated_at,
        }


class ApprovalListQuery(StrictSerializer, PageQuerySerializer):
    status = serializers.ChoiceField(choices=ApprovalStatus.choices, required=False)


class DecisionSerializer(StrictSerializer):
    note = serializers.CharField(max_length=500, required=False, allow_blank=True, default="")


class DecisionQuery(StrictSerializer):
    reason = serializers.CharField(max_length=500, required=False, allow_blank=True, default="",
                                   help_text="The note, as the Pægents SDK sends a rejection's reason.")


class ApprovalSerializer(serializers.Serializer):
    id = serializers.UUIDField()
    subject_type = serializers.CharField()
    subject_id = serializers.UUIDField(help_text="The agreement waiting for the decision.")
    amount_atomic = AtomicAmountField(source="amount")
    rule = serializers.CharField()
    summary = serializers.JSONField()
    status = serializers.ChoiceField(choices=ApprovalStatus.choices)
    created_at = serializers.DateTimeField()
    expires_at = serializers.DateTimeField()
    decided_at = serializers.DateTimeField(allow_null=True)
    decision_note = serializers.CharField()
