"""Skill invocations paid with x402, end to end: Anvil, the relayer and a real seller upstream."""

import base64
import gzip
import importlib
import json
import threading
import time
from datetime import timedelta
from http.server import BaseHTTPRequestHandler
from types import SimpleNamespace

import kombu.exceptions
import pytest
from django.apps import apps
from django.db import connections
from django.utils import timezone
from x402 import PaymentRequired
from x402.http import decode_payment_required_header, decode_payment_response_header, decode_payment_signature_header

from agreements import invocations, x402_protocol
from agreements.models import InvocationSellerFailure, SkillInvocation, UsageAgreement
from agreements.tasks import run_invocation
from escrow import chain as gateway
from escrow import relayer
from catalog.models import Agent, Service, Skill
from escrow.models import ChainTransaction, RelayRevert
from marketplace import outbound_slots
from policies.models import ApprovalRequest, Policy
from sdk import proxy_signature, typed_data
from sdk.x402_signing import RETRY_PROOF_HEADER, sign_authorization, sign_payment_required, sign_retry_proof
from tests.chain_fixtures import TOKEN_NAMES
from tests.agreements.helpers import proposal, propose
from tests.catalog.factories import AgentFactory, issue_key, register_service
from tests.conftest import Api, codes_at, error_code
from tests.support.http_server import DribblesItsHead, FloodsEarlyHints, answering_past_its_end, serving
from tests.escrow.flow import USDC, confirm_all, fund, network_of, usdc_balance
from tests.support.at_once import answered_at_once
from tests.support.rpc_relay import node_behind
from tests.support.poison_rows import first_row_always_fails, sweep_runs
from tests.support.server_clock import SERVER_CLOCK_DRIFT, server_clock_drifted

pytestmark = [pytest.mark.chain, pytest.mark.django_db]

PRICE = 20_000  # 0.02 USDC
FEE = 5_000  # the platform's on PRICE and on 50_000 (INVOCATION_FEE_MINIMUM_ATOMIC): kept from the payout


class Market:
    """A seller with a sync and an async skill served by `http_server`, a funded buyer wallet, an anonymous
    x402 caller (no API key: the payment is the credential)."""

    def __init__(self, chain, http_server):
        self.chain = chain
        self.upstream = http_server
        self.buyer = chain.accounts.buyer
        self.seller = AgentFactory(handle="sol", is_buyer=False, is_seller=True,
                                   wallet_address=chain.accounts.seller.address)
        self.service = register_service(self.seller, upstream_base_url=http_server.url + "/api", skills=[
            {"name": "translate", "price_atomic": PRICE},
            {"name": "render", "price_atomic": 50_000, "is_async": True, "timeout_seconds": 30},
            {"name": "slow", "price_atomic": PRICE, "timeout_seconds": 1},
            {"name": "free", "price_atomic": 0},
        ])
        self.caller = Api()
        self.treasury = chain.accounts.deployer.address  # the relayer wallet
        fund(chain, self.buyer.address, 10 * USDC)

    def balances(self) -> tuple[int, int, int]:
        return tuple(usdc_balance(self.chain, a) for a in
                     (self.buyer.address, self.seller.wallet_address, self.treasury))

    def call(self, skill: str, payment: str | None = None, header: str = "X-Payment-Signature",
             api: Api | None = None, seller: str = "sol", retry_proof_key: str | None = None):
        """Anonymous, or as the agent whose key `api` holds; a retry proven by `retry_proof_key`'s signature."""
        headers = {header: payment} if payment else {}
        if retry_proof_key:
            headers[RETRY_PROOF_HEADER] = sign_retry_proof(payment, retry_proof_key)
        return (api or self.caller).post(f"/agents/{seller}/{skill}", {"input": {"text": "hello"}},
                                         headers=headers or None)

    def pay(self, skill: str, seller: str = "sol", key: str | None = None, **overrides) -> str:
        """Sign what the skill's 402 asks for (with `overrides` applied to its x402 requirements when given), from
        the buyer's wallet unless `key` is another's."""
        required_header = self.call(skill, seller=seller)["PAYMENT-REQUIRED"]
        if not overrides:
            network = network_of(self.chain)
            return sign_payment_required(required_header, key or self.buyer.key, max_amount_atomic=USDC,
                                         network=network, token_domain=network.token_domain)
        requirements = decode_payment_required_header(required_header).accepts[0]
        valid_before = overrides.pop("valid_before", self.chain.now() + 300)
        return sign_authorization(requirements.model_copy(update=overrides), self.buyer.key,
                                  valid_before=valid_before)


@pytest.fixture
def market(escrow_chain, http_server):
    return Market(escrow_chain, http_server)


def test_unpaid_call_is_402_with_the_x402_requirements_and_never_reaches_the_seller(market, settings):
    response = market.call("translate")

    assert response.status_code == 402
    assert response["X-Payment-Amount"] == "0.02"
    assert response["X-Payment-Currency"] == "USDC"
    assert response["X-Payment-Address"] == market.treasury
    assert response["X-Payment-Chain"] == settings.CHAIN_NETWORK
    body = response.json()
    assert body["error"] == "payment_required"
    assert body["x402Version"] == 2
    [accepts] = body["accepts"]
    quote = {key: accepts["extra"].pop(key) for key in ("nonce", "validAfter", "validBefore")}
    assert accepts == {"scheme": "exact", "network": f"eip155:{settings.CHAIN_ID}",
                       "asset": settings.USDC_ADDRESS, "amount": str(PRICE), "payTo": market.treasury,
                       "maxTimeoutSeconds": 300,
                       "extra": {"name": "USD Coin", "version": "2", "resource": "/agents/sol/translate"}}
    assert response["X-Payment-Nonce"] == quote["nonce"] and len(bytes.fromhex(quote["nonce"][2:])) == 32
    assert int(response["X-Payment-Valid-Before"]) == quote["validBefore"]
    assert body["resource"]["url"] == "http://testserver/agents/sol/translate"
    header = json.loads(base64.b64decode(response["PAYMENT-REQUIRED"]))
    assert header["accepts"][0]["extra"]["nonce"] == quote["nonce"]
    assert market.upstream.requests == []


def test_a_skill_call_during_a_proxy_secret_rotations_overlap_verifies_with_either_secret(
        market, django_capture_on_commit_callbacks):
    old = market.service.proxy_secret
    rotated = Api(issue_key(market.seller)).post(f"/agents/services/{market.service.pk}/proxy-secret/rotate",
                                                 {"previous_secret_valid_for_seconds": 600})
    assert rotated.status_code == 200, rotated.content
    market.upstream.responses.append((200, {"translation": "bonjour"}))
    with django_capture_on_commit_callbacks(execute=True):
        assert market.call("translate", market.pay("translate")).status_code == 200
    [request] = market.upstream.requests
    for secret in (old, rotated.json()["proxy_secret"]):
        assert proxy_signature.verify(secret, request.headers, method="POST", path="/translate")


def test_the_402_is_x402_v2_exactly(market):
    """x402's own models read the body and the header, `error` (x402's string) included."""
    response = market.call("translate")

    required = PaymentRequired.model_validate(response.json())
    assert required.error == "payment_required" and required.x402_version == 2
    assert decode_payment_required_header(response["PAYMENT-REQUIRED"]) == required
    assert response.json()["message"] and response.json()["details"] == {}


@pytest.mark.parametrize("header", ["X-Payment-Signature", "X-PAYMENT"])
def test_paid_call_returns_the_result_and_the_seller_is_paid_on_chain(
        market, header, django_capture_on_commit_callbacks):
    market.upstream.responses.append((200, {"translation": "bonjour"}))
    payment = market.pay("translate")
    buyer, seller, treasury = market.balances()

    with django_capture_on_commit_callbacks(execute=True):
        response = market.call("translate", payment, header=header)

    assert response.status_code == 200, response.content
    body = response.json()
    assert body["result"] == {"translation": "bonjour"}
    assert body["payment"]["amount"] == "0.02" and body["payment"]["currency"] == "USDC"
    payment_tx = ChainTransaction.objects.get(purpose="invocation_payment")
    assert body["payment"]["tx_hash"] == payment_tx.mined_tx_hash
    settled = decode_payment_response_header(response["PAYMENT-RESPONSE"])
    assert settled.success and settled.transaction == payment_tx.mined_tx_hash
    assert settled.network == f"eip155:{market.chain.chain_id}" and settled.payer == market.buyer.address
    [request] = market.upstream.requests
    assert request.path == "/api/translate" and json.loads(request.body) == {"input": {"text": "hello"}}
    assert proxy_signature.verify(market.service.proxy_secret, request.headers, method="POST", path="/translate")

    confirm_all(django_capture_on_commit_callbacks)  # the treasury's payout to the seller
    assert market.balances() == (buyer - PRICE, seller + PRICE - FEE, treasury + FEE)
    invocation = market.caller.get(f"/services/{body['invocation_id']}").json()
    assert invocation["status"] == "completed"
    assert invocation["payment"]["status"] == "paid_out"
    assert invocation["payment"]["settlement_tx_hash"] == ChainTransaction.objects.get(
        purpose="invocation_payout").mined_tx_hash


def test_a_seller_changes_the_skills_of_a_service_whose_skills_were_invoked(market, django_capture_on_commit_callbacks):
    """Invocations keep the skill they paid for; a listing's new skills replaced the old rows, whose invocations
    protect them: every change of an invoked service's skills was a 500, nothing changed."""
    market.upstream.responses.append((200, {"translation": "bonjour"}))
    with django_capture_on_commit_callbacks(execute=True):
        assert market.call("translate", market.pay("translate")).status_code == 200
    invoked = SkillInvocation.objects.get().skill
    seller_api = Api(issue_key(market.seller))

    changed = seller_api.patch(f"/agents/services/{market.service.pk}", {"skills": [
        {"name": "translate", "price_atomic": 2 * PRICE, "description": "Now dearer"},
        {"name": "summarize", "price_atomic": PRICE}]})

    assert changed.status_code == 200, changed.content
    assert {(skill["name"], skill["price_atomic"]) for skill in changed.json()["skills"]} == {
        ("translate", 2 * PRICE), ("summarize", PRICE)}
    assert market.call("translate").json()["accepts"][0]["amount"] == str(2 * PRICE)
    assert market.call("render").status_code == 404  # dropped from the listing
    invocation = market.caller.get(f"/services/{SkillInvocation.objects.get().public_id}")
    assert invocation.status_code == 200 and invocation.json()["status"] == "completed"
    invoked.refresh_from_db()  # the invoked skill's row is kept for its invocation's record

    dropped = seller_api.patch(f"/agents/services/{market.service.pk}", {
        "name": "Renamed", "skills": [{"name": "summarize", "price_atomic": PRICE}]})

    assert dropped.status_code == 409 and error_code(dropped) == "skill_invoked"
    assert dropped.json()["error"]["details"] == {"skills": ["translate"]}
    kept = seller_api.get(f"/agents/services/{market.service.pk}").json()
    assert kept["name"] == market.service.name and {skill["name"] for skill in kept["skills"]} == {
        "translate", "summarize"}


def test_async_invocation_is_202_then_completed(market, django_capture_on_commit_callbacks):
    market.upstream.responses.append((200, {"url": "https://cdn.example/1.png"}))
    payment = market.pay("render")
    buyer, seller, _ = market.balances()

    with django_capture_on_commit_callbacks(execute=True):  # the worker's run, inline (Celery is eager)
        response = market.call("render", payment)

    assert response.status_code == 202, response.content
    invocation_id = response.json()["invocation_id"]
    assert invocation_id.startswith("inv_") and response.json()["status"] == "pending"
    confirm_all(django_capture_on_commit_callbacks)
    invocation = market.caller.get(f"/services/{invocation_id}").json()
    assert invocation["status"] == "completed"
    assert invocation["result"] == {"url": "https://cdn.example/1.png"}
    assert invocation["created_at"] <= invocation["started_at"] <= invocation["completed_at"]
    assert invocation["payment"]["status"] == "paid_out"
    assert market.balances()[:2] == (buyer - 50_000, seller + 50_000 - FEE)


def test_an_async_invocation_paid_while_the_broker_is_down_is_202_and_the_sweep_runs_it(
        market, monkeypatch, settings, django_capture_on_commit_callbacks):
    """Its run is queued once the payment's outcome commits. With the broker down then (a Redis restart, a failover)
    the publish raised after that commit: the paid call answered 500, naming no invocation the buyer could follow,
    and its authorization, used, could not be sent again. The message is lost instead: the sweep runs it."""
    market.upstream.responses.append((200, {"url": "https://cdn.example/1.png"}))
    payment = market.pay("render")
    buyer, seller, _ = market.balances()

    def broker_down(*args, **kwargs):
        raise kombu.exceptions.OperationalError("Error 111 connecting to 127.0.0.1:6379. Connection refused.")

    with monkeypatch.context() as patched:
        patched.setattr(run_invocation, "delay", broker_down)
        with django_capture_on_commit_callbacks(execute=True):  # the commits' callbacks, as the request ran them
            response = market.call("render", payment)

    assert response.status_code == 202, response.content
    invocation_id = response.json()["invocation_id"]
    assert market.upstream.requests == []
    with django_capture_on_commit_callbacks(execute=True):
        assert invocations.invocations_sweep(now=timezone.now() + settings.INVOCATION_ORPHAN_AFTER)["orphans"] == 1
    confirm_all(django_capture_on_commit_callbacks)
    invocation = market.caller.get(f"/services/{invocation_id}").json()
    assert invocation["status"] == "completed" and invocation["payment"]["status"] == "paid_out"
    assert market.balances()[:2] == (buyer - 50_000, seller + 50_000 - FEE)


