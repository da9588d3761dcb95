"""Issue an owner token for a person's account and print it once: how an owner gets a first token (with it, the
owner issues narrower ones through `POST /owner-tokens`).

    manage.py owner_token_issue <username> [--scope read|approve|admin] [--name NAME] [--expires-in-days N]
                                [--operator]

No operator identity is asked: whoever runs manage.py holds the database's credentials and SECRET_KEY, and could
write a token's row themselves, so a name they give would prove nothing. What the command does is logged (a WARNING
naming the account, the token's prefix and scope, and the OS user who ran it): the token's row alone does not tell a
token issued here from one an admin session issued. An admin-scope token of a staff account acts as an operator in
the API (disputes, credentials) with no second factor, so it is issued only with `--operator`: a username mistyped
for an owner's does not mint one.
"""

import getpass
import logging
from datetime import timedelta

from django.contrib.auth import get_user_model
from django.core.management.base import BaseCommand, CommandError
from django.utils import timezone

from catalog import services
from catalog.models import OwnerScope
from marketplace.errors import ApplicationError

logger = logging.getLogger(__name__)


class Command(BaseCommand):
    help = "Issue an owner token for an account (a person who owns agents) and print it once."

    def add_arguments(self, parser):
        parser.add_argument("username")
        parser.add_argument("--scope", choices=OwnerScope.values, default=OwnerScope.ADMIN,
                            help="read < approve < admin (default admin: a first token issues the others)")
        parser.add_argument("--name", default="", help="what the token is for, as its owner will see it listed")
        parser.add_argument("--expires-in-days", type=int, default=None, help="default: never")
        parser.add_argument("--operator", action="store_true",
                            help="the account is staff and the admin-scope token is to act as an operator in the API")

    def handle(self, *args, username, scope, name, expires_in_days, operator, **options):
        owner = get_user_model().objects.filter(username=username).first()
        if owner is None:
            raise CommandError(f"No account named {username!r}.")
        if not owner.is_active:
            raise CommandError(f"The account {username!r} is deactivated.")
        if expires_in_days is not None and expires_in_days <= 0:
            raise CommandError("--expires-in-days must be at least 1.")
        if owner.is_staff and scope == OwnerScope.ADMIN and not operator:
            raise CommandError(f"{username!r} is staff: an admin-scope token acts as an operator in the API, without "
                               "the admin's second factor. Pass --operator if that is meant, or a narrower --scope.")
        expires_at = None if expires_in_days is None else timezone.now() + timedelta(days=expires_in_days)
        try:
            issued = services.owner_token_issue(owner=owner, scope=scope, name=name, expires_at=expires_at)
        except ApplicationError as error:
            raise CommandError(error.message) from None
        logger.warning("owner token issued from the shell", extra={
            "owner_id": owner.pk, "token_prefix": issued.credential.prefix, "scope": scope,
            "expires_at": None if expires_at is None else expires_at.isoformat(), "operator": owner.is_staff,
            "os_user": _os_user()})
        self.stdout.write(f"Owner token for {username} ({scope}), shown once: {issued.secret}")


def _os_user() -> str:
    try:
        return getpass.getuser()
    except OSError:  # no login name in the environment and no entry for the uid (a container's)
        return "unknown"
