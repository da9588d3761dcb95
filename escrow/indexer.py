"""The chain indexer: the escrow contract's events, read continuously, drive the agreements whoever sent them.

The relayer only knows its own transactions; anyone may call the contract (the seller's `proposeSettlement`, the
buyer's `reclaim`, anyone's `finalize`). `index_pass` reads, with `eth_getLogs` in ranges of at most
INDEXER_BLOCK_RANGE blocks (following the head, at most INDEXER_LOGS_BY_HASH_BLOCKS new ones: block by block, by
hash, which a node behind refuses rather than answering empty), from the escrow's deployment block up to the block
CHAIN_CONFIRMATIONS deep (and no newer than the node's `safe` or `finalized` block when INDEXER_HEAD_TAG names one;
deep meaning the blocks above it up to that depth descend from it: `_confirmed_above`):

- every escrow event, and every token `Transfer` of a non-zero amount from or to the escrow, the treasury (relayer)
  or the fee recipient, stored once as a `ChainEvent` (unique by block hash and log index);
- each escrow event moves its agreement through agreements' services (`_TARGETS`): the same calls the relayer's
  receipts make, so whichever of the two comes first applies the transition and the other is a no-op;
- an event that cannot be applied (an illegal transition, an escrow that is not this agreement's intent) is
  stored with `effect=failed` and its error, shown in the admin and by `reconcile`; the indexer goes on. It is
  tried again once its agreement has moved, in the chain's order (`_failed_events_retry`), once per move.

One range is applied in one DB transaction that also moves the cursor, under the cursor's row lock and only if
the cursor is still where this runner read it (compare-and-set): a runner killed anywhere leaves the range
wholly applied or not at all, and two runners can never apply it twice. Chain calls happen before that
transaction, never inside it. On PostgreSQL a session advisory lock also keeps a second runner from doing the
same reads (it goes away with a killed process's connection).

Reorgs: the indexer keeps the hash of every range's last block and of every block with an event. A pass first
checks the cursor's block; when its hash is no longer canonical, the newest stored block on the new branch (walked
down by parent hashes from its block at the confirmation depth above the cursor's height) becomes the fork point,
once the new branch is one chain from it to that depth (a stale backend's block at that height is no reorg): the events after it are marked removed, and each agreement they touched is moved back to what
its remaining canonical events say (the target of its newest remaining event; with none left, the status it
had before the first removed one) — only while its status is one a removed event produced, so a step the
marketplace took on its own since is left alone. Indexing then resumes after the fork point and applies the
canonical events. A reorg deeper than the confirmation depth may also take one of the relayer's concluded
transactions (confirmed, or reverted) off the chain: after a rollback the relayer is asked to reopen those
(`relayer.transactions_reopen_reorged`; its poll does the same for blocks the indexer has not applied yet), so
the transaction is mined again with the same signed bytes and its event comes back.
"""

import logging
from dataclasses import dataclass
from datetime import UTC, datetime

from django.conf import settings
from django.contrib.auth.base_user import AbstractBaseUser
from django.db import InterfaceError, OperationalError, transaction
from django.db.models import F
from django.utils import timezone
from eth_utils import event_abi_to_log_topic
from web3 import Web3

from agreements import services as agreement_services
from agreements.models import AgreementStatus, SettlementModel, UsageAgreement
from escrow import artifacts, chain, relayer, selectors, services, settlement
from escrow.models import ChainEvent, EventEffect, IndexedBlock, IndexerCursor
from marketplace import chainconfig, postgresql
from marketplace.errors import ApplicationError, Conflict

logger = logging.getLogger(__name__)
S = AgreementStatus

# What each escrow event means for the agreement, and the status it normally comes from (restored by a reorg
# when the relayer's receipt had applied the transition first).
_TARGETS = {
    "Activated": (S.ACTIVE, S.SUBMITTING),
    "SettlementProposed": (S.IN_CHALLENGE, S.ACTIVE),
    "Challenged": (S.DISPUTED, S.IN_CHALLENGE),
    "Resolved": (S.SETTLING, S.DISPUTED),
    # From disputed too (agreement_settled): anyone's finalize of a dispute past its timeout, the buyer refunded whole.
    "Settled": (S.SETTLED, S.SETTLING),
    "Reclaimed": (S.REFUNDED, S.ACTIVE),
}
_TRANSFER = "Transfer"
_TRANSFER_TOPIC = Web3.keccak(text="Transfer(address,address,uint256)").to_0x_hex()


