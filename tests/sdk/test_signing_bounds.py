"""What the SDK refuses to sign for a compromised marketplace, without a chain: the marketplace is an httpx
`MockTransport` (or a header it wrote). The live-server attacks are in test_wallet_safety."""

from __future__ import annotations

import dataclasses
import json
import threading
import time
import uuid
import warnings
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler
from typing import Any

import httpx
import pytest
from eth_abi import encode
from eth_account import Account
from eth_account.messages import encode_typed_data
from eth_utils import keccak
from x402 import PaymentRequired, PaymentRequirements
from x402.http import decode_payment_signature_header, encode_payment_required_header

from sdk import (AgreedTerms, AnswerMismatch, MarketplaceClient, MarketplaceError, PaymentAuthorizationCancelFailed,
                 PaymentAuthorizationUsed,
                 SellerUnverified, SigningRefused, TokenDomain, proxy_signature, typed_data)
from sdk.activation import expected_activation
from sdk.networks import BASE_SEPOLIA, NetworkConfig
from sdk.onchain import ChainReader, OnchainEscrow
from sdk.safety import DeadlineOutOfRange, require_equal
from sdk.x402_signing import sign_payment_required
from tests.support.http_server import serving

GAS_WALLET = Account.create().address
NETWORK = NetworkConfig.pinned(BASE_SEPOLIA, escrow_address=Account.create().address,
                               receipt_signer=Account.create().address, gas_wallet=GAS_WALLET)
DOMAIN = TokenDomain("USDC", "2")
KEY = Account.create().key.hex()


# --- a skill's 402 ---------------------------------------------------------------------------------------------

def payment_required(**overrides) -> str:
    """A 402 as the marketplace writes it for a skill: paid to the platform treasury (the pinned gas wallet)."""
    honest = {"scheme": "exact", "network": "eip155:84532", "asset": BASE_SEPOLIA.token_address, "amount": "20000",
              "pay_to": GAS_WALLET, "max_timeout_seconds": 300,
              "extra": {"name": "USDC", "version": "2", "resource": "/agents/s/t"}}
    return encode_payment_required_header(PaymentRequired(accepts=[PaymentRequirements(**{**honest, **overrides})]))


def sign(header: str) -> dict[str, Any]:
    signed = sign_payment_required(header, KEY, max_amount_atomic=10**6, network=NETWORK, token_domain=DOMAIN)
    return decode_payment_signature_header(signed).payload["authorization"]


def test_an_honest_402_is_signed_for_the_treasury_for_its_timeout():
    now = int(time.time())
    authorization = sign(payment_required())
    assert authorization["to"].lower() == GAS_WALLET.lower()
    assert now + 290 <= int(authorization["validBefore"]) <= now + 310


def test_a_402_paying_anyone_but_the_pinned_treasury_is_not_signed():
    with pytest.raises(SigningRefused) as refusal:
        sign(payment_required(pay_to=Account.create().address))
    assert refusal.value.field == "accepts[0].pay_to"


@pytest.mark.parametrize("timeout", [10**9, 3601, 0])
def test_a_402_valid_for_longer_than_an_hour_or_not_at_all_is_not_signed(timeout):
    """x402 signs validBefore = now + maxTimeoutSeconds: the server chose how long its authorization lives (10**9 s
    was signed: valid for 31 years)."""
    with pytest.raises(DeadlineOutOfRange) as refusal:
        sign(payment_required(max_timeout_seconds=timeout))
    assert refusal.value.field == "accepts[0].max_timeout_seconds"


@pytest.mark.parametrize("amount", [str(10**6 + 1), str(2**256), "1" * 5_000, "-1", "\uff12\uff10\uff10\uff10\uff10",
                                    "\u0662\u0660\u0660\u0660\u0660", "1e3", "0x10", " 20000", "20000 ", ""])
def test_a_402_for_more_than_the_callers_bound_or_no_amount_is_refused_by_the_sdk(amount):
    """x402's spend controls refused a quote above `max_amount_atomic` with its own NoMatchingRequirementsError, not
    the SDK's refusal (a caller catching `SigningRefused` did not catch it), an amount in more digits than int()
    reads with ValueError, and signed one in other digits than ASCII (fullwidth, Arabic-Indic: int() reads them),
    the header carrying the server's text as the amount. Only ASCII digits up to the bound are signed."""
    with pytest.raises(SigningRefused) as refusal:
        sign(payment_required(amount=amount))
    assert refusal.value.field == "accepts[0].amount"


def test_a_402_for_exactly_the_callers_bound_is_signed():
    assert sign(payment_required(amount=str(10**6)))["value"] == str(10**6)


def test_a_402_asking_for_a_permit2_transfer_instead_of_the_tokens_authorization_is_not_signed():
    """x402's client signs whatever `extra.assetTransferMethod` names: "permit2" had the wallet sign a Permit2
    `PermitWitnessTransferFrom` (Permit2's domain, not the pinned token's, spendable through x402's proxy wherever
    the wallet approved Permit2) instead of the EIP-3009 authorization the SDK checks."""
    header = payment_required(extra={"name": "USDC", "version": "2", "resource": "/agents/s/t",
                                     "assetTransferMethod": "permit2"})
    with pytest.raises(SigningRefused) as refusal:
        sign_payment_required(header, KEY, max_amount_atomic=10**6, network=NETWORK, token_domain=DOMAIN)
    assert refusal.value.field == "accepts[0].extra.assetTransferMethod"


@pytest.mark.parametrize("scheme", ["upto", "EXACT", ""])
def test_a_402_for_another_scheme_than_exact_is_refused_by_the_sdk_before_anything_is_paid(scheme):
    """x402's client, holding the "exact" scheme only, raised its own NoMatchingRequirementsError (no ValueError, not
    the SDK's refusal: a caller catching `SigningRefused` did not catch it) for a 402 of another scheme."""
    paid: list[httpx.Request] = []

    def marketplace(request: httpx.Request) -> httpx.Response:
        if "X-PAYMENT" in request.headers:
            paid.append(request)
            return httpx.Response(200, json={"result": {}})
        return httpx.Response(402, headers={"PAYMENT-REQUIRED": payment_required(scheme=scheme)}, json={})

    with MarketplaceClient("https://marketplace.example", "mk_test", network=NETWORK,
                           transport=httpx.MockTransport(marketplace)) as buyer:
        with pytest.raises(SigningRefused) as refusal:
            buyer.invoke_skill("seller", "translate", {"text": "hi"}, private_key=KEY, max_amount_atomic=10**6)
    assert refusal.value.field == "accepts[0].scheme"
    assert paid == []


# --- a proposal's answer, which activate_escrow later signs ------------------------------------------------------

class ProposalAnswers:
    """Answers `POST /usage-agreements` with the proposal as asked, then `alter` applied."""

    def __init__(self, alter=lambda answer: None):
        self.alter = alter

    def __call__(self, request: httpx.Request) -> httpx.Response:
        body = json.loads(request.content)
        answer = {"id": str(uuid.uuid4()), "status": "proposed", "service": {"id": body["service_id"]},
                  "settlement_model": "escrow", "quantity": body["quantity"], "price_per_unit_atomic": 20_000,
                  "token": "USDC", "buyer_wallet_address": body.get("buyer_wallet_address", GAS_WALLET),
                  "challenge_window_seconds": body.get("challenge_window_seconds", 3600),
                  "expires_at": body.get("expires_at", "2027-01-01T00:00:00Z")}
        self.alter(answer)
        return httpx.Response(201, json=answer)


def propose(alter=lambda answer: None, **terms) -> dict[str, Any]:
    with MarketplaceClient("https://marketplace.example", "mk_test", network=NETWORK,
                           transport=httpx.MockTransport(ProposalAnswers(alter))) as buyer:
        return buyer.propose_agreement(str(uuid.uuid4()), 10, **{"max_unit_price_atomic": 20_000, **terms})


def test_a_proposal_answered_as_asked_is_returned():
    answer = propose(challenge_window_seconds=86_400, expires_at="2027-01-01T00:00:00+00:00",
                     max_unit_price_atomic=20_000)
    assert answer["quantity"] == 10 and answer["challenge_window_seconds"] == 86_400


@pytest.mark.parametrize(("field", "value"), [
    ("quantity", 1000),  # signed before: a permit for 100 times the deposit asked for
    ("challenge_window_seconds", 1),  # signed before: a window no buyer can challenge in
    ("expires_at", "2099-01-01T00:00:00Z"),
    ("service", {"id": str(uuid.uuid4())}),
])
def test_a_proposal_answered_with_other_terms_than_asked_is_refused(field, value):
    def alter(answer):
        answer[field] = value

    with pytest.raises(SigningRefused) as refusal:
        propose(alter, challenge_window_seconds=86_400, expires_at="2027-01-01T00:00:00+00:00")
    assert refusal.value.field.startswith(f"agreement.{field}")


def test_a_proposal_priced_above_the_buyers_bound_is_refused():
    def alter(answer):
        answer["price_per_unit_atomic"] = 20_001

    with pytest.raises(SigningRefused) as refusal:
        propose(alter, max_unit_price_atomic=20_000)
    assert refusal.value.field == "agreement.price_per_unit_atomic"


def test_a_masumi_job_priced_above_the_buyers_bound_is_refused_before_signing():
    agreement_id, service_id = str(uuid.uuid4()), str(uuid.uuid4())

    def marketplace(request: httpx.Request) -> httpx.Response:
        if request.url.path == "/purchase":
            return httpx.Response(201, json={"data": {"agreementId": agreement_id, "ActivationPackage": {},
                                                      "blockchainIdentifier": "0x" + "ab" * 32}})
        return httpx.Response(200, json={"id": agreement_id, "service": {"id": service_id}, "quantity": 1,
                                         "price_per_unit_atomic": 5_000_000})

    with MarketplaceClient("https://marketplace.example", "mk_test", network=NETWORK,
                           transport=httpx.MockTransport(marketplace)) as buyer:
        with pytest.raises(SigningRefused) as refusal:
            buyer.purchase_masumi_job(service_id, {"text": "hi"}, KEY, permit_nonce=0, max_price_atomic=1_000_000)
    assert refusal.value.field == "agreement.price_per_unit_atomic"



