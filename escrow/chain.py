"""The chain gateway: the only module that builds a web3 client, loads contracts and talks JSON-RPC.

Node errors are mapped to typed exceptions in one table (`_ERROR_PATTERNS`), so callers decide on meaning
("this nonce is used", "the node already has it", "the RPC is down") rather than on message strings.
"""

import json
import socket
import time
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from functools import cache, lru_cache
from typing import Any

import requests
from django.conf import settings
from eth_account import Account
from eth_utils import to_checksum_address
from requests.adapters import HTTPAdapter
from urllib3 import HTTPConnectionPool, HTTPSConnectionPool
from urllib3.connection import HTTPConnection, HTTPSConnection
from urllib3.exceptions import ConnectTimeoutError, NewConnectionError
from urllib3.util import connection
from web3 import Web3
from web3._utils.http_session_manager import HTTPSessionManager
from web3.contract import Contract
from web3.exceptions import (
    BlockNotFound,
    ContractCustomError,
    ContractLogicError,
    TransactionNotFound,
    Web3RPCError,
)
from web3.providers.rpc.utils import ExceptionRetryConfiguration
from web3.types import RPCEndpoint

from escrow import artifacts
from marketplace import bounded_json, chainconfig
from marketplace.concurrency import Deadlines
from marketplace.errors import DependencyUnavailable
from sdk import onchain
from sdk.name_resolution import BoundedResolver


class ChainError(Exception):
    """Anything the chain or the node refused."""


class RpcUnavailable(ChainError):
    """The node timed out or answered 429 / 5xx (after the per-call retries): retry later, nothing was decided."""


class UntrustedAnswer(RpcUnavailable):
    """The node answered something other than what was asked (logs of other blocks or contracts, logs marked
    removed, a receipt of another transaction): nothing of it is used, as if it had not answered."""


class WrongChain(ChainError):
    """The node at CHAIN_RPC_URL is of another chain than CHAIN_ID: nothing it says is about this one."""


class LogQueryTooLarge(ChainError):
    """The node refused an eth_getLogs as over its cap: too many blocks, or too many logs or bytes in its answer
    (a smaller range may be answered)."""


class RpcUnreachable(RpcUnavailable):
    """Nothing answers at CHAIN_RPC_URL (connection refused): every other call would fail the same way."""


class NonceTooLow(ChainError):
    """The nonce is already used on-chain: look for a receipt of our hashes rather than send again."""


class AlreadyKnown(ChainError):
    """The node already has this exact transaction in its mempool: not an error for us."""


class ReplacementUnderpriced(ChainError):
    """A transaction with this nonce is pending at higher fees: bump more."""


class InsufficientFunds(ChainError):
    """The relayer cannot pay for gas: an operator must top it up."""


class Reverted(ChainError):
    """Execution reverts; `reason` is the decoded custom error or revert string."""

    def __init__(self, reason: str):
        self.reason = reason
        super().__init__(reason)


def unavailable() -> DependencyUnavailable:
    """What a caller is answered when a chain read its request needs fails: 503 `chain_unavailable`."""
    return DependencyUnavailable("The chain RPC is unavailable.", code="chain_unavailable")


@contextmanager
def unavailable_as_503(errors: type[ChainError] = ChainError) -> Iterator[None]:
    """Chain reads on a caller's request: `errors` raised inside (any ChainError unless narrowed) become
    `unavailable()`. A decorator too."""
    try:
        yield
    except errors as error:
        raise unavailable() from error


# Each client words its refusals its own way (matched lowercased): geth's, which reth, op-geth (Base's sequencer),
# Alchemy and Infura answer too, then the others'. One read as an unknown error was recorded refused: a transaction
# the node holds waited the rebroadcast delay, a wallet that cannot pay its gas was bid up round after round, a tip
# below the provider's minimum was raised 12.5% a round until stuck at the fee cap.
_ERROR_PATTERNS: list[tuple[str, type[ChainError]]] = [
    ("nonce too low", NonceTooLow),  # geth, reth ("nonce too low: next nonce ..."), Besu ("Nonce too low")
    ("nonce has already been used", NonceTooLow),
    ("oldnonce", NonceTooLow),  # Nethermind
    ("already known", AlreadyKnown),
    ("known transaction", AlreadyKnown),  # Besu
    ("alreadyknown", AlreadyKnown),  # Nethermind
    ("already imported", AlreadyKnown),  # Anvil's, OpenEthereum's
    ("with same hash", AlreadyKnown),  # Erigon's pool ("existing tx with same hash")
    ("replacement transaction underpriced", ReplacementUnderpriced),
    # A tip below the node's minimum, not a replacement (`relayer._tip_refused`): geth's "transaction underpriced",
    # Erigon's pool "underpriced", Besu's and Nethermind's words.
    ("underpriced", ReplacementUnderpriced),
    ("gas price below configured minimum", ReplacementUnderpriced),
    ("feetoolow", ReplacementUnderpriced),
    ("insufficient funds", InsufficientFunds),
    ("insufficientfunds", InsufficientFunds),  # Nethermind
    ("upfront cost exceeds account balance", InsufficientFunds),  # Besu
]


@cache
def _error_selectors() -> dict[str, str]:
    """4-byte selector -> custom error name, for every error in our contracts' ABIs."""
    selectors = {}
    for name in artifacts.CONTRACT_NAMES:
        for item in artifacts.abi(name):
            if item["type"] == "error":
                signature = f"{item['name']}({','.join(i['type'] for i in item['inputs'])})"
                selectors["0x" + Web3.keccak(text=signature)[:4].hex().removeprefix("0x")] = item["name"]
    return selectors


def decode_revert(data: Any) -> str:
    if isinstance(data, str) and data.startswith("0x") and len(data) >= 10:
        return _error_selectors().get(data[:10].lower(), f"custom error {data[:10]}")
    return str(data)


def classify(exc: Exception) -> ChainError:
    """Map anything web3 or the transport raised to one of our typed errors, with the node URL's secrets out of its
    text (`redacted`)."""
    if isinstance(exc, ChainError):
        return exc
    error = _classified(exc)
    error.args = tuple(redacted(arg) if isinstance(arg, str) else arg for arg in error.args)
    return error


def redacted(text: str) -> str:
    """`text` without what CHAIN_RPC_URL holds beyond its node's address: RPC providers put their API key in the
    path, the query or the user info, and an error's text (urllib3's "Max retries exceeded with url: /v2/<key>")
    reaches the logs, the admin's dashboard and reconcile's output. The SDK's rule, which takes the buyer's key out
    of its own errors."""
    return onchain.redacted(text, settings.CHAIN_RPC_URL)


