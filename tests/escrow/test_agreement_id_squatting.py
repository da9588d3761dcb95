"""Agreement-id squatting: an agreement's on-chain id (its UUID as bytes32) is known to the buyer, the seller (inbox,
webhooks) and anyone watching the relayer's pending transaction. A third party who learns it before the activation is
mined activates an escrow of its OWN under it (its own wallet as buyer, its own small deposit, an intent it signed).

The contract keys an escrow by (buyer, agreementId), so the squatter's escrow lives beside the agreement's and
blocks nothing: the real activation through the API succeeds, and the marketplace (chain reads, the indexer, the
relayer's evidence, the buyer's SDK) only ever takes the events of the agreement's own buyer, never the squatter's,
whatever the squatter then does with its escrow (propose, finalize, reclaim)."""

import io
from datetime import timedelta

import pytest
from django.core.management import call_command

from agreements.models import UsageAgreement
from escrow import settlement
from escrow.models import ChainEvent, ChainTransaction, EventEffect
from sdk.onchain import ChainReader
from tests.escrow.conftest import Escrows, random_bytes32
from tests.escrow.flow import USDC, Parties, confirm_all, usdc_balance
from tests.escrow.test_indexer import call_n, index, mined

pytestmark = [pytest.mark.chain, pytest.mark.django_db]

SQUAT_DEPOSIT = 1_000  # 0.001 USDC: a squat costs next to nothing


class Squatter:
    """A third party (the chain's `buyer2` wallet) with an escrow of its own under a victim agreement's id: its own
    seller and receipt signer (the `stranger` wallet), so it can drive that escrow to any state."""

    def __init__(self, chain, onchain_id: str, *, expires_in: int = 86_400):
        self.chain, self.onchain_id = chain, onchain_id
        self.esc = Escrows(chain)
        self.buyer, self.seller = chain.accounts.buyer2, chain.accounts.stranger
        _, receipt = self.esc.activate(
            agreement_id=onchain_id, buyer=self.buyer, seller=self.seller.address,
            receipt_signer=self.seller.address, quantity=1, price_per_unit=SQUAT_DEPOSIT, infra_fee=0,
            challenge_window=600, expires_at=chain.now() + expires_in)
        args = self.esc.event(receipt, "Activated")
        self.terms = (args["buyer"], args["seller"], args["token"], args["receiptSigner"], args["depositAmount"],
                      args["challengeWindow"], args["reclaimAfter"], args["nonce"])
        self.reclaim_after = args["reclaimAfter"]

    def propose(self, amount: int) -> None:
        digest = random_bytes32()
        signature = self.esc.receipt_sig(self.onchain_id, 1, amount, digest, signer=self.seller)
        mined(self.chain, self.chain.escrow.functions.proposeSettlement(
            self.onchain_id, self.terms, 1, amount, digest, signature).transact({"from": self.seller.address}))

    def finalize(self) -> None:
        mined(self.chain, self.chain.escrow.functions.finalize(self.onchain_id, self.terms).transact(
            {"from": self.buyer.address}))

    def reclaim(self) -> None:
        mined(self.chain, self.chain.escrow.functions.reclaim(self.onchain_id, self.terms).transact(
            {"from": self.buyer.address}))

    def state(self) -> int:
        return self.chain.escrow.functions.getEscrow(self.onchain_id, self.terms).call()[0]


def tick(capture):
    with capture(execute=True):
        result = settlement.settlement_tick()
    confirm_all(capture)
    return result


def accepted(chain, http_server, *, quantity: int = 100):
    """An accepted agreement (`quantity` calls at 0.02 USDC) to a real upstream, and its on-chain id."""
    parties = Parties(chain, upstream_base_url=http_server.url)
    agreement = parties.accepted_agreement(quantity=quantity)
    parties.agreement_id = agreement["id"]
    parties.onchain_id = UsageAgreement.objects.get(pk=agreement["id"]).onchain_id
    return parties


