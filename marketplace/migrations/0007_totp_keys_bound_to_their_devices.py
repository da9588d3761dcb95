"""TOTP keys bound to their device (marketplace.totp_keys): each key sealed before, Fernet over the key alone, valid on
any row, is sealed anew under the current SECOND_FACTOR_KEY (or SECRET_KEY) together with its device's primary key
and its user's, so that a database writer can no longer put one operator's sealed key on another's device. A key no
configured key opens is left as it is (it is refused as before: enrol that operator anew); one bound already is left
too. Whatever the rows hold when this runs is bound as it is: a key copied onto another device before then is bound
there (SECURITY.md)."""

import base64

from cryptography.fernet import Fernet, InvalidToken, MultiFernet
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from django.conf import settings
from django.db import migrations

BOUND = b"totp-key-bound-v1:"


def keys() -> MultiFernet:
    # marketplace.totp_keys as it is now: a migration keeps its own copy of the rule it applies.
    def fernet(secret: str) -> Fernet:
        derived = HKDF(algorithm=hashes.SHA256(), length=32, salt=None,
                       info=b"agent-escrow-marketplace: operators' TOTP keys").derive(secret.encode())
        return Fernet(base64.urlsafe_b64encode(derived))
    current = settings.SECOND_FACTOR_KEY or settings.SECRET_KEY
    return MultiFernet([fernet(secret) for secret in (current, *settings.SECOND_FACTOR_OLD_KEYS)])


def totp_keys_bind(apps, schema_editor):
    device_model = apps.get_model("marketplace", "AuthenticatorAppDevice")
    sealing = keys()
    for device in device_model.objects.order_by("pk"):
        try:
            key = sealing.decrypt(device.sealed_key.encode())
        except InvalidToken:
            continue
        if key.startswith(BOUND):
            continue
        binding = BOUND + f"{device.pk}:{device.user_id}:".encode()
        device_model.objects.filter(pk=device.pk).update(sealed_key=sealing.encrypt(binding + key).decode())


class Migration(migrations.Migration):

    dependencies = [
        ('marketplace', '0006_totp_keys_kept_sealed'),
    ]

    operations = [
        # Back again, a bound key is refused by the code of before: the operators enrol anew.
        migrations.RunPython(totp_keys_bind, migrations.RunPython.noop),
    ]
