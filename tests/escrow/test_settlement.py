"""Metering to money: complete → challenge window → settled; a dispute; a reclaim — balances checked on-chain."""

import importlib
import io
from datetime import timedelta

import pytest
from django.contrib.auth.models import Permission
from django.core.management import call_command
from django.core.management.base import CommandError, SystemCheckError

from agreements import metering
from agreements.models import CallIntent, UsageAgreement, WebhookDelivery
from escrow import chain as gateway
from escrow import relayer, selectors, settlement
from escrow.models import ChainEvent, ChainTransaction, EventEffect, TxPurpose, TxStatus
from sdk import receipts
from sdk.typed_data import sign_typed_data
from tests.chain_fixtures import TEST_RECLAIM_GRACE, TOKEN_NAMES
from tests.catalog.factories import UserFactory, issue_key, issue_owner_token
from tests.conftest import Api, error_code
from tests.escrow.conftest import Escrows, escrow_terms
from tests.escrow.flow import USDC, Parties, confirm_all, mined_what_was_sent, onchain_escrow, usdc_balance
from tests.escrow.test_indexer import index, statuses
from tests.escrow.test_relayer_faults import rpc_relay  # noqa: F401

pytestmark = [pytest.mark.chain, pytest.mark.django_db]


def tick(capture):
    with capture(execute=True):
        result = settlement.settlement_tick()
    confirm_all(capture)
    return result


@pytest.fixture
def funded(escrow_chain, http_server, django_capture_on_commit_callbacks):
    """Active: 100 calls at 0.02 USDC (deposit 2 USDC, fee 0.10) to a real upstream."""
    parties = Parties(escrow_chain, upstream_base_url=http_server.url)
    agreement = parties.accepted_agreement(quantity=100)
    parties.activate(agreement["id"], django_capture_on_commit_callbacks)
    parties.agreement_id = agreement["id"]
    parties.balances = {name: usdc_balance(escrow_chain, address) for name, address in {
        "buyer": parties.buyer_account.address, "seller": parties.seller_account.address,
        "fee": escrow_chain.accounts.fee_recipient.address}.items()}
    return parties


def staff_owner_api(*codenames: str) -> Api:
    """An owner token of a staff user holding only the escrow permissions named."""
    user = UserFactory(is_staff=True)
    user.user_permissions.add(*Permission.objects.filter(content_type__app_label="escrow", codename__in=codenames))
    return Api(issue_owner_token(user))


def call_n(parties, n):
    for _ in range(n):
        response = parties.buyer_api.get(f"/metered-proxy/{parties.agreement_id}/work")
        assert response.status_code == 200, response.content


@pytest.mark.parametrize("chain", TOKEN_NAMES, indirect=True)  # "USDC": Base Sepolia's name
def test_complete_challenge_window_settle(funded, escrow_chain, django_capture_on_commit_callbacks):
    chain, capture = escrow_chain, django_capture_on_commit_callbacks
    call_n(funded, 20)
    completed = funded.buyer_api.post(f"/usage-agreements/{funded.agreement_id}/complete")
    assert completed.status_code == 200 and completed.json()["completion_requested_at"]
    assert funded.buyer_api.get(f"/metered-proxy/{funded.agreement_id}/work").status_code == 409

    assert tick(capture)["proposed"] == 1
    agreement = funded.agreement(funded.agreement_id)
    assert agreement["status"] == "in_challenge" and agreement["challenge_deadline"]
    status = funded.buyer_api.get(f"/usage-agreements/{funded.agreement_id}/escrow-status",
                                  {"verify": "true"}).json()
    assert status["onchain"]["state"] == "proposed" and int(status["onchain"]["settledAmount"]) == 400_000
    assert tick(capture)["finalizing"] == 0  # the window is still open

    chain.increase_time(3601)
    assert tick(capture)["finalizing"] == 1
    settled = funded.agreement(funded.agreement_id)
    assert settled["status"] == "settled"
    assert (settled["seller_payout_atomic"], settled["buyer_refund_atomic"]) == (400_000, 1_600_000)
    assert usdc_balance(chain, funded.seller_account.address) == funded.balances["seller"] + 400_000
    assert usdc_balance(chain, funded.buyer_account.address) == funded.balances["buyer"] + 1_600_000
    assert usdc_balance(chain, chain.accounts.fee_recipient.address) == funded.balances["fee"]  # fee taken once
    assert usdc_balance(chain, chain.addresses["escrow"]) == 0
    assert tick(capture) == {"expired": 0, "proposed": 0, "finalizing": 0, "reclaiming": 0}
    call_command("reconcile")


def dispute(funded, chain, capture) -> None:
    """10 calls, completed by the seller, then challenged by the buyer with a signed challenge: `disputed`."""
    call_n(funded, 10)
    funded.seller_api.post(f"/usage-agreements/{funded.agreement_id}/complete")
    tick(capture)
    package = funded.buyer_api.get(f"/usage-agreements/{funded.agreement_id}/challenge-package").json()
    body = {"reason": "half of the answers were empty", "evidence": "call ids 3-7",
            "deadline": package["deadline"],
            "signature": sign_typed_data(funded.buyer_account.key, package["challenge"])}
    wrong = funded.buyer_api.post(f"/usage-agreements/{funded.agreement_id}/challenge",
                                  {**body, "signature": sign_typed_data(chain.accounts.stranger.key,
                                                                        package["challenge"])})
    assert wrong.status_code == 400 and error_code(wrong) == "wrong_signer"
    with capture(execute=True):
        assert funded.buyer_api.post(f"/usage-agreements/{funded.agreement_id}/challenge",
                                     body).status_code == 202
    confirm_all(capture)
    disputed = funded.agreement(funded.agreement_id)
    assert disputed["status"] == "disputed" and disputed["status_reason"] == "half of the answers were empty"


def test_an_escrow_named_a_receipt_signer_rotated_since_is_proposed_with_a_receipt_of_that_signer(
        funded, escrow_chain, django_capture_on_commit_callbacks, settings):
    # The escrow accepts only the receipt signer its activation named; the calls after a rotation are signed with the
    # new key, and a proposal of their last receipt reverted InvalidReceiptSignature until the reclaim: the seller
    # unpaid. The retired key, kept for that, signs the proposal's receipt.
    chain, capture = escrow_chain, django_capture_on_commit_callbacks
    call_n(funded, 2)
    retired = settings.RECEIPT_SIGNER_PRIVATE_KEY
    settings.RECEIPT_SIGNER_PRIVATE_KEY = chain.accounts.stranger.key
    settings.RECEIPT_SIGNER_RETIRED_PRIVATE_KEYS = [retired]
    call_n(funded, 3)
    assert funded.buyer_api.post(f"/usage-agreements/{funded.agreement_id}/complete").status_code == 200

    assert tick(capture)["proposed"] == 1
    assert funded.agreement(funded.agreement_id)["status"] == "in_challenge"
    status = funded.buyer_api.get(f"/usage-agreements/{funded.agreement_id}/escrow-status",
                                  {"verify": "true"}).json()
    assert status["onchain"]["state"] == "proposed" and int(status["onchain"]["settledAmount"]) == 100_000


def test_usage_after_a_rotation_is_signed_by_the_receipt_signer_the_escrow_names(
        funded, escrow_chain, django_capture_on_commit_callbacks, settings):
    # The buyer's SDK checks every receipt against the signer its escrow names on-chain: usage charged after a rotation
    # (proxied calls, the seller's report) must be signed by that retired key, kept for it, not by the new one.
    chain = escrow_chain
    call_n(funded, 2)
    retired = settings.RECEIPT_SIGNER_PRIVATE_KEY
    settings.RECEIPT_SIGNER_PRIVATE_KEY = chain.accounts.stranger.key
    settings.RECEIPT_SIGNER_RETIRED_PRIVATE_KEYS = [retired]
    call_n(funded, 3)
    assert funded.seller_api.post(f"/usage-agreements/{funded.agreement_id}/record-usage", {"units": 1},
                                  headers={"Idempotency-Key": "r1"}).status_code == 201

    usage = funded.buyer_api.get(f"/usage-agreements/{funded.agreement_id}/usage").json()["results"]
    agreement = UsageAgreement.objects.get(pk=funded.agreement_id)
    onchain_id = agreement.onchain_id
    escrow = onchain_escrow(chain, onchain_id)
    assert escrow.receipt_signer == chain.accounts.receipt_signer.address
    verified = receipts.verify_usage(usage, escrow=escrow, agreement_id=onchain_id, chain_id=chain.chain_id,
                                     escrow_address=chain.addresses["escrow"], price_per_unit=agreement.price_per_unit,
                                     pinned_receipt_signers=chain.accounts.receipt_signer.address)
    assert (verified.events, verified.last_signed_seq) == (6, 6)
    assert {event["receipt_signer"] for event in usage} == {chain.accounts.receipt_signer.address}


def test_escrows_naming_a_signer_whose_key_was_dropped_are_refused_loudly_not_signed_with_another_key(
        funded, escrow_chain, http_server, settings):
    # The old key dropped from RECEIPT_SIGNER_RETIRED_PRIVATE_KEYS while an escrow still names it: its calls were
    # charged with receipts of the new key, which neither the buyer's SDK nor the contract accepts, and nothing said
    # so until the settlement. Now the call is refused before any charge, and /readyz, `check --database` and
    # `reconcile` name the signer.
    from agreements import monitoring

    call_n(funded, 1)
    named = escrow_chain.accounts.receipt_signer.address
    settings.RECEIPT_SIGNER_PRIVATE_KEY = escrow_chain.accounts.stranger.key
    settings.RECEIPT_SIGNER_RETIRED_PRIVATE_KEYS = []
    forwarded = len(http_server.requests)
    refused = funded.buyer_api.get(f"/metered-proxy/{funded.agreement_id}/work")
    assert refused.status_code == 503 and error_code(refused) == "receipt_signer_key_missing", refused.content
    assert len(http_server.requests) == forwarded  # not served unpaid
    reported = funded.seller_api.post(f"/usage-agreements/{funded.agreement_id}/record-usage", {"units": 1},
                                      headers={"Idempotency-Key": "r1"})
    assert reported.status_code == 503 and error_code(reported) == "receipt_signer_key_missing", reported.content
    assert [event["seq"] for event in funded.buyer_api.get(
        f"/usage-agreements/{funded.agreement_id}/usage").json()["results"]] == [1]

    with pytest.raises(RuntimeError, match=f"1 open escrow.*{named}"):
        monitoring._receipt_signers_configured(1.0)
    with pytest.raises(SystemCheckError, match=f"agreements.E003.*{named}"):
        call_command("check", databases=["default"], stdout=io.StringIO())
    out = io.StringIO()
    with pytest.raises(CommandError):
        call_command("reconcile", stdout=out)
    assert f"name receipt signer {named}" in out.getvalue()

    settings.RECEIPT_SIGNER_RETIRED_PRIVATE_KEYS = [escrow_chain.accounts.receipt_signer.key]
    monitoring._receipt_signers_configured(1.0)
    assert funded.buyer_api.get(f"/metered-proxy/{funded.agreement_id}/work").status_code == 200


