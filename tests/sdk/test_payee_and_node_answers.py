"""Who the buyer's money goes to, and what the buyer's RPC node answers, when neither can be trusted: the seller's
wallet of an escrow is the marketplace's word unless the buyer names it, an activation package's own statements
(escrow contract, chain, token, amounts) must be the buyer's, and a node's undecodable answer is a refusal, not a
crash. Without a chain: the marketplace is an httpx `MockTransport`, the node a stub on loopback."""

from __future__ import annotations

import dataclasses
import json
import os
import time
import uuid
import warnings
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler
from typing import Any

import httpx
import pytest
from eth_abi import encode
from eth_account import Account
from eth_utils import keccak

from sdk import AgreedTerms, MarketplaceClient, NotConfigured, SellerUnverified, SigningRefused
from sdk.activation import expected_activation, sign_activation_package
from sdk.onchain import ChainReader, MalformedAnswer
from tests.sdk.test_signing_bounds import (DOMAIN, KEY, LISTED_PRICE, NETWORK, SELLER, DirectMarketplace,
                                           EscrowMarketplace, JsonRpcNode, MasumiMarketplace, buy_masumi_job,
                                           escrow_buyer, proposed_escrow)
from tests.support.http_server import serving

ATTACKER = Account.from_key(b"\x07" * 32).address  # fixed: test ids must be the same in every xdist worker


def pays_the_attacker(agreement: dict[str, Any]) -> None:
    """The agreement's payee (the intent's `seller`): the compromised marketplace's own wallet, not the seller's."""
    agreement["seller_wallet_address"] = ATTACKER


# --- the seller's wallet of an escrow ------------------------------------------------------------------------------

def test_an_escrow_paying_another_wallet_than_the_expected_seller_is_not_signed():
    """An escrow's payee was the marketplace's word: the intent's `seller` (who is paid the deposit used) was taken
    from the agreement unchecked, and `activate_escrow` had no way to name it. With
    `expected_seller_wallet_address=` it must be that wallet, as a direct purchase's payee."""
    marketplace = EscrowMarketplace(pays_the_attacker)
    with escrow_buyer(marketplace) as buyer:
        agreement = buyer.propose_agreement(str(uuid.uuid4()), 10, max_unit_price_atomic=LISTED_PRICE)
        with pytest.raises(SigningRefused) as refusal:
            buyer.activate_escrow(agreement, KEY, permit_nonce=0, expected_seller_wallet_address=SELLER)
    assert (refusal.value.field, refusal.value.received) == ("agreement.seller_wallet_address", ATTACKER)
    assert "paid" in str(refusal.value)
    assert marketplace.activated == []
    honest = EscrowMarketplace()
    with escrow_buyer(honest) as buyer:
        agreement = buyer.propose_agreement(str(uuid.uuid4()), 10, max_unit_price_atomic=LISTED_PRICE)
        buyer.activate_escrow(agreement, KEY, permit_nonce=0, expected_seller_wallet_address=SELLER.lower())
    assert len(honest.activated) == 1


def test_the_seller_expected_at_the_proposal_holds_the_activation():
    """Named at the proposal, the seller's wallet is held by the answer and by the agreement activated later (read
    back with another payee), without naming it again."""
    with escrow_buyer(EscrowMarketplace(pays_the_attacker)) as buyer:
        with pytest.raises(SigningRefused) as refusal:
            buyer.propose_agreement(str(uuid.uuid4()), 10, max_unit_price_atomic=LISTED_PRICE,
                                    expected_seller_wallet_address=SELLER)
    assert refusal.value.field == "agreement.seller_wallet_address"
    marketplace = EscrowMarketplace(alter_read=pays_the_attacker)
    with escrow_buyer(marketplace) as buyer:
        agreement = buyer.propose_agreement(str(uuid.uuid4()), 10, max_unit_price_atomic=LISTED_PRICE,
                                            expected_seller_wallet_address=SELLER)
        with pytest.raises(SigningRefused) as refusal:
            buyer.activate_escrow(buyer.get_agreement(agreement["id"]), KEY, permit_nonce=0)
        assert refusal.value.field == "agreement.seller_wallet_address"
    assert marketplace.activated == []
    honest = EscrowMarketplace()
    with escrow_buyer(honest) as buyer:
        agreement = buyer.propose_agreement(str(uuid.uuid4()), 10, max_unit_price_atomic=LISTED_PRICE,
                                            expected_seller_wallet_address=SELLER)
        buyer.activate_escrow(buyer.get_agreement(agreement["id"]), KEY, permit_nonce=0)
    assert len(honest.activated) == 1


def test_a_masumi_job_paying_another_wallet_than_the_expected_seller_is_not_signed():
    marketplace = MasumiMarketplace(pays_the_attacker)
    with pytest.raises(SigningRefused) as refusal:
        buy_masumi_job(marketplace, expected_seller_wallet_address=SELLER)
    assert refusal.value.field == "agreement.seller_wallet_address"
    assert marketplace.locked == []
    assert buy_masumi_job(MasumiMarketplace(), expected_seller_wallet_address=SELLER)


# --- what an activation package states beside what is signed -------------------------------------------------------

def honest_agreement() -> dict[str, Any]:
    """An escrow agreement of 10 calls at the listed price, as the marketplace states it."""
    agreement_id = str(uuid.uuid4())
    now = int(time.time())
    return {"id": agreement_id, "onchain_id": "0x" + uuid.UUID(agreement_id).hex.rjust(64, "0"),
            "service": {"id": str(uuid.uuid4())}, "quantity": 10, "price_per_unit_atomic": LISTED_PRICE,
                 "deposit_amount_atomic": 10 * LISTED_PRICE, "infra_fee_atomic": NETWORK.fee_schedule.fee_for(
                     10 * LISTED_PRICE), "chain_id": NETWORK.chain_id, "token_address": NETWORK.token_address,
                 "settlement_model": "escrow", "pricing_type": "per_call", "unit_name": "call", "token": "USDC",
                 "buyer_wallet_address": Account.from_key(KEY).address, "seller_wallet_address": SELLER,
                 "fee_recipient": NETWORK.gas_wallet, "expires_at": now + 86_400, "challenge_window_seconds": 3600}


def honest_package() -> tuple[dict[str, Any], AgreedTerms]:
    agreement = honest_agreement()
    agreement_id, now = agreement["id"], int(time.time())
    terms = AgreedTerms.from_agreement(agreement, NETWORK)
    package = {"agreement_id": agreement_id, "onchain_id": terms.agreement_id, "chain_id": NETWORK.chain_id,
               "escrow_contract": NETWORK.escrow_address, "token_address": NETWORK.token_address,
               "deposit_amount_atomic": terms.deposit_amount, "infra_fee_atomic": terms.infra_fee,
               "deadline": now + 600, **expected_activation(terms=terms, network=NETWORK, token_domain=DOMAIN,
                                                            deadline=now + 600, permit_nonce=0)}
    return package, terms


