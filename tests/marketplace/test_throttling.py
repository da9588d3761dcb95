"""Rate limits per API key on the proxy and on purchase and payment endpoints: 429 `rate_limited`."""

import pytest
import redis
from django.core.cache import cache
from redis.connection import Connection

from agreements.models import UsageAgreement
from marketplace import throttling
from tests.agreements.helpers import proposal
from tests.catalog.factories import AgentFactory, issue_key, issue_owner_token, register_service
from tests.conftest import Api, error_code
from tests.marketplace.conftest import active_agreement

pytestmark = pytest.mark.django_db


@pytest.fixture
def redis_cache(settings, redis_server):
    settings.CACHES = {"default": {"BACKEND": "django.core.cache.backends.redis.RedisCache",
                                   "LOCATION": redis_server.url}}


@pytest.fixture
def rates(settings):
    def set_rates(**rates):
        settings.REST_FRAMEWORK = {**settings.REST_FRAMEWORK, "DEFAULT_THROTTLE_RATES": {
            **settings.REST_FRAMEWORK["DEFAULT_THROTTLE_RATES"], **rates}}

    return set_rates


@pytest.fixture(params=["locmem", "redis"])
def limits(request, rates):
    """Every test below runs with the counters in memory and in Redis (production's CACHE_URL)."""
    if request.param == "redis":
        request.getfixturevalue("redis_cache")
    cache.clear()
    yield rates
    cache.clear()


def assert_rate_limited(response):
    assert response.status_code == 429, response.content
    assert error_code(response) == "rate_limited"
    assert 0 < int(response["Retry-After"]) <= 24 * 3600  # until the window (here: the day) ends


def test_proposals_are_limited_per_key(limits, buyer, buyer_api, seller):
    limits(payments="2/day")
    service = register_service(seller)
    for _ in range(2):
        assert buyer_api.post("/usage-agreements", proposal(service)).status_code == 201
    assert_rate_limited(buyer_api.post("/usage-agreements", proposal(service)))
    assert UsageAgreement.objects.count() == 2

    # Reads are not purchases; another key (even of the same agent's owner) has its own budget.
    assert buyer_api.get("/usage-agreements").status_code == 200
    other = Api(issue_key(AgentFactory(owner=buyer.owner, is_seller=False)))
    assert other.post("/usage-agreements", proposal(service)).status_code == 201


def test_an_agents_keys_share_its_budgets_so_more_keys_do_not_buy_more_requests(limits, buyer, buyer_api, owner_api,
                                                                                 seller):
    """Counted per key, an agent holding API_KEYS_PER_AGENT keys had that many times every budget (25 times its
    payments and its requests)."""
    limits(payments="2/day", api="5/day")
    service = register_service(seller)
    second_key = Api(issue_key(buyer))
    assert buyer_api.post("/usage-agreements", proposal(service)).status_code == 201
    assert second_key.post("/usage-agreements", proposal(service)).status_code == 201
    assert_rate_limited(second_key.post("/usage-agreements", proposal(service)))
    assert_rate_limited(Api(issue_key(buyer)).post("/usage-agreements", proposal(service)))
    assert UsageAgreement.objects.count() == 2

    assert buyer_api.get("/agents/me").status_code == 200  # the agent's 5th request
    assert_rate_limited(second_key.get("/agents/me"))
    # Its owner, and another agent of the owner, have budgets of their own.
    assert owner_api.get(f"/agents/{buyer.pk}/policies").status_code == 200
    assert Api(issue_key(AgentFactory(owner=buyer.owner, is_seller=False))).get("/agents/me").status_code == 200


def test_an_owners_agents_share_its_budget_so_more_agents_do_not_buy_more_requests(limits, buyer, buyer_api,
                                                                                      owner_api):
    """Counted per agent only, an owner holding AGENTS_PER_OWNER agents had that many times the `api` budget (50
    times API_RATE_LIMIT), each agent's keys on every route: the catalog search's and the usage reports' own paths
    too. The owner's tokens count against the same total."""
    limits(api="100/day", owner_api="4/day")
    second = Api(issue_key(AgentFactory(owner=buyer.owner, is_seller=False)))
    assert buyer_api.get("/agents/me").status_code == 200
    assert second.get("/agents/me").status_code == 200
    assert second.post("/catalog/search", {"q": ""}).status_code == 200
    assert owner_api.get("/agents").status_code == 200
    assert_rate_limited(buyer_api.get("/agents/me"))
    assert_rate_limited(second.post("/catalog/search", {"q": ""}))
    assert_rate_limited(second.post("/usage-agreements/00000000-0000-0000-0000-000000000000/record-usage",
                                    {"units": 1}, headers={"Idempotency-Key": "k"}))
    assert_rate_limited(owner_api.get("/agents"))

    # Another owner's agents are not held back.
    assert Api(issue_key(AgentFactory(is_seller=False))).get("/agents/me").status_code == 200


