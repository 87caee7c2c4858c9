"""One hostile frame costs its own connection, never the broker, the log or another client.

What these tests guard against, each once seen: a 35-byte PUBLISH with a
self-referencing CBOR value broke the log for everyone and then crashed
brokerd; bignum numbers gave INTERNAL; ``--fsync interval``/``never`` released
confirms before the write; a failed log still answered ACKs OK.

The pure layers (codec + handlers + state) are fuzzed hard in-process; the
same generated frames are then thrown at a real brokerd while a healthy
client keeps publishing with confirms, and nothing it confirmed is lost.
"""

from __future__ import annotations

import errno
import os
import re
import signal
import socket
import time

import cbor2
import pytest
import trio
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from broker.handlers import binary as commands
from broker.config import Config
from broker.runtime.durability import Durability
from broker.state import BrokerState
from broker.wal import FaultPlan, WriteAheadLog
from client import wire
from tests.support.inprocess import replayed_state, serve_with_fault
from tests.support.wireclient import Raw

# A self-referencing array: shareable(tag 28) [ sharedref(tag 29) 0 ].
CYCLIC = bytes.fromhex("d81c81d81d00")


def frame_bytes_with(prefix_items: list, raw_value: bytes) -> bytes:
    """A frame whose last item is the raw CBOR ``raw_value`` (cbor2 cannot build cycles for us)."""
    head = cbor2.dumps(prefix_items)
    assert head[0] & 0xE0 == 0x80 and head[0] < 0x98  # a short array header
    payload = bytes([head[0] + 1]) + head[1:] + raw_value
    return wire.HEADER.pack(len(payload)) + payload


# -- the codec refuses what cannot round-trip ---------------------------------------------------
@pytest.mark.parametrize("raw,what", [
    (CYCLIC, "value-sharing tag"),
    (bytes.fromhex("d81d00"), "value-sharing tag 29"),
    (cbor2.dumps(cbor2.CBORTag(36, "Content-Type: text/plain\n\nhi")), "MIME message tag 36"),
])
def test_the_decoder_refuses_tags_that_cannot_be_encoded_back(raw, what):
    data = frame_bytes_with([wire.OP_PUBLISH, 1, "q", b"x", None, 0], raw)
    reader = wire.FrameReader()
    reader.feed(data)
    with pytest.raises(wire.WireError) as exc:
        reader.frames()
    assert exc.value.code == "BAD_FRAME"
    assert what in exc.value.message and "not accepted" in exc.value.message


# -- real brokerd: the 35-byte attack -------------------------------------------------------------
def test_a_cyclic_value_in_publish_headers_costs_only_its_connection(broker):
    healthy = Raw(broker.port)
    consumer = Raw(broker.port)
    consumer.ok(wire.OP_CONSUME, ["work"], 50)
    # [PUBLISH, rid, queue, body, id, priority, {"headers": <cyclic>}] — 35 bytes on the wire
    attack = frame_bytes_with(
        [wire.OP_PUBLISH, 7, "work", b"evil", None, 0],
        bytes([0xA1]) + cbor2.dumps("headers") + CYCLIC,
    )
    assert len(attack) <= 40
    attacker = Raw(broker.port)
    attacker.send_raw(attack)
    closing = attacker.read_until_closed()
    assert closing and closing[-1][0] == wire.OP_CLOSING and closing[-1][1] == "BAD_FRAME", closing
    assert "value-sharing" in closing[-1][2]
    # everyone else is unaffected: 20 confirmed publishes, delivered
    for i in range(20):
        assert healthy.ok(wire.OP_PUBLISH, "work", b"ok%d" % i, f"ok{i}", 0, None) == f"ok{i}"
    got = consumer.deliveries(20)
    assert sorted(f[4] for f in got) == sorted(f"ok{i}" for i in range(20))
    consumer.close()  # the broken broker used to crash at the next consumer disconnect
    time.sleep(0.2)
    assert broker.proc.poll() is None, "\n".join(broker.log)
    assert healthy.ok(wire.OP_PUBLISH, "work", b"after", "after", 0, None) == "after"
    assert re.search(r"wal_state +ok\r\n", broker.admin("STATS\n"))


def test_a_cyclic_result_value_costs_only_its_connection(broker):
    healthy = Raw(broker.port)
    attacker = Raw(broker.port)
    attacker.send_raw(frame_bytes_with([wire.OP_RESULT_SET, 3, "task-1", "SUCCESS"], CYCLIC))
    closing = attacker.read_until_closed()
    assert closing[-1][0] == wire.OP_CLOSING and closing[-1][1] == "BAD_FRAME"
    for i in range(5):
        assert healthy.ok(wire.OP_RESULT_SET, f"t{i}", "SUCCESS", [i], None, None) is not None
        assert healthy.ok(wire.OP_RESULT_GET, f"t{i}", None)["result"] == [i]


