"""A seller over-reporting what it is paid: bad report bodies, reports on agreements that take none, and the
listings a buyer verifies."""

import threading

import pytest
from django.db import connection
from django.test.utils import CaptureQueriesContext

from agreements.models import UsageAgreement, UsageEvent
from escrow import chain_clock, settlement
from sdk import receipts
from tests.conftest import codes_at, error_code, read_to_its_end
from tests.escrow.flow import Parties, onchain_escrow

pytestmark = [pytest.mark.chain, pytest.mark.django_db]

HUGE_DIGITS = b"9" * 5000


def _raw_post(api, url, raw: bytes, key: str):
    return read_to_its_end(api.client.post(url, raw, content_type="application/json", HTTP_IDEMPOTENCY_KEY=key))


@pytest.mark.parametrize("raw", [
    b'{"units": 0}', b'{"units": -1}', b'{"units": 1.5}', b'{"units": 1e400}', b'{"units": 1.0}',
    b'{"units": "1"}', b'{"units": 115792089237316195423570985008687907853269984665640564039457584007913129639936}',
    b'{"units": ' + HUGE_DIGITS + b'}', b'{"events": []}', b'{"events": [{"units": 1}, {"units": -5}]}',
    b'{"units_used": -1}', b'{"units_used": 1.5}', b'{"units_used": 1e300}', b'{"units": 1, "units_used": 1}',
    b'{"units": 1, "units": 2}', b'[{"units": 1}]', b'{"units": null}', b'{"units": true}',
])
def test_a_malformed_report_is_a_4xx_with_a_code_and_writes_nothing(active, raw):
    response = _raw_post(active.seller_api, f"/usage-agreements/{active.agreement_id}/record-usage", raw, "bad")
    assert 400 <= response.status_code < 500 and error_code(response), (response.status_code, response.content)
    assert not UsageEvent.objects.filter(agreement_id=active.agreement_id).exists()
    assert UsageAgreement.objects.get(pk=active.agreement_id).used == 0


@pytest.mark.parametrize("body", [{"units_used": 6}, {"units_used": 10**12}, {"units": 6},
                                  {"events": [{"units": 10**12}] * 100}, {"events": [{"units": 5}, {"units": 1}]}])
def test_a_report_past_the_deposit_is_402_and_writes_nothing(active, body):
    response = active.seller_api.post(f"/usage-agreements/{active.agreement_id}/record-usage", body,
                                      headers={"Idempotency-Key": "over"})
    assert response.status_code == 402 and error_code(response) == "budget_exhausted", response.content
    assert not UsageEvent.objects.filter(agreement_id=active.agreement_id).exists()


def test_a_running_total_past_a_trillion_units_charges_what_the_deposit_holds(
        escrow_chain, settings, django_capture_on_commit_callbacks):
    """A deposit of more than 10**12 base units (AGREEMENT_MAX_AMOUNT raised) at 1 base unit per unit: the running
    total was bounded at 10**12 units, so the seller could report no further than that by it (400), and not at all
    once its reports per event had passed it."""
    settings.AGREEMENT_MAX_AMOUNT = 3 * 10**12
    parties = Parties(escrow_chain, buyer_funds=4 * 10**12,
                      pricing={"type": "per_unit", "unit_name": "token", "unit_price_atomic": 1, "token": "USDC"})
    agreement = parties.accepted_agreement(quantity=3 * 10**12)
    assert parties.activate(agreement["id"], django_capture_on_commit_callbacks).status_code == 202
    url = f"/usage-agreements/{agreement['id']}/record-usage"
    for units_used in (10**12, 2 * 10**12 + 1):
        response = parties.seller_api.post(url, {"units_used": units_used})
        assert response.status_code == 201, response.content
    over = parties.seller_api.post(url, {"units_used": 3 * 10**12 + 1})
    assert over.status_code == 402 and error_code(over) == "budget_exhausted", over.content
    assert UsageAgreement.objects.get(pk=agreement["id"]).used == 2 * 10**12 + 1


def test_the_same_key_with_another_body_is_refused_and_charges_once(active):
    url = f"/usage-agreements/{active.agreement_id}/record-usage"
    first = active.seller_api.post(url, {"units": 1}, headers={"Idempotency-Key": "k"})
    assert first.status_code == 201
    for body in ({"units": 4}, {"events": [{"units": 4}]}, {"units": 1, "description": "é"}):
        other = active.seller_api.post(url, body, headers={"Idempotency-Key": "k"})
        assert 400 <= other.status_code < 500 and error_code(other), other.content
    assert UsageAgreement.objects.get(pk=active.agreement_id).used == 20_000


