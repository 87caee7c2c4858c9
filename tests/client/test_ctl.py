"""``brokerd-ctl`` (client/ctl.py) against a real brokerd, and against a real worker for
``inspect`` and ``control``.

Each command runs twice, for people and with ``--json``; most in this process through
``client.ctl.main`` (output captured), ``events`` and the entry point as ``python -m client.ctl``.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import uuid

import pytest

from client import ctl
from client.producer import Client
from tests.support.broker import ROOT, BrokerProcess
from tests.worker.test_worker import WAIT, WorkerProcess, fresh_queue
from tests.worker_apps import tasks


@pytest.fixture(scope="module")
def ctl_broker(tmp_path_factory):
    b = BrokerProcess(tmp_path_factory.mktemp("ctl-broker"))
    b.start()
    yield b
    b.terminate()


@pytest.fixture(scope="module")
def setup(ctl_broker):
    """A queue with one ready message and one dead letter, a stored result, a schedule, a task's events."""
    q = fresh_queue()
    with Client(ctl_broker.address) as c:
        c.declare(q, max_attempts=5)
        c.publish(q, b"dead one", id="dead-1")
        with c.consume(q, prefetch=1) as consumer:
            consumer.get(WAIT).nack(requeue=False)
        c.publish(q, b"ready one", id="ready-1")
        c.store_result("res-1", "SUCCESS", {"answer": 42})
        c.schedule_put(f"sched-{q}", {"every": 3600, "queue": q, "body": b"tick"})
        c.emit_events("ctl-worker@test", [
            {"type": "worker-online", "freq": 2.0, "pool": "threads", "pool_size": 3, "queues": [q]},
            {"type": "task-received", "uuid": "res-1", "name": "proj.answer", "args": "()", "kwargs": "{}"},
            {"type": "task-started", "uuid": "res-1"},
            {"type": "task-succeeded", "uuid": "res-1", "runtime": 0.5, "result": "{'answer': 42}"},
        ])
    return q


# brokerd answers as soon as the named worker replies; the long limit only matters on a loaded machine
SLOW_OK = ("--control-timeout", str(WAIT))


def run(capsys, address, *args) -> tuple[int, str, str]:
    code = ctl.main(["-b", address, *args])
    out, err = capsys.readouterr()
    return code, out, err


def ok(capsys, address, *args) -> str:
    code, out, err = run(capsys, address, *args)
    assert code == 0, (args, out, err)
    assert not err, err
    return out


def ok_json(capsys, address, *args):
    return json.loads(ok(capsys, address, "--json", *args))


# -- the broker commands ------------------------------------------------------------------------
def test_ping(ctl_broker, capsys):
    assert ok(capsys, ctl_broker.address, "ping").startswith(f"OK brokerd at {ctl_broker.address} answered in ")
    j = ok_json(capsys, ctl_broker.address, "ping")
    assert j["ok"] is True and j["seconds"] >= 0 and j["server"].startswith("brokerd")


def test_ping_of_a_broker_that_is_not_there_fails_with_exit_1(capsys):
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    for args in (["ping"], ["--json", "ping"]):
        code, out, err = run(capsys, f"127.0.0.1:{port}", "--timeout", "2", *args)
        assert code == 1 and not out
        assert err.startswith(f"brokerd-ctl: cannot reach brokerd at 127.0.0.1:{port}")


def test_stats(ctl_broker, setup, capsys):
    out = ok(capsys, ctl_broker.address, "stats")
    assert out.startswith("OK stats\n") and re.search(r"^queues +\d+$", out, re.M) and "END" not in out
    j = ok_json(capsys, ctl_broker.address, "stats")
    assert j["broker"]["queues"] >= 1 and setup in j["queues"]


