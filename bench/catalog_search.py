"""Latency and throughput of `POST /catalog/search` on PostgreSQL with many realistic services.

    .venv/bin/python bench/catalog_search.py [--services 100000] [--requests 300] [--concurrency 4]

What it does, in order:
1. Uses its own database (BENCH_DATABASE_URL, default postgres://postgres@127.0.0.1:5432/marketplace_bench):
   created when missing, always migrated. Never the development or test database.
2. Seeds N services with bulk inserts and one set-based UPDATE for the search columns (not N service calls), unless
   the database already holds exactly this seed (same seed version and service count): then it is reused.
3. Starts the web server (marketplace.serve: granian) on a free loopback port with DEBUG off, fires each query `--requests` times from `--concurrency`
   threads (http.client, one kept-alive connection per thread; each answer checked once its clock stopped) after a
   short warm-up, and prints p50/p99 latency and requests/s per query, and the CPU time per request of the server's
   workers, of PostgreSQL's backends (read from /proc: unlike latency, it does not grow while a process waits for a
   core on a loaded machine) and of this client, which shares the machine's two cores with them. Exits 1 if
   any answer was not a 200 with a full page of results (every query is built to fill one), 2 if the set-up failed.
4. Prints PostgreSQL's plan (EXPLAIN ANALYZE) of each query's main SQL statement (`--no-explain` to leave it out).
Bounded: at most `--requests` requests per query, a 30 s timeout per request, loopback only.
"""

import argparse
import http.client
import itertools
import json
import math
import os
import re
import secrets
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path
from random import Random
from urllib.parse import urlsplit, urlunsplit

import orjson

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench import harness, idle_cpu  # noqa: E402

DEFAULT_DATABASE_URL = "postgres://postgres@127.0.0.1:5432/marketplace_bench"
# Bump when the generated data changes, so an old seed is not silently reused.
SEED_VERSION = 1
BENCH_OWNER = f"bench-owner-v{SEED_VERSION}"
BUYER_HANDLE = "bench-buyer"
SERVICES_PER_SELLER = 50
REQUEST_TIMEOUT = 30.0
PAGE_SIZE = 20  # the API's default limit
SERVER_START_TIMEOUT = 60.0

