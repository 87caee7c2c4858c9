"""A test app for tests/e2e/test_recall.py, run by real worker processes: each task returns the
wall-clock times it ran at, so the test reads who waited for whom from the results."""

from __future__ import annotations

import os
import time

from client.app import App

app = App("recall_app", broker=os.environ.get("BROKERD_TEST_BROKER", "127.0.0.1:7700"))


@app.task
def noop():
    return None


@app.task
def long(seconds: float):
    """Runs ``seconds``; returns [start, end]."""
    t0 = time.time()
    time.sleep(seconds)
    return [t0, time.time()]


@app.task
def short():
    """Runs 10 ms; returns its start time."""
    t0 = time.time()
    time.sleep(0.01)
    return t0


@app.task(bind=True)
def short_where(self):
    """Runs 10 ms; returns [its start time, the worker that ran it] (bench/recall_mix.py)."""
    t0 = time.time()
    time.sleep(0.01)
    return [t0, self.request.hostname]


@app.task(bind=True)
def long_where(self, seconds: float):
    """Runs ``seconds``; returns [start, end, the worker that ran it]."""
    t0 = time.time()
    time.sleep(seconds)
    return [t0, time.time(), self.request.hostname]
