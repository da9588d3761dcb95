"""UsageEscrow as anyone may call it: attacks a front-runner, a seller, a buyer's counterparty or a fork could try.

Each test plays one attack against the contract and checks that it moves no money that is not the caller's, locks
none, and leaves the honest path working.
"""

import pytest
from web3.exceptions import ContractLogicError

from sdk import typed_data as td
from tests.escrow.conftest import USDC, random_bytes32

pytestmark = pytest.mark.chain

SECP256K1_N = 0xFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFEBAAEDCE6AF48A03BBFD25E8CD0364141
WINDOW = 600


def _high_s(signature: str) -> str:
    """The other valid ECDSA signature of the same message by the same key: (r, n - s, v flipped)."""
    raw = bytes.fromhex(signature[2:])
    s = int.from_bytes(raw[32:64], "big")
    return "0x" + (raw[:32] + (SECP256K1_N - s).to_bytes(32, "big") + bytes([55 - raw[64]])).hex()


def _proposed(esc, agreement_id: str, seq: int = 1, amount: int = 400_000, sender=None) -> dict:
    return esc.event(esc.propose(agreement_id, seq, amount, sender=sender), "SettlementProposed")


def _due_for_finalize(esc, chain) -> tuple[str, int]:
    """(agreement id, infra fee) of an escrow of 1 USDC with 0.4 USDC proposed for the seller, its window over."""
    typed, _ = esc.activate(challenge_window=WINDOW)
    agreement_id = typed["message"]["agreementId"]
    chain.set_next_timestamp(_proposed(esc, agreement_id)["challengeDeadline"])
    chain.mine()
    return agreement_id, typed["message"]["infraFee"]


def test_malleated_signatures_are_refused(esc, chain):
    """The high-s twin of a valid signature (same key, same message) is refused for the intent, the receipt and
    the challenge, so no signature can be spent twice under another encoding."""
    typed = esc.intent(challenge_window=WINDOW)
    agreement_id = typed["message"]["agreementId"]
    esc.mint(esc.acc.buyer, 10 * USDC)
    esc.tx(esc.usdc.functions.approve(esc.escrow.address, 10 * USDC), esc.acc.buyer)
    signature = esc.sign(typed, esc.acc.buyer)
    assert td.recover_typed_data_signer(typed, _high_s(signature)) == esc.acc.buyer.address
    esc.reverts(esc.activate_fn(typed, _high_s(signature)), esc.acc.stranger, "InvalidBuyerSignature")
    esc.tx(esc.activate_fn(typed, signature), esc.acc.stranger)

    digest = random_bytes32()
    receipt_sig = esc.receipt_sig(agreement_id, 1, 500, digest)
    fn = esc.fn("proposeSettlement", agreement_id, 1, 500, digest, _high_s(receipt_sig))
    esc.reverts(fn, esc.acc.operator, "InvalidReceiptSignature")
    esc.tx(esc.fn("proposeSettlement", agreement_id, 1, 500, digest, receipt_sig), esc.acc.operator)

    deadline = chain.now() + 300
    challenge_sig = esc.challenge_sig(agreement_id, deadline)
    fn = esc.fn("challengeWithSig", agreement_id, deadline, _high_s(challenge_sig))
    esc.reverts(fn, esc.acc.stranger, "InvalidBuyerSignature")
    esc.tx(esc.fn("challengeWithSig", agreement_id, deadline, challenge_sig), esc.acc.stranger)
    assert esc.state(agreement_id) == "Disputed"


def test_receipts_and_challenges_signed_for_another_chain_or_contract_are_refused(esc, chain):
    typed, _ = esc.activate(challenge_window=WINDOW)
    agreement_id = typed["message"]["agreementId"]
    digest = random_bytes32()
    for domain in ({"chainId": 1}, {"verifyingContract": esc.usdc.address}):
        receipt = td.usage_receipt(chain_id=esc.chain_id, escrow_address=esc.escrow.address,
                                   agreement_id=agreement_id, seq=1, cumulative_amount=500, usage_digest=digest)
        receipt["domain"] = {**receipt["domain"], **domain}
        signature = td.sign_typed_data(esc.acc.receipt_signer.key, receipt)
        fn = esc.fn("proposeSettlement", agreement_id, 1, 500, digest, signature)
        esc.reverts(fn, esc.acc.operator, "InvalidReceiptSignature")
    _proposed(esc, agreement_id, amount=500)

    deadline = chain.now() + 300
    for domain in ({"chainId": 1}, {"verifyingContract": esc.usdc.address}):
        challenge = td.challenge(chain_id=esc.chain_id, escrow_address=esc.escrow.address,
                                 agreement_id=agreement_id, deadline=deadline)
        challenge["domain"] = {**challenge["domain"], **domain}
        signature = td.sign_typed_data(esc.acc.buyer.key, challenge)
        esc.reverts(esc.fn("challengeWithSig", agreement_id, deadline, signature), esc.acc.stranger,
                    "InvalidBuyerSignature")
    assert esc.state(agreement_id) == "Proposed"


