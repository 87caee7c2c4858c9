"""Remote control (protocol.md §5.34): the commands brokerd forwards to this worker.

brokerd forwards control requests as CONTROL frames with a ``reply_id``; the main loop answers
``ping``, ``active``, ``registered``, ``stats``, ``pool_grow`` (capped at the autoscale maximum,
or the concurrency), ``pool_shrink`` and ``shutdown`` (warm) with CONTROL_REPLY.  A CONTROL
without a command (``revoke`` + ``terminate``) kills the named running tasks.
"""

from __future__ import annotations

import logging
import platform
import re
import resource
import signal
import time
from collections import deque

from client import signals
from client.options import redact
from client.worker.events import heartbeat_info, pool_size
from client.worker.limits import TIME_LIMIT_MAX
from client.worker.outcome import S_ACK, args_shown, event_repr, shown
from client.worker.runner import request_for

log = logging.getLogger("brokerd.worker")

PREFIX = "ctl_"  # a method ctl_NAME answers the command NAME
REVOKED_KEEP = 1000  # ids inspect().revoked() shows per worker: the most recent, so memory stays bounded
QUERY_IDS_MAX = 1000  # task ids one query_task may ask about (a reply is one frame)
QUEUE_NAME_MAX = 255  # brokerd's limit on a queue name
CONF_REPR_MAX = 200  # characters of a setting's repr in a conf reply, when it is not a plain value
# Celery's worker_state.revoked_stamps: stamp name -> the values revoked, for every worker of this process
# (revoke_by_stamped_headers).  Kept until the process ends, as Celery does; bounded, because anyone with
# the control grant may add to it.
revoked_stamps: dict = {}
REVOKED_STAMPS_MAX = 10_000  # stamp values kept in all; past it a new one is refused, named


def stamps_revoked(stamps: dict):
    """The (name, value) of the first of a task's stamps that was revoked, else None."""
    for name, values in revoked_stamps.items():
        if name not in stamps:
            continue
        value = stamps[name]
        for v in value if isinstance(value, list) else [value]:
            if any(v == r for r in values):
                return name, v
    return None


def _stamps_of(env) -> dict:
    stamps = (env.get("headers") or {}).get("stamps") if isinstance(env, dict) else None
    return stamps if isinstance(stamps, dict) else {}


