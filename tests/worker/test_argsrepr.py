"""Celery's per-call ``argsrepr``/``kwargsrepr``: text the worker shows in place of a task's real args and
kwargs wherever it reports them (its task log lines, the task events brokerd keeps, inspect replies), so
secrets passed as arguments are not logged.  The task itself still gets the real arguments.

Real brokerd; a real ``brokerd-worker`` process (its log and the events it sent), and the in-process test
worker (``client.worker.testing.start_worker``) for the log records as a logging handler sees them: on
Celery's loggers, each with Celery's ``record.data`` map (what Celery's test_trace_log_arguments reads).
"""

from __future__ import annotations

import logging
import uuid

import pytest

from client.taskopts import ARGSREPR_MAX
from client.worker.logs import LOG_FAILURE, LOG_RECEIVED, LOG_SUCCESS
from tests.support.waiting import wait_for
from tests.worker.test_worker import WAIT, fresh_queue, ready, shared_broker, workers  # noqa: F401 - fixtures
from tests.worker_apps import tasks

SECRET = "hunter2-s3cr3t"


def _trace_records(caplog, task_id):
    """(logger, level, format, data args, data kwargs) of the task's lines, as Celery's test reads them."""
    return [(r.name, r.levelno, r.msg, r.data["args"], r.data["kwargs"]) for r in caplog.records
            if r.name in ("celery.worker.strategy", "celery.app.trace") and r.data["id"] == task_id]


def test_the_in_process_worker_logs_the_calls_reprs_in_place_of_its_arguments(shared_broker, caplog, tmp_path):
    from client.worker.testing import start_worker

    q = fresh_queue()  # the root logger stays at WARNING: start_worker's loglevel lets the task lines through
    with start_worker(tasks.app, queues=[q], concurrency=2, loglevel="info"):
        ok = tasks.reprs_of.apply_async((SECRET,), {"x": 1}, queue=q, argsrepr="(<secret>,)", kwargsrepr="{}")
        assert ok.get(timeout=WAIT) == ["(<secret>,)", "{}"]  # request.argsrepr/kwargsrepr
        bad = tasks.always_fails.apply_async((str(tmp_path / SECRET),), queue=q, argsrepr="<path>")
        with pytest.raises(KeyError):
            bad.get(timeout=WAIT)
        plain = tasks.add.apply_async((2, 3), queue=q)
        assert plain.get(timeout=WAIT) == 5
        wait_for(lambda: len(_trace_records(caplog, plain.id)) == 2, WAIT, "the plain task's two lines")
    assert _trace_records(caplog, ok.id) == [
        ("celery.worker.strategy", logging.INFO, LOG_RECEIVED, "(<secret>,)", "{}"),
        ("celery.app.trace", logging.INFO, LOG_SUCCESS, "(<secret>,)", "{}"),
    ]
    failed = _trace_records(caplog, bad.id)
    # always_fails retries twice on KeyError, then fails; kwargsrepr not given: the real (empty) kwargs
    assert failed[-1] == ("celery.app.trace", logging.ERROR, LOG_FAILURE, "<path>", "{}")
    assert {f[3] for f in failed} == {"<path>"} and len(failed) == 3 * 2
    assert _trace_records(caplog, plain.id)[0][3:] == ("(2, 3)", "{}")  # no repr given: the real ones
    assert SECRET not in caplog.text
    assert f"Task tests.worker_apps.tasks.reprs_of[{ok.id}] succeeded in " in caplog.text


def test_start_worker_sets_its_loggers_level_only_for_the_block(shared_broker):
    from client.worker.testing import start_worker

    trace = logging.getLogger("celery.app.trace")
    before = trace.level
    with start_worker(tasks.app, queues=[fresh_queue()], loglevel="debug"):
        assert trace.level == logging.DEBUG and logging.getLogger("celery.worker.strategy").level == logging.DEBUG
    assert trace.level == before


def test_a_worker_process_keeps_the_secret_out_of_its_log_its_events_and_inspect(shared_broker, workers,
                                                                                  tmp_path):
    q = fresh_queue()
    name = f"repr-{uuid.uuid4().hex[:6]}@test"
    w = workers(shared_broker, q, "-c", "2", "-l", "info", name=name)
    ready(w, q)
    calls = str(tmp_path / f"calls-{SECRET}")
    r = tasks.flaky.apply_async((calls,), {"fails": 1}, queue=q, argsrepr="('<calls file>',)",
                                kwargsrepr="{'fails': '<n>'}")
    assert r.get(timeout=WAIT) == {"calls": 2, "retries": 1}  # ran with the real path, retried once
    client = tasks.app.client
    # the stored result alone says SUCCESS; the worker's events (task-received with the args) may come after it
    wait_for(lambda: (client.task_info(r.id) or {}).get("args") is not None, WAIT, "the task's events")
    wait_for(lambda: (client.task_info(r.id) or {}).get("state") == "SUCCESS", WAIT, "the task's last event")
    info = client.task_info(r.id)
    assert info["args"] == "('<calls file>',)" and info["kwargs"] == "{'fails': '<n>'}", info
    # inspect active: a running task's args as given
    marker = f"started-{uuid.uuid4().hex}"
    slow = tasks.slow.apply_async((30, marker), queue=q, argsrepr="(30, <marker>)")
    tasks.app.AsyncResult(marker).get(timeout=WAIT)
    active = tasks.app.control.inspect(destination=[name], timeout=5).active()
    assert [(j["id"], j["args"], j["kwargs"]) for j in active[name]] == [(slow.id, "(30, <marker>)", "{}")]
    tasks.app.control.revoke(slow.id, terminate=True)
    log = w.log()
    assert f"[{r.id}] received" in log and f"[{r.id}] succeeded in " in log and f"[{r.id}] retry: " in log
    assert SECRET not in log
    assert SECRET not in str(client.task_info(slow.id)) + str(info)


@pytest.mark.parametrize("option", ["argsrepr", "kwargsrepr"])
@pytest.mark.parametrize("value, what", [
    (["a"], "got list"),
    (b"bytes", "got bytes"),
    ("x" * (ARGSREPR_MAX + 1), f"got text of {ARGSREPR_MAX + 1} characters"),
])
def test_a_repr_that_is_not_short_text_is_refused_by_name_when_sent(option, value, what):
    with pytest.raises(TypeError, match=rf"{option} must be text of at most {ARGSREPR_MAX} characters.*{what}"):
        tasks.add.apply_async((1, 2), **{option: value})
    with pytest.raises(TypeError, match=rf"{option} must be text"):
        tasks.add.s(1, 2).set(**{option: value}).apply_async()
    with pytest.raises(TypeError, match=rf"{option} must be text"):
        tasks.app.send_task("tests.worker_apps.tasks.add", (1, 2), **{option: value})


def test_a_task_in_a_pool_process_sees_the_reprs_on_its_request(shared_broker, workers):
    q = fresh_queue()
    w = workers(shared_broker, q)
    ready(w, q)
    r = tasks.reprs_of.apply_async((SECRET,), queue=q, argsrepr="<hidden>")
    assert r.get(timeout=WAIT) == ["<hidden>", "{}"]  # kwargsrepr not given: the real kwargs' repr
