"""A batch of reported usage is read and answered without DRF's generic per-field walk (the CPU of a batch of 100):
the answer must stay exactly what DRF's fields would give, and input that is not plainly valid must still go
through the fields, which trim, refuse and name the error."""

import json
import time
import uuid
from types import SimpleNamespace

import orjson
import pytest
from django.core.cache import cache
from django.db import transaction
from django.utils import timezone
from rest_framework import serializers
from rest_framework.renderers import JSONRenderer

from agreements import selectors, views
from agreements.models import UsageAgreement, UsageEvent
from agreements.serializers import AgreementSerializer, RecordedUsageSerializer, UsageEventSerializer
from marketplace.serializers import FieldsBoundOnceSerializer
from catalog.models import ApiKey
from marketplace.idempotency import answer_once
from policies.models import ApprovalRequest
from tests.conftest import codes_at, error_code
from tests.escrow.flow import Parties

pytestmark = [pytest.mark.chain, pytest.mark.django_db]


@pytest.fixture
def active(escrow_chain, django_capture_on_commit_callbacks):
    """An active agreement with room for 50 units of usage."""
    parties = Parties(escrow_chain)
    agreement = parties.accepted_agreement(quantity=50)
    assert parties.activate(agreement["id"], django_capture_on_commit_callbacks).status_code == 202
    parties.agreement_id = agreement["id"]
    return parties


def _as_drf_renders(events) -> list[dict]:
    """The events as DRF's generic Serializer.to_representation renders UsageEventSerializer's declared fields."""
    signer = selectors.receipt_signer_of(UsageAgreement.objects.get(pk=events[0].agreement_id).receipt_signer)
    serializer = UsageEventSerializer(context={"receipt_signer": signer})  # as the views give it
    generic = [serializers.Serializer.to_representation(serializer, event) for event in events]
    return json.loads(JSONRenderer().render(generic))


def test_a_batch_is_answered_as_the_declared_fields_render_it(active):
    url = f"/usage-agreements/{active.agreement_id}/record-usage"
    entries = [{"units": 1, "description": "plain"}, {"units": 2}, {"units": 3, "description": "  padded  "},
               {"units": 1, "description": "café ☕"}, {"units": 2, "description": "tab\tinside"},
               {"units": 1, "description": ""}]
    recorded = active.seller_api.post(url, {"events": entries}, headers={"Idempotency-Key": "s1"})
    assert recorded.status_code == 201, recorded.content

    events = list(UsageEvent.objects.filter(agreement_id=active.agreement_id).order_by("seq"))
    assert recorded.json()["events"] == _as_drf_renders(events)
    # What the fields make of each entry: trimmed, kept as given otherwise, blank by default.
    assert [(e.units, e.description) for e in events] == [
        (1, "plain"), (2, ""), (3, "padded"), (1, "café ☕"), (2, "tab\tinside"), (1, "")]
    assert [bool(e.receipt_signature) for e in events] == [False] * 5 + [True]


def test_the_agreement_is_answered_as_drf_renders_its_declared_fields(active, monkeypatch):
    # Its fields are bound once per class instead of deep-copied per answer: the answer must not change, with and
    # without an approval, for the agreement and for the recorded-usage answer built on it.
    recorded = active.seller_api.post(f"/usage-agreements/{active.agreement_id}/record-usage",
                                      {"events": [{"units": 2}]}, headers={"Idempotency-Key": "a1"})
    assert recorded.status_code == 201, recorded.content
    agreement = selectors.agreement_get(agreement_id=active.agreement_id, agent=None)
    events = list(UsageEvent.objects.filter(agreement_id=active.agreement_id))
    approval = SimpleNamespace(pk=uuid.uuid4(), status="approved", expires_at=timezone.now())
    contexts = [{"approvals": {}, "events": events}, {"approvals": {agreement.pk: approval}, "events": events}]

    def answers():
        return [json.loads(JSONRenderer().render(serializer(agreement, context=context).data))
                for serializer in (AgreementSerializer, RecordedUsageSerializer) for context in contexts]

    ours = answers()
    monkeypatch.setattr(FieldsBoundOnceSerializer, "to_representation", serializers.Serializer.to_representation)
    assert ours == answers()
    assert recorded.json() == ours[2]  # the answer to the report is the agreement as it committed it
    assert ours[1]["approval"]["status"] == "approved" and ours[0]["approval"] is None


