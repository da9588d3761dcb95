"""Reads from the chain through the buyer's own RPC URL (JSON-RPC over httpx; no web3, no marketplace).

What the buyer checks the marketplace against: the escrow contract's record of an agreement (its terms from the
`Activated` event, its state from `getEscrow(id, terms)`, which checks them against the digest the contract
stores; the contract keys escrows by (buyer, agreementId), so only the buyer's own escrow's events are read, never
those of an escrow someone else opened under the same id), a token's EIP-712 domain (EIP-5267 `eip712Domain()`, else `name()` / `version()`), and the chain's clock.

The RPC URL often holds the buyer's API key with its provider (in its path, query or user info): those parts are
taken out of the text of every error a read raises, its causes' too (`redacted`), since an agent logs or shows its
errors, and out of httpx's log record of each request (a filter on the "httpx" logger); the node's host and port
stay, to say which node failed.

Events are read in block spans of at most `log_block_span` blocks (`ChainReader.first_logs`): public RPCs refuse
an `eth_getLogs` over more than a few thousand blocks, and an escrow's history on Base grows without bound.
"""

from __future__ import annotations

import itertools
import logging
import re
from dataclasses import dataclass
from functools import lru_cache
from typing import Any, cast
from urllib.parse import unquote, urlsplit

import httpx
from eth_abi import decode, encode
from eth_abi.exceptions import DecodingError
from eth_utils import keccak, to_checksum_address

from sdk.bounded_http import (DEFAULT_DEADLINE_SECONDS, DEFAULT_MAX_ANSWER_BYTES, BoundedHttp, json_answer,
                              one_line, require_https)
from sdk.networks import TokenDomain

__all__ = ["DEFAULT_LOG_BLOCK_SPAN", "ChainReader", "MalformedAnswer", "OnchainEscrow", "RpcError", "redacted"]

DEFAULT_LOG_BLOCK_SPAN = 2_000  # blocks per eth_getLogs call: within what public Base RPCs serve

_TERMS = "(address,address,address,address,uint256,uint64,uint64,uint256)"
_ACTIVATED = keccak(text="Activated(bytes32,address,address,address,uint256,uint256,address,bytes32,uint64,uint64,"
                         "uint64,uint256)")
_ACTIVATED_DATA = ("address", "uint256", "uint256", "address", "bytes32", "uint64", "uint64", "uint64", "uint256")
_PROPOSED = keccak(text="SettlementProposed(bytes32,address,uint256,uint256,bytes32,uint64)")
_PROPOSED_DATA = ("uint256", "uint256", "bytes32", "uint64")
# EIP-3009's event of an authorization revoked by its authorizer (USDC's, and the dev chain's MockUSDC's).
_AUTHORIZATION_CANCELED = keccak(text="AuthorizationCanceled(address,bytes32)")
_AUTHORIZATION_USED = keccak(text="AuthorizationUsed(address,bytes32)")
# A JSON-RPC quantity: a uint256 at most, in hex (nodes answer lower case; some pad with zeros).
_QUANTITY = re.compile(r"0x[0-9a-fA-F]{1,64}")
_STATES = ("none", "active", "proposed", "disputed", "resolved", "settled", "reclaimed")


def _selector(signature: str) -> bytes:
    return keccak(text=signature)[:4]


class RpcError(RuntimeError):
    """The node answered with an error (a revert, an unknown method)."""


class MalformedAnswer(RpcError):
    """The node's answer is not what the call returns: not a hex number, ABI data that does not decode as the
    function's return type, a string that is not UTF-8. A hostile node chooses it; nothing read from it is used."""


def redacted(text: str, rpc_url: str) -> str:
    """`text` without what `rpc_url` holds beyond its node's address (its path, query and user info, where RPC
    providers put the API key), as given and as httpx writes it in its errors."""
    for secret in _url_secrets(rpc_url):
        text = text.replace(secret, "[redacted]")
    return text


@lru_cache(maxsize=8)
def _url_secrets(url: str) -> tuple[str, ...]:
    """The parts of `url` that may hold a key, the longest first (the path with its query before either alone)."""
    forms = {url}
    try:
        forms.add(str(httpx.URL(url)))  # percent-encoded as httpx puts it in an error's text
    except httpx.InvalidURL:
        pass
    candidates = set()
    for form in forms:
        parts = urlsplit(form)
        path = parts.path if parts.path not in ("", "/") else ""
        candidates |= {f"{path}?{parts.query}" if path and parts.query else "", path, parts.query,
                       parts.password or "", unquote(parts.password or ""), parts.username or "",
                       unquote(parts.username or "")}
    return tuple(sorted(filter(None, candidates), key=len, reverse=True))