class ReorgTooDeep(chain.ChainError):
    """No stored block is canonical any more: the reorg is deeper than INDEXER_REORG_WINDOW_BLOCKS."""


@dataclass
class PassResult:
    head: int | None = None
    indexed_to: int | None = None
    ranges: int = 0
    events: int = 0
    rolled_back: int = 0
    skipped: bool = False  # another runner holds the indexer

    def as_dict(self) -> dict:
        return dict(self.__dict__)


def _cursor() -> IndexerCursor:
    cursor, _ = IndexerCursor.objects.get_or_create(
        chain_id=settings.CHAIN_ID, escrow_address=Web3.to_checksum_address(chainconfig.escrow_address()),
        defaults={"start_block": chainconfig.escrow_deployment_block()})
    return cursor


def _safe_head(head: int) -> int:
    """The newest block at the confirmation depth (depth 1: the head itself), and no newer than the node's
    INDEXER_HEAD_TAG block (`safe` or `finalized`) where the chain has one."""
    safe = head - max(settings.CHAIN_CONFIRMATIONS, 1) + 1
    if settings.INDEXER_HEAD_TAG:
        safe = min(safe, chain.tagged_block_number(settings.INDEXER_HEAD_TAG))
    return safe


# --- the pass --------------------------------------------------------------------------------------------------

def index_pass(*, max_ranges: int | None = None) -> PassResult:
    """Check for a reorg, then apply every range up to the confirmation depth (at most `max_ranges`)."""
    result = PassResult()
    if not chainconfig.escrow_address():
        return result
    # The cursor's compare-and-set alone keeps runners from applying twice where the lock is not there (SQLite).
    with postgresql.alone(f"escrow-indexer:{settings.CHAIN_ID}") as mine:
        if not mine:
            result.skipped = True
            return result
        cursor = _cursor()
        cursor_pk = cursor.pk
        try:
            chain.node_chain_check()  # another chain's events applied to this one's agreements
            result.head = chain.latest_block_number()
            IndexerCursor.objects.filter(pk=cursor_pk).update(head_block=result.head, head_seen_at=timezone.now())
            before = cursor.last_block
            cursor, result.rolled_back = _follow_reorg(cursor)
            if cursor is not None and cursor.last_block != before:
                relayer.transactions_reopen_reorged()  # after the agreements are back: see the relayer
            safe = _safe_head(result.head)
            while cursor is not None and cursor.next_block <= safe:
                if max_ranges is not None and result.ranges >= max_ranges:
                    break
                start = cursor.next_block
                end = min(start + settings.INDEXER_BLOCK_RANGE - 1, safe)
                # Up to INDEXER_RESCAN_BLOCKS below the cursor, within INDEXER_BLOCK_RANGE: an eth_getLogs answered
                # by a node behind the one that named `end` holds no logs of the blocks it lacks, and they are found
                # by this read of the next range. Following the head (at most INDEXER_LOGS_BY_HASH_BLOCKS new), the
                # new blocks are read by hash, which such a node refuses: complete without it (`_fetch`).
                read_from = max(start - settings.INDEXER_RESCAN_BLOCKS, end - settings.INDEXER_BLOCK_RANGE + 1,
                                cursor.start_block)
                # Following the head (at most INDEXER_LOGS_BY_HASH_BLOCKS to go), the new blocks are read by hash.
                near_head = 0 < safe - start + 1 <= settings.INDEXER_LOGS_BY_HASH_BLOCKS
                # Deeper below the head than a reorg the indexer follows, a range is final: read without walking it.
                final = result.head - end > settings.INDEXER_REORG_WINDOW_BLOCKS
                fetched = _fetch(cursor, read_from, end, new_from=start if near_head else None, final=final)
                if fetched is None:
                    break  # the chain changed while we read: the next pass starts with the reorg check
                end_hash, logs = fetched
                if end == safe and not _confirmed_above(end, end_hash):
                    break  # the head named is not on top of `end`: the next pass reads it again
                cursor = _apply_range(cursor, end, end_hash, logs)
                result.ranges += 1
                result.events += sum(log["blockNumber"] >= start for log in logs)
        except chain.ChainError as error:
            IndexerCursor.objects.filter(pk=cursor_pk).update(last_error=f"{type(error).__name__}: {error}"[:500])
            raise
        _failed_events_retry()
        IndexerCursor.objects.filter(pk=cursor_pk).exclude(last_error="").update(last_error="")
        result.indexed_to = IndexerCursor.objects.values_list("last_block", flat=True).get(pk=cursor_pk)
    return result


