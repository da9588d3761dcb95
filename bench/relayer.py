"""Relayer throughput: N escrow activations submitted at once against Anvil, confirmed by real Celery workers.

    .venv/bin/python bench/relayer.py [--activations 200] [--workers 2] [--concurrency 2] [--clients 16]

What it does, in order:
1. Starts its own Anvil on a free loopback port (automine: one block per transaction), deploys MockUSDC and
   UsageEscrow with Anvil's key #0, which is also the relayer (RELAYER_PRIVATE_KEY), and mints USDC to N buyer
   wallets derived from fixed seeds. Buyers need no ETH: they only sign; the relayer pays the gas.
2. Uses its own database (BENCH_DATABASE_URL, default postgres://postgres@127.0.0.1:5432/marketplace_bench_relayer):
   created when missing, migrated, then flushed, because the chain is new on every run and a relayer nonce or an
   agreement from an earlier chain must not survive. Refuses a database whose name does not contain "bench".
3. Creates a seller, a service, N buyer agents with API keys and N accepted agreements through the services, and
   signs the N activation packages with the buyers' keys (sdk.sign_activation_package), before the clock starts.
4. Starts `--workers` Celery worker processes (`--concurrency` each; Redis db 14 as broker, flushed first), the web server
   on a free loopback port, and a beat-like thread that enqueues `poll_confirmations` every `--poll-interval` s.
5. Starts the clock: `--clients` threads POST the N signed activations over HTTP (the SDK's `submit_activation`);
   the server queues `submit_transaction` after commit, the workers submit and confirm, and this process watches
   the database until every agreement is active (or failed, or time is up).
6. Prints throughput, latency and the nonce checks: gaps (relayer nonces missing between the first and the last),
   collisions (one nonce on two transactions: in the database, and on-chain: every mined hash is looked up and must
   carry the nonce the database gave it), and `eth_getTransactionCount` against start nonce + transactions mined.

Exit status: 0 when every activation is active on-chain and there are no nonce gaps, collisions or drift; 1
otherwise; 2 when the set-up failed or the global timeout passed. Bounded: at most 2000 activations, a global
`--timeout` (default 600 s), loopback only; every process it starts is stopped on exit, Ctrl-C and errors included.
"""

import argparse
import contextlib
import math
import os
import secrets
import signal
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.harness import SetupFailed, bench_database_url, run_bounded  # noqa: E402
from marketplace import serve  # noqa: E402

DEFAULT_DATABASE_URL = "postgres://postgres@127.0.0.1:5432/marketplace_bench_relayer"
BROKER_URL = "redis://127.0.0.1:6379/14"
USDC = 10**6
UNIT_PRICE = 20_000  # 0.02 USDC per call
QUANTITY = 100  # deposit 2 USDC, infra fee 0.10 USDC (the minimum)
BUYER_FUNDS = 10 * USDC
SERVER_WORKERS, SERVER_THREADS = 4, 4
REQUEST_TIMEOUT = 60.0
STARTUP_TIMEOUT = 60.0
STOP_TIMEOUT = 15.0
# Time kept back from --timeout to check the nonces and print the report.
REPORT_MARGIN = 30.0


@dataclass(frozen=True)
class Activation:
    agreement_id: str
    api_key: str
    signed: dict


@dataclass(frozen=True)
class Submission:
    agreement_id: str
    started_at: float  # wall clock (time.time), comparable with the server's activated_at
    seconds: float
    error: str | None


# --- processes --------------------------------------------------------------------------------------------------


