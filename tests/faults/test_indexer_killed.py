"""The chain indexer process is killed with SIGKILL in the middle of a block range and run again.

The kill point is made exact by the chain relay: the indexer's `eth_getLogs` for a range reaches the node, but
the answer is held back and the process dies waiting for it, after earlier ranges were applied.
"""

import os

import pytest
from django.db import connection
from web3 import Web3

from agreements.models import AgreementEvent, UsageAgreement
from escrow import chain as chain_gateway
from escrow.models import ChainEvent, IndexerCursor
from tests.escrow.flow import confirm_all
from tests.faults.conftest import assert_reconciled, database_url
from tests.faults.processes import BIN, Service, wait_until
from tests.escrow.conftest import escrow_terms

pytestmark = [pytest.mark.slow, pytest.mark.faults, pytest.mark.chain, pytest.mark.postgres,
              pytest.mark.django_db(transaction=True)]

BLOCKS_PER_RANGE = 4
LOGS_CALLS_PER_RANGE = 3  # the escrow's events, then token transfers from and to the watched addresses


def index_chain(escrow_chain, chain_relay, settings, log_dir, *mode: str) -> Service:
    env = {**os.environ, "DEBUG": "false", "SECRET_KEY": "fault-suite", "DATABASE_URL": database_url("faults-indexer"),
           "CHAIN_RPC_URL": chain_relay.url, "CHAIN_ID": str(escrow_chain.chain_id), "CHAIN_RPC_TIMEOUT": "30",
           "USDC_ADDRESS": settings.USDC_ADDRESS, "USAGE_ESCROW_ADDRESS": settings.USAGE_ESCROW_ADDRESS,
           "ESCROW_DEPLOYMENT_BLOCK": str(settings.ESCROW_DEPLOYMENT_BLOCK),
           "RELAYER_PRIVATE_KEY": settings.RELAYER_PRIVATE_KEY, "FEE_RECIPIENT": settings.FEE_RECIPIENT,
           # the indexer checks an escrow's receipt signer against the platform's (an intent of the buyer's own)
           "RECEIPT_SIGNER_PRIVATE_KEY": settings.RECEIPT_SIGNER_PRIVATE_KEY,
           "INDEXER_BLOCK_RANGE": str(BLOCKS_PER_RANGE), "INDEXER_POLL_SECONDS": "0.5"}
    return Service(f"index-chain{'-'.join(mode)}", [str(BIN / "python"), "manage.py", "index_chain", *mode], env,
                   log_dir).start()


def seller_proposes_directly(parties, agreement_id) -> None:
    events = parties.buyer_api.get(f"/usage-agreements/{agreement_id}/usage").json()["results"]
    last = max(events, key=lambda event: event["seq"])
    onchain_id = UsageAgreement.objects.get(pk=agreement_id).onchain_id
    tx_hash = parties.chain.escrow.functions.proposeSettlement(
        onchain_id, escrow_terms(parties.chain.escrow, onchain_id), last["seq"], last["cumulative_atomic"], last["usage_digest"], last["receipt_signature"],
    ).transact({"from": parties.seller_account.address})
    assert parties.chain.w3.eth.wait_for_transaction_receipt(tx_hash)["status"] == 1


def expected_logs(escrow_chain, settings) -> set[tuple[str, int]]:
    """Every log the indexer must hold: the escrow's, and the token's touching the escrow, treasury or fee."""
    w3, head = escrow_chain.w3, escrow_chain.block_number()
    span = {"fromBlock": settings.ESCROW_DEPLOYMENT_BLOCK, "toBlock": head}
    logs = w3.eth.get_logs({**span, "address": escrow_chain.addresses["escrow"]})
    watched = {escrow_chain.addresses["escrow"], chain_gateway.relayer_account().address, settings.FEE_RECIPIENT}
    transfer = Web3.keccak(text="Transfer(address,address,uint256)")
    for log in w3.eth.get_logs({**span, "address": escrow_chain.addresses["usdc"], "topics": [transfer]}):
        parties = {Web3.to_checksum_address(topic[-20:]) for topic in log["topics"][1:3]}
        if parties & watched:
            logs.append(log)
    return {("0x" + log["blockHash"].hex().removeprefix("0x"), log["logIndex"]) for log in logs}


def test_indexer_killed_in_the_middle_of_a_block_range(escrow_chain, chain_relay, parties, settings, tmp_path,
                                                        django_capture_on_commit_callbacks):
    capture = django_capture_on_commit_callbacks
    assert connection.vendor == "postgresql"
    agreements = []
    for _ in range(3):  # activated by the platform's relayer (in this process), blocks apart
        agreement = parties.accepted_agreement(quantity=10)
        parties.activate(agreement["id"], capture)
        agreements.append(agreement["id"])
        escrow_chain.mine(5)
    confirm_all(capture)
    proposed = agreements[:2]
    for agreement_id in proposed:  # the seller settles these two on its own: only the indexer can tell
        for _ in range(2):
            assert parties.buyer_api.get(f"/metered-proxy/{agreement_id}/work").status_code == 200
        seller_proposes_directly(parties, agreement_id)
        escrow_chain.mine(5)
    head = escrow_chain.block_number()
    ranges = (head - settings.ESCROW_DEPLOYMENT_BLOCK) // BLOCKS_PER_RANGE + 1
    assert ranges >= 6

    # Killed waiting for the logs of the 4th range, after three ranges were applied.
    chain_relay.hold("eth_getLogs", after=3 * LOGS_CALLS_PER_RANGE + 1)
    killed = index_chain(escrow_chain, chain_relay, settings, tmp_path, "--follow")
    wait_until(chain_relay.holding.is_set, timeout=60, what=f"the indexer to read range 4\n{killed.log()[-2000:]}")
    killed.kill()
    chain_relay.release()
    cursor = IndexerCursor.objects.get()
    assert cursor.last_block == settings.ESCROW_DEPLOYMENT_BLOCK + 3 * BLOCKS_PER_RANGE - 1
    applied_before = ChainEvent.objects.count()
    assert 0 < applied_before < len(expected_logs(escrow_chain, settings))

    again = index_chain(escrow_chain, chain_relay, settings, tmp_path, "--once")
    wait_until(lambda: again.process.poll() is not None, timeout=60, what=f"the indexer\n{again.log()[-2000:]}")
    assert again.process.returncode == 0, again.log()

    assert IndexerCursor.objects.get().last_block == head
    held = set(ChainEvent.objects.values_list("block_hash", "log_index"))
    assert held == expected_logs(escrow_chain, settings)  # nothing lost; unique per log, so nothing twice
    assert ChainEvent.objects.filter(effect="failed").count() == 0
    for agreement_id in agreements:
        expected = "in_challenge" if agreement_id in proposed else "active"
        assert UsageAgreement.objects.get(pk=agreement_id).status == expected
        moves = list(AgreementEvent.objects.filter(agreement_id=agreement_id).values_list("to_status", flat=True))
        assert len(moves) == len(set(moves)), moves  # each transition applied once
    assert_reconciled()
