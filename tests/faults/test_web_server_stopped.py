"""The web server stops or reloads (a deploy, a scale-down). Its workers give back the calls they leased
(agreements.metering, "Call leases") as they stop, so the buyer's budget is not held, and a completion not kept
waiting, until the reaper's grace has passed. A reload (SIGHUP) replaces the workers one by one, each once its
successor listens (marketplace.serve.Server): no connection is refused meanwhile; a successor that dies first
(new code that does not load) leaves the old worker serving."""

import os
import signal
import time

import pytest

from agreements.models import CallIntent, UsageAgreement
from tests.faults.conftest import assert_books_balance, web_answers
from tests.faults.processes import wait_until
from tests.faults.test_dependencies_down import active_agreement

pytestmark = [pytest.mark.slow, pytest.mark.faults, pytest.mark.chain, pytest.mark.postgres,
              pytest.mark.django_db(transaction=True)]


@pytest.fixture
def stack_env() -> dict:
    # Leases that outlast the test: only the stopping worker can give them back (the reaper's grace grows with them).
    return {"PROXY_CALL_LEASE_SECONDS": "300"}


def test_a_stopping_web_server_gives_back_the_calls_it_leased(stack, parties, upstream):
    with stack.api(parties.buyer_api.secret) as api:
        agreement = active_agreement(stack, api, parties, quantity=1_000)
        for _ in range(4):  # leases of 1, 2 and 4 calls: the last one holds 3 more
            assert api.get(f"/metered-proxy/{agreement['id']}/work").status_code == 200
    price = parties.service.unit_price
    assert UsageAgreement.objects.get(pk=agreement["id"]).reserved == 3 * price

    stack.worker.terminate()  # no reaper from here on
    stack.worker.wait_stopped()
    stack.web.terminate()
    stack.web.wait_stopped()

    assert not CallIntent.objects.filter(agreement_id=agreement["id"]).exists()
    assert_books_balance(agreement["id"])  # nothing reserved, every served call charged once
    assert UsageAgreement.objects.get(pk=agreement["id"]).used == 4 * price == upstream.served * price


def test_a_reloading_web_server_refuses_no_connection(stack):
    workers = stack.web.children()
    os.kill(stack.web.process.pid, signal.SIGHUP)  # granian: replace every worker
    refused, started = [], time.monotonic()
    while True:  # until no worker of before is left and the new ones answer
        assert time.monotonic() - started < 60, "the workers were not replaced within 60 s"
        replaced = not stack.web.children() & workers
        if web_answers(stack.url, timeout=5):
            if replaced:
                break
        else:
            refused.append(round(time.monotonic() - started, 2))
        time.sleep(0.02)
    assert refused == [], f"connections refused or unanswered at {refused} s after SIGHUP"


def test_a_reload_keeps_the_old_worker_until_a_slow_new_one_listens(stack):
    """A new worker that takes longer to load the application than granian's respawn interval (a loaded machine, a
    cold disk): the old one goes on serving until its successor listens, so no connection is refused."""
    workers = stack.web.children()
    os.kill(stack.web.process.pid, signal.SIGHUP)
    successor = wait_until(lambda: stack.web.children() - workers, timeout=10, interval=0.005, what="a new worker")
    for pid in successor:
        os.kill(pid, signal.SIGSTOP)  # it loads no further until we say so
    try:
        loading_until = time.monotonic() + 8
        while time.monotonic() < loading_until:
            assert web_answers(stack.url, timeout=5), "refused while the new worker was loading"
            time.sleep(0.1)
    finally:
        for pid in successor:
            os.kill(pid, signal.SIGCONT)
    wait_until(lambda: not stack.web.children() & workers, timeout=30, what="the old worker stopped")
    assert web_answers(stack.url, timeout=5)


def test_a_reload_whose_new_worker_dies_keeps_the_old_one_serving(stack):
    """New code that does not load (its worker dies before it listens): the old worker goes on serving the old
    code, and a later reload replaces it as usual."""
    workers = stack.web.children()
    os.kill(stack.web.process.pid, signal.SIGHUP)
    successor = wait_until(lambda: stack.web.children() - workers, timeout=10, interval=0.005, what="a new worker")
    for pid in successor:
        os.kill(pid, signal.SIGKILL)  # as an import error would end it
    serving_until = time.monotonic() + 8
    while time.monotonic() < serving_until:
        assert web_answers(stack.url, timeout=5), "nothing serves after a reload whose new worker died"
        time.sleep(0.1)
    assert stack.web.children() == workers  # the old worker, and no new one started in a loop

    os.kill(stack.web.process.pid, signal.SIGHUP)  # the next deploy
    wait_until(lambda: stack.web.children() and not stack.web.children() & workers, timeout=30,
               what="the old worker replaced")
    assert web_answers(stack.url, timeout=5)
