from django.conf import settings
from rest_framework import serializers

from agreements.models import AgreementEvent, AgreementStatus, SettlementModel
from catalog.serializers import AgentSummarySerializer
from marketplace.chainconfig import receipt_signer_address
from marketplace.pagination import PageQuerySerializer
from marketplace.serializers import AddressSerializerField, AtomicAmountField, StrictIntegerField, StrictSerializer


class FeePermitSerializer(StrictSerializer):
    """The buyer's EIP-2612 permit of the fee to the platform relayer (`gas_wallet_address` of
    /payment-requirements), signed under USDC's domain."""

    value = AtomicAmountField(min_value=1)
    nonce = StrictIntegerField(min_value=0, help_text="The token's nonces(buyer).")
    deadline = StrictIntegerField(min_value=0, help_text="Unix time.")
    signature = serializers.RegexField(r"^0x[0-9a-fA-F]{130}$", help_text="65-byte r‖s‖v, 0x-hex.")


class ProposalSerializer(StrictSerializer):
    service_id = serializers.UUIDField()
    settlement_model = serializers.ChoiceField(choices=SettlementModel.choices, default=SettlementModel.ESCROW)
    quantity = StrictIntegerField(min_value=1, max_value=10**18,
                                  help_text="Units bought; the deposit is quantity × unit price.")
    token = serializers.CharField(max_length=16, required=False, help_text="Defaults to the service's token.")
    buyer_wallet_address = AddressSerializerField(required=False,
                                                  help_text="Wallet that funds the escrow; the agent's by default.")
    expires_at = serializers.DateTimeField(required=False, help_text="When the agreement ends.")
    challenge_window_seconds = StrictIntegerField(
        required=False, min_value=settings.CHALLENGE_WINDOW_MIN, max_value=settings.CHALLENGE_WINDOW_MAX
    )
    note = serializers.CharField(max_length=1000, required=False, allow_blank=True, default="")
    payment_header = serializers.CharField(
        max_length=8000, required=False,
        help_text="direct_payment only: the signed x402 payment (base64 JSON PaymentPayload, scheme exact): an EIP-3009 "
                  "transferWithAuthorization of quantity × unit price from the buyer's wallet to the seller's.")
    fee_permit = FeePermitSerializer(required=False, help_text="direct_payment only: the fee permit.")

    def validate(self, attrs):
        direct = attrs.get("settlement_model") == SettlementModel.DIRECT_PAYMENT
        for name in ("payment_header", "fee_permit"):
            if direct and name not in attrs:
                raise serializers.ValidationError({name: [serializers.ErrorDetail(
                    "Required for direct_payment.", code="required")]})
            if not direct and name in attrs:
                raise serializers.ValidationError({name: [serializers.ErrorDetail(
                    "Only for direct_payment.", code="direct_payment_only")]})
        return attrs


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
    fee_tx_hash = serializers.CharField(allow_blank=True, help_text="direct_payment: the fee's transfer.")
    payment_tx_hash = serializers.CharField(allow_blank=True, help_text="direct_payment: the x402 payment.")
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
    amount_cents = StrictIntegerField(required=False, min_value=1, max_value=10**12)
    amount_atomic = AtomicAmountField(required=False, min_value=1)
    rail = serializers.ChoiceField(choices=["stablecoin"], default="stablecoin")
    purpose = serializers.ChoiceField(
        choices=["direct_purchase", "skill_invocation"], default="direct_purchase",
        help_text="What the amount pays for: a direct purchase (the fee schedule's fee on top) or a skill "
                  "invocation (no platform fee: the seller is paid the whole price).")

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
    purpose = serializers.CharField()
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
    receipt_signer = serializers.SerializerMethodField(
        help_text="The address that signed the receipt, as the marketplace says; a buyer checks the receipt against "
                  "the escrow's on-chain receipt signer (sdk.receipts.verify_usage), never against this.")
    request_id = serializers.CharField()
    description = serializers.CharField(allow_blank=True)
    method = serializers.CharField(allow_blank=True)
    path = serializers.CharField(allow_blank=True)
    upstream_status = serializers.IntegerField(allow_null=True)
    latency_ms = serializers.IntegerField(allow_null=True)
    created_at = serializers.DateTimeField()


    def get_receipt_signer(self, event) -> str:
        return receipt_signer_address() if event.receipt_signature else ""