def test_an_activation_signed_before_a_rotation_and_mined_after_it_activates_the_agreement(
        escrow_chain, http_server, django_capture_on_commit_callbacks, settings):
    # The indexer held the escrow's receipt signer to the current key: an intent signed just before a rotation, mined
    # after it, was refused `escrow_mismatch` (receiptSigner) and the buyer's funded escrow never became active.
    capture = django_capture_on_commit_callbacks
    parties = Parties(escrow_chain, upstream_base_url=http_server.url)
    agreement = parties.accepted_agreement(quantity=10)
    body = parties.signed_activation(agreement["id"])
    with capture(execute=True):
        assert parties.buyer_api.post(f"/usage-agreements/{agreement['id']}/activate-escrow",
                                      body).status_code == 202
    settings.RECEIPT_SIGNER_RETIRED_PRIVATE_KEYS = [settings.RECEIPT_SIGNER_PRIVATE_KEY]
    settings.RECEIPT_SIGNER_PRIVATE_KEY = escrow_chain.accounts.stranger.key
    index(capture)  # the Activated event before the relayer's receipt
    confirm_all(capture)
    assert parties.agreement(agreement["id"])["status"] == "active"
    assert not ChainEvent.objects.filter(name="Activated", error__gt="").exists()


def test_a_malformed_retired_key_neither_stops_the_settlement_of_the_others_nor_goes_unreported(
        funded, escrow_chain, django_capture_on_commit_callbacks, settings):
    # An operator's typo in RECEIPT_SIGNER_RETIRED_PRIVATE_KEYS: every key lookup raised ValueError, so every
    # proposal (and the charge) failed for all escrows, the ones whose key is well-formed too.
    capture = django_capture_on_commit_callbacks
    call_n(funded, 2)
    retired = settings.RECEIPT_SIGNER_PRIVATE_KEY
    settings.RECEIPT_SIGNER_PRIVATE_KEY = escrow_chain.accounts.stranger.key
    settings.RECEIPT_SIGNER_RETIRED_PRIVATE_KEYS = ["0xnot-a-key", retired]
    call_n(funded, 1)
    assert funded.buyer_api.post(f"/usage-agreements/{funded.agreement_id}/complete").status_code == 200

    assert tick(capture)["proposed"] == 1
    assert funded.agreement(funded.agreement_id)["status"] == "in_challenge"
    with pytest.raises(SystemCheckError, match="marketplace.E001.*entry 1 is not a valid private key"):
        call_command("check", stdout=io.StringIO())


def test_the_migration_records_the_receipt_signer_of_agreements_activated_before_it_from_their_activated_event(
        funded, escrow_chain, django_capture_on_commit_callbacks):
    from django.apps import apps

    backfill = importlib.import_module("agreements.migrations.0023_agreement_receipt_signer")
    index(django_capture_on_commit_callbacks)
    UsageAgreement.objects.filter(pk=funded.agreement_id).update(receipt_signer="")
    backfill.receipt_signers_from_activations(apps, None)
    assert UsageAgreement.objects.get(pk=funded.agreement_id).receipt_signer == \
        escrow_chain.accounts.receipt_signer.address


def test_usage_signed_before_a_rotation_is_proposed_with_its_own_receipt(
        funded, escrow_chain, django_capture_on_commit_callbacks, settings):
    # The old key not kept: the books' receipt, signed before the rotation by the signer the escrow names, stands.
    capture = django_capture_on_commit_callbacks
    call_n(funded, 2)
    assert funded.buyer_api.post(f"/usage-agreements/{funded.agreement_id}/complete").status_code == 200
    settings.RECEIPT_SIGNER_PRIVATE_KEY = escrow_chain.accounts.stranger.key

    assert tick(capture)["proposed"] == 1
    assert funded.agreement(funded.agreement_id)["status"] == "in_challenge"


def test_dispute_resolved_by_an_operator(funded, escrow_chain, django_capture_on_commit_callbacks):
    chain, capture = escrow_chain, django_capture_on_commit_callbacks
    dispute(funded, chain, capture)

    chain.increase_time(3601)
    assert tick(capture)["finalizing"] == 0  # a dispute is not finalized by the clock before its timeout

    not_operator = funded.buyer_api.post(f"/usage-agreements/{funded.agreement_id}/resolve",
                                         {"seller_amount_atomic": 100_000})
    assert not_operator.status_code == 403
    operator = staff_owner_api("change_dispute")
    too_much = operator.post(f"/usage-agreements/{funded.agreement_id}/resolve",
                             {"seller_amount_atomic": 3 * USDC})
    assert too_much.status_code == 400 and error_code(too_much) == "amount_exceeds_deposit"
    with capture(execute=True):
        assert operator.post(f"/usage-agreements/{funded.agreement_id}/resolve",
                             {"seller_amount_atomic": 100_000}).status_code == 202
    confirm_all(capture)  # resolve confirmed -> settling, finalize queued
    confirm_all(capture)  # finalize confirmed -> settled
    settled = funded.agreement(funded.agreement_id)
    assert settled["status"] == "settled"
    assert (settled["seller_payout_atomic"], settled["buyer_refund_atomic"]) == (100_000, 1_900_000)
    assert usdc_balance(chain, funded.seller_account.address) == funded.balances["seller"] + 100_000
    assert usdc_balance(chain, funded.buyer_account.address) == funded.balances["buyer"] + 1_900_000
    assert usdc_balance(chain, chain.addresses["escrow"]) == 0
    call_command("reconcile")


@pytest.mark.postgres
@pytest.mark.django_db(transaction=True)
def test_an_operators_resolution_asks_the_chain_with_no_database_transaction_open(
        funded, escrow_chain, rpc_relay, django_capture_on_commit_callbacks):  # noqa: F811
    """The resolution reads the escrow and the chain's clock (dispute timed out? more than the proposal?): it did so
    inside the Idempotency-Key's transaction, holding the key's row lock and a transaction open for as long as the
    node took to answer. A retry with the same key is answered the same, asking the chain nothing."""
    from tests.support.db_activity import backend_pid, session_state

    chain, capture = escrow_chain, django_capture_on_commit_callbacks
    dispute(funded, chain, capture)
    pid = backend_pid()
    asked, asked_inside_a_transaction = [], []
    rpc_relay.observers.append(lambda call: asked.append(call["method"]))
    rpc_relay.observers.append(lambda call: session_state(pid) == "idle in transaction"
                               and asked_inside_a_transaction.append(call["method"]))
    operator, headers = staff_owner_api("change_dispute"), {"Idempotency-Key": "resolve-once"}
    with capture(execute=False):
        first = operator.post(f"/usage-agreements/{funded.agreement_id}/resolve", {"seller_amount_atomic": 100_000},
                              headers=headers)
    assert first.status_code == 202, first.content
    assert asked and asked_inside_a_transaction == []

    asked.clear()
    replay = operator.post(f"/usage-agreements/{funded.agreement_id}/resolve", {"seller_amount_atomic": 100_000},
                           headers=headers)
    assert replay.status_code == 202 and replay["Idempotent-Replayed"] == "true"
    assert replay.json() == first.json() and asked == []
    assert ChainTransaction.objects.filter(agreement_id=funded.agreement_id, purpose=TxPurpose.RESOLVE).count() == 1


def dispute_timeout(funded, chain) -> int:
    """When the disputed escrow's arbiter runs out of time (the contract's DISPUTE_TIMEOUT after the challenge), as
    getEscrow says."""
    onchain_id = UsageAgreement.objects.get(pk=funded.agreement_id).onchain_id
    return chain.escrow.functions.getEscrow(onchain_id, escrow_terms(chain.escrow, onchain_id)).call()[1]


def test_a_dispute_nobody_resolves_by_its_timeout_is_settled_for_the_buyer_by_the_settlement_tick(
        funded, escrow_chain, django_capture_on_commit_callbacks):
    """The arbiter (the platform's key) decides nothing in DISPUTE_TIMEOUT: the deposit was locked for ever. From the
    timeout on, by the chain's clock, the tick finalizes the escrow and the buyer gets the whole deposit back (the
    seller's disputed proposal was never upheld); a resolution sent then would revert, so it is refused up front."""
    chain, capture = escrow_chain, django_capture_on_commit_callbacks
    dispute(funded, chain, capture)
    timeout = dispute_timeout(funded, chain)
    assert selectors.DISPUTE_TIMEOUT.total_seconds() == chain.escrow.functions.DISPUTE_TIMEOUT().call()
    assert timeout >= chain.now() + selectors.DISPUTE_TIMEOUT.total_seconds() - 60

    chain.increase_time(timeout - chain.now() - 60)
    assert tick(capture)["finalizing"] == 0  # the arbiter's time is not over
    assert funded.agreement(funded.agreement_id)["status"] == "disputed"

    chain.increase_time(60)
    late = staff_owner_api("change_dispute").post(f"/usage-agreements/{funded.agreement_id}/resolve",
                                                  {"seller_amount_atomic": 100_000})
    assert late.status_code == 409 and error_code(late) == "dispute_timed_out", late.content
    assert not ChainTransaction.objects.filter(agreement_id=funded.agreement_id, purpose=TxPurpose.RESOLVE).exists()

    with capture(execute=False) as submits:
        assert settlement.settlement_tick()["finalizing"] == 1
    settling = funded.agreement(funded.agreement_id)
    assert settling["status"] == "settling" and "timeout" in settling["status_reason"]
    call_command("reconcile")  # the escrow still Disputed on-chain, its finalize not sent yet: consistent
    with capture(execute=True):
        for submit in submits:
            submit()
    confirm_all(capture)
    settled = funded.agreement(funded.agreement_id)
    assert settled["status"] == "settled"
    assert (settled["seller_payout_atomic"], settled["buyer_refund_atomic"]) == (0, 2 * USDC)
    assert usdc_balance(chain, funded.seller_account.address) == funded.balances["seller"]
    assert usdc_balance(chain, funded.buyer_account.address) == funded.balances["buyer"] + 2 * USDC
    assert usdc_balance(chain, chain.addresses["escrow"]) == 0
    assert statuses(funded.agreement_id)[-2:] == [("disputed", "settling"), ("settling", "settled")]
    index(capture)
    assert ChainEvent.objects.get(agreement_id=funded.agreement_id, name="Settled").effect == EventEffect.ALREADY
    assert tick(capture) == {"expired": 0, "proposed": 0, "finalizing": 0, "reclaiming": 0}
    call_command("reconcile")


def finalized_by_a_stranger_once_timed_out(funded, chain, capture) -> None:
    """The agreement disputed, its timeout reached on the chain's clock, and anyone's finalize mined (not indexed)."""
    dispute(funded, chain, capture)
    chain.increase_time(dispute_timeout(funded, chain) - chain.now())
    onchain_id = UsageAgreement.objects.get(pk=funded.agreement_id).onchain_id
    sent = chain.escrow.functions.finalize(onchain_id, escrow_terms(chain.escrow, onchain_id)).transact(
        {"from": chain.accounts.stranger.address})
    assert chain.w3.eth.wait_for_transaction_receipt(sent)["status"] == 1


