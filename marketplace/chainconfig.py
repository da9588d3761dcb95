"""Chain facts every app may read without touching the chain: addresses derived from configuration."""

from functools import cache

from django.conf import settings
from eth_account import Account


@cache
def _address_of(private_key: str) -> str:
    return Account.from_key(private_key).address if private_key else ""


def relayer_address() -> str:
    """The platform's gas wallet: it submits buyers' signed intents and pays the gas."""
    return _address_of(settings.RELAYER_PRIVATE_KEY)
