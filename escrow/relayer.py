"""The relayer: gets ChainTransactions mined exactly once, whatever fails in between.

- `transaction_enqueue` writes the row in the caller's DB transaction and submits after commit.
- `transaction_submit` simulates (one refused because someone else's transaction did its job in a block not yet at
  its confirmation depth stays queued until that block is: `_done_by_a_copy_not_deep_yet`), then allocates the
  nonce from the DB (row lock), signs, stores the attempt's hash and raw bytes, commits, and only then broadcasts: a
  worker killed at any point leaves either nothing (rolled back, the task runs again) or a stored attempt that
  `transaction_check` rebroadcasts.
- `transaction_check` (driven by the `poll_confirmations` beat task) finds receipts of any attempt, counts
  confirmations (over the blocks that descend from the mined one: `_block_deep_enough`), notices reorgs (another
  block at the mined block's height: none there yet is a node behind, waited for), rebroadcasts dropped
  transactions and replaces stuck ones with the same nonce and bumped fees. Final outcomes go to the domain once per
  time the transaction is mined.
- `transactions_reopen_reorged` notices a reorg deeper than the confirmation depth: a mined transaction (confirmed,
  or failed: it reverted) whose block is no longer canonical goes back to submitted, and is then found mined again,
  or rebroadcast with the same signed bytes (same nonce: it cannot run twice), or, when the nonce turns out used by
  someone else, sent again under a new nonce as the rules below say. So does a failed one whose outcome was decided
  on someone else's transaction (its evidence names that block, EVIDENCE_BLOCK: a copy of an x402 authorization,
  or someone else's finalize or reclaim, mined first), or back to queued when it never took a nonce. A failed one
  something took the place of since (an operator's retry, another live one of its agreement and purpose) is not run
  again: a nonce fill takes its nonce, as it takes that of one signed already that the domain withdraws
  (`transaction_withdraw`).
  The indexer runs it after rolling a reorg back (so the agreements are back where the remaining events put them
  before the outcome is applied again); each poll runs it for the blocks the indexer has not applied yet. What no
  contract event records (a skill invocation's payment, payout or refund, a direct purchase's steps, what a failure
  did) its purpose's `on_reopened` handler moves back; not what a failed one's evidence says someone else's
  transaction did, when that transaction's block is still canonical (the reorg took only ours, later: `_outcome_stands`).
- `transactions_release_final`: a transaction that forwards money another one brought in (a skill invocation's
  payout or refund of its payment, a direct purchase's refund of its fee: `finality_wait_register`) is, under PAYOUT_HEAD_TAG, not signed until that
  payment's block is at or below the node's tagged block, which descends from it (`_final_holds`).
  `transaction_submit` leaves it queued meanwhile, naming the block it waits for (`held_until_block`); each poll asks the node for the tagged block once
  and sends those it passed (the submit checks again). A reorg that takes the payment first leaves nothing to undo:
  the domain withdraws the payout, never signed. A node that cannot be believed on the tag (it refuses it, answers
  nothing, names a block beyond its head: `chain.final_block_number`) releases nothing: what waits stays held.
- `transactions_recheck_watched` reads again, at each poll (after its checks), the evidence of failed transactions
  the domain watches (`watch_failed`: a failed payment, whose authorization someone may still get mined, or a reorg
  put back in a copy's block): once it names someone else's transaction at the confirmation depth, the outcome is
  applied again on it, unless a transaction of its agreement or invocation in flight was not read without an error
  in that poll (`_failures_decidable`, as for a failure the poll concludes): that may be mined, and the outcome
  withdraw it.

Evidence before action: every hash ever broadcast is kept and looked up; a transaction goes out under a new nonce
only once its nonce is shown used, at the required depth, by a transaction that is none of its attempts. No
chain call runs inside a DB transaction or under a row lock: read the row, ask the node, then lock the row again
and write only if nobody changed it meanwhile (`updated_at` is the version), so two workers may check the same
row at once and the slower one's write is dropped.
"""

import contextvars
import functools
import logging
import math
import operator
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime

from django.conf import settings
from django.contrib.auth.base_user import AbstractBaseUser
from django.core import checks
from django.core.exceptions import ImproperlyConfigured
from django.db import IntegrityError, transaction
from django.db.models import Q, QuerySet
from django.utils import timezone
from web3 import Web3

from agreements import services as agreement_services
from escrow import chain
from escrow.models import (ChainTransaction, IndexerCursor, RelayerAccount, RelayRevert, TxAttempt, TxPurpose,
                           TxStatus)
from marketplace import chainconfig, sweeps
from marketplace.errors import Conflict, TooManyRequests
from marketplace.logging import agreement_context

logger = logging.getLogger(__name__)

OutcomeHandler = Callable[[ChainTransaction], None]
EvidenceReader = Callable[[ChainTransaction], dict]
_outcome_handlers: dict[str, OutcomeHandler] = {}
_submitted_handlers: dict[str, OutcomeHandler] = {}
_reopened_handlers: dict[str, OutcomeHandler] = {}
_evidence_readers: dict[str, EvidenceReader] = {}
RerunCheck = Callable[[ChainTransaction], bool]
_rerun_checks: dict[str, RerunCheck] = {}
_retry_handlers: dict[str, OutcomeHandler] = {}
CancelledHandler = Callable[..., None]
_cancelled_handlers: dict[str, CancelledHandler] = {}
_undecided_handlers: dict[str, OutcomeHandler] = {}
FailureWatch = Callable[[], QuerySet[ChainTransaction]]
_failure_watches: dict[str, FailureWatch] = {}
SpentBlock = Callable[[ChainTransaction], tuple[int, str] | None]
_spent_blocks: dict[str, SpentBlock] = {}
RefusalCharged = Callable[[ChainTransaction], bool]
_refusals_charged: dict[str, RefusalCharged] = {}
_GAS_HEADROOM_PERCENT = 25
# On top of it: about what filling an empty storage slot costs beyond rewriting a set one (EIP-2200/2929: 22,100
# against 5,000). The chain may change between the estimate and the mining, and the same signed bytes are sent again after
# a reorg: a token transfer estimated to an account holding tokens, mined after that account emptied its balance,
# writes an empty slot, and 25% of a transfer's ~35,000 gas did not cover it (out of gas, the fee paid). Unused gas
# is not charged; the limit only bounds what a transaction may spend.
_SLOT_FILL_GAS = 20_000
# The context keys of an operator's retry: the failed transaction it sends again, and the operator who asked.
OPERATOR_RETRY_OF = "operator_retry_of"
OPERATOR_RETRY_BY = "operator_retry_by"
# The context key of a transaction the domain withdrew (`transaction_withdraw`): why.
WITHDRAWN = "withdrawn"
# What the failure reason of a transaction mined reverted having used all its gas limit says (`_conclude_mined`): the
# gas estimate fell short, and a transaction sent again on the same estimate runs out of it again.
OUT_OF_GAS = "out of gas"
# The context key of a transaction its domain could not build, recorded failed and never sent
# (`transaction_record_unsent`): why.
UNSENT = "unsent"
# The key under which an evidence reader whose answer rests on a transaction not ours (someone else's copy that did
# what ours would have) names that transaction's block, {"number": n, "hash": "0x..."}: a reorg that takes the block
# off the chain reopens the concluded transaction, as one that takes a confirmed transaction's own block does.
EVIDENCE_BLOCK = "block"
# The key under which an evidence reader says that what a reverted transaction was sent for was done all the same, by
# a transaction not ours (a front-runner's copy of the activation, the permit someone else submitted): its revert is
# no revert of its relayed party's (`_revert_attribute`).
DONE_BY_ANOTHER = "done_by_another"
# The context key of a nonce fill that took over the nonce of a transaction cancelled (`_cancel`): that one's id.
CANCELS = "cancels"
# The context key of a transaction sent for a party's signed action (`relay_party`): a revert of it mined is that
# party's (`RelayRevert`), counted against its relay budget (`relay_budget_check`). Beside it, as they were when it
# was queued (`RelayPayer`): the wallet paying, the party's owner (an agent's), an anonymous payer's client network.
RELAYED_FOR = "relayed_for"
RELAYED_WALLET = "relayed_wallet"
RELAYED_OWNER = "relayed_owner"
RELAYED_CLIENT = "relayed_client"
# The context keys of a closed direct purchase's authorization cancel relayed for its buyer (`relay_cancel_budget_check`):
# its party, paying wallet and owner as they were when queued. Not RELAYED_FOR: its revert is not the buyer's.
CANCEL_FOR = "cancel_for"
CANCEL_WALLET = "cancel_wallet"
CANCEL_OWNER = "cancel_owner"
# How an anonymous x402 payer's party (`relay_party` without an agent) begins.
_ANONYMOUS_PARTY_PREFIX = "wallet:"
# When a party at its in-flight limit may try again: about a block, its confirmations and a poll.
_IN_FLIGHT_RETRY_AFTER_SECONDS = 10
# What a transfer of nothing to an account without code costs: a nonce fill's gas limit.
_PLAIN_TRANSFER_GAS = 21_000
_UNCAPPED = 2**256 - 1  # a fee bump's cap that binds nothing
# How a broadcast the node refused because the wallet cannot pay its gas is recorded (`TxAttempt.broadcast_error`).
UNFUNDED_BROADCAST_ERROR = chain.InsufficientFunds.__name__
# A poll whose first this-many checks all failed on the RPC stops there; the next poll tries again.
_POLL_GIVES_UP_AFTER = 5
# How many in-flight transactions one poll checks at most, those least recently polled (`polled_at`): each is
# checked once every ceil(in flight / POLL_BATCH) polls.
POLL_BATCH = 500


def outcome_handler_register(*, purpose: str, on_outcome: OutcomeHandler,
                             on_submitted: OutcomeHandler | None = None,
                             read_evidence: EvidenceReader | None = None,
                             on_reopened: OutcomeHandler | None = None,
                             rerun_wanted: RerunCheck | None = None,
                             on_retry: OutcomeHandler | None = None,
                             on_cancelled: CancelledHandler | None = None,
                             on_cancel_undecided: OutcomeHandler | None = None,
                             watch_failed: FailureWatch | None = None,
                             refusal_charged: RefusalCharged | None = None) -> None:
    """`on_outcome(tx)` runs in the DB transaction that makes `tx` confirmed or failed; `on_submitted(tx)` in the
    one that signs its first attempt (its hash is then known). `read_evidence(tx)` runs just before, outside any
    DB transaction, and reads from the chain what the outcome depends on; `on_outcome` finds its answer in
    `tx.outcome_evidence` (stored with the outcome, for the audit). `on_reopened(tx)` runs in the one that moves a
    concluded `tx` whose outcome a reorg took off the chain back to submitted (or queued), before its outcome is
    cleared: a mined one, confirmed or failed (`tx.mined_tx_hash` is the hash no longer canonical), or a failed one
    whose evidence names the block of someone else's transaction (EVIDENCE_BLOCK) that is no longer canonical; its
    outcome is applied again once it is concluded again (so it must be a no-op where the domain already is). Not for
    a failed one whose evidence's block is still canonical, the reorg having taken only its own later block
    (`_outcome_stands`), nor for a failed one cancelled instead (`_cancel`): its outcome stands (but see below for its old bytes that ran in its nonce fill's place). `rerun_wanted(tx)`, inside
    a DB transaction holding `tx`'s row lock, says whether a failed `tx` may be sent again at all (its block reorged
    out, or an operator's retry): one its domain no longer wants (an activation whose agreement was cancelled since)
    is cancelled as a superseded one is, and its retry refused. `on_retry(tx)` runs in the one that queues an
    operator's retry of a failed `tx`, after `rerun_wanted`: the domain may refuse it (an ApplicationError: nothing
    is queued), or record that it is sent again (an activation's retry moves the buyer's money now).
    `on_cancelled(tx, ran_as=...)` tells the domain what came of a cancelled `tx` (`_cancel`): in the one that
    cancels it when it was never signed, else in the one that concludes the nonce fill that took its nonce; `ran_as`
    is the hash under which `tx`'s own old bytes were mined in the fill's place and ran, else None: nothing of it
    ran. A reorg that takes the fill's block has the outcome decided again: `on_reopened` first moves back what those
    bytes did, if they ran (`nonce_fill_reopened`), then `on_cancelled` is told anew once the fill is concluded again.
    `on_cancel_undecided(tx)` runs in the one that reopens a fill that took a cancelled `tx`'s nonce (nothing of `tx`
    ran): `tx`'s old bytes may run in its place now, and what the domain sent when told nothing ran (a new refund) is
    to be withdrawn before it runs beside them.
    `watch_failed()` names failed transactions of `purpose` whose evidence may still change with no block they rest
    on taken (`transactions_recheck_watched`); it needs `read_evidence`.
    `refusal_charged(tx)`, outside any DB transaction, says whether a relayed `tx` the chain refuses at the relayer's
    simulation, never sent, is its party's revert as one mined reverted is (`_revert_attribute`): the steps before it
    were at the relayer's gas (a direct purchase's fee collection and payment, after its permit), and a party that
    spent its allowance, funds or authorization in between had them all for nothing, as often as it liked, with no
    timing to get right. Not when the relayer's own delay is the cause (a signature's deadline passed meanwhile), nor
    an operator's retry (no step ran for it since the refusal charged already)."""
    if watch_failed is not None and read_evidence is None:
        raise ImproperlyConfigured(f"Watching failed {purpose} chain transactions needs their evidence reader.")
    _outcome_handlers[purpose] = on_outcome
    if on_submitted is not None:
        _submitted_handlers[purpose] = on_submitted
    if read_evidence is not None:
        _evidence_readers[purpose] = read_evidence
    if on_reopened is not None:
        _reopened_handlers[purpose] = on_reopened
    if rerun_wanted is not None:
        _rerun_checks[purpose] = rerun_wanted
    if on_retry is not None:
        _retry_handlers[purpose] = on_retry
    if on_cancelled is not None:
        _cancelled_handlers[purpose] = on_cancelled
    if on_cancel_undecided is not None:
        _undecided_handlers[purpose] = on_cancel_undecided
    if watch_failed is not None:
        _failure_watches[purpose] = watch_failed
    if refusal_charged is not None:
        _refusals_charged[purpose] = refusal_charged