def test_escrow_activation_is_limited_before_the_body_is_read(limits, buyer_api):
    limits(payments="1/day")
    url = "/usage-agreements/00000000-0000-0000-0000-000000000000/activate-escrow"
    assert buyer_api.post(url, {}).status_code in (400, 404)
    assert_rate_limited(buyer_api.post(url, {}))


def test_seller_usage_reports_are_limited(limits, seller_api):
    limits(payments="1/day")
    url = "/usage-agreements/00000000-0000-0000-0000-000000000000/record-usage"
    headers = {"Idempotency-Key": "k1"}
    assert seller_api.post(url, {"units": 1}, headers=headers).status_code == 404
    assert_rate_limited(seller_api.post(url, {"units": 1}, headers={"Idempotency-Key": "k2"}))


def test_masumi_payment_requests_are_limited_as_payments(limits, seller_api):
    """Each `POST /payment` reads the chain's clock (its timers count from it) and writes a request: under the API's
    rate alone (6,000 a minute) a seller's key made the node answer thousands of reads a minute, refused ones too
    (at its bound of unpaid requests the clock is read before the refusal). Listing them is a read."""
    limits(payments="1/day")
    body = {"network": "Preprod", "agentIdentifier": "00000000-0000-0000-0000-000000000000",
            "identifierFromPurchaser": "order-1"}
    assert seller_api.post("/payment", body, headers={"Idempotency-Key": "k1"}).status_code == 404
    assert_rate_limited(seller_api.post("/payment", body, headers={"Idempotency-Key": "k2"}))
    assert seller_api.get("/payment", {"network": "Preprod"}).status_code == 200


@pytest.mark.chain
def test_proxied_calls_are_limited_and_a_refused_call_costs_nothing(limits, escrow_chain, http_server,
                                                                     django_capture_on_commit_callbacks):
    active = active_agreement(escrow_chain, django_capture_on_commit_callbacks, http_server.url + "/api")
    limits(proxy="2/day")
    for _ in range(2):
        assert active.buyer_api.get(f"{active.proxy}/translate").status_code == 200
    assert_rate_limited(active.buyer_api.get(f"{active.proxy}/translate"))
    assert len(http_server.requests) == 2
    assert UsageAgreement.objects.get(pk=active.agreement_id).used == 2 * 20_000


@pytest.mark.chain
def test_a_proxied_call_counts_its_budgets_in_one_redis_round_trip(redis_cache, rates, escrow_chain, http_server,
                                                                   django_capture_on_commit_callbacks, monkeypatch):
    """Django's cache API takes two round trips per budget (EXISTS, then INCR): four per call, for the `api` and
    `proxy` budgets. A pipeline takes one."""
    active = active_agreement(escrow_chain, django_capture_on_commit_callbacks, http_server.url + "/api")
    cache.clear()
    rates(proxy="3/day")
    assert active.buyer_api.get(f"{active.proxy}/translate").status_code == 200  # connects (HELLO, CLIENT ...)
    sent = []
    send = Connection.send_packed_command
    monkeypatch.setattr(Connection, "send_packed_command", lambda self, *args, **kwargs: (
        sent.append(args), send(self, *args, **kwargs))[1])
    for calls in (1, 2):
        assert active.buyer_api.get(f"{active.proxy}/translate").status_code == 200
        assert len(sent) == calls
    assert_rate_limited(active.buyer_api.get(f"{active.proxy}/translate"))
    assert len(sent) == 3
    assert UsageAgreement.objects.get(pk=active.agreement_id).used == 3 * 20_000
    cache.clear()


