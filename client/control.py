"""``app.control`` and ``app.control.inspect()``: act on tasks and ask the workers, through brokerd.

Commands to workers travel as CONTROL_REQUEST (protocol.md §5.34): brokerd passes each to the online
workers (or those in ``destination``) and gathers their replies for ``timeout`` seconds.  The commands
and their replies are listed there.  What needs no worker (revoke, purge) goes straight to brokerd.
"""

from __future__ import annotations

import logging

from client.errors import NotFound

log = logging.getLogger("brokerd.client")

class Control:
    """``app.control``: act on tasks and workers through brokerd."""

    def __init__(self, app):
        self.app = app

    def revoke(self, task_id, terminate: bool = False, signal=None, ttl=None, **_) -> int:
        """Never run the task(s); with ``terminate``, workers kill them if running.
        Revokes are kept by brokerd (logged), across restarts, for ``ttl`` (a day)."""
        ids = [task_id] if isinstance(task_id, str) else list(task_id)
        return self.app.client.revoke(ids, terminate=terminate, ttl=ttl)

    def terminate(self, task_id, signal="SIGTERM", **_) -> int:
        """Revoke and kill the task(s) where they run (the worker kills the pool process: the signal
        cannot be chosen)."""
        return self.revoke(task_id, terminate=True, signal=signal)

    def purge(self) -> int:
        """Drop every waiting message of the app's queues (the default queue, those named in
        ``task_queues`` and in a dict ``task_routes``); returns how many were dropped."""
        n = 0
        for q in sorted(app_queues(self.app)):
            try:
                n += self.app.client.purge(q)
            except NotFound:  # never declared nor published to: nothing waits there
                pass
        return n

    discard_all = purge

    # -- remote control of workers, through brokerd (protocol.md §5.34) --
    def broadcast(self, command: str, arguments: dict | None = None, destination=None, reply: bool = False,
                  timeout: float = 1.0, **_):
        """Send ``command`` to the live workers (or those named in ``destination``).

        brokerd gathers the replies until every worker answered or ``timeout`` seconds
        passed; with ``reply=True`` they are returned as Celery does, a list of
        ``{hostname: reply}``, else None.  A worker that refuses the command answers
        ``{"error": ...}``; without ``reply`` that is logged as a warning, never dropped.
        """
        replies = self.app.client.control(command, arguments, timeout=timeout, destination=destination)
        if not reply:
            for host, r in sorted(replies.items()):
                if isinstance(r, dict) and "error" in r:
                    log.warning("worker %s refused %s: %s", host, command, r["error"])
        return [{h: r} for h, r in sorted(replies.items())] if reply else None

    def ping(self, destination=None, timeout: float = 1.0, **_) -> list:
        """``[{hostname: {"ok": "pong"}}, ...]`` for every worker that answered in time."""
        return self.broadcast("ping", destination=destination, reply=True, timeout=timeout)

    def inspect(self, destination=None, timeout: float = 1.0, **_) -> "Inspect":
        return Inspect(self.app, destination, timeout)

    def pool_grow(self, n: int = 1, destination=None, reply: bool = False, timeout: float = 1.0, **_):
        """Add ``n`` slots (processes or threads) to each worker's pool."""
        return self.broadcast("pool_grow", {"n": int(n)}, destination, reply, timeout)

    def pool_shrink(self, n: int = 1, destination=None, reply: bool = False, timeout: float = 1.0, **_):
        """Remove ``n`` slots from each worker's pool (busy ones after their task)."""
        return self.broadcast("pool_shrink", {"n": int(n)}, destination, reply, timeout)

    def shutdown(self, destination=None, reply: bool = False, timeout: float = 1.0, **_):
        """Warm stop of the workers: they finish their running tasks and exit."""
        return self.broadcast("shutdown", None, destination, reply, timeout)

    def revoke_by_stamped_headers(self, headers: dict, terminate: bool = False, signal=None, destination=None,
                                  reply: bool = False, timeout: float = 1.0, **_):
        """Never run a task that carries one of these stamp values (``{name: value or [values]}``, from
        ``sig.stamp(...)``); with ``terminate``, workers kill the running ones.  Kept by each live worker
        until it restarts (brokerd does not read stamps, so a worker started later does not know them)."""
        if not isinstance(headers, dict) or not headers:
            raise TypeError(f"revoke_by_stamped_headers needs a map of stamp name to value(s), not {headers!r:.100}")
        return self.broadcast("revoke_by_stamped_headers", {"headers": headers, "terminate": bool(terminate)},
                              destination, reply, timeout)

    def time_limit(self, task_name: str, soft=None, hard=None, destination=None, reply: bool = False,
                   timeout: float = 1.0, **_):
        """Set a task's soft and hard time limits (seconds; None: none) in each worker, for the tasks it
        receives from now on (until it restarts)."""
        return self.broadcast("time_limit", {"task_name": task_name, "soft": soft, "hard": hard},
                              destination, reply, timeout)

    def add_consumer(self, queue: str, exchange=None, exchange_type=None, routing_key=None, options=None,
                     destination=None, reply: bool = False, timeout: float = 1.0, **_):
        """Make each worker also consume ``queue`` (exchange and routing key are Celery's; a queue
        name is all brokerd routes by)."""
        return self.broadcast("add_consumer", {"queue": queue}, destination, reply, timeout)

    def cancel_consumer(self, queue: str, destination=None, reply: bool = False, timeout: float = 1.0, **_):
        """Make each worker stop consuming ``queue``."""
        return self.broadcast("cancel_consumer", {"queue": queue}, destination, reply, timeout)

    def enable_events(self, destination=None, reply: bool = False, timeout: float = 1.0, **_):
        """Workers send task-* events (worker events are always sent)."""
        return self.broadcast("enable_events", None, destination, reply, timeout)

    def disable_events(self, destination=None, reply: bool = False, timeout: float = 1.0, **_):
        return self.broadcast("disable_events", None, destination, reply, timeout)

    def heartbeat(self, destination=None, reply: bool = False, timeout: float = 1.0, **_):
        """Each worker sends a worker-heartbeat event now."""
        return self.broadcast("heartbeat", None, destination, reply, timeout)

    def rate_limit(self, task_name: str, rate_limit, destination=None, reply: bool = False, timeout: float = 1.0, **_):
        """Celery's call: deliver ``task_name`` at most at ``rate_limit`` ("5/s", "100/m"; 0 or None
        lifts it) from now on, across every worker: brokerd paces the deliveries, and keeps the
        rate across restarts.  ``destination`` is accepted for Celery's signature; the limit is global."""
        out = self.app.client.rate_limit(task_name, rate_limit)
        return [{"brokerd": {"ok": f"rate limit of {task_name} set to {out['limit']}"}}] if reply else None


