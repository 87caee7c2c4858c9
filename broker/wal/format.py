"""The write-ahead log's bytes on disk: segment header, record, CRC and salt, manifest.

This module is the whole on-disk *format*; ``log.py`` owns the files and
``recovery.py`` reads them back.  It is pure: no trio, no ``os``, no I/O, no
clock.  Everything here works on ``bytes``/``bytearray`` and can be tested a
byte at a time.


On-disk format, version 1
=========================

A log is one directory::

    LOCK                          fcntl.flock'd by the running brokerd
    MANIFEST                      where the log starts, and the gaps a repair left
    00000000000000000001.wal      segment whose first record is lsn 1
    00000000000000004711.wal      ... lsn 4711 (names sort in lsn order)

Any other file is left alone.  Segments are never rewritten: only appended
to, truncated at a torn tail, or deleted whole from the oldest end (and
rewritten by ``--repair``, see ``repair.py``).

The manifest is ASCII text, replaced atomically (``MANIFEST.tmp``, fsync,
rename, fsync the directory) when the log is created, before compaction
deletes segments, and by a repair::

    brokerd-wal-manifest 1
    start 4711                    the oldest lsn the log must still hold
    gap 5000 5003                 lsns a repair dropped for good (zero or more lines)
    crc 1a2b3c4d                  zlib.crc32 of the lines above, hex

It is not part of the segment format (an older brokerd ignores it and reads
the segments as before), so adding it did not bump the version.  An older
brokerd's compaction does not update it, though: after running one on this
directory, delete MANIFEST (the next start writes it again from the segments).
A directory without a manifest (fresh, or written before it existed) is taken
as it is and the manifest written.

The checkpoint pointer (``CHECKPOINT``, ASCII, replaced atomically like the
manifest) says where the broker state's newest checkpoint begins: a run of
records from which, with every record after it, the whole state can be
rebuilt (broker/state/replay.py, record type 33).  Start-up may then read the
log from there instead of from its first record; the older segments are
still kept (queued bodies are read back from them by lsn) but not scanned::

    brokerd-wal-checkpoint 1
    lsn 5120000                   the lsn of the checkpoint's first record
    segment 00000000000004915201.wal    the segment holding it
    offset 48213                  its byte offset in that segment
    prefix 9f8e7d6c               zlib.crc32 of that segment's bytes before the offset, hex
    sum 00000000000000000001.wal 0a1b2c3d   zlib.crc32 of each whole segment before it (0 or more)
    crc 1a2b3c4d                  zlib.crc32 of the lines above, hex

It is only a hint: written after the records it points at are fsynced, and
ignored (with a warning; the log is then read from its start) if damaged,
missing, or pointing at a record that is not there with that lsn.  An older
brokerd ignores the file, and nothing it does makes the pointer wrong: it
names a record by lsn, segment and offset, which compaction deletes whole or
not at all.  The bytes before the checkpoint are not parsed at start-up but
still checked, with one CRC per file (C speed): a segment or prefix that does
not match its ``sum``/``prefix`` is corruption, found and named as in a whole
replay (the broker refuses to start; ``--repair`` reads the whole log).

Every segment opens with a 24-byte header; then records follow back to back,
with no padding and no end marker.  Integers are big-endian.

==========  =====  =====================================================
offset      bytes  segment header field
==========  =====  =====================================================
0           8      magic ``b"BRKDWAL\\n"`` (42 52 4b 44 57 41 4c 0a)
8           2      format version, u16 = 1
10          2      flags, u16 = 0 (none defined)
12          4      salt, u32, ``os.urandom`` per segment; seeds every CRC
16          8      first_lsn, u64; equals the number in the file name
==========  =====  =====================================================

==========  =====  =====================================================
offset      bytes  record field (offsets from the record's start)
==========  =====  =====================================================
0           4      length, u32: payload bytes (at most 64 MiB, else damage)
4           4      crc, u32: ``zlib.crc32(record[8:18 + length], salt)``
8           8      lsn, u64: previous record's lsn + 1, across segments
16          1      type, u8: 1..255, chosen by the broker state (0 reserved)
17          1      flags, u8: chosen by the broker state
18          length payload: opaque to the log (CBOR from the broker state)
==========  =====  =====================================================

The salt is why a stale or copied record never validates in the wrong file.
The length is outside the CRC; a damaged length makes the CRC fail, and
replay looks for valid records beyond a bad one before calling it a torn tail.

Example: a segment starting at lsn 1 with salt 0x01020304, holding one record
(lsn 1, type 2, flags 0, payload ``b"hi"``)::

    42524b4457414c0a 0001 0000 01020304 0000000000000001      header
    00000002 fc9c8607 0000000000000001 02 00 6869              record

``tests/wal/test_wal_records.py`` pins these bytes, CRC included.


How to bump the version
-----------------------
(After beanstalkd's ``Walver``.)  The version lives in every segment header,
so old and new segments can sit in one directory during an upgrade.

1. Only bump for a change an old reader would misread.  Adding a record
   *type* is not a format change: the payload is the broker state's business.
2. Set ``FORMAT_VERSION`` to N+1 and write only the new layout.
3. Keep a reader for every older version: rename the current decoding code
   to ``decode_v<N>`` and make ``decode_segment_header`` and the scanner
   dispatch on the header's version instead of refusing it.  Keep the magic
   and the version field where they are (offsets 0 and 8) forever: that is
   how an old brokerd reading a new file says "version N+1 is not supported"
   instead of "corrupt".
4. Add a test with the exact bytes of a version-N segment (copy the table
   test in ``tests/wal/test_wal_records.py``) and check it still replays.
5. Say in the release notes that downgrading after the new version has
   written a segment needs the old segments only: delete the new ones first.

Two ways to encode
------------------
* ``encode_record(salt, ...)`` returns one finished record (tests, tools).
* The log's hot path appends *unsealed* records (CRC field zero) with
  ``append_unsealed`` on the event loop, because the salt belongs to whichever
  segment the batch finally lands in, which only the writer thread knows; the
  writer calls ``seal_records(buf, salt)`` just before ``os.write``.  That also
  moves the CRC work off the event loop.

Decoding errors all derive from ``WalFormatError`` (a ``WalError``); a decoder
fed any bytes raises nothing else.
"""

