"""Anyone may call the contract and the token: a buyer with an intent of its own, a front-runner copying the
relayer's pending transaction, a last-second challenge or re-proposal the indexer has not applied yet. The books
must follow what the chain did, whoever sent it."""

import io
from datetime import timedelta

import pytest
import requests
from django.core.management import call_command
from django.utils import timezone
from web3 import Web3
from x402.http import decode_payment_signature_header

from agreements import invocations
from agreements.models import SkillInvocation, UsageAgreement
from escrow import chain as gateway
from escrow import relayer, selectors, settlement, x402_onchain
from escrow.models import ChainEvent, ChainTransaction, EventEffect, RelayRevert
from escrow.tasks import submit_transaction
from sdk import typed_data as td
from sdk.typed_data import sign_typed_data
from tests.agreements.test_direct_payments import AMOUNT, FEE, Purchase, _keep_only
from tests.agreements.test_invocations import FEE as INVOCATION_FEE
from tests.agreements.test_invocations import PRICE, Market
from tests.conftest import error_code
from tests.escrow.conftest import escrow_terms
from tests.escrow.flow import USDC, fund, usdc_balance
from tests.escrow.flow import Parties, confirm_all, sign_activation
from tests.escrow.test_indexer import call_n, funded, index, mined, seller_proposes_directly  # noqa: F401

pytestmark = [pytest.mark.chain, pytest.mark.django_db]


def test_indexer_refuses_a_buyers_own_escrow_with_another_receipt_signer(escrow_chain, http_server,
                                                                       django_capture_on_commit_callbacks):
    """The buyer activates directly with an intent that names a receipt signer of its own (and no infra fee):
    the platform's receipts can then never settle on-chain, so the seller serves for nothing and the buyer
    reclaims the whole deposit. The relayer path refuses such an escrow (`_intent_differences`); the indexer
    must too, and must not make the agreement active."""
    chain, capture = escrow_chain, django_capture_on_commit_callbacks
    parties = Parties(chain, upstream_base_url=http_server.url)
    agreement = parties.accepted_agreement(quantity=10)
    package = parties.buyer_api.get(f"/usage-agreements/{agreement['id']}/activation-package").json()
    signed = sign_activation(chain, package, parties.agreement(agreement["id"]), parties.buyer_account.key)
    intent = package["intent"]
    intent["message"] = {**intent["message"], "receiptSigner": parties.buyer_account.address, "infraFee": 0}
    permit = signed["escrow_permit"]
    mined(chain, chain.escrow.functions.activate(
        td.message_tuple(intent), sign_typed_data(parties.buyer_account.key, intent),
        td.onchain_permit(value=permit["value"], deadline=permit["deadline"], signature=permit["signature"]),
        td.EMPTY_PERMIT,
    ).transact({"from": parties.buyer_account.address, "gas": 1_000_000}))

    index(capture)
    assert parties.agreement(agreement["id"])["status"] != "active"


def test_a_buyers_last_second_onchain_challenge_is_not_lost_to_the_settlement_tick(
        funded, escrow_chain, django_capture_on_commit_callbacks):  # noqa: F811
    """The buyer challenges on-chain itself just before the window closes; the settlement tick runs before the
    indexer applied it (the indexer acts at depth / on its own beat). The agreement must end disputed (what the
    chain says), so an operator can resolve it; it must not be left in settling with a finalize that reverted."""
    chain, capture = escrow_chain, django_capture_on_commit_callbacks
    call_n(funded, 3)
    seller_proposes_directly(funded, chain)
    index(capture)
    assert funded.agreement(funded.agreement_id)["status"] == "in_challenge"
    deadline = int(UsageAgreement.objects.get(pk=funded.agreement_id).challenge_deadline.timestamp())
    chain.set_next_timestamp(deadline - 1)
    mined(chain, chain.escrow.functions.challenge(funded.onchain_id, escrow_terms(chain.escrow, funded.onchain_id))
          .transact({"from": funded.buyer_account.address}))
    chain.set_next_timestamp(deadline)
    chain.mine(1)

    with capture(execute=True):
        settlement.settlement_tick()  # before the indexer's next pass
    confirm_all(capture)
    index(capture)
    onchain_state = chain.escrow.functions.getEscrow(funded.onchain_id,
                                                     escrow_terms(chain.escrow, funded.onchain_id)).call()[0]
    assert onchain_state == 3  # Disputed
    assert funded.agreement(funded.agreement_id)["status"] == "disputed"


def test_a_front_run_direct_payment_fee_permit_does_not_fail_the_payment(escrow_chain,
                                                                        django_capture_on_commit_callbacks):
    """Anyone watching the mempool can submit the buyer's fee permit (spender: the relayer) before the relayer's
    own `permit` transaction: the allowance is then granted all the same, but the relayer's permit reverts and the
    whole direct payment is failed. As for activation, a spent permit whose allowance suffices must not fail it."""
    purchase = Purchase(escrow_chain)
    body = purchase.body()
    agreement = purchase.propose(body)
    permit = body["fee_permit"]
    v, r, s = td.split_signature(permit["signature"])
    relayer_address = escrow_chain.accounts.deployer.address
    with django_capture_on_commit_callbacks(execute=False) as callbacks:
        response = purchase.parties.seller_api.put(f"/usage-agreements/{agreement['id']}/accept")
    assert response.status_code == 200, response.content
    # The front-runner copies the buyer's permit from the relayer's pending transaction.
    mined(escrow_chain, escrow_chain.usdc.functions.permit(
        purchase.buyer.address, relayer_address, permit["value"], permit["deadline"], v,
        bytes.fromhex(r[2:]), bytes.fromhex(s[2:])).transact({"from": escrow_chain.accounts.stranger.address}))
    with django_capture_on_commit_callbacks(execute=True):
        for callback in callbacks:
            callback()
    for _ in range(3):
        confirm_all(django_capture_on_commit_callbacks)
    assert purchase.parties.agreement(agreement["id"])["status"] == "paid"


