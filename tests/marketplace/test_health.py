"""/healthz (liveness, no dependency) and /readyz (database, broker, chain RPC, each bounded in time)."""

import gc
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
                                                             "indexer": "ok", "payout_finality": "ok",
                                                             "receipt_signer": "ok", "relayer_keys": "ok"}}


@pytest.mark.django_db(transaction=True)
def test_not_ready_names_what_failed(settings):
    settings.CELERY_BROKER_URL = "redis://127.0.0.1:1/0"
    settings.CHAIN_RPC_URL = CLOSED_PORT_URL
    settings.USAGE_ESCROW_ADDRESS = "0x" + "11" * 20  # the indexer's lag cannot be known without the chain
    response = Client().get("/readyz")
    assert response.status_code == 503
    assert error_code(response) == "not_ready"
    details = response.json()["error"]["details"]
    # PAYOUT_HEAD_TAG empty (the dev chain's default): no payout waits for the node's tag, which is not asked.
    assert details["checks"] == {"database": "ok", "broker": "failed", "chain": "failed", "indexer": "failed",
                                 "payout_finality": "ok", "receipt_signer": "ok", "relayer_keys": "ok"}
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


@pytest.mark.chain
@pytest.mark.django_db(transaction=True)
def test_readiness_leaves_no_database_connection_open(escrow_chain):
    """Each check runs in a thread of its own, on that thread's own connection: closed when the check is done, or
    every probe of a load balancer left one open (the indexer's check did) until the garbage collector came by."""
    from django.db import connection

    def others() -> set[int]:
        with connection.cursor() as cursor:
            cursor.execute("SELECT pid FROM pg_stat_activity WHERE datname = current_database() "
                           "AND pid <> pg_backend_pid()")
            return {pid for (pid,) in cursor.fetchall()}

    before = others()  # an earlier test's check may still be running, and end meanwhile
    gc.disable()  # what a busy process looks like between two collections
    try:
        for _ in range(3):
            assert Client().get("/readyz").status_code == 200
        # A backend stays listed for a moment after its client closed the connection (it is still exiting, longer
        # on a loaded machine); a connection left open stays listed, as long as the garbage collector is off.
        deadline = time.monotonic() + 5
        while (left_open := others() - before) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert left_open == set()
    finally:
        gc.enable()


@pytest.mark.django_db(transaction=True)
def test_not_ready_when_a_receipt_signer_key_is_malformed(settings):
    # Left out rather than crashing every signature; /readyz says so (and `manage.py check`: marketplace.E001).
    settings.RECEIPT_SIGNER_RETIRED_PRIVATE_KEYS = ["0x1234"]
    response = Client().get("/readyz")
    assert response.status_code == 503
    assert response.json()["error"]["details"]["checks"]["receipt_signer"] == "failed"


@pytest.mark.chain
@pytest.mark.django_db(transaction=True)
@pytest.mark.parametrize("setting", ["RELAYER_PRIVATE_KEY", "RELAYER_RETIRED_PRIVATE_KEYS"])
def test_not_ready_when_a_relayer_key_is_malformed(escrow_chain, settings, setting):
    """A malformed relayer key signs nothing (a retired one: what its wallet has in flight is never replaced, and its
    transfers are not indexed), which `manage.py check` reports (marketplace.E001) and /readyz said nothing of."""
    setattr(settings, setting, "0x1234" if setting == "RELAYER_PRIVATE_KEY" else ["0x1234"])
    response = Client().get("/readyz")
    assert response.status_code == 503, response.content
    assert response.json()["error"]["details"]["failed"] == ["relayer_keys"]


def test_probes_one_after_another_share_one_run_of_the_checks_for_the_time_its_answer_is_kept(settings, monkeypatch):
    """/readyz answers anyone: each probe ran every check afresh (a thread each, new database connections, a broker
    connection, calls to the chain node), so a client probing in a loop made the platform's dependencies do that work
    at its pace. An answer is now kept READINESS_CACHE_SECONDS per process."""
    from marketplace import health

    runs = []
    monkeypatch.setattr(health, "_checks", {"counted": lambda timeout: runs.append(timeout)})
    monkeypatch.setattr(health, "_last_run", None)
    settings.READINESS_CACHE_SECONDS = 60
    for _ in range(5):
        response = Client().get("/readyz")
        assert response.status_code == 200 and response.json()["checks"] == {"counted": "ok"}
    assert len(runs) == 1
