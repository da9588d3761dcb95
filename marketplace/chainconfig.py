"""Chain facts every app may read without talking to the chain: addresses from configuration.

Contract addresses come from the environment (USDC_ADDRESS, USAGE_ESCROW_ADDRESS) or else from the deployment
file that `manage.py devchain` / `deploy_contracts` write; the file is re-read when it changes, so processes
started before the dev chain finished deploying pick the addresses up.
"""

import json
from functools import cache

from django.conf import settings
from eth_account import Account

_deployment_cache: dict = {"mtime": None, "data": {}}


@cache
def _address_of(private_key: str) -> str:
    return Account.from_key(private_key).address if private_key else ""


def relayer_address() -> str:
    """The platform's gas wallet: it submits buyers' signed intents and pays the gas."""
    return _address_of(settings.RELAYER_PRIVATE_KEY)


def receipt_signer_address() -> str:
    """The key that signs usage receipts; the buyer names it in the activation intent."""
    return _address_of(settings.RECEIPT_SIGNER_PRIVATE_KEY)


def receipt_signer_key(address: str) -> str | None:
    """The key of receipt signer `address`: the current one, or one rotated out and kept for the escrows naming it
    (`RECEIPT_SIGNER_RETIRED_PRIVATE_KEYS`); None when neither is."""
    for key in [settings.RECEIPT_SIGNER_PRIVATE_KEY, *settings.RECEIPT_SIGNER_RETIRED_PRIVATE_KEYS]:
        if key and _address_of(key).lower() == address.lower():
            return key
    return None


def deployment() -> dict:
    path = settings.CHAIN_DEPLOYMENT_FILE
    try:
        mtime = path.stat().st_mtime
    except FileNotFoundError:
        return {}
    if mtime != _deployment_cache["mtime"]:
        _deployment_cache.update(mtime=mtime, data=json.loads(path.read_text()))
    return _deployment_cache["data"]


def usdc_address() -> str:
    return settings.USDC_ADDRESS or deployment().get("usdc", "")


def escrow_address() -> str:
    return settings.USAGE_ESCROW_ADDRESS or deployment().get("escrow", "")


def escrow_deployment_block() -> int:
    """The block the escrow was deployed in: the chain indexer reads its events from there on."""
    if settings.ESCROW_DEPLOYMENT_BLOCK is not None:
        return settings.ESCROW_DEPLOYMENT_BLOCK
    return int(deployment().get("escrow_block", 0))
