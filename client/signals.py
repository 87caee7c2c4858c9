"""Signals, under Celery's names, senders and arguments: hooks that run your code at points of a
task's or a worker's life.

    from client.signals import task_prerun, worker_process_init

    @worker_process_init.connect
    def open_db(**kwargs):          # in every pool process of a worker: a connection of its own
        db.connect()

    @task_prerun.connect(sender=add)  # only for the task ``add``
    def before_add(sender=None, task_id=None, task=None, args=None, kwargs=None, **_):
        ...

A receiver takes ``sender`` and ``**kwargs`` (more arguments may come).  One that raises is logged
(logger ``brokerd.signals``) and the others still run; it never fails the task, the publish or the
worker.  ``connect(fn, sender=None, weak=True, dispatch_uid=None)``: ``sender=`` keeps only sends
from that sender (an object, or a task name for the publish signals); ``weak=True`` (the default, as
Celery) holds the receiver by a weak reference, so a receiver nothing else refers to (a lambda, a
method of a discarded object) goes away; ``dispatch_uid`` connects a receiver only once under that id.
``disconnect(fn=None, sender=None, dispatch_uid=None)`` removes it.

Where each is sent, and with what (the sender first):

==========================  =========================  ===============================================
signal                      sender                     arguments
==========================  =========================  ===============================================
before_task_publish         task name                  body (the envelope, editable), exchange,
                                                       routing_key (the queue), headers, properties,
                                                       declare, retry_policy
after_task_publish          task name                  body, exchange, routing_key
task_received               the worker                 request
task_prerun                 the task                   task_id, task, args, kwargs
task_postrun                the task                   task_id, task, args, kwargs, retval, state
task_success                the task                   result
task_failure                the task                   task_id, exception, args, kwargs, traceback,
                                                       einfo
task_retry                  the task                   request, reason, einfo
task_revoked                the task                   request, terminated, signum, expired
task_rejected               the worker                 message, exc
task_unknown                the worker                 name, id, message, exc
celeryd_init                the worker's hostname      instance (the worker), conf
worker_init                 the worker                 —
worker_process_init         None                       — (in every pool process, processes pool)
worker_process_shutdown     None                       pid, exitcode (in every pool process)
worker_ready                the worker                 —
worker_shutdown             the worker                 —
setup_logging               None                       loglevel, logfile, format, colorize (a
                                                       receiver replaces the worker's own setup)
after_setup_logger          None                       logger, loglevel, logfile, format, colorize
beat_init                   the app (brokerd-beat)     — (before it pushes the schedule)
==========================  =========================  ===============================================

The task signals run where the task runs (a pool process, a pool thread, the trio loop); task_received,
task_revoked (for an expired or terminated task), task_rejected and task_unknown in the worker's main
process.  This module imports nothing of the rest of the client.
"""

from __future__ import annotations

import logging
import threading
import weakref

log = logging.getLogger("brokerd.signals")

__all__ = [
    "Signal", "before_task_publish", "after_task_publish", "task_received", "task_prerun", "task_postrun",
    "task_success", "task_failure", "task_retry", "task_revoked", "task_rejected", "task_unknown",
    "celeryd_init", "worker_init", "worker_process_init", "worker_process_shutdown", "worker_ready",
    "worker_shutdown", "setup_logging", "after_setup_logger", "beat_init",
]


def _key(obj):
    """Identity of a receiver or sender: a bound method by (object, function); text as itself."""
    if obj is None or isinstance(obj, str):
        return obj
    if hasattr(obj, "__func__") and hasattr(obj, "__self__"):
        return (id(obj.__self__), id(obj.__func__))
    return id(obj)


