"""An escrow funded on-chain for an agreement the platform counts as closed (cancelled, expired, rejected).

The buyer's signed intent and permit are bearer until their deadline: anyone holding them (the buyer's own agent,
whoever read a reverted activation's calldata on-chain) may send them to the contract after the platform closed
the agreement, and a cancel or an expiry may land while the indexer has not yet applied an activation mined before
it. Only the buyer can revoke a signed intent (`cancelIntentNonce` spends its nonce from the buyer's own wallet),
so the platform cannot stop it: it must follow the chain and give the deposit back through the contract's own path
(a settlement of nothing: the seller is paid nothing, the buyer the whole deposit), with no error left repeating
and nothing for an operator to chase."""

import io
import logging
from datetime import timedelta

import pytest
from django.core.management import call_command
from django.core.management.base import CommandError
from django.utils import timezone

from agreements import services as agreement_services
from agreements.models import UsageAgreement
from escrow import chain as gateway
from escrow import purchases, relayer, settlement
from escrow.models import ChainEvent, ChainTransaction, EventEffect, RelayerAccount, TxPurpose, TxStatus
from sdk import typed_data as td
from sdk.activation import activation_intent_nonce
from tests.support.operators import staff_account
from tests.agreements.helpers import propose
from tests.chain_fixtures import TEST_RECLAIM_GRACE
from tests.catalog.factories import issue_owner_token
from tests.conftest import Api, error_code
from tests.escrow.conftest import Escrows
from tests.escrow.flow import (USDC, Parties, confirm_all, deadline_clock, fund, mined_what_was_sent, pay_fees,
                               sign_activation, usdc_balance)
from tests.escrow.test_indexer import index, mined, statuses
from tests.escrow.test_masumi_purchases import FEE, INPUT, PRICE, run
from tests.escrow.test_relayer_faults import relayer_nonce_on_chain, spent_by_the_buyer_once_estimated
from tests.support.masumi_service import MasumiService

pytestmark = [pytest.mark.chain, pytest.mark.django_db]

@pytest.fixture
def parties(escrow_chain, http_server):
    return Parties(escrow_chain, upstream_base_url=http_server.url)


def relay(chain, package: dict, signed: dict) -> str:
    """A stranger sends the buyer's signed intent and permit to the contract itself; returns the transaction hash."""
    permit = signed["escrow_permit"]
    tx_hash = chain.escrow.functions.activate(
        td.message_tuple(package["intent"]), signed["intent_signature"],
        td.onchain_permit(value=permit["value"], deadline=permit["deadline"], signature=permit["signature"]),
        td.EMPTY_PERMIT,
    ).transact({"from": chain.accounts.stranger.address, "gas": 1_000_000})
    mined(chain, tx_hash)
    return tx_hash


def package_and_signature(parties, agreement_id: str) -> tuple[dict, dict]:
    package = parties.buyer_api.get(f"/usage-agreements/{agreement_id}/activation-package")
    assert package.status_code == 200, package.content
    return package.json(), sign_activation(parties.chain, package.json(), parties.agreement(agreement_id),
                                           parties.buyer_account.key)


def cancel(parties, agreement_id: str) -> None:
    response = parties.buyer_api.post(f"/usage-agreements/{agreement_id}/cancel", {"reason": "changed my mind"})
    assert response.status_code == 200, response.content
    assert response.json()["status"] == "cancelled"


def tick(capture) -> dict:
    with capture(execute=True):
        done = settlement.settlement_tick()
    confirm_all(capture)
    return done


def assert_given_back_through_a_settlement_of_nothing(parties, capture, agreement_id: str, *, window: int) -> None:
    """The escrow the chain funded is wound down: no charge, a proposal of nothing, then finalize once its window is
    over; the seller is paid nothing and the buyer gets the whole deposit back."""
    chain = parties.chain
    agreement = parties.agreement(agreement_id)
    assert agreement["status"] == "active", agreement
    assert UsageAgreement.objects.get(pk=agreement_id).completion_requested_at is not None
    seller_balance = usdc_balance(chain, parties.seller_account.address)
    assert tick(capture)["proposed"] == 1
    assert parties.agreement(agreement_id)["status"] == "in_challenge"
    chain.increase_time(window + 1)
    assert tick(capture)["finalizing"] == 1
    settled = parties.agreement(agreement_id)
    assert (settled["status"], settled["seller_payout_atomic"], settled["buyer_refund_atomic"]) == (
        "settled", 0, agreement["deposit_amount_atomic"])
    assert usdc_balance(chain, parties.seller_account.address) == seller_balance
    pay_fees(chain)
    assert usdc_balance(chain, chain.addresses["escrow"]) == 0
    index(capture)
    call_command("reconcile", stdout=io.StringIO())


