"""Django's SQLite backend (the `make run` default) reading token amounts exactly.

SQLite keeps an integer of up to 64 bits exactly, but Django reads every DecimalField through a float context of 15
significant digits: a cap of 1_000_000_000_000_001 came back as 1_000_000_000_000_000. A TokenAmountField's value
is read as the integer it is; amounts past what the column holds exactly (`marketplace.fields.amount_column_max`)
are refused before they are written."""

from decimal import Decimal

from django.db.backends.sqlite3 import base, operations

from marketplace.fields import TokenAmountField


class DatabaseOperations(operations.DatabaseOperations):
    def get_decimalfield_converter(self, expression):
        rounded = super().get_decimalfield_converter(expression)
        if not isinstance(expression.output_field, TokenAmountField):
            return rounded

        def converter(value, expression, connection):
            return Decimal(value) if isinstance(value, int) else rounded(value, expression, connection)

        return converter


class DatabaseWrapper(base.DatabaseWrapper):
    ops_class = DatabaseOperations
