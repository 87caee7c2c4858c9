"""Reading the log back at start-up: replay, torn tail or corruption, the manifest.

``WriteAheadLog.open()`` drives this: it reads the manifest, lets
``repair.py`` salvage the directory first when asked, then replays the
segments with ``replay_segments``, which yields every record and decides, at
the first bad byte, whether it is a torn tail (cut it off) or corruption
(refuse to start).  Replay fsyncs what it truncates or deletes; the bytes
themselves are ``format.py``'s business.

Replay rules
------------
* The oldest segment must start at or before the manifest's ``start``
  (older ones are left by a crash between the manifest and the deletes, and
  are replayed); a later first lsn is ``MissingRecords`` (exit 3), naming the
  missing lsn range.  So is a manifest with no segment file left.
* Segments are replayed oldest to newest.  Each must start with the lsn after
  the previous segment's last record; within a segment each record's lsn is
  the previous + 1.  The one exception is a recorded ``gap a b``: the lsn
  may jump from ``a`` to ``b + 1`` (the scanner looks the gap up only when an
  lsn is not the expected one, so it costs the hot path nothing).
* In the **last** segment, a *torn tail* (a crash in the middle of a write)
  is: a record whose length runs past end of file (with no valid record
  after it), or a record that is zero bytes from a 512-byte sector boundary
  inside it to the end of the file (a power cut lost pages of an extended
  file).  It is truncated (``ftruncate`` + fsync), logged as a warning and
  reported in ``recovery``.  A last segment shorter than its header, or all
  zero, is a crash while rotating: it is deleted.  A *complete* record with a
  bad CRC is never a torn tail, even the very last one.
* Anything else is corruption: ``CorruptLog`` names the file and byte offset.
* A header with a version other than 1 raises ``WalVersionError``; repair
  never touches such a file.
"""

from __future__ import annotations

import logging
import os
import zlib
from dataclasses import dataclass
from typing import Callable, Generator, NamedTuple

from .errors import CorruptLog, WalError, WalFormatError, WalVersionError
from .files import LogFiles, SegmentFile
from .format import (
    CHECKPOINT_NAME,
    CRC_START,
    Checkpoint,
    MANIFEST_NAME,
    MAX_LSN,
    MAX_MANIFEST_BYTES,
    RECORD_HEADER_SIZE,
    SEGMENT_HEADER_SIZE,
    LSN_FIELD,
    Damage,
    RecordScanner,
    UnsupportedVersion,
    decode_manifest,
    decode_record,
    decode_segment_header,
)

__all__ = [
    "Record",
    "RecoveryReport",
    "DroppedRange",
    "ReplayState",
    "MissingRecords",
    "read_manifest",
    "replay_segments",
    "is_torn_tail",
    "gap_covering",
]

logger = logging.getLogger("brokerd.wal")

# When a damaged record in the last segment might be a torn tail, look for a
# valid record with any of the next this-many lsns after it; finding one means
# the damage is in the middle of the log, not at its end.
TAIL_LOOKAHEAD_RECORDS = 4
# Unsynced pages lost in a power cut come back as zeros from a sector
# boundary on; zeros that start mid-sector inside a complete record are a
# damaged record, not a lost write.  512 bytes: the smallest sector size.
SECTOR_BYTES = 512


class Record(NamedTuple):
    """One record as replay yields it."""

    lsn: int
    type: int
    flags: int
    payload: bytes
    segment_name: str
    offset: int  # byte offset of the record's length field in that segment


class DroppedRange(NamedTuple):
    """What a repair dropped: ``nbytes`` bytes of ``segment`` from ``offset``.

    ``first_lsn``..``last_lsn`` are the lsns that went with them (``last_lsn``
    None: the end of the log, so their number is unknown; ``first_lsn`` None:
    not even where they start is known).  ``records``: how many, None if unknown.
    """

    segment: str
    offset: int
    nbytes: int
    first_lsn: int | None
    last_lsn: int | None
    records: int | None
    reason: str


