"""`make demo`: the whole money path as two agents play it, against the running `make run` stack.

The demo buyer and seller act only through the public API with the Python SDK, the buyer signing with its own
wallet key (Anvil account #1) on this machine: search, propose, accept, sign and activate the escrow, metered calls,
verify the receipts, complete, the challenge window, settled; then a direct x402 purchase and a paid skill call.
Each step prints its transaction hash; USDC balances are read from the chain before and after, and the changes
must add up (what the buyer spent is what the others received).

The command issues the two agents short-lived API keys of their own and revokes them at the end, so the demo keys
printed by the seed keep working.
"""

import time
from datetime import timedelta
from decimal import Decimal

from django.conf import settings
from django.core.management.base import BaseCommand, CommandError
from django.utils import timezone
from web3 import Web3

from catalog import services
from catalog.management.commands.seed_demo import DEMO_WALLETS
from catalog.models import Agent, KeyScope
from marketplace import chainconfig, money
from sdk.client import MarketplaceClient

# What the demo reads of the token: balances, and the permit nonce the direct purchase's fee permit signs.
_TOKEN_ABI = [
    {"name": "balanceOf", "type": "function", "stateMutability": "view",
     "inputs": [{"name": "account", "type": "address"}], "outputs": [{"name": "", "type": "uint256"}]},
    {"name": "nonces", "type": "function", "stateMutability": "view",
     "inputs": [{"name": "owner", "type": "address"}], "outputs": [{"name": "", "type": "uint256"}]},
]
BUYER_WALLET = next(wallet for wallet in DEMO_WALLETS if wallet.role == "demo-buyer")


def usdc(amount) -> str:
    return money.token_units(int(amount))


def short(value: str) -> str:
    return f"{value[:10]}…{value[-6:]}" if value and len(value) > 20 else (value or "-")