def _reverted_with(esc, fn, sender) -> str:
    """The custom error ``fn`` reverts with as an eth_call (no transaction: the node's chain id changed)."""
    errors = {"0x" + bytes(esc.w3.keccak(text=f"{e['name']}({','.join(i['type'] for i in e['inputs'])})"))[:4].hex():
              e["name"] for e in esc.escrow.abi if e["type"] == "error"}
    with pytest.raises(ContractLogicError) as failure:
        fn.call({"from": sender.address})
    return errors.get(str(failure.value.data)[:10], str(failure.value))


def test_signatures_made_before_a_fork_changed_the_chain_id_are_refused_after_it(esc, chain):
    """A chain split that gives one side a new chain id: the contract's EIP-712 domain follows block.chainid, so the
    buyer's intents, receipts and challenges signed on the old chain do not run on the new one."""
    old_id = esc.chain_id
    active, _ = esc.activate(challenge_window=WINDOW)
    agreement_id = active["message"]["agreementId"]
    _proposed(esc, agreement_id)
    pending = esc.intent()  # signed for the old chain id, not yet submitted
    esc.mint(esc.acc.buyer, 10 * USDC)
    esc.tx(esc.usdc.functions.approve(esc.escrow.address, 10 * USDC), esc.acc.buyer)
    intent_sig = esc.sign(pending, esc.acc.buyer)
    digest = random_bytes32()
    receipt_sig = esc.receipt_sig(agreement_id, 2, 500, digest)
    deadline = chain.now() + 300
    challenge_sig = esc.challenge_sig(agreement_id, deadline)
    separator = esc.escrow.functions.DOMAIN_SEPARATOR().call()
    try:
        chain.rpc("anvil_setChainId", [old_id + 1])
        assert esc.escrow.functions.DOMAIN_SEPARATOR().call() != separator
        assert "0x" + esc.escrow.functions.activationIntentDigest(td.message_tuple(pending)).call().hex() == (
            td.typed_data_digest({**pending, "domain": {**pending["domain"], "chainId": old_id + 1}}))
        assert _reverted_with(esc, esc.activate_fn(pending, intent_sig), esc.acc.stranger) == "InvalidBuyerSignature"
        fn = esc.fn("proposeSettlement", agreement_id, 2, 500, digest, receipt_sig)
        assert _reverted_with(esc, fn, esc.acc.operator) == "InvalidReceiptSignature"
        fn = esc.fn("challengeWithSig", agreement_id, deadline, challenge_sig)
        assert _reverted_with(esc, fn, esc.acc.stranger) == "InvalidBuyerSignature"
    finally:
        chain.rpc("anvil_setChainId", [old_id])
    assert esc.escrow.functions.DOMAIN_SEPARATOR().call() == separator


def test_a_front_runner_can_neither_spend_nor_block_the_buyers_activation(esc):
    """A third party who sees the relayer's pending activation sends the intent first without the permit (nothing
    happens: no allowance, the nonce stays unused), then spends the permit itself: the relayer's activation, its
    permit now used, still opens exactly the buyer's escrow."""
    acc = esc.acc
    typed = esc.intent()
    message = typed["message"]
    amount = message["depositAmount"] + message["infraFee"]
    esc.mint(acc.buyer, amount)
    signature = esc.sign(typed, acc.buyer)
    permit = esc.permit(acc.buyer, amount, deadline=message["deadline"])

    esc.reverts(esc.activate_fn(typed, signature), acc.stranger, "InsufficientAllowance", amount, 0)
    assert not esc.escrow.functions.intentNonceUsed(acc.buyer.address, message["nonce"]).call()
    esc.submit_permit(acc.buyer, permit, sender=acc.stranger)

    esc.tx(esc.activate_fn(typed, signature, permit), acc.operator)
    e = esc.get(message["agreementId"], acc.buyer.address)
    assert (e["state"], e["seller"], e["depositAmount"]) == ("Active", acc.seller.address, message["depositAmount"])
    assert esc.balance(acc.buyer) == 0 and esc.held() == message["depositAmount"]


