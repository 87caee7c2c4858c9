"""The write-ahead log's files (broker/wal/log.py): real files in tmp_path, no mocks, no sleeps."""

from __future__ import annotations

import errno
import logging
import os
import queue
import re
import shutil
import struct
import threading

import pytest

from broker.wal import (
    CorruptLog,
    FaultPlan,
    WalFailed,
    WalLocked,
    WalVersionError,
    WriteAheadLog,
)
from broker.wal.log import DIRECTORY_SYNC_NAME, segment_name
from broker.wal.format import RECORD_HEADER_SIZE, SEGMENT_HEADER_SIZE

SEG1 = "00000000000000000001.wal"


# --------------------------------------------------------------------------- helpers


def workload(n: int, start: int = 0) -> list[tuple[int, int, bytes]]:
    """n records of varied type, flags and size (0..45 payload bytes)."""
    return [
        (1 + (i % 7), i % 3, bytes([i % 251]) * ((i * 13) % 46))
        for i in range(start, start + n)
    ]


def write(wal: WriteAheadLog, recs, batch_size: int = 3) -> list[int]:
    """Append recs, writing a batch every batch_size records; return their lsns."""
    lsns = []
    for i in range(0, len(recs), batch_size):
        for type_, flags, payload in recs[i : i + batch_size]:
            lsns.append(wal.append(type_, payload, flags))
        wal.write_batch(wal.take_batch())
    return lsns


def replay(directory, *, repair: bool = False, **kwargs):
    """Open, consume the replay, close; return (records as tuples, recovery report)."""
    wal = WriteAheadLog(directory, **kwargs)
    recs = [(r.lsn, r.type, r.flags, r.payload) for r in wal.open(repair=repair)]
    report = wal.recovery
    wal.close()
    return recs, report


def numbered(recs, first_lsn: int = 1):
    return [(first_lsn + i, t, f, p) for i, (t, f, p) in enumerate(recs)]


def build(directory, recs, **kwargs) -> WriteAheadLog:
    wal = WriteAheadLog(directory, **kwargs)
    assert list(wal.open()) == []
    write(wal, recs)
    return wal


# --------------------------------------------------------------------------- basics


def test_an_empty_directory_starts_a_first_segment_at_lsn_1(tmp_path):
    d = tmp_path / "wal"
    wal = WriteAheadLog(d)
    assert list(wal.open()) == []
    assert wal.recovery.records == 0 and wal.recovery.next_lsn == 1
    assert sorted(os.listdir(d)) == [SEG1, "LOCK", "MANIFEST"]
    [seg] = wal.segments()
    assert (seg.name, seg.first_lsn, seg.last_lsn, seg.size_bytes, seg.is_head) == (SEG1, 1, 0, 24, True)
    assert wal.append(1, b"x") == 1
    wal.close()


def test_records_replay_in_order_with_type_flags_payload_segment_and_offset(tmp_path):
    recs = workload(10)
    wal = build(tmp_path, recs)
    assert wal.durable_lsn == 10
    wal.close()

    wal = WriteAheadLog(tmp_path)
    got = list(wal.open())
    assert [(r.lsn, r.type, r.flags, r.payload) for r in got] == numbered(recs)
    offset = SEGMENT_HEADER_SIZE
    for r in got:
        assert (r.segment_name, r.offset) == (SEG1, offset)
        offset += RECORD_HEADER_SIZE + len(r.payload)
    assert wal.recovery.records == 10
    assert wal.recovery.segments == 1
    assert wal.recovery.bytes == offset
    assert wal.recovery.truncated_bytes == 0 and wal.recovery.truncated_at is None
    assert wal.recovery.seconds >= 0
    assert wal.recovery.warnings == ()
    wal.close()


def test_lsns_continue_across_rotation_and_reopen(tmp_path):
    recs = workload(40)
    wal = build(tmp_path, recs[:20], segment_bytes=200)
    segs = wal.segments()
    assert len(segs) >= 3
    for prev, nxt in zip(segs, segs[1:]):
        assert nxt.first_lsn == prev.last_lsn + 1
        assert nxt.name == segment_name(nxt.first_lsn)
        assert prev.size_bytes >= 200 and not prev.is_head
    assert segs[-1].is_head
    wal.close()

    wal = WriteAheadLog(tmp_path, segment_bytes=200)
    assert len(list(wal.open())) == 20
    assert write(wal, recs[20:]) == list(range(21, 41))
    wal.close()
    assert replay(tmp_path)[0] == numbered(recs)


