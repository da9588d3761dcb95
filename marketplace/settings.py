"""Settings come from the environment; every value has an embedded default so `make run` needs no setup.

Production is switched on by environment variables (DEBUG=false, DATABASE_URL, CELERY_BROKER_URL, SECRET_KEY,
CHAIN_RPC_URL, RELAYER_PRIVATE_KEY), never by editing this file.
"""

from datetime import timedelta
from pathlib import Path

import environ
from django.core.exceptions import ImproperlyConfigured

from marketplace import outbound_networks

BASE_DIR = Path(__file__).resolve().parent.parent
VAR_DIR = BASE_DIR / "var"  # local state of the embedded defaults (SQLite files, beat schedule)
VAR_DIR.mkdir(exist_ok=True)

env = environ.Env()
environ.Env.read_env(BASE_DIR / ".env", overwrite=False)

DEBUG = env.bool("DEBUG", default=True)
# The development key is only accepted while DEBUG is on; production must set SECRET_KEY.
SECRET_KEY = env.str("SECRET_KEY", default="dev-only-insecure-key" if DEBUG else environ.Env.NOTSET)
ALLOWED_HOSTS = env.list("ALLOWED_HOSTS", default=["localhost", "127.0.0.1", "[::1]", "testserver"])
CSRF_TRUSTED_ORIGINS = env.list("CSRF_TRUSTED_ORIGINS", default=[])

INSTALLED_APPS = [
    "marketplace.apps.OperatorAdminConfig",  # django.contrib.admin, its site asking for a second factor
    "django.contrib.auth",
    "django.contrib.contenttypes",
    "django.contrib.sessions",
    "django.contrib.messages",
    "django.contrib.staticfiles",
    "django.contrib.postgres",
    "rest_framework",
    "drf_spectacular",
    "drf_spectacular_sidecar",
    "django_otp",
    # Neither of django-otp's plugins: otp_totp kept TOTP keys in clear (marketplace.models.AuthenticatorAppDevice
    # keeps them sealed), otp_static kept recovery codes in clear, and its `addstatictoken` command issued more
    # (marketplace.models.RecoveryCodeDevice keeps their digests).
    "axes",  # failed admin logins and their lockouts
    "marketplace",
    "catalog",
    "policies",
    "agreements",
    "escrow",
]

MIDDLEWARE = [
    "marketplace.middleware.RequestIdMiddleware",
    "django.middleware.security.SecurityMiddleware",
    "marketplace.middleware.HotPathMiddleware",  # the metered proxy skips what follows
    "marketplace.middleware.RequestCharsetMiddleware",
    "marketplace.middleware.ApiPathMiddleware",
    "django.contrib.sessions.middleware.SessionMiddleware",
    "django.middleware.common.CommonMiddleware",
    "django.middleware.csrf.CsrfViewMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
    "django_otp.middleware.OTPMiddleware",  # request.user.is_verified(): a device verified this session
    "django.contrib.messages.middleware.MessageMiddleware",
    "django.middleware.clickjacking.XFrameOptionsMiddleware",
    "axes.middleware.AxesMiddleware",  # answers a locked-out login (AXES_LOCKOUT_CALLABLE)
]

ROOT_URLCONF = "marketplace.urls"
WSGI_APPLICATION = "marketplace.wsgi.application"

TEMPLATES = [
    {
        "BACKEND": "django.template.backends.django.DjangoTemplates",
        "DIRS": [],
        "APP_DIRS": True,
        "OPTIONS": {
            "context_processors": [
                "django.template.context_processors.request",
                "django.contrib.auth.context_processors.auth",
                "django.contrib.messages.context_processors.messages",
            ],
        },
    },
]

DATABASES = {"default": env.db("DATABASE_URL", default=f"sqlite:///{VAR_DIR / 'marketplace.sqlite3'}")}
DATABASES["default"]["CONN_MAX_AGE"] = env.int("DB_CONN_MAX_AGE", default=60)
DATABASES["default"]["CONN_HEALTH_CHECKS"] = True
# A statement running longer than this is cancelled by PostgreSQL (the request answers 503 database_unavailable, a
# task fails and its sweep does its work again): one slow statement (a plan gone wrong, a lock never released) held
# its connection, and the web thread or worker slot waiting on it, for ever. `migrate` runs without it. 0: the app
# sets none, and the role's or the server's applies (none unless set there).
DB_STATEMENT_TIMEOUT_SECONDS = env.int("DB_STATEMENT_TIMEOUT_SECONDS", default=30)
if DATABASES["default"]["ENGINE"] == "django.db.backends.postgresql":
    DATABASES["default"]["ENGINE"] = "marketplace.postgresql"  # a health check without a round trip
    # Set as the connection opens (libpq's `options`): no statement of its own. With 0 no option is sent at all:
    # PgBouncer refuses a connection that sends one ("unsupported startup parameter: options"; its
    # ignore_startup_parameters drops the timeout instead), so behind it the timeout is set on the database's role.
    _options = DATABASES["default"].setdefault("OPTIONS", {})
    if DB_STATEMENT_TIMEOUT_SECONDS:
        _options["options"] = " ".join(filter(None, [
            _options.get("options", ""), f"-c statement_timeout={DB_STATEMENT_TIMEOUT_SECONDS * 1000}"]))
# The hot statements built once per process (marketplace.postgresql.prepared_cursor) are prepared on the server;
# off behind a pooler that cannot keep them (PgBouncer before 1.21 in transaction mode). Django's own queries never
# are (they are bound on the client).
DATABASE_PREPARED_STATEMENTS = env.bool("DB_PREPARED_STATEMENTS", default=True)
if DATABASES["default"]["ENGINE"] == "django.db.backends.sqlite3":
    DATABASES["default"]["ENGINE"] = "marketplace.sqlite3"  # token amounts read exactly (no 15-digit float context)
    # Several processes (server, worker, beat) share the file: wait for locks instead of failing at once.
    DATABASES["default"].setdefault("OPTIONS", {}).update({"timeout": 20, "transaction_mode": "IMMEDIATE"})
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"

AUTH_PASSWORD_VALIDATORS = [
    {"NAME": "django.contrib.auth.password_validation.MinimumLengthValidator"},
    {"NAME": "django.contrib.auth.password_validation.CommonPasswordValidator"},
]

LANGUAGE_CODE = "en-us"
TIME_ZONE = "UTC"
USE_I18N = False
USE_TZ = True

STATIC_URL = "static/"
STATIC_ROOT = VAR_DIR / "static"

# --- REST API -------------------------------------------------------------------------------------------------
REST_FRAMEWORK = {
    "DEFAULT_AUTHENTICATION_CLASSES": [
        "catalog.authentication.BearerKeyAuthentication",
        "marketplace.second_factor.SessionAuthentication",
    ],
    "DEFAULT_PERMISSION_CLASSES": ["rest_framework.permissions.IsAuthenticated"],
    "DEFAULT_RENDERER_CLASSES": ["marketplace.renderers.JSONRenderer"],
    "DEFAULT_PARSER_CLASSES": ["marketplace.parsers.BoundedJSONParser"],
    "DEFAULT_SCHEMA_CLASS": "marketplace.autoschema.AutoSchema",
    "EXCEPTION_HANDLER": "marketplace.errors.api_exception_handler",
    "UNAUTHENTICATED_USER": "django.contrib.auth.models.AnonymousUser",
}

SPECTACULAR_SETTINGS = {
    "TITLE": "Agent Escrow Marketplace API",
    "DESCRIPTION": (
        "AI agents buy and sell services from each other and pay in USDC through on-chain escrow. "
        "Agents authenticate with `Authorization: Bearer <api key>` (the Masumi `token: <api key>` header is "
        "accepted too); owners with `Authorization: Bearer <owner token>`. Every error has the shape "
        '`{"error": {"code", "message", "details"}}`. Amounts are integers in token base units '
        "(USDC has 6 decimals: 1 USDC = 1000000)."
    ),
    "VERSION": "0.1.0",
    "SERVE_INCLUDE_SCHEMA": False,
    "COMPONENT_SPLIT_REQUEST": True,
    "ENUM_NAME_OVERRIDES": {
        "PricingTypeEnum": "catalog.models.PricingType",
        "MasumiPricingTypeEnum": ["Fixed", "Free"],
        "UpstreamProtocolEnum": "catalog.models.UpstreamProtocol",
        "AgreementStatusEnum": "agreements.models.AgreementStatus",
        "ApprovalStatusEnum": "policies.models.ApprovalStatus",
        "DeliveryStatusEnum": "agreements.models.DeliveryStatus",
        "MasumiResponseStatusEnum": ["success"],
        "SettlementModelEnum": "agreements.models.SettlementModel",
        "ProposalSettlementModelEnum": ["escrow", "direct_payment", "bilateral_escrow"],
    },
    "SWAGGER_UI_DIST": "SIDECAR",
    "SWAGGER_UI_FAVICON_HREF": "SIDECAR",
    "REDOC_DIST": "SIDECAR",
    "POSTPROCESSING_HOOKS": ["drf_spectacular.hooks.postprocess_schema_enums", "marketplace.openapi.add_links",
                           "marketplace.openapi.add_body_refusals", "marketplace.openapi.add_query_refusals"],
}

