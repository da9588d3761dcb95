"""The SDK's x402 flows against the live API, Anvil and a real seller upstream: invoke a skill (402, sign, retry)
and a direct stablecoin purchase."""

import asyncio
import threading
import time

import httpx
import pytest
from eth_account import Account
from x402 import x402Client
from x402.http import x402HTTPClient
from x402.http.clients import x402HttpxClient
from x402.mechanisms.evm.exact import ExactEvmScheme
from x402.mechanisms.evm.signers import EthAccountSigner

from agreements.models import UsageAgreement
from escrow import chain as gateway
from escrow import relayer
from sdk import (MarketplaceError, PaymentAuthorizationCancelFailed, PaymentAuthorizationUsed, SigningRefused,
                 typed_data)
from tests.catalog.factories import service_data
from tests.chain_fixtures import TOKEN_NAMES
from tests.escrow.flow import USDC, fund, mined_what_was_sent, network_of, usdc_balance
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

    with pytest.raises(SigningRefused) as refusal:
        buyer.invoke_skill(seller.me()["handle"], "translate", {"text": "hi"},
                           private_key=escrow_chain.accounts.buyer.key, max_amount_atomic=19_999)
    assert refusal.value.field == "accepts[0].amount"
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

    with relayer_polling():
        response = _stock_client_invokes(chain, wallet.key, live_server.url, f"/agents/{seller.me()['handle']}/translate")

    assert response.status_code == 200, response.text
    assert response.json()["result"] == {"translation": "bonjour"}
    settled = x402HTTPClient(x402Client()).get_payment_settle_response(response.headers.get)
    assert settled.success and settled.transaction == response.json()["payment"]["tx_hash"]
    assert settled.network == f"eip155:{chain.chain_id}" and settled.payer == wallet.address
    assert usdc_balance(chain, wallet.address) == before - 20_000


def _stock_client_invokes(chain, key: str, base_url: str, path: str) -> httpx.Response:
    """x402's own httpx client, unmodified but for the dev chain's token in its spend controls, calls `path`."""
    async def pay() -> httpx.Response:
        client = x402Client()
        client.register("eip155:*", ExactEvmScheme(EthAccountSigner(Account.from_key(key))))
        client.set_spend_controls({"allowed_assets": [
            {"network": f"eip155:{chain.chain_id}", "asset": chain.addresses["usdc"]}]})
        async with x402HttpxClient(client, base_url=base_url, timeout=60) as http:
            return await http.post(path, json={"input": {"text": "hi"}})

    return asyncio.run(pay())


def test_x402s_stock_client_refused_gets_the_402_with_its_code_and_pays_nothing(seller_and_buyer, escrow_chain,
                                                                               http_server, live_server):
    """What x402's own client meets when its payment is refused (a wallet holding no USDC): the 402 to its paid retry,
    which it hands back as it is, says why in x402's `error` (our code) and in `details.x402_reason`; the seller is
    not called."""
    seller, _, _ = seller_and_buyer

    response = _stock_client_invokes(escrow_chain, escrow_chain.accounts.stranger.key, live_server.url,
                                     f"/agents/{seller.me()['handle']}/translate")

    assert response.status_code == 402, response.text
    assert response.json()["error"] == "insufficient_balance" and response.json()["details"]["x402_reason"]
    assert http_server.requests == []


def test_a_refused_payment_raises_with_the_402s_code(seller_and_buyer, escrow_chain, http_server):
    seller, buyer, _ = seller_and_buyer

    with pytest.raises(MarketplaceError) as refused:  # this wallet holds no USDC
        buyer.invoke_skill(seller.me()["handle"], "translate", {"text": "hi"},
                           private_key=escrow_chain.accounts.stranger.key, max_amount_atomic=USDC)

    assert (refused.value.status, refused.value.code) == (402, "insufficient_balance")
    assert refused.value.details["x402_reason"] and http_server.requests == []


def _use_the_authorization(chain, agreement_id: str) -> str:
    """Anyone holding the buyer's signed authorization (a stranger here) gets it mined; its hash."""
    from tests.agreements.test_direct_payments import _hash, _use_authorization
    return _hash(_use_authorization(chain, agreement_id, chain.accounts.stranger.address))


