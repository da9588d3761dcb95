"""escrow.devchain and escrow.artifacts: finding and running Anvil, deploying, minting."""

import contextlib
import json
import time
from pathlib import Path

import pytest
from eth_account import Account
from web3.exceptions import ContractLogicError, TransactionNotFound

from escrow import artifacts, devchain
from tests.chain_fixtures import NodeLostBlocks, reverted

pytestmark = pytest.mark.chain


def test_dev_keys_match_addresses():
    assert [Account.from_key(k).address for k in devchain.DEV_PRIVATE_KEYS] == list(devchain.DEV_ADDRESSES)


def test_find_anvil_binary():
    path = devchain.find_anvil_binary()
    assert path.name == "anvil" and path.is_file()
    assert "@foundry-rs/anvil-linux-amd64" in str(path)


def test_missing_anvil_says_how_to_install(monkeypatch, tmp_path):
    monkeypatch.delenv("ANVIL_BIN", raising=False)
    monkeypatch.setattr(devchain, "REPO_ROOT", tmp_path)
    with pytest.raises(devchain.AnvilNotFound, match=r"make node_modules.*npm ci"):
        devchain.find_anvil_binary()
    monkeypatch.setenv("ANVIL_BIN", str(tmp_path / "nope"))
    with pytest.raises(devchain.AnvilNotFound, match="ANVIL_BIN"):
        devchain.find_anvil_binary()


def test_start_deploy_mint_and_stop():
    with devchain.start_anvil(chain_id=4242) as node:
        assert node.running
        w3 = node.w3()
        assert w3.eth.chain_id == 4242
        keys, addrs = devchain.DEV_PRIVATE_KEYS, devchain.DEV_ADDRESSES
        deployed = devchain.deploy_contracts(
            w3, keys[0], fee_recipient=addrs[2], arbiter=addrs[1], reclaim_grace=120
        )
        assert set(deployed) == {"usdc", "escrow", "escrow_block"}
        assert w3.eth.get_code(deployed["escrow"], deployed["escrow_block"]) != b""
        assert w3.eth.get_code(deployed["escrow"], deployed["escrow_block"] - 1) == b""
        receipt = devchain.mint_usdc(w3, deployed["usdc"], keys[0], addrs[3], 5_000_000)
        assert receipt["status"] == 1
        usdc = devchain.usdc_contract(w3, deployed["usdc"])
        assert usdc.functions.balanceOf(addrs[3]).call() == 5_000_000
        escrow = devchain.escrow_contract(w3, deployed["escrow"])
        assert escrow.functions.reclaimGrace().call() == 120
        # only the token owner mints
        with pytest.raises((ContractLogicError, devchain.TransactionFailed)):
            devchain.mint_usdc(w3, deployed["usdc"], keys[5], addrs[5], 1)
    assert not node.running
    node.stop()  # idempotent


def test_block_time_and_fixed_port():
    port = devchain.free_port()
    node = devchain.start_anvil(port=port, block_time=1)
    try:
        assert node.port == port and node.rpc_url.endswith(f":{port}")
        # a second node on the same port cannot start
        with pytest.raises(devchain.AnvilStartError, match="in use"):
            devchain.start_anvil(port=port, timeout=5)
    finally:
        node.stop()


def test_send_transaction_reports_onchain_revert(chain):
    acc = chain.accounts
    # skip estimation with an explicit gas limit so the revert happens on-chain
    tx = chain.usdc.functions.mint(acc.stranger.address, 1).build_transaction(
        {"from": acc.stranger.address, "gas": 100_000}
    )
    with pytest.raises(devchain.TransactionFailed) as info:
        devchain.send_transaction(chain.w3, acc.stranger.key, tx)
    assert info.value.receipt["status"] == 0


def test_each_test_starts_with_the_chain_clock_on_ours(deployed):
    """evm_revert turns the node's clock back to the snapshot's latest block: the time a test spends must not pile
    up as the chain's lag behind our clock in the tests after it."""
    with reverted(deployed) as handle:
        time.sleep(2)
        handle.mine()
    before = int(time.time())
    with reverted(deployed) as handle:
        assert handle.now() >= before
        handle.mine()
        assert handle.now() >= before