def relayed_after_a_cancel(parties, chain) -> tuple[int, dict, dict]:
    """The buyer signs its activation package, then cancels the agreement on the platform; a stranger relays the signed
    intent all the same. Returns the buyer's balance before, the agreement and the package."""
    start = usdc_balance(chain, parties.buyer_account.address)
    agreement = parties.accepted_agreement(quantity=10)
    package, signed = package_and_signature(parties, agreement["id"])
    cancel(parties, agreement["id"])
    relay(chain, package, signed)
    return start, agreement, package


def test_an_intent_relayed_after_the_buyer_cancelled_gives_the_whole_deposit_back(
        parties, escrow_chain, django_capture_on_commit_callbacks):
    """The buyer signs the activation package, then cancels the agreement on the platform; the signed intent is sent
    to the contract all the same (by anyone holding it, here a stranger). The escrow holds the deposit: the agreement
    must follow the chain and the deposit go back to the buyer. (It stayed cancelled, the Activated event failed
    `invalid_transition` and the deposit sat in an escrow the platform never tracked, until the buyer reclaimed it
    itself after expiry and the reclaim grace.)"""
    chain, capture = escrow_chain, django_capture_on_commit_callbacks
    start, agreement, package = relayed_after_a_cancel(parties, chain)
    deposit, fee = agreement["deposit_amount_atomic"], agreement["infra_fee_atomic"]
    assert usdc_balance(chain, parties.buyer_account.address) == start - deposit - fee

    index(capture)
    [activated] = ChainEvent.objects.filter(name="Activated")
    assert (activated.effect, activated.error, activated.from_status) == (EventEffect.APPLIED, "", "cancelled")
    assert statuses(agreement["id"])[-2:] == [("accepted", "cancelled"), ("cancelled", "active")]
    # No charge on it: the proxy refuses new calls on an agreement whose completion is asked for.
    refused = parties.buyer_api.get(f"/metered-proxy/{agreement['id']}/work")
    assert refused.status_code == 409 and error_code(refused) == "agreement_completing"
    assert_given_back_through_a_settlement_of_nothing(parties, capture, agreement["id"],
                                                      window=agreement["challenge_window_seconds"])
    assert usdc_balance(chain, parties.buyer_account.address) == start - fee


def test_a_funding_after_the_cancel_indexed_only_after_reclaim_after_is_reclaimed_for_the_buyer(
        parties, escrow_chain, django_capture_on_commit_callbacks):
    """The relayed intent is mined after the cancel, and applied only once the escrow's reclaimAfter has passed (the
    indexer, or the node, down until then): no settlement of nothing can be proposed any more (ProposalPeriodOver).
    The tick reclaims the deposit for the buyer instead, and proposes nothing. (It proposed, reverting at every
    attempt, and never reclaimed, completion being asked for: the deposit waited for the buyer's own reclaim.)"""
    chain, capture = escrow_chain, django_capture_on_commit_callbacks
    start, agreement, package = relayed_after_a_cancel(parties, chain)
    chain.increase_time(package["intent"]["message"]["expiresAt"] + TEST_RECLAIM_GRACE - chain.now())

    index(capture)
    assert statuses(agreement["id"])[-1] == ("cancelled", "active")
    assert tick(capture) == {"expired": 0, "proposed": 0, "finalizing": 0, "reclaiming": 1}
    refunded = parties.agreement(agreement["id"])
    assert (refunded["status"], refunded["seller_payout_atomic"], refunded["buyer_refund_atomic"]) == (
        "refunded", 0, agreement["deposit_amount_atomic"])
    assert not ChainTransaction.objects.filter(agreement_id=agreement["id"], purpose=TxPurpose.PROPOSE_SETTLEMENT)
    assert usdc_balance(chain, parties.buyer_account.address) == start - agreement["infra_fee_atomic"]
    pay_fees(chain)
    assert usdc_balance(chain, chain.addresses["escrow"]) == 0
    index(capture)
    call_command("reconcile", stdout=io.StringIO())


def test_a_reorg_taking_the_funding_after_the_cancel_leaves_the_agreement_cancelled_with_nothing_to_complete(
        parties, escrow_chain, django_capture_on_commit_callbacks):
    """The relayed intent's block is reorged out (and the intent not sent again): the agreement goes back to cancelled,
    with no completion left asked for and nothing proposed."""
    chain, capture = escrow_chain, django_capture_on_commit_callbacks
    agreement = parties.accepted_agreement(quantity=10)
    package, signed = package_and_signature(parties, agreement["id"])
    cancel(parties, agreement["id"])
    before_relay = chain.snapshot()
    relay(chain, package, signed)
    index(capture)
    assert parties.agreement(agreement["id"])["status"] == "active"

    chain.reorg(before_relay)
    chain.mine(3)
    assert index(capture).rolled_back == 2  # Activated, and the transfer of deposit and fee into the escrow
    record = UsageAgreement.objects.get(pk=agreement["id"])
    assert (record.status, record.completion_requested_at, record.completion_reason, record.activated_at) == (
        "cancelled", None, "", None)
    assert tick(capture)["proposed"] == 0
    call_command("reconcile", stdout=io.StringIO())


