"""Checkpoints: a restart reads the log from the newest checkpoint, not from its first record.

A checkpoint (broker/state/replay.py "Checkpoints", log record type 33) writes the queues'
Packed blocks as arrays and the rest of the state as compaction does; the CHECKPOINT pointer
(broker/wal/format.py) is saved once those records are fsynced.  The promises: a replay from
the checkpoint rebuilds exactly what a replay of the whole log does; a crash at any byte of the
checkpoint (or of the pointer) recovers the same state; a log without a pointer still opens.
"""

import shutil

import cbor2

from broker.state import BrokerState
from broker.state import log_records as R
from broker.state.queue import Packed
from broker.wal import WriteAheadLog
from broker.wal.format import RECORD_HEADER, RECORD_HEADER_SIZE, SEGMENT_HEADER_SIZE
from tests.wal.test_durability import Rig, expected_at, live_set

P, C = 1, 2


def recover(directory, now=2000.0, use_checkpoint=True):
    """A restart as brokerd does it (bodies left in the log); returns (state, wal): the caller
    closes the wal once it has read what it wants (bodies are read back through it)."""
    wal = WriteAheadLog(str(directory), fsync="never")
    state = BrokerState()
    state.set_body_reader(wal.read_payloads)
    records = wal.open(use_checkpoint=use_checkpoint)
    state.replay(((r.lsn, r.type, cbor2.loads(r.payload)) for r in records), now, checkpoint=wal.replay_from)
    return state, wal


def picture(state):
    """Everything a restart must give back: each queue's ready messages in delivery order (id,
    body, priority, attempts), the delayed ones, the counters, and the dedupe window."""
    out = {}
    for name, q in sorted(state.queues.items()):
        out[name] = (
            [(m.id, m.body, m.priority, m.attempts) for m in q.iter_ready()],
            q.ready_count, q.delayed_count,
            [getattr(q, f) for f in R.COUNTER_FIELDS],
        )
    delayed = sorted((m.id, m.body) for _, _, m in state._delayed)
    return out, delayed, dict(state.dedupe._keys), sorted(state.results)


def checkpoint(rig, pointer=True):
    """What Durability does: append the checkpoint, write it, fsync, save the pointer."""
    first = rig.state.checkpoint()
    rig.commit()
    rig.wal.sync()
    if pointer:
        rig.wal.save_checkpoint(first)
    return first


def deep_workload(rig, n=300):
    """Two queues deep enough to pack (PACK_AFTER), three priorities, a dedupe key, a result,
    deliveries in flight and a delayed message."""
    s, now = rig.state, rig.now
    rig.op(s.declare, "deep", {"max_attempts": 3}, now)
    for i in range(n):
        s.publish(P, "deep", b"d%04d" % i, None if i % 3 else f"own-{i}", i % 3, now,
                  dedupe=f"k{i}" if i % 50 == 0 else None)
        s.publish(P, "other", b"o%04d" % i, None, 0, now)
        if i % 40 == 39:
            rig.commit()
    rig.op(s.publish, P, "later", b"late", "delayed-1", 0, now, delay=500.0)
    rig.op(s.result_set, P, "task-1", "SUCCESS", 42, None, now)
    rig.op(s.consume, C, ["other"], 5, now)  # five of "other" in flight


def test_a_restart_from_a_checkpoint_rebuilds_what_a_whole_replay_does(tmp_path):
    rig = Rig(tmp_path / "wal", segment_bytes=16 * 1024)  # several segments before the checkpoint
    deep_workload(rig)
    s, now = rig.state, rig.now
    assert any(type(b) is Packed for b in s.queues["deep"]._ready[2])  # the deep queue is packed
    first = checkpoint(rig)
    # After it: deliveries from the front of the blocks, acks, a nack back, new publishes, a
    # compaction copy of some block entries, a purge.
    rig.op(s.consume, C, ["deep"], 20, now)
    for tag in rig.tags[5:15]:
        rig.op(s.ack, C, tag, now)
    rig.op(s.nack, C, rig.tags[15], now)
    for i in range(30):
        rig.op(s.publish, P, "deep", b"after%d" % i, None, 1, now)
    rig.op(s.compact, s.last_lsn - 500)
    rig.op(s.publish, P, "gone", b"x", None, 0, now)
    rig.op(s.purge, "gone", now)
    rig.wal.close()

    whole, wal = recover(tmp_path / "wal", use_checkpoint=False)
    want = picture(whole)
    wal.close()
    fast, wal = recover(tmp_path / "wal")
    try:
        assert wal.replay_from == first
        assert wal.recovery.records == whole.last_lsn - first + 1  # the records before it were not read
        assert wal.recovery.segments >= 2 and wal._marks  # those before it marked for reading back, not parsed
        assert picture(fast) == want
        assert fast.last_lsn == whole.last_lsn
        # Delivery takes them in the same order, bodies read back from the segments
        fast.connect(C)
        fast.consume(C, ["deep"], 1000, now)
        delivered = [m.id for d in fast.inflight.values() for m in (d.msg,)]
        assert sorted(delivered) == sorted(i for i, *_ in want[0]["deep"][0])
        assert fast.queues["deep"].ready_count == 0
    finally:
        wal.close()


