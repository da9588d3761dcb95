"""The metered proxy's CPU per call in one process, without a web server, beside the floor's, and optionally beside
another checkout's proxy: the figure to compare two versions of the code by.

    .venv/bin/python bench/proxy_cpu.py [--calls 1000] [--blocks 8] [--delay-ms 0] [--against ../other-checkout]

bench/proxy.py measures what a deployment gets, and on this machine kind the same code gave 1.07 ms of server CPU
per call in one run and 1.87 ms a minute later (bench/HISTORY.md): the machine's speed drifts within minutes and
two cores are shared with the client, the upstream and PostgreSQL. Comparing a change by two such runs compares the
machine with itself. Here each contender is a process of its own that calls the WSGI application in a loop (one
thread, the upstream in another process), and the contenders take turns block by block, so that a drift touches
them alike; the medians of the blocks are compared.

Contenders: `proxy` (this checkout's `marketplace.wsgi`: a GET through `/metered-proxy/{agreement}/work` with a
buyer's key, each call charged), `floor` (bench/proxy_floor.py's application: one durable statement, one upstream
call, one signature) and, with `--against DIR`, `against` (the proxy of the checkout in DIR, on a database of its
own, migrated by its own code). Each prints, per call, the CPU of its thread and of its PostgreSQL backend
(/proc), and the checks that every call was answered 200 (and, for a proxy, charged its price).

Uses PostgreSQL on 127.0.0.1:5432 (databases marketplace_bench_proxy_cpu and marketplace_bench_proxy_cpu_against,
or $BENCH_PROXY_CPU_DATABASE and its `_against`, created when missing, migrated and flushed) and Redis on 127.0.0.1:6379 (rate limits), as bench/proxy.py does.
Exit status: 0 when every call was answered as expected, 1 otherwise, 2 when a contender failed to start.
"""

import argparse
import contextlib
import io
import json
import os
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# BENCH_PROXY_CPU_DATABASE: another name, for two comparisons running at once on one PostgreSQL.
DATABASE = os.environ.get("BENCH_PROXY_CPU_DATABASE", "postgres://postgres@127.0.0.1:5432/marketplace_bench_proxy_cpu")
PRICE = 1_000


# --- a contender (its own process: `bench/proxy_cpu.py --contender KIND --root DIR ...`) ---------------------------


def _proxy_call(database_url: str, upstream_url: str, query: str):
    """Set up a seller, a buyer and an active agreement; returns (call, backend pid), `call()` -> problem or None."""
    from bench import metering as bench_metering

    os.environ["DB_CONN_MAX_AGE"] = "86400"  # one backend for the whole run: its CPU is read by its pid
    bench_metering.setup_django(database_url)
    seller, service, _ = bench_metering.seller_with_service(handle="proxy-cpu-seller", upstream_base_url=upstream_url,
                                                           unit_price=PRICE)
    buyer, key = bench_metering.buyer_with_key(handle="proxy-cpu-buyer")
    agreement = bench_metering.active_agreement(buyer=buyer, seller=seller, service=service, quantity=10_000_000)
    from django.db import connection

    call = metered_call(agreement_id=agreement.pk, key=key, query=query)
    call()  # opens the connection
    with connection.cursor() as cursor:
        cursor.execute("SELECT pg_backend_pid()")
        (pid,) = cursor.fetchone()
    return call, pid


