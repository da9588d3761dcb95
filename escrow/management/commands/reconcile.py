"""Compare every funded agreement with the escrow contract, and report the chain indexer's lag and the events it
could not apply; exit 1 on any difference or unapplied event (the chain is the truth). An operator who looked into
an unapplied event acknowledges it (`--acknowledge ID --reason ...`, or the admin's action): it is still listed,
and no longer fails the command."""

import getpass

from django.conf import settings
from django.core.management.base import BaseCommand, CommandError

from agreements.models import FUNDED_STATUSES, SettlementModel, UsageAgreement
from escrow import indexer, selectors
from escrow.models import ChainEvent
from marketplace.errors import ApplicationError

def _describe(event: ChainEvent) -> str:
    return (f"event {event.name} in block {event.block_number} (tx {event.tx_hash}, log {event.log_index}) for "
            f"agreement {event.agreement_id} not applied: {event.error}")


class Command(BaseCommand):
    help = ("Compare the database with the escrow contract for every funded agreement; report the chain indexer's "
            "lag and the contract events it could not apply.")

    def add_arguments(self, parser):
        parser.add_argument("--acknowledge", type=int, nargs="+", metavar="EVENT_ID", default=[],
                            help="Acknowledge these unapplied chain events first (ids as in the admin's Chain "
                                 "events); requires --reason.")
        parser.add_argument("--reason", default="", help="Why the acknowledged events need no action.")
        parser.add_argument("--by", default="", help="Who acknowledges (default: the OS user).")

    def handle(self, *args, **options):
        if options["acknowledge"]:
            self._acknowledge(options["acknowledge"], reason=options["reason"],
                              operator=options["by"] or getpass.getuser())
        agreements = UsageAgreement.objects.filter(status__in=FUNDED_STATUSES, settlement_model=SettlementModel.ESCROW)
        problems = selectors.reconciliation_mismatches(agreements=agreements.iterator())
        problems += [_describe(event) for event in selectors.indexer_unapplied_events()]
        for line in problems:
            self.stdout.write(line)
        for event in selectors.indexer_unapplied_events(acknowledged=True):
            self.stdout.write(f"acknowledged by {event.acknowledged_by} at {event.acknowledged_at:%Y-%m-%d %H:%M:%S %Z}"
                              f" ({event.acknowledgement_reason}): {_describe(event)}")
        self._report_lag()
        if problems:
            raise CommandError(f"{len(problems)} mismatch(es) between the database and the chain.")
        self.stdout.write(self.style.SUCCESS(f"Consistent: {agreements.count()} funded agreement(s) checked."))

    def _acknowledge(self, event_ids: list[int], *, reason: str, operator: str) -> None:
        try:
            count = indexer.events_acknowledge(events=ChainEvent.objects.filter(pk__in=event_ids), operator=operator,
                                               reason=reason)
        except ApplicationError as error:
            raise CommandError(f"{error.message} ({error.code})") from error
        self.stdout.write(f"Acknowledged {count} unapplied event(s).")

    def _report_lag(self) -> None:
        lag = selectors.indexer_lag()
        if lag is None:
            self.stdout.write("Indexer: no escrow contract configured.")
            return
        line = (f"Indexer: applied up to block {lag.indexed_to}, chain head {lag.head}: {lag.lag} block(s) behind "
                f"(CHAIN_CONFIRMATIONS {settings.CHAIN_CONFIRMATIONS}, limit {settings.INDEXER_MAX_LAG_BLOCKS}).")
        self.stdout.write(self.style.WARNING(line) if lag.lag > settings.INDEXER_MAX_LAG_BLOCKS else line)
