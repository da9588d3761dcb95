"""UsageEscrow after activation: proposeSettlement, challenge, resolve, finalize, reclaim, and the money."""

import pytest

from tests.escrow.conftest import random_bytes32

pytestmark = pytest.mark.chain

WINDOW = 600


@pytest.fixture
def active(esc):
    """An Active escrow: 10 units x 0.1 USDC = 1 USDC deposit, 0.103 USDC fee, 600 s challenge window."""
    typed, _ = esc.activate(challenge_window=WINDOW)
    return typed["message"]


def _proposed(esc, active, amount=400_000, seq=1):
    receipt = esc.propose(active["agreementId"], seq, amount)
    return esc.event(receipt, "SettlementProposed")


# ------------------------------------------------------------------ proposeSettlement


def test_propose_settlement_starts_the_window(esc, chain, active):
    agreement_id = active["agreementId"]
    digest = random_bytes32()
    receipt = esc.propose(agreement_id, 7, 400_000, usage_digest=digest)
    block_time = esc.w3.eth.get_block(receipt["blockNumber"])["timestamp"]
    e = esc.get(agreement_id)
    assert e["state"] == "Proposed"
    assert e["settledAmount"] == 400_000 and e["lastSeq"] == 7
    assert e["usageDigest"] == bytes.fromhex(digest[2:])
    assert e["challengeDeadline"] == block_time + WINDOW
    assert esc.event(receipt, "SettlementProposed") == {
        "agreementId": bytes.fromhex(agreement_id[2:]),
        "buyer": esc.acc.buyer.address,
        "seq": 7,
        "cumulativeAmount": 400_000,
        "usageDigest": bytes.fromhex(digest[2:]),
        "challengeDeadline": block_time + WINDOW,
    }


def test_seller_may_propose(esc, active):
    esc.propose(active["agreementId"], 1, 1, sender=esc.acc.seller)
    assert esc.state(active["agreementId"]) == "Proposed"


@pytest.mark.parametrize("who", ["buyer", "stranger", "arbiter", "receipt_signer"])
def test_propose_by_wrong_caller(esc, active, who):
    caller = getattr(esc.acc, who)
    esc.reverts(esc.propose_fn(active["agreementId"], 1, 1), caller, "NotOperatorOrSeller", caller.address)


def test_new_operator_may_propose(esc, active):
    role = esc.escrow.functions.OPERATOR_ROLE().call()
    esc.tx(esc.escrow.functions.grantRole(role, esc.acc.spare.address), esc.acc.deployer)
    esc.propose(active["agreementId"], 1, 1, sender=esc.acc.spare)
    assert esc.state(active["agreementId"]) == "Proposed"


def test_cumulative_amount_over_deposit(esc, active):
    deposit = active["depositAmount"]
    esc.reverts(
        esc.propose_fn(active["agreementId"], 1, deposit + 1), esc.acc.operator, "AmountExceedsDeposit",
        deposit + 1, deposit,
    )
    esc.propose(active["agreementId"], 1, deposit)  # the whole deposit is fine


def test_bad_receipt_signature(esc, active):
    agreement_id = active["agreementId"]
    digest = random_bytes32()
    good = esc.receipt_sig(agreement_id, 1, 500, digest)
    cases = [
        esc.receipt_sig(agreement_id, 1, 500, digest, signer=esc.acc.seller),  # wrong signer
        esc.receipt_sig(agreement_id, 1, 500, digest, signer=esc.acc.buyer),
        esc.receipt_sig(agreement_id, 1, 499, digest),  # signed another amount
        esc.receipt_sig(agreement_id, 2, 500, digest),  # signed another seq
        esc.receipt_sig(random_bytes32(), 1, 500, digest),  # another agreement
        "0x" + "11" * 65,
        "0x",
    ]
    for signature in cases:
        fn = esc.fn("proposeSettlement", agreement_id, 1, 500, digest, signature)
        esc.reverts(fn, esc.acc.operator, "InvalidReceiptSignature")
    esc.tx(esc.fn("proposeSettlement", agreement_id, 1, 500, digest, good), esc.acc.operator)


def test_propose_unknown_agreement(esc):
    agreement_id = random_bytes32()
    esc.reverts(esc.propose_fn(agreement_id, 1, 1), esc.acc.operator, "InvalidState", agreement_id, 0)


