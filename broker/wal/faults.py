"""The fault-injection seam: how tests make a write or an fsync fail on cue.

``WriteAheadLog(fault=...)`` calls the seam before every ``os.write`` and
every fsync it makes (segments, the directory, the manifest), so a test can
reproduce a full disk, a short write or a failing fsync deterministically,
on real files, without mocking ``os``.  ``FaultPlan`` is the ready-made one.
"""

from __future__ import annotations

import errno as _errno
import os
from typing import Protocol

__all__ = ["Fault", "FaultPlan", "DIRECTORY_SYNC_NAME"]

DIRECTORY_SYNC_NAME = "."  # what the fault seam is told when the directory itself is fsynced


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
