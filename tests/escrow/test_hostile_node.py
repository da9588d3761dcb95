"""A chain node's answer is hostile input too (a compromised or misbehaving RPC provider): it is read up to
CHAIN_RPC_MAX_ANSWER_BYTES and within CHAIN_RPC_TIMEOUT in all, not per read."""

import contextlib
import os
import select
import socket
import threading
import time
from collections.abc import Callable

import pytest

from escrow import chain
from tests.support.unanswered_names import UNANSWERED, unanswered_names


@pytest.fixture
def node(settings):
    """A one-connection-at-a-time HTTP server playing the RPC node: `node(answer)` serves `answer(connection)` to
    every request and points CHAIN_RPC_URL at it."""
    listener = socket.create_server(("127.0.0.1", 0))
    served = {"bytes_sent": 0}
    stop = threading.Event()

    def start(answer: Callable[[socket.socket, dict], None]) -> dict:
        def serve():
            listener.settimeout(0.2)
            while not stop.is_set():
                try:
                    connection, _ = listener.accept()
                except TimeoutError:
                    continue
                except OSError:
                    return  # closed at the test's end
                with connection:
                    connection.recv(65536)  # the request: one small JSON-RPC call
                    try:
                        answer(connection, served)
                    except OSError:
                        pass  # the client hung up

        threading.Thread(target=serve, daemon=True).start()
        settings.CHAIN_RPC_URL = f"http://127.0.0.1:{listener.getsockname()[1]}"
        settings.CHAIN_RPC_RETRIES = 0
        return served

    yield start
    stop.set()
    listener.close()


def test_an_endless_node_answer_is_cut_off_at_its_size_bound_not_read_into_memory(node, settings):
    settings.CHAIN_RPC_MAX_ANSWER_BYTES = 1 << 20

    def endless(connection, served):
        connection.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 1000000000\r\n\r\n"
                           b'{"jsonrpc":"2.0","id":0,"result":"0x')
        chunk = b"0" * 65536
        while served["bytes_sent"] < 1_000_000_000:
            connection.sendall(chunk)
            served["bytes_sent"] += len(chunk)

    served = node(endless)
    with pytest.raises(chain.ChainError, match="larger than"):
        chain.latest_block_number()
    time.sleep(0.2)  # what the client's socket buffers took after it stopped reading
    assert served["bytes_sent"] < 8 << 20


def test_a_node_dribbling_its_answer_is_cut_off_at_the_rpc_timeout_in_all(node, settings):
    settings.CHAIN_RPC_TIMEOUT = 0.5

    def dribbling(connection, served):
        connection.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n")
        for byte in b'{"jsonrpc":"2.0","id":0,"result":"0x' + b"0" * 60:
            connection.sendall(bytes([byte]))  # each read well within the per-read timeout
            time.sleep(0.1)

    node(dribbling)
    started = time.monotonic()
    with pytest.raises(chain.ChainError):
        chain.latest_block_number()
    assert time.monotonic() - started < 1.5  # the whole answer would take 10 s


@pytest.mark.parametrize("retries", [0, 1])
def test_a_node_dribbling_its_status_line_and_headers_is_cut_off_at_the_rpc_timeout_in_all(node, settings, retries):
    """The body was bounded in all, the head only per read: http.client reads the head a line at a time, and a
    node sending it a byte every 0.2 s held the caller for the whole head (~20 s here), each retry as long."""

    def dribbling(connection, served):
        served["tries"] = served.get("tries", 0) + 1
        for byte in (b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nX-Padding: " + b"a" * 40 + b"\r\n"
                     b"Content-Length: 41\r\n\r\n"):
            connection.sendall(bytes([byte]))  # each read well within the per-read timeout
            served["bytes_sent"] += 1
            time.sleep(0.2)
        connection.sendall(b'{"jsonrpc":"2.0","id":0,"result":"0x2a"}')

    served = node(dribbling)
    settings.CHAIN_RPC_TIMEOUT, settings.CHAIN_RPC_RETRIES, settings.CHAIN_RPC_RETRY_BACKOFF = 0.5, retries, 0.01
    started = time.monotonic()
    with pytest.raises(chain.RpcUnavailable):
        chain.latest_block_number()
    assert time.monotonic() - started < 2 * (retries + 1)  # each try cut off at the timeout
    time.sleep(0.3)  # the last try's server side notices the hang-up
    assert served["tries"] == retries + 1 and served["bytes_sent"] < 5 * (retries + 1)


