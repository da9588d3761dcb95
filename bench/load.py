"""Load: a realistic mix against the production configuration (granian, PostgreSQL, DEBUG=false) on this machine.

    .venv/bin/python bench/load.py [--duration 60] [--users 32] [--buyers 8] [--services 200]

What it does, in order:
1. Starts its own Anvil (free loopback port), deploys MockUSDC + UsageEscrow, and uses its own database
   (BENCH_DATABASE_URL, default postgres://postgres@127.0.0.1:5432/marketplace_bench_load: created when missing,
   migrated, flushed; its name must contain "bench").
2. Seeds a catalog of `--services` listings, `--buyers` buyer agents each with an escrow activated on-chain
   (through the activation service and the relayer, in this process) for a metered service whose upstream is a
   small HTTP server this script starts as its own process.
3. Starts the web server (marketplace.serve: `--server-workers` x `--threads`) with DEBUG=false, then `--users` concurrent virtual
   users (asyncio + aiohttp) run the mix for `--duration` s after a short warm-up: catalog search 40 %, metered
   proxy calls 35 %, proposals 15 %, usage reads 10 %, each as a buyer with its own API key.
4. Prints requests/s and p50/p99 per endpoint, errors, and the usage check: for every agreement, `used` equals the
   sum of its gap-free usage events, every receipt verifies (bench.metering.check_usage_chain), nothing stays
   reserved once the server gave back what its leases did not use, and the total charged equals the proxied calls
   answered 200 times the price, which is also what the upstream counted.

Exit status 0 when there were no errors and no lost or extra usage; 1 otherwise; 2 when the set-up failed. Bounded:
`--duration` at most 600 s, a global timeout, loopback only; every process it starts is stopped on exit.
"""

import argparse
import asyncio
import contextlib
import os
import random
import secrets
import sys
import tempfile
import time
from collections import defaultdict
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench import metering as bench_metering  # noqa: E402
from bench.harness import SetupFailed, bench_database_url, run_bounded  # noqa: E402
from bench.relayer import Processes, ensure_database, percentile  # noqa: E402

DEFAULT_DATABASE_URL = "postgres://postgres@127.0.0.1:5432/marketplace_bench_load"
BROKER_URL = "redis://127.0.0.1:6379/9"  # nothing is queued by the mix; the server just has a broker configured
UNIT_PRICE = 1_000  # 0.001 USDC per proxied call
QUANTITY = 1_000_000  # calls each escrow can pay for: the mix never exhausts it
MIX = [("search", 40), ("proxy", 35), ("propose", 15), ("usage", 10)]
EXPECTED = {"search": 200, "proxy": 200, "propose": 201, "usage": 200}
WARMUP = 5.0
WORDS = ["translate", "invoice", "research", "summarize", "vision", "speech", "legal", "finance", "code", "search"]


# --- the seller's upstream (run as a separate process: `load.py --upstream PORT`) ------------------------------


def serve_upstream(port: int) -> None:
    """Answers every call with a small JSON body; GET /__count tells how many calls it served."""
    served = [0]

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def _answer(self, payload: bytes) -> None:
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            self.wfile.write(payload)

        def do_GET(self):
            if self.path == "/__count":
                return self._answer(str(served[0]).encode())
            served[0] += 1
            self._answer(b'{"result": "done"}')

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", port), Handler)
    server.daemon_threads = True
    server.serve_forever()


# --- set-up --------------------------------------------------------------------------------------------------------


