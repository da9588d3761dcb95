from django.urls import path

from policies import views

urlpatterns = [
    path("agents/<uuid:agent_id>/policies", views.PolicyView.as_view()),
    path("agents/<uuid:agent_id>/approvals", views.ApprovalsView.as_view()),
    path("agents/<uuid:agent_id>/approvals/<uuid:request_id>/approve", views.ApproveView.as_view()),
    path("agents/<uuid:agent_id>/approvals/<uuid:request_id>/reject", views.RejectView.as_view()),
]