def _classified(exc: Exception) -> ChainError:
    if isinstance(exc, requests.Timeout | TimeoutError):
        return RpcUnavailable(str(exc))
    if isinstance(exc, requests.ConnectionError | ConnectionError):
        return RpcUnreachable(str(exc))
    if isinstance(exc, requests.HTTPError) and exc.response is not None and (
            exc.response.status_code == 429 or exc.response.status_code >= 500):
        return RpcUnavailable(f"HTTP {exc.response.status_code} from the RPC")
    if isinstance(exc, ContractCustomError):
        return Reverted(decode_revert(exc.data))
    if isinstance(exc, ContractLogicError):
        return Reverted(exc.message or str(exc))
    message = str(exc).lower()
    for pattern, error in _ERROR_PATTERNS:
        if pattern in message:
            return error(str(exc))
    if isinstance(exc, Web3RPCError):
        return ChainError(str(exc))
    return ChainError(f"{type(exc).__name__}: {exc}")


class NodeAnswerTooLarge(ValueError):
    """A node's answer beyond CHAIN_RPC_MAX_ANSWER_BYTES (not retried: it would be as large again)."""


# When the RPC try under way must be done (time.monotonic()): connected and its answer's head and body read by then.
_try_due: ContextVar[float | None] = ContextVar("chain_try_due", default=None)
# A watchdog of the kind that bounds the metered proxy's upstream answers (marketplace.concurrency.Deadlines): one
# thread per process.
_TRY_READS = Deadlines("chain RPC try")


def _try_left() -> float:
    due = _try_due.get()
    if due is None:
        raise RuntimeError("A chain node is called inside `_BoundedSessionManager.make_post_request`.")
    return due - time.monotonic()


class _ReadsByDeadline:
    """A urllib3 connection whose reads of many lines end by `_try_due` in all, cut off (TimeoutError, which requests
    raises as its ReadTimeout) past it: the answer's head (status line and headers), and an HTTP proxy's answer to
    CONNECT. http.client reads each a line at a time, each read bounded by the timeout only, so a node or proxy
    dribbling it a byte at a time passed them all. (Connecting to a node or an HTTP proxy is one operation under the
    timeout, the ssl module bounds a TLS handshake in all, and a SOCKS proxy's handshake is `_NodeSOCKSConnection`'s.)"""

    sock: Any

    def getresponse(self):
        with _TRY_READS.bound(self.sock, _try_left()):
            return super().getresponse()  # type: ignore[misc]

    def _tunnel(self) -> None:
        with _TRY_READS.bound(self.sock, _try_left()):
            super()._tunnel()  # type: ignore[misc]


# The node's name and its proxy's: a few, apart from the names sellers choose (marketplace.outbound.RESOLVER), so that
# theirs cannot take the threads these resolve on.
_RESOLVER = BoundedResolver(threads=4, name="chain-rpc")


class _ResolvesByDeadline:
    """A urllib3 connection resolving the host it connects to (the node, or its proxy) by `_try_due` too: the system
    resolver has no timeout, and a name whose DNS server never answers held the caller for as long as the resolver
    kept asking."""

    timeout: Any

    def _addresses(self, host: str, port: int, family: int) -> list:
        try:
            return _RESOLVER.getaddrinfo(host, port, family, socket.SOCK_STREAM, timeout=_try_left())
        except TimeoutError as error:
            raise ConnectTimeoutError(self, f"Connecting to {host}: {error}") from error
        except (OSError, UnicodeError) as error:  # not resolved (socket.gaierror), or the resolver's threads all taken
            raise NewConnectionError(self, f"Failed to resolve {host}: {error}") from error


class _NodeHTTPConnection(_ResolvesByDeadline, _ReadsByDeadline, HTTPConnection):
    def _new_conn(self) -> socket.socket:
        """urllib3's, connecting to each address resolved by the try's deadline in turn (as it does)."""
        host = self._dns_host.strip("[]")  # type: ignore[attr-defined]
        failure: OSError = OSError(f"{host} resolves to no address")
        for *_, address in self._addresses(host, self.port, connection.allowed_gai_family()):
            try:
                return connection.create_connection((address[0], self.port), self.timeout,
                                                    source_address=self.source_address,
                                                    socket_options=self.socket_options)
            except TimeoutError as error:
                raise ConnectTimeoutError(self, f"Connection to {self.host} timed out. "
                                                f"(connect timeout={self.timeout})") from error
            except OSError as error:
                failure = error
        raise NewConnectionError(self, f"Failed to establish a new connection: {failure}") from failure


class _NodeHTTPSConnection(_NodeHTTPConnection, HTTPSConnection):
    pass


class _NodeHTTPPool(HTTPConnectionPool):
    ConnectionCls = _NodeHTTPConnection


class _NodeHTTPSPool(HTTPSConnectionPool):
    ConnectionCls = _NodeHTTPSConnection


_NODE_POOLS = {"http": _NodeHTTPPool, "https": _NodeHTTPSPool}


class _NodeSOCKSConnection(_ResolvesByDeadline, _ReadsByDeadline, HTTPConnection):
    """urllib3's SOCKSConnection (urllib3.contrib.socks), its handshake with the proxy ending by `_try_due` too: the
    proxy's reply is up to 262 bytes, which PySocks reads in many reads, each bounded by the timeout only."""

    def __init__(self, _socks_options: dict, *args, **kwargs):
        self._socks_options = _socks_options
        super().__init__(*args, **kwargs)

    def _new_conn(self) -> socket.socket:
        # Here, not at the top: PySocks is installed where a SOCKS proxy is used (requests refuses one without it,
        # InvalidSchema, before any connection); the project does not depend on it.
        import socks

        options = self._socks_options
        proxy_host = (options["proxy_host"] or "").strip("[]")
        failure: Exception = OSError(f"{proxy_host} resolves to no address")
        addresses = self._addresses(proxy_host, options["proxy_port"], 0)
        destination = self.host.strip("[]")
        if not options["rdns"]:  # socks5://, socks4://: PySocks would resolve the node's name itself, unbounded
            destination = self._addresses(destination, self.port, 0)[0][4][0]
        for family, kind, protocol, _, address in addresses:  # each of the proxy's addresses in turn, as PySocks does
            sock = socks.socksocket(family, kind, protocol)
            for option in self.socket_options or ():
                sock.setsockopt(*option)
            sock.settimeout(self.timeout)
            # The address, not the name: PySocks would resolve it again, in C, without a timeout.
            sock.set_proxy(options["socks_version"], address[0], options["proxy_port"], options["rdns"],
                           options["username"], options["password"])
            try:
                if self.source_address:
                    sock.bind(self.source_address)
                with _TRY_READS.bound(sock, _try_left()):
                    sock.connect((destination, self.port))
                return sock
            except OSError as error:  # PySocks' ProxyError is one too, its socket's error in `socket_err`
                sock.close()
                if isinstance(error, TimeoutError) or isinstance(getattr(error, "socket_err", None), TimeoutError):
                    # The try's deadline or one read's timeout: no time left for another address.
                    raise ConnectTimeoutError(self, f"Connecting to {self.host} through the SOCKS proxy: {error}") \
                        from error
                failure = error
        raise NewConnectionError(self, f"Failed to establish a new connection: {failure}") from failure


