"""The server pays the infra fees the escrow accrued to the fee recipient (escrow.fees, the pay-fees beat task),
through the relayer, against the real contracts on Anvil."""

import pytest

from escrow import tasks
from escrow.models import ChainTransaction, TxPurpose, TxStatus
from tests.escrow.flow import Parties, confirm_all, usdc_balance

pytestmark = [pytest.mark.chain, pytest.mark.django_db]


def _activated(parties: Parties, capture) -> None:
    """An activated agreement whose fee stays accrued in the escrow (no one has called payFees)."""
    agreement = parties.accepted_agreement(quantity=100)  # fee 0.10 USDC
    with capture(execute=True):
        response = parties.buyer_api.post(f"/usage-agreements/{agreement['id']}/activate-escrow",
                                          parties.signed_activation(agreement["id"]))
    assert response.status_code == 202, response.content
    confirm_all(capture)
    assert parties.agreement(agreement["id"])["status"] == "active"


def _accrued(chain) -> int:
    return chain.escrow.functions.feesAccrued(chain.addresses["usdc"]).call()


def test_the_fee_task_pays_the_accrued_fee_to_the_fee_recipient(escrow_chain, django_capture_on_commit_callbacks):
    chain, capture = escrow_chain, django_capture_on_commit_callbacks
    _activated(Parties(chain), capture)
    fee_recipient = chain.accounts.fee_recipient.address
    accrued, before = _accrued(chain), usdc_balance(chain, fee_recipient)
    assert accrued >= 100_000

    with capture(execute=True):
        tasks.pay_fees()
    confirm_all(capture)

    [payment] = ChainTransaction.objects.filter(purpose=TxPurpose.PAY_FEES)
    assert payment.status == TxStatus.CONFIRMED and payment.outcome_applied
    assert payment.outcome_evidence == {"amount": accrued, "fee_recipient": fee_recipient}
    assert usdc_balance(chain, fee_recipient) == before + accrued
    assert _accrued(chain) == 0
    assert tasks.pay_fees() is None  # nothing accrued: nothing sent
    assert ChainTransaction.objects.filter(purpose=TxPurpose.PAY_FEES).count() == 1


def test_one_fee_payment_at_a_time(escrow_chain, django_capture_on_commit_callbacks):
    chain, capture = escrow_chain, django_capture_on_commit_callbacks
    _activated(Parties(chain), capture)
    with capture(execute=False):  # queued, not yet sent
        assert tasks.pay_fees() is not None
    assert _accrued(chain) > 0
    assert tasks.pay_fees() is None
    assert ChainTransaction.objects.filter(purpose=TxPurpose.PAY_FEES).count() == 1
