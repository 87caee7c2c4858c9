"""brokerd's HTTP side and its systemd notifications, tested as operators use them.

A real brokerd process (``--http-port 0``) is scraped with the Prometheus text
parser after a scripted workload; ``/api/queues`` is read the way KEDA's
metrics-api scaler reads it (a dotted path into the JSON); the probes are hit
over HTTP; the sd_notify datagrams are caught on a real AF_UNIX socket.  The
full-disk and wedged-disk cases run the server in-process over a log with a
fault plan, as tests/wal/test_durability.py does.
"""

from __future__ import annotations

import errno
import http.client
import json
import os
import re
import shutil
import socket
import tempfile
import threading
import time
import uuid
from pathlib import Path

import pytest
import trio
from prometheus_client.parser import text_string_to_metric_families

from broker.runtime import http as broker_http
from broker.wal import FaultPlan
from client import wire
from tests.support.inprocess import serve_with_fault
from tests.support.wireclient import Raw

HTTP_LINE = re.compile(r"http: listening on ([\d.]+):(\d+)")


# -- helpers --------------------------------------------------------------------------------
def start(broker_factory, *args, env=None):
    """A brokerd with a free HTTP port; ``b.http_port`` is read from its log."""
    b = broker_factory("--http-port", "0", *args, env=env)
    b.http_port = http_port_of(b)
    return b


def http_port_of(b) -> int:
    for line in b.log:
        m = HTTP_LINE.search(line)
        if m:
            return int(m.group(2))
    raise AssertionError("brokerd did not log its HTTP address:\n" + "\n".join(b.log))


def get(port: int, path: str, method: str = "GET"):
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    try:
        conn.request(method, path)
        r = conn.getresponse()
        return r.status, {k.lower(): v for k, v in r.getheaders()}, r.read()
    finally:
        conn.close()


def get_json(port: int, path: str):
    status, _, body = get(port, path)
    return status, json.loads(body)


def scrape(port: int) -> dict:
    """{(sample name, frozenset(labels)): value}, via the Prometheus parser; also checks
    that every brokerd family has HELP and a TYPE."""
    status, headers, body = get(port, "/metrics")
    assert status == 200
    assert headers["content-type"].startswith("text/plain; version=0.0.4")
    samples = {}
    for fam in text_string_to_metric_families(body.decode()):
        assert fam.name.startswith("brokerd_"), fam.name
        assert fam.documentation, f"{fam.name} has no HELP"
        assert fam.type in ("gauge", "counter", "histogram"), (fam.name, fam.type)
        for s in fam.samples:
            # role: 3 values; follower: one per replication link (a handful), both bounded
            assert set(s.labels) <= {"queue", "state", "reason", "le", "version", "role", "follower"}, s
            samples[(s.name, frozenset(s.labels.items()))] = s.value
    return samples


def m(samples, name, **labels):
    return samples[(name, frozenset(labels.items()))]


def value_location(doc, path: str):
    """What KEDA's metrics-api ``valueLocation`` (a GJSON path) picks: dot-separated
    keys, ``\\.`` for a dot inside a key, a number for a list index."""
    keys = [k.replace("\0", ".") for k in path.replace("\\.", "\0").split(".")]
    for k in keys:
        doc = doc[int(k)] if isinstance(doc, list) else doc[k]
    return doc


class NotifyListener:
    """The service manager's end of $NOTIFY_SOCKET: an AF_UNIX datagram socket."""

    def __init__(self, address: str):
        self.address = address  # "@name" (abstract) or a path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind("\0" + address[1:] if address.startswith("@") else address)
        self.messages: list[str] = []

    def wait_for(self, line: str, timeout: float = 10.0) -> list[str]:
        """Collect datagrams until one has ``line`` among its lines; return all so far."""
        deadline = time.monotonic() + timeout
        while not any(line in msg.split("\n") for msg in self.messages):
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"no {line!r} from brokerd; got {self.messages}")
            self.sock.settimeout(left)
            try:
                self.messages.append(self.sock.recv(65536).decode())
            except socket.timeout:
                pass
        return self.messages

    def drain(self) -> list[str]:
        self.sock.setblocking(False)
        out = []
        try:
            while True:
                out.append(self.sock.recv(65536).decode())
        except BlockingIOError:
            pass
        self.messages += out
        return out

    def close(self):
        self.sock.close()


