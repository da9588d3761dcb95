"""The fault suite's stack: web server, Celery worker + beat, a private Redis and a relay in front of Anvil, all
real processes on the test database (transactional tests, so what one process commits the others see)."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from django.core.management import call_command
from django.db import connection
from django.db.models import Sum

from agreements.models import UsageAgreement, UsageEvent
from escrow.models import ChainTransaction, TxAttempt
from tests.escrow.flow import Parties
from tests.faults.processes import (RedisServer, Service, Upstream, celery_worker, free_port,
                                    wait_until, web_server)
from tests.support.rpc_relay import RpcRelay


@pytest.fixture
def redis_server():
    server = RedisServer().start()
    yield server
    server.stop()


@pytest.fixture
def chain_relay(escrow_chain):
    relay = RpcRelay(escrow_chain.node.rpc_url).start()
    yield relay
    relay.release()
    relay.stop()


def database_url(application_name: str) -> str:
    db = connection.settings_dict
    password = f":{db['PASSWORD']}" if db["PASSWORD"] else ""
    return (f"postgres://{db['USER']}{password}@{db['HOST'] or '127.0.0.1'}:{db['PORT'] or 5432}/{db['NAME']}"
            f"?application_name={application_name}")


@dataclass
class Stack:
    chain: object
    redis: RedisServer
    relay: RpcRelay
    web: Service
    worker: Service
    url: str
    log_dir: Path
    env: dict  # what the stack's processes run with: for a client command run against it

    def api(self, secret: str) -> httpx.Client:
        return httpx.Client(base_url=self.url, headers={"Authorization": f"Bearer {secret}"}, timeout=30)

    def start(self) -> None:
        """The web server and the worker, started side by side (each spends seconds loading Django)."""
        self.web.start()
        self.worker.start()
        self._web_ready()
        self._worker_ready()

    def stop(self) -> None:
        """Both, stopped side by side."""
        self.worker.terminate()
        self.web.terminate()
        self.worker.wait_stopped()
        self.web.wait_stopped()

    def start_worker(self) -> None:
        self.worker.start()
        self._worker_ready()

    def start_web(self) -> None:
        self.web.start()
        self._web_ready()

    def _worker_ready(self) -> None:
        wait_until(lambda: "ready." in self.worker.log(), timeout=60, what="the Celery worker")

    def _web_ready(self) -> None:
        wait_until(lambda: web_answers(self.url), timeout=30, what="the web server")

    def relayer_nonce(self) -> int:
        """Transactions the relayer has sent, as the chain counts them."""
        return self.chain.w3.eth.get_transaction_count(self.chain.accounts.deployer.address)

    def status(self, agreement_id) -> str:
        return UsageAgreement.objects.get(pk=agreement_id).status

    def wait_for_status(self, agreement_id, status: str, timeout: float = 60) -> None:
        wait_until(lambda: self.status(agreement_id) == status, timeout=timeout,
                   what=f"agreement {agreement_id} to be {status} (is {self.status(agreement_id)})\n"
                        f"--- worker log tail ---\n{self.worker.log()[-3000:]}")


@pytest.fixture
def stack_env() -> dict:
    """Settings a test module gives its stack on top of the suite's (override the fixture)."""
    return {}