@pytest.mark.parametrize(("field", "value"), [
    ("escrow_contract", ATTACKER),
    ("chain_id", 8453),
    ("token_address", ATTACKER),
    ("deposit_amount_atomic", 10**12),
    ("infra_fee_atomic", 10**12),
    ("onchain_id", "0x" + "ab" * 32),
    ("agreement_id", "7d4ab7e4-3f0b-4c6e-9a51-2b8f0c1d9e77"),
])
def test_an_activation_package_stating_another_escrow_chain_token_or_amount_is_not_signed(field, value):
    """The package's own statements (the escrow contract, chain, token, amounts and agreement it is for) were
    accepted as anything: only the intent and the permit were compared. A package that says the deposit goes to
    another contract, on another chain, or is another amount, is the marketplace asking for something else."""
    package, terms = honest_package()
    assert sign_activation_package(package, KEY, terms=terms, network=NETWORK, token_domain=DOMAIN, permit_nonce=0)
    with pytest.raises(SigningRefused) as refusal:
        sign_activation_package({**package, field: value}, KEY, terms=terms, network=NETWORK, token_domain=DOMAIN,
                                permit_nonce=0)
    assert refusal.value.field == field


def test_sign_activation_package_holds_the_expected_seller():
    package, terms = honest_package()
    assert sign_activation_package(package, KEY, terms=terms, network=NETWORK, token_domain=DOMAIN,
                                   expected_seller_wallet_address=SELLER, permit_nonce=0)
    with pytest.raises(SigningRefused) as refusal:
        sign_activation_package(package, KEY, terms=terms, network=NETWORK, token_domain=DOMAIN,
                                expected_seller_wallet_address=ATTACKER, permit_nonce=0)
    assert refusal.value.field == "agreement.seller_wallet_address"


# --- the buyer's RPC node: answers that do not decode -------------------------------------------------------------

NOT_UTF8 = b"USD\xff\xfeCoin"


def _selector(signature: str) -> str:
    return "0x" + keccak(text=signature)[:4].hex()


def _abi_string(raw: bytes) -> bytes:
    """An ABI `string` whose bytes are `raw` (not necessarily UTF-8)."""
    return encode(["bytes"], [raw])


def token_node(*, eip712_domain: bytes | None, name: bytes = b"", chain_id: Any = "0x14a34"
               ) -> type[BaseHTTPRequestHandler]:
    """A node whose token answers `eip712Domain()` with `eip712_domain` (reverts when None), `name()` with `name`."""

    class Node(JsonRpcNode):
        def do_POST(self) -> None:
            call = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            method, params = call["method"], call["params"]
            answer: dict[str, Any] = {"jsonrpc": "2.0", "id": call["id"]}
            if method == "eth_chainId":
                answer["result"] = chain_id
            elif method == "eth_getBlockByNumber":
                answer["result"] = {"timestamp": hex(int(time.time()))}
            elif params[0]["data"] == _selector("eip712Domain()"):
                if eip712_domain is None:
                    answer["error"] = {"code": 3, "message": "execution reverted"}
                else:
                    answer["result"] = "0x" + eip712_domain.hex()
            elif params[0]["data"] == _selector("name()"):
                answer["result"] = "0x" + name.hex()
            elif params[0]["data"] == _selector("version()"):
                answer["result"] = "0x" + _abi_string(b"2").hex()
            else:
                raise AssertionError(call)
            self.answer_json(json.dumps(answer).encode())

    return Node


def eip712_domain_named(name: bytes) -> bytes:
    """An EIP-5267 answer whose name's bytes are `name`: the string's bytes patched in after encoding."""
    honest = encode(["bytes1", "string", "string", "uint256", "address", "bytes32", "uint256[]"],
                    [b"\x0f", "x" * len(name), "2", 84532, NETWORK.token_address, b"\x00" * 32, []])
    return honest.replace(b"x" * len(name), name, 1)


@pytest.mark.parametrize("node", [
    token_node(eip712_domain=eip712_domain_named(NOT_UTF8), name=_abi_string(NOT_UTF8)),
    token_node(eip712_domain=None, name=_abi_string(NOT_UTF8)),
    token_node(eip712_domain=b"", name=_abi_string(NOT_UTF8)),  # eip712Domain() answering nothing
    token_node(eip712_domain=None, name=b"\x00" * 7),  # name() too short to be a string
], ids=["eip712Domain", "name", "empty eip712Domain", "short name"])
def test_a_token_name_read_through_the_rpc_that_does_not_decode_is_refused(node):
    """A hostile node's token `name()` that is not UTF-8 (the EIP-712 domain name of every permit signed) raised
    UnicodeDecodeError out of the SDK (and an answer too short to be a string, eth_abi's InsufficientDataBytes)."""
    with serving(node) as rpc_url:
        with pytest.raises(MalformedAnswer):
            ChainReader(rpc_url).token_domain(NETWORK.token_address)
        for network in (NETWORK, dataclasses.replace(NETWORK, token_domain=None)):
            with MarketplaceClient("https://marketplace.example", "mk_test", network=network,
                                   rpc_url=rpc_url) as buyer:
                with pytest.raises(SigningRefused) as refusal:
                    buyer.token_domain()
                assert refusal.value.field == "token domain"


def test_a_token_domain_falls_back_to_name_when_eip712domain_does_not_decode():
    with serving(token_node(eip712_domain=eip712_domain_named(NOT_UTF8), name=_abi_string(b"USDC"))) as rpc_url:
        with MarketplaceClient("https://marketplace.example", "mk_test", network=NETWORK, rpc_url=rpc_url) as buyer:
            assert buyer.token_domain() == DOMAIN


@pytest.mark.parametrize("chain_id", ["0xzz", ["0x1"], None])
def test_a_chain_id_that_is_not_a_number_is_refused(chain_id):
    """The node's chain id, checked against the pinned one before its token domain is believed, raised ValueError
    or TypeError when it was not a hex number."""
    with serving(token_node(eip712_domain=eip712_domain_named(b"USDC"), chain_id=chain_id)) as rpc_url:
        with MarketplaceClient("https://marketplace.example", "mk_test", network=NETWORK, rpc_url=rpc_url) as buyer:
            with pytest.raises(SigningRefused) as refusal:
                buyer.token_domain()
    assert refusal.value.field == "rpc chain id"


def direct_purchase_node(*, nonce_answer: str, timestamp: Any) -> type[BaseHTTPRequestHandler]:
    """A node whose token's `nonces(buyer)` answers `nonce_answer` (raw ABI data) and whose latest block's timestamp
    is `timestamp`; its token's domain is the pinned one."""
    domain = eip712_domain_named(b"USDC")

    class Node(JsonRpcNode):
        def do_POST(self) -> None:
            call = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            method, params = call["method"], call["params"]
            if method == "eth_chainId":
                result: Any = hex(NETWORK.chain_id)
            elif method == "eth_getBlockByNumber":
                result = {"timestamp": timestamp}
            elif params[0]["data"] == _selector("eip712Domain()"):
                result = "0x" + domain.hex()
            elif params[0]["data"].startswith(_selector("nonces(address)")):
                result = nonce_answer
            else:
                raise AssertionError(call)
            self.answer_json(json.dumps({"jsonrpc": "2.0", "id": call["id"], "result": result}).encode())

    return Node


