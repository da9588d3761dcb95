"""Model fields for chain values: token amounts as exact integers, EVM addresses checksummed, 32-byte hashes."""

from decimal import Decimal

from django.core.exceptions import ValidationError
from django.db import models
import re

from eth_utils import is_checksum_address, to_checksum_address


# The largest amount a token transfer, permit or signed intent carries (uint256).
MAX_AMOUNT = 2**256 - 1
# The largest an amount column of the embedded SQLite default holds exactly: its integers are signed 64-bit, and a
# larger value is kept as a float (2**64 + 1 came back as 2**64).
SQLITE_AMOUNT_MAX = 2**63 - 1


def amount_column_max(connection=None) -> int:
    """The largest amount the database's columns keep exactly: uint256 in PostgreSQL's numeric(78, 0), less in
    SQLite's."""
    if connection is None:
        from django.db import connection
    return SQLITE_AMOUNT_MAX if connection.vendor == "sqlite" else MAX_AMOUNT


class TokenAmountField(models.DecimalField):
    """An unsigned integer amount in token base units (uint256 fits numeric(78,0)); Python sees an int."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("max_digits", 78)
        kwargs.setdefault("decimal_places", 0)
        super().__init__(*args, **kwargs)

    def deconstruct(self):
        name, path, args, kwargs = super().deconstruct()
        kwargs.pop("max_digits", None)
        kwargs.pop("decimal_places", None)
        return name, path, args, kwargs

    def from_db_value(self, value, expression, connection):
        return None if value is None else int(value)

    def to_python(self, value):
        value = super().to_python(value)
        return None if value is None else int(value)

    def run_validators(self, value):
        # Django's digit-count validator reads a Decimal; `to_python` gives an int (every save of an amount in an
        # admin form was a 500).
        if value is not None and value < 0:
            raise ValidationError("Must not be negative: an amount in token base units.", code="negative_amount")
        # The column's 78 digits hold more than uint256: no token transfer, permit or intent carries such an amount.
        if value is not None and value > MAX_AMOUNT:
            raise ValidationError(f"Too large: at most {MAX_AMOUNT} (uint256).", code="amount_too_large")
        super().run_validators(None if value is None else Decimal(value))

    def get_db_prep_save(self, value, connection):
        if hasattr(value, "as_sql"):  # an expression (F("reserved") - n): the database computes it
            return value
        # The API refuses such an amount first (400 `amount_too_large`); one computed past it must not be kept rounded.
        if value is not None and abs(int(value)) > amount_column_max(connection):
            raise ValidationError(f"Too large for this database: at most {amount_column_max(connection)}.",
                                  code="amount_too_large")
        if isinstance(value, int):
            value = Decimal(value)
        return super().get_db_prep_save(value, connection)


_HEX_ADDRESS = re.compile(r"0x[0-9a-fA-F]{40}")


def is_address(value) -> bool:
    """Lower/upper-case hex, or mixed case only with a valid EIP-55 checksum (a typo must not pass)."""
    if not isinstance(value, str) or not _HEX_ADDRESS.fullmatch(value):
        return False
    body = value[2:]
    return body == body.lower() or body == body.upper() or is_checksum_address(value)


def validate_address(value: str) -> None:
    if not is_address(value):
        raise ValidationError("Not an EVM address (0x followed by 40 hex digits, valid checksum if mixed case).",
                              code="invalid_address")


def checksum_address(value: str) -> str:
    validate_address(value)
    return to_checksum_address(value)


class AddressField(models.CharField):
    """An EVM address, always stored in EIP-55 checksummed form."""

    def __init__(self, *args, **kwargs):
        kwargs["max_length"] = 42
        kwargs.setdefault("validators", [validate_address])
        super().__init__(*args, **kwargs)

    def deconstruct(self):
        name, path, args, kwargs = super().deconstruct()
        kwargs.pop("max_length", None)
        kwargs.pop("validators", None)
        return name, path, args, kwargs

    def get_prep_value(self, value):
        value = super().get_prep_value(value)
        if value and is_address(value):
            return to_checksum_address(value)
        return value


class Bytes32Field(models.CharField):
    """A 32-byte value (hash, agreement id on-chain) as 0x-prefixed lowercase hex."""

    def __init__(self, *args, **kwargs):
        kwargs["max_length"] = 66
        super().__init__(*args, **kwargs)

    def deconstruct(self):
        name, path, args, kwargs = super().deconstruct()
        kwargs.pop("max_length", None)
        return name, path, args, kwargs
