"""What every pool shares: the job record, and one implementation of sizing and autoscale."""

from __future__ import annotations

import logging
import os

log = logging.getLogger("brokerd.worker")

CHILD_STOP_TIMEOUT = 5.0  # seconds a pool process or thread may take to exit once told to, then it is left (or killed)


def close_fds(fds) -> None:
    """Close each fd that is not None, ignoring one already closed (in a fresh child: the parent's)."""
    for fd in fds:
        if fd is not None:
            try:
                os.close(fd)
            except OSError:
                pass


class Job:
    """A delivery the main loop is looking after, from receipt to settlement."""

    __slots__ = ("seq", "d", "gen", "task_id", "name", "env", "soft", "hard", "deadline", "soft_deadline",
                 "slot", "soft_sent", "started")

    def __init__(self, seq, d, gen, task_id, name, env, soft, hard):
        self.seq = seq
        self.d = d
        self.gen = gen
        self.task_id = task_id
        self.name = name
        self.env = env
        self.soft = soft
        self.hard = hard
        self.deadline = None  # monotonic time of the hard limit, once started
        self.soft_deadline = None  # ... and of the soft one, where the parent enforces it (threads)
        self.slot = None
        self.soft_sent = False
        self.started = None  # wall time it started

    def to_runner(self, with_env: bool):
        """The tuple ``Runner.execute`` takes (with the decoded envelope, or the body to decode)."""
        d = self.d
        return (self.seq, self.env if with_env else d.body, d.id, d.queue, d.priority, d.attempts, d.headers, self.soft)


class Pool:
    """Sizing shared by the pools: ``size`` is the target, ``current`` the slots alive, ``idle``
    the slots waiting for a job (each with an ``idle_since``, monotonic).

    A subclass sets ``unit`` (its slots, in log lines) and provides ``current``, ``spawn()``
    and ``retire(slot)`` (take an idle slot out of the pool for good).

    The host (``self.w``, the worker) provides: ``app``, ``hostname``, ``autoscale``,
    ``stopping``, ``post(item)``, ``poller``, ``job_started(job)``, ``finish(job, outcome,
    runtime)``, ``hand_back_job(job, reason)``, ``lost_job(job, why)``, ``pool_resized(old, new,
    reason)``, ``process_replaced(pid, reason, rss_kb, tasks)``, ``forget_parent_fds()``,
    ``batchable(job)`` (may a process queue jobs behind it) and ``flush()``.
    """

    kind = ""
    unit = "slots"

    def __init__(self, worker, size: int):
        self.w = worker
        self.size = size
        self.idle: list = []

    @property
    def current(self) -> int:
        raise NotImplementedError

    def spawn(self):
        raise NotImplementedError

    def retire(self, slot) -> None:
        raise NotImplementedError

    def start(self):
        for _ in range(self.size):
            self.spawn()

    def maintain(self):
        """Start slots up to the pool size (after deaths, retirements, time-limit kills).

        Called between poll() batches, never inside one, so a new child's socket cannot reuse
        the number of an fd that still has a stale event in the batch being handled.
        """
        while self.current < self.size and not self.w.stopping:
            self.spawn()

    def grow(self):
        """Autoscale: one slot more (the main loop calls it while jobs wait and every slot is busy)."""
        self.size += 1
        log.info("autoscale: pool growing to %d %s", self.size, self.unit)
        self.w.pool_resized(self.size - 1, self.size, "autoscale")

    def resize(self, delta: int, reason: str) -> int:
        """Grow or shrink by ``delta`` slots (at least one stays); busy slots leave after their task."""
        old = self.size
        self.size = max(1, old + delta)
        while self.current > self.size and self.idle:
            self.retire(self.idle[-1])
        if self.size != old:
            log.info("pool %s to %d %s (%s)", "grown" if self.size > old else "shrunk", self.size, self.unit, reason)
            self.w.pool_resized(old, self.size, reason)
        return self.size

    def shrink_idle(self, now, minimum, idle_for) -> float | None:
        """Retire one slot idle for ``idle_for`` s when above ``minimum``; return when to look again."""
        if self.size <= minimum or not self.idle:
            return None
        oldest = min(self.idle, key=lambda s: s.idle_since)
        due = oldest.idle_since + idle_for
        if due <= now:
            self.size -= 1
            self.retire(oldest)
            log.info("autoscale: pool shrunk to %d %s", self.size, self.unit)
            self.w.pool_resized(self.size + 1, self.size, "autoscale")
            return now + idle_for
        return due
