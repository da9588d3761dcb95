"""Print the demo credentials again: `manage.py demo_keys --reissue` revokes the demo keys and prints new ones.

Keys are stored hashed and cannot be shown twice; after a restart this is how a developer gets working ones.
"""

from django.core.management.base import BaseCommand, CommandError
from django.db import transaction

from catalog.management.commands.seed_demo import demo_credentials_issue, demo_wallet_lines, write_credentials
from catalog.models import Agent


class Command(BaseCommand):
    help = "Show the demo wallets; with --reissue, revoke the demo API keys and owner token and print new ones."

    def add_arguments(self, parser):
        parser.add_argument("--reissue", action="store_true", help="Revoke the demo keys and print new ones.")

    @transaction.atomic
    def handle(self, *args, reissue, **options):
        if not Agent.objects.filter(handle="demo-buyer").exists():
            raise CommandError("No demo data: run `manage.py seed_demo` first.")
        if reissue:
            write_credentials(self.stdout, self.style, demo_credentials_issue())
            return
        self.stdout.write("Keys are shown only when issued; `manage.py demo_keys --reissue` revokes the demo keys "
                          "and prints new ones.")
        for line in demo_wallet_lines():
            self.stdout.write(line)
