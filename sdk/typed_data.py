"""EIP-712 typed data for the escrow contract and for USDC (EIP-2612 permit, EIP-3009 authorizations).

Pure functions, no Django. Every builder returns the *full message* dict that
``eth_account.messages.encode_typed_data(full_message=...)`` and wallets' ``eth_signTypedData_v4`` accept:

    {"types": {"EIP712Domain": [...], <PrimaryType>: [...]}, "primaryType": ..., "domain": {...},
     "message": {...}}

Conventions: addresses are returned checksummed; ``bytes32`` values are ``0x``-prefixed 64-hex-digit strings;
integers are Python ints (range-checked for their Solidity type). Arguments are keyword-only.

Domains:
- UsageEscrow: ``{name: "UsageEscrow", version: "1", chainId, verifyingContract: <escrow>}``
- A token: ``{name, version, chainId, verifyingContract: <token>}``. The defaults are Base mainnet USDC's
  (``"USD Coin"``, ``"2"``, also MockUSDC's); the SDK's signing paths always pass the domain read from the token
  or pinned in ``sdk.networks`` (Base Sepolia's USDC is named ``"USDC"``).
- WalletProof: ``{name: <the marketplace's>, version: "2", chainId, verifyingContract: <its escrow>}``.

Example::

    typed = activation_intent(chain_id=31337, escrow_address=escrow, agreement_id="0x" + "11" * 32, ...)
    signature = sign_typed_data(buyer_key, typed)
    assert recover_typed_data_signer(typed, signature) == buyer_address
"""

from __future__ import annotations

import re
from typing import Any

from eth_account import Account
from eth_account.messages import encode_typed_data
from eth_utils import keccak, to_checksum_address

__all__ = [
    "ESCROW_DOMAIN_NAME",
    "ESCROW_DOMAIN_VERSION",
    "USDC_DOMAIN_NAME",
    "USDC_DOMAIN_VERSION",
    "ACTIVATION_INTENT_TYPE",
    "USAGE_RECEIPT_TYPE",
    "CHALLENGE_TYPE",
    "PERMIT_TYPE",
    "TRANSFER_WITH_AUTHORIZATION_TYPE",
    "RECEIVE_WITH_AUTHORIZATION_TYPE",
    "CANCEL_AUTHORIZATION_TYPE",
    "WALLET_PROOF_DOMAIN_NAME",
    "WALLET_PROOF_TYPE",
    "escrow_domain",
    "token_domain",
    "activation_intent",
    "usage_receipt",
    "challenge",
    "erc2612_permit",
    "transfer_with_authorization",
    "receive_with_authorization",
    "cancel_authorization",
    "wallet_proof",
    "typed_data_digest",
    "sign_typed_data",
    "recover_typed_data_signer",
    "split_signature",
    "message_tuple",
    "onchain_permit",
    "EMPTY_PERMIT",
]

ESCROW_DOMAIN_NAME = "UsageEscrow"
ESCROW_DOMAIN_VERSION = "1"
USDC_DOMAIN_NAME = "USD Coin"
USDC_DOMAIN_VERSION = "2"
WALLET_PROOF_DOMAIN_NAME = "Agent escrow marketplace"
WALLET_PROOF_DOMAIN_VERSION = "2"

_DOMAIN_TYPE = [
    {"name": "name", "type": "string"},
    {"name": "version", "type": "string"},
    {"name": "chainId", "type": "uint256"},
    {"name": "verifyingContract", "type": "address"},
]

ACTIVATION_INTENT_TYPE = [
    {"name": "agreementId", "type": "bytes32"},
    {"name": "buyer", "type": "address"},
    {"name": "seller", "type": "address"},
    {"name": "token", "type": "address"},
    {"name": "quantity", "type": "uint256"},
    {"name": "pricePerUnit", "type": "uint256"},
    {"name": "depositAmount", "type": "uint256"},
    {"name": "infraFee", "type": "uint256"},
    {"name": "receiptSigner", "type": "address"},
    {"name": "challengeWindow", "type": "uint64"},
    {"name": "expiresAt", "type": "uint64"},
    {"name": "termsHash", "type": "bytes32"},
    {"name": "nonce", "type": "uint256"},
    {"name": "deadline", "type": "uint256"},
]