# -- a real brokerd --------------------------------------------------------------------------
def test_metrics_match_the_counts_of_a_scripted_workload(broker_factory):
    b = start(broker_factory)
    c = Raw(b.port)
    c.ok(wire.OP_DECLARE, "tiny", {"max_length": 2})
    for i in range(10):
        c.ok(wire.OP_PUBLISH, "emails", f"e{i}".encode(), f"e{i}", 0, None)
    c.ok(wire.OP_PUBLISH, "emails", b"later", "later", 0, {"delay": 3600})
    assert c.call(wire.OP_PUBLISH, "tiny", b"t", "t0", 0, None)[0] == wire.OP_OK
    assert c.call(wire.OP_PUBLISH, "tiny", b"t", "t1", 0, None)[0] == wire.OP_OK
    refused = c.call(wire.OP_PUBLISH, "tiny", b"t", "t2", 0, None)
    assert refused[0] == wire.OP_ERROR and refused[2] == "QUEUE_FULL"
    c.ok(wire.OP_PUBLISH, 'we"ird\\q', b"x", "w0", 0, None)  # label escaping
    c.ok(wire.OP_CONSUME, ["emails"], 4)
    first = c.deliveries(4)
    c.ok(wire.OP_ACK, [f[2] for f in first[:3]])
    c.ok(wire.OP_NACK, first[3][2], False)  # requeue=false: to emails.dlq
    c.deliveries(4)  # credit came back: four more in flight

    s = scrape(b.http_port)
    assert m(s, "brokerd_up") == 1
    assert m(s, "brokerd_ready") == 1
    assert m(s, "brokerd_connections") == 1
    assert m(s, "brokerd_queues") == 4  # emails, emails.dlq, tiny, we"ird\q
    q = {"queue": "emails"}
    assert m(s, "brokerd_queue_messages", **q, state="ready") == 2
    assert m(s, "brokerd_queue_messages", **q, state="inflight") == 4
    assert m(s, "brokerd_queue_messages", **q, state="delayed") == 1
    assert m(s, "brokerd_queue_messages", **q, state="dead") == 1
    assert m(s, "brokerd_queue_messages", queue="emails.dlq", state="ready") == 1
    assert m(s, "brokerd_queue_consumers", **q) == 1
    assert m(s, "brokerd_queue_oldest_ready_age_seconds", **q) >= 0
    assert m(s, "brokerd_messages_published_total", **q) == 11
    assert m(s, "brokerd_messages_delivered_total", **q) == 8
    assert m(s, "brokerd_messages_acked_total", **q) == 3
    assert m(s, "brokerd_messages_nacked_total", **q) == 1
    assert m(s, "brokerd_messages_dead_lettered_total", **q) == 1
    assert m(s, "brokerd_messages_redelivered_total", **q) == 0
    assert m(s, "brokerd_messages_expired_total", **q) == 0
    assert m(s, "brokerd_messages_released_total", **q) == 0
    assert m(s, "brokerd_messages_recalled_total", **q) == 0
    assert m(s, "brokerd_publish_rejected_total", queue="tiny", reason="max_length") == 1
    assert m(s, "brokerd_publish_rejected_total", **q, reason="max_length") == 0
    assert m(s, "brokerd_queue_messages", queue='we"ird\\q', state="ready") == 1
    # the log: every publish, ack and nack was fsynced (fsync=always)
    fsyncs = m(s, "brokerd_wal_fsync_seconds_count")
    assert fsyncs >= 1
    buckets = sorted(
        (float(dict(k[1])["le"]), v) for k, v in s.items() if k[0] == "brokerd_wal_fsync_seconds_bucket"
    )
    assert buckets[-1] == (float("inf"), fsyncs)
    assert [v for _, v in buckets] == sorted(v for _, v in buckets)  # cumulative
    assert m(s, "brokerd_wal_fsync_seconds_sum") > 0
    assert m(s, "brokerd_wal_records_total") >= 18
    assert m(s, "brokerd_wal_records_per_fsync") >= 1
    assert m(s, "brokerd_wal_bytes_total") > 0
    assert m(s, "brokerd_wal_bytes") > 0
    assert m(s, "brokerd_wal_segments") == 1
    assert m(s, "brokerd_wal_live_bytes") > 0  # 7 messages still queued or in flight
    assert m(s, "brokerd_wal_compacted_bytes_total") == 0  # nothing compacted yet
    assert m(s, "brokerd_disk_free_bytes") > 0
    assert m(s, "brokerd_wal_failed") == 0
    assert m(s, "brokerd_recovery_truncated_bytes") == 0
    c.close()

    # Counters are kept across a restart; the replay is reported.
    b.terminate()
    b.restart()
    b.http_port = http_port_of(b)
    s = scrape(b.http_port)
    assert m(s, "brokerd_messages_published_total", **q) == 11
    assert m(s, "brokerd_messages_acked_total", **q) == 3
    assert m(s, "brokerd_queue_messages", **q, state="ready") == 6  # the 4 in flight came back
    # read from the checkpoint the clean stop wrote (broker/state/replay.py): its records, not the 18 before
    assert m(s, "brokerd_recovery_records") >= 1
    assert m(s, "brokerd_recovery_seconds") > 0


