"""Serializer building blocks shared by every app: strict input, token amounts, addresses, the error shape.

Numbers are taken as the JSON type the schema documents: an integer field takes a JSON integer only (not "1",
1000.0 or true), since a client that sends something else has another value in mind than we would read. A URL
query string has only strings: there, ASCII digits.
"""

import heapq
import itertools
import json
import re

from django.http import QueryDict
from drf_spectacular.utils import OpenApiExample, OpenApiResponse, extend_schema_field
from rest_framework import serializers
from rest_framework.fields import SkipField
from rest_framework.relations import PKOnlyObject

from marketplace import rotation
from marketplace.tags import TAGS_PER_LISTING, tag_mixes_scripts, tag_normalise
from marketplace.fields import MAX_AMOUNT, amount_column_max, checksum_address

ZERO_ADDRESS = "0x" + "0" * 40
_QUERY_INTEGER = re.compile(r"-?[0-9]{1,78}")  # fullmatch: `$` also matches before a final newline


def http_url(value: str) -> str:
    """A URL the platform calls (an upstream, a webhook receiver): http(s) only, as URLField also lets ftp through."""
    if not value.lower().startswith(("http://", "https://")):
        raise serializers.ValidationError("Must be an http(s) URL.", code="invalid_url_scheme")
    return value


def _integer_input(field: serializers.Field, data) -> int:
    """`data` as an int when it is a JSON integer, or digits in a query string; else the field's `invalid`."""
    if isinstance(data, str) and isinstance(getattr(field.root, "initial_data", None), QueryDict):
        if _QUERY_INTEGER.fullmatch(data):
            return int(data)
    elif isinstance(data, int) and not isinstance(data, bool):
        return data
    field.fail("invalid")


def _is_text_field(field: serializers.Field) -> bool:
    if isinstance(field, serializers.MultipleChoiceField | DigitsField):
        return False
    if isinstance(field, serializers.CharField):
        return True
    return isinstance(field, serializers.ChoiceField) and all(isinstance(key, str) for key in field.choices)


def _not_a_string() -> list:
    return [serializers.ErrorDetail("Must be a JSON string.", code="invalid")]


def _text_errors(field: serializers.Field, value) -> list | dict | None:
    """The errors of `value`, given for `field`, where a text field would be handed something other than a JSON
    string (DRF's CharField reads 5 as "5" and 1.5 as "1.5", a ChoiceField 1 as "1"), or None: the field itself
    or each item of a list of text (a ListField of one, a MultipleChoiceField)."""
    items_of = field.child if isinstance(field, serializers.ListField) else (
        field if isinstance(field, serializers.MultipleChoiceField) else None)
    if items_of is not None:
        if isinstance(value, list) and (items_of is field or _is_text_field(items_of)):
            wrong = (index for index, item in enumerate(value) if item is not None and not isinstance(item, str))
            return {index: _not_a_string() for index in itertools.islice(wrong, LIST_ITEM_ERRORS_NAMED)} or None
        if isinstance(value, list) and isinstance(items_of, serializers.UUIDField):
            wrong = (index for index, item in enumerate(value) if not _ascii_text(item))
            return {index: _not_an_ascii_uuid() for index in itertools.islice(wrong, LIST_ITEM_ERRORS_NAMED)} or None
        return None
    if _is_text_field(field) and value is not None and not isinstance(value, str):
        return _not_a_string()
    if isinstance(field, serializers.UUIDField) and value is not None and not _ascii_text(value):
        return _not_an_ascii_uuid()
    return None


def _ascii_text(value) -> bool:
    return isinstance(value, str) and value.isascii()


def _not_an_ascii_uuid() -> list:
    # uuid.UUID() reads other scripts' digits ("٣" as 3) and DRF a JSON integer as UUID(int=...): an id has one
    # spelling, ASCII, as in a path.
    return [serializers.ErrorDetail("Must be a UUID written as a JSON string of ASCII hex digits.", code="invalid")]


# The items of a list whose errors a refusal names: a list of 200,000 wrong items (600 kB) was answered naming
# each, a 12.9 MB answer built and rendered for 11-13 s of a web thread's CPU.
LIST_ITEM_ERRORS_NAMED = 20