@pytest.mark.parametrize(("nonce_answer", "timestamp", "field"), [
    ("0x", hex(int(time.time())), "fee_permit.message.nonce"),  # nonces(buyer) answering nothing
    ("0x1234", hex(int(time.time())), "fee_permit.message.nonce"),
    ("0x" + encode(["uint256"], [0]).hex(), "soon", "rpc clock"),
    ("0x" + encode(["uint256"], [0]).hex(), None, "rpc clock"),
], ids=["nonce answering nothing", "nonce too short", "clock not hex", "clock missing"])
def test_a_permit_nonce_or_clock_that_does_not_decode_is_refused(nonce_answer, timestamp, field):
    """The token's nonce (of the fee permit a direct purchase signs) and the chain's clock (of every deadline) read
    through a hostile node raised eth_abi's InsufficientDataBytes, ValueError or TypeError out of the SDK."""
    marketplace = DirectMarketplace(refusals=0)
    with serving(direct_purchase_node(nonce_answer=nonce_answer, timestamp=timestamp)) as rpc_url:
        with MarketplaceClient("https://marketplace.example", "mk_test", network=NETWORK, rpc_url=rpc_url,
                               transport=httpx.MockTransport(marketplace)) as buyer:
            with pytest.raises(SigningRefused) as refusal:
                buyer.propose_direct_purchase(str(uuid.uuid4()), 10, wallet=KEY, max_unit_price_atomic=LISTED_PRICE)
    assert refusal.value.field == field
    assert marketplace.fee_permits == []


def node_answering(result: Any) -> ChainReader:
    """A reader of a node that answers every call with `result`."""
    return ChainReader("https://node.invalid", transport=httpx.MockTransport(lambda request: httpx.Response(
        200, json={"jsonrpc": "2.0", "id": json.loads(request.content)["id"], "result": result})))


@pytest.mark.parametrize(("read", "result"), [
    pytest.param(ChainReader.block_number, "soon", id="block number not hex"),
    pytest.param(ChainReader.block_number, 12, id="block number a JSON number"),
    pytest.param(lambda reader: reader.transaction_block("0x" + "ab" * 32), {"blockNumber": "soon"},
                 id="transaction's block not hex"),
    pytest.param(lambda reader: reader.transaction_block("0x" + "ab" * 32), {"blockNumber": 12},
                 id="transaction's block a JSON number"),
])
def test_a_block_number_that_does_not_decode_is_a_malformed_answer(read, result):
    """The head's and a transaction's block numbers were int(x, 16) of the node's answer, unchecked: ValueError or
    TypeError out of `verify_usage` (which falls back from an activation hash the node refuses, `RpcError`)."""
    reader = node_answering(result)
    with pytest.raises(MalformedAnswer):
        read(reader)
    reader.close()


@pytest.mark.parametrize("quantity", ["2105", "-0x1", "+0x10", "0x1_0", " 0x10", "0x10\n", "0x\uff11\uff10", "0X10",
                                      "0x", "0x" + "f" * 65],
                         ids=["decimal", "negative", "signed", "underscored", "spaced", "newline", "fullwidth digits",
                              "capital x", "no digits", "past uint256"])
@pytest.mark.parametrize("read", [
    pytest.param(ChainReader.chain_id, id="chain id"),
    pytest.param(ChainReader.block_number, id="block number"),
    pytest.param(ChainReader.now, id="clock"),
])
def test_a_quantity_in_other_spellings_than_json_rpc_hex_is_a_malformed_answer(read, quantity):
    """A node's quantities were int(x, 16) of its answer: a decimal "2105" read as 0x2105, "-0x1" as -1 (a head
    before genesis, every escrow read as never activated), underscores, spaces, a sign and digits of other scripts
    as the number they spell. A JSON-RPC quantity is "0x" and at most 64 hex digits."""
    reader = node_answering({"timestamp": quantity} if read is ChainReader.now else quantity)
    with pytest.raises(MalformedAnswer):
        read(reader)
    reader.close()


def test_an_activation_package_whose_permit_nonce_is_no_uint256_is_refused():
    """A permit nonce of 2**256 in the package raised ValueError from the typed-data builder, not SigningRefused."""
    package, terms = honest_package()
    package["escrow_permit"]["message"]["nonce"] = 2**256
    with pytest.raises(SigningRefused) as refusal:
        sign_activation_package(package, KEY, terms=terms, network=NETWORK, token_domain=DOMAIN, permit_nonce=0)
    assert refusal.value.field == "escrow_permit.message.nonce"


def _recording_marketplace(requests: list[httpx.Request]) -> MarketplaceClient:
    """A buyer's client of a marketplace that records each request in `requests` and answers it 500: a refusal
    before anything is sent leaves `requests` empty."""
    def marketplace(request: httpx.Request) -> httpx.Response:
        requests.append(request)
        return httpx.Response(500)

    return MarketplaceClient("https://marketplace.example", "mk_test", network=NETWORK,
                             transport=httpx.MockTransport(marketplace))


@pytest.mark.parametrize(("field", "value"), [
    ("price_per_unit_atomic", "2e4"),
    ("price_per_unit_atomic", 20_000.5),  # was signed as 20,000: the marketplace's number, rounded by the SDK
    ("price_per_unit_atomic", -1),
    ("expires_at", "tomorrow"),
    ("expires_at", True),
    ("seller_wallet_address", "0xnot-an-address"),
    ("buyer_wallet_address", None),
    ("challenge_window_seconds", "an hour"),
])
def test_an_agreement_with_a_malformed_term_is_refused_not_crashed_on(field, value):
    """The terms `activate_escrow` signs are the agreement's, as the marketplace states them: a term that is no
    whole number, date or address raised whatever int(), datetime or eth_utils raised (ValueError, TypeError), or
    was rounded and signed."""
    agreement = {**honest_agreement(), field: value}
    requests: list[httpx.Request] = []
    with _recording_marketplace(requests) as buyer:
        with pytest.raises(SigningRefused) as refusal:
            buyer.activate_escrow(agreement, KEY, permit_nonce=0, quantity=10, max_unit_price_atomic=LISTED_PRICE,
                                  min_challenge_window_seconds=60)
    assert refusal.value.field == f"agreement.{field}"
    assert requests == []
    with pytest.raises(SigningRefused) as refusal:
        AgreedTerms.from_agreement(agreement, NETWORK)
    assert refusal.value.field == f"agreement.{field}"


@pytest.fixture
def local_time_14_hours_ahead_of_utc(monkeypatch):
    """This machine's local time zone: UTC+14 (Kiribati's)."""
    monkeypatch.setenv("TZ", "Etc/GMT-14")
    time.tzset()
    yield
    monkeypatch.undo()
    time.tzset()


