"""The chain indexer: contract calls made by anyone (not the platform's relayer) move the agreements, relayer
receipts and indexed events converge on one transition, and a reorg rolls back what it removed."""

import io

import pytest
from hexbytes import HexBytes
from django.core.management import call_command
from django.core.management.base import CommandError
from django.test import Client
from django.urls import reverse

from agreements.models import AgreementEvent, UsageAgreement
from escrow import chain as gateway
from escrow import indexer
from escrow.models import ChainEvent, ChainTransaction, EventEffect, IndexerCursor
from sdk import typed_data as td
from sdk.typed_data import sign_typed_data
from tests.conftest import error_code
from tests.escrow.flow import USDC, Parties, confirm_all, sign_activation, usdc_balance
from tests.escrow.conftest import escrow_terms
from tests.support.operators import form_as_shown, staff_account

pytestmark = [pytest.mark.chain, pytest.mark.django_db]


@pytest.fixture
def funded(escrow_chain, http_server, django_capture_on_commit_callbacks):
    """Active: 100 calls at 0.02 USDC (deposit 2 USDC) to a real upstream, activated by the platform relayer."""
    parties = Parties(escrow_chain, upstream_base_url=http_server.url)
    agreement = parties.accepted_agreement(quantity=100)
    parties.activate(agreement["id"], django_capture_on_commit_callbacks)
    parties.agreement_id = agreement["id"]
    parties.onchain_id = UsageAgreement.objects.get(pk=agreement["id"]).onchain_id
    return parties


def index(capture):
    with capture(execute=True):
        return indexer.index_pass()


def call_n(parties, n):
    for _ in range(n):
        response = parties.buyer_api.get(f"/metered-proxy/{parties.agreement_id}/work")
        assert response.status_code == 200, response.content


def seller_proposes_directly(parties, chain, *, seq: int | None = None):
    """The seller sends proposeSettlement itself, with a receipt the platform signed for the buyer's calls."""
    events = parties.buyer_api.get(f"/usage-agreements/{parties.agreement_id}/usage").json()["results"]
    last = max(events, key=lambda event: event["seq"]) if seq is None else next(
        event for event in events if event["seq"] == seq)
    mined(chain, chain.escrow.functions.proposeSettlement(
        parties.onchain_id, escrow_terms(chain.escrow, parties.onchain_id), last["seq"], last["cumulative_atomic"], last["usage_digest"], last["receipt_signature"],
    ).transact({"from": parties.seller_account.address}))
    return last


def mined(chain, tx_hash) -> None:
    assert chain.w3.eth.wait_for_transaction_receipt(tx_hash, poll_latency=0.01)["status"] == 1


def statuses(agreement_id) -> list[tuple[str, str]]:
    return list(AgreementEvent.objects.filter(agreement_id=agreement_id).order_by("created_at", "pk")
                .values_list("from_status", "to_status"))


def test_seller_proposes_directly_then_buyer_challenges_through_the_api(funded, escrow_chain,
                                                                        django_capture_on_commit_callbacks):
    chain, capture = escrow_chain, django_capture_on_commit_callbacks
    call_n(funded, 3)
    proposed = seller_proposes_directly(funded, chain)

    result = index(capture)
    assert result.events >= 1 and not result.skipped
    agreement = funded.agreement(funded.agreement_id)
    assert agreement["status"] == "in_challenge" and agreement["challenge_deadline"]
    event = ChainEvent.objects.get(agreement_id=funded.agreement_id, name="SettlementProposed")
    assert (event.effect, event.from_status, event.to_status) == (EventEffect.APPLIED, "active", "in_challenge")
    assert int(event.args["cumulativeAmount"]) == proposed["cumulative_atomic"] == 60_000
    # The metered proxy stops charging at once.
    refused = funded.buyer_api.get(f"/metered-proxy/{funded.agreement_id}/work")
    assert refused.status_code == 409 and error_code(refused) == "agreement_not_active"

    package = funded.buyer_api.get(f"/usage-agreements/{funded.agreement_id}/challenge-package").json()
    body = {"reason": "I did not ask for the third call", "deadline": package["deadline"],
            "signature": sign_typed_data(funded.buyer_account.key, package["challenge"])}
    with capture(execute=True):
        assert funded.buyer_api.post(f"/usage-agreements/{funded.agreement_id}/challenge", body).status_code == 202
    confirm_all(capture)
    assert funded.agreement(funded.agreement_id)["status"] == "disputed"
    assert funded.buyer_api.get(f"/metered-proxy/{funded.agreement_id}/work").status_code == 409

    # The indexer then sees the relayer's own Challenged: already applied, nothing moves twice.
    index(capture)
    challenged = ChainEvent.objects.get(agreement_id=funded.agreement_id, name="Challenged")
    assert challenged.effect == EventEffect.ALREADY
    assert statuses(funded.agreement_id)[-3:] == [("submitting", "active"), ("active", "in_challenge"),
                                                  ("in_challenge", "disputed")]
    assert index(capture).events == 0  # a pass with nothing new is a no-op
    call_command("reconcile")


def test_buyer_reclaims_directly_after_expiry(funded, escrow_chain, django_capture_on_commit_callbacks):
    chain, capture = escrow_chain, django_capture_on_commit_callbacks
    balance = usdc_balance(chain, funded.buyer_account.address)
    expires_at = int(UsageAgreement.objects.get(pk=funded.agreement_id).expires_at.timestamp())
    chain.increase_time(expires_at + chain.reclaim_grace - chain.now() + 1)
    mined(chain, chain.escrow.functions.reclaim(funded.onchain_id, escrow_terms(chain.escrow, funded.onchain_id)).transact({"from": funded.buyer_account.address}))

    index(capture)
    refunded = funded.agreement(funded.agreement_id)
    assert refunded["status"] == "refunded" and refunded["buyer_refund_atomic"] == 2 * USDC
    assert usdc_balance(chain, funded.buyer_account.address) == balance + 2 * USDC
    # The token's transfer out of the escrow is indexed beside the escrow's event.
    transfer = ChainEvent.objects.get(name="Transfer", args__to=funded.buyer_account.address)
    assert int(transfer.args["value"]) == 2 * USDC and transfer.args["from"] == chain.addresses["escrow"]
    call_command("reconcile")


