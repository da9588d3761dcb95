from django.contrib import admin
from django.urls import include, path
from drf_spectacular.views import SpectacularAPIView, SpectacularSwaggerView

handler400 = "marketplace.errors.handler400"
handler403 = "marketplace.errors.handler403"
handler404 = "marketplace.errors.handler404"
handler500 = "marketplace.errors.handler500"

urlpatterns = [
    path("admin/", admin.site.urls),
    path("api/schema/", SpectacularAPIView.as_view(), name="schema"),
    path("api/docs/", SpectacularSwaggerView.as_view(url_name="schema"), name="docs"),
    path("", include("catalog.urls")),
    path("", include("policies.urls")),
    path("", include("agreements.urls")),
    path("", include("escrow.urls")),
]