def test_the_buyer_cannot_cancel_the_nonce_holding_its_escrows_state(esc):
    """An escrow's settlement state lives in its buyer's word for the intent nonce: cancelling that nonce is refused
    (the escrow stays Active and is not reset), and another address cancelling the same number touches only its own."""
    typed, _ = esc.activate()
    message = typed["message"]
    esc.reverts(esc.escrow.functions.cancelIntentNonce(message["nonce"]), esc.acc.buyer, "IntentNonceUsed")
    esc.tx(esc.escrow.functions.cancelIntentNonce(message["nonce"]), esc.acc.stranger)
    assert esc.state(message["agreementId"]) == "Active"
    esc.propose(message["agreementId"], 1, 1)
    assert esc.state(message["agreementId"]) == "Proposed"


def test_a_seller_cannot_restart_the_window_without_a_newer_receipt(esc, chain):
    """Each restart of the challenge window costs the seller a receipt with a higher seq than the last proposed:
    the relayer's latest receipt ends the restarts, and the buyer may still challenge until the window's end."""
    typed, _ = esc.activate(challenge_window=WINDOW)
    agreement_id = typed["message"]["agreementId"]
    digest = random_bytes32()
    latest = esc.receipt_sig(agreement_id, 9, 700_000, digest)
    first = esc.event(esc.tx(esc.fn("proposeSettlement", agreement_id, 9, 700_000, digest, latest),
                             esc.acc.operator), "SettlementProposed")
    chain.increase_time(WINDOW - 10)
    for seq in (9, 8, 1):  # the same receipt again, older ones
        esc.reverts(esc.propose_fn(agreement_id, seq, 1), esc.acc.seller, "StaleReceipt", seq, 9)
    esc.reverts(esc.fn("proposeSettlement", agreement_id, 9, 700_000, digest, latest), esc.acc.seller,
                "StaleReceipt", 9, 9)
    assert esc.get(agreement_id)["challengeDeadline"] == first["challengeDeadline"]
    chain.set_next_timestamp(first["challengeDeadline"] - 1)
    esc.tx(esc.fn("challenge", agreement_id), esc.acc.buyer)
    assert esc.state(agreement_id) == "Disputed"


# EIP-1167: a proxy that DELEGATECALLs every call, with all its gas, to the 20-byte address in the middle, as
# Circle's FiatTokenProxy does for USDC.
_PROXY_HEAD, _PROXY_TAIL = "363d3d373d3d3d363d73", "5af43d82803e903d91602b57fd5bf3"


# The same proxy, lowering a transferFrom's amount by one before delegating it: a token that moves less than asked
# (a transfer fee its issuer turned on; USDC is upgradeable). Inserted after the calldata copy: mstore(0x44,
# mload(0x44) - (selector == transferFrom)); the tail's jump moves by the 19 bytes inserted.
_SHORT_PAYING_HEAD = _PROXY_HEAD[:8] + "600051" "60e01c" "6323b872dd" "14" "604451" "03" "604452" + _PROXY_HEAD[8:]
_SHORT_PAYING_TAIL = _PROXY_TAIL.replace("602b57", "603e57")


def _token_behind_proxy(esc, chain, head: str, tail: str) -> None:
    """The test token's code moved to another address and the token's own replaced by `head` + that address +
    `tail` (a proxy DELEGATECALLing it): same address, same storage."""
    implementation = "0x" + "11" * 19 + "67"
    chain.rpc("anvil_setCode", [implementation, "0x" + esc.w3.eth.get_code(esc.usdc.address).hex()])
    chain.rpc("anvil_setCode", [esc.usdc.address, "0x" + head + implementation[2:] + tail])


