"""Bearer secrets (agent API keys, owner tokens): random, shown once, stored as a SHA-256 digest.

A secret looks like `<kind>_<prefix>_<random>`; the prefix is stored in clear for lookup and display.
SHA-256 (not a slow password hash) is right here: the secrets carry 190+ bits of randomness.
"""

import hashlib
import hmac
import secrets
from dataclasses import dataclass

PREFIX_LENGTH = 10


@dataclass(frozen=True)
class IssuedSecret:
    plaintext: str
    prefix: str
    digest: str


def issue_secret(kind: str) -> IssuedSecret:
    prefix = secrets.token_hex(PREFIX_LENGTH // 2)
    plaintext = f"{kind}_{prefix}_{secrets.token_urlsafe(32)}"
    return IssuedSecret(plaintext=plaintext, prefix=prefix, digest=digest_secret(plaintext))


def digest_secret(plaintext: str) -> str:
    return hashlib.sha256(plaintext.encode()).hexdigest()


def parse_secret(plaintext: str) -> tuple[str, str] | None:
    """(kind, prefix) of a well-formed secret, else None. No NUL: PostgreSQL's text cannot hold one (the prefix's
    lookup raised, a 500)."""
    parts = plaintext.split("_", 2)
    if len(parts) != 3 or len(parts[1]) != PREFIX_LENGTH or not parts[2] or "\x00" in parts[1]:
        return None
    return parts[0], parts[1]


def secret_matches(plaintext: str, digest: str) -> bool:
    return hmac.compare_digest(digest_secret(plaintext), digest)
