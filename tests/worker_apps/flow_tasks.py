"""Tasks for the flow-control tests (issue 15): a rate-limited one, an unlimited one, a capped one."""

import os
import time

from client import App

app = App("flow_tasks", broker=os.environ.get("BROKERD_TEST_BROKER", "127.0.0.1:7700"))


@app.task(rate_limit="10/s")
def limited(i):
    return i


@app.task
def free(i):
    return i


@app.task(max_concurrency=3)
def capped(seconds):
    """Runs ``seconds`` and returns its (start, end) stamps, read from one clock in one worker."""
    start = time.monotonic()
    time.sleep(seconds)
    return [start, time.monotonic()]
