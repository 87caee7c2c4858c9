"""A leader sends its followers a PUBLISH_FRAME and its PUBLISH_NEXT records in one RECORDS batch,
never apart (broker/runtime/durability.py ``_whole_frames``): a follower writes each batch at once
and may start a segment after it, and a frame and its items in two segments could be parted by
compaction."""

from broker.runtime.durability import _whole_frames
from broker.state import log_records as R


def rec(lsn, t, size=10):
    return (lsn, t, b"x" * size)


def test_a_batch_ends_before_a_frame_whose_items_do_not_fit():
    records = [rec(1, R.ACK), rec(2, R.PUBLISH_FRAME, 50), rec(3, R.PUBLISH_NEXT, 1), rec(4, R.PUBLISH_NEXT, 1),
               rec(5, R.ACK)]
    assert [r[0] for r in _whole_frames(records, 10, 61)] == [1]  # the frame goes with its items, later
    assert [r[0] for r in _whole_frames(records, 10, 62)] == [1, 2, 3, 4]  # all of it fits
    assert [r[0] for r in _whole_frames(records, 10, 1000)] == [1, 2, 3, 4, 5]


def test_a_frame_that_starts_a_batch_goes_whole_even_past_the_bound():
    records = [rec(1, R.PUBLISH_FRAME, 100)] + [rec(i, R.PUBLISH_NEXT, 1) for i in range(2, 6)] + [rec(6, R.ACK)]
    assert [r[0] for r in _whole_frames(records, 10, 50)] == [1, 2, 3, 4, 5]


def test_other_records_end_a_batch_at_the_bound_and_at_last():
    records = [rec(i, R.PUBLISH) for i in range(1, 8)]
    assert [r[0] for r in _whole_frames(records, 10, 35)] == [1, 2, 3]
    assert [r[0] for r in _whole_frames(records, 5, 1000)] == [1, 2, 3, 4, 5]
