"""Writes of the catalog: agents, credentials, services. Every rule about them lives here."""

from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta

from django.conf import settings
from django.contrib.auth import get_user_model
from django.contrib.auth.models import AbstractBaseUser
from django.contrib.postgres.search import SearchVector
from django.core import checks
from django.db import IntegrityError, connection, transaction
from django.db.models import Count, Exists, OuterRef, ProtectedError, Q
from django.utils import timezone
from rest_framework.exceptions import AuthenticationFailed

from catalog import selectors
from catalog.models import (
    Agent,
    ApiKey,
    Availability,
    KeyScope,
    OwnerToken,
    Service,
    ServiceName,
    ServiceState,
    Skill,
    Tag,
    UpstreamProtocol,
    new_proxy_secret,
)
from marketplace import (chainconfig, masumi_agentic_client, money, outbound, outbound_slots, rotation, shown_text,
                         sweeps)
from marketplace.errors import Conflict, Forbidden, InvalidInput
from marketplace.fields import checksum_address
from marketplace.keys import issue_secret
from marketplace.signatures import signer_require
from marketplace.tags import TAGS_PER_LISTING, tag_normalise
from sdk.typed_data import WALLET_PROOF_DOMAIN_NAME, wallet_proof

# Path segments that routes under /agents/ already use, so they cannot be handles or skill names.
RESERVED_HANDLES = frozenset({"services", "me"})
RESERVED_SKILL_NAMES = frozenset({"policies", "approvals", "api-keys", "services", "webhooks", "events", "wallet-proof"})


# The parts of a listing written as prose (line breaks kept); the rest of its text is names (marketplace.shown_text).
PROSE_FIELDS = frozenset({"description", "legal", "capabilities", "metadata"})


def _check_shown_text(value, *, field: str, prose: bool = False) -> None:
    """Every text in `value` (nested objects and lists too, the keys of free-form ones included), shown to buyers as
    written: 400 `unsafe_characters` naming the field and the characters (marketplace.shown_text)."""
    if isinstance(value, str):
        shown_text.refuse_unsafe(value, field=field, prose=prose)
    elif isinstance(value, dict):
        for key, item in value.items():
            inner = f"{field}.{key}" if field else str(key)
            _check_shown_text(key, field=inner, prose=prose)
            _check_shown_text(item, field=inner, prose=prose or key in PROSE_FIELDS)
    elif isinstance(value, list):
        for index, item in enumerate(value):
            _check_shown_text(item, field=f"{field}.{index}", prose=prose)


@dataclass(frozen=True)
class IssuedCredential:
    credential: ApiKey | OwnerToken
    secret: str  # Shown once; only its digest is stored.


# A proof is good for a day at most: a leaked one serves its handle and owner only, and not for long.
WALLET_PROOF_MAX_VALIDITY = timedelta(days=1)
# The proof a 400 `wallet_proof_required` asks for is good this long.
WALLET_PROOF_OFFERED_VALIDITY = timedelta(minutes=10)
# The proof's verifying contract where no escrow contract is configured (a dev set-up without its chain).
ZERO_ADDRESS = "0x" + "00" * 20


@dataclass(frozen=True)
class WalletProof:
    """The wallet's EIP-712 signature of `wallet_proof_typed_data` until `expires_at` (unix seconds)."""
    signature: str
    expires_at: int


def wallet_proof_verifying_contract() -> str:
    """The `verifyingContract` of this deployment's wallet proofs: its escrow contract, which names it on-chain (the
    zero address where none is configured)."""
    return chainconfig.escrow_address() or ZERO_ADDRESS


def wallet_proof_domain_check(app_configs=None, **kwargs) -> list[checks.CheckMessage]:
    """Django system check (W001): on a public chain, a deployment with no escrow contract (direct payments only)
    keeping the default `WALLET_PROOF_DOMAIN_NAME` signs its wallet proofs in the domain every such deployment shares
    (the zero address, the default name): a proof a wallet gave one would serve another for the same owner id and
    handle within the day."""
    if settings.CHAIN_ID == settings.DEV_CHAIN_ID or chainconfig.escrow_address() or (
            settings.WALLET_PROOF_DOMAIN_NAME != WALLET_PROOF_DOMAIN_NAME):
        return []
    return [checks.Warning(
        "Wallet proofs name no deployment: no escrow contract is configured (their verifyingContract is the zero "
        "address) and WALLET_PROOF_DOMAIN_NAME is the default, so a proof given another such deployment on this "
        "chain is accepted here.", hint="Set WALLET_PROOF_DOMAIN_NAME to this deployment's own name.", obj=__name__,
        id="catalog.W001")]


