"""The main loop of the processes and threads pools: one thread, asleep in ``poll()``.

``run_sync(worker)`` drives a ``runtime.Worker`` through its public loop interface (``inbox``,
``event()``, ``hand_back()``, ``check_sink()``, ``beat_if_due()``, ``flush()``, ``shutdown()``,
``grace_deadline``, ``cold``): the runtime decides what an event means, this module decides when
things happen.  It blocks in ``poll()`` on the inbox's wake-up pipe and the pool's file
descriptors (children's sockets and pidfds); the pipe is written only while the loop sleeps
(``Worker.post_sync`` checks ``sleeping``), so a busy loop makes no syscall per delivery.  The
trio pool's loop is ``client.worker.trio_loop``.
"""

from __future__ import annotations

import logging
import os
import select
import signal
import threading
import time

from client.worker.intake import BrokerUnreachable, connect, connect_deadline, intake
from client.worker.limits import check_deadlines
from client.worker.pools.process import ProcessPool
from client.worker.pools.thread import ThreadPool

log = logging.getLogger("brokerd.worker")

AUTOSCALE_IDLE = 5.0  # a pool slot idle this long is retired (down to the autoscale minimum)


def run_sync(w) -> None:
    """Run worker ``w`` on this thread until it stops (the processes and threads pools).

    Returns after the pool is closed and the connection said BYE; ``w.cold`` / ``w.fatal`` tell
    the caller how it ended.  Raises ``BrokerUnreachable`` when brokerd cannot be reached at start.
    """
    w.wake_r, w.wake_w = os.pipe()
    os.set_blocking(w.wake_r, False)
    os.set_blocking(w.wake_w, False)
    w.claim_unique_name()  # before the pool forks: its processes keep the name
    w.poller = select.poll()
    w.poller.register(w.wake_r, select.POLLIN)
    if w.pool_kind == "processes":
        w.pool = ProcessPool(w, w.concurrency if not w.autoscale else max(w.autoscale[1], 1),
                             w.max_tasks_per_child, w.max_memory_per_child)
    else:
        w.pool = ThreadPool(w, w.concurrency if not w.autoscale else max(w.autoscale[1], 1))
    main = threading.current_thread() is threading.main_thread()
    old = {}
    if main:
        for sig in (signal.SIGTERM, signal.SIGINT):
            old[sig] = signal.signal(sig, w.on_signal)
    try:
        w.pool.start()  # fork before any thread exists: children inherit no locks held
        try:
            client = connect(w, deadline=connect_deadline(w.connect_timeout))
        except BrokerUnreachable:
            w.pool.close(cold=True)
            raise
        if client is None:  # stopped while connecting
            w.pool.close(cold=True)
            return
        w.client = client
        w.intake_thread = threading.Thread(target=intake, args=(w, client), name="brokerd-intake", daemon=True)
        w.intake_thread.start()
        _loop(w)
    finally:
        for sig, h in old.items():
            signal.signal(sig, h)
        os.close(w.wake_r)
        os.close(w.wake_w)
        w.wake_r = w.wake_w = None


def _loop(w) -> None:
    """Take events, dispatch the backlog, watch deadlines and grace, flush once per turn, sleep in poll()."""
    inbox = w.inbox
    pool = w.pool
    backlog = w.backlog
    running = w.running
    poller = w.poller
    wake_r = w.wake_r
    event = w.event
    autoscale = w.autoscale
    has_deadlines = False
    next_shrink = None
    while True:
        while inbox:
            event(inbox.popleft())
        if w.sink:
            w.check_sink()
        if w.cold:
            break
        if pool.current < pool.size:
            pool.maintain()
        if backlog:
            if w.stopping:
                w.hand_back()
            else:
                pool.dispatch(backlog, running, time.monotonic())
                if w.limited:
                    has_deadlines = True
                if backlog and autoscale and pool.size < autoscale[0]:
                    pool.grow()
                    continue
        if w.stopping and not running:
            break
        # How long may we sleep?
        timeout = None
        now = None
        if has_deadlines:
            now = time.monotonic()
            t = check_deadlines(running, now, pool, w.hostname, w.finish)
            has_deadlines = t is not None
            if t is not None:
                timeout = t - now
        if autoscale:
            now = now or time.monotonic()
            next_shrink = pool.shrink_idle(now, autoscale[1], AUTOSCALE_IDLE)
            if next_shrink is not None:
                timeout = min(timeout, next_shrink - now) if timeout is not None else next_shrink - now
        if w.stopping:
            now = now or time.monotonic()
            left = w.grace_deadline - now
            if left <= 0:
                log.error("grace period of %gs is over with %d tasks still running: cold stop", w.grace, len(running))
                w.cold = True
                break
            timeout = min(timeout, left) if timeout is not None else left
        now = now or time.monotonic()
        beat = w.beat_if_due(now)
        timeout = w.events.wait(now, min(timeout, beat) if timeout is not None else beat)
        # Send what this turn buffered (results, acks, nacks, events): one write for the batch.
        w.flush()
        # The adaptive credit's timer: a running task becoming long lowers the credit (credit.py).
        cw = w.credit_wait()
        if cw is not None:
            timeout = cw if timeout is None else min(timeout, cw)
        # Sleep until a child writes, a delivery or signal arrives, or a timer is due.
        w.sleeping = True
        if inbox:
            w.sleeping = False
            continue
        events = poller.poll(None if timeout is None else max(0, int(timeout * 1000) + 1))
        w.sleeping = False
        for fd, _ in events:
            if fd == wake_r:
                try:
                    while os.read(wake_r, 4096):
                        pass
                except BlockingIOError:
                    pass
            else:
                pool.on_ready(fd)
    w.shutdown()
