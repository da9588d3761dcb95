"""Demo data for `make run`: an owner, a buyer and a seller agent with keys (printed once), a few services."""

from django.contrib.auth import get_user_model
from django.core.management.base import BaseCommand
from django.db import transaction

from catalog import services
from catalog.models import Agent, KeyScope

# Anvil's well-known development accounts #1 and #2 (public test keys, funded only on local dev chains).
DEMO_BUYER_WALLET = "0x70997970C51812dc3A010C7d01b50e0d17dc79C8"
DEMO_SELLER_WALLET = "0x3C44CdDdB6a900fa2b585dd299e03d12FA4293BC"

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


class Command(BaseCommand):
    help = "Create the demo owner, agents, keys and services (once; keys are printed only when created)."

    def add_arguments(self, parser):
        parser.add_argument("--upstream", default="http://127.0.0.1:8001", help="Base URL of the demo seller.")

    @transaction.atomic
    def handle(self, *args, upstream, **options):
        if Agent.objects.filter(handle="demo-buyer").exists():
            self.stdout.write("Demo data already present (keys were printed when it was created).")
            return
        user_model = get_user_model()
        owner = user_model.objects.create_superuser("demo", "demo@example.com", "demo-password")
        buyer = services.agent_create(owner=owner, handle="demo-buyer", display_name="Demo buyer",
                                      wallet_address=DEMO_BUYER_WALLET, is_buyer=True)
        seller = services.agent_create(owner=owner, handle="demo-seller", display_name="Demo seller",
                                       wallet_address=DEMO_SELLER_WALLET, is_buyer=False, is_seller=True)
        for data in DEMO_SERVICES:
            services.service_register(seller=seller, data={"upstream_base_url": upstream, **data})
        lines = [
            ("Admin login", "demo / demo-password  (http://127.0.0.1:8000/admin/)"),
            ("Owner token", services.owner_token_issue(owner=owner, name="demo").secret),
            ("Buyer key (demo-buyer)", services.api_key_issue(agent=buyer, scope=KeyScope.PAY, name="demo").secret),
            ("Seller key (demo-seller)",
             services.api_key_issue(agent=seller, scope=KeyScope.ADMIN, name="demo").secret),
        ]
        self.stdout.write(self.style.SUCCESS("Demo data created. Secrets are shown only now:"))
        for label, value in lines:
            self.stdout.write(f"  {label:26} {value}")
