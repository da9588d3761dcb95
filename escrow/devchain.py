"""Local dev chain: start Anvil, deploy MockUSDC + UsageEscrow, mint test USDC.

Pure web3 + subprocess, no Django import: used by the pytest chain fixtures (``tests/chain_fixtures.py``),
by management commands and by hand::

    from escrow import devchain
    with devchain.start_anvil() as node:
        w3 = node.w3()
        addrs = devchain.deploy_contracts(w3, devchain.DEV_PRIVATE_KEYS[0], fee_recipient=devchain.DEV_ADDRESSES[2],
                                          arbiter=devchain.DEV_ADDRESSES[1], reclaim_grace=3600)
        devchain.mint_usdc(w3, addrs["usdc"], devchain.DEV_PRIVATE_KEYS[0], devchain.DEV_ADDRESSES[3], 10**9)

The Anvil binary ships in the npm package ``@foundry-rs/anvil-linux-amd64`` (``npm ci`` at the repository
root installs it to ``node_modules/@foundry-rs/anvil-linux-amd64/bin/anvil``); ``ANVIL_BIN`` overrides the path.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import requests
from eth_account import Account
from web3 import Web3
from web3.contract import Contract

from escrow import artifacts

__all__ = [
    "ANVIL_MNEMONIC",
    "ANVIL_NPM_PACKAGE",
    "DEV_PRIVATE_KEYS",
    "DEV_ADDRESSES",
    "DEFAULT_CHAIN_ID",
    "TOKEN_NAME_BASE",
    "TOKEN_NAME_BASE_SEPOLIA",
    "AnvilNotFound",
    "AnvilStartError",
    "TransactionFailed",
    "AnvilProcess",
    "find_anvil_binary",
    "free_port",
    "start_anvil",
    "start_dev_chain",
    "DEV_BLOCK_TIME",
    "deploy_contracts",
    "deploy_contract",
    "mint_usdc",
    "send_transaction",
    "escrow_contract",
    "usdc_contract",
]

REPO_ROOT = Path(__file__).resolve().parent.parent
ANVIL_NPM_PACKAGE = "@foundry-rs/anvil-linux-amd64"
DEFAULT_CHAIN_ID = 31337
# MockUSDC's name, which is also its EIP-712 domain's: USDC's on Base, and on Base Sepolia (x402's and the
# Pægents SDK's test network), whose signatures are valid only under that name.
TOKEN_NAME_BASE = "USD Coin"
TOKEN_NAME_BASE_SEPOLIA = "USDC"
# `make run`'s chain mines a block this often (Base's block time) as well as one per transaction, so its clock
# moves while idle: challenge windows close and expired escrows become reclaimable without any traffic.
DEV_BLOCK_TIME = 2

# Anvil's default dev accounts: well-known keys from the public test mnemonic, each funded with 10,000 ETH on
# a fresh Anvil. FOR DEV CHAINS AND TESTS ONLY: anyone can spend from them on any real network.
ANVIL_MNEMONIC = "test test test test test test test test test test test junk"
DEV_PRIVATE_KEYS: tuple[str, ...] = (
    "0xac0974bec39a17e36ba4a6b4d238ff944bacb478cbed5efcae784d7bf4f2ff80",
    "0x59c6995e998f97a5a0044966f0945389dc9e86dae88c7a8412f4603b6b78690d",
    "0x5de4111afa1a4b94908f83103eb1f1706367c2e68ca870fc3fb9a804cdab365a",
    "0x7c852118294e51e653712a81e05800f419141751be58f605c371e15141b007a6",
    "0x47e179ec197488593b187f80a00eb0da91f1b9d0b13f8733639f19c30a34926a",
    "0x8b3a350cf5c34c9194ca85829a2df0ec3153be0318b5e2d3348e872092edffba",
    "0x92db14e403b83dfe3df233f83dfa3a0d7096f21ca9b0d6d6b8d88b2b4ec1564e",
    "0x4bbbf85ce3377467afe5d46f804f221813b2bb87f24d81f60f1fcdbf7cbf4356",
    "0xdbda1821b80551c9d65939329250298aa3472ba22feea921c0cf5d620ea67b97",
    "0x2a871d0798f97d79848a013d4936a73bf4cc922c825d33c1cf7073dff6d409c6",
)
DEV_ADDRESSES: tuple[str, ...] = (
    "0xf39Fd6e51aad88F6F4ce6aB8827279cffFb92266",
    "0x70997970C51812dc3A010C7d01b50e0d17dc79C8",
    "0x3C44CdDdB6a900fa2b585dd299e03d12FA4293BC",
    "0x90F79bf6EB2c4f870365E785982E1f101E93b906",
    "0x15d34AAf54267DB7D7c367839AAf71A00a2C6A65",
    "0x9965507D1a55bcC2695C58ba16FB37d819B0A4dc",
    "0x976EA74026E726554dB657fA54763abd0C3a0aa9",
    "0x14dC79964da2C08b23698B3D3cc7Ca32193d9955",
    "0x23618e81E3f5cdF7f54C3d65f7FBc0aBf5B21E8f",
    "0xa0Ee7A142d267C1f36714E4a8F75612F20a79720",
)


class AnvilNotFound(FileNotFoundError):
    """The Anvil binary is not installed."""


class AnvilStartError(RuntimeError):
    """Anvil exited or did not answer JSON-RPC in time."""


class TransactionFailed(RuntimeError):
    """A transaction was mined with status 0."""

    def __init__(self, message: str, receipt: Any = None):
        super().__init__(message)
        self.receipt = receipt


# ------------------------------------------------------------------ Anvil


def find_anvil_binary() -> Path:
    """Path of the Anvil executable: ``$ANVIL_BIN`` if set, else the one in the repository's node_modules."""
    override = os.environ.get("ANVIL_BIN")
    if override:
        path = Path(override)
        if not (path.is_file() and os.access(path, os.X_OK)):
            raise AnvilNotFound(f"ANVIL_BIN={override} is not an executable file")
        return path
    path = REPO_ROOT / "node_modules" / ANVIL_NPM_PACKAGE / "bin" / "anvil"
    if not path.is_file():
        raise AnvilNotFound(
            f"Anvil not found at {path}. Install the JS toolchain at the repository root with "
            f"`make node_modules` (or `npm ci`); it ships Anvil in the npm package {ANVIL_NPM_PACKAGE}."
        )
    if not os.access(path, os.X_OK):
        raise AnvilNotFound(f"{path} is not executable (chmod +x it, or reinstall with `npm ci`)")
    return path


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that was free a moment ago (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def _port_in_use(host: str, port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # TIME_WAIT is not "in use"
        try:
            sock.bind((host, port))
        except OSError:
            return True
    return False


def _die_with_parent() -> None:  # pragma: no cover - runs in the child between fork and exec
    """Linux: have the kernel SIGTERM Anvil when the process that started it dies, so no node is orphaned."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except Exception:
        pass


def _rpc(url: str, method: str, params: list | None = None, timeout: float = 2.0) -> Any:
    body = json.dumps({"jsonrpc": "2.0", "id": 1, "method": method, "params": params or []}).encode()
    request = urllib.request.Request(url, data=body, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=timeout) as response:
        reply = json.loads(response.read())
    if "error" in reply:
        raise RuntimeError(f"{method}: {reply['error']}")
    return reply["result"]


@dataclass
class AnvilProcess:
    """A running Anvil node. Stop it with :meth:`stop` or use it as a context manager."""

    process: subprocess.Popen
    host: str
    port: int
    chain_id: int
    log_path: Path | None = None
    _w3: Web3 | None = field(default=None, repr=False)
    # how it was started, for restart()
    args: tuple[str, ...] = field(default=(), repr=False)
    die_with_parent: bool = field(default=True, repr=False)

    @property
    def rpc_url(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def running(self) -> bool:
        return self.process.poll() is None

    def w3(self, request_timeout: float = 30.0) -> Web3:
        """A Web3 client for this node (one per AnvilProcess, created on first use)."""
        if self._w3 is None:
            session = requests.Session()
            session.trust_env = False  # a local node: no proxies from the environment (and no lookup per call)
            self._w3 = Web3(
                Web3.HTTPProvider(
                    self.rpc_url,
                    request_kwargs={"timeout": request_timeout},
                    session=session,
                    # only the chain id is cached: blocks and receipts change under evm_revert
                    cache_allowed_requests=True,
                    cacheable_requests={"eth_chainId"},
                )
            )
        return self._w3

    def rpc(self, method: str, params: list | None = None) -> Any:
        """A raw JSON-RPC call (e.g. ``anvil_setBalance``)."""
        return _rpc(self.rpc_url, method, params, timeout=30.0)

    def restart(self, timeout: float = 30.0) -> None:
        """Stop the node and start a new one with the same arguments on the same port: a chain from genesis under the
        URL whoever holds this node already has. Raises :class:`AnvilStartError` if the port was taken meanwhile."""
        self.stop()
        if _port_in_use(self.host, self.port):
            raise AnvilStartError(f"port {self.port} on {self.host} was taken while Anvil restarted")
        fresh = _launch(list(self.args), self.host, self.port, self.chain_id, timeout, self.die_with_parent)
        self.process, self.log_path, self._w3 = fresh.process, fresh.log_path, None

    def stop(self, timeout: float = 5.0) -> None:
        """Terminate Anvil (SIGTERM, then SIGKILL after ``timeout`` s). Idempotent."""
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=timeout)
        if self.log_path is not None:
            with contextlib.suppress(OSError):
                self.log_path.unlink()
            self.log_path = None

    def __enter__(self) -> AnvilProcess:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def start_anvil(
    port: int | None = None,
    chain_id: int = DEFAULT_CHAIN_ID,
    block_time: float | None = None,
    *,
    mine_each_transaction: bool = False,
    host: str = "127.0.0.1",
    timeout: float = 30.0,
    extra_args: tuple[str, ...] = (),
    die_with_parent: bool = True,
) -> AnvilProcess:
    """Start Anvil (``--silent``) and wait until it answers JSON-RPC.

    ``port=None`` picks a free port (retried if another process grabs it first). ``block_time=None`` mines a
    block per transaction (automine); a number mines on that interval instead, and on each transaction as well
    with ``mine_each_transaction`` (Anvil's ``--mixed-mining``). The node has Anvil's 10 default
    dev accounts (:data:`DEV_PRIVATE_KEYS`), each with 10,000 ETH. ``extra_args`` go to Anvil as they are
    (e.g. ``("--state", path)``). With ``die_with_parent`` (Linux) the kernel terminates Anvil when the
    thread that started it exits, so a crashed test run leaves no node behind; pass False to start a node
    from a short-lived thread. Raises :class:`AnvilNotFound` or :class:`AnvilStartError`.
    """
    binary = find_anvil_binary()
    attempts = 3 if port is None else 1
    last_error: Exception | None = None
    for _ in range(attempts):
        chosen = port if port is not None else free_port(host)
        if _port_in_use(host, chosen):
            # otherwise the node already listening there would answer the readiness check
            last_error = AnvilStartError(f"port {chosen} on {host} is already in use")
            continue
        args = [
            str(binary),
            "--silent",
            "--host",
            host,
            "--port",
            str(chosen),
            "--chain-id",
            str(chain_id),
            "--accounts",
            str(len(DEV_PRIVATE_KEYS)),
            "--mnemonic",
            ANVIL_MNEMONIC,
        ]
        if block_time is not None:
            args += ["--block-time", str(block_time)]
            if mine_each_transaction:
                args.append("--mixed-mining")
        args += list(extra_args)
        try:
            return _launch(args, host, chosen, chain_id, timeout, die_with_parent)
        except AnvilStartError as exc:
            last_error = exc
    raise last_error or AnvilStartError("Anvil did not start")


def _launch(args: list[str], host: str, port: int, chain_id: int, timeout: float,
            die_with_parent: bool) -> AnvilProcess:
    """Run Anvil with `args` (which listen on `port`) and wait until it answers; stopped again if it does not."""
    log = tempfile.NamedTemporaryFile(prefix="anvil-", suffix=".log", delete=False)
    log_path = Path(log.name)
    process = subprocess.Popen(
        args,
        stdin=subprocess.DEVNULL,
        stdout=log,
        stderr=subprocess.STDOUT,
        preexec_fn=_die_with_parent if die_with_parent and sys.platform.startswith("linux") else None,
    )
    log.close()
    node = AnvilProcess(process=process, host=host, port=port, chain_id=chain_id, log_path=log_path,
                        args=tuple(args), die_with_parent=die_with_parent)
    try:
        _wait_until_ready(node, timeout)
        time.sleep(0.05)
        if not node.running:  # lost a race for the port: the answer came from another process
            raise AnvilStartError(f"Anvil exited right after start on port {port}")
        return node
    except AnvilStartError:
        node.stop()
        raise


def start_dev_chain(*, port: int | None, chain_id: int = DEFAULT_CHAIN_ID, state: Path | None = None,
                    block_time: float = DEV_BLOCK_TIME, die_with_parent: bool = True) -> AnvilProcess:
    """The dev chain as ``manage.py devchain`` (``make run``) runs it: a block every ``block_time`` seconds and one
    per transaction, the state kept in ``state`` across restarts."""
    return start_anvil(port=port, chain_id=chain_id, block_time=block_time, mine_each_transaction=True,
                       extra_args=("--state", str(state)) if state is not None else (),
                       die_with_parent=die_with_parent)


def _wait_until_ready(node: AnvilProcess, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while True:
        if node.process.poll() is not None:
            output = node.log_path.read_text(errors="replace").strip() if node.log_path else ""
            raise AnvilStartError(
                f"Anvil exited with code {node.process.returncode} on port {node.port}: {output[-2000:]}"
            )
        try:
            reported = int(_rpc(node.rpc_url, "eth_chainId", timeout=1.0), 16)
        except (urllib.error.URLError, ConnectionError, OSError, ValueError):
            reported = None
        if reported is not None:
            if reported != node.chain_id:
                raise AnvilStartError(
                    f"port {node.port} answers with chain id {reported}, not {node.chain_id}: another node?"
                )
            return
        if time.monotonic() > deadline:
            raise AnvilStartError(f"Anvil did not answer on {node.rpc_url} within {timeout:.0f}s")
        time.sleep(0.05)


# ------------------------------------------------------------------ transactions and deployment


def escrow_contract(w3: Web3, address: str) -> Contract:
    """A web3 contract object for UsageEscrow at ``address``."""
    return w3.eth.contract(address=Web3.to_checksum_address(address), abi=artifacts.abi(artifacts.USAGE_ESCROW))


def usdc_contract(w3: Web3, address: str) -> Contract:
    """A web3 contract object for (Mock)USDC at ``address`` (MockUSDC's ABI, a superset of USDC's ERC-20,
    EIP-2612 and EIP-3009 functions)."""
    return w3.eth.contract(address=Web3.to_checksum_address(address), abi=artifacts.abi(artifacts.MOCK_USDC))


def send_transaction(w3: Web3, private_key: str, tx: dict[str, Any], *, timeout: float = 60.0) -> Any:
    """Fill in from/nonce/chainId/gas/fees, sign with ``private_key``, send, wait for and return the receipt.

    ``tx`` is a plain transaction dict or the output of ``contract.functions.f(...).build_transaction()``
    minus the sender fields. Raises :class:`TransactionFailed` if it reverts on-chain; a revert found while
    estimating gas raises web3's ContractLogicError/ContractCustomError instead.
    """
    account = Account.from_key(private_key)
    tx = dict(tx)
    tx.setdefault("from", account.address)
    tx.setdefault("chainId", w3.eth.chain_id)
    tx.setdefault("nonce", w3.eth.get_transaction_count(account.address, "pending"))
    if "gas" not in tx:
        tx["gas"] = int(w3.eth.estimate_gas(tx) * 1.2) + 10_000
    if "gasPrice" not in tx and "maxFeePerGas" not in tx:
        base_fee = w3.eth.get_block("latest").get("baseFeePerGas", 0)
        tip = w3.eth.max_priority_fee
        tx["maxPriorityFeePerGas"] = tip
        tx["maxFeePerGas"] = 2 * base_fee + tip
    signed = account.sign_transaction(tx)
    tx_hash = w3.eth.send_raw_transaction(signed.raw_transaction)
    receipt = w3.eth.wait_for_transaction_receipt(tx_hash, timeout=timeout, poll_latency=0.05)
    if receipt["status"] != 1:
        raise TransactionFailed(f"transaction {tx_hash.hex()} reverted", receipt)
    return receipt


def _call_tx(w3: Web3, private_key: str, fn: Any) -> Any:
    sender = Account.from_key(private_key).address
    return send_transaction(w3, private_key, fn.build_transaction({"from": sender}))


def deploy_contract(w3: Web3, private_key: str, name: str, *constructor_args: Any) -> str:
    """Deploy the compiled contract ``name`` (from escrow/contracts/build) and return its checksummed address."""
    return _deploy(w3, private_key, name, *constructor_args)["contractAddress"]


def _deploy(w3: Web3, private_key: str, name: str, *constructor_args: Any) -> dict[str, Any]:
    factory = w3.eth.contract(abi=artifacts.abi(name), bytecode=artifacts.bytecode(name))
    sender = Account.from_key(private_key).address
    tx = factory.constructor(*constructor_args).build_transaction({"from": sender})
    receipt = send_transaction(w3, private_key, tx)
    return {"contractAddress": Web3.to_checksum_address(receipt["contractAddress"]),
            "blockNumber": receipt["blockNumber"]}


def deploy_contracts(
    w3: Web3,
    deployer_key: str,
    *,
    fee_recipient: str,
    arbiter: str,
    reclaim_grace: int,
    operator: str | None = None,
    usdc_address: str | None = None,
    token_name: str = TOKEN_NAME_BASE,
) -> dict[str, Any]:
    """Deploy UsageEscrow (and MockUSDC named ``token_name`` unless ``usdc_address`` is given) and allow the token
    in the escrow.

    The deployer becomes the escrow's admin and, unless ``operator`` is given, its operator (relayer); it also
    owns MockUSDC (so it can mint and blacklist). Returns ``{"usdc": address, "escrow": address,
    "escrow_block": n}`` (the escrow's deployment block: where the chain indexer starts reading its events).
    """
    deployer = Account.from_key(deployer_key).address
    if usdc_address is None:
        usdc_address = deploy_contract(w3, deployer_key, artifacts.MOCK_USDC, deployer, token_name)
    usdc_address = Web3.to_checksum_address(usdc_address)
    escrow = _deploy(
        w3,
        deployer_key,
        artifacts.USAGE_ESCROW,
        deployer,
        Web3.to_checksum_address(operator or deployer),
        Web3.to_checksum_address(arbiter),
        Web3.to_checksum_address(fee_recipient),
        int(reclaim_grace),
    )
    escrow_address = escrow["contractAddress"]
    _call_tx(w3, deployer_key, escrow_contract(w3, escrow_address).functions.setTokenAllowed(usdc_address, True))
    return {"usdc": usdc_address, "escrow": escrow_address, "escrow_block": escrow["blockNumber"]}


def mint_usdc(w3: Web3, token_address: str, minter_key: str, to: str, amount: int) -> Any:
    """Mint ``amount`` base units of MockUSDC to ``to`` (``minter_key`` must be the token's owner).
    Returns the transaction receipt."""
    token = usdc_contract(w3, token_address)
    return _call_tx(w3, minter_key, token.functions.mint(Web3.to_checksum_address(to), int(amount)))
