"""The ``threads`` pool: N threads in the worker process, for I/O-bound tasks.

Outcomes come back through the host's inbox (``post``).  Time limits are injected into the
thread (``PyThreadState_SetAsyncExc``, best effort; see ``client.worker.limits``).
"""

from __future__ import annotations

import ctypes
import itertools
import logging
import queue
import threading
import time
from collections import deque

from client.exceptions import SoftTimeLimitExceeded, TimeLimitExceeded
from client.worker.pools.base import CHILD_STOP_TIMEOUT, Job, Pool
from client.worker.runner import Runner

log = logging.getLogger("brokerd.worker")


class _ThreadSlot:
    __slots__ = ("thread", "q", "job", "in_task", "lock", "abandoned", "ident", "idle_since", "index")


class ThreadPool(Pool):
    """N threads in the worker process; outcomes come back through the worker's inbox."""

    kind = "threads"
    unit = "threads"

    def __init__(self, worker, size: int):
        super().__init__(worker, size)
        self.slots: list[_ThreadSlot] = []
        self._index = itertools.count(1)
        self.runner = Runner(worker.app, worker.hostname)

    def spawn(self):
        s = _ThreadSlot()
        s.q = queue.SimpleQueue()
        s.job = None
        s.in_task = False
        s.lock = threading.Lock()
        s.abandoned = False
        s.idle_since = time.monotonic()
        s.index = next(self._index)
        s.thread = threading.Thread(target=self._run, args=(s,), name=f"ThreadPoolWorker-{s.index}", daemon=True)
        s.thread.start()
        s.ident = s.thread.ident
        self.slots.append(s)
        self.idle.append(s)
        return s

    def _run(self, s: _ThreadSlot):
        runner = self.runner
        post = self.w.post
        while True:
            try:
                job = s.q.get()
                if job is None:
                    return
                t0 = time.perf_counter()
                outcome = runner.execute(job, s)
                post(("done", s, job[0], outcome, time.perf_counter() - t0))
                if s.abandoned:
                    return
            except (SoftTimeLimitExceeded, TimeLimitExceeded):
                continue  # a late async exception that found no task; nothing to undo

    @property
    def current(self) -> int:
        return len(self.slots)

    def dispatch(self, backlog: deque, running: dict, now: float) -> None:
        while backlog and self.idle:
            job = backlog.popleft()
            s = self.idle.pop()
            s.job = job
            job.slot = s
            running[job.seq] = job
            if job.hard:
                job.deadline = now + job.hard
            if job.soft:
                job.soft_deadline = now + job.soft
            self.w.job_started(job)
            s.q.put(job.to_runner(True))

    def drain(self):
        pass  # a thread holds one job at a time: nothing waits behind it

    def on_done(self, s: _ThreadSlot, seq, outcome, runtime=None):
        job = s.job
        if s.abandoned:
            return  # its job was settled already (hard time limit)
        s.job = None
        if job is not None and job.seq == seq:
            self.w.finish(job, outcome, runtime)
        s.idle_since = time.monotonic()
        if s in self.slots:
            if len(self.slots) > self.size:  # the pool was shrunk while it worked
                self.slots.remove(s)
                s.q.put(None)
            else:
                self.idle.append(s)

    def _inject(self, s: _ThreadSlot, job: Job, exc_type) -> bool:
        with s.lock:
            if not s.in_task or s.job is not job:
                return False
            n = ctypes.pythonapi.PyThreadState_SetAsyncExc(ctypes.c_ulong(s.ident), ctypes.py_object(exc_type))
            return n == 1

    def soft_limit(self, job: Job):
        self._inject(job.slot, job, SoftTimeLimitExceeded)

    def kill_job(self, job: Job):
        s = job.slot
        self._inject(s, job, TimeLimitExceeded)
        s.abandoned = True
        s.job = None
        self.slots.remove(s)
        s.q.put(None)
        log.error("Thread %s left running its task %s[%s] past the hard time limit; replaced", s.thread.name, job.name, job.task_id)

    def retire(self, s: _ThreadSlot) -> None:
        """An idle thread leaves the pool: it exits once it reads the None."""
        self.idle.remove(s)
        self.slots.remove(s)
        s.q.put(None)

    def on_ready(self, fd):
        pass

    def close(self, cold: bool):
        for s in self.slots:
            s.q.put(None)
        if not cold:
            for s in self.slots:
                s.thread.join(CHILD_STOP_TIMEOUT)


