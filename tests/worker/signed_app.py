"""Tasks for tests/worker/test_worker_signing.py, run by a real worker that trusts one signing key.

``record(path)`` writes a file: a refused task must never have run, so its file must not exist.
The worker signs the tasks it sends itself (chain steps) with the key named by SIGNED_APP_KEY.
"""

from __future__ import annotations

import os

from client.app import App

app = App("signed_app", broker=os.environ.get("BROKERD_URL", "127.0.0.1:7700"),
          task_signing_key=os.environ.get("SIGNED_APP_KEY") or None)


@app.task
def record(path, value="ran"):
    with open(path, "w") as f:
        f.write(str(value))
    return value


@app.task
def add(x, y):
    return x + y


@app.task
def tsum(numbers):
    return sum(numbers)


@app.task
def mark(marker):
    """Store a result under ``marker``: the test waits on it (a scheduled run has an id brokerd picks)."""
    app.client.store_result(marker, "SUCCESS", os.getpid())
    return marker