def test_a_timed_out_dispute_someone_else_finalized_moves_the_agreement_from_disputed_to_settled(
        funded, escrow_chain, django_capture_on_commit_callbacks):
    """Anyone may finalize a dispute past its timeout (the buyer itself, without the platform): the indexer's Settled
    event moves the agreement from disputed straight to settled, the buyer refunded the whole deposit."""
    chain, capture = escrow_chain, django_capture_on_commit_callbacks
    finalized_by_a_stranger_once_timed_out(funded, chain, capture)

    index(capture)
    settled = funded.agreement(funded.agreement_id)
    assert (settled["status"], settled["seller_payout_atomic"], settled["buyer_refund_atomic"]) == (
        "settled", 0, 2 * USDC)
    event = ChainEvent.objects.get(agreement_id=funded.agreement_id, name="Settled")
    assert (event.effect, event.from_status, event.to_status) == (EventEffect.APPLIED, "disputed", "settled")
    assert statuses(funded.agreement_id)[-1] == ("disputed", "settled")
    assert usdc_balance(chain, funded.buyer_account.address) == funded.balances["buyer"] + 2 * USDC
    assert tick(capture)["finalizing"] == 0
    call_command("reconcile")


def test_a_proposal_challenged_before_its_receipt_is_read_keeps_its_window_end_and_times_out_on_time(
        funded, escrow_chain, django_capture_on_commit_callbacks, settings):
    """The indexer applies our proposal, the buyer challenges it at once, and only then the relayer reads the
    proposal's receipt (each acts at depth, on its own beat). The escrow's challengeDeadline word is the dispute's
    timeout by then: the books must keep the proposal's window end (its SettlementProposed event), else the
    settlement tick, which asks the chain only about disputes whose window end plus DISPUTE_TIMEOUT is past, left
    the buyer's refund ~30 days late."""
    chain, capture = escrow_chain, django_capture_on_commit_callbacks
    call_n(funded, 10)
    funded.seller_api.post(f"/usage-agreements/{funded.agreement_id}/complete")
    settings.CHAIN_CONFIRMATIONS = 2  # a receipt or an event is read once a block is mined on top of it
    with capture(execute=True):
        assert settlement.settlement_tick()["proposed"] == 1  # sent and mined, its receipt not read yet
    chain.mine()
    index(capture)
    assert funded.agreement(funded.agreement_id)["status"] == "in_challenge"
    onchain_id = UsageAgreement.objects.get(pk=funded.agreement_id).onchain_id
    terms = escrow_terms(chain.escrow, onchain_id)
    window_end = chain.escrow.functions.getEscrow(onchain_id, terms).call()[1]
    sent = chain.escrow.functions.challenge(onchain_id, terms).transact({"from": funded.buyer_account.address})
    assert chain.w3.eth.wait_for_transaction_receipt(sent)["status"] == 1
    chain.mine()
    confirm_all(capture)  # the proposal's receipt, the escrow Disputed now
    index(capture)
    agreement = UsageAgreement.objects.get(pk=funded.agreement_id)
    assert agreement.status == "disputed"
    assert int(agreement.challenge_deadline.timestamp()) == window_end

    settings.CHAIN_CONFIRMATIONS = 1
    chain.increase_time(dispute_timeout(funded, chain) - chain.now())
    assert tick(capture)["finalizing"] == 1
    settled = funded.agreement(funded.agreement_id)
    assert (settled["status"], settled["seller_payout_atomic"], settled["buyer_refund_atomic"]) == (
        "settled", 0, 2 * USDC)


def test_a_resolution_asked_for_once_anyone_finalized_the_timed_out_dispute_is_refused_before_it_is_indexed(
        funded, escrow_chain, django_capture_on_commit_callbacks):
    """Anyone finalized the timed-out dispute for the buyer; the indexer (at depth) has not applied it yet, so the books
    still say disputed. A resolution asked for then is 409 dispute_timed_out, nothing queued: it was 202 and queued a
    resolve the chain refuses (the Masumi tick's release asked again at every tick until the event was indexed)."""
    chain, capture = escrow_chain, django_capture_on_commit_callbacks
    finalized_by_a_stranger_once_timed_out(funded, chain, capture)
    assert funded.agreement(funded.agreement_id)["status"] == "disputed"

    with capture(execute=False):
        late = staff_owner_api("change_dispute").post(f"/usage-agreements/{funded.agreement_id}/resolve",
                                                      {"seller_amount_atomic": 100_000})
    assert late.status_code == 409 and error_code(late) == "dispute_timed_out", late.content
    assert not ChainTransaction.objects.filter(agreement_id=funded.agreement_id, purpose=TxPurpose.RESOLVE).exists()
    index(capture)
    assert funded.agreement(funded.agreement_id)["status"] == "settled"


def test_a_node_answering_a_pending_block_in_the_future_does_not_refuse_the_arbiters_resolution_as_timed_out(
        funded, escrow_chain, rpc_relay, django_capture_on_commit_callbacks):  # noqa: F811
    """The resolution's refusal for a dispute timed out read the node's pending block's timestamp, unchecked: a node
    answering one past the dispute's timeout (a misbehaving provider, a clock gone wrong) had the arbiter's decision
    refused 409 dispute_timed_out while the chain's dispute was open, and the whole deposit went back to the buyer at
    the real timeout, the seller's upheld share never paid. The pending timestamp is believed no further than the
    later of the latest block's and our clock's, as for a challenge."""
    chain, capture = escrow_chain, django_capture_on_commit_callbacks
    dispute(funded, chain, capture)
    timeout = dispute_timeout(funded, chain)
    rpc_relay.rewrite(lambda call: call.get("method") == "eth_getBlockByNumber" and call["params"][0] == "pending",
                      lambda answer: {**answer, "result": {**answer["result"], "timestamp": hex(timeout + 3600)}})
    with capture(execute=True):
        response = staff_owner_api("change_dispute").post(f"/usage-agreements/{funded.agreement_id}/resolve",
                                                          {"seller_amount_atomic": 100_000})
    assert response.status_code == 202, response.content
    confirm_all(capture)  # resolve confirmed -> settling, finalize queued
    confirm_all(capture)  # finalize confirmed -> settled
    settled = funded.agreement(funded.agreement_id)
    assert (settled["status"], settled["seller_payout_atomic"], settled["buyer_refund_atomic"]) == (
        "settled", 100_000, 1_900_000)


def test_a_deployment_from_before_the_dispute_timeout_leaves_disputes_to_the_arbiter(
        funded, escrow_chain, django_capture_on_commit_callbacks, monkeypatch):
    """A contract is immutable: an escrow deployed before DISPUTE_TIMEOUT keeps a Disputed escrow's challengeDeadline
    at its window's end (long past). Its disputes are neither finalized by the tick (finalize would revert) nor
    refused to the arbiter."""
    chain, capture = escrow_chain, django_capture_on_commit_callbacks
    assert gateway.escrow_has_dispute_timeout()
    assert not gateway.escrow_has_dispute_timeout(chain.addresses["usdc"])  # no such function there
    monkeypatch.setattr(gateway, "escrow_has_dispute_timeout", lambda address=None: False)
    dispute(funded, chain, capture)
    chain.increase_time(dispute_timeout(funded, chain) - chain.now())
    assert tick(capture)["finalizing"] == 0
    assert funded.agreement(funded.agreement_id)["status"] == "disputed"
    with capture(execute=False):
        resolved = staff_owner_api("change_dispute").post(f"/usage-agreements/{funded.agreement_id}/resolve",
                                                          {"seller_amount_atomic": 100_000})
    assert resolved.status_code == 202, resolved.content


def test_a_resolution_still_queued_when_the_dispute_times_out_fails_cleanly_and_the_buyer_is_refunded_whole(
        funded, escrow_chain, django_capture_on_commit_callbacks):
    """The arbiter decided just before the timeout, but the relayer sent the resolution after it: the contract refuses
    it (DisputeTimedOut), the tick's finalize refunds the buyer the whole deposit, and the agreement ends settled."""
    chain, capture = escrow_chain, django_capture_on_commit_callbacks
    dispute(funded, chain, capture)
    chain.increase_time(dispute_timeout(funded, chain) - chain.now() - 60)
    with capture(execute=False) as resolving:
        resolved = staff_owner_api("change_dispute").post(f"/usage-agreements/{funded.agreement_id}/resolve",
                                                          {"seller_amount_atomic": 100_000})
    assert resolved.status_code == 202, resolved.content
    chain.increase_time(60)
    with capture(execute=False) as finalizing:
        assert settlement.settlement_tick()["finalizing"] == 1
    with capture(execute=True):
        for submit in [*resolving, *finalizing]:
            submit()
    confirm_all(capture)
    index(capture)
    resolve = ChainTransaction.objects.get(agreement_id=funded.agreement_id, purpose=TxPurpose.RESOLVE)
    assert resolve.status == TxStatus.FAILED and "DisputeTimedOut" in resolve.failure_reason
    settled = funded.agreement(funded.agreement_id)
    assert (settled["status"], settled["seller_payout_atomic"], settled["buyer_refund_atomic"]) == (
        "settled", 0, 2 * USDC)
    assert usdc_balance(chain, funded.buyer_account.address) == funded.balances["buyer"] + 2 * USDC
    assert tick(capture) == {"expired": 0, "proposed": 0, "finalizing": 0, "reclaiming": 0}
    call_command("reconcile")


def test_a_node_error_asking_whether_the_escrow_has_a_dispute_timeout_is_not_taken_for_an_old_deployment(
        funded, escrow_chain, django_capture_on_commit_callbacks, monkeypatch):
    """Only a revert of DISPUTE_TIMEOUT() says the deployment predates it; the answer is kept for the process. A
    node's error on that first read (a load-balanced node's "header not found") was taken for "no timeout" and kept:
    that worker's settlement tick never finalized a timed-out dispute, until restarted."""
    chain, capture = escrow_chain, django_capture_on_commit_callbacks
    dispute(funded, chain, capture)
    chain.increase_time(dispute_timeout(funded, chain) - chain.now())
    gateway._has_dispute_timeout.cache_clear()
    real_call, failed = gateway.call, []

    def node_fails_once(fn):
        if getattr(getattr(fn, "__self__", None), "fn_name", "") == "DISPUTE_TIMEOUT" and not failed:
            failed.append(fn)
            raise gateway.ChainError("header not found")
        return real_call(fn)

    monkeypatch.setattr(gateway, "call", node_fails_once)
    tick(capture)  # the read failed: logged, tried again at the next tick
    assert failed
    assert tick(capture)["finalizing"] == 1
    assert funded.agreement(funded.agreement_id)["status"] == "settled"
    gateway._has_dispute_timeout.cache_clear()