def test_queues_and_queue(ctl_broker, setup, capsys):
    out = ok(capsys, ctl_broker.address, "queues")
    row = next(line for line in out.splitlines() if line.startswith(setup + " "))
    assert row.split()[1:3] == ["1", "0"]  # one ready, none delayed
    j = ok_json(capsys, ctl_broker.address, "queues")
    assert j[setup]["ready"] == 1 and j[setup]["dead"] == 1
    out = ok(capsys, ctl_broker.address, "queue", setup)
    assert out.startswith(f"OK queue {setup}\n") and re.search(r"^option\.max_attempts +5$", out, re.M)
    j = ok_json(capsys, ctl_broker.address, "queue", setup)
    assert j["name"] == setup and j["options"]["max_attempts"] == 5


def test_errors_exit_1_with_the_code_and_message(ctl_broker, capsys):
    for args in (["queue", "nosuch"], ["--json", "queue", "nosuch"], ["purge", "nosuch"]):
        code, out, err = run(capsys, ctl_broker.address, *args)
        assert code == 1 and not out
        assert err == "brokerd-ctl: NOT_FOUND: queue 'nosuch' does not exist\n"


def test_usage_errors_exit_2(ctl_broker, capsys):
    for args in (["frobnicate"], ["queue"], ["control", "pool-grow"], ["control", "shutdown", "3"],
                 ["inspect", "everything"], ["dead", "q", "0"]):
        code, out, err = run(capsys, ctl_broker.address, *args)
        assert code == 2, args
        assert "usage: brokerd-ctl" in err


def test_pause_and_resume(ctl_broker, capsys):
    q = fresh_queue()
    with Client(ctl_broker.address) as c:
        c.declare(q)
        assert ok(capsys, ctl_broker.address, "pause", q) == f"OK paused {q}\n"
        assert c.stats(q)["paused"] is True
        assert ok(capsys, ctl_broker.address, "resume", q) == f"OK resumed {q}\n"
        assert c.stats(q)["paused"] is False
        assert ok_json(capsys, ctl_broker.address, "pause", q) == {"queue": q, "paused": True}
        assert c.stats(q)["paused"] is True
        assert ok_json(capsys, ctl_broker.address, "resume", q) == {"queue": q, "paused": False}
        assert c.stats(q)["paused"] is False


def test_purge(ctl_broker, capsys):
    q = fresh_queue()
    with Client(ctl_broker.address) as c:
        for _ in range(3):
            c.publish(q, b"x")
        assert ok(capsys, ctl_broker.address, "purge", q) == f"OK purged 3 messages from {q}\n"
        c.publish(q, b"x")
        assert ok_json(capsys, ctl_broker.address, "purge", q) == {"queue": q, "purged": 1}


def test_dead_and_requeue_dead(ctl_broker, capsys):
    q = fresh_queue()
    with Client(ctl_broker.address) as c:
        for i in range(2):
            c.publish(q, f"bad {i}".encode(), id=f"{q}-bad-{i}")
        with c.consume(q, prefetch=2) as consumer:
            for _ in range(2):
                consumer.get(WAIT).nack(requeue=False)
        out = ok(capsys, ctl_broker.address, "dead", q)
        assert out.startswith(f"OK 2 of 2 in {q}.dlq\n") and f"{q}-bad-0" in out
        j = ok_json(capsys, ctl_broker.address, "dead", q, "1")
        assert j["queue"] == q and len(j["dead_letters"]) == 1
        row = j["dead_letters"][0]
        assert row["id"] == f"{q}-bad-0" and row["body"] == "bad 0" and row["bytes"] == 5
        assert ok(capsys, ctl_broker.address, "requeue-dead", q) == f"OK requeued 2 dead letters to {q}\n"
        assert c.stats(q)["ready"] == 2
        assert ok_json(capsys, ctl_broker.address, "requeue-dead", q) == {"queue": q, "requeued": 0}


