"""Bearer authentication for agents (API keys, `mk_...`) and owners (owner tokens, `ot_...`).

`Authorization: Bearer <secret>` for both; the Masumi `token: <secret>` header is accepted for agent keys.
On success `request.user` is the owner (a Django user) and `request.auth` the ApiKey or OwnerToken.
"""

import hmac
import uuid
from functools import lru_cache
from dataclasses import dataclass
from datetime import datetime

from django.conf import settings
from django.db import connection
from django.utils import timezone
from drf_spectacular.extensions import OpenApiAuthenticationExtension
from rest_framework import authentication, exceptions, permissions

from catalog import selectors
from catalog.models import OWNER_SCOPE_OF_KEY_SCOPE, SCOPE_RANK, ApiKey, KeyScope, OwnerScope, OwnerToken
from marketplace.caching import for_a_second
from marketplace.errors import AuthenticationFailuresLimited, Forbidden, NotFound
from marketplace.keys import digest_secret, parse_secret, secret_matches
from marketplace.postgresql import prepared_cursor
from marketplace.rows import model_columns
from marketplace.throttling import authentication_failure_count, authentication_refused_wait

_KINDS = {"mk": ApiKey, "ot": OwnerToken}
# What a presented secret is compared with when no credential has its prefix (no secret's digest is this).
_NO_CREDENTIAL_DIGEST = "0" * 64


def _failed(message: str, code: str) -> exceptions.AuthenticationFailed:
    return exceptions.AuthenticationFailed(message, code=code)


def _guess_failed(request, message: str) -> exceptions.APIException:
    """A secret no credential has (a guess, or a client's mistake), counted against the client's budget of failed
    authentications: 401 `invalid_credentials` within it, 429 past it."""
    wait = authentication_failure_count(request)
    return _failed(message, "invalid_credentials") if wait is None else AuthenticationFailuresLimited(wait)


def _refuse_spent_client(request) -> None:
    """429 for a client past its budget of failed authentications, whatever it presents (a right guess tells it
    nothing). Revoked, expired or deactivated credentials were issued, not guessed: they count no failure."""
    wait = authentication_refused_wait(request)
    if wait is not None:
        raise AuthenticationFailuresLimited(wait)


def presented_secret(request) -> str | None:
    """The bearer secret the request carries (`Authorization: Bearer`, or Masumi's `token:`); None without one or
    under another Authorization scheme (none is served today)."""
    header = request.headers.get("Authorization", "")
    if header:
        scheme, _, secret = header.partition(" ")
        return secret.strip() if scheme.lower() == "bearer" else None
    return request.headers.get("token", "").strip() or None


def presents_agent_key(request) -> bool:
    """Whether the request's bearer secret has the form of an agent API key (not whether it is one)."""
    secret = presented_secret(request)
    parsed = None if secret is None else parse_secret(secret)
    return parsed is not None and _KINDS.get(parsed[0]) is ApiKey


def _refuse_unusable(*, revoked_at: datetime | None, expires_at: datetime | None, agent_is_active: bool,
                     owner_is_active: bool, now: datetime) -> None:
    if revoked_at is not None:
        raise _failed("These credentials were revoked.", "credentials_revoked")
    if expires_at is not None and expires_at <= now:
        raise _failed("These credentials have expired.", "credentials_expired")
    if not agent_is_active:
        raise _failed("This agent is deactivated.", "agent_inactive")
    if not owner_is_active:
        raise _failed("This owner account is deactivated.", "owner_inactive")


class BearerKeyAuthentication(authentication.BaseAuthentication):
    def authenticate(self, request):
        secret = presented_secret(request)
        if secret is None:
            return None  # no credentials, or another scheme: left to other authenticators
        _refuse_spent_client(request)
        parsed = parse_secret(secret)
        if parsed is None or parsed[0] not in _KINDS:
            raise _guess_failed(request, "Malformed credentials.")
        model = _KINDS[parsed[0]]
        credential = credential_with_holders(model, prefix=parsed[1])
        # An unknown prefix costs the hash a wrong secret does: the answer's time tells nothing of which exist.
        digest = credential.secret_digest if credential is not None else _NO_CREDENTIAL_DIGEST
        if not secret_matches(secret, digest) or credential is None:
            raise _guess_failed(request, "Unknown credentials.")
        user = credential.agent.owner if model is ApiKey else credential.owner
        now = timezone.now()
        _refuse_unusable(revoked_at=credential.revoked_at, expires_at=credential.expires_at,
                         agent_is_active=credential.agent.is_active if model is ApiKey else True,
                         owner_is_active=user.is_active, now=now)
        _touch(model, credential.pk, credential.last_used_at, now)
        return user, credential

    def authenticate_header(self, request):
        return 'Bearer realm="api"'


