"""The proof that a wallet is an agent's, which `POST /agents` asks for (`wallet_proof`).

The marketplace names a seller by its wallet (the Masumi registry, payouts) and refuses an agent whose wallet did not
sign that it is that agent's: nobody can list services as another's wallet, and a typo'd address, whose key nobody
holds, is never paid. The SDK builds the message itself (``sdk.typed_data.wallet_proof``) from what the owner states;
it never signs a message the server sent.

    proof = sign_wallet_proof(wallet_key, chain_id=8453, handle="my-seller", owner_id=42,
                              expires_at=int(time.time()) + 600)
    body = {"handle": "my-seller", ..., "wallet_address": address, "wallet_proof": proof}

`owner_id` is the owner's id at the marketplace (the ``ownerId`` of the typed data a 400 ``wallet_proof_required``
shows); the proof serves that owner's agent `handle` on `chain_id` only, until `expires_at`, which must lie within a
day from now (else `DeadlineOutOfRange`, nothing signed): the marketplace's 400 names one, and a compromised one
could name one years away, a proof anyone holding it could show for as long.
"""

from __future__ import annotations

from sdk import typed_data
from sdk.safety import Wallet, as_wallet, check_deadline

__all__ = ["WALLET_PROOF_MAX_SECONDS", "sign_wallet_proof"]

# The longest a proof is valid: the marketplace accepts none for longer (catalog.services.WALLET_PROOF_MAX_VALIDITY).
WALLET_PROOF_MAX_SECONDS = 24 * 3600


def sign_wallet_proof(wallet: str | bytes | Wallet, *, chain_id: int, handle: str, owner_id: int, expires_at: int,
                      domain_name: str = typed_data.WALLET_PROOF_DOMAIN_NAME) -> dict[str, str | int]:
    """`wallet` (a private key or a `Wallet`) signs that it is the wallet of the agent `handle` of owner `owner_id`
    on `chain_id` until `expires_at` (unix seconds, within a day from now, else `DeadlineOutOfRange` on
    "wallet_proof.expires_at"): the ``wallet_proof`` object of ``POST /agents``."""
    check_deadline(expires_at, "wallet_proof.expires_at", min_seconds=1, max_seconds=WALLET_PROOF_MAX_SECONDS)
    signer = as_wallet(wallet)
    typed = typed_data.wallet_proof(chain_id=chain_id, handle=handle, wallet=signer.address, owner_id=owner_id,
                                    expires_at=expires_at, domain_name=domain_name)
    return {"signature": signer.sign_typed_data(typed), "expires_at": expires_at}