# --- what the seeded catalog looks like ---------------------------------------------------------------------------
# Domains of agent services: name nouns, tags, capability, what a description says. Names repeat across sellers as
# they do in real marketplaces ("Fast translator" many times), descriptions carry a long tail of rarer words.
DOMAINS = [
    {"nouns": ["translator", "translation service", "localization agent", "subtitle translator"],
     "tags": ["translation", "nlp", "languages", "localization"], "capability": "translate", "verb": "translate",
     "says": "Translates {thing} between {count} languages and keeps formatting, glossaries and tone."},
    {"nouns": ["invoice extractor", "receipt parser", "document OCR", "purchase order reader"],
     "tags": ["documents", "ocr", "finance", "invoices"], "capability": "extract-invoice", "verb": "extract",
     "says": "Extracts line items, totals, dates and VAT numbers from {thing} and returns structured JSON."},
    {"nouns": ["summarizer", "meeting notes writer", "digest writer", "report condenser"],
     "tags": ["summarization", "nlp", "writing"], "capability": "summarize", "verb": "summarize",
     "says": "Summarizes {thing} into short briefs with key points, decisions and open questions."},
    {"nouns": ["market research crew", "research assistant", "competitor analyst", "trend scout"],
     "tags": ["research", "writing", "analysis"], "capability": "research-brief", "verb": "research",
     "says": "A crew of agents that researches {thing} and writes a sourced brief with citations."},
    {"nouns": ["code reviewer", "test generator", "bug triager", "refactoring assistant"],
     "tags": ["code", "devtools", "testing"], "capability": "review-code", "verb": "review",
     "says": "Reviews {thing}, points out bugs and security issues and proposes patches with tests."},
    {"nouns": ["image captioner", "background remover", "image upscaler", "logo generator"],
     "tags": ["vision", "images", "generation"], "capability": "process-image", "verb": "render",
     "says": "Processes {thing}: captions, crops, upscales and removes backgrounds in seconds."},
    {"nouns": ["speech transcriber", "voice synthesizer", "podcast transcriber", "call analyzer"],
     "tags": ["audio", "speech", "transcription"], "capability": "transcribe", "verb": "transcribe",
     "says": "Transcribes {thing} with speaker labels, timestamps and punctuation in {count} languages."},
    {"nouns": ["CSV cleaner", "SQL assistant", "data enrichment agent", "spreadsheet analyst"],
     "tags": ["data", "sql", "analytics"], "capability": "analyze-data", "verb": "query",
     "says": "Cleans and enriches {thing}, writes SQL and explains the numbers in plain language."},
    {"nouns": ["crypto price oracle", "portfolio analyzer", "tax calculator", "risk scorer"],
     "tags": ["finance", "crypto", "pricing"], "capability": "price-assets", "verb": "price",
     "says": "Prices {thing} from several exchanges, computes risk and reports in USD or EUR."},
    {"nouns": ["contract reviewer", "clause extractor", "compliance checker", "NDA drafter"],
     "tags": ["legal", "compliance", "documents"], "capability": "review-contract", "verb": "check",
     "says": "Reviews {thing}, flags risky clauses and checks compliance with GDPR and local law."},
    {"nouns": ["SEO writer", "ad copy generator", "newsletter writer", "social media planner"],
     "tags": ["marketing", "writing", "seo"], "capability": "write-copy", "verb": "write",
     "says": "Writes {thing} that ranks: keywords, headlines, meta descriptions and A/B variants."},
    {"nouns": ["support ticket classifier", "FAQ bot", "sentiment analyzer", "churn predictor"],
     "tags": ["support", "nlp", "classification"], "capability": "classify-text", "verb": "classify",
     "says": "Classifies {thing} by topic, urgency and sentiment and drafts a first answer."},
    {"nouns": ["web scraper", "news monitor", "search agent", "price tracker"],
     "tags": ["web", "scraping", "search"], "capability": "crawl-web", "verb": "crawl",
     "says": "Crawls {thing}, follows links politely and returns clean text, tables and metadata."},
    {"nouns": ["medical coder", "clinical notes summarizer", "drug interaction checker"],
     "tags": ["healthcare", "nlp", "compliance"], "capability": "code-clinical", "verb": "annotate",
     "says": "Annotates {thing} with ICD-10 codes and keeps patient data private."},
    {"nouns": ["geocoder", "route planner", "weather forecaster", "satellite imagery analyst"],
     "tags": ["geo", "maps", "weather"], "capability": "geocode", "verb": "locate",
     "says": "Turns {thing} into coordinates, routes and forecasts for any region."},
    {"nouns": ["phishing detector", "vulnerability scanner", "secret leak finder"],
     "tags": ["security", "devtools", "classification"], "capability": "scan-security", "verb": "scan",
     "says": "Scans {thing} for phishing, leaked secrets and known vulnerabilities (CVE)."},
    {"nouns": ["quiz generator", "essay grader", "math tutor", "flashcard maker"],
     "tags": ["education", "writing", "generation"], "capability": "tutor", "verb": "teach",
     "says": "Creates exercises from {thing}, grades answers and explains mistakes step by step."},
    {"nouns": ["product description writer", "review analyzer", "catalog tagger", "listing optimizer"],
     "tags": ["ecommerce", "writing", "pricing"], "capability": "enrich-listing", "verb": "tag",
     "says": "Improves {thing}: descriptions, attributes, categories and review insights."},
]
THINGS = ["legal documents", "PDF files", "emails", "support tickets", "web pages", "spreadsheets", "invoices",
          "podcasts", "source code", "product listings", "medical records", "contracts", "news articles",
          "research papers", "chat transcripts", "scanned receipts", "marketing copy", "images"]
ADJECTIVES = ["Fast", "Accurate", "Budget", "Pro", "Enterprise", "Lightweight", "Multilingual", "Open", "Secure",
              "Realtime", "Batch", "Smart", "Turbo", "Precise", "Friendly", "Private", "Reliable", "Instant"]
