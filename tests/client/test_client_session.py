"""The sans-I/O client session, driven by hand: no sockets, no clock, no threads.

Bytes the session wants to send are decoded with ``client.wire.FrameReader``;
replies are fed in as decoded frames, exactly as the shells do.
"""

from __future__ import annotations

import pickle

import pytest

from client import errors as E
from client import wire
from client.options import admin_reply, parse_address, publish_options, queue_options
from client.session import (
    CONFIRMS,
    FLUSH,
    HEARTBEAT_BYTES,
    ConsumerState,
    Delivery,
    Pending,
    Session,
)


class Owner:
    """Stands in for a shell: records what deliveries ask of it."""

    def __init__(self):
        self.calls = []

    def _ack(self, d, wait):
        self.calls.append(("ack", d.tag, wait))

    def _nack(self, d, requeue, delay, headers=None):
        self.calls.append(("nack", d.tag, requeue, delay))

    def _touch(self, d):
        self.calls.append(("touch", d.tag))


def new_session(heartbeat=10.0, now=100.0):
    s = Session(Owner(), name="unit", heartbeat=heartbeat, now=now, id_prefix="p")
    return s


def sent_frames(s: Session, now=100.0) -> list:
    """Decode everything the session wants to send (the preamble, if there, is checked and dropped)."""
    data = s.data_to_send(now)
    if data.startswith(wire.PREAMBLE):
        data = data[len(wire.PREAMBLE):]
    r = wire.FrameReader()
    r.feed(data)
    frames = r.frames()
    assert r.buffered == 0
    return frames


def handshaken(heartbeat=10.0, now=100.0) -> Session:
    s = new_session(heartbeat, now)
    s.hello()
    sent_frames(s, now)
    s.receive([[wire.OP_OK, 1, {"server": "brokerd", "version": 1, "heartbeat": heartbeat}]], now)
    return s


def deliver(ctag, tag, queue="q", mid="m", body=b"b", priority=0, attempts=1, headers=None):
    return [wire.OP_DELIVER, ctag, tag, queue, mid, body, priority, attempts, headers]


def subscribed(s: Session, queues=("q",), prefetch=4, ctag=7) -> ConsumerState:
    p = s.consume(list(queues), prefetch)
    sent_frames(s)
    s.receive([[wire.OP_OK, p.rid, ctag]], 100.0)
    return p.consumer


# --- request ids and the handshake ------------------------------------------------------
def test_the_first_bytes_are_the_preamble_then_hello_with_rid_1():
    s = new_session(heartbeat=7.5)
    p = s.hello()
    data = s.data_to_send(100.0)
    assert data.startswith(wire.PREAMBLE)
    r = wire.FrameReader()
    r.feed(data[4:])
    assert r.frames() == [[wire.OP_HELLO, 1, {"version": list(wire.PROTOCOL_VERSIONS), "client": "unit", "heartbeat": 7.5}]]
    assert p.rid == 1


def test_request_ids_count_up_by_one_across_every_kind_of_request():
    s = handshaken()
    rids = [
        s.request(wire.OP_PING, []).rid,
        s.publish("q", b"x", None, 0, None)[0].rid,
        s.publish("q", b"x", None, 0, None, confirm=False) and s.last_rid,
        s.consume(["q"], 1).rid,
        s.request(wire.OP_STATS, [None]).rid,
    ]
    assert rids == [2, 3, 4, 5, 6]
    assert [f[1] for f in sent_frames(s)] == [2, 3, 4, 5, 6]


def test_a_reply_completes_only_its_own_request():
    s = handshaken()
    a = s.request(wire.OP_PING, [])
    b = s.request(wire.OP_PURGE, ["q"])
    wake = s.receive([[wire.OP_OK, b.rid, 3]], 100.0)
    assert wake == [b] and b.done and b.result == 3
    assert not a.done and a.rid in s.pending


def test_hello_reply_sets_the_heartbeat_the_broker_agreed():
    s = new_session(heartbeat=30.0)
    s.hello()
    s.receive([[wire.OP_OK, 1, {"heartbeat": 5.0}]], 100.0)
    assert s.heartbeat == 5.0 and s.server == {"heartbeat": 5.0}


def test_client_made_message_ids_are_the_prefix_and_a_counter():
    s = handshaken()
    ids = [s.publish("q", b"x", None, 0, None, confirm=False)[1] for _ in range(3)]
    assert ids == ["p-1", "p-2", "p-3"]
    assert s.publish("q", b"x", "mine", 0, None)[1] == "mine"