def _confirmed_above(number: int, block_hash: str) -> bool:
    """Whether block `number` (`block_hash`) is at the confirmation depth over blocks that descend from it
    (`chain.blocks_above_descend`): a stale backend's branch was applied 1 block deep, on no chain. Asked of a pass's
    last range (the newest blocks: below them, a branch the chain dropped is a reorg deeper than the depth,
    `_follow_reorg`)."""
    return chain.blocks_above_descend(number, block_hash, depth=settings.CHAIN_CONFIRMATIONS)


def _fetch(cursor: IndexerCursor, start: int, end: int, *, new_from: int | None = None,
           final: bool = False) -> tuple[str, list] | None:
    """The logs of [start, end] and the hash of `end`; None when the chain changed while we read (a reorg), or a
    node has not a block of it yet: `end` must keep its hash across the reads, and the cursor's block must still be
    canonical after them. With `new_from` (the pass follows the head: at most INDEXER_LOGS_BY_HASH_BLOCKS to go),
    the blocks from it are read one by one by hash (`_block_logs`), and only the rescanned ones below as a range.
    Those must be a chain, each block the parent of the next, from the cursor's to `end`'s: a load-balanced
    provider's backend that has not followed a reorg answers a height with the block of the fork the chain left,
    whose events no reorg check would compare again (the cursor's block being canonical). Read as a range, `end`
    must descend from the cursor's block, and each block holding a log from `end`, walked by parent hashes
    (`_range_logs_check`), unless `final` (deeper below the head than INDEXER_REORG_WINDOW_BLOCKS, where no reorg the
    indexer follows reaches: a catch-up reads no header a block there, each log's block checked by its height)."""
    end_hashes = chain.canonical_block_hashes(end)
    end_hash = None if end_hashes is None else end_hashes[0]
    range_end = end if new_from is None else new_from - 1
    logs = _range_logs(start, range_end) if start <= range_end else []
    if new_from is not None:
        parent = cursor.last_block_hash if cursor.last_block == new_from - 1 else None
        for number in range(new_from, end + 1):
            hashes = end_hashes if number == end else chain.canonical_block_hashes(number)
            if hashes is None:
                return None  # this node is behind: the next pass reads it again
            if parent is not None and hashes[1] != parent:
                return None  # not one chain: a reorg while we read, or a backend still on another fork
            parent = hashes[0]
            logs += _block_logs(parent)
    if end_hash is None or chain.canonical_block_hash(end) != end_hash:
        return None
    if cursor.last_block is not None and chain.canonical_block_hash(cursor.last_block) != cursor.last_block_hash:
        return None
    # The blocks read by hash are one chain from the cursor's (checked above, `parent`): the range's logs below them
    # are checked against it from the cursor's block down, a walk the previous pass's made already (cached).
    top = (cursor.last_block, cursor.last_block_hash) if new_from is not None and cursor.last_block is not None \
        else (end, end_hash)
    if not _range_logs_check([log for log in logs if new_from is None or log["blockNumber"] < new_from], top,
                             by_height=final):
        return None
    # Read as a range, `end` must descend from the cursor's block (read by hash, as the logs' blocks): a backend still
    # on a branch a reorg dropped answers the cursor's height with its block, hiding the reorg, and the range of the
    # new branch was applied on top, the dropped branch's events left applied for good.
    if new_from is None and cursor.last_block is not None and not final and (
            (chain.block_below((end, end_hash), cursor.last_block) or "").lower() != cursor.last_block_hash.lower()):
        logger.warning("the indexer's range does not descend from its last block: a reorg not seen yet, or a node "
                       "behind; read again at the next pass", extra={"block": cursor.last_block, "end": end})
        return None
    unique = {(chain.hex_text(log["blockHash"]), log["logIndex"]): log for log in logs}  # a transfer may match both queries
    return end_hash, sorted(unique.values(), key=lambda log: (log["blockNumber"], log["logIndex"]))


