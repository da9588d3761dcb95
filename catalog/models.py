import secrets
import uuid
from typing import ClassVar

from django.conf import settings
from django.contrib.postgres.search import SearchVectorField
from django.core.validators import MinLengthValidator, RegexValidator
from django.db import models
from django.db.models import F, Q

from marketplace.fields import AddressField, TokenAmountField


def new_proxy_secret() -> str:
    return f"psk_{secrets.token_urlsafe(32)}"


HANDLE_PATTERN = r"[a-z0-9](?:[a-z0-9-]{1,62}[a-z0-9])"  # also the skill route's (escrow/urls.py)
SKILL_NAME_PATTERN = r"[a-z0-9](?:[a-z0-9-]{0,62}[a-z0-9])?"
HANDLE_VALIDATOR = RegexValidator(
    rf"^{HANDLE_PATTERN}$",
    "3-64 characters: lowercase letters, digits and inner hyphens.",
    code="invalid_handle",
)
SKILL_NAME_VALIDATOR = RegexValidator(
    rf"^{SKILL_NAME_PATTERN}$",
    "1-64 characters: lowercase letters, digits and inner hyphens.",
    code="invalid_skill_name",
)


class Agent(models.Model):
    """A software identity that buys and/or sells; belongs to one owner (a Django user)."""

    id = models.UUIDField(primary_key=True, default=uuid.uuid4, editable=False)
    owner = models.ForeignKey(settings.AUTH_USER_MODEL, on_delete=models.PROTECT, related_name="agents")
    handle = models.CharField(max_length=64, unique=True, validators=[HANDLE_VALIDATOR])
    # Also checked where the API writes it (catalog.services); this check is the admin form's.
    display_name = models.CharField(max_length=120)
    wallet_address = AddressField()
    # When the wallet signed that it is this agent's (catalog.services.agent_create); null for agents created before
    # proofs were asked for, which nothing finds by that wallet (the registry's filter, the Masumi registration).
    wallet_proven_at = models.DateTimeField(null=True, blank=True, editable=False)
    is_buyer = models.BooleanField(default=True)
    is_seller = models.BooleanField(default=False)
    is_active = models.BooleanField(default=True)
    # The owner's is_active, kept in step by the database whatever writes the user or the agent (triggers: migration
    # catalog 0018): the catalog search's statement reads it on the agent's row it already joins, instead of joining
    # the owners.
    owner_is_active = models.BooleanField(
        default=True, editable=False,
        help_text="Whether the owner's account is active: an agent of a deactivated owner sells nothing, as a "
                  "deactivated agent (hidden from search, its skills 404, its services refused).")
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        ordering = ["handle"]
        # The operators' search by wallet (marketplace.admin.IndexedSearch).
        indexes = [models.Index(fields=["wallet_address"], name="agent_wallet_idx")]

    @property
    def sells(self) -> bool:
        """Whether its services may be found and bought: it and its owner are active."""
        return self.is_active and self.owner_is_active

    def __str__(self) -> str:
        return self.handle

    @property
    def roles(self) -> list[str]:
        return [role for role, held in (("buyer", self.is_buyer), ("seller", self.is_seller)) if held]


class KeyScope(models.TextChoices):
    """Hierarchical, as in the Masumi payment node: admin includes pay, pay includes read."""

    READ = "read"
    PAY = "pay"
    ADMIN = "admin"


SCOPE_RANK = {KeyScope.READ: 0, KeyScope.PAY: 1, KeyScope.ADMIN: 2}


class OwnerScope(models.TextChoices):
    """An owner token's powers, hierarchical: admin (agents, keys, policies, webhooks, tokens) includes approve
    (deciding held purchases), approve includes read."""

    READ = "read"
    APPROVE = "approve"
    ADMIN = "admin"


OWNER_SCOPE_RANK = {OwnerScope.READ: 0, OwnerScope.APPROVE: 1, OwnerScope.ADMIN: 2}
# What an owner token needs on a route an agent's key of the given scope may call (catalog.authentication.agent_or_owner).
OWNER_SCOPE_OF_KEY_SCOPE = {KeyScope.READ: OwnerScope.READ, KeyScope.PAY: OwnerScope.APPROVE,
                            KeyScope.ADMIN: OwnerScope.ADMIN}


class BearerSecret(models.Model):
    name = models.CharField(max_length=100, blank=True)
    prefix = models.CharField(max_length=16, unique=True, editable=False)
    secret_digest = models.CharField(max_length=64, editable=False)
    created_at = models.DateTimeField(auto_now_add=True)
    expires_at = models.DateTimeField(null=True, blank=True)
    revoked_at = models.DateTimeField(null=True, blank=True)
    last_used_at = models.DateTimeField(null=True, blank=True, editable=False)
    scope_rank: ClassVar[dict[str, int]]  # of the `scope` field each subclass declares

    class Meta:
        abstract = True

    @property
    def scopes(self) -> list[str]:
        return [scope for scope, rank in self.scope_rank.items() if rank <= self.scope_rank[self.scope]]

    def grants(self, scope: str) -> bool:
        return self.scope_rank[self.scope] >= self.scope_rank[scope]


