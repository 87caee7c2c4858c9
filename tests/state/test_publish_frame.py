"""A PUBLISH_BATCH frame whose every item is plain is logged as it came (issue 18: the received
publish bytes, no re-encoding): one PUBLISH_FRAME record holding the frame's bytes and one
PUBLISH_NEXT record per further item, one lsn per message as before.  Replay, a spilled body's
read-back and a frame that is not all plain must all come out as if each item had its PUBLISH.
The pure state and handlers, the records round-tripped through CBOR as the log does."""

import cbor2
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from broker.errors import LogFailed
from broker.handlers.binary import handle
from broker.state import BrokerState
from broker.state import log_records as R
from client.wire import OP_CONSUME, OP_DELIVER, OP_PUBLISH, OP_PUBLISH_BATCH, RawFrame

QUEUES = ("q", "r")


def fresh() -> BrokerState:
    s = BrokerState(boot_id="b")
    s.enable_log()
    s.connect(1)
    for name in QUEUES:  # the fast path needs the queue to exist (a new one takes publish's path)
        s.queue(name)
    return s


def publish_frame(s: BrokerState, items: list, rid: int = 7, now: float = 1.0, raw: bool = True) -> list:
    """``items`` as the broker's FrameReader hands a PUBLISH_BATCH over: decoded, with its bytes."""
    data = cbor2.dumps([OP_PUBLISH_BATCH, rid, items])
    f = cbor2.loads(data)
    if raw:
        f.append(RawFrame(data))
    return handle(s, 1, f, now)


class Log:
    """What the log holds: records by lsn, payloads as CBOR bytes (WriteAheadLog.read_payloads)."""

    def __init__(self):
        self.records: dict[int, tuple[int, bytes]] = {}

    def take(self, s: BrokerState) -> list:
        out = []
        for t, p in s.take_records():
            lsn = len(self.records) + 1
            self.records[lsn] = (t, cbor2.dumps(p))
            out.append(t)
        assert len(self.records) == s.last_lsn  # one lsn per record, the state's count
        return out

    def replay_records(self):
        return [(lsn, t, cbor2.loads(p)) for lsn, (t, p) in sorted(self.records.items())]

    def read(self, lsns):
        return {n: self.records[n] for n in lsns}


def queued(s: BrokerState, conn: int = 9) -> dict:
    """Every ready message, per queue in delivery order: (id, body, priority)."""
    s.connect(conn)
    out = {}
    for i, name in enumerate(QUEUES + ("new",)):
        if name not in s.queues:
            continue
        handle(s, conn, [OP_CONSUME, 100 + i, [name], 10_000], 5.0)
    for f in s.take_outbox().get(conn, []):
        if f[0] == OP_DELIVER:
            out.setdefault(f[3], []).append((f[4], f[5], f[6]))
    return out


def replayed(log: Log, body_reader: bool = False) -> BrokerState:
    s = BrokerState(boot_id="b2")
    if body_reader:
        s.set_body_reader(log.read)
    s.replay(log.replay_records(), 2.0)
    s.enable_log()
    return s


def test_a_plain_frame_is_logged_as_it_came_one_lsn_per_message():
    s, log = fresh(), Log()
    items = [[QUEUES[i % 2], bytes([i]) * (10 + i), f"id-{i}", i % 3 or None, {"dedupe": f"k{i}"} if i % 2 else None]
             for i in range(5)]
    first = s.last_lsn + 1
    assert publish_frame(s, items)[1:] == [7, None]  # every item stored under its id
    types = log.take(s)
    assert types == [R.PUBLISH_FRAME] + [R.PUBLISH_NEXT] * 4
    t, payload = log.records[first]
    seq, ts, data = cbor2.loads(payload)
    assert (seq, ts) == (first, 1.0)
    assert data == cbor2.dumps([OP_PUBLISH_BATCH, 7, items])  # the bytes as received, not re-encoded
    assert [cbor2.loads(log.records[first + k][1]) for k in range(1, 5)] == [1, 2, 3, 4]
    live = queued(s)
    again = replayed(log)
    assert queued(again) == live
    assert live["q"][0][0] == "id-2" and ("id-0", bytes([0]) * 10, 0) in live["q"]  # priority 2 first


def test_the_reply_is_the_batchs_own():
    s = fresh()
    reply = publish_frame(s, [["q", b"a", "x", 0, None], ["r", b"b", "y", 0, None]])
    assert reply[1] == 7 and reply[2] is None  # every item stored under its id: nothing to tell


