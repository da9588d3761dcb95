from django.urls import path, re_path

from catalog import masumi_registry, views

urlpatterns = [
    path("agents", views.OwnerAgentsView.as_view()),
    path("agents/me", views.MyAgentView.as_view()),
    path("agents/services", views.ServicesView.as_view()),
    path("agents/services/<uuid:service_id>", views.ServiceDetailView.as_view()),
    path("agents/services/<uuid:service_id>/proxy-secret/rotate", views.ServiceProxySecretRotateView.as_view()),
    path("agents/<uuid:agent_id>/api-keys", views.AgentApiKeysView.as_view()),
    path("agents/<uuid:agent_id>/wallet-proof", views.AgentWalletProofView.as_view()),
    path("agents/<uuid:agent_id>/api-keys/<int:key_id>/revoke", views.AgentApiKeyRevokeView.as_view()),
    path("owner-tokens", views.OwnerTokensView.as_view()),
    path("owner-tokens/<int:token_id>/revoke", views.OwnerTokenRevokeView.as_view()),
    path("catalog/search", views.CatalogSearchView.as_view()),
    re_path(r"^registry/?$", masumi_registry.RegistryView.as_view()),  # masumi-crewai calls `/registry/`
    path("wallet/recovery-challenge", views.WalletRecoveryChallengeView.as_view()),
    path("wallet/recover", views.WalletRecoverView.as_view()),
]