def test_the_calldata_of_a_reverted_activation_relayed_after_a_cancel_gives_the_deposit_back(
        parties, escrow_chain, monkeypatch, caplog, django_capture_on_commit_callbacks):
    """The platform's activation is mined and reverts (the buyer moved its funds between the estimate and the mining):
    activation_failed. Its calldata, the buyer's intent and permit, is on-chain for anyone to read. The buyer gets its
    funds back and cancels; a stranger sends that calldata to the contract, and it runs now. Neither the indexer nor
    the relayer's polls may leave an error behind, and the deposit goes back to the buyer."""
    chain, capture = escrow_chain, django_capture_on_commit_callbacks
    agreement = parties.accepted_agreement(quantity=10)
    spent_by_the_buyer_once_estimated(chain, monkeypatch)
    parties.activate(agreement["id"], capture)
    ours = ChainTransaction.objects.get(agreement_id=agreement["id"], purpose=TxPurpose.ACTIVATE)
    assert (ours.status, ours.receipt_status) == (TxStatus.FAILED, 0)
    assert parties.agreement(agreement["id"])["status"] == "activation_failed"
    stranger = chain.accounts.stranger.address
    mined(chain, chain.usdc.functions.transfer(parties.buyer_account.address, usdc_balance(chain, stranger))
          .transact({"from": stranger}))
    cancel(parties, agreement["id"])

    calldata = chain.w3.eth.get_transaction(ours.mined_tx_hash)["input"]
    mined(chain, chain.w3.eth.send_transaction({"from": stranger, "to": chain.addresses["escrow"], "data": calldata,
                                                "gas": 1_000_000}))
    with caplog.at_level(logging.ERROR):
        index(capture)
        for _ in range(2):
            confirm_all(capture)
    assert [record.getMessage() for record in caplog.records if record.levelno >= logging.ERROR] == []
    assert ChainEvent.objects.get(name="Activated").effect == EventEffect.APPLIED
    assert_given_back_through_a_settlement_of_nothing(parties, capture, agreement["id"],
                                                      window=agreement["challenge_window_seconds"])


def test_an_intent_the_platform_failed_to_send_and_anyone_relays_later_makes_the_agreement_active(
        parties, escrow_chain, django_capture_on_commit_callbacks):
    """activation_failed is not closed: the relayer's simulation reverted (the buyer's funds were gone), the chain
    changed (they are back) and someone relays the signed intent. The agreement is active, as the chain says, and
    usable."""
    chain, capture = escrow_chain, django_capture_on_commit_callbacks
    agreement = parties.accepted_agreement(quantity=10)
    package, signed = package_and_signature(parties, agreement["id"])
    balance = usdc_balance(chain, parties.buyer_account.address)
    spare = chain.accounts.spare.address
    with capture(execute=False) as callbacks:
        posted = parties.buyer_api.post(f"/usage-agreements/{agreement['id']}/activate-escrow", signed)
    assert posted.status_code == 202, posted.content
    mined(chain, chain.usdc.functions.transfer(spare, balance).transact({"from": parties.buyer_account.address}))
    for callback in callbacks:
        callback()  # the relayer's simulation reverts: nothing is sent
    assert parties.agreement(agreement["id"])["status"] == "activation_failed"
    assert ChainTransaction.objects.get(agreement_id=agreement["id"]).nonce is None
    mined(chain, chain.usdc.functions.transfer(parties.buyer_account.address, balance).transact({"from": spare}))

    relay(chain, package, signed)
    index(capture)
    active = parties.agreement(agreement["id"])
    assert active["status"] == "active"
    assert statuses(agreement["id"])[-2:] == [("activation_failed", "submitting"), ("submitting", "active")]
    assert UsageAgreement.objects.get(pk=agreement["id"]).completion_requested_at is None
    assert parties.buyer_api.get(f"/metered-proxy/{agreement['id']}/work").status_code == 200
    call_command("reconcile", stdout=io.StringIO())