class _NodeSOCKSHTTPSConnection(_NodeSOCKSConnection, HTTPSConnection):
    pass


class _NodeSOCKSHTTPPool(HTTPConnectionPool):
    ConnectionCls = _NodeSOCKSConnection


class _NodeSOCKSHTTPSPool(HTTPSConnectionPool):
    ConnectionCls = _NodeSOCKSHTTPSConnection


_NODE_SOCKS_POOLS = {"http": _NodeSOCKSHTTPPool, "https": _NodeSOCKSHTTPSPool}


class _NodeAdapter(HTTPAdapter):
    """requests' adapter, its connections reading by the try's deadline (`_ReadsByDeadline`), directly or through
    the proxy the environment names (HTTP_PROXY, HTTPS_PROXY, ALL_PROXY; a SOCKS one too): each proxy gets a manager
    of its own, whose pools would otherwise be urllib3's."""

    def init_poolmanager(self, *args, **kwargs) -> None:
        super().init_poolmanager(*args, **kwargs)
        self.poolmanager.pool_classes_by_scheme = _NODE_POOLS

    def proxy_manager_for(self, proxy, **proxy_kwargs):
        manager = super().proxy_manager_for(proxy, **proxy_kwargs)
        manager.pool_classes_by_scheme = _NODE_SOCKS_POOLS if proxy.lower().startswith("socks") else _NODE_POOLS
        return manager


class _BoundedSessionManager(HTTPSessionManager):
    """Reads a node's answer up to `max_bytes` and within the RPC timeout in all, counted from the try's start: its
    head (and a proxy's handshake) by a watchdog (`_ReadsByDeadline`), its body between reads (give or take the read
    under way). requests' timeout bounds each read only, so an answer dribbled a byte at a time, or an endless one,
    would hold the caller and its memory. Each retry is a try of its own."""

    def __init__(self, max_bytes: int):
        super().__init__()
        self.max_bytes = max_bytes

    def cache_and_return_session(self, endpoint_uri, session=None, request_timeout=None) -> requests.Session:
        session = super().cache_and_return_session(endpoint_uri, session, request_timeout)
        if not isinstance(session.get_adapter(endpoint_uri), _NodeAdapter):  # a thread's new session
            for scheme in ("http://", "https://"):
                session.mount(scheme, _NodeAdapter())
        return session

    def make_post_request(self, endpoint_uri, data, **kwargs) -> bytes:
        due = time.monotonic() + kwargs["timeout"]
        token = _try_due.set(due)
        try:
            with self.get_response_from_post_request(endpoint_uri, data=data, stream=True, **kwargs) as response:
                response.raise_for_status()
                body = bytearray()
                # read1: what one read of the socket gave (iter_content's reads wait for a whole chunk, each read
                # bounded by the timeout), decompressed up to that much.
                while chunk := response.raw.read1(64 * 1024, decode_content=True):
                    body += chunk
                    if len(body) > self.max_bytes:
                        raise NodeAnswerTooLarge(f"The node's answer is larger than {self.max_bytes} bytes.")
                    if time.monotonic() > due:
                        raise requests.Timeout(f"The node's answer took longer than {kwargs['timeout']} s in all.")
                return bytes(body)
        finally:
            _try_due.reset(token)


class _BoundedProvider(Web3.HTTPProvider):
    """A node's answer is hostile input like any other: bounded in size and time (`_BoundedSessionManager`), and
    parsed like every other JSON the platform reads (marketplace.bounded_json). Its chain id is believed for
    CHAIN_ID_RECHECK_SECONDS: asked before every call web3 validates (eth_call, estimates), it was 22 of the ~55
    round trips of two activations; believed for the process's life, a provider moved to another network mid-run
    (its endpoint edited, a DNS or load balancer change) had that chain's blocks read as this one's."""

    def __init__(self, rpc_url: str, *, max_bytes: int, **kwargs):
        super().__init__(rpc_url, **kwargs)
        self._request_session_manager = _BoundedSessionManager(max_bytes)
        self._chain_id_answer: tuple[Any, float] | None = None  # (the node's answer, when: time.monotonic())

    def make_request(self, method: RPCEndpoint, params: Any):
        if method != "eth_chainId":
            return super().make_request(method, params)
        believed = self._chain_id_answer
        if believed is not None and time.monotonic() - believed[1] < settings.CHAIN_ID_RECHECK_SECONDS:
            return believed[0]
        answer = super().make_request(method, params)
        if isinstance(answer, dict) and "result" in answer and "error" not in answer:
            self._chain_id_answer = (answer, time.monotonic())
        return answer

    @staticmethod
    def decode_rpc_response(raw_response: bytes):
        return bounded_json.loads(raw_response, nul_allowed=True)


@cache
def _client(rpc_url: str, timeout: float, retries: int, backoff: float, max_bytes: int) -> Web3:
    # Transient failures (timeouts, 429, 5xx, a dropped connection) are retried per call with exponential backoff
    # (backoff, 2x, 4x ...); what is left after that is classified above and handled per transaction. web3 counts
    # tries, the first included (with 0 it made none and answered None).
    transient = ExceptionRetryConfiguration(errors=(requests.ConnectionError, requests.HTTPError, requests.Timeout),
                                            retries=retries + 1, backoff_factor=backoff)
    # The node's chain id is believed for a while (`_BoundedProvider.make_request`), not asked before every call.
    return Web3(_BoundedProvider(rpc_url, max_bytes=max_bytes, request_kwargs={"timeout": timeout},
                                 exception_retry_configuration=transient))


def w3() -> Web3:
    return _client(settings.CHAIN_RPC_URL, settings.CHAIN_RPC_TIMEOUT, settings.CHAIN_RPC_RETRIES,
                   settings.CHAIN_RPC_RETRY_BACKOFF, settings.CHAIN_RPC_MAX_ANSWER_BYTES)


def escrow_address() -> str:
    return chainconfig.escrow_address()


def token_address() -> str:
    return chainconfig.usdc_address()


@lru_cache(maxsize=64)  # the configured escrow and token, on a client or two: bounded all the same
def _contract(client: Web3, address: str, artifact: str) -> Contract:
    # Built once per client, address and ABI: web3 makes a class of each contract from its ABI, 5-7 ms of CPU.
    return client.eth.contract(address=address, abi=artifacts.abi(artifact))


def escrow_contract() -> Contract:
    return _contract(w3(), to_checksum_address(escrow_address()), artifacts.USAGE_ESCROW)


def token_contract(address: str | None = None) -> Contract:
    return _contract(w3(), to_checksum_address(address or token_address()), artifacts.MOCK_USDC)


