"""UsageEscrow.activate: intent signature, nonce, deadline, terms checks, permits and the money it moves."""

import pytest

from sdk import typed_data as td
from tests.escrow.conftest import USDC, ZERO_ADDRESS, random_bytes32

pytestmark = pytest.mark.chain


def test_activate_pulls_deposit_and_pays_fee(esc):
    acc = esc.acc
    fee_before = esc.balance(acc.fee_recipient)
    typed = esc.intent()
    msg = typed["message"]
    esc.mint(acc.buyer, msg["depositAmount"] + msg["infraFee"] + 5)

    _, receipt = esc.activate(typed, fund=False, two_permits=True)

    assert esc.balance(acc.buyer) == 5
    assert esc.held() == msg["depositAmount"]
    assert esc.fees_accrued() == msg["infraFee"]  # the fee accrues; payFees pays it to the fee recipient
    assert esc.usdc.functions.allowance(acc.buyer.address, esc.escrow.address).call() == 0
    paid = esc.pay_fees()
    assert esc.event(paid, "FeesPaid") == {"token": esc.usdc.address, "feeRecipient": acc.fee_recipient.address,
                                              "amount": msg["infraFee"]}
    assert esc.balance(acc.fee_recipient) - fee_before == msg["infraFee"]
    assert (esc.fees_accrued(), esc.balance(esc.escrow.address)) == (0, msg["depositAmount"])
    esc.reverts(esc.escrow.functions.payFees(esc.usdc.address), acc.stranger, "NothingToWithdraw")

    e = esc.get(msg["agreementId"])
    assert e["state"] == "Active"
    assert (e["buyer"], e["seller"], e["token"], e["receiptSigner"]) == (
        msg["buyer"], msg["seller"], msg["token"], msg["receiptSigner"]
    )
    assert e["depositAmount"] == msg["depositAmount"] and e["infraFee"] == msg["infraFee"]
    assert e["expiresAt"] == msg["expiresAt"]
    assert e["reclaimAfter"] == msg["expiresAt"] + esc.chain.reclaim_grace
    assert e["challengeWindow"] == msg["challengeWindow"]
    assert e["termsHash"] == bytes.fromhex(msg["termsHash"][2:])
    assert (e["settledAmount"], e["lastSeq"], e["challengeDeadline"]) == (0, 0, 0)
    assert esc.escrow.functions.intentNonceUsed(acc.buyer.address, msg["nonce"]).call()
    # what the contract stores of the terms: their digest
    terms = esc.terms(msg["agreementId"])
    digest = esc.escrow.functions.termsDigest(acc.buyer.address, msg["agreementId"]).call()
    assert digest == esc.escrow.functions.hashTerms(terms).call()
    assert esc.escrow.functions.termsDigest(acc.buyer2.address, msg["agreementId"]).call() == bytes(32)

    event = esc.event(receipt, "Activated")
    assert event["agreementId"] == bytes.fromhex(msg["agreementId"][2:])
    assert event["buyer"] == msg["buyer"] and event["seller"] == msg["seller"]
    assert event["depositAmount"] == msg["depositAmount"] and event["infraFee"] == msg["infraFee"]
    assert event["nonce"] == msg["nonce"]
    assert event["reclaimAfter"] == e["reclaimAfter"]


def test_single_permit_covering_deposit_and_fee(esc):
    typed = esc.intent()
    msg = typed["message"]
    total = msg["depositAmount"] + msg["infraFee"]
    permit = esc.permit(esc.acc.buyer, total)
    esc.activate(typed, escrow_permit=permit, fee_permit=td.EMPTY_PERMIT)
    assert esc.state(msg["agreementId"]) == "Active"
    assert esc.balance(esc.acc.buyer) == 0


