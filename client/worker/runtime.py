"""The worker: one connection to brokerd, one consumer, a pool, and the main loop that joins them.

**One connection, one consumer.**  The parent process holds the only broker connection (a
blocking ``client.producer.Client``, driven through ``channel``) and one consumer over every
queue, in preference order.  Its prefetch credit adapts (``credit``): from concurrency while tasks
run long up to concurrency x 64 while they finish in less than a round trip; ``prefetch_multiplier``
given explicitly fixes it at concurrency x M.  brokerd never sends more than the credit, so the
worker's buffer is bounded, and the consumer declares its ``slots`` (the concurrency): when another
worker of the queue sits idle, brokerd sends RECALL and this worker releases deliveries it has not
started (``_on_recall``), so a long task never hides short ones behind it.

**Threads in the parent.**  The *intake* thread (``intake``) owns the connection's life.  The
*main loop* takes deliveries straight from the consumer's buffer (an inbox: a deque plus a
wake-up pipe that is written only while the main loop sleeps, so a busy loop makes no syscall per
delivery), decodes each envelope, hands tasks to free pool slots, applies their outcomes, and
watches time limits.  It blocks in ``poll()`` on the inbox pipe and the children's sockets and
pidfds; there is no polling sleep anywhere on the hot path.  The loops live in their own modules
(``mainloop`` for processes and threads, ``trio_loop`` for trio) and drive this class through its
public loop interface (``event()``, ``hand_back()``, ``shutdown()``, ...); what an event means is
decided here.

**Outcomes.**  Whatever process runs the task computes its outcome (``runner``); the main loop
applies it: SUCCESS/FAILURE are stored and the delivery acked in one RESULT_SET (one log record on
the broker, so "result stored" and "message done" cannot be split by a crash); a retry stores
RETRY and nacks with a delay and a ``retries`` header (brokerd holds the task, not the worker);
``Reject`` nacks, ``Ignore`` acks.  Settling is pipelined: the frames are buffered and sent once
per loop turn, so a burst of results costs one write.  A pool process that dies mid-task counts
as one retry of it (``outcome.lost_outcome``).

**Stopping.**  First SIGTERM/SIGINT (or ``stop()``): warm stop.  The consumer is cancelled,
deliveries received but not started are handed back at once (nack with requeue; they are not
failures, but brokerd counts every delivery as an attempt, so each one handed back uses one of
the queue's max_attempts), running tasks get ``grace`` seconds (default 30) to finish and their
results are stored, then the connection is closed (BYE) and ``run()`` returns.  A second signal,
or the grace period running out: cold stop.  Children are killed, unfinished tasks are left to
brokerd, which redelivers them when the connection closes; ``run()`` then raises ``ColdStop``.

**Broker restarts.**  A lost connection is re-established by the intake thread; deliveries of
the old connection that were waiting are dropped (brokerd gives them back), tasks already running
finish, and their results are stored through the new connection without an ack.  brokerd
redelivers those messages (at-least-once); when the redelivery reaches this worker it is acked
without running the task again (another worker would run it again).

**Autoscale** (``autoscale=(max, min)``, processes and threads pools): the pool grows by one slot
whenever a delivery waits and every slot is busy, and shrinks by one slot per ``AUTOSCALE_IDLE``
seconds a slot stays idle, down to ``min`` (``pools.base``, ``mainloop``).  Prefetch credit is set once, from
``max``.  While the pool may still grow, jobs are not batched onto busy processes.
"""

from __future__ import annotations

import itertools
import logging
import os
import signal
import socket
import threading
import time
from collections import deque

from client.envelope import decode_envelope
from client.canvas import after_task
from client.errors import BrokerdError, Disconnected
from client.exceptions import NotRegistered
from client import signals
from client.signing import verifier_for
import client.worker.events as ev_
from client.worker.channel import (Channel, close_quietly, delivery_buffer, detach_in_child,
                                   hand_deliveries_to_main_loop)
from client.worker.control import Control, revoked_stamps, stamps_revoked
from client.worker.credit import BATCH_RUNTIME_MAX, RUNTIME_WEIGHT, AdaptiveCredit
from client.worker.intake import CONNECT_TIMEOUT, online_worker_names
from client.worker.limits import TaskLimits
from client.worker.mainloop import run_sync
from client.worker.logs import LOG_FORMAT, LOG_RECEIVED, received_log, setup_logging, task_line
from client.worker.outcome import (S_ACK, S_REQUEUE, S_RETRY, args_shown, lost_outcome, succeeded, undecodable_outcome,
                                   unknown_outcome, unsigned_outcome)