@cache
def _token_domain(rpc_url: str, chain_id: int, address: str) -> tuple[str, str]:
    token = token_contract(address)
    try:
        _, name, version, *_ = call(token.functions.eip712Domain().call)
    except RpcUnavailable:
        raise
    except ChainError:  # a token without EIP-5267 (Circle's FiatToken)
        name, version = call(token.functions.name().call), call(token.functions.version().call)
    return name, version


def token_domain(address: str | None = None) -> tuple[str, str]:
    """The token's EIP-712 domain (name, version), read from the token: EIP-5267 `eip712Domain()`, else
    `name()` / `version()`. Never hard-coded: Base's USDC is "USD Coin", Base Sepolia's "USDC". Cached per chain
    and token."""
    return _token_domain(settings.CHAIN_RPC_URL, settings.CHAIN_ID, to_checksum_address(address or token_address()))


@cache
def _has_dispute_timeout(rpc_url: str, chain_id: int, address: str) -> bool:
    try:
        call(_contract(w3(), address, artifacts.USAGE_ESCROW).functions.DISPUTE_TIMEOUT().call)
    except Reverted:  # a deployment from before the timeout (no such function): disputes wait for the arbiter
        return False
    # Any other error (a node's) raises, never cached: taken for "no timeout", the process kept that answer.
    return True


def escrow_has_dispute_timeout(address: str | None = None) -> bool:
    """Whether the escrow deployment has `DISPUTE_TIMEOUT` (a contract is immutable: one deployed before it keeps a
    Disputed escrow's `challengeDeadline` at its window's end, and neither times out nor refuses `resolve`). Cached
    per chain and address."""
    return _has_dispute_timeout(settings.CHAIN_RPC_URL, settings.CHAIN_ID,
                                to_checksum_address(address or escrow_address()))


def call(fn) -> Any:
    """A contract read, with errors mapped."""
    try:
        return fn()
    except Exception as exc:  # noqa: BLE001 - mapped to a typed error right here
        raise classify(exc) from exc


