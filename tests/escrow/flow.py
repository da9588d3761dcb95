"""Drive agreements to on-chain states through the public API (shared by escrow and metering tests)."""

import time

from escrow import chain as gateway
from escrow import devchain, relayer
from sdk import AgreedTerms, NetworkConfig, TokenDomain
from sdk.activation import sign_activation_package
from sdk.onchain import ChainReader, OnchainEscrow
from tests.agreements.helpers import propose
from tests.catalog.factories import AgentFactory, issue_key, register_service
from tests.conftest import Api

USDC = 10**6


def network_of(chain) -> NetworkConfig:
    """What a buyer's SDK pins for the test deployment (its token's EIP-712 domain as the token states it)."""
    _, name, version, *_ = chain.usdc.functions.eip712Domain().call()
    return NetworkConfig(chain_id=chain.chain_id, escrow_address=chain.addresses["escrow"],
                         token_address=chain.addresses["usdc"], receipt_signer=chain.accounts.receipt_signer.address,
                         gas_wallet=chain.accounts.deployer.address, token_domain=TokenDomain(name, version),
                         escrow_deployment_block=chain.addresses["escrow_block"])


def deadline_clock(chain) -> int:
    """Where the marketplace counts the deadlines it hands out from (escrow.chain_clock.deadline_clock): the later of
    the wall clock and the chain's, so deadlines a test computes from it are in the future for the marketplace."""
    return max(int(time.time()), chain.now())


def sign_activation(chain, package: dict, agreement: dict, key: str, **options) -> dict:
    """The SDK's checked signing of an activation package, for the agreement the buyer holds: its permit for the
    token's nonces(buyer) as the buyer's RPC reads it, unless the test gives `permit_nonce`."""
    network = network_of(chain)
    terms = AgreedTerms.from_agreement(agreement, network)
    options.setdefault("permit_nonce", chain.usdc.functions.nonces(terms.buyer).call())
    return sign_activation_package(package, key, terms=terms, network=network, token_domain=network.token_domain,
                                   now=deadline_clock(chain), **options)


def onchain_escrow(chain, onchain_id: str, buyer: str | None = None) -> OnchainEscrow:
    """The escrow as a buyer's SDK reads it through its own RPC (the buyer's escrow: `Parties`' buyer by default)."""
    reader = ChainReader(chain.node.rpc_url)
    try:
        return reader.escrow(chain.addresses["escrow"], onchain_id, buyer=buyer or chain.accounts.buyer.address)
    finally:
        reader.close()


def usdc_balance(chain, address: str) -> int:
    return chain.usdc.functions.balanceOf(address).call()


def pay_fees(chain) -> None:
    """What the escrow accrued in infra fees goes to the fee recipient (UsageEscrow.payFees, callable by anyone)."""
    token = chain.addresses["usdc"]
    if chain.escrow.functions.feesAccrued(token).call():
        tx_hash = chain.escrow.functions.payFees(token).transact({"from": chain.accounts.stranger.address})
        assert chain.w3.eth.wait_for_transaction_receipt(tx_hash)["status"] == 1


def fund(chain, address: str, amount: int) -> None:
    devchain.mint_usdc(chain.w3, chain.addresses["usdc"], chain.accounts.deployer.key, address, amount)


