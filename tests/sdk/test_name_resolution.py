"""Resolving a host name within a time limit, on a bounded number of threads (sdk.name_resolution)."""

import os
import socket
import threading
import time

import pytest

from sdk.name_resolution import BoundedResolver, ResolverBusy
from tests.support.unanswered_names import UNANSWERED, unanswered_names


def resolver_threads() -> list[threading.Thread]:
    return [thread for thread in threading.enumerate() if thread.name.startswith("resolver-")]


def test_a_name_that_never_resolves_times_out_and_stuck_lookups_hold_at_most_the_resolvers_threads():
    resolver = BoundedResolver(threads=2, name="bounded-test")
    with unanswered_names() as lookups:
        for name in (UNANSWERED, UNANSWERED, f"a.{UNANSWERED}"):
            started = time.monotonic()
            with pytest.raises(TimeoutError, match=f"resolving {name} took longer than 0.2 s"):
                resolver.getaddrinfo(name, 80, timeout=0.2)
            assert 0.2 <= time.monotonic() - started < 1.0
        # The second wait on UNANSWERED waited on its first lookup, still running: two lookups, two threads.
        assert (lookups.began, lookups.blocked) == (2, 2)
        started = time.monotonic()
        with pytest.raises(ResolverBusy, match="2 host names are being resolved already"):
            resolver.getaddrinfo(f"b.{UNANSWERED}", 80, timeout=5)
        assert time.monotonic() - started < 0.1  # refused at once, not queued behind the stuck ones
        assert isinstance(ResolverBusy("x"), OSError)  # what callers take for a name that did not resolve
        assert lookups.began == 2
        assert len([t for t in resolver_threads() if "bounded-test" in t.name]) == 2
        # An address is not resolved: it needs no thread.
        assert resolver.getaddrinfo("127.0.0.1", 80, type=socket.SOCK_STREAM, timeout=5)[0][4] == ("127.0.0.1", 80)
        assert resolver.getaddrinfo("::1", 80, type=socket.SOCK_STREAM, timeout=5)[0][4][:2] == ("::1", 80)
    # The stuck lookups ended (the system resolver gave up): their threads serve again, and nothing was kept.
    with pytest.raises(socket.gaierror):
        resolver.getaddrinfo(UNANSWERED, 80, timeout=5)
    assert resolver.getaddrinfo("localhost", 80, type=socket.SOCK_STREAM, timeout=5)
    assert len([t for t in resolver_threads() if "bounded-test" in t.name]) == 2


def test_a_process_forked_with_lookups_under_way_resolves_on_threads_of_its_own():
    resolver = BoundedResolver(threads=1, name="fork-test")
    with unanswered_names():
        with pytest.raises(TimeoutError):
            resolver.getaddrinfo(UNANSWERED, 80, timeout=0.01)  # the parent's one thread is stuck
        child = os.fork()
        if child == 0:  # the child has no copy of that thread: its lookups must not wait on it
            try:
                ok = resolver.getaddrinfo("localhost", 80, type=socket.SOCK_STREAM, timeout=2)
                os._exit(0 if ok else 1)
            except BaseException:  # noqa: BLE001
                os._exit(2)
        _, status = os.waitpid(child, 0)
    assert os.waitstatus_to_exitcode(status) == 0


def test_a_name_that_resolves_gives_the_system_resolvers_answer_and_its_errors():
    resolver = BoundedResolver(threads=1, name="answers-test")
    assert resolver.getaddrinfo("localhost", 443, type=socket.SOCK_STREAM, timeout=5) == socket.getaddrinfo(
        "localhost", 443, type=socket.SOCK_STREAM)
    with pytest.raises(socket.gaierror):
        resolver.getaddrinfo("nothing.invalid", 80, timeout=5)


def test_without_a_timeout_the_name_is_resolved_in_the_callers_thread():
    resolver = BoundedResolver(threads=1, name="untimed-test")
    assert resolver.getaddrinfo("localhost", 80, timeout=None)
    assert not [t for t in resolver_threads() if "untimed-test" in t.name]