class Processes:
    """The subprocesses this bench started; each in its own session, so a whole tree is stopped by its group id."""

    def __init__(self, log_dir: Path):
        self.log_dir = log_dir
        self.started: list[tuple[str, subprocess.Popen]] = []

    def start(self, name: str, command: list[str], env: dict) -> subprocess.Popen:
        log = open(self.log_dir / f"{name}.log", "w")
        process = subprocess.Popen(command, env=env, cwd=ROOT, stdin=subprocess.DEVNULL, stdout=log,
                                   stderr=subprocess.STDOUT, start_new_session=True)
        log.close()
        self.started.append((name, process))
        return process

    def start_web(self, name: str, *, port: int, workers: int, threads: int, env: dict,
                  application: str = "marketplace.wsgi:application") -> subprocess.Popen:
        """The production web server (marketplace.serve) on the port, once every worker listens
        (serve.wait_until_every_worker_listens: a connection made earlier stays on the workers that did)."""
        process = self.start(name, serve.command(port=port, workers=workers, threads=threads,
                                                 application=application), env)
        try:
            serve.wait_until_every_worker_listens(process.pid, port, workers)
        except TimeoutError as exc:
            raise SetupFailed(f"{exc}:\n{self.log_tail(name)}") from exc
        return process

    def check_alive(self) -> None:
        for name, process in self.started:
            if process.poll() is not None:
                raise SetupFailed(f"{name} exited with {process.returncode}:\n{self.log_tail(name)}")

    def log_tail(self, name: str, chars: int = 3000) -> str:
        path = self.log_dir / f"{name}.log"
        return path.read_text(errors="replace")[-chars:] if path.exists() else ""

    def stop_all(self) -> None:
        """SIGTERM every process group (newest first), then SIGKILL what is still there after STOP_TIMEOUT."""
        for _, process in reversed(self.started):
            if process.poll() is None:
                _signal_group(process, signal.SIGTERM)
        deadline = time.monotonic() + STOP_TIMEOUT
        for _, process in reversed(self.started):
            try:
                process.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                _signal_group(process, signal.SIGKILL)
                process.wait(timeout=5)


def _signal_group(process: subprocess.Popen, signum: int) -> None:
    try:
        os.killpg(process.pid, signum)  # the group this bench created for it (start_new_session)
    except ProcessLookupError:
        pass


# --- chain --------------------------------------------------------------------------------------------------------


def buyer_keys(n: int) -> list:
    """N wallets from fixed seeds (the same on every run, distinct from Anvil's dev accounts)."""
    from eth_account import Account
    from eth_utils import keccak

    return [Account.from_key(keccak(text=f"relayer bench buyer {i}")) for i in range(n)]


def mint_to_all(w3, usdc_address: str, minter_key: str, recipients: list[str], amount: int) -> None:
    """Mint to every recipient: all transactions sent first (consecutive nonces), then every receipt checked."""
    from eth_account import Account

    from escrow import devchain

    token = devchain.usdc_contract(w3, usdc_address)
    minter = Account.from_key(minter_key)
    nonce = w3.eth.get_transaction_count(minter.address, "pending")
    gas = token.functions.mint(recipients[0], amount).estimate_gas({"from": minter.address}) * 3 // 2
    tip = w3.eth.max_priority_fee
    max_fee = 2 * w3.eth.get_block("latest")["baseFeePerGas"] + tip
    hashes = []
    for offset, recipient in enumerate(recipients):
        tx = token.functions.mint(recipient, amount).build_transaction({
            "from": minter.address, "nonce": nonce + offset, "gas": gas, "maxFeePerGas": max_fee,
            "maxPriorityFeePerGas": tip, "chainId": w3.eth.chain_id})
        hashes.append(w3.eth.send_raw_transaction(minter.sign_transaction(tx).raw_transaction))
    for tx_hash in hashes:
        if w3.eth.wait_for_transaction_receipt(tx_hash, timeout=60, poll_latency=0.05)["status"] != 1:
            raise SetupFailed(f"mint {tx_hash.hex()} reverted")


# --- database and Django ------------------------------------------------------------------------------------------


def ensure_database(url: str) -> None:
    """Create the bench database when it does not exist (connecting to the server's `postgres` database)."""
    import psycopg
    from psycopg import sql

    parts = urlsplit(url)
    name = parts.path.lstrip("/")
    with psycopg.connect(urlunsplit(parts._replace(path="/postgres")), autocommit=True) as conn:
        if not conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", [name]).fetchone():
            conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
            print(f"created database {name}")


def django_environment(database_url: str, node, addresses: dict[str, str]) -> dict[str, str]:
    """Settings for this process, the workers and the server: all from the environment, DEBUG off."""
    from escrow import devchain

    return {
        "DJANGO_SETTINGS_MODULE": "marketplace.settings",
        "DATABASE_URL": database_url,
        "DEBUG": "false",
        "SECRET_KEY": secrets.token_urlsafe(50),
        "ALLOWED_HOSTS": "127.0.0.1,localhost",
        "API_RATE_LIMIT": "10000000/min",
        "LOG_LEVEL": "WARNING",
        "CELERY_BROKER_URL": BROKER_URL,
        "CELERY_TASK_ALWAYS_EAGER": "false",
        "CHAIN_RPC_URL": node.rpc_url,
        "CHAIN_ID": str(node.chain_id),
        "USDC_ADDRESS": addresses["usdc"],
        "USAGE_ESCROW_ADDRESS": addresses["escrow"],
        "RELAYER_PRIVATE_KEY": devchain.DEV_PRIVATE_KEYS[0],  # the deployer: the escrow's operator
        "RECEIPT_SIGNER_PRIVATE_KEY": devchain.DEV_PRIVATE_KEYS[9],
        "FEE_RECIPIENT": devchain.DEV_ADDRESSES[2],
    }