def test_a_starved_gas_limit_cannot_force_a_deferral_through_a_proxied_token(esc, chain):
    """USDC is a proxy: a transfer starved of gas fails two calls deep, and the escrow gets back more than 1/64 of
    the gas it forwarded. Turning the test token into a proxy of itself (same storage), every gas limit either pays
    both parties or reverts: no limit leaves a payable party's share deferred."""
    agreement_id, _ = _due_for_finalize(esc, chain)
    _token_behind_proxy(esc, chain, _PROXY_HEAD, _PROXY_TAIL)
    assert esc.balance(esc.escrow.address) > 0  # the proxy reads the token's own storage

    fn = esc.fn("finalize", agreement_id)
    needed = fn.estimate_gas({"from": esc.acc.stranger.address})
    outcomes = set()
    for gas in [*range(40_000, needed, 500), needed]:
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


@pytest.mark.parametrize("two_permits", [False, True], ids=["one_permit", "two_permits"])
def test_a_token_paying_the_escrow_less_than_asked_cannot_open_an_escrow_short(esc, chain, two_permits):
    """A token that moves less than `transferFrom` asked would leave the escrow holding less than the deposit it
    owes: that escrow's payout taken from the other escrows' deposits, the last one settled unpaid. The activation
    reverts ShortTransfer (what it asked, what came in) and the buyer keeps its money."""
    esc.activate()  # an escrow opened before: a short one's payout would come out of this one's deposit
    held = esc.held()
    _token_behind_proxy(esc, chain, _SHORT_PAYING_HEAD, _SHORT_PAYING_TAIL)
    typed = esc.intent()
    deposit, fee, deadline = (typed["message"][key] for key in ("depositAmount", "infraFee", "deadline"))
    esc.mint(esc.acc.buyer, deposit + fee)
    buyer_before = esc.balance(esc.acc.buyer)
    if two_permits:
        nonce = esc.usdc.functions.nonces(esc.acc.buyer.address).call()
        permits = (esc.permit(esc.acc.buyer, deposit, deadline=deadline, nonce=nonce),
                   esc.permit(esc.acc.buyer, fee, deadline=deadline, nonce=nonce + 1))
    else:
        permits = (esc.permit(esc.acc.buyer, deposit + fee, deadline=deadline),)
    fn = esc.activate_fn(typed, esc.sign(typed, esc.acc.buyer), *permits)
    short_by = 2 if two_permits else 1
    esc.reverts(fn, esc.acc.operator, "ShortTransfer", deposit + fee, deposit + fee - short_by)
    assert (esc.balance(esc.acc.buyer), esc.held()) == (buyer_before, held)


def _reentering_head(calldata: str) -> str:
    """Code put before the proxy: on `transfer` (a payout), first CALL the caller (the escrow) with `calldata`,
    appended after the proxy, ignoring its result: a token whose transfer hook calls back into the escrow."""
    blob = calldata.removeprefix("0x")
    # The proxy reads RETURNDATASIZE as a cheap 0: a STATICCALL of the identity precompile with nothing empties it.
    head_length, proxy_length = 0x35, (len(_PROXY_HEAD) + 40 + len(_PROXY_TAIL)) // 2
    return ("600035" "60e01c" "63a9059cbb" "14" "15" f"61{head_length - 1:04x}" "57"  # not transfer: to the proxy
            "6000" "6000" f"61{len(blob) // 2:04x}" "80" f"61{head_length + proxy_length:04x}" "6000" "39"
            "6000" "6000" "33" "5a" "f1" "50" "6000" "6000" "6000" "6000" "6004" "5a" "fa" "50" "5b")


def _calls(frame: dict):
    yield frame
    for inner in frame.get("calls", []):
        yield from _calls(inner)


