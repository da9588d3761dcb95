"""The demo wallets: Anvil's public development accounts, whose private keys every Anvil user knows.

Funded only on local dev chains (`manage.py devchain`); `manage.py seed_demo` gives the demo agents these
addresses. Never use them on a real chain.
"""

from dataclasses import dataclass


@dataclass(frozen=True)
class DemoWallet:
    role: str
    anvil_account: int
    address: str
    private_key: str


# Anvil's well-known development accounts (mnemonic "test test … junk"), funded only on local dev chains.
DEMO_WALLETS = [
    DemoWallet("relayer, operator/arbiter, treasury", 0, "0xf39Fd6e51aad88F6F4ce6aB8827279cffFb92266",
               "0xac0974bec39a17e36ba4a6b4d238ff944bacb478cbed5efcae784d7bf4f2ff80"),
    DemoWallet("demo-buyer", 1, "0x70997970C51812dc3A010C7d01b50e0d17dc79C8",
               "0x59c6995e998f97a5a0044966f0945389dc9e86dae88c7a8412f4603b6b78690d"),
    DemoWallet("demo-seller", 2, "0x3C44CdDdB6a900fa2b585dd299e03d12FA4293BC",
               "0x5de4111afa1a4b94908f83103eb1f1706367c2e68ca870fc3fb9a804cdab365a"),
    DemoWallet("fee recipient", 3, "0x90F79bf6EB2c4f870365E785982E1f101E93b906",
               "0x7c852118294e51e653712a81e05800f419141751be58f605c371e15141b007a6"),
    DemoWallet("usage receipt signer", 9, "0xa0Ee7A142d267C1f36714E4a8F75612F20a79720",
               "0x2a871d0798f97d79848a013d4936a73bf4cc922c825d33c1cf7073dff6d409c6"),
]
DEMO_BUYER_WALLET = DEMO_WALLETS[1].address
DEMO_SELLER_WALLET = DEMO_WALLETS[2].address