def test_the_sweep_queues_the_run_of_a_paid_invocation_again_only_once_its_message_may_be_lost(
        market, monkeypatch, settings, django_capture_on_commit_callbacks):
    """The sweep (every 15 s) queued the run of every paid invocation still pending a minute after its payment, on
    each run, whether or not its message still waited in the outbound queue: behind a backlog, each such invocation
    added a message to the queue every 15 s."""
    market.upstream.responses.append((200, {"url": "https://cdn.example/1.png"}))
    payment = market.pay("render")
    queued = []
    with monkeypatch.context() as patched:
        patched.setattr(run_invocation, "delay", queued.append)  # the outbound queue, its workers behind
        with django_capture_on_commit_callbacks(execute=True):
            response = market.call("render", payment)
        assert response.status_code == 202, response.content
        queued_by_the_call = len(queued)
        later = timezone.now() + settings.INVOCATION_ORPHAN_AFTER
        assert invocations.invocations_sweep(now=later)["orphans"] == 1  # its message may be lost: queued again
        assert invocations.invocations_sweep(now=later + timedelta(seconds=15))["orphans"] == 0
        assert invocations.invocations_sweep(now=later + timedelta(seconds=30))["orphans"] == 0
        assert len(queued) == queued_by_the_call + 1
        # No worker took it in all that time: lost too, queued again.
        assert invocations.invocations_sweep(now=later + settings.INVOCATION_ORPHAN_AFTER)["orphans"] == 1
    assert market.upstream.requests == []
    with django_capture_on_commit_callbacks(execute=True):
        run_invocation(queued[-1])
    confirm_all(django_capture_on_commit_callbacks)
    assert market.caller.get(f"/services/{response.json()['invocation_id']}").json()["status"] == "completed"


def test_a_workers_skill_call_beyond_its_sellers_share_in_flight_is_put_off_still_pending_and_runs_once_one_ends(
        market, monkeypatch, settings, django_capture_on_commit_callbacks):
    """The outbound workers ran invocations first come first served: a seller whose skill never answers (its own
    buyer's calls, refunded on timeout) held one worker per call for the skill's limit, up to an hour, until every
    worker waited on it and other sellers' buyers, and every tenant's webhooks, waited behind. A worker's call now
    takes a slot of its seller's host's and owner's shares, as another worker's call to that seller under way does
    here; beyond them it is put off, still pending, and queued again shortly."""
    settings.SELLER_CALLS_IN_FLIGHT_PER_HOST = 1
    market.upstream.responses.append((200, {"url": "https://cdn.example/1.png"}))
    payment = market.pay("render")
    queued = []
    with monkeypatch.context() as patched:
        patched.setattr(run_invocation, "delay", queued.append)
        patched.setattr(run_invocation, "apply_async", lambda args, countdown=0, **_: queued.append(args[0]))
        with django_capture_on_commit_callbacks(execute=True):
            response = market.call("render", payment)
        assert response.status_code == 202, response.content
        invocation = SkillInvocation.objects.select_related("skill__service", "seller").get()
        queued.clear()
        with outbound_slots.held(invocations.call_shares(invocation), lease_seconds=60) as held:
            assert held  # another worker's call to this seller's upstream, under way
            with django_capture_on_commit_callbacks(execute=True):
                run_invocation(str(invocation.pk))
            invocation.refresh_from_db()
            assert (invocation.status, invocation.started_at) == ("pending", None)
            assert market.upstream.requests == [] and queued == [str(invocation.pk)]  # queued again, shortly
            assert invocations.invocations_sweep(
                now=timezone.now() + timedelta(seconds=30))["orphans"] == 0  # not a second message meanwhile
    with django_capture_on_commit_callbacks(execute=True):
        run_invocation(queued[-1])  # that call ended: this one runs
    confirm_all(django_capture_on_commit_callbacks)
    assert len(market.upstream.requests) == 1
    assert market.caller.get(f"/services/{response.json()['invocation_id']}").json()["status"] == "completed"


def test_a_sync_skill_whose_limit_is_beyond_the_inline_bound_runs_in_a_worker_not_in_a_web_thread(
        market, settings, django_capture_on_commit_callbacks):
    """A seller chooses its skill's time limit (up to an hour) and whether it is synchronous: run in the request, a
    slow or dribbling seller held a web thread that long per call, and the refund on timeout made it free to do."""
    settings.INVOCATION_INLINE_MAX_SECONDS = 30  # "translate" allows the default 60 s
    market.upstream.responses.append((200, {"translation": "bonjour"}))
    payment = market.pay("translate")

    with django_capture_on_commit_callbacks(execute=True):  # the worker's run, inline (Celery is eager)
        response = market.call("translate", payment)

    assert response.status_code == 202, response.content
    assert response.json()["status"] == "pending"
    confirm_all(django_capture_on_commit_callbacks)
    invocation = market.caller.get(f"/services/{response.json()['invocation_id']}").json()
    assert invocation["status"] == "completed" and invocation["result"] == {"translation": "bonjour"}


def test_a_sync_invocation_finding_the_inline_slots_taken_runs_in_a_worker_at_once(
        market, settings, django_capture_on_commit_callbacks):
    """However many sync skills are called at once, at most INVOCATION_INLINE_CONCURRENCY of a process's threads wait
    on sellers: the others' callers get 202 and the status URL, and the web server keeps its threads."""
    settings.INVOCATION_INLINE_CONCURRENCY = 1
    market.upstream.responses.append((200, {"translation": "bonjour"}))
    payment = market.pay("translate")

    with invocations.INLINE_RUNS.slot_if_free() as held:  # another sync invocation running in this process
        assert held
        with django_capture_on_commit_callbacks(execute=True):
            response = market.call("translate", payment)

    assert response.status_code == 202, response.content
    confirm_all(django_capture_on_commit_callbacks)
    invocation = market.caller.get(f"/services/{response.json()['invocation_id']}").json()
    assert invocation["status"] == "completed" and invocation["payment"]["status"] == "paid_out"


def test_an_invocation_that_times_out_is_refunded_on_chain(market, django_capture_on_commit_callbacks):
    market.upstream.responses.append((200, {"late": True}, 2))  # answers after the skill's 1 s limit
    payment = market.pay("slow")
    before = market.balances()

    with django_capture_on_commit_callbacks(execute=True):
        response = market.call("slow", payment)

    assert response.status_code == 504, response.content
    assert response.json()["error"]["code"] == "invocation_timeout"
    confirm_all(django_capture_on_commit_callbacks)  # the treasury's refund
    refund = ChainTransaction.objects.get(purpose="invocation_refund")
    assert refund.status == "confirmed" and refund.context["to"] == market.buyer.address
    assert market.balances() == before
    invocation = market.caller.get(f"/services/{response.json()['error']['details']['invocation_id']}").json()
    assert invocation["status"] == "timeout" and invocation["payment"]["status"] == "refunded"
    assert invocation["payment"]["settlement_tx_hash"] == refund.mined_tx_hash


def test_a_seller_dribbling_its_answer_head_times_out_at_the_skills_limit_and_is_refunded(
        market, django_capture_on_commit_callbacks):
    """The skill's timeout bounded each read only: a seller sending its head a byte at a time held the worker (or
    the web thread of a synchronous call) past the skill's limit, and was paid for it."""
    payment = market.pay("slow")  # a 1 s limit; the seller takes 3 s, a byte at a time
    before = market.balances()
    with serving(DribblesItsHead) as url:
        Service.objects.filter(pk=market.service.pk).update(upstream_base_url=f"{url}/api")
        started = time.monotonic()
        with django_capture_on_commit_callbacks(execute=True):
            response = market.call("slow", payment)
        elapsed = time.monotonic() - started

    assert (response.status_code, response.json()["error"]["code"]) == (504, "invocation_timeout"), response.content
    assert elapsed < 2.5, f"the invocation took {elapsed:.1f} s with a 1 s limit"
    confirm_all(django_capture_on_commit_callbacks)  # the treasury's refund
    assert market.balances() == before
    invocation = market.caller.get(f"/services/{response.json()['error']['details']['invocation_id']}").json()
    assert invocation["status"] == "timeout" and invocation["payment"]["status"] == "refunded"


def test_a_seller_flooding_informational_answers_fails_the_invocation_at_once_and_is_refunded(
        market, django_capture_on_commit_callbacks):
    """httpcore skips informational answers (103 Early Hints) without bound: a seller sending them endlessly kept the
    web thread of a synchronous call (a worker's for an asynchronous one) parsing heads, holding the GIL, until the
    skill's limit (up to INVOCATION_INLINE_MAX_SECONDS in a web thread, an hour in a worker), and was refunded for
    it. Past five, as the metered proxy reads them, the answer is refused."""
    Skill.objects.filter(service=market.service, name="translate").update(timeout_seconds=5)
    payment = market.pay("translate")
    before = market.balances()
    with serving(FloodsEarlyHints) as url:
        Service.objects.filter(pk=market.service.pk).update(upstream_base_url=f"{url}/api")
        started = time.monotonic()
        with django_capture_on_commit_callbacks(execute=True):
            response = market.call("translate", payment)
        elapsed = time.monotonic() - started

    assert (response.status_code, error_code(response)) == (502, "invocation_failed"), (response.content, elapsed)
    assert elapsed < 2.5, f"the invocation took {elapsed:.1f} s with a 5 s limit"
    confirm_all(django_capture_on_commit_callbacks)  # the treasury's refund
    assert market.balances() == before
    invocation = market.caller.get(f"/services/{response.json()['error']['details']['invocation_id']}").json()
    assert invocation["status"] == "failed" and invocation["payment"]["status"] == "refunded", invocation


PAST_THE_ANSWERS_END = {
    "a_second_answer": b'HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 28\r\n\r\n'
                       b'{"for": "no request of his"}',
    "bytes_past_its_content_length": b"garbage\r\n",
}


@pytest.mark.parametrize("tail", PAST_THE_ANSWERS_END.values(), ids=PAST_THE_ANSWERS_END)
def test_what_a_seller_sends_past_its_answer_is_never_the_next_buyers_answer(
        market, tail, django_capture_on_commit_callbacks):
    """The skills' client keeps connections alive across invocations (any buyer's): a seller whose answer came with
    more after it (a second answer, a body longer than its Content-Length) in the same write had that read as the
    answer to the next invocation sent down the connection, another buyer's: given a result that was not the answer
    to its call and charged for it, or failed and counted against it, and every later buyer given the answer to the
    call before its own."""
    _funded(market, market.chain.accounts.buyer2)
    results = []
    with serving(answering_past_its_end(tail)) as url:
        Service.objects.filter(pk=market.service.pk).update(upstream_base_url=f"{url}/api")
        for buyer in (market.chain.accounts.buyer, market.chain.accounts.buyer2):
            _paying_from(market, buyer)
            payment = market.pay("translate")
            with django_capture_on_commit_callbacks(execute=True):
                response = market.call("translate", payment)
            results.append((response.status_code, response.json().get("result")))
            if response.status_code == 200:
                results[-1] += (response.json()["invocation_id"],)

    [(status_a, result_a, id_a), (status_b, result_b, *id_b)] = results
    assert (status_a, result_a) == (200, {"for": id_a})
    assert (status_b, result_b) == (200, {"for": id_b[0] if id_b else None}), results


HOSTILE_ANSWERS = {  # a seller's answer to a paid call: none may leave it paid but unrefunded, or crash the run
    "seller_answers_500": (500, {"error": "model crashed"}),
    "not_json": (200, b"<html>done</html>"),
    "too_large": (200, {"result": "x" * 4096}),  # above the UPSTREAM_ANSWER_MAX_BYTES the test sets
    "redirect_to_an_internal_address": (302, b"", 0, {"Location": "http://169.254.169.254/latest/meta-data/"}),
    "not_the_gzip_it_says": (200, b"\x1f\x8b not gzip at all", 0, {"Content-Encoding": "gzip"}),
}


@pytest.mark.parametrize("failure", [*HOSTILE_ANSWERS, "address_saved_before_it_was_checked"])
def test_a_failed_async_invocation_is_refunded(market, failure, settings, django_capture_on_commit_callbacks):
    """`address_saved_before_it_was_checked`: a host IDNA forbids, saved before such addresses were refused; httpx
    raised InvalidURL (no HTTPError) out of the run, leaving the paid invocation processing until the sweeper timed
    it out. A redirect is not followed (to an internal address least of all): the seller failed."""
    settings.UPSTREAM_ANSWER_MAX_BYTES = 1024
    if failure in HOSTILE_ANSWERS:
        market.upstream.responses.append(HOSTILE_ANSWERS[failure])
    else:
        Service.objects.filter(pk=market.service.pk).update(upstream_base_url="http://\u2603.example/api")
    payment = market.pay("render")
    before = market.balances()

    with django_capture_on_commit_callbacks(execute=True):
        invocation_id = market.call("render", payment).json()["invocation_id"]
    confirm_all(django_capture_on_commit_callbacks)

    invocation = market.caller.get(f"/services/{invocation_id}").json()
    assert invocation["status"] == "failed" and invocation["payment"]["status"] == "refunded", invocation
    assert invocation["result"] is None
    assert market.balances() == before
    assert ChainTransaction.objects.filter(purpose="invocation_payout").count() == 0


def test_a_sellers_answer_arriving_after_the_sweeper_timed_its_run_out_is_dropped_and_refunded_once(
        market, monkeypatch, django_capture_on_commit_callbacks):
    """The seller answers (a result worth paying for) once the sweep has timed the run out and queued the refund:
    the late result is neither stored nor paid out, the refund made once."""
    market.upstream.responses.append((200, {"image": "late"}))
    read_answer = invocations.outbound.json_answer

    def answered_after_the_time_out(response, **kwargs):
        assert invocations.invocations_sweep(now=timezone.now() + timedelta(hours=1))["timed_out"] == 1
        return read_answer(response, **kwargs)

    monkeypatch.setattr(invocations.outbound, "json_answer", answered_after_the_time_out)
    payment = market.pay("render")
    before = market.balances()
    with django_capture_on_commit_callbacks(execute=True):
        invocation_id = market.call("render", payment).json()["invocation_id"]
    confirm_all(django_capture_on_commit_callbacks)

    invocation = market.caller.get(f"/services/{invocation_id}").json()
    assert (invocation["status"], invocation["payment"]["status"], invocation["result"]) == ("timeout", "refunded", None)
    assert market.balances() == before
    assert [tx.purpose for tx in ChainTransaction.objects.exclude(purpose="invocation_payment")] == [
        "invocation_refund"]


