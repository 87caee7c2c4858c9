"""Time limits: which limits a task runs under, and firing them when they are due.

Soft: ``SoftTimeLimitExceeded`` raised inside the task (a SIGALRM ``setitimer`` in a child
process; ``PyThreadState_SetAsyncExc`` on the threads pool, best effort: it fires at the next
Python bytecode, not inside a blocking C call such as ``time.sleep`` or a socket read; on the trio
pool a cancel scope, so the task sees ``trio.Cancelled`` and the result is a
``SoftTimeLimitExceeded`` FAILURE).  Hard: processes pool: the parent kills the child (SIGKILL),
starts another, stores FAILURE ``TimeLimitExceeded`` and acks (never redelivered forever); the
task's ``on_failure`` is not called (the process that ran it is gone).  Threads pool: a thread
cannot be killed; the task is marked FAILURE ``TimeLimitExceeded`` and acked,
``TimeLimitExceeded`` is injected into its thread (same limits as soft), the slot is replaced by a
new thread and whatever the old thread returns later is dropped.  Trio pool: a cancel scope, as
for the soft limit.
"""

from __future__ import annotations

import logging

from client.exceptions import TimeLimitExceeded
from client.worker.outcome import S_ACK, exc_meta

log = logging.getLogger("brokerd.worker")

# Envelope validation (protocol.md §8.1): a field of the wrong type or range fails that task (DecodeError)
# instead of raising in the worker's main loop.
TIME_LIMIT_MAX = 366 * 86400.0  # seconds; a time limit above a year is a mistake (and overflows setitimer far above)


class TaskLimits:
    """``(acks_late, soft, hard)`` per task: per-call options first, then the task, the worker, the app.

    Cached per task name (the main loop asks once per delivery); a call with options is not cached.
    """

    def __init__(self, app, soft_time_limit=None, time_limit=None):
        self.app = app
        self.soft_time_limit = soft_time_limit
        self.time_limit = time_limit
        self.cache: dict = {}

    def of(self, task, env):
        opts = env.get("options")
        key = task.name
        cached = self.cache.get(key) if not opts else None
        if cached is None:
            conf = self.app.conf
            acks_late = task.acks_late
            if acks_late is None:
                acks_late = conf.get("task_acks_late", True)
            soft = task.soft_time_limit or self.soft_time_limit or conf.get("task_soft_time_limit")
            hard = task.time_limit or self.time_limit or conf.get("task_time_limit")
            if opts:
                soft = opts.get("soft_time_limit") or soft
                hard = opts.get("time_limit") or hard
                return acks_late, soft, hard
            cached = self.cache[key] = (acks_late, soft, hard)
        return cached


def check_deadlines(running: dict, now: float, pool, hostname: str, finish):
    """Fire the time limits of ``running`` jobs that are due; return the next deadline (or None).

    A soft limit asks the pool to interrupt the task; a hard one has the pool kill it and
    ``finish(job, outcome)`` it as a FAILURE ``TimeLimitExceeded``.
    """
    nxt = None
    for job in list(running.values()):
        if job.soft_deadline is not None and not job.soft_sent:
            if job.soft_deadline <= now:
                job.soft_sent = True
                log.warning("Soft time limit (%gs) exceeded for %s[%s]", job.soft, job.name, job.task_id)
                pool.soft_limit(job)
            elif nxt is None or job.soft_deadline < nxt:
                nxt = job.soft_deadline
        if job.deadline is not None:
            if job.deadline <= now:
                log.error("Hard time limit (%gs) exceeded for %s[%s]", job.hard, job.name, job.task_id)
                running.pop(job.seq, None)
                pool.kill_job(job)
                exc = TimeLimitExceeded(f"task {job.name}[{job.task_id}] ran past its hard time limit of {job.hard:g}s")
                meta = exc_meta(exc, hostname, tb="")
                finish(job, (S_ACK, "FAILURE", None, meta, None, None))
            elif nxt is None or job.deadline < nxt:
                nxt = job.deadline
    return nxt