def test_staff_who_may_only_view_disputes_cannot_resolve_one_through_the_api(
        funded, escrow_chain, django_capture_on_commit_callbacks):
    """Resolving moves the escrow: through the API, as in the admin's dispute form, it needs the change permission
    on disputes, not just a staff account."""
    chain, capture = escrow_chain, django_capture_on_commit_callbacks
    dispute(funded, chain, capture)

    for staff in (staff_owner_api(), staff_owner_api("view_dispute")):
        with capture(execute=True):
            refused = staff.post(f"/usage-agreements/{funded.agreement_id}/resolve",
                                 {"seller_amount_atomic": 2 * USDC})
        assert refused.status_code == 403 and error_code(refused) == "operator_required"

    assert funded.agreement(funded.agreement_id)["status"] == "disputed"
    assert not ChainTransaction.objects.filter(agreement_id=funded.agreement_id, purpose=TxPurpose.RESOLVE).exists()


def test_unused_expired_escrow_is_reclaimed_for_the_buyer(funded, escrow_chain, django_capture_on_commit_callbacks):
    chain, capture = escrow_chain, django_capture_on_commit_callbacks
    agreement = UsageAgreement.objects.get(pk=funded.agreement_id)
    chain.increase_time(int(agreement.expires_at.timestamp()) - chain.now() + 10)
    assert tick(capture)["reclaiming"] == 0  # expired, but the reclaim grace is still running
    chain.increase_time(chain.reclaim_grace)
    assert tick(capture)["reclaiming"] == 1
    refunded = funded.agreement(funded.agreement_id)
    assert refunded["status"] == "refunded" and refunded["buyer_refund_atomic"] == 2 * USDC
    assert usdc_balance(chain, funded.buyer_account.address) == funded.balances["buyer"] + 2 * USDC
    assert usdc_balance(chain, chain.accounts.fee_recipient.address) == funded.balances["fee"]
    assert usdc_balance(chain, chain.addresses["escrow"]) == 0
    call_command("reconcile")


def test_used_escrow_is_settled_automatically_at_expiry(funded, escrow_chain, django_capture_on_commit_callbacks):
    chain, capture = escrow_chain, django_capture_on_commit_callbacks
    call_n(funded, 3)
    agreement = UsageAgreement.objects.get(pk=funded.agreement_id)
    chain.increase_time(int(agreement.expires_at.timestamp()) - chain.now() + 10)
    result = tick(capture)
    assert result["expired"] == 1
    tick(capture)  # the proposal once nothing is in flight
    assert funded.agreement(funded.agreement_id)["status"] == "in_challenge"
    chain.increase_time(3601)
    tick(capture)
    assert funded.agreement(funded.agreement_id)["seller_payout_atomic"] == 60_000


def test_dispute_resolved_in_the_admin(funded, escrow_chain, django_capture_on_commit_callbacks, admin_client):
    chain, capture = escrow_chain, django_capture_on_commit_callbacks
    dispute(funded, chain, capture)
    queue = admin_client.get("/admin/escrow/dispute/")
    assert queue.status_code == 200 and funded.agreement_id in queue.content.decode()
    form_url = f"/admin/escrow/dispute/{funded.agreement_id}/resolve/"
    page = admin_client.get(form_url)
    assert page.status_code == 200 and "half of the answers were empty" in page.content.decode()

    too_much = admin_client.post(form_url, {"seller_amount_atomic": 2 * USDC + 1})
    assert too_much.status_code == 200 and "amount_exceeds_deposit" in too_much.content.decode()
    with capture(execute=True):
        decided = admin_client.post(form_url, {"seller_amount_atomic": 150_000})
    assert decided.status_code == 302
    assert "resolution submitted" in admin_client.get("/admin/escrow/dispute/").content.decode()
    with capture(execute=True):
        again = admin_client.post(form_url, {"seller_amount_atomic": 0})
    assert again.status_code == 200 and "resolution_in_progress" in again.content.decode()

    confirm_all(capture)  # resolve confirmed -> settling, finalize queued
    confirm_all(capture)  # finalize confirmed -> settled
    settled = funded.agreement(funded.agreement_id)
    assert (settled["status"], settled["seller_payout_atomic"], settled["buyer_refund_atomic"]) == (
        "settled", 150_000, 1_850_000)
    assert usdc_balance(chain, funded.seller_account.address) == funded.balances["seller"] + 150_000
    assert usdc_balance(chain, funded.buyer_account.address) == funded.balances["buyer"] + 1_850_000
    assert admin_client.get(form_url).status_code == 404  # no longer disputed
    events = funded.seller_api.get(f"/usage-agreements/{funded.agreement_id}/events").json()["results"]
    assert any("arbiter resolved: 150000" in event["reason"] for event in events)
    call_command("reconcile")


@pytest.fixture
def spare_admin(escrow_chain):
    """The spare account administers the escrow's roles (granted before the relayer sends anything, so the
    relayer's nonces stay its own)."""
    escrow, accounts = escrow_chain.escrow, escrow_chain.accounts
    escrow.functions.grantRole(escrow.functions.DEFAULT_ADMIN_ROLE().call(), accounts.spare.address).transact(
        {"from": accounts.deployer.address})
    mined_what_was_sent()  # Anvil answers a send before it mines it
    return accounts.spare


def set_relayer_operator(chain, spare, *, allowed: bool) -> None:
    """Without the operator role the relayer's proposeSettlement reverts (NotOperatorOrSeller)."""
    role = chain.escrow.functions.OPERATOR_ROLE().call()
    change = chain.escrow.functions.grantRole if allowed else chain.escrow.functions.revokeRole
    change(role, chain.accounts.deployer.address).transact({"from": spare.address})
    mined_what_was_sent()  # before the relayer's next send (Anvil answers a send before it mines it)


def proposals(agreement_id):
    return ChainTransaction.objects.filter(agreement_id=agreement_id, purpose=TxPurpose.PROPOSE_SETTLEMENT)


def retry_in_admin(admin_client, capture, tx) -> None:
    with capture(execute=True):
        response = admin_client.post("/admin/escrow/chaintransaction/",
                                     {"action": "retry_failed", "_selected_action": [str(tx.pk)]}, follow=True)
    assert "Queued 1 transaction(s) again." in response.content.decode()


def test_a_proposal_that_keeps_reverting_backs_off_stops_and_waits_for_an_operator(
        spare_admin, funded, escrow_chain, django_capture_on_commit_callbacks, admin_client, settings):
    chain, capture = escrow_chain, django_capture_on_commit_callbacks
    settings.SETTLEMENT_PROPOSE_MAX_ATTEMPTS = 3
    settings.SETTLEMENT_PROPOSE_BACKOFF_SECONDS = 3600
    call_n(funded, 5)
    assert funded.buyer_api.post(f"/usage-agreements/{funded.agreement_id}/complete").status_code == 200
    set_relayer_operator(chain, spare_admin, allowed=False)

    assert tick(capture)["proposed"] == 1
    assert tick(capture)["proposed"] == 0  # backing off: the next attempt is an hour after the failure
    assert list(proposals(funded.agreement_id).values_list("status", flat=True)) == [TxStatus.FAILED]

    settings.SETTLEMENT_PROPOSE_BACKOFF_SECONDS = 0
    for _ in range(6):
        tick(capture)
    assert proposals(funded.agreement_id).count() == 3  # then no more: an operator decides
    assert not proposals(funded.agreement_id).exclude(status=TxStatus.FAILED).exists()
    assert funded.agreement(funded.agreement_id)["status"] == "active"
    last = proposals(funded.agreement_id).order_by("-created_at").first()
    dashboard = admin_client.get("/admin/dashboard/")
    [queued] = [item for item in dashboard.context["overdue"] if item.subject == funded.agreement_id]
    assert queued.kind == "settlement proposal failed 3 times, not retried"
    assert "NotOperatorOrSeller" in queued.detail
    assert queued.admin_url == f"/admin/escrow/chaintransaction/{last.pk}/change/"

    retry_in_admin(admin_client, capture, last)  # still reverting: the operator's retry starts a new round
    for _ in range(6):
        tick(capture)
    assert proposals(funded.agreement_id).count() == 6

    set_relayer_operator(chain, spare_admin, allowed=True)
    retry_in_admin(admin_client, capture, proposals(funded.agreement_id).order_by("-created_at").first())
    confirm_all(capture)
    agreement = funded.agreement(funded.agreement_id)
    assert (agreement["status"], agreement["used_atomic"]) == ("in_challenge", 100_000)
    assert not [item for item in admin_client.get("/admin/dashboard/").context["overdue"]
                if item.subject == funded.agreement_id]


def test_a_failed_finalize_leaves_the_agreement_settling_until_an_operator_retries(
        funded, escrow_chain, settings, django_capture_on_commit_callbacks, admin_client):
    from tests.support.rpc_relay import node_block_times

    chain, capture = escrow_chain, django_capture_on_commit_callbacks
    call_n(funded, 3)
    funded.buyer_api.post(f"/usage-agreements/{funded.agreement_id}/complete")
    tick(capture)
    deadline = UsageAgreement.objects.get(pk=funded.agreement_id).challenge_deadline
    # The node's latest block counts the window as over; the chain's clock, which mines the finalize, does not yet.
    with node_block_times(escrow_chain.node.rpc_url, settings, latest=int(deadline.timestamp()) + 1):
        with capture(execute=True):
            assert settlement.settlement_tick()["finalizing"] == 1
        confirm_all(capture)
    [finalize] = ChainTransaction.objects.filter(agreement_id=funded.agreement_id, purpose=TxPurpose.FINALIZE)
    assert finalize.status == TxStatus.FAILED and "ChallengeWindowOpen" in finalize.failure_reason
    agreement = funded.agreement(funded.agreement_id)
    assert agreement["status"] == "settling" and agreement["seller_payout_atomic"] is None
    assert usdc_balance(chain, chain.addresses["escrow"]) == 2 * USDC  # nothing moved
    assert tick(capture)["finalizing"] == 0  # the tick finalizes what is in_challenge only
    failures = admin_client.get("/admin/dashboard/").context["failures"]
    assert any(failure.kind == "chain transaction finalize failed" for failure in failures)

    chain.increase_time(3601)
    retry_in_admin(admin_client, capture, finalize)
    confirm_all(capture)
    settled = funded.agreement(funded.agreement_id)
    assert (settled["status"], settled["seller_payout_atomic"], settled["buyer_refund_atomic"]) == (
        "settled", 60_000, 1_940_000)
    call_command("reconcile")


def finalized_by_the_seller_first(funded, chain, capture):
    """The challenge window is over and our finalize is queued, but anyone may call finalize and the seller's is
    mined first, on a branch a snapshot taken just before it can undo. Returns our finalize (failed), the seller's
    receipt and the snapshot."""
    call_n(funded, 3)
    funded.buyer_api.post(f"/usage-agreements/{funded.agreement_id}/complete")
    tick(capture)
    chain.increase_time(3601)
    return sent_first_by_another(funded, chain, capture, step=TxPurpose.FINALIZE, by=funded.seller_account)