# A credential and who holds it, each joined on the foreign key of the one before: ApiKey -> Agent -> owner,
# OwnerToken -> owner.
_HOLDER_CHAINS = {ApiKey: ("agent", "owner"), OwnerToken: ("owner",)}


@lru_cache(maxsize=len(_HOLDER_CHAINS))
def _credential_statement(model) -> tuple[str, list]:
    """The SELECT of a credential by prefix with its holders, and per model its columns and the relation it is
    cached on: what `select_related(...).filter(prefix=...)` runs, built once per process (compiling that query on
    every request was most of authentication's CPU, and authentication most of a small request's)."""
    quote, parts, joins, previous, previous_alias = connection.ops.quote_name, [], [], model, "t0"
    chain = [(model, None)]
    for name in _HOLDER_CHAINS[model]:
        relation = previous._meta.get_field(name)
        chain.append((relation.related_model, relation))
        previous = relation.related_model
    for index, (part, relation) in enumerate(chain):
        alias = f"t{index}"
        if relation is not None:
            joins.append(f"JOIN {quote(part._meta.db_table)} {alias} ON {alias}.{quote(part._meta.pk.column)} = "
                         f"{previous_alias}.{quote(relation.column)}")
        parts.append((model_columns(part, alias), relation))
        previous_alias = alias
    return (f"SELECT {', '.join(columns.select for columns, _ in parts)} "  # noqa: S608
            f"FROM {quote(model._meta.db_table)} t0 {' '.join(joins)} "
            f"WHERE t0.{quote(model._meta.get_field('prefix').column)} = %s", parts)


def credential_with_holders(model, *, prefix: str):
    """The ApiKey (with its agent and the agent's owner) or OwnerToken (with its owner) of `prefix`, or None."""
    sql, parts = _credential_statement(model)
    with prepared_cursor() as cursor:
        cursor.execute(sql, [prefix])
        row = cursor.fetchone()
    if row is None:
        return None
    values, objects = iter(row), []
    for columns, relation in parts:
        instance = columns.instance(values)
        if relation is not None:
            relation.set_cached_value(objects[-1], instance)
        objects.append(instance)
    return objects[0]


@dataclass(frozen=True)
class KeyHolder:
    """An agent API key and what its use depends on, as the metered proxy authenticates it on every call: read
    from the database at most once per CREDENTIAL_CACHE_SECONDS per process, checked on every call. So a
    revocation, an expiry or a deactivation takes effect within that time (one second by default)."""

    pk: int
    prefix: str
    scope: str
    agent_id: uuid.UUID
    owner_id: int
    agent_handle: str
    agent_is_active: bool
    owner_is_active: bool
    revoked_at: datetime | None
    expires_at: datetime | None

    def grants(self, scope: str) -> bool:
        # A KeyScope hashes and compares as its value: the plain strings look it up without building the enum.
        return SCOPE_RANK[self.scope] >= SCOPE_RANK[scope]


# Keyed by the presented secret's digest: a holder is answered only for a secret that matched its key's digest.
@for_a_second(key=lambda prefix, digest: digest)
def _key_holder_read(prefix: str, digest: str) -> KeyHolder | None:
    key = credential_with_holders(ApiKey, prefix=prefix)
    expected = key.secret_digest if key is not None else _NO_CREDENTIAL_DIGEST  # as long a compare either way
    if not hmac.compare_digest(expected, digest) or key is None:
        return None
    _touch(ApiKey, key.pk, key.last_used_at, timezone.now())
    return KeyHolder(pk=key.pk, prefix=key.prefix, scope=key.scope, agent_id=key.agent_id, owner_id=key.agent.owner_id,
                     agent_handle=key.agent.handle, agent_is_active=key.agent.is_active,
                     owner_is_active=key.agent.owner.is_active, revoked_at=key.revoked_at, expires_at=key.expires_at)