def wallet_proof_typed_data(*, owner: AbstractBaseUser, handle: str, wallet_address: str, expires_at: int) -> dict:
    """What a wallet signs to be the agent `handle`'s of `owner` at this deployment (sdk.typed_data.wallet_proof):
    its domain names this deployment's escrow contract (the zero address where none is configured) on this chain, and
    `WALLET_PROOF_DOMAIN_NAME`, so that no proof made for another marketplace on the chain serves here."""
    return wallet_proof(chain_id=settings.CHAIN_ID, escrow_address=wallet_proof_verifying_contract(),
                        handle=handle, wallet=wallet_address, owner_id=owner.pk, expires_at=expires_at,
                        domain_name=settings.WALLET_PROOF_DOMAIN_NAME)


def _wallet_proof_check(*, owner: AbstractBaseUser, handle: str, wallet_address: str,
                        proof: WalletProof | None) -> None:
    """400 unless `wallet_address` signed that it is the wallet of `handle` of `owner` on this chain, still valid:
    an agent named by a wallet its owner does not hold (another seller's, to pass for it; a typo, whose key nobody
    holds, to be paid to nobody) is refused. The handle is unique and never freed, so a proof serves once."""
    now = int(timezone.now().timestamp())
    if proof is None:
        offered = wallet_proof_typed_data(owner=owner, handle=handle, wallet_address=wallet_address,
                                          expires_at=now + int(WALLET_PROOF_OFFERED_VALIDITY.total_seconds()))
        raise InvalidInput("wallet_proof: the wallet must sign (EIP-712) that it is this agent's; sign "
                           "details.typed_data with it.", code="wallet_proof_required",
                           details={"field": "wallet_proof", "typed_data": offered})
    if proof.expires_at <= now:
        raise InvalidInput("wallet_proof has expired.", code="wallet_proof_expired",
                           details={"field": "wallet_proof.expires_at"})
    if proof.expires_at > now + WALLET_PROOF_MAX_VALIDITY.total_seconds():
        raise InvalidInput("wallet_proof.expires_at is more than a day away.", code="wallet_proof_too_long",
                           details={"field": "wallet_proof.expires_at",
                                    "max_seconds": int(WALLET_PROOF_MAX_VALIDITY.total_seconds())})
    signer_require(typed=wallet_proof_typed_data(owner=owner, handle=handle, wallet_address=wallet_address,
                                                 expires_at=proof.expires_at),
                   signature=proof.signature, expected=wallet_address, field="wallet_proof.signature",
                   mismatch_code="wallet_proof_mismatch")


def _wallet_proven_by_another_owner_refuse(*, owner: AbstractBaseUser, wallet_address: str) -> None:
    """409 `wallet_taken` when an active agent of another owner proved the wallet: one wallet would answer for two
    owners (its listing, its payouts, its policies). An owner's own agents may share one, each proving it."""
    if connection.vendor == "postgresql":  # SQLite (`make run`) has one writer at a time
        with connection.cursor() as cursor:  # two owners proving one wallet at once: the second sees the first
            cursor.execute("SELECT pg_advisory_xact_lock(hashtext(%s))", [f"wallet-proof:{wallet_address}"])
    if Agent.objects.filter(wallet_address=wallet_address, wallet_proven_at__isnull=False,
                            is_active=True).exclude(owner=owner).exists():
        raise Conflict("Another owner's agent has proven this wallet.", code="wallet_taken",
                       details={"wallet_address": wallet_address})


def agent_create(
    *,
    owner: AbstractBaseUser,
    handle: str,
    display_name: str,
    wallet_address: str,
    wallet_proof: WalletProof | None,
    unproven_allowed: bool = False,
    is_buyer: bool = True,
    is_seller: bool = False,
) -> Agent:
    """The agent, its wallet proven by `wallet_proof` (400 `wallet_proof_*`, 409 `wallet_taken`). Only the
    operator's own scripts (the benches) create one without a proof (`unproven_allowed`), unproven as agents from
    before proofs: nothing finds it by its wallet."""
    if handle in RESERVED_HANDLES:
        raise InvalidInput(f"The handle {handle!r} is reserved.", code="handle_reserved")
    if selectors.uuid_or_none(handle) is not None:
        # Agents are also named by their id (the skill route): a handle spelling one could pass for another agent.
        raise InvalidInput("A handle cannot spell an agent id (a UUID).", code="handle_reserved")
    if not (is_buyer or is_seller):
        raise InvalidInput("An agent must be a buyer, a seller or both.", code="no_role")
    _check_shown_text(display_name, field="display_name")
    wallet_address = checksum_address(wallet_address)
    if wallet_proof is not None or not unproven_allowed:
        _wallet_proof_check(owner=owner, handle=handle, wallet_address=wallet_address, proof=wallet_proof)
    try:
        # The unique constraint decides, also between two creations at once (no row to lock yet): the second
        # waits for the first to commit, then fails here.
        with transaction.atomic():
            # The owner's row, locked, orders two creations at once, so neither passes the count the other makes.
            # Through the user model: an admin session's user is a lazy object, whose class has no manager.
            get_user_model().objects.select_for_update().filter(pk=owner.pk).first()
            owned = Agent.objects.filter(owner=owner).count()
            if owned >= settings.AGENTS_PER_OWNER:
                raise Conflict(f"You already have {owned} agents.", code="agent_limit_reached",
                               details={"max_agents": settings.AGENTS_PER_OWNER})
            if wallet_proof is not None:
                _wallet_proven_by_another_owner_refuse(owner=owner, wallet_address=wallet_address)
            return Agent.objects.create(
                owner=owner,
                handle=handle,
                display_name=display_name,
                wallet_address=wallet_address,
                wallet_proven_at=timezone.now() if wallet_proof is not None else None,
                is_buyer=is_buyer,
                is_seller=is_seller,
                owner_is_active=owner.is_active,
            )
    except IntegrityError:
        if Agent.objects.filter(handle=handle).exists():
            raise Conflict(f"The handle {handle!r} is taken.", code="handle_taken") from None
        raise


