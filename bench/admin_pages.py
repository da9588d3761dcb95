"""How the operators' admin answers with many rows: each change list and change page of the big tables.

    BENCH_DATABASE_URL=postgres://postgres@127.0.0.1:5432/<name with bench> \
        .venv/bin/python bench/admin_pages.py [--rows 100000] [--repeat 3]

What it does, in order:
1. Uses its own database (BENCH_DATABASE_URL, default postgres://postgres@127.0.0.1:5432/marketplace_admin_bench):
   created when missing, always migrated. Never the development or test database.
2. Seeds `--rows` services, agreements, usage events, chain transactions and skill invocations (with their payment
   authorizations), `--rows // 5` agents, and as many rows of the tables that grow with traffic (chain events,
   webhook deliveries, relay reverts, invocation seller failures, approval requests), with bulk inserts (not service
   calls), unless the database already holds this seed (same seed version and row count); a seed of before the
   traffic tables gets them added.
3. Asks each page as a superuser (the test client, in this process, DEBUG off): every change list plain, searched,
   filtered and sorted, and a change page of each big table; prints per page the best of `--repeat` answers' time,
   its SQL statements and their time, and the slowest statement; under the dashboard's line (many statements), its
   `--statements` slowest. Exits 1 when a page is not a 200.
The number to read is the statement count: it must not grow with the rows (tests/marketplace/test_admin_scale.py
holds it constant); a page's time grows with the rows only where a statement reads them all.
"""

import argparse
import os
import secrets
import sys
import time
from datetime import timedelta
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench import harness  # noqa: E402

DEFAULT_DATABASE_URL = "postgres://postgres@127.0.0.1:5432/marketplace_admin_bench"
SEED_VERSION = 1
TRAFFIC_SEED_VERSION = 1  # the tables that grow with traffic (`traffic_rows_added`), added to a seed that lacks them
BATCH = 5_000
SLOW_PAGE_SECONDS = 1.0
STATEMENTS_SHOWN = ("dashboard",)  # pages of many statements: each of their slowest is printed under their line


def _database(url: str) -> None:
    """Create the bench database when missing."""
    from urllib.parse import urlsplit, urlunsplit

    import psycopg

    parts = urlsplit(url)
    name = parts.path.lstrip("/")
    server = urlunsplit(parts._replace(path="/postgres"))
    with psycopg.connect(server, autocommit=True) as connection:
        if not connection.execute("SELECT 1 FROM pg_database WHERE datname = %s", [name]).fetchone():
            connection.execute(f'CREATE DATABASE "{name}"')


def _hex(number: int, width: int = 64) -> str:
    return "0x" + f"{number:0{width}x}"


def _address(number: int) -> str:
    return _hex(number, 40)


def seed(rows: int) -> None:
    """`rows` of each big table, in bulk, once per seed (a marker user names it)."""
    from django.contrib.auth import get_user_model
    from django.core.management import call_command
    from django.db import connection, transaction

    from agreements.models import SkillInvocation, UsageAgreement
    from escrow.models import ChainTransaction

    users = get_user_model().objects
    marker = f"bench-admin-v{SEED_VERSION}-{rows}"
    traffic_marker = f"bench-admin-traffic-v{TRAFFIC_SEED_VERSION}-{rows}"
    if users.filter(username=traffic_marker).exists():
        print(f"seed {marker} and {traffic_marker} present: reused")
        return
    started = time.monotonic()
    if users.filter(username=marker).exists():  # a seed of before the traffic tables: those added to it
        print(f"seed {marker} present: adding {traffic_marker} ...", flush=True)
        owner = users.get(username=marker)
        with transaction.atomic():
            traffic_rows_added(
                owner=owner,
                agreements=list(UsageAgreement.objects.order_by("created_at", "id").only("id", "buyer_id")),
                transactions=list(ChainTransaction.objects.order_by("created_at", "id").only("id", "agreement_id")),
                invocations=list(SkillInvocation.objects.order_by("created_at", "id").only(
                    "id", "seller_id", "buyer_id")))
            users.create(username=traffic_marker)
    else:
        print(f"seeding {marker} ...", flush=True)
        call_command("flush", interactive=False, verbosity=0)
        with transaction.atomic():
            rows_added(rows, owner=users.create(username=marker))
            users.create(username=traffic_marker)
    with connection.cursor() as cursor:
        cursor.execute("ANALYZE")
    print(f"seeded in {time.monotonic() - started:.0f} s", flush=True)


