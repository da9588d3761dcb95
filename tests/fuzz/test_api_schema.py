"""Schema-driven fuzzing: schemathesis against our own OpenAPI description, on a live server with PostgreSQL.

One schemathesis run per principal (buyer agent, seller agent, owner), concurrently, against the same live server
and data: agreements in several states (one active on the test chain, with usage), a service, an approval
request, a webhook subscription and API keys. Path parameters are drawn from those real ids most of the time
(random ones the rest), so the fuzzer reaches the code behind the 404. Checks: no 5xx, and every status code,
content type, header and body is the documented one. Stateful sequences follow the links schemathesis infers.

Bounded for CI (FUZZ_MAX_EXAMPLES per operation, a fixed FUZZ_SEED); FUZZ_COVERAGE=1 adds schemathesis' coverage
phase for a full run. Each principal's report is written next to its schemathesis.toml (pytest's tmp_path).
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from escrow import relayer
from tests.catalog.factories import issue_owner_token
from tests.conftest import Api
from tests.escrow.flow import Parties

pytestmark = [pytest.mark.fuzz, pytest.mark.chain, pytest.mark.postgres, pytest.mark.django_db(transaction=True)]

MAX_EXAMPLES = int(os.environ.get("FUZZ_MAX_EXAMPLES", "8"))
SEED = os.environ.get("FUZZ_SEED", "7")
# The coverage phase (boundary values of every parameter) takes ~5 minutes here: on for a full run only.
COVERAGE = os.environ.get("FUZZ_COVERAGE", "") == "1"
CHECKS = ["not_a_server_error", "status_code_conformance", "content_type_conformance",
          "response_headers_conformance", "response_schema_conformance"]
ST = Path(sys.executable).with_name("st")


def _toml_list(values) -> str:
    return "[" + ", ".join(json.dumps(str(v)) for v in values) + "]"


def schemathesis_config(ids: dict[str, list]) -> str:
    """A schemathesis.toml drawing each path parameter from the real ids most of the time."""
    lines = [f"seed = {SEED}", "workers = 1", "[generation]", f"max-examples = {MAX_EXAMPLES}",
             "[phases.coverage]", f"enabled = {str(COVERAGE).lower()}", "[checks]", "enabled = false"]
    lines += [f"{check}.enabled = true" for check in CHECKS]
    for name, values in ids.items():
        lines += [f"[dictionaries.{name}]", f"values = {_toml_list(values)}"]
    lines.append("[parameters]")
    lines += [f'"path.{name}" = {{ dictionary = "{name}", probability = 0.8 }}' for name in ids]
    return "\n".join(lines) + "\n"


@pytest.fixture
def marketplace_data(escrow_chain, http_server, settings):
    """Principals and objects for the fuzzer to find; returns (secrets by role, ids by path parameter)."""
    settings.WEBHOOK_TIMEOUT_SECONDS = 0.5  # fuzzed webhook URLs point nowhere; do not wait on them
    parties = Parties(escrow_chain, upstream_base_url=http_server.url)
    owner = parties.buyer.owner
    owner_api = Api(issue_owner_token(owner))
    active = parties.accepted_agreement()
    response = parties.buyer_api.post(f"/usage-agreements/{active['id']}/activate-escrow",
                                      parties.signed_activation(active["id"]))
    assert response.status_code == 202, response.content
    relayer.transactions_poll()
    call = parties.buyer_api.client.get(f"/metered-proxy/{active['id']}/work")
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
    webhook = parties.seller_api.post("/webhooks", {"url": "http://127.0.0.1:9/hook"}).json()
    keys = [item["id"] for item in owner_api.get(f"/agents/{parties.buyer.pk}/api-keys").json()]
    secrets = {"buyer": parties.buyer_api.secret, "seller": parties.seller_api.secret, "owner": owner_api.secret}
    ids = {
        "agreement_id": [active["id"], accepted["id"], proposed["id"], pending["id"]],
        "agent_id": [parties.buyer.pk, parties.seller.pk],
        "service_id": [parties.service.pk],
        "request_id": [approval["id"] for approval in approvals],
        "subscription_id": [webhook["id"]],
        "key_id": keys,
    }
    return secrets, ids


def test_api_matches_its_schema_for_every_principal(marketplace_data, live_server, tmp_path):
    secrets, ids = marketplace_data
    config = tmp_path / "schemathesis.toml"
    config.write_text(schemathesis_config(ids))
    schema_url = f"{live_server.url}/api/schema/?format=json"
    runs = {}
    for role, secret in secrets.items():
        command = [str(ST), "--config-file", str(config), "run", schema_url, "--url", live_server.url,
                   "-H", f"Authorization: Bearer {secret}", "--warnings", "off", "--no-color"]
        runs[role] = subprocess.Popen(command, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                      text=True)
    failed = {}
    for role, process in runs.items():
        output, _ = process.communicate(timeout=600)
        (tmp_path / f"schemathesis-{role}.txt").write_text(output)
        if process.returncode != 0:
            failed[role] = output[output.find("FAILURES"):]
    assert not failed, "\n\n".join(f"===== as {role} =====\n{output}" for role, output in failed.items())
