from django.db.models import Count, Exists, OuterRef

from agreements.models import AgreementStatus, SkillInvocation
from escrow import chain, purchases
from escrow.models import ChainTransaction, Dispute, MasumiPurchase, TxAttempt, TxPurpose, TxStatus
from marketplace import chainconfig
from marketplace.errors import NotFound


def live_transactions(*, purpose: str):
    """Transactions of `purpose` under way or done, i.e. not failed: an agreement has at most one."""
    return ChainTransaction.objects.filter(purpose=purpose).exclude(status=TxStatus.FAILED)


def disputes():
    """Disputed agreements, each with `resolving`: whether a resolution has been submitted already."""
    resolution = live_transactions(purpose=TxPurpose.RESOLVE).filter(agreement_id=OuterRef("pk"))
    return Dispute.objects.filter(status=AgreementStatus.DISPUTED).annotate(resolving=Exists(resolution))


def transactions_of_agreement(*, agreement_id):
    return ChainTransaction.objects.filter(agreement_id=agreement_id).prefetch_related("attempts").order_by(
        "created_at")


def onchain_escrow(*, onchain_id: str) -> dict:
    """The contract's record of the escrow (raises chain.ChainError when unreachable)."""
    record = chain.call(chain.escrow_contract().functions.getEscrow(onchain_id).call)
    fields = ("buyer", "state", "challengeWindow", "seller", "expiresAt", "token", "reclaimAfter", "receiptSigner",
              "challengeDeadline", "depositAmount", "infraFee", "settledAmount", "lastSeq", "usageDigest",
              "termsHash", "buyerClaimable", "sellerClaimable")
    states = ("none", "active", "proposed", "disputed", "resolved", "settled", "reclaimed")
    values = dict(zip(fields, chain.to_json(record)))
    values["state"] = states[int(values["state"])]
    return values


def confirmations(*, tx: ChainTransaction, latest_block: int | None) -> int:
    if tx.mined_block_number is None or latest_block is None:
        return 0
    return max(0, latest_block - tx.mined_block_number + 1)


# What the contract must say for each marketplace status (several when a transaction may be in flight).
_EXPECTED_STATES = {
    "active": {"active"},
    "in_challenge": {"proposed"},
    "disputed": {"disputed", "resolved"},
    "settling": {"proposed", "resolved", "settled"},
    "settled": {"settled"},
    "refunded": {"reclaimed"},
}


def reconciliation_mismatches(*, agreements) -> list[str]:
    """Every difference between our records and the escrow contract, as readable lines (empty: consistent)."""
    mismatches = []
    for agreement in agreements:
        expected = _EXPECTED_STATES.get(agreement.status)
        if expected is None:
            continue
        onchain = onchain_escrow(onchain_id=agreement.onchain_id)
        label = f"agreement {agreement.pk} ({agreement.status})"
        if onchain["state"] not in expected:
            mismatches.append(f"{label}: contract state {onchain['state']}, expected {sorted(expected)}")
            continue
        if int(onchain["depositAmount"]) != agreement.deposit_amount:
            mismatches.append(f"{label}: deposit {onchain['depositAmount']} on-chain, {agreement.deposit_amount} here")
        if agreement.status == "in_challenge" and int(onchain["settledAmount"]) != agreement.used:
            mismatches.append(f"{label}: proposed amount {onchain['settledAmount']} on-chain, used {agreement.used}")
        if agreement.status == "settled" and int(onchain["settledAmount"]) != agreement.seller_payout:
            mismatches.append(f"{label}: seller payout {agreement.seller_payout} here, "
                              f"{onchain['settledAmount']} on-chain")
        if agreement.status in ("settled", "refunded") and (agreement.seller_payout or 0) + (
                agreement.buyer_refund or 0) != agreement.deposit_amount:
            mismatches.append(f"{label}: payout + refund != deposit")
    return mismatches


def purchases_of_buyer(*, buyer):
    return MasumiPurchase.objects.filter(agreement__buyer=buyer).select_related(
        "agreement", "agreement__service", "agreement__seller")


def purchase_get(*, buyer, blockchain_identifier: str) -> MasumiPurchase:
    """The buyer's purchase with this blockchainIdentifier (the escrow's agreementId), else 404."""
    purchase = purchases_of_buyer(buyer=buyer).filter(
        agreement__pk=purchases.blockchain_identifier_to_agreement_id(blockchain_identifier)).first()
    if purchase is None:
        raise NotFound("No such purchase.", code="purchase_not_found")
    return purchase


def transaction_counts_by_purpose_and_status() -> dict[tuple[str, str], int]:
    rows = ChainTransaction.objects.order_by().values_list("purpose", "status").annotate(count=Count("pk"))
    return {(purpose, status): count for purpose, status, count in rows}


def transactions_failed_recently(*, limit: int):
    return ChainTransaction.objects.filter(status=TxStatus.FAILED).order_by("-updated_at")[:limit]


def invocation_of_transaction(*, tx: ChainTransaction):
    """The skill invocation a payment, payout or refund transaction is for (named in its context), if any."""
    invocation_id = (tx.context or {}).get("invocation_id")
    if not invocation_id:
        return None
    return SkillInvocation.objects.select_related("skill", "seller").filter(pk=invocation_id).first()


def transactions_unconfirmed_since(*, before):
    """Queued, submitted or mined, with no change since before `before`."""
    return (ChainTransaction.objects.filter(status__in=[TxStatus.QUEUED, TxStatus.SUBMITTED, TxStatus.MINED],
                                            updated_at__lt=before).order_by("updated_at"))


def transactions_at_fee_cap(*, max_fee_per_gas: int):
    """Transactions broadcast and not mined whose attempts already bid the fee cap: the relayer only rebroadcasts
    them now, and an operator decides (raise the cap, wait for fees to fall). Read from the attempts' fees, so a
    status the relayer may give such transactions is covered too: every status of a transaction in flight counts."""
    at_cap = TxAttempt.objects.filter(transaction=OuterRef("pk"), max_fee_per_gas__gte=max_fee_per_gas)
    not_in_flight = [TxStatus.QUEUED, TxStatus.MINED, TxStatus.CONFIRMED, TxStatus.FAILED]
    return ChainTransaction.objects.exclude(status__in=not_in_flight).filter(Exists(at_cap)).order_by("updated_at")


def platform_wallet_balances() -> dict[str, int]:
    """The relayer's gas (wei) and the treasury's USDC (base units); the relayer wallet is the treasury
    (invocation payments land there; payouts, refunds and returned fees leave from it). Raises chain.ChainError."""
    address = chainconfig.relayer_address()
    return {"gas_wei": chain.call(lambda: chain.w3().eth.get_balance(address)),
            "usdc": chain.call(chain.token_contract().functions.balanceOf(address).call)}
