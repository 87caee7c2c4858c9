"""Celery's surface on a real brokerd and a real worker process (issue 14 items 5-7): a task's own
exception re-raised as itself, signals with Celery's names and arguments (worker_process_init in every
pool process), the request's fields, AsyncResult/ResultSet/GroupResult, inspect() and control, and naive
datetimes as arguments.  One brokerd and one worker (processes pool, -c 2) for the module; signal
receivers in tests/worker_apps/surface_tasks.py write one JSON line per call to a file read here."""

from __future__ import annotations

import datetime as dt
import json
import os
import signal
import subprocess
import sys
import time
import uuid

import cbor2
import pytest

from client.exceptions import RemoteError, TimeLimitExceeded
from client.result import GroupResult, ResultSet
from tests.support.broker import ROOT, broker_for_app
from tests.worker_apps import surface_tasks as st

APP = "tests.worker_apps.surface_tasks:app"
WAIT = 20.0  # seconds any single result may take on a loaded box
NAME = "surface@test"


class Worker:
    def __init__(self, address, queue, log_dir, *args, name=NAME):
        self.name = name
        self.signal_log = log_dir / f"{name}.signals"
        self.log_path = log_dir / f"{name}.log"
        env = dict(os.environ, PYTHONPATH=str(ROOT), PYTHONUNBUFFERED="1", SURFACE_SIGNAL_LOG=str(self.signal_log))
        self.log_file = open(self.log_path, "w")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "client.worker_cli", APP, "-b", address, "-Q", queue, "-n", name, *args],
            cwd=ROOT, env=env, stdin=subprocess.DEVNULL, stdout=self.log_file, stderr=subprocess.STDOUT)

    def signals(self, name=None) -> list:
        if not self.signal_log.exists():
            return []
        lines = [json.loads(x) for x in self.signal_log.read_text().splitlines() if x.strip()]
        return [x for x in lines if name is None or x["signal"] == name]

    def log(self) -> str:
        self.log_file.flush()
        return self.log_path.read_text()

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        code = self.proc.wait(10)
        self.log_file.close()
        return code


@pytest.fixture(scope="module")
def broker(tmp_path_factory):
    yield from broker_for_app(tmp_path_factory.mktemp("surface-broker"), st.app)


@pytest.fixture(scope="module")
def worker(broker, tmp_path_factory):
    q = f"s.{uuid.uuid4().hex[:10]}"
    w = Worker(broker.address, q, tmp_path_factory.mktemp("surface-worker"), "-c", "2", "--prefetch-multiplier", "2")
    try:
        assert st.add.apply_async((1, 1), queue=q).get(timeout=WAIT) == 2
        yield q, w
    finally:
        w.stop()


def wait_for(pred, what, timeout=WAIT):
    """Poll a file-backed condition written by another process (no event to await across processes)."""
    deadline = time.monotonic() + timeout
    while not pred():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)


# -- 5. exceptions -------------------------------------------------------------------------------
def test_a_task_s_own_exception_is_re_raised_as_its_own_class(worker):
    q, _ = worker
    with pytest.raises(st.MyError, match="my own") as e:
        st.fail.apply_async(("my",), queue=q).get(timeout=WAIT)
    assert type(e.value) is st.MyError and not isinstance(e.value, RemoteError)
    try:
        st.fail.apply_async(("my",), queue=q).get(timeout=WAIT)
    except st.MyError:  # the Celery idiom around .get()
        caught = True
    assert caught


def test_an_exception_with_several_arguments_is_rebuilt_from_them(worker):
    q, _ = worker
    with pytest.raises(st.CodeError) as e:
        st.fail.apply_async(("code",), queue=q).get(timeout=WAIT)
    assert (e.value.code, e.value.detail) == (42, "the answer")


def test_a_nested_exception_class_is_found_by_its_qualified_name(worker):
    q, _ = worker
    with pytest.raises(st.Outer.InnerError, match="nested"):
        st.fail.apply_async(("inner",), queue=q).get(timeout=WAIT)
    with pytest.raises(KeyError):  # builtins stay themselves
        st.fail.apply_async(("missing",), queue=q).get(timeout=WAIT)


