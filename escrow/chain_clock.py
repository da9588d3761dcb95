"""The chain's clock, the one the contract enforces (`block.timestamp`): settlement, expiry, Masumi timers and
signature deadlines are decided by it, never by ours."""

import logging
import time

from django.conf import settings
from prometheus_client import Gauge

from escrow import chain

logger = logging.getLogger(__name__)

CHAIN_HEAD_AGE = Gauge("marketplace_chain_head_age_seconds", "Seconds since the latest block, as settlement last "
                       "saw it (settlement and expiry follow the chain's clock).", multiprocess_mode="mostrecent")


def chain_now(*, next_block: bool = False) -> int:
    """The latest block's timestamp: a finalize or reclaim sent before the chain's time allows it reverts. With
    `next_block`, the `block.timestamp` a transaction sent now would get (what a signature's deadline meets).
    Raises chain.ChainError when the node does not answer.

    A stalled chain (no block for CHAIN_STALL_SECONDS) keeps its own time: what falls due waits until blocks
    come again and is never done early. `make run`'s chain mines every 2 s, so it does not stall; on Base a stall
    is a sequencer outage, when nothing could be mined anyway. The age of the latest block is exported
    (`marketplace_chain_head_age_seconds`) and a stall is logged."""
    if next_block:
        return chain.next_block_timestamp()
    now = chain.latest_block_timestamp()
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
def next_block_clock_for_refusal() -> int:
    """The next block's `block.timestamp` for a caller's request refused when it is reached (a challenge's window
    closed, an activation's or a challenge's signature expired, a dispute timed out for the arbiter's resolution):
    the node's pending block's, believed no further than the later of the latest
    block's (+1) and our clock. A node answering a pending timestamp in the future (a misbehaving provider) closed a
    buyer's challenge window early, and the seller's proposal was finalized unchallenged; the latest block is mined
    (its time the contract saw), and a next block honestly later than both is a clock skew of seconds on a live chain.
    What the bound lets through that the contract would refuse is refused at the request's simulation, or reverts.
    503 when the node does not answer."""
    return min(chain.next_block_timestamp(), max(chain.latest_block_timestamp() + 1, int(time.time())))


def deadline_clock() -> int:
    """Where the deadlines handed out to clients count from (activation signatures, a Masumi purchase's timers):
    the later of our clock and the chain's next block. An idle chain (Anvil mining only on transactions) may have
    a latest block minutes old; a deadline counted from it could be expired when handed out. 503 when the node does
    not answer."""
    return max(chain_now_for_request(next_block=True), int(time.time()))