def agent_key_holder(request, *, scope: str) -> KeyHolder:
    """The agent API key the request carries, holding `scope`: the same answers as BearerKeyAuthentication with
    agent_scope(scope) (401 without usable credentials, 403 for an owner's credentials or a narrower key), from a
    per-process cache of one second (KeyHolder)."""
    secret = presented_secret(request)
    if secret is None:
        raise exceptions.NotAuthenticated()
    _refuse_spent_client(request)
    parsed = parse_secret(secret)
    if parsed is None or parsed[0] not in _KINDS:
        raise _guess_failed(request, "Malformed credentials.")
    if _KINDS[parsed[0]] is not ApiKey:
        BearerKeyAuthentication().authenticate(request)  # an owner's credentials: 401 unless they are usable
        raise Forbidden("This endpoint needs an agent API key.", code="agent_key_required")
    holder = _key_holder_read(parsed[1], digest_secret(secret))
    if holder is None:
        raise _guess_failed(request, "Unknown credentials.")
    _refuse_unusable(revoked_at=holder.revoked_at, expires_at=holder.expires_at,
                     agent_is_active=holder.agent_is_active, owner_is_active=holder.owner_is_active,
                     now=timezone.now())
    if not holder.grants(scope):
        raise Forbidden(f"This endpoint needs an agent API key with the `{scope}` scope.", code="insufficient_scope")
    return holder


def _touch(model, pk: int, last_used_at: datetime | None, now: datetime) -> None:
    """Record use at most once a minute per credential, so authentication is not a write on every request."""
    if last_used_at is None or last_used_at < now - settings.API_KEY_LAST_USED_RESOLUTION:
        model.objects.filter(pk=pk).update(last_used_at=now)


def agent_scope(scope: str) -> type[permissions.BasePermission]:
    """Permission: an agent API key holding `scope` (read < pay < admin)."""

    class HasAgentScope(permissions.BasePermission):
        message = f"This endpoint needs an agent API key with the `{scope}` scope."
        code = "insufficient_scope"

        def has_permission(self, request, view):
            if not isinstance(request.auth, ApiKey):
                self.message = "This endpoint needs an agent API key."
                self.code = "agent_key_required"
                return False
            return request.auth.grants(scope)

    HasAgentScope.__name__ = f"HasAgentScope_{scope}"
    return HasAgentScope


def anyone_or_agent_scope(scope: str) -> type[permissions.BasePermission]:
    """Permission for a route anyone may call (the x402 skill route: the signed payment is the credential), where an
    agent API key, when sent, makes that agent the caller: the key must hold `scope`, as on the agent's other routes."""

    class AnyoneOrAgentWithScope(permissions.BasePermission):
        message = f"An agent API key sent here needs the `{scope}` scope (or send none)."
        code = "insufficient_scope"

        def has_permission(self, request, view):
            return not isinstance(request.auth, ApiKey) or request.auth.grants(scope)

    AnyoneOrAgentWithScope.__name__ = f"AnyoneOrAgentWithScope_{scope}"
    return AnyoneOrAgentWithScope


class IsOwner(permissions.BasePermission):
    """A person acting for themselves: an owner token or an admin session; never an agent's key."""

    message = "This endpoint needs an owner token (agents cannot act for their owners)."
    code = "owner_credentials_required"

    def has_permission(self, request, view):
        if isinstance(request.auth, OwnerToken):
            return True
        return request.auth is None and request.user.is_authenticated


def owner_scope(scope: str) -> type[permissions.BasePermission]:
    """Permission (IsOwner) whose owner token holds `scope` (read < approve < admin): 403 `insufficient_scope`
    otherwise. An admin session (a person signed in) acts with every scope."""

    class IsOwnerWithScope(IsOwner):
        def has_permission(self, request, view):
            if not super().has_permission(request, view):
                return False
            owner_token_scope_check(request, scope)
            return True

    IsOwnerWithScope.__name__ = f"IsOwnerWithScope_{scope}"
    return IsOwnerWithScope