def _too_long(field: serializers.Field, value) -> list | None:
    """A list longer than its field's `max_length`, refused before its items are read (DRF checks the length after
    validating every item)."""
    if isinstance(field, serializers.ListField) and field.max_length is not None and isinstance(value, list) \
            and len(value) > field.max_length:
        return [serializers.ErrorDetail(field.error_messages["max_length"].format(max_length=field.max_length),
                                        code="max_length")]
    return None


def _items_named(detail):
    """A field's errors with at most LIST_ITEM_ERRORS_NAMED of a list's items named (DRF's ListField names each)."""
    if isinstance(detail, dict) and len(detail) > LIST_ITEM_ERRORS_NAMED and all(isinstance(k, int) for k in detail):
        return dict(itertools.islice(detail.items(), LIST_ITEM_ERRORS_NAMED))
    return detail


class TextOnlySerializer(serializers.Serializer):
    """Its text fields take JSON strings only: a number, boolean, object or list where text is due is 400
    `invalid`, not read as its spelling (SECURITY.md, "Loosely typed input"). A list longer than its field's
    bound is refused before its items are read, and a refusal names the errors of at most LIST_ITEM_ERRORS_NAMED
    of a list's items."""

    def to_internal_value(self, data):
        if isinstance(data, dict):
            errors = {}
            for name, field in self.fields.items():
                if not field.read_only and name in data:
                    wrong = _too_long(field, data[name]) or _text_errors(field, data[name])
                    if wrong:
                        errors[name] = wrong
            if errors:
                raise serializers.ValidationError(errors)
        try:
            return super().to_internal_value(data)
        except serializers.ValidationError as error:
            if isinstance(error.detail, dict):
                error.detail = {name: _items_named(detail) for name, detail in error.detail.items()}
            raise


def json_size_bounded(value, *, limit: int, encoder: type[json.JSONEncoder] | None = None):
    """`value`, refused (`too_large`) when its JSON, as compactly written (by `encoder`, the one it is stored with,
    if given), is more than `limit` bytes."""
    if len(json.dumps(value, separators=(",", ":"), ensure_ascii=False, cls=encoder).encode()) > limit:
        raise serializers.ValidationError(f"At most {limit} bytes of JSON.", code="too_large")
    return value


# Unknown fields a refusal names: a body of 200,000 of them (2.3 MB) was answered naming each, a 12 MB answer
# built and rendered for ~20 s of a web thread's CPU.
UNKNOWN_FIELDS_NAMED = 20


def _refuse_repeated_parameters(serializer: serializers.Serializer, query: QueryDict) -> None:
    """A query parameter given more than once, other than a list's, is refused (`duplicate_key`, as a JSON key given
    twice): DRF reads the last, where a proxy, a log or a WAF reads the first."""
    repeated = heapq.nsmallest(UNKNOWN_FIELDS_NAMED, (
        name for name, values in query.lists() if len(values) > 1 and name in serializer.fields
        and not isinstance(serializer.fields[name], serializers.ListField | serializers.MultipleChoiceField)))
    if repeated:
        raise serializers.ValidationError({name: [serializers.ErrorDetail(
            "Given more than once: give it once.", code="duplicate_key")] for name in repeated})


class StrictSerializer(TextOnlySerializer):
    """Rejects fields it does not know: a typo in a payment request must not be silently ignored, nor a query
    parameter given twice read as one of its values. Text fields take JSON strings only (`TextOnlySerializer`). The
    first UNKNOWN_FIELDS_NAMED unknown fields (in sorted order) are named; beyond, `non_field_errors` says how many
    there were (`too_many_unknown_fields`)."""

    def to_internal_value(self, data):
        if isinstance(data, QueryDict):
            _refuse_repeated_parameters(self, data)
        if isinstance(data, dict):
            unknown = set(data).difference(self.fields)
            if unknown:
                named = heapq.nsmallest(UNKNOWN_FIELDS_NAMED, unknown)
                errors: dict = {name: [serializers.ErrorDetail("Unknown field.", code="unknown_field")]
                                for name in named}
                if len(unknown) > len(named):
                    errors["non_field_errors"] = [serializers.ErrorDetail(
                        f"{len(unknown)} unknown fields; the first {len(named)} are named.",
                        code="too_many_unknown_fields")]
                raise serializers.ValidationError(errors)
        return super().to_internal_value(data)