def test_an_exception_the_caller_cannot_import_is_a_remote_error_named_after_it(worker):
    q, _ = worker
    private = "tests.worker_apps.surface_private"
    assert private not in sys.modules
    r = st.fail.apply_async(("private",), queue=q)
    with pytest.raises(RemoteError) as e:
        r.get(timeout=WAIT)
    assert type(e.value).__name__ == "PrivateError"
    assert e.value.exc_type == "PrivateError" and e.value.exc_message == "only the worker knows me"
    assert "PrivateError" in e.value.traceback
    assert private not in sys.modules  # a result never makes the caller import a module
    assert isinstance(r.result, RemoteError)


# -- 6. signals ---------------------------------------------------------------------------------
def test_task_signals_fire_in_the_worker_with_celery_s_arguments(worker):
    q, w = worker
    r = st.add.apply_async((2, 3), {}, queue=q)
    assert r.get(timeout=WAIT) == 5  # the prerun receiver that raises did not fail the task
    pre = [x for x in w.signals("task_prerun") if x["task_id"] == r.id]
    post = [x for x in w.signals("task_postrun") if x["task_id"] == r.id]
    assert pre == [{"signal": "task_prerun", "pid": pre[0]["pid"], "sender": st.add.name, "task_id": r.id,
                    "task": st.add.name, "args": [2, 3], "kwargs": {}}]
    assert post[0]["retval"] == 5 and post[0]["state"] == "SUCCESS" and post[0]["sender"] == st.add.name
    assert {"signal": "task_success", "pid": pre[0]["pid"], "sender": st.add.name, "result": 5} in w.signals("task_success")
    assert any(x["task_id"] == r.id for x in w.signals("task_received"))
    assert "Signal handler" in w.log() and "a receiver that raises" in w.log()


def test_sender_filtering_failure_and_retry_signals(worker):
    q, w = worker
    f = st.fail.apply_async(("my",), queue=q)
    with pytest.raises(st.MyError):
        f.get(timeout=WAIT)
    assert st.retry_once.apply_async(queue=q).get(timeout=WAIT) == "retried"
    assert [x["sender"] for x in w.signals("task_success")] == [st.add.name] * len(w.signals("task_success"))
    fail = [x for x in w.signals("task_failure") if x["task_id"] == f.id]
    assert fail and fail[0]["exception"] == "MyError" and fail[0]["einfo"] is True
    retry = [x for x in w.signals("task_retry") if x["sender"] == st.retry_once.name]
    assert retry and retry[0]["reason"] == "MyError"


def test_unknown_rejected_and_expired_tasks_send_their_signals(worker):
    q, w = worker
    r = st.app.send_task("nope.never", queue=q)
    with pytest.raises(Exception, match="not registered"):
        r.get(timeout=WAIT)
    assert [x for x in w.signals("task_unknown") if x["task_id"] == r.id][0]["exc"] == "NotRegistered"
    mid = f"garbage-{uuid.uuid4().hex}"
    st.app.client.publish(q, cbor2.dumps(["not", "an", "envelope"]), id=mid)
    with pytest.raises(RemoteError):
        st.app.AsyncResult(mid).get(timeout=WAIT)
    assert any(x["message_id"] == mid for x in w.signals("task_rejected"))
    e = st.add.apply_async((1, 2), queue=q, expires=dt.datetime.now(dt.timezone.utc) - dt.timedelta(seconds=5))
    assert e.get(timeout=WAIT, propagate=False).__class__.__name__ == "TaskRevokedError"
    assert [x for x in w.signals("task_revoked") if x["task_id"] == e.id][0]["expired"] is True
    assert e.id in st.app.control.inspect(destination=[NAME], timeout=5).revoked()[NAME]


def test_terminating_a_running_task_sends_task_revoked_with_its_request(worker):
    q, w = worker
    m = f"m-{uuid.uuid4().hex}"
    r = st.sleeper.apply_async((m, 30), queue=q)
    st.app.AsyncResult(m).get(timeout=WAIT)  # it runs
    st.app.control.terminate(r.id)
    assert r.get(timeout=WAIT, propagate=False).__class__.__name__ == "TaskRevokedError"  # brokerd says so at once

    def got():
        return [x for x in w.signals("task_revoked") if x["task_id"] == r.id]

    wait_for(got, "task_revoked from the worker that killed the task")  # it acts on the CONTROL a moment later
    assert got()[0]["terminated"] is True and got()[0]["expired"] is False
    assert r.id in st.app.control.inspect(destination=[NAME], timeout=5).revoked()[NAME]


