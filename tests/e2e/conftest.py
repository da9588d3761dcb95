"""End-to-end runs of the commands a user types, against the fault suite's real stack (web server, Celery worker
with beat, Redis, the Anvil chain)."""

from tests.faults.conftest import chain_relay, redis_server, stack, stack_env  # noqa: F401 - fixtures
