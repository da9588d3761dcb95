"""JSON from a server the SDK does not trust, parsed without letting it crash or stall the agent.

The standard library's C parser recurses once per nesting level: 200 kB of `[` exhausts the recursion limit at
best, and overflows the C stack (SIGSEGV, the agent's process gone) where the limit is raised, as py_ecc (under
eth_account) raises it to 100,000. So the nesting depth is measured first without recursion, and anything deeper
than `JSON_MAX_DEPTH` is refused before `json.loads` sees it. NaN, the infinities and numbers beyond a float's
range (`1e400`) are refused too: they are not JSON. Every answer the SDK reads goes through `loads`
(`sdk.bounded_http.json_answer`); parse a `call_metered` answer with it too.

The server reads its own input with the same depth measure (`marketplace.bounded_json`, over `depth` here).
"""

from __future__ import annotations

import json
import math
import re
from itertools import accumulate
from typing import Any

__all__ = ["JSON_MAX_DEPTH", "InvalidJSON", "depth", "loads"]

JSON_MAX_DEPTH = 64  # as the marketplace's own JSON_MAX_DEPTH

# A JSON string as the parser reads it (escapes included); an unterminated one runs to the end, so every match
# succeeds where it starts and the scan stays linear.
_STRING = re.compile(r'"(?:[^"\\]++|\\.)*+"?', re.DOTALL)
_NOT_BRACKET = re.compile(r"[^\[\]{}]+")
_STEP = {"[": 1, "{": 1, "]": -1, "}": -1}


class InvalidJSON(ValueError):
    """Not JSON (NaN and out-of-range numbers included), nested deeper than allowed, or, when refused, an object
    with a key given twice. `reason` says which: `malformed`, `too_deep` or `duplicate_key` (`key` names it)."""

    def __init__(self, message: str, *, reason: str, key: str | None = None):
        self.reason, self.key = reason, key
        super().__init__(message)


class _DuplicateKey(ValueError):
    def __init__(self, key: str):
        self.key = key
        super().__init__(key)


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """An object's pairs as a dict, refused when a key comes twice (`json` would keep the last one silently)."""
    value = dict(pairs)
    if len(value) != len(pairs):
        seen: set[str] = set()
        for key, _ in pairs:
            if key in seen:
                raise _DuplicateKey(key)
            seen.add(key)
    return value


def depth(text: str) -> int:
    """How deeply arrays and objects nest in `text` (0 for a scalar), without recursion."""
    brackets = _NOT_BRACKET.sub("", _STRING.sub("", text))
    return max(accumulate(map(_STEP.__getitem__, brackets)), default=0)


def refuse_constant(constant: str) -> float:
    """NaN and the infinities: Python's json reads them; JSON has none."""
    raise ValueError(f"{constant} is not a JSON number")


def finite_float(text: str) -> float:
    value = float(text)
    if math.isinf(value):  # 1e400: no float holds it
        raise ValueError(f"{text} is out of range")
    return value


def loads(data: bytes | str, *, max_depth: int = JSON_MAX_DEPTH, duplicate_keys: bool = True) -> Any:
    """`json.loads` that raises `InvalidJSON` instead of recursing without bound (or on anything not JSON). With
    `duplicate_keys=False`, an object with a key given twice is refused too (`duplicate_key`): where another
    parser reads the same bytes (the marketplace reads a request body the caller signed or checked), the two must
    not take different values."""
    try:
        text = data.decode() if isinstance(data, bytes | bytearray) else data
    except UnicodeDecodeError as error:
        raise InvalidJSON("The JSON is not valid UTF-8.", reason="malformed") from error
    # Fewer brackets than the limit cannot nest deeper than it: the common case costs two C-speed counts.
    if text.count("[") + text.count("{") > max_depth and depth(text) > max_depth:
        raise InvalidJSON(f"The JSON is nested deeper than {max_depth} levels.", reason="too_deep")
    try:
        return json.loads(text, parse_constant=refuse_constant, parse_float=finite_float,
                          object_pairs_hook=None if duplicate_keys else _unique_keys)
    except _DuplicateKey as error:
        raise InvalidJSON(f"The JSON gives the key {error.key!r} twice in one object.", reason="duplicate_key",
                          key=error.key) from None
    except (ValueError, RecursionError) as error:
        raise InvalidJSON(f"The JSON is malformed: {error}", reason="malformed") from None
