from django.conf import settings
from rest_framework import serializers

from agreements.models import AgreementEvent, AgreementStatus, SettlementModel
from catalog.serializers import AgentSummarySerializer
from marketplace.pagination import PageQuerySerializer
from marketplace.serializers import AddressSerializerField, AtomicAmountField, StrictSerializer


class ProposalSerializer(StrictSerializer):
    service_id = serializers.UUIDField()
    settlement_model = serializers.ChoiceField(choices=SettlementModel.choices, default=SettlementModel.ESCROW)
    quantity = serializers.IntegerField(min_value=1, max_value=10**18,
                                        help_text="Units bought; the deposit is quantity × unit price.")
    token = serializers.CharField(max_length=16, required=False, help_text="Defaults to the service's token.")
    buyer_wallet_address = AddressSerializerField(required=False,
                                                  help_text="Wallet that funds the escrow; the agent's by default.")
    expires_at = serializers.DateTimeField(required=False, help_text="When the agreement ends.")
    challenge_window_seconds = serializers.IntegerField(
        required=False, min_value=settings.CHALLENGE_WINDOW_MIN, max_value=settings.CHALLENGE_WINDOW_MAX
    )
    note = serializers.CharField(max_length=1000, required=False, allow_blank=True, default="")


class ReasonSerializer(StrictSerializer):
    reason = serializers.CharField(max_length=500, required=False, allow_blank=True, default="")


class AgreementListQuery(StrictSerializer, PageQuerySerializer):
    status = serializers.ChoiceField(choices=AgreementStatus.choices, required=False)
    role = serializers.ChoiceField(choices=["buyer", "seller"], required=False)


class ServiceRefSerializer(serializers.Serializer):
    id = serializers.UUIDField()
    name = serializers.CharField()


class ApprovalRefSerializer(serializers.Serializer):
    id = serializers.UUIDField()
    status = serializers.CharField()
    expires_at = serializers.DateTimeField()


class AgreementSerializer(serializers.Serializer):
    id = serializers.UUIDField()
    onchain_id = serializers.CharField(help_text="bytes32 id of the agreement in the escrow contract.")
    status = serializers.ChoiceField(choices=AgreementStatus.choices)
    status_reason = serializers.CharField()
    settlement_model = serializers.ChoiceField(choices=SettlementModel.choices)
    buyer = AgentSummarySerializer()
    seller = AgentSummarySerializer()
    service = ServiceRefSerializer()
    pricing_type = serializers.CharField()
    unit_name = serializers.CharField()
    price_per_unit_atomic = AtomicAmountField(source="price_per_unit")
    quantity = serializers.IntegerField()
    deposit_amount_atomic = AtomicAmountField(source="deposit_amount",
                                              help_text="The agreement's max amount: quantity × unit price.")
    infra_fee_atomic = AtomicAmountField(source="infra_fee")
    token = serializers.CharField()
    token_address = serializers.CharField()
    chain_id = serializers.IntegerField()
    challenge_window_seconds = serializers.IntegerField()
    expires_at = serializers.DateTimeField()
    proposal_expires_at = serializers.DateTimeField()
    buyer_wallet_address = serializers.CharField()
    seller_wallet_address = serializers.CharField()
    fee_recipient = serializers.CharField()
    terms_hash = serializers.CharField()
    note = serializers.CharField()
    used_atomic = AtomicAmountField(source="used")
    reserved_atomic = AtomicAmountField(source="reserved")
    remaining_atomic = AtomicAmountField(source="remaining")
    approval = serializers.SerializerMethodField()
    activation_tx_hash = serializers.CharField(allow_blank=True)
    completion_requested_at = serializers.DateTimeField(allow_null=True)
    completion_reason = serializers.CharField(allow_blank=True)
    challenge_deadline = serializers.DateTimeField(allow_null=True)
    seller_payout_atomic = AtomicAmountField(source="seller_payout", allow_null=True)
    buyer_refund_atomic = AtomicAmountField(source="buyer_refund", allow_null=True)
    created_at = serializers.DateTimeField()
    accepted_at = serializers.DateTimeField(allow_null=True)
    closed_at = serializers.DateTimeField(allow_null=True)
    activated_at = serializers.DateTimeField(allow_null=True)
    settled_at = serializers.DateTimeField(allow_null=True)

    def get_approval(self, agreement) -> ApprovalRefSerializer(allow_null=True):
        approval = self.context.get("approvals", {}).get(agreement.pk)
        if approval is None:
            return None
        return {"id": approval.pk, "status": approval.status, "expires_at": approval.expires_at}


class AgreementEventSerializer(serializers.ModelSerializer):
    class Meta:
        model = AgreementEvent
        fields = ["id", "from_status", "to_status", "actor_kind", "actor_label", "reason", "data", "created_at"]


