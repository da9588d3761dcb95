"""The production web server: granian (HTTP in Rust) serving `marketplace.wsgi`, each worker process running the
Django application in a pool of Python threads.

    python -m marketplace.serve [--bind 127.0.0.1:8000] [--workers N] [--threads T]

SIGHUP reloads the application (a deploy): see Server.

Why granian rather than gunicorn: gunicorn parses HTTP and hands requests between its threads in Python, which
cost about 0.4 ms of CPU per request on a bare WSGI app (granian: 0.1 ms) and 1.2–1.4 ms per metered-proxy call
(bench/proxy.py; bench/HISTORY.md). What gunicorn gave us is kept: a request body is read no further than its
bound (the larger of the upload bounds: marketplace.request_bodies reads it ahead of Django), a chunked body is
delimited (`wsgi.input_terminated`), a worker that dies (say, killed mid-call) is started again, and headers must
arrive within a bound of time and of size. A body's time is not bounded by granian: marketplace.request_bodies
bounds how many threads may wait on bodies.

The benches and the fault suite start the server through `command`, so what they measure is what production runs.
Prometheus: with PROMETHEUS_MULTIPROC_DIR set, every worker writes its counters there (marketplace.metrics); the
platform has no live gauges, so a dead worker's files need no marking, but empty the directory before starting.
"""

import argparse
import functools
import os
import sys
import threading
import time
from pathlib import Path

from granian.constants import Interfaces
from granian.http import HTTP1Settings
from granian.log import LogLevels, logger
from granian.server import MPServer

WORKERS = int(os.environ.get("WEB_CONCURRENCY", "2"))
# A metered call holds its thread while the seller's upstream works, and the kernel hands each worker the
# connections that hash to its socket: a worker given more connections than threads keeps the rest waiting a whole
# call. One worker serving 16 callers at a 20 ms upstream carried 0.46x direct throughput with 8 threads, 0.82-0.85x
# with 16 (bench/proxy.py --workers 1; bench/HISTORY.md). Each thread keeps a database connection of its own.
THREADS = int(os.environ.get("WEB_THREADS", "16"))
HEADER_READ_TIMEOUT_MS = 10_000  # a client that sends its headers slower than this is dropped (slowloris)
HEADER_BYTES_MAX = 65_536  # a request's headers in all; larger is 431 (granian's default buffer is 408 KiB)
# How long a reload waits for a new worker to listen; one that has not by then is stopped, and the old one goes on
# serving (as when the new one dies: new code that does not load).
WORKER_LOAD_TIMEOUT_SECONDS = 120