class ApiKey(BearerSecret):
    agent = models.ForeignKey(Agent, on_delete=models.CASCADE, related_name="api_keys")
    scope = models.CharField(max_length=8, choices=KeyScope.choices, default=KeyScope.PAY)
    scope_rank = SCOPE_RANK
    # The owner token the key was issued with (None: an operator's command, an admin session, or issued before this
    # was recorded): revoking that token revokes the key (catalog.services.credential_revoke).
    issued_with = models.ForeignKey("OwnerToken", null=True, blank=True, editable=False, on_delete=models.SET_NULL,
                                    related_name="issued_keys")

    class Meta:
        verbose_name = "API key"
        indexes = [
            # The owner's listing (catalog.selectors.api_keys_of_agent), a page at a time: unrevoked keys by
            # default, every key on request (revoked keys are kept for ever, so both are read by range).
            models.Index(fields=["agent", "-created_at", "-id"], condition=models.Q(revoked_at=None),
                         name="catalog_apikey_live_listing"),
            models.Index(fields=["agent", "-created_at", "-id"], name="catalog_apikey_listing"),
        ]

    def __str__(self) -> str:
        return f"mk_{self.prefix}… ({self.agent.handle})"


class OwnerToken(BearerSecret):
    """Lets an owner (a person) act through the API: agents, keys, policies, approvals, within its scope."""

    owner = models.ForeignKey(settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="owner_tokens")
    # Tokens issued before scopes existed could do everything: they keep `admin`.
    scope = models.CharField(max_length=8, choices=OwnerScope.choices, default=OwnerScope.ADMIN)
    scope_rank = OWNER_SCOPE_RANK
    # The token this one was issued with (None: an operator's command, an admin session, or issued before this was
    # recorded): revoking that token revokes this one, and what this one issued (catalog.services.credential_revoke).
    issued_with = models.ForeignKey("self", null=True, blank=True, editable=False, on_delete=models.SET_NULL,
                                    related_name="issued_tokens")

    class Meta:
        indexes = [models.Index(fields=["owner", "-created_at", "-id"], name="catalog_ownertoken_listing")]

    def __str__(self) -> str:
        return f"ot_{self.prefix}… ({self.owner})"


class Tag(models.Model):
    name = models.CharField(max_length=50, unique=True)

    class Meta:
        ordering = ["name"]

    def __str__(self) -> str:
        return self.name


class PricingType(models.TextChoices):
    PER_CALL = "per_call"
    PER_UNIT = "per_unit"


class UpstreamProtocol(models.TextChoices):
    HTTP = "http"
    MASUMI = "masumi"


class MasumiProtocolVersion(models.TextChoices):
    """Which MIP-003 a `masumi` seller speaks (escrow.purchases calls its /start_job and /status accordingly)."""
    SEED = "1", "1: the seed's MIP-003, {input_data} -> {job_id, payment_id}"
    PURCHASER_ID = "2", ("2: MIP-003 of the masumi library (>= 1.0), {identifier_from_purchaser, input_data} -> "
                         "{id, blockchainIdentifier, ...}; MIP-004 input/result hashes")


class ServiceState(models.TextChoices):
    REGISTERED = "registered"
    DEREGISTERED = "deregistered"


class Availability(models.TextChoices):
    """What a Masumi agentic service last answered on `GET /availability` (plain HTTP services stay unknown)."""

    UNKNOWN = "unknown"
    AVAILABLE = "available"
    UNAVAILABLE = "unavailable"


