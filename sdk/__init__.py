"""Python client and signing helpers for the marketplace (no Django import).

The SDK signs only what it builds itself from the agreed terms and a pinned `NetworkConfig`; see README.md.
"""

from sdk.activation import sign_activation_package
from sdk.client import AgreementFailed, MarketplaceClient, MarketplaceError, NotConfigured
from sdk.networks import BASE, BASE_SEPOLIA, FeeSchedule, NetworkConfig, TokenDomain
from sdk.safety import DeadlineOutOfRange, LocalWallet, SigningRefused, Wallet
from sdk.terms import AgreedTerms

__all__ = ["BASE", "BASE_SEPOLIA", "AgreedTerms", "AgreementFailed", "DeadlineOutOfRange", "FeeSchedule",
           "LocalWallet", "MarketplaceClient", "MarketplaceError", "NetworkConfig", "NotConfigured",
           "SigningRefused", "TokenDomain", "Wallet", "sign_activation_package"]