# --- Celery ---------------------------------------------------------------------------------------------------
# Embedded default: kombu's SQLAlchemy transport on a SQLite file, so `make run` needs no Redis.
CELERY_BROKER_URL = env.str("CELERY_BROKER_URL", default=f"sqla+sqlite:///{VAR_DIR / 'celery-broker.sqlite3'}")
CELERY_RESULT_BACKEND = None
CELERY_TASK_IGNORE_RESULT = True
CELERY_TASK_SERIALIZER = "json"
CELERY_ACCEPT_CONTENT = ["json"]
CELERY_TASK_ACKS_LATE = True
CELERY_TASK_REJECT_ON_WORKER_LOST = True
CELERY_WORKER_PREFETCH_MULTIPLIER = 1
CELERY_TASK_ALWAYS_EAGER = env.bool("CELERY_TASK_ALWAYS_EAGER", default=False)
CELERY_TASK_EAGER_PROPAGATES = True
CELERY_BROKER_CONNECTION_RETRY_ON_STARTUP = True
# Each connect to, and each answer of, a Redis broker within this: one that takes the connection and answers nothing
# (hung, or lost mid-failover) held a publish, and so the request that queued a task after its commit, for good. A
# publish then fails (logged: the sweeps send what it would have sent).
BROKER_SOCKET_TIMEOUT_SECONDS = env.float("CELERY_BROKER_SOCKET_TIMEOUT_SECONDS", default=5.0)
if CELERY_BROKER_URL.startswith(("redis://", "rediss://")):
    # A task unacknowledged this long (its worker died) is delivered again; tasks are idempotent. Longer than any
    # task runs (an invocation: a skill's hour plus its margin) or waits for its countdown (a webhook's last retry):
    # Redis redelivers such a message, to another worker, while the first still holds it, and each redelivery counted
    # towards a dead letter though no process died. A message a dead worker held is sent again sooner by its sweep.
    CELERY_BROKER_TRANSPORT_OPTIONS = {"visibility_timeout": env.int("CELERY_VISIBILITY_TIMEOUT", default=7200),
                                       "socket_timeout": BROKER_SOCKET_TIMEOUT_SECONDS,
                                       "socket_connect_timeout": BROKER_SOCKET_TIMEOUT_SECONDS}
# Tasks that call a webhook receiver or a seller over HTTP run on a queue of their own, served by workers of their
# own: however slow (or hostile) the third party, they never occupy the workers that submit, confirm and settle
# money, which serve the default queue. Each is also killed this long past its exchange's deadline (its
# `time_limit`), a backstop: the task is then acknowledged, not run again; a webhook's lease runs out and the retry
# sweep sends it, an invocation left processing is timed out and refunded by its sweep.
CELERY_TASK_DEFAULT_QUEUE = "celery"
# Every task of the default queue is killed (its pool process replaced; the message acknowledged, not run again) past
# this: a node, a lock or a statement that never answers held a worker slot for ever, and the submissions,
# confirmations and settlements queued behind it waited. Each is built to survive a process dying mid-run (its sweep
# or the next beat does its work again). Far above a run's bounded work (a sweep's batch, a poll's page, the
# indexer's ranges, each call within CHAIN_RPC_TIMEOUT), inside CELERY_VISIBILITY_TIMEOUT. Hard only: a soft limit
# is an exception raised inside the task, which handlers written for a node's failure would take for one
# (`escrow.chain.call` maps it to RpcUnavailable, then autoretried; the indexer keeps the event it was applying as
# failed).
TASK_TIME_LIMIT_SECONDS = env.int("TASK_TIME_LIMIT_SECONDS", default=600)
CELERY_TASK_TIME_LIMIT = TASK_TIME_LIMIT_SECONDS
OUTBOUND_QUEUE = "outbound"
OUTBOUND_TASK_TIME_LIMIT_MARGIN_SECONDS = 60
CELERY_TASK_ROUTES = {name: {"queue": OUTBOUND_QUEUE} for name in (
    "agreements.tasks.deliver_webhook", "agreements.tasks.run_invocation", "catalog.tasks.check_availability",
    "escrow.tasks.masumi_jobs_tick")}
CELERY_BEAT_SCHEDULE_FILENAME = str(VAR_DIR / "celerybeat-schedule")
CELERY_BEAT_SCHEDULE = {
    "expire-stale-api-keys": {"task": "catalog.tasks.expire_api_keys", "schedule": timedelta(minutes=5)},
}

# --- Marketplace ----------------------------------------------------------------------------------------------
# How long an Idempotency-Key replays its answer; then the key is a new one, and a beat task deletes its record
# (every POST with a new key adds one).
IDEMPOTENCY_KEY_TTL = timedelta(hours=env.int("IDEMPOTENCY_KEY_TTL_HOURS", default=24))
# A claimed key whose request never finished (crashed process) may be taken over after this long.
IDEMPOTENCY_STALE_CLAIM = timedelta(seconds=env.int("IDEMPOTENCY_STALE_CLAIM_SECONDS", default=60))
API_KEY_LAST_USED_RESOLUTION = timedelta(seconds=60)
# The metered proxy reads an API key, and an agreement's terms, at most this often per process: a revocation, an
# expiry, a deactivation or a service's new upstream takes effect within it.
CREDENTIAL_CACHE_SECONDS = env.float("CREDENTIAL_CACHE_SECONDS", default=1.0)
# A rotation's replaced proxy or webhook secret signs nothing once its overlap has ended; it is erased (a database
# read no longer gives it) at most this long after (marketplace.rotation).
REPLACED_SECRET_ERASE_SECONDS = env.int("REPLACED_SECRET_ERASE_SECONDS", default=60)
# Every retention purge (marketplace.sweeps.rows_purge) deletes at most RETENTION_PURGE_BATCH rows a statement, each
# committed, and at most RETENTION_PURGE_BATCHES_PER_RUN statements a run (per rule): the beat comes back for the
# rest, where a backlog (a purge off for a while, a burst) held a worker until the task's time limit. A purge's beat
# period sets the rate it keeps up with: 10,000 rows a run every 5 minutes is 2.9 million rows a day.
RETENTION_PURGE_BATCH = env.int("RETENTION_PURGE_BATCH", default=500)
RETENTION_PURGE_BATCHES_PER_RUN = env.int("RETENTION_PURGE_BATCHES_PER_RUN", default=20)
CELERY_BEAT_SCHEDULE.update({
    # The search's names and tags no registered service bears (a seller registering and deregistering services
    # under new names grew both without bound): up to 480,000 of each a day.
    "collect-unused-search-terms": {"task": "catalog.tasks.collect_unused_search_terms",
                                    "schedule": timedelta(minutes=30)},
    # Up to 2.9 million records a day (a POST with a new key adds one).
    "purge-expired-idempotency-records": {"task": "marketplace.tasks.purge_expired_idempotency_records",
                                          "schedule": timedelta(minutes=5)},
    "erase-replaced-proxy-secrets": {"task": "catalog.tasks.erase_replaced_proxy_secrets",
                                     "schedule": timedelta(seconds=REPLACED_SECRET_ERASE_SECONDS)},
    "erase-replaced-webhook-secrets": {"task": "agreements.tasks.erase_replaced_webhook_secrets",
                                       "schedule": timedelta(seconds=REPLACED_SECRET_ERASE_SECONDS)},
})

# Catalog searches running at once per web server process (marketplace.concurrency; 0: no limit): each costs the
# database 2-5 ms of CPU, and more at once than its cores makes the slowest far slower. Beyond it a search waits at
# most SEARCH_WAIT_SECONDS, with at most SEARCH_WAITING_MAX waiting per process (so searches hold at most 10 of a
# worker's 16 threads and leave the rest to the metered proxy), else 503 `search_busy` with Retry-After. Set it to
# about the database's cores divided by the web server's processes (WEB_CONCURRENCY).
SEARCH_CONCURRENCY = env.int("SEARCH_CONCURRENCY", default=2)
SEARCH_WAIT_SECONDS = env.float("SEARCH_WAIT_SECONDS", default=2.0)
SEARCH_WAITING_MAX = env.int("SEARCH_WAITING_MAX", default=8)

# Tokens services may be priced in; the chain address is filled in by deployment settings below.
DEV_CHAIN_ID = 31337  # Anvil's
CHAIN_ID = env.int("CHAIN_ID", default=DEV_CHAIN_ID)
CHAIN_NETWORK = env.str("CHAIN_NETWORK", default="anvil")
# Contract addresses: from the environment, else from the file `manage.py devchain` / `deploy_contracts` write
# (read through marketplace.chainconfig, never directly).
CHAIN_DEPLOYMENT_FILE = Path(env.str("CHAIN_DEPLOYMENT_FILE", default=str(VAR_DIR / "deployment.json")))
USDC_ADDRESS = env.str("USDC_ADDRESS", default="")
USAGE_ESCROW_ADDRESS = env.str("USAGE_ESCROW_ADDRESS", default="")

LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "filters": {"request_id": {"()": "marketplace.logging.RequestIdFilter"}},
    "formatters": {"json": {"()": "marketplace.logging.JsonFormatter"}},
    "handlers": {"console": {"class": "logging.StreamHandler", "formatter": "json", "filters": ["request_id"]}},
    "root": {"handlers": ["console"], "level": env.str("LOG_LEVEL", default="INFO")},
    "loggers": {"django.db.backends": {"level": "WARNING"}},
}

if not DEBUG:
    SECURE_PROXY_SSL_HEADER = ("HTTP_X_FORWARDED_PROTO", "https")
    SESSION_COOKIE_SECURE = True
    CSRF_COOKIE_SECURE = True
