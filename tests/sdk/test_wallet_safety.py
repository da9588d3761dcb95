"""Wallet safety: the SDK signs only what the buyer agreed to, whatever the marketplace answers.

A compromised marketplace is played by `HostileMarketplace`, an httpx transport in front of the real server
(`live_server`, Anvil, the relayer) that passes every request through and rewrites one JSON answer. The buyer's
wallet records what it is asked to sign: a refusal must name the altered field and leave the wallet untouched.
"""

from __future__ import annotations

import json
import secrets
import uuid
from collections.abc import Callable
from typing import Any

import httpx
import pytest
from eth_account import Account

from escrow import settlement
from marketplace.signatures import receipt_sign
from sdk import LocalWallet, MarketplaceClient, NetworkConfig, NotConfigured, SigningRefused
from sdk import receipts, typed_data
from sdk.networks import UntrustedConfiguration
from tests.catalog.factories import AgentFactory, issue_key, service_data
from tests.escrow.flow import USDC, fund, network_of
from tests.sdk.test_client import agent_client, relayer_polling
from tests.escrow.conftest import escrow_terms
from tests.faults.processes import wait_until

pytestmark = pytest.mark.chain

MAX_UINT = 2**256 - 1
ESCROW_PROPOSED = 2  # UsageEscrow.State.Proposed
ESCROW_SETTLED = 5  # UsageEscrow.State.Settled
Alteration = Callable[[dict[str, Any]], None]


class HostileMarketplace(httpx.BaseTransport):
    """Forwards to the real marketplace (over HTTP, or `inner`); rewrites the JSON answer of paths ending in `target`
    with `alter`."""

    def __init__(self, inner: httpx.BaseTransport | None = None):
        self._inner = inner or httpx.HTTPTransport()
        self.target: str | None = None
        self.alter: Alteration | None = None
        self.requests: list[tuple[str, str]] = []

    def attack(self, target: str, alter: Alteration) -> None:
        self.target, self.alter = target, alter

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        self.requests.append((request.method, request.url.path))
        response = self._inner.handle_request(request)
        if self.alter is None or not request.url.path.endswith(self.target):
            return response
        response.read()
        body = response.json()
        self.alter(body)
        headers = {k: v for k, v in response.headers.items() if k.lower() not in ("content-length", "content-encoding")}
        return httpx.Response(response.status_code, headers=headers, content=json.dumps(body).encode())

    def close(self) -> None:
        self._inner.close()


class RecordingWallet(LocalWallet):
    """A local key that remembers every object it signed."""

    def __init__(self, private_key: str):
        super().__init__(private_key)
        self.signed: list[dict[str, Any]] = []

    def sign_typed_data(self, typed: dict[str, Any]) -> str:
        self.signed.append(typed)
        return super().sign_typed_data(typed)


def setter(path: str, value: Any) -> Alteration:
    """Set `value` at a dotted path (`escrow_permit.message.spender`)."""
    *parents, last = path.split(".")

    def alter(body: dict[str, Any]) -> None:
        node = body
        for name in parents:
            node = node[name]
        node[last] = value(node[last]) if callable(value) else value
    return alter


@pytest.fixture
def hostile():
    transport = HostileMarketplace()
    yield transport
    transport.close()


@pytest.fixture
def market(live_server, escrow_chain, hostile, http_server):
    """A funded buyer talking to the marketplace through `hostile`, and a seller's service."""
    chain = escrow_chain
    fund(chain, chain.accounts.buyer.address, 20 * USDC)
    seller = agent_client(live_server.url, wallet=chain.accounts.seller.address, buyer=False, seller=True)
    buyer = agent_client(live_server.url, wallet=chain.accounts.buyer.address, chain=chain, transport=hostile)
    service = seller.register_service(**service_data(upstream_base_url=http_server.url))  # 0.02 USDC per call
    with seller, buyer:
        yield buyer, seller, service


def refused(call: Callable[[], Any], wallet: RecordingWallet) -> SigningRefused:
    with pytest.raises(SigningRefused) as refusal:
        call()
    assert wallet.signed == [], f"signed although {refusal.value.field} was altered"
    return refusal.value


