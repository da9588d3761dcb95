from django.urls import path

from agreements import views

urlpatterns = [
    path("usage-agreements", views.AgreementsView.as_view()),
    path("usage-agreements/<uuid:agreement_id>", views.AgreementDetailView.as_view()),
    path("usage-agreements/<uuid:agreement_id>/events", views.AgreementEventsView.as_view()),
    path("usage-agreements/<uuid:agreement_id>/accept", views.AcceptView.as_view()),
    path("usage-agreements/<uuid:agreement_id>/reject", views.RejectView.as_view()),
    path("usage-agreements/<uuid:agreement_id>/cancel", views.CancelView.as_view()),
    path("payment-requirements", views.PaymentRequirementsView.as_view()),
    path("webhooks", views.WebhooksView.as_view()),
    path("webhooks/<uuid:subscription_id>", views.WebhookDetailView.as_view()),
    path("webhooks/<uuid:subscription_id>/deliveries", views.WebhookDeliveriesView.as_view()),
]
