"""JSON stored in a PostgreSQL `jsonb` column and read back as the same values, floats included.

jsonb keeps a number as a decimal and writes it back without an exponent or a fraction it does not need: a float
Python writes with an exponent (from 1e16 up, under 1e-4) came back an integer (6.02e+23 as 602000000000000000000000),
and minus zero as zero. Where the value is hashed (a Masumi purchase's input: MIP-004 hashes its canonical JSON, which
the seller computes again from what it is sent), another value is another hash. `ExactNumbersEncoder` writes such a
float positionally with a fraction (`602000000000000000000000.0`), which jsonb keeps and Python reads back as that
float; minus zero it cannot keep, so it is refused before anything is stored (`holds_minus_zero`).
"""

import json
import math
from decimal import Decimal


def _float_text(value: float) -> str:
    text = repr(value)
    if "e" not in text:
        return text
    positional = format(Decimal(text), "f")
    return positional if "." in positional else positional + ".0"


def _encode(value) -> str:
    if isinstance(value, float) and math.isfinite(value):
        return _float_text(value)
    if isinstance(value, dict):
        return "{" + ",".join(f"{json.dumps(str(key), ensure_ascii=False)}:{_encode(item)}"
                              for key, item in value.items()) + "}"
    if isinstance(value, list | tuple):
        return "[" + ",".join(_encode(item) for item in value) + "]"
    return json.dumps(value, ensure_ascii=False, allow_nan=False)


class ExactNumbersEncoder(json.JSONEncoder):
    """For a JSONField (`encoder=`): compact JSON whose floats jsonb reads back as the same floats."""

    def encode(self, o) -> str:
        return _encode(o)


def holds_minus_zero(value) -> bool:
    """Whether `value` (parsed JSON, depth bounded by the parser) holds -0.0, which jsonb reads back as 0."""
    if isinstance(value, float):
        return value == 0 and math.copysign(1.0, value) < 0
    if isinstance(value, dict):
        return any(holds_minus_zero(item) for item in value.values())
    if isinstance(value, list):
        return any(holds_minus_zero(item) for item in value)
    return False