def test_publish_frame_layout_matches_protocol():
    s = handshaken()
    opts = publish_options(delay=1.5, eta=None, ttl=60, headers={"k": "v"})
    s.publish("emails", b"body", "id-1", 3, opts)
    assert sent_frames(s) == [[wire.OP_PUBLISH, 2, "emails", b"body", "id-1", 3, {"delay": 1.5, "ttl": 60, "headers": {"k": "v"}}]]
    assert publish_options(None, None, None, None) is None


def test_publish_refuses_a_text_body_before_sending_anything():
    s = handshaken()
    with pytest.raises(TypeError, match="body must be bytes"):
        s.publish("q", "text", None, 0, None)
    assert sent_frames(s) == []


def test_a_publish_larger_than_the_brokers_max_frame_is_refused_before_sending():
    s = new_session()
    s.hello()
    s.receive([[wire.OP_OK, 1, {"max_frame": 1024}]], 100.0)
    sent_frames(s)
    with pytest.raises(E.MessageTooLarge, match="larger than the broker's max_frame of 1024 bytes"):
        s.publish("q", b"x" * 1024, None, 0, None)
    s.publish("q", b"x" * 900, None, 0, None)
    assert len(sent_frames(s)) == 1


def test_declare_options_carry_every_key():
    assert queue_options(max_length=1) == {
        "dead_letter": None, "max_attempts": 25, "reserve_timeout": None, "max_length": 1, "overflow": "reject",
    }


# --- confirms ----------------------------------------------------------------------------
def test_confirms_are_tracked_until_every_publish_before_the_mark_is_answered():
    s = handshaken()
    for _ in range(3):
        s.publish("q", b"x", None, 0, None, confirm=False)  # rids 2, 3, 4
    mark = s.confirm_mark()
    s.publish("q", b"x", None, 0, None, confirm=False)  # rid 5: after the mark
    assert not s.confirmed_through(mark)
    assert s.receive([[wire.OP_OK, 3, "p-2"], [wire.OP_OK, 4, "p-3"]], 100.0) == [CONFIRMS]
    assert not s.confirmed_through(mark)  # rid 2 still open
    s.receive([[wire.OP_OK, 2, "p-1"]], 100.0)
    assert s.confirmed_through(mark)
    assert s.unconfirmed_ids() == ["p-4"]
    assert s.take_refused() == []


def test_a_refused_pipelined_publish_is_recorded_with_its_id_and_error():
    s = handshaken()
    s.publish("q", b"x", None, 0, None, confirm=False)
    s.publish("q", b"x", None, 0, None, confirm=False)
    s.receive([[wire.OP_OK, 2, "p-1"], [wire.OP_ERROR, 3, "QUEUE_FULL", "queue 'q' is full"]], 100.0)
    refused = s.take_refused()
    assert [mid for mid, _ in refused] == ["p-2"]
    assert isinstance(refused[0][1], E.QueueFull) and refused[0][1].message == "queue 'q' is full"
    assert s.take_refused() == []  # reported once


def test_a_confirmed_publish_gets_its_error_on_its_pending():
    s = handshaken()
    p, _ = s.publish("q", b"x", None, 0, None)
    assert s.receive([[wire.OP_ERROR, p.rid, "MESSAGE_TOO_LARGE", "too big"]], 100.0) == [p]
    assert isinstance(p.error, E.MessageTooLarge)


# --- error mapping ----------------------------------------------------------------------
@pytest.mark.parametrize(
    "code, cls",
    [
        ("QUEUE_FULL", E.QueueFull),
        ("MESSAGE_TOO_LARGE", E.MessageTooLarge),
        ("STALE_DELIVERY", E.StaleDelivery),
        ("NOT_FOUND", E.NotFound),
        ("PRECONDITION_FAILED", E.PreconditionFailed),
        ("BAD_REQUEST", E.BadRequest),
        ("UNKNOWN_COMMAND", E.BadRequest),
        ("UNKNOWN_OP", E.LocalProtocolError),
        ("BAD_FRAME", E.LocalProtocolError),
        ("LOG_FAILED", E.LogFailed),
        ("SHUTTING_DOWN", E.ConnectionLost),
        ("HEARTBEAT_TIMEOUT", E.ConnectionLost),
        ("INTERNAL", E.BrokerInternalError),
    ],
)
def test_each_wire_error_code_maps_to_its_exception(code, cls):
    exc = E.error_from_wire(code, "a sentence")
    assert type(exc) is cls
    assert exc.code == code and exc.message == "a sentence"
    assert str(exc) == f"{code}: a sentence"


