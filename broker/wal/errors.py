"""Everything the write-ahead log raises on purpose: one family under ``WalError``.

Catch ``WalError`` for "the log refused or failed"; the subclasses say whose
fault it was and what to do:

* ``WalLocked``: another brokerd holds the directory (stop it, or use another).
* ``CorruptLog``: the files are damaged somewhere other than a torn tail
  (``--repair`` drops what cannot be read); ``recovery.MissingRecords`` is the
  case where whole segment files are gone.
* ``WalVersionError``: a newer brokerd wrote a segment this one cannot read.
* ``WalFailed``: a write or fsync failed; the log is failed for good (fail-stop).
* ``WalFormatError``: these bytes are not a valid piece of the log.  The byte
  format (``format.py``) raises it and its subclasses; the log turns it into
  one of the errors above before it reaches a caller.

``ValueError``/``RuntimeError`` remain what they are elsewhere: a caller's
mistake (a record type out of range, appending before replay), not the log's.
"""

from __future__ import annotations

import errno as _errno
import os

__all__ = ["WalError", "WalLocked", "CorruptLog", "WalVersionError", "WalFailed", "WalFormatError"]


class WalError(Exception):
    """Base class of everything the write-ahead log raises on purpose."""


class WalFormatError(WalError):
    """These bytes are not a valid piece of a version-1 write-ahead log."""


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