def test_reproposal_with_higher_seq_restarts_window(esc, chain, active):
    agreement_id = active["agreementId"]
    first = _proposed(esc, active, amount=100, seq=3)
    chain.increase_time(100)
    receipt = esc.propose(agreement_id, 4, 250)
    second = esc.event(receipt, "SettlementProposed")
    assert second["challengeDeadline"] > first["challengeDeadline"]
    e = esc.get(agreement_id)
    assert (e["settledAmount"], e["lastSeq"], e["state"]) == (250, 4, "Proposed")
    for seq in (4, 3, 0):
        esc.reverts(esc.propose_fn(agreement_id, seq, 300), esc.acc.operator, "StaleReceipt", seq, 4)


def test_reproposal_after_window_is_refused(esc, chain, active):
    event = _proposed(esc, active)
    chain.set_next_timestamp(event["challengeDeadline"])
    chain.mine()
    esc.reverts(
        esc.propose_fn(active["agreementId"], 2, 500), esc.acc.operator, "ChallengeWindowClosed",
        event["challengeDeadline"],
    )


def test_first_proposal_only_before_reclaim_opens(esc, chain, active):
    reclaim_after = esc.get(active["agreementId"])["reclaimAfter"]
    chain.set_next_timestamp(reclaim_after - 1)
    esc.propose(active["agreementId"], 1, 1)  # the last second is fine

    typed, _ = esc.activate()
    other = typed["message"]
    reclaim_after = esc.get(other["agreementId"])["reclaimAfter"]
    chain.set_next_timestamp(reclaim_after)
    chain.mine()
    esc.reverts(esc.propose_fn(other["agreementId"], 1, 1), esc.acc.operator, "ProposalPeriodOver", reclaim_after)


# ------------------------------------------------------------------ finalize after the window


def test_finalize_before_window_end(esc, chain, active):
    event = _proposed(esc, active)
    esc.reverts(
        esc.fn("finalize", active["agreementId"]), esc.acc.stranger, "ChallengeWindowOpen",
        event["challengeDeadline"],
    )
    chain.set_next_timestamp(event["challengeDeadline"] - 1)
    chain.mine()
    esc.reverts(esc.fn("finalize", active["agreementId"]), esc.acc.stranger, "ChallengeWindowOpen")


def test_finalize_pays_both_parties(esc, chain, active):
    acc = esc.acc
    event = _proposed(esc, active, amount=400_000)
    seller_before, buyer_before = esc.balance(acc.seller), esc.balance(acc.buyer)
    chain.set_next_timestamp(event["challengeDeadline"])  # the window's end is inclusive for finalize
    receipt = esc.tx(esc.fn("finalize", active["agreementId"]), acc.stranger)
    assert esc.event(receipt, "Settled") == {
        "agreementId": bytes.fromhex(active["agreementId"][2:]),
        "buyer": acc.buyer.address,
        "sellerAmount": 400_000,
        "buyerAmount": 600_000,
    }
    assert esc.events(receipt, "PayoutDeferred") == []
    assert esc.balance(acc.seller) - seller_before == 400_000
    assert esc.balance(acc.buyer) - buyer_before == 600_000
    assert esc.held() == 0
    e = esc.get(active["agreementId"])
    assert e["state"] == "Settled" and e["sellerClaimable"] == 0 and e["buyerClaimable"] == 0


def test_double_finalize(esc, chain, active):
    event = _proposed(esc, active)
    chain.set_next_timestamp(event["challengeDeadline"])
    esc.tx(esc.fn("finalize", active["agreementId"]), esc.acc.stranger)
    esc.reverts(
        esc.fn("finalize", active["agreementId"]), esc.acc.stranger, "InvalidState",
        active["agreementId"], 5,
    )


def test_finalize_without_proposal(esc, active):
    esc.reverts(
        esc.fn("finalize", active["agreementId"]), esc.acc.operator, "InvalidState",
        active["agreementId"], 1,
    )
    unknown = random_bytes32()
    esc.reverts(esc.fn("finalize", unknown), esc.acc.operator, "InvalidState", unknown, 0)


