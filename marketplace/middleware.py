import re
import uuid

from marketplace.logging import agreement_id_var, request_id_var

_CLIENT_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")


class RequestIdMiddleware:
    """Gives every request an id (the caller's `X-Request-Id` when well-formed), logged and echoed back."""

    def __init__(self, get_response):
        self.get_response = get_response

    def __call__(self, request):
        supplied = request.headers.get("X-Request-Id", "")
        request_id = supplied if _CLIENT_REQUEST_ID.match(supplied) else f"req_{uuid.uuid4().hex}"
        request.request_id = request_id
        # Not reset afterwards: Django logs the finished request (django.request) after middleware returns.
        request_id_var.set(request_id)
        agreement_id_var.set(None)  # set by the views that work on one agreement
        response = self.get_response(request)
        response["X-Request-Id"] = request_id
        return response
