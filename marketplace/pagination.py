"""Keyset (cursor) pagination over any ordering, with signed cursors.

A cursor carries the sort values of the last row it returned and is signed, so a tampered or foreign cursor is a
clear 400 (`invalid_cursor`) rather than a wrong page. Pages stay stable while rows are inserted.
"""

import datetime
import uuid
from decimal import Decimal
from functools import reduce
from operator import or_

from django.core import signing
from django.db.models import Q, QuerySet
from rest_framework import serializers

from marketplace.errors import InvalidInput
from marketplace.serializers import StrictIntegerField

DEFAULT_LIMIT = 20
MAX_LIMIT = 100
_SALT = "marketplace.pagination"


class PageQuerySerializer(serializers.Serializer):
    cursor = serializers.CharField(required=False, max_length=2000, help_text="`next_cursor` of the previous page.")
    limit = StrictIntegerField(required=False, min_value=1, max_value=MAX_LIMIT, default=DEFAULT_LIMIT)


def _to_json(value):
    if isinstance(value, (datetime.datetime, datetime.date)):
        return value.isoformat()
    if isinstance(value, uuid.UUID):
        return str(value)
    if isinstance(value, Decimal):
        return int(value) if value == value.to_integral_value() else str(value)
    return value


def _after(ordering: list[str], values: list) -> Q:
    """Rows strictly after `values` in the lexicographic order `ordering` (fields, '-' for descending)."""
    clauses = []
    for i, field in enumerate(ordering):
        name = field.lstrip("-")
        equal_before = {f.lstrip("-"): v for f, v in zip(ordering[:i], values[:i], strict=True)}
        lookup = f"{name}__lt" if field.startswith("-") else f"{name}__gt"
        clauses.append(Q(**equal_before, **{lookup: values[i]}))
    return reduce(or_, clauses)


def paginate(queryset: QuerySet, *, ordering: list[str], cursor: str | None, limit: int) -> tuple[list, str | None]:
    """One page of `queryset` in `ordering` (which must end with a unique field) and the cursor of the next; the rows
    are model instances, or dicts from a values() queryset that selects the ordering's fields."""
    if cursor:
        values = cursor_values(cursor, ordering=ordering)
        after = _after(ordering, values)
        first = ordering[0].lstrip("-")
        if first not in queryset.query.annotations:
            # Implied by `after`; said apart, it is a range an index on the first sort field starts from, instead of
            # a filter on every row before the cursor (page 51 of the newest services read 1,000 rows for 21).
            after &= Q(**{f"{first}__{'lte' if ordering[0].startswith('-') else 'gte'}": values[0]})
        queryset = queryset.filter(after)
    rows = list(queryset.order_by(*ordering)[: limit + 1])
    if len(rows) <= limit:
        return rows, None
    rows = rows[:limit]
    last = rows[-1]
    names = [f.lstrip("-") for f in ordering]
    return rows, cursor_after([last[name] if isinstance(last, dict) else getattr(last, name) for name in names],
                              ordering=ordering)


def cursor_values(cursor: str, *, ordering: list[str]) -> list:
    """The sort values (as JSON values) of the row a cursor issued for `ordering` was issued after; 400
    `invalid_cursor` for a cursor this API did not issue, or issued for another ordering."""
    try:
        payload = signing.loads(cursor, salt=_SALT)
    except signing.BadSignature:
        raise InvalidInput("The cursor is not one this API issued.", code="invalid_cursor") from None
    if payload.get("o") != ordering or len(payload.get("v", [])) != len(ordering):
        raise InvalidInput("The cursor belongs to another ordering or query.", code="invalid_cursor")
    return payload["v"]


def cursor_issued_for(cursor: str, *, ordering: list[str]) -> bool:
    """Whether the cursor was issued for `ordering` (False for one this API did not issue, as for another ordering)."""
    try:
        cursor_values(cursor, ordering=ordering)
    except InvalidInput:
        return False
    return True


def cursor_after(values: list, *, ordering: list[str]) -> str:
    """The cursor of the page after the row whose sort values in `ordering` are `values`."""
    return signing.dumps({"o": ordering, "v": [_to_json(value) for value in values]}, salt=_SALT, compress=True)


def page_serializer(item_serializer: type[serializers.Serializer], name: str) -> type[serializers.Serializer]:
    """The documented shape of a page: {"results": [...], "next_cursor": str | null}."""
    return type(
        name,
        (serializers.Serializer,),
        {
            "results": item_serializer(many=True),
            "next_cursor": serializers.CharField(allow_null=True, help_text="Pass as `cursor` for the next page."),
        },
    )
