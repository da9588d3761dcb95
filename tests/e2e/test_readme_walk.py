"""README's curl walk, run as written: its shell blocks between the `readme-walk` markers, verbatim, in one bash
(stopping at the first failing command) against a live stack, from registering the agents to `settled`.

Only the addresses the walk reads from the environment differ from `make run`'s (`API`, `UPSTREAM`, and the
stack's `CHAIN_RPC_URL`, the buyer's RPC); the walk's `.venv/bin/python` is this interpreter, so it runs this
checkout's code.
"""

import ast
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from django.core.management import call_command

from agreements.models import UsageAgreement
from marketplace.demo_wallets import DEMO_BUYER_WALLET, DEMO_SELLER_WALLET
from tests.e2e.conftest import escrow_emptied
from tests.escrow.flow import fund

pytestmark = [pytest.mark.slow, pytest.mark.chain, pytest.mark.postgres, pytest.mark.django_db(transaction=True)]

REPO = Path(__file__).resolve().parents[2]
UNIT_PRICE = 10_000  # the walk's Summarizer, per call
CALLS, QUANTITY = 3, 5


def readme_walk() -> str:
    """The shell blocks between README's `readme-walk` markers, joined."""
    readme = (REPO / "README.md").read_text()
    section = re.search(r"<!-- readme-walk:start -->(.*?)<!-- readme-walk:end -->", readme, re.S)
    assert section, "README has no readme-walk markers"
    blocks = re.findall(r"^```sh\n(.*?)^```$", section.group(1), re.S | re.M)
    assert len(blocks) >= 5, f"README's walk has {len(blocks)} shell blocks"
    return "\n".join(blocks)


@pytest.fixture
def walk_dir(tmp_path: Path) -> Path:
    """A directory laid out as the repository's root for the walk: `manage.py`, and `.venv/bin/python` running
    the interpreter of this test (not whatever .venv the checkout has) on this checkout's code: from the walk's
    directory, `import sdk` found the editable install's checkout instead (a worktree sharing another's .venv ran
    that one's SDK)."""
    python = tmp_path / ".venv" / "bin" / "python"
    python.parent.mkdir(parents=True)
    python.write_text(f'#!/bin/sh\nPYTHONPATH="{REPO}${{PYTHONPATH:+:$PYTHONPATH}}" exec "{sys.executable}" "$@"\n')
    python.chmod(0o755)
    (tmp_path / "manage.py").symlink_to(REPO / "manage.py")
    return tmp_path


def test_readme_curl_walk_runs_as_written_to_settled(stack, demo_seller, moving_clock, escrow_chain, walk_dir):
    assert shutil.which("curl"), "README's walk needs curl"
    call_command("seed_demo", upstream=demo_seller, stdout=open("/dev/null", "w"))
    fund(escrow_chain, DEMO_BUYER_WALLET, 1_000 * 10**6)

    script = f"set -euo pipefail\n{readme_walk()}\necho \"walk agreement $AGREEMENT\"\n"
    run = subprocess.run(["bash", "-c", script], cwd=walk_dir, capture_output=True, text=True, timeout=300,
                         env={**stack.env, "API": stack.url, "UPSTREAM": demo_seller})
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-4000:]

    agreement = UsageAgreement.objects.get(pk=re.search(r"walk agreement (\S+)", run.stdout).group(1))
    assert agreement.status == "settled"
    assert agreement.buyer.wallet_address == DEMO_BUYER_WALLET
    assert agreement.seller.wallet_address == DEMO_SELLER_WALLET
    assert (agreement.seller_payout, agreement.buyer_refund) == (CALLS * UNIT_PRICE, (QUANTITY - CALLS) * UNIT_PRICE)
    assert "'name': 'Summarizer'" in run.stdout  # the buyer's fuzzy search found it
    assert len(re.findall(r"(?im)^x-usage-cost: 10000\r?$", run.stdout)) == CALLS
    onchain = ast.literal_eval(run.stdout.splitlines()[-2])  # the walk's last line: the contract's own view
    assert (onchain["state"], onchain["settledAmount"]) == ("settled", CALLS * UNIT_PRICE)
    escrow_emptied(escrow_chain)
