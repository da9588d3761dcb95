"""Would the metered proxy cost less on an event loop? The floor (bench/proxy_floor.py: one durable statement, one
upstream call, one signature per call, nothing else) served two ways, side by side in one run:

    .venv/bin/python bench/proxy_event_loop.py [--clients 1,16] [--seconds 5] [--rounds 2] [--delays-ms 0,20]
                                               [--loop asyncio|uvloop]

- threads: `application` (WSGI) on granian's blocking threads, 2 workers x 8 threads, as the marketplace is served
  (marketplace.serve), with psycopg and http.client;
- event loop: `async_application` (ASGI) on granian's event loop, 2 workers, with psycopg's async connections and
  aiohttp's client; asyncio's own loop, or uvloop's with `--loop uvloop`.

An asynchronous hot path cannot spend less than its floor, so this is the most moving the proxy off granian's
threads could save (bench/HISTORY.md). Per caller count and upstream delay, after a warm-up, `--rounds` times
`--seconds` of each, alternating: requests/s, p50, p99, and the server's and PostgreSQL's CPU per call (bench/proxy.py's
load generator and meters). Each caller counts on a row of its own, so no caller waits for another's row lock.

Uses BENCH_DATABASE_URL (default postgres://postgres@127.0.0.1:5432/marketplace_bench_proxy; its name must contain
"bench"), where it drops and creates only the table `bench_proxy_floor`. Exit status: 0 when every call was
answered 200; 1 otherwise; 2 when the set-up failed or the global `--timeout` (default 300 s) passed. Loopback only;
every process it starts is stopped on exit.
"""

import argparse
import asyncio
import contextlib
import itertools
import os
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench import harness, idle_cpu  # noqa: E402
from bench import metering as bench_metering  # noqa: E402
from bench import proxy as bench_proxy  # noqa: E402
from bench import proxy_floor  # noqa: E402

WORKERS, THREADS = 2, 8  # marketplace.serve's defaults


def _servers(processes, env: dict, upstream: str, database_url: str, loop: str) -> dict[str, int]:
    """The floor served both ways: name -> port."""
    from escrow import devchain
    from marketplace import serve

    floor_env = {**os.environ, **env, "BENCH_FLOOR_DATABASE_URL": database_url, "BENCH_FLOOR_UPSTREAM": upstream}
    ports = {"threads": devchain.free_port(), "event loop": devchain.free_port()}
    processes.start("threads", serve.command(port=ports["threads"], workers=WORKERS, threads=THREADS,
                                             application="bench.proxy_floor:application"), floor_env)
    granian, *options = serve.command(port=ports["event loop"], workers=WORKERS, threads=THREADS,
                                      application="bench.proxy_floor:async_application")
    # The same command on granian's event loop: ASGI, and no blocking threads to hand requests to.
    options[options.index("--interface") + 1] = "asgi"
    del options[options.index("--blocking-threads"):options.index("--blocking-threads") + 2]
    processes.start("event loop", [granian, "--loop", loop, *options], floor_env)
    return ports