def seed(args, upstream_url: str, chain_node) -> dict:
    """Catalog, buyers with API keys and escrows activated on-chain; returns what the virtual users need."""
    from django.contrib.auth import get_user_model
    from eth_account import Account
    from eth_utils import keccak

    from agreements import services as agreement_services
    from agreements.models import UsageAgreement
    from catalog import services as catalog_services
    from catalog.models import KeyScope
    from catalog.serializers import ServiceWriteSerializer
    from escrow import devchain, relayer
    from escrow import services as escrow_services
    from agreements.serializers import AgreementSerializer
    from escrow import selectors as escrow_selectors
    from sdk import AgreedTerms, NetworkConfig, sign_activation_package

    def register(seller, name, tags, url, price):
        body = ServiceWriteSerializer(data={
            "name": name, "description": f"{name}: a dependable service for {' and '.join(tags)}.", "tags": tags,
            "capability": {"name": tags[0], "version": "1.0.0"}, "upstream_base_url": url,
            "pricing": {"type": "per_call", "unit_name": "call", "unit_price_atomic": price, "token": "USDC"}})
        body.is_valid(raise_exception=True)
        return catalog_services.service_register(seller=seller, data=body.validated_data)

    from django.conf import settings

    settings.AGENTS_PER_OWNER = max(settings.AGENTS_PER_OWNER, args.buyers + 1)  # one owner holds every bench agent
    owner = get_user_model().objects.create_user("load-bench-owner")
    seller = catalog_services.agent_create(owner=owner, handle="load-seller", display_name="Load seller",
                                           wallet_address=devchain.DEV_ADDRESSES[4], is_buyer=False, is_seller=True)
    rng = random.Random(7)
    settings.SERVICES_PER_SELLER = max(settings.SERVICES_PER_SELLER, args.services + 1)  # one seller lists them all
    settings.SERVICE_REGISTRATIONS_PER_DAY = max(settings.SERVICE_REGISTRATIONS_PER_DAY, args.services + 1)
    for i in range(args.services):
        register(seller, f"{rng.choice(WORDS).title()} service {i}", rng.sample(WORDS, 3),
                 "https://upstream.invalid/api", rng.randrange(1_000, 500_000))
    metered = register(seller, "Metered work", ["work"], upstream_url, UNIT_PRICE)

    wallets = [Account.from_key(keccak(text=f"load bench buyer {i}")) for i in range(args.buyers)]  # fixed seeds
    for wallet in wallets:  # all minting first: the deployer is also the relayer, whose nonces the relayer owns
        devchain.mint_usdc(chain_node.w3(), os.environ["USDC_ADDRESS"], devchain.DEV_PRIVATE_KEYS[0], wallet.address,
                           QUANTITY * UNIT_PRICE * 2)
    network = NetworkConfig.from_dict(escrow_selectors.network_config())  # the bench trusts its own server
    buyers = []
    for i, wallet in enumerate(wallets):
        buyer = catalog_services.agent_create(owner=owner, handle=f"load-buyer-{i}", display_name=f"Load buyer {i}",
                                              wallet_address=wallet.address)
        api_key = catalog_services.api_key_issue(agent=buyer, scope=KeyScope.PAY).secret
        agreement = agreement_services.agreement_propose(proposal=agreement_services.agreement_proposal_prepare(
            buyer=buyer, service=metered, quantity=QUANTITY))
        agreement = agreement_services.agreement_accept(agreement=agreement, seller=seller)
        package = escrow_services.activation_package(agreement=agreement, buyer=buyer)
        signed = sign_activation_package(
            package, "0x" + bytes(wallet.key).hex(), network=network, token_domain=network.token_domain,
            terms=AgreedTerms.from_agreement(AgreementSerializer(agreement).data, network),
            expected_seller_wallet_address=seller.wallet_address,
            permit_nonce=package["escrow_permit"]["message"]["nonce"])  # its own server's word, as its network
        escrow_services.activation_submit(agreement=agreement, buyer=buyer, **signed)  # the relayer runs inline
        buyers.append({"key": api_key, "agreement": str(agreement.pk)})
    deadline = time.monotonic() + 60
    ids = [b["agreement"] for b in buyers]
    while UsageAgreement.objects.filter(pk__in=ids, status="active").count() < len(ids):
        if time.monotonic() > deadline:
            raise SetupFailed("the escrows were not activated within 60 s")
        relayer.transactions_poll()
    return {"buyers": buyers, "service_id": str(metered.pk)}


# --- the measured part ---------------------------------------------------------------------------------------------