def test_worker_signals_and_worker_process_init_in_every_pool_process(worker):
    q, w = worker
    stats = st.app.control.inspect(destination=[NAME], timeout=5).stats()[NAME]
    children = set(stats["pool"]["processes"])  # the two of -c 2, or their replacements
    inits = {x["pid"] for x in w.signals("worker_process_init")}
    assert children and children <= inits and len(inits) >= 2  # every pool process ran its receiver
    parent = stats["pid"]
    for name in ("celeryd_init", "worker_init", "worker_ready", "after_setup_logger"):
        got = w.signals(name)
        assert [x["pid"] for x in got] == [parent], name
    assert w.signals("celeryd_init")[0]["sender"] == NAME


def test_worker_shutdown_and_worker_process_shutdown_fire_when_a_worker_stops(broker, tmp_path):
    q = f"s.{uuid.uuid4().hex[:10]}"
    w = Worker(broker.address, q, tmp_path, "-c", "1", name="stopping@test")
    try:
        assert st.add.apply_async((1, 1), queue=q).get(timeout=WAIT) == 2
        child = {x["pid"] for x in w.signals("worker_process_init")}
    finally:
        assert w.stop() == 0, w.log()
    assert [x["pid"] for x in w.signals("worker_shutdown")] == [w.proc.pid]
    assert {x["pid"] for x in w.signals("worker_process_shutdown")} == child


def test_publish_signals_fire_in_the_caller_and_may_edit_the_headers(worker):
    from client.signals import after_task_publish, before_task_publish

    q, _ = worker
    seen = []

    def before(sender=None, body=None, routing_key=None, headers=None, **kw):
        headers["origin"] = "test-origin"  # what Celery's before_task_publish receivers do
        seen.append(("before", sender, routing_key, body["id"]))

    def after(sender=None, body=None, routing_key=None, **kw):
        seen.append(("after", sender, routing_key, body["id"]))

    before_task_publish.connect(before, sender=st.request_fields.name)
    after_task_publish.connect(after)
    try:
        r = st.request_fields.apply_async(queue=q)
        st.add.apply_async((1, 1), queue=q).get(timeout=WAIT)
    finally:
        assert before_task_publish.disconnect(before, sender=st.request_fields.name)
        assert after_task_publish.disconnect(after)
    assert seen[:2] == [("before", st.request_fields.name, q, r.id), ("after", st.request_fields.name, q, r.id)]
    assert [s[0] for s in seen[2:]] == ["after"]  # before_task_publish was for request_fields only
    assert r.get(timeout=WAIT)["origin"] == "test-origin"


# -- 7. request, results, inspect, control ----------------------------------------------------------
def test_the_request_has_celery_s_fields(worker):
    q, _ = worker
    r = st.request_fields.apply_async(queue=q)
    got = r.get(timeout=WAIT)
    assert got["correlation_id"] == r.id == got["id"]
    assert got["hostname"] == NAME
    assert got["delivery_info"]["routing_key"] == q and got["delivery_info"]["queue"] == q
    assert got["properties"]["correlation_id"] == r.id
    for key in ("group", "chord", "reply_to", "origin", "callbacks", "errbacks"):
        assert got[key] is None, key
    assert got["time_limit"] is None and got["soft_time_limit"] is None and got["timelimit"] == [None, None]
    timed = st.request_fields.apply_async(queue=q, time_limit=30, soft_time_limit=20).get(timeout=WAIT)
    assert (timed["time_limit"], timed["soft_time_limit"], timed["timelimit"]) == (30, 20, [30, 20])
    # the task's own limits when the call gives none (Celery 5.7's request.time_limit/soft_time_limit)
    declared = st.declared_limits.apply_async(queue=q).get(timeout=WAIT)
    assert (declared["time_limit"], declared["soft_time_limit"]) == (60, 45)
    assert got["replaced_task_nesting"] == 0


def test_async_result_surface(worker):
    q, _ = worker
    r = st.add.apply_async((4, 5), queue=q)
    assert r.task_id == r.id
    seen = []
    r.then(lambda res: seen.append(res.id))
    assert r.get(timeout=WAIT) == 9
    assert seen == [r.id]  # then() fired once, when get() saw it ready
    assert isinstance(r.date_done, dt.datetime) and r.date_done.tzinfo is not None
    again = st.app.AsyncResult(r.id)  # knows only the id: name, args and kwargs come from the result
    assert (again.name, again.args, again.kwargs) == (st.add.name, [4, 5], {})
    assert r.backend.get_task_meta(r.id)["status"] == "SUCCESS"
    p = st.parent_of_two.apply_async(queue=q)
    ids = p.get(timeout=WAIT)
    assert [c.id for c in p.children] == ids
    assert [(res.id, value) for res, value in p.collect(timeout=WAIT)] == [(p.id, ids), (ids[0], 2), (ids[1], 4)]