def test_an_escrow_opens_once_per_agreement_and_buyer_so_a_settled_one_cannot_be_funded_again(
        parties, escrow_chain, django_capture_on_commit_callbacks):
    """After a cancel the platform hands out no package and takes no signature. A buyer who signs again anyway (a new
    deadline, or another intent nonce) cannot open a second escrow: the contract keys escrows by (buyer, agreement
    id) and accepts each once, ever, so an agreement already settled or refunded is never funded again (its intent
    relayed again, or re-signed: AgreementExists)."""
    chain, capture = escrow_chain, django_capture_on_commit_callbacks
    agreement = parties.accepted_agreement(quantity=10)
    package, signed = package_and_signature(parties, agreement["id"])
    cancel(parties, agreement["id"])
    refused = parties.buyer_api.get(f"/usage-agreements/{agreement['id']}/activation-package")
    assert refused.status_code == 409 and error_code(refused) == "invalid_transition"
    resent = parties.buyer_api.post(f"/usage-agreements/{agreement['id']}/activate-escrow", signed)
    assert resent.status_code == 409, resent.content

    relay(chain, package, signed)
    index(capture)
    assert_given_back_through_a_settlement_of_nothing(parties, capture, agreement["id"],
                                                      window=agreement["challenge_window_seconds"])

    esc = Escrows(chain)
    fund(chain, parties.buyer_account.address, 10 * USDC)
    total = agreement["deposit_amount_atomic"] + agreement["infra_fee_atomic"]
    again = esc.activate_fn(package["intent"], signed["intent_signature"], esc.permit(parties.buyer_account, total))
    esc.reverts(again, chain.accounts.stranger, "AgreementExists")
    message = package["intent"]["message"]
    resigned = esc.intent(agreement_id=message["agreementId"], seller=message["seller"],
                          quantity=message["quantity"], price_per_unit=message["pricePerUnit"],
                          infra_fee=message["infraFee"], challenge_window=message["challengeWindow"],
                          expires_at=message["expiresAt"], terms_hash=message["termsHash"],
                          nonce=activation_intent_nonce(message["agreementId"]) + 1,
                          deadline=deadline_clock(chain) + 600)
    esc.reverts(esc.activate_fn(resigned, esc.sign(resigned, parties.buyer_account),
                                esc.permit(parties.buyer_account, total)), chain.accounts.stranger,
                "AgreementExists")
    assert parties.agreement(agreement["id"])["status"] == "settled"


def _masumi_purchase(chain, seller_service: MasumiService) -> tuple[Parties, dict]:
    """A Masumi service of the seller's at `seller_service` and the buyer's purchase of one job (its `data`)."""
    parties = Parties(chain, upstream_base_url=seller_service.url, upstream_protocol="masumi", skills=[],
                      pricing={"type": "per_call", "unit_name": "job", "unit_price_atomic": PRICE, "token": "USDC"})
    created = parties.buyer_api.post("/purchase", {"network": "Preprod", "input_data": INPUT,
                                                   "agentIdentifier": str(parties.service.pk)}).json()["data"]
    return parties, created


# --- a cancel or expiry while the indexer has not applied the activation yet ------------------------------------

def test_a_masumi_purchase_funded_before_pay_by_time_and_expired_before_it_was_indexed_is_refunded(
        escrow_chain, django_capture_on_commit_callbacks):
    """The buyer's agent sends its signed intent itself just before payByTime; the purchases' tick runs by the chain's
    clock after payByTime, before the indexer (which works at the confirmation depth) applied the activation, and
    expires the purchase. The escrow holds the buyer's money: the purchase is refunded, and the seller's job is never
    started (its result could not be charged: it would work for nothing)."""
    chain, capture = escrow_chain, django_capture_on_commit_callbacks
    seller_service = MasumiService().start()
    try:
        parties, created = _masumi_purchase(chain, seller_service)
        package = created["ActivationPackage"]
        signed = sign_activation(chain, package, parties.agreement(created["agreementId"]),
                                 parties.buyer_account.key, max_deadline_seconds=package["deadline"] - chain.now())
        start = usdc_balance(chain, parties.buyer_account.address)
        relay(chain, package, signed)
        chain.increase_time(package["deadline"] - chain.now())
        assert run(capture, purchases.purchases_tick)["expired"] == 1
        assert parties.agreement(created["agreementId"])["status"] == "expired"

        index(capture)
        run(capture, purchases.purchases_jobs_tick)
        assert seller_service.started == []
        agreement = parties.agreement(created["agreementId"])
        assert agreement["status"] == "active"
        [purchase] = parties.buyer_api.get("/purchase", {"network": "Preprod"}).json()["data"]["Purchases"]
        assert (purchase["NextAction"]["errorType"], purchase["NextAction"]["errorCode"]) == (
            "FundedAfterClose", "funded_after_close")
        assert tick(capture)["proposed"] == 1
        chain.increase_time(agreement["challenge_window_seconds"] + 1)
        assert tick(capture)["finalizing"] == 1
        settled = parties.agreement(created["agreementId"])
        assert (settled["status"], settled["seller_payout_atomic"], settled["buyer_refund_atomic"]) == (
            "settled", 0, PRICE)
        assert usdc_balance(chain, parties.buyer_account.address) == start - FEE
        [purchase] = parties.buyer_api.get("/purchase", {"network": "Preprod"}).json()["data"]["Purchases"]
        assert purchase["onChainState"] == "RefundWithdrawn"
        assert seller_service.started == []
        call_command("reconcile", stdout=io.StringIO())
    finally:
        seller_service.stop()