def test_prior_approval_without_permits(esc):
    typed = esc.intent()
    msg = typed["message"]
    total = msg["depositAmount"] + msg["infraFee"]
    esc.mint(esc.acc.buyer, total)
    esc.tx(esc.usdc.functions.approve(esc.escrow.address, total), esc.acc.buyer)
    esc.activate(typed, fund=False, escrow_permit=td.EMPTY_PERMIT, fee_permit=td.EMPTY_PERMIT)
    assert esc.state(msg["agreementId"]) == "Active"


def test_zero_fee_ignores_fee_permit(esc):
    fee_before = esc.balance(esc.acc.fee_recipient)
    typed = esc.intent(infra_fee=0)
    garbage = (123, esc.chain.now() + 100, 27, random_bytes32(), random_bytes32())
    esc.activate(typed, fee_permit=garbage)
    assert esc.balance(esc.acc.fee_recipient) == fee_before
    assert esc.fees_accrued() == 0
    assert esc.state(typed["message"]["agreementId"]) == "Active"


def test_anyone_may_submit_the_signed_intent(esc):
    typed, _ = esc.activate(sender=esc.acc.stranger)
    assert esc.state(typed["message"]["agreementId"]) == "Active"


def test_bad_intent_signature(esc):
    typed = esc.intent()
    esc.mint(esc.acc.buyer, 10 * USDC)
    esc.tx(esc.usdc.functions.approve(esc.escrow.address, 10 * USDC), esc.acc.buyer)
    for signature in ("0x", "0x" + "ab" * 65, "0x" + "00" * 64, esc.sign(typed, esc.acc.buyer)[:-2]):
        esc.reverts(esc.activate_fn(typed, signature), esc.acc.operator, "InvalidBuyerSignature")


def test_intent_signed_by_someone_else(esc):
    typed = esc.intent()
    esc.mint(esc.acc.buyer, 10 * USDC)
    esc.tx(esc.usdc.functions.approve(esc.escrow.address, 10 * USDC), esc.acc.buyer)
    for signer in (esc.acc.stranger, esc.acc.seller, esc.acc.operator):
        esc.reverts(esc.activate_fn(typed, esc.sign(typed, signer)), esc.acc.operator, "InvalidBuyerSignature")


def test_tampered_intent(esc):
    typed = esc.intent()
    signature = esc.sign(typed, esc.acc.buyer)
    esc.mint(esc.acc.buyer, 10 * USDC)
    esc.tx(esc.usdc.functions.approve(esc.escrow.address, 10 * USDC), esc.acc.buyer)
    for field, value in [
        ("seller", esc.acc.stranger.address),
        ("receiptSigner", esc.acc.stranger.address),
        ("infraFee", 0),
        ("challengeWindow", 1),
        ("termsHash", random_bytes32()),
    ]:
        tampered = {**typed, "message": {**typed["message"], field: value}}
        esc.reverts(esc.activate_fn(tampered, signature), esc.acc.operator, "InvalidBuyerSignature")


def test_intent_for_another_chain_or_contract_is_rejected(esc):
    typed = esc.intent()
    esc.mint(esc.acc.buyer, 10 * USDC)
    esc.tx(esc.usdc.functions.approve(esc.escrow.address, 10 * USDC), esc.acc.buyer)
    other_chain = {**typed, "domain": {**typed["domain"], "chainId": 1}}
    other_contract = {**typed, "domain": {**typed["domain"], "verifyingContract": esc.usdc.address}}
    for variant in (other_chain, other_contract):
        esc.reverts(
            esc.activate_fn(typed, esc.sign(variant, esc.acc.buyer)), esc.acc.operator, "InvalidBuyerSignature"
        )


def test_expired_intent_deadline(esc, chain):
    deadline = chain.now() + 100
    typed = esc.intent(deadline=deadline)
    esc.mint(esc.acc.buyer, 10 * USDC)
    esc.tx(esc.usdc.functions.approve(esc.escrow.address, 10 * USDC), esc.acc.buyer)
    signature = esc.sign(typed, esc.acc.buyer)
    chain.set_next_timestamp(deadline + 1)
    chain.mine()
    esc.reverts(esc.activate_fn(typed, signature), esc.acc.operator, "IntentExpired", deadline)


