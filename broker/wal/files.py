"""The log directory's files and descriptors, and the fail-stop rule.

``LogFiles`` is the one place that touches the directory: it takes the lock,
holds the descriptors the log needs even at the process's fd limit, and
writes and fsyncs through the fault seam (``faults.py``).  The log
(``log.py``) and recovery (``recovery.py``, ``repair.py``) both work through
it, so every write and fsync of the log passes one seam and one failure rule:

Any ``OSError`` from a write or fsync is final (``WalFailed``): after a failed
fsync Linux may have dropped the dirty pages and a retry can "succeed"
without the data (PostgreSQL's fsyncgate), so nothing is retried.  ``fail``
records the first failure and tells the log, which stops appending.

Running out of file descriptors (EMFILE/ENFILE) is not a disk fault: the
directory fd is held open for its fsyncs, and one spare descriptor is held and
given back just before the log opens a file (``open_file``).
"""

from __future__ import annotations

import errno as _errno
import fcntl
import logging
import os
from typing import Callable

from .errors import WalFailed, WalLocked
from .faults import DIRECTORY_SYNC_NAME, Fault
from .format import CHECKPOINT_NAME, MANIFEST_NAME, SEGMENT_FILE, encode_checkpoint, encode_manifest

__all__ = ["LogFiles", "SegmentFile", "LOCK_NAME", "SEGMENT_FILE_MODE"]

logger = logging.getLogger("brokerd.wal")

LOCK_NAME = "LOCK"
SEGMENT_FILE_MODE = 0o600  # payloads are users' task data: owner-only (umask can only narrow it)

_fdatasync = getattr(os, "fdatasync", os.fsync)  # macOS has no fdatasync
O_CLOEXEC = getattr(os, "O_CLOEXEC", 0)
_O_DIRECTORY = getattr(os, "O_DIRECTORY", 0)


class SegmentFile:
    """Writer-side bookkeeping for one segment file."""

    __slots__ = ("name", "path", "first_lsn", "last_lsn", "size", "salt", "crc")

    def __init__(self, name: str, path: str, first_lsn: int, size: int, salt: int) -> None:
        self.name = name
        self.path = path
        self.first_lsn = first_lsn
        self.last_lsn = first_lsn - 1
        self.size = size
        self.salt = salt
        # zlib.crc32 of the file's bytes so far (kept as they are written or read at replay),
        # None if unknown: the checkpoint pointer records it (format.py), start-up checks it.
        self.crc: int | None = None