def _range_logs_check(logs: list, top: tuple[int, str], *, by_height: bool = False) -> bool:
    """The logs of a range read are of the blocks of the chain that ends with block `top` (number, hash): each block
    holding one is `top`'s ancestor at its height, read from `top` down by parent hashes (`chain.block_below`: a
    block by its hash is the same whichever backend answers it). UntrustedAnswer otherwise; False when a block of
    that walk is not found (a node behind: the next pass reads the range again). A load-balanced provider's backend
    still on a fork a reorg left answers that fork's logs, and a height with its block: checked by its height alone,
    a dead block in the middle of a range caught up passed, its event stored under a block no reorg check compares
    with the chain again (the cursor's block being canonical), applied for good. The walk costs one header a block,
    from `top` down to the lowest block holding a log, once per process (`chain._parent_hash` keeps them), as
    following the head reads one a block; a range without logs walks nothing. `by_height`: a final range's (deeper
    than a reorg the indexer follows), each block holding a log asked by its height, no walk."""
    for number, block_hash in sorted({(log["blockNumber"], chain.hex_text(log["blockHash"]).lower())
                                      for log in logs}, reverse=True):
        found = chain.canonical_block_hash(number) if by_height else chain.block_below(top, number)
        if found is None:
            return False
        if found.lower() != block_hash:
            raise chain.UntrustedAnswer(f"the node answered logs of block {number} under hash {block_hash:.80}, "
                                        f"not the chain's block at that height below block {top[0]}")
    return True


def _range_logs(start: int, end: int) -> list:
    escrow = chainconfig.escrow_address()
    logs = chain.logs(address=escrow, from_block=start, to_block=end)
    watched = [chain.address_topic(address) for address in _watched_addresses()]
    for topics in ([_TRANSFER_TOPIC, watched], [_TRANSFER_TOPIC, None, watched]):
        logs += chain.logs(address=chainconfig.usdc_address(), from_block=start, to_block=end, topics=topics)
    return logs


def _block_logs(block_hash: str) -> list:
    """The logs `_range_logs` reads, of one block, in one call by its hash: the escrow's, and the token's Transfers
    from or to a watched address (the token's other logs, filtered out here, are a few dozen a block on Base).
    A node without the block refuses the call (chain.block_logs), which fails the pass: nothing of the range is
    applied, and the next pass reads it again."""
    escrow, token = (Web3.to_checksum_address(address) for address in (chainconfig.escrow_address(),
                                                                        chainconfig.usdc_address()))
    watched = {chain.address_topic(address) for address in _watched_addresses()}

    def wanted(log) -> bool:
        if Web3.to_checksum_address(log["address"]) == escrow:
            return True
        topics = [chain.hex_text(topic) for topic in log["topics"]]
        return len(topics) == 3 and topics[0] == _TRANSFER_TOPIC and bool(watched & set(topics[1:]))

    return [log for log in chain.block_logs(block_hash=block_hash, addresses=[escrow, token]) if wanted(log)]


def _watched_addresses() -> list[str]:
    # Every relayer wallet whose key is kept: one replaced still pays what it had in flight from the treasury's money.
    addresses = {chainconfig.escrow_address(), *chainconfig.relayer_addresses(), settings.FEE_RECIPIENT,
                 agreement_services.fee_recipient()}
    return sorted(Web3.to_checksum_address(address) for address in addresses if address)


def _topic(abi: dict) -> str:
    return "0x" + event_abi_to_log_topic(abi).hex().removeprefix("0x")


def event_names() -> list[str]:
    """The names of the events the indexer keeps (`_decode`): the escrow's, and the token's Transfer."""
    return sorted({abi["name"] for abi in artifacts.abi(artifacts.USAGE_ESCROW) if abi["type"] == "event"}
                  | {_TRANSFER})