def test_a_batch_costs_the_same_few_statements_as_one_event(active, django_assert_num_queries):
    # The claim on the key, then in the request's transaction (a savepoint inside the test's): the claim locked (a
    # retry that finds it stale waits for this transaction instead of running the request again), the agreement
    # read under its row lock with its parties and the approval the answer names, one statement for the events and
    # the counters, the stored answer. No read after the write, no savepoint of its own. The key was read by the request
    # before, less than CREDENTIAL_CACHE_SECONDS ago (and its last_used_at written, once a minute). (The budget is
    # 50 units.)
    url = f"/usage-agreements/{active.agreement_id}/record-usage"
    for key, body in (("one", {"units": 1}), ("batch", {"events": [{"units": 1}] * 40})):
        active.seller_api.post(url, {"units": 1}, headers={"Idempotency-Key": f"warm-{key}"})
        with django_assert_num_queries(7):
            assert active.seller_api.post(url, body, headers={"Idempotency-Key": key}).status_code == 201


@pytest.mark.parametrize(("entry", "field", "code"), [
    ({"units": "1"}, "units", "invalid"),
    ({"units": 1.0}, "units", "invalid"),
    ({"units": True}, "units", "invalid"),
    ({"units": 0}, "units", "min_value"),
    ({"units": 10**12 + 1}, "units", "max_value"),
    ({"units": 1, "description": "x" * 501}, "description", "max_length"),
    ({"units": 1, "description": "nul\x00"}, "description", "null_characters_not_allowed"),
    ({"units": 1, "description": None}, "description", "null"),
    ({"units": 1, "colour": "red"}, "colour", "unknown_field"),
    ({"description": "no units"}, "units", "required"),
])
def test_an_entry_that_is_not_plainly_valid_gets_the_fields_error(active, entry, field, code):
    url = f"/usage-agreements/{active.agreement_id}/record-usage"
    response = active.seller_api.post(url, {"events": [{"units": 1}, entry]}, headers={"Idempotency-Key": "bad"})

    assert codes_at(response, "events", 1, field) == {code}
    assert not UsageEvent.objects.filter(agreement_id=active.agreement_id).exists()


def test_the_events_of_a_batch_are_built_by_from_db_when_something_listens_to_their_init(active):
    # Without a receiver the recorded events are built without Model.__init__ (the answer above holds them to the
    # rows); with one, they are built by from_db, so the receiver sees each of them.
    from django.db.models.signals import post_init

    seen = []

    def receiver(sender, instance, **kwargs):
        seen.append(instance)

    post_init.connect(receiver, sender=UsageEvent)
    try:
        recorded = active.seller_api.post(f"/usage-agreements/{active.agreement_id}/record-usage",
                                          {"events": [{"units": 1}, {"units": 2, "description": "two"}]},
                                          headers={"Idempotency-Key": "init"})
    finally:
        post_init.disconnect(receiver, sender=UsageEvent)
    assert recorded.status_code == 201, recorded.content
    events = list(UsageEvent.objects.filter(agreement_id=active.agreement_id).order_by("seq"))
    assert [(event.seq, event.units, event.description) for event in seen[:2]] == [(1, 1, ""), (2, 2, "two")]
    assert recorded.json()["events"] == _as_drf_renders(events)


@pytest.mark.parametrize("body", [
    {"events": [{"units": 1}]},
    {"events": [{"units": index % 3 + 1, "description": "bench"} for index in range(100)]},
    {"events": [{"units": 10**12, "description": "x" * 500}, {"units": 2, "description": ""}]},
    {"units": 7},
    {"units": 7, "description": "one"},
    # Not plainly valid: the fields decide, and name the error.
    {"events": []},
    {"events": [{"units": 1}] * 101},
    {"events": [{"units": 1}, {"units": 0}]},
    {"events": [{"units": 1, "description": " padded "}]},
    {"events": {"units": 1}},
    {"events": [{"units": 1}], "units": 1},
    {"events": [{"units": 1}], "completed": False},
    {"units": 1, "completed": True},
    {"units": "1"},
    {"units": 1, "description": "café"},
    {"units_used": 5},
])
def test_a_report_validates_as_its_fields_and_validate_do(body, monkeypatch):
    # Plainly valid reports skip binding and walking the fields: the outcome must be what the fields give.
    from agreements.serializers import RecordUsageSerializer

    def outcome():
        report = RecordUsageSerializer(data=body)
        return (report.is_valid(), dict(report.validated_data) if not report.errors else report.errors,
                report.is_running_total if not report.errors else None)

    ours = outcome()
    monkeypatch.setattr(RecordUsageSerializer, "run_validation", serializers.Serializer.run_validation)
    assert ours == outcome()