def test_a_token_calling_back_into_the_escrow_during_a_payout_pays_each_party_once(esc, chain):
    """A token whose transfer hook calls `finalize` again while the escrow pays the seller: the call back is refused
    (ReentrancyGuardReentrantCall; the escrow is Settled before it pays anyway) and each party is paid once."""
    agreement_id, _ = _due_for_finalize(esc, chain)
    finalize = esc.escrow.encode_abi("finalize", args=[agreement_id, esc.terms(agreement_id)])
    head = _reentering_head(finalize)
    _token_behind_proxy(esc, chain, head + _PROXY_HEAD, _PROXY_TAIL.replace("602b57", f"60{0x2b + len(head) // 2:02x}57")
                        + finalize.removeprefix("0x"))
    held, seller_before, buyer_before = esc.balance(esc.escrow), esc.balance(esc.acc.seller), esc.balance(esc.acc.buyer)

    receipt = esc.tx(esc.fn("finalize", agreement_id), esc.acc.stranger)
    trace = chain.rpc("debug_traceTransaction", [receipt["transactionHash"].to_0x_hex(), {"tracer": "callTracer"}])
    calls_back = [frame for frame in _calls(trace) if frame["from"].lower() == esc.usdc.address.lower()
                  and frame["to"].lower() == esc.escrow.address.lower()]
    reentrancy_refused = "0x" + esc.w3.keccak(text="ReentrancyGuardReentrantCall()")[:4].hex()
    assert calls_back and all(frame.get("output", "").startswith(reentrancy_refused) for frame in calls_back)
    assert esc.events(receipt, "PayoutDeferred") == [] and len(esc.events(receipt, "Settled")) == 1
    assert (esc.balance(esc.acc.seller) - seller_before, esc.balance(esc.acc.buyer) - buyer_before,
            held - esc.balance(esc.escrow)) == (400_000, 600_000, 1_000_000)


# Runtime code answering every call with 32 zero bytes: a token whose transfer returns false instead of reverting.
_RETURNS_FALSE = "0x60206000f3"


def test_a_token_returning_false_defers_payouts_and_keeps_fees(esc, chain):
    """A transfer that returns false (no revert) is a failed payout: finalize credits both parties instead of
    counting them paid, payFees reverts and keeps the fees accrued; once the token transfers again, withdraw and
    payFees pay exactly what was owed."""
    agreement_id, fee = _due_for_finalize(esc, chain)
    token_code = "0x" + esc.w3.eth.get_code(esc.usdc.address).hex()
    chain.rpc("anvil_setCode", [esc.usdc.address, _RETURNS_FALSE])

    receipt = esc.tx(esc.fn("finalize", agreement_id), esc.acc.stranger)
    assert [(e["party"], e["amount"]) for e in esc.events(receipt, "PayoutDeferred")] == [
        (esc.acc.seller.address, 400_000), (esc.acc.buyer.address, 600_000)]
    esc.reverts(esc.escrow.functions.payFees(esc.usdc.address), esc.acc.stranger, "SafeERC20FailedOperation")
    assert esc.escrow.functions.feesAccrued(esc.usdc.address).call() == fee

    chain.rpc("anvil_setCode", [esc.usdc.address, token_code])
    seller_before, buyer_before = esc.balance(esc.acc.seller), esc.balance(esc.acc.buyer)
    esc.tx(esc.fn("withdraw", agreement_id), esc.acc.stranger)
    assert (esc.balance(esc.acc.seller) - seller_before, esc.balance(esc.acc.buyer) - buyer_before) == (
        400_000, 600_000)
    esc.pay_fees()
    assert esc.balance(esc.escrow.address) == 0


def test_an_arbiter_cannot_award_the_seller_more_than_the_disputed_proposal(esc, chain):
    """A compromised or rogue arbiter key (any ARBITER_ROLE holder, whatever the platform's API checks) colluding
    with the seller: the buyer disputed a proposal as too much, and `resolve` paid the seller more than it claimed, up
    to the whole deposit. The contract bounds the award by the disputed proposal, so a dispute never leaves the buyer
    worse off than not disputing; the proposal itself may still be upheld."""
    typed, _ = esc.activate(challenge_window=WINDOW)
    agreement_id = typed["message"]["agreementId"]
    _proposed(esc, agreement_id, amount=400_000)
    esc.tx(esc.fn("challenge", agreement_id), esc.acc.buyer)
    for award in (400_001, 1_000_000):
        esc.reverts(esc.fn("resolve", agreement_id, award), esc.acc.arbiter, "AmountExceedsProposal", award, 400_000)
    assert esc.state(agreement_id) == "Disputed"
    esc.tx(esc.fn("resolve", agreement_id, 400_000), esc.acc.arbiter)  # upholding the proposal whole is fine
    seller_before, buyer_before = esc.balance(esc.acc.seller), esc.balance(esc.acc.buyer)
    esc.tx(esc.fn("finalize", agreement_id), esc.acc.stranger)
    assert esc.balance(esc.acc.seller) - seller_before == 400_000
    assert esc.balance(esc.acc.buyer) - buyer_before == 600_000
