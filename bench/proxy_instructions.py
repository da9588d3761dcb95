"""The metered proxy's instructions per call in one process (valgrind's callgrind), beside the floor's, and optionally
beside another checkout's proxy: a figure the machine's load does not move, to compare two versions of the code by.

    .venv/bin/python bench/proxy_instructions.py [--calls 200] [--against ../other-checkout] [--keep DIR]

bench/proxy_cpu.py compares CPU time, which drifts on this machine kind with its speed and with the other processes
sharing its two cores. Instructions executed do not: two runs of the same code differ by well under 1%. They are
not time (a cache miss or a cold branch costs no instruction), so they rank changes to the Python path, not to I/O.

Each contender (`proxy`: this checkout's `marketplace.wsgi`, a GET through `/metered-proxy/{agreement}/work` with a
buyer's key, charged per call, as bench/proxy_cpu.py calls it; `floor`: bench/proxy_floor.py's application;
`against`: the proxy of the checkout in DIR) is set up without valgrind (migrations, a seller, a buyer, an active
agreement), then runs under `valgrind --tool=callgrind` in a process of its own: 50 warm-up calls, then `--calls`
calls counted (collection toggled on around them alone), each checked answered 200 and charged. Printed: instructions
per call in the process (PostgreSQL's backend and the upstream apart). What lapses by the clock is kept for the run
(CREDENTIAL_CACHE_SECONDS, PROXY_CALL_LEASE_SECONDS), or the count would follow valgrind's speed: each call takes the
path of a steady load (the key and the call terms cached, the reservation from a lease of calls). The rest varied by
under 0.5% between two runs of the same code (the database's and Redis's answers arriving in more or fewer reads).
With --keep DIR, the callgrind files stay in DIR for `callgrind_annotate --inclusive=yes` (the counted calls are
under `functools_reduce`).

Uses PostgreSQL on 127.0.0.1:5432 (databases marketplace_bench_proxy_instructions and its `_against`, or
$BENCH_PROXY_INSTRUCTIONS_DATABASE and its `_against`, created when missing, migrated and flushed) and Redis on
127.0.0.1:6379, as bench/proxy_cpu.py does. Takes about a minute per contender (valgrind runs Python ~50x slower).
Exit status: 0 when every call was answered as expected, 1 otherwise, 2 when a contender failed to start.
"""

import argparse
import functools
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DATABASE = os.environ.get("BENCH_PROXY_INSTRUCTIONS_DATABASE",
                          "postgres://postgres@127.0.0.1:5432/marketplace_bench_proxy_instructions")
WARM_UP_CALLS = 50


# --- a contender (its own process: `bench/proxy_instructions.py --contender KIND ...`) ---------------------------


def _proxy_setup(database_url: str, upstream_url: str) -> dict:
    """Migrate and flush the database, set up an active agreement; returns what the measured process needs."""
    from bench import metering as bench_metering
    from bench import proxy_cpu

    env = bench_metering.setup_django(database_url)
    seller, service, _ = bench_metering.seller_with_service(handle="proxy-instructions-seller",
                                                           upstream_base_url=upstream_url,
                                                           unit_price=proxy_cpu.PRICE)
    buyer, key = bench_metering.buyer_with_key(handle="proxy-instructions-buyer")
    agreement = bench_metering.active_agreement(buyer=buyer, seller=seller, service=service, quantity=10_000_000)
    return {"env": env, "agreement": str(agreement.pk), "key": key}


def _proxy_call(setup: dict):
    from bench import proxy_cpu

    os.environ.update(setup["env"])
    # What lapses by the clock would count more often the slower valgrind runs (~50x, more on a loaded machine):
    # kept for the run, each call takes the steady state's path (a cached key and terms, a leased reservation).
    os.environ.update(DB_CONN_MAX_AGE="86400", CREDENTIAL_CACHE_SECONDS="86400", PROXY_CALL_LEASE_SECONDS="86400")
    import django

    django.setup()
    return proxy_cpu.metered_call(agreement_id=setup["agreement"], key=setup["key"])


def _floor_setup(database_url: str, upstream_url: str) -> dict:
    from bench import proxy_floor
    from bench.relayer import ensure_database

    ensure_database(database_url)
    proxy_floor.create_table(database_url, rows=1)
    return {"env": {"BENCH_FLOOR_DATABASE_URL": database_url,
                    "BENCH_FLOOR_UPSTREAM": upstream_url.removeprefix("http://")}}


def _floor_call(setup: dict):
    os.environ.update(setup["env"])
    from bench import proxy_floor

    answer = {}

    def start_response(status, headers, exc_info=None):
        answer["status"] = status

    def call() -> str | None:
        b"".join(proxy_floor.application({"REQUEST_METHOD": "GET", "QUERY_STRING": ""}, start_response))
        return None if answer["status"].startswith("200") else answer["status"]

    return call


def contender(kind: str, setup_json: str | None, database_url: str, upstream_url: str, calls: int) -> None:
    """Without --setup: set up and print it as JSON. With it: make the warm-up calls, then `calls` counted ones inside
    one `functools.reduce` (callgrind collects inside it alone), and print the problems as JSON."""
    if setup_json is None:
        import contextlib

        with contextlib.redirect_stdout(sys.stderr):
            setup = (_floor_setup if kind == "floor" else _proxy_setup)(database_url, upstream_url)
        print(json.dumps(setup), flush=True)
        return
    call = (_floor_call if kind == "floor" else _proxy_call)(json.loads(setup_json))
    problems = [problem for problem in (call() for _ in range(WARM_UP_CALLS)) if problem]

    def counted(found: list, _) -> list:
        problem = call()
        return [*found, problem] if problem else found

    problems += functools.reduce(counted, range(calls), [])
    import marketplace

    print(json.dumps({"code": str(Path(marketplace.__file__).resolve().parent.parent), "problems": problems[:3],
                      "failed": len(problems)}), flush=True)