def _decode(log) -> tuple[str, dict] | None:
    """(event name, JSON-friendly args) of an escrow event or a token Transfer; None for anything else. Raises
    UntrustedAnswer for a log of one of those events that does not decode as it (a topic too few or too many, its
    data cut short): the contracts emit none, so the node's answer is refused whole (the pass fails, the error on
    the cursor), where the decoder's own error ended the pass unrecorded, the indexer stalled with nothing shown."""
    is_escrow = Web3.to_checksum_address(log["address"]) == Web3.to_checksum_address(chainconfig.escrow_address())
    contract = chain.escrow_contract() if is_escrow else chain.token_contract()
    topic0 = chain.hex_text(log["topics"][0]) if log["topics"] else ""
    for abi in contract.abi:
        if abi["type"] == "event" and _topic(abi) == topic0 and (is_escrow or abi["name"] == _TRANSFER):
            try:
                decoded = contract.events[abi["name"]]().process_log(log)
            except Exception as error:  # noqa: BLE001 - web3's and eth_abi's errors share no base of their own
                raise chain.UntrustedAnswer(f"the node answered a {abi['name']} log that does not decode as one "
                                            f"({type(error).__name__}), in block {log['blockNumber']}") from error
            return abi["name"], chain.to_json(dict(decoded["args"]))
    return None


# --- applying a range ------------------------------------------------------------------------------------------

def _apply_range(cursor: IndexerCursor, end: int, end_hash: str, logs: list) -> IndexerCursor | None:
    """Store and apply the range's events and move the cursor to `end`, all or nothing. None when another runner
    moved the cursor meanwhile (its work stands; ours is dropped)."""
    with transaction.atomic():
        locked = IndexerCursor.objects.select_for_update().get(pk=cursor.pk)
        if locked.last_block != cursor.last_block:
            return None
        for log in logs:
            _store_and_apply(locked, log)
        IndexedBlock.objects.update_or_create(cursor=locked, number=end, defaults={"hash": end_hash})
        locked.last_block, locked.last_block_hash = end, end_hash
        locked.save(update_fields=["last_block", "last_block_hash", "updated_at"])
        IndexedBlock.objects.filter(cursor=locked, number__lt=end - settings.INDEXER_REORG_WINDOW_BLOCKS).delete()
    return locked


def _agreement_id(args: dict):
    """The agreement an escrow event is about, when it is one of ours: its bytes32 id is our UUID and its buyer our
    agreement's buyer. The contract keys escrows by (buyer, id), so anyone may open an escrow of their own under an
    agreement's id; its events are recorded, never taken for the agreement's."""
    raw, buyer = args.get("agreementId"), args.get("buyer")
    if not raw or not buyer:
        return None
    agreement_id = selectors.blockchain_identifier_to_agreement_id(raw)
    if agreement_id is None:
        return None
    return UsageAgreement.objects.filter(pk=agreement_id, settlement_model=SettlementModel.ESCROW,
                                         buyer_wallet_address=Web3.to_checksum_address(buyer)).values_list(
        "pk", flat=True).first()


def _store_and_apply(cursor: IndexerCursor, log) -> None:
    block_hash, tx_hash = chain.hex_text(log["blockHash"]), chain.hex_text(log["transactionHash"])
    same_log = ChainEvent.objects.filter(block_hash=block_hash, log_index=log["logIndex"])
    same_log.exclude(removed_at=None).delete()  # its block was reorged out and is canonical again: apply anew
    if same_log.exists():
        return
    decoded = _decode(log)
    if decoded is None:
        return
    name, args = decoded
    if name == _TRANSFER and int(args["value"]) == 0:
        return  # moves nothing, and costs anyone only gas (`transferFrom(watched, x, 0)` needs no allowance)
    IndexedBlock.objects.get_or_create(cursor=cursor, number=log["blockNumber"], defaults={"hash": block_hash})
    event = ChainEvent(cursor=cursor, block_number=log["blockNumber"], block_hash=block_hash, tx_hash=tx_hash,
                       log_index=log["logIndex"], contract=Web3.to_checksum_address(log["address"]), name=name,
                       args=args, effect=EventEffect.RECORDED)
    event.agreement_id = _agreement_id(args)
    if event.agreement_id is not None and (name in _TARGETS or name in _NOTICES):
        try:
            with transaction.atomic():  # a savepoint: a failed event leaves nothing half-applied
                if name in _TARGETS:
                    _apply(event)
                else:
                    _notify(event)
        except (OperationalError, InterfaceError):
            raise  # the database itself failed: the whole range is retried
        except Exception as error:  # noqa: BLE001 - any event that cannot be applied is kept, visibly
            _failed(event, error)
    event.save()


