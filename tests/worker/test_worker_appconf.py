"""Celery's worker command lines and app-level wiring, against a real brokerd and real
``python -m client.worker_cli`` processes (issue 14 items 1-3 and 7): ``-A proj worker`` finding
``proj.celery``, shared tasks found by a lazy ``autodiscover_tasks``, ``--include``, ``app.Task`` as
the tasks' base in the worker, per-call ``ignore_result``, ``throws``, and the service-file flags
(``-P solo``, ``-O fair``, ``--without-*``, ``--pidfile``, ``--logfile``, ``--detach``, ``--purge``, ``-B``).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid

import pytest

from client.app import AsyncResult
from tests.support.broker import ROOT, broker_for_app
from tests.worker_apps.appconf_proj import celery as proj
from tests.worker_apps.appconf_proj import tasks

WAIT = 20.0  # seconds any single result may take on a loaded CI box
PROJ = "tests.worker_apps.appconf_proj"


def worker_cmd(broker, *args):
    return [sys.executable, "-m", "client.worker_cli", "-A", PROJ, "worker", "-b", broker.address, *args]


def env():
    return dict(os.environ, PYTHONPATH=str(ROOT), PYTHONUNBUFFERED="1")


def stop(proc):
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            return proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
    return proc.wait(10)


def wait_until(predicate, what, timeout=WAIT):
    """Poll a file-system fact (a pid file, a log line) that has no event to await; bounded."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


@pytest.fixture(scope="module")
def broker(tmp_path_factory):
    yield from broker_for_app(tmp_path_factory.mktemp("appconf-broker"), proj.app)