def test_a_hostile_activation_package_is_refused_field_by_field(market, hostile, escrow_chain):
    buyer, seller, service = market
    chain = escrow_chain
    stranger, seller_address = chain.accounts.stranger.address, chain.accounts.seller.address
    agreement = buyer.propose_agreement(service["id"], 100, max_unit_price_atomic=20_000)  # 2 USDC deposit + 0.10 fee: one permit of 2.10
    seller.accept_agreement(agreement["id"])
    wallet = RecordingWallet(chain.accounts.buyer.key)
    now = chain.now()
    permit_for_max_fee = {"types": {}, "primaryType": "Permit", "domain": {}, "message": {"value": MAX_UINT}}

    attacks = [
        ("intent.domain.name", "UsageEscrow2"),
        ("escrow_permit.domain.name", "USDC"),
        ("intent.domain.version", "2"),
        ("intent.domain.chainId", 1),
        ("escrow_permit.domain.chainId", 8453),
        ("intent.domain.verifyingContract", stranger),
        ("escrow_permit.domain.verifyingContract", stranger),
        ("intent.primaryType", "Permit"),
        ("escrow_permit.message.spender", stranger),  # the drain: a permit to an arbitrary spender
        ("escrow_permit.message.value", lambda value: value + 1),
        ("escrow_permit.message.value", MAX_UINT),
        ("escrow_permit.message.owner", stranger),
        ("intent.message.deadline", now + 86_400),  # DeadlineOutOfRange, as the next
        ("intent.message.deadline", now + 10),
        ("intent.message.receiptSigner", seller_address),  # a seller-held key would sign the whole deposit away
        ("intent.message.depositAmount", lambda value: value * 10),
        ("intent.message.infraFee", lambda value: value + 1),
        ("intent.message.seller", stranger),
        ("intent.message.termsHash", "0x" + "ab" * 32),
        ("intent.message.nonce", 0),
        ("intent.message.extra", 1),
        ("intent.types.ActivationIntent", lambda fields: fields[:-1]),
        ("fee_permit", permit_for_max_fee),  # the old second permit, for MAX_UINT
    ]
    for path, value in attacks:
        hostile.attack("/activation-package", setter(path, value))
        assert refused(lambda: buyer.activate_escrow(agreement, wallet), wallet).field == path

    assert ("POST", f"/usage-agreements/{agreement['id']}/activate-escrow") not in hostile.requests
    # The same package, unaltered, activates: the double is transparent and the SDK's objects are the server's.
    hostile.attack("/activation-package", lambda body: None)
    with relayer_polling():
        buyer.activate_escrow(agreement, wallet)
        assert buyer.wait_until(agreement["id"], timeout=60, poll_interval=0.2)["status"] == "active"
    assert [typed["primaryType"] for typed in wallet.signed] == ["ActivationIntent", "Permit"]
    assert wallet.signed[1]["message"]["value"] == 2 * USDC + 100_000


def test_altered_agreed_terms_are_refused(market, hostile, escrow_chain):
    buyer, seller, service = market
    agreement = buyer.propose_agreement(service["id"], 100, max_unit_price_atomic=20_000)
    seller.accept_agreement(agreement["id"])
    wallet = RecordingWallet(escrow_chain.accounts.buyer.key)
    for field, value in (("infra_fee_atomic", 10**12), ("deposit_amount_atomic", 10**12), ("chain_id", 1)):
        altered = {**agreement, field: value}
        refusal = refused(lambda altered=altered: buyer.activate_escrow(altered, wallet), wallet)
        assert refusal.field == f"agreement.{field}"


def test_hostile_direct_purchase_requirements_are_refused(market, hostile, escrow_chain):
    buyer, _, service = market
    chain = escrow_chain
    wallet = RecordingWallet(chain.accounts.buyer.key)
    attacks = [
        ("fee_atomic", MAX_UINT),  # a fee permit for MAX_UINT
        ("gas_wallet_address", chain.accounts.stranger.address),  # the fee permit's spender
        ("chain_id", 8453),
        ("token.address", chain.accounts.stranger.address),
        ("amount_atomic", lambda amount: amount * 2),
    ]
    for path, value in attacks:
        hostile.attack("/payment-requirements", setter(path, value))
        refusal = refused(lambda: buyer.propose_direct_purchase(service["id"], 10, wallet=wallet,
                                                                max_unit_price_atomic=20_000), wallet)
        assert refusal.field == f"payment_requirements.{path}"
    hostile.attack("/agents/services/" + service["id"], setter("pricing.unit_price_atomic", 20_001))
    refusal = refused(lambda: buyer.propose_direct_purchase(service["id"], 10, wallet=wallet,
                                                            max_unit_price_atomic=20_000), wallet)
    assert refusal.field == "pricing.unit_price_atomic"
    assert not any(method == "POST" for method, _ in hostile.requests)