def test_an_expiry_without_a_timezone_is_refused_not_read_in_the_machines_local_time(
        local_time_14_hours_ahead_of_utc):
    """An agreement's `expires_at` written without an offset was read in this machine's local time: the expiry the
    buyer's wallet signed, and the terms hash checked against the escrow's, moved by the machine's UTC offset (14
    hours here), an expiry the marketplace (whose dates are UTC) never stated. A date is read with its offset only,
    as every other term is read in one spelling."""
    expires_at = int(time.time()) + 86_400
    naive = datetime.fromtimestamp(expires_at, UTC).replace(tzinfo=None).isoformat()
    agreement = {**honest_agreement(), "expires_at": naive}
    requests: list[httpx.Request] = []
    with _recording_marketplace(requests) as buyer:
        with pytest.raises(SigningRefused) as refusal:
            buyer.activate_escrow(agreement, KEY, permit_nonce=0, quantity=10, max_unit_price_atomic=LISTED_PRICE)
        assert refusal.value.field == "agreement.expires_at"
        with pytest.raises(ValueError, match="expires_at"):  # the buyer's own, which the marketplace reads as UTC
            buyer.propose_agreement(str(uuid.uuid4()), 10, max_unit_price_atomic=LISTED_PRICE,
                                    expires_at=datetime.fromtimestamp(expires_at))
    assert requests == []
    with pytest.raises(SigningRefused) as refusal:
        AgreedTerms.from_agreement(agreement, NETWORK)
    assert refusal.value.field == "agreement.expires_at"
    for spelled in (naive + "Z", naive + "+00:00", datetime.fromtimestamp(expires_at).astimezone().isoformat()):
        assert AgreedTerms.from_agreement({**agreement, "expires_at": spelled}, NETWORK).expires_at == expires_at


class PricedDirectMarketplace(DirectMarketplace):
    """A direct sale whose service states its unit price as `price`."""

    def __init__(self, price: Any):
        super().__init__(refusals=0)
        self.price = price

    def __call__(self, request: httpx.Request) -> httpx.Response:
        if request.url.path.startswith("/agents/services/"):
            return httpx.Response(200, json={"id": request.url.path.rsplit("/", 1)[1],
                                             "pricing": {"unit_price_atomic": self.price},
                                             "seller": {"wallet_address": SELLER}})
        return super().__call__(request)


@pytest.mark.parametrize("price", ["2e4", 20_000.5, -1, None])
def test_a_direct_purchase_of_a_service_priced_as_no_whole_number_is_refused(price):
    """The unit price a direct purchase pays was int() of the marketplace's: 20000.5 was rounded and signed, "2e4"
    raised ValueError, -1 ValueError from the typed-data builder, None TypeError."""
    marketplace = PricedDirectMarketplace(price)
    with MarketplaceClient("https://marketplace.example", "mk_test", network=NETWORK,
                           transport=httpx.MockTransport(marketplace)) as buyer:
        with pytest.raises(SigningRefused) as refusal:
            buyer.propose_direct_purchase(str(uuid.uuid4()), 10, wallet=KEY, max_unit_price_atomic=LISTED_PRICE,
                                          permit_nonce=0)
    assert refusal.value.field == "pricing.unit_price_atomic"
    assert marketplace.fee_permits == []


# --- the receipt signer the buyer's node reports --------------------------------------------------------------------

def test_receipts_are_checked_against_the_pinned_receipt_signer_not_only_the_one_the_node_reports(monkeypatch):
    """Receipts were checked against the escrow's receipt signer as the buyer's RPC read it, never against the
    network's pinned `receipt_signer`: a hostile node reporting its own key as the escrow's signer (the rest of the
    escrow as on-chain) had a listing signed with that key, a hundred calls more than made, verify. The escrow's
    signer must also be a pinned one (`ReceiptSignerMismatch`)."""
    from sdk import receipts
    from sdk.onchain import OnchainEscrow
    from sdk.terms import stated_terms_hash
    from tests.sdk.test_receipts import _signed_listing

    attacker = Account.from_key(b"\x07" * 32)
    agreement = honest_agreement()
    listing = _signed_listing(key=attacker, chain_id=NETWORK.chain_id, escrow_address=NETWORK.escrow_address,
                              agreement_id=agreement["onchain_id"], batches=[[1] * 10], price=LISTED_PRICE)

    def escrow_read(signer: str) -> OnchainEscrow:
        return OnchainEscrow(state="active", buyer=agreement["buyer_wallet_address"], seller=SELLER,
                             receipt_signer=signer, deposit_amount=10 * LISTED_PRICE, settled_amount=0, last_seq=0,
                             usage_digest=receipts.ZERO_DIGEST, terms_hash=stated_terms_hash(agreement, NETWORK))

    reported = {"signer": attacker.address}
    monkeypatch.setattr(ChainReader, "escrow", lambda self, *args, **kwargs: escrow_read(reported["signer"]))
    monkeypatch.setattr(ChainReader, "chain_id", lambda self: NETWORK.chain_id)
    marketplace = httpx.MockTransport(lambda request: httpx.Response(200, json={"results": listing,
                                                                                "next_cursor": None}))
    with MarketplaceClient("https://marketplace.example", "mk_test", network=NETWORK, rpc_url="https://node.invalid",
                           transport=marketplace) as buyer:
        with pytest.raises(receipts.ReceiptSignerMismatch, match="pinned"):
            buyer.verify_usage(agreement, buyer_wallet_address=agreement["buyer_wallet_address"])
        # The pinned signer's own receipts still verify; a rotated-out signer verifies only when pinned as retired.
        reported["signer"] = NETWORK.receipt_signer
        with pytest.raises(receipts.ReceiptSignerMismatch):
            buyer.verify_usage(agreement, buyer_wallet_address=agreement["buyer_wallet_address"])
    retired = dataclasses.replace(NETWORK, receipt_signer=Account.from_key(b"\x08" * 32).address,
                                  retired_receipt_signers=(attacker.address,))
    reported["signer"] = attacker.address
    with MarketplaceClient("https://marketplace.example", "mk_test", network=retired, rpc_url="https://node.invalid",
                           transport=marketplace) as buyer:
        verified = buyer.verify_usage(agreement, buyer_wallet_address=agreement["buyer_wallet_address"])
    assert verified.cumulative_amount == 10 * LISTED_PRICE


def test_the_deposit_the_node_reports_is_held_to_the_agreed_terms(monkeypatch):
    """The deposit the charges are bounded by was the escrow's as the buyer's RPC read it: a hostile node reporting
    a hundred times the deposit the buyer signed for (the terms hash as on-chain) had a listing charging past the
    deposit, its receipts signed by the pinned signer's key (a compromised marketplace holds it), verify. The escrow's
    deposit must be the agreed one, quantity × unit price, which the terms hash commits to (`UsageTermsMismatch`)."""
    from sdk import receipts
    from sdk.onchain import OnchainEscrow
    from sdk.terms import stated_terms_hash
    from tests.sdk.test_receipts import _signed_listing

    signer = Account.from_key(b"\x09" * 32)
    network = dataclasses.replace(NETWORK, receipt_signer=signer.address)
    agreement = honest_agreement()  # 10 calls at the listed price
    listing = _signed_listing(key=signer, chain_id=network.chain_id, escrow_address=network.escrow_address,
                              agreement_id=agreement["onchain_id"], batches=[[1] * 11], price=LISTED_PRICE)
    reported = {"deposit": 100 * 10 * LISTED_PRICE}
    monkeypatch.setattr(ChainReader, "escrow", lambda self, *args, **kwargs: OnchainEscrow(
        state="active", buyer=agreement["buyer_wallet_address"], seller=SELLER, receipt_signer=signer.address,
        deposit_amount=reported["deposit"], settled_amount=0, last_seq=0, usage_digest=receipts.ZERO_DIGEST,
        terms_hash=stated_terms_hash(agreement, network)))
    monkeypatch.setattr(ChainReader, "chain_id", lambda self: NETWORK.chain_id)
    marketplace = httpx.MockTransport(lambda request: httpx.Response(200, json={"results": listing,
                                                                                "next_cursor": None}))
    with MarketplaceClient("https://marketplace.example", "mk_test", network=network, rpc_url="https://node.invalid",
                           transport=marketplace) as buyer:
        with pytest.raises(receipts.UsageTermsMismatch, match="deposit"):
            buyer.verify_usage(agreement, buyer_wallet_address=agreement["buyer_wallet_address"])
        reported["deposit"] = 10 * LISTED_PRICE
        with pytest.raises(receipts.UsageAboveDeposit):
            buyer.verify_usage(agreement, buyer_wallet_address=agreement["buyer_wallet_address"])


