"""Flower, unchanged, shows brokerd's Celery workers and tasks (issue 13 item 5).

A real brokerd, one real ``celery worker`` (task events on, ``-E``) on the ``brokerd://``
transport, and Flower started as its docs say (``celery --broker=brokerd://... flower``) on
127.0.0.1.  Headless Chromium loads Flower's dashboard and tasks pages; the worker's name and
the tasks' ids must appear there.  This exercises what Flower needs from a broker: the
``celeryev`` topic exchange (task and worker events; brokerd's native exchanges, protocol.md)
and the ``celery.pidbox`` fanout (Flower's inspect of the workers), through client/celery/.

It waits for two pieces built in parallel (issue 13): the kombu transport + result backend
(``client/celery/``) and brokerd's exchanges wired into that transport's fanout/topic seam.
Until both are on the branch it fails (no ``brokerd`` transport, or no events reach Flower);
it is not skipped for that.  It skips only when Flower, Celery or Chromium is not installed.
"""

from __future__ import annotations

import http.client
import importlib.util
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time

import pytest

from tests.runtime.test_web import CHROMIUM
from tests.support.broker import ROOT, BrokerProcess

pytestmark = [
    pytest.mark.skipif(importlib.util.find_spec("celery") is None,
                       reason="celery not installed: pip install -e '.[test]'"),
    pytest.mark.skipif(importlib.util.find_spec("flower") is None,
                       reason="flower not installed: pip install -e '.[test]'"),
    pytest.mark.skipif(CHROMIUM is None, reason="chromium not installed: apt-get install chromium"),
]

# seconds; each wait is bounded, and the whole test stays well under the 30 s CI allowance
# on an idle box (worker ~4 s cold, Flower ~2 s, Chromium ~2 s)
START_TIMEOUT = 25.0
PAGE_TIMEOUT = 20.0
N_TASKS = 3

APP = textwrap.dedent("""
    # written as Celery's docs write it; only the URL and README's one line are brokerd's
    import os
    from celery import Celery
    import client.celery  # registers brokerd:// with kombu (README: the one extra line)

    app = Celery("flowerapp", broker=os.environ["FLOWER_TEST_URL"], backend=os.environ["FLOWER_TEST_URL"])

    @app.task
    def add(x, y):
        return x + y
""")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def stop(proc: subprocess.Popen) -> None:
    """Stop a child we started (its own process group: Celery's pool children too), by its pid."""
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(5)


def wait_http(port: int, path: str, timeout: float, proc: subprocess.Popen, logpath) -> None:
    deadline = time.monotonic() + timeout
    while True:
        assert proc.poll() is None, f"Flower exited ({proc.returncode}):\n{open(logpath).read()[-3000:]}"
        try:
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
            conn.request("GET", path)
            if conn.getresponse().status == 200:
                return
        except OSError:
            pass
        assert time.monotonic() < deadline, f"Flower not serving {path} within {timeout}s:\n" \
                                            f"{open(logpath).read()[-3000:]}"
        time.sleep(0.1)


def test_flower_dashboard_shows_the_brokerd_worker_and_its_tasks(tmp_path):
    from celery import Celery

    import client.celery  # noqa: F401  (the one line: brokerd:// for this process's app too)

    from tests.runtime.test_web_login import DevTools

    broker = BrokerProcess(tmp_path / "data").start()
    url = f"brokerd://{broker.address}"
    (tmp_path / "flowerapp.py").write_text(APP)
    env = dict(os.environ, FLOWER_TEST_URL=url, PYTHONUNBUFFERED="1",
               PYTHONPATH=os.pathsep.join([str(tmp_path), str(ROOT), os.environ.get("PYTHONPATH", "")]))
    procs: list[subprocess.Popen] = []

    def spawn(name: str, *args: str) -> tuple[subprocess.Popen, str]:
        logpath = str(tmp_path / f"{name}.log")
        p = subprocess.Popen([sys.executable, "-m", "celery", *args], cwd=tmp_path, env=env,
                             stdin=subprocess.DEVNULL, stdout=open(logpath, "w"), stderr=subprocess.STDOUT,
                             start_new_session=True)
        procs.append(p)
        return p, logpath

    app = Celery("flowerapp", broker=url, backend=url)
    dt = None
    try:
        worker, worker_log = spawn("worker", "-A", "flowerapp", "worker", "--pool", "solo", "-E",
                                   "-n", "flowerw@%h", "-l", "info")
        # the worker is up when it runs a task (not when it prints a banner)
        try:
            assert app.send_task("flowerapp.add", (0, 0)).get(timeout=START_TIMEOUT) == 0
        except Exception as e:
            raise AssertionError(f"the Celery worker on brokerd did not run a task: {e!r}\n"
                                 f"{open(worker_log).read()[-3000:]}") from e

        port = free_port()
        flower, flower_log = spawn("flower", "-A", "flowerapp", f"--broker={url}", "flower",
                                   "--address=127.0.0.1", f"--port={port}")
        wait_http(port, "/healthcheck", START_TIMEOUT, flower, flower_log)

        dt = DevTools(str(tmp_path / "profile"))
        target = dt.call("Target.createTarget", {"url": "about:blank"})["targetId"]
        sid = dt.call("Target.attachToTarget", {"targetId": target, "flatten": True})["sessionId"]

        def js(expr: str):
            return dt.call("Runtime.evaluate", {"expression": expr, "returnByValue": True}, sid)["result"].get("value")

        def page_shows(path: str, needles: list[str], what: str) -> str:
            """Load the page (again, until it shows them: Flower fills its tables from events as they come)."""
            deadline = time.monotonic() + PAGE_TIMEOUT
            while True:
                dt.call("Page.navigate", {"url": f"http://127.0.0.1:{port}{path}"}, sid)
                inner_deadline = min(deadline, time.monotonic() + 3.0)  # one load, its scripts and XHRs
                while True:
                    text = js("document.readyState === 'complete' && document.body ? document.body.innerText : ''") or ""
                    if all(n in text for n in needles):
                        return text
                    if time.monotonic() > inner_deadline:
                        break
                    time.sleep(0.2)
                assert time.monotonic() < deadline, (
                    f"{what}: Flower's {path} did not show {needles} within {PAGE_TIMEOUT}s; page:\n{text[:2000]}"
                    f"\nflower log:\n{open(flower_log).read()[-2000:]}")

        # the dashboard: the worker, by the name it was given
        page_shows("/workers", ["flowerw@"], "the worker")

        # tasks sent now are seen by Flower through the worker's task events
        ids = [app.send_task("flowerapp.add", (i, i)) for i in range(1, N_TASKS + 1)]
        assert [r.get(timeout=START_TIMEOUT) for r in ids] == [2 * i for i in range(1, N_TASKS + 1)]
        text = page_shows("/tasks", [r.id for r in ids], "the tasks")
        assert "flowerapp.add" in text and "SUCCESS" in text, text[:2000]
    finally:
        if dt is not None:
            dt.close()
        for p in reversed(procs):
            stop(p)
        app.close()
        broker.terminate()
