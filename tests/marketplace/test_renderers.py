"""The API's JSON renderer (marketplace.renderers): orjson's speed, DRF's bytes."""

import datetime
import decimal
import json
import uuid

import pytest
from django.utils.translation import gettext_lazy
from rest_framework import renderers as drf_renderers
from rest_framework.utils.serializer_helpers import ReturnDict, ReturnList

from marketplace.renderers import JSONRenderer

_MOMENT = datetime.datetime(2026, 12, 3, 17, 6, 13, 123456, tzinfo=datetime.UTC)

VALUES = {
    "a page": {"results": [{"id": str(uuid.uuid4()), "name": "Fast translator", "tags": ["nlp"], "price": 1_000,
                            "is_active": True, "author": None, "relevance": 0.5181452731291453}],
               "next_cursor": None},
    "text of every kind": "\x00\x01\x1f\x7f \"quoted\" back\\slash \u00e9\u4e2d\U0001f600 </script> \u2028\u2029 end",
    "line separators in keys": {"a\u2028b": "c\u2029d"},
    "integers": [0, -1, 2**53 + 1, 2**63 - 1, -(2**63), 2**64 - 1],
    "integers beyond 64 bits (money in base units may be)": [2**64, -(2**64), 10**77],
    "keys that are not strings": {1: "one", None: "none"},
    "datetimes, dates and times": [_MOMENT, _MOMENT.replace(microsecond=0), _MOMENT.astimezone(
        datetime.timezone(datetime.timedelta(hours=2))), _MOMENT.date(), _MOMENT.time(), datetime.timedelta(hours=1)],
    "uuids and decimals": [uuid.UUID(int=7), decimal.Decimal("1.50")],
    "DRF's containers": ReturnDict({"list": ReturnList([1, 2], serializer=None)}, serializer=None),
    "a lazy string": gettext_lazy("Not found."),
    "tuples and sets": [(1, 2), {3}],
    "floats": [0.1, 1 / 3, 1e16, 1.5e300, -0.0, 0.0001],
    "empty": [{}, [], ""],
}


@pytest.mark.parametrize("value", VALUES.values(), ids=VALUES.keys())
def test_renders_what_drf_renders_byte_for_byte(value):
    assert JSONRenderer().render(value) == drf_renderers.JSONRenderer().render(value)


def test_a_float_below_a_ten_thousandth_is_the_same_number_in_positional_notation():
    value = {"tiny": 1e-05, "small": 2.5e-05}

    assert JSONRenderer().render(value) == b'{"tiny":0.00001,"small":0.000025}'
    assert json.loads(JSONRenderer().render(value)) == json.loads(drf_renderers.JSONRenderer().render(value))


def test_nan_is_written_as_null_where_drf_refuses_it():
    assert JSONRenderer().render({"x": float("nan"), "y": float("inf")}) == b'{"x":null,"y":null}'


def test_a_setting_other_than_drfs_default_form_is_drfs_own():
    class Ascii(JSONRenderer):
        ensure_ascii = True

    value = {"text": "caf\u00e9", "tiny": 1e-05}
    assert Ascii().render(value) == b'{"text":"caf\\u00e9","tiny":1e-05}'


def test_nothing_and_an_indented_answer_are_drfs_own():
    assert JSONRenderer().render(None) == b""
    assert JSONRenderer().render({"a": [1]}, "application/json; indent=2") == b'{\n  "a": [\n    1\n  ]\n}'


@pytest.mark.parametrize(("value", "error"), [({"object": object()}, TypeError), ("\ud800", UnicodeEncodeError)])
def test_what_neither_can_encode_is_refused_as_drf_refuses_it(value, error):
    with pytest.raises(error):
        drf_renderers.JSONRenderer().render(value)
    with pytest.raises(error):
        JSONRenderer().render(value)