from __future__ import annotations

import re
import struct
import zlib
from dataclasses import dataclass
from typing import Iterator, NamedTuple

from .errors import WalFormatError

__all__ = [
    "MAGIC",
    "FORMAT_VERSION",
    "SEGMENT_HEADER_SIZE",
    "RECORD_HEADER_SIZE",
    "MAX_RECORD_BYTES",
    "MAX_LSN",
    "SegmentHeader",
    "DecodedRecord",
    "Damage",
    "WalFormatError",
    "ShortHeader",
    "BadHeader",
    "UnsupportedVersion",
    "TruncatedRecord",
    "DamagedRecord",
    "encode_segment_header",
    "decode_segment_header",
    "encode_record",
    "append_unsealed",
    "seal_records",
    "decode_record",
    "RecordScanner",
    "MANIFEST_NAME",
    "encode_manifest",
    "decode_manifest",
    "segment_name",
    "SEGMENT_FILE",
    "CHECKPOINT_NAME",
    "encode_checkpoint",
    "decode_checkpoint",
    "Checkpoint",
]

MAGIC = b"BRKDWAL\n"  # the newline makes a text-mode transfer that mangles line endings visible
FORMAT_VERSION = 1  # the only version this code writes; see "How to bump the version" above

SEGMENT_HEADER = struct.Struct(">8sHHIQ")  # magic, version, flags, salt, first_lsn
SEGMENT_HEADER_SIZE = SEGMENT_HEADER.size  # 24 bytes
_VERSION = struct.Struct(">H")  # the version alone, read before the rest of the header is trusted