def test_every_wire_error_code_has_a_specific_exception():
    for code in wire.ERROR_CODES:
        assert type(E.error_from_wire(code, "m")) is not E.BrokerdError, code


def test_an_unknown_code_from_a_newer_broker_is_still_a_brokerd_error():
    exc = E.error_from_wire("SOMETHING_NEW", "m")
    assert type(exc) is E.BrokerdError and exc.code == "SOMETHING_NEW"


def test_error_families_say_whose_fault_it_is():
    assert issubclass(E.BadRequest, E.LocalProtocolError) and issubclass(E.BadRequest, E.RequestRefused)
    assert issubclass(E.RemoteProtocolError, E.ProtocolError)
    assert not issubclass(E.ConnectionClosed, ConnectionError)
    assert issubclass(E.ConnectionLost, ConnectionError) and issubclass(E.ConnectionLost, E.Disconnected)
    assert issubclass(E.Timeout, TimeoutError)
    for cls in (E.QueueFull, E.StaleDelivery, E.NotFound, E.PreconditionFailed, E.MessageTooLarge):
        assert issubclass(cls, E.RequestRefused)
    assert E.error_from_wire("QUEUE_FULL", "m").keeps_connection
    assert not E.error_from_wire("SHUTTING_DOWN", "m").keeps_connection


def test_publish_error_names_the_refused_ids_and_survives_pickling():
    exc = E.PublishError([("a", E.QueueFull(None, "full")), ("b", E.BadRequest(None, "bad priority"))])
    assert exc.ids == ["a", "b"]
    assert str(exc) == "PUBLISH_REFUSED: 2 publishes were refused: 'a' (QUEUE_FULL: full), 'b' (BAD_REQUEST: bad priority)"
    again = pickle.loads(pickle.dumps(exc))
    assert again.ids == ["a", "b"] and isinstance(again.failures[0][1], E.QueueFull)


def test_an_admin_err_reply_raises_its_code():
    assert admin_reply("OK 0 queues\r\nEND\r\n") == "OK 0 queues\r\nEND\r\n"
    with pytest.raises(E.NotFound, match=r"^NOT_FOUND: queue 'x' does not exist$"):
        admin_reply("ERR NOT_FOUND queue 'x' does not exist\r\n")


def test_addresses_parse_with_and_without_port():
    assert parse_address("127.0.0.1:7701") == ("127.0.0.1", 7701)
    assert parse_address("broker") == ("broker", 7700)
    assert parse_address("[::1]:9") == ("::1", 9)
    assert parse_address(("h", "5")) == ("h", 5)


# --- deliveries and acks ------------------------------------------------------------------
def test_deliveries_go_to_their_consumer_with_every_field():
    s = handshaken()
    cs = subscribed(s, ctag=7)
    wake = s.receive([deliver(7, 41, "emails", "id-9", b"hi", 4, 2, {"h": 1})], 100.0)
    assert wake == [cs]
    d = cs.buffer.popleft()
    assert (d.consumer, d.tag, d.queue, d.id, d.body, d.priority, d.attempts, d.headers) == (
        7, 41, "emails", "id-9", b"hi", 4, 2, {"h": 1},
    )
    assert d.redelivered and isinstance(d, Delivery)


def test_acks_are_batched_until_half_the_prefetch():
    s = handshaken()
    cs = subscribed(s, prefetch=4)  # threshold 2
    s.receive([deliver(7, t) for t in (1, 2, 3)], 100.0)
    d1, d2, d3 = cs.buffer
    assert s.ack(d1) is False
    assert sent_frames(s)[0] == [wire.OP_ACK, s.last_rid, [1]]  # a flush sends what is batched
    assert s.ack(d2) is False
    assert s.ack(d3) is True
    assert sent_frames(s) == [[wire.OP_ACK, s.last_rid, [2, 3]]]


def test_batched_acks_go_out_before_the_next_request():
    s = handshaken()
    cs = subscribed(s, prefetch=100)
    s.receive([deliver(7, 5)], 100.0)
    s.ack(cs.buffer.popleft())
    p = s.request(wire.OP_PING, [])
    frames = sent_frames(s)
    assert frames == [[wire.OP_ACK, p.rid - 1, [5]], [wire.OP_PING, p.rid]]


