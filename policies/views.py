from drf_spectacular.utils import extend_schema
from rest_framework.response import Response
from rest_framework.views import APIView

from catalog import selectors as catalog_selectors
from catalog.authentication import owner_scope, owner_scope_by_method
from catalog.models import OwnerScope
from marketplace.errors import InvalidInput
from marketplace.pagination import page_serializer, paginate
from marketplace.serializers import error_responses
from policies import selectors, services
from policies.serializers import (
    ApprovalListQuery,
    ApprovalSerializer,
    DecisionQuery,
    DecisionSerializer,
    PolicySerializer,
    PolicyShownSerializer,
)

OWNER = [{"OwnerToken": []}]
TAGS = ["policies and approvals"]


def _owned_agent(request, agent_id):
    """The agent, if the caller owns it; 404 otherwise (an owner never learns about others' agents)."""
    return catalog_selectors.agent_get(agent_id=agent_id, owner=request.user)


class PolicyView(APIView):
    permission_classes = [owner_scope_by_method(write=OwnerScope.ADMIN)]

    @extend_schema(operation_id="policies_get", summary="The agent's policy (owner)", tags=TAGS, auth=OWNER,
                   responses={200: PolicyShownSerializer, **error_responses(404)})
    def get(self, request, agent_id):
        agent = _owned_agent(request, agent_id)
        # to_representation, not .data: DRF's .data ignores an instance of None (no policy yet).
        return Response(PolicyShownSerializer().to_representation(selectors.policy_of(agent=agent)))

    @extend_schema(operation_id="policies_put", summary="Change the fields given of the agent's policy (owner)",
                   description="Fields left out are kept (null lifts a limit, [] empties a list); a body giving none "
                               "is 400 `empty_policy_update`.",
                   tags=TAGS, auth=OWNER, request=PolicySerializer,
                   responses={200: PolicyShownSerializer, **error_responses(404)})
    def put(self, request, agent_id):
        agent = _owned_agent(request, agent_id)
        body = PolicySerializer(data=request.data)
        body.is_valid(raise_exception=True)
        policy = services.policy_update(agent=agent, actor=request.user, changes=body.validated_data)
        return Response(PolicyShownSerializer(policy).data)


class ApprovalsView(APIView):
    permission_classes = [owner_scope(OwnerScope.READ)]

    @extend_schema(operation_id="approvals_list", summary="Approval requests of the agent, newest first (owner)",
                   tags=TAGS, auth=OWNER, parameters=[ApprovalListQuery],
                   responses={200: page_serializer(ApprovalSerializer, "ApprovalPage"), **error_responses(404)})
    def get(self, request, agent_id):
        agent = _owned_agent(request, agent_id)
        query = ApprovalListQuery(data=request.query_params)
        query.is_valid(raise_exception=True)
        rows, next_cursor = paginate(
            selectors.approvals_of_agent(agent=agent, status=query.validated_data.get("status")),
            ordering=["-created_at", "id"], cursor=query.validated_data.get("cursor"),
            limit=query.validated_data["limit"],
        )
        return Response({"results": ApprovalSerializer(rows, many=True).data, "next_cursor": next_cursor})


def _decision_view(approve: bool):
    verb = "approve" if approve else "reject"

    @extend_schema(operation_id=f"approvals_{verb}", tags=TAGS, auth=OWNER, request=DecisionSerializer,
                   parameters=[DecisionQuery],
                   summary=f"{verb.title()} a held purchase (owner, not the agent); repeating it is harmless",
                   responses={200: ApprovalSerializer, **error_responses(404, 409)})
    def post(self, request, agent_id, request_id):
        agent = _owned_agent(request, agent_id)
        body = DecisionSerializer(data=request.data or {})
        body.is_valid(raise_exception=True)
        query = DecisionQuery(data=request.query_params)
        query.is_valid(raise_exception=True)
        note, reason = body.validated_data["note"], query.validated_data["reason"]
        if note and reason and note != reason:
            raise InvalidInput("Give the note in the body or as ?reason=, not two different ones.",
                               code="duplicate_field")
        approval = selectors.approval_get(agent=agent, approval_id=request_id)
        approval = services.approval_decide(approval=approval, actor=request.user, approve=approve,
                                            note=note or reason)
        return Response(ApprovalSerializer(approval).data)

    return type(f"Approval{verb.title()}View", (APIView,), {"permission_classes": [owner_scope(OwnerScope.APPROVE)],
                                                                   "post": post})


ApproveView = _decision_view(approve=True)
RejectView = _decision_view(approve=False)