from client.worker.pools.base import Job, close_fds
from client.worker.runner import check_envelope, request_for
from client.worker.state import successful_requests

log = logging.getLogger("brokerd.worker")

DEFAULT_GRACE = 30.0  # warm stop: how long running tasks may take to finish
MAX_PREFETCH = 65535  # brokerd's limit per consumer
RAN_OFFLINE_MAX = 100_000  # task ids remembered as "ran while brokerd was unreachable" (bounds memory)
# Default concurrency per pool: a process per CPU; threads and trio tasks mostly wait on I/O.
DEFAULT_CONCURRENCY = {"processes": lambda: os.cpu_count() or 1, "threads": lambda: 10, "trio": lambda: 100}
STORED = ("SUCCESS", "FAILURE")  # result states kept for a later connection when the current one is gone


def _configured(conf, key):
    """The value the app's configuration sets for ``key``, or None when it is only a default."""
    lookup = getattr(conf, "_lookup", None)
    if lookup is None:
        return conf.get(key)
    value = lookup(key)
    return value if isinstance(value, int) and not isinstance(value, bool) else None


class ColdStop(Exception):
    """The worker stopped without waiting for its running tasks (second signal, or grace ran out)."""


class DuplicateName(Exception):
    """Another worker with this name is online (``on_duplicate_name="refuse"``)."""


def default_hostname(name: str | None = None) -> str:
    """``-n`` with Celery's %h (host), %n (host name part) and %d (domain part)."""
    host = socket.gethostname()
    name = name or "brokerd@%h"
    short, _, domain = host.partition(".")
    return name.replace("%h", host).replace("%n", short).replace("%d", domain).replace("%i", str(os.getpid()))


