"""One error shape for every failure: {"error": {"code", "message", "details"}}.

Services raise `ApplicationError` subclasses; `api_exception_handler` maps them and DRF's own exceptions to the
shape; `handler404`/`handler500` cover requests that never reach a DRF view.
"""

import logging
from typing import Any

from django.conf import settings
from django.core.exceptions import PermissionDenied as DjangoPermissionDenied
from django.core.exceptions import RequestDataTooBig, TooManyFieldsSent
from django.db import InterfaceError, OperationalError
from django.http import Http404, HttpResponse, JsonResponse
from rest_framework import exceptions as drf_exceptions
from rest_framework import status
from rest_framework.response import Response

from marketplace.renderers import rendered_response

logger = logging.getLogger(__name__)


class ApplicationError(Exception):
    status_code = status.HTTP_400_BAD_REQUEST
    code = "bad_request"
    message = "The request could not be processed."
    retry_after: int | None = None  # seconds: sent as Retry-After

    def __init__(self, message: str | None = None, *, code: str | None = None, details: dict | None = None):
        self.message = message or self.message
        self.code = code or self.code
        self.details = details or {}
        super().__init__(self.message)


class InvalidInput(ApplicationError):
    code = "invalid_input"


class NotFound(ApplicationError):
    status_code = status.HTTP_404_NOT_FOUND
    code = "not_found"
    message = "Not found."


class Forbidden(ApplicationError):
    status_code = status.HTTP_403_FORBIDDEN
    code = "forbidden"
    message = "You may not do this."


class Conflict(ApplicationError):
    status_code = status.HTTP_409_CONFLICT
    code = "conflict"
    message = "The request conflicts with the current state."


class PaymentRequired(ApplicationError):
    status_code = status.HTTP_402_PAYMENT_REQUIRED
    code = "payment_required"
    message = "Payment required."


class Unprocessable(ApplicationError):
    status_code = status.HTTP_422_UNPROCESSABLE_ENTITY
    code = "unprocessable"


class PayloadTooLarge(ApplicationError):
    status_code = status.HTTP_413_REQUEST_ENTITY_TOO_LARGE
    code = "request_too_large"
    message = "The request body is too large."


class UnsupportedMediaType(ApplicationError):
    status_code = status.HTTP_415_UNSUPPORTED_MEDIA_TYPE
    code = "unsupported_media_type"
    message = "The request body is in a form this API does not read."


class TooManyRequests(ApplicationError):
    status_code = status.HTTP_429_TOO_MANY_REQUESTS
    code = "rate_limited"
    message = "Too many requests; retry later."

    def __init__(self, message: str | None = None, *, retry_after: int, code: str | None = None,
                 details: dict | None = None):
        super().__init__(message, code=code, details=details)
        self.retry_after = retry_after


class DependencyUnavailable(ApplicationError):
    status_code = status.HTTP_503_SERVICE_UNAVAILABLE
    code = "dependency_unavailable"
    message = "A service this request depends on is unavailable; retry later."


class AuthenticationFailuresLimited(drf_exceptions.Throttled):
    """A client past its budget of failed authentications (marketplace.throttling.authentication_failure_count)."""

    default_detail = "Too many failed authentications from this client; retry later."
    default_code = "authentication_failures_limited"


def error_body(code: str, message: str, details: dict | None = None) -> dict[str, Any]:
    return {"error": {"code": code, "message": message, "details": details or {}}}


def _field_errors(detail: Any) -> Any:
    """DRF's nested ErrorDetail structure as JSON with a code next to every message."""
    if isinstance(detail, dict):
        return {key: _field_errors(value) for key, value in detail.items()}
    if isinstance(detail, list):
        return [_field_errors(item) for item in detail]
    return {"code": getattr(detail, "code", "invalid"), "message": str(detail)}