def agent_wallet_prove(*, agent: Agent, wallet_proof: WalletProof | None) -> Agent:
    """An agent from before proofs were asked for proves its wallet as `POST /agents` would have (400
    `wallet_proof_*`, 409 `wallet_taken`); from then on it is found by its wallet and registers through Masumi.
    Proving it again changes nothing: the wallet was proven when it first was."""
    _wallet_proof_check(owner=agent.owner, handle=agent.handle, wallet_address=agent.wallet_address,
                        proof=wallet_proof)
    with transaction.atomic():
        agent = Agent.objects.select_for_update().get(pk=agent.pk)
        if agent.wallet_proven_at is None:
            _wallet_proven_by_another_owner_refuse(owner=agent.owner, wallet_address=agent.wallet_address)
            agent.wallet_proven_at = timezone.now()
            agent.save(update_fields=["wallet_proven_at"])
    return agent


def agent_reactivation_check(*, agent: Agent, operator) -> None:
    """403 `operator_owns_the_agent` when an operator (the admin) would reactivate an agent they own: deactivated by
    another operator or a superuser (say, for fraud), putting it back on sale is not its owner's call; another
    operator decides. (Owners never reactivate an agent through the API either.) 409 `wallet_taken` when another
    owner's agent proved its wallet while it was inactive."""
    if agent.owner_id == operator.pk:
        raise Forbidden("You own this agent: another operator reactivates it.", code="operator_owns_the_agent")
    if agent.wallet_proven_at is not None:  # its wallet may have gone to another owner while it was inactive
        _wallet_proven_by_another_owner_refuse(owner=agent.owner, wallet_address=agent.wallet_address)


def _issuer_live_require(issued_with: OwnerToken | None) -> None:
    """401 `credentials_revoked` when the token a request authenticated with was revoked since: its row, locked in
    the issuing transaction, orders the issue and the revocation, so the revocation (`credential_revoke`) sees what
    was issued before it and nothing is issued after it."""
    if issued_with is None:
        return
    live = OwnerToken.objects.select_for_update().filter(pk=issued_with.pk, revoked_at=None)
    if live.values_list("pk", flat=True).first() is None:
        raise AuthenticationFailed("These credentials were revoked.", code="credentials_revoked")


def api_key_issue(*, agent: Agent, scope: str = KeyScope.PAY, name: str = "", expires_at: datetime | None = None,
                  issued_with: OwnerToken | None = None) -> IssuedCredential:
    """A key of `agent`'s; `issued_with` the owner token the request was made with (None: an operator's command, an
    admin session): revoking that token revokes the key. Its name is listed to operators: held to the rule of text
    shown to others (400 `unsafe_characters`)."""
    _check_shown_text(name, field="name")
    if expires_at is not None and expires_at <= timezone.now():
        raise InvalidInput("expires_at must be in the future.", code="expiry_in_past")
    issued = issue_secret("mk")
    with transaction.atomic():
        # The agent's row, locked, orders two issues at once, so neither passes the count the other makes.
        Agent.objects.select_for_update().filter(pk=agent.pk).first()
        _issuer_live_require(issued_with)
        now = timezone.now()
        live = agent.api_keys.filter(Q(expires_at=None) | Q(expires_at__gt=now), revoked_at=None).count()
        if live >= settings.API_KEYS_PER_AGENT:
            raise Conflict(f"The agent already holds {live} live API keys; revoke one first.",
                           code="api_key_limit_reached", details={"max_keys": settings.API_KEYS_PER_AGENT})
        key = ApiKey.objects.create(
            agent=agent, scope=scope, name=name, expires_at=expires_at, prefix=issued.prefix,
            secret_digest=issued.digest, issued_with=issued_with,
        )
    return IssuedCredential(credential=key, secret=issued.plaintext)