def test_result(ctl_broker, setup, capsys):
    out = ok(capsys, ctl_broker.address, "result", "res-1")
    assert out.startswith("OK result res-1\n") and re.search(r"^result +\{'answer': 42\}$", out, re.M)
    j = ok_json(capsys, ctl_broker.address, "result", "res-1")
    assert j["state"] == "SUCCESS" and j["result"] == {"answer": 42}
    assert ok_json(capsys, ctl_broker.address, "result", "nobody")["state"] == "PENDING"


def test_revoke(ctl_broker, capsys):
    tid = f"rev-{uuid.uuid4().hex}"
    assert ok(capsys, ctl_broker.address, "revoke", tid) == f"OK revoked {tid}\n"
    assert ok_json(capsys, ctl_broker.address, "revoke", tid, "--terminate") == {
        "id": tid, "revoked": 0, "terminate": True}  # 0: it was revoked already
    with Client(ctl_broker.address) as c:
        assert c.get_result(tid)["state"] == "REVOKED"


def test_schedules(ctl_broker, setup, capsys):
    out = ok(capsys, ctl_broker.address, "schedules")
    assert re.search(rf"^sched-{setup} +every 3600s +{setup} ", out, re.M)
    j = ok_json(capsys, ctl_broker.address, "schedules")
    assert any(e["name"] == f"sched-{setup}" and e["queue"] == setup for e in j)


def test_workers_and_task(ctl_broker, setup, capsys):
    # setup's connection registered ctl-worker@test and closed without worker-offline: lost
    out = ok(capsys, ctl_broker.address, "workers")
    assert re.search(rf"^ctl-worker@test +lost +threads +3 .* {setup}$", out, re.M)
    j = ok_json(capsys, ctl_broker.address, "workers")
    (me,) = [w for w in j if w["hostname"] == "ctl-worker@test"]
    assert me["state"] == "lost" and me["reason"] == "connection closed without worker-offline"
    out = ok(capsys, ctl_broker.address, "task", "res-1")
    assert out.startswith("OK task res-1\n") and re.search(r"^name +proj\.answer$", out, re.M)
    assert [line.split()[2] for line in out.splitlines() if line.startswith("  20")] == [
        "task-received", "task-started", "task-succeeded"]
    j = ok_json(capsys, ctl_broker.address, "task", "res-1")
    assert j["state"] == "SUCCESS" and j["result"] == {"answer": 42} and len(j["events"]) == 3
    assert ok_json(capsys, ctl_broker.address, "task", "nobody") == {"id": "nobody", "state": "PENDING", "events": []}


# -- events: a stream, until Ctrl-C ----------------------------------------------------------------
def _ctrl_c_as_at_a_terminal() -> None:
    # A suite started as a background job of a non-interactive shell (`.ci/run &`) inherits
    # SIGINT ignored, and Python keeps an ignored SIGINT ignored: Ctrl-C would never arrive.
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def ctl_process(address, *args) -> subprocess.Popen:
    env = dict(os.environ, PYTHONPATH=str(ROOT), PYTHONUNBUFFERED="1")
    return subprocess.Popen([sys.executable, "-m", "client.ctl", "-b", address, *args], cwd=ROOT, env=env,
                            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=_ctrl_c_as_at_a_terminal)


@pytest.mark.parametrize("json_mode", [False, True], ids=["text", "json"])
def test_events_stream_until_ctrl_c(ctl_broker, json_mode):
    tid = f"ev-{uuid.uuid4().hex}"
    with Client(ctl_broker.address) as c:
        c.emit_events("ctl-events@test", [{"type": "task-received", "uuid": tid, "name": "proj.replayed"}])
        p = ctl_process(ctl_broker.address, *(["--json"] if json_mode else []), "events", "--replay", "1")
        try:
            first = p.stdout.readline()  # the replayed event: the stream is up
            assert tid in first, (first, p.stderr.read() if p.poll() is not None else "")
            live = f"{tid}-live"
            c.emit_events("ctl-events@test", [{"type": "task-started", "uuid": live, "pid": 7}])
            line = p.stdout.readline()
            while live not in line:  # heartbeats of workers of other tests may come between
                line = p.stdout.readline()
                assert line, p.stderr.read()
        finally:
            p.send_signal(signal.SIGINT)
            code = p.wait(WAIT)
    assert code == 0, p.stderr.read()
    if json_mode:
        ev = json.loads(line)
        assert ev["type"] == "task-started" and ev["uuid"] == live and ev["hostname"] == "ctl-events@test"
        assert json.loads(first)["name"] == "proj.replayed"
    else:
        assert line.split()[1:4] == ["task-started", "ctl-events@test", live] and "pid=7" in line
        assert "name=proj.replayed" in first


