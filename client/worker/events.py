"""Task and worker events (protocol.md §5.29): what they say, and how they are batched.

The worker reports ``worker-online`` when it connects, ``worker-heartbeat`` every
``heartbeat_interval`` seconds (pool size, active, processed, load average, pool changes and
replacements), ``worker-pool-resized`` and ``worker-process-replaced`` as they happen, and
``worker-offline`` when it stops; and, unless task events are off (``--no-task-events``), each
task's ``task-received``, ``task-started``, ``task-succeeded`` / ``task-failed`` /
``task-retried`` / ``task-revoked`` / ``task-rejected``.  Events cost no round trip: they are
gathered for up to ``EVENT_FLUSH_DELAY`` and leave in one EMIT_EVENTS frame, in the same write as
the results, and nobody waits for its reply.  Measured cost on no-op tasks: bench/tasks.py
``--events-cost``.
"""

from __future__ import annotations

import os
import time
from importlib import metadata

from client.worker.outcome import S_ACK, S_REQUEUE, S_RETRY, args_shown, event_repr, exception_text

HEARTBEAT_INTERVAL = 2.0  # seconds between worker-heartbeat events (Celery's default); lost after 3 missed
DEFAULT_TASK_EVENTS = True  # task-* events unless -E is turned off (--no-task-events); worker-* events always
MAX_PENDING_EVENTS = 10_000  # events kept while brokerd is unreachable; the oldest half goes past this
# Task events wait up to EVENT_FLUSH_DELAY (or until EVENT_FLUSH_MAX are pending) to share one EMIT_EVENTS
# frame: flushing every loop turn costs brokerd a frame and a reply per task (~25 % of end-to-end no-op
# throughput on 2 cores, bench/tasks.py --events-cost); 50 ms late is nothing to a person watching.
# Worker events (online, heartbeat, offline, pool changes) go with the next flush, at once.
EVENT_FLUSH_DELAY = 0.05
EVENT_FLUSH_MAX = 1000
EVENT_TRACEBACK_MAX = 4000  # characters of a traceback in a task-failed event (brokerd keeps at most 4096)


class EventBuffer:
    """Events not sent yet, and when they must leave (monotonic seconds)."""

    def __init__(self):
        self.pending: list = []
        self.due = 0.0
        self.dropped = 0  # dropped while brokerd was unreachable too long (reported in heartbeats)

    def emit(self, ev: dict) -> None:
        """Queue one event; it leaves within EVENT_FLUSH_DELAY, in one EMIT_EVENTS frame with the others."""
        evs = self.pending
        if not evs:
            self.due = time.monotonic() + EVENT_FLUSH_DELAY
        elif len(evs) >= MAX_PENDING_EVENTS:  # brokerd unreachable for long: keep the newest half
            n = len(evs) // 2
            del evs[:n]
            self.dropped += n
        evs.append(ev)

    def emit_now(self, kind: str, **fields) -> None:
        """A worker event: it goes with the next flush, with the task events waiting."""
        fields["type"] = kind
        fields["ts"] = time.time()
        self.emit(fields)
        self.due = 0.0

    def take(self, force: bool = False) -> list | None:
        """The events to send now (all of them, once due, or full, or ``force``), else None."""
        evs = self.pending
        if evs and (force or len(evs) >= EVENT_FLUSH_MAX or time.monotonic() >= self.due):
            self.pending = []
            return evs
        return None

    def wait(self, now: float, timeout):
        """The loop's sleep, shortened so that pending events leave when due."""
        if not self.pending:
            return timeout
        left = max(0.0, self.due - now)
        return left if timeout is None or left < timeout else timeout


def task_received(env, d) -> dict:
    hdrs = d.headers
    retries = hdrs.get("retries") if hdrs else None
    if type(retries) is not int:
        retries = env.get("retries") or 0
    ev = {"type": "task-received", "uuid": env["id"], "ts": time.time(), "name": env["task"],
          "queue": d.queue, "retries": retries}
    ev["args"], ev["kwargs"] = args_shown(env["args"], env["kwargs"], env.get("options"))
    parent = env.get("parent_id")
    if parent:
        ev["parent_id"] = parent
        ev["root_id"] = env.get("root_id")
    eta = env.get("eta")
    if eta is not None:
        ev["eta"] = eta
    return ev