def metered_call(*, agreement_id, key: str, query: str = ""):
    """`call()`: one GET through `/metered-proxy/{agreement_id}/work` with the buyer's `key`, straight into this
    checkout's WSGI application (Django set up); None when answered 200 and charged its price, else the problem."""
    from marketplace.wsgi import application

    environ = {"REQUEST_METHOD": "GET", "PATH_INFO": f"/metered-proxy/{agreement_id}/work", "QUERY_STRING": query,
               "SERVER_NAME": "127.0.0.1", "SERVER_PORT": "8000", "REMOTE_ADDR": "127.0.0.1",
               "HTTP_HOST": "127.0.0.1", "HTTP_AUTHORIZATION": f"Bearer {key}", "SERVER_PROTOCOL": "HTTP/1.1",
               "wsgi.url_scheme": "http", "wsgi.errors": sys.stderr, "CONTENT_LENGTH": "", "CONTENT_TYPE": ""}
    answer = {}

    def start_response(status, headers, exc_info=None):
        answer["status"], answer["headers"] = status, headers

    def call() -> str | None:
        body = application({**environ, "wsgi.input": io.BytesIO(b"")}, start_response)
        try:
            for _ in body:
                pass
        finally:
            body.close()
        cost = dict(answer["headers"]).get("X-Usage-Cost")
        return None if answer["status"].startswith("200") and cost == str(PRICE) else f"{answer['status']} {cost}"

    return call


def _floor_call(database_url: str, upstream_url: str, query: str):
    os.environ.update({"BENCH_FLOOR_DATABASE_URL": database_url,
                       "BENCH_FLOOR_UPSTREAM": upstream_url.removeprefix("http://")})
    from bench import proxy_floor
    from bench.relayer import ensure_database

    ensure_database(database_url)
    proxy_floor.create_table(database_url, rows=1)
    environ = {"REQUEST_METHOD": "GET", "QUERY_STRING": query}
    answer = {}

    def start_response(status, headers, exc_info=None):
        answer["status"] = status

    def call() -> str | None:
        b"".join(proxy_floor.application(environ, start_response))
        return None if answer["status"].startswith("200") else answer["status"]

    call()
    database, _ = proxy_floor._connections()
    return call, database.info.backend_pid


def contender(kind: str, database_url: str, upstream_url: str, delay_ms: int) -> None:
    """Set up, answer where its code was imported from, then for each line "N" on stdin make N calls and answer one
    JSON line."""
    from bench import harness

    query = f"delay_ms={delay_ms}" if delay_ms else ""
    # stdout carries the answers to the parent alone: set-up's messages ("created database ...") go to stderr.
    with contextlib.redirect_stdout(sys.stderr):
        call, backend = (_floor_call if kind == "floor" else _proxy_call)(database_url, upstream_url, query)
        for _ in range(50):  # warm-up: connections, prepared statements, caches
            call()
    import marketplace

    print(json.dumps({"code": str(Path(marketplace.__file__).resolve().parent.parent)}), flush=True)
    for line in sys.stdin:
        calls = int(line)
        problems = []
        thread_cpu, database_cpu = time.thread_time(), harness.cpu_seconds([backend])
        for _ in range(calls):
            problem = call()
            if problem:
                problems.append(problem)
        print(json.dumps({"cpu": time.thread_time() - thread_cpu, "db": harness.cpu_seconds([backend]) - database_cpu,
                          "problems": problems[:3], "failed": len(problems)}), flush=True)


# --- the comparison ---------------------------------------------------------------------------------------------------


def _start(name: str, kind: str, root: Path, database_url: str, upstream_url: str, delay_ms: int
           ) -> subprocess.Popen:
    command = [sys.executable, str(Path(__file__).resolve()), "--contender", kind, "--root", str(root),
               "--database", database_url, "--upstream", upstream_url, "--delay-ms", str(delay_ms)]
    process = subprocess.Popen(command, cwd=root, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                               env={**os.environ, "PYTHONPATH": str(root)})
    ready = process.stdout.readline()
    if not ready.strip():
        raise RuntimeError(f"the {name} contender (in {root}) did not start")
    code = Path(json.loads(ready)["code"])
    if code != root:  # an installed copy of the project found before the checkout's
        raise RuntimeError(f"the {name} contender for {root} runs the code in {code}")
    revision = subprocess.run(["git", "-C", str(root), "describe", "--always", "--dirty"], capture_output=True,
                              text=True).stdout.strip()
    print(f"{name}: {root} ({revision or 'not a git checkout'})")
    return process


