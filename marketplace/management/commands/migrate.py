"""Django's `migrate`, without the statement timeout the serving processes keep (DB_STATEMENT_TIMEOUT_SECONDS): a
schema change or a data migration on a large table takes what it takes, and one cancelled half-way is rolled back and
has to start again, every deploy."""

from django.core.management.commands.migrate import Command as DjangoMigrate
from django.db import connections


class Command(DjangoMigrate):
    def handle(self, *args, **options):
        connection = connections[options["database"]]
        if connection.vendor != "postgresql":
            return super().handle(*args, **options)
        with connection.cursor() as cursor:
            cursor.execute("SET statement_timeout = 0")
        try:
            return super().handle(*args, **options)
        finally:
            with connection.cursor() as cursor:
                cursor.execute("RESET statement_timeout")  # back to its startup options' or its role's