class Parties:
    """A buyer and a seller agent whose wallets are the chain's dev accounts, with API clients."""

    def __init__(self, chain, *, buyer_funds: int = 100 * USDC, **service_overrides):
        self.chain = chain
        self.buyer_account = chain.accounts.buyer
        self.seller_account = chain.accounts.seller
        self.buyer = AgentFactory(is_buyer=True, is_seller=False, wallet_address=self.buyer_account.address)
        self.seller = AgentFactory(is_buyer=False, is_seller=True, wallet_address=self.seller_account.address)
        self.buyer_api = Api(issue_key(self.buyer))
        self.seller_api = Api(issue_key(self.seller, scope="admin"))
        self.service = register_service(self.seller, **service_overrides)
        if buyer_funds:
            fund(chain, self.buyer_account.address, buyer_funds)

    def accepted_agreement(self, **overrides) -> dict:
        agreement = propose(self.buyer_api, self.service, **overrides)
        response = self.seller_api.put(f"/usage-agreements/{agreement['id']}/accept")
        assert response.status_code == 200, response.content
        return response.json()

    def signed_activation(self, agreement_id: str) -> dict:
        package = self.buyer_api.get(f"/usage-agreements/{agreement_id}/activation-package")
        assert package.status_code == 200, package.content
        return sign_activation(self.chain, package.json(), self.agreement(agreement_id),
                               self.buyer_account.key)

    def signed_purchase(self, purchase: dict, **options) -> dict:
        """The SDK's checked signing of a Masumi purchase's escrow package, whose deadline is the purchase's payByTime
        (as `MarketplaceClient.purchase_masumi_job` bounds it)."""
        package = purchase["ActivationPackage"]
        now = deadline_clock(self.chain)
        return sign_activation(self.chain, package, self.agreement(purchase["agreementId"]), self.buyer_account.key,
                               max_deadline_seconds=max(package["deadline"] - now, 0), **options)

    def activate(self, agreement_id: str, capture, body: dict | None = None):
        """POST activate-escrow with after-commit work run, then let the relayer confirm, and the accrued fee be
        paid to the fee recipient. Returns the 202 response."""
        body = body or self.signed_activation(agreement_id)
        with capture(execute=True):
            response = self.buyer_api.post(f"/usage-agreements/{agreement_id}/activate-escrow", body)
        confirm_all(capture)
        pay_fees(self.chain)
        return response

    def agreement(self, agreement_id: str) -> dict:
        return self.buyer_api.get(f"/usage-agreements/{agreement_id}").json()


def check_times_out_once_mined(monkeypatch, tx) -> None:
    """The relayer's first check of `tx` once the node has its receipt raises a timeout (after the node answered)."""
    check_raises_once_mined(monkeypatch, tx, gateway.RpcUnavailable("read timed out"))


def check_raises_once_mined(monkeypatch, tx, error: Exception) -> None:
    """The relayer's first check of `tx` once the node has its receipt raises `error`."""
    check = relayer.transaction_check
    raised = []

    def check_or_raise(*, transaction_id):
        if (transaction_id == tx.pk and not raised
                and relayer._first_receipt(type(tx).objects.get(pk=tx.pk)) is not None):
            raised.append(transaction_id)
            raise error
        return check(transaction_id=transaction_id)

    monkeypatch.setattr(relayer, "transaction_check", check_or_raise)


def confirm_all(capture) -> None:
    """One poll of the relayer once the node mined what it was sent, running whatever it queues after commit."""
    with capture(execute=True):
        poll_mined()


def poll_mined() -> None:
    """One poll of the relayer once the node mined what it was sent (`mined_what_was_sent`)."""
    mined_what_was_sent()
    relayer.transactions_poll()


def mined_what_was_sent() -> None:
    """Wait until an automining node has mined every transaction it was sent. Anvil answers a send once the
    transaction is in its pool and mines it just after, in its node task (foundry-rs/foundry#3537); it takes a
    transaction out of the pool once the block holding it is stored. A relayer poll in between finds no receipt and
    leaves the transaction submitted: the agreement one step behind what the test expects (the Masumi refund tests
    ended in RefundRequested now and then). A node not automining (a test holding transactions back, or mining on an
    interval) is left alone."""
    node = gateway.w3().provider
    if not node.make_request("anvil_getAutomine", []).get("result"):
        return
    deadline = time.monotonic() + 10
    while int(node.make_request("txpool_status", [])["result"]["pending"], 16):
        assert time.monotonic() < deadline, "the automining node still has pending transactions after 10 s"
        time.sleep(0.005)