class Signal:
    """A named hook.  ``connect`` receivers; ``send(sender, **kwargs)`` calls them."""

    def __init__(self, name: str | None = None, providing_args=None):
        self.name = name
        self.providing_args = set(providing_args or ())
        self._lock = threading.Lock()
        self.receivers: list = []  # [(lookup key, sender key, receiver or weak reference, is weak)]

    def __repr__(self):
        return f"<Signal: {self.name}>"

    def connect(self, *args, sender=None, weak: bool = True, dispatch_uid=None):
        """``@sig.connect``, ``@sig.connect(sender=..., weak=..., dispatch_uid=...)`` or
        ``sig.connect(fn, sender=...)``; returns the receiver, so it works as a decorator."""
        if not args:
            return lambda fn: self._connect(fn, sender, weak, dispatch_uid)
        if len(args) != 1 or not callable(args[0]):
            raise TypeError(f"{self!r}.connect takes one receiver (a callable) or keyword options "
                            f"(sender=, weak=, dispatch_uid=); got {len(args)} positional argument(s)")
        return self._connect(args[0], sender, weak, dispatch_uid)

    def _connect(self, fn, sender, weak, dispatch_uid):
        if not callable(fn):
            raise TypeError(f"a receiver of {self!r} must be callable (got {type(fn).__name__})")
        lookup = (dispatch_uid if dispatch_uid is not None else _key(fn), _key(sender))
        ref = fn
        if weak:
            try:
                ref = weakref.WeakMethod(fn) if hasattr(fn, "__self__") and hasattr(fn, "__func__") else weakref.ref(fn)
            except TypeError:  # a builtin or an object without weak reference support: held strongly
                weak = False
        with self._lock:
            if not any(r[0] == lookup for r in self.receivers):
                self.receivers.append((lookup, lookup[1], ref, weak))
        return fn

    def disconnect(self, receiver=None, sender=None, dispatch_uid=None) -> bool:
        """Remove a receiver (by itself or its ``dispatch_uid``); True if one was connected."""
        lookup = (dispatch_uid if dispatch_uid is not None else _key(receiver), _key(sender))
        with self._lock:
            before = len(self.receivers)
            self.receivers = [r for r in self.receivers if r[0] != lookup]
            return len(self.receivers) != before

    def _live(self, sender) -> list:
        skey = _key(sender)
        out = []
        dead = False
        for _, rsender, ref, weak in list(self.receivers):
            if rsender is not None and rsender != skey:
                continue
            fn = ref() if weak else ref
            if fn is None:
                dead = True
                continue
            out.append(fn)
        if dead:
            with self._lock:
                self.receivers = [r for r in self.receivers if not r[3] or r[2]() is not None]
        return out

    def has_listeners(self, sender=None) -> bool:
        return bool(self.receivers) and bool(self._live(sender))

    def send(self, sender=None, **named) -> list:
        """Call every receiver for ``sender``; ``[(receiver, its return value or the exception it raised)]``.
        A receiver that raises is logged with its traceback; the others still run."""
        if not self.receivers:
            return []
        out = []
        for fn in self._live(sender):
            try:
                out.append((fn, fn(signal=self, sender=sender, **named)))
            except Exception as exc:  # noqa: BLE001 - a receiver must never cost the task or the worker
                log.exception("Signal handler %r raised: %r", fn, exc)
                out.append((fn, exc))
        return out

    send_robust = send


before_task_publish = Signal("before_task_publish")
after_task_publish = Signal("after_task_publish")
task_received = Signal("task_received")
task_prerun = Signal("task_prerun")
task_postrun = Signal("task_postrun")
task_success = Signal("task_success")
task_failure = Signal("task_failure")
task_retry = Signal("task_retry")
task_revoked = Signal("task_revoked")
task_rejected = Signal("task_rejected")
task_unknown = Signal("task_unknown")
celeryd_init = Signal("celeryd_init")
worker_init = Signal("worker_init")
worker_process_init = Signal("worker_process_init")
worker_process_shutdown = Signal("worker_process_shutdown")
worker_ready = Signal("worker_ready")
worker_shutdown = Signal("worker_shutdown")
setup_logging = Signal("setup_logging")
after_setup_logger = Signal("after_setup_logger")
beat_init = Signal("beat_init")