def funded_by_the_buyers_own_intent_while_proposed(parties) -> dict:
    """The platform hands out no package before the seller accepts, but the buyer can build the intent itself from
    the agreement's terms (the platform's receipt signer and fee, its intent nonce) and fund the escrow."""
    chain = parties.chain
    esc = Escrows(chain)
    agreement = propose(parties.buyer_api, parties.service, quantity=10)
    record = UsageAgreement.objects.get(pk=agreement["id"])
    esc.activate(esc.intent(
        agreement_id=record.onchain_id, seller=record.seller_wallet_address, quantity=record.quantity,
        price_per_unit=record.price_per_unit, infra_fee=record.infra_fee,
        challenge_window=record.challenge_window_seconds, expires_at=int(record.expires_at.timestamp()),
        terms_hash=record.terms_hash, nonce=activation_intent_nonce(record.onchain_id)),
        buyer=parties.buyer_account, sender=chain.accounts.stranger, fund=False)
    return agreement


def test_a_proposal_the_seller_rejected_funded_by_the_buyers_own_intent_is_given_back(
        parties, escrow_chain, django_capture_on_commit_callbacks):
    """The buyer funds the escrow with its own intent; the seller rejects the proposal before the indexer applied the
    funding. The deposit goes back."""
    capture = django_capture_on_commit_callbacks
    agreement = funded_by_the_buyers_own_intent_while_proposed(parties)
    rejected = parties.seller_api.put(f"/usage-agreements/{agreement['id']}/reject", {"reason": "busy"})
    assert rejected.status_code == 200, rejected.content

    index(capture)
    assert statuses(agreement["id"])[-2:] == [("proposed", "rejected"), ("rejected", "active")]
    assert_given_back_through_a_settlement_of_nothing(parties, capture, agreement["id"],
                                                      window=agreement["challenge_window_seconds"])


@pytest.mark.parametrize("answer", ["reject", "accept", "none"])
def test_a_funding_indexed_before_the_seller_answered_is_applied_once_the_seller_does(
        answer, parties, escrow_chain, caplog, django_capture_on_commit_callbacks):
    """The indexer applies the buyer's own funding while the agreement is still proposed: it cannot be applied there
    (the seller has not agreed), and fails `reconcile`. Once the seller answers, it is applied: rejected, the deposit
    goes back (so it does when the proposal expires unanswered); accepted, the agreement is active without the buyer
    sending anything. (It stayed failed for ever:
    the deposit of a rejected proposal waited for the buyer's own reclaim after expiry and the grace.) An event
    that still cannot be applied is tried again only once its agreement has moved: no error repeats at every pass."""
    capture = django_capture_on_commit_callbacks
    agreement = funded_by_the_buyers_own_intent_while_proposed(parties)
    with caplog.at_level(logging.ERROR):
        for _ in range(3):
            index(capture)
    assert [record.getMessage() for record in caplog.records if record.levelno >= logging.ERROR] == [
        "indexed event not applied"]
    activated = ChainEvent.objects.get(name="Activated")
    assert activated.effect == EventEffect.FAILED and activated.error.startswith("invalid_transition")
    assert parties.agreement(agreement["id"])["status"] == "proposed"
    with pytest.raises(CommandError, match="1 mismatch"):
        call_command("reconcile", stdout=io.StringIO())

    if answer == "none":  # the proposal expires unanswered (the beat task)
        with capture(execute=True):
            assert agreement_services.agreements_expire_proposals(now=timezone.now() + timedelta(days=4)) == 1
    else:
        answered = parties.seller_api.put(f"/usage-agreements/{agreement['id']}/{answer}")
        assert answered.status_code == 200, answered.content
    index(capture)
    activated.refresh_from_db()
    assert (activated.effect, activated.error) == (EventEffect.APPLIED, "")
    if answer != "accept":
        assert activated.from_status == {"reject": "rejected", "none": "expired"}[answer]
        assert_given_back_through_a_settlement_of_nothing(parties, capture, agreement["id"],
                                                          window=agreement["challenge_window_seconds"])
    else:
        assert activated.from_status == "accepted"
        assert statuses(agreement["id"])[-2:] == [("accepted", "submitting"), ("submitting", "active")]
        assert UsageAgreement.objects.get(pk=agreement["id"]).completion_requested_at is None
        assert parties.buyer_api.get(f"/metered-proxy/{agreement['id']}/work").status_code == 200
        call_command("reconcile", stdout=io.StringIO())


