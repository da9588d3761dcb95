import factory
from django.contrib.auth import get_user_model
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
    is_buyer = True
    is_seller = True


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
