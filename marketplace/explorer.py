"""Links to the chain's block explorer for transaction hashes and addresses.

The explorer is configuration (CHAIN_EXPLORER_URL); left empty it defaults per chain id to the public explorer of
Base and Base Sepolia. A local dev chain (Anvil) has none: hashes and addresses are then shown without a link.
"""

from django.conf import settings

DEFAULT_EXPLORERS = {
    8453: "https://basescan.org",
    84532: "https://sepolia.basescan.org",
}


def explorer_base_url(chain_id: int | None = None) -> str:
    chain_id = settings.CHAIN_ID if chain_id is None else chain_id
    if settings.CHAIN_EXPLORER_URL and chain_id == settings.CHAIN_ID:
        return settings.CHAIN_EXPLORER_URL.rstrip("/")
    return DEFAULT_EXPLORERS.get(int(chain_id), "")


def transaction_url(tx_hash: str, chain_id: int | None = None) -> str:
    base = explorer_base_url(chain_id)
    return f"{base}/tx/{tx_hash}" if base and tx_hash else ""


def address_url(address: str, chain_id: int | None = None) -> str:
    base = explorer_base_url(chain_id)
    return f"{base}/address/{address}" if base and address else ""