def test_settling_a_delivery_twice_is_refused_locally():
    s = handshaken()
    cs = subscribed(s)
    s.receive([deliver(7, 5)], 100.0)
    d = cs.buffer.popleft()
    s.ack(d)
    with pytest.raises(E.StaleDelivery):
        s.ack(d)
    with pytest.raises(E.StaleDelivery):
        s.nack(d)


def test_nack_and_touch_frames():
    s = handshaken()
    cs = subscribed(s)
    s.receive([deliver(7, 5), deliver(7, 6)], 100.0)
    a, b = cs.buffer
    s.touch(a)
    s.nack(a, requeue=True, delay=2.5)
    s.nack(b, requeue=False)
    assert [f[0:1] + f[2:] for f in sent_frames(s)] == [
        [wire.OP_TOUCH, 5], [wire.OP_NACK, 5, True, 2.5], [wire.OP_NACK, 6, False, None],
    ]


def test_a_refused_batched_ack_is_recorded_not_raised():
    s = handshaken()
    cs = subscribed(s)
    s.receive([deliver(7, 5)], 100.0)
    s.ack(cs.buffer.popleft())
    rid = sent_frames(s)[0][1]
    assert s.receive([[wire.OP_ERROR, rid, "STALE_DELIVERY", "gone"]], 100.0) == []
    tags, exc = s.quiet_errors.popleft()
    assert tags == [5] and isinstance(exc, E.StaleDelivery)


def test_delivery_methods_call_the_shell():
    s = handshaken()
    cs = subscribed(s)
    s.receive([deliver(7, 5)], 100.0)
    d = cs.buffer.popleft()
    d.ack(wait=True)
    d.nack(False, 3)
    d.touch()
    assert s.owner.calls == [("ack", 5, True), ("nack", 5, False, 3), ("touch", 5)]


def test_cancel_reply_marks_the_consumer_cancelled_and_forgets_its_tag():
    s = handshaken()
    cs = subscribed(s, ctag=7)
    p = s.cancel(cs)
    assert sent_frames(s) == [[wire.OP_CANCEL, p.rid, 7]]
    wake = s.receive([[wire.OP_OK, p.rid, None]], 100.0)
    assert cs in wake and p in wake and cs.cancelled and 7 not in s.consumers


def test_a_delivery_for_a_cancelled_consumer_is_given_back_at_once():
    s = handshaken()
    cs = subscribed(s, ctag=7)
    p = s.cancel(cs)
    sent_frames(s)
    s.receive([[wire.OP_OK, p.rid, None]], 100.0)
    wake = s.receive([deliver(7, 12)], 100.0)  # it was on its way when the CANCEL was answered
    assert wake == [FLUSH] and not cs.buffer
    assert sent_frames(s) == [[wire.OP_NACK, s.last_rid, 12, True, None]]
    assert s.returned == 1


# --- connection end -------------------------------------------------------------------------
def test_losing_the_connection_fails_every_waiter_and_later_calls():
    s = handshaken()
    cs = subscribed(s)
    p = s.request(wire.OP_PING, [])
    s.publish("q", b"x", None, 0, None, confirm=False)
    wake = s.fail(E.ConnectionLost(None, "reset"))
    assert p in wake and cs in wake and CONFIRMS in wake
    assert isinstance(p.error, E.ConnectionLost) and isinstance(cs.error, E.ConnectionLost)
    assert s.unconfirmed_ids() == ["p-1"]
    with pytest.raises(E.ConnectionLost, match="reset"):
        s.request(wire.OP_PING, [])


def test_a_closing_frame_names_the_reason():
    s = handshaken()
    s.receive([[wire.OP_CLOSING, "SHUTTING_DOWN", "brokerd is stopping"]], 100.0)
    assert isinstance(s.closing, E.ConnectionLost) and s.closing.code == "SHUTTING_DOWN"


def test_after_bye_no_new_request_is_taken():
    s = handshaken()
    s.bye()
    with pytest.raises(E.ConnectionClosed):
        s.request(wire.OP_PING, [])


def test_an_unexpected_op_from_the_broker_is_a_remote_protocol_error():
    s = handshaken()
    with pytest.raises(E.RemoteProtocolError):
        s.receive([[wire.OP_PUBLISH, 1]], 100.0)


