"""The server pays the infra fees the escrow accrued to the fee recipient (escrow.fees, the pay-fees beat task),
through the relayer, against the real contracts on Anvil."""

import pytest
from web3 import Web3

from agreements.models import UsageAgreement
from escrow import artifacts, devchain, tasks
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


def test_the_fee_paid_is_read_from_the_payments_own_receipt_not_another_the_node_answers(
        escrow_chain, settings, django_capture_on_commit_callbacks):
    """A caching proxy mixing its answers up answers the fee payment's receipt lookup, once the relayer concluded it
    mined, with the receipt of an earlier payFees someone else sent (anyone may). The evidence was read from a receipt
    fetched outside the gateway, which checks that a receipt is of the transaction asked: the payment was recorded
    (and logged) as paying the other's amount. It is read from the payment's own receipt, in its own block."""
    from tests.support.rpc_relay import RpcRelay

    chain, capture = escrow_chain, django_capture_on_commit_callbacks
    parties = Parties(chain)
    _activated(parties, capture)
    others = chain.escrow.functions.payFees(chain.addresses["usdc"]).transact({"from": chain.accounts.stranger.address})
    assert chain.w3.eth.wait_for_transaction_receipt(others)["status"] == 1
    agreement = parties.accepted_agreement(quantity=300)
    with capture(execute=True):
        assert parties.buyer_api.post(f"/usage-agreements/{agreement['id']}/activate-escrow",
                                      parties.signed_activation(agreement["id"])).status_code == 202
    confirm_all(capture)
    accrued = _accrued(chain)
    assert accrued > 0

    relay = RpcRelay(chain.node.rpc_url).start()
    try:
        settings.CHAIN_RPC_URL, settings.CHAIN_RPC_RETRY_BACKOFF = relay.url, 0.01
        relay.receipts_answered_with("0x" + bytes(others).hex())
        with capture(execute=True):
            assert tasks.pay_fees() is not None
        for _ in range(3):
            confirm_all(capture)
        relay.rewrite_none()
        for _ in range(2):
            confirm_all(capture)
    finally:
        relay.stop()
    [payment] = ChainTransaction.objects.filter(purpose=TxPurpose.PAY_FEES)
    assert payment.status == TxStatus.CONFIRMED and payment.outcome_applied
    assert payment.outcome_evidence == {"amount": accrued, "fee_recipient": chain.accounts.fee_recipient.address}


@pytest.mark.parametrize("sent", ["before our simulation", "before ours is mined"])
def test_fees_someone_else_paid_first_are_no_failure_on_the_dashboard(
        escrow_chain, django_capture_on_commit_callbacks, admin_client, sent):
    """Anyone may call payFees (the money only goes to the fee recipient), and someone's is mined after the fee task
    read the fee accrued and before ours: ours reverts (NothingToWithdraw), at its simulation or mined. It did what
    ours would have, yet it was listed among the dashboard's failures as a finalize or a reclaim someone else sent
    first is not, so anyone could fill the operators' list of failures at every fee run."""
    chain, capture = escrow_chain, django_capture_on_commit_callbacks
    _activated(Parties(chain), capture)
    fee_recipient, before = chain.accounts.fee_recipient.address, usdc_balance(chain, chain.accounts.fee_recipient.address)
    accrued = _accrued(chain)
    pay = chain.escrow.functions.payFees(chain.addresses["usdc"])
    with capture(execute=False) as submits:
        assert tasks.pay_fees() is not None
    if sent == "before our simulation":
        theirs = pay.transact({"from": chain.accounts.stranger.address})
    else:
        chain.rpc("evm_setAutomine", [False])
    try:
        with capture(execute=True):
            for submit in submits:
                submit()
        if sent == "before ours is mined":  # theirs, with a higher tip, mined ahead of ours in the next block
            theirs = pay.transact({"from": chain.accounts.stranger.address, "gas": 200_000,
                                   "maxFeePerGas": 10**12, "maxPriorityFeePerGas": 10**11})
            chain.mine(1)
    finally:
        chain.rpc("evm_setAutomine", [True])
    assert chain.w3.eth.wait_for_transaction_receipt(theirs)["status"] == 1
    for _ in range(2):
        confirm_all(capture)

    [ours] = ChainTransaction.objects.filter(purpose=TxPurpose.PAY_FEES)
    assert ours.status == TxStatus.FAILED and "NothingToWithdraw" in ours.failure_reason
    assert ours.outcome_evidence["done_by"] == "0x" + bytes(theirs).hex()
    failures = admin_client.get("/admin/dashboard/").context["failures"]
    assert not [failure for failure in failures if "pay_fees" in failure.kind]
    assert usdc_balance(chain, fee_recipient) == before + accrued  # paid once


