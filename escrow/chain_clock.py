"""The chain's clock, the one the contract enforces (`block.timestamp`): settlement, expiry, Masumi timers and
signature deadlines are decided by it, never by ours."""

import logging
import time

from django.conf import settings
from prometheus_client import Counter, Gauge

from escrow import chain
from marketplace import caching
from marketplace.errors import DependencyUnavailable

logger = logging.getLogger(__name__)

CHAIN_HEAD_AGE = Gauge("marketplace_chain_head_age_seconds", "Seconds since the latest block, as settlement last "
                       "saw it (settlement and expiry follow the chain's clock).", multiprocess_mode="mostrecent")
CHAIN_CLOCK_REFUSED = Counter("marketplace_chain_clock_refused_total", "Block timestamps the node answered further "
                              "ahead of our clock than CHAIN_CLOCK_MAX_LEAD_SECONDS, believed only that far.", ["block"])


def _believed(timestamp: int, *, block: str) -> int:
    """A block's timestamp as the node answers it, believed no further than our clock plus
    CHAIN_CLOCK_MAX_LEAD_SECONDS (None: unbounded, the dev chain's default, whose tests move its time forward on
    purpose). A node answering a block far ahead (a misbehaving provider, a clock gone wrong) made everything decided
    by the chain's clock fall due early: a purchase expired unfunded, a finalize sent that the contract refused (the
    relayer's gas burnt, the agreement stuck settling). Logged and counted when refused."""
    lead = settings.CHAIN_CLOCK_MAX_LEAD_SECONDS
    ours = int(time.time())
    if lead is None or timestamp <= ours + lead:
        return timestamp
    CHAIN_CLOCK_REFUSED.labels(block=block).inc()
    logger.warning("the node's block time is ahead of our clock by more than CHAIN_CLOCK_MAX_LEAD_SECONDS: "
                   "believed only that far", extra={"block": block, "lead_seconds": timestamp - ours,
                                                    "max_lead_seconds": lead})
    return ours + lead


def _latest() -> int:
    return _believed(chain.latest_block_timestamp(), block="latest")


def _next_block() -> int:
    return _believed(chain.next_block_timestamp(), block="pending")


def chain_now(*, next_block: bool = False) -> int:
    """The latest block's timestamp: a finalize or reclaim sent before the chain's time allows it reverts. With
    `next_block`, the `block.timestamp` a transaction sent now would get (what a signature's deadline meets).
    Raises chain.ChainError when the node does not answer.

    A stalled chain (no block for CHAIN_STALL_SECONDS) keeps its own time: what falls due waits until blocks
    come again and is never done early. `make run`'s chain mines every 2 s, so it does not stall; on Base a stall
    is a sequencer outage, when nothing could be mined anyway. The age of the latest block is exported
    (`marketplace_chain_head_age_seconds`) and a stall is logged. A block time further ahead of our clock than
    CHAIN_CLOCK_MAX_LEAD_SECONDS is believed only that far (`_believed`)."""
    if next_block:
        return _next_block()
    now = _latest()
    age = time.time() - now
    CHAIN_HEAD_AGE.set(age)
    if age > settings.CHAIN_STALL_SECONDS:
        logger.warning("the chain's clock is stalled: settlement and expiry wait for new blocks",
                       extra={"latest_block_age_seconds": int(age)})
    return now


@chain.unavailable_as_503()
def chain_now_for_request(*, next_block: bool = False) -> int:
    """`chain_now` on a caller's request: 503 `chain_unavailable` when the node does not answer."""
    return chain_now(next_block=next_block)


@chain.unavailable_as_503()
def signature_window_clock() -> int:
    """The next block's time a payment authorization's window is judged by (an x402 payment's validAfter and
    validBefore, a fee permit's deadline), as `next_block_clock_for_refusal` reads it, from a node no further behind
    our clock than CHAIN_CLOCK_MAX_LAG_SECONDS (None: unbounded): else 503 `chain_unavailable` (`details.reason`
    `node_behind`), logged. A node behind the chain answers an old clock, by which an authorization the chain has
    expired still runs, and its simulations run at that time too: the relayer sent it, to revert at its gas (a skill's
    payment refused by our clock; a direct purchase judged by the chain's alone). Not a bound on the chain's time where
    a refusal falls due (a challenge's window, a dispute's timeout): a chain catching up after an outage is behind
    honestly, and a buyer's challenge refused early by our clock would be lost."""
    latest = _latest()
    lag = settings.CHAIN_CLOCK_MAX_LAG_SECONDS
    ours = int(time.time())
    if lag is not None and latest < ours - lag:
        logger.warning("the node's latest block is further behind our clock than CHAIN_CLOCK_MAX_LAG_SECONDS: no "
                       "payment authorization is judged by it", extra={"lag_seconds": ours - latest,
                                                                      "max_lag_seconds": lag})
        raise DependencyUnavailable("The chain RPC is behind the chain: retry shortly.", code="chain_unavailable",
                                    details={"reason": "node_behind", "max_lag_seconds": lag})
    return min(_next_block(), max(latest + 1, ours))


@chain.unavailable_as_503()
def next_block_clock_for_refusal() -> int:
    """The next block's `block.timestamp` for a caller's request refused when it is reached (a challenge's window
    closed, an activation's or a challenge's signature expired, a dispute timed out for the arbiter's resolution):
    the node's pending block's, believed no further than the later of the latest
    block's (+1) and our clock. A node answering a pending timestamp in the future (a misbehaving provider) closed a
    buyer's challenge window early, and the seller's proposal was finalized unchallenged; the latest block is mined
    (its time the contract saw), and a next block honestly later than both is a clock skew of seconds on a live chain.
    What the bound lets through that the contract would refuse is refused at the request's simulation, or reverts.
    503 when the node does not answer."""
    return _next_block_bounded()


def _next_block_bounded() -> int:
    return min(_next_block(), max(_latest() + 1, int(time.time())))


def deadline_clock() -> int:
    """Where the deadlines handed out to clients count from (activation signatures, a Masumi purchase's timers):
    the later of our clock and the chain's next block. An idle chain (Anvil mining only on transactions) may have
    a latest block minutes old; a deadline counted from it could be expired when handed out. 503 when the node does
    not answer.

    The next block's time bounded as for a refusal (`next_block_clock_for_refusal`): a node answering a pending time a
    year ahead handed out activation signatures valid for a year (refused by the SDK) and a Masumi purchase's timers a
    year out (refused as more than 30 days ahead, or, its latest block lying too, the buyer's money locked a year)."""
    return max(next_block_clock_for_refusal(), int(time.time()))


@chain.unavailable_as_503()
def quote_clock() -> int:
    """`deadline_clock` in one read of the node, for what is handed out on every unpaid request (a skill's 402 quote):
    the later of our clock and the latest block's next second, which is what `deadline_clock` comes to on an honest
    node, without its pending block's two reads. The latest block is read at most once per CREDENTIAL_CACHE_SECONDS
    per process (`_latest_for_quotes`). 503 when the node does not answer."""
    return max(_latest_for_quotes() + 1, int(time.time()))


@caching.for_a_second(key=lambda: "latest")
def _latest_for_quotes() -> int:
    # An unpaid request is anyone's to send: read for each, every 402 made the server call the node. A second old,
    # the quote's window (minutes) starts at most that much earlier than it could.
    return _latest()
