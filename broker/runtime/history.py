"""The task history's own file: the page's task list survives a restart (flower#542).

Task events are observability, not state: they never enter the write-ahead log (a confirm never
waits for one, compaction never carries them).  Their histories (``broker.state.events``: the last
MAX_TASKS = 10,000 tasks, MAX_HISTORY_EVENTS = 30,000 events) are kept instead in
``<data dir>/task-history.cbor``, a sequence of CBOR items ``[task id, [event, ...]]``, the
task's whole (bounded) history as of that item; a later item of a task replaces an earlier one.

* Every ``FLUSH_EVERY`` seconds the server takes the histories that changed (a set of task ids
  the state keeps, the only per-event cost) and appends them, encoded and written in a worker
  thread: one write, no fsync.  A ``kill -9`` or a crash loses at most the last ``FLUSH_EVERY``
  seconds of history; a clean stop appends the rest first.
* When the file grows past ``FILE_MAX`` it is rewritten from the live histories (newest kept
  first, up to ``FILE_MAX / 2``), in a temporary file fsynced and renamed over it.  So the file
  never holds much more than ``FILE_MAX`` (64 MiB; ~10 MiB for 10,000 tasks of three ordinary
  events) and reading it back at start-up is bounded too.
* Long text values are cut to a preview (``events.HISTORY_TEXT`` characters, tracebacks kept).
* A torn or unreadable tail (a crash in the middle of an append) ends the read there, with a
  warning: what came before is kept.  Nothing about this file can stop brokerd: a failed write
  is logged and the history is written again with the next rewrite.
"""

from __future__ import annotations

import io
import logging
import os
import threading

import cbor2
import trio

from broker.state.events import persistable

log = logging.getLogger("brokerd.history")

FILE_NAME = "task-history.cbor"
FLUSH_EVERY = 2.0  # seconds between appends: what a crash may lose of the page's history
FILE_MAX = 64 * 1024 * 1024  # bytes; past it the file is rewritten from memory (see above)
FILE_MODE = 0o600  # task args and results: owner-only, like the log's segments


class HistoryFile:
    def __init__(self, data_dir: str):
        self.path = os.path.join(data_dir, FILE_NAME)
        self.size = 0
        self.failed = False  # a write failed: logged once until one succeeds again
        # the writer's thread and a stop's final append never write at the same time
        self.lock = threading.Lock()

    def load(self) -> list:
        """The items in the file, in order; [] when there is none."""
        try:
            with open(self.path, "rb") as f:
                data = f.read(FILE_MAX * 2)  # bounded even if something else grew it
        except FileNotFoundError:
            return []
        except OSError as exc:
            log.warning("history: cannot read %s (%s): the page's task list starts empty", self.path, exc)
            return []
        self.size = len(data)
        items = []
        buf = io.BytesIO(data)
        dec = cbor2.CBORDecoder(buf)
        while buf.tell() < len(data):
            at = buf.tell()
            try:
                items.append(dec.decode())
            except Exception as exc:  # a torn append, or a damaged file: keep what came before
                log.warning("history: %s is unreadable from byte %d of %d (%s); kept the %d tasks before it",
                            self.path, at, len(data), exc, len(items))
                self.size = at
                try:
                    os.truncate(self.path, at)  # so that the next append follows readable items
                except OSError:
                    pass
                break
        return items

    @staticmethod
    def encode(items: list) -> bytes:
        """The file's items ``[task id, events]``, back to back: one ``cbor2.dumps`` of them all as
        one array, less the array's head (the items follow it, encoded as alone): ~40 % less CPU
        than an encoder's ``encode`` per item (W2 flushes ~10,000 tasks every two seconds)."""
        n = len(items)
        data = cbor2.dumps([[tid, persistable(evs)] for tid, evs in items])
        return data[_array_head_size(n):]

    def append(self, items: list) -> None:
        """Append these histories (blocking: run it in a worker thread)."""
        data = self.encode(items)
        with self.lock:
            self._append(data)

    def _append(self, data: bytes) -> None:
        try:
            fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, FILE_MODE)
            try:
                _write_all(fd, data)
            finally:
                os.close(fd)
        except OSError as exc:
            self._failed("append to", exc)
            return
        self.size += len(data)
        self.failed = False

    def rewrite(self, items: list) -> None:
        """Replace the file by these histories, oldest first, the newest kept within FILE_MAX / 2."""
        chunks = []
        total = 0
        for tid, evs in reversed(items):
            c = cbor2.dumps([tid, persistable(evs)])
            if total + len(c) > FILE_MAX // 2:
                break
            chunks.append(c)
            total += len(c)
        chunks.reverse()
        with self.lock:
            self._rewrite(b"".join(chunks), total)

    def _rewrite(self, data: bytes, total: int) -> None:
        tmp = self.path + ".tmp"
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, FILE_MODE)
            try:
                _write_all(fd, data)
                os.fsync(fd)  # rare (once per FILE_MAX appended): the rename must not leave an empty file
            finally:
                os.close(fd)
            os.replace(tmp, self.path)
        except OSError as exc:
            self._failed("rewrite", exc)
            return
        self.size = total
        self.failed = False

    def _failed(self, what: str, exc: OSError) -> None:
        if not self.failed:
            log.warning("history: cannot %s %s (%s): the page's task list will miss these tasks after a "
                        "restart; brokerd goes on", what, self.path, exc)
        self.failed = True


def _array_head_size(n: int) -> int:
    """Bytes of the CBOR head of an array of ``n`` items (RFC 8949 3.1: the length's own bytes)."""
    if n < 24:
        return 1
    if n < 0x100:
        return 2
    if n < 0x10000:
        return 3
    if n < 0x100000000:
        return 5
    return 9


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        n = os.write(fd, view)
        view = view[n:]


def restore(state, hf: HistoryFile) -> int:
    """Read the file back into the state (at start-up, before serving); how many tasks are kept."""
    kept = state.restore_history(hf.load())
    state.history_changes()  # what was read is on disk already
    return kept


async def writer(state, hf: HistoryFile) -> None:
    """Every FLUSH_EVERY seconds, append what changed (rewrite when the file is past FILE_MAX)."""
    while True:
        await trio.sleep(FLUSH_EVERY)
        if hf.size > FILE_MAX:
            snap = state.history_snapshot()
            await trio.to_thread.run_sync(hf.rewrite, snap)
            continue
        changes = state.history_changes()  # taken on the event loop; encoded and written in the thread
        if changes:
            await trio.to_thread.run_sync(hf.append, changes)


def final_flush(state, hf: HistoryFile) -> None:
    """At a clean stop: append what changed since the last flush (blocking, once)."""
    changes = state.history_changes()
    if changes:
        hf.append(changes)