def test_a_fee_permit_a_front_runner_got_mined_first_is_not_charged_to_the_buyers_relay_budget(
        escrow_chain, settings, django_capture_on_commit_callbacks):
    """The relayer's `permit` was sent, and a stranger's copy of the permit mined before it: ours reverts within its
    gas, the allowance is the relayer's all the same and the purchase is paid. The buyer did nothing wrong, yet the
    revert was charged to it (RelayRevert): a mempool observer spent any buyer's relay budget this way."""
    chain, capture = escrow_chain, django_capture_on_commit_callbacks
    settings.CHAIN_REBROADCAST_AFTER = timedelta(0)
    purchase = Purchase(chain)
    body = purchase.body()
    agreement = purchase.propose(body)
    permit = body["fee_permit"]
    v, r, s = td.split_signature(permit["signature"])
    chain.rpc("evm_setAutomine", [False])
    try:
        purchase.accept(agreement["id"], capture)  # the permit sent, pending
        ours = ChainTransaction.objects.get(agreement_id=agreement["id"], purpose="direct_fee_permit")
        chain.rpc("anvil_dropTransaction", [ours.attempts.get().tx_hash])  # evicted; the copy is mined first
    finally:
        chain.rpc("evm_setAutomine", [True])
    mined(chain, chain.usdc.functions.permit(
        purchase.buyer.address, chain.accounts.deployer.address, permit["value"], permit["deadline"], v,
        bytes.fromhex(r[2:]), bytes.fromhex(s[2:])).transact({"from": chain.accounts.stranger.address}))
    chain.mine(3)
    for _ in range(4):
        confirm_all(capture)  # our bytes rebroadcast, mined reverted; then the fee and the payment
    ours.refresh_from_db()
    assert ours.status == "failed" and ours.receipt_status == 0
    assert purchase.parties.agreement(agreement["id"])["status"] == "paid"
    assert not RelayRevert.objects.filter(transaction=ours).exists()


def test_a_direct_payment_executed_by_someone_else_is_paid_and_its_fee_not_refunded(
        escrow_chain, django_capture_on_commit_callbacks):
    """The x402 authorization (buyer -> seller) can be submitted by anyone who holds it: the buyer itself, or
    whoever copies it from the relayer's pending transaction. Once the fee is collected, the buyer sends it
    itself: the seller is paid, the relayer's copy reverts (authorization used) and the platform takes that for a
    failed payment, refunding the fee from the treasury and marking the agreement payment_failed."""
    purchase, body, agreement, (buyer, seller, fee_recipient, treasury) = _direct_purchase_accepted(
        escrow_chain, django_capture_on_commit_callbacks)

    payload = decode_payment_signature_header(body["payment_header"]).payload
    auth = payload["authorization"]
    v, r, s = td.split_signature(payload["signature"])
    mined(escrow_chain, escrow_chain.usdc.functions.transferWithAuthorization(
        auth["from"], auth["to"], int(auth["value"]), int(auth["validAfter"]), int(auth["validBefore"]),
        bytes.fromhex(auth["nonce"][2:]), v, bytes.fromhex(r[2:]), bytes.fromhex(s[2:]),
    ).transact({"from": purchase.buyer.address}))

    for _ in range(3):
        confirm_all(django_capture_on_commit_callbacks)
    assert purchase.balances() == (buyer - AMOUNT - FEE, seller + AMOUNT, fee_recipient + FEE, treasury)
    assert purchase.parties.agreement(agreement["id"])["status"] == "paid"


def _skill_payment_a_stranger_copies(escrow_chain, http_server, monkeypatch, *, forks: list | None = None):
    """A market and a buyer's signed payment of its "translate" skill whose relayed transfer a stranger front-runs:
    right after the relayer's simulation, a copy of the authorization is mined from the stranger's account (the
    chain's snapshot before it appended to `forks`, for a test's reorg)."""
    market = Market(escrow_chain, http_server)
    market.upstream.responses.append((200, {"translation": "bonjour"}))
    payment = market.pay("translate")
    payload = decode_payment_signature_header(payment).payload
    auth = payload["authorization"]
    v, r, s = td.split_signature(payload["signature"])
    simulate = x402_onchain.simulate

    def simulated_then_front_run(authorization):
        simulate(authorization)
        if forks is not None:
            forks.append(escrow_chain.snapshot())
        mined(escrow_chain, escrow_chain.usdc.functions.transferWithAuthorization(
            auth["from"], auth["to"], int(auth["value"]), int(auth["validAfter"]), int(auth["validBefore"]),
            bytes.fromhex(auth["nonce"][2:]), v, bytes.fromhex(r[2:]), bytes.fromhex(s[2:]),
        ).transact({"from": escrow_chain.accounts.stranger.address}))

    monkeypatch.setattr(x402_onchain, "simulate", simulated_then_front_run)
    return market, payment


def _called_on_a_shallow_copy(escrow_chain, http_server, monkeypatch, settings, capture, *, forks=None):
    """A skill call at a confirmation depth of 5 whose authorization a stranger's copy used first, one block deep:
    answered 202, not run on the copy. Returns its payment, left queued until the copy is deep."""
    settings.CHAIN_CONFIRMATIONS = 5
    market, payment = _skill_payment_a_stranger_copies(escrow_chain, http_server, monkeypatch, forks=forks)
    settings.INVOCATION_PAYMENT_WAIT_SECONDS = 0.5
    with capture(execute=True):
        response = market.call("translate", payment)
    assert response.status_code == 202, response.content
    return ChainTransaction.objects.get(purpose="invocation_payment")


def test_an_invocation_payment_front_run_is_not_kept_by_the_treasury_unaccounted(
        escrow_chain, http_server, monkeypatch, django_capture_on_commit_callbacks):
    """Anyone who sees the relayer's pending transferWithAuthorization (buyer -> treasury) can submit a copy
    first: the buyer's money reaches the treasury, the relayer's own transaction reverts, and the invocation is
    recorded as 'payment failed, nothing was charged' with no refund queued: the treasury keeps the price."""
    market, payment = _skill_payment_a_stranger_copies(escrow_chain, http_server, monkeypatch)
    buyer, seller, treasury = market.balances()
    with django_capture_on_commit_callbacks(execute=True):
        market.call("translate", payment)
    confirm_all(django_capture_on_commit_callbacks)
    with django_capture_on_commit_callbacks(execute=True):  # later: the sweeper runs paid invocations left behind
        invocations.invocations_sweep(now=timezone.now() + timedelta(days=1))
    for _ in range(2):
        confirm_all(django_capture_on_commit_callbacks)
    # The money did arrive: the paid call runs and the seller is paid, as if our own transaction had carried it.
    assert market.balances() == (buyer - PRICE, seller + PRICE - INVOCATION_FEE, treasury + INVOCATION_FEE)