@pytest.mark.parametrize("frame,field", [
    ([wire.OP_PUBLISH, 1, "q", b"x", None, 2**70, None], "priority"),
    ([wire.OP_PUBLISH, 1, "q", b"x", None, 0, {"delay": 2**1100}], "'delay'"),
    ([wire.OP_PUBLISH, 1, "q", b"x", None, 0, {"ttl": -(2**80)}], "'ttl'"),
    ([wire.OP_CONSUME, 1, ["q"], 2**64 + 1], "prefetch"),
    ([wire.OP_NACK, 1, 5, True, 2**99, None], "delay"),
    ([wire.OP_RESULT_GET, 1, "t", 2**200], "wait"),
])
def test_a_bignum_where_a_number_belongs_is_a_bad_request_not_internal(broker, frame, field):
    r = Raw(broker.port)
    reply = r.call(frame[0], *frame[2:])
    assert reply[0] == wire.OP_ERROR and reply[2] == "BAD_REQUEST", reply
    assert field in reply[3], reply
    assert r.ok(wire.OP_PING) is None  # the connection stays open


# -- a confirm means "written to the OS" under every policy ----------------------------------------
@pytest.mark.parametrize("policy", ["always", "interval", "never"])
def test_kill_9_at_the_first_confirms_loses_none_of_them(broker_factory, policy):
    b = broker_factory("--fsync", policy, "--fsync-interval-ms", "5000")
    s = socket.create_connection(("127.0.0.1", b.port), timeout=5)
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    hello = wire.encode([wire.OP_HELLO, 1, {"version": 1, "client": "kill"}])
    s.sendall(wire.PREAMBLE + hello)
    reader = wire.FrameReader()
    # one burst of 2,000 pipelined publishes; SIGKILL the moment the first confirms arrive
    burst = b"".join(wire.encode([wire.OP_PUBLISH, 100 + i, "k", b"m" * 100, f"m{i}", 0, None]) for i in range(2000))
    s.sendall(burst)
    confirmed: list[str] = []
    deadline = time.monotonic() + 10
    while not confirmed and time.monotonic() < deadline:
        reader.feed(s.recv(1 << 20))
        confirmed += [f[2] for f in reader.frames() if f[0] == wire.OP_OK and f[1] >= 100]
    os.kill(b.proc.pid, signal.SIGKILL)
    b.proc.wait(5)
    s.close()
    assert confirmed, "no confirm arrived"
    b.restart()
    r = Raw(b.port)
    have = r.ok(wire.OP_STATS, "k")["ready"]
    r.ok(wire.OP_CONSUME, ["k"], 5000)
    ids = {f[4] for f in r.deliveries(have)}
    lost = set(confirmed) - ids
    assert not lost, f"{policy}: {len(lost)} of {len(confirmed)} confirmed messages lost"


# -- after the log failed nothing that changes state is answered OK --------------------------------
async def test_after_the_log_fails_acks_and_every_change_are_refused(tmp_path, nursery):
    server, port = await serve_with_fault(tmp_path, nursery, FaultPlan(fail_write_after_bytes=6000, errno=errno.ENOSPC))

    def run():
        c = Raw(port)
        for i in range(10):
            c.ok(wire.OP_PUBLISH, "q", b"z" * 50, f"m{i}", 0, None)
        c.ok(wire.OP_CONSUME, ["q"], 10)
        tags = [f[2] for f in c.deliveries(10)]
        i = 10
        while c.call(wire.OP_PUBLISH, "q", b"z" * 400, f"m{i}", 0, None)[0] == wire.OP_OK:
            i += 1
            assert i < 1000, "the fault never fired"
        replies = {
            "ack": c.call(wire.OP_ACK, tags[:5]),
            "nack": c.call(wire.OP_NACK, tags[5], False, None, None),
            "result": c.call(wire.OP_RESULT_SET, "t1", "SUCCESS", 1, None, None),
            "forget": c.call(wire.OP_RESULT_FORGET, "t1"),
            "declare": c.call(wire.OP_DECLARE, "other", None),
            "purge": c.call(wire.OP_PURGE, "q"),
            "pause": c.call(wire.OP_PAUSE, "q"),
            "schedule": c.call(wire.OP_SCHEDULE_PUT, "s", {"task": "x", "every": 5, "queue": "q"}),
            "revoke": c.call(wire.OP_REVOKE, "t2", None),
        }
        return tags, replies

    tags, replies = await trio.to_thread.run_sync(run)
    for name, reply in replies.items():
        assert reply[0] == wire.OP_ERROR and reply[2] == "LOG_FAILED", (name, reply)
        assert "No space left on device" in reply[3], (name, reply)
    server.wal.wal.close()
    # the refused ACKs really were not applied: those ten messages are all still there
    assert {f"m{i}" for i in range(10)} <= {m.id for m in replayed_state(tmp_path / "data").live_messages()}