class _RpcUrlRedaction(logging.Filter):
    """Takes the secrets of every RPC URL a `ChainReader` was made with out of httpx's log records: httpx logs each
    request's URL whole at INFO ("HTTP Request: POST <url> ..."), and an agent logging at INFO wrote its provider's
    key to its logs with every chain read. Other records pass as they are."""

    def __init__(self) -> None:
        super().__init__()
        self._urls: dict[str, None] = {}  # insertion-ordered set; read while others add (a copy is iterated)

    def add(self, rpc_url: str) -> None:
        if any(_url_secrets(rpc_url)):
            self._urls[rpc_url] = None

    def filter(self, record: logging.LogRecord) -> bool:
        if self._urls:
            message = record.getMessage()
            shown = message
            for url in tuple(self._urls):
                shown = redacted(shown, url)
            if shown != message:
                record.msg, record.args = shown, ()
        return True


_LOG_REDACTION = _RpcUrlRedaction()
logging.getLogger("httpx").addFilter(_LOG_REDACTION)


def _redact_error(error: BaseException | None, rpc_url: str) -> None:
    """Take `rpc_url`'s secrets out of `error`'s text and out of its causes' (a traceback shows them all)."""
    seen: set[int] = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        error.args = tuple(redacted(arg, rpc_url) if isinstance(arg, str) else arg for arg in error.args)
        error = error.__cause__ or error.__context__


@dataclass(frozen=True)
class OnchainEscrow:
    """`UsageEscrow.getEscrow(id, terms)` of the buyer's escrow, the fields a buyer verifies usage against."""

    state: str
    buyer: str
    seller: str
    receipt_signer: str
    deposit_amount: int
    # The proposed cumulative amount once a settlement is proposed; the arbiter's once resolved; 0 once a dispute the
    # arbiter did not resolve by its timeout (the contract's DISPUTE_TIMEOUT) is settled, the buyer refunded whole.
    settled_amount: int
    last_seq: int
    usage_digest: str
    # The last proposal's cumulative amount (its SettlementProposed event), which an arbiter's resolution leaves as
    # it was; None when nothing was proposed (or not read).
    proposed_amount: int | None = None
    # The `termsHash` of its Activated event: the terms the buyer signed (`sdk.terms.terms_hash`).
    terms_hash: str = "0x" + "00" * 32
    # `getEscrow`'s challengeDeadline: while proposed, the end of the challenge window (0 before any proposal).
    challenge_deadline: int = 0
    # The Activated event's challengeWindow (which getEscrow's terms check): a proposal opens the window that long.
    challenge_window: int = 0