RECORD_HEADER = struct.Struct(">IIQBB")  # length, crc, lsn, type, flags
RECORD_HEADER_SIZE = RECORD_HEADER.size  # 18 bytes
CRC_OFFSET = 4  # where the crc field sits inside a record
CRC_START = 8  # the CRC covers the record from here (lsn) to the end of the payload
_CRC_FIELD = struct.Struct(">I")
_LENGTH_FIELD = struct.Struct(">I")
LSN_FIELD = struct.Struct(">Q")  # the lsn field alone: its bytes are what a search for a record looks for

MAX_RECORD_BYTES = 64 * 1024 * 1024  # payload bytes; a record larger than this is damage, not data
MAX_LSN = 2**64 - 1  # lsn is a u64

MANIFEST_NAME = "MANIFEST"  # where the log starts and which lsn ranges a repair dropped
_MANIFEST_MAGIC = "brokerd-wal-manifest 1"
MAX_MANIFEST_BYTES = 1 << 20  # a manifest is a few lines; read no more than this (more is damage)
CHECKPOINT_NAME = "CHECKPOINT"  # where the newest checkpoint of the broker state begins (a hint)
_CHECKPOINT_MAGIC = "brokerd-wal-checkpoint 1"
SEGMENT_FILE = re.compile(r"^(\d{20})\.wal$")  # a segment's file name: its first lsn, 20 digits


def segment_name(first_lsn: int) -> str:
    """File name of the segment whose first record is ``first_lsn``."""
    return f"{first_lsn:020d}.wal"


# --------------------------------------------------------------------------- errors


class ShortHeader(WalFormatError):
    """Fewer bytes than a segment header: a file cut off while being created."""


class BadHeader(WalFormatError):
    """The segment header is the right size but not a header we can use."""


class UnsupportedVersion(BadHeader):
    """The header names a format version this code cannot read (a newer brokerd wrote it)."""

    def __init__(self, version: int) -> None:
        self.version = version
        super().__init__(
            f"segment format version {version} is not supported "
            f"(this brokerd reads version {FORMAT_VERSION})"
        )


class TruncatedRecord(WalFormatError):
    """The record's header or payload runs past the end of the bytes given."""

    def __init__(self, offset: int, needed: int, available: int) -> None:
        self.offset = offset
        self.needed = needed  # bytes the record claims from `offset` on
        self.available = available  # bytes there actually are from `offset` on
        super().__init__(
            f"record at offset {offset} needs {needed} bytes but only {available} remain"
        )


class DamagedRecord(WalFormatError):
    """The record is complete (or claims an impossible size) but is not valid."""

    def __init__(self, offset: int, kind: str, message: str, length: int | None) -> None:
        self.offset = offset
        self.kind = kind  # one of Damage.TOO_LONG / BAD_CRC / BAD_TYPE
        self.length = length  # the declared payload length, None if implausible
        super().__init__(message)


# --------------------------------------------------------------------------- header


@dataclass(frozen=True, slots=True)
class SegmentHeader:
    version: int
    flags: int
    salt: int
    first_lsn: int


def encode_segment_header(salt: int, first_lsn: int) -> bytes:
    """The 24 bytes that open a segment whose first record will be ``first_lsn``."""
    if not 0 <= salt <= 0xFFFFFFFF:
        raise ValueError(f"salt must be a u32 (got {salt})")
    if not 1 <= first_lsn <= MAX_LSN:
        raise ValueError(f"first_lsn must be 1..2**64-1 (got {first_lsn})")
    return SEGMENT_HEADER.pack(MAGIC, FORMAT_VERSION, 0, salt, first_lsn)


