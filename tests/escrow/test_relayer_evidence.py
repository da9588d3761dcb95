"""Relayer outcomes only on chain evidence (DESIGN section 6, "Evidence before action"), on Anvil and PostgreSQL:
a nonce reported used is looked into before anything is sent again, fees stop at the cap and the same bytes go
out again, AgreementExists is compared with the buyer's intent, and a throttling RPC holds up only what it
throttles."""

from datetime import timedelta

import pytest
from django.contrib.auth import get_user_model
from django.urls import reverse

from escrow import chain as gateway
from escrow import settlement
from escrow.models import ChainTransaction, TxAttempt, TxStatus
from tests.agreements.test_invocations import FEE, PRICE, Market
from tests.escrow.conftest import Escrows
from tests.escrow.flow import USDC, Parties, confirm_all, fund, mined_what_was_sent, poll_mined, usdc_balance
from tests.marketplace.conftest import scrape
from tests.support.db_activity import backend_pid, session_state
from tests.support.operators import operator_client
from tests.support.rpc_relay import RpcRelay

pytestmark = [pytest.mark.chain, pytest.mark.django_db]


@pytest.fixture
def parties(escrow_chain):
    return Parties(escrow_chain)


@pytest.fixture
def rpc_relay(escrow_chain, settings):
    """The marketplace talks to Anvil through a relay the test controls."""
    relay = RpcRelay(escrow_chain.node.rpc_url).start()
    settings.CHAIN_RPC_URL = relay.url
    settings.CHAIN_RPC_RETRY_BACKOFF = 0.01
    yield relay
    relay.stop()


def queue_activation(parties, capture):
    """POST activate-escrow but keep the after-commit submission for the test to run."""
    agreement = parties.accepted_agreement()
    body = parties.signed_activation(agreement["id"])
    with capture(execute=False) as callbacks:
        response = parties.buyer_api.post(f"/usage-agreements/{agreement['id']}/activate-escrow", body)
    assert response.status_code == 202, response.content
    return agreement, ChainTransaction.objects.get(agreement_id=agreement["id"]), callbacks


def run(callbacks, capture) -> None:
    with capture(execute=True):
        for callback in callbacks:
            callback()


def relayer_sent(chain) -> int:
    return chain.w3.eth.get_transaction_count(chain.accounts.deployer.address)


def is_send(call) -> bool:
    return call["method"] == "eth_sendRawTransaction"


def test_an_attempt_mined_just_before_its_rebroadcast_is_found_not_sent_again(
        parties, escrow_chain, rpc_relay, settings, django_capture_on_commit_callbacks):
    capture = django_capture_on_commit_callbacks
    agreement, tx, callbacks = queue_activation(parties, capture)
    buyer_before = usdc_balance(escrow_chain, parties.buyer_account.address)
    sent_before = relayer_sent(escrow_chain)
    escrow_chain.rpc("evm_setAutomine", [False])
    try:
        run(callbacks, capture)  # broadcast; waits in the mempool
        settings.CHAIN_REBROADCAST_AFTER = timedelta(0)
        # The receipt lookup finds nothing; the block with the attempt is mined just before the rebroadcast
        # arrives, so the node answers "nonce too low".
        rpc_relay.before_once(is_send, lambda: rpc_relay.node("evm_mine"))
        confirm_all(capture)
    finally:
        escrow_chain.rpc("evm_setAutomine", [True])
    confirm_all(capture)
    confirm_all(capture)

    tx.refresh_from_db()
    assert tx.status == TxStatus.CONFIRMED and tx.attempts.count() == 1
    assert parties.agreement(agreement["id"])["status"] == "active"
    assert relayer_sent(escrow_chain) == sent_before + 1  # one transaction on-chain
    funded = int(agreement["deposit_amount_atomic"]) + int(parties.agreement(agreement["id"])["infra_fee_atomic"])
    assert usdc_balance(escrow_chain, parties.buyer_account.address) == buyer_before - funded


