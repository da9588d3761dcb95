"""Tests of the embedded SQLite default (`make run`) in a suite that runs on PostgreSQL: such a test runs itself again
in a pytest subprocess on an SQLite database."""

import os
import subprocess
import sys
from pathlib import Path

from django.db import connection

REPO = Path(__file__).resolve().parents[2]


def ran_again_on_sqlite(request, tmp_path) -> bool:
    """False when the running test is on SQLite already (it goes on); else it is run again on an SQLite database in a
    subprocess, asserted to pass, and True (the caller returns)."""
    if connection.vendor == "sqlite":
        return False
    # Not as CI: there, tests/conftest.py stops any run whose database is not PostgreSQL, this one included.
    env = {**{k: v for k, v in os.environ.items() if k != "CI"}, "DATABASE_URL": f"sqlite:///{tmp_path / 'db.sqlite3'}"}
    this_test = f"{Path(request.node.path).relative_to(REPO)}::{request.node.name}"
    run = subprocess.run([sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-p", "no:xdist", "-q", "-m", "",
                          this_test], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0 and "1 passed" in run.stdout, run.stdout[-3000:] + run.stderr[-3000:]
    return True