# --- the comparison ---------------------------------------------------------------------------------------------------


def _instructions(out_file: Path) -> int:
    """The total of the events line ("totals:" or "summary:") of a callgrind output file."""
    for line in reversed(out_file.read_text().splitlines()):
        if match := re.match(r"(?:totals|summary): (\d+)", line):
            return int(match.group(1))
    raise RuntimeError(f"no totals in {out_file}")


def _measure(name: str, kind: str, root: Path, database_url: str, upstream_url: str, calls: int,
             out_dir: Path) -> tuple[float, dict]:
    command = [sys.executable, str(Path(__file__).resolve()), "--contender", kind, "--root", str(root),
               "--database", database_url, "--upstream", upstream_url, "--calls", str(calls)]
    env = {**os.environ, "PYTHONPATH": str(root)}
    prepared = subprocess.run(command, cwd=root, env=env, capture_output=True, text=True)
    if prepared.returncode or not prepared.stdout.strip():
        raise RuntimeError(f"the {name} contender (in {root}) did not set up: {prepared.stderr[-2000:]}")
    out_file = out_dir / f"callgrind.{name}.out"
    measured = subprocess.run(
        ["valgrind", "--tool=callgrind", "--collect-atstart=no", "--toggle-collect=functools_reduce",
         f"--callgrind-out-file={out_file}", *command, "--setup", prepared.stdout.strip()],
        cwd=root, env=env, capture_output=True, text=True)
    if measured.returncode or not measured.stdout.strip():
        raise RuntimeError(f"the {name} contender (in {root}) failed under valgrind: {measured.stderr[-2000:]}")
    result = json.loads(measured.stdout.strip().splitlines()[-1])
    if kind == "proxy" and Path(result["code"]) != root:
        raise RuntimeError(f"the {name} contender for {root} runs the code in {result['code']}")
    revision = subprocess.run(["git", "-C", str(root), "describe", "--always", "--dirty"], capture_output=True,
                              text=True).stdout.strip()
    print(f"{name}: {root} ({revision or 'not a git checkout'})", flush=True)
    return _instructions(out_file) / calls, result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--calls", type=int, default=200, help="counted calls per contender (default 200)")
    parser.add_argument("--against", type=Path, help="another checkout whose proxy to measure beside this one's")
    parser.add_argument("--keep", type=Path, help="a directory to keep the callgrind output files in")
    parser.add_argument("--contender", choices=["proxy", "floor"], help=argparse.SUPPRESS)
    parser.add_argument("--setup", help=argparse.SUPPRESS)
    parser.add_argument("--root", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--database", help=argparse.SUPPRESS)
    parser.add_argument("--upstream", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.contender:
        sys.path.insert(0, str(args.root))
        contender(args.contender, args.setup, args.database, args.upstream, args.calls)
        return 0
    if not 1 <= args.calls <= 10_000:
        parser.error("--calls 1..10000")
    if args.against is not None and not (args.against / "marketplace" / "wsgi.py").is_file():
        parser.error(f"--against {args.against}: no marketplace/wsgi.py there")
    if shutil.which("valgrind") is None:
        parser.error("valgrind is not installed")

    sys.path.insert(0, str(ROOT))
    from bench.proxy_cpu import _wait_for_upstream
    from escrow import devchain

    port = devchain.free_port()
    upstream_url = f"http://127.0.0.1:{port}"
    upstream = subprocess.Popen([sys.executable, str(ROOT / "bench" / "proxy.py"), "--serve-upstream", str(port)],
                                cwd=ROOT)
    out_dir = args.keep or Path(tempfile.mkdtemp(prefix="proxy_instructions."))
    out_dir.mkdir(parents=True, exist_ok=True)
    contenders = [("proxy", "proxy", ROOT, DATABASE), ("floor", "floor", ROOT, DATABASE)]
    if args.against is not None:
        contenders.append(("against", "proxy", args.against.resolve(), f"{DATABASE}_against"))
    try:
        _wait_for_upstream(port, upstream)
        print(f"one process per contender under callgrind, {WARM_UP_CALLS} warm-up calls then {args.calls} counted; "
              f"upstream: aiohttp, 0 ms")
        results = {name: _measure(name, kind, root, database, upstream_url, args.calls, out_dir)
                   for name, kind, root, database in contenders}
    except RuntimeError as exc:
        print(f"set-up failed: {exc}", file=sys.stderr)
        return 2
    finally:
        upstream.terminate()
        upstream.wait(timeout=10)
        if args.keep is None:
            shutil.rmtree(out_dir, ignore_errors=True)
    print(f"\n{'contender':<10} {'instructions/call':>18}")
    failed = False
    for name, (per_call, result) in results.items():
        print(f"{name:<10} {per_call:>18,.0f}")
        if result["failed"]:
            failed = True
            print(f"  {result['failed']} calls not answered as expected, e.g. {result['problems']}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