async def virtual_user(session, seeded: dict, rng: random.Random, stop_at: float, measure_from: float,
                       results: dict) -> None:
    import aiohttp

    names = [name for name, _ in MIX]
    weights = [weight for _, weight in MIX]
    expires = (time.time() + 2 * 86_400)
    while (now := time.monotonic()) < stop_at:
        buyer = rng.choice(seeded["buyers"])
        headers = {"Authorization": f"Bearer {buyer['key']}"}
        kind = rng.choices(names, weights)[0]
        if kind == "search":
            request = session.post("/catalog/search", headers=headers,
                                   json={"q": " ".join(rng.sample(WORDS, 2)), "limit": 20})
        elif kind == "proxy":
            request = session.get(f"/metered-proxy/{buyer['agreement']}/work", headers=headers)
        elif kind == "propose":
            request = session.post("/usage-agreements", headers={**headers, "Idempotency-Key": secrets.token_hex(16)},
                                   json={"service_id": seeded["service_id"], "quantity": rng.randrange(1, 100),
                                         "expires_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(expires))})
        else:
            request = session.get(f"/usage-agreements/{buyer['agreement']}/usage", headers=headers,
                                  params={"limit": 20})
        started = time.perf_counter()
        try:
            async with request as response:
                body = await response.read()
            status = response.status
            error = None if status == EXPECTED[kind] else body[:200].decode(errors="replace")
        except (TimeoutError, aiohttp.ClientError) as exc:
            status, error = 0, f"{type(exc).__name__}: {exc}"
        elapsed = time.perf_counter() - started
        bucket = results[kind]
        if kind == "proxy" and status == 200:
            bucket["charged"] += 1  # counted in the warm-up too: every charge must be in the books
        if now >= measure_from:
            bucket["latencies"].append(elapsed)
            if error:
                bucket["errors"].append(f"{status} {error}")


async def run_mix(base_url: str, seeded: dict, users: int, duration: float) -> tuple[dict, float, float]:
    """The mix by `users` virtual users on one event loop (aiohttp's client: at 96 users httpx's took most of a
    core itself, and throughput was the client's). Answers the results, the measured seconds and the share of one
    CPU this process spent meanwhile."""
    import aiohttp

    results = defaultdict(lambda: {"latencies": [], "errors": [], "charged": 0})
    connector = aiohttp.TCPConnector(limit=users)
    async with aiohttp.ClientSession(base_url, connector=connector, timeout=aiohttp.ClientTimeout(total=30)) as session:
        start, cpu = time.monotonic(), time.process_time()
        measure_from, stop_at = start + WARMUP, start + WARMUP + duration
        await asyncio.gather(*(virtual_user(session, seeded, random.Random(i), stop_at, measure_from, results)
                               for i in range(users)))
        client_cpu = (time.process_time() - cpu) / (time.monotonic() - start)
    return results, duration, client_cpu


def usage_check(seeded: dict, proxied_ok: int, upstream_served: int) -> dict:
    """Each agreement's books (bench.metering.check_usage_chain: used = sum of its gap-free events, nothing
    reserved once the server's leases are given back, every receipt verified), and the total against the calls."""
    from django.db.models import Sum

    from agreements.models import UsageAgreement

    ids = [b["agreement"] for b in seeded["buyers"]]
    bench_metering.wait_for_leases_given_back(ids)
    problems = [problem for agreement_id in ids for problem in bench_metering.check_usage_chain(agreement_id)]
    used = UsageAgreement.objects.filter(pk__in=ids).aggregate(total=Sum("used"))["total"] or 0
    return {"used": used, "expected": proxied_ok * UNIT_PRICE, "problems": problems,
            "upstream_served": upstream_served, "proxied_ok": proxied_ok}


def report(results: dict, duration: float, usage: dict) -> int:
    rows, total, errors = [], 0, 0
    for name, _ in MIX:
        bucket = results[name]
        latencies = sorted(bucket["latencies"])
        total += len(latencies)
        errors += len(bucket["errors"])
        rows.append((name, len(latencies), len(latencies) / duration, percentile(latencies, .5) * 1000,
                     percentile(latencies, .99) * 1000, len(bucket["errors"])))
    print(f"\n{'endpoint':<10} {'requests':>9} {'req/s':>8} {'p50 ms':>8} {'p99 ms':>8} {'errors':>7}")
    for name, count, rate, p50, p99, failed in rows:
        print(f"{name:<10} {count:>9} {rate:>8.1f} {p50:>8.1f} {p99:>8.1f} {failed:>7}")
    print(f"{'total':<10} {total:>9} {total / duration:>8.1f} {'':>8} {'':>8} {errors:>7}")
    lost = usage["used"] - usage["expected"]
    print(f"\nusage: charged {usage['used']} = {usage['proxied_ok']} calls x {UNIT_PRICE} "
          f"(difference {lost}); upstream served {usage['upstream_served']}; "
          f"problems with the agreements' books: {len(usage['problems'])}")
    for problem in usage["problems"][:5]:
        print(f"  {problem}")
    for name, _ in MIX:
        for error in results[name]["errors"][:3]:
            print(f"  {name} error: {error}")
    problems = errors + abs(lost) + len(usage["problems"]) + (usage["upstream_served"] != usage["proxied_ok"])
    return 1 if problems else 0


# --- main ----------------------------------------------------------------------------------------------------------


def run(args, database_url: str, stack: contextlib.ExitStack) -> int:
    ensure_database(database_url)
    from escrow import devchain

    node = devchain.start_anvil()
    stack.callback(node.stop)
    addresses = devchain.deploy_contracts(node.w3(), devchain.DEV_PRIVATE_KEYS[0],
                                          fee_recipient=devchain.DEV_ADDRESSES[2], arbiter=devchain.DEV_ADDRESSES[1],
                                          reclaim_grace=3600)
    env = {
        "DJANGO_SETTINGS_MODULE": "marketplace.settings", "DATABASE_URL": database_url, "DEBUG": "false",
        "SECRET_KEY": secrets.token_urlsafe(50), "ALLOWED_HOSTS": "127.0.0.1,localhost",
        "API_RATE_LIMIT": "10000000/min", "LOG_LEVEL": "WARNING", "CELERY_BROKER_URL": BROKER_URL,
        # Eight buyer keys drive the whole load, and the seller's upstream listens on loopback.
        "RATE_LIMIT_PROXY": "10000000/min", "RATE_LIMIT_PAYMENTS": "10000000/min", "ALLOW_PRIVATE_UPSTREAMS": "true",
        "CHAIN_RPC_URL": node.rpc_url, "CHAIN_ID": str(node.chain_id), "USDC_ADDRESS": addresses["usdc"],
        "USAGE_ESCROW_ADDRESS": addresses["escrow"], "RELAYER_PRIVATE_KEY": devchain.DEV_PRIVATE_KEYS[0],
        "RECEIPT_SIGNER_PRIVATE_KEY": devchain.DEV_PRIVATE_KEYS[9], "FEE_RECIPIENT": devchain.DEV_ADDRESSES[2],
        # The mix's proposals are never funded: eight buyers make thousands with one seller.
        "UNFUNDED_AGREEMENTS_PER_SELLER": "100000000",
    }
    os.environ.update(env, CELERY_TASK_ALWAYS_EAGER="true")  # set-up only: the relayer runs in this process
    processes = Processes(Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="load-bench-"))))
    stack.callback(processes.stop_all)
    upstream_port = devchain.free_port()
    processes.start("upstream", [sys.executable, str(Path(__file__).resolve()), "--upstream", str(upstream_port)],
                    dict(os.environ))

    import django

    django.setup()
    import httpx
    from django.core.management import call_command
    from django.db import connection

    call_command("migrate", verbosity=0)
    call_command("flush", interactive=False, verbosity=0)
    started = time.perf_counter()
    seeded = seed(args, f"http://127.0.0.1:{upstream_port}", node)
    print(f"seeded {args.services} services and {args.buyers} active escrows in {time.perf_counter() - started:.1f} s")
    connection.close()

    port = devchain.free_port()
    base_url = f"http://127.0.0.1:{port}"
    processes.start_web("web", port=port, workers=args.server_workers, threads=args.threads,
                        env={**os.environ, "CELERY_TASK_ALWAYS_EAGER": "false"})
    deadline = time.monotonic() + 60
    while True:
        processes.check_alive()
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(f"{base_url}/agents/me", timeout=2).status_code == 401:
                break
        if time.monotonic() > deadline:
            raise SetupFailed("the web server did not answer within 60 s")
        time.sleep(0.2)
    print(f"granian {args.server_workers} workers x {args.threads} threads on {base_url} (DEBUG=false); "
          f"{args.users} virtual users for {args.duration:g} s after a {WARMUP:g} s warm-up")

    results, duration, client_cpu = asyncio.run(run_mix(base_url, seeded, args.users, args.duration))
    print(f"client: one process, aiohttp, {client_cpu:.0%} of a CPU during the mix")
    upstream_served = int(httpx.get(f"http://127.0.0.1:{upstream_port}/__count", timeout=5).text)
    usage = usage_check(seeded, results["proxy"]["charged"], upstream_served)
    return report(results, duration, usage)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--duration", type=float, default=60, help="measured seconds (default 60)")
    parser.add_argument("--users", type=int, default=32, help="concurrent virtual users (default 32)")
    parser.add_argument("--buyers", type=int, default=8, help="buyer agents with an active escrow (default 8)")
    parser.add_argument("--services", type=int, default=200, help="catalog listings (default 200)")
    parser.add_argument("--server-workers", type=int, default=3, help="web server workers (default 3)")
    parser.add_argument("--threads", type=int, default=4, help="threads per web server worker (default 4)")
    parser.add_argument("--upstream", type=int, help=argparse.SUPPRESS)  # internal: run as the seller's upstream
    args = parser.parse_args()
    if args.upstream:
        serve_upstream(args.upstream)
        return 0
    if not (1 <= args.duration <= 600 and 1 <= args.users <= 256 and 1 <= args.buyers <= 50
            and 1 <= args.services <= 10_000 and 1 <= args.server_workers <= 16 and 1 <= args.threads <= 32):
        parser.error("--duration 1..600, --users 1..256, --buyers 1..50, --services 1..10000, "
                     "--server-workers 1..16, --threads 1..32")
    database_url, error = bench_database_url(DEFAULT_DATABASE_URL)
    if error:
        parser.error(error)
    timeout = int(args.duration + WARMUP + 240)

    return run_bounded(lambda stack: run(args, database_url, stack), timeout)


if __name__ == "__main__":
    sys.exit(main())
