"""Wire-format helpers shared by the Masumi-compatible endpoints (registry in catalog, purchases in escrow)."""

import datetime

from django.conf import settings
from rest_framework import serializers

from marketplace.errors import InvalidInput


def network_field():
    return serializers.CharField(max_length=50, help_text="`MASUMI_NETWORK` (e.g. Preprod) or the chain name.")


def check_network(network: str) -> None:
    if network not in (settings.MASUMI_NETWORK, settings.CHAIN_NETWORK):
        raise InvalidInput(
            f"This marketplace runs on {settings.MASUMI_NETWORK!r} ({settings.CHAIN_NETWORK}).",
            code="wrong_network",
        )


def timestamp(moment: datetime.datetime | None) -> str | None:
    """As Masumi (JavaScript's Date.toISOString) writes it: UTC, milliseconds, Z. A string here rather than a datetime
    left to the renderer, so an idempotent replay (stored as JSON) answers byte for byte what the first call did."""
    if moment is None:
        return None
    return moment.astimezone(datetime.UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")
