"""The SDK as a package: its one EIP-712 encoding, and its installation without Django."""

import os
import secrets
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from eth_account import Account
from eth_account.messages import encode_typed_data

from sdk import receipts, typed_data

REPO_ROOT = Path(__file__).resolve().parents[2]


def test_the_hand_written_receipt_hash_is_eth_accounts_eip712_encoding():
    signer = Account.create()
    for seq, amount in ((1, 0), (7, 20_000), (2**64, 2**256 - 1)):
        fields = {"chain_id": 84532, "escrow_address": Account.create().address,
                  "agreement_id": "0x" + secrets.token_hex(32), "seq": seq, "cumulative_amount": amount,
                  "usage_digest": "0x" + secrets.token_hex(32)}
        typed = typed_data.usage_receipt(**fields)
        assert receipts.usage_receipt_signable(**fields) == encode_typed_data(full_message=typed)
        assert "0x" + receipts.usage_receipt_digest(**fields).hex() == typed_data.typed_data_digest(typed)

        signature = "0x" + bytes(signer.unsafe_sign_hash(receipts.usage_receipt_digest(**fields)).signature).hex()
        assert receipts.recover_receipt_signer(receipts.usage_receipt_signable(**fields), signature) == signer.address
        assert typed_data.recover_typed_data_signer(typed, signature) == signer.address


@pytest.mark.slow
def test_the_sdk_installs_and_imports_without_django(tmp_path):
    # Built from a copy (the build writes next to its sources) with the SDK's own pyproject.toml, installed into
    # a directory of its own, then imported from there with Django made unimportable.
    source = tmp_path / "src" / "sdk"
    shutil.copytree(REPO_ROOT / "sdk", source, ignore=shutil.ignore_patterns("__pycache__"))
    target = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--target", str(target),
                    str(source)], check=True, capture_output=True, timeout=300)
    assert (target / "sdk" / "py.typed").exists()
    code = ("import sys; sys.modules['django'] = None\n"
            "import sdk, sdk.client, sdk.activation, sdk.receipts, sdk.x402_signing, sdk.onchain\n"
            f"assert sdk.__file__.startswith({str(target)!r}), sdk.__file__\n"
            "from sdk import MarketplaceClient, NetworkConfig, BASE_SEPOLIA\n"
            "from importlib.metadata import version\n"
            "assert version('agent-escrow-marketplace-sdk') == sdk.__version__ == '0.4.21', version('agent-escrow-marketplace-sdk')\n"
            "assert BASE_SEPOLIA.token_domain.name == 'USDC'\n")
    environment = {k: v for k, v in os.environ.items() if k not in ("DJANGO_SETTINGS_MODULE", "PYTHONPATH")}
    environment["PYTHONPATH"] = str(target)
    result = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=environment, capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 0, result.stderr


def test_a_402_for_another_token_chain_or_domain_is_not_signed():
    from x402 import PaymentRequired, PaymentRequirements
    from x402.http import encode_payment_required_header

    from sdk import SigningRefused, TokenDomain
    from sdk.networks import BASE_SEPOLIA, NetworkConfig
    from sdk.x402_signing import sign_payment_required

    network = NetworkConfig.pinned(BASE_SEPOLIA, escrow_address=Account.create().address,
                                   receipt_signer=Account.create().address, gas_wallet=Account.create().address)
    honest = {"scheme": "exact", "network": "eip155:84532", "asset": BASE_SEPOLIA.token_address, "amount": "20000",
              "pay_to": Account.create().address, "max_timeout_seconds": 300,
              "extra": {"name": "USDC", "version": "2"}}
    for field, value in (("network", "eip155:8453"), ("asset", Account.create().address),
                         ("extra", {"name": "USD Coin", "version": "2"})):
        header = encode_payment_required_header(PaymentRequired(
            accepts=[PaymentRequirements(**{**honest, field: value})]))
        with pytest.raises(SigningRefused) as refusal:
            sign_payment_required(header, Account.create().key.hex(), max_amount_atomic=10**6, network=network,
                                  token_domain=TokenDomain("USDC", "2"))
        assert refusal.value.field.startswith(f"accepts[0].{field}")
