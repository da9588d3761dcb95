"""Usage receipts: the digest chain over usage events and the EIP-712 receipt the platform signs.

A buyer verifies every charge with `verify_usage` (no marketplace, no Django) against the escrow as the chain
holds it (`sdk.onchain.ChainReader.escrow`, through the buyer's own RPC): each event's digest extends the previous
one (`usageDigest_n = keccak256(usageDigest_{n-1} ‖ eventHash_n)`, `usageDigest_0 = 0x00…`), the sequence has no
gap, the cumulative amounts add up and stay within the deposit, every receipt recovers to the escrow's on-chain
receipt signer, which must be one the caller pins (`pinned_receipt_signers`, required), the last event carries one (the marketplace signs the last event of every write), and a proposed
settlement is the last receipt. Each failure has its own exception type.

The receipt hash is written out by hand because the marketplace signs one per proxied call: ~15 µs against
~840 µs for eth-account's `encode_typed_data` of the same receipt (timeit, one core). It is tested equal to
eth-account's EIP-712 encoding of `sdk.typed_data.usage_receipt`. For the same reason the digest is signed with
libsecp256k1 (coincurve) directly, ~40 µs against ~230 µs through eth-account's `unsafe_sign_hash`, whose
signature it is tested byte-identical to; signatures are recovered with eth-account's public
`Account.recover_message`.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable, Mapping
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

from eth_abi import encode
from eth_account import Account
from eth_account.messages import SignableMessage
from eth_utils import keccak, to_checksum_address
from sha3 import keccak_256

from sdk.onchain import OnchainEscrow

ZERO_DIGEST = "0x" + "00" * 32
# The escrow states that follow a settlement proposal: the contract disputes only a proposal, resolves only a
# dispute, and settles only a proposal, a resolution or a dispute that timed out.
_PROPOSAL_STATES = frozenset({"proposed", "disputed", "resolved", "settled"})
USAGE_RECEIPT_TYPEHASH = keccak(
    text="UsageReceipt(bytes32 agreementId,uint256 seq,uint256 cumulativeAmount,bytes32 usageDigest)"
)
_DOMAIN_TYPEHASH = keccak(text="EIP712Domain(string name,string version,uint256 chainId,address verifyingContract)")


def _b32(value: str | bytes) -> bytes:
    raw = bytes.fromhex(value.removeprefix("0x")) if isinstance(value, str) else bytes(value)
    if len(raw) != 32:
        raise ValueError("expected 32 bytes")
    return raw


@lru_cache(maxsize=64)
def escrow_domain_separator(chain_id: int, escrow_address: str) -> bytes:
    return keccak(encode(["bytes32", "bytes32", "bytes32", "uint256", "address"], [
        _DOMAIN_TYPEHASH, keccak(text="UsageEscrow"), keccak(text="1"), chain_id, to_checksum_address(escrow_address),
    ]))


def _keccak(data: bytes) -> bytes:
    """keccak256 on the per-event path: safe-pysha3's native keccak is ~10x eth_utils.keccak (pycryptodome)."""
    return keccak_256(data).digest()


def _uint256(value: int) -> bytes:
    """ABI encoding of a uint256: one big-endian word (OverflowError outside 0 .. 2**256-1). Structs of static
    types encode as their words side by side, so the hashes below need no general ABI encoder (10x faster)."""
    return value.to_bytes(32, "big")


def usage_receipt_signable(*, chain_id: int, escrow_address: str, agreement_id: str, seq: int,
                           cumulative_amount: int, usage_digest: str) -> SignableMessage:
    """UsageReceipt as eth-account's `SignableMessage` (EIP-712: version 0x01, domain separator, struct hash)."""
    struct = _keccak(USAGE_RECEIPT_TYPEHASH + _b32(agreement_id) + _uint256(seq) + _uint256(cumulative_amount)
                     + _b32(usage_digest))
    return SignableMessage(b"\x01", escrow_domain_separator(chain_id, escrow_address), struct)