class Worker:
    """Consume tasks for ``app`` from brokerd and run them.  See the module docstring.

    ``Worker(app, queues=None, concurrency=None, pool="processes", prefetch_multiplier=None,
    max_tasks_per_child=None, autoscale=None, hostname=None, loglevel="info", *, grace=30.0,
    time_limit=None, soft_time_limit=None, broker=None, connect_timeout=None, task_events=None,
    heartbeat_interval=2.0, max_memory_per_child=None, on_duplicate_name="rename")``

    ``prefetch_multiplier``: None (default, unless the app's config sets
    ``worker_prefetch_multiplier``) adapts the credit (``client.worker.credit``); a number fixes it
    at concurrency x M.

    ``on_duplicate_name``: when brokerd already sees an online worker with this name at start,
    ``"rename"`` (default) adds the process id (``brokerd-4242@host``) and warns; ``"refuse"``
    raises ``DuplicateName``.  Two workers sharing a name would be merged into one row by
    WORKERS, inspect, ping and the page.

    ``task_events``: send task-* events (default: the app's ``worker_send_task_events``, else
    on); worker-online/heartbeat/offline events are always sent, every ``heartbeat_interval``
    seconds.  ``max_memory_per_child`` (KiB, processes pool): a pool process whose resident
    memory is above it after a task is replaced.

    ``run()`` blocks until the worker is stopped (``stop()`` from another thread, or
    SIGTERM/SIGINT when ``run()`` is called in the main thread).  It returns after a warm stop,
    raises ``ColdStop`` after a cold one and ``BrokerUnreachable`` when brokerd cannot be
    reached at start within ``connect_timeout`` seconds (None, the default: wait for it).

    Its public attributes and methods past ``run``/``stop`` are what the pools, the intake
    thread and remote control use (``pools.base.Pool`` lists them); they are not an API.
    """

    def __init__(self, app, queues=None, concurrency=None, pool="processes", prefetch_multiplier=None,
                 max_tasks_per_child=None, autoscale=None, hostname=None, loglevel="info", *,
                 grace=DEFAULT_GRACE, time_limit=None, soft_time_limit=None, broker=None,
                 connect_timeout=CONNECT_TIMEOUT, configure_logging=True, task_events=None,
                 heartbeat_interval=ev_.HEARTBEAT_INTERVAL, max_memory_per_child=None, on_duplicate_name="rename"):
        if on_duplicate_name not in ("rename", "refuse"):
            raise ValueError(f"on_duplicate_name must be 'rename' or 'refuse' (got {on_duplicate_name!r})")
        self.on_duplicate_name = on_duplicate_name
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
            prefetch_multiplier = _configured(app.conf, "worker_prefetch_multiplier")
        # No multiplier given: the credit adapts (client.worker.credit), from concurrency up to
        # concurrency x 64; one given explicitly keeps the fixed concurrency x M of before.
        self.credit = AdaptiveCredit(self.concurrency) if prefetch_multiplier is None else None
        self.prefetch_multiplier = int(prefetch_multiplier) if prefetch_multiplier is not None else None
        self.prefetch = (self.credit.current if self.credit is not None
                         else min(MAX_PREFETCH, max(1, self.concurrency * self.prefetch_multiplier)))
        # task name -> moving average of its run time (seconds), for batchable(); one entry per task
        # name this worker ran, so bounded by the app's registered tasks.
        self.runtimes: dict = {}
        self._track_started: dict = {}  # task name -> its track_started (job_started)
        self.max_tasks_per_child = max_tasks_per_child or app.conf.get("worker_max_tasks_per_child")
        self.max_memory_per_child = max_memory_per_child or app.conf.get("worker_max_memory_per_child")
        if task_events is None:
            task_events = app.conf.get("worker_send_task_events", ev_.DEFAULT_TASK_EVENTS)
        self.task_events = bool(task_events)
        if not heartbeat_interval or heartbeat_interval <= 0:
            raise ValueError(f"heartbeat_interval must be a number of seconds > 0 (got {heartbeat_interval!r})")
        self.heartbeat_interval = float(heartbeat_interval)
        self.hostname = default_hostname(hostname)
        self.loglevel = loglevel
        self.grace = grace
        self.broker = broker or app.conf.broker_url
        if broker:
            app.conf.broker_url = broker  # tasks that send tasks (or a child's own client) use it too
        self.connect_timeout = connect_timeout
        self.configure_logging = configure_logging
        self.result_ttl = app.conf.get("result_expires")
        self.limits = TaskLimits(app, soft_time_limit, time_limit)
        # Signed tasks: with task_signing_public_keys set, every task must carry a good signature
        # (client/signing.py); a bad key setting is a ValueError here, a usage error at the CLI.
        self.verifier = None
        if app.conf.get("task_signing_public_keys"):
            self.verifier = verifier_for(app.conf)  # loads the cryptography package

        self.inbox: deque = deque()
        self.sleeping = False
        self.wake_r = self.wake_w = None
        self.stopping = False  # warm stop under way
        self.cold = False
        self.stop_event = threading.Event()
        self._channel: Channel | None = None
        self._direct = None  # the consumer's delivery buffer, read by the main loop itself
        self._consumer = None
        self.client = None
        self._gen = 0
        self.sink: deque = deque()  # (what, error) of pipelined requests that failed
        self._orphans: list = []  # results to store once a connection is back
        self._ran_offline: set = set()  # ids of those, stored after a reconnect: don't run them twice
        self.backlog: deque[Job] = deque()
        self.running: dict[int, Job] = {}
        self._seq = itertools.count(1)
        self.limited = False  # some task has a time limit: the main loop watches deadlines
        self.intake_thread = None
        self.fatal = None
        self._signals = 0
        self.grace_deadline = None
        self.poller = None
        self.pool = None
        self.post = self.post_sync  # how other threads hand the main loop an item (the trio loop swaps it)
        self.exitcode = None
        self.ready = threading.Event()  # set once connected and consuming (tests, embedding)
        self.events = ev_.EventBuffer()
        self._next_beat = 0.0  # monotonic time of the next worker-heartbeat
        self.stats = ev_.Stats()
        self.control = Control(self)

    def __repr__(self):
        return f"<Worker {self.hostname} pool={self.pool_kind} c={self.concurrency} queues={self.queues}>"

    def claim_unique_name(self) -> None:
        """Before the pool starts (its processes keep the name): make sure no online worker has it.

        Asked once, of the brokerd reachable now (if it is not, nothing can be known yet); two
        workers starting in the same instant can still collide.
        """
        online = online_worker_names(self.broker)
        if not online or self.hostname not in online:
            return
        if self.on_duplicate_name == "refuse":
            raise DuplicateName(f"another worker named {self.hostname!r} is online at {self.broker}; "
                                "give this one its own name with -n NAME")
        name, at, host = self.hostname.partition("@")
        new = f"{name}-{os.getpid()}@{host}" if at else f"{self.hostname}-{os.getpid()}"
        log.warning("another worker named %s is online at %s: this one is %s (give each worker its own -n NAME)",
                    self.hostname, self.broker, new)
        self.hostname = new

    # -- public --------------------------------------------------------------------------------
    def run(self) -> None:
        signals.celeryd_init.send(sender=self.hostname, instance=self, conf=self.app.conf, options={})
        if self.configure_logging:
            # Celery's rule: a setup_logging receiver replaces the worker's own logging setup
            if not signals.setup_logging.has_listeners():
                setup_logging(self.loglevel)
            else:
                signals.setup_logging.send(loglevel=self.loglevel, logfile=None, format=LOG_FORMAT, colorize=False)
            signals.after_setup_logger.send(logger=logging.getLogger(), loglevel=self.loglevel, logfile=None,
                                            format=LOG_FORMAT, colorize=False)
        signals.worker_init.send(sender=self)
        self.app.init_worker()  # Django setup, include/autodiscover imports: before the pool forks
        if self.pool_kind == "trio":
            # lazy import: only this pool needs trio, and importing it costs the other pools start-up time
            from client.worker.trio_loop import run_trio

            run_trio(self)
            unfinished = "running tasks were cancelled"
        else:
            run_sync(self)
            unfinished = "running tasks were not waited for"
        if self.fatal is not None:
            raise self.fatal
        if self.cold:
            raise ColdStop(f"cold stop: {unfinished}; brokerd redelivers them")

    def stop(self, graceful: bool = True) -> None:
        """Ask the worker to stop (thread-safe; also what SIGTERM / SIGINT do)."""
        self.post(("stop", graceful))

    # -- the inbox ----------------------------------------------------------------------------
    def post_sync(self, item) -> None:
        self.inbox.append(item)
        if self.sleeping:
            try:
                os.write(self.wake_w, b"!")
            except (OSError, TypeError):
                pass

    def forget_parent_fds(self):
        """In a forked child: the parent's pipes and broker socket are not ours."""
        close_fds((self.wake_r, self.wake_w))
        self.wake_r = self.wake_w = None
        if self.client is not None:
            detach_in_child(self.client)
        try:
            signal.set_wakeup_fd(-1)
        except (ValueError, OSError):
            pass

    def on_signal(self, signum, frame):
        self.post(("signal", signum))

    # -- receiving ----------------------------------------------------------------------------
    def _received(self, d, gen):
        try:
            self._receive(d, gen)
        except Exception as exc:  # noqa: BLE001 - a bug or a case check_envelope missed costs this task only
            log.exception("could not take message %r from %s", d.id, d.queue)
            queued = self.backlog and self.backlog[-1].d is d
            ch = self._channel
            if not queued and not d.settled and ch is not None and gen == ch.gen:
                self._settle(d, ch, undecodable_outcome(d.id, d.queue, exc, self.hostname), d.id)

    def _receive(self, d, gen):
        if gen != self._gen:
            return  # from a connection that is gone: brokerd took it back
        ch = self._channel
        if self.stopping:
            self._settle(d, ch, (S_REQUEUE, None, None, None, None, None), d.id)
            return
        try:
            env = decode_envelope(d.body)
            check_envelope(env)  # fields of the wrong type fail this task here, not the main loop later
        except ValueError as exc:
            outcome = undecodable_outcome(d.id, d.queue, exc, self.hostname)
            signals.task_rejected.send(sender=self, message=d, exc=exc)
            if self.task_events:
                self.events.emit(ev_.task_outcome(d.id, outcome, None))
            self._settle(d, ch, outcome, d.id)
            return
        if self.verifier is not None:
            why = self.verifier.refusal(env, d.id)
            if why is not None:
                outcome = unsigned_outcome(d.id, env, why, self.hostname)
                if self.task_events:
                    self.events.emit(ev_.task_outcome(d.id, outcome, None))
                self._settle(d, ch, outcome, d.id)
                return
        name = env["task"]
        task = self.app.tasks.get(name)
        if task is None:
            outcome = unknown_outcome(env, self.app, self.hostname)
            if signals.task_unknown.receivers:
                signals.task_unknown.send(sender=self, name=name, id=env["id"], message=d,
                                          exc=NotRegistered(outcome[3]["exc_message"]))
            if self.task_events:
                self.events.emit(ev_.task_received(env, d))
                self.events.emit(ev_.task_outcome(env["id"], outcome, None))
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
            self.events.emit(ev_.task_received(env, d))
        req = None
        if signals.task_received.receivers or signals.task_revoked.receivers:
            req = request_for(env, task, d.queue, d.priority, d.attempts, env.get("retries") or 0, self.hostname)
            signals.task_received.send(sender=self, request=req)
        hit = None
        if revoked_stamps:  # revoke_by_stamped_headers: a stamp value that was revoked
            stamps = (env.get("headers") or {}).get("stamps")
            hit = stamps_revoked(stamps) if isinstance(stamps, dict) else None
        if hit is not None or (expires is not None and time.time() >= expires):
            why = "expired" if hit is None else f"stamp {hit[0]}={hit[1]!r} revoked"
            if signals.task_revoked.receivers:
                signals.task_revoked.send(sender=task, request=req, terminated=False, signum=None,
                                          expired=hit is None)
            log.info("Discarding revoked task: %s[%s] (%s)", name, task_id, why)
            self.control.revoked.append(task_id)
            meta = ({"reason": "expired", "expires": expires, "hostname": self.hostname} if hit is None else
                    {"reason": "stamped headers", "stamp": hit[0], "hostname": self.hostname})
            outcome = (S_ACK, "REVOKED", None, meta, None, None)
            if self.task_events:
                self.events.emit(ev_.task_outcome(task_id, outcome, None))
            self._settle(d, ch, outcome, task_id)
            return
        if received_log.isEnabledFor(logging.INFO):
            task_line(received_log, logging.INFO, LOG_RECEIVED, name, task_id,
                      args_shown(env["args"], env["kwargs"], env.get("options")), eta=env.get("eta"))
        acks_late, soft, hard = self.limits.of(task, env)
        job = Job(next(self._seq), d, gen, task_id, name, env, soft, hard)
        if soft or hard:
            self.limited = True
        if not acks_late:
            ch.ack(d)
        self.backlog.append(job)

    # -- settling -----------------------------------------------------------------------------
    def finish(self, job: Job, outcome, runtime=None):
        """``job`` ended with ``outcome``: report it and settle it (or keep its result for later)."""
        self.running.pop(job.seq, None)
        self.stats.ran(job.name)
        if succeeded(outcome):
            successful_requests.add(job.task_id)  # Celery's worker_state.successful_requests
        credit = self.credit
        if credit is not None:
            rt = runtime if runtime is not None else (time.time() - job.started if job.started is not None else None)
            if rt is not None:
                credit.observe(rt)
                old = self.runtimes.get(job.name)
                self.runtimes[job.name] = rt if old is None else old + RUNTIME_WEIGHT * (rt - old)
        if self.task_events:
            if runtime is None and job.started is not None:
                runtime = time.time() - job.started
            self.events.emit(ev_.task_outcome(job.task_id, outcome, runtime))
        ch = self._channel
        if ch is None or job.gen != ch.gen:
            # Its connection is gone, so brokerd redelivers the message; keep the result.
            state = outcome[1]
            if state in STORED:
                self._orphans.append((job.task_id, state, outcome[2], outcome[3]))
            return
        self._settle(job.d, ch, outcome, job.task_id)
        env = job.env
        if env and (env.get("chain") or env.get("link") or env.get("link_error")):
            if outcome[1] in STORED:
                self._continue_workflow(env, outcome)
            elif succeeded(outcome):  # ignore_result: nothing stored, but its chain and links go on (Celery's)
                self._continue_workflow(env, (outcome[0], "SUCCESS", outcome[2], None, None, None))

    def _continue_workflow(self, env, outcome):
        """Send what a workflow does next: chain step, link callbacks (client.canvas.after_task)."""
        try:
            if self._channel is not None:
                self._channel.flush()  # this task's own result first, then what follows from it
            after_task(self.app, env, outcome[1], outcome[2], outcome[3])
        except Exception as exc:
            log.error("could not continue the workflow of %s[%s]: %s", env.get("task"), env.get("id"), exc)

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
                if state is not None:  # None: the task's result is ignored, its RETRY too
                    ch.result(None, task_id, state, None, meta)
                headers = dict(d.headers or {})
                headers["retries"] = retries
                if type(value) is bytes:  # retry(args=, kwargs=): the changed message goes, then the old one
                    ch.publish(d.queue, value, priority=d.priority, delay=delay or None, headers=headers, id=task_id)
                    if not d.settled:
                        ch.ack(d)
                elif d.settled:  # acks_late=False: it was acked on receipt, so publish it again
                    ch.publish(d.queue, d.body, priority=d.priority, delay=delay or None, headers=headers, id=task_id)
                else:
                    ch.nack(d, True, delay or 0.0001, headers)  # > 0: an explicit retry, not an attempt
            else:
                if state is not None:
                    ch.result(None, task_id, state, value, meta)
                if not d.settled:
                    ch.nack(d, settle == S_REQUEUE)
        except Disconnected:
            if state in STORED:
                self._orphans.append((task_id, state, value, meta))
        except BrokerdError as exc:
            log.warning("could not settle task %s with brokerd: %s", task_id, exc)

    def hand_back_job(self, job: Job, reason: str = "worker stopping"):
        """A job that never started goes back to brokerd (nack with requeue)."""
        self.running.pop(job.seq, None)
        if self.task_events:
            self.events.emit(ev_.task_handed_back(job.task_id, reason))
        ch = self._channel
        if ch is not None and job.gen == ch.gen and not job.d.settled:
            try:
                ch.nack(job.d, True)
            except BrokerdError:
                pass

    def lost_job(self, job: Job, why: str = "its process died"):
        """Its process died mid-task: one retry of it, or past its max_retries a FAILURE (``lost_outcome``)."""
        ch = self._channel
        if ch is None or job.gen != ch.gen:
            self.running.pop(job.seq, None)
            return  # its connection is gone: brokerd has taken the message back already
        self.finish(job, lost_outcome(job, self.app.tasks.get(job.name), why, self.hostname))

    def check_sink(self):
        sink = self.sink
        while sink:
            what, err = sink.popleft()
            if isinstance(err, Disconnected):
                if what[0] == "result" and what[2] in ("SUCCESS", "FAILURE", "REVOKED"):
                    self._orphans.append(what[1:])
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

    # -- events (protocol.md §5.29) --------------------------------------------------------------
    def job_started(self, job: Job) -> None:
        """``job`` starts running now (its slot took it)."""
        job.started = t = time.time()
        pid = getattr(job.slot, "pid", None) or self.stats.pid
        if self.task_events:
            self.events.emit({"type": "task-started", "uuid": job.task_id, "ts": t, "pid": pid})
        name = job.name
        track = self._track_started.get(name)
        if track is None:
            # the task's track_started, else the app's task_track_started: looked up once per task
            # name (as Celery fixes it when the task class is made), not once per task
            task = self.app.tasks.get(name) if name else None
            track = getattr(task, "track_started", None)
            if track is None:
                track = self.app.conf.get("task_track_started", False)
            track = self._track_started[name] = bool(track)
        if track and self._channel is not None and job.gen == self._channel.gen:
            # Celery's track_started: the state is STARTED until the final result
            # replaces it; pipelined with the other results of this loop turn.
            try:
                self._channel.result(None, job.task_id, "STARTED", None, {"hostname": self.hostname, "pid": pid})
            except BrokerdError:
                pass

    def pool_resized(self, old: int, new: int, reason: str) -> None:
        self.stats.resized["grown" if new > old else "shrunk"] += 1
        self.events.emit_now("worker-pool-resized", old=old, size=new, reason=reason)

    def process_replaced(self, pid: int, reason: str, rss_kb=None, tasks=None) -> None:
        self.stats.replaced[reason] = self.stats.replaced.get(reason, 0) + 1
        self.events.emit_now("worker-process-replaced", pid=pid, reason=reason, rss_kb=rss_kb, tasks=tasks)

    def flush(self, force: bool = False) -> None:
        """Send what this turn buffered (results, acks, nacks) in one write, with the pending events
        once they are due or ``force``."""
        ch = self._channel
        if ch is None:
            return
        try:
            credit = self.credit
            if credit is not None and self._consumer is not None:
                busy = self._busy_long(time.time(), credit.long_after())[0] if self.running else 0
                new = credit.due(time.monotonic(), busy) if busy or credit.runtime is not None else None
                if new is not None:
                    old, self.prefetch = self.prefetch, new
                    ch.credit(self._consumer, new)
                    if busy >= self.concurrency and new < old and (self.backlog or self._direct):
                        # every slot busy for long: nothing held here can start soon (with a slot
                        # still free, it runs what is held; a scheduling hiccup of one no-op child
                        # must not send a whole pipeline back and forth)
                        self._shed(new)
            evs = self.events.take(force)
            if evs is not None:
                ch.events(self.hostname, evs)
            ch.flush()
        except BrokerdError:
            pass

    def _busy_long(self, now: float, limit: float):
        """(slots running a task for longer than ``limit`` seconds, wall time at which the next
        running task will have), oldest first: ``running`` is in the order jobs were handed out,
        so the walk stops at the first task that is not long yet."""
        busy = 0
        for job in self.running.values():
            t = job.started
            if t is None:
                continue  # queued in a process behind another (batched): not a slot of its own
            if now - t < limit:
                return busy, t + limit
            busy += 1
        return busy, None

    def credit_wait(self) -> float | None:
        """Seconds the main loop may sleep before the adaptive credit needs another look: a
        running task becomes long (its slot wants nothing waiting: client.worker.credit), or a
        change CREDIT_INTERVAL held back is due.  None: nothing to wait for."""
        credit = self.credit
        if credit is None or self._consumer is None or self._channel is None:
            return None  # (without a channel flush sends nothing: no timer, or the loop would spin)
        now = time.time()
        busy, cross = self._busy_long(now, credit.long_after()) if self.running else (0, None)
        # also when idle: a raise held back by CREDIT_INTERVAL as the last task ended must still go
        w = credit.wait(time.monotonic(), busy) if busy or credit.runtime is not None else None
        if cross is not None:
            c = max(0.0, cross - now)
            w = c if w is None else min(w, c)
        return w

    def beat_if_due(self, now: float) -> float:
        """Send a worker-heartbeat when due; return seconds until the next one."""
        if now >= self._next_beat:
            if self._channel is not None:
                self.events.emit_now("worker-heartbeat", **ev_.heartbeat_info(self))
            self._next_beat = now + self.heartbeat_interval
        return self._next_beat - now

    # -- remote control (protocol.md §5.34) --------------------------------------------------------
    def _on_control(self, payload):
        """A CONTROL frame from brokerd: a control request (``control``, ``args``, ``reply_id``:
        answered with CONTROL_REPLY), or ``revoke`` + ``terminate``, which kills running tasks."""
        if not isinstance(payload, dict):
            return
        if "recall" in payload:
            self._on_recall(payload["recall"])
            return
        command = payload.get("control")
        if not isinstance(command, str):
            if payload.get("terminate"):
                self.control.terminate(payload)
            return
        reply = self.control.answer(command, payload.get("args") or {})
        reply_id = payload.get("reply_id")
        ch = self._channel
        if type(reply_id) is int and ch is not None:
            try:
                ch.control_reply(reply_id, reply)
            except BrokerdError:
                pass
        if command == "shutdown" and "error" not in reply:
            log.warning("shutdown requested by a control command: warm stop")
            self.flush(force=True)  # the reply goes out before the consumer is cancelled
            self._begin_stop()
    def batchable(self, job) -> bool:
        """May the process pool queue other jobs in one process behind ``job``?  With the adaptive
        credit only when its task is known to run shorter than BATCH_RUNTIME_MAX: jobs queued in a
        process behind a long one could not be given back by a RECALL.  With a fixed multiplier,
        always (as before)."""
        if self.credit is None:
            return True
        rt = self.runtimes.get(job.name)
        return rt is not None and rt < BATCH_RUNTIME_MAX

    def _on_recall(self, recall):
        """RECALL (protocol.md §5.44): release up to n deliveries of that queue this worker has not
        started: the newest in the backlog first (they would run last here).  A started task, one
        already given to a pool process, or one acked on receipt is never released."""
        try:
            ctag, n, queue = recall
        except (TypeError, ValueError):
            return
        ch, consumer = self._channel, self._consumer
        if ch is None or consumer is None or ctag != consumer.tag or type(n) is not int or n < 1:
            return
        self._give_back(n, queue, "recalled for an idle worker")

    def _give_back(self, n: int, queue, why: str) -> int:
        """RELEASE up to ``n`` deliveries (of ``queue``, or of any queue: None) not started, the
        newest in the backlog first (they would run last here); how many.  A started task, one
        already given to a pool process, or one acked on receipt is never released."""
        ch = self._channel
        self._take_deliveries()  # what the client buffered is ours to consider too
        give = []
        kept = deque()
        backlog = self.backlog
        while backlog and len(give) < n:
            job = backlog.pop()
            d = job.d
            if (queue is None or d.queue == queue) and job.gen == ch.gen and not d.settled:
                give.append(job)
            else:
                kept.appendleft(job)
        backlog.extend(kept)
        if not give:
            return 0
        try:
            ch.release([job.d for job in give])
        except BrokerdError:
            return 0
        if self.task_events:
            for job in give:
                self.events.emit(ev_.task_handed_back(job.task_id, why))
        log.debug("released %d waiting tasks%s to brokerd (%s)", len(give), f" of {queue}" if queue else "", why)
        return len(give)

    def _shed(self, credit: int) -> None:
        """The credit just dropped because a slot is busy with a long task: what this worker holds
        beyond the new credit would wait behind it (until some idle worker's RECALL), so it goes
        back to brokerd now, which hands it to a free slot or keeps it ready for the first one."""
        ch = self._channel
        self._take_deliveries()
        gen = ch.gen
        held = sum(1 for j in self.running.values() if j.gen == gen and not j.d.settled)
        held += sum(1 for j in self.backlog if j.gen == gen and not j.d.settled)
        if held > credit:
            self._give_back(held - credit, None, "its worker is busy with a long task")

    def consume_queues(self, queues) -> str | None:
        """Consume ``queues`` from now on (control add_consumer/cancel_consumer): a new consumer on this
        connection, then the old one cancelled (what it delivered stays in flight and is settled as usual;
        what its buffer held is given back).  A reconnect consumes the new list.  An error text, or None."""
        client, ch = self.client, self._channel
        if self.stopping:
            return "the worker is stopping"
        if ch is None or self._direct is None or self._consumer is None:
            return "the worker is not connected to brokerd right now; try again"
        try:
            new = client.consume(list(queues), self.prefetch, slots=self.concurrency)
        except BrokerdError as exc:
            return f"brokerd refused the consumer: {exc}"
        old = self._consumer
        self._take_deliveries()  # what the old consumer handed over already is ours to run
        self.queues = list(queues)
        self._consumer = new
        self._direct = delivery_buffer(new)
        hand_deliveries_to_main_loop(client, new, self.post)
        try:
            old.cancel()
        except BrokerdError:
            pass
        log.info("%s now consumes %s", self.hostname, ",".join(self.queues))
        return None

    # -- events (both loops) ------------------------------------------------------------------
    def event(self, ev):
        kind = ev[0]
        if kind == "delivery":
            self._received(ev[1], ev[2])
        elif kind == "done":
            self.pool.on_done(ev[1], ev[2], ev[3], ev[4])
        elif kind == "poke":
            self._take_deliveries()
        elif kind == "connected":
            _, client, consumer, gen, direct = ev
            self.client = client
            self._consumer = consumer
            self._direct = delivery_buffer(consumer) if direct else None
            self._gen = gen
            self._channel = Channel(client, gen, self.sink, self.result_ttl)
            # CONTROL broadcasts (revoke with terminate) arrive in the client's reader thread
            client.control_handlers.append(lambda payload: self.post(("control", payload)))
            self.events.emit_now("worker-online", **ev_.online_info(self))
            self._next_beat = time.monotonic() + self.heartbeat_interval
            self.ready.set()
            if gen == 1:
                signals.worker_ready.send(sender=self)
                log.info("%s ready: consuming %s (prefetch %d, pool %s x %d)", self.hostname, ",".join(self.queues),
                         self.prefetch, self.pool_kind, self.concurrency)
            self._store_orphans()
            if self.stopping:
                self._cancel_consumer()
            self._take_deliveries()
        elif kind == "lost":
            if ev[1] == self._gen:
                self._channel = None
                self._consumer = None
                self._direct = None
                self.ready.clear()
                dropped = len(self.backlog)
                self.backlog.clear()
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
                self.cold = True
        elif kind == "stop":
            if ev[1] and not self.stopping:
                log.info("stop requested: warm stop")
                self._begin_stop()
            elif not ev[1]:
                self.cold = True
        elif kind == "tick":
            pass
        elif kind == "control":
            self._on_control(ev[1])
        elif kind == "intake-done":
            pass  # the intake thread ended (after a stop, or a crash reported as "fatal")
        elif kind == "fatal":
            self.fatal = ev[1]
            self.cold = True

    def _take_deliveries(self):
        """Deliveries the client buffered for our consumer (the direct path; see client.worker.intake)."""
        buf = self._direct
        if buf:
            gen = self._gen
            received = self._received
            while buf:
                received(buf.popleft(), gen)

    def _begin_stop(self):
        if self.stopping:
            return
        self.stopping = True
        self.stop_event.set()
        self.grace_deadline = time.monotonic() + self.grace
        self._cancel_consumer()
        self.hand_back()
        if self.pool is not None:
            self.pool.drain()

    def _cancel_consumer(self):
        c = self._consumer
        if c is not None:
            try:
                c.cancel()  # gives back what the client received but did not hand out
            except BrokerdError:
                pass

    def hand_back(self):
        """Deliveries received but not started go back to brokerd now."""
        ch = self._channel
        n = 0
        while self.backlog:
            job = self.backlog.popleft()
            if ch is not None and job.gen == ch.gen and not job.d.settled:
                try:
                    ch.nack(job.d, True)
                    n += 1
                except BrokerdError:
                    pass
                if self.task_events:
                    self.events.emit(ev_.task_handed_back(job.task_id, "worker stopping"))
        if n:
            log.info("handed %d waiting tasks back to brokerd", n)

    # -- stopping (both loops end here) ----------------------------------------
    def shutdown(self):
        """Both loops end here: stop the pool, say worker-offline, close the connection."""
        cold = self.cold
        self.stop_event.set()
        self.pool.close(cold=cold)
        self.check_sink()
        client = self.client
        if client is not None:
            self.events.emit_now("worker-offline")
            self.flush(force=True)
            close_quietly(client)
        if self.intake_thread is not None:
            self.intake_thread.join(2.0)
        if self._orphans:
            log.warning("%d results could not be stored (brokerd unreachable); their tasks will run again", len(self._orphans))
        signals.worker_shutdown.send(sender=self)
        log.info("%s stopped (%s)", self.hostname, "cold" if cold else "warm")