def test_intent_valid_up_to_and_including_its_deadline(esc, chain):
    deadline = chain.now() + 100
    typed = esc.intent(deadline=deadline)
    esc.mint(esc.acc.buyer, 10 * USDC)
    esc.tx(esc.usdc.functions.approve(esc.escrow.address, 10 * USDC), esc.acc.buyer)
    chain.set_next_timestamp(deadline)
    esc.tx(esc.activate_fn(typed, esc.sign(typed, esc.acc.buyer)), esc.acc.operator)


def test_agreement_id_is_used_once_per_buyer(esc):
    typed, _ = esc.activate()
    agreement_id = typed["message"]["agreementId"]
    esc.mint(esc.acc.buyer, 10 * USDC)
    esc.tx(esc.usdc.functions.approve(esc.escrow.address, 10 * USDC), esc.acc.buyer)
    # the very same signed intent again
    esc.reverts(
        esc.activate_fn(typed, esc.sign(typed, esc.acc.buyer)), esc.acc.operator, "AgreementExists", agreement_id
    )
    # a fresh intent (new nonce, other terms) of the same buyer reusing the id
    again = esc.intent(agreement_id=agreement_id, quantity=3)
    esc.reverts(esc.activate_fn(again, esc.sign(again, esc.acc.buyer)), esc.acc.operator, "AgreementExists",
                agreement_id)
    # the escrow stays as it was
    assert esc.get(agreement_id, esc.acc.buyer.address)["depositAmount"] == typed["message"]["depositAmount"]


def test_another_buyers_escrow_under_a_used_id_is_its_own(esc):
    """Agreement-id squatting: ids are no secret, and escrows are keyed by (buyer, id). A third party's escrow
    under an id, activated first, neither blocks the buyer's activation under it nor is touched by it."""
    acc = esc.acc
    agreement_id = random_bytes32()
    squat, squat_receipt = esc.activate(agreement_id=agreement_id, buyer=acc.buyer2, quantity=1, infra_fee=0)
    assert esc.event(squat_receipt, "Activated")["buyer"] == acc.buyer2.address

    typed, receipt = esc.activate(agreement_id=agreement_id)  # the real buyer, after the squat: not refused
    assert esc.event(receipt, "Activated")["buyer"] == acc.buyer.address
    assert esc.held() == squat["message"]["depositAmount"] + typed["message"]["depositAmount"]
    ours, theirs = esc.get(agreement_id, acc.buyer.address), esc.get(agreement_id, acc.buyer2.address)
    assert (ours["state"], ours["depositAmount"]) == ("Active", typed["message"]["depositAmount"])
    assert (theirs["state"], theirs["depositAmount"]) == ("Active", squat["message"]["depositAmount"])
    fns = esc.escrow.functions
    assert fns.termsDigest(acc.buyer.address, agreement_id).call() == fns.hashTerms(
        esc.terms(agreement_id, acc.buyer.address)).call()
    assert fns.termsDigest(acc.buyer2.address, agreement_id).call() == fns.hashTerms(
        esc.terms(agreement_id, acc.buyer2.address)).call()
    # each buyer once: the squatter cannot open a second one either
    again = esc.intent(agreement_id=agreement_id, buyer=acc.buyer2.address)
    esc.mint(acc.buyer2, 10 * USDC)
    esc.tx(esc.usdc.functions.approve(esc.escrow.address, 10 * USDC), acc.buyer2)
    esc.reverts(esc.activate_fn(again, esc.sign(again, acc.buyer2)), acc.operator, "AgreementExists", agreement_id)


