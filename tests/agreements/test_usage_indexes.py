"""Usage events have no index on agreement_id alone (one write less per event): the unique (agreement, seq) index
begins with it, and every lookup of an agreement's events uses it."""

import uuid
from datetime import timedelta

import pytest
from django.db import connection
from django.utils import timezone

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


@pytest.mark.parametrize("series", [selectors.usage_calls_by_bucket, selectors.usage_charged_by_bucket])
def test_the_dashboards_usage_charts_read_only_their_period_through_the_created_at_index(series, monkeypatch):
    """Before: no index on created_at, so every dashboard load read every usage event ever charged (a sequential
    scan of the largest table), however short its period."""
    from django.db.models.query import QuerySet

    plans = []
    values_list = QuerySet.values_list

    def explained(self, *fields, **kwargs):
        rows = values_list(self, *fields, **kwargs)
        if self.model is UsageEvent:
            plans.append(rows.explain())
        return rows

    monkeypatch.setattr(QuerySet, "values_list", explained)
    with connection.cursor() as cursor:
        cursor.execute("SET LOCAL enable_seqscan = off")  # the test table is small: ask which index it would use
    series(since=timezone.now() - timedelta(hours=24), step=timedelta(hours=1))

    assert len(plans) == 1 and "usage_event_created_at" in plans[0], plans
