"""Hostile input against the running stack (the production web server, a Celery worker, PostgreSQL, Redis,
Anvil): JSON nested 100,000 deep from a caller or from a seller's service, a server process killed mid-call, a task that kills every
process that runs it. No process may die of input, no served call may go uncharged or be charged twice, no budget
may stay reserved, no message may loop."""

import contextlib
import socket
import threading
from pathlib import Path

import httpx
import psycopg
import pytest
from celery import Celery
from django.db import connection

from agreements.models import CallIntent, ProxyReplay, SkillInvocation, UsageAgreement, UsageEvent
from catalog.models import Service
from marketplace.models import RedeliveredTask
from sdk.x402_signing import sign_payment_required
from tests.catalog.factories import AgentFactory, issue_key, register_service
from tests.escrow.flow import USDC, fund, network_of, usdc_balance
from tests.faults.conftest import assert_books_balance, assert_reconciled
from tests.faults.processes import DEEP_JSON, celery_worker, wait_until
from tests.faults.test_dependencies_down import active_agreement

pytestmark = [pytest.mark.slow, pytest.mark.faults, pytest.mark.chain, pytest.mark.postgres,
              pytest.mark.django_db(transaction=True)]

IN_FLIGHT = 12


@pytest.fixture
def stack_env() -> dict:
    # Long enough for twelve held calls to be answered after the deep requests, short enough to wait out the
    # reaper's threshold (timeout + PROXY_INTENT_GRACE_SECONDS).
    return {"PROXY_TIMEOUT_SECONDS": "10"}


def no_process_died(service) -> bool:
    log = service.log()
    return not any(sign in log for sign in ("SIGSEGV", "was sent", "WorkerLostError", "Signal 11",
                                           "Unexpected exit from worker"))


def test_deep_json_while_proxied_calls_are_in_flight(stack, parties, upstream):
    reader = issue_key(AgentFactory(), scope="read")
    with stack.api(parties.buyer_api.secret) as api:
        agreement = active_agreement(stack, api, parties)
    url = f"{stack.url}/metered-proxy/{agreement['id']}/work"
    web_workers = stack.web.children()

    upstream.set_mode("hang")
    answers = []

    def call():
        with httpx.Client(headers={"Authorization": f"Bearer {parties.buyer_api.secret}"}, timeout=60) as client:
            answers.append(client.get(url))

    calls = [threading.Thread(target=call) for _ in range(IN_FLIGHT)]
    for thread in calls:
        thread.start()
    wait_until(lambda: upstream.arrivals == IN_FLIGHT, timeout=30, what="twelve calls to reach the seller")

    deep = {"content": DEEP_JSON, "headers": {"Content-Type": "application/json"}, "timeout": 30}
    unauthenticated = httpx.post(f"{stack.url}/agents/{parties.seller.handle}/translate", **deep)
    search = httpx.post(f"{stack.url}/catalog/search", **{**deep, "headers": {
        **deep["headers"], "Authorization": f"Bearer {reader}"}})
    for refused in (unauthenticated, search):
        assert (refused.status_code, refused.json()["error"]["code"]) == (400, "invalid_json"), refused.text

    upstream.set_mode("ok")
    upstream.release()
    for thread in calls:
        thread.join(timeout=60)
    assert sorted(answer.status_code for answer in answers) == [200] * IN_FLIGHT
    assert stack.web.children() == web_workers and no_process_died(stack.web)
    # Every call the seller served is charged exactly once; nothing stays reserved.
    assert upstream.served == IN_FLIGHT
    assert UsageAgreement.objects.get(pk=agreement["id"]).used == IN_FLIGHT * parties.service.unit_price
    assert not CallIntent.objects.exists()
    assert_books_balance(agreement["id"])
    assert_reconciled()


