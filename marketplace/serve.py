"""The production web server: granian (HTTP in Rust) serving `marketplace.wsgi`, each worker process running the
Django application in a pool of Python threads.

    python -m marketplace.serve [--bind 127.0.0.1:8000] [--workers N] [--threads T]

Why granian rather than gunicorn: gunicorn parses HTTP and hands requests between its threads in Python, which
cost about 0.4 ms of CPU per request on a bare WSGI app (granian: 0.1 ms) and 1.2–1.4 ms per metered-proxy call
(bench/proxy.py; bench/HISTORY.md). What gunicorn gave us is kept: request bodies are streamed to the
application, never buffered whole (the proxy reads at most PROXY_MAX_REQUEST_BYTES), a chunked body is delimited
(`wsgi.input_terminated`), a worker that dies (say, killed mid-call) is started again, and headers must arrive
within a bound of time and of size.

The benches and the fault suite start the server through `command`, so what they measure is what production runs.
Prometheus: with PROMETHEUS_MULTIPROC_DIR set, every worker writes its counters there (marketplace.metrics); the
platform has no live gauges, so a dead worker's files need no marking, but empty the directory before starting.
"""

import argparse
import os
import shutil
import sys

WORKERS = int(os.environ.get("WEB_CONCURRENCY", "2"))
THREADS = int(os.environ.get("WEB_THREADS", "8"))
HEADER_READ_TIMEOUT_MS = 10_000  # a client that sends its headers slower than this is dropped (slowloris)
HEADER_BYTES_MAX = 65_536  # a request's headers in all; larger is 431 (granian's default buffer is 408 KiB)
# A reload (SIGHUP) starts each worker's successor and stops the old worker this long after: longer than a worker
# takes to load the application (1.2-1.6 s on a 2-core machine), or connections are refused meanwhile (each worker
# listens on a socket of its own). A worker that died is started again at once all the same.
RESPAWN_INTERVAL_SECONDS = 5


def command(*, host: str = "127.0.0.1", port: int = 8000, workers: int = WORKERS, threads: int = THREADS,
            log_level: str = "warning", application: str = "marketplace.wsgi:application") -> list[str]:
    """The command line that starts the server (its executable from this interpreter's environment); `application`
    only for bench/proxy.py's floor."""
    granian = shutil.which("granian", path=os.path.dirname(sys.executable)) or "granian"
    return [granian, "--interface", "wsgi", "--host", host, "--port", str(port), "--workers", str(workers),
            "--blocking-threads", str(threads), "--respawn-failed-workers",
            "--respawn-interval", str(RESPAWN_INTERVAL_SECONDS),
            "--http1-header-read-timeout", str(HEADER_READ_TIMEOUT_MS),
            "--http1-buffer-size", str(HEADER_BYTES_MAX), "--no-access-log", "--log-level", log_level,
            application]


def main() -> None:
    parser = argparse.ArgumentParser(description="Start the marketplace's production web server (granian, WSGI).")
    parser.add_argument("--bind", default=os.environ.get("WEB_BIND", "127.0.0.1:8000"), help="host:port")
    parser.add_argument("--workers", type=int, default=WORKERS, help="worker processes (WEB_CONCURRENCY, default 2)")
    parser.add_argument("--threads", type=int, default=THREADS, help="threads per worker (WEB_THREADS, default 8)")
    parser.add_argument("--log-level", default="warning")
    args = parser.parse_args()
    host, _, port = args.bind.rpartition(":")
    argv = command(host=host or "127.0.0.1", port=int(port), workers=args.workers, threads=args.threads,
                   log_level=args.log_level)
    os.execv(argv[0], argv)


if __name__ == "__main__":
    main()