def test_a_payout_mined_just_before_its_rebroadcast_pays_the_seller_once(
        escrow_chain, http_server, rpc_relay, settings, django_capture_on_commit_callbacks):
    capture = django_capture_on_commit_callbacks
    market = Market(escrow_chain, http_server)
    market.upstream.responses.append((200, {"translation": "bonjour"}))
    fund(escrow_chain, market.treasury, 10 * USDC)  # the treasury's float: a second payout would go through
    payment = market.pay("translate")
    buyer, seller, treasury = market.balances()
    sends = []

    def payout_broadcast(call) -> bool:  # the second transaction: the buyer's payment is the first
        sends.extend([call] if is_send(call) else [])
        return is_send(call) and len(sends) == 2

    rpc_relay.before_once(payout_broadcast, lambda: rpc_relay.node("evm_setAutomine", [False]))
    try:
        with capture(execute=True):
            response = market.call("translate", payment)
        assert response.status_code == 200, response.content
        payout = ChainTransaction.objects.get(purpose="invocation_payout")
        assert payout.status == TxStatus.SUBMITTED  # waiting in the mempool
        settings.CHAIN_REBROADCAST_AFTER = timedelta(0)
        rpc_relay.before_once(is_send, lambda: rpc_relay.node("evm_mine"))
        confirm_all(capture)  # no receipt yet; mined just before the rebroadcast arrives: "nonce too low"
    finally:
        rpc_relay.node("evm_setAutomine", [True])
    confirm_all(capture)
    confirm_all(capture)

    payout.refresh_from_db()
    assert payout.status == TxStatus.CONFIRMED and payout.attempts.count() == 1
    assert market.balances() == (buyer - PRICE, seller + PRICE - FEE, treasury + FEE)  # the seller paid once


def activation_whose_nonce_someone_else_took(parties, escrow_chain, capture):
    """An activation sent, dropped from the node's pool before it was mined, and its nonce taken by something else
    the same key sent (another process sharing the wallet): (agreement, its transaction, our attempt)."""
    agreement, tx, callbacks = queue_activation(parties, capture)
    escrow_chain.rpc("evm_setAutomine", [False])
    try:
        run(callbacks, capture)
        tx.refresh_from_db()
        ours = tx.attempts.get()
        escrow_chain.rpc("anvil_dropTransaction", [ours.tx_hash])
        escrow_chain.w3.eth.send_transaction({"from": escrow_chain.accounts.deployer.address, "nonce": tx.nonce,
                                              "to": escrow_chain.accounts.stranger.address, "value": 1})
        escrow_chain.mine()
    finally:
        escrow_chain.rpc("evm_setAutomine", [True])
    return agreement, tx, ours


def test_a_nonce_used_by_someone_else_is_sent_again_under_a_new_nonce(
        parties, escrow_chain, settings, django_capture_on_commit_callbacks):
    capture = django_capture_on_commit_callbacks
    agreement, tx, ours = activation_whose_nonce_someone_else_took(parties, escrow_chain, capture)
    settings.CHAIN_REBROADCAST_AFTER = timedelta(0)
    confirm_all(capture)  # nonce too low, no receipt of ours, the nonce is used: queued again, sent again
    confirm_all(capture)

    tx.refresh_from_db()
    assert tx.status == TxStatus.CONFIRMED and tx.nonce == ours.nonce + 1
    assert tx.attempts.count() == 2 and tx.attempts.filter(pk=ours.pk).exists()  # every hash is kept
    assert parties.agreement(agreement["id"])["status"] == "active"


def test_a_nonce_someone_else_used_long_ago_is_sent_again_with_a_node_that_keeps_recent_state_only(
        parties, escrow_chain, settings, monkeypatch, django_capture_on_commit_callbacks):
    """As above, but the relayer looks only after 200 blocks, and its node is no archive node: it keeps the state of
    its last 128 blocks, and refuses a nonce at an older one ("missing trie node"). Finding the block that took the
    nonce from past nonces fails; the blocks since our transaction was signed show none of its hashes, so it went
    out again under a new nonce. (It waited for good, listed overdue.)"""
    capture = django_capture_on_commit_callbacks
    agreement, tx, ours = activation_whose_nonce_someone_else_took(parties, escrow_chain, capture)
    escrow_chain.mine(200)
    nonce_at = gateway.nonce_at

    def nonce_at_of_a_full_node(address, block):
        if isinstance(block, int) and block < gateway.latest_block_number() - 127:
            raise gateway.ChainError("missing trie node 0x5e1b... (path ) state is not available")
        return nonce_at(address, block)

    monkeypatch.setattr(gateway, "nonce_at", nonce_at_of_a_full_node)
    settings.CHAIN_REBROADCAST_AFTER = timedelta(0)
    confirm_all(capture)
    confirm_all(capture)

    tx.refresh_from_db()
    assert tx.status == TxStatus.CONFIRMED and tx.nonce == ours.nonce + 1
    assert parties.agreement(agreement["id"])["status"] == "active"


