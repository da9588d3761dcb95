"""Compare every funded agreement with the escrow contract; exit 1 on any difference (the chain is the truth)."""

from django.core.management.base import BaseCommand, CommandError

from agreements.models import UsageAgreement
from escrow import selectors

FUNDED = ["active", "in_challenge", "disputed", "settling", "settled", "refunded"]


class Command(BaseCommand):
    help = "Compare the database with the escrow contract for every funded agreement."

    def handle(self, *args, **options):
        agreements = UsageAgreement.objects.filter(status__in=FUNDED, settlement_model="escrow")
        mismatches = selectors.reconciliation_mismatches(agreements=agreements.iterator())
        for line in mismatches:
            self.stdout.write(line)
        if mismatches:
            raise CommandError(f"{len(mismatches)} mismatch(es) between the database and the chain.")
        self.stdout.write(self.style.SUCCESS(f"Consistent: {agreements.count()} funded agreement(s) checked."))