@pytest.mark.parametrize("amount", [0, 1, 999_999, 1_000_000])
def test_finalize_amount_edges(esc, chain, active, amount):
    event = _proposed(esc, active, amount=amount)
    seller_before, buyer_before = esc.balance(esc.acc.seller), esc.balance(esc.acc.buyer)
    chain.set_next_timestamp(event["challengeDeadline"])
    esc.tx(esc.fn("finalize", active["agreementId"]), esc.acc.stranger)
    assert esc.balance(esc.acc.seller) - seller_before == amount
    assert esc.balance(esc.acc.buyer) - buyer_before == 1_000_000 - amount


# ------------------------------------------------------------------ challenge


def test_buyer_challenges_within_window(esc, active):
    _proposed(esc, active)
    receipt = esc.tx(esc.fn("challenge", active["agreementId"]), esc.acc.buyer)
    assert esc.event(receipt, "Challenged") == {
        "agreementId": bytes.fromhex(active["agreementId"][2:]),
        "buyer": esc.acc.buyer.address,
    }
    assert esc.state(active["agreementId"]) == "Disputed"
    # no more challenges, proposals or finalize while disputed
    esc.reverts(esc.fn("challenge", active["agreementId"]), esc.acc.buyer, "InvalidState")
    esc.reverts(esc.propose_fn(active["agreementId"], 2, 1), esc.acc.operator, "InvalidState")
    esc.reverts(esc.fn("finalize", active["agreementId"]), esc.acc.operator, "DisputeNotTimedOut")
    esc.reverts(esc.fn("reclaim", active["agreementId"]), esc.acc.operator, "InvalidState")


@pytest.mark.parametrize("who", ["seller", "operator", "stranger", "arbiter"])
def test_only_buyer_challenges(esc, active, who):
    _proposed(esc, active)
    caller = getattr(esc.acc, who)
    esc.reverts(esc.fn("challenge", active["agreementId"]), caller, "NotBuyer", caller.address)


def test_challenge_after_window(esc, chain, active):
    event = _proposed(esc, active)
    chain.set_next_timestamp(event["challengeDeadline"] - 1)
    esc.tx(esc.fn("challenge", active["agreementId"]), esc.acc.buyer)  # last second: accepted

    typed, _ = esc.activate(challenge_window=WINDOW)
    other = typed["message"]
    event = _proposed(esc, other)
    chain.set_next_timestamp(event["challengeDeadline"])
    chain.mine()
    esc.reverts(
        esc.fn("challenge", other["agreementId"]), esc.acc.buyer, "ChallengeWindowClosed",
        event["challengeDeadline"],
    )


def test_challenge_before_proposal(esc, active):
    esc.reverts(
        esc.fn("challenge", active["agreementId"]), esc.acc.buyer, "InvalidState",
        active["agreementId"], 1,
    )


def test_challenge_with_signature(esc, chain, active):
    _proposed(esc, active)
    deadline = chain.now() + 300
    signature = esc.challenge_sig(active["agreementId"], deadline)
    fn = esc.fn("challengeWithSig", active["agreementId"], deadline, signature)
    receipt = esc.tx(fn, esc.acc.operator)
    assert esc.event(receipt, "Challenged")["buyer"] == esc.acc.buyer.address
    assert esc.state(active["agreementId"]) == "Disputed"
    # replaying the signature does nothing more
    esc.reverts(fn, esc.acc.operator, "InvalidState", active["agreementId"], 3)


def test_challenge_with_signature_wrong_signer(esc, chain, active):
    _proposed(esc, active)
    deadline = chain.now() + 300
    for signer in (esc.acc.seller, esc.acc.operator, esc.acc.stranger):
        signature = esc.challenge_sig(active["agreementId"], deadline, signer=signer)
        fn = esc.fn("challengeWithSig", active["agreementId"], deadline, signature)
        esc.reverts(fn, esc.acc.operator, "InvalidBuyerSignature")
    # a buyer's signature for another agreement or another deadline does not fit
    signature = esc.challenge_sig(random_bytes32(), deadline)
    fn = esc.fn("challengeWithSig", active["agreementId"], deadline, signature)
    esc.reverts(fn, esc.acc.operator, "InvalidBuyerSignature")
    signature = esc.challenge_sig(active["agreementId"], deadline + 1)
    fn = esc.fn("challengeWithSig", active["agreementId"], deadline, signature)
    esc.reverts(fn, esc.acc.operator, "InvalidBuyerSignature")


