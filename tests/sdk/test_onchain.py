"""The SDK's chain reads (`sdk.onchain.ChainReader`) through an RPC that, like public Base RPCs, refuses an
eth_getLogs over more than a few blocks: the escrow's events are read in bounded spans, from a known block on, and
no further than they need."""

import threading
import time
import uuid
from dataclasses import replace

import httpx
import pytest

from sdk import MarketplaceClient, receipts
from sdk.onchain import ChainReader
from sdk.terms import stated_terms_hash
from tests.escrow.conftest import Escrows, random_bytes32
from tests.escrow.flow import network_of
from tests.support.rpc_relay import RpcRelay

pytestmark = pytest.mark.chain

SPAN = 8  # the most blocks the RPC (and the reader) takes in one eth_getLogs


@pytest.fixture
def capped_rpc(chain):
    relay = RpcRelay(chain.node.rpc_url).start()
    relay.cap_log_span(SPAN)
    yield relay
    relay.stop()


def within(span: tuple[int, int], block: int) -> bool:
    return span[0] <= block <= span[1]


def test_an_escrow_read_walks_bounded_spans_to_the_activation_and_back_from_the_head_to_the_last_proposal(
        chain, capped_rpc):
    esc = Escrows(chain)
    deployed_at = chain.addresses["escrow_block"]
    chain.mine(5 * SPAN)
    typed, activation = esc.activate()
    agreement_id = typed["message"]["agreementId"]
    chain.mine(5 * SPAN)
    first = esc.propose(agreement_id, 1, 100_000)
    chain.mine(3 * SPAN)
    last_digest = random_bytes32()
    last = esc.propose(agreement_id, 2, 200_000, usage_digest=last_digest)
    chain.mine(5 * SPAN)
    head = chain.block_number()
    buyer = chain.accounts.buyer.address

    reader = ChainReader(capped_rpc.url, log_block_span=SPAN)
    try:
        escrow = reader.escrow(chain.addresses["escrow"], agreement_id, buyer=buyer, from_block=deployed_at)
        assert (escrow.state, escrow.settled_amount, escrow.last_seq) == ("proposed", 200_000, 2)
        assert escrow.usage_digest == last_digest and escrow.buyer == chain.accounts.buyer.address
        spans = capped_rpc.log_ranges
        assert all(end - start + 1 <= SPAN for start, end in spans)
        # Forward from the deployment block, span after span, up to the one holding the activation...
        found_at = next(index for index, span in enumerate(spans) if within(span, activation["blockNumber"]))
        forward, backward = spans[:found_at + 1], spans[found_at + 1:]
        assert forward[0][0] == deployed_at
        assert all(later[0] == earlier[1] + 1 for earlier, later in zip(forward, forward[1:], strict=False))
        # ...then back from the head, span after span, up to the one holding the last proposal, and no further.
        assert within(backward[0], head) and within(backward[-1], last["blockNumber"])
        assert all(later[1] == earlier[0] - 1 for earlier, later in zip(backward, backward[1:], strict=False))
        assert not any(within(span, first["blockNumber"]) for span in backward)

        # Started at the activation's block: one call finds it. Started past it: no escrow there.
        capped_rpc.log_ranges.clear()
        assert reader.escrow(chain.addresses["escrow"], agreement_id, buyer=buyer,
                             from_block=reader.transaction_block("0x" + activation["transactionHash"].hex().removeprefix("0x"))
                             ).usage_digest == last_digest
        assert within(capped_rpc.log_ranges[0], activation["blockNumber"])
        assert reader.escrow(chain.addresses["escrow"], agreement_id, buyer=buyer,
                             from_block=activation["blockNumber"] + 1).state == "none"
        # Escrows are keyed by (buyer, id): another buyer has none under this id.
        assert reader.escrow(chain.addresses["escrow"], agreement_id, buyer=chain.accounts.buyer2.address,
                             from_block=activation["blockNumber"]).state == "none"
    finally:
        reader.close()


def listed_agreement(chain) -> dict:
    """An agreement as the marketplace lists it (what `verify_usage` reads of it): `Escrows.intent`'s terms, 10 units
    at 0.1 USDC."""
    agreement_id = uuid.uuid4()
    return {"id": str(agreement_id), "onchain_id": "0x" + agreement_id.hex.rjust(64, "0"),
            "service": {"id": str(uuid.uuid4())}, "pricing_type": "per_call", "unit_name": "call",
            "quantity": 10, "price_per_unit_atomic": "100000", "infra_fee_atomic": "103000", "token": "USDC",
            "challenge_window_seconds": 600, "expires_at": chain.now() + 86_400,
            "buyer_wallet_address": chain.accounts.buyer.address,
            "seller_wallet_address": chain.accounts.seller.address, "fee_recipient": "0x" + "fe" * 20}