def test_api_queues_reads_the_way_kedas_metrics_api_scaler_does(broker_factory):
    b = start(broker_factory)
    c = Raw(b.port)
    for i in range(5):
        c.ok(wire.OP_PUBLISH, "emails", b"x", f"m{i}", 0, None)
    c.ok(wire.OP_CONSUME, ["emails"], 2)
    got = c.deliveries(2)
    c.ok(wire.OP_NACK, got[0][2], False)
    c.deliveries(1)
    status, doc = get_json(b.http_port, "/api/queues")
    assert status == 200
    # ScaledObject: metadata.valueLocation
    assert value_location(doc, "queues.emails.ready") == 2
    assert value_location(doc, "queues.emails.inflight") == 2
    assert value_location(doc, "queues.emails.backlog") == 4  # ready + in flight
    assert value_location(doc, "queues.emails.dead") == 1
    assert value_location(doc, "queues.emails.consumers") == 1
    assert value_location(doc, r"queues.emails\.dlq.ready") == 1
    assert doc["queues"]["emails"]["published"] == 5
    assert isinstance(value_location(doc, "queues.emails.oldest_ready_age_s"), float)
    c.close()


def test_probes_routes_and_methods(broker_factory):
    b = start(broker_factory)
    status, body = get_json(b.http_port, "/healthz")
    assert (status, body["status"]) == (200, "ok")
    assert get_json(b.http_port, "/readyz") == (200, {"status": "ready"})
    status, headers, body = get(b.http_port, "/healthz", "HEAD")
    assert (status, body) == (200, b"")
    status, body = get_json(b.http_port, "/nothing-here")
    assert status == 404 and body["error"] == "NOT_FOUND"
    status, headers, body = get(b.http_port, "/metrics", "POST")
    assert status == 405 and headers["allow"] == "GET, HEAD"
    assert json.loads(body)["error"] == "METHOD_NOT_ALLOWED"
    # a busy HTTP port fails the start with the network exit code and says which port
    import subprocess
    import sys

    from tests.support.broker import ROOT

    busy = subprocess.run(
        [sys.executable, "-m", "broker", "--host", "127.0.0.1", "--port", "0",
         "--http-port", str(b.http_port), "--data-dir", str(b.data_dir) + "-busy"],
        cwd=ROOT, capture_output=True, text=True, timeout=20,
    )
    assert busy.returncode == 4, busy.stderr
    assert f"cannot listen on 127.0.0.1:{b.http_port} (--http-port)" in busy.stderr


