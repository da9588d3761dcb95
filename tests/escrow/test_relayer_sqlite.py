"""The relayer's poll on the embedded SQLite default (`make run`): the suite runs on PostgreSQL, so this test runs
itself again in a pytest subprocess on an SQLite database (as tests/catalog/test_search_sqlite.py does)."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
from django.db import connection

from escrow import relayer

pytestmark = [pytest.mark.chain, pytest.mark.django_db]

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_the_relayers_poll_runs_on_sqlite(escrow_chain, tmp_path):
    """Every poll of `make run`'s worker failed ("ORDER BY not allowed in subqueries of compound statements": the
    failed payments it watches were read as a UNION of two ordered querysets), so nothing it sent was ever confirmed
    on the demo stack."""
    if connection.vendor != "sqlite":
        # Not as CI: there, tests/conftest.py stops any run whose database is not PostgreSQL, this one included.
        env = {**{k: v for k, v in os.environ.items() if k != "CI"},
               "DATABASE_URL": f"sqlite:///{tmp_path / 'relayer.sqlite3'}"}
        this_test = f"{Path(__file__).relative_to(REPO)}::{test_the_relayers_poll_runs_on_sqlite.__name__}"
        run = subprocess.run([sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-p", "no:xdist", "-q",
                              "-m", "", this_test], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
        assert run.returncode == 0 and "1 passed" in run.stdout, run.stdout[-3000:] + run.stderr[-3000:]
        return
    assert relayer.transactions_poll() == 0
    assert relayer.transactions_recheck_watched() == 0