def test_an_invocation_paid_by_a_copy_of_its_authorization_runs_only_once_the_copy_is_at_the_confirmation_depth(
        escrow_chain, http_server, monkeypatch, settings, django_capture_on_commit_callbacks):
    """Our payment waits for CHAIN_CONFIRMATIONS before the seller is called. A copy of the authorization mined first
    (the buyer's own, or anyone's) had the relayer's payment refused at its simulation and concluded at once on the
    copy, one block deep: the seller was called on a payment a shallow reorg could take."""
    capture = django_capture_on_commit_callbacks
    payment_tx = _called_on_a_shallow_copy(escrow_chain, http_server, monkeypatch, settings, capture)
    assert payment_tx.status == "queued"
    escrow_chain.mine(4)
    with capture(execute=True):  # the sweep sends it again: concluded on the copy, now 5 deep
        relayer.transaction_submit(transaction_id=payment_tx.pk)
    payment_tx.refresh_from_db()
    assert payment_tx.status == "failed" and payment_tx.outcome_evidence["used_by"]
    assert SkillInvocation.objects.get().money != "authorized"


def test_an_invocation_paid_by_a_copy_only_a_stale_backend_holds_does_not_run_on_a_fresh_backends_head(
        escrow_chain, http_server, monkeypatch, settings, django_capture_on_commit_callbacks):
    """A load-balanced provider: the backend answering the calls, logs and blocks is still on a branch the chain
    dropped, where a copy of the authorization was mined (at its head), and another names the head of the chain,
    grown 4 blocks past that height without the copy. The copy's depth counted from that head concluded the payment on
    it (the seller called) with no payment on the chain. Only blocks that descend from the copy's count: it waits, and
    is concluded on the copy once blocks on top of it make it deep."""
    from tests.support.rpc_relay import RpcRelay

    capture = django_capture_on_commit_callbacks
    payment_tx = _called_on_a_shallow_copy(escrow_chain, http_server, monkeypatch, settings, capture)
    relay = RpcRelay(escrow_chain.node.rpc_url).start()
    node, settings.CHAIN_RPC_URL = settings.CHAIN_RPC_URL, relay.url
    relay.head_named_ahead(4)
    try:
        with capture(execute=True):  # the sweep sends it again
            submit_transaction(str(payment_tx.pk))
    finally:
        relay.stop()
        settings.CHAIN_RPC_URL = node
    payment_tx.refresh_from_db()
    assert payment_tx.status == "queued", "concluded on a copy 1 block deep, by a head whose blocks do not hold it"
    assert SkillInvocation.objects.get().money == "authorized"
    escrow_chain.mine(4)
    with capture(execute=True):
        submit_transaction(str(payment_tx.pk))
    payment_tx.refresh_from_db()
    assert payment_tx.status == "failed" and payment_tx.outcome_evidence["used_by"]
    assert SkillInvocation.objects.get().money != "authorized"


def test_an_invocation_waiting_on_a_shallow_copy_a_reorg_takes_is_paid_by_our_own_payment(
        escrow_chain, http_server, monkeypatch, settings, django_capture_on_commit_callbacks):
    """The payment waiting for a copy of its authorization to be deep enough (above) is sent itself once a reorg took
    the copy's block: nothing was concluded on the copy, and the seller is called on our payment at the depth."""
    capture = django_capture_on_commit_callbacks
    forks = []
    payment_tx = _called_on_a_shallow_copy(escrow_chain, http_server, monkeypatch, settings, capture, forks=forks)
    escrow_chain.reorg(forks[0])  # the copy's block is gone
    with capture(execute=True):  # the sweep sends it again: the authorization is unused, ours goes out
        relayer.transaction_submit(transaction_id=payment_tx.pk)
    payment_tx.refresh_from_db()
    assert payment_tx.status == "submitted"
    escrow_chain.mine(5)
    confirm_all(capture)
    payment_tx.refresh_from_db()
    assert payment_tx.status == "confirmed"
    assert SkillInvocation.objects.get().money != "authorized"


def test_a_direct_payment_made_by_a_copy_is_paid_only_once_the_copy_is_at_the_confirmation_depth(
        escrow_chain, settings, django_capture_on_commit_callbacks):
    """As for an invocation: the buyer's copy of the authorization mined before the relayer's payment had that payment
    refused at its simulation and the purchase counted paid at once, one block deep, where ours would have waited
    for CHAIN_CONFIRMATIONS (a shallow reorg may take the copy)."""
    capture = django_capture_on_commit_callbacks
    purchase, body, agreement, _ = _direct_purchase_accepted(escrow_chain, capture)
    settings.CHAIN_CONFIRMATIONS = 5  # the payment's, queued once the fee is collected
    payload = decode_payment_signature_header(body["payment_header"]).payload
    auth = payload["authorization"]
    v, r, s = td.split_signature(payload["signature"])
    mined(escrow_chain, escrow_chain.usdc.functions.transferWithAuthorization(
        auth["from"], auth["to"], int(auth["value"]), int(auth["validAfter"]), int(auth["validBefore"]),
        bytes.fromhex(auth["nonce"][2:]), v, bytes.fromhex(r[2:]), bytes.fromhex(s[2:]),
    ).transact({"from": purchase.buyer.address}))
    for _ in range(2):
        confirm_all(capture)
    payment_tx = ChainTransaction.objects.get(purpose="direct_payment")
    assert payment_tx.status == "queued"
    assert purchase.parties.agreement(agreement["id"])["status"] != "paid"
    escrow_chain.mine(4)
    with capture(execute=True):  # the sweep sends it again: concluded on the copy, now 5 deep
        relayer.transaction_submit(transaction_id=payment_tx.pk)
    assert purchase.parties.agreement(agreement["id"])["status"] == "paid"