SUPPORTED_TOKENS = env.list("SUPPORTED_TOKENS", default=["USDC"])
# The Masumi network name this deployment answers to on the Masumi-compatible endpoints.
MASUMI_NETWORK = env.str("MASUMI_NETWORK", default="Preprod")
# Calls to a Masumi seller's own API (start_job, status, availability).
MASUMI_SERVICE_TIMEOUT = env.float("MASUMI_SERVICE_TIMEOUT_SECONDS", default=10.0)
# Masumi services whose availability a run of the poll queues checks of, in turn: each is checked once every
# ceil(services / batch) runs (MASUMI_AVAILABILITY_POLL_SECONDS).
MASUMI_AVAILABILITY_POLL_BATCH = env.int("MASUMI_AVAILABILITY_POLL_BATCH", default=1000)
CELERY_BEAT_SCHEDULE["poll-masumi-availability"] = {
    "task": "catalog.tasks.poll_availability",
    "schedule": timedelta(seconds=env.int("MASUMI_AVAILABILITY_POLL_SECONDS", default=60)),
}

# --- Agreements and policies ----------------------------------------------------------------------------------
APPROVAL_TTL = timedelta(hours=env.int("APPROVAL_TTL_HOURS", default=24))
# Requests one buyer agent may have waiting in its owner's queue at once (a purchase past it is 409): the bound on
# unfunded agreements is per seller, and an agent proposing to every seller filled the owner's queue.
APPROVALS_PENDING_PER_AGENT = env.int("APPROVALS_PENDING_PER_AGENT", default=50)
PROPOSAL_TTL = timedelta(hours=env.int("PROPOSAL_TTL_HOURS", default=72))
AGREEMENT_DEFAULT_DURATION = timedelta(days=env.int("AGREEMENT_DEFAULT_DAYS", default=7))
AGREEMENT_MAX_DURATION = timedelta(days=env.int("AGREEMENT_MAX_DAYS", default=365))
# Largest deposit one agreement may hold, in token base units (default 1,000,000 USDC).
AGREEMENT_MAX_AMOUNT = env.int("AGREEMENT_MAX_AMOUNT", default=1_000_000 * 10**6)
CHALLENGE_WINDOW_DEFAULT = env.int("CHALLENGE_WINDOW_SECONDS", default=3600)
# A buyer needs time to check the receipts before the window closes; a dev chain allows 10 s so `make demo` settles
# within a minute of starting.
CHALLENGE_WINDOW_MIN = env.int("CHALLENGE_WINDOW_MIN_SECONDS", default=10 if CHAIN_ID == DEV_CHAIN_ID else 60)
CHALLENGE_WINDOW_MAX = env.int("CHALLENGE_WINDOW_MAX_SECONDS", default=7 * 24 * 3600)
# The escrow contract's bounds (UsageEscrow.activate): a deposit fits 128 bits, a challenge window is 1 s to its
# MAX_CHALLENGE_WINDOW. Terms past them would be proposed and signed, and their activation reverted.
ESCROW_DEPOSIT_MAX = 2**128 - 1
ESCROW_CHALLENGE_WINDOW_MAX = 30 * 24 * 3600
if not 1 <= AGREEMENT_MAX_AMOUNT <= ESCROW_DEPOSIT_MAX:
    raise ImproperlyConfigured(f"AGREEMENT_MAX_AMOUNT must be from 1 to {ESCROW_DEPOSIT_MAX} (the escrow's deposit "
                               f"bound, 2**128 - 1), not {AGREEMENT_MAX_AMOUNT}.")
# The embedded SQLite default keeps an amount exactly up to 2**63 - 1 (marketplace.fields.SQLITE_AMOUNT_MAX).
if DATABASES["default"]["ENGINE"] == "marketplace.sqlite3" and AGREEMENT_MAX_AMOUNT > 2**63 - 1:
    raise ImproperlyConfigured(f"AGREEMENT_MAX_AMOUNT must be at most {2**63 - 1} on SQLite (its integers are 64-bit; "
                               f"a larger amount would be kept rounded), not {AGREEMENT_MAX_AMOUNT}.")
if not 1 <= CHALLENGE_WINDOW_MIN <= CHALLENGE_WINDOW_DEFAULT <= CHALLENGE_WINDOW_MAX <= ESCROW_CHALLENGE_WINDOW_MAX:
    raise ImproperlyConfigured(
        "CHALLENGE_WINDOW_MIN_SECONDS <= CHALLENGE_WINDOW_SECONDS <= CHALLENGE_WINDOW_MAX_SECONDS must lie from 1 to "
        f"{ESCROW_CHALLENGE_WINDOW_MAX} (the escrow's MAX_CHALLENGE_WINDOW), not {CHALLENGE_WINDOW_MIN}, "
        f"{CHALLENGE_WINDOW_DEFAULT}, {CHALLENGE_WINDOW_MAX}.")
# A buyer's challenge signature must stay valid at least this long after it is sent (or until the window's end, if
# sooner): one expiring sooner may revert SignatureExpired in the relayer's queue, at the relayer's expense.
CHALLENGE_SIGNATURE_MIN_VALIDITY = env.int("CHALLENGE_SIGNATURE_MIN_VALIDITY_SECONDS", default=60)
# A buyer's challenge in the relayer's queue holds back the re-proposal of the seller's higher receipt until this long
# (at most half the agreement's window) before the window's end; not mined by then, the re-proposal goes (it restarts
# the window, and the challenge disputes it once mined): a challenge stuck until the window closed had the seller's
# lower proposal finalized.
CHALLENGE_REPROPOSE_MARGIN_SECONDS = env.int("CHALLENGE_REPROPOSE_MARGIN_SECONDS", default=300)
# A direct payment's signatures (x402 authorization, fee permit) must stay valid at least this long after
# proposal, so the seller has time to accept; the proposal expires before they do.
DIRECT_PAYMENT_MIN_VALIDITY = env.int("DIRECT_PAYMENT_MIN_VALIDITY_SECONDS", default=600)
# ... and at most this long (a day, as the SDK signs, and 10 minutes for the buyer's clock): the authorization stays
# usable until its validBefore whatever becomes of the purchase, and is watched from the chain until then.
DIRECT_PAYMENT_MAX_VALIDITY = env.int("DIRECT_PAYMENT_MAX_VALIDITY_SECONDS", default=24 * 3600 + 600)
# The expiry sweep asks the chain whether each expiring direct proposal was paid already (its buyer's authorization
# used: then accepted as paid, not expired): at most this many a run, the others waiting for the next run.
DIRECT_PROPOSALS_CHECKED_PER_SWEEP = env.int("DIRECT_PROPOSALS_CHECKED_PER_SWEEP", default=50)
# Closed direct proposals whose buyer's authorization may still be used (bearer until its validBefore) are read from
# the chain again each minute, the least recently read first: at most this many a run.
CLOSED_DIRECT_PROPOSALS_CHECKED_PER_SWEEP = env.int("CLOSED_DIRECT_PROPOSALS_CHECKED_PER_SWEEP", default=100)
# Skill invocations (POST /agents/{handle}/{skill}): how long the request waits for the buyer's payment to be
# confirmed before answering 202 with an invocation id; how long a paid, still pending invocation waits for its
# caller before a worker runs it.
INVOCATION_PAYMENT_WAIT_SECONDS = env.float("INVOCATION_PAYMENT_WAIT_SECONDS", default=20.0)
# A paid synchronous skill runs in the caller's request only if its time limit is at most this, and only while
# fewer than INVOCATION_INLINE_CONCURRENCY do in the process; else a worker runs it (202 and the status URL).
INVOCATION_INLINE_MAX_SECONDS = env.int("INVOCATION_INLINE_MAX_SECONDS", default=60)
INVOCATION_INLINE_CONCURRENCY = env.int("INVOCATION_INLINE_CONCURRENCY", default=4)
# A skill invocation's platform fee: the fee schedule's percentage and fixed part, at least this (0.005 USDC: the
# gas of its two transactions, the payment and the payout). A skill priced at or below it is 409 skill_price_below_fee.
INVOCATION_FEE_MINIMUM_ATOMIC = env.int("INVOCATION_FEE_MINIMUM_ATOMIC", default=5_000)
INVOCATION_ORPHAN_AFTER = timedelta(seconds=env.int("INVOCATION_ORPHAN_AFTER_SECONDS", default=60))
# A failed or timed-out invocation refunds the whole price and the relayer pays both transactions' gas: a buyer party
# (an agent's owner, else the paying wallet) with this many of one seller's invocations failed within the window (or
# with INVOCATION_FAILURES_PER_BUYER of all sellers' together) is refused that seller's (every seller's) skills until
# the oldest leaves the window: 429 seller_failing_for_you. Counted per buyer party, so no buyer pauses a seller for
# the others. 0: no limit.
INVOCATION_FAILURE_WINDOW = timedelta(seconds=env.int("INVOCATION_FAILURE_WINDOW_SECONDS", default=3600))
INVOCATION_FAILURES_PER_BUYER_SELLER = env.int("INVOCATION_FAILURES_PER_BUYER_SELLER", default=5)
INVOCATION_FAILURES_PER_BUYER = env.int("INVOCATION_FAILURES_PER_BUYER", default=20)
WEBHOOK_TIMEOUT_SECONDS = env.float("WEBHOOK_TIMEOUT_SECONDS", default=10.0)
WEBHOOK_MAX_ATTEMPTS = env.int("WEBHOOK_MAX_ATTEMPTS", default=8)
# Webhook attempts in flight at once per receiving host, and per owner of the subscribing agents (all its agents);
# calls to sellers from outbound workers (skill runs, Masumi availability checks) per seller upstream host, and per
# seller's owner. Counted across every outbound worker (marketplace.outbound_slots, in CACHES' default: Redis in
# production; 0: no limit). One beyond a share is put off by OUTBOUND_PUT_OFF_SECONDS to twice that, doubled at
# each put-off after (a webhook attempt not counted as one, an invocation still pending), an availability check
# skipped until the next poll. Keep them under the outbound workers' slots (their processes times --concurrency):
# receivers and sellers that never answer then hold no more of them than that.
WEBHOOK_ATTEMPTS_IN_FLIGHT_PER_HOST = env.int("WEBHOOK_ATTEMPTS_IN_FLIGHT_PER_HOST", default=4)
WEBHOOK_ATTEMPTS_IN_FLIGHT_PER_OWNER = env.int("WEBHOOK_ATTEMPTS_IN_FLIGHT_PER_OWNER", default=4)
SELLER_CALLS_IN_FLIGHT_PER_HOST = env.int("SELLER_CALLS_IN_FLIGHT_PER_HOST", default=4)
SELLER_CALLS_IN_FLIGHT_PER_OWNER = env.int("SELLER_CALLS_IN_FLIGHT_PER_OWNER", default=4)
OUTBOUND_PUT_OFF_SECONDS = env.float("OUTBOUND_PUT_OFF_SECONDS", default=5.0)
# An attempt put off again and again (a webhook delivery, a skill run) waits twice as long each time, from
# OUTBOUND_PUT_OFF_SECONDS up to this (then up to twice this, jittered): receivers and sellers holding their shares
# for hours made each attempt waiting behind them a task, a transaction and a slot check every few seconds. Keep
# twice it under the broker's visibility timeout.
OUTBOUND_PUT_OFF_MAX_SECONDS = env.float("OUTBOUND_PUT_OFF_MAX_SECONDS", default=300.0)
# A due delivery the retry sweep queued is queued again only once no worker took that message within this (it may be
# lost): not on every run while the outbound queue is behind.
WEBHOOK_REQUEUE_AFTER_SECONDS = env.int("WEBHOOK_REQUEUE_AFTER_SECONDS", default=120)
# A delivery delivered or given up is deleted by a beat task this long after its last attempt (its event stays in the
# agents' inboxes, GET /agents/{id}/events): up to 2.9 million of each a day (RETENTION_PURGE_BATCH).
WEBHOOK_DELIVERY_KEEP_DAYS = env.int("WEBHOOK_DELIVERY_KEEP_DAYS", default=30)
CELERY_BEAT_SCHEDULE["purge-webhook-deliveries"] = {"task": "agreements.tasks.purge_webhook_deliveries",
                                                    "schedule": timedelta(minutes=5)}
