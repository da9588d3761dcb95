"""Time on the chain: `make run`'s dev chain keeps time while idle, so what falls due happens with no traffic;
signature deadlines count from our clock, so an idle chain's old latest block cannot expire them on arrival."""

import time

import pytest

from escrow import devchain, settlement
from sdk import typed_data
from tests.chain_fixtures import TEST_RECLAIM_GRACE, Chain, Deployed, DevAccounts
from tests.conftest import wire_marketplace
from tests.escrow.flow import USDC, Parties, confirm_all
from tests.support.masumi_service import MasumiService

pytestmark = [pytest.mark.chain, pytest.mark.django_db]


def deployed_on(node: devchain.AnvilProcess) -> Chain:
    accounts = DevAccounts.from_anvil()
    w3 = node.w3()
    addresses = devchain.deploy_contracts(w3, accounts.deployer.key, fee_recipient=accounts.fee_recipient.address,
                                          arbiter=accounts.arbiter.address, reclaim_grace=TEST_RECLAIM_GRACE)
    return Chain(Deployed(node=node, w3=w3, chain_id=node.chain_id, addresses=addresses,
                          usdc=devchain.usdc_contract(w3, addresses["usdc"]),
                          escrow=devchain.escrow_contract(w3, addresses["escrow"]), accounts=accounts,
                          reclaim_grace=TEST_RECLAIM_GRACE))


# The dev chain's clock runs this many times as fast as ours here: its blocks come as often by its own clock.
DEV_CLOCK_SPEED = 4


@pytest.fixture
def dev_chain(settings, tmp_path):
    """The chain as `manage.py devchain` (`make run`) starts it, a block every DEV_BLOCK_TIME seconds of its own
    clock, on a clock DEV_CLOCK_SPEED times as fast as ours (so the test waits a quarter as long)."""
    node = devchain.start_dev_chain(port=None, state=tmp_path / "anvil-state.json",
                                    block_time=devchain.DEV_BLOCK_TIME / DEV_CLOCK_SPEED)
    node.rpc("anvil_setBlockTimestampInterval", [devchain.DEV_BLOCK_TIME])
    try:
        yield wire_marketplace(deployed_on(node), settings)
    finally:
        node.stop()


# How long the automine-only chain has had no block when the tests ask it for deadlines: longer than their
# lifetimes (5 s).
IDLE_SECONDS = 7


@pytest.fixture
def automine_only_chain(settings):
    """A chain that mines only when a transaction arrives (what `make run` started before). Its clock starts
    IDLE_SECONDS behind ours, until `idle_since_its_last_block` sets it to ours."""
    node = devchain.start_anvil(extra_args=("--timestamp", str(int(time.time()) - IDLE_SECONDS)))
    try:
        yield wire_marketplace(deployed_on(node), settings)
    finally:
        node.stop()


def idle_since_its_last_block(chain: Chain) -> None:
    """What waiting IDLE_SECONDS on an idle chain does, without the wait: the chain's clock, that far behind ours
    until now, is set to ours, so its latest block is at least that old and the next one gets our time."""
    chain.rpc("anvil_setTime", [int(time.time())])


@pytest.mark.slow
def test_a_completed_agreement_settles_by_itself_on_the_idle_dev_chain(dev_chain, http_server,
                                                                        django_capture_on_commit_callbacks):
    capture = django_capture_on_commit_callbacks
    parties = Parties(dev_chain, upstream_base_url=http_server.url)
    agreement = parties.accepted_agreement(quantity=10, challenge_window_seconds=60)
    assert parties.activate(agreement["id"], capture).status_code == 202
    assert parties.agreement(agreement["id"])["status"] == "active"
    assert parties.buyer_api.get(f"/metered-proxy/{agreement['id']}/work").status_code == 200
    assert parties.buyer_api.post(f"/usage-agreements/{agreement['id']}/complete").status_code == 200

    # What the beat does, and nothing else: the test sends no transaction and mines no block.
    blocks_before = dev_chain.block_number()
    deadline = time.monotonic() + 120
    while parties.agreement(agreement["id"])["status"] != "settled" and time.monotonic() < deadline:
        with capture(execute=True):
            settlement.settlement_tick()
        confirm_all(capture)
        time.sleep(0.5)
    settled = parties.agreement(agreement["id"])
    assert settled["status"] == "settled", settled["status"]
    assert int(settled["seller_payout_atomic"]) == parties.service.unit_price
    assert dev_chain.block_number() - blocks_before >= 25  # ~60 s of blocks every 2 s, almost all empty