def owner_token_issue(*, owner: AbstractBaseUser, scope: str, name: str = "", expires_at: datetime | None = None,
                      issued_with: OwnerToken | None = None) -> IssuedCredential:
    """A token of `owner`'s; `issued_with` the token the request was made with (None: an operator's command, an
    admin session). A token does not outlive the one that issued it: one given for a day would otherwise mint one
    for ever. Without `expires_at` it ends with its issuer; a later one is 400 `expiry_beyond_issuer`. Nor does it
    survive its issuer's revocation (`credential_revoke`). Its name as a key's (400 `unsafe_characters`)."""
    _check_shown_text(name, field="name")
    if expires_at is not None and expires_at <= timezone.now():
        raise InvalidInput("expires_at must be in the future.", code="expiry_in_past")
    latest = issued_with.expires_at if issued_with is not None else None
    if latest is not None and expires_at is None:
        expires_at = latest
    elif latest is not None and expires_at > latest:
        raise InvalidInput("A token cannot expire after the token issuing it.", code="expiry_beyond_issuer",
                           details={"latest_expiry": latest.isoformat().replace("+00:00", "Z")})
    issued = issue_secret("ot")
    with transaction.atomic():
        # The owner's row, locked, orders two issues at once, so neither passes the count the other makes. Through
        # the user model: an admin session's user is a lazy object, whose class has no manager.
        get_user_model().objects.select_for_update().filter(pk=owner.pk).first()
        _issuer_live_require(issued_with)
        now = timezone.now()
        live = OwnerToken.objects.filter(Q(expires_at=None) | Q(expires_at__gt=now), owner=owner,
                                         revoked_at=None).count()
        if live >= settings.OWNER_TOKENS_PER_OWNER:
            raise Conflict(f"You already hold {live} live owner tokens; revoke one first.",
                           code="owner_token_limit_reached", details={"max_tokens": settings.OWNER_TOKENS_PER_OWNER})
        token = OwnerToken.objects.create(owner=owner, scope=scope, name=name, expires_at=expires_at,
                                          prefix=issued.prefix, secret_digest=issued.digest, issued_with=issued_with)
    return IssuedCredential(credential=token, secret=issued.plaintext)


# (api_key_ids=, owner_token_ids=) -> None: what an upper app does, inside the revocation's transaction, with what the
# credentials a revocation covers made (agreements: pauses the webhook subscriptions they created).
RevocationHandler = Callable[..., None]
_revocation_handlers: list[RevocationHandler] = []


def credential_revocation_handler_register(handler: RevocationHandler) -> None:
    """Registered once however often it is asked (AgreementsConfig.ready)."""
    if handler not in _revocation_handlers:
        _revocation_handlers.append(handler)


def credential_revoke(*, credential: ApiKey | OwnerToken, keep_issued: bool = False) -> ApiKey | OwnerToken:
    """Idempotent: revoking twice keeps the first revocation time. Unless `keep_issued` (a retirement, a rotation:
    the credential alone), an owner token's revocation is also, in the same transaction and at the same time, that
    of every owner token issued with it, of theirs in turn, and of the agent API keys any of them issued: a leaked
    token's is that of what its thief minted with it. (Owner tokens are read on every request, so they stop at once;
    keys within CREDENTIAL_CACHE_SECONDS, as any revoked key.) The registered handlers are told every credential the
    revocation covers (`credential_revocation_handler_register`): what a thief made with them beyond credentials (a
    webhook subscription to its own URL) stops with them."""
    with transaction.atomic():
        now = timezone.now()
        type(credential).objects.filter(pk=credential.pk, revoked_at=None).update(revoked_at=now)
        if not keep_issued:
            _covered_revoke(credential, now=now)
    credential.refresh_from_db(fields=["revoked_at"])
    return credential


def _covered_revoke(credential: ApiKey | OwnerToken, *, now: datetime) -> None:
    """What a revoked `credential` issued, revoked with it, and the registered handlers told of every credential it
    covers."""
    key_ids, token_ids = ([], [credential.pk]) if isinstance(credential, OwnerToken) else ([credential.pk], [])
    if isinstance(credential, OwnerToken):
        _issued_revoke(issuer_id=credential.pk, now=now, key_ids=key_ids, token_ids=token_ids)
    for handler in _revocation_handlers:
        handler(api_key_ids=key_ids, owner_token_ids=token_ids)


