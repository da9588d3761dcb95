"""The request-body parser of every API view: a body, when there is one, is a JSON object.

Every endpoint's body is an object of named fields; anything else (`false`, `[]`, `"x"`) is a client that means
something we would not read, so it is refused here, once, rather than coerced to "no fields" view by view. The
metered proxy forwards bodies as they are and never parses them.
"""

from rest_framework.parsers import JSONParser

from marketplace.errors import InvalidInput


class JSONObjectParser(JSONParser):
    def parse(self, stream, media_type=None, parser_context=None):
        data = super().parse(stream, media_type, parser_context)
        if not isinstance(data, dict):
            kind = _json_type(data)
            raise InvalidInput(f"The request body must be a JSON object, not {kind}.", code="body_not_object",
                               details={"type": kind})
        return data


def _json_type(value) -> str:
    return {bool: "boolean", int: "number", float: "number", str: "string", list: "array",
            type(None): "null"}.get(type(value), "unknown")
