"""A chain node's answer is hostile input too (a compromised or misbehaving RPC provider): it is read up to
CHAIN_RPC_MAX_ANSWER_BYTES and within CHAIN_RPC_TIMEOUT in all, not per read."""

import socket
import threading
import time
from collections.abc import Callable

import pytest

from escrow import chain


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