_DRF_CODES = {
    drf_exceptions.ParseError: "malformed_json",
    drf_exceptions.NotAuthenticated: "not_authenticated",
    drf_exceptions.MethodNotAllowed: "method_not_allowed",
    drf_exceptions.NotAcceptable: "not_acceptable",
    drf_exceptions.UnsupportedMediaType: "unsupported_media_type",
    AuthenticationFailuresLimited: "authentication_failures_limited",  # before Throttled, its base
    drf_exceptions.Throttled: "rate_limited",
    drf_exceptions.NotFound: "not_found",
}


def api_exception_handler(exc: Exception, context: dict) -> Response:
    if isinstance(exc, (OperationalError, InterfaceError)):  # the connection was lost, the database is restarting
        logger.warning("database unavailable", exc_info=exc)
        exc = DependencyUnavailable("The database is unavailable; retry later.", code="database_unavailable")
    if isinstance(exc, RequestDataTooBig):  # Django refused to read the body (DATA_UPLOAD_MAX_MEMORY_SIZE)
        exc = PayloadTooLarge()
    if isinstance(exc, TooManyFieldsSent):  # Django refused to read a query string of more fields than it parses
        exc = InvalidInput(f"The query string has more than {settings.DATA_UPLOAD_MAX_NUMBER_FIELDS} fields.",
                           code="too_many_query_fields",
                           details={"max_fields": settings.DATA_UPLOAD_MAX_NUMBER_FIELDS})
    if isinstance(exc, ApplicationError):
        headers = None if exc.retry_after is None else {"Retry-After": str(exc.retry_after)}
        return Response(error_body(exc.code, exc.message, exc.details), status=exc.status_code, headers=headers)
    if isinstance(exc, Http404):
        exc = drf_exceptions.NotFound()
    elif isinstance(exc, DjangoPermissionDenied):
        exc = drf_exceptions.PermissionDenied()
    if isinstance(exc, drf_exceptions.ValidationError):
        detail = exc.detail if isinstance(exc.detail, dict) else {"non_field_errors": exc.detail}
        body = error_body("validation_error", "The request body is invalid.", {"fields": _field_errors(detail)})
        return Response(body, status=status.HTTP_400_BAD_REQUEST)
    if isinstance(exc, drf_exceptions.APIException):
        code = next((c for cls, c in _DRF_CODES.items() if isinstance(exc, cls)), None)
        if code is None:
            codes = exc.get_codes()
            code = codes if isinstance(codes, str) else exc.default_code
        headers = {}
        if isinstance(exc, drf_exceptions.Throttled) and exc.wait is not None:
            headers["Retry-After"] = str(int(exc.wait))
        if isinstance(exc, (drf_exceptions.NotAuthenticated, drf_exceptions.AuthenticationFailed)):
            headers["WWW-Authenticate"] = 'Bearer realm="api"'
        return Response(error_body(code, str(exc.detail)), status=exc.status_code, headers=headers)
    logger.exception("unhandled error in API view", exc_info=exc)
    return Response(
        error_body("internal_error", "An internal error occurred; it has been logged."),
        status=status.HTTP_500_INTERNAL_SERVER_ERROR,
    )


def error_response(exc: Exception) -> HttpResponse:
    """`api_exception_handler`'s answer outside a DRF view's dispatch (the metered proxy's, a plain search's): the
    same body (rendered by the same renderer), status and headers."""
    answer = api_exception_handler(exc, {})
    response = rendered_response(answer.data, status=answer.status_code)
    for name, value in answer.items():
        if name.lower() != "content-type":  # DRF's is set when rendering
            response[name] = value
    return response


def handler404(request, exception=None):
    return JsonResponse(error_body("not_found", "No such endpoint."), status=404)


def handler500(request):
    return JsonResponse(error_body("internal_error", "An internal error occurred; it has been logged."), status=500)


def handler400(request, exception=None):
    return JsonResponse(error_body("bad_request", "Bad request."), status=400)


def handler403(request, exception=None):
    return JsonResponse(error_body("forbidden", "Forbidden."), status=403)
