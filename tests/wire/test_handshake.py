"""The handshake (protocol.md §2, §5.1) as a sans-I/O object: both sides, byte by byte, no sockets."""

from __future__ import annotations

import pytest

from client import wire
from client.session import Session
from client.wire import ClientHandshake, HandshakeError, Hello, ServerHandshake, Welcome

# [1, 1, {"version": 1, "client": "w", "heartbeat": 5.0}] after the preamble
CLIENT_HELLO = bytes.fromhex(
    "00 42 52 4b"                     # preamble \0BRK
    "00 00 00 29"                     # length: 41 bytes of CBOR
    "83 01 01"                        # [HELLO, rid 1,
    "a3 67 76 65 72 73 69 6f 6e 01"   #  {"version": 1,
    "66 63 6c 69 65 6e 74 61 77"      #   "client": "w",
    "69 68 65 61 72 74 62 65 61 74 fb 40 14 00 00 00 00 00 00"  # "heartbeat": 5.0}]
)
# [64, 1, {"server": "brokerd 1.0", "version": 1, "heartbeat": 5.0, "max_frame": 1024, "connection": 7}]
SERVER_WELCOME = bytes.fromhex(
    "00 00 00 4d 83 18 40 01 a5"
    "66 73 65 72 76 65 72 6b 62 72 6f 6b 65 72 64 20 31 2e 30"
    "67 76 65 72 73 69 6f 6e 01"
    "69 68 65 61 72 74 62 65 61 74 fb 40 14 00 00 00 00 00 00"
    "69 6d 61 78 5f 66 72 61 6d 65 19 04 00"
    "6a 63 6f 6e 6e 65 63 74 69 6f 6e 07"
)


def server(**kw) -> ServerHandshake:
    args = {"connection": 7, "heartbeat": 30.0, "max_frame": 1024, "server": "brokerd 1.0"}
    args.update(kw)
    return ServerHandshake(**args)


def feed_bytewise(hs: ServerHandshake, data: bytes):
    """Feed one byte at a time; return the first event and how many bytes it took."""
    for i in range(len(data)):
        hs.receive_data(data[i:i + 1])
        ev = hs.next_event()
        if ev is not None:
            return ev, i + 1
    return None, len(data)


def refusal(data: bytes, **kw) -> HandshakeError:
    hs = server(**kw)
    with pytest.raises(HandshakeError) as info:
        hs.receive_data(data)
        hs.next_event()
    return info.value


def frame(*items) -> bytes:
    return wire.encode(list(items))


def test_the_client_opens_with_the_preamble_and_hello_exactly():
    assert ClientHandshake(Hello(client="w", heartbeat=5.0)).initiate() == CLIENT_HELLO


def test_the_session_sends_the_handshake_objects_bytes_first():
    s = Session(None, name="w", heartbeat=5.0, now=0.0, id_prefix="p", versions=(1,))
    s.hello()
    assert s.data_to_send(0.0) == CLIENT_HELLO


def test_a_session_offers_every_version_it_speaks_and_the_server_picks_the_highest():
    s = Session(None, name="w", heartbeat=5.0, now=0.0, id_prefix="p")
    s.hello()
    data = s.data_to_send(0.0)
    assert data == ClientHandshake(Hello(version=[1, 2], client="w", heartbeat=5.0)).initiate()
    hs = server()
    hs.receive_data(data)
    hello = hs.next_event()
    assert hello.version == 2
    r = wire.FrameReader()
    r.feed(hs.accept(hello))
    (ok,) = r.frames()
    assert ok[2]["version"] == 2
    s.receive([ok], 0.0)
    assert s.version == 2


@pytest.mark.parametrize("asked, picked", [(1, 1), (2, 2), ([1], 1), ([2, 1], 2), ([1, 2], 2), ([1, 9], 1), ([9, 2], 2)])
def test_the_server_picks_the_highest_version_both_speak(asked, picked):
    hs = server()
    hs.receive_data(wire.PREAMBLE + frame(wire.OP_HELLO, 1, {"version": asked}))
    hello = hs.next_event()
    assert hello.version == picked
    assert hs.welcome_map(hello)["version"] == picked


def test_the_server_reads_hello_fed_one_byte_at_a_time_and_answers_exactly():
    hs = server()
    hello, used = feed_bytewise(hs, CLIENT_HELLO)
    assert used == len(CLIENT_HELLO)  # nothing before the last byte counts as HELLO
    assert hello == Hello(version=1, client="w", heartbeat=5.0, extra=None, rid=1)
    assert hs.accept(hello) == SERVER_WELCOME


def test_the_client_reads_the_servers_answer_fed_one_byte_at_a_time():
    reader = wire.FrameReader()
    frames = []
    for i in range(len(SERVER_WELCOME)):
        reader.feed(SERVER_WELCOME[i:i + 1])
        frames += reader.frames()
    assert len(frames) == 1
    hs = ClientHandshake(Hello(client="w", heartbeat=5.0))
    welcome = hs.receive(frames[0])
    assert welcome == Welcome("brokerd 1.0", 1, 5.0, 1024, 7, frames[0][2]) == hs.welcome