def onchain_id_of(agreement_id: str) -> str:
    """The escrow's bytes32 id of an agreement: its UUID, left-padded (the marketplace's definition)."""
    return "0x" + uuid.UUID(agreement_id).hex.rjust(64, "0")


class MasumiMarketplace:
    """A compromised marketplace selling a Masumi job: its agreement as `alter` leaves it, and an activation package
    built for that agreement exactly as the SDK builds its own (so only the agreement's terms can give it away)."""

    def __init__(self, alter=lambda agreement: None, *, permit_nonce: int = 0):
        self.alter, self.permit_nonce = alter, permit_nonce
        self.locked: list[dict[str, Any]] = []
        self.purchased_at = int(time.time())

    def __call__(self, request: httpx.Request) -> httpx.Response:
        now = self.purchased_at
        agreement = {"id": AGREEMENT_ID, "onchain_id": onchain_id_of(AGREEMENT_ID), "service": {"id": "s1"}, "quantity": 1,
                     "price_per_unit_atomic": 1_000_000, "deposit_amount_atomic": 1_000_000,
                     "infra_fee_atomic": NETWORK.fee_schedule.fee_for(1_000_000), "chain_id": NETWORK.chain_id,
                     "token_address": NETWORK.token_address, "settlement_model": "escrow", "pricing_type": "per_call",
                     "unit_name": "job", "token": "USDC", "buyer_wallet_address": Account.from_key(KEY).address,
                     "seller_wallet_address": SELLER, "fee_recipient": GAS_WALLET,
                     "expires_at": datetime.fromtimestamp(SUBMIT_RESULT_TIME, UTC).isoformat(),
                     "challenge_window_seconds": UNLOCK_TIME - now}
        self.alter(agreement)
        if request.url.path == f"/usage-agreements/{AGREEMENT_ID}":
            return httpx.Response(200, json=agreement)
        if request.url.path == "/purchase/lock-funds":
            self.locked.append(json.loads(request.content))
            return httpx.Response(200, json={"data": {"blockchainIdentifier": agreement["onchain_id"]}})
        package = expected_activation(terms=AgreedTerms.from_agreement(agreement, NETWORK), network=NETWORK,
                                      token_domain=DOMAIN, deadline=now + 600, permit_nonce=self.permit_nonce)
        return httpx.Response(201, json={"data": {
            "agreementId": AGREEMENT_ID, "blockchainIdentifier": agreement["onchain_id"],
            "ActivationPackage": {"agreement_id": AGREEMENT_ID, "deadline": now + 600, **package}}})


SELLER = Account.create().address
AGREEMENT_ID, OTHER_AGREEMENT_ID = str(uuid.uuid4()), str(uuid.uuid4())
SUBMIT_RESULT_TIME = int(time.time()) + 7200
UNLOCK_TIME = SUBMIT_RESULT_TIME + 86_400


def buy_masumi_job(marketplace: MasumiMarketplace, *, permit_nonce: int | None = 0, **options: Any) -> dict[str, Any]:
    """The job bought without an RPC, the escrow permit's nonce the buyer's `permit_nonce` (the package's 0)."""
    with MarketplaceClient("https://marketplace.example", "mk_test", network=NETWORK,
                           transport=httpx.MockTransport(marketplace)) as buyer:
        return buyer.purchase_masumi_job("s1", {"text": "hi"}, KEY, max_price_atomic=10**6, permit_nonce=permit_nonce,
                                         submitResultTime=str(SUBMIT_RESULT_TIME * 1000),
                                         unlockTime=str(UNLOCK_TIME * 1000), **options)


def test_a_masumi_job_on_the_buyers_timers_is_signed():
    marketplace = MasumiMarketplace()
    buy_masumi_job(marketplace)
    assert len(marketplace.locked) == 1 and marketplace.locked[0]["intent_signature"]


def later_expiry(agreement: dict[str, Any]) -> None:
    """The deposit reclaimable a year after the buyer's submitResultTime: a seller's result accepted until then."""
    agreement["expires_at"] = datetime.fromtimestamp(SUBMIT_RESULT_TIME + 365 * 86_400, UTC).isoformat()


def shorter_window(agreement: dict[str, Any]) -> None:
    """A challenge window of a minute: the seller paid a minute after its result, long before the buyer's unlockTime,
    until which the buyer meant to be able to ask for a refund."""
    agreement["challenge_window_seconds"] = 60


@pytest.mark.parametrize(("alter", "field"), [(later_expiry, "agreement.expires_at"),
                                              (shorter_window, "agreement.challenge_window_seconds")])
def test_a_masumi_job_off_the_buyers_timers_is_refused_before_signing(alter, field):
    """The SDK checked the job's price and quantity only: an agreement (and its package) with another expiry than
    the buyer's submitResultTime, or a challenge window ending before its unlockTime, was signed."""
    marketplace = MasumiMarketplace(alter)
    with pytest.raises(SigningRefused) as refusal:
        buy_masumi_job(marketplace)
    assert refusal.value.field == field
    assert marketplace.locked == []


def buy_masumi_job_on_default_timers(marketplace: MasumiMarketplace) -> dict[str, Any]:
    with MarketplaceClient("https://marketplace.example", "mk_test", network=NETWORK,
                           transport=httpx.MockTransport(marketplace)) as buyer:
        return buyer.purchase_masumi_job("s1", {"text": "hi"}, KEY, permit_nonce=0, max_price_atomic=10**6)


def minute_window(agreement: dict[str, Any]) -> None:
    """No time to ask for a refund: the seller is paid a minute after its result."""
    agreement["challenge_window_seconds"] = 60


@pytest.mark.parametrize(("alter", "field"), [(later_expiry, "agreement.expires_at"),
                                              (minute_window, "agreement.challenge_window_seconds")])
def test_a_masumi_job_on_the_marketplaces_default_timers_is_bounded_as_a_proposals_defaults(alter, field):
    """Without submitResultTime and unlockTime, the job's expiry and challenge window were the marketplace's word:
    a deposit locked for a year, or a window of a minute, was signed, where `propose_agreement` bounds a term left to
    the marketplace (an expiry within `max_duration_seconds`, a window of at least `min_challenge_window_seconds`)."""
    assert buy_masumi_job_on_default_timers(MasumiMarketplace())["blockchainIdentifier"]
    marketplace = MasumiMarketplace(alter)
    with pytest.raises(SigningRefused) as refusal:
        buy_masumi_job_on_default_timers(marketplace)
    assert refusal.value.field == field
    assert marketplace.locked == []


def dearer(agreement: dict[str, Any]) -> None:
    """The job at 10,000 USDC instead of 1 (deposit and fee to match): the buyer's whole balance, in escrow."""
    price = 10_000 * 10**6
    agreement.update(price_per_unit_atomic=price, deposit_amount_atomic=price,
                     infra_fee_atomic=NETWORK.fee_schedule.fee_for(price))


def test_a_masumi_job_is_not_bought_without_the_buyers_price_bound():
    """`purchase_masumi_job` buys, signs and locks the funds in one call: the buyer never sees the agreement before
    its permit is signed, so without `max_price_atomic` any price the marketplace chose was signed (an escrow of
    10,000 USDC for a 1 USDC job). The bound is required, as `propose_direct_purchase`'s and `invoke_skill`'s are."""
    marketplace = MasumiMarketplace(dearer)
    with MarketplaceClient("https://marketplace.example", "mk_test", network=NETWORK,
                           transport=httpx.MockTransport(marketplace)) as buyer:
        with pytest.raises(TypeError, match="max_price_atomic"):
            buyer.purchase_masumi_job("s1", {"text": "hi"}, KEY, permit_nonce=0,
                                      submitResultTime=str(SUBMIT_RESULT_TIME * 1000),
                                      unlockTime=str(UNLOCK_TIME * 1000))
        with pytest.raises(SigningRefused) as refusal:
            buyer.purchase_masumi_job("s1", {"text": "hi"}, KEY, permit_nonce=0, max_price_atomic=10**6,
                                      submitResultTime=str(SUBMIT_RESULT_TIME * 1000),
                                      unlockTime=str(UNLOCK_TIME * 1000))
    assert refusal.value.field == "agreement.price_per_unit_atomic"
    assert marketplace.locked == []


def another_agreements_escrow(agreement: dict[str, Any]) -> None:
    """The agreement's package made for another escrow id than its own (another agreement's, its buyer's)."""
    agreement["onchain_id"] = onchain_id_of(OTHER_AGREEMENT_ID)


def another_agreement(agreement: dict[str, Any]) -> None:
    """Another agreement of the buyer's, escrow id and all, answered for the one the purchase created."""
    agreement.update(id=OTHER_AGREEMENT_ID, onchain_id=onchain_id_of(OTHER_AGREEMENT_ID))