class Service(models.Model):
    id = models.UUIDField(primary_key=True, default=uuid.uuid4, editable=False)
    seller = models.ForeignKey(Agent, on_delete=models.PROTECT, related_name="services")
    name = models.CharField(max_length=250)
    description = models.TextField(max_length=5000, blank=True)
    tags = models.ManyToManyField(Tag, related_name="services")
    capability_name = models.CharField(max_length=250)
    capability_version = models.CharField(max_length=100)
    author = models.JSONField(default=dict, blank=True)
    legal = models.JSONField(default=dict, blank=True)
    example_outputs = models.JSONField(default=list, blank=True)
    pricing_type = models.CharField(max_length=10, choices=PricingType.choices)
    unit_name = models.CharField(max_length=50, default="call")
    unit_price = TokenAmountField()
    token = models.CharField(max_length=16, default="USDC")
    # Pægents' catalog terms (the `paegents` SDK registers them): a category (also kept as a tag, so search finds
    # it), the quantities one agreement may buy, and free-form capabilities and metadata shown as given.
    category = models.CharField(max_length=50, blank=True)
    min_quantity = models.PositiveBigIntegerField(default=1)
    max_quantity = models.PositiveBigIntegerField(null=True, blank=True)
    capabilities = models.JSONField(default=dict, blank=True)
    metadata = models.JSONField(default=dict, blank=True)
    upstream_base_url = models.URLField(max_length=500)
    upstream_protocol = models.CharField(max_length=10, choices=UpstreamProtocol.choices,
                                         default=UpstreamProtocol.HTTP)
    masumi_protocol_version = models.CharField(max_length=2, choices=MasumiProtocolVersion.choices,
                                               default=MasumiProtocolVersion.SEED)
    state = models.CharField(max_length=16, choices=ServiceState.choices, default=ServiceState.REGISTERED)
    # The seller verifies X-Marketplace-Signature on proxied calls with it (see sdk.proxy_signature).
    proxy_secret = models.CharField(max_length=64, default=new_proxy_secret, editable=False)
    # The secret the last rotation replaced, also signing until the expiry (marketplace.rotation); "" when none.
    previous_proxy_secret = models.CharField(max_length=64, blank=True, editable=False)
    previous_proxy_secret_expires_at = models.DateTimeField(null=True, blank=True, editable=False)
    # Denormalised for search; kept current by catalog.services on every write.
    keywords = models.TextField(blank=True, editable=False)
    search_vector = SearchVectorField(null=True, editable=False)
    created_at = models.DateTimeField(auto_now_add=True)
    updated_at = models.DateTimeField(auto_now=True)
    deregistered_at = models.DateTimeField(null=True, blank=True)
    # Polled by catalog.tasks.poll_availability for `masumi` services; unavailable ones drop out of search.
    availability = models.CharField(max_length=12, choices=Availability.choices, default=Availability.UNKNOWN)
    availability_message = models.CharField(max_length=250, blank=True)
    availability_checked_at = models.DateTimeField(null=True, blank=True)
    # When the poll last queued its check; cleared as a worker takes it. Queued again only once that message may be
    # lost (catalog.services.AVAILABILITY_REQUEUE_AFTER), not on every poll while it waits in the queue.
    availability_queued_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        indexes = [
            models.Index(fields=["state", "-created_at"], name="service_state_created_idx"),
            models.Index(fields=["state", "unit_price"], name="service_state_price_idx"),
            # The typo-tolerant search reads the services of the names it found (catalog.selectors).
            models.Index(fields=["name"], name="service_name_idx"),
            # The few services in a rotation's overlap, which the erasing sweep reads each minute
            # (marketplace.rotation).
            models.Index(fields=["previous_proxy_secret_expires_at"], name="service_overlap_ends_idx",
                         condition=Q(previous_proxy_secret_expires_at__isnull=False)),
        ]
        constraints = [
            models.CheckConstraint(condition=Q(unit_price__gte=0), name="service_unit_price_non_negative"),
            models.CheckConstraint(condition=Q(state__in=ServiceState.values), name="service_state_valid"),
            models.CheckConstraint(condition=Q(pricing_type__in=PricingType.values), name="service_pricing_valid"),
            models.CheckConstraint(condition=Q(availability__in=Availability.values),
                                   name="service_availability_valid"),
            models.CheckConstraint(condition=Q(min_quantity__gte=1) & (Q(max_quantity=None) | Q(
                max_quantity__gte=F("min_quantity"))), name="service_quantity_bounds_valid"),
        ]

    def __str__(self) -> str:
        return self.name


class ServiceName(models.Model):
    """Every name a service has been registered or renamed with, once. The typo-tolerant search compares a
    misspelling with these names (pg_trgm word similarity through their trigram index) and then reads the services
    bearing the names it found: names repeat across sellers, so there are far fewer names to compare than services
    (14,000 for the benchmark's 100,000). Written by catalog.services with the service; a name no registered
    service bears any more matches no service until the beat's collection deletes it
    (catalog.services.search_terms_collect)."""

    name = models.CharField(max_length=250, primary_key=True)

    def __str__(self) -> str:
        return self.name


# The postings of the visible services' search vectors, and the visible services by name: PostgreSQL tables that
# triggers keep in step with the services (catalog/migrations/0011_service_postings.py), read by the plain text
# search and the typo-tolerant one (catalog.selectors). Not models: nothing writes them but PostgreSQL, and the
# embedded SQLite default has none.
SERVICE_POSTINGS_TABLE = "catalog_service_posting"
VISIBLE_SERVICE_NAMES_TABLE = "catalog_service_visible_name"


SKILL_TIMEOUT_MAX_SECONDS = 3600


class Skill(models.Model):
    """A callable capability of a service, invoked at `POST /agents/{handle}/{skill}`."""

    service = models.ForeignKey(Service, on_delete=models.CASCADE, related_name="skills")
    name = models.CharField(max_length=64, validators=[SKILL_NAME_VALIDATOR, MinLengthValidator(1)])
    description = models.CharField(max_length=500, blank=True)
    # None: the service's unit price.
    price = TokenAmountField(null=True, blank=True)
    path = models.CharField(max_length=200, blank=True, help_text="Upstream path; defaults to /<skill name>.")
    is_async = models.BooleanField(default=False)
    timeout_seconds = models.PositiveIntegerField(default=60)

    class Meta:
        constraints = [models.UniqueConstraint(fields=["service", "name"], name="skill_unique_per_service")]
        ordering = ["name"]
        # The operators' list in its order (then the key, as the admin adds it): a page read from the index, not every
        # skill joined to its service and seller and sorted.
        indexes = [models.Index(fields=["name", "-id"], name="skill_listing_idx")]

    def __str__(self) -> str:
        return self.name
