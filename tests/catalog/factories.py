import time

import factory
from django.contrib.auth import get_user_model
from django.utils import timezone
from eth_account import Account

from catalog import services
from catalog.models import Agent


class UserFactory(factory.django.DjangoModelFactory):
    class Meta:
        model = get_user_model()

    username = factory.Sequence(lambda n: f"owner{n}")
    email = factory.LazyAttribute(lambda o: f"{o.username}@example.com")


class AgentFactory(factory.django.DjangoModelFactory):
    class Meta:
        model = Agent

    owner = factory.SubFactory(UserFactory)
    handle = factory.Sequence(lambda n: f"agent-{n:04d}")
    display_name = factory.LazyAttribute(lambda o: o.handle.title())
    wallet_address = factory.LazyFunction(lambda: Account.create().address)
    # As if created with its wallet's proof (POST /agents); None: an agent from before proofs were asked for.
    wallet_proven_at = factory.LazyFunction(timezone.now)
    is_buyer = True
    is_seller = True


def signed_wallet_proof(account, *, handle: str, owner, expires_at: int | None = None,
                        chain_id: int | None = None) -> dict:
    """The `wallet_proof` of POST /agents: `account` signs that it is the wallet of `handle` of `owner` at this
    deployment (its chain, `chain_id` else, and escrow contract; the SDK's `sign_wallet_proof`)."""
    from django.conf import settings

    from sdk import sign_wallet_proof

    return sign_wallet_proof("0x" + bytes(account.key).hex(), chain_id=chain_id or settings.CHAIN_ID,
                             escrow_address=services.wallet_proof_verifying_contract(), handle=handle, owner_id=owner.pk,
                             domain_name=settings.WALLET_PROOF_DOMAIN_NAME,
                             expires_at=expires_at if expires_at is not None else int(time.time()) + 600)


def agent_body(handle: str, *, owner, account=None, roles=("buyer",), **overrides) -> dict:
    """A valid body for POST /agents by `owner`, its wallet (`account`'s, else a new one) proven."""
    account = account or Account.create()
    return {"handle": handle, "display_name": handle, "wallet_address": account.address, "roles": list(roles),
            "wallet_proof": signed_wallet_proof(account, handle=handle, owner=owner), **overrides}


def issue_key(agent, scope="pay") -> str:
    return services.api_key_issue(agent=agent, scope=scope).secret


def issue_owner_token(owner, scope="admin") -> str:
    return services.owner_token_issue(owner=owner, scope=scope).secret


def service_data(**overrides) -> dict:
    """A valid body for POST /agents/services."""
    data = {
        "name": "Fast translator",
        "description": "Translates short texts between forty languages.",
        "tags": ["translation", "nlp"],
        "capability": {"name": "translate", "version": "1.0.0"},
        "author": {"name": "Ada", "organization": "Acme", "contact_email": "ada@example.com"},
        "legal": {"terms": "https://example.com/terms"},
        "example_outputs": [{"name": "sample", "url": "https://example.com/x.json", "mime_type": "application/json"}],
        "pricing": {"type": "per_call", "unit_name": "call", "unit_price_atomic": 20000, "token": "USDC"},
        "upstream_base_url": "https://translator.example.com/api",
        "upstream_protocol": "http",
        "skills": [{"name": "translate", "description": "Translate a text", "price_atomic": 20000}],
    }
    data.update(overrides)
    return data


def register_service(seller: Agent, **overrides):
    """A service registered through the catalog services (same path as the API)."""
    from catalog.serializers import ServiceWriteSerializer

    body = ServiceWriteSerializer(data=service_data(**overrides))
    body.is_valid(raise_exception=True)
    return services.service_register(seller=seller, data=body.validated_data)
