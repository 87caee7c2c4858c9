"""The write-ahead log: segment files on disk.

The broker state produces records ``(type 1..255, payload bytes)``; this
module gives each one a log sequence number (LSN), writes them in batches,
fsyncs them per policy, rotates and deletes segment files, and replays them
at startup.  It knows nothing about what a payload means, and it does not use
trio: the server calls ``write_batch`` through ``trio.to_thread.run_sync``.

On-disk format, version 1
=========================

A log is one directory::

    LOCK                          fcntl.flock'd by the running brokerd
    MANIFEST                      where the log starts, and the gaps a repair left
    00000000000000000001.wal      segment whose first record is lsn 1
    00000000000000004711.wal      ... lsn 4711 (names sort in lsn order)

Any other file is left alone.  Segments are never rewritten: only appended
to, truncated at a torn tail, or deleted whole from the oldest end (and
rewritten by ``--repair``, below).

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

``tests/test_wal_records.py`` pins these bytes, CRC included.

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

Repair (``open(repair=True)``, ``brokerd --repair``) drops only what it cannot
read.  It checks every segment; at a bad record it resynchronises on the next
record whose CRC passes with the segment's salt and whose lsn is plausible
(greater than the last kept one, below the next segment's first, and at most
one lsn per 18 skipped bytes); a damaged header is rebuilt from the file name
and its salt solved from an intact record's CRC (CRC-32 is affine in its seed)
and confirmed by the record after it.  A segment that lost anything is
rewritten under the same name (same salt, the kept records' bytes unchanged,
temporary file + rename), and every lsn range now missing becomes a manifest
gap.  Each dropped range is logged and reported (``recovery.dropped``: file,
offset, bytes, lsns).  Repair is idempotent: a crash during it, rerun it.

How to bump the version
-----------------------
(After beanstalkd's ``Walver``.)  The version lives in every segment header,
so old and new segments can sit in one directory during an upgrade.

1. Only bump for a change an old reader would misread.  Adding a record
   *type* is not a format change: the payload is the broker state's business.
2. Set ``records.FORMAT_VERSION`` to N+1 and write only the new layout.
3. Keep a reader for every older version: rename the current decoding code
   to ``decode_v<N>`` and make ``decode_segment_header`` and the scanner
   dispatch on the header's version instead of refusing it.  Keep the magic
   and the version field where they are (offsets 0 and 8) forever: that is
   how an old brokerd reading a new file says "version N+1 is not supported"
   instead of "corrupt".
4. Add a test with the exact bytes of a version-N segment (copy the table
   test in ``tests/test_wal_records.py``) and check it still replays.
5. Say in the release notes that downgrading after the new version has
   written a segment needs the old segments only: delete the new ones first.

Durability
----------
``fsync="always"``: each ``write_batch`` is one ``os.write`` and one
``fdatasync``; ``durable_lsn`` moves only after the fsync.  ``"interval"``:
``write_batch`` fsyncs when ``fsync_interval_ms`` has passed since the last
fsync and the caller also calls ``sync()`` on a timer; ``durable_lsn`` moves
after the write, so a power cut can lose the last interval (a kill -9 cannot:
the kernel still has the pages).  ``"never"``: no fsync for data.

Whatever the policy, structural steps are always synced, because skipping
them can make a log that refuses to start rather than one that lost its
tail: before a new segment is created the old one is fsynced (otherwise a
power cut could keep the new file but lose the old one's tail: an lsn gap),
the new segment's header and the directory are fsynced, and replay fsyncs
what it truncates and the head segment it will append to.

Running out of file descriptors (EMFILE/ENFILE) is not a disk fault and
never fails the log: the directory fd is held open for its fsyncs, one spare
descriptor is held and given back just before the log opens a file, a new
segment is opened before the old one is closed, and if that open still fails
the rotation is postponed (logged once, naming the fd limit) and retried
after each write while the head keeps growing.

Any other ``OSError`` from a write or fsync is final (``WalFailed``): after a
failed fsync Linux may have dropped the dirty pages and a retry can
"succeed" without the data (PostgreSQL's fsyncgate), so nothing is retried
and nothing more is written.  A failed write is truncated back to the last
whole batch first, so no partial record stays behind if that still works.

Threads
-------
Two sides, no shared mutable state between them:

* loop side (the event loop): ``append``, ``take_batch``, ``next_lsn``.  They
  own the pending buffer and the lsn counter.
* writer side (a worker thread): ``write_batch``, ``sync``, ``rotate``,
  ``delete_segments_through``, ``close``.  They own the file descriptors and
  the segment list and hold an internal lock, so a timer's ``sync()`` may run
  in another thread than ``write_batch``.

``segments()``, ``durable_lsn`` and ``failed`` read writer-side values without
the lock (each read is one attribute) and may be called from either side.
"""

from __future__ import annotations

import errno as _errno
import fcntl
import logging
import os
import re
import struct
import threading
import time
import zlib
from dataclasses import dataclass
from typing import Callable, Iterator, NamedTuple, Protocol

from .records import (
    CRC_START,
    MAX_LSN,
    MAX_RECORD_BYTES,
    RECORD_HEADER,
    RECORD_HEADER_SIZE,
    SEGMENT_HEADER_SIZE,
    Damage,
    DecodedRecord,
    RecordScanner,
    TruncatedRecord,
    UnsupportedVersion,
    WalFormatError,
    decode_record,
    decode_segment_header,
    encode_segment_header,
    seal_records,
)

__all__ = [
    "WriteAheadLog",
    "Record",
    "Batch",
    "SegmentInfo",
    "RecoveryReport",
    "FaultPlan",
    "Fault",
    "WalError",
    "WalLocked",
    "CorruptLog",
    "WalVersionError",
    "WalFailed",
    "FSYNC_POLICIES",
    "DEFAULT_SEGMENT_BYTES",
    "DEFAULT_FSYNC_INTERVAL_MS",
    "MIN_SEGMENT_BYTES",
    "LOCK_NAME",
    "DIRECTORY_SYNC_NAME",
    "MANIFEST_NAME",
    "MissingRecords",
    "segment_name",
]

logger = logging.getLogger("brokerd.wal")

FSYNC_POLICIES = ("always", "interval", "never")
DEFAULT_SEGMENT_BYTES = 64 * 1024 * 1024  # rotate after this much; Ra's segment size (RELIABILITY.md 1.6)
MIN_SEGMENT_BYTES = 64  # bytes; only tests want it this small; holds the 24-byte header and a record
DEFAULT_FSYNC_INTERVAL_MS = 1000  # beanstalkd/Redis "everysec": loses at most ~1 s on power loss
LOCK_NAME = "LOCK"
DIRECTORY_SYNC_NAME = "."  # what the fault seam is told when the directory itself is fsynced
SEGMENT_FILE_MODE = 0o600  # payloads are users' task data: owner-only (umask can only narrow it)
# When a damaged record in the last segment might be a torn tail, look for a
# valid record with any of the next this-many lsns after it; finding one means
# the damage is in the middle of the log, not at its end.
TAIL_LOOKAHEAD_RECORDS = 4
MANIFEST_NAME = "MANIFEST"  # where the log starts and which lsn ranges a repair dropped
_MANIFEST_MAGIC = "brokerd-wal-manifest 1"
# Unsynced pages lost in a power cut come back as zeros from a sector
# boundary on; zeros that start mid-sector inside a complete record are a
# damaged record, not a lost write.  512 bytes: the smallest sector size.
SECTOR_BYTES = 512