def test_rotate_starts_a_fresh_head_and_does_nothing_when_the_head_is_empty(tmp_path):
    wal = build(tmp_path, workload(3))
    wal.rotate()
    assert [s.name for s in wal.segments()] == [SEG1, segment_name(4)]
    wal.rotate()  # empty head: a new one would have the same name
    assert [s.name for s in wal.segments()] == [SEG1, segment_name(4)]
    write(wal, workload(2, 3))
    wal.close()
    assert replay(tmp_path)[0] == numbered(workload(5))


def test_delete_segments_through_removes_only_closed_segments_it_fully_covers(tmp_path):
    wal = build(tmp_path, workload(30), segment_bytes=200)
    segs = wal.segments()
    assert len(segs) >= 4
    cut = segs[2].last_lsn - 1  # covers segments 0 and 1 entirely, segment 2 only partly
    assert wal.delete_segments_through(cut) == [segs[0].name, segs[1].name]
    assert [s.name for s in wal.segments()] == [s.name for s in segs[2:]]
    assert wal.delete_segments_through(10**9) == [s.name for s in segs[2:-1]]  # never the head
    assert [s.name for s in wal.segments()] == [segs[-1].name]
    wal.close()
    recs, report = replay(tmp_path)
    assert [r[0] for r in recs] == list(range(segs[-1].first_lsn, 31))


def test_a_second_open_of_the_same_directory_is_refused_while_the_first_is_open(tmp_path):
    first = build(tmp_path, workload(2))
    second = WriteAheadLog(tmp_path)
    with pytest.raises(WalLocked) as exc:
        second.open()
    assert re.fullmatch(
        rf"write-ahead log directory {re.escape(str(tmp_path))} is locked: another brokerd "
        rf"\(pid {os.getpid()}\) is using it; stop it first, or give this brokerd a different data directory",
        str(exc.value),
    )
    first.close()
    assert replay(tmp_path)[0] == numbered(workload(2))


def test_abandoning_the_replay_releases_the_lock(tmp_path):
    build(tmp_path, workload(5)).close()
    wal = WriteAheadLog(tmp_path)
    replaying = wal.open()
    next(replaying)
    replaying.close()
    with pytest.raises(RuntimeError, match=r"^the write-ahead log is closed$"):
        wal.append(1, b"")
    assert len(replay(tmp_path)[0]) == 5


def test_other_files_in_the_directory_are_left_alone(tmp_path):
    (tmp_path / "notes.txt").write_bytes(b"hello")
    (tmp_path / "snapshot-0001.cbor").write_bytes(b"\xa0")
    wal = build(tmp_path, workload(3))
    wal.close()
    assert (tmp_path / "notes.txt").read_bytes() == b"hello"
    assert replay(tmp_path)[0] == numbered(workload(3))
    assert (tmp_path / "snapshot-0001.cbor").read_bytes() == b"\xa0"


def test_close_writes_what_is_pending_and_unlocks(tmp_path):
    wal = build(tmp_path, [])
    wal.append(3, b"pending", 1)
    wal.close()
    wal.close()  # twice is fine
    assert replay(tmp_path)[0] == [(1, 3, 1, b"pending")]


def test_append_refuses_bad_type_flags_and_oversized_payload(tmp_path):
    wal = build(tmp_path, [])
    with pytest.raises(ValueError, match=r"^record type must be 1..255 \(got 0\); 0 is reserved$"):
        wal.append(0, b"")
    with pytest.raises(ValueError, match=r"^record type must be 1..255 \(got 256\); 0 is reserved$"):
        wal.append(256, b"")
    with pytest.raises(ValueError, match=r"^record type must be an int 1..255 and flags an int 0..255 \(got type=1, flags=256\)$"):
        wal.append(1, b"", 256)

    class Huge(bytes):
        def __len__(self):
            return 64 * 1024 * 1024 + 1

    with pytest.raises(ValueError, match=r"^record payload is 67108865 bytes; the limit is 67108864 bytes$"):
        wal.append(1, Huge())
    assert wal.append(1, b"ok") == 1  # nothing above used an lsn
    wal.close()