def usage_receipt_digest(*, chain_id: int, escrow_address: str, agreement_id: str, seq: int,
                         cumulative_amount: int, usage_digest: str) -> bytes:
    """The EIP-712 digest of UsageReceipt (what `UsageEscrow.usageReceiptDigest` computes)."""
    signable = usage_receipt_signable(chain_id=chain_id, escrow_address=escrow_address, agreement_id=agreement_id,
                                      seq=seq, cumulative_amount=cumulative_amount, usage_digest=usage_digest)
    return _keccak(b"\x19" + signable.version + signable.header + signable.body)


def usage_event_hash(*, agreement_id: str, seq: int, units: int, cost: int, cumulative_amount: int,
                     request_id: str) -> bytes:
    """keccak256(abi.encode(agreementId, seq, units, cost, cumulativeAmount, keccak256(requestId)))."""
    return _keccak(_b32(agreement_id) + _uint256(seq) + _uint256(units) + _uint256(cost)
                   + _uint256(cumulative_amount) + _keccak(request_id.encode()))


def next_usage_digest(previous: str, event_hash: bytes) -> str:
    return "0x" + _keccak(_b32(previous) + event_hash).hex()


def usage_digests(previous: str, *, agreement_id: str, events: Iterable[tuple[int, int, int, int, str]]) -> list[str]:
    """The usage digest after each of `events` (seq, units, cost, cumulative amount, request id) in turn: what
    `next_usage_digest(previous, usage_event_hash(...))` gives event by event, with the agreement's word decoded
    once and the running digest kept as bytes (a batch of 100 events spent most of its hashing time in both)."""
    agreement, digest, digests = _b32(agreement_id), _b32(previous), []
    for seq, units, cost, cumulative_amount, request_id in events:
        event_hash = keccak_256(agreement + seq.to_bytes(32, "big") + units.to_bytes(32, "big")
                                + cost.to_bytes(32, "big") + cumulative_amount.to_bytes(32, "big")
                                + keccak_256(request_id.encode()).digest()).digest()
        digest = keccak_256(digest + event_hash).digest()
        digests.append("0x" + digest.hex())
    return digests


def recover_receipt_signer(receipt: SignableMessage, signature: str) -> str:
    return str(Account.recover_message(receipt, signature=bytes.fromhex(signature.removeprefix("0x"))))


@dataclass(frozen=True)
class VerifiedUsage:
    events: int
    cumulative_amount: int
    usage_digest: str
    last_signed_seq: int


class UsageVerificationError(ValueError):
    """The usage listing does not hold up; the subclass says how."""


class UsageSequenceGap(UsageVerificationError):
    """An event is missing, repeated or out of order."""


class UsageSumMismatch(UsageVerificationError):
    """A cost is not units × price, or a cumulative amount is not the sum of the costs so far."""


class UsageAboveDeposit(UsageVerificationError):
    """The charges add up to more than the escrow's on-chain deposit."""


class UsageDigestMismatch(UsageVerificationError):
    """An event's usage digest is not keccak256(previous digest ‖ the event's own fields)."""


class ReceiptTampered(UsageVerificationError):
    """A receipt's signature does not match the event as listed (the event or the signature was altered)."""


class ReceiptSignerMismatch(UsageVerificationError):
    """A receipt was signed by a key other than the escrow's on-chain receipt signer, or that signer, as read, is not
    one the network pins."""


class UsageUnsigned(UsageVerificationError):
    """The listing's last event carries no receipt: the charges after the last receipt are no one's word (a changed
    event, its receipt taken away, would pass for one)."""


class UsageMalformed(UsageVerificationError):
    """An event misses a field or holds a value no receipt could sign: an amount or sequence number that is not a
    whole number from 0 to 2**256 - 1, a request id or digest that is not text."""


class UsageEscrowUnreadable(UsageVerificationError):
    """The escrow's on-chain record does not read through the buyer's RPC: the node refused a read (`RpcError`) or
    answered what does not decode (`MalformedAnswer`, the cause). Nothing is verified against it."""