class PaymentRequirementsQuery(StrictSerializer):
    amount_cents = serializers.IntegerField(required=False, min_value=1, max_value=10**12)
    amount_atomic = AtomicAmountField(required=False, min_value=1)
    rail = serializers.ChoiceField(choices=["stablecoin"], default="stablecoin")

    def validate(self, attrs):
        if ("amount_cents" in attrs) == ("amount_atomic" in attrs):
            raise serializers.ValidationError("Give exactly one of amount_cents or amount_atomic.",
                                              code="amount_required")
        return attrs


class TokenInfoSerializer(serializers.Serializer):
    symbol = serializers.CharField()
    address = serializers.CharField()
    decimals = serializers.IntegerField()


class PaymentRequirementsSerializer(serializers.Serializer):
    rail = serializers.CharField()
    amount_atomic = AtomicAmountField()
    fee_atomic = AtomicAmountField()
    total_atomic = AtomicAmountField()
    amount_cents = serializers.IntegerField(allow_null=True)
    fee_cents = serializers.IntegerField(help_text="The fee in cents, rounded up.")
    token = TokenInfoSerializer()
    chain_id = serializers.IntegerField()
    network = serializers.CharField()
    fee_recipient = serializers.CharField()
    gas_wallet_address = serializers.CharField(help_text="The platform relayer that submits the buyer's signatures.")
    fee_schedule = serializers.DictField()


class WebhookCreateSerializer(StrictSerializer):
    url = serializers.URLField(max_length=500)
    event_types = serializers.ListField(child=serializers.ChoiceField(
        choices=[f"agreement.{s}" for s in AgreementStatus.values]), required=False, default=list, max_length=50)


class WebhookSerializer(serializers.Serializer):
    id = serializers.UUIDField()
    url = serializers.CharField()
    event_types = serializers.ListField(child=serializers.CharField())
    created_at = serializers.DateTimeField()


class WebhookCreatedSerializer(WebhookSerializer):
    secret = serializers.CharField(help_text="Signing secret; shown only in this response.")


class WebhookDeliverySerializer(serializers.Serializer):
    id = serializers.UUIDField()
    event_type = serializers.CharField()
    status = serializers.CharField()
    attempts = serializers.IntegerField()
    last_status_code = serializers.IntegerField(allow_null=True)
    last_error = serializers.CharField()
    next_attempt_at = serializers.DateTimeField()
    delivered_at = serializers.DateTimeField(allow_null=True)
    created_at = serializers.DateTimeField()
    payload = serializers.JSONField()


class UsageEventSerializer(serializers.Serializer):
    id = serializers.IntegerField()
    seq = serializers.IntegerField()
    source = serializers.CharField()
    units = serializers.IntegerField()
    cost_atomic = AtomicAmountField(source="cost")
    cumulative_atomic = AtomicAmountField(source="cumulative")
    usage_digest = serializers.CharField(help_text="keccak256(previous digest ‖ event hash); see sdk.receipts.")
    receipt_signature = serializers.CharField(
        allow_blank=True, help_text="EIP-712 UsageReceipt{agreementId, seq, cumulativeAmount, usageDigest} signed by "
                                    "the receipt signer; on every proxied call and the last event of a batch.")
    request_id = serializers.CharField()
    description = serializers.CharField(allow_blank=True)
    method = serializers.CharField(allow_blank=True)
    path = serializers.CharField(allow_blank=True)
    upstream_status = serializers.IntegerField(allow_null=True)
    latency_ms = serializers.IntegerField(allow_null=True)
    created_at = serializers.DateTimeField()


class UsageEntrySerializer(StrictSerializer):
    units = serializers.IntegerField(min_value=1, max_value=10**12)
    description = serializers.CharField(max_length=500, required=False, allow_blank=True, default="")


class RecordUsageSerializer(StrictSerializer):
    """One entry (`units`, `description`) or a batch (`events`, up to 100), all-or-nothing against the cap."""

    units = serializers.IntegerField(min_value=1, max_value=10**12, required=False)
    description = serializers.CharField(max_length=500, required=False, allow_blank=True, default="")
    events = UsageEntrySerializer(many=True, required=False, min_length=1, max_length=100)

    def validate(self, attrs):
        if ("units" in attrs) == ("events" in attrs):
            raise serializers.ValidationError("Give either units (one event) or events (a batch).",
                                              code="units_or_events")
        return attrs

    def entries(self) -> list[dict]:
        data = self.validated_data
        return data["events"] if "events" in data else [{"units": data["units"], "description": data["description"]}]


class RecordedUsageSerializer(serializers.Serializer):
    events = UsageEventSerializer(many=True)
    used_atomic = AtomicAmountField()
    remaining_atomic = AtomicAmountField()


class CompleteSerializer(StrictSerializer):
    reason = serializers.CharField(max_length=100, required=False, allow_blank=True, default="")
