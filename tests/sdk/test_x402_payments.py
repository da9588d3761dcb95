"""The SDK's x402 flows against the live API, Anvil and a real seller upstream: invoke a skill (402, sign, retry)
and a direct stablecoin purchase."""

import asyncio

import httpx
import pytest
from eth_account import Account
from x402 import x402Client
from x402.http import x402HTTPClient
from x402.http.clients import x402HttpxClient
from x402.mechanisms.evm.exact import ExactEvmScheme
from x402.mechanisms.evm.signers import EthAccountSigner
from x402.schemas import PaymentError

from agreements.models import UsageAgreement
from sdk import MarketplaceError
from tests.catalog.factories import service_data
from tests.chain_fixtures import TOKEN_NAMES
from tests.escrow.flow import USDC, fund, usdc_balance
from tests.sdk.test_client import agent_client, relayer_polling

pytestmark = pytest.mark.chain


@pytest.fixture
def seller_and_buyer(live_server, escrow_chain, http_server):
    chain = escrow_chain
    fund(chain, chain.accounts.buyer.address, 20 * USDC)
    seller = agent_client(live_server.url, wallet=chain.accounts.seller.address, buyer=False, seller=True)
    buyer = agent_client(live_server.url, wallet=chain.accounts.buyer.address, chain=chain)
    service = seller.register_service(**service_data(upstream_base_url=http_server.url, skills=[
        {"name": "translate", "price_atomic": 20_000},
        {"name": "render", "price_atomic": 50_000, "is_async": True},
    ]))
    with seller, buyer:
        yield seller, buyer, service


def test_invoke_skill_pays_the_402_and_returns_the_result(seller_and_buyer, escrow_chain, http_server):
    seller, buyer, _ = seller_and_buyer
    handle = seller.me()["handle"]
    http_server.responses.extend([(200, {"translation": "bonjour"}), (200, {"url": "https://cdn.example/1.png"})])
    key = escrow_chain.accounts.buyer.key
    before = usdc_balance(escrow_chain, escrow_chain.accounts.buyer.address)

    with relayer_polling():
        answer = buyer.invoke_skill(handle, "translate", {"text": "hello"}, private_key=key, max_amount_atomic=USDC)
        rendered = buyer.invoke_skill(handle, "render", {"prompt": "sunset"}, private_key=key,
                                      max_amount_atomic=USDC, timeout=30, poll_interval=0.2)

    assert answer["result"] == {"translation": "bonjour"}
    assert answer["payment"]["amount"] == "0.02" and answer["payment"]["tx_hash"].startswith("0x")
    assert rendered["status"] == "completed" and rendered["result"] == {"url": "https://cdn.example/1.png"}
    assert usdc_balance(escrow_chain, escrow_chain.accounts.buyer.address) == before - 70_000
    assert len(http_server.requests) == 2


def test_invoke_skill_never_signs_above_the_callers_cap(seller_and_buyer, escrow_chain, http_server):
    seller, buyer, _ = seller_and_buyer

    with pytest.raises(PaymentError):
        buyer.invoke_skill(seller.me()["handle"], "translate", {"text": "hi"},
                           private_key=escrow_chain.accounts.buyer.key, max_amount_atomic=19_999)
    assert http_server.requests == []


def test_propose_direct_purchase_signs_both_and_gets_paid(seller_and_buyer, escrow_chain):
    seller, buyer, service = seller_and_buyer
    chain = escrow_chain
    wallet = chain.accounts.buyer
    proposed = buyer.propose_direct_purchase(service["id"], 100, wallet=wallet.key, max_unit_price_atomic=20_000,
                                             expected_seller_wallet_address=service["seller"]["wallet_address"])
    assert proposed["status"] == "proposed" and proposed["infra_fee_atomic"] == 100_000  # the 0.10 minimum
    before = usdc_balance(chain, wallet.address)
    with relayer_polling():
        seller.accept_agreement(proposed["id"])
        paid = buyer.wait_until(proposed["id"], statuses={"paid"}, failure={"payment_failed"}, timeout=60,
                                poll_interval=0.2)

    assert paid["payment_tx_hash"] and paid["fee_tx_hash"]
    assert usdc_balance(chain, wallet.address) == before - 2 * USDC - 100_000