def test_challenge_with_expired_signature(esc, chain, active):
    _proposed(esc, active)
    deadline = chain.now() + 10
    signature = esc.challenge_sig(active["agreementId"], deadline)
    chain.set_next_timestamp(deadline + 1)
    chain.mine()
    fn = esc.fn("challengeWithSig", active["agreementId"], deadline, signature)
    esc.reverts(fn, esc.acc.operator, "SignatureExpired", deadline)


def test_challenge_with_signature_after_window(esc, chain, active):
    event = _proposed(esc, active)
    deadline = event["challengeDeadline"] + 10_000
    signature = esc.challenge_sig(active["agreementId"], deadline)
    chain.set_next_timestamp(event["challengeDeadline"])
    chain.mine()
    fn = esc.fn("challengeWithSig", active["agreementId"], deadline, signature)
    esc.reverts(fn, esc.acc.operator, "ChallengeWindowClosed")


def test_challenge_with_signature_unknown_or_unproposed(esc, chain, active):
    deadline = chain.now() + 300
    unknown = random_bytes32()
    fn = esc.fn("challengeWithSig", unknown, deadline, esc.challenge_sig(unknown, deadline))
    esc.reverts(fn, esc.acc.operator, "InvalidState", unknown, 0)
    signature = esc.challenge_sig(active["agreementId"], deadline)
    fn = esc.fn("challengeWithSig", active["agreementId"], deadline, signature)
    esc.reverts(fn, esc.acc.operator, "InvalidState", active["agreementId"], 1)


# ------------------------------------------------------------------ resolve


@pytest.fixture
def disputed(esc, active):
    _proposed(esc, active, amount=700_000)
    esc.tx(esc.fn("challenge", active["agreementId"]), esc.acc.buyer)
    return active


@pytest.mark.parametrize("who", ["operator", "buyer", "seller", "stranger"])
def test_resolve_only_by_arbiter(esc, disputed, who):
    caller = getattr(esc.acc, who)
    role = esc.escrow.functions.ARBITER_ROLE().call()
    esc.reverts(
        esc.fn("resolve", disputed["agreementId"], 1), caller, "AccessControlUnauthorizedAccount",
        caller.address, role,
    )


def test_resolve_over_deposit(esc, disputed):
    esc.reverts(
        esc.fn("resolve", disputed["agreementId"], 1_000_001), esc.acc.arbiter,
        "AmountExceedsDeposit", 1_000_001, 1_000_000,
    )


def test_resolve_only_when_disputed(esc, active):
    esc.reverts(esc.fn("resolve", active["agreementId"], 1), esc.acc.arbiter, "InvalidState")
    _proposed(esc, active)
    esc.reverts(esc.fn("resolve", active["agreementId"], 1), esc.acc.arbiter, "InvalidState")


def test_resolve_then_finalize(esc, chain, disputed):
    agreement_id = disputed["agreementId"]
    receipt = esc.tx(esc.fn("resolve", agreement_id, 250_000), esc.acc.arbiter)
    assert esc.event(receipt, "Resolved") == {
        "agreementId": bytes.fromhex(agreement_id[2:]),
        "buyer": esc.acc.buyer.address,
        "arbiter": esc.acc.arbiter.address,
        "sellerAmount": 250_000,
        "buyerAmount": 750_000,
    }
    e = esc.get(agreement_id)
    assert (e["state"], e["settledAmount"]) == ("Resolved", 250_000)
    esc.reverts(esc.fn("resolve", agreement_id, 1), esc.acc.arbiter, "InvalidState")
    seller_before, buyer_before = esc.balance(esc.acc.seller), esc.balance(esc.acc.buyer)
    receipt = esc.tx(esc.fn("finalize", agreement_id), esc.acc.stranger)  # no waiting needed
    assert esc.event(receipt, "Settled")["sellerAmount"] == 250_000
    assert esc.balance(esc.acc.seller) - seller_before == 250_000
    assert esc.balance(esc.acc.buyer) - buyer_before == 750_000
    esc.reverts(esc.fn("finalize", agreement_id), esc.acc.stranger, "InvalidState")


