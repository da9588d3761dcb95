"""The usage digest chain of a batch (`usage_digests`) is the per-event chain, byte for byte."""

import secrets

from eth_abi import encode
from eth_utils import keccak

from sdk import receipts


def test_a_batchs_digests_are_the_per_event_chain_and_the_abi_encoding():
    agreement_id = "0x" + secrets.token_hex(32)
    previous = "0x" + secrets.token_hex(32)
    events = [(41 + index, index % 3 + 1, (index % 3 + 1) * 10**6, 10**20 + index, f"{secrets.token_hex(16)}:{index}")
              for index in range(25)] + [(66, 2**64, 2**200, 2**256 - 1, "")]

    digests = receipts.usage_digests(previous, agreement_id=agreement_id, events=events)

    expected, digest = [], previous
    for seq, units, cost, cumulative, request_id in events:
        event_hash = receipts.usage_event_hash(agreement_id=agreement_id, seq=seq, units=units, cost=cost,
                                               cumulative_amount=cumulative, request_id=request_id)
        assert event_hash == keccak(encode(["bytes32", "uint256", "uint256", "uint256", "uint256", "bytes32"], [
            bytes.fromhex(agreement_id[2:]), seq, units, cost, cumulative, keccak(text=request_id)]))
        digest = receipts.next_usage_digest(digest, event_hash)
        expected.append(digest)
    assert digests == expected
    assert receipts.usage_digests(previous, agreement_id=agreement_id, events=[]) == []
