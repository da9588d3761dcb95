"""The OpenAPI document view, safe under concurrent requests."""

import threading

from drf_spectacular.utils import extend_schema
from drf_spectacular.views import SCHEMA_KWARGS, SpectacularAPIView


class SchemaView(SpectacularAPIView):
    """drf-spectacular's schema generation is not thread-safe (its lazily loaded extensions and generator stats are
    shared state; upstream issues tfranzel/drf-spectacular#1122 and #1368): concurrent first requests to a threaded
    server failed with 500. Generating one schema at a time costs nothing; it is rarely requested."""

    _generating = threading.Lock()

    @extend_schema(**SCHEMA_KWARGS)  # what the parent's get() is documented with
    def get(self, request, *args, **kwargs):
        with self._generating:
            return super().get(request, *args, **kwargs)
