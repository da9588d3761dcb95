"""Masumi-compatible node endpoints, as a Masumi payment node serves them: `/purchase` to a buyer, `/payment` to a
seller, `/payment-source`, and the connect seed's `/payment-information` for a listed service.

Field names, casing, the `{"status": "success", "data": ...}` envelope, timers as strings of milliseconds and
paths with or without a trailing slash follow the Masumi Payment Service and its published clients (PyPI
`masumi`, `masumi-crewai`). Additions, because the money moves on an EVM escrow the buyer signs for:
`input_data` (the marketplace starts the job on the seller once the funds are locked), `ActivationPackage` (what
the buyer signs), `POST /purchase/lock-funds` (the signed package) and `refundRequestTypedData` (what the buyer
signs for a refund request). How the timers map onto the contract: escrow.purchases.

Cardano-only fields: `paymentType` "Web3CardanoV1" (the masumi library's default) is accepted and ignored, since
this node has one payment source (the EVM escrow); any other unknown payment type is refused
(`unsupported_payment_type`); Cardano units such as "lovelace" are refused (`unsupported_token`,
`requested_funds_mismatch`); `sellerVkey` / `walletVkey` are EVM addresses here.
"""

import datetime

from django.conf import settings
from drf_spectacular.types import OpenApiTypes
from drf_spectacular.utils import extend_schema, extend_schema_field
from rest_framework import serializers, status
from rest_framework.response import Response
from rest_framework.views import APIView

from catalog import selectors as catalog_selectors
from catalog.authentication import agent_scope, calling_agent
from catalog.models import KeyScope, UpstreamProtocol
from escrow import purchases, selectors
from escrow.models import MasumiPaymentRequest
from escrow.serializers import ActivateEscrowSerializer, ActivationPackageSerializer, TypedDataSerializer
from marketplace import chainconfig, exact_json, shown_text, url_credentials
from marketplace.errors import Conflict, InvalidInput
from marketplace.idempotency import idempotent
from marketplace.masumi_format import check_network as _check_network
from marketplace.masumi_format import network_field as _network_field
from marketplace.masumi_format import timestamp as _timestamp
from marketplace.pagination import MAX_LIMIT
from marketplace.serializers import (
    DigitsField,
    StrictIntegerField,
    StrictSerializer,
    TextOnlySerializer,
    error_responses,
    json_size_bounded,
)

TAGS = ["masumi purchases"]
SELLER_TAGS = ["masumi payments"]
PAYMENT_TYPE = "EVMUsageEscrowV1"
CARDANO_PAYMENT_TYPE = "Web3CardanoV1"  # the masumi library's default: names the contract family, one source here


LAST_TIMESTAMP = 253402300799  # 9999-12-31T23:59:59Z, the last moment a datetime holds


@extend_schema_field(OpenApiTypes.STR)
class MasumiTimeField(serializers.Field):
    """A Masumi timer: Unix milliseconds as a string of digits (or a number), or an ISO 8601 time (the masumi
    library's `POST /payment` sends those); the value is Unix seconds."""

    default_error_messages = {"invalid": "Unix time in milliseconds, or an ISO 8601 time."}

    def to_internal_value(self, data):
        seconds = None
        if isinstance(data, int) and not isinstance(data, bool) and data >= 0:
            seconds = data // 1000
        elif isinstance(data, str) and data.isascii() and data.isdigit() and len(data) <= 16:
            seconds = int(data) // 1000
        elif isinstance(data, str) and len(data) <= 40:
            try:
                moment = datetime.datetime.fromisoformat(data.replace("Z", "+00:00"))
            except ValueError:
                self.fail("invalid")
            if moment.tzinfo is not None:
                seconds = int(moment.timestamp())
        if seconds is None or seconds > LAST_TIMESTAMP:
            self.fail("invalid")
        return seconds

    def to_representation(self, value):
        return str(value * 1000)


def _millis_field(**kwargs):
    return MasumiTimeField(required=False, **kwargs)


def _payment_type_field():
    return serializers.CharField(max_length=50, required=False, help_text=f'"{PAYMENT_TYPE}"; "{CARDANO_PAYMENT_TYPE}" '
                                 "(the masumi library's default) is accepted and ignored.")


def _check_smart_contract(value: str | None) -> None:
    if value is not None and value.lower() != chainconfig.escrow_address().lower():
        raise InvalidInput("This node's payments go through its escrow contract.", code="wrong_smart_contract",
                           details={"smartContractAddress": chainconfig.escrow_address()})


def _check_payment_type(value: str | None) -> None:
    if value not in (None, PAYMENT_TYPE, CARDANO_PAYMENT_TYPE):
        raise InvalidInput(f"This node's payment type is {PAYMENT_TYPE}.", code="unsupported_payment_type",
                           details={"accepted": [PAYMENT_TYPE, CARDANO_PAYMENT_TYPE]})