def test_at_the_fee_cap_the_same_bytes_go_out_until_they_are_mined(
        parties, escrow_chain, settings, django_capture_on_commit_callbacks):
    """No block takes the activation (the node mines nothing): each round replaces it with higher fees up to the
    cap, then the same capped bytes are rebroadcast and the row shows stuck at the fee cap until they are mined.
    (A wallet that cannot pay the gas is not bid up: test_relayer_faults, the relayer wallet out of gas.)"""
    capture = django_capture_on_commit_callbacks
    agreement, tx, callbacks = queue_activation(parties, capture)
    settings.CHAIN_MAX_FEE_PER_GAS = gateway.current_fees().max_fee_per_gas * 2
    # The cap binds before what the base fee justifies (twice it plus the most tip believed: test_relayer_faults).
    settings.CHAIN_MAX_PRIORITY_FEE_PER_GAS = settings.CHAIN_MAX_FEE_PER_GAS
    settings.CHAIN_REPLACE_AFTER = settings.CHAIN_REBROADCAST_AFTER = timedelta(0)
    escrow_chain.rpc("evm_setAutomine", [False])
    try:
        run(callbacks, capture)
        for _ in range(100):
            confirm_all(capture)  # bumps, then rebroadcasts the capped bytes; never an IntegrityError
            tx.refresh_from_db()
            if tx.fee_cap_reached_at is not None:
                break
        assert tx.stuck_at_fee_cap
        attempts = tx.attempts.count()
        confirm_all(capture)
        confirm_all(capture)
        assert tx.attempts.count() == attempts  # the same bytes, rebroadcast
        last = TxAttempt.objects.filter(transaction=tx).order_by("created_at").last()
        assert last.max_fee_per_gas == settings.CHAIN_MAX_FEE_PER_GAS and last.broadcast_error == ""

        get_user_model().objects.create_superuser("operator", "op@example.com", "pw")
        client = operator_client("operator", "pw")
        listing = client.get(reverse("admin:escrow_chaintransaction_changelist") + "?fee_cap_reached_at__isempty=0")
        assert listing.status_code == 200 and str(tx.pk) in listing.content.decode()
        assert scrape(client)[("marketplace_chain_transactions_stuck_at_fee_cap", (("purpose", "activate"),))] == 1
        escrow_chain.mine()
    finally:
        escrow_chain.rpc("evm_setAutomine", [True])
    confirm_all(capture)
    confirm_all(capture)
    tx.refresh_from_db()
    assert tx.status == TxStatus.CONFIRMED and tx.mined_tx_hash == last.tx_hash
    assert parties.agreement(agreement["id"])["status"] == "active"
    assert not scrape(client).get(("marketplace_chain_transactions_stuck_at_fee_cap", (("purpose", "activate"),)))


def test_an_activation_relayed_by_someone_else_makes_the_agreement_active(
        parties, escrow_chain, django_capture_on_commit_callbacks):
    capture = django_capture_on_commit_callbacks
    agreement, tx, callbacks = queue_activation(parties, capture)
    # Anyone holding the buyer's signed activation may submit it first; our own attempt meets AgreementExists.
    copy = escrow_chain.w3.eth.send_transaction({"from": escrow_chain.accounts.stranger.address,
                                                 "to": escrow_chain.addresses["escrow"], "data": tx.data,
                                                 "gas": 1_000_000})
    mined_what_was_sent()  # before our simulation reads the escrow (Anvil answers a send before it mines it)
    run(callbacks, capture)
    confirm_all(capture)

    tx.refresh_from_db()
    assert tx.status == TxStatus.FAILED and "AgreementExists" in tx.failure_reason
    assert tx.outcome_evidence["agreement_exists"] == {"state": "active", "differences": [],
                                                      "activated_by": "0x" + bytes(copy).hex()}
    body = parties.agreement(agreement["id"])
    assert body["status"] == "active" and body["activation_tx_hash"] == "0x" + bytes(copy).hex()


