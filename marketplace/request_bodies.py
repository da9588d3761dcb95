"""Request bodies are read ahead, before the application runs, by a bounded number of threads.

Why: granian hands a request to a Python thread once its head is in, and the thread then waits on the body for as
long as the client takes to send it: granian has no body read timeout (emmett-framework/granian#728, wontfix). A
client that sent a `Content-Length` and then nothing held a thread until it went away, so 32 such connections held
every thread of both workers, and the server answered no one (SECURITY.md, "Hostile input").

So a request with a body first takes a slot (`marketplace.concurrency.PeerSlots`): at most
`REQUEST_BODY_READS_PER_CLIENT` per client (its address as the rate limits count it, an IPv6 one's /64) and `REQUEST_BODY_READS` in all
per process; beyond either it is answered 503 `request_bodies_busy` at once, its body unread. With the slot it reads
the body whole (bodies up to the larger of the two upload bounds, `DATA_UPLOAD_MAX_MEMORY_SIZE` and
`PROXY_MAX_REQUEST_BYTES`), gives the slot back, and the application reads it from memory. A stalled client
holds its share of the threads and no more; requests without a body are never refused, and an honest body, in by
the time its head is, holds a slot for microseconds.

A body declared larger than the bounds is not read ahead: the application refuses it from its header (413), and the
request keeps its slot while the application runs, in case it reads it all the same.
"""

import io
import json

from django.conf import settings
from django.http.request import HttpHeaders

from marketplace.concurrency import Busy, PeerSlots
from marketplace.errors import error_body
from marketplace.throttling import client_network

BODY_READS = PeerSlots("request bodies", code="request_bodies_busy", per_peer="REQUEST_BODY_READS_PER_CLIENT",
                       in_all="REQUEST_BODY_READS")
_READ_SIZE = 65_536
_MAX_LENGTH_DIGITS = 18


class _Client:
    """What `client_network` reads of a request, from its WSGI environ."""

    def __init__(self, environ: dict):
        self.META, self.headers = environ, HttpHeaders(environ)


def read_ahead(application):
    """`application` (WSGI), with each request's body read ahead as the module says."""

    def with_bodies_read_ahead(environ, start_response):
        chunked = "chunked" in environ.get("HTTP_TRANSFER_ENCODING", "").lower() and environ.get(
            "wsgi.input_terminated", False)
        length = _declared_length(environ.get("CONTENT_LENGTH", ""))
        if not chunked and not length:  # no body, or one the application reads as none
            return application(environ, start_response)
        try:
            slot = BODY_READS.take(client_network(_Client(environ)))
        except Busy as busy:
            return _refused(busy, start_response)
        bound = max(settings.DATA_UPLOAD_MAX_MEMORY_SIZE or 0, settings.PROXY_MAX_REQUEST_BYTES)
        try:
            if length is not None and length > bound:
                return application(environ, start_response)
            # A chunked body one byte over the bound is enough for the application to refuse it as too large.
            environ["wsgi.input"] = io.BytesIO(_read(environ["wsgi.input"], bound + 1 if chunked else length))
        finally:
            slot.give_back()
        return application(environ, start_response)

    return with_bodies_read_ahead


def _declared_length(raw: str) -> int | None:
    """CONTENT_LENGTH as the application reads it; None (no body) when it is not a length."""
    if raw.isascii() and raw.isdigit() and len(raw) <= _MAX_LENGTH_DIGITS:
        return int(raw)
    return None


def _read(stream, size: int) -> bytes:
    """Up to `size` bytes of `stream`, fewer when it ends first (a client that closed: the application sees the
    body cut short, as it would reading the stream itself)."""
    chunks, left = [], size
    while left > 0 and (chunk := stream.read(min(left, _READ_SIZE))):
        chunks.append(chunk)
        left -= len(chunk)
    return b"".join(chunks)


def _refused(busy: Busy, start_response) -> list[bytes]:
    body = json.dumps(error_body(busy.code, busy.message, busy.details)).encode()
    # The body was not read: the connection cannot serve another request.
    start_response(f"{busy.status_code} Service Unavailable", [
        ("Content-Type", "application/json"), ("Content-Length", str(len(body))),
        ("Retry-After", str(busy.retry_after)), ("Connection", "close")])
    return [body]
