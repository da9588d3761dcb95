"""Masumi-compatible purchase endpoints (`/purchase`), as a Masumi payment node serves them to a buyer.

Field names, casing, the `{"status": "success", "data": ...}` envelope and timers as strings of milliseconds
follow the Masumi Payment Service. Additions, because the money moves on an EVM escrow the buyer signs for:
`input_data` (the marketplace starts the job on the seller once the funds are locked), `ActivationPackage` (what
the buyer signs), `POST /purchase/lock-funds` (the signed package) and `refundRequestTypedData` (what the buyer
signs for `PATCH /purchase`). How the timers map onto the contract: escrow.purchases.
"""

import datetime

from django.conf import settings
from drf_spectacular.utils import extend_schema
from rest_framework import serializers, status
from rest_framework.response import Response
from rest_framework.views import APIView

from catalog import selectors as catalog_selectors
from catalog.authentication import agent_scope, calling_agent
from catalog.models import KeyScope
from escrow import purchases, selectors
from escrow.serializers import ActivateEscrowSerializer, ActivationPackageSerializer, TypedDataSerializer, _signature
from marketplace import chainconfig
from marketplace.idempotency import idempotent
from marketplace.masumi_format import check_network as _check_network
from marketplace.masumi_format import network_field as _network_field
from marketplace.masumi_format import timestamp as _timestamp
from marketplace.pagination import MAX_LIMIT, paginate
from marketplace.serializers import StrictIntegerField, StrictSerializer, error_responses

TAGS = ["masumi purchases"]
PAYMENT_TYPE = "EVMUsageEscrowV1"


def _millis_field(**kwargs):
    return serializers.RegexField(r"^[0-9]{1,16}$", required=False,
                                  help_text="Unix time in milliseconds, as a string (Masumi's format).", **kwargs)


def _blockchain_identifier_field(**kwargs):
    return serializers.RegexField(r"^0x[0-9a-fA-F]{64}$", help_text="The escrow's bytes32 agreementId.", **kwargs)


class PurchaseCreateSerializer(StrictSerializer):
    network = _network_field()
    agentIdentifier = serializers.UUIDField(help_text="The service's registry id.")
    input_data = serializers.JSONField(help_text="Sent to the seller's POST /start_job once the funds are locked.")
    inputHash = serializers.RegexField(r"^[0-9a-f]{64}$", required=False,
                                       help_text="If given, must be sha256 of the canonical JSON of input_data.")
    identifierFromPurchaser = serializers.CharField(max_length=250, required=False, allow_blank=True, default="")
    metadata = serializers.CharField(max_length=1000, required=False, allow_blank=True, default="")
    payByTime = _millis_field()
    submitResultTime = _millis_field()
    unlockTime = _millis_field()
    externalDisputeUnlockTime = _millis_field()


class PurchaseLockFundsSerializer(ActivateEscrowSerializer):
    network = _network_field()
    blockchainIdentifier = _blockchain_identifier_field()


class PurchaseRefundSerializer(StrictSerializer):
    network = _network_field()
    blockchainIdentifier = _blockchain_identifier_field()
    signature = _signature()


class PurchaseListQuery(StrictSerializer):
    network = _network_field()
    blockchainIdentifier = _blockchain_identifier_field(required=False)
    cursorId = serializers.UUIDField(required=False, help_text="Id of the last purchase of the previous page.")
    limit = StrictIntegerField(required=False, min_value=1, max_value=MAX_LIMIT, default=10)


class FundsSerializer(serializers.Serializer):
    amount = serializers.CharField()
    unit = serializers.CharField()


class NextActionSerializer(serializers.Serializer):
    requestedAction = serializers.CharField()
    errorType = serializers.CharField(allow_null=True)
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


def _millis(moment: datetime.datetime) -> str:
    return str(int(moment.timestamp()) * 1000)


def _seconds(millis: str | None) -> int | None:
    return int(millis) // 1000 if millis else None