def test_append_before_the_replay_is_consumed_is_refused(tmp_path):
    wal = WriteAheadLog(tmp_path)
    with pytest.raises(RuntimeError, match=r"^open\(\) the write-ahead log and consume its replay before appending$"):
        wal.append(1, b"")
    wal.open()  # generator not consumed
    with pytest.raises(RuntimeError, match=r"^open\(\) the write-ahead log and consume its replay before appending$"):
        wal.append(1, b"")


def test_a_batch_written_out_of_order_is_refused(tmp_path):
    wal = build(tmp_path, [])
    wal.append(1, b"a")
    first = wal.take_batch()
    wal.append(1, b"b")
    second = wal.take_batch()
    with pytest.raises(RuntimeError, match=r"^batch starts at lsn 2 but the log ends at lsn 0; write batches in the order take_batch\(\) returned them, each once$"):
        wal.write_batch(second)
    wal.write_batch(first)
    wal.write_batch(second)
    assert wal.take_batch() is None
    wal.close()
    assert [r[3] for r in replay(tmp_path)[0]] == [b"a", b"b"]


def test_the_loop_can_append_while_a_worker_thread_writes(tmp_path):
    wal = build(tmp_path, [], segment_bytes=4096, fsync="never")
    batches: queue.Queue = queue.Queue()

    def writer():
        while (batch := batches.get()) is not None:
            wal.write_batch(batch)

    t = threading.Thread(target=writer)
    t.start()
    recs = workload(2000)
    for i, (type_, flags, payload) in enumerate(recs):
        wal.append(type_, payload, flags)
        if i % 7 == 0:
            batches.put(wal.take_batch())
    batches.put(wal.take_batch())
    batches.put(None)
    t.join()
    wal.close()
    got, report = replay(tmp_path)
    assert got == numbered(recs)
    assert report.segments > 5


# --------------------------------------------------------------------------- crashes


def _last_segment(directory) -> str:
    return sorted(n for n in os.listdir(directory) if n.endswith(".wal"))[-1]


def test_a_crash_at_every_byte_of_the_last_segment_recovers_exactly_the_whole_records(tmp_path):
    src = tmp_path / "src"
    recs = workload(30)
    wal = build(src, recs, segment_bytes=400, fsync="never")
    segs = wal.segments()
    wal.close()
    assert len(segs) >= 2
    last = segs[-1]
    assert last.last_lsn - last.first_lsn >= 4  # enough records in the last segment to be a real test

    # Where each record of the last segment ends.
    wal = WriteAheadLog(src)
    ends = {r.lsn: r.offset + RECORD_HEADER_SIZE + len(r.payload) for r in wal.open() if r.segment_name == last.name}
    wal.close()
    everything = numbered(recs)

    for cut in range(last.size_bytes + 1):
        d = tmp_path / f"cut{cut}"
        shutil.copytree(src, d)
        os.truncate(d / last.name, cut)

        got, report = replay(d, fsync="never")
        whole = [r for r in everything if r[0] < last.first_lsn or (cut >= SEGMENT_HEADER_SIZE and ends[r[0]] <= cut)]
        assert got == whole, cut
        if cut < SEGMENT_HEADER_SIZE:
            assert report.truncated_at == (last.name, 0) and report.truncated_bytes == cut
            assert not (d / last.name).exists()
        elif cut == SEGMENT_HEADER_SIZE or cut in ends.values():
            assert report.truncated_at is None and report.truncated_bytes == 0
        else:
            boundary = max([SEGMENT_HEADER_SIZE] + [e for e in ends.values() if e <= cut])
            assert report.truncated_at == (last.name, boundary)
            assert report.truncated_bytes == cut - boundary
            assert os.path.getsize(d / last.name) == boundary

        # The log goes on from where the whole records stop.
        wal = WriteAheadLog(d, segment_bytes=400, fsync="never")
        list(wal.open())
        assert wal.append(9, b"after") == len(whole) + 1
        wal.close()
        assert replay(d)[0] == whole + [(len(whole) + 1, 9, 0, b"after")], cut
        shutil.rmtree(d)