def test_a_signature_returned_from_a_pool_process_is_stored_as_its_map(worker):
    """It used to fail with EncodeError: the process pool could not pickle a signature holding its app."""
    from client.canvas import Signature, chain

    q, _ = worker
    value = st.return_a_signature.apply_async(queue=q).get(timeout=WAIT)
    assert type(value) is dict and value["subtask_type"] == "chain"
    again = Signature.from_dict(value, app=st.app)
    assert isinstance(again, chain) and [s.name for s in again.tasks[:1]] == [st.add.name]


def test_result_set_and_group_result(worker):
    q, _ = worker
    rs = ResultSet([st.add.apply_async((i, i), queue=q) for i in range(3)])
    assert rs.join(timeout=WAIT) == [0, 2, 4]
    assert rs.join_native(timeout=WAIT) == [0, 2, 4]
    assert rs.ready() and rs.successful() and not rs.failed() and not rs.waiting()
    assert rs.completed_count() == 3
    bad = ResultSet([st.fail.apply_async(("my",), queue=q)])
    assert bad.join(timeout=WAIT, propagate=False)[0].__class__ is st.MyError and bad.failed()
    gid = str(uuid.uuid4())
    g = GroupResult(gid, list(rs), app=st.app).save()
    back = GroupResult.restore(gid, app=st.app)
    assert back.children == g.children and back.join_native(timeout=WAIT) == [0, 2, 4]


def test_get_inside_a_task_is_refused_unless_asked_for(worker):
    from client._current import Request, current_request

    q, _ = worker
    r = st.add.apply_async((1, 1), queue=q)
    token = current_request.set(Request(id="x", task="t"))  # as inside a task a worker runs
    try:
        with pytest.raises(RuntimeError, match="Never call result.get"):
            r.get(timeout=WAIT)
        assert r.get(timeout=WAIT, disable_sync_subtasks=False) == 2
    finally:
        current_request.reset(token)


def test_inspect_reserved_active_query_task_queues_conf_report(worker):
    q, _ = worker
    m1, m2 = f"m-{uuid.uuid4().hex}", f"m-{uuid.uuid4().hex}"
    a = st.sleeper.apply_async((m1, 30), queue=q)  # ended below by terminate, long before 30 s
    b = st.sleeper.apply_async((m2, 30), queue=q)
    c = st.add.apply_async((7, 7), queue=q)  # -c 2, prefetch 4: held by the worker behind the two sleepers
    st.app.AsyncResult(m1).get(timeout=WAIT)
    st.app.AsyncResult(m2).get(timeout=WAIT)
    i = st.app.control.inspect(destination=[NAME], timeout=5)
    assert {t["id"] for t in i.active()[NAME]} == {a.id, b.id}
    reserved = i.reserved()[NAME]
    assert [t["id"] for t in reserved] == [c.id]
    got = i.query_task(a.id, c.id, "not-here")[NAME]
    assert {k: v[0] for k, v in got.items()} == {a.id: "active", c.id: "reserved"}
    assert got[a.id][1]["name"] == st.sleeper.name
    assert i.query_task([a.id])[NAME][a.id][0] == "active"
    assert i.scheduled() == {NAME: []}
    assert [x["name"] for x in i.active_queues()[NAME]] == [q]
    conf = i.conf()[NAME]
    assert conf["task_default_queue"] == "celery" and conf["task_signing_key"] is None
    assert conf["database_password"] == "***" and "hunter2" not in json.dumps(conf)
    assert "surface@test" in i.report()[NAME]["ok"]
    st.app.control.terminate([a.id, b.id])
    assert c.get(timeout=WAIT) == 14  # it ran once a slot was free


