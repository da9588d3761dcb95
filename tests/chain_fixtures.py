"""Pytest plugin: an Anvil dev chain with the escrow contracts, reset between tests.

Register it once in the root conftest (``pytest_plugins = ["tests.chain_fixtures"]``). Fixtures:

- ``anvil`` (session): one Anvil node per pytest session / xdist worker, on a free port, stopped at the end.
- ``deployed`` (session): MockUSDC + UsageEscrow deployed on it (:class:`Deployed`), the token named as Base's
  USDC ("USD Coin"); ``deployed_base_sepolia_token`` (session, deployed on first use): a second deployment on the
  same node whose token has Base Sepolia's name ("USDC"), so its EIP-712 domain differs.
- ``chain`` (function): snapshots the chain before the test and reverts after it (:class:`Chain`), so each
  test starts from the freshly deployed state; it also carries everything ``deployed`` has. Parametrize it
  indirectly with a token name to run a test against either deployment
  (``@pytest.mark.parametrize("chain", TOKEN_NAMES, indirect=True)``).

After each test's revert the fixture checks that the node answers a block at every height up to its head, as it did
before the test. If not, it restarts that node, deploys on it again what was deployed there, and fails the test that
left it so (:class:`NodeLostBlocks`): the tests after it get a whole chain.

None of them touches the Django database.
"""

from __future__ import annotations

import time
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any
from collections.abc import Callable, Iterator

import pytest
from web3 import Web3
from web3.contract import Contract

from escrow import devchain

# Seconds after an escrow's expiresAt before it can be reclaimed, on the test deployment.
TEST_RECLAIM_GRACE = 3600
# The token names a test can run `chain` under: Base's USDC and Base Sepolia's.
TOKEN_NAMES = (devchain.TOKEN_NAME_BASE, devchain.TOKEN_NAME_BASE_SEPOLIA)
# How long a revert waits for the node to mine the transactions in its pool (see Chain.settle).
SETTLE_TIMEOUT = 5.0


class NodeLostBlocks(AssertionError):
    """After a test's revert the node did not answer a block at every height up to its head, or its head is not the
    block the test started from."""


@dataclass(frozen=True)
class DevAccount:
    """One of Anvil's funded dev accounts (unlocked on the node, so ``transact({"from": address})`` works)."""

    address: str
    key: str


@dataclass(frozen=True)
class DevAccounts:
    """Anvil's 10 dev accounts by the role they play in the test deployment."""

    deployer: DevAccount  # escrow admin + operator (relayer), MockUSDC owner (mint, blacklist)
    arbiter: DevAccount
    fee_recipient: DevAccount
    buyer: DevAccount
    seller: DevAccount
    receipt_signer: DevAccount
    stranger: DevAccount  # holds no role; for "wrong caller" tests
    buyer2: DevAccount
    seller2: DevAccount
    spare: DevAccount

    @property
    def operator(self) -> DevAccount:
        return self.deployer

    @classmethod
    def from_anvil(cls) -> DevAccounts:
        accounts = [DevAccount(a, k) for a, k in zip(devchain.DEV_ADDRESSES, devchain.DEV_PRIVATE_KEYS, strict=True)]
        return cls(*accounts)


@dataclass
class Deployed:
    """The session's chain with MockUSDC and UsageEscrow deployed (the escrow allows the token)."""

    node: devchain.AnvilProcess
    w3: Web3
    chain_id: int
    addresses: dict  # {"usdc": ..., "escrow": ..., "escrow_block": the escrow's deployment block}
    usdc: Contract
    escrow: Contract
    accounts: DevAccounts
    reclaim_grace: int


