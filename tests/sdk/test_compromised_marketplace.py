"""What the SDK believes of a compromised marketplace about escrows: a receipt signer it names, a status it states.
The marketplace is an httpx `MockTransport`; the buyer's RPC a `ChainReader` whose reads are stubbed."""

from __future__ import annotations

import dataclasses
import functools
import secrets
import time
import uuid
from typing import Any

import httpx
import pytest
from eth_account import Account

from sdk import AnswerMismatch, MarketplaceClient, receipts
from sdk.onchain import ChainReader, OnchainEscrow
from sdk.terms import stated_terms_hash
from tests.sdk.test_receipts import _signed_listing
from tests.sdk.test_signing_bounds import KEY, LISTED_PRICE, NETWORK, SELLER

BUYER = Account.from_key(KEY).address


# --- the standalone verify_usage --------------------------------------------------------------------------------

def _listing_signed_by(key, *, price: int = 20_000):
    agreement_id, chain_id, escrow_address = "0x" + secrets.token_hex(32), 31337, "0x" + "11" * 20
    escrow = OnchainEscrow(state="active", buyer="0x" + "22" * 20, seller="0x" + "33" * 20,
                           receipt_signer=key.address, deposit_amount=10**9, settled_amount=0, last_seq=0,
                           usage_digest=receipts.ZERO_DIGEST)
    listing = _signed_listing(key=key, chain_id=chain_id, escrow_address=escrow_address, agreement_id=agreement_id,
                              batches=[[1, 2]], price=price)
    return listing, functools.partial(receipts.verify_usage, escrow=escrow, agreement_id=agreement_id,
                                      chain_id=chain_id, escrow_address=escrow_address, price_per_unit=price)


@pytest.mark.parametrize("pins", [None, (), []], ids=["left out", "empty tuple", "empty list"])
def test_the_standalone_verify_usage_requires_the_pinned_receipt_signer(pins):
    """`sdk.receipts.verify_usage` took `pinned_receipt_signers` as optional (default: none): a caller who forgot it
    had every receipt checked against the escrow's signer as given (an escrow record built from the marketplace's
    `escrow_status(verify=True)`, or read through an RPC naming its own key), so a listing the marketplace signed with
    a key of its choosing verified. The pinned signer is required and not empty (TypeError), and a receipt signed by
    another key is `ReceiptSignerMismatch`."""
    server_key, pinned = Account.create(), Account.create().address
    listing, verify = _listing_signed_by(server_key)
    with pytest.raises(TypeError, match="pinned_receipt_signers"):
        verify(listing) if pins is None else verify(listing, pinned_receipt_signers=pins)
    with pytest.raises(receipts.ReceiptSignerMismatch):
        verify(listing, pinned_receipt_signers=(pinned,))
    assert verify(listing, pinned_receipt_signers=server_key.address).events == 2  # one address, not its characters


# --- statuses the marketplace states ----------------------------------------------------------------------------

def _agreement(agreement_id: str, status: str) -> dict[str, Any]:
    """An escrow agreement of 10 calls at the listed price, as the marketplace states it, in `status`."""
    now = int(time.time())
    return {"id": agreement_id, "onchain_id": "0x" + uuid.UUID(agreement_id).hex.rjust(64, "0"), "status": status,
            "service": {"id": "6d7ad8a4-8c4e-4d0f-9a55-0a8a3b1c3d11"}, "quantity": 10,
            "price_per_unit_atomic": LISTED_PRICE, "deposit_amount_atomic": 10 * LISTED_PRICE,
            "infra_fee_atomic": NETWORK.fee_schedule.fee_for(10 * LISTED_PRICE), "chain_id": NETWORK.chain_id,
            "token_address": NETWORK.token_address, "settlement_model": "escrow", "pricing_type": "per_call",
            "unit_name": "call", "token": "USDC", "buyer_wallet_address": BUYER, "seller_wallet_address": SELLER,
            "fee_recipient": NETWORK.gas_wallet, "expires_at": now + 86_400, "challenge_window_seconds": 3600,
            "challenge_deadline": None, "activation_tx_hash": ""}