def owner_scope_by_method(*, read: str = OwnerScope.READ, write: str) -> type[permissions.BasePermission]:
    """owner_scope(read) for GET and HEAD, owner_scope(write) for the other methods."""

    reading, writing = owner_scope(read)(), owner_scope(write)()  # made once, not a class per request

    class IsOwnerWithScopeOfMethod(IsOwner):
        def has_permission(self, request, view):
            return (reading if request.method in permissions.SAFE_METHODS else writing).has_permission(request, view)

    IsOwnerWithScopeOfMethod.__name__ = f"IsOwnerWithScopeOfMethod_{read}_{write}"
    return IsOwnerWithScopeOfMethod


def owner_token_scope_check(request, scope: str) -> None:
    if isinstance(request.auth, OwnerToken) and not request.auth.grants(scope):
        raise Forbidden(f"This endpoint needs an owner token with the `{scope}` scope.", code="insufficient_scope",
                        details={"scope_needed": scope, "token_scopes": request.auth.scopes})


class IsAgentOrOwner(permissions.BasePermission):
    """An agent API key or its owner's credentials, for routes under /agents/{agent_id}/ that either may use (the
    Pægents SDK calls them with the agent's key, or with an owner token); `acting_agent` checks which agent."""

    message = "This endpoint needs an agent API key or an owner token."
    code = "not_authenticated"

    def has_permission(self, request, view):
        return isinstance(request.auth, ApiKey) or IsOwner().has_permission(request, view)


def agent_or_owner(scope: str) -> type[permissions.BasePermission]:
    """Permission (IsAgentOrOwner) for a route under /agents/{agent_id}/: an agent key must be that agent's and hold
    `scope`, checked here, before the handler: an `Idempotency-Key` replay answers without running the handler, so
    a narrower key of the agent repeating an admin key's request was given its stored answer, secrets included."""

    class IsAgentWithScopeOrOwner(IsAgentOrOwner):
        def has_permission(self, request, view):
            if isinstance(request.auth, ApiKey):
                acting_agent(request, view.kwargs["agent_id"], scope=scope)  # 404 or 403 as the handler says
                return True
            if not super().has_permission(request, view):
                return False
            owner_token_scope_check(request, OWNER_SCOPE_OF_KEY_SCOPE[KeyScope(scope)])
            return True

    IsAgentWithScopeOrOwner.__name__ = f"IsAgentWithScopeOrOwner_{scope}"
    return IsAgentWithScopeOrOwner


def acting_agent(request, agent_id, *, scope: str):
    """The agent `agent_id` when the caller is that agent (with `scope`) or owns it; 404 otherwise."""
    if isinstance(request.auth, ApiKey):
        if request.auth.agent_id != agent_id:
            raise NotFound("No such agent.", code="agent_not_found")
        if not request.auth.grants(scope):
            raise Forbidden(f"This endpoint needs an agent API key with the `{scope}` scope.",
                            code="insufficient_scope")
        return request.auth.agent
    return selectors.agent_get(agent_id=agent_id, owner=request.user)


class IsOperator(permissions.BasePermission):
    message = "This endpoint is for marketplace operators."
    code = "operator_required"

    def has_permission(self, request, view):
        if not (IsOwner().has_permission(request, view) and request.user.is_staff):
            return False
        owner_token_scope_check(request, OwnerScope.ADMIN)  # an operator's narrower token acts as an owner only
        return True


def operator_with(permission: str) -> type[permissions.BasePermission]:
    """Permission: an operator (IsOperator) holding the Django `permission` ("app_label.codename"), as the admin's
    operator actions need it (marketplace.admin.may_operate): staff who may only view act through the API no more than
    in the admin."""

    class IsOperatorWith(IsOperator):
        message = f"This endpoint is for marketplace operators with the `{permission}` permission."

        def has_permission(self, request, view):
            return super().has_permission(request, view) and request.user.has_perm(permission)

    IsOperatorWith.__name__ = f"IsOperatorWith_{permission.replace('.', '_')}"
    return IsOperatorWith


def calling_agent(request):
    return request.auth.agent


class BearerKeyScheme(OpenApiAuthenticationExtension):
    target_class = BearerKeyAuthentication
    name = ["AgentKey", "OwnerToken"]

    def get_security_definition(self, auto_schema):
        return [
            {"type": "http", "scheme": "bearer", "description": "Agent API key (`mk_...`)."},
            {"type": "http", "scheme": "bearer", "description": "Owner token (`ot_...`)."},
        ]
