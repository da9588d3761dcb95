import pytest

from tests.catalog.factories import register_service
from tests.escrow.flow import Parties


@pytest.fixture
def service(seller):
    """A per-call service at 0.02 USDC."""
    return register_service(seller)


@pytest.fixture
def active(escrow_chain, http_server, django_capture_on_commit_callbacks):
    """An active agreement for 5 calls at 0.02 USDC to a service whose upstream is `http_server`."""
    parties = Parties(escrow_chain, upstream_base_url=http_server.url + "/api")
    agreement = parties.accepted_agreement(quantity=5)
    assert parties.activate(agreement["id"], django_capture_on_commit_callbacks).status_code == 202
    assert parties.agreement(agreement["id"])["status"] == "active"
    parties.agreement_id = agreement["id"]
    parties.proxy = f"/metered-proxy/{agreement['id']}"
    return parties