def seed(keys: list) -> list[Activation]:
    """Seller, service, one buyer agent per wallet, accepted agreements and their signed activation packages."""
    from django.contrib.auth import get_user_model

    from agreements import services as agreement_services
    from catalog import services as catalog_services
    from catalog.models import KeyScope
    from catalog.serializers import ServiceWriteSerializer
    from escrow import devchain
    from escrow import services as escrow_services
    from agreements.serializers import AgreementSerializer
    from escrow import selectors as escrow_selectors
    from sdk import AgreedTerms, NetworkConfig, sign_activation_package

    from django.conf import settings

    settings.AGENTS_PER_OWNER = max(settings.AGENTS_PER_OWNER, len(keys) + 1)  # one owner holds every bench agent
    owner = get_user_model().objects.create_user("relayer-bench-owner")
    seller = catalog_services.agent_create(owner=owner, handle="bench-seller", display_name="Bench seller",
                                           wallet_address=devchain.DEV_ADDRESSES[4], wallet_proof=None,
                                           unproven_allowed=True, is_buyer=False, is_seller=True)
    body = ServiceWriteSerializer(data={
        "name": "Bench translator", "tags": ["bench"], "capability": {"name": "translate", "version": "1.0.0"},
        "pricing": {"type": "per_call", "unit_name": "call", "unit_price_atomic": UNIT_PRICE, "token": "USDC"},
        "upstream_base_url": "https://upstream.invalid/api"})
    body.is_valid(raise_exception=True)
    service = catalog_services.service_register(seller=seller, data=body.validated_data)
    network = NetworkConfig.from_dict(escrow_selectors.network_config())  # the bench trusts its own server
    activations = []
    for i, key in enumerate(keys):
        buyer = catalog_services.agent_create(owner=owner, handle=f"bench-buyer-{i:04d}",
                                              display_name=f"Bench buyer {i}", wallet_address=key.address,
                                              wallet_proof=None, unproven_allowed=True)
        api_key = catalog_services.api_key_issue(agent=buyer, scope=KeyScope.PAY).secret
        agreement = agreement_services.agreement_propose(proposal=agreement_services.agreement_proposal_prepare(
            buyer=buyer, service=service, quantity=QUANTITY))
        agreement = agreement_services.agreement_accept(agreement=agreement, seller=seller)
        package = escrow_services.activation_package(agreement=agreement, buyer=buyer)
        signed = sign_activation_package(
            package, "0x" + bytes(key.key).hex(), network=network, token_domain=network.token_domain,
            terms=AgreedTerms.from_agreement(AgreementSerializer(agreement).data, network),
            expected_seller_wallet_address=seller.wallet_address,
            permit_nonce=package["escrow_permit"]["message"]["nonce"])  # its own server's word, as its network
        activations.append(Activation(agreement_id=str(agreement.pk), api_key=api_key, signed=signed))
    return activations


# --- the measured part --------------------------------------------------------------------------------------------


def wait_for_workers(app, count: int, processes: Processes) -> None:
    deadline = time.monotonic() + STARTUP_TIMEOUT
    while time.monotonic() < deadline:
        processes.check_alive()
        if len(app.control.ping(timeout=1.0)) >= count:
            return
    raise SetupFailed(f"{count} Celery workers did not answer a ping within {STARTUP_TIMEOUT:.0f} s")


def wait_for_server(base_url: str, api_key: str, processes: Processes) -> None:
    import httpx

    from sdk import MarketplaceClient, MarketplaceError

    deadline = time.monotonic() + STARTUP_TIMEOUT
    with MarketplaceClient(base_url, api_key, timeout=2, retries=0) as client:
        while time.monotonic() < deadline:
            processes.check_alive()
            try:
                client.me()
                return
            except (MarketplaceError, httpx.HTTPError):  # not up yet
                time.sleep(0.2)
    raise SetupFailed(f"the web server did not answer within {STARTUP_TIMEOUT:.0f} s")


