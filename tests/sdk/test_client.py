"""The SDK client against the real API: a live HTTP server, the Anvil chain and the relayer.

`live_server` serves the API from a thread over a transactional test database, so `transaction.on_commit` fires
for real: activate-escrow's `submit_transaction` runs inline (Celery is eager in tests) and broadcasts to Anvil.
Confirmations need the relayer's poll, which `relayer_polling` runs in a background thread, as beat would.
"""

import threading
import uuid
from contextlib import contextmanager
from datetime import timedelta

import httpx
import pytest
from django.db import connections
from django.utils import timezone

from escrow import relayer, settlement
import sdk
from sdk import MarketplaceClient, MarketplaceError
from tests.catalog.factories import AgentFactory, issue_key, service_data
from tests.escrow.flow import USDC, fund, network_of, pay_fees, usdc_balance


def agent_client(base_url: str, *, wallet: str | None = None, buyer: bool = True, seller: bool = False,
                 chain=None, **client_options) -> MarketplaceClient:
    """A new agent (committed: the server thread sees it) and a client holding its API key; with `chain`, the
    client pins the test deployment and reads the chain through the Anvil node, as a buyer's SDK would."""
    agent = AgentFactory(is_buyer=buyer, is_seller=seller, **({"wallet_address": wallet} if wallet else {}))
    if chain is not None:
        client_options = {"network": network_of(chain), "rpc_url": chain.node.rpc_url, **client_options}
    return MarketplaceClient(base_url, issue_key(agent), timeout=15, **client_options)