def _wait_for_upstream(port: int, upstream: subprocess.Popen, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and upstream.poll() is None:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.1)
    raise RuntimeError(f"the upstream did not listen on port {port}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--calls", type=int, default=1000, help="calls per block (default 1000)")
    parser.add_argument("--blocks", type=int, default=8, help="blocks per contender, taking turns (default 8)")
    parser.add_argument("--delay-ms", type=int, default=0, help="the upstream's service time (default 0)")
    parser.add_argument("--against", type=Path, help="another checkout whose proxy to measure beside this one's")
    parser.add_argument("--contender", choices=["proxy", "floor"], help=argparse.SUPPRESS)
    parser.add_argument("--root", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--database", help=argparse.SUPPRESS)
    parser.add_argument("--upstream", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.contender:
        sys.path.insert(0, str(args.root))
        contender(args.contender, args.database, args.upstream, args.delay_ms)
        return 0
    if not (1 <= args.calls <= 100_000 and 1 <= args.blocks <= 100 and 0 <= args.delay_ms <= 5000):
        parser.error("--calls 1..100000, --blocks 1..100, --delay-ms 0..5000")
    if args.against is not None and not (args.against / "marketplace" / "wsgi.py").is_file():
        parser.error(f"--against {args.against}: no marketplace/wsgi.py there")

    sys.path.insert(0, str(ROOT))
    from bench import idle_cpu
    from escrow import devchain

    port = devchain.free_port()
    upstream_url = f"http://127.0.0.1:{port}"
    upstream = subprocess.Popen([sys.executable, str(ROOT / "bench" / "proxy.py"), "--serve-upstream", str(port)],
                                cwd=ROOT)
    contenders: dict[str, subprocess.Popen] = {}
    try:
        _wait_for_upstream(port, upstream)  # a contender that found it missing would fail its calls
        contenders["proxy"] = _start("proxy", "proxy", ROOT, DATABASE, upstream_url, args.delay_ms)
        contenders["floor"] = _start("floor", "floor", ROOT, DATABASE, upstream_url, args.delay_ms)
        if args.against is not None:
            contenders["against"] = _start("against", "proxy", args.against.resolve(), f"{DATABASE}_against", upstream_url,
                                           args.delay_ms)
        print(f"one process per contender, one thread calling the WSGI application; upstream: aiohttp, "
              f"{args.delay_ms} ms; {args.blocks} blocks of {args.calls} calls each, contenders taking turns")
        print(f"machine: {idle_cpu.machine_speed()} before the run\n")
        blocks: dict[str, list[dict]] = {name: [] for name in contenders}
        for _ in range(args.blocks):
            for name, process in contenders.items():
                process.stdin.write(f"{args.calls}\n")
                process.stdin.flush()
                blocks[name].append(json.loads(process.stdout.readline()))
        failed = False
        print(f"{'contender':<10} {'CPU ms/call':>12} {'db CPU ms/call':>15}  blocks (CPU ms/call)")
        for name, results in blocks.items():
            cpu = [result["cpu"] / args.calls * 1000 for result in results]
            database = [result["db"] / args.calls * 1000 for result in results]
            print(f"{name:<10} {statistics.median(cpu):>12.3f} {statistics.median(database):>15.3f}  "
                  f"{' '.join(f'{value:.3f}' for value in cpu)}")
            failures = sum(result["failed"] for result in results)
            if failures:
                failed = True
                print(f"  {failures} calls not answered as expected, e.g. "
                      f"{next(result['problems'] for result in results if result['problems'])}")
        print(f"\nmachine: {idle_cpu.machine_speed()} after the run")
        return 1 if failed else 0
    except RuntimeError as exc:
        print(f"set-up failed: {exc}", file=sys.stderr)
        return 2
    finally:
        for process in contenders.values():
            process.stdin.close()
            process.wait(timeout=30)
        upstream.terminate()
        upstream.wait(timeout=10)


if __name__ == "__main__":
    sys.exit(main())
