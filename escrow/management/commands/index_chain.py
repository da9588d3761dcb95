"""Follow the escrow contract's events and apply them to the agreements (see escrow.indexer)."""

import signal
import time

from django.conf import settings
from django.core.management.base import BaseCommand

from escrow import chain, indexer


class Command(BaseCommand):
    help = "Index the escrow contract's events up to the confirmation depth: once (default), or --follow."

    def add_arguments(self, parser):
        mode = parser.add_mutually_exclusive_group()
        mode.add_argument("--once", action="store_true", help="Catch up with the chain, then exit (the default).")
        mode.add_argument("--follow", action="store_true", help="Keep following the chain until stopped.")

    def handle(self, *args, once, follow, **options):
        stop = []
        signal.signal(signal.SIGTERM, lambda *_: stop.append(1))
        while not stop:
            try:
                result = indexer.index_pass()
            except chain.RpcUnavailable as error:
                if not follow:
                    raise
                self.stderr.write(f"chain RPC unavailable, retrying: {error}")
                result = None
            if result is not None and (result.ranges or result.rolled_back):
                self.stdout.write(f"indexed to block {result.indexed_to} (head {result.head}): {result.events} "
                                  f"event(s) in {result.ranges} range(s), {result.rolled_back} rolled back")
            if not follow:
                if result.skipped:
                    self.stdout.write("another indexer is running; nothing done")
                return
            time.sleep(settings.INDEXER_POLL_SECONDS if result is None or not result.ranges else 0)