def test_anyone_finalizes_after_the_window(funded, escrow_chain, django_capture_on_commit_callbacks):
    chain, capture = escrow_chain, django_capture_on_commit_callbacks
    call_n(funded, 5)
    seller_proposes_directly(funded, chain)
    index(capture)
    chain.increase_time(3601)
    terms = escrow_terms(chain.escrow, funded.onchain_id)
    mined(chain, chain.escrow.functions.finalize(funded.onchain_id, terms).transact(
        {"from": chain.accounts.stranger.address}))

    index(capture)
    settled = funded.agreement(funded.agreement_id)
    assert settled["status"] == "settled"
    assert (settled["seller_payout_atomic"], settled["buyer_refund_atomic"]) == (100_000, 1_900_000)
    assert statuses(funded.agreement_id)[-3:] == [("active", "in_challenge"), ("in_challenge", "settling"),
                                                  ("settling", "settled")]
    assert ChainEvent.objects.get(name="Settled").from_status == "in_challenge"
    call_command("reconcile", stdout=io.StringIO())


def test_activation_relayed_by_someone_else_and_the_relayer_receipt_converge(
        escrow_chain, http_server, django_capture_on_commit_callbacks):
    """The indexer sees the activation before the relayer polls its receipt: one transition, whichever first."""
    chain, capture = escrow_chain, django_capture_on_commit_callbacks
    parties = Parties(chain, upstream_base_url=http_server.url)
    agreement = parties.accepted_agreement(quantity=10)
    with capture(execute=True):
        response = parties.buyer_api.post(f"/usage-agreements/{agreement['id']}/activate-escrow",
                                          parties.signed_activation(agreement["id"]))
    assert response.status_code == 202
    mined(chain, UsageAgreement.objects.get(pk=agreement["id"]).activation_tx_hash)
    index(capture)  # the relayer's transaction is mined, its receipt not polled yet
    assert parties.agreement(agreement["id"])["status"] == "active"
    confirm_all(capture)
    assert parties.agreement(agreement["id"])["status"] == "active"
    assert [to for _, to in statuses(agreement["id"])].count("active") == 1


def test_relayer_receipt_after_the_agreement_moved_on_is_a_no_op(escrow_chain, http_server,
                                                                 django_capture_on_commit_callbacks):
    """The indexer applied the activation and the seller's proposal before the relayer polled its activation
    receipt: the late receipt must not try to move the agreement back (it used to raise invalid_transition)."""
    chain, capture = escrow_chain, django_capture_on_commit_callbacks
    parties = Parties(chain, upstream_base_url=http_server.url)
    agreement = parties.accepted_agreement(quantity=10)
    parties.agreement_id = agreement["id"]
    parties.onchain_id = UsageAgreement.objects.get(pk=agreement["id"]).onchain_id
    with capture(execute=True):
        parties.buyer_api.post(f"/usage-agreements/{agreement['id']}/activate-escrow",
                               parties.signed_activation(agreement["id"]))
    mined(chain, UsageAgreement.objects.get(pk=agreement["id"]).activation_tx_hash)
    index(capture)
    call_n(parties, 2)
    seller_proposes_directly(parties, chain)
    index(capture)
    confirm_all(capture)  # the activation receipt, late
    assert parties.agreement(agreement["id"])["status"] == "in_challenge"
    assert ChainTransaction.objects.get(agreement_id=agreement["id"]).status == "confirmed"


def test_buyer_intent_relayed_by_someone_else_activates(escrow_chain, http_server,
                                                        django_capture_on_commit_callbacks):
    """The buyer's signed package is sent to the contract by someone else, never through activate-escrow."""
    chain, capture = escrow_chain, django_capture_on_commit_callbacks
    parties = Parties(chain, upstream_base_url=http_server.url)
    agreement = parties.accepted_agreement(quantity=10)
    package = parties.buyer_api.get(f"/usage-agreements/{agreement['id']}/activation-package").json()
    signed = sign_activation(chain, package, parties.agreement(agreement["id"]), parties.buyer_account.key)
    permit = signed["escrow_permit"]  # one permit: deposit + fee
    mined(chain, chain.escrow.functions.activate(
        td.message_tuple(package["intent"]), signed["intent_signature"],
        td.onchain_permit(value=permit["value"], deadline=permit["deadline"], signature=permit["signature"]),
        td.EMPTY_PERMIT,
    ).transact({"from": chain.accounts.stranger.address, "gas": 1_000_000}))

    index(capture)
    active = parties.agreement(agreement["id"])
    assert active["status"] == "active"
    assert statuses(agreement["id"])[-2:] == [("accepted", "submitting"), ("submitting", "active")]
    assert parties.buyer_api.get(f"/metered-proxy/{agreement['id']}/work").status_code == 200
    call_command("reconcile", stdout=io.StringIO())


def test_reorg_removing_a_proposal_rolls_back_and_applies_the_canonical_events(
        funded, escrow_chain, django_capture_on_commit_callbacks):
    chain, capture = escrow_chain, django_capture_on_commit_callbacks
    call_n(funded, 4)
    before_proposal = chain.snapshot()
    seller_proposes_directly(funded, chain)
    index(capture)
    assert funded.agreement(funded.agreement_id)["status"] == "in_challenge"

    # A different history from the snapshot on: empty blocks, then the seller proposes an older receipt.
    chain.reorg(before_proposal)
    chain.mine(3)
    result = index(capture)
    assert result.rolled_back == 1
    agreement = funded.agreement(funded.agreement_id)
    assert agreement["status"] == "active" and agreement["challenge_deadline"] is None
    assert ChainEvent.objects.get(name="SettlementProposed").removed_at is not None
    assert funded.buyer_api.get(f"/metered-proxy/{funded.agreement_id}/work").status_code == 200  # on-chain: Active

    older = seller_proposes_directly(funded, chain, seq=2)
    index(capture)
    agreement = funded.agreement(funded.agreement_id)
    assert agreement["status"] == "in_challenge"
    live = ChainEvent.objects.get(name="SettlementProposed", removed_at=None)
    assert int(live.args["cumulativeAmount"]) == older["cumulative_atomic"] == 40_000
    assert statuses(funded.agreement_id)[-3:] == [("active", "in_challenge"), ("in_challenge", "active"),
                                                  ("active", "in_challenge")]


# --- visibility: unapplied events, lag in reconcile, /readyz and the Prometheus gauge ----------------------------

