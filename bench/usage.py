"""Seller-reported usage: `POST /usage-agreements/{id}/record-usage` throughput in events/s, totals checked exactly.

    .venv/bin/python bench/usage.py [--clients 8] [--seconds 5] [--agreements 50]

What it does, in order:
1. Uses its own database (BENCH_DATABASE_URL, default postgres://postgres@127.0.0.1:5432/marketplace_bench_usage):
   created when missing, migrated, then flushed. Refuses a database whose name does not contain "bench".
2. Creates a seller with a per-unit service, a buyer, `--agreements` active agreements with budgets far above what
   the run can record (made active through the services' transitions without a chain: see bench/metering.py),
   and starts the web server (marketplace.serve: granian, DEBUG off, PostgreSQL).
3. Four scenarios of `--seconds` each, from `--clients` concurrent aiohttp callers using the seller's key, each
   request with its own Idempotency-Key: single events and batches of 100, spread over all the agreements and
   all on one hot agreement (every request then waits for the same row lock). Units vary (1, 2, 3) so the totals
   check is not a count.
   Before the server starts, 50 batches of 100 go through Django's test client in this process, one at a time,
   to print the CPU per event (time.process_time: unlike a rate, it does not drop while a process waits for a core
   on a shared machine) and the SQL statements per batch.
4. Prints requests/s, events/s, p50/p99 latency and the server's CPU per event (its workers' CPU time from /proc)
   per scenario, then checks every agreement exactly: `used`
   equals the sum of its events and the units the server acknowledged (201) × the price, the sequence is
   gap-free, nothing is reserved, and the digest chain and every receipt verify with the SDK.

Exit status: 0 when every request was answered 201 and the totals are exact; 1 otherwise; 2 when the set-up failed
or the global `--timeout` (default 300 s) passed. Loopback only; every process it starts is stopped on exit.
"""

import argparse
import asyncio
import contextlib
import itertools
import os
import sys
import tempfile
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench import harness, idle_cpu  # noqa: E402
from bench import metering as bench_metering  # noqa: E402

DEFAULT_DATABASE_URL = "postgres://postgres@127.0.0.1:5432/marketplace_bench_usage"
PRICE = 10  # atomic units per unit of usage
QUANTITY = 10**11  # a 1,000,000 USDC budget per agreement: never the limit in this bench
BATCH = 100
IN_PROCESS_BATCHES = 50
REQUEST_TIMEOUT = 30.0


def in_process_cost(agreement_id: str, seller_key: str, *, batches: int) -> tuple[float, float, int]:
    """`batches` batches of BATCH events through Django's test client in this process, one at a time: the CPU per
    event in microseconds (request handling, validation, chain extension, insert, answer; no network, no
    concurrency), the SQL statements per batch, and the units recorded."""
    import statistics

    from django.db import connection
    from django.test import Client
    from django.test.utils import CaptureQueriesContext

    client = Client(HTTP_AUTHORIZATION=f"Bearer {seller_key}", HTTP_HOST="127.0.0.1")
    body = {"events": [{"units": units_of(i), "description": "bench"} for i in range(BATCH)]}

    def post() -> None:
        response = client.post(f"/usage-agreements/{agreement_id}/record-usage", body,
                               content_type="application/json", HTTP_IDEMPOTENCY_KEY=uuid.uuid4().hex)
        if response.status_code != 201:
            raise harness.SetupFailed(f"in-process batch: {response.status_code} {response.content[:300]!r}")

    post()  # the first request's imports and prepared connection
    with CaptureQueriesContext(connection) as captured:
        post()
    statements = len(captured.captured_queries)
    cpu = []
    for _ in range(batches):
        started = time.process_time()
        post()
        cpu.append(time.process_time() - started)
    return statistics.median(cpu) / BATCH * 1e6, statements, (batches + 2) * sum(map(units_of, range(BATCH)))


@dataclass
class Outcome:
    latencies: list[float] = field(default_factory=list)
    seconds: float = 0.0
    events: int = 0
    units: Counter = field(default_factory=Counter)  # agreement id -> units acknowledged (201)
    failures: list[str] = field(default_factory=list)


def units_of(index: int) -> int:
    return index % 3 + 1