def _blockchain_identifier_field(**kwargs):
    kwargs.setdefault("help_text", "The escrow's bytes32 agreementId, or the seller's payment request it pays.")
    return serializers.RegexField(r"^0x[0-9a-fA-F]{64}$", **kwargs)


def _signature_field(**kwargs):
    return serializers.RegexField(r"^0x[0-9a-fA-F]{130}$", **kwargs)


def _input_hash_field():
    return serializers.RegexField(r"^[0-9a-f]{64}$", required=False,
                                  help_text="MIP-004: sha256 of `identifierFromPurchaser;JCS(input_data)`.")


def _identifier_from_purchaser_checked(value: str) -> str:
    """The buyer's order reference, shown to the other party as written (kept exactly: it is hashed)."""
    shown_text.refuse_unsafe(value, field="identifierFromPurchaser", prose=True)
    return value


def _include_history_field():
    return serializers.CharField(max_length=5, required=False, help_text="Accepted; no history here.")


class FundsSerializer(TextOnlySerializer):
    # Base units as a string of digits (a JSON integer read as its digits): " 5000000" was trimmed into the price.
    amount = DigitsField(max_digits=78)
    unit = serializers.CharField(max_length=250, allow_blank=True)


class PurchaseCreateSerializer(StrictSerializer):
    network = _network_field()
    agentIdentifier = serializers.UUIDField(help_text="The service's registry id.")
    input_data = serializers.JSONField(required=False, help_text="Sent to the seller's POST /start_job once the "
                                                                 "funds are locked (then no blockchainIdentifier).")
    blockchainIdentifier = _blockchain_identifier_field(
        required=False, help_text="The seller's payment request (from its /start_job), to pay it (then no "
                                  "input_data: the buyer started the job).")
    sellerVkey = serializers.CharField(max_length=250, required=False,
                                       help_text="With blockchainIdentifier: the seller's wallet address.")
    paymentType = _payment_type_field()
    smartContractAddress = serializers.CharField(max_length=250, required=False,
                                                 help_text="If given (masumi-crewai), must be this node's escrow.")
    Amounts = FundsSerializer(many=True, required=False, max_length=1,
                              help_text="masumi-crewai sends it: must be the listed price.")
    inputHash = _input_hash_field()
    identifierFromPurchaser = serializers.CharField(max_length=250, required=False, allow_blank=True, default="",
                                                    trim_whitespace=False,  # hashed as given (inputHash)
                                                    help_text="Generated (26 hex digits) when not given; kept "
                                                              "exactly as given (spaces too).")
    metadata = serializers.CharField(max_length=1000, required=False, allow_blank=True, default="")
    payByTime = _millis_field()
    submitResultTime = _millis_field()
    unlockTime = _millis_field()
    externalDisputeUnlockTime = _millis_field()

    def validate_identifierFromPurchaser(self, value):
        return _identifier_from_purchaser_checked(value)

    def validate_input_data(self, value):
        """Kept with the purchase and sent to the seller: at most MASUMI_INPUT_DATA_MAX_BYTES of JSON, as stored
        (a float such as 1e308 is stored positionally, 309 digits). Hashed (inputHash): minus zero, which the database
        cannot keep, is refused."""
        if exact_json.holds_minus_zero(value):
            raise serializers.ValidationError("-0.0 cannot be kept as given (it is stored as 0): send 0.",
                                              code="minus_zero")
        return json_size_bounded(value, limit=settings.MASUMI_INPUT_DATA_MAX_BYTES,
                                 encoder=exact_json.ExactNumbersEncoder)

    def validate(self, attrs):
        if ("input_data" in attrs) == ("blockchainIdentifier" in attrs):
            raise serializers.ValidationError("Give input_data (the marketplace starts the job) or a seller's "
                                              "blockchainIdentifier (you started it), not both.",
                                              code="input_data_or_blockchain_identifier")
        if "blockchainIdentifier" in attrs and "sellerVkey" not in attrs:
            raise serializers.ValidationError({"sellerVkey": "Required with blockchainIdentifier."}, code="required")
        return attrs


class PurchaseLockFundsSerializer(ActivateEscrowSerializer):
    network = _network_field()
    blockchainIdentifier = _blockchain_identifier_field()
    refundSignature = _signature_field(required=False, help_text="Optional: refundRequestTypedData signed now, used "
                                                           "only if you later request a refund without a signature.")


class PurchaseRefundSerializer(StrictSerializer):
    network = _network_field()
    blockchainIdentifier = _blockchain_identifier_field()
    signature = _signature_field(required=False, help_text="refundRequestTypedData signed by the buyer; without "
                                                           "it, the one given at lock-funds.")


class PurchaseReferenceSerializer(StrictSerializer):
    network = _network_field()
    blockchainIdentifier = _blockchain_identifier_field()


class PurchaseListQuery(StrictSerializer):
    network = _network_field()
    blockchainIdentifier = _blockchain_identifier_field(required=False)
    cursorId = serializers.UUIDField(required=False, help_text="Id of the last purchase of the previous page.")
    limit = StrictIntegerField(required=False, min_value=1, max_value=MAX_LIMIT, default=10)
    includeHistory = _include_history_field()