def test_the_sweeper_times_out_an_invocation_whose_worker_died_and_refunds_it(
        market, django_capture_on_commit_callbacks):
    payment = market.pay("render")
    before = market.balances()
    invocation_id = market.call("render", payment).json()["invocation_id"]  # its worker never runs
    # The worker took it and died mid-call.
    SkillInvocation.objects.filter(pk=invocation_id.removeprefix("inv_")).update(
        status="processing", started_at=timezone.now(), deadline_at=timezone.now())

    with django_capture_on_commit_callbacks(execute=True):
        assert invocations.invocations_sweep()["timed_out"] == 1
    confirm_all(django_capture_on_commit_callbacks)

    assert market.caller.get(f"/services/{invocation_id}").json()["status"] == "timeout"
    assert market.balances() == before
    assert market.upstream.requests == []
    # Its worker died (a deploy, a crash): no fault of the seller's the buyer's party is to be bounded for.
    assert not InvocationSellerFailure.objects.exists()


def _overdue_invocations(market, *, count: int) -> list[str]:
    """`count` paid invocations, processing and past their deadline: their ids."""
    overdue = []
    for _ in range(count):
        invocation_id = market.call("render", market.pay("render")).json()["invocation_id"].removeprefix("inv_")
        SkillInvocation.objects.filter(pk=invocation_id).update(
            status="processing", started_at=timezone.now(), deadline_at=timezone.now())
        overdue.append(str(SkillInvocation.objects.get(pk=invocation_id).pk))
    return overdue


def test_an_overdue_invocation_whose_time_out_raises_is_skipped_and_logged_and_the_others_time_out(
        market, django_capture_on_commit_callbacks, monkeypatch, caplog):
    """One overdue invocation whose time-out always raised ended the sweep at every run: none after it was timed
    out and refunded, nor any paid one queued to run."""
    from agreements import tasks
    from marketplace.sweeps import RowsFailed

    overdue = _overdue_invocations(market, count=2)
    poisoned = str(SkillInvocation.objects.filter(pk__in=overdue).values_list("pk", flat=True).first())
    real_finish = invocations._finish

    def finish(invocation_id, **kwargs):
        if str(invocation_id) == poisoned:
            raise RuntimeError("this invocation always fails")
        return real_finish(invocation_id, **kwargs)

    monkeypatch.setattr(invocations, "_finish", finish)
    with django_capture_on_commit_callbacks(execute=True), pytest.raises(RowsFailed) as failed:
        tasks.sweep_invocations()
    assert [str(pk) for pk in failed.value.failed] == [poisoned] and failed.value.applied == 1
    statuses = dict(SkillInvocation.objects.filter(pk__in=overdue).values_list("pk", "status"))
    assert {str(pk): status for pk, status in statuses.items()} == {
        poisoned: "processing", **{pk: "timeout" for pk in overdue if pk != poisoned}}
    assert poisoned in caplog.text


def test_overdue_invocations_whose_time_out_raises_do_not_keep_the_others_from_their_turn(
        market, django_capture_on_commit_callbacks, monkeypatch):
    """A run times out a bounded number of overdue invocations: those whose time-out always raised stayed overdue,
    and, as many as the bound, were the ones taken at every run (in no order), so no other was ever timed out and
    refunded. Each run takes up after the last (by deadline, as the settlement tick does)."""
    from agreements import tasks

    overdue = _overdue_invocations(market, count=2)
    monkeypatch.setattr(invocations, "INVOCATIONS_TIMED_OUT_PER_RUN", 1)
    monkeypatch.setattr(invocations, "_finish", first_row_always_fails(invocations._finish, row="invocation_id"))
    with django_capture_on_commit_callbacks(execute=True):
        sweep_runs(tasks.sweep_invocations, runs=2)
    statuses = dict(SkillInvocation.objects.filter(pk__in=overdue).values_list("pk", "status"))
    assert sorted(statuses.values()) == ["processing", "timeout"]


def test_a_replayed_authorization_is_refused_and_charged_once(market, django_capture_on_commit_callbacks):
    payment = market.pay("translate")
    buyer = usdc_balance(market.chain, market.buyer.address)
    with django_capture_on_commit_callbacks(execute=True):
        first = market.call("translate", payment)
    assert first.status_code == 200

    replay = market.call("translate", payment, retry_proof_key=market.buyer.key)

    assert replay.status_code == 402
    assert replay.json()["error"] == "authorization_already_used"
    assert replay.json()["details"]["invocation_id"] == first.json()["invocation_id"]
    assert len(market.upstream.requests) == 1
    assert ChainTransaction.objects.filter(purpose="invocation_payment").count() == 1
    assert usdc_balance(market.chain, market.buyer.address) == buyer - PRICE


def _respelled(payment: str, **authorization) -> str:
    """The same signed payment with fields of its authorization written otherwise (the same values on-chain)."""
    payload = json.loads(base64.b64decode(payment))
    payload["payload"]["authorization"].update(authorization)
    return base64.b64encode(json.dumps(payload).encode()).decode()


def test_an_authorization_replayed_with_its_nonce_spelled_otherwise_is_refused_and_charged_once(
        market, settings, django_capture_on_commit_callbacks):
    """The nonce without its 0x is the same bytes32 on-chain. Sent again while the first payment is still pending
    (the simulation cannot see it), it was recorded as another authorization: both invocations were counted paid
    by the one transfer (the second's copy reverted, nonce used) and the seller was called and paid twice, the
    second time out of the treasury's float."""
    capture = django_capture_on_commit_callbacks
    settings.INVOCATION_PAYMENT_WAIT_SECONDS = 0  # answer 202 while the payment is pending
    fund(market.chain, market.treasury, USDC)  # the treasury's float: what a second payout would take from
    market.upstream.responses.extend([(200, {"translation": "bonjour"})] * 2)
    payment = market.pay("translate")
    nonce = decode_payment_signature_header(payment).payload["authorization"]["nonce"]
    buyer, seller, treasury = market.balances()
    market.chain.rpc("evm_setAutomine", [False])
    try:
        with capture(execute=True):
            first = market.call("translate", payment)
        with capture(execute=True):
            replay = market.call("translate", _respelled(payment, nonce=nonce.removeprefix("0x")))
    finally:
        market.chain.rpc("evm_setAutomine", [True])
    market.chain.mine(1)
    for _ in range(3):
        confirm_all(capture)
    with capture(execute=True):
        invocations.invocations_sweep(now=timezone.now() + timedelta(days=1))
    for _ in range(2):
        confirm_all(capture)

    assert first.status_code == 202, first.content
    assert market.balances() == (buyer - PRICE, seller + PRICE - FEE, treasury + FEE)
    assert replay.status_code == 402 and replay.json()["error"] == "authorization_already_used", replay.content
    assert len(market.upstream.requests) == 1


def cancelled_on_chain(market, payment: str) -> None:
    """The payer cancels the payment's authorization itself, on-chain (EIP-3009 cancelAuthorization)."""
    nonce = decode_payment_signature_header(payment).payload["authorization"]["nonce"]
    typed = typed_data.cancel_authorization(chain_id=market.chain.chain_id, token_address=market.chain.usdc.address,
                                            authorizer=market.buyer.address, nonce=nonce)
    cancelled = market.chain.usdc.functions.cancelAuthorization(
        market.buyer.address, bytes.fromhex(nonce[2:]),
        bytes.fromhex(typed_data.sign_typed_data(market.buyer.key, typed)[2:])).transact(
        {"from": market.buyer.address})
    assert market.chain.w3.eth.wait_for_transaction_receipt(cancelled)["status"] == 1


def test_an_authorization_already_used_on_chain_is_refused_by_the_simulation(market):
    payment = market.pay("translate")
    cancelled_on_chain(market, payment)

    response = market.call("translate", payment)

    assert response.status_code == 402
    assert response.json()["error"] == "authorization_already_used"
    assert response.json()["details"]["x402_reason"] == "invalid_exact_evm_nonce_already_used"
    assert market.upstream.requests == [] and not ChainTransaction.objects.exists()


@pytest.mark.parametrize("overrides, code", [
    ({"amount": str(PRICE - 1)}, "wrong_amount"),
    ({"pay_to": "0x000000000000000000000000000000000000dEaD"}, "wrong_recipient"),
    ({"valid_before": 1}, "authorization_expired"),
    ({"valid_before": 2**63}, "malformed_payment"),  # beyond what the database records: was a 500
])
def test_bad_payments_are_402_with_their_code_and_move_nothing(market, overrides, code):
    payment = market.pay("translate", **overrides)
    before = market.balances()

    response = market.call("translate", payment)

    assert response.status_code == 402, response.content
    assert response.json()["error"] == code
    assert response["X-Payment-Amount"] == "0.02"
    assert market.upstream.requests == []
    assert not SkillInvocation.objects.exists() and not ChainTransaction.objects.exists()
    assert market.balances() == before


def test_a_payment_quoted_for_one_skill_does_not_pay_for_another_of_the_same_price(market):
    other = AgentFactory(handle="mallory", is_buyer=False, is_seller=True,
                         wallet_address=market.chain.accounts.stranger.address)
    register_service(other, upstream_base_url=market.upstream.url + "/other",
                     skills=[{"name": "echo", "price_atomic": PRICE}])
    for payment in (market.pay("translate"),  # x402's client: echoes the 402's requirements and resource
                    market.pay("translate", valid_before=market.chain.now() + 300)):  # requirements only
        before = market.balances()

        response = market.caller.post("/agents/mallory/echo", {"input": {}},
                                      headers={"X-Payment-Signature": payment})

        assert response.status_code == 402, response.content
        assert response.json()["error"] == "wrong_resource"
        assert response.json()["details"]["resource"] == "/agents/mallory/echo"
        assert market.upstream.requests == [] and not ChainTransaction.objects.exists()
        assert market.balances() == before
    # Still good where it was quoted.
    market.upstream.responses.append((200, {"translation": "bonjour"}))
    assert market.call("translate", payment).status_code == 200


