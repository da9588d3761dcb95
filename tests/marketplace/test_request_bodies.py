"""marketplace.request_bodies: a request's body is read ahead of the application by a bounded number of threads per
client and in all (the production server against stalling clients: tests/faults/test_stalled_bodies.py)."""

import io
import json

import pytest

from marketplace import request_bodies
from marketplace.concurrency import Busy, PeerSlots


class Stalling(io.RawIOBase):
    """A body whose reads, after `sent` bytes, would wait for ever: here they fail the test instead."""

    def __init__(self, sent: bytes):
        self.sent = io.BytesIO(sent)

    def read(self, size=-1):
        chunk = self.sent.read(size)
        if not chunk:
            raise AssertionError("read a body past what the client sent")
        return chunk


@pytest.fixture
def limits(settings):
    settings.REQUEST_BODY_READS_PER_CLIENT, settings.REQUEST_BODY_READS = 1, 2
    settings.DATA_UPLOAD_MAX_MEMORY_SIZE = settings.PROXY_MAX_REQUEST_BYTES = 100
    slots = PeerSlots("request bodies", code="request_bodies_busy", per_peer="REQUEST_BODY_READS_PER_CLIENT",
                      in_all="REQUEST_BODY_READS")
    request_bodies.BODY_READS, saved = slots, request_bodies.BODY_READS
    yield slots
    request_bodies.BODY_READS = saved


def environ(client: str, body: bytes = b"", *, length: str | None = None, chunked: bool = False, stream=None) -> dict:
    environ = {"REQUEST_METHOD": "POST", "REMOTE_ADDR": client, "wsgi.input_terminated": True,
               "wsgi.input": stream if stream is not None else io.BytesIO(body),
               "CONTENT_LENGTH": str(len(body)) if length is None else length}
    if chunked:
        environ.update(CONTENT_LENGTH="", HTTP_TRANSFER_ENCODING="chunked")
    return environ


class Application:
    """Records what the application was handed: the body, and whether its client held a slot meanwhile."""

    def __init__(self, slots: PeerSlots):
        self.slots, self.bodies, self.slots_held = slots, [], []

    def __call__(self, environ, start_response):
        self.bodies.append(environ["wsgi.input"].read())
        self.slots_held.append(self.slots._held_in_all)
        start_response("200 OK", [])
        return [b"ok"]


def call(application, environ) -> tuple[str, dict, bytes]:
    answer = {}

    def start_response(status, headers, exc_info=None):
        answer.update(status=status, headers=dict(headers))

    body = b"".join(application(environ, start_response))
    return answer["status"], answer["headers"], body


def test_a_body_is_read_ahead_and_the_application_reads_it_with_the_slot_given_back(limits):
    application = Application(limits)
    status, _, _ = call(request_bodies.read_ahead(application), environ("10.0.0.1", b'{"a": 1}'))
    assert status == "200 OK"
    assert application.bodies == [b'{"a": 1}']
    assert application.slots_held == [0]  # read ahead: the application itself waits on no client
    assert limits._held_in_all == 0


def test_a_client_waiting_on_its_share_is_refused_at_once_unread_and_others_are_not(limits):
    application = Application(limits)
    read_ahead = request_bodies.read_ahead(application)
    stalled = limits.take("10.0.0.1")  # a request of the client's whose body has not come
    stream = Stalling(b"")
    status, headers, body = call(read_ahead, environ("10.0.0.1", length="10", stream=stream))
    assert status.startswith("503")
    assert json.loads(body)["error"]["code"] == "request_bodies_busy"
    assert headers["Retry-After"] == "1"
    assert headers["Connection"] == "close"  # its body unread: the connection serves nothing more
    assert application.bodies == []
    assert call(read_ahead, environ("10.0.0.2", b"{}"))[0] == "200 OK"  # another client
    stalled.give_back()
    assert call(read_ahead, environ("10.0.0.1", b"{}"))[0] == "200 OK"


