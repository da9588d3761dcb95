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
    return SlowPeers("seller", code="upstream_busy", slowly="answering slowly", slow_after="PEER_SLOW_SECONDS",
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


def test_a_paused_call_neither_counts_toward_its_peers_share_nor_makes_it_slow(peers, clock):
    unread = peers.admit("seller")
    unread.pause()  # it waits on something else now (its buyer)
    clock.now += 10
    with ExitStack() as calls:
        for _ in range(5):  # not slow: never refused
            calls.enter_context(peers.admit("seller"))
    unread.resume()
    clock.now += 2.5  # waiting on it again, past the bound
    with ExitStack() as calls:
        calls.enter_context(peers.admit("seller"))  # two waiting on it: its share
        with pytest.raises(Busy):
            calls.enter_context(peers.admit("seller"))
        unread.pause()  # its thread is no longer the seller's
        calls.enter_context(peers.admit("seller"))
    unread.end()


def test_a_call_counts_its_waits_on_its_peer_together(peers, clock):
    with peers.admit("seller") as call:
        clock.now += 1.5
        call.pause()
        clock.now += 10
        call.resume()
        clock.now += 1  # 2.5 s on the seller in all
    with peers.admit("seller"), peers.admit("seller"), pytest.raises(Busy):
        peers.admit("seller")


def test_a_call_admitted_without_waiting_waits_from_its_resume(peers, clock):
    with peers.admit("buyer", waiting=False) as call:
        clock.now += 10
        with ExitStack() as calls:
            for _ in range(5):
                calls.enter_context(peers.admit("buyer"))
        call.resume()
        clock.now += 2.5
        with peers.admit("buyer"), pytest.raises(Busy):
            peers.admit("buyer")


def test_peers_alongside_share_their_bound_in_all_and_count_each_call_where_it_waits(peers, clock, settings):
    settings.PEER_CALLS_PER_PEER = 0  # the bound in all alone
    buyers = SlowPeers("buyer", code="buyer_busy", slowly="reading its answers slowly", slow_after="PEER_SLOW_SECONDS",
                       remember="PEER_REMEMBER_SECONDS", per_peer="PEER_CALLS_PER_PEER", in_all="PEER_CALLS",
                       alongside=peers)
    with peers.admit("seller"), buyers.admit("buyer"):
        clock.now += 3  # both slow from now on
    with ExitStack() as calls:
        seller_waits = [calls.enter_context(peers.admit("seller")) for _ in range(2)]
        calls.enter_context(buyers.admit("buyer"))  # three calls waiting on slow peers: the bound in all
        with pytest.raises(Busy) as refused:
            buyers.admit("buyer")
        assert refused.value.code == "buyer_busy"
        assert "slow sellers and buyers have as many calls waiting here as they may (3)" in str(refused.value.message)
        with pytest.raises(Busy):
            peers.admit("seller")
        seller_waits[0].pause()  # that call waits on its (fast) buyer now: not a slow peer's thread
        calls.enter_context(buyers.admit("buyer"))
        calls.enter_context(peers.admit("other"))  # not slow: not counted, not refused
