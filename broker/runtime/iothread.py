"""One thread for the log writer's blocking calls (write, fsync), handed work more cheaply than
``trio.to_thread.run_sync``.

Under ``--fsync always`` every group commit is an fsync in a thread, and the hand-off is per
commit: ~500 of them per 50,000 W1 messages, more in W2, where each result waits for one.
``trio.to_thread.run_sync`` costs ~100 us of CPU a call on this machine (a capacity limiter taken
and given back, a context copied, the thread cache's hand-off, the report back); this thread
costs ~50 us (a ``SimpleQueue`` put, the call, ``run_sync_soon`` back to the loop): ``python
bench/iothread.py`` measures both.

Semantics are ``to_thread.run_sync``'s default: the call cannot be cancelled once handed over (a
cancel waits for it to finish; the write or fsync is never abandoned half-way through the log's
promise), its return value or exception comes back to the caller, and calls run one at a time in
the order made.  The thread is started on first use and leaves after ``IDLE_SECONDS`` without
work (started again when needed), so a Durability that is never closed leaks no thread.
"""

from __future__ import annotations

import queue
import threading

import outcome
import trio

IDLE_SECONDS = 10.0


class IoThread:
    def __init__(self, name: str = "brokerd-log-io", idle: float = IDLE_SECONDS):
        self._name = name
        self._idle = idle
        self._q: queue.SimpleQueue = queue.SimpleQueue()
        self._lock = threading.Lock()  # the thread's start and its decision to leave
        self._thread: threading.Thread | None = None

    async def run(self, fn, *args):
        """``fn(*args)`` in the thread; its value, or its exception raised here."""
        task = trio.lowlevel.current_task()
        token = trio.lowlevel.current_trio_token()
        with self._lock:
            self._q.put((fn, args, task, token))
            if self._thread is None:
                self._thread = threading.Thread(target=self._work, name=self._name, daemon=True)
                self._thread.start()
        return await trio.lowlevel.wait_task_rescheduled(_cannot_abort)

    def _work(self) -> None:
        q = self._q
        reschedule = trio.lowlevel.reschedule
        while True:
            try:
                fn, args, task, token = q.get(timeout=self._idle)
            except queue.Empty:
                with self._lock:
                    if q.empty():  # (a put after this sees no thread and starts one)
                        self._thread = None
                        return
                continue
            result = outcome.capture(fn, *args)
            try:
                token.run_sync_soon(reschedule, task, result)
            except trio.RunFinishedError:
                pass  # the loop that asked is gone: nobody waits for the answer
            del fn, args, task, token, result  # hold nothing of the caller's while idle


def _cannot_abort(_raise_cancel):
    return trio.lowlevel.Abort.FAILED