USAGE_RECEIPT_TYPE = [
    {"name": "agreementId", "type": "bytes32"},
    {"name": "seq", "type": "uint256"},
    {"name": "cumulativeAmount", "type": "uint256"},
    {"name": "usageDigest", "type": "bytes32"},
]

# A wallet's proof that it is an agent's: what the marketplace asks before it names an agent by that wallet.
WALLET_PROOF_TYPE = [
    {"name": "handle", "type": "string"},
    {"name": "wallet", "type": "address"},
    {"name": "ownerId", "type": "uint256"},
    {"name": "expiresAt", "type": "uint256"},
]

CHALLENGE_TYPE = [
    {"name": "agreementId", "type": "bytes32"},
    {"name": "deadline", "type": "uint256"},
]

PERMIT_TYPE = [
    {"name": "owner", "type": "address"},
    {"name": "spender", "type": "address"},
    {"name": "value", "type": "uint256"},
    {"name": "nonce", "type": "uint256"},
    {"name": "deadline", "type": "uint256"},
]

_AUTHORIZATION_FIELDS = [
    {"name": "from", "type": "address"},
    {"name": "to", "type": "address"},
    {"name": "value", "type": "uint256"},
    {"name": "validAfter", "type": "uint256"},
    {"name": "validBefore", "type": "uint256"},
    {"name": "nonce", "type": "bytes32"},
]
TRANSFER_WITH_AUTHORIZATION_TYPE = _AUTHORIZATION_FIELDS
RECEIVE_WITH_AUTHORIZATION_TYPE = _AUTHORIZATION_FIELDS

CANCEL_AUTHORIZATION_TYPE = [
    {"name": "authorizer", "type": "address"},
    {"name": "nonce", "type": "bytes32"},
]

_BYTES32 = re.compile(r"0x[0-9a-fA-F]{64}")


# ------------------------------------------------------------------ validation helpers


def _address(value: str, field: str) -> str:
    try:
        return to_checksum_address(value)
    except (ValueError, TypeError) as exc:
        raise ValueError(f"{field}: not an address: {value!r}") from exc


def _bytes32(value: str | bytes, field: str) -> str:
    if isinstance(value, (bytes, bytearray)):
        if len(value) != 32:
            raise ValueError(f"{field}: expected 32 bytes, got {len(value)}")
        return "0x" + bytes(value).hex()
    if not isinstance(value, str) or not _BYTES32.fullmatch(value):
        raise ValueError(f"{field}: expected a 0x-prefixed 32-byte hex string, got {value!r}")
    return value.lower()


def _uint(value: int, field: str, bits: int = 256) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{field}: expected an int, got {type(value).__name__}")
    if not 0 <= value < 2**bits:
        raise ValueError(f"{field}: {value} out of range for uint{bits}")
    return value


def _full(primary: str, fields: list[dict[str, str]], domain: dict[str, Any],
          message: dict[str, Any]) -> dict[str, Any]:
    return {
        "types": {"EIP712Domain": [dict(f) for f in _DOMAIN_TYPE], primary: [dict(f) for f in fields]},
        "primaryType": primary,
        "domain": domain,
        "message": message,
    }


# ------------------------------------------------------------------ domains


def escrow_domain(*, chain_id: int, escrow_address: str) -> dict[str, Any]:
    """The UsageEscrow contract's EIP-712 domain."""
    return {
        "name": ESCROW_DOMAIN_NAME,
        "version": ESCROW_DOMAIN_VERSION,
        "chainId": _uint(chain_id, "chain_id"),
        "verifyingContract": _address(escrow_address, "escrow_address"),
    }


def token_domain(
    *, chain_id: int, token_address: str, name: str = USDC_DOMAIN_NAME, version: str = USDC_DOMAIN_VERSION
) -> dict[str, Any]:
    """A token's EIP-712 domain; USDC's ``{"USD Coin", "2"}`` by default."""
    return {
        "name": name,
        "version": version,
        "chainId": _uint(chain_id, "chain_id"),
        "verifyingContract": _address(token_address, "token_address"),
    }


