"""The live web page, checked in a real headless Chromium.

A real brokerd and a real worker (``python -m client.worker_cli``) run a task
that succeeds and one that fails; a message is dead-lettered with
``nack(requeue=False)``.  Chromium loads the page (``--dump-dom`` after its
JavaScript has polled the JSON for a few virtual seconds) and the test reads
what a person would see.  The requeue button's endpoint is then POSTed (the
button's ``data-action``), and Chromium shows the dead letter gone.

Chromium: Debian's ``chromium`` package (``apt-get install -y chromium``); the
browser tests skip with that reason when it is missing.
"""

from __future__ import annotations

import http.client
import json
import re
import shutil
import subprocess
import tempfile
import time
import uuid

import pytest

from client import App, Client
from tests.client.test_canvas import Workers, sig
from tests.runtime.test_http import http_port_of

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
needs_chromium = pytest.mark.skipif(CHROMIUM is None, reason="chromium not installed: apt-get install chromium")


def chromium(*args: str, timeout: float = 30.0) -> str:
    with tempfile.TemporaryDirectory(prefix="brokerd-chromium-") as profile:
        cmd = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
               "--disable-background-networking", "--disable-component-update", "--disable-sync",
               "--no-first-run", "--no-default-browser-check", f"--user-data-dir={profile}", *args]
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
        assert p.returncode == 0, p.stderr[-2000:]
        return p.stdout


def dom(url: str, budget_ms: int = 2500) -> str:
    """The page's DOM after its JavaScript ran for ``budget_ms`` of virtual time."""
    out = chromium(f"--virtual-time-budget={budget_ms}", "--dump-dom", url)
    assert 'data-live="ok"' in out, "the page's polling JavaScript never got its JSON:\n" + out[:3000]
    return out


def section(page: str, sid: str) -> str:
    m = re.search(rf'<section id="{sid}">(.*?)</section>', page, re.S)
    assert m, f"no section {sid} in the page"
    return m.group(1)


def request(port: int, method: str, path: str, headers: dict | None = None):
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        conn.request(method, path, headers=headers or {})
        r = conn.getresponse()
        body = r.read()
        return r.status, {k.lower(): v for k, v in r.getheaders()}, body
    finally:
        conn.close()


def get_json(port: int, path: str):
    status, _, body = request(port, "GET", path)
    return status, json.loads(body)


def wait_for(fn, timeout: float = 15.0, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while True:
        v = fn()
        if v:
            return v
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.1)


@pytest.fixture
def live(broker_factory, tmp_path):
    """brokerd + one worker, with a succeeded, a failed and an escaped-args task and a dead letter."""
    b = broker_factory()
    b.http_port = http_port_of(b)
    workers = Workers(b, tmp_path)
    app = App("web-test", broker=b.address)
    try:
        workers.start("-P", "threads", "-c", "2", "-n", "webworker@test")
        ok = sig(app, "add", 2, 3).apply_async()
        assert ok.get(timeout=20) == 5
        bad = sig(app, "boom", 1).apply_async()
        with pytest.raises(ValueError, match="boom in step"):
            bad.get(timeout=20)
        evil = sig(app, "add", "<img src=x onerror=alert(1)>", "!").apply_async()
        evil.get(timeout=20)
        dead_id = "dead-" + uuid.uuid4().hex[:8]
        with Client(b.address, name="web-test") as c:
            c.publish("webq", b"poison <b>pill</b>", id=dead_id)
            consumer = c.consume("webq", prefetch=1)
            d = consumer.get(timeout=10)
            d.nack(requeue=False)
            wait_for(lambda: c.stats("webq")["dead"] == 1, what="the dead letter")
        # the worker's events arrive batched (up to 50 ms late): wait until brokerd has them
        wait_for(lambda: {t["id"] for t in get_json(b.http_port, "/api/tasks")[1]["tasks"]} >= {ok.id, bad.id, evil.id},
                 what="the task events")
        yield {"b": b, "port": b.http_port, "ok": ok.id, "bad": bad.id, "evil": evil.id, "dead": dead_id,
               "worker": "webworker@test"}
    finally:
        workers.stop()
        app.close()


@needs_chromium
def test_page_shows_queues_workers_tasks_dead_letters_and_requeue_clears_them(live):
    port = live["port"]
    base = f"http://127.0.0.1:{port}"
    page = dom(base + "/")

    queues = section(page, "queues")
    assert 'data-queue="webq"' in queues
    assert "<svg" in queues  # the rate sparkline
    workers = section(page, "workers")
    assert live["worker"] in workers and "online" in workers
    tasks = section(page, "tasks")
    for key, st in (("ok", "SUCCESS"), ("bad", "FAILURE")):
        m = re.search(rf'<tr data-task="{live[key]}" data-state="(\w+)">', tasks)
        assert m and m.group(1) == st, (key, tasks[:3000])
    assert "boom in step" in tasks
    # user data is text, never markup: the task's args show escaped, no <img> element exists
    assert "&lt;img src=x onerror=alert(1)&gt;" in tasks
    assert "<img" not in page
    dead = section(page, "dead")
    assert f'data-dead="{live["dead"]}"' in dead and "poison &lt;b&gt;pill&lt;/b&gt;" in dead
    # the requeue button is wired to the endpoint the test calls below
    assert 'data-action="/api/queues/webq/requeue-dead"' in page
    assert 'data-action="/api/queues/webq/pause"' in page and 'data-action="/api/queues/webq/purge"' in page

    status, _, body = request(port, "POST", "/api/queues/webq/requeue-dead", {"Accept": "application/json"})
    assert status == 200 and json.loads(body)["message"] == "requeued 1 dead letter to webq"
    page = dom(base + "/")
    assert live["dead"] not in section(page, "dead")
    assert "no dead letters" in section(page, "dead")
    assert re.search(r'<tr data-queue="webq"[^>]*>.*?<td class="n">1</td>', section(page, "queues"), re.S)

    # pause shows on the page, resume takes it away (the form POST without JavaScript: 303 to /)
    status, headers, _ = request(port, "POST", "/api/queues/webq/pause", {"Accept": "text/html"})
    assert status == 303 and headers["location"] == "/"
    queues = section(dom(base + "/"), "queues")
    assert "<em>paused</em>" in queues and 'data-action="/api/queues/webq/resume"' in queues
    request(port, "POST", "/api/queues/webq/resume")
    assert "<em>paused</em>" not in section(dom(base + "/"), "queues")