def assert_no_squatter_event_is_the_agreements(parties, squatter) -> None:
    """Every event under the id is indexed; the agreement's are its buyer's, the squatter's attached to nothing."""
    under_id = ChainEvent.objects.filter(args__agreementId=parties.onchain_id.lower(), removed_at=None)
    assert under_id.filter(args__buyer=squatter.buyer.address).exists()
    assert not under_id.filter(args__buyer=squatter.buyer.address, agreement_id__isnull=False).exists()
    assert not under_id.filter(agreement_id=parties.agreement_id).exclude(
        args__buyer=parties.buyer_account.address).exists()
    assert not ChainEvent.objects.filter(effect=EventEffect.FAILED).exists()


def test_a_third_partys_escrow_under_the_agreements_id_does_not_block_its_activation(
        escrow_chain, http_server, django_capture_on_commit_callbacks):
    """The squatter's escrow is mined before the buyer's activation; the activation through the API (the relayer)
    still succeeds, the agreement is active on its own buyer's escrow, and the indexer leaves the squatter's
    Activated event alone (neither applied nor failed: not this agreement's)."""
    chain, capture = escrow_chain, django_capture_on_commit_callbacks
    parties = accepted(chain, http_server)
    squatter = Squatter(chain, parties.onchain_id)

    response = parties.activate(parties.agreement_id, capture)
    assert response.status_code == 202, response.content
    assert parties.agreement(parties.agreement_id)["status"] == "active"
    [activation] = ChainTransaction.objects.filter(agreement_id=parties.agreement_id, purpose="activate")
    assert activation.status == "confirmed" and activation.receipt_status == 1

    status = parties.buyer_api.get(f"/usage-agreements/{parties.agreement_id}/escrow-status", {"verify": "true"})
    onchain = status.json()["onchain"]
    assert onchain["state"] == "active" and onchain["buyer"] == parties.buyer_account.address
    assert int(onchain["depositAmount"]) == 2 * USDC

    index(capture)
    assert parties.agreement(parties.agreement_id)["status"] == "active"
    ours = ChainEvent.objects.get(name="Activated", agreement_id=parties.agreement_id)
    assert ours.args["buyer"] == parties.buyer_account.address and ours.effect == EventEffect.ALREADY
    assert_no_squatter_event_is_the_agreements(parties, squatter)
    assert parties.buyer_api.get(f"/metered-proxy/{parties.agreement_id}/work").status_code == 200
    call_command("reconcile", stdout=io.StringIO())

    # The buyer's SDK, through its own RPC, reads the buyer's escrow too (the squatter's Activated came first).
    reader = ChainReader(chain.node.rpc_url)
    try:
        escrow = reader.escrow(chain.addresses["escrow"], parties.onchain_id, buyer=parties.buyer_account.address)
    finally:
        reader.close()
    assert (escrow.state, escrow.buyer, escrow.deposit_amount) == ("active", parties.buyer_account.address, 2 * USDC)


def test_a_squatter_front_running_the_relayers_pending_activation_does_not_fail_it(
        escrow_chain, http_server, settings, django_capture_on_commit_callbacks):
    """The squatter reads the id from the relayer's pending `activate` and gets its own escrow mined first (here:
    the relayer's copy is dropped from the pool, the squat mined, then the relayer rebroadcasts its bytes)."""
    chain, capture = escrow_chain, django_capture_on_commit_callbacks
    settings.CHAIN_REBROADCAST_AFTER = timedelta(0)
    parties = accepted(chain, http_server)
    body = parties.signed_activation(parties.agreement_id)
    chain.rpc("evm_setAutomine", [False])
    try:
        with capture(execute=True):
            response = parties.buyer_api.post(f"/usage-agreements/{parties.agreement_id}/activate-escrow", body)
        assert response.status_code == 202, response.content
        ours = ChainTransaction.objects.get(agreement_id=parties.agreement_id, purpose="activate")
        [attempt] = ours.attempts.all()
        chain.rpc("anvil_dropTransaction", [attempt.tx_hash])
    finally:
        chain.rpc("evm_setAutomine", [True])
    squatter = Squatter(chain, parties.onchain_id)
    confirm_all(capture)  # no receipt: rebroadcast, mined after the squat
    confirm_all(capture)

    ours.refresh_from_db()
    assert ours.status == "confirmed" and ours.receipt_status == 1
    assert parties.agreement(parties.agreement_id)["status"] == "active"
    index(capture)
    assert_no_squatter_event_is_the_agreements(parties, squatter)
    call_command("reconcile", stdout=io.StringIO())