def test_a_direct_payment_the_buyer_made_itself_before_the_accept_is_paid_and_its_fee_collected(
        escrow_chain, settings, django_capture_on_commit_callbacks):
    """Anyone may submit the buyer's signed authorization, the buyer too, before the seller accepts: the seller is
    paid the price then. The accept's simulation found the authorization used and recorded the purchase
    payment_failed, "nothing was charged", the seller paid all the same. The transfer with exactly this purchase's
    authorization is its payment, whoever sent it: the purchase goes on (the fee collected, as when a copy is mined
    after the accept), counted paid by that transaction once it is at the confirmation depth."""
    capture = django_capture_on_commit_callbacks
    purchase = Purchase(escrow_chain)
    body = purchase.body()
    agreement = purchase.propose(body)
    _keep_only(purchase, AMOUNT + FEE)  # what the purchase needs, no more
    buyer, seller, fee_recipient, treasury = purchase.balances()
    payload = decode_payment_signature_header(body["payment_header"]).payload
    auth = payload["authorization"]
    v, r, s = td.split_signature(payload["signature"])
    copy = escrow_chain.usdc.functions.transferWithAuthorization(
        auth["from"], auth["to"], int(auth["value"]), int(auth["validAfter"]), int(auth["validBefore"]),
        bytes.fromhex(auth["nonce"][2:]), v, bytes.fromhex(r[2:]), bytes.fromhex(s[2:]),
    ).transact({"from": purchase.buyer.address})
    mined(escrow_chain, copy)

    accepted = purchase.accept(agreement["id"], capture)
    assert accepted["status"] == "paying", accepted["status_reason"]
    confirm_all(capture)  # permit confirmed; the fee transfer is sent
    settings.CHAIN_CONFIRMATIONS = 5  # the payment's, queued once the fee is collected
    confirm_all(capture)
    payment_tx = ChainTransaction.objects.get(purpose="direct_payment")
    assert payment_tx.status == "queued"  # the copy is not deep enough yet
    escrow_chain.mine(4)
    with capture(execute=True):
        relayer.transaction_submit(transaction_id=payment_tx.pk)

    paid = purchase.parties.agreement(agreement["id"])
    assert paid["status"] == "paid"
    assert paid["payment_tx_hash"] == "0x" + bytes(copy).hex().removeprefix("0x")
    assert paid["buyer_refund_atomic"] is None
    assert purchase.balances() == (buyer - AMOUNT - FEE, seller + AMOUNT, fee_recipient + FEE, treasury)
    assert not RelayRevert.objects.exists()


def test_the_escrow_is_found_when_a_front_runner_activated_it_before_our_reverted_copy(
        escrow_chain, http_server, settings, django_capture_on_commit_callbacks):
    """A front-runner copies the relayer's pending `activate` and gets it mined first; the relayer's own copy is
    dropped, rebroadcast and mined a few blocks later, reverting AgreementExists. The escrow is the buyer's and
    active; but `selectors.onchain_escrow` searches the Activated event only from the platform's earliest mined
    activate transaction (the reverted one) minus CHAIN_CONFIRMATIONS, misses it and reports no escrow at all
    (reconcile, escrow-status, the proposal's challenge deadline read from it)."""
    chain, capture = escrow_chain, django_capture_on_commit_callbacks
    settings.CHAIN_REBROADCAST_AFTER = timedelta(0)
    parties = Parties(chain, upstream_base_url=http_server.url)
    agreement, ours = _activation_copied_by_a_front_runner(chain, parties, capture)
    chain.mine(3)
    confirm_all(capture)  # no receipt: the relayer rebroadcasts its bytes, mined now and reverted
    confirm_all(capture)
    ours.refresh_from_db()
    assert ours.status == "failed" and ours.receipt_status == 0
    index(capture)
    assert parties.agreement(agreement["id"])["status"] == "active"
    assert selectors.onchain_escrow(agreement=UsageAgreement.objects.get(pk=agreement["id"]))["state"] == "active"
    call_command("reconcile", stdout=io.StringIO())


def test_an_activation_a_front_runner_copied_first_is_not_charged_to_the_buyers_relay_budget(
        escrow_chain, http_server, settings, django_capture_on_commit_callbacks):
    """Our copy of the activation mined after a stranger's reverts AgreementExists, within its gas: the escrow is the
    buyer's, as it signed it. The buyer did nothing wrong, yet the revert was charged to it (RelayRevert): a mempool
    observer copying every activation of a buyer spent its relay budget, and its next activation was refused 429."""
    chain, capture = escrow_chain, django_capture_on_commit_callbacks
    settings.CHAIN_REBROADCAST_AFTER = timedelta(0)
    parties = Parties(chain, upstream_base_url=http_server.url)
    agreement, ours = _activation_copied_by_a_front_runner(chain, parties, capture)
    chain.mine(3)
    confirm_all(capture)
    confirm_all(capture)
    ours.refresh_from_db()
    assert ours.status == "failed" and ours.receipt_status == 0
    assert parties.agreement(agreement["id"])["status"] == "active"
    assert not RelayRevert.objects.filter(transaction=ours).exists()


def test_an_escrow_a_front_runner_activated_names_the_copys_transaction_not_our_reverted_one(
        escrow_chain, http_server, settings, django_capture_on_commit_callbacks):
    """Our activation reverted AgreementExists after a stranger's copy funded the escrow, and the relayer concluded it
    before the indexer applied the copy's Activated event: the agreement recorded our reverted transaction as its
    activation (`activation_tx_hash`, shown to both parties), and the event, finding it active, changed nothing."""
    chain, capture = escrow_chain, django_capture_on_commit_callbacks
    settings.CHAIN_REBROADCAST_AFTER = timedelta(0)
    parties = Parties(chain, upstream_base_url=http_server.url)
    agreement, ours = _activation_copied_by_a_front_runner(chain, parties, capture)
    chain.mine(3)
    confirm_all(capture)
    confirm_all(capture)
    ours.refresh_from_db()
    assert ours.status == "failed" and ours.receipt_status == 0
    index(capture)
    copy = ChainEvent.objects.get(agreement_id=agreement["id"], name="Activated").tx_hash
    assert copy != ours.mined_tx_hash
    assert parties.agreement(agreement["id"])["activation_tx_hash"] == copy


