import re
import secrets

from django.urls import resolve

from marketplace.errors import handler404
from marketplace.logging import agreement_id_var, request_id_var
from sdk.bounded_http import text_codec

_CLIENT_REQUEST_ID = re.compile(r"[A-Za-z0-9._:-]{1,128}")
# The web server's PATH_INFO (PEP 3333: latin-1 text of the path's bytes, percent-decoded once), kept when it is not
# ASCII: WSGIRequest replaces META["PATH_INFO"] with Django's reading of it, which escapes again the bytes that are not
# UTF-8 (the byte E9 becomes `%E9`, as a client's `%25E9` does). The metered proxy forwards the path's own bytes.
SERVER_PATH_INFO = "marketplace.server_path_info"


def keep_server_path_info(sender, environ=None, **kwargs) -> None:
    """A `request_started` receiver: Django sends the environ (its WSGI handler and the test client alike) before it
    builds the request from it. An ASCII path is Django's as it is: nothing kept."""
    if environ is not None and not (path := environ.get("PATH_INFO", "")).isascii():
        environ[SERVER_PATH_INFO] = path


class RequestIdMiddleware:
    """Gives every request an id (the caller's `X-Request-Id` when well-formed), logged and echoed back."""

    def __init__(self, get_response):
        self.get_response = get_response

    def __call__(self, request):
        supplied = request.META.get("HTTP_X_REQUEST_ID", "")  # request.headers answers a miss by raising KeyError
        request_id = supplied if _CLIENT_REQUEST_ID.fullmatch(supplied) else f"req_{secrets.token_hex(16)}"
        request.request_id = request_id
        # Not reset afterwards: Django logs the finished request (django.request) after middleware returns.
        request_id_var.set(request_id)
        agreement_id_var.set(None)  # set by the views that work on one agreement
        response = self.get_response(request)
        response["X-Request-Id"] = request_id
        return response


class RequestCharsetMiddleware:
    """A request's form and query string are read in the charset its Content-Type names only if that is a charset of
    text (`sdk.bounded_http.text_codec`), else in DEFAULT_CHARSET (UTF-8). Django takes any name Python has a codec
    for: a multipart login form (anyone may post one) in punycode is decoded in quadratic time (400 kB held a web
    thread 8.5 s, the 2.5 MB a form may carry many minutes), and bz2's or rot13's codec raised LookupError (500)."""

    def __init__(self, get_response):
        self.get_response = get_response

    def __call__(self, request):
        if request.encoding is not None and text_codec(request.encoding) is None:
            # As Django reads a charset no codec has. Not through the `encoding` setter: it evaluates request.GET
            # (a cached property) to drop it, in that very charset. Nothing before this middleware read the form.
            request._encoding = None
        return self.get_response(request)


class ApiPathMiddleware:
    """Routes the API as clients write paths: `/usage-agreements/` is `/usage-agreements` (the published Masumi and
    Pægents clients add the slash), and a path that matches no route answers 404 in the one error shape even with
    DEBUG on (Django's debug page is HTML). The admin, the schema pages and static files keep Django's own rules.

    It acts only after a request matched no route (Django leaves `resolver_match` unset then), so a routed request
    pays nothing for it."""

    _DJANGO_PREFIXES = ("/admin", "/api/", "/static/")

    def __init__(self, get_response):
        self.get_response = get_response

    def __call__(self, request):
        response = self.get_response(request)
        path = request.path_info
        if request.resolver_match is not None or response.status_code != 404 or path.startswith(self._DJANGO_PREFIXES):
            return response
        trimmed = path.rstrip("/")
        if trimmed and trimmed != path:
            request.path_info = trimmed  # no view ran: routing it again under the trimmed path is safe
            response = self.get_response(request)
            if request.resolver_match is not None:
                return response
        return handler404(request)


class HotPathMiddleware:
    """Serves the metered proxy (every call of every buyer) without the middleware after this one: sessions, CSRF,
    authentication, messages and clickjacking protection are for the admin's browser sessions, not for bearer-key
    calls whose view answers every error itself, and CommonMiddleware resolved the URL a second time to decide
    about a trailing slash. That was ~15% of a proxied call's CPU (bench/proxy.py). Kept before it: the request id
    and SecurityMiddleware's headers; kept here: the Host check against ALLOWED_HOSTS. The proxy keeps its own
    metrics (agreements.monitoring), so django-prometheus's request metrics leave these calls out."""

    PREFIX = "/metered-proxy/"
    URLCONF = "agreements.proxy_urls"  # its two routes, not the whole configuration

    def __init__(self, get_response):
        self.get_response = get_response

    def __call__(self, request):
        if not request.path_info.startswith(self.PREFIX):
            return self.get_response(request)
        request.get_host()  # DisallowedHost -> 400, as CommonMiddleware would
        match = resolve(request.path_info, urlconf=self.URLCONF)
        request.resolver_match = match
        response = match.func(request, *match.args, **match.kwargs)
        if callable(getattr(response, "render", None)):  # a DRF view's answer (the status route), as Django does
            response = response.render()
        return response