# Per-agent bounds on what an agent can create at will. Every live webhook subscription is sent each event and each
# test send, so their number is how many posts one event makes. (Rate limits count per agent, whatever its keys.)
WEBHOOK_SUBSCRIPTIONS_PER_AGENT = env.int("WEBHOOK_SUBSCRIPTIONS_PER_AGENT", default=10)
API_KEYS_PER_AGENT = env.int("API_KEYS_PER_AGENT", default=25)
OWNER_TOKENS_PER_OWNER = env.int("OWNER_TOKENS_PER_OWNER", default=25)
# Agents an owner may create (handles are one namespace for every tenant).
AGENTS_PER_OWNER = env.int("AGENTS_PER_OWNER", default=50)
# The EIP-712 domain name of the proof that a wallet is an agent's (catalog.services.wallet_proof_typed_data), whose
# verifyingContract is the escrow contract: deployments sharing a chain and an escrow contract (or, dev set-ups, none)
# name themselves apart, so no proof made for one serves the other.
WALLET_PROOF_DOMAIN_NAME = env.str("WALLET_PROOF_DOMAIN_NAME", default="Agent escrow marketplace")
# A service's free-form `capabilities` and `metadata`, each at most this many bytes of JSON (shown in every search
# result).
SERVICE_FREE_FORM_MAX_BYTES = env.int("SERVICE_FREE_FORM_MAX_BYTES", default=16 * 1024)
# A Masumi purchase's `input_data`, at most this many bytes of JSON (kept with the purchase, sent to the seller).
MASUMI_INPUT_DATA_MAX_BYTES = env.int("MASUMI_INPUT_DATA_MAX_BYTES", default=64 * 1024)
# A page of a buyer's Masumi purchases (GET /purchase) stops once its results (each a seller's answer, up to
# UPSTREAM_ANSWER_MAX_BYTES) reach this many characters, holding at least one purchase: escrow.selectors.purchases_page.
MASUMI_PURCHASES_PAGE_RESULT_CHARACTERS = env.int("MASUMI_PURCHASES_PAGE_RESULT_CHARACTERS", default=4 * 1024 * 1024)
# A seller's Masumi payment requests (`POST /payment`) that no buyer paid, still payable or made in the last day:
# beyond, 409 `payment_requests_limit_reached` (a request costs nothing: escrow.purchases).
MASUMI_UNPAID_PAYMENT_REQUESTS_PER_SELLER = env.int("MASUMI_UNPAID_PAYMENT_REQUESTS_PER_SELLER", default=1000)
# An unpaid one is deleted this many days after its payByTime (when nobody can pay it any more) by the
# `purge-expired-payment-requests` beat task (up to 2.9 million a day: RETENTION_PURGE_BATCH); a paid one is kept with
# its purchase.
MASUMI_PAYMENT_REQUEST_KEEP_DAYS = env.int("MASUMI_PAYMENT_REQUEST_KEEP_DAYS", default=7)
# A skill invocation's `input`, at most this many bytes of JSON (kept with the invocation, sent to the seller).
SKILL_INPUT_MAX_BYTES = env.int("SKILL_INPUT_MAX_BYTES", default=64 * 1024)
# Registered services a seller lists at once (each is in every buyer's search).
SERVICES_PER_SELLER = env.int("SERVICES_PER_SELLER", default=200)
# Services a seller registers in a day, deregistered ones included (a deregistered service's row is kept for
# agreements and history: registering and deregistering in a loop grew the table without bound).
SERVICE_REGISTRATIONS_PER_DAY = env.int("SERVICE_REGISTRATIONS_PER_DAY", default=400)
# A buyer's agreements with one seller that the seller has not answered or the buyer not funded (an escrow proposal
# costs the buyer nothing; each is in the seller's inbox and webhooks).
UNFUNDED_AGREEMENTS_PER_SELLER = env.int("UNFUNDED_AGREEMENTS_PER_SELLER", default=20)
# Those the buyer cancelled, or let expire, count for this long after their proposal (each proposal and each cancel
# is an event in the seller's inbox and webhooks: proposing and cancelling in a loop went round the bound).
UNFUNDED_AGREEMENTS_WINDOW_SECONDS = env.int("UNFUNDED_AGREEMENTS_WINDOW_SECONDS", default=3600)
CELERY_BEAT_SCHEDULE.update({
    "expire-proposals": {"task": "agreements.tasks.expire_proposals", "schedule": timedelta(minutes=1)},
    "expire-unfunded-past-term": {"task": "agreements.tasks.expire_unfunded_past_term",
                                  "schedule": timedelta(minutes=1)},
    "watch-closed-direct-proposals": {"task": "agreements.tasks.watch_closed_direct_proposals",
                                      "schedule": timedelta(minutes=1)},
    "expire-approvals": {"task": "policies.tasks.expire_approvals", "schedule": timedelta(minutes=1)},
    "retry-webhooks": {"task": "agreements.tasks.retry_due_webhooks", "schedule": timedelta(seconds=30)},
    "sweep-invocations": {"task": "agreements.tasks.sweep_invocations", "schedule": timedelta(seconds=15)},
})
# Receives platform fees unless the fee schedule in the admin names another address.
FEE_RECIPIENT = env.str("FEE_RECIPIENT", default="0x90F79bf6EB2c4f870365E785982E1f101E93b906")