def test_with_half_the_threads_waiting_on_bodies_a_request_with_a_body_is_refused_and_one_without_is_not(limits):
    application = Application(limits)
    read_ahead = request_bodies.read_ahead(application)
    waiting = [limits.take("10.0.0.1"), limits.take("10.0.0.2")]
    assert call(read_ahead, environ("10.0.0.3", b"{}"))[0].startswith("503")
    assert call(read_ahead, environ("10.0.0.3"))[0] == "200 OK"  # no body: nothing to wait on
    assert call(read_ahead, {**environ("10.0.0.3", b"{}"), "REQUEST_METHOD": "GET", "CONTENT_LENGTH": ""})[0] == \
        "200 OK"
    for slot in waiting:
        slot.give_back()
    assert call(read_ahead, environ("10.0.0.3", b"{}"))[0] == "200 OK"


def test_behind_trusted_proxies_the_client_is_the_address_they_saw(limits, settings):
    settings.REST_FRAMEWORK = {**settings.REST_FRAMEWORK, "NUM_PROXIES": 1}
    read_ahead = request_bodies.read_ahead(Application(limits))
    stalled = limits.take("198.51.100.7")
    behind = environ("10.0.0.9", b"{}")  # the balancer's address, every client's
    assert call(read_ahead, {**behind, "HTTP_X_FORWARDED_FOR": "198.51.100.7"})[0].startswith("503")
    assert call(read_ahead, {**behind, "HTTP_X_FORWARDED_FOR": "198.51.100.8"})[0] == "200 OK"
    stalled.give_back()


def test_an_ipv6_client_is_its_slash_64(limits):
    read_ahead = request_bodies.read_ahead(Application(limits))
    stalled = limits.take("2001:db8:1:2::")  # its /64
    assert call(read_ahead, environ("2001:db8:1:2::77", b"{}"))[0].startswith("503")
    assert call(read_ahead, environ("2001:db8:1:3::77", b"{}"))[0] == "200 OK"
    stalled.give_back()


def test_a_chunked_body_is_read_to_its_end_and_one_over_the_bounds_just_past_them(limits):
    application = Application(limits)
    read_ahead = request_bodies.read_ahead(application)
    call(read_ahead, environ("10.0.0.1", b"x" * 100, chunked=True))
    call(read_ahead, environ("10.0.0.1", b"y" * 500, chunked=True))
    assert application.bodies == [b"x" * 100, b"y" * 101]  # enough for the application's 413
    assert application.slots_held == [0, 0]


def test_a_body_declared_over_the_bounds_is_not_read_and_its_request_keeps_its_slot(limits):
    application = Application(limits)
    stream = io.BytesIO(b"z" * 500)
    call(request_bodies.read_ahead(application), environ("10.0.0.1", length="500", stream=stream))
    assert application.bodies == [b"z" * 500]  # the stream as the server gave it
    assert application.slots_held == [1]
    assert limits._held_in_all == 0


def test_a_body_cut_short_is_handed_over_as_far_as_it_came(limits):
    application = Application(limits)

    class Closed(io.RawIOBase):
        sent = io.BytesIO(b"abc")

        def read(self, size=-1):
            return self.sent.read(size)  # b"" once the client is gone

    call(request_bodies.read_ahead(application), environ("10.0.0.1", length="10", stream=Closed()))
    assert application.bodies == [b"abc"]
    assert limits._held_in_all == 0


def test_peer_slots_count_per_peer_and_in_all_and_are_given_back_once(settings):
    settings.SLOTS_PER_PEER, settings.SLOTS = 2, 3
    slots = PeerSlots("things", code="things_busy", per_peer="SLOTS_PER_PEER", in_all="SLOTS")
    first, second = slots.take("a"), slots.take("a")
    with pytest.raises(Busy) as refused:
        slots.take("a")
    assert refused.value.code == "things_busy" and refused.value.status_code == 503
    third = slots.take("b")
    with pytest.raises(Busy):
        slots.take("c")
    first.give_back()
    first.give_back()  # once only
    fourth = slots.take("c")
    with pytest.raises(Busy):
        slots.take("d")
    for slot in (second, third, fourth):
        slot.give_back()
    assert slots._held == {} and slots._held_in_all == 0


def test_peer_slots_without_limits_refuse_nothing(settings):
    settings.SLOTS_PER_PEER, settings.SLOTS = 0, 0
    slots = PeerSlots("things", code="things_busy", per_peer="SLOTS_PER_PEER", in_all="SLOTS")
    taken = [slots.take("a") for _ in range(100)]
    assert len(taken) == 100