def activated_agreement(chain, network) -> dict:
    """A listed agreement whose buyer's escrow is activated for exactly its terms."""
    agreement = listed_agreement(chain)
    Escrows(chain).activate(agreement_id=agreement["onchain_id"], expires_at=agreement["expires_at"],
                            terms_hash=stated_terms_hash(agreement, network))
    return agreement


def test_usage_listed_on_an_agreement_with_no_escrow_on_chain_is_a_usage_verification_error(chain):
    """The books say active, the chain has no escrow (not yet mined, or a reorg took it): charges listed against
    nothing are refused as UsageAboveDeposit (the escrow holds 0), not with the SigningRefused of a buyer check."""
    agreement = listed_agreement(chain)
    request_id = "req_1:0"
    digest = receipts.usage_digests(receipts.ZERO_DIGEST, agreement_id=agreement["onchain_id"],
                                    events=[(1, 1, 100_000, 100_000, request_id)])[0]
    event = {"seq": 1, "units": 1, "cost_atomic": 100_000, "cumulative_atomic": 100_000, "request_id": request_id,
             "usage_digest": digest, "receipt_signature": ""}
    listing = httpx.MockTransport(lambda request: httpx.Response(200, json={"results": [event], "next_cursor": None}))
    with MarketplaceClient("https://marketplace.example", "mk_test", network=network_of(chain),
                           rpc_url=chain.node.rpc_url, transport=listing) as buyer:
        with pytest.raises(receipts.UsageAboveDeposit):
            buyer.verify_usage(agreement, buyer_wallet_address=chain.accounts.buyer.address)


def test_verify_usage_reads_the_escrow_from_no_earlier_than_its_pinned_deployment(chain, capped_rpc):
    """The marketplace names the activation's transaction, whose block the escrow's events are read from: a
    compromised one naming a transaction older than the escrow had the SDK read every span from there (on Base,
    tens of thousands of eth_getLogs calls), though the pinned network says where the escrow's events begin."""
    older = next(tx for number in range(chain.addresses["escrow_block"] + 1)
                 for tx in chain.w3.eth.get_block(number, full_transactions=True)["transactions"])
    chain.mine(10 * SPAN)
    pinned = chain.block_number()  # no escrow event before it: the buyer's network pins it as the deployment
    network = replace(network_of(chain), escrow_deployment_block=pinned)
    agreement = {**activated_agreement(chain, network),
                 "activation_tx_hash": "0x" + older["hash"].hex().removeprefix("0x")}
    listing = httpx.MockTransport(lambda request: httpx.Response(200, json={"results": [], "next_cursor": None}))
    with MarketplaceClient("https://marketplace.example", "mk_test", network=network, rpc_url=capped_rpc.url,
                           rpc_log_block_span=SPAN, transport=listing) as buyer:
        assert buyer.verify_usage(agreement, buyer_wallet_address=chain.accounts.buyer.address).events == 0
    assert capped_rpc.log_ranges[0][0] == pinned, f"read from block {capped_rpc.log_ranges[0][0]}, pinned {pinned}"


class EndlessZeroUnitListing:
    """A compromised marketplace's usage listing: zero-unit events (legitimate, so not refused), each extending the
    digest chain, page after page without end, until `stop` is set (then its last page)."""

    def __init__(self, onchain_id: str):
        self.onchain_id, self.seq, self.digest = onchain_id, 0, receipts.ZERO_DIGEST
        self.stop = threading.Event()

    def __call__(self, request: httpx.Request) -> httpx.Response:
        events = []
        for _ in range(100):
            self.seq += 1
            request_id = uuid.uuid4().hex
            self.digest = receipts.usage_digests(self.digest, agreement_id=self.onchain_id,
                                                 events=[(self.seq, 0, 0, 0, request_id)])[0]
            events.append({"seq": self.seq, "units": 0, "cost_atomic": 0, "cumulative_atomic": 0,
                           "request_id": request_id, "usage_digest": self.digest, "receipt_signature": ""})
        return httpx.Response(200, json={"results": events,
                                         "next_cursor": None if self.stop.is_set() else uuid.uuid4().hex})


