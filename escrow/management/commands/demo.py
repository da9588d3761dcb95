"""`make demo`: the whole money path against the running `make run` stack, played as the two demo agents would.

Search, propose (with a short challenge window), accept, sign and activate the escrow, three metered calls, verify
every receipt, complete, wait out the window, settled; then a direct x402 purchase and a paid skill call. Each step
prints what happened with its transaction hashes, and each phase the on-chain USDC balances of every wallet the
money moves between, with a check that they add up (nothing created or lost).

Dev chains only: it signs with Anvil's public demo buyer key and issues itself fresh demo API keys (the seed's were
shown once). Agents talk to the server over HTTP through the SDK, exactly as an integrator's would.
"""

import logging
import time
from dataclasses import dataclass

from django.conf import settings
from django.core.management.base import BaseCommand, CommandError
from django.db import transaction

from agreements.models import AgreementStatus
from catalog import services as catalog_services
from catalog.models import Agent, ApiKey, KeyScope
from escrow import chain, devchain
from marketplace import chainconfig
from sdk import MarketplaceClient, NetworkConfig

DEMO_KEY_NAME = "make-demo"
USDC = 10**6


@dataclass(frozen=True)
class Wallet:
    label: str
    address: str


class Command(BaseCommand):
    help = "Play the money path end to end against the running stack (dev chain only) and print every step."

    def add_arguments(self, parser):
        parser.add_argument("--url", default="http://127.0.0.1:8000", help="The marketplace's base URL.")
        parser.add_argument("--challenge-window", type=int, default=None,
                            help="Seconds of challenge window (default: the smallest the marketplace allows).")
        parser.add_argument("--calls", type=int, default=3, help="Metered calls to make (default 3).")
        parser.add_argument("--timeout", type=float, default=300.0, help="Seconds to wait for each on-chain step.")

    def handle(self, *args, url, challenge_window, calls, timeout, **options):
        if settings.CHAIN_ID != settings.DEV_CHAIN_ID:
            raise CommandError(f"make demo signs with Anvil's public keys: dev chains only (CHAIN_ID {settings.CHAIN_ID}).")
        self.timeout = timeout
        logging.getLogger("x402").setLevel(logging.WARNING)  # its signer logs every signature at INFO
        buyer_key, seller_key = self._demo_keys()
        # The buyer's SDK checks everything it signs against this configuration. On a dev chain it may be read from
        # the marketplace, by explicit trust; a production agent pins it (README, "Wallet safety").
        # Plain http to a dev stack on another host (a container's name) is allowed: its keys are Anvil's, public.
        network = NetworkConfig.from_marketplace(url, trust_server=True, allow_insecure_http=True)
        self.buyer = MarketplaceClient(url, buyer_key, network=network, rpc_url=settings.CHAIN_RPC_URL,
                                       allow_insecure_http=True)
        self.seller = MarketplaceClient(url, seller_key, allow_insecure_http=True)
        buyer_wallet = self.buyer.me()["wallet_address"]
        self.buyer_private_key = _dev_key_of(buyer_wallet)
        self.wallets = [
            Wallet("buyer (demo-buyer)", buyer_wallet),
            Wallet("seller (demo-seller)", self.seller.me()["wallet_address"]),
            Wallet("escrow contract", chainconfig.escrow_address()),
            Wallet("fee recipient", settings.FEE_RECIPIENT),
            Wallet("treasury (relayer)", chainconfig.relayer_address()),
        ]
        window = challenge_window or settings.CHALLENGE_WINDOW_MIN
        started = time.monotonic()
        before = self._balances("Before")
        agreement_id = self._escrow_walk(window=window, calls=calls)
        after_escrow = self._balances("After the escrow settled", since=before)
        self._direct_purchase()
        self._skill_call()
        self._balances("After the direct purchase and the skill call", since=after_escrow)
        self.stdout.write(self.style.SUCCESS(
            f"\nDone in {time.monotonic() - started:.0f} s: agreement {agreement_id} settled on-chain."))

    # --- the walk ------------------------------------------------------------------------------------------------

    def _seller_wallet(self) -> str:
        """The wallet the buyer expects to pay, named to the SDK (else it warns SellerUnverified): here the demo
        seller's own; a real buyer learns it from the seller, not from the marketplace it checks."""
        return self.wallets[1].address

    def _escrow_walk(self, *, window: int, calls: int) -> str:
        self._step("1. The buyer searches the catalog")
        service = next(self.buyer.search_services("translator"))
        price = service["pricing"]["unit_price_atomic"]
        self._say(f"found '{service['name']}' by {service['seller']['handle']}: {_usdc(price)} per call")

        self._step(f"2. The buyer proposes {calls + 2} calls with a {window} s challenge window; the seller accepts")
        agreement = self.buyer.propose_agreement(service["id"], quantity=calls + 2, max_unit_price_atomic=price,
                                                 challenge_window_seconds=window,
                                                 expected_seller_wallet_address=self._seller_wallet())
        agreement_id = agreement["id"]
        self._say(f"agreement {agreement_id}: deposit {_usdc(agreement['deposit_amount_atomic'])}, "
                  f"fee {_usdc(agreement['infra_fee_atomic'])}")
        self._say(f"status {self.seller.accept_agreement(agreement_id)['status']}")

        self._step("3. The buyer signs the escrow intent and permit with its wallet; the relayer activates on-chain")
        self.buyer.activate_escrow(agreement, self.buyer_private_key)
        active = self.buyer.wait_until(agreement_id, timeout=self.timeout, poll_interval=0.5)
        self._say(f"status {active['status']}, activation tx {active.get('activation_tx_hash') or '-'}")

        self._step(f"4. {calls} metered calls through the proxy, each charged with a signed receipt")
        for number in range(1, calls + 1):
            answer = self.buyer.call_metered(agreement_id, "translate", method="POST",
                                             json={"text": f"hola {number}"})
            self._say(f"call {number}: HTTP {answer.status_code}, cost {_usdc(int(answer.headers['X-Usage-Cost']))}, "
                      f"escrow remaining {_usdc(int(answer.headers['X-Escrow-Remaining']))}")
        verified = self.buyer.verify_usage(agreement)
        self._say(f"the buyer verified {verified.events} receipts against the on-chain receipt signer: "
                  f"{_usdc(verified.cumulative_amount)} used")

        self._step("5. The buyer completes; the relayer proposes the settlement and the challenge window opens")
        in_challenge = self.buyer.complete(agreement_id, wait=True, timeout=self.timeout, poll_interval=0.5)
        self._say(f"status {in_challenge['status']}, deadline {in_challenge.get('challenge_deadline') or '-'}")

        self._step("6. Nobody challenges: after the window the platform finalizes and pays both parties")
        settled = self.buyer.wait_until(agreement_id, statuses={AgreementStatus.SETTLED},
                                        failure={AgreementStatus.DISPUTED}, timeout=window + self.timeout,
                                        poll_interval=1.0)
        self._say(f"status {settled['status']}: seller paid {_usdc(settled.get('seller_payout_atomic') or 0)}, "
                  f"buyer refunded {_usdc(settled.get('buyer_refund_atomic') or 0)}")
        for tx in self.buyer.escrow_status(agreement_id).get("transactions", []):
            self._say(f"  {tx['purpose']:<20} {tx['status']:<10} {tx.get('tx_hash') or '-'}")
        return agreement_id

    def _direct_purchase(self) -> None:
        self._step("7. A direct one-off purchase (x402 authorization + fee permit, no escrow); the seller accepts")
        service = next(self.buyer.search_services("translator"))
        proposed = self.buyer.propose_direct_purchase(service["id"], 1, wallet=self.buyer_private_key,
                                                      max_unit_price_atomic=service["pricing"]["unit_price_atomic"],
                                                      expected_seller_wallet_address=self._seller_wallet())
        self.seller.accept_agreement(proposed["id"])
        paid = self.buyer.wait_until(proposed["id"], statuses={AgreementStatus.PAID},
                                     failure={AgreementStatus.PAYMENT_FAILED}, timeout=self.timeout,
                                     poll_interval=0.5)
        self._say(f"agreement {paid['id']} {paid['status']}")

    def _skill_call(self) -> None:
        self._step("8. A paid skill call: POST /agents/demo-seller/translate answers 402, the buyer pays with x402")
        answer = self.buyer.invoke_skill("demo-seller", "translate", {"text": "hola"},
                                         private_key=self.buyer_private_key, max_amount_atomic=USDC,
                                         timeout=self.timeout)
        payment = answer.get("payment") or {}
        self._say(f"answer {str(answer.get('result'))[:60]}, paid with tx {payment.get('tx_hash') or '-'}")

    # --- helpers -------------------------------------------------------------------------------------------------

    def _demo_keys(self) -> tuple[str, str]:
        """Fresh API keys for the demo agents (the previous demo run's are revoked)."""
        with transaction.atomic():
            agents = {agent.handle: agent for agent in Agent.objects.filter(handle__in=["demo-buyer", "demo-seller"])}
            if len(agents) != 2:
                raise CommandError("No demo agents: run `make run` (it seeds them) first.")
            for key in ApiKey.objects.filter(agent__in=agents.values(), name=DEMO_KEY_NAME, revoked_at=None):
                catalog_services.credential_revoke(credential=key)
            buyer = catalog_services.api_key_issue(agent=agents["demo-buyer"], scope=KeyScope.PAY, name=DEMO_KEY_NAME)
            seller = catalog_services.api_key_issue(agent=agents["demo-seller"], scope=KeyScope.ADMIN,
                                                    name=DEMO_KEY_NAME)
        return buyer.secret, seller.secret

    def _balances(self, title: str, since: dict[str, int] | None = None) -> dict[str, int]:
        token = chain.token_contract()
        balances = {w.address: chain.call(lambda a=w.address: token.functions.balanceOf(a).call())
                    for w in self.wallets}
        self._step(f"USDC balances on-chain: {title}")
        for wallet in self.wallets:
            change = "" if since is None else f"   {_signed_usdc(balances[wallet.address] - since[wallet.address])}"
            self._say(f"{wallet.label:<22} {wallet.address}  {_usdc(balances[wallet.address]):>16}{change}")
        if since is not None:
            net = sum(balances.values()) - sum(since.values())
            verdict = "they add up: no USDC created or lost" if net == 0 else f"net change {_signed_usdc(net)}!"
            self._say(f"sum of the changes: {_signed_usdc(net)} ({verdict})")
            if net:
                raise CommandError("The balances do not add up.")
        return balances

    def _step(self, text: str) -> None:
        self.stdout.write(self.style.MIGRATE_HEADING(f"\n{text}"))

    def _say(self, text: str) -> None:
        self.stdout.write(f"   {text}")


def _dev_key_of(address: str) -> str:
    for key, dev_address in zip(devchain.DEV_PRIVATE_KEYS, devchain.DEV_ADDRESSES, strict=True):
        if dev_address.lower() == address.lower():
            return key
    raise CommandError(f"The demo buyer's wallet {address} is not one of Anvil's dev accounts.")


def _usdc(amount: int) -> str:
    """Base units as USDC, exactly (integer arithmetic: 1234567 -> "1.234567 USDC")."""
    sign = "-" if amount < 0 else ""
    whole, fraction = divmod(abs(amount), USDC)
    return f"{sign}{whole:,}.{fraction:06d} USDC"


def _signed_usdc(amount: int) -> str:
    return ("+" if amount > 0 else "") + _usdc(amount)