def test_a_stored_answer_is_encoded_once_and_replayed_as_sent(active, monkeypatch):
    # The answer is encoded to JSON once, for storing and for sending; a replay sends the stored answer.
    encodings = []
    encode = orjson.dumps  # the API's renderer's encoder (marketplace.renderers)

    def counted(value, **options):
        content = encode(value, **options)
        encodings.append(content.decode())
        return content

    monkeypatch.setattr(orjson, "dumps", counted)
    url, body = f"/usage-agreements/{active.agreement_id}/record-usage", {
        "events": [{"units": 1, "description": "café ☕"}, {"units": 2}]}
    first = active.seller_api.post(url, body, headers={"Idempotency-Key": "once"})
    assert first.status_code == 201, first.content
    answers = [text for text in encodings if '"receipt_signer"' in text]  # not the request, not the insert
    assert answers == [first.content.decode()]

    replay = active.seller_api.post(url, body, headers={"Idempotency-Key": "once"})
    assert replay.status_code == 201 and replay["Idempotent-Replayed"] == "true"
    assert replay.json() == first.json()  # the same JSON (jsonb keeps no key order)
    assert UsageEvent.objects.filter(agreement_id=active.agreement_id).count() == 2


# A plain report (an agent key, an Idempotency-Key, plainly valid entries in a JSON body) is served by
# RecordUsageView.dispatch without DRF's request wrapping; anything else by DRF's dispatch. Both answer alike.

def _served_by_drf(monkeypatch):
    monkeypatch.setattr(views, "_plain_report", lambda request: None)


def _answer_without_rollback(api, url, body, headers) -> tuple:
    """The answer to a request whose effects are then rolled back: status, headers and body, the events' ids (not
    reused, so their length too) and the times left out."""
    try:
        with transaction.atomic():
            response = api.post(url, body, headers={"X-Request-Id": "req_same", **headers})
            raise _RolledBack(response)
    except _RolledBack as rolled_back:
        response = rolled_back.response
    answer = json.loads(response.content)
    for event in answer.get("events", []):
        event["id"] = event["created_at"] = None
    for name in ("updated_at", "created_at"):
        answer.pop(name, None)
    return response.status_code, sorted(item for item in response.items() if item[0] != "Content-Length"), answer


class _RolledBack(Exception):
    def __init__(self, response):
        self.response = response


@pytest.mark.parametrize(("api", "body", "code"), [
    ("seller_api", {"events": [{"units": index % 3 + 1, "description": "bench"} for index in range(10)]}, None),
    ("seller_api", {"units": 2, "description": "one"}, None),
    ("seller_api", {"events": [{"units": 30}, {"units": 30}]}, "budget_exhausted"),
    ("buyer_api", {"units": 1}, "seller_only"),
    ("seller_api", "unknown agreement", "agreement_not_found"),
])
def test_a_plain_report_is_answered_as_drf_answers_it(active, monkeypatch, api, body, code):
    url = f"/usage-agreements/{active.agreement_id}/record-usage"
    if body == "unknown agreement":
        url, body = f"/usage-agreements/{uuid.uuid4()}/record-usage", {"units": 1}
    served = []
    monkeypatch.setattr(views, "answer_once", lambda *args, **kwargs: (served.append(1), answer_once(*args, **kwargs))[1])
    ours = _answer_without_rollback(getattr(active, api), url, body, {"Idempotency-Key": "same"})
    assert served == [1]  # by dispatch
    _served_by_drf(monkeypatch)
    assert ours == _answer_without_rollback(getattr(active, api), url, body, {"Idempotency-Key": "same"})
    assert ours[0] == 201 if code is None else ours[2]["error"]["code"] == code