def _escrow_of(agreement: dict[str, Any], state: str, **changes: Any) -> OnchainEscrow:
    """The buyer's escrow of `agreement` as the RPC reads it, in `state`."""
    escrow = OnchainEscrow(state=state, buyer=BUYER, seller=SELLER, receipt_signer=NETWORK.receipt_signer,
                           deposit_amount=10 * LISTED_PRICE, settled_amount=0, last_seq=0,
                           usage_digest=receipts.ZERO_DIGEST, terms_hash=stated_terms_hash(agreement, NETWORK),
                           challenge_window=3600)
    if state == "none":
        zero = "0x" + "00" * 20
        escrow = OnchainEscrow(state="none", buyer=zero, seller=zero, receipt_signer=zero, deposit_amount=0,
                               settled_amount=0, last_seq=0, usage_digest=receipts.ZERO_DIGEST)
    return dataclasses.replace(escrow, **changes)


def _client(monkeypatch, agreement: dict[str, Any], escrow: OnchainEscrow, *, rpc: bool = True,
            onchain_claim: dict[str, Any] | None = None, purchase: dict[str, Any] | None = None) -> MarketplaceClient:
    """A client of a marketplace answering `agreement` (its escrow status claiming `onchain_claim`, its purchase
    listing `purchase`), its RPC reading the buyer's escrow as `escrow`."""
    monkeypatch.setattr(ChainReader, "escrow", lambda self, *args, **kwargs: escrow)
    monkeypatch.setattr(ChainReader, "now", lambda self: int(time.time()))
    monkeypatch.setattr(ChainReader, "chain_id", lambda self: NETWORK.chain_id)

    def marketplace(request: httpx.Request) -> httpx.Response:
        if request.url.path == "/purchase":
            return httpx.Response(200, json={"status": "success", "data": {"Purchases": [purchase]}})
        if request.url.path.endswith("/escrow-status"):
            return httpx.Response(200, json={
                "agreement_id": agreement["id"], "onchain_id": agreement["onchain_id"], "status": agreement["status"],
                "escrow_status": "funded", "transactions": [], "onchain": onchain_claim})
        return httpx.Response(200, json=agreement)

    return MarketplaceClient("https://marketplace.example", "mk_test", network=NETWORK,
                             rpc_url="https://node.invalid" if rpc else None, transport=httpx.MockTransport(marketplace))


@pytest.mark.parametrize(("status", "onchain", "changes"), [
    pytest.param("active", "none", {}, id="active, no escrow on-chain"),
    pytest.param("active", "reclaimed", {}, id="active, reclaimed on-chain"),
    pytest.param("active", "active", {"terms_hash": "0x" + "ab" * 32}, id="active, an escrow of other terms"),
    pytest.param("settled", "proposed", {}, id="settled, the window still open"),
    pytest.param("disputed", "proposed", {}, id="disputed, nothing disputed on-chain"),
])
@pytest.mark.parametrize("buyer", ["activated", "stated"])
def test_wait_until_does_not_take_a_status_the_buyers_rpc_does_not_show(monkeypatch, status, onchain, changes, buyer):
    """`wait_until` returned the agreement as soon as the marketplace named the awaited status, though the buyer's RPC
    was there to read the escrow: a compromised marketplace answering "active" for an escrow never funded (the seller
    serves on credit, the buyer calls on it) or "settled" while the window is open (the buyer lets it close) was
    believed. With rpc_url and the pinned network, a status with an on-chain counterpart must be the escrow's as the
    RPC reads it (the buyer's: the wallet this client activated it with, `buyer_wallet_address=`, else the one the
    agreement states, whose escrow must then be for the terms it states), else the wait goes on to its timeout."""
    agreement_id = str(uuid.uuid4())
    agreement = _agreement(agreement_id, status)
    with _client(monkeypatch, agreement, _escrow_of(agreement, onchain, **changes)) as client:
        if buyer == "activated":
            client._remember_buyer(agreement_id, BUYER)
        with pytest.raises(TimeoutError, match="on-chain"):
            client.wait_until(agreement_id, statuses={status}, timeout=0.3, poll_interval=0.05)


@pytest.mark.parametrize(("status", "onchain"), [("active", "active"), ("settled", "settled"),
                                                 ("disputed", "disputed"), ("settling", "resolved")])