def test_an_event_that_cannot_be_applied_is_kept_with_its_error(escrow_chain, http_server, esc,
                                                                django_capture_on_commit_callbacks, admin_client):
    """The buyer opens an escrow under an accepted agreement's id with an intent of its own, on other terms: not
    the agreement's intent. (A third party's escrow under the id is not the agreement's at all, and is only
    recorded: tests/escrow/test_agreement_id_squatting.py.)"""
    parties = Parties(escrow_chain, upstream_base_url=http_server.url)
    agreement = parties.accepted_agreement(quantity=10)
    onchain_id = UsageAgreement.objects.get(pk=agreement["id"]).onchain_id
    esc.activate(agreement_id=onchain_id, buyer=parties.buyer_account)

    index(django_capture_on_commit_callbacks)
    assert parties.agreement(agreement["id"])["status"] == "accepted"
    failed = ChainEvent.objects.get(name="Activated")
    assert failed.effect == EventEffect.FAILED
    assert failed.error == ("escrow_mismatch: The escrow under this agreement's id is not its buyer's intent "
                            "(depositAmount, infraFee, challengeWindow, expiresAt, termsHash differ).")
    with pytest.raises(CommandError, match="1 mismatch"):
        call_command("reconcile", stdout=io.StringIO())
    page = admin_client.get(reverse("admin:escrow_chainevent_changelist") + "?effect=failed")
    assert page.status_code == 200 and "Activated" in page.content.decode()
    assert admin_client.get(reverse("admin:escrow_chainevent_change", args=[failed.pk])).status_code == 200
    assert admin_client.get(reverse("admin:escrow_chainevent_add")).status_code == 403


def test_an_operator_acknowledges_unapplied_events_in_the_admin_or_with_reconcile(
        escrow_chain, http_server, esc, django_capture_on_commit_callbacks, admin_client, admin_user):
    """Acknowledged events stay listed (admin, reconcile) with who, when and why, and no longer fail reconcile."""
    parties = Parties(escrow_chain, upstream_base_url=http_server.url)
    for _ in range(2):  # the buyer's escrows on terms of its own under two accepted agreements' ids
        agreement = parties.accepted_agreement(quantity=10)
        esc.activate(agreement_id=UsageAgreement.objects.get(pk=agreement["id"]).onchain_id,
                     buyer=parties.buyer_account)
    index(django_capture_on_commit_callbacks)
    first, second = ChainEvent.objects.filter(name="Activated", effect=EventEffect.FAILED).order_by("block_number")
    with pytest.raises(CommandError, match="2 mismatch"):
        call_command("reconcile", stdout=io.StringIO())

    changelist = reverse("admin:escrow_chainevent_changelist")
    selected = {"action": "acknowledge_failed", "_selected_action": [first.pk]}
    asked = admin_client.post(changelist, selected)
    assert asked.status_code == 200 and "Failed events to acknowledge" in asked.content.decode()
    assert first.error.startswith("escrow_mismatch") and "escrow_mismatch" in asked.content.decode()
    no_reason = admin_client.post(changelist, {**form_as_shown(asked.content.decode(), "acknowledge-form"), "reason": "  "})
    assert no_reason.status_code == 200 and "This field is required" in no_reason.content.decode()
    first.refresh_from_db()
    assert first.acknowledged_at is None
    done = admin_client.post(changelist, {**form_as_shown(asked.content.decode(), "acknowledge-form"), "reason": "the buyer's own escrow"})
    assert done.status_code == 302
    first.refresh_from_db()
    assert (first.acknowledged_by, first.acknowledgement_reason) == (admin_user.username, "the buyer's own escrow")
    assert first.acknowledged_at is not None and first.effect == EventEffect.FAILED
    with pytest.raises(CommandError, match="1 mismatch"):  # the other one still fails
        call_command("reconcile", stdout=io.StringIO())

    with pytest.raises(CommandError, match="reason_required"):
        call_command("reconcile", "--acknowledge", str(second.pk), "--operator", staff_account(),
                     stdout=io.StringIO())
    out = io.StringIO()
    call_command("reconcile", "--acknowledge", str(second.pk), "--reason", "seen", "--operator", staff_account(),
                 stdout=out)
    assert "Acknowledged 1 unapplied event(s)." in out.getvalue() and "Consistent" in out.getvalue()
    assert "acknowledged by ops at " in out.getvalue() and f"acknowledged by {admin_user.username} at" in out.getvalue()
    # Still visible in the admin, filtered as acknowledged.
    page = admin_client.get(changelist + "?effect=failed&acknowledged_at__isnull=False")
    assert page.status_code == 200 and page.content.decode().count("Activated") >= 2


@pytest.mark.django_db(transaction=True)  # /readyz checks on connections of their own
def test_lag_in_reconcile_readyz_and_metrics(escrow_chain, settings, admin_client):
    settings.INDEXER_MAX_LAG_BLOCKS = 5
    escrow_chain.mine(10)
    out = io.StringIO()
    call_command("reconcile", stdout=out)
    head = escrow_chain.block_number()
    behind = head - escrow_chain.addresses["escrow_block"] + 1
    assert f"chain head {head}: {behind} block(s) behind" in out.getvalue()
    not_ready = Client().get("/readyz")
    assert not_ready.status_code == 503
    assert not_ready.json()["error"]["details"]["failed"] == ["indexer"]
    assert f"marketplace_indexer_lag_blocks {behind}.0" in admin_client.get("/metrics").content.decode()

    indexer.index_pass()
    out = io.StringIO()
    call_command("reconcile", stdout=out)
    assert f"applied up to block {head}, chain head {head}: 0 block(s) behind" in out.getvalue()
    assert Client().get("/readyz").status_code == 200
    assert "marketplace_indexer_lag_blocks 0.0" in admin_client.get("/metrics").content.decode()


def test_indexing_stops_at_the_confirmation_depth_and_the_tagged_block(escrow_chain, settings):
    escrow_chain.mine(80)
    head = escrow_chain.block_number()
    settings.INDEXER_HEAD_TAG = "finalized"  # Anvil: 64 blocks behind the head
    finalized = escrow_chain.w3.eth.get_block("finalized")["number"]
    assert finalized < head - 2
    assert indexer.index_pass().indexed_to == finalized
    settings.INDEXER_HEAD_TAG = ""
    settings.CHAIN_CONFIRMATIONS = 3
    assert indexer.index_pass().indexed_to == head - 2


def test_a_node_behind_that_has_not_the_indexed_block_yet_is_no_reorg(
        funded, escrow_chain, monkeypatch, django_capture_on_commit_callbacks):
    """A load-balanced provider: the backend asked for the indexer's last block is a few blocks behind the one it
    indexed from, and has no block at that height yet. That is no reorg (no other block holds the height): the
    agreement is not moved back and forth, nor its events removed and applied again."""
    chain, capture = escrow_chain, django_capture_on_commit_callbacks
    call_n(funded, 4)
    seller_proposes_directly(funded, chain)
    indexed = index(capture)
    assert funded.agreement(funded.agreement_id)["status"] == "in_challenge"
    transitions = statuses(funded.agreement_id)

    behind = indexed.indexed_to - 2
    canonical_block_hash = gateway.canonical_block_hash
    monkeypatch.setattr(gateway, "canonical_block_hash",
                        lambda number: canonical_block_hash(number) if number <= behind else None)
    chain.mine(2)
    assert index(capture).rolled_back == 0
    monkeypatch.undo()
    chain.mine(2)
    assert index(capture).rolled_back == 0
    assert funded.agreement(funded.agreement_id)["status"] == "in_challenge"
    assert statuses(funded.agreement_id) == transitions
    assert not ChainEvent.objects.exclude(removed_at=None).exists()