def submit(base_url: str, activation: Activation) -> Submission:
    import httpx

    from sdk import MarketplaceClient, MarketplaceError

    started_at, started = time.time(), time.perf_counter()
    error = None
    # No retries: a refused or failed POST is a result to report, not to paper over.
    with MarketplaceClient(base_url, activation.api_key, timeout=REQUEST_TIMEOUT, retries=0) as client:
        try:
            client.submit_activation(activation.agreement_id, activation.signed)
        except (MarketplaceError, httpx.HTTPError) as exc:
            error = f"{type(exc).__name__}: {exc}"
    return Submission(activation.agreement_id, started_at, time.perf_counter() - started, error)


def status_counts(agreement_ids: list[str]) -> dict[str, int]:
    from django.db.models import Count

    from agreements.models import UsageAgreement

    rows = UsageAgreement.objects.filter(pk__in=agreement_ids).values("status").annotate(n=Count("pk"))
    return {row["status"]: row["n"] for row in rows}


def beat(stop: threading.Event, interval: float, enqueued: list[int]) -> None:
    """What `celery beat` does for the relayer, at an interval finer than CHAIN_POLL_SECONDS (whole seconds)."""
    from escrow.tasks import poll_confirmations

    while not stop.wait(interval):
        poll_confirmations.delay()
        enqueued[0] += 1


# --- results ------------------------------------------------------------------------------------------------------


def percentile(sorted_values: list[float], fraction: float) -> float:
    """Nearest-rank percentile."""
    return sorted_values[max(0, math.ceil(fraction * len(sorted_values)) - 1)] if sorted_values else float("nan")


def nonce_report(*, relayer_address: str, start_nonce: int) -> dict:
    """Nonces of the relayer's transactions in the database, checked against the chain."""
    from escrow import chain
    from escrow.models import ChainTransaction

    rows = list(ChainTransaction.objects.filter(relayer__address=relayer_address, nonce__isnull=False)
                .values("nonce", "mined_tx_hash", "mined_block_number"))
    nonces = [row["nonce"] for row in rows]
    distinct = set(nonces)
    mined = [row for row in rows if row["mined_block_number"] is not None]
    onchain_nonces, mismatched = [], 0
    for row in mined:
        found = chain.w3().eth.get_transaction(row["mined_tx_hash"])
        if found["from"] != relayer_address or found["nonce"] != row["nonce"]:
            mismatched += 1  # mined, but not as the transaction the database thinks
        else:
            onchain_nonces.append(found["nonce"])
    transaction_count = chain.w3().eth.get_transaction_count(relayer_address, "latest")
    last = max(distinct, default=start_nonce - 1)
    return {
        "used": len(nonces),
        "first": min(distinct, default=None),
        "last": max(distinct, default=None),
        "gaps": len(set(range(start_nonce, last + 1)) - distinct),
        "db_collisions": len(nonces) - len(distinct),
        "chain_collisions": mismatched + len(onchain_nonces) - len(set(onchain_nonces)),
        "transaction_count": transaction_count,
        "mined": len(mined),
        "drift": transaction_count - (start_nonce + len(mined)),
    }


def chain_report(agreement_ids: list[str]) -> dict:
    """What the escrow contract holds: how many of the agreements it has active, and whether its USDC balance is
    exactly their deposits plus the infra fees it accrued at their activations (paid out only by `payFees`)."""
    from agreements.models import UsageAgreement
    from escrow import chain, selectors

    active_deposits = [
        int(agreement.deposit_amount) for agreement in UsageAgreement.objects.filter(pk__in=agreement_ids)
        if selectors.onchain_escrow(agreement=agreement)["state"] == "active"
    ]
    balance = chain.token_contract().functions.balanceOf(chain.escrow_address()).call()
    fees = chain.escrow_contract().functions.feesAccrued(chain.token_address()).call()
    return {"active": len(active_deposits), "balance_matches": balance == sum(active_deposits) + fees}


def relayer_report() -> dict:
    from django.db.models import Count

    from escrow.models import ChainTransaction, TxAttempt

    statuses = dict(ChainTransaction.objects.values_list("status").annotate(n=Count("pk")))
    return {"statuses": statuses, "attempts": TxAttempt.objects.count(),
            "broadcast_errors": TxAttempt.objects.exclude(broadcast_error="").count()}


# --- main ---------------------------------------------------------------------------------------------------------