def test_a_reorg_that_takes_only_the_block_of_our_activation_that_reverted_after_the_copy_leaves_the_agreement_active(
        escrow_chain, http_server, settings, django_capture_on_commit_callbacks):
    """Our activation reverted AgreementExists a few blocks after a stranger's copy funded the escrow, and was
    concluded on the copy: the agreement is active by it. A reorg takes only our activation's block, the copy stays on
    the chain (the escrow funded): the agreement stays active by the copy, and ours, sent again, reverts again."""
    chain, capture = escrow_chain, django_capture_on_commit_callbacks
    settings.CHAIN_REBROADCAST_AFTER = timedelta(0)
    parties = Parties(chain, upstream_base_url=http_server.url)
    agreement, ours = _activation_copied_by_a_front_runner(chain, parties, capture)
    after_the_copy = chain.snapshot()
    chain.mine(3)
    confirm_all(capture)
    confirm_all(capture)
    ours.refresh_from_db()
    assert ours.status == "failed" and ours.receipt_status == 0
    copy = ours.outcome_evidence["agreement_exists"]["activated_by"]
    assert copy != ours.mined_tx_hash
    active = parties.agreement(agreement["id"])
    assert (active["status"], active["activation_tx_hash"]) == ("active", copy)

    chain.reorg(after_the_copy)  # our activation's block taken, the copy's kept
    with capture(execute=True):
        assert relayer.transactions_reopen_reorged() == 1
    active = parties.agreement(agreement["id"])
    assert (active["status"], active["activation_tx_hash"]) == ("active", copy)
    chain.mine(3)
    for _ in range(2):  # ours, sent again, reverts again
        confirm_all(capture)
    ours.refresh_from_db()
    assert ours.status == "failed" and ours.outcome_evidence["agreement_exists"]["activated_by"] == copy
    active = parties.agreement(agreement["id"])
    assert (active["status"], active["activation_tx_hash"]) == ("active", copy)
    index(capture)
    assert parties.agreement(agreement["id"])["status"] == "active"


def test_a_seller_re_proposal_just_before_the_window_closes_is_not_finalized_early(
        funded, escrow_chain, django_capture_on_commit_callbacks):  # noqa: F811
    """The seller re-proposes a higher receipt just before the window closes (the contract restarts the window);
    the settlement tick runs before the indexer applied it and finalizes by our stale deadline: the finalize
    reverts ChallengeWindowOpen and the agreement is left settling, where the buyer can no longer challenge the
    new, higher amount through the API although the chain's window is open."""
    chain, capture = escrow_chain, django_capture_on_commit_callbacks
    call_n(funded, 3)
    seller_proposes_directly(funded, chain, seq=2)
    index(capture)
    deadline = int(UsageAgreement.objects.get(pk=funded.agreement_id).challenge_deadline.timestamp())
    chain.set_next_timestamp(deadline - 1)
    seller_proposes_directly(funded, chain, seq=3)
    chain.set_next_timestamp(deadline)
    chain.mine(1)

    with capture(execute=True):
        settlement.settlement_tick()
    confirm_all(capture)
    index(capture)
    assert funded.agreement(funded.agreement_id)["status"] == "in_challenge"


def _spend_nonce_on_a_transfer_to(chain, buyer, auth: dict, to: str) -> None:
    """The buyer signs another EIP-3009 transfer with the same nonce, to a wallet of its own, and gets it mined: the
    token marks the nonce used (AuthorizationUsed(buyer, nonce)) exactly as the authorization it gave would have."""
    typed = td.transfer_with_authorization(
        chain_id=chain.chain_id, token_address=chain.usdc.address, from_address=buyer.address, to_address=to,
        value=int(auth["value"]), valid_after=0, valid_before=int(auth["validBefore"]), nonce=auth["nonce"],
        token_name=chain.usdc.functions.name().call())
    v, r, s = td.split_signature(sign_typed_data(buyer.key, typed))
    mined(chain, chain.usdc.functions.transferWithAuthorization(
        buyer.address, to, int(auth["value"]), 0, int(auth["validBefore"]), bytes.fromhex(auth["nonce"][2:]), v,
        bytes.fromhex(r[2:]), bytes.fromhex(s[2:])).transact({"from": buyer.address}))


@pytest.mark.parametrize("to_own_wallet", [True, False])
def test_an_invocation_whose_nonce_the_buyer_spent_on_another_transfer_is_not_paid(
        escrow_chain, http_server, monkeypatch, django_capture_on_commit_callbacks, to_own_wallet):
    """AuthorizationUsed names the payer and the nonce only. A buyer that signs a second transfer with its payment's
    nonce (to a wallet of its own, or of 1 base unit to the treasury) and gets it mined before the relayer's payment
    (which then reverts: nonce used) did not pay the price; the invocation must fail, the seller never be called,
    nothing paid out or refunded. (Before: counted paid, the seller called and paid out of the treasury's float.)"""
    market = Market(escrow_chain, http_server)
    fund(escrow_chain, market.treasury, USDC)  # the treasury's float: what a payout would take from
    market.upstream.responses.append((200, {"translation": "bonjour"}))
    payment = market.pay("translate")
    auth = decode_payment_signature_header(payment).payload["authorization"]
    own_wallet = escrow_chain.accounts.stranger.address
    spent = PRICE if to_own_wallet else 1
    buyer, seller, treasury = market.balances()
    simulate = x402_onchain.simulate

    def simulated_then_nonce_spent(authorization):
        simulate(authorization)
        _spend_nonce_on_a_transfer_to(escrow_chain, market.buyer, {**auth, "value": spent},
                                      own_wallet if to_own_wallet else market.treasury)

    monkeypatch.setattr(x402_onchain, "simulate", simulated_then_nonce_spent)
    with django_capture_on_commit_callbacks(execute=True):
        response = market.call("translate", payment)
    confirm_all(django_capture_on_commit_callbacks)
    with django_capture_on_commit_callbacks(execute=True):
        invocations.invocations_sweep(now=timezone.now() + timedelta(days=1))
    for _ in range(2):
        confirm_all(django_capture_on_commit_callbacks)

    assert market.balances() == (buyer - spent, seller, treasury + (0 if to_own_wallet else spent))
    assert market.upstream.requests == []
    assert response.status_code == 402 and response.json()["error"] == "payment_failed", response.content
    assert usdc_balance(escrow_chain, own_wallet) == (spent if to_own_wallet else 0)