# --- Chain ----------------------------------------------------------------------------------------------------
CHAIN_RPC_URL = env.str("CHAIN_RPC_URL", default="http://127.0.0.1:8545")
# Anvil's public development key #0; only ever a default while DEBUG is on. Production sets its own.
_ANVIL_DEV_KEY = "0xac0974bec39a17e36ba4a6b4d238ff944bacb478cbed5efcae784d7bf4f2ff80"
RELAYER_PRIVATE_KEY = env.str("RELAYER_PRIVATE_KEY", default=_ANVIL_DEV_KEY if DEBUG else "")
# Relayer keys replaced, kept while transactions their wallets signed are in flight: a nonce is one wallet's, so
# only its own key can replace or cancel such a transaction (`chainconfig.relayer_key`).
RELAYER_RETIRED_PRIVATE_KEYS = env.list("RELAYER_RETIRED_PRIVATE_KEYS", default=[])
# Signs usage receipts (the buyer names its address in the activation intent). Anvil dev key #9 by default.
_ANVIL_DEV_KEY_9 = "0x2a871d0798f97d79848a013d4936a73bf4cc922c825d33c1cf7073dff6d409c6"
RECEIPT_SIGNER_PRIVATE_KEY = env.str("RECEIPT_SIGNER_PRIVATE_KEY", default=_ANVIL_DEV_KEY_9 if DEBUG else "")
# Receipt-signer keys rotated out, kept while escrows naming them are open: each escrow accepts only the signer its
# activation named, so every receipt of its agreement is signed with that one (`chainconfig.receipt_signer_key`).
RECEIPT_SIGNER_RETIRED_PRIVATE_KEYS = env.list("RECEIPT_SIGNER_RETIRED_PRIVATE_KEYS", default=[])
# Seconds for a whole RPC answer, not per read.
CHAIN_RPC_TIMEOUT = env.float("CHAIN_RPC_TIMEOUT", default=10.0)
# A node's answer larger than this is refused (an eth_getLogs over INDEXER_BLOCK_RANGE blocks is the largest).
CHAIN_RPC_MAX_ANSWER_BYTES = env.int("CHAIN_RPC_MAX_ANSWER_BYTES", default=32 * 1024 * 1024)
# An RPC call is tried again this many times after a timeout, 429 or 5xx, waiting backoff, 2x, 4x ... seconds in
# between (0: tried once).
CHAIN_RPC_RETRIES = env.int("CHAIN_RPC_RETRIES", default=2)
CHAIN_RPC_RETRY_BACKOFF = env.float("CHAIN_RPC_RETRY_BACKOFF_SECONDS", default=0.25)
# The node's chain id is believed this long, then asked again: a provider moved to another network mid-run is noticed
# (WrongChain) by the next poll, submission or indexer pass after it.
CHAIN_ID_RECHECK_SECONDS = env.float("CHAIN_ID_RECHECK_SECONDS", default=2.0)
# Blocks on top of a transaction's block (its own included) before its outcome counts. A dev chain does not
# reorganise: 1. Base and Base Sepolia (OP stack, 2 s blocks) can only reorganise blocks the sequencer has not
# yet posted to L1; 10 blocks (20 s) covers a sequencer hiccup, and any other chain gets the same until
# configured. Finality (L1 finalized) is ~15 min on Base: the treasury's invocation payouts wait for it
# (PAYOUT_HEAD_TAG, below); set CHAIN_CONFIRMATIONS higher where it matters elsewhere.
CHAIN_CONFIRMATIONS_BY_CHAIN = {31337: 1, 8453: 10, 84532: 10}
CHAIN_CONFIRMATIONS = env.int("CHAIN_CONFIRMATIONS", default=CHAIN_CONFIRMATIONS_BY_CHAIN.get(CHAIN_ID, 10))
# Money leaves the treasury only against a payment no reorg can take: a skill invocation's payout or refund (and a
# direct purchase's fee refund) is not signed until the block of the payment it forwards (the fee it gives back) is
# at or below the node's tagged block ("finalized" or "safe") and still canonical; it waits queued meanwhile (the
# relayer's poll sends it once the tag passes the block). The skill itself runs at CHAIN_CONFIRMATIONS, as before,
# and a direct purchase is paid then. Empty: sent at once (a deep reorg can then cost the treasury
# the price, see SECURITY.md). On by default on every chain but the dev chain (Base: L1 finality, ~15 min).
PAYOUT_HEAD_TAG = env.str("PAYOUT_HEAD_TAG", default="" if CHAIN_ID == DEV_CHAIN_ID else "finalized")
if PAYOUT_HEAD_TAG not in ("", "safe", "finalized"):
    raise ImproperlyConfigured(f'PAYOUT_HEAD_TAG must be "finalized", "safe" or empty, not {PAYOUT_HEAD_TAG!r}.')
CHAIN_MIN_PRIORITY_FEE = env.int("CHAIN_MIN_PRIORITY_FEE_WEI", default=1_000_000)  # 0.001 gwei
CHAIN_MAX_FEE_PER_GAS = env.int("CHAIN_MAX_FEE_PER_GAS_WEI", default=500 * 10**9)
# The most of the node's suggested priority fee believed: a tip is paid whole to the block's producer, whatever the base
# fee, so a node suggesting hundreds of gwei (compromised, or a provider's bug) had every transaction pay up to
# CHAIN_MAX_FEE_PER_GAS per gas. A transaction stuck below it is still bid up 13% a round, its tip within this bound
# and its max fee within twice the latest block's base fee plus it (`relayer._replacement_fees`).
# Base's tips are about 0.001 gwei; raise it on a chain whose nodes refuse less (Polygon: 30 gwei).
CHAIN_MAX_PRIORITY_FEE_PER_GAS = env.int("CHAIN_MAX_PRIORITY_FEE_PER_GAS_WEI", default=2 * 10**9)
# The largest gas estimate believed: a node answering more (beyond any block) had the transaction signed under the next
# nonce with a limit no node takes, and every later transaction of the wallet waited behind it.
CHAIN_MAX_GAS_PER_TRANSACTION = env.int("CHAIN_MAX_GAS_PER_TRANSACTION", default=3_000_000)
CHAIN_FEE_BUMP_PERCENT = 13  # nodes accept a replacement at >= +10%; 12.5% rounded up
CHAIN_REBROADCAST_AFTER = timedelta(seconds=env.int("CHAIN_REBROADCAST_AFTER_SECONDS", default=30))
CHAIN_REPLACE_AFTER = timedelta(seconds=env.int("CHAIN_REPLACE_AFTER_SECONDS", default=120))
# A nonce of ours used by a transaction the relayer cannot name from past nonces (a node without old state, not an
# archive node): the blocks since the transaction was first signed, less this margin for clocks apart, are read (one
# call each) to show none of its attempts was mined; at most this many, else it waits for an operator (overdue).
CHAIN_NONCE_SCAN_CLOCK_MARGIN = timedelta(seconds=env.int("CHAIN_NONCE_SCAN_CLOCK_MARGIN_SECONDS", default=300))
CHAIN_NONCE_SCAN_MAX_BLOCKS = env.int("CHAIN_NONCE_SCAN_MAX_BLOCKS", default=3600)
# A transaction still queued this long after its last change lost its task message; the sweeper sends it again.
CHAIN_SWEEP_AFTER = timedelta(seconds=env.int("CHAIN_SWEEP_AFTER_SECONDS", default=30))
# A transaction the sweeper sent is sent again only once no worker took that message within this (it may be lost):
# not on every sweep while the default queue is behind.
CHAIN_SUBMIT_REQUEUE_AFTER = timedelta(seconds=env.int("CHAIN_SUBMIT_REQUEUE_AFTER_SECONDS", default=120))
# How long an activation package's signatures stay valid. Well inside the SDK's bound (it refuses deadlines more
# than 1 h away), with room for the difference between our clock and the buyer's.
ACTIVATION_SIGNATURE_TTL = env.int("ACTIVATION_SIGNATURE_TTL_SECONDS", default=1800)
# The chain's head the API counts confirmations against (escrow-status) is read at most this often per process, not
# per request (each an RPC call a metered provider charges, as often as any caller with a read key asks).
CHAIN_HEAD_SHOWN_SECONDS = env.float("CHAIN_HEAD_SHOWN_SECONDS", default=2.0)
# The chain's clock is stalled when its latest block is older than this (see README, "stalled chain").
CHAIN_STALL_SECONDS = env.int("CHAIN_STALL_SECONDS", default=60)
# A block's timestamp is believed no further ahead of our clock than this (see README, "Time"): a node answering one
# far ahead made what the chain's clock decides fall due early. Off (unbounded) by default on the dev chain only,
# whose tests move its time forward on purpose (evm_increaseTime).
CHAIN_CLOCK_MAX_LEAD_SECONDS = env.int("CHAIN_CLOCK_MAX_LEAD_SECONDS",
                                       default=None if CHAIN_ID == DEV_CHAIN_ID else 30)
# A node whose latest block is further behind our clock than this (a provider's backend that fell behind) does not
# judge a payment authorization's window (`chain_clock.signature_window_clock`: 503): its old clock, and its
# simulations run at it, passed authorizations the chain had expired, which reverted at the relayer's gas. Off
# (unbounded) by default on the dev chain only, idle between transactions (its latest block minutes old).
CHAIN_CLOCK_MAX_LAG_SECONDS = env.int("CHAIN_CLOCK_MAX_LAG_SECONDS",
                                      default=None if CHAIN_ID == DEV_CHAIN_ID else 30)