async def record(base_url: str, seller_key: str, agreement_ids: list[str], *, batch: int, clients: int,
                 seconds: float) -> Outcome:
    """`clients` concurrent sellers' reporters for `seconds`, round-robin over the agreements."""
    import aiohttp

    outcome = Outcome()
    targets = itertools.cycle(agreement_ids)
    serial = itertools.count()
    headers = {"Authorization": f"Bearer {seller_key}"}
    connector = aiohttp.TCPConnector(limit=clients)
    async with aiohttp.ClientSession(base_url, connector=connector, headers=headers,
                                     timeout=aiohttp.ClientTimeout(total=REQUEST_TIMEOUT)) as session:
        stop_at = time.perf_counter() + seconds

        async def reporter():
            while time.perf_counter() < stop_at:
                agreement_id, first = next(targets), next(serial) * batch
                units = [units_of(first + i) for i in range(batch)]
                body = ({"units": units[0], "description": "bench"} if batch == 1 else
                        {"events": [{"units": u, "description": "bench"} for u in units]})
                started = time.perf_counter()
                try:
                    async with session.post(f"/usage-agreements/{agreement_id}/record-usage", json=body,
                                            headers={"Idempotency-Key": uuid.uuid4().hex}) as response:
                        text = await response.read()
                        status = response.status
                except (TimeoutError, aiohttp.ClientError) as exc:
                    outcome.failures.append(f"{type(exc).__name__}: {exc}")
                    continue
                outcome.latencies.append(time.perf_counter() - started)
                if status == 201:
                    outcome.events += batch
                    outcome.units[agreement_id] += sum(units)
                else:
                    outcome.failures.append(f"{status} {text[:300]!r}")

        started = time.perf_counter()
        await asyncio.gather(*(reporter() for _ in range(clients)))
        outcome.seconds = time.perf_counter() - started
    return outcome