# ------------------------------------------------------------------ dispute timeout


DISPUTE_TIMEOUT = 30 * 24 * 3600


def _challenged_at(esc, disputed) -> int:
    """When the arbiter's time ran out: the challenge's block + DISPUTE_TIMEOUT, as getEscrow says."""
    return esc.get(disputed["agreementId"])["challengeDeadline"]


def test_dispute_timeout_is_public_and_recorded_at_challenge(esc, active):
    assert esc.escrow.functions.DISPUTE_TIMEOUT().call() == DISPUTE_TIMEOUT
    _proposed(esc, active, amount=700_000)
    receipt = esc.tx(esc.fn("challenge", active["agreementId"]), esc.acc.buyer)
    block_time = esc.w3.eth.get_block(receipt["blockNumber"])["timestamp"]
    e = esc.get(active["agreementId"])
    assert (e["state"], e["challengeDeadline"]) == ("Disputed", block_time + DISPUTE_TIMEOUT)


def test_unresolved_dispute_is_finalized_by_anyone_for_the_buyer_after_its_timeout(esc, chain, disputed):
    agreement_id = disputed["agreementId"]
    timeout = _challenged_at(esc, disputed)
    esc.reverts(esc.fn("finalize", agreement_id), esc.acc.stranger, "DisputeNotTimedOut", timeout)
    chain.set_next_timestamp(timeout - 1)
    chain.mine()
    esc.reverts(esc.fn("finalize", agreement_id), esc.acc.stranger, "DisputeNotTimedOut", timeout)
    seller_before, buyer_before = esc.balance(esc.acc.seller), esc.balance(esc.acc.buyer)
    chain.set_next_timestamp(timeout)  # the timeout's second is the buyer's, as the window's end is for finalize
    receipt = esc.tx(esc.fn("finalize", agreement_id), esc.acc.stranger)
    assert esc.event(receipt, "Settled") == {
        "agreementId": bytes.fromhex(agreement_id[2:]),
        "buyer": esc.acc.buyer.address,
        "sellerAmount": 0,
        "buyerAmount": 1_000_000,
    }
    assert esc.balance(esc.acc.seller) == seller_before  # the disputed 700_000 was never upheld
    assert esc.balance(esc.acc.buyer) - buyer_before == 1_000_000
    assert esc.held() == 0
    e = esc.get(agreement_id)
    assert (e["state"], e["settledAmount"]) == ("Settled", 0)
    esc.reverts(esc.fn("finalize", agreement_id), esc.acc.stranger, "InvalidState", agreement_id, 5)
    esc.reverts(esc.fn("resolve", agreement_id, 1), esc.acc.arbiter, "InvalidState", agreement_id, 5)


def test_resolve_after_the_dispute_timeout_reverts(esc, chain, disputed):
    agreement_id = disputed["agreementId"]
    timeout = _challenged_at(esc, disputed)
    chain.set_next_timestamp(timeout)
    chain.mine()
    esc.reverts(esc.fn("resolve", agreement_id, 250_000), esc.acc.arbiter, "DisputeTimedOut", timeout)
    assert esc.state(agreement_id) == "Disputed"


def test_resolve_in_the_last_second_before_the_timeout_wins(esc, chain, disputed):
    agreement_id = disputed["agreementId"]
    chain.set_next_timestamp(_challenged_at(esc, disputed) - 1)
    esc.tx(esc.fn("resolve", agreement_id, 250_000), esc.acc.arbiter)
    receipt = esc.tx(esc.fn("finalize", agreement_id), esc.acc.stranger)
    assert esc.event(receipt, "Settled")["sellerAmount"] == 250_000


# ------------------------------------------------------------------ reclaim


def test_reclaim_too_early(esc, chain, active):
    agreement_id = active["agreementId"]
    reclaim_after = esc.get(agreement_id)["reclaimAfter"]
    esc.reverts(esc.fn("reclaim", agreement_id), esc.acc.stranger, "ReclaimNotYetAllowed", reclaim_after)
    chain.set_next_timestamp(active["expiresAt"])  # expired, but the grace period is not over
    chain.mine()
    esc.reverts(esc.fn("reclaim", agreement_id), esc.acc.stranger, "ReclaimNotYetAllowed")
    chain.set_next_timestamp(reclaim_after - 1)
    chain.mine()
    esc.reverts(esc.fn("reclaim", agreement_id), esc.acc.stranger, "ReclaimNotYetAllowed")


