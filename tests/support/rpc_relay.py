"""A JSON-RPC relay in front of Anvil that a test points the marketplace at, to make the node misbehave on cue:
answer HTTP 429 to chosen calls, or do something on the node right before a chosen call reaches it."""

from __future__ import annotations

import json
import threading
import urllib.request
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

Call = dict  # one JSON-RPC request: {"method": ..., "params": [...]}


class RpcRelay:
    def __init__(self, upstream_url: str):
        self.upstream_url = upstream_url
        self.throttled: Callable[[Call], bool] = lambda call: False
        self.throttled_count = 0
        self._before: list[tuple[Callable[[Call], bool], Callable[[], None]]] = []
        self.observers: list[Callable[[Call], None]] = []
        self._server: ThreadingHTTPServer | None = None

    @property
    def url(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def node(self, method: str, params: list | None = None):
        """A call straight to the node, past the relay."""
        body = json.dumps({"jsonrpc": "2.0", "id": 1, "method": method, "params": params or []}).encode()
        return json.loads(self._forward(body))["result"]

    def throttle(self, predicate: Callable[[Call], bool]) -> None:
        """Answer HTTP 429 (as a rate-limited provider does) to every call `predicate` picks."""
        self.throttled = predicate

    def before_once(self, predicate: Callable[[Call], bool], action: Callable[[], None]) -> None:
        """Run `action` just before the first call `predicate` picks is forwarded."""
        self._before.append((predicate, action))

    def _forward(self, body: bytes) -> bytes:
        request = urllib.request.Request(self.upstream_url, data=body, headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=30) as answer:
            return answer.read()

    def start(self) -> RpcRelay:
        relay = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                parsed = json.loads(body)
                calls = parsed if isinstance(parsed, list) else [parsed]
                for observer in relay.observers:
                    for call in calls:
                        observer(call)
                if any(relay.throttled(call) for call in calls):
                    relay.throttled_count += 1
                    self._answer(429, b'{"error": "rate limited"}')
                    return
                for hook in list(relay._before):
                    predicate, action = hook
                    if any(predicate(call) for call in calls):
                        relay._before.remove(hook)
                        action()
                self._answer(200, relay._forward(body))

            def _answer(self, status: int, payload: bytes) -> None:
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

            def log_message(self, *args):
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        threading.Thread(target=self._server.serve_forever, daemon=True).start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