def test_control_time_limit_events_heartbeat_and_bad_values(worker):
    q, _ = worker
    ctl = st.app.control
    assert ctl.time_limit(st.sleeper.name, hard=0.5, destination=[NAME], reply=True,
                          timeout=5) == [{NAME: {"ok": "time limits set successfully"}}]
    try:
        with pytest.raises(TimeLimitExceeded):  # the worker enforces the limit it was told
            st.sleeper.apply_async((f"m-{uuid.uuid4().hex}", 10), queue=q).get(timeout=WAIT)
    finally:
        ctl.time_limit(st.sleeper.name, destination=[NAME], reply=True, timeout=5)
    m = f"m-{uuid.uuid4().hex}"
    assert st.sleeper.apply_async((m, 0.6), queue=q).get(timeout=WAIT) == "slept"  # and forgets it when unset
    bad = ctl.time_limit("no.such.task", soft=1, destination=[NAME], reply=True, timeout=5)[0][NAME]
    assert "no task named" in bad["error"]
    bad = ctl.time_limit(st.add.name, soft=float("inf"), destination=[NAME], reply=True, timeout=5)[0][NAME]
    assert "soft must be a number of seconds" in bad["error"]
    assert ctl.disable_events(destination=[NAME], reply=True, timeout=5) == [{NAME: {"ok": "task events disabled"}}]
    assert ctl.inspect(destination=[NAME], timeout=5).stats()[NAME]["task_events"] is False
    assert ctl.enable_events(destination=[NAME], reply=True, timeout=5) == [{NAME: {"ok": "task events enabled"}}]
    assert ctl.heartbeat(destination=[NAME], reply=True, timeout=5) == [{NAME: {"ok": "heartbeat sent"}}]
    assert "query_task needs ids" in st.app.client.control("query_task", {"ids": "x"}, timeout=5,
                                                            destination=[NAME])[NAME]["error"]
    # rate_limit is brokerd's (global, tests/e2e/test_flow.py): the reply says what brokerd set
    assert ctl.rate_limit(st.add.name, "10/m", reply=True) == [{"brokerd": {"ok": f"rate limit of {st.add.name} set to 10/m"}}]
    ctl.rate_limit(st.add.name, None)


def test_add_and_cancel_consumer(worker):
    q, _ = worker
    extra = f"s.{uuid.uuid4().hex[:10]}"
    ctl = st.app.control
    assert ctl.add_consumer(extra, destination=[NAME], reply=True, timeout=5) == [{NAME: {"ok": f"add consumer {extra!r}"}}]
    assert st.add.apply_async((3, 3), queue=extra).get(timeout=WAIT) == 6
    assert [x["name"] for x in ctl.inspect(destination=[NAME], timeout=5).active_queues()[NAME]] == [q, extra]
    assert ctl.cancel_consumer(extra, destination=[NAME], reply=True, timeout=5) == \
        [{NAME: {"ok": f"no longer consuming from {extra!r}"}}]
    assert "only queue" in ctl.cancel_consumer(q, destination=[NAME], reply=True, timeout=5)[0][NAME]["error"]
    left = st.add.apply_async((1, 1), queue=extra)
    assert st.app.client.stats(extra)["consumers"] == 0
    assert st.add.apply_async((2, 2), queue=q).get(timeout=WAIT) == 4  # the worker goes on with its queue
    assert left.state == "PENDING"
    err = ctl.add_consumer("", destination=[NAME], reply=True, timeout=5)[0][NAME]["error"]
    assert "a queue name of 1 to 255 characters" in err
    err = ctl.cancel_consumer("never-consumed", destination=[NAME], reply=True, timeout=5)[0][NAME]["error"]
    assert "does not consume" in err


def test_purge_drops_the_waiting_messages_of_the_app_s_queues(broker):
    q = f"p.{uuid.uuid4().hex[:10]}"
    st.app.conf.task_routes = {"never.consumed": {"queue": q}}
    try:
        st.app.send_task("never.consumed")
        st.app.send_task("never.consumed")
        assert st.app.control.purge() >= 2
        assert st.app.client.stats(q)["ready"] == 0
    finally:
        st.app.conf.task_routes = {}


# -- naive datetimes ---------------------------------------------------------------------------------
def test_naive_datetime_and_time_arguments_round_trip(worker):
    q, _ = worker
    naive, t, aware_t = st.TIMES
    got = st.echo_times.apply_async((naive, t), {"at": aware_t}, queue=q).get(timeout=WAIT)
    assert got["args"] == [["datetime", naive.isoformat(), False], ["time", t.isoformat(), False]]
    assert got["kwargs"] == {"at": ["time", aware_t.isoformat(), True]}