def _mine_later(chain, blocks: int, after: float) -> threading.Thread:
    def mine() -> None:
        time.sleep(after)
        chain.mine(blocks)

    miner = threading.Thread(target=mine, name="miner", daemon=True)
    miner.start()
    return miner


def test_a_sellers_accept_of_a_purchase_paid_by_a_use_not_yet_final_is_sent_again_once_it_is(
        seller_and_buyer, escrow_chain, settings):
    """The buyer's payment reached the seller before the accept, not yet at the confirmation depth: the accept is 409
    `payment_not_final` (accept again shortly, ~20 s on Base). The SDK raised it to the seller's code at once; it
    accepts again, within a bounded wait, until the use is final."""
    settings.CHAIN_CONFIRMATIONS = 3
    seller, buyer, service = seller_and_buyer
    proposed = buyer.propose_direct_purchase(service["id"], 100, wallet=escrow_chain.accounts.buyer.key,
                                             max_unit_price_atomic=20_000,
                                             expected_seller_wallet_address=service["seller"]["wallet_address"])
    _use_the_authorization(escrow_chain, proposed["id"])
    miner = _mine_later(escrow_chain, settings.CHAIN_CONFIRMATIONS - 1, after=1.0)

    started = time.monotonic()
    accepted = seller.accept_agreement(proposed["id"], payment_final_wait=30, poll_interval=0.2)

    miner.join()
    assert accepted["status"] == "paying" and time.monotonic() - started < 30, accepted


def test_a_sellers_accept_waits_for_a_payment_to_be_final_no_longer_than_it_is_told(
        seller_and_buyer, escrow_chain, settings):
    settings.CHAIN_CONFIRMATIONS = 3
    seller, buyer, service = seller_and_buyer
    proposed = buyer.propose_direct_purchase(service["id"], 100, wallet=escrow_chain.accounts.buyer.key,
                                             max_unit_price_atomic=20_000,
                                             expected_seller_wallet_address=service["seller"]["wallet_address"])
    used_by = _use_the_authorization(escrow_chain, proposed["id"])

    started = time.monotonic()
    with pytest.raises(MarketplaceError) as not_final:
        seller.accept_agreement(proposed["id"], payment_final_wait=1.5, poll_interval=0.2)

    assert 1.5 <= time.monotonic() - started < 10
    assert (not_final.value.code, not_final.value.details["used_by"]) == ("payment_not_final", used_by)
    with pytest.raises(MarketplaceError) as at_once:
        seller.accept_agreement(proposed["id"], payment_final_wait=0)
    assert at_once.value.code == "payment_not_final"


def _rejected_purchase(seller_and_buyer, wallet) -> tuple:
    """The buyer's direct purchase of 100 calls, proposed through the SDK and rejected by the seller."""
    seller, buyer, service = seller_and_buyer
    proposed = buyer.propose_direct_purchase(service["id"], 100, wallet=wallet.key, max_unit_price_atomic=20_000,
                                             expected_seller_wallet_address=service["seller"]["wallet_address"])
    seller.reject_agreement(proposed["id"], "fully booked")
    return buyer, proposed


def _before_the_relayers_first_send(monkeypatch, action) -> None:
    """`action` runs once, right before the relayer sends its first transaction."""
    submit, done = relayer.transaction_submit, []

    def action_first(*, transaction_id):
        if not done:
            action()
            done.append(True)
        return submit(transaction_id=transaction_id)

    monkeypatch.setattr(relayer, "transaction_submit", action_first)


