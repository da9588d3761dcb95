import re

from django.conf import settings
from drf_spectacular.utils import OpenApiExample, extend_schema
from rest_framework import status
from rest_framework.exceptions import APIException, Throttled
from rest_framework.permissions import AllowAny
from rest_framework.response import Response
from rest_framework.views import APIView

from agreements import invocations, metering, selectors, services, webhooks
from agreements.serializers import (
    AgentDeliveryQuery,
    AgentWebhookCreateSerializer,
    AgentWebhookDeliverySerializer,
    AgentWebhookRotatedSerializer,
    AgentWebhookSecretSerializer,
    AgentWebhookSerializer,
    CallProofPageSerializer,
    CumulativeReceiptPageSerializer,
    EVENT_ID_PATTERN,
    EventAckSerializer,
    InboxEventSerializer,
    InboxQuery,
    MeteredUsageStatusSerializer,
    ProofPageQuery,
    InvocationSerializer,
    AgreementEventSerializer,
    CompleteSerializer,
    RecordedUsageSerializer,
    RecordUsageSerializer,
    UsageEventSerializer,
    AgreementListQuery,
    AgreementSerializer,
    PaymentRequirementsQuery,
    PaymentRequirementsSerializer,
    ProposalSerializer,
    ReasonSerializer,
    WebhookCreatedSerializer,
    WebhookCreateSerializer,
    WebhookDeliverySerializer,
    WebhookSerializer,
    agreement_payload,
    plain_usage_report,
    usage_entries,
)
from catalog import selectors as catalog_selectors
from catalog.authentication import (
    KeyHolder,
    acting_agent,
    agent_key_holder,
    agent_or_owner,
    agent_scope,
    calling_agent,
)
from catalog.models import KeyScope
from marketplace import chainconfig
from marketplace.chainconfig import relayer_address
from marketplace import bounded_json
from marketplace.errors import ApplicationError, InvalidInput, NotFound, api_exception_handler
from marketplace.idempotency import HEADER as IDEMPOTENCY_HEADER
from marketplace.idempotency import answer_once, fingerprint_of, idempotent, key_acceptable, shown_once
from marketplace.throttling import agent_budgets, windows_wait
from marketplace.pagination import PageQuerySerializer, page_serializer, paginate
from marketplace.parsers import plain_json_post
from marketplace.serializers import SecretRotationSerializer, cents_of, error_responses
from sdk import receipts

TAGS = ["usage agreements"]


class AgreementsView(APIView):
    throttle_scope = {"POST": "payments"}

    def get_permissions(self):
        return [agent_scope(KeyScope.READ if self.request.method == "GET" else KeyScope.PAY)()]

    @extend_schema(operation_id="agreements_list", summary="Your agreements, as buyer or seller",
                   parameters=[AgreementListQuery], tags=TAGS,
                   responses={200: page_serializer(AgreementSerializer, "AgreementPage"), **error_responses()})
    def get(self, request):
        query = AgreementListQuery(data=request.query_params)
        query.is_valid(raise_exception=True)
        rows, next_cursor = selectors.agreements_page_of_agent(
            agent=calling_agent(request), role=query.validated_data.get("role"),
            status=query.validated_data.get("status"), cursor=query.validated_data.get("cursor"),
            limit=query.validated_data["limit"])
        return Response({"results": agreement_payload(rows, many=True), "next_cursor": next_cursor})

    @extend_schema(
        operation_id="agreements_propose",
        summary="Propose an agreement to a seller (buyer). 201 as `proposed`, or `pending_approval` when the "
                "owner's policy wants a human decision; 403 `policy_denied` with the rule that denied it.",
        request=ProposalSerializer, tags=TAGS,
        examples=[OpenApiExample("escrow proposal", request_only=True, value={
            "service_id": "7c3f0b0e-9f1c-4d43-9a59-5c1d8c0e2a11", "settlement_model": "escrow", "quantity": 100,
            "buyer_wallet_address": "0x70997970C51812dc3A010C7d01b50e0d17dc79C8",
            "expires_at": "2026-12-31T00:00:00Z", "challenge_window_seconds": 3600})],
        responses={201: AgreementSerializer, **error_responses(404, 409, 422, 429)},
    )
    @idempotent(prepare=lambda view, request: _proposal_prepared(request))
    def post(self, request, prepared: services.Proposal):
        # The agreement as written, with its parties and service: what reading it again would give.
        agreement = services.agreement_propose(proposal=prepared)
        return Response(agreement_payload(agreement), status=status.HTTP_201_CREATED)