def _issued_revoke(*, issuer_id: int, now: datetime, key_ids: list, token_ids: list) -> None:
    """Revoke what the token `issuer_id` issued, and what that issued, a generation at a time. Through tokens
    already revoked too: a second revocation revokes what a first one missed (tokens issued before issuers were
    recorded have none: they are nobody's). Adds the keys and tokens it covers to `key_ids` and `token_ids`."""
    issuers = [issuer_id]
    while issuers:
        key_ids.extend(ApiKey.objects.filter(issued_with__in=issuers).values_list("pk", flat=True))
        ApiKey.objects.filter(issued_with__in=issuers, revoked_at=None).update(revoked_at=now)
        issuers = list(OwnerToken.objects.filter(issued_with__in=issuers).values_list("pk", flat=True))
        token_ids.extend(issuers)
        OwnerToken.objects.filter(pk__in=issuers, revoked_at=None).update(revoked_at=now)


def api_keys_expire(*, now: datetime | None = None) -> int:
    """Revoke keys and tokens past their expiry so lists and the admin show them as dead. Safe to run twice."""
    now = now or timezone.now()
    revoked = 0
    for model in (ApiKey, OwnerToken):
        revoked += model.objects.filter(revoked_at=None, expires_at__lte=now).update(revoked_at=now)
    return revoked


# --- services ------------------------------------------------------------------------------------------------

def _require_seller(agent: Agent) -> None:
    if not agent.is_seller:
        raise Forbidden("Only agents with the seller role can list services.", code="not_a_seller")


def _require_owner(service: Service, agent: Agent) -> None:
    if service.seller_id != agent.pk:
        raise Forbidden("Only the seller that listed this service may change it.", code="not_service_owner")


def _check_skill_names(seller: Agent, skills: list[dict], exclude_service: Service | None) -> None:
    names = [skill["name"] for skill in skills]
    reserved = sorted(set(names) & RESERVED_SKILL_NAMES)
    if reserved:
        raise InvalidInput(f"Reserved skill names: {', '.join(reserved)}.", code="skill_name_reserved")
    if len(names) != len(set(names)):
        raise InvalidInput("Skill names must be unique within a service.", code="duplicate_skill")
    # A skill is invoked as /agents/{handle}/{skill}: the name must be unique across the seller's live services.
    taken = Skill.objects.filter(
        service__seller=seller, service__state=ServiceState.REGISTERED, name__in=names
    )
    if exclude_service is not None:
        taken = taken.exclude(service=exclude_service)
    clash = sorted(taken.values_list("name", flat=True))
    if clash:
        raise Conflict(f"Skill names already used by another of your services: {', '.join(clash)}.",
                       code="skill_name_taken")


def _apply_fields(service: Service, data: dict) -> None:
    simple = ("name", "description", "author", "legal", "example_outputs", "upstream_base_url", "upstream_protocol",
              "masumi_protocol_version", "category", "min_quantity", "max_quantity", "capabilities", "metadata")
    for field in simple:
        if field in data:
            setattr(service, field, data[field])
    if "capability" in data:
        service.capability_name = data["capability"]["name"]
        service.capability_version = data["capability"]["version"]
    if "pricing" in data:
        pricing = data["pricing"]
        service.pricing_type = pricing["type"]
        service.unit_name = pricing.get("unit_name") or ("call" if pricing["type"] == "per_call" else "unit")
        service.unit_price = pricing["unit_price_atomic"]
        service.token = pricing.get("token", "USDC")
    # The Pægents SDK's flat pricing fields: each replaces its part of the pricing.
    if "price_model" in data:
        service.pricing_type = data["price_model"]
    if "base_price_cents" in data:
        service.unit_price = data["base_price_cents"]  # already in base units (the serializer converts exactly)
    if "unit" in data:
        service.unit_name = data["unit"]
    if service.max_quantity is not None and service.max_quantity < service.min_quantity:
        raise InvalidInput("max_quantity must be at least min_quantity.", code="invalid_quantity_bounds")
    _price_within_limit(service.unit_price, field="unit_price_atomic")


def _price_within_limit(price: int | None, *, field: str) -> None:
    """A price no agreement may hold is not published: the largest an agreement holds (AGREEMENT_MAX_AMOUNT) is the
    platform's ceiling, as the agreement's proposal refuses more (and a JSON integer past 2**53 is read as another
    number by a JavaScript client)."""
    if price is not None:
        money.amount_within_limit(price, field=field)