def _failed(event: ChainEvent, error: Exception) -> None:
    """The event could not be applied: kept with its error, and the status its agreement was in (it is tried again
    once that changes: `_failed_events_retry`)."""
    event.effect, event.error = EventEffect.FAILED, _error_text(error)
    event.from_status = UsageAgreement.objects.values_list("status", flat=True).get(pk=event.agreement_id)
    logger.error("indexed event not applied", extra={"agreement_id": str(event.agreement_id), "event": event.name,
                                                     "error": event.error})


def _failed_events_retry() -> int:
    """Escrow events that could not be applied where their agreement was are applied once it has moved, in the
    chain's order: the buyer's own funding of a proposal the seller had not answered yet (accepted, the agreement is
    active; rejected or cancelled, the deposit goes back: `agreement_activation_confirmed`), and whatever anyone did
    to that escrow after it (a reclaim at its reclaimAfter): applied after the funding, the agreement follows the
    chain to the end, where the funding alone left it active on an escrow the chain had closed. One that still
    cannot be applied records where it failed this time, so it is tried again only after the next move, never at
    every pass. Returns how many were applied."""
    applied = 0
    due = (ChainEvent.objects.filter(name__in=list(_TARGETS), effect=EventEffect.FAILED, removed_at=None,
                                     acknowledged_at=None, agreement__isnull=False)
           .exclude(agreement__status=F("from_status")).order_by("block_number", "log_index")
           .values_list("pk", flat=True))
    for event_id in list(due[:100]):
        with transaction.atomic():
            event = ChainEvent.objects.select_for_update().filter(pk=event_id, effect=EventEffect.FAILED).first()
            if event is None:
                continue
            try:
                with transaction.atomic():
                    _apply(event)
                event.error = ""
                applied += 1
            except (OperationalError, InterfaceError):
                raise
            except Exception as error:  # noqa: BLE001 - as when it was first read
                _failed(event, error)
            event.save(update_fields=["effect", "error", "from_status", "to_status"])
    return applied


def _error_text(error: Exception) -> str:
    if isinstance(error, ApplicationError):
        return f"{error.code}: {error.message}"[:500]
    return f"{type(error).__name__}: {error}"[:500]


def _apply(event: ChainEvent) -> None:
    target, usual_predecessor = _TARGETS[event.name]
    before = UsageAgreement.objects.select_for_update().values_list("status", flat=True).get(pk=event.agreement_id)
    _HANDLERS[event.name](event.agreement_id, event.args, event.tx_hash)
    after = UsageAgreement.objects.values_list("status", flat=True).get(pk=event.agreement_id)
    event.to_status = target
    if after != before:
        event.effect, event.from_status = EventEffect.APPLIED, before
    else:
        event.effect, event.from_status = EventEffect.ALREADY, usual_predecessor


def _moment(unix: int) -> datetime:
    return datetime.fromtimestamp(int(unix), tz=UTC)


def _on_activated(agreement_id, args: dict, tx_hash: str) -> None:
    agreement = UsageAgreement.objects.get(pk=agreement_id)
    # Every field the buyer's intent must carry, as the relayer's AgreementExists evidence checks them: a buyer who
    # activates an intent of its own (another receipt signer, no infra fee, another window or expiry) must not
    # make the agreement active.
    differences = services.intent_differences(agreement, args)
    if differences:
        raise Conflict(f"The escrow under this agreement's id is not its buyer's intent ({', '.join(differences)} "
                       "differ).", code="escrow_mismatch")
    agreement_services.agreement_activation_confirmed(agreement_id=agreement_id, tx_hash=tx_hash,
                                                      receipt_signer=args["receiptSigner"])


def _on_settlement_proposed(agreement_id, args: dict, tx_hash: str) -> None:
    agreement_services.agreement_settlement_proposed(
        agreement_id=agreement_id, challenge_deadline=_moment(args["challengeDeadline"]),
        amount=int(args["cumulativeAmount"]), seq=int(args["seq"]), tx_hash=tx_hash)


def _on_challenged(agreement_id, args: dict, tx_hash: str) -> None:
    # The reason and evidence the buyer gave our API, when the event is applied before the relayer's receipt of our
    # challenge.
    reason, evidence = settlement.challenge_statement(agreement_id=agreement_id, tx_hash=tx_hash)
    agreement_services.agreement_disputed(agreement_id=agreement_id, reason=reason, evidence=evidence,
                                          tx_hash=tx_hash)


