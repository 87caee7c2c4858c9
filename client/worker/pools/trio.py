"""The ``trio`` pool: up to ``size`` tasks at once on the worker's trio loop.

``async def`` tasks run concurrently on the loop; plain ``def`` tasks through
``trio.to_thread``.  Time limits are cancel scopes: the task sees ``trio.Cancelled`` and its
result is a ``SoftTimeLimitExceeded`` (or ``TimeLimitExceeded``) FAILURE; a ``def`` task past its
limit is abandoned in its thread.  The loop that feeds this pool is ``client.worker.trio_loop``; it sets
``nursery`` (where tasks run) and ``wake`` (how a finished task wakes it) before submitting.
"""

from __future__ import annotations

import inspect
import logging
import time

import trio

from client.exceptions import SoftTimeLimitExceeded, TimeLimitExceeded
from client.worker.outcome import S_ACK, exc_meta
from client.worker.pools.base import Job, Pool
from client.worker.runner import Runner

log = logging.getLogger("brokerd.worker")


class TrioPool(Pool):
    """Up to ``size`` tasks at once on the trio loop (``def`` tasks in trio's threads)."""

    kind = "trio"
    unit = "tasks at once"

    def __init__(self, worker):
        super().__init__(worker, worker.concurrency)
        self.runner = Runner(worker.app, worker.hostname)
        self.running = 0
        self.nursery = None
        self.wake = None

    @property
    def current(self) -> int:
        return self.size  # no slots to start or retire: a task is a trio task while it runs

    def has_idle(self) -> bool:
        return self.running < self.size

    def submit(self, job: Job):
        self.running += 1
        self.w.job_started(job)
        self.nursery.start_soon(self._run, job)

    async def _run(self, job: Job):
        w = self.w
        task = w.app.tasks[job.name]
        limit = min(x for x in (job.soft, job.hard, float("inf")) if x)
        limit = None if limit == float("inf") else limit
        t0 = time.perf_counter()
        try:
            fn = getattr(task, "run", None)
            if inspect.iscoroutinefunction(fn):
                outcome = await self.runner.execute_async(job.to_runner(True), limit, job.hard)
            else:
                with trio.move_on_after(limit if limit else float("inf")) as cs:
                    outcome = await trio.to_thread.run_sync(self.runner.execute, job.to_runner(True), abandon_on_cancel=True)
                if cs.cancelled_caught:
                    hard = job.hard and (not job.soft or job.hard <= job.soft)
                    exc = (TimeLimitExceeded if hard else SoftTimeLimitExceeded)(
                        f"task {job.name}[{job.task_id}] ran past its time limit of {limit:g}s (its thread was abandoned)"
                    )
                    log.error("Time limit (%gs) exceeded for %s[%s]", limit, job.name, job.task_id)
                    outcome = (S_ACK, "FAILURE", None, exc_meta(exc, w.hostname, tb=""), None, None)
        finally:
            self.running -= 1
        w.finish(job, outcome, time.perf_counter() - t0)
        w.flush()
        self.wake(("tick",))  # wake the main loop so that it dispatches the next job

    def on_done(self, *a):
        pass

    def close(self, cold: bool):
        pass  # its tasks ran in the loop's nursery, cancelled or done by now

    def drain(self):
        pass  # jobs not started are in the worker's backlog, handed back by the main loop
