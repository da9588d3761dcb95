"""Searches running at once per process (SEARCH_CONCURRENCY, marketplace.concurrency): one beyond the limit waits
for a slot, and is answered 503 `search_busy` with Retry-After when none frees in SEARCH_WAIT_SECONDS or when
SEARCH_WAITING_MAX searches wait already. Two real searches, one per thread and connection: the first is held
inside its database work until the test lets it go."""

import threading
import time

import pytest
from django.db import connections
from django.test import override_settings
from prometheus_client import REGISTRY

from catalog import selectors
from tests.catalog.factories import register_service
from tests.conftest import Api, error_code

pytestmark = pytest.mark.django_db(transaction=True)

BODY = {"q": "invoice"}


def _search_in_a_thread(secret: str) -> tuple[threading.Thread, dict]:
    """A search by the key's holder in a thread of its own, with its own connection: (the thread, its answer once
    joined, under "response")."""
    answer = {}

    def search():
        try:
            answer["response"] = Api(secret).post("/catalog/search", BODY)
        finally:
            connections.close_all()

    thread = threading.Thread(target=search)
    thread.start()
    return thread, answer


class HeldSearch:
    """A search in a thread of its own, held inside `selectors.service_search` (its slot taken) until `release`."""

    def __init__(self, monkeypatch, secret: str):
        self.inside, self.released = threading.Event(), threading.Event()
        real = selectors.service_search
        first = threading.Lock()

        def held(**kwargs):
            if first.acquire(blocking=False):  # only the first search is held
                self.inside.set()
                assert self.released.wait(10)
            return real(**kwargs)

        monkeypatch.setattr(selectors, "service_search", held)
        self.thread, self.answer = _search_in_a_thread(secret)
        assert self.inside.wait(10)

    def release(self):
        self.released.set()
        self.thread.join(10)
        response = self.answer["response"]
        assert response.status_code == 200, response.content
        return response


def _shed() -> float:
    return REGISTRY.get_sample_value("marketplace_requests_shed_total", {"bulkhead": "search"}) or 0.0


@pytest.fixture
def invoice_service(seller):
    return register_service(seller, name="Invoice extractor")


@override_settings(SEARCH_CONCURRENCY=1, SEARCH_WAIT_SECONDS=10, SEARCH_WAITING_MAX=4)
def test_a_search_beyond_the_limit_waits_for_the_running_one_and_is_answered(monkeypatch, buyer_api, invoice_service):
    running = HeldSearch(monkeypatch, buyer_api.secret)
    thread, waiting = _search_in_a_thread(buyer_api.secret)
    thread.join(0.3)
    assert thread.is_alive()  # waiting for the slot the held search has

    first = running.release()
    thread.join(10)

    assert waiting["response"].status_code == 200, waiting["response"].content
    assert [result["id"] for result in waiting["response"].json()["results"]] == [str(invoice_service.pk)]
    assert first.json()["results"] == waiting["response"].json()["results"]


@override_settings(SEARCH_CONCURRENCY=1, SEARCH_WAIT_SECONDS=0.2, SEARCH_WAITING_MAX=4)
def test_a_search_that_waits_longer_than_search_wait_seconds_is_answered_503_search_busy(
        monkeypatch, buyer_api, invoice_service):
    shed_before = _shed()
    running = HeldSearch(monkeypatch, buyer_api.secret)

    started = time.monotonic()
    response = buyer_api.post("/catalog/search", BODY)

    assert 0.2 <= time.monotonic() - started < 5
    assert response.status_code == 503
    assert error_code(response) == "search_busy"
    assert response["Retry-After"] == "1"
    assert response.json()["error"]["details"] == {"retry_after_seconds": 1}
    assert _shed() == shed_before + 1
    running.release()  # the held search is answered all the same
    assert buyer_api.post("/catalog/search", BODY).status_code == 200  # and the slot is free again


@override_settings(SEARCH_CONCURRENCY=1, SEARCH_WAIT_SECONDS=10, SEARCH_WAITING_MAX=1)
def test_beyond_search_waiting_max_a_search_is_refused_at_once(monkeypatch, buyer_api, invoice_service):
    running = HeldSearch(monkeypatch, buyer_api.secret)
    thread, waiting = _search_in_a_thread(buyer_api.secret)
    thread.join(0.3)
    assert thread.is_alive()  # the one search allowed to wait

    started = time.monotonic()
    refused = buyer_api.post("/catalog/search", BODY)

    assert time.monotonic() - started < 5  # not after SEARCH_WAIT_SECONDS
    assert refused.status_code == 503
    assert error_code(refused) == "search_busy"
    running.release()
    thread.join(10)
    assert waiting["response"].status_code == 200


@override_settings(SEARCH_CONCURRENCY=0, SEARCH_WAIT_SECONDS=0.2, SEARCH_WAITING_MAX=0)
def test_with_search_concurrency_0_searches_are_not_limited(monkeypatch, buyer_api, invoice_service):
    running = HeldSearch(monkeypatch, buyer_api.secret)

    assert buyer_api.post("/catalog/search", BODY).status_code == 200  # while the held one runs

    running.release()


@override_settings(SEARCH_CONCURRENCY=1, SEARCH_WAIT_SECONDS=0.2, SEARCH_WAITING_MAX=4)
def test_a_search_that_fails_gives_its_slot_back(monkeypatch, buyer_api, invoice_service):
    monkeypatch.setattr(selectors, "service_search", lambda **kwargs: 1 / 0)

    assert buyer_api.post("/catalog/search", BODY).status_code == 500
    monkeypatch.undo()

    assert buyer_api.post("/catalog/search", BODY).status_code == 200  # not 503: the slot was given back
