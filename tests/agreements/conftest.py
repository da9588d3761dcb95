import pytest

from tests.catalog.factories import register_service
from tests.escrow.flow import Parties, poll_mined
from tests.marketplace.conftest import active_agreement


@pytest.fixture
def service(seller):
    """A per-call service at 0.02 USDC."""
    return register_service(seller)


@pytest.fixture
def active(escrow_chain, http_server, django_capture_on_commit_callbacks):
    """An active agreement for 5 calls at 0.02 USDC to a service whose upstream is `http_server`."""
    return active_agreement(escrow_chain, django_capture_on_commit_callbacks, http_server.url + "/api")


@pytest.fixture
def active_outside_transaction(escrow_chain, http_server):
    """An active agreement for 5 calls at 0.02 USDC to `http_server`, made through the API and the chain in a test
    marked `django_db(transaction=True)`: charged as the server charges, outside any transaction of the test's."""
    parties = Parties(escrow_chain, upstream_base_url=http_server.url)
    agreement = parties.accepted_agreement(quantity=5)
    assert parties.buyer_api.post(f"/usage-agreements/{agreement['id']}/activate-escrow",
                                  parties.signed_activation(agreement["id"])).status_code == 202
    poll_mined()
    parties.agreement_id = agreement["id"]
    return parties
