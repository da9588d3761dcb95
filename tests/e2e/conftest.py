"""End-to-end runs of the commands a user types, against the fault suite's real stack (web server, Celery worker
with beat, Redis, the Anvil chain), with `make run`'s demo seller and a chain clock that moves as its dev chain's."""

import threading
from http.server import ThreadingHTTPServer

import pytest

from marketplace.management.commands.demo_seller import DemoSeller
from tests.faults.conftest import chain_relay, redis_server, stack  # noqa: F401 - fixtures
from tests.faults.processes import wait_until

CHALLENGE_WINDOW_MIN = 5


@pytest.fixture
def stack_env():
    # The beat's pay-fees task pays the accrued infra fees to the fee recipient every second, as the server does.
    return {"CHALLENGE_WINDOW_MIN_SECONDS": str(CHALLENGE_WINDOW_MIN), "PAY_FEES_SECONDS": "1"}


@pytest.fixture
def demo_seller():
    server = ThreadingHTTPServer(("127.0.0.1", 0), DemoSeller)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


@pytest.fixture
def moving_clock(escrow_chain):
    """Blocks every second with no traffic, as `make run`'s dev chain mines on an interval."""
    escrow_chain.node.rpc("evm_setIntervalMining", [1])
    yield
    # Back to the session chain's mode for the tests after this one: a block per transaction (turning the interval
    # off leaves Anvil mining nothing at all).
    escrow_chain.node.rpc("evm_setIntervalMining", [0])
    escrow_chain.node.rpc("evm_setAutomine", [True])


def escrow_emptied(chain) -> None:
    """Wait until the escrow holds nothing: every payout made and the server's pay-fees task has paid the fee."""
    balance = chain.usdc.functions.balanceOf(chain.addresses["escrow"]).call
    wait_until(lambda: balance() == 0, timeout=60, what="the escrow to be emptied (payouts and accrued fees paid)")