def test_a_view_counts_both_its_budgets_in_one_redis_round_trip(redis_cache, rates, seller_api, monkeypatch):
    """A usage report counts against the key's `api` and `payments` budgets: one round trip for both (not one per
    throttle class)."""
    cache.clear()
    rates(payments="2/day")
    url = "/usage-agreements/00000000-0000-0000-0000-000000000000/record-usage"
    assert seller_api.post(url, {"units": 1}, headers={"Idempotency-Key": "k0"}).status_code == 404  # connects
    sent = []
    send = Connection.send_packed_command
    monkeypatch.setattr(Connection, "send_packed_command", lambda self, *args, **kwargs: (
        sent.append(b"".join(args[0]) if isinstance(args[0], list) else args[0]), send(self, *args, **kwargs))[1])
    assert seller_api.post(url, {"units": 1}, headers={"Idempotency-Key": "k1"}).status_code == 404
    assert len(sent) == 1
    assert b"throttle_api_" in sent[0] and b"throttle_payments_" in sent[0]
    assert_rate_limited(seller_api.post(url, {"units": 1}, headers={"Idempotency-Key": "k2"}))
    assert len(sent) == 2
    cache.clear()


def test_every_authenticated_view_is_limited_per_credential(limits, buyer, buyer_api, owner_api, seller_api):
    limits(api="3/day")
    for path in ("/agents/me", "/usage-agreements", "/services/inv_nope"):
        assert buyer_api.get(path).status_code in (200, 404)
    for path in ("/agents/me", "/usage-agreements", "/services/inv_nope"):  # one budget across every view
        assert_rate_limited(buyer_api.get(path))
    assert_rate_limited(buyer_api.post("/usage-agreements", {}))

    # Each credential has its own budget, owner tokens included.
    assert seller_api.get("/agents/me").status_code == 200
    for _ in range(3):
        assert owner_api.get(f"/agents/{buyer.pk}/policies").status_code == 200
    assert_rate_limited(owner_api.get(f"/agents/{buyer.pk}/policies"))


def test_x_forwarded_for_is_not_trusted_unless_proxies_are_configured(limits, anon, settings):
    limits(payments="2/day")
    url = "/agents/nobody/nothing"  # the unauthenticated skill route counts per client address
    for n in range(2):
        assert anon.post(url, {}, headers={"X-Forwarded-For": f"203.0.113.{n}"}).status_code == 404
    assert_rate_limited(anon.post(url, {}, headers={"X-Forwarded-For": "203.0.113.99"}))

    # Behind one trusted proxy the address it appended is the client's: each client has its own budget.
    settings.REST_FRAMEWORK = {**settings.REST_FRAMEWORK, "NUM_PROXIES": 1}
    for client in ("203.0.113.1", "203.0.113.2", "198.51.100.7, 203.0.113.1"):  # the last hop is the proxy's
        assert anon.post(url, {}, headers={"X-Forwarded-For": client}).status_code == 404
    assert_rate_limited(anon.post(url, {}, headers={"X-Forwarded-For": "203.0.113.1"}))


def test_an_ipv6_client_counts_as_its_slash_64_so_new_addresses_do_not_buy_new_budgets(limits, anon):
    """A host given an IPv6 /64 (the usual end-site assignment) picks from 2^64 addresses: counted per address, each
    was a budget of its own."""
    limits(payments="2/day")

    def invoke(host: str):
        return anon.client.post("/agents/nobody/nothing", {}, format="json", REMOTE_ADDR=host)

    for host in ("2001:db8:1:2::1", "2001:db8:1:2:ffff:ffff:ffff:fffe"):
        assert invoke(host).status_code == 404
    assert_rate_limited(invoke("2001:db8:1:2::9"))
    assert invoke("2001:db8:1:3::1").status_code == 404  # the next /64: another client
    assert invoke("::ffff:192.0.2.1").status_code == 404  # IPv4 written as IPv6: its own address
    assert invoke("192.0.2.2").status_code == 404


def _redis_round_trips(monkeypatch) -> list:
    sent = []
    send = Connection.send_packed_command
    monkeypatch.setattr(Connection, "send_packed_command", lambda self, *args, **kwargs: (
        sent.append(args), send(self, *args, **kwargs))[1])
    return sent