def finality_wait_register(*, purpose: str, spent_block: SpentBlock) -> None:
    """Transactions of `purpose` forward money another transaction brought in: under PAYOUT_HEAD_TAG one is signed only
    once `spent_block(tx)` (the block number and hash of the transaction whose money it forwards; None while the chain
    has no such transaction at the confirmation depth, a reorg having reopened it) is at or below the node's tagged
    block and still canonical (`_waits_for_finality`)."""
    _spent_blocks[purpose] = spent_block


def outcome_handlers_check(app_configs=None, **kwargs) -> list[checks.CheckMessage]:
    """System check: every kind of chain transaction has an outcome handler, so none is concluded unapplied."""
    return [checks.Error(f"No outcome handler for {purpose} chain transactions.",
                         hint="Register one with relayer.outcome_handler_register in an AppConfig.ready().",
                         obj=__name__, id="escrow.E001")
            for purpose in TxPurpose.values if purpose not in _outcome_handlers]


def relay_party(*, agent_id=None, wallet: str = "") -> str:
    """Whom a relayed action is charged to: the agent that asked, else (an x402 payer without one) its wallet."""
    if agent_id is not None:
        return f"agent:{agent_id}"
    return f"{_ANONYMOUS_PARTY_PREFIX}{Web3.to_checksum_address(wallet)}"


@dataclass(frozen=True)
class RelayPayer:
    """Who a relayed action is charged to (`relay_payer`), recorded with its transaction (RELAYED_*) and its revert
    (`RelayRevert`) as it is when queued: whoever holds the wallet, or owns the agent, later."""

    party: str  # `relay_party`
    wallet: str  # the paying wallet, checksummed
    owner_id: int | None = None  # the agent's owner; None: an anonymous x402 payer
    client: str = ""  # an anonymous payer's network (marketplace.throttling.client_network)

    @property
    def anonymous(self) -> bool:
        return self.owner_id is None


def relay_payer(*, wallet: str, agent=None, client: str = "") -> RelayPayer:
    """The payer of a relayed action paid from `wallet`: the `agent` that asked (and its owner), else the wallet's
    anonymous x402 payer calling from `client`."""
    wallet = Web3.to_checksum_address(wallet)
    if agent is not None:
        return RelayPayer(party=relay_party(agent_id=agent.pk), wallet=wallet, owner_id=agent.owner_id)
    return RelayPayer(party=relay_party(wallet=wallet), wallet=wallet, client=client[:100])


def _revert_bounds(payer: RelayPayer) -> list[tuple[str, Q, int]]:
    """The bounds a relayed action is counted against: (name, the reverts that count, the setting's limit), each
    from what the reverts recorded (`RelayRevert`), not from who holds the wallet or owns the agent now."""
    anonymous = Q(party__startswith=_ANONYMOUS_PARTY_PREFIX)
    bounds = [("party", Q(party=payer.party), settings.RELAY_REVERTS_PER_PARTY)]
    if payer.owner_id is not None:
        bounds.append(("owner", Q(owner_id=payer.owner_id), settings.RELAY_REVERTS_PER_OWNER))
    bounds.append(("wallet", Q(wallet=payer.wallet), settings.RELAY_REVERTS_PER_WALLET))
    if payer.anonymous:
        if payer.client:
            bounds.append(("client", anonymous & Q(client=payer.client), settings.RELAY_REVERTS_PER_CLIENT))
        bounds.append(("anonymous", anonymous, settings.RELAY_REVERTS_ANONYMOUS))
    return bounds


def _in_flight_bounds(payer: RelayPayer) -> list[tuple[str, Q, int]]:
    """The bounds on a payer's relayed transactions not concluded: (name, its transactions, the setting's limit),
    each from what the transaction recorded when queued (RELAYED_*), as reverts count it."""
    bounds = [("party", Q(**{f"context__{RELAYED_FOR}": payer.party}), settings.RELAY_IN_FLIGHT_PER_PARTY)]
    if payer.owner_id is not None:
        bounds.append(("owner", Q(**{f"context__{RELAYED_OWNER}": payer.owner_id}), settings.RELAY_IN_FLIGHT_PER_OWNER))
    if payer.anonymous and payer.client:  # agents with an API key record no client
        bounds.append(("client", Q(**{f"context__{RELAYED_FOR}__startswith": _ANONYMOUS_PARTY_PREFIX,
                                      f"context__{RELAYED_CLIENT}": payer.client}),
                       settings.RELAY_IN_FLIGHT_PER_CLIENT))
    return bounds


def relay_budget_check(payer: RelayPayer) -> None:
    """Before a party's signed action is relayed: one whose relayed transactions were mined reverted
    RELAY_REVERTS_PER_PARTY times within RELAY_REVERT_WINDOW (`RelayRevert`: each one's gas the relayer's) is 429
    `relay_budget_exhausted`, nothing queued, until the oldest of those leaves the window
    (`details.retry_after_seconds`, Retry-After). Else a buyer that empties its wallet, spends its permit or
    authorization, or revokes its allowance between the simulation and the mining has the relayer pay for the
    revert as often as it asks again. The same for the agent's owner (its agents' reverts together,
    RELAY_REVERTS_PER_OWNER; else an owner multiplied the budget by creating agents), for the paying wallet
    (RELAY_REVERTS_PER_WALLET: whoever paid from it, agents then holding it or an anonymous payer), and for an
    anonymous payer, whose wallets cost nothing to make, its client network (RELAY_REVERTS_PER_CLIENT) and all
    anonymous payers together (RELAY_REVERTS_ANONYMOUS); `details.bound` names the bound reached. Each revert
    counts as it was recorded: an agent that changes wallet leaves its reverts with the wallet that paid.

    Reverts count once mined, so the party's transactions still in flight count too: one with
    RELAY_IN_FLIGHT_PER_PARTY of them (its owner's agents together: RELAY_IN_FLIGHT_PER_OWNER; an anonymous payer's
    client network, whatever its wallets: RELAY_IN_FLIGHT_PER_CLIENT) is 429 `relay_in_flight_limit_reached` until
    one concludes. Else a buyer posts many actions at once (an activation of each of its agreements, or payments
    from many funded wallets), all pass the check with no revert recorded yet, and one transfer of its funds makes
    every one of them revert."""
    for bound, in_flight, in_flight_allowed in _in_flight_bounds(payer):
        if in_flight_allowed > 0 and ChainTransaction.objects.filter(
                in_flight, status__in=[TxStatus.QUEUED, TxStatus.SUBMITTED, TxStatus.MINED]
        ).count() >= in_flight_allowed:
            whose = {"party": "you", "owner": "your owner's agents",
                     "client": "payers without an API key at your network address"}[bound]
            raise TooManyRequests(
                f"{in_flight_allowed} transactions the platform sends for {whose} are not concluded yet: wait for one.",
                code="relay_in_flight_limit_reached", retry_after=_IN_FLIGHT_RETRY_AFTER_SECONDS,
                details={"retry_after_seconds": _IN_FLIGHT_RETRY_AFTER_SECONDS, "in_flight": in_flight_allowed,
                         "bound": bound})
    full = _first_full_window([(bound, RelayRevert.objects.filter(reverts), allowed)
                               for bound, reverts, allowed in _revert_bounds(payer)], "reverted_at")
    if full is not None:
        bound, allowed, retry_after = full
        whose = {"party": "you", "owner": "your owner's agents", "wallet": "your paying wallet",
                 "client": "payers without an API key at your network address",
                 "anonymous": "payers without an API key"}[bound]
        raise TooManyRequests(
            f"{allowed} transactions the platform sent for {whose} reverted on-chain within "
            f"{int(settings.RELAY_REVERT_WINDOW.total_seconds())} s (funds, allowance, nonce or authorization changed "
            "after they were accepted): nothing more is relayed for you until the oldest is out of that window.",
            code="relay_budget_exhausted", retry_after=retry_after,
            details={"retry_after_seconds": retry_after, "reverts": allowed, "bound": bound})


def _first_full_window(bounds: list[tuple[str, QuerySet, int]], moment: str) -> tuple[str, int, int] | None:
    """(bound, allowed, seconds to wait) of the first of `bounds` ((bound, its rows, how many it allows; 0: no
    bound)) whose rows within RELAY_REVERT_WINDOW (by their `moment` field) are as many as it allows; else None."""
    now = timezone.now()
    for bound, rows, allowed in bounds:
        retry_after = _window_full_for(rows, moment, allowed=allowed, now=now) if allowed > 0 else None
        if retry_after is not None:
            return bound, allowed, retry_after
    return None


def _window_full_for(rows: QuerySet, moment: str, *, allowed: int, now) -> int | None:
    """Seconds until the oldest of the latest `allowed` `rows` (by their `moment` field) leaves RELAY_REVERT_WINDOW,
    when that many are in it; else None."""
    recent = list(rows.filter(**{f"{moment}__gt": now - settings.RELAY_REVERT_WINDOW})
                  .order_by(f"-{moment}").values_list(moment, flat=True)[:allowed])
    if len(recent) < allowed:
        return None
    return max(1, math.ceil((recent[-1] + settings.RELAY_REVERT_WINDOW - now).total_seconds()))


def relay_cancel_budget_check(payer: RelayPayer, *, purpose: str) -> None:
    """Before a buyer's authorization cancel (`purpose`) is relayed: one the platform relayed
    RELAY_AUTHORIZATION_CANCELS_PER_PARTY times within RELAY_REVERT_WINDOW (each at the relayer's gas, whatever its
    outcome) is 429 `relay_cancel_budget_exhausted`, nothing queued, until the oldest leaves the window. The same for
    the agent's owner (RELAY_AUTHORIZATION_CANCELS_PER_OWNER) and the paying wallet (..._PER_WALLET), as recorded
    when queued (CANCEL_*). Else proposing and cancelling purchases, each cancel relayed, spends the relayer's gas
    with no end; refused, the buyer sends its signed cancel itself (the token takes it from anyone).
    Inside the transaction that queues the cancel, the payer's count and queueing are one turn per bound (a lock
    until it ends), so cancels asked at once cannot all pass with room for one; outside any, a check alone."""
    bounds = [("party", Q(**{f"context__{CANCEL_FOR}": payer.party}), settings.RELAY_AUTHORIZATION_CANCELS_PER_PARTY),
              ("wallet", Q(**{f"context__{CANCEL_WALLET}": payer.wallet}),
               settings.RELAY_AUTHORIZATION_CANCELS_PER_WALLET)]
    if payer.owner_id is not None:
        bounds.append(("owner", Q(**{f"context__{CANCEL_OWNER}": payer.owner_id}),
                       settings.RELAY_AUTHORIZATION_CANCELS_PER_OWNER))
    connection = transaction.get_connection()
    if connection.in_atomic_block and connection.vendor == "postgresql":  # SQLite has one writer at a time
        keys = sorted({f"relay-cancels:party:{payer.party}", f"relay-cancels:wallet:{payer.wallet}",
                       *([f"relay-cancels:owner:{payer.owner_id}"] if payer.owner_id is not None else [])})
        with connection.cursor() as cursor:
            for key in keys:  # one order for every caller: no deadlock
                cursor.execute("SELECT pg_advisory_xact_lock(hashtext(%s))", [key])
    full = _first_full_window([(bound, ChainTransaction.objects.filter(cancels, purpose=purpose), allowed)
                               for bound, cancels, allowed in bounds], "created_at")
    if full is not None:
        bound, allowed, retry_after = full
        whose = {"party": "you", "owner": "your owner's agents", "wallet": "your paying wallet"}[bound]
        raise TooManyRequests(
            f"The platform relayed {allowed} authorization cancels for {whose} within "
            f"{int(settings.RELAY_REVERT_WINDOW.total_seconds())} s: send your signed cancelAuthorization to the token "
            "yourself (anyone may send it), or ask again once the oldest is out of that window.",
            code="relay_cancel_budget_exhausted", retry_after=retry_after,
            details={"retry_after_seconds": retry_after, "cancels": allowed, "bound": bound})


