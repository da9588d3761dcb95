"""Hostile query strings: more fields than Django reads (DATA_UPLOAD_MAX_NUMBER_FIELDS) are a 400 in the error
shape, never a 500 logged as a fault of ours."""

import logging

import pytest

from tests.conftest import error_code

pytestmark = pytest.mark.django_db


@pytest.mark.parametrize("path", ["/agents/me", "/catalog/search", "/usage-agreements", "/webhooks", "/healthz"])
def test_more_query_fields_than_django_reads_are_400_not_500(settings, buyer_api, path, caplog):
    """DRF reads the query string first thing (content negotiation): Django's TooManyFieldsSent went to the
    exception handler as an unknown error, a 500 `internal_error` logged at ERROR, for any caller with a long URL."""
    fields = "&".join(f"f{n}=1" for n in range(settings.DATA_UPLOAD_MAX_NUMBER_FIELDS + 1))
    with caplog.at_level(logging.ERROR):
        response = buyer_api.client.generic("GET", f"{path}?{fields}")
    assert (response.status_code, error_code(response)) == (400, "too_many_query_fields"), response.content
    assert response.json()["error"]["details"] == {"max_fields": settings.DATA_UPLOAD_MAX_NUMBER_FIELDS}
    assert not [record for record in caplog.records if record.levelno >= logging.ERROR]