def decode_segment_header(data: bytes | bytearray | memoryview) -> SegmentHeader:
    """Parse the header at the start of ``data``.

    Raises ``ShortHeader`` if ``data`` is shorter than a header,
    ``UnsupportedVersion`` for a version other than 1 (checked right after the
    magic, so a future version can change everything after it), and
    ``BadHeader`` for anything else wrong.
    """
    if len(data) < SEGMENT_HEADER_SIZE:
        raise ShortHeader(
            f"segment is {len(data)} bytes, shorter than its {SEGMENT_HEADER_SIZE}-byte header"
        )
    if bytes(data[:8]) != MAGIC:
        raise BadHeader(f"segment does not start with the magic {MAGIC!r}")
    (version,) = _VERSION.unpack_from(data, 8)
    if version == 0:
        # A zeroed version is damage (or a preallocated file), not a format
        # from the past: version 1 was the first.
        raise BadHeader("segment header has format version 0")
    if version != FORMAT_VERSION:
        raise UnsupportedVersion(version)
    _, version, flags, salt, first_lsn = SEGMENT_HEADER.unpack_from(data, 0)
    if flags != 0:
        raise BadHeader(f"segment header has unknown flags 0x{flags:04x} (version 1 defines none)")
    if first_lsn == 0:
        raise BadHeader("segment header has first_lsn 0 (lsns start at 1)")
    return SegmentHeader(version, flags, salt, first_lsn)


# --------------------------------------------------------------------------- records


def _check_fields(lsn: int, type: int, flags: int, payload_len: int) -> None:
    if not 1 <= lsn <= MAX_LSN:
        raise ValueError(f"lsn must be 1..2**64-1 (got {lsn})")
    if not 1 <= type <= 255:
        raise ValueError(f"record type must be 1..255 (got {type!r}); 0 is reserved")
    if not 0 <= flags <= 255:
        raise ValueError(f"record flags must be 0..255 (got {flags!r})")
    if payload_len > MAX_RECORD_BYTES:
        raise ValueError(
            f"record payload is {payload_len} bytes; the limit is {MAX_RECORD_BYTES} bytes"
        )


def encode_record(salt: int, lsn: int, type: int, flags: int, payload: bytes) -> bytes:
    """One sealed record (CRC filled in) for a segment with this ``salt``."""
    _check_fields(lsn, type, flags, len(payload))
    body = RECORD_HEADER.pack(len(payload), 0, lsn, type, flags)[CRC_START:] + bytes(payload)
    crc = zlib.crc32(body, salt)
    return _LENGTH_FIELD.pack(len(payload)) + _CRC_FIELD.pack(crc) + body


def append_unsealed(buf: bytearray, lsn: int, type: int, flags: int, payload: bytes) -> None:
    """Append a record with a zero CRC to ``buf``; ``seal_records`` fills it in.

    The log's ``append`` inlines this for speed; it is here so the format has
    one documented home and tests can check the two agree.
    """
    _check_fields(lsn, type, flags, len(payload))
    buf += RECORD_HEADER.pack(len(payload), 0, lsn, type, flags)
    buf += payload


def seal_records(buf: bytearray, salt: int) -> int:
    """Fill in the CRC of every record in ``buf`` (whole records, back to back).

    Returns the number of records.  ``buf`` must hold only records written by
    ``append_unsealed`` (or already sealed ones, which are re-sealed).
    """
    n = len(buf)
    count = 0
    off = 0
    unpack_length = _LENGTH_FIELD.unpack_from
    pack_crc = _CRC_FIELD.pack_into
    crc32 = zlib.crc32
    with memoryview(buf) as view:
        while off < n:
            (length,) = unpack_length(buf, off)
            end = off + RECORD_HEADER_SIZE + length
            if end > n:
                raise ValueError(f"unsealed batch is cut off: record at offset {off} runs past {n}")
            pack_crc(buf, off + CRC_OFFSET, crc32(view[off + CRC_START : end], salt))
            off = end
            count += 1
    return count