def crash_points(data: bytes, stride: int = 17) -> list[int]:
    """Where a crash can cut a segment that matters: at every record boundary, one byte into
    its header and one byte into its payload; and every ``stride``-th byte besides (inside
    headers and payloads, where every cut is alike).  Each cut is a full recovery, so
    every third byte of a checkpoint was ~4,500 recoveries and 85 s of the suite."""
    cuts = set(range(SEGMENT_HEADER_SIZE, len(data) + 1, stride))
    off = SEGMENT_HEADER_SIZE
    while off + RECORD_HEADER_SIZE <= len(data):
        for d in (0, 1, RECORD_HEADER_SIZE + 1):
            cuts.add(off + d)
        off += RECORD_HEADER_SIZE + RECORD_HEADER.unpack_from(data, off)[0]
    cuts.add(len(data))
    return sorted(c for c in cuts if SEGMENT_HEADER_SIZE <= c <= len(data))


def test_a_crash_at_every_byte_of_a_checkpoint_recovers_the_same_messages(tmp_path):
    rig = Rig(tmp_path / "wal", segment_bytes=1 << 20)
    deep_workload(rig, n=120)
    rig.wal.rotate()  # the checkpoint alone in the head segment: every byte of it is a cut
    live_before = live_set(rig.state)
    first = checkpoint(rig, pointer=False)
    rig.wal.close()
    head = sorted((tmp_path / "wal").glob("*.wal"))[-1]
    data = head.read_bytes()
    work = tmp_path / "work"
    checked = 0
    for cut in crash_points(data):
        shutil.rmtree(work, ignore_errors=True)
        shutil.copytree(tmp_path / "wal", work, ignore=shutil.ignore_patterns("LOCK"))
        (work / head.name).write_bytes(data[:cut])
        state, wal = recover(work)
        try:
            assert wal.replay_from is None  # no pointer yet: the whole log
            assert live_set(state) == live_before, f"cut at byte {cut} of the checkpoint"
        finally:
            wal.close()
        checked += 1
    assert checked > 100
    # The pointer saved, then a crash at every byte of a new one being written over it (the
    # temporary file, renamed only whole) or of the file itself: a damaged pointer is ignored.
    wal = WriteAheadLog(str(tmp_path / "wal"), fsync="never")
    list(wal.open())
    wal.save_checkpoint(first)
    wal.close()
    pointer = (tmp_path / "wal" / "CHECKPOINT").read_bytes()
    for cut in range(len(pointer)):
        shutil.rmtree(work, ignore_errors=True)
        shutil.copytree(tmp_path / "wal", work, ignore=shutil.ignore_patterns("LOCK"))
        (work / "CHECKPOINT").write_bytes(pointer[:cut])
        state, wal = recover(work)
        try:
            assert wal.replay_from is None
            assert live_set(state) == live_before, f"pointer cut at byte {cut}"
            if cut:
                assert any("ignoring CHECKPOINT" in w for w in wal.recovery.warnings)
        finally:
            wal.close()
    state, wal = recover(tmp_path / "wal")
    try:
        assert wal.replay_from == first
        assert live_set(state) == live_before
    finally:
        wal.close()


def test_a_crash_at_every_byte_after_a_checkpoint_recovers_exactly_the_complete_records(tmp_path):
    rig = Rig(tmp_path / "wal", segment_bytes=1 << 20)
    deep_workload(rig, n=100)
    checkpoint(rig)
    rig.wal.rotate()
    rig.history.clear()
    rig.history.append((0, live_set(rig.state)))
    s, now = rig.state, rig.now
    rig.op(s.consume, C, ["deep"], 3, now)
    rig.op(s.ack, C, rig.tags[5], now)
    rig.op(s.publish, P, "deep", b"tail", "t1", 0, now)
    rig.op(s.purge, "other", now)
    rig.wal.close()
    head = sorted((tmp_path / "wal").glob("*.wal"))[-1]
    data = head.read_bytes()
    wal = WriteAheadLog(str(tmp_path / "wal"), fsync="never")
    recs = [r for r in wal.open() if r.segment_name == head.name]
    wal.close()
    ends = {r.lsn: (recs[i + 1].offset if i + 1 < len(recs) else len(data)) for i, r in enumerate(recs)}
    work = tmp_path / "work"
    for cut in range(24, len(data) + 1):
        shutil.rmtree(work, ignore_errors=True)
        shutil.copytree(tmp_path / "wal", work, ignore=shutil.ignore_patterns("LOCK"))
        (work / head.name).write_bytes(data[:cut])
        complete = max([lsn for lsn, end in ends.items() if end <= cut], default=0)
        state, wal = recover(work)
        try:
            assert wal.replay_from is not None
            assert live_set(state) == expected_at(rig.history, complete), f"cut at byte {cut}"
        finally:
            wal.close()


