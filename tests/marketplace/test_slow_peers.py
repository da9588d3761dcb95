"""marketplace.concurrency.SlowPeers: calls to a peer found slow hold at most a share of the threads; calls to
other peers are never refused."""

from contextlib import ExitStack

import pytest

from marketplace import concurrency
from marketplace.concurrency import Busy, SlowPeers


class Clock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock(monkeypatch):
    clock = Clock()
    monkeypatch.setattr(concurrency.time, "monotonic", clock)
    return clock


@pytest.fixture
def peers(settings):
    settings.PEER_SLOW_SECONDS, settings.PEER_REMEMBER_SECONDS = 2.0, 60.0
    settings.PEER_CALLS_PER_PEER, settings.PEER_CALLS = 2, 3
    return SlowPeers("seller", code="upstream_busy", slow_after="PEER_SLOW_SECONDS",
                     remember="PEER_REMEMBER_SECONDS", per_peer="PEER_CALLS_PER_PEER", in_all="PEER_CALLS")


def test_a_peer_never_slow_is_never_refused_however_many_calls_wait_on_it(peers, clock):
    with ExitStack() as calls:
        for _ in range(20):
            calls.enter_context(peers.admit("fast"))
            clock.now += 0.1


def test_a_peer_whose_call_has_waited_past_the_bound_gets_its_share_and_no_more(peers, clock):
    with ExitStack() as calls:
        calls.enter_context(peers.admit("slow"))
        clock.now += 2.5  # the first call is still waiting: the peer is slow from now on
        calls.enter_context(peers.admit("slow"))  # two waiting on it: its share
        with pytest.raises(Busy) as refused:
            calls.enter_context(peers.admit("slow"))
        assert refused.value.code == "upstream_busy"
        assert "nothing was charged" in str(refused.value.message)
        calls.enter_context(peers.admit("other"))  # another peer's calls go on


def test_a_peer_stays_slow_for_the_remembered_time_after_a_slow_call_whatever_it_answers_meanwhile(peers, clock):
    with peers.admit("slow"):
        clock.now += 3
    with peers.admit("slow"):  # a fast answer does not clear it
        pass
    with ExitStack() as calls:
        calls.enter_context(peers.admit("slow"))
        calls.enter_context(peers.admit("slow"))
        with pytest.raises(Busy):
            calls.enter_context(peers.admit("slow"))
    clock.now += 61
    with ExitStack() as calls:
        for _ in range(5):
            calls.enter_context(peers.admit("slow"))


def test_peers_found_slow_share_a_bound_in_all(peers, clock):
    for peer in ("a", "b"):
        with peers.admit(peer):
            clock.now += 3
    with ExitStack() as calls:
        calls.enter_context(peers.admit("a"))
        calls.enter_context(peers.admit("a"))
        calls.enter_context(peers.admit("b"))
        with pytest.raises(Busy) as refused:
            calls.enter_context(peers.admit("b"))
        assert "slow sellers have as many calls waiting here as they may (3)" in str(refused.value.message)
        calls.enter_context(peers.admit("c"))  # not slow: not counted, not refused
    with ExitStack() as calls:  # every slot came back
        calls.enter_context(peers.admit("a"))
        calls.enter_context(peers.admit("b"))
        calls.enter_context(peers.admit("b"))


def test_a_call_that_raises_gives_its_slot_back(peers, clock):
    with peers.admit("slow"):
        clock.now += 3
    for _ in range(5):
        with pytest.raises(TimeoutError), peers.admit("slow"):
            raise TimeoutError
    with ExitStack() as calls:
        calls.enter_context(peers.admit("slow"))
        calls.enter_context(peers.admit("slow"))


def test_zero_means_no_limit(peers, clock, settings):
    settings.PEER_CALLS_PER_PEER = settings.PEER_CALLS = 0
    with peers.admit("slow"):
        clock.now += 3
    with ExitStack() as calls:
        for _ in range(10):
            calls.enter_context(peers.admit("slow"))


def test_a_wait_ended_twice_counts_once(peers, clock):
    with peers.admit("slow"):
        clock.now += 3
    first = peers.admit("slow")
    first.end()
    first.end()
    with ExitStack() as calls:
        calls.enter_context(peers.admit("slow"))
        calls.enter_context(peers.admit("slow"))
        with pytest.raises(Busy):
            calls.enter_context(peers.admit("slow"))
