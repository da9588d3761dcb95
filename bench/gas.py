"""Gas per settled agreement on UsageEscrow, against a one-shot x402 payment.

    .venv/bin/python bench/gas.py [--goal 300000] [--agreements 3]

What it does, in order:
1. Starts its own Anvil on a free loopback port (automine) and deploys MockUSDC and UsageEscrow from the committed
   artifacts (escrow/contracts/build), as `make run` does; Anvil's key #0 is admin, operator (relayer) and minter.
2. Settles `--agreements` agreements, each with a new buyer, seller and fee recipient (fresh keys), along the
   relayer's path: `activate` (the buyer's signed intent and ONE permit for deposit + fee, as the SDK signs it),
   `proposeSettlement` (a receipt for 60% of the deposit, so both parties are paid at finalize) and `finalize`
   once the challenge window is over. Calls after activation carry the escrow's terms (the contract stores their
   digest), read back from the Activated event. Two cases:
   - fresh: the seller's payout and the fee recipient's fee are the first tokens those addresses ever receive
     (a zero balance becomes non-zero: the token's most expensive storage write);
   - warm: the seller and the fee recipient already hold tokens, as a platform's fee recipient and a repeat seller
     do in steady state.
   The buyer is new in both (its first permit), holds more than it escrows (its refund lands on a non-zero
   balance), and one agreement was settled before the measured ones (the escrow's balance and accrued fees are
   not zero).
3. Sends one x402 payment: one `transferWithAuthorization` of MockUSDC (EIP-3009), to a fresh and to a warm payee.
4. Pays the accrued infra fees to the fee recipient (`payFees`): one call for any number of agreements, so it is
   printed apart from the per-agreement steps.
5. Prints gas per step (the median over the agreements; every run is identical) and the ratio of each case's
   total to the x402 payment of the same kind.

The goal (`--goal`, issue 18: 300,000) applies to the fresh case, the more expensive one: a new seller's first
agreement must meet it too. Exit status: 0 when the fresh total is at most the goal, 1 otherwise, 2 when the set-up
failed or the global timeout (`--timeout`, default 300 s) passed. Anvil is stopped on every exit.
"""

import argparse
import contextlib
import secrets
import statistics
import sys
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from eth_account import Account  # noqa: E402
from web3 import Web3  # noqa: E402
from web3.logs import DISCARD  # noqa: E402

from bench.harness import SetupFailed, run_bounded  # noqa: E402
from escrow import devchain  # noqa: E402
from sdk import typed_data as td  # noqa: E402

USDC = 10**6
QUANTITY, UNIT_PRICE = 100, 20_000  # deposit 2 USDC
INFRA_FEE = 100_000  # 0.10 USDC, the platform's minimum
SELLER_SHARE = 60  # percent of the deposit the receipt claims
CHALLENGE_WINDOW = 600
RECLAIM_GRACE = 3600
STEPS = ("activate", "proposeSettlement", "finalize")


@dataclass(frozen=True)
class Deployment:
    w3: Web3
    deployer_key: str
    escrow: object
    usdc: object
    chain_id: int


def _new_account():
    return Account.from_key("0x" + secrets.token_hex(32))


def _tx(d: Deployment, fn) -> dict:
    """Send ``fn`` from the relayer (key #0) with a fixed gas limit, so the measured gas is the execution's own."""
    receipt = devchain.send_transaction(d.w3, d.deployer_key, fn.build_transaction(
        {"from": devchain.DEV_ADDRESSES[0], "gas": 3_000_000}))
    return receipt


def _mint(d: Deployment, to: str, amount: int) -> None:
    devchain.mint_usdc(d.w3, d.usdc.address, d.deployer_key, to, amount)


def _now(d: Deployment) -> int:
    return d.w3.eth.get_block("latest")["timestamp"]


def _fee_recipient(d: Deployment, warm: bool) -> str:
    recipient = _new_account().address
    _tx(d, d.escrow.functions.setFeeRecipient(recipient))
    if warm:
        _mint(d, recipient, 1)
    return recipient