def _proposal_prepared(request) -> services.Proposal:
    """The proposal checked and priced before the idempotent request's transaction opens: a direct payment's fee
    permit may need the token's nonce from the chain."""
    body = ProposalSerializer(data=request.data)
    body.is_valid(raise_exception=True)
    data = dict(body.validated_data)
    seller_id = data.pop("seller_agent_id", None)
    buyer = calling_agent(request)
    if "service_id" in data:
        service = catalog_selectors.service_for_buyer(service_id=data.pop("service_id"), buyer=buyer)
    else:
        service = catalog_selectors.service_only_of_seller(seller_id=seller_id, buyer=buyer)
    return services.agreement_proposal_prepare(
        buyer=buyer, service=service,
        restated=services.RestatedTerms(seller_id=seller_id, unit=data.pop("unit", None),
                                        price_per_unit=data.pop("price_per_unit_cents", None)),
        **data)


class AgreementDetailView(APIView):
    permission_classes = [agent_scope(KeyScope.READ)]

    @extend_schema(operation_id="agreements_get", summary="One of your agreements", tags=TAGS,
                   responses={200: AgreementSerializer, **error_responses(404)})
    def get(self, request, agreement_id):
        return Response(agreement_payload(selectors.agreement_get(agreement_id=agreement_id,
                                                                  agent=calling_agent(request))))


class AgreementEventsView(APIView):
    permission_classes = [agent_scope(KeyScope.READ)]

    @extend_schema(operation_id="agreements_events", summary="The agreement's audit trail, oldest first",
                   parameters=[PageQuerySerializer], tags=TAGS,
                   responses={200: page_serializer(AgreementEventSerializer, "AgreementEventPage"),
                              **error_responses(404)})
    def get(self, request, agreement_id):
        query = PageQuerySerializer(data=request.query_params)
        query.is_valid(raise_exception=True)
        agreement = selectors.agreement_get(agreement_id=agreement_id, agent=calling_agent(request))
        rows, next_cursor = paginate(selectors.agreement_events(agreement=agreement), ordering=["id"],
                                     cursor=query.validated_data.get("cursor"), limit=query.validated_data["limit"])
        return Response({"results": AgreementEventSerializer(rows, many=True).data, "next_cursor": next_cursor})


def _transition_view(*, operation_id: str, summary: str, action, with_reason: bool, method: str,
                     description: str = "", errors: tuple[int, ...] = (404, 409)):
    """A view for one party action (accept, reject, cancel): 200 with the agreement, 409 when illegal."""

    def handler(self, request, agreement_id):
        agent = calling_agent(request)
        agreement = selectors.agreement_get(agreement_id=agreement_id, agent=agent)
        kwargs = {}
        if with_reason:
            body = ReasonSerializer(data=request.data or {})
            body.is_valid(raise_exception=True)
            kwargs["reason"] = body.validated_data["reason"]
        action(agreement=agreement, agent=agent, **kwargs)
        return Response(agreement_payload(selectors.agreement_get(agreement_id=agreement_id, agent=agent)))

    handler = extend_schema(operation_id=operation_id, summary=summary, description=description or None, tags=TAGS,
                            request=ReasonSerializer if with_reason else None,
                            responses={200: AgreementSerializer, **error_responses(*errors)})(handler)
    return type(f"{operation_id.title().replace('_', '')}View", (APIView,), {
        "permission_classes": [agent_scope(KeyScope.PAY)], method: handler,
    })


AcceptView = _transition_view(
    operation_id="agreements_accept",
    summary="Accept a proposal (seller); repeating it is harmless",
    description="A direct purchase is paid now: 403 `policy_denied` (with `details.rule`) or `approval_required` "
                "when the buyer's owner policy, as it is now, refuses that payment; it stays proposed, with an event "
                "saying why; 402 `insufficient_balance` (`details.committed`) when the buyer's balance covers it "
                "only without what the wallet's payments under way will take: it stays proposed, nothing sent; "
                "409 `payment_not_final` when the buyer's payment reached the seller already but is not yet at the "
                "confirmation depth: accept again shortly; 503 `chain_unavailable` while the chain cannot be read or "
                "gives no verdict on the payment (a node's error, backends apart): it stays proposed.",
    action=lambda agreement, agent: services.agreement_accept(agreement=agreement, seller=agent),
    with_reason=False, method="put", errors=(402, 404, 409, 503))
