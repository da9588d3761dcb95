"""Usage events have no index on agreement_id alone (one write less per event): the unique (agreement, seq) index
begins with it, and every lookup of an agreement's events uses it."""

import uuid

import pytest
from django.db import connection

from agreements import selectors
from agreements.models import UsageAgreement, UsageEvent

pytestmark = [pytest.mark.postgres, pytest.mark.django_db]


def test_no_index_on_agreement_id_alone():
    with connection.cursor() as cursor:
        constraints = connection.introspection.get_constraints(cursor, UsageEvent._meta.db_table)
    indexes = {name: details["columns"] for name, details in constraints.items()
               if details["index"] or details["unique"]}
    assert ["agreement_id"] not in indexes.values()
    assert indexes["usage_event_gap_free_seq"] == ["agreement_id", "seq"]


@pytest.mark.parametrize("query", [
    lambda agreement: selectors.usage_events(agreement=agreement).order_by("seq")[:50],  # the listing and proofs
    lambda agreement: UsageEvent.objects.filter(agreement_id=agreement.pk, request_id="req_1:0"),  # a charge's
    lambda agreement: UsageEvent.objects.filter(agreement_id=agreement.pk).values("agreement_id"),  # PROTECT's
])
def test_an_agreements_events_are_found_through_the_seq_index(query):
    agreement = UsageAgreement(pk=uuid.uuid4())
    with connection.cursor() as cursor:
        cursor.execute("SET LOCAL enable_seqscan = off")  # the test table is small: ask which index it would use
    assert "usage_event_gap_free_seq" in query(agreement).explain()
