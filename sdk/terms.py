"""The terms a buyer agreed to, and their hash (the `termsHash` the buyer consents to on-chain).

`terms_hash` is the one definition, used by the marketplace when it records a proposal and by the SDK when it
checks an activation package.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from eth_utils import keccak, to_checksum_address

from sdk.networks import NetworkConfig
from sdk.safety import SigningRefused, require_equal

__all__ = ["AgreedTerms", "agreed_address", "agreed_time", "agreed_whole", "check_onchain_id", "stated_terms_hash",
           "terms_hash", "unix_time"]


def terms_hash(terms: Mapping[str, Any]) -> str:
    """keccak256 of the terms' canonical JSON (sorted keys, no spaces)."""
    canonical = json.dumps(terms, sort_keys=True, separators=(",", ":"), default=str).encode()
    return "0x" + keccak(canonical).hex()


def stated(agreement: Mapping[str, Any], name: str) -> Any:
    """The agreement's term `name`, else `SigningRefused` ("agreement.<name>", missing)."""
    if name not in agreement:
        raise SigningRefused(f"agreement.{name}", "a value", None, "missing")
    return agreement[name]


def check_onchain_id(agreement: Mapping[str, Any]) -> str:
    """The agreement's escrow id, `onchain_id`, if it is its own: its UUID `id`, left-padded to bytes32 (the
    marketplace's definition). Else `SigningRefused` ("agreement.onchain_id"): a signature for another id would
    fund, or dispute, another agreement's escrow."""
    agreement_id = stated(agreement, "id")
    try:
        own = "0x" + uuid.UUID(str(agreement_id)).hex.rjust(64, "0")
    except ValueError:
        raise SigningRefused("agreement.id", "a UUID", agreement_id) from None
    require_equal(stated(agreement, "onchain_id"), own, "agreement.onchain_id")
    return own


def stated_terms_hash(agreement: Mapping[str, Any], network: NetworkConfig) -> str:
    """The terms hash of the agreement as it states its terms (unit price, quantity, fee, parties...) on the pinned
    token and chain: what the escrow funded for exactly these terms holds on-chain as its `termsHash`."""
    quantity, price = agreed_whole(agreement, "quantity"), agreed_whole(agreement, "price_per_unit_atomic")
    service = stated(agreement, "service")
    if not isinstance(service, Mapping) or "id" not in service:
        raise SigningRefused("agreement.service", "the service, with its id", service)
    return terms_hash({
        "service_id": str(service["id"]), "settlement_model": "escrow",
        "pricing_type": stated(agreement, "pricing_type"), "unit_name": stated(agreement, "unit_name"),
        "price_per_unit": price, "quantity": quantity, "deposit_amount": quantity * price,
        "infra_fee": agreed_whole(agreement, "infra_fee_atomic"), "token": stated(agreement, "token"),
        "token_address": network.token_address, "chain_id": network.chain_id,
        "challenge_window_seconds": agreed_whole(agreement, "challenge_window_seconds"),
        "expires_at": agreed_time(agreement, "expires_at"),
        "buyer_wallet_address": stated(agreement, "buyer_wallet_address"),
        "seller_wallet_address": stated(agreement, "seller_wallet_address"),
        "fee_recipient": stated(agreement, "fee_recipient"),
    })


def agreed_whole(agreement: Mapping[str, Any], name: str, *, where: str = "agreement") -> int:
    """The agreement's term `name` (or another answer's, named `where`) as a whole number (a JSON integer, or
    decimal ASCII digits that int() reads), else `SigningRefused` ("<where>.<name>"): int() would round a float,
    and raise on anything else."""
    value = agreement.get(name)
    if isinstance(value, str) and value.isascii() and value.isdigit():
        try:
            return int(value)
        except ValueError:  # more digits than int() reads (sys.get_int_max_str_digits): no amount or time is
            raise SigningRefused(f"{where}.{name}", "a whole number", f"{value[:20]}... ({len(value)} digits)"
                                 ) from None
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise SigningRefused(f"{where}.{name}", "a whole number", value)
    return value


