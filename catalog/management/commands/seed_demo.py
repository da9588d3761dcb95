"""Demo data for `make run`: an owner, a buyer and a seller agent with keys, a few services.

Secrets are stored hashed, so the keys and the admin's password are printed once, when made; `manage.py demo_keys
--reissue` revokes them and prints new ones. The password is random: a known one would be an open superuser
wherever the seed ran by mistake. On the local dev chain the demo agents use Anvil's public development accounts,
whose private keys every Anvil user knows, and the seed prints them; on any other chain each demo agent gets a wallet of
its own, made here, whose key is printed once with the other secrets (fund it yourself).
"""

import secrets
import time

from django.conf import settings
from django.contrib.auth import get_user_model
from django.core.management.base import BaseCommand
from django.db import transaction
from eth_account import Account
from eth_account.signers.local import LocalAccount

from catalog import services
from catalog.models import Agent, ApiKey, KeyScope, OwnerScope, OwnerToken
from marketplace.demo_wallets import DEMO_WALLETS
from sdk import sign_wallet_proof

DEMO_KEY_NAME = "demo"

DEMO_SERVICES = [
    {
        "name": "Fast translator",
        "description": "Translates short texts between forty languages with glossary support.",
        "tags": ["translation", "nlp", "text"],
        "capability": {"name": "translate", "version": "1.2.0"},
        "pricing": {"type": "per_call", "unit_name": "call", "unit_price_atomic": 20_000, "token": "USDC"},
        "skills": [{"name": "translate", "description": "Translate a text", "price": 20_000, "path": "",
                    "is_async": False, "timeout_seconds": 30}],
    },
    {
        "name": "Invoice extractor",
        "description": "Extracts line items, totals and VAT numbers from PDF invoices.",
        "tags": ["documents", "ocr", "finance"],
        "capability": {"name": "extract-invoice", "version": "2.0.1"},
        "pricing": {"type": "per_unit", "unit_name": "page", "unit_price_atomic": 5_000, "token": "USDC"},
    },
    {
        "name": "Market research crew",
        "description": "A crew of agents that writes a market research brief on a topic (Masumi job API).",
        "tags": ["research", "writing"],
        "capability": {"name": "research-brief", "version": "0.9.0"},
        "pricing": {"type": "per_call", "unit_name": "job", "unit_price_atomic": 1_500_000, "token": "USDC"},
        "upstream_protocol": "masumi",
    },
]


def demo_credentials_issue() -> list[tuple[str, str]]:
    """Revoke the demo owner's and agents' live demo credentials and issue new ones, the admin's password too:
    (label, secret) lines."""
    owner = get_user_model().objects.get(username="demo")
    password = secrets.token_urlsafe(12)
    owner.set_password(password)
    owner.save(update_fields=["password"])
    buyer, seller = Agent.objects.get(handle="demo-buyer"), Agent.objects.get(handle="demo-seller")
    for credential in [*ApiKey.objects.filter(agent__in=[buyer, seller], name=DEMO_KEY_NAME, revoked_at=None),
                       *OwnerToken.objects.filter(owner=owner, name=DEMO_KEY_NAME, revoked_at=None)]:
        services.credential_revoke(credential=credential)
    return [
        ("Admin login", f"demo / {password}  (http://127.0.0.1:8000/admin/)"),
        ("Owner token", services.owner_token_issue(owner=owner, scope=OwnerScope.ADMIN,
                                                        name=DEMO_KEY_NAME).secret),
        ("Buyer key (demo-buyer)",
         services.api_key_issue(agent=buyer, scope=KeyScope.PAY, name=DEMO_KEY_NAME).secret),
        ("Seller key (demo-seller)",
         services.api_key_issue(agent=seller, scope=KeyScope.ADMIN, name=DEMO_KEY_NAME).secret),
    ]


def demo_wallet_lines() -> list[str]:
    """The demo wallets with their keys, on the local dev chain only (elsewhere nothing: real keys stay secret)."""
    if settings.CHAIN_ID != settings.DEV_CHAIN_ID:
        return []
    return [f"  Anvil #{w.anvil_account}  {w.address}  key {w.private_key}  {w.role}" for w in DEMO_WALLETS]