def test_the_newest_blocks_are_read_by_hash_which_a_node_behind_refuses_rather_than_answering_empty(
        funded, escrow_chain, monkeypatch, django_capture_on_commit_callbacks, settings):
    """A load-balanced provider whose eth_getLogs backend is behind the one that named the range's last block, and
    no rescan below the cursor (or one shorter than that backend's lag): a range answered with the logs of the blocks
    that backend has lost the seller's proposal for good. The newest blocks are read by block hash, which a node
    without the block refuses (geth: "unknown block"): the pass fails, nothing moves, and the next one applies it."""
    chain, capture = escrow_chain, django_capture_on_commit_callbacks
    settings.INDEXER_RESCAN_BLOCKS = 0
    call_n(funded, 4)
    index(capture)
    seller_proposes_directly(funded, chain)
    has_up_to = chain.w3.eth.block_number - 1
    known = {gateway.canonical_block_hash(number) for number in range(has_up_to + 1)}
    logs, block_logs = gateway.logs, getattr(gateway, "block_logs", None)

    def logs_of_a_node_behind(*, address, from_block, to_block, topics=None):
        if from_block > has_up_to:
            return []
        return logs(address=address, from_block=from_block, to_block=min(to_block, has_up_to), topics=topics)

    def block_logs_of_a_node_behind(*, block_hash, addresses):
        if block_hash not in known:
            raise gateway.RpcUnavailable("unknown block")
        return block_logs(block_hash=block_hash, addresses=addresses)

    monkeypatch.setattr(gateway, "logs", logs_of_a_node_behind)
    monkeypatch.setattr(gateway, "block_logs", block_logs_of_a_node_behind, raising=False)
    try:
        index(capture)
    except gateway.ChainError:
        pass
    monkeypatch.undo()
    chain.mine(2)
    index(capture)
    assert funded.agreement(funded.agreement_id)["status"] == "in_challenge"
    assert ChainEvent.objects.filter(agreement_id=funded.agreement_id, name="SettlementProposed").count() == 1


def test_logs_a_node_behind_had_not_yet_are_applied_once_it_has_them(
        funded, escrow_chain, monkeypatch, django_capture_on_commit_callbacks, settings):
    """A load-balanced provider: the backend answering eth_getLogs is behind the one that named the range's last
    block, and answers the range with the logs of the blocks it has. The seller's proposal in a block it does not
    have yet must still be applied once it does, not skipped for good (ranges only: the rescan below the cursor)."""
    chain, capture = escrow_chain, django_capture_on_commit_callbacks
    settings.INDEXER_LOGS_BY_HASH_BLOCKS = 0
    call_n(funded, 4)
    index(capture)
    seller_proposes_directly(funded, chain)
    has_up_to = chain.w3.eth.block_number - 1
    logs = gateway.logs

    def logs_of_a_node_behind(*, address, from_block, to_block, topics=None):
        if from_block > has_up_to:
            return []
        return logs(address=address, from_block=from_block, to_block=min(to_block, has_up_to), topics=topics)

    monkeypatch.setattr(gateway, "logs", logs_of_a_node_behind)
    index(capture)
    monkeypatch.undo()
    chain.mine(2)
    index(capture)
    assert funded.agreement(funded.agreement_id)["status"] == "in_challenge"


def test_zero_value_transfers_anyone_makes_to_or_from_watched_addresses_are_not_stored(escrow_chain, settings):
    """A token Transfer of 0 costs a stranger only gas (`transfer(treasury, 0)`, and `transferFrom(treasury, x, 0)`
    needs no allowance): stored, every one was a row (and an indexed block) per log for ever, moving nothing."""
    chain, stranger = escrow_chain, escrow_chain.accounts.stranger.address
    watched = [chain.addresses["escrow"], chain.accounts.deployer.address, chain.accounts.fee_recipient.address]
    for address in watched:
        mined(chain, chain.usdc.functions.transfer(address, 0).transact({"from": stranger}))
        mined(chain, chain.usdc.functions.transferFrom(address, stranger, 0).transact({"from": stranger}))
    mined(chain, chain.usdc.functions.mint(stranger, 1).transact({"from": chain.accounts.deployer.address}))
    mined(chain, chain.usdc.functions.transfer(chain.addresses["escrow"], 1).transact({"from": stranger}))

    indexer.index_pass()
    assert [int(event.args["value"]) for event in ChainEvent.objects.filter(name="Transfer")] == [1]


def test_transfers_of_a_replaced_relayer_wallet_kept_in_the_retired_keys_are_stored(escrow_chain, settings):
    """The relayer wallet is the treasury: after RELAYER_PRIVATE_KEY is replaced, what its old wallet still pays (the
    transactions it had in flight, signed by its key kept in RELAYER_RETIRED_PRIVATE_KEYS) moves the treasury's money,
    and the indexer watched the new wallet only."""
    chain, stranger = escrow_chain, escrow_chain.accounts.stranger.address
    old_key = settings.RELAYER_PRIVATE_KEY
    settings.RELAYER_PRIVATE_KEY, settings.RELAYER_RETIRED_PRIVATE_KEYS = chain.accounts.spare.key, [old_key]
    mined(chain, chain.usdc.functions.mint(chain.accounts.deployer.address, 5).transact(
        {"from": chain.accounts.deployer.address}))
    mined(chain, chain.usdc.functions.transfer(stranger, 3).transact({"from": chain.accounts.deployer.address}))

    indexer.index_pass()
    assert 3 in [int(event.args["value"]) for event in ChainEvent.objects.filter(name="Transfer")]


def _node_answering_get_logs(monkeypatch, answer):
    """The node's eth_getLogs (the web3 call the gateway makes) answered by `answer(query, honest)`."""
    eth = gateway.w3().eth
    honest = eth.get_logs
    monkeypatch.setattr(eth, "get_logs", lambda query: answer(query, honest))


@pytest.mark.parametrize("hostility", ["beyond_the_range", "removed", "another_block_by_hash",
                                       "another_block_in_a_range"])