def test_wait_until_returns_a_status_the_buyers_rpc_shows(monkeypatch, status, onchain):
    agreement_id = str(uuid.uuid4())
    agreement = _agreement(agreement_id, status)
    with _client(monkeypatch, agreement, _escrow_of(agreement, onchain)) as client:
        assert client.wait_until(agreement_id, statuses={status}, timeout=5, poll_interval=0.05)["status"] == status
    with _client(monkeypatch, agreement, _escrow_of(agreement, "none"), rpc=False) as client:  # the marketplace's word
        assert client.wait_until(agreement_id, statuses={status}, timeout=5, poll_interval=0.05)["status"] == status


@pytest.mark.parametrize("rpc", [True, False], ids=["with the buyers rpc", "without"])
def test_wait_until_answered_with_another_agreement_is_refused(monkeypatch, rpc):
    """`GET /usage-agreements/{id}` was read as that agreement whatever it named: a compromised marketplace
    answered another of the buyer's agreements, active with its escrow funded on-chain, for one never funded, and
    `wait_until` returned "active" as the buyer's RPC showed it (the escrow read was the other agreement's)."""
    funded = _agreement(str(uuid.uuid4()), "active")
    never_funded = str(uuid.uuid4())
    with _client(monkeypatch, funded, _escrow_of(funded, "active"), rpc=rpc) as client:
        with pytest.raises(AnswerMismatch) as refusal:
            client.wait_until(never_funded, timeout=5, poll_interval=0.05)
        assert client.wait_until(funded["id"].upper(), timeout=5, poll_interval=0.05) == funded  # however spelled
    assert refusal.value.field == "agreement.id"


def test_escrow_status_verified_is_the_buyers_rpcs_read_not_the_marketplaces_claim(monkeypatch):
    """`escrow_status(verify=True)` ("adds the contract's own view") returned the marketplace's `onchain` record as
    the contract's: a compromised marketplace claimed an active escrow of the full deposit, its receipt signer a key of
    its own, for an escrow never funded. With rpc_url, `onchain` is the buyer's escrow as the buyer's RPC reads it
    (the fields `sdk.onchain.ChainReader.escrow` reads, as the marketplace names them), and `status_onchain` says whether that escrow is in the agreement's status."""
    agreement_id = str(uuid.uuid4())
    agreement = _agreement(agreement_id, "active")
    claim = {"state": "active", "depositAmount": 10 * LISTED_PRICE, "receiptSigner": Account.create().address}
    with _client(monkeypatch, agreement, _escrow_of(agreement, "none"), onchain_claim=claim) as client:
        status = client.escrow_status(agreement_id, verify=True)
    assert status["onchain"]["state"] == "none"
    assert status["onchain"]["depositAmount"] == 0
    assert status["status_onchain"] is False
    with _client(monkeypatch, agreement, _escrow_of(agreement, "active"), onchain_claim=claim) as client:
        status = client.escrow_status(agreement_id, verify=True, buyer_wallet_address=BUYER)
    assert (status["onchain"]["state"], status["onchain"]["receiptSigner"]) == ("active", NETWORK.receipt_signer)
    assert status["status_onchain"] is True


# --- a Masumi purchase's onChainState -----------------------------------------------------------------------------

def _purchase_client(monkeypatch, agreement: dict[str, Any], escrow: OnchainEscrow, state: str) -> MarketplaceClient:
    purchase = {"blockchainIdentifier": agreement["onchain_id"].removeprefix("0x"), "agreementId": agreement["id"],
                "onChainState": state}
    return _client(monkeypatch, agreement, escrow, purchase=purchase)


