"""`marketplace.postgresql.transaction_in_pipelines`: the pipelined transactions of the proxy's two-round-trip charge
and of search's generic-plan pages. A statement's error reaches the caller when psycopg reads its result, which may
be at the statement or at the end of its pipeline, outside Django's cursor wrapper: either way it must arrive as
Django's database error (what `reservation_commit` and the API's error handler catch: a lost connection must be
`django.db.OperationalError`, else a charge whose outcome is unknown is not looked up), with the transaction rolled
back."""

import pytest
from django.db import DataError, connection
from psycopg.errors import DivisionByZero
from psycopg.pq import TransactionStatus

from marketplace.postgresql import transaction_in_pipelines

pytestmark = [pytest.mark.postgres, pytest.mark.django_db(transaction=True)]


def test_an_error_in_a_pipelined_transaction_is_djangos_wherever_psycopg_raises_it():
    for _ in range(20):  # where psycopg raises it (the execute or the pipeline's end) depends on timing
        with pytest.raises(DataError) as raised:
            with transaction_in_pipelines() as (cursor, control, pipeline):
                with pipeline():
                    control.execute("BEGIN")
                    cursor.execute("SELECT 1 / %s", [0])
                    control.execute("COMMIT")
        assert isinstance(raised.value.__cause__, DivisionByZero)
        assert connection.connection.info.transaction_status == TransactionStatus.IDLE  # rolled back


def test_an_error_after_the_pipelines_is_the_callers_own_and_rolls_back():
    with pytest.raises(LookupError):
        with transaction_in_pipelines() as (cursor, control, pipeline):
            with pipeline():
                control.execute("BEGIN")
                cursor.execute("SELECT 1")
            raise LookupError
    assert connection.connection.info.transaction_status == TransactionStatus.IDLE