@pytest.fixture
def stack(escrow_chain, redis_server, chain_relay, settings, tmp_path: Path, stack_env):
    port = free_port()
    common = {
        **os.environ, "DEBUG": "false", "SECRET_KEY": "fault-suite", "CELERY_TASK_ALWAYS_EAGER": "false",
        "CELERY_BROKER_URL": redis_server.url, "CELERY_VISIBILITY_TIMEOUT": "5",
        "CHAIN_RPC_URL": chain_relay.url, "CHAIN_ID": str(escrow_chain.chain_id), "CHAIN_RPC_TIMEOUT": "5",
        "USDC_ADDRESS": settings.USDC_ADDRESS, "USAGE_ESCROW_ADDRESS": settings.USAGE_ESCROW_ADDRESS,
        "ESCROW_DEPLOYMENT_BLOCK": str(settings.ESCROW_DEPLOYMENT_BLOCK), "INDEXER_POLL_SECONDS": "1",
        "RELAYER_PRIVATE_KEY": settings.RELAYER_PRIVATE_KEY,
        "RECEIPT_SIGNER_PRIVATE_KEY": settings.RECEIPT_SIGNER_PRIVATE_KEY, "FEE_RECIPIENT": settings.FEE_RECIPIENT,
        "CHAIN_POLL_SECONDS": "1", "SETTLEMENT_TICK_SECONDS": "1", "CHAIN_SWEEP_SECONDS": "2",
        "CHAIN_SWEEP_AFTER_SECONDS": "3", "PROXY_TIMEOUT_SECONDS": "3", "PROXY_CONNECT_TIMEOUT_SECONDS": "2",
        "PROXY_INTENT_GRACE_SECONDS": "2", "PROXY_INTENT_REAP_SECONDS": "1", "MASUMI_AVAILABILITY_POLL_SECONDS": "1",
        "ALLOW_PRIVATE_UPSTREAMS": "true",  # the test upstream listens on loopback
        **stack_env,
    }
    web = web_server({**common, "DATABASE_URL": database_url("faults-web")}, tmp_path, port)
    worker = celery_worker({**common, "DATABASE_URL": database_url("faults-worker")}, tmp_path)
    stack = Stack(chain=escrow_chain, redis=redis_server, relay=chain_relay, web=web, worker=worker,
                  url=f"http://127.0.0.1:{port}", log_dir=tmp_path,
                  env={**common, "DATABASE_URL": database_url("faults-client")})
    stack.start()
    yield stack
    stack.stop()


def web_answers(url: str, timeout: float = 1) -> bool:
    """Whether the web server answers a request (on a connection of its own) within `timeout` seconds."""
    try:
        return httpx.get(f"{url}/agents/me", timeout=timeout).status_code == 401
    except httpx.HTTPError:
        return False


@pytest.fixture
def upstream():
    server = Upstream().start()
    yield server
    server.stop()


@pytest.fixture
def parties(escrow_chain, upstream):
    return Parties(escrow_chain, upstream_base_url=upstream.url)


def assert_books_balance(agreement_id) -> None:
    """No lost and no double-counted usage: the agreement's counters are the sum of its gap-free events."""
    agreement = UsageAgreement.objects.get(pk=agreement_id)
    events = UsageEvent.objects.filter(agreement=agreement).order_by("seq")
    assert agreement.reserved == 0
    assert agreement.used == (events.aggregate(total=Sum("cost"))["total"] or 0)
    assert [event.seq for event in events] == list(range(1, events.count() + 1))
    if events:
        assert events.last().cumulative == agreement.used


def assert_each_transaction_sent_once(agreement_id, purposes: list[str]) -> None:
    """One logical chain transaction per purpose, confirmed, every attempt of it sharing one nonce. (The indexer
    may have moved the agreement on the transaction's event before the relayer polled its receipt.)"""
    rows = ChainTransaction.objects.filter(agreement_id=agreement_id)
    wait_until(lambda: not rows.filter(status__in=["queued", "submitted", "mined"]).exists(), timeout=30,
               what=f"the relayer to confirm {purposes}")
    transactions = rows.order_by("created_at")
    assert [tx.purpose for tx in transactions] == purposes
    for tx in transactions:
        assert tx.status == "confirmed", (tx.purpose, tx.status, tx.failure_reason)
        assert set(TxAttempt.objects.filter(transaction=tx).values_list("nonce", flat=True)) == {tx.nonce}


def assert_reconciled() -> None:
    call_command("reconcile")  # raises CommandError on any difference between the database and the chain
