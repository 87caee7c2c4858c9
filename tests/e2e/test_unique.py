"""Unique tasks end to end: a real brokerd, a real worker process, the SDK's apply_async(unique_key=...)
and @app.task(unique=True); runs are counted in a file the tasks append to."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import uuid

import pytest

from tests.e2e import unique_app
from tests.support.broker import ROOT, BrokerProcess

APP = "tests.e2e.unique_app:app"
WAIT = 20.0  # seconds any single result may take on a loaded box


@pytest.fixture
def brokerd(tmp_path):
    b = BrokerProcess(tmp_path / "data").start()
    unique_app.app.conf.broker_url = b.address
    unique_app.app.close()
    yield b
    unique_app.app.close()
    b.terminate()


@pytest.fixture
def start_worker(tmp_path):
    procs = []

    def start(b, queue):
        env = dict(os.environ, PYTHONPATH=str(ROOT), PYTHONUNBUFFERED="1")
        log = open(tmp_path / f"worker-{len(procs)}.log", "w")
        p = subprocess.Popen([sys.executable, "-m", "client.worker_cli", APP, "-b", b.address, "-Q", queue,
                              "-c", "2", "-n", f"u{len(procs)}@test"],
                             cwd=ROOT, env=env, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT)
        procs.append((p, log))
        return p

    yield start
    for p, log in procs:
        if p.poll() is None:
            p.send_signal(signal.SIGTERM)
            try:
                p.wait(15)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait(5)
        log.close()


def runs(path) -> list[str]:
    return path.read_text().splitlines() if path.exists() else []


def test_two_concurrent_publishes_with_one_key_run_once_and_both_get_its_result(brokerd, start_worker, tmp_path):
    q = f"u.{uuid.uuid4().hex[:8]}"
    path = tmp_path / "runs.txt"
    results = [None, None]
    go = threading.Barrier(2)

    def publish(i):
        go.wait(WAIT)
        results[i] = unique_app.rebuild_feed.apply_async((str(path), 42), queue=q, unique_key="feed:42",
                                                         unique_for=600)

    threads = [threading.Thread(target=publish, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(WAIT)
    assert results[0].id == results[1].id  # the duplicate names the first one's task
    assert "task_id  " in brokerd.admin("UNIQUE feed:42\n") and results[0].id in brokerd.admin("UNIQUE feed:42\n")
    start_worker(brokerd, q)
    assert [r.get(timeout=WAIT) for r in results] == ["feed 42 rebuilt"] * 2
    assert runs(path) == ["feed 42"]
    # until finished: the result freed the key, so the next publish runs again
    again = unique_app.rebuild_feed.apply_async((str(path), 42), queue=q, unique_key="feed:42")
    assert again.id != results[0].id and again.get(timeout=WAIT) == "feed 42 rebuilt"
    assert runs(path) == ["feed 42", "feed 42"]


def test_unique_true_keys_on_the_arguments(brokerd, start_worker, tmp_path):
    q = f"u.{uuid.uuid4().hex[:8]}"
    path = tmp_path / "runs.txt"
    a = unique_app.rebuild_once.apply_async((str(path), 1), queue=q)
    b = unique_app.rebuild_once.apply_async((str(path), 1), queue=q)
    c = unique_app.rebuild_once.apply_async((str(path), 2), queue=q)  # other arguments: another key
    assert a.id == b.id != c.id
    start_worker(brokerd, q)
    assert (a.get(timeout=WAIT), b.get(timeout=WAIT), c.get(timeout=WAIT)) == ("once 1", "once 1", "once 2")
    assert sorted(runs(path)) == ["once 1", "once 2"]


def test_a_held_key_survives_a_kill_and_restart(brokerd, tmp_path):
    q = f"u.{uuid.uuid4().hex[:8]}"
    first = unique_app.rebuild_feed.apply_async((str(tmp_path / "r"), 7), queue=q, unique_key="feed:7",
                                                unique_until="time", unique_for=600)
    brokerd.kill()  # kill -9: the key was confirmed with the publish
    unique_app.app.close()
    brokerd.restart()
    assert first.id in brokerd.admin("UNIQUE feed:7\n")
    dup = unique_app.rebuild_feed.apply_async((str(tmp_path / "r"), 7), queue=q, unique_key="feed:7")
    assert dup.id == first.id
    assert "OK 1 of 1 ready" in brokerd.admin(f"PEEK {q}\n")  # still one message, not two