class Command(BaseCommand):
    help = "Play the money path as a buyer and a seller agent would, against the running stack (`make run`)."

    def add_arguments(self, parser):
        parser.add_argument("--url", default="http://127.0.0.1:8000", help="The running marketplace.")
        parser.add_argument("--service", default="Fast translator", help="What the buyer searches for.")
        parser.add_argument("--calls", type=int, default=3, help="Metered calls to make (of 5 bought).")
        parser.add_argument("--challenge-window", type=int, default=settings.CHALLENGE_WINDOW_MIN,
                            help="Seconds the buyer may dispute the settlement (the smallest allowed by default).")
        parser.add_argument("--timeout", type=float, default=300.0, help="Seconds to wait for any one step.")

    def handle(self, *args, url, service, calls, challenge_window, timeout, **options):
        self.url = url
        try:
            buyer = Agent.objects.get(handle="demo-buyer")
            seller = Agent.objects.get(handle="demo-seller")
        except Agent.DoesNotExist:
            raise CommandError("No demo agents: run `manage.py seed_demo` (make run does) first.") from None
        keys = [services.api_key_issue(agent=buyer, scope=KeyScope.PAY, name="make demo",
                                       expires_at=timezone.now() + timedelta(hours=1)),
                services.api_key_issue(agent=seller, scope=KeyScope.ADMIN, name="make demo",
                                       expires_at=timezone.now() + timedelta(hours=1))]
        try:
            with (MarketplaceClient(url, keys[0].secret) as buyer_api,
                  MarketplaceClient(url, keys[1].secret) as seller_api):
                self.play(buyer_api, seller_api, service_name=service, calls=calls, window=challenge_window,
                          timeout=timeout)
        finally:
            for key in keys:
                services.credential_revoke(credential=key.credential)

    # --- the story -------------------------------------------------------------------------------------------------

    def step(self, text: str) -> None:
        self.step_number = getattr(self, "step_number", 0) + 1
        self.stdout.write(f"{self.step_number:>2}. {text}")

    def detail(self, text: str) -> None:
        self.stdout.write(f"      {text}")

    def play(self, buyer_api: MarketplaceClient, seller_api: MarketplaceClient, *, service_name: str, calls: int,
             window: int, timeout: float) -> None:
        w3 = Web3(Web3.HTTPProvider(settings.CHAIN_RPC_URL))
        token = w3.eth.contract(address=Web3.to_checksum_address(chainconfig.usdc_address()), abi=_TOKEN_ABI)
        fee_recipient = buyer_api.payment_requirements(amount_atomic=1)["fee_recipient"]
        seller_wallet = seller_api.me()["wallet_address"]
        roles = {"buyer": BUYER_WALLET.address, "seller": seller_wallet, "fee recipient": fee_recipient,
                 "treasury": chainconfig.relayer_address(), "escrow": chainconfig.escrow_address()}
        holders: dict[str, str] = {}  # label -> address; one wallet in two roles is counted once
        for role, address in roles.items():
            address = Web3.to_checksum_address(address)
            label = next((name for name, known in holders.items() if known == address), None)
            if label is None:
                holders[role] = address
            else:
                holders[f"{label} = {role}"] = holders.pop(label)

        def balances() -> dict[str, int]:
            return {name: token.functions.balanceOf(address).call() for name, address in holders.items()}

        self.stdout.write(self.style.MIGRATE_HEADING(
            f"Two agents, one escrow: {self.url} on chain {w3.eth.chain_id}"))
        self.stdout.write(f"    buyer demo-buyer, wallet {BUYER_WALLET.address} (Anvil #{BUYER_WALLET.anvil_account}, "
                          f"signs here); seller demo-seller, wallet {seller_wallet}")
        before = balances()
        self.write_balances("USDC before", before)

        found = next(iter(buyer_api.search_services(service_name, page_size=1)), None)
        if found is None:
            raise CommandError(f"No service found for {service_name!r}.")
        price = int(found["pricing"]["unit_price_atomic"])
        self.step(f'buyer searches "{service_name}": {found["name"]} by {found["seller"]["handle"]}, '
                  f"{usdc(price)} per {found['pricing']['unit_name']}")

        agreement = buyer_api.propose_agreement(found["id"], 5, challenge_window_seconds=window)
        agreement_id = agreement["id"]
        self.step(f"buyer proposes 5 calls: deposit {usdc(agreement['deposit_amount_atomic'])}, platform fee "
                  f"{usdc(agreement['infra_fee_atomic'])}, challenge window {window} s -> agreement "
                  f"{agreement_id[:8]}… {agreement['status']}")
        self.step(f"seller accepts -> {seller_api.accept_agreement(agreement_id)['status']}")

        buyer_api.activate_escrow(agreement_id, BUYER_WALLET.private_key)
        active = buyer_api.wait_until(agreement_id, timeout=timeout, poll_interval=0.5)
        self.step(f"buyer signs the activation intent and permits with its wallet, the relayer submits them -> "
                  f"{active['status']}")
        self.detail(f"activation tx {active['activation_tx_hash']}")

        for _ in range(calls):
            answer = buyer_api.call_metered(agreement_id, "/translate", method="POST", json={"text": "hello"})
            self.step(f"metered call -> HTTP {answer.status_code}, cost {usdc(answer.headers['X-Usage-Cost'])}, "
                      f"{usdc(answer.headers['X-Escrow-Remaining'])} left in escrow")

        verified = buyer_api.verify_usage(agreement_id)
        self.step(f"buyer verifies {verified.events} receipts (sequence, sums, digest chain, signatures by the "
                  f"contract's receipt signer): {usdc(verified.cumulative_amount)} used")

        buyer_api.complete(agreement_id, reason="demo done")
        proposed = buyer_api.wait_until(agreement_id, statuses={"in_challenge"}, timeout=timeout, poll_interval=0.5)
        status = buyer_api.escrow_status(agreement_id)
        self.step(f"buyer completes: the settlement of {usdc(proposed['used_atomic'])} is proposed on-chain -> "
                  f"{proposed['status']} until {proposed['challenge_deadline']}")
        self.detail(f"proposal tx {self.tx_of(status, 'propose_settlement')}")

        self.step(f"waiting for the challenge window ({window} s) to close and the finalize transaction…")
        settled = buyer_api.wait_until(agreement_id, statuses={"settled"}, failure={"disputed"},
                                       timeout=window + timeout, poll_interval=1.0)
        status = buyer_api.escrow_status(agreement_id, verify=True)
        self.detail(f"-> {settled['status']}: seller paid {usdc(settled['seller_payout_atomic'])}, buyer refunded "
                    f"{usdc(settled['buyer_refund_atomic'])}; on-chain state {status['onchain']['state']}")
        self.detail(f"finalize tx {self.tx_of(status, 'finalize')}")

        direct = buyer_api.propose_direct_purchase(found["id"], 1, private_key=BUYER_WALLET.private_key,
                                                   permit_nonce=token.functions.nonces(BUYER_WALLET.address).call())
        seller_api.accept_agreement(direct["id"])
        paid = buyer_api.wait_until(direct["id"], statuses={"paid"}, failure={"payment_failed"}, timeout=timeout,
                                    poll_interval=0.5)
        self.step(f"direct x402 purchase of 1 call: {usdc(paid['deposit_amount_atomic'])} to the seller, fee "
                  f"{usdc(paid['infra_fee_atomic'])} -> {paid['status']}")
        self.detail(f"payment tx {paid['payment_tx_hash']}")
        self.detail(f"fee tx {paid['fee_tx_hash']}")

        skill = found["skills"][0]["name"] if found.get("skills") else "translate"
        invoked = buyer_api.invoke_skill(found["seller"]["handle"], skill, {"text": "hello"},
                                         private_key=BUYER_WALLET.private_key, max_amount_atomic=10**6,
                                         timeout=timeout)
        self.step(f"paid skill call {found['seller']['handle']}/{skill}: {invoked['payment']['amount']} "
                  f"{invoked['payment']['currency']} -> {invoked.get('status', 'completed')}")
        self.detail(f"payment tx {invoked['payment']['tx_hash']}")
        payout = self.wait_for_payout(buyer_api, invoked["invocation_id"], timeout)
        self.detail(f"payout to the seller tx {payout['payment']['settlement_tx_hash']}")

        after = balances()
        self.write_balances("USDC after", after)
        changes = {name: after[name] - before[name] for name in holders}
        self.write_balances("change", changes, signed=True)
        if sum(changes.values()) != 0:
            raise CommandError(f"The balance changes do not add up: {changes}")
        self.stdout.write(self.style.SUCCESS("The changes add up: what the buyer paid, the others received."))

    def wait_for_payout(self, buyer_api: MarketplaceClient, invocation_id: str, timeout: float) -> dict:
        deadline = time.monotonic() + timeout
        while True:
            invocation = buyer_api.get_invocation(invocation_id)
            if invocation["payment"]["status"] in ("paid_out", "refunded") or time.monotonic() > deadline:
                return invocation
            time.sleep(0.5)

    @staticmethod
    def tx_of(status: dict, purpose: str) -> str:
        return next((tx["tx_hash"] for tx in status["transactions"] if tx["purpose"] == purpose), "-")

    def write_balances(self, title: str, balances: dict[str, int], *, signed: bool = False) -> None:
        cells = []
        for name, amount in balances.items():
            text = f"{Decimal(amount).scaleb(-6):+,.6f}" if signed else f"{Decimal(amount).scaleb(-6):,.6f}"
            cells.append(f"{name} {text}")
        self.stdout.write(f"    {title:12} " + " | ".join(cells))