@pytest.fixture(scope="module")
def celery_style_worker(broker, tmp_path_factory):
    """``brokerd-worker -A proj worker`` with the flags of a typical Celery service file."""
    d = tmp_path_factory.mktemp("appconf-worker")
    queue = f"q.{uuid.uuid4().hex[:8]}"
    pidfile, logfile = d / "w.pid", d / "w.log"
    proc = subprocess.Popen(
        worker_cmd(broker, "-Q", queue, "-n", "appconf@test", "-P", "solo", "-O", "fair", "--without-gossip",
                   "--without-mingle", "--without-heartbeat", "--pidfile", str(pidfile), "--logfile", str(logfile),
                   "--include", f"{PROJ}.included", "-s", str(d / "celerybeat-schedule"), "--statedb",
                   str(d / "state.db"), "-B", "-l", "info"),
        cwd=ROOT, env=env(), stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    proj.app.set_default()  # the shared tasks below resolve to this app in the test process too
    try:
        assert tasks.add.apply_async((1, 1), queue=queue).get(timeout=WAIT) == 2
        yield queue, proc, pidfile, logfile
    finally:
        code = stop(proc)
        out = proc.stdout.read().decode()
        proc.stdout.close()
        assert code == 0, logfile.read_text() if logfile.exists() else out


def test_dash_A_finds_proj_celery_and_autodiscovered_shared_tasks_run(celery_style_worker):
    queue, *_ = celery_style_worker
    assert tasks.add.apply_async((20, 22), queue=queue).get(timeout=WAIT) == 42


def test_include_imports_a_module_nothing_else_imports(celery_style_worker):
    queue, *_ = celery_style_worker
    assert proj.app.send_task("appconf.included", queue=queue).get(timeout=WAIT) == "included"


def test_the_apps_Task_base_class_wraps_every_task_in_the_worker(celery_style_worker):
    queue, *_ = celery_style_worker
    assert tasks.context.apply_async(queue=queue).get(timeout=WAIT) == "in the app's context"


def test_per_call_ignore_result_stores_nothing(celery_style_worker):
    queue, *_ = celery_style_worker
    ignored = tasks.add.apply_async((1, 2), queue=queue, ignore_result=True)
    kept = tasks.add.apply_async((3, 4), queue=queue)
    assert kept.get(timeout=WAIT) == 7  # -P solo: one at a time, in order, so `ignored` has run
    assert AsyncResult(ignored.id, app=proj.app).state == "PENDING"
    # Celery's result.ignored: get() of a result that will never be stored returns None at once
    # (it used to wait for ever: Celery's test_ignore_result hung the integration run)
    assert ignored.ignored is True and kept.ignored is False
    assert ignored.get(timeout=WAIT) is None
    assert AsyncResult(ignored.id, app=proj.app).ignored is False  # looked up by id: nothing known


def test_a_task_s_own_ignore_result_marks_the_callers_result_ignored(broker):
    """The task's ignore_result (then task_ignore_result) decides when the call says nothing; nothing
    needs to run for the caller's result to know it will never be stored."""
    queue = f"q.{uuid.uuid4().hex[:8]}"  # no worker reads it
    assert tasks.quiet.apply_async(queue=queue).get(timeout=WAIT) is None
    assert tasks.quiet.apply_async(queue=queue, ignore_result=False).ignored is False
    assert tasks.add.apply_async((1, 2), queue=queue).ignored is False
    proj.app.conf.task_ignore_result = True
    try:
        assert tasks.add.apply_async((1, 2), queue=queue).ignored is True
    finally:
        proj.app.conf.task_ignore_result = False


def test_throws_logs_an_expected_exception_without_the_error_line(celery_style_worker):
    queue, _, _, logfile = celery_style_worker
    exp = tasks.expected.apply_async(queue=queue)
    with pytest.raises(KeyError):
        exp.get(timeout=WAIT)
    unexp = tasks.unexpected.apply_async(queue=queue)
    with pytest.raises(ValueError):
        unexp.get(timeout=WAIT)
    wait_until(lambda: f"[{unexp.id}] raised unexpected" in logfile.read_text(), "the unexpected failure's log line")
    log = logfile.read_text()
    assert f"expected[{exp.id}] raised expected: KeyError('an expected miss')" in log
    assert f"[{exp.id}] raised unexpected" not in log


def test_service_file_flags_pidfile_logfile_and_noops_say_so(celery_style_worker):
    queue, proc, pidfile, logfile = celery_style_worker
    assert pidfile.read_text().strip() == str(proc.pid)
    log = logfile.read_text()
    for line in ("-P solo: running one task at a time", "-O fair: nothing to do",
                 "--without-gossip: accepted", "--without-mingle: accepted", "--without-heartbeat: accepted",
                 "-s/-S: accepted, unused", "--statedb: accepted, unused", "-B: 1 periodic task pushed to brokerd",
                 f"task {tasks.limited.name} has rate_limit=10/m: brokerd paces its deliveries, for all workers "
                 "together (Celery's limit is per worker)"):
        assert line in log, line
    names = {e["name"] for e in proj.app.client.schedule_list("appconf_proj")}
    assert "appconf-hourly-add" in names  # -B pushed the schedule the app declares


def test_pidfile_is_removed_at_exit_and_a_live_one_refuses_a_second_worker(broker, tmp_path):
    pidfile = tmp_path / "w.pid"
    queue = f"q.{uuid.uuid4().hex[:8]}"
    proc = subprocess.Popen(worker_cmd(broker, "-Q", queue, "-P", "threads", "-c", "1", "--pidfile", str(pidfile)),
                            cwd=ROOT, env=env(), stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)
    try:
        proj.app.set_default()
        assert tasks.add.apply_async((2, 2), queue=queue).get(timeout=WAIT) == 4
        second = subprocess.run(worker_cmd(broker, "-Q", queue, "--pidfile", str(pidfile)), cwd=ROOT, env=env(),
                                capture_output=True, text=True, timeout=60)
        assert second.returncode == 2
        assert f"process {proc.pid} (another worker?) is running" in second.stderr
    finally:
        assert stop(proc) == 0
        proc.stderr.close()
    assert not pidfile.exists()


def test_purge_drops_waiting_tasks_before_consuming(broker, tmp_path):
    queue = f"q.{uuid.uuid4().hex[:8]}"
    proj.app.set_default()
    waiting = [tasks.add.apply_async((i, i), queue=queue) for i in range(3)]
    logfile = tmp_path / "w.log"
    proc = subprocess.Popen(worker_cmd(broker, "-Q", queue, "-P", "threads", "--purge", "--logfile", str(logfile)),
                            cwd=ROOT, env=env(), stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    try:
        wait_until(lambda: logfile.exists() and "--purge: dropped" in logfile.read_text(), "the purge's log line")
        assert f"--purge: dropped 3 waiting tasks of queue {queue}" in logfile.read_text()
        assert tasks.add.apply_async((5, 5), queue=queue).get(timeout=WAIT) == 10  # sent after the purge: runs
        assert [AsyncResult(r.id, app=proj.app).state for r in waiting] == ["PENDING"] * 3
    finally:
        assert stop(proc) == 0


def test_detach_runs_in_the_background_with_its_pid_in_the_pidfile(broker, tmp_path):
    queue = f"q.{uuid.uuid4().hex[:8]}"
    pidfile, logfile = tmp_path / "d.pid", tmp_path / "d.log"
    p = subprocess.run(worker_cmd(broker, "-Q", queue, "-P", "threads", "-c", "1", "--detach", "--pidfile",
                                  str(pidfile), "--logfile", str(logfile)),
                       cwd=ROOT, env=env(), stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, p.stderr  # the foreground process returns at once
    wait_until(lambda: pidfile.exists() and pidfile.read_text().strip(), "the daemon's pid file")
    pid = int(pidfile.read_text())
    try:
        proj.app.set_default()
        assert tasks.add.apply_async((3, 3), queue=queue).get(timeout=WAIT) == 6
        assert os.getsid(pid) != os.getsid(0)  # a session of its own: detached from our terminal
    finally:
        os.kill(pid, signal.SIGTERM)

        def gone():
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                return True
            return False

        wait_until(gone, "the daemon to exit")
    assert not pidfile.exists()


def test_app_start_and_worker_main_run_a_worker_with_the_cli_flags(broker, tmp_path):
    queue = f"q.{uuid.uuid4().hex[:8]}"
    code = ("import sys; from tests.worker_apps.appconf_proj.celery import app; "
            f"app.start(['worker', '-b', {broker.address!r}, '-Q', {queue!r}, '-P', 'threads', '-c', '1'])")
    proc = subprocess.Popen([sys.executable, "-c", code], cwd=ROOT, env=env(), stdin=subprocess.DEVNULL,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        proj.app.set_default()
        assert tasks.add.apply_async((7, 7), queue=queue).get(timeout=WAIT) == 14
    finally:
        assert stop(proc) == 0
        proc.stderr.close()
