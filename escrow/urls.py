from django.urls import path

from escrow import masumi_api, views

urlpatterns = [
    path("usage-agreements/<uuid:agreement_id>/activation-package", views.ActivationPackageView.as_view()),
    path("usage-agreements/<uuid:agreement_id>/activate-escrow", views.ActivateEscrowView.as_view()),
    path("usage-agreements/<uuid:agreement_id>/escrow-status", views.EscrowStatusView.as_view()),
    path("usage-agreements/<uuid:agreement_id>/challenge-package", views.ChallengePackageView.as_view()),
    path("usage-agreements/<uuid:agreement_id>/challenge", views.ChallengeView.as_view()),
    path("usage-agreements/<uuid:agreement_id>/resolve", views.ResolveView.as_view()),
    path("purchase", masumi_api.PurchaseView.as_view()),
    path("purchase/lock-funds", masumi_api.PurchaseLockFundsView.as_view()),
    path("agents/<str:handle>/<str:skill>", views.SkillInvokeView.as_view()),
]
