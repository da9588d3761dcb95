"""`make demo` (`manage.py demo`) against a live stack: the server, the chain, the demo seller, and a beat that
drives the relayer and settlement as `make run`'s worker and beat do. It reaches `settled`, then pays directly and
for a skill call, and the USDC balances it prints add up on-chain."""

import re
import threading
import time
from http.server import ThreadingHTTPServer
from io import StringIO

import pytest
from django.core.management import call_command
from django.db import connection

from agreements.models import AgreementStatus, UsageAgreement
from catalog.management.commands.seed_demo import DEMO_WALLETS
from catalog.models import Agent, ApiKey
from escrow import relayer, settlement
from marketplace.management.commands.demo_seller import DemoSeller
from tests.escrow.flow import USDC, fund, usdc_balance

pytestmark = [pytest.mark.chain, pytest.mark.django_db(transaction=True)]

# While a challenge window is open the dev chain's clock runs fast here, so the 60 s window passes in seconds; the
# rest of the time it keeps the wall clock (x402 authorizations are signed against it).
CHAIN_SECONDS_PER_BEAT = 10


@pytest.fixture
def demo_seller():
    DemoSeller.job_seconds = 0.2
    server = ThreadingHTTPServer(("127.0.0.1", 0), DemoSeller)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


@pytest.fixture
def beat(escrow_chain):
    """What `make run`'s worker and beat do, twice a second: poll confirmations, run the settlement tick; and
    the dev chain's interval mining (its clock moving CHAIN_SECONDS_PER_BEAT per beat during a challenge window)."""
    stop = threading.Event()

    def run():
        try:
            while not stop.is_set():
                if UsageAgreement.objects.filter(status=AgreementStatus.IN_CHALLENGE).exists():
                    escrow_chain.increase_time(CHAIN_SECONDS_PER_BEAT)
                else:
                    escrow_chain.mine()
                relayer.transactions_poll()
                settlement.settlement_tick()
                stop.wait(0.5)
        finally:
            connection.close()

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    yield
    stop.set()
    thread.join(timeout=30)


def test_make_demo_settles_and_its_balances_add_up(live_server, escrow_chain, demo_seller, beat):
    call_command("seed_demo", upstream=demo_seller, stdout=StringIO())
    # The test chain's deployment gives Anvil #2 the fee recipient's role: the demo seller is paid elsewhere here.
    Agent.objects.filter(handle="demo-seller").update(wallet_address=escrow_chain.accounts.seller.address)
    buyer = next(wallet for wallet in DEMO_WALLETS if wallet.role == "demo-buyer")
    fund(escrow_chain, buyer.address, 100 * USDC)
    started = time.monotonic()

    output = StringIO()
    call_command("demo", url=live_server.url, timeout=60, stdout=output)
    printed = output.getvalue()
    print(printed)  # shown with -s, and on failure

    assert time.monotonic() - started < 120, printed
    assert "-> settled" in printed and "-> paid" in printed and "The changes add up" in printed, printed
    assert len(set(re.findall(r"tx (0x[0-9a-f]{64})", printed))) >= 6, printed  # each step names its transaction
    for tx_hash in set(re.findall(r"tx (0x[0-9a-f]{64})", printed)):
        assert escrow_chain.w3.eth.get_transaction_receipt(tx_hash)["status"] == 1
    after = re.search(r"USDC after\s+(.*)", printed).group(1)
    balances = {name.strip(): float(value.replace(",", "")) for name, value in
                (cell.rsplit(" ", 1) for cell in after.split(" | "))}
    assert balances["buyer"] * USDC == pytest.approx(usdc_balance(escrow_chain, buyer.address))
    assert balances["seller"] * USDC == pytest.approx(usdc_balance(escrow_chain, escrow_chain.accounts.seller.address))
    assert not ApiKey.objects.filter(name="make demo", revoked_at=None).exists()  # its own keys, revoked after