NO_ERROR = {"errorType": None, "errorCode": None, "errorNote": None}


class NextActionSerializer(serializers.Serializer):
    requestedAction = serializers.CharField()
    errorType = serializers.CharField(allow_null=True)
    errorCode = serializers.CharField(allow_null=True, help_text=(
        "errorType's machine-readable code: the refusal's own code (e.g. submit_result_time_passed), "
        "seller_service_error for a seller's call that failed, or the errorType in snake case."))
    errorNote = serializers.CharField(allow_null=True)


class WalletSerializer(serializers.Serializer):
    walletVkey = serializers.CharField()
    walletAddress = serializers.CharField()


class PaymentSourceSerializer(serializers.Serializer):
    network = serializers.CharField()
    smartContractAddress = serializers.CharField()
    paymentType = serializers.CharField()


class CurrentTransactionSerializer(serializers.Serializer):
    id = serializers.UUIDField()
    txHash = serializers.CharField(allow_blank=True)
    purpose = serializers.CharField()
    status = serializers.CharField()


class PurchaseSerializer(serializers.Serializer):
    id = serializers.UUIDField()
    blockchainIdentifier = serializers.CharField()
    agreementId = serializers.UUIDField(help_text="The usage agreement carrying the escrow (escrow endpoints).")
    agentIdentifier = serializers.UUIDField()
    requestedById = serializers.UUIDField(help_text="The buyer agent.")
    identifierFromPurchaser = serializers.CharField(allow_blank=True)
    metadata = serializers.CharField(allow_blank=True)
    createdAt = serializers.CharField()
    updatedAt = serializers.CharField()
    payByTime = serializers.CharField()
    submitResultTime = serializers.CharField()
    unlockTime = serializers.CharField()
    externalDisputeUnlockTime = serializers.CharField()
    inputHash = serializers.CharField()
    resultHash = serializers.CharField(allow_null=True, help_text="sha256 of the result; 0x‖it is the on-chain "
                                                                  "usageDigest.")
    onChainState = serializers.ChoiceField(allow_null=True, choices=[
        "FundsLocked", "ResultSubmitted", "RefundRequested", "Disputed", "Withdrawn", "RefundWithdrawn",
        "DisputedWithdrawn"])
    NextAction = NextActionSerializer()
    PaidFunds = FundsSerializer(many=True)
    infraFee = FundsSerializer()
    SellerWallet = WalletSerializer()
    SmartContractWallet = WalletSerializer()
    PaymentSource = PaymentSourceSerializer()
    CurrentTransaction = CurrentTransactionSerializer(allow_null=True)
    jobId = serializers.CharField(allow_null=True)
    paymentId = serializers.CharField(allow_null=True, help_text="The seller's payment_id for the job.")
    jobStatus = serializers.CharField(allow_null=True, help_text="What the seller's GET /status last said.")
    result = serializers.CharField(allow_null=True, help_text="The job's result, once submitted.")
    refundRequestedAt = serializers.CharField(allow_null=True)
    refundRequestTypedData = TypedDataSerializer(help_text="EIP-712 Challenge to sign for PATCH /purchase.")


class PurchaseCreatedSerializer(PurchaseSerializer):
    ActivationPackage = ActivationPackageSerializer(help_text="Sign it, then POST /purchase/lock-funds.")


def _envelope(name: str, data) -> type[serializers.Serializer]:
    return type(name, (serializers.Serializer,), {"status": serializers.ChoiceField(choices=["success"]),
                                                  "data": data})


PurchaseEnvelope = _envelope("MasumiPurchaseEnvelope", PurchaseSerializer())
PurchaseCreatedEnvelope = _envelope("MasumiPurchaseCreatedEnvelope", PurchaseCreatedSerializer())
PurchaseListEnvelope = _envelope("MasumiPurchaseListEnvelope", type(
    "MasumiPurchaseList", (serializers.Serializer,), {"Purchases": PurchaseSerializer(many=True)})())


class PaymentCreateSerializer(StrictSerializer):
    network = _network_field()
    agentIdentifier = serializers.UUIDField(help_text="Your service's registry id.")
    paymentType = _payment_type_field()
    identifierFromPurchaser = serializers.CharField(max_length=250, trim_whitespace=False,
                                                    help_text="Kept exactly as given (spaces too): it is hashed.")
    inputHash = _input_hash_field()
    metadata = serializers.CharField(max_length=1000, required=False, allow_blank=True, default="")
    RequestedFunds = FundsSerializer(many=True, required=False, max_length=1,
                                     help_text="masumi-crewai sends it: must be the listed price.")
    payByTime = _millis_field()
    submitResultTime = _millis_field()
    unlockTime = _millis_field()
    externalDisputeUnlockTime = _millis_field()

    def validate_identifierFromPurchaser(self, value):
        return _identifier_from_purchaser_checked(value)


