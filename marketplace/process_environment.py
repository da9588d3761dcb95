"""What a request's WSGI environ holds of the server process's own environment: nothing.

granian starts every request's environ from a copy of the worker's `os.environ` (granian/wsgi.py: `basic_env |
scope`), so the process's variables were in each `request.META` (SECRET_KEY, DATABASE_URL, RELAYER_PRIVATE_KEY), and
one named `HTTP_*` (`HTTP_PROXY`, set on hosts behind an egress proxy; any other) was a header of every request that
did not send it: read as the client's, and forwarded by the metered proxy to the seller's upstream. Dropped here,
before Django: each key whose value is the process's. A request header of the same name and the very same value is
dropped with it (a client repeating the server's own setting back tells nothing).
"""

import os

# The keys the server sets on every request itself: never the process's, whatever it holds of the same name.
_SERVER_KEYS = frozenset({"REQUEST_METHOD", "SCRIPT_NAME", "PATH_INFO", "QUERY_STRING", "SERVER_NAME", "SERVER_PORT",
                          "SERVER_PROTOCOL", "REMOTE_ADDR", "REMOTE_PORT", "CONTENT_TYPE", "CONTENT_LENGTH",
                          "HTTP_HOST"})


def without_process_environment(application):
    """`application`, called with the environ less the process environment's variables (as it stands at the first
    request, once the application is loaded: after granian copied it)."""
    copied: list[tuple[str, str]] | None = None

    def wrapped(environ, start_response):
        nonlocal copied
        if copied is None:
            copied = [(key, value) for key, value in os.environ.items() if key not in _SERVER_KEYS]
        for key, value in copied:
            if environ.get(key) == value:
                del environ[key]
        return application(environ, start_response)

    return wrapped