def run(args: argparse.Namespace, database_url: str, stack: contextlib.ExitStack) -> int:
    from escrow import devchain

    bench_metering.ensure_database(database_url)
    env = bench_metering.django_environment(database_url)
    processes = bench_metering.Processes(Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="loop-bench-"))))
    stack.callback(processes.stop_all)
    upstream_port = devchain.free_port()
    processes.start("upstream", [sys.executable, str(ROOT / "bench" / "proxy.py"), "--serve-upstream",
                                 str(upstream_port)], {**os.environ, **env})
    bench_proxy.wait_for_upstream(f"http://127.0.0.1:{upstream_port}/ready", processes)
    proxy_floor.create_table(database_url, rows=max(args.clients))
    ports = _servers(processes, env, f"127.0.0.1:{upstream_port}", database_url, args.loop)
    meters = {}
    for name, port in ports.items():
        bench_proxy.wait_for_upstream(f"http://127.0.0.1:{port}/work", processes)
        process = next(process for started, process in processes.started if started == name)
        meters[name] = harness.CpuMeter([process.pid, *harness.child_pids(process.pid)], database_url)
        stack.callback(meters[name].close)
    harness.freeze_client_heap()

    print(f"the floor (bench/proxy_floor.py) on granian, {WORKERS} workers: threads = WSGI x {THREADS} blocking "
          f"threads, psycopg + http.client; event loop = ASGI on {args.loop}, psycopg async + aiohttp; "
          f"upstream: aiohttp")
    print(f"machine: {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f} before the run; "
          f"{idle_cpu.machine_speed()}\n")
    header = (f"{'callers':>7} {'upstream delay':>14}  {'served on':<10} {'requests':>9} {'req/s':>8} {'p50 ms':>8} "
              f"{'p99 ms':>8} {'errors':>7} {'server CPU ms/call':>18} {'db CPU ms/call':>14}")
    print(header)
    print("-" * len(header))
    failures, ratios, stolen = [], [], harness.StolenCpu()
    for clients, delay in itertools.product(args.clients, args.delays_ms):
        query = f"&delay_ms={delay}" if delay else ""
        urls = {name: [f"http://127.0.0.1:{port}/work?row={caller + 1}{query}" for caller in range(clients)]
                for name, port in ports.items()}
        samples = {name: bench_proxy.Sample() for name in ports}
        for name in ports:  # warm-up: connections, prepared statements
            failures += asyncio.run(bench_proxy.fire(urls[name], {}, clients=clients,
                                                     seconds=bench_proxy.WARMUP_SECONDS, expected_cost=None)).failures
        for _, name in itertools.product(range(args.rounds), ports):
            sample = bench_proxy.measured(meters[name], urls[name], {}, clients=clients, seconds=args.seconds,
                                          expected_cost=None)
            samples[name].add(sample)
            failures += sample.failures
        results = {name: bench_proxy.summary(sample) for name, sample in samples.items()}
        for name, result in results.items():
            print(f"{clients:>7} {delay:>11} ms  {name:<10} {result['requests']:>9} {result['rps']:>8.0f} "
                  f"{result['p50']:>8.2f} {result['p99']:>8.2f} {result['failures']:>7} "
                  f"{_ms(result['cpu_ms']):>18} {_ms(result['database_cpu_ms']):>14}")
        threads, loop = results["threads"]["cpu_ms"], results["event loop"]["cpu_ms"]
        if threads and loop:
            ratios.append(f"{clients} callers, {delay} ms: {loop / threads:.2f}x")
    print(f"\nserver CPU per call on the event loop / on threads: {'; '.join(ratios)}")
    print(f"{stolen.since()} during the run; {idle_cpu.machine_speed()} after it")
    if failures:
        print(f"\n{len(failures)} calls failed, for example: {failures[0]}")
    return 1 if failures else 0


def _ms(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.2f}"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clients", type=harness.integer_list, default=[1, 16],
                        help="concurrent callers, comma-separated (default 1,16)")
    parser.add_argument("--seconds", type=float, default=5.0, help="length of one measured phase (default 5)")
    parser.add_argument("--rounds", type=int, default=2, help="alternations per caller count and delay (default 2)")
    parser.add_argument("--delays-ms", type=harness.integer_list, default=[0, 20],
                        help="upstream service times, comma-separated (default 0,20)")
    parser.add_argument("--loop", choices=["asyncio", "uvloop"], default="asyncio",
                        help="the event loop granian runs the ASGI floor on (default asyncio)")
    parser.add_argument("--timeout", type=int, default=300, help="global limit in seconds (default 300)")
    args = parser.parse_args()
    if not (all(1 <= clients <= 256 for clients in args.clients) and 0.5 <= args.seconds <= 120
            and 1 <= args.rounds <= 10 and all(0 <= d <= 5000 for d in args.delays_ms) and 30 <= args.timeout <= 3600):
        parser.error("--clients 1..256 each, --seconds 0.5..120, --rounds 1..10, --delays-ms 0..5000 each, "
                     "--timeout 30..3600")
    database_url, error = harness.bench_database_url(bench_proxy.DEFAULT_DATABASE_URL)
    if error:
        parser.error(error)
    return harness.run_bounded(lambda stack: run(args, database_url, stack), args.timeout)


if __name__ == "__main__":
    sys.exit(main())
