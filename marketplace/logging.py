"""Structured JSON logs; every line carries the id of the request (or task) it belongs to, and the id of the
agreement being worked on where there is one (proxied calls, activation, settlement)."""

import contextvars
import functools
import json
import logging
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime

from django.http import HttpRequest

request_id_var: contextvars.ContextVar[str] = contextvars.ContextVar("request_id", default="-")
agreement_id_var: contextvars.ContextVar[str | None] = contextvars.ContextVar("agreement_id", default=None)


@contextmanager
def agreement_context(agreement_id) -> Iterator[None]:
    """Log records emitted inside carry `agreement_id` (nested contexts restore the outer one)."""
    token = agreement_id_var.set(str(agreement_id) if agreement_id else None)
    try:
        yield
    finally:
        agreement_id_var.reset(token)


def logs_name_the_agreement(function):
    """For services called with `agreement=` or `agreement_id=`: their log records carry the agreement's id."""

    @functools.wraps(function)
    def wrapper(*args, **kwargs):
        agreement_id = kwargs.get("agreement_id", getattr(kwargs.get("agreement"), "pk", None))
        with agreement_context(agreement_id):
            return function(*args, **kwargs)

    return wrapper


class RequestIdFilter(logging.Filter):
    """Adds `request_id`, and `agreement_id` when one is in context (an explicit `extra=` value wins)."""

    def filter(self, record: logging.LogRecord) -> bool:
        record.request_id = request_id_var.get()
        agreement_id = agreement_id_var.get()
        if agreement_id is not None and not hasattr(record, "agreement_id"):
            record.agreement_id = agreement_id
        return True


class JsonFormatter(logging.Formatter):
    # Attributes every LogRecord has; anything else was passed through `extra=` and is logged as a field.
    _standard = set(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {"message", "asctime", "request_id"}

    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
            "request_id": getattr(record, "request_id", request_id_var.get()),
        }
        entry.update({k: v for k, v in vars(record).items() if k not in self._standard})
        if isinstance(entry.get("request"), HttpRequest):
            # Its repr has the query string, where callers put secrets (?api_key=...): method and path only.
            entry["request"] = f"{entry['request'].method} {entry['request'].path}"
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str)
