"""The session on protocol version 2 (protocol.md §5.46-5.48), driven by hand: pipelined publishes go
out as PUBLISH_BATCH frames, CONFIRM_RANGE and partial batch answers settle exactly the publishes they
name, DELIVER_BATCH becomes deliveries; on version 1 nothing changes."""

from __future__ import annotations

import pytest

from client import wire
from client.errors import PublishError
from client.session import CONFIRMS, FLUSH, FLUSH_BYTES, Session
from tests.client.test_client_session import Owner, sent_frames


def handshaken(version: int) -> Session:
    s = Session(Owner(), name="unit", heartbeat=10.0, now=100.0, id_prefix="p")
    s.hello()
    sent_frames(s)
    s.receive([[wire.OP_OK, 1, {"server": "brokerd", "version": version, "heartbeat": 10.0}]], 100.0)
    assert s.version == version
    return s


def test_on_version_2_pipelined_publishes_go_out_as_one_batch_in_order():
    s = handshaken(2)
    ids = [s.publish("q", b"%d" % i, None, 0, None, confirm=False)[1] for i in range(5)]
    (f,) = sent_frames(s)
    assert f == [wire.OP_PUBLISH_BATCH, 2, [["q", b"%d" % i, ids[i], 0, None] for i in range(5)]]
    assert s.unconfirmed_ids() == ids


def test_on_version_1_pipelined_publishes_stay_single_frames():
    s = handshaken(1)
    for i in range(3):
        s.publish("q", b"x", f"m{i}", 0, None, confirm=False)
    assert [f[0] for f in sent_frames(s)] == [wire.OP_PUBLISH] * 3


def test_another_request_closes_the_batch_first_so_requests_keep_their_order():
    s = handshaken(2)
    s.publish("q", b"a", "m1", 0, None, confirm=False)
    s.request(wire.OP_PURGE, ["q"])
    s.publish("q", b"b", "m2", 0, None, confirm=False)
    frames = sent_frames(s)
    assert [(f[0], f[1]) for f in frames] == [(wire.OP_PUBLISH_BATCH, 2), (wire.OP_PURGE, 3), (wire.OP_PUBLISH_BATCH, 4)]


def test_a_batch_closes_near_flush_bytes_and_asks_to_be_flushed():
    s = handshaken(2)
    body = b"x" * 1000
    n = 0
    while not s.wants_flush:
        s.publish("q", body, None, 0, None, confirm=False)
        n += 1
    frames = sent_frames(s)
    assert sum(len(f[2]) for f in frames) == n
    assert all(len(wire.encode(f)) <= FLUSH_BYTES + 100 for f in frames)


def test_a_body_too_large_for_a_batch_goes_alone_and_is_refused_by_size():
    s = handshaken(2)
    s.max_frame = 2000
    with pytest.raises(Exception, match="larger than the broker's max_frame"):
        s.publish("q", b"x" * 3000, None, 0, None, confirm=False)


def test_a_confirm_range_settles_exactly_the_publishes_it_spans():
    s = handshaken(2)
    s.publish("q", b"a", "m1", 0, None, confirm=False)
    sent_frames(s)  # batch rid 2
    s.publish("q", b"b", "m2", 0, None, confirm=False)
    sent_frames(s)  # batch rid 3
    s.publish("q", b"c", "m3", 0, None, confirm=False)
    sent_frames(s)  # batch rid 4
    wake = s.receive([[wire.OP_CONFIRM_RANGE, 2, 3]], 100.0)
    assert CONFIRMS in wake
    assert s.unconfirmed_ids() == ["m3"]
    assert not s.confirmed_through(4) and s.confirmed_through(3)
    s.receive([[wire.OP_CONFIRM_RANGE, 4, 4]], 100.0)
    assert s.unconfirmed_ids() == []


def test_a_range_leaves_an_older_unanswered_publish_waiting():
    s = handshaken(2)
    for mid in ("m1", "m2", "m3"):
        s.publish("q", b"x", mid, 0, None, confirm=False)
        sent_frames(s)
    s.receive([[wire.OP_CONFIRM_RANGE, 3, 4]], 100.0)
    assert s.unconfirmed_ids() == ["m1"]