def rows_added(rows: int, *, owner, first: int = 0) -> None:
    """`rows` services, agreements (active, each with its activation transaction), usage events (100 per agreement
    from the first), chain transactions and skill invocations (each with its payment authorization), `rows // 5`
    agents (2 at least), all owned by `owner`, and the tables that grow with traffic (`traffic_rows_added`).
    `first`: where this batch's numbering starts, so that batches added one after another
    (tests/marketplace/test_admin_scale.py) share no unique value."""
    from django.utils import timezone

    from agreements.models import PaymentAuthorization, SkillInvocation, UsageAgreement, UsageEvent
    from catalog.models import Agent, Service, Skill
    from escrow.models import ChainTransaction, TxAttempt

    now = timezone.now()
    numbers = range(first, first + rows)
    agents_count = max(rows // 5, 2)
    agents = Agent.objects.bulk_create(
        [Agent(owner=owner, handle=f"agent-{first}-{i}", display_name=f"Agent {i}",
               wallet_address=_address(10**7 + first + i), is_buyer=True, is_seller=True)
         for i in range(agents_count)], batch_size=BATCH)
    services = Service.objects.bulk_create(
        [Service(seller=agents[i % agents_count], name=f"Service {i % 997}", description=f"does thing {i}",
                 capability_name="cap", capability_version="1", pricing_type="per_call", unit_price=20_000,
                 upstream_base_url=f"https://seller{i % agents_count}.example/api") for i in numbers],
        batch_size=BATCH)
    skills = Skill.objects.bulk_create(
        [Skill(service=service, name="translate", price=10_000) for service in services[:1000]], batch_size=BATCH)
    terms = dict(status="active", pricing_type="per_call", unit_name="call", price_per_unit=20_000, quantity=5,
                 deposit_amount=100_000, infra_fee=1_000, token="USDC", chain_id=31337, challenge_window_seconds=3600,
                 expires_at=now + timedelta(days=7), proposal_expires_at=now + timedelta(days=1))
    agreements = UsageAgreement.objects.bulk_create(
        [UsageAgreement(buyer=agents[n % agents_count], seller=agents[(n + 1) % agents_count],
                        service=services[n - first], buyer_wallet_address=agents[n % agents_count].wallet_address,
                        seller_wallet_address=agents[(n + 1) % agents_count].wallet_address, terms_hash=_hex(n + 1),
                        **terms) for n in numbers], batch_size=BATCH)
    # The usage events of the first agreements, 100 each: an agreement's page shows its latest ones.
    UsageEvent.objects.bulk_create(
        [UsageEvent(agreement=agreements[(n - first) // 100], seq=(n - first) % 100 + 1, source="proxy", units=1,
                    cost=20_000, cumulative=20_000 * ((n - first) % 100 + 1), usage_digest=_hex(n + 7),
                    request_id=f"req-{n}") for n in numbers], batch_size=BATCH)
    transactions = ChainTransaction.objects.bulk_create(
        [ChainTransaction(purpose="activate", agreement=agreements[n - first], chain_id=31337,
                          to_address=_address(99), data="0x", status="confirmed", mined_tx_hash=_hex(10**9 + n))
         for n in numbers], batch_size=BATCH)
    TxAttempt.objects.bulk_create(
        [TxAttempt(transaction=transactions[n - first], tx_hash=_hex(10**9 + n), raw_transaction="0x", nonce=n,
                   max_fee_per_gas=10**9, max_priority_fee_per_gas=10**8) for n in numbers], batch_size=BATCH)
    authorizations = PaymentAuthorization.objects.bulk_create(
        [PaymentAuthorization(token_address=_address(98), payer=agents[n % agents_count].wallet_address,
                              pay_to=_address(97), amount=10_000, valid_after=0, valid_before=2**40,
                              nonce=_hex(2 * 10**9 + n), signature="0x" + "ab" * 65) for n in numbers],
        batch_size=BATCH)
    invocations = SkillInvocation.objects.bulk_create(
        [SkillInvocation(skill=skills[n % len(skills)], seller=skills[n % len(skills)].service.seller,
                         buyer=agents[n % agents_count], authorization=authorizations[n - first], amount=10_000,
                         fee=100, seller_wallet_address=_address(5), is_async=False, timeout_seconds=30,
                         status="completed", money="paid_out") for n in numbers], batch_size=BATCH)
    traffic_rows_added(owner=owner, agreements=agreements, transactions=transactions, invocations=invocations,
                       first=first)


def traffic_rows_added(*, owner, agreements, transactions, invocations, first: int = 0) -> None:
    """One chain event per agreement (its activation), one webhook delivery per agreement (to one subscription of
    the first agreement's buyer), one relay revert per chain transaction, one seller failure per invocation and one
    approval request per agreement: the operators' lists that grow with traffic."""
    from django.utils import timezone

    from agreements.models import InvocationSellerFailure, WebhookDelivery, WebhookSubscription
    from escrow.models import ChainEvent, IndexerCursor, RelayRevert
    from policies.models import ApprovalRequest

    now = timezone.now()
    cursor, _ = IndexerCursor.objects.get_or_create(chain_id=31337, escrow_address=_address(96),
                                                    defaults={"start_block": 0})
    ChainEvent.objects.bulk_create(
        [ChainEvent(cursor=cursor, block_number=first + i + 1, block_hash=_hex(3 * 10**9 + first + i),
                    tx_hash=_hex(4 * 10**9 + first + i), log_index=0, contract=_address(96), name="Activated",
                    agreement=agreement, effect="applied", to_status="active")
         for i, agreement in enumerate(agreements)], batch_size=BATCH)
    subscription = WebhookSubscription.objects.create(
        agent_id=agreements[0].buyer_id, url=f"https://hooks{first}.example/in", secret=f"whsec_bench{first}")
    WebhookDelivery.objects.bulk_create(
        [WebhookDelivery(subscription=subscription, event_type="agreement.activated",
                         payload={"data": {"agreement_id": str(agreement.pk)}}, status="delivered", attempts=1,
                         next_attempt_at=now, delivered_at=now) for agreement in agreements], batch_size=BATCH)
    RelayRevert.objects.bulk_create(
        [RelayRevert(transaction=tx, party=f"wallet:{_address(2 * 10**7 + first + i)}",
                     wallet=_address(2 * 10**7 + first + i), owner=owner, reason="reverted", reverted_at=now)
         for i, tx in enumerate(transactions)], batch_size=BATCH)
    InvocationSellerFailure.objects.bulk_create(
        [InvocationSellerFailure(invocation=invocation, seller_id=invocation.seller_id, buyer_owner=owner,
                                 payer=_address(3 * 10**7 + first + i), failed_at=now)
         for i, invocation in enumerate(invocations)], batch_size=BATCH)
    ApprovalRequest.objects.bulk_create(
        [ApprovalRequest(agent_id=agreement.buyer_id,
                         subject_type="agreement", subject_id=agreement.pk, amount=100_000, rule="approval_threshold",
                         expires_at=now) for agreement in agreements], batch_size=BATCH)


def pages() -> list[tuple[str, str]]:
    """(name, path) of each page measured."""
    from agreements.models import SkillInvocation, UsageAgreement, UsageEvent
    from catalog.models import Agent, Service
    from escrow.models import ChainTransaction

    agreement = UsageAgreement.objects.order_by("created_at").first()
    listed = {
        "services": "/admin/catalog/service/",
        "agents": "/admin/catalog/agent/",
        "agreements": "/admin/agreements/usageagreement/",
        "usage events": "/admin/agreements/usageevent/",
        "chain transactions": "/admin/escrow/chaintransaction/",
        "invocations": "/admin/agreements/skillinvocation/",
        "payment authorizations": "/admin/agreements/paymentauthorization/",
        "disputes (all)": "/admin/escrow/dispute/?dispute=all",
        "skills": "/admin/catalog/skill/",
        "tags": "/admin/catalog/tag/",
        "masumi purchases": "/admin/escrow/masumipurchase/",
        "chain events": "/admin/escrow/chainevent/",
        "webhook deliveries": "/admin/agreements/webhookdelivery/",
        "relay reverts": "/admin/escrow/relayrevert/",
        "invocation failures": "/admin/agreements/invocationsellerfailure/",
        "approval requests": "/admin/policies/approvalrequest/",
    }
    found = []
    for name, path in listed.items():
        found.append((f"{name}: list", path))
        found.append((f"{name}: search", f"{path}{'&' if '?' in path else '?'}q=agent-7"))
    found += [
        ("agreements: filtered by status", "/admin/agreements/usageagreement/?status__exact=active"),
        ("agreements: sorted by deposit", "/admin/agreements/usageagreement/?o=6"),
        ("agreements: last page", "/admin/agreements/usageagreement/?p=900"),
        ("chain transactions: filtered", "/admin/escrow/chaintransaction/?status__exact=confirmed"),
        ("invocations: filtered", "/admin/agreements/skillinvocation/?status__exact=completed"),
        ("usage events: by agreement", f"/admin/agreements/usageevent/?q={agreement.pk}"),
        ("services: change page", f"/admin/catalog/service/{Service.objects.first().pk}/change/"),
        ("agents: change page", f"/admin/catalog/agent/{Agent.objects.first().pk}/change/"),
        ("agreements: change page", f"/admin/agreements/usageagreement/{agreement.pk}/change/"),
        ("usage events: change page", f"/admin/agreements/usageevent/{UsageEvent.objects.first().pk}/change/"),
        ("chain transactions: change page",
         f"/admin/escrow/chaintransaction/{ChainTransaction.objects.first().pk}/change/"),
        ("invocations: change page",
         f"/admin/agreements/skillinvocation/{SkillInvocation.objects.first().pk}/change/"),
        ("policies: add page", "/admin/policies/policy/add/"),
        ("dashboard", "/admin/dashboard/"),
    ]
    return found


def measure(repeat: int, slowest_shown: int = 6) -> int:
    from django.contrib.auth import get_user_model
    from django.db import connection
    from django.test import Client
    from django.test.utils import CaptureQueriesContext

    operator, _ = get_user_model().objects.get_or_create(
        username="bench-operator", defaults={"is_staff": True, "is_superuser": True})
    client = Client()
    client.force_login(operator)
    failed = 0
    print(f"{'page':<40} {'status':>6} {'best s':>8} {'queries':>8} {'sql s':>7}  slowest statement")
    for name, path in pages():
        best = None
        for _ in range(repeat):
            with CaptureQueriesContext(connection) as queries:
                started = time.perf_counter()
                response = client.get(path)
                elapsed = time.perf_counter() - started
            if best is None or elapsed < best[0]:
                best = (elapsed, response.status_code, list(queries.captured_queries))
        elapsed, status, captured = best
        failed += status != 200
        sql_seconds = sum(float(query["time"]) for query in captured)
        slowest = max(captured, key=lambda query: float(query["time"]), default={"sql": "", "time": "0"})
        flag = " SLOW" if elapsed > SLOW_PAGE_SECONDS else ""
        print(f"{name:<40} {status:>6} {elapsed:>8.3f} {len(captured):>8} {sql_seconds:>7.3f}  "
              f"{float(slowest['time']):.3f} {slowest['sql'][:110]}{flag}", flush=True)
        if name in STATEMENTS_SHOWN:
            for query in sorted(captured, key=lambda query: float(query["time"]), reverse=True)[:slowest_shown]:
                print(f"{'':<66}{float(query['time']):.3f} {query['sql'][:300]}", flush=True)
    return 1 if failed else 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=100_000)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--statements", type=int, default=6,
                        help="how many of the slowest statements of the dashboard to print")
    args = parser.parse_args()
    url, problem = harness.bench_database_url(DEFAULT_DATABASE_URL)
    if problem:
        print(problem, file=sys.stderr)
        return 2
    os.environ.update({"DATABASE_URL": url, "DJANGO_SETTINGS_MODULE": "marketplace.settings", "DEBUG": "false",
                       "SECRET_KEY": secrets.token_urlsafe(50), "ADMIN_REQUIRE_SECOND_FACTOR": "false"})
    _database(url)
    import django

    django.setup()
    from django.conf import settings
    from django.core.management import call_command

    settings.ALLOWED_HOSTS = [*settings.ALLOWED_HOSTS, "testserver"]
    settings.SECURE_SSL_REDIRECT = False
    call_command("migrate", verbosity=0)
    seed(args.rows)
    return measure(args.repeat, args.statements)


if __name__ == "__main__":
    sys.exit(main())