RejectView = _transition_view(
    operation_id="agreements_reject", summary="Reject a proposal (seller)",
    description="A direct purchase whose payment reached the seller already (the buyer, or anyone holding its "
                "authorization, sent it) is 409 `purchase_paid_already` naming the transfer (`details.used_by`): "
                "accept it, it is paid; 503 while the chain cannot be read.",
    action=lambda agreement, agent, reason: services.agreement_reject(agreement=agreement, seller=agent,
                                                                      reason=reason),
    with_reason=True, method="put", errors=(404, 409, 503))
CancelView = _transition_view(
    operation_id="agreements_cancel", summary="Cancel before activation (buyer)",
    action=lambda agreement, agent, reason: services.agreement_cancel(agreement=agreement, buyer=agent,
                                                                      reason=reason),
    with_reason=True, method="post")


class PaymentRequirementsView(APIView):
    permission_classes = [agent_scope(KeyScope.READ)]

    @extend_schema(operation_id="payment_requirements", tags=["payments"], parameters=[PaymentRequirementsQuery],
                   summary="Fee, total and where to pay for an amount (direct purchases: 2% + $0.003, minimum $0.10 by "
                           "default; skill invocations: the same, minimum INVOCATION_FEE_MINIMUM_ATOMIC, taken from the seller's payout)",
                   responses={200: PaymentRequirementsSerializer, **error_responses()})
    def get(self, request):
        query = PaymentRequirementsQuery(data=request.query_params)
        query.is_valid(raise_exception=True)
        cents = query.validated_data.get("amount_cents")
        amount = query.validated_data.get("amount_atomic") or cents * 10_000  # USDC: 6 decimals, 1 cent = 10^4
        schedule = services.fee_schedule_current()
        purpose = query.validated_data["purpose"]
        fee, total = services.fee_and_total_for(amount=amount, purpose=purpose, schedule=schedule)
        return Response(PaymentRequirementsSerializer({
            "rail": query.validated_data["rail"], "purpose": purpose, "amount_atomic": amount, "fee_atomic": fee,
            "total_atomic": total, "amount_cents": cents, "fee_cents": -(-fee // 10_000),
            "token": {"symbol": "USDC", "address": chainconfig.usdc_address(), "decimals": 6},
            "chain_id": settings.CHAIN_ID, "network": settings.CHAIN_NETWORK,
            "fee_recipient": services.fee_recipient(schedule), "gas_wallet_address": relayer_address(),
            "fee_schedule": {"percent_bps": schedule.percent_bps, "fixed_atomic": schedule.fixed_atomic,
                             "minimum_atomic": schedule.minimum_atomic},
        }).data)


class WebhooksView(APIView):
    permission_classes = [agent_scope(KeyScope.ADMIN)]

    @extend_schema(operation_id="webhooks_list", summary="Your webhook subscriptions", tags=["webhooks"],
                   responses={200: WebhookSerializer(many=True), **error_responses()})
    def get(self, request):
        return Response(WebhookSerializer(selectors.webhook_subscriptions_of(agent=calling_agent(request)),
                                          many=True).data)

    @extend_schema(operation_id="webhooks_create", tags=["webhooks"], request=WebhookCreateSerializer,
                   summary="Subscribe a URL to agreement events; the signing secret is shown once",
                   responses={201: WebhookCreatedSerializer, **error_responses(409, 422)})
    @idempotent()
    def post(self, request):
        body = WebhookCreateSerializer(data=request.data)
        body.is_valid(raise_exception=True)
        subscription = webhooks.subscription_create(agent=calling_agent(request), created_with=request.auth,
                                                    **body.validated_data)
        return shown_once(Response(WebhookCreatedSerializer(subscription).data, status=status.HTTP_201_CREATED),
                          "secret", kept_by=subscription)


class WebhookDetailView(APIView):
    permission_classes = [agent_scope(KeyScope.ADMIN)]

    @extend_schema(operation_id="webhooks_delete", summary="Unsubscribe", tags=["webhooks"],
                   responses={204: None, **error_responses(404)})
    def delete(self, request, subscription_id):
        subscription = selectors.webhook_subscription_get(agent=calling_agent(request),
                                                          subscription_id=subscription_id)
        webhooks.subscription_delete(subscription=subscription)
        return Response(status=status.HTTP_204_NO_CONTENT)


class WebhookDeliveriesView(APIView):
    permission_classes = [agent_scope(KeyScope.ADMIN)]

    @extend_schema(operation_id="webhooks_deliveries", summary="Delivery log of a subscription, newest first",
                   tags=["webhooks"], parameters=[PageQuerySerializer],
                   responses={200: page_serializer(WebhookDeliverySerializer, "WebhookDeliveryPage"),
                              **error_responses(404)})
    def get(self, request, subscription_id):
        query = PageQuerySerializer(data=request.query_params)
        query.is_valid(raise_exception=True)
        subscription = selectors.webhook_subscription_get(agent=calling_agent(request),
                                                          subscription_id=subscription_id)
        rows, next_cursor = paginate(selectors.webhook_deliveries(subscription=subscription),
                                     ordering=["-created_at", "id"], cursor=query.validated_data.get("cursor"),
                                     limit=query.validated_data["limit"])
        return Response({"results": WebhookDeliverySerializer(rows, many=True).data, "next_cursor": next_cursor})


class UsageView(APIView):
    permission_classes = [agent_scope(KeyScope.READ)]

    @extend_schema(operation_id="agreements_usage", tags=["metering"], parameters=[PageQuerySerializer],
                   summary="Usage events, oldest first, each verifiable with sdk.receipts.verify_usage",
                   responses={200: page_serializer(UsageEventSerializer, "UsageEventPage"), **error_responses(404)})
    def get(self, request, agreement_id):
        query = PageQuerySerializer(data=request.query_params)
        query.is_valid(raise_exception=True)
        events, signer = selectors.usage_events_and_signer_of_party(agreement_id=agreement_id,
                                                                    agent=calling_agent(request))
        rows, next_cursor = paginate(events, ordering=["seq"],
                                     cursor=query.validated_data.get("cursor"), limit=query.validated_data["limit"])
        return Response({"results": UsageEventSerializer(rows, many=True, context={"receipt_signer": signer}).data,
                         "next_cursor": next_cursor})


class RecordUsageView(APIView):
    """DRF describes this view and serves whatever is out of the ordinary. A plain report (`_plain_report`: an
    agent key, an Idempotency-Key, a JSON body of plainly valid entries) is served by `dispatch` without DRF's
    request wrapping, authentication classes, negotiation and throttle classes, which cost as much CPU as a batch's
    validation and answer, with the same answers: the same key rules (`agent_key_holder`), rate limits
    (`windows_wait`), idempotency (`answer_once`), handler and DRF's own rendering and error shape."""

    permission_classes = [agent_scope(KeyScope.PAY)]
    throttle_scope = "payments"

    @extend_schema(operation_id="agreements_record_usage", tags=["metering"], request=RecordUsageSerializer,
                   summary="Seller reports usage: events (Idempotency-Key required; a batch is all-or-nothing) or "
                           "the running total `units_used` (idempotent by itself)",
                   responses={201: RecordedUsageSerializer, **error_responses(402, 404, 409, 422, 429)})
    @idempotent()
    def post(self, request, agreement_id):
        return self._record(request, agreement_id, agent_id=calling_agent(request).pk)

    def dispatch(self, request, *args, **kwargs):
        plain = _plain_report(request)
        if plain is None:
            return super().dispatch(request, *args, **kwargs)
        holder, data, report = plain
        self.args, self.kwargs, self.request, self.headers = args, kwargs, request, self.default_response_headers
        request.accepted_renderer, request.accepted_media_type = self.get_renderers()[0], "application/json"
        try:
            wait = windows_wait(agent_budgets(agent_id=holder.agent_id, owner_id=holder.owner_id,
                                              scopes=("api", self.throttle_scope)))
            if wait is not None:
                raise Throttled(wait)
            response = answer_once(
                request, scope=f"agent:{holder.agent_id}", key=request.headers[IDEMPOTENCY_HEADER],
                fingerprint=fingerprint_of(request, data),
                handler=lambda: self._record(request, kwargs["agreement_id"], agent_id=holder.agent_id,
                                             report=report))
        except Exception as exc:
            response = api_exception_handler(exc, self.get_exception_handler_context())
            response.exception = True
        self.response = self.finalize_response(request, response, *args, **kwargs)
        return self.response

    def _record(self, request, agreement_id, *, agent_id, report: dict | None = None):
        # A plain report is known to add events, in the transaction `answer_once` holds: the agreement is read
        # under its row lock at once.
        locked = report is not None
        agreement, approvals = selectors.agreement_for_report(agreement_id=agreement_id, agent_id=agent_id,
                                                              lock=locked)
        if report is None:
            body = RecordUsageSerializer(data=request.data)
            body.is_valid(raise_exception=True)
            report = body.validated_data
        request_id = request.request_id
        if "units_used" in report:
            events = metering.usage_record_running_total(agreement=agreement, seller_id=agent_id,
                                                         units_used=report["units_used"], request_id=request_id,
                                                         description=report["description"])
            if report["completed"]:
                metering.completion_request(agreement=agreement, reason="completed by the seller")
        else:
            if IDEMPOTENCY_HEADER not in request.headers:
                raise InvalidInput(f"The {IDEMPOTENCY_HEADER} header is required to report usage events.",
                                   code="idempotency_key_required")
            events = metering.usage_record(agreement=agreement, seller_id=agent_id, entries=usage_entries(report),
                                           request_id=request_id, locked=locked)
        # `agreement` is as the report left it: read under its row lock, held to the commit.
        return Response(agreement_payload(agreement, serializer=RecordedUsageSerializer, approvals=approvals,
                                          events=events), status=status.HTTP_201_CREATED)


def _plain_report(request) -> tuple[KeyHolder, dict, dict] | None:
    """The caller's key, the parsed body and the validated report of a request DRF would take as it is, with a
    plain report (`plain_usage_report`); None for anything else, which DRF then serves. Nothing is counted or
    written before this decides."""
    key = request.headers.get(IDEMPOTENCY_HEADER)
    if not plain_json_post(request) or key is None or not key_acceptable(key):
        return None
    try:
        holder = agent_key_holder(request, scope=KeyScope.PAY)
        data = bounded_json.loads(request.body, max_bytes=settings.DATA_UPLOAD_MAX_MEMORY_SIZE, duplicate_keys=False)
    except (APIException, ApplicationError, bounded_json.InvalidJSON):  # DRF gives the error
        return None
    report = plain_usage_report(data)
    return None if report is None else (holder, data, report)


class CompleteView(APIView):
    permission_classes = [agent_scope(KeyScope.PAY)]

    @extend_schema(operation_id="agreements_complete", tags=["metering"], request=CompleteSerializer,
                   summary="End an active agreement (buyer or seller): no new charges; the settlement with the "
                           "used amount is proposed on-chain and the challenge window starts",
                   responses={200: AgreementSerializer, **error_responses(404, 409)})
    def post(self, request, agreement_id):
        agent = calling_agent(request)
        agreement = selectors.agreement_get(agreement_id=agreement_id, agent=agent)
        body = CompleteSerializer(data=request.data or {})
        body.is_valid(raise_exception=True)
        role = "buyer" if agreement.buyer_id == agent.pk else "seller"
        metering.party_completion_request(agreement=agreement,
                                          reason=body.validated_data["reason"] or f"completed by the {role}")
        return Response(agreement_payload(selectors.agreement_get(agreement_id=agreement_id, agent=agent)))


class InvocationView(APIView):
    # The invocation id is an unguessable capability returned to whoever paid: no API key needed (x402 callers).
    permission_classes = [AllowAny]

    @extend_schema(operation_id="services_invocation_get", tags=["services"],
                   summary="State of a skill invocation: pending, processing, completed, failed or timeout, with "
                           "the result and where the payment went (paid out to the seller, or refunded)",
                   responses={200: InvocationSerializer, **error_responses(404)})
    def get(self, request, invocation_id):
        return Response(InvocationSerializer(invocations.invocation_get(public_id=invocation_id)).data)


# --- the Pægents SDK's routes ----------------------------------------------------------------------------------


class MeteredStatusView(APIView):
    permission_classes = [agent_scope(KeyScope.READ)]

    @extend_schema(operation_id="metered_proxy_status", tags=["metering"],
                   summary="Usage of the agreement (the Pægents SDK's metered status): answered by the marketplace, "
                           "never forwarded to the seller, never charged",
                   responses={200: MeteredUsageStatusSerializer, **error_responses(404)})
    def get(self, request, agreement_id):
        agreement = selectors.agreement_get(agreement_id=agreement_id, agent=calling_agent(request))
        price = agreement.price_per_unit
        return Response(MeteredUsageStatusSerializer({
            "agreement_id": agreement.pk, "status": agreement.status, "escrow_status": selectors.escrow_status_of(agreement),
            "unit": agreement.unit_name, "price_per_unit_cents": cents_of(price), "price_per_unit_atomic": price,
            "units_total": agreement.quantity, "units_used": agreement.used // price,
            "units_remaining": agreement.remaining // price, "used_atomic": agreement.used,
            "reserved_atomic": agreement.reserved, "remaining_atomic": agreement.remaining,
        }).data)


def _proof_page(request, agreement_id, *, signed_only: bool):
    query = ProofPageQuery(data=request.query_params)
    query.is_valid(raise_exception=True)
    agreement = selectors.agreement_get(agreement_id=agreement_id, agent=calling_agent(request))
    events = selectors.usage_events(agreement=agreement)
    if signed_only:
        events = events.exclude(receipt_signature="")
    ordering = ["seq"] if query.validated_data["direction"] == "asc" else ["-seq"]
    rows, next_cursor = paginate(events, ordering=ordering, cursor=query.validated_data.get("cursor"),
                                 limit=query.validated_data["limit"])
    return agreement, rows, next_cursor


class CallProofsView(APIView):
    permission_classes = [agent_scope(KeyScope.READ)]

    @extend_schema(operation_id="agreements_call_proofs", tags=["metering"], parameters=[ProofPageQuery],
                   summary="Every usage event as a call proof of the hash chain (the Pægents SDK's shape)",
                   responses={200: CallProofPageSerializer, **error_responses(404)})
    def get(self, request, agreement_id):
        agreement, rows, next_cursor = _proof_page(request, agreement_id, signed_only=False)
        items = [{
            "proof_id": str(event.pk), "agreement_id": agreement.pk, "call_index": event.seq,
            "request_hash": receipts.usage_event_hash(
                agreement_id=agreement.onchain_id, seq=event.seq, units=event.units, cost=event.cost,
                cumulative_amount=event.cumulative, request_id=event.request_id),
            "response_hash": None, "chain_hash": event.usage_digest, "signature": event.receipt_signature,
            "cost_atomic": event.cost, "cumulative_amount_atomic": event.cumulative, "created_at": event.created_at,
        } for event in rows]
        return Response(CallProofPageSerializer({"items": items, "cursor": next_cursor,
                                                 "has_more": next_cursor is not None}).data)


class CumulativeReceiptsView(APIView):
    permission_classes = [agent_scope(KeyScope.READ)]

    @extend_schema(operation_id="agreements_cumulative_receipts", tags=["metering"], parameters=[ProofPageQuery],
                   summary="The signed cumulative UsageReceipts (the Pægents SDK's shape); the latest is what "
                           "settlement submits on-chain",
                   responses={200: CumulativeReceiptPageSerializer, **error_responses(404)})
    def get(self, request, agreement_id):
        agreement, rows, next_cursor = _proof_page(request, agreement_id, signed_only=True)
        signer = selectors.receipt_signer_of(agreement.receipt_signer)
        items = [{
            "receipt_id": str(event.pk), "agreement_id": agreement.pk,
            "cumulative_units": event.cumulative // agreement.price_per_unit,
            "cumulative_amount_atomic": event.cumulative, "price_per_unit_atomic": agreement.price_per_unit,
            "nonce": event.seq, "signature": event.receipt_signature, "signer": signer,
            "proof_hash": event.usage_digest, "created_at": event.created_at,
        } for event in rows]
        return Response(CumulativeReceiptPageSerializer({"items": items, "cursor": next_cursor,
                                                         "has_more": next_cursor is not None}).data)


class AgentAgreementsView(APIView):
    permission_classes = [agent_scope(KeyScope.READ)]

    @extend_schema(operation_id="agreements_of_agent", tags=TAGS, parameters=[AgreementListQuery],
                   summary="Your agreements as a plain list, newest first (the Pægents SDK's listing); "
                           "GET /usage-agreements pages them",
                   responses={200: AgreementSerializer(many=True), **error_responses(404)})
    def get(self, request, agent_id):
        agent = calling_agent(request)
        if agent.pk != agent_id:
            raise NotFound("No such agent.", code="agent_not_found")
        query = AgreementListQuery(data=request.query_params)
        query.is_valid(raise_exception=True)
        rows, _ = selectors.agreements_page_of_agent(
            agent=agent, role=query.validated_data.get("role"), status=query.validated_data.get("status"),
            cursor=query.validated_data.get("cursor"), limit=query.validated_data["limit"])
        return Response(agreement_payload(rows, many=True))


WEBHOOK_TAGS = ["webhooks"]
EITHER = [{"AgentKey": []}, {"OwnerToken": []}]


def _webhook_of(request, agent_id, subscription_id):
    agent = acting_agent(request, agent_id, scope=KeyScope.ADMIN)
    return selectors.webhook_subscription_get(agent=agent, subscription_id=subscription_id)


class AgentWebhooksView(APIView):
    permission_classes = [agent_or_owner(KeyScope.ADMIN)]

    @extend_schema(operation_id="agent_webhooks_list", tags=WEBHOOK_TAGS, auth=EITHER,
                   summary="The agent's webhook subscriptions (its admin key or its owner)",
                   responses={200: AgentWebhookSerializer(many=True), **error_responses(404)})
    def get(self, request, agent_id):
        agent = acting_agent(request, agent_id, scope=KeyScope.ADMIN)
        return Response(AgentWebhookSerializer(selectors.webhook_subscriptions_of(agent=agent), many=True).data)

    @extend_schema(operation_id="agent_webhooks_create", tags=WEBHOOK_TAGS, auth=EITHER,
                   request=AgentWebhookCreateSerializer,
                   summary="Subscribe a URL to the agent's agreement events, optionally with your own secret",
                   responses={201: AgentWebhookSecretSerializer, **error_responses(404, 409, 422)})
    @idempotent()
    def post(self, request, agent_id):
        agent = acting_agent(request, agent_id, scope=KeyScope.ADMIN)
        body = AgentWebhookCreateSerializer(data=request.data)
        body.is_valid(raise_exception=True)
        subscription = webhooks.subscription_create(agent=agent, created_with=request.auth, **body.validated_data)
        return shown_once(Response(AgentWebhookSecretSerializer(subscription).data, status=status.HTTP_201_CREATED),
                          "secret", kept_by=subscription)


class AgentWebhookRotateView(APIView):
    permission_classes = [agent_or_owner(KeyScope.ADMIN)]

    @extend_schema(operation_id="agent_webhooks_rotate", tags=WEBHOOK_TAGS, auth=EITHER,
                   request=SecretRotationSerializer,
                   summary="A new signing secret for the subscription, shown once; the replaced one also signs "
                           "deliveries (a second `v1`) for the overlap asked for",
                   responses={200: AgentWebhookRotatedSerializer, **error_responses(404, 422)})
    @idempotent()
    def post(self, request, agent_id, subscription_id):
        subscription = _webhook_of(request, agent_id, subscription_id)
        body = SecretRotationSerializer(data=request.data)
        body.is_valid(raise_exception=True)
        subscription = webhooks.subscription_rotate_secret(subscription=subscription, **body.validated_data)
        return shown_once(Response(AgentWebhookRotatedSerializer(subscription).data), "secret", kept_by=subscription)


def _pause_view(paused: bool):
    verb = "pause" if paused else "resume"

    @extend_schema(operation_id=f"agent_webhooks_{verb}", tags=WEBHOOK_TAGS, auth=EITHER, request=None,
                   summary=f"{verb.title()} deliveries to the subscription (events stay in the agent's inbox); "
                           "idempotent",
                   responses={200: AgentWebhookSerializer, **error_responses(404)})
    def post(self, request, agent_id, subscription_id):
        subscription = webhooks.subscription_pause(subscription=_webhook_of(request, agent_id, subscription_id),
                                                   paused=paused)
        return Response(AgentWebhookSerializer(subscription).data)

    return type(f"AgentWebhook{verb.title()}View", (APIView,), {
        "permission_classes": [agent_or_owner(KeyScope.ADMIN)], "post": post})


AgentWebhookPauseView = _pause_view(paused=True)
AgentWebhookResumeView = _pause_view(paused=False)


class AgentWebhookTestView(APIView):
    permission_classes = [agent_or_owner(KeyScope.ADMIN)]
    throttle_scope = "webhook_sends"  # each posts to every live subscription's URL, whoever's it is

    @extend_schema(operation_id="agent_webhooks_test", tags=WEBHOOK_TAGS, auth=EITHER, request=None,
                   summary="Send a signed `webhook.test` event to each live subscription of the agent "
                           "whose last test is not still being tried",
                   responses={202: AgentWebhookDeliverySerializer(many=True), **error_responses(404, 429)})
    def post(self, request, agent_id):
        agent = acting_agent(request, agent_id, scope=KeyScope.ADMIN)
        deliveries = webhooks.test_event_send(agent=agent)
        return Response(AgentWebhookDeliverySerializer(deliveries, many=True).data, status=status.HTTP_202_ACCEPTED)


class AgentWebhookDeliveriesView(APIView):
    permission_classes = [agent_or_owner(KeyScope.ADMIN)]

    @extend_schema(operation_id="agent_webhooks_deliveries", tags=WEBHOOK_TAGS, auth=EITHER,
                   parameters=[AgentDeliveryQuery], summary="Deliveries to all the agent's subscriptions, newest first",
                   responses={200: page_serializer(AgentWebhookDeliverySerializer, "AgentWebhookDeliveryPage"),
                              **error_responses(404)})
    def get(self, request, agent_id):
        agent = acting_agent(request, agent_id, scope=KeyScope.ADMIN)
        query = AgentDeliveryQuery(data=request.query_params)
        query.is_valid(raise_exception=True)
        rows, next_cursor = paginate(
            selectors.webhook_deliveries_of_agent(agent=agent, status=query.validated_data.get("status")),
            ordering=["-created_at", "id"], cursor=query.validated_data.get("cursor"),
            limit=query.validated_data["limit"])
        return Response({"results": AgentWebhookDeliverySerializer(rows, many=True).data, "next_cursor": next_cursor})


class AgentWebhookReplayView(APIView):
    permission_classes = [agent_or_owner(KeyScope.ADMIN)]
    throttle_scope = "webhook_sends"

    @extend_schema(operation_id="agent_webhooks_replay", tags=WEBHOOK_TAGS, auth=EITHER, request=None,
                   summary="Send a delivered or failed event again", responses={
                       202: AgentWebhookDeliverySerializer, **error_responses(404, 409, 429)})
    def post(self, request, agent_id, delivery_id):
        agent = acting_agent(request, agent_id, scope=KeyScope.ADMIN)
        delivery = webhooks.delivery_redeliver(delivery=selectors.webhook_delivery_get(agent=agent,
                                                                                       delivery_id=delivery_id))
        return Response(AgentWebhookDeliverySerializer(delivery).data, status=status.HTTP_202_ACCEPTED)


class AgentEventsView(APIView):
    permission_classes = [agent_or_owner(KeyScope.READ)]

    @extend_schema(operation_id="agent_events", tags=WEBHOOK_TAGS, auth=EITHER, parameters=[InboxQuery],
                   summary="The agent's inbox: events of its agreements, oldest first, whether or not webhooks "
                           "delivered them (poll with `after`)",
                   responses={200: InboxEventSerializer(many=True), **error_responses(404)})
    def get(self, request, agent_id):
        agent = acting_agent(request, agent_id, scope=KeyScope.READ)
        query = InboxQuery(data=request.query_params)
        query.is_valid(raise_exception=True)
        after = query.validated_data.get("after")
        events = selectors.inbox_events(agent=agent, types=query.validated_data.get("types", []),
                                        after=int(after[4:]) if after else None,
                                        limit=query.validated_data["limit"])
        return Response(InboxEventSerializer([{
            **_inbox_item(event), "status": "acked" if event.acked else "pending"} for event in events],
            many=True).data)


def _inbox_item(event) -> dict:
    payload = webhooks.event_payload(event.agreement, event, webhooks.event_type_of(event))
    return {"event_id": payload["id"], "type": payload["type"], "payload": payload["data"],
            "created_at": event.created_at}


class AgentEventAckView(APIView):
    permission_classes = [agent_or_owner(KeyScope.PAY)]

    @extend_schema(operation_id="agent_events_ack", tags=WEBHOOK_TAGS, auth=EITHER, request=None,
                   summary="Mark an inbox event handled (an agent key needs the `pay` scope); idempotent",
                   responses={200: EventAckSerializer, **error_responses(403, 404)})
    def post(self, request, agent_id, event_id):
        agent = acting_agent(request, agent_id, scope=KeyScope.PAY)  # a change: not for a read-only key
        if not re.fullmatch(EVENT_ID_PATTERN, event_id):  # fullmatch: `$` takes a trailing newline
            raise NotFound("No such event.", code="event_not_found")
        ack = webhooks.event_ack(agent=agent, event=selectors.inbox_event_get(agent=agent,
                                                                              event_id=int(event_id[4:])))
        return Response(EventAckSerializer({"event_id": event_id, "status": "acked", "acked_at": ack.acked_at}).data)
