"""The write-ahead log: appending records, writing them in batches, segment files.

The broker state produces records ``(type 1..255, payload bytes)``; the
``WriteAheadLog`` gives each one a log sequence number (LSN), writes them in
batches, fsyncs them per policy, rotates and deletes segment files, and
replays them at startup.  It knows nothing about what a payload means, and it
does not use trio: the server calls ``write_batch`` through
``trio.to_thread.run_sync``.

The package, one concept per module: ``format.py`` the bytes on disk (and
how to bump their version), ``errors.py`` the ``WalError`` family,
``files.py`` the directory's descriptors, writes and fsyncs,
``recovery.py`` replay (torn tail or corruption, the manifest), ``repair.py``
``--repair``, ``faults.py`` the fault-injection seam; this module the log.

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
import logging
import os
import struct
import threading
import time
import zlib
from array import array
from bisect import bisect_right
from dataclasses import dataclass
from typing import Callable, Iterator

from .errors import CorruptLog, WalError, WalFailed, WalFormatError, WalLocked, WalVersionError
from .faults import DIRECTORY_SYNC_NAME, Fault, FaultPlan
from .files import LOCK_NAME, O_CLOEXEC, LogFiles, SegmentFile
from .format import (
    CHECKPOINT_NAME,
    CRC_START,
    LSN_FIELD,
    Checkpoint,
    MANIFEST_NAME,
    MAX_LSN,
    MAX_RECORD_BYTES,
    RECORD_HEADER,
    RECORD_HEADER_SIZE,
    SEGMENT_HEADER_SIZE,
    decode_checkpoint,
    decode_record,
    encode_segment_header,
    seal_records,
    segment_name,
)
from .recovery import MissingRecords, Record, RecoveryReport, ReplayState, read_manifest, replay_segments
from .repair import salvage

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
# Rotate after this much: big enough that rotation (an fsync of the old
# segment, the new header and the directory) is rare, small enough that
# compaction frees space in useful steps; RabbitMQ's Ra log uses the same size.
DEFAULT_SEGMENT_BYTES = 64 * 1024 * 1024  # bytes
MIN_SEGMENT_BYTES = 64  # bytes; only tests want it this small; holds the 24-byte header and a record
DEFAULT_FSYNC_INTERVAL_MS = 1000  # beanstalkd/Redis "everysec": loses at most ~1 s on power loss
# read_payloads: a mark every this many bytes of a segment (16 bytes of memory each: 256 KiB
# of marks for 1 GiB of log), and reads of this many bytes at a time: a record is found by
# reading at most about this much before it.
MARK_BYTES = 64 * 1024
READ_CHUNK = 64 * 1024
# A checkpoint pointer is a few lines plus one per segment before it (~45 bytes each): 1 MiB
# covers some 20,000 segments (1.3 TB of 64 MiB segments); more is damage.
MAX_CHECKPOINT_BYTES = 1 << 20

# --------------------------------------------------------------------------- value types

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
        self._clock = clock
        self._state = _NEW
        self.recovery: RecoveryReport | None = None
        # The directory's lock, descriptors, writes and fsyncs; its first
        # failure stops appends at once (see ``failed``).
        self._files = LogFiles(self.directory, fault, self._stop_appending)

        # loop side
        self._appendable = False
        self._next_lsn = 1
        self._pending = bytearray()
        self._pending_first = 1
        self._pending_count = 0

        # writer side
        self._lock = threading.Lock()
        self._rotation_postponed = False  # a rotation failed for lack of fds; retried after each write
        self._fd: int | None = None
        self._segments: list[SegmentFile] = []
        self._written_lsn = 0
        self._synced_lsn = 0
        self._last_sync = clock()
        # Read-back marks (``read_payloads``): per segment name, the lsn and byte offset of a
        # record at least every MARK_BYTES of the segment, so one record is found by reading
        # at most ~MARK_BYTES before it, not the whole segment.  16 bytes per mark.
        self._marks: dict[str, tuple[array, array]] = {}
        # The lsn of the checkpoint replay started from (``open(use_checkpoint=True)``), else None.
        self.replay_from: int | None = None

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
    def failed(self) -> WalFailed | None:
        """The write or fsync failure that stopped the log for good, else None."""
        return self._files.failed

    @property
    def pending_count(self) -> int:
        return self._pending_count

    @property
    def pending_bytes(self) -> int:
        return len(self._pending)

    # ------------------------------------------------------------------ open / replay

    def open(self, *, repair: bool = False, use_checkpoint: bool = False) -> Iterator[Record]:
        """Lock the directory and return a generator replaying every record.

        The lock is taken (and ``WalLocked`` raised) by this call itself.  The
        generator yields ``Record``s oldest to newest; the caller must consume
        it to the end, after which ``recovery`` is set and ``append`` works.
        ``CorruptLog``/``WalVersionError``/``WalFailed`` come out of the
        generator after the records before the damage were yielded; abandoning
        or failing the replay releases the lock.  The records are not kept in
        memory, so replaying a large log costs one segment's bytes at a time.

        ``use_checkpoint``: if the checkpoint pointer (``CHECKPOINT``, see format.py) is sound,
        yield only the records from the one it names on (``replay_from`` is then its lsn; the
        caller must know what a checkpoint is: broker/state/replay.py).  Never under ``repair``.
        """
        if self._state != _NEW:
            raise RuntimeError("open() can be called once per WriteAheadLog; make a new one to reopen")
        self._files.lock()
        try:
            self._files.open_descriptors()
        except BaseException:
            self._release()
            raise
        self._state = _REPLAYING
        st = ReplayState()
        skip_to = None
        if use_checkpoint and not repair:
            try:
                skip_to = self._checkpoint_pointer(read_manifest(self._files, False, ReplayState()), st)
            except WalError:
                skip_to = None  # a damaged manifest: the replay below says so
        self.replay_from = skip_to.lsn if skip_to is not None else None
        return self._replay(repair, st, skip_to)

    def _checkpoint_pointer(self, manifest, st: ReplayState) -> Checkpoint | None:
        """The checkpoint pointer if it names a record that is there with that lsn, else None
        (with a warning unless there is no pointer at all)."""
        path = os.path.join(self.directory, CHECKPOINT_NAME)
        try:
            with open(path, "rb") as f:
                pointer = decode_checkpoint(f.read(MAX_CHECKPOINT_BYTES))
            lsn, segment, offset = pointer.lsn, pointer.segment, pointer.offset
            seg_path = os.path.join(self.directory, segment)
            with open(seg_path, "rb") as f:
                salt = int.from_bytes(f.read(SEGMENT_HEADER_SIZE)[12:16], "big")
                f.seek(offset)
                head = f.read(RECORD_HEADER_SIZE)
                length = RECORD_HEADER.unpack_from(head)[0] if len(head) == RECORD_HEADER_SIZE else 0
                if length > MAX_RECORD_BYTES:
                    raise ValueError(f"the record at offset {offset} of {segment} is damaged")
                record = decode_record(head + f.read(length), 0, salt)
            if record.lsn != lsn:
                raise ValueError(f"the record at offset {offset} of {segment} is lsn {record.lsn}, not {lsn}")
            if manifest is not None and lsn < manifest[0]:
                raise ValueError(f"lsn {lsn} is older than where the log starts ({manifest[0]})")
        except FileNotFoundError as exc:
            if exc.filename != path:
                st.warn(f"ignoring {CHECKPOINT_NAME} in {self.directory}: {os.path.basename(exc.filename)} is gone "
                        f"(compacted away); reading the whole log")
            return None
        except (OSError, ValueError, WalError, struct.error) as exc:
            st.warn(f"ignoring {CHECKPOINT_NAME} in {self.directory} ({exc}); reading the whole log")
            return None
        return pointer

    def _replay(self, repair: bool, st: ReplayState, skip_to) -> Iterator[Record]:
        started = time.perf_counter()
        done = False
        try:
            manifest = read_manifest(self._files, repair, st)
            if repair:
                manifest = salvage(self._files, manifest, st)
            records = replay_segments(self._files, manifest, st, self._add_replayed_segment, skip_to,
                                      self._find_marks)
            mark = self._mark
            seg, due = None, 0  # a mark is due in `seg` at this offset (checked here: per record)
            while True:
                try:
                    r = next(records)
                except StopIteration as stop:
                    next_lsn = stop.value
                    break
                if r.offset >= due or r.segment_name != seg:
                    mark(r.segment_name, r.lsn, r.offset)
                    seg = r.segment_name
                    due = self._marks[seg][1][-1] + MARK_BYTES
                yield r
            next_lsn = max(next_lsn, st.min_next_lsn)
            self._start_appending(next_lsn)
            if manifest is None:
                # A fresh log, or one written before the manifest existed:
                # record where it starts from now on.
                first = self._segments[0].first_lsn
                self._files.write_manifest(first, {})
                if st.segments:
                    logger.info("recorded in %s that the log in %s starts at lsn %d", MANIFEST_NAME, self.directory, first)
            else:
                self._files.manifest = manifest
            done = True
        finally:
            if not done:
                self._release()
        self.recovery = st.report(time.perf_counter() - started, next_lsn)

    def _add_replayed_segment(self, seg: SegmentFile) -> None:
        self._segments = self._segments + [seg]  # replaced, never mutated: see segments()

    def _stop_appending(self) -> None:
        """The log failed: nothing appended from now on could be written."""
        self._appendable = False

    def _start_appending(self, next_lsn: int) -> None:
        with self._lock:
            if self._segments:
                head = self._segments[-1]
                self._fd = os.open(head.path, os.O_WRONLY | os.O_APPEND | O_CLOEXEC)
                # What we replayed may still be only in the page cache (a
                # kill -9 before the fsync); make it durable before anything
                # is built on it.
                self._files.fsync_fd(self._fd, head.name, data=True)
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

    def small_write_due(self, limit: int) -> bool:
        """Whether writing what is pending takes one small ``os.write`` and nothing else: at most
        ``limit`` bytes, no fsync by the log's own policy, no segment rotation.  Such a write
        goes to the page cache in microseconds, so a caller may make it without a thread."""
        return (self.fsync_policy == "never" and 0 < len(self._pending) <= limit and bool(self._segments)
                and self._segments[-1].size + len(self._pending) < self.segment_bytes)

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
                self._files.write_all(self._fd, data, head.name)
            except OSError as e:
                failure = self._files.fail("write", e, head.name)
                # Leave no partial record behind if we still can; if this
                # fails too, replay treats the partial record as a torn tail.
                try:
                    os.ftruncate(self._fd, start)
                except OSError as e2:
                    logger.warning("could not truncate %s back to %d bytes: %s", head.name, start, e2)
                raise failure from e
            self._mark_batch(head.name, data, start, batch.first_lsn)
            if head.crc is not None:
                head.crc = zlib.crc32(data, head.crc)
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
                gaps = self._files.manifest[1] if self._files.manifest else {}
                self._files.write_manifest(segs[len(victims)].first_lsn, gaps)
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
                    for name in deleted:
                        self._marks.pop(name, None)
            if deleted:
                self._files.fsync_directory()
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

    # ------------------------------------------------------------------ replication

    # ------------------------------------------------------------------ reading records back

    def _mark(self, segment: str, lsn: int, offset: int) -> None:
        m = self._marks.get(segment)
        if m is None:
            m = self._marks[segment] = (array("q"), array("q"))
        elif offset - m[1][-1] < MARK_BYTES:
            return
        m[0].append(lsn)
        m[1].append(offset)

    def _mark_batch(self, segment: str, data: bytearray, start: int, first_lsn: int) -> None:
        """Marks for a batch just written at ``start``: walks its record headers (lengths only)."""
        m = self._marks.get(segment)
        last = m[1][-1] if m is not None else -MARK_BYTES
        off, lsn, size = 0, first_lsn, len(data)
        unpack = RECORD_HEADER.unpack_from
        while off < size:
            if start + off - last >= MARK_BYTES:
                self._mark(segment, lsn, start + off)
                last = start + off
            off += RECORD_HEADER_SIZE + unpack(data, off)[0]
            lsn += 1

    def _find_marks(self, name: str, data: bytes, salt: int, first_lsn: int, last_lsn: int, end: int) -> None:
        """Marks for the bytes ``data[:end]`` of a segment replay did not parse (before the
        checkpoint it started from), so that a queued body there is found by reading ~MARK_BYTES,
        not the segment: one sampled lsn about every MARK_BYTES, found by searching for its 8
        bytes (C speed, not a Python step per record) and checked by decoding the record there."""
        if last_lsn < first_lsn or end <= SEGMENT_HEADER_SIZE:
            return
        self._mark(name, first_lsn, SEGMENT_HEADER_SIZE)
        step = max(1, (last_lsn - first_lsn + 1) * MARK_BYTES // (end - SEGMENT_HEADER_SIZE))
        pos = SEGMENT_HEADER_SIZE
        for lsn in range(first_lsn + step, last_lsn + 1, step):
            needle = LSN_FIELD.pack(lsn)
            hit = data.find(needle, pos + CRC_START, end)
            while hit != -1:
                try:
                    if decode_record(data, hit - CRC_START, salt).lsn == lsn:
                        break
                except WalFormatError:
                    pass
                hit = data.find(needle, hit + 1, end)
            if hit == -1:
                return  # not there (a gap a repair left): the marks so far still help
            pos = hit - CRC_START
            self._mark(name, lsn, pos)

    def save_checkpoint(self, lsn: int) -> None:
        """Writer side: point ``CHECKPOINT`` at record ``lsn``, the first of a checkpoint of the
        broker state.  The caller has made every record of the checkpoint durable (``sync``)."""
        with self._lock:
            self._check_writable()
            if lsn > self._synced_lsn:
                raise RuntimeError(f"checkpoint lsn {lsn} is not fsynced yet (synced through {self._synced_lsn})")
            segs = self._segments
            k = bisect_right([s.first_lsn for s in segs], lsn) - 1
            if k < 0:
                raise ValueError(f"lsn {lsn} is older than the log")
            seg = segs[k]
            m = self._marks.get(seg.name)
            j = bisect_right(m[0], lsn) - 1 if m is not None else -1
            off = m[1][j] if j >= 0 else SEGMENT_HEADER_SIZE
            with open(seg.path, "rb") as f:
                f.seek(off)
                data = f.read(seg.size - off)
            pos = 0
            while pos + RECORD_HEADER_SIZE <= len(data):
                r = decode_record(data, pos, seg.salt)
                if r.lsn == lsn:
                    offset = off + pos
                    with open(seg.path, "rb") as f:
                        prefix = zlib.crc32(f.read(offset))
                    sums = {s.name: self._segment_crc(s) for s in segs[:k]}
                    self._files.write_checkpoint(lsn, seg.name, offset, prefix, sums)
                    return
                pos = r.end
            raise LookupError(f"log record {lsn} is not in {seg.name}")

    def _drop_checkpoint(self) -> None:
        """Records are about to be cut (a follower taking its leader's log): the checkpoint
        pointer may name one of them, or a record another brokerd writes at that lsn next.
        Deleted first (and the directory fsynced): the next start reads the whole log."""
        try:
            os.unlink(os.path.join(self.directory, CHECKPOINT_NAME))
        except FileNotFoundError:
            return
        self._files.fsync_directory()

    @staticmethod
    def _segment_crc(seg: SegmentFile) -> int:
        """The whole file's CRC, kept as it was written or replayed (read again if unknown)."""
        if seg.crc is None:
            with open(seg.path, "rb") as f:
                seg.crc = zlib.crc32(f.read())
        return seg.crc

    def read_payloads(self, lsns) -> dict[int, tuple[int, bytes]]:
        """``lsn -> (type, payload)`` for the written records ``lsns`` (any order), read back
        from the segment files with ``pread``: from the mark at or before each one, in
        READ_CHUNK pieces, records checked by their CRC.  Safe beside the writer thread
        (it reads only what ``written_lsn`` covers).  A missing record raises ``LookupError``
        naming it: the caller asked for one compaction deleted, or one never written.
        """
        out: dict[int, tuple[int, bytes]] = {}
        # In lsn order, whatever order they come in: a block's entries are in seq order, and
        # once compaction rewrote its oldest ones forward their lsns no longer ascend (reading
        # them as given skipped the older records: a restart then failed the log).
        written = self._written_lsn
        wanted = sorted({lsn for lsn in lsns if lsn <= written})
        segs = self._segments
        firsts = [s.first_lsn for s in segs]
        # The record walk is written out (no decode_record call, no record object per record):
        # a deep queue read back after a restart reads every body this way, ~1,000 at a time.
        # Every record walked is checked as decode_record checks it (a bad one is decoded by it,
        # to raise its error); only the wanted ones are copied out.
        unpack = RECORD_HEADER.unpack_from
        crc32 = zlib.crc32
        hsize = RECORD_HEADER_SIZE
        nwanted = len(wanted)
        i = 0
        while i < nwanted:
            lsn = wanted[i]
            k = bisect_right(firsts, lsn) - 1
            if k < 0:
                break
            seg = segs[k]
            salt = seg.salt
            m = self._marks.get(seg.name)
            if m is not None:
                j = bisect_right(m[0], lsn) - 1
                off = m[1][j] if j >= 0 else SEGMENT_HEADER_SIZE
            else:
                off = SEGMENT_HEADER_SIZE
            last_here = seg.last_lsn
            fd = os.open(seg.path, os.O_RDONLY | O_CLOEXEC)
            try:
                buf = b""
                view = memoryview(buf)
                base = off  # file offset of buf[0]
                pos = 0
                while i < nwanted and wanted[i] <= last_here:
                    size = len(buf)
                    need = hsize
                    if size - pos >= hsize:
                        length, crc, rlsn, rtype, _ = unpack(buf, pos)
                        end = pos + hsize + length
                        if end <= size and length <= MAX_RECORD_BYTES:
                            if rtype == 0 or crc32(view[pos + CRC_START:end], salt) != crc:
                                decode_record(buf, pos, salt)  # raises DamagedRecord, naming why
                            want = wanted[i]
                            if rlsn >= want:
                                while want < rlsn:  # not in this segment (a gap a repair left)
                                    i += 1
                                    if i == nwanted:
                                        break
                                    want = wanted[i]
                                if rlsn == want:
                                    out[rlsn] = (rtype, buf[pos + hsize:end])
                                    i += 1
                            pos = end
                            continue
                        if length > MAX_RECORD_BYTES:
                            decode_record(buf, pos, salt)  # raises DamagedRecord (too long)
                        need = hsize + length
                    more = os.pread(fd, max(READ_CHUNK, need - (size - pos)), base + size)
                    if not more:
                        break
                    view.release()
                    buf = buf[pos:] + more
                    view = memoryview(buf)
                    base += pos
                    pos = 0
                view.release()
            finally:
                os.close(fd)
            while i < nwanted and wanted[i] <= last_here:
                i += 1
        missing = [lsn for lsn in lsns if lsn not in out]
        if missing:
            raise LookupError(
                f"log records {missing[:5]}{' ...' if len(missing) > 5 else ''} are not in {self.directory} "
                f"(written through lsn {self._written_lsn})"
            )
        return out

    def read_records(self, from_lsn: int, through_lsn: int) -> list[tuple[int, int, bytes]]:
        """Writer side: ``(lsn, type, payload)`` of the written records from ``from_lsn``
        through ``through_lsn`` (at most ``written_lsn``), read back from the segment files.

        A leader serves a follower's catch-up from here (broker/runtime/replication.py).
        Reads whole segments, like replay; the records come back in lsn order.
        """
        from .format import SEGMENT_HEADER_SIZE, RecordScanner, decode_segment_header

        through_lsn = min(through_lsn, self._written_lsn)
        out: list[tuple[int, int, bytes]] = []
        gaps = dict(self._files.manifest[1]) if getattr(self._files, "manifest", None) else {}
        for seg in self.segments():
            if seg.last_lsn < from_lsn or seg.first_lsn > through_lsn:
                continue
            with open(seg.path, "rb") as f:
                data = f.read()
            header = decode_segment_header(data)
            for r in RecordScanner(data, header.salt, SEGMENT_HEADER_SIZE, seg.first_lsn, gaps):
                if r.lsn > through_lsn:
                    break
                if r.lsn >= from_lsn:
                    out.append((r.lsn, r.type, bytes(r.payload)))
        return out

    def start_at(self, next_lsn: int) -> None:
        """Make an empty log start at ``next_lsn`` (a new follower whose leader keeps its
        log from there on).  Refused once the log holds a record."""
        with self._lock:
            self._check_writable()
            head = self._segments[-1]
            if self._written_lsn != 0 or self._pending_count or len(self._segments) != 1 or head.last_lsn >= head.first_lsn:
                raise RuntimeError("start_at() needs an empty log")
            if next_lsn == head.first_lsn:
                return
            old_fd, old_path = self._fd, head.path
            self._segments = []
            self._create_segment(next_lsn)
            os.close(old_fd)
            os.unlink(old_path)
            self._files.write_manifest(next_lsn, {})
            self._written_lsn = self._synced_lsn = next_lsn - 1
        self._next_lsn = next_lsn
        self._pending_first = next_lsn

    def discard_and_start_at(self, next_lsn: int) -> int:
        """Drop every record and make the log start at ``next_lsn``; returns how many were dropped.

        For a follower whose log ends before its leader's oldest kept segment: everything it
        holds is in the leader's snapshot, which it takes next (broker/runtime/replication.py).
        The new start is recorded in the manifest before any segment goes, so a crash half-way
        leaves a log that starts later with a gap replay can see, never a silent hole.
        """
        with self._lock:
            self._check_writable()
            if self._pending_count:
                raise RuntimeError("discard_and_start_at() needs every appended record written first")
            if next_lsn <= self._written_lsn:
                raise ValueError(f"the log already reaches lsn {self._written_lsn}; cannot restart it at {next_lsn}")
            segs = self._segments
            dropped = sum(max(0, s.last_lsn - s.first_lsn + 1) for s in segs)
            self._drop_checkpoint()
            self._files.write_manifest(next_lsn, {})
            os.close(self._fd)
            self._fd = None
            self._segments = []
            self._create_segment(next_lsn)
            for sg in reversed(segs):
                try:
                    os.unlink(sg.path)
                except FileNotFoundError:
                    pass
            self._files.fsync_directory()
            self._written_lsn = self._synced_lsn = next_lsn - 1
            self._last_sync = self._clock()
        self._next_lsn = next_lsn
        self._pending_first = next_lsn
        return dropped

    def truncate_after(self, lsn: int) -> int:
        """Drop every written record after ``lsn``; returns how many were dropped.

        For a deposed leader that follows the new one: the records it wrote after the new
        leader's term began were never confirmed on enough disks, and the new leader's log
        has other records at those lsns (broker/runtime/replication.py).  Later segments
        are deleted (newest first: a crash half-way leaves a prefix, and the truncation is
        simply done again), the segment holding ``lsn + 1`` is cut back with ftruncate
        (as repair cuts a torn tail) and fsynced, and appends go on from ``lsn + 1``.
        Refused with records pending, or below the oldest kept segment.
        """
        from .format import SEGMENT_HEADER_SIZE, RecordScanner

        with self._lock:
            self._check_writable()
            if self._pending_count:
                raise RuntimeError("truncate_after() needs every appended record written first")
            if lsn >= self._written_lsn:
                return 0
            segs = self._segments
            if lsn < segs[0].first_lsn - 1:
                raise ValueError(
                    f"the log keeps records from lsn {segs[0].first_lsn} on; it cannot be cut back to lsn {lsn}")
            dropped = self._written_lsn - lsn
            self._drop_checkpoint()
            keep = [sg for sg in segs if sg.first_lsn <= lsn + 1]
            head = keep[-1]
            gone = segs[len(keep):]
            os.close(self._fd)
            self._fd = None
            for sg in reversed(gone):
                try:
                    os.unlink(sg.path)
                except FileNotFoundError:
                    pass
            if gone:
                self._files.fsync_directory()
            with open(head.path, "rb") as f:
                data = f.read()
            gaps = dict(self._files.manifest[1]) if self._files.manifest else {}
            cut = SEGMENT_HEADER_SIZE
            for r in RecordScanner(data, head.salt, SEGMENT_HEADER_SIZE, head.first_lsn, gaps):
                if r.lsn > lsn:
                    break
                cut = r.end
            self._files.truncate_file(head.path, head.name, cut)
            head.crc = zlib.crc32(data[:cut])
            if any(first > lsn for first in gaps):
                start = self._files.manifest[0] if self._files.manifest else segs[0].first_lsn
                self._files.write_manifest(start, {a: b for a, b in gaps.items() if a <= lsn})
            self._fd = os.open(head.path, os.O_WRONLY | os.O_APPEND | O_CLOEXEC)
            head.size = cut
            head.last_lsn = lsn
            self._segments = keep
            self._written_lsn = self._synced_lsn = lsn
            self._last_sync = self._clock()
        self._next_lsn = lsn + 1
        self._pending_first = lsn + 1
        return dropped

    def _check_writable(self) -> None:
        if self.failed is not None:
            raise self.failed.with_traceback(None)
        if self._state != _READY:
            if self._state == _CLOSED:
                raise RuntimeError("the write-ahead log is closed")
            raise RuntimeError("open() the write-ahead log and consume its replay first")

    def _sync_head(self) -> None:
        head = self._segments[-1]
        self._files.fsync_fd(self._fd, head.name, data=True)
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
        self._files.take_reserve()  # the slot just freed becomes the spare, if the open above used it
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
            fd = self._files.open_file(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_APPEND | O_CLOEXEC)
        except OSError as e:
            if e.errno in (_errno.EMFILE, _errno.ENFILE) and self._segments:
                # Out of descriptors is not a disk fault: nothing was written.
                raise _NoDescriptor(e.errno, e.strerror, name) from e
            raise self._files.fail("create", e, name) from e
        try:
            try:
                self._files.write_all(fd, header, name)
            except OSError as e:
                raise self._files.fail("write", e, name) from e
            self._files.fsync_fd(fd, name, data=False)
            self._files.fsync_directory()
        except WalFailed:
            os.close(fd)
            try:
                os.unlink(path)  # best effort; replay deletes a header-less last segment anyway
            except OSError:
                pass
            raise
        self._fd = fd
        seg = SegmentFile(name, path, first_lsn, len(header), salt)
        seg.crc = zlib.crc32(header)
        self._segments = self._segments + [seg]

    def _release(self) -> None:
        with self._lock:
            self._appendable = False
            self._state = _CLOSED
            if self._fd is not None:
                try:
                    os.close(self._fd)
                finally:
                    self._fd = None
            self._files.close()


_pack_record_header = RECORD_HEADER.pack


class _NoDescriptor(OSError):
    """EMFILE/ENFILE while opening a new segment: postpone the rotation, do not fail."""


