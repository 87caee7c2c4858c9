"""Remote control (protocol.md §5.34): the commands brokerd forwards to this worker.

brokerd forwards control requests as CONTROL frames with a ``reply_id``; the main loop answers
``ping``, ``active``, ``registered``, ``stats``, ``pool_grow`` (capped at the autoscale maximum,
or the concurrency), ``pool_shrink`` and ``shutdown`` (warm) with CONTROL_REPLY.  A CONTROL
without a command (``revoke`` + ``terminate``) kills the named running tasks.
"""

from __future__ import annotations

import logging
import resource
import time

from client.worker.events import pool_size
from client.worker.outcome import S_ACK, event_repr, shown

log = logging.getLogger("brokerd.worker")

PREFIX = "ctl_"  # a method ctl_NAME answers the command NAME


def slots_arg(command, args):
    """The ``n`` of pool_grow/pool_shrink: a whole number >= 1 (default 1), or None and an error."""
    n = args.get("n", 1)
    if type(n) is not int or n < 1:
        return None, {"error": f"{command} needs n, a whole number of pool slots >= 1 (got {shown(n)})"}
    return n, None


class Control:
    """Answers control commands from the worker's public state (``w.running``, ``w.pool``, ...)."""

    def __init__(self, worker):
        self.w = worker

    def answer(self, command: str, args) -> dict | list:
        """The reply to ``command``: what its handler returns, or ``{"error": ...}``."""
        handler = getattr(self, PREFIX + command, None) if command.isidentifier() else None
        if handler is None:
            known = ", ".join(sorted(n[len(PREFIX):] for n in dir(self) if n.startswith(PREFIX)))
            return {"error": f"unknown control command {command!r}; this worker knows: {known}"}
        try:
            return handler(args if isinstance(args, dict) else {})
        except Exception as exc:  # noqa: BLE001 - a bad request must not stop the worker
            return {"error": f"{type(exc).__name__}: {exc}"}

    def terminate(self, payload) -> None:
        """``revoke`` + ``terminate``: kill the running tasks named, and store them REVOKED."""
        w = self.w
        ids = set(payload.get("revoke") or ())
        kill = getattr(w.pool, "kill_job", None)
        for job in list(w.running.values()):
            if job.task_id in ids and job.slot is not None and kill is not None:
                log.warning("Terminating task %s[%s]: revoked", job.name, job.task_id)
                w.running.pop(job.seq, None)
                kill(job)
                meta = {"exc_type": "TaskRevokedError", "exc_message": f"task {job.task_id} was revoked and terminated",
                        "hostname": w.hostname}
                w.finish(job, (S_ACK, "REVOKED", None, meta, None, None))

    def ctl_ping(self, args):
        return {"ok": "pong"}

    def ctl_active(self, args):
        w = self.w
        return [
            {"id": job.task_id, "name": job.name, "args": event_repr(tuple(job.env["args"])),
             "kwargs": event_repr(job.env["kwargs"]), "queue": job.d.queue, "time_start": job.started,
             "worker_pid": getattr(job.slot, "pid", None) or w.stats.pid, "hostname": w.hostname,
             "attempts": job.d.attempts}
            for job in sorted(w.running.values(), key=lambda j: j.seq) if job.started is not None
        ]

    def ctl_registered(self, args):
        return sorted(n for n in self.w.app.tasks if not n.startswith("brokerd."))

    def ctl_stats(self, args):
        w = self.w
        st = w.stats
        ru = resource.getrusage(resource.RUSAGE_SELF)
        pool = w.pool
        return {
            "hostname": w.hostname, "pid": st.pid, "uptime": round(time.time() - st.started_wall, 3),
            "broker": w.broker, "queues": list(w.queues), "prefetch": w.prefetch,
            "pool": {
                "implementation": w.pool_kind, "size": pool_size(w), "max-concurrency": w.concurrency,
                "processes": pool.pids() if hasattr(pool, "pids") else [],
                "autoscale": list(w.autoscale) if w.autoscale else None,
                "max-tasks-per-child": w.max_tasks_per_child,
                "max-memory-per-child": w.max_memory_per_child,
            },
            "total": dict(st.total), "processed": st.processed, "active": len(w.running),
            "reserved": len(w.backlog), "pool_resized": dict(st.resized), "replaced": dict(st.replaced),
            "task_events": w.task_events, "heartbeat_interval": w.heartbeat_interval,
            "events_dropped": w.events.dropped,
            "rusage": {"utime": ru.ru_utime, "stime": ru.ru_stime, "maxrss_kb": ru.ru_maxrss},
        }

    def ctl_pool_grow(self, args):
        # Capped: one CONTROL with n=20 used to fork 20 processes at once.  The ceiling is the autoscale
        # maximum, or the concurrency the worker was started with (-c) without autoscale: the consumer's
        # prefetch is set from it, so slots past it could never get a task anyway.
        n, err = slots_arg("pool_grow", args)
        if err:
            return err
        w = self.w
        cap = w.concurrency  # the autoscale maximum when autoscaling (see Worker.__init__)
        size = w.pool.size
        what = "the autoscale maximum" if w.autoscale else "the worker's concurrency (-c)"
        room = cap - size
        if room <= 0:
            return {"ok": f"pool unchanged at {size}: already at its maximum, {what} of {cap}", "size": size}
        size = w.pool.resize(min(n, room), "control")
        if n > room:
            return {"ok": f"pool grown to {size} (capped at {what} of {cap}; {n} more were asked for)", "size": size}
        return {"ok": f"pool grown to {size}", "size": size}

    def ctl_pool_shrink(self, args):
        n, err = slots_arg("pool_shrink", args)
        if err:
            return err
        size = self.w.pool.resize(-n, "control")
        return {"ok": f"pool shrunk to {size}", "size": size}

    def ctl_shutdown(self, args):
        return {"ok": "shutting down (warm)"}