def _terms_held(model: type[Tag] | type[ServiceName], names: list[str]) -> dict:
    """The primary keys of the rows of `model` (tags, or the lexicon of names; unique by name) named `names`,
    made where missing, and held (PostgreSQL: FOR KEY SHARE) until the transaction ends: the collection of unused
    terms (`search_terms_collect`) skips a row held so, and a row it deleted and had not committed when we came is
    made again once it has (the insert waits for it; the share lock then finds no row). Registrations bearing the
    same term do not wait on each other."""
    table, pk = connection.ops.quote_name(model._meta.db_table), connection.ops.quote_name(model._meta.pk.column)
    held = " FOR KEY SHARE" if connection.vendor == "postgresql" else ""
    found: dict = {}
    while missing := sorted(set(names) - found.keys()):
        model.objects.bulk_create([model(name=name) for name in missing], ignore_conflicts=True)
        with connection.cursor() as cursor:
            cursor.execute(f"SELECT name, {pk} FROM {table} WHERE name IN ({', '.join(['%s'] * len(missing))}) "  # noqa: S608
                           f"ORDER BY name{held}", missing)
            found.update(cursor.fetchall())
    return found


def _with_category(tags: list[str], category: str) -> list[str]:
    """The listing's tags and its category's (README: search by tag finds a category); the serializer checked both
    are in the tags' form."""
    tag = tag_normalise(category)
    if not tag or tag in tags:
        return tags
    if len(tags) >= TAGS_PER_LISTING:
        raise InvalidInput(f"The category is also a tag, and a service has at most {TAGS_PER_LISTING}: drop one.",
                           code="too_many_tags", details={"fields": ["category", "tags"],
                                                          "max_tags": TAGS_PER_LISTING})
    return [*tags, tag]


def _replace_tags(service: Service, names: list[str]) -> None:
    tag_ids = _terms_held(Tag, names)
    service.tags.set([tag_ids[name] for name in names])


SKILL_FIELDS = ("description", "price", "path", "is_async", "timeout_seconds")


def _replace_skills(service: Service, skills: list[dict]) -> None:
    """The service's skills become `skills`: a skill keeping its name keeps its row, changed in place (its
    invocations, pending ones included, keep pointing at it); a dropped one is deleted, unless it was invoked (its
    invocations keep it as their record): 409 `skill_invoked`, and the caller's transaction rolls back."""
    for skill in skills:
        _price_within_limit(skill["price"], field="price_atomic")
    current = {skill.name: skill for skill in service.skills.all()}
    wanted = {skill["name"]: skill for skill in skills}
    try:
        Skill.objects.filter(service=service, name__in=current.keys() - wanted.keys()).delete()
    except ProtectedError as protected:
        names = {skill.pk: name for name, skill in current.items()}
        invoked = sorted({names[invocation.skill_id] for invocation in protected.protected_objects})
        raise Conflict(f"Skills already invoked stay listed (their invocations refer to them): {', '.join(invoked)}.",
                       code="skill_invoked", details={"skills": invoked}) from None
    kept = [current[name] for name in current.keys() & wanted.keys()]
    for skill in kept:
        for field in SKILL_FIELDS:
            setattr(skill, field, wanted[skill.name][field])
    Skill.objects.bulk_update(kept, SKILL_FIELDS)
    Skill.objects.bulk_create([Skill(service=service, **skill) for name, skill in wanted.items() if name not in current])


def _refresh_search_fields(service: Service) -> None:
    tags = sorted(service.tags.values_list("name", flat=True))
    skills = sorted(service.skills.values_list("name", flat=True))
    keywords = " ".join([*tags, service.capability_name, *skills]).replace("-", " ")
    Service.objects.filter(pk=service.pk).update(keywords=keywords)
    # The lexicon the typo-tolerant search compares misspellings with (catalog.models.ServiceName).
    _terms_held(ServiceName, [service.name])
    if connection.vendor == "postgresql":
        Service.objects.filter(pk=service.pk).update(search_vector=search_vector_expression())
    service.keywords = keywords


def search_terms_collect() -> int:
    """Delete the names of the lexicon (catalog.models.ServiceName) and the tags no registered service bears (a
    deregistered service's tags go with them), RETENTION_PURGE_BATCH at a time, at most RETENTION_PURGE_BATCHES_PER_RUN
    batches of each a run (the beat comes back for the rest: a backlog held a worker until the task's time limit); how
    many. Safe to run twice, and beside registrations: rows a registration holds (`_terms_held`) are skipped, and the
    rows taken are checked again, in a statement of their own, once no registration can take them any more (one that
    committed between the two is seen; one that comes later waits, then makes the row again)."""
    registered = Service.objects.filter(state=ServiceState.REGISTERED)
    unused_by = {ServiceName: ~Exists(registered.filter(name=OuterRef("name"))),
                 Tag: ~Exists(registered.filter(tags=OuterRef("pk")))}
    deleted, batch = 0, settings.RETENTION_PURGE_BATCH
    for model, unused in unused_by.items():
        taken = []
        for _ in range(settings.RETENTION_PURGE_BATCHES_PER_RUN):
            # On from the last batch: the terms in use before it are not read again.
            after = model.objects.filter(pk__gt=taken[-1]) if taken else model.objects.all()
            with transaction.atomic():
                taken = list(after.select_for_update(skip_locked=True).filter(unused)
                             .order_by("pk").values_list("pk", flat=True)[:batch])
                if taken:
                    deleted += model.objects.filter(unused, pk__in=taken).delete()[1].get(model._meta.label, 0)
            if len(taken) < batch:
                break
    return deleted