@dataclass(frozen=True, slots=True)
class RecoveryReport:
    """What ``open()`` found and did; read ``wal.recovery`` after replay."""

    records: int  # records replayed (yielded)
    segments: int  # segment files replayed
    bytes: int  # bytes read from segment files
    truncated_bytes: int  # torn tail (or repair) bytes cut off or deleted
    truncated_at: tuple[str, int] | None  # (segment file name, byte offset) of the cut
    seconds: float  # wall time of the replay, consumer's time included
    next_lsn: int  # the lsn the next append gets
    repaired: bool = False  # open(repair=True) had to drop records
    dropped_records: int = 0  # records a repair dropped (see dropped_records_exact)
    dropped_records_exact: bool = True  # False: "at least dropped_records"
    deleted_segments: tuple[str, ...] = ()
    warnings: tuple[str, ...] = ()
    dropped: tuple[DroppedRange, ...] = ()  # what a repair dropped, oldest first


class ReplayState:
    """Counters gathered while replaying, turned into a RecoveryReport at the end."""

    def __init__(self) -> None:
        self.records = 0
        self.segments = 0
        self.bytes = 0
        self.truncated_bytes = 0
        self.truncated_at: tuple[str, int] | None = None
        self.repaired = False
        self.dropped = 0
        self.dropped_exact = True
        self.deleted: list[str] = []
        self.warnings: list[str] = []
        self.min_next_lsn = 1  # raised past a deleted torn segment's name
        self.dropped_ranges: list[DroppedRange] = []
        self.allow_empty = False  # a repair accepted that every segment file is gone
        self.skipped: list[str] = []  # segments wholly before the checkpoint replay started from

    def warn(self, message: str) -> None:
        self.warnings.append(message)
        logger.warning("%s", message)

    def report(self, seconds: float, next_lsn: int) -> RecoveryReport:
        return RecoveryReport(
            records=self.records,
            segments=self.segments,
            bytes=self.bytes,
            truncated_bytes=self.truncated_bytes,
            truncated_at=self.truncated_at,
            seconds=seconds,
            next_lsn=next_lsn,
            repaired=self.repaired,
            dropped_records=self.dropped,
            dropped_records_exact=self.dropped_exact,
            deleted_segments=tuple(self.deleted),
            warnings=tuple(self.warnings),
            dropped=tuple(self.dropped_ranges),
        )


class MissingRecords(CorruptLog):
    """Segment files the log needs are gone: an lsn range is missing at the start."""

    def __init__(self, directory: str, first: int, last: int | None, detail: str) -> None:
        self.first_missing = first
        self.last_missing = last  # None: everything from ``first`` on
        path = os.path.join(directory, MANIFEST_NAME)
        WalError.__init__(
            self,
            f"write-ahead log is missing records: {detail}; lsns {first}.."
            f"{'' if last is None else last} are gone from {directory} (a deleted or lost segment file); "
            f"restore the missing segment file(s), or start brokerd with --repair to accept the loss "
            f"(it lists what was dropped)",
        )
        self.path = path
        self.segment = MANIFEST_NAME
        self.offset = 0
        self.reason = detail


# --------------------------------------------------------------------------- replay


def read_manifest(files: LogFiles, repair: bool, st: ReplayState) -> tuple[int, dict[int, int]] | None:
    """The manifest as ``(start, gaps)``; None if there is none (or, repairing, it is damaged)."""
    path = os.path.join(files.directory, MANIFEST_NAME)
    try:
        with open(path, "rb") as f:
            data = f.read(MAX_MANIFEST_BYTES)
    except FileNotFoundError:
        return None
    try:
        return decode_manifest(data)
    except ValueError as e:
        if not repair:
            raise CorruptLog(path, 0, str(e)) from None
        st.warn(f"repair of {files.directory}: ignoring damaged {MANIFEST_NAME} ({e}); rebuilding it from the segments")
        return None