def test_an_agreement_under_another_escrow_id_than_its_own_is_not_signed():
    """An agreement's escrow id is its UUID, left-padded; the SDK signed the intent (and, later, a challenge) for
    whatever `onchain_id` the marketplace wrote beside it: the buyer's deposit went into an escrow under another
    agreement's id, and a dispute of this agreement could be signed for that other one."""
    marketplace = MasumiMarketplace(another_agreements_escrow)
    with pytest.raises(SigningRefused) as refusal:
        buy_masumi_job(marketplace)
    assert refusal.value.field == "agreement.onchain_id"
    assert marketplace.locked == []
    marketplace = MasumiMarketplace(another_agreement)
    with pytest.raises(SigningRefused) as refusal:
        buy_masumi_job(marketplace)
    assert refusal.value.field == "agreement.id"
    assert marketplace.locked == []
    agreement_id = str(uuid.uuid4())
    with MarketplaceClient("https://marketplace.example", "mk_test", network=NETWORK,
                           transport=httpx.MockTransport(lambda request: httpx.Response(500))) as buyer:
        with pytest.raises(SigningRefused) as refusal:
            buyer.challenge({"id": agreement_id, "onchain_id": onchain_id_of(str(uuid.uuid4())),
                             "challenge_window_seconds": 86_400}, KEY, "not this one")
    assert refusal.value.field == "agreement.onchain_id"


class RefundMarketplace:
    """A Masumi purchase paying a seller's payment request (`blockchainIdentifier` is the request's id, not the
    escrow's), bought as agreement `agreement_id`; the listing says it belongs to `listed_agreement_id`."""

    def __init__(self, agreement_id: str, listed_agreement_id: str | None = None, *, window: Any = 86_400,
                 unlock_time: str | None = None):
        self.identifier = onchain_id_of(str(uuid.uuid4()))  # the seller's payment request
        self.listed = listed_agreement_id or agreement_id
        self.unlock = int(time.time()) + 3600
        self.window, self.unlock_time = window, unlock_time or str(self.unlock * 1000)
        self.submitted: list[dict[str, Any]] = []

    def __call__(self, request: httpx.Request) -> httpx.Response:
        onchain_id = onchain_id_of(self.listed)
        if request.method == "GET" and request.url.path == "/purchase":
            return httpx.Response(200, json={"data": {"Purchases": [{
                "blockchainIdentifier": self.identifier, "agreementId": self.listed,
                "unlockTime": self.unlock_time, "refundRequestTypedData": typed_data.challenge(
                    chain_id=NETWORK.chain_id, escrow_address=NETWORK.escrow_address, agreement_id=onchain_id,
                    deadline=self.unlock)}]}})
        if request.url.path == f"/usage-agreements/{self.listed}":
            return httpx.Response(200, json={"id": self.listed, "onchain_id": onchain_id,
                                             "challenge_window_seconds": self.window})
        self.submitted.append(json.loads(request.content))
        return httpx.Response(200, json={"data": {"onChainState": "RefundRequested"}})


def refund(marketplace: RefundMarketplace, rpc_url: str | None = None, **options) -> dict[str, Any]:
    with MarketplaceClient("https://marketplace.example", "mk_test", network=NETWORK, rpc_url=rpc_url,
                           transport=httpx.MockTransport(marketplace)) as buyer:
        return buyer.request_refund(marketplace.identifier, KEY, **options)


def test_a_refund_of_a_purchase_paying_a_payment_request_is_signed_for_its_agreements_escrow():
    """A purchase paying a seller's payment request is named by the request's id; its escrow is its agreement's.
    The SDK signed the refund's Challenge for the request's id, so it refused the marketplace's honest one (for the
    escrow): the buyer could not ask for its money back. Given the agreement the purchase was bought as (the
    `agreementId` `purchase_masumi_job` returned), it signs for that agreement's escrow, and for no other."""
    agreement_id = str(uuid.uuid4())
    honest = RefundMarketplace(agreement_id)
    assert refund(honest, agreement_id=agreement_id)["onChainState"] == "RefundRequested"
    [submitted] = honest.submitted
    signer = typed_data.recover_typed_data_signer(typed_data.challenge(
        chain_id=NETWORK.chain_id, escrow_address=NETWORK.escrow_address, agreement_id=onchain_id_of(agreement_id),
        deadline=honest.unlock), submitted["signature"])
    assert signer == Account.from_key(KEY).address and submitted["blockchainIdentifier"] == honest.identifier
    # Without the agreement, the request's id is not the escrow's: refused as before, nothing signed.
    with pytest.raises(SigningRefused):
        refund(RefundMarketplace(agreement_id))
    # A listing that puts the purchase under another of the buyer's agreements is refused.
    elsewhere = RefundMarketplace(agreement_id, listed_agreement_id=str(uuid.uuid4()))
    with pytest.raises(SigningRefused) as refusal:
        refund(elsewhere, agreement_id=agreement_id)
    assert refusal.value.field == "purchase.agreementId" and elsewhere.submitted == []


# A challenge window as a compromised marketplace may state it: int() raised ValueError, TypeError or OverflowError
# on it, or rounded it (a float) and signed.
MALFORMED_WINDOWS = [pytest.param(value, id=name) for name, value in [
    ("letters", "abc"), ("null", None), ("float", 7200.5), ("bool", True), ("negative", -3600),
    ("beyond int()'s digit limit", "1" * 5000)]]


def challenge_package_marketplace(agreement_id: str, submitted: list[dict[str, Any]]):
    """A marketplace answering an honest challenge package (deadline a minute away) and recording what is sent."""
    deadline = int(time.time()) + 60
    package = {"deadline": deadline, "challenge": typed_data.challenge(
        chain_id=NETWORK.chain_id, escrow_address=NETWORK.escrow_address, agreement_id=onchain_id_of(agreement_id),
        deadline=deadline)}

    def marketplace(request: httpx.Request) -> httpx.Response:
        if request.method == "GET":
            return httpx.Response(200, json=package)
        submitted.append(json.loads(request.content))
        return httpx.Response(201, json={"status": "disputed"})

    return marketplace


@pytest.mark.parametrize("window", [*MALFORMED_WINDOWS, pytest.param(float("inf"), id="infinite")])
def test_a_challenge_of_an_agreement_stating_a_malformed_window_is_refused_not_crashed_on(window):
    agreement_id, submitted = str(uuid.uuid4()), []
    agreement = {"id": agreement_id, "onchain_id": onchain_id_of(agreement_id), "challenge_window_seconds": window}
    with MarketplaceClient("https://marketplace.example", "mk_test", network=NETWORK, transport=httpx.MockTransport(
            challenge_package_marketplace(agreement_id, submitted))) as buyer:
        with pytest.raises(SigningRefused) as refusal:
            buyer.challenge(agreement, KEY, "the answers were empty")
    assert refusal.value.field == "agreement.challenge_window_seconds" and submitted == []


@pytest.mark.parametrize("window", MALFORMED_WINDOWS)
def test_a_refund_of_an_agreement_stating_a_malformed_window_is_refused_not_crashed_on(window):
    agreement_id = str(uuid.uuid4())
    marketplace = RefundMarketplace(agreement_id, window=window)
    with pytest.raises(SigningRefused) as refusal:
        refund(marketplace, agreement_id=agreement_id)
    assert refusal.value.field == "agreement.challenge_window_seconds" and marketplace.submitted == []


def test_a_refund_whose_unlock_time_is_beyond_int_s_digit_limit_is_refused_not_crashed_on():
    agreement_id = str(uuid.uuid4())
    marketplace = RefundMarketplace(agreement_id, unlock_time="9" * 5000)
    with pytest.raises(DeadlineOutOfRange) as refusal:
        refund(marketplace, agreement_id=agreement_id)
    assert refusal.value.field == "unlockTime" and marketplace.submitted == []


def test_a_whole_number_beyond_int_s_digit_limit_is_refused_not_crashed_on():
    with pytest.raises(SigningRefused):
        require_equal("1" * 5000, 2, "amount")
    with pytest.raises(SigningRefused) as refusal:
        AgreedTerms.from_agreement({"id": AGREEMENT_ID, "onchain_id": onchain_id_of(AGREEMENT_ID),
                                    "quantity": "9" * 5000, "price_per_unit_atomic": 1}, NETWORK)
    assert refusal.value.field == "agreement.quantity"


# --- scalars and the seller's signature check --------------------------------------------------------------------

def test_a_number_in_other_digits_than_ascii_is_refused_not_crashed_on():
    with pytest.raises(SigningRefused):
        require_equal("\u00b2", 2, "amount")  # "²".isdigit() is true, and int() refuses it
    with pytest.raises(SigningRefused):
        require_equal("\u0661\u0662", 12, "amount")  # Arabic-Indic 12: int() reads it as 12


def test_a_signed_call_verifies_under_its_own_call_number_spelling_only():
    """A seller rejects call numbers it has served: a captured request re-sent as call `012` must not verify."""
    now = int(time.time())
    headers = {"X-Marketplace-Agreement": "a1", "X-Marketplace-Call-Seq": "12", "X-Marketplace-Timestamp": str(now),
               "X-Marketplace-Signature": proxy_signature.sign("s3cret", agreement_id="a1", call_seq=12,
                                                               timestamp=now, method="POST", path="/v1/run")}
    assert proxy_signature.verify("s3cret", headers, method="POST", path="/v1/run")
    for name, spellings in (("X-Marketplace-Call-Seq", ("012", "+12", " 12", "1_2", "\u0661\u0662")),
                            ("X-Marketplace-Timestamp", (f"0{now}", f"+{now}"))):
        accepted = [spelling for spelling in spellings
                    if proxy_signature.verify("s3cret", {**headers, name: spelling}, method="POST", path="/v1/run")]
        assert accepted == [], f"{name}: the signature of call 12 also verifies as {accepted}"


# --- the buyer's RPC's clock -------------------------------------------------------------------------------------

class JsonRpcNode(BaseHTTPRequestHandler):
    """A JSON-RPC node stub's handler: `answer_json` sends a 200 with the body; nothing logged."""

    def answer_json(self, body: bytes) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: Any) -> None:
        pass


