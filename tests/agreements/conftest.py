import pytest

from tests.catalog.factories import register_service
from tests.marketplace.conftest import active_agreement


@pytest.fixture
def service(seller):
    """A per-call service at 0.02 USDC."""
    return register_service(seller)


@pytest.fixture
def active(escrow_chain, http_server, django_capture_on_commit_callbacks):
    """An active agreement for 5 calls at 0.02 USDC to a service whose upstream is `http_server`."""
    return active_agreement(escrow_chain, django_capture_on_commit_callbacks, http_server.url + "/api")
