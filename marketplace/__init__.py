import importlib
import sys

# py_ecc (imported by eth_account and web3) raises Python's recursion limit to 100,000 when first imported. With
# that limit a deeply nested input overflows the C stack (SIGSEGV) before any RecursionError. Import it here, first
# thing in every process (web server, worker, manage.py), and put the limit back; tests/marketplace/
# test_recursion_limit.py fails if any other import raises it again.
RECURSION_LIMIT = sys.getrecursionlimit()
importlib.import_module("py_ecc")
sys.setrecursionlimit(RECURSION_LIMIT)

from marketplace.celery import app as celery_app  # noqa: E402

__all__ = ["celery_app", "RECURSION_LIMIT"]