def test_a_transaction_a_test_left_unmined_is_not_mined_in_the_next_tests_chain(deployed):
    """Anvil keeps a transaction sent but not yet mined across evm_revert (its pool says empty) and mines it in the
    next block: one a test left unmined (automine off, or a send Anvil answered before mining it, under load) ran in
    the next test's chain, its nonce taken there ("nonce too low" for the relayer's next send)."""
    with reverted(deployed) as handle:
        sender, recipient = handle.w3.eth.accounts[:2]
        nonce = handle.w3.eth.get_transaction_count(sender)
        handle.rpc("evm_setAutomine", [False])  # as a send not mined yet when the test ends
        left = handle.w3.eth.send_transaction({"from": sender, "to": recipient, "value": 1})
    handle.rpc("evm_setAutomine", [True])
    with reverted(deployed) as handle:
        handle.mine()
        assert handle.w3.eth.get_transaction_count(sender) == nonce
        with pytest.raises(TransactionNotFound):
            handle.w3.eth.get_transaction_receipt(left)


@pytest.mark.slow
def test_a_transaction_still_being_mined_when_the_test_ends_leaves_no_block_missing(deployed):
    """Anvil's evm_revert does not wait for a block being mined (automine, a send it answered before mining): the
    block lands on the branch the revert just removed, the head moves past heights that have no block any more, and
    every later test on that node read "no block" below the head (foundry-rs/foundry#4843). A race: each round gives it
    a chance (about 1 in 100 rounds lost it before the fix)."""
    sender = Account.from_key(devchain.DEV_PRIVATE_KEYS[0])
    for _ in range(300):
        with reverted(deployed) as handle:
            handle.mine(3)
            nonce = handle.w3.eth.get_transaction_count(sender.address, "pending")
            for offset in range(3):
                signed = sender.sign_transaction({
                    "to": devchain.DEV_ADDRESSES[1], "value": 1, "gas": 21_000, "maxFeePerGas": 10**10,
                    "maxPriorityFeePerGas": 1, "nonce": nonce + offset, "chainId": handle.chain_id})
                handle.w3.eth.send_raw_transaction(signed.raw_transaction)
        head = handle.block_number()
        answers = handle.w3.provider.make_batch_request(
            [("eth_getBlockByNumber", [hex(height), False]) for height in range(head + 1)])
        assert not [height for height, answer in enumerate(answers) if answer.get("result") is None], head


def test_a_node_left_without_blocks_below_its_head_fails_that_test_and_is_whole_again_for_the_next(deployed):
    """A node whose head is above heights it answers no block at (as a block mined during the revert leaves it) fails
    the test that left it so, by name, and is restarted with the deployment made again: the tests after it do not
    fail on it too."""
    with pytest.raises(NodeLostBlocks, match=r"^the test named here left the chain node broken .*no block at heights"):
        with reverted(deployed, test="the test named here") as handle:
            handle.mine(3)
            # Dropped by the fixture's revert (a later snapshot), yet Anvil still moves its head to its block.
            dropped = handle.snapshot()
            fixture_revert = handle.revert

            def revert_then_a_block_lands(snapshot_id):
                fixture_revert(snapshot_id)
                with contextlib.suppress(RuntimeError):  # "Resource not found": the head moved all the same
                    handle.rpc("evm_revert", [dropped])

            handle.revert = revert_then_a_block_lands
    with reverted(deployed) as handle:
        assert handle.lost_blocks(handle.rpc("eth_getBlockByNumber", ["latest", False])) == ""
        devchain.mint_usdc(handle.w3, handle.addresses["usdc"], handle.accounts.deployer.key,
                           handle.accounts.buyer.address, 5)
        assert handle.usdc.functions.balanceOf(handle.accounts.buyer.address).call() == 5
        assert handle.escrow.functions.isTokenAllowed(handle.addresses["usdc"]).call()


def test_artifacts():
    for name in artifacts.CONTRACT_NAMES:
        artifact = artifacts.load_artifact(name)
        assert artifact["contractName"] == name
        assert artifact["bytecode"].startswith("0x6") and len(artifact["bytecode"]) > 1000
        assert artifact["sourceHash"].startswith("0x") and len(artifact["sourceHash"]) == 66
        assert artifacts.abi(name) == artifact["abi"]
        assert artifacts.bytecode(name) == artifact["bytecode"]
        assert artifacts.deployed_bytecode(name) == artifact["deployedBytecode"]
        assert artifacts.source_hash(name) == artifact["sourceHash"]
        # files are pretty-printed JSON with a trailing newline
        text = (artifacts.BUILD_DIR / f"{name}.json").read_text()
        assert text.endswith("}\n") and json.loads(text) == artifact
    # callers get copies: the cache cannot be altered through them
    artifacts.abi("UsageEscrow").clear()
    assert artifacts.abi("UsageEscrow")
    with pytest.raises(artifacts.ArtifactNotFound, match="compile.js"):
        artifacts.load_artifact("Nope")


def test_artifacts_are_in_the_package():
    assert artifacts.BUILD_DIR == Path(artifacts.__file__).parent / "contracts" / "build"
