"""A dispute as its parties and the arbiter see it: what the arbiter may award, and what the buyer gave it to decide."""

import pytest

from agreements.models import UsageAgreement
from tests.conftest import error_code
from tests.escrow.flow import USDC, mined_what_was_sent, usdc_balance
from tests.escrow.test_disputes import challenge_body
from tests.escrow.test_indexer import call_n, index, seller_proposes_directly
from tests.escrow.test_settlement import dispute, funded, staff_owner_api  # noqa: F401 - the fixture

pytestmark = [pytest.mark.chain, pytest.mark.django_db]


def test_the_arbiter_cannot_award_the_seller_more_than_its_disputed_proposal(
        funded, escrow_chain, django_capture_on_commit_callbacks):  # noqa: F811
    """The seller proposed what its signed receipts add up to (10 calls, 0.2 USDC); the buyer disputed it as too
    much. A resolution paying the seller more than it claimed (up to the whole deposit) is no answer to that."""
    dispute(funded, escrow_chain, django_capture_on_commit_callbacks)
    operator = staff_owner_api("change_dispute")
    over = operator.post(f"/usage-agreements/{funded.agreement_id}/resolve", {"seller_amount_atomic": 1 * USDC})
    assert over.status_code == 400, over.content
    assert error_code(over) == "amount_exceeds_proposal"
    assert over.json()["error"]["details"]["proposed_atomic"] == 200_000
    assert usdc_balance(escrow_chain, escrow_chain.addresses["escrow"]) == 2 * USDC


def test_the_arbiter_sees_the_buyers_evidence(
        funded, escrow_chain, django_capture_on_commit_callbacks, admin_client):  # noqa: F811
    dispute(funded, escrow_chain, django_capture_on_commit_callbacks)
    page = admin_client.get(f"/admin/escrow/dispute/{funded.agreement_id}/resolve/")
    assert page.status_code == 200
    assert "call ids 3-7" in page.content.decode()




def test_the_arbiter_sees_the_evidence_of_a_challenge_the_indexer_applied_first(
        funded, escrow_chain, django_capture_on_commit_callbacks, admin_client):  # noqa: F811
    capture = django_capture_on_commit_callbacks
    funded.onchain_id = UsageAgreement.objects.get(pk=funded.agreement_id).onchain_id
    call_n(funded, 3)
    seller_proposes_directly(funded, escrow_chain)
    index(capture)
    package = funded.buyer_api.get(f"/usage-agreements/{funded.agreement_id}/challenge-package").json()
    with capture(execute=True):
        assert funded.buyer_api.post(f"/usage-agreements/{funded.agreement_id}/challenge",
                                     challenge_body(funded, package)).status_code == 202
    mined_what_was_sent()
    index(capture)  # the Challenged event before the relayer's poll
    assert funded.agreement(funded.agreement_id)["status"] == "disputed"
    page = admin_client.get(f"/admin/escrow/dispute/{funded.agreement_id}/resolve/")
    assert "call 3" in page.content.decode()


def test_a_disputes_evidence_as_text_is_bounded_as_a_challenges_is(
        funded, escrow_chain, django_capture_on_commit_callbacks):  # noqa: F811
    """POST .../challenge refuses evidence over 5000 characters; POST .../dispute (the Pægents SDK's shape) kept any
    text whole, stored on the challenge and the dispute for the arbiter (an object's JSON: test_disputes.py)."""
    from escrow.models import ChainTransaction, TxPurpose

    funded.onchain_id = UsageAgreement.objects.get(pk=funded.agreement_id).onchain_id
    call_n(funded, 3)
    seller_proposes_directly(funded, escrow_chain)
    index(django_capture_on_commit_callbacks)
    package = funded.buyer_api.get(f"/usage-agreements/{funded.agreement_id}/challenge-package").json()
    body = {**challenge_body(funded, package), "evidence": "x" * 100_000}
    response = funded.buyer_api.post(f"/usage-agreements/{funded.agreement_id}/dispute", body)
    assert response.status_code == 400, response.status_code
    assert not ChainTransaction.objects.filter(agreement_id=funded.agreement_id, purpose=TxPurpose.CHALLENGE).exists()