def rpc_clock_ahead_by(seconds: int) -> type[BaseHTTPRequestHandler]:
    """A JSON-RPC node whose latest block is `seconds` ahead of this machine's clock."""

    class Node(JsonRpcNode):
        def do_POST(self) -> None:
            call = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            assert call["method"] in ("eth_chainId", "eth_getBlockByNumber"), call
            result = hex(NETWORK.chain_id) if call["method"] == "eth_chainId" else {
                "timestamp": hex(int(time.time()) + seconds)}
            self.answer_json(json.dumps({"jsonrpc": "2.0", "id": call["id"], "result": result}).encode())

    return Node


def proposed_escrow(challenge_deadline: int, state: str = "proposed", *, challenge_window: int = 0):
    """`ChainReader.escrow` of a node reading the buyer's escrow in `state`, its challenge window ending then (and
    `challenge_window` long, as activated)."""
    def escrow(self: ChainReader, *args: Any, **kwargs: Any) -> OnchainEscrow:
        zero = "0x" + "00" * 20
        return OnchainEscrow(state=state, buyer=zero, seller=zero, receipt_signer=zero, deposit_amount=0,
                             settled_amount=0, last_seq=0, usage_digest="0x" + "00" * 32,
                             challenge_deadline=challenge_deadline, challenge_window=challenge_window)

    return escrow


def challenge_through(rpc_url: str, *, ahead: int) -> list[int]:
    """The buyer's challenge of an agreement with a 7-day window, whose package asks for a deadline `ahead` seconds
    past this machine's clock; the deadlines signed."""
    agreement_id = str(uuid.uuid4())
    agreement = {"id": agreement_id, "onchain_id": onchain_id_of(agreement_id), "challenge_window_seconds": 7 * 86400}
    deadline = int(time.time()) + ahead
    package = {"deadline": deadline, "challenge": typed_data.challenge(
        chain_id=NETWORK.chain_id, escrow_address=NETWORK.escrow_address, agreement_id=agreement["onchain_id"],
        deadline=deadline)}
    signed: list[int] = []

    def marketplace(request: httpx.Request) -> httpx.Response:
        if request.method == "GET":
            return httpx.Response(200, json=package)
        signed.append(json.loads(request.content)["deadline"])
        return httpx.Response(200, json={"status": "disputed"})

    with MarketplaceClient("https://marketplace.example", "mk_test", network=NETWORK, rpc_url=rpc_url,
                           transport=httpx.MockTransport(marketplace)) as buyer:
        buyer.challenge(agreement, KEY, "the answers were empty")
    return signed


def test_a_clock_a_little_ahead_on_the_buyers_rpc_is_believed(monkeypatch):
    """An idle chain's clock lags, a busy one's may run a little ahead of this machine's: a challenge valid for the
    whole window by the chain's clock is signed."""
    monkeypatch.setattr(ChainReader, "escrow", proposed_escrow(int(time.time()) + 7 * 86400 + 60))
    with serving(rpc_clock_ahead_by(60)) as rpc_url:
        assert len(challenge_through(rpc_url, ahead=7 * 86400 + 30)) == 1


def test_a_clock_far_ahead_on_the_buyers_rpc_is_not_believed_for_signing():
    """The SDK took the later of this machine's clock and the buyer's RPC's: an RPC (compromised, or on another
    chain) a day ahead had a challenge signed valid for a day past its window, at the marketplace's asking."""
    with serving(rpc_clock_ahead_by(86400)) as rpc_url:
        with pytest.raises(SigningRefused) as refusal:
            challenge_through(rpc_url, ahead=7 * 86400 + 3600)
    assert refusal.value.field == "rpc clock", refusal.value


# --- the terms activate_escrow signs: the buyer's, or within the buyer's bounds -------------------------------------

BUYER = Account.from_key(KEY).address
LISTED_PRICE = 20_000


class EscrowMarketplace:
    """A compromised marketplace selling an escrow agreement: it answers the proposal (and any later read of the
    agreement) with the terms as `alter` leaves them, and an activation package built for those terms exactly as the
    SDK builds its own, so only the terms can give it away. `activated` records what the buyer signed."""

    def __init__(self, alter=lambda agreement: None, alter_read=lambda agreement: None, *, permit_nonce: int = 0):
        self.alter, self.alter_read, self.permit_nonce = alter, alter_read, permit_nonce
        self.agreement: dict[str, Any] = {}
        self.activated: list[dict[str, Any]] = []

    def __call__(self, request: httpx.Request) -> httpx.Response:
        now = int(time.time())
        if request.method == "POST" and request.url.path == "/usage-agreements":
            asked = json.loads(request.content)
            agreement_id = str(uuid.uuid4())
            quantity, price = asked["quantity"], LISTED_PRICE
            expires_at = asked.get("expires_at") or datetime.fromtimestamp(now + 7 * 86_400, UTC).isoformat()
            self.agreement = {
                "id": agreement_id, "onchain_id": onchain_id_of(agreement_id), "status": "proposed",
                "service": {"id": asked["service_id"]}, "quantity": quantity, "price_per_unit_atomic": price,
                "deposit_amount_atomic": quantity * price, "infra_fee_atomic": 0, "chain_id": NETWORK.chain_id,
                "token_address": NETWORK.token_address, "settlement_model": "escrow", "pricing_type": "per_call",
                "unit_name": "call", "token": "USDC", "buyer_wallet_address": BUYER, "seller_wallet_address": SELLER,
                "fee_recipient": GAS_WALLET, "expires_at": expires_at,
                "challenge_window_seconds": asked.get("challenge_window_seconds", 3600)}
            self.alter(self.agreement)
            self.settle_amounts(self.agreement)
            return httpx.Response(201, json=self.agreement)
        if request.method == "GET" and request.url.path.endswith("/activation-package"):
            agreement = self.read()
            package = expected_activation(terms=AgreedTerms.from_agreement(agreement, NETWORK), network=NETWORK,
                                          token_domain=DOMAIN, deadline=now + 600, permit_nonce=self.permit_nonce)
            return httpx.Response(200, json={"agreement_id": agreement["id"], "deadline": now + 600, **package})
        if request.method == "GET":
            return httpx.Response(200, json=self.read())
        self.activated.append(json.loads(request.content))
        return httpx.Response(202, json={"status": "submitting"})

    def read(self) -> dict[str, Any]:
        agreement = json.loads(json.dumps(self.agreement))
        self.alter_read(agreement)
        self.settle_amounts(agreement)
        return agreement

    @staticmethod
    def settle_amounts(agreement: dict[str, Any]) -> None:
        """The deposit and fee of the (altered) quantity and price, so that they do not give it away."""
        deposit = agreement["quantity"] * agreement["price_per_unit_atomic"]
        agreement.update(deposit_amount_atomic=deposit, infra_fee_atomic=NETWORK.fee_schedule.fee_for(deposit))


def escrow_buyer(marketplace: EscrowMarketplace) -> MarketplaceClient:
    return MarketplaceClient("https://marketplace.example", "mk_test", network=NETWORK,
                             transport=httpx.MockTransport(marketplace))


def test_an_escrow_on_the_terms_the_buyer_proposed_is_signed():
    marketplace = EscrowMarketplace()
    with escrow_buyer(marketplace) as buyer:
        agreement = buyer.propose_agreement(str(uuid.uuid4()), 10, max_unit_price_atomic=LISTED_PRICE)
        buyer.activate_escrow(agreement, KEY, permit_nonce=0)
        # The same agreement read back, or kept as JSON and activated by another client, within the buyer's bounds.
        buyer.activate_escrow(buyer.get_agreement(agreement["id"]), KEY, permit_nonce=0)
    with escrow_buyer(marketplace) as elsewhere:
        elsewhere.activate_escrow(json.loads(json.dumps(agreement)), KEY, permit_nonce=0, quantity=10,
                                  max_unit_price_atomic=LISTED_PRICE)
    assert len(marketplace.activated) == 3


def test_an_escrow_is_not_proposed_without_the_buyers_price_bound():
    """`max_unit_price_atomic` was optional and `activate_escrow` signed the proposal's answer: the documented flow
    (propose, accept, activate) signed a permit for any unit price a compromised marketplace answered with."""
    marketplace = EscrowMarketplace(lambda agreement: agreement.update(price_per_unit_atomic=1000 * LISTED_PRICE))
    with escrow_buyer(marketplace) as buyer:
        with pytest.raises(TypeError, match="max_unit_price_atomic"):
            buyer.propose_agreement(str(uuid.uuid4()), 10)
        with pytest.raises(SigningRefused) as refusal:
            buyer.propose_agreement(str(uuid.uuid4()), 10, max_unit_price_atomic=LISTED_PRICE)
    assert refusal.value.field == "agreement.price_per_unit_atomic"
    assert marketplace.activated == []


def a_year_long(agreement: dict[str, Any]) -> None:
    """An expiry a year away: the deposit reclaimable only then, should the seller never settle."""
    agreement["expires_at"] = datetime.fromtimestamp(int(time.time()) + 365 * 86_400, UTC).isoformat()


def a_second_long_window(agreement: dict[str, Any]) -> None:
    """A challenge window of a second: no buyer can dispute the proposed settlement in it."""
    agreement["challenge_window_seconds"] = 1


@pytest.mark.parametrize(("alter", "field"), [(a_year_long, "agreement.expires_at"),
                                              (a_second_long_window, "agreement.challenge_window_seconds")])