def test_with_retries_off_each_rpc_call_is_made_once_and_answered(node, settings):
    """web3 counts tries: CHAIN_RPC_RETRIES=0 handed to it made no try at all, and every chain call failed."""

    def answering(connection, served):
        served["bytes_sent"] += 1  # requests answered
        body = b'{"jsonrpc":"2.0","id":0,"result":"0x2a"}'
        connection.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\n"
                           b"Connection: close\r\n\r\n%s" % (len(body), body))

    served = node(answering)  # CHAIN_RPC_RETRIES = 0
    assert chain.latest_block_number() == 42 and served["bytes_sent"] == 1


def test_a_node_answer_failing_transiently_is_tried_again_retries_times(node, settings):
    def unavailable(connection, served):
        served["bytes_sent"] += 1
        connection.sendall(b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")

    served = node(unavailable)
    settings.CHAIN_RPC_RETRIES, settings.CHAIN_RPC_RETRY_BACKOFF = 2, 0.01
    with pytest.raises(chain.ChainError):
        chain.latest_block_number()
    assert served["bytes_sent"] == 3


def test_a_node_reached_through_an_http_proxy_is_bounded_alike(node, settings, monkeypatch):
    """requests takes its proxy from the environment (HTTP_PROXY), and its proxy connections were urllib3's own,
    without the head's bound: a proxy dribbling the head (or a node behind it) held the caller for the whole head."""

    def dribbling(connection, served):  # the proxy, answering for the node
        for byte in b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nX-Padding: " + b"a" * 40 + b"\r\n":
            connection.sendall(bytes([byte]))
            served["bytes_sent"] += 1
            time.sleep(0.2)

    served = node(dribbling)
    monkeypatch.setenv("HTTP_PROXY", settings.CHAIN_RPC_URL)
    monkeypatch.delenv("NO_PROXY", raising=False)
    monkeypatch.delenv("no_proxy", raising=False)
    settings.CHAIN_RPC_URL, settings.CHAIN_RPC_TIMEOUT = "http://rpc.node.invalid:8545", 0.5
    started = time.monotonic()
    with pytest.raises(chain.RpcUnavailable):
        chain.latest_block_number()
    assert time.monotonic() - started < 2
    assert served["bytes_sent"] < 5


def _ended_within(seconds: float, call: Callable[[], object]) -> BaseException | None:
    """What `call()` raised, run in a thread that must end within `seconds` (the test fails otherwise, leaving the
    thread to end when the server behind it gives up, rather than holding the suite)."""
    outcome: dict[str, BaseException | None] = {}

    def run():
        try:
            call()
            outcome["raised"] = None
        except BaseException as error:  # noqa: BLE001 - handed to the test
            outcome["raised"] = error

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(seconds)
    assert not thread.is_alive(), f"the chain call was still under way after {seconds} s"
    return outcome["raised"]


@pytest.fixture
def socks_proxy(monkeypatch):
    """A SOCKS5 proxy (RFC 1928, no authentication) that the environment names, as requests reads it:
    `socks_proxy(node_url, reply=...)` relays every connection to the node at `node_url` once it has sent its reply to
    the client's CONNECT (`reply`, a byte at a time every 0.2 s when `dribbled`)."""
    listener = socket.create_server(("127.0.0.1", 0))
    served = {"reply_bytes_sent": 0}

    def start(node_url: str, *, reply: bytes = b"\x05\x00\x00\x01\x7f\x00\x00\x01\x00\x00",
              dribbled: bool = False) -> dict:
        node_address = ("127.0.0.1", int(node_url.rsplit(":", 1)[1]))

        def relay(client: socket.socket):
            with client, contextlib.suppress(OSError):  # the client hung up
                reader = client.makefile("rb")
                reader.read(reader.read(2)[1])  # VER NMETHODS, then the methods
                client.sendall(b"\x05\x00")  # no authentication
                _, _, _, kind = reader.read(4)  # VER CMD RSV ATYP
                reader.read({1: 4, 4: 16}.get(kind) or reader.read(1)[0])
                reader.read(2)  # the port: every connection goes to the node
                for part in ([bytes([byte]) for byte in reply] if dribbled else [reply]):
                    client.sendall(part)
                    served["reply_bytes_sent"] += len(part)
                    if dribbled:
                        time.sleep(0.2)
                with socket.create_connection(node_address) as upstream:
                    ends = [client, upstream]
                    while True:
                        readable, _, _ = select.select(ends, [], [], 30)
                        for end in readable:
                            data = end.recv(65536)
                            if not data:
                                return
                            (upstream if end is client else client).sendall(data)

        def serve():
            while True:
                try:
                    client, _ = listener.accept()
                except OSError:
                    return  # closed at the test's end
                threading.Thread(target=relay, args=(client,), daemon=True).start()

        threading.Thread(target=serve, daemon=True).start()
        for name in ("HTTP_PROXY", "HTTPS_PROXY", "NO_PROXY", "no_proxy", "http_proxy", "https_proxy"):
            monkeypatch.delenv(name, raising=False)
        # socks5h: the proxy resolves the node's name, as a proxy in front of a private node would.
        monkeypatch.setenv("ALL_PROXY", f"socks5h://127.0.0.1:{listener.getsockname()[1]}")
        return served

    yield start
    listener.close()


def _dribbling_head(connection, served):
    for byte in (b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nX-Padding: " + b"a" * 100 + b"\r\n"
                 b"Content-Length: 41\r\n\r\n"):
        connection.sendall(bytes([byte]))  # each read well within the per-read timeout
        served["bytes_sent"] += 1
        time.sleep(0.2)
    connection.sendall(b'{"jsonrpc":"2.0","id":0,"result":"0x2a"}')


def test_a_node_reached_through_a_socks_proxy_is_bounded_alike(node, socks_proxy, settings):
    """A SOCKS proxy's connections were urllib3's own (urllib3.contrib.socks), bounded per read only: a node behind
    it dribbling its answer's head held the caller (a relayer task, a request simulating an activation) for the
    whole head, ~30 s here."""
    served = node(_dribbling_head)
    socks_proxy(settings.CHAIN_RPC_URL)
    settings.CHAIN_RPC_URL, settings.CHAIN_RPC_TIMEOUT = "http://rpc.node.invalid:8545", 0.5
    assert isinstance(_ended_within(2, chain.latest_block_number), chain.RpcUnavailable)
    time.sleep(0.3)  # the node notices the hang-up
    assert served["bytes_sent"] < 5


def test_a_node_reached_through_a_socks_proxy_answers_and_one_not_listening_is_unreachable(node, socks_proxy,
                                                                                           settings, monkeypatch):
    def answering(connection, served):
        body = b'{"jsonrpc":"2.0","id":0,"result":"0x2a"}'
        connection.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\n"
                           b"Connection: close\r\n\r\n%s" % (len(body), body))

    node(answering)
    socks_proxy(settings.CHAIN_RPC_URL)
    settings.CHAIN_RPC_URL = "http://rpc.node.invalid:8545"
    assert chain.latest_block_number() == 42

    with socket.create_server(("127.0.0.1", 0)) as closed:
        port = closed.getsockname()[1]
    monkeypatch.setenv("ALL_PROXY", f"socks5h://127.0.0.1:{port}")
    with pytest.raises(chain.RpcUnreachable):
        chain.latest_block_number()