# Failed payments whose authorization may still be used (relayer.transactions_recheck_watched) read at most per poll.
CHAIN_WATCHED_CHECKS_PER_POLL = env.int("CHAIN_WATCHED_CHECKS_PER_POLL", default=50)
# A party (buyer agent, or payer wallet without one) whose relayed transactions were mined reverted this many times
# (the relayer's gas spent: relayer.relay_budget_check) within the window has its relayed actions refused, 429
# relay_budget_exhausted, until the oldest of them leaves the window. 0: no limit.
RELAY_REVERTS_PER_PARTY = env.int("RELAY_REVERTS_PER_PARTY", default=3)
# The same within the window for all the agents of one owner together (else an owner multiplied its budget by
# creating agents), and for one paying wallet whoever pays from it (its agents, of any owner, and anonymously). 0: none.
RELAY_REVERTS_PER_OWNER = env.int("RELAY_REVERTS_PER_OWNER", default=6)
RELAY_REVERTS_PER_WALLET = env.int("RELAY_REVERTS_PER_WALLET", default=3)
# An anonymous x402 payer's (no API key) wallets cost nothing to make: its reverts also count per client network
# (IPv6: its /64) and, for all anonymous payers together, at most this many within the window. 0: none.
RELAY_REVERTS_PER_CLIENT = env.int("RELAY_REVERTS_PER_CLIENT", default=3)
RELAY_REVERTS_ANONYMOUS = env.int("RELAY_REVERTS_ANONYMOUS", default=30)
RELAY_REVERT_WINDOW = timedelta(seconds=env.int("RELAY_REVERT_WINDOW_SECONDS", default=24 * 3600))
# A closed direct purchase's authorization cancels the relayer sent for one buyer agent within RELAY_REVERT_WINDOW
# (each at its gas) at most; more is 429 relay_cancel_budget_exhausted: the buyer sends its own. Not counted nor
# refused: one whose payment was sent. The same for an owner's agents together and for one paying wallet. 0: no limit.
RELAY_AUTHORIZATION_CANCELS_PER_PARTY = env.int("RELAY_AUTHORIZATION_CANCELS_PER_PARTY", default=3)
RELAY_AUTHORIZATION_CANCELS_PER_OWNER = env.int("RELAY_AUTHORIZATION_CANCELS_PER_OWNER", default=6)
RELAY_AUTHORIZATION_CANCELS_PER_WALLET = env.int("RELAY_AUTHORIZATION_CANCELS_PER_WALLET", default=3)
# Its relayed transactions not concluded yet (queued, sent, mined short of the confirmation depth) at most: more is
# 429 relay_in_flight_limit_reached (one transfer of its funds would make all of them revert at once). 0: no limit.
RELAY_IN_FLIGHT_PER_PARTY = env.int("RELAY_IN_FLIGHT_PER_PARTY", default=10)
# The same for all the agents of one owner together (else multiplied by creating agents). 0: no limit.
RELAY_IN_FLIGHT_PER_OWNER = env.int("RELAY_IN_FLIGHT_PER_OWNER", default=20)
# The same for anonymous x402 payers (no API key) at one client network (IPv6: its /64), whatever their wallets:
# fresh wallets cost nothing to make. 0: no limit.
RELAY_IN_FLIGHT_PER_CLIENT = env.int("RELAY_IN_FLIGHT_PER_CLIENT", default=10)
# A settlement proposal (or reclaim) that reverts is tried again by the settlement tick after BACKOFF, 2 x BACKOFF, 4 x ...
# seconds, at most MAX_ATTEMPTS times; then it waits on the dashboard for an operator's retry (which starts over).
SETTLEMENT_PROPOSE_MAX_ATTEMPTS = env.int("SETTLEMENT_PROPOSE_MAX_ATTEMPTS", default=5)
SETTLEMENT_PROPOSE_BACKOFF_SECONDS = env.int("SETTLEMENT_PROPOSE_BACKOFF_SECONDS", default=30)
# Agreements each step of a settlement tick (expiry, proposal, re-proposal, finalize, dispute timeout) takes at most,
# the longest due first; the next tick (SETTLEMENT_TICK_SECONDS) takes up after them. Each costs a chain read or two:
# a run stays well inside TASK_TIME_LIMIT_SECONDS with a slow node.
SETTLEMENT_TICK_BATCH = env.int("SETTLEMENT_TICK_BATCH", default=100)
MASUMI_PURCHASE_TICK_SECONDS = env.int("MASUMI_PURCHASE_TICK_SECONDS", default=10)
# The Masumi jobs tick calls sellers (start_job, status) this many at a time, at most 2 at once per seller, and
# starts no call after MASUMI_PURCHASE_TICK_SECONDS: a tick lasts at most that plus MASUMI_SERVICE_TIMEOUT.
MASUMI_JOB_CALLS_AT_ONCE = env.int("MASUMI_JOB_CALLS_AT_ONCE", default=8)
CELERY_BEAT_SCHEDULE.update({
    "poll-confirmations": {"task": "escrow.tasks.poll_confirmations",
                           "schedule": timedelta(seconds=env.int("CHAIN_POLL_SECONDS", default=3))},
    "sweep-queued-transactions": {"task": "escrow.tasks.sweep_queued",
                                  "schedule": timedelta(seconds=env.int("CHAIN_SWEEP_SECONDS", default=30))},
    "settlement-tick": {"task": "escrow.tasks.settlement_tick",
                        "schedule": timedelta(seconds=env.int("SETTLEMENT_TICK_SECONDS", default=10))},
    # payFees: the infra fees accrued in the escrow go to its fee recipient (one call for any number of agreements)
    "pay-fees": {"task": "escrow.tasks.pay_fees", "schedule": timedelta(seconds=env.int("PAY_FEES_SECONDS", default=300))},
    "masumi-purchases-tick": {"task": "escrow.tasks.masumi_purchases_tick",
                              "schedule": timedelta(seconds=MASUMI_PURCHASE_TICK_SECONDS)},
    "masumi-jobs-tick": {"task": "escrow.tasks.masumi_jobs_tick", "schedule": timedelta(seconds=MASUMI_PURCHASE_TICK_SECONDS)},
    "purge-expired-payment-requests": {"task": "escrow.tasks.purge_expired_payment_requests",
                                       "schedule": timedelta(minutes=5)},
})
# A token's infra fee payment mined failed (its gas paid: out of gas on an estimate a node gave short) is sent again
# only this long after, doubled with each failure in a row (escrow.fees), not at every pay-fees run.
PAY_FEES_RETRY_AFTER_SECONDS = env.int("PAY_FEES_RETRY_AFTER_SECONDS", default=3600)
# The chain indexer (escrow.indexer): follows the escrow's events from its deployment block (recorded in the
# deployment file by `deploy_contracts`; ESCROW_DEPLOYMENT_BLOCK overrides it) up to CHAIN_CONFIRMATIONS deep.
ESCROW_DEPLOYMENT_BLOCK = env.int("ESCROW_DEPLOYMENT_BLOCK", default=None)
INDEXER_BLOCK_RANGE = env.int("INDEXER_BLOCK_RANGE", default=1000)  # blocks per eth_getLogs call, any reader's
# "safe" or "finalized": also wait for the node's tagged block, on chains that have one (empty: depth only).
INDEXER_HEAD_TAG = env.str("INDEXER_HEAD_TAG", default="")
INDEXER_REORG_WINDOW_BLOCKS = env.int("INDEXER_REORG_WINDOW_BLOCKS", default=2000)  # block hashes kept
# Blocks below the cursor read again with each range: the logs a node behind (a load-balanced provider's backend)
# left out of an answer, having not those blocks yet, are found by a later read (events are stored once).
INDEXER_RESCAN_BLOCKS = env.int("INDEXER_RESCAN_BLOCKS", default=64)
# A pass with at most this many new blocks (following the head: a Base block every 2 s, a pass every
# INDEXER_POLL_SECONDS) reads them one by one, by block hash (eth_getLogs' blockHash filter, which a node without the
# block refuses rather than answering empty): complete without the rescan. Two calls a block (its hash, its logs);
# 0: ranges only.
INDEXER_LOGS_BY_HASH_BLOCKS = env.int("INDEXER_LOGS_BY_HASH_BLOCKS", default=16)
# /readyz fails when the indexer is further behind the chain head than this (it must exceed the depth).
INDEXER_MAX_LAG_BLOCKS = env.int("INDEXER_MAX_LAG_BLOCKS", default=100)
INDEXER_POLL_SECONDS = env.float("INDEXER_POLL_SECONDS", default=2.0)
CELERY_BEAT_SCHEDULE["index-chain"] = {"task": "escrow.tasks.index_chain",
                                       "schedule": timedelta(seconds=INDEXER_POLL_SECONDS)}
# Masumi purchases: timers a buyer leaves out, in seconds from the purchase (payByTime, then each from the last).
MASUMI_PAY_BY_SECONDS = env.int("MASUMI_PAY_BY_SECONDS", default=600)
MASUMI_SUBMIT_RESULT_SECONDS = env.int("MASUMI_SUBMIT_RESULT_SECONDS", default=3600)
# The least time between a Masumi purchase's submitResultTime and unlockTime: a result submitted at the last moment
# can still be disputed (a challenge must stay valid CHALLENGE_SIGNATURE_MIN_VALIDITY to be mined; never below it).
MASUMI_MIN_DISPUTE_SECONDS = max(env.int("MASUMI_MIN_DISPUTE_SECONDS", default=300), CHALLENGE_SIGNATURE_MIN_VALIDITY)
MASUMI_UNLOCK_SECONDS = max(env.int("MASUMI_UNLOCK_SECONDS", default=3600), MASUMI_MIN_DISPUTE_SECONDS)
MASUMI_EXTERNAL_DISPUTE_SECONDS = env.int("MASUMI_EXTERNAL_DISPUTE_SECONDS", default=24 * 3600)

