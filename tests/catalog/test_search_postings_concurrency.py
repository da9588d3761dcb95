"""The postings (catalog/migrations/0011_service_postings.py) when a service and its seller change at once, on real
PostgreSQL with one connection per thread."""

import threading
import time

import pytest
from django.db import connection, connections, transaction

from catalog import services
from catalog.models import SERVICE_POSTINGS_TABLE, Agent, Availability
from tests.catalog.factories import AgentFactory, register_service

pytestmark = [pytest.mark.postgres, pytest.mark.django_db(transaction=True)]


def _waiting_for_a_lock() -> bool:
    with connection.cursor() as cursor:
        cursor.execute("SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
                       "AND wait_event_type = 'Lock'")
        return cursor.fetchone()[0] > 0


def test_a_seller_deactivated_while_its_service_becomes_available_leaves_no_postings():
    """The service's postings are written by a transaction the deactivation cannot see yet: the deactivation waits
    for it, then removes them."""
    seller = AgentFactory(is_seller=True)
    service = register_service(seller, name="Invoice extractor")
    services.service_availability_record(service_id=service.pk, available=False)
    service_written, deactivation_waits = threading.Event(), threading.Event()

    def make_available():
        try:
            with transaction.atomic():
                services.service_availability_record(service_id=service.pk, available=True)
                service_written.set()
                assert deactivation_waits.wait(10)
        finally:
            connections.close_all()

    def deactivate_seller():
        try:
            Agent.objects.filter(pk=seller.pk).update(is_active=False)
        finally:
            connections.close_all()

    available = threading.Thread(target=make_available)
    available.start()
    assert service_written.wait(10)
    deactivation = threading.Thread(target=deactivate_seller)
    deactivation.start()
    for _ in range(100):
        if _waiting_for_a_lock():
            break
        time.sleep(0.05)
    deactivation_waits.set()
    available.join(10)
    deactivation.join(10)

    service.refresh_from_db()
    assert service.availability == Availability.AVAILABLE
    with connection.cursor() as cursor:
        cursor.execute(f"SELECT count(*) FROM {SERVICE_POSTINGS_TABLE} WHERE service_id = %s", [service.pk])
        assert cursor.fetchone()[0] == 0