def test_a_funding_the_buyer_sent_itself_that_its_owners_policy_refuses_now_is_given_back(
        parties, escrow_chain, django_capture_on_commit_callbacks):
    """The platform checks the buyer's owner policy when it moves the money (activate-escrow), but the buyer's own
    agent can fund the escrow itself with an intent it builds: funded while proposed and applied once the seller
    accepted, the agreement was active, to be metered and paid out, though the owner blocked the seller in between
    (or a cap's worth proposed each day was all funded on one day). Refused by the policy as it is when the chain's
    funding is applied, it is active with its completion asked for at once: the deposit goes back."""
    capture = django_capture_on_commit_callbacks
    agreement = funded_by_the_buyers_own_intent_while_proposed(parties)
    owner_api = Api(issue_owner_token(parties.buyer.owner))
    blocked = owner_api.put(f"/agents/{parties.buyer.pk}/policies", {"blocked_sellers": [parties.service.seller.handle]})
    assert blocked.status_code == 200, blocked.content
    accepted = parties.seller_api.put(f"/usage-agreements/{agreement['id']}/accept")
    assert accepted.status_code == 200, accepted.content

    index(capture)

    assert statuses(agreement["id"])[-2:] == [("accepted", "submitting"), ("submitting", "active")]
    assert "blocked_sellers" in UsageAgreement.objects.get(pk=agreement["id"]).completion_reason
    assert parties.buyer_api.get(f"/metered-proxy/{agreement['id']}/work").status_code != 200
    assert_given_back_through_a_settlement_of_nothing(parties, capture, agreement["id"],
                                                      window=agreement["challenge_window_seconds"])


# --- a deep reorg under a failed activation of an agreement closed since ---------------------------------------

def failed_then_cancelled_on_a_branch(parties, chain, capture, monkeypatch) -> tuple[dict, ChainTransaction, str]:
    """The platform's activation mined and reverted (activation_failed), then the buyer cancelled; a snapshot taken
    before the activation lets a reorg take its block."""
    settings_rebroadcast_now(monkeypatch)
    agreement = parties.accepted_agreement(quantity=10)
    body = parties.signed_activation(agreement["id"])
    before_fork = chain.snapshot()
    spent_by_the_buyer_once_estimated(chain, monkeypatch)
    parties.activate(agreement["id"], capture, body)
    failed = ChainTransaction.objects.get(agreement_id=agreement["id"], purpose=TxPurpose.ACTIVATE)
    assert (failed.status, failed.receipt_status) == (TxStatus.FAILED, 0)
    cancel(parties, agreement["id"])
    return agreement, failed, before_fork


def settings_rebroadcast_now(monkeypatch) -> None:
    from django.conf import settings

    monkeypatch.setattr(settings, "CHAIN_REBROADCAST_AFTER", timedelta(0))


def test_a_failed_activation_a_reorg_reopens_after_the_agreement_was_cancelled_is_not_sent_again(
        parties, escrow_chain, monkeypatch, caplog, django_capture_on_commit_callbacks):
    """A reorg deeper than the confirmation depth takes the block of a failed activation whose agreement the buyer
    cancelled since; on the new branch the buyer holds its funds. The relayer must not send the activation again (it
    would take the money of a buyer who cancelled, the fee with it); its nonce is filled with a transfer of nothing.
    (It was sent again and ran; its outcome could not be applied, cancelled -> active being illegal, and the error
    repeated at every poll with the transaction left mined for ever.)"""
    chain, capture = escrow_chain, django_capture_on_commit_callbacks
    agreement, failed, before_fork = failed_then_cancelled_on_a_branch(parties, chain, capture, monkeypatch)
    chain.reorg(before_fork)  # the new branch: the buyer never spent its funds
    chain.mine(3)
    buyer = usdc_balance(chain, parties.buyer_account.address)
    with caplog.at_level(logging.ERROR):
        for _ in range(3):
            confirm_all(capture)
        index(capture)
    assert [record.getMessage() for record in caplog.records if record.levelno >= logging.ERROR] == []

    fill = ChainTransaction.objects.get(purpose=TxPurpose.NONCE_FILL)
    failed.refresh_from_db()
    assert (fill.status, fill.context) == (TxStatus.CONFIRMED, {relayer.CANCELS: str(failed.pk)})
    assert (failed.status, failed.nonce) == (TxStatus.FAILED, None)
    assert parties.agreement(agreement["id"])["status"] == "cancelled"
    assert usdc_balance(chain, parties.buyer_account.address) == buyer
    assert usdc_balance(chain, chain.addresses["escrow"]) == 0
    assert relayer_nonce_on_chain(chain) == RelayerAccount.objects.get().next_nonce
    call_command("reconcile", stdout=io.StringIO())


