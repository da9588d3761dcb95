"""The server's reads of the escrow's events (`escrow.chain.first_logs`) through an RPC that, like public Base RPCs,
refuses an eth_getLogs over more than a few blocks: bounded spans, from the activation's block when the relayer saw
it mined, else from the deployment block."""

import uuid

import pytest

from agreements.models import UsageAgreement
from escrow import selectors
from escrow.models import ChainTransaction
from tests.escrow.conftest import Escrows, random_bytes32
from sdk import typed_data as td
from tests.escrow.flow import Parties, sign_activation
from tests.escrow.test_indexer import index, mined
from tests.support.rpc_relay import RpcRelay

pytestmark = [pytest.mark.chain, pytest.mark.django_db]

SPAN = 8  # the most blocks the RPC (and INDEXER_BLOCK_RANGE) takes in one eth_getLogs


@pytest.fixture
def capped_rpc(escrow_chain, settings):
    relay = RpcRelay(escrow_chain.node.rpc_url).start()
    relay.cap_log_span(SPAN)
    settings.CHAIN_RPC_URL = relay.url
    settings.INDEXER_BLOCK_RANGE = SPAN
    yield relay
    relay.stop()


def within(span: tuple[int, int], block: int) -> bool:
    return span[0] <= block <= span[1]


def test_an_escrow_unknown_here_is_read_in_bounded_spans_from_the_deployment_block(escrow_chain, capped_rpc):
    chain = escrow_chain
    esc = Escrows(chain)
    chain.mine(5 * SPAN)
    unknown = UsageAgreement(id=uuid.uuid4(), buyer_wallet_address=esc.acc.buyer.address)  # no row, no transaction
    onchain_id = unknown.onchain_id
    _, activation = esc.activate(agreement_id=onchain_id)
    chain.mine(5 * SPAN)
    first = esc.propose(onchain_id, 1, 100_000)
    chain.mine(3 * SPAN)
    last_digest = random_bytes32()
    last = esc.propose(onchain_id, 2, 200_000, usage_digest=last_digest)
    chain.mine(5 * SPAN)

    record = selectors.onchain_escrow(agreement=unknown)
    assert (record["state"], record["settledAmount"], record["usageDigest"]) == ("proposed", 200_000, last_digest)
    spans = capped_rpc.log_ranges
    assert all(end - start + 1 <= SPAN for start, end in spans)
    # Forward from the deployment block to the activation's span...
    assert spans[0][0] == chain.addresses["escrow_block"]
    found_at = next(index for index, span in enumerate(spans) if within(span, activation["blockNumber"]))
    # ...then back from the head: the last proposal's span is the last asked for, the first proposal's never.
    proposals = spans[found_at + 1:]
    assert within(proposals[0], chain.block_number()) and within(proposals[-1], last["blockNumber"])
    assert not any(within(span, first["blockNumber"]) for span in proposals)
    assert selectors.escrow_terms(agreement=unknown)[4] == record["depositAmount"]


def test_an_escrow_activated_here_is_read_from_its_activation_block(escrow_chain, capped_rpc,
                                                                     django_capture_on_commit_callbacks):
    parties = Parties(escrow_chain)
    agreement = parties.accepted_agreement()
    escrow_chain.mine(10 * SPAN)
    parties.activate(agreement["id"], django_capture_on_commit_callbacks)
    mined_at = ChainTransaction.objects.get(agreement_id=agreement["id"]).mined_block_number
    escrow_chain.mine(10 * SPAN)

    capped_rpc.log_ranges.clear()
    status = parties.buyer_api.get(f"/usage-agreements/{agreement['id']}/escrow-status", {"verify": "true"}).json()
    assert status["onchain"]["state"] == "active"
    assert len(capped_rpc.log_ranges) == 1 and within(capped_rpc.log_ranges[0], mined_at)


def test_a_span_a_node_answers_out_of_order_is_read_oldest_first(monkeypatch, settings):
    """Callers take the span's last log as the newest (the latest use of an authorization, the latest proposal):
    a node answering its logs in another order made an older one the newest."""
    from escrow import chain

    settings.INDEXER_BLOCK_RANGE = 100
    answered = [{"blockNumber": 12, "logIndex": 0}, {"blockNumber": 11, "logIndex": 3}, {"blockNumber": 12, "logIndex": 1}]
    monkeypatch.setattr(chain, "logs", lambda **query: list(answered))
    found = chain.first_logs(address="0x" + "11" * 20, topics=[], from_block=0, to_block=99, newest_first=True)
    assert [(log["blockNumber"], log["logIndex"]) for log in found] == [(11, 3), (12, 0), (12, 1)]



def test_an_escrow_never_activated_is_read_without_a_log_search(escrow_chain, capped_rpc):
    """`escrow-status?verify=true` is a read key's: for an agreement never activated (a proposal costs nothing), it
    searched every span from the deployment block to the head for the Activated event, one eth_getLogs per
    INDEXER_BLOCK_RANGE blocks (on Base, about 16,000 per year of the deployment's age) on every call. The contract
    answers in one call whether the buyer activated the id (`termsDigest`)."""
    parties = Parties(escrow_chain)
    agreement = parties.accepted_agreement()
    escrow_chain.mine(10 * SPAN)

    capped_rpc.log_ranges.clear()
    status = parties.buyer_api.get(f"/usage-agreements/{agreement['id']}/escrow-status", {"verify": "true"})
    assert status.status_code == 200, status.content
    assert status.json()["onchain"]["state"] == "none"
    assert capped_rpc.log_ranges == []


def test_an_escrow_the_buyer_funded_itself_is_read_from_the_block_the_indexer_found_it_in(
        escrow_chain, capped_rpc, django_capture_on_commit_callbacks):
    """An activation sent by anyone but the relayer (the buyer's own intent relayed by a stranger) left its block
    unknown to the escrow's reads: each `verify=true` searched every span from the deployment block again, which a
    buyer funding one escrow itself could make the platform do at its read key's rate."""
    parties = Parties(escrow_chain)
    agreement = parties.accepted_agreement()
    escrow_chain.mine(10 * SPAN)
    package = parties.buyer_api.get(f"/usage-agreements/{agreement['id']}/activation-package").json()
    signed = sign_activation(escrow_chain, package, parties.agreement(agreement["id"]), parties.buyer_account.key)
    permit = signed["escrow_permit"]
    mined(escrow_chain, escrow_chain.escrow.functions.activate(
        td.message_tuple(package["intent"]), signed["intent_signature"],
        td.onchain_permit(value=permit["value"], deadline=permit["deadline"], signature=permit["signature"]),
        td.EMPTY_PERMIT,
    ).transact({"from": escrow_chain.accounts.stranger.address, "gas": 1_000_000}))
    activated_at = escrow_chain.block_number()
    index(django_capture_on_commit_callbacks)
    assert parties.agreement(agreement["id"])["status"] == "active"
    escrow_chain.mine(10 * SPAN)

    capped_rpc.log_ranges.clear()
    status = parties.buyer_api.get(f"/usage-agreements/{agreement['id']}/escrow-status", {"verify": "true"}).json()
    assert status["onchain"]["state"] == "active"
    assert len(capped_rpc.log_ranges) == 1 and within(capped_rpc.log_ranges[0], activated_at)
