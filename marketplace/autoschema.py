"""The schema class of every view (DEFAULT_SCHEMA_CLASS): drf-spectacular's, publishing a DELETE's declared body.

A module of its own: marketplace.openapi imports drf-spectacular's views, which load this setting.
"""

from drf_spectacular import openapi


class AutoSchema(openapi.AutoSchema):
    """drf-spectacular publishes no request body for a DELETE; the Masumi registry's deregistration reads one
    (agentIdentifier, network: Masumi's wire format), which clients generated from the schema could not send. A
    DELETE publishes the body its view declares with extend_schema(request=...), and none otherwise."""

    def get_request_serializer(self):
        # Reached for a DELETE only when nothing is declared: the view's serializer describes what it answers.
        return None if self.method == "DELETE" else super().get_request_serializer()

    def _get_request_body(self, direction="request"):
        if self.method != "DELETE":
            return super()._get_request_body(direction)
        if self.get_request_serializer() is None:
            return None
        # The parent builds bodies for POST, PUT and PATCH only; as a POST's (the method is not otherwise read).
        self.method = "POST"
        try:
            return super()._get_request_body(direction)
        finally:
            self.method = "DELETE"