class PaymentSubmitResultSerializer(StrictSerializer):
    network = _network_field()
    blockchainIdentifier = _blockchain_identifier_field()
    submitResultHash = serializers.RegexField(r"^[0-9a-f]{64}$", help_text="MIP-004 result hash.")


class PaymentResolveSerializer(StrictSerializer):
    network = _network_field()
    blockchainIdentifier = _blockchain_identifier_field()
    includeHistory = _include_history_field()


class PaymentListQuery(StrictSerializer):
    network = _network_field()
    cursorId = serializers.UUIDField(required=False, help_text="Id of the last payment of the previous page.")
    limit = StrictIntegerField(required=False, min_value=1, max_value=MAX_LIMIT, default=10)
    includeHistory = _include_history_field()


class PaymentSerializer(serializers.Serializer):
    id = serializers.UUIDField()
    blockchainIdentifier = serializers.CharField()
    agentIdentifier = serializers.UUIDField()
    identifierFromPurchaser = serializers.CharField()
    inputHash = serializers.CharField(allow_blank=True)
    resultHash = serializers.CharField(allow_null=True)
    onChainState = serializers.CharField(allow_null=True)
    NextAction = NextActionSerializer()
    payByTime = serializers.CharField()
    submitResultTime = serializers.CharField()
    unlockTime = serializers.CharField()
    externalDisputeUnlockTime = serializers.CharField()
    RequestedFunds = FundsSerializer(many=True)
    sellerVKey = serializers.CharField(help_text="The seller's wallet address.")
    BuyerWallet = WalletSerializer(allow_null=True)
    SmartContractWallet = WalletSerializer()
    PaymentSource = PaymentSourceSerializer()
    metadata = serializers.CharField(allow_blank=True)
    createdAt = serializers.CharField()


PaymentEnvelope = _envelope("MasumiPaymentEnvelope", PaymentSerializer())
PaymentListEnvelope = _envelope("MasumiPaymentListEnvelope", type(
    "MasumiPaymentList", (serializers.Serializer,), {"Payments": PaymentSerializer(many=True)})())


class PaymentSourceListQuery(StrictSerializer):
    take = StrictIntegerField(required=False, min_value=1, max_value=MAX_LIMIT)
    cursorId = serializers.CharField(required=False, max_length=100)


class PaymentSourceEntrySerializer(PaymentSourceSerializer):
    id = serializers.CharField()
    chainId = serializers.IntegerField()
    SellingWallets = WalletSerializer(many=True)
    PurchasingWallets = WalletSerializer(many=True)


PaymentSourceListEnvelope = _envelope("MasumiPaymentSourceListEnvelope", type(
    "MasumiPaymentSourceList", (serializers.Serializer,),
    {"PaymentSources": PaymentSourceEntrySerializer(many=True)})())


class PaymentInformationQuery(StrictSerializer):
    agentIdentifier = serializers.UUIDField(help_text="The listed service's registry id.")


class PaymentInformationSerializer(serializers.Serializer):
    agentIdentifier = serializers.UUIDField()
    name = serializers.CharField()
    apiBaseUrl = serializers.CharField(help_text="Where to call POST /start_job.")
    masumiProtocolVersion = serializers.CharField(help_text="The MIP-003 its /start_job speaks (1 or 2).")
    sellerVkey = serializers.CharField(help_text="The seller's wallet address.")
    AgentPricing = serializers.DictField()
    token = serializers.CharField(help_text="The price's token contract.")
    network = serializers.CharField()
    chainId = serializers.IntegerField()
    PaymentSource = PaymentSourceSerializer()
    defaultTimers = serializers.DictField(help_text="Seconds after the purchase, for timers you leave out.")
    purchaseUrl = serializers.CharField(help_text="POST it here (with input_data, or the seller's "
                                                  "blockchainIdentifier).")


PaymentInformationEnvelope = _envelope("MasumiPaymentInformationEnvelope", PaymentInformationSerializer())


def _millis(moment: datetime.datetime) -> str:
    return str(int(moment.timestamp()) * 1000)


def _payment_source() -> dict:
    return {"network": settings.MASUMI_NETWORK, "smartContractAddress": chainconfig.escrow_address(),
            "paymentType": PAYMENT_TYPE}


def _wallet(address: str) -> dict:
    return {"walletVkey": address, "walletAddress": address}


def _blockchain_identifier(purchase) -> str:
    return ("0x" + purchase.payment_request_id.hex.rjust(64, "0") if purchase.payment_request_id
            else purchase.agreement.onchain_id)


def _timers_of(row) -> dict:
    return {masumi_name: _millis(getattr(row, name)) for name, masumi_name in purchases.TIMER_NAMES.items()}


