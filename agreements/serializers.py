from datetime import timedelta

from django.conf import settings
from django.utils import timezone
from drf_spectacular.utils import extend_schema_field
from rest_framework import serializers

from agreements import selectors
from agreements.models import APPROVAL_SUBJECT, AgreementEvent, AgreementStatus, PauseReason, SettlementModel
from agreements.webhooks import UNDONE_EVENT_TYPE
from marketplace import shown_text
from marketplace.pagination import PageQuerySerializer
from marketplace.serializers import (
    AddressSerializerField,
    AgentSummarySerializer,
    AtomicAmountField,
    CentsField,
    MAX_AMOUNT,
    FieldsBoundOnceSerializer,
    REPLAYED_SECRET_HELP,
    OverlapEndField,
    StrictBooleanField,
    StrictIntegerField,
    StrictSerializer,
    cents_of,
    http_url,
    json_size_bounded,
)
from policies import selectors as policy_selectors


class FeePermitSerializer(StrictSerializer):
    """The buyer's EIP-2612 permit of the fee to the platform relayer (`gas_wallet_address` of
    /payment-requirements), signed under USDC's domain."""

    value = AtomicAmountField(min_value=1)
    # uint256s the permit signs: beyond, the signature check raised (500)
    nonce = StrictIntegerField(min_value=0, max_value=MAX_AMOUNT, help_text="The token's nonces(buyer).")
    deadline = StrictIntegerField(min_value=0, max_value=MAX_AMOUNT, help_text="Unix time.")
    signature = serializers.RegexField(r"^0x[0-9a-fA-F]{130}$", help_text="65-byte r‖s‖v, 0x-hex.")


class PaymentMethodSerializer(StrictSerializer):
    rail = serializers.ChoiceField(choices=["stablecoin"])
    payment_header = serializers.CharField(max_length=8000, required=False, help_text="= payment_header.")


# The Pægents SDK's settlement model names for ours.
SETTLEMENT_MODEL_ALIASES = {"bilateral_escrow": SettlementModel.ESCROW}


# The most units one agreement may buy: also the most a seller's running total may reach (each unit costs at least
# one base unit), whatever AGREEMENT_MAX_AMOUNT allows.
AGREEMENT_QUANTITY_MAX = 10**18