BRANDS = ["Lingua", "Nova", "Atlas", "Quill", "Vector", "Orbit", "Beacon", "Cobalt", "Juniper", "Kestrel",
          "Lumen", "Meridian", "Nimbus", "Onyx", "Prism", "Quartz", "Sable", "Tundra", "Umbra", "Vertex"]
QUALIFIERS = ["for legal teams", "for e-commerce", "for startups", "for healthcare", "in German", "in Spanish",
              "for PDFs", "for support teams", "for developers", "for finance teams", "for researchers"]
GENERIC_TAGS = ["api", "batch", "realtime", "llm", "agents", "open-source", "enterprise", "gdpr", "cheap"]
EXTRAS = ["Pay per call in USDC.", "Answers within seconds.", "Supports batch jobs and webhooks.",
          "Runs on dedicated GPUs.", "No data is stored after the job.", "SLA of 99.9% uptime.",
          "Free retries on upstream errors.", "Streams partial results.", "Human review on request."]
SYLLABLES = ["ka", "ro", "mi", "ze", "lu", "ta", "vo", "ni", "sha", "pe", "dri", "mon", "quo", "bel", "tor", "xi"]
UNITS = ["token", "page", "minute", "image", "row", "request"]


def _codename(rng: Random) -> str:
    """A rare word (an engine or model name), so descriptions have a realistic long tail of vocabulary."""
    return "".join(rng.choice(SYLLABLES) for _ in range(rng.randint(2, 3))).capitalize()


def _service_fields(rng: Random) -> dict:
    domain = rng.choice(DOMAINS)
    noun = rng.choice(domain["nouns"])
    style = rng.random()
    if style < 0.45:
        name = f"{rng.choice(ADJECTIVES)} {noun}"
    elif style < 0.75:
        name = f"{rng.choice(BRANDS)} {noun}"
    else:
        name = f"{rng.choice(ADJECTIVES)} {noun} {rng.choice(QUALIFIERS)}"
    description = " ".join([
        domain["says"].format(thing=rng.choice(THINGS), count=rng.choice([12, 20, 40, 100])),
        f"Built on the {_codename(rng)} engine.",
        *rng.sample(EXTRAS, rng.randint(1, 3)),
    ])
    tags = rng.sample(domain["tags"], rng.randint(1, len(domain["tags"])))
    tags += rng.sample(GENERIC_TAGS, rng.randint(0, 2))
    per_call = rng.random() < 0.7
    # Prices spread over orders of magnitude (log-uniform), as real price lists are.
    price = int(math.exp(rng.uniform(math.log(1_000), math.log(5_000_000)))) if per_call else \
        int(math.exp(rng.uniform(math.log(10), math.log(50_000))))
    return {
        "domain": domain, "name": name[:250], "description": description, "tags": sorted(set(tags)),
        "pricing_type": "per_call" if per_call else "per_unit",
        "unit_name": "call" if per_call else rng.choice(UNITS), "unit_price": price,
        "upstream_protocol": "masumi" if rng.random() < 0.15 else "http",
        "deregistered": rng.random() < 0.03,
    }


# --- database -----------------------------------------------------------------------------------------------------


def ensure_database(url: str) -> None:
    """Create the benchmark database when it does not exist (connecting to the server's `postgres` database)."""
    import psycopg
    from psycopg import sql

    parts = urlsplit(url)
    name = parts.path.lstrip("/")
    if not name:
        raise SystemExit(f"BENCH_DATABASE_URL has no database name: {url}")
    maintenance = urlunsplit(parts._replace(path="/postgres"))
    with psycopg.connect(maintenance, autocommit=True) as conn:
        if not conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", [name]).fetchone():
            conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
            print(f"created database {name}")


def configure_django(database_url: str, secret_key: str) -> dict:
    """Settings for this process and the server it starts: the bench database, DEBUG off, no rate limit in the way
    (counted in Redis, as production counts them)."""
    from bench import metering as bench_metering

    env = {
        "DATABASE_URL": database_url,
        "DEBUG": "false",
        "SECRET_KEY": secret_key,
        "ALLOWED_HOSTS": "127.0.0.1,localhost,testserver",
        "API_RATE_LIMIT": "10000000/min",
        "CACHE_URL": bench_metering.CACHE_URL,
        "LOG_LEVEL": "WARNING",
        "DJANGO_SETTINGS_MODULE": "marketplace.settings",
    }
    os.environ.update(env)
    import django

    django.setup()
    return env


