"""Serializer building blocks shared by every app: strict input, token amounts, addresses, the error shape."""

from drf_spectacular.utils import OpenApiExample, OpenApiResponse, extend_schema_field
from rest_framework import serializers

from marketplace.fields import checksum_address

MAX_AMOUNT = 2**256 - 1


class StrictSerializer(serializers.Serializer):
    """Rejects fields it does not know: a typo in a payment request must not be silently ignored."""

    def to_internal_value(self, data):
        if isinstance(data, dict):
            unknown = sorted(set(data) - set(self.fields))
            if unknown:
                raise serializers.ValidationError(
                    {name: [serializers.ErrorDetail("Unknown field.", code="unknown_field")] for name in unknown}
                )
        return super().to_internal_value(data)


@extend_schema_field({"type": "integer", "minimum": 0, "example": 1000000,
                      "description": "Token base units (USDC: 6 decimals, 1 USDC = 1000000)."})
class AtomicAmountField(serializers.Field):
    """A non-negative integer amount in token base units; accepts a JSON integer or a string of digits."""

    default_error_messages = {
        "invalid": "Must be a whole number of token base units (an integer, no decimals).",
        "negative": "Must not be negative.",
        "too_small": "Must be at least {min_value}.",
        "too_large": "Too large.",
    }

    def __init__(self, *, min_value: int = 0, max_value: int = MAX_AMOUNT, **kwargs):
        self.min_value = min_value
        self.max_value = max_value
        super().__init__(**kwargs)

    def to_internal_value(self, data):
        if isinstance(data, bool) or not isinstance(data, (int, str)):
            self.fail("invalid")
        if isinstance(data, str):
            if not data.isdigit() or not data.isascii() or len(data) > 78:
                self.fail("negative" if data.startswith("-") and data[1:].isdigit() else "invalid")
            data = int(data)
        if data < 0:
            self.fail("negative")
        if data < self.min_value:
            self.fail("too_small", min_value=self.min_value)
        if data > self.max_value:
            self.fail("too_large")
        return data

    def to_representation(self, value):
        return int(value)


@extend_schema_field({"type": "string", "pattern": "^0x[0-9a-fA-F]{40}$",
                      "example": "0x70997970C51812dc3A010C7d01b50e0d17dc79C8"})
class AddressSerializerField(serializers.CharField):
    default_error_messages = {"invalid_address": "Not an EVM address (0x + 40 hex digits, valid EIP-55 checksum)."}

    def __init__(self, **kwargs):
        kwargs.setdefault("max_length", 42)
        super().__init__(**kwargs)

    def to_internal_value(self, data):
        value = super().to_internal_value(data)
        try:
            return checksum_address(value)
        except Exception:
            self.fail("invalid_address")


class ErrorDetailSerializer(serializers.Serializer):
    code = serializers.CharField(help_text="Machine-readable error code, e.g. `validation_error`.")
    message = serializers.CharField()
    details = serializers.DictField(help_text="More about the error; `fields` for validation errors.")


class ErrorSerializer(serializers.Serializer):
    error = ErrorDetailSerializer()


_ERROR_DESCRIPTIONS = {
    400: ("Invalid input", "validation_error"),
    401: ("Missing, unknown, expired or revoked credentials", "not_authenticated"),
    402: ("Payment required or budget exhausted", "payment_required"),
    403: ("Credentials lack the scope or ownership needed", "permission_denied"),
    404: ("No such object (or not visible to you)", "not_found"),
    409: ("Illegal in the object's current state", "invalid_transition"),
    413: ("The request body is larger than the platform reads", "request_too_large"),
    422: ("Idempotency-Key reused with another request", "idempotency_key_reused"),
    429: ("Rate limit exceeded", "rate_limited"),
    503: ("A dependency is unavailable", "dependency_unavailable"),
}


def error_responses(*statuses: int) -> dict[int, OpenApiResponse]:
    """Documented error responses for `extend_schema(responses=...)`; 400/401/403 are on every endpoint."""
    wanted = sorted({400, 401, 403, *statuses})
    return {
        status: OpenApiResponse(
            response=ErrorSerializer,
            description=_ERROR_DESCRIPTIONS[status][0],
            examples=[
                OpenApiExample(
                    f"error_{status}",
                    value={"error": {"code": _ERROR_DESCRIPTIONS[status][1], "message": "…", "details": {}}},
                    status_codes=[str(status)],
                    response_only=True,
                )
            ],
        )
        for status in wanted
    }