def purchase_payload(purchase) -> dict:
    agreement = purchase.agreement
    tx = purchases.purchase_current_transaction(purchase)
    attempts = list(tx.attempts.all()) if tx else []
    escrow = chainconfig.escrow_address()
    return {
        "id": str(purchase.pk),
        "blockchainIdentifier": _blockchain_identifier(purchase),
        "agreementId": str(agreement.pk),
        "agentIdentifier": str(agreement.service_id),
        "requestedById": str(agreement.buyer_id),
        "identifierFromPurchaser": purchase.identifier_from_purchaser,
        "metadata": purchase.metadata,
        "createdAt": _timestamp(purchase.created_at),
        "updatedAt": _timestamp(max(purchase.updated_at, agreement.updated_at)),
        **_timers_of(purchase),
        "inputHash": purchase.input_hash,
        "resultHash": purchase.result_hash or None,
        "onChainState": purchases.purchase_onchain_state(purchase),
        "NextAction": purchases.purchase_next_action(purchase),
        "PaidFunds": [{"amount": str(agreement.deposit_amount), "unit": agreement.token}],
        "infraFee": {"amount": str(agreement.infra_fee), "unit": agreement.token},
        "SellerWallet": _wallet(agreement.seller_wallet_address),
        "SmartContractWallet": _wallet(escrow),
        "PaymentSource": _payment_source(),
        "CurrentTransaction": None if tx is None else {
            "id": str(tx.pk), "txHash": tx.mined_tx_hash or (attempts[-1].tx_hash if attempts else ""),
            "purpose": tx.purpose, "status": tx.status},
        "jobId": purchase.job_id or None,
        "paymentId": purchase.payment_id or None,
        "jobStatus": purchase.job_status or None,
        "result": purchase.result or None,
        "refundRequestedAt": _timestamp(purchase.refund_requested_at),
        "refundRequestTypedData": purchases.refund_request_typed_data(purchase=purchase),
    }


def payment_payload(payment) -> dict:
    """The seller's view of a payment: a purchase paying its job, or its request no buyer has paid yet."""
    escrow = chainconfig.escrow_address()
    # The seller's own private note, given with its request: a purchase's `metadata` is its buyer's.
    request = payment if isinstance(payment, MasumiPaymentRequest) else payment.payment_request
    common = {"SmartContractWallet": _wallet(escrow), "PaymentSource": _payment_source(),
              "metadata": request.metadata if request is not None else "",
              "createdAt": _timestamp(payment.created_at), **_timers_of(payment),
              "identifierFromPurchaser": payment.identifier_from_purchaser, "inputHash": payment.input_hash}
    if isinstance(payment, MasumiPaymentRequest):
        service = payment.service
        return {**common, "id": str(payment.pk), "blockchainIdentifier": "0x" + payment.pk.hex.rjust(64, "0"),
                "agentIdentifier": str(service.pk), "resultHash": None, "onChainState": None,
                "NextAction": {"requestedAction": "WaitingForExternalAction", **NO_ERROR},
                "RequestedFunds": purchases.payment_request_funds(payment),
                "sellerVKey": service.seller.wallet_address, "BuyerWallet": None}
    agreement = payment.agreement
    state = purchases.purchase_onchain_state(payment)
    action = {"FundsLocked": "WaitingForExternalAction", "RefundRequested": "WaitingForExternalAction",
              "Disputed": "WaitingForExternalAction", None: "WaitingForExternalAction"}.get(state, "None")
    return {**common, "id": str(payment.pk), "blockchainIdentifier": _blockchain_identifier(payment),
            "agentIdentifier": str(agreement.service_id), "resultHash": payment.result_hash or None,
            "onChainState": state, "NextAction": {"requestedAction": action, **NO_ERROR},
            "RequestedFunds": [{"amount": str(agreement.deposit_amount), "unit": agreement.token}],
            "sellerVKey": agreement.seller_wallet_address, "BuyerWallet": _wallet(agreement.buyer_wallet_address)}


def _success(data, status_code: int = status.HTTP_200_OK) -> Response:
    return Response({"status": "success", "data": data}, status=status_code)


def _timer_arguments(data: dict) -> dict:
    return {name: data.get(masumi_name) for name, masumi_name in purchases.TIMER_NAMES.items()}


def _request_body(serializer_class, request) -> dict:
    """The request's body, validated, for this node's Masumi network (checked, then left out)."""
    body = serializer_class(data=request.data)
    body.is_valid(raise_exception=True)
    data = dict(body.validated_data)
    _check_network(data.pop("network"))
    return data


