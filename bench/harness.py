"""What every bench's `main()` shares: its own database's URL, and a run bounded by a global timeout with its
processes always stopped."""

import contextlib
import gc
import os
import signal
import sys
from collections.abc import Callable
from urllib.parse import urlsplit


class SetupFailed(RuntimeError):
    """The bench could not get to the measured part."""


class HardTimeout(BaseException):
    """The global timeout fired (SIGALRM): give up wherever we are, cleanup still runs."""


def bench_database_url(default: str) -> tuple[str, str | None]:
    """BENCH_DATABASE_URL or the default, and an error when it is not a PostgreSQL database named *bench*."""
    url = os.environ.get("BENCH_DATABASE_URL", default)
    parts = urlsplit(url)
    if parts.scheme not in ("postgres", "postgresql") or "bench" not in parts.path:
        return url, "BENCH_DATABASE_URL must be a PostgreSQL database whose name contains 'bench' (it is flushed)"
    return url, None


def integer_list(text: str) -> list[int]:
    """An argument's comma-separated whole numbers ("1,16")."""
    return [int(part) for part in text.split(",")]


def run_bounded(run: Callable[[contextlib.ExitStack], int], timeout: int) -> int:
    """`run(stack)` under a global timeout; whatever it registered on the stack (processes to stop) runs at the end,
    on success, error, timeout or Ctrl-C. Exit status: run's own, 2 when the set-up failed or time ran out, 130."""

    def give_up(signum, frame):
        raise HardTimeout(f"the global timeout of {timeout} s passed")

    signal.signal(signal.SIGALRM, give_up)
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    signal.alarm(timeout)
    with contextlib.ExitStack() as stack:
        stack.callback(signal.alarm, 0)  # no timeout in the middle of the cleanup
        try:
            return run(stack)
        except (SetupFailed, HardTimeout) as exc:
            print(f"\nbench failed: {exc}", file=sys.stderr)
            return 2
        except KeyboardInterrupt:
            print("\ninterrupted", file=sys.stderr)
            return 130


def freeze_client_heap() -> None:
    """Call once the bench's own set-up is done, before it measures. This process's heap (Django, the seed's objects)
    is never garbage, and a full collection of it stopped every client thread or coroutine at once for 50-115 ms in
    the middle of a measured run (bench/catalog_search.py: the p99 of two query types was this pause of the client,
    not the server's latency). Frozen, a collection walks only what the requests allocate."""
    gc.collect()
    gc.freeze()


def cpu_seconds(pids: list[int]) -> float | None:
    """User + system CPU time consumed so far by the processes `pids` (Linux /proc), or None where it cannot be
    read (another OS, a database on another host). CPU time does not grow while a process waits for a core, so it
    compares runs on a shared, loaded machine where latencies do not."""
    ticks = os.sysconf("SC_CLK_TCK")
    total = 0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/stat") as stat:
                fields = stat.read().rsplit(")", 1)[1].split()
        except OSError:
            return None
        total += int(fields[11]) + int(fields[12])  # utime, stime (fields 14 and 15 of stat(5))
    return total / ticks


class StolenCpu:
    """The share of this machine's CPU time its hypervisor gave to other guests (steal time, /proc/stat) since it was
    made: a busy neighbour on a shared VM, which slows every phase of a run and which neither the load average nor a
    short timed burst of work (bench/idle_cpu.py) shows."""

    def __init__(self):
        self.start = self._times()

    @staticmethod
    def _times() -> tuple[int, int] | None:
        """(steal, all) CPU ticks of every CPU so far, or None where /proc/stat cannot be read."""
        try:
            with open("/proc/stat") as stat:
                fields = [int(value) for value in stat.readline().split()[1:9]]
        except (OSError, ValueError):
            return None
        return fields[7], sum(fields)  # user nice system idle iowait irq softirq steal (guest time is in user)

    def since(self) -> str:
        now = self._times()
        if self.start is None or now is None or now[1] == self.start[1]:
            return "CPU stolen by the hypervisor: n/a"
        return f"CPU stolen by the hypervisor: {100 * (now[0] - self.start[0]) / (now[1] - self.start[1]):.1f}%"


def scheduler_groups() -> str:
    """Whether the kernel shares CPU between sessions before processes (kernel.sched_autogroup_enabled), printed by
    the benches with goals. With it on, PostgreSQL's backends (one session: the postmaster's) share one group's CPU,
    as much as the bench's client and web server get together however many backends are busy: a search run's
    PostgreSQL work, two thirds of its CPU, waited for the group's turn, 100-340 ms at a time, and that was the p99
    (bench/HISTORY.md, sixteenth session). PostgreSQL's Linux tuning advice turns it off on a database host."""
    try:
        with open("/proc/sys/kernel/sched_autogroup_enabled") as setting:
            enabled = setting.read().strip()
    except OSError:
        return "kernel.sched_autogroup_enabled: n/a"
    advice = " (PostgreSQL's backends share one CPU group: see README, Performance)" if enabled == "1" else ""
    return f"kernel.sched_autogroup_enabled = {enabled}{advice}"


def child_pids(pid: int) -> list[int]:
    """The direct children of `pid` (e.g. the web server's workers), from /proc; [] where it cannot be read."""
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as children:
            return [int(child) for child in children.read().split()]
    except OSError:
        return []


class CpuMeter:
    """CPU seconds spent by the server's workers and by the database's backends serving them, between two reads."""

    def __init__(self, workers: list[int], database_url: str):
        import psycopg

        self.workers = workers
        self.database = psycopg.connect(database_url, autocommit=True)

    def _backends(self) -> dict[int, float]:
        pids = [pid for (pid,) in self.database.execute(
            "SELECT pid FROM pg_stat_activity WHERE datname = current_database() AND pid <> pg_backend_pid()")]
        return {pid: cpu for pid in pids if (cpu := cpu_seconds([pid])) is not None}

    def read(self) -> tuple[float | None, dict[int, float]]:
        return cpu_seconds(self.workers), self._backends()

    def since(self, start: tuple[float | None, dict[int, float]]) -> tuple[float | None, float | None]:
        """(server, database) CPU seconds since `start`; a backend opened meanwhile counts from zero."""
        server_start, backends_start = start
        server_now, backends_now = self.read()
        server = None if server_start is None or server_now is None else server_now - server_start
        database = sum(cpu - backends_start.get(pid, 0.0) for pid, cpu in backends_now.items()) \
            if backends_now else None
        return server, database

    def close(self) -> None:
        self.database.close()