# Settings whose values inspect().conf() never shows: keys, tokens, passwords
SECRET_WORDS = re.compile(r"key|secret|password|token|credential", re.IGNORECASE)


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
        self.revoked: deque = deque(maxlen=REVOKED_KEEP)  # ids this worker discarded as revoked, oldest first

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
                self.revoked.append(job.task_id)
                w.running.pop(job.seq, None)
                kill(job)
                meta = {"exc_type": "TaskRevokedError", "exc_message": f"task {job.task_id} was revoked and terminated",
                        "hostname": w.hostname}
                if signals.task_revoked.receivers:
                    task = w.app.tasks.get(job.name)
                    req = request_for(job.env, task, job.d.queue, job.d.priority, job.d.attempts,
                                      job.env.get("retries") or 0, w.hostname)
                    signals.task_revoked.send(sender=task, request=req, terminated=True, signum=signal.SIGKILL,
                                              expired=False)
                w.finish(job, (S_ACK, "REVOKED", None, meta, None, None))

    def ctl_ping(self, args):
        return {"ok": "pong"}

    def ctl_active(self, args):
        w = self.w
        return [
            self._job_info(job) for job in sorted(w.running.values(), key=lambda j: j.seq) if job.started is not None
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

    # -- inspect: reserved, scheduled, revoked, active_queues, query_task, conf, report --
    def _job_info(self, job):
        w = self.w
        args, kwargs = args_shown(job.env["args"], job.env["kwargs"], job.env.get("options"))
        return {"id": job.task_id, "name": job.name, "args": args, "kwargs": kwargs, "queue": job.d.queue,
                "time_start": job.started,
                "worker_pid": getattr(job.slot, "pid", None) or w.stats.pid, "hostname": w.hostname,
                "attempts": job.d.attempts}

    def _reserved_jobs(self):
        w = self.w
        waiting = [j for j in sorted(w.running.values(), key=lambda j: j.seq) if j.started is None]
        return waiting + list(w.backlog)

    def ctl_reserved(self, args):
        return [self._job_info(j) for j in self._reserved_jobs()]

    def ctl_scheduled(self, args):
        return []  # brokerd holds tasks with an eta until they are due: a worker never holds one

    def ctl_revoked(self, args):
        return list(reversed(self.revoked))

    def ctl_active_queues(self, args):
        return [{"name": q, "routing_key": q, "exchange": {"name": "", "type": "direct"}, "durable": True,
                 "exclusive": False, "auto_delete": False, "no_ack": False} for q in self.w.queues]

    def ctl_query_task(self, args):
        ids = args.get("ids")
        if type(ids) is not list or not all(type(i) is str for i in ids) or len(ids) > QUERY_IDS_MAX:
            return {"error": f"query_task needs ids, a list of up to {QUERY_IDS_MAX} task ids (got {shown(ids)})"}
        want = set(ids)
        out = {}
        for job in sorted(self.w.running.values(), key=lambda j: j.seq):
            if job.task_id in want and job.started is not None:
                out[job.task_id] = ["active", self._job_info(job)]
        for job in self._reserved_jobs():
            if job.task_id in want:
                out[job.task_id] = ["reserved", self._job_info(job)]
        return out

    def ctl_conf(self, args):
        out = {}
        conf = self.w.app.conf
        table = conf.table() if hasattr(conf, "table") else dict(conf)  # defaults and lazy sources too
        for key, value in sorted(table.items()):
            if not isinstance(key, str):
                continue
            if SECRET_WORDS.search(key):
                value = "***" if value else value
            elif key == "broker_url" and isinstance(value, str):
                value = redact(value)
            elif not isinstance(value, (str, int, float, bool, type(None))):
                value = event_repr(value, CONF_REPR_MAX)
            out[key] = value
        return out

    def ctl_report(self, args):
        w = self.w
        lines = [f"brokerd worker {w.hostname} (pid {w.stats.pid})",
                 f"python {platform.python_version()} ({platform.python_implementation()}) on {platform.platform()}",
                 f"broker {redact(str(w.broker))}", f"app {w.app.main}", f"pool {w.pool_kind} x {w.concurrency}",
                 f"queues {', '.join(w.queues)}", f"tasks {len(w.app.tasks)} registered"]
        return {"ok": "\n".join(lines)}

    def ctl_revoke_by_stamped_headers(self, args):
        """Celery's: never run a task carrying one of these stamp values (``{name: [values]}``); with
        ``terminate``, kill the running ones that carry them."""
        headers = args.get("headers")
        if not isinstance(headers, dict) or not headers or not all(isinstance(k, str) for k in headers):
            return {"error": "revoke_by_stamped_headers needs headers, a map of stamp name to a value or a list "
                             f"of values (got {shown(headers)})"}
        wanted = {k: (list(v) if isinstance(v, list) else [v]) for k, v in headers.items()}
        if sum(len(v) for v in revoked_stamps.values()) + sum(len(v) for v in wanted.values()) > REVOKED_STAMPS_MAX:
            return {"error": f"revoke_by_stamped_headers: this worker keeps at most {REVOKED_STAMPS_MAX} revoked "
                             "stamp values (until it restarts)"}
        for name, values in wanted.items():
            kept = revoked_stamps.setdefault(name, [])
            kept.extend(v for v in values if not any(v == k for k in kept))
        terminate = args.get("terminate") is True
        killed = []
        if terminate:
            ids = [job.task_id for job in list(self.w.running.values()) if stamps_revoked(_stamps_of(job.env))]
            if ids:
                self.terminate({"revoke": ids})
                killed = ids
        log.info("stamped headers %s revoked by control%s", headers, f", {len(killed)} terminated" if killed else "")
        if terminate:
            return {"ok": f"headers {headers!r} flagged as revoked, {len(killed)} running task(s) terminated"}
        return {"ok": f"headers {headers!r} flagged as revoked, but not terminated"}

    # -- control: time_limit, add_consumer, cancel_consumer, enable/disable_events, heartbeat --
    def ctl_time_limit(self, args):
        name = args.get("task_name")
        task = self.w.app.tasks.get(name) if isinstance(name, str) else None
        if task is None:
            return {"error": f"time_limit: no task named {shown(name)} is registered on {self.w.hostname}"}
        limits = {}
        for key in ("soft", "hard"):
            value = args.get(key)
            if value is not None and (type(value) not in (int, float) or not 0 <= value <= TIME_LIMIT_MAX):
                return {"error": f"time_limit: {key} must be a number of seconds from 0 to {TIME_LIMIT_MAX:g}, "
                                 f"or null for none (got {shown(value)})"}
            limits[key] = value or None
        task.soft_time_limit = limits["soft"]
        task.time_limit = limits["hard"]
        self.w.limits.cache.pop(name, None)
        log.info("time limits of %s set by control: soft %s, hard %s", name, limits["soft"], limits["hard"])
        return {"ok": "time limits set successfully"}

    def _queue_arg(self, command, args):
        q = args.get("queue")
        if type(q) is not str or not 0 < len(q) <= QUEUE_NAME_MAX:
            return None, {"error": f"{command} needs queue, a queue name of 1 to {QUEUE_NAME_MAX} characters "
                                   f"(got {shown(q)})"}
        return q, None

    def ctl_add_consumer(self, args):
        q, err = self._queue_arg("add_consumer", args)
        if err:
            return err
        w = self.w
        if q in w.queues:
            return {"ok": f"already consuming from {q!r}"}
        why = w.consume_queues(w.queues + [q])
        return {"error": f"add_consumer {q!r}: {why}"} if why else {"ok": f"add consumer {q!r}"}

    def ctl_cancel_consumer(self, args):
        q, err = self._queue_arg("cancel_consumer", args)
        if err:
            return err
        w = self.w
        if q not in w.queues:
            return {"error": f"cancel_consumer: this worker does not consume {q!r} (it consumes {', '.join(w.queues)})"}
        if len(w.queues) == 1:
            return {"error": f"cancel_consumer: {q!r} is the only queue this worker consumes; stop the worker "
                             "instead (shutdown)"}
        why = w.consume_queues([x for x in w.queues if x != q])
        return {"error": f"cancel_consumer {q!r}: {why}"} if why else {"ok": f"no longer consuming from {q!r}"}

    def ctl_enable_events(self, args):
        self.w.task_events = True
        return {"ok": "task events enabled"}

    def ctl_disable_events(self, args):
        self.w.task_events = False
        return {"ok": "task events disabled"}

    def ctl_heartbeat(self, args):
        w = self.w
        w.events.emit_now("worker-heartbeat", **heartbeat_info(w))
        return {"ok": "heartbeat sent"}