def test_logs_a_node_answers_that_the_query_did_not_ask_for_are_not_applied(
        funded, escrow_chain, monkeypatch, django_capture_on_commit_callbacks, settings, hostility):
    """A buggy or hostile node's eth_getLogs answer: logs of blocks past the range asked (toBlock ignored: the
    seller's proposal in a block not yet at the confirmation depth), a log marked removed (of a block reorged out),
    or, for a query by block hash or a range, the logs of another block (a stale fork's at that height: a
    load-balanced provider's backend on the fork a reorg left; over a range, the log was stored under that block, which
    the reorg check never compared with the chain's, and stayed applied). Applied, the proposal
    moved the agreement on a block the indexer never checks for a reorg (past its cursor) or that is not the chain's. The answer is refused: the pass fails, nothing moves,
    and the honest answer of a later pass is applied."""
    chain, capture = escrow_chain, django_capture_on_commit_callbacks
    settings.INDEXER_LOGS_BY_HASH_BLOCKS = 16 if hostility == "another_block_by_hash" else 0
    call_n(funded, 4)
    index(capture)
    if hostility == "beyond_the_range":
        settings.CHAIN_CONFIRMATIONS = 3
        chain.mine(5)  # blocks to index below the proposal's, which is not at the confirmation depth yet
    seller_proposes_directly(funded, chain)

    def hostile(query, honest):
        if hostility == "beyond_the_range":
            return honest({**query, "toBlock": "latest"})
        if hostility == "removed":
            return [{**log, "removed": True} for log in honest(query)]
        # A block asked by hash, or a range, answered with the logs of another block at their height (a stale fork's).
        return [{**log, "blockHash": HexBytes("0x" + "11" * 32)} for log in honest(query)]

    _node_answering_get_logs(monkeypatch, hostile)
    with pytest.raises(gateway.ChainError):
        index(capture)
    assert funded.agreement(funded.agreement_id)["status"] == "active"
    assert not ChainEvent.objects.filter(name="SettlementProposed").exists()
    monkeypatch.undo()
    chain.mine(3)
    index(capture)
    assert funded.agreement(funded.agreement_id)["status"] == "in_challenge"
    assert ChainEvent.objects.filter(name="SettlementProposed").count() == 1


def test_a_node_of_another_chain_than_chain_id_is_not_indexed(
        funded, escrow_chain, settings, django_capture_on_commit_callbacks):
    """CHAIN_RPC_URL naming a node of another chain than CHAIN_ID (a provider's URL for the testnet, the contracts
    at the same addresses there: deployed by the same key at the same nonces): its events were applied to this
    chain's agreements (a proposal or a settlement that never happened here). The node's chain id is checked
    first: the pass fails loudly, says why on the cursor, and applies nothing."""
    chain, capture = escrow_chain, django_capture_on_commit_callbacks
    call_n(funded, 4)
    seller_proposes_directly(funded, chain)
    settings.CHAIN_ID = 8453  # the node is Anvil's 31337
    with pytest.raises(gateway.ChainError, match="chain id"):
        index(capture)
    assert funded.agreement(funded.agreement_id)["status"] == "active"
    assert not ChainEvent.objects.filter(name="SettlementProposed").exists()
    assert "chain id" in IndexerCursor.objects.get(chain_id=8453).last_error


@pytest.mark.parametrize("hostility", ["null_hash", "missing_hash", "another_number"])
def test_a_node_answering_the_cursors_block_without_its_hash_or_of_another_height_is_an_error_the_cursor_shows(
        escrow_chain, settings, hostility):
    """A node (or a proxy mixing its answers up) answers the lookup of the indexer's last block with a block whose
    hash is null or missing, or with the block of another height. The hash was read outside the gateway's error
    mapping: KeyError or AttributeError ended the pass with nothing on the cursor; and another height's block,
    taken for the one asked, passed for a reorg and rolled the indexer back to apply its events again. Such an
    answer is UntrustedAnswer (a node's failure, retried by the beat), recorded on the cursor; nothing moves."""
    from tests.support.rpc_relay import RpcRelay

    chain = escrow_chain
    indexed = indexer.index_pass().indexed_to
    chain.mine(2)
    relay = RpcRelay(chain.node.rpc_url).start()
    settings.CHAIN_RPC_URL, settings.CHAIN_RPC_RETRY_BACKOFF = relay.url, 0.01
    try:
        def hostile(answer):
            if hostility == "another_number":
                return {**answer, "result": relay.node("eth_getBlockByNumber", [hex(indexed - 1), False])}
            block = {key: value for key, value in answer["result"].items() if key != "hash"}
            return {**answer, "result": block if hostility == "missing_hash" else {**block, "hash": None}}

        relay.rewrite(lambda call: call.get("method") == "eth_getBlockByNumber" and call["params"][0] == hex(indexed),
                      hostile)
        with pytest.raises(gateway.UntrustedAnswer):
            indexer.index_pass()
    finally:
        relay.stop()
    cursor = IndexerCursor.objects.get()
    assert cursor.last_error.startswith("UntrustedAnswer") and cursor.last_block == indexed


@pytest.mark.parametrize("refusal", [(-32005, "query returned more than 10000 results"),
                                     (-32600, "eth_getLogs is limited to a 8 range"),
                                     (-32000, "exceed maximum block range: 8"),
                                     (-32602, "query exceeds max results 20000, retry with the range 24383075-24383096"),
                                     (-32005, "logs matched by query exceeds limit of 10000")],
                         ids=["too_many_results", "range_limit", "block_range_exceeded", "reth_max_results",
                              "results_limit"])
def test_a_range_the_node_refuses_as_too_large_is_read_in_halves_not_retried_for_ever(
        funded, escrow_chain, settings, django_capture_on_commit_callbacks, refusal):
    """Providers refuse an eth_getLogs whose range or answer is over their cap (Infura's -32005 "query returned
    more than 10000 results", Reth's "query exceeds max results 20000", which Base's public RPC answers: anyone can
    fill a range with token transfers of 1 unit to the treasury). The
    indexer asked the same range at every pass, failing each time: stalled for good, the seller's proposal never
    applied. A range refused as too large is read again in halves, down to one block; no block is skipped."""
    from tests.support.rpc_relay import RpcRelay

    chain, capture = escrow_chain, django_capture_on_commit_callbacks
    settings.INDEXER_LOGS_BY_HASH_BLOCKS, settings.INDEXER_BLOCK_RANGE, settings.INDEXER_RESCAN_BLOCKS = 0, 64, 0
    call_n(funded, 4)
    index(capture)
    chain.mine(20)
    seller_proposes_directly(funded, chain)
    chain.mine(20)
    relay = RpcRelay(chain.node.rpc_url).start()
    settings.CHAIN_RPC_URL = relay.url
    code, message = refusal

    def over_the_cap(call) -> bool:
        if call.get("method") != "eth_getLogs":
            return False
        query = call["params"][0]
        return int(query["toBlock"], 16) - int(query["fromBlock"], 16) + 1 > 8

    relay.rewrite(over_the_cap, lambda answer: {"jsonrpc": "2.0", "id": answer.get("id"),
                                                "error": {"code": code, "message": message}})
    try:
        result = index(capture)
    finally:
        relay.stop()
    assert result.indexed_to == chain.block_number()
    assert funded.agreement(funded.agreement_id)["status"] == "in_challenge"
    assert ChainEvent.objects.filter(name="SettlementProposed").count() == 1


