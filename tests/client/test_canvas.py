"""Canvas, revokes and chords end to end: real brokerd, real workers."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from client import App
from client.app import RemoteError, TaskRevokedError
from client.canvas import GroupResult, chain, chord, group

ROOT = Path(__file__).resolve().parents[2]
MOD = "tests.canvas_apps.tasks"


def name(task):
    return f"{MOD}.{task}"


class Workers:
    def __init__(self, broker, tmp_path):
        self.broker = broker
        self.dir = tmp_path
        self.procs = []

    def start(self, *args):
        env = dict(os.environ, BROKERD_URL=self.broker.address, CANVAS_DIR=str(self.dir), PYTHONPATH=str(ROOT))
        log = open(self.dir / f"worker{len(self.procs)}.log", "w")  # a file: a full pipe would block the worker
        p = subprocess.Popen([sys.executable, "-m", "client.worker_cli", f"{MOD}:app", "-b", self.broker.address,
                              "-l", "warning", *args], cwd=ROOT, env=env,
                             stdout=subprocess.DEVNULL, stderr=log, text=True)
        self.procs.append(p)
        return p

    def stop(self):
        for p in self.procs:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for p in self.procs:
            try:
                p.wait(15)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait(5)

    def worker_logs(self) -> str:
        return "\n".join(p.read_text() for p in sorted(self.dir.glob("worker*.log")))

    def lines(self, fname):
        f = self.dir / fname
        return f.read_text().split() if f.exists() else []


@pytest.fixture
def env(broker, tmp_path):
    app = App("canvas-test", broker=broker.address)
    w = Workers(broker, tmp_path)
    yield app, w
    w.stop()
    app.close()


def sig(app, task, *args, **kw):
    from client.canvas import Signature

    return Signature(name(task), args, kw, app=app)


def test_chain_passes_each_result_to_the_next_step(env):
    app, w = env
    w.start("-P", "threads", "-c", "4")
    r = (sig(app, "add", 2, 2) | sig(app, "add", 4) | sig(app, "mul", 10)).apply_async()
    assert r.get(timeout=30) == 80
    assert r.parent.get(timeout=5) == 8 and r.parent.parent.get(timeout=5) == 4


def test_a_failed_chain_step_stops_the_chain_and_fails_what_follows_naming_the_step(env):
    app, w = env
    w.start("-P", "threads", "-c", "2")
    r = chain(sig(app, "add", 1, 1), sig(app, "boom"), sig(app, "record", "never")).apply_async()
    with pytest.raises(ValueError, match="^boom in step$") as e:  # the failed step's own exception (Celery's)
        r.get(timeout=30)
    cause = e.value.__cause__  # what is stored for the step after it: ChainError naming the failed step
    assert isinstance(cause, RemoteError) and cause.exc_type == "ChainError"
    assert f"chain step {name('boom')}[" in str(cause) and "ValueError: boom in step" in str(cause)
    with pytest.raises(ValueError, match="^boom in step$"):
        r.parent.get(timeout=30)
    assert w.lines("record.log") == []


def test_group_returns_results_in_order(env):
    app, w = env
    w.start("-P", "threads", "-c", "8")
    gr = group(sig(app, "slow_add", i, i, pause=0.05 * (10 - i)) for i in range(10)).apply_async()
    assert gr.get(timeout=30) == [2 * i for i in range(10)]
    assert gr.ready() and gr.successful() and gr.completed_count() == 10
    gr.save()
    again = GroupResult.restore(gr.id, app=app)
    assert [r.id for r in again] == [r.id for r in gr]


def test_chord_runs_its_body_once_with_all_results(env):
    app, w = env
    w.start("-P", "threads", "-c", "8")
    r = chord([sig(app, "add", i, i) for i in range(20)], sig(app, "tsum")).apply_async()
    assert r.get(timeout=30) == sum(2 * i for i in range(20))
    assert w.lines("tsum.log") == [str(sum(2 * i for i in range(20)))]


def test_a_100_member_chord_runs_its_body_exactly_once_while_a_worker_is_killed(env):
    app, w = env
    victim = w.start("-P", "processes", "-c", "2")
    w.start("-P", "processes", "-c", "2")
    r = chord([sig(app, "slow_add", i, 1, pause=0.02) for i in range(100)], sig(app, "tsum")).apply_async()
    time.sleep(0.5)
    victim.kill()  # SIGKILL mid-way: its unacked members are redelivered to the other worker
    assert r.get(timeout=60) == sum(i + 1 for i in range(100))
    time.sleep(0.5)
    assert w.lines("tsum.log") == [str(sum(i + 1 for i in range(100)))]


def test_a_chord_with_a_failing_member_calls_its_error_callback_and_not_its_body(env):
    """Celery's rule for a failed chord: the body's errbacks run as if the body had failed, an old-style
    one sent with the body's id (the chord's result id), a new-style one called with a request of that
    id and the ChordError naming the member that failed; each exactly once."""
    app, w = env
    w.start("-P", "threads", "-c", "4")
    body = sig(app, "tsum")
    body.link_error(sig(app, "old_errback"))
    body.link_error(sig(app, "new_errback"))
    r = chord([sig(app, "add", 1, 1), sig(app, "boom"), sig(app, "add", 2, 2)], body).apply_async()
    with pytest.raises(ValueError, match="^boom in step$") as e:  # the failed member's own (Celery's)
        r.get(timeout=30)
    assert e.value.__cause__.exc_type == "ChordError" and "ValueError: boom in step" in str(e.value.__cause__)
    deadline = time.monotonic() + 10
    while (not w.lines("old_errbacks.log") or not w.lines("new_errbacks.log")) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert w.lines("old_errbacks.log") == [r.id]
    assert w.lines("new_errbacks.log") == [r.id, "ChordError", "False"]  # no traceback: the body never ran
    assert w.lines("tsum.log") == []


def test_map_starmap_and_chunks(env):
    app, w = env
    w.start("-P", "threads", "-c", "4")
    add = app.tasks.get(name("add"))
    if add is None:  # this process never imported the task module: use signatures by name
        from tests.canvas_apps import tasks as t

        add = t.add
        add.app.conf.broker_url = app.conf.broker_url
    assert add.starmap([(1, 2), (3, 4)]).apply_async().get(timeout=30) == [3, 7]
    assert add.chunks([(i, i) for i in range(10)], 3).apply_async().get(timeout=30) == [[0, 2, 4], [6, 8, 10], [12, 14, 16], [18]]


def test_link_and_link_error_callbacks(env):
    app, w = env
    w.start("-P", "threads", "-c", "4")
    s = sig(app, "add", 20, 22)
    s.link(sig(app, "record"))
    s.apply_async().get(timeout=30)
    b = sig(app, "boom")
    b.link_error(sig(app, "old_errback"))
    b.link_error(sig(app, "new_errback"))
    failed = b.apply_async()
    with pytest.raises(ValueError):
        failed.get(timeout=30)
    deadline = time.monotonic() + 10
    while (not w.lines("record.log") or not w.lines("old_errbacks.log") or not w.lines("new_errbacks.log")) \
            and time.monotonic() < deadline:
        time.sleep(0.05)
    assert w.lines("record.log") == ["42"]
    # Celery's rule: a one-argument errback is sent the failed task's id; a wider one is called in the
    # worker with (request, exc, traceback)
    assert w.lines("old_errbacks.log") == [failed.id]
    assert w.lines("new_errbacks.log") == [failed.id, "ValueError", "True"]


def test_a_revoked_countdown_task_never_runs_even_across_a_broker_restart(env, broker):
    app, w = env
    r = sig(app, "record", "revoked").apply_async(countdown=2)
    r.revoke()
    assert r.state == "REVOKED"
    broker.kill()
    broker.restart()
    w.start("-P", "threads", "-c", "2")
    time.sleep(3)  # past its countdown
    sig(app, "record", "after").apply_async().get(timeout=30)
    assert w.lines("record.log") == ["after"]
    with pytest.raises(TaskRevokedError):
        app.AsyncResult(r.id).get(timeout=5)


def test_revoke_with_terminate_kills_a_running_task(env):
    app, w = env
    w.start("-P", "processes", "-c", "1")
    r = sig(app, "sleeper", 30).apply_async()
    deadline = time.monotonic() + 30
    while w.lines("sleeper.log") != ["started"] and time.monotonic() < deadline:
        time.sleep(0.05)  # polling a file the task writes when it starts
    assert w.lines("sleeper.log") == ["started"], w.worker_logs()
    app.control.revoke(r.id, terminate=True)
    with pytest.raises(TaskRevokedError):
        r.get(timeout=20)
    assert sig(app, "add", 1, 1).apply_async().get(timeout=30) == 2  # the pool goes on
    assert w.lines("sleeper.log") == ["started"]  # never "finished": it was killed
