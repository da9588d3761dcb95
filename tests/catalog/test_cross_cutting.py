from datetime import timedelta

import pytest
from django.core.management import call_command
from django.db.models import F

from catalog.models import Service
from marketplace import tasks
from marketplace.models import IdempotencyRecord
from tests.catalog.factories import AgentFactory, UserFactory, issue_key, issue_owner_token, service_data
from tests.conftest import Api, error_code

pytestmark = pytest.mark.django_db


def test_unknown_url_is_json_404(anon):
    response = anon.get("/no/such/thing")
    assert response.status_code == 404
    assert error_code(response) == "not_found"


def test_wrong_method_is_json_405(buyer_api):
    response = buyer_api.put("/catalog/search", {})
    assert response.status_code == 405
    assert error_code(response) == "method_not_allowed"


def test_request_id_is_echoed_when_well_formed(buyer_api):
    response = buyer_api.get("/agents/me", headers={"X-Request-Id": "abc-123"})
    assert response["X-Request-Id"] == "abc-123"
    response = buyer_api.get("/agents/me", headers={"X-Request-Id": "bad id with spaces"})
    assert response["X-Request-Id"].startswith("req_")


def test_idempotent_replay_conflict_and_scoping(seller_api):
    headers = {"Idempotency-Key": "reg-1"}
    first = seller_api.post("/agents/services", service_data(), headers=headers)
    assert first.status_code == 201
    replay = seller_api.post("/agents/services", service_data(), headers=headers)
    assert replay.status_code == 201
    assert replay.json() == first.json()
    assert replay["Idempotent-Replayed"] == "true"
    assert Service.objects.count() == 1

    other_body = seller_api.post("/agents/services", service_data(name="Other"), headers=headers)
    assert other_body.status_code == 422
    assert error_code(other_body) == "idempotency_key_reused"

    # Keys are scoped per agent: another seller may use the same key.
    other_seller = Api(issue_key(AgentFactory(is_seller=True)))
    assert other_seller.post("/agents/services", service_data(name="Theirs"), headers=headers).status_code == 201
    assert Service.objects.count() == 2


def test_failed_request_releases_the_idempotency_key(seller_api):
    headers = {"Idempotency-Key": "reg-2"}
    bad = seller_api.post("/agents/services", service_data(tags=[]), headers=headers)
    assert bad.status_code == 400
    good = seller_api.post("/agents/services", service_data(tags=[]), headers=headers)
    assert good.status_code == 400  # rerun, not replayed
    assert "Idempotent-Replayed" not in good


def test_over_long_idempotency_key(seller_api):
    response = seller_api.post("/agents/services", service_data(), headers={"Idempotency-Key": "k" * 256})
    assert response.status_code == 400 and error_code(response) == "invalid_idempotency_key"


@pytest.mark.parametrize("path", ["/agents/services", "/usage-agreements/00000000-0000-4000-8000-000000000000/record-usage"])
def test_an_idempotency_key_with_a_nul_character_is_400_not_500(seller_api, path):
    """PostgreSQL's text holds no NUL: the key's claim raised DataError, a 500, on the generic path and on the plain
    usage report's own."""
    body = service_data() if path == "/agents/services" else {"events": [{"units": 1}]}
    response = seller_api.post(path, body, headers={"Idempotency-Key": "key\x00one"})
    assert response.status_code == 400 and error_code(response) == "invalid_idempotency_key"
    assert not IdempotencyRecord.objects.exists()


@pytest.mark.slow
def test_openapi_schema_validates_without_warnings(tmp_path):
    call_command("spectacular", "--validate", "--fail-on-warn", "--file", str(tmp_path / "schema.yaml"))
    assert "/catalog/search" in (tmp_path / "schema.yaml").read_text()


def test_schema_and_docs_are_served(anon):
    assert anon.get("/api/schema/").status_code == 200
    assert anon.get("/api/docs/").status_code == 200


def test_seed_demo_is_idempotent(capsys):
    call_command("seed_demo")
    assert "Buyer key" in capsys.readouterr().out
    call_command("seed_demo")
    assert "already present" in capsys.readouterr().out
    assert Service.objects.count() == 3


def test_an_idempotency_key_replays_for_its_ttl_then_is_forgotten_and_its_record_purged(seller_api, settings):
    headers = {"Idempotency-Key": "reg-ttl"}
    assert seller_api.post("/agents/services", service_data(), headers=headers).status_code == 201
    IdempotencyRecord.objects.update(created_at=F("created_at") - settings.IDEMPOTENCY_KEY_TTL - timedelta(seconds=1))

    # Past its TTL the key is a new one: the request runs, and the key replays it from then on.
    other = service_data(name="Other", skills=[])
    again = seller_api.post("/agents/services", other, headers=headers)
    assert again.status_code == 201 and "Idempotent-Replayed" not in again
    assert seller_api.post("/agents/services", other, headers=headers)["Idempotent-Replayed"] == "true"

    # Records past their TTL are deleted by a beat task: unique keys do not grow the table for ever.
    seller_api.post("/agents/services", service_data(name="Third", skills=[]), headers={"Idempotency-Key": "reg-ttl-2"})
    IdempotencyRecord.objects.filter(key="reg-ttl-2").update(
        created_at=F("created_at") - settings.IDEMPOTENCY_KEY_TTL - timedelta(seconds=1))
    assert tasks.purge_expired_idempotency_records() == 1
    assert list(IdempotencyRecord.objects.values_list("key", flat=True)) == ["reg-ttl"]


def test_another_tenant_sending_the_same_idempotency_key_and_body_gets_its_own_answer(seller_api):
    """Keys are scoped per agent and per owner: a tenant who learns or guesses another's key (a client's "retry-1")
    and sends the very same request is answered afresh, never the other's stored answer (which may name its rows)."""
    headers = {"Idempotency-Key": "retry-1"}
    first = seller_api.post("/agents/services", service_data(), headers=headers)
    other = Api(issue_key(AgentFactory(is_seller=True))).post("/agents/services", service_data(), headers=headers)
    assert (first.status_code, other.status_code) == (201, 201)
    assert "Idempotent-Replayed" not in other
    assert other.json()["id"] != first.json()["id"]

    owners = [Api(issue_owner_token(UserFactory())) for _ in range(2)]
    tokens = [api.post("/owner-tokens", {"scope": "read", "name": "ci"}, headers=headers) for api in owners]
    assert [token.status_code for token in tokens] == [201, 201]
    assert "Idempotent-Replayed" not in tokens[1]
    assert tokens[1].json()["secret"] and tokens[1].json()["id"] != tokens[0].json()["id"]