def test_a_crash_inside_the_header_of_a_freshly_rotated_segment_deletes_it(tmp_path):
    src = tmp_path / "src"
    wal = build(src, [], segment_bytes=100)
    wal.append(1, b"x" * 100)
    wal.write_batch(wal.take_batch())  # crosses segment_bytes: rotates after the write
    fresh = wal.segments()[-1]
    assert (fresh.name, fresh.size_bytes) == (segment_name(2), SEGMENT_HEADER_SIZE)
    wal.close()

    for cut in range(SEGMENT_HEADER_SIZE + 1):
        d = tmp_path / f"cut{cut}"
        shutil.copytree(src, d)
        os.truncate(d / fresh.name, cut)
        got, report = replay(d)
        assert got == [(1, 1, 0, b"x" * 100)]
        assert os.path.exists(d / fresh.name) == (cut == SEGMENT_HEADER_SIZE)
        wal = WriteAheadLog(d, segment_bytes=100)
        list(wal.open())
        assert wal.append(2, b"y") == 2
        wal.close()
        assert replay(d)[0] == [(1, 1, 0, b"x" * 100), (2, 2, 0, b"y")]


def test_a_zero_filled_tail_is_truncated_and_reported(tmp_path, caplog):
    build(tmp_path, workload(5)).close()
    path = tmp_path / SEG1
    good = os.path.getsize(path)
    with open(path, "ab") as f:
        f.write(bytes(4096))  # what unsynced, preallocated or lost pages read back as
    with caplog.at_level(logging.WARNING, logger="brokerd.wal"):
        got, report = replay(tmp_path)
    assert got == numbered(workload(5))
    assert report.truncated_at == (SEG1, good)
    assert report.truncated_bytes == 4096
    assert os.path.getsize(path) == good
    message = (
        f"truncated torn tail of {SEG1} in {tmp_path}: 4096 bytes from byte offset {good} "
        f"(record checksum mismatch); the last whole record is lsn 5"
    )
    assert report.warnings == (message,)
    assert [r.getMessage() for r in caplog.records] == [message]


# --------------------------------------------------------------------------- corruption


def _offsets(directory) -> dict[int, tuple[str, int]]:
    wal = WriteAheadLog(directory)
    where = {r.lsn: (r.segment_name, r.offset) for r in wal.open()}
    wal.close()
    return where


def _flip(path, offset: int) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        byte = f.read(1)[0]
        f.seek(offset)
        f.write(bytes([byte ^ 0x40]))


def _corrupt_message(path, offset: int, reason: str) -> str:
    return (
        rf"write-ahead log is corrupt: {reason} at byte offset {offset} of {re.escape(str(path))}; "
        rf"start brokerd with --repair to drop what cannot be read there "
        rf"\(every later valid record is kept; the repair lists what it dropped\)"
    )


def test_a_damaged_middle_record_is_refused_naming_the_file_and_offset(tmp_path):
    recs = [(1, 0, b"payload-%d" % i) for i in range(10)]
    build(tmp_path, recs).close()
    _, off3 = _offsets(tmp_path)[3]
    _flip(tmp_path / SEG1, off3 + RECORD_HEADER_SIZE)  # first payload byte of record 3

    wal = WriteAheadLog(tmp_path)
    seen = []
    with pytest.raises(CorruptLog) as exc:
        for r in wal.open():
            seen.append(r.lsn)
    assert re.fullmatch(_corrupt_message(tmp_path / SEG1, off3, "record checksum mismatch"), str(exc.value))
    assert (exc.value.segment, exc.value.offset) == (SEG1, off3)
    assert seen == [1, 2]
    # the refusal released the lock and changed nothing on disk
    assert replay(tmp_path, repair=True)[0] == numbered(recs[:2]) + numbered(recs[3:], 4)


def test_repair_drops_only_the_damaged_record_and_reports_its_lsn_and_bytes(tmp_path, caplog):
    recs = [(1, 0, b"payload-%d" % i) for i in range(10)]
    build(tmp_path, recs).close()
    where = _offsets(tmp_path)
    off3, off4 = where[3][1], where[4][1]
    _flip(tmp_path / SEG1, off3 + RECORD_HEADER_SIZE)

    with caplog.at_level(logging.WARNING, logger="brokerd.wal"):
        got, report = replay(tmp_path, repair=True)
    kept = numbered(recs[:2]) + numbered(recs[3:], 4)
    assert got == kept
    assert report.repaired
    assert (report.dropped_records, report.dropped_records_exact) == (1, True)
    assert report.truncated_at == (SEG1, off3)
    assert [tuple(d[:6]) for d in report.dropped] == [(SEG1, off3, off4 - off3, 3, 3, 1)]
    message = (
        f"repair of {tmp_path}: record fails its checksum (stored 0x"
    )
    assert report.warnings[0].startswith(message)
    assert report.warnings[0].endswith(f"at byte offset {off3} of {SEG1}; dropped {off4 - off3} bytes holding lsns 3..3 (1 record(s))")
    assert report.warnings[0] in [r.getMessage() for r in caplog.records]

    # The repaired log opens cleanly (the gap is recorded) and goes on from lsn 11.
    wal = WriteAheadLog(tmp_path)
    assert len(list(wal.open())) == 9
    assert not wal.recovery.repaired and wal.recovery.warnings == ()
    assert wal.append(1, b"new") == 11
    wal.close()
    assert replay(tmp_path)[0] == kept + [(11, 1, 0, b"new")]