def test_a_waiting_publish_gets_its_id_from_a_range():
    s = handshaken(2)
    p, mid = s.publish("q", b"x", None, 0, None)
    (f,) = sent_frames(s)
    assert f[0] == wire.OP_PUBLISH
    wake = s.receive([[wire.OP_CONFIRM_RANGE, f[1], f[1]]], 100.0)
    assert p in wake and p.done and p.result == mid and p.error is None
    assert not s.pending and not s.publish_waiters


def test_a_partly_refused_batch_names_exactly_the_refused_ids():
    s = handshaken(2)
    for mid in ("m1", "m2", "m3"):
        s.publish("q", b"x", mid, 0, None, confirm=False)
    (f,) = sent_frames(s)
    s.receive([[wire.OP_OK, f[1], ["m1", ["QUEUE_FULL", "item 1: queue 'q' is full"], "m3"]]], 100.0)
    assert s.unconfirmed_ids() == []
    with pytest.raises(PublishError) as info:
        s.raise_refused()
    ((mid, exc),) = info.value.failures
    assert mid == "m2" and exc.code == "QUEUE_FULL" and "item 1" in str(exc)


def test_a_batch_refused_whole_names_every_id():
    s = handshaken(2)
    for mid in ("m1", "m2"):
        s.publish("q", b"x", mid, 0, None, confirm=False)
    (f,) = sent_frames(s)
    s.receive([[wire.OP_ERROR, f[1], "ACCESS_REFUSED", "no"]], 100.0)
    assert [mid for mid, _ in s.take_refused()] == ["m1", "m2"]


def test_a_deliver_batch_becomes_deliveries_in_order():
    s = handshaken(2)
    p = s.consume(["q"], 10)
    sent_frames(s)
    s.receive([[wire.OP_OK, p.rid, 7]], 100.0)
    cs = p.consumer
    wake = s.receive([[wire.OP_DELIVER_BATCH, 7, [[1, "q", "a", b"1", 0, 1, None], [2, "q", "b", b"2", 3, 2, {"h": 1}]]]], 100.0)
    assert cs in wake
    got = list(cs.buffer)
    assert [(d.tag, d.id, d.body, d.priority, d.attempts, d.headers) for d in got] == [
        (1, "a", b"1", 0, 1, None), (2, "b", b"2", 3, 2, {"h": 1})]
    assert cs.received == 2


def test_a_deliver_batch_for_a_cancelled_consumer_is_given_back():
    s = handshaken(2)
    wake = s.receive([[wire.OP_DELIVER_BATCH, 9, [[1, "q", "a", b"1", 0, 1, None], [2, "q", "b", b"2", 0, 1, None]]]], 100.0)
    assert FLUSH in wake
    assert [(f[0], f[2]) for f in sent_frames(s)] == [(wire.OP_NACK, 1), (wire.OP_NACK, 2)]


@pytest.mark.parametrize("frame", [[wire.OP_DELIVER_BATCH, 7, "x"], [wire.OP_DELIVER_BATCH, 7, [[1, "q"]]],
                                   [wire.OP_CONFIRM_RANGE, "a", 2], [wire.OP_CONFIRM_RANGE, 1]])
def test_a_malformed_batch_frame_from_the_broker_is_a_protocol_error(frame):
    s = handshaken(2)
    with pytest.raises(Exception) as info:
        s.receive([frame], 100.0)
    assert getattr(info.value, "code", None) == "BAD_FRAME"


