from django.contrib import admin
from django.urls import include, path
from drf_spectacular.views import SpectacularSwaggerView

from marketplace import dashboard, health, metrics
from marketplace.openapi import SchemaView

handler400 = "marketplace.errors.handler400"
handler403 = "marketplace.errors.handler403"
handler404 = "marketplace.errors.handler404"
handler500 = "marketplace.errors.handler500"

urlpatterns = [
    path("admin/dashboard/", admin.site.admin_view(dashboard.dashboard_view), name="admin-dashboard"),
    path("admin/", admin.site.urls),
    path("healthz", health.HealthzView.as_view()),
    path("readyz", health.ReadyzView.as_view()),
    path("metrics", metrics.metrics_view),
    path("api/schema/", SchemaView.as_view(), name="schema"),
    path("api/docs/", SpectacularSwaggerView.as_view(url_name="schema"), name="docs"),
    path("", include("catalog.urls")),
    path("", include("policies.urls")),
    path("", include("agreements.urls")),
    path("", include("escrow.urls")),
]
