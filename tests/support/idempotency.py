"""What the `Idempotency-Key` records keep, read from the table itself."""

import json

from marketplace.models import IdempotencyRecord


def records_hold(text: str) -> bool:
    """Whether any stored record, in any of its columns, holds `text`."""
    return any(text in json.dumps(row, default=str) for row in IdempotencyRecord.objects.values())