def test_reclaim_returns_the_deposit(esc, chain, active):
    agreement_id = active["agreementId"]
    reclaim_after = esc.get(agreement_id)["reclaimAfter"]
    buyer_before = esc.balance(esc.acc.buyer)
    chain.set_next_timestamp(reclaim_after)
    receipt = esc.tx(esc.fn("reclaim", agreement_id), esc.acc.stranger)
    assert esc.event(receipt, "Reclaimed") == {
        "agreementId": bytes.fromhex(agreement_id[2:]),
        "buyer": esc.acc.buyer.address,
        "amount": 1_000_000,
    }
    assert esc.balance(esc.acc.buyer) - buyer_before == 1_000_000
    assert esc.state(agreement_id) == "Reclaimed"
    esc.reverts(esc.fn("reclaim", agreement_id), esc.acc.stranger, "InvalidState", agreement_id, 6)
    esc.reverts(esc.propose_fn(agreement_id, 1, 1), esc.acc.operator, "InvalidState")
    esc.reverts(esc.fn("finalize", agreement_id), esc.acc.operator, "InvalidState")


def test_reclaim_after_settlement_proposed(esc, chain, active):
    agreement_id = active["agreementId"]
    _proposed(esc, active)
    chain.set_next_timestamp(esc.get(agreement_id)["reclaimAfter"] + 10)
    chain.mine()
    esc.reverts(esc.fn("reclaim", agreement_id), esc.acc.stranger, "InvalidState", agreement_id, 2)


def test_reclaim_unknown(esc):
    unknown = random_bytes32()
    esc.reverts(esc.fn("reclaim", unknown), esc.acc.stranger, "InvalidState", unknown, 0)


# ------------------------------------------------------------------ the money invariant


def _run(esc, chain, path: str, seller_amount: int):
    """Drive one escrow to its end along ``path``; return (deposit, fee, seller, buyer, fee_recipient deltas)."""
    acc = esc.acc
    watched = [acc.seller, acc.buyer, acc.fee_recipient, esc.escrow.address]
    before = [esc.balance(w) for w in watched]
    typed = esc.intent(challenge_window=WINDOW, quantity=7, price_per_unit=123_457, infra_fee=102_469)
    msg = typed["message"]
    esc.mint(acc.buyer, msg["depositAmount"] + msg["infraFee"])
    before[1] += msg["depositAmount"] + msg["infraFee"]
    esc.activate(typed, fund=False)
    agreement_id = msg["agreementId"]
    if path == "completed":
        event = esc.propose(agreement_id, 1, seller_amount)
        deadline = esc.event(event, "SettlementProposed")["challengeDeadline"]
        chain.set_next_timestamp(deadline)
        esc.tx(esc.fn("finalize", agreement_id), acc.stranger)
    elif path == "disputed":
        esc.propose(agreement_id, 1, msg["depositAmount"])
        esc.tx(esc.fn("challenge", agreement_id), acc.buyer)
        esc.tx(esc.fn("resolve", agreement_id, seller_amount), acc.arbiter)
        esc.tx(esc.fn("finalize", agreement_id), acc.stranger)
    elif path == "dispute timed out":
        esc.propose(agreement_id, 1, msg["depositAmount"])
        esc.tx(esc.fn("challenge", agreement_id), acc.buyer)
        chain.set_next_timestamp(esc.get(agreement_id)["challengeDeadline"])
        esc.tx(esc.fn("finalize", agreement_id), acc.stranger)
    elif path == "reclaimed":
        chain.set_next_timestamp(esc.get(agreement_id)["reclaimAfter"])
        esc.tx(esc.fn("reclaim", agreement_id), acc.stranger)
    esc.pay_fees()
    after = [esc.balance(w) for w in watched]
    deltas = [a - b for a, b in zip(after, before, strict=True)]
    return msg["depositAmount"], msg["infraFee"], deltas