class LogFiles:
    """The directory of one log: lock, descriptors, writes and fsyncs, the manifest on disk.

    ``on_failure`` is called once, when the first write or fsync fails.
    """

    def __init__(self, directory: str, fault: Fault | None, on_failure: Callable[[], None]) -> None:
        self.directory = directory
        self.fault = fault
        self.failed: WalFailed | None = None
        self._on_failure = on_failure
        self._lock_fd: int | None = None
        # Held open from open() to close(): the directory (for every fsync of
        # it) and one spare descriptor, closed just before the log opens a
        # file, so that a process at its fd limit (EMFILE) still rotates.
        self.dir_fd: int | None = None
        self.reserve_fd: int | None = None
        self.manifest: tuple[int, dict[int, int]] | None = None  # (start lsn, gaps) as on disk

    # ------------------------------------------------------------------ lock and descriptors

    def lock(self) -> None:
        """Create the directory if needed and lock it, or raise ``WalLocked``."""
        os.makedirs(self.directory, exist_ok=True)
        self._take_lock()

    def open_descriptors(self) -> None:
        """Take the directory fd and the spare one (after ``lock``)."""
        self.dir_fd = os.open(self.directory, os.O_RDONLY | _O_DIRECTORY | O_CLOEXEC)
        self.take_reserve()

    def _take_lock(self) -> None:
        path = os.path.join(self.directory, LOCK_NAME)
        fd = os.open(path, os.O_RDWR | os.O_CREAT | O_CLOEXEC, SEGMENT_FILE_MODE)
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

    def close(self) -> None:
        """Close the directory and spare descriptors, then unlock.  Safe to call twice."""
        for attr in ("dir_fd", "reserve_fd"):
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

    def take_reserve(self) -> None:
        if self.reserve_fd is None:
            try:
                self.reserve_fd = os.open(os.devnull, os.O_RDONLY | O_CLOEXEC)
            except OSError:
                pass  # at the limit already: taken again after the next open

    def open_file(self, path: str, flags: int, mode: int = SEGMENT_FILE_MODE) -> int:
        """``os.open`` that first gives back the spare descriptor, then takes it again."""
        if self.reserve_fd is not None:
            os.close(self.reserve_fd)
            self.reserve_fd = None
        try:
            return os.open(path, flags, mode)
        finally:
            self.take_reserve()

    # ------------------------------------------------------------------ writes and fsyncs

    def fail(self, operation: str, error: OSError, segment: str) -> WalFailed:
        """Enter the permanent failed state; return the exception to raise."""
        failure = WalFailed(
            errno=error.errno,
            operation=operation,
            segment=segment,
            strerror=error.strerror or str(error),
        )
        if self.failed is None:
            self.failed = failure
            self._on_failure()
            logger.error("%s", failure)
        return self.failed

    def write_all(self, fd: int, data: bytes | bytearray, name: str) -> None:
        fault = self.fault
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

    def fsync_fd(self, fd: int, name: str, *, data: bool) -> None:
        try:
            if self.fault is not None:
                self.fault.before_fsync(name)
            if data:
                _fdatasync(fd)
            else:
                os.fsync(fd)
        except OSError as e:
            raise self.fail("fsync", e, name) from e

    def fsync_directory(self) -> None:
        # Creating, truncating to nothing, or unlinking a file is only durable
        # once the directory is fsynced (Pillai et al., "All File Systems Are Not
        # Created Equal", OSDI 2014: the ALICE study of crash consistency).
        # The directory fd is held open from open() on, so this needs no
        # new descriptor (a process at its fd limit can still fsync it).
        try:
            if self.fault is not None:
                self.fault.before_fsync(DIRECTORY_SYNC_NAME)
            os.fsync(self.dir_fd)
        except OSError as e:
            raise self.fail("fsync", e, self.directory) from e

    # ------------------------------------------------------------------ whole files

    def list_segments(self) -> list[tuple[int, str]]:
        """``(first lsn, file name)`` of every segment file, oldest first."""
        found = []
        for name in os.listdir(self.directory):
            m = SEGMENT_FILE.match(name)
            if m:
                found.append((int(m.group(1)), name))
            elif name.endswith(".wal"):
                logger.warning("ignoring %s in %s: not a segment file name", name, self.directory)
        found.sort()
        return found

    def write_manifest(self, start: int, gaps: dict[int, int]) -> None:
        """Replace the manifest atomically: write a temporary file, fsync, rename, fsync the directory.

        Raises ``OSError`` if the file cannot be written (the caller decides);
        a failed directory fsync is a ``WalFailed``.
        """
        self.replace_small_file(MANIFEST_NAME, encode_manifest(start, gaps))
        self.manifest = (start, dict(gaps))

    def write_checkpoint(self, lsn: int, segment: str, offset: int, prefix: int, sums: dict[str, int]) -> None:
        """Replace the checkpoint pointer atomically (as the manifest: temporary file, fsync,
        rename, fsync the directory).  A crash at any byte leaves the old pointer or the new one;
        a damaged one is ignored at start-up (the log is then read from its start)."""
        self.replace_small_file(CHECKPOINT_NAME, encode_checkpoint(lsn, segment, offset, prefix, sums))

    def replace_small_file(self, name: str, data: bytes) -> None:
        """Write ``name`` (the manifest, the checkpoint pointer) whole or not at all: a temporary
        file, fsync, rename over the old one, fsync the directory.  A crash at any byte leaves the
        old file or the new one."""
        path = os.path.join(self.directory, name)
        tmp = path + ".tmp"
        fd = self.open_file(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | O_CLOEXEC)
        try:
            self.write_all(fd, data, name)
            if self.fault is not None:
                self.fault.before_fsync(name)
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
        self.fsync_directory()

    def replace_segment(self, path: str, name: str, data: bytes | bytearray) -> None:
        """Replace a segment file atomically (repair only)."""
        tmp = path + ".repair"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | O_CLOEXEC, SEGMENT_FILE_MODE)
        try:
            self.write_all(fd, data, name)
            self.fsync_fd(fd, name, data=False)
        finally:
            os.close(fd)
        os.replace(tmp, path)
        self.fsync_directory()

    def truncate_file(self, path: str, name: str, size: int) -> None:
        fd = os.open(path, os.O_WRONLY | O_CLOEXEC)
        try:
            try:
                os.ftruncate(fd, size)
            except OSError as e:
                raise self.fail("truncate", e, name) from e
            self.fsync_fd(fd, name, data=False)
        finally:
            os.close(fd)

    def remove_files(self, paths: list[str]) -> list[str]:
        """Unlink ``paths`` (gone already is fine), fsync the directory; return their names."""
        names = []
        for path in paths:
            try:
                os.unlink(path)
            except FileNotFoundError:
                pass
            names.append(os.path.basename(path))
        if paths:
            self.fsync_directory()
        return names


def _read_pid(fd: int) -> int | None:
    try:
        text = os.pread(fd, 32, 0).decode("ascii", "replace").strip()
        return int(text) if text.isdigit() else None
    except OSError:
        return None