def purchase_payload(purchase) -> dict:
    agreement = purchase.agreement
    tx = purchases.purchase_current_transaction(purchase)
    attempts = list(tx.attempts.all()) if tx else []
    escrow = chainconfig.escrow_address()
    return {
        "id": str(purchase.pk),
        "blockchainIdentifier": agreement.onchain_id,
        "agreementId": str(agreement.pk),
        "agentIdentifier": str(agreement.service_id),
        "requestedById": str(agreement.buyer_id),
        "identifierFromPurchaser": purchase.identifier_from_purchaser,
        "metadata": purchase.metadata,
        "createdAt": _timestamp(purchase.created_at),
        "updatedAt": _timestamp(max(purchase.updated_at, agreement.updated_at)),
        "payByTime": _millis(purchase.pay_by_time),
        "submitResultTime": _millis(purchase.submit_result_time),
        "unlockTime": _millis(purchase.unlock_time),
        "externalDisputeUnlockTime": _millis(purchase.external_dispute_unlock_time),
        "inputHash": purchase.input_hash,
        "resultHash": purchase.result_hash or None,
        "onChainState": purchases.purchase_onchain_state(purchase),
        "NextAction": purchases.purchase_next_action(purchase),
        "PaidFunds": [{"amount": str(agreement.deposit_amount), "unit": agreement.token}],
        "infraFee": {"amount": str(agreement.infra_fee), "unit": agreement.token},
        "SellerWallet": {"walletVkey": agreement.seller_wallet_address,
                         "walletAddress": agreement.seller_wallet_address},
        "SmartContractWallet": {"walletVkey": escrow, "walletAddress": escrow},
        "PaymentSource": {"network": settings.MASUMI_NETWORK, "smartContractAddress": escrow,
                          "paymentType": PAYMENT_TYPE},
        "CurrentTransaction": None if tx is None else {
            "id": str(tx.pk), "txHash": tx.mined_tx_hash or (attempts[-1].tx_hash if attempts else ""),
            "purpose": tx.purpose, "status": tx.status},
        "jobId": purchase.job_id or None,
        "paymentId": purchase.payment_id or None,
        "jobStatus": purchase.job_status or None,
        "result": purchase.result if purchase.result_hash else None,
        "refundRequestedAt": _timestamp(purchase.refund_requested_at),
        "refundRequestTypedData": purchases.refund_request_typed_data(purchase=purchase),
    }


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
            queryset = selectors.purchases_of_buyer(buyer=buyer)
            cursor_id = query.validated_data.get("cursorId")
            if cursor_id is not None:
                queryset = queryset.filter(pk__gt=cursor_id)
            rows, _ = paginate(queryset, ordering=["id"], cursor=None, limit=query.validated_data["limit"])
        return Response({"status": "success", "data": {"Purchases": [purchase_payload(p) for p in rows]}})

    @extend_schema(operation_id="masumi_purchase_create", tags=TAGS, request=PurchaseCreateSerializer,
                   summary="Masumi: buy one job; answers with the escrow package to sign (then lock-funds)",
                   responses={201: PurchaseCreatedEnvelope, **error_responses(403, 404, 409, 422, 429, 503)})
    @idempotent()
    def post(self, request):
        body = PurchaseCreateSerializer(data=request.data)
        body.is_valid(raise_exception=True)
        data = body.validated_data
        _check_network(data["network"])
        buyer = calling_agent(request)
        service = catalog_selectors.service_get(service_id=data["agentIdentifier"])
        purchase, package = purchases.purchase_create(
            buyer=buyer, service=service, input_data=data["input_data"], input_hash=data.get("inputHash"),
            identifier_from_purchaser=data["identifierFromPurchaser"], metadata=data["metadata"],
            timers={"pay_by_time": _seconds(data.get("payByTime")),
                    "submit_result_time": _seconds(data.get("submitResultTime")),
                    "unlock_time": _seconds(data.get("unlockTime")),
                    "external_dispute_unlock_time": _seconds(data.get("externalDisputeUnlockTime"))})
        payload = {**purchase_payload(purchase), "ActivationPackage": ActivationPackageSerializer(package).data}
        return Response({"status": "success", "data": payload}, status=status.HTTP_201_CREATED)

    @extend_schema(operation_id="masumi_purchase_request_refund", tags=TAGS, request=PurchaseRefundSerializer,
                   summary="Masumi: the buyer requests a refund (signed refundRequestTypedData), before unlockTime",
                   responses={200: PurchaseEnvelope, **error_responses(403, 404, 409)})
    def patch(self, request):
        body = PurchaseRefundSerializer(data=request.data)
        body.is_valid(raise_exception=True)
        _check_network(body.validated_data["network"])
        buyer = calling_agent(request)
        purchase = selectors.purchase_get(buyer=buyer,
                                          blockchain_identifier=body.validated_data["blockchainIdentifier"])
        purchase = purchases.purchase_request_refund(purchase=purchase, buyer=buyer,
                                                     signature=body.validated_data["signature"])
        purchase = selectors.purchase_get(buyer=buyer, blockchain_identifier=purchase.agreement.onchain_id)
        return Response({"status": "success", "data": purchase_payload(purchase)})


class PurchaseLockFundsView(APIView):
    permission_classes = [agent_scope(KeyScope.PAY)]
    throttle_scope = "payments"

    @extend_schema(operation_id="masumi_purchase_lock_funds", tags=TAGS, request=PurchaseLockFundsSerializer,
                   summary="Submit the signed ActivationPackage; 202, the escrow is funded by the relayer "
                           "(onChainState FundsLocked once confirmed)",
                   responses={202: PurchaseEnvelope, **error_responses(402, 404, 409, 422, 429, 503)})
    @idempotent(atomic=False)  # verifies against the chain before it writes
    def post(self, request):
        body = PurchaseLockFundsSerializer(data=request.data)
        body.is_valid(raise_exception=True)
        data = dict(body.validated_data)
        _check_network(data.pop("network"))
        buyer = calling_agent(request)
        purchase = selectors.purchase_get(buyer=buyer, blockchain_identifier=data.pop("blockchainIdentifier"))
        purchases.purchase_lock_funds(purchase=purchase, buyer=buyer, **data)
        purchase = selectors.purchase_get(buyer=buyer, blockchain_identifier=purchase.agreement.onchain_id)
        return Response({"status": "success", "data": purchase_payload(purchase)}, status=status.HTTP_202_ACCEPTED)