class Server(MPServer):
    """granian's server, with a reload (SIGHUP) that stops each old worker once its successor listens, and keeps the
    old worker when its successor dies first (new code that does not load: granian stopped the old worker all the
    same, then exited on its crash-loop check).

    On Linux each granian worker binds a socket of its own on the port (SO_REUSEPORT), once it has loaded the
    application, and the kernel spreads connections over the bound ones. granian's reload stops the old worker a
    fixed interval after starting its successor: a successor that loads slower than that (a loaded machine, a cold
    disk) leaves the port with no socket, and connections are refused. A socket bound once here and shared by every
    worker (granian's way on macOS) would keep them waiting instead, but every worker then wakes for every
    connection and one takes most of them: 0.45x direct throughput at 16 callers instead of 0.64-0.81x
    (bench/proxy.py; bench/HISTORY.md)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        # Held while a reload decides whether a successor is taken on, and while a worker's watcher decides whether
        # its exit is a crash to report: a successor that dies before it listens is the reload's to handle.
        self._successor_lock = threading.Lock()

    def _respawn_workers(self, workers, spawn_target, target_loader, delay: float = 0):
        # `delay`, granian's fixed interval, is not used: the successor's socket says when it is ready.
        for idx in workers:
            self.respawned_wrks[idx] = time.monotonic()
            logger.info(f"Respawning worker-{idx + 1}")
            old = self.wrks[idx]
            new = self._spawn_worker(idx=idx, target=spawn_target, callback_loader=target_loader)
            reload = old.is_alive()  # else a worker that died: its successor is started, nothing to wait for
            new.on_trial = reload
            new._watcher = functools.partial(self._watch_worker, new)  # started by start()
            new.start()
            if not reload:
                self.wrks[idx] = new
            elif self._take_on(new):
                self.wrks[idx] = new
                logger.info(f"Stopping old worker-{idx + 1}")
                old.terminate()
                old.join(self.workers_kill_timeout)
                if old.is_alive():
                    logger.warning(f"Killing old worker-{idx + 1} after it refused to stop gracefully")
                    old.kill()
                    old.join()
            else:  # new code that does not load (or hangs loading): the old worker goes on serving the old code
                new.kill()
                new.join()
                logger.error(f"worker-{idx + 1}'s successor did not start listening; the old worker goes on serving")
        self._metrics.incr_spawn(len(workers))

    def _take_on(self, worker) -> bool:
        """Whether the successor listens, within WORKER_LOAD_TIMEOUT_SECONDS; if it does, its exit is from then on
        a worker's crash, which granian's main loop answers by starting it again."""
        deadline = time.monotonic() + WORKER_LOAD_TIMEOUT_SECONDS
        while not listens_on(worker.inner.pid, self.bind_port):
            if not worker.is_alive() or time.monotonic() > deadline:
                return False
            time.sleep(0.05)
        with self._successor_lock:
            worker.on_trial = not worker.is_alive()
            return not worker.on_trial

    def _watch_worker(self, worker) -> None:
        """granian's watcher of a worker's exit, which reports it to the main loop unless the worker was stopped on
        purpose, nor reports a successor that died on trial."""
        worker.inner.join()
        with self._successor_lock:
            if worker.interrupt_by_parent or worker.on_trial:
                return
        logger.error(f"Unexpected exit from worker-{worker.idx + 1}")
        self.interrupt_children.append(worker.idx)
        self.main_loop_interrupt.set()


def listens_on(pid: int, port: int) -> bool:
    """Whether the process holds a TCP socket listening on the port (Linux: /proc)."""
    try:
        descriptors = os.listdir(f"/proc/{pid}/fd")
    except OSError:  # it has gone
        return False
    inodes = set()
    for fd in descriptors:
        try:
            inodes.add(os.readlink(f"/proc/{pid}/fd/{fd}").removeprefix("socket:[").removesuffix("]"))
        except OSError:  # closed as we read
            continue
    for table in ("tcp", "tcp6"):
        try:
            lines = Path(f"/proc/{pid}/net/{table}").read_text().splitlines()[1:]
        except OSError:  # gone, or no IPv6 on this host
            continue
        for line in lines:
            fields = line.split()
            local_port, state, inode = int(fields[1].rsplit(":", 1)[1], 16), fields[3], fields[9]
            if state == "0A" and local_port == port and inode in inodes:  # 0A: LISTEN
                return True
    return False


def workers_listening(pid: int, port: int) -> int:
    """How many worker processes of the server whose main process is `pid` listen on the port (Linux: /proc)."""
    children = set()
    try:
        for task in os.listdir(f"/proc/{pid}/task"):
            children.update(Path(f"/proc/{pid}/task/{task}/children").read_text().split())
    except OSError:  # it has gone
        return 0
    return sum(listens_on(int(child), port) for child in children)


def wait_until_every_worker_listens(pid: int, port: int, workers: int, timeout: float = 60.0) -> None:
    """Wait until `workers` workers of the server (`pid`: its main process) listen on the port. Each worker binds
    its socket once it has loaded the application, so the first answer comes while others are still loading, and a
    client that connects then stays on the workers that listened: a kept-alive connection is never moved. What
    measures the server (the benches) starts once every worker takes connections: bench/load.py's 32 connections
    all on one of three workers served half the requests a second of a run whose connections were spread."""
    deadline = time.monotonic() + timeout
    while workers_listening(pid, port) < workers:
        if time.monotonic() > deadline:
            raise TimeoutError(f"{workers} web server workers did not all listen on port {port} within {timeout:g} s")
        time.sleep(0.1)


def command(*, host: str = "127.0.0.1", port: int = 8000, workers: int = WORKERS, threads: int = THREADS,
            log_level: str = "warning", application: str = "marketplace.wsgi:application") -> list[str]:
    """The command line that starts the server; `application` only for bench/proxy.py's floor."""
    return [sys.executable, "-m", "marketplace.serve", "--bind", f"{host}:{port}", "--workers", str(workers),
            "--threads", str(threads), "--log-level", log_level, "--application", application]


def main() -> None:
    parser = argparse.ArgumentParser(description="Start the marketplace's production web server (granian, WSGI).")
    parser.add_argument("--bind", default=os.environ.get("WEB_BIND", "127.0.0.1:8000"), help="host:port")
    parser.add_argument("--workers", type=int, default=WORKERS, help="worker processes (WEB_CONCURRENCY, default 2)")
    parser.add_argument("--threads", type=int, default=THREADS, help="threads per worker (WEB_THREADS, default 16)")
    parser.add_argument("--log-level", default="warning", choices=[level.value for level in LogLevels])
    parser.add_argument("--application", default="marketplace.wsgi:application", help=argparse.SUPPRESS)
    args = parser.parse_args()
    host, _, port = args.bind.rpartition(":")
    Server(args.application, address=host or "127.0.0.1", port=int(port), interface=Interfaces.WSGI,
           workers=args.workers, blocking_threads=args.threads, respawn_failed_workers=True,
           log_access=False, log_level=LogLevels(args.log_level),
           http1_settings=HTTP1Settings(header_read_timeout=HEADER_READ_TIMEOUT_MS,
                                        max_buffer_size=HEADER_BYTES_MAX)).serve()


if __name__ == "__main__":
    main()
