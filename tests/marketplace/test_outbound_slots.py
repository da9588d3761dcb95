"""Slots of outbound shares, held across processes by leases in the cache."""

import time

import pytest

from marketplace import outbound_slots


@pytest.fixture(params=["locmem", "redis"])
def cache_of(request, settings):
    """The cache the slots live in: a process's own memory, or Redis (as production shares it between processes): a
    server of this module's own, so that tests run in parallel never see each other's slots."""
    if request.param == "redis":
        settings.CACHES = {"default": {"BACKEND": "django.core.cache.backends.redis.RedisCache",
                                       "LOCATION": request.getfixturevalue("redis_server").url}}
    return request.param


def test_a_share_gives_its_limit_of_slots_at_once_and_each_back_as_its_holder_ends(cache_of):
    shares = [("host:a.example", 2), ("owner:1", 3)]
    with outbound_slots.held(shares, lease_seconds=30) as first, outbound_slots.held(shares, lease_seconds=30) as second:
        assert first and second
        with outbound_slots.held(shares, lease_seconds=30) as third:
            assert not third  # host:a.example has both its slots held
        with outbound_slots.held([("host:b.example", 2), ("owner:1", 3)], lease_seconds=30) as elsewhere:
            assert elsewhere  # another host, the owner's third slot
        with outbound_slots.held([("host:a.example", 0), ("owner:2", 1)], lease_seconds=30) as unlimited:
            assert unlimited  # a limit of 0: no limit
    with outbound_slots.held(shares, lease_seconds=30) as again:
        assert again


def test_a_refused_attempt_gives_back_the_slots_of_its_other_shares(cache_of):
    with outbound_slots.held([("owner:1", 1)], lease_seconds=30) as held:
        assert held
        with outbound_slots.held([("host:a.example", 1), ("owner:1", 1)], lease_seconds=30) as refused:
            assert not refused
    with outbound_slots.held([("host:a.example", 1)], lease_seconds=30) as free:
        assert free  # the refused attempt's host slot was given back


def test_a_slot_whose_holder_died_is_free_once_its_lease_runs_out_and_a_late_holder_leaves_the_next_ones_alone(
        cache_of, monkeypatch):
    """A worker killed mid-attempt never gives its slot back: the lease (the attempt's deadline and a margin) frees
    it. Should a holder outlive its lease, giving back leaves the slot its successor holds."""
    shares = [("host:a.example", 1)]
    dead = outbound_slots.held(shares, lease_seconds=1)
    assert dead.__enter__()  # and never left: its process was killed
    with outbound_slots.held(shares, lease_seconds=1) as meanwhile:
        assert not meanwhile
    if cache_of == "redis":
        time.sleep(1.1)  # Redis's own clock expires the key
    else:
        now = time.time()
        monkeypatch.setattr(time, "time", lambda: now + 1.1)
    successor = outbound_slots.held(shares, lease_seconds=30)
    assert successor.__enter__()
    dead.__exit__(None, None, None)  # the late holder ends: the successor's slot is kept
    with outbound_slots.held(shares, lease_seconds=30) as third:
        assert not third
    successor.__exit__(None, None, None)


def test_with_the_cache_down_an_attempt_is_made_unshared(settings):
    settings.CACHES = {"default": {"BACKEND": "django.core.cache.backends.redis.RedisCache",
                                   "LOCATION": "redis://127.0.0.1:1/0"}}  # nothing listens there
    with outbound_slots.held([("host:a.example", 1)], lease_seconds=30) as held:
        assert held