def test_a_busy_key_far_from_its_limit_asks_redis_once_per_lease(redis_server, redis_cache, rates, buyer_api,
                                                                  monkeypatch):
    """Every request of a key asked Redis to count it (0.13 ms of a metered call's CPU); far from the limit a process
    counts LEASE_MAX requests at once and serves them from memory."""
    cache.clear()
    rates(api="100000/day")
    assert buyer_api.get("/agents/me").status_code == 200  # connects; the window's count is learnt
    sent = _redis_round_trips(monkeypatch)
    for _ in range(3 * throttling.LEASE_MAX):
        assert buyer_api.get("/agents/me").status_code == 200
    assert len(sent) == 3
    counters = redis.Redis.from_url(redis_server.url)
    [window] = counters.keys("*throttle_api_*")
    assert 1 + 3 * throttling.LEASE_MAX <= int(counters.get(window)) < 1 + 4 * throttling.LEASE_MAX
    cache.clear()


def test_a_limit_counted_in_leases_stays_exact(redis_cache, rates, buyer_api):
    cache.clear()
    rates(api="300/day")
    statuses = [buyer_api.get("/agents/me").status_code for _ in range(305)]
    assert statuses.count(200) == 300 and statuses[300:] == [429] * 5
    cache.clear()


def test_webhook_test_sends_and_replays_are_limited_per_key(limits, seller, seller_api):
    """Each test send posts to every live subscription of the agent, each replay posts again (retried): without a
    narrower budget, one key made its subscribed URLs (anyone's) take up to 10 posts per request, API_RATE_LIMIT
    requests a minute."""
    limits(webhook_sends="2/day")
    assert seller_api.post("/webhooks", {"url": "https://victim.example/hook"}).status_code == 201
    for _ in range(2):
        assert seller_api.post(f"/agents/{seller.pk}/webhooks/test").status_code == 202
    assert_rate_limited(seller_api.post(f"/agents/{seller.pk}/webhooks/test"))
    delivery = seller_api.get(f"/agents/{seller.pk}/webhooks/deliveries").json()["results"][0]
    assert_rate_limited(seller_api.post(f"/agents/{seller.pk}/webhooks/deliveries/{delivery['id']}/replay"))
    assert seller_api.get(f"/agents/{seller.pk}/webhooks").status_code == 200  # reads are not sends


def test_an_owners_agents_share_its_webhook_sends_so_more_agents_do_not_post_more_to_a_url(limits, seller,
                                                                                           seller_api):
    """Each agent had its own budget of test sends, each posting to every live subscription: an owner's
    AGENTS_PER_OWNER agents, each subscribed WEBHOOK_SUBSCRIPTIONS_PER_AGENT times to one victim's URL, made it take
    fifty times the posts one agent may cause. The owner's own token already shared one budget across its agents."""
    limits(webhook_sends="2/day")
    other = AgentFactory(owner=seller.owner, is_buyer=False, is_seller=True)
    other_api = Api(issue_key(other, scope="admin"))
    for agent, api in ((seller, seller_api), (other, other_api)):
        assert api.post("/webhooks", {"url": "https://victim.example/hook"}).status_code == 201
        assert api.post(f"/agents/{agent.pk}/webhooks/test").status_code == 202
    assert_rate_limited(other_api.post(f"/agents/{other.pk}/webhooks/test"))
    assert_rate_limited(Api(issue_owner_token(seller.owner)).post(f"/agents/{seller.pk}/webhooks/test"))

    # Another owner's agent is not held back.
    stranger = AgentFactory(is_buyer=False, is_seller=True)
    stranger_api = Api(issue_key(stranger, scope="admin"))
    assert stranger_api.post("/webhooks", {"url": "https://victim.example/hook"}).status_code == 201
    assert stranger_api.post(f"/agents/{stranger.pk}/webhooks/test").status_code == 202


def test_routes_answering_anyone_are_limited_per_client(limits, anon, buyer_api):
    """An invocation's state and the network configuration answer without a credential, and were counted against
    nothing: one client read them (a database read each) as fast as it could send. Health probes are not counted
    (a load balancer's, behind the same address as clients, must never be refused)."""
    limits(anonymous="2/day")
    for path in ("/services/inv_nope", "/wallet/recovery-challenge"):
        assert anon.get(path).status_code in (403, 404)
    assert_rate_limited(anon.get("/services/inv_nope"))
    assert_rate_limited(anon.get("/network-config"))
    assert anon.client.get("/services/inv_nope", REMOTE_ADDR="192.0.2.7").status_code == 404  # another client
    assert buyer_api.get("/services/inv_nope").status_code == 404  # an agent counts against its own budgets
    for _ in range(3):
        assert anon.get("/healthz").status_code == 200