def node_reading_an_activated_escrow_as_never_activated(*, buyer: str, onchain_id: str, signer: str,
                                                          deposit: int) -> type[BaseHTTPRequestHandler]:
    """A hostile JSON-RPC node: the escrow's Activated event names `signer` as its receipt signer and `deposit`, and
    its getEscrow answers state 0 ("none"), as no escrow the contract holds could."""
    activated = {"address": NETWORK.escrow_address, "blockNumber": "0x5", "topics": [
        "0x" + keccak(text="Activated(bytes32,address,address,address,uint256,uint256,address,bytes32,uint64,uint64,"
                           "uint64,uint256)").hex(),
        onchain_id, "0x" + buyer[2:].lower().rjust(64, "0"), "0x" + SELLER[2:].lower().rjust(64, "0")],
        "data": "0x" + encode(["address", "uint256", "uint256", "address", "bytes32", "uint64", "uint64", "uint64",
                               "uint256"], [NETWORK.token_address, deposit, 0, signer, b"\x00" * 32, 0, 0, 3600,
                                            0]).hex()}
    answers = {"eth_chainId": hex(NETWORK.chain_id), "eth_blockNumber": "0x10", "eth_getLogs": [activated],
               "eth_call": "0x" + encode(["(uint8,uint64,uint256,uint256,uint256,uint256)"],
                                         [(0, 0, 0, 0, 0, 0)]).hex()}

    class Node(JsonRpcNode):
        def do_POST(self) -> None:
            call = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            self.answer_json(json.dumps({"jsonrpc": "2.0", "id": call["id"],
                                         "result": answers[call["method"]]}).encode())

    return Node


def test_receipts_of_an_escrow_the_node_reads_as_never_activated_are_held_to_the_pinned_signer():
    """An escrow the node read as "none" was exempt from every on-chain check of `verify_usage`: a hostile node whose
    escrow record (an Activated event naming its own receipt signer and a deposit a hundred times the agreed one)
    answered getEscrow's state 0 had a listing signed with that key, charging past the agreed deposit, verify. No
    escrow on-chain holds nothing and signs nothing: its charges are above it (`UsageAboveDeposit`), and any
    receipt must still be a pinned signer's (`ReceiptSignerMismatch`)."""
    from sdk import receipts
    from tests.sdk.test_receipts import _signed_listing

    attacker = Account.from_key(b"\x07" * 32)
    agreement = honest_agreement()  # 10 calls at the listed price
    buyer_wallet = agreement["buyer_wallet_address"]
    node = node_reading_an_activated_escrow_as_never_activated(
        buyer=buyer_wallet, onchain_id=agreement["onchain_id"], signer=attacker.address,
        deposit=100 * 10 * LISTED_PRICE)
    listings = {"charged": _signed_listing(key=attacker, chain_id=NETWORK.chain_id,
                                           escrow_address=NETWORK.escrow_address, agreement_id=agreement["onchain_id"],
                                           batches=[[1] * 11], price=LISTED_PRICE),
                "free": _signed_listing(key=attacker, chain_id=NETWORK.chain_id,
                                        escrow_address=NETWORK.escrow_address, agreement_id=agreement["onchain_id"],
                                        batches=[[0] * 3], price=LISTED_PRICE)}
    listed = {"results": listings["charged"]}
    marketplace = httpx.MockTransport(lambda request: httpx.Response(200, json={**listed, "next_cursor": None}))
    with serving(node) as rpc_url, MarketplaceClient("https://marketplace.example", "mk_test", network=NETWORK,
                                                     rpc_url=rpc_url, transport=marketplace) as buyer:
        with pytest.raises(receipts.UsageAboveDeposit):
            buyer.verify_usage(agreement, buyer_wallet_address=buyer_wallet)
        listed["results"] = listings["free"]
        with pytest.raises(receipts.ReceiptSignerMismatch, match="pinned"):
            buyer.verify_usage(agreement, buyer_wallet_address=buyer_wallet)
        listed["results"] = []  # nothing listed on no escrow: nothing to refuse
        assert buyer.verify_usage(agreement, buyer_wallet_address=buyer_wallet).events == 0


def another_chain(self: ChainReader) -> int:
    return 1  # Ethereum mainnet's, not the pinned Base Sepolia's


def unreadable_chain(self: ChainReader) -> int:
    raise MalformedAnswer("eth_chainId: 'soon' is no hex number")


@pytest.mark.parametrize("chain_id", [another_chain, unreadable_chain], ids=["another chain", "unreadable"])
def test_usage_is_not_verified_through_an_rpc_of_another_chain(monkeypatch, chain_id):
    """verify_usage read the escrow through the buyer's RPC without asking which chain it serves: pointed at a node
    of another chain (a mistyped URL, a hostile node), the escrow as read there verified the listing. The RPC's
    eth_chainId must be the pinned network's (`UsageChainMismatch`), before anything else is read."""
    from sdk import receipts
    from sdk.onchain import OnchainEscrow
    from sdk.terms import stated_terms_hash
    from tests.sdk.test_receipts import _signed_listing

    signer = Account.from_key(b"\x09" * 32)
    network = dataclasses.replace(NETWORK, receipt_signer=signer.address)
    agreement = honest_agreement()
    listing = _signed_listing(key=signer, chain_id=network.chain_id, escrow_address=network.escrow_address,
                              agreement_id=agreement["onchain_id"], batches=[[1] * 10], price=LISTED_PRICE)
    monkeypatch.setattr(ChainReader, "escrow", lambda self, *args, **kwargs: OnchainEscrow(
        state="active", buyer=agreement["buyer_wallet_address"], seller=SELLER, receipt_signer=signer.address,
        deposit_amount=10 * LISTED_PRICE, settled_amount=0, last_seq=0, usage_digest=receipts.ZERO_DIGEST,
        terms_hash=stated_terms_hash(agreement, network)))
    monkeypatch.setattr(ChainReader, "chain_id", chain_id)
    marketplace = httpx.MockTransport(lambda request: httpx.Response(200, json={"results": listing,
                                                                                "next_cursor": None}))
    with MarketplaceClient("https://marketplace.example", "mk_test", network=network, rpc_url="https://node.invalid",
                           transport=marketplace) as buyer:
        with pytest.raises(receipts.UsageChainMismatch, match=str(network.chain_id)):
            buyer.verify_usage(agreement, buyer_wallet_address=agreement["buyer_wallet_address"])
        monkeypatch.setattr(ChainReader, "chain_id", lambda self: network.chain_id)
        assert buyer.verify_usage(agreement, buyer_wallet_address=agreement["buyer_wallet_address"]).events == 10