def test_nobody_else_reads_an_agreements_usage(active, escrow_chain):
    active.seller_api.post(f"/usage-agreements/{active.agreement_id}/record-usage", {"units": 1},
                           headers={"Idempotency-Key": "one"})
    stranger = Parties(escrow_chain)
    for path in ("usage", "call-proofs", "cumulative-receipts"):
        response = stranger.buyer_api.get(f"/usage-agreements/{active.agreement_id}/{path}")
        assert response.status_code == 404 and error_code(response) == "agreement_not_found", (path, response.content)


def _at_once(*calls):
    """Run `calls` on threads of their own, released together; their answers in order."""
    barrier, answers = threading.Barrier(len(calls)), [None] * len(calls)

    def run(index, call):
        try:
            barrier.wait()
            answers[index] = call()
        finally:
            connection.close()

    threads = [threading.Thread(target=run, args=(index, call)) for index, call in enumerate(calls)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return answers


@pytest.mark.django_db(transaction=True)  # each report in its own request's transaction, side by side
def test_reports_at_once_charge_no_more_than_the_deposit_on_one_gap_free_chain(active_outside_transaction,
                                                                               escrow_chain):
    parties = active_outside_transaction  # 5 calls at 0.02 USDC
    url = f"/usage-agreements/{parties.agreement_id}/record-usage"

    def report(key, body):
        return lambda: parties.seller_api.as_(parties.seller_api.secret).post(url, body,
                                                                              headers={"Idempotency-Key": key})

    answers = _at_once(report("a", {"units": 2}), report("b", {"events": [{"units": 1}, {"units": 1}]}),
                       report("c", {"units": 2}), report("d", {"units": 2}))
    statuses = sorted(answer.status_code for answer in answers)
    assert statuses.count(201) == 2 and set(statuses) <= {201, 402}, [a.content for a in answers]
    agreement = UsageAgreement.objects.get(pk=parties.agreement_id)
    assert agreement.used == 80_000 and agreement.usage_seq == UsageEvent.objects.count()
    usage = parties.buyer_api.get(f"/usage-agreements/{parties.agreement_id}/usage").json()["results"]
    receipts.verify_usage(usage, agreement_id=agreement.onchain_id, chain_id=escrow_chain.chain_id,
                          escrow_address=escrow_chain.addresses["escrow"],
                          escrow=onchain_escrow(escrow_chain, agreement.onchain_id), price_per_unit=20_000,
                          pinned_receipt_signers=escrow_chain.accounts.receipt_signer.address)


@pytest.mark.django_db(transaction=True)
def test_a_report_racing_the_buyers_completion_is_either_in_the_proposal_or_refused(active_outside_transaction,
                                                                                    escrow_chain):
    parties = active_outside_transaction
    base = f"/usage-agreements/{parties.agreement_id}"
    seller, buyer = parties.seller_api.as_(parties.seller_api.secret), parties.buyer_api.as_(parties.buyer_api.secret)
    reported, completed = _at_once(
        lambda: seller.post(f"{base}/record-usage", {"units": 2}, headers={"Idempotency-Key": "race"}),
        lambda: buyer.post(f"{base}/complete", {}))
    assert completed.status_code == 200, completed.content
    assert (reported.status_code, error_code(reported) if reported.status_code != 201 else "") in (
        (201, ""), (409, "agreement_completing")), reported.content
    late = seller.post(f"{base}/record-usage", {"units": 1}, headers={"Idempotency-Key": "late"})
    assert late.status_code == 409 and error_code(late) == "agreement_completing", late.content

    tx = settlement.settlement_propose(agreement_id=parties.agreement_id, now=chain_clock.chain_now())
    used = 40_000 if reported.status_code == 201 else 0
    assert tx.context["cumulative"] == used == UsageAgreement.objects.get(pk=parties.agreement_id).used


@pytest.mark.parametrize("description", ["\u202eevil", "pay \u2066me\u2069", "\x1b[2Jcleared", "a\u200bb", "a\x7fb",
                                         "tag\U000e0041"])
def test_a_usage_description_shown_to_the_buyer_is_refused_with_control_or_invisible_format_characters(
        active, description):
    """A seller's usage description is shown to the buyer (`GET .../usage`) and to staff as written: a bidi override
    reads otherwise than it is, a terminal escape rewrites an operator's screen (marketplace.shown_text)."""
    url = f"/usage-agreements/{active.agreement_id}/record-usage"
    for number, (body, field) in enumerate((({"units": 1, "description": description}, "description"),
                                            ({"events": [{"units": 1}, {"units": 1, "description": description}]},
                                             "events.1.description"))):
        refused = active.seller_api.post(url, body, headers={"Idempotency-Key": f"shown-{number}"})
        assert refused.status_code == 400 and error_code(refused) == "unsafe_characters", refused.content
        assert refused.json()["error"]["details"]["fields"] == [field], refused.content
    assert not UsageEvent.objects.filter(agreement_id=active.agreement_id).exists()
    assert UsageAgreement.objects.get(pk=active.agreement_id).used == 0


def test_a_usage_description_keeps_its_lines_and_right_to_left_text(active):
    description = "\u200fسطر\nline\ttwo \U0001f469\u200d\U0001f4bb"
    response = active.seller_api.post(f"/usage-agreements/{active.agreement_id}/record-usage",
                                      {"units": 1, "description": description}, headers={"Idempotency-Key": "rtl"})
    assert response.status_code == 201, response.content
    [event] = active.buyer_api.get(f"/usage-agreements/{active.agreement_id}/usage").json()["results"]
    assert event["description"] == description


def test_a_completion_reason_shown_to_the_other_party_is_refused_with_invisible_format_characters(active):
    refused = active.seller_api.post(f"/usage-agreements/{active.agreement_id}/complete",
                                     {"reason": "done \u202e"})
    assert refused.status_code == 400 and error_code(refused) == "unsafe_characters", refused.content
    assert UsageAgreement.objects.get(pk=active.agreement_id).completion_requested_at is None



@pytest.mark.parametrize("description", ["the whole batch", ""])
def test_a_batchs_own_description_is_refused_not_dropped(active, description):
    """`description` beside `events` was taken and dropped: each event was recorded without it, the seller told
    201 (a body otherwise refuses any field it does not use, `unknown_field`)."""
    response = active.seller_api.post(f"/usage-agreements/{active.agreement_id}/record-usage",
                                      {"events": [{"units": 1}], "description": description},
                                      headers={"Idempotency-Key": "batch-description"})
    assert response.status_code == 400 and codes_at(response, "description") == {"events_carry_descriptions"}, \
        response.content
    assert not UsageEvent.objects.filter(agreement_id=active.agreement_id).exists()


def test_a_running_totals_description_is_kept_as_the_charges_description(active):
    """`description` beside `units_used` was checked (`unsafe_characters`) and then dropped: the seller told 201, the
    buyer shown "running total 3 units" for what the seller described. The published Pægents SDK sends none, and
    its charge keeps that default; a total already reported charges nothing and records no event."""
    url = f"/usage-agreements/{active.agreement_id}/record-usage"
    first = active.seller_api.post(url, {"units_used": 3, "description": "3 pages translated"})
    assert first.status_code == 201, first.content
    again = active.seller_api.post(url, {"units_used": 3, "description": "3 pages translated"})
    assert again.status_code == 201 and again.json()["events"] == [], again.content
    plain = active.seller_api.post(url, {"units_used": 4})
    assert plain.status_code == 201, plain.content
    listed = active.buyer_api.get(f"/usage-agreements/{active.agreement_id}/usage").json()["results"]
    assert [(event["units"], event["description"]) for event in listed] == [
        (3, "3 pages translated"), (1, "running total 4 units")]


def test_a_running_total_reads_no_usage_event_under_the_agreements_lock(active):
    """The seller's running total summed every usage event of the agreement (proxied calls' included, by its
    index on the agreement) while holding the agreement's row lock, which every charge of its calls waits for: the
    work grew with the agreement's history, report after report. The units reported so far are a counter of the
    agreement, written with each report's events; reports per event and running totals count in the same total."""
    url = f"/usage-agreements/{active.agreement_id}/record-usage"
    assert active.seller_api.post(url, {"units": 1}, headers={"Idempotency-Key": "one"}).status_code == 201
    with CaptureQueriesContext(connection) as queries:
        response = active.seller_api.post(url, {"units_used": 3})
    assert response.status_code == 201 and [event["units"] for event in response.json()["events"]] == [2]
    assert not [query["sql"] for query in queries if "SUM(" in query["sql"].upper()]
    assert active.seller_api.post(url, {"units_used": 3}).json()["events"] == []
    refused = active.seller_api.post(url, {"units_used": 2})
    assert refused.status_code == 409 and refused.json()["error"]["details"] == {"units_reported": 3}
    assert UsageAgreement.objects.get(pk=active.agreement_id).used == 3 * 20_000


def test_the_migration_counts_the_units_reported_before_it(active):
    """Agreements reported on before the counter have it filled from their seller reports (proxied calls aside)."""
    import importlib

    url = f"/usage-agreements/{active.agreement_id}/record-usage"
    assert active.seller_api.post(url, {"events": [{"units": 1}, {"units": 2}]},
                                  headers={"Idempotency-Key": "batch"}).status_code == 201
    UsageAgreement.objects.filter(pk=active.agreement_id).update(units_reported=0)
    with connection.cursor() as cursor:
        cursor.execute(importlib.import_module("agreements.migrations.0048_usage_agreement_units_reported").FILL)
    assert UsageAgreement.objects.get(pk=active.agreement_id).units_reported == 3
    assert active.seller_api.post(url, {"units_used": 4}).json()["events"][0]["units"] == 1