def task_handed_back(task_id, reason: str) -> dict:
    return {"type": "task-rejected", "uuid": task_id, "ts": time.time(), "requeue": True,
            "reason": f"handed back unstarted ({reason})"}


def task_outcome(task_id, outcome, runtime) -> dict:
    """The event that tells how a task ended (succeeded, failed, retried, revoked, rejected)."""
    settle, state, value, meta = outcome[0], outcome[1], outcome[2], outcome[3]
    ev = {"type": None, "uuid": task_id, "ts": time.time()}
    if settle == S_RETRY:
        ev["type"] = "task-retried"
        ev["exception"] = exception_text(meta)
        ev["delay"] = outcome[4]
    elif state == "FAILURE":
        ev["type"] = "task-failed"
        ev["exception"] = exception_text(meta)
        ev["runtime"] = runtime
        tb = meta.get("traceback") if isinstance(meta, dict) else None
        if tb:
            ev["traceback"] = tb if len(tb) <= EVENT_TRACEBACK_MAX else "..." + tb[-EVENT_TRACEBACK_MAX + 3:]
    elif state == "REVOKED":
        ev["type"] = "task-revoked"
        ev["reason"] = (meta or {}).get("reason") or "terminated"
        ev["terminated"] = ev["reason"] == "terminated" or "terminated" in str((meta or {}).get("exc_message", ""))
    elif settle == S_ACK:
        ev["type"] = "task-succeeded"
        ev["runtime"] = runtime
        if state is not None:
            ev["result"] = event_repr(value)
    else:
        ev["type"] = "task-rejected"
        ev["requeue"] = settle == S_REQUEUE
    return ev


class Stats:
    """The figures heartbeats and the ``stats`` control command report."""

    def __init__(self):
        self.processed = 0
        self.total: dict[str, int] = {}  # tasks run, by name
        self.started_wall = time.time()
        self.pid = os.getpid()
        self.resized = {"grown": 0, "shrunk": 0}
        self.replaced = {"max-tasks-per-child": 0, "max-memory-per-child": 0}

    def ran(self, name) -> None:
        self.processed += 1
        total = self.total
        total[name] = total.get(name, 0) + 1


def pool_size(w) -> int:
    return w.pool.size if w.pool is not None else w.concurrency


def online_info(w) -> dict:
    """The fields of ``worker-online`` for worker ``w``."""
    try:
        version = metadata.version("brokerd")
    except Exception:  # not installed as a distribution (a source checkout)
        version = None
    return {
        "freq": w.heartbeat_interval, "pid": w.stats.pid, "pool": w.pool_kind, "pool_size": pool_size(w),
        "concurrency": w.concurrency, "prefetch": w.prefetch, "queues": list(w.queues),
        "autoscale": list(w.autoscale) if w.autoscale else None,
        "max_tasks_per_child": w.max_tasks_per_child, "max_memory_per_child": w.max_memory_per_child,
        "task_events": w.task_events, "sw_ident": "brokerd-worker", "sw_ver": version,
        "active": len(w.running), "processed": w.stats.processed,
    }


def heartbeat_info(w) -> dict:
    """The fields of ``worker-heartbeat`` for worker ``w``."""
    try:
        load = [round(x, 2) for x in os.getloadavg()]
    except OSError:
        load = None
    st = w.stats
    return dict(
        freq=w.heartbeat_interval, active=len(w.running), reserved=len(w.backlog), processed=st.processed,
        pool_size=pool_size(w), loadavg=load, pool_grown=st.resized["grown"], pool_shrunk=st.resized["shrunk"],
        replaced_max_tasks=st.replaced["max-tasks-per-child"],
        replaced_max_memory=st.replaced["max-memory-per-child"], events_dropped=w.events.dropped,
    )