def test_sd_notify_ready_status_and_stopping_over_a_real_socket(broker_factory):
    listener = NotifyListener(f"@brokerd-test-{uuid.uuid4().hex}")  # abstract namespace
    try:
        b = start(broker_factory, env={"NOTIFY_SOCKET": listener.address})
        msgs = listener.wait_for("READY=1")
        ready_at = next(i for i, msg in enumerate(msgs) if "READY=1" in msg.split("\n"))
        before = "\n".join(msgs[:ready_at])
        assert "STATUS=recovering: replaying 0 log segments" in before
        assert re.search(r"^EXTEND_TIMEOUT_USEC=\d+$", before, re.M)
        assert f"STATUS=serving on 127.0.0.1:{b.port}, http on 127.0.0.1:{b.http_port}" in msgs[ready_at]
        # READY=1 means it: both listeners answer
        assert get(b.http_port, "/readyz")[0] == 200
        c = Raw(b.port)
        c.ok(wire.OP_PUBLISH, "q", b"x", "a", 0, None)
        c.close()

        assert b.terminate() == 0
        msgs = listener.wait_for("STOPPING=1")
        assert not any("WATCHDOG=1" in msg for msg in msgs)  # WATCHDOG_USEC was not set

        # A restart replays the log and says so before READY=1.
        listener.messages.clear()
        b.restart()
        msgs = listener.wait_for("READY=1")
        assert any(msg.startswith("STATUS=replaying segment 1/1") for msg in msgs), msgs
    finally:
        listener.close()


# -- in-process: a failed log, a wedged disk ---------------------------------------------------
async def _serve_with_fault(tmp_path, nursery, fault):
    server, port = await serve_with_fault(tmp_path, nursery, fault, fsync="never")
    return server, port, server.http_address[1]


async def test_healthz_stays_200_on_a_full_disk_while_readyz_and_publishes_report_it(tmp_path, nursery):
    fault = FaultPlan(fail_write_after_bytes=2000, errno=errno.ENOSPC)
    server, port, hport = await _serve_with_fault(tmp_path, nursery, fault)

    def fill_the_disk():
        c = Raw(port)
        replies = [c.call(wire.OP_PUBLISH, "q", b"z" * 50, f"f{i}", 0, None) for i in range(60)]
        return c, replies

    c, replies = await trio.to_thread.run_sync(fill_the_disk)
    assert replies[-1][0] == wire.OP_ERROR and replies[-1][2] == "LOG_FAILED"
    status, body = await trio.to_thread.run_sync(get_json, hport, "/healthz")
    assert status == 200 and body["status"] == "ok"
    assert "No space left on device" in body["log"]
    status, body = await trio.to_thread.run_sync(get_json, hport, "/readyz")
    assert status == 503 and body["status"] == "log_failed"
    assert "No space left on device" in body["reason"] and "LOG_FAILED" in body["reason"]
    s = await trio.to_thread.run_sync(scrape, hport)
    assert m(s, "brokerd_wal_failed") == 1
    assert m(s, "brokerd_ready") == 0
    assert m(s, "brokerd_up") == 1
    refused = await trio.to_thread.run_sync(c.call, wire.OP_PUBLISH, "q", b"z", "late", 0, None)
    assert refused[0] == wire.OP_ERROR and refused[2] == "LOG_FAILED"
    c.close()


class WedgedDisk:
    """A Fault whose fsync blocks while ``wedged`` is set: a disk that stopped answering."""

    def __init__(self):
        self.wedged = False
        self.released = threading.Event()
        self.blocked = threading.Event()

    def before_write(self, segment_name, nbytes):
        return None

    def before_fsync(self, segment_name):
        if self.wedged:
            self.blocked.set()
            self.released.wait(30)