# -- MemoryError while appending: held, retried in order, never half a record ---------------------
async def test_a_memory_error_while_appending_holds_the_batch_and_retries_it(tmp_path):
    config = Config(port=0, http_port=0, data_dir=str(tmp_path), fsync="always")
    wal = WriteAheadLog(str(tmp_path), fsync="never")
    list(wal.open())
    state = BrokerState()
    state.enable_log()
    state.connect(1)
    dur = Durability(wal, state, config)
    real_append = wal.append
    failures = {"left": 3}

    def flaky_append(t, data):
        if failures["left"]:
            failures["left"] -= 1
            raise MemoryError
        return real_append(t, data)

    wal.append = flaky_append
    released = []
    async with trio.open_nursery() as nursery:
        await nursery.start(dur.run)
        for i in range(5):
            commands.handle(state, 1, [wire.OP_PUBLISH, i, "q", b"x", f"m{i}", 0, None], 1.0)
        records = state.take_records()
        dur.submit(records, {1: [[wire.OP_OK, 9, "m"]]}, released.append)
        assert dur.failed is None and not released  # nothing promised yet
        with trio.fail_after(5):
            await dur.wait_durable(state.last_lsn)
        nursery.cancel_scope.cancel()
    assert dur.failed is None
    assert released == [{1: [[wire.OP_OK, 9, "m"]]}]
    assert wal.next_lsn - 1 == state.last_lsn == 5
    await dur.close()
    state2 = BrokerState()
    wal2 = WriteAheadLog(str(tmp_path), fsync="never")
    state2.replay(((r.lsn, r.type, cbor2.loads(r.payload)) for r in wal2.open()), 0.0)
    wal2.close()
    assert [m.id for m in state2.live_messages()] == [f"m{i}" for i in range(5)]


