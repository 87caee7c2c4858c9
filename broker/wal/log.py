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
    00000000000000000001.wal      segment whose first record is lsn 1
    00000000000000004711.wal      ... lsn 4711 (names sort in lsn order)

Any other file is left alone.  Segments are never rewritten: only appended
to, truncated at a torn tail, or deleted whole from the oldest end.

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
* Segments are replayed oldest to newest.  Each must start with the lsn after
  the previous segment's last record; within a segment each record's lsn is
  the previous + 1.
* In the **last** segment, a record that runs past end of file, or a damaged
  record followed only by zero bytes (or nothing), is a *torn tail*: a crash in
  the middle of a write.  It is truncated (``ftruncate`` + fsync), logged as a
  warning and reported in ``recovery``.  A last segment shorter than its header,
  or all zero, is a crash while rotating: it is deleted.
* Anything else is corruption: ``CorruptLog`` names the file and byte offset.
  ``open(repair=True)`` truncates there, deletes every later segment, and
  reports how many records that dropped.
* A header with a version other than 1 raises ``WalVersionError``; repair
  never touches such a file.

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

Any ``OSError`` from a write or fsync is final (``WalFailed``): after a
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
    RecordScanner,
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
            f"start brokerd with --repair to truncate the log there "
            f"(every record from that point on is dropped)"
        )


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
            next_lsn = yield from self._replay_segments(repair, st)
            next_lsn = max(next_lsn, st.min_next_lsn)
            self._start_appending(next_lsn)
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

    def _replay_segments(self, repair: bool, st: _ReplayState) -> Iterator[Record]:
        """Yield the records; return the next lsn.  Sets up ``self._segments``."""
        files = self._list_segments()
        expected: int | None = None  # lsn the next record must have
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
                self._corrupt(files, index, data, 0, str(e), None, None, repair, st)
                break

            if header.first_lsn != name_lsn:
                self._corrupt(
                    files, index, data, 0,
                    f"segment header says its first lsn is {header.first_lsn} but its file name says {name_lsn}",
                    None, None, repair, st,
                )
                break
            if expected is not None and header.first_lsn != expected:
                self._corrupt(
                    files, index, data, 0,
                    f"segment starts at lsn {header.first_lsn} but the previous segment ended at lsn {expected - 1}",
                    header.salt, None, repair, st,
                )
                break

            seg = _Segment(name, path, header.first_lsn, len(data), header.salt)
            self._segments = self._segments + [seg]
            st.segments += 1
            scanner = RecordScanner(data, header.salt, SEGMENT_HEADER_SIZE, header.first_lsn)
            for r in scanner:
                yield Record(r.lsn, r.type, r.flags, r.payload, name, r.offset)
            st.records += scanner.count
            seg.last_lsn = scanner.next_lsn - 1
            expected = scanner.next_lsn
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
            self._corrupt(files, index, data, damage.offset, damage.detail, header.salt, damage, repair, st)
            seg.size = damage.offset
            break

        return 1 if expected is None else expected

    def _corrupt(
        self,
        files: list[tuple[int, str]],
        index: int,
        data: bytes,
        offset: int,
        reason: str,
        salt: int | None,
        damage: Damage | None,
        repair: bool,
        st: _ReplayState,
    ) -> None:
        """Raise CorruptLog, or with ``repair`` cut the log at ``offset`` of file ``index``."""
        name = files[index][1]
        path = os.path.join(self.directory, name)
        if not repair:
            raise CorruptLog(path, offset, reason)

        dropped, exact = _count_dropped_in_segment(data, offset, salt, damage)
        later = [os.path.join(self.directory, n) for _, n in files[index + 1 :]]
        for later_path in later:
            with open(later_path, "rb") as f:
                later_data = f.read()
            st.truncated_bytes += len(later_data)
            n, ok = _count_dropped_in_segment(later_data, SEGMENT_HEADER_SIZE, None, None)
            dropped += n
            exact = exact and ok
        st.truncated_bytes += len(data) - offset
        st.truncated_at = (name, offset)
        if offset < SEGMENT_HEADER_SIZE:
            # The header itself is bad: the whole file goes.
            self._remove_files([path] + later, st)
            self._segments = [s for s in self._segments if s.name != name]
            if not self._segments:
                # Nothing left to continue from: carry on from the deleted
                # file's name so lsns never go backwards.
                st.min_next_lsn = max(st.min_next_lsn, files[index][0])
            action = f"deleted {name}"
        else:
            self._truncate_file(path, name, offset)
            self._remove_files(later, st)
            action = f"truncated {name} at byte offset {offset}"
        st.repaired = True
        st.dropped += dropped
        st.dropped_exact = st.dropped_exact and exact
        count = f"{dropped}" if exact else f"at least {dropped}"
        st.warn(
            f"repair of {self.directory}: {reason} at byte offset {offset} of {name}; "
            f"{action} and deleted {len(later)} later segment(s); dropped {count} record(s)"
        )

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
        buf = self._pending
        buf += header
        buf += payload
        self._next_lsn = lsn + 1
        self._pending_count += 1
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
        An ``unlink`` error other than "already gone" is raised as the
        ``OSError``; a failed directory fsync is a ``WalFailed``.
        """
        with self._lock:
            self._check_writable()
            segs = self._segments
            victims = []
            for s in segs[:-1]:
                if s.last_lsn > lsn:
                    break
                victims.append(s)
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
        try:
            if self._fault is not None:
                self._fault.before_fsync(DIRECTORY_SYNC_NAME)
            fd = os.open(self.directory, os.O_RDONLY | _O_DIRECTORY | _O_CLOEXEC)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        except OSError as e:
            raise self._fail("fsync", e, self.directory) from e

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
        os.close(self._fd)
        self._fd = None
        self._create_segment(head.last_lsn + 1)

    def _create_segment(self, first_lsn: int) -> None:
        """Create, write the header of, and fsync a new head segment (lock held)."""
        if first_lsn > MAX_LSN:
            raise OverflowError("the write-ahead log has used every u64 lsn")
        name = segment_name(first_lsn)
        path = os.path.join(self.directory, name)
        salt = int.from_bytes(os.urandom(4), "big")
        header = encode_segment_header(salt, first_lsn)
        try:
            fd = os.open(
                path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_APPEND | _O_CLOEXEC, SEGMENT_FILE_MODE
            )
        except OSError as e:
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
            if self._lock_fd is not None:
                try:
                    fcntl.flock(self._lock_fd, fcntl.LOCK_UN)
                finally:
                    os.close(self._lock_fd)
                    self._lock_fd = None


_pack_record_header = RECORD_HEADER.pack


def _read_pid(fd: int) -> int | None:
    try:
        text = os.pread(fd, 32, 0).decode("ascii", "replace").strip()
        return int(text) if text.isdigit() else None
    except OSError:
        return None


def _is_torn_tail(data: bytes, damage: Damage, salt: int, expected_lsn: int) -> bool:
    """Is the damage in the last segment a torn write (True) or corruption?

    A crash mid-write leaves a prefix of the last batch: a record that runs
    past end of file.  Unsynced pages lost in a power cut read back as zeros.
    So: the bad record must run to the end of the file or be followed only by
    zeros, and no valid record may follow it anywhere (that would prove the
    log went on after the damage: a flipped length or a bad sector, not a
    torn tail).  A record with a good checksum but the wrong lsn is never torn.
    """
    if damage.kind == Damage.BAD_LSN:
        return False
    size = len(data)
    if damage.runs_past_end:
        end = size
    elif damage.length is None:  # impossible length: only its header is known to be a record
        end = damage.offset + RECORD_HEADER_SIZE
    else:
        end = damage.offset + RECORD_HEADER_SIZE + damage.length
    if end < size and data.count(0, end) != size - end:
        return False
    return not _valid_record_follows(data, damage.offset + 1, salt, expected_lsn)


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


def _count_dropped_in_segment(
    data: bytes, offset: int, salt: int | None, damage: Damage | None
) -> tuple[int, bool]:
    """How many records a repair drops from ``offset`` to the end of ``data``.

    Returns (count, exact).  Skips the bad record by its length when that is
    plausible and counts the well-formed records after it; anything it cannot
    parse makes the count a lower bound ("at least").
    """
    if salt is None:
        try:
            salt = decode_segment_header(data).salt
        except WalFormatError:
            return 0, False  # the header is gone: no way to tell records from noise
    count = 0
    pos = max(offset, SEGMENT_HEADER_SIZE)
    if damage is not None:
        count = 1  # the bad record itself
        if damage.length is None or damage.runs_past_end:
            return count, False
        pos = damage.offset + RECORD_HEADER_SIZE + damage.length
    scanner = RecordScanner(data, salt, pos, None)
    for _ in scanner:
        pass
    count += scanner.count
    rest = scanner.damage
    exact = rest is None or data.count(0, rest.offset) == len(data) - rest.offset
    return count, exact
