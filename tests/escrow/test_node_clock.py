"""The chain's clock as a misbehaving node answers it: block timestamps far ahead of ours. Deadlines handed out to
clients count from a pending time bounded as for a refusal; with CHAIN_CLOCK_MAX_LEAD_SECONDS (on by default on every
chain but the dev chain, whose tests move its time on purpose) no block's time is believed further than our clock
plus that lead, so nothing decided off-chain falls due early."""

import runpy
import time

import pytest

import marketplace.settings
from escrow import purchases
from escrow.models import ChainTransaction, TxPurpose
from tests.escrow.flow import Parties
from tests.escrow.test_masumi_purchases import INPUT, seller_service  # noqa: F401
from tests.escrow.test_settlement import call_n, funded, tick  # noqa: F401
from tests.support.rpc_relay import node_block_times

pytestmark = [pytest.mark.chain, pytest.mark.django_db]

A_YEAR = 365 * 24 * 3600
LEAD = 30


def test_a_node_answering_a_pending_block_a_year_ahead_hands_out_no_activation_deadline_a_year_ahead(
        escrow_chain, settings):
    """The activation package's deadline counted from the node's pending time, unbounded: one a year ahead handed out
    signatures valid for a year (the SDK refuses a deadline more than an hour away: no activation at all)."""
    parties = Parties(escrow_chain)
    agreement = parties.accepted_agreement(quantity=100)
    with node_block_times(escrow_chain.node.rpc_url, settings, pending=int(time.time()) + A_YEAR):
        package = parties.buyer_api.get(f"/usage-agreements/{agreement['id']}/activation-package")
    assert package.status_code == 200, package.content
    latest = max(escrow_chain.now(), int(time.time()))
    assert package.json()["deadline"] <= latest + settings.ACTIVATION_SIGNATURE_TTL + 60


def test_a_node_answering_a_pending_block_a_year_ahead_gives_a_masumi_purchase_no_timers_a_year_ahead(
        escrow_chain, seller_service, settings):  # noqa: F811
    """A Masumi purchase's timers counted from the node's pending time, unbounded: one a year ahead refused the
    purchase (its unlockTime more than 30 days past the chain's latest block), or, the latest block lying as well,
    locked the buyer's money for a year."""
    parties = Parties(escrow_chain, upstream_base_url=seller_service.url, upstream_protocol="masumi", skills=[])
    with node_block_times(escrow_chain.node.rpc_url, settings, pending=int(time.time()) + A_YEAR):
        created = parties.buyer_api.post("/purchase", {"network": "Preprod", "input_data": INPUT,
                                                       "agentIdentifier": str(parties.service.pk)})
    assert created.status_code == 200, created.content
    unlock = int(created.json()["data"]["unlockTime"]) // 1000
    assert unlock <= max(escrow_chain.now(), int(time.time())) + settings.MASUMI_PAY_BY_SECONDS + \
        settings.MASUMI_SUBMIT_RESULT_SECONDS + settings.MASUMI_UNLOCK_SECONDS + 60


def test_a_node_answering_a_latest_block_a_year_ahead_finalizes_nothing_early(
        funded, escrow_chain, settings, django_capture_on_commit_callbacks, caplog):  # noqa: F811
    """The settlement tick's clock was the node's latest block, unbounded: one a year ahead moved the agreement in
    challenge to settling and sent a finalize the contract refused (ChallengeWindowOpen), the relayer's gas burnt
    and the agreement stuck settling until an operator retried."""
    capture = django_capture_on_commit_callbacks
    settings.CHAIN_CLOCK_MAX_LEAD_SECONDS = LEAD
    call_n(funded, 3)
    funded.buyer_api.post(f"/usage-agreements/{funded.agreement_id}/complete")
    tick(capture)
    with node_block_times(escrow_chain.node.rpc_url, settings, latest=int(time.time()) + A_YEAR,
                          pending=int(time.time()) + A_YEAR):
        assert tick(capture)["finalizing"] == 0
    assert "ahead of our clock by more than CHAIN_CLOCK_MAX_LEAD_SECONDS" in caplog.text
    assert funded.agreement(funded.agreement_id)["status"] == "in_challenge"
    assert not ChainTransaction.objects.filter(agreement_id=funded.agreement_id, purpose=TxPurpose.FINALIZE).exists()


def test_a_node_answering_a_latest_block_a_year_ahead_expires_no_masumi_purchase_early(
        escrow_chain, seller_service, settings, django_capture_on_commit_callbacks):  # noqa: F811
    """The purchases tick's clock was the node's latest block, unbounded: one a year ahead expired a purchase unfunded
    while its buyer's signed intent could still be mined before payByTime."""
    settings.CHAIN_CLOCK_MAX_LEAD_SECONDS = LEAD
    parties = Parties(escrow_chain, upstream_base_url=seller_service.url, upstream_protocol="masumi", skills=[])
    created = parties.buyer_api.post("/purchase", {"network": "Preprod", "input_data": INPUT,
                                                   "agentIdentifier": str(parties.service.pk)}).json()["data"]
    with node_block_times(escrow_chain.node.rpc_url, settings, latest=int(time.time()) + A_YEAR,
                          pending=int(time.time()) + A_YEAR):
        with django_capture_on_commit_callbacks(execute=True):
            assert purchases.purchases_tick()["expired"] == 0
    assert parties.agreement(created["agreementId"])["status"] != "expired"


@pytest.mark.parametrize(("environment", "lead"), [
    ({}, None),  # the dev chain (31337): its tests move its time forward on purpose
    ({"CHAIN_ID": "8453"}, 30),  # Base
    ({"CHAIN_ID": "84532"}, 30),  # Base Sepolia
    ({"CHAIN_ID": "8453", "CHAIN_CLOCK_MAX_LEAD_SECONDS": "5"}, 5),
    ({"CHAIN_CLOCK_MAX_LEAD_SECONDS": "30"}, 30),
])
def test_block_times_are_bounded_by_default_off_the_dev_chain(monkeypatch, environment, lead):
    for name in ("CHAIN_ID", "CHAIN_CLOCK_MAX_LEAD_SECONDS", "CHAIN_CLOCK_MAX_LAG_SECONDS"):
        monkeypatch.delenv(name, raising=False)
    for name, value in environment.items():
        monkeypatch.setenv(name, value)
    configured = runpy.run_path(marketplace.settings.__file__)
    assert configured["CHAIN_CLOCK_MAX_LEAD_SECONDS"] == lead
    assert configured["CHAIN_CLOCK_MAX_LAG_SECONDS"] == (None if configured["CHAIN_ID"] == 31337 else 30)
