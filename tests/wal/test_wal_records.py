"""The write-ahead log's byte format (broker/wal/format.py), both ways."""

from __future__ import annotations

import struct
import zlib

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from broker.wal.format import (
    FORMAT_VERSION,
    MAX_RECORD_BYTES,
    RECORD_HEADER_SIZE,
    SEGMENT_HEADER_SIZE,
    BadHeader,
    Damage,
    DamagedRecord,
    RecordScanner,
    SegmentHeader,
    ShortHeader,
    TruncatedRecord,
    UnsupportedVersion,
    WalFormatError,
    append_unsealed,
    decode_record,
    decode_segment_header,
    encode_record,
    encode_segment_header,
    seal_records,
)

SALT = 0x01020304

# (what, exact bytes).  If one of these changes, the on-disk format changed:
# bump FORMAT_VERSION and follow "How to bump the version" in broker/wal/format.py.
HEADER_HEX = (
    "42524b4457414c0a"  # magic b"BRKDWAL\n"
    "0001"  # version 1
    "0000"  # flags
    "01020304"  # salt
    "0000000000000001"  # first_lsn 1
)
RECORD_TABLE = [
    # (lsn, type, flags, payload, hex)
    (1, 2, 0, b"hi", "00000002" "fc9c8607" "0000000000000001" "02" "00" "6869"),
    (2, 255, 0x81, b"", "00000000" "3da162aa" "0000000000000002" "ff" "81"),
    (
        2**64 - 1, 1, 0, b"\xa1\x61\x71\x01",  # CBOR {"q": 1}
        "00000004" "5ce4be0f" "ffffffffffffffff" "01" "00" "a1617101",
    ),
]


def test_segment_header_bytes_are_pinned():
    assert encode_segment_header(SALT, 1).hex() == HEADER_HEX
    assert len(bytes.fromhex(HEADER_HEX)) == SEGMENT_HEADER_SIZE == 24
    assert decode_segment_header(bytes.fromhex(HEADER_HEX)) == SegmentHeader(
        version=1, flags=0, salt=SALT, first_lsn=1
    )


@pytest.mark.parametrize("lsn, type_, flags, payload, hex_", RECORD_TABLE)
def test_record_bytes_are_pinned_both_ways(lsn, type_, flags, payload, hex_):
    raw = bytes.fromhex(hex_)
    # The CRC in the table is zlib.crc32 over lsn..payload seeded with the salt.
    assert struct.unpack(">I", raw[4:8])[0] == zlib.crc32(raw[8:], SALT)
    assert encode_record(SALT, lsn, type_, flags, payload) == raw
    rec = decode_record(raw, 0, SALT)
    assert (rec.lsn, rec.type, rec.flags, rec.payload, rec.offset, rec.end) == (
        lsn, type_, flags, payload, 0, len(raw)
    )


def test_record_fed_one_byte_at_a_time_is_truncated_until_complete():
    raw = bytes.fromhex(RECORD_TABLE[0][4])
    for cut in range(len(raw)):
        with pytest.raises(TruncatedRecord) as exc:
            decode_record(raw[:cut], 0, SALT)
        assert exc.value.available == cut
    assert decode_record(raw, 0, SALT).payload == b"hi"


def test_a_record_does_not_validate_under_another_segments_salt():
    raw = encode_record(SALT, 1, 2, 0, b"hi")
    with pytest.raises(DamagedRecord, match=r"^record at offset 0 fails its checksum \(stored 0xfc9c8607, computed 0x[0-9a-f]{8}\)$"):
        decode_record(raw, 0, SALT + 1)


def test_impossible_length_is_damage_not_a_request_for_more_bytes():
    raw = struct.pack(">IIQBB", MAX_RECORD_BYTES + 1, 0, 1, 1, 0)
    with pytest.raises(DamagedRecord) as exc:
        decode_record(raw, 0, SALT)
    assert exc.value.kind == Damage.TOO_LONG
    assert str(exc.value) == (
        f"record at offset 0 claims {MAX_RECORD_BYTES + 1} payload bytes, "
        f"more than the {MAX_RECORD_BYTES}-byte limit"
    )


