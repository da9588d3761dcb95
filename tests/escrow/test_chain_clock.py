"""Time on the chain: `make run`'s dev chain keeps time while idle, so what falls due happens with no traffic;
signature deadlines count from our clock, so an idle chain's old latest block cannot expire them on arrival."""

import time

import pytest

from escrow import devchain, settlement
from sdk import typed_data
from tests.chain_fixtures import TEST_RECLAIM_GRACE, Chain, Deployed, DevAccounts
from tests.conftest import wire_marketplace
from tests.escrow.flow import Parties, confirm_all

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


@pytest.fixture
def dev_chain(settings, tmp_path):
    """The chain exactly as `manage.py devchain` (`make run`) starts it."""
    node = devchain.start_dev_chain(port=None, state=tmp_path / "anvil-state.json")
    try:
        yield wire_marketplace(deployed_on(node), settings)
    finally:
        node.stop()


@pytest.fixture
def automine_only_chain(settings):
    """A chain that mines only when a transaction arrives (what `make run` started before)."""
    node = devchain.start_anvil()
    try:
        yield wire_marketplace(deployed_on(node), settings)
    finally:
        node.stop()


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
        time.sleep(1)
    settled = parties.agreement(agreement["id"])
    assert settled["status"] == "settled", settled["status"]
    assert int(settled["seller_payout_atomic"]) == parties.service.unit_price
    assert dev_chain.block_number() - blocks_before >= 25  # ~60 s of blocks every 2 s, almost all empty


def test_activation_signatures_handed_out_on_an_idle_chain_are_not_already_expired(
        automine_only_chain, settings, django_capture_on_commit_callbacks):
    settings.ACTIVATION_SIGNATURE_TTL = 5
    parties = Parties(automine_only_chain)
    agreement = parties.accepted_agreement()
    time.sleep(7)  # no block since: the latest one is older than the signatures' lifetime
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