def sent_first_by_another(funded, chain, capture, *, step: str, by):
    """The settlement tick queues our `step` (finalize or reclaim) on the escrow, but `by` calls it first and it is
    mined, on a branch a snapshot taken just before it can undo; then ours is sent and polled. Returns our
    transaction, their receipt and the snapshot."""
    with capture(execute=False) as submits:
        queued = settlement.settlement_tick()
        assert queued["finalizing" if step == TxPurpose.FINALIZE else "reclaiming"] == 1
    agreement = UsageAgreement.objects.get(pk=funded.agreement_id)
    before_fork = chain.snapshot()
    sent = getattr(chain.escrow.functions, step)(agreement.onchain_id, selectors.escrow_terms(agreement=agreement)
                                                 ).transact({"from": by.address})
    theirs = chain.w3.eth.wait_for_transaction_receipt(sent)
    assert theirs["status"] == 1
    with capture(execute=True):
        for submit in submits:
            submit()
    confirm_all(capture)
    [ours] = ChainTransaction.objects.filter(agreement_id=funded.agreement_id, purpose=step)
    return ours, theirs, before_fork


def assert_done_by_another(ours, theirs, funded, admin_client) -> None:
    """Ours reverted (InvalidState), names the block of their transaction as its evidence, and is no failure on the
    dashboard."""
    assert ours.status == TxStatus.FAILED and "InvalidState" in ours.failure_reason
    failures = admin_client.get("/admin/dashboard/").context["failures"]
    assert not [failure for failure in failures if failure.subject == funded.agreement_id]
    assert ours.outcome_evidence[relayer.EVIDENCE_BLOCK] == {
        "number": theirs["blockNumber"], "hash": "0x" + bytes(theirs["blockHash"]).hex()}


def test_a_finalize_someone_else_sent_first_is_no_failure_on_the_dashboard(
        funded, escrow_chain, django_capture_on_commit_callbacks, admin_client):
    """Ours reverts (InvalidState: the escrow is settled), which is no failure for an operator to look into: the
    chain shows the escrow settled as ours would have. It names the block of the Settled event, and the agreement is
    settled once the indexer applies it."""
    chain, capture = escrow_chain, django_capture_on_commit_callbacks
    finalize, settled_in, _ = finalized_by_the_seller_first(funded, chain, capture)
    assert_done_by_another(finalize, settled_in, funded, admin_client)
    index(capture)
    settled = funded.agreement(funded.agreement_id)
    assert (settled["status"], settled["seller_payout_atomic"], settled["buyer_refund_atomic"]) == (
        "settled", 60_000, 1_940_000)
    call_command("reconcile", stdout=io.StringIO())


def test_a_finalize_someone_else_sent_first_is_sent_again_when_a_reorg_takes_theirs(
        funded, escrow_chain, django_capture_on_commit_callbacks):
    """The seller's finalize, that ours counted on, is taken by a deep reorg: ours is reopened and settles the
    escrow itself."""
    chain, capture = escrow_chain, django_capture_on_commit_callbacks
    finalize, _, before_fork = finalized_by_the_seller_first(funded, chain, capture)
    index(capture)
    chain.reorg(before_fork)
    chain.mine(3)
    index(capture)
    for _ in range(2):
        confirm_all(capture)
    finalize.refresh_from_db()
    assert (finalize.status, finalize.outcome_evidence["transfers_match"]) == (TxStatus.CONFIRMED, True)
    settled = funded.agreement(funded.agreement_id)
    assert (settled["status"], settled["seller_payout_atomic"], settled["buyer_refund_atomic"]) == (
        "settled", 60_000, 1_940_000)
    assert usdc_balance(chain, chain.addresses["escrow"]) == 0
    call_command("reconcile", stdout=io.StringIO())


def _settled_then_a_deep_reorg_takes_the_finalize(funded, chain, capture) -> None:
    """Three metered calls, the buyer's completion, the challenge window past and the finalize confirmed (the
    agreement settled), then a reorg deeper than the confirmation depth takes the finalize's block (the escrow holds
    the deposit again) before the indexer applied its Settled event, and the poll runs."""
    call_n(funded, 3)
    funded.buyer_api.post(f"/usage-agreements/{funded.agreement_id}/complete")
    tick(capture)
    chain.increase_time(3601)
    before_fork = chain.snapshot()
    assert tick(capture)["finalizing"] == 1
    assert funded.agreement(funded.agreement_id)["status"] == "settled"
    chain.reorg(before_fork)
    chain.mine(2)
    confirm_all(capture)


def test_a_finalize_a_reorg_deeper_than_the_depth_takes_leaves_no_payout_recorded_until_it_is_mined_again(
        funded, escrow_chain, settings, django_capture_on_commit_callbacks):
    """Our finalize, confirmed (the agreement settled, the seller's payout recorded), is taken by a reorg deeper than
    the confirmation depth before the indexer applied its Settled event (so the indexer has nothing to roll back).
    The relayer reopens it and sends the same bytes again, but the agreement stayed settled meanwhile, recording a
    payout to the seller that the chain no longer made. It goes back to settling until the finalize is mined again."""
    chain, capture = escrow_chain, django_capture_on_commit_callbacks
    _settled_then_a_deep_reorg_takes_the_finalize(funded, chain, capture)
    finalize = ChainTransaction.objects.get(agreement_id=funded.agreement_id, purpose=TxPurpose.FINALIZE)
    finalize.refresh_from_db()
    assert finalize.status == TxStatus.SUBMITTED
    assert usdc_balance(chain, funded.seller_account.address) == funded.balances["seller"]
    unsettled = funded.agreement(funded.agreement_id)
    assert (unsettled["status"], unsettled["seller_payout_atomic"], unsettled["buyer_refund_atomic"]) == (
        "settling", None, None)
    settings.CHAIN_REBROADCAST_AFTER = timedelta(0)
    for _ in range(2):  # rebroadcast with the same bytes, then concluded
        confirm_all(capture)
    finalize.refresh_from_db()
    assert finalize.status == TxStatus.CONFIRMED
    settled = funded.agreement(funded.agreement_id)
    assert (settled["status"], settled["seller_payout_atomic"], settled["buyer_refund_atomic"]) == (
        "settled", 60_000, 1_940_000)
    assert usdc_balance(chain, funded.seller_account.address) == funded.balances["seller"] + 60_000
    index(capture)
    call_command("reconcile", stdout=io.StringIO())


def test_a_finalize_a_deep_reorg_took_after_its_settled_event_was_indexed_is_not_sent_twice(
        funded, escrow_chain, settings, django_capture_on_commit_callbacks):
    """As above, but the indexer had applied the Settled event: its rollback puts the agreement back in challenge (the
    proposal is its newest remaining event), its window over, while the relayer sends our reopened finalize again.
    The settlement tick took it for one still to finalize and queued a second finalize, of which one reverts at the
    relayer's gas."""
    chain, capture = escrow_chain, django_capture_on_commit_callbacks
    call_n(funded, 3)
    funded.buyer_api.post(f"/usage-agreements/{funded.agreement_id}/complete")
    tick(capture)
    chain.increase_time(3601)
    before_fork = chain.snapshot()
    assert tick(capture)["finalizing"] == 1
    index(capture)
    chain.reorg(before_fork)
    chain.mine(3)
    index(capture)
    assert funded.agreement(funded.agreement_id)["status"] == "in_challenge"
    with capture(execute=False):  # the relayer's poll reopens ours; it is not mined again yet
        relayer.transactions_reopen_reorged()
    assert tick(capture)["finalizing"] == 0
    assert funded.agreement(funded.agreement_id)["status"] == "settling"  # on the finalize under way
    settings.CHAIN_REBROADCAST_AFTER = timedelta(0)
    for _ in range(2):
        confirm_all(capture)
    index(capture)
    finalizes = ChainTransaction.objects.filter(agreement_id=funded.agreement_id, purpose=TxPurpose.FINALIZE)
    assert list(finalizes.values_list("status", flat=True)) == [TxStatus.CONFIRMED]
    settled = funded.agreement(funded.agreement_id)
    assert (settled["status"], settled["seller_payout_atomic"], settled["buyer_refund_atomic"]) == (
        "settled", 60_000, 1_940_000)
    call_command("reconcile", stdout=io.StringIO())


def test_a_reclaim_a_reorg_deeper_than_the_depth_takes_leaves_no_refund_recorded_until_it_is_mined_again(
        funded, escrow_chain, settings, django_capture_on_commit_callbacks):
    """As the finalize above: our reclaim, confirmed (the agreement refunded, the buyer's refund recorded), taken by a
    deep reorg the indexer had not applied stayed refunded while the escrow held the deposit again."""
    chain, capture = escrow_chain, django_capture_on_commit_callbacks
    agreement = UsageAgreement.objects.get(pk=funded.agreement_id)
    chain.increase_time(int(agreement.expires_at.timestamp()) - chain.now() + 10 + chain.reclaim_grace)
    before_fork = chain.snapshot()
    assert tick(capture)["reclaiming"] == 1
    assert funded.agreement(funded.agreement_id)["status"] == "refunded"
    reclaim = ChainTransaction.objects.get(agreement_id=funded.agreement_id, purpose=TxPurpose.RECLAIM)
    chain.reorg(before_fork)
    chain.mine(2)
    confirm_all(capture)
    reclaim.refresh_from_db()
    assert reclaim.status == TxStatus.SUBMITTED
    unrefunded = funded.agreement(funded.agreement_id)
    assert unrefunded["status"] != "refunded" and unrefunded["buyer_refund_atomic"] is None, unrefunded
    settings.CHAIN_REBROADCAST_AFTER = timedelta(0)
    for _ in range(2):
        confirm_all(capture)
    refunded = funded.agreement(funded.agreement_id)
    assert (refunded["status"], refunded["buyer_refund_atomic"]) == ("refunded", 2 * USDC)
    assert usdc_balance(chain, funded.buyer_account.address) == funded.balances["buyer"] + 2 * USDC


def told(subscription: dict) -> list[tuple[str, str, str]]:
    """What a webhook subscription was sent: each delivery's type, `data.from_status` and `data.status`."""
    return [(delivery.event_type, delivery.payload["data"]["from_status"], delivery.payload["data"]["status"])
            for delivery in WebhookDelivery.objects.filter(subscription_id=subscription["id"]).order_by(
                "created_at", "pk")]