@pytest.mark.parametrize("chain_id", [another_chain, unreadable_chain], ids=["another chain", "unreadable"])
@pytest.mark.parametrize("sign", ["challenge", "refund request"])
def test_a_challenge_is_not_signed_by_the_clock_and_escrow_of_an_rpc_of_another_chain(monkeypatch, chain_id, sign):
    """Every signing asks the RPC's chain id first, but a challenge and a Masumi refund request (an EIP-712
    Challenge, bounded by the escrow's on-chain window and the chain's clock read through the RPC) asked nothing:
    an RPC serving another chain (a mistyped URL, a load balancer moved, a hostile node), where an escrow at the same
    address shows a later challenge deadline, had the buyer sign a Challenge valid after the pinned chain's window
    closes. Another chain's id, or one that does not read, refuses ("rpc chain id"), nothing signed."""
    from tests.sdk.test_signing_bounds import (RefundMarketplace, challenge_package_marketplace, onchain_id_of,
                                               refund)

    monkeypatch.setattr(ChainReader, "escrow", proposed_escrow(int(time.time()) + 7200))
    monkeypatch.setattr(ChainReader, "now", lambda self: int(time.time()))
    monkeypatch.setattr(ChainReader, "chain_id", chain_id)
    agreement_id, submitted = str(uuid.uuid4()), []
    if sign == "challenge":
        agreement = {"id": agreement_id, "onchain_id": onchain_id_of(agreement_id), "challenge_window_seconds": 3600}
        with MarketplaceClient("https://marketplace.example", "mk_test", network=NETWORK,
                               rpc_url="https://node.invalid",
                               transport=httpx.MockTransport(challenge_package_marketplace(agreement_id, submitted))
                               ) as buyer, pytest.raises(SigningRefused) as refusal:
            buyer.challenge(agreement, KEY, "the answers were empty")
    else:
        marketplace = RefundMarketplace(agreement_id)
        submitted = marketplace.submitted
        with pytest.raises(SigningRefused) as refusal:
            refund(marketplace, rpc_url="https://node.invalid", agreement_id=agreement_id)
    assert refusal.value.field == "rpc chain id"
    assert submitted == []


# --- a payee the buyer did not name ---------------------------------------------------------------------------------

def escrow_activated_without_naming_the_seller(marketplace: EscrowMarketplace) -> None:
    with escrow_buyer(marketplace) as buyer:
        buyer.activate_escrow(buyer.propose_agreement(str(uuid.uuid4()), 10, max_unit_price_atomic=LISTED_PRICE), KEY,
                              permit_nonce=0)


def direct_purchase_without_naming_the_seller(marketplace: DirectMarketplace) -> None:
    with MarketplaceClient("https://marketplace.example", "mk_test", network=NETWORK,
                           transport=httpx.MockTransport(marketplace)) as buyer:
        buyer.propose_direct_purchase(str(uuid.uuid4()), 10, wallet=KEY, max_unit_price_atomic=LISTED_PRICE,
                                      permit_nonce=0)


class AttackersDirectMarketplace(DirectMarketplace):
    """A direct sale whose service names the compromised marketplace's own wallet as its seller's."""

    def __call__(self, request: httpx.Request) -> httpx.Response:
        answer = super().__call__(request)
        if request.url.path.startswith("/agents/services/"):
            return httpx.Response(200, json={**answer.json(), "seller": {"wallet_address": ATTACKER}})
        return answer


UNNAMED_SELLER_PAYMENTS = [
    pytest.param(lambda: EscrowMarketplace(pays_the_attacker), escrow_activated_without_naming_the_seller,
                 lambda marketplace: marketplace.activated, id="escrow"),
    pytest.param(lambda: AttackersDirectMarketplace(refusals=0), direct_purchase_without_naming_the_seller,
                 lambda marketplace: marketplace.fee_permits, id="direct purchase"),
    pytest.param(lambda: MasumiMarketplace(pays_the_attacker), buy_masumi_job,
                 lambda marketplace: marketplace.locked, id="masumi job"),
]


@pytest.mark.parametrize(("marketplace", "pay", "signed"), UNNAMED_SELLER_PAYMENTS)
def test_a_payment_to_a_seller_the_buyer_did_not_name_warns_before_signing(marketplace, pay, signed):
    """Without `expected_seller_wallet_address=`, the payee is the marketplace's word: a compromised one named its
    own wallet, and the SDK signed the deposit or payment to it without a word. It still signs (existing callers
    keep working), but warns first (`SellerUnverified`, naming the payee), so a buyer that turns the warning into an
    error signs nothing."""
    warned = marketplace()
    with pytest.warns(SellerUnverified, match=ATTACKER) as warnings_seen:
        pay(warned)
    # Attributed to the caller's line (here, or the test helper's that called the SDK), not to the SDK's.
    assert len(warnings_seen) == 1 and warnings_seen[0].filename.startswith(os.path.dirname(__file__))
    assert len(signed(warned)) == 1
    demanding = marketplace()
    with warnings.catch_warnings():
        warnings.simplefilter("error", SellerUnverified)
        with pytest.raises(SellerUnverified):
            pay(demanding)
    assert signed(demanding) == []


def test_a_seller_the_buyer_named_is_not_warned_about():
    with warnings.catch_warnings():
        warnings.simplefilter("error", SellerUnverified)
        with escrow_buyer(EscrowMarketplace()) as buyer:
            proposed = buyer.propose_agreement(str(uuid.uuid4()), 10, max_unit_price_atomic=LISTED_PRICE,
                                               expected_seller_wallet_address=SELLER)
            buyer.activate_escrow(buyer.get_agreement(proposed["id"]), KEY, permit_nonce=0)
            agreement = buyer.propose_agreement(str(uuid.uuid4()), 10, max_unit_price_atomic=LISTED_PRICE)
            buyer.activate_escrow(agreement, KEY, permit_nonce=0, expected_seller_wallet_address=SELLER)
        with MarketplaceClient("https://marketplace.example", "mk_test", network=NETWORK,
                               transport=httpx.MockTransport(DirectMarketplace(refusals=0))) as buyer:
            buyer.propose_direct_purchase(str(uuid.uuid4()), 10, wallet=KEY, max_unit_price_atomic=LISTED_PRICE,
                                          permit_nonce=0, expected_seller_wallet_address=SELLER)
        assert buy_masumi_job(MasumiMarketplace(), expected_seller_wallet_address=SELLER)


# --- what the buyer's own node says, against the marketplace's word -------------------------------------------------

