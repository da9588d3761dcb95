"""Chain facts every app may read without talking to the chain: addresses from configuration.

Contract addresses come from the environment (USDC_ADDRESS, USAGE_ESCROW_ADDRESS) or else from the deployment
file that `manage.py devchain` / `deploy_contracts` write; the file is re-read when it changes, so processes
started before the dev chain finished deploying pick the addresses up.
"""

import json
from functools import cache

from django.conf import settings
from django.core import checks
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
    (`RECEIPT_SIGNER_RETIRED_PRIVATE_KEYS`); None when neither is (or `address` is blank). Runs for every signed
    receipt: a dict lookup, the keys' addresses derived once per configuration."""
    return _signer_keys(settings.RECEIPT_SIGNER_PRIVATE_KEY, tuple(settings.RECEIPT_SIGNER_RETIRED_PRIVATE_KEYS)).get(
        address.lower()) if address else None


def agreement_receipt_signer_key(receipt_signer: str) -> str | None:
    """The key that signs an agreement's receipts: of the signer its escrow names (`UsageAgreement.receipt_signer`),
    else (blank: an agreement not activated through this field) the current one. None: that signer's key is not
    configured, and nothing may be signed for the agreement (a receipt of another key fails the buyer's check and the
    contract's)."""
    return receipt_signer_key(receipt_signer) if receipt_signer else settings.RECEIPT_SIGNER_PRIVATE_KEY or None


@cache
def _signer_keys(current: str, retired: tuple[str, ...]) -> dict[str, str]:
    """{address, lowercase: key} of the configured receipt signer keys, the current one first; a malformed key is
    left out (`receipt_signer_problems` reports it) rather than failing every signature."""
    keys: dict[str, str] = {}
    for key in (current, *retired):
        address = _address_or_none(key)
        if address is not None:
            keys.setdefault(address.lower(), key)
    return keys


def _address_or_none(private_key: str) -> str | None:
    try:
        return _address_of(private_key) or None
    except (ValueError, TypeError):
        return None


def receipt_signer_problems() -> list[str]:
    """What is wrong with the receipt signer keys configured (no key is ever named): a malformed one signs nothing
    (and is left out, so the processes still start). `receipt_signer_check` reports them."""
    problems = []
    if settings.RECEIPT_SIGNER_PRIVATE_KEY and _address_or_none(settings.RECEIPT_SIGNER_PRIVATE_KEY) is None:
        problems.append("RECEIPT_SIGNER_PRIVATE_KEY is not a valid private key")
    problems += [f"RECEIPT_SIGNER_RETIRED_PRIVATE_KEYS: entry {position} is not a valid private key"
                 for position, key in enumerate(settings.RECEIPT_SIGNER_RETIRED_PRIVATE_KEYS, start=1)
                 if _address_or_none(key) is None]
    return problems


def receipt_signer_check(app_configs=None, **kwargs) -> list[checks.CheckMessage]:
    """Django system check: the receipt signer keys are well-formed (E001); the current key is not also listed as
    retired, a rotation that did not change the key (W002). With `--database`, agreements checks that no open escrow
    names a signer whose key is configured nowhere (`agreements.E003`)."""
    messages = [checks.Error(problem, id="marketplace.E001", hint="Each key is 32 bytes of hex, 0x-prefixed or not.")
                for problem in receipt_signer_problems()]
    current = _address_or_none(settings.RECEIPT_SIGNER_PRIVATE_KEY)
    if current and any(_address_or_none(key) == current for key in settings.RECEIPT_SIGNER_RETIRED_PRIVATE_KEYS):
        messages.append(checks.Warning(
            f"RECEIPT_SIGNER_RETIRED_PRIVATE_KEYS lists the current RECEIPT_SIGNER_PRIVATE_KEY ({current}).",
            hint="A rotation sets the new key as RECEIPT_SIGNER_PRIVATE_KEY and moves the old one to the retired list.",
            id="marketplace.W002"))
    return messages


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