def _revert_attribute(tx: ChainTransaction) -> None:
    """Inside the DB transaction concluding `tx` mined reverted within its gas limit (`_gas_used`), or
    refused at its simulation when its purpose says so (`refusal_charged`): a
    relayed party's transaction is that party's revert (`RelayRevert`). Not one decided on someone else's copy mined
    first (EVIDENCE_BLOCK, DONE_BY_ANOTHER: anyone may send a public authorization, permit or signed intent first; what
    the party asked for was done)."""
    party = tx.context.get(RELAYED_FOR)
    if party is None or EVIDENCE_BLOCK in tx.outcome_evidence or tx.outcome_evidence.get(DONE_BY_ANOTHER):
        return
    RelayRevert.objects.get_or_create(transaction=tx, defaults={
        "party": party, "wallet": tx.context.get(RELAYED_WALLET, ""), "owner_id": tx.context.get(RELAYED_OWNER),
        "client": tx.context.get(RELAYED_CLIENT, ""), "reason": tx.failure_reason, "reverted_at": timezone.now()})
    logger.warning("a relayed party's transaction reverted on-chain at the relayer's gas",
                   extra={"tx_id": str(tx.pk), "party": party, "purpose": tx.purpose, "reason": tx.failure_reason})


def transaction_preflight(*, to: str, data: str) -> None:
    """Before a caller's request queues a transaction the relayer pays for (a buyer's signed call relayed): simulate
    it as the relayer would send it, from the relayer's address. One the chain would refuse, for a reason the
    request's own checks do not cover (the token paused, the authorization used meanwhile, the escrow's state moved
    on while the books lag), is 409 `transaction_would_revert` naming the revert (`revert_reason`), nothing queued:
    relayed, it reverted, and the caller could ask again and again. A node that does not answer is 503."""
    try:
        chain.simulate(sender=chain.relayer_account().address, to=to, data=data)
    except chain.Reverted as reverted:
        raise Conflict(f"The chain would refuse this transaction: {reverted.reason}", code="transaction_would_revert",
                       details={"revert_reason": reverted.reason}) from reverted
    except chain.ChainError as error:
        raise chain.unavailable() from error


def transaction_enqueue(*, purpose: str, to: str, data: str, agreement_id=None, context: dict | None = None,
                        confirmations: int | None = None, relayed_for: RelayPayer | None = None,
                        cancel_for: RelayPayer | None = None) -> ChainTransaction:
    """Create the row inside the caller's DB transaction; it is submitted after that transaction commits.
    `relayed_for`: the payer (`relay_payer`) whose signed action it relays, charged with its revert. `cancel_for`:
    the buyer whose authorization cancel it relays, counted by `relay_cancel_budget_check`."""
    context = context or {}
    if cancel_for is not None:
        context = {**context, CANCEL_FOR: cancel_for.party, CANCEL_WALLET: cancel_for.wallet,
                   CANCEL_OWNER: cancel_for.owner_id}
    if relayed_for is not None:
        context = {**context, RELAYED_FOR: relayed_for.party, RELAYED_WALLET: relayed_for.wallet,
                   RELAYED_OWNER: relayed_for.owner_id, RELAYED_CLIENT: relayed_for.client}
    tx = ChainTransaction.objects.create(
        purpose=purpose, agreement_id=agreement_id, to_address=to, data=data, chain_id=settings.CHAIN_ID,
        confirmations_required=confirmations or settings.CHAIN_CONFIRMATIONS, context=context,
    )
    _submit_after_commit(tx.pk)
    return tx


def transaction_record_unsent(*, purpose: str, to: str, agreement_id, reason: str,
                              context: dict | None = None) -> ChainTransaction:
    """A transaction its domain cannot build now (a signature whose key is not configured): recorded failed, never
    sent and its outcome applied (the caller recorded it), so that it is listed where its purpose's failures are.
    Its domain builds it anew once it can; an operator's retry is refused (`transaction_retry`: nothing to send)."""
    return ChainTransaction.objects.create(
        purpose=purpose, agreement_id=agreement_id, to_address=to, data="0x", chain_id=settings.CHAIN_ID,
        confirmations_required=settings.CHAIN_CONFIRMATIONS, status=TxStatus.FAILED, failure_reason=reason[:500],
        outcome_applied=True, context={**(context or {}), UNSENT: reason[:500]})


def _submit_after_commit(tx_id) -> None:
    from escrow.tasks import submit_transaction

    # robust: with the broker down the request still succeeds; the row stays queued and the sweeper sends it.
    transaction.on_commit(lambda: submit_transaction.delay(str(tx_id)), robust=True)


def _relayer_account_ensure(address: str) -> None:
    """The relayer's row, created from the node's pending nonce the first time (asked before any lock)."""
    if RelayerAccount.objects.filter(address=address, chain_id=settings.CHAIN_ID).exists():
        return
    first_nonce = chain.pending_nonce(address)
    try:
        with transaction.atomic():
            RelayerAccount.objects.create(address=address, chain_id=settings.CHAIN_ID, next_nonce=first_nonce)
    except IntegrityError:
        pass  # created concurrently


def _locked_if_unchanged(tx: ChainTransaction) -> bool:
    """Inside a DB transaction: lock `tx`'s row; True when nobody wrote it since `tx` was read. Its agreement's row is
    locked first: one order wherever an outcome meets another of the same agreement (a reorg reopening a payment locks
    the agreement, then withdraws the fee's refund; the refund concluded at once writes the agreement), else two
    workers each holding the other's next lock deadlock."""
    if tx.agreement_id is not None:
        agreement_services.agreement_lock(agreement_id=tx.agreement_id)
    return ChainTransaction.objects.select_for_update(of=("self",)).filter(
        pk=tx.pk, updated_at=tx.updated_at).exists()


def _read_evidence(tx: ChainTransaction) -> None:
    tx.outcome_evidence = _evidence_of(tx)


def _evidence_of(tx: ChainTransaction) -> dict:
    """What its purpose's `read_evidence` reads of `tx` from the chain ({} without one). A node whose answers
    contradict each other (UntrustedAnswer: the token counts an authorization spent, yet shows no log of it) decides
    nothing: the row is marked undecided (`undecided_since`, once, logged) for the dashboard, the metrics
    and the admin, and read again at the next poll; the read that decides it clears the mark."""
    reader = _evidence_readers.get(tx.purpose)
    if reader is None:
        return {}
    try:
        evidence = reader(tx)
    except chain.UntrustedAnswer as error:
        # update(), not save(): updated_at is the row's version (`_locked_if_unchanged`), and nothing of it changed.
        if ChainTransaction.objects.filter(pk=tx.pk, undecided_since=None).update(
                undecided_since=timezone.now(), undecided_reason=str(error)[:500]):
            # A warning: a backend behind clears it at the next poll; one that stays is overdue on the dashboard.
            logger.warning("chain transaction's outcome undecided: the node's answers contradict each other",
                           extra={"tx_id": str(tx.pk), "purpose": tx.purpose, "error": str(error)})
        raise
    if tx.undecided_since is not None:
        ChainTransaction.objects.filter(pk=tx.pk).update(undecided_since=None, undecided_reason="")
        tx.undecided_since, tx.undecided_reason = None, ""
    return evidence


def _apply_outcome(tx: ChainTransaction) -> None:
    if tx.outcome_applied:
        return
    handler = _outcome_handlers.get(tx.purpose)
    if handler is None:
        # Rolls back the conclusion: the transaction is concluded again, and applied, once a handler exists.
        raise ImproperlyConfigured(f"No outcome handler for {tx.purpose} chain transactions: register one with "
                                   "relayer.outcome_handler_register in an AppConfig.ready().")
    handler(tx)
    tx.outcome_applied = True
    tx.save(update_fields=["outcome_applied", "updated_at"])


_OUTCOME_FIELDS = ["status", "failure_reason", "confirmed_at", "outcome_evidence", "mined_tx_hash",
                   "mined_block_number", "mined_block_hash", "receipt_status", "updated_at"]


def _conclude(tx: ChainTransaction, *, failure: str | None = None,
              reverted_within_gas: bool = False) -> ChainTransaction | None:
    """Make `tx` confirmed (or failed with `failure`) and tell the domain, once: the evidence is read from the
    chain first, then one locked write. None when another worker changed the row meanwhile. `reverted_within_gas`:
    it was mined and reverted short of its gas limit (or refused at its simulation, its purpose's `refusal_charged`),
    charged to its relayed party (`_revert_attribute`)."""
    tx.status = TxStatus.FAILED if failure is not None else TxStatus.CONFIRMED
    tx.failure_reason = (failure or "").replace("\x00", "")[:500]  # PostgreSQL stores no NUL character
    tx.confirmed_at = timezone.now() if failure is None else None
    _read_evidence(tx)
    with transaction.atomic():
        if not _locked_if_unchanged(tx):
            return None
        tx.save(update_fields=_OUTCOME_FIELDS)
        if reverted_within_gas:
            _revert_attribute(tx)
        _apply_outcome(tx)
    return tx


def _new_attempt(tx: ChainTransaction, fees: chain.Fees) -> TxAttempt:
    """Signed by the key of `tx`'s wallet (`chainconfig.relayer_key`: the current one, or a replaced one kept in
    RELAYER_RETIRED_PRIVATE_KEYS). A nonce is one wallet's: bytes another key signs under it are another wallet's
    transaction, which those already sent do not exclude, so both may run (a payout made twice)."""
    key = chainconfig.relayer_key(tx.relayer.address)
    if key is None:
        raise ImproperlyConfigured(
            f"Neither RELAYER_PRIVATE_KEY nor RELAYER_RETIRED_PRIVATE_KEYS is the key of {tx.relayer.address}, whose "
            f"nonce {tx.nonce} chain transaction {tx.pk} holds: only that key can sign in its place (put it back in "
            "RELAYER_RETIRED_PRIVATE_KEYS).")
    signed = chain.sign(key=key, to=tx.to_address, data=tx.data, nonce=tx.nonce, gas=tx.gas_limit, fees=fees)
    return TxAttempt.objects.create(
        transaction=tx, tx_hash=signed.tx_hash, raw_transaction=signed.raw, nonce=tx.nonce,
        max_fee_per_gas=fees.max_fee_per_gas, max_priority_fee_per_gas=fees.max_priority_fee_per_gas,
    )


def _broadcast(attempt: TxAttempt) -> None:
    """Broadcast and record the outcome; a failure is left for `transaction_check` to retry."""
    try:
        chain.broadcast(attempt.raw_transaction)
    except chain.ChainError as error:
        logger.warning("broadcast failed", extra={"tx_hash": attempt.tx_hash, "error": str(error)})
        _broadcast_refused(attempt, error)
        return
    TxAttempt.objects.filter(pk=attempt.pk).update(broadcast_at=timezone.now(), broadcast_error="")


def _broadcast_refused(attempt: TxAttempt, error: chain.ChainError) -> None:
    """Record why the node refused `attempt` and when (it is sent again CHAIN_REBROADCAST_AFTER later); the wallet
    unable to pay its gas is an operator's to fix (said once)."""
    if isinstance(error, chain.InsufficientFunds) and not _unfunded(attempt):
        logger.error("the relayer's wallet cannot pay a transaction's gas: top it up",
                     extra={"tx_id": str(attempt.transaction_id), "tx_hash": attempt.tx_hash, "nonce": attempt.nonce})
    recorded = {"broadcast_error": f"{type(error).__name__}: {error}"[:500]}
    if isinstance(error, chain.InsufficientFunds):
        recorded["refused_balance_wei"] = _balance_or_none(attempt.transaction.relayer.address)
    # No answer is no refusal, and "nonce too low" is resolved by the next check's resend (`_after_nonce_too_low`):
    # both are sent again at the next poll.
    if not isinstance(error, chain.RpcUnavailable | chain.NonceTooLow):
        recorded["refused_at"] = timezone.now()
    TxAttempt.objects.filter(pk=attempt.pk).update(**recorded)


def _balance_or_none(address: str) -> int | None:
    """The wallet's balance, once per poll (`_wallet_balances`); None when the node does not answer it."""
    balances = _wallet_balances.get()
    if balances is not None and address in balances:
        return balances[address]
    try:
        balance = chain.balance_wei(address)
    except chain.ChainError:
        balance = None
    if balances is not None:
        balances[address] = balance
    return balance


def _topped_up_since_refused(tx: ChainTransaction, attempt: TxAttempt) -> bool:
    """Whether `attempt`, refused because the wallet could not pay its gas, may go before CHAIN_REBROADCAST_AFTER:
    the wallet's balance now covers its max cost and is above the one read at its refusal (a top-up since). Refused
    again, its balance then is the new mark: a node that keeps refusing it is asked once per top-up, not each poll."""
    if not _unfunded(attempt) or attempt.refused_balance_wei is None:
        return False
    balance = _balance_or_none(tx.relayer.address)
    return (balance is not None and balance > int(attempt.refused_balance_wei)
            and balance >= (tx.gas_limit or 0) * int(attempt.max_fee_per_gas))