def test_a_socks_proxy_dribbling_its_reply_to_connect_is_cut_off_at_the_rpc_timeout_in_all(
        node, socks_proxy, settings):
    """The proxy's handshake is reads of the socket too: a reply naming its bound address as a 255-byte host name,
    a byte every 0.2 s, held the caller ~50 s, each byte within the per-read timeout."""
    node(_dribbling_head)
    proxy = socks_proxy(settings.CHAIN_RPC_URL, dribbled=True,
                        reply=b"\x05\x00\x00\x03\xff" + b"a" * 255 + b"\x00\x50")
    settings.CHAIN_RPC_URL, settings.CHAIN_RPC_TIMEOUT = "http://rpc.node.invalid:8545", 0.5
    assert isinstance(_ended_within(2, chain.latest_block_number), chain.RpcUnavailable)
    time.sleep(0.3)
    assert proxy["reply_bytes_sent"] < 5


def _dribbling_tls_record(connection, served):
    connection.sendall(b"\x16\x03\x03\x40\x00")  # a handshake record of 16 KiB: the client waits for all of it
    while served["bytes_sent"] < 1000:
        connection.sendall(b"\x00")
        served["bytes_sent"] += 1
        time.sleep(0.2)


def test_a_node_dribbling_its_tls_handshake_is_cut_off_at_the_rpc_timeout_in_all(node, settings):
    """Connecting is reads too, but the ssl module bounds a handshake in all by the socket's timeout: a node sending
    its first record (16 KiB) a byte every 0.2 s is cut off, not waited on for an hour."""
    served = node(_dribbling_tls_record)
    settings.CHAIN_RPC_URL = settings.CHAIN_RPC_URL.replace("http://", "https://")
    settings.CHAIN_RPC_TIMEOUT = 0.5
    assert isinstance(_ended_within(2, chain.latest_block_number), chain.RpcUnavailable)
    time.sleep(0.3)
    assert served["bytes_sent"] < 5


