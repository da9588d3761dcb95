from escrow import chain
from escrow.models import ChainTransaction


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