def test_damage_in_a_closed_segment_is_refused_and_repair_keeps_every_later_segment(tmp_path):
    recs = workload(30)
    wal = build(tmp_path, recs, segment_bytes=200)
    segs = wal.segments()
    wal.close()
    assert len(segs) >= 3
    victim = segs[0]
    # Cut one byte off the end of the first segment: at the end of a *closed*
    # segment that is not a torn tail, records after it were written.
    os.truncate(tmp_path / victim.name, victim.size_bytes - 1)

    with pytest.raises(CorruptLog) as exc:
        replay(tmp_path)
    last_off = exc.value.offset
    assert exc.value.segment == victim.name
    assert re.fullmatch(
        _corrupt_message(tmp_path / victim.name, last_off, r"record payload runs past the end of the segment \(\d+ of \d+ bytes\)"),
        str(exc.value),
    )

    got, report = replay(tmp_path, repair=True)
    lost = victim.last_lsn
    assert got == [r for r in numbered(recs) if r[0] != lost]
    assert report.deleted_segments == ()
    assert (report.dropped_records, report.dropped_records_exact) == (1, True)
    assert [tuple(d[:6]) for d in report.dropped] == [(victim.name, last_off, victim.size_bytes - 1 - last_off, lost, lost, 1)]
    assert sorted(n for n in os.listdir(tmp_path) if n.endswith(".wal")) == [s.name for s in segs]
    assert replay(tmp_path)[0] == got  # and it stays repaired


def test_a_damaged_length_in_the_last_segment_is_corruption_not_a_torn_tail(tmp_path):
    recs = [(1, 0, b"r%d" % i) for i in range(6)]
    build(tmp_path, recs).close()
    _, off2 = _offsets(tmp_path)[2]
    with open(tmp_path / SEG1, "r+b") as f:
        f.seek(off2)
        f.write(struct.pack(">I", 5000))  # now "runs past end of file" - but record 3 follows
    with pytest.raises(CorruptLog) as exc:
        replay(tmp_path)
    assert re.fullmatch(
        _corrupt_message(tmp_path / SEG1, off2, r"record payload runs past the end of the segment \(\d+ of 5000 bytes\)"),
        str(exc.value),
    )
    got, report = replay(tmp_path, repair=True)
    assert got == numbered(recs[:1]) + numbered(recs[2:], 3)
    assert (report.dropped_records, report.dropped_records_exact) == (1, True)


def test_a_record_with_a_valid_checksum_but_the_wrong_lsn_is_corruption(tmp_path):
    wal = build(tmp_path, workload(3))
    wal.close()
    from broker.wal.format import decode_segment_header, encode_record

    data = (tmp_path / SEG1).read_bytes()
    salt = decode_segment_header(data).salt
    with open(tmp_path / SEG1, "ab") as f:
        f.write(encode_record(salt, 7, 1, 0, b"stray"))
    with pytest.raises(CorruptLog) as exc:
        replay(tmp_path)
    assert re.fullmatch(_corrupt_message(tmp_path / SEG1, len(data), "record lsn 7 does not follow lsn 3"), str(exc.value))
    # repair keeps it and records lsns 4..6 as a gap
    got, report = replay(tmp_path, repair=True)
    assert [r[0] for r in got] == [1, 2, 3, 7]
    assert [tuple(d[3:6]) for d in report.dropped] == [(4, 6, 3)]


