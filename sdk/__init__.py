"""Python client and signing helpers for the marketplace (no Django import).

The SDK signs only what it builds itself from the agreed terms and a pinned `NetworkConfig`, and bounds every answer
it reads (`sdk.bounded_http`, `sdk.bounded_json`); see README.md.
"""

import importlib
import sys

# py_ecc (imported by eth_account) raises Python's recursion limit to 100,000 when first imported, and with that limit
# deeply nested input (JSON from a hostile server, parsed by the agent's own code) overflows the C stack (SIGSEGV)
# before any RecursionError. Importing the SDK leaves the limit as it found it.
_RECURSION_LIMIT = sys.getrecursionlimit()
importlib.import_module("py_ecc")
sys.setrecursionlimit(_RECURSION_LIMIT)

from sdk.activation import sign_activation_package  # noqa: E402
from sdk.bounded_http import (AnswerRefused, AnswerTooLarge, DeadlineExceeded, InsecureUrl,  # noqa: E402
                               UndecodableAnswer, UnexpectedAnswer, UnrequestedEncoding)
from sdk.bounded_json import InvalidJSON  # noqa: E402
from sdk.client import (AgreementFailed, AnswerMismatch, ListingTooLong, MarketplaceClient,  # noqa: E402
                        MarketplaceError, NotConfigured, PaymentAuthorizationCancelFailed, PaymentAuthorizationUsed)
from sdk.networks import BASE, BASE_SEPOLIA, FeeSchedule, NetworkConfig, TokenDomain  # noqa: E402
from sdk.safety import DeadlineOutOfRange, LocalWallet, SellerUnverified, SigningRefused, Wallet  # noqa: E402
from sdk.terms import AgreedTerms  # noqa: E402
from sdk.version import VERSION as __version__  # noqa: E402
from sdk.wallet_proof import sign_wallet_proof  # noqa: E402

__all__ = ["BASE", "BASE_SEPOLIA", "AgreedTerms", "AgreementFailed", "AnswerMismatch", "AnswerRefused", "AnswerTooLarge",
           "DeadlineExceeded", "DeadlineOutOfRange", "FeeSchedule", "InsecureUrl", "InvalidJSON", "ListingTooLong", "LocalWallet",
           "MarketplaceClient", "MarketplaceError", "NetworkConfig", "NotConfigured",
           "PaymentAuthorizationCancelFailed", "PaymentAuthorizationUsed", "SellerUnverified", "SigningRefused",
           "TokenDomain", "UndecodableAnswer", "UnexpectedAnswer", "UnrequestedEncoding", "Wallet", "__version__",
           "sign_activation_package", "sign_wallet_proof"]