def _unfunded(attempt: TxAttempt) -> bool:
    """Whether the node refused `attempt`'s last broadcast because the wallet cannot pay its gas."""
    return attempt.broadcast_error.startswith(UNFUNDED_BROADCAST_ERROR)


def _logs_name_the_agreement(function):
    """Log records of work on one transaction carry its agreement's id."""
    @functools.wraps(function)
    def wrapper(*, transaction_id):
        agreement_id = (ChainTransaction.objects.filter(pk=transaction_id)
                        .values_list("agreement_id", flat=True).first())
        with agreement_context(agreement_id):
            return function(transaction_id=transaction_id)

    return wrapper


def concluded_receipt(tx: ChainTransaction) -> chain.Receipt:
    """The receipt of mined `tx` (the gateway's: of that transaction), in the block the relayer concluded it on, for
    an evidence reader. Raises ChainError otherwise: a reorg took it since (the poll checks the transaction again),
    or a node behind or ahead of that block answers another (its events are not those the outcome rests on)."""
    mined = chain.receipt(tx.mined_tx_hash)
    if mined is None:
        raise chain.ChainError(f"the receipt of {tx.mined_tx_hash} is gone")
    if mined.block_hash.lower() != tx.mined_block_hash.lower():
        raise chain.UntrustedAnswer(f"the receipt of {tx.mined_tx_hash} is of block {mined.block_hash}, not "
                                    f"{tx.mined_block_hash}")
    return mined


@_logs_name_the_agreement
def transaction_submit(*, transaction_id) -> ChainTransaction | None:
    """Queued -> submitted. A no-op for any other status, so it is safe to run twice."""
    tx = ChainTransaction.objects.filter(pk=transaction_id, status=TxStatus.QUEUED).first()
    if tx is None:
        return None
    if tx.submit_queued_at is not None:  # the sweep's message is taken: a row this run leaves queued is swept again
        ChainTransaction.objects.filter(pk=tx.pk).update(submit_queued_at=None)
    chain.node_chain_check()  # another chain's simulation, fees and nonce are not this one's
    if _waits_for_finality(tx):
        return None
    sender = chain.relayer_account().address
    try:
        gas = chain.simulate(sender=sender, to=tx.to_address, data=tx.data)
        fees = chain.current_fees()
    except chain.Reverted as reverted:
        if _done_by_a_copy_not_deep_yet(tx):
            return None  # left queued, asked again by the poll once the copy is deep (or by a caller awaiting it)
        charged = (tx.purpose in _refusals_charged and OPERATOR_RETRY_OF not in tx.context
                   and _refusals_charged[tx.purpose](tx))
        return _conclude(tx, failure=reverted.reason, reverted_within_gas=charged)
    except chain.ChainError as erred:
        # Kept for the dashboard's overdue item: a row the node errs on each time stays queued, sent again by the
        # sweep. updated_at is left as is: it dates the overdue item.
        ChainTransaction.objects.filter(pk=tx.pk, status=TxStatus.QUEUED).update(
            submit_error=f"{type(erred).__name__}: {erred}"[:500])
        raise
    _relayer_account_ensure(sender)
    with transaction.atomic():
        tx = ChainTransaction.objects.select_for_update().filter(pk=transaction_id, status=TxStatus.QUEUED).first()
        if tx is None:
            return None  # submitted by another worker meanwhile
        relayer = RelayerAccount.objects.select_for_update().get(address=sender, chain_id=settings.CHAIN_ID)
        tx.relayer = relayer
        tx.nonce = relayer.next_nonce
        tx.gas_limit = gas * (100 + _GAS_HEADROOM_PERCENT) // 100 + _SLOT_FILL_GAS
        relayer.next_nonce += 1
        relayer.save(update_fields=["next_nonce"])
        attempt = _new_attempt(tx, fees)
        tx.status, tx.held_until_block, tx.copy_deep_at_block = TxStatus.SUBMITTED, None, None
        tx.submit_error = ""
        tx.save(update_fields=["relayer", "nonce", "gas_limit", "status", "held_until_block", "copy_deep_at_block",
                               "submit_error", "updated_at"])
        if tx.purpose in _submitted_handlers:
            _submitted_handlers[tx.purpose](tx)
    _broadcast(attempt)
    return tx


def _done_by_a_copy_not_deep_yet(tx: ChainTransaction) -> bool:
    """Whether queued `tx`, refused at its simulation, is so because someone else's transaction did what it would have
    (its evidence names that block: EVIDENCE_BLOCK, a copy of a buyer's authorization sent by anyone holding it) in a
    block not yet at `tx`'s confirmation depth. Concluded now, its outcome rested on a block a shallow reorg may take:
    a skill's seller was called, a direct purchase counted paid, where ours mined would have waited for the depth.
    Left queued instead, it is simulated again each time it is sent: concluded on the copy once that is deep enough
    (a later reorg reopens it, `transactions_reopen_reorged`), or sent itself when a reorg took the copy first."""
    if tx.purpose not in _evidence_readers:
        return False
    block = _evidence_of(tx).get(EVIDENCE_BLOCK)
    if block is None or _block_deep_enough(tx, block_number=block["number"], block_hash=block["hash"],
                                           latest=chain.latest_block_number()):
        return False
    # Asked again by the next poll that finds the head there (`transactions_release_copied`), not a sweep later.
    ChainTransaction.objects.filter(pk=tx.pk, status=TxStatus.QUEUED).update(
        copy_deep_at_block=block["number"] + tx.confirmations_required - 1, updated_at=timezone.now())
    return True


def _waits_for_finality(tx: ChainTransaction) -> bool:
    """Whether queued `tx` must not be signed yet: its purpose forwards money another transaction brought in
    (`finality_wait_register`) and that transaction's block is not yet at or below the node's PAYOUT_HEAD_TAG block,
    or no longer canonical (the reorg handling reopens it: the payout waits for its outcome), or there is none on the
    chain now. Then it is held, naming the block whose finality it waits for (the head's when there is none): the
    poll releases it once the tag passes that block (`transactions_release_final`), and it is asked again here."""
    if not settings.PAYOUT_HEAD_TAG or tx.purpose not in _spent_blocks:
        return False
    spent = _spent_blocks[tx.purpose](tx)
    # The tag before the hash: a block final by the tag read first that still holds the payment holds it for good,
    # whereas a hash read first could predate a reorg the tag read after it already counts as final.
    final = _final_block()
    if spent is not None and spent[0] <= final[0] and _final_holds(final, *spent):
        return False
    if spent is not None and spent[0] > final[0] and chain.canonical_block_hash(spent[0]) == spent[1]:
        until = spent[0]
    else:
        until = chain.latest_block_number()
    ChainTransaction.objects.filter(pk=tx.pk, status=TxStatus.QUEUED).update(held_until_block=until,
                                                                             updated_at=timezone.now())
    if tx.held_until_block != until:
        logger.info("chain transaction waits for the finality of the payment it forwards",
                    extra={"tx_id": str(tx.pk), "purpose": tx.purpose, "until_block": until,
                           "tag": settings.PAYOUT_HEAD_TAG})
    return True


def _final_block() -> tuple[int, str]:
    """The node's PAYOUT_HEAD_TAG block (number, hash); (-1, "") (nothing is final) when the node cannot be believed on
    it (it refuses the tag, answers nothing, names a block beyond its head): what waits is held, visibly, never
    released on an error (the dashboard, /readyz and reconcile say why: `selectors.payout_release_blocker`)."""
    try:
        return chain.final_block(settings.PAYOUT_HEAD_TAG)
    except chain.ChainError as error:
        logger.warning("the node's tagged block cannot be read: payouts waiting for their payment's finality stay held",
                       extra={"error": str(error), "tag": settings.PAYOUT_HEAD_TAG})
        return -1, ""


def _final_holds(final: tuple[int, str], number: int, block_hash: str) -> bool:
    """Whether the payment's block (`number`, `block_hash`) is the one the tagged block `final` descends from. Its
    height read alone may reach another backend of a load-balanced provider than the tag did: one stuck on a branch
    the chain dropped still holds the payment there, and the payout was released on a payment the finalized chain
    does not have. Read from the tagged block down by hash (`chain.block_below`); a payment block further below it
    than that walk goes is compared at its height, as before."""
    below = chain.block_below(final, number)
    if below is None and final[0] - number > settings.INDEXER_REORG_WINDOW_BLOCKS:
        below = chain.canonical_block_hash(number)
    return below is not None and below.lower() == block_hash.lower()


def transactions_release_final() -> int:
    """Queued transactions held for a payment's finality (`_waits_for_finality`) whose block the node's PAYOUT_HEAD_TAG
    block has reached (all of them when the setting was emptied since) are submitted again, once each: their hold is
    cleared in the DB transaction that enqueues them after commit (a lost message leaves them to the sweeper), and
    the submit checks the payment's block again. One tagged-block call per poll, none when nothing is held."""
    held = ChainTransaction.objects.filter(status=TxStatus.QUEUED, held_until_block__isnull=False)
    if not held.exists():
        return 0
    if settings.PAYOUT_HEAD_TAG:
        held = held.filter(held_until_block__lte=chain.final_block_number(settings.PAYOUT_HEAD_TAG))
    released = 0
    with transaction.atomic():
        for tx_id, block in held.values_list("pk", "held_until_block")[:500]:
            if ChainTransaction.objects.filter(pk=tx_id, status=TxStatus.QUEUED, held_until_block=block).update(
                    held_until_block=None, updated_at=timezone.now()):
                _submit_after_commit(tx_id)
                released += 1
    return released


def transactions_release_copied() -> int:
    """Queued transactions waiting for someone else's copy to reach their confirmation depth
    (`_done_by_a_copy_not_deep_yet`) whose block the node's head has reached are submitted again, once each (cleared
    in the DB transaction that enqueues them after commit; a lost message leaves them to the sweeper): concluded on
    the copy, or sent themselves when a reorg took it. One head call per poll, none when nothing waits."""
    waiting = ChainTransaction.objects.filter(status=TxStatus.QUEUED, copy_deep_at_block__isnull=False)
    if not waiting.exists():
        return 0
    latest = chain.latest_block_number()
    released = 0
    with transaction.atomic():
        for tx_id, block in waiting.filter(copy_deep_at_block__lte=latest).values_list("pk", "copy_deep_at_block")[:500]:
            if ChainTransaction.objects.filter(pk=tx_id, status=TxStatus.QUEUED, copy_deep_at_block=block).update(
                    copy_deep_at_block=None, updated_at=timezone.now()):
                _submit_after_commit(tx_id)
                released += 1
    return released


def _block_deep_enough(tx: ChainTransaction, *, block_number: int, block_hash: str, latest: int) -> bool:
    """Whether a block `tx`'s outcome rests on (`block_hash` at `block_number`: its own, or that of someone else's copy
    its evidence names, EVIDENCE_BLOCK) is at `tx`'s confirmation depth: the head `latest` is that far above it and
    the blocks up to that depth descend from it, each the parent of the next. The head's number alone, from a backend
    of a load-balanced provider other than the one that answered the receipt or the logs and the block (one left on a
    branch the chain dropped), counted a depth of blocks that do not hold the transaction: a payout on no chain
    concluded confirmed, a payment concluded on a copy on no chain. A block missing or of another branch is no depth
    yet: looked at again at the next poll (a backend that shows the branch gone has a mined transaction forgotten as
    such, a copy no longer found)."""
    if latest - block_number + 1 < tx.confirmations_required:
        return False
    if not chain.blocks_above_descend(block_number, block_hash, depth=tx.confirmations_required):
        logger.warning("the blocks above the block a transaction's outcome rests on do not descend from it: its depth "
                       "is not counted", extra={"tx_id": str(tx.pk), "block": block_number, "block_hash": block_hash})
        return False
    return True


def _first_receipt(tx: ChainTransaction) -> tuple[TxAttempt, chain.Receipt] | None:
    """A receipt of any attempt ever broadcast (a replaced one may be the one mined), read fresh from the DB."""
    for attempt in _attempts(tx):
        found = chain.receipt(attempt.tx_hash)
        if found is not None:
            return attempt, found
    return None


def _record_receipt(tx: ChainTransaction, attempt: TxAttempt, found: chain.Receipt) -> ChainTransaction | None:
    """Mined, and concluded once deep enough: only when the receipt's block is the node's canonical block at its
    height. A receipt of a block beyond the node's head or off its chain (a backend ahead of the one answering blocks,
    a stale branch's, a proxy mixing its answers up) is not recorded: counted from its block number alone, its depth
    concluded a payout that was not mined. The next poll reads it again."""
    if chain.canonical_block_hash(found.block_number) != found.block_hash:
        logger.warning("a receipt whose block is not the node's at its height: looked at again at the next poll",
                       extra={"tx_id": str(tx.pk), "tx_hash": attempt.tx_hash, "block": found.block_number,
                              "block_hash": found.block_hash})
        return tx
    tx.status = TxStatus.MINED
    tx.mined_tx_hash = attempt.tx_hash
    tx.mined_block_number = found.block_number
    tx.mined_block_hash = found.block_hash
    tx.receipt_status = found.status
    latest = max(chain.latest_block_number(), found.block_number)
    if _block_deep_enough(tx, block_number=found.block_number, block_hash=found.block_hash, latest=latest):
        return _conclude_mined(tx)
    return _save_mined(tx)


