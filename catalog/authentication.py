"""Bearer authentication for agents (API keys, `mk_...`) and owners (owner tokens, `ot_...`).

`Authorization: Bearer <secret>` for both; the Masumi `token: <secret>` header is accepted for agent keys.
On success `request.user` is the owner (a Django user) and `request.auth` the ApiKey or OwnerToken.
"""

from django.conf import settings
from django.utils import timezone
from drf_spectacular.extensions import OpenApiAuthenticationExtension
from rest_framework import authentication, exceptions, permissions

from catalog import selectors
from catalog.models import ApiKey, OwnerToken
from marketplace.errors import Forbidden, NotFound
from marketplace.keys import parse_secret, secret_matches

_KINDS = {"mk": ApiKey, "ot": OwnerToken}


def _failed(message: str, code: str) -> exceptions.AuthenticationFailed:
    return exceptions.AuthenticationFailed(message, code=code)


class BearerKeyAuthentication(authentication.BaseAuthentication):
    def authenticate(self, request):
        header = request.headers.get("Authorization", "")
        if header:
            scheme, _, secret = header.partition(" ")
            if scheme.lower() != "bearer":
                return None  # Leave other schemes (none today) to other authenticators.
            secret = secret.strip()
        else:
            secret = request.headers.get("token", "").strip()
            if not secret:
                return None
        parsed = parse_secret(secret)
        if parsed is None or parsed[0] not in _KINDS:
            raise _failed("Malformed credentials.", "invalid_credentials")
        model = _KINDS[parsed[0]]
        related = "agent__owner" if model is ApiKey else "owner"
        credential = model.objects.select_related(related).filter(prefix=parsed[1]).first()
        if credential is None or not secret_matches(secret, credential.secret_digest):
            raise _failed("Unknown credentials.", "invalid_credentials")
        now = timezone.now()
        if credential.revoked_at is not None:
            raise _failed("These credentials were revoked.", "credentials_revoked")
        if credential.expires_at is not None and credential.expires_at <= now:
            raise _failed("These credentials have expired.", "credentials_expired")
        if model is ApiKey:
            if not credential.agent.is_active:
                raise _failed("This agent is deactivated.", "agent_inactive")
            user = credential.agent.owner
        else:
            user = credential.owner
        if not user.is_active:
            raise _failed("This owner account is deactivated.", "owner_inactive")
        _touch(model, credential, now)
        return user, credential

    def authenticate_header(self, request):
        return 'Bearer realm="api"'


def _touch(model, credential, now) -> None:
    """Record use at most once a minute per credential, so authentication is not a write on every request."""
    stale = now - settings.API_KEY_LAST_USED_RESOLUTION
    if credential.last_used_at is None or credential.last_used_at < stale:
        model.objects.filter(pk=credential.pk).update(last_used_at=now)


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


class IsOwner(permissions.BasePermission):
    """A person acting for themselves: an owner token or an admin session; never an agent's key."""

    message = "This endpoint needs an owner token (agents cannot act for their owners)."
    code = "owner_credentials_required"

    def has_permission(self, request, view):
        if isinstance(request.auth, OwnerToken):
            return True
        return request.auth is None and request.user.is_authenticated


class IsAgentOrOwner(permissions.BasePermission):
    """An agent API key or its owner's credentials, for routes under /agents/{agent_id}/ that either may use (the
    Pægents SDK calls them with the agent's key, or with an owner token); `acting_agent` checks which agent."""

    message = "This endpoint needs an agent API key or an owner token."
    code = "not_authenticated"

    def has_permission(self, request, view):
        return isinstance(request.auth, ApiKey) or IsOwner().has_permission(request, view)


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
        return IsOwner().has_permission(request, view) and request.user.is_staff


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
