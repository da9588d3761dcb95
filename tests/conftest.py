import os
import shutil
import time
import warnings

import pytest
from rest_framework.test import APIClient

from tests.faults.processes import RedisServer
from tests.catalog.factories import AgentFactory, UserFactory, issue_key, issue_owner_token
from tests.support.operators import operator_client

pytest_plugins = ["tests.chain_fixtures"]


def _missing_requirements() -> list[str]:
    """What the money-safety tests (marker `postgres`, the fault suite) need and this run lacks."""
    from django.conf import settings

    missing = []
    if settings.DATABASES["default"]["ENGINE"] != "marketplace.postgresql":
        missing.append("PostgreSQL (DATABASE_URL points elsewhere)")
    if shutil.which("redis-server") is None:
        missing.append("the redis-server binary (the fault suite starts its own)")
    return missing


def pytest_configure(config):
    # CI must not pass green by skipping what it exists to test: there, a missing requirement stops the run.
    missing = _missing_requirements()
    if missing and os.environ.get("CI", "").lower() in {"1", "true", "yes"}:
        pytest.exit("CI needs " + " and ".join(missing), returncode=3)


def pytest_collection_modifyitems(config, items):
    """Tests marked `slow` first (see `slow_first`). Locally (not in CI), tests marked `postgres` or `faults` skip,
    with the reason, where the run lacks what they need."""
    items[:] = slow_first(items, workers=getattr(config, "workerinput", {}).get("workercount", 1))
    missing = _missing_requirements()
    if not missing:
        return
    skip = pytest.mark.skip(reason="needs " + " and ".join(missing))
    for item in items:
        if item.get_closest_marker("postgres") or item.get_closest_marker("faults"):
            item.add_marker(skip)


def slow_first(items: list, *, workers: int) -> list:
    """`items` in the order that keeps `make test`'s workers busy to the end. Its scheduler (xdist's worksteal) gives
    each worker a contiguous share of the list, and a worker that has run its share takes tests from the end of
    another's. So each share starts with its turn of the tests marked `slow`: none is left for the end, when the
    other worker would wait for it."""
    slow = [item for item in items if item.get_closest_marker("slow")]
    fast = [item for item in items if not item.get_closest_marker("slow")]
    ordered: list = []
    for worker in range(workers):
        share = (len(items) - len(ordered)) // (workers - worker)  # the size worksteal gives this worker
        own_slow = slow[worker::workers]
        fill = max(0, share - len(own_slow))
        ordered += own_slow + fast[:fill]
        del fast[:fill]
    return ordered + fast


def read_to_its_end(response):
    """`response` with its streamed body read to its end, as the web server does with every answer (PEP 3333). The
    test client closes a streamed answer only once its body is read, and a proxied call's waits on its seller and its
    buyer end when its answer is closed: left unread, each call stayed counted as waiting, and once the oldest had
    waited PROXY_SLOW_SECONDS (a loaded machine, a test making 20 calls) the buyer counted as slow and its calls beyond
    its share were refused 503 `buyer_busy`. The body stays readable from `streaming_content`."""
    if response.streaming:
        response.streaming_content = [b"".join(response.streaming_content)]
    return response


@pytest.fixture(autouse=True)
def no_call_left_waiting():
    """Every proxied call's waits on its seller and its buyer ended with its answer (`agreements.proxy`'s
    `_slow_sellers` and `_slow_buyers`). A wait left behind makes its peer count as slow once it is PROXY_SLOW_SECONDS
    old, and refuses that peer's calls beyond its share, in this test or a later one in the same process."""
    from agreements import proxy

    before = [set(peers._calls) for peers in (proxy._slow_sellers, proxy._slow_buyers)]
    yield
    after = [set(peers._calls) for peers in (proxy._slow_sellers, proxy._slow_buyers)]
    assert all(now <= then for now, then in zip(after, before, strict=True)), "a proxied call is still waiting"