async def test_a_wedged_log_writer_fails_healthz_and_starves_the_systemd_watchdog(tmp_path, nursery, monkeypatch):
    address = f"@brokerd-test-{uuid.uuid4().hex}"
    listener = NotifyListener(address)
    monkeypatch.setenv("NOTIFY_SOCKET", address)
    monkeypatch.setenv("WATCHDOG_USEC", "100000")  # a ping every 50 ms
    monkeypatch.delenv("WATCHDOG_PID", raising=False)
    monkeypatch.setattr(broker_http, "WRITER_STALL_LIMIT", 0.3)
    disk = WedgedDisk()
    try:
        server, port, hport = await _serve_with_fault(tmp_path, nursery, disk)
        await trio.to_thread.run_sync(listener.wait_for, "READY=1")
        await trio.to_thread.run_sync(listener.wait_for, "WATCHDOG=1")

        disk.wedged = True
        c = await trio.to_thread.run_sync(Raw, port)
        c.send([wire.OP_PUBLISH, 99, "q", b"x", "stuck", 0, None])  # its confirm waits for the fsync
        await trio.to_thread.run_sync(disk.blocked.wait, 5)
        status = 200
        with trio.fail_after(5):
            while status == 200:
                status, body = await trio.to_thread.run_sync(get_json, hport, "/healthz")
        assert status == 503 and "inside one write or fsync" in body["reason"]
        listener.drain()
        await trio.sleep(0.3)  # six ping intervals
        starved = listener.drain()
        assert not any("WATCHDOG=1" in msg for msg in starved), starved
        assert any(msg.startswith("STATUS=unhealthy") for msg in listener.messages)

        disk.released.set()  # the disk answers again
        reply = await trio.to_thread.run_sync(c.reply, 99)
        assert reply[0] == wire.OP_OK
        assert (await trio.to_thread.run_sync(get_json, hport, "/healthz"))[0] == 200
        listener.messages.clear()
        await trio.to_thread.run_sync(listener.wait_for, "WATCHDOG=1")
        c.close()
        await server.stop()
        await trio.to_thread.run_sync(listener.wait_for, "STOPPING=1")
    finally:
        disk.released.set()
        listener.close()


# -- the exposition format, unit by unit -------------------------------------------------------
@pytest.mark.parametrize(
    "raw, escaped",
    [("emails", "emails"), ('a"b', 'a\\"b'), ("a\\b", "a\\\\b"), ("a\nb", "a\\nb")],
)
def test_label_values_are_escaped_per_the_text_format(raw, escaped):
    assert broker_http.escape_label(raw) == escaped


# -- the notify protocol, unit by unit ----------------------------------------------------------
def test_notify_sends_to_a_socket_path_and_is_a_no_op_without_one(tmp_path, monkeypatch):
    from broker.runtime import notify

    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    assert notify.notify("READY=1") is False and notify.watchdog_interval() is None
    path = tempfile.mkdtemp(prefix="nfy", dir="/tmp") + "/s"  # AF_UNIX paths are short (108 bytes)
    listener = NotifyListener(path)
    try:
        monkeypatch.setenv("NOTIFY_SOCKET", path)
        assert notify.notify("READY=1", "STATUS=serving") is True
        assert listener.wait_for("READY=1") == ["READY=1\nSTATUS=serving"]
    finally:
        listener.close()
        shutil.rmtree(Path(path).parent)
    monkeypatch.setenv("WATCHDOG_USEC", "30000000")
    monkeypatch.setenv("WATCHDOG_PID", str(os.getpid()))
    assert notify.watchdog_interval() == 15.0
    monkeypatch.setenv("WATCHDOG_PID", str(os.getpid() + 1))  # meant for another process
    assert notify.watchdog_interval() is None
