from datetime import timedelta

from django.conf import settings
from django.utils import timezone
from drf_spectacular.utils import OpenApiParameter, extend_schema
from rest_framework import status
from rest_framework.permissions import AllowAny
from rest_framework.response import Response
from rest_framework.views import APIView

from agreements import selectors as agreement_selectors
from agreements import services as agreement_services
from agreements.models import (
    AgreementStatus,
    InvocationStatus,
    SettlementModel,
    is_activation_stuck,
    is_funded,
)
from agreements.serializers import (
    InvocationAcceptedSerializer,
    InvocationResultSerializer,
    InvokeSerializer,
    AgreementSerializer,
    X402PaymentRequiredSerializer,
    agreement_payload,
    invocation_payment,
)
from catalog import selectors as catalog_selectors
from catalog.authentication import agent_scope, anyone_or_agent_scope, calling_agent
from catalog.models import ApiKey, KeyScope
from catalog.authentication import operator_with
from escrow import chain, selectors, services, settlement, x402_onchain
from escrow.serializers import (
    ActivateEscrowSerializer,
    ActivationAcceptedSerializer,
    ActivationPackageSerializer,
    ChainTransactionSerializer,
    ChallengePackageSerializer,
    ChallengeSerializer,
    ClaimInstructionsSerializer,
    DepositParamsSerializer,
    DisputeSerializer,
    ResolveSerializer,
    EscrowStatusQuery,
    EscrowStatusSerializer,
    NetworkConfigSerializer,
    PaymentAuthorizationCancelAcceptedSerializer,
    PaymentAuthorizationCancelPackageSerializer,
    PaymentAuthorizationCancelSerializer,
)
from marketplace import chainconfig
from marketplace.errors import Conflict, InvalidInput, error_body
from marketplace.idempotency import idempotent
from marketplace.serializers import ErrorSerializer, error_responses
from marketplace.throttling import client_address, client_network

TAGS = ["escrow"]
WITHDRAW_SIGNATURE = "withdraw(bytes32,(address,address,address,address,uint256,uint64,uint64,uint256))"


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


class NetworkConfigView(APIView):
    authentication_classes = []
    permission_classes = [AllowAny]

    @extend_schema(operation_id="network_config", tags=TAGS,
                   summary="Chain, escrow contract, token and its EIP-712 domain, receipt signer, gas wallet and fee "
                           "schedule. For dev chains: an SDK on a public network pins these instead of trusting them.",
                   responses={200: NetworkConfigSerializer, **error_responses(503)})
    def get(self, request):
        return Response(NetworkConfigSerializer(selectors.network_config()).data)


class ActivationPackageView(APIView):
    permission_classes = [agent_scope(KeyScope.PAY)]

    @extend_schema(operation_id="escrow_activation_package", tags=TAGS,
                   summary="What the buyer signs to fund the escrow: an EIP-712 intent and one EIP-2612 permit "
                           "of deposit + fee",
                   responses={200: ActivationPackageSerializer, **error_responses(404, 409, 503)})
    def get(self, request, agreement_id):
        agent = calling_agent(request)
        agreement = agreement_selectors.agreement_get(agreement_id=agreement_id, agent=agent)
        if agreement.buyer_id == agent.pk:  # else refused by activation_package
            agreement = services.intent_nonce_renew(agreement=agreement)
        # A Masumi purchase's package is signed until its payByTime, as lock-funds requires (the buyer fetches it
        # again here after revoking the intent nonce of the one handed out at purchase).
        deadline = selectors.purchase_pay_by_time(agreement_id=agreement.pk)
        return Response(ActivationPackageSerializer(services.activation_package(agreement=agreement, buyer=agent,
                                                                                deadline=deadline)).data)


