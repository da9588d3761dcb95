"""Compare every funded agreement with the escrow contract, and report the chain indexer's lag and the events it
could not apply; exit 1 on any difference or unapplied event (the chain is the truth)."""

from django.conf import settings
from django.core.management.base import BaseCommand, CommandError

from agreements.models import FUNDED_STATUSES, SettlementModel, UsageAgreement
from escrow import selectors

class Command(BaseCommand):
    help = ("Compare the database with the escrow contract for every funded agreement; report the chain indexer's "
            "lag and the contract events it could not apply.")

    def handle(self, *args, **options):
        agreements = UsageAgreement.objects.filter(status__in=FUNDED_STATUSES, settlement_model=SettlementModel.ESCROW)
        problems = selectors.reconciliation_mismatches(agreements=agreements.iterator())
        for event in selectors.indexer_unapplied_events():
            problems.append(f"event {event.name} in block {event.block_number} (tx {event.tx_hash}, log "
                            f"{event.log_index}) for agreement {event.agreement_id} not applied: {event.error}")
        for line in problems:
            self.stdout.write(line)
        self._report_lag()
        if problems:
            raise CommandError(f"{len(problems)} mismatch(es) between the database and the chain.")
        self.stdout.write(self.style.SUCCESS(f"Consistent: {agreements.count()} funded agreement(s) checked."))

    def _report_lag(self) -> None:
        lag = selectors.indexer_lag()
        if lag is None:
            self.stdout.write("Indexer: no escrow contract configured.")
            return
        line = (f"Indexer: applied up to block {lag.indexed_to}, chain head {lag.head}: {lag.lag} block(s) behind "
                f"(CHAIN_CONFIRMATIONS {settings.CHAIN_CONFIRMATIONS}, limit {settings.INDEXER_MAX_LAG_BLOCKS}).")
        self.stdout.write(self.style.WARNING(line) if lag.lag > settings.INDEXER_MAX_LAG_BLOCKS else line)