def test_an_escrow_on_terms_left_to_the_marketplace_beyond_the_defaults_is_not_signed(alter, field):
    """A term the buyer left out was the marketplace's word: an expiry a year away (the platform's maximum) or a
    challenge window of a second was signed. Left out, each must lie within the marketplace's documented default
    (7 days, an hour), unless the buyer allows more (`max_duration_seconds`, `min_challenge_window_seconds`)."""
    marketplace = EscrowMarketplace(alter)
    with escrow_buyer(marketplace) as buyer:
        with pytest.raises(SigningRefused) as refusal:
            agreement = buyer.propose_agreement(str(uuid.uuid4()), 10, max_unit_price_atomic=LISTED_PRICE)
            buyer.activate_escrow(agreement, KEY, permit_nonce=0)
        assert refusal.value.field == field
        agreement = buyer.propose_agreement(str(uuid.uuid4()), 10, max_unit_price_atomic=LISTED_PRICE,
                                            max_duration_seconds=366 * 86_400, min_challenge_window_seconds=1)
        buyer.activate_escrow(agreement, KEY, permit_nonce=0)
    assert len(marketplace.activated) == 1


def a_hundred_times_the_quantity(agreement: dict[str, Any]) -> None:
    agreement["quantity"] *= 100


def dearer_unit(agreement: dict[str, Any]) -> None:
    agreement["price_per_unit_atomic"] *= 100


@pytest.mark.parametrize(("alter", "field"), [
    (a_hundred_times_the_quantity, "agreement.quantity"), (dearer_unit, "agreement.price_per_unit_atomic"),
    (a_year_long, "agreement.expires_at"), (a_second_long_window, "agreement.challenge_window_seconds")])
def test_an_agreement_read_back_with_other_terms_than_proposed_is_not_signed(alter, field):
    """`activate_escrow` signed whatever agreement it was handed: one read back from the marketplace
    (`get_agreement`, or a stored answer) with a hundred times the quantity, a dearer unit, a later expiry or a
    shorter window was signed. It is held to what this client proposed, or, for an agreement this client did not
    propose, to the quantity and unit price bound the buyer gives it."""
    marketplace = EscrowMarketplace(alter_read=alter)
    with escrow_buyer(marketplace) as buyer:
        agreement = buyer.propose_agreement(str(uuid.uuid4()), 10, max_unit_price_atomic=LISTED_PRICE)
        with pytest.raises(SigningRefused) as refusal:
            buyer.activate_escrow(buyer.get_agreement(agreement["id"]), KEY, permit_nonce=0)
        assert refusal.value.field == field
    with escrow_buyer(marketplace) as elsewhere:
        read_back = elsewhere.get_agreement(agreement["id"])
        with pytest.raises(TypeError, match="max_unit_price_atomic"):
            elsewhere.activate_escrow(read_back, KEY, permit_nonce=0)
        with pytest.raises(SigningRefused) as refusal:
            elsewhere.activate_escrow(read_back, KEY, permit_nonce=0, quantity=10, max_unit_price_atomic=LISTED_PRICE)
        assert refusal.value.field == field
    assert marketplace.activated == []


@pytest.mark.parametrize("spelled", [str, str.upper, lambda agreement_id: f"urn:uuid:{agreement_id}"])
def test_a_proposal_answered_with_another_proposals_agreement_is_refused(spelled):
    """`activate_escrow` holds an agreement to what this client proposed, remembered by the answer's id: a second
    proposal (an hour's window left to the default) answered with the first's agreement (a day's window asked for)
    replaced what was remembered for it, and the first agreement, read back with an hour's window, was signed. The
    id spelled otherwise (upper case, a URN: the same UUID, so the same escrow id) was another agreement."""
    marketplace = EscrowMarketplace()
    first: dict[str, Any] = {}

    def reusing_the_first_id(request: httpx.Request) -> httpx.Response:
        response = marketplace(request)
        if request.method == "POST" and request.url.path == "/usage-agreements":
            if not first:
                first.update(marketplace.agreement)
            else:  # a replay of the first proposal is answered with its id as it was
                replay = json.loads(request.content).get("challenge_window_seconds") is not None
                marketplace.agreement.update(id=first["id"] if replay else spelled(first["id"]),
                                             onchain_id=first["onchain_id"])
            return httpx.Response(201, json=marketplace.agreement)
        return response

    service_id = str(uuid.uuid4())
    with MarketplaceClient("https://marketplace.example", "mk_test", network=NETWORK,
                           transport=httpx.MockTransport(reusing_the_first_id)) as buyer:
        buyer.propose_agreement(service_id, 10, max_unit_price_atomic=LISTED_PRICE, challenge_window_seconds=86_400)
        # The same proposal answered again with its agreement (a replay) is that agreement still.
        buyer.propose_agreement(service_id, 10, max_unit_price_atomic=LISTED_PRICE, challenge_window_seconds=86_400)
        with pytest.raises(SigningRefused) as refusal:
            buyer.propose_agreement(service_id, 10, max_unit_price_atomic=LISTED_PRICE)
        assert refusal.value.field == "agreement.id"
        with pytest.raises(SigningRefused) as refusal:
            buyer.activate_escrow(buyer.get_agreement(first["id"]), KEY, permit_nonce=0)
        assert refusal.value.field == "agreement.challenge_window_seconds"
    assert marketplace.activated == []


# --- what the buyer's RPC reads: the token's domain, the permit nonce ---------------------------------------------

def token_node(*, domain: tuple[str, str] = ("USDC", "2"), nonces: list[int] | None = None,
               chain_id: int = 84532, chain_ids: list[int] | None = None) -> type[BaseHTTPRequestHandler]:
    """A JSON-RPC node on `chain_id` whose token reads `domain` (EIP-5267) and whose `nonces(buyer)` answers
    `nonces` in turn (the last one from then on); its clock is this machine's. With `chain_ids`, `eth_chainId`
    answers them in turn (the last one from then on)."""
    answers = list(nonces or [0])
    chain_answers = list(chain_ids or [chain_id])

    class Node(JsonRpcNode):
        def do_POST(self) -> None:
            call = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            method, params = call["method"], call["params"]
            if method == "eth_chainId":
                result: Any = hex(chain_answers.pop(0) if len(chain_answers) > 1 else chain_answers[0])
            elif method == "eth_getBlockByNumber":
                result = {"timestamp": hex(int(time.time()))}
            elif method == "eth_call" and params[0]["data"].startswith("0x" + keccak(text="eip712Domain()")[:4].hex()):
                result = "0x" + encode(["bytes1", "string", "string", "uint256", "address", "bytes32", "uint256[]"],
                                       [b"\x0f", domain[0], domain[1], chain_id, NETWORK.token_address,
                                        b"\x00" * 32, []]).hex()
            elif method == "eth_call" and params[0]["data"].startswith("0x" + keccak(text="nonces(address)")[:4].hex()):
                result = "0x" + encode(["uint256"], [answers.pop(0) if len(answers) > 1 else answers[0]]).hex()
            else:
                raise AssertionError(call)
            body = json.dumps({"jsonrpc": "2.0", "id": call["id"], "result": result}).encode()
            self.answer_json(body)

    return Node


def test_a_token_domain_read_through_the_rpc_is_used_when_it_is_the_pinned_one():
    with serving(token_node()) as rpc_url, MarketplaceClient("https://marketplace.example", "mk_test",
                                                             network=NETWORK, rpc_url=rpc_url) as buyer:
        assert buyer.token_domain() == DOMAIN
    unpinned = dataclasses.replace(NETWORK, token_domain=None)
    with serving(token_node(domain=("USD Coin", "2"))) as rpc_url, MarketplaceClient(
            "https://marketplace.example", "mk_test", network=unpinned, rpc_url=rpc_url) as buyer:
        assert buyer.token_domain() == TokenDomain("USD Coin", "2")


def test_a_purchase_signed_after_the_buyers_rpc_moved_to_another_chain_is_refused():
    """The RPC's chain id was asked once per client, with the token's domain, then taken as read: an RPC URL serving
    the pinned chain first and another later (a load balancer, a node reconfigured, a hostile one) had every later
    purchase sign a fee permit for the nonce another chain's token reads (7 here: a permit usable later on the
    pinned chain, once the buyer's nonces reach it), and signatures timed by its clock. Each signing asks again, as
    `verify_usage` does."""
    marketplace = DirectMarketplace(refusals=0)
    with serving(token_node(chain_ids=[84532, 1], nonces=[0, 7])) as rpc_url, MarketplaceClient(
            "https://marketplace.example", "mk_test", network=NETWORK, rpc_url=rpc_url,
            transport=httpx.MockTransport(marketplace)) as buyer, warnings.catch_warnings():
        warnings.simplefilter("ignore", SellerUnverified)
        buyer.propose_direct_purchase(str(uuid.uuid4()), 10, wallet=KEY, max_unit_price_atomic=LISTED_PRICE)
        with pytest.raises(SigningRefused) as refused:
            buyer.propose_direct_purchase(str(uuid.uuid4()), 10, wallet=KEY, max_unit_price_atomic=LISTED_PRICE)
    assert (refused.value.field, refused.value.received) == ("rpc chain id", 1)
    assert [permit["nonce"] for permit in marketplace.fee_permits] == [0]


def test_a_token_domain_read_through_the_rpc_other_than_the_pinned_one_is_refused():
    """The domain read through the buyer's RPC replaced the pinned one unchecked: a hostile RPC chose the domain of
    every permit and authorization the wallet signed (another token's, whose signatures the pinned token would not
    check, or a domain the RPC's operator can use elsewhere)."""
    with serving(token_node(domain=("USD Coin", "2"))) as rpc_url, MarketplaceClient(
            "https://marketplace.example", "mk_test", network=NETWORK, rpc_url=rpc_url) as buyer:
        with pytest.raises(SigningRefused) as refusal:
            buyer.token_domain()
    assert refusal.value.field == "token domain"


