from django.urls import path, re_path
from django.urls.converters import UUIDConverter

from agreements import proxy, views

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
    # The path may be empty, which <path:> does not allow; the id is matched as strictly as <uuid:> does.
    re_path(rf"^metered-proxy/(?P<agreement_id>{UUIDConverter.regex})/(?P<path>.*)$", proxy.MeteredProxyView.as_view()),
    path("payment-requirements", views.PaymentRequirementsView.as_view()),
    path("services/<str:invocation_id>", views.InvocationView.as_view()),
    path("webhooks", views.WebhooksView.as_view()),
    path("webhooks/<uuid:subscription_id>", views.WebhookDetailView.as_view()),
    path("webhooks/<uuid:subscription_id>/deliveries", views.WebhookDeliveriesView.as_view()),
]