class Chain:
    """Per-test handle on the chain: time travel, mining and explicit snapshots, plus the deployment."""

    def __init__(self, deployed: Deployed):
        self.deployed = deployed
        self.node = deployed.node
        self.w3 = deployed.w3
        self.chain_id = deployed.chain_id
        self.addresses = deployed.addresses
        self.usdc = deployed.usdc
        self.escrow = deployed.escrow
        self.accounts = deployed.accounts
        self.reclaim_grace = deployed.reclaim_grace

    def rpc(self, method: str, params: list | None = None) -> Any:
        response = self.w3.provider.make_request(method, params or [])
        if response.get("error"):
            raise RuntimeError(f"{method}: {response['error']}")
        return response.get("result")

    def snapshot(self) -> str:
        """Take an EVM snapshot; returns its id (a snapshot can be reverted to once)."""
        return self.rpc("evm_snapshot")

    def revert(self, snapshot_id: str) -> None:
        self.settle()
        if not self.rpc("evm_revert", [snapshot_id]):
            raise RuntimeError(f"evm_revert({snapshot_id}) failed")

    def settle(self) -> None:
        """Wait until an automining node has mined the transactions ready in its pool. Anvil's evm_revert does not
        wait for a block being mined (foundry-rs/foundry#4843): one mining a send it answered before mining it lands
        after the revert, on the branch the revert removed, and the node's head is then above heights it has no
        block at, for every later test (tests/escrow/test_devchain.py, ..._leaves_no_block_missing). A transaction
        stays in the pool until its block is stored, so an empty pool means no block is being mined. With automine
        off, nothing mines on its own."""
        deadline = time.monotonic() + SETTLE_TIMEOUT
        while time.monotonic() < deadline:
            automine, pool = (answer["result"] for answer in self.w3.provider.make_batch_request(
                [("anvil_getAutomine", []), ("txpool_status", [])]))
            if not automine or int(pool["pending"], 16) == 0:
                return
            time.sleep(0.005)

    def lost_blocks(self, head: dict, *also: tuple[str, list]) -> str:
        """What the node lacks of its chain up to ``head`` (a block it had, as eth_getBlockByNumber answers it): "" if
        ``head`` is its head and it answers a block at every height. One batched request (a few milliseconds at the
        test chain's height), which also makes the calls in ``also``."""
        def blocks(heights: range) -> list:
            return [answer.get("result") for answer in self.w3.provider.make_batch_request(
                [("eth_getBlockByNumber", [hex(height), False]) for height in heights])]

        height = int(head["number"], 16)
        answers = self.w3.provider.make_batch_request(
            [*also, ("eth_blockNumber", [])] + [("eth_getBlockByNumber", [hex(n), False]) for n in range(height + 1)])
        answers = answers[len(also):]
        number, below = int(answers[0]["result"], 16), [answer.get("result") for answer in answers[1:]]
        above = blocks(range(height + 1, number + 1)) if number > height else []
        missing = [n for n, block in enumerate(below + above) if not block]
        if missing:
            return f"no block at heights {missing}, its head {number}"
        if number != height or below[-1]["hash"] != head["hash"]:
            return f"its head is block {number}, not block {height} ({head['hash']})"
        return ""

    def reorg(self, snapshot_id: str) -> None:
        """Another branch wins from the snapshot on: the chain goes back to it and grows again, in empty blocks, to
        the height it had. A real reorg's new branch reaches the old height within a block or two; a node with no
        block at a height is one behind, which the relayer and the indexer wait for rather than read as a reorg."""
        height = self.block_number()
        self.revert(snapshot_id)
        if height > self.block_number():
            self.mine(height - self.block_number())

    def mine(self, blocks: int = 1) -> None:
        """Mine ``blocks`` empty blocks."""
        self.rpc("anvil_mine", [hex(blocks)])

    def increase_time(self, seconds: int) -> int:
        """Advance the chain clock by ``seconds`` and mine a block; returns the new block's timestamp."""
        self.rpc("evm_increaseTime", [int(seconds)])
        self.mine()
        return self.now()

    def set_next_timestamp(self, timestamp: int) -> None:
        """The next mined block (e.g. the next transaction's) gets exactly ``timestamp``."""
        self.rpc("evm_setNextBlockTimestamp", [int(timestamp)])

    def now(self) -> int:
        """The latest block's timestamp (use it, not the wall clock, as the base of deadlines)."""
        return int(self.w3.eth.get_block("latest")["timestamp"])

    def block_number(self) -> int:
        return int(self.w3.eth.block_number)


