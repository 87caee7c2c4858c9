"""Tasks for tests/worker/test_surface.py (exceptions, signals, request, results, inspect/control),
run by a real worker process.  Signal receivers append one JSON line per call to the file named by
$SURFACE_SIGNAL_LOG, so the test reads what fired, in which process, with which arguments."""

from __future__ import annotations

import datetime as dt
import json
import os

from client import signals
from client.app import App

app = App("surface_tasks", broker=os.environ.get("BROKERD_TEST_BROKER", "127.0.0.1:7700"))
app.conf.result_extended = True  # AsyncResult.name/args/kwargs come from the stored result
app.conf.database_password = "hunter2"  # inspect().conf() must never show it


class MyError(Exception):
    pass


class CodeError(Exception):
    """Two constructor arguments: rebuilt from the stored args."""

    def __init__(self, code, detail):
        super().__init__(code, detail)
        self.code = code
        self.detail = detail


class Outer:
    class InnerError(ValueError):
        pass


@app.task
def add(x, y):
    return x + y


@app.task
def fail(kind):
    if kind == "my":
        raise MyError("my own")
    if kind == "code":
        raise CodeError(42, "the answer")
    if kind == "inner":
        raise Outer.InnerError("nested")
    if kind == "private":
        from tests.worker_apps.surface_private import PrivateError

        raise PrivateError("only the worker knows me")
    raise KeyError(kind)


@app.task(bind=True)
def request_fields(self):
    r = self.request
    names = ("id", "group", "chord", "correlation_id", "reply_to", "origin", "properties", "time_limit",
             "soft_time_limit", "timelimit", "callbacks", "errbacks", "delivery_info", "hostname",
             "replaced_task_nesting")
    return {n: getattr(r, n) for n in names}


@app.task(bind=True, time_limit=60, soft_time_limit=45)
def declared_limits(self):
    return {"time_limit": self.request.time_limit, "soft_time_limit": self.request.soft_time_limit}


@app.task
def echo_times(*args, **kwargs):
    """Returns what it got, each value shown as (type name, isoformat)."""
    def shown(v):
        return [type(v).__name__, v.isoformat(), getattr(v, "tzinfo", None) is not None]
    return {"args": [shown(a) for a in args], "kwargs": {k: shown(v) for k, v in kwargs.items()}}


@app.task(bind=True, max_retries=1, default_retry_delay=0.01)
def retry_once(self):
    if self.request.retries == 0:
        raise self.retry(exc=MyError("again"))
    return "retried"


@app.task(bind=True)
def parent_of_two(self):
    q = self.request.delivery_info["queue"]
    a = add.apply_async((1, 1), queue=q)
    b = add.apply_async((2, 2), queue=q)
    return [a.id, b.id]


@app.task
def sleeper(marker, seconds):
    import time

    app.client.store_result(marker, "SUCCESS", os.getpid())  # "started": the test waits on this id
    time.sleep(seconds)  # a test revokes or inspects it meanwhile; bounded by `seconds`
    return "slept"


# -- signal receivers ------------------------------------------------------------------------
def record(signal_name, **fields):
    path = os.environ.get("SURFACE_SIGNAL_LOG")
    if not path:
        return
    line = json.dumps({"signal": signal_name, "pid": os.getpid(), **fields}, default=repr) + "\n"
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    try:
        os.write(fd, line.encode())  # one write per line: lines of several processes do not interleave
    finally:
        os.close(fd)


@signals.worker_process_init.connect
def _process_init(sender=None, **kw):
    record("worker_process_init")


@signals.worker_process_shutdown.connect
def _process_shutdown(sender=None, pid=None, exitcode=None, **kw):
    record("worker_process_shutdown", child=pid, exitcode=exitcode)


@signals.task_prerun.connect
def _prerun(sender=None, task_id=None, task=None, args=None, kwargs=None, **kw):
    record("task_prerun", sender=sender.name, task_id=task_id, task=task.name, args=list(args), kwargs=kwargs)


@signals.task_postrun.connect
def _postrun(sender=None, task_id=None, retval=None, state=None, **kw):
    record("task_postrun", sender=sender.name, task_id=task_id, retval=retval, state=state)


@signals.task_success.connect(sender=add)
def _success_of_add(sender=None, result=None, **kw):
    record("task_success", sender=sender.name, result=result)


@signals.task_failure.connect
def _failure(sender=None, task_id=None, exception=None, einfo=None, **kw):
    record("task_failure", sender=sender.name, task_id=task_id, exception=type(exception).__name__,
           einfo=bool(einfo and einfo.traceback))


@signals.task_retry.connect
def _retry(sender=None, request=None, reason=None, **kw):
    record("task_retry", sender=sender.name, task_id=request.id, reason=type(reason).__name__)


@signals.task_received.connect
def _received(sender=None, request=None, **kw):
    record("task_received", task_id=request.id, task=request.task)


@signals.task_revoked.connect
def _revoked(sender=None, request=None, terminated=None, expired=None, **kw):
    record("task_revoked", task_id=getattr(request, "id", None), terminated=terminated, expired=expired)


@signals.task_unknown.connect
def _unknown(sender=None, name=None, id=None, exc=None, **kw):
    record("task_unknown", name=name, task_id=id, exc=type(exc).__name__)


@signals.task_rejected.connect
def _rejected(sender=None, message=None, exc=None, **kw):
    record("task_rejected", message_id=message.id)


@signals.celeryd_init.connect
def _celeryd_init(sender=None, instance=None, **kw):
    record("celeryd_init", sender=sender)


@signals.worker_init.connect
def _worker_init(sender=None, **kw):
    record("worker_init", hostname=sender.hostname)


@signals.worker_ready.connect
def _worker_ready(sender=None, **kw):
    record("worker_ready", hostname=sender.hostname)


@signals.worker_shutdown.connect
def _worker_shutdown(sender=None, **kw):
    record("worker_shutdown", hostname=sender.hostname)


@signals.after_setup_logger.connect
def _after_setup_logger(logger=None, loglevel=None, **kw):
    record("after_setup_logger", loglevel=loglevel)


@signals.task_prerun.connect
def _raises(sender=None, **kw):
    """A receiver that raises: logged, and the task still runs."""
    raise RuntimeError("a receiver that raises")


TIMES = (dt.datetime(2026, 12, 2, 10, 30, 0, 5), dt.time(10, 30), dt.time(8, 0, tzinfo=dt.timezone.utc))


@app.task
def return_a_signature():
    """A task returning a canvas (Celery's test_signature_serialization): from a process pool child."""
    from client.canvas import chain, group

    return chain(add.s(1), group(add.s(2), add.s(3)))
