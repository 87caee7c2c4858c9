"""The first start of brokerd says where it keeps its data and where its page is (issue 17).

A real ``python -m broker`` process, started the way a user starts it: with
``--port`` alone (no ``--http-port``) and a relative ``--data-dir``, from a
folder that is not the repository.
"""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
import threading
import time
import urllib.request

from tests.support.broker import ROOT, START_TIMEOUT

READY = re.compile(r"ready: listening on ([\d.]+):(\d+)")


def free_port_pair(deadline_s: float = 5.0) -> int:
    """A port P with P + 1 free too (the pair brokerd takes when only --port is given)."""
    end = time.monotonic() + deadline_s
    while time.monotonic() < end:
        with socket.socket() as a:
            a.bind(("127.0.0.1", 0))
            p = a.getsockname()[1]
            if p >= 65535:
                continue
            with socket.socket() as b:
                try:
                    b.bind(("127.0.0.1", p + 1))
                except OSError:
                    continue
        return p
    raise RuntimeError("no two adjacent free ports found")


def start(cwd, *args: str) -> tuple[subprocess.Popen, list[str]]:
    """brokerd with exactly ``args`` (no --http-port added), until its "ready" line."""
    env = dict(os.environ, PYTHONUNBUFFERED="1", PYTHONPATH=str(ROOT))
    proc = subprocess.Popen([sys.executable, "-m", "broker", "--host", "127.0.0.1", *args], cwd=cwd, env=env,
                            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    log: list[str] = []
    ready = threading.Event()

    def read():
        for line in proc.stderr:
            log.append(line.rstrip("\n"))
            if READY.search(line):
                ready.set()
        ready.set()

    threading.Thread(target=read, daemon=True).start()
    if not ready.wait(START_TIMEOUT) or proc.poll() is not None:
        stop(proc)
        raise AssertionError("brokerd did not become ready:\n" + "\n".join(log))
    return proc, log


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)


def test_http_port_follows_port_and_start_log_names_data_dir_and_page(tmp_path):
    """`--port P` alone serves HTTP on P + 1; the log prints the absolute data dir
    (new, then not new on the next start) and the page's URL."""
    port = free_port_pair()
    proc, log = start(tmp_path, "--port", str(port), "--data-dir", "./data")
    try:
        text = "\n".join(log)
        assert f"http: listening on 127.0.0.1:{port + 1}" in text, text
        assert f"the page: http://127.0.0.1:{port + 1}/" in text, text
        with urllib.request.urlopen(f"http://127.0.0.1:{port + 1}/healthz", timeout=5) as resp:
            assert resp.status == 200
        abs_dir = str(tmp_path / "data")
        [line] = [ln for ln in log if "data directory" in ln]
        assert abs_dir in line and "new" in line, line
    finally:
        stop(proc)
    # The second start finds the log it wrote: the same absolute path, not "new".
    port = free_port_pair()
    proc, log = start(tmp_path, "--port", str(port), "--data-dir", "./data")
    try:
        [line] = [ln for ln in log if "data directory" in ln]
        assert line.rstrip().endswith(abs_dir), line
    finally:
        stop(proc)


def test_explicit_http_port_wins(tmp_path):
    """An explicit --http-port (here 0: a free one) is used, not port + 1."""
    port = free_port_pair()
    proc, log = start(tmp_path, "--port", str(port), "--http-port", "0", "--data-dir", str(tmp_path / "d"))
    try:
        [line] = [ln for ln in log if "http: listening on" in ln]
        http_port = int(re.search(r"http: listening on [\d.]+:(\d+)", line).group(1))
        assert http_port not in (0, port + 1), line
    finally:
        stop(proc)