class DirectMarketplace:
    """A compromised marketplace selling 10 calls at 0.02 USDC directly: it refuses the first `refusals` purchases
    (as it would one whose fee permit names a nonce the token is not at) and records every fee permit it is sent."""

    def __init__(self, refusals: int = 1):
        self.refusals = refusals
        self.fee_permits: list[dict[str, Any]] = []

    def __call__(self, request: httpx.Request) -> httpx.Response:
        if request.url.path.startswith("/agents/services/"):
            return httpx.Response(200, json={"id": request.url.path.rsplit("/", 1)[1],
                                             "pricing": {"unit_price_atomic": LISTED_PRICE},
                                             "seller": {"wallet_address": SELLER}})
        if request.url.path == "/payment-requirements":
            amount = int(request.url.params["amount_atomic"])
            return httpx.Response(200, json={"amount_atomic": amount, "fee_atomic": NETWORK.fee_schedule.fee_for(amount),
                                             "chain_id": NETWORK.chain_id, "token": {"address": NETWORK.token_address},
                                             "gas_wallet_address": GAS_WALLET})
        self.fee_permits.append(json.loads(request.content)["fee_permit"])
        if len(self.fee_permits) <= self.refusals:
            return httpx.Response(400, json={"error": {"code": "invalid_permit", "message": "bad nonce"}})
        return httpx.Response(201, json={"id": str(uuid.uuid4()), "status": "proposed"})


class ReshapingMarketplace(DirectMarketplace):
    """`DirectMarketplace` answering the service (`"service"`) or the payment requirements (`"requirements"`) with
    `reshape(its honest answer)`."""

    def __init__(self, answer: str, reshape):
        super().__init__(refusals=0)
        self.answer, self.reshape = answer, reshape

    def __call__(self, request: httpx.Request) -> httpx.Response:
        honest = super().__call__(request)
        answered = "service" if request.url.path.startswith("/agents/services/") else (
            "requirements" if request.url.path == "/payment-requirements" else None)
        return httpx.Response(200, json=self.reshape(honest.json())) if answered == self.answer else honest


@pytest.mark.parametrize(("answer", "reshape", "field"), [
    ("requirements", lambda requirements: [], "payment_requirements.amount_atomic"),
    ("requirements", lambda requirements: None, "payment_requirements.amount_atomic"),
    ("requirements", lambda requirements: {name: value for name, value in requirements.items() if name != "fee_atomic"},
     "payment_requirements.fee_atomic"),
    ("requirements", lambda requirements: {**requirements, "token": "USDC"}, "payment_requirements.token.address"),
    ("requirements", lambda requirements: {**requirements, "token": None}, "payment_requirements.token.address"),
    ("service", lambda service: {**service, "seller": {"wallet_address": "0x" + "g" * 40}}, "seller.wallet_address"),
    ("service", lambda service: {**service, "seller": {"wallet_address": "0x" + "\uff11" * 40}},
     "seller.wallet_address"),
    ("service", lambda service: {**service, "seller": {"wallet_address": SELLER + " "}}, "seller.wallet_address"),
    ("service", lambda service: {**service, "seller": {"wallet_address": 123}}, "seller.wallet_address"),
    ("service", lambda service: {**service, "seller": {"wallet_address": None}}, "seller.wallet_address"),
])
def test_a_direct_purchase_answered_in_another_shape_is_refused_before_signing(answer, reshape, field):
    """Payment requirements of another shape than an object of the fields the SDK compares (a list, null, a field
    missing, a token that is no object), and a payee that is no address (not hex, fullwidth digits, a space, a
    number, null), raised TypeError, KeyError, the SDK's ValueError or pydantic's ValidationError out of the purchase:
    nothing was signed, but a caller catching the SDK's refusals (`SigningRefused`) did not catch them."""
    marketplace = ReshapingMarketplace(answer, reshape)
    with direct_buyer(marketplace) as buyer, warnings.catch_warnings(), pytest.raises(SigningRefused) as refused:
        warnings.simplefilter("ignore", SellerUnverified)
        buyer.propose_direct_purchase(str(uuid.uuid4()), 10, wallet=KEY, max_unit_price_atomic=LISTED_PRICE,
                                      permit_nonce=0)
    assert refused.value.field == field
    assert marketplace.fee_permits == []  # nothing sent


def buy_directly_twice(marketplace: DirectMarketplace, rpc_url: str) -> None:
    """Two direct purchases of the same service by the buyer (the second a retry when the marketplace refused the
    first)."""
    with MarketplaceClient("https://marketplace.example", "mk_test", network=NETWORK, rpc_url=rpc_url,
                           transport=httpx.MockTransport(marketplace)) as buyer:
        service_id = str(uuid.uuid4())
        for attempt in range(2):
            try:
                buyer.propose_direct_purchase(service_id, 10, wallet=KEY, max_unit_price_atomic=LISTED_PRICE)
            except MarketplaceError:
                assert attempt == 0


@pytest.mark.parametrize("nonces", [[1, 0], [0, 1]])
def test_a_second_fee_permit_usable_with_the_first_is_not_signed(nonces):
    """A hostile RPC answering the token's nonce one too high failed the direct purchase (its fee permit did not
    verify); the buyer's retry read the true nonce and signed a second fee permit ([1, 0]). Both were then valid for
    their hour, the first as soon as the second was used: the gas wallet could take the fee twice. Likewise a
    retry of a failed purchase under a nonce read one too high ([0, 1]). While a fee permit this client signed is
    valid, one for a lower nonce, or for another nonce than a failed purchase's, is refused."""
    marketplace = DirectMarketplace()
    with serving(token_node(nonces=nonces)) as rpc_url:
        with pytest.raises(SigningRefused) as refusal:
            buy_directly_twice(marketplace, rpc_url)
    assert refusal.value.field == "fee_permit.message.nonce"
    assert [permit["nonce"] for permit in marketplace.fee_permits] == nonces[:1]


@pytest.mark.parametrize(("nonces", "refusals"), [([3, 3], 1), ([3, 4], 0)])
def test_a_fee_permit_is_signed_again_for_the_same_nonce_or_after_a_purchase_for_the_next(nonces, refusals):
    """A purchase refused for another reason is bought again under the same nonce (only one of the two permits can
    ever be used); after a purchase the marketplace took, the next one is signed under the next nonce."""
    marketplace = DirectMarketplace(refusals=refusals)
    with serving(token_node(nonces=nonces)) as rpc_url:
        buy_directly_twice(marketplace, rpc_url)
    assert [permit["nonce"] for permit in marketplace.fee_permits] == nonces


# --- revoking a direct purchase's payment authorization --------------------------------------------------------

class CancellingMarketplace(DirectMarketplace):
    """A compromised marketplace taking direct purchases, which answers the buyer's request to revoke one purchase's
    payment authorization with the CancelAuthorization of `named(agreement id)`'s authorization nonce (by default the
    purchase's own), and records the cancellations the buyer signs."""

    def __init__(self, named=None):
        super().__init__(refusals=0)
        self.nonces: dict[str, str] = {}  # agreement id -> the nonce of its payment authorization, as signed
        self.named = named or (lambda agreement_id: self.nonces[agreement_id])
        self.cancelled: list[tuple[str, str]] = []  # (agreement id, the nonce the buyer signed a cancellation of)
        self.signed: list[str] = []  # every purchase's authorization nonce, in order

    def __call__(self, request: httpx.Request) -> httpx.Response:
        path = request.url.path
        if path.endswith("/cancel-payment-authorization"):
            agreement_id = path.split("/")[2]
            typed = typed_data.cancel_authorization(
                chain_id=NETWORK.chain_id, token_address=NETWORK.token_address, authorizer=BUYER,
                nonce=self.named(agreement_id), token_name=DOMAIN.name, token_version=DOMAIN.version)
            if request.method == "GET":
                return httpx.Response(200, json={"agreement_id": agreement_id, "cancel_authorization": typed})
            signature = json.loads(request.content)["signature"]
            assert Account.recover_message(encode_typed_data(full_message=typed),
                                           signature=bytes.fromhex(signature.removeprefix("0x"))) == BUYER
            self.cancelled.append((agreement_id, typed["message"]["nonce"]))
            return httpx.Response(202, json={"status": "submitting"})
        answer = super().__call__(request)
        if request.method == "POST" and path == "/usage-agreements":
            header = json.loads(request.content)["payment_header"]
            self.signed.append(decode_payment_signature_header(header).payload["authorization"]["nonce"])
            self.nonces[answer.json()["id"]] = self.signed[-1]
        return answer


def buy_directly(buyer: MarketplaceClient, times: int = 2) -> list[str]:
    """`times` direct purchases of a service; their agreement ids."""
    service_id = str(uuid.uuid4())
    return [buyer.propose_direct_purchase(service_id, 10, wallet=KEY, max_unit_price_atomic=LISTED_PRICE,
                                          permit_nonce=nonce)["id"] for nonce in range(times)]


def direct_buyer(marketplace: DirectMarketplace) -> MarketplaceClient:
    return MarketplaceClient("https://marketplace.example", "mk_test", network=NETWORK,
                             transport=httpx.MockTransport(marketplace))


def test_a_purchases_payment_authorization_is_cancelled_under_the_nonce_the_buyer_signed():
    marketplace = CancellingMarketplace()
    with direct_buyer(marketplace) as buyer:
        rejected, _ = buy_directly(buyer)
        buyer.cancel_payment_authorization(rejected, KEY)
    assert marketplace.cancelled == [(rejected, marketplace.nonces[rejected])]


def test_a_cancellation_of_another_purchases_authorization_is_not_signed():
    """The marketplace named the nonce the buyer's CancelAuthorization revokes, and the SDK signed any: a compromised
    marketplace asked to revoke a rejected purchase's authorization had the buyer revoke the authorization of
    another purchase, still open (its payment then fails). Only the nonce this client signed for the purchase named is
    cancelled."""
    marketplace = CancellingMarketplace()
    marketplace.named = lambda agreement_id: next(
        nonce for other, nonce in marketplace.nonces.items() if other != agreement_id)
    with direct_buyer(marketplace) as buyer:
        rejected, _open = buy_directly(buyer)
        with pytest.raises(SigningRefused) as refusal:
            buyer.cancel_payment_authorization(rejected, KEY)
    assert refusal.value.field == "cancel_authorization.message.nonce"
    assert marketplace.cancelled == []


