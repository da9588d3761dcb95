"""Push payouts with pull fallback: a party that cannot receive (USDC blacklist) never blocks the other."""

import pytest

from tests.escrow.conftest import random_bytes32

pytestmark = pytest.mark.chain

WINDOW = 600
SELLER_AMOUNT = 400_000
BUYER_AMOUNT = 600_000


@pytest.fixture
def proposed(esc, chain):
    """A 1 USDC escrow with 0.4 USDC proposed for the seller, its window over (ready to finalize)."""
    typed, _ = esc.activate(challenge_window=WINDOW)
    msg = typed["message"]
    receipt = esc.propose(msg["agreementId"], 1, SELLER_AMOUNT)
    chain.set_next_timestamp(esc.event(receipt, "SettlementProposed")["challengeDeadline"])
    chain.mine()
    return msg


def _finalize(esc, agreement_id):
    return esc.tx(esc.fn("finalize", agreement_id), esc.acc.stranger)


def test_blocked_seller_does_not_block_buyer_refund(esc, proposed):
    acc = esc.acc
    agreement_id = proposed["agreementId"]
    esc.blacklist(acc.seller)
    seller_before, buyer_before = esc.balance(acc.seller), esc.balance(acc.buyer)

    receipt = _finalize(esc, agreement_id)

    assert esc.event(receipt, "PayoutDeferred") == {
        "agreementId": bytes.fromhex(agreement_id[2:]),
        "buyer": acc.buyer.address,
        "party": acc.seller.address,
        "amount": SELLER_AMOUNT,
    }
    assert esc.balance(acc.buyer) - buyer_before == BUYER_AMOUNT
    assert esc.balance(acc.seller) == seller_before
    e = esc.get(agreement_id)
    assert (e["state"], e["sellerClaimable"], e["buyerClaimable"]) == ("Settled", SELLER_AMOUNT, 0)
    assert esc.held() == SELLER_AMOUNT

    # still blocked: nothing can be paid
    esc.reverts(esc.fn("withdraw", agreement_id), acc.seller, "PayoutFailed", agreement_id)
    esc.unblacklist(acc.seller)
    receipt = esc.tx(esc.fn("withdraw", agreement_id), acc.stranger)  # anyone may trigger it
    assert esc.event(receipt, "Withdrawn") == {
        "agreementId": bytes.fromhex(agreement_id[2:]),
        "buyer": acc.buyer.address,
        "party": acc.seller.address,
        "amount": SELLER_AMOUNT,
    }
    assert esc.balance(acc.seller) - seller_before == SELLER_AMOUNT
    assert esc.get(agreement_id)["sellerClaimable"] == 0
    assert esc.held() == 0
    esc.reverts(esc.fn("withdraw", agreement_id), acc.seller, "NothingToWithdraw", agreement_id)


def test_blocked_buyer_does_not_block_seller_payout(esc, proposed):
    acc = esc.acc
    agreement_id = proposed["agreementId"]
    esc.blacklist(acc.buyer)
    seller_before, buyer_before = esc.balance(acc.seller), esc.balance(acc.buyer)

    receipt = _finalize(esc, agreement_id)

    assert esc.event(receipt, "PayoutDeferred")["party"] == acc.buyer.address
    assert esc.balance(acc.seller) - seller_before == SELLER_AMOUNT
    e = esc.get(agreement_id)
    assert (e["sellerClaimable"], e["buyerClaimable"]) == (0, BUYER_AMOUNT)

    esc.unblacklist(acc.buyer)
    receipt = esc.tx(esc.fn("withdraw", agreement_id), acc.buyer)
    assert esc.event(receipt, "Withdrawn")["amount"] == BUYER_AMOUNT
    assert esc.balance(acc.buyer) - buyer_before == BUYER_AMOUNT


