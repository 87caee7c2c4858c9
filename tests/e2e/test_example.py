"""The README's example, end to end: web app → brokerd → worker → files."""

import json
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path
from wsgiref.simple_server import WSGIRequestHandler, make_server

ROOT = Path(__file__).resolve().parents[2]


class Quiet(WSGIRequestHandler):
    def log_message(self, *args):
        pass


def test_signup_and_fan_out_through_the_example_app(broker, tmp_path, monkeypatch):
    monkeypatch.setenv("BROKERD_URL", broker.address)
    monkeypatch.setenv("EXAMPLE_OUTBOX", str(tmp_path))
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    worker = subprocess.Popen(
        [sys.executable, "-m", "client.worker_cli", "examples.tasks:app", "-Q", "high,low", "-c", "4",
         "-P", "threads", "--prefetch-multiplier", "8", "-l", "warning"],
        cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    import examples.tasks as tasks

    tasks.app.conf.broker_url = broker.address
    from examples.web import application

    httpd = make_server("127.0.0.1", 0, application, handler_class=Quiet)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    base = f"http://127.0.0.1:{httpd.server_port}"

    def call(method, path):
        req = urllib.request.Request(base + path, method=method)
        with urllib.request.urlopen(req, timeout=10) as resp:
            return resp.status, json.loads(resp.read())

    try:
        status, body = call("POST", "/signup?user=42&email=ada@example.com")
        assert status == 202
        signup = tasks.app.AsyncResult(body["task_id"])
        status, body = call("POST", "/posts?author=ada&post=7&text=hello&followers=1000")
        assert status == 202
        fan = tasks.app.AsyncResult(body["task_id"])
        assert signup.get(timeout=30) == str(tmp_path / "emails" / "42.txt")
        assert "Subject: Welcome!" in (tmp_path / "emails" / "42.txt").read_text()
        assert fan.get(timeout=60) == 1000
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            done = len(list((tmp_path / "timelines").glob("*.txt"))) if (tmp_path / "timelines").exists() else 0
            if done == 1000 and tasks.app.client.stats("low")["ready"] == 0:
                break
            time.sleep(0.1)
        timelines = sorted((tmp_path / "timelines").glob("*.txt"))
        assert len(timelines) == 1000
        assert all(t.read_text() == "7\tada: hello\n" for t in timelines)
        assert call("GET", f"/tasks/{fan.id}") == (200, {"state": "SUCCESS", "result": 1000})
    finally:
        httpd.shutdown()
        worker.send_signal(signal.SIGTERM)
        worker.wait(30)
        tasks.app.close()