def test_another_escrow_of_the_buyer_under_the_same_id_fails_the_activation_with_the_reason(
        parties, escrow_chain, django_capture_on_commit_callbacks):
    """The buyer itself opened an escrow under the agreement's id on other terms (another intent it signed, sent
    to the contract directly): its escrow under the id is not the agreement's. (A third party's escrow under the id
    is its own and blocks nothing: tests/escrow/test_agreement_id_squatting.py.)"""
    capture = django_capture_on_commit_callbacks
    agreement, tx, callbacks = queue_activation(parties, capture)
    onchain_id = parties.agreement(agreement["id"])["onchain_id"]
    Escrows(escrow_chain).activate(agreement_id=onchain_id, buyer=parties.buyer_account)
    run(callbacks, capture)
    confirm_all(capture)

    body = parties.agreement(agreement["id"])
    assert body["status"] == "activation_failed"
    tx.refresh_from_db()
    assert "AgreementExists" in tx.failure_reason
    differences = tx.outcome_evidence["agreement_exists"]["differences"]
    assert "termsHash" in differences and "buyer" not in differences
    events = parties.buyer_api.get(f"/usage-agreements/{agreement['id']}/events").json()["results"]
    assert "another escrow holds this agreement id on-chain" in events[-1]["reason"]
    assert "termsHash" in events[-1]["reason"]


def test_a_throttled_rpc_call_holds_up_only_its_own_transaction(
        parties, escrow_chain, rpc_relay, django_capture_on_commit_callbacks):
    capture = django_capture_on_commit_callbacks
    third, fourth = parties.accepted_agreement(), parties.accepted_agreement()
    for agreement in (third, fourth):
        body = parties.signed_activation(agreement["id"])
        with capture(execute=True):  # submitted and mined, not yet polled
            response = parties.buyer_api.post(f"/usage-agreements/{agreement['id']}/activate-escrow", body)
        assert response.status_code == 202, response.content
    throttled = ChainTransaction.objects.get(agreement_id=third["id"]).attempts.get().tx_hash
    rpc_relay.throttle(lambda call: call["method"] == "eth_getTransactionReceipt" and call["params"][0] == throttled)

    confirm_all(capture)  # polled in creation order: the throttled one first
    assert rpc_relay.throttled_count >= 1
    assert parties.agreement(fourth["id"])["status"] == "active"
    assert parties.agreement(third["id"])["status"] == "submitting"

    rpc_relay.throttle(lambda call: False)
    confirm_all(capture)
    assert parties.agreement(third["id"])["status"] == "active"


def test_the_confirmation_depth_defaults_per_chain():
    from marketplace import settings as defaults

    assert defaults.CHAIN_CONFIRMATIONS_BY_CHAIN[31337] == 1
    assert defaults.CHAIN_CONFIRMATIONS_BY_CHAIN[8453] >= 10 and defaults.CHAIN_CONFIRMATIONS_BY_CHAIN[84532] >= 10


@pytest.mark.django_db(transaction=True)
def test_no_chain_call_is_made_inside_a_database_transaction(escrow_chain, rpc_relay, http_server):
    """Activation (with an Idempotency-Key), submission, confirmation, proposal and payout: while the node is
    asked anything, our database session holds no transaction (so no row lock waits on the node)."""
    parties = Parties(escrow_chain, upstream_base_url=http_server.url)
    agreement = parties.accepted_agreement(quantity=10)
    body = parties.signed_activation(agreement["id"])
    pid = backend_pid()
    asked_inside_a_transaction = []
    rpc_relay.observers.append(lambda call: session_state(pid) == "idle in transaction"
                               and asked_inside_a_transaction.append(call["method"]))

    response = parties.buyer_api.post(f"/usage-agreements/{agreement['id']}/activate-escrow", body,
                                      headers={"Idempotency-Key": "activate-once"})
    assert response.status_code == 202, response.content
    poll_mined()
    assert parties.agreement(agreement["id"])["status"] == "active"
    assert parties.buyer_api.get(f"/metered-proxy/{agreement['id']}/work").status_code == 200
    assert parties.buyer_api.post(f"/usage-agreements/{agreement['id']}/complete").status_code == 200
    settlement.settlement_tick()
    poll_mined()
    assert parties.agreement(agreement["id"])["status"] == "in_challenge"
    escrow_chain.increase_time(3601)
    settlement.settlement_tick()
    poll_mined()
    assert parties.agreement(agreement["id"])["status"] == "settled"
    assert asked_inside_a_transaction == []