def test_header_errors_say_what_is_wrong():
    good = bytes.fromhex(HEADER_HEX)
    with pytest.raises(ShortHeader, match=r"^segment is 23 bytes, shorter than its 24-byte header$"):
        decode_segment_header(good[:23])
    with pytest.raises(BadHeader, match=r"^segment does not start with the magic b'BRKDWAL\\n'$"):
        decode_segment_header(b"X" + good[1:])
    with pytest.raises(BadHeader, match=r"^segment header has format version 0$"):
        decode_segment_header(good[:8] + b"\x00\x00" + good[10:])
    with pytest.raises(UnsupportedVersion, match=r"^segment format version 7 is not supported \(this brokerd reads version 1\)$") as exc:
        decode_segment_header(good[:8] + b"\x00\x07" + good[10:])
    assert exc.value.version == 7
    with pytest.raises(BadHeader, match=r"^segment header has unknown flags 0x0001 \(version 1 defines none\)$"):
        decode_segment_header(good[:10] + b"\x00\x01" + good[12:])
    with pytest.raises(BadHeader, match=r"^segment header has first_lsn 0 \(lsns start at 1\)$"):
        decode_segment_header(good[:16] + bytes(8))


def test_encoding_refuses_fields_the_format_cannot_hold():
    with pytest.raises(ValueError, match=r"^record type must be 1..255 \(got 0\); 0 is reserved$"):
        encode_record(SALT, 1, 0, 0, b"")
    with pytest.raises(ValueError, match=r"^record flags must be 0..255 \(got 256\)$"):
        encode_record(SALT, 1, 1, 256, b"")
    with pytest.raises(ValueError, match=r"^lsn must be 1..2\*\*64-1 \(got 0\)$"):
        encode_record(SALT, 0, 1, 0, b"")

    class Huge(bytes):
        def __len__(self):
            return MAX_RECORD_BYTES + 1

    with pytest.raises(ValueError, match=rf"^record payload is {MAX_RECORD_BYTES + 1} bytes; the limit is {MAX_RECORD_BYTES} bytes$"):
        encode_record(SALT, 1, 1, 0, Huge())


records_strategy = st.tuples(
    st.integers(1, 2**64 - 1),  # lsn
    st.integers(1, 255),  # type
    st.integers(0, 255),  # flags
    st.binary(max_size=300),  # payload
)


@given(salt=st.integers(0, 2**32 - 1), rec=records_strategy)
def test_any_record_round_trips(salt, rec):
    lsn, type_, flags, payload = rec
    raw = encode_record(salt, lsn, type_, flags, payload)
    assert len(raw) == RECORD_HEADER_SIZE + len(payload)
    got = decode_record(b"junk" + raw, 4, salt)
    assert (got.lsn, got.type, got.flags, got.payload, got.end) == (lsn, type_, flags, payload, 4 + len(raw))


@given(salt=st.integers(0, 2**32 - 1), first=st.integers(1, 2**40), recs=st.lists(records_strategy, max_size=8))
def test_unsealed_then_sealed_records_equal_encoded_ones_and_scan_in_order(salt, first, recs):
    buf = bytearray()
    expected = b""
    for i, (_, type_, flags, payload) in enumerate(recs):
        append_unsealed(buf, first + i, type_, flags, payload)
        expected += encode_record(salt, first + i, type_, flags, payload)
    assert seal_records(buf, salt) == len(recs)
    assert bytes(buf) == expected

    data = encode_segment_header(salt, first) + expected
    scanner = RecordScanner(data, salt, SEGMENT_HEADER_SIZE, first)
    got = [(r.lsn, r.type, r.flags, r.payload) for r in scanner]
    assert got == [(first + i, t, f, p) for i, (_, t, f, p) in enumerate(recs)]
    assert scanner.damage is None
    assert scanner.end == len(data)
    assert scanner.next_lsn == first + len(recs)


@settings(max_examples=300)
@given(data=st.binary(max_size=200), salt=st.integers(0, 2**32 - 1), offset=st.integers(0, 220))
def test_decoders_fed_random_bytes_raise_only_format_errors(data, salt, offset):
    try:
        decode_segment_header(data)
    except WalFormatError:
        pass
    try:
        decode_record(data, offset, salt)
    except WalFormatError:
        pass
    scanner = RecordScanner(data, salt, min(offset, len(data)), 1)
    for _ in scanner:
        pass
    assert scanner.damage is None or scanner.damage.kind in {
        Damage.SHORT_HEADER, Damage.SHORT_PAYLOAD, Damage.TOO_LONG,
        Damage.BAD_CRC, Damage.BAD_TYPE, Damage.BAD_LSN,
    }


def test_scanner_stops_at_an_lsn_that_does_not_follow():
    data = (
        encode_segment_header(SALT, 5)
        + encode_record(SALT, 5, 1, 0, b"a")
        + encode_record(SALT, 7, 1, 0, b"b")
    )
    scanner = RecordScanner(data, SALT, SEGMENT_HEADER_SIZE, 5)
    assert [r.lsn for r in scanner] == [5]
    assert scanner.damage == Damage(Damage.BAD_LSN, 24 + 19, 1, "record lsn 7 does not follow lsn 5")
    assert FORMAT_VERSION == 1
