"""WriteAheadLog.truncate_after: a deposed leader cuts its unconfirmed tail (issue 16 item 3).

Real files in tmp_path; every case reopens the directory and replays it, so the promise tested is
what is on disk, not what the object believes.
"""

from __future__ import annotations

import pytest

from broker.wal import WriteAheadLog
from tests.wal.test_wal_log import build, numbered, replay, workload, write

SMALL = 4096  # bytes: the smallest segment size, so a few dozen records span several segments


@pytest.mark.parametrize("keep", [0, 7, 20, 60])
def test_truncate_after_keeps_exactly_the_prefix_across_segments_and_appends_go_on(tmp_path, keep):
    d = tmp_path / "wal"
    recs = workload(60)
    wal = build(d, [(t, f, p * 40) for t, f, p in recs], segment_bytes=SMALL, fsync="never")
    assert len(wal.segments()) > 2  # the cut crosses segment files
    dropped = wal.truncate_after(keep)
    assert dropped == 60 - keep
    assert wal.written_lsn == wal.synced_lsn == keep and wal.next_lsn == keep + 1
    more = workload(5, start=100)
    assert write(wal, more) == list(range(keep + 1, keep + 6))
    wal.close()
    got, report = replay(d, segment_bytes=SMALL, fsync="never")
    want = numbered([(t, f, p * 40) for t, f, p in recs[:keep]]) + numbered(more, keep + 1)
    assert got == want
    assert report.truncated_bytes == 0  # a clean cut, not a torn tail repaired at open


def test_truncate_after_the_end_drops_nothing(tmp_path):
    wal = build(tmp_path / "wal", workload(10))
    assert wal.truncate_after(10) == 0 and wal.truncate_after(99) == 0
    assert wal.written_lsn == 10
    wal.close()


def test_truncate_refuses_with_records_pending_and_below_the_oldest_segment(tmp_path):
    d = tmp_path / "wal"
    wal = build(d, [(t, f, p * 40) for t, f, p in workload(60)], segment_bytes=SMALL, fsync="never")
    wal.append(1, b"pending")
    with pytest.raises(RuntimeError, match="written first"):
        wal.truncate_after(5)
    wal.write_batch(wal.take_batch())
    first = wal.segments()[1].first_lsn
    wal.delete_segments_through(first - 1)
    with pytest.raises(ValueError, match=f"from lsn {first} on"):
        wal.truncate_after(first - 2)
    assert wal.written_lsn == 61  # nothing was cut
    wal.close()
    got, _ = replay(d, segment_bytes=SMALL, fsync="never")
    assert got[-1][0] == 61 and got[0][0] == first


def test_a_truncated_log_takes_a_replay_into_a_fresh_object(tmp_path):
    # reopening after a cut at a segment boundary: the emptied head is a valid empty segment
    d = tmp_path / "wal"
    wal = build(d, [(t, f, p * 40) for t, f, p in workload(60)], segment_bytes=SMALL, fsync="never")
    boundary = wal.segments()[1].first_lsn - 1
    wal.truncate_after(boundary)
    wal.close()
    w2 = WriteAheadLog(d, segment_bytes=SMALL, fsync="never")
    assert [r.lsn for r in w2.open()] == list(range(1, boundary + 1))
    assert w2.append(2, b"x") == boundary + 1
    w2.close()


def test_discard_and_start_at_drops_every_record_and_appends_from_the_new_start(tmp_path):
    d = tmp_path / "wal"
    wal = build(d, [(t, f, p * 40) for t, f, p in workload(60)], segment_bytes=SMALL, fsync="never")
    with pytest.raises(ValueError, match="already reaches lsn 60"):
        wal.discard_and_start_at(60)
    assert wal.discard_and_start_at(500) == 60
    assert wal.written_lsn == 499 and wal.next_lsn == 500 and len(wal.segments()) == 1
    more = workload(3, start=7)
    assert write(wal, more) == [500, 501, 502]
    wal.close()
    got, _ = replay(d, segment_bytes=SMALL, fsync="never")
    assert got == numbered(more, 500)