class UsageTermsMismatch(UsageVerificationError):
    """The agreement verified against is not the escrow's: its escrow id is not its own, or the terms it states (its
    unit price above all, which each event's cost is checked against) are not those the escrow's on-chain
    `termsHash` commits to, which the buyer signed."""


class UsageChainMismatch(UsageVerificationError):
    """The buyer's RPC serves another chain than the pinned network's (its `eth_chainId`), or its chain id does not
    read: an escrow read there is not the agreement's."""


class SettlementProposalMismatch(UsageVerificationError):
    """The settlement proposed on-chain is not the last receipt (amount above it, or another digest)."""


class UsageVerificationTimedOut(TimeoutError):
    """The verification outlasted its timeout (`MarketplaceClient.verify_usage`): the listing may be endless (a
    compromised marketplace can list zero-unit events, which cost nothing, without end) or merely slow. Nothing is
    proven either way; `events` counts those verified before it stopped."""

    def __init__(self, message: str, *, events: int):
        super().__init__(message)
        self.events = events


def verify_usage(events: Iterable[Mapping[str, Any]], *, escrow: OnchainEscrow, agreement_id: str, chain_id: int,
                 escrow_address: str, price_per_unit: int,
                 pinned_receipt_signers: Collection[str]) -> VerifiedUsage:
    """Check a usage listing (`GET /usage-agreements/{id}/usage`, oldest first) against the on-chain `escrow`.

    Each cost must be `units × price_per_unit` (required: the unit price the buyer signed for). Receipts must recover
    to `escrow.receipt_signer`, which must be one of `pinned_receipt_signers` (required, not empty: the network's
    pinned signer and any retired one it pins, `NetworkConfig.receipt_signers`; else TypeError): the escrow is read
    through an RPC, which could name a key of its own, or built from what the marketplace says
    (`ReceiptSignerMismatch`). An event's `receipt_signer` (the address the marketplace says signed it) only tells a
    tampered receipt from one signed by another key; it is never trusted. An escrow in state "none" (never activated,
    as read) holds nothing, whatever deposit and signer its record names: a charge is above it, and a receipt is
    refused unless its signer is pinned."""
    if isinstance(price_per_unit, bool) or not isinstance(price_per_unit, int):
        raise TypeError(f"price_per_unit must be an int (token base units), not {price_per_unit!r:.40}")
    if isinstance(pinned_receipt_signers, str):  # one address, not its characters
        pinned_receipt_signers = (pinned_receipt_signers,)
    pinned = {str(signer).lower() for signer in pinned_receipt_signers or ()}
    if not pinned:
        raise TypeError("pinned_receipt_signers must name the pinned receipt signer (NetworkConfig.receipt_signers): "
                        "without it, receipts signed by any key the escrow record names would verify")
    unpinned_signer = ReceiptSignerMismatch(f"the escrow's receipt signer {escrow.receipt_signer}, as the RPC reads "
                                            f"it, is not a pinned one ({', '.join(sorted(pinned))})")
    signer_pinned = escrow.receipt_signer.lower() in pinned
    if escrow.state != "none" and not signer_pinned:
        raise unpinned_signer
    # No escrow on-chain holds nothing, whatever else the node says of it (a record in state "none" naming a deposit
    # and a receipt signer of its own): any charge listed is above it, and any receipt is refused below.
    deposit = escrow.deposit_amount if escrow.state != "none" else 0
    digest, cumulative, expected_seq, count = ZERO_DIGEST, 0, 1, 0
    last_signed, last_signed_amount, last_signed_digest = 0, 0, ZERO_DIGEST
    for event in events:
        seq, units, cost, listed_cumulative = _event_numbers(event, position=count + 1)
        if seq != expected_seq:
            raise UsageSequenceGap(f"sequence gap: expected {expected_seq}, got {seq}")
        if cost != units * price_per_unit:
            raise UsageSumMismatch(f"event {seq}: cost {cost} != {units} units × {price_per_unit}")
        cumulative += cost
        if listed_cumulative != cumulative:
            raise UsageSumMismatch(f"event {seq}: cumulative {event['cumulative_atomic']} != {cumulative}")
        if cumulative > deposit:
            raise UsageAboveDeposit(f"event {seq}: {cumulative} charged, the escrow holds {deposit}")
        digest = next_usage_digest(digest, usage_event_hash(agreement_id=agreement_id, seq=seq, units=units,
                                                            cost=cost, cumulative_amount=cumulative,
                                                            request_id=event["request_id"]))
        if str(event["usage_digest"]).lower() != digest:
            raise UsageDigestMismatch(f"event {seq}: digest {event['usage_digest']} does not extend the chain "
                                      f"({digest})")
        if event.get("receipt_signature"):
            receipt = usage_receipt_signable(chain_id=chain_id, escrow_address=escrow_address,
                                             agreement_id=agreement_id, seq=seq, cumulative_amount=cumulative,
                                             usage_digest=digest)
            try:
                signer = recover_receipt_signer(receipt, event["receipt_signature"])
            except Exception as exc:  # noqa: BLE001 - any unrecoverable signature is a tampered one
                raise ReceiptTampered(f"event {seq}: the receipt signature is not a valid signature") from exc
            if signer != escrow.receipt_signer:
                claimed = str(event.get("receipt_signer") or "")
                if claimed.lower() != signer.lower():
                    raise ReceiptTampered(f"event {seq}: the receipt does not match the event as listed")
                raise ReceiptSignerMismatch(f"event {seq}: receipt signed by {signer}, not by the escrow's "
                                            f"on-chain receipt signer {escrow.receipt_signer}")
            if not signer_pinned:  # the escrow's signer, as a record in state "none" names it
                raise unpinned_signer
            last_signed, last_signed_amount, last_signed_digest = seq, cumulative, digest
        expected_seq += 1
        count += 1
    if last_signed != count:
        raise UsageUnsigned(f"event {count}, the last listed, carries no receipt (the last receipt is of event "
                            f"{last_signed})")
    if escrow.state in _PROPOSAL_STATES:
        # The proposal, not the payout: an arbiter's resolution pays out its own amount. Challenged or decided, the
        # proposal is still the seller's claim, which the buyer's evidence is checked against.
        proposed = escrow.settled_amount if escrow.proposed_amount is None else escrow.proposed_amount
        if proposed != last_signed_amount or escrow.usage_digest != last_signed_digest:
            raise SettlementProposalMismatch(
                f"on-chain proposal {proposed} (digest {escrow.usage_digest}) is not the last receipt "
                f"{last_signed_amount} (seq {last_signed}, digest {last_signed_digest})")
    return VerifiedUsage(events=count, cumulative_amount=cumulative, usage_digest=digest, last_signed_seq=last_signed)