# ------------------------------------------------------------------ UsageEscrow messages


def activation_intent(
    *,
    chain_id: int,
    escrow_address: str,
    agreement_id: str,
    buyer: str,
    seller: str,
    token: str,
    quantity: int,
    price_per_unit: int,
    deposit_amount: int,
    infra_fee: int,
    receipt_signer: str,
    challenge_window: int,
    expires_at: int,
    terms_hash: str,
    nonce: int,
    deadline: int,
) -> dict[str, Any]:
    """``ActivationIntent`` signed by the buyer to open an escrow (UsageEscrow.activate).

    ``deposit_amount`` must equal ``quantity * price_per_unit`` for the contract to accept it; that is checked
    here too. ``nonce`` is any uint256 the buyer has not used (the contract's nonces are unordered);
    ``challenge_window`` is in seconds, ``expires_at`` and ``deadline`` are unix times.
    """
    if deposit_amount != quantity * price_per_unit:
        raise ValueError(
            f"deposit_amount {deposit_amount} != quantity {quantity} * price_per_unit {price_per_unit}"
        )
    message = {
        "agreementId": _bytes32(agreement_id, "agreement_id"),
        "buyer": _address(buyer, "buyer"),
        "seller": _address(seller, "seller"),
        "token": _address(token, "token"),
        "quantity": _uint(quantity, "quantity"),
        "pricePerUnit": _uint(price_per_unit, "price_per_unit"),
        "depositAmount": _uint(deposit_amount, "deposit_amount"),
        "infraFee": _uint(infra_fee, "infra_fee"),
        "receiptSigner": _address(receipt_signer, "receipt_signer"),
        "challengeWindow": _uint(challenge_window, "challenge_window", 64),
        "expiresAt": _uint(expires_at, "expires_at", 64),
        "termsHash": _bytes32(terms_hash, "terms_hash"),
        "nonce": _uint(nonce, "nonce"),
        "deadline": _uint(deadline, "deadline"),
    }
    domain = escrow_domain(chain_id=chain_id, escrow_address=escrow_address)
    return _full("ActivationIntent", ACTIVATION_INTENT_TYPE, domain, message)


def usage_receipt(
    *,
    chain_id: int,
    escrow_address: str,
    agreement_id: str,
    seq: int,
    cumulative_amount: int,
    usage_digest: str,
) -> dict[str, Any]:
    """``UsageReceipt`` signed by the agreement's receipt signer (UsageEscrow.proposeSettlement)."""
    message = {
        "agreementId": _bytes32(agreement_id, "agreement_id"),
        "seq": _uint(seq, "seq"),
        "cumulativeAmount": _uint(cumulative_amount, "cumulative_amount"),
        "usageDigest": _bytes32(usage_digest, "usage_digest"),
    }
    domain = escrow_domain(chain_id=chain_id, escrow_address=escrow_address)
    return _full("UsageReceipt", USAGE_RECEIPT_TYPE, domain, message)


def challenge(*, chain_id: int, escrow_address: str, agreement_id: str, deadline: int) -> dict[str, Any]:
    """``Challenge{agreementId, deadline}`` signed by the buyer (UsageEscrow.challengeWithSig)."""
    message = {
        "agreementId": _bytes32(agreement_id, "agreement_id"),
        "deadline": _uint(deadline, "deadline"),
    }
    domain = escrow_domain(chain_id=chain_id, escrow_address=escrow_address)
    return _full("Challenge", CHALLENGE_TYPE, domain, message)


# ------------------------------------------------------------------ token messages


