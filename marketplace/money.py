"""Amounts for people: token units with the symbol, beside the exact integer base units the system keeps.

Money is stored and computed in integer base units (USDC: 6 decimals, 1 USDC = 1_000_000); this module only
renders it. Nothing here rounds: 0.003 USDC stays 0.003 USDC, so what an operator reads is what moved.
"""

from decimal import Decimal

# Decimals of the tokens services may be priced in (settings.SUPPORTED_TOKENS); unknown symbols get USDC's.
TOKEN_DECIMALS = {"USDC": 6}
NATIVE_SYMBOL = "ETH"
NATIVE_DECIMALS = 18


def token_units(amount: int, token: str = "USDC", *, decimals: int | None = None) -> str:
    """`1000000` -> "1.00 USDC", `3000` -> "0.003 USDC", `1234567890` -> "1,234.56789 USDC": at least two
    decimals, every significant one after that, thousands grouped."""
    decimals = TOKEN_DECIMALS.get(token, 6) if decimals is None else decimals
    text = f"{Decimal(int(amount)).scaleb(-decimals):,.{decimals}f}"
    whole, _, fraction = text.partition(".")
    fraction = fraction.rstrip("0").ljust(2, "0")
    return f"{whole}.{fraction} {token}"


def native_units(wei: int) -> str:
    """Gas money: wei as ETH, to 6 decimals at most (gas balances are read at a glance, not audited)."""
    value = Decimal(int(wei)).scaleb(-NATIVE_DECIMALS).quantize(Decimal("0.000001"))
    return f"{value.normalize():f} {NATIVE_SYMBOL}"