def settle_one(d: Deployment, *, warm: bool) -> dict[str, int]:
    """One agreement from activation to finalize, with new parties; gas used per step."""
    buyer, seller, signer = _new_account(), _new_account(), _new_account()
    _fee_recipient(d, warm)
    if warm:
        _mint(d, seller.address, 1)
    deposit = QUANTITY * UNIT_PRICE
    _mint(d, buyer.address, deposit + INFRA_FEE + 10 * USDC)  # a buyer with money left after the deposit
    now = _now(d)
    typed = td.activation_intent(
        chain_id=d.chain_id, escrow_address=d.escrow.address, agreement_id="0x" + secrets.token_hex(32),
        buyer=buyer.address, seller=seller.address, token=d.usdc.address, quantity=QUANTITY,
        price_per_unit=UNIT_PRICE, deposit_amount=deposit, infra_fee=INFRA_FEE, receipt_signer=signer.address,
        challenge_window=CHALLENGE_WINDOW, expires_at=now + 86_400, terms_hash="0x" + secrets.token_hex(32),
        nonce=secrets.randbits(128), deadline=now + 3600,
    )
    permit = td.erc2612_permit(
        chain_id=d.chain_id, token_address=d.usdc.address, owner=buyer.address, spender=d.escrow.address,
        value=deposit + INFRA_FEE, nonce=d.usdc.functions.nonces(buyer.address).call(), deadline=now + 3600,
    )
    escrow_permit = td.onchain_permit(value=deposit + INFRA_FEE, deadline=now + 3600,
                                      signature=td.sign_typed_data(buyer.key, permit))
    gas = {}
    receipt = _tx(d, d.escrow.functions.activate(td.message_tuple(typed), td.sign_typed_data(buyer.key, typed),
                                                 escrow_permit, td.EMPTY_PERMIT))
    gas["activate"] = receipt["gasUsed"]

    agreement_id = typed["message"]["agreementId"]
    [activated] = d.escrow.events.Activated().process_receipt(receipt, errors=DISCARD)
    args = activated["args"]
    terms = (args["buyer"], args["seller"], args["token"], args["receiptSigner"], args["depositAmount"],
             args["challengeWindow"], args["reclaimAfter"], args["nonce"])
    amount, usage_digest = deposit * SELLER_SHARE // 100, "0x" + secrets.token_hex(32)
    receipt_typed = td.usage_receipt(chain_id=d.chain_id, escrow_address=d.escrow.address,
                                     agreement_id=agreement_id, seq=1, cumulative_amount=amount,
                                     usage_digest=usage_digest)
    receipt = _tx(d, d.escrow.functions.proposeSettlement(agreement_id, terms, 1, amount, usage_digest,
                                                          td.sign_typed_data(signer.key, receipt_typed)))
    gas["proposeSettlement"] = receipt["gasUsed"]

    d.w3.provider.make_request("evm_increaseTime", [CHALLENGE_WINDOW])
    receipt = _tx(d, d.escrow.functions.finalize(agreement_id, terms))
    gas["finalize"] = receipt["gasUsed"]
    if d.usdc.functions.balanceOf(seller.address).call() != amount + (1 if warm else 0):
        raise SetupFailed("the seller was not paid what the receipt says")
    return gas


def x402_payment(d: Deployment, *, warm: bool) -> int:
    """One EIP-3009 transferWithAuthorization of 2 USDC from a funded payer to a new payee, submitted by the
    facilitator (key #0)."""
    payer, payee = _new_account(), _new_account()
    _mint(d, payer.address, 10 * USDC)
    if warm:
        _mint(d, payee.address, 1)
    now = _now(d)
    value, nonce = QUANTITY * UNIT_PRICE, "0x" + secrets.token_hex(32)
    typed = td.transfer_with_authorization(
        chain_id=d.chain_id, token_address=d.usdc.address, from_address=payer.address, to_address=payee.address,
        value=value, valid_after=0, valid_before=now + 3600, nonce=nonce,
    )
    v, r, s = td.split_signature(td.sign_typed_data(payer.key, typed))
    fn = d.usdc.get_function_by_signature(
        "transferWithAuthorization(address,address,uint256,uint256,uint256,bytes32,uint8,bytes32,bytes32)")
    receipt = _tx(d, fn(payer.address, payee.address, value, 0, now + 3600, nonce, v, r, s))
    return receipt["gasUsed"]


