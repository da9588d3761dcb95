"""The agent's pollable inbox (`/agents/{id}/events`): read with any key, acknowledged with a key that may act."""

import pytest

from tests.catalog.factories import issue_key
from tests.conftest import Api, error_code
from tests.agreements.helpers import proposal

pytestmark = pytest.mark.django_db


def test_a_read_only_key_lists_the_inbox_but_cannot_acknowledge_its_events(buyer, buyer_api, service):
    """Acknowledging changes what the agent's own poller is told is pending: a read-only key (a dashboard's)
    must not do it."""
    assert buyer_api.post("/usage-agreements", proposal(service)).status_code == 201
    read_only = Api(issue_key(buyer, scope="read"))
    [event] = read_only.get(f"/agents/{buyer.pk}/events").json()
    assert event["status"] == "pending"

    refused = read_only.post(f"/agents/{buyer.pk}/events/{event['event_id']}/ack")
    assert refused.status_code == 403 and error_code(refused) == "insufficient_scope"
    assert read_only.get(f"/agents/{buyer.pk}/events").json()[0]["status"] == "pending"

    assert buyer_api.post(f"/agents/{buyer.pk}/events/{event['event_id']}/ack").status_code == 200
    assert read_only.get(f"/agents/{buyer.pk}/events").json()[0]["status"] == "acked"