def test_a_proposal_only_a_stale_backend_holds_is_not_applied_at_a_fresh_backends_depth(
        funded, escrow_chain, settings, django_capture_on_commit_callbacks):
    """A load-balanced provider: the backend answering the blocks and logs is still on a branch the chain dropped,
    the seller's proposal mined there at its head, and another names the head of the chain, grown 2 blocks past that
    height without it. The range up to the confirmation depth counted from that head ended at the proposal's block:
    the proposal was applied 1 block deep, on no chain (the agreement in challenge, its webhooks sent). Only blocks
    that descend from the range's last count towards its depth: the pass applies nothing, and a later one, once the
    blocks on top are there, applies it."""
    from escrow.tasks import index_chain
    from tests.support.rpc_relay import RpcRelay

    chain, capture = escrow_chain, django_capture_on_commit_callbacks
    settings.CHAIN_CONFIRMATIONS = 3
    call_n(funded, 4)
    chain.mine(3)
    index(capture)
    seller_proposes_directly(funded, chain)
    relay = RpcRelay(chain.node.rpc_url).start()
    node, settings.CHAIN_RPC_URL = settings.CHAIN_RPC_URL, relay.url
    relay.head_named_ahead(2)
    try:
        with capture(execute=True):
            index_chain()
    finally:
        relay.stop()
        settings.CHAIN_RPC_URL = node
    assert not ChainEvent.objects.filter(name="SettlementProposed").exists(), "applied on a head whose blocks lack it"
    assert funded.agreement(funded.agreement_id)["status"] == "active"
    chain.mine(2)
    index(capture)
    assert funded.agreement(funded.agreement_id)["status"] == "in_challenge"


def _dead_fork_proposal(funded, chain, capture):
    """The seller's proposal mined, then dropped by a reorg: (a relay to the node started, the proposal's height, the
    dropped block, its logs), as a backend still on that fork would answer them."""
    from tests.support.rpc_relay import RpcRelay

    call_n(funded, 4)
    index(capture)
    before_proposal = chain.snapshot()
    seller_proposes_directly(funded, chain)
    proposed_in = chain.block_number()
    relay = RpcRelay(chain.node.rpc_url).start()
    dead_block = relay.node("eth_getBlockByNumber", [hex(proposed_in), False])
    dead_logs = relay.node("eth_getLogs", [{"blockHash": dead_block["hash"]}])
    assert dead_logs
    chain.reorg(before_proposal)
    return relay, proposed_in, dead_block, dead_logs


def test_a_block_of_a_dead_fork_a_backend_behind_answers_among_the_newest_is_not_applied(
        funded, escrow_chain, settings, django_capture_on_commit_callbacks):
    """Following the head, the newest blocks are read one by one, by the hash the node gives for each height. A
    load-balanced provider's backend that has not followed a reorg yet answers one height with the block of the
    fork the chain left (the seller's proposal in it), the others, the range's last included, with the chain's:
    the dead fork's proposal was applied, in a block no reorg check compares again (the cursor's is canonical).
    The blocks read by hash must be a chain, each the parent of the next up to the range's last: else nothing
    is applied, and a later pass reads the chain's."""

    chain, capture = escrow_chain, django_capture_on_commit_callbacks
    relay, proposed_in, dead_block, dead_logs = _dead_fork_proposal(funded, chain, capture)
    chain.mine(2)
    settings.CHAIN_RPC_URL = relay.url
    relay.rewrite(lambda call: call.get("method") == "eth_getBlockByNumber" and call["params"][0] == hex(proposed_in),
                  lambda answer: {**answer, "result": dead_block})
    relay.rewrite(lambda call: call.get("method") == "eth_getLogs" and call["params"][0].get("blockHash") == dead_block[
        "hash"], lambda answer: {"jsonrpc": "2.0", "id": answer.get("id"), "result": dead_logs})
    try:
        try:
            index(capture)
        except gateway.ChainError:
            pass
        assert funded.agreement(funded.agreement_id)["status"] == "active"
        assert not ChainEvent.objects.filter(name="SettlementProposed").exists()
        relay.rewrite_none()
        assert index(capture).indexed_to == chain.block_number()
    finally:
        relay.stop()
    assert funded.agreement(funded.agreement_id)["status"] == "active"


def test_a_stale_backends_block_at_the_cursors_height_does_not_roll_back_what_the_chain_holds(
        funded, escrow_chain, settings, django_capture_on_commit_callbacks):
    """A load-balanced provider: one backend stuck on a branch the chain dropped answers the indexer's last block (and
    the one below, holding the seller's proposal on the chain) with that branch's blocks; the others, the blocks above
    included, are the chain's, which holds the proposal. Taken for a reorg, the proposal was rolled back (the agreement
    back to `active`: the metered proxy charging again, webhooks sent) though the chain still holds it. A block another
    answers at the cursor's height is a reorg only once the blocks from the fork point up to the confirmation depth
    above it are one chain: nothing is rolled back on the stale backend's word, and a real reorg is still followed."""
    from escrow.tasks import index_chain
    from tests.support.rpc_relay import RpcRelay

    chain, capture = escrow_chain, django_capture_on_commit_callbacks
    settings.CHAIN_CONFIRMATIONS = 3
    call_n(funded, 4)
    index(capture)
    fork = chain.block_number()
    before_fork = chain.snapshot()
    chain.increase_time(7)  # the dropped branch: blocks of other times, so other hashes than the chain's
    chain.mine(3)
    relay = RpcRelay(chain.node.rpc_url).start()
    dropped = {number: relay.node("eth_getBlockByNumber", [hex(number), False]) for number in (fork + 1, fork + 2)}
    chain.revert(before_fork)
    before_proposal = chain.snapshot()
    seller_proposes_directly(funded, chain)  # the chain: the proposal at fork + 1
    chain.mine(3)
    index(capture)
    assert IndexerCursor.objects.get().last_block == fork + 2
    assert funded.agreement(funded.agreement_id)["status"] == "in_challenge"

    node, settings.CHAIN_RPC_URL = settings.CHAIN_RPC_URL, relay.url
    for number, block in dropped.items():
        relay.rewrite(lambda call, number=number: call.get("method") == "eth_getBlockByNumber"
                      and call["params"][0] == hex(number), lambda answer, block=block: {**answer, "result": block})
    try:
        with capture(execute=True):
            index_chain()
    except gateway.ChainError:
        pass  # the dropped branch's logs are refused (the node has not that block): the pass fails, visibly
    finally:
        relay.stop()
        settings.CHAIN_RPC_URL = node
    assert ChainEvent.objects.get(name="SettlementProposed").removed_at is None, \
        "rolled back on a stale backend's block: the chain holds the proposal"
    assert funded.agreement(funded.agreement_id)["status"] == "in_challenge"
    assert ("in_challenge", "active") not in statuses(funded.agreement_id)

    # A real reorg taking the proposal is followed once the new branch is at the confirmation depth.
    chain.reorg(before_proposal)
    assert index(capture).rolled_back == 1
    assert funded.agreement(funded.agreement_id)["status"] == "active"
    assert ChainEvent.objects.get(name="SettlementProposed").removed_at is not None


