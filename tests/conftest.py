"""Shared fixtures: a real brokerd process on a loopback port with a real data dir."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
READY = re.compile(r"ready: listening on ([\d.]+):(\d+)")
START_TIMEOUT = 20.0  # seconds; a cold import of trio on a busy CI box


class BrokerProcess:
    """A brokerd started as users run it: ``python -m broker ...``.

    Stopped by the test that started it, by pid (SIGTERM, then SIGKILL).
    ``log`` collects its stderr lines.
    """

    def __init__(self, data_dir: Path, *args: str, env: dict | None = None):
        self.data_dir = Path(data_dir)
        self.args = list(args)
        self.env = env
        self.proc: subprocess.Popen | None = None
        self.port: int | None = None
        self.log: list[str] = []

    def start(self, port: int = 0) -> "BrokerProcess":
        env = dict(os.environ)
        env["PYTHONUNBUFFERED"] = "1"
        env.setdefault("PYTHONPATH", str(ROOT))
        if self.env:
            env.update(self.env)
        cmd = [
            sys.executable, "-m", "broker",
            "--host", "127.0.0.1", "--port", str(port),
            # --http-port 0: a free HTTP port too, so brokers of parallel test runs never clash on 7701
            "--http-port", "0", "--data-dir", str(self.data_dir), *self.args,
        ]
        self.log = log = []
        # One event and one reader per start: the reader of a killed earlier
        # process may still be draining its stderr, and must not signal this one.
        ready = threading.Event()
        found: dict = {}
        self.proc = proc = subprocess.Popen(
            cmd, cwd=ROOT, env=env, stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
        )
        threading.Thread(target=self._read_stderr, args=(proc, log, ready, found), daemon=True).start()
        if not ready.wait(START_TIMEOUT) or "port" not in found or proc.poll() is not None:
            self.kill()
            raise RuntimeError(f"brokerd did not become ready (exit code {proc.poll()}):\n" + "\n".join(log))
        self.port = found["port"]
        return self

    @staticmethod
    def _read_stderr(proc, log, ready, found):
        for line in proc.stderr:
            log.append(line.rstrip("\n"))
            m = READY.search(line)
            if m and "port" not in found:
                found["port"] = int(m.group(2))
                ready.set()
        ready.set()  # the process ended (start() then sees no port and says so)

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def wait_exit(self, timeout: float = 10.0) -> int:
        return self.proc.wait(timeout)

    def terminate(self, timeout: float = 10.0) -> int:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                return self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                return self.proc.wait(5)
        return self.proc.returncode if self.proc else 0

    def kill(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(5)

    def restart(self, *extra: str) -> "BrokerProcess":
        """Start again on the same port and data dir (after terminate or kill)."""
        port = self.port
        if extra:
            self.args = self.args + list(extra)
        return self.start(port)

    def admin(self, text: str, timeout: float = 5.0) -> str:
        """Send admin lines exactly as ``printf '...' | nc -q1`` would and return all output."""
        return admin_exchange(self.port, text, timeout)


def admin_exchange(port: int, text: str, timeout: float = 5.0) -> str:
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        s.sendall(text.encode())
        s.shutdown(socket.SHUT_WR)  # what nc -q1 does at end of input
        chunks = []
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                data = s.recv(65536)
            except socket.timeout:
                break
            if not data:
                break
            chunks.append(data)
        return b"".join(chunks).decode()


@pytest.fixture
def broker_factory(tmp_path):
    started: list[BrokerProcess] = []

    def make(*args: str, data_dir: Path | None = None, env: dict | None = None) -> BrokerProcess:
        b = BrokerProcess(data_dir or tmp_path / f"data{len(started)}", *args, env=env)
        started.append(b)
        return b.start()

    yield make
    for b in started:
        b.terminate()


@pytest.fixture
def broker(broker_factory) -> BrokerProcess:
    return broker_factory()
