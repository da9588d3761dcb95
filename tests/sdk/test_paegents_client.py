"""The published Pægents SDK (PyPI `paegents` 2.9.1), unmodified, against the live test server.

It needs x402<0.3 while the project pins x402>=2.20, so it lives in its own virtual environment (var/, built once
and reused) and runs in a subprocess (tests/support/paegents_driver.py) that prints the SDK's answers as JSON.
"""

import json
import subprocess
import time
from pathlib import Path

import pytest

from agreements.models import UsageAgreement, UsageEvent
from catalog.models import Agent
from sdk import MarketplaceClient
from tests.catalog.factories import AgentFactory, issue_key, issue_owner_token
from tests.conftest import wire_marketplace
from tests.escrow.flow import USDC, fund, network_of, usdc_balance
from tests.sdk.test_client import relayer_polling
from tests.support.compat_venv import venv_python

REPO_ROOT = Path(__file__).resolve().parents[2]
VENV = REPO_ROOT / "var" / "paegents-venv"
DRIVER = REPO_ROOT / "tests" / "support" / "paegents_driver.py"
PAEGENTS = "paegents==2.9.1"

pytestmark = [pytest.mark.slow, pytest.mark.django_db(transaction=True)]


@pytest.fixture(scope="session")
def paegents_python() -> Path:
    """The python of a virtual environment holding the pinned paegents SDK (built on first use, then cached)."""
    return venv_python(VENV, [PAEGENTS])