def test_a_block_of_a_dead_fork_a_backend_behind_answers_inside_a_caught_up_range_is_not_applied(
        funded, escrow_chain, settings, django_capture_on_commit_callbacks):
    """Catching up over more than INDEXER_LOGS_BY_HASH_BLOCKS blocks, the indexer reads them as one eth_getLogs range
    and checked only that range's last block against the chain (and each log's block by its height). A load-balanced
    provider's backend that has not followed a reorg answers the range's logs with the seller's proposal of a block
    the chain dropped in the middle of it, and that height with the dropped block: the proposal was applied, stored
    under a block no reorg check compares again (the cursor's block is canonical), the agreement in challenge for
    good. Each block holding logs must be an ancestor of the range's last block, read by parent hashes."""

    chain, capture = escrow_chain, django_capture_on_commit_callbacks
    relay, proposed_in, dead_block, all_dead_logs = _dead_fork_proposal(funded, chain, capture)
    escrow = chain.escrow.address.lower()
    dead_logs = [log for log in all_dead_logs if log["address"].lower() == escrow]
    assert dead_logs
    chain.mine(settings.INDEXER_LOGS_BY_HASH_BLOCKS + 4)  # the next pass reads one range, not block by block

    def escrow_range_holding_the_dead_block(call) -> bool:
        query = call["params"][0] if call.get("method") == "eth_getLogs" else {}
        addresses = query.get("address") or []
        return ([address.lower() for address in ([addresses] if isinstance(addresses, str) else addresses)] == [escrow]
                and "fromBlock" in query
                and int(query["fromBlock"], 16) <= proposed_in <= int(query["toBlock"], 16))

    settings.CHAIN_RPC_URL = relay.url
    relay.rewrite(lambda call: call.get("method") == "eth_getBlockByNumber" and call["params"][0] == hex(proposed_in),
                  lambda answer: {**answer, "result": dead_block})
    relay.rewrite(escrow_range_holding_the_dead_block,
                  lambda answer: {**answer, "result": answer["result"] + dead_logs})
    try:
        with pytest.raises(gateway.UntrustedAnswer):
            index(capture)
        assert not ChainEvent.objects.filter(name="SettlementProposed").exists(), \
            "a dead fork's proposal applied from the middle of a range"
        assert funded.agreement(funded.agreement_id)["status"] == "active"
        relay.rewrite_none()
        assert index(capture).indexed_to == chain.block_number()
    finally:
        relay.stop()
    assert funded.agreement(funded.agreement_id)["status"] == "active"
    assert not ChainEvent.objects.filter(name="SettlementProposed").exists()


def test_a_stale_answer_below_the_fork_point_does_not_roll_back_events_the_new_branch_still_holds(
        funded, escrow_chain, settings, django_capture_on_commit_callbacks):
    """A reorg replaces the blocks above the indexer's block F (the seller's proposal, below F, stays on the chain).
    The fork point was found by asking the node each stored block's height, and a load-balanced provider's backend
    still on another fork answered F and the proposal's height with other blocks once: the walk went past both, to
    the block below, and the chain check above it, answered by the chain's backends, passed: the proposal was rolled
    back (the
    agreement `in_challenge → active`, the metered proxy charging again, webhooks sent) and applied again. The fork
    point is found walking down from the new branch's block by parent hashes, which every backend answers alike."""
    from tests.support.rpc_relay import RpcRelay

    chain, capture = escrow_chain, django_capture_on_commit_callbacks
    call_n(funded, 4)
    index(capture)
    seller_proposes_directly(funded, chain)
    proposed_in = chain.block_number()
    chain.mine(2)
    index(capture)
    fork = chain.block_number()
    before_fork = chain.snapshot()
    chain.increase_time(7)
    chain.mine(1)
    index(capture)
    assert IndexerCursor.objects.get().last_block == fork + 2
    assert funded.agreement(funded.agreement_id)["status"] == "in_challenge"
    chain.revert(before_fork)
    chain.increase_time(13)  # the new branch: blocks of other times, so other hashes
    chain.mine(1)

    relay = RpcRelay(chain.node.rpc_url).start()
    node, settings.CHAIN_RPC_URL = settings.CHAIN_RPC_URL, relay.url
    # The stale backend answers the first reads of the fork point's height and of the proposal's: other blocks.
    stale = {hex(number): {**relay.node("eth_getBlockByNumber", [hex(number), False]), "hash": "0x" + "ab" * 32}
             for number in (proposed_in, fork)}
    asked: list = []

    def first_read_of_a_stale_height(call) -> bool:
        if call.get("method") == "eth_getBlockByNumber" and call["params"][0] in stale:
            asked.append(call["params"][0])
            return asked.count(call["params"][0]) == 1
        return False

    relay.rewrite(first_read_of_a_stale_height,
                  lambda answer: {**answer, "result": stale[asked[-1]]})
    try:
        result = index(capture)
    finally:
        relay.stop()
        settings.CHAIN_RPC_URL = node
    assert result.rolled_back == 0, "events below the fork point rolled back"
    assert ChainEvent.objects.get(name="SettlementProposed").removed_at is None
    assert funded.agreement(funded.agreement_id)["status"] == "in_challenge"
    assert ("in_challenge", "active") not in statuses(funded.agreement_id)
    assert index(capture).indexed_to == chain.block_number()
    assert funded.agreement(funded.agreement_id)["status"] == "in_challenge"