def run(stack: contextlib.ExitStack, args) -> int:
    try:
        node = devchain.start_anvil()
    except (devchain.AnvilNotFound, devchain.AnvilStartError) as exc:
        raise SetupFailed(f"cannot start Anvil: {exc}") from exc
    stack.callback(node.stop)
    w3 = node.w3()
    key = devchain.DEV_PRIVATE_KEYS[0]
    addresses = devchain.deploy_contracts(w3, key, fee_recipient=devchain.DEV_ADDRESSES[2],
                                          arbiter=devchain.DEV_ADDRESSES[1], reclaim_grace=RECLAIM_GRACE)
    d = Deployment(w3, key, devchain.escrow_contract(w3, addresses["escrow"]),
                   devchain.usdc_contract(w3, addresses["usdc"]), w3.eth.chain_id)
    # Steady state: one agreement settled before the measured ones (the escrow's balance and its other
    # bookkeeping are not zero any more).
    settle_one(d, warm=True)

    print(f"UsageEscrow at {d.escrow.address}, MockUSDC at {d.usdc.address} (chain {d.chain_id}); "
          f"deposit {QUANTITY * UNIT_PRICE / USDC:.2f} USDC, fee {INFRA_FEE / USDC:.2f} USDC, "
          f"{args.agreements} agreement(s) per case")
    results = {}
    for case, warm in (("fresh", False), ("warm", True)):
        runs = [settle_one(d, warm=warm) for _ in range(args.agreements)]
        per_step = {step: int(statistics.median(r[step] for r in runs)) for step in STEPS}
        per_step["total"] = sum(per_step[step] for step in STEPS)
        x402 = int(statistics.median(x402_payment(d, warm=warm) for _ in range(args.agreements)))
        results[case] = (per_step, x402)

    print(f"\n{'step':<20}{'fresh parties':>16}{'warm parties':>16}")
    for step in (*STEPS, "total"):
        print(f"{step:<20}{results['fresh'][0][step]:>16,}{results['warm'][0][step]:>16,}")
    print(f"{'x402 payment':<20}{results['fresh'][1]:>16,}{results['warm'][1]:>16,}")
    ratios = {case: per_step["total"] / x402 for case, (per_step, x402) in results.items()}
    print(f"{'escrow / x402':<20}{ratios['fresh']:>15.2f}x{ratios['warm']:>15.2f}x")
    fees = _tx(d, d.escrow.functions.payFees(d.usdc.address))["gasUsed"]
    print(f"\npayFees (pays the fee recipient every fee accrued since the last call, any number of agreements): "
          f"{fees:,}")
    fresh_total = results["fresh"][0]["total"]
    verdict = "met" if fresh_total <= args.goal else "NOT met"
    print(f"\ngoal: at most {args.goal:,} gas per settled agreement, fresh parties: {fresh_total:,} ({verdict})")
    return 0 if fresh_total <= args.goal else 1


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--goal", type=int, default=300_000, help="gas per settled agreement, fresh parties")
    parser.add_argument("--agreements", type=int, default=3, help="agreements per case (1..50)")
    parser.add_argument("--timeout", type=int, default=300, help="global timeout in seconds")
    args = parser.parse_args()
    if not 1 <= args.agreements <= 50:
        parser.error("--agreements must be between 1 and 50")
    return run_bounded(lambda stack: run(stack, args), args.timeout)


if __name__ == "__main__":
    sys.exit(main())