class DigitsField(serializers.RegexField):
    """A whole number written as a string of digits (a wire format's amount), or given as a JSON integer, whose
    digits it is: unambiguous, unlike a float or a boolean, which stay refused."""

    def __init__(self, *, max_digits: int, **kwargs):
        # Digits and nothing else: not trimmed (" 5" is not a number's spelling), and the whole of it, as the
        # pattern's `$` (kept for the schema) also matches before a final newline ("5\n" was read as 5).
        kwargs.setdefault("trim_whitespace", False)
        super().__init__(rf"^[0-9]{{1,{max_digits}}}$", **kwargs)
        self.digits = re.compile(rf"[0-9]{{1,{max_digits}}}")

    def to_internal_value(self, data):
        if isinstance(data, int) and not isinstance(data, bool):
            data = str(data)
        elif not isinstance(data, str) or not self.digits.fullmatch(data):
            self.fail("invalid")
        return super().to_internal_value(data)


class StrictIntegerField(serializers.IntegerField):
    """An integer: a JSON integer in a body, digits in a query string."""

    default_error_messages = {"invalid": "Must be an integer (a JSON number without a fraction, not a string)."}

    def to_internal_value(self, data):
        return super().to_internal_value(_integer_input(self, data))


class StrictBooleanField(serializers.BooleanField):
    """A JSON true or false: DRF's BooleanField also reads "yes", "on", "1" or 1 (a form's spellings), and a flag
    that ends an agreement is not guessed from a string."""

    default_error_messages = {"invalid": "Must be a JSON boolean: true or false."}

    def to_internal_value(self, data):
        if isinstance(data, bool):
            return data
        self.fail("invalid")


@extend_schema_field({"type": "integer", "minimum": 0, "example": 1000000,
                      "description": "Token base units (USDC: 6 decimals, 1 USDC = 1000000)."})
class AtomicAmountField(serializers.Field):
    """A non-negative integer amount in token base units: a JSON integer (digits in a query string)."""

    default_error_messages = {
        "invalid": "Must be a whole number of token base units (an integer, no decimals).",
        "negative": "Must not be negative.",
        "too_small": "Must be at least {min_value}.",
        "too_large": "Too large.",
        "amount_too_large": "Too large for this database: at most {max_amount_atomic}.",
    }

    def __init__(self, *, min_value: int = 0, max_value: int = MAX_AMOUNT, **kwargs):
        self.min_value = min_value
        self.max_value = max_value
        super().__init__(**kwargs)

    def to_internal_value(self, data):
        data = _integer_input(self, data)
        if data < 0:
            self.fail("negative")
        if data < self.min_value:
            self.fail("too_small", min_value=self.min_value)
        if data > self.max_value:
            self.fail("too_large")
        if data > amount_column_max():  # the embedded SQLite default keeps 63 bits exactly, not uint256
            self.fail("amount_too_large", max_amount_atomic=amount_column_max())
        return data

    def to_representation(self, value):
        return int(value)


@extend_schema_field({"type": "string", "pattern": "^0x[0-9a-fA-F]{40}$",
                      "example": "0x70997970C51812dc3A010C7d01b50e0d17dc79C8"})
class AddressSerializerField(serializers.CharField):
    """An EVM address, checksummed; never the zero address (tokens sent there are burnt, and no key signs for
    it)."""

    default_error_messages = {"invalid_address": "Not an EVM address (0x + 40 hex digits, valid EIP-55 checksum).",
                              "zero_address": "The zero address is not an account."}

    def __init__(self, **kwargs):
        kwargs.setdefault("max_length", 42)
        kwargs["trim_whitespace"] = False  # "0x…\n" is not an address: refused, not trimmed into one
        super().__init__(**kwargs)

    def to_internal_value(self, data):
        value = super().to_internal_value(data)
        try:
            value = checksum_address(value)
        except Exception:
            self.fail("invalid_address")
        if value == ZERO_ADDRESS:
            self.fail("zero_address")
        return value