class DecodedRecord(NamedTuple):
    lsn: int
    type: int
    flags: int
    payload: bytes
    offset: int  # where the record starts in the bytes it was decoded from
    end: int  # offset just past its payload


def decode_record(data: bytes | bytearray, offset: int, salt: int) -> DecodedRecord:
    """Decode the one record starting at ``offset``.

    Raises ``TruncatedRecord`` if its header or payload runs past the end of
    ``data``, ``DamagedRecord`` if its length is impossible, its CRC does not
    match ``salt``, or its type is the reserved 0.  LSN order is the caller's
    business (see ``RecordScanner``).
    """
    size = len(data)
    if offset < 0:
        raise ValueError(f"offset must be >= 0 (got {offset})")
    available = max(size - offset, 0)
    if available < RECORD_HEADER_SIZE:
        raise TruncatedRecord(offset, RECORD_HEADER_SIZE, available)
    length, crc, lsn, type_, flags = RECORD_HEADER.unpack_from(data, offset)
    if length > MAX_RECORD_BYTES:
        raise DamagedRecord(
            offset,
            Damage.TOO_LONG,
            f"record at offset {offset} claims {length} payload bytes, "
            f"more than the {MAX_RECORD_BYTES}-byte limit",
            None,
        )
    end = offset + RECORD_HEADER_SIZE + length
    if end > size:
        raise TruncatedRecord(offset, RECORD_HEADER_SIZE + length, available)
    with memoryview(data) as view:
        actual = zlib.crc32(view[offset + CRC_START : end], salt)
    if actual != crc:
        raise DamagedRecord(
            offset,
            Damage.BAD_CRC,
            f"record at offset {offset} fails its checksum "
            f"(stored 0x{crc:08x}, computed 0x{actual:08x})",
            length,
        )
    if type_ == 0:
        raise DamagedRecord(offset, Damage.BAD_TYPE, f"record at offset {offset} has type 0", length)
    return DecodedRecord(lsn, type_, flags, bytes(data[offset + RECORD_HEADER_SIZE : end]), offset, end)


@dataclass(frozen=True, slots=True)
class Damage:
    """Why a ``RecordScanner`` stopped before the end of its bytes."""

    SHORT_HEADER = "short_header"  # fewer than 18 bytes left: the header runs past the end
    SHORT_PAYLOAD = "short_payload"  # the payload runs past the end
    TOO_LONG = "too_long"  # the length field exceeds MAX_RECORD_BYTES
    BAD_CRC = "bad_crc"  # complete record, checksum mismatch
    BAD_TYPE = "bad_type"  # checksum fine, type 0 (only a buggy writer does this)
    BAD_LSN = "bad_lsn"  # checksum fine, lsn is not the one expected next

    kind: str
    offset: int  # where the bad record starts
    length: int | None  # its declared payload length, None when implausible or unreadable
    detail: str  # a sentence for error messages

    @property
    def runs_past_end(self) -> bool:
        return self.kind in (Damage.SHORT_HEADER, Damage.SHORT_PAYLOAD)


