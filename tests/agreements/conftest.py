import pytest

from agreements import selectors, webhooks

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
    return activated_through_the_api(escrow_chain, http_server.url, quantity=5)


def activated_through_the_api(chain, upstream_base_url: str, *, quantity: int, **service_overrides) -> Parties:
    """A buyer and a seller (agents of their own) with an active agreement for `quantity` calls at 0.02 USDC (or
    as `service_overrides` price the service) to `upstream_base_url`, activated through the API and the chain
    outside any transaction of the test's."""
    parties = Parties(chain, upstream_base_url=upstream_base_url, **service_overrides)
    agreement = parties.accepted_agreement(quantity=quantity)
    assert parties.buyer_api.post(f"/usage-agreements/{agreement['id']}/activate-escrow",
                                  parties.signed_activation(agreement["id"])).status_code == 202
    for _ in range(5):  # a relayer nonce taken meanwhile (a second agreement's) is sent again at the next poll
        poll_mined()
        if parties.agreement(agreement["id"])["status"] == "active":
            break
    parties.agreement_id = agreement["id"]
    return parties


@pytest.fixture
def deleted_once_read(monkeypatch):
    """Call it, and the next read of a webhook subscription is followed by its deletion (another request's DELETE,
    committed meanwhile)."""
    def install():
        read = selectors.webhook_subscription_get

        def read_then_deleted(**kwargs):
            found = read(**kwargs)
            webhooks.subscription_delete(subscription=found)
            return found

        monkeypatch.setattr(selectors, "webhook_subscription_get", read_then_deleted)
    return install