def test_the_old_bytes_of_that_activation_mined_first_give_the_deposit_back(
        parties, escrow_chain, monkeypatch, caplog, django_capture_on_commit_callbacks):
    """Anyone holding the failed activation's signed bytes gets them mined on the new branch before the relayer's
    fill: the escrow is funded for a cancelled agreement. The fill names them (one error, and reconcile until an
    operator acknowledges it), the agreement follows the chain and the deposit goes back to the buyer; nothing else
    is logged as an error."""
    chain, capture = escrow_chain, django_capture_on_commit_callbacks
    agreement, failed, before_fork = failed_then_cancelled_on_a_branch(parties, chain, capture, monkeypatch)
    chain.reorg(before_fork)
    chain.mine(3)
    assert relayer.transactions_reopen_reorged() == 1
    old_bytes = failed.attempts.get()
    chain.w3.eth.send_raw_transaction(old_bytes.raw_transaction)
    mined_what_was_sent()  # before the relayer's polls read its nonce (Anvil answers a send before it mines it)
    with caplog.at_level(logging.ERROR):
        for _ in range(3):
            confirm_all(capture)
        index(capture)
    errors = [record for record in caplog.records if record.levelno >= logging.ERROR]
    assert [record.getMessage() for record in errors] == [
        "a cancelled transaction's own bytes were mined in place of its nonce fill"]
    assert gateway.receipt(old_bytes.tx_hash).status == 1
    # The fill lost its race to bytes that ran: reconcile says so until an operator has looked (the buyer who
    # cancelled paid the fee all the same).
    fill = ChainTransaction.objects.get(purpose=TxPurpose.NONCE_FILL)
    with pytest.raises(CommandError, match="1 mismatch"):
        call_command("reconcile", stdout=io.StringIO())
    call_command("reconcile", "--acknowledge-nonce-fill", str(fill.pk), "--reason", "the deposit goes back",
                 "--operator", staff_account(), stdout=io.StringIO())
    assert_given_back_through_a_settlement_of_nothing(parties, capture, agreement["id"],
                                                      window=agreement["challenge_window_seconds"])


def test_an_operator_cannot_retry_the_failed_activation_of_an_agreement_cancelled_since(
        parties, escrow_chain, monkeypatch, admin_client, django_capture_on_commit_callbacks):
    """A retry would send the buyer's intent again and take the money of a buyer who cancelled (to give it back a
    challenge window later, the fee kept). The admin refuses it, saying why, and queues nothing."""
    chain, capture = escrow_chain, django_capture_on_commit_callbacks
    agreement = parties.accepted_agreement(quantity=10)
    spent_by_the_buyer_once_estimated(chain, monkeypatch)
    parties.activate(agreement["id"], capture)
    failed = ChainTransaction.objects.get(agreement_id=agreement["id"], purpose=TxPurpose.ACTIVATE)
    assert failed.status == TxStatus.FAILED
    cancel(parties, agreement["id"])

    with capture(execute=True):
        response = admin_client.post("/admin/escrow/chaintransaction/",
                                     {"action": "retry_failed", "_selected_action": [str(failed.pk)]}, follow=True)
    page = response.content.decode()
    assert "Queued 0 transaction(s) again." in page and "cancelled" in page
    assert ChainTransaction.objects.filter(agreement_id=agreement["id"]).count() == 1
    assert parties.agreement(agreement["id"])["status"] == "cancelled"


def test_only_the_buyers_own_wallet_can_revoke_a_signed_intent_on_chain(
        parties, escrow_chain, django_capture_on_commit_callbacks):
    """What cancelling could also do on-chain: `cancelIntentNonce` spends a nonce of its caller's, so the platform's
    relayer (the contract's operator) revoking the buyer's intent revokes only a nonce of its own, and the intent
    still funds the escrow; the buyer revoking the agreement's intent nonce from its wallet makes every copy of its
    signed intent revert (IntentNonceUsed), and nothing is funded."""
    chain, capture = escrow_chain, django_capture_on_commit_callbacks
    esc = Escrows(chain)
    agreement = parties.accepted_agreement(quantity=10)
    package, signed = package_and_signature(parties, agreement["id"])
    cancel(parties, agreement["id"])
    nonce = activation_intent_nonce(package["onchain_id"])
    assert package["intent"]["message"]["nonce"] == nonce
    esc.tx(chain.escrow.functions.cancelIntentNonce(nonce), chain.accounts.deployer)  # the relayer: its own nonce
    assert not chain.escrow.functions.intentNonceUsed(parties.buyer_account.address, nonce).call()

    esc.tx(chain.escrow.functions.cancelIntentNonce(nonce), parties.buyer_account)
    permit = signed["escrow_permit"]
    esc.reverts(esc.activate_fn(package["intent"], signed["intent_signature"], td.onchain_permit(
        value=permit["value"], deadline=permit["deadline"], signature=permit["signature"])),
        chain.accounts.stranger, "IntentNonceUsed")
    index(capture)
    assert parties.agreement(agreement["id"])["status"] == "cancelled"
    assert usdc_balance(chain, chain.addresses["escrow"]) == 0


