"""Check a test client response against the OpenAPI description the API publishes (regressions of fuzz finds)."""

import json
from functools import cache

import requests
import schemathesis
from drf_spectacular.generators import SchemaGenerator
from drf_spectacular.renderers import OpenApiJsonRenderer
from schemathesis.core.transport import Response


@cache
def published_schema():
    document = json.loads(OpenApiJsonRenderer().render(SchemaGenerator().get_schema(request=None, public=True)))
    return schemathesis.openapi.from_dict(document)


def assert_documented(response, method: str, path_template: str) -> None:
    """Fail unless the response's body is what the schema documents for its status code at this operation."""
    operation = published_schema()[path_template][method.upper()]
    request = requests.Request(method.upper(), f"http://testserver{response.wsgi_request.path}").prepare()
    operation.validate_response(Response(
        status_code=response.status_code, headers={key: [value] for key, value in response.headers.items()},
        content=response.content, request=request, elapsed=0.0, verify=False))