class OneAgreementMarketplace(CancellingMarketplace):
    """Answers every purchase with the first one's agreement id."""

    first_id = ""

    def __call__(self, request: httpx.Request) -> httpx.Response:
        answer = super().__call__(request)
        if request.method == "POST" and request.url.path == "/usage-agreements":
            self.first_id = self.first_id or answer.json()["id"]
            return httpx.Response(201, json={"id": self.first_id, "status": "proposed"})
        return answer


def test_a_purchase_answered_with_an_earlier_ones_agreement_is_refused_and_moves_no_cancellation():
    """A second purchase answered with the first's agreement id (a marketplace passing one purchase off as another)
    was returned as that agreement: `wait_until(id, statuses={"paid"})` then showed the first purchase's payment used
    through the buyer's RPC, and the buyer took the second as paid, its authorization (still valid, with the
    marketplace) never revoked. It is `AnswerMismatch` naming the id; the nonce remembered for that agreement stays
    the first purchase's, so its cancellation cannot be turned against the second's authorization."""
    marketplace = OneAgreementMarketplace()
    with direct_buyer(marketplace) as buyer:
        with pytest.raises(AnswerMismatch) as refusal:
            buy_directly(buyer)
        first = marketplace.first_id
        assert refusal.value.field == "agreement.id" and refusal.value.received == first
        first_nonce, second_nonce = marketplace.signed
        marketplace.named = lambda agreement_id: second_nonce
        with pytest.raises(SigningRefused):
            buyer.cancel_payment_authorization(first, KEY)
        marketplace.named = lambda agreement_id: first_nonce
        buyer.cancel_payment_authorization(first, KEY)
    assert marketplace.cancelled == [(first, first_nonce)]


def test_a_cancellation_for_a_purchase_this_client_did_not_sign_needs_the_buyers_nonce():
    """A client that did not sign the purchase (another process, a restart) cancels only the nonce the buyer names:
    the one it kept from `propose_direct_purchase(authorization_nonce=...)`, or read from its own payment header."""
    marketplace = CancellingMarketplace()
    with direct_buyer(marketplace) as buyer:
        rejected, other = buy_directly(buyer)
    with direct_buyer(marketplace) as elsewhere:
        with pytest.raises(TypeError, match="authorization_nonce"):
            elsewhere.cancel_payment_authorization(rejected, KEY)
        with pytest.raises(SigningRefused) as refusal:
            elsewhere.cancel_payment_authorization(rejected, KEY, authorization_nonce=marketplace.nonces[other])
        elsewhere.cancel_payment_authorization(rejected, KEY, authorization_nonce=marketplace.nonces[rejected])
    assert refusal.value.field == "cancel_authorization.message.nonce"
    assert marketplace.cancelled == [(rejected, marketplace.nonces[rejected])]


CANCELLED_NONCE = "0x" + "5c" * 32  # the authorization the buyer revokes
CANCEL_TX = "0x" + "c1" * 32  # the transaction the marketplace names as its cancellation
AUTHORIZATION_CANCELED = "0x" + keccak(text="AuthorizationCanceled(address,bytes32)").hex()


class CancelClaimingMarketplace:
    """A compromised marketplace relaying the buyer's cancellation of `CANCELLED_NONCE`, then naming `CANCEL_TX` as
    its mined cancellation (or, with `claims_use`, `USE_TX` as a use of the authorization that outran it), whatever
    the chain holds."""

    def __init__(self, *, claims_use: bool = False) -> None:
        self.relayed = False
        self.claims_use = claims_use

    def __call__(self, request: httpx.Request) -> httpx.Response:
        agreement_id = request.url.path.split("/")[2]
        if request.url.path.endswith("/cancel-payment-authorization"):
            if request.method == "GET":
                return httpx.Response(200, json={"cancel_authorization": typed_data.cancel_authorization(
                    chain_id=NETWORK.chain_id, token_address=NETWORK.token_address, authorizer=BUYER,
                    nonce=CANCELLED_NONCE, token_name=DOMAIN.name, token_version=DOMAIN.version)})
            self.relayed = True
            return httpx.Response(202, json={"status": "submitting", "transaction": {"id": "t1"}})
        if self.claims_use:
            return httpx.Response(200, json={"id": agreement_id, "status": "rejected",
                                             "payment_tx_hash": USE_TX if self.relayed else None,
                                             "payment_authorization_cancel_tx_hash": None})
        return httpx.Response(200, json={"id": agreement_id, "status": "rejected", "payment_tx_hash": None,
                                         "payment_authorization_cancel_tx_hash": CANCEL_TX if self.relayed else None})


def cancellation_log(*, address: str = NETWORK.token_address, nonce: str = CANCELLED_NONCE) -> dict[str, Any]:
    return {"address": address.lower(), "data": "0x",
            "topics": [AUTHORIZATION_CANCELED, "0x" + BUYER[2:].lower().rjust(64, "0"), nonce]}


def cancellation_node(receipt: dict[str, Any] | None, tx_hash: str = CANCEL_TX) -> type[BaseHTTPRequestHandler]:
    """A JSON-RPC node on the pinned chain whose token reads the pinned domain and whose receipt of `tx_hash` is
    `receipt` (None: no such transaction)."""

    class Node(JsonRpcNode):
        def do_POST(self) -> None:
            call = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            method, params = call["method"], call["params"]
            if method == "eth_chainId":
                result: Any = hex(NETWORK.chain_id)
            elif method == "eth_call":
                result = "0x" + encode(["bytes1", "string", "string", "uint256", "address", "bytes32", "uint256[]"],
                                       [b"\x0f", DOMAIN.name, DOMAIN.version, NETWORK.chain_id,
                                        NETWORK.token_address, b"\x00" * 32, []]).hex()
            elif method == "eth_getTransactionReceipt":
                result = receipt if params[0] == tx_hash else None
            else:
                raise AssertionError(call)
            self.answer_json(json.dumps({"jsonrpc": "2.0", "id": call["id"], "result": result}).encode())

    return Node


def cancel_through(receipt: dict[str, Any] | None) -> dict[str, Any]:
    with serving(cancellation_node(receipt)) as rpc_url, MarketplaceClient(
            "https://marketplace.example", "mk_test", network=NETWORK, rpc_url=rpc_url,
            transport=httpx.MockTransport(CancelClaimingMarketplace())) as buyer:
        return buyer.cancel_payment_authorization(str(uuid.uuid4()), KEY, authorization_nonce=CANCELLED_NONCE,
                                                  wait=True, timeout=1.0, poll_interval=0.05)


def mined(*logs: dict[str, Any], status: str = "0x1") -> dict[str, Any]:
    return {"transactionHash": CANCEL_TX, "blockNumber": "0x10", "status": status, "logs": list(logs)}


@pytest.mark.parametrize("receipt", [
    None,  # no such transaction
    mined(),  # a transaction that cancelled nothing
    mined(cancellation_log(nonce="0x" + "77" * 32)),  # another authorization's cancellation
    mined(cancellation_log(address=SELLER)),  # the same event from another contract than the token
    mined(cancellation_log(), status="0x0"),  # reverted
], ids=["unknown", "no log", "another nonce", "another contract", "reverted"])
def test_a_cancellation_the_buyers_rpc_does_not_show_is_not_taken_on_the_marketplaces_word(receipt):
    """`cancel_payment_authorization(wait=True)` returned as soon as the marketplace named a cancellation
    transaction, though the buyer's own RPC could show whether it cancelled anything: a compromised marketplace
    naming any hash kept the buyer's authorization valid (to settle later, within its validBefore) while the buyer
    took it as revoked. With rpc_url, the transaction must have emitted the token's AuthorizationCanceled of this
    authorizer and nonce, else the wait goes on to its timeout."""
    with pytest.raises(TimeoutError) as late:
        cancel_through(receipt)
    assert CANCEL_TX in str(late.value)


def test_a_cancellation_the_buyers_rpc_shows_is_returned():
    assert cancel_through(mined(cancellation_log()))["payment_authorization_cancel_tx_hash"] == CANCEL_TX


USE_TX = "0x" + "0e" * 32  # the transaction the marketplace names as a use of the authorization
AUTHORIZATION_USED = "0x" + keccak(text="AuthorizationUsed(address,bytes32)").hex()


def use_log(*, address: str = NETWORK.token_address, nonce: str = CANCELLED_NONCE) -> dict[str, Any]:
    return {"address": address.lower(), "data": "0x",
            "topics": [AUTHORIZATION_USED, "0x" + BUYER[2:].lower().rjust(64, "0"), nonce]}


def cancel_while_a_use_is_claimed(receipt: dict[str, Any] | None) -> dict[str, Any]:
    with serving(cancellation_node(receipt, USE_TX)) as rpc_url, MarketplaceClient(
            "https://marketplace.example", "mk_test", network=NETWORK, rpc_url=rpc_url,
            transport=httpx.MockTransport(CancelClaimingMarketplace(claims_use=True))) as buyer:
        return buyer.cancel_payment_authorization(str(uuid.uuid4()), KEY, authorization_nonce=CANCELLED_NONCE,
                                                  wait=True, timeout=1.0, poll_interval=0.05)