def test_a_wrong_preamble_is_refused_once_four_bytes_arrived():
    hs = server()
    hs.receive_data(b"\x00BR")
    assert hs.next_event() is None  # three bytes: could still be the preamble
    with pytest.raises(HandshakeError, match=r"^a binary connection must open with the 4 bytes b'\\x00BRK'$") as info:
        hs.receive_data(b"X")
    assert info.value.code == "BAD_PREAMBLE"


def test_any_frame_but_hello_first_needs_a_handshake():
    err = refusal(wire.PREAMBLE + frame(wire.OP_PING, 1))
    assert (err.code, err.message) == ("HANDSHAKE_REQUIRED", "the first frame must be HELLO")


def test_heartbeats_before_hello_are_ignored():
    hs = server()
    hs.receive_data(wire.PREAMBLE + frame(wire.OP_HEARTBEAT) + frame(wire.OP_HEARTBEAT) + CLIENT_HELLO[4:])
    assert hs.next_event().client == "w"


def test_hello_without_a_map_is_a_bad_request():
    err = refusal(wire.PREAMBLE + frame(wire.OP_HELLO, 1, "v1"))
    assert (err.code, err.message) == ("BAD_REQUEST", "HELLO field 2 must be a map with at least 'version'")


@pytest.mark.parametrize("version, shown", [
    (3, "3"), (0, "0"), ("1", "a str"), (None, "a NoneType"), (True, "a bool"),
    ([], "[]"), ([3, 7], "[3, 7]"), ([1.0], "[1.0]"), (list(range(17)), repr(list(range(17)))),
    ([[2]], "[[2]]"), ([2, [1]], "[2, [1]]"), (2**70, str(2**70)), ({"v": 2}, "a dict"),  # nested, huge, wrong shape
])
def test_a_version_the_server_does_not_speak_is_refused(version, shown):
    err = refusal(wire.PREAMBLE + frame(wire.OP_HELLO, 1, {"version": version}))
    assert (err.code, err.message) == (
        "UNSUPPORTED_VERSION", f"this server speaks protocol versions 1, 2, not {shown}: send 'version' "
        "as one of them, or as a list of the versions the client speaks")


@pytest.mark.parametrize("asked, agreed", [
    (5, 5.0), (0, 0.0), (2.5, 2.5),                        # the client's interval, heartbeats off included
    (-1, 30.0), ("5", 30.0), (float("nan"), 30.0), (float("inf"), 30.0), (None, 30.0),  # nonsense: the server's
])
def test_the_heartbeat_is_the_clients_when_sensible_else_the_servers(asked, agreed):
    hs = server()
    hs.receive_data(wire.PREAMBLE + frame(wire.OP_HELLO, 1, {"version": 1, "heartbeat": asked}))
    hello = hs.next_event()
    assert hello.heartbeat == agreed


def test_a_missing_heartbeat_or_name_takes_the_servers_default():
    hs = server()
    hs.receive_data(wire.PREAMBLE + frame(wire.OP_HELLO, 4, {"version": 1, "client": ""}))
    assert hs.next_event() == Hello(1, "conn-7", 30.0, None, 4)


def test_unknown_hello_keys_travel_both_ways_for_credentials():
    auth = {"auth": {"user": "u", "token": b"\x01\x02"}}
    data = ClientHandshake(Hello(client="w", heartbeat=5.0, extra=auth)).initiate()
    hs = server()
    hello, _ = feed_bytewise(hs, data)
    assert hello.extra == auth


def test_frames_after_hello_in_the_same_read_are_kept_for_the_main_loop():
    hs = server()
    hs.receive_data(CLIENT_HELLO + frame(wire.OP_PING, 2) + frame(wire.OP_STATS, 3, None)[:3])
    assert hs.next_event().rid == 1
    assert hs.pending_frames == [[wire.OP_PING, 2]]
    hs.receive_data(frame(wire.OP_STATS, 3, None)[3:])
    assert hs.reader.frames() == [[wire.OP_STATS, 3, None]]


@pytest.mark.parametrize("reply, code, message", [
    ([wire.OP_ERROR, 1, "BAD_REQUEST", "no"], "BAD_REQUEST", "no"),
    ([wire.OP_CLOSING, "UNSUPPORTED_VERSION", "speak 1"], "UNSUPPORTED_VERSION", "speak 1"),
    ([wire.OP_DELIVER, 1, 2], "BAD_FRAME", "expected the reply to HELLO, got a frame with op code 66"),
])
def test_the_client_side_names_a_refused_handshake(reply, code, message):
    with pytest.raises(HandshakeError) as info:
        ClientHandshake(Hello(client="w")).receive(reply)
    assert (info.value.code, info.value.message) == (code, message)


def test_a_refusal_is_sent_as_closing():
    err = HandshakeError("BAD_PREAMBLE", "x")
    assert ServerHandshake.closing(err) == wire.encode([wire.OP_CLOSING, "BAD_PREAMBLE", "x"])


def test_a_welcome_with_nonsense_limits_keeps_the_clients_own():
    w = Welcome.from_result({"heartbeat": -1, "max_frame": "big"})
    assert (w.heartbeat, w.max_frame) == (None, None)
    assert Welcome.from_result(None).info == {}