def test_verify_usage_ends_within_its_timeout_however_long_the_listing(chain):
    """Zero-unit events cost nothing, so neither the deposit nor the agreed quantity bounds how many a listing may
    hold: a compromised marketplace listing them without end held verify_usage (and the buyer's CPU) for ever."""
    agreement = activated_agreement(chain, network_of(chain))
    listing = EndlessZeroUnitListing(agreement["onchain_id"])
    outcome: dict[str, object] = {}

    def verify() -> None:
        with MarketplaceClient("https://marketplace.example", "mk_test", network=network_of(chain),
                               rpc_url=chain.node.rpc_url, transport=httpx.MockTransport(listing)) as buyer:
            started = time.monotonic()
            try:
                outcome["result"] = buyer.verify_usage(agreement, buyer_wallet_address=chain.accounts.buyer.address,
                                                       timeout=1.0)
            except Exception as error:  # noqa: BLE001 - handed to the test thread
                outcome["error"] = error
            outcome["seconds"] = time.monotonic() - started

    thread = threading.Thread(target=verify, daemon=True)
    thread.start()
    thread.join(timeout=10)
    listing.stop.set()  # a verification still running ends on the next page
    thread.join(timeout=10)
    # The listing ends only once the first join gave up (10 s): a verification that ended well before ended by its
    # own timeout (1 s), whatever a loaded machine added to it.
    assert "seconds" in outcome and outcome["seconds"] < 5, f"verify_usage outlasted its timeout: {outcome}"
    error = outcome.get("error")
    assert isinstance(error, receipts.UsageVerificationTimedOut) and isinstance(error, TimeoutError), outcome
    assert f"{error.events} events" in str(error) and error.events > 0, str(error)


def test_verify_usage_reads_the_buyers_own_escrow_not_another_buyers_the_marketplace_names(chain):
    """Escrows are keyed by (buyer, agreement id), and anyone may open one of their own under an agreement's id. A
    compromised marketplace stating another wallet as the agreement's buyer had verify_usage read that wallet's escrow
    (opened for exactly the terms stated, its receipt signer the attacker's key), so charges listed and signed by the
    attacker verified, while the buyer's own escrow was charged as the marketplace pleased. The buyer is the wallet the
    caller names (or this client activated the agreement with), never the marketplace's word."""
    network = network_of(chain)
    escrows = Escrows(chain)
    agreement = activated_agreement(chain, network)  # the buyer's own escrow, named the platform's receipt signer
    attacker = chain.accounts.stranger
    forged = {**agreement, "buyer_wallet_address": chain.accounts.buyer2.address}
    escrows.activate(buyer=chain.accounts.buyer2, agreement_id=forged["onchain_id"], expires_at=forged["expires_at"],
                     terms_hash=stated_terms_hash(forged, network), receipt_signer=attacker.address)
    request_id = "req_1:0"
    digest = receipts.usage_digests(receipts.ZERO_DIGEST, agreement_id=agreement["onchain_id"],
                                    events=[(1, 1, 100_000, 100_000, request_id)])[0]
    event = {"seq": 1, "units": 1, "cost_atomic": 100_000, "cumulative_atomic": 100_000, "request_id": request_id,
             "usage_digest": digest, "receipt_signer": attacker.address,
             "receipt_signature": escrows.receipt_sig(agreement["onchain_id"], 1, 100_000, digest, signer=attacker)}
    listing = httpx.MockTransport(lambda request: httpx.Response(200, json={"results": [event], "next_cursor": None}))
    with MarketplaceClient("https://marketplace.example", "mk_test", network=network, rpc_url=chain.node.rpc_url,
                           transport=listing) as buyer:
        with pytest.raises(TypeError, match="buyer_wallet_address"):  # not activated by this client: name the buyer
            buyer.verify_usage(forged)
        with pytest.raises(receipts.UsageTermsMismatch, match="buyer"):
            buyer.verify_usage(forged, buyer_wallet_address=chain.accounts.buyer.address)
        # Read on the buyer's own escrow, the attacker's receipt is another signer's.
        with pytest.raises(receipts.ReceiptSignerMismatch):
            buyer.verify_usage(agreement, buyer_wallet_address=chain.accounts.buyer.address.lower())


def test_an_activation_transaction_named_after_the_escrows_does_not_hide_its_settlement_proposal(chain):
    """The escrow's events are read from the block of the agreement's `activation_tx_hash`, the marketplace's word. A
    compromised one naming a transaction mined after the activation (here, its own settlement proposal's) had the
    escrow read as never activated, and with no usage listed the verification passed, though the escrow's whole
    deposit was proposed for the seller. The escrow is read again from the pinned deployment then."""
    network = network_of(chain)
    agreement = activated_agreement(chain, network)
    proposal = Escrows(chain).propose(agreement["onchain_id"], 1, 1_000_000)  # the whole deposit, nothing listed
    named_later = {**agreement, "activation_tx_hash": "0x" + proposal["transactionHash"].hex().removeprefix("0x")}
    listing = httpx.MockTransport(lambda request: httpx.Response(200, json={"results": [], "next_cursor": None}))
    with MarketplaceClient("https://marketplace.example", "mk_test", network=network, rpc_url=chain.node.rpc_url,
                           transport=listing) as buyer:
        with pytest.raises(receipts.SettlementProposalMismatch):
            buyer.verify_usage(named_later, buyer_wallet_address=chain.accounts.buyer.address)
