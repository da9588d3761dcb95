from django.conf import settings
from rest_framework import serializers

from catalog.models import HANDLE_VALIDATOR
from marketplace.pagination import PageQuerySerializer
from marketplace.serializers import AtomicAmountField, StrictSerializer, TagListField
from policies import rules
from policies.models import ApprovalStatus

_LIMITS = {
    "max_per_agreement": "Largest commitment (max amount + fee) of one agreement.",
    "daily_cap": "Commitments in any rolling 24 hours.",
    "monthly_cap": "Commitments in any rolling 30 days.",
    "approval_threshold": "Commitments of at least this much wait for the owner's approval.",
}


def _limit_field(help_text: str):
    return AtomicAmountField(required=False, allow_null=True, help_text=f"{help_text} Null: none.")


class UnreadableRuleSerializer(serializers.Serializer):
    rule = serializers.ChoiceField(choices=rules.LIST_RULES)
    code = serializers.ChoiceField(choices=[rules.RULE_UNREADABLE])


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
                                           required=False, max_length=50)
    updated_at = serializers.DateTimeField(read_only=True, allow_null=True)
    unreadable_rules = UnreadableRuleSerializer(many=True, read_only=True)  # a GET's, sent back: ignored

    def to_internal_value(self, data):
        value = super().to_internal_value(data)
        for name in _LIMITS:
            if f"{name}_atomic" in value:
                value[name] = value.pop(f"{name}_atomic")
        for name in ("allowed_services", "blocked_services"):
            if name in value:
                value[name] = [str(service_id) for service_id in value[name]]
        return value


class PolicyShownSerializer(PolicySerializer):
    """The policy as its GET and PUT answer it. A list rule stored in a form the API does not write (one migration
    0005 could not rewrite, or written around the API since) is null and named in `unreadable_rules`: evaluation
    denies every purchase of the agent by it (403, `reason` `rule_unreadable`) until its owner sets it again. It was
    shown as stored, a number or a mapping where a list goes, as if it held."""

    def get_fields(self):
        fields = super().get_fields()
        for name in rules.LIST_RULES:
            fields[name].allow_null = True
            fields[name].help_text = "Null: stored in a form the API does not write (`unreadable_rules`)."
        return fields

    def to_representation(self, policy):
        if policy is None:
            return {**{f"{name}_atomic": None for name in _LIMITS}, **{name: [] for name in rules.LIST_RULES},
                    "updated_at": None, "unreadable_rules": []}
        unreadable = rules.rules_unreadable(policy)
        return {
            **{f"{name}_atomic": getattr(policy, name) for name in _LIMITS},
            **{name: None if name in unreadable else getattr(policy, name) for name in rules.LIST_RULES},
            "updated_at": policy.updated_at,
            "unreadable_rules": [{"rule": name, "code": rules.RULE_UNREADABLE} for name in unreadable],
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