def test_a_chunked_body_through_the_server_is_forwarded_and_charged_once(stack, parties, upstream):
    """It was dropped, and the call charged. The web server delimits a chunked body (wsgi.input_terminated)."""
    body = b'{"text": "' + b"x" * 200_000 + b'"}'
    with stack.api(parties.buyer_api.secret) as api:
        agreement = active_agreement(stack, api, parties)
        response = api.post(f"/metered-proxy/{agreement['id']}/work", content=iter([body[:1000], body[1000:]]),
                            headers={"Content-Type": "application/json"})
    assert response.status_code == 200, response.text
    assert upstream.bodies == [body]
    assert UsageAgreement.objects.get(pk=agreement["id"]).used == parties.service.unit_price
    assert_books_balance(agreement["id"])

    # Headers are bounded by the server itself (marketplace.serve): 64 KiB in all, then 431, nothing forwarded.
    with stack.api(parties.buyer_api.secret) as api:
        refused = api.get(f"/metered-proxy/{agreement['id']}/work", headers={"X-Padding": "a" * 70_000})
    assert refused.status_code == 431
    assert len(upstream.bodies) == 1


def test_a_path_through_the_server_reaches_the_seller_as_its_bytes(stack, parties, upstream):
    """granian hands the application the path percent-decoded, latin-1 text of its bytes, and no raw target
    (tests/marketplace/test_serve.py): Django's reading of it escaped the bytes that are not UTF-8 again, and
    `/caf%E9` reached the seller as `/caf%25E9`, charged."""
    sent = {"caf%E9": "/caf%E9", "caf%C3%A9": "/caf%C3%A9", "caf%25E9": "/caf%25E9", "q?x=%E9+%2B": "/q?x=%E9+%2B",
            "a%2Fb": "/a/b"}  # a %2F is decoded by the server: the application sees a slash, and forwards one
    with stack.api(parties.buyer_api.secret) as api:
        agreement = active_agreement(stack, api, parties)
        statuses = [api.get(f"/metered-proxy/{agreement['id']}/{path}").status_code for path in sent]
        overlong = api.get(f"/metered-proxy/{agreement['id']}/%C0%AE%C0%AE/admin")
    assert statuses == [200] * len(sent)
    assert upstream.targets == list(sent.values())
    assert (overlong.status_code, overlong.json()["error"]["code"]) == (400, "invalid_upstream_path")
    assert UsageAgreement.objects.get(pk=agreement["id"]).used == len(sent) * parties.service.unit_price
    assert_books_balance(agreement["id"])


def test_a_path_decoded_by_the_server_still_stays_under_the_base_path(stack, parties, upstream):
    """granian decodes `%2F`, `%3B` and `%5C` before the application sees the path (tests/marketplace/test_serve.py):
    a `..` written with them is a `..` segment to the proxy, and refused as one, before anything is reserved or
    signed; what is forwarded is the path as decoded, its bytes escaped again (a NUL as `%00`)."""
    refused = ["a%2F..%2F..%2Fadmin", "..%3B/admin", "a%3B/..%3B/..%3B/admin", "%5C..%5C..%5Cadmin",
               "a/%252e%252e%252F%252e%252e%252Fadmin"]
    sent = {"a%3Bb": "/a;b", "a%00b": "/a%00b", "%2F%2Fevil.example/x": "/evil.example/x", "a%5Cb": "/a/b"}
    with stack.api(parties.buyer_api.secret) as api:
        agreement = active_agreement(stack, api, parties)
        answers = {path: api.get(f"/metered-proxy/{agreement['id']}/{path}") for path in [*refused, *sent]}
    assert {path: (answers[path].status_code, answers[path].json()["error"]["code"]) for path in refused} == dict.fromkeys(
        refused, (400, "invalid_upstream_path"))
    assert [answers[path].status_code for path in sent] == [200] * len(sent)
    assert upstream.targets == list(sent.values())
    assert UsageAgreement.objects.get(pk=agreement["id"]).used == len(sent) * parties.service.unit_price
    assert_books_balance(agreement["id"])