def test_a_payout_a_deep_reorg_undid_is_told_to_the_webhooks_that_were_told_it_was_settled(
        funded, escrow_chain, http_server, django_capture_on_commit_callbacks):
    """Our finalize, confirmed and told to the parties' webhooks as `agreement.settled`, is taken by a reorg deeper
    than the confirmation depth (the agreement back to settling, `agreement_payout_undone`). The undo was recorded as
    a plain status event: a subscriber of `agreement.settled` alone (an agent acting once it is paid) was told
    nothing, and one of every event was sent `agreement.settling`, a step forward by its type. Both are sent
    `agreement.undone` (`data.from_status` the status undone, `data.status` the one the agreement is back in), also
    listed in the parties' inboxes."""
    chain, capture = escrow_chain, django_capture_on_commit_callbacks
    buyer_admin = Api(issue_key(funded.buyer, scope="admin"))
    settled_only = funded.seller_api.post("/webhooks", {"url": f"{http_server.url}/hooks",
                                                        "event_types": ["agreement.settled"]})
    assert settled_only.status_code == 201, settled_only.content
    every_event = buyer_admin.post("/webhooks", {"url": f"{http_server.url}/hooks"})
    assert every_event.status_code == 201, every_event.content
    _settled_then_a_deep_reorg_takes_the_finalize(funded, chain, capture)
    assert funded.agreement(funded.agreement_id)["status"] == "settling"

    undone = ("agreement.undone", "settled", "settling")
    assert told(settled_only.json()) == [("agreement.settled", "settling", "settled"), undone]
    assert told(every_event.json())[-2:] == [("agreement.settled", "settling", "settled"), undone]
    inbox = buyer_admin.get(f"/agents/{funded.buyer.pk}/events", {"types": "agreement.undone"}).json()
    assert [(item["type"], item["payload"]["from_status"], item["payload"]["status"]) for item in inbox] == [undone]


# --- nothing proposed by the escrow's reclaimAfter ------------------------------------------------------------------
#
# The contract takes a first proposal only before `reclaimAfter` (expiresAt + the reclaim grace at activation:
# ProposalPeriodOver from then on) and `reclaim` only from then on, when nothing was proposed. Past it, whatever the
# platform knew of the agreement (completion asked for, usage charged), the deposit can only go back to the buyer.

def reclaim_after(agreement_id) -> int:
    """The escrow's reclaimAfter: its expiry plus the contract's reclaim grace when it was activated."""
    return int(UsageAgreement.objects.get(pk=agreement_id).expires_at.timestamp()) + TEST_RECLAIM_GRACE


def refunds(agreement_id) -> list[dict]:
    return [delivery.payload for delivery in WebhookDelivery.objects.filter(event_type="agreement.refunded")
            if delivery.payload["data"]["agreement_id"] == str(agreement_id)]


def assert_reclaimed_for_the_buyer(funded, chain, agreement_id, *, seller_unpaid: int) -> dict:
    """Refunded: the whole deposit back to the buyer, nothing to the seller; its refunded event (and so the parties' webhooks) says what the seller earned and was not paid."""
    refunded = funded.agreement(agreement_id)
    assert (refunded["status"], refunded["used_atomic"], refunded["seller_payout_atomic"],
            refunded["buyer_refund_atomic"]) == ("refunded", seller_unpaid, 0, 2 * USDC), refunded
    assert usdc_balance(chain, funded.buyer_account.address) == funded.balances["buyer"] + 2 * USDC
    assert usdc_balance(chain, funded.seller_account.address) == funded.balances["seller"]
    assert usdc_balance(chain, chain.addresses["escrow"]) == 0
    events = funded.seller_api.get(f"/usage-agreements/{agreement_id}/events").json()["results"]
    [refund] = [event for event in events if event["to_status"] == "refunded"]
    assert refund["data"].get("seller_unpaid_atomic", 0) == seller_unpaid
    if seller_unpaid:
        assert f"the seller was not paid the {seller_unpaid}" in refund["reason"]
    return refund


def test_a_completion_never_proposed_by_reclaim_after_is_reclaimed_for_the_buyer(
        funded, escrow_chain, django_capture_on_commit_callbacks):
    """The buyer asks for completion of an escrow it never used, and the relayer (or the chain) is down until the
    escrow's reclaimAfter: no proposal can run any more. The tick reclaims the deposit for the buyer and proposes
    nothing. (It left the agreement out of its reclaim loop, completion being asked for, and proposed: every
    proposal reverted ProposalPeriodOver until the tick gave up, and the deposit waited for the buyer's own
    reclaim, at its own gas.)"""
    chain, capture = escrow_chain, django_capture_on_commit_callbacks
    assert funded.buyer_api.post(f"/usage-agreements/{funded.agreement_id}/complete").status_code == 200
    chain.increase_time(reclaim_after(funded.agreement_id) - chain.now())
    assert tick(capture) == {"expired": 0, "proposed": 0, "finalizing": 0, "reclaiming": 1}
    assert not proposals(funded.agreement_id).exists()
    assert_reclaimed_for_the_buyer(funded, chain, funded.agreement_id, seller_unpaid=0)
    assert tick(capture) == {"expired": 0, "proposed": 0, "finalizing": 0, "reclaiming": 0}
    call_command("reconcile", stdout=io.StringIO())


def test_a_reclaim_the_buyer_sent_first_is_no_failure_on_the_dashboard(
        funded, escrow_chain, django_capture_on_commit_callbacks, admin_client):
    """Our reclaim of an unused escrow is queued, but the buyer reclaims itself first: ours reverts (InvalidState:
    reclaimed), no failure for an operator, since the chain shows the deposit back with the buyer as ours would
    have. It names the block of the Reclaimed event, and the agreement is refunded once the indexer applies it."""
    chain, capture = escrow_chain, django_capture_on_commit_callbacks
    chain.increase_time(reclaim_after(funded.agreement_id) - chain.now())
    reclaim, reclaimed_in, _ = sent_first_by_another(funded, chain, capture, step=TxPurpose.RECLAIM,
                                                     by=funded.buyer_account)
    assert_done_by_another(reclaim, reclaimed_in, funded, admin_client)
    index(capture)
    assert_reclaimed_for_the_buyer(funded, chain, funded.agreement_id, seller_unpaid=0)
    call_command("reconcile", stdout=io.StringIO())


@pytest.mark.parametrize("step", [TxPurpose.FINALIZE, TxPurpose.RECLAIM])
def test_a_reorg_that_takes_only_the_block_of_our_payout_that_reverted_after_theirs_leaves_the_agreement_closed(
        funded, escrow_chain, step, monkeypatch, settings, django_capture_on_commit_callbacks):
    """The seller's finalize (the buyer's own reclaim) is mined between the relayer's simulation of ours and its
    broadcast: ours reverts in the next block (InvalidState), the escrow paid out by theirs. A reorg takes only our
    block, theirs stays on the chain: the agreement stays settled (refunded) by their transaction, ours, sent again,
    reverts again, and nothing is paid twice."""
    chain, capture = escrow_chain, django_capture_on_commit_callbacks
    settings.CHAIN_REBROADCAST_AFTER = timedelta(0)  # a reopened transaction is sent again at the next poll
    if step == TxPurpose.FINALIZE:
        call_n(funded, 3)
        funded.buyer_api.post(f"/usage-agreements/{funded.agreement_id}/complete")
        tick(capture)
        chain.increase_time(3601)
        by, closed_as = funded.seller_account, "settled"
    else:
        chain.increase_time(reclaim_after(funded.agreement_id) - chain.now())
        by, closed_as = funded.buyer_account, "refunded"
    agreement = UsageAgreement.objects.get(pk=funded.agreement_id)
    broadcast, seen = relayer._broadcast, {}

    def theirs_first(attempt):
        if attempt.transaction.purpose == step and not seen:
            sent = getattr(chain.escrow.functions, step)(
                agreement.onchain_id, selectors.escrow_terms(agreement=agreement)).transact({"from": by.address})
            seen["theirs"] = chain.w3.eth.wait_for_transaction_receipt(sent)
            seen["after_theirs"] = chain.snapshot()
        broadcast(attempt)

    monkeypatch.setattr(relayer, "_broadcast", theirs_first)
    tick(capture)
    monkeypatch.undo()
    ours, theirs = ChainTransaction.objects.get(agreement_id=funded.agreement_id, purpose=step), seen["theirs"]
    theirs_hash = "0x" + bytes(theirs["transactionHash"]).hex()
    assert ours.status == TxStatus.FAILED and ours.receipt_status == 0 and "InvalidState" in ours.failure_reason
    assert ours.mined_block_number > theirs["blockNumber"]
    assert ours.outcome_evidence[settlement.DONE_BY] == theirs_hash
    index(capture)

    def closed_by_theirs():
        shown = funded.agreement(funded.agreement_id)
        events = funded.seller_api.get(f"/usage-agreements/{funded.agreement_id}/events").json()["results"]
        [closed] = [event for event in events if event["to_status"] == closed_as]
        return shown["status"], shown["seller_payout_atomic"], shown["buyer_refund_atomic"], closed["data"]["tx_hash"]

    closed = closed_by_theirs()
    assert closed[0] == closed_as and closed[3] == theirs_hash
    balances = {address: usdc_balance(chain, address) for address in (
        funded.buyer_account.address, funded.seller_account.address, chain.accounts.fee_recipient.address)}

    chain.reorg(seen["after_theirs"])  # our block taken, theirs kept
    chain.mine(3)
    index(capture)
    with capture(execute=True):
        relayer.transactions_reopen_reorged()
    assert closed_by_theirs() == closed
    for _ in range(3):  # ours, sent again, reverts again
        confirm_all(capture)
        index(capture)
    ours.refresh_from_db()
    assert ours.status == TxStatus.FAILED and ours.outcome_evidence[settlement.DONE_BY] == theirs_hash
    assert closed_by_theirs() == closed
    assert {address: usdc_balance(chain, address) for address in balances} == balances
    assert usdc_balance(chain, chain.addresses["escrow"]) == 0
    assert ChainTransaction.objects.filter(agreement_id=funded.agreement_id, purpose=step).count() == 1
    call_command("reconcile", stdout=io.StringIO())


def test_a_proposal_the_relayer_gets_to_after_reclaim_after_gives_way_to_a_reclaim(
        funded, escrow_chain, django_capture_on_commit_callbacks):
    """The seller asks for completion a minute before reclaimAfter; the tick queues the proposal, which the relayer
    gets to only after reclaimAfter (ProposalPeriodOver at its simulation). The next tick reclaims for the buyer and
    queues no proposal again. (It never reclaimed: completion was asked for.)"""
    chain, capture = escrow_chain, django_capture_on_commit_callbacks
    chain.increase_time(reclaim_after(funded.agreement_id) - 60 - chain.now())
    assert funded.seller_api.post(f"/usage-agreements/{funded.agreement_id}/complete").status_code == 200
    with capture(execute=False) as submissions:
        assert settlement.settlement_tick()["proposed"] == 1
    chain.increase_time(60)
    with capture(execute=True):
        for submit in submissions:
            submit()
    confirm_all(capture)
    [proposal] = proposals(funded.agreement_id)
    assert proposal.status == TxStatus.FAILED and "ProposalPeriodOver" in proposal.failure_reason
    assert tick(capture) == {"expired": 0, "proposed": 0, "finalizing": 0, "reclaiming": 1}
    assert proposals(funded.agreement_id).count() == 1
    assert_reclaimed_for_the_buyer(funded, chain, funded.agreement_id, seller_unpaid=0)
    call_command("reconcile", stdout=io.StringIO())