def test_a_segment_that_does_not_continue_the_previous_one_is_corruption(tmp_path):
    wal = build(tmp_path, workload(30), segment_bytes=200)
    segs = wal.segments()
    wal.close()
    os.remove(tmp_path / segs[1].name)  # a gap in the lsns
    with pytest.raises(CorruptLog) as exc:
        replay(tmp_path)
    assert re.fullmatch(
        _corrupt_message(
            tmp_path / segs[2].name, 0,
            f"segment starts at lsn {segs[2].first_lsn} but the previous segment ended at lsn {segs[0].last_lsn}",
        ),
        str(exc.value),
    )
    got, report = replay(tmp_path, repair=True)
    missing = set(range(segs[1].first_lsn, segs[1].last_lsn + 1))
    assert [r[0] for r in got] == [n for n in range(1, 31) if n not in missing]
    assert report.dropped_records == len(missing)
    assert report.dropped_records_exact
    assert report.deleted_segments == ()


def test_a_damaged_magic_of_a_closed_segment_is_corruption_and_repair_keeps_its_records(tmp_path):
    wal = build(tmp_path, workload(30), segment_bytes=200)
    segs = wal.segments()
    wal.close()
    _flip(tmp_path / segs[1].name, 0)
    with pytest.raises(CorruptLog) as exc:
        replay(tmp_path)
    assert re.fullmatch(
        _corrupt_message(tmp_path / segs[1].name, 0, r"segment does not start with the magic b'BRKDWAL\\n'"),
        str(exc.value),
    )
    got, report = replay(tmp_path, repair=True)
    assert got == numbered(workload(30))  # the header is rebuilt; not one record is lost
    assert report.repaired and report.dropped_records == 0
    assert replay(tmp_path)[0] == got


@pytest.mark.parametrize("byte", [12, 13, 14, 15])
def test_a_flipped_salt_byte_costs_nothing_after_repair(tmp_path, byte):
    wal = build(tmp_path, workload(30), segment_bytes=200)
    segs = wal.segments()
    wal.close()
    _flip(tmp_path / segs[0].name, byte)
    with pytest.raises(CorruptLog):
        replay(tmp_path)  # every record of the segment fails its checksum
    got, report = replay(tmp_path, repair=True)
    assert got == numbered(workload(30))
    assert report.dropped_records == 0 and report.dropped_records_exact


def test_a_zeroed_header_and_first_record_still_recover_the_salt_from_later_records(tmp_path):
    wal = build(tmp_path, workload(30), segment_bytes=200)
    segs = wal.segments()
    wal.close()
    where = _offsets(tmp_path)
    second = where[2][1]
    path = tmp_path / segs[0].name
    data = bytearray(path.read_bytes())
    data[: second] = bytes(second)  # header and record 1 gone
    path.write_bytes(bytes(data))
    got, report = replay(tmp_path, repair=True)
    assert got == numbered(workload(30))[1:]
    assert [tuple(d[3:6]) for d in report.dropped] == [(1, 1, 1)]


def test_a_segment_from_a_newer_brokerd_is_refused_by_version(tmp_path):
    build(tmp_path, workload(2)).close()
    with open(tmp_path / SEG1, "r+b") as f:
        f.seek(8)
        f.write(b"\x00\x02")
    for repair in (False, True):
        with pytest.raises(WalVersionError) as exc:
            replay(tmp_path, repair=repair)
        assert str(exc.value) == (
            f"{tmp_path / SEG1} uses write-ahead log format version 2, but this brokerd reads only "
            f"version 1; run the brokerd release that wrote it (or a newer one)"
        )
    assert os.path.getsize(tmp_path / SEG1) > SEGMENT_HEADER_SIZE  # repair never touches it


# --------------------------------------------------------------------------- disk faults