def test_a_pointer_at_a_record_that_is_not_there_is_ignored_and_the_whole_log_read(tmp_path):
    rig = Rig(tmp_path / "wal")
    deep_workload(rig, n=80)
    first = checkpoint(rig)
    live_before = live_set(rig.state)
    rig.wal.close()
    pointer = (tmp_path / "wal" / "CHECKPOINT").read_text()
    from broker.wal.format import decode_checkpoint, encode_checkpoint

    good = decode_checkpoint(pointer.encode())
    for bad in (encode_checkpoint(good.lsn + 1, good.segment, good.offset, good.prefix, good.sums),
                encode_checkpoint(good.lsn, good.segment, good.offset + 1, good.prefix, good.sums),
                encode_checkpoint(good.lsn, "00000000000000999999.wal", good.offset, good.prefix, good.sums),
                b"brokerd-wal-checkpoint 1\nnonsense\n"):
        (tmp_path / "wal" / "CHECKPOINT").write_bytes(bad)
        state, wal = recover(tmp_path / "wal")
        try:
            assert wal.replay_from is None
            assert any("ignoring CHECKPOINT" in w for w in wal.recovery.warnings), bad
            assert live_set(state) == live_before
        finally:
            wal.close()
    # And a log written before checkpoints existed (no pointer): read whole, as always.
    (tmp_path / "wal" / "CHECKPOINT").unlink()
    state, wal = recover(tmp_path / "wal")
    try:
        assert wal.replay_from is None and not wal.recovery.warnings
        assert live_set(state) == live_before
    finally:
        wal.close()
    assert first


def test_a_damaged_byte_before_the_checkpoint_still_refuses_start_naming_where(tmp_path):
    """The records before the checkpoint are not parsed at start-up, but their bytes are checked
    (one CRC per file, recorded in the pointer): damage is corruption, named as a whole replay
    names it, and --repair (which reads the whole log) still works."""
    import pytest

    from broker.wal import CorruptLog

    rig = Rig(tmp_path / "wal", segment_bytes=16 * 1024)
    deep_workload(rig)
    checkpoint(rig)
    rig.wal.close()
    segs = sorted((tmp_path / "wal").glob("*.wal"))
    pointer = (tmp_path / "wal" / "CHECKPOINT").read_text()
    skipped = segs[0]  # wholly before the checkpoint
    assert f"sum {skipped.name}" in pointer and f"segment {skipped.name}" not in pointer
    holding = next(p for p in segs if f"segment {p.name}" in pointer)  # the checkpoint's own segment
    for victim, at in ((skipped, 5000), (holding, 100)):
        work = tmp_path / "work"
        shutil.rmtree(work, ignore_errors=True)
        shutil.copytree(tmp_path / "wal", work, ignore=shutil.ignore_patterns("LOCK"))
        data = bytearray((work / victim.name).read_bytes())
        data[at] ^= 0x40
        (work / victim.name).write_bytes(bytes(data))
        wal = WriteAheadLog(str(work), fsync="never")
        with pytest.raises(CorruptLog) as err:
            list(wal.open(use_checkpoint=True))
        assert victim.name in str(err.value) and err.value.offset <= at, str(err.value)
        wal = WriteAheadLog(str(work), fsync="never")
        list(wal.open(repair=True, use_checkpoint=True))  # repair reads the whole log
        assert wal.replay_from is None and wal.recovery.repaired
        wal.close()


def test_a_pointer_at_a_record_that_is_no_checkpoint_refuses_start_and_a_cut_log_drops_the_pointer(tmp_path):
    import pytest

    from broker.state.replay import NotACheckpoint

    rig = Rig(tmp_path / "wal")
    deep_workload(rig, n=80)
    first = checkpoint(rig)
    rig.op(rig.state.publish, P, "deep", b"tail", "t1", 0, rig.now)
    # A sound pointer (lsn at its offset, checksums right) at a record that begins no checkpoint
    rig.wal.sync()
    rig.wal.save_checkpoint(first + 1)
    rig.wal.close()
    with pytest.raises(NotACheckpoint, match=f"lsn {first + 1}, which is not the start of a checkpoint"):
        recover(tmp_path / "wal")
    # A follower cutting its log back (broker/runtime/replication.py) deletes the pointer first:
    # another brokerd's records take those lsns next.
    wal = WriteAheadLog(str(tmp_path / "wal"), fsync="never")
    list(wal.open())
    wal.save_checkpoint(first)
    assert (tmp_path / "wal" / "CHECKPOINT").exists()
    wal.truncate_after(first + 3)
    assert not (tmp_path / "wal" / "CHECKPOINT").exists()
    wal.close()