def _save_mined(tx: ChainTransaction) -> ChainTransaction | None:
    with transaction.atomic():
        if not _locked_if_unchanged(tx):
            return None
        tx.save(update_fields=["status", "mined_tx_hash", "mined_block_number", "mined_block_hash", "receipt_status",
                               "updated_at"])
    return tx


# Within a poll, each relayer wallet's balance (wei; None: not answered), read once, when an attempt refused for
# its gas waits (`_topped_up_since_refused`).
_wallet_balances: contextvars.ContextVar[dict | None] = contextvars.ContextVar("wallet_balances", default=None)


# Within a poll's first pass (`transactions_poll`), the ids of transactions mined-reverted at their depth, whose
# failure waits for the second pass: it is recorded mined meanwhile.
_failures_deferred: contextvars.ContextVar[list | None] = contextvars.ContextVar("failures_deferred", default=None)


def _conclude_mined(tx: ChainTransaction) -> ChainTransaction | None:
    if tx.receipt_status == 1:
        return _conclude(tx)
    deferred = _failures_deferred.get()
    if deferred is not None:
        deferred.append(tx.pk)
        return _save_mined(tx)
    reason = chain.revert_reason(sender=tx.relayer.address, to=tx.to_address, data=tx.data,
                                 block_number=tx.mined_block_number)
    gas_used = _gas_used(tx)
    ran_out = gas_used is not None and tx.gas_limit is not None and gas_used >= _all_but_a_64th(tx.gas_limit)
    if ran_out:
        # After the replay's reason, which a domain reads first (`chain.REASON_NOT_READ`, an activation's
        # AgreementExists): the replay, given all the gas it asks, does not run out of it.
        reason = f"{reason} ({OUT_OF_GAS}: it used all {tx.gas_limit} gas the relayer gave it)"
    return _conclude(tx, failure=reason, reverted_within_gas=gas_used is not None and not ran_out)


def _all_but_a_64th(gas_limit: int) -> int:
    """The least gas a transaction that ran out of it used: a call out of gas in a call it made (a token's transfer)
    fails that call alone, which keeps back a 64th of the gas for the caller (EIP-150), and the caller reverts having
    used the rest."""
    return gas_limit - gas_limit // 64


def _gas_used(tx: ChainTransaction) -> int | None:
    """The gas mined `tx` used, from its receipt: short of its gas limit, a revert is the chain's refusal (what its
    signer changed since the simulation, for a relayed party's action); all of it (`_all_but_a_64th`), it ran out of
    the gas we gave it, our fault (`OUT_OF_GAS`). Its replay cannot tell: it runs on the block's end state, which a party that moved its
    funds out before ours and back after it has restored. None when the receipt is gone (a reorg: concluded again
    later)."""
    found = chain.receipt(tx.mined_tx_hash)
    return None if found is None else found.gas_used


def _forget_mined(tx: ChainTransaction) -> None:
    logger.warning("reorg: mined block no longer canonical", extra={"tx_id": str(tx.pk),
                                                                     "block": tx.mined_block_number})
    with transaction.atomic():
        if not _locked_if_unchanged(tx):
            return
        tx.status = TxStatus.SUBMITTED
        tx.mined_tx_hash = tx.mined_block_hash = ""
        tx.mined_block_number = tx.receipt_status = None
        tx.save(update_fields=["status", "mined_tx_hash", "mined_block_number", "mined_block_hash",
                               "receipt_status", "updated_at"])


def transactions_reopen_reorged(*, after_block: int | None = None, failures: sweeps.RowFailures | None = None) -> int:
    """Concluded transactions whose outcome rests on a block (mined after `after_block`, when given) a reorg deeper
    than the confirmation depth took off the chain are reopened; returns how many. One mined rests on its own block,
    whether it ran (confirmed) or reverted (failed: on the new branch its nonce is unused, so every later transaction
    of the relayer waits behind it, and its bytes may run there); a failed one whose evidence names someone else's
    transaction (EVIDENCE_BLOCK) on that transaction's. A block still canonical means its ancestors are too, so the
    newest such block is asked first and, on the usual poll, alone (the walk down goes back at most
    INDEXER_REORG_WINDOW_BLOCKS). A height the node has no block at yet is not taken (`_replaced`), nor a mined
    one's block while the node still answers its receipt in it (`_receipt_still_in_its_block`). One whose
    reopening raises other than a chain error (its domain's handler refusing it, bad data) is logged and skipped, the
    others reopened, in `failures` (the poll's; else RowsFailed raised at the end): it ended every poll there."""
    mined = ChainTransaction.objects.filter(status__in=[TxStatus.CONFIRMED, TxStatus.FAILED],
                                            mined_block_number__isnull=False)
    decided_elsewhere = ChainTransaction.objects.filter(status=TxStatus.FAILED,
                                                        outcome_evidence__has_key=EVIDENCE_BLOCK)
    if after_block is not None:
        mined = mined.filter(mined_block_number__gt=after_block)
        decided_elsewhere = decided_elsewhere.filter(**{f"outcome_evidence__{EVIDENCE_BLOCK}__number__gt": after_block})
    own_blocks = mined.order_by("-mined_block_number").values_list("mined_block_number", "mined_block_hash")
    evidence_number = f"outcome_evidence__{EVIDENCE_BLOCK}__number"
    evidence_blocks = decided_elsewhere.order_by(f"-{evidence_number}").values_list(
        evidence_number, f"outcome_evidence__{EVIDENCE_BLOCK}__hash")
    newest = max((first for first in (own_blocks.first(), evidence_blocks.first()) if first is not None), default=None)
    if newest is None or not _replaced(*newest):
        return 0
    floor = newest[0] - settings.INDEXER_REORG_WINDOW_BLOCKS
    candidates = sorted({*own_blocks.filter(mined_block_number__gte=floor),
                         *evidence_blocks.filter(**{f"{evidence_number}__gte": floor})}, reverse=True)
    gone = []
    for number, block_hash in candidates:
        if not _replaced(number, block_hash):
            break
        gone.append((number, block_hash))
    reopened, own = 0, failures is None
    failures = sweeps.RowFailures("reorged transactions reopening") if own else failures
    for number, block_hash in gone:
        for tx in [*mined.filter(mined_block_number=number, mined_block_hash=block_hash),
                   *decided_elsewhere.filter(**{evidence_number: number,
                                                f"outcome_evidence__{EVIDENCE_BLOCK}__hash": block_hash})]:
            with failures.row(tx.pk, reraise=(chain.ChainError,), atomic=False):  # it takes its own
                if tx.mined_block_hash == block_hash and _receipt_still_in_its_block(tx):
                    continue
                reopened += _reopen(tx)
    if own:
        failures.raise_if_any(applied=reopened)
    return reopened


def _receipt_still_in_its_block(tx: ChainTransaction) -> bool:
    """Whether the node still answers mined `tx`'s receipt in its block, which another answer had replaced: a
    load-balanced provider's backend stuck on a branch the chain dropped answers that height with the branch's block,
    and the concluded transaction was reopened (its domain told to move back what it recorded) on that alone. A real
    reorg takes the receipt with the block; until the node's answers agree, nothing is reopened."""
    found = chain.receipt(tx.mined_tx_hash)
    if found is None or found.block_hash.lower() != tx.mined_block_hash.lower():
        return False
    logger.warning("a block a concluded transaction was mined in answered replaced, its receipt still in it: not "
                   "reopened until the node's answers agree",
                   extra={"tx_id": str(tx.pk), "block": tx.mined_block_number, "block_hash": tx.mined_block_hash})
    return True


def _outcome_stands(tx: ChainTransaction) -> bool:
    """A failed transaction whose outcome rests on the block of someone else's transaction (EVIDENCE_BLOCK: it did
    what ours would, first: a copy of an x402 authorization or of a buyer's signed intent, someone else's finalize or
    reclaim) that is still on the chain: a reorg that took only our own, later, block undid none of it (a reorg takes
    every block from its fork on), so its `on_reopened` handler moves nothing back, and the outcome, concluded again
    on the same evidence, is applied again where it already is. Not when the node has no block at that height yet
    (`_replaced`): nothing took it."""
    block = tx.outcome_evidence.get(EVIDENCE_BLOCK)
    return tx.status == TxStatus.FAILED and block is not None and not _replaced(block["number"], block["hash"])


def _replaced(number: int, block_hash: str) -> bool:
    """Whether the node holds another block than `block_hash` at height `number`: a reorg took it. None there is no
    reorg but a node behind (a load-balanced provider's backend behind the one that answered before): nothing took
    the block's place, so what rests on it waits until the node's head reaches that height, and is judged then (a
    real reorg's new branch reaches the old height within a block or two)."""
    return chain.canonical_block_hash(number) not in (block_hash, None)


def _reopen(tx: ChainTransaction) -> bool:
    """Back to submitted (queued when it was never sent: it failed before taking a nonce), its outcome to be applied
    again when it is concluded again (the domain's transitions are no-ops where the agreement already is, and a
    reorg the indexer saw moved the agreement back; what no contract event records, such as a skill invocation's
    payment or payout, or a failure the domain recorded, its `on_reopened` handler moves back). A failed one
    something took the place of since (`_superseded`) is not: its nonce is cancelled instead (`_cancel`). A failed one
    whose outcome rests on someone else's transaction still on the chain (`_outcome_stands`) has nothing moved back:
    the reorg took only its own block, and its bytes, sent again, revert again."""
    logger.warning("reorg below the confirmation depth: a block a concluded transaction's outcome rests on is no "
                   "longer canonical", extra={"tx_id": str(tx.pk), "block": tx.mined_block_number,
                                              "tx_hash": tx.mined_tx_hash, "status": tx.status})
    stands = _outcome_stands(tx)  # a chain read: before the row lock (the lock checks `tx` is unchanged since)
    with transaction.atomic():
        if not _locked_if_unchanged(tx):
            return False
        RelayRevert.objects.filter(transaction=tx).delete()  # its revert is off the chain with its block
        if _superseded(tx):
            _cancel(tx)
            return True
        if tx.purpose in _reopened_handlers and not stands:
            _reopened_handlers[tx.purpose](tx)
        tx.status = TxStatus.SUBMITTED if tx.nonce is not None else TxStatus.QUEUED
        tx.mined_tx_hash = tx.mined_block_hash = tx.failure_reason = ""
        tx.mined_block_number = tx.receipt_status = tx.confirmed_at = None
        tx.outcome_evidence, tx.outcome_applied = {}, False
        tx.save(update_fields=[*_OUTCOME_FIELDS, "outcome_applied"])
        if tx.status == TxStatus.QUEUED:
            _submit_after_commit(tx.pk)
    return True


def transactions_recheck_watched(*, failures: sweeps.RowFailures | None = None, read: list | None = None) -> int:
    """Failed transactions their domain watches (`watch_failed`: a failed payment whose authorization is valid)
    have their evidence read again. Such a failure rests on no block of someone else's: it says that nobody used
    the payment's authorization, which anyone holding it may still do, and a reorg may put back a block in which a
    copy of it did (when ours never took a nonce, no block of ours is taken). Once the evidence names that
    transaction's block (EVIDENCE_BLOCK) at the confirmation depth, the outcome is applied again on it (the payment
    made after all); a reorg that takes that block reopens the transaction as any other so decided. Returns how
    many changed.

    At most CHAIN_WATCHED_CHECKS_PER_POLL of them per poll, a sample drawn anew at each: a buyer chooses how long its
    authorization is valid and can have its payments fail at will, and one RPC call each at every poll would let it
    make every poll as long as it liked. With more watched, each is read every few polls instead. The sample is
    drawn from every kind at once, so that many of one kind cannot starve the others of reads.

    One whose outcome raises other than a chain error (its domain's handler refusing it, bad data) is logged and
    skipped, the others read, in `failures` (the poll's; else RowsFailed raised at the end): it ended every poll
    there whenever the sample drew it. One the node leaves undecided (`_evidence_of`) is skipped alike, and watched
    past its domain's window until a read decides it. Within a poll (`read`: what it checked without an error), one
    that could withdraw a transaction of its agreement or invocation the poll did not read waits, as a failure
    concluded in the poll does (`_failures_decidable`)."""
    if not _failure_watches:
        return 0
    # With those left undecided (`_evidence_of`), whose authorization's window may be over: dropped then, a use no log
    # was found of stayed unrecorded for good.
    watched = functools.reduce(operator.or_, (watch().filter(purpose=purpose)
                                              for purpose, watch in _failure_watches.items()),
                               ChainTransaction.objects.filter(purpose__in=list(_failure_watches),
                                                               undecided_since__isnull=False))
    sample = watched.filter(status=TxStatus.FAILED).exclude(outcome_evidence__has_key=EVIDENCE_BLOCK).order_by("?")
    renewed, own = 0, failures is None
    failures = sweeps.RowFailures("watched failures reading") if own else failures
    drawn = list(sample[:settings.CHAIN_WATCHED_CHECKS_PER_POLL])
    decidable = set(_failures_decidable([tx.pk for tx in drawn], read=read))
    for tx in (tx for tx in drawn if tx.pk in decidable):
        try:
            with failures.row(tx.pk, reraise=(chain.ChainError,), atomic=False):  # it reads the chain, then locks
                renewed += _evidence_renewed(tx)
        except chain.UntrustedAnswer as error:  # this one's answers only (marked undecided): the others are read
            logger.warning("watched failure undecided", extra={"tx_id": str(tx.pk), "error": str(error)})
    if own:
        failures.raise_if_any(applied=renewed)
    return renewed


