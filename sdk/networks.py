"""The trusted client configuration: what the SDK compares every server-sent signing request with.

A buyer's wallet signs only objects the SDK builds itself from the agreed terms and this configuration, never
what the marketplace hands over. So the configuration must not come from the marketplace: pin it in code, as
the x402 and Pægents SDKs pin their networks.

    from sdk.networks import BASE, FeeSchedule, NetworkConfig

    network = NetworkConfig.pinned(BASE, escrow_address="0x…", receipt_signer="0x…", gas_wallet="0x…")

`BASE` and `BASE_SEPOLIA` pin the chain and its USDC (address and EIP-712 domain: Base's USDC is named
"USD Coin", Base Sepolia's "USDC"); the marketplace operator publishes its escrow contract, receipt signer,
gas wallet and fee schedule, and the agent pins those too. On a dev chain (Anvil) the whole configuration can be
read from the marketplace, but only with an explicit `NetworkConfig.from_marketplace(url, trust_server=True)`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import httpx
from eth_utils import to_checksum_address

from sdk.bounded_http import (DEFAULT_DEADLINE_SECONDS, DEFAULT_MAX_ANSWER_BYTES, BoundedHttp, json_answer,
                              require_https)

__all__ = ["BASE", "BASE_SEPOLIA", "Chain", "FeeSchedule", "NetworkConfig", "TokenDomain", "UntrustedConfiguration"]


class UntrustedConfiguration(ValueError):
    """`NetworkConfig.from_marketplace` without `trust_server=True`: the server would be checking itself."""


@dataclass(frozen=True)
class TokenDomain:
    """A token's EIP-712 domain name and version (its EIP-5267 `eip712Domain()`)."""

    name: str
    version: str


@dataclass(frozen=True)
class FeeSchedule:
    """The platform's published fee: max(ceil(amount × percent_bps / 10 000) + fixed, minimum), in base units."""

    percent_bps: int = 200
    fixed_atomic: int = 3_000
    minimum_atomic: int = 100_000

    def fee_for(self, amount_atomic: int) -> int:
        percent = -(-amount_atomic * self.percent_bps // 10_000)  # integer ceiling
        return max(percent + self.fixed_atomic, self.minimum_atomic)


@dataclass(frozen=True)
class Chain:
    """A public network and its USDC, as Circle deploys it."""

    name: str
    chain_id: int
    token_address: str
    token_domain: TokenDomain


BASE = Chain("base", 8453, "0x833589fCD6eDb6E08f4c7C32D4f71b54bdA02913", TokenDomain("USD Coin", "2"))
BASE_SEPOLIA = Chain("base-sepolia", 84532, "0x036CbD53842c5426634e7929541eC2318f3dCF7e", TokenDomain("USDC", "2"))


@dataclass(frozen=True)
class NetworkConfig:
    """Everything the SDK checks a signing request against.

    `token_domain` may be None when the client has an RPC URL: the SDK then reads it from the token contract.
    `gas_wallet` is the platform relayer, the only spender a direct purchase's fee permit may name.
    `escrow_deployment_block` is where reads of the escrow's events start when nothing nearer is known.
    `retired_receipt_signers` are receipt signers the operator rotated out: an escrow activated under one still has
    its receipts signed by it, and `verify_usage` accepts an escrow naming `receipt_signer` or one of these only.
    """

    chain_id: int
    escrow_address: str
    token_address: str
    receipt_signer: str
    gas_wallet: str
    token_domain: TokenDomain | None = None
    fee_schedule: FeeSchedule = field(default_factory=FeeSchedule)
    escrow_deployment_block: int = 0
    retired_receipt_signers: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        for name in ("escrow_address", "token_address", "receipt_signer", "gas_wallet"):
            object.__setattr__(self, name, to_checksum_address(getattr(self, name)))
        if isinstance(self.retired_receipt_signers, str):
            raise TypeError("retired_receipt_signers is a sequence of addresses")
        object.__setattr__(self, "retired_receipt_signers",
                           tuple(to_checksum_address(signer) for signer in self.retired_receipt_signers))

    @property
    def receipt_signers(self) -> tuple[str, ...]:
        """Every receipt signer an escrow may name: the current one, then the retired ones."""
        return (self.receipt_signer, *self.retired_receipt_signers)

    @classmethod
    def pinned(cls, chain: Chain, *, escrow_address: str, receipt_signer: str, gas_wallet: str,
               fee_schedule: FeeSchedule | None = None, escrow_deployment_block: int = 0,
               retired_receipt_signers: tuple[str, ...] = ()) -> NetworkConfig:
        """A marketplace deployment on a pinned public chain (its USDC and domain come from `chain`)."""
        return cls(chain_id=chain.chain_id, escrow_address=escrow_address, token_address=chain.token_address,
                   receipt_signer=receipt_signer, gas_wallet=gas_wallet, token_domain=chain.token_domain,
                   fee_schedule=fee_schedule or FeeSchedule(), escrow_deployment_block=escrow_deployment_block,
                   retired_receipt_signers=tuple(retired_receipt_signers))

    @classmethod
    def from_marketplace(cls, base_url: str, *, trust_server: bool, transport: httpx.BaseTransport | None = None,
                         deadline: float = DEFAULT_DEADLINE_SECONDS,
                         max_answer_bytes: int = DEFAULT_MAX_ANSWER_BYTES,
                         allow_insecure_http: bool = False) -> NetworkConfig:
        """Read the configuration from the marketplace's `GET /network-config`: for dev chains only.

        A compromised marketplace would then choose what the SDK checks against, so this refuses unless the
        caller says `trust_server=True`. The request is bounded as the client's are (`sdk.bounded_http`), and sent
        in plain http to this machine only, unless `allow_insecure_http=True` (`sdk.bounded_http.require_https`)."""
        if trust_server is not True:
            raise UntrustedConfiguration("Reading the configuration from the marketplace trusts the marketplace: "
                                         "pin a NetworkConfig, or pass trust_server=True on a dev chain.")
        require_https(base_url, what="base_url", allow_insecure_http=allow_insecure_http)
        http = BoundedHttp(deadline=deadline, max_answer_bytes=max_answer_bytes, base_url=base_url,
                           transport=transport, timeout=15)
        try:
            response = http.request("GET", "/network-config")
        finally:
            http.close()
        response.raise_for_status()
        return cls.from_dict(json_answer(response))

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> NetworkConfig:
        """From the `GET /network-config` shape."""
        domain = data.get("token_domain")
        schedule = data["fee_schedule"]
        return cls(chain_id=int(data["chain_id"]), escrow_address=data["escrow_address"],
                   token_address=data["token_address"], receipt_signer=data["receipt_signer"],
                   gas_wallet=data["gas_wallet"],
                   token_domain=TokenDomain(domain["name"], domain["version"]) if domain else None,
                   fee_schedule=FeeSchedule(percent_bps=int(schedule["percent_bps"]),
                                            fixed_atomic=int(schedule["fixed_atomic"]),
                                            minimum_atomic=int(schedule["minimum_atomic"])),
                   escrow_deployment_block=int(data.get("escrow_deployment_block", 0)),
                   retired_receipt_signers=tuple(data.get("retired_receipt_signers") or ()))
