"""The worker runtime: take tasks from brokerd, run them, store their results.

    from client.worker import Worker
    Worker(app, queues=["high", "low"], concurrency=4).run()   # blocks until SIGTERM / stop()

or from a shell: ``brokerd-worker proj.tasks:app -Q high,low -c 4`` (``client.worker_cli``).

Design (the choices, and why)
-----------------------------
**One connection, one consumer.**  The parent process holds the only broker
connection (a blocking ``client.producer.Client``) and one consumer over every
queue, in preference order, with prefetch credit = concurrency x multiplier.
brokerd never sends more than that, so the worker's buffer is bounded and a
long task never hides short ones behind it in a deep local queue.

**Threads in the parent.**  The *intake* thread owns the connection's life: it
connects (backoff 0.1 s doubling to 5 s, with jitter), consumes, and waits for
the connection to end, then reconnects.  The client's own reader and flusher
threads do the socket I/O.  The *main loop* takes deliveries straight from the
consumer's buffer: the reader thread pokes it through an inbox (a deque plus a
wake-up pipe that is written only while the main loop sleeps, so a busy loop
makes no syscall per delivery), one thread hand-off per burst.  (With a client
that lacks the internals this relies on, the intake thread falls back to
``consumer.get()`` and posts each delivery; see ``_hand_deliveries_to_main_loop``.)
The main loop decodes each envelope, hands tasks to free pool slots, applies
their outcomes, and watches time limits.  It blocks in ``poll()`` on the inbox
pipe and the children's sockets and pidfds; there is no polling sleep anywhere
on the hot path.

**Pools.**
* ``processes`` (default, concurrency = CPU count): N forked children, each
  with a socketpair to the parent carrying pickled jobs and outcomes (4-byte
  length prefix).  A child runs one task at a time; with a deep backlog
  (prefetch multiplier > 1) it is handed batches of up to ``MAX_BATCH`` jobs
  per write (see ``ProcessPool``).  Its death is seen through
  a pidfd (or EOF): the death counts as one retry of the task, redelivered
  after a backoff (1 s, 2 s, 4 s ... capped at 60 s; a nack with a delay and
  the ``retries`` header), and past the task's max_retries its result is
  FAILURE ``WorkerLostError`` and the message is dead-lettered (see
  ``Worker._lost_job``).  Children ignore SIGINT/SIGTERM (the parent decides when they
  stop) and get SIGKILL if the parent dies (``PR_SET_PDEATHSIG``), so a
  ``kill -9`` of the worker frees its tasks for redelivery at once.
* ``threads``: N threads in the parent, for I/O-bound tasks.
* ``trio``: one trio event loop; ``async def`` tasks run concurrently on it,
  plain ``def`` tasks through ``trio.to_thread``.

**Outcomes.**  Whatever process runs the task computes its *outcome*
(``Runner``): which result to store and how to settle the delivery.  The
parent applies it: SUCCESS/FAILURE are stored and the delivery acked in one
RESULT_SET (one log record on the broker, so "result stored" and "message
done" cannot be split by a crash); a retry stores RETRY and nacks with a
delay and a ``retries`` header (brokerd holds the task, not the worker);
``Reject`` nacks, ``Ignore`` acks.  Settling is pipelined: the parent buffers
the frames and sends them once per loop turn, so a burst of results costs one
write.

**Time limits.**  Soft: ``SoftTimeLimitExceeded`` raised inside the task (a
SIGALRM ``setitimer`` in a child process; ``PyThreadState_SetAsyncExc`` on
the threads pool, best effort: it fires at the next Python bytecode, not
inside a blocking C call such as ``time.sleep`` or a socket read; on the trio
pool a cancel scope, so the task sees ``trio.Cancelled`` and the result is a
``SoftTimeLimitExceeded`` FAILURE).  Hard: processes pool: the parent kills
the child (SIGKILL), starts another, stores FAILURE ``TimeLimitExceeded`` and
acks (never redelivered forever); the task's ``on_failure`` is not called (the
process that ran it is gone).  Threads pool: a thread cannot be killed; the
task is marked FAILURE ``TimeLimitExceeded`` and acked, ``TimeLimitExceeded``
is injected into its thread (same limits as soft), the slot is replaced by a
new thread and whatever the old thread returns later is dropped.  Trio pool:
a cancel scope, as for the soft limit.

**Stopping.**  First SIGTERM/SIGINT (or ``stop()``): warm stop.  The consumer
is cancelled, deliveries received but not started are handed back at once
(nack with requeue; they are not failures, but brokerd counts every delivery
as an attempt, so each one handed back uses one of the queue's max_attempts),
running tasks get ``grace`` seconds (default 30) to finish and their results
are stored, then the connection is closed (BYE) and ``run()`` returns.  A
second signal, or the grace period running out: cold stop.  Children are
killed, unfinished tasks are left to brokerd, which redelivers them when the
connection closes; ``run()`` then raises ``ColdStop``.

**Broker restarts.**  A lost connection is re-established by the intake
thread; deliveries of the old connection that were waiting are dropped
(brokerd gives them back), tasks already running finish, and their results
are stored through the new connection without an ack.  brokerd redelivers
those messages (at-least-once); when the redelivery reaches this worker it is
acked without running the task again (another worker would run it again).

**Autoscale** (``autoscale=(max, min)``, processes and threads pools): the
pool grows by one slot whenever a delivery waits and every slot is busy,
and shrinks by one slot per ``AUTOSCALE_IDLE`` seconds a slot stays idle,
down to ``min``.  Prefetch credit is set once, from ``max``.  While the pool
may still grow, jobs are not batched onto busy processes.
``max_memory_per_child`` (KiB, processes pool): a child whose resident memory
(``/proc/<pid>/statm``) is above it once its jobs are done is replaced, like
one past ``max_tasks_per_child``.

**Events** (protocol.md §5.29).  The worker reports ``worker-online`` when it
connects, ``worker-heartbeat`` every ``heartbeat_interval`` seconds (pool size,
active, processed, load average, pool changes and replacements),
``worker-pool-resized`` and ``worker-process-replaced`` as they happen, and
``worker-offline`` when it stops; and, unless ``task_events`` is off
(``--no-task-events``), each task's ``task-received``, ``task-started``,
``task-succeeded`` / ``task-failed`` / ``task-retried`` / ``task-revoked`` /
``task-rejected``.  Events cost no round trip: they are gathered for up to
``EVENT_FLUSH_DELAY`` and leave in one EMIT_EVENTS frame, in the same write as
the results, and nobody waits for its reply.  Measured cost on no-op tasks:
bench/tasks.py ``--events-cost``.

**Remote control** (protocol.md §5.34): brokerd forwards control requests as
CONTROL frames with a ``reply_id``; the main loop answers ``ping``, ``active``,
``registered``, ``stats``, ``pool_grow`` (capped at the autoscale maximum, or
the concurrency), ``pool_shrink`` and ``shutdown`` (warm) with CONTROL_REPLY.

**Poison.**  No message may cost more than its own task: the main loop checks
every envelope field it or a pool will use (``check_envelope``) and fails the
task with a DecodeError naming the field; a return value that cannot be
stored or repr'd, or an exception whose ``str()`` raises, is a FAILURE, never
a dead pool process (``Runner.succeeded``, ``Runner._outcome``).

Logging follows Celery's lines (``Task proj.add[id] received``, ``... succeeded
in 0.0012s: 4``, ``... retry: Retry in 2s: ValueError(...)``, ``... raised
unexpected: ZeroDivisionError('division by zero')``) on the
``brokerd.worker`` logger.
"""

from __future__ import annotations

import ctypes
import inspect
import itertools
import logging
import math
import os
import pickle
import random
import select
import signal
import socket
import struct
import sys
import threading
import time
import traceback
from collections import deque

import cbor2

from client.app import (
    EncodeError,
    Ignore,
    Reject,
    Request,
    Retry,
    SoftTimeLimitExceeded,
    TimeLimitExceeded,
    WorkerLostError,
    _current_request,
    decode_envelope,
)
from client.errors import BrokerdError, ConnectionClosed, ConnectionLost, Disconnected
from client.wire import DEFAULT_MAX_FRAME, OP_CONTROL_REPLY, OP_EMIT_EVENTS

__all__ = ["Worker", "Runner", "ExceptionInfo", "BrokerUnreachable", "ColdStop", "setup_logging"]

log = logging.getLogger("brokerd.worker")

# -- limits and timings (seconds unless named) ----------------------------------------------
RECONNECT_FIRST = 0.1  # first back-off after a lost connection; doubles each try ...
RECONNECT_MAX = 5.0  # ... up to this; each wait is jittered to 50-100 % so workers don't stampede
CONNECT_TIMEOUT = 10.0  # at start: keep trying this long, then give up (exit code 3 in the CLI)
DEFAULT_GRACE = 30.0  # warm stop: how long running tasks may take to finish
AUTOSCALE_IDLE = 5.0  # a pool slot idle this long is retired (down to the autoscale minimum)
CHILD_STOP_TIMEOUT = 5.0  # a child that does not exit this long after its pipe closed is killed
MAX_PREFETCH = 65535  # brokerd's limit per consumer
RAN_OFFLINE_MAX = 100_000  # task ids remembered as "ran while brokerd was unreachable" (bounds memory)
RESULT_REPR_MAX = 200  # characters of a return value shown in the "succeeded" log line
FRAME = struct.Struct(">I")  # parent <-> child: 4-byte length, then a pickle
PICKLE = pickle.HIGHEST_PROTOCOL
PR_SET_PDEATHSIG = 1
MAX_BATCH = 16  # jobs handed to a pool process in one write when the backlog is deep
OUTCOME_DELAY = 0.0005  # a child sends outcomes at the end of a batch, or once the oldest waited this long
# Events (protocol.md §5.29): batched, one EMIT_EVENTS frame per main-loop turn, sent with the results.
HEARTBEAT_INTERVAL = 2.0  # seconds between worker-heartbeat events (Celery's default); lost after 3 missed
DEFAULT_TASK_EVENTS = True  # task-* events unless -E is turned off (--no-task-events); worker-* events always
MAX_PENDING_EVENTS = 10_000  # events kept while brokerd is unreachable; the oldest half goes past this
# Task events wait up to EVENT_FLUSH_DELAY (or until EVENT_FLUSH_MAX are pending) to share one EMIT_EVENTS
# frame: flushing every loop turn costs brokerd a frame and a reply per task (~25 % of end-to-end no-op
# throughput on 2 cores, bench/tasks.py --events-cost); 50 ms late is nothing to a person watching.
# Worker events (online, heartbeat, offline, pool changes) go with the next flush, at once.
EVENT_FLUSH_DELAY = 0.05
EVENT_FLUSH_MAX = 1000
EVENT_REPR_MAX = 200  # characters of args, kwargs and result reprs in events
EVENT_TRACEBACK_MAX = 4000  # characters of a traceback in a task-failed event (brokerd keeps at most 4096)

# A task whose pool process dies is redelivered after a delay that doubles: 1 s, 2 s, 4 s ... capped at
# 60 s (without it an os.abort() task ran 25 times in 81 ms).  Each death counts as one retry of the task
# (the "retries" header, as for self.retry()), bounded by its max_retries (Celery's default 3; a task with
# max_retries=None gets LOST_RETRIES_DEFAULT); past that its result is FAILURE WorkerLostError.
LOST_BACKOFF_FIRST = 1.0
LOST_BACKOFF_MAX = 60.0
LOST_RETRIES_DEFAULT = 3
# Envelope validation (protocol.md §8.1): a field of the wrong type or range fails that task (DecodeError)
# instead of raising in the worker's main loop.
TIME_LIMIT_MAX = 366 * 86400.0  # seconds; a time limit above a year is a mistake (and overflows setitimer far above)
# A result must fit in one RESULT_SET frame: brokerd closes the connection on a frame over its max_frame
# (16 MiB by default), which would hand every in-flight task back.  64 KiB is left for the id and meta.
RESULT_MAX_BYTES = DEFAULT_MAX_FRAME - 64 * 1024

# Outcome settle codes: what to do with the delivery once the result (if any) is stored.
S_ACK = 0  # done: ack (atomically with the result, when there is one)
S_REJECT = 1  # nack without requeue: the dead-letter queue
S_REQUEUE = 2  # nack with requeue: run again now (counts an attempt)
S_RETRY = 3  # nack with a delay and a new "retries" header: brokerd holds it

