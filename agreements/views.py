from django.conf import settings
from drf_spectacular.utils import OpenApiExample, extend_schema
from rest_framework import status
from rest_framework.permissions import AllowAny
from rest_framework.response import Response
from rest_framework.views import APIView

from agreements import invocations, metering, selectors, services, webhooks
from agreements.serializers import (
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
)
from catalog import selectors as catalog_selectors
from catalog.authentication import agent_scope, calling_agent
from catalog.models import KeyScope
from marketplace import chainconfig
from marketplace.chainconfig import relayer_address
from marketplace.idempotency import idempotent
from marketplace.pagination import PageQuerySerializer, page_serializer, paginate
from marketplace.serializers import error_responses
from policies import selectors as policy_selectors

TAGS = ["usage agreements"]


def agreement_payload(agreement, *, many: bool = False):
    rows = agreement if many else [agreement]
    approvals = policy_selectors.approvals_for_subjects(
        subject_type=services.APPROVAL_SUBJECT, subject_ids=[row.pk for row in rows]
    )
    return AgreementSerializer(agreement, many=many, context={"approvals": approvals}).data


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
        agreements = selectors.agreements_of_agent(
            agent=calling_agent(request), role=query.validated_data.get("role"),
            status=query.validated_data.get("status"),
        )
        rows, next_cursor = paginate(agreements, ordering=["-created_at", "id"],
                                     cursor=query.validated_data.get("cursor"), limit=query.validated_data["limit"])
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
    @idempotent()
    def post(self, request):
        body = ProposalSerializer(data=request.data)
        body.is_valid(raise_exception=True)
        data = dict(body.validated_data)
        service = catalog_selectors.service_get_any_state(service_id=data.pop("service_id"))
        agreement = services.agreement_propose(buyer=calling_agent(request), service=service, **data)
        agreement = selectors.agreement_get(agreement_id=agreement.pk, agent=calling_agent(request))
        return Response(agreement_payload(agreement), status=status.HTTP_201_CREATED)


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


def _transition_view(*, operation_id: str, summary: str, action, with_reason: bool, method: str):
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

    handler = extend_schema(operation_id=operation_id, summary=summary, tags=TAGS,
                            request=ReasonSerializer if with_reason else None,
                            responses={200: AgreementSerializer, **error_responses(404, 409)})(handler)
    return type(f"{operation_id.title().replace('_', '')}View", (APIView,), {
        "permission_classes": [agent_scope(KeyScope.PAY)], method: handler,
    })


AcceptView = _transition_view(
    operation_id="agreements_accept", summary="Accept a proposal (seller); repeating it is harmless",
    action=lambda agreement, agent: services.agreement_accept(agreement=agreement, seller=agent),
    with_reason=False, method="put")
RejectView = _transition_view(
    operation_id="agreements_reject", summary="Reject a proposal (seller)",
    action=lambda agreement, agent, reason: services.agreement_reject(agreement=agreement, seller=agent,
                                                                      reason=reason),
    with_reason=True, method="put")
CancelView = _transition_view(
    operation_id="agreements_cancel", summary="Cancel before activation (buyer)",
    action=lambda agreement, agent, reason: services.agreement_cancel(agreement=agreement, buyer=agent,
                                                                      reason=reason),
    with_reason=True, method="post")


class PaymentRequirementsView(APIView):
    permission_classes = [agent_scope(KeyScope.READ)]

    @extend_schema(operation_id="payment_requirements", tags=["payments"], parameters=[PaymentRequirementsQuery],
                   summary="Fee, total and where to pay for an amount (direct purchases: 2% + $0.003, minimum $0.10 by "
                           "default; skill invocations: no fee)",
                   responses={200: PaymentRequirementsSerializer, **error_responses()})
    def get(self, request):
        query = PaymentRequirementsQuery(data=request.query_params)
        query.is_valid(raise_exception=True)
        cents = query.validated_data.get("amount_cents")
        amount = query.validated_data.get("amount_atomic") or cents * 10_000  # USDC: 6 decimals, 1 cent = 10^4
        schedule = services.fee_schedule_current()
        purpose = query.validated_data["purpose"]
        fee = (invocations.invocation_fee(amount=amount) if purpose == "skill_invocation"
               else services.fee_for(amount=amount, schedule=schedule))
        return Response(PaymentRequirementsSerializer({
            "rail": query.validated_data["rail"], "purpose": purpose, "amount_atomic": amount, "fee_atomic": fee,
            "total_atomic": amount + fee, "amount_cents": cents, "fee_cents": -(-fee // 10_000),
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
                   responses={201: WebhookCreatedSerializer, **error_responses(422)})
    @idempotent()
    def post(self, request):
        body = WebhookCreateSerializer(data=request.data)
        body.is_valid(raise_exception=True)
        subscription = webhooks.subscription_create(agent=calling_agent(request), **body.validated_data)
        return Response(WebhookCreatedSerializer(subscription).data, status=status.HTTP_201_CREATED)


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
        agreement = selectors.agreement_get(agreement_id=agreement_id, agent=calling_agent(request))
        rows, next_cursor = paginate(selectors.usage_events(agreement=agreement), ordering=["seq"],
                                     cursor=query.validated_data.get("cursor"), limit=query.validated_data["limit"])
        return Response({"results": UsageEventSerializer(rows, many=True).data, "next_cursor": next_cursor})


class RecordUsageView(APIView):
    permission_classes = [agent_scope(KeyScope.PAY)]
    throttle_scope = "payments"

    @extend_schema(operation_id="agreements_record_usage", tags=["metering"], request=RecordUsageSerializer,
                   summary="Seller reports usage (Idempotency-Key required); a batch is all-or-nothing",
                   responses={201: RecordedUsageSerializer, **error_responses(402, 404, 409, 422, 429)})
    @idempotent(required=True)
    def post(self, request, agreement_id):
        agent = calling_agent(request)
        agreement = selectors.agreement_get(agreement_id=agreement_id, agent=agent)
        body = RecordUsageSerializer(data=request.data)
        body.is_valid(raise_exception=True)
        events = metering.usage_record(agreement=agreement, seller=agent, entries=body.entries(),
                                       request_id=request._request.request_id)
        used = events[-1].cumulative
        return Response(RecordedUsageSerializer({"events": events, "used_atomic": used,
                                                 "remaining_atomic": agreement.deposit_amount - used}).data,
                        status=status.HTTP_201_CREATED)


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
        metering.completion_request(agreement=agreement,
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
