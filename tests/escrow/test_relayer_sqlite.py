"""The relayer's poll on the embedded SQLite default (`make run`): the suite runs on PostgreSQL, so this test runs
itself again in a pytest subprocess on an SQLite database (tests.support.on_sqlite)."""

import pytest

from escrow import relayer
from tests.support.on_sqlite import ran_again_on_sqlite

pytestmark = [pytest.mark.chain, pytest.mark.django_db]


@pytest.mark.slow
def test_the_relayers_poll_runs_on_sqlite(escrow_chain, request, tmp_path):
    """Every poll of `make run`'s worker failed ("ORDER BY not allowed in subqueries of compound statements": the
    failed payments it watches were read as a UNION of two ordered querysets), so nothing it sent was ever confirmed
    on the demo stack."""
    if ran_again_on_sqlite(request, tmp_path):
        return
    assert relayer.transactions_poll() == 0
    assert relayer.transactions_recheck_watched() == 0
