from datetime import timedelta

from django.utils import timezone
from drf_spectacular.utils import extend_schema
from rest_framework import status
from rest_framework.response import Response
from rest_framework.views import APIView

from agreements import selectors as agreement_selectors
from catalog.authentication import agent_scope, calling_agent
from catalog.models import KeyScope
from catalog.authentication import IsOperator
from escrow import chain, selectors, services, settlement
from escrow.serializers import (
    ActivateEscrowSerializer,
    ActivationAcceptedSerializer,
    ActivationPackageSerializer,
    ChainTransactionSerializer,
    ChallengePackageSerializer,
    ChallengeSerializer,
    ResolveSerializer,
    EscrowStatusQuery,
    EscrowStatusSerializer,
)
from marketplace import chainconfig
from marketplace.errors import Conflict, DependencyUnavailable
from marketplace.idempotency import idempotent
from marketplace.serializers import error_responses

TAGS = ["escrow"]
# Submitting without a signed transaction for this long is a backend fault, not chain latency.
BACKEND_FAULT_AFTER = timedelta(minutes=2)


def _latest_block() -> int | None:
    try:
        return chain.latest_block_number()
    except chain.ChainError:
        return None


def transaction_payload(tx, latest_block: int | None) -> dict:
    hashes = [attempt.tx_hash for attempt in tx.attempts.all()]
    return {
        "id": tx.pk, "purpose": tx.purpose, "status": tx.status, "nonce": tx.nonce,
        "tx_hash": tx.mined_tx_hash or (hashes[-1] if hashes else ""), "tx_hashes": hashes,
        "block_number": tx.mined_block_number, "confirmations": selectors.confirmations(tx=tx,
                                                                                        latest_block=latest_block),
        "confirmations_required": tx.confirmations_required, "failure_reason": tx.failure_reason,
        "created_at": tx.created_at,
    }


class ActivationPackageView(APIView):
    permission_classes = [agent_scope(KeyScope.PAY)]

    @extend_schema(operation_id="escrow_activation_package", tags=TAGS,
                   summary="What the buyer signs to fund the escrow (EIP-712 intent + EIP-2612 permits)",
                   responses={200: ActivationPackageSerializer, **error_responses(404, 409, 503)})
    def get(self, request, agreement_id):
        agent = calling_agent(request)
        agreement = agreement_selectors.agreement_get(agreement_id=agreement_id, agent=agent)
        return Response(ActivationPackageSerializer(services.activation_package(agreement=agreement,
                                                                                buyer=agent)).data)


class ActivateEscrowView(APIView):
    permission_classes = [agent_scope(KeyScope.PAY)]
    throttle_scope = "payments"

    @extend_schema(
        operation_id="escrow_activate", tags=TAGS, request=ActivateEscrowSerializer,
        summary="Submit the signed package. 202: queued for the relayer; poll the agreement or escrow-status "
                "until `active` (or `activation_failed` with the reason).",
        responses={202: ActivationAcceptedSerializer, **error_responses(402, 404, 409, 422, 429, 503)},
    )
    @idempotent()
    def post(self, request, agreement_id):
        agent = calling_agent(request)
        agreement = agreement_selectors.agreement_get(agreement_id=agreement_id, agent=agent)
        body = ActivateEscrowSerializer(data=request.data)
        body.is_valid(raise_exception=True)
        tx = services.activation_submit(agreement=agreement, buyer=agent, **body.validated_data)
        return Response(ActivationAcceptedSerializer({
            "agreement_id": agreement.pk, "status": "submitting", "transaction": transaction_payload(tx, None),
        }).data, status=status.HTTP_202_ACCEPTED)