def run(args: argparse.Namespace, database_url: str, stack: contextlib.ExitStack) -> int:
    clock_started = time.monotonic()
    report_by = clock_started + args.timeout - REPORT_MARGIN
    ensure_database(database_url)

    from escrow import devchain

    node = devchain.start_anvil()
    stack.callback(node.stop)
    w3 = node.w3()
    relayer_key, relayer_address = devchain.DEV_PRIVATE_KEYS[0], devchain.DEV_ADDRESSES[0]
    addresses = devchain.deploy_contracts(w3, relayer_key, fee_recipient=devchain.DEV_ADDRESSES[2],
                                          arbiter=devchain.DEV_ADDRESSES[1], reclaim_grace=3600)
    keys = buyer_keys(args.activations)
    mint_to_all(w3, addresses["usdc"], relayer_key, [key.address for key in keys], BUYER_FUNDS)
    print(f"anvil on {node.rpc_url}: contracts deployed, {len(keys)} buyer wallets funded")

    env = django_environment(database_url, node, addresses)
    os.environ.update(env)
    import django

    django.setup()
    import redis
    from django.core.management import call_command
    from django.db import connection

    from agreements.models import UsageAgreement
    from marketplace.celery import app

    call_command("migrate", verbosity=0)
    call_command("flush", interactive=False, verbosity=0)
    redis.Redis.from_url(BROKER_URL).flushdb()  # no task left over from an earlier run
    seeding_started = time.perf_counter()
    activations = seed(keys)
    print(f"seeded {len(activations)} accepted agreements and signed their activation packages "
          f"in {time.perf_counter() - seeding_started:.1f} s")
    start_nonce = w3.eth.get_transaction_count(relayer_address, "pending")
    connection.close()  # the workers and the server open their own

    processes = Processes(Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="relayer-bench-"))))
    stack.callback(processes.stop_all)
    child_env = dict(os.environ)
    for i in range(args.workers):
        processes.start(f"worker-{i}", [
            sys.executable, "-m", "celery", "-A", "marketplace", "worker", "--pool", "prefork",
            "--concurrency", str(args.concurrency), "--hostname", f"relayer-bench-{i}@%h", "--loglevel", "WARNING",
            "--without-gossip", "--without-mingle", "--without-heartbeat"], child_env)
    port = devchain.free_port()
    base_url = f"http://127.0.0.1:{port}"
    processes.start_web("web", port=port, workers=SERVER_WORKERS, threads=SERVER_THREADS, env=child_env)
    wait_for_workers(app, args.workers, processes)
    wait_for_server(base_url, activations[0].api_key, processes)
    print(f"celery: {args.workers} workers x {args.concurrency} processes on {BROKER_URL}; granian "
          f"{SERVER_WORKERS} workers x {SERVER_THREADS} threads on {base_url}; {args.clients} client threads; "
          f"poll_confirmations every {args.poll_interval:g} s\n")

    stop_beat, polls_enqueued = threading.Event(), [0]
    beat_thread = threading.Thread(target=beat, args=(stop_beat, args.poll_interval, polls_enqueued), daemon=True)
    stack.callback(stop_beat.set)
    beat_thread.start()
    first_post_at = time.time()
    executor = ThreadPoolExecutor(max_workers=args.clients, thread_name_prefix="client")
    stack.callback(executor.shutdown, wait=False, cancel_futures=True)
    posts = [executor.submit(submit, base_url, activation) for activation in activations]
    submissions: list[Submission] = []
    accepted_ids: list[str] = []
    printed, printed_at = "", 0.0
    while time.monotonic() < report_by:
        submissions = [post.result() for post in posts if post.done()]
        accepted_ids = [s.agreement_id for s in submissions if s.error is None]
        counts = status_counts(accepted_ids)
        progress = f"{len(submissions)} answered; " + ", ".join(f"{n} {status}" for status, n in sorted(counts.items()))
        if progress != printed and time.monotonic() - printed_at >= 1:
            print(f"  {time.time() - first_post_at:6.1f} s: {progress}", flush=True)
            printed, printed_at = progress, time.monotonic()
        if len(submissions) == len(posts) and (counts.get("active", 0) + counts.get("activation_failed", 0)
                                               == len(accepted_ids)):
            break
        time.sleep(0.2)
    stop_beat.set()
    posted_in = max((s.started_at + s.seconds for s in submissions), default=first_post_at) - first_post_at

    activated = dict(UsageAgreement.objects.filter(pk__in=accepted_ids, status="active")
                     .values_list("pk", "activated_at"))
    activated = {str(pk): at.timestamp() for pk, at in activated.items()}
    confirmed = [s for s in submissions if s.agreement_id in activated]
    latencies = sorted(activated[s.agreement_id] - s.started_at for s in confirmed)
    relayer_latencies = sorted(activated[s.agreement_id] - (s.started_at + s.seconds) for s in confirmed)
    post_seconds = sorted(s.seconds for s in submissions)
    wall = max(activated.values(), default=first_post_at) - first_post_at
    nonces = nonce_report(relayer_address=relayer_address, start_nonce=start_nonce)
    onchain = chain_report([a.agreement_id for a in activations])
    transactions = relayer_report()
    failed = args.activations - len(activated)

    rows = [
        ("activations", f"{args.activations}"),
        ("POSTs answered / accepted (202)", f"{len(submissions)} / {len(accepted_ids)}, "
                                            f"the last answered after {posted_in:.2f} s"),
        ("active (confirmed)", f"{len(activated)}"),
        ("wall time, first POST -> last active", f"{wall:.2f} s"),
        ("activations confirmed / s", f"{len(activated) / wall:.1f}" if wall > 0 else "-"),
        ("POST activate-escrow p50 / p99", f"{percentile(post_seconds, .5) * 1000:.0f} / "
                                           f"{percentile(post_seconds, .99) * 1000:.0f} ms"),
        ("submit -> confirmed p50 / p99", f"{percentile(latencies, .5):.2f} / {percentile(latencies, .99):.2f} s"),
        ("  of which 202 -> confirmed p50 / p99", f"{percentile(relayer_latencies, .5):.2f} / "
                                                  f"{percentile(relayer_latencies, .99):.2f} s"),
        ("relayer nonces", f"{nonces['used']} used, {nonces['first']}..{nonces['last']} (start {start_nonce})"),
        ("nonce gaps", f"{nonces['gaps']}"),
        ("nonce collisions (database)", f"{nonces['db_collisions']}"),
        ("nonce collisions (chain)", f"{nonces['chain_collisions']}  ({nonces['mined']} mined hashes looked up)"),
        ("eth_getTransactionCount - (start + mined)", f"{nonces['drift']}  "
                                                      f"({nonces['transaction_count']} on-chain)"),
        ("chain transactions by status", ", ".join(f"{n} {status}"
                                                   for status, n in sorted(transactions["statuses"].items()))),
        ("attempts (broadcast errors)", f"{transactions['attempts']} ({transactions['broadcast_errors']})"),
        ("poll_confirmations enqueued", f"{polls_enqueued[0]}"),
        ("escrows active on-chain", f"{onchain['active']}  (USDC held = their deposits + fees: "
                                    f"{'yes' if onchain['balance_matches'] else 'NO'})"),
        ("failed activations", f"{failed}"),
    ]
    width = max(len(label) for label, _ in rows)
    for label, value in rows:
        print(f"{label:<{width}}  {value}")
    for s in submissions:
        if s.error:
            print(f"  POST failed for {s.agreement_id}: {s.error[:300]}")
    problems = (failed + nonces["gaps"] + nonces["db_collisions"] + nonces["chain_collisions"] + abs(nonces["drift"])
                + (onchain["active"] != len(activated)) + (not onchain["balance_matches"]))
    return 1 if problems else 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--activations", type=int, default=200, help="activations to submit (default 200)")
    parser.add_argument("--workers", type=int, default=2, help="Celery worker processes (default 2)")
    parser.add_argument("--concurrency", type=int, default=2, help="task processes per Celery worker (default 2)")
    parser.add_argument("--clients", type=int, default=16, help="threads POSTing the activations (default 16)")
    parser.add_argument("--poll-interval", type=float, default=0.5,
                        help="seconds between poll_confirmations tasks (default 0.5)")
    parser.add_argument("--timeout", type=int, default=600, help="global limit in seconds (default 600)")
    args = parser.parse_args()
    if not (1 <= args.activations <= 2000 and 1 <= args.workers <= 8 and 1 <= args.concurrency <= 16
            and 1 <= args.clients <= 64 and 0.05 <= args.poll_interval <= 10 and 60 <= args.timeout <= 3600):
        parser.error("--activations 1..2000, --workers 1..8, --concurrency 1..16, --clients 1..64, "
                     "--poll-interval 0.05..10, --timeout 60..3600")
    database_url, error = bench_database_url(DEFAULT_DATABASE_URL)
    if error:
        parser.error(error)

    return run_bounded(lambda stack: run(args, database_url, stack), args.timeout)


if __name__ == "__main__":
    sys.exit(main())