def _evidence_renewed(tx: ChainTransaction) -> bool:
    evidence = _evidence_of(tx)
    block = evidence.get(EVIDENCE_BLOCK)
    if block is None or not _block_deep_enough(tx, block_number=block["number"], block_hash=block["hash"],
                                               latest=chain.latest_block_number()):
        return False
    with transaction.atomic():
        if not _locked_if_unchanged(tx):
            return False
        logger.warning("a failed transaction's outcome changed: another transaction did what it would have",
                       extra={"tx_id": str(tx.pk), "evidence": evidence})
        RelayRevert.objects.filter(transaction=tx).delete()  # not the party's: what it asked for was done
        tx.outcome_evidence, tx.outcome_applied = evidence, False
        tx.save(update_fields=["outcome_evidence", "outcome_applied", "updated_at"])
        _apply_outcome(tx)
    return True


def _superseded(tx: ChainTransaction) -> bool:
    """A failed transaction something took the place of since: an operator's retry of it, or another of its agreement
    and purpose (the buyer's new activation, the next settlement proposal) or a fee payment under way; or one its
    domain no longer wants (`rerun_wanted`). Its bytes must not run again: a payout retried would pay twice, those
    others admit no second one live beside them, and an activation of a cancelled agreement would take the money of a
    buyer who cancelled."""
    if tx.status != TxStatus.FAILED:
        return False
    if tx.purpose in _rerun_checks and not _rerun_checks[tx.purpose](tx):
        return True
    others = ChainTransaction.objects.exclude(pk=tx.pk)
    if others.filter(**{f"context__{OPERATOR_RETRY_OF}": str(tx.pk)}).exists():
        return True
    if tx.agreement_id is not None:
        return others.filter(agreement_id=tx.agreement_id, purpose=tx.purpose).exclude(
            status=TxStatus.FAILED).exists()
    return tx.purpose == TxPurpose.PAY_FEES and others.filter(purpose=TxPurpose.PAY_FEES, status__in=[
        TxStatus.QUEUED, TxStatus.SUBMITTED, TxStatus.MINED]).exists()


def _cancel(tx: ChainTransaction) -> None:
    """Inside the DB transaction holding `tx`'s row lock, `tx` failed (a superseded one, its outcome as it was, or one
    the domain withdrew): it no longer rests on a block, and its nonce (unused on the chain: every later transaction
    waits behind it) passes to a nonce fill whose one attempt transfers nothing to the relayer itself, with fees above
    its last attempt's so that a node still holding its old bytes takes the fill in their place. The fill's checks
    look up the old bytes too (`_attempts`): anyone may send them first, and the fill then names them
    (`nonce_fill_outcome`). One never signed ran nothing and never will: its domain is told so at once."""
    cancelled_nonce, tx.nonce = tx.nonce, None
    tx.mined_tx_hash = tx.mined_block_hash = ""
    tx.mined_block_number = tx.receipt_status = None
    tx.outcome_evidence = {key: value for key, value in tx.outcome_evidence.items() if key != EVIDENCE_BLOCK}
    tx.save(update_fields=[*_OUTCOME_FIELDS, "nonce"])
    if cancelled_nonce is None:
        _tell_cancelled(tx, ran_as=None)
        return
    last = tx.attempts.order_by("-created_at", "-pk").first()
    # Not capped (one bump past CHAIN_MAX_FEE_PER_GAS at most, for 21,000 gas): capped, a fill of an attempt at the cap
    # bid the same max fee, which no node takes as a replacement, and the cancelled bytes it held ran instead.
    fees = chain.Fees(int(last.max_fee_per_gas), int(last.max_priority_fee_per_gas)).bumped(
        settings.CHAIN_FEE_BUMP_PERCENT, cap=_UNCAPPED)
    fill = ChainTransaction.objects.create(
        purpose=TxPurpose.NONCE_FILL, relayer=tx.relayer, nonce=cancelled_nonce, gas_limit=_PLAIN_TRANSFER_GAS,
        to_address=tx.relayer.address, data="0x", chain_id=tx.chain_id, status=TxStatus.SUBMITTED,
        confirmations_required=tx.confirmations_required, context={CANCELS: str(tx.pk)})
    _new_attempt(fill, fees)
    logger.warning("a failed transaction's nonce is cancelled by a nonce fill",
                   extra={"tx_id": str(tx.pk), "fill_id": str(fill.pk), "nonce": cancelled_nonce})


def _attempts(tx: ChainTransaction):
    """Every attempt signed under `tx`'s nonce: its own, and a fill's cancelled transaction's (`CANCELS`)."""
    cancelled = tx.context.get(CANCELS)
    if cancelled is None:
        return tx.attempts.all()
    return TxAttempt.objects.filter(transaction_id__in=[tx.pk, cancelled]).order_by("created_at", "pk")


def nonce_fill_outcome(tx: ChainTransaction) -> None:
    """A nonce fill changes nothing outside the relayer; one that cancels a transaction reports that transaction's
    own bytes mined in its place (sent first by someone, or by a node that held them): what it does may be done
    twice (a payout and its retry): `reconcile` reports the fill (`selectors.nonce_fills_outrun`) until an operator
    acknowledges it. The cancelled transaction's domain is told which of the two took the nonce (`on_cancelled`), and
    told again each time a reorg took the fill's block and it is concluded anew (`nonce_fill_reopened`)."""
    cancelled_id = tx.context.get(CANCELS)
    if cancelled_id is None:
        return
    cancelled = ChainTransaction.objects.get(pk=cancelled_id)
    if _outrun(tx, cancelled):
        logger.error("a cancelled transaction's own bytes were mined in place of its nonce fill",
                     extra={"tx_id": cancelled_id, "fill_id": str(tx.pk), "tx_hash": tx.mined_tx_hash,
                            "receipt_status": tx.receipt_status})
    _tell_cancelled(cancelled, ran_as=_ran_as(tx, cancelled))


def nonce_fill_reopened(tx: ChainTransaction) -> None:
    """A reorg took the block of a nonce fill's outcome. When that was the cancelled transaction's own old bytes, which
    ran, their run is off the chain with it: the cancelled transaction's domain moves back what it recorded of them
    (`on_reopened`, given the cancelled transaction as those bytes ran it: confirmed under their hash, in the fill's
    block; not saved), as for a confirmed transaction of its own a reorg took. When nothing of it ran, those bytes may
    run now: the domain withdraws what it sent instead (`on_cancel_undecided`). Whichever then takes the nonce, the
    fill concluded again tells the domain (`on_cancelled`), which decides anew as the first time. An operator's
    acknowledgement of the old outcome is cleared: the next is another, which reconcile reports anew if those bytes
    run again (`selectors.nonce_fills_outrun`)."""
    ChainTransaction.objects.filter(pk=tx.pk).update(acknowledged_at=None, acknowledged_by="",
                                                     acknowledgement_reason="")
    cancelled_id = tx.context.get(CANCELS)
    if cancelled_id is None:
        return
    cancelled = ChainTransaction.objects.get(pk=cancelled_id)
    ran_as = _ran_as(tx, cancelled)
    if ran_as is None:
        if cancelled.purpose in _undecided_handlers:
            # Undecided from here (`_reopen` writes the rest after): a domain asked to send anew while it is (the
            # withdrawn one never signed, told at once) waits for its outcome (`selectors.cancelled_may_still_run`).
            ChainTransaction.objects.filter(pk=tx.pk).update(status=TxStatus.SUBMITTED)
            _undecided_handlers[cancelled.purpose](cancelled)
        return
    if cancelled.purpose not in _reopened_handlers:
        return
    logger.warning("reorg: a cancelled transaction's own bytes that ran in place of its nonce fill are off the chain",
                   extra={"tx_id": cancelled_id, "fill_id": str(tx.pk), "tx_hash": ran_as})
    cancelled.status, cancelled.mined_tx_hash, cancelled.receipt_status = TxStatus.CONFIRMED, ran_as, tx.receipt_status
    cancelled.mined_block_number, cancelled.mined_block_hash = tx.mined_block_number, tx.mined_block_hash
    _reopened_handlers[cancelled.purpose](cancelled)


def _outrun(fill: ChainTransaction, cancelled: ChainTransaction) -> bool:
    """Whether `fill` was mined as `cancelled`'s own old bytes."""
    return bool(fill.mined_tx_hash) and cancelled.attempts.filter(tx_hash=fill.mined_tx_hash).exists()


def _ran_as(fill: ChainTransaction, cancelled: ChainTransaction) -> str | None:
    """The hash under which `cancelled`'s own old bytes were mined in `fill`'s place and ran; None: nothing of it ran
    (the fill took the nonce, or those bytes reverted)."""
    return fill.mined_tx_hash if _outrun(fill, cancelled) and fill.status == TxStatus.CONFIRMED else None


def _tell_cancelled(tx: ChainTransaction, *, ran_as: str | None) -> None:
    if tx.purpose in _cancelled_handlers:
        _cancelled_handlers[tx.purpose](tx, ran_as=ran_as)


@_logs_name_the_agreement
def transaction_check(*, transaction_id) -> ChainTransaction | None:
    """Advance a submitted or mined transaction by what the chain says now. Safe to run twice or concurrently."""
    tx = (ChainTransaction.objects.select_related("relayer")
          .filter(pk=transaction_id, status__in=[TxStatus.SUBMITTED, TxStatus.MINED]).first())
    if tx is None:
        return None
    chain.node_chain_check()  # another chain's blocks, receipts and nonces say nothing of this one's
    if tx.status == TxStatus.MINED:
        canonical = chain.canonical_block_hash(tx.mined_block_number)
        if canonical is None:
            return tx  # a node behind, without the block yet: no reorg, looked at again at the next poll
        if canonical == tx.mined_block_hash:
            if _block_deep_enough(tx, block_number=tx.mined_block_number, block_hash=tx.mined_block_hash,
                                  latest=chain.latest_block_number()):
                return _conclude_mined(tx)
            return tx
        _forget_mined(tx)
        return tx
    mined = _first_receipt(tx)
    if mined is not None:
        return _record_receipt(tx, *mined)
    return _resend_when_due(tx)


def _resend_when_due(tx: ChainTransaction) -> ChainTransaction | None:
    """No attempt has a receipt: rebroadcast the last one, or replace it with higher fees, when it is time."""
    last = tx.attempts.order_by("-created_at", "-pk").first()
    now = timezone.now()
    last_fees = chain.Fees(int(last.max_fee_per_gas), int(last.max_priority_fee_per_gas))
    resend = None
    if now - last.created_at < settings.CHAIN_REPLACE_AFTER:
        pass
    elif _unfunded(last):
        # Higher fees ask the wallet for more still: a top-up covering these bytes left the replacement refused, and
        # the one mined paid the tip of the round it reached. These bytes wait for the top-up (the dashboard says so).
        pass
    elif chain.nonce_at(tx.relayer.address, "latest") < tx.nonce:
        # An earlier nonce of the wallet is not mined: this one waits for it whatever it pays (bid up meanwhile, it
        # was mined paying the fees of every round it waited). The one holding the next nonce is replaced.
        pass
    elif chainconfig.relayer_key(tx.relayer.address) is None:
        # Its wallet's key was replaced and not kept (RELAYER_RETIRED_PRIVATE_KEYS): its bytes alone can take the nonce.
        logger.error("chain transaction of a replaced relayer key not replaced with higher fees: its signed bytes are "
                     "sent again", extra={"tx_id": str(tx.pk), "relayer": tx.relayer.address, "nonce": tx.nonce})
    else:
        tip_refused = _tip_refused(last)
        fees = _replacement_fees(last_fees, tip_refused=tip_refused)
        if fees.max_fee_per_gas > last_fees.max_fee_per_gas or (
                tip_refused and fees.max_priority_fee_per_gas > last_fees.max_priority_fee_per_gas):
            resend = _replacement(tx, last, fees)
            if resend is None:
                return None
        elif tx.fee_cap_reached_at is None:
            # The max fee is at the cap, or at what the chain's base fee justifies (`_replacement_fees`): keep sending
            # these bytes until the wallet or the fees allow, and an operator sees why. Not a tip raised
            # alone: nodes refuse it as a replacement, it gets nothing past a base fee above the cap, and it is paid
            # once mined (bid up round after round, up to the cap per gas when the spike is over).
            logger.error("chain transaction stuck at the fee cap", extra={"tx_id": str(tx.pk),
                                                                          "max_fee_per_gas": fees.max_fee_per_gas})
            ChainTransaction.objects.filter(pk=tx.pk).update(fee_cap_reached_at=now)
    if resend is None:
        # Refused bytes wait as accepted ones do: sent at every poll, each stuck transaction cost a call per poll.
        sent_at = max((moment for moment in (last.broadcast_at, last.refused_at) if moment is not None), default=None)
        if (sent_at is not None and now - sent_at < settings.CHAIN_REBROADCAST_AFTER
                and not _topped_up_since_refused(tx, last)):
            return tx
        resend = last
    try:
        chain.broadcast(resend.raw_transaction)
    except chain.NonceTooLow:
        return _after_nonce_too_low(tx)
    except chain.RpcUnavailable:
        raise
    except chain.ChainError as error:
        _broadcast_refused(resend, error)
        return tx
    TxAttempt.objects.filter(pk=resend.pk).update(broadcast_at=now, broadcast_error="")
    return tx