def seeded_count() -> int | None:
    """The number of services of this seed version, or None when the database holds something else."""
    from django.contrib.auth import get_user_model

    from catalog.models import Service

    if not get_user_model().objects.filter(username=BENCH_OWNER).exists():
        return None
    if Service.objects.filter(search_vector__isnull=True).exists():
        return None  # an interrupted seed
    return Service.objects.count()


def seed(n: int, *, rng: Random, chunk: int = 5_000) -> None:
    from django.contrib.auth import get_user_model
    from django.db import connection, transaction
    from django.db.models.expressions import RawSQL
    from eth_utils import to_checksum_address

    from catalog.models import Agent, ApiKey, OwnerToken, Service, ServiceName, Skill, Tag
    from catalog.services import search_vector_expression

    user_model = get_user_model()
    service_tag = Service.tags.through
    started = time.perf_counter()
    with transaction.atomic():
        tables = [m._meta.db_table for m in (service_tag, Skill, Service, Tag, ApiKey, OwnerToken, Agent,
                                              user_model, ServiceName)]
        with connection.cursor() as cursor:
            # A dedicated database: wipe the catalog (and whatever references it) and start over.
            cursor.execute(f"TRUNCATE {', '.join(tables)} CASCADE")
        owner = user_model.objects.create_user(BENCH_OWNER)

        def wallet() -> str:
            return to_checksum_address("0x" + rng.randbytes(20).hex())

        n_sellers = max(1, n // SERVICES_PER_SELLER)
        sellers = [
            Agent(owner=owner, handle=f"seller-{i:05d}", display_name=f"{rng.choice(BRANDS)} Labs {i}",
                  wallet_address=wallet(), is_buyer=False, is_seller=True, is_active=rng.random() > 0.02)
            for i in range(n_sellers)
        ]
        Agent.objects.bulk_create(sellers, batch_size=chunk)
        Agent.objects.create(owner=owner, handle=BUYER_HANDLE, display_name="Bench buyer", wallet_address=wallet())

        tag_names = sorted({t for d in DOMAINS for t in d["tags"]} | set(GENERIC_TAGS))
        Tag.objects.bulk_create([Tag(name=name) for name in tag_names], ignore_conflicts=True)
        tag_ids = dict(Tag.objects.values_list("name", "id"))

        skills_per_seller: dict[int, int] = {}
        for start in range(0, n, chunk):
            rows, links, skills = [], [], []
            for _ in range(start, min(n, start + chunk)):
                fields = _service_fields(rng)
                seller_index = rng.randrange(n_sellers)
                # Skill names are unique per seller (POST /agents/{handle}/{skill}): number them per seller.
                serial = skills_per_seller[seller_index] = skills_per_seller.get(seller_index, 0) + 1
                skill_names = [f"{fields['domain']['verb']}-{serial}"]
                keywords = " ".join([*fields["tags"], fields["domain"]["capability"], *skill_names]).replace("-", " ")
                service = Service(
                    id=uuid.UUID(int=rng.getrandbits(128), version=4), seller=sellers[seller_index],
                    name=fields["name"], description=fields["description"],
                    capability_name=fields["domain"]["capability"], capability_version=f"1.{rng.randint(0, 9)}.0",
                    author={"name": sellers[seller_index].display_name}, legal={}, example_outputs=[],
                    pricing_type=fields["pricing_type"], unit_name=fields["unit_name"],
                    unit_price=fields["unit_price"], token="USDC",
                    upstream_base_url=f"https://{sellers[seller_index].handle}.example.com/api",
                    upstream_protocol=fields["upstream_protocol"],
                    state="deregistered" if fields["deregistered"] else "registered", keywords=keywords,
                )
                rows.append(service)
                links += [service_tag(service_id=service.id, tag_id=tag_ids[t]) for t in fields["tags"]]
                skills += [Skill(service_id=service.id, name=s, description=f"{s} on demand") for s in skill_names]
            Service.objects.bulk_create(rows)
            service_tag.objects.bulk_create(links)
            Skill.objects.bulk_create(skills)
            if sys.stdout.isatty():
                print(f"\r  inserted {min(n, start + chunk):>7} / {n} services", end="", flush=True)
        print(f"\r  inserted {n} services, their tags and skills in {time.perf_counter() - started:.1f} s")
        updating = time.perf_counter()
        with connection.cursor() as cursor:
            cursor.execute("SET statement_timeout = 0")  # the seed's statements, not a search's: they take seconds
        # One set-based UPDATE: the same search vector catalog.services writes, and creation times spread over a
        # year (auto_now_add stamped them all "now" during the insert).
        Service.objects.update(
            search_vector=search_vector_expression(),
            created_at=RawSQL("now() - random() * interval '365 days'", []),
        )
        # The lexicon of names the typo-tolerant search reads, as catalog.services keeps it.
        with connection.cursor() as cursor:
            cursor.execute(f"INSERT INTO {ServiceName._meta.db_table} (name) SELECT DISTINCT name FROM "
                           f"{Service._meta.db_table}")
        print(f"  search vectors, creation times and the names' lexicon in two statements: "
              f"{time.perf_counter() - updating:.1f} s")
    print(f"  seeded {n} services in {time.perf_counter() - started:.1f} s")


def vacuum_analyze() -> None:
    """VACUUM ANALYZE of the tables searches read, after a seed or a migration that rewrote them (a migration may
    rewrite the postings): their index-only scans need the visibility map and their plans fresh statistics, which
    autovacuum would only bring some minutes later. On tables already vacuumed it takes a second."""
    from django.db import connection

    from catalog.models import SERVICE_POSTINGS_TABLE, VISIBLE_SERVICE_NAMES_TABLE, Service, ServiceName, Skill, Tag

    vacuuming = time.perf_counter()
    tables = [model._meta.db_table for model in (Service.tags.through, Skill, Service, Tag, ServiceName)]
    with connection.cursor() as cursor:
        cursor.execute("SET statement_timeout = 0")  # a large table's VACUUM may take longer than a request may
        for table in [*tables, SERVICE_POSTINGS_TABLE, VISIBLE_SERVICE_NAMES_TABLE]:
            cursor.execute(f"VACUUM ANALYZE {table}")
    print(f"  VACUUM ANALYZE: {time.perf_counter() - vacuuming:.1f} s")


def buyer_key() -> str:
    from catalog.models import Agent, KeyScope
    from catalog.services import api_key_issue

    buyer = Agent.objects.get(handle=BUYER_HANDLE)
    return api_key_issue(agent=buyer, scope=KeyScope.READ, name="bench").secret


# --- the server and the load --------------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_server(env: dict, *, workers: int, threads: int, port: int, log) -> subprocess.Popen:
    from marketplace import serve

    command = serve.command(port=port, workers=workers, threads=threads)
    return subprocess.Popen(command, env={**os.environ, **env}, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT)


def wait_until_ready(process: subprocess.Popen, base_url: str, headers: dict, workers: int) -> None:
    """Until every worker listens (marketplace.serve.wait_until_every_worker_listens: the client threads' kept-alive
    connections stay where they first land) and the application answers."""
    import httpx

    from marketplace import serve

    try:
        serve.wait_until_every_worker_listens(process.pid, urlsplit(base_url).port, workers, SERVER_START_TIMEOUT)
    except TimeoutError as exc:
        raise RuntimeError(str(exc)) from exc
    deadline = time.monotonic() + SERVER_START_TIMEOUT
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"the server exited with {process.returncode}")
        try:
            if httpx.get(f"{base_url}/agents/me", headers=headers, timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise RuntimeError(f"the server did not answer within {SERVER_START_TIMEOUT:.0f} s")


def stop_server(process: subprocess.Popen) -> None:
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)  # the server's main process stops its own workers
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=5)


