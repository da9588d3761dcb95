"""The SDK buys a Masumi job through the marketplace and follows it, over the real API (in-process WSGI), the
Anvil chain, the relayer and a real Masumi-style seller service."""

import time
from contextlib import contextmanager

import httpx
import pytest
from django.core.signals import request_finished, request_started
from django.core.wsgi import get_wsgi_application
from django.db import close_old_connections

from escrow import purchases
from sdk import MarketplaceClient
from sdk.safety import DeadlineOutOfRange
from tests.catalog.factories import issue_key
from tests.escrow.flow import USDC, Parties, confirm_all, network_of
from tests.sdk.test_wallet_safety import HostileMarketplace, RecordingWallet
from tests.support.masumi_service import MasumiService, result_for

pytestmark = [pytest.mark.chain, pytest.mark.django_db]


@contextmanager
def in_process_api(api_key: str, chain, hostile: HostileMarketplace | None = None):
    """A client whose requests are served in this thread, inside the test's transaction (as Django's test client
    does, the per-request connection cleanup is off: it would close the connection holding that transaction);
    through `hostile` when given (its inner transport is set here)."""
    request_started.disconnect(close_old_connections)
    request_finished.disconnect(close_old_connections)
    transport: httpx.BaseTransport = httpx.WSGITransport(app=get_wsgi_application())
    if hostile is not None:
        hostile._inner, transport = transport, hostile
    client = MarketplaceClient("http://testserver", api_key, retries=0, network=network_of(chain),  # in-process
                               rpc_url=chain.node.rpc_url, transport=transport, allow_insecure_http=True)
    try:
        yield client
    finally:
        client.close()
        request_started.connect(close_old_connections)
        request_finished.connect(close_old_connections)


def test_sdk_buys_a_masumi_job_and_gets_its_result(escrow_chain, django_capture_on_commit_callbacks):
    capture = django_capture_on_commit_callbacks
    seller_service = MasumiService().start()
    try:
        parties = Parties(escrow_chain, upstream_base_url=seller_service.url, upstream_protocol="masumi", skills=[],
                          pricing={"type": "per_call", "unit_name": "job", "unit_price_atomic": USDC,
                                   "token": "USDC"})
        with in_process_api(issue_key(parties.buyer), escrow_chain) as buyer:
            with capture(execute=True):
                now = max(escrow_chain.now(), int(time.time()))  # the buyer's own timers, which the SDK checks
                purchase = buyer.purchase_masumi_job(
                    parties.service.pk, {"text": "hi"}, parties.buyer_account.key, max_price_atomic=USDC,
                    identifierFromPurchaser="sdk-1",
                    submitResultTime=str((now + 3600) * 1000), unlockTime=str((now + 7200) * 1000))
            assert purchase["NextAction"]["requestedAction"] == "FundsLockingInitiated"
            confirm_all(capture)
            assert buyer.get_purchase(purchase["blockchainIdentifier"])["onChainState"] == "FundsLocked"
            for _ in range(2):  # start_job, then the completed status
                with capture(execute=True):
                    purchases.purchases_jobs_tick()
            done = buyer.wait_for_purchase(purchase["blockchainIdentifier"], timeout=5, poll_interval=0.1)
            assert done["result"] == result_for({"text": "hi"}) and done["identifierFromPurchaser"] == "sdk-1"
            refund = buyer.request_refund(purchase["blockchainIdentifier"], parties.buyer_account.key)
            assert refund["onChainState"] == "RefundRequested" and refund["refundRequestedAt"]
    finally:
        seller_service.stop()


def test_a_refund_request_valid_beyond_the_challenge_window_is_refused(escrow_chain,
                                                                        django_capture_on_commit_callbacks):
    """The refund request is a Challenge valid until the purchase's unlockTime, which the marketplace states: a
    compromised one stating a later unlockTime (the typed data to match) must not get a signature valid beyond the
    agreement's challenge window (the contract's 30 days at most); the honest one is signed."""
    capture = django_capture_on_commit_callbacks
    seller_service = MasumiService().start()
    hostile = HostileMarketplace()
    try:
        parties = Parties(escrow_chain, upstream_base_url=seller_service.url, upstream_protocol="masumi", skills=[],
                          pricing={"type": "per_call", "unit_name": "job", "unit_price_atomic": USDC,
                                   "token": "USDC"})
        with in_process_api(issue_key(parties.buyer), escrow_chain, hostile) as buyer:
            with capture(execute=True):
                purchase = buyer.purchase_masumi_job(parties.service.pk, {"text": "hi"},
                                                     parties.buyer_account.key, max_price_atomic=USDC)
            confirm_all(capture)
            identifier = purchase["blockchainIdentifier"]
            window = buyer.get_agreement(purchase["agreementId"])["challenge_window_seconds"]
            wallet = RecordingWallet(parties.buyer_account.key)
            for unlock in (max(escrow_chain.now(), int(time.time())) + window + 3600, 2**40):
                def later_unlock(body, unlock=unlock):
                    if "Purchases" not in body.get("data", {}):
                        return  # not the listing: PATCH /purchase's answer
                    [listed] = body["data"]["Purchases"]
                    listed["unlockTime"] = str(unlock * 1000)
                    listed["refundRequestTypedData"]["message"]["deadline"] = unlock

                hostile.attack("/purchase", later_unlock)
                with pytest.raises(DeadlineOutOfRange) as refusal:
                    buyer.request_refund(identifier, wallet)
                assert (refusal.value.field, refusal.value.received) == ("unlockTime", unlock)
            assert wallet.signed == [] and ("PATCH", "/purchase") not in hostile.requests

            hostile.attack("/purchase", lambda body: None)
            refund = buyer.request_refund(identifier, wallet)
            assert refund["onChainState"] == "RefundRequested"
            assert [typed["primaryType"] for typed in wallet.signed] == ["Challenge"]
    finally:
        seller_service.stop()
