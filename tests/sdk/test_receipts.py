"""The usage digest chain of a batch (`usage_digests`) is the per-event chain, byte for byte."""

import copy
import dataclasses
import functools
import secrets

import pytest
from eth_abi import encode
from eth_account import Account
from eth_utils import keccak

from marketplace.signatures import receipt_sign
from sdk import receipts
from sdk.onchain import OnchainEscrow


def test_a_batchs_digests_are_the_per_event_chain_and_the_abi_encoding():
    agreement_id = "0x" + secrets.token_hex(32)
    previous = "0x" + secrets.token_hex(32)
    events = [(41 + index, index % 3 + 1, (index % 3 + 1) * 10**6, 10**20 + index, f"{secrets.token_hex(16)}:{index}")
              for index in range(25)] + [(66, 2**64, 2**200, 2**256 - 1, "")]

    digests = receipts.usage_digests(previous, agreement_id=agreement_id, events=events)

    expected, digest = [], previous
    for seq, units, cost, cumulative, request_id in events:
        event_hash = receipts.usage_event_hash(agreement_id=agreement_id, seq=seq, units=units, cost=cost,
                                               cumulative_amount=cumulative, request_id=request_id)
        assert event_hash == keccak(encode(["bytes32", "uint256", "uint256", "uint256", "uint256", "bytes32"], [
            bytes.fromhex(agreement_id[2:]), seq, units, cost, cumulative, keccak(text=request_id)]))
        digest = receipts.next_usage_digest(digest, event_hash)
        expected.append(digest)
    assert digests == expected
    assert receipts.usage_digests(previous, agreement_id=agreement_id, events=[]) == []


def _signed_listing(*, key, chain_id: int, escrow_address: str, agreement_id: str, batches: list[list[int]],
                    price: int) -> list[dict]:
    """A usage listing as the marketplace writes it: per batch of units, one event each, the last one signed."""
    events, digest, cumulative, seq = [], receipts.ZERO_DIGEST, 0, 0
    for batch in batches:
        for index, units in enumerate(batch):
            seq, cost = seq + 1, units * price
            cumulative += cost
            request_id = f"req-{seq}"
            digest = receipts.next_usage_digest(digest, receipts.usage_event_hash(
                agreement_id=agreement_id, seq=seq, units=units, cost=cost, cumulative_amount=cumulative,
                request_id=request_id))
            signature = ""
            if index == len(batch) - 1:
                signature = receipt_sign(key.key, receipts.usage_receipt_digest(
                    chain_id=chain_id, escrow_address=escrow_address, agreement_id=agreement_id, seq=seq,
                    cumulative_amount=cumulative, usage_digest=digest))
            events.append({"seq": seq, "units": units, "cost_atomic": cost, "cumulative_atomic": cumulative,
                           "usage_digest": digest, "request_id": request_id, "receipt_signature": signature,
                           "receipt_signer": key.address if signature else ""})
    return events


def _listing_and_its_check(*, agreement_id: str, batches: list[list[int]], price: int):
    """A signed listing (`_signed_listing`) on an active escrow holding 1,000 USDC, and `verify_usage` bound to it."""
    signer, chain_id, escrow_address = Account.create(), 31337, "0x" + "11" * 20
    escrow = OnchainEscrow(state="active", buyer="0x" + "22" * 20, seller="0x" + "33" * 20,
                           receipt_signer=signer.address, deposit_amount=10**9, settled_amount=0, last_seq=0,
                           usage_digest=receipts.ZERO_DIGEST)
    listing = _signed_listing(key=signer, chain_id=chain_id, escrow_address=escrow_address,
                              agreement_id=agreement_id, batches=batches, price=price)
    return listing, functools.partial(receipts.verify_usage, escrow=escrow, agreement_id=agreement_id,
                                      chain_id=chain_id, escrow_address=escrow_address, price_per_unit=price,
                                      pinned_receipt_signers=signer.address)


