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


@pytest.mark.parametrize("event_id", ["evt_\u00b2", "evt_\u2460", "evt_1\u00b3"])
def test_an_event_id_of_digits_int_cannot_read_is_not_found_not_a_500(buyer, buyer_api, service, event_id):
    """`str.isdigit` takes superscripts and circled digits, which `int` refuses: such an id was a 500."""
    assert buyer_api.post("/usage-agreements", proposal(service)).status_code == 201
    refused = buyer_api.post(f"/agents/{buyer.pk}/events/{event_id}/ack")
    assert refused.status_code == 404 and error_code(refused) == "event_not_found", refused.content


def test_an_event_id_with_a_trailing_newline_is_not_the_event(buyer, buyer_api, service):
    """A pattern's `$` matches before a final newline: `evt_5%0A` was read as event 5."""
    assert buyer_api.post("/usage-agreements", proposal(service)).status_code == 201
    [event] = buyer_api.get(f"/agents/{buyer.pk}/events").json()
    refused = buyer_api.post(f"/agents/{buyer.pk}/events/{event['event_id']}%0A/ack")
    assert refused.status_code == 404 and error_code(refused) == "event_not_found", refused.content
    assert buyer_api.get(f"/agents/{buyer.pk}/events").json()[0]["status"] == "pending"


@pytest.mark.parametrize("types", ["agreement.acepted", "agreement.proposed,agreement.nonsense", "proposed"])
def test_an_inbox_filter_naming_no_event_type_is_400_not_an_empty_inbox(buyer, buyer_api, service, types):
    """A misspelt type was read as a status no event has: the poller was told, forever, that nothing is pending."""
    assert buyer_api.post("/usage-agreements", proposal(service)).status_code == 201
    refused = buyer_api.get(f"/agents/{buyer.pk}/events", {"types": types})
    assert refused.status_code == 400, refused.content
    assert error_code(refused) == "validation_error"
    assert refused.json()["error"]["details"]["fields"]["types"][0]["code"] == "unknown_event_type"
    [event] = buyer_api.get(f"/agents/{buyer.pk}/events", {"types": "agreement.proposed, agreement.undone"}).json()
    assert event["type"] == "agreement.proposed"
