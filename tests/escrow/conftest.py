"""Helpers for the contract tests: build, sign and submit escrow messages against the test Anvil chain.

The chain fixtures live in ``tests/chain_fixtures.py`` (registered by the root conftest); this conftest also
registers them when the root conftest is not loaded (``pytest -p no:django --confcutdir=tests/escrow``).
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass
from typing import Any

import pytest
from eth_abi import decode as abi_decode
from eth_utils import function_abi_to_4byte_selector
from web3 import Web3
from web3.exceptions import ContractLogicError
from web3.logs import DISCARD

from sdk import typed_data as td


def pytest_configure(config):
    if config.pluginmanager.get_plugin("tests.chain_fixtures") is None:
        config.pluginmanager.import_plugin("tests.chain_fixtures")


USDC = 10**6  # 1 USDC in base units
ZERO_ADDRESS = "0x" + "00" * 20
ZERO32 = "0x" + "00" * 32

STATE_NAMES = ["None", "Active", "Proposed", "Disputed", "Resolved", "Settled", "Reclaimed"]


def random_bytes32() -> str:
    return "0x" + secrets.token_hex(32)


class Reverted(AssertionError):
    pass


@dataclass
class RevertInfo:
    name: str  # custom error name, or "Error" for require(string), or "" when unknown
    args: tuple
    message: str


class Escrows:
    """Drives UsageEscrow and MockUSDC for one test (built on the ``chain`` fixture)."""

    def __init__(self, chain):
        self.chain = chain
        self.w3: Web3 = chain.w3
        self.escrow = chain.escrow
        self.usdc = chain.usdc
        self.acc = chain.accounts
        self.chain_id = chain.chain_id
        self._errors = {}
        for contract in (self.escrow, self.usdc):
            for item in contract.abi:
                if item["type"] == "error":
                    selector = "0x" + function_abi_to_4byte_selector(item).hex()
                    self._errors[selector] = (item["name"], [i["type"] for i in item["inputs"]])
        self._escrow_fields = next(
            i for i in self.escrow.abi if i.get("name") == "getEscrow"
        )["outputs"][0]["components"]

    def terms(self, agreement_id: str, buyer: str | None = None) -> tuple:
        """The EscrowTerms every call after activation carries (see :func:`escrow_terms`)."""
        return escrow_terms(self.escrow, agreement_id, buyer)

    def fn(self, name: str, agreement_id: str, *args, buyer: str | None = None):
        """Escrow function ``name`` for ``agreement_id`` with its terms: ``name(id, terms, *args)`` (the escrow of
        ``buyer`` when several buyers opened one under the id)."""
        return getattr(self.escrow.functions, name)(agreement_id, self.terms(agreement_id, buyer), *args)

    # ------------------------------------------------------------ transactions

    def tx(self, fn, sender, **params) -> Any:
        """Send ``fn`` from the (unlocked) ``sender`` and return the receipt; must succeed.

        The gas limit is fixed (no estimate) so that the transaction runs in the next block, at the time set
        by ``chain.set_next_timestamp`` (Anvil estimates against the latest block)."""
        address = sender.address if hasattr(sender, "address") else sender
        params.setdefault("gas", 3_000_000)
        if "gasPrice" not in params:  # fixed fees: no fee-estimation round trips
            params.setdefault("maxFeePerGas", 100 * 10**9)
            params.setdefault("maxPriorityFeePerGas", 1)
        tx_hash = fn.transact({"from": address, **params})
        receipt = self.w3.eth.wait_for_transaction_receipt(tx_hash, poll_latency=0.01)
        assert receipt["status"] == 1, receipt
        return receipt

    def revert_info(self, fn, sender) -> RevertInfo:
        """Simulate ``fn`` expecting a revert (gas estimation against the latest block, so at the latest
        block's timestamp: mine a block at the time wanted first); return what it reverted with."""
        address = sender.address if hasattr(sender, "address") else sender
        try:
            fn.transact({"from": address})
        except ContractLogicError as exc:
            data = exc.data if isinstance(exc.data, str) else None
            message = str(exc.message if hasattr(exc, "message") else exc)
            if data and data.startswith("0x") and len(data) >= 10:
                selector = data[:10]
                if selector == "0x08c379a0":
                    (reason,) = abi_decode(["string"], bytes.fromhex(data[10:]))
                    return RevertInfo("Error", (reason,), reason)
                if selector in self._errors:
                    name, types = self._errors[selector]
                    args = tuple(
                        Web3.to_checksum_address(v) if t == "address" else v
                        for t, v in zip(types, abi_decode(types, bytes.fromhex(data[10:])), strict=True)
                    )
                    return RevertInfo(name, args, message)
            return RevertInfo("", (), message)
        raise Reverted(f"expected {fn.fn_name} to revert, but it would succeed")

    def reverts(self, fn, sender, expected: str, *args) -> RevertInfo:
        """Assert ``fn`` reverts with custom error ``expected`` (and ``args`` if given), or with a
        require-string containing ``expected``."""
        info = self.revert_info(fn, sender)
        if info.name == "Error":
            assert expected in info.args[0], f"reverted with {info.args[0]!r}, expected {expected!r}"
        else:
            assert info.name == expected, f"reverted with {info.name or info.message}{info.args}, expected {expected}"
            if args:
                assert info.args == tuple(_norm(a) for a in args), f"{info.name}{info.args} != {args}"
        return info

    def events(self, receipt, name: str, contract=None) -> list[dict]:
        contract = contract or self.escrow
        event = getattr(contract.events, name)()
        return [dict(e["args"]) for e in event.process_receipt(receipt, errors=DISCARD)]

    def event(self, receipt, name: str, contract=None) -> dict:
        found = self.events(receipt, name, contract)
        assert len(found) == 1, f"expected one {name} event, got {found}"
        return found[0]

    # ------------------------------------------------------------ token helpers

    def mint(self, to, amount: int) -> None:
        address = to.address if hasattr(to, "address") else to
        self.tx(self.usdc.functions.mint(address, amount), self.acc.deployer)

    def fees_accrued(self) -> int:
        return self.escrow.functions.feesAccrued(self.usdc.address).call()

    def held(self) -> int:
        """What the escrow holds for its escrows: its token balance less the infra fees accrued for payFees."""
        return self.balance(self.escrow.address) - self.fees_accrued()

    def pay_fees(self):
        """payFees(token), by anyone: the accrued fees go to the fee recipient."""
        return self.tx(self.escrow.functions.payFees(self.usdc.address), self.acc.stranger)

    def balance(self, who) -> int:
        address = who.address if hasattr(who, "address") else who
        return self.usdc.functions.balanceOf(address).call()

    def blacklist(self, who) -> None:
        self.tx(self.usdc.functions.blacklist(who.address), self.acc.deployer)

    def unblacklist(self, who) -> None:
        self.tx(self.usdc.functions.unBlacklist(who.address), self.acc.deployer)

    def permit(self, owner, value: int, *, deadline: int | None = None, nonce: int | None = None,
               spender: str | None = None, signer=None) -> tuple:
        """A signed EIP-2612 permit as UsageEscrow's Permit tuple (spender: the escrow)."""
        if deadline is None:
            deadline = self.chain.now() + 3600
        if nonce is None:
            nonce = self.usdc.functions.nonces(owner.address).call()
        typed = td.erc2612_permit(
            chain_id=self.chain_id, token_address=self.usdc.address, owner=owner.address,
            spender=spender or self.escrow.address, value=value, nonce=nonce, deadline=deadline,
        )
        signature = td.sign_typed_data((signer or owner).key, typed)
        return td.onchain_permit(value=value, deadline=deadline, signature=signature)

    def submit_permit(self, owner, permit: tuple, sender=None, spender: str | None = None) -> None:
        value, deadline, v, r, s = permit
        self.tx(
            self.usdc.functions.permit(owner.address, spender or self.escrow.address, value, deadline, v, r, s),
            sender or self.acc.stranger,
        )

    # ------------------------------------------------------------ escrow messages

    def intent(self, **overrides) -> dict:
        """An ActivationIntent typed-data dict with sensible defaults (10 units x 0.1 USDC, fee 0.103 USDC)."""
        now = self.chain.now()
        quantity = overrides.pop("quantity", 10)
        price = overrides.pop("price_per_unit", 100_000)
        args = dict(
            chain_id=self.chain_id,
            escrow_address=self.escrow.address,
            agreement_id=random_bytes32(),
            buyer=self.acc.buyer.address,
            seller=self.acc.seller.address,
            token=self.usdc.address,
            quantity=quantity,
            price_per_unit=price,
            deposit_amount=quantity * price,
            infra_fee=103_000,
            receipt_signer=self.acc.receipt_signer.address,
            challenge_window=600,
            expires_at=now + 86_400,
            terms_hash=random_bytes32(),
            nonce=secrets.randbits(128),
            deadline=now + 3600,
        )
        raw = overrides.pop("raw", False)
        args.update(overrides)
        if raw:  # bypass the SDK's own checks (to send intents the contract must refuse)
            typed = td.activation_intent(**{**args, "deposit_amount": args["quantity"] * args["price_per_unit"]})
            typed["message"]["depositAmount"] = args["deposit_amount"]
            return typed
        return td.activation_intent(**args)

    def sign(self, typed: dict, signer) -> str:
        return td.sign_typed_data(signer.key, typed)

    def activate(self, typed: dict | None = None, *, buyer=None, signature: str | None = None,
                 escrow_permit: tuple | None = None, fee_permit: tuple | None = None, fund: bool = True,
                 sender=None, two_permits: bool = False, **intent_overrides):
        """Sign (as the buyer) and submit an activation; by default mints the buyer what it needs and signs
        one permit for deposit + fee (``two_permits=True``: a deposit permit, then a fee permit).
        Returns (typed, receipt)."""
        buyer = buyer or self.acc.buyer
        if typed is None:
            intent_overrides.setdefault("buyer", buyer.address)
            typed = self.intent(**intent_overrides)
        message = typed["message"]
        deposit, fee = message["depositAmount"], message["infraFee"]
        if fund:
            self.mint(buyer, deposit + fee)
        deadline = message["deadline"]
        if escrow_permit is None:
            nonce = self.usdc.functions.nonces(buyer.address).call()
            if two_permits:
                escrow_permit = self.permit(buyer, deposit, deadline=deadline, nonce=nonce)
                if fee_permit is None and fee:
                    fee_permit = self.permit(buyer, fee, deadline=deadline, nonce=nonce + 1)
            else:
                escrow_permit = self.permit(buyer, deposit + fee, deadline=deadline, nonce=nonce)
        if fee_permit is None:
            fee_permit = td.EMPTY_PERMIT
        signature = signature or self.sign(typed, buyer)
        fn = self.escrow.functions.activate(td.message_tuple(typed), signature, escrow_permit, fee_permit)
        return typed, self.tx(fn, sender or self.acc.operator)

    def activate_fn(self, typed: dict, signature: str, escrow_permit=td.EMPTY_PERMIT, fee_permit=td.EMPTY_PERMIT):
        return self.escrow.functions.activate(td.message_tuple(typed), signature, escrow_permit, fee_permit)

    def receipt_sig(self, agreement_id: str, seq: int, amount: int, usage_digest: str, signer=None) -> str:
        typed = td.usage_receipt(
            chain_id=self.chain_id, escrow_address=self.escrow.address, agreement_id=agreement_id,
            seq=seq, cumulative_amount=amount, usage_digest=usage_digest,
        )
        return td.sign_typed_data((signer or self.acc.receipt_signer).key, typed)

    def propose_fn(self, agreement_id: str, seq: int, amount: int, usage_digest: str | None = None,
                   signature: str | None = None, signer=None, buyer: str | None = None):
        usage_digest = usage_digest or random_bytes32()
        signature = signature or self.receipt_sig(agreement_id, seq, amount, usage_digest, signer)
        return self.fn("proposeSettlement", agreement_id, seq, amount, usage_digest, signature, buyer=buyer)

    def propose(self, agreement_id: str, seq: int, amount: int, *, sender=None, **kwargs):
        return self.tx(self.propose_fn(agreement_id, seq, amount, **kwargs), sender or self.acc.operator)

    def challenge_sig(self, agreement_id: str, deadline: int, signer=None) -> str:
        typed = td.challenge(
            chain_id=self.chain_id, escrow_address=self.escrow.address, agreement_id=agreement_id,
            deadline=deadline,
        )
        return td.sign_typed_data((signer or self.acc.buyer).key, typed)

    def get(self, agreement_id: str, buyer: str | None = None) -> dict:
        """The escrow as a dict (state as its name): its terms from the Activated event, the rest from
        getEscrow(id, terms) and the last proposal's usageDigest from its SettlementProposed event (the escrow of
        ``buyer`` when several buyers opened one under the id)."""
        activated = activation(self.escrow, agreement_id, buyer) or {}
        raw = self.escrow.functions.getEscrow(agreement_id, self.terms(agreement_id, buyer)).call()
        values = raw.values() if isinstance(raw, dict) else raw
        out = {key: value for key, value in activated.items() if key != "agreementId"}
        out.update({c["name"]: v for c, v in zip(self._escrow_fields, values, strict=True)})
        out["state"] = STATE_NAMES[out["state"]]
        proposals = self.escrow.events.SettlementProposed().get_logs(
            from_block=0, argument_filters={"agreementId": agreement_id, "buyer": activated.get("buyer")}
            if activated else {"agreementId": agreement_id})
        out["usageDigest"] = bytes(proposals[-1]["args"]["usageDigest"]) if proposals else bytes(32)
        return out

    def state(self, agreement_id: str, buyer: str | None = None) -> str:
        return self.get(agreement_id, buyer)["state"]

    def wait_past(self, timestamp: int) -> None:
        """Advance the chain so that the next transaction's block.timestamp >= timestamp."""
        now = self.chain.now()
        if now < timestamp:
            self.chain.set_next_timestamp(timestamp)
            self.chain.mine()


def activation(escrow, agreement_id: str, buyer: str | None = None) -> dict | None:
    """The args of the Activated event of ``buyer``'s escrow under ``agreement_id`` (escrows are keyed by buyer and
    id; without ``buyer``: the last escrow activated under the id); None before activation."""
    filters = {"agreementId": agreement_id} | ({"buyer": buyer} if buyer else {})
    found = escrow.events.Activated().get_logs(from_block=0, argument_filters=filters)
    return dict(found[-1]["args"]) if found else None


def escrow_terms(escrow, agreement_id: str, buyer: str | None = None) -> tuple:
    """What the contract keeps a digest of, from the Activated event (zero terms for an id never activated: the
    contract refuses those before it looks at the terms)."""
    args = activation(escrow, agreement_id, buyer)
    if args is None:
        return (ZERO_ADDRESS, ZERO_ADDRESS, ZERO_ADDRESS, ZERO_ADDRESS, 0, 0, 0, 0)
    return (args["buyer"], args["seller"], args["token"], args["receiptSigner"], args["depositAmount"],
            args["challengeWindow"], args["reclaimAfter"], args["nonce"])


def _norm(value):
    if isinstance(value, str) and value.startswith("0x") and len(value) == 42:
        return Web3.to_checksum_address(value)
    if isinstance(value, str) and value.startswith("0x") and len(value) == 66:
        return bytes.fromhex(value[2:])
    return value


@pytest.fixture
def esc(chain) -> Escrows:
    return Escrows(chain)