def unix_time(value: Any) -> int:
    """`value` as a unix time: an integer, or an ISO 8601 date or datetime with its UTC offset. Else ValueError: a
    date without one would be read in this machine's local time, which the marketplace's (UTC) is not."""
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    try:
        moment = value if isinstance(value, datetime) else datetime.fromisoformat(str(value))
        if moment.tzinfo is None or moment.utcoffset() is None:
            raise ValueError(f"{value!r:.80} has no UTC offset")
        return int(moment.timestamp())
    except OverflowError as out_of_range:
        raise ValueError(f"{value!r:.80} is out of range") from out_of_range


def agreed_time(agreement: Mapping[str, Any], name: str) -> int:
    """The agreement's term `name` as a unix time (an integer, or an ISO 8601 date with its UTC offset:
    `unix_time`), else `SigningRefused`."""
    value = agreement.get(name)
    try:
        return unix_time(value)
    except ValueError:
        raise SigningRefused(f"agreement.{name}", "a unix time or an ISO 8601 date with its UTC offset", value
                             ) from None


def agreed_address(agreement: Mapping[str, Any], name: str, *, where: str = "agreement") -> str:
    """The agreement's term `name` (or another answer's, named `where`) as a checksummed address, else
    `SigningRefused` ("<where>.<name>")."""
    value = agreement.get(name)
    try:
        return to_checksum_address(value)
    except (TypeError, ValueError):
        raise SigningRefused(f"{where}.{name}", "an address", value) from None


@dataclass(frozen=True)
class AgreedTerms:
    """An escrow agreement's terms, as the buyer proposed them, checked against the pinned configuration."""

    agreement_id: str  # the escrow contract's bytes32 id
    buyer: str
    seller: str
    quantity: int
    price_per_unit: int
    deposit_amount: int
    infra_fee: int
    challenge_window: int
    expires_at: int
    terms_hash: str

    @property
    def total(self) -> int:
        """What the buyer's single permit may move: the deposit plus the fee."""
        return self.deposit_amount + self.infra_fee

    @classmethod
    def from_agreement(cls, agreement: Mapping[str, Any], network: NetworkConfig) -> AgreedTerms:
        """From the agreement the buyer proposed (the `propose_agreement` answer it kept). The deposit must be
        quantity × unit price, the fee the published schedule's, the token and chain the pinned ones; the terms
        hash is recomputed here, so the intent binds the buyer to exactly these terms, and the escrow id is the
        agreement's own (`check_onchain_id`)."""
        onchain_id = check_onchain_id(agreement)
        quantity, price = agreed_whole(agreement, "quantity"), agreed_whole(agreement, "price_per_unit_atomic")
        deposit = quantity * price
        require_equal(agreement.get("deposit_amount_atomic"), deposit, "agreement.deposit_amount_atomic")
        fee = network.fee_schedule.fee_for(deposit)
        require_equal(agreement.get("infra_fee_atomic"), fee, "agreement.infra_fee_atomic")
        require_equal(agreement.get("chain_id"), network.chain_id, "agreement.chain_id")
        require_equal(agreement.get("token_address"), network.token_address, "agreement.token_address")
        if agreement.get("settlement_model") != "escrow":
            raise SigningRefused("agreement.settlement_model", "escrow", agreement.get("settlement_model"))
        return cls(agreement_id=onchain_id, buyer=agreed_address(agreement, "buyer_wallet_address"),
                   seller=agreed_address(agreement, "seller_wallet_address"), quantity=quantity,
                   price_per_unit=price, deposit_amount=deposit, infra_fee=fee,
                   challenge_window=agreed_whole(agreement, "challenge_window_seconds"),
                   expires_at=agreed_time(agreement, "expires_at"),
                   terms_hash=stated_terms_hash(agreement, network))