@pytest.fixture(scope="session")
def anvil() -> Iterator[devchain.AnvilProcess]:
    """One Anvil node for this session (or xdist worker)."""
    node = devchain.start_anvil()
    try:
        yield node
    finally:
        node.stop()


# Each node's deployments in the order they were made, with how to make each again (see recover_node).
_DEPLOYMENTS: dict[int, list[tuple[Deployed, Callable[[], Deployed]]]] = {}


def _remember(deployed: Deployed, make: Callable[[], Deployed]) -> Deployed:
    _DEPLOYMENTS.setdefault(id(deployed.node), []).append((deployed, make))
    return deployed


def recover_node(node: devchain.AnvilProcess) -> None:
    """Restart `node` (same URL, a chain from genesis) and make its deployments again, in their order, each into the
    Deployed the session fixtures handed out."""
    node.restart()
    for deployed, make in _DEPLOYMENTS.get(id(node), []):
        vars(deployed).update(vars(make()))


def _deploy(anvil: devchain.AnvilProcess, token_name: str) -> Deployed:
    accounts = DevAccounts.from_anvil()
    w3 = anvil.w3()
    addresses = devchain.deploy_contracts(
        w3,
        accounts.deployer.key,
        fee_recipient=accounts.fee_recipient.address,
        arbiter=accounts.arbiter.address,
        reclaim_grace=TEST_RECLAIM_GRACE,
        token_name=token_name,
    )
    return Deployed(
        node=anvil,
        w3=w3,
        chain_id=anvil.chain_id,
        addresses=addresses,
        usdc=devchain.usdc_contract(w3, addresses["usdc"]),
        escrow=devchain.escrow_contract(w3, addresses["escrow"]),
        accounts=accounts,
        reclaim_grace=TEST_RECLAIM_GRACE,
    )


@pytest.fixture(scope="session")
def deployed(anvil: devchain.AnvilProcess) -> Deployed:
    """MockUSDC ("USD Coin") + UsageEscrow deployed once per session; tests must use ``chain`` to get a clean
    state."""
    return _remember(_deploy(anvil, devchain.TOKEN_NAME_BASE), lambda: _deploy(anvil, devchain.TOKEN_NAME_BASE))


@pytest.fixture(scope="session")
def deployed_base_sepolia_token(anvil: devchain.AnvilProcess) -> Deployed:
    """MockUSDC under Base Sepolia's name ("USDC") + its own UsageEscrow, on the same node."""
    return _remember(_deploy(anvil, devchain.TOKEN_NAME_BASE_SEPOLIA),
                     lambda: _deploy(anvil, devchain.TOKEN_NAME_BASE_SEPOLIA))


@pytest.fixture
def chain(request: pytest.FixtureRequest) -> Iterator[Chain]:
    """The deployed chain, reverted to its state before the test once the test ends. Its token is named
    "USD Coin", or what the test parametrizes it with (one of TOKEN_NAMES)."""
    token_name = getattr(request, "param", devchain.TOKEN_NAME_BASE)
    with reverted(request.getfixturevalue(
            "deployed" if token_name == devchain.TOKEN_NAME_BASE else "deployed_base_sepolia_token"),
            test=request.node.nodeid) as handle:
        yield handle