def test_an_event_changed_after_signing_is_caught_even_with_its_receipt_taken_away():
    # A marketplace that inflates its last charge can re-forge the sums and digests, but not the receipt: were a
    # listing ending in an unsigned event accepted, dropping the receipts from the changed event on would pass.
    agreement_id, price = "0x" + secrets.token_hex(32), 20_000
    listing, verify = _listing_and_its_check(agreement_id=agreement_id, batches=[[1, 1], [1, 1]], price=price)
    assert verify(listing).cumulative_amount == 80_000

    forged = copy.deepcopy(listing)
    forged[-1]["units"], forged[-1]["cost_atomic"] = 50, 50 * price
    forged[-1]["cumulative_atomic"] = forged[-2]["cumulative_atomic"] + 50 * price
    forged[-1]["usage_digest"] = receipts.next_usage_digest(forged[-2]["usage_digest"], receipts.usage_event_hash(
        agreement_id=agreement_id, seq=4, units=50, cost=50 * price, cumulative_amount=forged[-1]["cumulative_atomic"],
        request_id=forged[-1]["request_id"]))
    with pytest.raises(receipts.ReceiptTampered):
        verify(forged)
    forged[-1]["receipt_signature"] = forged[-1]["receipt_signer"] = ""
    with pytest.raises(receipts.UsageUnsigned):
        verify(forged)


@pytest.mark.parametrize("change", [
    {"cost_atomic": None}, {"seq": "one"}, {"units": -1}, {"units": 2**256}, {"cumulative_atomic": 1.5},
    {"units": True}, {"request_id": 7}, {"usage_digest": None}, "cost_atomic", {"request_id": "req_\ud800"},
], ids=["cost null", "seq not a number", "units negative", "units past uint256", "cumulative a float",
        "units a boolean", "request id a number", "digest null", "cost missing", "request id a lone surrogate"])
def test_a_listing_with_a_malformed_event_is_a_usage_verification_error(change):
    """A compromised marketplace's listing whose event misses a field or holds a value no receipt could sign: refused
    as a UsageVerificationError (UsageMalformed) naming the event and field, which is what a caller of verify_usage
    catches (before: KeyError, TypeError, OverflowError, or a plain ValueError from int())."""
    listing, verify = _listing_and_its_check(agreement_id="0x" + secrets.token_hex(32), batches=[[1, 1]],
                                             price=20_000)
    if isinstance(change, str):
        del listing[0][change]
    else:
        listing[0].update(change)
    with pytest.raises(receipts.UsageMalformed, match="event 1"):
        verify(listing)


@pytest.mark.parametrize("state", ["proposed", "disputed", "resolved", "settled"])
def test_a_proposal_beyond_the_listings_last_receipt_is_refused_whatever_became_of_it(state):
    """The on-chain proposal was held to the listing's last receipt while `proposed` and once `settled` only: once
    the buyer challenged it (`disputed`), or the arbiter decided (`resolved`), a proposal of a hundred times the
    listed charges (a receipt the listing does not show) passed verification, so the buyer's evidence of the
    overcharge read as a clean listing until the escrow settled. The proposal is checked in every state that has
    one (the arbiter's payout in `settled_amount` aside)."""
    agreement_id, price = "0x" + secrets.token_hex(32), 20_000
    listing, verify = _listing_and_its_check(agreement_id=agreement_id, batches=[[1, 1], [1, 1]], price=price)
    active = verify.keywords["escrow"]
    honest = dataclasses.replace(active, state=state, proposed_amount=80_000, settled_amount=40_000,
                                 usage_digest=listing[-1]["usage_digest"], last_seq=4)
    assert verify(listing, escrow=honest).cumulative_amount == 80_000
    overcharged = dataclasses.replace(honest, proposed_amount=100 * 80_000, usage_digest="0x" + "ab" * 32, last_seq=5)
    with pytest.raises(receipts.SettlementProposalMismatch):
        verify(listing, escrow=overcharged)


def test_the_public_verify_usage_does_not_skip_the_cost_check():
    """`verify_usage` checked each cost against `units × price_per_unit` only when given the price: a caller of the
    public function leaving it out had a listing charging a hundred times the agreed price (re-summed, re-signed)
    verify. The unit price is required."""
    agreement_id, price = "0x" + secrets.token_hex(32), 20_000
    listing, verify = _listing_and_its_check(agreement_id=agreement_id, batches=[[1, 1]], price=100 * price)
    unpriced = functools.partial(receipts.verify_usage, **{
        name: value for name, value in verify.keywords.items() if name != "price_per_unit"})
    with pytest.raises(TypeError, match="price_per_unit"):
        unpriced(listing)
    with pytest.raises(receipts.UsageSumMismatch):
        verify(listing, price_per_unit=price)