def _another_token(chain, escrow_holds: int) -> str:
    """A second MockUSDC the escrow allows (the token of an earlier or a later USDC_ADDRESS), `escrow_holds` of it
    minted to the escrow. Sent from the deployer before the relayer (the same account) sends anything: the relayer
    counts its own nonces."""
    deployer = chain.accounts.deployer
    other = devchain.deploy_contract(chain.w3, deployer.key, artifacts.MOCK_USDC, deployer.address, "USD Coin")
    chain.w3.eth.wait_for_transaction_receipt(chain.escrow.functions.setTokenAllowed(other, True).transact(
        {"from": deployer.address}))
    devchain.mint_usdc(chain.w3, other, deployer.key, chain.addresses["escrow"], escrow_holds)
    return other


def _fee_accrued_in(chain, token: str, amount: int) -> None:
    """`amount` accrued as fees in `token` (which the escrow holds): written into the escrow's `feesAccrued` slot for
    it, found from the first token's, whose fee an activation accrued (a mapping: keccak(key . slot))."""
    def slot_of(address: str, index: int) -> bytes:
        return Web3.solidity_keccak(["uint256", "uint256"], [int(address, 16), index])

    escrow = chain.addresses["escrow"]
    [index] = [index for index in range(64) if int.from_bytes(chain.w3.eth.get_storage_at(
        escrow, slot_of(chain.addresses["usdc"], index))) == _accrued(chain)]
    chain.rpc("anvil_setStorageAt", [escrow, "0x" + slot_of(token, index).hex(), "0x" + amount.to_bytes(32).hex()])
    assert chain.escrow.functions.feesAccrued(token).call() == amount


def test_a_token_whose_fee_payment_keeps_failing_does_not_hold_back_another_tokens_fees(
        escrow_chain, django_capture_on_commit_callbacks):
    """Fees accrued in two tokens, and the first in the fee task's order blacklists the fee recipient (USDC can): its
    payFees reverts at every run. The task took the first token with a fee accrued at every run, so the other's fees
    were never paid. It now takes the token whose payment was sent least recently first."""
    chain, capture = escrow_chain, django_capture_on_commit_callbacks
    other = _another_token(chain, escrow_holds=70_000)
    fee_recipient = chain.accounts.fee_recipient.address
    blocked, paid = sorted([Web3.to_checksum_address(chain.addresses["usdc"]), other])
    chain.w3.eth.wait_for_transaction_receipt(devchain.usdc_contract(chain.w3, blocked).functions.blacklist(
        fee_recipient).transact({"from": chain.accounts.deployer.address}))
    parties = Parties(chain)
    _activated(parties, capture)
    _fee_accrued_in(chain, other, 70_000)
    UsageAgreement.objects.filter(pk=parties.accepted_agreement(quantity=100)["id"]).update(token_address=other)
    accrued = chain.escrow.functions.feesAccrued(paid).call()
    before = devchain.usdc_contract(chain.w3, paid).functions.balanceOf(fee_recipient).call()

    for _ in range(2):
        with capture(execute=True):
            tasks.pay_fees()
        confirm_all(capture)

    payments = [(payment.context["token"], payment.status) for payment in
                ChainTransaction.objects.filter(purpose=TxPurpose.PAY_FEES).order_by("created_at")]
    assert payments == [(blocked, TxStatus.FAILED), (paid, TxStatus.CONFIRMED)]
    assert devchain.usdc_contract(chain.w3, paid).functions.balanceOf(fee_recipient).call() == before + accrued


def test_a_fee_payment_that_ran_out_of_gas_is_not_sent_again_at_every_run(
        escrow_chain, monkeypatch, settings, django_capture_on_commit_callbacks):
    """A node estimates payFees short with a plausible figure (hostile, or a provider's bug): the payment is mined
    out of gas, its gas paid, and the next run of the fee task (every PAY_FEES_SECONDS) sent another, estimated as
    short, run after run at the platform's cost. The failure says it ran out of gas, and the token's next payment
    waits PAY_FEES_RETRY_AFTER_SECONDS after one mined failed, twice that after two in a row, and so on."""
    from escrow import chain as gateway
    from escrow import relayer

    chain, capture = escrow_chain, django_capture_on_commit_callbacks
    _activated(Parties(chain), capture)
    estimate = gateway.simulate
    monkeypatch.setattr(relayer, "_SLOT_FILL_GAS", 0)
    monkeypatch.setattr(gateway, "simulate", lambda **transaction: estimate(**transaction) * 3 // 5)
    for _ in range(3):
        with capture(execute=True):
            tasks.pay_fees()
        confirm_all(capture)
    payments = list(ChainTransaction.objects.filter(purpose=TxPurpose.PAY_FEES).order_by("created_at"))
    assert [(payment.status, payment.receipt_status) for payment in payments] == [(TxStatus.FAILED, 0)]
    assert f"({relayer.OUT_OF_GAS}: " in payments[0].failure_reason, payments[0].failure_reason

    settings.PAY_FEES_RETRY_AFTER_SECONDS = 0  # its wait over
    monkeypatch.setattr(gateway, "simulate", estimate)
    with capture(execute=True):
        tasks.pay_fees()
    confirm_all(capture)
    assert ChainTransaction.objects.filter(purpose=TxPurpose.PAY_FEES).latest("created_at").status == TxStatus.CONFIRMED
    assert _accrued(chain) == 0
