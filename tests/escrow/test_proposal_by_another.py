"""Proposals on-chain that are not the platform's own, or that it did not record: the seller's proposal mined before
ours, and agreements already in challenge when `proposed_seq` was added (agreements 0018), whose copy of what is
proposed on-chain was left empty."""

import importlib

import pytest
from django.apps import apps

from agreements.models import UsageAgreement
from escrow import relayer, selectors, settlement
from escrow.models import ChainTransaction, TxPurpose, TxStatus
from tests.escrow.flow import confirm_all
from tests.escrow.test_indexer import call_n, funded, index, seller_proposes_directly  # noqa: F401

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
