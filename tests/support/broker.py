"""A real brokerd process on a loopback port with a real data dir.

The one launcher the tests (tests/conftest.py fixtures) and the benchmarks
(bench/*.py) share: ``python -m broker`` started as users run it, its port
read from its "ready" log line, stopped by pid (SIGTERM, then SIGKILL) by
whoever started it.
"""

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

ROOT = Path(__file__).resolve().parent.parent.parent
READY = re.compile(r"ready: listening on ([\d.]+):(\d+)")
HTTP_READY = re.compile(r"http: listening on ([\d.]+):(\d+)")
START_TIMEOUT = 20.0  # seconds; a cold import of trio on a busy CI box


class BrokerProcess:
    """``python -m broker --host 127.0.0.1 --port P --http-port 0 --data-dir D ARGS``.

    ``log`` collects its stderr lines; ``port``/``http_port`` are read from
    them.  ``start()`` raises (with the log) unless that very process printed
    "ready".
    """

    def __init__(self, data_dir, *args: str, env: dict | None = None):
        self.data_dir = Path(data_dir)
        self.args = list(args)
        self.env = env
        self.proc: subprocess.Popen | None = None
        self.port: int | None = None
        self.http_port: int | None = None
        self.log: list[str] = []
        self.started_in = 0.0  # seconds from spawn to "ready" (recovery included)

    def start(self, port: int = 0, timeout: float = START_TIMEOUT) -> "BrokerProcess":
        env = dict(os.environ)
        env["PYTHONUNBUFFERED"] = "1"
        env["PYTHONPATH"] = str(ROOT) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
        if self.env:
            env.update(self.env)
        cmd = [
            sys.executable, "-m", "broker",
            "--host", "127.0.0.1", "--port", str(port),
            # --http-port 0: a free HTTP port too, so brokers of parallel runs never clash on 7701
            "--http-port", "0", "--data-dir", str(self.data_dir), *self.args,
        ]
        self.log = log = []
        self.port = self.http_port = None
        # One event and one reader per start: the reader of a killed earlier
        # process may still be draining its stderr, and must not signal this one.
        ready = threading.Event()
        found: dict = {}
        t0 = time.monotonic()
        self.proc = proc = subprocess.Popen(
            cmd, cwd=ROOT, env=env, stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
        )
        threading.Thread(target=self._read_stderr, args=(proc, log, ready, found), daemon=True).start()
        if not ready.wait(timeout) or "port" not in found or proc.poll() is not None:
            self.kill()
            raise RuntimeError(f"brokerd did not become ready (exit code {proc.poll()}):\n" + "\n".join(log))
        self.started_in = time.monotonic() - t0
        self.port = found["port"]
        self.http_port = found.get("http_port")
        return self

    @staticmethod
    def _read_stderr(proc, log, ready, found):
        for line in proc.stderr:
            log.append(line.rstrip("\n"))
            if "http_port" not in found and (m := HTTP_READY.search(line)):
                found["http_port"] = int(m.group(2))
            m = READY.search(line)
            if m and "port" not in found:
                found["port"] = int(m.group(2))
                ready.set()
        ready.set()  # the process ended (start() then sees no port and says so)

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def pid(self) -> int:
        return self.proc.pid

    def rss(self) -> int:
        """Resident set size in bytes, from /proc/<pid>/status (VmRSS)."""
        with open(f"/proc/{self.pid}/status") as fh:
            for line in fh:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
        raise RuntimeError("no VmRSS in /proc status")

    def cpu_seconds(self) -> float:
        with open(f"/proc/{self.pid}/stat") as fh:
            fields = fh.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def wait_exit(self, timeout: float = 10.0) -> int:
        return self.proc.wait(timeout)

    def terminate(self, timeout: float = 10.0) -> int:
        """SIGTERM (a clean stop: the log is flushed), then SIGKILL after ``timeout``."""
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                return self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                return self.proc.wait(5)
        return self.proc.returncode if self.proc else 0

    stop = terminate

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


def broker_for_app(directory, app):
    """A module fixture's body: a brokerd on ``directory`` with ``app`` pointed at it (and its old
    connection dropped); stopped, and the app's connection closed, when the generator ends."""
    b = BrokerProcess(directory).start()
    app.conf.broker_url = b.address
    app.close()
    try:
        yield b
    finally:
        app.close()
        b.terminate()
