"""The WSGI application as a server's worker loads it."""

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
FROZEN_AT_LEAST = 50_000  # objects: Django, DRF and the apps' modules are about 200,000


def test_the_loaded_application_is_out_of_the_garbage_collectors_reach():
    """A full collection walked every object of the loaded application (200-230 ms on a 2-core machine), and every
    request of that worker waited meanwhile: most of bench/catalog_search.py's p99."""
    loaded = subprocess.run(
        [sys.executable, "-c", "import gc; import marketplace.wsgi; print(gc.get_freeze_count())"],
        cwd=ROOT, env={**os.environ, "DJANGO_SETTINGS_MODULE": "marketplace.settings"},
        capture_output=True, text=True, timeout=120, check=True)
    assert int(loaded.stdout.split()[-1]) >= FROZEN_AT_LEAST
