"""Proposals on-chain that are not the platform's own, or that it did not record: the seller's proposal mined before
ours, and agreements already in challenge when `proposed_seq` was added (agreements 0018), whose copy of what is
proposed on-chain was left empty."""

import importlib
import io

import pytest
from django.apps import apps
from django.conf import settings as django_settings
from django.core.management import call_command

from agreements.models import UsageAgreement
from escrow import relayer, selectors, settlement
from escrow.models import ChainTransaction, TxPurpose, TxStatus
from marketplace.signatures import receipt_sign
from sdk import receipts
from sdk.typed_data import sign_typed_data
from tests.escrow.conftest import escrow_terms
from tests.escrow.flow import USDC, confirm_all
from tests.escrow.test_indexer import call_n, funded, index, mined, seller_proposes_directly  # noqa: F401

pytestmark = [pytest.mark.chain, pytest.mark.django_db]


def proposals(agreement_id):
    return ChainTransaction.objects.filter(agreement_id=agreement_id, purpose=TxPurpose.PROPOSE_SETTLEMENT)


def in_challenge_before_proposed_seq_shipped(funded, chain, capture):  # noqa: F811
    """Three receipts; the seller proposed its first one itself and the indexer applied it, before `proposed_seq`
    existed: in challenge with proposed_seq null."""
    call_n(funded, 3)
    seller_proposes_directly(funded, chain, seq=1)
    index(capture)
    UsageAgreement.objects.filter(pk=funded.agreement_id).update(proposed_seq=None)
    assert funded.agreement(funded.agreement_id)["status"] == "in_challenge"


def test_an_agreement_in_challenge_with_no_proposed_seq_is_re_proposed_with_its_last_receipt(
        funded, escrow_chain, django_capture_on_commit_callbacks):  # noqa: F811
    """The tick's selector left out an agreement whose proposed_seq is null (NULL < usage_seq is not true): the
    seller's proposal of an earlier receipt stood. It reads the chain for those and proposes the last receipt."""
    chain, capture = escrow_chain, django_capture_on_commit_callbacks
    in_challenge_before_proposed_seq_shipped(funded, chain, capture)
    with capture(execute=True):
        assert settlement.settlement_tick()["proposed"] == 1
    confirm_all(capture)
    agreement = UsageAgreement.objects.get(pk=funded.agreement_id)
    assert selectors.onchain_escrow(agreement=agreement)["lastSeq"] == 3
    assert agreement.proposed_seq == 3


def test_the_data_migration_fills_proposed_seq_from_the_chain_events_and_our_proposals(
        funded, escrow_chain, django_capture_on_commit_callbacks):  # noqa: F811
    chain, capture = escrow_chain, django_capture_on_commit_callbacks
    in_challenge_before_proposed_seq_shipped(funded, chain, capture)
    fill = importlib.import_module("agreements.migrations.0020_proposed_seq_fill").proposed_seq_fill
    fill(apps, None)
    assert UsageAgreement.objects.get(pk=funded.agreement_id).proposed_seq == 1  # the applied SettlementProposed

    with capture(execute=True):
        assert settlement.settlement_tick()["proposed"] == 1
    confirm_all(capture)  # our re-proposal of seq 3, confirmed; its event not indexed yet
    UsageAgreement.objects.filter(pk=funded.agreement_id).update(proposed_seq=None)
    fill(apps, None)
    assert UsageAgreement.objects.get(pk=funded.agreement_id).proposed_seq == 3  # our confirmed proposal