def test_a_batch_over_a_tiny_max_frame_goes_item_by_item_and_refuses_only_what_cannot_fit():
    # The size estimate counts characters; long non-ASCII ids under the smallest max_frame (1024 in
    # brokerd; smaller here) can still overflow it: then no frame sent is ever larger than max_frame.
    s = handshaken(2)
    s.max_frame = 200 + wire.HEADER_SIZE
    ids = ["é" * 80, "é" * 40, "é" * 120, "plain"]
    for mid in ids:
        s.publish("q", b"x", mid, 0, None, confirm=False)
    data = s.data_to_send(100.0)
    r = wire.FrameReader()
    r.feed(data)
    frames = r.frames()
    sizes = []
    pos = 0
    while pos < len(data):
        n = int.from_bytes(data[pos:pos + 4], "big")
        sizes.append(n + 4)
        pos += n + 4
    assert max(sizes) <= s.max_frame
    sent = [mid for f in frames for mid in ([f[4]] if f[0] == wire.OP_PUBLISH else [item[2] for item in f[2]])]
    refused = [mid for mid, _ in s.take_refused()]
    assert refused == ["é" * 120]  # alone it needs more than 200 bytes
    assert sorted(sent) == sorted(set(ids) - set(refused))
    assert s.unconfirmed_ids() == [mid for mid in ids if mid not in refused]
    assert [f[1] for f in frames] == sorted(f[1] for f in frames)  # request ids still rise


def test_with_resends_a_batch_is_kept_item_by_item_and_forgotten_once_confirmed_by_range():
    import itertools

    s = Session(Owner(), name="unit", heartbeat=10.0, now=100.0, id_prefix="p", ids=itertools.count(1))
    s.hello()
    sent_frames(s)
    s.receive([[wire.OP_OK, 1, {"server": "brokerd", "version": 2, "heartbeat": 10.0}]], 100.0)
    for i in range(3):
        s.publish("q", b"%d" % i, None, 0, None, confirm=False)
    s.confirm_mark()
    (f,) = sent_frames(s)
    keys = [item[4]["dedupe"] for item in f[2]]
    assert len(set(keys)) == 3
    # connection lost before the confirm: all three are resent, each with its own key
    resends = s.take_resends()
    assert [r[1] for r in resends] == [b"0", b"1", b"2"]
    assert [r[4]["dedupe"] for r in resends] == keys

    # confirmed by a range: nothing is kept for a resend any more
    s2 = Session(Owner(), name="unit", heartbeat=10.0, now=100.0, id_prefix="p", ids=itertools.count(10))
    s2.hello()
    sent_frames(s2)
    s2.receive([[wire.OP_OK, 1, {"server": "brokerd", "version": 2, "heartbeat": 10.0}]], 100.0)
    s2.publish("q", b"a", None, 0, None, confirm=False)
    rid = s2.confirm_mark()
    s2.receive([[wire.OP_CONFIRM_RANGE, rid, rid]], 100.0)
    assert s2.sent == {} and s2.take_resends() == []


def test_with_dedupe_keys_the_batch_size_estimate_still_bounds_the_real_frame():
    # Session.publish counts a {"dedupe": key} it made itself without encoding it: the count must
    # never fall below the bytes the item really takes, or a batch could outgrow its frame.
    import itertools

    from hypothesis import given, settings
    from hypothesis import strategies as st

    @settings(max_examples=60, deadline=None)
    @given(bodies=st.lists(st.binary(max_size=300), min_size=1, max_size=40),
           queue=st.text(st.characters(max_codepoint=127), min_size=1, max_size=40),
           start=st.sampled_from([1, 23, 24, 10**6, 10**12]))
    def check(bodies, queue, start):
        s = Session(Owner(), name="unit", heartbeat=10.0, now=100.0, id_prefix="p" * 30,
                    ids=itertools.count(start))
        s.hello()
        sent_frames(s)
        s.receive([[wire.OP_OK, 1, {"server": "brokerd", "version": 2, "heartbeat": 10.0}]], 100.0)
        for b in bodies:
            s.publish(queue, b, None, 0, None, confirm=False)
        assert all(type(item[4]) is dict and "dedupe" in item[4] for item in s.batch)
        real = len(wire._dumps([wire.OP_PUBLISH_BATCH, 10**6, s.batch]))
        assert s.batch_bytes >= real
        # ... and the options' part alone is counted in full: at least their encoded size each
        counted = sum(len(q) + len(b) + len(m) + 24 + len(wire._dumps(o)) for q, b, m, _, o in s.batch)
        assert s.batch_bytes >= counted

    check()