# -- inspect and control, against a real worker ------------------------------------------------------
@pytest.fixture(scope="module")
def ctl_worker(ctl_broker, tmp_path_factory):
    q = fresh_queue()
    name = f"ctl-{uuid.uuid4().hex[:6]}@test"
    w = WorkerProcess(ctl_broker.address, q, "-c", "2", "--heartbeat-interval", "0.5",
                      log_dir=tmp_path_factory.mktemp("ctl-worker"), name=name)
    tasks.app.conf.broker_url = ctl_broker.address
    tasks.app.close()
    assert tasks.add.apply_async((1, 1), queue=q).get(timeout=WAIT) == 2
    yield q, w
    if w.proc.poll() is None:
        w.terminate()
    w.log_file.close()
    tasks.app.close()


def test_inspect_ping(ctl_broker, ctl_worker, capsys):
    q, w = ctl_worker
    out = ok(capsys, ctl_broker.address, "inspect", "ping", "-d", w.name, *SLOW_OK)
    assert out == f"-> {w.name}: pong\n"
    assert ok_json(capsys, ctl_broker.address, "inspect", "ping", "-d", w.name, *SLOW_OK) == {w.name: {"ok": "pong"}}
    assert tasks.app.control.ping(destination=[w.name], timeout=WAIT) == [{w.name: {"ok": "pong"}}]


def test_inspect_registered(ctl_broker, ctl_worker, capsys):
    q, w = ctl_worker
    out = ok(capsys, ctl_broker.address, "inspect", "registered", "-d", w.name, *SLOW_OK)
    # the worker imports tests.worker_apps.tasks only; this process's app also holds shared tasks of other tests
    own = [n for n in tasks.app.tasks if n.startswith("tests.worker_apps.tasks.")]
    assert out.startswith(f"-> {w.name}: {len(own)} registered tasks\n")
    assert "    * tests.worker_apps.tasks.add\n" in out
    j = ok_json(capsys, ctl_broker.address, "inspect", "registered", "-d", w.name, *SLOW_OK)
    assert "tests.worker_apps.tasks.flaky" in j[w.name]
    assert tasks.app.control.inspect(destination=[w.name], timeout=WAIT).registered() == j


def test_inspect_active(ctl_broker, ctl_worker, capsys):
    q, w = ctl_worker
    marker = f"m-{uuid.uuid4().hex}"
    r = tasks.slow.apply_async((2.0,), {"marker": marker}, queue=q)
    started = tasks.app.AsyncResult(marker).get(timeout=WAIT)  # it is running now
    out = ok(capsys, ctl_broker.address, "inspect", "active", "-d", w.name, *SLOW_OK)
    assert out.startswith(f"-> {w.name}: 1 active task\n")
    assert f"    * {r.id}  tests.worker_apps.tasks.slow(2.0,)  pid {started['pid']}\n" in out
    j = ok_json(capsys, ctl_broker.address, "inspect", "active", "-d", w.name, *SLOW_OK)
    (t,) = j[w.name]
    assert t["id"] == r.id and t["name"] == "tests.worker_apps.tasks.slow" and t["worker_pid"] == started["pid"]
    r.get(timeout=WAIT)
    assert ok_json(capsys, ctl_broker.address, "inspect", "active", "-d", w.name, *SLOW_OK) == {w.name: []}


