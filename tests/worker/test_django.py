"""Django, first class (issue 14 item 1), against a real brokerd and real worker processes.

Two projects under tests/fixtures, each copied to a temporary directory (its sqlite database is
made there) and run only in subprocesses, so pytest's own process never configures Django:

* ``djproj``: a small project whose ``shop`` app has tasks written with ``from client import
  shared_task`` and settings under ``CELERY_*``; its own Django tests (``manage.py test``) override
  settings; a producer script sends tasks, one with ``delay_on_commit`` inside a transaction.
* ``celery_django_example``: Celery 5.7.0's own ``examples/django``, changed only in its imports
  and broker address (see its PORTED.md), run as its README says.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import uuid

import pytest

from tests.support.broker import ROOT, BrokerProcess

pytest.importorskip("django", reason="Django is not installed (pip install -e '.[test]' installs it)")

FIXTURES = ROOT / "tests" / "fixtures"
WAIT = 60.0  # seconds for a subprocess (Django start-up, migrations) on a loaded CI box


@pytest.fixture(scope="module")
def broker(tmp_path_factory):
    b = BrokerProcess(tmp_path_factory.mktemp("django-broker")).start()
    yield b
    b.terminate()


def project(name, tmp_path, broker, queue):
    d = tmp_path / name
    shutil.copytree(FIXTURES / name, d, ignore=shutil.ignore_patterns("__pycache__", "*.sqlite3"))
    env = dict(os.environ, PYTHONPATH=f"{d}{os.pathsep}{ROOT}", PYTHONUNBUFFERED="1", BROKERD_URL=broker.address,
               DJPROJ_DB=str(d / "db.sqlite3"), DJPROJ_QUEUE=queue)
    env.pop("DJANGO_SETTINGS_MODULE", None)  # the project's own celery.py / manage.py sets it
    return d, env


def run(cmd, cwd, env):
    p = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=WAIT)
    assert p.returncode == 0, f"{cmd}: exit {p.returncode}\n{p.stdout}\n{p.stderr}"
    return p.stdout


class Worker:
    def __init__(self, cwd, env, *args):
        self.log_path = cwd / "worker.log"
        self.log = open(self.log_path, "w")
        self.proc = subprocess.Popen([sys.executable, "-m", "client.worker_cli", *args], cwd=cwd, env=env,
                                     stdin=subprocess.DEVNULL, stdout=self.log, stderr=subprocess.STDOUT)

    def stop(self) -> str:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self.log.close()
        return self.log_path.read_text()


def test_a_django_project_with_shared_tasks_runs_on_a_worker_that_sets_django_up(broker, tmp_path):
    queue = f"dj.{uuid.uuid4().hex[:8]}"
    d, env = project("djproj", tmp_path, broker, queue)
    run([sys.executable, "manage.py", "migrate", "-v", "0"], d, env)
    # -A djproj: the package, whose djproj.celery holds the app; -c 1: one pool process runs every task
    w = Worker(d, env, "-A", "djproj", "worker", "-Q", queue, "-c", "1", "-l", "info")
    try:
        out = json.loads(run([sys.executable, "produce.py"], d, env).strip().splitlines()[-1])
    finally:
        log = w.stop()
    assert w.proc.returncode == 0, log
    assert out["add"] == 5  # autodiscover_tasks() found shop.tasks; django.setup() let it import models
    assert out["count_on_commit"] == 2  # sent at commit, so the worker saw both rows
    assert out["opened"] is True
    assert out["closed_after"] is True, "the worker did not close the stale connection between tasks"
    assert "Django" in log and "set up" in log


def test_the_projects_own_django_tests_with_override_settings_pass(broker, tmp_path):
    d, env = project("djproj", tmp_path, broker, "unused")
    p = subprocess.run([sys.executable, "manage.py", "test", "shop", "-v", "2"], cwd=d, env=env, capture_output=True,
                       text=True, timeout=WAIT)
    assert p.returncode == 0, p.stderr
    assert "Ran 3 tests" in p.stderr and "OK" in p.stderr


def test_celerys_own_django_example_runs_with_only_imports_and_the_broker_address_changed(broker, tmp_path):
    d, env = project("celery_django_example", tmp_path, broker, "unused")
    run([sys.executable, "manage.py", "migrate", "-v", "0"], d, env)
    w = Worker(d, env, "-A", "proj", "worker", "-l", "INFO", "-c", "1")  # its README: celery -A proj worker -l INFO
    try:
        # its README: `python ./manage.py shell`, then add.delay_on_commit(2, 3).get() → 5
        script = ("from demoapp.tasks import add, mul, xsum, count_widgets, rename_widget\n"
                  "from demoapp.models import Widget\n"
                  "w = Widget.objects.create(name='old')\n"
                  "res = add.delay_on_commit(2, 3)\n"
                  "print(res.get(timeout=20), mul.delay(4, 5).get(timeout=20), xsum.delay([1, 2, 3]).get(timeout=20))\n"
                  "rename_widget.delay(w.id, 'new').get(timeout=20)\n"
                  "print(count_widgets.delay().get(timeout=20), Widget.objects.get(id=w.id).name)\n")
        out = run([sys.executable, "manage.py", "shell", "-c", script], d, env)
    finally:
        log = w.stop()
    assert w.proc.returncode == 0, log
    # (Django 5.2's shell first says how many objects it imported: only the last two lines are the script's)
    assert " ".join(out.strip().splitlines()[-2:]).split() == ["5", "20", "6", "1", "new"]