def test_a_squatter_cannot_open_an_escrow_in_the_buyers_name(esc):
    """The buyer's slot under an id opens only with the buyer's signature: an intent naming the buyer but signed by
    anyone else is refused, and leaves the id free for the buyer."""
    acc = esc.acc
    agreement_id = random_bytes32()
    forged = esc.intent(agreement_id=agreement_id, buyer=acc.buyer.address)
    esc.mint(acc.buyer, 10 * USDC)
    esc.tx(esc.usdc.functions.approve(esc.escrow.address, 10 * USDC), acc.buyer)
    esc.reverts(esc.activate_fn(forged, esc.sign(forged, acc.buyer2)), acc.stranger, "InvalidBuyerSignature")
    esc.activate(agreement_id=agreement_id)
    assert esc.state(agreement_id, acc.buyer.address) == "Active"


def test_intent_nonce_is_used_once(esc):
    typed, _ = esc.activate()
    nonce = typed["message"]["nonce"]
    esc.mint(esc.acc.buyer, 10 * USDC)
    esc.tx(esc.usdc.functions.approve(esc.escrow.address, 10 * USDC), esc.acc.buyer)
    replay = esc.intent(nonce=nonce)  # new agreement id, same buyer nonce
    esc.reverts(
        esc.activate_fn(replay, esc.sign(replay, esc.acc.buyer)), esc.acc.operator, "IntentNonceUsed",
        esc.acc.buyer.address, nonce,
    )
    # nonces are per buyer: another buyer may use the same number
    esc.activate(buyer=esc.acc.buyer2, nonce=nonce)


def test_nonces_are_unordered(esc):
    first = esc.intent(nonce=5)
    second = esc.intent(nonce=2)
    esc.activate(first)
    esc.activate(second)
    assert esc.state(second["message"]["agreementId"]) == "Active"


def test_cancel_intent_nonce(esc):
    typed = esc.intent()
    nonce = typed["message"]["nonce"]
    signature = esc.sign(typed, esc.acc.buyer)
    receipt = esc.tx(esc.escrow.functions.cancelIntentNonce(nonce), esc.acc.buyer)
    assert esc.event(receipt, "IntentNonceCancelled") == {"buyer": esc.acc.buyer.address, "nonce": nonce}
    esc.mint(esc.acc.buyer, 10 * USDC)
    esc.tx(esc.usdc.functions.approve(esc.escrow.address, 10 * USDC), esc.acc.buyer)
    esc.reverts(esc.activate_fn(typed, signature), esc.acc.operator, "IntentNonceUsed")
    esc.reverts(esc.escrow.functions.cancelIntentNonce(nonce), esc.acc.buyer, "IntentNonceUsed")
    # only the caller's own nonces are cancelled
    assert not esc.escrow.functions.intentNonceUsed(esc.acc.buyer2.address, nonce).call()


@pytest.mark.parametrize(
    "overrides, error",
    [
        ({"seller": ZERO_ADDRESS}, "ZeroAddress"),
        ({"receipt_signer": ZERO_ADDRESS}, "ZeroAddress"),
        ({"quantity": 0, "price_per_unit": 100}, "InvalidDeposit"),
        ({"quantity": 10, "price_per_unit": 0}, "InvalidDeposit"),
        ({"quantity": 10, "price_per_unit": 100, "deposit_amount": 999, "raw": True}, "InvalidDeposit"),
        ({"quantity": 10, "price_per_unit": 100, "deposit_amount": 1001, "raw": True}, "InvalidDeposit"),
        ({"quantity": 10, "price_per_unit": 0, "deposit_amount": 1000, "raw": True}, "InvalidDeposit"),
        ({"challenge_window": 0}, "InvalidChallengeWindow"),
        ({"challenge_window": 30 * 86400 + 1}, "InvalidChallengeWindow"),
    ],
)
def test_invalid_terms(esc, overrides, error):
    typed = esc.intent(**overrides)
    esc.mint(esc.acc.buyer, 10 * USDC)
    esc.tx(esc.usdc.functions.approve(esc.escrow.address, 10 * USDC), esc.acc.buyer)
    esc.reverts(esc.activate_fn(typed, esc.sign(typed, esc.acc.buyer)), esc.acc.operator, error)