# An answer serializer that renders as DRF's generic `to_representation` does, without deep-copying its declared
# fields for every instance (DRF does, on first use of `.fields`; for an agreement's 50-odd fields that copy was most
# of the CPU of answering it). The fields are bound once per class, to an instance that never holds data or context;
# method fields are called on the serializer at hand, which does. So a field other than a method field must not read
# `context` (none of this project's output fields does). A comment, not a docstring: the OpenAPI schema would show a
# docstring as the description of every serializer built on this one.
class FieldsBoundOnceSerializer(serializers.Serializer):

    def to_representation(self, instance):
        answer = {}
        for field in type(self)._fields_bound_once():
            if isinstance(field, serializers.SerializerMethodField):
                answer[field.field_name] = getattr(self, field.method_name)(instance)
                continue
            try:
                attribute = field.get_attribute(instance)
            except SkipField:
                continue
            present = attribute.pk if isinstance(attribute, PKOnlyObject) else attribute
            answer[field.field_name] = None if present is None else field.to_representation(attribute)
        return answer

    @classmethod
    def _fields_bound_once(cls) -> list[serializers.Field]:
        readable = cls.__dict__.get("_readable_fields_of_class")  # each subclass binds its own
        if readable is None:
            readable = [field for field in cls().fields.values() if not field.write_only]
            cls._readable_fields_of_class = readable
        return readable


class AgentSummarySerializer(FieldsBoundOnceSerializer):
    id = serializers.UUIDField()
    handle = serializers.CharField()
    display_name = serializers.CharField()
    wallet_address = serializers.CharField()


class TagListField(serializers.ListField):
    child = serializers.CharField(max_length=50)
    default_error_messages = {
        "min_length": "At least one tag is required.",
        "max_length": "At most {max_length} tags are allowed.",
    }

    def __init__(self, **kwargs):
        kwargs.setdefault("min_length", 1)
        kwargs.setdefault("max_length", TAGS_PER_LISTING)
        super().__init__(**kwargs)

    def to_internal_value(self, data):
        tags = [tag_normalise(tag) for tag in super().to_internal_value(data)]
        if any(not tag or len(tag) > self.child.max_length for tag in tags):  # NFKC may lengthen a tag
            raise serializers.ValidationError(serializers.ErrorDetail(
                f"A tag is 1 to {self.child.max_length} characters once normalised (NFKC).", code="invalid_tag"))
        mixed = [tag for tag in tags if tag_mixes_scripts(tag)]
        if mixed:
            raise serializers.ValidationError(serializers.ErrorDetail(
                f"A tag's letters must be of one script (a look-alike letter of another makes it pass for a tag it "
                f"is not): {', '.join(mixed)}.", code="tag_mixed_scripts"))
        return list(dict.fromkeys(tags))


CENTS = 10_000  # token base units in one cent (USDC: 6 decimals)


def cents_of(amount: int) -> int | None:
    """An amount in whole cents, or None when it is not a whole number of cents (the `_atomic` field is exact)."""
    return amount // CENTS if amount % CENTS == 0 else None


class CentsField(StrictIntegerField):
    """A whole number of cents (Pægents' `_cents` fields), converted exactly to token base units."""

    default_error_messages = {"invalid": "Must be a whole number of cents (an integer, no fractions)."}

    def __init__(self, **kwargs):
        kwargs.setdefault("min_value", 0)
        kwargs.setdefault("max_value", 10**24)
        super().__init__(**kwargs)

    def to_internal_value(self, data):
        return super().to_internal_value(data) * CENTS


class SecretRotationSerializer(StrictSerializer):
    previous_secret_valid_for_seconds = StrictIntegerField(
        min_value=0, max_value=rotation.OVERLAP_MAX_SECONDS, default=rotation.OVERLAP_DEFAULT_SECONDS,
        help_text="How long the replaced secret keeps signing beside the new one, so receivers switch at their pace "
                  "(0: it stops at once, as for a leaked secret). A rotation during an overlap ends the one before "
                  "it: the replaced secret is then the one this rotation retires.")


# The end of a secret field's help text, where an answer shows a secret once (`idempotency.shown_once`).
REPLAYED_SECRET_HELP = (" An Idempotency-Key replay answers it while it is still the current one, else null "
                        "(header `Idempotent-Secret-Withheld`: `replaced` once rotated, `deleted` once its service "
                        "or subscription is deleted): no record of the key keeps it.")


class OverlapEndField(serializers.DateTimeField):
    """When a secret rotation's overlap ends, the replaced secret then no longer signing; null when none runs."""

    def __init__(self, *, secret_field: str, **kwargs):
        self.secret_field = secret_field
        super().__init__(source="*", read_only=True, allow_null=True, **kwargs)

    def to_representation(self, value):
        ends = rotation.overlap_ends_at(value, self.secret_field)
        return None if ends is None else super().to_representation(ends)


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
    414: ("The path and query string are longer than the platform forwards", "upstream_url_too_long"),
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