def run(args: argparse.Namespace, database_url: str, stack: contextlib.ExitStack) -> int:
    env = bench_metering.setup_django(database_url)
    seller, service, seller_key = bench_metering.seller_with_service(
        handle="usage-bench-seller", upstream_base_url="https://upstream.invalid/api", unit_price=PRICE,
        pricing_type="per_unit")
    buyer, _ = bench_metering.buyer_with_key(handle="usage-bench-buyer")
    agreement_ids = [str(bench_metering.active_agreement(buyer=buyer, seller=seller, service=service,
                                                         quantity=QUANTITY).pk) for _ in range(args.agreements)]
    in_process_id = str(bench_metering.active_agreement(buyer=buyer, seller=seller, service=service,
                                                        quantity=QUANTITY).pk)
    cpu_per_event, statements, in_process_units = in_process_cost(in_process_id, seller_key, batches=IN_PROCESS_BATCHES)
    from django.db import connection

    connection.close()  # the server's workers open their own
    processes = bench_metering.Processes(Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="usage-bench-"))))
    stack.callback(processes.stop_all)
    base_url = bench_metering.start_server(processes, env, workers=args.workers, threads=args.threads)
    bench_metering.wait_for_server(base_url, seller_key, processes)
    workers = harness.child_pids(next(process for name, process in processes.started if name == "web").pid)
    print(f"in-process, one batch of {BATCH} at a time (test client, no network): {cpu_per_event:.0f} us of CPU per "
          f"event (time.process_time), {statements} SQL statements per batch")
    print(f"marketplace: granian {args.workers} workers x {args.threads} threads (WSGI), DEBUG off, PostgreSQL; "
          f"client: {args.clients} concurrent aiohttp callers, one process; {args.seconds:g} s per scenario")
    print(f"machine: {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f} before the run; "
          f"{idle_cpu.machine_speed()}; {harness.scheduler_groups()}\n")

    harness.freeze_client_heap()
    stolen = harness.StolenCpu()
    # Warm-up: every worker's connection, the statements psycopg prepares, the first requests' imports.
    warm = asyncio.run(record(base_url, seller_key, agreement_ids, batch=BATCH, clients=args.clients, seconds=1))
    acknowledged = Counter(warm.units)
    acknowledged[in_process_id] += in_process_units
    failures = list(warm.failures)
    scenarios = [
        (f"single events, {args.agreements} agreements", 1, agreement_ids),
        (f"batches of {BATCH}, {args.agreements} agreements", BATCH, agreement_ids),
        ("single events, one hot agreement", 1, agreement_ids[:1]),
        (f"batches of {BATCH}, one hot agreement", BATCH, agreement_ids[:1]),
    ]
    header = (f"{'scenario':<36} {'requests':>9} {'req/s':>8} {'events/s':>9} {'p50 ms':>8} {'p99 ms':>8} "
              f"{'us CPU/event':>13} {'errors':>7}")
    print(header)
    print("-" * len(header))
    best_batched = 0.0
    for label, batch, targets in scenarios:
        cpu_start = harness.cpu_seconds(workers)
        outcome = asyncio.run(record(base_url, seller_key, targets, batch=batch, clients=args.clients,
                                     seconds=args.seconds))
        cpu_end = harness.cpu_seconds(workers)
        server_cpu = "n/a" if cpu_start is None or cpu_end is None or not outcome.events else \
            f"{(cpu_end - cpu_start) / outcome.events * 1e6:.0f}"
        acknowledged.update(outcome.units)
        failures += outcome.failures
        latencies = sorted(outcome.latencies)
        events_per_second = outcome.events / outcome.seconds
        if batch == BATCH:
            best_batched = max(best_batched, events_per_second)
        print(f"{label:<36} {len(latencies):>9} {len(latencies) / outcome.seconds:>8.0f} {events_per_second:>9.0f} "
              f"{bench_metering.percentile(latencies, .5) * 1000:>8.1f} "
              f"{bench_metering.percentile(latencies, .99) * 1000:>8.1f} {server_cpu:>13} {len(outcome.failures):>7}")
    for failure in failures[:5]:
        print(f"  e.g. {failure}")

    from agreements.models import UsageAgreement, UsageEvent

    checking = time.perf_counter()
    problems = []
    for agreement_id in [*agreement_ids, in_process_id]:
        problems += bench_metering.check_usage_chain(agreement_id)
        used = UsageAgreement.objects.get(pk=agreement_id).used
        if used != acknowledged[agreement_id] * PRICE:
            problems.append(f"agreement {agreement_id}: used {used} != {acknowledged[agreement_id]} units "
                            f"acknowledged x {PRICE}")
    events = UsageEvent.objects.count()
    print(f"\nexactness: {events} events in {len(agreement_ids) + 1} agreements; per agreement used = sum of events = "
          f"units acknowledged x price, seq gap-free, receipts verified with the SDK "
          f"({time.perf_counter() - checking:.1f} s): {'OK' if not problems else 'FAILED'}")
    for problem in problems[:20]:
        print(f"  {problem}")
    print(f"best batched rate {best_batched:,.0f} events/s (goal 10,000); "
          f"load average {os.getloadavg()[0]:.1f} after the run; {stolen.since()} during it; "
          f"{idle_cpu.machine_speed()} after it")
    return 1 if problems or failures else 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clients", type=int, default=8, help="concurrent callers (default 8)")
    parser.add_argument("--seconds", type=float, default=5.0, help="length of each scenario (default 5)")
    parser.add_argument("--agreements", type=int, default=50, help="agreements to spread over (default 50)")
    parser.add_argument("--workers", type=int, default=4, help="web server worker processes (default 4)")
    parser.add_argument("--threads", type=int, default=4, help="threads per web server worker (default 4)")
    parser.add_argument("--timeout", type=int, default=300, help="global limit in seconds (default 300)")
    args = parser.parse_args()
    if not (1 <= args.clients <= 256 and 0.5 <= args.seconds <= 120 and 1 <= args.agreements <= 1000
            and 1 <= args.workers <= 16 and 1 <= args.threads <= 64 and 30 <= args.timeout <= 3600):
        parser.error("--clients 1..256, --seconds 0.5..120, --agreements 1..1000, --workers 1..16, "
                     "--threads 1..64, --timeout 30..3600")
    database_url, error = harness.bench_database_url(DEFAULT_DATABASE_URL)
    if error:
        parser.error(error)

    return harness.run_bounded(lambda stack: run(args, database_url, stack), args.timeout)


if __name__ == "__main__":
    sys.exit(main())
