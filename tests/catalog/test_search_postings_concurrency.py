"""The postings (catalog/migrations/0011_service_postings.py) when a service and its seller change at once, and the
collection of unused names and tags beside a registration bearing them, on real PostgreSQL with one connection per
thread."""

import threading
import time

import pytest
from django.db import connection, connections, transaction

from catalog import services, tasks
from catalog.models import SERVICE_POSTINGS_TABLE, Agent, Availability, Service, ServiceName, ServiceState
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


def _unused_name_and_tag(seller) -> None:
    """"Shared name" and "shared-tag" in the lexicon and the tags, borne by a deregistered service only."""
    gone = register_service(seller, name="Shared name", tags=["shared-tag"], skills=[])
    services.service_deregister(service=gone, actor=seller)


def _still_found(seller) -> None:
    service = Service.objects.get(seller=seller, name="Shared name", state=ServiceState.REGISTERED)
    assert ServiceName.objects.filter(name="Shared name").exists()
    assert [tag.name for tag in service.tags.all()] == ["shared-tag"]
    assert tasks.collect_unused_search_terms() == 0


def test_a_collection_of_unused_terms_skips_a_name_and_tag_a_registration_not_yet_committed_bears():
    """The registration has written its service and taken the name and tag, not yet committed: the collection,
    which cannot see that service, leaves them."""
    seller = AgentFactory(is_seller=True)
    _unused_name_and_tag(seller)
    registered, collected = threading.Event(), threading.Event()

    def register():
        try:
            with transaction.atomic():
                register_service(seller, name="Shared name", tags=["shared-tag"], skills=[])
                registered.set()
                assert collected.wait(10)
        finally:
            connections.close_all()

    registration = threading.Thread(target=register)
    registration.start()
    assert registered.wait(10)
    try:
        tasks.collect_unused_search_terms()
    finally:
        collected.set()
        registration.join(10)

    _still_found(seller)


def test_a_registration_waiting_on_a_collection_of_its_name_and_tag_makes_them_again():
    """The collection has deleted the unused name and tag, not yet committed, when a registration bearing them
    comes: the registration waits for it, then makes them again (its tag link is to a tag that exists)."""
    seller = AgentFactory(is_seller=True)
    _unused_name_and_tag(seller)
    collected, registration_waits = threading.Event(), threading.Event()
    failures = []

    def collect():
        try:
            with transaction.atomic():
                assert tasks.collect_unused_search_terms() == 2
                collected.set()
                assert registration_waits.wait(10)
        finally:
            connections.close_all()

    def register():
        try:
            register_service(seller, name="Shared name", tags=["shared-tag"], skills=[])
        except Exception as error:  # the test's thread: told to the test
            failures.append(error)
        finally:
            connections.close_all()

    collection = threading.Thread(target=collect)
    collection.start()
    assert collected.wait(10)
    registration = threading.Thread(target=register)
    registration.start()
    for _ in range(100):
        if _waiting_for_a_lock():
            break
        time.sleep(0.05)
    registration_waits.set()
    collection.join(10)
    registration.join(10)

    assert failures == []
    _still_found(seller)