@pytest.mark.parametrize("hostility", ["a_topic_dropped", "a_topic_added", "data_cut_short"])
def test_an_escrow_log_a_node_answers_malformed_is_refused_as_its_answer_and_shown_on_the_cursor(
        funded, escrow_chain, monkeypatch, django_capture_on_commit_callbacks, settings, hostility):
    """A buggy or hostile node answers the seller's proposal with a topic too few or too many (an indexed argument
    dropped or added) or its data cut short. The log was decoded while the range was applied, and the decoder's error
    (web3's MismatchedABI, LogTopicError, a decoding error: no chain error) ended the pass unrecorded: the cursor
    showed no error, the dashboard and `reconcile` nothing, and the indexer stalled at that range. Such an answer is
    the node's (UntrustedAnswer): refused whole, the error on the cursor, and the honest answer of a later pass
    applied."""
    chain, capture = escrow_chain, django_capture_on_commit_callbacks
    settings.INDEXER_LOGS_BY_HASH_BLOCKS = 0
    call_n(funded, 4)
    index(capture)
    seller_proposes_directly(funded, chain)

    def malformed(log):
        if hostility == "a_topic_dropped":
            return {**log, "topics": list(log["topics"])[:-1]}
        if hostility == "a_topic_added":
            return {**log, "topics": [*log["topics"], HexBytes("0x" + "22" * 32)]}
        return {**log, "data": HexBytes(bytes(log["data"])[:-7])}

    _node_answering_get_logs(monkeypatch, lambda query, honest: [malformed(log) for log in honest(query)])
    with pytest.raises(gateway.UntrustedAnswer):
        index(capture)
    assert IndexerCursor.objects.get().last_error.startswith("UntrustedAnswer")
    assert funded.agreement(funded.agreement_id)["status"] == "active"
    assert not ChainEvent.objects.filter(name="SettlementProposed").exists()
    monkeypatch.undo()
    index(capture)
    assert funded.agreement(funded.agreement_id)["status"] == "in_challenge"
    assert IndexerCursor.objects.get().last_error == ""


def test_a_reorg_below_the_cursor_a_stale_backend_hides_is_not_skipped_while_catching_up(
        funded, escrow_chain, settings, django_capture_on_commit_callbacks):
    """A reorg takes the seller's proposal and the indexer's last block with it; the indexer is then more than
    INDEXER_LOGS_BY_HASH_BLOCKS behind, so it reads the next range as one eth_getLogs. A load-balanced provider's
    backend still on the dropped branch answers the cursor's height with the dropped block: no reorg seen, and the
    range, whose last block and logs are the chain's, was applied on top: the cursor moved past the fork on the new
    branch, and the dropped proposal stayed applied for good (no reorg check compares its block again). The range's
    last block must descend from the cursor's, walked by parent hashes: else nothing is applied, and once the node's
    answers agree the reorg is followed."""
    from tests.support.rpc_relay import RpcRelay

    chain, capture = escrow_chain, django_capture_on_commit_callbacks
    call_n(funded, 4)
    index(capture)
    before_proposal = chain.snapshot()
    seller_proposes_directly(funded, chain)
    index(capture)
    cursor_block = IndexerCursor.objects.get().last_block
    assert funded.agreement(funded.agreement_id)["status"] == "in_challenge"
    relay = RpcRelay(chain.node.rpc_url).start()
    dropped = relay.node("eth_getBlockByNumber", [hex(cursor_block), False])
    chain.revert(before_proposal)
    chain.increase_time(11)  # the new branch: blocks of other times
    chain.mine(settings.INDEXER_LOGS_BY_HASH_BLOCKS + 4)

    node, settings.CHAIN_RPC_URL = settings.CHAIN_RPC_URL, relay.url
    relay.rewrite(lambda call: call.get("method") == "eth_getBlockByNumber" and call["params"][0] == hex(cursor_block),
                  lambda answer: {**answer, "result": dropped})
    try:
        try:
            index(capture)
        except gateway.ChainError:
            pass
        assert IndexerCursor.objects.get().last_block == cursor_block, "a range applied past a reorg not followed"
        relay.rewrite_none()
        assert index(capture).rolled_back == 1
    finally:
        relay.stop()
        settings.CHAIN_RPC_URL = node
    assert funded.agreement(funded.agreement_id)["status"] == "active"
    assert ChainEvent.objects.get(name="SettlementProposed").removed_at is not None
    assert index(capture).indexed_to == chain.block_number()


def test_logs_a_node_answers_duplicated_and_out_of_order_are_applied_once_in_the_chains_order(
        funded, escrow_chain, monkeypatch, django_capture_on_commit_callbacks, settings):
    """A node answering every eth_getLogs with each log twice, newest first: the seller's proposal is stored and
    applied once, and the cursor moves on."""
    chain, capture = escrow_chain, django_capture_on_commit_callbacks
    settings.INDEXER_LOGS_BY_HASH_BLOCKS = 0
    call_n(funded, 4)
    index(capture)
    seller_proposes_directly(funded, chain)
    _node_answering_get_logs(monkeypatch, lambda query, honest: list(reversed(honest(query))) * 2)
    assert index(capture).indexed_to == chain.block_number()
    assert ChainEvent.objects.filter(name="SettlementProposed").count() == 1
    assert funded.agreement(funded.agreement_id)["status"] == "in_challenge"
    assert statuses(funded.agreement_id).count(("active", "in_challenge")) == 1


def test_a_catch_up_walks_no_headers_of_ranges_deeper_than_the_reorg_window(
        funded, escrow_chain, settings, django_capture_on_commit_callbacks, monkeypatch):
    """A range read whole is checked by walking its blocks' headers down by parent hash (one node call a block): a
    stale backend's dead block inside it is not applied. Every range was walked, so a day's catch-up on Base (43,200
    blocks) read 43,200 headers, and a pass stopped after one range's walk. Deeper below the head than
    INDEXER_REORG_WINDOW_BLOCKS no reorg the indexer follows reaches: those ranges are read without the walk (each
    log's block checked by its height), and one pass catches up to the head."""
    chain, capture = escrow_chain, django_capture_on_commit_callbacks
    settings.INDEXER_LOGS_BY_HASH_BLOCKS, settings.INDEXER_BLOCK_RANGE, settings.INDEXER_RESCAN_BLOCKS = 0, 4, 0
    settings.INDEXER_REORG_WINDOW_BLOCKS = 8
    call_n(funded, 4)
    index(capture)
    seller_proposes_directly(funded, chain)
    chain.mine(60)
    walked = []
    parent_hash = gateway._parent_hash

    def counted(block_hash, height):
        walked.append(height)
        return parent_hash(block_hash, height)

    monkeypatch.setattr(gateway, "_parent_hash", counted)
    result = index(capture)
    assert result.indexed_to == chain.block_number() - max(settings.CHAIN_CONFIRMATIONS, 1) + 1
    assert funded.agreement(funded.agreement_id)["status"] == "in_challenge"
    assert len(walked) <= settings.INDEXER_REORG_WINDOW_BLOCKS + settings.INDEXER_BLOCK_RANGE, sorted(walked)
