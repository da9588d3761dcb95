"""Sign an activation package (GET /usage-agreements/{id}/activation-package) with the buyer's wallet.

The SDK builds the ActivationIntent and the one EIP-2612 permit itself, from the agreed terms and the pinned
network configuration, and compares the server's package with them: any difference raises `SigningRefused`
naming the field, before anything is signed. The permit covers the deposit and the fee together (the
contract's combined path), so a front-runner who submits it only grants the allowance activation uses.

The result is the body of POST /usage-agreements/{id}/activate-escrow. Nothing here talks to the network.
"""

from __future__ import annotations

import uuid
from collections.abc import Mapping
from typing import Any

from eth_utils import keccak

from sdk import typed_data
from sdk.networks import NetworkConfig, TokenDomain
from sdk.safety import (DEADLINE_MAX_SECONDS, SigningRefused, Wallet, as_wallet, check_deadline, check_same,
                        check_typed_data, require_equal, typed_message, warn_seller_unverified)
from sdk.terms import AgreedTerms

__all__ = ["activation_intent_nonce", "check_seller", "expected_activation", "sign_activation_package"]

# The package's own fields; anything else is refused (it could be a second object someone hopes gets signed).
_PACKAGE_FIELDS = frozenset({"agreement_id", "onchain_id", "chain_id", "escrow_contract", "token_address",
                             "deposit_amount_atomic", "infra_fee_atomic", "deadline", "intent", "escrow_permit",
                             "intent_nonce_round"})


def activation_intent_nonce(agreement_id: str, round: int = 0) -> int:
    """The intent nonce of an agreement: `keccak256("activation" ‖ agreementId)` (unordered nonces, one per
    agreement, reused when an activation is signed again after a failure); after the buyer cancelled it on-chain
    (`cancelIntentNonce`), the package's `intent_nonce_round` n > 0 names `keccak256("activation" ‖ agreementId ‖
    uint256 n)`. Any of them names this agreement alone, and the contract funds one escrow per (buyer, agreement)."""
    seed = b"activation" + bytes.fromhex(agreement_id.removeprefix("0x"))
    if round:
        seed += round.to_bytes(32, "big")
    return int.from_bytes(keccak(seed), "big")


def expected_activation(*, terms: AgreedTerms, network: NetworkConfig, token_domain: TokenDomain, deadline: int,
                        permit_nonce: int, intent_nonce_round: int = 0) -> dict[str, Any]:
    """The intent and the combined permit, as the buyer agreed to them (the intent's nonce of `intent_nonce_round`)."""
    intent = typed_data.activation_intent(
        chain_id=network.chain_id, escrow_address=network.escrow_address, agreement_id=terms.agreement_id,
        buyer=terms.buyer, seller=terms.seller, token=network.token_address, quantity=terms.quantity,
        price_per_unit=terms.price_per_unit, deposit_amount=terms.deposit_amount, infra_fee=terms.infra_fee,
        receipt_signer=network.receipt_signer, challenge_window=terms.challenge_window,
        expires_at=terms.expires_at, terms_hash=terms.terms_hash,
        nonce=activation_intent_nonce(terms.agreement_id, intent_nonce_round), deadline=deadline)
    permit = typed_data.erc2612_permit(
        chain_id=network.chain_id, token_address=network.token_address, owner=terms.buyer,
        spender=network.escrow_address, value=terms.total, nonce=permit_nonce, deadline=deadline,
        token_name=token_domain.name, token_version=token_domain.version)
    return {"intent": intent, "escrow_permit": permit}


def check_seller(terms: AgreedTerms, expected_seller_wallet_address: str | None) -> None:
    """The agreement's seller wallet (the intent's `seller`, whom the escrow pays) must be the one the buyer expects,
    when it says which. Else it is the marketplace's word, and a compromised one could name its own wallet
    (`sign_activation_package` warns `SellerUnverified` then, once every check has passed)."""
    if expected_seller_wallet_address is not None:
        require_equal(terms.seller, expected_seller_wallet_address, "agreement.seller_wallet_address",
                      "the deposit would be paid to another wallet than the seller's the buyer expects")


