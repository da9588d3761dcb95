"""The proof that a wallet is an agent's, which `POST /agents` asks for (`wallet_proof`).

The marketplace names a seller by its wallet (the Masumi registry, payouts) and refuses an agent whose wallet did not
sign that it is that agent's: nobody can list services as another's wallet, and a typo'd address, whose key nobody
holds, is never paid. The SDK builds the message itself (``sdk.typed_data.wallet_proof``) from what the owner states
and the deployment it pins (the chain and the escrow contract of its `NetworkConfig`); it never signs a message the
server sent, and given that message (``offered=``, the ``details.typed_data`` of a 400 ``wallet_proof_required``) it
refuses one that differs from its own (`SigningRefused` naming the field: another deployment's escrow contract, chain
or name, another handle, wallet or owner).

    proof = sign_wallet_proof(wallet_key, chain_id=network.chain_id, escrow_address=network.escrow_address,
                              handle="my-seller", owner_id=42, expires_at=int(time.time()) + 600)
    body = {"handle": "my-seller", ..., "wallet_address": address, "wallet_proof": proof}

`owner_id` is the owner's id at the marketplace (the ``ownerId`` of the typed data a 400 ``wallet_proof_required``
shows); the proof serves that owner's agent `handle` at the deployment whose escrow contract is `escrow_address` on
`chain_id` only (another marketplace on the chain, with another escrow, refuses it), until `expires_at`, which must
lie within a day from now (else `DeadlineOutOfRange`, nothing signed): the marketplace's 400 names one, and a
compromised one could name one years away, a proof anyone holding it could show for as long.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from sdk import typed_data
from sdk.safety import Wallet, as_wallet, check_deadline, check_typed_data

__all__ = ["WALLET_PROOF_MAX_SECONDS", "sign_wallet_proof"]

# The longest a proof is valid: the marketplace accepts none for longer (catalog.services.WALLET_PROOF_MAX_VALIDITY).
WALLET_PROOF_MAX_SECONDS = 24 * 3600


def sign_wallet_proof(wallet: str | bytes | Wallet, *, chain_id: int, escrow_address: str, handle: str,
                      owner_id: int, expires_at: int, domain_name: str = typed_data.WALLET_PROOF_DOMAIN_NAME,
                      offered: Mapping[str, Any] | None = None) -> dict[str, str | int]:
    """`wallet` (a private key or a `Wallet`) signs that it is the wallet of the agent `handle` of owner `owner_id`
    at the deployment whose escrow contract is `escrow_address` on `chain_id` (the pinned `NetworkConfig`'s), until
    `expires_at` (unix seconds, within a day from now, else `DeadlineOutOfRange` on "wallet_proof.expires_at"): the
    ``wallet_proof`` object of ``POST /agents``. With `offered` (the marketplace's typed data), that must be the
    message built here, else `SigningRefused` on "wallet_proof.<field>" and nothing is signed."""
    check_deadline(expires_at, "wallet_proof.expires_at", min_seconds=1, max_seconds=WALLET_PROOF_MAX_SECONDS)
    signer = as_wallet(wallet)
    typed = typed_data.wallet_proof(chain_id=chain_id, escrow_address=escrow_address, handle=handle,
                                    wallet=signer.address, owner_id=owner_id, expires_at=expires_at,
                                    domain_name=domain_name)
    if offered is not None:
        check_typed_data(offered, typed, "wallet_proof")
    return {"signature": signer.sign_typed_data(typed), "expires_at": expires_at}