class PurchaseView(APIView):
    throttle_scope = {"POST": "payments"}

    def get_permissions(self):
        return [agent_scope(KeyScope.READ if self.request.method == "GET" else KeyScope.PAY)()]

    @extend_schema(operation_id="masumi_purchase_list", tags=TAGS, parameters=[PurchaseListQuery],
                   summary="Masumi: the calling buyer's purchases (one, with blockchainIdentifier)",
                   responses={200: PurchaseListEnvelope, **error_responses(404)})
    def get(self, request):
        query = PurchaseListQuery(data=request.query_params)
        query.is_valid(raise_exception=True)
        _check_network(query.validated_data["network"])
        buyer = calling_agent(request)
        identifier = query.validated_data.get("blockchainIdentifier")
        if identifier:
            rows = [selectors.purchase_get(buyer=buyer, blockchain_identifier=identifier)]
        else:
            rows = selectors.purchases_page(buyer=buyer, after=query.validated_data.get("cursorId"),
                                            limit=query.validated_data["limit"])
        return _success({"Purchases": [purchase_payload(p) for p in rows]})

    @extend_schema(operation_id="masumi_purchase_create", tags=TAGS, request=PurchaseCreateSerializer,
                   summary="Masumi: buy one job (input_data, or a seller's blockchainIdentifier); answers with the "
                           "escrow package to sign (then lock-funds)",
                   responses={200: PurchaseCreatedEnvelope, **error_responses(403, 404, 409, 422, 429, 503)})
    @idempotent(prepare=lambda view, request: _purchase_prepared(request))
    def post(self, request, prepared: purchases.PurchasePlan):
        purchase, package = purchases.purchase_record(plan=prepared)
        # 200, as a Masumi node answers (the masumi library treats anything else as a failure).
        return _success({**purchase_payload(purchase), "ActivationPackage": ActivationPackageSerializer(package).data})

    @extend_schema(operation_id="masumi_purchase_request_refund", tags=TAGS, request=PurchaseRefundSerializer,
                   summary="Masumi: the buyer requests a refund (signed refundRequestTypedData), before unlockTime",
                   responses={200: PurchaseEnvelope, **error_responses(404, 409)})
    def patch(self, request):
        return _request_refund(request)


def _purchase_prepared(request) -> purchases.PurchasePlan:
    """The purchase checked, and the chain read (its clock, the buyer's permit nonce), before the idempotent
    request's transaction opens."""
    data = _request_body(PurchaseCreateSerializer, request)
    _check_payment_type(data.get("paymentType"))
    _check_smart_contract(data.get("smartContractAddress"))
    buyer = calling_agent(request)
    service = catalog_selectors.service_for_buyer(service_id=data["agentIdentifier"], buyer=buyer)
    purchases.check_listed_price(service=service, funds=data.get("Amounts"))
    if "blockchainIdentifier" in data:
        payment_request = selectors.payment_request_get(blockchain_identifier=data["blockchainIdentifier"])
        if payment_request.service_id != data["agentIdentifier"]:
            raise InvalidInput("The payment request is for another agent.", code="payment_mismatch",
                               details={"fields": ["agentIdentifier"]})
        return purchases.purchase_prepare_for_payment(
            buyer=buyer, payment_request=payment_request, seller_wallet=data["sellerVkey"],
            identifier_from_purchaser=data["identifierFromPurchaser"], input_hash=data.get("inputHash"),
            metadata=data["metadata"], timers=_timer_arguments(data))
    return purchases.purchase_prepare(
        buyer=buyer, service=service, input_data=data["input_data"], input_hash=data.get("inputHash"),
        identifier_from_purchaser=data["identifierFromPurchaser"], metadata=data["metadata"],
        timers=_timer_arguments(data))


def _request_refund(request) -> Response:
    data = _request_body(PurchaseRefundSerializer, request)
    buyer = calling_agent(request)
    purchase = selectors.purchase_get(buyer=buyer, blockchain_identifier=data["blockchainIdentifier"])
    purchases.purchase_request_refund(purchase=purchase, buyer=buyer,
                                      signature=data.get("signature"))
    return _success(purchase_payload(selectors.purchase_get_by_id(buyer=buyer, purchase_id=purchase.pk)))


class PurchaseRequestRefundView(APIView):
    permission_classes = [agent_scope(KeyScope.PAY)]

    @extend_schema(operation_id="masumi_purchase_request_refund_post", tags=TAGS, request=PurchaseRefundSerializer,
                   summary="Masumi: request a refund (the masumi library's path; as PATCH /purchase)",
                   responses={200: PurchaseEnvelope, **error_responses(404, 409)})
    def post(self, request):
        return _request_refund(request)


class PurchaseCancelRefundRequestView(APIView):
    permission_classes = [agent_scope(KeyScope.PAY)]

    @extend_schema(operation_id="masumi_purchase_cancel_refund_request", tags=TAGS,
                   request=PurchaseReferenceSerializer,
                   summary="Masumi: withdraw a refund request that has not reached the chain",
                   responses={200: PurchaseEnvelope, **error_responses(404, 409)})
    def post(self, request):
        data = _request_body(PurchaseReferenceSerializer, request)
        buyer = calling_agent(request)
        purchase = selectors.purchase_get(buyer=buyer,
                                          blockchain_identifier=data["blockchainIdentifier"])
        purchases.purchase_cancel_refund_request(purchase=purchase, buyer=buyer)
        return _success(purchase_payload(selectors.purchase_get_by_id(buyer=buyer, purchase_id=purchase.pk)))


