"""What the SDK refuses to sign for a compromised marketplace, without a chain: the marketplace is an httpx
`MockTransport` (or a header it wrote). The live-server attacks are in test_wallet_safety."""

from __future__ import annotations

import json
import time
import uuid
from typing import Any

import httpx
import pytest
from eth_account import Account
from x402 import PaymentRequired, PaymentRequirements
from x402.http import decode_payment_signature_header, encode_payment_required_header

from sdk import MarketplaceClient, SigningRefused, TokenDomain, proxy_signature
from sdk.networks import BASE_SEPOLIA, NetworkConfig
from sdk.safety import DeadlineOutOfRange, require_equal
from sdk.x402_signing import sign_payment_required

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


def test_a_402_asking_for_a_permit2_transfer_instead_of_the_tokens_authorization_is_not_signed():
    """x402's client signs whatever `extra.assetTransferMethod` names: "permit2" had the wallet sign a Permit2
    `PermitWitnessTransferFrom` (Permit2's domain, not the pinned token's, spendable through x402's proxy wherever
    the wallet approved Permit2) instead of the EIP-3009 authorization the SDK checks."""
    header = payment_required(extra={"name": "USDC", "version": "2", "resource": "/agents/s/t",
                                     "assetTransferMethod": "permit2"})
    with pytest.raises(SigningRefused) as refusal:
        sign_payment_required(header, KEY, max_amount_atomic=10**6, network=NETWORK, token_domain=DOMAIN)
    assert refusal.value.field == "accepts[0].extra.assetTransferMethod"


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
        return buyer.propose_agreement(str(uuid.uuid4()), 10, **terms)


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
            buyer.purchase_masumi_job(service_id, {"text": "hi"}, KEY, max_price_atomic=1_000_000)
    assert refusal.value.field == "agreement.price_per_unit_atomic"


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
