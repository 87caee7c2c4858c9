"""The worker's log lines: Celery's format, with the process's label (``MainProcess``,
``ForkPoolWorker-1``) in every line.

Lines follow Celery's (``Task proj.add[id] received``, ``... succeeded in 0.0012s: 4``,
``... retry: Retry in 2s: ValueError(...)``, ``... raised unexpected:
ZeroDivisionError('division by zero')``).  The worker's own lines are on the ``brokerd.worker``
logger; each task's lines are on Celery's two loggers, so an application's logging setup made for
Celery applies unchanged: ``celery.worker.strategy`` (received) and ``celery.app.trace`` (succeeded,
failed, retried, ignored, rejected).  Like Celery's, each of those records is a format with a map of
values (``LOG_*`` below), and carries that map as ``record.data`` for custom handlers: ``id``,
``name``, ``args`` and ``kwargs`` always, where args and kwargs are the call's ``argsrepr``/``kwargsrepr``
when it gave them (so secrets in arguments are never logged), else a short repr of the real ones.
"""

from __future__ import annotations

import logging
import sys

LOG_FORMAT = "[%(asctime)s: %(levelname)s/%(processName)s] %(message)s"
LOG_LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING, "warn": logging.WARNING,
              "error": logging.ERROR, "critical": logging.CRITICAL, "fatal": logging.CRITICAL}

# The task lines: formats over a map of values (logging's "%(name)s" style; the map is the record's args)
LOG_RECEIVED = "Task %(name)s[%(id)s] received"
LOG_SUCCESS = "Task %(name)s[%(id)s] succeeded in %(runtime).4fs: %(return_value)s"
LOG_FAILURE = "Task %(name)s[%(id)s] %(description)s: %(exc)s"
LOG_RETRY = "Task %(name)s[%(id)s] retry: Retry in %(when)gs: %(exc)s"
LOG_IGNORED = "Task %(name)s[%(id)s] %(description)s"
LOG_REJECTED = "Task %(name)s[%(id)s] rejected (requeue=%(requeue)s): %(exc)s"
LOG_TRACEBACK = "Task %(name)s[%(id)s] traceback:\n%(traceback)s"
received_log = logging.getLogger("celery.worker.strategy")  # Celery's names: see the module's doc
trace_log = logging.getLogger("celery.app.trace")


def task_line(logger, level, fmt, name, task_id, shown_args, **values) -> None:
    """Log one task line: ``fmt`` over the task's map of values, the map also as ``record.data``.
    ``shown_args`` is (args, kwargs) as shown (client.worker.outcome.args_shown)."""
    if logger.isEnabledFor(level):
        data = {"id": task_id, "name": name, "args": shown_args[0], "kwargs": shown_args[1], **values}
        logger.log(level, fmt, data, extra={"data": data})


process_label = ["MainProcess"]  # one cell: set in a pool child by set_process_label()


def set_process_label(label: str) -> None:
    """The name this process shows in log lines (a pool child calls it once, after the fork)."""
    process_label[0] = label


class LabelFilter(logging.Filter):
    def filter(self, record):
        record.processName = process_label[0]
        return True


class WorkerLogHandler(logging.StreamHandler):
    """stderr, Celery's format; its class marks it as ours, so setting up twice adds it once."""


def setup_logging(loglevel="info") -> None:
    """Log to stderr, one line per record, Celery's format; the root logger gets the level."""
    level = LOG_LEVELS[loglevel.lower()] if isinstance(loglevel, str) else int(loglevel)
    root = logging.getLogger()
    if not any(isinstance(h, WorkerLogHandler) for h in root.handlers):
        h = WorkerLogHandler(sys.stderr)
        h.setFormatter(logging.Formatter(LOG_FORMAT))
        h.addFilter(LabelFilter())
        root.addHandler(h)
    root.setLevel(level)