# --- Metered proxy --------------------------------------------------------------------------------------------
PROXY_CONNECT_TIMEOUT = env.float("PROXY_CONNECT_TIMEOUT_SECONDS", default=5.0)
PROXY_TIMEOUT = env.float("PROXY_TIMEOUT_SECONDS", default=60.0)
# The whole answer, head and body, within this in all (its body streamed to the buyer meanwhile).
PROXY_ANSWER_TIMEOUT = env.float("PROXY_ANSWER_TIMEOUT_SECONDS", default=300.0)
# A seller a call waited on (its answer read) longer than PROXY_SLOW_SECONDS counts as slow for
# PROXY_SLOW_REMEMBER_SECONDS, as does a buyer an answer waited on (handed over to it); calls waiting on slow sellers
# may hold at most PROXY_SLOW_CALLS_PER_SELLER of a web process's threads per seller, on slow buyers
# PROXY_SLOW_CALLS_PER_BUYER per buyer, and PROXY_SLOW_CALLS on either in all, the rest answered 503 upstream_busy or
# buyer_busy at once (marketplace.concurrency.SlowPeers). The defaults: a quarter, a quarter and half of the threads
# (WEB_THREADS, marketplace.serve). 0: no limit.
PROXY_SLOW_SECONDS = env.float("PROXY_SLOW_SECONDS", default=2.0)
PROXY_SLOW_REMEMBER_SECONDS = env.float("PROXY_SLOW_REMEMBER_SECONDS", default=60.0)
PROXY_SLOW_CALLS_PER_SELLER = env.int("PROXY_SLOW_CALLS_PER_SELLER",
                                      default=max(1, env.int("WEB_THREADS", default=16) // 4))
PROXY_SLOW_CALLS_PER_BUYER = env.int("PROXY_SLOW_CALLS_PER_BUYER",
                                     default=max(1, env.int("WEB_THREADS", default=16) // 4))
PROXY_SLOW_CALLS = env.int("PROXY_SLOW_CALLS", default=max(1, env.int("WEB_THREADS", default=16) // 2))
PROXY_MAX_UNITS_PER_CALL = env.int("PROXY_MAX_UNITS_PER_CALL", default=1_000_000)
# Replies stored for X-Request-Nonce retries are capped; larger ones are refused rather than half-stored.
PROXY_REPLAY_MAX_BYTES = env.int("PROXY_REPLAY_MAX_BYTES", default=10 * 1024 * 1024)
# ... and deleted by a beat task this long after their agreement was settled or refunded (a retry then is 409
# agreement_not_active, never charged); an agreement still open keeps them all. A run reads at most
# RETENTION_PURGE_BATCH x RETENTION_PURGE_BATCHES_PER_RUN stored replies, kept or not, after where the last ended:
# 2.9 million a day, the kept ones read again once a pass over those past their retention.
PROXY_REPLAY_KEEP_DAYS = env.int("PROXY_REPLAY_KEEP_DAYS", default=7)
CELERY_BEAT_SCHEDULE["purge-proxy-replays"] = {"task": "agreements.tasks.purge_proxy_replays",
                                               "schedule": timedelta(minutes=5)}
# A process serving many calls of one agreement reserves up to this many at once and serves them for this long
# (agreements.metering, "Call leases"); status changes and expiry take effect within that time. 1: no leases.
PROXY_CALL_LEASE_MAX = env.int("PROXY_CALL_LEASE_MAX", default=16)
PROXY_CALL_LEASE_SECONDS = env.float("PROXY_CALL_LEASE_SECONDS", default=1.0)

# --- Operations and security (SECURITY.md) -------------------------------------------------------------------
# Seller upstreams and webhooks on loopback/private addresses: for development and tests only (on while DEBUG).
ALLOW_PRIVATE_UPSTREAMS = env.bool("ALLOW_PRIVATE_UPSTREAMS", default=DEBUG)
# The platform's own public addresses, which the guard cannot know (its load balancer, its hosts' public addresses,
# its database's or Redis's public endpoint...): networks or addresses, comma-separated. A seller's upstream, a
# webhook's, skill's or Masumi seller's URL resolving into one is refused as a private address is, with
# ALLOW_PRIVATE_UPSTREAMS on too: the operator named them.
OUTBOUND_DENIED_NETWORKS = [entry.strip() for entry in env.list("OUTBOUND_DENIED_NETWORKS", default=[])
                            if entry.strip()]
# The NAT64 prefixes of the hosts' network beside the well-known 64:ff9b::/96 (RFC 6052: /32, /40, /48, /56, /64 or
# /96, comma-separated): an address under one is judged by the IPv4 address it embeds, as one under 64:ff9b::/96 is.
OUTBOUND_NAT64_PREFIXES = [entry.strip() for entry in env.list("OUTBOUND_NAT64_PREFIXES", default=[])
                           if entry.strip()]
# A bad entry stops startup (ImproperlyConfigured naming the setting) rather than the first outbound call.
outbound_networks.networks("OUTBOUND_DENIED_NETWORKS", OUTBOUND_DENIED_NETWORKS)
outbound_networks.nat64_prefixes("OUTBOUND_NAT64_PREFIXES", OUTBOUND_NAT64_PREFIXES)
# Host names a process resolves at once for its outbound connections (marketplace.outbound.RESOLVER): a name whose DNS
# server never answers holds one of them until the system resolver gives up; with all held, a connection to another
# name fails at once.
OUTBOUND_RESOLVER_THREADS = env.int("OUTBOUND_RESOLVER_THREADS", default=16)
# Rate-limit counters live here: Redis in production (CACHE_URL=redis://host:6379/2) so every process shares them.
CACHES = {"default": env.cache("CACHE_URL", default="locmemcache://")}
REST_FRAMEWORK["DEFAULT_THROTTLE_CLASSES"] = ["marketplace.throttling.CredentialRateThrottle"]
API_RATE_LIMIT = env.str("API_RATE_LIMIT", default="6000/min")
# Agents an owner's total (API_RATE_LIMIT_PER_OWNER) gives API_RATE_LIMIT to at once, unless set on its own.
OWNER_RATE_LIMIT_AGENTS = 5
_api_requests, _, _api_period = API_RATE_LIMIT.partition("/")
REST_FRAMEWORK["DEFAULT_THROTTLE_RATES"] = {
    "api": API_RATE_LIMIT,  # per agent (all its keys) or owner, every authenticated call
    # per owner: its own calls and all its agents' together, every authenticated call (agents do not multiply `api`)
    "owner_api": env.str("API_RATE_LIMIT_PER_OWNER",
                         default=f"{int(_api_requests) * OWNER_RATE_LIMIT_AGENTS}/{_api_period}"),
    "proxy": env.str("RATE_LIMIT_PROXY", default="6000/min"),  # per agent, metered-proxy calls
    "payments": env.str("RATE_LIMIT_PAYMENTS", default="600/min"),  # per agent, purchases and payments
    # per client (address, IPv6 /64): requests without a credential to routes answering anyone (not health probes)
    "anonymous": env.str("RATE_LIMIT_ANONYMOUS", default="600/min"),
    # per client, bearer secrets no credential has (guesses): past it every request of the client carrying one is
    # 429 `authentication_failures_limited` until the window ends (marketplace.throttling.authentication_failure_count)
    "auth_failures": env.str("RATE_LIMIT_AUTH_FAILURES", default="60/min"),
    # per agent, and per owner for it and its agents together: webhook test sends (one post to each of the agent's
    # live subscriptions) and replays
    "webhook_sends": env.str("RATE_LIMIT_WEBHOOK_SENDS", default="10/min"),
}
# Reverse proxies in front of the app that append the client's address to X-Forwarded-For. Unauthenticated
# limits count per client address: the one the outermost trusted proxy saw, or with 0 (the default) the
# socket's peer, X-Forwarded-For ignored (a client writes what it likes there).
REST_FRAMEWORK["NUM_PROXIES"] = env.int("TRUSTED_PROXY_COUNT", default=0)
# /metrics answers a staff session, or a scraper sending `Authorization: Bearer <METRICS_TOKEN>`.
METRICS_TOKEN = env.str("METRICS_TOKEN", default="")
READINESS_TIMEOUT_SECONDS = env.float("READINESS_TIMEOUT_SECONDS", default=2.0)
# /readyz answers anyone: a run of its checks is kept this long per process, probes at once share one run.
READINESS_CACHE_SECONDS = env.float("READINESS_CACHE_SECONDS", default=1.0)
INSTALLED_APPS.append("django_prometheus")
# After the hot path (marketplace.middleware.HotPathMiddleware), which keeps its own metrics.
_HOT_PATH = MIDDLEWARE.index("marketplace.middleware.HotPathMiddleware") + 1
MIDDLEWARE = [*MIDDLEWARE[:_HOT_PATH], "django_prometheus.middleware.PrometheusBeforeMiddleware",
              *MIDDLEWARE[_HOT_PATH:], "django_prometheus.middleware.PrometheusAfterMiddleware"]
LOGGING["loggers"].update({"httpx": {"level": "WARNING"}, "httpcore": {"level": "WARNING"}})

# --- Hostile input (SECURITY.md, "Hostile input") -------------------------------------------------------------
# Deepest nesting of arrays and objects accepted in any JSON the platform parses (requests and answers alike).
JSON_MAX_DEPTH = env.int("JSON_MAX_DEPTH", default=64)
# Largest answer read from a seller's skill or Masumi API; a larger one fails the call (and is refunded).
UPSTREAM_ANSWER_MAX_BYTES = env.int("UPSTREAM_ANSWER_MAX_BYTES", default=2 * 1024 * 1024)
# A proxied call's intent still open this long after the proxy's timeout belongs to a process that died: the reaper
# settles it (agreements.metering).
PROXY_INTENT_GRACE_SECONDS = env.int("PROXY_INTENT_GRACE_SECONDS", default=30)
# Largest request body the metered proxy forwards (Content-Length or chunked); larger is 413.
PROXY_MAX_REQUEST_BYTES = env.int("PROXY_MAX_REQUEST_BYTES", default=2_621_440)
# Longest path and query string (escaped, after the service's base URL) the metered proxy forwards; longer is 414
# upstream_url_too_long, never forwarded (common servers read request lines of about 8 KiB: nginx, Apache).
PROXY_MAX_URL_BYTES = env.int("PROXY_MAX_URL_BYTES", default=8192)
# Largest head (status line and headers, informational answers' included) of a seller's answer the metered proxy
# reads; larger is 502 upstream_answer_head_too_large, nothing charged. http.client alone reads 100 lines of 64 KiB.
PROXY_MAX_ANSWER_HEAD_BYTES = env.int("PROXY_MAX_ANSWER_HEAD_BYTES", default=64 * 1024)
# Request bodies are read ahead of the application by at most this many threads of a web process per client address
# and in all; a request with a body beyond either is answered 503 request_bodies_busy at once, unread
# (marketplace.request_bodies: granian waits on a stalled body for ever). The defaults: a quarter and half of the
# threads (WEB_THREADS, marketplace.serve). 0: no limit.
REQUEST_BODY_READS_PER_CLIENT = env.int("REQUEST_BODY_READS_PER_CLIENT",
                                        default=max(1, env.int("WEB_THREADS", default=16) // 4))
REQUEST_BODY_READS = env.int("REQUEST_BODY_READS", default=max(1, env.int("WEB_THREADS", default=16) // 2))
CELERY_BEAT_SCHEDULE["reap-call-intents"] = {
    "task": "agreements.tasks.reap_call_intents",
    "schedule": timedelta(seconds=env.int("PROXY_INTENT_REAP_SECONDS", default=30)),
}

# --- Admin (operators) -----------------------------------------------------------------------------------------
# A staff session counts (admin, /metrics, the API) only once the password and a current TOTP code logged it in
# (marketplace.second_factor); off for `make run`'s demo, whose seed prints a password only.
ADMIN_REQUIRE_SECOND_FACTOR = env.bool("ADMIN_REQUIRE_SECOND_FACTOR", default=not DEBUG)
OTP_TOTP_ISSUER = "Agent Escrow Marketplace"  # the name authenticator apps show beside the code
# django-otp's default, kept on purpose: after n wrong codes in a row a device verifies nothing, not even the right
# code, for 2^(n-1) seconds.
OTP_TOTP_THROTTLE_FACTOR = 1
# The TOTP keys are kept sealed under this (any string, through HKDF; marketplace.totp_keys), or without it under
# SECRET_KEY: a database read gives no key. The old keys still open what they sealed, for a rotation
# (`manage.py admin_totp_reseal`).
SECOND_FACTOR_KEY = env.str("SECOND_FACTOR_KEY", default="")
SECOND_FACTOR_OLD_KEYS = env.list("SECOND_FACTOR_OLD_KEYS", default=[])
# How long a logged-in session (only the admin logs one in; it counts at /metrics and in the API too) lasts before
# the password and a code are asked again: Django's default is two weeks.
SESSION_COOKIE_AGE = env.int("ADMIN_SESSION_SECONDS", default=12 * 3600)
# Single-use codes `admin_totp_enrol` prints with the key, each logging in once in place of the app's code.
ADMIN_RECOVERY_CODES = env.int("ADMIN_RECOVERY_CODES", default=10)
# Failed logins, a wrong password or the right one with a wrong or missing code, lock that username out from that
# client (as the rate limits count it: TRUSTED_PROXY_COUNT, an IPv6 address's /64) for a while (django-axes, counted
# in the database). Per username and client: an attacker elsewhere cannot lock an operator out.
AUTHENTICATION_BACKENDS = ["axes.backends.AxesStandaloneBackend", "django.contrib.auth.backends.ModelBackend"]
AXES_FAILURE_LIMIT = env.int("ADMIN_LOGIN_FAILURE_LIMIT", default=5)
AXES_COOLOFF_TIME = timedelta(seconds=env.int("ADMIN_LOGIN_LOCKOUT_SECONDS", default=900))
AXES_LOCKOUT_PARAMETERS = [["username", "ip_address"]]
AXES_CLIENT_IP_CALLABLE = "marketplace.throttling.client_network"
AXES_RESET_ON_SUCCESS = True
# The lockout lasts its time from the failure that reached the limit; tries meanwhile do not start it again.
AXES_RESET_COOL_OFF_ON_FAILURE_DURING_LOCKOUT = False
AXES_LOCKOUT_CALLABLE = "marketplace.second_factor.locked_out"
AXES_VERBOSE = False  # no banner as every process starts; failures and lockouts are logged all the same
# Masked in axes' logs and in the failed attempts the admin lists: axes' defaults, and the code (one sent with a
# wrong password may still be good; the password axes masks itself).
AXES_SENSITIVE_PARAMETERS = ["username", "ip_address", "otp_token"]
# axes logs every successful admin login (Admin → Axes → Access logs) and deletes none: a daily beat task deletes those
# older than this.
ADMIN_ACCESS_LOG_KEEP_DAYS = env.int("ADMIN_ACCESS_LOG_KEEP_DAYS", default=90)
CELERY_BEAT_SCHEDULE["prune-admin-access-logs"] = {"task": "marketplace.tasks.prune_admin_access_logs",
                                                   "schedule": timedelta(days=1)}
# The product's admin frame (branding, styles for shortened chain values) over django.contrib.admin's.
TEMPLATES[0]["DIRS"] = [BASE_DIR / "marketplace" / "templates" / "site"]
# Times to the second with the timezone (marketplace/formats/en/formats.py).
FORMAT_MODULE_PATH = ["marketplace.formats"]
# Block explorer for transaction and address links; empty: Base's and Base Sepolia's by CHAIN_ID, none on Anvil.
CHAIN_EXPLORER_URL = env.str("CHAIN_EXPLORER_URL", default="")
# The dashboard warns below these: the relayer's gas (wei) and the treasury's USDC float (base units) that pays
# invocation payouts, refunds and returned fees.
RELAYER_GAS_WARN_WEI = env.int("RELAYER_GAS_WARN_WEI", default=5 * 10**16)  # 0.05 ETH
TREASURY_USDC_WARN_ATOMIC = env.int("TREASURY_USDC_WARN_ATOMIC", default=50 * 10**6)  # 50 USDC
# The dashboard lists as overdue: a transaction unconfirmed, or an agreement in submitting, for longer than this;
# an agreement still in_challenge this long after its challenge deadline (the settlement tick finalizes it).
OVERDUE_SUBMITTING_AFTER = timedelta(seconds=env.int("OVERDUE_SUBMITTING_AFTER_SECONDS", default=300))
# A payout or refund held for its payment's finality (PAYOUT_HEAD_TAG) is overdue past this: Base finalizes in about
# 15 minutes; one held an hour means the node's tag stalled (or is wrong).
PAYOUT_HELD_OVERDUE_AFTER = timedelta(seconds=env.int("PAYOUT_HELD_OVERDUE_AFTER_SECONDS", default=3600))
OVERDUE_FINALIZE_AFTER = timedelta(seconds=env.int("OVERDUE_FINALIZE_AFTER_SECONDS", default=120))
# A dispute this close to its on-chain timeout (UsageEscrow.DISPUTE_TIMEOUT, 30 days after the challenge) is listed for
# the operators who arbitrate (dashboard, /metrics, reconcile): past it the buyer gets the whole deposit back and the
# arbiter may no longer resolve, whatever the seller was owed.
DISPUTE_TIMEOUT_WARNING = timedelta(seconds=env.int("DISPUTE_TIMEOUT_WARNING_SECONDS", default=7 * 24 * 3600))
# A task message redelivered this many times because its process died is then a dead letter (marketplace.dead_letters).
TASK_MAX_REDELIVERIES = env.int("TASK_MAX_REDELIVERIES", default=3)
# ... and its record (a dead letter, or the count of a message that ran at last) is deleted by an hourly beat task this
# long after its last redelivery: an operator has looked at it by then, and the broker redelivers within
# CELERY_VISIBILITY_TIMEOUT.
DEAD_LETTER_KEEP_DAYS = env.int("DEAD_LETTER_KEEP_DAYS", default=30)
CELERY_BEAT_SCHEDULE["prune-dead-letters"] = {"task": "marketplace.tasks.prune_dead_letters",
                                              "schedule": timedelta(hours=1)}
# Each beat message expires after its period (at least a minute: clocks a little apart drop none): the beat sends one
# at each period whether or not a worker took the last, so with the workers down (a deploy, a crash) or behind (a slow
# node outlasting a 3 s poll) polls and ticks piled up, and every stale one ran late, ahead of the submissions queued
# behind them. A worker drops an expired one unrun; the next does the same work.
for _entry in CELERY_BEAT_SCHEDULE.values():
    _entry.setdefault("options", {}).setdefault("expires", max(_entry["schedule"].total_seconds(), 60))
del _entry
# ... and one published more than this before a run of its task started (that run did its work) is dropped unrun by
# the worker (marketplace.beat_runs): the minute's pile ran as twenty polls. Above the beat's and the workers' clocks
# apart: a worker's clock further ahead drops the next fresh message too (its work then done a period later).
BEAT_SUPERSEDED_MARGIN_SECONDS = env.float("BEAT_SUPERSEDED_MARGIN_SECONDS", default=1.0)