# --- transactions --------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Fees:
    max_fee_per_gas: int
    max_priority_fee_per_gas: int

    def bumped(self, percent: int, cap: int) -> "Fees":
        """Both fees raised by at least `percent` (nodes require >= 10%, we use 12.5), capped."""
        def bump(value):
            return min(cap, value * (100 + percent) // 100 + 1)
        return Fees(bump(self.max_fee_per_gas), bump(self.max_priority_fee_per_gas))


def current_fees() -> Fees:
    client = w3()
    try:
        base = client.eth.get_block("latest").get("baseFeePerGas")
        tip = client.eth.max_priority_fee
    except Exception as exc:  # noqa: BLE001
        raise classify(exc) from exc
    if not (isinstance(base, int) and base >= 0 and isinstance(tip, int) and tip >= 0):
        # Signed with fees no transaction can have (eth_account's error, no chain error), or not at all (KeyError).
        raise UntrustedAnswer(f"the node answered a base fee of {base!r:.80} and a priority fee of {tip!r:.80}")
    tip = min(max(tip, settings.CHAIN_MIN_PRIORITY_FEE), settings.CHAIN_MAX_PRIORITY_FEE_PER_GAS)
    max_fee = min(2 * base + tip, settings.CHAIN_MAX_FEE_PER_GAS)
    # A tip above the max fee is no transaction a node accepts: a suggested tip past the cap is capped with it.
    return Fees(max_fee_per_gas=max_fee, max_priority_fee_per_gas=min(tip, max_fee))


def relayer_account():
    return Account.from_key(settings.RELAYER_PRIVATE_KEY)


def balance_wei(address: str) -> int:
    return call(lambda: w3().eth.get_balance(to_checksum_address(address)))


def pending_nonce(address: str) -> int:
    return nonce_at(address, "pending")


def nonce_at(address: str, block: int | str) -> int:
    """How many transactions of `address` the chain holds at `block` (a number, "latest" or "pending")."""
    try:
        return w3().eth.get_transaction_count(to_checksum_address(address), block)
    except Exception as exc:  # noqa: BLE001
        raise classify(exc) from exc


def nonce_taken_by(address: str, nonce: int, *, used_at: int) -> str | None:
    """The hash of the transaction that took `address`'s `nonce`, which the chain holds used at block `used_at`:
    the block that took it is found from the nonces at blocks before `used_at` (back in doubling steps, then
    halving), and the transaction read from that block. None when the node cannot show it (it does not have that
    block yet: a backend behind the one that answered `used_at`)."""
    taken_in, step = used_at, 1
    unused_at = -1  # a block at which the nonce was still unused; -1 before the first block
    while taken_in - step >= 0:
        if nonce_at(address, taken_in - step) <= nonce:
            unused_at = taken_in - step
            break
        taken_in -= step
        step *= 2
    while taken_in - unused_at > 1:
        middle = (unused_at + taken_in) // 2
        if nonce_at(address, middle) > nonce:
            taken_in = middle
        else:
            unused_at = middle
    try:
        block = _block(taken_in, full_transactions=True)
    except BlockNotFound:
        return None
    sender = to_checksum_address(address)
    for transaction in block["transactions"]:
        if to_checksum_address(transaction["from"]) == sender and transaction["nonce"] == nonce:
            return "0x" + bytes(transaction["hash"]).hex()
    return None


def block_number_at(timestamp: int) -> int:
    """The newest block whose timestamp is at most `timestamp` (0 when none is): a bisection of block headers, which
    every full node keeps (not the state, which a non-archive node keeps of its last ~128 blocks only). Raises
    RpcUnavailable when the node has not a block below the head it named (a backend of a provider's pool behind
    another): web3's BlockNotFound, no ChainError, failed the relayer's poll as a broken row."""
    low, high = 0, latest_block_number()
    while low < high:
        middle = (low + high + 1) // 2
        try:
            block = _block(middle)
        except BlockNotFound as error:
            raise RpcUnavailable(f"block {middle} not read: the node is behind the head it named") from error
        if block["timestamp"] <= timestamp:
            low = middle
        else:
            high = middle - 1
    return low


def block_transaction_hashes(number: int) -> set[str] | None:
    """The hashes (0x, lowercase) of the transactions in block `number`; None when the node has no block there (one
    behind)."""
    try:
        block = _block(number)
    except BlockNotFound:
        return None
    return {"0x" + bytes(tx_hash).hex() for tx_hash in block["transactions"]}


def _block(number: int, *, full_transactions: bool = False):
    """The node's block at height `number` (its header and transaction hashes, or the transactions themselves). Raises
    BlockNotFound when it has none there; UntrustedAnswer when it answered a block of another height, or one without
    its hash or timestamp (taken for the one asked, a block without our payout passed for the one that held it, and
    the payout went out again)."""
    try:
        block = w3().eth.get_block(number, full_transactions=full_transactions)
    except BlockNotFound:
        raise
    except Exception as exc:  # noqa: BLE001
        raise classify(exc) from exc
    _check_block(block, number)
    return block


def _check_block(block, number: int) -> None:
    """`block` is a block at height `number`, with a hash and a timestamp: else UntrustedAnswer."""
    block_hash = block.get("hash")
    if (block.get("number") != number or not isinstance(block_hash, bytes) or len(block_hash) != 32
            or not isinstance(block.get("timestamp"), int) or not isinstance(block.get("transactions"), list)):
        raise UntrustedAnswer(f"the node answered block {number} with a block of height {block.get('number')!r} "
                              f"and hash {block_hash!r:.80}")


# What any transaction costs before it runs: an estimate below it is no node's honest answer.
_INTRINSIC_GAS = 21_000


def simulate(*, sender: str, to: str, data: str) -> int:
    """eth_call + estimateGas of a transaction; returns the gas estimate or raises Reverted. An estimate below the
    intrinsic gas or above CHAIN_MAX_GAS_PER_TRANSACTION is UntrustedAnswer: signed with it, the transaction held its
    nonce with a limit no node takes, and every later one of the wallet waited behind it."""
    tx = {"from": to_checksum_address(sender), "to": to_checksum_address(to), "data": data}
    try:
        w3().eth.call(tx)
        gas = w3().eth.estimate_gas(tx)
    except Exception as exc:  # noqa: BLE001
        raise classify(exc) from exc
    if not isinstance(gas, int) or not _INTRINSIC_GAS <= gas <= settings.CHAIN_MAX_GAS_PER_TRANSACTION:
        raise UntrustedAnswer(f"the node estimated {gas!r:.80} gas, outside {_INTRINSIC_GAS} to "
                              f"CHAIN_MAX_GAS_PER_TRANSACTION ({settings.CHAIN_MAX_GAS_PER_TRANSACTION})")
    return gas


@dataclass(frozen=True)
class SignedTx:
    tx_hash: str
    raw: str


def sign(*, key: str, to: str, data: str, nonce: int, gas: int, fees: Fees) -> SignedTx:
    tx = {
        "type": 2,
        "chainId": settings.CHAIN_ID,
        "to": to_checksum_address(to),
        "data": data,
        "value": 0,
        "nonce": nonce,
        "gas": gas,
        "maxFeePerGas": fees.max_fee_per_gas,
        "maxPriorityFeePerGas": fees.max_priority_fee_per_gas,
    }
    signed = Account.sign_transaction(tx, key)
    return SignedTx(tx_hash="0x" + signed.hash.hex().removeprefix("0x"),
                    raw="0x" + signed.raw_transaction.hex().removeprefix("0x"))


def broadcast(raw: str) -> None:
    """Send a signed transaction; 'already known' is success (the node has it)."""
    try:
        w3().eth.send_raw_transaction(raw)
    except Exception as exc:  # noqa: BLE001
        error = classify(exc)
        if not isinstance(error, AlreadyKnown):
            raise error from exc


@dataclass(frozen=True)
class Receipt:
    block_number: int
    block_hash: str
    status: int
    gas_used: int
    logs: list


def receipt(tx_hash: str) -> Receipt | None:
    """The receipt of mined `tx_hash`; None when the node has none (not mined, or not yet on this backend). Raises
    UntrustedAnswer for a receipt of another transaction (a proxy mixing its answers up): its status, taken for
    ours, concluded a pending payout failed; and for one without its block hash, gas used or logs."""
    try:
        found = w3().eth.get_transaction_receipt(tx_hash)
    except TransactionNotFound:
        return None
    except Exception as exc:  # noqa: BLE001
        raise classify(exc) from exc
    if found is None or found.get("blockNumber") is None:
        return None
    if hex_text(found.get("transactionHash") or b"").lower() != tx_hash.lower() or found.get("status") not in (0, 1):
        raise UntrustedAnswer(f"the node answered the receipt of {tx_hash} with another transaction's")
    block_hash, gas_used, logs = found.get("blockHash"), found.get("gasUsed"), found.get("logs")
    if (not isinstance(found["blockNumber"], int) or not isinstance(block_hash, bytes) or len(block_hash) != 32
            or not isinstance(gas_used, int) or not isinstance(logs, list | tuple)):
        # Read past the error mapping, a missing one failed the relayer's check of the row as a broken one (KeyError,
        # AttributeError), not as the node's: counted as read for what the poll concluded beside it.
        raise UntrustedAnswer(f"the node answered the receipt of {tx_hash} without its block hash, gas used or logs")
    return Receipt(block_number=found["blockNumber"], block_hash="0x" + block_hash.hex().removeprefix("0x"),
                   status=found["status"], gas_used=gas_used, logs=list(logs))


def node_chain_check() -> None:
    """Raises WrongChain when the node answers another chain id than CHAIN_ID (a provider's URL of another network,
    where contracts deployed by the same key at the same nonces have the same addresses). Asked again once the last
    answer is CHAIN_ID_RECHECK_SECONDS old (`_BoundedProvider`)."""
    try:
        answered = int(w3().eth.chain_id)
    except Exception as exc:  # noqa: BLE001
        raise classify(exc) from exc
    if answered != settings.CHAIN_ID:
        raise WrongChain(f"the node at CHAIN_RPC_URL answers chain id {answered}, not CHAIN_ID {settings.CHAIN_ID}")


def latest_block_number() -> int:
    try:
        return w3().eth.block_number
    except Exception as exc:  # noqa: BLE001
        raise classify(exc) from exc


def latest_block_timestamp() -> int:
    """The chain's clock: the latest block's timestamp, the `block.timestamp` the contract last saw."""
    try:
        return int(w3().eth.get_block("latest")["timestamp"])
    except Exception as exc:  # noqa: BLE001
        raise classify(exc) from exc


def head() -> tuple[int, int]:
    """The latest block's number and timestamp, from one answer. A read made at that number sees the chain as of that
    time, where a read `at latest` may reach another backend of a provider's pool, one behind (a window restarted in a
    block it lacks read as closed by the other's clock)."""
    try:
        block = w3().eth.get_block("latest")
    except Exception as exc:  # noqa: BLE001
        raise classify(exc) from exc
    return int(block["number"]), int(block["timestamp"])


def tagged_block_number(tag: str) -> int:
    """The number of the node's `safe` or `finalized` block."""
    try:
        return int(w3().eth.get_block(tag)["number"])
    except Exception as exc:  # noqa: BLE001
        raise classify(exc) from exc


def final_block_number(tag: str) -> int:
    """The node's `safe` or `finalized` block, as money released against it may trust: at or below the node's head.
    A node that names one beyond its head (a provider switched to another network, a misbehaving one) is not
    believed: ChainError, as when it refuses the tag or answers nothing for it."""
    return final_block(tag)[0]


def final_block(tag: str) -> tuple[int, str]:
    """(number, hash) of the node's `safe` or `finalized` block, from one answer, as `final_block_number` believes it.
    The hash names the chain the tag is of: a block below it is final only if that block descends to it
    (`block_below`), whichever backend of a load-balanced provider answers the height."""
    try:
        block = w3().eth.get_block(tag)
    except Exception as exc:  # noqa: BLE001
        raise classify(exc) from exc
    tagged = block.get("number")
    if not isinstance(tagged, int):
        raise UntrustedAnswer(f"the node answered its {tag} block without its number")
    _check_block(block, tagged)
    head = latest_block_number()
    if tagged > head:
        raise ChainError(f"the node's {tag} block {tagged} is beyond its head {head}")
    return tagged, "0x" + block["hash"].hex().removeprefix("0x")


def block_below(top: tuple[int, str], number: int) -> str | None:
    """The hash of the block at height `number` on the chain that ends with block `top` (number, hash), read from
    `top` down by parent hashes (a block by its hash is the same whichever backend answers it, where one by height
    may be a stale backend's, on a branch the chain dropped); None when a block of that walk is not found (a node
    without it), or when `number` is more than INDEXER_REORG_WINDOW_BLOCKS below `top` (not walked: so deep a
    branch is beyond any reorg followed here, and the caller decides without it)."""
    top_number, block_hash = top
    if not 0 <= top_number - number <= settings.INDEXER_REORG_WINDOW_BLOCKS:
        return None
    for height in range(top_number, number, -1):
        try:
            block_hash = _parent_hash(block_hash.lower(), height)
        except BlockNotFound:
            return None
    return block_hash


@lru_cache(maxsize=4096)
def _parent_hash(block_hash: str, height: int) -> str:
    """The parent's hash of block `block_hash` at `height`. A block's hash covers its parent's, so the answer is the
    same from every backend and for ever: read once per process, not once per payout and check (a relayer back
    after an hour walked ~1,800 blocks for each payout it released). Errors and BlockNotFound are not kept."""
    try:
        block = w3().eth.get_block(block_hash)
    except BlockNotFound:
        raise
    except Exception as exc:  # noqa: BLE001
        raise classify(exc) from exc
    _check_block(block, height)
    if "0x" + block["hash"].hex().removeprefix("0x") != block_hash:
        raise UntrustedAnswer(f"the node answered block {block_hash:.80} with another block")
    parent = block.get("parentHash")
    if not isinstance(parent, bytes) or len(parent) != 32:
        raise UntrustedAnswer(f"the node answered block {height} without its parent's hash")
    return "0x" + parent.hex().removeprefix("0x")


def next_block_timestamp() -> int:
    """The `block.timestamp` a transaction sent now would get, as the node says (its pending block): about now on
    an idle chain, whose latest block may be minutes old."""
    try:
        pending = int(w3().eth.get_block("pending")["timestamp"])
    except Exception as exc:  # noqa: BLE001
        raise classify(exc) from exc
    return max(pending, latest_block_timestamp() + 1)


def canonical_block_hash(number: int) -> str | None:
    """The hash of the node's block at height `number`; None when it has none there (beyond its head: a node behind
    another, or a chain a reorg made shorter until it grows again). Raises RpcUnavailable when the node answered with
    an error (rate limited, overloaded): that says nothing of the block, and read as "none there" it passed for a
    reorg; UntrustedAnswer when it answered a block without a hash or of another height (taken for the one asked, it
    passed for a reorg, and a missing hash ended the indexer's pass and the relayer's poll unrecorded)."""
    hashes = canonical_block_hashes(number)
    return None if hashes is None else hashes[0]


def canonical_block_hashes(number: int) -> tuple[str, str] | None:
    """(hash, parent hash) of the node's block at height `number`, as `canonical_block_hash` reads it; None when it
    has none there."""
    try:
        block = w3().eth.get_block(number)
    except BlockNotFound:
        return None
    except Exception as exc:  # noqa: BLE001
        error = classify(exc)
        if isinstance(error, RpcUnavailable):
            raise error from exc
        raise RpcUnavailable(f"block {number} not read: {error}") from exc
    _check_block(block, number)
    parent = block.get("parentHash")
    if not isinstance(parent, bytes) or len(parent) != 32:
        raise UntrustedAnswer(f"the node answered block {number} without its parent's hash")
    return "0x" + block["hash"].hex().removeprefix("0x"), "0x" + parent.hex().removeprefix("0x")


# Within a relayer poll (`headers_read_once`), the node's answers for the heights the depth checks read: (hash, parent
# hash), or None. Transactions mined in one block (or in neighbouring ones) ask the same heights: each asked them again.
_headers_read: ContextVar[dict | None] = ContextVar("headers_read", default=None)


@contextmanager
def headers_read_once() -> Iterator[None]:
    """Within the block, `blocks_above_descend` asks the node each height once: every check still compares each
    block's parent with the block below it, on one answer per height (as a poll reads the chain at one moment)."""
    token = _headers_read.set({})
    try:
        yield
    finally:
        _headers_read.reset(token)


def _header_hashes(number: int) -> tuple[str, str] | None:
    read = _headers_read.get()
    if read is None:
        return canonical_block_hashes(number)
    if number not in read:
        read[number] = canonical_block_hashes(number)
    return read[number]


def blocks_above_descend(number: int, block_hash: str, *, depth: int) -> bool:
    """Whether the node's blocks above block `number` (`block_hash`), up to `depth` blocks counting it, descend from
    it, each the parent of the next: what makes the block `depth` deep. The head's number alone, from a backend of a
    load-balanced provider other than the one that answered the block (one left on a branch the chain dropped),
    counted a depth of blocks that do not hold it (the relayer's `_block_deep_enough`, the indexer's
    `_confirmed_above`)."""
    parent = block_hash.lower()
    for above in range(number + 1, number + max(depth, 1)):
        hashes = _header_hashes(above)
        if hashes is None or hashes[1].lower() != parent:
            return False
        parent = hashes[0].lower()
    return True


# How `revert_reason` begins when the node would not replay the transaction: no reason was read.
REASON_NOT_READ = "reverted (reason not read"


def revert_reason(*, sender: str, to: str, data: str, block_number: int) -> str:
    """Why a mined transaction reverted: replay it as a call at its block. Raises RpcUnavailable when the node did not
    answer (a timeout is no reason: the outcome, which may depend on the reason, waits for an answer). A node that
    answers the replay with an error of its own, not a revert (a pruned node without that block's state: geth's
    "missing trie node", Reth's "state ... is pruned"), gives no reason: the text says so (REASON_NOT_READ), where the
    node's error, taken for the reason, hid one a domain looks for (an activation's AgreementExists: the escrow
    funded by a copy was not read, and the agreement failed)."""
    tx = {"from": to_checksum_address(sender), "to": to_checksum_address(to), "data": data}
    try:
        w3().eth.call(tx, block_identifier=block_number)
    except Exception as exc:  # noqa: BLE001
        error = classify(exc)
        if isinstance(error, RpcUnavailable):
            raise error from exc
        if not isinstance(error, Reverted):
            return f"{REASON_NOT_READ}: the node did not replay it at block {block_number}: {error})"
        return error.args[0] if error.args else "reverted"
    return "reverted (no reason)"


def to_json(value: Any) -> Any:
    """Contract return values (bytes, tuples) as JSON-friendly values."""
    return json.loads(Web3.to_json(value))


# How providers refuse an eth_getLogs over their cap (Infura's -32005 "query returned more than 10000 results",
# QuickNode's "limited to a 10000 range", geth's "exceed maximum block range", Alchemy's "Log response size exceeded",
# Ankr's "block range is too wide", Reth's "query exceeds max results 20000, retry with the range ..." (Base's public
# RPC), "logs matched by query exceeds limit of 10000"); -32005 alone is also some providers' rate limit.
_LOG_QUERY_TOO_LARGE = ("query returned more than", "limited to a", "block range", "response size exceeded",
                        "range is too", "range too", "too many results", "too many logs", "exceeds max results",
                        "exceeds limit of")


def logs(*, address: str, from_block: int, to_block: int, topics: list | None = None) -> list:
    """eth_getLogs of one contract over [from_block, to_block], both included (keep the range bounded: nodes
    refuse or time out on large ones). A range the node refuses as too large (`LogQueryTooLarge`: its block cap,
    or a range anyone can fill with token transfers past its results cap) is asked again in halves, down to one
    block: asked whole at every pass, it stalled the indexer for good. Raises UntrustedAnswer when a log is not one
    the query asked for."""
    try:
        return _logs(address=address, from_block=from_block, to_block=to_block, topics=topics)
    except LogQueryTooLarge:
        if from_block >= to_block:
            raise
    middle = (from_block + to_block) // 2
    return (logs(address=address, from_block=from_block, to_block=middle, topics=topics)
            + logs(address=address, from_block=middle + 1, to_block=to_block, topics=topics))


def _logs(*, address: str, from_block: int, to_block: int, topics: list | None) -> list:
    query = {"address": to_checksum_address(address), "fromBlock": from_block, "toBlock": to_block}
    if topics:
        query["topics"] = topics
    try:
        found = list(w3().eth.get_logs(query))
    except Exception as exc:  # noqa: BLE001
        error = classify(exc)
        if isinstance(exc, NodeAnswerTooLarge) or (
                type(error) is ChainError and any(words in str(error).lower() for words in _LOG_QUERY_TOO_LARGE)):
            raise LogQueryTooLarge(str(error)) from exc
        raise error from exc
    _check_logs(found, addresses=[address], topics=topics or [],
                asked=lambda log: from_block <= log["blockNumber"] <= to_block)
    return found


def block_logs(*, block_hash: str, addresses: list[str]) -> list:
    """eth_getLogs of `addresses` in the one block `block_hash` (EIP-234's blockHash filter). A node that has not
    that block must refuse the query (geth: "unknown block"), where a node behind answers a block range beyond its
    head with the logs of the blocks it has, and none of the others: an answer here is the block's whole set.
    Raises UntrustedAnswer when a log is not one the query asked for."""
    query = {"blockHash": block_hash, "address": [to_checksum_address(address) for address in addresses]}
    try:
        found = list(w3().eth.get_logs(query))
    except Exception as exc:  # noqa: BLE001
        raise classify(exc) from exc
    _check_logs(found, addresses=addresses, topics=[],
                asked=lambda log: hex_text(log["blockHash"]).lower() == block_hash.lower())
    return found


def _check_logs(found: list, *, addresses: list[str], topics: list, asked) -> None:
    """Each log of an eth_getLogs answer is one the query asked for (`asked`: its block), of one of `addresses`,
    matching `topics` (a position's None: any; a list: any of them), mined (blockNumber, logIndex) and not marked
    removed (eth_getLogs answers the canonical chain; `removed` is a filter's word for a log a reorg took). Anything
    else is a node answering another question, or a chain other than the one its blocks showed: applied, an event of
    a block past the confirmation depth, or of none the chain has, moved agreements."""
    wanted = {to_checksum_address(address) for address in addresses}
    allowed = [None if expected is None else
               {topic.lower() for topic in (expected if isinstance(expected, list) else [expected])}
               for expected in topics]
    for log in found:
        try:
            log_topics = [hex_text(topic).lower() for topic in log["topics"]]
            trusted = (not log.get("removed") and isinstance(log["blockNumber"], int)
                       and isinstance(log["logIndex"], int) and to_checksum_address(log["address"]) in wanted
                       and len(log_topics) >= len(allowed)
                       and all(any_of is None or topic in any_of for topic, any_of in zip(log_topics[:len(allowed)], allowed, strict=True))
                       and asked(log))
        except (KeyError, TypeError, ValueError, AttributeError) as error:
            raise UntrustedAnswer(f"the node answered a malformed log: {type(error).__name__}") from error
        if not trusted:
            raise UntrustedAnswer("the node answered a log the query did not ask for (another block or contract, or "
                                  "one marked removed)")


def hex_text(value) -> str:
    """A hash, topic or address as an RPC answer holds it (bytes, or text already), as 0x-prefixed text."""
    return value if isinstance(value, str) else "0x" + bytes(value).hex()


# --- escrow records ----------------------------------------------------------------------------------------------
# The contract stores only a digest of an escrow's terms and its packed settlement state: every call after
# activation carries the terms (`EscrowTerms`), read back here from the escrow's Activated event.

def first_logs(*, address: str, topics: list, from_block: int, to_block: int, newest_first: bool = False) -> list:
    """The contract's logs matching `topics` in [from_block, to_block], asked for in spans of at most
    INDEXER_BLOCK_RANGE blocks from the oldest span on (from the newest with `newest_first`), up to the first span
    that holds any: that span's logs, oldest first. Empty when none does."""
    spans = range(from_block, to_block + 1, settings.INDEXER_BLOCK_RANGE)
    for start in reversed(spans) if newest_first else spans:
        end = min(start + settings.INDEXER_BLOCK_RANGE - 1, to_block)
        found = logs(address=address, from_block=start, to_block=end, topics=topics)
        if found:  # in the chain's order: a node may answer in another, and callers take the last as the newest
            return sorted(found, key=lambda log: (log["blockNumber"], log["logIndex"]))
    return []


def event_topic(event) -> str:
    """A contract event's topic 0, as `eth_getLogs` filters take it."""
    return "0x" + event.topic.hex().removeprefix("0x") if isinstance(event.topic, bytes) else event.topic


def address_topic(address: str) -> str:
    """An indexed address, as a log's topic holds it."""
    return "0x" + address[2:].lower().rjust(64, "0")


def _escrow_events(name: str, onchain_id: str, buyer: str, *, from_block: int, to_block: int,
                   newest_first: bool = False) -> list:
    """Escrow event `name` of `buyer`'s escrow `onchain_id` (the contract keys escrows by buyer and id, and every
    escrow event has both as its first two indexed topics: another buyer's escrow under the same id is never
    taken), as `first_logs` finds them, decoded (`args`, `blockNumber`...)."""
    contract = escrow_contract()
    event = getattr(contract.events, name)()
    topics = [event_topic(event), "0x" + onchain_id.removeprefix("0x").lower(), address_topic(buyer)]
    found = first_logs(address=contract.address, topics=topics, from_block=from_block, to_block=to_block,
                       newest_first=newest_first)
    return [event.process_log(log) for log in found]


def _activation(onchain_id: str, buyer: str, *, from_block: int | None, to_block: int) -> dict | None:
    """`buyer`'s escrow's Activated event, looked for from `from_block` (else the deployment block) on; None when
    that buyer never activated the id (or `from_block` is past its activation)."""
    start = chainconfig.escrow_deployment_block() if from_block is None else from_block
    activated = _escrow_events("Activated", onchain_id, buyer, from_block=start, to_block=to_block)
    return activated[0] if activated else None  # a buyer activates an id once


def activation_transaction(onchain_id: str, *, buyer: str, from_block: int | None = None) -> dict | None:
    """The transaction whose Activated event funded `buyer`'s escrow `onchain_id` (whoever sent it: the relayer, or
    anyone relaying the buyer's signed intent), looked for from `from_block`: {"tx_hash", "block": {"number",
    "hash"}}; None when that buyer never activated it."""
    activated = _activation(onchain_id, buyer, from_block=from_block, to_block=latest_block_number())
    if activated is None:
        return None
    return {"tx_hash": hex_text(activated["transactionHash"]),
            "block": {"number": activated["blockNumber"], "hash": hex_text(activated["blockHash"])}}


def escrow_terms(onchain_id: str, *, buyer: str, from_block: int | None = None) -> tuple:
    """The `EscrowTerms` tuple every call on `buyer`'s escrow `onchain_id` after activation carries (its Activated
    event looked for from `from_block`, else the deployment block). Raises Reverted when it is not activated."""
    activated = _activation(onchain_id, buyer, from_block=from_block, to_block=latest_block_number())
    if activated is None:
        raise Reverted(f"InvalidState({onchain_id}, 0): no escrow of buyer {buyer} under this id")
    return terms_of_activation(activated["args"])


def escrow_closing_event(name: str, onchain_id: str, *, buyer: str) -> dict | None:
    """`buyer`'s escrow `onchain_id`'s event `name` that closed it (Settled or Reclaimed: an escrow closes once; for
    one that happens more than once, SettlementProposed, the newest), decoded; None when there is none on the chain. Searched from the newest span back, so the search ends at the
    span that holds it."""
    found = _escrow_events(name, onchain_id, buyer, from_block=chainconfig.escrow_deployment_block(),
                           to_block=latest_block_number(), newest_first=True)
    return found[-1] if found else None


def fees_paid_after(token: str, *, block: int) -> dict | None:
    """The escrow's newest FeesPaid event of `token` (anyone's payFees) in a block after `block`, decoded; None when
    there is none."""
    contract = escrow_contract()
    event = contract.events.FeesPaid()
    found = first_logs(address=contract.address, topics=[event_topic(event), address_topic(token)],
                       from_block=block + 1, to_block=latest_block_number(), newest_first=True)
    return event.process_log(found[-1]) if found else None


def escrow_challenged_at(onchain_id: str, *, buyer: str, from_block: int, to_block: int) -> dict | None:
    """When `buyer`'s escrow `onchain_id` was challenged (an escrow is, once), looked for in [from_block, to_block]:
    {"timestamp", "number", "hash"} of the block holding its Challenged event, whoever sent it (the relayer, or the
    buyer's own wallet); None when none is there."""
    found = _escrow_events("Challenged", onchain_id, buyer, from_block=from_block, to_block=to_block,
                           newest_first=True)
    if not found:
        return None
    block = _block(found[-1]["blockNumber"])
    return {"timestamp": int(block["timestamp"]), "number": int(found[-1]["blockNumber"]),
            "hash": hex_text(found[-1]["blockHash"])}


def terms_of_activation(args: dict) -> tuple:
    return (args["buyer"], args["seller"], args["token"], args["receiptSigner"], args["depositAmount"],
            args["challengeWindow"], args["reclaimAfter"], args["nonce"])


def terms_reclaim_after(terms: tuple) -> int:
    """The escrow's `reclaimAfter` (expiresAt + the reclaim grace at activation), from its `EscrowTerms`."""
    return int(terms[6])


def escrow_record(onchain_id: str, *, buyer: str, from_block: int | None = None) -> dict:
    """The full record of `buyer`'s escrow `onchain_id`, as JSON-friendly values: its terms (from the Activated
    event, looked for from `from_block`, else the deployment block), its state (from `getEscrow(id, terms)`, which
    checks the terms against the stored digest; the contract's `State` index) and the last proposal's usage digest
    (from its SettlementProposed event). State 0 and zero fields when that buyer never activated the id."""
    latest = latest_block_number()
    # The contract says in one call whether the buyer activated the id: only then is its Activated event searched
    # for, a span at a time (from the deployment block when the activation's block is unknown here). Searched for an
    # id never activated, the whole chain since the deployment was read on every call (a read key's, at its rate).
    digest = call(lambda: escrow_contract().functions.termsDigest(buyer, onchain_id).call(block_identifier=latest))
    activation = None if not any(digest) else _activation(onchain_id, buyer, from_block=from_block, to_block=latest)
    if activation is None:
        zero_address, zero32 = "0x" + "00" * 20, "0x" + "00" * 32
        return {"state": 0, "buyer": zero_address, "seller": zero_address, "token": zero_address,
                "receiptSigner": zero_address, "depositAmount": 0, "infraFee": 0, "challengeWindow": 0,
                "expiresAt": 0, "reclaimAfter": 0, "termsHash": zero32, "nonce": 0, "challengeDeadline": 0,
                "lastSeq": 0, "settledAmount": 0, "usageDigest": zero32, "buyerClaimable": 0, "sellerClaimable": 0}
    activated = dict(activation["args"])
    state = call(escrow_contract().functions.getEscrow(onchain_id, terms_of_activation(activated)).call)
    # The last proposal (a later one with a higher seq replaces it): searched from the newest span back.
    proposals = _escrow_events("SettlementProposed", onchain_id, buyer, from_block=activation["blockNumber"],
                               to_block=latest, newest_first=True) if state[0] > 1 else []
    record = to_json({key: value for key, value in activated.items() if key != "agreementId"})
    record.update(dict(zip(("challengeDeadline", "lastSeq", "settledAmount", "buyerClaimable", "sellerClaimable"),
                           state[1:], strict=True)))
    record["state"] = state[0]
    record["usageDigest"] = to_json(proposals[-1]["args"]["usageDigest"]) if proposals else "0x" + "00" * 32
    return record