class RecordScanner:
    """Iterate over the records in ``data[start:]``, stopping at the first bad one.

    After iteration: ``damage`` is ``None`` if every byte was a valid record,
    else a ``Damage`` saying where and why it stopped; ``end`` is the offset
    just past the last good record; ``next_lsn`` the lsn expected next;
    ``count`` the records yielded.  With ``expected_lsn=None`` the LSN order is
    not checked (used to count what a repair drops).  ``gaps`` maps the first
    lsn of each range a repair dropped to its last: a record may jump from
    ``expected`` to ``gaps[expected] + 1`` (checked only off the hot path, when
    the lsn is not the expected one).
    """

    def __init__(
        self, data: bytes, salt: int, start: int, expected_lsn: int | None, gaps: dict[int, int] | None = None
    ) -> None:
        self.data = data
        self.gaps = gaps or {}
        self.salt = salt
        self.start = start
        self.end = start
        self.next_lsn = expected_lsn
        self.count = 0
        self.damage: Damage | None = None

    def __iter__(self) -> Iterator[DecodedRecord]:
        data = self.data
        salt = self.salt
        size = len(data)
        off = self.start
        expected = self.next_lsn
        gaps = self.gaps
        unpack = RECORD_HEADER.unpack_from
        crc32 = zlib.crc32
        header_size = RECORD_HEADER_SIZE
        damage = None
        with memoryview(data) as view:
            while off < size:
                if size - off < header_size:
                    damage = Damage(
                        Damage.SHORT_HEADER, off, None,
                        f"record header runs past the end of the segment ({size - off} of 18 bytes)",
                    )
                    break
                length, crc, lsn, type_, flags = unpack(data, off)
                if length > MAX_RECORD_BYTES:
                    damage = Damage(
                        Damage.TOO_LONG, off, None,
                        f"record length {length} exceeds the {MAX_RECORD_BYTES}-byte limit",
                    )
                    break
                end = off + header_size + length
                if end > size:
                    damage = Damage(
                        Damage.SHORT_PAYLOAD, off, length,
                        f"record payload runs past the end of the segment "
                        f"({size - off - header_size} of {length} bytes)",
                    )
                    break
                if crc32(view[off + CRC_START : end], salt) != crc:
                    damage = Damage(Damage.BAD_CRC, off, length, "record checksum mismatch")
                    break
                if type_ == 0:
                    damage = Damage(Damage.BAD_TYPE, off, length, "record type 0 is reserved")
                    break
                if expected is not None:
                    if lsn != expected and not (gaps and gaps.get(expected, -2) == lsn - 1):
                        damage = Damage(
                            Damage.BAD_LSN, off, length,
                            f"record lsn {lsn} does not follow lsn {expected - 1}",
                        )
                        break
                    expected = lsn + 1
                payload = data[off + header_size : end]
                yield DecodedRecord(lsn, type_, flags, payload, off, end)
                off = end
                self.end = end
                self.next_lsn = expected
                self.count += 1
        self.damage = damage


# --------------------------------------------------------------------------- manifest


def encode_manifest(start: int, gaps: dict[int, int]) -> bytes:
    """The manifest's bytes: where the log starts, the gaps a repair left, a CRC of both."""
    lines = [_MANIFEST_MAGIC, f"start {start}"] + [f"gap {a} {b}" for a, b in sorted(gaps.items())]
    body = "\n".join(lines) + "\n"
    return (body + f"crc {zlib.crc32(body.encode()):08x}\n").encode()


def decode_manifest(data: bytes) -> tuple[int, dict[int, int]]:
    """Parse a manifest; ``ValueError`` naming what is wrong."""
    try:
        text = data.decode("ascii")
    except UnicodeDecodeError:
        raise ValueError(f"{MANIFEST_NAME} is not ASCII text") from None
    body, sep, tail = text.rpartition("crc ")
    if not sep or not body.endswith("\n") or not tail.endswith("\n"):
        raise ValueError(f"{MANIFEST_NAME} has no crc line (cut off?)")
    try:
        stored = int(tail.strip(), 16)
    except ValueError:
        raise ValueError(f"{MANIFEST_NAME} has an unreadable crc line") from None
    if zlib.crc32(body.encode()) != stored:
        raise ValueError(f"{MANIFEST_NAME} fails its checksum")
    lines = body.splitlines()
    if not lines or lines[0] != _MANIFEST_MAGIC:
        raise ValueError(f"{MANIFEST_NAME} does not start with {_MANIFEST_MAGIC!r}")
    start = None
    gaps: dict[int, int] = {}
    for line in lines[1:]:
        word, *nums = line.split()
        try:
            values = [int(n) for n in nums]
        except ValueError:
            raise ValueError(f"{MANIFEST_NAME} has an unreadable line {line!r}") from None
        if word == "start" and len(values) == 1 and values[0] >= 1:
            start = values[0]
        elif word == "gap" and len(values) == 2 and 1 <= values[0] <= values[1]:
            gaps[values[0]] = values[1]
        else:
            raise ValueError(f"{MANIFEST_NAME} has an unknown line {line!r}")
    if start is None:
        raise ValueError(f"{MANIFEST_NAME} has no start line")
    return start, gaps