def _raw_exchange(url: str, request: bytes) -> bytes:
    """What the server answers `request`, sent as these bytes on a connection of its own, until it closes it."""
    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=30) as connection:
        connection.sendall(request)
        answer = b""
        with contextlib.suppress(ConnectionResetError):
            while chunk := connection.recv(65536):
                answer += chunk
    return answer


def test_a_buyers_request_framed_two_ways_reaches_the_seller_framed_once(stack, parties, upstream):
    """Request smuggling toward the seller: the buyer's own framing (Content-Length, Transfer-Encoding) never
    reaches it, the body is forwarded with its length as the web server delimited it (chunked coding over a
    Content-Length beside it, RFC 9112 6.1: what follows the last chunk is no part of the body, and never reaches the
    seller), and what the server refuses (two lengths that differ, an obs-fold, a bare CR) reaches nobody and is
    charged nothing."""
    with stack.api(parties.buyer_api.secret) as api:
        agreement = active_agreement(stack, api, parties)
    head = (f"POST /metered-proxy/{agreement['id']}/work HTTP/1.1\r\nHost: {stack.url.removeprefix('http://')}\r\n"
            f"Authorization: Bearer {parties.buyer_api.secret}\r\nConnection: close\r\n").encode()
    smuggled = b"GET /admin HTTP/1.1\r\nHost: seller\r\n\r\n"
    refused = {
        "two lengths": head + b"Content-Length: 2\r\nContent-Length: 40\r\n\r\n{}" + smuggled,
        "obs-fold": head + b"X-Folded: a\r\n b\r\nContent-Length: 2\r\n\r\n{}",
        "bare CR": head + b"X-Cr: a\rb\r\nContent-Length: 2\r\n\r\n{}",
    }
    statuses = {name: _raw_exchange(stack.url, request).split(b" ", 2)[1] for name, request in refused.items()}
    chunked = [_raw_exchange(stack.url, head + framing) for framing in (
        b"Transfer-Encoding: chunked\r\n\r\n2\r\n{}\r\n0\r\n\r\n",
        b"Content-Length: 40\r\nTransfer-Encoding: chunked\r\n\r\n2\r\n{}\r\n0\r\n\r\n" + smuggled)]
    assert statuses == dict.fromkeys(refused, b"400")
    assert [answer.split(b" ", 2)[1] for answer in chunked] == [b"200", b"200"]
    assert upstream.bodies == [b"{}", b"{}"] and upstream.targets == ["/work", "/work"]
    assert UsageAgreement.objects.get(pk=agreement["id"]).used == 2 * parties.service.unit_price
    assert_books_balance(agreement["id"])


def test_deep_json_answers_from_a_masumi_service_and_a_skill(stack, escrow_chain, upstream):
    seller = AgentFactory(is_buyer=False, is_seller=True, wallet_address=escrow_chain.accounts.seller.address)
    masumi = register_service(seller, name="Deep Masumi", upstream_protocol="masumi", upstream_base_url=upstream.url)
    register_service(seller, name="Deep skills", upstream_base_url=upstream.url, skills=[
        {"name": "render", "price_atomic": 50_000, "is_async": True, "timeout_seconds": 30}])
    buyer = escrow_chain.accounts.buyer
    fund(escrow_chain, buyer.address, USDC)
    balance = usdc_balance(escrow_chain, buyer.address)
    worker = stack.worker.process.pid
    upstream.set_mode("deep")

    # The availability check (a beat task, each second here) meets the deep answer: unavailable, nothing dies.
    wait_until(lambda: Service.objects.get(pk=masumi.pk).availability_checked_at is not None, timeout=30,
               what="the availability check")
    checked = Service.objects.get(pk=masumi.pk)
    assert checked.availability == "unavailable" and "too_deep" in checked.availability_message

    # An async skill: paid, run by the worker, answered with deep JSON -> failed and refunded on-chain.
    skill = f"{stack.url}/agents/{seller.handle}/render"
    required = httpx.post(skill, json={"input": {"text": "hello"}}, timeout=30)
    assert required.status_code == 402, required.text
    network = network_of(stack.chain)
    payment = sign_payment_required(required.headers["PAYMENT-REQUIRED"], buyer.key, max_amount_atomic=USDC,
                                    network=network, token_domain=network.token_domain)
    accepted = httpx.post(skill, json={"input": {"text": "hello"}}, headers={"X-Payment-Signature": payment},
                          timeout=60)
    assert accepted.status_code == 202, accepted.text
    wait_until(lambda: SkillInvocation.objects.get().money == "refunded", timeout=90,
               what=f"the invocation to be refunded\n--- worker log tail ---\n{stack.worker.log()[-3000:]}")
    invocation = SkillInvocation.objects.get()
    assert invocation.status == "failed" and "nested deeper than" in invocation.error
    assert usdc_balance(escrow_chain, buyer.address) == balance
    assert stack.worker.process.pid == worker and stack.worker.process.poll() is None
    assert no_process_died(stack.worker)
    assert not RedeliveredTask.objects.exists()  # nothing had to be delivered twice