class Api:
    """An HTTP client for the public API, authenticated as one principal (or none). Streamed answers come back read to
    their end (`read_to_its_end`); `client` is the bare test client, for a test of what an unread answer holds."""

    def __init__(self, secret: str | None = None):
        self.client = APIClient()
        self.secret = secret
        if secret:
            self.client.credentials(HTTP_AUTHORIZATION=f"Bearer {secret}")

    def as_(self, secret: str | None) -> "Api":
        return Api(secret)

    def _call(self, method, path, data=None, headers=None, **kwargs):
        extra = {f"HTTP_{k.upper().replace('-', '_')}": v for k, v in (headers or {}).items()}
        return read_to_its_end(getattr(self.client, method)(path, data=data, format="json", **extra, **kwargs))

    def get(self, path, params=None, headers=None):
        extra = {f"HTTP_{k.upper().replace('-', '_')}": v for k, v in (headers or {}).items()}
        return read_to_its_end(self.client.get(path, params or {}, **extra))

    def post(self, path, data=None, headers=None):
        return self._call("post", path, data, headers)

    def put(self, path, data=None, headers=None):
        return self._call("put", path, data, headers)

    def patch(self, path, data=None, headers=None):
        return self._call("patch", path, data, headers)

    def delete(self, path, data=None, headers=None):
        return self._call("delete", path, data, headers)


@pytest.fixture(scope="session")
def django_db_setup(django_db_setup, django_db_blocker):
    """pytest-django's test database, which it drops after the session. A connection still open then makes the DROP
    fail: the run ends with a warning and leaves the database behind. This process's own threads close theirs
    shortly after their last work (the call-lease sweeper, the readiness checks), so the teardown waits
    up to OTHER_SESSIONS_GRACE for them; a connection still open after that is a leak, ended and named in a
    warning."""
    yield
    from django.db import connection

    if connection.vendor != "postgresql":
        return
    with django_db_blocker.unblock():
        others = _other_sessions(connection)
        deadline = time.monotonic() + OTHER_SESSIONS_GRACE
        while others and time.monotonic() < deadline:
            time.sleep(0.1)
            others = _other_sessions(connection)
        if others:
            with connection.cursor() as cursor:
                cursor.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                               "WHERE datname = current_database() AND pid <> pg_backend_pid()")
            warnings.warn(f"connections to {connection.settings_dict['NAME']} left open after the session, ended: "
                          f"{others}", stacklevel=1)


OTHER_SESSIONS_GRACE = 5.0


def _other_sessions(connection) -> list[tuple]:
    with connection.cursor() as cursor:
        cursor.execute("SELECT application_name, client_port, backend_start, state, left(query, 120) "
                       "FROM pg_stat_activity WHERE datname = current_database() AND pid <> pg_backend_pid()")
        return cursor.fetchall()


@pytest.fixture(autouse=True, scope="session")
def celery_runs_tasks_inline():
    """Tasks run in-process by default; tests of the real worker and broker switch this off themselves."""
    from marketplace.celery import app

    app.conf.task_always_eager = True
    app.conf.task_eager_propagates = True
    yield


@pytest.fixture(autouse=True)
def task_results_may_be_read():
    """Celery keeps whether a result may be waited for in one global (not per thread), set while an eager task runs:
    eager tasks run at once in several threads of a test could leave it set, and a later test's `.get()` in the same
    process raised "Never call result.get() within a task!"."""
    from celery._state import _set_task_join_will_block

    _set_task_join_will_block(False)


@pytest.fixture(autouse=True)
def tag_ids_read_afresh():
    """Tag ids are kept per process for a second (catalog.selectors.TAG_IDS); each test's database gives the same
    tag names other ids."""
    from catalog.selectors import TAG_IDS

    TAG_IDS.clear()


@pytest.fixture(autouse=True)
def quote_clock_read_afresh():
    """The latest block's time is kept per process for a second for x402 quotes (escrow.chain_clock): each test's
    chain may be at another time."""
    from escrow.chain_clock import _latest_for_quotes

    _latest_for_quotes.cache_clear()


@pytest.fixture(autouse=True)
def chain_head_read_afresh():
    """The head escrow-status counts confirmations against is kept per process for CHAIN_HEAD_SHOWN_SECONDS
    (escrow.selectors.chain_head_shown): each test's chain may be at another height."""
    from escrow.selectors import chain_head_shown_forget

    chain_head_shown_forget()


@pytest.fixture(autouse=True)
def readiness_checked_afresh(settings):
    """/readyz keeps a run's answer per process for READINESS_CACHE_SECONDS: tests change what it checks between
    probes, so each probe runs the checks (probes at once still share one run)."""
    settings.READINESS_CACHE_SECONDS = 0


