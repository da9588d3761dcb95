"""A dispute as its parties and the arbiter see it: what the arbiter may award, and what the buyer gave it to decide."""

import pytest

from tests.conftest import error_code
from tests.escrow.flow import USDC, usdc_balance
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