class ActivateEscrowView(APIView):
    permission_classes = [agent_scope(KeyScope.PAY)]
    throttle_scope = "payments"

    @extend_schema(
        operation_id="escrow_activate", tags=TAGS, request=ActivateEscrowSerializer,
        summary="Submit the signed package. 202: queued for the relayer; poll the agreement or escrow-status "
                "until `active` (or `activation_failed` with the reason).",
        description="403 `policy_denied` (with `details.rule`) or `approval_required` when the buyer's owner policy, "
                    "as it is now, refuses the money moving now: nothing is queued and the agreement stays as it was.",
        responses={202: ActivationAcceptedSerializer, **error_responses(402, 404, 409, 422, 429, 503)},
    )
    @idempotent(atomic=False)  # verifies against the chain before it writes
    def post(self, request, agreement_id):
        agent = calling_agent(request)
        agreement = agreement_selectors.agreement_get(agreement_id=agreement_id, agent=agent)
        body = ActivateEscrowSerializer(data=request.data)
        body.is_valid(raise_exception=True)
        tx = services.activation_submit(agreement=agreement, buyer=agent, **body.validated_data)
        return Response(ActivationAcceptedSerializer({
            "agreement_id": agreement.pk, "status": AgreementStatus.SUBMITTING,
            "transaction": transaction_payload(tx, None),
        }).data, status=status.HTTP_202_ACCEPTED)


class PaymentAuthorizationCancelView(APIView):
    permission_classes = [agent_scope(KeyScope.PAY)]
    throttle_scope = "payments"

    @extend_schema(operation_id="direct_payment_authorization_cancel_package", tags=TAGS,
                   summary="A direct purchase that is off: the EIP-3009 CancelAuthorization its buyer signs to revoke "
                           "its x402 payment authorization (POST it here)",
                   responses={200: PaymentAuthorizationCancelPackageSerializer,
                              **error_responses(403, 404, 409, 503)})
    def get(self, request, agreement_id):
        agent = calling_agent(request)
        agreement = agreement_selectors.agreement_get(agreement_id=agreement_id, agent=agent)
        with chain.unavailable_as_503():  # the token's EIP-712 domain, read from the token until cached
            typed = agreement_services.agreement_payment_authorization_cancel_typed_data(agreement=agreement,
                                                                                         buyer=agent)
        return Response(PaymentAuthorizationCancelPackageSerializer({
            "agreement_id": agreement.pk, "cancel_authorization": typed}).data)

    @extend_schema(
        operation_id="direct_payment_authorization_cancel", tags=TAGS, request=PaymentAuthorizationCancelSerializer,
        summary="A direct purchase that is off (rejected, cancelled, expired, payment_failed): the relayer submits the "
                "buyer's signed EIP-3009 CancelAuthorization of its x402 payment authorization (valid until its "
                "validBefore otherwise: anyone holding it could still move the money). 202; asked again, the same "
                "transaction.",
        description="Sign `CancelAuthorization(authorizer, nonce)` in the token's EIP-712 domain, `nonce` the "
                    "authorization's (GET here hands out the typed data; the SDK's `cancel_payment_authorization`). "
                    "409 `purchase_still_open` while the purchase may still pay, `authorization_already_used` when "
                    "the token counts it used or cancelled already, `transaction_would_revert` when the token would "
                    "refuse it otherwise (its simulation; `details.revert_reason`). 429 `relay_cancel_budget_exhausted` "
                    "past the cancels relayed for the buyer of purchases whose payment was never sent: send your "
                    "signed cancel to the token yourself.",
        responses={202: PaymentAuthorizationCancelAcceptedSerializer, **error_responses(403, 404, 409, 422, 429, 503)},
    )
    @idempotent(atomic=False)  # reads the chain before it writes
    def post(self, request, agreement_id):
        agent = calling_agent(request)
        agreement = agreement_selectors.agreement_get(agreement_id=agreement_id, agent=agent)
        body = PaymentAuthorizationCancelSerializer(data=request.data)
        body.is_valid(raise_exception=True)
        with chain.unavailable_as_503():  # the token's domain and authorizationState, read from the token
            tx = x402_onchain.direct_authorization_cancel(agreement=agreement, buyer=agent, **body.validated_data)
        return Response(PaymentAuthorizationCancelAcceptedSerializer({
            "agreement_id": agreement.pk, "transaction": transaction_payload(tx, None)}).data,
            status=status.HTTP_202_ACCEPTED)


