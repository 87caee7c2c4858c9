"""A worker inside the calling process, for tests (Celery's ``celery.contrib.testing.worker.start_worker``).

``with start_worker(app): ...`` runs a ``Worker`` on a thread of this process, so that what a test
checks in-process sees the worker side too: signals such as ``task_received``/``task_prerun`` sent
by the worker reach receivers connected in the test, and tasks run with the test's imports.  The
``threads`` pool is the default (the ``processes`` pool would fork a process that already runs
threads); the worker consumes from brokerd like any other, so brokerd must be reachable.

    with start_worker(app, queues=["celery"], concurrency=4) as worker:
        assert add.delay(1, 2).get(timeout=10) == 3
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time

from client.worker.logs import LOG_LEVELS, received_log, trace_log
from client.worker.runtime import Worker

READY_TIMEOUT = 60.0  # seconds for the worker to connect and consume: a cold start on a loaded box
PING_TIMEOUT = 1.0  # seconds one ping waits for the answer
PING_PAUSE = 0.05  # seconds between pings while the worker's name is not yet known to brokerd
SHUTDOWN_TIMEOUT = 30.0  # seconds for running tasks to end at exit (a warm stop), then it is left behind


class WorkerDidNotStart(RuntimeError):
    """The in-process worker was not consuming within ``ready_timeout`` (or stopped before)."""


@contextlib.contextmanager
def start_worker(app, pool: str = "threads", concurrency: int = 1, queues=None, hostname: str | None = None,
                 loglevel: str | None = None, ready_timeout: float = READY_TIMEOUT,
                 shutdown_timeout: float = SHUTDOWN_TIMEOUT, perform_ping_check: bool = False, **kwargs):
    """Run a worker for ``app`` on a thread until the block ends; yields the ``Worker``.

    It adds no log handler (``configure_logging=False``) and leaves the process's signal handlers alone
    (it is not on the main thread).  ``loglevel`` (``"info"``, ``"debug"``, ...; None: leave them be) is
    the level of the worker's own loggers for the block (``brokerd.worker`` and the task lines'
    ``celery.worker.strategy``/``celery.app.trace``, client.worker.logs), so a test sees the worker's
    task lines through its own handlers (pytest's ``caplog``) without touching the root logger.  At exit
    it stops warm: running tasks may finish within ``shutdown_timeout`` seconds.  ``perform_ping_check`` (Celery's) also waits for a ping answer.
    ``kwargs`` go to ``Worker`` (``prefetch_multiplier``, ``time_limit``, ...)."""
    kwargs.setdefault("configure_logging", False)
    worker = Worker(app, queues=queues, concurrency=concurrency, pool=pool, hostname=hostname,
                    loglevel=loglevel or "warning", **kwargs)
    loggers = (logging.getLogger("brokerd.worker"), received_log, trace_log)
    levels = [lg.level for lg in loggers]
    if loglevel is not None:
        level = LOG_LEVELS[loglevel.lower()] if isinstance(loglevel, str) else int(loglevel)
        for lg in loggers:
            lg.setLevel(level)
    failure: list = []

    def run():
        try:
            worker.run()
        except BaseException as exc:  # noqa: BLE001 - reported to the test thread, which raises it
            failure.append(exc)
        finally:
            worker.ready.set()  # wake a start that waits for a worker that will never be ready

    thread = threading.Thread(target=run, name=f"brokerd-worker {worker.hostname}", daemon=True)
    thread.start()
    try:
        if not worker.ready.wait(ready_timeout) or failure or not thread.is_alive():
            why = f": {type(failure[0]).__name__}: {failure[0]}" if failure else ""
            raise WorkerDidNotStart(f"the in-process worker {worker.hostname} was not consuming from "
                                    f"{worker.broker} within {ready_timeout:g} s{why}")
        if perform_ping_check:
            # brokerd knows the worker's name a moment after it consumes: ask again until the deadline
            deadline = time.monotonic() + ready_timeout
            while not app.control.ping(destination=[worker.hostname], timeout=PING_TIMEOUT):
                if time.monotonic() > deadline:
                    raise WorkerDidNotStart(f"the in-process worker {worker.hostname} did not answer ping "
                                            f"within {ready_timeout:g} s")
                time.sleep(PING_PAUSE)
        yield worker
    finally:
        worker.stop(graceful=True)
        thread.join(shutdown_timeout)
        if loglevel is not None:
            for lg, was in zip(loggers, levels):
                lg.setLevel(was)
