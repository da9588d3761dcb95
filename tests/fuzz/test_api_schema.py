"""Schema-driven fuzzing: schemathesis against our own OpenAPI description, on a live server with PostgreSQL.

One schemathesis run per principal (buyer agent, seller agent, owner), concurrently, against the same live server
and data: agreements in several states (one active on the test chain, with usage), a service, an approval
request, a webhook subscription and API keys. Path parameters are drawn from those real ids most of the time
(random ones the rest), so the fuzzer reaches the code behind the 404. Checks: no 5xx, and every status code,
content type, header and body is the documented one.

Stateful phase: scenarios chain calls along the schema's own OpenAPI links (marketplace.openapi.LINKS; the links
schemathesis would infer are off: most start at operations random input never gets a 2xx from, which is why
none of them was ever followed). Each starts from a well-formed call (positive generation) to a listing. Every
link must be followed at least once by one of the three principals.

After the run the money must still add up: `reconcile` finds the database and the chain in agreement, and every
agreement's books balance (nothing reserved, used = the sum of its gap-free usage events).

Bounded for CI (FUZZ_MAX_EXAMPLES per operation, FUZZ_SCENARIOS stateful scenarios, a fixed FUZZ_SEED); each
run's time limit grows with those counts. FUZZ_COVERAGE=1 adds schemathesis' coverage phase. `make fuzz-wide`
runs long, seeded runs. Each principal's output and event log are written next to its schemathesis.toml
(pytest's tmp_path).
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from django.core.management import call_command
from django.db.models import Sum
from drf_spectacular.generators import SchemaGenerator

from agreements.models import UsageAgreement, UsageEvent
from agreements.tasks import deliver_webhook
from catalog.models import ApiKey, OwnerToken
from tests.catalog.factories import issue_owner_token, register_service
from tests.conftest import Api
from tests.escrow.flow import Parties, poll_mined

pytestmark = [pytest.mark.slow, pytest.mark.fuzz, pytest.mark.chain, pytest.mark.postgres,
              pytest.mark.django_db(transaction=True)]

MAX_EXAMPLES = int(os.environ.get("FUZZ_MAX_EXAMPLES", "2"))
SCENARIOS = int(os.environ.get("FUZZ_SCENARIOS", "50"))
SEED = os.environ.get("FUZZ_SEED", "7")
# The coverage phase (boundary values of every parameter) takes ~5 minutes here: on for a full run only.
COVERAGE = os.environ.get("FUZZ_COVERAGE", "") == "1"
# Measured on 2 cores shared with other jobs: ~15 s per example (of every operation), ~1.5 s per scenario; with
# room to spare, plus start-up and the coverage phase.
TIME_LIMIT = 120 + 20 * MAX_EXAMPLES + 3 * SCENARIOS + (900 if COVERAGE else 0)
CHECKS = ["not_a_server_error", "status_code_conformance", "content_type_conformance",
          "response_headers_conformance", "response_schema_conformance"]
ST = Path(sys.executable).with_name("st")
REPO = Path(__file__).resolve().parents[2]


def _toml_list(values) -> str:
    return "[" + ", ".join(json.dumps(str(v)) for v in values) + "]"


def schemathesis_config(ids: dict[str, list], *, not_stateful: list[str]) -> str:
    """A schemathesis.toml drawing each path parameter from the real ids most of the time; the operations in
    `not_stateful` (the principal may not call them) start and end no stateful scenario."""
    lines = [f"seed = {SEED}", "workers = 1", "[generation]", f"max-examples = {MAX_EXAMPLES}",
             "[phases.coverage]", f"enabled = {str(COVERAGE).lower()}",
             "[phases.stateful]", "max-steps = 10",
             "[phases.stateful.generation]", f"max-examples = {SCENARIOS}", 'mode = "positive"',
             "[phases.stateful.inference]", "algorithms = []",
             "[checks]", "enabled = false"]
    lines += [f"{check}.enabled = true" for check in CHECKS]
    for name, values in ids.items():
        lines += [f"[dictionaries.{name}]", f"values = {_toml_list(values)}"]
    lines.append("[parameters]")
    lines += [f'"path.{name}" = {{ dictionary = "{name}", probability = 0.8 }}' for name in ids]
    if not_stateful:
        lines += ["[[operations]]", f"include-operation-id = {_toml_list(not_stateful)}",
                  "phases.stateful.enabled = false"]
    return "\n".join(lines) + "\n"


def _operations():
    document = SchemaGenerator().get_schema(request=None, public=True)
    for path, item in document["paths"].items():
        for method, operation in item.items():
            yield f"{method.upper()} {path}", operation


def operations_by_credential() -> dict[str, list[str]]:
    """Operation ids an owner token alone may call ("owner"), and the rest ("agent")."""
    split = {"owner": [], "agent": []}
    for _, operation in _operations():
        owner_only = operation.get("security") == [{"OwnerToken": []}]
        split["owner" if owner_only else "agent"].append(operation["operationId"])
    return split


def schema_links() -> set[tuple[str, str]]:
    """(source operation, link name) of every link the schema publishes."""
    return {(label, name) for label, operation in _operations()
            for response in operation["responses"].values() for name in response.get("links", {})}


@pytest.fixture
def marketplace_data(escrow_chain, http_server, settings, monkeypatch):
    """Principals and objects for the fuzzer to find; returns (secrets by role, ids by path parameter)."""
    # Deliveries stay pending, as if queued for the outbound workers: with the test's eager Celery the live server
    # sent them inside the request that made the event, to every subscription the fuzzer had created (URLs that
    # accept and never answer among them, 0.5 s each), and a cancel or a webhook test outlasted the fuzzer's 10 s.
    monkeypatch.setattr(deliver_webhook, "apply_async", lambda *args, **kwargs: None)
    # Each principal's run is one key: long runs must not meet the per-key API limit (tests/marketplace tests it).
    settings.REST_FRAMEWORK = {**settings.REST_FRAMEWORK, "DEFAULT_THROTTLE_RATES": {
        **settings.REST_FRAMEWORK["DEFAULT_THROTTLE_RATES"], "api": "1000000/min"}}
    parties = Parties(escrow_chain, upstream_base_url=http_server.url)
    owner = parties.buyer.owner
    owner_api = Api(issue_owner_token(owner))
    active = parties.accepted_agreement()
    response = parties.buyer_api.post(f"/usage-agreements/{active['id']}/activate-escrow",
                                      parties.signed_activation(active["id"]))
    assert response.status_code == 202, response.content
    poll_mined()
    call = parties.buyer_api.get(f"/metered-proxy/{active['id']}/work")
    assert call.status_code == 200
    accepted = parties.accepted_agreement()
    proposed = parties.buyer_api.post("/usage-agreements", {
        "service_id": str(parties.service.pk), "quantity": 3, "expires_at": active["expires_at"]}).json()
    policy = owner_api.put(f"/agents/{parties.buyer.pk}/policies", {"approval_threshold_atomic": 1})
    assert policy.status_code == 200, policy.content
    pending = parties.buyer_api.post("/usage-agreements", {
        "service_id": str(parties.service.pk), "quantity": 2, "expires_at": active["expires_at"]}).json()
    assert pending["status"] == "pending_approval", pending
    approvals = owner_api.get(f"/agents/{parties.buyer.pk}/approvals").json()["results"]
    # Several, so links from the listings still find one after the fuzzer deleted some.
    for _ in range(12):
        register_service(parties.seller, upstream_base_url=http_server.url, skills=[])
    webhooks = [parties.seller_api.post("/webhooks", {"url": f"http://127.0.0.1:9/hook{n}"}).json()
                for n in range(12)]
    # The owner fuzzes revocation on a spare key, newer than the buyer's (listings put it first): revoking the
    # key the buyer's run uses would leave that run a series of 401s.
    spare = owner_api.post(f"/agents/{parties.buyer.pk}/api-keys", {"name": "spare"})
    assert spare.status_code == 201, spare.content
    # Likewise a spare owner token: the owner's run revoking its own token ran on as 401s (a token may revoke itself).
    spare_token = owner_api.post("/owner-tokens", {"name": "spare"})
    assert spare_token.status_code == 201, spare_token.content
    secrets = {"buyer": parties.buyer_api.secret, "seller": parties.seller_api.secret, "owner": owner_api.secret}
    ids = {
        "agreement_id": [active["id"], accepted["id"], proposed["id"], pending["id"]],
        "agent_id": [parties.buyer.pk, parties.seller.pk],
        "service_id": [parties.service.pk],
        "request_id": [approval["id"] for approval in approvals],
        "subscription_id": [webhooks[0]["id"]],
        "key_id": [spare.json()["id"]],
        "token_id": [spare_token.json()["id"]],
    }
    return secrets, ids


def test_api_matches_its_schema_for_every_principal(marketplace_data, live_server, tmp_path, monkeypatch):
    secrets, ids = marketplace_data
    # The owner's run revokes the spare key only (tests/fuzz/st_hooks.py): a random key id is never the buyer's.
    monkeypatch.setenv("FUZZ_SPARE_KEY_ID", str(ids["key_id"][0]))
    monkeypatch.setenv("FUZZ_KEPT_KEY_IDS", ",".join(
        str(pk) for pk in ApiKey.objects.exclude(pk__in=ids["key_id"]).values_list("pk", flat=True)))
    monkeypatch.setenv("FUZZ_SPARE_TOKEN_ID", str(ids["token_id"][0]))
    monkeypatch.setenv("FUZZ_KEPT_TOKEN_IDS", ",".join(
        str(pk) for pk in OwnerToken.objects.exclude(pk__in=ids["token_id"]).values_list("pk", flat=True)))
    operations = operations_by_credential()
    schema_url = f"{live_server.url}/api/schema/?format=json"
    configs = {}
    for role in secrets:
        configs[role] = tmp_path / f"schemathesis-{role}.toml"
        configs[role].write_text(schemathesis_config(ids, not_stateful=operations["agent" if role == "owner"
                                                                                   else "owner"]))
    run_schemathesis(secrets, configs, schema_url=schema_url, server_url=live_server.url, tmp_path=tmp_path,
                     name="run")
    followed = set().union(*(links_followed(tmp_path / f"events-run-{role}.ndjson") for role in secrets))

    # A stateful scenario picks its next link at random among the source's (agreements_list has 18), and the
    # server's answers steer it, so a fixed budget now and then misses one: then one more stateful run, reseeded,
    # on the missed links' operations alone, by the principals who may call them.
    missed = schema_links() - followed
    if missed:
        operation_ids = {label: operation["operationId"] for label, operation in _operations()}
        involved = {operation_ids[source] for source, _ in missed} | {target for _, target in missed}
        callers = {role: secret for role, secret in secrets.items()
                   if involved & set(operations["owner" if role == "owner" else "agent"])}
        run_schemathesis(callers, configs, schema_url=schema_url, server_url=live_server.url, tmp_path=tmp_path,
                         name="rerun", options=["--phases", "stateful", "--seed", str(int(SEED) + 1),
                                                *(f"--include-operation-id={op}" for op in sorted(involved))])
        followed |= set().union(*(links_followed(tmp_path / f"events-rerun-{role}.ndjson") for role in callers))
    assert schema_links() - followed == set(), "links no principal followed"
    assert_money_adds_up()
    # The owner's run revokes keys: a spare one, never a key another run calls with (each would then have been
    # answered 401, which is documented, so nothing else would tell).
    for role in ("buyer", "seller"):
        assert Api(secrets[role]).get("/agents/me").status_code == 200, f"the {role}'s key was revoked"
    assert Api(secrets["owner"]).get("/owner-tokens").status_code == 200, "the owner's token was revoked"


def run_schemathesis(secrets: dict[str, str], configs: dict[str, Path], *, schema_url: str, server_url: str,
                     tmp_path: Path, name: str, options: list[str] = ()) -> None:
    """One schemathesis process per principal, side by side; fails with their reports on any failed check."""
    runs = {}
    for role, secret in secrets.items():
        command = [str(ST), "--config-file", str(configs[role]), "run", schema_url, "--url", server_url,
                   "-H", f"Authorization: Bearer {secret}", "--warnings", "off", "--no-color", *options,
                   "--report", "ndjson", "--report-ndjson-path", str(tmp_path / f"events-{name}-{role}.ndjson")]
        runs[role] = subprocess.Popen(command, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                      text=True, env={**os.environ, "SCHEMATHESIS_HOOKS": "tests.fuzz.st_hooks",
                                                      "PYTHONPATH": str(REPO)})
    failed = {}
    for role, process in runs.items():
        output, _ = process.communicate(timeout=TIME_LIMIT)
        (tmp_path / f"schemathesis-{name}-{role}.txt").write_text(output)
        if process.returncode != 0:
            # Its failures, or (a crash, a network error, the time limit) the end of what it printed.
            failed[role] = output[output.find("FAILURES"):] if "FAILURES" in output else output[-4000:]
    assert not failed, "\n\n".join(f"===== {name} as {role} =====\n{output}" for role, output in failed.items())


def links_followed(events: Path) -> set[tuple[str, str]]:
    """(source operation, link name) of every link a stateful step followed, from a run's event log."""
    followed = set()
    for line in events.read_text().splitlines():
        scenario = json.loads(line).get("ScenarioFinished") or {}
        for case in scenario.get("recorder", {}).get("cases", {}).values():
            transition = case.get("transition")
            if transition and case.get("is_transition_applied"):
                # "<source> -> [<status>] <link name> -> <target>"
                source, rest = transition["id"].split(" -> [", 1)
                followed.add((source, rest.split("] ", 1)[1].split(" -> ", 1)[0]))
    return followed


def assert_money_adds_up() -> None:
    poll_mined()  # confirm what the run queued
    call_command("reconcile")  # raises CommandError on any difference between the database and the chain
    for agreement in UsageAgreement.objects.all():
        events = UsageEvent.objects.filter(agreement=agreement).order_by("seq")
        assert agreement.reserved == 0, agreement.pk
        assert agreement.used == (events.aggregate(total=Sum("cost"))["total"] or 0), agreement.pk
        assert [event.seq for event in events] == list(range(1, events.count() + 1)), agreement.pk