def test_enospc_on_write_fails_the_log_and_leaves_no_partial_record(tmp_path):
    recs = workload(9)
    build(tmp_path, recs).close()
    size_before = os.path.getsize(tmp_path / SEG1)

    plan = FaultPlan(fail_write_after_bytes=50, errno=errno.ENOSPC)
    wal = WriteAheadLog(tmp_path, fault=plan)
    assert len(list(wal.open())) == 9
    for i in range(3):
        wal.append(1, b"z" * 30)
    doomed = wal.take_batch()
    wal.append(1, b"later")
    later = wal.take_batch()

    with pytest.raises(WalFailed) as exc:
        wal.write_batch(doomed)
    assert str(exc.value) == (
        f"write-ahead log write failed: No space left on device (ENOSPC) in {SEG1}; "
        f"the broker stops confirming; free space and restart brokerd"
    )
    failure = exc.value
    assert (failure.errno, failure.errno_name, failure.operation, failure.segment) == (
        errno.ENOSPC, "ENOSPC", "write", SEG1
    )
    assert wal.failed is failure
    assert plan.write_calls == 2  # 50 bytes got through, then the disk was full
    assert os.path.getsize(tmp_path / SEG1) == size_before  # the 50 bytes were cut off again
    assert wal.durable_lsn == 9

    # Failed for good: everything raises the same error at once, and nothing is written.
    with pytest.raises(WalFailed) as again:
        wal.write_batch(later)
    assert again.value is failure
    with pytest.raises(WalFailed):
        wal.sync()
    with pytest.raises(WalFailed):
        wal.append(1, b"x")
    assert plan.write_calls == 2
    wal.close()

    got, report = replay(tmp_path)
    assert got == numbered(recs)
    assert report.truncated_bytes == 0


def test_eio_on_fsync_fails_the_log_and_is_never_retried(tmp_path):
    build(tmp_path, workload(3)).close()
    plan = FaultPlan(fail_fsync_on_call=2, errno=errno.EIO)
    wal = WriteAheadLog(tmp_path, fault=plan)
    list(wal.open())  # fsync 1: the head, before anything is built on the replay
    assert plan.fsyncs == [SEG1]
    wal.append(1, b"a")
    with pytest.raises(WalFailed) as exc:
        wal.write_batch(wal.take_batch())
    assert str(exc.value) == (
        f"write-ahead log fsync failed: Input/output error (EIO) in {SEG1}; the broker stops "
        f"confirming; check the disk (see dmesg) and restart brokerd, which replays the log"
    )
    assert exc.value.operation == "fsync"
    assert wal.durable_lsn == 3  # lsn 4 was written but never confirmed durable
    assert plan.fsync_calls == 2

    for call in (wal.sync, wal.rotate, lambda: wal.delete_segments_through(10)):
        with pytest.raises(WalFailed) as again:
            call()
        assert again.value is exc.value
    wal.close()
    assert plan.fsync_calls == 2  # never retried, not even by close()
    assert plan.write_calls == 1
    # close() released the lock even though the log failed
    assert len(replay(tmp_path)[0]) in (3, 4)


def test_a_full_disk_while_rotating_fails_the_log_without_losing_written_records(tmp_path):
    build(tmp_path, [], segment_bytes=100).close()
    plan = FaultPlan(fail_write_on_call=2)  # 1: the batch, 2: the new segment's header
    wal = WriteAheadLog(tmp_path, segment_bytes=100, fault=plan)
    list(wal.open())
    wal.append(1, b"x" * 100)
    with pytest.raises(WalFailed) as exc:
        wal.write_batch(wal.take_batch())
    assert (exc.value.operation, exc.value.segment) == ("write", segment_name(2))
    assert wal.durable_lsn == 1  # the batch itself made it
    wal.close()
    assert not (tmp_path / segment_name(2)).exists()
    assert replay(tmp_path, segment_bytes=100)[0] == [(1, 1, 0, b"x" * 100)]


# --------------------------------------------------------------------------- fsync policies


def test_fsync_always_fsyncs_once_per_batch(tmp_path):
    build(tmp_path, []).close()
    plan = FaultPlan()
    wal = WriteAheadLog(tmp_path, fsync="always", fault=plan)
    list(wal.open())
    plan.reset_counters()
    for i in range(5):
        wal.append(1, b"a")
        wal.append(1, b"b")
        wal.write_batch(wal.take_batch())
        assert wal.durable_lsn == wal.synced_lsn == 2 * (i + 1)
    assert plan.fsyncs == [SEG1] * 5
    assert plan.write_calls == 5  # one os.write per batch
    wal.sync()  # nothing new: no fsync
    assert plan.fsync_calls == 5
    wal.close()


def test_fsync_never_does_not_fsync_data(tmp_path):
    build(tmp_path, []).close()
    plan = FaultPlan()
    wal = WriteAheadLog(tmp_path, fsync="never", fault=plan)
    list(wal.open())
    plan.reset_counters()
    write(wal, workload(20))
    assert plan.fsync_calls == 0
    assert wal.durable_lsn == wal.written_lsn == 20
    assert wal.synced_lsn == 0
    wal.close()


