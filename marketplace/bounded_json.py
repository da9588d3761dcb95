"""The one JSON parser for everything the platform reads from outside: request bodies, seller and agentic-service
answers, chain-node answers.

The standard library's C parser recurses once per nesting level. Deep input (a 200 kB body of 100,000 `[`) would
exhaust the recursion limit at best, and overflow the C stack (SIGSEGV, the whole process gone) wherever that limit
is raised (py_ecc raises it to 100,000; see marketplace/__init__.py). So the nesting depth is measured first without
recursion, and anything deeper than `JSON_MAX_DEPTH` is refused before `json.loads` sees it. A NUL character or a
lone surrogate escape in a string is refused too: PostgreSQL stores neither text nor jsonb with one, and would fail
the write later. So are NaN, the infinities and numbers beyond a float's range (`1e400`): Python's `json` reads them
as floats that neither jsonb nor the renderer takes. Parsing, the depth measure and the number checks are the SDK's
(`sdk.bounded_json.loads`, which reads the marketplace's answers the same way); the size, NUL and surrogate checks
are the platform's own.
"""

from django.conf import settings

from sdk import bounded_json as sdk_json
from sdk.bounded_json import depth

__all__ = ["InvalidJSON", "depth", "loads"]


class InvalidJSON(ValueError):
    """Not JSON (`malformed`, NaN and out-of-range numbers included), nested deeper than allowed (`too_deep`), larger
    than allowed (`too_large`), holding a NUL character (`nul_character`) or a lone surrogate (`surrogate`), or, when
    refused, an object with a key given twice (`duplicate_key`). `reason` says which; `path` (keys and indexes)
    where the offending string is; `key` the key given twice."""

    def __init__(self, message: str, *, reason: str, path: tuple = (), key: str | None = None):
        self.reason, self.path, self.key = reason, path, key
        super().__init__(message)


def _surrogate(text: str) -> bool:
    return not text.isascii() and any("\ud800" <= char <= "\udfff" for char in text)


def _string_path(value, refused) -> tuple | None:
    """Where the first string `refused` refuses is (a key it refuses: its object), or None."""
    pending = [((), value)]
    while pending:
        path, item = pending.pop()
        if isinstance(item, str):
            if refused(item):
                return path
        elif isinstance(item, dict):
            if any(refused(key) for key in item):
                return path
            pending.extend(((*path, key), child) for key, child in item.items())
        elif isinstance(item, list):
            pending.extend(((*path, index), child) for index, child in enumerate(item))
    return None


def loads(data: bytes | str, *, max_bytes: int | None = None, max_depth: int | None = None,
          nul_allowed: bool = False, duplicate_keys: bool = True):
    """`json.loads` that raises `InvalidJSON` instead of recursing without bound. `nul_allowed`: strings are not
    checked for NUL characters and lone surrogates, for answers that are never stored as they are (a chain node's
    revert message may quote raw bytes). `duplicate_keys=False`: an object with a key given twice is refused (a
    caller's request body: Python keeps the last, other parsers the first, and a payment must mean one thing)."""
    max_depth = settings.JSON_MAX_DEPTH if max_depth is None else max_depth
    if max_bytes is not None and len(data) > max_bytes:
        raise InvalidJSON(f"The JSON is larger than {max_bytes} bytes.", reason="too_large")
    try:
        text = data.decode() if isinstance(data, bytes | bytearray) else data  # once: the checks below read it too
        value = sdk_json.loads(text, max_depth=max_depth, duplicate_keys=duplicate_keys)
    except UnicodeDecodeError as error:
        raise InvalidJSON("The JSON is not valid UTF-8.", reason="malformed") from error
    except sdk_json.InvalidJSON as error:
        raise InvalidJSON(str(error), reason=error.reason, key=error.key) from None
    if nul_allowed:
        return value
    if "\\u0000" in text and (path := _string_path(value, lambda item: "\x00" in item)) is not None:
        raise InvalidJSON("The JSON holds a NUL character (\\u0000), which is not stored.", reason="nul_character",
                          path=path)
    # A lone surrogate (`"\\ud800"`) is no character: UTF-8 cannot encode it, so neither PostgreSQL nor an answer
    # that echoes it can take it.
    if ("\\ud" in text or "\\uD" in text) and (path := _string_path(value, _surrogate)) is not None:
        raise InvalidJSON("The JSON holds a lone surrogate escape, which is no character.", reason="surrogate",
                          path=path)
    return value
