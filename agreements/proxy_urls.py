"""The metered proxy's routes, on their own: `marketplace.middleware.HotPathMiddleware` resolves a call against these
two patterns instead of the whole URL configuration (agreements.urls includes them in it too)."""

from django.urls import path, re_path
from django.urls.converters import UUIDConverter

from agreements import proxy, views

urlpatterns = [
    # The Pægents SDK's status of a metered agreement: the marketplace answers it, before the catch-all below
    # would forward (and charge) it.
    path("metered-proxy/<uuid:agreement_id>/status", views.MeteredStatusView.as_view()),
    # The path may be empty, which <path:> does not allow; the id is matched as strictly as <uuid:> does. The path
    # takes any character, line breaks too (`.` does not): upstream_path refuses them with 400, not no route's 404.
    re_path(rf"^metered-proxy/(?P<agreement_id>{UUIDConverter.regex})/(?P<path>[\s\S]*)$",
            proxy.MeteredProxyView.as_view()),
]
