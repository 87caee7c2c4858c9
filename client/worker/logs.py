"""The worker's log lines: Celery's format, with the process's label (``MainProcess``,
``ForkPoolWorker-1``) in every line.

Lines follow Celery's (``Task proj.add[id] received``, ``... succeeded in 0.0012s: 4``,
``... retry: Retry in 2s: ValueError(...)``, ``... raised unexpected:
ZeroDivisionError('division by zero')``) on the ``brokerd.worker`` logger.
"""

from __future__ import annotations

import logging
import sys

LOG_FORMAT = "[%(asctime)s: %(levelname)s/%(processName)s] %(message)s"
LOG_LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING, "warn": logging.WARNING,
              "error": logging.ERROR, "critical": logging.CRITICAL, "fatal": logging.CRITICAL}

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