def erc2612_permit(
    *,
    chain_id: int,
    token_address: str,
    owner: str,
    spender: str,
    value: int,
    nonce: int,
    deadline: int,
    token_name: str = USDC_DOMAIN_NAME,
    token_version: str = USDC_DOMAIN_VERSION,
) -> dict[str, Any]:
    """EIP-2612 ``Permit``; ``nonce`` is the token's ``nonces(owner)`` (sequential)."""
    message = {
        "owner": _address(owner, "owner"),
        "spender": _address(spender, "spender"),
        "value": _uint(value, "value"),
        "nonce": _uint(nonce, "nonce"),
        "deadline": _uint(deadline, "deadline"),
    }
    domain = token_domain(chain_id=chain_id, token_address=token_address, name=token_name, version=token_version)
    return _full("Permit", PERMIT_TYPE, domain, message)


def _authorization(
    primary: str,
    *,
    chain_id: int,
    token_address: str,
    from_address: str,
    to_address: str,
    value: int,
    valid_after: int,
    valid_before: int,
    nonce: str,
    token_name: str,
    token_version: str,
) -> dict[str, Any]:
    message = {
        "from": _address(from_address, "from_address"),
        "to": _address(to_address, "to_address"),
        "value": _uint(value, "value"),
        "validAfter": _uint(valid_after, "valid_after"),
        "validBefore": _uint(valid_before, "valid_before"),
        "nonce": _bytes32(nonce, "nonce"),
    }
    domain = token_domain(chain_id=chain_id, token_address=token_address, name=token_name, version=token_version)
    return _full(primary, _AUTHORIZATION_FIELDS, domain, message)


def transfer_with_authorization(
    *,
    chain_id: int,
    token_address: str,
    from_address: str,
    to_address: str,
    value: int,
    valid_after: int,
    valid_before: int,
    nonce: str,
    token_name: str = USDC_DOMAIN_NAME,
    token_version: str = USDC_DOMAIN_VERSION,
) -> dict[str, Any]:
    """EIP-3009 ``TransferWithAuthorization`` (anyone may submit it; x402's "exact" EVM scheme).

    Valid while ``valid_after < block.timestamp < valid_before``; ``nonce`` is a random bytes32.
    """
    return _authorization(
        "TransferWithAuthorization",
        chain_id=chain_id,
        token_address=token_address,
        from_address=from_address,
        to_address=to_address,
        value=value,
        valid_after=valid_after,
        valid_before=valid_before,
        nonce=nonce,
        token_name=token_name,
        token_version=token_version,
    )


def receive_with_authorization(
    *,
    chain_id: int,
    token_address: str,
    from_address: str,
    to_address: str,
    value: int,
    valid_after: int,
    valid_before: int,
    nonce: str,
    token_name: str = USDC_DOMAIN_NAME,
    token_version: str = USDC_DOMAIN_VERSION,
) -> dict[str, Any]:
    """EIP-3009 ``ReceiveWithAuthorization``: only the payee ``to_address`` may submit it."""
    return _authorization(
        "ReceiveWithAuthorization",
        chain_id=chain_id,
        token_address=token_address,
        from_address=from_address,
        to_address=to_address,
        value=value,
        valid_after=valid_after,
        valid_before=valid_before,
        nonce=nonce,
        token_name=token_name,
        token_version=token_version,
    )


def cancel_authorization(
    *,
    chain_id: int,
    token_address: str,
    authorizer: str,
    nonce: str,
    token_name: str = USDC_DOMAIN_NAME,
    token_version: str = USDC_DOMAIN_VERSION,
) -> dict[str, Any]:
    """EIP-3009 ``CancelAuthorization`` of an unused authorization nonce."""
    message = {"authorizer": _address(authorizer, "authorizer"), "nonce": _bytes32(nonce, "nonce")}
    domain = token_domain(chain_id=chain_id, token_address=token_address, name=token_name, version=token_version)
    return _full("CancelAuthorization", CANCEL_AUTHORIZATION_TYPE, domain, message)