class ProposalSerializer(StrictSerializer):
    """Our fields, or the Pægents SDK's: `seller_agent_id`, `unit` and `price_per_unit_cents` restate the service's
    terms (checked against them), `payment_method.payment_header` is `payment_header`, `expires_in_seconds` sets
    `expires_at`, `service_description` is the `note`."""

    service_id = serializers.UUIDField(required=False, help_text="Required unless the seller has exactly one service.")
    seller_agent_id = serializers.UUIDField(required=False, help_text="The seller; must be the service's.")
    unit = serializers.CharField(max_length=50, required=False, help_text="Must be the service's unit name.")
    price_per_unit_cents = CentsField(required=False, help_text="Must be the service's unit price, in cents.")
    settlement_model = serializers.ChoiceField(choices=[*SettlementModel.values, *SETTLEMENT_MODEL_ALIASES],
                                               default=SettlementModel.ESCROW,
                                               help_text="`bilateral_escrow` (Pægents' name) is `escrow`.")
    payment_method = PaymentMethodSerializer(required=False, help_text="Pægents' wrapper of payment_header.")
    expires_in_seconds = StrictIntegerField(min_value=1, max_value=10**9, required=False,
                                                  help_text="Sets expires_at to now + this.")
    activation_version = serializers.ChoiceField(
        choices=["v2"], required=False, help_text="Accepted as the Pægents SDK sends it; the escrow is activated "
                                                  "as GET /usage-agreements/{id}/activation-package describes.")
    service_description = serializers.CharField(max_length=1000, required=False, allow_blank=True,
                                                help_text="= note.")
    buyer_infra_fee_permit_signature = serializers.RegexField(
        r"^0x[0-9a-fA-F]{130}$", required=False,
        help_text="direct_payment, the Pægents SDK's fee permit: its signature; with the deadline below it is "
                  "`fee_permit` whose value is the fee and whose nonce is the token's current nonces(buyer).")
    buyer_infra_fee_permit_deadline = StrictIntegerField(min_value=0, max_value=MAX_AMOUNT, required=False,
                                                               help_text="With the signature above.")
    client_proposal_id = serializers.CharField(max_length=255, required=False,
                                               help_text="The Pægents SDK's idempotency key (it also sends it as "
                                                         "Idempotency-Key); not stored.")
    quantity = StrictIntegerField(min_value=1, max_value=AGREEMENT_QUANTITY_MAX,
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

    def validate_note(self, value):
        """Shown to the seller (the agreement's note) as written."""
        shown_text.refuse_unsafe(value, field="note", prose=True)
        return value

    def validate_service_description(self, value):
        shown_text.refuse_unsafe(value, field="service_description", prose=True)
        return value

    def validate(self, attrs):
        attrs["settlement_model"] = SETTLEMENT_MODEL_ALIASES.get(attrs["settlement_model"], attrs["settlement_model"])
        for ours, theirs in (("note", "service_description"), ("expires_at", "expires_in_seconds")):
            if ours in self.initial_data and theirs in attrs:
                raise serializers.ValidationError({theirs: [serializers.ErrorDetail(
                    f"Give either {theirs} or {ours}, not both.", code="duplicate_field")]})
        if "service_description" in attrs:
            attrs["note"] = attrs.pop("service_description")
        if "expires_in_seconds" in attrs:
            attrs["expires_at"] = timezone.now() + timedelta(seconds=attrs.pop("expires_in_seconds"))
        method = attrs.pop("payment_method", {})
        if "payment_header" in method:
            if "payment_header" in attrs:
                raise serializers.ValidationError({"payment_method": [serializers.ErrorDetail(
                    "Give payment_header once.", code="duplicate_field")]})
            attrs["payment_header"] = method["payment_header"]
        attrs.pop("activation_version", None)
        attrs.pop("client_proposal_id", None)
        signed = [attrs.pop(name) for name in ("buyer_infra_fee_permit_signature", "buyer_infra_fee_permit_deadline")
                  if name in attrs]
        if signed:
            if len(signed) != 2 or "fee_permit" in attrs:
                raise serializers.ValidationError({"buyer_infra_fee_permit_signature": [serializers.ErrorDetail(
                    "Give the fee permit's signature and deadline together, or fee_permit.", code="invalid_permit")]})
            # value and nonce are the server's to fill in: the fee, and the token's nonce for the buyer.
            attrs["fee_permit"] = {"signature": signed[0], "deadline": signed[1]}
        if "service_id" not in attrs and "seller_agent_id" not in attrs:
            raise serializers.ValidationError({"service_id": [serializers.ErrorDetail(
                "Required (or seller_agent_id, when the seller has one service).", code="required")]})
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

    def validate_reason(self, value):
        """Shown to the other party (the agreement's events) as written."""
        shown_text.refuse_unsafe(value, field="reason", prose=True)
        return value


class AgreementListQuery(StrictSerializer, PageQuerySerializer):
    status = serializers.ChoiceField(choices=AgreementStatus.choices, required=False)
    role = serializers.ChoiceField(choices=["buyer", "seller"], required=False)


class ServiceRefSerializer(FieldsBoundOnceSerializer):
    id = serializers.UUIDField()
    name = serializers.CharField()


class ApprovalRefSerializer(serializers.Serializer):
    id = serializers.UUIDField()
    status = serializers.CharField()
    expires_at = serializers.DateTimeField()


class FinalityWaitSerializer(serializers.Serializer):
    block_number = serializers.IntegerField(
        help_text="The block of the payment this money forwards or gives back: it is sent once the chain's `tag` "
                  "block reaches it (on Base, `finalized` is about 15 minutes behind the head), so that no reorg can "
                  "take that payment after.")
    tag = serializers.ChoiceField(choices=["finalized", "safe"], help_text="The node's block tag it waits for.")


ACTIVATION_VERSION = "usage-escrow-1"
class AgreementSerializer(FieldsBoundOnceSerializer):
    id = serializers.UUIDField()
    onchain_id = serializers.CharField(help_text="bytes32 id of the agreement in the escrow contract.")
    status = serializers.ChoiceField(choices=AgreementStatus.choices)
    status_reason = serializers.CharField()
    status_code = serializers.CharField(
        help_text="The machine-readable code of `status_reason` where the step into the status has one, also its "
                  "event's `data.code`: a failed direct purchase's (payment_failed: e.g. authorization_already_used, "
                  "fee_permit_stale, policy_denied), an activation's failure (agreement_id_taken, "
                  "activation_reverted), a rejection's (rejected_by_seller, rejected_by_owner), an expiry's "
                  "(proposal_expired, agreement_expired, term_ended_unfunded, pay_by_time_passed). Empty otherwise.")
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
    payment_authorization_cancel_tx_hash = serializers.CharField(
        allow_blank=True, help_text="direct_payment: the buyer's cancelAuthorization of the x402 authorization, relayed "
                                    "once the purchase was off (POST .../cancel-payment-authorization).")
    payment_reverted_at = serializers.DateTimeField(
        allow_null=True, help_text="direct_payment: when a chain reorg took the payment off the chain after the "
                                   "purchase was counted paid and it could not run again (status payment_failed): "
                                   "the buyer paid nothing, the seller was told it was paid; null otherwise.")
    completion_requested_at = serializers.DateTimeField(allow_null=True)
    completion_reason = serializers.CharField(allow_blank=True)
    completion_code = serializers.CharField(
        allow_blank=True, help_text="Why the platform asked for the completion as it applied a funding it did not "
                                    "check: the buyer's owner policy's refusal (`policy_denied`, `approval_required`, "
                                    "`amount_too_large`) or `funded_after_close`; the deposit goes back through a "
                                    "settlement of nothing. Blank otherwise.")
    challenge_deadline = serializers.DateTimeField(allow_null=True)
    proposed_atomic = AtomicAmountField(
        source="proposed_amount", allow_null=True,
        help_text="The settlement proposed on-chain last, whoever proposed it: what finalize pays the seller at the "
                  "challenge window's end (the buyer the rest). Above used_atomic, no usage receipt backs it: "
                  "challenge it. Null before any proposal.")
    seller_payout_atomic = AtomicAmountField(source="seller_payout", allow_null=True)
    buyer_refund_atomic = AtomicAmountField(source="buyer_refund", allow_null=True)
    buyer_refund_waiting_for_finality = serializers.SerializerMethodField(
        help_text="direct_payment: the fee's refund (buyer_refund_atomic) is queued, not sent before the block of "
                  "the fee's collection is final; null otherwise.")
    created_at = serializers.DateTimeField()
    accepted_at = serializers.DateTimeField(allow_null=True)
    closed_at = serializers.DateTimeField(allow_null=True)
    activated_at = serializers.DateTimeField(allow_null=True)
    settled_at = serializers.DateTimeField(allow_null=True)
    escrow_status = serializers.SerializerMethodField(
        help_text="Where the money is: not_funded, funding, funding_failed, funded, in_challenge, disputed, settling, "
                  "settled, refunded; direct payments: not_applicable.")
    units_used = serializers.SerializerMethodField(help_text="used_atomic in units of the agreement.")
    activation_version = serializers.SerializerMethodField(
        help_text="How the escrow is activated: `usage-escrow-1` (the activation package's typed data), not "
                  "Pægents' v2 contract.")
    payment_method = serializers.SerializerMethodField(help_text="Pægents' payment rail: always stablecoin.")
    # The Pægents SDK's names for fields above (its UsageAgreement), kept beside ours.
    agreement_id = serializers.UUIDField(source="id", help_text="= id (Pægents' name).")
    buyer_agent_id = serializers.UUIDField(source="buyer_id", help_text="= buyer.id (Pægents' name).")
    seller_agent_id = serializers.UUIDField(source="seller_id", help_text="= seller.id (Pægents' name).")
    service_id = serializers.UUIDField(help_text="= service.id (Pægents' name).")
    unit = serializers.CharField(source="unit_name", help_text="= unit_name (Pægents' name).")
    price_per_unit_cents = serializers.SerializerMethodField(
        help_text="price_per_unit_atomic in cents; null when not a whole number of cents.")
    total_cents = serializers.SerializerMethodField(
        help_text="deposit_amount_atomic in cents; null when not a whole number of cents.")

    def get_buyer_refund_waiting_for_finality(self, agreement) -> FinalityWaitSerializer(allow_null=True):
        return self.context.get("finality_waits", {}).get(str(agreement.pk))

    def get_escrow_status(self, agreement) -> str:
        return selectors.escrow_status_of(agreement)

    def get_units_used(self, agreement) -> int:
        return agreement.used // agreement.price_per_unit if agreement.price_per_unit else 0

    def get_activation_version(self, agreement) -> str:
        return ACTIVATION_VERSION

    def get_payment_method(self, agreement) -> PaymentMethodSerializer:
        return {"rail": "stablecoin"}

    def get_price_per_unit_cents(self, agreement) -> int | None:
        return cents_of(agreement.price_per_unit)

    def get_total_cents(self, agreement) -> int | None:
        return cents_of(agreement.deposit_amount)

    def get_approval(self, agreement) -> ApprovalRefSerializer(allow_null=True):
        approval = self.context.get("approvals", {}).get(agreement.pk)
        if approval is None:
            return None
        return {"id": approval.pk, "status": approval.status, "expires_at": approval.expires_at}


def agreement_payload(agreement, *, many: bool = False, serializer=AgreementSerializer, approvals: dict | None = None,
                      **context):
    """An agreement (or a list) as the API shows it, with the approvals it waits for ({agreement id: approval
    request}, read here unless given) and the fee refunds waiting for their finality."""
    rows = agreement if many else [agreement]
    if approvals is None:
        approvals = policy_selectors.approvals_for_subjects(subject_type=APPROVAL_SUBJECT,
                                                            subject_ids=[row.pk for row in rows])
    return serializer(agreement, many=many, context={
        "approvals": approvals, "finality_waits": selectors.agreements_finality_waits(rows), **context}).data


class AgreementEventSerializer(serializers.ModelSerializer):
    # Both parties read the trail: a person (the buyer's owner deciding an approval) is named by kind, not by the
    # login name the admin shows.
    actor_label = serializers.SerializerMethodField(help_text="The agent's handle, or \"system\"; blank for a person.")

    class Meta:
        model = AgreementEvent
        fields = ["id", "from_status", "to_status", "actor_kind", "actor_label", "reason", "data", "created_at"]

    def get_actor_label(self, event) -> str:
        people = (AgreementEvent.ActorKind.OWNER, AgreementEvent.ActorKind.OPERATOR)
        return "" if event.actor_kind in people else event.actor_label


class PaymentRequirementsQuery(StrictSerializer):
    amount_cents = StrictIntegerField(required=False, min_value=1, max_value=10**12)
    amount_atomic = AtomicAmountField(required=False, min_value=1)
    rail = serializers.ChoiceField(choices=["stablecoin"], default="stablecoin")
    purpose = serializers.ChoiceField(
        choices=["direct_purchase", "skill_invocation"], default="direct_purchase",
        help_text="What the amount pays for: a direct purchase (the fee schedule's fee on top) or a skill "
                  "invocation (the buyer pays the price, total_atomic; the fee, at least INVOCATION_FEE_MINIMUM_ATOMIC, "
                  "is kept from the seller's payout).")

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


# What webhook subscriptions and the inbox's filter name: `agreement.<status>`, and `agreement.undone`.
EVENT_TYPES = [*(f"agreement.{s}" for s in AgreementStatus.values), UNDONE_EVENT_TYPE]


class WebhookCreateSerializer(StrictSerializer):
    url = serializers.URLField(max_length=500)
    event_types = serializers.ListField(child=serializers.ChoiceField(choices=EVENT_TYPES), required=False,
        default=list, max_length=50,
        help_text="`agreement.<status>`, and `agreement.undone` (a reorg undid a status told: also sent to a "
                  "subscriber of the status undone or of the one the agreement is back in); empty: every event.")

    def validate_url(self, value):
        return http_url(value)


class WebhookSerializer(serializers.Serializer):
    id = serializers.UUIDField()
    url = serializers.CharField()
    event_types = serializers.ListField(child=serializers.CharField())
    created_at = serializers.DateTimeField()
    previous_secret_expires_at = OverlapEndField(
        secret_field="secret",
        help_text="While a rotation's overlap runs, deliveries carry a second `v1` signature, by the replaced "
                  "secret, until then; null when none runs.")
    paused = serializers.SerializerMethodField()
    paused_at = serializers.DateTimeField(allow_null=True, help_text="Since when it is paused; null when it is not.")
    paused_reason = serializers.SerializerMethodField(
        help_text="Why it is paused: `paused_by_request` (a pause asked through the API), `credential_revoked` (the "
                  "credential that created it was revoked: delete it unless it is yours), `paused_by_operator`; "
                  "null when it is not.")

    def get_paused(self, subscription) -> bool:
        return subscription.paused_at is not None

    @extend_schema_field(serializers.ChoiceField(choices=PauseReason.choices, allow_null=True))
    def get_paused_reason(self, subscription) -> str | None:
        return (subscription.paused_reason or None) if subscription.paused_at is not None else None


class WebhookCreatedSerializer(WebhookSerializer):
    secret = serializers.CharField(allow_null=True, help_text="Signing secret; shown only in this response."
                                   + REPLAYED_SECRET_HELP)


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
        return self._signer() if event.receipt_signature else ""

    def _signer(self) -> str:
        """Of the agreement's escrow: context `receipt_signer`, as `selectors.receipt_signer_of` answers it."""
        return self.context["receipt_signer"]

    def to_representation(self, event) -> dict:
        """The fields above, read directly: DRF's generic walk over 17 fields was most of the CPU of answering a
        batch of 100 events (tests/agreements/test_usage_serialization.py holds it to DRF's output)."""
        signature = event.receipt_signature
        return {
            "id": event.id, "seq": event.seq, "source": event.source, "units": event.units,
            "cost_atomic": int(event.cost), "cumulative_atomic": int(event.cumulative),
            "usage_digest": event.usage_digest, "receipt_signature": signature,
            "receipt_signer": self._signer() if signature else "", "request_id": event.request_id,
            "description": event.description, "method": event.method, "path": event.path,
            "upstream_status": event.upstream_status, "latency_ms": event.latency_ms,
            "created_at": self._created_at(event.created_at),
        }

    def _created_at(self, value) -> str:
        # The events of one batch share their timestamp: formatted once (by a field of its own, as `self.fields`
        # would deep-copy all 17 declared fields).
        cached = getattr(self, "_created_at_text", None)
        if cached is None or cached[0] != value:
            cached = self._created_at_text = (value, _TIMESTAMP.to_representation(value))
        return cached[1]


_TIMESTAMP = serializers.DateTimeField()


USAGE_UNITS_MAX = 10**12
USAGE_DESCRIPTION_MAX = 500
USAGE_BATCH_MAX = 100


def _plain_entry(data) -> dict | None:
    """A usage entry as the fields below validate it when it is plainly valid (an integer in range, a short ASCII
    description with nothing for DRF to trim or refuse), else None: a batch of 100 spent more CPU in DRF's
    per-field walk than in extending the usage chain. Anything else goes through the fields, which give the
    error."""
    if type(data) is dict and data.keys() <= {"units", "description"}:
        units, description = data.get("units"), data.get("description", "")
        if (type(units) is int and 1 <= units <= USAGE_UNITS_MAX and type(description) is str
                and len(description) <= USAGE_DESCRIPTION_MAX and description.isascii()
                and description.isprintable() and description == description.strip()):
            return {"units": units, "description": description}
    return None


class UsageEntrySerializer(StrictSerializer):
    units = StrictIntegerField(min_value=1, max_value=USAGE_UNITS_MAX)
    description = serializers.CharField(max_length=USAGE_DESCRIPTION_MAX, required=False, allow_blank=True,
                                        default="")

    def run_validation(self, data=serializers.empty):
        plain = _plain_entry(data)
        return super().run_validation(data) if plain is None else plain


def plain_usage_report(data) -> dict | None:
    """A report of plainly valid entries (`_plain_entry`), one or a batch within the batch limits, as
    RecordUsageSerializer validates it; None for anything else (which the serializer's fields take, or refuse)."""
    if type(data) is dict:
        if data.keys() == {"events"}:
            events = data["events"]
            if type(events) is list and 1 <= len(events) <= USAGE_BATCH_MAX:
                entries = [_plain_entry(entry) for entry in events]
                if None not in entries:
                    return {"description": "", "events": entries, "completed": False}
        elif data.keys() == {"units", "description"} or data.keys() == {"units"}:
            entry = _plain_entry(data)
            if entry is not None:
                return {**entry, "completed": False}
    return None


def usage_entries(report: dict) -> list[dict]:
    """The entries of a validated report of events (one or a batch)."""
    return report["events"] if "events" in report else [{"units": report["units"],
                                                          "description": report["description"]}]


class RecordUsageSerializer(StrictSerializer):
    """One entry (`units`, `description`) or a batch (`events`, up to 100), all-or-nothing against the cap, each
    with an Idempotency-Key; or the Pægents SDK's running total (`units_used`, `completed`), idempotent by itself."""

    units = StrictIntegerField(min_value=1, max_value=USAGE_UNITS_MAX, required=False)
    description = serializers.CharField(max_length=USAGE_DESCRIPTION_MAX, required=False, allow_blank=True,
                                        default="")
    events = UsageEntrySerializer(many=True, required=False, min_length=1, max_length=USAGE_BATCH_MAX)
    units_used = StrictIntegerField(
        min_value=0, max_value=AGREEMENT_QUANTITY_MAX, required=False,
        help_text="All units the seller has reported so far (not counting proxied calls, which the marketplace "
                  "meters): the difference from the last total is charged; the same total again charges nothing.")
    completed = StrictBooleanField(required=False, default=False,
                                   help_text="With units_used: end the agreement, as POST .../complete.")

    def run_validation(self, data=serializers.empty):
        """A plain report (`plain_usage_report`) is taken as is, as the fields and `validate` would take it:
        binding this serializer's fields (a deep copy of each, the batch's child serializer included) and walking
        them cost as much as validating the entries. Anything else goes through the fields, which give the error."""
        plain = plain_usage_report(data)
        return super().run_validation(data) if plain is None else plain

    def validate(self, attrs):
        forms = ("units" in attrs) + ("events" in attrs) + ("units_used" in attrs)
        if forms != 1:
            raise serializers.ValidationError("Give one of units (one event), events (a batch) or units_used (the "
                                              "running total).", code="units_or_events")
        if "events" in attrs and "description" in self.initial_data:
            raise serializers.ValidationError({"description": [serializers.ErrorDetail(
                "A batch has no description of its own: give each event's in events.", code="events_carry_descriptions")]})
        # Shown to the buyer and to staff as written (a plain report, `plain_usage_report`, is ASCII printable).
        shown_text.refuse_unsafe(attrs["description"], field="description", prose=True)
        for index, entry in enumerate(attrs.get("events", ())):
            shown_text.refuse_unsafe(entry["description"], field=f"events.{index}.description", prose=True)
        if attrs["completed"] and "units_used" not in attrs:
            raise serializers.ValidationError({"completed": [serializers.ErrorDetail(
                "Only with units_used; otherwise POST /usage-agreements/{id}/complete.", code="units_used_only")]})
        return attrs

    @property
    def is_running_total(self) -> bool:
        return "units_used" in self.validated_data


class RecordedUsageSerializer(AgreementSerializer):
    """The agreement after the report, and the usage events it added (none for a running total already reported)."""

    events = serializers.SerializerMethodField()

    def get_events(self, agreement) -> UsageEventSerializer(many=True):
        return UsageEventSerializer(self.context["events"], many=True,
                                    context={"receipt_signer": selectors.receipt_signer_of(agreement.receipt_signer)}
                                    ).data


class CompleteSerializer(StrictSerializer):
    reason = serializers.CharField(max_length=100, required=False, allow_blank=True, default="")

    def validate_reason(self, value):
        """Shown to the other party (the agreement's `completion_reason`) as written."""
        shown_text.refuse_unsafe(value, field="reason", prose=True)
        return value


class InvokeSerializer(StrictSerializer):
    input = serializers.DictField(help_text="Passed to the seller's skill as is: at most SKILL_INPUT_MAX_BYTES "
                                            "of JSON (400 `too_large` beyond).")

    def validate_input(self, value):
        """Kept with the invocation and sent to the seller: at most SKILL_INPUT_MAX_BYTES of JSON."""
        return json_size_bounded(value, limit=settings.SKILL_INPUT_MAX_BYTES)


class InvocationPaymentSerializer(serializers.Serializer):
    amount = serializers.CharField(help_text="In USDC, as the Services API shows it (\"0.02\").")
    amount_atomic = AtomicAmountField()
    fee_atomic = AtomicAmountField(help_text="The platform's fee, kept from the seller's payout (refunded with the "
                                             "price when the invocation fails).")
    currency = serializers.CharField()
    tx_hash = serializers.CharField(allow_blank=True, help_text="The buyer's payment to the platform treasury.")
    status = serializers.CharField(help_text="authorized, held, payment_failed, paying_out, paid_out, refunding, "
                                             "refunded; payment_reverted when a chain reorg took the confirmed "
                                             "payment off the chain after the seller was called and it could not "
                                             "run again: the buyer paid nothing (a payout or refund made already "
                                             "stands).")
    settlement_tx_hash = serializers.CharField(allow_blank=True,
                                               help_text="The payout to the seller, or the refund to the buyer.")
    waiting_for_finality = FinalityWaitSerializer(
        allow_null=True, help_text="paying_out, refunding: the payout or refund is queued, not sent before the "
                                   "payment's block is final; null otherwise.")


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

    return {"amount": format_amount(invocation.amount, 6), "amount_atomic": invocation.amount,
            "fee_atomic": invocation.fee, "currency": "USDC",
            "tx_hash": invocation.payment_tx_hash, "status": selectors.invocation_payment_status(invocation),
            "settlement_tx_hash": invocation.settlement_tx_hash,
            "waiting_for_finality": selectors.invocation_finality_wait(invocation)}


class X402PaymentRequiredSerializer(serializers.Serializer):
    """x402 v2's 402 body (`PaymentRequired`, as the x402 package validates it): `error` is x402's error string,
    here the marketplace's error code, with `message` and `details` beside it. The same requirements are in the
    PAYMENT-REQUIRED header (base64 JSON) and the X-Payment-* headers."""

    x402Version = serializers.IntegerField()
    accepts = serializers.ListField(child=serializers.DictField(),
                                    help_text="x402 PaymentRequirements: scheme exact, network (CAIP-2), asset, "
                                              "amount (base units), payTo, maxTimeoutSeconds, extra (the token's "
                                              "EIP-712 name and version, the resource, and the quoted nonce, "
                                              "validAfter and validBefore a bare signature signs).")
    resource = serializers.DictField()
    error = serializers.CharField(help_text="`payment_required` when no payment was sent, else why it was refused "
                                            "(authorization_already_used, wrong_amount, wrong_recipient, "
                                            "authorization_expired, invalid_signature, insufficient_balance, "
                                            "malformed_payment, payer_unknown, no_quoted_authorization, ...).")
    message = serializers.CharField()
    details = serializers.DictField()


# --- the Pægents SDK's read models -----------------------------------------------------------------------------


class MeteredUsageStatusSerializer(serializers.Serializer):
    """GET /metered-proxy/{id}/status: answered by the marketplace, never forwarded, never charged."""

    agreement_id = serializers.UUIDField()
    status = serializers.CharField()
    escrow_status = serializers.CharField()
    unit = serializers.CharField()
    price_per_unit_cents = serializers.IntegerField(allow_null=True,
                                                    help_text="Null when not a whole number of cents.")
    price_per_unit_atomic = AtomicAmountField()
    units_total = serializers.IntegerField(help_text="The quantity bought.")
    units_used = serializers.IntegerField()
    units_remaining = serializers.IntegerField(help_text="Units the unspent, unreserved budget still buys.")
    used_atomic = AtomicAmountField()
    reserved_atomic = AtomicAmountField()
    remaining_atomic = AtomicAmountField()


class ProofPageQuery(StrictSerializer, PageQuerySerializer):
    direction = serializers.ChoiceField(choices=["asc", "desc"], default="desc", help_text="By sequence number.")


class CallProofSerializer(serializers.Serializer):
    """A usage event as the Pægents SDK's call proof: its place in the hash chain and the platform's receipt."""

    proof_id = serializers.CharField(help_text="The usage event's id.")
    agreement_id = serializers.UUIDField()
    call_index = serializers.IntegerField(help_text="The event's gap-free sequence number.")
    request_hash = serializers.CharField(help_text="keccak256 of the event (agreement, seq, units, cost, "
                                                   "cumulative amount, request id): see sdk.receipts.")
    response_hash = serializers.CharField(allow_null=True, help_text="Always null: upstream answers are not hashed.")
    chain_hash = serializers.CharField(help_text="The usage digest after this event.")
    signature = serializers.CharField(allow_blank=True, help_text="The EIP-712 UsageReceipt signature (blank for "
                                                                  "events inside a batch but the last).")
    cost_atomic = AtomicAmountField()
    cumulative_amount_atomic = AtomicAmountField()
    created_at = serializers.DateTimeField()


class CallProofPageSerializer(serializers.Serializer):
    items = CallProofSerializer(many=True)
    cursor = serializers.CharField(allow_null=True, help_text="Pass back as `cursor` for the next page.")
    has_more = serializers.BooleanField()


class CumulativeReceiptSerializer(serializers.Serializer):
    """A signed UsageReceipt{agreementId, seq, cumulativeAmount, usageDigest}: what settlement submits on-chain."""

    receipt_id = serializers.CharField(help_text="The usage event's id.")
    agreement_id = serializers.UUIDField()
    cumulative_units = serializers.IntegerField(help_text="cumulative_amount_atomic / price per unit.")
    cumulative_amount_atomic = AtomicAmountField()
    price_per_unit_atomic = AtomicAmountField()
    nonce = serializers.IntegerField(help_text="The receipt's seq.")
    signature = serializers.CharField()
    signer = serializers.CharField(help_text="The receipt signer the buyer named on-chain.")
    proof_hash = serializers.CharField(help_text="The usage digest the receipt signs.")
    created_at = serializers.DateTimeField()


class CumulativeReceiptPageSerializer(serializers.Serializer):
    items = CumulativeReceiptSerializer(many=True)
    cursor = serializers.CharField(allow_null=True, help_text="Pass back as `cursor` for the next page.")
    has_more = serializers.BooleanField()


class AgentWebhookCreateSerializer(WebhookCreateSerializer):
    # Kept as given: a secret trimmed would sign with one the agent does not hold.
    secret = serializers.CharField(min_length=16, max_length=100, required=False, trim_whitespace=False,
                                   help_text="Your own signing secret, used exactly as given; a new one is made "
                                             "when absent.")


class AgentWebhookSerializer(WebhookSerializer):
    """A subscription as the `/agents/{id}/webhooks` routes show it (its own schema component)."""


class AgentWebhookSecretSerializer(AgentWebhookSerializer):
    secret = serializers.CharField(allow_null=True, help_text="Signing secret; shown only in this response."
                                   + REPLAYED_SECRET_HELP)


class AgentWebhookRotatedSerializer(AgentWebhookSerializer):
    secret = serializers.CharField(allow_null=True, help_text="The new signing secret, shown only in this response."
                                   + REPLAYED_SECRET_HELP)


class AgentDeliveryQuery(StrictSerializer, PageQuerySerializer):
    status = serializers.ChoiceField(choices=["pending", "delivered", "failed"], required=False)


class AgentWebhookDeliverySerializer(WebhookDeliverySerializer):
    subscription_id = serializers.UUIDField()


# An inbox event's id: `evt_` and its AgreementEvent's pk in ASCII digits (`str.isdigit` also takes "²", which `int`
# refuses).
EVENT_ID_PATTERN = r"^evt_[0-9]{1,18}$"


class InboxQuery(StrictSerializer):
    limit = StrictIntegerField(min_value=1, max_value=100, default=50)
    types = serializers.CharField(max_length=2000, required=False, allow_blank=True,
                                  help_text="Comma-separated event types, e.g. agreement.accepted,agreement.active.")
    after = serializers.RegexField(EVENT_ID_PATTERN, required=False, help_text="An event_id: events after it.")

    def validate_types(self, value) -> list[str]:
        """The types named, each one an event can have: a misspelt one matched nothing, and the inbox read empty."""
        types = [name.strip() for name in value.split(",") if name.strip()]
        unknown = sorted(set(types).difference(EVENT_TYPES))
        if unknown:
            raise serializers.ValidationError(
                f"Unknown event types: {', '.join(unknown[:5])}. Each is agreement.<status> or {UNDONE_EVENT_TYPE}.",
                code="unknown_event_type")
        return types


class InboxEventSerializer(serializers.Serializer):
    event_id = serializers.CharField(help_text="evt_<n>, the same id as the webhook's event.")
    type = serializers.CharField(help_text="agreement.<status>, or agreement.undone: a reorg deeper than the "
                                           "confirmation depth undid `payload.from_status`, the agreement back in "
                                           "`payload.status`.")
    payload = serializers.DictField(help_text="The webhook event's `data`.")
    status = serializers.ChoiceField(choices=["pending", "acked"])
    created_at = serializers.DateTimeField()


class EventAckSerializer(serializers.Serializer):
    event_id = serializers.CharField()
    status = serializers.CharField()
    acked_at = serializers.DateTimeField()
