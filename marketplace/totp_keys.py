"""The operators' TOTP keys, encrypted at rest. The server needs a key itself to compute the app's codes, so it cannot
keep a digest as it does for recovery codes: it keeps the key sealed with Fernet (AES-128-CBC and HMAC-SHA256) under
SECOND_FACTOR_KEY, which lives in the environment, not in the database. A database read (a backup, a replica, an SQL
injection) gives no key; whoever also holds the application's secrets reads them all (SECURITY.md).

Without SECOND_FACTOR_KEY the sealing key is derived from SECRET_KEY. Either is run through HKDF-SHA256, so any
string works (a long random one: `python -c "import secrets; print(secrets.token_urlsafe(32))"`). Keys listed in
SECOND_FACTOR_OLD_KEYS still open what they sealed, for a rotation: `manage.py admin_totp_reseal` seals every key
under the current one, after which the old ones can go.

A sealed key is bound to its row: what is sealed is the device's primary key and its user's, then the key, so
Fernet's HMAC covers the binding. Whoever can write the database but holds no sealing key cannot put one operator's
sealed key on another's device (or move a device to another operator) and log in as them with the first one's app:
`totp_key_open` refuses a key sealed for another device (`TotpKeyNotBound`). Migration marketplace.0007 bound the keys
sealed before; a key sealed unbound (from a backup of before) is refused alike.
"""

import base64
import hashlib
import hmac

from cryptography.fernet import Fernet, InvalidToken, MultiFernet
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from django.conf import settings

# Binds the derived key to this use: SECRET_KEY signs sessions too, and never seals anything as it is.
_PURPOSE = b"agent-escrow-marketplace: operators' TOTP keys"
_RECOVERY_PURPOSE = b"agent-escrow-marketplace: operators' recovery codes"
_RECOVERY_BOUND = b"recovery-code-bound-v1:"


# What is sealed: b"<_BOUND><device pk>:<user pk>:" then the key's bytes.
_BOUND = b"totp-key-bound-v1:"


class TotpKeyUnreadable(Exception):
    """None of the configured keys opens a sealed key: another SECOND_FACTOR_KEY (or SECRET_KEY, its fallback) than
    the one it was sealed under, or a value that is not ours."""


class TotpKeyNotBound(TotpKeyUnreadable):
    """A sealed key that opens, but was sealed for another device or user (copied from another operator's row by
    someone writing the database), or for none (sealed before keys were bound)."""


def totp_key_seal(key: bytes, *, device_id: int, user_id: int) -> str:
    """`key` sealed for the device `device_id` of the user `user_id` (the row must exist: its primary key counts)."""
    return _keys().encrypt(_binding(device_id, user_id) + key).decode()


def totp_key_open(sealed: str, *, device_id: int, user_id: int) -> bytes:
    try:
        opened = _keys().decrypt(sealed.encode())
    except InvalidToken as error:
        raise TotpKeyUnreadable from error
    binding = _binding(device_id, user_id)
    if not opened.startswith(binding):
        raise TotpKeyNotBound
    return opened[len(binding):]


def totp_key_reseal(sealed: str, *, device_id: int, user_id: int) -> str:
    """`sealed` sealed anew under the current key (it may have been sealed under an old one), if it is this
    device's."""
    return totp_key_seal(totp_key_open(sealed, device_id=device_id, user_id=user_id), device_id=device_id,
                         user_id=user_id)


def _binding(device_id: int, user_id: int) -> bytes:
    return _BOUND + f"{int(device_id)}:{int(user_id)}:".encode()


def _keys() -> MultiFernet:
    # Read per call, not at import: HKDF costs microseconds, logins are rare, and a test's settings count.
    return MultiFernet([Fernet(base64.urlsafe_b64encode(_derived(secret, _PURPOSE))) for secret in _secrets()])


def recovery_code_digests(code_sha256: str, *, device_id: int, user_id: int) -> list[str]:
    """The digests a recovery code whose SHA-256 (hex) is `code_sha256` is kept as on the device `device_id` of the
    user `user_id`: HMAC-SHA256 under a key derived from SECOND_FACTOR_KEY (the first, which new codes are kept under)
    and from each of SECOND_FACTOR_OLD_KEYS. A database writer who holds none cannot add a code of their own to an
    operator's device, nor move another operator's codes (or device) over."""
    binding = _RECOVERY_BOUND + f"{int(device_id)}:{int(user_id)}:".encode() + code_sha256.encode()
    return [hmac.new(_derived(secret, _RECOVERY_PURPOSE), binding, hashlib.sha256).hexdigest()
            for secret in _secrets()]


def _secrets() -> list[str]:
    return [settings.SECOND_FACTOR_KEY or settings.SECRET_KEY, *settings.SECOND_FACTOR_OLD_KEYS]


def _derived(secret: str, purpose: bytes) -> bytes:
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=purpose).derive(secret.encode())
