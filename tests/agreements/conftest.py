import pytest

from tests.catalog.factories import register_service


@pytest.fixture
def service(seller):
    """A per-call service at 0.02 USDC."""
    return register_service(seller)
