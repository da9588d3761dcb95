"""`sdk.sign_wallet_proof`: the wallet's EIP-712 proof that it is an agent's (POST /agents, `wallet_proof`)."""

import time

import pytest
from eth_account import Account
from eth_account.messages import encode_typed_data

from sdk import DeadlineOutOfRange, LocalWallet, SigningRefused, sign_wallet_proof
from sdk.typed_data import WALLET_PROOF_DOMAIN_NAME, recover_typed_data_signer, wallet_proof

KEY = "0x59c6995e998f97a5a0044966f0945389dc9e86dae88c7a8412f4603b6b78690d"  # Anvil #1 (public)
ADDRESS = "0x70997970C51812dc3A010C7d01b50e0d17dc79C8"
# Half a day ahead, taken when the module is collected: a whole suite later it is still ahead (the SDK refuses to sign
# a past one), and within the day the SDK signs.
EXPIRES_AT = int(time.time()) + 12 * 3600
ESCROW = "0x5FbDB2315678afecb367f032d93F642f64180aa3"  # the deployment's escrow contract (Anvil's first deployment)


def test_the_proof_is_the_wallets_signature_of_handle_wallet_owner_chain_and_expiry():
    proof = sign_wallet_proof(KEY, chain_id=8453, escrow_address=ESCROW, handle="my-seller", owner_id=42,
                              expires_at=EXPIRES_AT)

    typed = wallet_proof(chain_id=8453, escrow_address=ESCROW, handle="my-seller", wallet=ADDRESS, owner_id=42,
                         expires_at=EXPIRES_AT)
    assert proof["expires_at"] == EXPIRES_AT
    assert recover_typed_data_signer(typed, proof["signature"]) == ADDRESS
    assert typed["domain"] == {"name": WALLET_PROOF_DOMAIN_NAME, "version": "2", "chainId": 8453,
                               "verifyingContract": ESCROW}
    # eth-account's own encoding of the same message and signature: what wallets' eth_signTypedData_v4 sign.
    assert Account.recover_message(encode_typed_data(full_message=typed), signature=proof["signature"]) == ADDRESS
    assert sign_wallet_proof(LocalWallet(KEY), chain_id=8453, escrow_address=ESCROW, handle="my-seller",
                             owner_id=42, expires_at=EXPIRES_AT) == proof


@pytest.mark.parametrize("other", [{"handle": "other"}, {"owner_id": 43}, {"chain_id": 84532},
                                   {"expires_at": EXPIRES_AT + 1}, {"domain_name": "Another marketplace"},
                                   {"escrow_address": "0x" + "b2" * 20}])
def test_a_proof_proves_nothing_for_another_agent_owner_chain_expiry_or_marketplace(other):
    signed = {"chain_id": 8453, "escrow_address": ESCROW, "handle": "my-seller", "owner_id": 42,
              "expires_at": EXPIRES_AT}
    proof = sign_wallet_proof(KEY, **signed)

    typed = wallet_proof(wallet=ADDRESS, **{**signed, **other})
    assert recover_typed_data_signer(typed, proof["signature"]) != ADDRESS


@pytest.mark.parametrize("bad", [{"owner_id": -1}, {"owner_id": "42"}, {"expires_at": 2**256}])
def test_out_of_range_fields_are_refused_before_signing(bad):
    with pytest.raises(ValueError):
        sign_wallet_proof(KEY, **{"chain_id": 8453, "escrow_address": ESCROW, "handle": "h", "owner_id": 42,
                                  "expires_at": EXPIRES_AT, **bad})


@pytest.mark.parametrize("expires_in", [86_400 + 60, 10 * 365 * 86_400, 2**200, 0, -60])
def test_a_proof_valid_for_more_than_a_day_or_already_expired_is_not_signed(expires_in):
    """The proof's expiry is what the marketplace's 400 `wallet_proof_required` names (`message.expiresAt`, which the
    README's walk passes on as it is): a compromised marketplace naming one years away had the wallet sign a proof that
    it is the agent's valid until then, for a deployment on any day to accept (the honest one takes a day at most).
    Beyond a day from now, or not in the future, it is refused before the wallet is asked."""
    with pytest.raises(DeadlineOutOfRange) as refusal:
        sign_wallet_proof(KEY, chain_id=8453, escrow_address=ESCROW, handle="my-seller", owner_id=42,
                          expires_at=int(time.time()) + expires_in)
    assert refusal.value.field == "wallet_proof.expires_at"


def test_a_proof_valid_for_a_day_is_signed():
    expires_at = int(time.time()) + 86_400 - 5
    assert sign_wallet_proof(KEY, chain_id=8453, escrow_address=ESCROW, handle="my-seller", owner_id=42,
                             expires_at=expires_at)["expires_at"] == expires_at


SIGNED = {"chain_id": 8453, "escrow_address": ESCROW, "handle": "my-seller", "owner_id": 42}


@pytest.mark.parametrize(("offered_for", "field"), [
    ({"escrow_address": "0x" + "b2" * 20}, "wallet_proof.domain.verifyingContract"),
    ({"chain_id": 84532}, "wallet_proof.domain.chainId"),
    ({"domain_name": "Another marketplace"}, "wallet_proof.domain.name"),
    ({"handle": "other-seller"}, "wallet_proof.message.handle"),
    ({"owner_id": 43}, "wallet_proof.message.ownerId"),
])
def test_the_marketplaces_message_for_another_deployment_or_agent_is_not_signed(offered_for, field):
    """Given the marketplace's 400 `wallet_proof_required` typed data (`offered=`), the SDK holds it to the message it
    builds from the pinned deployment (chain, escrow contract) and what the owner states: a compromised or mistaken
    marketplace handing another deployment's message (its escrow: a proof it could show there) is refused."""
    offered = wallet_proof(wallet=ADDRESS, expires_at=EXPIRES_AT, **{**SIGNED, **offered_for})
    with pytest.raises(SigningRefused) as refusal:
        sign_wallet_proof(KEY, expires_at=EXPIRES_AT, offered=offered, **SIGNED)
    assert refusal.value.field == field


def test_the_marketplaces_message_for_the_pinned_deployment_is_signed():
    offered = wallet_proof(wallet=ADDRESS, expires_at=EXPIRES_AT, **SIGNED)
    offered["domain"]["verifyingContract"] = ESCROW.lower()  # JSON may carry an address in any case
    proof = sign_wallet_proof(KEY, expires_at=EXPIRES_AT, offered=offered, **SIGNED)
    assert proof == sign_wallet_proof(KEY, expires_at=EXPIRES_AT, **SIGNED)


@pytest.mark.parametrize("offered", ["sign me", [], {"domain": {}}, 42])
def test_a_marketplace_message_that_is_no_wallet_proof_is_refused_not_raised_on(offered):
    with pytest.raises(SigningRefused) as refusal:
        sign_wallet_proof(KEY, expires_at=EXPIRES_AT, offered=offered, **SIGNED)
    assert refusal.value.field.startswith("wallet_proof")
