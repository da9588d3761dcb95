"""The request-body parser of every API view: a JSON object, read through `marketplace.bounded_json`, at most
DATA_UPLOAD_MAX_MEMORY_SIZE bytes, with no key given twice in an object (400 `duplicate_key`: Python's json keeps
the last, other parsers the first, and a caller's SDK, proxy or log must not read a payment otherwise than we do).

Every endpoint's body is an object of named fields; anything else (`false`, `[]`, `"x"`) is a client that means
something we would not read, so it is refused here, once, rather than coerced to "no fields" view by view. The
metered proxy forwards bodies as they are and never parses them.
"""

import codecs
import json

from django.conf import settings
from rest_framework.exceptions import ErrorDetail, ValidationError
from rest_framework.parsers import JSONParser

from marketplace import bounded_json
from marketplace.errors import ApplicationError, InvalidInput, PayloadTooLarge, UnsupportedMediaType


def json_refusal(error: bounded_json.InvalidJSON) -> ApplicationError | ValidationError:
    """The API error for JSON a caller sent that `bounded_json` refused: a NUL character or a lone surrogate is a
    validation error naming the field, with the code DRF's own check of text fields gives; NaN, Infinity and numbers
    beyond a float's range are `malformed_json`, as are integers longer than Python reads."""
    if error.reason == "too_large":
        return PayloadTooLarge(f"The request body is larger than {settings.DATA_UPLOAD_MAX_MEMORY_SIZE} bytes.",
                               details={"max_bytes": settings.DATA_UPLOAD_MAX_MEMORY_SIZE})
    if error.reason == "duplicate_key":
        return InvalidInput(str(error), code="duplicate_key", details={"key": error.key})
    if error.reason == "malformed":
        return InvalidInput(str(error), code="malformed_json")
    if error.reason in ("nul_character", "surrogate"):
        detail = [ErrorDetail("Null characters are not allowed.", code="null_characters_not_allowed")
                  if error.reason == "nul_character" else
                  ErrorDetail("Surrogate characters are not allowed.", code="surrogate_characters_not_allowed")]
        for step in reversed(error.path or ("non_field_errors",)):
            detail = {step: detail}
        return ValidationError(detail)
    return InvalidInput(str(error), code="invalid_json", details={"max_depth": settings.JSON_MAX_DEPTH})


def unread_body_refusal(request, body: bytes) -> UnsupportedMediaType | None:
    """Why a body that is no JSON as read (UTF-8, as it came) was sent so: compressed (its Content-Encoding), or in
    another charset than UTF-8, declared or not (JSON is UTF-8, RFC 8259); None when it is just malformed. Asked only
    of a body that failed: one that reads is read as before, whatever its headers say."""
    request = getattr(request, "_request", request)  # DRF's request wraps Django's
    coding = request.headers.get("Content-Encoding", "").strip()
    if coding and coding.lower() != "identity":
        return UnsupportedMediaType(f"Content-Encoding {coding} is not read: send the JSON uncompressed.",
                                    code="unsupported_content_encoding", details={"content_encoding": coding})
    charset = request.content_params.get("charset") or json.detect_encoding(body)
    try:
        utf8 = codecs.lookup(charset).name in ("utf-8", "utf-8-sig")
    except LookupError:
        utf8 = False
    if utf8:
        return None
    return UnsupportedMediaType(f"The body is in {charset}: JSON is read in UTF-8 only.", code="unsupported_charset",
                                details={"charset": charset})


class BoundedJSONParser(JSONParser):
    def parse(self, stream, media_type=None, parser_context=None):
        limit = settings.DATA_UPLOAD_MAX_MEMORY_SIZE
        body = stream.read(limit + 1)
        try:
            data = bounded_json.loads(body, max_bytes=limit, duplicate_keys=False)
        except bounded_json.InvalidJSON as error:
            # The views that read a body themselves pass the (Django) request as the stream.
            request = (parser_context or {}).get("request", stream)
            refusal = unread_body_refusal(request, body) if error.reason == "malformed" else None
            raise (refusal or json_refusal(error)) from None
        if not isinstance(data, dict):
            kind = _json_type(data)
            raise InvalidInput(f"The request body must be a JSON object, not {kind}.", code="body_not_object",
                               details={"type": kind})
        return data


def _json_type(value) -> str:
    return {bool: "boolean", int: "number", float: "number", str: "string", list: "array",
            type(None): "null"}.get(type(value), "unknown")


# Accept headers that choose the API's one renderer with no parameter (an `indent` one changes the rendering).
_PLAIN_ACCEPT = frozenset({"", "*/*", "application/json", "application/*"})


def plain_json_post(request) -> bool:
    """A POST of a UTF-8 JSON body of a length within the limit, with nothing for DRF to negotiate (no query string,
    a plain Accept): what the views that skip DRF's dispatch on their hot path (catalog search, usage reports) may
    serve themselves, with DRF's answers. Anything else is DRF's to serve."""
    meta, length = request.META, request.META.get("CONTENT_LENGTH", "")
    return (request.method == "POST" and request.content_type == "application/json"
            and request.content_params.get("charset", "utf-8").lower() == "utf-8"
            and length.isdigit() and 0 < int(length) <= settings.DATA_UPLOAD_MAX_MEMORY_SIZE
            and not meta.get("QUERY_STRING") and meta.get("HTTP_ACCEPT", "").strip() in _PLAIN_ACCEPT)
