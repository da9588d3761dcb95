"""A real HTTP server on loopback for tests: records requests, answers from a script of responses."""

import contextlib
import json
import ssl
import threading
import time
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


@dataclass
class Recorded:
    method: str
    path: str
    headers: dict
    body: bytes


@dataclass
class RecordingServer:
    requests: list[Recorded] = field(default_factory=list)
    # (status, body dict[, delay seconds[, headers]]) to answer, in order; then 200 {}
    responses: deque = field(default_factory=deque)
    server: ThreadingHTTPServer | None = None
    tls: ssl.SSLContext | None = None  # serve HTTPS with this context's certificate

    @property
    def url(self) -> str:
        host, port = self.server.server_address[:2]
        return f"{'https' if self.tls else 'http'}://{host}:{port}"

    def start(self) -> "RecordingServer":
        recorder = self

        class Handler(BaseHTTPRequestHandler):
            def _handle(self):
                length = int(self.headers.get("Content-Length") or 0)
                # The target as sent: http.server collapses a leading `//` in self.path (its own open-redirect guard).
                target = self.requestline.split(" ")[1]
                recorder.requests.append(Recorded(self.command, target, dict(self.headers),
                                                  self.rfile.read(length)))
                status, body, *more = recorder.responses.popleft() if recorder.responses else (200, {})
                delay, headers = (more + [0, {}][len(more):])[:2]
                time.sleep(delay)
                payload = body if isinstance(body, bytes) else json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                for name, value in headers.items():
                    self.send_header(name, value)
                if not any(name.lower() == "content-length" for name in headers):  # a test's own: a body cut short
                    self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

            do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = _handle

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        if self.tls:
            self.server.socket = self.tls.wrap_socket(self.server.socket, server_side=True)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        return self

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@contextlib.contextmanager
def serving(handler: type[BaseHTTPRequestHandler]) -> Iterator[str]:
    """`handler` served on loopback (a thread per connection) while the block runs; yields the base URL."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


class DribblesItsHead(BaseHTTPRequestHandler):
    """A hostile receiver or seller: answers 200 with `{}` but sends its head's one header a byte every 0.25 s, 3 s
    in all. Each read is quick, so only a bound on the whole exchange cuts it off."""

    protocol_version = "HTTP/1.1"

    def _handle(self):
        self.rfile.read(int(self.headers.get("Content-Length") or 0))
        try:
            self.wfile.write(b"HTTP/1.1 200 OK\r\nX-Slow: ")
            for _ in range(12):
                time.sleep(0.25)
                self.wfile.write(b"a")
            self.wfile.write(b"\r\nContent-Type: application/json\r\nContent-Length: 2\r\n\r\n{}")
        except OSError:
            pass  # cut off

    do_GET = do_POST = _handle

    def log_message(self, *args):
        pass


class FloodsEarlyHints(BaseHTTPRequestHandler):
    """A hostile seller or receiver: answers with informational answers (103 Early Hints) without end, each whole at
    once. Neither a read timeout nor a deadline's time is what should stop reading them."""

    protocol_version = "HTTP/1.1"

    def _handle(self):
        self.rfile.read(int(self.headers.get("Content-Length") or 0))
        try:
            while True:
                self.wfile.write(b"HTTP/1.1 103 Early Hints\r\nLink: </a.css>; rel=preload\r\n\r\n" * 100)
        except OSError:
            pass  # cut off

    do_GET = do_POST = _handle

    def log_message(self, *args):
        pass


def answering_past_its_end(tail: bytes) -> type[BaseHTTPRequestHandler]:
    """A hostile or broken seller or receiver keeping its connections alive: answers each request 200 with
    `{"for": <its X-Marketplace-Invocation>}`, the first on each connection followed, in the same write, by `tail`
    (another answer, or bytes past its Content-Length): whatever reads them takes them for the answer to the next
    request sent down that connection."""

    class AnswersPastItsEnd(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"
        answered = 0

        def _handle(self):
            self.rfile.read(int(self.headers.get("Content-Length") or 0))
            body = json.dumps({"for": self.headers.get("X-Marketplace-Invocation", "")}).encode()
            answer = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n%s" % (
                len(body), body)
            self.answered += 1
            self.wfile.write(answer + (tail if self.answered == 1 else b""))

        do_GET = do_POST = _handle

        def log_message(self, *args):
            pass

    return AnswersPastItsEnd
