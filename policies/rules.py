"""A policy's list rules in the one form `PUT /agents/{id}/policies` writes them (and the admin's form, through the
same serializer): lists of text, handles lowercase, service ids hyphenated lowercase, tags as `tag_normalise` keeps
them. Migration 0005 rewrote the rules stored otherwise; evaluation denies by a rule in any other form (fails
closed) rather than guess what its owner meant."""

import unicodedata
import uuid
from collections.abc import Callable
from urllib.parse import urlsplit

from marketplace.tags import tag_normalise


class RuleNotNormalisable(ValueError):
    """A rule whose meaning cannot be told: no list of text nor one text (a number, a mapping), or an entry that
    is no text, or no service id where one goes."""


def _handle(entry: str) -> str:
    return entry.strip().lower()


def _service_id(entry: str) -> str:
    try:
        return str(uuid.UUID(entry.strip()))
    except ValueError:
        raise RuleNotNormalisable(f"{entry!r} is no service id") from None


def _tag(entry: str) -> str:
    tag = tag_normalise(entry)
    if not tag:
        raise RuleNotNormalisable("an empty tag")
    return tag


def _token(entry: str) -> str:
    return entry


_ENTRY_FORMS: dict[str, Callable[[str], str]] = {
    "allowed_sellers": _handle, "blocked_sellers": _handle,
    "allowed_services": _service_id, "blocked_services": _service_id,
    "allowed_tags": _tag, "blocked_tags": _tag,
    "allowed_tokens": _token,
}
LIST_RULES = tuple(_ENTRY_FORMS)


def rule_normalised(name: str, value) -> list[str]:
    """The list rule `name` as the API writes it: a lone text is a list of it; duplicates once each. Raises
    RuleNotNormalisable."""
    entries = [value] if isinstance(value, str) else value
    if not isinstance(entries, list):
        raise RuleNotNormalisable(f"a {type(value).__name__} where a list goes")
    if not all(isinstance(entry, str) for entry in entries):
        raise RuleNotNormalisable("an entry that is no text")
    return list(dict.fromkeys(_ENTRY_FORMS[name](entry) for entry in entries))


def rule_is_canonical(name: str, value) -> bool:
    """Whether the list rule `name` is stored as the API writes it (a repeated entry aside: the API keeps it)."""
    if not isinstance(value, list):
        return False
    try:
        return all(rule_normalised(name, [entry]) == [entry] for entry in value)
    except RuleNotNormalisable:
        return False


# Evaluation's code of a rule not in the form the API writes (`rules_unreadable`): its deny's `reason`, and the code
# the policy's GET flags the rule with.
RULE_UNREADABLE = "rule_unreadable"


def rules_unreadable(policy) -> list[str]:
    """The list rules of `policy` not stored as the API writes them (`rule_is_canonical`), which evaluation denies
    every purchase by (fails closed) until the owner sets them again."""
    return [name for name in LIST_RULES if not rule_is_canonical(name, getattr(policy, name))]


# What a service is beyond its id, for `blocked_services`: a seller deregistering a blocked service and listing the
# same thing again got a new id. Its upstream (host, port and path, whatever the scheme, case, default port,
# trailing slash, query or credentials) is the same whoever lists it; its name (NFKC, case-folded, spaces collapsed)
# the same within its seller's owner.
_DEFAULT_PORTS = {"http": 80, "https": 443}


def upstream_identity(url: str) -> str:
    parts = urlsplit(url.strip())
    host = (parts.hostname or "").rstrip(".")
    try:
        host = host.encode("idna").decode("ascii")
    except UnicodeError:
        pass  # kept as spelt: compared as such
    try:
        port = parts.port
    except ValueError:
        port = None
    port_part = "" if port in (None, _DEFAULT_PORTS.get(parts.scheme.lower())) else f":{port}"
    path = "/".join(segment for segment in parts.path.split("/") if segment)
    return f"{host}{port_part}/{path}".casefold()


def name_identity(name: str) -> str:
    return " ".join(unicodedata.normalize("NFKC", name).casefold().split())


def service_identity(*, service_id, upstream_base_url: str, name: str, seller_owner_id: int | None) -> dict:
    """A blocked service as `Policy.blocked_service_identities` keeps it, and as its listings again are matched."""
    return {"service": str(service_id), "upstream": upstream_identity(upstream_base_url),
            "name": name_identity(name), "seller_owner": seller_owner_id}
