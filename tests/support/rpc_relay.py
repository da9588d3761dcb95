"""A JSON-RPC relay in front of Anvil that a test points the marketplace at, to make the node misbehave on cue:
answer HTTP 429 to chosen calls, do something on the node right before a chosen call reaches it, let a call reach
the node while its answer never comes back (`hold`), refuse connections altogether (`stop`, then `start`),
refuse `eth_getLogs` over more blocks than a public RPC serves (`cap_log_span`), or answer chosen calls with what
the test makes of the node's answer (`rewrite`: an error, another block)."""

from __future__ import annotations

import json
import socket
import threading
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

Call = dict  # one JSON-RPC request: {"method": ..., "params": [...]}


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class RpcRelay:
    def __init__(self, upstream_url: str):
        self.upstream_url = upstream_url
        self.port = _free_port()  # kept across stop/start, so whoever was pointed here reconnects
        self.throttled: Callable[[Call], bool] = lambda call: False
        self.throttled_count = 0
        self._before: list[tuple[Callable[[Call], bool], Callable[[], None]]] = []
        self.observers: list[Callable[[Call], None]] = []
        self.hold_methods: set[str] = set()
        self.holding = threading.Event()  # set while a held answer is being kept back
        self._release = threading.Event()
        self._let_through = 0  # matching calls still answered before the holding starts
        self._count_lock = threading.Lock()
        self._server: ThreadingHTTPServer | None = None
        self.max_log_span: int | None = None
        self.log_ranges: list[tuple[int, int]] = []  # every eth_getLogs's (fromBlock, toBlock), tags resolved
        self._rewrites: list[tuple[Callable[[Call], bool], Callable[[dict], dict]]] = []
        self._request_rewrites: list[Callable[[Call], Call]] = []

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

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

    def hold(self, *methods: str, after: int = 0) -> None:
        """Keep back the answers to calls of `methods` (until `release`), once `after` of them went through."""
        self._release.clear()
        self.holding.clear()
        self._let_through = after
        self.hold_methods = set(methods)

    def rewrite(self, predicate: Callable[[Call], bool], answer: Callable[[dict], dict]) -> None:
        """Answer each single call `predicate` picks with `answer(the node's answer)`, until `rewrite_none`."""
        self._rewrites.append((predicate, answer))

    def latest_calls_answered_at(self, data_prefix: str, block: str) -> None:
        """Answer each `eth_call` at `latest` whose data starts with `data_prefix` (a function's selector) with the
        node's answer at `block` (a backend of a provider's pool behind the one that named the head)."""
        asked: list[dict] = []

        def at_latest(call) -> bool:
            if call.get("method") == "eth_call" and call["params"][1] == "latest" and call["params"][0].get(
                    "data", "").startswith(data_prefix):
                asked.append(call["params"][0])
                return True
            return False

        self.rewrite(at_latest, lambda answer: {**answer, "result": self.node("eth_call", [asked[-1], block])})

    def head_named_behind(self, blocks: int) -> None:
        """Answer `eth_blockNumber` with the node's head less `blocks` (a backend of a provider's pool behind the one
        answering the calls at `latest`: the head it names lacks their newest blocks)."""
        self.rewrite(lambda call: call.get("method") == "eth_blockNumber",
                     lambda answer: {**answer, "result": hex(max(0, int(answer["result"], 16) - blocks))})

    def head_named_ahead(self, blocks: int) -> None:
        """Answer `eth_blockNumber` with the node's head plus `blocks` (a backend of a provider's pool on the chain,
        which grew past a branch it dropped, where the node answering the blocks, the logs and the calls is still on
        that branch, at its head: the blocks the head it names counts are not the node's)."""
        self.rewrite(lambda call: call.get("method") == "eth_blockNumber",
                     lambda answer: {**answer, "result": hex(int(answer["result"], 16) + blocks)})

    def receipt_hidden_and_state_pruned(self, tx_hash: str, *, below: int) -> None:
        """`tx_hash`'s receipt answered as none (not mined, as a lagging backend says) and the nonce of any account
        at a block below `below` refused as a non-archive node does ("missing trie node")."""
        self.rewrite(lambda call: call.get("method") == "eth_getTransactionReceipt" and call["params"][0] == tx_hash,
                     lambda answer: {**answer, "result": None})
        self.rewrite(lambda call: call.get("method") == "eth_getTransactionCount" and call["params"][1].startswith(
            "0x") and int(call["params"][1], 16) < below,
                     lambda answer: {"jsonrpc": "2.0", "id": answer.get("id"), "error": {
                         "code": -32000, "message": "missing trie node (path ) state is not available"}})

    def receipts_answered_with(self, tx_hash: str) -> None:
        """From now on every lookup of a receipt after its first is answered with `tx_hash`'s receipt (a node mixing
        up which transaction was asked; the first lookup, the relayer's, is answered right)."""
        others_receipt = self.node("eth_getTransactionReceipt", [tx_hash])
        lookups: dict[str, int] = {}

        def mixed_up(call) -> bool:
            if call.get("method") != "eth_getTransactionReceipt":
                return False
            asked = call["params"][0].lower()
            lookups[asked] = lookups.get(asked, 0) + 1
            return asked != others_receipt["transactionHash"] and lookups[asked] > 1

        self.rewrite(mixed_up, lambda answer: {**answer, "result": others_receipt})

    def rewrite_none(self) -> None:
        self._rewrites.clear()

    def ask_instead(self, rewrite: Callable[[Call], Call]) -> None:
        """Forward each single call as `rewrite(call)` makes it: the node asked something else than the caller asked
        (the answer goes back as the caller's)."""
        self._request_rewrites.append(rewrite)

    def _rewritten(self, call: Call, payload: bytes) -> bytes:
        for predicate, answer in list(self._rewrites):
            if predicate(call):
                return json.dumps(answer(json.loads(payload))).encode()
        return payload

    def cap_log_span(self, blocks: int) -> None:
        """Answer an error, as public RPCs do, to an eth_getLogs over more than `blocks` blocks."""
        self.max_log_span = blocks

    def _block(self, tag: str | None) -> int:
        if tag in (None, "latest", "safe", "finalized", "pending"):
            return int(self.node("eth_blockNumber"), 16)
        return 0 if tag == "earliest" else int(tag, 16)

    def _log_span_refusal(self, call: Call) -> dict | None:
        """Records an eth_getLogs's range; the error to answer when it is over the cap."""
        if call.get("method") != "eth_getLogs":
            return None
        query = call["params"][0]
        first, last = self._block(query.get("fromBlock")), self._block(query.get("toBlock"))
        self.log_ranges.append((first, last))
        if self.max_log_span is not None and last - first + 1 > self.max_log_span:
            return {"jsonrpc": "2.0", "id": call.get("id"),
                    "error": {"code": -32600, "message": f"eth_getLogs is limited to a {self.max_log_span} range"}}
        return None

    def release(self) -> None:
        self.hold_methods = set()
        self._release.set()

    def _hold_this_one(self, calls: list[Call]) -> bool:
        if not {call.get("method") for call in calls} & self.hold_methods:
            return False
        with self._count_lock:
            if self._let_through > 0:
                self._let_through -= 1
                return False
            return True

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
                refusal = relay._log_span_refusal(parsed) if isinstance(parsed, dict) else None
                if refusal is not None:
                    self._answer(200, json.dumps(refusal).encode())
                    return
                if any(relay.throttled(call) for call in calls):
                    relay.throttled_count += 1
                    self._answer(429, b'{"error": "rate limited"}')
                    return
                for hook in list(relay._before):
                    predicate, action = hook
                    if any(predicate(call) for call in calls):
                        relay._before.remove(hook)
                        action()
                if isinstance(parsed, dict) and relay._request_rewrites:
                    asked = parsed
                    for rewrite in list(relay._request_rewrites):
                        asked = rewrite(asked)
                    body = json.dumps(asked).encode()
                payload = relay._forward(body)
                if isinstance(parsed, dict):
                    payload = relay._rewritten(parsed, payload)
                if relay._hold_this_one(calls):
                    relay.holding.set()
                    relay._release.wait()  # the node has done the work; the caller never hears back
                    self.close_connection = True
                    return
                self._answer(200, payload)

            def _answer(self, status: int, payload: bytes) -> None:
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

            def log_message(self, *args):
                pass

        ThreadingHTTPServer.allow_reuse_address = True
        self._server = ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        self._server.daemon_threads = True
        threading.Thread(target=self._server.serve_forever, daemon=True).start()
        return self

    def stop(self) -> None:
        """Unreachable: new connections are refused until `start()`."""
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None