@pytest.mark.parametrize(
    "path, seller_amount",
    [
        ("completed", 0),
        ("completed", 345_678),
        ("completed", 864_199),
        ("disputed", 0),
        ("disputed", 123_456),
        ("disputed", 864_199),
        ("dispute timed out", 0),
        ("reclaimed", 0),
    ],
)
def test_money_invariant(esc, chain, path, seller_amount):
    deposit, fee, (seller, buyer, fee_recipient, escrow) = _run(esc, chain, path, seller_amount)
    assert deposit == 864_199
    refund = buyer + deposit + fee  # the buyer paid deposit + fee and got `refund` back
    assert seller == seller_amount
    assert refund == deposit - seller_amount
    assert seller + refund == deposit  # seller payout + buyer refund == deposit
    assert fee_recipient == fee  # the fee arrives exactly once
    assert escrow == 0  # nothing left behind, nothing paid out twice


def test_settling_one_escrow_leaves_others_untouched(esc, chain):
    a, _ = esc.activate(challenge_window=WINDOW)
    b, _ = esc.activate(buyer=esc.acc.buyer2, quantity=5, price_per_unit=200_000, challenge_window=WINDOW)
    receipt = esc.propose(a["message"]["agreementId"], 1, 1_000_000)
    chain.set_next_timestamp(esc.event(receipt, "SettlementProposed")["challengeDeadline"])
    esc.tx(esc.fn("finalize", a["message"]["agreementId"]), esc.acc.stranger)
    assert esc.held() == b["message"]["depositAmount"]
    assert esc.state(b["message"]["agreementId"]) == "Active"


def test_two_buyers_escrows_under_one_id_settle_apart(esc, chain):
    """Agreement-id squatting: a third party (buyer2) opened an escrow under the buyer's agreement id first, naming
    the same seller and receipt signer. Every call names its escrow by (terms.buyer, id): proposals, challenges,
    payouts, deferred credits and reclaims of one escrow never reach the other."""
    acc, fns = esc.acc, esc.escrow.functions
    agreement_id = random_bytes32()
    squat, _ = esc.activate(agreement_id=agreement_id, buyer=acc.buyer2, quantity=5, challenge_window=WINDOW)
    ours, _ = esc.activate(agreement_id=agreement_id, challenge_window=WINDOW)
    buyer, squatter = acc.buyer.address, acc.buyer2.address
    ours_terms, squat_terms = esc.terms(agreement_id, buyer), esc.terms(agreement_id, squatter)

    receipt = esc.propose(agreement_id, 1, 400_000, buyer=buyer)
    proposed = esc.event(receipt, "SettlementProposed")
    assert proposed["buyer"] == buyer
    assert (esc.state(agreement_id, buyer), esc.state(agreement_id, squatter)) == ("Proposed", "Active")
    # Neither buyer can challenge the other's escrow, nor a buyer's signature dispute the other's.
    esc.reverts(fns.challenge(agreement_id, ours_terms), acc.buyer2, "NotBuyer", squatter)
    esc.reverts(fns.challenge(agreement_id, squat_terms), acc.buyer, "NotBuyer", buyer)
    deadline = chain.now() + 100
    esc.reverts(fns.challengeWithSig(agreement_id, squat_terms, deadline, esc.challenge_sig(agreement_id, deadline)),
                acc.stranger, "InvalidBuyerSignature")

    # Our escrow settles; the seller's payout is deferred (blacklisted) and credited to our escrow only.
    esc.blacklist(acc.seller)
    chain.set_next_timestamp(proposed["challengeDeadline"])
    receipt = esc.tx(fns.finalize(agreement_id, ours_terms), acc.stranger)
    assert esc.event(receipt, "Settled")["buyer"] == buyer
    assert esc.event(receipt, "PayoutDeferred")["buyer"] == buyer
    assert esc.get(agreement_id, buyer)["sellerClaimable"] == 400_000
    assert esc.get(agreement_id, squatter)["sellerClaimable"] == 0
    esc.reverts(fns.withdraw(agreement_id, squat_terms), acc.stranger, "NothingToWithdraw", agreement_id)
    esc.unblacklist(acc.seller)
    esc.tx(fns.withdraw(agreement_id, ours_terms), acc.stranger)
    assert esc.state(agreement_id, squatter) == "Active"

    # The squatter's escrow is reclaimed to the squatter; ours stays settled.
    squatter_before = esc.balance(acc.buyer2)
    chain.set_next_timestamp(esc.get(agreement_id, squatter)["reclaimAfter"])
    chain.mine()
    esc.reverts(fns.finalize(agreement_id, ours_terms), acc.stranger, "InvalidState")
    receipt = esc.tx(fns.reclaim(agreement_id, squat_terms), acc.stranger)
    assert esc.event(receipt, "Reclaimed")["buyer"] == squatter
    assert esc.balance(acc.buyer2) - squatter_before == squat["message"]["depositAmount"]
    assert (esc.state(agreement_id, buyer), esc.state(agreement_id, squatter)) == ("Settled", "Reclaimed")
    assert esc.held() == 0
    assert ours["message"]["depositAmount"] == 1_000_000


