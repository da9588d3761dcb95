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
from eth_utils import to_checksum_address

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


def retired_receipt_signer_addresses() -> list[str]:
    """The receipt signers rotated out (`RECEIPT_SIGNER_RETIRED_PRIVATE_KEYS`) whose keys still sign the receipts of
    escrows activated under them; a malformed key is left out, as for signing."""
    current = receipt_signer_address().lower()
    return [to_checksum_address(address) for address in _keys_by_address(
        settings.RECEIPT_SIGNER_PRIVATE_KEY, tuple(settings.RECEIPT_SIGNER_RETIRED_PRIVATE_KEYS)) if address != current]


def receipt_signer_key(address: str) -> str | None:
    """The key of receipt signer `address`: the current one, or one rotated out and kept for the escrows naming it
    (`RECEIPT_SIGNER_RETIRED_PRIVATE_KEYS`); None when neither is (or `address` is blank). Runs for every signed
    receipt: a dict lookup, the keys' addresses derived once per configuration."""
    return _keys_by_address(settings.RECEIPT_SIGNER_PRIVATE_KEY, tuple(settings.RECEIPT_SIGNER_RETIRED_PRIVATE_KEYS)
                            ).get(address.lower()) if address else None


def relayer_key(address: str) -> str | None:
    """The key of relayer wallet `address`: RELAYER_PRIVATE_KEY's, or one replaced and kept while transactions its
    wallet signed are in flight (`RELAYER_RETIRED_PRIVATE_KEYS`); None when neither is. A nonce is one wallet's: a
    transaction another key signs in its place is another wallet's, which the first does not exclude (both run)."""
    return _relayer_keys().get(address.lower()) if address else None


def agreement_receipt_signer_key(receipt_signer: str) -> str | None:
    """The key that signs an agreement's receipts: of the signer its escrow names (`UsageAgreement.receipt_signer`),
    else (blank: an agreement not activated through this field) the current one. None: that signer's key is not
    configured, and nothing may be signed for the agreement (a receipt of another key fails the buyer's check and the
    contract's)."""
    return receipt_signer_key(receipt_signer) if receipt_signer else settings.RECEIPT_SIGNER_PRIVATE_KEY or None


def relayer_addresses() -> list[str]:
    """The relayer wallets whose keys are configured (`relayer_key`), checksummed: the current one first."""
    return [_address_of(key) for key in _relayer_keys().values()]


def _relayer_keys() -> dict[str, str]:
    return _keys_by_address(settings.RELAYER_PRIVATE_KEY, tuple(settings.RELAYER_RETIRED_PRIVATE_KEYS))


@cache
def _keys_by_address(current: str, retired: tuple[str, ...]) -> dict[str, str]:
    """{address, lowercase: key} of a current key and the retired ones, the current one first; a malformed key is
    left out (`signing_key_problems` reports it) rather than failing every signature."""
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


# Each signing key and the list of those it replaced, kept to finish what they signed.
_ROTATED_KEYS = (("RECEIPT_SIGNER_PRIVATE_KEY", "RECEIPT_SIGNER_RETIRED_PRIVATE_KEYS"),
                 ("RELAYER_PRIVATE_KEY", "RELAYER_RETIRED_PRIVATE_KEYS"))


def signing_key_problems(current_setting: str) -> list[str]:
    """What is wrong with a signing key configured and the retired ones beside it (no key is ever named): a
    malformed one signs nothing (and is left out, so the processes still start). `signing_keys_check` reports them."""
    retired_setting = dict(_ROTATED_KEYS)[current_setting]
    current = getattr(settings, current_setting)
    problems = [f"{current_setting} is not a valid private key"] if current and _address_or_none(current) is None else []
    problems += [f"{retired_setting}: entry {position} is not a valid private key"
                 for position, key in enumerate(getattr(settings, retired_setting), start=1)
                 if _address_or_none(key) is None]
    return problems


def signing_keys_check(app_configs=None, **kwargs) -> list[checks.CheckMessage]:
    """Django system check: the receipt signer and relayer keys are well-formed (E001); a current key is not also
    listed as retired, a rotation that did not change the key (W002). With `--database`, agreements checks that no
    open escrow names a signer whose key is configured nowhere (`agreements.E003`)."""
    messages = []
    for current_setting, retired_setting in _ROTATED_KEYS:
        messages += [checks.Error(problem, id="marketplace.E001", hint="Each key is 32 bytes of hex, 0x-prefixed or "
                                  "not.") for problem in signing_key_problems(current_setting)]
        current = _address_or_none(getattr(settings, current_setting))
        if current and any(_address_or_none(key) == current for key in getattr(settings, retired_setting)):
            messages.append(checks.Warning(
                f"{retired_setting} lists the current {current_setting} ({current}).",
                hint=f"A rotation sets the new key as {current_setting} and moves the old one to the retired list.",
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