def search_vector_expression():
    """Name weighs most, then tags/capability/skills, then the description."""
    return (
        SearchVector("name", weight="A", config="english")
        + SearchVector("keywords", weight="B", config="english")
        + SearchVector("description", weight="C", config="english")
    )


def _check_service_count(seller: Agent) -> None:
    """Every registered service is in every buyer's search: a seller lists at most SERVICES_PER_SELLER at once. A
    deregistered one's row stays for agreements and history, so a seller registers at most
    SERVICE_REGISTRATIONS_PER_DAY in a day (else registering and deregistering in a loop grew the table without
    bound)."""
    window = timedelta(days=1)
    counts = Service.objects.filter(seller=seller).aggregate(
        registered=Count("pk", filter=Q(state=ServiceState.REGISTERED)),
        lately=Count("pk", filter=Q(created_at__gte=timezone.now() - window)))
    if counts["registered"] >= settings.SERVICES_PER_SELLER:
        raise Conflict(f"You already list {counts['registered']} services; deregister one first.",
                       code="service_limit_reached", details={"max_services": settings.SERVICES_PER_SELLER})
    if counts["lately"] >= settings.SERVICE_REGISTRATIONS_PER_DAY:
        raise Conflict(f"You registered {counts['lately']} services in the last day; update one instead of "
                       "registering it again, or wait.", code="service_registration_limit_reached",
                       details={"max_registrations": settings.SERVICE_REGISTRATIONS_PER_DAY,
                                "window_seconds": int(window.total_seconds())})


def service_register(*, seller: Agent, data: dict) -> Service:
    _require_seller(seller)
    _check_shown_text(data, field="")
    tags = _with_category(data["tags"], data.get("category", ""))
    outbound.url_check(data["upstream_base_url"])  # resolves DNS: before any lock is taken
    skills = data.get("skills", [])
    with transaction.atomic():
        Agent.objects.select_for_update().get(pk=seller.pk)  # serialise skill-name checks and the count per seller
        _check_skill_names(seller, skills, exclude_service=None)
        _check_service_count(seller)
        service = Service(seller=seller)
        _apply_fields(service, data)
        service.save()
        _replace_tags(service, tags)
        _replace_skills(service, skills)
        _refresh_search_fields(service)
    return service


def service_update(*, service: Service, actor: Agent, data: dict) -> Service:
    _require_owner(service, actor)
    _check_shown_text(data, field="")
    if "upstream_base_url" in data:
        outbound.url_check(data["upstream_base_url"])  # resolves DNS: before any lock is taken
    with transaction.atomic():
        Agent.objects.select_for_update().get(pk=actor.pk)
        service = Service.objects.select_for_update().get(pk=service.pk)
        if service.state == ServiceState.DEREGISTERED:
            raise Conflict("A deregistered service cannot be changed.", code="service_deregistered",
                           details={"state": service.state})
        if "skills" in data:
            _check_skill_names(actor, data["skills"], exclude_service=service)
        _apply_fields(service, data)
        service.save()
        if "tags" in data or "category" in data:  # the category stays among the tags
            tags = data["tags"] if "tags" in data else [tag.name for tag in service.tags.all()]
            _replace_tags(service, _with_category(tags, service.category))
        if "skills" in data:
            _replace_skills(service, data["skills"])
        _refresh_search_fields(service)
    return service


def service_proxy_secret_rotate(*, service: Service, actor: Agent, previous_secret_valid_for_seconds: int) -> Service:
    """A new proxy secret, signing proxied calls at once; the replaced one signs beside it for the seconds given
    (marketplace.rotation). Allowed in any state: a deregistered service's agreements are still proxied."""
    _require_owner(service, actor)
    rotation.rotate(service, secret_field="proxy_secret", new_secret=new_proxy_secret(),
                    overlap_seconds=previous_secret_valid_for_seconds)
    return service


def replaced_proxy_secrets_erase(*, now: datetime | None = None) -> int:
    """Erase the proxy secrets rotations replaced whose overlap has ended (beat); how many."""
    return rotation.replaced_secrets_erase(Service, secret_field="proxy_secret", now=now)


