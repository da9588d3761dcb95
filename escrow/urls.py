from django.urls import path, re_path

from catalog.models import HANDLE_PATTERN, SKILL_NAME_PATTERN
from catalog.services import RESERVED_HANDLES, RESERVED_SKILL_NAMES
from escrow import masumi_api, views


# Only well-formed names that registration allows: anything else under /agents/ (a malformed id under
# /agents/services/ or /agents/{id}/policies) is that route's 404, not this one's 405.
HANDLE = rf"(?!(?:{'|'.join(sorted(RESERVED_HANDLES))})/){HANDLE_PATTERN}"
SKILL = rf"(?!(?:{'|'.join(sorted(RESERVED_SKILL_NAMES))})$){SKILL_NAME_PATTERN}"

urlpatterns = [
    path("usage-agreements/<uuid:agreement_id>/activation-package", views.ActivationPackageView.as_view()),
    path("usage-agreements/<uuid:agreement_id>/activate-escrow", views.ActivateEscrowView.as_view()),
    path("usage-agreements/<uuid:agreement_id>/escrow-status", views.EscrowStatusView.as_view()),
    path("usage-agreements/<uuid:agreement_id>/challenge-package", views.ChallengePackageView.as_view()),
    path("usage-agreements/<uuid:agreement_id>/challenge", views.ChallengeView.as_view()),
    path("usage-agreements/<uuid:agreement_id>/resolve", views.ResolveView.as_view()),
    path("usage-agreements/<uuid:agreement_id>/dispute", views.DisputeView.as_view()),
    path("usage-agreements/<uuid:agreement_id>/deposit-params", views.DepositParamsView.as_view()),
    path("usage-agreements/<uuid:agreement_id>/claim-instructions", views.ClaimInstructionsView.as_view()),
    path("purchase", masumi_api.PurchaseView.as_view()),
    path("purchase/lock-funds", masumi_api.PurchaseLockFundsView.as_view()),
    re_path(rf"^agents/(?P<handle>{HANDLE})/(?P<skill>{SKILL})$", views.SkillInvokeView.as_view()),
]