def test_a_masumi_purchase_the_buyer_funded_itself_that_its_owners_policy_refuses_says_so_and_is_refunded(
        escrow_chain, django_capture_on_commit_callbacks):
    """The buyer's agent sends the purchase's signed intent itself after its owner blocked the seller: the funding
    is applied as refused by the policy (active, its completion asked for at once, a settlement of nothing), but
    the purchase showed FundsLocked with nothing to do and no error while its job was never started: its buyer
    waited for a result that would not come. It says why, and its seller's job is not started."""
    chain, capture = escrow_chain, django_capture_on_commit_callbacks
    seller_service = MasumiService().start()
    try:
        parties, created = _masumi_purchase(chain, seller_service)
        package = created["ActivationPackage"]
        signed = sign_activation(chain, package, parties.agreement(created["agreementId"]),
                                 parties.buyer_account.key)
        owner_api = Api(issue_owner_token(parties.buyer.owner))
        blocked = owner_api.put(f"/agents/{parties.buyer.pk}/policies",
                                {"blocked_sellers": [parties.service.seller.handle]})
        assert blocked.status_code == 200, blocked.content
        relay(chain, package, signed)
        index(capture)
        run(capture, purchases.purchases_jobs_tick)
        assert seller_service.started == []

        def shown() -> dict:
            [purchase] = parties.buyer_api.get("/purchase", {"network": "Preprod"}).json()["data"]["Purchases"]
            return purchase

        purchase = shown()
        assert purchase["NextAction"]["errorCode"] == "policy_denied", purchase
        assert purchase["NextAction"]["errorType"] == "RefusedByPolicy"
        assert "blocked_sellers" in purchase["NextAction"]["errorNote"]
        events = parties.buyer_api.get(f"/usage-agreements/{created['agreementId']}/events").json()["results"]
        [funded] = [event for event in events if event["to_status"] == "active"]
        assert funded["data"]["code"] == "policy_denied"
        agreement = parties.agreement(created["agreementId"])
        assert tick(capture)["proposed"] == 1
        assert shown()["NextAction"]["errorCode"] == "policy_denied"
        chain.increase_time(agreement["challenge_window_seconds"] + 1)
        assert tick(capture)["finalizing"] == 1
        purchase = shown()
        assert purchase["onChainState"] == "RefundWithdrawn"
        assert seller_service.started == []
        call_command("reconcile", stdout=io.StringIO())
    finally:
        seller_service.stop()


def test_a_reclaim_indexed_before_its_funding_could_be_applied_refunds_the_agreement_once_it_is(
        parties, escrow_chain, django_capture_on_commit_callbacks):
    """Anyone may reclaim an escrow from its reclaimAfter on. The buyer funds its own intent while the agreement is
    proposed and reclaims the deposit at reclaimAfter, before the beat expired the proposal: the indexer can apply
    neither the funding nor the reclaim there. Once the proposal expires, the funding is applied (the agreement is
    active) and the reclaim after it must be too: the agreement is refunded, as the chain has it. (Only Activated
    events were tried again: the agreement stayed active on an escrow the chain had reclaimed, and the settlement
    tick proposed on it, reverting, until it gave up.)"""
    chain, capture = escrow_chain, django_capture_on_commit_callbacks
    agreement = funded_by_the_buyers_own_intent_while_proposed(parties)
    record = UsageAgreement.objects.get(pk=agreement["id"])
    esc = Escrows(chain)
    esc.wait_past(int(record.expires_at.timestamp()) + TEST_RECLAIM_GRACE)
    esc.tx(esc.fn("reclaim", record.onchain_id, buyer=parties.buyer_account.address), chain.accounts.stranger)
    index(capture)
    assert parties.agreement(agreement["id"])["status"] == "proposed"

    with capture(execute=True):
        assert agreement_services.agreements_expire_proposals(now=record.expires_at + timedelta(seconds=1)) == 1
    index(capture)
    refunded = parties.agreement(agreement["id"])
    assert (refunded["status"], refunded["buyer_refund_atomic"]) == ("refunded", record.deposit_amount)
    assert set(ChainEvent.objects.filter(agreement_id=agreement["id"]).values_list("effect", flat=True)) == {
        EventEffect.APPLIED}
    call_command("reconcile", stdout=io.StringIO())