def test_a_cancellation_a_use_of_the_authorization_outran_is_told_at_once_naming_the_use(
        seller_and_buyer, escrow_chain, monkeypatch):
    """The authorization of a rejected purchase is used between the buyer's cancellation and the relayer's send: the
    cancellation reverts, and the agreement names the transfer (payment_tx_hash). `wait=True` polled for a
    cancellation that never comes until its timeout; it raises `PaymentAuthorizationUsed` naming the use at once."""
    chain, wallet = escrow_chain, escrow_chain.accounts.buyer
    buyer, proposed = _rejected_purchase(seller_and_buyer, wallet)
    used: list[str] = []
    _before_the_relayers_first_send(monkeypatch, lambda: used.append(_use_the_authorization(chain, proposed["id"])))

    started = time.monotonic()
    with relayer_polling(), pytest.raises(PaymentAuthorizationUsed) as outrun:
        buyer.cancel_payment_authorization(proposed["id"], wallet.key, wait=True, timeout=60, poll_interval=0.2)

    assert time.monotonic() - started < 30
    assert outrun.value.used_by == used[0] and used[0] in str(outrun.value)
    assert outrun.value.agreement["payment_tx_hash"] == used[0]


def test_a_cancellation_that_reverts_for_another_reason_is_told_at_once_naming_why(
        seller_and_buyer, escrow_chain, monkeypatch):
    """The token refuses the relayed cancellation at the relayer's send (paused, say): the agreement names neither a
    cancellation nor a use. `wait=True` polled for them until its timeout; it raises `PaymentAuthorizationCancelFailed`
    at once, naming the failure's reason."""
    wallet = escrow_chain.accounts.buyer
    buyer, proposed = _rejected_purchase(seller_and_buyer, wallet)

    def paused(**_):
        raise gateway.Reverted("Pausable: paused")

    _before_the_relayers_first_send(monkeypatch, lambda: monkeypatch.setattr(gateway, "simulate", paused))

    started = time.monotonic()
    with relayer_polling(), pytest.raises(PaymentAuthorizationCancelFailed) as failed:
        buyer.cancel_payment_authorization(proposed["id"], wallet.key, wait=True, timeout=60, poll_interval=0.2)

    assert time.monotonic() - started < 30
    assert failed.value.reason == "Pausable: paused" and failed.value.reason in str(failed.value)
    assert failed.value.agreement["payment_authorization_cancel_tx_hash"] == ""
    assert failed.value.agreement["payment_tx_hash"] == ""


def test_a_cancellation_the_buyer_ran_on_chain_itself_first_is_returned_as_the_agreements_cancellation(
        seller_and_buyer, escrow_chain, monkeypatch):
    """The buyer cancels the authorization of its rejected purchase on-chain itself (its own copy of the signed
    cancellation, say) between its relayed cancellation and the relayer's send: the relayed one fails, and the
    agreement named neither a cancellation nor a use (`wait=True` raised `PaymentAuthorizationCancelFailed`) though
    the authorization was dead. The failure's evidence names the buyer's own cancellation, which the agreement names:
    `wait=True` returns it, at once."""
    chain, wallet = escrow_chain, escrow_chain.accounts.buyer
    buyer, proposed = _rejected_purchase(seller_and_buyer, wallet)
    cancelled: list[str] = []

    def cancelled_on_chain_by_the_buyer():
        nonce = UsageAgreement.objects.get(pk=proposed["id"]).payment_authorization.nonce
        typed = typed_data.cancel_authorization(chain_id=chain.chain_id, token_address=chain.usdc.address,
                                                authorizer=wallet.address, nonce=nonce,
                                                token_name=network_of(chain).token_domain.name,
                                                token_version=network_of(chain).token_domain.version)
        signature = typed_data.sign_typed_data(wallet.key, typed)
        tx_hash = chain.usdc.functions.cancelAuthorization(wallet.address, bytes.fromhex(nonce[2:]),
                                                           bytes.fromhex(signature[2:])).transact(
            {"from": chain.accounts.stranger.address})
        mined_what_was_sent()
        cancelled.append("0x" + bytes(tx_hash).hex().removeprefix("0x"))

    _before_the_relayers_first_send(monkeypatch, cancelled_on_chain_by_the_buyer)

    started = time.monotonic()
    with relayer_polling():
        agreement = buyer.cancel_payment_authorization(proposed["id"], wallet.key, wait=True, timeout=60,
                                                       poll_interval=0.2)

    assert time.monotonic() - started < 30
    assert cancelled and agreement["payment_authorization_cancel_tx_hash"] == cancelled[0]
    assert agreement["payment_tx_hash"] == ""
