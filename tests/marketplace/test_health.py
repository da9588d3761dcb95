"""/healthz (liveness, no dependency) and /readyz (database, broker, chain RPC, each bounded in time)."""

import socket
import time

import pytest
from django.test import Client

from tests.conftest import error_code

CLOSED_PORT_URL = "http://127.0.0.1:1"


def test_liveness_touches_no_dependency(settings):
    # No `db` fixture: pytest-django fails any database access here. Nothing else is reachable either.
    settings.CELERY_BROKER_URL = "redis://127.0.0.1:1/0"
    settings.CHAIN_RPC_URL = CLOSED_PORT_URL
    response = Client().get("/healthz")
    assert response.status_code == 200
    assert response.json() == {"status": "ok"}


@pytest.mark.chain
@pytest.mark.django_db(transaction=True)  # the database check runs on a connection of its own
def test_ready_when_database_broker_and_chain_answer(escrow_chain):
    response = Client().get("/readyz")
    assert response.status_code == 200, response.content
    assert response.json() == {"status": "ready", "checks": {"database": "ok", "broker": "ok", "chain": "ok",
                                                             "indexer": "ok"}}


@pytest.mark.django_db(transaction=True)
def test_not_ready_names_what_failed(settings):
    settings.CELERY_BROKER_URL = "redis://127.0.0.1:1/0"
    settings.CHAIN_RPC_URL = CLOSED_PORT_URL
    settings.USAGE_ESCROW_ADDRESS = "0x" + "11" * 20  # the indexer's lag cannot be known without the chain
    response = Client().get("/readyz")
    assert response.status_code == 503
    assert error_code(response) == "not_ready"
    details = response.json()["error"]["details"]
    assert details["checks"] == {"database": "ok", "broker": "failed", "chain": "failed", "indexer": "failed"}
    assert details["failed"] == ["broker", "chain", "indexer"]


@pytest.mark.django_db(transaction=True)
def test_a_hanging_dependency_times_out_quickly(settings):
    # A chain node that accepts connections and never answers.
    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen()
    try:
        settings.CHAIN_RPC_URL = f"http://127.0.0.1:{silent.getsockname()[1]}"
        settings.READINESS_TIMEOUT_SECONDS = 0.5
        started = time.monotonic()
        response = Client().get("/readyz")
        elapsed = time.monotonic() - started
    finally:
        silent.close()
    assert response.status_code == 503
    assert response.json()["error"]["details"]["checks"]["chain"] == "timeout"
    assert elapsed < 3