# ------------------------------------------------------------------ the terms every call carries


@pytest.mark.parametrize("field", range(8))
def test_calls_with_terms_not_the_escrows_revert(esc, chain, active, field):
    """The contract keeps only a digest of the terms: a call carrying any other value in any field is refused,
    in every state where the terms are used. Another buyer (field 0) names another escrow, keyed by (buyer, id):
    none was opened, so the call meets an escrow in state None."""
    agreement_id = active["agreementId"]
    terms = list(esc.terms(agreement_id))
    terms[field] = esc.acc.stranger.address if isinstance(terms[field], str) else terms[field] + 1
    forged = tuple(terms)
    refused = ("InvalidState", agreement_id, 0) if field == 0 else ("TermsMismatch", agreement_id)
    fns = esc.escrow.functions
    digest = random_bytes32()
    signature = esc.receipt_sig(agreement_id, 1, 1, digest)
    esc.reverts(fns.proposeSettlement(agreement_id, forged, 1, 1, digest, signature), esc.acc.operator, *refused)
    if field == 0:
        assert fns.getEscrow(agreement_id, forged).call()[0] == 0  # None: the stranger has no escrow under the id
    else:
        esc.reverts(fns.getEscrow(agreement_id, forged), esc.acc.stranger, *refused)
    esc.propose(agreement_id, 1, 1)
    deadline = chain.now() + 100
    esc.reverts(fns.challenge(agreement_id, forged), esc.acc.buyer, *refused)
    esc.reverts(fns.challengeWithSig(agreement_id, forged, deadline, esc.challenge_sig(agreement_id, deadline)),
                esc.acc.stranger, *refused)
    esc.tx(esc.fn("challenge", agreement_id), esc.acc.buyer)
    esc.reverts(fns.resolve(agreement_id, forged, 1), esc.acc.arbiter, *refused)
    esc.tx(esc.fn("resolve", agreement_id, 1), esc.acc.arbiter)
    esc.reverts(fns.finalize(agreement_id, forged), esc.acc.stranger, *refused)


@pytest.mark.parametrize("field", [0, 1])
def test_reclaim_and_withdraw_check_the_terms(esc, chain, active, field):
    """A refund to someone else: another buyer (field 0, which names another buyer's escrow: there is none) or any
    other field changed (the seller, field 1)."""
    agreement_id = active["agreementId"]
    terms = list(esc.terms(agreement_id))
    terms[field] = esc.acc.stranger.address
    forged = tuple(terms)
    chain.set_next_timestamp(esc.get(agreement_id)["reclaimAfter"])
    chain.mine()
    esc.reverts(esc.escrow.functions.reclaim(agreement_id, forged), esc.acc.stranger,
                *(("InvalidState", agreement_id, 0) if field == 0 else ("TermsMismatch", agreement_id)))
    esc.blacklist(esc.acc.buyer)
    esc.tx(esc.fn("reclaim", agreement_id), esc.acc.stranger)
    assert esc.get(agreement_id)["buyerClaimable"] == active["depositAmount"]
    esc.unblacklist(esc.acc.buyer)
    esc.reverts(esc.escrow.functions.withdraw(agreement_id, forged), esc.acc.stranger,
                *(("NothingToWithdraw", agreement_id) if field == 0 else ("TermsMismatch", agreement_id)))
    esc.tx(esc.fn("withdraw", agreement_id), esc.acc.stranger)
    assert esc.get(agreement_id)["buyerClaimable"] == 0