def test_fsync_interval_fsyncs_when_the_interval_has_passed(tmp_path):
    build(tmp_path, []).close()
    now = [100.0]
    plan = FaultPlan()
    wal = WriteAheadLog(tmp_path, fsync="interval", fsync_interval_ms=1000, fault=plan, clock=lambda: now[0])
    list(wal.open())
    plan.reset_counters()
    write(wal, workload(3))  # at t=0 since the last fsync
    assert plan.fsync_calls == 0
    assert (wal.durable_lsn, wal.synced_lsn) == (3, 0)  # confirmable on write under "interval"
    now[0] += 0.999
    write(wal, workload(3))
    assert plan.fsync_calls == 0
    now[0] += 0.001
    write(wal, workload(3))
    assert plan.fsync_calls == 1 and wal.synced_lsn == 9
    write(wal, workload(3))
    wal.sync()  # the caller's timer
    assert plan.fsync_calls == 2 and wal.synced_lsn == 12
    wal.close()


def test_options_are_validated_with_messages_a_user_can_act_on(tmp_path):
    with pytest.raises(ValueError, match=r"^fsync must be one of always, interval, never \(got 'sometimes'\)$"):
        WriteAheadLog(tmp_path, fsync="sometimes")
    with pytest.raises(ValueError, match=r"^fsync_interval_ms must be a positive number of milliseconds \(got 0\)$"):
        WriteAheadLog(tmp_path, fsync="interval", fsync_interval_ms=0)
    with pytest.raises(ValueError, match=r"^segment_bytes must be an integer of at least 64 bytes \(got 10\)$"):
        WriteAheadLog(tmp_path, segment_bytes=10)


def test_rotation_syncs_the_old_segment_then_the_new_one_and_the_directory(tmp_path):
    build(tmp_path, [], segment_bytes=100).close()
    plan = FaultPlan()
    wal = WriteAheadLog(tmp_path, fsync="never", segment_bytes=100, fault=plan)
    list(wal.open())
    plan.reset_counters()
    wal.append(1, b"x" * 100)
    wal.write_batch(wal.take_batch())
    # even under "never": a new segment must not outlive the old one's tail
    assert plan.fsyncs == [SEG1, segment_name(2), DIRECTORY_SYNC_NAME]
    wal.close()


def test_a_lone_half_created_segment_is_deleted_and_lsns_do_not_go_backwards(tmp_path):
    # Compaction deleted everything before lsn 42, then the crash hit while
    # segment 42's header was being written.
    (tmp_path / segment_name(42)).write_bytes(b"BRKDWAL\n\x00")
    wal = WriteAheadLog(tmp_path)
    assert list(wal.open()) == []
    assert wal.recovery.next_lsn == 42
    assert wal.recovery.deleted_segments == (segment_name(42),)
    assert wal.append(1, b"") == 42
    wal.close()
    assert replay(tmp_path)[0] == [(42, 1, 0, b"")]


def test_every_error_the_log_raises_on_purpose_is_a_wal_error(tmp_path):
    # One family: a caller catches WalError for the lock, corruption, missing
    # files, a newer format, a failed disk and bad bytes alike.
    from broker.wal import MissingRecords, WalError, WalFormatError
    from broker.wal.format import BadHeader, DamagedRecord, ShortHeader, TruncatedRecord, UnsupportedVersion
    from broker.wal.format import decode_record, decode_segment_header

    family = (WalLocked, CorruptLog, MissingRecords, WalVersionError, WalFailed, WalFormatError,
              ShortHeader, BadHeader, UnsupportedVersion, TruncatedRecord, DamagedRecord)
    assert [c.__name__ for c in family if not issubclass(c, WalError)] == []
    with pytest.raises(WalError, match=r"^segment does not start with the magic b'BRKDWAL\\n'$"):
        decode_segment_header(b"\0" * 24)
    with pytest.raises(WalError, match=r"^record at offset 0 needs 18 bytes but only 3 remain$"):
        decode_record(b"abc", 0, 0)
    wal = WriteAheadLog(tmp_path)
    list(wal.open())
    try:
        with pytest.raises(WalError, match=r"^write-ahead log directory .* is locked: another brokerd \(pid \d+\)"):
            WriteAheadLog(tmp_path).open()
    finally:
        wal.close()
