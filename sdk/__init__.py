"""Python client and signing helpers for the marketplace (no Django import)."""

from sdk.activation import sign_activation_package
from sdk.client import AgreementFailed, MarketplaceClient, MarketplaceError

__all__ = ["AgreementFailed", "MarketplaceClient", "MarketplaceError", "sign_activation_package"]
