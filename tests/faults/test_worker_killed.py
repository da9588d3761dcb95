"""The Celery worker is killed with SIGKILL in the middle of a task and started again.

The kill points are made exact by the chain relay: a call the worker makes reaches the node (a transaction is
really broadcast, a receipt really exists) but the answer is held back, and the worker dies waiting for it.
"""

import pytest

from tests.faults.conftest import assert_books_balance, assert_each_transaction_sent_once, assert_reconciled
from tests.faults.processes import wait_until
from tests.escrow.flow import pay_fees

pytestmark = [pytest.mark.slow, pytest.mark.faults, pytest.mark.chain, pytest.mark.postgres,
              pytest.mark.django_db(transaction=True)]


def activate(stack, parties, agreement_id) -> None:
    with stack.api(parties.buyer_api.secret) as api:
        response = api.post(f"/usage-agreements/{agreement_id}/activate-escrow",
                            json=parties.signed_activation(agreement_id))
    assert response.status_code == 202, response.text


def kill_worker_while_holding(stack, *methods: str) -> None:
    wait_until(stack.relay.holding.is_set, timeout=30, what=f"the worker to call {methods}")
    stack.worker.kill()
    stack.relay.release()
    stack.start_worker()


@pytest.mark.parametrize("held", ["eth_sendRawTransaction", "eth_getTransactionReceipt"],
                         ids=["while_broadcasting", "while_confirming"])
def test_killed_during_the_activation(stack, parties, held):
    agreement = parties.accepted_agreement()
    sent_before = stack.relayer_nonce()
    stack.relay.hold(held)
    activate(stack, parties, agreement["id"])
    kill_worker_while_holding(stack, held)

    stack.wait_for_status(agreement["id"], "active")
    # A broadcast the worker never heard about is the one mined: no second transaction, no nonce skipped.
    assert stack.relayer_nonce() == sent_before + 1
    assert_each_transaction_sent_once(agreement["id"], ["activate"])
    events = parties.buyer_api.get(f"/usage-agreements/{agreement['id']}/events").json()["results"]
    assert [event["to_status"] for event in events].count("active") == 1  # the outcome applied once
    assert_reconciled()


def test_killed_while_proposing_and_finalizing_the_settlement(stack, parties, upstream):
    agreement = parties.accepted_agreement(quantity=50)
    activate(stack, parties, agreement["id"])
    stack.wait_for_status(agreement["id"], "active")
    with stack.api(parties.buyer_api.secret) as api:
        for _ in range(5):
            assert api.get(f"/metered-proxy/{agreement['id']}/work").status_code == 200
        stack.relay.hold("eth_sendRawTransaction")
        assert api.post(f"/usage-agreements/{agreement['id']}/complete").status_code == 200
    kill_worker_while_holding(stack, "eth_sendRawTransaction")
    stack.wait_for_status(agreement["id"], "in_challenge")

    stack.chain.increase_time(3601)  # the challenge window is over; the beat finalizes
    stack.relay.hold("eth_sendRawTransaction")
    kill_worker_while_holding(stack, "eth_sendRawTransaction")
    stack.wait_for_status(agreement["id"], "settled")

    assert_each_transaction_sent_once(agreement["id"], ["activate", "propose_settlement", "finalize"])
    assert_books_balance(agreement["id"])
    assert upstream.served == 5
    settled = parties.agreement(agreement["id"])
    price = parties.service.unit_price
    assert (settled["seller_payout_atomic"], settled["buyer_refund_atomic"]) == (5 * price, 45 * price)
    pay_fees(stack.chain)  # the fee accrued in the escrow goes to the fee recipient
    assert stack.chain.usdc.functions.balanceOf(stack.chain.addresses["escrow"]).call() == 0
    assert_reconciled()


def test_killed_between_the_attempt_being_mined_and_its_receipt_being_stored(stack, parties):
    agreement = parties.accepted_agreement()
    sent_before = stack.relayer_nonce()
    # The poll has read the receipt of the mined activation; the next call (the chain's height, asked before the
    # receipt is written) never answers, and the worker dies with the receipt in memory only.
    stack.relay.hold("eth_blockNumber")
    activate(stack, parties, agreement["id"])
    kill_worker_while_holding(stack, "eth_blockNumber")

    stack.wait_for_status(agreement["id"], "active")
    assert stack.relayer_nonce() == sent_before + 1  # found again, not sent again
    assert_each_transaction_sent_once(agreement["id"], ["activate"])
    events = parties.buyer_api.get(f"/usage-agreements/{agreement['id']}/events").json()["results"]
    assert [event["to_status"] for event in events].count("active") == 1
    assert_reconciled()