class EscrowStatusView(APIView):
    permission_classes = [agent_scope(KeyScope.READ)]

    @extend_schema(operation_id="escrow_status", tags=TAGS, parameters=[EscrowStatusQuery],
                   summary="Escrow amounts, transactions and confirmations; `verify=true` adds the contract's view",
                   responses={200: EscrowStatusSerializer, **error_responses(404, 503)})
    def get(self, request, agreement_id):
        query = EscrowStatusQuery(data=request.query_params)
        query.is_valid(raise_exception=True)
        agreement = agreement_selectors.agreement_get(agreement_id=agreement_id, agent=calling_agent(request))
        latest = _latest_block()
        transactions = list(selectors.transactions_of_agreement(agreement_id=agreement.pk))
        funded = agreement.status not in ("pending_approval", "proposed", "accepted", "rejected", "cancelled",
                                          "expired", "submitting", "activation_failed")
        onchain = None
        if query.validated_data["verify"]:
            try:
                onchain = selectors.onchain_escrow(onchain_id=agreement.onchain_id)
            except chain.ChainError as error:
                raise DependencyUnavailable("The chain RPC is unavailable.", code="chain_unavailable") from error
        stuck = (agreement.status == "submitting" and not agreement.activation_tx_hash
                 and timezone.now() - agreement.updated_at > BACKEND_FAULT_AFTER)
        return Response(EscrowStatusSerializer({
            "agreement_id": agreement.pk, "onchain_id": agreement.onchain_id, "status": agreement.status,
            "escrow_contract": chainconfig.escrow_address(), "deposit_amount_atomic": agreement.deposit_amount,
            "deposited_atomic": agreement.deposit_amount if funded else 0, "used_atomic": agreement.used,
            "reserved_atomic": agreement.reserved, "remaining_atomic": agreement.remaining,
            "infra_fee_atomic": agreement.infra_fee, "activation_tx_hash": agreement.activation_tx_hash,
            "challenge_deadline": agreement.challenge_deadline, "transactions": [transaction_payload(tx, latest) for tx in transactions],
            "backend_fault": stuck, "onchain": onchain,
        }).data)


class ChallengePackageView(APIView):
    permission_classes = [agent_scope(KeyScope.PAY)]

    @extend_schema(operation_id="escrow_challenge_package", tags=TAGS,
                   summary="What the buyer signs to dispute the proposed settlement",
                   responses={200: ChallengePackageSerializer, **error_responses(404, 409)})
    def get(self, request, agreement_id):
        agreement = agreement_selectors.agreement_get(agreement_id=agreement_id, agent=calling_agent(request))
        if agreement.status != "in_challenge":
            raise Conflict("Nothing to challenge now.", code="invalid_transition",
                           details={"status": agreement.status})
        deadline = int(agreement.challenge_deadline.timestamp())
        return Response(ChallengePackageSerializer({
            "deadline": deadline, "challenge_deadline": agreement.challenge_deadline,
            "challenge": settlement.challenge_typed_data(agreement=agreement, deadline=deadline),
        }).data)


class ChallengeView(APIView):
    permission_classes = [agent_scope(KeyScope.PAY)]

    @extend_schema(operation_id="escrow_challenge", tags=TAGS, request=ChallengeSerializer,
                   summary="Dispute the proposed settlement (buyer, within the window); submitted on-chain with "
                           "challengeWithSig. 202; the agreement becomes `disputed` once confirmed",
                   responses={202: ChainTransactionSerializer, **error_responses(404, 409, 422)})
    @idempotent()
    def post(self, request, agreement_id):
        agent = calling_agent(request)
        agreement = agreement_selectors.agreement_get(agreement_id=agreement_id, agent=agent)
        body = ChallengeSerializer(data=request.data)
        body.is_valid(raise_exception=True)
        tx = settlement.settlement_challenge(agreement=agreement, buyer=agent, **body.validated_data)
        return Response(ChainTransactionSerializer(transaction_payload(tx, None)).data,
                        status=status.HTTP_202_ACCEPTED)


class ResolveView(APIView):
    permission_classes = [IsOperator]

    @extend_schema(operation_id="escrow_resolve", tags=TAGS, request=ResolveSerializer, auth=[{"OwnerToken": []}],
                   summary="Decide a dispute (operators): the seller's amount; then the escrow is paid out",
                   responses={202: ChainTransactionSerializer, **error_responses(404, 409, 422)})
    @idempotent()
    def post(self, request, agreement_id):
        agreement = agreement_selectors.agreement_get(agreement_id=agreement_id, agent=None)
        body = ResolveSerializer(data=request.data)
        body.is_valid(raise_exception=True)
        tx = settlement.settlement_resolve(agreement=agreement, operator=request.user,
                                           seller_amount=body.validated_data["seller_amount_atomic"])
        return Response(ChainTransactionSerializer(transaction_payload(tx, None)).data,
                        status=status.HTTP_202_ACCEPTED)
