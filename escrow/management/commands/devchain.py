"""Run a local Anvil chain for development: deploy the contracts, fund the demo buyer and the treasury, keep running.

The chain's state is saved to var/anvil-state.json on exit and loaded on the next start, so agreements in the
local database keep matching the chain across restarts.
"""

import signal
import time
from urllib.parse import urlparse

from django.conf import settings
from django.core.management import call_command
from django.core.management.base import BaseCommand
from web3 import Web3

from catalog.management.commands.seed_demo import DEMO_BUYER_WALLET
from escrow import devchain
from marketplace import chainconfig

DEMO_BUYER_USDC = 10_000 * 10**6
# The treasury (the relayer wallet) pays invocation payouts, refunds and returned fees from its USDC float.
DEMO_TREASURY_USDC = 1_000 * 10**6


class Command(BaseCommand):
    help = "Start Anvil on CHAIN_RPC_URL's port, deploy the contracts if needed, fund the demo buyer; stay up."

    def add_arguments(self, parser):
        parser.add_argument("--block-time", type=float, default=devchain.DEV_BLOCK_TIME,
                            help="Seconds between blocks while idle; every transaction is mined at once as well "
                                 f"(default: {devchain.DEV_BLOCK_TIME}, Base's block time).")
        parser.add_argument("--token-name", default=devchain.TOKEN_NAME_BASE,
                            help="MockUSDC's name (and EIP-712 domain name) on a fresh deployment: \"USD Coin\" "
                                 "as on Base (the default) or \"USDC\" as on Base Sepolia.")

    def handle(self, *args, block_time, token_name, **options):
        port = urlparse(settings.CHAIN_RPC_URL).port or 8545
        state = settings.VAR_DIR / "anvil-state.json"
        node = devchain.start_dev_chain(port=port, chain_id=settings.CHAIN_ID, state=state, block_time=block_time)
        self.stdout.write(f"Anvil listening on {node.rpc_url} (chain id {settings.CHAIN_ID})")
        try:
            w3 = Web3(Web3.HTTPProvider(node.rpc_url))
            escrow = chainconfig.deployment().get("escrow")
            if not escrow or w3.eth.get_code(Web3.to_checksum_address(escrow)) in (b"", b"\x00"):
                call_command("deploy_contracts", token_name=token_name, stdout=self.stdout)
                devchain.mint_usdc(w3, chainconfig.usdc_address(), settings.RELAYER_PRIVATE_KEY, DEMO_BUYER_WALLET,
                                   DEMO_BUYER_USDC)
                self.stdout.write(f"Minted {DEMO_BUYER_USDC / 10**6:,.0f} USDC to the demo buyer {DEMO_BUYER_WALLET}")
                devchain.mint_usdc(w3, chainconfig.usdc_address(), settings.RELAYER_PRIVATE_KEY,
                                   chainconfig.relayer_address(), DEMO_TREASURY_USDC)
                self.stdout.write(f"Minted {DEMO_TREASURY_USDC / 10**6:,.0f} USDC to the treasury "
                                  f"{chainconfig.relayer_address()} (its float for payouts and refunds)")
            else:
                self.stdout.write(f"Reusing the deployment in {settings.CHAIN_DEPLOYMENT_FILE}")
            stop = []
            signal.signal(signal.SIGTERM, lambda *_: stop.append(1))
            while not stop and node.running:
                time.sleep(0.5)
        except KeyboardInterrupt:
            pass
        finally:
            node.stop()
