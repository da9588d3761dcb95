"""Deploy UsageEscrow (and MockUSDC on dev chains) to CHAIN_RPC_URL and record the addresses."""

import json

from django.conf import settings
from django.core.management.base import BaseCommand, CommandError
from eth_account import Account
from web3 import Web3

from escrow import chain, devchain
from marketplace.chainconfig import relayer_address


def write_deployment(addresses: dict, *, chain_id: int) -> None:
    """The addresses and the chain, not the node's URL: an RPC provider's holds its key, and nothing reads it here."""
    settings.CHAIN_DEPLOYMENT_FILE.parent.mkdir(parents=True, exist_ok=True)
    settings.CHAIN_DEPLOYMENT_FILE.write_text(json.dumps({"chain_id": chain_id, **addresses}, indent=2) + "\n")


class Command(BaseCommand):
    help = "Deploy the escrow contracts to CHAIN_RPC_URL; writes the addresses to CHAIN_DEPLOYMENT_FILE."

    def add_arguments(self, parser):
        parser.add_argument("--deployer-key", help="Private key paying for deployment (default: the relayer's).")
        parser.add_argument("--usdc", help="Existing USDC address (production). Without it MockUSDC is deployed.")
        parser.add_argument("--arbiter", help="Dispute arbiter address (default: the deployer).")
        parser.add_argument("--reclaim-grace", type=int, default=24 * 3600)
        parser.add_argument("--token-name", default=devchain.TOKEN_NAME_BASE,
                            help="MockUSDC's name and EIP-712 domain name: \"USD Coin\" (Base's, the default) or "
                                 "\"USDC\" (Base Sepolia's, which x402's and Pægents' clients sign for there).")

    def handle(self, *args, deployer_key, usdc, arbiter, reclaim_grace, token_name, **options):
        key = deployer_key or settings.RELAYER_PRIVATE_KEY
        if not key:
            raise CommandError("No deployer key: pass --deployer-key or set RELAYER_PRIVATE_KEY.")
        w3 = Web3(Web3.HTTPProvider(settings.CHAIN_RPC_URL))
        if not w3.is_connected():
            # The URL without its key (path, query, user info), as every chain error names it (chain.redacted).
            raise CommandError(f"No chain answers at {chain.redacted(settings.CHAIN_RPC_URL)}.")
        if w3.eth.chain_id != settings.CHAIN_ID:
            raise CommandError(f"The node's chain id is {w3.eth.chain_id}, CHAIN_ID says {settings.CHAIN_ID}.")
        from agreements.services import fee_recipient

        deployer = Account.from_key(key).address
        addresses = devchain.deploy_contracts(
            w3, key, fee_recipient=fee_recipient(), arbiter=arbiter or deployer, reclaim_grace=reclaim_grace,
            operator=relayer_address(), usdc_address=usdc, token_name=token_name,
        )
        write_deployment(addresses, chain_id=settings.CHAIN_ID)
        self.stdout.write(self.style.SUCCESS(f"Deployed: {json.dumps(addresses)} -> {settings.CHAIN_DEPLOYMENT_FILE}"))
