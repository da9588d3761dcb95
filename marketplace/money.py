"""Amounts for people: token units with the symbol, beside the exact integer base units the system keeps.

Money is stored and computed in integer base units (USDC: 6 decimals, 1 USDC = 1_000_000); this module renders it
and holds the platform's ceiling on one payment. Nothing here rounds: 0.003 USDC stays 0.003 USDC, so what an operator
reads is what moved.
"""

from decimal import Decimal, localcontext

from django.conf import settings
from django.core import checks

from marketplace.errors import InvalidInput

# The largest integer a JavaScript client's JSON.parse reads exactly (Number.MAX_SAFE_INTEGER): the API's amounts are
# JSON integers, and one past it reads as a neighbouring number, silently.
JAVASCRIPT_EXACT_MAX = 2**53 - 1

# Decimals of the tokens services may be priced in (settings.SUPPORTED_TOKENS); unknown symbols get USDC's.
TOKEN_DECIMALS = {"USDC": 6}
NATIVE_SYMBOL = "ETH"
NATIVE_DECIMALS = 18


def token_units(amount: int, token: str = "USDC", *, decimals: int | None = None) -> str:
    """`1000000` -> "1.00 USDC", `3000` -> "0.003 USDC", `1234567890` -> "1,234.56789 USDC": at least two
    decimals, every significant one after that, thousands grouped. Integer arithmetic: exact for any uint256 (a
    Decimal rounds past its context's 28 digits)."""
    decimals = TOKEN_DECIMALS.get(token, 6) if decimals is None else decimals
    amount = int(amount)
    whole, fraction = divmod(abs(amount), 10**decimals)
    fraction_text = f"{fraction:0{decimals}d}".rstrip("0").ljust(2, "0") if decimals else "00"
    return f"{'-' if amount < 0 else ''}{whole:,}.{fraction_text} {token}"


def native_units(wei: int) -> str:
    """Gas money: wei as ETH, to 6 decimals at most (gas balances are read at a glance, not audited)."""
    with localcontext(prec=100):  # any uint256 (78 digits): the default 28 digits cannot quantize one
        value = Decimal(int(wei)).scaleb(-NATIVE_DECIMALS).quantize(Decimal("0.000001"))
        return f"{value.normalize():f} {NATIVE_SYMBOL}"


def amount_within_limit(amount: int, *, field: str | None = None) -> None:
    """The platform's ceiling on one payment (AGREEMENT_MAX_AMOUNT), 400 `amount_too_large`: checked where a price is
    published and again where a stored price becomes money (a proposal's deposit, a skill's quote and payment), as the
    operator may have lowered the ceiling since the price was published. `field`: the published field, named in the
    details."""
    if amount > settings.AGREEMENT_MAX_AMOUNT:
        details: dict = {"max_amount_atomic": settings.AGREEMENT_MAX_AMOUNT}
        if field:
            details["field"] = field
        raise InvalidInput("The amount is above the platform limit (AGREEMENT_MAX_AMOUNT).", code="amount_too_large",
                           details=details)


def amount_limit_check(app_configs=None, **kwargs) -> list[checks.CheckMessage]:
    """Django system check (W003): AGREEMENT_MAX_AMOUNT within what a JavaScript client reads exactly. A warning, not
    an error: the server and the SDK read every amount exactly, and a token of 18 decimals needs a ceiling past 2**53
    base units (0.009 of it); with USDC's 6 decimals that ceiling is above 9 billion USDC, most likely a typo."""
    if settings.AGREEMENT_MAX_AMOUNT <= JAVASCRIPT_EXACT_MAX:
        return []
    return [checks.Warning(
        f"AGREEMENT_MAX_AMOUNT ({settings.AGREEMENT_MAX_AMOUNT}) is above {JAVASCRIPT_EXACT_MAX} (2**53 - 1): the API "
        "gives amounts as JSON integers, which a JavaScript client (JSON.parse) reads inexactly past it.",
        hint="Lower AGREEMENT_MAX_AMOUNT, or have JavaScript clients parse amounts as BigInt.", obj=__name__,
        id="marketplace.W003")]