def test_a_hostile_service_answer_is_refused_before_a_direct_purchase_is_signed(market, hostile, escrow_chain):
    """The service the marketplace answers with is what the buyer pays: its seller's wallet is the payee. Another
    service than the one asked for (a costlier seller's, an attacker's) is refused, and so is a payee other than
    the one the buyer expects, when it says which."""
    buyer, _, service = market
    chain = escrow_chain
    wallet = RecordingWallet(chain.accounts.buyer.key)
    other = str(uuid.uuid4())
    hostile.attack("/agents/services/" + service["id"], setter("id", other))
    refusal = refused(lambda: buyer.propose_direct_purchase(service["id"], 10, wallet=wallet,
                                                            max_unit_price_atomic=20_000), wallet)
    assert (refusal.field, refusal.received) == ("service.id", other)
    hostile.attack("/agents/services/" + service["id"], setter("seller.wallet_address", chain.accounts.stranger.address))
    refusal = refused(lambda: buyer.propose_direct_purchase(
        service["id"], 10, wallet=wallet, max_unit_price_atomic=20_000,
        expected_seller_wallet_address=chain.accounts.seller.address), wallet)
    assert (refusal.field, refusal.received) == ("seller.wallet_address", chain.accounts.stranger.address)
    assert not any(method == "POST" for method, _ in hostile.requests)


def active_in_challenge(buyer, seller, service, chain) -> dict:
    """An agreement with three charged calls, its settlement proposed on-chain (challenge window open)."""
    agreement = buyer.propose_agreement(service["id"], 10, max_unit_price_atomic=20_000)
    seller.accept_agreement(agreement["id"])
    with relayer_polling():
        buyer.activate_escrow(agreement, chain.accounts.buyer.key)
        buyer.wait_until(agreement["id"], timeout=60, poll_interval=0.2)
        for n in range(3):
            assert buyer.call_metered(agreement["id"], "translate", method="POST", json={"n": n}).status_code == 200
        buyer.complete(agreement["id"])
        settlement.settlement_tick()
        buyer.wait_until(agreement["id"], statuses={"in_challenge"}, timeout=60, poll_interval=0.2)
    # The marketplace moves on the proposal's receipt, which the node may hand out before its latest block holds the
    # proposal; the SDK's checks read that latest state, so wait for the chain as well.
    terms = escrow_terms(chain.escrow, agreement["onchain_id"])
    wait_until(lambda: chain.escrow.functions.getEscrow(agreement["onchain_id"], terms).call()[0] == ESCROW_PROPOSED,
               timeout=30, what="the settlement proposal in the chain's latest state")
    return agreement


def test_hostile_challenge_packages_are_refused(market, hostile, escrow_chain):
    buyer, seller, service = market
    chain = escrow_chain
    agreement = active_in_challenge(buyer, seller, service, chain)
    wallet = RecordingWallet(chain.accounts.buyer.key)
    now = chain.now()
    permit = typed_data.erc2612_permit(chain_id=chain.chain_id, token_address=chain.addresses["usdc"],
                                       owner=chain.accounts.buyer.address, spender=chain.accounts.stranger.address,
                                       value=MAX_UINT, nonce=1, deadline=now + 600)
    attacks = [
        ("challenge", permit, "challenge.primaryType"),  # a Permit presented as the "challenge"
        ("challenge.domain.chainId", 1, "challenge.domain.chainId"),
        ("challenge.domain.verifyingContract", chain.accounts.stranger.address,
         "challenge.domain.verifyingContract"),
        ("challenge.message.agreementId", "0x" + "12" * 32, "challenge.message.agreementId"),
        ("challenge.message.extra", 1, "challenge.message.extra"),
        ("deadline", now + 30 * 86_400, "deadline"),
    ]
    for path, value, field in attacks:
        hostile.attack("/challenge-package", setter(path, value))
        assert refused(lambda: buyer.challenge(agreement, wallet, "hostile"), wallet).field == field
    # No window is longer than the contract's 30 days, whatever the agreement says.
    def far_deadline(body: dict[str, Any]) -> None:
        body["deadline"] = body["challenge"]["message"]["deadline"] = now + 31 * 86_400

    hostile.attack("/challenge-package", far_deadline)
    assert refused(lambda: buyer.challenge({**agreement, "challenge_window_seconds": 10**9}, wallet, "hostile"),
                   wallet).field == "deadline"

    hostile.attack("/challenge-package", lambda body: None)
    with relayer_polling():
        buyer.challenge(agreement, wallet, "the third call never answered")
        assert buyer.wait_until(agreement["id"], statuses={"disputed"}, timeout=60, poll_interval=0.2)
    assert [typed["primaryType"] for typed in wallet.signed] == ["Challenge"]