def _per_request(seconds: float | None, requests: int) -> str:
    return "n/a" if seconds is None else f"{seconds * 1000 / requests:.1f}"


def percentile(sorted_values: list[float], fraction: float) -> float:
    """Nearest-rank percentile."""
    return sorted_values[max(0, math.ceil(fraction * len(sorted_values)) - 1)]


def fire(base_url: str, headers: dict, body: dict, *, requests: int, concurrency: int, results: int) -> dict:
    """Send `body` `requests` times; an answer that is not 200 with exactly `results` results counts as a failure.

    Each thread keeps one connection on http.client, whose CPU per request (answer checked included) is about a third
    of httpx's, CPU the server's processes share two cores with; the answer is checked with orjson's parser. The clock
    stops once the answer's last byte is in: checking the answer (parsing its JSON) is the client's work, not the
    server's latency."""
    latencies: list[float] = []
    failures: list[str] = []
    lock = threading.Lock()
    tickets = itertools.count()
    address = urlsplit(base_url)
    payload = json.dumps(body).encode()
    request_headers = {**headers, "Content-Type": "application/json"}

    def worker():
        connection = http.client.HTTPConnection(address.hostname, address.port, timeout=REQUEST_TIMEOUT)
        try:
            while True:
                with lock:
                    if next(tickets) >= requests:
                        return
                started = time.perf_counter()
                try:
                    connection.request("POST", "/catalog/search", payload, request_headers)
                    answer = connection.getresponse()
                    content = answer.read()
                    elapsed = time.perf_counter() - started
                    outcome = _unexpected_page(answer.status, content, results)
                except (OSError, http.client.HTTPException) as exc:
                    elapsed = time.perf_counter() - started
                    outcome = f"{type(exc).__name__}: {exc}"
                    connection.close()  # http.client connects again on the next request
                with lock:
                    latencies.append(elapsed)
                    if outcome:
                        failures.append(outcome)
        finally:
            connection.close()

    started, client_cpu = time.perf_counter(), time.process_time()
    threads = [threading.Thread(target=worker) for _ in range(concurrency)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    wall, client_cpu = time.perf_counter() - started, time.process_time() - client_cpu
    latencies.sort()
    return {"p50": percentile(latencies, 0.50) * 1000, "p99": percentile(latencies, 0.99) * 1000,
            "rps": len(latencies) / wall, "failures": failures, "client_cpu": client_cpu}


def _unexpected(response, results: int) -> str | None:
    """Why `response` (httpx's) is not the page the query should give, or None (`_unexpected_page`)."""
    return _unexpected_page(response.status_code, response.content, results)


def _unexpected_page(status: int, content: bytes, results: int) -> str | None:
    """Why an answer is not the page the query should give (a 200 with the wrong number of results is a failure too:
    an empty answer is fast and must not pass as a result), or None."""
    if status != 200:
        return f"{status} {content[:300].decode(errors='replace')}"
    got = len(orjson.loads(content)["results"])
    return None if got == results else f"{got} results instead of {results}"


def deep_cursor(client, body: dict, pages: int) -> tuple[str | None, int]:
    """The cursor of page `pages + 1` of `body` (or of the last page there is), walking the pages as a client does."""
    cursor, walked = None, 0
    for _ in range(pages):
        response = client.post("/catalog/search", json={**body, **({"cursor": cursor} if cursor else {})})
        response.raise_for_status()
        next_cursor = response.json()["next_cursor"]
        if next_cursor is None:
            break
        cursor, walked = next_cursor, walked + 1
    return cursor, walked


def build_queries(client) -> list[tuple[str, dict]]:
    queries = [
        ("text: 'invoice extraction'", {"q": "invoice extraction"}),
        ("text + tag: 'legal translation', tags_all=[translation]",
         {"q": "legal translation", "tags_all": ["translation"]}),
        ("filters only: tags_any=[finance,crypto], <=0.05 USDC, by price",
         {"tags_any": ["finance", "crypto"], "max_unit_price_atomic": 50_000, "order_by": "price"}),
        ("fuzzy: misspelt 'invoce extracter'", {"q": "invoce extracter"}),
    ]
    newest = {"order_by": "newest", "limit": 20}
    cursor, walked = deep_cursor(client, newest, 50)
    queries.append((f"deep page: newest, page {walked + 1} by cursor", {**newest, "cursor": cursor}))
    relevance = {"q": "summarize meeting notes", "limit": 20}
    cursor, walked = deep_cursor(client, relevance, 25)
    queries.append((f"deep page: 'summarize meeting notes', page {walked + 1}", {**relevance, "cursor": cursor}))
    return [(label, {k: v for k, v in body.items() if v is not None}) for label, body in queries]


def explain(queries: list[tuple[str, dict]], headers: dict) -> None:
    """EXPLAIN ANALYZE of the statement that selects the services of each query, run in this process."""
    from django.db import connection, transaction
    from django.test import Client
    from django.test.utils import CaptureQueriesContext

    from catalog.models import SERVICE_POSTINGS_TABLE, VISIBLE_SERVICE_NAMES_TABLE
    from catalog.selectors import NAMES_SPELT_ALIKE_FUNCTION, names_spelt_alike_plan

    client = Client(HTTP_AUTHORIZATION=headers["Authorization"])
    for label, body in queries:
        with CaptureQueriesContext(connection) as captured:
            response = client.post("/catalog/search", body, content_type="application/json")
        assert response.status_code == 200, response.content
        # The page query (it orders; the last one, which chose the services answered and reads their rows); not the
        # probe for exact matches of a later page.
        statements = [q["sql"] for q in captured.captured_queries
                      if q["sql"].startswith("SELECT") and "ORDER BY" in q["sql"]
                      and any(re.search(f'(?:FROM|,) "{table}"', q["sql"])
                              for table in ("catalog_service", SERVICE_POSTINGS_TABLE, VISIBLE_SERVICE_NAMES_TABLE))
                      ][-1:]  # a misspelling's first page runs the empty exact page first
        plans = []
        for statement in statements:
            with transaction.atomic(), connection.cursor() as cursor:
                cursor.execute("EXPLAIN (ANALYZE, BUFFERS) " + statement)
                plans.append("\n".join(f"    {row[0]}" for row in cursor.fetchall()))
            if NAMES_SPELT_ALIKE_FUNCTION in statement:  # the typo-tolerant fallback: the plan of its match too
                plans.append("\n".join(f"    {line}" for line in
                                       names_spelt_alike_plan(body["q"], analyze=True).splitlines()))
        plan = "\n\n".join(plans)
        print(f"\n--- {label}\n{plan}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--services", type=int, default=100_000, help="services to seed (default 100000)")
    parser.add_argument("--requests", type=int, default=300, help="measured requests per query (default 300)")
    parser.add_argument("--concurrency", type=int, default=4, help="client threads (default 4)")
    from marketplace import serve

    # What production runs (marketplace.serve's own defaults, WEB_CONCURRENCY and WEB_THREADS), as the other benches.
    parser.add_argument("--workers", type=int, default=serve.WORKERS,
                        help=f"web server worker processes (default {serve.WORKERS}, the server's own)")
    parser.add_argument("--threads", type=int, default=serve.THREADS,
                        help=f"threads per web server worker (default {serve.THREADS}, the server's own)")
    parser.add_argument("--reseed", action="store_true", help="seed again even if the database matches")
    parser.add_argument("--no-explain", dest="explain", action="store_false",
                        help="leave out EXPLAIN ANALYZE of each query")
    args = parser.parse_args()
    if not (1 <= args.services <= 5_000_000 and 1 <= args.requests <= 100_000 and 1 <= args.concurrency <= 64):
        parser.error("--services 1..5000000, --requests 1..100000, --concurrency 1..64")

    database_url = os.environ.get("BENCH_DATABASE_URL", DEFAULT_DATABASE_URL)
    if not database_url.startswith(("postgres://", "postgresql://")):
        parser.error("BENCH_DATABASE_URL must be a PostgreSQL URL")
    ensure_database(database_url)
    env = configure_django(database_url, secret_key=secrets.token_urlsafe(50))

    from django.core.management import call_command
    from django.db import connection

    call_command("migrate", verbosity=0)
    existing = seeded_count()
    if args.reseed or existing != args.services:
        print(f"seeding {args.services} services into {urlsplit(database_url).path.lstrip('/')} "
              f"(found {existing if existing is not None else 'no'} bench services)")
        seed(args.services, rng=Random(SEED_VERSION))
    else:
        print(f"reusing the {existing} services already seeded")
    vacuum_analyze()
    headers = {"Authorization": f"Bearer {buyer_key()}"}
    connection.close()  # the server's workers get their own connections

    import httpx

    port = free_port()
    base_url = f"http://127.0.0.1:{port}"
    with tempfile.TemporaryFile("w+") as log:
        server = start_server(env, workers=args.workers, threads=args.threads, port=port, log=log)
        try:
            try:
                wait_until_ready(server, base_url, headers, args.workers)
                with httpx.Client(base_url=base_url, headers=headers, timeout=REQUEST_TIMEOUT) as client:
                    queries = build_queries(client)
                    first_pages = [client.post("/catalog/search", json=body) for _, body in queries]
            except (RuntimeError, httpx.HTTPError) as exc:
                log.seek(0)
                print(f"set-up failed: {exc}\n--- server log ---\n{log.read()[-4000:]}", file=sys.stderr)
                return 2
            warm_up = 8 * args.workers * args.threads
            from django.conf import settings

            print(f"server: granian, {args.workers} workers x {args.threads} threads on {base_url}, DEBUG off, "
                  f"{settings.SEARCH_CONCURRENCY or 'any number of'} search(es) at once per worker "
                  f"(SEARCH_CONCURRENCY); client: {args.concurrency} threads, {args.requests} requests per query "
                  f"after {warm_up} warm-up")
            # Server, database and client share this machine: its load says how far the figures can be trusted.
            print(f"machine: {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f} before the run; "
                  f"{idle_cpu.machine_speed()}; {harness.scheduler_groups()}\n")
            meter = harness.CpuMeter(harness.child_pids(server.pid), database_url)
            harness.freeze_client_heap()
            stolen = harness.StolenCpu()
            header = (f"{'query':<66} {'page':>5} {'p50 ms':>8} {'p99 ms':>8} {'req/s':>8} {'server CPU':>11} "
                      f"{'db CPU':>7} {'client CPU':>11}")
            print(header)
            print("-" * len(header))
            failed = False
            for (label, body), first in zip(queries, first_pages, strict=True):
                # Every query is built to fill its page (the seed guarantees it): a short or empty page means the
                # search is broken, not fast.
                page = body.get("limit", PAGE_SIZE)
                first_failure = _unexpected(first, page)
                # Warm-up, at the measured concurrency, until every server thread has run this query: each has its
                # own database connection, whose first run of a query type loads that query's catalog and plan
                # caches in its backend (tens of ms). Measured cold, those first runs were the p99 of 300 requests.
                fire(base_url, headers, body, requests=warm_up, concurrency=args.concurrency, results=page)
                cpu_start = meter.read()
                result = fire(base_url, headers, body, requests=args.requests, concurrency=args.concurrency,
                              results=page)
                server_cpu, database_cpu = meter.since(cpu_start)
                print(f"{label:<66} {page:>5} {result['p50']:>8.1f} {result['p99']:>8.1f} {result['rps']:>8.1f} "
                      f"{_per_request(server_cpu, args.requests):>11} {_per_request(database_cpu, args.requests):>7} "
                      f"{_per_request(result['client_cpu'], args.requests):>11}")
                if result["failures"] or first_failure:
                    failed = True
                    print(f"    {len(result['failures'])} wrong answers, e.g. "
                          f"{(result['failures'] or [first_failure])[0]}")
            meter.close()
            print(f"{stolen.since()} during the measured requests; {idle_cpu.machine_speed()} after them")
        finally:
            stop_server(server)
    if args.explain:
        explain(queries, headers)
    print(f"\n{args.services} services; 'page' = results every answer must have; CPU in ms per request "
          "(server: the web server's processes; db: PostgreSQL's backends; client: this process); "
          f"load average {os.getloadavg()[0]:.1f} after the run.")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