class EscrowStatusView(APIView):
    permission_classes = [agent_scope(KeyScope.READ)]

    @extend_schema(operation_id="escrow_status", tags=TAGS, parameters=[EscrowStatusQuery],
                   summary="Escrow amounts, transactions and confirmations; `verify=true` adds the contract's view",
                   responses={200: EscrowStatusSerializer, **error_responses(404, 503)})
    def get(self, request, agreement_id):
        query = EscrowStatusQuery(data=request.query_params)
        query.is_valid(raise_exception=True)
        agreement = agreement_selectors.agreement_get(agreement_id=agreement_id, agent=calling_agent(request))
        transactions = list(selectors.transactions_of_agreement(agreement_id=agreement.pk))
        mined = any(tx.mined_block_number is not None for tx in transactions)
        latest = selectors.chain_head_shown() if mined else None  # confirmations of none mined are 0
        onchain = None
        if query.validated_data["verify"]:
            with chain.unavailable_as_503():
                onchain = selectors.onchain_escrow(agreement=agreement)
        return Response(EscrowStatusSerializer({
            "agreement_id": agreement.pk, "onchain_id": agreement.onchain_id, "status": agreement.status,
            "escrow_status": agreement_selectors.escrow_status_of(agreement), "settlement_status": agreement.status,
            "chain_id": agreement.chain_id,
            "escrow_contract": chainconfig.escrow_address(), "deposit_amount_atomic": agreement.deposit_amount,
            "deposited_atomic": agreement.deposit_amount if is_funded(agreement) else 0,
            "used_atomic": agreement.used,
            "reserved_atomic": agreement.reserved, "remaining_atomic": agreement.remaining,
            "infra_fee_atomic": agreement.infra_fee, "activation_tx_hash": agreement.activation_tx_hash,
            "challenge_deadline": agreement.challenge_deadline, "transactions": [transaction_payload(tx, latest) for tx in transactions],
            "backend_fault": is_activation_stuck(agreement, now=timezone.now()), "onchain": onchain,
        }).data)


class ChallengePackageView(APIView):
    permission_classes = [agent_scope(KeyScope.PAY)]

    @extend_schema(operation_id="escrow_challenge_package", tags=TAGS,
                   summary="What the buyer signs to dispute the proposed settlement",
                   responses={200: ChallengePackageSerializer, **error_responses(404, 409, 503)})
    def get(self, request, agreement_id):
        agreement = agreement_selectors.agreement_get(agreement_id=agreement_id, agent=calling_agent(request))
        with chain.unavailable_as_503():  # a proposal not indexed yet is read from the chain
            challenge_deadline = settlement.challenge_deadline(agreement=agreement)
        deadline = int(challenge_deadline.timestamp())
        return Response(ChallengePackageSerializer({
            "deadline": deadline, "challenge_deadline": challenge_deadline,
            "challenge": settlement.challenge_typed_data(agreement=agreement, deadline=deadline),
        }).data)


class ChallengeView(APIView):
    permission_classes = [agent_scope(KeyScope.PAY)]

    @extend_schema(operation_id="escrow_challenge", tags=TAGS, request=ChallengeSerializer,
                   summary="Dispute the proposed settlement (buyer, within the window); submitted on-chain with "
                           "challengeWithSig. 202; the agreement becomes `disputed` once confirmed; 409 "
                           "`transaction_would_revert` when the escrow would refuse it (its simulation); never "
                           "refused by the buyer's relay budget",
                   responses={202: ChainTransactionSerializer, **error_responses(404, 409, 422, 503)})
    @idempotent(atomic=False)  # reads the chain (its clock, the escrow) before it writes
    def post(self, request, agreement_id):
        agent = calling_agent(request)
        agreement = agreement_selectors.agreement_get(agreement_id=agreement_id, agent=agent)
        body = ChallengeSerializer(data=request.data)
        body.is_valid(raise_exception=True)
        with chain.unavailable_as_503():
            tx = settlement.settlement_challenge(agreement=agreement, buyer=agent, **body.validated_data)
        return Response(ChainTransactionSerializer(transaction_payload(tx, None)).data,
                        status=status.HTTP_202_ACCEPTED)


