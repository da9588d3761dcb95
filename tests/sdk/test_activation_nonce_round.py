"""The SDK signs an activation package naming the round of its intent nonce (handed out once the buyer cancelled the
first on-chain), and only one whose intent carries that round's nonce."""

import time
import uuid
from datetime import UTC, datetime

import pytest
from eth_account import Account

from sdk import AgreedTerms, SigningRefused
from sdk.activation import activation_intent_nonce, expected_activation, sign_activation_package
from tests.sdk.test_signing_bounds import DOMAIN, GAS_WALLET, KEY, NETWORK

AGREEMENT_ID = str(uuid.uuid4())
ONCHAIN_ID = "0x" + uuid.UUID(AGREEMENT_ID).hex.rjust(64, "0")  # its own escrow id (sdk.terms.check_onchain_id)
SELLER = Account.create().address
EXPIRES_AT = datetime.fromtimestamp(time.time() + 86_400, UTC).isoformat()


def terms() -> AgreedTerms:
    deposit = 1_000_000
    return AgreedTerms.from_agreement({
        "id": AGREEMENT_ID, "onchain_id": ONCHAIN_ID, "service": {"id": "s1"}, "quantity": 1, "price_per_unit_atomic": deposit,
        "deposit_amount_atomic": deposit, "infra_fee_atomic": NETWORK.fee_schedule.fee_for(deposit),
        "chain_id": NETWORK.chain_id, "token_address": NETWORK.token_address, "settlement_model": "escrow",
        "pricing_type": "per_call", "unit_name": "call", "token": "USDC",
        "buyer_wallet_address": Account.from_key(KEY).address, "seller_wallet_address": SELLER,
        "fee_recipient": GAS_WALLET, "expires_at": EXPIRES_AT,
        "challenge_window_seconds": 3600}, NETWORK)


def package(*, signed_round: int, stated_round) -> dict:
    deadline = int(time.time()) + 600
    built = expected_activation(terms=terms(), network=NETWORK, token_domain=DOMAIN, deadline=deadline,
                                permit_nonce=0, intent_nonce_round=signed_round)
    return {"agreement_id": AGREEMENT_ID, "onchain_id": ONCHAIN_ID, "deadline": deadline, "intent_nonce_round": stated_round,
            **built}


def sign(body: dict) -> dict:
    return sign_activation_package(body, KEY, terms=terms(), network=NETWORK, token_domain=DOMAIN, permit_nonce=0)


def test_the_rounds_nonces_differ_and_round_zero_is_the_first():
    assert activation_intent_nonce(ONCHAIN_ID, 0) == activation_intent_nonce(ONCHAIN_ID)
    assert len({activation_intent_nonce(ONCHAIN_ID, n) for n in range(3)}) == 3


def test_a_package_of_a_later_round_is_signed():
    body = package(signed_round=2, stated_round=2)
    assert body["intent"]["message"]["nonce"] == activation_intent_nonce(ONCHAIN_ID, 2)
    assert sign(body)["intent_signature"]


@pytest.mark.parametrize(("signed_round", "stated_round", "field"), [
    (2, 1, "intent"), (1, 0, "intent"), (0, True, "intent_nonce_round"), (0, -1, "intent_nonce_round"),
    (0, "1", "intent_nonce_round"), (0, 2**32, "intent_nonce_round")])
def test_a_package_whose_intent_is_not_of_its_stated_round_is_refused(signed_round, stated_round, field):
    with pytest.raises(SigningRefused) as refused:
        sign(package(signed_round=signed_round, stated_round=stated_round))
    assert refused.value.field.startswith(field)