def _on_resolved(agreement_id, args: dict, tx_hash: str) -> None:
    agreement = UsageAgreement.objects.get(pk=agreement_id)
    settlement.settlement_resolved(agreement_id=agreement_id, seller_amount=int(args["sellerAmount"]),
                                   tx_hash=tx_hash, terms=selectors.escrow_terms(agreement=agreement),
                                   operator=args["arbiter"])


def _on_settled(agreement_id, args: dict, tx_hash: str) -> None:
    agreement_services.agreement_settled(agreement_id=agreement_id, seller_payout=int(args["sellerAmount"]),
                                         buyer_refund=int(args["buyerAmount"]), tx_hash=tx_hash)


def _on_reclaimed(agreement_id, args: dict, tx_hash: str) -> None:
    agreement_services.agreement_refunded(agreement_id=agreement_id, amount=int(args["amount"]), tx_hash=tx_hash)


_HANDLERS = {
    "Activated": _on_activated,
    "SettlementProposed": _on_settlement_proposed,
    "Challenged": _on_challenged,
    "Resolved": _on_resolved,
    "Settled": _on_settled,
    "Reclaimed": _on_reclaimed,
}


def _notify(event: ChainEvent) -> None:
    """An escrow event that moves no agreement but is told to its parties (`_NOTICES`); it stays `recorded`."""
    agreement = UsageAgreement.objects.get(pk=event.agreement_id)
    party = "seller" if Web3.to_checksum_address(event.args["party"]) == agreement.seller_wallet_address else "buyer"
    _NOTICES[event.name](agreement_id=event.agreement_id, party=party, amount=int(event.args["amount"]),
                         tx_hash=event.tx_hash)


# Escrow events told to the agreement's parties without moving it: a payout the token refused, credited in the escrow
# (the settlement recorded it as paid out), and its withdrawal.
_NOTICES = {
    "PayoutDeferred": agreement_services.agreement_payout_deferred,
    "Withdrawn": agreement_services.agreement_payout_withdrawn,
}


def events_acknowledge(*, events, operator: AbstractBaseUser, reason: str) -> int:
    """Operator action: failed events someone looked into and accepted (say, the buyer's own escrow on
    other terms under an agreement's id) are kept and stay visible, but no longer fail `reconcile` or the dashboard. Records who, when
    and why; returns how many were acknowledged now (events not failed, or acknowledged already, are left).
    `operator` (the admin's user, reconcile's `--operator`): 403 `operator_owns_a_party`, nothing
    acknowledged, when it owns a party of a failed event's agreement."""
    failed = ChainEvent.objects.filter(pk__in=events.values("pk"), effect=EventEffect.FAILED)
    agreement_services.operator_owns_no_party_require(
        operator=operator, agreement_ids=failed.exclude(agreement=None).values("agreement_id"))
    return services.findings_acknowledge(findings=failed, operator=operator.get_username(), reason=reason)


# --- reorgs ------------------------------------------------------------------------------------------------------

