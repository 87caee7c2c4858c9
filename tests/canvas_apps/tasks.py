"""Tasks for the canvas and revoke tests; side effects go to files under CANVAS_DIR."""

import os
import time
from pathlib import Path

from client import App

app = App("canvas", broker=os.environ.get("BROKERD_URL", "127.0.0.1:7700"))


def _log(name: str, line: str) -> None:
    d = Path(os.environ.get("CANVAS_DIR", "."))
    with open(d / name, "a") as fh:
        fh.write(line + "\n")


@app.task
def add(x, y):
    return x + y


@app.task
def mul(x, y):
    return x * y


@app.task
def tsum(numbers):
    _log("tsum.log", str(sum(numbers)))
    return sum(numbers)


@app.task
def boom(*args):
    raise ValueError("boom in step")


@app.task
def slow_add(x, y, pause=0.2):
    time.sleep(pause)
    return x + y


@app.task
def record(tag):
    _log("record.log", str(tag))
    return tag


@app.task
def on_error(task_id, *rest):
    _log("errors.log", f"{task_id} {' '.join(str(r) for r in rest)}".strip())
    return task_id


@app.task
def sleeper(seconds):
    _log("sleeper.log", "started")
    time.sleep(seconds)
    _log("sleeper.log", "finished")
    return "slept"


@app.task
def old_errback(task_id):
    """An errback in the old style: one argument, the failed task's id (sent as a task)."""
    _log("old_errbacks.log", task_id)
    return task_id


@app.task
def new_errback(request, exc, traceback):
    """An errback in Celery's style: called in the worker with the request, exception and traceback."""
    _log("new_errbacks.log", f"{request.id} {type(exc).__name__} {'Traceback' in str(traceback)}")