# --- heartbeats ----------------------------------------------------------------------------
def test_heartbeat_is_due_one_interval_after_the_last_send():
    s = handshaken(heartbeat=10.0, now=100.0)  # last sent at 100
    assert not s.heartbeat_due(109.9)
    assert s.heartbeat_due(110.0)
    s.heartbeat_frame()
    assert s.data_to_send(110.0) == HEARTBEAT_BYTES
    assert not s.heartbeat_due(119.9) and s.heartbeat_due(120.0)


def test_the_peer_is_silent_after_two_intervals_without_a_frame():
    s = handshaken(heartbeat=10.0, now=100.0)
    assert not s.peer_silent(120.0)
    assert s.peer_silent(120.1)
    s.receive([[wire.OP_HEARTBEAT]], 115.0)
    assert not s.peer_silent(135.0) and s.peer_silent(135.1)


def test_next_timer_is_the_earlier_of_heartbeat_and_silence():
    s = handshaken(heartbeat=10.0, now=100.0)
    assert s.next_timer() == 110.0
    s.data_to_send(105.0)  # nothing buffered: does not count as a send
    assert s.next_timer() == 110.0
    s.heartbeat_frame()
    s.data_to_send(118.0)
    assert s.next_timer() == 120.0  # silence limit: last received 100 + 2 * 10


def test_heartbeat_zero_turns_the_timers_off():
    s = handshaken(heartbeat=0, now=100.0)
    assert not s.heartbeat_due(1e9) and not s.peer_silent(1e9)
    assert s.next_timer() == float("inf")


def test_pending_repr_is_readable():
    assert repr(Pending(3, 0)) == "<Pending rid=3 kind=0 done=False>"


# --- one home for the shells' shared decisions -------------------------------------------------
def test_a_raising_control_or_event_handler_is_logged_and_the_others_still_run(caplog):
    from client.session import CONTROL, EVENTS

    seen = []

    def bad(*args):
        raise RuntimeError("handler bug")

    s = Session(Owner(), name="unit", heartbeat=10.0, now=100.0, id_prefix="p",
                control_handlers=[bad, seen.append], event_handlers=[bad, lambda ev, dropped: seen.append((ev, dropped))])
    wake = s.receive([[wire.OP_CONTROL, {"revoke": ["t"]}], [wire.OP_EVENT, [{"type": "x"}], 2]], 100.0)
    assert CONTROL in wake and EVENTS in wake
    s.run_handlers()
    assert seen == [{"revoke": ["t"]}, ([{"type": "x"}], 2)]
    assert [r.getMessage() for r in caplog.records] == ["a CONTROL handler failed", "an event handler failed"]
    assert not s.controls and not s.events


@pytest.mark.parametrize("closed, closing, exc, expect_type, expect_text", [
    (True, None, None, E.ConnectionClosed, "the client was closed"),
    (False, ("SHUTTING_DOWN", "bye"), OSError("reset"), E.ConnectionLost, "bye"),
    (False, None, E.RemoteProtocolError("BAD_FRAME", "garbled"), E.RemoteProtocolError, "garbled"),
    (False, None, OSError("reset"), E.ConnectionLost, "connection to brokerd at h:1 lost (OSError: reset)"),
    (False, None, None, E.ConnectionLost, "connection to brokerd at h:1 lost (the broker closed the connection)"),
])
def test_a_lost_connection_is_named_by_whose_doing_it_was(closed, closing, exc, expect_type, expect_text):
    s = handshaken()
    p = s.request(wire.OP_PING, [])
    if closing:
        s.receive([[wire.OP_CLOSING, *closing]], 100.0)
    wake = s.connection_lost(exc, address="h:1", closed=closed)
    assert p in wake and isinstance(s.error, expect_type) and expect_text in str(s.error)
    assert s.connection_lost(OSError("again"), address="h:1") == []  # the first reason stays


def test_an_unreadable_frame_is_the_brokers_fault_and_a_bug_is_logged(caplog):
    s = handshaken()
    err = s.reader_failed(wire.WireError("BAD_FRAME", "not CBOR"))
    assert isinstance(err, E.RemoteProtocolError) and "the broker sent an unreadable frame: not CBOR" in str(err)
    reset = ConnectionResetError("reset")
    assert s.reader_failed(reset) is reset and not caplog.records
    bug = KeyError("oops")
    assert s.reader_failed(bug) is bug
    assert [r.getMessage() for r in caplog.records] == ["brokerd client reader crashed"]