class UsageEntrySerializer(StrictSerializer):
    units = StrictIntegerField(min_value=1, max_value=10**12)
    description = serializers.CharField(max_length=500, required=False, allow_blank=True, default="")


class RecordUsageSerializer(StrictSerializer):
    """One entry (`units`, `description`) or a batch (`events`, up to 100), all-or-nothing against the cap."""

    units = StrictIntegerField(min_value=1, max_value=10**12, required=False)
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


class InvokeSerializer(StrictSerializer):
    input = serializers.DictField(help_text="Passed to the seller's skill as is.")


class InvocationPaymentSerializer(serializers.Serializer):
    amount = serializers.CharField(help_text="In USDC, as the Services API shows it (\"0.02\").")
    amount_atomic = AtomicAmountField()
    currency = serializers.CharField()
    tx_hash = serializers.CharField(allow_blank=True, help_text="The buyer's payment to the platform treasury.")
    status = serializers.CharField(help_text="authorized, held, payment_failed, paying_out, paid_out, refunding, "
                                             "refunded.")
    settlement_tx_hash = serializers.CharField(allow_blank=True,
                                               help_text="The payout to the seller, or the refund to the buyer.")


class InvocationResultSerializer(serializers.Serializer):
    invocation_id = serializers.CharField(help_text="GET /services/{invocation_id} shows where the payment went.")
    result = serializers.JSONField(help_text="The seller's answer.")
    payment = InvocationPaymentSerializer()


class InvocationAcceptedSerializer(serializers.Serializer):
    invocation_id = serializers.CharField()
    status = serializers.CharField()
    estimated_completion = serializers.DateTimeField(allow_null=True)


class InvocationSerializer(serializers.Serializer):
    invocation_id = serializers.CharField(source="public_id")
    agent = serializers.CharField(source="seller.handle")
    skill = serializers.CharField(source="skill.name")
    status = serializers.CharField(help_text="pending, processing, completed, failed, timeout.")
    result = serializers.JSONField(allow_null=True)
    error = serializers.CharField(allow_blank=True)
    payment = serializers.SerializerMethodField()
    created_at = serializers.DateTimeField()
    started_at = serializers.DateTimeField(allow_null=True)
    completed_at = serializers.DateTimeField(allow_null=True)
    estimated_completion = serializers.DateTimeField(source="deadline_at", allow_null=True)

    def get_payment(self, invocation) -> InvocationPaymentSerializer:
        return invocation_payment(invocation)


def invocation_payment(invocation) -> dict:
    from x402.mechanisms.evm.utils import format_amount

    return {"amount": format_amount(invocation.amount, 6), "amount_atomic": invocation.amount, "currency": "USDC",
            "tx_hash": invocation.payment_tx_hash, "status": invocation.money,
            "settlement_tx_hash": invocation.settlement_tx_hash}


class X402PaymentRequiredSerializer(serializers.Serializer):
    """x402's 402 body (`PaymentRequired`), with `error` in the marketplace's error shape; the same requirements
    are in the PAYMENT-REQUIRED header (base64 JSON, x402 v2) and the X-Payment-* headers."""

    x402Version = serializers.IntegerField()
    accepts = serializers.ListField(child=serializers.DictField(),
                                    help_text="x402 PaymentRequirements: scheme exact, network (CAIP-2), asset, "
                                              "amount (base units), payTo, maxTimeoutSeconds, extra.")
    resource = serializers.DictField()
    error = serializers.DictField(help_text="{code, message, details}: `payment_required` when no payment was sent, "
                                            "else why it was refused (authorization_already_used, wrong_amount, "
                                            "wrong_recipient, authorization_expired, invalid_signature, "
                                            "insufficient_balance, malformed_payment, ...).")