@pytest.mark.parametrize("plain", [True, False])
def test_a_report_answers_the_approval_its_agreement_was_given(active, monkeypatch, plain):
    # The approval request is read with the agreement, in the report's one read: the answer names it as the
    # agreement's own answer does.
    approval = ApprovalRequest.objects.create(
        agent_id=active.buyer.pk, subject_type="usage_agreement", subject_id=active.agreement_id, amount=10,
        rule="above_amount", status="approved", expires_at=timezone.now())
    if not plain:
        _served_by_drf(monkeypatch)
    recorded = active.seller_api.post(f"/usage-agreements/{active.agreement_id}/record-usage", {"units": 1},
                                      headers={"Idempotency-Key": "p1"})

    assert recorded.status_code == 201, recorded.content
    shown = active.seller_api.get(f"/usage-agreements/{active.agreement_id}").json()["approval"]
    assert recorded.json()["approval"] == shown and shown["id"] == str(approval.pk) and shown["status"] == "approved"


def test_a_plain_report_is_replayed_and_its_key_held_to_its_body(active):
    url = f"/usage-agreements/{active.agreement_id}/record-usage"
    body = {"events": [{"units": 1}, {"units": 2}]}
    first = active.seller_api.post(url, body, headers={"Idempotency-Key": "r1"})
    again = active.seller_api.post(url, body, headers={"Idempotency-Key": "r1"})
    other = active.seller_api.post(url, {"units": 1}, headers={"Idempotency-Key": "r1"})

    assert first.status_code == again.status_code == 201
    assert again["Idempotent-Replayed"] == "true" and again.json() == first.json()
    assert other.status_code == 422 and error_code(other) == "idempotency_key_reused"
    assert UsageEvent.objects.filter(agreement_id=active.agreement_id).count() == 2


def test_a_plain_report_counts_against_the_keys_rate_limits(active, settings):
    settings.REST_FRAMEWORK = {**settings.REST_FRAMEWORK, "DEFAULT_THROTTLE_RATES": {
        **settings.REST_FRAMEWORK["DEFAULT_THROTTLE_RATES"], "payments": "1/day"}}
    cache.clear()
    url = f"/usage-agreements/{active.agreement_id}/record-usage"
    assert active.seller_api.post(url, {"units": 1}, headers={"Idempotency-Key": "t1"}).status_code == 201
    refused = active.seller_api.post(url, {"units": 1}, headers={"Idempotency-Key": "t2"})
    assert refused.status_code == 429 and error_code(refused) == "rate_limited" and int(refused["Retry-After"]) > 0
    assert UsageEvent.objects.filter(agreement_id=active.agreement_id).count() == 1
    cache.clear()


def test_a_revoked_key_reports_no_more_usage_within_a_second(active, settings):
    url = f"/usage-agreements/{active.agreement_id}/record-usage"
    assert active.seller_api.post(url, {"units": 1}, headers={"Idempotency-Key": "v1"}).status_code == 201
    ApiKey.objects.filter(prefix=active.seller_api.secret.split("_")[1]).update(revoked_at=timezone.now())
    time.sleep(settings.CREDENTIAL_CACHE_SECONDS + 0.1)
    refused = active.seller_api.post(url, {"units": 1}, headers={"Idempotency-Key": "v2"})
    assert refused.status_code == 401 and error_code(refused) == "credentials_revoked"
    assert UsageEvent.objects.filter(agreement_id=active.agreement_id).count() == 1


@pytest.mark.parametrize("body", [{"units": 1}, {"events": [{"units": 1}] * 12}, {"units_used": 3}])
def test_a_report_with_the_longest_request_id_is_recorded_not_500(active, body):
    # 128 characters is a well-formed X-Request-Id (kept as the request's id); each event's id adds ":<index>".
    request_id = "r" * 128
    recorded = active.seller_api.post(f"/usage-agreements/{active.agreement_id}/record-usage", body,
                                      headers={"Idempotency-Key": "long-id", "X-Request-Id": request_id})
    assert recorded.status_code == 201, recorded.content
    events = list(UsageEvent.objects.filter(agreement_id=active.agreement_id).order_by("seq"))
    assert events and len({event.request_id for event in events}) == len(events)
    assert all(len(event.request_id) <= 128 and event.request_id.startswith("r" * 100) for event in events)