def test_an_http_proxy_dribbling_its_answer_to_connect_is_cut_off_at_the_rpc_timeout_in_all(
        node, settings, monkeypatch):
    """A node reached over TLS through an HTTP proxy (HTTPS_PROXY) is reached through a tunnel (CONNECT), whose
    answer http.client reads a line at a time, each read bounded by the timeout only."""

    def dribbling(connection, served):  # the proxy, answering CONNECT
        for byte in b"HTTP/1.1 200 Connection established\r\nX-Padding: " + b"a" * 100 + b"\r\n\r\n":
            connection.sendall(bytes([byte]))
            served["bytes_sent"] += 1
            time.sleep(0.2)

    served = node(dribbling)
    for name in ("NO_PROXY", "no_proxy", "https_proxy"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HTTPS_PROXY", settings.CHAIN_RPC_URL)
    settings.CHAIN_RPC_URL, settings.CHAIN_RPC_TIMEOUT = "https://rpc.node.invalid:8545", 0.5
    assert isinstance(_ended_within(2, chain.latest_block_number), chain.RpcUnavailable)
    time.sleep(0.3)
    assert served["bytes_sent"] < 5


@pytest.mark.parametrize("through", ["directly", "http proxy", "socks proxy", "socks proxy resolving here"])
def test_a_node_or_proxy_whose_name_never_resolves_is_unavailable_within_the_rpc_timeout(settings, monkeypatch,
                                                                                         socks_proxy, through):
    """The RPC timeout bounded connecting, not resolving the name first: a node (or proxy) name whose DNS server never
    answers held the caller (a relayer task, a request simulating an activation) for as long as the system resolver
    kept asking."""
    for name in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "NO_PROXY", "no_proxy", "http_proxy", "https_proxy",
                 "all_proxy"):
        monkeypatch.delenv(name, raising=False)
    settings.CHAIN_RPC_URL, settings.CHAIN_RPC_TIMEOUT, settings.CHAIN_RPC_RETRIES = "http://rpc.node.invalid:8545", 0.5, 0
    if through == "directly":
        settings.CHAIN_RPC_URL = f"http://rpc.{UNANSWERED}:8545"
    elif through == "http proxy":
        monkeypatch.setenv("HTTP_PROXY", f"http://proxy.{UNANSWERED}:3128")
    elif through == "socks proxy":
        monkeypatch.setenv("ALL_PROXY", f"socks5h://proxy.{UNANSWERED}:1080")
    else:  # socks5://, not socks5h://: the node's name is resolved here, not by the proxy
        socks_proxy(settings.CHAIN_RPC_URL)
        monkeypatch.setenv("ALL_PROXY", os.environ["ALL_PROXY"].replace("socks5h://", "socks5://"))
        settings.CHAIN_RPC_URL = f"http://rpc.{UNANSWERED}:8545"
    with unanswered_names() as lookups:
        # Bounded: within 2 s, where the lookup blocks for RESOLVER_GIVES_UP_AFTER (10 s). No finer timing: on a
        # loaded machine the 0.5 s timeout's call took 1.5 s.
        assert isinstance(_ended_within(2, chain.latest_block_number), chain.RpcUnavailable)
        assert lookups.began == 1


@pytest.mark.parametrize("node_url", [
    "http://127.0.0.1:{port}/v2/SECRET-KEY-IN-PATH",
    "http://127.0.0.1:{port}/?apikey=SECRET-KEY-IN-QUERY",
    "http://user:SECRET-KEY-AS-PASSWORD@127.0.0.1:{port}/",
])
def test_the_nodes_api_key_in_its_url_is_never_in_an_error_the_platform_shows(node_url, settings, admin_client):
    """RPC providers put the API key in the URL's path, query or password. A failed call's error text named the
    URL whole (urllib3's "Max retries exceeded with url: /v2/<key>"), and that text reaches the logs, the admin's
    dashboard and reconcile's output, read by people who hold no infrastructure secret."""
    with socket.socket() as closed:
        closed.bind(("127.0.0.1", 0))
        port = closed.getsockname()[1]
    settings.CHAIN_RPC_URL, settings.CHAIN_RPC_RETRIES = node_url.format(port=port), 0
    with pytest.raises(chain.ChainError) as refused:
        chain.latest_block_number()
    assert "SECRET-KEY" not in str(refused.value)
    assert "127.0.0.1" in str(refused.value)  # still says which node failed
    dashboard = admin_client.get("/admin/dashboard/").content.decode()
    assert "SECRET-KEY" not in dashboard
