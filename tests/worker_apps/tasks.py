"""Tasks for tests/worker/test_worker.py, run by real worker processes.

The broker address comes from ``-b`` on the worker's command line (or
BROKERD_TEST_BROKER).  ``signal(marker, value)`` stores a result under an id of
the test's choosing, so a test can wait for "the task has started" with
``AsyncResult(marker).get(timeout=...)`` instead of sleeping.
"""

from __future__ import annotations

import os
import time

from client import wire
from client.app import App, SoftTimeLimitExceeded, Task

app = App("worker_apps", broker=os.environ.get("BROKERD_TEST_BROKER", "127.0.0.1:7700"))


def signal(marker: str, value) -> None:
    """Store ``value`` as the result of ``marker`` (a synchronisation point for the test)."""
    c = app.client
    if hasattr(c, "store_result"):
        c.store_result(marker, "SUCCESS", value)
    else:
        c._call(wire.OP_RESULT_SET, marker, "SUCCESS", value, None, None)


def _bump(path: str) -> int:
    """Count calls in a file (one line per call); returns the new count."""
    with open(path, "a") as f:
        f.write("x\n")
    with open(path) as f:
        return len(f.read().splitlines())


@app.task
def add(x, y):
    return x + y


@app.task(bind=True)
def whoami(self):
    return {"pid": os.getpid(), "hostname": self.request.hostname, "retries": self.request.retries,
            "delivery_info": self.request.delivery_info, "id": self.request.id}


@app.task
def started_at():
    return time.time()


@app.task
def pid():
    return os.getpid()


@app.task(bind=True, track_started=True)
def tracked(self, marker):
    """Waits until the test stores a result under ``marker``: its state is STARTED meanwhile."""
    deadline = time.monotonic() + 20
    while app.client.get_result(marker)["state"] != "SUCCESS" and time.monotonic() < deadline:
        time.sleep(0.02)
    return "done"


@app.task(bind=True)
def progress(self, marker):
    """Reports PROGRESS, then waits until the test stores a result under ``marker``."""
    self.update_state(state="PROGRESS", meta={"done": 1, "total": 2})
    deadline = time.monotonic() + 20
    while app.client.get_result(marker)["state"] != "SUCCESS" and time.monotonic() < deadline:
        time.sleep(0.02)
    return "finished"


@app.task(bind=True)
def slow(self, seconds, marker=None):
    if marker:
        signal(marker, {"pid": os.getpid(), "hostname": self.request.hostname})
    time.sleep(seconds)
    return {"hostname": self.request.hostname, "attempts": self.request.delivery_info.get("attempts")}


@app.task(bind=True, autoretry_for=(ValueError,), retry_backoff=0.05, retry_backoff_max=0.2, max_retries=5)
def flaky(self, path, fails=2):
    n = _bump(path)
    if n <= fails:
        raise ValueError(f"failure number {n}")
    return {"calls": n, "retries": self.request.retries}


@app.task(autoretry_for=(KeyError,), retry_backoff=0.02, max_retries=2)
def always_fails(path):
    _bump(path)
    raise KeyError("still broken")


@app.task(bind=True, max_retries=1)
def retries_by_hand(self, path):
    n = _bump(path)
    if n == 1:
        raise self.retry(exc=RuntimeError("not yet"), countdown=0.05)
    return n


@app.task(soft_time_limit=0.3)
def soft_caught():
    try:
        time.sleep(10)
    except SoftTimeLimitExceeded:
        return "soft-caught"
    return "not interrupted"


@app.task(soft_time_limit=0.3)
def soft_uncaught():
    time.sleep(10)


@app.task(soft_time_limit=0.3)
def soft_spin():
    """Python code between short sleeps: where the threads pool's soft limit can land."""
    deadline = time.monotonic() + 10
    try:
        while time.monotonic() < deadline:
            time.sleep(0.01)
    except SoftTimeLimitExceeded:
        return "soft-caught"
    return "not interrupted"


@app.task(time_limit=0.5)
def hard_limited():
    time.sleep(30)


@app.task(bind=True)
def die_once(self):
    if self.request.delivery_info["attempts"] == 1:
        os._exit(3)
    return {"attempts": self.request.delivery_info["attempts"], "redelivered": self.request.delivery_info["redelivered"]}


@app.task
def bad_return():
    return object()


@app.task
async def async_nap(seconds):
    import trio

    start = time.time()
    await trio.sleep(seconds)
    return [start, time.time()]


@app.task(soft_time_limit=0.3)
async def async_too_slow():
    import trio

    await trio.sleep(10)


class Hooked(Task):
    def on_success(self, retval, task_id, args, kwargs):
        with open(kwargs["path"], "a") as f:
            f.write(f"success {task_id} {retval}\n")

    def on_failure(self, exc, task_id, args, kwargs, einfo):
        with open(kwargs["path"], "a") as f:
            f.write(f"failure {task_id} {type(exc).__name__} {einfo.type.__name__}\n")


@app.task(base=Hooked)
def hooked(value, path):
    if value < 0:
        raise ArithmeticError("negative")
    return value * 2


@app.task(ignore_result=True)
def quiet_fail(fail):
    if fail:
        raise LookupError("quiet task failed")
    return "never stored"


@app.task(bind=True)
def reprs_of(self, *args, **kwargs):
    """How the worker shows this call's arguments (Celery's request.argsrepr/kwargsrepr)."""
    return [self.request.argsrepr, self.request.kwargsrepr]


@app.task
def noop():
    pass


@app.task(acks_late=False, bind=True, max_retries=1)
def early_ack(self, path):
    """Acked on receipt; its retry is published again rather than nacked."""
    n = _bump(path)
    if n == 1:
        raise self.retry(exc=ValueError("once more"), countdown=0.05)
    return n


# -- poison results and dying processes (tests/worker/test_worker_poison.py) ------------------------------
@app.task
def huge_int():
    """CBOR carries it, but repr() raises ValueError (Python's int max str digits, 4,300)."""
    return 10**5000


class _NoRepr(dict):
    def __repr__(self):
        raise RuntimeError("this value has no repr")


@app.task
def unreprable():
    """A map CBOR encodes whose __repr__ raises."""
    return _NoRepr(a=1)


@app.task
def cyclic():
    value = [1]
    value.append(value)
    return value


class _Unprintable(Exception):
    def __str__(self):
        raise RuntimeError("this exception has no str")


@app.task
def raises_unprintable():
    raise _Unprintable()


def _stamp(path: str) -> None:
    with open(path, "a") as f:
        f.write(f"{time.time()!r}\n")


@app.task(max_retries=2)
def aborts(path):
    """Records the time of each run, then kills its own process (SIGABRT)."""
    _stamp(path)
    os.abort()


@app.task(acks_late=False)
def aborts_acked_early(path):
    _stamp(path)
    os.abort()