_SEGMENT_FILE = re.compile(r"^(\d{20})\.wal$")
_LSN_FIELD = struct.Struct(">Q")
_fdatasync = getattr(os, "fdatasync", os.fsync)  # macOS has no fdatasync
_O_CLOEXEC = getattr(os, "O_CLOEXEC", 0)
_O_DIRECTORY = getattr(os, "O_DIRECTORY", 0)


def segment_name(first_lsn: int) -> str:
    """File name of the segment whose first record is ``first_lsn``."""
    return f"{first_lsn:020d}.wal"


# --------------------------------------------------------------------------- errors


class WalError(Exception):
    """Base class of everything the write-ahead log raises on purpose."""


class WalLocked(WalError):
    """Another process (or another WriteAheadLog in this one) holds the directory."""

    def __init__(self, directory: str, holder_pid: int | None) -> None:
        self.directory = directory
        self.holder_pid = holder_pid
        who = f"another brokerd (pid {holder_pid})" if holder_pid else "another brokerd"
        super().__init__(
            f"write-ahead log directory {directory} is locked: {who} is using it; "
            f"stop it first, or give this brokerd a different data directory"
        )


class CorruptLog(WalError):
    """The log is damaged somewhere other than a torn tail; we refuse to guess."""

    def __init__(self, path: str, offset: int, reason: str) -> None:
        self.path = path
        self.segment = os.path.basename(path)
        self.offset = offset
        self.reason = reason
        super().__init__(
            f"write-ahead log is corrupt: {reason} at byte offset {offset} of {path}; "
            f"start brokerd with --repair to drop what cannot be read there "
            f"(every later valid record is kept; the repair lists what it dropped)"
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


class WalVersionError(WalError):
    """A segment was written by a newer brokerd with a format we cannot read."""

    def __init__(self, path: str, version: int, supported: int) -> None:
        self.path = path
        self.version = version
        super().__init__(
            f"{path} uses write-ahead log format version {version}, but this brokerd "
            f"reads only version {supported}; run the brokerd release that wrote it "
            f"(or a newer one)"
        )


_ACTIONS = {
    _errno.ENOSPC: "free space and restart brokerd",
    _errno.EDQUOT: "raise the disk quota or free space, and restart brokerd",
    _errno.EIO: "check the disk (see dmesg) and restart brokerd, which replays the log",
    _errno.EROFS: "the filesystem went read-only; check the disk and restart brokerd",
}


class WalFailed(WalError):
    """A write or fsync failed; the log is permanently failed (fail-stop)."""

    def __init__(self, *, errno: int | None, operation: str, segment: str, strerror: str) -> None:
        self.errno = errno
        self.errno_name = _errno.errorcode.get(errno, str(errno)) if errno is not None else "?"
        self.operation = operation  # "write", "fsync", "create", "truncate"
        self.segment = segment
        self.strerror = strerror
        action = _ACTIONS.get(errno, "fix the disk problem and restart brokerd")
        super().__init__(
            f"write-ahead log {operation} failed: {strerror} ({self.errno_name}) in {segment}; "
            f"the broker stops confirming; {action}"
        )


# --------------------------------------------------------------------------- fault seam


class Fault(Protocol):
    """What ``WriteAheadLog(fault=...)`` calls before each write and fsync.

    ``before_write(segment_name, nbytes)`` runs before every ``os.write`` to a
    segment (headers included).  It may raise ``OSError`` (nothing is
    written), return ``None`` (all ``nbytes`` are written), or return
    ``k < nbytes`` to simulate a short write: only ``k`` bytes are written, and
    the log calls ``before_write`` again for the rest, as it would after a real
    short write.  ``before_fsync(name)`` runs before every fsync, with the
    segment's name or ``DIRECTORY_SYNC_NAME`` for the directory, and may raise.
    """

    def before_write(self, segment_name: str, nbytes: int) -> int | None: ...

    def before_fsync(self, segment_name: str) -> None: ...


class FaultPlan:
    """A deterministic ``Fault`` for tests: fail a write or an fsync on cue.

    ``FaultPlan(fail_write_after_bytes=N)``: the first N bytes written get
    through; the write that crosses N is cut short at N and the next one
    raises (ENOSPC by default), which is what a filling disk looks like.
    ``FaultPlan(fail_write_on_call=K)``: the K-th write raises before writing.
    ``FaultPlan(fail_fsync_on_call=K, errno=EIO)``: the K-th fsync raises.
    Counters (``write_calls``, ``bytes_written``, ``fsync_calls``, ``fsyncs``:
    the names fsynced, in order) let a test check what the log did.
    """

    def __init__(
        self,
        *,
        fail_write_after_bytes: int | None = None,
        fail_write_on_call: int | None = None,
        fail_fsync_on_call: int | None = None,
        errno: int | None = None,
    ) -> None:
        self.fail_write_after_bytes = fail_write_after_bytes
        self.fail_write_on_call = fail_write_on_call
        self.fail_fsync_on_call = fail_fsync_on_call
        self.errno = errno
        self.write_calls = 0
        self.bytes_written = 0  # bytes let through to os.write
        self.fsync_calls = 0
        self.fsyncs: list[str] = []

    def reset_counters(self) -> None:
        self.write_calls = 0
        self.bytes_written = 0
        self.fsync_calls = 0
        self.fsyncs = []

    def _error(self, default: int, name: str) -> OSError:
        code = self.errno if self.errno is not None else default
        return OSError(code, os.strerror(code), name)

    def before_write(self, segment_name: str, nbytes: int) -> int | None:
        self.write_calls += 1
        if self.fail_write_on_call is not None and self.write_calls == self.fail_write_on_call:
            raise self._error(_errno.ENOSPC, segment_name)
        if self.fail_write_after_bytes is not None:
            budget = self.fail_write_after_bytes - self.bytes_written
            if budget <= 0:
                raise self._error(_errno.ENOSPC, segment_name)
            if nbytes > budget:
                self.bytes_written += budget
                return budget  # short write; the log's retry of the rest raises above
        self.bytes_written += nbytes
        return None

    def before_fsync(self, segment_name: str) -> None:
        self.fsync_calls += 1
        self.fsyncs.append(segment_name)
        if self.fail_fsync_on_call is not None and self.fsync_calls == self.fail_fsync_on_call:
            raise self._error(_errno.EIO, segment_name)


# --------------------------------------------------------------------------- value types


class Record(NamedTuple):
    """One record as replay yields it."""

    lsn: int
    type: int
    flags: int
    payload: bytes
    segment_name: str
    offset: int  # byte offset of the record's length field in that segment


@dataclass(slots=True)
class Batch:
    """Records taken from the pending buffer, to be written as one ``os.write``.

    ``data`` holds the encoded records with their CRC fields still zero:
    ``write_batch`` fills them in with the salt of the segment the batch lands
    in (only the writer side knows which).  Ownership passes to the writer.
    """

    data: bytearray
    first_lsn: int
    last_lsn: int
    count: int

    @property
    def nbytes(self) -> int:
        return len(self.data)


@dataclass(frozen=True, slots=True)
class SegmentInfo:
    name: str
    path: str
    first_lsn: int
    last_lsn: int  # first_lsn - 1 while the segment holds no record
    size_bytes: int
    is_head: bool  # the segment being appended to; never deleted by compaction


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


class _Segment:
    """Writer-side bookkeeping for one segment file."""

    __slots__ = ("name", "path", "first_lsn", "last_lsn", "size", "salt")

    def __init__(self, name: str, path: str, first_lsn: int, size: int, salt: int) -> None:
        self.name = name
        self.path = path
        self.first_lsn = first_lsn
        self.last_lsn = first_lsn - 1
        self.size = size
        self.salt = salt


class _ReplayState:
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

    def warn(self, message: str) -> None:
        self.warnings.append(message)
        logger.warning("%s", message)


_NEW, _REPLAYING, _READY, _CLOSED = "new", "replaying", "ready", "closed"


# --------------------------------------------------------------------------- the log


class WriteAheadLog:
    def __init__(
        self,
        directory: str | os.PathLike[str],
        *,
        fsync: str = "always",
        fsync_interval_ms: float = DEFAULT_FSYNC_INTERVAL_MS,
        segment_bytes: int = DEFAULT_SEGMENT_BYTES,
        fault: Fault | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if fsync not in FSYNC_POLICIES:
            raise ValueError(f"fsync must be one of {', '.join(FSYNC_POLICIES)} (got {fsync!r})")
        if isinstance(fsync_interval_ms, bool) or not (
            isinstance(fsync_interval_ms, (int, float)) and fsync_interval_ms > 0
        ):
            raise ValueError(
                f"fsync_interval_ms must be a positive number of milliseconds (got {fsync_interval_ms!r})"
            )
        if isinstance(segment_bytes, bool) or not isinstance(segment_bytes, int) or segment_bytes < MIN_SEGMENT_BYTES:
            raise ValueError(
                f"segment_bytes must be an integer of at least {MIN_SEGMENT_BYTES} bytes (got {segment_bytes!r})"
            )
        self.directory = os.fspath(directory)
        self.fsync_policy = fsync
        self.fsync_interval_ms = fsync_interval_ms
        self.segment_bytes = segment_bytes  # a soft limit: rotation happens after the batch that crosses it
        self._fault = fault
        self._clock = clock
        self._state = _NEW
        self.recovery: RecoveryReport | None = None
        self.failed: WalFailed | None = None

        # loop side
        self._appendable = False
        self._next_lsn = 1
        self._pending = bytearray()
        self._pending_first = 1
        self._pending_count = 0

        # writer side
        self._lock = threading.Lock()
        self._lock_fd: int | None = None
        # Held open from open() to close(): the directory (for every fsync of
        # it) and one spare descriptor, closed just before the log opens a
        # file, so that a process at its fd limit (EMFILE) still rotates.
        self._dir_fd: int | None = None
        self._reserve_fd: int | None = None
        self._rotation_postponed = False  # a rotation failed for lack of fds; retried after each write
        self._manifest: tuple[int, dict[int, int]] | None = None  # (start lsn, gaps) as on disk
        self._fd: int | None = None
        self._segments: list[_Segment] = []
        self._written_lsn = 0
        self._synced_lsn = 0
        self._last_sync = clock()

    # ------------------------------------------------------------------ context manager

    def __enter__(self) -> WriteAheadLog:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # ------------------------------------------------------------------ properties

    @property
    def durable_lsn(self) -> int:
        """Highest lsn the policy counts as durable.

        ``always``: fsynced.  ``interval``/``never``: written to the kernel
        (the policy accepts losing what a power cut takes).  Confirm up to here.
        """
        return self._synced_lsn if self.fsync_policy == "always" else self._written_lsn

    @property
    def written_lsn(self) -> int:
        """Highest lsn handed to the kernel by ``os.write``."""
        return self._written_lsn

    @property
    def synced_lsn(self) -> int:
        """Highest lsn covered by a successful fsync."""
        return self._synced_lsn

    @property
    def next_lsn(self) -> int:
        """The lsn the next ``append`` will return (loop side)."""
        return self._next_lsn

    @property
    def pending_count(self) -> int:
        return self._pending_count

    @property
    def pending_bytes(self) -> int:
        return len(self._pending)

    # ------------------------------------------------------------------ open / replay

    def open(self, *, repair: bool = False) -> Iterator[Record]:
        """Lock the directory and return a generator replaying every record.

        The lock is taken (and ``WalLocked`` raised) by this call itself.  The
        generator yields ``Record``s oldest to newest; the caller must consume
        it to the end, after which ``recovery`` is set and ``append`` works.
        ``CorruptLog``/``WalVersionError``/``WalFailed`` come out of the
        generator after the records before the damage were yielded; abandoning
        or failing the replay releases the lock.  The records are not kept in
        memory, so replaying a large log costs one segment's bytes at a time.
        """
        if self._state != _NEW:
            raise RuntimeError("open() can be called once per WriteAheadLog; make a new one to reopen")
        os.makedirs(self.directory, exist_ok=True)
        self._take_lock()
        try:
            self._dir_fd = os.open(self.directory, os.O_RDONLY | _O_DIRECTORY | _O_CLOEXEC)
        except BaseException:
            self._release()
            raise
        self._take_reserve()
        self._state = _REPLAYING
        return self._replay(repair)

    def _take_lock(self) -> None:
        path = os.path.join(self.directory, LOCK_NAME)
        fd = os.open(path, os.O_RDWR | os.O_CREAT | _O_CLOEXEC, SEGMENT_FILE_MODE)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _read_pid(fd)
            os.close(fd)
            raise WalLocked(self.directory, holder) from None
        except BaseException:
            os.close(fd)
            raise
        # Our pid, for the next opener's error message; advisory only.
        try:
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        except OSError:
            pass
        self._lock_fd = fd

    def _replay(self, repair: bool) -> Iterator[Record]:
        started = time.perf_counter()
        st = _ReplayState()
        done = False
        try:
            manifest = self._read_manifest(repair, st)
            if repair:
                manifest = self._salvage(manifest, st)
            next_lsn = yield from self._replay_segments(manifest, st)
            next_lsn = max(next_lsn, st.min_next_lsn)
            self._start_appending(next_lsn)
            if manifest is None:
                # A fresh log, or one written before the manifest existed:
                # record where it starts from now on.
                first = self._segments[0].first_lsn
                self._write_manifest(first, {})
                if st.segments:
                    logger.info("recorded in %s that the log in %s starts at lsn %d", MANIFEST_NAME, self.directory, first)
            else:
                self._manifest = manifest
            done = True
        finally:
            if not done:
                self._release()
        self.recovery = RecoveryReport(
            records=st.records,
            segments=st.segments,
            bytes=st.bytes,
            truncated_bytes=st.truncated_bytes,
            truncated_at=st.truncated_at,
            seconds=time.perf_counter() - started,
            next_lsn=next_lsn,
            repaired=st.repaired,
            dropped_records=st.dropped,
            dropped_records_exact=st.dropped_exact,
            deleted_segments=tuple(st.deleted),
            warnings=tuple(st.warnings),
            dropped=tuple(st.dropped_ranges),
        )

    def _list_segments(self) -> list[tuple[int, str]]:
        found = []
        for name in os.listdir(self.directory):
            m = _SEGMENT_FILE.match(name)
            if m:
                found.append((int(m.group(1)), name))
            elif name.endswith(".wal"):
                logger.warning("ignoring %s in %s: not a segment file name", name, self.directory)
        found.sort()
        return found

    # ------------------------------------------------------------------ manifest

    def _read_manifest(self, repair: bool, st: _ReplayState) -> tuple[int, dict[int, int]] | None:
        path = os.path.join(self.directory, MANIFEST_NAME)
        try:
            with open(path, "rb") as f:
                data = f.read(1 << 20)  # a manifest is a few lines; more is damage
        except FileNotFoundError:
            return None
        try:
            return _decode_manifest(data)
        except ValueError as e:
            if not repair:
                raise CorruptLog(path, 0, str(e)) from None
            st.warn(f"repair of {self.directory}: ignoring damaged {MANIFEST_NAME} ({e}); rebuilding it from the segments")
            return None

    def _write_manifest(self, start: int, gaps: dict[int, int]) -> None:
        """Replace the manifest atomically: write a temporary file, fsync, rename, fsync the directory.

        Raises ``OSError`` if the file cannot be written (the caller decides);
        a failed directory fsync is a ``WalFailed``.
        """
        data = _encode_manifest(start, gaps)
        path = os.path.join(self.directory, MANIFEST_NAME)
        tmp = path + ".tmp"
        fd = self._open_file(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | _O_CLOEXEC)
        try:
            self._write_all(fd, data, MANIFEST_NAME)
            if self._fault is not None:
                self._fault.before_fsync(MANIFEST_NAME)
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
        self._fsync_directory()
        self._manifest = (start, dict(gaps))

    # ------------------------------------------------------------------ replay

    def _replay_segments(
        self, manifest: tuple[int, dict[int, int]] | None, st: _ReplayState
    ) -> Iterator[Record]:
        """Yield the records; return the next lsn.  Sets up ``self._segments``."""
        files = self._list_segments()
        start = manifest[0] if manifest is not None else None
        gaps = dict(manifest[1]) if manifest is not None else {}
        expected: int | None = None  # lsn the next record must have (or a gap must start at)
        for index, (name_lsn, name) in enumerate(files):
            is_last = index == len(files) - 1
            path = os.path.join(self.directory, name)
            with open(path, "rb") as f:
                data = f.read()
            st.bytes += len(data)

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
                    self._remove_files([path], st)
                    st.truncated_bytes += len(data)
                    st.truncated_at = (name, 0)
                    st.min_next_lsn = max(st.min_next_lsn, name_lsn)
                    st.warn(
                        f"deleted {name} in {self.directory}: {len(data)} bytes, {what} "
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
                    covering = _gap_covering(gaps, start, first - 1)
                    if covering is None:
                        raise MissingRecords(
                            self.directory, start, first - 1,
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

            seg = _Segment(name, path, first, len(data), header.salt)
            self._segments = self._segments + [seg]
            st.segments += 1
            scanner = RecordScanner(data, header.salt, SEGMENT_HEADER_SIZE, expected, gaps)
            for r in scanner:
                yield Record(r.lsn, r.type, r.flags, r.payload, name, r.offset)
            st.records += scanner.count
            expected = scanner.next_lsn
            seg.last_lsn = max(expected - 1, first - 1)
            damage = scanner.damage
            if damage is None:
                continue
            if is_last and _is_torn_tail(data, damage, header.salt, expected):
                cut = damage.offset
                self._truncate_file(path, name, cut)
                seg.size = cut
                st.truncated_bytes += len(data) - cut
                st.truncated_at = (name, cut)
                st.warn(
                    f"truncated torn tail of {name} in {self.directory}: {len(data) - cut} bytes "
                    f"from byte offset {cut} ({damage.detail}); the last whole record is lsn {expected - 1}"
                )
                break
            raise CorruptLog(path, damage.offset, damage.detail)

        if not self._segments and start is not None and not st.allow_empty and not (
            st.min_next_lsn >= start and st.deleted
        ):
            raise MissingRecords(
                self.directory, start, None,
                f"the log starts at lsn {start} (see {MANIFEST_NAME}) but no segment file is left",
            )
        if expected is None:
            return max(1, start or 1)
        return max(expected, self._segments[-1].first_lsn) if self._segments else expected

    # ------------------------------------------------------------------ repair

    def _salvage(
        self, manifest: tuple[int, dict[int, int]] | None, st: _ReplayState
    ) -> tuple[int, dict[int, int]] | None:
        """``open(repair=True)``: make the directory replayable, dropping only what cannot be read.

        Every segment is checked record by record.  At a bad record the scan
        resynchronises on the next record whose header, CRC and lsn check out
        (``_resync``); a damaged segment header is rebuilt from its file name
        and the salt solved from an intact record (``_recover_salt``).  A
        segment that lost anything is rewritten (same name, same salt, the
        valid records' bytes unchanged: temporary file, fsync, rename), and
        the lsn ranges that are now missing go into the manifest as gaps,
        which replay then accepts.  Returns the manifest to replay with.
        """
        files = self._list_segments()
        start = manifest[0] if manifest is not None else None
        gaps = dict(manifest[1]) if manifest is not None else {}
        changed = False
        # First, which files can be read at all (and with which salt).  A file
        # none of whose records validates is moved aside, not deleted, and does
        # not limit the lsns of the segment before it (a stray file).
        readable: list[tuple[int, str, int, str | None]] = []
        for index, (name_lsn, name) in enumerate(files):
            path = os.path.join(self.directory, name)
            with open(path, "rb") as f:
                data = f.read()
            header_problem = None
            salt = None
            try:
                header = decode_segment_header(data)
                salt = header.salt
                if header.first_lsn != name_lsn:
                    header_problem = f"segment header says its first lsn is {header.first_lsn}"
            except UnsupportedVersion as e:
                raise WalVersionError(path, e.version, 1) from None
            except WalFormatError as e:
                if index == len(files) - 1 and (len(data) < SEGMENT_HEADER_SIZE or data.count(0) == len(data)):
                    continue  # a crash while creating it: the replay deletes it
                header_problem = str(e)
            if header_problem is not None:
                salt = _recover_salt(data, name_lsn, trust_first=True)
            elif len(data) > SEGMENT_HEADER_SIZE and _valid_at(data, SEGMENT_HEADER_SIZE, salt, name_lsn, MAX_LSN)[0] is None:
                # The first record fails: the record, or the salt in the header?
                solved = _recover_salt(data, name_lsn, trust_first=False)
                if solved is not None and solved != salt:
                    header_problem = f"segment header salt 0x{salt:08x} does not match its records (0x{solved:08x} does)"
                    salt = solved
            if salt is None:
                aside = path + ".damaged"
                os.replace(path, aside)
                self._fsync_directory()
                self._drop(st, name, 0, len(data), None, None, None,
                           f"{header_problem} and no record in it can be validated; moved it to {os.path.basename(aside)}")
                changed = True
                continue
            readable.append((name_lsn, name, salt, header_problem))

        prev: int | None = None  # last kept lsn
        for index, (name_lsn, name, salt, header_problem) in enumerate(readable):
            is_last = index == len(readable) - 1
            limit = readable[index + 1][0] - 1 if not is_last else MAX_LSN  # lsns this file may hold
            path = os.path.join(self.directory, name)
            with open(path, "rb") as f:
                data = f.read()
            # Where the log (re)starts, and gaps before this file.
            if prev is None:
                if start is None or name_lsn > start:
                    if start is not None:
                        self._drop(st, name, 0, 0, start, name_lsn - 1, name_lsn - start,
                                   f"segment files holding lsns {start}..{name_lsn - 1} are missing")
                    start = name_lsn
                    changed = True
                prev = name_lsn - 1
            elif name_lsn > prev + 1:
                self._drop(st, name, 0, 0, prev + 1, name_lsn - 1, name_lsn - prev - 1,
                           f"no segment holds lsns {prev + 1}..{name_lsn - 1}")
                _add_gap(gaps, prev + 1, name_lsn - 1)
                changed = True
                prev = name_lsn - 1
            kept: list[tuple[int, int]] = []  # (offset, end) of the records kept
            pos = SEGMENT_HEADER_SIZE
            size = len(data)
            lost = header_problem is not None
            if lost:
                st.warn(f"repair of {self.directory}: {header_problem} in {name}; rebuilt its header")
            while pos < size:
                rec, reason = _valid_at(data, pos, salt, prev + 1, limit)
                if rec is not None:
                    kept.append((rec.offset, rec.end))
                    if rec.lsn > prev + 1:
                        self._drop(st, name, pos, 0, prev + 1, rec.lsn - 1, rec.lsn - prev - 1,
                                   f"no record holds lsns {prev + 1}..{rec.lsn - 1}")
                        _add_gap(gaps, prev + 1, rec.lsn - 1)
                        changed = True
                    prev = rec.lsn
                    pos = rec.end
                    continue
                slack = sum(b - a + 1 for a, b in gaps.items() if b > prev)
                found = _resync(data, pos + 1, salt, prev + 1, limit, slack)
                lost = True
                if found is None:
                    if is_last and data.count(0, pos) == size - pos:
                        reason = "zero bytes (a torn tail)"
                    self._drop(st, name, pos, size - pos, prev + 1, None if is_last else limit,
                               None if is_last else max(0, limit - prev), reason)
                    if not is_last and limit > prev:
                        _add_gap(gaps, prev + 1, limit)
                        prev = limit
                    break
                self._drop(st, name, pos, found.offset - pos, prev + 1, found.lsn - 1, found.lsn - prev - 1, reason)
                if found.lsn > prev + 1:
                    _add_gap(gaps, prev + 1, found.lsn - 1)
                    prev = found.lsn - 1
                pos = found.offset
            if lost:
                out = bytearray(encode_segment_header(salt, name_lsn))
                for a, b in kept:
                    out += data[a:b]
                self._write_segment(path, name, out)
                changed = True
        if not readable and start is not None:
            self._drop(st, MANIFEST_NAME, 0, 0, start, None, None,
                       f"the log starts at lsn {start} but no segment file is left")
            st.allow_empty = True
        if changed or manifest is None:
            if start is None:
                start = st.min_next_lsn
            self._write_manifest(start, gaps)
            st.repaired = st.repaired or changed
            return (start, gaps)
        return manifest

    def _drop(
        self, st: _ReplayState, name: str, offset: int, nbytes: int,
        first: int | None, last: int | None, records: int | None, reason: str,
    ) -> None:
        st.repaired = True
        st.dropped_ranges.append(DroppedRange(name, offset, nbytes, first, last, records, reason))
        st.truncated_bytes += nbytes
        if st.truncated_at is None:
            st.truncated_at = (name, offset)
        if records is None:
            st.dropped_exact = False
        else:
            st.dropped += records
        lsns = (
            "records of unknown lsns" if first is None else
            "no lsn" if records == 0 else
            f"lsns {first}..{last} ({records} record(s))" if last is not None else
            f"the records from lsn {first} on (how many is unknown)"
        )
        st.warn(
            f"repair of {self.directory}: {reason} at byte offset {offset} of {name}; "
            f"dropped {nbytes} bytes holding {lsns}"
        )

    def _write_segment(self, path: str, name: str, data: bytes | bytearray) -> None:
        """Replace a segment file atomically (repair only)."""
        tmp = path + ".repair"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | _O_CLOEXEC, SEGMENT_FILE_MODE)
        try:
            self._write_all(fd, data, name)
            self._fsync_fd(fd, name, data=False)
        finally:
            os.close(fd)
        os.replace(tmp, path)
        self._fsync_directory()

    def _truncate_file(self, path: str, name: str, size: int) -> None:
        fd = os.open(path, os.O_WRONLY | _O_CLOEXEC)
        try:
            try:
                os.ftruncate(fd, size)
            except OSError as e:
                raise self._fail("truncate", e, name) from e
            self._fsync_fd(fd, name, data=False)
        finally:
            os.close(fd)

    def _remove_files(self, paths: list[str], st: _ReplayState) -> None:
        for path in paths:
            try:
                os.unlink(path)
            except FileNotFoundError:
                pass
            st.deleted.append(os.path.basename(path))
        if paths:
            self._fsync_directory()

    def _start_appending(self, next_lsn: int) -> None:
        with self._lock:
            if self._segments:
                head = self._segments[-1]
                self._fd = os.open(head.path, os.O_WRONLY | os.O_APPEND | _O_CLOEXEC)
                # What we replayed may still be only in the page cache (a
                # kill -9 before the fsync); make it durable before anything
                # is built on it.
                self._fsync_fd(self._fd, head.name, data=True)
            else:
                self._create_segment(next_lsn)
            self._written_lsn = self._synced_lsn = next_lsn - 1
            self._last_sync = self._clock()
        self._next_lsn = next_lsn
        self._pending_first = next_lsn
        self._state = _READY
        self._appendable = True

    # ------------------------------------------------------------------ loop side

    def append(self, type: int, payload: bytes, flags: int = 0) -> int:
        """Encode a record into the pending buffer; return its lsn.

        Does no I/O.  Raises ``ValueError`` for a type outside 1..255, flags
        outside 0..255 or a payload over ``MAX_RECORD_BYTES``, and the log's
        ``WalFailed`` once it has failed (nothing appended now can be written).
        """
        if not self._appendable:
            self._not_appendable()
        n = len(payload)
        if n > MAX_RECORD_BYTES:
            raise ValueError(f"record payload is {n} bytes; the limit is {MAX_RECORD_BYTES} bytes")
        if not 0 < type < 256:
            raise ValueError(f"record type must be 1..255 (got {type!r}); 0 is reserved")
        lsn = self._next_lsn
        try:
            header = _pack_record_header(n, 0, lsn, type, flags)
        except struct.error:
            raise ValueError(
                f"record type must be an int 1..255 and flags an int 0..255 "
                f"(got type={type!r}, flags={flags!r})"
            ) from None
        # All or nothing (a MemoryError can strike at any allocation): the
        # new counter values are computed first, and if either extend fails
        # the buffer is cut back, so no half record and no lost lsn remain.
        next_lsn = lsn + 1
        count = self._pending_count + 1
        buf = self._pending
        size = len(buf)
        try:
            buf += header
            buf += payload
        except BaseException:
            del buf[size:]
            raise
        self._next_lsn = next_lsn
        self._pending_count = count
        return lsn

    def _not_appendable(self) -> None:
        if self.failed is not None:
            raise self.failed.with_traceback(None)
        if self._state == _CLOSED:
            raise RuntimeError("the write-ahead log is closed")
        raise RuntimeError("open() the write-ahead log and consume its replay before appending")

    def take_batch(self) -> Batch | None:
        """Hand everything pending to the writer; ``None`` if nothing is pending."""
        if not self._pending_count:
            return None
        batch = Batch(self._pending, self._pending_first, self._next_lsn - 1, self._pending_count)
        self._pending = bytearray()
        self._pending_first = self._next_lsn
        self._pending_count = 0
        return batch

    # ------------------------------------------------------------------ writer side

    def write_batch(self, batch: Batch | None) -> None:
        """Write one batch (one ``os.write``), fsync per policy, rotate if full.

        Batches must be written in the order ``take_batch`` returned them,
        each once.  Raises ``WalFailed`` on any I/O error, and at once forever
        after.
        """
        if batch is None:
            return
        with self._lock:
            self._check_writable()
            head = self._segments[-1]
            if batch.first_lsn != head.last_lsn + 1:
                raise RuntimeError(
                    f"batch starts at lsn {batch.first_lsn} but the log ends at lsn {head.last_lsn}; "
                    f"write batches in the order take_batch() returned them, each once"
                )
            data = batch.data
            seal_records(data, head.salt)
            start = head.size
            try:
                self._write_all(self._fd, data, head.name)
            except OSError as e:
                failure = self._fail("write", e, head.name)
                # Leave no partial record behind if we still can; if this
                # fails too, replay treats the partial record as a torn tail.
                try:
                    os.ftruncate(self._fd, start)
                except OSError as e2:
                    logger.warning("could not truncate %s back to %d bytes: %s", head.name, start, e2)
                raise failure from e
            head.size = start + len(data)
            head.last_lsn = batch.last_lsn
            self._written_lsn = batch.last_lsn
            if self.fsync_policy == "always" or (
                self.fsync_policy == "interval"
                and (self._clock() - self._last_sync) * 1000 >= self.fsync_interval_ms
            ):
                self._sync_head()
            if head.size >= self.segment_bytes:
                self._rotate_locked()

    def sync(self) -> None:
        """fsync the head segment now if anything was written since the last fsync.

        For the interval policy's timer and for shutdown; honoured under every
        policy (``never`` only means the log never fsyncs data on its own).
        """
        with self._lock:
            self._check_writable()
            if self._written_lsn > self._synced_lsn:
                self._sync_head()

    def rotate(self) -> None:
        """Close the head segment and start a new one; no-op if the head is empty."""
        with self._lock:
            self._check_writable()
            self._rotate_locked()

    def segments(self) -> list[SegmentInfo]:
        """The segment files, oldest first; the last one is the head."""
        segs = self._segments  # replaced, never mutated in place: a consistent list
        if not segs:
            return []
        head = segs[-1]
        return [
            SegmentInfo(s.name, s.path, s.first_lsn, s.last_lsn, s.size, s is head) for s in segs
        ]

    def delete_segments_through(self, lsn: int) -> list[str]:
        """Delete closed segments whose records all have lsn <= ``lsn``.

        For compaction, once a snapshot covers ``lsn``.  The head is never
        deleted (``rotate()`` first to release it).  Deletes from the oldest
        end only, then fsyncs the directory.  Returns the names deleted.
        The manifest is rewritten with the new start first; if that cannot
        be written (EMFILE, ENOSPC) nothing is deleted and the ``OSError`` is
        raised, for the caller to retry later.  An ``unlink`` error other than
        "already gone" is raised as the ``OSError``; a failed directory fsync
        is a ``WalFailed``.
        """
        with self._lock:
            self._check_writable()
            segs = self._segments
            victims = []
            for s in segs[:-1]:
                if s.last_lsn > lsn:
                    break
                victims.append(s)
            if victims:
                # Record the new start before anything goes, so that a
                # missing oldest segment is always a gap replay can see.
                # An OSError here (EMFILE, ENOSPC) deletes nothing: retry later.
                gaps = self._manifest[1] if self._manifest else {}
                self._write_manifest(segs[len(victims)].first_lsn, gaps)
            deleted: list[str] = []
            try:
                for s in victims:
                    try:
                        os.unlink(s.path)
                    except FileNotFoundError:
                        pass
                    deleted.append(s.name)
            finally:
                if deleted:
                    self._segments = segs[len(deleted) :]
            if deleted:
                self._fsync_directory()
            return deleted

    def close(self) -> None:
        """Write what is pending, fsync, close the files and unlock.

        Closing a failed log just releases it (the pending records were never
        confirmed).  Safe to call twice.
        """
        if self._state == _CLOSED:
            return
        try:
            if self._state == _READY and self.failed is None:
                self.write_batch(self.take_batch())
                self.sync()
        finally:
            self._release()

    # ------------------------------------------------------------------ internals

    def _check_writable(self) -> None:
        if self.failed is not None:
            raise self.failed.with_traceback(None)
        if self._state != _READY:
            if self._state == _CLOSED:
                raise RuntimeError("the write-ahead log is closed")
            raise RuntimeError("open() the write-ahead log and consume its replay first")

    def _fail(self, operation: str, error: OSError, segment: str) -> WalFailed:
        """Enter the permanent failed state; return the exception to raise."""
        failure = WalFailed(
            errno=error.errno,
            operation=operation,
            segment=segment,
            strerror=error.strerror or str(error),
        )
        if self.failed is None:
            self.failed = failure
            self._appendable = False
            logger.error("%s", failure)
        return self.failed

    def _write_all(self, fd: int, data: bytes | bytearray, name: str) -> None:
        fault = self._fault
        with memoryview(data) as view:
            pos = 0
            total = len(view)
            while pos < total:
                chunk = view[pos:]
                if fault is not None:
                    limit = fault.before_write(name, total - pos)
                    if limit is not None:
                        chunk = view[pos : pos + max(0, limit)]
                n = os.write(fd, chunk)
                chunk.release()
                if n <= 0:
                    raise OSError(_errno.EIO, "write made no progress", name)
                pos += n

    def _fsync_fd(self, fd: int, name: str, *, data: bool) -> None:
        try:
            if self._fault is not None:
                self._fault.before_fsync(name)
            if data:
                _fdatasync(fd)
            else:
                os.fsync(fd)
        except OSError as e:
            raise self._fail("fsync", e, name) from e

    def _fsync_directory(self) -> None:
        # Creating, truncating to nothing, or unlinking a file is only durable
        # once the directory is fsynced (ALICE, RELIABILITY.md 2.2).
        # The directory fd is held open from open() on, so this needs no
        # new descriptor (a process at its fd limit can still fsync it).
        try:
            if self._fault is not None:
                self._fault.before_fsync(DIRECTORY_SYNC_NAME)
            os.fsync(self._dir_fd)
        except OSError as e:
            raise self._fail("fsync", e, self.directory) from e

    def _take_reserve(self) -> None:
        if self._reserve_fd is None:
            try:
                self._reserve_fd = os.open(os.devnull, os.O_RDONLY | _O_CLOEXEC)
            except OSError:
                pass  # at the limit already: taken again after the next open

    def _open_file(self, path: str, flags: int, mode: int = SEGMENT_FILE_MODE) -> int:
        """``os.open`` that first gives back the spare descriptor, then takes it again."""
        if self._reserve_fd is not None:
            os.close(self._reserve_fd)
            self._reserve_fd = None
        try:
            return os.open(path, flags, mode)
        finally:
            self._take_reserve()

    def _sync_head(self) -> None:
        head = self._segments[-1]
        self._fsync_fd(self._fd, head.name, data=True)
        self._synced_lsn = self._written_lsn
        self._last_sync = self._clock()

    def _rotate_locked(self) -> None:
        head = self._segments[-1]
        if head.last_lsn < head.first_lsn:
            return  # empty head: a new one would get the same name
        if self._written_lsn > self._synced_lsn:
            # The old segment must be whole on disk before the new one can
            # exist, or a power cut could leave an lsn gap between them.
            self._sync_head()
        old_fd = self._fd
        try:
            # The new segment is opened before the old one is closed: if
            # that fails, the log simply goes on in the old segment.
            self._create_segment(head.last_lsn + 1)
        except _NoDescriptor as e:
            if not self._rotation_postponed:
                self._rotation_postponed = True
                logger.warning(
                    "could not start a new log segment after %s: %s (%s): brokerd is at its open-file "
                    "limit (not a disk fault); %s keeps growing and the rotation is retried after each "
                    "write; raise the limit (ulimit -n, LimitNOFILE) or lower --max-connections",
                    head.name, e.strerror, _errno.errorcode.get(e.errno, e.errno), head.name,
                )
            return
        os.close(old_fd)
        self._take_reserve()  # the slot just freed becomes the spare, if the open above used it
        if self._rotation_postponed:
            self._rotation_postponed = False
            logger.warning("log segments rotate again: started %s", self._segments[-1].name)

    def _create_segment(self, first_lsn: int) -> None:
        """Create, write the header of, and fsync a new head segment (lock held)."""
        if first_lsn > MAX_LSN:
            raise OverflowError("the write-ahead log has used every u64 lsn")
        name = segment_name(first_lsn)
        path = os.path.join(self.directory, name)
        salt = int.from_bytes(os.urandom(4), "big")
        header = encode_segment_header(salt, first_lsn)
        try:
            fd = self._open_file(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_APPEND | _O_CLOEXEC)
        except OSError as e:
            if e.errno in (_errno.EMFILE, _errno.ENFILE) and self._segments:
                # Out of descriptors is not a disk fault: nothing was written.
                raise _NoDescriptor(e.errno, e.strerror, name) from e
            raise self._fail("create", e, name) from e
        try:
            try:
                self._write_all(fd, header, name)
            except OSError as e:
                raise self._fail("write", e, name) from e
            self._fsync_fd(fd, name, data=False)
            self._fsync_directory()
        except WalFailed:
            os.close(fd)
            try:
                os.unlink(path)  # best effort; replay deletes a header-less last segment anyway
            except OSError:
                pass
            raise
        self._fd = fd
        self._segments = self._segments + [_Segment(name, path, first_lsn, len(header), salt)]

    def _release(self) -> None:
        with self._lock:
            self._appendable = False
            self._state = _CLOSED
            if self._fd is not None:
                try:
                    os.close(self._fd)
                finally:
                    self._fd = None
            for attr in ("_dir_fd", "_reserve_fd"):
                fd = getattr(self, attr)
                if fd is not None:
                    setattr(self, attr, None)
                    os.close(fd)
            if self._lock_fd is not None:
                try:
                    fcntl.flock(self._lock_fd, fcntl.LOCK_UN)
                finally:
                    os.close(self._lock_fd)
                    self._lock_fd = None


_pack_record_header = RECORD_HEADER.pack


class _NoDescriptor(OSError):
    """EMFILE/ENFILE while opening a new segment: postpone the rotation, do not fail."""


def _read_pid(fd: int) -> int | None:
    try:
        text = os.pread(fd, 32, 0).decode("ascii", "replace").strip()
        return int(text) if text.isdigit() else None
    except OSError:
        return None


def _is_torn_tail(data: bytes, damage: Damage, salt: int, expected_lsn: int) -> bool:
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
        return not _valid_record_follows(data, damage.offset + 1, salt, expected_lsn)
    if damage.length is None:  # impossible length: torn only if all that follows its header is zero
        end = damage.offset + RECORD_HEADER_SIZE
        return data.count(0, end) == size - end and not _valid_record_follows(
            data, damage.offset + 1, salt, expected_lsn
        )
    end = damage.offset + RECORD_HEADER_SIZE + damage.length
    zeros_from = len(data.rstrip(b"\0"))  # the trailing zero run starts here
    if zeros_from <= damage.offset:
        return True  # the record and all after it are zero
    boundary = -(-max(zeros_from, damage.offset + 1) // SECTOR_BYTES) * SECTOR_BYTES
    return boundary < end


def _valid_record_follows(data: bytes, start: int, salt: int, expected_lsn: int) -> bool:
    # Search for the lsn field's bytes (fast, in C) rather than trying a
    # decode at every offset; confirm candidates with a full decode.
    for lsn in range(expected_lsn, min(expected_lsn + TAIL_LOOKAHEAD_RECORDS, MAX_LSN + 1)):
        needle = _LSN_FIELD.pack(lsn)
        hit = data.find(needle, start + CRC_START)
        while hit != -1:
            try:
                if decode_record(data, hit - CRC_START, salt).lsn == lsn:
                    return True
            except WalFormatError:
                pass
            hit = data.find(needle, hit + 1)
    return False


# --------------------------------------------------------------------------- manifest


def _encode_manifest(start: int, gaps: dict[int, int]) -> bytes:
    lines = [_MANIFEST_MAGIC, f"start {start}"] + [f"gap {a} {b}" for a, b in sorted(gaps.items())]
    body = "\n".join(lines) + "\n"
    return (body + f"crc {zlib.crc32(body.encode()):08x}\n").encode()


def _decode_manifest(data: bytes) -> tuple[int, dict[int, int]]:
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


def _gap_covering(gaps: dict[int, int], first: int, last: int) -> int | None:
    """The start of a recorded gap holding every lsn first..last, else None."""
    for a, b in gaps.items():
        if a <= first and b >= last:
            return a
    return None


def _add_gap(gaps: dict[int, int], first: int, last: int) -> None:
    """Record that lsns first..last are gone for good, merging with adjacent gaps."""
    if last < first:
        return
    for a, b in list(gaps.items()):
        if b == first - 1 or (a <= first <= b + 1):
            first = min(first, a)
            last = max(last, b)
            del gaps[a]
        elif a == last + 1 or (first <= a <= last + 1):
            last = max(last, b)
            del gaps[a]
    gaps[first] = last


# --------------------------------------------------------------------------- repair helpers


def _valid_at(data: bytes, pos: int, salt: int, lo: int, hi: int) -> tuple[DecodedRecord | None, str]:
    """The record at ``pos`` if it is valid with an lsn in lo..hi, else (None, why not)."""
    try:
        rec = decode_record(data, pos, salt)
    except TruncatedRecord:
        return None, "record runs past the end of the segment"
    except WalFormatError as e:
        return None, str(e).replace(f"record at offset {pos} ", "record ")
    if rec.lsn < lo:
        return None, f"record lsn {rec.lsn} repeats or goes back (expected at least {lo})"
    if rec.lsn > hi:
        return None, f"record lsn {rec.lsn} belongs to a later segment"
    return rec, ""


_NONZERO = re.compile(rb"[^\x00]")


def _resync(data: bytes, start: int, salt: int, lo: int, hi: int, slack: int = 0) -> DecodedRecord | None:
    """The first valid record at or after ``start`` with a plausible lsn, or None.

    A candidate must pass its CRC (with this segment's salt) and carry an lsn
    the damage could have skipped to: between ``lo`` and ``hi``, and at most
    one lsn per 18 bytes skipped (a record is at least that long) plus
    ``slack`` (the lsns of gaps a repair recorded earlier).  That makes a
    chance match in payload bytes vanishingly rare (a CRC and an lsn in a
    narrow window).  Candidates are found with ``bytes.find`` on the lsn
    field's fixed leading bytes and zero runs are skipped, so garbage costs
    C speed, not a Python step per byte.
    """
    size = len(data)
    last = size - RECORD_HEADER_SIZE
    top = min(hi, lo + (size - start) // RECORD_HEADER_SIZE + 1 + slack)
    if top < lo:
        return None
    low_field, top_field = _LSN_FIELD.pack(lo), _LSN_FIELD.pack(top)
    k = 0
    while k < 8 and low_field[k] == top_field[k]:
        k += 1
    prefix = low_field[:k]
    zero_prefix = not any(prefix)
    unpack = RECORD_HEADER.unpack_from
    crc32 = zlib.crc32
    o = start
    with memoryview(data) as view:
        while o <= last:
            if k:
                hit = data.find(prefix, o + CRC_START)
                if hit == -1:
                    return None
                o = hit - CRC_START
                if o > last:
                    return None
            length, crc, lsn, type_, _flags = unpack(data, o)
            if lo <= lsn <= top and type_ != 0 and lsn <= lo + (o - start) // RECORD_HEADER_SIZE + 1 + slack:
                end = o + RECORD_HEADER_SIZE + length
                if end <= size and crc32(view[o + CRC_START : end], salt) == crc:
                    return decode_record(data, o, salt)
            elif lsn == 0 and zero_prefix:
                # Inside a run of zeros: the next candidate's lsn field must
                # hold the run's first nonzero byte.
                m = _NONZERO.search(data, o + CRC_START)
                if m is None:
                    return None
                o = max(o + 1, m.start() - 15)
                continue
            o += 1
    return None


def _solve_salt(body: bytes | memoryview, crc: int) -> int | None:
    """The salt ``s`` with ``zlib.crc32(body, s) == crc``.

    CRC-32 is affine in its starting value: ``crc32(body, s) ^ crc32(body, 0)``
    is a linear map of ``s`` over GF(2) (multiplication by x^(8n) mod the
    CRC polynomial, so invertible); Gaussian elimination on its 32 columns
    gives the one salt that matches.
    """
    base = zlib.crc32(body, 0)
    basis: dict[int, tuple[int, int]] = {}  # pivot bit -> (vector, salt bits making it)
    for i in range(32):
        v, c = zlib.crc32(body, 1 << i) ^ base, 1 << i
        while v:
            p = v.bit_length() - 1
            if p not in basis:
                basis[p] = (v, c)
                break
            bv, bc = basis[p]
            v ^= bv
            c ^= bc
    t, s = crc ^ base, 0
    while t:
        p = t.bit_length() - 1
        if p not in basis:
            return None
        bv, bc = basis[p]
        t ^= bv
        s ^= bc
    return s


SALT_PROBE_LSNS = 64  # when the first record is damaged too, look for any of the next this-many lsns
SALT_PROBE_MAX_BYTES = 1 << 20  # solve only from records up to this size (33 CRCs of it)


def _recover_salt(data: bytes, name_lsn: int, *, trust_first: bool) -> int | None:
    """Find the salt of a segment whose header is damaged, from its records.

    The header's own salt field is tried first (the damage may be elsewhere
    in the header).  Otherwise the salt is solved from a record's stored CRC
    (``_solve_salt``: any bytes solve to *some* salt) and accepted only if the
    record after it validates with it too.  ``trust_first``: the header is
    known to be damaged, so a lone first record with the lsn the file name
    promises is accepted on its own (its CRC cannot be checked any other way).
    """
    size = len(data)
    if size >= 16:
        raw = int.from_bytes(data[12:16], "big")
        first, _ = _valid_at(data, SEGMENT_HEADER_SIZE, raw, name_lsn, MAX_LSN)
        if first is not None:
            return raw
    candidates = [SEGMENT_HEADER_SIZE]
    for lsn in range(name_lsn, min(name_lsn + SALT_PROBE_LSNS, MAX_LSN + 1)):
        hit = data.find(_LSN_FIELD.pack(lsn), SEGMENT_HEADER_SIZE + CRC_START)
        if hit != -1:
            candidates.append(hit - CRC_START)
    for p in candidates:
        if p + RECORD_HEADER_SIZE > size:
            continue
        length, crc, lsn, _type, _flags = RECORD_HEADER.unpack_from(data, p)
        end = p + RECORD_HEADER_SIZE + length
        if lsn < name_lsn or length > SALT_PROBE_MAX_BYTES or end > size:
            continue
        with memoryview(data) as view:
            salt = _solve_salt(view[p + CRC_START : end], crc)
        if salt is None:
            continue
        if end < size:
            if _valid_at(data, end, salt, lsn + 1, MAX_LSN)[0] is not None:
                return salt
        elif trust_first and p == SEGMENT_HEADER_SIZE and lsn == name_lsn:
            return salt
    return None
