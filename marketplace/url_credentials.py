"""Credentials written into a URL a user registers (`https://user:password@host/`, `https://token@host/`).

The marketplace authenticates its calls to sellers and webhook receivers by signing them (X-Marketplace-Signature,
Marketplace-Signature), never by a credential the receiver gave it: `outbound.url_check` refuses a URL with userinfo
(400 `credentials_in_url`), and one saved before is called without it by every client (`without_credentials`),
shown with it masked to operators and in logs (`credentials_masked`), and without it to anyone but its owner.
"""

from urllib.parse import urlsplit


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