class ChainReader:
    """A minimal JSON-RPC client for the reads above; `log_block_span` bounds each `eth_getLogs` call's blocks,
    `deadline` and `max_answer_bytes` each call and its answer (`sdk.bounded_http`). `rpc_url` is https, or plain
    http to this machine, unless `allow_insecure_http=True` (`sdk.bounded_http.require_https`): in clear, a node's
    answers (the token's nonces and domain, the chain's clock, the escrow's record) are anyone's to rewrite."""

    def __init__(self, rpc_url: str, *, timeout: float = 15.0, transport: httpx.BaseTransport | None = None,
                 log_block_span: int = DEFAULT_LOG_BLOCK_SPAN, deadline: float = DEFAULT_DEADLINE_SECONDS,
                 max_answer_bytes: int = DEFAULT_MAX_ANSWER_BYTES, allow_insecure_http: bool = False):
        require_https(rpc_url, what="rpc_url", allow_insecure_http=allow_insecure_http)
        if log_block_span < 1:
            raise ValueError("log_block_span must be at least 1 block")
        self._http = BoundedHttp(deadline=deadline, max_answer_bytes=max_answer_bytes, timeout=timeout,
                                 transport=transport)
        self._url = rpc_url
        _LOG_REDACTION.add(rpc_url)
        self._ids = itertools.count(1)
        self._log_block_span = log_block_span

    def close(self) -> None:
        self._http.close()

    def _rpc(self, method: str, params: list[Any]) -> Any:
        try:
            response = self._http.request("POST", self._url, json={"jsonrpc": "2.0", "id": next(self._ids),
                                                                    "method": method, "params": params})
            response.raise_for_status()
            answer = json_answer(response)
            if not isinstance(answer, dict):
                raise MalformedAnswer(f"{method}: not a JSON-RPC answer: {str(answer)[:100]!r}")
            if answer.get("error"):
                raise RpcError(f"{method}: {one_line(str(answer['error']))}")  # the node's text, into logs
            if "result" not in answer:
                raise MalformedAnswer(f"{method}: an answer with neither a result nor an error")
            return answer["result"]
        except Exception as error:
            _redact_error(error, self._url)
            raise

    def _call(self, to: str, data: bytes) -> bytes:
        result = self._rpc("eth_call", [{"to": to_checksum_address(to), "data": "0x" + data.hex()}, "latest"])
        try:
            return bytes.fromhex(str(result).removeprefix("0x"))
        except ValueError:
            raise MalformedAnswer(f"eth_call: not hex data: {str(result)[:100]!r}") from None

    def _quantity(self, method: str, value: Any) -> int:
        """A JSON-RPC quantity the node answered `method` with: "0x" and at most 64 ASCII hex digits. int(x, 16)
        alone read a decimal "2105" as 0x2105, and took a sign, underscores, spaces and other scripts' digits."""
        if not isinstance(value, str) or not _QUANTITY.fullmatch(value):
            raise MalformedAnswer(f"{method}: not a hex number: {str(value)[:100]!r}")
        return int(value, 16)

    def chain_id(self) -> int:
        return self._quantity("eth_chainId", self._rpc("eth_chainId", []))

    def block_number(self) -> int:
        return self._quantity("eth_blockNumber", self._rpc("eth_blockNumber", []))

    def transaction_block(self, tx_hash: str) -> int | None:
        """The block a transaction was mined in; None when the node knows no such mined transaction."""
        receipt = self._rpc("eth_getTransactionReceipt", [tx_hash])
        if not receipt or not isinstance(receipt, dict) or not receipt.get("blockNumber"):
            return None
        return self._quantity("eth_getTransactionReceipt", receipt["blockNumber"])

    def authorization_cancelled(self, tx_hash: str, *, token: str, authorizer: str, nonce: str) -> bool:
        """Whether the transaction `tx_hash` is mined, succeeded, and revoked `authorizer`'s EIP-3009 authorization
        `nonce` on `token` (the token's own AuthorizationCanceled log of them). False when the node knows no such
        transaction."""
        return self._authorization_logged(tx_hash, _AUTHORIZATION_CANCELED, token=token, authorizer=authorizer,
                                          nonce=nonce)

    def authorization_used(self, tx_hash: str, *, token: str, authorizer: str, nonce: str) -> bool:
        """Whether the transaction `tx_hash` is mined, succeeded, and used `authorizer`'s EIP-3009 authorization
        `nonce` on `token` (the token's own AuthorizationUsed log of them). False when the node knows no such
        transaction."""
        return self._authorization_logged(tx_hash, _AUTHORIZATION_USED, token=token, authorizer=authorizer,
                                          nonce=nonce)

    def _authorization_logged(self, tx_hash: str, event: bytes, *, token: str, authorizer: str, nonce: str) -> bool:
        receipt = self._rpc("eth_getTransactionReceipt", [tx_hash])
        if receipt is None:
            return False
        logs = receipt.get("logs") if isinstance(receipt, dict) else None
        if not isinstance(logs, list):
            raise MalformedAnswer(f"eth_getTransactionReceipt: not a receipt: {str(receipt)[:100]!r}")
        if receipt.get("status") != "0x1" or not receipt.get("blockNumber"):
            return False
        wanted = ["0x" + event.hex(), "0x" + authorizer.lower().removeprefix("0x").rjust(64, "0"),
                  nonce.lower()]
        return any(isinstance(log, dict) and str(log.get("address")).lower() == token.lower()
                   and isinstance(log.get("topics"), list) and [str(topic).lower() for topic in log["topics"]] == wanted
                   for log in logs)

    def now(self) -> int:
        """The latest block's timestamp: deadlines are checked against block time."""
        block = self._rpc("eth_getBlockByNumber", ["latest", False])
        return self._quantity("eth_getBlockByNumber", block.get("timestamp") if isinstance(block, dict) else None)

    def token_domain(self, token: str) -> TokenDomain:
        """The token's EIP-712 domain name and version. An answer that does not decode (a name that is not UTF-8,
        too few bytes) raises `MalformedAnswer`: they name the domain of every permit and authorization signed."""
        try:
            raw = self._call(token, _selector("eip712Domain()"))
            _, name, version, *_ = decode(["bytes1", "string", "string", "uint256", "address", "bytes32",
                                           "uint256[]"], raw)
        except (RpcError, DecodingError, ValueError, TypeError):  # no EIP-5267: the ERC-20 name, EIP-2612 version()
            try:
                (name,) = decode(["string"], self._call(token, _selector("name()")))
                (version,) = decode(["string"], self._call(token, _selector("version()")))
            except (DecodingError, ValueError, TypeError) as undecodable:  # UnicodeDecodeError is a ValueError
                raise MalformedAnswer(f"the token's name() or version() is not a UTF-8 string: {undecodable}"
                                      ) from undecodable
        return TokenDomain(cast(str, name), cast(str, version))

    def permit_nonce(self, token: str, owner: str) -> int:
        raw = self._call(token, _selector("nonces(address)") + encode(["address"], [to_checksum_address(owner)]))
        try:
            return cast(int, decode(["uint256"], raw)[0])
        except DecodingError as undecodable:
            raise MalformedAnswer(f"the token's nonces(owner) is not a uint256: {undecodable}") from undecodable

    def first_logs(self, address: str, topics: list[str], *, from_block: int, to_block: int,
                   newest_first: bool = False) -> list[dict[str, Any]]:
        """The contract's logs matching `topics` in [from_block, to_block], asked for in spans of at most
        `log_block_span` blocks from the oldest span on (from the newest with `newest_first`), up to the first span
        that holds any: that span's logs, oldest first. Empty when none does."""
        spans = range(from_block, to_block + 1, self._log_block_span)
        for start in reversed(spans) if newest_first else spans:
            found = self._rpc("eth_getLogs", [{
                "address": to_checksum_address(address), "topics": topics,
                "fromBlock": hex(start), "toBlock": hex(min(start + self._log_block_span - 1, to_block))}])
            if found:
                return cast(list[dict[str, Any]], found)
        return []

    @staticmethod
    def _data(log: dict[str, Any]) -> bytes:
        return bytes.fromhex(str(log["data"]).removeprefix("0x"))

    def escrow(self, escrow_address: str, agreement_id: str, *, buyer: str, from_block: int = 0) -> OnchainEscrow:
        """The record of `buyer`'s escrow under `agreement_id` (escrows are keyed by buyer and id: anyone may open
        one of their own under an agreement's id, and it is not the agreement's). Its Activated event is looked for
        from `from_block` on (the escrow's deployment block, or the agreement's activation block when known): a
        later block finds nothing, and the escrow reads as never activated."""
        latest = self.block_number()
        topics = ["0x" + agreement_id.removeprefix("0x").lower(),  # then the buyer, as an indexed address
                  "0x" + to_checksum_address(buyer)[2:].lower().rjust(64, "0")]
        activated = self.first_logs(escrow_address, ["0x" + _ACTIVATED.hex(), *topics],
                                    from_block=from_block, to_block=latest)
        if not activated:
            zero = "0x" + "00" * 20
            return OnchainEscrow(state="none", buyer=zero, seller=zero, receipt_signer=zero, deposit_amount=0,
                                 settled_amount=0, last_seq=0, usage_digest="0x" + "00" * 32)
        try:  # the node's logs and return data, of any shape: what does not decode is a MalformedAnswer
            log = activated[0]  # a buyer activates an id once
            buyer, seller = (to_checksum_address("0x" + str(topic)[-40:]) for topic in log["topics"][2:4])
            token, deposit, _fee, signer, terms_hash, _expires, reclaim_after, window, nonce = decode(
                list(_ACTIVATED_DATA), self._data(log))
            terms = (buyer, seller, token, signer, deposit, window, reclaim_after, nonce)
            call = _selector(f"getEscrow(bytes32,{_TERMS})") + encode(
                ["bytes32", _TERMS], [bytes.fromhex(agreement_id.removeprefix("0x")), terms])
            state, challenge_deadline, last_seq, settled, _buyer_claim, _seller_claim = decode(
                ["(uint8,uint64,uint256,uint256,uint256,uint256)"], self._call(escrow_address, call))[0]
            state_name = _STATES[state]
            # The last proposal (a later one with a higher seq replaces it): searched from the newest span back.
            proposals = self.first_logs(escrow_address, ["0x" + _PROPOSED.hex(), *topics],
                                        from_block=self._quantity("eth_getLogs", log.get("blockNumber")),
                                        to_block=latest,
                                        newest_first=True) if state > 1 else []
            proposed_amount, usage_digest = None, bytes(32)
            if proposals:
                _seq, proposed_amount, usage_digest, _deadline = decode(list(_PROPOSED_DATA),
                                                                        self._data(proposals[-1]))
        except (KeyError, IndexError, TypeError, ValueError, AttributeError, DecodingError) as undecodable:
            raise MalformedAnswer(f"the escrow's Activated or SettlementProposed log, or getEscrow, does not decode: "
                                  f"{str(undecodable)[:200]}") from None
        return OnchainEscrow(state=state_name, buyer=buyer, seller=seller,
                             receipt_signer=to_checksum_address(signer), deposit_amount=deposit,
                             settled_amount=settled, last_seq=last_seq, usage_digest="0x" + bytes(usage_digest).hex(),
                             proposed_amount=proposed_amount, terms_hash="0x" + bytes(terms_hash).hex(),
                             challenge_deadline=challenge_deadline, challenge_window=window)