def _check_statements(package: Mapping[str, Any], terms: AgreedTerms, network: NetworkConfig) -> None:
    """What the package states beside the typed data (the agreement, escrow contract, chain, token and amounts it is
    for) must be the buyer's: one stating another is the marketplace asking for something else."""
    own = {"onchain_id": terms.agreement_id, "chain_id": network.chain_id, "escrow_contract": network.escrow_address,
           "token_address": network.token_address, "deposit_amount_atomic": terms.deposit_amount,
           "infra_fee_atomic": terms.infra_fee}
    for name, value in own.items():
        if name in package:
            require_equal(package[name], value, name, "not the agreement's own, nor the pinned network's")
    if "agreement_id" in package:
        try:
            stated = "0x" + uuid.UUID(str(package["agreement_id"])).hex.rjust(64, "0")
        except ValueError:
            stated = None
        if stated != terms.agreement_id:
            raise SigningRefused("agreement_id", "the agreement's own", package["agreement_id"],
                                 f"its escrow id is not {terms.agreement_id}")


def sign_activation_package(package: Mapping[str, Any], wallet: str | bytes | Wallet, *, terms: AgreedTerms,
                            network: NetworkConfig, token_domain: TokenDomain, now: int | None = None,
                            max_deadline_seconds: int = DEADLINE_MAX_SECONDS,
                            expected_seller_wallet_address: str | None = None,
                            permit_nonce: int) -> dict[str, Any]:
    """Check the package against the agreed terms and sign the SDK's own intent and permit.

    `now` is the chain's time when known (else this machine's clock); the package's deadline must lie in
    [now + 60 s, now + `max_deadline_seconds`]. `permit_nonce` is the token's `nonces(buyer)` as the buyer reads it
    (required: the package's is the marketplace's word), which the package's must be: a nonce ahead of the
    token's is not invalid, it makes the permit usable later, once the nonces below it are used. Not so
    `intent_nonce_round`: any round's nonce names this agreement alone,
    and the contract funds at most one escrow per (buyer, agreement). With `expected_seller_wallet_address`, the
    agreement's seller wallet (the payee) must be that one (`check_seller`); without it, `SellerUnverified` is
    warned before signing. What the package states beside the
    typed data (agreement, escrow contract, chain, token, deposit, fee) must be the terms' and the pinned network's.
    Raises `SigningRefused` (with `.field`) on any difference."""
    wallet = as_wallet(wallet)
    if wallet.address.lower() != terms.buyer.lower():
        raise SigningRefused("intent.message.buyer", wallet.address, terms.buyer, "not this wallet's agreement")
    check_seller(terms, expected_seller_wallet_address)
    if not isinstance(package, Mapping):  # the server's JSON: a list, text or null is no package
        raise SigningRefused("package", "an object", package)
    for name in package:
        if name not in _PACKAGE_FIELDS:
            raise SigningRefused(name, None, package[name], "unknown field")
    _check_statements(package, terms, network)
    intent_message = typed_message(package.get("intent"), "intent")
    permit_message = typed_message(package.get("escrow_permit"), "escrow_permit")
    deadline = check_deadline(intent_message.get("deadline"), "intent.message.deadline", now=now,
                              max_seconds=max_deadline_seconds)
    check_same(package.get("deadline"), deadline, "deadline")
    nonce = permit_message.get("nonce")
    if isinstance(nonce, bool) or not isinstance(nonce, int) or not 0 <= nonce < 2**256:
        raise SigningRefused("escrow_permit.message.nonce", "the token's nonces(buyer)", nonce)
    require_equal(nonce, permit_nonce, "escrow_permit.message.nonce",
                  "the token's nonces(buyer) as the buyer reads it: a permit for a later nonce is usable later, "
                  "until its deadline")
    intent_nonce_round = package.get("intent_nonce_round", 0)
    if isinstance(intent_nonce_round, bool) or not isinstance(intent_nonce_round, int) or not (
            0 <= intent_nonce_round < 2**32):
        raise SigningRefused("intent_nonce_round", "a round of the agreement's intent nonce", intent_nonce_round)
    expected = expected_activation(terms=terms, network=network, token_domain=token_domain, deadline=deadline,
                                   permit_nonce=nonce, intent_nonce_round=intent_nonce_round)
    for name, typed in expected.items():
        check_typed_data(package[name], typed, name)
    if expected_seller_wallet_address is None:  # last: a refusal above says more than the warning
        warn_seller_unverified("agreement.seller_wallet_address", terms.seller)
    permit = expected["escrow_permit"]["message"]
    return {
        "intent_signature": wallet.sign_typed_data(expected["intent"]),
        "deadline": deadline,
        "escrow_permit": {"value": permit["value"], "nonce": permit["nonce"], "deadline": permit["deadline"],
                          "signature": wallet.sign_typed_data(expected["escrow_permit"])},
    }
