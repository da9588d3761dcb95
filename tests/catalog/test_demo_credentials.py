"""The demo's credentials: the seed prints the dev chain's demo wallets beside the keys; keys can be re-issued."""

import re

import pytest
from django.contrib.auth import get_user_model
from django.core.management import CommandError, call_command
from eth_account import Account

from catalog.models import Agent
from marketplace.demo_wallets import DEMO_WALLETS
from tests.conftest import Api

pytestmark = pytest.mark.django_db


def secrets_in(output: str) -> dict[str, str]:
    return dict(re.findall(r"^\s+(Owner token|Buyer key \(demo-buyer\)|Seller key \(demo-seller\))\s+(\S+)$",
                           output, re.MULTILINE))


def admin_password_in(output: str) -> str:
    [password] = re.findall(r"^\s+Admin login\s+demo / (\S+)\s", output, re.MULTILINE)
    return password


def test_the_demo_admins_password_is_random_printed_once_and_reissued(capsys):
    """It was `demo-password` wherever the seed ran, a staging or production database seeded by mistake included:
    a superuser anyone could log in as."""
    call_command("seed_demo")
    first = admin_password_in(capsys.readouterr().out)
    demo = get_user_model().objects.get(username="demo")
    assert not demo.check_password("demo-password") and demo.check_password(first) and len(first) >= 16
    call_command("demo_keys", "--reissue")
    second = admin_password_in(capsys.readouterr().out)
    demo.refresh_from_db()
    assert second != first and demo.check_password(second) and not demo.check_password(first)


def test_the_demo_wallets_are_anvils_accounts_with_their_keys():
    for wallet in DEMO_WALLETS:
        assert Account.from_key(wallet.private_key).address == wallet.address, wallet


def test_the_seed_prints_the_dev_chains_wallets_with_the_keys(capsys, settings):
    settings.CHAIN_ID = 31337
    call_command("seed_demo")
    output = capsys.readouterr().out
    assert set(secrets_in(output)) == {"Owner token", "Buyer key (demo-buyer)", "Seller key (demo-seller)"}
    buyer = next(w for w in DEMO_WALLETS if w.role == "demo-buyer")
    assert f"Anvil #1  {buyer.address}  key {buyer.private_key}  demo-buyer" in output
    assert "treasury" in output and "fee recipient" in output

    call_command("seed_demo")  # again, after a restart: no keys, but the way to get new ones and the wallets
    again = capsys.readouterr().out
    assert "demo_keys --reissue" in again and buyer.private_key in again and not secrets_in(again)


def test_no_wallet_key_is_printed_off_the_dev_chain(capsys, settings):
    settings.CHAIN_ID = 84532
    call_command("seed_demo")
    output = capsys.readouterr().out
    assert secrets_in(output) and "Anvil #" not in output
    assert not any(wallet.private_key in output for wallet in DEMO_WALLETS)


def test_off_the_dev_chain_the_demo_agents_get_wallets_of_their_own_whose_keys_are_printed_once(capsys, settings):
    """Off the dev chain the seed gave the demo agents Anvil's public accounts: whatever a buyer paid the demo
    seller there, or anyone sent the demo buyer, anyone holding Anvil's published keys could take."""
    settings.CHAIN_ID = 84532
    call_command("seed_demo")
    output = capsys.readouterr().out
    public = {wallet.address.lower() for wallet in DEMO_WALLETS}
    for handle, label in (("demo-buyer", "Buyer wallet key"), ("demo-seller", "Seller wallet key")):
        agent = Agent.objects.get(handle=handle)
        assert agent.wallet_address.lower() not in public
        [key] = re.findall(rf"^\s+{label}\s+(0x[0-9a-f]{{64}})\s", output, re.MULTILINE)
        assert Account.from_key(key).address.lower() == agent.wallet_address.lower()
    call_command("seed_demo")
    assert "wallet key" not in capsys.readouterr().out


def test_demo_keys_reissue_revokes_the_old_keys_and_prints_working_ones(capsys):
    with pytest.raises(CommandError, match="seed_demo"):
        call_command("demo_keys", "--reissue")
    call_command("seed_demo")
    old = secrets_in(capsys.readouterr().out)
    call_command("demo_keys", "--reissue")
    new = secrets_in(capsys.readouterr().out)

    assert set(new) == set(old) and not set(new.values()) & set(old.values())
    assert Api(old["Buyer key (demo-buyer)"]).get("/usage-agreements").status_code == 401
    assert Api(new["Buyer key (demo-buyer)"]).get("/usage-agreements").status_code == 200
    assert Api(new["Seller key (demo-seller)"]).get("/usage-agreements").status_code == 200
    call_command("demo_keys")
    assert not secrets_in(capsys.readouterr().out)