def _reforge_chain(events: list[dict[str, Any]], onchain_id: str, start: int) -> None:
    """Recompute the cumulative amounts and digests from event `start` on, as a forger who knows the scheme."""
    digest = events[start - 1]["usage_digest"] if start else receipts.ZERO_DIGEST
    cumulative = events[start - 1]["cumulative_atomic"] if start else 0
    for event in events[start:]:
        cumulative += event["cost_atomic"]
        event["cumulative_atomic"] = cumulative
        digest = receipts.next_usage_digest(digest, receipts.usage_event_hash(
            agreement_id=onchain_id, seq=event["seq"], units=event["units"], cost=event["cost_atomic"],
            cumulative_amount=cumulative, request_id=event["request_id"]))
        event["usage_digest"] = digest


def test_verify_usage_checks_the_listing_against_the_chain(market, hostile, escrow_chain):
    buyer, seller, service = market
    chain = escrow_chain
    agreement = active_in_challenge(buyer, seller, service, chain)
    onchain_id = agreement["onchain_id"]
    assert buyer.verify_usage(agreement).cumulative_amount == 60_000

    def inflate_last_call(body):  # +1 unit on the last call, sums and digests re-forged: only the receipt tells
        events = body["results"]
        events[-1]["units"] += 1
        events[-1]["cost_atomic"] += 20_000
        _reforge_chain(events, onchain_id, len(events) - 1)

    def drop_second(body):
        del body["results"][1]

    def wrong_digest(body):
        body["results"][1]["usage_digest"] = "0x" + secrets.token_hex(32)

    def signed_by_another_key(body):
        other = chain.accounts.stranger
        for event in body["results"]:
            receipt = receipts.usage_receipt_digest(
                chain_id=chain.chain_id, escrow_address=chain.addresses["escrow"], agreement_id=onchain_id,
                seq=event["seq"], cumulative_amount=event["cumulative_atomic"], usage_digest=event["usage_digest"])
            event["receipt_signature"] = receipt_sign(other.key, receipt)
            event["receipt_signer"] = other.address

    def hide_the_last_call(body):  # the proposal on-chain (3 calls) is then above the last receipt listed
        del body["results"][-1]

    cases = [
        (inflate_last_call, receipts.ReceiptTampered),
        (drop_second, receipts.UsageSequenceGap),
        (wrong_digest, receipts.UsageDigestMismatch),
        (signed_by_another_key, receipts.ReceiptSignerMismatch),
        (hide_the_last_call, receipts.SettlementProposalMismatch),
    ]
    for alter, error in cases:
        hostile.attack("/usage", alter)
        with pytest.raises(error):
            buyer.verify_usage(agreement)

    hostile.attack("/usage", lambda body: None)
    assert buyer.verify_usage(agreement).last_signed_seq == 3
    # The seller raises the on-chain proposal with a higher receipt the listing never showed: caught on-chain.
    higher = receipts.usage_receipt_digest(chain_id=chain.chain_id, escrow_address=chain.addresses["escrow"],
                                           agreement_id=onchain_id, seq=4, cumulative_amount=80_000,
                                           usage_digest="0x" + "77" * 32)
    raised = chain.escrow.functions.proposeSettlement(
        onchain_id, escrow_terms(chain.escrow, onchain_id), 4, 80_000, "0x" + "77" * 32, receipt_sign(chain.accounts.receipt_signer.key, higher),
    ).transact({"from": chain.accounts.seller.address})
    # Anvil answers a send before it mines it: read the escrow once the proposal is in a block.
    chain.w3.eth.wait_for_transaction_receipt(raised, timeout=30)
    with pytest.raises(receipts.SettlementProposalMismatch):
        buyer.verify_usage(agreement)