class Inspect:
    """``app.control.inspect()``: read-only questions to the workers.  Each method returns
    ``{hostname: reply}``, or None when no worker answered within the timeout (as Celery)."""

    def __init__(self, app, destination=None, timeout: float = 1.0, **_):
        self.app = app
        self.destination = destination
        self.timeout = timeout

    def _ask(self, command: str, args: dict | None = None):
        replies = self.app.client.control(command, args, timeout=self.timeout, destination=self.destination)
        return replies or None

    def ping(self):
        return self._ask("ping")

    def active(self, safe=None):
        """The tasks each worker is running: ``{hostname: [{"id", "name", "args", ...}]}``."""
        return self._ask("active")

    def reserved(self, safe=None):
        """The tasks each worker has received and not started yet."""
        return self._ask("reserved")

    def scheduled(self, safe=None):
        """Tasks with an eta held by each worker: always empty lists, since brokerd holds them until due
        (see ``brokerd-ctl queue`` for the delayed count)."""
        return self._ask("scheduled")

    def revoked(self):
        """The ids each worker discarded as revoked (expired, or terminated while running), recent first.
        brokerd drops the messages of revoked tasks before delivery, so those never reach a worker."""
        return self._ask("revoked")

    def registered(self, *taskinfoitems):
        """The task names each worker knows."""
        return self._ask("registered")

    registered_tasks = registered

    def stats(self):
        """Each worker's pool, counters and settings."""
        return self._ask("stats")

    def active_queues(self):
        """The queues each worker consumes: ``[{"name", "routing_key", "exchange"}, ...]``."""
        return self._ask("active_queues")

    def query_task(self, *ids):
        """``{hostname: {task_id: [state, info]}}`` for the given ids a worker is running ("active")
        or holds ("reserved")."""
        if len(ids) == 1 and isinstance(ids[0], (list, tuple)):
            ids = tuple(ids[0])
        return self._ask("query_task", {"ids": list(ids)})

    def conf(self, with_defaults: bool = False):
        """Each worker's app settings (secrets and credentials shown as ***)."""
        return self._ask("conf", {"with_defaults": bool(with_defaults)})

    def report(self):
        """Each worker's ``{"ok": text}`` about itself: versions, pool, queues (for a bug report)."""
        return self._ask("report")


def app_queues(app) -> set:
    """The queue names an app sends to that can be known without sending: the default queue, those
    in ``task_queues``, those named in a dict ``task_routes`` and the tasks' own ``queue``."""
    conf = app.conf
    names = {conf.get("task_default_queue")}
    queues = conf.get("task_queues") or ()
    for q in queues if not isinstance(queues, dict) else queues.keys():
        names.add(q if isinstance(q, str) else getattr(q, "name", None))
    routes = conf.get("task_routes")
    for table in (routes if isinstance(routes, (list, tuple)) else [routes]):
        if isinstance(table, dict):
            for target in table.values():
                names.add(target.get("queue") if isinstance(target, dict) else target)
    for task in list(app.tasks.values()):
        names.add(getattr(task, "queue", None))
    return {n for n in names if isinstance(n, str) and n}