def write_credentials(stdout, style, lines: list[tuple[str, str]]) -> None:
    stdout.write(style.SUCCESS("Secrets are shown only now (`manage.py demo_keys --reissue` makes new ones):"))
    for label, value in lines:
        stdout.write(f"  {label:26} {value}")
    wallets = demo_wallet_lines()
    if wallets:
        stdout.write(style.SUCCESS(f"Demo wallets on the local dev chain (chain id {settings.DEV_CHAIN_ID}; Anvil's public "
                                   "development keys, never for a real chain):"))
        for line in wallets:
            stdout.write(line)


class Command(BaseCommand):
    help = "Create the demo owner, agents, keys and services (once; keys are printed only when created)."

    def add_arguments(self, parser):
        parser.add_argument("--upstream", default="http://127.0.0.1:8001", help="Base URL of the demo seller.")

    @transaction.atomic
    def handle(self, *args, upstream, **options):
        if Agent.objects.filter(handle="demo-buyer").exists():
            self.stdout.write("Demo data already present; its keys were printed when it was created. "
                              "`manage.py demo_keys --reissue` revokes them and prints new ones.")
            for line in demo_wallet_lines():
                self.stdout.write(line)
            return
        user_model = get_user_model()
        owner = user_model.objects.create_superuser("demo", "demo@example.com", None)  # its password: issued below
        buyer_wallet, seller_wallet, wallet_keys = _demo_agent_wallets()
        services.agent_create(owner=owner, handle="demo-buyer", display_name="Demo buyer",
                              wallet_address=buyer_wallet.address,
                              wallet_proof=_wallet_proof(buyer_wallet, handle="demo-buyer", owner=owner), is_buyer=True)
        seller = services.agent_create(owner=owner, handle="demo-seller", display_name="Demo seller",
                                       wallet_address=seller_wallet.address,
                                       wallet_proof=_wallet_proof(seller_wallet, handle="demo-seller", owner=owner),
                                       is_buyer=False, is_seller=True)
        for data in DEMO_SERVICES:
            services.service_register(seller=seller, data={"upstream_base_url": upstream, **data})
        self.stdout.write(self.style.SUCCESS("Demo data created."))
        write_credentials(self.stdout, self.style, demo_credentials_issue() + wallet_keys)


def _wallet_proof(wallet: LocalAccount, *, handle: str, owner) -> services.WalletProof:
    """The wallet's proof that it is the demo agent `handle`'s, as an owner makes it (the SDK's)."""
    proof = sign_wallet_proof(bytes(wallet.key), chain_id=settings.CHAIN_ID,
                              escrow_address=services.wallet_proof_verifying_contract(), handle=handle,
                              owner_id=owner.pk, expires_at=int(time.time()) + 600,
                              domain_name=settings.WALLET_PROOF_DOMAIN_NAME)
    return services.WalletProof(signature=str(proof["signature"]), expires_at=int(proof["expires_at"]))


def _demo_agent_wallets() -> tuple[LocalAccount, LocalAccount, list[tuple[str, str]]]:
    """The demo buyer's and seller's wallets (each signs its agent's wallet proof), and the lines printing their
    keys: Anvil's public accounts on the dev chain (`make demo` signs with them; printed with the dev wallets), new
    wallets anywhere else, where a published key would let anyone take what the wallet holds or is paid."""
    if settings.CHAIN_ID == settings.DEV_CHAIN_ID:
        return Account.from_key(DEMO_WALLETS[1].private_key), Account.from_key(DEMO_WALLETS[2].private_key), []
    buyer, seller = Account.create(), Account.create()
    return buyer, seller, [("Buyer wallet key", f"{buyer.key.to_0x_hex()}  {buyer.address}"),
                                           ("Seller wallet key", f"{seller.key.to_0x_hex()}  {seller.address}")]