@pytest.mark.parametrize(("state", "onchain", "changes"), [
    pytest.param("RefundWithdrawn", "proposed", {}, id="refunded, a settlement proposed on-chain"),
    pytest.param("RefundWithdrawn", "settled", {"settled_amount": 10 * LISTED_PRICE}, id="refunded, the seller paid"),
    pytest.param("Withdrawn", "active", {}, id="withdrawn, still active on-chain"),
    pytest.param("FundsLocked", "none", {}, id="funds locked, no escrow on-chain"),
    pytest.param("Disputed", "proposed", {}, id="disputed, nothing disputed on-chain"),
])
def test_wait_for_purchase_does_not_take_a_state_the_buyers_rpc_does_not_show(monkeypatch, state, onchain, changes):
    """`wait_for_purchase` returned the purchase as soon as the marketplace named the awaited `onChainState`: a
    compromised marketplace answering "RefundWithdrawn" while a settlement of the whole deposit was proposed on-chain
    had the buyer believe it refunded and let the window close. With rpc_url and the pinned network, a state with an
    on-chain counterpart must be the escrow's of the purchase's agreement, as the buyer's RPC reads it, else the wait
    goes on to its timeout."""
    agreement = _agreement(str(uuid.uuid4()), "active")
    with _purchase_client(monkeypatch, agreement, _escrow_of(agreement, onchain, **changes), state) as client:
        client._remember_buyer(agreement["id"], BUYER)
        with pytest.raises(TimeoutError, match="on-chain"):
            client.wait_for_purchase(agreement["onchain_id"].removeprefix("0x"), states={state}, timeout=0.3,
                                     poll_interval=0.05)


@pytest.mark.parametrize(("state", "onchain", "changes"), [
    ("RefundWithdrawn", "reclaimed", {}), ("RefundWithdrawn", "settled", {}),
    ("Withdrawn", "settled", {"settled_amount": LISTED_PRICE}), ("FundsLocked", "active", {}),
    ("ResultSubmitted", "proposed", {}), ("Disputed", "disputed", {}),
], ids=["reclaimed", "settled for nothing", "withdrawn", "funds locked", "result submitted", "disputed"])
def test_wait_for_purchase_returns_a_state_the_buyers_rpc_shows(monkeypatch, state, onchain, changes):
    agreement = _agreement(str(uuid.uuid4()), "active")
    with _purchase_client(monkeypatch, agreement, _escrow_of(agreement, onchain, **changes), state) as client:
        purchase = client.wait_for_purchase(agreement["onchain_id"].removeprefix("0x"), states={state}, timeout=5,
                                            poll_interval=0.05)
    assert purchase["onChainState"] == state


@pytest.mark.parametrize("rpc", [True, False], ids=["with the buyers rpc", "without"])
def test_wait_for_purchase_answered_with_another_purchase_is_refused(monkeypatch, rpc):
    """The purchase listing asked for one blockchainIdentifier was read as that purchase whatever it named: a
    compromised marketplace answered the buyer's earlier purchase (its result submitted, its escrow proposed
    on-chain) for the job just bought, and the buyer took that result for this job's."""
    agreement = _agreement(str(uuid.uuid4()), "active")
    asked = uuid.uuid4().hex.rjust(64, "0")
    purchase = {"blockchainIdentifier": agreement["onchain_id"].removeprefix("0x"), "agreementId": agreement["id"],
                "onChainState": "ResultSubmitted"}
    with _client(monkeypatch, agreement, _escrow_of(agreement, "proposed"), rpc=rpc, purchase=purchase) as client:
        with pytest.raises(AnswerMismatch) as refusal:
            client.wait_for_purchase(asked, timeout=5, poll_interval=0.05)
    assert refusal.value.field == "purchase.blockchainIdentifier"


def test_wait_for_purchase_holds_the_state_to_the_escrow_of_the_purchase_asked_for(monkeypatch):
    """The purchase asked for, naming as its `agreementId` another of the buyer's agreements (one whose escrow is
    proposed on-chain): with the buyer's RPC, that escrow was read as the purchase's, and "ResultSubmitted" taken
    as shown. The agreement must be the purchase's escrow (its id the blockchainIdentifier), or the one the buyer
    names (`agreement_id=`, a purchase paying a seller's payment request), else the wait goes on."""
    agreement = _agreement(str(uuid.uuid4()), "active")
    asked = uuid.uuid4().hex.rjust(64, "0")
    purchase = {"blockchainIdentifier": asked, "agreementId": agreement["id"], "onChainState": "ResultSubmitted"}
    with _client(monkeypatch, agreement, _escrow_of(agreement, "proposed"), purchase=purchase) as client:
        client._remember_buyer(agreement["id"], BUYER)
        with pytest.raises(TimeoutError, match="on-chain"):
            client.wait_for_purchase(asked, timeout=0.3, poll_interval=0.05)
        assert client.wait_for_purchase(asked, agreement_id=agreement["id"], timeout=5,
                                        poll_interval=0.05) == purchase