def test_a_direct_payment_whose_nonce_the_buyer_spent_on_a_transfer_to_itself_is_not_paid(
        escrow_chain, django_capture_on_commit_callbacks):
    """As for an invocation: the buyer spends its x402 authorization's nonce on a transfer to a wallet of its own
    once the fee is collected; the relayer's payment reverts (nonce used) and the seller received nothing, so the
    purchase must not be paid. (Before: `paid`, naming the buyer's transfer to itself.)"""
    purchase, body, agreement, (buyer, seller, fee_recipient, treasury) = _direct_purchase_accepted(
        escrow_chain, django_capture_on_commit_callbacks)
    auth = decode_payment_signature_header(body["payment_header"]).payload["authorization"]
    own_wallet = escrow_chain.accounts.stranger.address
    _spend_nonce_on_a_transfer_to(escrow_chain, purchase.buyer, auth, own_wallet)

    for _ in range(3):
        confirm_all(django_capture_on_commit_callbacks)

    assert purchase.parties.agreement(agreement["id"])["status"] == "payment_failed"
    assert purchase.balances()[1] == seller
    assert usdc_balance(escrow_chain, own_wallet) == AMOUNT


def test_a_front_run_activation_whose_revert_reason_read_times_out_is_not_recorded_as_failed(
        escrow_chain, http_server, settings, monkeypatch, django_capture_on_commit_callbacks):
    """The relayer's copy of the activation reverted (AgreementExists: a front-runner's copy ran first). The replay
    that reads why times out once: that is no revert reason. The outcome waits for the next poll, which finds
    AgreementExists, reads the escrow and makes the agreement active, rather than recording the timeout as the
    reason and the activation as failed."""
    chain, capture = escrow_chain, django_capture_on_commit_callbacks
    settings.CHAIN_REBROADCAST_AFTER = timedelta(0)
    parties = Parties(chain, upstream_base_url=http_server.url)
    agreement, ours = _activation_copied_by_a_front_runner(chain, parties, capture)
    confirm_all(capture)  # no receipt: the relayer rebroadcasts its bytes, mined now and reverted
    node = gateway.w3().eth
    call = node.call
    timeouts = []

    def replay_times_out_once(transaction, block_identifier=None, *args, **kwargs):
        if block_identifier is not None and not timeouts:
            timeouts.append(block_identifier)
            raise requests.Timeout("Read timed out.")
        return call(transaction, block_identifier, *args, **kwargs)

    monkeypatch.setattr(node, "call", replay_times_out_once)
    confirm_all(capture)
    confirm_all(capture)
    ours.refresh_from_db()
    assert timeouts and ours.status == "failed" and "AgreementExists" in ours.failure_reason, ours.failure_reason
    assert parties.agreement(agreement["id"])["status"] == "active"


def _activation_copied_by_a_front_runner(chain, parties, capture):
    """An accepted agreement whose activation the relayer sent, evicted from the pool before it was mined, and a
    stranger's copy of its bytes mined instead: (the agreement, our transaction)."""
    agreement = parties.accepted_agreement(quantity=10)
    chain.rpc("evm_setAutomine", [False])
    try:
        with capture(execute=True):
            response = parties.buyer_api.post(f"/usage-agreements/{agreement['id']}/activate-escrow",
                                              parties.signed_activation(agreement["id"]))
        assert response.status_code == 202, response.content
        ours = ChainTransaction.objects.get(agreement_id=agreement["id"], purpose="activate")
        chain.rpc("anvil_dropTransaction", [ours.attempts.get().tx_hash])  # evicted from the pool
    finally:
        chain.rpc("evm_setAutomine", [True])
    mined(chain, chain.w3.eth.send_transaction({"from": chain.accounts.stranger.address, "to": ours.to_address,
                                                "data": ours.data, "gas": 1_000_000}))
    return agreement, ours


def _direct_purchase_accepted(chain, capture):
    """A direct purchase proposed and accepted, its fee permit confirmed and the fee's transfer sent: (the purchase,
    the proposal's body, the agreement, the balances before the accept)."""
    purchase = Purchase(chain)
    fund(chain, purchase.treasury, USDC)  # the treasury's float for refunds
    body = purchase.body()
    agreement = purchase.propose(body)
    balances = purchase.balances()
    purchase.accept(agreement["id"], capture)
    confirm_all(capture)  # permit confirmed; the fee transfer is sent
    return purchase, body, agreement, balances


def test_a_sellers_proposal_of_an_earlier_receipt_is_replaced_with_the_last_one(
        funded, escrow_chain, django_capture_on_commit_callbacks):  # noqa: F811
    """The seller proposes one of its earlier receipts on-chain itself. The contract restarts the window at each
    proposal with a higher seq, so a seller holding receipts 1..N can re-propose the next one just before each window
    closes and keep the buyer's refund locked for N windows (up to 30 days each). The settlement tick proposes the
    agreement's last receipt while the window is open: the seller then has no higher receipt left, and the escrow
    settles one window later at what was used."""
    chain, capture = escrow_chain, django_capture_on_commit_callbacks
    call_n(funded, 3)
    seller_proposes_directly(funded, chain, seq=1)
    index(capture)
    assert funded.agreement(funded.agreement_id)["status"] == "in_challenge"

    with capture(execute=True):
        settlement.settlement_tick()
    confirm_all(capture)
    index(capture)

    agreement = UsageAgreement.objects.get(pk=funded.agreement_id)
    onchain = selectors.onchain_escrow(agreement=agreement)
    assert (onchain["lastSeq"], onchain["settledAmount"]) == (3, 60_000)
    assert int(agreement.challenge_deadline.timestamp()) == onchain["challengeDeadline"]
    assert (agreement.status, agreement.proposed_seq) == ("in_challenge", 3)
    assert not ChainEvent.objects.filter(agreement_id=agreement.pk, effect=EventEffect.FAILED).exists()
    with pytest.raises(Exception, match=Web3.keccak(text="StaleReceipt(uint256,uint256)")[:4].hex()):
        seller_proposes_directly(funded, chain, seq=2)


def _activation_a_stranger_copies(parties: Parties, capture) -> tuple[dict, ChainTransaction, str, dict]:
    """An accepted agreement whose buyer asks for its activation, and a stranger's copy of the relayer's activation
    (the buyer's signed intent) mined before the relayer sends ours, which then runs its submission: (the agreement,
    our transaction, the chain's snapshot from before the copy, for a test's reorg, and the copy's receipt)."""
    chain = parties.chain
    agreement = parties.accepted_agreement(quantity=10)
    with capture(execute=False) as callbacks:
        response = parties.buyer_api.post(f"/usage-agreements/{agreement['id']}/activate-escrow",
                                          parties.signed_activation(agreement["id"]))
    assert response.status_code == 202, response.content
    ours = ChainTransaction.objects.get(agreement_id=agreement["id"], purpose="activate")
    fork = chain.snapshot()
    copy_hash = chain.w3.eth.send_transaction({"from": chain.accounts.stranger.address, "to": ours.to_address,
                                               "data": ours.data, "gas": 1_000_000})
    mined(chain, copy_hash)
    with capture(execute=True):
        for callback in callbacks:
            callback()
    return agreement, ours, fork, chain.w3.eth.get_transaction_receipt(copy_hash)