@contextmanager
def reverted(deployed: Deployed, test: str = "the test") -> Iterator[Chain]:
    """A handle on `deployed` whose latest block is one mined now, by our clock; the chain is reverted to where it
    was once the block ends. Raises NodeLostBlocks, naming `test`, if the node then lacks a block up to its head (it
    is recovered first: recover_node)."""
    handle = Chain(deployed)
    start, snapshot_id = (answer["result"] for answer in handle.w3.provider.make_batch_request(
        [("eth_getBlockByNumber", ["latest", False]), ("evm_snapshot", [])]))
    # evm_revert also turns the node's clock back to the snapshot's latest block, so each test would leave the chain
    # further behind ours, until deadlines a test counts from chain.now() are past by ours. Each test sets it to ours
    # and starts from a block mined at that time (after the snapshot: the chain does not grow from test to test).
    handle.rpc("anvil_setTime", [max(int(time.time()), handle.now())])
    handle.mine()
    try:
        yield handle
    finally:
        handle.revert(snapshot_id)
        # A transaction sent and not mined yet survives evm_revert (the pool says empty) and is mined in the next
        # block: in the next test's chain, its nonce taken there. (Dropped in the same request as the check.)
        _check_whole(handle, start, test, ("anvil_dropAllTransactions", []))


def _check_whole(handle: Chain, start: dict, test: str, *also: tuple[str, list]) -> None:
    """The node is back at `start` (the block the test began from) with a block at every height below it; if not,
    recover it for the tests after this one and fail this one."""
    found = handle.lost_blocks(start, *also)
    if not found:
        return
    recover_node(handle.node)
    raise NodeLostBlocks(f"{test} left the chain node broken after its revert ({found}); the node was restarted and "
                         f"its contracts deployed again for the tests after it")


# Base Sepolia as x402's and the Pægents SDK's asset tables pin it: the chain id, and USDC's address and name.
BASE_SEPOLIA_CHAIN_ID = 84532
BASE_SEPOLIA_USDC = "0x036CbD53842c5426634e7929541eC2318f3dCF7e"


@pytest.fixture(scope="session")
def base_sepolia_deployed() -> Iterator[Deployed]:
    """A node of its own with Base Sepolia's chain id, MockUSDC named "USDC" placed at Base Sepolia's USDC address
    (its code, and the storage its constructor wrote: name, symbol, owner), and a UsageEscrow that allows it. For
    clients that sign only for Base Sepolia's USDC (the Pægents SDK)."""
    node = devchain.start_anvil(chain_id=BASE_SEPOLIA_CHAIN_ID)
    try:
        yield _remember(_deploy_at_base_sepolia_usdc(node), lambda: _deploy_at_base_sepolia_usdc(node))
    finally:
        node.stop()


def _deploy_at_base_sepolia_usdc(node: devchain.AnvilProcess) -> Deployed:
    deployed = _deploy(node, devchain.TOKEN_NAME_BASE_SEPOLIA)
    built = deployed.addresses["usdc"]
    node.rpc("anvil_setCode", [BASE_SEPOLIA_USDC, "0x" + deployed.w3.eth.get_code(built).hex()])
    for slot in range(32):  # the constructor's writes are in the first slots; its mappings are empty
        value = deployed.w3.eth.get_storage_at(built, slot)
        if any(value):
            node.rpc("anvil_setStorageAt", [BASE_SEPOLIA_USDC, hex(slot), "0x" + value.hex().rjust(64, "0")])
    allowed = deployed.escrow.functions.setTokenAllowed(BASE_SEPOLIA_USDC, True).transact(
        {"from": deployed.accounts.deployer.address})
    deployed.w3.eth.wait_for_transaction_receipt(allowed)  # Anvil answers a send before it mines it
    deployed.addresses = {**deployed.addresses, "usdc": BASE_SEPOLIA_USDC}
    deployed.usdc = devchain.usdc_contract(deployed.w3, BASE_SEPOLIA_USDC)
    return deployed


@pytest.fixture
def base_sepolia_chain(base_sepolia_deployed: Deployed, request: pytest.FixtureRequest) -> Iterator[Chain]:
    """`base_sepolia_deployed`, reverted after the test."""
    with reverted(base_sepolia_deployed, test=request.node.nodeid) as handle:
        yield handle