# --- a direct purchase's payment ----------------------------------------------------------------------------------

@pytest.mark.parametrize("used", [False, True], ids=["not used on-chain", "used on-chain"])
def test_wait_until_paid_takes_the_payment_only_as_the_buyers_rpc_shows_it(monkeypatch, used):
    """`wait_until(statuses={"paid"})`, as `propose_direct_purchase` says to follow a purchase, returned the
    agreement as soon as the marketplace named it paid: a compromised marketplace naming any `payment_tx_hash` had
    the buyer believe the seller paid, and keep the payment authorization it signed (still valid, unused) instead of
    revoking it. With rpc_url, the transaction named must show the token's AuthorizationUsed of the authorization
    this client signed for the purchase (`ChainReader.authorization_used`), else the wait goes on."""
    agreement_id, nonce, tx = str(uuid.uuid4()), "0x" + secrets.token_hex(32), "0x" + secrets.token_hex(32)
    agreement = {**_agreement(agreement_id, "paid"), "settlement_model": "direct", "payment_tx_hash": tx}
    asked: list[tuple[str, str, str, str]] = []

    def authorization_used(self, tx_hash, *, token, authorizer, nonce):
        asked.append((tx_hash, token, authorizer, nonce))
        return used

    monkeypatch.setattr(ChainReader, "authorization_used", authorization_used)
    with _client(monkeypatch, agreement, _escrow_of(agreement, "none")) as client:
        client._payment_authorizations[agreement_id] = (BUYER, nonce)
        if used:
            assert client.wait_until(agreement_id, statuses={"paid"}, timeout=5, poll_interval=0.05)["status"] == "paid"
        else:
            with pytest.raises(TimeoutError, match="on-chain"):
                client.wait_until(agreement_id, statuses={"paid"}, timeout=0.3, poll_interval=0.05)
    assert asked and set(asked) == {(tx, NETWORK.token_address, BUYER, nonce)}


# --- an RPC of another chain ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("awaited", ["active", "paid"])
def test_a_status_shown_by_an_rpc_of_another_chain_is_not_taken(monkeypatch, awaited):
    """`wait_until` (and `escrow_status(verify=True)`, `complete(wait=True)`, `wait_for_purchase`, the wait of
    `cancel_payment_authorization`) took a status as shown once the buyer's RPC read the escrow, or the payment's
    transaction, in it, without asking which chain it serves: an RPC of another chain (a mistyped URL, a load
    balancer moved, a hostile node), where an escrow at the same address is active or a transaction of that hash used
    the authorization, had an agreement never funded taken for active, a payment never made for paid. The RPC must
    serve the pinned chain (its `eth_chainId`, asked first), else nothing is shown and the wait goes on."""
    agreement_id, nonce, tx = str(uuid.uuid4()), "0x" + secrets.token_hex(32), "0x" + secrets.token_hex(32)
    agreement = {**_agreement(agreement_id, awaited), "payment_tx_hash": tx}
    monkeypatch.setattr(ChainReader, "authorization_used", lambda self, *args, **kwargs: True)
    served = {"chain": 1}  # Ethereum mainnet's, not the pinned Base Sepolia's
    with _client(monkeypatch, agreement, _escrow_of(agreement, "active")) as client:
        monkeypatch.setattr(ChainReader, "chain_id", lambda self: served["chain"])
        client._remember_buyer(agreement_id, BUYER)
        client._payment_authorizations[agreement_id] = (BUYER, nonce)
        with pytest.raises(TimeoutError, match="on-chain"):
            client.wait_until(agreement_id, statuses={awaited}, timeout=0.3, poll_interval=0.05)
        assert client.escrow_status(agreement_id, verify=True)["status_onchain"] is False
        served["chain"] = NETWORK.chain_id
        assert client.wait_until(agreement_id, statuses={awaited}, timeout=5, poll_interval=0.05)["status"] == awaited