_EVENT_NUMBERS = ("seq", "units", "cost_atomic", "cumulative_atomic")


def _encodes(text: str) -> bool:
    """Whether `text` has a UTF-8 encoding (what the request id's hash is of): JSON's `"\\ud800"` is a lone
    surrogate, which none has (UnicodeEncodeError)."""
    try:
        text.encode()
    except UnicodeEncodeError:
        return False
    return True


def _event_numbers(event: Any, *, position: int) -> tuple[int, int, int, int]:
    """An event's (seq, units, cost, cumulative) as listed, or UsageMalformed: JSON integers within uint256 (not a
    boolean, a float or text), and text for its request id and digest; a malformed listing is refused as a
    UsageVerificationError like any other, not with whatever int() or the ABI encoder raises."""
    if not isinstance(event, Mapping):
        raise UsageMalformed(f"event {position} is not an object")
    numbers = []
    for name in _EVENT_NUMBERS:
        value = event.get(name)
        if type(value) is not int or not 0 <= value < 2**256:
            raise UsageMalformed(f"event {position}: {name} is {value!r:.80}, not a whole number from 0 to 2**256 - 1")
        numbers.append(value)
    for name in ("request_id", "usage_digest"):
        if not isinstance(event.get(name), str) or not _encodes(event[name]):
            raise UsageMalformed(f"event {position}: {name} is not text")
    seq, units, cost, cumulative = numbers
    return seq, units, cost, cumulative
