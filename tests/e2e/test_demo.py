"""`make demo` against a live stack: the whole money path reaches `settled`, and the balances it prints add up."""

import re
import subprocess
import sys

import pytest
from django.core.management import call_command

from agreements.models import UsageAgreement
from marketplace.demo_wallets import DEMO_BUYER_WALLET
from tests.e2e.conftest import escrow_emptied
from tests.escrow.flow import fund

pytestmark = [pytest.mark.slow, pytest.mark.chain, pytest.mark.postgres, pytest.mark.django_db(transaction=True)]


def test_make_demo_settles_and_its_balances_add_up(stack, demo_seller, moving_clock, escrow_chain):
    call_command("seed_demo", upstream=demo_seller, stdout=open("/dev/null", "w"))
    fund(escrow_chain, DEMO_BUYER_WALLET, 1_000 * 10**6)

    run = subprocess.run([sys.executable, "manage.py", "demo", "--url", stack.url, "--timeout", "60"],
                         env=stack.env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-4000:]

    agreement_id = re.search(r"Done in \d+ s: agreement (\S+) settled on-chain", run.stdout).group(1)
    agreement = UsageAgreement.objects.get(pk=agreement_id)
    assert agreement.status == "settled"
    assert agreement.seller_payout + agreement.buyer_refund == agreement.deposit_amount
    # Each phase's table ends with the check the command makes against the chain itself.
    assert run.stdout.count("they add up: no USDC created or lost") == 2
    escrow_emptied(escrow_chain)
    for tx_hash in re.findall(r"(0x[0-9a-f]{64})", run.stdout):
        assert escrow_chain.w3.eth.get_transaction_receipt(tx_hash)["status"] == 1
