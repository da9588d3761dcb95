from django.urls import path, re_path

from catalog.models import HANDLE_PATTERN, SKILL_NAME_PATTERN
from catalog.services import RESERVED_HANDLES, RESERVED_SKILL_NAMES
from escrow import masumi_node, views


# Only well-formed names that registration allows: anything else under /agents/ (a malformed id under
# /agents/services/ or /agents/{id}/policies) is that route's 404, not this one's 405.
HANDLE = rf"(?!(?:{'|'.join(sorted(RESERVED_HANDLES))})/){HANDLE_PATTERN}"
# A purchase by its blockchainIdentifier or its id (the masumi library's GET /purchase/{id}).
PURCHASE_REF = r"(?:0x[0-9a-fA-F]{64}|[0-9a-fA-F]{8}(?:-[0-9a-fA-F]{4}){3}-[0-9a-fA-F]{12})"
SKILL = rf"(?!(?:{'|'.join(sorted(RESERVED_SKILL_NAMES))})$){SKILL_NAME_PATTERN}"

urlpatterns = [
    path("network-config", views.NetworkConfigView.as_view()),
    path("usage-agreements/<uuid:agreement_id>/activation-package", views.ActivationPackageView.as_view()),
    path("usage-agreements/<uuid:agreement_id>/activate-escrow", views.ActivateEscrowView.as_view()),
    path("usage-agreements/<uuid:agreement_id>/escrow-status", views.EscrowStatusView.as_view()),
    path("usage-agreements/<uuid:agreement_id>/cancel-payment-authorization",
         views.PaymentAuthorizationCancelView.as_view()),
    path("usage-agreements/<uuid:agreement_id>/challenge-package", views.ChallengePackageView.as_view()),
    path("usage-agreements/<uuid:agreement_id>/challenge", views.ChallengeView.as_view()),
    path("usage-agreements/<uuid:agreement_id>/resolve", views.ResolveView.as_view()),
    path("usage-agreements/<uuid:agreement_id>/dispute", views.DisputeView.as_view()),
    path("usage-agreements/<uuid:agreement_id>/deposit-params", views.DepositParamsView.as_view()),
    path("usage-agreements/<uuid:agreement_id>/claim-instructions", views.ClaimInstructionsView.as_view()),
    # Masumi node paths answer with or without a trailing slash (the masumi library calls `/purchase/`).
    re_path(r"^purchase/?$", masumi_node.PurchaseView.as_view()),
    re_path(r"^purchase/lock-funds/?$", masumi_node.PurchaseLockFundsView.as_view()),
    re_path(r"^purchase/request-refund/?$", masumi_node.PurchaseRequestRefundView.as_view()),
    re_path(r"^purchase/cancel-refund-request/?$", masumi_node.PurchaseCancelRefundRequestView.as_view()),
    re_path(rf"^purchase/(?P<purchase_ref>{PURCHASE_REF})/?$", masumi_node.PurchaseDetailView.as_view()),
    re_path(r"^payment/?$", masumi_node.PaymentView.as_view()),
    re_path(r"^payment/resolve-blockchain-identifier/?$", masumi_node.PaymentResolveView.as_view()),
    re_path(r"^payment/submit-result/?$", masumi_node.PaymentSubmitResultView.as_view()),
    re_path(r"^payment/authorize-refund/?$", masumi_node.PaymentAuthorizeRefundView.as_view()),
    re_path(r"^payment-source/?$", masumi_node.PaymentSourceView.as_view()),
    re_path(r"^payment-information/?$", masumi_node.PaymentInformationView.as_view()),
    re_path(rf"^agents/(?P<handle>{HANDLE})/(?P<skill>{SKILL})$", views.SkillInvokeView.as_view()),
]