# -- fuzz: generated values in every field of every op ----------------------------------------------
SAFE_TEXT = st.text(max_size=12).filter(lambda t: "healthy" not in t)
leaves = st.one_of(
    st.none(), st.booleans(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.sampled_from([2**63, 2**64, 2**64 - 1, -(2**63) - 1, 10**400]),
    st.floats(allow_nan=True, allow_infinity=True),
    SAFE_TEXT, st.binary(max_size=16),
    st.sampled_from(["\r\nEND\r\n", "\x00", "q", "fz", "celery", "SUCCESS", "FAILURE", "*"]),
)
values = st.recursive(
    leaves,
    lambda inner: st.one_of(
        st.lists(inner, max_size=4),
        st.dictionaries(st.one_of(SAFE_TEXT, st.integers(-3, 3)), inner, max_size=4),
        st.builds(cbor2.CBORTag, st.sampled_from([0, 1, 2, 3, 4, 30, 35, 37, 100, 258, 260, 1004, 55799, 999]), inner),
    ),
    max_leaves=12,
)
# One plausible frame per op; the fuzzer replaces some fields with generated values.
TEMPLATES = {
    wire.OP_PUBLISH: ["fz", b"body", "id1", 3, {"delay": 0.01, "ttl": 60, "headers": {"a": 1}}],
    wire.OP_CONSUME: [["fz"], 5],
    wire.OP_CANCEL: [1],
    wire.OP_ACK: [[1, 2]],
    wire.OP_NACK: [1, True, 0.5, {"h": 1}],
    wire.OP_TOUCH: [1],
    wire.OP_DECLARE: ["fz2", {"max_length": 10, "overflow": "reject", "max_attempts": 3, "reserve_timeout": 5}],
    wire.OP_DELETE: ["fz3"],
    wire.OP_STATS: [None],
    wire.OP_PURGE: ["fz"],
    wire.OP_PAUSE: ["fz4"],
    wire.OP_RESUME: ["fz4"],
    wire.OP_PING: [],
    wire.OP_RESULT_SET: ["t1", "SUCCESS", {"v": [1, 2]}, {"m": 1}, {"ttl": 60}],
    wire.OP_RESULT_GET: ["t1", 0],
    wire.OP_RESULT_FORGET: ["t1"],
    wire.OP_SCHEDULE_PUT: ["s1", {"task": "x.y", "every": 30, "queue": "fz", "args": [1]}],
    wire.OP_SCHEDULE_REMOVE: ["s1"],
    wire.OP_SCHEDULE_LIST: [None],
    wire.OP_SCHEDULE_PAUSE: ["s1", True],
    wire.OP_REVOKE: [["t1", "t2"], {"terminate": False, "ttl": 60}],
    wire.OP_CHORD: ["c1", ["t1", "t2"], {"task": "x.body", "queue": "fz"}, None],
    wire.OP_CHORD_ADD: ["c1", ["t3"]],
    wire.OP_EMIT_EVENTS: ["host-1", [{"type": "task-received", "uuid": "t1", "name": "x", "timestamp": 1.0}]],
    wire.OP_SUBSCRIBE: [False, 0],
    wire.OP_TASK_INFO: ["t1"],
    wire.OP_WORKERS: [],
    wire.OP_CONTROL_REQUEST: ["ping", {"a": 1}, {"timeout": 0.01}],
    wire.OP_CONTROL_REPLY: [1, {"ok": 1}],
}


@st.composite
def hostile_frames(draw):
    op = draw(st.sampled_from(sorted(TEMPLATES)))
    fields = list(TEMPLATES[op])
    for i in range(len(fields)):
        if draw(st.integers(0, 2)) == 0:
            fields[i] = draw(values)
    if draw(st.integers(0, 5)) == 0:
        fields.append(draw(values))
    if draw(st.integers(0, 6)) == 0 and fields:
        fields.pop()
    return [op, draw(st.integers(1, 2**31))] + fields


def encode_or_none(frame):
    try:
        return wire.encode(frame)
    except Exception:
        return None


@settings(max_examples=400, deadline=None)
@given(st.lists(hostile_frames(), min_size=1, max_size=6))
def test_fuzzed_frames_never_break_the_state_or_its_log_records(frames):
    state = BrokerState()
    state.enable_log()
    state.connect(1)
    state.connect(2)
    commands.handle(state, 2, [wire.OP_CONSUME, 1, ["fz"], 3], 0.0)
    now = 1000.0
    for frame in frames:
        data = encode_or_none(frame)
        if data is None:
            continue
        reader = wire.FrameReader()
        reader.feed(data)
        try:
            decoded = reader.frames()
        except wire.WireError:
            continue  # refused by the codec: the connection closes, nothing else happens
        for f in decoded:
            reply = commands.handle(state, 1, f, now)
            assert reply is None or reply[0] in (wire.OP_OK, wire.OP_ERROR)
            if reply is not None and reply[0] == wire.OP_ERROR:
                assert reply[2] in wire.ERROR_CODES and reply[2] != "INTERNAL", reply
            wire.encode(reply) if reply is not None else None
        now += 0.5
        state.tick(now)
        for rtype, payload in state.take_records():
            cbor2.dumps(payload)  # every record the log will get can be written
        for box in state.take_outbox().values():
            wire.encode_many(box)  # every frame another client will get can be sent
        state.check_invariants()


def test_fuzzed_frames_against_a_real_brokerd_cost_only_their_connection(broker):
    """60 generated attacks, each on its own connection, while a healthy client publishes with
    confirms; then a restart: every confirmed message is there and the log never failed."""
    confirmed: list[str] = []

    @settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
    @given(frames=st.lists(hostile_frames(), min_size=1, max_size=4))
    def attack(frames):
        healthy = Raw(broker.port)
        attacker = Raw(broker.port)
        try:
            try:
                for frame in frames:
                    data = encode_or_none(frame)
                    if data is not None:
                        attacker.send_raw(data)
                attacker.send([wire.OP_PING, 1])
                while True:
                    f = attacker.pending.pop(0) if attacker.pending else None
                    if f is None:
                        attacker._read(5.0)
                        continue
                    if f[0] == wire.OP_CLOSING:
                        assert f[1] != "INTERNAL", f
                        break
                    if f[0] == wire.OP_ERROR:
                        assert f[2] != "INTERNAL", f
                    if f[0] == wire.OP_OK and f[1] == 1:
                        break
            except (ConnectionError, OSError):
                pass
            mid = f"h{len(confirmed)}"
            assert healthy.ok(wire.OP_PUBLISH, "healthy", b"h", mid, 0, None) == mid
            confirmed.append(mid)
        finally:
            attacker.close()
            healthy.close()
        assert broker.proc.poll() is None, "\n".join(broker.log[-30:])

    attack()
    assert len(confirmed) >= 50, len(confirmed)  # hypothesis ran the examples
    assert re.search(r"wal_state +ok\r\n", broker.admin("STATS\n"))
    broker.terminate()
    broker.restart()
    r = Raw(broker.port)
    ready = r.ok(wire.OP_STATS, "healthy")["ready"]
    r.ok(wire.OP_CONSUME, ["healthy"], max(ready, 1))
    got = {f[4] for f in r.deliveries(ready)}
    assert set(confirmed) <= got
