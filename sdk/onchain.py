"""Reads from the chain through the buyer's own RPC URL (JSON-RPC over httpx; no web3, no marketplace).

What the buyer checks the marketplace against: the escrow contract's record of an agreement (`getEscrow`), a
token's EIP-712 domain (EIP-5267 `eip712Domain()`, else `name()` / `version()`), and the chain's clock.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Any, cast

import httpx
from eth_abi import decode, encode
from eth_utils import keccak, to_checksum_address

from sdk.networks import TokenDomain

__all__ = ["ChainReader", "OnchainEscrow", "RpcError"]

_ESCROW_FIELDS = ("address", "uint8", "uint64", "address", "uint64", "address", "uint64", "address", "uint64",
                  "uint256", "uint256", "uint256", "uint256", "bytes32", "bytes32", "uint256", "uint256")
_STATES = ("none", "active", "proposed", "disputed", "resolved", "settled", "reclaimed")


def _selector(signature: str) -> bytes:
    return keccak(text=signature)[:4]


class RpcError(RuntimeError):
    """The node answered with an error (a revert, an unknown method)."""


@dataclass(frozen=True)
class OnchainEscrow:
    """`UsageEscrow.getEscrow(id)`, the fields a buyer verifies usage against."""

    state: str
    buyer: str
    seller: str
    receipt_signer: str
    deposit_amount: int
    settled_amount: int  # the proposed cumulative amount once a settlement is proposed
    last_seq: int
    usage_digest: str


class ChainReader:
    """A minimal JSON-RPC client for the reads above."""

    def __init__(self, rpc_url: str, *, timeout: float = 15.0, transport: httpx.BaseTransport | None = None):
        self._http = httpx.Client(timeout=timeout, transport=transport)
        self._url = rpc_url
        self._ids = itertools.count(1)

    def close(self) -> None:
        self._http.close()

    def _rpc(self, method: str, params: list[Any]) -> Any:
        response = self._http.post(self._url, json={"jsonrpc": "2.0", "id": next(self._ids), "method": method,
                                                    "params": params})
        response.raise_for_status()
        answer = response.json()
        if answer.get("error"):
            raise RpcError(f"{method}: {answer['error']}")
        return answer["result"]

    def _call(self, to: str, data: bytes) -> bytes:
        result = self._rpc("eth_call", [{"to": to_checksum_address(to), "data": "0x" + data.hex()}, "latest"])
        return bytes.fromhex(str(result).removeprefix("0x"))

    def chain_id(self) -> int:
        return int(self._rpc("eth_chainId", []), 16)

    def now(self) -> int:
        """The latest block's timestamp: deadlines are checked against block time."""
        return int(self._rpc("eth_getBlockByNumber", ["latest", False])["timestamp"], 16)

    def token_domain(self, token: str) -> TokenDomain:
        try:
            raw = self._call(token, _selector("eip712Domain()"))
            _, name, version, *_ = decode(["bytes1", "string", "string", "uint256", "address", "bytes32",
                                           "uint256[]"], raw)
        except (RpcError, ValueError, TypeError):  # no EIP-5267: the ERC-20 name and EIP-2612 version()
            (name,) = decode(["string"], self._call(token, _selector("name()")))
            (version,) = decode(["string"], self._call(token, _selector("version()")))
        return TokenDomain(cast(str, name), cast(str, version))

    def permit_nonce(self, token: str, owner: str) -> int:
        raw = self._call(token, _selector("nonces(address)") + encode(["address"], [to_checksum_address(owner)]))
        return cast(int, decode(["uint256"], raw)[0])

    def escrow(self, escrow_address: str, agreement_id: str) -> OnchainEscrow:
        call = _selector("getEscrow(bytes32)") + bytes.fromhex(agreement_id.removeprefix("0x"))
        values = decode([f"({','.join(_ESCROW_FIELDS)})"], self._call(escrow_address, call))[0]
        return OnchainEscrow(state=_STATES[values[1]], buyer=to_checksum_address(values[0]),
                             seller=to_checksum_address(values[3]), receipt_signer=to_checksum_address(values[7]),
                             deposit_amount=values[9], settled_amount=values[11], last_seq=values[12],
                             usage_digest="0x" + bytes(values[13]).hex())