@pytest.mark.parametrize(("token_nonce", "signed"), [(0, True), (5, False)], ids=["the token's", "another"])
def test_an_escrow_permit_is_signed_for_the_token_nonce_the_buyers_rpc_reads(token_nonce, signed):
    """activate_escrow signed the permit for the nonce the marketplace's package stated, unchecked against the token's
    `nonces(buyer)` through the buyer's RPC, whose answer is the buyer's: a nonce ahead of the token's makes a permit
    usable later, within its deadline (the package states 0 here, the token 0 or 5). A mismatch is refused."""
    marketplace = EscrowMarketplace()  # its package's permit is for nonce 0
    nonce_answer = "0x" + encode(["uint256"], [token_nonce]).hex()
    with serving(direct_purchase_node(nonce_answer=nonce_answer, timestamp=hex(int(time.time())))) as rpc_url:
        with MarketplaceClient("https://marketplace.example", "mk_test", network=NETWORK, rpc_url=rpc_url,
                               transport=httpx.MockTransport(marketplace)) as buyer, warnings.catch_warnings():
            warnings.simplefilter("ignore", SellerUnverified)
            agreement = buyer.propose_agreement(str(uuid.uuid4()), 10, max_unit_price_atomic=LISTED_PRICE)
            if signed:
                buyer.activate_escrow(agreement, KEY)
            else:
                with pytest.raises(SigningRefused) as refusal:
                    buyer.activate_escrow(agreement, KEY)
                assert refusal.value.field == "escrow_permit.message.nonce"
                assert (refusal.value.expected, refusal.value.received) == (5, 0)
    assert len(marketplace.activated) == (1 if signed else 0)


AHEAD = 7  # the permit nonce a compromised marketplace states, the buyer's token nonce being 0


def test_without_an_rpc_an_escrow_permit_is_signed_for_the_nonce_the_buyer_gives_only():
    """Without rpc_url, activate_escrow signed the permit for whatever nonce the marketplace's package stated (7
    here, the buyer's token nonce 0), and the buyer had no way to say which: a permit for a later nonce is not
    invalid, it becomes usable once the nonces below it are used, within its deadline. The nonce is now the buyer's
    word (`permit_nonce=`) or its RPC's, as the token's domain and the chain's clock are: else `NotConfigured`,
    nothing signed."""
    marketplace = EscrowMarketplace(permit_nonce=AHEAD)
    with escrow_buyer(marketplace) as buyer, warnings.catch_warnings():
        warnings.simplefilter("ignore", SellerUnverified)
        agreement = buyer.propose_agreement(str(uuid.uuid4()), 10, max_unit_price_atomic=LISTED_PRICE)
        with pytest.raises(NotConfigured) as unconfigured:
            buyer.activate_escrow(agreement, KEY)
        assert "permit_nonce" in str(unconfigured.value) and "rpc_url" in str(unconfigured.value)
        with pytest.raises(SigningRefused) as refusal:
            buyer.activate_escrow(agreement, KEY, permit_nonce=0)
        assert (refusal.value.field, refusal.value.expected, refusal.value.received) == (
            "escrow_permit.message.nonce", 0, AHEAD)
        assert marketplace.activated == []
        buyer.activate_escrow(agreement, KEY, permit_nonce=AHEAD)
    assert len(marketplace.activated) == 1


def test_without_an_rpc_a_masumi_jobs_permit_is_signed_for_the_nonce_the_buyer_gives_only():
    marketplace = MasumiMarketplace(permit_nonce=AHEAD)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", SellerUnverified)
        with pytest.raises(NotConfigured):
            buy_masumi_job(marketplace, permit_nonce=None)
        with pytest.raises(SigningRefused) as refusal:
            buy_masumi_job(marketplace, permit_nonce=0)
        assert refusal.value.field == "escrow_permit.message.nonce"
        assert marketplace.locked == []
        assert buy_masumi_job(marketplace, permit_nonce=AHEAD)
    assert len(marketplace.locked) == 1


def test_sign_activation_package_signs_for_the_nonce_the_buyer_gives_only():
    """`sign_activation_package` took the package's nonce when not given one: the marketplace's word, signed."""
    package, terms = honest_package()
    ahead = {**package, **expected_activation(terms=terms, network=NETWORK, token_domain=DOMAIN,
                                              deadline=package["deadline"], permit_nonce=AHEAD)}
    with pytest.raises(TypeError):
        sign_activation_package(ahead, KEY, terms=terms, network=NETWORK, token_domain=DOMAIN)  # type: ignore[call-arg]
    with pytest.raises(SigningRefused) as refusal:
        sign_activation_package(ahead, KEY, terms=terms, network=NETWORK, token_domain=DOMAIN, permit_nonce=0)
    assert refusal.value.field == "escrow_permit.message.nonce"
    assert sign_activation_package(ahead, KEY, terms=terms, network=NETWORK, token_domain=DOMAIN, permit_nonce=AHEAD)


def unreadable_escrow(self: ChainReader, *args: Any, **kwargs: Any) -> Any:
    raise MalformedAnswer("getEscrow: not hex data")


@pytest.mark.parametrize(("escrow", "field"), [
    pytest.param(proposed_escrow(int(time.time()) + 3600), None, id="within the on-chain window"),
    pytest.param(proposed_escrow(int(time.time()) + 30), "deadline", id="after the on-chain window"),
    pytest.param(proposed_escrow(0, state="active"), "escrow.challengeDeadline", id="nothing proposed on-chain"),
    pytest.param(unreadable_escrow, "escrow.challengeDeadline", id="unreadable"),
])
def test_a_challenge_deadline_is_bounded_by_the_escrows_on_chain_window(monkeypatch, escrow, field):
    """challenge() bounded the deadline it signs by the agreement's window as the marketplace states it (here an
    hour, the package's deadline a minute away): a signature valid after the escrow's own window closes. With the
    buyer's RPC, the escrow's on-chain challenge deadline (`getEscrow`) bounds it too (`DeadlineOutOfRange`)."""
    from tests.sdk.test_signing_bounds import challenge_package_marketplace, onchain_id_of

    monkeypatch.setattr(ChainReader, "escrow", escrow)
    monkeypatch.setattr(ChainReader, "now", lambda self: int(time.time()))
    monkeypatch.setattr(ChainReader, "chain_id", lambda self: NETWORK.chain_id)
    agreement_id, submitted = str(uuid.uuid4()), []
    agreement = {"id": agreement_id, "onchain_id": onchain_id_of(agreement_id), "challenge_window_seconds": 3600}
    with MarketplaceClient("https://marketplace.example", "mk_test", network=NETWORK, rpc_url="https://node.invalid",
                           transport=httpx.MockTransport(challenge_package_marketplace(agreement_id, submitted))
                           ) as buyer:
        if field is None:
            buyer.challenge(agreement, KEY, "the answers were empty")
        else:
            with pytest.raises(SigningRefused) as refusal:
                buyer.challenge(agreement, KEY, "the answers were empty")
            assert refusal.value.field == field
    assert len(submitted) == (1 if field is None else 0)


