"""Credentials written into a URL a user registers (`https://user:password@host/`, `https://token@host/`).

The marketplace authenticates its calls to sellers and webhook receivers by signing them (X-Marketplace-Signature,
Marketplace-Signature), never by a credential the receiver gave it: `outbound.url_check` refuses a URL with userinfo
(400 `credentials_in_url`), and one saved before is called without it by every client (`without_credentials`),
shown with it masked to operators and in logs (`credentials_masked`), and without it to anyone but its owner. A
webhook's address is shown with its path masked too (`path_masked`) but to staff who may change it: a Slack-style
webhook's path is its credential.
It is searched by its host only (`url__host_contains`): a search on the whole URL told, by whether a row was listed,
the userinfo a character at a time.
"""

import re
from urllib.parse import urlsplit

from django.db import models
from django.db.models import Lookup
from django.db.models.lookups import IRegex


def has_credentials(url: str) -> bool:
    """Whether the URL holds userinfo (`user:password@`, `token@`): everything before the authority's last `@`."""
    return "@" in urlsplit(url).netloc


def without_credentials(url: str) -> str:
    """`url` without its userinfo: the URL every client of the marketplace calls, and shows to anyone but its owner."""
    parts = urlsplit(url)
    if "@" not in parts.netloc:
        return url
    return parts._replace(netloc=parts.netloc.rpartition("@")[2]).geturl()


def credentials_masked(url: str) -> str:
    """`url` as the admin and logs show it: its userinfo, if any, as `***`, so an operator sees that it held some."""
    parts = urlsplit(url)
    if "@" not in parts.netloc:
        return url
    return parts._replace(netloc="***@" + parts.netloc.rpartition("@")[2]).geturl()


def path_masked(url: str) -> str:
    """`url` as staff who may not change it see it: its scheme and host (its userinfo, if any, as `***@`), and `/***`
    for whatever follows: a Slack- or Discord-style webhook's path is its credential (whoever reads it posts to it)."""
    parts = urlsplit(credentials_masked(url))
    shown = f"{parts.scheme}://{parts.netloc}"
    return f"{shown}/***" if parts.path.strip("/") or parts.query or parts.fragment else shown


# Where a term may match a URL: in its host (and port), past the authority's last `@`, never in its userinfo.
_NOT_IN_HOST = re.compile(r"[@/?#\\\s]")
_MATCHES_NOTHING = "^$"  # a URL is never empty


@models.URLField.register_lookup
class HostContains(Lookup):
    """`url__host_contains=term`: whether the URL's host holds `term` (case-insensitive), on PostgreSQL and SQLite.
    The admin's lists search URLs with it. A term that could reach past the host (holding `@`, `/`, `?`, `#`) matches
    nothing: `hunter2@hooks.example.com` would otherwise find `https://user:hunter2@hooks.example.com/`."""

    lookup_name = "host_contains"
    prepare_rhs = False

    def as_sql(self, compiler, connection):
        return IRegex(self.lhs, _host_pattern(str(self.rhs))).as_sql(compiler, connection)


def _host_pattern(term: str) -> str:
    if not term or _NOT_IN_HOST.search(term):
        return _MATCHES_NOTHING
    # The optional group takes the userinfo up to the authority's last `@`; the term, with what surrounds it, holds
    # no `@`, so it lies past that one.
    return rf"^[^:/?#]+://([^/?#]*@)?[^/?#@]*{re.escape(term)}[^/?#@]*([/?#]|$)"