@pytest.mark.parametrize("until_reclaim_after", ["proposals_reverted", "nothing_ran"])
def test_a_used_escrow_with_nothing_proposed_by_reclaim_after_goes_back_to_the_buyer_saying_the_seller_lost_its_pay(
        until_reclaim_after, spare_admin, funded, escrow_chain, django_capture_on_commit_callbacks, admin_client,
        http_server, settings):
    """3 calls served (0.06 USDC); every proposal reverted (here: the relayer lost its operator role) or none was
    sent (the relayer or the chain down from the expiry on) until reclaimAfter. The contract allows nothing but
    `reclaim` from then on: the seller's pay is lost, the buyer gets the whole deposit. The platform reclaims it
    rather than leave it in the escrow, and says what the seller lost: in the refunded event the parties' webhooks
    carry, on the dashboard, and in reconcile's report (which still passes: the database agrees with the chain).
    (The agreement stayed active, the tick's proposals reverting ProposalPeriodOver until it gave up.)"""
    chain, capture = escrow_chain, django_capture_on_commit_callbacks
    for api in (Api(issue_key(funded.buyer, scope="admin")), funded.seller_api):
        assert api.post("/webhooks", {"url": f"{http_server.url}/hooks"}).status_code == 201
    call_n(funded, 3)
    expires_at = int(UsageAgreement.objects.get(pk=funded.agreement_id).expires_at.timestamp())
    if until_reclaim_after == "proposals_reverted":
        settings.SETTLEMENT_PROPOSE_BACKOFF_SECONDS = 0
        set_relayer_operator(chain, spare_admin, allowed=False)
        chain.increase_time(expires_at - chain.now() + 10)
        assert tick(capture) == {"expired": 1, "proposed": 1, "finalizing": 0, "reclaiming": 0}
        assert tick(capture)["proposed"] == 1
        assert [tx.status for tx in proposals(funded.agreement_id)] == [TxStatus.FAILED] * 2
    chain.increase_time(reclaim_after(funded.agreement_id) - chain.now())
    assert tick(capture) == {"expired": 0, "proposed": 0, "finalizing": 0, "reclaiming": 1}
    assert proposals(funded.agreement_id).count() == (2 if until_reclaim_after == "proposals_reverted" else 0)

    refund = assert_reclaimed_for_the_buyer(funded, chain, funded.agreement_id, seller_unpaid=60_000)
    assert {payload["data"]["reason"] for payload in refunds(funded.agreement_id)} == {refund["reason"]}
    assert WebhookDelivery.objects.filter(event_type="agreement.refunded").count() == 2  # buyer and seller
    failures = admin_client.get("/admin/dashboard/").context["failures"]
    [unpaid] = [failure for failure in failures if failure.kind == "escrow reclaimed with the seller unpaid"]
    assert (unpaid.subject, unpaid.reason) == (funded.agreement_id, refund["reason"])
    out = io.StringIO()
    call_command("reconcile", stdout=out)
    assert f"agreement {funded.agreement_id} (refunded): the seller was not paid the 60000" in out.getvalue()
    assert tick(capture) == {"expired": 0, "proposed": 0, "finalizing": 0, "reclaiming": 0}


def test_the_buyers_own_reclaim_of_a_used_escrow_says_the_seller_lost_its_pay(
        funded, escrow_chain, django_capture_on_commit_callbacks):
    """The buyer reclaims the escrow itself past reclaimAfter, nothing having been proposed on the 3 calls it made:
    the indexed Reclaimed event refunds the agreement and says what the seller lost, as the platform's reclaim does.
    (It said "expired unused".)"""
    chain, capture = escrow_chain, django_capture_on_commit_callbacks
    call_n(funded, 3)
    chain.increase_time(reclaim_after(funded.agreement_id) - chain.now())
    esc = Escrows(chain)
    esc.tx(esc.fn("reclaim", UsageAgreement.objects.get(pk=funded.agreement_id).onchain_id), funded.buyer_account)
    index(capture)
    assert_reclaimed_for_the_buyer(funded, chain, funded.agreement_id, seller_unpaid=60_000)
    assert tick(capture) == {"expired": 0, "proposed": 0, "finalizing": 0, "reclaiming": 0}
    call_command("reconcile", stdout=io.StringIO())


@pytest.mark.parametrize("grace_change", [3600, -1800])
def test_the_reclaim_waits_for_the_escrows_own_reclaim_after_whatever_the_grace_is_now(
        grace_change, spare_admin, funded, escrow_chain, django_capture_on_commit_callbacks):
    """reclaimAfter is the grace at activation; an admin's change of the grace since applies to new escrows only.
    The tick reclaims at the escrow's reclaimAfter, not before. (It counted from the grace the contract has now:
    raised, the deposit waited past its reclaimAfter; lowered, a reclaim was sent before it and reverted.)"""
    chain, capture = escrow_chain, django_capture_on_commit_callbacks
    chain.escrow.functions.setReclaimGrace(TEST_RECLAIM_GRACE + grace_change).transact(
        {"from": spare_admin.address})
    mined_what_was_sent()
    chain.increase_time(reclaim_after(funded.agreement_id) - 60 - chain.now())
    assert tick(capture)["reclaiming"] == 0
    assert not ChainTransaction.objects.filter(agreement_id=funded.agreement_id, purpose=TxPurpose.RECLAIM).exists()
    chain.increase_time(60)
    assert tick(capture)["reclaiming"] == 1
    assert_reclaimed_for_the_buyer(funded, chain, funded.agreement_id, seller_unpaid=0)


def test_a_reclaim_past_reclaim_after_charges_the_answered_calls_whose_process_died_first(
        funded, escrow_chain, django_capture_on_commit_callbacks):
    """3 calls served and charged (0.06 USDC), then two whose server process died: one after the upstream answered
    (the seller served it: 0.02 more earned), one before (nothing served). Nothing is proposed by reclaimAfter, and
    the tick reclaims the deposit for the buyer. What the seller lost is exact: the answered call charged, the other
    released, as the proxy's reaper does, before `used` is read (it said 60000, the reservations left held)."""
    chain, capture = escrow_chain, django_capture_on_commit_callbacks
    call_n(funded, 3)
    agreement = UsageAgreement.objects.get(pk=funded.agreement_id)
    answered, _forwarding = (metering.reservation_take(
        agreement=agreement, amount=20_000, request_id=f"req-{name}", request_nonce=name, method="GET", path="/work")
        for name in ("answered", "forwarding"))
    metering.reservation_answered(reservation=answered, charge={
        "units": 1, "cost": 20_000, "upstream_status": 200, "latency_ms": 5, "request_id": "req-answered",
        "request_nonce": "answered", "method": "GET", "path": "/work"})

    chain.increase_time(reclaim_after(funded.agreement_id) - chain.now())
    assert tick(capture) == {"expired": 0, "proposed": 0, "finalizing": 0, "reclaiming": 1}

    assert_reclaimed_for_the_buyer(funded, chain, funded.agreement_id, seller_unpaid=80_000)
    assert UsageAgreement.objects.get(pk=funded.agreement_id).reserved == 0
    assert not CallIntent.objects.filter(agreement_id=funded.agreement_id).exists()


def test_an_operator_who_owns_a_party_cannot_resolve_its_dispute(funded, escrow_chain,
                                                                 django_capture_on_commit_callbacks):
    """Staff who may resolve disputes and own the seller (or the buyer) decided their own dispute: the whole deposit
    to themselves. Another operator decides it."""
    dispute(funded, escrow_chain, django_capture_on_commit_callbacks)
    for party in (funded.seller, funded.buyer):
        party.owner.is_staff = True
        party.owner.save()
        party.owner.user_permissions.add(*Permission.objects.filter(codename="change_dispute"))
        refused = Api(issue_owner_token(party.owner)).post(f"/usage-agreements/{funded.agreement_id}/resolve",
                                                           {"seller_amount_atomic": 0})
        assert refused.status_code == 403 and error_code(refused) == "operator_owns_a_party", refused.content
    assert not ChainTransaction.objects.filter(agreement_id=funded.agreement_id, purpose=TxPurpose.RESOLVE).exists()

    with django_capture_on_commit_callbacks(execute=True):
        assert staff_owner_api("change_dispute").post(f"/usage-agreements/{funded.agreement_id}/resolve",
                                                      {"seller_amount_atomic": 0}).status_code == 202


def test_seller_reported_usage_is_proposed_and_paid_at_its_last_receipt_and_every_listed_receipt_verifies(
        funded, escrow_chain, django_capture_on_commit_callbacks):
    """What a seller reports, mixed with proxied calls, is paid at the last signed receipt's cumulative amount; a
    report once the settlement is proposed is refused and changes nothing; every receipt the API lists recovers to
    the escrow's on-chain receipt signer."""
    chain, capture, agreement_id = escrow_chain, django_capture_on_commit_callbacks, funded.agreement_id
    report = f"/usage-agreements/{agreement_id}/record-usage"
    assert funded.seller_api.post(report, {"events": [{"units": 3}, {"units": 4}]},
                                  headers={"Idempotency-Key": "batch"}).status_code == 201
    call_n(funded, 2)
    ended = funded.seller_api.post(report, {"units_used": 10, "completed": True})
    assert ended.status_code == 201 and ended.json()["used_atomic"] == 12 * 20_000, ended.content
    assert tick(capture)["proposed"] == 1
    late = funded.seller_api.post(report, {"units": 1}, headers={"Idempotency-Key": "late"})
    assert late.status_code == 409 and error_code(late) == "agreement_not_active", late.content
    assert funded.seller_api.post(report, {"units_used": 11}).status_code == 409

    onchain_id = UsageAgreement.objects.get(pk=agreement_id).onchain_id
    escrow = onchain_escrow(chain, onchain_id)
    assert escrow.state == "proposed" and escrow.proposed_amount == 12 * 20_000
    usage = funded.buyer_api.get(f"/usage-agreements/{agreement_id}/usage").json()["results"]
    verified = receipts.verify_usage(usage, escrow=escrow, agreement_id=onchain_id, chain_id=chain.chain_id,
                                     escrow_address=chain.addresses["escrow"], price_per_unit=20_000,
                                     pinned_receipt_signers=chain.accounts.receipt_signer.address)
    assert verified.cumulative_amount == 12 * 20_000
    listed = funded.buyer_api.get(f"/usage-agreements/{agreement_id}/cumulative-receipts").json()["items"]
    for item in listed:
        signable = receipts.usage_receipt_signable(
            chain_id=chain.chain_id, escrow_address=chain.addresses["escrow"], agreement_id=onchain_id,
            seq=item["nonce"], cumulative_amount=item["cumulative_amount_atomic"], usage_digest=item["proof_hash"])
        assert receipts.recover_receipt_signer(signable, item["signature"]) == escrow.receipt_signer == item["signer"]
    assert max(item["cumulative_amount_atomic"] for item in listed) == escrow.proposed_amount

    chain.increase_time(3601)
    assert tick(capture)["finalizing"] == 1
    assert usdc_balance(chain, funded.seller_account.address) == funded.balances["seller"] + 12 * 20_000