@pytest.mark.parametrize("new_price", [PRICE * 2, PRICE // 2 + 1], ids=["raised", "lowered"])
def test_a_payment_quoted_before_the_seller_changed_the_skills_price_is_refused_and_quoted_again(market, new_price):
    """The seller changes the skill's price between its 402 and the buyer's payment: the payment of the old price is
    402 `wrong_amount` with a fresh 402 of the new one, nothing recorded nor moved (the buyer is never charged a price
    it did not sign, nor the seller paid one it no longer asks)."""
    payment = market.pay("translate")
    Skill.objects.filter(service__seller=market.seller, name="translate").update(price=new_price)
    before = market.balances()

    response = market.call("translate", payment)

    assert response.status_code == 402, response.content
    assert response.json()["error"] == "wrong_amount"
    assert decode_payment_required_header(response["PAYMENT-REQUIRED"]).accepts[0].amount == str(new_price)
    assert market.upstream.requests == [] and not ChainTransaction.objects.exists()
    assert not SkillInvocation.objects.exists() and market.balances() == before


def test_an_authorization_without_funds_is_402_insufficient_balance(market):
    market.buyer = market.chain.accounts.stranger  # holds no USDC
    response = market.call("translate", market.pay("translate"))

    assert response.status_code == 402
    assert response.json()["error"] == "insufficient_balance"
    assert market.upstream.requests == [] and not ChainTransaction.objects.exists()


def _encoded(value) -> str:
    return base64.b64encode(json.dumps(value).encode()).decode()


def test_a_signature_spelled_with_whitespace_is_recorded_as_its_65_bytes(market, django_capture_on_commit_callbacks):
    """bytes.fromhex reads "0xab cd.." as the same signature: it verified, and its spelling, 2 KB of spaces, was
    written into the record's 2000-character column: a 500 (DataError) after the checks and the simulation."""
    market.upstream.responses.append((200, {"translation": "bonjour"}))
    payment = market.pay("translate")
    signature = decode_payment_signature_header(payment).payload["signature"]
    pairs = [signature[i:i + 2] for i in range(2, len(signature), 2)]
    spaced = _with_payload(payment, lambda p: p["payload"].update(signature="0x" + (" " * 32).join(pairs)))

    with django_capture_on_commit_callbacks(execute=True):
        response = market.call("translate", spaced)

    assert response.status_code == 200, response.content
    assert SkillInvocation.objects.get().authorization.signature == signature.lower()
    assert len(market.upstream.requests) == 1


@pytest.mark.parametrize("payment", [
    "0x" + "ab" * 64,  # not a signature
    _encoded([1, 2]),
    _encoded({"x402Version": 2, "payload": {"authorization": {"nonce": 5, "value": "x"}, "signature": 7},
              "accepted": {"scheme": "exact", "network": "eip155:31337", "asset": "", "amount": "1", "payTo": "",
                           "maxTimeoutSeconds": 1}}),
])
def test_malformed_payments_are_402_malformed(market, payment):
    response = market.call("translate", payment)

    assert response.status_code == 402
    assert response.json()["error"] == "malformed_payment"


def test_a_skill_calls_input_is_bounded_in_size(market, settings):
    """Kept with the invocation and sent to the seller: bounded by the request body's limit only, an anonymous
    caller stored 2.5 MiB per call it never paid for (the 402 is answered after the body is read)."""
    settings.SKILL_INPUT_MAX_BYTES = 1024

    refused = market.caller.post("/agents/sol/translate", {"input": {"text": "x" * 2000}})

    assert refused.status_code == 400, refused.content
    assert codes_at(refused, "input") == {"too_large"}, refused.content
    assert market.caller.post("/agents/sol/translate", {"input": {"text": "x" * 900}}).status_code == 402
    assert market.upstream.requests == []


def test_unknown_skill_is_404_and_an_unpriced_one_409(market):
    assert market.caller.post("/agents/sol/nope", {"input": {}}).status_code == 404
    assert market.caller.get("/services/inv_nope").status_code == 404
    assert market.call("free").status_code == 409


def test_the_skills_of_a_seller_whose_owner_is_deactivated_are_404_as_a_deactivated_agents(market):
    owner = market.seller.owner
    owner.is_active = False
    owner.save()
    refused = market.call("translate")
    assert refused.status_code == 404 and error_code(refused) == "skill_not_found"

    owner.is_active = True
    owner.save()
    assert market.call("translate").status_code == 402


def test_a_skill_named_by_its_sellers_id_is_that_sellers_even_when_another_agents_handle_spells_the_id(market):
    """A handle is chosen by its owner; an id by the platform. An agent whose handle spelt another seller's id (a
    handle of lowercase hex and hyphens) took the calls made to that seller by id, quoted at its own price and paid
    to it."""
    impostor = AgentFactory(handle=str(market.seller.pk), is_buyer=False, is_seller=True)
    register_service(impostor, upstream_base_url=market.upstream.url + "/impostor",
                     skills=[{"name": "translate", "price_atomic": 10 * PRICE}])

    quoted = market.call("translate", seller=str(market.seller.pk))

    assert quoted.status_code == 402
    assert quoted.json()["accepts"][0]["amount"] == str(PRICE)


def test_a_skill_named_by_an_agents_id_is_never_another_agents_whose_handle_spells_it(market):
    """An agent registered before handles spelling an id were refused keeps its handle: when the agent the id names
    has no skill of the name asked for, the call fell back to the handle, and the impostor's skill took calls made to
    that agent by id."""
    impostor = AgentFactory(handle=str(market.seller.pk), is_buyer=False, is_seller=True)
    register_service(impostor, upstream_base_url=market.upstream.url + "/impostor",
                     skills=[{"name": "summarize", "price_atomic": 10 * PRICE}])

    refused = market.call("summarize", seller=str(market.seller.pk))

    assert (refused.status_code, error_code(refused)) == (404, "skill_not_found"), refused.content


# --- the Services API seed's bare signature ------------------------------------------------------------------

def _seed_signature(market, required, key: str, payer: str) -> str:
    """What a client of the seed signs: the EIP-3009 authorization its 402 quoted (payee, amount, nonce, window),
    under the token's domain from the 402."""
    [accepts] = required.json()["accepts"]
    typed = typed_data.transfer_with_authorization(
        chain_id=market.chain.chain_id, token_address=accepts["asset"], from_address=payer,
        to_address=required["X-Payment-Address"], value=int(accepts["amount"]),
        valid_after=int(required["X-Payment-Valid-After"]), valid_before=int(required["X-Payment-Valid-Before"]),
        nonce=required["X-Payment-Nonce"], token_name=accepts["extra"]["name"],
        token_version=accepts["extra"]["version"])
    return typed_data.sign_typed_data(key, typed)


@pytest.mark.parametrize("chain", TOKEN_NAMES, indirect=True)  # "USDC": Base Sepolia's name
def test_the_seeds_example_pays_with_a_bare_signature_and_x_payment_from(market, django_capture_on_commit_callbacks):
    market.upstream.responses.append((200, {"translation": "bonjour"}))
    required = market.call("translate")  # Step 1: 402
    signature = _seed_signature(market, required, market.buyer.key, market.buyer.address)
    buyer, seller, treasury = market.balances()

    with django_capture_on_commit_callbacks(execute=True):  # Step 2: retry with the signature
        response = market.caller.post("/agents/sol/translate", {"input": {"text": "hello"}}, headers={
            "X-Payment-Signature": signature, "X-Payment-From": market.buyer.address})
    confirm_all(django_capture_on_commit_callbacks)

    assert response.status_code == 200, response.content  # Step 3
    assert response.json()["result"] == {"translation": "bonjour"}
    assert response.json()["payment"]["amount"] == "0.02" and response.json()["payment"]["tx_hash"]
    assert market.balances() == (buyer - PRICE, seller + PRICE - FEE, treasury + FEE)
    replay = market.caller.post("/agents/sol/translate", {"input": {"text": "hello"}}, headers={
        "X-Payment-Signature": signature, "X-Payment-From": market.buyer.address})
    assert replay.status_code == 402 and replay.json()["error"] == "authorization_already_used"


def test_a_bare_signature_is_the_calling_agents_at_the_agents_id(market, django_capture_on_commit_callbacks):
    """The payer is the calling agent's wallet; `{handle}` is the seller's ID, as the seed allows."""
    buyer_agent = AgentFactory(is_buyer=True, is_seller=False, wallet_address=market.buyer.address)
    agent_api = Api(issue_key(buyer_agent))
    path = f"/agents/{market.seller.pk}/translate"
    market.upstream.responses.append((200, {"translation": "bonjour"}))
    required = agent_api.post(path, {"input": {"text": "hello"}})
    assert required.status_code == 402, required.content
    assert required.json()["accepts"][0]["extra"]["resource"] == "/agents/sol/translate"

    with django_capture_on_commit_callbacks(execute=True):
        response = agent_api.post(path, {"input": {"text": "hello"}}, headers={
            "X-Payment-Signature": _seed_signature(market, required, market.buyer.key, market.buyer.address)})

    assert response.status_code == 200, response.content
    assert response.json()["result"] == {"translation": "bonjour"}
    assert SkillInvocation.objects.get().buyer == buyer_agent


def test_a_bare_signature_needs_its_payer_and_a_quote_it_signs(market):
    required = market.call("translate")
    signature = _seed_signature(market, required, market.buyer.key, market.buyer.address)
    before = market.balances()

    def pay(**headers):
        return market.caller.post("/agents/sol/translate", {"input": {}},
                                  headers={"X-Payment-Signature": signature, **headers}).json()["error"]

    assert pay() == "payer_unknown"
    assert pay(**{"X-Payment-From": market.chain.accounts.stranger.address}) == "no_quoted_authorization"
    assert pay(**{"X-Payment-From": "nobody"}) == "malformed_payment"
    other_caller = Api()  # another client, which was not quoted this authorization
    other_caller.client.defaults["REMOTE_ADDR"] = "10.0.0.7"
    assert other_caller.post("/agents/sol/translate", {"input": {}}, headers={
        "X-Payment-Signature": signature, "X-Payment-From": market.buyer.address}).json()["error"] == \
        "no_quoted_authorization"
    assert market.upstream.requests == [] and not ChainTransaction.objects.exists()
    assert market.balances() == before


# --- the buyer's owner policy (an agent calling with its API key) ---------------------------------------------

@pytest.fixture
def buyer_agent(market, owner):
    """The buyer's wallet as an agent of `owner`: calling with its API key, the owner's policy applies."""
    return AgentFactory(owner=owner, handle="buyer-one", is_buyer=True, is_seller=False,
                        wallet_address=market.buyer.address)


@pytest.fixture
def agent_api(buyer_agent):
    return Api(issue_key(buyer_agent))


def _policy(owner_api, buyer_agent, **policy) -> None:
    response = owner_api.put(f"/agents/{buyer_agent.pk}/policies", policy)
    assert response.status_code == 200, response.content


def _invoke(market, agent_api, capture, *, skill: str = "translate", upstream=(200, {"translation": "bonjour"})):
    market.upstream.responses.append(upstream)
    payment = market.pay(skill)
    with capture(execute=True):
        response = market.call(skill, payment, api=agent_api)
    confirm_all(capture)  # the treasury's payout or refund
    return response


def _refused(market, response, *, code: str, rule: str, before, invocations: int = 0, calls: int = 0) -> None:
    """403 with the rule, and nothing recorded, sent on-chain or called."""
    assert response.status_code == 403, response.content
    assert response.json()["error"]["code"] == code
    assert response.json()["error"]["details"]["rule"] == rule
    assert SkillInvocation.objects.count() == invocations
    assert ChainTransaction.objects.filter(purpose="invocation_payment").count() == invocations
    assert len(market.upstream.requests) == calls
    assert market.balances() == before


def test_an_agents_invocation_of_a_blocked_sellers_skill_is_refused_and_moves_nothing(
        market, owner_api, buyer_agent, agent_api, django_capture_on_commit_callbacks):
    _policy(owner_api, buyer_agent, blocked_sellers=["sol"])
    payment = market.pay("translate")
    before = market.balances()

    response = market.call("translate", payment, api=agent_api)

    _refused(market, response, code="policy_denied", rule="blocked_sellers", before=before)
    assert response.json()["error"]["details"]["seller"] == "sol"


@pytest.mark.parametrize("bound_by", ["policy", "deactivation"])
def test_an_agent_bound_by_its_owners_policy_does_not_pay_past_it_anonymously_from_its_wallet(
        market, owner_api, buyer_agent, bound_by, django_capture_on_commit_callbacks):
    """The agent holds its wallet's key: the same signed payment sent without its API key (the payment alone, no
    owner) bought what its owner's policy refused it (or anything, the agent deactivated). A wallet an agent with
    an owner's policy, or deactivated, proved is refused
    anonymously, 403 `agent_key_required` (nothing recorded, sent or called); another wallet still pays so, even one
    an agent with a policy names unproven (anyone may name any wallet)."""
    if bound_by == "policy":
        _policy(owner_api, buyer_agent, blocked_sellers=["sol"])
    else:
        buyer_agent.is_active = False  # as an operator does in the admin
        buyer_agent.save(update_fields=["is_active"])
    payment = market.pay("translate")
    before = market.balances()

    response = market.call("translate", payment)

    assert response.status_code == 403, response.content
    assert error_code(response) == "agent_key_required"
    assert response.json()["error"]["details"] == {"wallet": market.buyer.address}
    assert SkillInvocation.objects.count() == 0 and not ChainTransaction.objects.exists()
    assert market.upstream.requests == [] and market.balances() == before
    other_wallet = market.chain.accounts.buyer2
    _funded(market, other_wallet)
    naming = AgentFactory(is_buyer=True, is_seller=False, wallet_address=other_wallet.address, wallet_proven_at=None)
    Policy.objects.create(agent=naming, blocked_sellers=["sol"])
    market.upstream.responses.append((200, {"translation": "bonjour"}))
    with django_capture_on_commit_callbacks(execute=True):
        assert market.call("translate", market.pay("translate", key=other_wallet.key)).status_code == 200


def test_a_daily_cap_counts_proposals_and_invocations_and_refuses_the_invocation_over_it(
        market, owner_api, buyer_agent, agent_api, django_capture_on_commit_callbacks):
    # The proposal of 10 calls commits 200_000 + the 100_000 minimum fee; each invocation its price.
    _policy(owner_api, buyer_agent, daily_cap_atomic=300_000 + 2 * PRICE)
    propose(agent_api, market.service)
    failed = _invoke(market, agent_api, django_capture_on_commit_callbacks, upstream=(500, {"error": "crashed"}))
    assert failed.status_code == 502  # refunded: it no longer counts
    for _ in range(2):
        assert _invoke(market, agent_api, django_capture_on_commit_callbacks).status_code == 200
    payment = market.pay("translate")
    before = market.balances()

    response = market.call("translate", payment, api=agent_api)

    _refused(market, response, code="policy_denied", rule="daily_cap", before=before, invocations=3, calls=3)
    assert response.json()["error"]["details"] == {"rule": "daily_cap", "spent": 340_000, "amount": PRICE,
                                                   "limit": 340_000}


def test_an_invocation_counts_against_a_later_proposals_cap(market, owner_api, buyer_agent, agent_api,
                                                            django_capture_on_commit_callbacks):
    _policy(owner_api, buyer_agent, daily_cap_atomic=300_000 + PRICE - 1)  # a proposal of 10 calls, or one call
    assert _invoke(market, agent_api, django_capture_on_commit_callbacks).status_code == 200

    response = agent_api.post("/usage-agreements", proposal(market.service))

    assert response.status_code == 403, response.content
    assert response.json()["error"]["details"]["rule"] == "daily_cap"
    assert response.json()["error"]["details"]["spent"] == PRICE
    assert not UsageAgreement.objects.exists()


@pytest.mark.postgres
@pytest.mark.django_db(transaction=True)
def test_an_invocation_and_a_proposal_at_once_cannot_both_slip_under_the_daily_cap(market, owner_api, buyer_agent,
                                                                                  agent_api):
    """Each alone fits the cap, together they pass it. Sent at once, one connection per thread on PostgreSQL: both
    take the buyer's row lock before reading what it committed, so one is refused."""
    _policy(owner_api, buyer_agent, daily_cap_atomic=300_000 + PRICE - 1)  # a proposal of 10 calls, or one call
    market.upstream.responses.append((200, {"translation": "bonjour"}))
    payment = market.pay("translate")

    answers = answered_at_once({
        "invocation": lambda: market.call("translate", payment, api=Api(agent_api.secret)),
        "proposal": lambda: Api(agent_api.secret).post("/usage-agreements", proposal(market.service))})

    statuses = {name: answer.status_code for name, answer in answers.items()}
    assert statuses in ({"invocation": 200, "proposal": 403}, {"invocation": 403, "proposal": 201}), [
        answer.content for answer in answers.values()]
    refused = next(answer for answer in answers.values() if answer.status_code == 403)
    assert refused.json()["error"]["details"]["rule"] == "daily_cap"
    assert SkillInvocation.objects.count() + UsageAgreement.objects.count() == 1


def test_an_invocation_the_owner_must_approve_is_403_approval_required_and_moves_nothing(
        market, owner_api, buyer_agent, agent_api):
    _policy(owner_api, buyer_agent, approval_threshold_atomic=PRICE - 1)
    payment = market.pay("translate")
    before = market.balances()

    response = market.call("translate", payment, api=agent_api)

    _refused(market, response, code="approval_required", rule="approval_threshold", before=before)
    assert response.json()["error"]["details"]["threshold"] == PRICE - 1
    assert not ApprovalRequest.objects.exists()  # a synchronous paid call cannot wait for the owner


def test_an_agent_its_owner_made_a_seller_only_buys_no_skill_with_its_key(market, owner, buyer_agent):
    """An agent created without the buyer role is refused a proposal (403 `not_a_buyer`); its invocation with its API
    key is a purchase as well, refused the same way, before anything is recorded or moves."""
    Agent.objects.filter(pk=buyer_agent.pk).update(is_buyer=False, is_seller=True)
    payment = market.pay("translate")
    before = market.balances()

    response = market.call("translate", payment, api=Api(issue_key(buyer_agent)))

    assert response.status_code == 403, response.content
    assert error_code(response) == "not_a_buyer"
    assert not SkillInvocation.objects.exists()
    assert not ChainTransaction.objects.filter(purpose="invocation_payment").exists()
    assert market.upstream.requests == [] and market.balances() == before


def test_a_read_only_key_of_an_agent_buys_no_skill_in_its_name(market, buyer_agent):
    """A key without the `pay` scope proposes nothing (403 `insufficient_scope`); at the skill route it named the
    agent as the buyer all the same: any payment sent with it was counted against the agent's caps and its failures
    against the agent's standing with the seller. Refused the same way, nothing recorded or moved."""
    payment = market.pay("translate")
    before = market.balances()

    response = market.call("translate", payment, api=Api(issue_key(buyer_agent, scope="read")))

    assert response.status_code == 403, response.content
    assert error_code(response) == "insufficient_scope"
    assert not SkillInvocation.objects.exists()
    assert market.upstream.requests == [] and market.balances() == before


def cancelled_once_estimated(market, monkeypatch, payment: str) -> None:
    """The next transaction the relayer estimates reverts when mined: right after the estimate the payer cancels the
    payment's authorization (in a block before the relayer's), as anyone may change the chain in between."""
    estimate = gateway.simulate

    def estimate_then_cancel(**transaction):
        gas = estimate(**transaction)
        monkeypatch.setattr(gateway, "simulate", estimate)
        cancelled_on_chain(market, payment)
        return gas

    monkeypatch.setattr(gateway, "simulate", estimate_then_cancel)


def test_a_payer_whose_relayed_payments_keep_reverting_is_refused_relaying_once_its_revert_budget_is_spent(
        market, settings, monkeypatch, django_capture_on_commit_callbacks):
    """An anonymous payer's authorization passes the checks and the simulations, then the payer cancels it before
    the relayer's transferWithAuthorization is mined: the revert costs the relayer's gas, nothing is charged, and the
    payer signs another. After RELAY_REVERTS_PER_PARTY such reverts of its wallet the next paid call is 429
    relay_budget_exhausted: nothing is relayed, the seller is not called."""
    settings.RELAY_REVERTS_PER_PARTY = 2
    for _ in range(2):
        payment = market.pay("translate")
        cancelled_once_estimated(market, monkeypatch, payment)
        with django_capture_on_commit_callbacks(execute=True):
            response = market.call("translate", payment)
        assert response.status_code == 402 and response.json()["error"] == "payment_failed", response.content
    assert ChainTransaction.objects.filter(purpose="invocation_payment", receipt_status=0).count() == 2
    buyer, seller, treasury = market.balances()

    with django_capture_on_commit_callbacks(execute=True):
        response = market.call("translate", market.pay("translate"))

    assert response.status_code == 429, response.content
    assert error_code(response) == "relay_budget_exhausted"
    assert response.json()["error"]["details"]["retry_after_seconds"] > 0
    assert ChainTransaction.objects.count() == 2 and market.upstream.requests == []
    assert market.balances() == (buyer, seller, treasury)


# --- the platform's fee, and the gas an invocation makes the relayer spend ---------------------------------------

def test_a_completed_invocation_pays_the_seller_its_price_less_the_platforms_fee_which_the_treasury_keeps(
        market, settings, django_capture_on_commit_callbacks):
    """A skill invocation costs the relayer two transactions' gas (the payment, the payout): it carries the fee
    schedule's percentage and fixed part with a minimum (INVOCATION_FEE_MINIMUM_ATOMIC), quoted by
    /payment-requirements, recorded with the invocation and kept by the treasury; the seller is paid the rest."""
    settings.INVOCATION_FEE_MINIMUM_ATOMIC = 5_000
    fee = 5_000  # max(2% of 20_000 + 3_000, 5_000)
    quoted = Api(issue_key(market.seller)).get("/payment-requirements",
                                               {"amount_atomic": PRICE, "purpose": "skill_invocation"})
    assert quoted.status_code == 200, quoted.content
    assert quoted.json()["fee_atomic"] == fee
    market.upstream.responses.append((200, {"translation": "bonjour"}))
    payment = market.pay("translate")
    buyer, seller, treasury = market.balances()

    with django_capture_on_commit_callbacks(execute=True):
        response = market.call("translate", payment)
    confirm_all(django_capture_on_commit_callbacks)

    assert response.status_code == 200, response.content
    assert response.json()["payment"]["fee_atomic"] == fee
    assert market.balances() == (buyer - PRICE, seller + PRICE - fee, treasury + fee)
    assert SkillInvocation.objects.get().fee == fee
    shown = market.caller.get(f"/services/{response.json()['invocation_id']}").json()
    assert shown["payment"]["status"] == "paid_out" and shown["payment"]["fee_atomic"] == fee


def test_a_failed_invocation_refunds_the_buyer_its_whole_price_fee_included(
        market, settings, django_capture_on_commit_callbacks):
    settings.INVOCATION_FEE_MINIMUM_ATOMIC = 5_000
    market.upstream.responses.append((500, {"error": "boom"}))
    payment = market.pay("translate")
    before = market.balances()

    with django_capture_on_commit_callbacks(execute=True):
        response = market.call("translate", payment)
    confirm_all(django_capture_on_commit_callbacks)

    assert response.status_code == 502, response.content
    assert market.balances() == before
    assert SkillInvocation.objects.get().money == "refunded"


def test_a_skill_priced_at_or_below_the_minimum_fee_is_409_before_any_quote_or_payment(market, settings):
    """A skill of 1 base unit let an owner whose agents sell and buy have the relayer pay two transactions' gas per
    call for nothing: a price the fee would take whole is refused (409 skill_price_below_fee), nothing quoted,
    nothing relayed, the seller not called; one above it is quoted."""
    settings.INVOCATION_FEE_MINIMUM_ATOMIC = PRICE

    for payment in (None, "0x" + "ab" * 65):
        refused = market.call("translate", payment)
        assert refused.status_code == 409, refused.content
        assert error_code(refused) == "skill_price_below_fee"
        assert refused.json()["error"]["details"] == {"price_atomic": PRICE, "fee_atomic": PRICE}
    assert not ChainTransaction.objects.exists() and market.upstream.requests == []
    assert market.call("render").status_code == 402  # 50_000: above the fee


def _reverted_payment(market, monkeypatch, capture, *, api: Api | None = None) -> None:
    """A paid call whose payment the payer cancels between the relayer's simulation and the mining: a revert at the
    relayer's gas, charged to the caller (its agent, else its wallet)."""
    payment = market.pay("translate")
    cancelled_once_estimated(market, monkeypatch, payment)
    with capture(execute=True):
        response = market.call("translate", payment, api=api)
    assert response.status_code == 402 and response.json()["error"] == "payment_failed", response.content


def test_an_owner_cannot_multiply_its_relay_revert_budget_by_creating_agents(
        market, owner, settings, monkeypatch, django_capture_on_commit_callbacks):
    """The budget counted per agent: an owner with N agents (AGENTS_PER_OWNER) had N times RELAY_REVERTS_PER_PARTY
    reverts at the relayer's gas. Its agents' reverts also count together, at most RELAY_REVERTS_PER_OWNER: an
    agent with none of its own is refused (429 relay_budget_exhausted, details.bound owner), nothing relayed."""
    capture = django_capture_on_commit_callbacks
    settings.RELAY_REVERTS_PER_PARTY, settings.RELAY_REVERTS_PER_OWNER, settings.RELAY_REVERTS_PER_WALLET = 5, 2, 50
    agents = [AgentFactory(owner=owner, is_buyer=True, is_seller=False, wallet_address=market.buyer.address)
              for _ in range(3)]
    for agent in agents[:2]:
        _reverted_payment(market, monkeypatch, capture, api=Api(issue_key(agent)))
    sent = ChainTransaction.objects.count()

    with capture(execute=True):
        refused = market.call("translate", market.pay("translate"), api=Api(issue_key(agents[2])))

    assert refused.status_code == 429, refused.content
    assert error_code(refused) == "relay_budget_exhausted"
    assert refused.json()["error"]["details"]["bound"] == "owner"
    assert ChainTransaction.objects.count() == sent and market.upstream.requests == []


def test_a_wallet_paying_through_other_agents_or_anonymously_shares_one_relay_revert_budget(
        market, settings, monkeypatch, django_capture_on_commit_callbacks):
    """A paying wallet is what a revert spends from: the same wallet's reverts count together whoever called, an
    anonymous payer or agents of different owners, at most RELAY_REVERTS_PER_WALLET (details.bound wallet)."""
    capture = django_capture_on_commit_callbacks
    settings.RELAY_REVERTS_PER_PARTY, settings.RELAY_REVERTS_PER_OWNER, settings.RELAY_REVERTS_PER_WALLET = 5, 50, 2
    first, second = (AgentFactory(is_buyer=True, is_seller=False, wallet_address=market.buyer.address)
                     for _ in range(2))
    assert first.owner_id != second.owner_id
    _reverted_payment(market, monkeypatch, capture)  # anonymous: the wallet's
    _reverted_payment(market, monkeypatch, capture, api=Api(issue_key(first)))
    sent = ChainTransaction.objects.count()

    with capture(execute=True):
        refused = market.call("translate", market.pay("translate"), api=Api(issue_key(second)))

    assert refused.status_code == 429, refused.content
    assert error_code(refused) == "relay_budget_exhausted"
    assert refused.json()["error"]["details"]["bound"] == "wallet"
    assert ChainTransaction.objects.count() == sent and market.upstream.requests == []


def _funded(market, *accounts) -> None:
    """Funded before the relayer sends anything: minting is the relayer's account's transaction too."""
    for account in accounts:
        fund(market.chain, account.address, 10 * USDC)


def _paying_from(market, account) -> None:
    """The market's payer (whose key signs `market.pay` and cancels on-chain) is now `account`."""
    market.buyer = account


def _from_client(address: str, secret: str | None = None) -> Api:
    """A caller at the network address `address` (anonymous, or holding an agent's API key `secret`)."""
    api = Api(secret)
    api.client.defaults["REMOTE_ADDR"] = address
    return api


def test_a_wallets_reverts_stay_with_it_when_the_agent_that_paid_from_it_changes_wallet(
        market, settings, monkeypatch, django_capture_on_commit_callbacks):
    """A revert is the paying wallet's whoever holds the wallet now: counted through the agents holding it now, an
    agent that made its wallet's payments revert and then changed wallet left the old one clean to pay from again.
    The old wallet keeps them: an anonymous payer from it is 429 relay_budget_exhausted (details.bound wallet)."""
    capture = django_capture_on_commit_callbacks
    settings.RELAY_REVERTS_PER_PARTY, settings.RELAY_REVERTS_PER_OWNER, settings.RELAY_REVERTS_PER_WALLET = 5, 50, 2
    agent = AgentFactory(is_buyer=True, is_seller=False, wallet_address=market.buyer.address)
    for _ in range(2):
        _reverted_payment(market, monkeypatch, capture, api=Api(issue_key(agent)))
    Agent.objects.filter(pk=agent.pk).update(wallet_address=market.chain.accounts.buyer2.address)
    sent = ChainTransaction.objects.count()

    with capture(execute=True):
        refused = market.call("translate", market.pay("translate"))

    assert refused.status_code == 429, refused.content
    assert error_code(refused) == "relay_budget_exhausted"
    assert refused.json()["error"]["details"]["bound"] == "wallet"
    assert ChainTransaction.objects.count() == sent and market.upstream.requests == []


def test_a_wallet_an_agent_moves_to_does_not_take_on_the_agents_past_reverts(
        market, settings, monkeypatch, django_capture_on_commit_callbacks):
    """The other side: the wallet an agent moves to inherited the agent's past reverts, and another owner's agent
    paying from it was refused for what it never did. It is served."""
    capture = django_capture_on_commit_callbacks
    settings.RELAY_REVERTS_PER_PARTY, settings.RELAY_REVERTS_PER_OWNER, settings.RELAY_REVERTS_PER_WALLET = 5, 50, 2
    wallet = market.buyer
    _funded(market, market.chain.accounts.buyer2)
    _paying_from(market, market.chain.accounts.buyer2)
    mover = AgentFactory(is_buyer=True, is_seller=False, wallet_address=market.buyer.address)
    for _ in range(2):
        _reverted_payment(market, monkeypatch, capture, api=Api(issue_key(mover)))
    _paying_from(market, wallet)
    Agent.objects.filter(pk=mover.pk).update(wallet_address=wallet.address)
    holder = AgentFactory(is_buyer=True, is_seller=False, wallet_address=wallet.address)
    market.upstream.responses.append((200, {"translation": "bonjour"}))

    with capture(execute=True):
        served = market.call("translate", market.pay("translate"), api=Api(issue_key(holder)))

    assert served.status_code == 200, served.content


def test_an_anonymous_client_paying_from_fresh_wallets_is_refused_at_its_client_bound(
        market, settings, monkeypatch, django_capture_on_commit_callbacks):
    """An anonymous payer (no API key) was counted per wallet, which costs nothing to make: the same USDC moved from
    wallet to wallet passes each one's checks. Its reverts also count per client address (IPv6: its /64), at most
    RELAY_REVERTS_PER_CLIENT: the next anonymous payment from that client, from any wallet, is 429
    relay_budget_exhausted (details.bound client), nothing relayed. Another client is served, and so is an agent
    with an API key calling from that client."""
    capture = django_capture_on_commit_callbacks
    settings.RELAY_REVERTS_PER_PARTY, settings.RELAY_REVERTS_PER_WALLET = 5, 5
    settings.RELAY_REVERTS_PER_CLIENT, settings.RELAY_REVERTS_ANONYMOUS = 2, 50
    here, same_network, elsewhere = "2001:db8:7:7::1", "2001:db8:7:7:ffff::9", "2001:db8:7:8::1"
    _funded(market, market.chain.accounts.buyer2, market.chain.accounts.spare)
    _reverted_payment(market, monkeypatch, capture, api=_from_client(here))
    _paying_from(market, market.chain.accounts.buyer2)
    _reverted_payment(market, monkeypatch, capture, api=_from_client(same_network))
    _paying_from(market, market.chain.accounts.spare)
    sent = ChainTransaction.objects.count()

    with capture(execute=True):
        refused = market.call("translate", market.pay("translate"), api=_from_client(here))

    assert refused.status_code == 429, refused.content
    assert error_code(refused) == "relay_budget_exhausted"
    assert refused.json()["error"]["details"]["bound"] == "client"
    assert ChainTransaction.objects.count() == sent and market.upstream.requests == []
    agent = AgentFactory(is_buyer=True, is_seller=False, wallet_address=market.buyer.address)
    for caller in (_from_client(elsewhere), _from_client(here, issue_key(agent))):
        market.upstream.responses.append((200, {"translation": "bonjour"}))
        with capture(execute=True):
            served = market.call("translate", market.pay("translate"), api=caller)
        assert served.status_code == 200, served.content


def test_anonymous_payers_together_are_refused_at_the_anonymous_bound_and_agents_with_keys_are_not(
        market, settings, monkeypatch, django_capture_on_commit_callbacks):
    """Anonymous payers' reverts count together too, at most RELAY_REVERTS_ANONYMOUS (fresh wallets from fresh
    addresses): the next anonymous payment is 429 relay_budget_exhausted (details.bound anonymous), while an agent
    with an API key is served. 0 lifts the bound."""
    capture = django_capture_on_commit_callbacks
    settings.RELAY_REVERTS_PER_PARTY, settings.RELAY_REVERTS_PER_WALLET = 5, 50
    settings.RELAY_REVERTS_PER_CLIENT, settings.RELAY_REVERTS_ANONYMOUS = 50, 2
    _funded(market, market.chain.accounts.buyer2)
    _reverted_payment(market, monkeypatch, capture, api=_from_client("198.51.100.1"))
    _paying_from(market, market.chain.accounts.buyer2)
    _reverted_payment(market, monkeypatch, capture, api=_from_client("198.51.100.2"))
    sent = ChainTransaction.objects.count()

    with capture(execute=True):
        refused = market.call("translate", market.pay("translate"), api=_from_client("198.51.100.3"))

    assert refused.status_code == 429, refused.content
    assert error_code(refused) == "relay_budget_exhausted"
    assert refused.json()["error"]["details"]["bound"] == "anonymous"
    assert ChainTransaction.objects.count() == sent and market.upstream.requests == []
    agent = AgentFactory(is_buyer=True, is_seller=False, wallet_address=market.buyer.address)
    market.upstream.responses.append((200, {"translation": "bonjour"}))
    with capture(execute=True):
        served = market.call("translate", market.pay("translate"), api=_from_client("198.51.100.3", issue_key(agent)))
    assert served.status_code == 200, served.content
    settings.RELAY_REVERTS_ANONYMOUS = 0
    market.upstream.responses.append((200, {"translation": "bonjour"}))
    with capture(execute=True):
        served = market.call("translate", market.pay("translate"), api=_from_client("198.51.100.3"))
    assert served.status_code == 200, served.content


def test_an_anonymous_client_paying_at_once_from_fresh_wallets_is_refused_at_its_in_flight_client_bound(
        market, settings, django_capture_on_commit_callbacks):
    """Reverts count once mined, and an anonymous payer's in-flight bound was per wallet, which costs nothing to
    make: payments posted at once from many funded wallets all passed before any revert was mined. Its relayed
    transactions not concluded count per client network too (IPv6: its /64), at most RELAY_IN_FLIGHT_PER_CLIENT:
    the next anonymous payment from that network, from any wallet, is 429 relay_in_flight_limit_reached
    (details.bound client), nothing queued. Another network is served, and so is an agent with an API key calling
    from that network."""
    capture = django_capture_on_commit_callbacks
    settings.INVOCATION_PAYMENT_WAIT_SECONDS = 0
    settings.RELAY_IN_FLIGHT_PER_PARTY, settings.RELAY_IN_FLIGHT_PER_CLIENT = 5, 2
    here, same_network, elsewhere = "2001:db8:9:9::1", "2001:db8:9:9:ffff::9", "2001:db8:9:a::1"
    accounts = market.chain.accounts
    _funded(market, accounts.buyer2, accounts.spare, accounts.stranger)
    agent = AgentFactory(is_buyer=True, is_seller=False, wallet_address=accounts.stranger.address)
    payments = []
    for account in (market.buyer, accounts.buyer2, accounts.spare, accounts.spare, accounts.stranger):
        _paying_from(market, account)
        payments.append(market.pay("translate"))
    callers = [_from_client(here), _from_client(same_network), _from_client(here), _from_client(elsewhere),
               _from_client(here, issue_key(agent))]
    market.upstream.responses.extend([(200, {"translation": "bonjour"})] * 4)
    market.chain.rpc("evm_setAutomine", [False])
    try:
        answers = []
        for payment, caller in zip(payments, callers, strict=True):
            with capture(execute=True):
                answers.append(market.call("translate", payment, api=caller))
    finally:
        market.chain.rpc("evm_setAutomine", [True])
    market.chain.mine(1)
    for _ in range(3):
        confirm_all(capture)

    first, second, refused, other_network, agent_here = answers
    assert [first.status_code, second.status_code] == [202, 202], (first.content, second.content)
    assert refused.status_code == 429, refused.content
    assert error_code(refused) == "relay_in_flight_limit_reached"
    assert refused.json()["error"]["details"]["bound"] == "client"
    assert other_network.status_code == 202, other_network.content
    assert agent_here.status_code == 202, agent_here.content
    assert ChainTransaction.objects.filter(purpose="invocation_payment").count() == 4


def test_old_skill_payment_reverts_are_filled_with_the_wallet_that_paid_and_the_agents_owner(
        market, monkeypatch, django_capture_on_commit_callbacks):
    """The migration that made a relay revert record its payer (escrow 0018) fills the rows from before it from the
    transaction: a skill payment's from its authorization's payer (the agent's wallet since changed), an anonymous
    payer's from its party; the owner is the agent's."""
    capture = django_capture_on_commit_callbacks
    agent = AgentFactory(is_buyer=True, is_seller=False, wallet_address=market.buyer.address)
    _reverted_payment(market, monkeypatch, capture, api=Api(issue_key(agent)))
    _reverted_payment(market, monkeypatch, capture)
    RelayRevert.objects.update(wallet="", owner=None, client="")
    Agent.objects.filter(pk=agent.pk).update(wallet_address=market.chain.accounts.buyer2.address)

    importlib.import_module("escrow.migrations.0018_relay_revert_records_wallet_owner_client").relay_payers_fill(
        apps, None)

    assert set(RelayRevert.objects.values_list("party", "wallet", "owner_id", "client")) == {
        (f"agent:{agent.pk}", market.buyer.address, agent.owner_id, ""),
        (f"wallet:{market.buyer.address}", market.buyer.address, None, "")}


def test_concurrent_payments_from_one_wallet_are_summed_against_its_balance(
        market, settings, django_capture_on_commit_callbacks):
    """Each payment's simulation sees the balance alone: N payments posted at once all passed, and all but what the
    balance covers reverted at the relayer's gas. The wallet's relayed payments not mined yet count: the next is 402
    insufficient_balance with details.committed, nothing relayed."""
    capture = django_capture_on_commit_callbacks
    settings.INVOCATION_PAYMENT_WAIT_SECONDS = 0
    keep = PRICE + PRICE // 2  # one payment's worth, not two
    sent_away = market.chain.usdc.functions.transfer(market.chain.accounts.stranger.address,
                                                     usdc_balance(market.chain, market.buyer.address) - keep
                                                     ).transact({"from": market.buyer.address})
    assert market.chain.w3.eth.wait_for_transaction_receipt(sent_away)["status"] == 1
    market.upstream.responses.append((200, {"translation": "bonjour"}))
    payments = [market.pay("translate"), market.pay("translate")]
    market.chain.rpc("evm_setAutomine", [False])
    try:
        with capture(execute=True):
            first = market.call("translate", payments[0])
        with capture(execute=True):
            second = market.call("translate", payments[1])
    finally:
        market.chain.rpc("evm_setAutomine", [True])
    market.chain.mine(1)
    for _ in range(3):
        confirm_all(capture)

    assert first.status_code == 202, first.content
    assert second.status_code == 402, second.content
    assert second.json()["error"] == "insufficient_balance"
    assert second.json()["details"]["committed"] == PRICE and second.json()["details"]["balance"] == keep
    assert ChainTransaction.objects.filter(purpose="invocation_payment").count() == 1
    assert not ChainTransaction.objects.filter(receipt_status=0).exists()


def test_an_owners_agents_together_have_at_most_the_owners_relayed_payments_in_flight(
        market, owner, settings, django_capture_on_commit_callbacks):
    """Reverts count once mined, so RELAY_IN_FLIGHT_PER_PARTY bounds what one transfer can make revert at once; per
    agent, an owner's N agents had N times that in flight. They share RELAY_IN_FLIGHT_PER_OWNER: the next is 429
    relay_in_flight_limit_reached (details.bound owner), nothing relayed."""
    capture = django_capture_on_commit_callbacks
    settings.INVOCATION_PAYMENT_WAIT_SECONDS = 0
    settings.RELAY_IN_FLIGHT_PER_PARTY, settings.RELAY_IN_FLIGHT_PER_OWNER = 5, 1
    first, second = (Api(issue_key(AgentFactory(owner=owner, is_buyer=True, is_seller=False,
                                                wallet_address=market.buyer.address))) for _ in range(2))
    market.upstream.responses.append((200, {"translation": "bonjour"}))
    payments = [market.pay("translate"), market.pay("translate")]
    market.chain.rpc("evm_setAutomine", [False])
    try:
        with capture(execute=True):
            accepted = market.call("translate", payments[0], api=first)
        with capture(execute=True):
            refused = market.call("translate", payments[1], api=second)
    finally:
        market.chain.rpc("evm_setAutomine", [True])
    market.chain.mine(1)
    for _ in range(3):
        confirm_all(capture)

    assert accepted.status_code == 202, accepted.content
    assert refused.status_code == 429, refused.content
    assert error_code(refused) == "relay_in_flight_limit_reached"
    assert refused.json()["error"]["details"]["bound"] == "owner"
    assert ChainTransaction.objects.filter(purpose="invocation_payment").count() == 1


# --- a seller that fails its buyers: bounded per buyer party, never paused for everyone -------------------------

def _failed_call(market, capture, *, api: Api | None = None, seller: str = "sol", key: str | None = None):
    """A paid call the seller answers 500: refunded whole, the relayer paying the payment's and the refund's gas."""
    market.upstream.responses.append((500, {"error": "this seller always fails"}))
    payment = market.pay("translate", seller=seller, key=key)
    with capture(execute=True):
        response = market.call("translate", payment, api=api, seller=seller)
    confirm_all(capture)  # the treasury's refund
    assert response.status_code == 502, response.content
    return response


def _served_call(market, capture, *, api: Api | None = None, seller: str = "sol", key: str | None = None):
    market.upstream.responses.append((200, {"translation": "bonjour"}))
    payment = market.pay("translate", seller=seller, key=key)
    with capture(execute=True):
        response = market.call("translate", payment, api=api, seller=seller)
    confirm_all(capture)
    return response


def _refused_as_failing(response, settings, *, bound: str, failures: int) -> int:
    """429 seller_failing_for_you naming the bound reached, with when the oldest counted failure leaves the window."""
    assert response.status_code == 429, response.content
    assert error_code(response) == "seller_failing_for_you"
    details = response.json()["error"]["details"]
    assert (details["bound"], details["failures"]) == (bound, failures), details
    assert 0 < details["retry_after_seconds"] <= settings.INVOCATION_FAILURE_WINDOW.total_seconds()
    assert int(response["Retry-After"]) == details["retry_after_seconds"]
    return details["retry_after_seconds"]


def _failing_seller(market, handle: str, account) -> None:
    """Another seller agent (another owner: a seller under many identities) whose skill is served by the same
    failing upstream."""
    agent = AgentFactory(handle=handle, is_buyer=False, is_seller=True, wallet_address=account.address)
    register_service(agent, upstream_base_url=market.upstream.url + "/api", skills=[
        {"name": "translate", "price_atomic": PRICE}])


def test_an_owners_buyers_calling_a_seller_that_always_fails_are_refused_before_any_payment_past_the_bound(
        market, owner, settings, django_capture_on_commit_callbacks):
    """Each failed invocation is refunded whole and the relayer pays both transactions' gas: an owner whose seller
    agent always fails, called by its buyer agents, cost the relayer that gas for nothing, at RATE_LIMIT_PAYMENTS
    per agent. Its agents' failed invocations of that seller count together (creating agents does not multiply
    them): past INVOCATION_FAILURES_PER_BUYER_SELLER within the window, the next is 429 seller_failing_for_you
    before anything is quoted or relayed, the seller not called."""
    capture = django_capture_on_commit_callbacks
    settings.INVOCATION_FAILURES_PER_BUYER_SELLER, settings.INVOCATION_FAILURES_PER_BUYER = 5, 20
    agents = [Api(issue_key(AgentFactory(owner=owner, is_buyer=True, is_seller=False,
                                         wallet_address=market.buyer.address))) for _ in range(3)]
    for attempt in range(5):
        _failed_call(market, capture, api=agents[attempt % 2])
    sent, called = ChainTransaction.objects.count(), len(market.upstream.requests)
    assert ChainTransaction.objects.filter(purpose="invocation_refund").count() == 5
    payment = market.pay("translate")

    with capture(execute=True):
        refused = market.call("translate", payment, api=agents[2])  # an agent with no failure of its own

    _refused_as_failing(refused, settings, bound="seller", failures=5)
    assert ChainTransaction.objects.count() == sent and len(market.upstream.requests) == called
    assert SkillInvocation.objects.count() == 5
    # Nothing is quoted to it either.
    _refused_as_failing(market.call("translate", api=agents[0]), settings, bound="seller", failures=5)


def test_a_seller_failing_one_owners_buyers_still_serves_another_owners(
        market, owner, settings, django_capture_on_commit_callbacks):
    """The bound is the buyer party's, not the seller's: a buyer whose input makes the seller fail (or an owner
    failing its own seller on purpose) cannot take the seller offline for its other buyers."""
    capture = django_capture_on_commit_callbacks
    settings.INVOCATION_FAILURES_PER_BUYER_SELLER = 2
    failing = Api(issue_key(AgentFactory(owner=owner, is_buyer=True, is_seller=False,
                                         wallet_address=market.buyer.address)))
    for _ in range(2):
        _failed_call(market, capture, api=failing)
    _refused_as_failing(market.call("translate", market.pay("translate"), api=failing), settings,
                        bound="seller", failures=2)
    other_wallet = market.chain.accounts.buyer2
    fund(market.chain, other_wallet.address, USDC)
    other = Api(issue_key(AgentFactory(is_buyer=True, is_seller=False, wallet_address=other_wallet.address)))

    served = _served_call(market, capture, api=other, key=other_wallet.key)
    anonymous = _served_call(market, capture, key=other_wallet.key)

    assert served.status_code == 200, served.content
    assert served.json()["result"] == {"translation": "bonjour"}
    assert anonymous.status_code == 200, anonymous.content
    _refused_as_failing(market.call("translate", market.pay("translate"), api=failing), settings,
                        bound="seller", failures=2)


def test_a_buyer_owners_failed_invocations_over_all_sellers_are_bounded_too(
        market, owner, settings, django_capture_on_commit_callbacks):
    """A seller under many identities (an agent per failure bound) gets past a bound per seller: a buyer party's
    failed invocations of all sellers together are bounded by INVOCATION_FAILURES_PER_BUYER (details.bound buyer)."""
    capture = django_capture_on_commit_callbacks
    settings.INVOCATION_FAILURES_PER_BUYER_SELLER, settings.INVOCATION_FAILURES_PER_BUYER = 2, 3
    _failing_seller(market, "sol-two", market.chain.accounts.seller2)
    _failing_seller(market, "sol-three", market.chain.accounts.spare)
    buyer = Api(issue_key(AgentFactory(owner=owner, is_buyer=True, is_seller=False,
                                       wallet_address=market.buyer.address)))
    for seller in ("sol", "sol", "sol-two"):
        _failed_call(market, capture, api=buyer, seller=seller)
    sent, called = ChainTransaction.objects.count(), len(market.upstream.requests)

    for seller in ("sol-three", "sol-two"):
        with capture(execute=True):
            refused = market.call("translate", market.pay("translate", seller=seller), api=buyer, seller=seller)
        _refused_as_failing(refused, settings, bound="buyer", failures=3)
    _refused_as_failing(market.call("translate", api=buyer), settings, bound="seller", failures=2)
    assert ChainTransaction.objects.count() == sent and len(market.upstream.requests) == called


def test_an_anonymous_payers_failed_invocations_are_counted_per_paying_wallet(
        market, settings, django_capture_on_commit_callbacks):
    """Without an API key the buyer party is the authorization's payer: its wallet's failed invocations are bounded
    (refused once its payment is read, before anything is relayed), and count for an agent paying from that wallet;
    another wallet (from another network) is served."""
    capture = django_capture_on_commit_callbacks
    settings.INVOCATION_FAILURES_PER_BUYER_SELLER = 2
    for _ in range(2):
        _failed_call(market, capture)
    sent, called = ChainTransaction.objects.count(), len(market.upstream.requests)

    with capture(execute=True):
        refused = market.call("translate", market.pay("translate"))

    _refused_as_failing(refused, settings, bound="seller", failures=2)
    # An agent paying from that wallet is that wallet's party too, whoever owns it.
    holder = Api(issue_key(AgentFactory(is_buyer=True, is_seller=False, wallet_address=market.buyer.address)))
    _refused_as_failing(market.call("translate", api=holder), settings, bound="seller", failures=2)
    assert ChainTransaction.objects.count() == sent and len(market.upstream.requests) == called
    other_wallet = market.chain.accounts.buyer2  # from another network: this one's anonymous payers are bounded too
    fund(market.chain, other_wallet.address, USDC)
    served = _served_call(market, capture, key=other_wallet.key, api=_from_client("198.51.100.7"))
    assert served.status_code == 200, served.content


def test_an_anonymous_payer_rotating_wallets_is_counted_per_client_network_too(
        market, settings, django_capture_on_commit_callbacks):
    """A fresh wallet costs nothing (the same USDC moved on): an anonymous payer's failed invocations also count per
    client network (IPv6: its /64), so a new wallet from that network is refused before anything is relayed. Another
    network's anonymous payer, and an agent with an API key calling from that network, are served."""
    capture = django_capture_on_commit_callbacks
    settings.INVOCATION_FAILURES_PER_BUYER_SELLER = 2
    here, same_network, elsewhere = "2001:db8:7:7::1", "2001:db8:7:7:ffff::9", "2001:db8:7:8::1"
    fresh = [market.chain.accounts.buyer2, market.chain.accounts.spare]
    _funded(market, *fresh)
    _failed_call(market, capture, api=_from_client(here))
    _failed_call(market, capture, api=_from_client(same_network), key=fresh[0].key)
    sent, called = ChainTransaction.objects.count(), len(market.upstream.requests)

    with capture(execute=True):
        refused = market.call("translate", market.pay("translate", key=fresh[1].key), api=_from_client(here))

    _refused_as_failing(refused, settings, bound="seller", failures=2)
    assert ChainTransaction.objects.count() == sent and len(market.upstream.requests) == called
    agent = AgentFactory(is_buyer=True, is_seller=False, wallet_address=fresh[1].address)
    for caller in (_from_client(elsewhere), _from_client(here, issue_key(agent))):
        served = _served_call(market, capture, api=caller, key=fresh[1].key)
        assert served.status_code == 200, served.content


def test_the_refusal_of_a_failing_seller_lifts_once_the_oldest_counted_failure_leaves_the_window(
        market, owner, settings, monkeypatch, django_capture_on_commit_callbacks):
    capture = django_capture_on_commit_callbacks
    settings.INVOCATION_FAILURES_PER_BUYER_SELLER = 2
    settings.INVOCATION_FAILURE_WINDOW = timedelta(seconds=120)
    buyer = Api(issue_key(AgentFactory(owner=owner, is_buyer=True, is_seller=False,
                                       wallet_address=market.buyer.address)))
    for _ in range(2):
        _failed_call(market, capture, api=buyer)
    retry_after = _refused_as_failing(market.call("translate", api=buyer), settings, bound="seller", failures=2)

    real_now = timezone.now
    monkeypatch.setattr(timezone, "now", lambda: real_now() + timedelta(seconds=retry_after - 5))
    _refused_as_failing(market.call("translate", api=buyer), settings, bound="seller", failures=2)
    monkeypatch.setattr(timezone, "now", lambda: real_now() + timedelta(seconds=retry_after))
    served = _served_call(market, capture, api=buyer)

    assert served.status_code == 200, served.content


def _with_payload(payment: str, change) -> str:
    """The signed payment with `change(payload)` applied to its decoded JSON (the signature left as it is)."""
    payload = json.loads(base64.b64decode(payment))
    change(payload)
    return _encoded(payload)


def _signed_elsewhere(market, **domain) -> str:
    """A payment for the skill's requirements whose signature is over another EIP-712 domain (chain id, token)."""
    payment = market.pay("translate")
    accepted = decode_payment_signature_header(payment).accepted
    requirements = accepted.model_copy(update={
        "network": f"eip155:{domain.get('chain_id', market.chain.chain_id)}",
        "asset": domain.get("token", accepted.asset),
        "extra": {**accepted.extra, "name": domain.get("name", accepted.extra["name"])}})
    other = sign_authorization(requirements, market.buyer.key, valid_before=market.chain.now() + 300)
    return _with_payload(other, lambda p: p.update(accepted=json.loads(base64.b64decode(payment))["accepted"]))


def _high_s(payment: str) -> str:
    """The same authorization signed with the malleable twin of its signature (s' = n - s, v flipped): the same
    signer recovers from it, and OpenZeppelin's ECDSA (the token's) refuses it."""
    n = 0xFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFEBAAEDCE6AF48A03BBFD25E8CD0364141
    signature = bytes.fromhex(decode_payment_signature_header(payment).payload["signature"][2:])
    s = n - int.from_bytes(signature[32:64], "big")
    twin = signature[:32] + s.to_bytes(32, "big") + bytes([55 - signature[64]])
    return _with_payload(payment, lambda p: p["payload"].update(signature="0x" + twin.hex()))


@pytest.mark.parametrize("hostile, code", [
    (lambda m: "%%%" + "A" * 10, "malformed_payment"),
    (lambda m: base64.b64encode(b"x" * 3_000_000).decode(), "malformed_payment"),  # a 4 MB header
    (lambda m: _with_payload(m.pay("translate"), lambda p: p.update(resource={"url": "http://[::1/x"})),
     "wrong_resource"),  # urlsplit raises on it
    (lambda m: _with_payload(m.pay("translate"), lambda p: p["payload"]["authorization"].update(value="2e4")),
     "malformed_payment"),
    (lambda m: _with_payload(m.pay("translate"), lambda p: p["payload"]["authorization"].update(
        value=str(2**256 + PRICE))), "wrong_amount"),
    (lambda m: _with_payload(m.pay("translate"), lambda p: p["payload"]["authorization"].update(value=-PRICE)),
     "malformed_payment"),  # no uint256
    (lambda m: _with_payload(m.pay("translate"), lambda p: p["accepted"].update(network="eip155:1")),
     "wrong_network"),
    (lambda m: _with_payload(m.pay("translate"), lambda p: p["accepted"].update(scheme="upto")),
     "unsupported_scheme"),
    (lambda m: _with_payload(m.pay("translate"), lambda p: p["accepted"].update(asset="0x" + "11" * 20)),
     "wrong_asset"),
    (lambda m: _with_payload(m.pay("translate"), lambda p: p.update(x402Version=1)), "malformed_payment"),
    (lambda m: _signed_elsewhere(m, chain_id=1), "invalid_signature"),
    (lambda m: _signed_elsewhere(m, name="USDC"), "invalid_signature"),
    (lambda m: _signed_elsewhere(m, token="0x" + "11" * 20), "invalid_signature"),
    (lambda m: _high_s(m.pay("translate")), "invalid_signature"),
], ids=["not_base64", "huge", "unparsable_resource_url", "float_amount", "amount_past_uint256", "negative_amount",
        "other_network", "other_scheme", "other_asset", "x402_v1", "other_chain_id", "other_token_name",
        "other_token_address", "high_s"])
def test_hostile_payment_headers_are_402_with_a_code_and_write_nothing(market, hostile, code):
    payment = hostile(market)
    before = market.balances()

    response = market.call("translate", payment)

    assert (response.status_code, response.json()["error"]) == (402, code), response.content
    assert market.upstream.requests == [] and market.balances() == before
    assert not SkillInvocation.objects.exists() and not ChainTransaction.objects.exists()


@pytest.mark.postgres
@pytest.mark.django_db(transaction=True)
def test_one_signed_payment_posted_twice_at_once_runs_and_charges_once(market):
    """Both requests pass the replay read and the simulation before either records the authorization: the unique
    (token, payer, nonce) decides, on PostgreSQL with one connection per thread."""
    market.upstream.responses.extend([(200, {"translation": "bonjour"})] * 2)
    payment = market.pay("translate")
    buyer = usdc_balance(market.chain, market.buyer.address)
    barrier = threading.Barrier(2)
    answers: list = [None, None]

    def post(index: int) -> None:
        try:
            api = Api()
            barrier.wait()
            answers[index] = api.post("/agents/sol/translate", {"input": {"text": "hello"}},
                                      headers={"X-Payment-Signature": payment})
        finally:
            connections.close_all()

    threads = [threading.Thread(target=post, args=(index,)) for index in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()

    statuses = sorted((answer.status_code, answer.json().get("error") if answer.status_code == 402 else None)
                      for answer in answers)
    assert statuses == [(200, None), (402, "authorization_already_used")], [a.content for a in answers]
    assert len(market.upstream.requests) == 1
    assert SkillInvocation.objects.count() == 1 and ChainTransaction.objects.filter(
        purpose="invocation_payment").count() == 1
    assert usdc_balance(market.chain, market.buyer.address) == buyer - PRICE


class Redirected(BaseHTTPRequestHandler):
    """Where a hostile seller redirects the platform's call: records whoever comes."""

    requests: list[str] = []

    def do_POST(self):
        Redirected.requests.append(self.path)
        self.send_response(200)
        self.end_headers()

    do_GET = do_POST


@pytest.mark.parametrize("answer", ["redirect_to_a_private_address", "invalid_json", "too_large", "gzip_bomb",
                                    "html_error_page"])
def test_a_hostile_sellers_answer_fails_the_invocation_refunds_the_buyer_and_pays_the_seller_nothing(
        market, answer, settings, django_capture_on_commit_callbacks):
    limit = settings.UPSTREAM_ANSWER_MAX_BYTES
    with serving(Redirected) as elsewhere:
        market.upstream.responses.append({
            "redirect_to_a_private_address": (302, b"", 0, {"Location": f"{elsewhere}/internal"}),
            "invalid_json": (200, b'{"translation": "bonj'),
            "too_large": (200, b'{"translation": "' + b"x" * limit + b'"}'),
            "gzip_bomb": (200, gzip.compress(b'{"translation": "' + b"0" * (32 * limit) + b'"}'), 0,
                          {"Content-Encoding": "gzip"}),
            "html_error_page": (200, b"<html>Bad gateway</html>", 0, {"Content-Type": "text/html"}),
        }[answer])
        payment = market.pay("translate")
        before = market.balances()

        with django_capture_on_commit_callbacks(execute=True):
            response = market.call("translate", payment)
        confirm_all(django_capture_on_commit_callbacks)  # the treasury's refund

        assert Redirected.requests == []
    assert (response.status_code, response.json()["error"]["code"]) == (502, "invocation_failed"), response.content
    assert market.balances() == before
    assert not ChainTransaction.objects.filter(purpose="invocation_payout").exists()
    invocation = market.caller.get(f"/services/{response.json()['error']['details']['invocation_id']}").json()
    assert invocation["status"] == "failed" and invocation["payment"]["status"] == "refunded", invocation
    assert invocation["result"] is None


def test_a_paid_call_while_the_node_does_not_answer_is_503_and_records_nothing(market, monkeypatch):
    """The payment is checked against the chain (the payer's balance, the transfer's simulation) before anything is
    recorded: a node that does not answer then is 503 chain_unavailable, as everywhere else, not a 500."""
    payment = market.pay("translate")

    def unavailable(fn):
        raise gateway.RpcUnavailable("read timed out")

    monkeypatch.setattr(gateway, "call", unavailable)
    response = market.call("translate", payment)

    assert (response.status_code, error_code(response)) == (503, "chain_unavailable"), response.content
    # The 402 of a process that has not read the token's EIP-712 domain yet (it names it in `extra`).
    gateway._token_domain.cache_clear()
    unpaid = market.call("translate")
    assert (unpaid.status_code, error_code(unpaid)) == (503, "chain_unavailable"), unpaid.content
    assert market.upstream.requests == []
    assert not SkillInvocation.objects.exists() and not ChainTransaction.objects.exists()


@pytest.mark.parametrize("server_clock, window, code", [
    (-600, {"valid_before": -60}, "authorization_expired"),  # valid by a server 10 min behind, not by the chain
    (3600, {"valid_after": 1800, "valid_before": 3700}, "authorization_not_yet_valid"),  # a server an hour ahead
])
def test_an_authorization_outside_its_window_by_the_chains_clock_is_402_whatever_the_servers_clock_says(
        market, monkeypatch, server_clock, window, code):
    chain_now = market.chain.now()
    payment = market.pay("translate", valid_before=chain_now + window.get("valid_before", 300))
    if "valid_after" in window:
        payment = _resigned(market, payment, valid_after=chain_now + window["valid_after"])
    monkeypatch.setattr(x402_protocol, "time", SimpleNamespace(time=lambda: time.time() + server_clock))
    before = market.balances()

    response = market.call("translate", payment)

    assert (response.status_code, response.json()["error"]) == (402, code), response.content
    assert market.upstream.requests == [] and market.balances() == before
    assert not SkillInvocation.objects.exists() and not ChainTransaction.objects.exists()


def _resigned(market, payment: str, **window) -> str:
    """The payment's authorization with another validity window, signed again by the buyer."""
    decoded = decode_payment_signature_header(payment)
    authorization = {**decoded.payload["authorization"], **{
        {"valid_after": "validAfter", "valid_before": "validBefore"}[name]: str(value) for name, value in window.items()}}
    typed = typed_data.transfer_with_authorization(
        chain_id=market.chain.chain_id, token_address=market.chain.usdc.address, from_address=authorization["from"],
        to_address=authorization["to"], value=int(authorization["value"]), valid_after=int(authorization["validAfter"]),
        valid_before=int(authorization["validBefore"]), nonce=authorization["nonce"],
        token_name=decoded.accepted.extra["name"], token_version=decoded.accepted.extra["version"])
    signature = typed_data.sign_typed_data(market.buyer.key, typed)
    return _with_payload(payment, lambda p: p["payload"].update(authorization=authorization, signature=signature))


def test_a_node_error_while_the_paid_call_waits_for_its_payment_is_202_with_the_invocation_not_a_500(
        market, monkeypatch, settings, django_capture_on_commit_callbacks):
    """The payment is recorded and queued before the request waits for it (submitting it itself): a node answering
    that wait with an error of its own (a provider's JSON-RPC error, not a time-out) raised out of the view, a 500
    naming no invocation for a payment that the relayer then sent and the seller ran."""
    settings.INVOCATION_PAYMENT_WAIT_SECONDS = 1
    market.upstream.responses.append((200, {"translation": "bonjour"}))
    payment = market.pay("translate")
    simulate = gateway.simulate

    def node_error(**transaction):
        raise gateway.ChainError("header not found")

    monkeypatch.setattr(gateway, "simulate", node_error)
    with django_capture_on_commit_callbacks(execute=True):
        response = market.call("translate", payment)

    assert response.status_code == 202, response.content
    invocation_id = response.json()["invocation_id"]
    monkeypatch.setattr(gateway, "simulate", simulate)
    with django_capture_on_commit_callbacks(execute=True):  # the worker's submission, the node answering again
        relayer.transaction_submit(transaction_id=ChainTransaction.objects.get(purpose="invocation_payment").pk)
    for _ in range(3):  # the payment confirmed, the skill run, its payout
        confirm_all(django_capture_on_commit_callbacks)
    assert market.caller.get(f"/services/{invocation_id}").json()["status"] == "completed"


def test_a_payment_valid_far_longer_than_the_402_asked_is_refused(market):
    """A skill's 402 asks for an authorization valid INVOCATION_AUTHORIZATION_SECONDS (what x402 clients sign); one
    valid for years was taken, and a failed payment's authorization is watched by the relayer until its validBefore:
    for years. Refused (402 `payment_valid_too_long`), nothing recorded, as a direct purchase's is."""
    before = market.balances()
    payment = market.pay("translate", valid_before=market.chain.now() + 10 * 365 * 24 * 3600)

    response = market.call("translate", payment)

    assert (response.status_code, response.json()["error"]) == (402, "payment_valid_too_long"), \
        response.content
    assert market.upstream.requests == [] and market.balances() == before
    assert not SkillInvocation.objects.exists() and not ChainTransaction.objects.exists()


def test_a_skill_priced_above_a_since_lowered_platform_limit_is_400_before_any_quote_or_payment(market, settings):
    """A price published under a higher AGREEMENT_MAX_AMOUNT was still quoted and paid once the operator lowered it:
    only publishing checked the ceiling. Refused as a proposal above it is (400 `amount_too_large`), nothing
    recorded, relayed or sent to the seller."""
    payment = market.pay("translate")  # signed while the price was within the limit
    settings.AGREEMENT_MAX_AMOUNT = PRICE - 1

    for signed in (None, payment):
        refused = market.call("translate", signed)
        assert refused.status_code == 400, refused.content
        assert error_code(refused) == "amount_too_large"
        assert refused.json()["error"]["details"] == {"max_amount_atomic": PRICE - 1}
    assert not SkillInvocation.objects.exists() and not ChainTransaction.objects.exists()
    assert market.upstream.requests == []
    settings.AGREEMENT_MAX_AMOUNT = PRICE
    assert market.call("translate").status_code == 402  # at the limit: quoted


@pytest.mark.parametrize("drift", [-SERVER_CLOCK_DRIFT, SERVER_CLOCK_DRIFT], ids=["server_behind", "server_ahead"])
def test_a_payment_valid_on_the_chains_clock_is_taken_whatever_the_servers_clock_says(
        market, monkeypatch, drift, django_capture_on_commit_callbacks):
    """The payment's window was checked against the server's clock only: one drifted 700 s from the chain's (which
    the token contract checks, and the buyer signed by) refused every well-signed payment, 402
    `payment_valid_too_long` when behind, `authorization_expired` when ahead."""
    market.upstream.responses.append((200, {"translation": "bonjour"}))
    payment = market.pay("translate", valid_before=market.chain.now() + 300)  # as x402 clients sign: now + 300
    buyer, seller, treasury = market.balances()
    server_clock_drifted(monkeypatch, drift)

    with django_capture_on_commit_callbacks(execute=True):
        response = market.call("translate", payment)

    assert response.status_code == 200, response.content
    assert market.balances()[0] == buyer - PRICE


def test_a_payment_expired_on_the_chains_clock_is_refused_though_the_server_clock_is_behind(market, monkeypatch):
    payment = market.pay("translate", valid_before=market.chain.now() + 3)
    server_clock_drifted(monkeypatch, -SERVER_CLOCK_DRIFT)
    market.chain.increase_time(10)

    response = market.call("translate", payment)
    assert response.status_code == 402 and response.json()["error"] == "authorization_expired", response.content
    assert not SkillInvocation.objects.exists() and not ChainTransaction.objects.exists()


def test_a_bare_signature_of_a_quote_made_by_a_server_clock_behind_the_chains_pays(
        market, monkeypatch, django_capture_on_commit_callbacks):
    """The 402 quoted validBefore from the server's clock: 700 s behind the chain's, the quote had expired on the
    chain before it was handed out, and its bare signature was refused (402 `authorization_expired`)."""
    market.upstream.responses.append((200, {"translation": "bonjour"}))
    server_clock_drifted(monkeypatch, -SERVER_CLOCK_DRIFT)
    required = market.call("translate")
    assert int(required["X-Payment-Valid-Before"]) >= market.chain.now() + 300 - 5
    signature = _seed_signature(market, required, market.buyer.key, market.buyer.address)

    with django_capture_on_commit_callbacks(execute=True):
        response = market.caller.post("/agents/sol/translate", {"input": {"text": "hello"}}, headers={
            "X-Payment-Signature": signature, "X-Payment-From": market.buyer.address})
    assert response.status_code == 200, response.content


def test_unpaid_and_forged_calls_do_not_each_make_the_server_read_the_chain(market, monkeypatch):
    """Anyone may call a skill without paying, or with a payment it did not sign. Each unpaid call's 402 read the
    latest block (its quote counted from the chain's clock), and a forged payment whose window our clock refused read
    the node's pending and latest blocks before its signature was checked: an anonymous client made the server call
    the node once to four times per request, as fast as the rate limit let it. The quote's clock is read at most once
    a second per process, and the chain's clock is asked only about an authorization its payer signed."""
    from x402.http import encode_payment_signature_header

    payment = decode_payment_signature_header(market.pay("translate", valid_before=market.chain.now() - 60))
    signature = payment.payload["signature"]
    payment.payload["signature"] = signature[:-4] + ("00" if signature[-4:-2] != "00" else "11") + signature[-2:]
    forged = encode_payment_signature_header(payment)
    reads = []
    for name in ("latest_block_timestamp", "next_block_timestamp"):
        read = getattr(gateway, name)
        monkeypatch.setattr(gateway, name, lambda read=read, name=name: reads.append(name) or read())

    for _ in range(5):
        assert market.call("translate").status_code == 402
        refused = market.call("translate", forged)
        assert refused.status_code == 402 and refused.json()["error"] == "authorization_expired", refused.content

    assert len(reads) <= 1, reads


def test_a_node_behind_the_chain_has_no_payment_expired_on_the_chain_relayed_to_revert(
        market, settings, django_capture_on_commit_callbacks):
    """A payment expired a minute ago, refused by our clock, was judged again by the node's clock, which had a bound
    ahead (CHAIN_CLOCK_MAX_LEAD_SECONDS) but none behind: a node 900 s behind the chain took it, its simulation ran
    at that old time and passed, and the relayer sent it to be mined by the chain, where it reverted (the relayer's
    gas spent, the revert counted against the buyer). A node further behind our clock than CHAIN_CLOCK_MAX_LAG_SECONDS
    judges no authorization: 503 `chain_unavailable` (`node_behind`), nothing recorded or sent."""
    settings.CHAIN_CLOCK_MAX_LAG_SECONDS = 30
    payment = market.pay("translate", valid_before=max(market.chain.now(), int(time.time())) - 60)
    before = market.balances()

    with node_behind(market.chain.node.rpc_url, settings, 900), django_capture_on_commit_callbacks(execute=True):
        response = market.call("translate", payment)

    assert (response.status_code, error_code(response)) == (503, "chain_unavailable"), [
        (tx.status, tx.mined_tx_hash, tx.failure_reason) for tx in ChainTransaction.objects.all()] or response.content
    assert response.json()["error"]["details"] == {"reason": "node_behind", "max_lag_seconds": 30}
    assert not ChainTransaction.objects.exists() and not RelayRevert.objects.exists()
    assert market.upstream.requests == [] and market.balances() == before


def test_a_skill_run_put_off_again_and_again_waits_longer_each_time_up_to_a_cap(
        market, monkeypatch, settings, django_capture_on_commit_callbacks):
    """A run beyond its seller's shares in flight was queued again 5 to 10 s later, again and again, for as long as
    the seller's calls under way held them (a skill's limit is up to an hour): each pending invocation a task, a
    transaction and a slot check every few seconds all that time. Each put-off now waits twice the last, up to
    OUTBOUND_PUT_OFF_MAX_SECONDS (then up to twice that, jittered), still pending; the sweep queues none beside it."""
    settings.SELLER_CALLS_IN_FLIGHT_PER_HOST, settings.OUTBOUND_PUT_OFF_SECONDS = 1, 5.0
    settings.OUTBOUND_PUT_OFF_MAX_SECONDS = 300
    payment = market.pay("render")
    countdowns = []
    with monkeypatch.context() as patched:
        patched.setattr(run_invocation, "delay", lambda *args: None)
        patched.setattr(run_invocation, "apply_async", lambda args, countdown=0, **_: countdowns.append(countdown))
        with django_capture_on_commit_callbacks(execute=True):
            assert market.call("render", payment).status_code == 202
        invocation = SkillInvocation.objects.select_related("skill__service", "seller").get()
        countdowns.clear()
        with outbound_slots.held(invocations.call_shares(invocation), lease_seconds=60) as held:
            assert held  # the seller's calls under way, never answering
            for _ in range(10):
                with django_capture_on_commit_callbacks(execute=True):
                    run_invocation(str(invocation.pk))
    invocation.refresh_from_db()
    assert (invocation.status, len(countdowns)) == ("pending", 10)
    assert all(5 * 2 ** n <= wait <= 10 * 2 ** n for n, wait in enumerate(countdowns[:6])), countdowns
    assert all(300 <= wait <= 600 for wait in countdowns[6:]), countdowns
    assert invocations.invocations_sweep(now=timezone.now() + timedelta(seconds=290))["orphans"] == 0