def _replacement_fees(last: chain.Fees, *, tip_refused: bool = False) -> chain.Fees:
    """The last attempt's fees raised by CHAIN_FEE_BUMP_PERCENT (what a node asks of a replacement), and at least what
    the chain asks now (`chain.current_fees`): once the base fee rose past the last max fee, a replacement bumped from
    it alone stayed out of every block, round after round, a challenge past its window. With `tip_refused`
    (`_tip_refused`), the tip doubled and the max fee raised to carry it over the base fee: a provider's minimum far
    above what the node suggests was reached after the max fee's cap, 12.5% a round.
    Within what the chain's own latest block justifies: a tip of at most CHAIN_MAX_PRIORITY_FEE_PER_GAS, as a first
    attempt's, and a max fee of at most twice the block's base fee plus that tip (and CHAIN_MAX_FEE_PER_GAS). A node
    refusing every attempt as underpriced, whatever it paid, had the fees walked round after round up to
    CHAIN_MAX_FEE_PER_GAS, the tip paid whole once it took one; past these bounds the transaction is shown stuck at the
    fee cap (`_resend_when_due`), its bytes sent again as they are."""
    asked = chain.current_fees()
    tip_bound = settings.CHAIN_MAX_PRIORITY_FEE_PER_GAS
    # asked's max fee less its tip is twice the block's base fee (or the cap less the tip, when capped: the cap again).
    max_fee_bound = min(settings.CHAIN_MAX_FEE_PER_GAS,
                        asked.max_fee_per_gas - asked.max_priority_fee_per_gas + tip_bound)
    bumped = last.bumped(settings.CHAIN_FEE_BUMP_PERCENT, max_fee_bound)
    max_fee = max(bumped.max_fee_per_gas, asked.max_fee_per_gas)
    tip = max(bumped.max_priority_fee_per_gas, asked.max_priority_fee_per_gas)
    if tip_refused:
        tip = min(max(tip, 2 * last.max_priority_fee_per_gas), tip_bound)
        max_fee = max(max_fee, asked.max_fee_per_gas - asked.max_priority_fee_per_gas + tip)
    max_fee = min(max_fee, max_fee_bound)
    return chain.Fees(max_fee, min(max_fee, tip, tip_bound))


def _tip_refused(attempt: TxAttempt) -> bool:
    """Whether the node refused `attempt`'s last broadcast as underpriced, not as a replacement ("transaction
    underpriced": a tip below the provider's minimum). It is in no pool: a successor raising its tip alone is no
    replacement a node refuses, and no max fee at the cap makes it acceptable (it is not stuck at the fee cap)."""
    error = attempt.broadcast_error
    return error.startswith(chain.ReplacementUnderpriced.__name__) and "replacement" not in error.lower().split(
        ":", 1)[-1]


def _replacement(tx: ChainTransaction, last: TxAttempt, fees: chain.Fees) -> TxAttempt | None:
    """A new attempt with the same nonce and `fees`, unless another worker replaced `last` already."""
    with transaction.atomic():
        if not _locked_if_unchanged(tx) or tx.attempts.order_by("-created_at", "-pk").first().pk != last.pk:
            return None
        return _new_attempt(tx, fees)


def _after_nonce_too_low(tx: ChainTransaction) -> ChainTransaction | None:
    """The node says our nonce is used. Ours, unless proven otherwise: first the nonce is shown used at the
    required depth, then every hash we ever broadcast is looked up again (one mined before that block has a
    receipt now). Only with no receipt at all does the transaction go out again under a new nonce."""
    address = tx.relayer.address
    depth_block = max(0, chain.latest_block_number() - tx.confirmations_required + 1)
    used_at_depth = chain.nonce_at(address, depth_block) > tx.nonce
    mined = _first_receipt(tx)
    if mined is not None:
        return _record_receipt(tx, *mined)
    if not used_at_depth:
        return tx  # used by a transaction too recent to judge: look again at the next poll
    # No receipt is no proof: a node behind (one backend of a load-balanced provider) has none for a transaction
    # mined after its head. The transaction that took the nonce is read from its block: only one that is none of
    # ours lets this one go out again (a payout sent again under a new nonce pays twice).
    try:
        taken_by = chain.nonce_taken_by(address, tx.nonce, used_at=depth_block)
        by_another = taken_by is not None and not _attempts(tx).filter(tx_hash=taken_by.lower()).exists()
    except chain.RpcUnavailable:
        raise
    except chain.ChainError as error:
        # A node that keeps the state of its last blocks only (~128: not an archive node) cannot say the nonce at an
        # older block. The blocks themselves it keeps.
        logger.info("the block that took the nonce not found from past nonces: reading the blocks since ours",
                    extra={"tx_id": str(tx.pk), "nonce": tx.nonce, "error": str(error)[:300]})
        taken_by, by_another = None, _none_of_ours_mined_by(tx, block=depth_block)
    if not by_another:
        logger.warning("nonce used, but not shown used by a transaction that is not ours: looking again later",
                       extra={"tx_id": str(tx.pk), "nonce": tx.nonce, "taken_by": taken_by})
        return tx
    next_free = chain.pending_nonce(address)
    with transaction.atomic():
        if not _locked_if_unchanged(tx):
            return None
        relayer = RelayerAccount.objects.select_for_update().get(pk=tx.relayer_id)
        relayer.next_nonce = max(relayer.next_nonce, next_free)
        relayer.save(update_fields=["next_nonce"])
        logger.warning("nonce used by a transaction that is not ours: sending again under a new nonce",
                       extra={"tx_id": str(tx.pk), "nonce": tx.nonce})
        # The attempts stay: their hashes are still looked up at every check.
        tx.status, tx.nonce = TxStatus.QUEUED, None
        tx.save(update_fields=["status", "nonce", "updated_at"])
        _submit_after_commit(tx.pk)
    return tx


def _none_of_ours_mined_by(tx: ChainTransaction, *, block: int) -> bool:
    """Whether the chain shows that none of `tx`'s attempts was mined up to `block` (at which its nonce is used, so
    none can be mined after it either: the nonce is another transaction's), read without past state: no attempt's
    hash is among the transactions of any block from the first attempt's signing (less
    CHAIN_NONCE_SCAN_CLOCK_MARGIN, for clocks apart; a transaction is in no block before it was signed) to `block`.
    False when not shown: one of the blocks missing (a node behind), more than CHAIN_NONCE_SCAN_MAX_BLOCKS of them to
    read (the transaction waits, listed overdue, for an operator), or an attempt of ours among them (its receipt
    will be found)."""
    attempts = list(_attempts(tx))
    ours = {attempt.tx_hash.lower() for attempt in attempts}
    signed = min(attempt.created_at for attempt in attempts) - settings.CHAIN_NONCE_SCAN_CLOCK_MARGIN
    start = chain.block_number_at(int(signed.timestamp()))
    if block - start + 1 > settings.CHAIN_NONCE_SCAN_MAX_BLOCKS:
        logger.warning("nonce used; too many blocks since the transaction was signed to show none of ours took it",
                       extra={"tx_id": str(tx.pk), "nonce": tx.nonce, "blocks": block - start + 1})
        return False
    for number in range(start, block + 1):
        hashes = chain.block_transaction_hashes(number)
        if hashes is None or ours & hashes:
            return False
    return True


def transactions_poll() -> int:
    """Check in-flight transactions (the beat task): at most POLL_BATCH, those least recently polled, so that each is
    checked once every ceil(in flight / POLL_BATCH) polls; then, when some reverted at their depth, the in-flight
    transactions of their agreements and invocations that the batch left out (at most POLL_BATCH more), which their
    failures wait for (`_failures_decidable`). Returns how many were looked at. A node of another chain
    than CHAIN_ID (`chain.node_chain_check`) has nothing read from it: WrongChain is raised, the task failing loudly.

    An RPC failure on one transaction (timeout, 429, 5xx after the per-call retries) skips only that one. The poll
    stops early only when the node is unreachable, or when the first several checks all failed on the chain (a node
    that answers nothing is not asked about every row). A transaction whose check, reopening or watched outcome
    raises anything else (an outcome that cannot be applied, bad data) is logged with its id and skipped (it stays
    as it was and is tried again at the next poll), the others done, and RowsFailed raised at the end
    (sweeps.RowFailures): such rows counted towards giving up, and since they stay the oldest, a few of them ended
    every poll before any other transaction was checked; one that raised while reopened ended it at once."""
    failures = sweeps.RowFailures("chain transactions poll")
    try:
        # Another chain's blocks differ from ours at every height: every concluded transaction was taken off the chain.
        chain.node_chain_check()
    except chain.RpcUnavailable as error:
        logger.warning("chain RPC unavailable while polling; will retry", extra={"error": str(error)})
        return 0
    try:
        # What the indexer applied, it checks itself: it reopens those after moving their agreements back.
        transactions_reopen_reorged(after_block=_indexed_up_to(), failures=failures)
    except chain.RpcUnreachable:
        logger.warning("chain RPC unreachable while polling; will retry")
        return 0
    except chain.ChainError as error:
        logger.warning("confirmed transactions not checked for a reorg", extra={"error": str(error)})
    try:
        transactions_release_final()
    except chain.ChainError as error:
        logger.warning("payouts waiting for their payment's finality not released",
                       extra={"error": str(error), "tag": settings.PAYOUT_HEAD_TAG})
    try:
        transactions_release_copied()
    except chain.ChainError as error:
        logger.warning("transactions waiting for a copy's depth not released", extra={"error": str(error)})
    # The POLL_BATCH least recently polled (round by round; by updated_at alone, rows whose check writes nothing of
    # the row, such as bytes sent again or a wallet's earlier nonce waited for, stayed the oldest, and with more of
    # them than a poll reads, those behind were never checked), then checked least recently written first, as before.
    batch = ChainTransaction.objects.filter(status__in=[TxStatus.SUBMITTED, TxStatus.MINED]).order_by("polled_at", "pk")
    pending = [pk for pk, _ in sorted(batch.values_list("pk", "updated_at")[:POLL_BATCH],
                                      key=operator.itemgetter(1))]
    # One answer per height for the depth checks of the poll's transactions (`chain.headers_read_once`).
    with chain.headers_read_once():
        balances, looked_at = _wallet_balances.set({}), len(pending)
        try:
            tried, checked, read, deferred = _check_each(pending, failures)
            if tried == len(pending) and deferred:
                # The failures' agreements' and invocations' transactions the batch left out (more in flight than a
                # poll takes up), read now: else the failures waited for a poll whose batch held them all, which the
                # rotation by polled_at may never bring.
                left_out = _left_out_of_the_poll(deferred, polled=pending)
                _, more_checked, more_read, more_deferred = _check_each(left_out, failures)
                looked_at, checked = looked_at + len(left_out), checked + more_checked
                read, deferred = [*read, *more_read], [*deferred, *more_deferred]
        finally:
            _wallet_balances.reset(balances)
        # Then the failures: one's outcome may withdraw other transactions (a reverted payment withdraws its payout),
        # which the chain may show mined already. Checked first, it cancelled a payout made at its depth with a nonce
        # fill, reported then as outrun by the payout's bytes; checked after, the payout is confirmed and stands.
        for tx_id in _failures_decidable(deferred, read=read):
            try:
                with failures.row(tx_id, reraise=(chain.ChainError,), atomic=False):
                    transaction_check(transaction_id=tx_id)
            except chain.ChainError as error:
                logger.warning("chain transaction's failure not concluded", extra={"tx_id": str(tx_id),
                                                                                   "error": str(error)})
    try:
        # After the checks, as the failures, and under the same rule: a watched failure's outcome renewed may withdraw
        # what they found mined (a failed direct payment found paid by a copy withdraws its fee's refund, which stands
        # once confirmed).
        transactions_recheck_watched(failures=failures, read=read)
    except chain.RpcUnreachable:
        logger.warning("chain RPC unreachable while polling; will retry")
    except chain.ChainError as error:
        logger.warning("watched failures not read again", extra={"error": str(error)})
    failures.raise_if_any(applied=checked)
    return looked_at


