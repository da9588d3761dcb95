"""Seal every operator's TOTP key anew under the current SECOND_FACTOR_KEY: `manage.py admin_totp_reseal`, the second
step of a rotation (README, Operations)."""

from django.core.management.base import BaseCommand, CommandError

from marketplace import second_factor


class Command(BaseCommand):
    help = ("Seal every TOTP device's key anew under the current SECOND_FACTOR_KEY, after a rotation that moved the "
            "replaced key to SECOND_FACTOR_OLD_KEYS; once it succeeds, the old keys can be dropped.")

    def handle(self, *args, **options):
        reseal = second_factor.totp_keys_reseal()
        self.stdout.write(f"Sealed {reseal.resealed} TOTP key(s) under the current SECOND_FACTOR_KEY.")
        self.stdout.write("Recovery codes stay kept under the key they were issued under (a digest cannot be moved): "
                          "they log in while it is in SECOND_FACTOR_OLD_KEYS. Enrol every operator anew "
                          "(`manage.py admin_totp_enrol`) before dropping it.")
        if reseal.unreadable:
            names = ", ".join(f"{device.user.get_username()} (device {device.pk})" for device in reseal.unreadable)
            raise CommandError(
                f"No configured key opens the TOTP key of {names}, or it was sealed for another device (someone "
                "wrote the database): add the key it was sealed under to SECOND_FACTOR_OLD_KEYS and run this again, "
                "or enrol them anew (`manage.py admin_totp_enrol`).")