@pytest.mark.parametrize(("escrow", "field"), [
    pytest.param(proposed_escrow(int(time.time()) + 7200), None, id="within the proposal's on-chain window"),
    pytest.param(proposed_escrow(int(time.time()) + 30), "unlockTime", id="after the proposal's on-chain window"),
    pytest.param(proposed_escrow(0, state="active", challenge_window=7200), None,
                 id="active, within its on-chain window from now"),
    pytest.param(proposed_escrow(0, state="active", challenge_window=60), "unlockTime",
                 id="active, beyond its on-chain window from now"),
    pytest.param(proposed_escrow(0, state="none"), "escrow.challengeDeadline", id="nothing on-chain"),
    pytest.param(proposed_escrow(0, state="disputed"), "escrow.challengeDeadline", id="disputed already"),
    pytest.param(unreadable_escrow, "escrow.challengeDeadline", id="unreadable"),
])
def test_a_refund_requests_unlock_time_is_bounded_by_the_escrows_on_chain_window(monkeypatch, escrow, field):
    """request_refund bounded the unlockTime it signs (the Challenge's deadline, an hour away here) by the agreement's
    window as the marketplace states it (a day): a signature valid after the escrow's own window closes. With the
    buyer's RPC, as for challenge(), the escrow's on-chain challenge deadline bounds it once a result is proposed,
    and before one (the request is kept until then) its on-chain challengeWindow from now."""
    from tests.sdk.test_signing_bounds import RefundMarketplace, refund

    monkeypatch.setattr(ChainReader, "escrow", escrow)
    monkeypatch.setattr(ChainReader, "now", lambda self: int(time.time()))
    monkeypatch.setattr(ChainReader, "chain_id", lambda self: NETWORK.chain_id)
    agreement_id = str(uuid.uuid4())
    marketplace = RefundMarketplace(agreement_id)
    if field is None:
        refund(marketplace, rpc_url="https://node.invalid", agreement_id=agreement_id)
    else:
        with pytest.raises(SigningRefused) as refusal:
            refund(marketplace, rpc_url="https://node.invalid", agreement_id=agreement_id)
        assert refusal.value.field == field
    assert len(marketplace.submitted) == (1 if field is None else 0)


def test_an_escrow_record_the_node_cannot_read_is_a_usage_verification_error(monkeypatch):
    """`ChainReader.escrow`'s RpcError (a refusal, or MalformedAnswer: logs or getEscrow data that do not decode)
    reached verify_usage's caller as is, not as the usage-verification error it documents."""
    from sdk import receipts

    agreement = honest_agreement()
    monkeypatch.setattr(ChainReader, "escrow", unreadable_escrow)
    monkeypatch.setattr(ChainReader, "chain_id", lambda self: NETWORK.chain_id)
    marketplace = httpx.MockTransport(lambda request: httpx.Response(200, json={"results": [], "next_cursor": None}))
    with MarketplaceClient("https://marketplace.example", "mk_test", network=NETWORK, rpc_url="https://node.invalid",
                           transport=marketplace) as buyer:
        with pytest.raises(receipts.UsageEscrowUnreadable):
            buyer.verify_usage(agreement, buyer_wallet_address=agreement["buyer_wallet_address"])


# --- what complete(wait=True) returns ------------------------------------------------------------------------------

ONCHAIN_DEADLINE = int(time.time()) + 3600  # the escrow's challenge deadline as the buyer's RPC reads it


def completing_marketplace(agreement_id: str, status: str, challenge_deadline: int | None):
    """A marketplace answering the agreement, once completed, in `status` with `challenge_deadline` (unix time)."""
    from tests.sdk.test_signing_bounds import BUYER, onchain_id_of

    def answer(request: httpx.Request) -> httpx.Response:
        agreement = {"id": agreement_id, "onchain_id": onchain_id_of(agreement_id), "status": "active",
                     "buyer_wallet_address": BUYER, "challenge_deadline": None}
        if request.method == "GET":
            agreement["status"] = status
            if challenge_deadline is not None:
                agreement["challenge_deadline"] = datetime.fromtimestamp(challenge_deadline, UTC).isoformat()
        return httpx.Response(200, json=agreement)

    return answer


def complete_through(monkeypatch, *, status: str, challenge_deadline: int | None, onchain: str,
                     onchain_deadline: int = ONCHAIN_DEADLINE) -> dict[str, Any]:
    from tests.sdk.test_signing_bounds import BUYER, proposed_escrow

    monkeypatch.setattr(ChainReader, "escrow", proposed_escrow(onchain_deadline, state=onchain))
    monkeypatch.setattr(ChainReader, "now", lambda self: int(time.time()))
    monkeypatch.setattr(ChainReader, "chain_id", lambda self: NETWORK.chain_id)
    agreement_id = str(uuid.uuid4())
    with MarketplaceClient("https://marketplace.example", "mk_test", network=NETWORK, rpc_url="https://node.invalid",
                           transport=httpx.MockTransport(completing_marketplace(agreement_id, status,
                                                                                challenge_deadline))) as buyer:
        return buyer.complete(agreement_id, wait=True, timeout=0.5, poll_interval=0.05, buyer_wallet_address=BUYER)


@pytest.mark.parametrize(("status", "challenge_deadline", "onchain"), [
    pytest.param("settled", None, "proposed", id="settled, the window still open on-chain"),
    pytest.param("settling", None, "proposed", id="settling, the window still open on-chain"),
    pytest.param("in_challenge", ONCHAIN_DEADLINE + 86_400, "proposed", id="a later challenge deadline"),
    pytest.param("in_challenge", ONCHAIN_DEADLINE, "active", id="nothing proposed on-chain"),
    pytest.param("disputed", None, "proposed", id="disputed, nothing disputed on-chain"),
])
def test_a_completion_the_buyers_rpc_does_not_show_is_not_taken_on_the_marketplaces_word(
        monkeypatch, status, challenge_deadline, onchain):
    """`complete(wait=True)` returned the agreement as soon as the marketplace named it proposed on-chain or past it,
    though the buyer's RPC was there to read the escrow: a compromised marketplace answering "settled" (or a challenge
    deadline a day later than the escrow's) while the window was open had the buyer let it close, an inflated
    settlement proposal unchallenged. With rpc_url, the buyer's escrow must show the status (`in_challenge`: its
    proposal, with the agreement's challenge deadline; `settled`: settled), else the wait goes on to its timeout."""
    with pytest.raises(TimeoutError, match="on-chain"):
        complete_through(monkeypatch, status=status, challenge_deadline=challenge_deadline, onchain=onchain)


@pytest.mark.parametrize(("status", "challenge_deadline", "onchain"), [
    ("in_challenge", ONCHAIN_DEADLINE, "proposed"), ("disputed", None, "disputed"), ("settled", None, "settled"),
    ("settling", None, "resolved"),
], ids=["in_challenge", "disputed", "settled", "settling"])  # the deadline is a time: an id of it differs per process
def test_a_completion_the_buyers_rpc_shows_is_returned(monkeypatch, status, challenge_deadline, onchain):
    assert complete_through(monkeypatch, status=status, challenge_deadline=challenge_deadline,
                            onchain=onchain)["status"] == status


def test_a_completion_settling_once_the_on_chain_window_is_over_is_returned(monkeypatch):
    assert complete_through(monkeypatch, status="settling", challenge_deadline=None, onchain="proposed",
                            onchain_deadline=int(time.time()) - 1)["status"] == "settling"