class DisputeView(APIView):
    permission_classes = [agent_scope(KeyScope.PAY)]

    @extend_schema(
        operation_id="escrow_dispute", tags=TAGS, request=DisputeSerializer,
        summary="Dispute the proposed settlement (buyer, within the window), in the Pægents SDK's shape. The escrow "
                "contract takes a challenge only with the buyer wallet's signature: without `deadline` and "
                "`signature` the answer is 400 `buyer_signature_required` carrying the typed data to sign. 202 with "
                "the agreement; it becomes `disputed` once the challenge is confirmed",
        responses={202: AgreementSerializer, **error_responses(404, 409, 422, 503)})
    @idempotent(atomic=False)  # reads the chain (its clock, the escrow) before it writes
    def post(self, request, agreement_id):
        agent = calling_agent(request)
        agreement = agreement_selectors.agreement_get(agreement_id=agreement_id, agent=agent)
        body = DisputeSerializer(data=request.data)
        body.is_valid(raise_exception=True)
        data = body.validated_data
        if "signature" not in data or "deadline" not in data:
            with chain.unavailable_as_503():  # a proposal not indexed yet is read from the chain
                deadline = int(settlement.challenge_deadline(agreement=agreement).timestamp())
            raise InvalidInput(
                "The escrow contract takes a dispute only with the buyer wallet's signature: sign `challenge` "
                "(EIP-712) and send it as `signature` with this `deadline`.", code="buyer_signature_required",
                details={"deadline": deadline,
                         "challenge": settlement.challenge_typed_data(agreement=agreement, deadline=deadline)})
        with chain.unavailable_as_503():
            settlement.settlement_challenge(agreement=agreement, buyer=agent, reason=data["reason"],
                                            evidence=data.get("evidence", ""), deadline=data["deadline"],
                                            signature=data["signature"])
        return Response(agreement_payload(agreement_selectors.agreement_get(agreement_id=agreement_id, agent=agent)),
                        status=status.HTTP_202_ACCEPTED)


class DepositParamsView(APIView):
    permission_classes = [agent_scope(KeyScope.READ)]

    @extend_schema(operation_id="escrow_deposit_params", tags=TAGS,
                   summary="Chain, token, escrow and amounts of the agreement (the Pægents SDK's deposit-params); "
                           "what the buyer signs is in the activation package",
                   responses={200: DepositParamsSerializer, **error_responses(404)})
    def get(self, request, agreement_id):
        agreement = agreement_selectors.agreement_get(agreement_id=agreement_id, agent=calling_agent(request))
        return Response(DepositParamsSerializer({
            "agreement_id": agreement.pk, "chain_id": agreement.chain_id,
            "usdc_address": agreement.token_address or chainconfig.usdc_address(),
            "escrow_contract_address": chainconfig.escrow_address(), "service_amount_atomic": agreement.deposit_amount,
            "infra_fee_amount_atomic": agreement.infra_fee, "per_call_fee_amount_atomic": 0,
            "onchain_agreement_id": agreement.onchain_id, "gas_wallet_address": chainconfig.relayer_address(),
            "buyer_wallet_address": agreement.buyer_wallet_address, "pricing_version": None,
        }).data)


