"""The worker, tested as users run it: a real brokerd and real ``python -m client.worker_cli``
processes running the tasks of ``tests/worker_apps/tasks.py``.

No sleeps for synchronisation: a test waits on results (``AsyncResult.get(timeout=...)``),
and a task that must be seen running first stores a marker result (``tasks.signal``).
Every worker started here is stopped by its pid (SIGTERM, then SIGKILL).
"""

from __future__ import annotations

import datetime as dt
import os
import signal
import subprocess
import re
import sys
import time
import uuid

import cbor2
import pytest

from client.app import (
    EncodeError,
    NotRegistered,
    RemoteError,
    SoftTimeLimitExceeded,
    TaskRevokedError,
    TimeLimitExceeded,
)
from client import App, Client
from client.errors import Disconnected
from tests.support.broker import ROOT, BrokerProcess, broker_for_app
from tests.worker_apps import tasks

APP = "tests.worker_apps.tasks:app"
WAIT = 20.0  # seconds any single result may take on a loaded CI box


class WorkerProcess:
    """``python -m client.worker_cli ...`` with its stderr in a file."""

    def __init__(self, broker_address: str, queue: str, *args: str, log_dir, name: str | None = None):
        self.name = name or f"w-{uuid.uuid4().hex[:6]}@test"
        self.log_path = log_dir / f"{self.name}.log"
        cmd = [sys.executable, "-m", "client.worker_cli", APP, "-b", broker_address, "-Q", queue, "-n", self.name, *args]
        env = dict(os.environ, PYTHONPATH=str(ROOT), PYTHONUNBUFFERED="1")
        self.log_file = open(self.log_path, "w")
        self.proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdin=subprocess.DEVNULL, stdout=self.log_file,
                                     stderr=subprocess.STDOUT)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def log(self) -> str:
        self.log_file.flush()
        return self.log_path.read_text()

    def terminate(self, timeout: float = 30.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                return self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        return self.proc.wait(10)

    def kill(self) -> None:
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.wait(10)


@pytest.fixture(scope="module")
def shared_broker(tmp_path_factory):
    yield from broker_for_app(tmp_path_factory.mktemp("worker-broker"), tasks.app)


@pytest.fixture
def use_broker():
    """Point the test app at a broker (and drop its old connection)."""

    def point(b):
        tasks.app.conf.broker_url = b.address
        tasks.app.close()
        return b

    yield point


@pytest.fixture
def workers(tmp_path):
    started: list[WorkerProcess] = []

    def start(broker, queue, *args, name=None) -> WorkerProcess:
        w = WorkerProcess(broker.address, queue, *args, log_dir=tmp_path, name=name)
        started.append(w)
        return w

    yield start
    for w in started:
        if w.proc.poll() is None:
            w.proc.send_signal(signal.SIGTERM)
            try:
                w.proc.wait(15)
            except subprocess.TimeoutExpired:
                w.proc.kill()
                w.proc.wait(5)
        w.log_file.close()


def fresh_queue() -> str:
    return f"t.{uuid.uuid4().hex[:10]}"


@pytest.fixture(scope="module")
def shared(shared_broker, tmp_path_factory):
    """One worker (processes pool, -c 2) for the behaviours that need no worker of their own."""
    q = fresh_queue()
    w = WorkerProcess(shared_broker.address, q, "-c", "2", log_dir=tmp_path_factory.mktemp("shared-worker"),
                      name="shared@test")
    tasks.app.conf.broker_url = shared_broker.address
    assert tasks.add.apply_async((1, 1), queue=q).get(timeout=WAIT) == 2
    yield q, w
    assert w.terminate() == 0, w.log()
    w.log_file.close()


def ready(worker: WorkerProcess, queue: str) -> None:
    """Wait until the worker consumes ``queue`` (it runs a task)."""
    info = tasks.whoami.apply_async(queue=queue).get(timeout=WAIT)
    assert info["hostname"] == worker.name


# -- the basics --------------------------------------------------------------------------------
def test_delay_then_get_returns_the_value_and_request_details(shared):
    q, w = shared
    assert tasks.add.apply_async((2, 3), queue=q).get(timeout=WAIT) == 5
    info = tasks.whoami.apply_async(queue=q, priority=3).get(timeout=WAIT)
    assert info["hostname"] == "shared@test"
    assert info["retries"] == 0
    assert info["delivery_info"] == {"queue": q, "priority": 3, "redelivered": False, "attempts": 1,
                                     "exchange": "", "routing_key": q}  # Celery's keys too
    assert info["pid"] != w.pid  # ran in a pool process, not the worker's main process
    assert "] received" in w.log() and "] succeeded in " in w.log()


def test_track_started_stores_started_while_the_task_runs(shared):
    q, _ = shared
    marker = f"go-{uuid.uuid4().hex}"
    r = tasks.tracked.apply_async((marker,), queue=q)
    deadline = time.monotonic() + WAIT
    while r.state != "STARTED":  # polls brokerd; a task without track_started stays PENDING
        assert time.monotonic() < deadline, "the task never showed STARTED"
        time.sleep(0.02)
    assert r.info["hostname"] == "shared@test"
    tasks.signal(marker, True)
    assert r.get(timeout=WAIT) == "done" and r.state == "SUCCESS"


def test_update_state_shows_a_custom_state_while_the_task_runs(shared):
    q, _ = shared
    marker = f"go-{uuid.uuid4().hex}"
    r = tasks.progress.apply_async((marker,), queue=q)
    deadline = time.monotonic() + WAIT
    while r.state != "PROGRESS":
        assert time.monotonic() < deadline, "the task never showed PROGRESS"
        time.sleep(0.02)
    assert r.info == {"done": 1, "total": 2} and not r.ready()
    tasks.signal(marker, True)
    assert r.get(timeout=WAIT) == "finished"


def test_countdown_never_runs_early(shared):
    q, _ = shared
    eta = time.time() + 0.4
    r = tasks.started_at.apply_async(queue=q, countdown=0.4)
    assert r.get(timeout=WAIT) >= eta


def test_retry_with_backoff_then_success(shared, tmp_path):
    q, w = shared
    path = str(tmp_path / "calls")
    r = tasks.flaky.apply_async((path,), queue=q)
    assert r.get(timeout=WAIT) == {"calls": 3, "retries": 2}
    assert f"tests.worker_apps.tasks.flaky[{r.id}] retry: Retry in " in w.log()


def test_max_retries_then_failure_with_the_last_exception(shared, tmp_path):
    q, _ = shared
    path = tmp_path / "calls"
    r = tasks.always_fails.apply_async((str(path),), queue=q)
    with pytest.raises(KeyError, match="still broken"):
        r.get(timeout=WAIT)
    assert r.state == "FAILURE"
    assert "KeyError" in r.traceback
    assert len(path.read_text().splitlines()) == 3  # the first run and max_retries=2 retries


def test_retry_by_hand_counts_retries_in_the_headers(shared, tmp_path):
    q, _ = shared
    assert tasks.retries_by_hand.apply_async((str(tmp_path / "n"),), queue=q).get(timeout=WAIT) == 2


def test_acks_late_false_acks_on_receipt_and_still_retries(shared, tmp_path):
    q, _ = shared
    assert tasks.early_ack.apply_async((str(tmp_path / "n"),), queue=q).get(timeout=WAIT) == 2


def test_soft_time_limit_raises_inside_the_task(shared):
    q, _ = shared
    assert tasks.soft_caught.apply_async(queue=q).get(timeout=WAIT) == "soft-caught"
    with pytest.raises(SoftTimeLimitExceeded):
        tasks.soft_uncaught.apply_async(queue=q).get(timeout=WAIT)


def test_hooks_on_success_and_on_failure_are_called(shared, tmp_path):
    q, _ = shared
    path = str(tmp_path / "hooks")
    ok = tasks.hooked.apply_async((21,), {"path": path}, queue=q)
    assert ok.get(timeout=WAIT) == 42
    bad = tasks.hooked.apply_async((-1,), {"path": path}, queue=q)
    with pytest.raises(ArithmeticError, match="negative"):
        bad.get(timeout=WAIT)
    lines = open(path).read().splitlines()
    assert lines == [f"success {ok.id} 42", f"failure {bad.id} ArithmeticError ArithmeticError"]


def test_ignore_result_still_stores_a_failure(shared):
    q, _ = shared
    r = tasks.quiet_fail.apply_async((True,), queue=q)
    with pytest.raises(LookupError, match="quiet task failed"):
        tasks.app.AsyncResult(r.id).get(timeout=WAIT)  # looked up by id: waits for what is stored
    with pytest.raises(LookupError, match="quiet task failed"):  # the caller's ignored result: stored, so raised
        r.get(timeout=WAIT)


def test_unencodable_return_value_is_a_failure_naming_the_type(shared):
    q, _ = shared
    with pytest.raises(EncodeError, match=r"return value of tests\.worker_apps\.tasks\.bad_return \(object\)"):
        tasks.bad_return.apply_async(queue=q).get(timeout=WAIT)


def test_unserializable_argument_is_rejected_at_delay_naming_it(shared_broker):
    with pytest.raises(EncodeError, match=r"^argument 1 of tests\.worker_apps\.tasks\.add \(object\) cannot be sent"):
        tasks.add.delay(1, object())


def test_unknown_task_is_failure_and_reaches_the_dead_letter_queue(shared):
    q, _ = shared
    r = tasks.app.send_task("nope.nothing", (1,), queue=q)
    with pytest.raises(NotRegistered, match=r"'nope\.nothing' is not registered on worker shared@test.*@app\.task"):
        r.get(timeout=WAIT)
    assert tasks.app.client.stats(f"{q}.dlq")["ready"] == 1


def test_undecodable_message_is_failure_and_reaches_the_dead_letter_queue(shared):
    q, _ = shared
    mid = f"garbage-{uuid.uuid4().hex}"
    tasks.app.client.publish(q, cbor2.dumps(["not", "an", "envelope"]), id=mid)
    with pytest.raises(RemoteError, match=r"DecodeError: message .* is not a task envelope"):
        tasks.app.AsyncResult(mid).get(timeout=WAIT)
    assert tasks.app.client.stats(f"{q}.dlq")["ready"] >= 1


def test_expired_task_is_revoked_not_run(shared):
    q, _ = shared
    r = tasks.add.apply_async((1, 2), queue=q, expires=dt.datetime.now(dt.timezone.utc) - dt.timedelta(seconds=5))
    with pytest.raises(TaskRevokedError):
        r.get(timeout=WAIT)
    assert r.state == "REVOKED"


# -- scheduling ---------------------------------------------------------------------------------
def test_priority_is_respected_by_a_worker_with_prefetch_one(shared_broker, workers):
    q = fresh_queue()
    low = [tasks.started_at.apply_async(queue=q, priority=0) for _ in range(3)]
    high = [tasks.started_at.apply_async(queue=q, priority=9) for _ in range(3)]
    workers(shared_broker, q, "-c", "1", "--prefetch-multiplier", "1")
    high_times = [r.get(timeout=WAIT) for r in high]
    low_times = [r.get(timeout=WAIT) for r in low]
    assert max(high_times) < min(low_times)


# -- pools ------------------------------------------------------------------------------------------
def test_threads_pool_runs_tasks_and_retries(shared_broker, workers, tmp_path):
    q = fresh_queue()
    w = workers(shared_broker, q, "--pool", "threads", "-c", "3")
    info = tasks.whoami.apply_async(queue=q).get(timeout=WAIT)
    assert info["pid"] == w.pid  # a thread of the worker process
    assert tasks.add.apply_async((20, 22), queue=q).get(timeout=WAIT) == 42
    assert tasks.flaky.apply_async((str(tmp_path / "c"),), queue=q).get(timeout=WAIT)["calls"] == 3
    # best effort on threads: the exception lands between Python bytecodes, not inside time.sleep
    assert tasks.soft_spin.apply_async(queue=q).get(timeout=WAIT) == "soft-caught"
    with pytest.raises(TimeLimitExceeded):
        tasks.hard_limited.apply_async(queue=q).get(timeout=WAIT)
    assert tasks.add.apply_async((1, 1), queue=q).get(timeout=WAIT) == 2
    assert w.terminate() == 0, w.log()


def test_trio_pool_runs_async_tasks_concurrently(shared_broker, workers):
    q = fresh_queue()
    w = workers(shared_broker, q, "--pool", "trio", "-c", "10")
    a = tasks.async_nap.apply_async((0.5,), queue=q)
    b = tasks.async_nap.apply_async((0.5,), queue=q)
    (s1, e1), (s2, e2) = a.get(timeout=WAIT), b.get(timeout=WAIT)
    assert max(s1, s2) < min(e1, e2), "the two naps did not overlap"
    assert tasks.add.apply_async((2, 2), queue=q).get(timeout=WAIT) == 4  # a plain def task, in a thread
    with pytest.raises(SoftTimeLimitExceeded):
        tasks.async_too_slow.apply_async(queue=q).get(timeout=WAIT)
    assert w.terminate() == 0, w.log()


# -- failures of the worker itself -----------------------------------------------------------------
def test_hard_time_limit_is_failure_and_the_pool_keeps_working(shared_broker, workers):
    q = fresh_queue()
    w = workers(shared_broker, q, "-c", "1")
    r = tasks.hard_limited.apply_async(queue=q)
    with pytest.raises(TimeLimitExceeded, match="hard time limit of 0.5s"):
        r.get(timeout=WAIT)
    assert tasks.add.apply_async((3, 4), queue=q).get(timeout=WAIT) == 7
    assert "Hard time limit (0.5s) exceeded" in w.log()
    assert tasks.app.client.stats(q)["ready"] == 0  # acked, not redelivered


def test_os_exit_in_a_task_is_redelivered_and_completes(shared_broker, workers):
    q = fresh_queue()
    w = workers(shared_broker, q, "-c", "1")
    assert tasks.die_once.apply_async(queue=q).get(timeout=WAIT) == {"attempts": 2, "redelivered": True}
    assert "exited with code 3 while running tests.worker_apps.tasks.die_once" in w.log()


def test_kill_9_of_a_worker_mid_task_completes_on_another_worker(shared_broker, workers):
    q = fresh_queue()
    first = workers(shared_broker, q, "-c", "1")
    marker = f"started-{uuid.uuid4().hex}"
    r = tasks.slow.apply_async((0.5, marker), queue=q)
    assert tasks.app.AsyncResult(marker).get(timeout=WAIT)["hostname"] == first.name
    first.kill()
    second = workers(shared_broker, q, "-c", "1")
    assert r.get(timeout=WAIT) == {"hostname": second.name, "attempts": 2}


def test_max_tasks_per_child_replaces_pool_processes(shared_broker, workers):
    q = fresh_queue()
    workers(shared_broker, q, "-c", "1", "--max-tasks-per-child", "1")
    pids = [tasks.pid.apply_async(queue=q).get(timeout=WAIT) for _ in range(3)]
    assert len(set(pids)) == 3


def test_sigterm_is_a_warm_stop_that_loses_nothing(shared_broker, workers):
    q = fresh_queue()
    marker = f"started-{uuid.uuid4().hex}"
    running = tasks.slow.apply_async((1.0, marker), queue=q)
    waiting = [tasks.add.apply_async((i, i), queue=q) for i in range(3)]
    w = workers(shared_broker, q, "-c", "1", "--prefetch-multiplier", "4")  # all four are prefetched
    tasks.app.AsyncResult(marker).get(timeout=WAIT)
    w.proc.send_signal(signal.SIGTERM)
    assert w.proc.wait(WAIT) == 0, w.log()
    assert running.state == "SUCCESS"
    assert [r.state for r in waiting] == ["PENDING"] * 3
    assert tasks.app.client.stats(q)["ready"] == 3
    assert "warm stop" in w.log()
    workers(shared_broker, q, "-c", "1")
    assert [r.get(timeout=WAIT) for r in waiting] == [0, 2, 4]


def test_brokerd_restart_mid_stream_loses_no_confirmed_task(broker, use_broker, workers):
    use_broker(broker)
    q = fresh_queue()
    workers(broker, q, "-c", "2")
    before = [tasks.slow.apply_async((0.05,), queue=q) for _ in range(20)]
    before[0].get(timeout=WAIT)  # the worker is busy with them
    broker.kill()
    broker.restart()
    after = []
    deadline = time.monotonic() + WAIT
    while len(after) < 10:
        try:
            after.append(tasks.add.apply_async((len(after), 1), queue=q))
        except Disconnected:  # the app's connection died with the old broker: the next call reconnects
            assert time.monotonic() < deadline
    for r in before:
        assert r.get(timeout=WAIT)["hostname"].startswith("w-")
    assert [r.get(timeout=WAIT) for r in after] == list(range(1, 11))


# -- the command line -----------------------------------------------------------------------------------
def run_cli(*args, timeout=30.0):
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    return subprocess.run([sys.executable, "-m", "client.worker_cli", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)


@pytest.mark.parametrize("args, message", [
    (["proj.tasks"], "brokerd-worker: error: cannot import 'proj.tasks': No module named 'proj' (run from your project directory, or set PYTHONPATH)"),
    (["tests.worker_apps.tasks:nothing"], "brokerd-worker: error: 'tests.worker_apps.tasks' has no attribute 'nothing'"),
    (["tests.worker_apps"], "brokerd-worker: error: 'tests.worker_apps' has no attribute 'app' (and no App instance, nor tests.worker_apps.celery or tests.worker_apps.app module with one): give MODULE:APP"),
    ([APP, "-c", "0"], "brokerd-worker: error: argument -c/--concurrency: -c/--concurrency must be at least 1 (got 0)"),
    ([APP, "--autoscale", "2,5"], "brokerd-worker: error: argument --autoscale: --autoscale is MAX,MIN: MAX (2) must not be below MIN (5)"),
    ([APP, "--pool", "greenlet"], "brokerd-worker: error: argument -P/--pool: --pool must be processes, threads or trio (or Celery's prefork, solo, gevent, eventlet) (got 'greenlet')"),
    ([APP, "-O", "fast"], "brokerd-worker: error: argument -O: -O takes fair or default (got 'fast')"),
    ([APP, "--detach"], "brokerd-worker: error: --detach needs --logfile FILE: a detached worker has no terminal to log to"),
    ([APP, "-A", APP], f"brokerd-worker: error: give the app once: either MODULE[:APP] ({APP}) or -A ({APP})"),
    ([], "brokerd-worker: error: which app? give MODULE[:APP] or -A MODULE, e.g. brokerd-worker -A proj"),
    ([APP, "--pool", "trio", "--max-tasks-per-child", "5"], "brokerd-worker: error: --max-tasks-per-child applies to --pool processes only"),
    ([APP, "-Q", "a,,b"], "brokerd-worker: error: argument -Q/--queues: -Q takes queue names separated by commas, e.g. -Q high,low (got 'a,,b')"),
    ([APP, "-b", "localhost:http"], "brokerd-worker: error: argument -b/--broker: -b takes HOST:PORT, e.g. 127.0.0.1:7700 (got 'localhost:http')"),
])
def test_bad_command_lines_exit_2_with_a_message(args, message):
    p = run_cli(*args)
    assert p.returncode == 2, p.stderr
    assert p.stderr.splitlines()[-1] == message


def test_unreachable_broker_at_start_exits_3():
    with __import__("socket").socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # bound, not listening: connections are refused
        p = run_cli(APP, "-b", f"127.0.0.1:{port}", "--connect-timeout", "0.3")
    assert p.returncode == 3, p.stderr
    assert f"brokerd-worker: cannot reach brokerd at 127.0.0.1:{port}" in p.stderr
    assert "giving up" in p.stderr  # the bounded wait says how long it has left


def test_a_worker_started_before_brokerd_waits_for_it_and_says_so(tmp_path):
    """On Kubernetes or systemd a worker may start while brokerd still replays its log: by
    default it waits (capped back-off, a log line per attempt) instead of giving up."""
    import socket as socket_

    with socket_.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    q = fresh_queue()
    w = WorkerProcess(f"127.0.0.1:{port}", q, "-c", "1", log_dir=tmp_path)
    broker = BrokerProcess(tmp_path / "late-data")
    try:
        deadline = time.monotonic() + WAIT
        while w.log().count("cannot reach brokerd at") < 3:  # attempt 1, 2, 3...
            assert w.proc.poll() is None, w.log()
            assert time.monotonic() < deadline, w.log()
            time.sleep(0.1)
        assert re.search(r"cannot reach brokerd at 127\.0\.0\.1:\d+ \(.*\): attempt 3, retrying in", w.log()), w.log()
        assert "giving up" not in w.log()  # no deadline by default (--connect-timeout sets one)
        broker.start(port)
        producer = App("late-producer", broker=broker.address)
        try:
            assert producer.send_task("tests.worker_apps.tasks.add", (2, 3), queue=q).get(timeout=WAIT) == 5
        finally:
            producer.close()
    finally:
        w.terminate()
        broker.terminate()


def test_a_second_worker_with_a_taken_name_gets_a_unique_one_or_refuses_by_flag(shared_broker, workers, use_broker):
    use_broker(shared_broker)
    q = fresh_queue()
    first = workers(shared_broker, q, "-c", "1", name="twin@test")
    ready(first, q)
    second = workers(shared_broker, fresh_queue(), "-c", "1", name="twin@test")
    deadline = time.monotonic() + WAIT
    while "another worker named twin@test is online" not in second.log():
        assert second.proc.poll() is None and time.monotonic() < deadline, second.log()
        time.sleep(0.1)
    assert f"this one is twin-{second.pid}@test" in second.log()
    with Client(shared_broker.address) as c:
        deadline = time.monotonic() + WAIT
        while True:
            names = {w["hostname"] for w in c.workers() if w["state"] == "online"}
            if f"twin-{second.pid}@test" in names or time.monotonic() > deadline:
                break
            time.sleep(0.2)
    assert {"twin@test", f"twin-{second.pid}@test"} <= names
    p = run_cli(APP, "-b", shared_broker.address, "-Q", q, "-n", "twin@test", "--refuse-duplicate-name")
    assert p.returncode == 2, p.stderr
    assert p.stderr.splitlines()[-1] == (
        f"brokerd-worker: another worker named 'twin@test' is online at {shared_broker.address}; "
        "give this one its own name with -n NAME")