# Default concurrency per pool: a process per CPU; threads and trio tasks mostly wait on I/O.
DEFAULT_CONCURRENCY = {"processes": lambda: os.cpu_count() or 1, "threads": lambda: 10, "trio": lambda: 100}


class BrokerUnreachable(Exception):
    """brokerd could not be reached at start within the connect timeout."""


class ColdStop(Exception):
    """The worker stopped without waiting for its running tasks (second signal, or grace ran out)."""


# =============================================================================================
# The broker calls the worker makes.  One small adapter, so that moving to new public Client
# methods is one edit.  Everything here is pipelined: frames are buffered in the client's
# session and sent by flush() (once per main-loop turn), replies are checked in the background.
# =============================================================================================
class _Done:
    """A waiter the client's reader thread 'releases' when a pipelined request is answered.

    Called under the client's lock: it only appends to a deque.
    """

    __slots__ = ("p", "what", "sink")

    def __init__(self, what, sink):
        self.p = None
        self.what = what
        self.sink = sink

    def release(self):
        p = self.p
        if p is not None and p.error is not None:
            self.sink.append((self.what, p.error))

    def acquire(self, *a, **kw):  # never waited on; present so the Client can treat it as a lock
        return True


class _Channel:
    """The worker's view of one live connection: results, acks and nacks, all pipelined.

    The public ``Client.store_result(..., delivery=d)`` and ``Delivery.nack(...)`` wait for
    the broker's reply, which would put one round trip per task on the main loop; this
    adapter drives the client's ``Session`` the same way (``session.store_result`` /
    ``session.nack`` under ``client._lock``) but does not wait: frames go out with the next
    ``flush()`` (once per main-loop turn) and replies are checked in the background.  Failed
    requests land in ``sink`` as ``(what, error)``: the worker logs refusals and stores
    results again after a reconnect.
    """

    def __init__(self, client, gen: int, sink: deque, ttl=None):
        self.client = client
        self.gen = gen
        self.sink = sink
        self.ttl = ttl
        self.session = client._session
        self.lock = client._lock

    def result(self, d, task_id, state, value=None, meta=None) -> None:
        """RESULT_SET; with ``d`` (a delivery of this connection), ack it in the same record."""
        w = _Done(("result", task_id, state, value, meta), self.sink)
        with self.lock:
            w.p = self.session.store_result(task_id, state, value, meta, self.ttl, d, waiter=w)

    def ack(self, d) -> None:
        d.ack()

    def nack(self, d, requeue=True, delay=None, headers=None) -> None:
        w = _Done(("nack", d.id, requeue, delay), self.sink)
        with self.lock:
            w.p = self.session.nack(d, requeue, delay, headers, waiter=w)

    def publish(self, queue, body, *, priority=0, delay=None, headers=None, id=None) -> None:
        self.client.publish(queue, body, priority=priority, delay=delay, headers=headers, id=id, confirm=False)

    def events(self, hostname, batch) -> None:
        """EMIT_EVENTS: a batch of events, pipelined like the results (one frame per loop turn)."""
        w = _Done(("events", len(batch)), self.sink)
        with self.lock:
            w.p = self.session.request(OP_EMIT_EVENTS, [hostname, batch], waiter=w)

    def control_reply(self, reply_id, reply) -> None:
        w = _Done(("control reply", reply_id), self.sink)
        with self.lock:
            w.p = self.session.request(OP_CONTROL_REPLY, [reply_id, reply], waiter=w)

    def flush(self) -> None:
        if self.session.has_output:
            self.client._flush()


# =============================================================================================
# Running one task: the same code in a child process, a pool thread or the trio loop.
# =============================================================================================
class ExceptionInfo:
    """What ``on_failure`` / ``on_retry`` get as ``einfo`` (Celery's shape)."""

    def __init__(self, exc: BaseException):
        self.exception = exc
        self.type = type(exc)
        self.tb = exc.__traceback__
        self.traceback = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))

    def __str__(self):
        return self.traceback

    def __repr__(self):
        return f"<ExceptionInfo: {self.exception!r}>"


def _safe_str(exc: BaseException) -> str:
    """str(exc), or a stand-in when the exception's __str__ itself raises (it must not cost the worker)."""
    try:
        return str(exc)
    except Exception as err:  # noqa: BLE001
        return f"<str() of {type(exc).__name__} failed: {type(err).__name__}>"


def exc_meta(exc: BaseException, hostname: str, tb: str | None = None) -> dict:
    return {
        "exc_type": type(exc).__name__,
        "exc_message": _safe_str(exc),
        "traceback": tb if tb is not None else "".join(traceback.format_exception(type(exc), exc, exc.__traceback__)),
        "hostname": hostname,
    }


def _short_repr(value) -> str:
    r = repr(value)
    return r if len(r) <= RESULT_REPR_MAX else r[: RESULT_REPR_MAX - 3] + "..."


def _short_repr_text(text: str, limit: int = EVENT_REPR_MAX) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _event_repr(value, limit: int = EVENT_REPR_MAX) -> str:
    try:
        return _short_repr_text(repr(value), limit)
    except Exception:  # a broken __repr__ must not cost the task
        return f"<{type(value).__name__}>"


def _exception_text(meta) -> str | None:
    if not isinstance(meta, dict) or not meta.get("exc_type"):
        return None
    return _short_repr_text(f"{meta.get('exc_type')}({meta.get('exc_message', '')!r})", 300)


def _checkpoint():
    """A Python-level call: a pending async exception (threads pool time limits) fires here."""


async def _await(aw):
    return await aw


def _run_awaitable(aw):
    """An ``async def`` task on a synchronous pool: run it to completion on its own trio loop."""
    import trio

    return trio.run(_await, aw)


class _Ctx:
    __slots__ = ("task", "req", "t0", "in_task")


class Runner:
    """Runs jobs and returns outcomes ``(settle, state, value, meta, delay, retries)``.

    A job is ``(seq, payload, msg_id, queue, priority, attempts, headers, soft_limit)`` where
    payload is the envelope (a dict) or the message body (bytes, decoded here).  Hooks
    (``on_success``, ``on_failure``, ``on_retry``, ``after_return``) run here, in the process
    that ran the task, before the outcome goes back to be stored.
    """

    def __init__(self, app, hostname: str, alarm: bool = False):
        self.app = app
        self.hostname = hostname
        self.alarm = alarm  # soft limits by SIGALRM (a child process: only the main thread runs tasks)
        self.in_task = False
        if alarm:
            signal.signal(signal.SIGALRM, self._on_alarm)

    def _on_alarm(self, signum, frame):
        if self.in_task:
            self.in_task = False
            raise SoftTimeLimitExceeded("soft time limit exceeded")

    # -- the pieces, shared by the sync and async paths --
    def begin(self, job):
        """(ctx, None) to run the task, or (None, outcome) when it cannot run."""
        _, payload, msg_id, queue, priority, attempts, headers, _soft = job
        if type(payload) is dict:
            env = payload
        else:
            try:
                env = decode_envelope(payload)
            except ValueError as exc:
                return None, undecodable_outcome(msg_id, queue, exc, self.hostname)
        task = self.app.tasks.get(env["task"])
        if task is None:
            return None, unknown_outcome(env, self.app, self.hostname)
        hdrs = headers or {}
        retries = hdrs.get("retries")
        if type(retries) is not int:
            retries = env.get("retries") or 0
        req = Request(
            id=env["id"], args=env["args"], kwargs=env["kwargs"], retries=retries,
            delivery_info={"queue": queue, "priority": priority, "redelivered": attempts > 1, "attempts": attempts},
            eta=env.get("eta"), expires=env.get("expires"), parent_id=env.get("parent_id"),
            root_id=env.get("root_id"), headers=env.get("headers"), hostname=self.hostname, task=env["task"],
        )
        ctx = _Ctx()
        ctx.task = task
        ctx.req = req
        ctx.t0 = time.perf_counter()
        return ctx, None

    def execute(self, job, slot=None):
        """Run one job here; return its outcome.  ``slot`` (threads pool) carries ``in_task``."""
        ctx, outcome = self.begin(job)
        if ctx is None:
            return outcome
        req = ctx.req
        soft = job[7]
        token = _current_request.set(req)
        try:
            try:
                if slot is not None:
                    slot.in_task = True
                elif self.alarm:
                    self.in_task = True
                    if soft:
                        signal.setitimer(signal.ITIMER_REAL, soft)
                try:
                    retval = ctx.task(*req.args, **req.kwargs)
                    if inspect.isawaitable(retval):
                        retval = _run_awaitable(retval)
                finally:
                    if slot is not None:
                        with slot.lock:
                            slot.in_task = False
                        try:
                            _checkpoint()
                        except (SoftTimeLimitExceeded, TimeLimitExceeded):
                            pass  # the limit hit just as the task ended: keep its real outcome
                    elif self.alarm:
                        self.in_task = False
                        if soft:
                            signal.setitimer(signal.ITIMER_REAL, 0)
            except BaseException as exc:  # noqa: BLE001 - every failure of user code is an outcome
                return self._outcome(self.failed, ctx, exc)
            return self._outcome(self.succeeded, ctx, retval)
        finally:
            _current_request.reset(token)

    async def execute_async(self, job, limit=None, hard=None):
        """Trio pool: await an ``async def`` task under a cancel scope for its time limits."""
        import trio

        ctx, outcome = self.begin(job)
        if ctx is None:
            return outcome
        req = ctx.req
        token = _current_request.set(req)
        try:
            deadline = trio.current_time() + limit if limit else float("inf")
            try:
                with trio.CancelScope(deadline=deadline) as cs:
                    retval = await ctx.task(*req.args, **req.kwargs)
                if cs.cancelled_caught:
                    if hard and (not job[7] or hard <= job[7]):
                        raise TimeLimitExceeded(f"hard time limit ({hard:g}s) exceeded")
                    raise SoftTimeLimitExceeded(f"soft time limit ({limit:g}s) exceeded")
            except BaseException as exc:  # noqa: BLE001
                if isinstance(exc, trio.Cancelled):
                    raise  # the worker itself is being cancelled (cold stop)
                return self._outcome(self.failed, ctx, exc)
            return self._outcome(self.succeeded, ctx, retval)
        finally:
            _current_request.reset(token)

    def _outcome(self, settle, ctx, value):
        """``succeeded``/``failed``, but never raising: whatever a task returned or raised, its process
        (a pool child, a pool thread, the trio loop) must live on and the task must get a result."""
        try:
            return settle(ctx, value)
        except Exception as exc:  # noqa: BLE001
            log.error("Task %s[%s]: its outcome could not be recorded: %s: %s", ctx.task.name, ctx.req.id,
                      type(exc).__name__, _safe_str(exc))
            err = EncodeError(f"the outcome of {ctx.task.name} could not be recorded: {type(exc).__name__}: "
                              f"{_safe_str(exc)}")
            return (S_ACK, "FAILURE", None, exc_meta(err, self.hostname, ""), None, None)

    def _hook(self, ctx, name, *args):
        try:
            getattr(ctx.task, name)(*args)
        except Exception:
            log.exception("Task %s[%s]: %s hook raised", ctx.task.name, ctx.req.id, name)

    def succeeded(self, ctx, retval):
        task, req = ctx.task, ctx.req
        # The value must be storable (CBOR, within one frame) and showable (repr, for the log line and
        # the task-succeeded event): an int over 4,300 digits, a cyclic list or a raising __repr__ used
        # to kill the pool process and be retried until dead-lettered, its result PENDING for ever.
        # The repr is the one the default (INFO) log line makes anyway.
        why = None
        try:
            size = len(cbor2.dumps(retval))
        except Exception as exc:  # noqa: BLE001 - cbor2 raises several kinds; RecursionError too
            why = _safe_str(exc)
        else:
            if size > RESULT_MAX_BYTES:
                why = f"it is {size} bytes encoded, over the {RESULT_MAX_BYTES} bytes a result may take"
            else:
                try:
                    shown = _short_repr(retval)
                except Exception as exc:  # noqa: BLE001
                    why = f"repr() of it raised {type(exc).__name__}: {_safe_str(exc)}"
        if why is not None:
            err = EncodeError(
                f"the return value of {task.name} ({type(retval).__name__}) cannot be stored as a result: {why}"
            )
            return self.failed(ctx, err)
        runtime = time.perf_counter() - ctx.t0
        self._hook(ctx, "on_success", retval, req.id, req.args, req.kwargs)
        self._hook(ctx, "after_return", "SUCCESS", retval, req.id, req.args, req.kwargs, None)
        if log.isEnabledFor(logging.INFO):
            log.info("Task %s[%s] succeeded in %.4fs: %s", task.name, req.id, runtime, shown)
        ignore = task.ignore_result
        if ignore is None:
            ignore = self.app.conf.get("task_ignore_result", False)
        if ignore:
            return (S_ACK, None, None, None, None, None)
        return (S_ACK, "SUCCESS", retval, None, None, None)

    def failed(self, ctx, exc):
        task, req = ctx.task, ctx.req
        if isinstance(exc, Retry):
            return self._retry(ctx, exc, exc.exc, exc.when)
        if isinstance(exc, Ignore):
            log.info("Task %s[%s] ignored", task.name, req.id)
            return (S_ACK, None, None, None, None, None)
        if isinstance(exc, Reject):
            log.info("Task %s[%s] rejected (requeue=%s): %s", task.name, req.id, exc.requeue, exc)
            return (S_REQUEUE if exc.requeue else S_REJECT, None, None, None, None, None)
        auto = task.autoretry_for
        if auto and isinstance(exc, tuple(auto)) and not (
            task.dont_autoretry_for and isinstance(exc, tuple(task.dont_autoretry_for))
        ):
            kw = dict(task.retry_kwargs or {})
            if task.retry_backoff:
                try:
                    kw["countdown"] = task.retry_delay(req.retries)
                except OverflowError:  # 2 ** retries past a float (a forged "retries" header): the cap
                    kw["countdown"] = float(task.retry_backoff_max)
            kw.pop("exc", None)
            try:
                task.retry(exc=exc, **kw)
            except Retry as r:
                return self._retry(ctx, r, exc, r.when)
            except BaseException as past_max:  # noqa: BLE001 - max_retries reached: the last exception
                exc = past_max
        tb = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
        einfo = ExceptionInfo(exc)
        self._hook(ctx, "on_failure", exc, req.id, req.args, req.kwargs, einfo)
        self._hook(ctx, "after_return", "FAILURE", exc, req.id, req.args, req.kwargs, einfo)
        if isinstance(exc, SoftTimeLimitExceeded):
            log.warning("Soft time limit exceeded for %s[%s]", task.name, req.id)
        log.error("Task %s[%s] raised unexpected: %r", task.name, req.id, exc)
        if log.isEnabledFor(logging.DEBUG):
            log.debug("Task %s[%s] traceback:\n%s", task.name, req.id, tb)
        return (S_ACK, "FAILURE", None, exc_meta(exc, self.hostname, tb), None, None)

    def _retry(self, ctx, r, exc, when):
        task, req = ctx.task, ctx.req
        if when is None:
            when = float(task.default_retry_delay)
        shown = exc if exc is not None else r
        einfo = ExceptionInfo(shown)
        self._hook(ctx, "on_retry", shown, req.id, req.args, req.kwargs, einfo)
        self._hook(ctx, "after_return", "RETRY", shown, req.id, req.args, req.kwargs, einfo)
        log.info("Task %s[%s] retry: Retry in %gs: %r", task.name, req.id, when, shown)
        return (S_RETRY, "RETRY", None, exc_meta(shown, self.hostname, einfo.traceback), max(0.0, float(when)), req.retries + 1)


