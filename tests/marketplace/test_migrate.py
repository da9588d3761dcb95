"""`manage.py migrate` as an operator runs it: Django runs the system checks tagged `database` first, on a database
whose tables (or the columns a new migration adds) are not there yet."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_migrate_applies_every_migration_to_a_fresh_database(tmp_path):
    """A check reading the agreements table (the open escrows' receipt signers) failed `migrate` on a fresh database
    (`no such table: agreements_usageagreement`), so `make run` on a new machine, and a deploy that adds the column,
    stopped before migrating."""
    env = {key: value for key, value in os.environ.items()
           if key not in {"DATABASE_URL", "TEST_DATABASE_URL", "DJANGO_SETTINGS_MODULE"}}
    env.update(DATABASE_URL=f"sqlite:///{tmp_path / 'fresh.sqlite3'}", DEBUG="true", PYTHONPATH=str(ROOT))
    done = subprocess.run([sys.executable, "manage.py", "migrate", "--noinput"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