def test_without_the_bytes_or_with_an_item_off_the_plain_path_each_item_gets_its_publish():
    s, log = fresh(), Log()
    publish_frame(s, [["q", b"a", "x", 0, None]], raw=False)  # a caller without the frame's bytes
    assert log.take(s) == [R.PUBLISH]
    # item 1 has a delay (publish's own path), item 2 a queue not made yet: PUBLISH records, in order
    publish_frame(s, [["q", b"b", "y", 0, None], ["q", b"c", "z", 0, {"delay": 5}],
                      ["new", b"d", "w", 0, None], ["r", b"e", "v", 0, None]])
    types = log.take(s)
    assert R.PUBLISH_FRAME not in types and types.count(R.PUBLISH) == 4
    assert queued(replayed(log)) == queued(s)


def test_a_resend_the_window_holds_is_dropped_and_the_rest_are_published_one_by_one():
    s, log = fresh(), Log()
    publish_frame(s, [["q", b"a", "x", 0, {"dedupe": "k"}]])
    log.take(s)
    publish_frame(s, [["q", b"b", "y", 0, None], ["q", b"a", "x2", 0, {"dedupe": "k"}], ["q", b"c", "z", 0, None]])
    assert log.take(s) == [R.PUBLISH, R.PUBLISH]  # the resend stores nothing
    assert [m[0] for m in queued(s)["q"]] == ["x", "y", "z"]


def test_replay_keeps_the_frames_resend_keys():
    s, log = fresh(), Log()
    publish_frame(s, [["q", b"a", "x", 0, {"dedupe": "k1"}], ["q", b"b", "y", 0, {"dedupe": "k2"}]])
    log.take(s)
    again = replayed(log)
    again.connect(1)
    reply = handle(again, 1, [OP_PUBLISH, 3, "q", b"b", "y-resent", 0, {"dedupe": "k2"}], 3.0)
    assert reply[2] == "y"  # the resend gets the first one's id back
    assert [m[0] for m in queued(again)["q"]] == ["x", "y"]


def test_a_spilled_message_of_a_frame_reads_its_body_back_from_the_frames_bytes():
    s, log = fresh(), Log()
    items = [["q", bytes([i]) * 50, f"id-{i}", 0, None] for i in range(20)]
    publish_frame(s, items)
    log.take(s)
    s.set_body_reader(log.read)
    got = s._read_bodies([3, 2, 20])  # NEXT records, their frame read once
    assert got == {2: ("id-1", bytes([1]) * 50), 3: ("id-2", bytes([2]) * 50), 20: ("id-19", bytes([19]) * 50)}
    got = s._read_bodies([1])  # the frame's own item
    assert got == {1: ("id-0", bytes([0]) * 50)}
    # replayed with the bodies left in the log, every one comes back byte-identical
    again = replayed(log, body_reader=True)
    assert queued(again)["q"] == [(f"id-{i}", bytes([i]) * 50, 0) for i in range(20)]


def test_a_next_record_whose_frame_is_something_else_fails_the_log():
    s, log = fresh(), Log()
    publish_frame(s, [["q", b"a", "x", 0, None], ["q", b"b", "y", 0, None]])
    log.take(s)
    log.records[1] = (R.PUBLISH, log.records[1][1])  # not the frame the NEXT names
    s.set_body_reader(log.read)
    with pytest.raises(LogFailed):
        s._read_bodies([2])
    assert "PUBLISH_FRAME" in s.log_failed


def test_replay_of_a_next_without_its_frame_says_which():
    s, log = fresh(), Log()
    publish_frame(s, [["q", b"a", "x", 0, None], ["q", b"b", "y", 0, None]])
    log.take(s)
    records = log.replay_records()[1:]  # its frame lost
    with pytest.raises(ValueError, match="PUBLISH_FRAME at lsn 1"):
        BrokerState(boot_id="x").replay(records, 2.0)


plain_item = st.tuples(
    st.sampled_from(QUEUES + ("new",)),  # "new": not made yet, publish's own path
    st.binary(max_size=40),
    st.one_of(st.none(), st.integers(0, 9), st.just(300)),  # 300: publish refuses it
    st.one_of(st.none(), st.sampled_from(["a", "b", "c", "d"]).map(lambda k: {"dedupe": k}),
              st.just({"headers": {"h": 1}})),
)


@settings(max_examples=150, deadline=None)
@given(st.lists(st.lists(plain_item, min_size=1, max_size=8), min_size=1, max_size=6), st.booleans())
def test_replay_rebuilds_what_the_frames_stored_whatever_they_hold(frames, spilled):
    """Any mix of frames, plain or not (resends, refusals, new queues, options): the replayed
    state delivers exactly what the live one does, bodies byte-identical, read from the log."""
    s, log = fresh(), Log()
    n = 0
    for rid, frame in enumerate(frames, 1):
        items = []
        for queue, body, priority, opts in frame:
            items.append([queue, body, f"id-{n}", priority, opts])
            n += 1
        publish_frame(s, items, rid=rid, now=float(rid))
        log.take(s)
    again = replayed(log, body_reader=spilled)
    live = queued(s)
    assert queued(again) == live