def operator_owns_a_seller_check(*, owner_id, operator, does: str) -> None:
    """403 `operator_owns_a_seller` when an operator who owns a seller agent would act on another owner's (the user
    `owner_id`) agent or credentials (`does` says how): changing its policy or deciding its purchases
    (policies.services.policy_operator_check), taking its service off sale, deactivating it, revoking its keys or
    the owner's tokens. Loosened, a policy let that owner's buyer pay their seller past the owner's rules;
    tightened, a purchase rejected, a listing withdrawn or a credential revoked, it blocked their competitors (an
    owner whose tokens are all revoked waits for an operator to issue one). Another operator does it."""
    if owner_id != operator.pk and Agent.objects.filter(owner=operator, is_seller=True).exists():
        raise Forbidden(f"You own a seller agent: the agent's owner, or another operator, {does}.",
                        code="operator_owns_a_seller")


def service_deregister(*, service: Service, actor: Agent | None, operator=None) -> Service:
    """Hide a service from search; the row stays for agreements and history. Idempotent. `actor` None: an operator,
    the admin's user (`operator`: refused as `operator_owns_a_seller_check` says) or a command."""
    if actor is not None:
        _require_owner(service, actor)
    if operator is not None:
        operator_owns_a_seller_check(owner_id=service.seller.owner_id, operator=operator,
                                     does="deregisters this service")
    Service.objects.filter(pk=service.pk, state=ServiceState.REGISTERED).update(
        state=ServiceState.DEREGISTERED, deregistered_at=timezone.now(), updated_at=timezone.now()
    )
    service.refresh_from_db()
    return service


def service_availability_record(*, service_id, available: bool, message: str = "") -> None:
    """Store what a Masumi service answered on `GET /availability`; unavailable ones drop out of search. Its message
    is seller text shown to buyers (a purchase's 409) that no listing's rule checked: its control and invisible
    format characters are kept escaped (`\\u202e`), as they cannot be refused."""
    Service.objects.filter(pk=service_id).update(
        availability=Availability.AVAILABLE if available else Availability.UNAVAILABLE,
        availability_message=shown_text.printable(message)[:250], availability_checked_at=timezone.now())


# A check the poll queued and no worker took within this is queued again (its message may be lost).
AVAILABILITY_REQUEUE_AFTER = timedelta(minutes=5)


def services_availability_poll(*, now: datetime | None = None) -> int:
    """Queue a check of registered `masumi` services (beat), but of one whose last check the poll queued still waits
    in the outbound queue (AVAILABILITY_REQUEUE_AFTER): each poll queued every service again while the queue was
    behind. At most MASUMI_AVAILABILITY_POLL_BATCH a run, in turn from where the last run ended (`sweeps.rows_in_turn`):
    a run queued every Masumi service at once; taken by their last check, those whose checks are skipped each time
    (their seller's host busy) came first at every run and no other was checked. How many were queued."""
    from catalog.tasks import check_availability

    now = now or timezone.now()
    due = Service.objects.filter(
        Q(availability_queued_at=None) | Q(availability_queued_at__lte=now - AVAILABILITY_REQUEUE_AFTER),
        state=ServiceState.REGISTERED, upstream_protocol=UpstreamProtocol.MASUMI)
    service_ids = [service.pk for service in sweeps.rows_in_turn(
        due.only("pk"), turn="availability-poll", by="pk", size=settings.MASUMI_AVAILABILITY_POLL_BATCH)]
    sweeps.marked_rows_publish(model=Service, pks=service_ids, marked="availability_queued_at", now=now,
                               publish=check_availability.delay)
    return len(service_ids)


def service_availability_check(*, service_id) -> None:
    """Ask one registered `masumi` service whether it can take jobs, and store the answer. Only while its seller's
    upstream host and owner each have fewer than their share of calls in flight (outbound_slots.seller_shares):
    otherwise skipped, its last answer kept, until the next poll asks again."""
    service = Service.objects.select_related("seller").filter(
        pk=service_id, state=ServiceState.REGISTERED, upstream_protocol=UpstreamProtocol.MASUMI).first()
    if service is None:
        return
    Service.objects.filter(pk=service.pk).update(availability_queued_at=None)  # its message is taken
    shares = outbound_slots.seller_shares(base_url=service.upstream_base_url, owner_id=service.seller.owner_id)
    lease_seconds = settings.MASUMI_SERVICE_TIMEOUT + settings.OUTBOUND_TASK_TIME_LIMIT_MARGIN_SECONDS
    with outbound_slots.held(shares, lease_seconds=lease_seconds) as held:
        if not held:
            return
        answer = masumi_agentic_client.availability(base_url=service.upstream_base_url)
    service_availability_record(service_id=service.pk, available=answer.available, message=answer.message)