def _check_each(pending: list, failures: sweeps.RowFailures) -> tuple[int, int, list, list]:
    """The poll's first pass: each of `pending` checked, a failure at its depth recorded mined only
    (`_failures_deferred`). Returns how many were tried and checked, those checked without an error (neither the
    chain's nor any other: `failures.row` logs and skips those), and the deferred failures."""
    checked = chain_failed = tried = 0
    read: list = []
    deferred: list = []
    deferring = _failures_deferred.set(deferred)
    try:
        for tx_id in pending:
            tried += 1
            try:
                with failures.row(tx_id, reraise=(chain.ChainError,), atomic=False):  # it reads the chain
                    transaction_check(transaction_id=tx_id)
                    checked += 1
                    read.append(tx_id)
            except chain.RpcUnreachable:
                tried -= 1  # not checked: first at the next poll
                logger.warning("chain RPC unreachable while polling; will retry")
                break
            except chain.ChainError as error:
                logger.warning("chain transaction not checked", extra={"tx_id": str(tx_id), "error": str(error)})
                chain_failed += 1
                if chain_failed == _POLL_GIVES_UP_AFTER and checked == 0:
                    break
    finally:
        _failures_deferred.reset(deferring)
        # update(), not save(): updated_at is the row's version (`_locked_if_unchanged`), a poll is no change of it.
        ChainTransaction.objects.filter(pk__in=pending[:tried]).update(polled_at=timezone.now())
    return tried, checked, read, deferred


def _in_flight_of(parties: dict[str, set[str]]) -> QuerySet[ChainTransaction]:
    """The transactions in flight (submitted or mined) that move the money of these agreements and skill invocations
    (`transactions_parties`), nonce fills cancelling one of theirs included. Read among those in flight only (the
    status index): the invocation is a key of `context`, which no index covers, and the table keeps every
    transaction ever sent."""
    in_flight = ChainTransaction.objects.filter(status__in=[TxStatus.SUBMITTED, TxStatus.MINED])
    theirs = (Q(agreement_id__in=sorted(parties["agreement_ids"]))
              | Q(context__invocation_id__in=sorted(parties["invocation_ids"])))
    fills = {tx.pk: tx.context[CANCELS] for tx in in_flight.filter(purpose=TxPurpose.NONCE_FILL).only("context")
             if CANCELS in tx.context}
    cancelled_theirs = {str(pk) for pk in ChainTransaction.objects.filter(theirs, pk__in=set(fills.values()))
                        .values_list("pk", flat=True)} if fills else set()
    return in_flight.filter(theirs | Q(pk__in=[pk for pk, cancels in fills.items() if cancels in cancelled_theirs]))


def _left_out_of_the_poll(failures: list, *, polled: list) -> list:
    """The in-flight transactions of `failures`' agreements and invocations that are not in `polled` (this poll's
    batch), at most POLL_BATCH of them, least recently written first as a batch is checked."""
    parties = transactions_parties(ChainTransaction.objects.filter(pk__in=failures))
    left_out = _in_flight_of(parties).exclude(pk__in=polled).order_by("updated_at", "pk")
    return list(left_out.values_list("pk", flat=True)[:POLL_BATCH])


def _failures_decidable(failures: list, *, read: list | None) -> list:
    """Of `failures` (ids of failed transactions whose outcome is to be applied), those that can withdraw nothing
    that this poll did not read: every in-flight transaction of their agreement or skill invocation is among `read`
    (checked without an error in this poll; None: not in a poll, nothing to wait for). What a failure's outcome
    withdraws is of its own agreement or skill invocation (`transactions_parties`: a reverted payment's payout, a
    direct purchase's fee refund), from whichever wallet (one sent after a relayer key's replacement is the new
    wallet's), and the chain may hold it at its depth: such a failure waits for a poll that reads both. Any other
    way of being unread counts alike: a check that failed on the chain (a timeout after the node answered), one
    that raised anything else (logged and skipped), one the poll did not reach or did not take up. Two queries
    (three with nonce fills among the failures), whatever the number of failures."""
    failing = list(ChainTransaction.objects.filter(pk__in=failures))
    if read is None or not failing:
        return [tx.pk for tx in failing]
    unread = transactions_parties(_in_flight_of(transactions_parties(failing)).exclude(pk__in=read))
    return [tx.pk for tx in failing
            if not any(unread[kind] & parties for kind, parties in transactions_parties([tx]).items())]


def _indexed_up_to() -> int | None:
    if not chainconfig.escrow_address():
        return None
    return (IndexerCursor.objects.filter(chain_id=settings.CHAIN_ID,
                                         escrow_address=Web3.to_checksum_address(chainconfig.escrow_address()))
            .values_list("last_block", flat=True).first())


SWEEP_QUEUED_BATCH = 500


def transactions_sweep_queued(*, now: datetime | None = None) -> int:
    """Re-enqueue rows stuck in queued (their task message was lost, or never sent while the broker was down), the
    longest queued first, SWEEP_QUEUED_BATCH a run; not those held for a payment's finality: the poll releases them
    (`transactions_release_final`). One this sweep sent is sent again only once no worker took its message within
    CHAIN_SUBMIT_REQUEUE_AFTER: while the default queue was behind (a node that hangs holds each submission for its
    RPC timeout), each run added every queued row to it again, and took the same first rows each time."""
    from escrow.tasks import submit_transaction

    now = now or timezone.now()
    stuck = list(ChainTransaction.objects.filter(status=TxStatus.QUEUED, updated_at__lt=now - settings.CHAIN_SWEEP_AFTER,
                                                 held_until_block__isnull=True)
                 .filter(Q(submit_queued_at=None) | Q(submit_queued_at__lte=now - settings.CHAIN_SUBMIT_REQUEUE_AFTER))
                 .order_by("updated_at").values_list("pk", flat=True)[:SWEEP_QUEUED_BATCH])
    sweeps.marked_rows_publish(model=ChainTransaction, pks=stuck, marked="submit_queued_at", now=now,
                               publish=submit_transaction.delay)
    return len(stuck)


def transaction_withdraw(*, transaction_id, reason: str) -> bool:
    """The domain no longer wants a transaction not concluded yet: failed, its outcome not applied (the caller is the
    domain that withdrew it), never to be sent again. True when withdrawn. One still queued was never signed, as a
    queued one whose simulation reverts. One signed already (submitted or mined) has its bytes maybe out (a broadcast
    the node took though the answer was lost) and its nonce taken (later ones wait behind it): the nonce passes to a
    nonce fill (`_cancel`), and whether the fill or those bytes took it is told to its domain (`on_cancelled`).
    Call inside the caller's DB transaction; the row lock is the one `transaction_submit` takes to sign, and a check
    that saw the row before writes nothing (`_locked_if_unchanged`)."""
    tx = ChainTransaction.objects.select_for_update().filter(
        pk=transaction_id, status__in=[TxStatus.QUEUED, TxStatus.SUBMITTED, TxStatus.MINED]).first()
    if tx is None:
        return False
    signed = tx.nonce is not None
    logger.warning("chain transaction withdrawn", extra={"tx_id": str(tx.pk), "reason": reason, "signed": signed})
    tx.status, tx.outcome_applied = TxStatus.FAILED, True
    tx.failure_reason = (f"withdrawn, its nonce cancelled: {reason}" if signed
                         else f"withdrawn before it was sent: {reason}")[:500]
    tx.context = {**tx.context, WITHDRAWN: reason[:500]}
    tx.save(update_fields=["status", "outcome_applied", "failure_reason", "context", "updated_at"])
    _cancel(tx)
    return True


def transactions_parties(transactions) -> dict[str, set[str]]:
    """The agreements and skill invocations (`agreement_ids`, `invocation_ids`) whose money these transactions move:
    a nonce fill's, those of the transaction it cancels (`CANCELS`), whose old bytes may have run in its place: what an
    operator who decides about them must own no party of (`agreement_services.operator_owns_no_party_require`)."""
    transactions = list(transactions)
    cancelled = [tx.context[CANCELS] for tx in transactions if CANCELS in (tx.context or {})]
    transactions += ChainTransaction.objects.filter(pk__in=cancelled)
    return {"agreement_ids": {str(tx.agreement_id) for tx in transactions if tx.agreement_id},
            "invocation_ids": {tx.context["invocation_id"] for tx in transactions if "invocation_id" in tx.context}}


def transaction_retry(*, tx: ChainTransaction, operator: AbstractBaseUser) -> ChainTransaction:
    """Operator action: a failed transaction is queued again as a new row (the failed one stays for history),
    whose context names the one it retries (`OPERATOR_RETRY_OF`) and the operator who asked (`OPERATOR_RETRY_BY`). Not one the domain withdrew (`WITHDRAWN`) or no
    longer wants run (`rerun_wanted`: an activation whose agreement was closed since), nor one its domain refuses to
    send again now (`on_retry`: an activation the buyer's owner policy refuses now), nor one never built
    (`UNSENT`: its domain builds it anew once it can), nor one whose agreement has another of its purpose under way
    or done, nor a fee payment while another is under way (409 `superseded`). `operator` (the admin's user):
    403 `operator_owns_a_party` when it owns a party of the money the transaction moves (it pays their seller
    again)."""
    with transaction.atomic():
        # Once: a plain token transfer (a payout, a refund) retried twice would pay twice.
        tx = ChainTransaction.objects.select_for_update().get(pk=tx.pk)
        agreement_services.operator_owns_no_party_require(operator=operator, **transactions_parties([tx]))
        if WITHDRAWN in tx.context:
            raise Conflict(f"This transaction was withdrawn: {tx.context[WITHDRAWN]}",
                           code="withdrawn", details={"transaction_id": str(tx.pk)})
        if UNSENT in tx.context:
            raise Conflict(f"This transaction was never built, so there is nothing to send again: {tx.context[UNSENT]}",
                           code="never_built", details={"transaction_id": str(tx.pk)})
        if tx.status != TxStatus.FAILED or ChainTransaction.objects.filter(
                **{f"context__{OPERATOR_RETRY_OF}": str(tx.pk)}).exists():
            raise Conflict("This transaction was retried already (retry its retry if that failed too).",
                           code="already_retried", details={"transaction_id": str(tx.pk)})
        live = _live_of_its_agreement(tx)
        if live is not None:
            raise _retry_superseded(tx, live)
        if tx.purpose in _rerun_checks and not _rerun_checks[tx.purpose](tx):
            raise Conflict("What this transaction was for is closed since (its agreement cancelled, rejected or "
                           "expired): it is not sent again.", code="no_longer_wanted",
                           details={"transaction_id": str(tx.pk)})
        if tx.purpose in _retry_handlers:
            _retry_handlers[tx.purpose](tx)
        try:
            with transaction.atomic():  # a savepoint: one queued meanwhile (a tick, another retry) is the Conflict below
                return transaction_enqueue(
                    purpose=tx.purpose, to=tx.to_address, data=tx.data, agreement_id=tx.agreement_id,
                    context={**tx.context, OPERATOR_RETRY_OF: str(tx.pk), OPERATOR_RETRY_BY: operator.get_username()},
                    confirmations=tx.confirmations_required)
        except IntegrityError:
            live = _live_of_its_agreement(tx)
            if live is None:
                raise
            raise _retry_superseded(tx, live) from None


def _live_of_its_agreement(tx: ChainTransaction) -> ChainTransaction | None:
    """Its agreement's transaction of its purpose under way or done (not failed), if any; for a fee payment (no
    agreement), another fee payment under way (chaintx_one_fee_payment_under_way: the pay-fees task queues one
    while fees are accrued), as `_superseded` reads them."""
    if tx.agreement_id is not None:
        return ChainTransaction.objects.filter(agreement_id=tx.agreement_id, purpose=tx.purpose).exclude(
            status=TxStatus.FAILED).first()
    if tx.purpose == TxPurpose.PAY_FEES:
        return ChainTransaction.objects.filter(purpose=TxPurpose.PAY_FEES, status__in=[
            TxStatus.QUEUED, TxStatus.SUBMITTED, TxStatus.MINED]).exclude(pk=tx.pk).first()
    return None


def _retry_superseded(tx: ChainTransaction, live: ChainTransaction) -> Conflict:
    """The retry of `tx` refused: its agreement has a transaction of the same purpose under way or done (`live`; the
    domain sent one anew since, as a fee refund once a reorg's payment failed again), at most one of which may be
    (chaintx_one_live_per_agreement_purpose: the retry's insert raised IntegrityError, a 500); or, for a fee
    payment, another under way (chaintx_one_fee_payment_under_way)."""
    return Conflict("Another transaction for the same purpose (of this agreement, or a fee payment) is under way or "
                    "done: this one is not sent again.", code="superseded",
                    details={"transaction_id": str(tx.pk), "live_transaction_id": str(live.pk)})
