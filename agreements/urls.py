from django.urls import include, path

from agreements import views

urlpatterns = [
    path("usage-agreements", views.AgreementsView.as_view()),
    path("usage-agreements/<uuid:agreement_id>", views.AgreementDetailView.as_view()),
    path("usage-agreements/<uuid:agreement_id>/events", views.AgreementEventsView.as_view()),
    path("usage-agreements/<uuid:agreement_id>/accept", views.AcceptView.as_view()),
    path("usage-agreements/<uuid:agreement_id>/reject", views.RejectView.as_view()),
    path("usage-agreements/<uuid:agreement_id>/cancel", views.CancelView.as_view()),
    path("usage-agreements/<uuid:agreement_id>/usage", views.UsageView.as_view()),
    path("usage-agreements/<uuid:agreement_id>/record-usage", views.RecordUsageView.as_view()),
    path("usage-agreements/<uuid:agreement_id>/complete", views.CompleteView.as_view()),
    path("usage-agreements/<uuid:agreement_id>/call-proofs", views.CallProofsView.as_view()),
    path("usage-agreements/<uuid:agreement_id>/cumulative-receipts", views.CumulativeReceiptsView.as_view()),
    path("usage-agreements/agents/<uuid:agent_id>/agreements", views.AgentAgreementsView.as_view()),
    path("", include("agreements.proxy_urls")),
    path("payment-requirements", views.PaymentRequirementsView.as_view()),
    path("services/<str:invocation_id>", views.InvocationView.as_view()),
    path("webhooks", views.WebhooksView.as_view()),
    path("webhooks/<uuid:subscription_id>", views.WebhookDetailView.as_view()),
    path("webhooks/<uuid:subscription_id>/deliveries", views.WebhookDeliveriesView.as_view()),
    # The Pægents SDK's webhook and inbox routes, per agent (`webhooks` and `events` are reserved skill names).
    path("agents/<uuid:agent_id>/webhooks", views.AgentWebhooksView.as_view()),
    path("agents/<uuid:agent_id>/webhooks/test", views.AgentWebhookTestView.as_view()),
    path("agents/<uuid:agent_id>/webhooks/deliveries", views.AgentWebhookDeliveriesView.as_view()),
    path("agents/<uuid:agent_id>/webhooks/deliveries/<uuid:delivery_id>/replay",
         views.AgentWebhookReplayView.as_view()),
    path("agents/<uuid:agent_id>/webhooks/<uuid:subscription_id>/rotate", views.AgentWebhookRotateView.as_view()),
    path("agents/<uuid:agent_id>/webhooks/<uuid:subscription_id>/pause", views.AgentWebhookPauseView.as_view()),
    path("agents/<uuid:agent_id>/webhooks/<uuid:subscription_id>/resume", views.AgentWebhookResumeView.as_view()),
    path("agents/<uuid:agent_id>/events", views.AgentEventsView.as_view()),
    path("agents/<uuid:agent_id>/events/<str:event_id>/ack", views.AgentEventAckView.as_view()),
]
