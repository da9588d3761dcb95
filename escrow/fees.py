"""Infra fees on-chain: the contract accrues each activation's fee per token (`feesAccrued`) and pays it all to
its fee recipient in one `payFees(token)`. `fees_pay` (a beat task) queues that call through the relayer when a
token's accrued fee is above zero, one call under way at a time (a database constraint keeps it so)."""

import functools
import logging
from datetime import UTC, datetime, timedelta

from django.conf import settings
from django.db import IntegrityError, transaction
from django.db.models import Max
from django.utils import timezone
from web3 import Web3
from web3.logs import DISCARD

from agreements.models import UsageAgreement
from escrow import chain, relayer
from escrow.models import ChainTransaction, TxPurpose, TxStatus
from escrow.settlement import DONE_BY
from marketplace import chainconfig

logger = logging.getLogger(__name__)


def _fee_tokens() -> list[str]:
    """The tokens agreements were made in (a blank token is the default one), checksummed, those never sent a payment
    first, then by their last payment's age: a token whose payFees keeps reverting (the fee recipient blacklisted by
    it, as USDC can) takes its turn after the others, not before them at every run."""
    addresses = UsageAgreement.objects.values_list("token_address", flat=True).distinct()
    tokens = ({Web3.to_checksum_address(address or chain.token_address()) for address in addresses}
              | {Web3.to_checksum_address(chain.token_address())})
    last_sent = dict(ChainTransaction.objects.filter(purpose=TxPurpose.PAY_FEES).values_list("context__token")
                     .annotate(last=Max("created_at")).order_by())
    return sorted(tokens, key=lambda token: (last_sent.get(token, _NEVER), token))


_NEVER = datetime.min.replace(tzinfo=UTC)


def _fee_payment_under_way() -> bool:
    return ChainTransaction.objects.filter(purpose=TxPurpose.PAY_FEES, status__in=[
        TxStatus.QUEUED, TxStatus.SUBMITTED, TxStatus.MINED]).exists()


# How many of a token's last payments `_waiting_after_failures` looks at; the wait doubles up to this many failures.
_FAILURES_COUNTED = 6


def _waiting_after_failures(token: str, *, now: datetime) -> bool:
    """Whether `token`'s fee payment waits after its last ones were mined failed, each paying its gas: for
    PAY_FEES_RETRY_AFTER_SECONDS after the last of them, doubled with each one before it in a row. A payment that
    fails every time (a node estimating its gas short with a plausible figure: out of gas, `relayer.OUT_OF_GAS`) was
    sent again at every run of the task, at the platform's gas each time. One refused at its simulation, never sent,
    cost nothing and waits for nothing."""
    last = list(ChainTransaction.objects.filter(purpose=TxPurpose.PAY_FEES, context__token=token)
                .exclude(status__in=[TxStatus.QUEUED, TxStatus.SUBMITTED, TxStatus.MINED])
                .order_by("-created_at").values_list("status", "mined_block_number", "outcome_evidence",
                                                     "updated_at")[:_FAILURES_COUNTED])
    failures = 0
    for status, mined_block, evidence, _ in last:
        if status != TxStatus.FAILED or mined_block is None or (evidence or {}).get(DONE_BY):
            break  # paid, by us or by someone else first (no failure), or refused unsent (no gas paid)
        failures += 1
    if failures == 0:
        return False
    wait = timedelta(seconds=settings.PAY_FEES_RETRY_AFTER_SECONDS * 2 ** (failures - 1))
    return now < last[0][3] + wait


def fees_pay(*, now: datetime | None = None) -> ChainTransaction | None:
    """Queue `payFees` for the first token with an accrued fee (`_fee_tokens`' order) not waiting after failed
    payments (`_waiting_after_failures`), unless one is under way. Safe to call repeatedly."""
    if _fee_payment_under_way():
        return None
    now = now or timezone.now()
    tokens = [token for token in _fee_tokens() if not _waiting_after_failures(token, now=now)]
    if not tokens:
        return None
    escrow = chain.escrow_contract()
    # Chain reads, before any transaction; at one block, which a payment someone else makes after it is looked for from
    # (`_fees_paid_evidence`).
    block = chain.latest_block_number()
    for token in tokens:
        accrued = chain.call(functools.partial(escrow.functions.feesAccrued(token).call, block_identifier=block))
        if accrued == 0:
            continue
        try:
            with transaction.atomic():
                return relayer.transaction_enqueue(
                    purpose=TxPurpose.PAY_FEES, to=chainconfig.escrow_address(),
                    data=escrow.encode_abi("payFees", args=[token]),
                    context={"token": token, "accrued": accrued, _READ_AT_BLOCK: block})
        except IntegrityError:
            return None  # another tick queued one meanwhile
    return None


# The context key of the block the fee accrued was read at.
_READ_AT_BLOCK = "read_at_block"


def _fees_paid_evidence(tx: ChainTransaction) -> dict:
    """The amount and recipient of the escrow's FeesPaid event for the token paid, in the payment's own receipt (the
    gateway's: of that transaction) of the block the relayer concluded it on. Raises ChainError otherwise (a reorg
    took it since, or a node answers another block's or transaction's receipt): read again at the next poll. For one
    that failed, the payment someone else made of the token's fee after it was read accrued (anyone may call payFees):
    that transaction and its block (relayer.EVIDENCE_BLOCK: no failure for an operator; a reorg that takes it reopens
    ours), else nothing."""
    if tx.status != TxStatus.CONFIRMED:
        if _READ_AT_BLOCK not in tx.context:
            return {}  # queued before the block was kept
        paid = chain.fees_paid_after(tx.context["token"], block=tx.context[_READ_AT_BLOCK])
        if paid is None:
            return {}
        return {DONE_BY: chain.hex_text(paid["transactionHash"]),
                relayer.EVIDENCE_BLOCK: {"number": paid["blockNumber"], "hash": chain.hex_text(paid["blockHash"])},
                "amount": paid["args"]["amount"], "fee_recipient": paid["args"]["feeRecipient"]}
    mined = relayer.concluded_receipt(tx)
    escrow = chain.escrow_contract()
    [paid] = [event for event in escrow.events.FeesPaid().process_receipt({"logs": mined.logs}, errors=DISCARD)
              if event["address"] == escrow.address and event["args"]["token"] == tx.context["token"]]
    return {"amount": paid["args"]["amount"], "fee_recipient": paid["args"]["feeRecipient"]}


def _fees_paid_outcome(tx: ChainTransaction) -> None:
    if tx.status == TxStatus.CONFIRMED:
        logger.info("infra fees paid", extra={"token": tx.context["token"], **tx.outcome_evidence})
    elif tx.outcome_evidence.get(DONE_BY):
        logger.info("infra fees paid by another transaction first", extra={"token": tx.context["token"],
                                                                           **tx.outcome_evidence})
    else:  # the next run queues another while fees are accrued
        logger.warning("infra fee payment failed", extra={"token": tx.context["token"],
                                                          "reason": tx.failure_reason})


def handlers_register() -> None:
    """Called once, from EscrowConfig.ready()."""
    relayer.outcome_handler_register(purpose=TxPurpose.PAY_FEES, on_outcome=_fees_paid_outcome,
                                     read_evidence=_fees_paid_evidence)
