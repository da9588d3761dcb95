"""Dependencies fail under a running stack: the broker stops, the chain node is unreachable, the database drops
the web server's connection in the middle of a proxied call, the seller's service hangs or resets connections."""

import threading

import psycopg
import pytest
from django.db import connection

from agreements.models import UsageAgreement
from tests.faults.conftest import assert_books_balance, assert_each_transaction_sent_once, assert_reconciled
from tests.faults.processes import wait_until

pytestmark = [pytest.mark.slow, pytest.mark.faults, pytest.mark.chain, pytest.mark.postgres,
              pytest.mark.django_db(transaction=True)]


def activate(api, parties, agreement_id):
    return api.post(f"/usage-agreements/{agreement_id}/activate-escrow", json=parties.signed_activation(agreement_id))


def active_agreement(stack, api, parties, quantity: int = 20) -> dict:
    """An agreement activated through the running stack: its web server, broker, worker and chain relay."""
    agreement = parties.accepted_agreement(quantity=quantity)
    response = activate(api, parties, agreement["id"])
    assert response.status_code == 202, response.text
    stack.wait_for_status(agreement["id"], "active")
    return agreement


def test_broker_stopped_and_restarted_while_requests_arrive(stack, parties, upstream):
    waiting = parties.accepted_agreement()
    with stack.api(parties.buyer_api.secret) as api:
        running = active_agreement(stack, api, parties)

        stack.redis.stop()
        # Activation is accepted while the broker is down: the transaction row is committed and the sweeper
        # sends it once the broker is back. Proxied calls need no broker at all.
        response = activate(api, parties, waiting["id"])
        assert response.status_code == 202, response.text
        for _ in range(3):
            assert api.get(f"/metered-proxy/{running['id']}/work").status_code == 200
        stack.redis.start()
        for _ in range(2):
            assert api.get(f"/metered-proxy/{running['id']}/work").status_code == 200

    stack.wait_for_status(waiting["id"], "active", timeout=90)
    assert_each_transaction_sent_once(waiting["id"], ["activate"])
    assert_books_balance(running["id"])
    assert UsageAgreement.objects.get(pk=running["id"]).used == 5 * parties.service.unit_price == upstream.served * \
        parties.service.unit_price
    assert_reconciled()


def test_chain_unreachable_for_a_while(stack, parties):
    queued, refused = parties.accepted_agreement(), parties.accepted_agreement()
    sent_before = stack.relayer_nonce()
    stack.worker.stop()
    with stack.api(parties.buyer_api.secret) as api:
        assert activate(api, parties, queued["id"]).status_code == 202
        stack.relay.stop()  # the node is unreachable for the worker and the web server alike
        stack.start_worker()
        wait_until(lambda: "RpcUnreachable" in stack.worker.log(), timeout=30,
                   what="the worker to meet the unreachable chain")
        # The API checks the chain before accepting an activation: a clear 503, nothing half-written.
        response = activate(api, parties, refused["id"])
        assert (response.status_code, response.json()["error"]["code"]) == (503, "chain_unavailable")
        assert stack.status(refused["id"]) == "accepted"
        verified = api.get(f"/usage-agreements/{queued['id']}/escrow-status", params={"verify": "true"})
        assert (verified.status_code, verified.json()["error"]["code"]) == (503, "chain_unavailable")
        assert stack.status(queued["id"]) == "submitting"
        stack.relay.start()

        stack.wait_for_status(queued["id"], "active", timeout=90)
        assert activate(api, parties, refused["id"]).status_code == 202
        stack.wait_for_status(refused["id"], "active")
    assert stack.relayer_nonce() == sent_before + 2
    assert_each_transaction_sent_once(queued["id"], ["activate"])
    assert_each_transaction_sent_once(refused["id"], ["activate"])
    assert_reconciled()


def _terminate_backends(application_name: str) -> int:
    db = connection.settings_dict
    with psycopg.connect(host=db["HOST"] or "127.0.0.1", port=db["PORT"] or 5432, user=db["USER"],
                         password=db["PASSWORD"] or None, dbname=db["NAME"], autocommit=True) as admin:
        rows = admin.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                             "WHERE datname = %s AND application_name = %s", [db["NAME"], application_name])
        return len(rows.fetchall())


def test_database_connection_dropped_during_a_proxied_call(stack, parties, upstream):
    with stack.api(parties.buyer_api.secret) as api:
        agreement = active_agreement(stack, api, parties)
        assert api.get(f"/metered-proxy/{agreement['id']}/work").status_code == 200

        upstream.set_mode("hang")
        result = {}
        call = threading.Thread(target=lambda: result.update(
            response=api.get(f"/metered-proxy/{agreement['id']}/work")))
        call.start()
        wait_until(upstream.arrived.is_set, timeout=20, what="the call to reach the seller")
        assert _terminate_backends("faults-web") >= 1  # the budget is reserved; the server's connection dies
        upstream.set_mode("ok")
        upstream.release()
        call.join(timeout=30)
        dropped = result["response"]
        # The seller answered but the charge could not be written: the buyer is told, and is not charged.
        assert dropped.status_code == 503, dropped.text
        assert dropped.json()["error"]["code"] == "database_unavailable"

        for _ in range(2):  # the server reconnects on the next request
            assert api.get(f"/metered-proxy/{agreement['id']}/work").status_code == 200

    assert_books_balance(agreement["id"])
    # Every served call is charged but the one whose charge could not be written (its buyer got the 503).
    assert upstream.served == 4
    assert UsageAgreement.objects.get(pk=agreement["id"]).used == (upstream.served - 1) * parties.service.unit_price
    assert_reconciled()


def test_upstream_hanging_or_resetting_charges_nothing(stack, parties, upstream):
    with stack.api(parties.buyer_api.secret) as api:
        agreement = active_agreement(stack, api, parties)
        url = f"/metered-proxy/{agreement['id']}/work"

        upstream.set_mode("hang")  # longer than the proxy's timeout (3 s in this stack)
        hung = api.get(url)
        assert (hung.status_code, hung.json()["error"]["code"]) == (504, "upstream_timeout")
        upstream.release()

        upstream.set_mode("reset")
        reset = api.get(url)
        assert (reset.status_code, reset.json()["error"]["code"]) == (502, "upstream_unavailable")
        retried = api.get(url, headers={"X-Request-Nonce": "retry-1"})
        assert retried.status_code == 502  # a failed call under a nonce may be retried with it
        upstream.set_mode("ok")
        assert api.get(url, headers={"X-Request-Nonce": "retry-1"}).status_code == 200
        replay = api.get(url, headers={"X-Request-Nonce": "retry-1"})
        assert replay.headers.get("X-Replayed") == "true"

    assert_books_balance(agreement["id"])
    assert UsageAgreement.objects.get(pk=agreement["id"]).used == parties.service.unit_price  # one call charged
    assert upstream.served == 1
    assert_reconciled()