def test_the_payouts_of_a_finalize_are_read_from_its_own_receipt_not_another_the_node_answers(
        funded, escrow_chain, settings, django_capture_on_commit_callbacks):
    """A caching proxy mixing its answers up answers the finalize's receipt lookup, after the relayer concluded it
    mined, with the receipt of another escrow's finalize (the same buyer and seller, another amount). The payouts were
    read from a receipt fetched outside the gateway, which checks that a receipt is of the transaction asked, and the
    Settled event taken whatever escrow it named: the agreement was recorded settled at the other escrow's amounts,
    its transfers "matching". The payouts are read from the finalize's own receipt, and its own escrow's event."""
    from tests.support.rpc_relay import RpcRelay

    chain, capture = escrow_chain, django_capture_on_commit_callbacks
    other = funded.accepted_agreement(quantity=100)
    funded.activate(other["id"], capture)
    call_n(funded, 20)
    for _ in range(5):
        assert funded.buyer_api.get(f"/metered-proxy/{other['id']}/work").status_code == 200
    for agreement_id in (funded.agreement_id, other["id"]):
        assert funded.buyer_api.post(f"/usage-agreements/{agreement_id}/complete").status_code == 200
    assert tick(capture)["proposed"] == 2
    chain.increase_time(3601)
    other_id = UsageAgreement.objects.get(pk=other["id"]).onchain_id
    others_finalize = chain.escrow.functions.finalize(other_id, escrow_terms(chain.escrow, other_id)).transact(
        {"from": chain.accounts.stranger.address})
    assert chain.w3.eth.wait_for_transaction_receipt(others_finalize)["status"] == 1

    relay = RpcRelay(chain.node.rpc_url).start()
    try:
        settings.CHAIN_RPC_URL, settings.CHAIN_RPC_RETRY_BACKOFF = relay.url, 0.01
        relay.receipts_answered_with("0x" + bytes(others_finalize).hex())
        with capture(execute=True):
            assert settlement.settlement_tick()["finalizing"] == 1
        for _ in range(3):
            confirm_all(capture)
        relay.rewrite_none()
        for _ in range(2):
            confirm_all(capture)
    finally:
        relay.stop()
    settled = funded.agreement(funded.agreement_id)
    assert settled["status"] == "settled"
    assert (settled["seller_payout_atomic"], settled["buyer_refund_atomic"]) == (400_000, 1_600_000)


def test_a_settlement_tick_against_a_node_of_another_chain_reads_and_moves_nothing(
        funded, escrow_chain, rpc_relay, settings, django_capture_on_commit_callbacks):  # noqa: F811
    """CHAIN_RPC_URL naming a node of another chain than CHAIN_ID (a provider's URL of another network, where the same
    deployer's contracts have the same addresses): the tick read that chain's escrow, found its window over, and moved
    the agreement to settling (the buyer's challenge on our chain no longer expected), a finalize queued that the
    relayer never sends there (WrongChain). The node's chain id is checked first: WrongChain, loudly, and nothing
    moves."""
    chain, capture = escrow_chain, django_capture_on_commit_callbacks
    call_n(funded, 20)
    assert funded.buyer_api.post(f"/usage-agreements/{funded.agreement_id}/complete").status_code == 200
    assert tick(capture)["proposed"] == 1
    assert funded.agreement(funded.agreement_id)["status"] == "in_challenge"
    chain.increase_time(3601)
    chain.mine()
    settings.CHAIN_ID = 8453  # the node is Anvil's 31337
    with capture(execute=False), pytest.raises(gateway.WrongChain, match="chain id"):
        settlement.settlement_tick()
    assert funded.agreement(funded.agreement_id)["status"] == "in_challenge"
    assert not ChainTransaction.objects.filter(agreement_id=funded.agreement_id, purpose=TxPurpose.FINALIZE).exists()


def test_a_proposal_a_lagging_backend_has_not_seen_by_reclaim_after_is_not_reclaimed_over(
        funded, escrow_chain, rpc_relay, django_capture_on_commit_callbacks):  # noqa: F811
    """The seller proposes its receipt in the last block before reclaimAfter; the node is a provider's pool of
    backends: the latest block, at reclaimAfter, comes from one, and the escrow read `at latest` from another that
    lacks the proposal's block. The tick took the escrow for one with nothing proposed and sent a reclaim the contract
    refused (InvalidState: proposed), at the relayer's gas. The escrow is read at the block whose clock judged it
    (as finalize reads it): nothing is reclaimed, and the proposal settles at its window's end."""
    from tests.escrow.test_indexer import seller_proposes_directly

    chain, capture = escrow_chain, django_capture_on_commit_callbacks
    call_n(funded, 3)
    funded.onchain_id = UsageAgreement.objects.get(pk=funded.agreement_id).onchain_id
    due = reclaim_after(funded.agreement_id)
    behind = hex(chain.block_number())
    chain.set_next_timestamp(due - 1)
    seller_proposes_directly(funded, chain)
    chain.set_next_timestamp(due)
    chain.mine(1)

    get_escrow = chain.escrow.functions.getEscrow(funded.onchain_id, escrow_terms(chain.escrow, funded.onchain_id))
    selector = get_escrow._encode_transaction_data()[:10]
    rpc_relay.latest_calls_answered_at(selector, behind)
    assert tick(capture)["reclaiming"] == 0
    rpc_relay.rewrite_none()
    assert list(ChainTransaction.objects.filter(agreement_id=funded.agreement_id, purpose=TxPurpose.RECLAIM)
                .values_list("status", flat=True)) == []
    index(capture)
    assert funded.agreement(funded.agreement_id)["status"] == "in_challenge"


def test_a_settlement_tick_takes_a_bounded_batch_oldest_first_and_the_next_tick_the_rest(
        funded, escrow_chain, django_capture_on_commit_callbacks, settings):
    """Every agreement due was read, locked and queued in one run: thousands due at once (a busy hour's challenge
    windows ending together, the workers back after an outage) held one worker for as long as their chain reads took,
    past the task's time limit, and the run killed there started over from the first. Each step takes at most
    SETTLEMENT_TICK_BATCH agreements, the longest due first; the next tick takes up where it ended, so none is left
    behind for ever by others that stay due (a finalize the chain's window still holds back)."""
    chain, capture = escrow_chain, django_capture_on_commit_callbacks
    agreement_ids = [funded.agreement_id]
    for _ in range(3):
        agreement = funded.accepted_agreement(quantity=100)
        funded.activate(agreement["id"], capture)
        agreement_ids.append(agreement["id"])
    for agreement_id in agreement_ids:
        assert funded.buyer_api.get(f"/metered-proxy/{agreement_id}/work").status_code == 200
        assert funded.buyer_api.post(f"/usage-agreements/{agreement_id}/complete").status_code == 200
    settings.SETTLEMENT_TICK_BATCH = 2

    first = tick(capture)["proposed"]
    assert first == 2, f"one tick proposed {first} of {len(agreement_ids)} due, its batch 2"
    assert tick(capture)["proposed"] == 2
    statuses = {funded.agreement(agreement_id)["status"] for agreement_id in agreement_ids}
    assert statuses == {"in_challenge"}

    chain.increase_time(3601)
    assert tick(capture)["finalizing"] == 2
    assert tick(capture)["finalizing"] == 2
    assert {funded.agreement(agreement_id)["status"] for agreement_id in agreement_ids} == {"settled"}
    assert tick(capture) == {"expired": 0, "proposed": 0, "finalizing": 0, "reclaiming": 0}


def test_an_agreement_that_stays_due_holds_back_none_after_it_in_the_ticks_batches(
        spare_admin, funded, escrow_chain, django_capture_on_commit_callbacks, settings):
    """A proposal the ticks gave up on (it waits for an operator's retry) stays due, first by its age, at every tick:
    a batch of the oldest alone would have been it at every tick, and the agreements after it never proposed."""
    chain, capture = escrow_chain, django_capture_on_commit_callbacks
    other = funded.accepted_agreement(quantity=100)
    funded.activate(other["id"], capture)
    settings.SETTLEMENT_PROPOSE_MAX_ATTEMPTS = 1
    settings.SETTLEMENT_TICK_BATCH = 1
    call_n(funded, 1)
    assert funded.buyer_api.post(f"/usage-agreements/{funded.agreement_id}/complete").status_code == 200
    set_relayer_operator(chain, spare_admin, allowed=False)
    assert tick(capture)["proposed"] == 1
    assert list(proposals(funded.agreement_id).values_list("status", flat=True)) == [TxStatus.FAILED]
    set_relayer_operator(chain, spare_admin, allowed=True)
    assert funded.buyer_api.get(f"/metered-proxy/{other['id']}/work").status_code == 200
    assert funded.buyer_api.post(f"/usage-agreements/{other['id']}/complete").status_code == 200

    for _ in range(2):
        tick(capture)
    assert funded.agreement(other["id"])["status"] == "in_challenge"
    assert funded.agreement(funded.agreement_id)["status"] == "active"  # still waiting for its operator


def test_a_reclaim_that_ran_out_of_gas_is_not_sent_again_at_every_tick(
        funded, escrow_chain, monkeypatch, django_capture_on_commit_callbacks):
    """A node estimating the reclaim's gas short with a plausible figure: mined out of gas, its gas paid. The escrow
    is still active past reclaimAfter, so each settlement tick queued another, estimated as short, at the platform's
    gas each time. The reclaims of an agreement back off as its proposals do (SETTLEMENT_PROPOSE_BACKOFF_SECONDS,
    doubling, SETTLEMENT_PROPOSE_MAX_ATTEMPTS), and its failure says it ran out of gas."""
    chain, capture = escrow_chain, django_capture_on_commit_callbacks
    agreement = UsageAgreement.objects.get(pk=funded.agreement_id)
    chain.increase_time(int(agreement.expires_at.timestamp()) - chain.now() + 10 + chain.reclaim_grace)
    estimate = gateway.simulate
    monkeypatch.setattr(relayer, "_SLOT_FILL_GAS", 0)
    monkeypatch.setattr(gateway, "simulate", lambda **transaction: estimate(**transaction) * 3 // 5)
    for _ in range(3):
        tick(capture)
    reclaims = list(ChainTransaction.objects.filter(agreement_id=funded.agreement_id, purpose=TxPurpose.RECLAIM))
    assert [(reclaim.status, reclaim.receipt_status) for reclaim in reclaims] == [(TxStatus.FAILED, 0)]
    assert f"({relayer.OUT_OF_GAS}: " in reclaims[0].failure_reason
    assert usdc_balance(chain, chain.addresses["escrow"]) == 2 * USDC