class ClaimInstructionsView(APIView):
    permission_classes = [agent_scope(KeyScope.READ)]

    @extend_schema(operation_id="escrow_claim_instructions", tags=TAGS,
                   summary="What the calling party can still withdraw from the escrow, with the unsigned "
                           "withdraw(id, terms) call (finalize pays out by itself; this is for a failed transfer)",
                   responses={200: ClaimInstructionsSerializer, **error_responses(404, 409, 503)})
    def get(self, request, agreement_id):
        agent = calling_agent(request)
        agreement = agreement_selectors.agreement_get(agreement_id=agreement_id, agent=agent)
        if agreement.settlement_model != SettlementModel.ESCROW:
            raise Conflict("A direct payment has no escrow.", code="not_an_escrow")
        with chain.unavailable_as_503():
            onchain = selectors.onchain_escrow(agreement=agreement)
        claimable = int(onchain["sellerClaimable" if agent.pk == agreement.seller_id else "buyerClaimable"])
        call = None
        if claimable:
            contract = chain.escrow_contract()
            call = {"to": contract.address, "value": "0",
                    "data": contract.encode_abi("withdraw", args=[agreement.onchain_id,
                                                                  chain.terms_of_activation(onchain)])}
        return Response(ClaimInstructionsSerializer({
            "agreement_id": agreement.pk, "onchain_agreement_id": agreement.onchain_id,
            "function": WITHDRAW_SIGNATURE, "claimable_atomic": claimable, "transaction": call,
            "chain_id": agreement.chain_id, "closed": onchain["state"] in selectors.ESCROW_CLOSED_STATES,
        }).data)


class ResolveView(APIView):
    # The admin's dispute form needs the same permission (escrow.admin.DisputeAdmin.resolve_view).
    permission_classes = [operator_with("escrow.change_dispute")]

    @extend_schema(operation_id="escrow_resolve", tags=TAGS, request=ResolveSerializer, auth=[{"OwnerToken": []}],
                   summary="Decide a dispute (operators): the seller's amount; then the escrow is paid out. Only "
                           "before the dispute's on-chain timeout (30 days after the challenge; then 409 "
                           "`dispute_timed_out`: the whole deposit goes back to the buyer)",
                   responses={202: ChainTransactionSerializer, **error_responses(404, 409, 422)})
    @idempotent(prepare=lambda view, request, agreement_id: _resolution_prepared(request, agreement_id))
    def post(self, request, agreement_id, prepared: settlement.Resolution):
        tx = settlement.settlement_resolution_record(resolution=prepared, operator=request.user)
        return Response(ChainTransactionSerializer(transaction_payload(tx, None)).data,
                        status=status.HTTP_202_ACCEPTED)


def _resolution_prepared(request, agreement_id) -> settlement.Resolution:
    """The decision checked against the chain (the escrow, its clock) before the idempotent request's transaction
    opens: no transaction stays open while the node answers."""
    agreement = agreement_selectors.agreement_get(agreement_id=agreement_id, agent=None)
    body = ResolveSerializer(data=request.data)
    body.is_valid(raise_exception=True)
    return settlement.settlement_resolution_prepare(agreement=agreement,
                                                    seller_amount=body.validated_data["seller_amount_atomic"])


def _quote_holder(request) -> str:
    """Whom a 402's quoted authorization is kept for: the calling agent, else the client's address."""
    if isinstance(request.auth, ApiKey):
        return f"agent:{request.auth.agent_id}"
    return f"address:{client_address(request)}"


def _payment_required_response(request, skill, *, code: str, message: str, reason: str = "",
                               details: dict | None = None) -> Response:
    """x402 v2's 402: its `PaymentRequired` body (`error` is our code, as x402's error string; `message` and
    `details` beside it) and PAYMENT-REQUIRED header, with an authorization quoted for a bare signature."""
    required, headers = x402_onchain.invocation_payment_required(
        skill, holder=_quote_holder(request), absolute_url=request.build_absolute_uri, error=code)
    body = {**required.model_dump(mode="json", by_alias=True, exclude_none=True), "message": message,
            "details": {**({"x402_reason": reason} if reason else {}), **(details or {})}}
    return Response(body, status=status.HTTP_402_PAYMENT_REQUIRED, headers=headers)


