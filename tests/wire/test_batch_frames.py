"""The batched frames of protocol version 2 in the codec (protocol.md §5.46-5.48, client/wire.py):
PUBLISH_BATCH, CONFIRM_RANGE and DELIVER_BATCH round-trip, and ``encode_batched`` (what a
version-2 connection's output goes through) says exactly what the unbatched frames said."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from client import wire

texts = st.text(max_size=12)
ids = st.text(min_size=1, max_size=20)
bodies = st.binary(max_size=64)
headers = st.none() | st.dictionaries(st.text(max_size=8), st.integers(-5, 5) | st.text(max_size=8), max_size=3)
options = st.none() | st.fixed_dictionaries({}, optional={"ttl": st.integers(0, 10**6), "delay": st.floats(0, 100),
                                                          "headers": headers})
publish_items = st.lists(st.tuples(texts, bodies, st.none() | ids, st.integers(0, 255), options).map(list),
                         min_size=1, max_size=20)


def decode(data: bytes) -> list:
    r = wire.FrameReader(1 << 30)
    r.feed(data)
    frames = r.frames()
    assert r.buffered == 0
    return frames


@given(rid=st.integers(1, 2**63 - 1), items=publish_items)
def test_a_publish_batch_round_trips_through_the_codec(rid, items):
    frame = [wire.OP_PUBLISH_BATCH, rid, items]
    assert decode(wire.encode(frame)) == [frame]


@given(first=st.integers(1, 2**40), span=st.integers(0, 2**20))
def test_a_confirm_range_round_trips(first, span):
    frame = [wire.OP_CONFIRM_RANGE, first, first + span]
    assert decode(wire.encode(frame)) == [frame]


def deliver(consumer, tag):
    return [wire.OP_DELIVER, consumer, tag, "q", f"m-{tag}", b"x" * (tag % 7), tag % 3, 1, None]


# A connection's output for one flush: DELIVERs to a few consumers, held publish confirms
# (one-rid CONFIRM_RANGE markers, as the read loop makes them), ERRORs, OKs of other requests.
@st.composite
def outputs(draw):
    frames = []
    rid = draw(st.integers(1, 1000))
    tag = 1
    for kind in draw(st.lists(st.sampled_from(["deliver", "confirm", "error", "ok"]), max_size=60)):
        if kind == "deliver":
            frames.append(deliver(draw(st.integers(1, 3)), tag))
            tag += 1
        else:
            rid += draw(st.integers(1, 3))  # rising request ids, with other requests' ids between
            if kind == "confirm":
                frames.append([wire.OP_CONFIRM_RANGE, rid, rid])
            elif kind == "error":
                frames.append([wire.OP_ERROR, rid, "QUEUE_FULL", "full"])
            else:
                frames.append([wire.OP_OK, rid, 3])
    return frames


def unbatch(sent: list, markers: list) -> list:
    """What ``sent`` means, written as the frames it replaced: each DELIVER_BATCH as its DELIVERs,
    each CONFIRM_RANGE as the markers (from the input) whose rid it covers."""
    out = []
    for f in sent:
        if f[0] == wire.OP_DELIVER_BATCH:
            out += [[wire.OP_DELIVER, f[1], *item] for item in f[2]]
        elif f[0] == wire.OP_CONFIRM_RANGE:
            out += [m for m in markers if f[1] <= m[1] <= f[2]]
        else:
            out.append(f)
    return out


@settings(max_examples=300)
@given(frames=outputs())
def test_batched_output_says_exactly_what_the_frames_said_in_the_same_order(frames):
    sent = decode(wire.encode_batched(frames))
    markers = [f for f in frames if f[0] == wire.OP_CONFIRM_RANGE]
    assert unbatch(sent, markers) == frames
    # no frame is batched alone, and nothing is sent twice
    assert all(len(f[2]) >= 2 for f in sent if f[0] == wire.OP_DELIVER_BATCH)
    assert len(sent) <= len(frames)


@settings(max_examples=300)
@given(frames=outputs())
def test_an_error_always_comes_before_any_range_that_spans_its_request_id(frames):
    # The promise of §5.47 a client relies on to read a range as "every publish in it not
    # otherwise answered": no ERROR for a request id inside a range arrives after that range.
    sent = decode(wire.encode_batched(frames))
    for i, f in enumerate(sent):
        if f[0] == wire.OP_CONFIRM_RANGE:
            later_errors = [g[1] for g in sent[i + 1:] if g[0] == wire.OP_ERROR]
            assert not [r for r in later_errors if f[1] <= r <= f[2]], (f, later_errors)


def test_runs_join_into_one_frame_each():
    frames = [deliver(1, 1), deliver(1, 2), deliver(2, 3), [wire.OP_CONFIRM_RANGE, 4, 4],
              [wire.OP_CONFIRM_RANGE, 6, 6], [wire.OP_ERROR, 7, "QUEUE_FULL", "full"], [wire.OP_CONFIRM_RANGE, 8, 8]]
    assert decode(wire.encode_batched(frames)) == [
        [wire.OP_DELIVER_BATCH, 1, [deliver(1, 1)[2:], deliver(1, 2)[2:]]],
        deliver(2, 3),
        [wire.OP_CONFIRM_RANGE, 4, 6],
        [wire.OP_ERROR, 7, "QUEUE_FULL", "full"],
        [wire.OP_CONFIRM_RANGE, 8, 8],
    ]


def test_markers_with_falling_request_ids_are_not_joined():
    # A client that reuses or lowers ids gets one range per publish rather than a wrong interval.
    frames = [[wire.OP_CONFIRM_RANGE, 9, 9], [wire.OP_CONFIRM_RANGE, 5, 5]]
    assert decode(wire.encode_batched(frames)) == frames


def test_frames_without_runs_are_encoded_as_version_1_encodes_them():
    frames = [[wire.OP_OK, 1, None], deliver(1, 1), [wire.OP_EVENT, [], 0], deliver(2, 2)]
    assert wire.encode_batched(frames) == wire.encode_many(frames)


def test_the_brokers_reader_keeps_a_publish_batchs_bytes_and_nothing_else():
    import cbor2

    from client.wire import OP_PING, OP_PUBLISH_BATCH, FrameReader, RawFrame, encode_many

    batch = [OP_PUBLISH_BATCH, 3, [["q", b"x", "id", 0, None]]]
    forged = [OP_PUBLISH_BATCH, 4, [["q", b"y", "id2", 0, None]], b"not the frame"]  # a 4th field of bytes
    reader = FrameReader(keep_raw=True)
    reader.feed(encode_many([batch, [OP_PING, 5], forged]))
    got = reader.frames()
    assert got[0][:3] == batch and type(got[0][-1]) is RawFrame and got[0][-1] == cbor2.dumps(batch)
    assert got[1] == [OP_PING, 5]  # other ops: as decoded
    assert type(got[2][3]) is bytes and type(got[2][-1]) is RawFrame  # what a client sends is never a RawFrame
    assert got[2][-1] == cbor2.dumps(forged)
    plain = FrameReader()
    plain.feed(encode_many([batch]))
    assert plain.frames() == [batch]  # a client's reader: no bytes kept