class Paegents:
    """Runs SDK calls as named agents in one driver process: `call(name, op, **args)` returns the SDK's answer."""

    def __init__(self, python: Path, api_url: str):
        self.api_url, self.agents = api_url, {}
        self.process = subprocess.Popen([str(python), str(DRIVER)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                        text=True)

    def close(self) -> None:
        self.process.stdin.close()
        self.process.wait(timeout=30)

    def agent(self, name: str, agent: Agent, key: str) -> None:
        self.agents[name] = {"id": str(agent.pk), "key": key}

    def run(self, *calls: tuple) -> list[dict]:
        request = {"api_url": self.api_url, "agents": self.agents,
                   "calls": [{"as": name, "op": op, "args": args} for name, op, args in calls]}
        self.process.stdin.write(json.dumps(request) + "\n")
        self.process.stdin.flush()
        answer = self.process.stdout.readline()
        assert answer, "the paegents driver died (see its stderr above)"
        return json.loads(answer)

    def call(self, name: str, op: str, **args):
        [result] = self.run((name, op, args))
        assert "ok" in result, result["error"]
        return result["ok"]

    def error(self, name: str, op: str, **args) -> dict:
        [result] = self.run((name, op, args))
        assert "error" in result, result["ok"]
        return result["error"]


@pytest.fixture
def paegents(paegents_python, live_server):
    driver = Paegents(paegents_python, live_server.url)
    yield driver
    driver.close()


def error_code(error: dict) -> str:
    return error["body"]["error"]["code"]


SERVICE = {
    "service_name": "Fast translator", "description": "Translates short texts between forty languages.",
    "category": "translation", "price_model": "per_unit", "base_price_cents": 2, "unit": "call",
    "min_quantity": 1, "max_quantity": 1000, "capabilities": {"languages": 40}, "metadata": {"tier": "gold"},
}


@pytest.mark.chain
def test_catalog_agreements_metered_calls_and_usage(paegents, live_server, escrow_chain, http_server):
    chain = escrow_chain
    buyer_wallet = chain.accounts.buyer
    fund(chain, buyer_wallet.address, 10 * USDC)
    buyer = AgentFactory(is_buyer=True, is_seller=False, wallet_address=buyer_wallet.address)
    seller = AgentFactory(is_buyer=False, is_seller=True, wallet_address=chain.accounts.seller.address)
    buyer_key = issue_key(buyer)
    paegents.agent("buyer", buyer, buyer_key)
    paegents.agent("seller", seller, issue_key(seller))

    # Catalog: register, read, update (PUT), list, search.
    service = paegents.call("seller", "register_service", **SERVICE, api_base_url=http_server.url)
    assert (service["agent_id"], service["base_price_cents"], service["unit"]) == (str(seller.pk), 2, "call")
    assert service["capabilities"] == {"languages": 40} and service["category"] == "translation"
    service_id = service["service_id"]
    assert paegents.call("buyer", "get_service", service_id=service_id)["service_name"] == "Fast translator"
    paegents.call("seller", "update_service", service_id=service_id, description="Now with Klingon.",
                  max_quantity=500)
    mine = paegents.call("seller", "list_my_services")
    assert [(s["service_id"], s["description"], s["max_quantity"]) for s in mine] == [
        (service_id, "Now with Klingon.", 500)]
    found = paegents.call("buyer", "search_services", query="translator", category="translation", max_price=2)
    assert (found["total"], [s["service_id"] for s in found["results"]], found["has_more"]) == (1, [service_id],
                                                                                                 False)
    assert paegents.call("buyer", "search_services", query="translator", min_price=3)["total"] == 0
    spare = paegents.call("seller", "register_service", **{**SERVICE, "service_name": "Spare"},
                          api_base_url=http_server.url)
    assert paegents.call("seller", "delete_service", service_id=spare["service_id"])["state"] == "deregistered"

    # Agreements: propose (the SDK restates seller, unit and price), accept, reject, cancel, list.
    terms = {"seller_agent_id": str(seller.pk), "quantity": 10, "unit": "call", "price_per_unit_cents": 2,
             "buyer_wallet_address": buyer_wallet.address, "service_id": service_id}
    proposed = paegents.call("buyer", "create_usage_agreement", **terms)
    assert (proposed["status"], proposed["total_cents"], proposed["escrow_status"]) == ("proposed", 20, "not_funded")
    agreement_id = proposed["agreement_id"]
    assert paegents.call("seller", "accept_usage_agreement", agreement_id=agreement_id)["status"] == "accepted"
    rejected = paegents.call("buyer", "create_usage_agreement", **terms)["agreement_id"]
    assert paegents.call("seller", "reject_usage_agreement", agreement_id=rejected)["status"] == "rejected"
    cancelled = paegents.call("buyer", "create_usage_agreement", **terms)["agreement_id"]
    assert paegents.call("buyer", "cancel_usage_agreement", agreement_id=cancelled)["status"] == "cancelled"
    wrong_price = paegents.error("buyer", "create_usage_agreement", **{**terms, "price_per_unit_cents": 1})
    assert (wrong_price["status"], error_code(wrong_price)) == (400, "price_mismatch")
    listed = paegents.call("buyer", "list_usage_agreements", role="buyer")
    assert [a["agreement_id"] for a in listed] == [cancelled, rejected, agreement_id]

    # Activation signs our escrow's typed data: not the SDK's (see README); done with the marketplace's SDK.
    with MarketplaceClient(live_server.url, buyer_key, timeout=15, network=network_of(chain),
                           rpc_url=chain.node.rpc_url) as client, relayer_polling():
        client.activate_escrow(client.get_agreement(agreement_id), buyer_wallet.key, quantity=10,
                               max_unit_price_atomic=20_000)
        client.wait_until(agreement_id, timeout=60, poll_interval=0.2)

    # Metered calls; the status sub-path is answered by the marketplace, never forwarded, never charged.
    calls = [("buyer", "metered_post", {"agreement_id": agreement_id, "path": "/translate", "json": {"text": "hi"}})
             for _ in range(2)]
    status_calls = [("buyer", "metered_status", {"agreement_id": agreement_id})] * 2
    results = paegents.run(*calls, *status_calls)
    assert all("ok" in result for result in results), results
    statuses = [result["ok"] for result in results[2:]]
    assert statuses[0] == statuses[1]
    assert (statuses[0]["units_used"], statuses[0]["units_total"], statuses[0]["units_remaining"]) == (2, 10, 8)
    assert (statuses[0]["escrow_status"], statuses[0]["price_per_unit_cents"]) == ("funded", 2)
    assert [r.path for r in http_server.requests] == ["/translate", "/translate"]
    assert UsageEvent.objects.filter(agreement_id=agreement_id).count() == 2

    # The seller reports its running total: charged once, a repeat charges nothing.
    usage = {"agreement_id": agreement_id, "request": {"units_used": 3}}
    assert paegents.call("seller", "record_usage", **usage)["units_used"] == 5
    assert paegents.call("seller", "record_usage", **usage)["units_used"] == 5
    buyer_try = paegents.error("buyer", "record_usage", **usage)
    assert (buyer_try["status"], error_code(buyer_try)) == (403, "seller_only")  # as on accept

    proofs = paegents.call("buyer", "get_call_proofs", agreement_id=agreement_id, direction="asc")
    assert [p["call_index"] for p in proofs["items"]] == [1, 2, 3] and proofs["has_more"] is False
    assert all(p["signature"] for p in proofs["items"])
    receipts = paegents.call("buyer", "get_cumulative_receipts", agreement_id=agreement_id, limit=2)
    assert [(r["nonce"], r["cumulative_units"]) for r in receipts["items"]] == [(3, 5), (2, 2)]
    assert receipts["has_more"] is True and receipts["items"][0]["signer"] == chain.accounts.receipt_signer.address

    escrow = paegents.call("buyer", "get_escrow_status", agreement_id=agreement_id)
    assert (escrow["escrow_status"], escrow["settlement_status"], escrow["chain_id"]) == ("funded", "active",
                                                                                          chain.chain_id)
    params = paegents.call("buyer", "get_deposit_params", agreement_id=agreement_id)
    assert (params["service_amount_atomic"], params["escrow_contract_address"]) == (200_000,
                                                                                    chain.addresses["escrow"])
    nothing_owed = paegents.call("seller", "get_claim_instructions", agreement_id=agreement_id)
    assert (nothing_owed["claimable_atomic"], nothing_owed["transaction"], nothing_owed["closed"]) == (0, None, False)

    done = paegents.call("seller", "record_usage", agreement_id=agreement_id,
                         request={"units_used": 4, "completed": True})
    assert done["units_used"] == 6
    late = paegents.error("buyer", "metered_post", agreement_id=agreement_id, path="/translate")
    assert (late["status"], error_code(late)) == (409, "agreement_completing")
    dispute = paegents.error("buyer", "dispute_usage_agreement", agreement_id=agreement_id,
                             reason="the translations were empty")
    assert (dispute["status"], error_code(dispute)) == (409, "invalid_transition")  # nothing proposed on-chain yet


@pytest.mark.chain
def test_build_direct_stablecoin_agreement_pays_on_a_base_sepolia_like_chain(paegents, live_server, base_sepolia_chain,
                                                                             settings):
    """The SDK signs for Base Sepolia only (x402's token table: chain 84532, USDC at 0x036C…CF7e, EIP-712 name
    "USDC"). A dev chain standing in for it, whose token domain the marketplace reads from the token, is paid."""
    chain = wire_marketplace(base_sepolia_chain, settings)
    settings.CHAIN_NETWORK = "base-sepolia"  # the network name in the SDK's x402 v1 payment
    buyer_wallet, seller_wallet = chain.accounts.buyer, chain.accounts.seller
    fund(chain, buyer_wallet.address, 10 * USDC)
    buyer = AgentFactory(is_buyer=True, is_seller=False, wallet_address=buyer_wallet.address)
    seller = AgentFactory(is_buyer=False, is_seller=True, wallet_address=seller_wallet.address)
    paegents.agent("buyer", buyer, issue_key(buyer))
    paegents.agent("seller", seller, issue_key(seller))
    service = paegents.call("seller", "register_service", **SERVICE, api_base_url="https://seller.example")
    fee = paegents.call("buyer", "compute_stablecoin_fee_atomic", total_cents=200)

    signed = paegents.call("buyer", "build_direct_stablecoin_agreement", buyer_private_key=buyer_wallet.key,
                           seller_wallet=seller_wallet.address, amount_cents=200, resource_id="translations",
                           gas_wallet_address=chain.accounts.deployer.address, chain_id=84532,
                           usdc_permit_nonce=chain.usdc.functions.nonces(buyer_wallet.address).call(),
                           permit_deadline=int(time.time()) + 3600, max_timeout_seconds=3600)
    proposed = paegents.call("buyer", "create_usage_agreement", seller_agent_id=str(seller.pk), quantity=100,
                             unit="call", price_per_unit_cents=2, service_id=service["service_id"],
                             settlement_model="direct_payment", buyer_wallet_address=buyer_wallet.address,
                             payment_header=signed["payment_header"],
                             buyer_infra_fee_permit_signature=signed["buyer_infra_fee_permit_signature"],
                             buyer_infra_fee_permit_deadline=signed["buyer_infra_fee_permit_deadline"])
    assert proposed["status"] == "proposed" and signed["infra_fee_amount_atomic"] == fee
    before = [usdc_balance(chain, a) for a in (buyer_wallet.address, seller_wallet.address)]
    with relayer_polling():
        paegents.call("seller", "accept_usage_agreement", agreement_id=proposed["agreement_id"])
        deadline = time.monotonic() + 60
        while UsageAgreement.objects.get(pk=proposed["agreement_id"]).status == "paying" and \
                time.monotonic() < deadline:
            time.sleep(0.2)

    agreement = UsageAgreement.objects.get(pk=proposed["agreement_id"])
    assert agreement.status == "paid", (agreement.status, agreement.status_reason)
    assert [usdc_balance(chain, a) for a in (buyer_wallet.address, seller_wallet.address)] == [
        before[0] - 2 * USDC - fee, before[1] + 2 * USDC]


def test_policies_approvals_webhooks_and_events(paegents, live_server, http_server):
    buyer = AgentFactory(is_buyer=True, is_seller=False)
    owner_token = issue_owner_token(buyer.owner)
    seller = AgentFactory(is_buyer=False, is_seller=True)
    paegents.agent("buyer", buyer, issue_key(buyer))
    paegents.agent("seller", seller, issue_key(seller, scope="admin"))
    service = paegents.call("seller", "register_service", **SERVICE, api_base_url=http_server.url)
    owner = {"agent_id": str(buyer.pk), "jwt_token": owner_token}

    # Policies and approvals, by the owner (its token as the SDK's jwt_token).
    assert paegents.call("buyer", "get_agent_policies", **owner)["approval_threshold_atomic"] is None
    policy = paegents.call("buyer", "update_agent_policies", **owner,
                           policy={"approval_threshold_atomic": 100_000, "allowed_tags": ["translation"]})
    assert policy["approval_threshold_atomic"] == 100_000
    terms = {"seller_agent_id": str(seller.pk), "quantity": 10, "unit": "call", "price_per_unit_cents": 2,
             "buyer_wallet_address": buyer.wallet_address}  # no service_id: the seller's only service
    held = [paegents.call("buyer", "create_usage_agreement", **terms) for _ in range(2)]
    assert [a["status"] for a in held] == ["pending_approval"] * 2
    assert {str(a.service_id) for a in UsageAgreement.objects.filter(buyer=buyer)} == {service["service_id"]}
    pending = paegents.call("buyer", "list_approvals", **owner, status="pending")["results"]
    by_agreement = {approval["subject_id"]: approval["id"] for approval in pending}
    approved = paegents.call("buyer", "approve_approval", **owner, request_id=by_agreement[held[0]["agreement_id"]])
    assert approved["status"] == "approved"
    rejected = paegents.call("buyer", "reject_approval", **owner, request_id=by_agreement[held[1]["agreement_id"]],
                             reason="over budget this week")
    assert (rejected["status"], rejected["decision_note"]) == ("rejected", "over budget this week")
    statuses = {a["agreement_id"]: a["status"] for a in paegents.call("buyer", "list_usage_agreements")}
    assert statuses == {held[0]["agreement_id"]: "proposed", held[1]["agreement_id"]: "rejected"}

    # Webhooks of the seller's agent (its admin key), with the receiver's own secret.
    secret = "whsec_receivers_own_secret"
    created = paegents.call("seller", "create_webhook", url=f"{http_server.url}/hooks", secret=secret)
    hook_id = created["id"]
    assert [h["id"] for h in paegents.call("seller", "list_webhooks")] == [hook_id]
    paegents.call("seller", "send_test_webhook")
    test_event = _wait_for_request(http_server, "/hooks")
    body = test_event.body.decode()
    assert json.loads(body)["type"] == "webhook.test"
    assert paegents.call("seller", "verify_webhook_signature", header=test_event.headers["Marketplace-Signature"],
                         body=body, secret=secret) is True  # the SDK's own verifier accepts our signature
    deliveries = paegents.call("seller", "list_webhook_deliveries", status="delivered")["results"]
    assert [d["event_type"] for d in deliveries] == ["webhook.test"]
    assert paegents.call("seller", "replay_webhook_delivery", delivery_id=deliveries[0]["id"])["attempts"] <= 1
    assert paegents.call("seller", "pause_webhook", subscription_id=hook_id)["paused"] is True
    assert paegents.call("seller", "resume_webhook", subscription_id=hook_id)["paused"] is False
    assert paegents.call("seller", "rotate_webhook_secret", subscription_id=hook_id)["secret"] != secret

    # The pollable inbox: the agreement events of the buyer, acknowledged one by one.
    events = paegents.call("buyer", "list_agent_events", types=["agreement.rejected"])
    assert [(e["type"], e["status"], e["payload"]["agreement_id"]) for e in events] == [
        ("agreement.rejected", "pending", held[1]["agreement_id"])]
    paegents.call("buyer", "ack_agent_event", event_id=events[0]["event_id"])
    assert paegents.call("buyer", "list_agent_events", types=["agreement.rejected"])[0]["status"] == "acked"
    assert paegents.call("buyer", "list_agent_events", after=events[0]["event_id"]) == []


def _wait_for_request(server, path: str, timeout: float = 10):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for request in server.requests:
            if request.path == path:
                return request
        time.sleep(0.05)
    raise AssertionError(f"nothing was sent to {path}")