def test_the_squatters_proposal_and_settlement_are_not_the_agreements_and_it_settles_on_its_own_escrow(
        escrow_chain, http_server, django_capture_on_commit_callbacks):
    """The squatter proposes and finalizes its own escrow under the id: the indexer must not put the agreement in
    challenge or settle it. The agreement then completes, is proposed and finalized on its own escrow, and each
    party is paid from the buyer's deposit only."""
    chain, capture = escrow_chain, django_capture_on_commit_callbacks
    parties = accepted(chain, http_server)
    squatter = Squatter(chain, parties.onchain_id)
    parties.activate(parties.agreement_id, capture)
    assert parties.agreement(parties.agreement_id)["status"] == "active"
    buyer_before = usdc_balance(chain, parties.buyer_account.address)
    seller_before = usdc_balance(chain, parties.seller_account.address)

    squatter.propose(SQUAT_DEPOSIT)
    index(capture)
    assert parties.agreement(parties.agreement_id)["status"] == "active"
    chain.increase_time(601)
    squatter.finalize()
    index(capture)
    assert parties.agreement(parties.agreement_id)["status"] == "active"
    assert squatter.state() == 5  # Settled

    call_n(parties, 3)
    assert parties.buyer_api.post(f"/usage-agreements/{parties.agreement_id}/complete").status_code == 200
    assert tick(capture)["proposed"] == 1
    assert parties.agreement(parties.agreement_id)["status"] == "in_challenge"
    chain.increase_time(3601)
    assert tick(capture)["finalizing"] == 1
    settled = parties.agreement(parties.agreement_id)
    assert settled["status"] == "settled"
    assert (settled["seller_payout_atomic"], settled["buyer_refund_atomic"]) == (60_000, 2 * USDC - 60_000)
    assert usdc_balance(chain, parties.seller_account.address) == seller_before + 60_000
    assert usdc_balance(chain, parties.buyer_account.address) == buyer_before + 2 * USDC - 60_000
    index(capture)
    assert parties.agreement(parties.agreement_id)["status"] == "settled"
    assert_no_squatter_event_is_the_agreements(parties, squatter)
    assert {event.name for event in ChainEvent.objects.filter(agreement_id=parties.agreement_id)} >= {
        "Activated", "SettlementProposed", "Settled"}
    call_command("reconcile", stdout=io.StringIO())


def test_the_squatters_reclaim_is_not_the_agreements_and_its_own_reclaim_refunds_its_buyer(
        escrow_chain, http_server, django_capture_on_commit_callbacks):
    """The squatter's short-lived escrow is reclaimed first: the agreement stays active. Later the agreement
    expires unused and the marketplace reclaims the buyer's own escrow: the buyer gets its whole deposit back."""
    chain, capture = escrow_chain, django_capture_on_commit_callbacks
    parties = accepted(chain, http_server)
    squatter = Squatter(chain, parties.onchain_id, expires_in=120)
    parties.activate(parties.agreement_id, capture)
    buyer_before = usdc_balance(chain, parties.buyer_account.address)

    chain.increase_time(squatter.reclaim_after - chain.now() + 1)
    squatter.reclaim()
    assert squatter.state() == 6  # Reclaimed
    index(capture)
    assert parties.agreement(parties.agreement_id)["status"] == "active"

    agreement = UsageAgreement.objects.get(pk=parties.agreement_id)
    chain.increase_time(int(agreement.expires_at.timestamp()) - chain.now() + 10 + chain.reclaim_grace)
    assert tick(capture)["reclaiming"] == 1
    refunded = parties.agreement(parties.agreement_id)
    assert refunded["status"] == "refunded" and refunded["buyer_refund_atomic"] == 2 * USDC
    assert usdc_balance(chain, parties.buyer_account.address) == buyer_before + 2 * USDC
    index(capture)
    assert_no_squatter_event_is_the_agreements(parties, squatter)
    call_command("reconcile", stdout=io.StringIO())