class PurchaseDetailView(APIView):
    permission_classes = [agent_scope(KeyScope.READ)]

    @extend_schema(operation_id="masumi_purchase_get", tags=TAGS,
                   summary="Masumi: one purchase, by its id or its blockchainIdentifier",
                   responses={200: PurchaseEnvelope, **error_responses(404)})
    def get(self, request, purchase_ref: str):
        buyer = calling_agent(request)
        if purchase_ref.startswith("0x"):
            purchase = selectors.purchase_get(buyer=buyer, blockchain_identifier=purchase_ref)
        else:
            purchase = selectors.purchase_get_by_id(buyer=buyer, purchase_id=purchase_ref)
        return _success(purchase_payload(purchase))


class PurchaseLockFundsView(APIView):
    permission_classes = [agent_scope(KeyScope.PAY)]
    throttle_scope = "payments"

    @extend_schema(operation_id="masumi_purchase_lock_funds", tags=TAGS, request=PurchaseLockFundsSerializer,
                   summary="Submit the signed ActivationPackage; 202, the escrow is funded by the relayer "
                           "(onChainState FundsLocked once confirmed)",
                   responses={202: PurchaseEnvelope, **error_responses(402, 404, 409, 422, 429, 503)})
    @idempotent(atomic=False)  # verifies against the chain before it writes
    def post(self, request):
        data = _request_body(PurchaseLockFundsSerializer, request)
        buyer = calling_agent(request)
        purchase = selectors.purchase_get(buyer=buyer, blockchain_identifier=data.pop("blockchainIdentifier"))
        purchases.purchase_lock_funds(purchase=purchase, buyer=buyer, refund_signature=data.pop("refundSignature",
                                                                                                None), **data)
        return _success(purchase_payload(selectors.purchase_get_by_id(buyer=buyer, purchase_id=purchase.pk)),
                        status.HTTP_202_ACCEPTED)


# --- the seller's side: this marketplace as the seller's Masumi node ---------------------------------------------

class PaymentView(APIView):
    throttle_scope = {"POST": "payments"}  # each request reads the chain's clock and writes a row

    def get_permissions(self):
        return [agent_scope(KeyScope.READ if self.request.method == "GET" else KeyScope.PAY)()]

    @extend_schema(operation_id="masumi_payment_list", tags=SELLER_TAGS, parameters=[PaymentListQuery],
                   summary="Masumi: the calling seller's payments (paid jobs, then unpaid requests), newest first",
                   responses={200: PaymentListEnvelope, **error_responses()})
    def get(self, request):
        query = PaymentListQuery(data=request.query_params)
        query.is_valid(raise_exception=True)
        _check_network(query.validated_data["network"])
        rows = selectors.payments_page(seller=calling_agent(request), after=query.validated_data.get("cursorId"),
                                       limit=query.validated_data["limit"])
        return _success({"Payments": [payment_payload(row) for row in rows]})

    @extend_schema(operation_id="masumi_payment_create", tags=SELLER_TAGS, request=PaymentCreateSerializer,
                   summary="Masumi: request payment for one job of your service (a masumi seller's /start_job "
                           "does); hand the buyer its blockchainIdentifier",
                   responses={200: PaymentEnvelope, **error_responses(404, 409, 422, 503)})
    @idempotent(prepare=lambda view, request: _payment_prepared(request))
    def post(self, request, prepared: dict):
        return _success(payment_payload(purchases.payment_request_create(**prepared)))


def _payment_prepared(request) -> dict:
    """The payment request checked, and the chain's clock read, before the idempotent request's transaction
    opens."""
    data = _request_body(PaymentCreateSerializer, request)
    _check_payment_type(data.get("paymentType"))
    seller = calling_agent(request)
    service = catalog_selectors.service_of_seller(seller=seller, service_id=data["agentIdentifier"])
    return {"seller": seller, "service": service, "identifier_from_purchaser": data["identifierFromPurchaser"],
            "input_hash": data.get("inputHash"), "metadata": data["metadata"], "timers": _timer_arguments(data),
            "requested_funds": data.get("RequestedFunds"), "clock": purchases.request_clock()}


class PaymentResolveView(APIView):
    permission_classes = [agent_scope(KeyScope.READ)]

    @extend_schema(operation_id="masumi_payment_resolve", tags=SELLER_TAGS, request=PaymentResolveSerializer,
                   summary="Masumi: one of the seller's payments by blockchainIdentifier",
                   responses={200: PaymentEnvelope, **error_responses(404)})
    def post(self, request):
        data = _request_body(PaymentResolveSerializer, request)
        return _success(payment_payload(selectors.payment_get(
            seller=calling_agent(request), blockchain_identifier=data["blockchainIdentifier"])))


def _paid(payment):
    if isinstance(payment, MasumiPaymentRequest):
        raise Conflict("No buyer has locked funds for this payment yet.", code="funds_not_locked")
    return payment