@pytest.mark.parametrize("receipt", [
    None,  # no such transaction
    mined(),  # a transaction that used nothing
    mined(use_log(nonce="0x" + "77" * 32)),  # another authorization's use
    mined(use_log(address=SELLER)),  # the same event from another contract than the token
    mined(use_log(), status="0x0"),  # reverted
    mined(cancellation_log()),  # a cancellation is no use
], ids=["unknown", "no log", "another nonce", "another contract", "reverted", "a cancellation"])
def test_a_use_of_the_authorization_the_buyers_rpc_does_not_show_is_not_taken_on_the_marketplaces_word(receipt):
    """`cancel_payment_authorization(wait=True)` raised `PaymentAuthorizationUsed` ("the money went to the seller;
    the cancellation ... never will run") as soon as the marketplace named any new `payment_tx_hash`, though the
    buyer's RPC was there to check it: a compromised marketplace had the buyer stop revoking an authorization that
    stayed valid (to be settled later, within its validBefore). With rpc_url, the transaction must have emitted the
    token's AuthorizationUsed of this authorizer and nonce, else the wait goes on to its timeout."""
    with pytest.raises(TimeoutError) as late:
        cancel_while_a_use_is_claimed(receipt)
    assert USE_TX in str(late.value)


def test_a_use_of_the_authorization_the_buyers_rpc_shows_is_raised():
    with pytest.raises(PaymentAuthorizationUsed) as used:
        cancel_while_a_use_is_claimed(mined(use_log()))
    assert used.value.used_by == USE_TX


def test_a_direct_purchase_signs_its_payment_under_the_nonce_the_buyer_chose():
    marketplace = CancellingMarketplace()
    nonce = "0x" + "5a" * 32
    with direct_buyer(marketplace) as buyer:
        agreement_id = buyer.propose_direct_purchase(str(uuid.uuid4()), 10, wallet=KEY,
                                                     max_unit_price_atomic=LISTED_PRICE, permit_nonce=0,
                                                     authorization_nonce=nonce)["id"]
    assert marketplace.nonces[agreement_id] == nonce


class AnswerLostMarketplace(CancellingMarketplace):
    """Takes the first direct purchase, then loses its answer (every attempt the client makes of that request): the
    buyer does not know whether it was taken, and asks again under the same idempotency key."""

    def __init__(self):
        super().__init__()
        self.bodies: list[dict[str, Any]] = []  # every purchase's body, as sent

    def __call__(self, request: httpx.Request) -> httpx.Response:
        answer = super().__call__(request)
        if request.method == "POST" and request.url.path == "/usage-agreements":
            self.bodies.append(json.loads(request.content))
            if len(self.bodies) == 1:
                raise httpx.ReadTimeout("the answer was lost", request=request)
        return answer


def test_a_direct_purchase_retried_under_its_idempotency_key_resends_the_payment_it_signed():
    """A buyer repeating `propose_direct_purchase` under the same idempotency key (its first answer lost) had a second
    payment authorization signed, under a new nonce, and handed to the marketplace: two authorizations of the payment,
    either one usable until its validBefore, and only the first revocable by `cancel_payment_authorization`. The repeat
    re-sends the very authorization (and fee permit) signed the first time; the same key for another purchase is
    refused before anything is signed."""
    marketplace = AnswerLostMarketplace()
    service_id = str(uuid.uuid4())
    with MarketplaceClient("https://marketplace.example", "mk_test", network=NETWORK, retries=0,
                           transport=httpx.MockTransport(marketplace)) as buyer:
        def purchase(**options: Any) -> dict[str, Any]:
            return buyer.propose_direct_purchase(service_id, 10, wallet=KEY, max_unit_price_atomic=LISTED_PRICE,
                                                 permit_nonce=0, idempotency_key="purchase-1", **options)

        with pytest.raises(httpx.ReadTimeout):
            purchase()
        agreement_id = purchase()["id"]
        first, again = marketplace.bodies
        assert again["payment_header"] == first["payment_header"]
        assert again == first
        with pytest.raises(ValueError, match="idempotency_key"):
            buyer.propose_direct_purchase(service_id, 20, wallet=KEY, max_unit_price_atomic=LISTED_PRICE,
                                          permit_nonce=0, idempotency_key="purchase-1")
        with pytest.raises(ValueError, match="idempotency_key"):
            purchase(authorization_nonce="0x" + "5a" * 32)
        buyer.cancel_payment_authorization(agreement_id, KEY)
    assert len(marketplace.bodies) == 2
    assert marketplace.cancelled == [(agreement_id, marketplace.signed[0])]


class ConcurrentMarketplace(CancellingMarketplace):
    """Answers the service to no purchase before `callers` purchases have asked for it: they all read it, and sign,
    at once."""

    def __init__(self, callers: int):
        super().__init__()
        self.all_asked = threading.Barrier(callers, timeout=5)

    def __call__(self, request: httpx.Request) -> httpx.Response:
        if request.url.path.startswith("/agents/services/"):
            self.all_asked.wait()
        return super().__call__(request)


def test_a_direct_purchase_repeated_while_it_runs_sends_one_payment_authorization():
    """A caller repeating a purchase under its idempotency key while the first call still ran (its own timeout, in
    another thread) had both sign a payment authorization, each under a new nonce: the key was looked up before
    signing, and the second signed purchase replaced the first under it. The marketplace, answering both with one
    agreement, held two authorizations of the payment, and `cancel_payment_authorization` revoked one. The purchase
    signed first under the key is the one every call under it sends."""
    marketplace = ConcurrentMarketplace(callers=2)
    service_id = str(uuid.uuid4())
    with direct_buyer(marketplace) as buyer, ThreadPoolExecutor(2) as pool, warnings.catch_warnings():
        warnings.simplefilter("ignore", SellerUnverified)
        calls = [pool.submit(buyer.propose_direct_purchase, service_id, 10, wallet=KEY,
                             max_unit_price_atomic=LISTED_PRICE, permit_nonce=0, idempotency_key="purchase-1")
                 for _ in range(2)]
        for call in calls:
            call.result(timeout=10)
    assert len(marketplace.signed) == 2  # both sent
    assert len(set(marketplace.signed)) == 1, "two payment authorizations of one purchase left the process"


def test_a_nonce_with_a_trailing_newline_is_refused_before_signing():
    """A server's nonce "0x<64 hex>\\n" passed the SDK's bytes32 check (`$` matches before a newline): the terms went
    on to the signer, which failed deep in eth_abi, not saying which field was wrong."""
    with pytest.raises(ValueError, match="nonce: expected a 0x-prefixed 32-byte hex string"):
        typed_data.cancel_authorization(chain_id=1, token_address="0x" + "11" * 20, authorizer="0x" + "22" * 20,
                                        nonce="0x" + "ab" * 32 + "\n")


FORGED_LINE = "\n2026-12-07 23:00:00 INFO agent: cancellation confirmed, authorization revoked"


@pytest.mark.parametrize("outcome", ["used", "failed"])
def test_a_cancellations_outcome_the_marketplace_names_is_one_bounded_line(outcome):
    """`PaymentAuthorizationUsed` and `PaymentAuthorizationCancelFailed` named the transaction or the failure reason
    as the marketplace wrote it (without an RPC, its word): newlines and a hundred kilobytes forged lines in the
    agent's log ("cancellation confirmed") and filled it. Each is one line of at most 500 characters."""
    named = "0x" + "0e" * 32 + FORGED_LINE * 2_000

    def marketplace(request: httpx.Request) -> httpx.Response:
        agreement_id = request.url.path.split("/")[2]
        if request.url.path.endswith("/cancel-payment-authorization"):
            if request.method == "GET":
                return httpx.Response(200, json={"cancel_authorization": typed_data.cancel_authorization(
                    chain_id=NETWORK.chain_id, token_address=NETWORK.token_address, authorizer=BUYER,
                    nonce=CANCELLED_NONCE, token_name=DOMAIN.name, token_version=DOMAIN.version)})
            marketplace.relayed = True
            return httpx.Response(202, json={"status": "submitting", "transaction": {"id": "t1"}})
        if request.url.path.endswith("/escrow-status"):
            return httpx.Response(200, json={"transactions": [
                {"id": "t1", "status": "failed", "failure_reason": named}]})
        return httpx.Response(200, json={"id": agreement_id, "status": "rejected",
                                         "payment_tx_hash": named if outcome == "used" and marketplace.relayed
                                         else None, "payment_authorization_cancel_tx_hash": None})

    marketplace.relayed = False
    raised = PaymentAuthorizationUsed if outcome == "used" else PaymentAuthorizationCancelFailed
    with MarketplaceClient("https://marketplace.example", "mk_test", network=NETWORK,
                           transport=httpx.MockTransport(marketplace)) as buyer, pytest.raises(raised) as told:
        buyer.cancel_payment_authorization(str(uuid.uuid4()), KEY, authorization_nonce=CANCELLED_NONCE, wait=True,
                                           timeout=2.0, poll_interval=0.05)
    assert "0x" + "0e" * 32 in str(told.value)
    assert str(told.value).isprintable() and len(str(told.value)) <= 1_100


def test_a_refusal_to_sign_shows_the_marketplaces_value_bounded():
    """`SigningRefused` showed the value the marketplace answered whole (its repr): a service id of a hundred
    kilobytes went whole into the refusal's text, and the agent's log. The text shows at most 200 characters of it;
    `received` keeps it."""
    marketplace = ReshapingMarketplace("service", lambda service: {**service, "id": "x" * 100_000})
    with direct_buyer(marketplace) as buyer, pytest.raises(SigningRefused) as refused:
        buyer.propose_direct_purchase(str(uuid.uuid4()), 10, wallet=KEY, max_unit_price_atomic=LISTED_PRICE,
                                      permit_nonce=0)
    assert refused.value.field == "service.id" and refused.value.received == "x" * 100_000
    assert len(str(refused.value)) <= 1_000 and "100000 characters" in str(refused.value)