@contextmanager
def relayer_polling(interval: float = 0.2):
    """Run the relayer's confirmation poll every `interval` seconds in a thread while the block runs."""
    stop = threading.Event()
    errors: list[BaseException] = []

    def poll() -> None:
        try:
            while not stop.is_set():
                relayer.transactions_poll()
                stop.wait(interval)
        except BaseException as exc:  # noqa: BLE001 - handed to the test thread below
            errors.append(exc)
        finally:
            connections.close_all()  # this thread's connection would block the test database's flush

    thread = threading.Thread(target=poll, name="relayer-poll", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join(timeout=30)
        if errors:
            raise RuntimeError("the relayer poll failed") from errors[0]


@pytest.mark.chain
def test_propose_accept_activate_and_wait_until_active(live_server, escrow_chain):
    chain = escrow_chain
    buyer_wallet, seller_wallet = chain.accounts.buyer, chain.accounts.seller
    fee_recipient, escrow_address = chain.accounts.fee_recipient.address, chain.addresses["escrow"]
    fund(chain, buyer_wallet.address, 10 * USDC)

    with agent_client(live_server.url, wallet=buyer_wallet.address, chain=chain) as buyer, \
            agent_client(live_server.url, wallet=seller_wallet.address, buyer=False, seller=True) as seller:
        service = seller.register_service(**service_data())  # 0.02 USDC per call
        assert [found["id"] for found in buyer.search_services("translator")] == [service["id"]]
        proposed = buyer.propose_agreement(service["id"], 100, max_unit_price_atomic=20_000, expires_at=timezone.now() + timedelta(days=2))
        assert proposed["status"] == "proposed"
        assert proposed["deposit_amount_atomic"] == 2 * USDC and proposed["infra_fee_atomic"] == 100_000
        assert seller.accept_agreement(proposed["id"])["status"] == "accepted"
        before = [usdc_balance(chain, a) for a in (buyer_wallet.address, fee_recipient, escrow_address)]

        with relayer_polling():
            submitted = buyer.activate_escrow(proposed, buyer_wallet.key)
            assert submitted["status"] == "submitting"
            active = buyer.wait_until(proposed["id"], timeout=60, poll_interval=0.2)

        assert active["status"] == "active" and active["activated_at"]
        assert seller.get_agreement(proposed["id"])["status"] == "active"
        status = buyer.escrow_status(proposed["id"], verify=True)
        assert status["onchain"]["state"] == "active"
        assert int(status["onchain"]["depositAmount"]) == 2 * USDC
        assert [tx["status"] for tx in status["transactions"]] == ["confirmed"]
        assert status["activation_tx_hash"] == status["transactions"][0]["tx_hash"]
    pay_fees(chain)  # the fee accrued in the escrow goes to the fee recipient
    after = [usdc_balance(chain, a) for a in (buyer_wallet.address, fee_recipient, escrow_address)]
    assert after == [before[0] - 2 * USDC - 100_000, before[1] + 100_000, before[2] + 2 * USDC]


def test_api_errors_raise_marketplace_error_with_the_api_code(live_server):
    with agent_client(live_server.url) as buyer, \
            agent_client(live_server.url, buyer=False, seller=True) as seller:
        service = seller.register_service(**service_data())
        proposed = buyer.propose_agreement(service["id"], 10, max_unit_price_atomic=20_000)
        seller.reject_agreement(proposed["id"], "not now")

        with pytest.raises(MarketplaceError) as illegal:
            seller.accept_agreement(proposed["id"])
        assert (illegal.value.status, illegal.value.code) == (409, "invalid_transition")
        assert illegal.value.details == {"status": "rejected", "requested": "accepted"}

        with pytest.raises(MarketplaceError) as missing:
            buyer.get_agreement(uuid.uuid4())
        assert (missing.value.status, missing.value.code) == (404, "agreement_not_found")

        with pytest.raises(MarketplaceError) as invalid:
            buyer.propose_agreement(service["id"], 0, max_unit_price_atomic=20_000)
        assert (invalid.value.status, invalid.value.code) == (400, "validation_error")
        assert "quantity" in invalid.value.details["fields"]

    with MarketplaceClient(live_server.url, "mk_not_a_key") as stranger, pytest.raises(MarketplaceError) as denied:
        stranger.me()
    assert denied.value.status == 401 and denied.value.code == "invalid_credentials"


def test_list_agreements_follows_cursors_lazily(live_server):
    with agent_client(live_server.url) as buyer, \
            agent_client(live_server.url, buyer=False, seller=True) as seller:
        service = seller.register_service(**service_data())
        proposed = [buyer.propose_agreement(service["id"], quantity, max_unit_price_atomic=20_000)["id"] for quantity in range(1, 6)]
        seller.reject_agreement(proposed[0])

        newest_first = list(reversed(proposed))
        assert [a["id"] for a in buyer.list_agreements(page_size=2)] == newest_first
        assert [a["id"] for a in seller.list_agreements(role="seller", page_size=1)] == newest_first
        assert [a["id"] for a in buyer.list_agreements(status="rejected")] == [proposed[0]]
        assert list(seller.list_agreements(role="buyer")) == []

        assert buyer.me()["roles"] == ["buyer"]
        requirements = buyer.payment_requirements(amount_cents=500)
        assert (requirements["amount_atomic"], requirements["fee_atomic"]) == (5 * USDC, 103_000)  # 2% + 0.003


def test_transient_failures_are_retried_with_the_same_idempotency_key(http_server):
    unavailable = {"error": {"code": "chain_unavailable", "message": "The chain RPC is unavailable.", "details": {}}}
    http_server.responses.extend([(503, unavailable), (503, unavailable), (201, {"id": "a1", "status": "proposed"})])
    with MarketplaceClient(http_server.url, "mk_key", retry_backoff=0) as client:
        assert client.propose_agreement("s1", 3, max_unit_price_atomic=20_000)["id"] == "a1"
    keys = {request.headers["Idempotency-Key"] for request in http_server.requests}
    assert len(http_server.requests) == 3 and len(keys) == 1

    http_server.requests.clear()
    http_server.responses.extend([(503, unavailable)] * 3)
    with MarketplaceClient(http_server.url, "mk_key", retry_backoff=0) as client, \
            pytest.raises(MarketplaceError) as gave_up:
        client.get_agreement("a1")
    assert (gave_up.value.status, gave_up.value.code, len(http_server.requests)) == (503, "chain_unavailable", 3)

    http_server.requests.clear()
    http_server.responses.append((409, {"error": {"code": "invalid_transition", "message": "no", "details": {}}}))
    with MarketplaceClient(http_server.url, "mk_key", retry_backoff=0) as client, pytest.raises(MarketplaceError):
        client.accept_agreement("a1")
    assert len(http_server.requests) == 1  # a decision, not a hiccup: never retried


def test_an_unreachable_server_raises_the_transport_error_after_retries():
    from escrow.devchain import free_port

    with MarketplaceClient(f"http://127.0.0.1:{free_port()}", "mk_key", retry_backoff=0) as client, \
            pytest.raises(httpx.ConnectError):
        client.me()


@pytest.mark.chain
def test_metered_calls_verified_receipts_completion_and_challenge(live_server, escrow_chain, http_server):
    chain = escrow_chain
    buyer_wallet, seller_wallet = chain.accounts.buyer, chain.accounts.seller
    fund(chain, buyer_wallet.address, 10 * USDC)

    with agent_client(live_server.url, wallet=buyer_wallet.address, chain=chain) as buyer, \
            agent_client(live_server.url, wallet=seller_wallet.address, buyer=False, seller=True) as seller:
        service = seller.register_service(**{**service_data(), "upstream_base_url": http_server.url})
        agreement = buyer.propose_agreement(service["id"], 10, max_unit_price_atomic=20_000)  # 10 calls at 0.02 USDC
        agreement_id = agreement["id"]
        seller.accept_agreement(agreement_id)
        with relayer_polling():
            buyer.activate_escrow(agreement, buyer_wallet.key)
            active = buyer.wait_until(agreement_id, timeout=60, poll_interval=0.2)

            answers = [buyer.call_metered(agreement_id, "translate", method="POST", json={"text": str(n)})
                       for n in range(3)]
            assert [a.status_code for a in answers] == [200, 200, 200]
            assert [a.headers["X-Escrow-Remaining"] for a in answers] == ["180000", "160000", "140000"]
            seller.record_usage(agreement_id, [{"units": 1, "description": "offline job"}] * 2)
            verified = buyer.verify_usage(agreement)
            assert (verified.events, verified.cumulative_amount) == (5, 100_000)

            buyer.complete(agreement_id)
            with pytest.raises(MarketplaceError) as closed:
                buyer.call_metered(agreement_id, "translate")
            assert (closed.value.status, closed.value.code) == (409, "agreement_completing")
            settlement.settlement_tick()
            buyer.wait_until(agreement_id, statuses={"in_challenge"}, timeout=60, poll_interval=0.2)
            # complete(wait=True) (a repeat is a no-op) returns the agreement once the buyer's RPC shows its escrow
            # proposed, with the agreement's challenge deadline.
            completed = buyer.complete(agreement_id, wait=True, timeout=30, poll_interval=0.2)
            assert completed["status"] == "in_challenge" and completed["challenge_deadline"]
            # As fetched once active: the escrow's events are looked for from its activation transaction's block.
            assert active["activation_tx_hash"]
            assert buyer.verify_usage(active).usage_digest == buyer.escrow_status(
                agreement_id, verify=True)["onchain"]["usageDigest"]
            # A hash the node refuses is no hint: the search starts at the pinned deployment block.
            assert buyer.verify_usage({**active, "activation_tx_hash": "0xnot-a-hash"}).events == 5

            buyer.challenge(agreement, buyer_wallet.key, "two offline jobs never arrived")
            assert buyer.wait_until(agreement_id, statuses={"disputed"}, timeout=60, poll_interval=0.2)

        with pytest.raises(MarketplaceError) as wrong_key:
            seller.challenge(agreement, seller_wallet.key, "not mine to dispute")
        assert wrong_key.value.status in (403, 404, 409)


class _LosesTheFirstProxiedAnswer(httpx.HTTPTransport):
    """Hands the first metered call to the marketplace, then loses its answer on the way back, as a connection
    closed mid-answer (a network blip, a web server reloading) does."""

    lost = 0

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        response = super().handle_request(request)
        if "/metered-proxy/" in request.url.path and not self.lost:
            self.lost += 1
            response.read()
            response.close()
            raise httpx.RemoteProtocolError("Server disconnected without sending a response.", request=request)
        return response


def test_a_metered_call_with_a_nonce_is_retried_and_charged_once(live_server, escrow_chain, http_server):
    chain = escrow_chain
    fund(chain, chain.accounts.buyer.address, 10 * USDC)
    lossy = _LosesTheFirstProxiedAnswer()
    with agent_client(live_server.url, wallet=chain.accounts.buyer.address, chain=chain, transport=lossy,
                      retry_backoff=0.01) as buyer, \
            agent_client(live_server.url, wallet=chain.accounts.seller.address, buyer=False, seller=True) as seller:
        service = seller.register_service(**{**service_data(), "upstream_base_url": http_server.url})
        agreement = buyer.propose_agreement(service["id"], 10, max_unit_price_atomic=20_000)  # 10 calls at 0.02 USDC
        seller.accept_agreement(agreement["id"])
        with relayer_polling():
            buyer.activate_escrow(agreement, chain.accounts.buyer.key)
            buyer.wait_until(agreement["id"], timeout=60, poll_interval=0.2)

        answer = buyer.call_metered(agreement["id"], "translate", method="POST", json={"text": "hi"},
                                    request_nonce="translate-1")
        assert (answer.status_code, answer.headers["X-Replayed"]) == (200, "true")  # the first call's answer
        assert answer.headers["X-Escrow-Remaining"] == "180000"  # charged once
        assert len(http_server.requests) == 1  # the seller served it once

        lossy.lost = 0  # lose the next answer too, of a call without a nonce: not retried
        with pytest.raises(httpx.RemoteProtocolError):
            buyer.call_metered(agreement["id"], "translate", method="POST", json={"text": "again"})
        assert len(http_server.requests) == 2


def test_the_sdk_names_its_own_version_to_the_marketplace():
    seen = []
    client = MarketplaceClient("https://marketplace.example", "mk_test", transport=httpx.MockTransport(
        lambda request: seen.append(request.headers["User-Agent"]) or httpx.Response(200, json={})))
    client.me()
    assert seen == [f"agent-escrow-marketplace-sdk/{sdk.__version__}"]  # it said 0.1 whatever its version


def test_a_failed_agreement_names_its_machine_readable_code():
    """`wait_until`'s AgreementFailed gave only the prose reason: a caller branched on its text. It carries the
    agreement's `status_code` too (empty when the marketplace gives none, as an older one does)."""
    failed = sdk.AgreementFailed({"id": "a1", "status": "payment_failed", "status_code": "fee_permit_stale",
                                  "status_reason": "payment cannot run, nothing was charged: fee_permit_stale: ..."})
    assert failed.code == "fee_permit_stale" and failed.status == "payment_failed"
    assert sdk.AgreementFailed({"id": "a2", "status": "expired"}).code == ""
