"""Structured JSON logs: every record names its request, and the agreement when one is being worked on."""

import logging

import pytest

from tests.escrow.flow import Parties, confirm_all
from tests.marketplace.conftest import active_agreement, parsed

pytestmark = [pytest.mark.chain, pytest.mark.django_db]


def test_records_of_a_proxied_call_carry_the_agreement_and_request_ids(escrow_chain, http_server, json_logs,
                                                                       django_capture_on_commit_callbacks):
    active = active_agreement(escrow_chain, django_capture_on_commit_callbacks, http_server.url + "/api")
    http_server.responses.append((503, {"error": "overloaded"}))
    json_logs.clear()
    response = active.buyer_api.get(f"{active.proxy}/translate", headers={"X-Request-Id": "call-42"})
    assert response.status_code == 503
    [failed] = [r for r in parsed(json_logs) if r["logger"] == "django.request"]
    assert failed["request_id"] == "call-42"
    assert failed["agreement_id"] == active.agreement_id

    # The next request on the same thread is about no agreement.
    json_logs.clear()
    active.buyer_api.get("/usage-agreements/not-a-uuid", headers={"X-Request-Id": "call-43"})
    [not_found] = [r for r in parsed(json_logs) if r["logger"] == "django.request"]
    assert not_found["request_id"] == "call-43" and "agreement_id" not in not_found


def test_relayer_records_carry_the_agreement_id(escrow_chain, json_logs, django_capture_on_commit_callbacks):
    parties = Parties(escrow_chain)
    agreement = parties.accepted_agreement()
    body = parties.signed_activation(agreement["id"])
    json_logs.clear()
    with django_capture_on_commit_callbacks(execute=True):
        parties.buyer_api.post(f"/usage-agreements/{agreement['id']}/activate-escrow", body)
    confirm_all(django_capture_on_commit_callbacks)
    assert parties.agreement(agreement["id"])["status"] == "active"
    chain_calls = [r for r in parsed(json_logs) if r["logger"].startswith("web3")]
    assert chain_calls, "expected the chain client's debug records"
    submission_and_confirmation = [r for r in chain_calls if r.get("agreement_id") == agreement["id"]]
    assert len(submission_and_confirmation) >= 2


def test_worker_records_carry_the_task_id(json_logs):
    from celery.signals import task_prerun

    from agreements.tasks import deliver_webhook
    from marketplace.logging import agreement_id_var, request_id_var

    request_token, agreement_token = request_id_var.set("-"), agreement_id_var.set("stale-agreement")
    try:
        # What a worker does before running a task it received from the broker (not eagerly).
        task_prerun.send(sender=deliver_webhook, task_id="8c1f", task=deliver_webhook, args=(), kwargs={})
        logging.getLogger("agreements.tasks").warning("from inside the task")
    finally:
        request_id_var.reset(request_token)
        agreement_id_var.reset(agreement_token)
    [record] = [r for r in parsed(json_logs) if r["message"] == "from inside the task"]
    assert record["request_id"] == "task_8c1f" and "agreement_id" not in record