class PaymentSubmitResultView(APIView):
    permission_classes = [agent_scope(KeyScope.PAY)]

    @extend_schema(operation_id="masumi_payment_submit_result", tags=SELLER_TAGS,
                   request=PaymentSubmitResultSerializer,
                   summary="Masumi: the seller submits its result hash (MIP-004) before submitResultTime; it is "
                           "committed on-chain and paid after unlockTime",
                   responses={200: PaymentEnvelope, **error_responses(404, 409, 503)})
    def post(self, request):
        data = _request_body(PaymentSubmitResultSerializer, request)
        seller = calling_agent(request)
        identifier = data["blockchainIdentifier"]
        purchase = _paid(selectors.payment_get(seller=seller, blockchain_identifier=identifier))
        purchases.payment_submit_result(seller=seller, purchase=purchase,
                                        result_hash=data["submitResultHash"])
        return _success(payment_payload(selectors.payment_get(seller=seller, blockchain_identifier=identifier)))


class PaymentAuthorizeRefundView(APIView):
    permission_classes = [agent_scope(KeyScope.PAY)]

    @extend_schema(operation_id="masumi_payment_authorize_refund", tags=SELLER_TAGS,
                   request=PurchaseReferenceSerializer,
                   summary="Masumi: the seller refunds a disputed payment wholly to the buyer",
                   responses={200: PaymentEnvelope, **error_responses(404, 409)})
    def post(self, request):
        data = _request_body(PurchaseReferenceSerializer, request)
        seller = calling_agent(request)
        identifier = data["blockchainIdentifier"]
        purchase = _paid(selectors.payment_get(seller=seller, blockchain_identifier=identifier))
        purchases.payment_authorize_refund(seller=seller, purchase=purchase)
        return _success(payment_payload(selectors.payment_get(seller=seller, blockchain_identifier=identifier)))


class PaymentSourceView(APIView):
    permission_classes = [agent_scope(KeyScope.READ)]

    @extend_schema(operation_id="masumi_payment_source_list", tags=SELLER_TAGS, parameters=[PaymentSourceListQuery],
                   summary="Masumi: this node's one payment source (the escrow contract), with the calling agent's "
                           "wallet as its selling and purchasing wallet",
                   responses={200: PaymentSourceListEnvelope, **error_responses()})
    def get(self, request):
        PaymentSourceListQuery(data=request.query_params).is_valid(raise_exception=True)
        wallet = _wallet(calling_agent(request).wallet_address)
        return _success({"PaymentSources": [{**_payment_source(), "id": PAYMENT_TYPE, "chainId": settings.CHAIN_ID,
                                             "SellingWallets": [wallet], "PurchasingWallets": [wallet]}]})


class PaymentInformationView(APIView):
    permission_classes = [agent_scope(KeyScope.READ)]

    @extend_schema(operation_id="masumi_payment_information", tags=TAGS, parameters=[PaymentInformationQuery],
                   summary="Masumi connect: how to pay a listed service, in this network's terms",
                   responses={200: PaymentInformationEnvelope, **error_responses(404)})
    def get(self, request):
        query = PaymentInformationQuery(data=request.query_params)
        query.is_valid(raise_exception=True)
        # As the catalog shows it: not a deactivated seller's (nor its owner's) service, offered for sale here.
        service = catalog_selectors.service_shown(service_id=query.validated_data["agentIdentifier"],
                                                  viewer=calling_agent(request))
        if service.upstream_protocol != UpstreamProtocol.MASUMI:
            raise InvalidInput("Only masumi services are paid through /purchase.", code="not_a_masumi_service")
        after, default_timers = 0, {}
        for masumi_name, seconds in [("payByTime", settings.MASUMI_PAY_BY_SECONDS),
                                     ("submitResultTime", settings.MASUMI_SUBMIT_RESULT_SECONDS),
                                     ("unlockTime", settings.MASUMI_UNLOCK_SECONDS),
                                     ("externalDisputeUnlockTime", settings.MASUMI_EXTERNAL_DISPUTE_SECONDS)]:
            after += seconds
            default_timers[masumi_name] = after
        return _success({
            "agentIdentifier": str(service.pk), "name": service.name,
            "apiBaseUrl": url_credentials.without_credentials(service.upstream_base_url),  # saved before refused
            "masumiProtocolVersion": service.masumi_protocol_version, "sellerVkey": service.seller.wallet_address,
            "AgentPricing": {"pricingType": "Fixed" if service.unit_price else "Free",
                             "Pricing": [{"unit": service.token, "amount": str(service.unit_price)}]},
            "token": chainconfig.usdc_address() if service.token == "USDC" else service.token,
            "network": settings.MASUMI_NETWORK, "chainId": settings.CHAIN_ID, "PaymentSource": _payment_source(),
            "defaultTimers": default_timers, "purchaseUrl": request.build_absolute_uri("/purchase"),
        })
