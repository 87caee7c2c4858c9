"""WriteAheadLog.read_payloads: records read back by lsn (a spilled body's way home), from marks
kept while writing and rebuilt by replay, across segments; a record not there is named."""

import pytest

from broker.wal.log import MARK_BYTES, WriteAheadLog


def payload(i: int) -> bytes:
    return b"p%d:" % i + bytes([i % 256]) * (i % 300)


def filled(directory, n=20_000):
    w = WriteAheadLog(directory, fsync="never", segment_bytes=300_000)
    for _ in w.open():
        pass
    for i in range(1, n + 1):
        w.append(1 + i % 3, payload(i))
        if i % 777 == 0:  # batches of many records: marks fall inside them too
            w.write_batch(w.take_batch())
    w.write_batch(w.take_batch())
    return w


def test_records_come_back_by_lsn_across_segments_and_after_a_reopen(tmp_path):
    w = filled(tmp_path)
    assert len(w.segments()) > 3
    # a mark at least every MARK_BYTES of each segment, so a read starts close to its record
    first = w.segments()[0]
    assert len(w._marks[first.name][0]) >= first.size_bytes // MARK_BYTES
    want = [1, 2, 500, 777, 778, 5000, 13_000, 19_999, 20_000]
    got = w.read_payloads(want)
    assert {k: v for k, v in got.items()} == {i: (1 + i % 3, payload(i)) for i in want}
    w.close()
    w = WriteAheadLog(tmp_path, fsync="never", segment_bytes=300_000)
    for _ in w.open():
        pass
    assert w.read_payloads(list(range(9_000, 9_050))) == {i: (1 + i % 3, payload(i)) for i in range(9_000, 9_050)}
    w.close()


def test_a_record_not_in_the_log_is_named(tmp_path):
    w = filled(tmp_path, 100)
    w.append(1, b"pending")  # appended, not written: not readable yet
    with pytest.raises(LookupError, match=r"log records \[101\] are not in .*written through lsn 100"):
        w.read_payloads([100, 101])
    w.write_batch(w.take_batch())
    assert w.read_payloads([101]) == {101: (1, b"pending")}
    w.close()


def test_records_asked_for_out_of_lsn_order_all_come_back(tmp_path):
    """A Packed block asks for its entries in seq order; once compaction rewrote its oldest ones
    forward, their lsns come first and are the highest.  Reading them as given used to skip every
    older record after the first newer one (LookupError: a restart failed the log)."""
    w = filled(tmp_path)
    want = [19_990, 19_991, 3, 4, 5, 12_000, 7]
    assert w.read_payloads(want) == {i: (1 + i % 3, payload(i)) for i in want}
    w.close()


def _flip_payload_byte(w, i: int) -> None:
    """Damage record ``i`` on disk: one byte of its payload (the ``p<i>:`` text) flipped."""
    needle = b"p%d:" % i
    for seg in w.segments():
        with open(seg.path, "r+b") as f:
            data = f.read()
            at = data.find(needle)
            if at != -1:
                assert data.count(needle) == 1
                f.seek(at + 1)
                f.write(bytes([data[at + 1] ^ 0xFF]))
                return
    raise AssertionError(f"record {i} not found")


def test_a_damaged_record_on_the_way_is_refused_not_handed_back(tmp_path):
    """Every record the read walks is checked (its CRC), the wanted one and those before it
    from the mark on: a damaged one raises, naming the checksum, rather than giving back
    bytes the log never held (read_payloads walks the records itself, not by decode_record)."""
    from broker.wal.format import DamagedRecord

    w = filled(tmp_path)
    seg = w.segments()[1]
    marks = w._marks[seg.name][0]
    walked, wanted = marks[2], marks[2] + 1  # a read of `wanted` starts at the mark on `walked`
    assert w.read_payloads([wanted]) == {wanted: (1 + wanted % 3, payload(wanted))}
    _flip_payload_byte(w, walked)
    with pytest.raises(DamagedRecord, match="fails its checksum"):
        w.read_payloads([wanted])
    assert w.read_payloads([marks[3]]) == {marks[3]: (1 + marks[3] % 3, payload(marks[3]))}  # the rest reads
    _flip_payload_byte(w, marks[3] + 2)
    with pytest.raises(DamagedRecord, match="fails its checksum"):
        w.read_payloads([marks[3] + 2])
    w.close()