@pytest.fixture(autouse=True)
def anonymous_clients_unlimited(settings):
    """Every test's client is 127.0.0.1: its requests without a credential and its failed authentications, counted
    per client, would add up across the tests a process runs. Tests of those budgets set them
    (tests/marketplace/test_throttling.py, tests/catalog/test_authentication_failures.py)."""
    from marketplace import throttling

    settings.REST_FRAMEWORK = {**settings.REST_FRAMEWORK, "DEFAULT_THROTTLE_RATES": {
        **settings.REST_FRAMEWORK["DEFAULT_THROTTLE_RATES"], "anonymous": "1000000/min",
        "auth_failures": "1000000/min"}}
    throttling._refused_until.clear()
    yield
    throttling._refused_until.clear()


@pytest.fixture(autouse=True)
def private_upstreams_allowed(settings):
    """Test upstreams and webhook receivers run on loopback; tests of the SSRF guard switch it back on."""
    settings.ALLOW_PRIVATE_UPSTREAMS = True


@pytest.fixture(autouse=True)
def second_factor_required(settings):
    """The admin asks for a TOTP code as in production (tests/marketplace/test_admin_second_factor.py switches it off
    for the DEBUG demo's password login)."""
    settings.ADMIN_REQUIRE_SECOND_FACTOR = True


@pytest.fixture
def admin_client(admin_user):
    """pytest-django's superuser, logged in as an operator is: with the password and a TOTP code."""
    return operator_client(admin_user.username, "password")


@pytest.fixture
def anon():
    return Api()


@pytest.fixture
def owner(db):
    return UserFactory()


@pytest.fixture
def owner_api(owner):
    return Api(issue_owner_token(owner))


@pytest.fixture
def buyer(owner):
    return AgentFactory(owner=owner, handle="buyer-one", is_buyer=True, is_seller=False)


@pytest.fixture
def seller(db):
    return AgentFactory(handle="seller-one", is_buyer=False, is_seller=True)


@pytest.fixture
def buyer_api(buyer):
    return Api(issue_key(buyer))


@pytest.fixture
def seller_api(seller):
    return Api(issue_key(seller, scope="admin"))


def error_code(response) -> str:
    body = response.json()
    assert set(body) == {"error"}, body
    return body["error"]["code"]


def field_codes(response) -> dict:
    assert response.status_code == 400, response.content
    body = response.json()["error"]
    assert body["code"] == "validation_error", body
    return body["details"]["fields"]


def codes_at(response, *path) -> set[str]:
    """Every error code under `path` in a validation error's fields (list indexes may be ints)."""
    node = field_codes(response)
    for step in path:
        node = node[step] if isinstance(node, list) else node[str(step)] if str(step) in node else node[step]

    def walk(value):
        if isinstance(value, dict) and set(value) == {"code", "message"}:
            yield value["code"]
        elif isinstance(value, dict):
            for item in value.values():
                yield from walk(item)
        elif isinstance(value, list):
            for item in value:
                yield from walk(item)

    return set(walk(node))


@pytest.fixture
def http_server():
    from tests.support.http_server import RecordingServer

    server = RecordingServer().start()
    yield server
    server.stop()


@pytest.fixture
def escrow_chain(chain, settings):
    """The test chain (snapshot/revert per test) wired into the marketplace's settings."""
    return wire_marketplace(chain, settings)


def wire_marketplace(chain, settings):
    """Point the marketplace's settings at `chain` (a tests.chain_fixtures.Chain) and its deployment."""
    accounts = chain.accounts
    settings.CHAIN_RPC_URL = chain.node.rpc_url
    settings.CHAIN_ID = chain.chain_id
    settings.USDC_ADDRESS = chain.addresses["usdc"]
    settings.USAGE_ESCROW_ADDRESS = chain.addresses["escrow"]
    settings.ESCROW_DEPLOYMENT_BLOCK = chain.addresses["escrow_block"]
    settings.RELAYER_PRIVATE_KEY = accounts.deployer.key  # the deployment's operator
    settings.RECEIPT_SIGNER_PRIVATE_KEY = accounts.receipt_signer.key
    settings.FEE_RECIPIENT = accounts.fee_recipient.address
    # The relayer also arbitrates disputes here (production may use a separate arbiter key through the same role).
    arbiter_role = chain.escrow.functions.ARBITER_ROLE().call()
    granted = chain.escrow.functions.grantRole(arbiter_role, accounts.deployer.address).transact(
        {"from": accounts.deployer.address})
    chain.w3.eth.wait_for_transaction_receipt(granted)  # Anvil answers a send before it mines it
    return chain


@pytest.fixture(scope="module")
def redis_server():
    """A Redis server of the test's own (a module's tests share it; the fault tests start one per test)."""
    server = RedisServer().start()
    yield server
    server.stop()