def _lock_the_agreement(agreement_id) -> psycopg.Connection:
    """Another session holds the agreement's row lock: the call's charge waits for it, after the seller answered."""
    db = connection.settings_dict
    holder = psycopg.connect(host=db["HOST"] or "127.0.0.1", port=db["PORT"] or 5432, user=db["USER"],
                             password=db["PASSWORD"] or None, dbname=db["NAME"])
    holder.execute("SELECT 1 FROM agreements_usageagreement WHERE id = %s FOR UPDATE", [agreement_id])
    return holder


def _web_waits_for_a_lock() -> bool:
    with connection.cursor() as cursor:
        cursor.execute("SELECT count(*) FROM pg_stat_activity WHERE application_name = 'faults-web' "
                       "AND wait_event_type = 'Lock'")
        return cursor.fetchone()[0] > 0


@pytest.mark.parametrize("killed", ["after_the_answer", "before_the_answer"])
def test_web_server_killed_mid_call_is_settled_once_by_the_reaper(stack, parties, upstream, killed):
    """The rule (agreements.metering): the answer received and recorded -> charged; otherwise released."""
    price = parties.service.unit_price
    with stack.api(parties.buyer_api.secret) as api:
        agreement = active_agreement(stack, api, parties)
    url = f"{stack.url}/metered-proxy/{agreement['id']}/work"
    headers = {"Authorization": f"Bearer {parties.buyer_api.secret}", "X-Request-Nonce": "killed-1"}
    upstream.set_mode("hang")
    def call():
        with contextlib.suppress(httpx.HTTPError):  # the server dies under it
            httpx.get(url, headers=headers, timeout=60)

    call = threading.Thread(target=call, daemon=True)
    call.start()
    wait_until(upstream.arrived.is_set, timeout=20, what="the call to reach the seller")
    assert UsageAgreement.objects.get(pk=agreement["id"]).reserved == price

    if killed == "after_the_answer":
        holder = _lock_the_agreement(agreement["id"])
        upstream.set_mode("ok")
        upstream.release()
        wait_until(_web_waits_for_a_lock, timeout=20, what="the charge to wait for the agreement's lock")
        assert CallIntent.objects.get().answered_at is not None  # the answer is recorded before the charge
        stack.web.kill()
        holder.rollback()
        holder.close()
    else:
        stack.web.kill()
        upstream.set_mode("ok")
        upstream.release()

    # The reaper (a beat task) settles the call once its intent is older than the timeout plus the grace.
    wait_until(lambda: not CallIntent.objects.exists() and not ProxyReplay.objects.filter(
        status_code=None).exists(), timeout=60, what="the reaper to settle the dead call")
    charged = UsageEvent.objects.filter(agreement_id=agreement["id"]).count()
    assert charged == (1 if killed == "after_the_answer" else 0)
    assert UsageAgreement.objects.get(pk=agreement["id"]).reserved == 0

    stack.start_web()
    retry = httpx.get(url, headers=headers, timeout=30)
    if killed == "after_the_answer":  # charged once; the answer itself died with the process
        assert (retry.status_code, retry.json()["error"]["code"]) == (502, "reply_lost")
        assert retry.headers["X-Replayed"] == "true"
    else:  # released: the nonce is free again and the retry is the one charged
        assert retry.status_code == 200, retry.text
    assert UsageAgreement.objects.get(pk=agreement["id"]).used == price
    assert_books_balance(agreement["id"])
    assert_reconciled()