def _payment_response_headers(invocation) -> dict[str, str]:
    """PAYMENT-RESPONSE once the payment is on-chain."""
    if not invocation.payment_tx_hash:
        return {}
    return agreement_services.payment_response_header(invocation.authorization, tx_hash=invocation.payment_tx_hash)


class SkillInvokeView(APIView):
    # x402: the signed payment is the credential. An agent API key, when sent, names the buyer: it must be able to pay.
    permission_classes = [anyone_or_agent_scope(KeyScope.PAY)]
    throttle_scope = "payments"  # per key, else per client address

    @extend_schema(
        operation_id="services_invoke", tags=["services"], request=InvokeSerializer,
        summary="Invoke a seller's skill, paid with x402",
        description="`handle` is the agent's handle or ID. Without a payment: 402 with "
                    "X-Payment-Amount/Currency/Address/Chain headers, x402 v2's PAYMENT-REQUIRED header and "
                    "`PaymentRequired` body (`error` is the code). Retry with the signed payment (x402 base64 "
                    "PaymentPayload, scheme exact: an EIP-3009 authorization of the skill's price to "
                    "X-Payment-Address) in `X-Payment-Signature`, `X-PAYMENT` or `PAYMENT-SIGNATURE`; or a bare "
                    "signature (`0x...`) of the authorization the 402 quoted (X-Payment-Nonce, -Valid-After, "
                    "-Valid-Before, payee and amount), whose payer is the calling agent's wallet or `X-Payment-From`. "
                    "The payment is executed on-chain "
                    "to the platform treasury, then the seller is called: 200 with the result and x402's "
                    "PAYMENT-RESPONSE header (202 with an "
                    "invocation id for async skills, or when the payment takes long to confirm). The seller is "
                    "paid when the invocation completes; a failed or timed-out invocation is refunded. A payment "
                    "is bound to the skill whose 402 quoted it (`extra.resource`, the skill's path). A refused "
                    "payment (replayed, quoted for another skill, wrong amount or recipient, expired, bad "
                    "signature) is 402 with its code, "
                    "and nothing is charged. The authorization's nonce is the idempotency key: a retry with the "
                    "same signed payment is 402 `authorization_already_used`, naming the `invocation_id` it bought "
                    "to a retry of the same call only (the same input, by the same agent's key, or anonymously "
                    "with `X-Payment-Retry-Proof`, the paying wallet's EIP-191 signature of \"Retry the skill "
                    "invocation paid by x402 authorization {nonce} from {payer}\", both lowercase: the SDK's "
                    "`sign_retry_proof`): the payment's transaction shows the signed payment to anyone. "
                    "Called with an agent's API key, the payment is a purchase by that agent: its owner's policy "
                    "decides on the skill's price as on a direct purchase (blocked or allowed sellers, services "
                    "and tags, token, max per agreement, and the daily and monthly spend caps, which count the "
                    "agent's invocations as well as its agreements) before any money moves. A denial is 403 "
                    "`policy_denied` with `details.rule`; a price the policy would send to the owner for approval "
                    "is 403 `approval_required` (with `details.rule`): a synchronous paid call cannot wait for an "
                    "approval, so nothing is recorded or charged (propose an agreement instead). Without an API "
                    "key (the payment alone) no owner and no policy apply; but a wallet proven by an agent whose "
                    "owner set it a policy or deactivated it is refused so, 403 `agent_key_required` "
                    "(`details.wallet`): that agent pays with its API key. A buyer party (the agent's owner, and "
                    "the paying wallet) whose invocations of this seller failed and were refunded "
                    "INVOCATION_FAILURES_PER_BUYER_SELLER times within INVOCATION_FAILURE_WINDOW_SECONDS (or of "
                    "all sellers INVOCATION_FAILURES_PER_BUYER times) is 429 `seller_failing_for_you` "
                    "(`details.bound`, `details.retry_after_seconds`, Retry-After) before anything is quoted or "
                    "paid; the seller's other buyers are unaffected.",
        parameters=[*(OpenApiParameter(name, str, OpenApiParameter.HEADER, required=False,
                                       description="The signed x402 payment.")
                      for name in agreement_services.PAYMENT_HEADERS),
                    OpenApiParameter(agreement_services.PAYER_HEADER, str, OpenApiParameter.HEADER, required=False,
                                     description="The payer of a bare signature, for a caller without an agent "
                                                 "API key."),
                    OpenApiParameter(agreement_services.RETRY_PROOF_HEADER, str, OpenApiParameter.HEADER,
                                     required=False, description="An anonymous payer's retry with the same signed "
                                                                 "payment: its wallet's signature naming the "
                                                                 "authorization (see above).")],
        responses={200: InvocationResultSerializer, 202: InvocationAcceptedSerializer,
                   402: X402PaymentRequiredSerializer, 502: ErrorSerializer, 504: ErrorSerializer,
                   **error_responses(403, 404, 409, 429, 503)},
    )
    def post(self, request, handle, skill):
        skill = catalog_selectors.skill_get(handle=handle, skill_name=skill)
        agreement_services.invocation_priced_check(skill)
        buyer = request.auth.agent if isinstance(request.auth, ApiKey) else None
        # An agent's party is known before any quote; an anonymous payer's once its payment is read (invocation_pay).
        agreement_services.invocation_failures_check(seller=skill.service.seller, buyer=buyer,
                                                     payer=buyer.wallet_address if buyer else "")
        body = InvokeSerializer(data=request.data)
        body.is_valid(raise_exception=True)
        header = agreement_services.payment_header(request.headers)
        if not header:
            return _payment_required_response(request, skill, code="payment_required",
                                              message="Pay for this skill with x402 and retry.")
        payment = x402_onchain.SignedPayment(
            header=header, holder=_quote_holder(request),
            payer=buyer.wallet_address if buyer else request.headers.get(agreement_services.PAYER_HEADER),
            retry_proof=request.headers.get(agreement_services.RETRY_PROOF_HEADER, ""))
        try:
            outcome = x402_onchain.invocation_invoke(skill=skill, buyer=buyer, input=body.validated_data["input"],
                                                     payment=payment, client=client_network(request),
                                                     wait_seconds=settings.INVOCATION_PAYMENT_WAIT_SECONDS)
        except agreement_services.InvalidPayment as invalid:
            return _payment_required_response(request, skill, code=invalid.code, message=invalid.message,
                                              reason=invalid.reason, details=invalid.details)
        invocation = outcome.invocation
        if outcome.payment_failure:
            return _payment_required_response(request, skill, code="payment_failed", message=(
                f"The payment did not execute; nothing was charged: {outcome.payment_failure}"))
        if outcome.in_background:
            return Response(InvocationAcceptedSerializer({
                "invocation_id": invocation.public_id, "status": invocation.status,
                "estimated_completion": invocation.deadline_at or timezone.now() + timedelta(
                    seconds=invocation.timeout_seconds)}).data, status=status.HTTP_202_ACCEPTED,
                headers=_payment_response_headers(invocation))
        if invocation.status == InvocationStatus.COMPLETED:
            return Response(InvocationResultSerializer({"invocation_id": invocation.public_id,
                                                        "result": invocation.result,
                                                        "payment": invocation_payment(invocation)}).data,
                            headers=_payment_response_headers(invocation))
        code, http = (("invocation_timeout", 504) if invocation.status == InvocationStatus.TIMEOUT
                      else ("invocation_failed", 502))
        return Response(error_body(code, f"The skill did not complete ({invocation.error}); the payment is being "
                                         "refunded.", {"invocation_id": invocation.public_id}), status=http)
