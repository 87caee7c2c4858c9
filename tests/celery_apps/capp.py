"""An unchanged Celery app, written as Celery's docs write it, plus the one line brokerd needs.

The broker and backend URLs come from $CAPP_BROKER (set by tests/e2e/test_celery_*.py).
"""

import os
import time
from pathlib import Path

import client.celery  # noqa: F401  registers brokerd:// with kombu (the one extra line)
from celery import Celery

BROKER = os.environ.get("CAPP_BROKER", "brokerd://127.0.0.1:7700")
app = Celery("capp", broker=BROKER, backend=BROKER)
app.conf.update(
    task_acks_late=True,
    task_reject_on_worker_lost=True,
    worker_prefetch_multiplier=1,
    result_expires=3600,
    result_extended=True,
    broker_connection_retry_on_startup=True,
    worker_hijack_root_logger=False,
    beat_schedule={"tick": {"task": "tests.celery_apps.capp.record", "schedule": 0.5, "args": ("beat",)}},
)
MARKS = Path(os.environ.get("CAPP_MARKS", "/tmp/capp-marks"))


def mark(name: str, text: str = "") -> None:
    """Append a line to a file the test reads: how many times something ran."""
    MARKS.mkdir(parents=True, exist_ok=True)
    with open(MARKS / name, "a") as f:
        f.write(text + "\n")


@app.task
def add(x, y):
    return x + y


@app.task
def tsum(numbers):
    mark("tsum", repr(numbers))
    return sum(numbers)


@app.task
def boom(msg):
    raise ValueError(msg)


@app.task(bind=True, max_retries=3)
def flaky(self, n):
    if self.request.retries < n:
        raise self.retry(countdown=0.2)
    return self.request.retries


@app.task(bind=True)
def who(self):
    return {"id": self.request.id, "redelivered": bool(self.request.delivery_info.get("redelivered"))}


@app.task(bind=True, acks_late=True)
def slow(self, name, seconds):
    """Marks its start, then sleeps: the test kills the worker while it runs."""
    mark(name, str(os.getpid()))
    time.sleep(seconds)
    return {"name": name, "redelivered": bool(self.request.delivery_info.get("redelivered"))}


@app.task
def collect(results):
    mark("collect", repr(results))
    return results


@app.task
def record(name):
    mark("order", name)
    return name