def test_verify_usage_holds_the_agreement_to_the_escrows_on_chain_terms(market, hostile, escrow_chain):
    # A compromised marketplace (its receipt signer with it) lists the buyer's three calls as three units, as the buyer
    # counted them, at twice the unit price agreed, re-signed: units × the price it states and every receipt add up.
    # Or it names another agreement's escrow as this one's. Only the escrow's terms hash (the buyer signed it) tells.
    buyer, seller, service = market
    chain = escrow_chain
    agreement = buyer.propose_agreement(service["id"], 10, max_unit_price_atomic=20_000)
    seller.accept_agreement(agreement["id"])
    other = buyer.propose_agreement(service["id"], 10, max_unit_price_atomic=20_000)
    seller.accept_agreement(other["id"])
    with relayer_polling():
        for funded in (agreement, other):
            buyer.activate_escrow(funded, chain.accounts.buyer.key)
            buyer.wait_until(funded["id"], timeout=60, poll_interval=0.2)
        for n in range(3):
            assert buyer.call_metered(agreement["id"], "translate", method="POST", json={"n": n}).status_code == 200
    onchain_id = agreement["onchain_id"]
    assert buyer.verify_usage(buyer.get_agreement(agreement["id"])).cumulative_amount == 60_000

    def forged(*, price_factor: int, escrow_id: str) -> Alteration:
        def forge(body):
            for event in body["results"]:
                event["cost_atomic"] *= price_factor
            _reforge_chain(body["results"], escrow_id, 0)
            for event in body["results"]:
                event["receipt_signature"] = receipt_sign(chain.accounts.receipt_signer.key, receipts.usage_receipt_digest(
                    chain_id=chain.chain_id, escrow_address=chain.addresses["escrow"], agreement_id=escrow_id,
                    seq=event["seq"], cumulative_amount=event["cumulative_atomic"], usage_digest=event["usage_digest"]))
        return forge

    hostile.attack("/usage", forged(price_factor=2, escrow_id=onchain_id))
    with pytest.raises(receipts.UsageTermsMismatch):
        buyer.verify_usage({**agreement, "price_per_unit_atomic": "40000"})
    hostile.attack("/usage", forged(price_factor=1, escrow_id=other["onchain_id"]))
    with pytest.raises(receipts.UsageTermsMismatch):
        buyer.verify_usage({**agreement, "onchain_id": other["onchain_id"]})
    hostile.attack("/usage", lambda body: None)
    assert buyer.verify_usage(agreement).cumulative_amount == 60_000


def test_verify_usage_accepts_a_settlement_the_arbiter_decided(market, escrow_chain):
    # After a dispute the arbiter's amount is paid out, not the proposal: an honest listing still verifies, and a
    # tampered one still does not.
    buyer, seller, service = market
    chain = escrow_chain
    agreement = active_in_challenge(buyer, seller, service, chain)
    onchain_id = agreement["onchain_id"]
    terms = escrow_terms(chain.escrow, onchain_id)
    for step, sender in ((chain.escrow.functions.challenge(onchain_id, terms), chain.accounts.buyer),
                         (chain.escrow.functions.resolve(onchain_id, terms, 20_000), chain.accounts.arbiter),
                         (chain.escrow.functions.finalize(onchain_id, terms), chain.accounts.stranger)):
        chain.w3.eth.wait_for_transaction_receipt(step.transact({"from": sender.address}), timeout=30)
        # Disputed, resolved, then settled: the proposal, which each state keeps, is the last receipt.
        verified = buyer.verify_usage(agreement)
        assert (verified.events, verified.cumulative_amount, verified.last_signed_seq) == (3, 60_000, 3)
    assert chain.escrow.functions.getEscrow(onchain_id, terms).call()[0] == ESCROW_SETTLED


def test_the_configuration_is_read_from_the_marketplace_only_on_explicit_trust(live_server, escrow_chain):
    with pytest.raises(UntrustedConfiguration):
        NetworkConfig.from_marketplace(live_server.url, trust_server=False)
    assert NetworkConfig.from_marketplace(live_server.url, trust_server=True) == network_of(escrow_chain)


def test_a_marketplace_that_rotated_its_receipt_signer_names_the_retired_one_in_its_configuration(
        live_server, escrow_chain, settings):
    """The SDK accepts an escrow's receipts only from a signer its network names, current or retired (an escrow keeps
    the signer it was activated under): a configuration read from the marketplace named the current one only, so
    after a rotation every escrow activated before it failed its usage verification."""
    retired = Account.create()
    settings.RECEIPT_SIGNER_RETIRED_PRIVATE_KEYS = [retired.key.hex(), "not a key"]

    network = NetworkConfig.from_marketplace(live_server.url, trust_server=True)

    assert network.retired_receipt_signers == (retired.address,)
    assert network.receipt_signers == (network_of(escrow_chain).receipt_signer, retired.address)


def test_signing_needs_a_pinned_network(live_server):
    agent = AgentFactory(is_buyer=True, is_seller=False)
    with MarketplaceClient(live_server.url, issue_key(agent)) as client, pytest.raises(NotConfigured):
        client.activate_escrow({"id": "x"}, "0x" + "11" * 32)