def test_a_task_that_kills_its_process_is_dead_lettered(stack, tmp_path: Path, settings, monkeypatch):
    """A prefork worker, as in production: each delivery's pool process dies, the message comes back; after
    TASK_MAX_REDELIVERIES it is acknowledged without running, recorded, and the worker lives on."""
    stack.worker.stop()
    stack.worker = celery_worker(stack.worker.env, stack.log_dir, pool="prefork", include="tests.faults.poison_tasks")
    stack.start_worker()
    runs = tmp_path / "runs"
    # Celery lets a CELERY_BROKER_URL in the environment (CI exports one) win over `broker=`: send to the stack's.
    monkeypatch.delenv("CELERY_BROKER_URL", raising=False)
    with Celery(broker=stack.redis.url, set_as_current=False) as client:  # the suite's own app stays current
        sent = client.send_task("tests.faults.poison_tasks.crash_the_process", args=[str(runs)])

    wait_until(lambda: RedeliveredTask.objects.filter(task_id=sent.id, dead_lettered_at__isnull=False).exists(),
               timeout=120, what=f"the dead letter\n--- worker log tail ---\n{stack.worker.log()[-3000:]}")
    letter = RedeliveredTask.objects.get(task_id=sent.id)
    assert letter.redeliveries == settings.TASK_MAX_REDELIVERIES + 1
    assert runs.read_text().count("run") == settings.TASK_MAX_REDELIVERIES + 1  # the first delivery and the retries
    assert stack.worker.process.poll() is None  # the worker itself is alive
    assert "task dead-lettered" in stack.worker.log()


def test_a_message_a_stopped_worker_gave_back_unrun_is_no_step_towards_a_dead_letter(stack, tmp_path: Path,
                                                                                     monkeypatch):
    """A worker stopped (a deploy's SIGTERM) gives the broker back the messages it held but had not run (a countdown's,
    a prefetched one), and Redis marks them redelivered as it marks those of a process that died. Each stop counted one
    towards a dead letter: a webhook retry's message held across TASK_MAX_REDELIVERIES restarts (a rolling deploy) was
    dropped unrun, logged at ERROR as a task that killed its process. No process died: it runs, and nothing is
    counted."""
    stack.worker.stop()
    # The cache production has (CACHE_URL: Redis), and no visibility timeout running out while the countdown waits.
    env = {**stack.worker.env, "CACHE_URL": stack.redis.url.removesuffix("/0") + "/1", "CELERY_VISIBILITY_TIMEOUT": "3600"}
    stack.worker = celery_worker(env, stack.log_dir, include="tests.faults.poison_tasks")
    stack.start_worker()
    runs = tmp_path / "runs"
    monkeypatch.delenv("CELERY_BROKER_URL", raising=False)
    with Celery(broker=stack.redis.url, set_as_current=False) as client:
        sent = client.send_task("tests.faults.poison_tasks.record_run", args=[str(runs)], countdown=30)
    wait_until(lambda: f"[{sent.id}] received" in stack.worker.log(), timeout=30, what="the worker to hold the message")
    stack.worker.stop()  # warm: SIGTERM, the message given back unrun
    assert not runs.exists()
    stack.start_worker()

    wait_until(runs.exists, timeout=90, what=f"the run\n--- worker log tail ---\n{stack.worker.log()[-3000:]}")
    assert runs.read_text().count("run") == 1
    assert not RedeliveredTask.objects.filter(task_id=sent.id).exists()