def test_expiry_must_be_in_the_future(esc, chain):
    now = chain.now()
    typed = esc.intent(expires_at=now + 1)
    esc.mint(esc.acc.buyer, 10 * USDC)
    esc.tx(esc.usdc.functions.approve(esc.escrow.address, 10 * USDC), esc.acc.buyer)
    chain.set_next_timestamp(now + 1)
    chain.mine()
    esc.reverts(esc.activate_fn(typed, esc.sign(typed, esc.acc.buyer)), esc.acc.operator, "InvalidExpiry")


def test_token_must_be_allowed(esc):
    typed = esc.intent(token=esc.acc.spare.address)
    esc.reverts(
        esc.activate_fn(typed, esc.sign(typed, esc.acc.buyer)), esc.acc.operator, "TokenNotAllowed",
        esc.acc.spare.address,
    )
    # once disallowed, the real token is refused too
    esc.tx(esc.escrow.functions.setTokenAllowed(esc.usdc.address, False), esc.acc.deployer)
    typed = esc.intent()
    esc.reverts(esc.activate_fn(typed, esc.sign(typed, esc.acc.buyer)), esc.acc.operator, "TokenNotAllowed")


def test_no_allowance(esc):
    typed = esc.intent()
    esc.mint(esc.acc.buyer, 10 * USDC)
    esc.reverts(
        esc.activate_fn(typed, esc.sign(typed, esc.acc.buyer)), esc.acc.operator, "InsufficientAllowance",
        typed["message"]["depositAmount"] + typed["message"]["infraFee"], 0,  # one pull: deposit and fee
    )


def test_permit_for_too_little(esc):
    typed = esc.intent()
    deposit, fee = typed["message"]["depositAmount"], typed["message"]["infraFee"]
    esc.mint(esc.acc.buyer, 10 * USDC)
    permit = esc.permit(esc.acc.buyer, deposit - 1)
    esc.reverts(
        esc.activate_fn(typed, esc.sign(typed, esc.acc.buyer), permit), esc.acc.operator,
        "InsufficientAllowance", deposit + fee, deposit - 1,
    )


def test_invalid_permit_is_ignored_and_allowance_decides(esc):
    typed = esc.intent()
    deposit, fee = typed["message"]["depositAmount"], typed["message"]["infraFee"]
    bad = esc.permit(esc.acc.buyer, deposit + fee, signer=esc.acc.stranger)
    esc.mint(esc.acc.buyer, 10 * USDC)
    esc.reverts(
        esc.activate_fn(typed, esc.sign(typed, esc.acc.buyer), bad), esc.acc.operator, "InsufficientAllowance"
    )
    esc.tx(esc.usdc.functions.approve(esc.escrow.address, deposit + fee), esc.acc.buyer)
    esc.tx(esc.activate_fn(typed, esc.sign(typed, esc.acc.buyer), bad), esc.acc.operator)


def test_fee_allowance_missing(esc):
    typed = esc.intent()
    deposit, fee = typed["message"]["depositAmount"], typed["message"]["infraFee"]
    esc.mint(esc.acc.buyer, 10 * USDC)
    permit = esc.permit(esc.acc.buyer, deposit)
    esc.reverts(  # without a fee permit, the one pull of deposit + fee needs the escrow permit to cover both
        esc.activate_fn(typed, esc.sign(typed, esc.acc.buyer), permit), esc.acc.operator,
        "InsufficientAllowance", deposit + fee, deposit,
    )


def test_insufficient_balance(esc):
    typed = esc.intent()
    deposit = typed["message"]["depositAmount"]
    esc.mint(esc.acc.buyer, deposit - 1)
    permit = esc.permit(esc.acc.buyer, 10 * USDC)
    esc.reverts(
        esc.activate_fn(typed, esc.sign(typed, esc.acc.buyer), permit), esc.acc.operator,
        "ERC20InsufficientBalance",
    )