def _shown(value) -> str:
    """A bad field's value in an error message: its type and a short, safe repr."""
    return f"{type(value).__name__} {_event_repr(value, 60)}"


def _bad_number(value, *, nonneg=False, upper=None) -> bool:
    """True unless ``value`` is an int or float (not bool), finite, within range."""
    if type(value) not in (int, float):
        return True
    try:
        f = float(value)
    except OverflowError:  # a bignum
        return True
    if not math.isfinite(f) or (nonneg and f < 0) or (upper is not None and f > upper):
        return True
    return False


def check_envelope(env: dict) -> None:
    """Raise ValueError naming the first field of a decoded envelope (protocol.md §8.1) that the worker
    cannot use.  ``decode_envelope`` has checked ``task``, ``id``, ``args``, ``kwargs`` and ``v``; this
    checks the rest, so that nothing later (deadline arithmetic, ``time.time() >= expires``, setitimer,
    retry counting) can raise in the main loop on a hostile or buggy producer's envelope."""
    tid = env["id"]
    if not 0 < len(tid) <= 255:
        raise ValueError(f"task envelope field 'id' must be 1 to 255 characters (got {len(tid)})")
    for k in env["kwargs"]:
        if type(k) is not str:
            raise ValueError(f"task envelope field 'kwargs' must have text keys (got the key {_shown(k)})")
    retries = env.get("retries")
    if retries is not None and (type(retries) is not int or retries < 0):
        raise ValueError(f"task envelope field 'retries' must be a whole number >= 0 or null (got {_shown(retries)})")
    for key in ("eta", "expires"):
        value = env.get(key)
        if value is not None and _bad_number(value):
            raise ValueError(f"task envelope field {key!r} must be a Unix time in seconds (a finite number) or null "
                             f"(got {_shown(value)})")
    for key in ("parent_id", "root_id"):
        value = env.get(key)
        if value is not None and type(value) is not str:
            raise ValueError(f"task envelope field {key!r} must be text or null (got {_shown(value)})")
    value = env.get("headers")
    if value is not None and type(value) is not dict:
        raise ValueError(f"task envelope field 'headers' must be a map or null (got {_shown(value)})")
    for key in ("link", "link_error", "chain"):
        value = env.get(key)
        if value is not None and type(value) is not list:
            raise ValueError(f"task envelope field {key!r} must be an array of signatures or null (got {_shown(value)})")
    opts = env.get("options")
    if opts is None:
        return
    if type(opts) is not dict:
        raise ValueError(f"task envelope field 'options' must be a map or null (got {_shown(opts)})")
    for key in ("time_limit", "soft_time_limit"):
        value = opts.get(key)
        if value is not None and _bad_number(value, nonneg=True, upper=TIME_LIMIT_MAX):
            raise ValueError(f"task envelope field 'options.{key}' must be a number of seconds from 0 to "
                             f"{TIME_LIMIT_MAX:g} (0 or null: no limit) (got {_shown(value)})")


def undecodable_outcome(msg_id, queue, exc, hostname):
    msg = f"message {msg_id!r} on queue {queue!r} is not a task envelope: {exc}"
    log.error("Rejected message %s from %s: %s (sent to the dead-letter queue)", msg_id, queue, exc)
    meta = {"exc_type": "DecodeError", "exc_message": msg, "traceback": None, "hostname": hostname}
    return (S_REJECT, "FAILURE", None, meta, None, None)


def unknown_outcome(env, app, hostname):
    name = env["task"]
    known = sorted(n for n in app.tasks)
    shown = ", ".join(known[:20]) + (f" and {len(known) - 20} more" if len(known) > 20 else "")
    msg = (
        f"Task of kind {name!r} is not registered on worker {hostname}: define it with @app.task in a module "
        f"the worker imports (the MODULE of 'brokerd-worker MODULE:APP', or one it imports), or check the name "
        f"given to send_task(). Registered: {shown or 'none'}"
    )
    log.error("Received unregistered task of type %r [%s]: sent to the dead-letter queue", name, env["id"])
    meta = {"exc_type": "NotRegistered", "exc_message": msg, "traceback": None, "hostname": hostname}
    return (S_REJECT, "FAILURE", None, meta, None, None)


# =============================================================================================
# Pools.  A slot runs one job at a time; the main loop hands jobs to idle slots.
# =============================================================================================
class _Job:
    """A delivery the main loop is looking after, from receipt to settlement."""

    __slots__ = ("seq", "d", "gen", "task_id", "name", "env", "soft", "hard", "deadline", "soft_deadline",
                 "slot", "soft_sent", "started")

    def to_runner(self, with_env: bool):
        d = self.d
        return (self.seq, self.env if with_env else d.body, d.id, d.queue, d.priority, d.attempts, d.headers, self.soft)


class _PokingCondition(threading.Condition):
    """Stands in for a consumer's wake-up Condition: the client's reader thread calls
    ``notify_all()`` (holding the client's lock) when deliveries arrive; this also posts a
    "poke" to the worker's main loop, which then takes them from the consumer's buffer.
    One thread hand-off per burst instead of two (reader -> intake -> main)."""

    def __init__(self, lock, post):
        super().__init__(lock)
        self._post_poke = post

    def notify_all(self):
        super().notify_all()
        self._post_poke(("poke",))

    notifyAll = notify_all


def _hand_deliveries_to_main_loop(client, consumer, post) -> bool:
    """Let the reader thread wake the main loop directly; False if this client cannot."""
    state = getattr(consumer, "_state", None)
    if state is None or not hasattr(state, "buffer") or not hasattr(client, "_reader") or not hasattr(client, "_lock"):
        return False
    with client._lock:
        state.waiter = _PokingCondition(client._lock, post)
    post(("poke",))  # whatever arrived before the switch
    return True


try:
    _PAGE_KB = os.sysconf("SC_PAGE_SIZE") // 1024
except (ValueError, OSError, AttributeError):
    _PAGE_KB = 4


def _rss_kb(pid: int) -> int | None:
    """Resident memory of a process in KiB, from /proc (None where there is no /proc)."""
    try:
        with open(f"/proc/{pid}/statm", "rb") as f:
            return int(f.read().split()[1]) * _PAGE_KB
    except (OSError, ValueError, IndexError):
        return None


def _prctl_pdeathsig():
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    except Exception:  # not Linux: the child notices the parent is gone at its next read
        pass


def _write_all(fd, data):
    """Write everything, waiting for room if the fd is non-blocking and full."""
    view = memoryview(data)
    while view:
        try:
            n = os.write(fd, view)
        except BlockingIOError:
            select.select([], [fd], [])
            continue
        view = view[n:]


class _Child:
    __slots__ = ("pid", "fd", "pidfd", "buf", "jobs", "done", "assigned", "idle_since", "label", "index")