def _follow_reorg(cursor: IndexerCursor) -> tuple[IndexerCursor | None, int]:
    """(cursor, events rolled back): unchanged when the cursor's block is still canonical."""
    if cursor.last_block is None:
        return cursor, 0
    # None: the node has no block at that height (a backend behind the one the range was read from): no other block
    # took its place, so nothing is rolled back; `_fetch` reads nothing from it either, until it has caught up.
    if chain.canonical_block_hash(cursor.last_block) in (cursor.last_block_hash, None):
        return cursor, 0
    # The fork point: the newest stored block on the branch that replaced the cursor's, read from that branch's block
    # at the confirmation depth above the cursor's height down by parent hashes (a block by its hash is the same
    # whichever backend answers it). Asked by height, a load-balanced provider's backend still on another fork
    # answered a canonical stored block with another: the walk went past it, and events the new branch still holds
    # were rolled back and applied again (`in_challenge → active → in_challenge`, webhooks sent twice). And a backend
    # stuck on a branch the chain dropped answers the cursor's height with that branch's block: taken for a reorg,
    # events the chain holds were rolled back; the walk from the chain's block above finds the cursor's block on it.
    top_number = cursor.last_block + max(settings.CHAIN_CONFIRMATIONS, 1) - 1
    top_hashes = chain.canonical_block_hashes(top_number)
    if top_hashes is None:
        logger.warning("the indexer's last block answered replaced, by no branch at the confirmation depth yet: not "
                       "rolled back until it is", extra={"block": cursor.last_block})
        return cursor, 0
    top = (top_number, top_hashes[0])
    fork = None
    for block in IndexedBlock.objects.filter(cursor=cursor).order_by("-number"):
        if top_number - block.number > settings.INDEXER_REORG_WINDOW_BLOCKS:
            break
        found = chain.block_below(top, block.number)
        if found is None:  # a block of the walk not found: a node behind; the next pass looks again
            logger.warning("the branch that replaced the indexer's last block is not all there yet: not rolled back "
                           "until it is", extra={"block": cursor.last_block})
            return cursor, 0
        if found.lower() == block.hash.lower():
            fork = block
            break
    if fork is None:
        raise ReorgTooDeep(f"no block the indexer stored since {cursor.start_block} is canonical any more")
    if fork.number == cursor.last_block:
        logger.warning("the indexer's last block answered replaced, by a block the chain at the confirmation depth "
                       "does not hold: not rolled back", extra={"block": cursor.last_block})
        return cursor, 0
    # And the blocks the node answers at each height from the fork point up are that branch, one chain, as they were
    # when a rollback asked only this: a backend on another branch answering the top alone rolls nothing back.
    if not chain.blocks_above_descend(fork.number, fork.hash, depth=top_number - fork.number + 1):
        logger.warning("the indexer's last block answered replaced, by no branch at the confirmation depth from the "
                       "fork point: not rolled back until it is", extra={"block": cursor.last_block,
                                                                          "fork_block": fork.number})
        return cursor, 0
    logger.warning("chain reorg: rolling the indexer back", extra={"from_block": cursor.last_block,
                                                                    "fork_block": fork.number})
    return _roll_back(cursor, fork)


def _roll_back(cursor: IndexerCursor, fork: IndexedBlock) -> tuple[IndexerCursor | None, int]:
    with transaction.atomic():
        locked = IndexerCursor.objects.select_for_update().get(pk=cursor.pk)
        if locked.last_block != cursor.last_block:
            return None, 0
        removed = list(ChainEvent.objects.filter(cursor=locked, block_number__gt=fork.number, removed_at=None)
                       .order_by("block_number", "log_index"))
        ChainEvent.objects.filter(pk__in=[event.pk for event in removed]).update(removed_at=timezone.now())
        by_agreement: dict = {}
        for event in removed:
            if event.agreement_id and event.effect in (EventEffect.APPLIED, EventEffect.ALREADY):
                by_agreement.setdefault(event.agreement_id, []).append(event)
        for agreement_id, events in by_agreement.items():
            _restore(agreement_id, events, fork.number)
        IndexedBlock.objects.filter(cursor=locked, number__gt=fork.number).delete()
        locked.last_block, locked.last_block_hash = fork.number, fork.hash
        locked.save(update_fields=["last_block", "last_block_hash", "updated_at"])
    return locked, len(removed)


def _restore(agreement_id, removed: list[ChainEvent], fork_block: int) -> None:
    remaining = (ChainEvent.objects.filter(agreement_id=agreement_id, removed_at=None, name__in=list(_TARGETS),
                                           effect__in=[EventEffect.APPLIED, EventEffect.ALREADY])
                 .order_by("-block_number", "-log_index").first())
    changes = {}
    if remaining is not None:
        back_to = _TARGETS[remaining.name][0]
        if remaining.name == "SettlementProposed":
            changes["challenge_deadline"] = _moment(remaining.args["challengeDeadline"])
            changes["proposed_seq"] = int(remaining.args["seq"])
            changes["proposed_amount"] = int(remaining.args["cumulativeAmount"])
    else:
        back_to = removed[0].from_status
    names = ", ".join(sorted({event.name for event in removed}))
    agreement_services.agreement_chain_rollback(
        agreement_id=agreement_id, produced_by_removed={event.to_status for event in removed}, back_to=back_to,
        reason=f"chain reorg after block {fork_block} removed {names}", changes=changes)
