"""A payout the token refuses (a USDC-blacklisted party, a paused token) is credited in the escrow, claimable by
`withdraw`: the books record the settlement all the same, and say that the money stayed in the escrow."""

import io

import pytest
from django.core.management import call_command

from agreements.models import UsageAgreement
from tests.escrow.flow import USDC, confirm_all, usdc_balance
from tests.escrow.test_indexer import index
from tests.escrow.test_settlement import call_n, funded, tick  # noqa: F401

pytestmark = [pytest.mark.chain, pytest.mark.django_db]


def deferred_on_the_dashboard(admin_client, agreement_id) -> list:
    return [failure for failure in admin_client.get("/admin/dashboard/").context["failures"]
            if failure.subject == str(agreement_id) and failure.kind == "escrow payout deferred"]


def test_a_payout_the_token_refused_is_told_to_the_parties_and_listed_until_it_is_withdrawn(
        funded, escrow_chain, django_capture_on_commit_callbacks, admin_client):  # noqa: F811
    """The seller's address is blacklisted by the token when the escrow settles: finalize credits its 60000 in the
    escrow (PayoutDeferred) and pays the buyer. The agreement said settled with the seller paid 60000, its events
    and webhooks nothing more, the dashboard and `reconcile` nothing: the seller was told it was paid, and nobody
    that the money waits for a `withdraw`."""
    chain, capture = escrow_chain, django_capture_on_commit_callbacks
    call_n(funded, 3)
    assert funded.buyer_api.post(f"/usage-agreements/{funded.agreement_id}/complete").status_code == 200
    assert tick(capture)["proposed"] == 1
    seller = funded.seller_account.address
    chain.usdc.functions.blacklist(seller).transact({"from": chain.accounts.deployer.address})
    chain.increase_time(3601)
    assert tick(capture)["finalizing"] == 1
    index(capture)

    settled = funded.agreement(funded.agreement_id)
    assert (settled["status"], settled["seller_payout_atomic"]) == ("settled", 60_000)
    assert usdc_balance(chain, seller) == funded.balances["seller"]  # nothing reached the seller
    events = funded.seller_api.get(f"/usage-agreements/{funded.agreement_id}/events").json()["results"]
    [deferred] = [event for event in events if "payout_deferred_atomic" in event["data"]]
    assert (deferred["data"]["party"], deferred["data"]["payout_deferred_atomic"], deferred["data"]["code"]) == (
        "seller", 60_000, "payout_deferred")
    assert len(deferred_on_the_dashboard(admin_client, funded.agreement_id)) == 1
    out = io.StringIO()
    call_command("reconcile", stdout=out)
    assert "the token refused the escrow's 60000 base units" in out.getvalue()

    chain.usdc.functions.unBlacklist(seller).transact({"from": chain.accounts.deployer.address})
    claim = funded.seller_api.get(f"/usage-agreements/{funded.agreement_id}/claim-instructions").json()
    assert claim["claimable_atomic"] == 60_000, claim
    chain.w3.eth.wait_for_transaction_receipt(chain.w3.eth.send_transaction({
        "from": chain.accounts.stranger.address, "to": claim["transaction"]["to"],
        "data": claim["transaction"]["data"]}))
    index(capture)
    confirm_all(capture)
    assert usdc_balance(chain, seller) == funded.balances["seller"] + 60_000
    assert deferred_on_the_dashboard(admin_client, funded.agreement_id) == []
    events = funded.seller_api.get(f"/usage-agreements/{funded.agreement_id}/events").json()["results"]
    assert [event["data"]["withdrawn_atomic"] for event in events if "withdrawn_atomic" in event["data"]] == [60_000]



def test_a_reclaimed_deposit_the_token_refused_to_the_buyer_is_told_to_it_and_listed(
        funded, escrow_chain, django_capture_on_commit_callbacks, admin_client):  # noqa: F811
    """The reclaim of an unused escrow whose buyer the token blacklisted meanwhile: the deposit stays credited to the
    buyer in the escrow, which its agreement's events and the dashboard say (the Reclaimed event comes first in the
    transaction, then PayoutDeferred)."""
    chain, capture = escrow_chain, django_capture_on_commit_callbacks
    chain.usdc.functions.blacklist(funded.buyer_account.address).transact({"from": chain.accounts.deployer.address})
    expires_at = UsageAgreement.objects.get(pk=funded.agreement_id).expires_at
    chain.increase_time(int(expires_at.timestamp()) - chain.now() + 10 + chain.reclaim_grace)
    assert tick(capture)["reclaiming"] == 1
    index(capture)

    refunded = funded.agreement(funded.agreement_id)
    assert (refunded["status"], refunded["buyer_refund_atomic"]) == ("refunded", 2 * USDC)
    events = funded.buyer_api.get(f"/usage-agreements/{funded.agreement_id}/events").json()["results"]
    assert [(event["data"]["party"], event["data"]["payout_deferred_atomic"]) for event in events
            if event["data"].get("code") == "payout_deferred"] == [("buyer", 2 * USDC)]
    assert len(deferred_on_the_dashboard(admin_client, funded.agreement_id)) == 1