def test_inspect_stats_and_pool_grow_and_shrink(ctl_broker, ctl_worker, capsys):
    q, w = ctl_worker

    def size():
        return ok_json(capsys, ctl_broker.address, "inspect", "stats", "-d", w.name, *SLOW_OK)[w.name]["pool"]["size"]

    out = ok(capsys, ctl_broker.address, "inspect", "stats", "-d", w.name, *SLOW_OK)
    assert out.startswith(f"-> {w.name}:\n") and '"implementation": "processes"' in out
    assert size() == 2
    # pool_grow is capped at the concurrency (-c 2): shrink first to leave room
    assert ok(capsys, ctl_broker.address, "control", "pool-shrink", "1", "-d", w.name, *SLOW_OK) == f"-> {w.name}: pool shrunk to 1\n"
    assert ok(capsys, ctl_broker.address, "control", "pool-grow", "2", "-d", w.name, *SLOW_OK) == (
        f"-> {w.name}: pool grown to 2 (capped at the worker's concurrency (-c) of 2; 2 more were asked for)\n")
    stats = ok_json(capsys, ctl_broker.address, "inspect", "stats", "-d", w.name, *SLOW_OK)[w.name]
    assert stats["pool"]["size"] == 2 and stats["pool_resized"]["grown"] == 1
    assert ok_json(capsys, ctl_broker.address, "control", "pool-shrink", "3", "-d", w.name, *SLOW_OK) == {
        w.name: {"ok": "pool shrunk to 1", "size": 1}}
    assert size() == 1
    assert tasks.add.apply_async((2, 2), queue=q).get(timeout=WAIT) == 4  # still works with one process
    assert tasks.app.control.pool_grow(1, destination=[w.name], reply=True, timeout=WAIT) == [
        {w.name: {"ok": "pool grown to 2", "size": 2}}]
    assert tasks.app.control.inspect(destination=[w.name], timeout=WAIT).stats()[w.name]["pool"]["size"] == 2


def test_inspect_with_no_worker_to_answer_exits_1(ctl_broker, capsys):
    code, out, err = run(capsys, ctl_broker.address, "inspect", "ping", "-d", "nobody@nowhere")
    assert code == 1 and not out and "no worker replied" in err
    assert tasks.app.control.inspect(destination=["nobody@nowhere"]).ping() is None


def test_control_shutdown_stops_the_worker_with_exit_0(ctl_broker, ctl_worker, capsys):
    q, w = ctl_worker
    out = ok(capsys, ctl_broker.address, "control", "shutdown", "-d", w.name, *SLOW_OK)
    assert out == f"-> {w.name}: shutting down (warm)\n"
    assert w.proc.wait(WAIT) == 0, w.log()
    j = ok_json(capsys, ctl_broker.address, "workers")
    assert next(x for x in j if x["hostname"] == w.name)["state"] == "offline"


def test_control_shutdown_with_json(ctl_broker, tmp_path, capsys):
    q = fresh_queue()
    name = f"ctl-{uuid.uuid4().hex[:6]}@test"
    w = WorkerProcess(ctl_broker.address, q, "-c", "1", "--pool", "threads", log_dir=tmp_path, name=name)
    try:
        tasks.app.conf.broker_url = ctl_broker.address
        assert tasks.add.apply_async((1, 2), queue=q).get(timeout=WAIT) == 3
        assert ok_json(capsys, ctl_broker.address, "control", "shutdown", "-d", name, *SLOW_OK) == {
            name: {"ok": "shutting down (warm)"}}
        assert w.proc.wait(WAIT) == 0, w.log()
    finally:
        if w.proc.poll() is None:
            w.kill()
        w.log_file.close()


def test_python_m_client_ctl_runs(ctl_broker):
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    p = subprocess.run([sys.executable, "-m", "client.ctl", "-b", ctl_broker.address, "ping"], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=WAIT)
    assert p.returncode == 0 and p.stdout.startswith("OK brokerd"), p.stderr
