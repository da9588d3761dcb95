from django.db.models import Count, Exists, OuterRef, Q

from agreements.models import AgreementStatus
from escrow import chain, purchases
from escrow.models import ChainTransaction, Dispute, MasumiPaymentRequest, MasumiPurchase, TxPurpose, TxStatus
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


def _by_blockchain_identifier(blockchain_identifier: str) -> Q:
    """A purchase's blockchainIdentifier: its escrow's agreementId, or the seller's payment request it pays."""
    uid = purchases.blockchain_identifier_to_agreement_id(blockchain_identifier)
    return Q(agreement__pk=uid) | Q(payment_request__pk=uid)


def purchase_get(*, buyer, blockchain_identifier: str) -> MasumiPurchase:
    """The buyer's purchase with this blockchainIdentifier, else 404."""
    purchase = purchases_of_buyer(buyer=buyer).filter(_by_blockchain_identifier(blockchain_identifier)).first()
    if purchase is None:
        raise NotFound("No such purchase.", code="purchase_not_found")
    return purchase


def purchase_get_by_id(*, buyer, purchase_id) -> MasumiPurchase:
    purchase = purchases_of_buyer(buyer=buyer).filter(pk=purchase_id).first()
    if purchase is None:
        raise NotFound("No such purchase.", code="purchase_not_found")
    return purchase


def payment_request_get(*, blockchain_identifier: str) -> MasumiPaymentRequest:
    """A seller's payment request, for the buyer who pays it (anyone holding its blockchainIdentifier)."""
    request = MasumiPaymentRequest.objects.select_related("service", "service__seller").filter(
        pk=purchases.blockchain_identifier_to_agreement_id(blockchain_identifier)).first()
    if request is None:
        raise NotFound("No payment request of this marketplace has this blockchainIdentifier.",
                       code="payment_not_found")
    return request


def payments_of_seller(*, seller):
    """The seller's side: its purchased jobs (as MasumiPurchase) and its unpaid payment requests."""
    paid = MasumiPurchase.objects.filter(agreement__seller=seller).select_related(
        "agreement", "agreement__service", "payment_request")
    unpaid = MasumiPaymentRequest.objects.filter(service__seller=seller, purchase__isnull=True).select_related(
        "service", "service__seller")
    return paid, unpaid


def payment_get(*, seller, blockchain_identifier: str) -> MasumiPurchase | MasumiPaymentRequest:
    """The seller's payment with this blockchainIdentifier: the purchase paying it, else the unpaid request."""
    paid, unpaid = payments_of_seller(seller=seller)
    found = paid.filter(_by_blockchain_identifier(blockchain_identifier)).first() or unpaid.filter(
        pk=purchases.blockchain_identifier_to_agreement_id(blockchain_identifier)).first()
    if found is None:
        raise NotFound("No such payment.", code="payment_not_found")
    return found


def transaction_counts_by_purpose_and_status() -> dict[tuple[str, str], int]:
    rows = ChainTransaction.objects.order_by().values_list("purpose", "status").annotate(count=Count("pk"))
    return {(purpose, status): count for purpose, status, count in rows}


def transactions_failed_recently(*, limit: int):
    return ChainTransaction.objects.filter(status=TxStatus.FAILED).order_by("-updated_at")[:limit]