# --------------------------------------------------------------------------- checkpoint pointer


def encode_checkpoint(lsn: int, segment: str, offset: int, prefix: int, sums: dict[str, int]) -> bytes:
    """The checkpoint pointer's bytes: the lsn, segment and offset of a checkpoint's first
    record, the CRC of the bytes before it in that segment and of each older segment."""
    if not SEGMENT_FILE.match(segment) or any(not SEGMENT_FILE.match(n) for n in sums):
        raise ValueError(f"not a segment file name: {segment!r}")
    lines = [_CHECKPOINT_MAGIC, f"lsn {lsn}", f"segment {segment}", f"offset {offset}", f"prefix {prefix:08x}"]
    lines += [f"sum {name} {crc:08x}" for name, crc in sorted(sums.items())]
    body = "\n".join(lines) + "\n"
    return (body + f"crc {zlib.crc32(body.encode()):08x}\n").encode()


class Checkpoint(NamedTuple):
    lsn: int  # of the checkpoint's first record
    segment: str  # the segment file holding it
    offset: int  # its byte offset there
    prefix: int  # zlib.crc32 of the segment's bytes before it
    sums: dict  # segment name -> zlib.crc32 of the whole file, for every older segment


def decode_checkpoint(data: bytes) -> Checkpoint:
    """Parse a checkpoint pointer; ``ValueError`` naming what is wrong."""
    try:
        text = data.decode("ascii")
    except UnicodeDecodeError:
        raise ValueError(f"{CHECKPOINT_NAME} is not ASCII text") from None
    body, sep, tail = text.rpartition("crc ")
    if not sep or not body.endswith("\n") or not tail.endswith("\n"):
        raise ValueError(f"{CHECKPOINT_NAME} has no crc line (cut off?)")
    try:
        stored = int(tail.strip(), 16)
    except ValueError:
        raise ValueError(f"{CHECKPOINT_NAME} has an unreadable crc line") from None
    if zlib.crc32(body.encode()) != stored:
        raise ValueError(f"{CHECKPOINT_NAME} fails its checksum")
    lines = body.splitlines()
    if len(lines) < 5 or lines[0] != _CHECKPOINT_MAGIC:
        raise ValueError(f"{CHECKPOINT_NAME} is not a version 1 checkpoint pointer")
    fields: dict = {}
    sums: dict[str, int] = {}
    try:
        for line in lines[1:]:
            word, _, value = line.partition(" ")
            if word == "sum":
                name, crc = value.split(" ")
                if not SEGMENT_FILE.match(name):
                    raise ValueError
                sums[name] = int(crc, 16)
            elif word in ("lsn", "segment", "offset", "prefix") and word not in fields:
                fields[word] = value
            else:
                raise ValueError
        lsn, segment, offset = int(fields["lsn"]), fields["segment"], int(fields["offset"])
        prefix = int(fields["prefix"], 16)
    except (KeyError, ValueError):
        raise ValueError(f"{CHECKPOINT_NAME} has an unreadable line") from None
    if not 1 <= lsn <= MAX_LSN or not SEGMENT_FILE.match(segment) or offset < SEGMENT_HEADER_SIZE:
        raise ValueError(f"{CHECKPOINT_NAME} names an impossible record (lsn {lsn}, {segment!r}, offset {offset})")
    return Checkpoint(lsn, segment, offset, prefix, sums)