def test_a_rejected_direct_purchases_authorization_is_cancelled_through_the_sdk(seller_and_buyer, escrow_chain):
    """The buyer's signed authorization outlives a rejected purchase (valid until its validBefore): the SDK signs the
    token's CancelAuthorization, checked against what it builds itself, and the platform's relayer submits it."""
    seller, buyer, service = seller_and_buyer
    chain, wallet = escrow_chain, escrow_chain.accounts.buyer
    proposed = buyer.propose_direct_purchase(service["id"], 100, wallet=wallet.key, max_unit_price_atomic=20_000,
                                             expected_seller_wallet_address=service["seller"]["wallet_address"])
    with pytest.raises(MarketplaceError) as still_open:
        buyer.cancel_payment_authorization(proposed["id"], wallet.key)
    assert still_open.value.code == "purchase_still_open"
    seller.reject_agreement(proposed["id"], "fully booked")

    with relayer_polling():
        answer = buyer.cancel_payment_authorization(proposed["id"], wallet.key, wait=True, timeout=60,
                                                    poll_interval=0.2)

    assert answer["payment_authorization_cancel_tx_hash"].startswith("0x")
    nonce = UsageAgreement.objects.get(pk=proposed["id"]).payment_authorization.nonce
    assert chain.usdc.functions.authorizationState(wallet.address, bytes.fromhex(nonce[2:])).call()


@pytest.mark.parametrize("chain", TOKEN_NAMES, indirect=True)  # "USDC": Base Sepolia's name
def test_x402s_stock_httpx_client_pays_for_a_skill_and_reads_payment_response(seller_and_buyer, escrow_chain,
                                                                              http_server, live_server):
    """x402's own httpx client, unmodified: its signer, and the one setting a dev chain needs (README): the
    token in its spend controls' `allowed_assets`, since x402 knows no asset on a dev chain."""
    seller, _, _ = seller_and_buyer
    http_server.responses.append((200, {"translation": "bonjour"}))
    chain, wallet = escrow_chain, escrow_chain.accounts.buyer
    before = usdc_balance(chain, wallet.address)

    async def pay() -> httpx.Response:
        client = x402Client()
        client.register("eip155:*", ExactEvmScheme(EthAccountSigner(Account.from_key(wallet.key))))
        client.set_spend_controls({"allowed_assets": [
            {"network": f"eip155:{chain.chain_id}", "asset": chain.addresses["usdc"]}]})
        async with x402HttpxClient(client, base_url=live_server.url, timeout=60) as http:
            return await http.post(f"/agents/{seller.me()['handle']}/translate", json={"input": {"text": "hi"}})

    with relayer_polling():
        response = asyncio.run(pay())

    assert response.status_code == 200, response.text
    assert response.json()["result"] == {"translation": "bonjour"}
    settled = x402HTTPClient(x402Client()).get_payment_settle_response(response.headers.get)
    assert settled.success and settled.transaction == response.json()["payment"]["tx_hash"]
    assert settled.network == f"eip155:{chain.chain_id}" and settled.payer == wallet.address
    assert usdc_balance(chain, wallet.address) == before - 20_000


def test_a_refused_payment_raises_with_the_402s_code(seller_and_buyer, escrow_chain, http_server):
    seller, buyer, _ = seller_and_buyer

    with pytest.raises(MarketplaceError) as refused:  # this wallet holds no USDC
        buyer.invoke_skill(seller.me()["handle"], "translate", {"text": "hi"},
                           private_key=escrow_chain.accounts.stranger.key, max_amount_atomic=USDC)

    assert (refused.value.status, refused.value.code) == (402, "insufficient_balance")
    assert refused.value.details["x402_reason"] and http_server.requests == []