def test_front_run_escrow_permit_is_tolerated(esc):
    """Someone submits the buyer's permit first: the permit call inside activate fails, the allowance is
    already there, activation goes through."""
    typed = esc.intent()
    deposit, fee = typed["message"]["depositAmount"], typed["message"]["infraFee"]
    esc.mint(esc.acc.buyer, deposit + fee)
    escrow_permit = esc.permit(esc.acc.buyer, deposit)
    fee_permit = esc.permit(esc.acc.buyer, fee, nonce=1)
    esc.submit_permit(esc.acc.buyer, escrow_permit, sender=esc.acc.stranger)
    esc.activate(typed, fund=False, escrow_permit=escrow_permit, fee_permit=fee_permit)
    assert esc.state(typed["message"]["agreementId"]) == "Active"
    assert esc.balance(esc.acc.buyer) == 0


def test_front_run_combined_permit_is_tolerated(esc):
    typed = esc.intent()
    total = typed["message"]["depositAmount"] + typed["message"]["infraFee"]
    esc.mint(esc.acc.buyer, total)
    permit = esc.permit(esc.acc.buyer, total)
    esc.submit_permit(esc.acc.buyer, permit, sender=esc.acc.stranger)
    esc.activate(typed, fund=False, escrow_permit=permit, fee_permit=td.EMPTY_PERMIT)
    assert esc.balance(esc.acc.buyer) == 0


def test_front_run_fee_permit_only_is_tolerated(esc):
    """The fee permit (token nonce n+1) cannot be front-run before the deposit permit (nonce n) is used."""
    typed = esc.intent()
    deposit, fee = typed["message"]["depositAmount"], typed["message"]["infraFee"]
    esc.mint(esc.acc.buyer, deposit + fee)
    escrow_permit = esc.permit(esc.acc.buyer, deposit)
    fee_permit = esc.permit(esc.acc.buyer, fee, nonce=1)
    value, deadline, v, r, s = fee_permit
    early = esc.usdc.functions.permit(esc.acc.buyer.address, esc.escrow.address, value, deadline, v, r, s)
    esc.reverts(early, esc.acc.stranger, "ERC2612InvalidSigner")
    esc.activate(typed, fund=False, escrow_permit=escrow_permit, fee_permit=fee_permit)
    assert esc.balance(esc.acc.buyer) == 0


def test_front_run_of_both_separate_permits_fails_without_loss(esc):
    """Documented limitation of the two-permit form: a front-runner who submits both permits in order leaves
    an allowance of only the fee; activation fails and the buyer keeps the funds."""
    typed = esc.intent()
    deposit, fee = typed["message"]["depositAmount"], typed["message"]["infraFee"]
    esc.mint(esc.acc.buyer, deposit + fee)
    escrow_permit = esc.permit(esc.acc.buyer, deposit)
    fee_permit = esc.permit(esc.acc.buyer, fee, nonce=1)
    esc.submit_permit(esc.acc.buyer, escrow_permit, sender=esc.acc.stranger)
    esc.submit_permit(esc.acc.buyer, fee_permit, sender=esc.acc.stranger)
    esc.reverts(
        esc.activate_fn(typed, esc.sign(typed, esc.acc.buyer), escrow_permit, fee_permit), esc.acc.operator,
        "InsufficientAllowance", deposit, fee,
    )
    assert esc.balance(esc.acc.buyer) == deposit + fee


def test_escrow_holds_many_deposits(esc):
    a, _ = esc.activate()
    b, _ = esc.activate(buyer=esc.acc.buyer2, quantity=3, price_per_unit=250_000)
    total = a["message"]["depositAmount"] + b["message"]["depositAmount"]
    assert esc.held() == total
    assert esc.fees_accrued() == a["message"]["infraFee"] + b["message"]["infraFee"]