@needs_chromium
def test_task_page_shows_args_traceback_timeline_and_filter_works(live, tmp_path):
    port = live["port"]
    base = f"http://127.0.0.1:{port}"
    page = dom(f"{base}/task/{live['bad']}")
    task = section(page, "task")
    assert "FAILURE" in task and "ValueError" in task and "boom in step" in task
    assert "Traceback" in task
    for ev in ("task-received", "task-started", "task-failed"):
        assert ev in task, ev
    assert live["worker"] in task
    ok = section(dom(f"{base}/task/{live['ok']}"), "task")
    assert "SUCCESS" in ok and "task-succeeded" in ok and "<h3>result</h3>" in ok
    # the filter: the JSON the page polls with the form's values
    status, d = get_json(port, "/api/tasks?state=FAILURE")
    assert status == 200 and [t["id"] for t in d["tasks"]] == [live["bad"]]
    status, d = get_json(port, "/api/tasks?name=tests.canvas_apps.tasks.add")
    assert {t["id"] for t in d["tasks"]} == {live["ok"], live["evil"]}
    # the paged, sorted list and the graphs, rendered by the page's JavaScript: one task a page,
    # slowest first, second page (the address opens the list that way, as a link to it would)
    page = dom(f"{base}/?tlimit=1&toffset=1&tsort=runtime&torder=desc")
    tasks = section(page, "tasks")
    assert "tasks 2–2 of 3 kept, by runtime ↓" in tasks, tasks[:2000]
    assert len(re.findall(r"<tr data-task=", tasks)) == 1
    assert 'data-task-offset="0"' in tasks and 'data-task-offset="2"' in tasks  # newer and older links
    status, d = get_json(port, "/api/tasks?sort=runtime&order=desc")
    assert f'data-task="{d["tasks"][1]["id"]}"' in tasks
    graphs = section(page, "graphs")
    assert graphs.count('<svg class="chart"') == 3, graphs[:2000]
    throughput = re.search(r'<figure class="graph" data-graph="throughput">(.*?)</figure>', graphs, re.S).group(1)
    assert re.search(r'<(polyline|circle) class="ok"', throughput)  # the tasks that succeeded, drawn
    assert "tests.canvas_apps.tasks.add p50" in graphs
    # a screenshot renders (the README's is docs/screenshot.png)
    png = tmp_path / "page.png"
    chromium("--virtual-time-budget=2000", f"--screenshot={png}", "--window-size=1280,900", base + "/")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_routes_methods_and_errors(broker_factory):
    b = broker_factory()
    port = http_port_of(b)
    status, headers, body = request(port, "GET", "/")
    assert status == 200 and headers["content-type"].startswith("text/html")
    assert b'<script src="/static/app.js">' in body
    for path in ("/static/app.js", "/static/style.css"):
        assert request(port, "GET", path)[0] == 200
    for path in ("/static/nope.js", "/nope", "/api/nope", "/task/", "/api/queues/x/explode"):
        assert request(port, "GET", path)[0] == 404, path
    for path in ("/", "/api/overview", "/api/tasks", "/task/x", "/api/dead/x"):
        status, headers, _ = request(port, "POST", path)
        assert status == 405 and headers["allow"] == "GET, HEAD", path
    status, headers, _ = request(port, "GET", "/api/queues/q/purge")
    assert status == 405 and headers["allow"] == "POST"
    assert request(port, "POST", "/api/queues/missing/purge")[0] == 404
    assert request(port, "GET", "/api/dead/missing")[0] == 404
    assert request(port, "GET", "/api/task/none-such")[0] == 404
    # another site's page cannot drive the buttons through a visitor's browser
    with Client(b.address) as c:
        c.publish("q1", b"x")
    status, _, _ = request(port, "POST", "/api/queues/q1/purge", {"Origin": "http://evil.example"})
    assert status == 403
    assert get_json(port, "/api/queues")[1]["queues"]["q1"]["ready"] == 1
    status, _, body = request(port, "POST", "/api/queues/q1/purge", {"Origin": f"http://127.0.0.1:{port}"})
    assert status == 200 and json.loads(body)["message"] == "purged 1 message from q1"
    # the action went through the state and the log: it survives a restart
    request(port, "POST", "/api/queues/q1/pause")
    b.terminate()
    b.restart()
    assert get_json(http_port_of(b), "/api/queues")[1]["queues"]["q1"]["paused"] is True
    assert get_json(http_port_of(b), "/api/queues")[1]["queues"]["q1"]["ready"] == 0
