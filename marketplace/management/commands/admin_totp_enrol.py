"""Enrol the admin's second factor for a staff user: `manage.py admin_totp_enrol <username>`, a TOTP device and
recovery codes.

The only way a device is enrolled (the admin adds none), so the first operator of a production deployment is
enrolled from the shell, after `manage.py createsuperuser`, and nobody needs the admin to get into the admin.
"""

import base64
import io

import segno
from django.contrib.auth import get_user_model
from django.core.management.base import BaseCommand, CommandError

from marketplace import second_factor
from marketplace.errors import InvalidInput


class Command(BaseCommand):
    help = ("Enrol a TOTP device, the admin's second factor, for a staff user and print its QR code and otpauth:// "
            "URI, and single-use recovery codes, once. Run again for the same user, it replaces the device and the "
            "recovery codes: the old ones stop working.")

    def add_arguments(self, parser):
        parser.add_argument("username")

    def handle(self, *args, username, **options):
        user_model = get_user_model()
        user = user_model.objects.filter(**{user_model.USERNAME_FIELD: username}).first()
        if user is None:
            raise CommandError(f"No user {username!r}: create one first (`manage.py createsuperuser`).")
        try:
            enrolment = second_factor.devices_enrol(user=user)
        except InvalidInput as error:
            raise CommandError(error.message) from error

        if enrolment.replaced:
            self.stdout.write(self.style.WARNING(
                f"Replaced the device and recovery codes enrolled before for {username}: they no longer log in, and "
                "sessions they verified must log in again."))
        device = enrolment.device
        qr = io.StringIO()  # segno writes a line at a time; self.stdout would end every write with a newline
        segno.make(device.config_url, error="m").terminal(out=qr, compact=True)
        key = base64.b32encode(device.key()).decode()
        self.stdout.write(
            f"Scan this with an authenticator app on {username}'s phone (shown this once; the key is not shown "
            "again, here or in the admin):\n")
        self.stdout.write(qr.getvalue(), ending="")
        self.stdout.write(f"\n{device.config_url}\n\nOr type the key in by hand (time-based, 6 digits, 30 s): "
                          f"{' '.join(key[i:i + 4] for i in range(0, len(key), 4))}")
        self.stdout.write(
            f"\nRecovery codes for {username}, should the phone be lost: each logs in once in place of the app's "
            "code. Keep them apart from the phone (shown this once; run this command again for new ones):")
        for recovery_code in enrolment.recovery_codes:
            self.stdout.write(f"  {recovery_code}")
        self.stdout.write(self.style.SUCCESS(
            f"\n{username} now logs into the admin with their password and the app's current code (or a recovery "
            "code)."))