def test_activation_signatures_handed_out_on_an_idle_chain_are_not_already_expired(
        automine_only_chain, settings, django_capture_on_commit_callbacks):
    settings.ACTIVATION_SIGNATURE_TTL = 5
    parties = Parties(automine_only_chain)
    agreement = parties.accepted_agreement()
    idle_since_its_last_block(automine_only_chain)  # the latest block is older than the signatures' lifetime
    package = parties.buyer_api.get(f"/usage-agreements/{agreement['id']}/activation-package").json()
    assert package["deadline"] >= int(time.time()) + 5 - 1  # counted from now, not from the idle chain's last block
    # Signed as handed out, by the raw key: the SDK itself refuses deadlines under 60 s away (its own bound).
    key = parties.buyer_account.key
    permit = package["escrow_permit"]["message"]
    body = {"intent_signature": typed_data.sign_typed_data(key, package["intent"]), "deadline": package["deadline"],
            "escrow_permit": {"value": permit["value"], "nonce": permit["nonce"], "deadline": permit["deadline"],
                              "signature": typed_data.sign_typed_data(key, package["escrow_permit"])}}
    response = parties.activate(agreement["id"], django_capture_on_commit_callbacks, body=body)
    assert response.status_code == 202, response.content
    assert parties.agreement(agreement["id"])["status"] == "active"


def test_masumi_timers_handed_out_on_an_idle_chain_are_not_already_past(
        automine_only_chain, settings, django_capture_on_commit_callbacks):
    """payByTime (and the timers after it) count from our clock too: a purchase made long after the idle chain's
    last block can still be paid."""
    settings.MASUMI_PAY_BY_SECONDS = 5
    service = MasumiService().start()
    try:
        parties = Parties(automine_only_chain, upstream_base_url=service.url, upstream_protocol="masumi", skills=[],
                          pricing={"type": "per_call", "unit_name": "job", "unit_price_atomic": USDC,
                                   "token": "USDC"})
        idle_since_its_last_block(automine_only_chain)  # the latest block is older than payByTime's lead
        before, chain_before = int(time.time()), automine_only_chain.now()
        created = parties.buyer_api.post("/purchase", {"network": "Preprod", "input_data": {"text": "hello"},
                                                       "agentIdentifier": str(parties.service.pk)})
        assert created.status_code == 200, created.content
        purchase = created.json()["data"]
        pay_by = int(purchase["payByTime"]) // 1000
        assert pay_by >= before + 5 and purchase["ActivationPackage"]["deadline"] == pay_by
        assert int(purchase["submitResultTime"]) // 1000 >= before + 5 + settings.MASUMI_SUBMIT_RESULT_SECONDS
        # The challenge window runs from the chain's clock: a proposal (at a block after the purchase) opens it
        # until unlockTime at the earliest, never earlier because the chain lagged ours.
        window = parties.agreement(purchase["agreementId"])["challenge_window_seconds"]
        assert window == int(purchase["unlockTime"]) // 1000 - chain_before

        package, key = purchase["ActivationPackage"], parties.buyer_account.key
        permit = package["escrow_permit"]["message"]  # signed by the raw key: the SDK refuses deadlines < 60 s away
        with django_capture_on_commit_callbacks(execute=True):
            locked = parties.buyer_api.post("/purchase/lock-funds", {
                "network": "Preprod", "blockchainIdentifier": purchase["blockchainIdentifier"],
                "intent_signature": typed_data.sign_typed_data(key, package["intent"]), "deadline": pay_by,
                "escrow_permit": {"value": permit["value"], "nonce": permit["nonce"], "deadline": permit["deadline"],
                                 "signature": typed_data.sign_typed_data(key, package["escrow_permit"])}})
        assert locked.status_code == 202, locked.content
        confirm_all(django_capture_on_commit_callbacks)
        assert parties.agreement(purchase["agreementId"])["status"] == "active"
    finally:
        service.stop()