@contextmanager
def node_relayed(upstream_url: str, settings) -> Iterator[RpcRelay]:
    """The marketplace pointed at a relay of the node at `upstream_url` for the block's duration (CHAIN_RPC_URL put
    back after it), which the test tells how to misbehave."""
    relay = RpcRelay(upstream_url).start()
    before, settings.CHAIN_RPC_URL = settings.CHAIN_RPC_URL, relay.url
    try:
        yield relay
    finally:
        relay.stop()
        settings.CHAIN_RPC_URL = before


@contextmanager
def node_block_times(upstream_url: str, settings, **timestamps: int) -> Iterator[RpcRelay]:
    """The marketplace pointed at a relay whose node answers the blocks tagged (`latest=`, `pending=`) with the
    timestamps given, the rest of each block as it is: a misbehaving provider's clock."""
    with node_relayed(upstream_url, settings) as relay:
        for tag, timestamp in timestamps.items():
            relay.rewrite(lambda call, tag=tag: call.get("method") == "eth_getBlockByNumber"
                          and call["params"][0] == tag,
                          lambda answer, timestamp=timestamp: {
                              **answer, "result": {**answer["result"], "timestamp": hex(timestamp)}})
        yield relay


@contextmanager
def node_behind(upstream_url: str, settings, seconds: int) -> Iterator[RpcRelay]:
    """The marketplace pointed at a relay whose node is `seconds` behind the chain (a provider's backend that fell
    behind, while the transactions sent through it still reach the chain, as a rollup's nodes forward them to the
    sequencer): it answers its latest and pending blocks that much earlier, and runs calls and gas estimates (every
    simulation) at that time; what is sent is mined by the chain, at the chain's time."""

    def earlier(answer: dict) -> dict:
        return {**answer, "result": {**answer["result"], "timestamp": hex(int(answer["result"]["timestamp"], 16)
                                                                            - seconds)}}

    def at_its_time(call: Call) -> Call:
        if call.get("method") not in ("eth_call", "eth_estimateGas"):
            return call
        latest = int(relay.node("eth_getBlockByNumber", ["latest", False])["timestamp"], 16)
        params = list(call.get("params") or []) + [None] * 3
        transaction, block, state, overrides = params[:4]
        return {**call, "params": [transaction, block or "latest", state or {},
                                   {**(overrides or {}), "time": hex(latest - seconds)}]}

    with node_relayed(upstream_url, settings) as relay:
        relay.rewrite(lambda call: call.get("method") == "eth_getBlockByNumber" and call["params"][0] in (
            "latest", "pending"), earlier)
        relay.ask_instead(at_its_time)
        yield relay