def test_both_blocked_then_released_one_by_one(esc, proposed):
    acc = esc.acc
    agreement_id = proposed["agreementId"]
    esc.blacklist(acc.seller)
    esc.blacklist(acc.buyer)
    receipt = _finalize(esc, agreement_id)
    deferred = esc.events(receipt, "PayoutDeferred")
    assert {(d["party"], d["amount"]) for d in deferred} == {
        (acc.seller.address, SELLER_AMOUNT),
        (acc.buyer.address, BUYER_AMOUNT),
    }
    assert esc.state(agreement_id) == "Settled"
    assert esc.held() == SELLER_AMOUNT + BUYER_AMOUNT

    esc.unblacklist(acc.buyer)
    receipt = esc.tx(esc.fn("withdraw", agreement_id), acc.stranger)
    assert [(w["party"], w["amount"]) for w in esc.events(receipt, "Withdrawn")] == [
        (acc.buyer.address, BUYER_AMOUNT)
    ]
    e = esc.get(agreement_id)
    assert (e["sellerClaimable"], e["buyerClaimable"]) == (SELLER_AMOUNT, 0)
    esc.reverts(esc.fn("withdraw", agreement_id), acc.stranger, "PayoutFailed")

    esc.unblacklist(acc.seller)
    receipt = esc.tx(esc.fn("withdraw", agreement_id), acc.stranger)
    assert [(w["party"], w["amount"]) for w in esc.events(receipt, "Withdrawn")] == [
        (acc.seller.address, SELLER_AMOUNT)
    ]
    assert esc.held() == 0


def test_resolved_dispute_with_blocked_seller(esc, chain):
    acc = esc.acc
    typed, _ = esc.activate(challenge_window=WINDOW)
    agreement_id = typed["message"]["agreementId"]
    esc.propose(agreement_id, 1, 900_000)
    esc.tx(esc.fn("challenge", agreement_id), acc.buyer)
    esc.tx(esc.fn("resolve", agreement_id, 300_000), acc.arbiter)
    esc.blacklist(acc.seller)
    buyer_before = esc.balance(acc.buyer)
    receipt = _finalize(esc, agreement_id)
    assert esc.event(receipt, "PayoutDeferred")["amount"] == 300_000
    assert esc.balance(acc.buyer) - buyer_before == 700_000
    esc.unblacklist(acc.seller)
    esc.tx(esc.fn("withdraw", agreement_id), acc.seller)
    assert esc.held() == 0


def test_reclaim_to_blocked_buyer(esc, chain):
    acc = esc.acc
    typed, _ = esc.activate()
    agreement_id = typed["message"]["agreementId"]
    esc.blacklist(acc.buyer)
    chain.set_next_timestamp(esc.get(agreement_id)["reclaimAfter"])
    receipt = esc.tx(esc.fn("reclaim", agreement_id), acc.stranger)
    assert esc.event(receipt, "Reclaimed")["amount"] == 1_000_000
    assert esc.event(receipt, "PayoutDeferred")["amount"] == 1_000_000
    e = esc.get(agreement_id)
    assert (e["state"], e["buyerClaimable"]) == ("Reclaimed", 1_000_000)
    esc.reverts(esc.fn("withdraw", agreement_id), acc.buyer, "PayoutFailed")
    esc.unblacklist(acc.buyer)
    esc.tx(esc.fn("withdraw", agreement_id), acc.buyer)
    assert esc.balance(acc.buyer) == 1_000_000
    assert esc.held() == 0


def test_withdraw_with_nothing_credited(esc, proposed):
    esc.reverts(
        esc.fn("withdraw", proposed["agreementId"]), esc.acc.buyer, "NothingToWithdraw",
        proposed["agreementId"],
    )
    _finalize(esc, proposed["agreementId"])
    esc.reverts(esc.fn("withdraw", proposed["agreementId"]), esc.acc.buyer, "NothingToWithdraw")
    unknown = random_bytes32()
    esc.reverts(esc.fn("withdraw", unknown), esc.acc.buyer, "NothingToWithdraw", unknown)


def test_a_starved_gas_limit_cannot_force_a_deferral(esc, chain, proposed):
    """A caller who sends finalize with just enough gas for the outer call but too little for the token
    transfer must not be able to turn a payable party into a deferred one: such calls revert."""
    agreement_id = proposed["agreementId"]
    fn = esc.fn("finalize", agreement_id)
    needed = fn.estimate_gas({"from": esc.acc.stranger.address})
    outcomes = set()
    for gas in [*range(45_000, needed, 1_500), needed, needed + 50_000]:
        snapshot = chain.snapshot()
        tx_hash = fn.transact({"from": esc.acc.stranger.address, "gas": gas})
        receipt = esc.w3.eth.wait_for_transaction_receipt(tx_hash, poll_latency=0.01)
        if receipt["status"] == 1:
            assert esc.events(receipt, "PayoutDeferred") == [], f"deferred with gas={gas}"
            outcomes.add("paid")
        else:
            outcomes.add("reverted")
        chain.revert(snapshot)
    assert outcomes == {"paid", "reverted"}
