"""The OpenAPI document view: generated once per process, safe under concurrent requests."""

import threading

from django.conf import settings
from django.http import HttpResponse
from drf_spectacular.utils import extend_schema
from drf_spectacular.views import SCHEMA_KWARGS, SpectacularAPIView


class SchemaView(SpectacularAPIView):
    """The schema, generated once per process and answered from memory after, rendered once per format: it is the
    same for every request (public, one version: `?version` and `?lang` are not read), and anyone may fetch it
    (counted per client only: RATE_LIMIT_ANONYMOUS); generated per request it took ~0.7 s of CPU under the lock
    below, so a few clients fetching it in a loop held every web thread. drf-spectacular's generation is not
    thread-safe (its lazily loaded extensions and generator stats are shared state; upstream issues
    tfranzel/drf-spectacular#1122 and #1368): concurrent first requests to a threaded server failed with 500, hence
    one generation at a time."""

    _generating = threading.Lock()
    _schema: dict | None = None
    _rendered: dict[type, bytes] = {}  # per renderer class (four)

    @extend_schema(**SCHEMA_KWARGS)  # what the parent's get() is documented with
    def get(self, request, *args, **kwargs):
        renderer = request.accepted_renderer
        with self._generating:
            if SchemaView._schema is None:
                generator = self.generator_class(urlconf=self.urlconf, api_version=self.api_version,
                                                 patterns=self.patterns)
                SchemaView._schema = generator.get_schema(request=request, public=self.serve_public)
            content = SchemaView._rendered.get(type(renderer))
            if content is None:  # with the renderer's own media type: a client's Accept parameters change nothing
                content = SchemaView._rendered[type(renderer)] = renderer.render(
                    SchemaView._schema, renderer.media_type, self.get_renderer_context())
        content_type = f"{renderer.media_type}; charset={renderer.charset}" if renderer.charset else renderer.media_type
        return HttpResponse(content, content_type=content_type, headers={
            "Content-Disposition": f'inline; filename="{self._get_filename(request, self.api_version)}"'})


# OpenAPI links: which response gives the id another operation takes, so a client (and the schema-driven fuzzer's
# stateful phase) can chain calls on real objects. Sources are listings (200 to a well-formed request), and a
# link joins operations one credential may call both of (an owner's agents lead to owner operations); each link
# names the target operation and where its path parameters come from.
_AGREEMENT_OPERATIONS = [
    "agreements_get", "agreements_accept", "agreements_reject", "agreements_cancel", "agreements_complete",
    "agreements_events", "agreements_usage", "agreements_record_usage", "escrow_activate",
    "escrow_activation_package", "escrow_challenge", "escrow_challenge_package", "escrow_status",
    "direct_payment_authorization_cancel", "direct_payment_authorization_cancel_package",
    "metered_proxy_get", "metered_proxy_post", "metered_proxy_put", "metered_proxy_patch", "metered_proxy_delete",
]
_AGENT_OPERATIONS = ["api_keys_list", "api_keys_issue", "approvals_list", "policies_get", "policies_put"]
LINKS: dict[str, dict[str, dict[str, str]]] = {
    # source operation -> {target operation: {target path parameter: runtime expression}}
    "agreements_list": {target: {"agreement_id": "$response.body#/results/0/id"} for target in _AGREEMENT_OPERATIONS},
    "agents_list": {target: {"agent_id": "$response.body#/0/id"} for target in _AGENT_OPERATIONS},
    "api_keys_list": {
        "api_keys_revoke": {"agent_id": "$request.path.agent_id", "key_id": "$response.body#/results/0/id"},
    },
    "owner_tokens_list": {"owner_tokens_revoke": {"token_id": "$response.body#/results/0/id"}},
    "approvals_list": {
        target: {"agent_id": "$request.path.agent_id", "request_id": "$response.body#/results/0/id"}
        for target in ("approvals_approve", "approvals_reject")
    },
    "services_list_own": {
        target: {"service_id": "$response.body#/results/0/id"}
        for target in ("services_get", "services_update", "services_deregister")
    },
    "webhooks_list": {
        target: {"subscription_id": "$response.body#/0/id"} for target in ("webhooks_delete", "webhooks_deliveries")
    },
}


def add_links(result, generator, request, public):
    """drf-spectacular postprocessing hook: `LINKS` on each source operation's 200 response."""
    for item in result["paths"].values():
        for operation in item.values():
            targets = LINKS.get(operation.get("operationId") if isinstance(operation, dict) else None)
            if targets:
                operation["responses"]["200"]["links"] = {
                    target: {"operationId": target, "parameters": parameters}
                    for target, parameters in targets.items()
                }
    return result


BODY_REFUSALS = {
    "413": ("The request body is larger than the platform reads", "request_too_large"),
    "415": ("The body is compressed (`unsupported_content_encoding`), in another charset than UTF-8 "
            "(`unsupported_charset`) or of another media type", "unsupported_media_type"),
}
# Operations that forward their query string unread (agreements.proxy): Django never parses it there.
_QUERY_FORWARDED = "metered_proxy_"


def _error_response(status_code: str, description: str, code: str) -> dict:
    return {
        "description": description,
        "content": {"application/json": {
            "schema": {"$ref": "#/components/schemas/Error"},
            "examples": {f"Error{status_code}": {
                "value": {"error": {"code": code, "message": "…", "details": {}}},
                "summary": f"error_{status_code}"}}}},
    }


def add_body_refusals(result, generator, request, public):
    """drf-spectacular postprocessing hook: the 413 and 415 every operation reading a body may answer
    (marketplace.parsers), documented on each such operation that does not list them itself."""
    for item in result["paths"].values():
        for operation in item.values():
            if not isinstance(operation, dict) or "requestBody" not in operation:
                continue
            for status_code, (description, code) in BODY_REFUSALS.items():
                operation["responses"].setdefault(status_code, _error_response(status_code, description, code))
    return result


def add_query_refusals(result, generator, request, public):
    """drf-spectacular postprocessing hook: the 400 `too_many_query_fields` every API view answers to a query string
    of more fields than Django reads (marketplace.errors: DRF reads the query string before the view runs, whatever
    the operation's parameters), documented as an example of each operation's 400."""
    max_fields = settings.DATA_UPLOAD_MAX_NUMBER_FIELDS
    for item in result["paths"].values():
        for operation in item.values():
            if not isinstance(operation, dict) or operation.get("operationId", "").startswith(_QUERY_FORWARDED):
                continue
            refusal = operation["responses"].setdefault("400", {
                "description": "The query string has more fields than the platform reads",
                "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}, "examples": {}}}})
            refusal["content"]["application/json"]["examples"]["TooManyQueryFields"] = {
                "value": {"error": {"code": "too_many_query_fields", "message": "…",
                                    "details": {"max_fields": max_fields}}},
                "summary": "too_many_query_fields",
                "description": f"The query string has more than {max_fields} fields (`DATA_UPLOAD_MAX_NUMBER_FIELDS`)."}
    return result