class ProcessPool:
    """N forked children; jobs and outcomes cross a socketpair as length-prefixed pickles.

    A child runs its jobs one after another.  With a deep backlog (prefetch multiplier > 1) a
    child is handed a *batch* of up to ``MAX_BATCH`` jobs in one write, and topped up with the
    next batch while it runs the last job of the current one, so it never waits for the parent;
    with the default multiplier of 1 every batch is one job.  Outcomes come back one frame per
    job, written at the end of a batch or once the oldest unsent one is ``OUTCOME_DELAY`` old.
    On a warm stop the children get SIGUSR1 and hand back the jobs they have not started.
    """

    kind = "processes"

    def __init__(self, worker, size: int, max_tasks_per_child=None, max_memory_per_child=None):
        self.w = worker
        self.size = size
        self.max_tasks = max_tasks_per_child
        self.max_memory = max_memory_per_child  # KiB of resident memory; a child past it is replaced
        self.children: dict[int, _Child] = {}  # by parent-end fd
        self.by_pidfd: dict[int, _Child] = {}
        self.idle: list[_Child] = []
        self._index = itertools.count(1)

    # -- lifecycle --
    def start(self):
        for _ in range(self.size):
            self.spawn()

    def spawn(self):
        w = self.w
        parent_end, child_end = socket.socketpair()
        index = next(self._index)
        label = f"ForkPoolWorker-{index}"
        sys.stdout.flush()
        sys.stderr.flush()
        pid = os.fork()
        if pid == 0:  # the child
            code = 0
            try:
                _prctl_pdeathsig()
                parent_end.close()
                self._child_setup()
                _child_main(child_end.detach(), w, label)
            except BaseException:  # noqa: BLE001
                traceback.print_exc()
                code = 1
            finally:
                try:
                    sys.stdout.flush()
                    sys.stderr.flush()
                finally:
                    os._exit(code)
        child_end.close()
        c = _Child()
        c.pid = pid
        c.fd = parent_end.detach()
        os.set_blocking(c.fd, False)  # a stale poll event must never block the main loop
        c.index = index
        try:
            c.pidfd = os.pidfd_open(pid)
        except (AttributeError, OSError):
            c.pidfd = None
        c.buf = bytearray()
        c.jobs = deque()
        c.done = 0
        c.assigned = 0
        c.idle_since = time.monotonic()
        c.label = label
        self.children[c.fd] = c
        w.poller.register(c.fd, select.POLLIN)
        if c.pidfd is not None:
            self.by_pidfd[c.pidfd] = c
            w.poller.register(c.pidfd, select.POLLIN)
        self.idle.append(c)
        log.debug("started %s (pid %d)", label, pid)
        return c

    def _child_setup(self):
        """In a fresh child: drop the parent's fds and signal handling."""
        for other in list(self.children.values()):
            for fd in (other.fd, other.pidfd):
                if fd is not None:
                    try:
                        os.close(fd)
                    except OSError:
                        pass
        self.w._forget_parent_fds()
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)

    def _forget(self, c: _Child):
        self.children.pop(c.fd, None)
        try:
            self.w.poller.unregister(c.fd)
        except (KeyError, ValueError):
            pass
        os.close(c.fd)
        if c.pidfd is not None:
            self.by_pidfd.pop(c.pidfd, None)
            try:
                self.w.poller.unregister(c.pidfd)
            except (KeyError, ValueError):
                pass  # closed by _reap, once the process is gone
        if c in self.idle:
            self.idle.remove(c)

    def _reap(self, c: _Child, block=True) -> str:
        try:
            pid, status = os.waitpid(c.pid, 0 if block else os.WNOHANG)
        except ChildProcessError:
            pid, status = c.pid, 0
        if pid == 0:
            return "still running"
        if c.pidfd is not None:
            os.close(c.pidfd)
            c.pidfd = None
        if os.WIFSIGNALED(status):
            sig = os.WTERMSIG(status)
            try:
                name = signal.Signals(sig).name
            except ValueError:
                name = str(sig)
            return f"was killed by {name}"
        return f"exited with code {os.waitstatus_to_exitcode(status)}"

    def _reap_soon(self, c: _Child) -> str:
        deadline = time.monotonic() + CHILD_STOP_TIMEOUT
        while True:
            status = self._reap(c, block=False)
            if status != "still running":
                return status
            left = deadline - time.monotonic()
            if left <= 0:
                try:
                    os.kill(c.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                return self._reap(c)
            if c.pidfd is not None:
                select.select([c.pidfd], [], [], left)
            else:
                time.sleep(min(left, 0.01))

    # -- the main loop's interface --
    @property
    def current(self) -> int:
        return len(self.children)

    def dispatch(self, backlog: deque, running: dict, now: float) -> None:
        """Hand waiting jobs to idle children (and top up busy ones when the backlog is deep)."""
        batch = 1
        autoscale = self.w.autoscale
        # While autoscale may still add processes, a job waits for one rather than queue behind a busy one.
        if len(backlog) > len(self.children) and (autoscale is None or self.size >= autoscale[0]):
            batch = min(MAX_BATCH, -(-len(backlog) // max(1, len(self.children))))
        if self.idle:
            for c in list(self.idle):
                if not backlog:
                    break
                self.idle.remove(c)
                self._send(c, backlog, batch, running, now)
        if batch > 1 and backlog:
            for c in self.children.values():
                if len(c.jobs) == 1 and backlog:  # it is on its last job: queue the next batch now
                    self._send(c, backlog, batch, running, now)

    def _send(self, c: _Child, backlog, batch, running, now):
        if self.max_tasks:
            batch = min(batch, self.max_tasks - c.assigned)
            if batch <= 0:
                return
        jobs = []
        for _ in range(batch):
            if not backlog:
                break
            job = backlog.popleft()
            job.slot = c
            running[job.seq] = job
            if not c.jobs:
                self.w._job_started(job)
                if job.hard:
                    job.deadline = now + job.hard
            c.jobs.append(job)
            jobs.append(job.to_runner(False))
        c.assigned += len(jobs)
        data = pickle.dumps(jobs, PICKLE)
        try:
            _write_all(c.fd, FRAME.pack(len(data)) + data)
        except OSError:
            pass  # the child is gone: its pidfd / EOF tells the main loop, which hands the jobs back

    def on_ready(self, fd):
        """A child's socket or pidfd is readable."""
        c = self.children.get(fd)
        if c is not None:
            try:
                data = os.read(fd, 262144)
            except BlockingIOError:
                return
            except OSError:
                data = b""
            if data:
                self._received(c, data)
                return
            self._died(c)
            return
        c = self.by_pidfd.get(fd)
        if c is not None:
            # Take what it wrote before it exited, then treat it as gone.
            while c.fd in self.children:
                try:
                    data = os.read(c.fd, 262144)
                except OSError:  # BlockingIOError included: nothing more was written
                    data = b""
                if not data:
                    break
                self._received(c, data)
            if c.fd in self.children:
                self._died(c)

    def _received(self, c: _Child, data: bytes):
        buf = c.buf
        buf += data
        pos = 0
        end = len(buf)
        w = self.w
        jobs = c.jobs
        while end - pos >= 4:
            (n,) = FRAME.unpack_from(buf, pos)
            if end - pos - 4 < n:
                break
            seq, outcome, runtime = pickle.loads(buf[pos + 4: pos + 4 + n])
            pos += 4 + n
            if not jobs or jobs[0].seq != seq:
                continue  # settled already (it cannot happen; be safe)
            job = jobs.popleft()
            c.done += 1
            if outcome is None:
                w._hand_back_job(job)  # not started: the child was told to stop
            else:
                w._finish(job, outcome, runtime)
            if jobs:
                nxt = jobs[0]
                w._job_started(nxt)
                if nxt.hard:
                    nxt.deadline = time.monotonic() + nxt.hard
        if pos:
            del buf[:pos]
        if not jobs and c.fd in self.children:
            if self.max_tasks and c.done >= self.max_tasks:
                log.info("%s (pid %d) ran %d tasks (--max-tasks-per-child): replacing it", c.label, c.pid, c.done)
                self._retire(c)  # maintain() starts its successor
                w._process_replaced(c.pid, "max-tasks-per-child", tasks=c.done)
            elif self.max_memory and (rss := _rss_kb(c.pid)) is not None and rss > self.max_memory:
                log.info("%s (pid %d) uses %d KiB, over --max-memory-per-child %d KiB: replacing it",
                         c.label, c.pid, rss, self.max_memory)
                self._retire(c)
                w._process_replaced(c.pid, "max-memory-per-child", rss_kb=rss, tasks=c.done)
            elif self.current > self.size:  # the pool was shrunk while it worked
                self._retire(c)
            else:
                c.idle_since = time.monotonic()
                self.idle.append(c)

    def _retire(self, c: _Child):
        """Close its pipe (it exits at EOF) and reap it."""
        self._forget(c)
        status = self._reap_soon(c)
        log.debug("%s (pid %d) %s", c.label, c.pid, status)

    def _died(self, c: _Child):
        jobs = list(c.jobs)
        c.jobs.clear()
        self._forget(c)
        status = self._reap(c)
        w = self.w
        if jobs:
            job = jobs[0]
            log.error("Process %s (pid %d) %s while running %s[%s]", c.label, c.pid, status, job.name, job.task_id)
            w._lost_job(job, f"process {c.label} (pid {c.pid}) {status}")
            for job in jobs[1:]:  # queued behind it in a batch, never started: not their fault
                w._hand_back_job(job, "its pool process died before it started")
        elif not w._stopping:
            log.warning("Process %s (pid %d) %s", c.label, c.pid, status)

    def kill_job(self, job: _Job):
        """Hard time limit: SIGKILL the child that runs ``job``; maintain() starts another."""
        c = job.slot
        rest = [j for j in c.jobs if j is not job]
        c.jobs.clear()
        try:
            os.kill(c.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self._forget(c)
        self._reap(c)
        log.error("Process %s (pid %d) killed: hard time limit of %s[%s]", c.label, c.pid, job.name, job.task_id)
        for j in rest:  # queued behind it, never started
            self.w._hand_back_job(j, "its pool process was killed at a hard time limit")

    def soft_limit(self, job):
        pass  # children enforce soft limits themselves (SIGALRM)

    def drain(self):
        """Warm stop: children hand back the jobs they have not started."""
        for c in self.children.values():
            if len(c.jobs) > 1:
                try:
                    os.kill(c.pid, signal.SIGUSR1)
                except ProcessLookupError:
                    pass

    def maintain(self):
        """Start children up to the pool size (after deaths, retirements, time-limit kills).

        Called between poll() batches, never inside one, so a new child's socket cannot reuse
        the number of an fd that still has a stale event in the batch being handled.
        """
        while self.current < self.size and not self.w._stopping:
            self.spawn()

    def grow(self):
        self.size += 1
        log.info("autoscale: pool growing to %d processes", self.size)
        self.w._pool_resized(self.size - 1, self.size, "autoscale")

    def resize(self, delta: int, reason: str) -> int:
        """Grow or shrink by ``delta`` slots (at least one stays); busy children leave after their task."""
        old = self.size
        self.size = max(1, old + delta)
        while self.current > self.size and self.idle:
            self._retire(self.idle[-1])
        if self.size != old:
            log.info("pool %s to %d processes (%s)", "grown" if self.size > old else "shrunk", self.size, reason)
            self.w._pool_resized(old, self.size, reason)
        return self.size

    def pids(self) -> list:
        return sorted(c.pid for c in self.children.values())

    def shrink_idle(self, now, minimum, idle_for) -> float | None:
        """Retire one slot idle for ``idle_for`` s when above ``minimum``; return when to look again."""
        if self.size <= minimum or not self.idle:
            return None
        oldest = min(self.idle, key=lambda c: c.idle_since)
        due = oldest.idle_since + idle_for
        if due <= now:
            self.size -= 1
            self._retire(oldest)
            log.info("autoscale: pool shrunk to %d processes", self.size)
            self.w._pool_resized(self.size + 1, self.size, "autoscale")
            return now + idle_for
        return due

    def close(self, cold: bool):
        """Stop every child: SIGKILL (cold) or close its pipe and wait for it to exit."""
        children = list(self.children.values())
        for c in children:
            if cold:
                try:
                    os.kill(c.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            self._forget(c)
        for c in children:
            self._reap_soon(c)


_drain = False


def _on_drain(signum, frame):
    global _drain
    _drain = True


def _child_main(fd: int, w, label: str):
    """A pool process: read a batch of jobs, run them, write their outcomes; exit at EOF."""
    global _PROCESS_LABEL
    _PROCESS_LABEL = label
    runner = Runner(w.app, w.hostname, alarm=True)
    signal.signal(signal.SIGUSR1, _on_drain)
    w.app._client = None  # a child makes its own connection if a task publishes
    w.app._lock = threading.Lock()
    buf = bytearray()
    read = os.read
    loads = pickle.loads
    dumps = pickle.dumps
    pack = FRAME.pack
    clock = time.perf_counter
    while True:
        while len(buf) < 4 or len(buf) - 4 < FRAME.unpack_from(buf, 0)[0]:
            data = read(fd, 262144)
            if not data:
                return
            buf += data
        (n,) = FRAME.unpack_from(buf, 0)
        jobs = loads(buf[4: 4 + n])
        del buf[: 4 + n]
        out = []
        oldest = 0.0
        last = len(jobs) - 1
        for i, job in enumerate(jobs):
            runtime = None
            if _drain:
                outcome = None  # not started: the parent hands it back to brokerd
            else:
                t0 = clock()
                outcome = runner.execute(job)
                runtime = clock() - t0
            try:
                data = dumps((job[0], outcome, runtime), PICKLE)
            except Exception as exc:  # a value CBOR took but pickle does not: report it, don't die
                meta = exc_meta(EncodeError(f"result of task {job[2]} cannot cross to the worker process: {exc}"), w.hostname)
                data = dumps((job[0], (S_ACK, "FAILURE", None, meta, None, None), runtime), PICKLE)
            if not out:
                oldest = clock()
            out.append(pack(len(data)))
            out.append(data)
            if i == last or clock() - oldest >= OUTCOME_DELAY:
                _write_all(fd, b"".join(out))
                out = []


class _ThreadSlot:
    __slots__ = ("thread", "q", "job", "in_task", "lock", "abandoned", "ident", "idle_since", "index")


class ThreadPool:
    """N threads in the worker process; outcomes come back through the worker's inbox."""

    kind = "threads"

    def __init__(self, worker, size: int):
        self.w = worker
        self.size = size
        self.slots: list[_ThreadSlot] = []
        self.idle: list[_ThreadSlot] = []
        self._index = itertools.count(1)
        self.runner = Runner(worker.app, worker.hostname)

    def start(self):
        for _ in range(self.size):
            self.spawn()

    def spawn(self):
        import queue

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
        post = self.w._post
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
            self.w._job_started(job)
            s.q.put(job.to_runner(True))

    def drain(self):
        pass  # a thread holds one job at a time: nothing waits behind it

    def on_done(self, s: _ThreadSlot, seq, outcome, runtime=None):
        job = s.job
        if s.abandoned:
            return  # its job was settled already (hard time limit)
        s.job = None
        if job is not None and job.seq == seq:
            self.w._finish(job, outcome, runtime)
        s.idle_since = time.monotonic()
        if s in self.slots:
            if len(self.slots) > self.size:  # the pool was shrunk while it worked
                self.slots.remove(s)
                s.q.put(None)
            else:
                self.idle.append(s)

    def _inject(self, s: _ThreadSlot, job: _Job, exc_type) -> bool:
        with s.lock:
            if not s.in_task or s.job is not job:
                return False
            n = ctypes.pythonapi.PyThreadState_SetAsyncExc(ctypes.c_ulong(s.ident), ctypes.py_object(exc_type))
            return n == 1

    def soft_limit(self, job: _Job):
        self._inject(job.slot, job, SoftTimeLimitExceeded)

    def kill_job(self, job: _Job):
        s = job.slot
        self._inject(s, job, TimeLimitExceeded)
        s.abandoned = True
        s.job = None
        self.slots.remove(s)
        s.q.put(None)
        log.error("Thread %s left running its task %s[%s] past the hard time limit; replaced", s.thread.name, job.name, job.task_id)

    def maintain(self):
        while self.current < self.size and not self.w._stopping:
            self.spawn()

    def grow(self):
        self.size += 1
        log.info("autoscale: pool growing to %d threads", self.size)
        self.w._pool_resized(self.size - 1, self.size, "autoscale")

    def resize(self, delta: int, reason: str) -> int:
        """Grow or shrink by ``delta`` threads (at least one stays); busy ones leave after their task."""
        old = self.size
        self.size = max(1, old + delta)
        while len(self.slots) > self.size and self.idle:
            s = self.idle.pop()
            self.slots.remove(s)
            s.q.put(None)
        if self.size != old:
            log.info("pool %s to %d threads (%s)", "grown" if self.size > old else "shrunk", self.size, reason)
            self.w._pool_resized(old, self.size, reason)
        return self.size

    def shrink_idle(self, now, minimum, idle_for):
        if self.size <= minimum or not self.idle:
            return None
        oldest = min(self.idle, key=lambda s: s.idle_since)
        due = oldest.idle_since + idle_for
        if due <= now:
            self.size -= 1
            self.idle.remove(oldest)
            self.slots.remove(oldest)
            oldest.q.put(None)
            log.info("autoscale: pool shrunk to %d threads", self.size)
            self.w._pool_resized(self.size + 1, self.size, "autoscale")
            return now + idle_for
        return due

    def on_ready(self, fd):
        pass

    def close(self, cold: bool):
        for s in self.slots:
            s.q.put(None)
        if not cold:
            for s in self.slots:
                s.thread.join(CHILD_STOP_TIMEOUT)


# =============================================================================================
# The worker.
# =============================================================================================
_PROCESS_LABEL = "MainProcess"


class _LabelFilter(logging.Filter):
    def filter(self, record):
        record.processName = _PROCESS_LABEL
        return True


LOG_FORMAT = "[%(asctime)s: %(levelname)s/%(processName)s] %(message)s"
LOG_LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING, "warn": logging.WARNING,
              "error": logging.ERROR, "critical": logging.CRITICAL, "fatal": logging.CRITICAL}


def setup_logging(loglevel="info") -> None:
    """Log to stderr, one line per record, Celery's format; the root logger gets the level."""
    level = LOG_LEVELS[loglevel.lower()] if isinstance(loglevel, str) else int(loglevel)
    root = logging.getLogger()
    if not any(getattr(h, "_brokerd_worker", False) for h in root.handlers):
        h = logging.StreamHandler(sys.stderr)
        h.setFormatter(logging.Formatter(LOG_FORMAT))
        h.addFilter(_LabelFilter())
        h._brokerd_worker = True
        root.addHandler(h)
    root.setLevel(level)


def default_hostname(name: str | None = None) -> str:
    """``-n`` with Celery's %h (host), %n (host name part) and %d (domain part)."""
    host = socket.gethostname()
    name = name or "brokerd@%h"
    short, _, domain = host.partition(".")
    return name.replace("%h", host).replace("%n", short).replace("%d", domain).replace("%i", str(os.getpid()))


class Worker:
    """Consume tasks for ``app`` from brokerd and run them.  See the module docstring.

    ``Worker(app, queues=None, concurrency=None, pool="processes", prefetch_multiplier=1,
    max_tasks_per_child=None, autoscale=None, hostname=None, loglevel="info", *, grace=30.0,
    time_limit=None, soft_time_limit=None, broker=None, connect_timeout=10.0, task_events=None,
    heartbeat_interval=2.0, max_memory_per_child=None)``

    ``task_events``: send task-* events (default: the app's ``worker_send_task_events``, else
    on); worker-online/heartbeat/offline events are always sent, every ``heartbeat_interval``
    seconds.  ``max_memory_per_child`` (KiB, processes pool): a pool process whose resident
    memory is above it after a task is replaced.

    ``run()`` blocks until the worker is stopped (``stop()`` from another thread, or
    SIGTERM/SIGINT when ``run()`` is called in the main thread).  It returns after a warm stop,
    raises ``ColdStop`` after a cold one and ``BrokerUnreachable`` when brokerd cannot be
    reached at start within ``connect_timeout`` seconds.
    """

    def __init__(self, app, queues=None, concurrency=None, pool="processes", prefetch_multiplier=None,
                 max_tasks_per_child=None, autoscale=None, hostname=None, loglevel="info", *,
                 grace=DEFAULT_GRACE, time_limit=None, soft_time_limit=None, broker=None,
                 connect_timeout=CONNECT_TIMEOUT, configure_logging=True, task_events=None,
                 heartbeat_interval=HEARTBEAT_INTERVAL, max_memory_per_child=None):
        if pool == "prefork":
            pool = "processes"
        if pool not in ("processes", "threads", "trio"):
            raise ValueError(f"pool must be 'processes', 'threads' or 'trio' (got {pool!r})")
        self.app = app
        if isinstance(queues, str):
            queues = [q.strip() for q in queues.split(",") if q.strip()]
        self.queues = list(queues or [app.conf.task_default_queue])
        self.pool_kind = pool
        if autoscale:
            amax, amin = autoscale
            if amin > amax:
                raise ValueError(f"autoscale maximum ({amax}) must be at least its minimum ({amin})")
            concurrency = amax
            self.autoscale = (int(amax), int(amin))
        else:
            self.autoscale = None
        if concurrency is None:
            concurrency = app.conf.get("worker_concurrency") or DEFAULT_CONCURRENCY[pool]()
        if concurrency < 1:
            raise ValueError(f"concurrency must be at least 1 (got {concurrency})")
        self.concurrency = int(concurrency)
        if prefetch_multiplier is None:
            prefetch_multiplier = app.conf.get("worker_prefetch_multiplier") or 1
        self.prefetch_multiplier = int(prefetch_multiplier)
        self.prefetch = min(MAX_PREFETCH, max(1, self.concurrency * self.prefetch_multiplier))
        self.max_tasks_per_child = max_tasks_per_child or app.conf.get("worker_max_tasks_per_child")
        self.max_memory_per_child = max_memory_per_child or app.conf.get("worker_max_memory_per_child")
        if task_events is None:
            task_events = app.conf.get("worker_send_task_events", DEFAULT_TASK_EVENTS)
        self.task_events = bool(task_events)
        if not heartbeat_interval or heartbeat_interval <= 0:
            raise ValueError(f"heartbeat_interval must be a number of seconds > 0 (got {heartbeat_interval!r})")
        self.heartbeat_interval = float(heartbeat_interval)
        self.hostname = default_hostname(hostname)
        self.loglevel = loglevel
        self.grace = grace
        self.time_limit = time_limit
        self.soft_time_limit = soft_time_limit
        self.broker = broker or app.conf.broker_url
        if broker:
            app.conf.broker_url = broker  # tasks that send tasks (or a child's own client) use it too
        self.connect_timeout = connect_timeout
        self.configure_logging = configure_logging
        self.result_ttl = app.conf.get("result_expires")

        self._inbox: deque = deque()
        self._sleeping = False
        self._wake_r = self._wake_w = None
        self._stopping = False  # warm stop under way
        self._cold = False
        self._stop_event = threading.Event()
        self._channel: _Channel | None = None
        self._direct = None  # the consumer's delivery buffer, read by the main loop itself
        self._consumer = None
        self._client = None
        self._gen = 0
        self._sink: deque = deque()  # (what, error) of pipelined requests that failed
        self._orphans: list = []  # results to store once a connection is back
        self._ran_offline: set = set()  # ids of those, stored after a reconnect: don't run them twice
        self._backlog: deque[_Job] = deque()
        self._running: dict[int, _Job] = {}
        self._seq = itertools.count(1)
        self._limits_cache: dict = {}
        self._limited = False  # some task has a time limit: the main loop watches deadlines
        self._intake_thread = None
        self._intake_done = False
        self._fatal = None
        self._signals = 0
        self._grace_deadline = None
        self.poller = None
        self.pool = None
        self._post = self._post_sync
        self._trio_token = None
        self.exitcode = None
        self.ready = threading.Event()  # set once connected and consuming (tests, embedding)
        # events and the figures control requests and heartbeats report
        self._events: list = []  # events not sent yet (see EVENT_FLUSH_DELAY)
        self._events_due = 0.0  # monotonic time by which they must leave
        self._events_dropped = 0
        self._next_beat = 0.0  # monotonic time of the next worker-heartbeat
        self._processed = 0
        self._total: dict[str, int] = {}  # tasks run, by name (inspect stats)
        self._started_wall = time.time()
        self._pid = os.getpid()
        self._resized = {"grown": 0, "shrunk": 0}
        self._replaced = {"max-tasks-per-child": 0, "max-memory-per-child": 0}

    def __repr__(self):
        return f"<Worker {self.hostname} pool={self.pool_kind} c={self.concurrency} queues={self.queues}>"

    # -- public --------------------------------------------------------------------------------
    def run(self) -> None:
        if self.configure_logging:
            setup_logging(self.loglevel)
        if self.pool_kind == "trio":
            return self._run_trio()
        return self._run_sync()

    def stop(self, graceful: bool = True) -> None:
        """Ask the worker to stop (thread-safe; also what SIGTERM / SIGINT do)."""
        self._post(("stop", graceful))

    # -- the inbox ----------------------------------------------------------------------------
    def _post_sync(self, item) -> None:
        self._inbox.append(item)
        if self._sleeping:
            try:
                os.write(self._wake_w, b"!")
            except (OSError, TypeError):
                pass

    def _forget_parent_fds(self):
        """In a forked child: the parent's pipes and broker socket are not ours."""
        for fd in (self._wake_r, self._wake_w):
            if fd is not None:
                try:
                    os.close(fd)
                except OSError:
                    pass
        self._wake_r = self._wake_w = None
        c = self._client
        if c is not None:
            try:
                fd = c._sock.fileno()
                if fd >= 0:
                    devnull = os.open(os.devnull, os.O_RDWR)
                    os.dup2(devnull, fd)
                    os.close(devnull)
            except OSError:
                pass
        try:
            signal.set_wakeup_fd(-1)
        except (ValueError, OSError):
            pass

    def _on_signal(self, signum, frame):
        self._post(("signal", signum))

    # -- connection (intake thread) -----------------------------------------------------------
    def _connect(self, deadline=None):
        """A new Client, retrying with back-off; BrokerUnreachable after ``deadline`` (monotonic)."""
        from client.producer import Client

        delay = RECONNECT_FIRST
        attempt = 0
        while True:
            attempt += 1
            try:
                return Client(self.broker, name=f"worker {self.hostname} pid {os.getpid()}")
            except (BrokerdError, OSError) as exc:
                err = exc
            if self._stop_event.is_set():
                return None
            wait = delay * random.uniform(0.5, 1.0)
            if deadline is not None and time.monotonic() + wait > deadline:
                raise BrokerUnreachable(f"cannot reach brokerd at {self.broker} ({err}); tried {attempt} times")
            if attempt == 1 or attempt % 5 == 0:
                log.warning("cannot reach brokerd at %s (%s): retrying in %.2fs", self.broker, err, wait)
            if self._stop_event.wait(wait):
                return None
            delay = min(delay * 2, RECONNECT_MAX)

    def _intake(self, client):
        """Own the connection: consume, post deliveries, reconnect when it drops."""
        gen = 0
        try:
            while not self._stop_event.is_set():
                if client is None:
                    client = self._connect()
                    if client is None:
                        break
                    log.info("reconnected to brokerd at %s", self.broker)
                gen += 1
                try:
                    consumer = client.consume(self.queues, self.prefetch)
                except BrokerdError as exc:
                    log.error("cannot consume from %s: %s", ",".join(self.queues), exc)
                    self._close_quietly(client)
                    client = None
                    if self._stop_event.wait(RECONNECT_MAX):
                        break
                    continue
                direct = _hand_deliveries_to_main_loop(client, consumer, self._post)
                self._post(("connected", client, consumer, gen, direct))
                try:
                    if direct:
                        # The main loop takes deliveries from the consumer's buffer itself; this
                        # thread only waits for the connection to end (its reader thread exits).
                        client._reader.join()
                        with client._lock:
                            err = client._session.error
                        if isinstance(err, ConnectionClosed) or self._stop_event.is_set():
                            return
                        raise err if err is not None else ConnectionLost(None, "the client's reader stopped")
                    post = self._post
                    get = consumer.get
                    while True:
                        d = get()
                        if d is None:  # cancelled: a warm stop
                            return
                        post(("delivery", d, gen))
                except ConnectionClosed:
                    return
                except (ConnectionLost, Disconnected) as exc:
                    if self._stop_event.is_set():
                        return
                    log.warning("connection to brokerd lost (%s): reconnecting", exc)
                    self._post(("lost", gen))
                    self._close_quietly(client)
                    client = None
        except BaseException as exc:  # noqa: BLE001 - a bug: let the main loop stop rather than hang
            log.exception("worker intake thread crashed")
            self._post(("fatal", exc))
        finally:
            self._post(("intake-done",))

    @staticmethod
    def _close_quietly(client):
        try:
            client.close(timeout=1.0)
        except Exception:
            pass

    # -- receiving ----------------------------------------------------------------------------
    def _limits(self, task, env):
        """(acks_late, soft, hard) for a task, per-call options first."""
        opts = env.get("options")
        key = task.name
        cached = self._limits_cache.get(key) if not opts else None
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
            cached = self._limits_cache[key] = (acks_late, soft, hard)
        return cached

    def _received(self, d, gen):
        try:
            self._receive(d, gen)
        except Exception as exc:  # noqa: BLE001 - a bug or a case check_envelope missed costs this task only
            log.exception("could not take message %r from %s", d.id, d.queue)
            queued = self._backlog and self._backlog[-1].d is d
            ch = self._channel
            if not queued and not d.settled and ch is not None and gen == ch.gen:
                self._settle(d, ch, undecodable_outcome(d.id, d.queue, exc, self.hostname), d.id)

    def _receive(self, d, gen):
        if gen != self._gen:
            return  # from a connection that is gone: brokerd took it back
        ch = self._channel
        if self._stopping:
            self._settle(d, ch, (S_REQUEUE, None, None, None, None, None), d.id)
            return
        try:
            env = decode_envelope(d.body)
            check_envelope(env)  # fields of the wrong type fail this task here, not the main loop later
        except ValueError as exc:
            outcome = undecodable_outcome(d.id, d.queue, exc, self.hostname)
            if self.task_events:
                self._outcome_event(d.id, outcome, None)
            self._settle(d, ch, outcome, d.id)
            return
        name = env["task"]
        task = self.app.tasks.get(name)
        if task is None:
            outcome = unknown_outcome(env, self.app, self.hostname)
            if self.task_events:
                self._received_event(env, d)
                self._outcome_event(env["id"], outcome, None)
            self._settle(d, ch, outcome, env["id"])
            return
        task_id = env["id"]
        if task_id in self._ran_offline and d.redelivered:
            # It finished while brokerd was unreachable and its result was stored after the
            # reconnect: this is brokerd redelivering it, so settle it without running it again.
            self._ran_offline.discard(task_id)
            log.info("Task %s[%s] already ran (result stored after reconnecting): acked", name, task_id)
            ch.ack(d)
            return
        expires = env.get("expires")
        if self.task_events:
            self._received_event(env, d)
        if expires is not None and time.time() >= expires:
            log.info("Discarding revoked task: %s[%s] (expired)", name, task_id)
            meta = {"reason": "expired", "expires": expires, "hostname": self.hostname}
            outcome = (S_ACK, "REVOKED", None, meta, None, None)
            if self.task_events:
                self._outcome_event(task_id, outcome, None)
            self._settle(d, ch, outcome, task_id)
            return
        if log.isEnabledFor(logging.INFO):
            log.info("Task %s[%s] received", name, task_id)
        acks_late, soft, hard = self._limits(task, env)
        job = _Job()
        job.seq = next(self._seq)
        job.d = d
        job.gen = gen
        job.task_id = task_id
        job.name = name
        job.env = env
        job.soft = soft
        job.hard = hard
        job.deadline = None
        job.soft_deadline = None
        job.slot = None
        job.soft_sent = False
        job.started = None
        if soft or hard:
            self._limited = True
        if not acks_late:
            ch.ack(d)
        self._backlog.append(job)

    # -- settling -----------------------------------------------------------------------------
    def _finish(self, job: _Job, outcome, runtime=None):
        self._running.pop(job.seq, None)
        self._processed += 1
        total = self._total
        total[job.name] = total.get(job.name, 0) + 1
        if self.task_events:
            if runtime is None and job.started is not None:
                runtime = time.time() - job.started
            self._outcome_event(job.task_id, outcome, runtime)
        ch = self._channel
        if ch is None or job.gen != ch.gen:
            # Its connection is gone, so brokerd redelivers the message; keep the result.
            state = outcome[1]
            if state in ("SUCCESS", "FAILURE"):
                self._store_later(job.task_id, state, outcome[2], outcome[3])
            return
        self._settle(job.d, ch, outcome, job.task_id)
        env = job.env
        if env and outcome[1] in ("SUCCESS", "FAILURE") and (env.get("chain") or env.get("link") or env.get("link_error")):
            self._continue_workflow(env, outcome)

    def _continue_workflow(self, env, outcome):
        """Send what a workflow does next: chain step, link callbacks (client.canvas.after_task)."""
        from client.canvas import after_task

        try:
            if self._channel is not None:
                self._channel.flush()  # this task's own result first, then what follows from it
            after_task(self.app, env, outcome[1], outcome[2], outcome[3])
        except Exception as exc:
            log.error("could not continue the workflow of %s[%s]: %s", env.get("task"), env.get("id"), exc)

    def _on_control(self, payload):
        """A CONTROL frame from brokerd: a control request (``control``, ``args``, ``reply_id``:
        answered with CONTROL_REPLY), or ``revoke`` + ``terminate``, which kills running tasks."""
        if not isinstance(payload, dict):
            return
        command = payload.get("control")
        if isinstance(command, str):
            self._control_request(command, payload.get("args") or {}, payload.get("reply_id"))
            return
        if not payload.get("terminate"):
            return
        ids = set(payload.get("revoke") or ())
        kill = getattr(self.pool, "kill_job", None)
        for job in list(self._running.values()):
            if job.task_id in ids and job.slot is not None and kill is not None:
                log.warning("Terminating task %s[%s]: revoked", job.name, job.task_id)
                self._running.pop(job.seq, None)
                kill(job)
                meta = {"exc_type": "TaskRevokedError", "exc_message": f"task {job.task_id} was revoked and terminated",
                        "hostname": self.hostname}
                self._finish(job, (S_ACK, "REVOKED", None, meta, None, None))

    def _settle(self, d, ch, outcome, task_id):
        settle, state, value, meta, delay, retries = outcome
        try:
            if settle == S_ACK:
                if state is None:
                    if not d.settled:
                        ch.ack(d)
                else:
                    ch.result(None if d.settled else d, task_id, state, value, meta)
            elif settle == S_RETRY:
                ch.result(None, task_id, state, value, meta)
                headers = dict(d.headers or {})
                headers["retries"] = retries
                if d.settled:  # acks_late=False: it was acked on receipt, so publish it again
                    ch.publish(d.queue, d.body, priority=d.priority, delay=delay or None, headers=headers, id=task_id)
                else:
                    ch.nack(d, True, delay or 0.0001, headers)  # > 0: an explicit retry, not an attempt
            else:
                if state is not None:
                    ch.result(None, task_id, state, value, meta)
                if not d.settled:
                    ch.nack(d, settle == S_REQUEUE)
        except Disconnected:
            if state in ("SUCCESS", "FAILURE"):
                self._store_later(task_id, state, value, meta)
        except BrokerdError as exc:
            log.warning("could not settle task %s with brokerd: %s", task_id, exc)

    def _store_later(self, task_id, state, value, meta):
        self._orphans.append((task_id, state, value, meta))

    def _hand_back_job(self, job: _Job, reason: str = "worker stopping"):
        """A job that never started goes back to brokerd (nack with requeue)."""
        self._running.pop(job.seq, None)
        if self.task_events:
            self._emit({"type": "task-rejected", "uuid": job.task_id, "ts": time.time(), "requeue": True,
                        "reason": f"handed back unstarted ({reason})"})
        ch = self._channel
        if ch is not None and job.gen == ch.gen and not job.d.settled:
            try:
                ch.nack(job.d, True)
            except BrokerdError:
                pass

    def _lost_job(self, job: _Job, why: str = "its process died"):
        """Its process died mid-task.  The death counts as one retry: redelivered after a backoff
        (LOST_BACKOFF_FIRST doubling to LOST_BACKOFF_MAX) with the ``retries`` header raised, and past
        the task's max_retries stored as FAILURE WorkerLostError and dead-lettered, so ``get()`` returns.
        A task acked on receipt (acks_late=False) cannot be redelivered: FAILURE at once."""
        ch = self._channel
        if ch is None or job.gen != ch.gen:
            self._running.pop(job.seq, None)
            return  # its connection is gone: brokerd has taken the message back already
        d = job.d
        hdrs = d.headers
        retries = hdrs.get("retries") if hdrs else None
        if type(retries) is not int or retries < 0:
            retries = job.env.get("retries") or 0
        task = self.app.tasks.get(job.name)
        bound = getattr(task, "max_retries", None)
        if type(bound) is not int:
            bound = LOST_RETRIES_DEFAULT
        if d.settled or retries >= bound:
            done = f"{retries + 1} times" if not d.settled else "once; it was acked on receipt (acks_late=False)"
            exc = WorkerLostError(f"Worker exited prematurely: {why} (the task's process died {done}; "
                                  f"max_retries is {bound})")
            log.error("Task %s[%s] raised unexpected: %r", job.name, job.task_id, exc)
            meta = exc_meta(exc, self.hostname, tb=None)
            meta["traceback"] = None
            self._finish(job, (S_REJECT, "FAILURE", None, meta, None, None))
            return
        delay = min(LOST_BACKOFF_MAX, LOST_BACKOFF_FIRST * 2 ** min(retries, 16))
        exc = WorkerLostError(f"Worker exited prematurely: {why}")
        log.warning("Task %s[%s] retry: Retry in %gs: %r", job.name, job.task_id, delay, exc)
        meta = exc_meta(exc, self.hostname, tb=None)
        meta["traceback"] = None
        self._finish(job, (S_RETRY, "RETRY", None, meta, delay, retries + 1))

    def _check_sink(self):
        sink = self._sink
        while sink:
            what, err = sink.popleft()
            if isinstance(err, Disconnected):
                if what[0] == "result" and what[2] in ("SUCCESS", "FAILURE", "REVOKED"):
                    self._store_later(*what[1:])
                continue
            if getattr(err, "code", None) == "STALE_DELIVERY":
                log.warning("brokerd had already taken back %s %r (reservation timeout?): %s", what[0], what[1], err)
            else:
                log.warning("brokerd refused %s of %r: %s", what[0], what[1], err)

    def _store_orphans(self):
        ch = self._channel
        if ch is None or not self._orphans:
            return
        orphans, self._orphans = self._orphans, []
        for task_id, state, value, meta in orphans:
            try:
                ch.result(None, task_id, state, value, meta)
            except Disconnected:
                self._orphans.append((task_id, state, value, meta))
            else:
                if len(self._ran_offline) < RAN_OFFLINE_MAX:
                    self._ran_offline.add(task_id)
        log.info("stored %d results of tasks that finished while brokerd was unreachable", len(orphans))

    # -- task and worker events (protocol.md §5.29) -------------------------------------------
    def _emit(self, ev: dict) -> None:
        """Queue one event; it leaves within EVENT_FLUSH_DELAY, in one EMIT_EVENTS frame with the others."""
        evs = self._events
        if not evs:
            self._events_due = time.monotonic() + EVENT_FLUSH_DELAY
        elif len(evs) >= MAX_PENDING_EVENTS:  # brokerd unreachable for long: keep the newest half
            n = len(evs) // 2
            del evs[:n]
            self._events_dropped += n
        evs.append(ev)

    def _received_event(self, env, d) -> None:
        hdrs = d.headers
        retries = hdrs.get("retries") if hdrs else None
        if type(retries) is not int:
            retries = env.get("retries") or 0
        ev = {"type": "task-received", "uuid": env["id"], "ts": time.time(), "name": env["task"],
              "args": _event_repr(tuple(env["args"])), "kwargs": _event_repr(env["kwargs"]),
              "queue": d.queue, "retries": retries}
        parent = env.get("parent_id")
        if parent:
            ev["parent_id"] = parent
            ev["root_id"] = env.get("root_id")
        eta = env.get("eta")
        if eta is not None:
            ev["eta"] = eta
        self._emit(ev)

    def _job_started(self, job: _Job) -> None:
        """``job`` starts running now (its slot took it)."""
        job.started = t = time.time()
        pid = getattr(job.slot, "pid", None) or self._pid
        if self.task_events:
            self._emit({"type": "task-started", "uuid": job.task_id, "ts": t, "pid": pid})
        task = self.app.tasks.get(job.name) if job.name else None
        track = getattr(task, "track_started", None)
        if track is None:
            track = self.app.conf.get("task_track_started", False)
        if track and self._channel is not None and job.gen == self._channel.gen:
            # Celery's track_started: the state is STARTED until the final result
            # replaces it; pipelined with the other results of this loop turn.
            try:
                self._channel.result(None, job.task_id, "STARTED", None, {"hostname": self.hostname, "pid": pid})
            except BrokerdError:
                pass

    def _outcome_event(self, task_id, outcome, runtime) -> None:
        settle, state, value, meta = outcome[0], outcome[1], outcome[2], outcome[3]
        ev = {"type": None, "uuid": task_id, "ts": time.time()}
        if settle == S_RETRY:
            ev["type"] = "task-retried"
            ev["exception"] = _exception_text(meta)
            ev["delay"] = outcome[4]
        elif state == "FAILURE":
            ev["type"] = "task-failed"
            ev["exception"] = _exception_text(meta)
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
                ev["result"] = _event_repr(value)
        else:
            ev["type"] = "task-rejected"
            ev["requeue"] = settle == S_REQUEUE
        self._emit(ev)

    def _worker_event(self, kind: str, **fields) -> None:
        fields["type"] = kind
        fields["ts"] = time.time()
        self._emit(fields)
        self._events_due = 0.0  # worker events go at once (with the task events waiting)

    def _online_info(self) -> dict:
        try:
            from importlib.metadata import version as _version

            version = _version("brokerd")
        except Exception:  # not installed as a distribution (a source checkout)
            version = None
        return {
            "freq": self.heartbeat_interval, "pid": self._pid, "pool": self.pool_kind,
            "pool_size": self.pool.size if self.pool is not None else self.concurrency,
            "concurrency": self.concurrency, "prefetch": self.prefetch, "queues": list(self.queues),
            "autoscale": list(self.autoscale) if self.autoscale else None,
            "max_tasks_per_child": self.max_tasks_per_child, "max_memory_per_child": self.max_memory_per_child,
            "task_events": self.task_events, "sw_ident": "brokerd-worker", "sw_ver": version,
            "active": len(self._running), "processed": self._processed,
        }

    def _heartbeat(self) -> None:
        try:
            load = [round(x, 2) for x in os.getloadavg()]
        except OSError:
            load = None
        self._worker_event(
            "worker-heartbeat", freq=self.heartbeat_interval, active=len(self._running),
            reserved=len(self._backlog), processed=self._processed,
            pool_size=self.pool.size if self.pool is not None else self.concurrency, loadavg=load,
            pool_grown=self._resized["grown"], pool_shrunk=self._resized["shrunk"],
            replaced_max_tasks=self._replaced["max-tasks-per-child"],
            replaced_max_memory=self._replaced["max-memory-per-child"],
            events_dropped=self._events_dropped,
        )

    def _pool_resized(self, old: int, new: int, reason: str) -> None:
        self._resized["grown" if new > old else "shrunk"] += 1
        self._worker_event("worker-pool-resized", old=old, size=new, reason=reason)

    def _process_replaced(self, pid: int, reason: str, rss_kb=None, tasks=None) -> None:
        self._replaced[reason] = self._replaced.get(reason, 0) + 1
        self._worker_event("worker-process-replaced", pid=pid, reason=reason, rss_kb=rss_kb, tasks=tasks)

    def _flush_channel(self, force: bool = False) -> None:
        """Send what this turn buffered (results, acks, nacks) in one write, with the pending events
        once they are due (``_events_due``) or ``force``."""
        ch = self._channel
        if ch is None:
            return
        try:
            evs = self._events
            if evs and (force or len(evs) >= EVENT_FLUSH_MAX or time.monotonic() >= self._events_due):
                self._events = []
                ch.events(self.hostname, evs)
            ch.flush()
        except BrokerdError:
            pass

    def _events_wait(self, now: float, timeout):
        """The loop's sleep, shortened so that pending events leave when due."""
        if not self._events:
            return timeout
        left = max(0.0, self._events_due - now)
        return left if timeout is None or left < timeout else timeout

    def _beat_if_due(self, now: float) -> float:
        """Send a worker-heartbeat when due; return seconds until the next one."""
        if now >= self._next_beat:
            if self._channel is not None:
                self._heartbeat()
            self._next_beat = now + self.heartbeat_interval
        return self._next_beat - now

    # -- remote control (protocol.md §5.34) --------------------------------------------------------
    def _control_request(self, command: str, args: dict, reply_id) -> None:
        handler = getattr(self, "_ctl_" + command, None) if command.isidentifier() else None
        if handler is None:
            reply = {"error": f"unknown control command {command!r}; this worker knows: "
                              + ", ".join(sorted(n[5:] for n in dir(self) if n.startswith("_ctl_")))}
        else:
            try:
                reply = handler(args if isinstance(args, dict) else {})
            except Exception as exc:  # noqa: BLE001 - a bad request must not stop the worker
                reply = {"error": f"{type(exc).__name__}: {exc}"}
        ch = self._channel
        if type(reply_id) is int and ch is not None:
            try:
                ch.control_reply(reply_id, reply)
            except BrokerdError:
                pass
        if command == "shutdown" and "error" not in reply:
            log.warning("shutdown requested by a control command: warm stop")
            self._flush_channel(force=True)  # the reply goes out before the consumer is cancelled
            self._begin_stop()

    def _ctl_ping(self, args):
        return {"ok": "pong"}

    def _ctl_active(self, args):
        return [
            {"id": job.task_id, "name": job.name, "args": _event_repr(tuple(job.env["args"])),
             "kwargs": _event_repr(job.env["kwargs"]), "queue": job.d.queue, "time_start": job.started,
             "worker_pid": getattr(job.slot, "pid", None) or self._pid, "hostname": self.hostname,
             "attempts": job.d.attempts}
            for job in sorted(self._running.values(), key=lambda j: j.seq) if job.started is not None
        ]

    def _ctl_registered(self, args):
        return sorted(n for n in self.app.tasks if not n.startswith("brokerd."))

    def _ctl_stats(self, args):
        import resource

        ru = resource.getrusage(resource.RUSAGE_SELF)
        pool = self.pool
        return {
            "hostname": self.hostname, "pid": self._pid, "uptime": round(time.time() - self._started_wall, 3),
            "broker": self.broker, "queues": list(self.queues), "prefetch": self.prefetch,
            "pool": {
                "implementation": self.pool_kind, "size": pool.size if pool is not None else self.concurrency,
                "max-concurrency": self.concurrency,
                "processes": pool.pids() if hasattr(pool, "pids") else [],
                "autoscale": list(self.autoscale) if self.autoscale else None,
                "max-tasks-per-child": self.max_tasks_per_child,
                "max-memory-per-child": self.max_memory_per_child,
            },
            "total": dict(self._total), "processed": self._processed, "active": len(self._running),
            "reserved": len(self._backlog), "pool_resized": dict(self._resized), "replaced": dict(self._replaced),
            "task_events": self.task_events, "heartbeat_interval": self.heartbeat_interval,
            "events_dropped": self._events_dropped,
            "rusage": {"utime": ru.ru_utime, "stime": ru.ru_stime, "maxrss_kb": ru.ru_maxrss},
        }

    @staticmethod
    def _ctl_n(command, args):
        """The ``n`` of pool_grow/pool_shrink: a whole number >= 1 (default 1), or None and an error."""
        n = args.get("n", 1)
        if type(n) is not int or n < 1:
            return None, {"error": f"{command} needs n, a whole number of pool slots >= 1 (got {_shown(n)})"}
        return n, None

    def _ctl_pool_grow(self, args):
        # Capped: one CONTROL with n=20 used to fork 20 processes at once.  The ceiling is the autoscale
        # maximum, or the concurrency the worker was started with (-c) without autoscale: the consumer's
        # prefetch is set from it, so slots past it could never get a task anyway.
        n, err = self._ctl_n("pool_grow", args)
        if err:
            return err
        cap = self.concurrency  # the autoscale maximum when autoscaling (see __init__)
        size = self.pool.size
        what = "the autoscale maximum" if self.autoscale else "the worker's concurrency (-c)"
        room = cap - size
        if room <= 0:
            return {"ok": f"pool unchanged at {size}: already at its maximum, {what} of {cap}", "size": size}
        size = self.pool.resize(min(n, room), "control")
        if n > room:
            return {"ok": f"pool grown to {size} (capped at {what} of {cap}; {n} more were asked for)", "size": size}
        return {"ok": f"pool grown to {size}", "size": size}

    def _ctl_pool_shrink(self, args):
        n, err = self._ctl_n("pool_shrink", args)
        if err:
            return err
        size = self.pool.resize(-n, "control")
        return {"ok": f"pool shrunk to {size}", "size": size}

    def _ctl_shutdown(self, args):
        return {"ok": "shutting down (warm)"}

    # -- events (both loops) ------------------------------------------------------------------
    def _event(self, ev):
        kind = ev[0]
        if kind == "delivery":
            self._received(ev[1], ev[2])
        elif kind == "done":
            self.pool.on_done(ev[1], ev[2], ev[3], ev[4])
        elif kind == "poke":
            self._take_deliveries()
        elif kind == "connected":
            _, client, consumer, gen, direct = ev
            self._client = client
            self._consumer = consumer
            self._direct = consumer._state.buffer if direct else None
            self._gen = gen
            self._channel = _Channel(client, gen, self._sink, self.result_ttl)
            # CONTROL broadcasts (revoke with terminate) arrive in the client's reader thread
            client.control_handlers.append(lambda payload: self._post(("control", payload)))
            self._worker_event("worker-online", **self._online_info())
            self._next_beat = time.monotonic() + self.heartbeat_interval
            self.ready.set()
            if gen == 1:
                log.info("%s ready: consuming %s (prefetch %d, pool %s x %d)", self.hostname, ",".join(self.queues),
                         self.prefetch, self.pool_kind, self.concurrency)
            self._store_orphans()
            if self._stopping:
                self._cancel_consumer()
            self._take_deliveries()
        elif kind == "lost":
            if ev[1] == self._gen:
                self._channel = None
                self._consumer = None
                self._direct = None
                self.ready.clear()
                dropped = len(self._backlog)
                self._backlog.clear()
                if dropped:
                    log.info("dropped %d waiting tasks of the lost connection (brokerd redelivers them)", dropped)
        elif kind == "signal":
            self._signals += 1
            name = signal.Signals(ev[1]).name
            if self._signals == 1:
                log.warning("%s received: warm stop (running tasks get %gs; again for a cold stop)", name, self.grace)
                self._begin_stop()
            else:
                log.warning("%s received again: cold stop", name)
                self._cold = True
        elif kind == "stop":
            if ev[1] and not self._stopping:
                log.info("stop requested: warm stop")
                self._begin_stop()
            elif not ev[1]:
                self._cold = True
        elif kind == "tick":
            pass
        elif kind == "control":
            self._on_control(ev[1])
        elif kind == "intake-done":
            self._intake_done = True
        elif kind == "fatal":
            self._fatal = ev[1]
            self._cold = True

    def _take_deliveries(self):
        """Deliveries the client buffered for our consumer (the direct path; see _intake)."""
        buf = self._direct
        if buf:
            gen = self._gen
            received = self._received
            while buf:
                received(buf.popleft(), gen)

    def _begin_stop(self):
        if self._stopping:
            return
        self._stopping = True
        self._stop_event.set()
        self._grace_deadline = time.monotonic() + self.grace
        self._cancel_consumer()
        self._hand_back()
        if self.pool is not None:
            self.pool.drain()

    def _cancel_consumer(self):
        c = self._consumer
        if c is not None:
            try:
                c.cancel()  # gives back what the client received but did not hand out
            except BrokerdError:
                pass

    def _hand_back(self):
        """Deliveries received but not started go back to brokerd now."""
        ch = self._channel
        n = 0
        while self._backlog:
            job = self._backlog.popleft()
            if ch is not None and job.gen == ch.gen and not job.d.settled:
                try:
                    ch.nack(job.d, True)
                    n += 1
                except BrokerdError:
                    pass
                if self.task_events:
                    self._emit({"type": "task-rejected", "uuid": job.task_id, "ts": time.time(), "requeue": True,
                                "reason": "handed back unstarted (worker stopping)"})
        if n:
            log.info("handed %d waiting tasks back to brokerd", n)

    # -- the synchronous main loop (processes, threads) ----------------------------------------
    def _run_sync(self):
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_r, False)
        os.set_blocking(self._wake_w, False)
        self.poller = select.poll()
        self.poller.register(self._wake_r, select.POLLIN)
        if self.pool_kind == "processes":
            self.pool = ProcessPool(self, self.concurrency if not self.autoscale else max(self.autoscale[1], 1),
                                    self.max_tasks_per_child, self.max_memory_per_child)
        else:
            self.pool = ThreadPool(self, self.concurrency if not self.autoscale else max(self.autoscale[1], 1))
        main = threading.current_thread() is threading.main_thread()
        old = {}
        if main:
            for sig in (signal.SIGTERM, signal.SIGINT):
                old[sig] = signal.signal(sig, self._on_signal)
        try:
            self.pool.start()  # fork before any thread exists: children inherit no locks held
            try:
                client = self._connect(deadline=time.monotonic() + self.connect_timeout)
            except BrokerUnreachable:
                self.pool.close(cold=True)
                raise
            if client is None:  # stopped while connecting
                self.pool.close(cold=True)
                return
            self._client = client
            self._intake_thread = threading.Thread(target=self._intake, args=(client,), name="brokerd-intake", daemon=True)
            self._intake_thread.start()
            self._loop()
        finally:
            for sig, h in old.items():
                signal.signal(sig, h)
            os.close(self._wake_r)
            os.close(self._wake_w)
            self._wake_r = self._wake_w = None
        if self._fatal is not None:
            raise self._fatal
        if self._cold:
            raise ColdStop("cold stop: running tasks were not waited for; brokerd redelivers them")

    def _loop(self):
        inbox = self._inbox
        pool = self.pool
        backlog = self._backlog
        running = self._running
        poller = self.poller
        wake_r = self._wake_r
        event = self._event
        autoscale = self.autoscale
        has_deadlines = False
        next_shrink = None
        while True:
            while inbox:
                event(inbox.popleft())
            if self._sink:
                self._check_sink()
            if self._cold:
                break
            if pool.current < pool.size:
                pool.maintain()
            if backlog:
                if self._stopping:
                    self._hand_back()
                else:
                    pool.dispatch(backlog, running, time.monotonic())
                    if self._limited:
                        has_deadlines = True
                    if backlog and autoscale and pool.size < autoscale[0]:
                        pool.grow()
                        continue
            if self._stopping and not running:
                break
            # How long may we sleep?
            timeout = None
            now = None
            if has_deadlines:
                now = time.monotonic()
                t = self._check_deadlines(now)
                has_deadlines = t is not None
                if t is not None:
                    timeout = t - now
            if autoscale:
                now = now or time.monotonic()
                next_shrink = pool.shrink_idle(now, autoscale[1], AUTOSCALE_IDLE)
                if next_shrink is not None:
                    timeout = min(timeout, next_shrink - now) if timeout is not None else next_shrink - now
            if self._stopping:
                now = now or time.monotonic()
                left = self._grace_deadline - now
                if left <= 0:
                    log.error("grace period of %gs is over with %d tasks still running: cold stop", self.grace, len(running))
                    self._cold = True
                    break
                timeout = min(timeout, left) if timeout is not None else left
            now = now or time.monotonic()
            beat = self._beat_if_due(now)
            timeout = self._events_wait(now, min(timeout, beat) if timeout is not None else beat)
            # Send what this turn buffered (results, acks, nacks, events): one write for the batch.
            self._flush_channel()
            # Sleep until a child writes, a delivery or signal arrives, or a timer is due.
            self._sleeping = True
            if inbox:
                self._sleeping = False
                continue
            events = poller.poll(None if timeout is None else max(0, int(timeout * 1000) + 1))
            self._sleeping = False
            for fd, _ in events:
                if fd == wake_r:
                    try:
                        while os.read(wake_r, 4096):
                            pass
                    except BlockingIOError:
                        pass
                else:
                    pool.on_ready(fd)
        self._shutdown()

    def _check_deadlines(self, now):
        """Fire time limits that are due; return the next deadline (or None)."""
        nxt = None
        for job in list(self._running.values()):
            if job.soft_deadline is not None and not job.soft_sent:
                if job.soft_deadline <= now:
                    job.soft_sent = True
                    log.warning("Soft time limit (%gs) exceeded for %s[%s]", job.soft, job.name, job.task_id)
                    self.pool.soft_limit(job)
                elif nxt is None or job.soft_deadline < nxt:
                    nxt = job.soft_deadline
            if job.deadline is not None:
                if job.deadline <= now:
                    log.error("Hard time limit (%gs) exceeded for %s[%s]", job.hard, job.name, job.task_id)
                    self._running.pop(job.seq, None)
                    self.pool.kill_job(job)
                    exc = TimeLimitExceeded(f"task {job.name}[{job.task_id}] ran past its hard time limit of {job.hard:g}s")
                    meta = exc_meta(exc, self.hostname, tb="")
                    self._finish(job, (S_ACK, "FAILURE", None, meta, None, None))
                elif nxt is None or job.deadline < nxt:
                    nxt = job.deadline
        return nxt

    def _shutdown(self):
        cold = self._cold
        self._stop_event.set()
        self.pool.close(cold=cold)
        self._check_sink()
        client = self._client
        if client is not None:
            self._worker_event("worker-offline")
            self._flush_channel(force=True)
            self._close_quietly(client)
        if self._intake_thread is not None:
            self._intake_thread.join(2.0)
        if self._orphans:
            log.warning("%d results could not be stored (brokerd unreachable); their tasks will run again", len(self._orphans))
        log.info("%s stopped (%s)", self.hostname, "cold" if cold else "warm")

    # -- the trio loop --------------------------------------------------------------------------
    def _run_trio(self):
        import trio

        self.pool = _TrioPool(self)
        try:
            client = self._connect(deadline=time.monotonic() + self.connect_timeout)
        except BrokerUnreachable:
            raise
        if client is None:
            return
        self._client = client
        trio.run(self._trio_main, client)
        if self._fatal is not None:
            raise self._fatal
        if self._cold:
            raise ColdStop("cold stop: running tasks were cancelled; brokerd redelivers them")

    async def _trio_main(self, client):
        import trio

        token = trio.lowlevel.current_trio_token()
        send, recv = trio.open_memory_channel(float("inf"))
        self._trio_send = send

        def post(item, _soon=token.run_sync_soon, _send=send.send_nowait):
            try:
                _soon(_send, item)
            except trio.RunFinishedError:
                pass

        self._post = post
        main = threading.current_thread() is threading.main_thread()
        async with trio.open_nursery() as nursery:
            self.pool.nursery = nursery
            if main:
                nursery.start_soon(self._trio_signals)
            self._intake_thread = threading.Thread(target=self._intake, args=(client,), name="brokerd-intake", daemon=True)
            self._intake_thread.start()
            pool = self.pool
            backlog = self._backlog
            while True:
                if self._cold:
                    break
                if self._stopping and not self._running and not backlog:
                    break
                timeout = float("inf")
                if self._stopping:
                    timeout = self._grace_deadline - time.monotonic()
                    if timeout <= 0:
                        log.error("grace period of %gs is over with %d tasks still running: cold stop",
                                  self.grace, len(self._running))
                        self._cold = True
                        break
                now = time.monotonic()
                timeout = self._events_wait(now, min(timeout, self._beat_if_due(now)))
                with trio.move_on_after(timeout):
                    ev = await recv.receive()
                    self._event(ev)
                    while True:  # drain without yielding between events
                        try:
                            ev = recv.receive_nowait()
                        except trio.WouldBlock:
                            break
                        self._event(ev)
                if self._stopping:
                    self._hand_back()
                while backlog and pool.has_idle():
                    job = backlog.popleft()
                    self._running[job.seq] = job
                    pool.submit(job)
                self._flush_channel()
            nursery.cancel_scope.cancel()
        self._post = self._post_sync
        await trio.to_thread.run_sync(self._shutdown_trio)

    def _shutdown_trio(self):
        self._stop_event.set()
        self._check_sink()
        client = self._client
        if client is not None:
            self._worker_event("worker-offline")
            self._flush_channel(force=True)
            self._close_quietly(client)
        if self._intake_thread is not None:
            self._intake_thread.join(2.0)
        log.info("%s stopped (%s)", self.hostname, "cold" if self._cold else "warm")

    async def _trio_signals(self):
        import trio

        with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as sigs:
            async for signum in sigs:
                self._post(("signal", signum))


class _TrioPool:
    """Up to ``concurrency`` tasks at once on the trio loop (``def`` tasks in trio's threads)."""

    kind = "trio"

    def __init__(self, worker):
        self.w = worker
        self.runner = Runner(worker.app, worker.hostname)
        self.running = 0
        self.size = worker.concurrency
        self.nursery = None

    def has_idle(self) -> bool:
        return self.running < self.size

    def resize(self, delta: int, reason: str) -> int:
        old = self.size
        self.size = max(1, old + delta)
        if self.size != old:
            log.info("pool %s to %d tasks at once (%s)", "grown" if self.size > old else "shrunk", self.size, reason)
            self.w._pool_resized(old, self.size, reason)
        return self.size

    def submit(self, job: _Job):
        self.running += 1
        self.w._job_started(job)
        self.nursery.start_soon(self._run, job)

    async def _run(self, job: _Job):
        import trio

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
        w._finish(job, outcome, time.perf_counter() - t0)
        w._flush_channel()
        # wake the main loop so that it dispatches the next job
        w._trio_send.send_nowait(("tick",))

    def on_done(self, *a):
        pass

    def drain(self):
        pass  # jobs not started are in the worker's backlog, handed back by the main loop