def replay_segments(
    files: LogFiles,
    manifest: tuple[int, dict[int, int]] | None,
    st: ReplayState,
    add_segment: Callable[[SegmentFile], None],
    skip_to: Checkpoint | None = None,
    mark_unparsed: Callable[[str, bytes, int, int, int, int], None] | None = None,
) -> Generator[Record, None, int]:
    """Yield the records; return the next lsn.  Hands each segment to ``add_segment``.

    ``skip_to``, a checked checkpoint pointer: the records before it are not parsed.  The
    segments wholly before it are kept (queued bodies are read back from them) and checked
    against the pointer's whole-file CRCs, as are the bytes before the checkpoint in its own
    segment, which is scanned from the checkpoint on, with the lsn expected there.
    ``mark_unparsed(name, data, salt, first lsn, last lsn, end)`` is handed those bytes.
    """
    segments: list[SegmentFile] = []
    listing = files.list_segments()
    start = manifest[0] if manifest is not None else None
    gaps = dict(manifest[1]) if manifest is not None else {}
    expected: int | None = None  # lsn the next record must have (or a gap must start at)
    skip_first = int(skip_to.segment[:20]) if skip_to is not None else 0  # first lsn of the checkpoint's segment
    for index, (name_lsn, name) in enumerate(listing):
        is_last = index == len(listing) - 1
        path = os.path.join(files.directory, name)
        skipped = name_lsn < skip_first and not is_last
        with open(path, "rb") as f:
            data = f.read()
        size = len(data)
        st.bytes += size

        try:
            header = decode_segment_header(data)
        except UnsupportedVersion as e:
            raise WalVersionError(path, e.version, 1) from None
        except WalFormatError as e:
            if is_last and (len(data) < SEGMENT_HEADER_SIZE or data.count(0) == len(data)):
                # A crash while rotating: the file exists but its header
                # never fully reached the disk, so no record in it was
                # ever written, let alone confirmed.
                what = "all zero bytes" if len(data) >= SEGMENT_HEADER_SIZE else "shorter than its header"
                st.deleted.extend(files.remove_files([path]))
                st.truncated_bytes += len(data)
                st.truncated_at = (name, 0)
                st.min_next_lsn = max(st.min_next_lsn, name_lsn)
                st.warn(
                    f"deleted {name} in {files.directory}: {len(data)} bytes, {what} "
                    f"(a crash while the segment was being created)"
                )
                break
            raise CorruptLog(path, 0, str(e)) from None

        first = header.first_lsn
        if first != name_lsn:
            raise CorruptLog(
                path, 0, f"segment header says its first lsn is {first} but its file name says {name_lsn}"
            )
        if expected is None:
            # The oldest segment must reach back to where the manifest
            # says the log starts.  Older segments are fine: a crash
            # between writing the manifest and deleting them.
            expected = first
            if start is not None and first > start:
                covering = gap_covering(gaps, start, first - 1)
                if covering is None:
                    raise MissingRecords(
                        files.directory, start, first - 1,
                        f"the log starts at lsn {start} (see {MANIFEST_NAME}) but the oldest segment "
                        f"file, {name}, starts at lsn {first}",
                    )
                expected = covering
        elif first != expected:
            if first > expected and (
                (start is not None and first <= start) or gaps.get(expected, -2) >= first - 1
            ):
                if start is not None and first <= start:
                    expected = first
                # else: a gap a repair left; the scanner jumps over it
            else:
                raise CorruptLog(
                    path, 0,
                    f"segment starts at lsn {first} but the previous segment ended at lsn {expected - 1}",
                )

        seg = SegmentFile(name, path, first, size, header.salt)
        segments.append(seg)
        add_segment(seg)
        st.segments += 1
        if skipped:
            seg.crc = zlib.crc32(data)
            if seg.crc != skip_to.sums.get(name):
                _name_the_damage(path, data, header.salt, expected, gaps, len(data))
            seg.last_lsn = listing[index + 1][0] - 1  # segments are contiguous (a repair gap only shortens it)
            if mark_unparsed is not None:
                mark_unparsed(name, data, header.salt, first, seg.last_lsn, len(data))
            st.skipped.append(name)
            expected = seg.last_lsn + 1
            continue
        offset = SEGMENT_HEADER_SIZE
        if skip_to is not None and name == skip_to.segment:
            with memoryview(data) as view:
                if zlib.crc32(view[:skip_to.offset]) != skip_to.prefix:
                    _name_the_damage(path, data, header.salt, expected, gaps, skip_to.offset)
                seg.crc = zlib.crc32(view[skip_to.offset:], skip_to.prefix)  # the whole file's
            if mark_unparsed is not None:
                mark_unparsed(name, data, header.salt, first, skip_to.lsn - 1, skip_to.offset)
            expected, offset = skip_to.lsn, skip_to.offset
        else:
            seg.crc = zlib.crc32(data)
        scanner = RecordScanner(data, header.salt, offset, expected, gaps)
        for r in scanner:
            yield Record(r.lsn, r.type, r.flags, r.payload, name, r.offset)
        st.records += scanner.count
        expected = scanner.next_lsn
        seg.last_lsn = max(expected - 1, first - 1)
        damage = scanner.damage
        if damage is None:
            continue
        if is_last and is_torn_tail(data, damage, header.salt, expected):
            cut = damage.offset
            files.truncate_file(path, name, cut)
            seg.size = cut
            with memoryview(data) as view:
                seg.crc = zlib.crc32(view[:cut])
            st.truncated_bytes += len(data) - cut
            st.truncated_at = (name, cut)
            st.warn(
                f"truncated torn tail of {name} in {files.directory}: {len(data) - cut} bytes "
                f"from byte offset {cut} ({damage.detail}); the last whole record is lsn {expected - 1}"
            )
            break
        raise CorruptLog(path, damage.offset, damage.detail)

    if not segments and start is not None and not st.allow_empty and not (
        st.min_next_lsn >= start and st.deleted
    ):
        raise MissingRecords(
            files.directory, start, None,
            f"the log starts at lsn {start} (see {MANIFEST_NAME}) but no segment file is left",
        )
    if expected is None:
        return max(1, start or 1)
    return max(expected, segments[-1].first_lsn) if segments else expected


