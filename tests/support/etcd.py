"""A real etcd (Debian's etcd-server) on loopback ports with a tmp data dir, stopped by pid.

Shared by the election tests and bench/failover.py.  ``etcd_binary()`` is None when the
package is not installed (the tests then skip, saying so; .ci/run installs it).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import time
import urllib.request
from pathlib import Path

START_TIMEOUT = 20.0  # seconds: etcd's first start writes its WAL and elects itself


def etcd_binary() -> str | None:
    return shutil.which("etcd") or (os.path.exists("/usr/bin/etcd") and "/usr/bin/etcd") or None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class EtcdProcess:
    """``etcd --data-dir D --listen-client-urls http://127.0.0.1:P ...``; ``endpoint`` is "127.0.0.1:P"."""

    def __init__(self, data_dir):
        self.data_dir = Path(data_dir)
        self.proc: subprocess.Popen | None = None
        self.port = 0
        self.log_path = self.data_dir.with_name(self.data_dir.name + ".log")

    @property
    def endpoint(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self) -> "EtcdProcess":
        binary = etcd_binary()
        if binary is None:
            raise RuntimeError("etcd is not installed (apt-get install etcd-server)")
        self.port, peer = free_port(), free_port()
        client = f"http://127.0.0.1:{self.port}"
        peer_url = f"http://127.0.0.1:{peer}"
        cmd = [binary, "--name", "t", "--data-dir", str(self.data_dir),
               "--listen-client-urls", client, "--advertise-client-urls", client,
               "--listen-peer-urls", peer_url, "--initial-advertise-peer-urls", peer_url,
               "--initial-cluster", f"t={peer_url}", "--log-level", "warn"]
        self._log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(cmd, stdout=self._log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + START_TIMEOUT
        while True:
            try:
                if self.request("/v3/kv/range", {"key": "eA=="}, timeout=1.0) is not None:
                    return self
            except OSError:
                pass
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"etcd did not start within {START_TIMEOUT} s: {self.log_path.read_text()[-2000:]}")
            time.sleep(0.05)

    def request(self, path: str, doc: dict, timeout: float = 5.0) -> dict:
        req = urllib.request.Request(f"http://{self.endpoint}{path}", data=json.dumps(doc).encode(), method="POST")
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return json.loads(resp.read())

    def pause(self) -> None:
        os.kill(self.proc.pid, signal.SIGSTOP)

    def resume(self) -> None:
        os.kill(self.proc.pid, signal.SIGCONT)

    def stop(self) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            try:
                os.kill(self.proc.pid, signal.SIGCONT)  # a paused etcd cannot act on SIGTERM
            except ProcessLookupError:
                pass
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
        self._log.close()
        self.proc = None


# -- a group of brokerd processes elected through this etcd (the e2e test and bench/failover.py) --
def elected_broker(data_dir, etcd: EtcdProcess, prefix: str, ttl: int, *extra: str):
    """A brokerd with ``--election etcd://<etcd>/<prefix> --election-ttl <ttl>`` (not yet started)."""
    from tests.support.broker import BrokerProcess

    return BrokerProcess(data_dir, "--election", f"etcd://{etcd.endpoint}{prefix}", "--election-ttl", str(ttl), *extra)


def http_status(port: int, path: str, timeout: float = 2.0) -> int:
    import http.client

    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request("GET", path)
        return conn.getresponse().status
    except OSError:
        return 0
    finally:
        conn.close()


def leads(broker) -> bool:
    """/ready/leader says 200: the election promoted it and it takes writes."""
    return broker.proc is not None and broker.proc.poll() is None and http_status(broker.http_port, "/ready/leader") == 200


def stats_value(broker, key: str) -> str:
    for line in broker.admin("STATS\n").splitlines():
        parts = line.split()
        if len(parts) >= 2 and parts[0] == key:
            return parts[1]
    return ""


def wait_until(pred, timeout: float, what: str, every: float = 0.02):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        got = pred()
        if got:
            return got
        time.sleep(every)
    raise AssertionError(f"timed out after {timeout:g} s waiting for {what}")


def publish_until_confirmed(address: str, queue: str, body: bytes, timeout: float) -> float:
    """Publish ``body`` to the brokerd at ``address`` until one publish is confirmed (refusals such as
    NOT_LEADER, and a brokerd not yet listening, are retried); the monotonic time of the confirm."""
    from client import Client

    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        try:
            with Client(address, timeout=2) as c:
                c.publish(queue, body)
                return time.monotonic()
        except Exception as exc:  # noqa: BLE001 -- every refusal is retried until the deadline
            last = exc
            time.sleep(0.01)
    raise AssertionError(f"no publish to {address} was confirmed within {timeout:g} s (last: {last!r})")
