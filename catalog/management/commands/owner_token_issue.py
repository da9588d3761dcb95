"""Issue an owner token for a person's account and print it once: how an owner gets a first token (with it, the
owner issues narrower ones through `POST /owner-tokens`).

    manage.py owner_token_issue <username> [--scope read|approve|admin] [--name NAME] [--expires-in-days N]
"""

from datetime import timedelta

from django.contrib.auth import get_user_model
from django.core.management.base import BaseCommand, CommandError
from django.utils import timezone

from catalog import services
from catalog.models import OwnerScope
from marketplace.errors import ApplicationError


class Command(BaseCommand):
    help = "Issue an owner token for an account (a person who owns agents) and print it once."

    def add_arguments(self, parser):
        parser.add_argument("username")
        parser.add_argument("--scope", choices=OwnerScope.values, default=OwnerScope.ADMIN,
                            help="read < approve < admin (default admin: a first token issues the others)")
        parser.add_argument("--name", default="", help="what the token is for, as its owner will see it listed")
        parser.add_argument("--expires-in-days", type=int, default=None, help="default: never")

    def handle(self, *args, username, scope, name, expires_in_days, **options):
        owner = get_user_model().objects.filter(username=username).first()
        if owner is None:
            raise CommandError(f"No account named {username!r}.")
        if not owner.is_active:
            raise CommandError(f"The account {username!r} is deactivated.")
        if expires_in_days is not None and expires_in_days <= 0:
            raise CommandError("--expires-in-days must be at least 1.")
        expires_at = None if expires_in_days is None else timezone.now() + timedelta(days=expires_in_days)
        try:
            issued = services.owner_token_issue(owner=owner, scope=scope, name=name, expires_at=expires_at)
        except ApplicationError as error:
            raise CommandError(error.message) from None
        self.stdout.write(f"Owner token for {username} ({scope}), shown once: {issued.secret}")