def test_an_activation_a_copy_of_the_buyers_intent_ran_before_ours_was_sent_waits_for_the_copys_depth(
        escrow_chain, http_server, settings, django_capture_on_commit_callbacks):
    """Anyone holding the buyer's signed intent (the buyer itself, a stranger who saw it) gets it mined before the
    relayer sends ours: our simulation reverts AgreementExists. Ours mined waits for CHAIN_CONFIRMATIONS; concluded on
    the copy, it made the agreement active at once, one block deep, where a shallow reorg takes the escrow and the
    seller serves an agreement nobody funded."""
    chain, capture = escrow_chain, django_capture_on_commit_callbacks
    settings.CHAIN_CONFIRMATIONS = 5
    parties = Parties(chain, upstream_base_url=http_server.url)
    agreement, ours, _fork, copy = _activation_a_stranger_copies(parties, capture)
    ours.refresh_from_db()
    assert ours.status == "queued"
    assert parties.agreement(agreement["id"])["status"] != "active"
    chain.mine(4)
    with capture(execute=True):  # the sweep sends it again: concluded on the copy, now 5 deep
        relayer.transaction_submit(transaction_id=ours.pk)
    ours.refresh_from_db()
    assert ours.status == "failed" and ours.outcome_evidence[relayer.EVIDENCE_BLOCK]["number"] == copy["blockNumber"]
    assert parties.agreement(agreement["id"])["status"] == "active"
    assert parties.agreement(agreement["id"])["activation_tx_hash"] == copy["transactionHash"].to_0x_hex()
    assert not RelayRevert.objects.filter(transaction=ours).exists()


def test_an_invocation_waiting_on_a_copy_of_its_authorization_is_concluded_by_the_poll_once_the_copy_is_deep(
        escrow_chain, http_server, monkeypatch, settings, django_capture_on_commit_callbacks):
    """The payment left queued while the copy of its authorization is shallow (above) was asked again only by the
    sweep of queued transactions (every CHAIN_SWEEP_AFTER, 30 s), so a call paid by a copy answered up to a sweep
    after the copy was deep enough. The confirmation poll (every few seconds) sends it again once the copy's block is
    at the confirmation depth."""
    capture = django_capture_on_commit_callbacks
    payment_tx = _called_on_a_shallow_copy(escrow_chain, http_server, monkeypatch, settings, capture)
    confirm_all(capture)  # the copy is 1 deep: it waits
    payment_tx.refresh_from_db()
    assert payment_tx.status == "queued"
    escrow_chain.mine(4)
    confirm_all(capture)  # no sweep: the poll sends it again, concluded on the copy now 5 deep
    payment_tx.refresh_from_db()
    assert payment_tx.status == "failed" and payment_tx.outcome_evidence["used_by"]
    assert SkillInvocation.objects.get().money != "authorized"


def test_an_activation_waiting_on_a_shallow_copy_a_reorg_takes_is_sent_itself(
        escrow_chain, http_server, settings, django_capture_on_commit_callbacks):
    """The activation left queued while the copy of the buyer's intent is shallow (above) goes out itself once a
    reorg took the copy's block: nothing was concluded on the copy, and the escrow is funded by ours."""
    chain, capture = escrow_chain, django_capture_on_commit_callbacks
    settings.CHAIN_CONFIRMATIONS = 5
    parties = Parties(chain, upstream_base_url=http_server.url)
    agreement, ours, fork, _copy = _activation_a_stranger_copies(parties, capture)
    ours.refresh_from_db()
    assert ours.status == "queued"
    chain.reorg(fork)  # the copy's block is gone
    chain.mine(4)  # the head the copy would have been deep at
    confirm_all(capture)  # the poll sends it again: the escrow is not funded, ours goes out
    ours.refresh_from_db()
    assert ours.status in ("submitted", "mined") and ours.attempts.count() == 1
    chain.mine(5)
    confirm_all(capture)
    ours.refresh_from_db()
    assert ours.status == "confirmed"
    assert parties.agreement(agreement["id"])["status"] == "active"
    assert parties.agreement(agreement["id"])["activation_tx_hash"] == ours.mined_tx_hash


def _activation_concluded_on_a_copy_a_deep_reorg_takes(parties: Parties, capture) -> tuple[dict, ChainTransaction]:
    """Our activation concluded on a stranger's copy at the confirmation depth (5; the agreement active), then a
    reorg deeper than the depth takes the copy's block before the indexer applied its Activated event, and the poll
    reopens ours and sends it: (the agreement, our transaction)."""
    chain = parties.chain
    agreement, ours, fork, _copy = _activation_a_stranger_copies(parties, capture)
    chain.mine(4)
    with capture(execute=True):  # concluded on the copy, now 5 deep
        relayer.transaction_submit(transaction_id=ours.pk)
    assert parties.agreement(agreement["id"])["status"] == "active"
    chain.reorg(fork)  # deeper than the depth: the copy's block is gone, the indexer never applied it
    confirm_all(capture)  # the poll reopens ours and sends it
    return agreement, ours


def test_an_activation_concluded_on_a_copy_a_deep_reorg_takes_leaves_the_agreement_unserved_until_ours_is_mined(
        escrow_chain, http_server, settings, django_capture_on_commit_callbacks):
    """An activation concluded on a copy of the buyer's intent at the confirmation depth (above) made the agreement
    active. A reorg deeper than the depth takes the copy's block before the indexer applied its Activated event (so it
    has nothing to roll back): the relayer reopens ours and sends it, but the agreement stayed active meanwhile and the
    proxy served metered calls against an escrow the chain does not hold. It goes back to submitting until ours is
    confirmed."""
    chain, capture = escrow_chain, django_capture_on_commit_callbacks
    settings.CHAIN_CONFIRMATIONS = 5
    parties = Parties(chain, upstream_base_url=http_server.url)
    agreement, ours = _activation_concluded_on_a_copy_a_deep_reorg_takes(parties, capture)
    ours.refresh_from_db()
    assert ours.status in ("submitted", "mined")
    assert parties.agreement(agreement["id"])["status"] == "submitting"
    refused = parties.buyer_api.get(f"/metered-proxy/{agreement['id']}/work")
    assert refused.status_code == 409 and error_code(refused) == "agreement_not_active", refused.content
    chain.mine(5)
    confirm_all(capture)
    ours.refresh_from_db()
    assert ours.status == "confirmed"
    assert parties.agreement(agreement["id"])["status"] == "active"
    assert parties.agreement(agreement["id"])["activation_tx_hash"] == ours.mined_tx_hash