def _name_the_damage(path: str, data: bytes, salt: int, first_lsn: int, gaps: dict, end: int) -> None:
    """Bytes before the checkpoint fail the CRC its pointer recorded: find the damaged record
    (a scan, as a whole replay would do) and raise ``CorruptLog`` naming it."""
    scanner = RecordScanner(data[:end], salt, SEGMENT_HEADER_SIZE, first_lsn, gaps)
    for _ in scanner:
        pass
    if scanner.damage is not None:
        raise CorruptLog(path, scanner.damage.offset, scanner.damage.detail)
    raise CorruptLog(
        path, 0,
        f"the segment does not match the checksum {CHECKPOINT_NAME} recorded for it (yet every record "
        f"in it reads back): delete {CHECKPOINT_NAME} to read the whole log, or start with --repair",
    )


def is_torn_tail(data: bytes, damage: Damage, salt: int, expected_lsn: int) -> bool:
    """Is the damage in the last segment a torn write (True) or corruption?

    A crash mid-write leaves a prefix of the last batch: a record whose
    length runs past end of file.  A power cut can also leave the file
    extended with zeros where unsynced pages were lost; those zeros start at
    a sector boundary.  So a torn tail is: a record that runs past the end
    (with no valid record after it: that would prove the log went on), or a
    record whose bytes are zero from a sector boundary inside it (or from its
    start) to the end of the file.  A *complete* record with a bad checksum
    and no such zeros is a damaged record: corruption, never trimmed.  A
    record with a good checksum but the wrong lsn is never torn.
    """
    if damage.kind == Damage.BAD_LSN:
        return False
    size = len(data)
    if damage.runs_past_end:
        return not valid_record_follows(data, damage.offset + 1, salt, expected_lsn)
    if damage.length is None:  # impossible length: torn only if all that follows its header is zero
        end = damage.offset + RECORD_HEADER_SIZE
        return data.count(0, end) == size - end and not valid_record_follows(
            data, damage.offset + 1, salt, expected_lsn
        )
    end = damage.offset + RECORD_HEADER_SIZE + damage.length
    zeros_from = len(data.rstrip(b"\0"))  # the trailing zero run starts here
    if zeros_from <= damage.offset:
        return True  # the record and all after it are zero
    boundary = -(-max(zeros_from, damage.offset + 1) // SECTOR_BYTES) * SECTOR_BYTES
    return boundary < end


def valid_record_follows(data: bytes, start: int, salt: int, expected_lsn: int) -> bool:
    # Search for the lsn field's bytes (fast, in C) rather than trying a
    # decode at every offset; confirm candidates with a full decode.
    for lsn in range(expected_lsn, min(expected_lsn + TAIL_LOOKAHEAD_RECORDS, MAX_LSN + 1)):
        needle = LSN_FIELD.pack(lsn)
        hit = data.find(needle, start + CRC_START)
        while hit != -1:
            try:
                if decode_record(data, hit - CRC_START, salt).lsn == lsn:
                    return True
            except WalFormatError:
                pass
            hit = data.find(needle, hit + 1)
    return False


def gap_covering(gaps: dict[int, int], first: int, last: int) -> int | None:
    """The start of a recorded gap holding every lsn first..last, else None."""
    for a, b in gaps.items():
        if a <= first and b >= last:
            return a
    return None