def test_our_proposal_the_seller_sent_first_is_done_by_another_not_a_failure(
        funded, escrow_chain, django_capture_on_commit_callbacks, admin_client, settings):  # noqa: F811
    """The tick queues our proposal of the last receipt; the seller proposes that same receipt itself and is mined
    first: ours reverts (StaleReceipt). That is no failure for an operator, nor one the proposal backoff counts (it
    would hold back a re-proposal of a higher receipt, and give up after SETTLEMENT_PROPOSE_MAX_ATTEMPTS): its
    evidence names the seller's transaction and block, as a finalize someone else sent first does."""
    chain, capture = escrow_chain, django_capture_on_commit_callbacks
    settings.SETTLEMENT_PROPOSE_MAX_ATTEMPTS = 1
    call_n(funded, 3)
    assert funded.buyer_api.post(f"/usage-agreements/{funded.agreement_id}/complete").status_code == 200
    with capture(execute=False) as submits:
        assert settlement.settlement_tick()["proposed"] == 1
    seller_proposes_directly(funded, chain, seq=3)
    theirs = chain.w3.eth.get_block("latest")
    with capture(execute=True):
        for submit in submits:
            submit()
    confirm_all(capture)

    [ours] = proposals(funded.agreement_id)
    assert ours.status == TxStatus.FAILED and "StaleReceipt" in ours.failure_reason
    assert ours.outcome_evidence[relayer.EVIDENCE_BLOCK] == {"number": theirs["number"],
                                                             "hash": "0x" + bytes(theirs["hash"]).hex()}
    assert ours.outcome_evidence[settlement.DONE_BY] == "0x" + bytes(theirs["transactions"][0]).hex()
    assert selectors.proposal_failures(agreement_id=funded.agreement_id) == []
    dashboard = admin_client.get("/admin/dashboard/").context
    assert not [item for item in dashboard["failures"] + dashboard["overdue"]
                if str(item.subject) == str(funded.agreement_id)]
    index(capture)
    agreement = UsageAgreement.objects.get(pk=funded.agreement_id)
    assert (agreement.status, agreement.proposed_seq) == ("in_challenge", 3)


def seller_proposes_a_receipt_the_books_do_not_hold(funded, chain, *, seq: int, amount: int):  # noqa: F811
    """The seller proposes a receipt the receipt signer signed that no usage event of the books is (a signing key
    misused, the database restored from a backup older than the receipts handed out)."""
    agreement = UsageAgreement.objects.get(pk=funded.agreement_id)
    digest = "0x" + "ab" * 32
    signature = receipt_sign(django_settings.RECEIPT_SIGNER_PRIVATE_KEY, receipts.usage_receipt_digest(
        chain_id=agreement.chain_id, escrow_address=chain.addresses["escrow"], agreement_id=agreement.onchain_id,
        seq=seq, cumulative_amount=amount, usage_digest=digest))
    mined(chain, chain.escrow.functions.proposeSettlement(
        agreement.onchain_id, escrow_terms(chain.escrow, agreement.onchain_id), seq, amount, digest, signature,
    ).transact({"from": funded.seller_account.address}))


def test_a_proposal_above_the_recorded_usage_is_surfaced_and_the_buyer_challenges_it_in_time(
        funded, escrow_chain, django_capture_on_commit_callbacks, admin_client):  # noqa: F811
    """The seller proposes on-chain the whole deposit under a receipt the books do not hold, 3 calls (60_000) being
    all the usage recorded. The agreement went in_challenge and the escrow would pay it at the window's end, with
    nothing telling the buyer or an operator that the amount is not the recorded usage (only `reconcile`, run by
    hand, compared it): the agreement shows the amount proposed beside the usage, its event says the proposal is
    above the usage, the dashboard lists it, and the buyer's challenge through the API disputes it."""
    chain, capture = escrow_chain, django_capture_on_commit_callbacks
    call_n(funded, 3)
    seller_proposes_a_receipt_the_books_do_not_hold(funded, chain, seq=4, amount=2 * USDC)
    index(capture)

    agreement = funded.agreement(funded.agreement_id)
    assert (agreement["status"], agreement["used_atomic"], agreement["proposed_atomic"]) == (
        "in_challenge", 60_000, 2 * USDC)
    events = funded.buyer_api.get(f"/usage-agreements/{funded.agreement_id}/events").json()["results"]
    [proposed] = [event for event in events if event["to_status"] == "in_challenge"]
    assert proposed["data"]["above_usage_atomic"] == 2 * USDC - 60_000
    assert "above the usage recorded" in proposed["reason"]
    failures = admin_client.get("/admin/dashboard/").context["failures"]
    assert [failure.kind for failure in failures if failure.subject == funded.agreement_id] == [
        "settlement proposed above the recorded usage"]

    package = funded.buyer_api.get(f"/usage-agreements/{funded.agreement_id}/challenge-package").json()
    body = {"reason": "not my usage", "deadline": package["deadline"],
            "signature": sign_typed_data(funded.buyer_account.key, package["challenge"])}
    with capture(execute=True):
        response = funded.buyer_api.post(f"/usage-agreements/{funded.agreement_id}/challenge", body)
    assert response.status_code == 202, response.content
    confirm_all(capture)
    assert funded.agreement(funded.agreement_id)["status"] == "disputed"