def test_an_activation_a_deep_reorg_undid_is_told_to_the_webhooks_that_were_told_it_was_active(
        escrow_chain, http_server, settings, django_capture_on_commit_callbacks):
    """The activation above, told to the parties' webhooks as `agreement.active`, undone by a reorg deeper than the
    depth (`agreement_activation_undone`): a subscriber of `agreement.active` alone (a seller that starts serving)
    was told nothing of the undo. It is sent `agreement.undone` (`data.from_status` active, `data.status`
    submitting)."""
    from agreements.models import WebhookDelivery
    from tests.catalog.factories import issue_key
    from tests.conftest import Api

    chain, capture = escrow_chain, django_capture_on_commit_callbacks
    settings.CHAIN_CONFIRMATIONS = 5
    parties = Parties(chain, upstream_base_url=http_server.url)
    subscribed = Api(issue_key(parties.seller, scope="admin")).post(
        "/webhooks", {"url": f"{http_server.url}/hooks", "event_types": ["agreement.active"]})
    assert subscribed.status_code == 201, subscribed.content
    agreement, ours = _activation_concluded_on_a_copy_a_deep_reorg_takes(parties, capture)
    assert parties.agreement(agreement["id"])["status"] == "submitting"

    told = [(delivery.event_type, delivery.payload["data"]["from_status"], delivery.payload["data"]["status"])
            for delivery in WebhookDelivery.objects.filter(subscription_id=subscribed.json()["id"]).order_by(
                "created_at", "pk")]
    assert told == [("agreement.active", "submitting", "active"), ("agreement.undone", "active", "submitting")]



@pytest.mark.parametrize("indexed", [True, False], ids=["re_proposal", "first_proposal_of_a_completion"])
def test_no_proposal_is_sent_while_the_buyers_challenge_is_under_way(
        funded, escrow_chain, django_capture_on_commit_callbacks, indexed):  # noqa: F811
    """The seller proposes one of its earlier receipts; the buyer challenges it through the API, and the settlement
    tick runs while that challenge is sent and not yet mined: it re-proposes the last receipt (the seller's proposal
    indexed), or proposes it for the completion the buyer asked for (not indexed yet). That proposal is mined after
    the challenge and reverts (InvalidState: the escrow is disputed) at the relayer's gas, a failed proposal on the
    dashboard; it could change nothing: the challenge disputes whatever is proposed when it is mined."""
    chain, capture = escrow_chain, django_capture_on_commit_callbacks
    call_n(funded, 3)
    seller_proposes_directly(funded, chain, seq=1)
    if indexed:
        index(capture)
    else:
        with capture(execute=False):
            assert funded.buyer_api.post(f"/usage-agreements/{funded.agreement_id}/complete").status_code == 200
    package = funded.buyer_api.get(f"/usage-agreements/{funded.agreement_id}/challenge-package").json()
    body = {"reason": "one call answered nothing", "deadline": package["deadline"],
            "signature": sign_typed_data(funded.buyer_account.key, package["challenge"])}
    chain.rpc("evm_setAutomine", [False])
    try:
        with capture(execute=True):
            response = funded.buyer_api.post(f"/usage-agreements/{funded.agreement_id}/challenge", body)
        assert response.status_code == 202, response.content
        with capture(execute=True):
            settlement.settlement_tick()
        chain.mine(1)
    finally:
        chain.rpc("evm_setAutomine", [True])
    confirm_all(capture)
    index(capture)

    assert funded.agreement(funded.agreement_id)["status"] == "disputed"
    proposals = ChainTransaction.objects.filter(agreement_id=funded.agreement_id, purpose="propose_settlement")
    assert list(proposals.values_list("status", "receipt_status")) == []


def test_a_re_proposal_a_lagging_backend_has_not_seen_does_not_leave_the_agreement_settling(
        funded, escrow_chain, settings, django_capture_on_commit_callbacks):  # noqa: F811
    """The seller re-proposes a higher receipt just before the window closes (the contract restarts it). The node is a
    provider's pool of backends: the latest block, past the old window's end, comes from one, and the escrow read
    `at latest` from another that lacks the re-proposal's block. The tick took the old window for over and moved the
    agreement to settling: its finalize reverts (ChallengeWindowOpen) and the books stay settling while the chain's
    window is open, the buyer unable to challenge through the API (the indexer's proposal changes nothing there)."""
    from tests.support.rpc_relay import RpcRelay

    chain, capture = escrow_chain, django_capture_on_commit_callbacks
    call_n(funded, 3)
    seller_proposes_directly(funded, chain, seq=2)
    index(capture)
    deadline = int(UsageAgreement.objects.get(pk=funded.agreement_id).challenge_deadline.timestamp())
    behind = hex(chain.block_number())
    chain.set_next_timestamp(deadline - 1)
    seller_proposes_directly(funded, chain, seq=3)
    chain.set_next_timestamp(deadline)
    chain.mine(1)

    get_escrow = chain.escrow.functions.getEscrow(funded.onchain_id, escrow_terms(chain.escrow, funded.onchain_id))
    selector = get_escrow._encode_transaction_data()[:10]
    relay = RpcRelay(escrow_chain.node.rpc_url).start()
    node, settings.CHAIN_RPC_URL = settings.CHAIN_RPC_URL, relay.url
    relay.latest_calls_answered_at(selector, behind)
    try:
        with capture(execute=True):
            settlement.settlement_tick()
        confirm_all(capture)
    finally:
        relay.stop()
        settings.CHAIN_RPC_URL = node
    index(capture)
    assert funded.agreement(funded.agreement_id)["status"] == "in_challenge"
