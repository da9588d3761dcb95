"""Real processes for the fault suite, each with a way to break it: Redis, a JSON-RPC relay in front of Anvil,
the web server (granian as production runs it, production settings) and a Celery worker with its beat, all on free loopback ports."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from django.conf import settings

from marketplace import serve

BIN = Path(sys.executable).parent
ROOT = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def wait_until(predicate, *, timeout: float, interval: float = 0.1, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


class RedisServer:
    """A private redis-server (no persistence) that can be stopped and started again on the same port."""

    def __init__(self):
        self.port = free_port()
        self.process: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> RedisServer:
        self.process = subprocess.Popen(
            ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_until(self._answers, timeout=10, what="redis-server")
        return self

    def _answers(self) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=0.5) as conn:
                conn.sendall(b"PING\r\n")
                return conn.recv(16).startswith(b"+PONG")
        except OSError:
            return False

    def stop(self) -> None:
        if self.process and self.process.poll() is None:
            self.process.terminate()
            self.process.wait(timeout=10)


class Service:
    """A subprocess with its output in a log file; `kill()` is SIGKILL to its whole process group."""

    def __init__(self, name: str, command: list[str], env: dict, log_dir: Path):
        self.name, self.command, self.env = name, command, env
        self.log_path = log_dir / f"{name}.log"
        self.process: subprocess.Popen | None = None

    def start(self) -> Service:
        log = self.log_path.open("ab")
        self.process = subprocess.Popen(self.command, cwd=ROOT, env=self.env, stdout=log, stderr=subprocess.STDOUT,
                                        start_new_session=True)
        log.close()
        return self

    def children(self) -> set[int]:
        """The ids of the processes it started (the web server's workers, a Celery pool's children)."""
        found = set()
        for stat in Path("/proc").glob("[0-9]*/stat"):
            try:
                parent = int(stat.read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            if self.process and parent == self.process.pid:
                found.add(int(stat.parent.name))
        return found

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def kill(self) -> None:
        if self.process and self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(timeout=10)

    def terminate(self) -> None:
        """SIGTERM to its process group; `wait_stopped()` waits for it to end."""
        if self.process and self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)

    def wait_stopped(self) -> None:
        if self.process:
            try:
                self.process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.kill()

    def stop(self) -> None:
        self.terminate()
        self.wait_stopped()


def web_server(env: dict, log_dir: Path, port: int) -> Service:
    return Service("web", serve.command(port=port, workers=1, threads=16), env, log_dir)


def celery_worker(env: dict, log_dir: Path, *, pool: str = "solo", include: str = "") -> Service:
    """One worker with the beat schedule embedded, serving the default and the outbound queue: by default one process
    (solo pool); `pool="prefork"` runs tasks in a child process, as production does, so a task can crash its process
    alone."""
    options = ["--concurrency", "1"] if pool == "prefork" else []
    options += ["--include", include] if include else []
    options += ["--queues", f"{settings.CELERY_TASK_DEFAULT_QUEUE},{settings.OUTBOUND_QUEUE}"]
    return Service("worker", [str(BIN / "celery"), "-A", "marketplace", "worker", "--beat", "--pool", pool, *options,
                              "--without-gossip", "--without-mingle", "--without-heartbeat", "--loglevel", "info",
                              "--schedule", str(log_dir / "beat-schedule")], env, log_dir)


DEEP_JSON = b"[" * 100_000 + b"]" * 100_000  # 200 kB nested 100,000 deep
LARGE_JSON = b'"' + b"x" * 16_000_000 + b'"'  # more than the sockets between the caller and the upstream buffer


# Answers whose body ends before its framing says (before the last chunk, short of its Content-Length).
CUT_SHORT = {
    "cut_chunked": b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n",
    "cut_length": b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\nhello",
}
# Answers whose connection is reset (RST) right after their head and a first piece of body, or right after the head.
RESET_EARLY = {
    "reset_after_a_piece": b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n",
    "reset_after_the_head": b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n",
}


class Upstream:
    """The seller's service: answers 200, or hangs (until released), or resets the connection, or answers JSON
    nested 100,000 deep, or 16 MB of JSON, or an answer cut short after its head (CUT_SHORT) or reset right after
    it (RESET_EARLY), as told."""

    def __init__(self):
        self.mode = "ok"
        self.served = 0  # calls answered 200
        self.arrivals = 0  # calls that reached it
        self.bodies: list[bytes] = []  # what they sent
        self.targets: list[str] = []  # and to which path and query, as on their request line
        self._count = threading.Lock()
        self.arrived = threading.Event()  # set when a call reaches a hanging or resetting upstream
        self._release = threading.Event()
        self._server: ThreadingHTTPServer | None = None

    @property
    def url(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def set_mode(self, mode: str) -> None:
        self.arrived.clear()
        self._release.clear()
        self.mode = mode

    def release(self) -> None:
        self._release.set()

    def start(self) -> Upstream:
        upstream = self

        class Handler(BaseHTTPRequestHandler):
            def _handle(self):
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                with upstream._count:
                    upstream.arrivals += 1
                    upstream.bodies.append(body)
                    upstream.targets.append(self.requestline.split(" ")[1])
                mode = upstream.mode
                if mode != "ok":
                    upstream.arrived.set()
                if mode in RESET_EARLY:
                    self.wfile.write(RESET_EARLY[mode])
                    self.wfile.flush()
                if mode == "reset" or mode in RESET_EARLY:  # RST instead of an answer, or of its rest
                    self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
                    self.connection.close()
                    self.close_connection = True
                    return
                if mode == "hang":
                    upstream._release.wait(timeout=60)
                if mode in CUT_SHORT:  # a head, part of the body, then the connection closed
                    self.close_connection = True
                    self.wfile.write(CUT_SHORT[mode])
                    return
                payload = {"deep": DEEP_JSON, "large": LARGE_JSON}.get(mode, b'{"ok": true}')
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                try:
                    self.wfile.write(payload)
                except ConnectionError:  # the proxy stopped reading: its caller went away
                    return
                with upstream._count:
                    upstream.served += 1

            do_GET = do_POST = _handle

            def log_message(self, *args):
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        threading.Thread(target=self._server.serve_forever, daemon=True).start()
        return self

    def stop(self) -> None:
        self._release.set()
        self._server.shutdown()
        self._server.server_close()