def test_a_proposal_of_an_earlier_receipt_is_not_above_the_recorded_usage(
        funded, escrow_chain, django_capture_on_commit_callbacks, admin_client):  # noqa: F811
    chain, capture = escrow_chain, django_capture_on_commit_callbacks
    call_n(funded, 3)
    seller_proposes_directly(funded, chain, seq=2)
    index(capture)
    agreement = funded.agreement(funded.agreement_id)
    assert (agreement["status"], agreement["proposed_atomic"]) == ("in_challenge", 40_000)
    failures = admin_client.get("/admin/dashboard/").context["failures"]
    assert not [failure for failure in failures if failure.subject == funded.agreement_id]


def test_the_data_migration_fills_proposed_amount_from_the_chain_events(
        funded, escrow_chain, django_capture_on_commit_callbacks):  # noqa: F811
    chain, capture = escrow_chain, django_capture_on_commit_callbacks
    call_n(funded, 3)
    seller_proposes_directly(funded, chain, seq=2)
    index(capture)
    UsageAgreement.objects.filter(pk=funded.agreement_id).update(proposed_amount=None)
    fill = importlib.import_module("agreements.migrations.0040_proposed_amount_fill").proposed_amount_fill
    fill(apps, None)
    assert UsageAgreement.objects.get(pk=funded.agreement_id).proposed_amount == 40_000


def test_an_escrow_settled_at_an_earlier_receipt_than_the_books_last_is_a_failure_on_the_dashboard(
        funded, escrow_chain, django_capture_on_commit_callbacks, admin_client):  # noqa: F811
    """Three calls charged (60000); the seller proposes its first receipt (20000) itself, and the window closes before
    a settlement tick re-proposes the last one (the beat down for the window). The escrow pays the seller 20000 for
    60000 the books charged the buyer: settled, and nothing said so, while a reclaim with the seller unpaid is listed.
    It is listed the same way, with what was paid, charged and proposed."""
    chain, capture = escrow_chain, django_capture_on_commit_callbacks
    call_n(funded, 3)
    seller_proposes_directly(funded, chain, seq=1)
    index(capture)
    chain.increase_time(3601)
    with capture(execute=True):
        assert settlement.settlement_tick()["finalizing"] == 1
    confirm_all(capture)
    settled = UsageAgreement.objects.get(pk=funded.agreement_id)
    assert (settled.status, settled.seller_payout, settled.used) == ("settled", 20_000, 60_000)

    failures = admin_client.get("/admin/dashboard/").context["failures"]
    [below] = [failure for failure in failures if failure.subject == funded.agreement_id]
    assert below.kind == "escrow settled below the usage charged"
    assert below.reason == ("the escrow paid the seller 20000 of the 60000 base units charged: receipt 1 of 3 was "
                            "the last proposed")
    out = io.StringIO()
    call_command("reconcile", stdout=out)
    assert (f"agreement {funded.agreement_id} (settled): the escrow paid the seller 20000 of the 60000 base units "
            "charged: receipt 1 of 3 was the last proposed before the window closed") in out.getvalue()