def wallet_proof(*, chain_id: int, escrow_address: str, handle: str, wallet: str, owner_id: int, expires_at: int,
                 domain_name: str = WALLET_PROOF_DOMAIN_NAME) -> dict[str, Any]:
    """``WalletProof``: `wallet` is the wallet of the agent `handle` of owner `owner_id` at the marketplace deployment
    whose escrow contract is `escrow_address` on `chain_id`, until `expires_at` (unix seconds). Signed by `wallet`, it
    is the ``wallet_proof.signature`` of ``POST /agents``; bound to the handle, the owner and the deployment (its
    escrow contract as ``verifyingContract``, its name: ``WALLET_PROOF_DOMAIN_NAME`` unless it names itself
    otherwise, as the typed data of its 400 ``wallet_proof_required`` says), it proves nothing for another agent,
    owner, deployment or network, and none is accepted for more than a day. No contract checks it: the escrow's
    address names the deployment, as it does on-chain (a deployment with no escrow contract, a dev set-up, names the
    zero address). Version "2": version "1" had no ``verifyingContract``, and a proof for one deployment served every
    other on the chain."""
    message = {"handle": handle, "wallet": _address(wallet, "wallet"), "ownerId": _uint(owner_id, "owner_id"),
               "expiresAt": _uint(expires_at, "expires_at")}
    domain = {"name": domain_name, "version": WALLET_PROOF_DOMAIN_VERSION, "chainId": _uint(chain_id, "chain_id"),
              "verifyingContract": _address(escrow_address, "escrow_address")}
    return _full("WalletProof", WALLET_PROOF_TYPE, domain, message)


# ------------------------------------------------------------------ signing helpers


def typed_data_digest(typed: dict[str, Any]) -> str:
    """The 32-byte EIP-712 digest (``keccak256(0x1901 ‖ domainSeparator ‖ structHash)``), 0x-hex."""
    signable = encode_typed_data(full_message=typed)
    return "0x" + keccak(b"\x19" + signable.version + signable.header + signable.body).hex()


def sign_typed_data(private_key: str | bytes, typed: dict[str, Any]) -> str:
    """Sign ``typed`` with ``private_key``; returns the 65-byte ``r ‖ s ‖ v`` signature (v = 27/28) as 0x-hex."""
    signed = Account.sign_message(encode_typed_data(full_message=typed), private_key)
    return "0x" + bytes(signed.signature).hex()


def recover_typed_data_signer(typed: dict[str, Any], signature: str | bytes) -> str:
    """The checksummed address that signed ``typed``."""
    return to_checksum_address(Account.recover_message(encode_typed_data(full_message=typed), signature=signature))


def split_signature(signature: str | bytes) -> tuple[int, str, str]:
    """``(v, r, s)`` of a 65-byte ``r ‖ s ‖ v`` signature; ``r`` and ``s`` as 0x-hex bytes32, v in {27, 28}."""
    raw = bytes.fromhex(signature[2:] if signature.startswith("0x") else signature) if isinstance(
        signature, str
    ) else bytes(signature)
    if len(raw) != 65:
        raise ValueError(f"expected a 65-byte signature, got {len(raw)} bytes")
    v = raw[64]
    if v < 27:
        v += 27
    if v not in (27, 28):
        raise ValueError(f"bad signature v: {raw[64]}")
    return v, "0x" + raw[:32].hex(), "0x" + raw[32:64].hex()


def message_tuple(typed: dict[str, Any]) -> tuple[Any, ...]:
    """The message's values in the struct's field order, as a contract call takes a struct argument
    (e.g. the ``intent`` of ``UsageEscrow.activate``)."""
    fields = typed["types"][typed["primaryType"]]
    return tuple(typed["message"][f["name"]] for f in fields)


EMPTY_PERMIT: tuple[int, int, int, str, str] = (0, 0, 0, "0x" + "00" * 32, "0x" + "00" * 32)
"""An absent ``UsageEscrow.Permit`` (deadline 0): the contract skips it and relies on the allowance."""


def onchain_permit(*, value: int, deadline: int, signature: str | bytes) -> tuple[int, int, int, str, str]:
    """``UsageEscrow.Permit`` ``(value, deadline, v, r, s)`` from a signed :func:`erc2612_permit`."""
    v, r, s = split_signature(signature)
    return (_uint(value, "value"), _uint(deadline, "deadline"), v, r, s)
