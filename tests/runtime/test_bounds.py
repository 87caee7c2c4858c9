"""Everything a client can make brokerd hold is bounded: connections, idle time, output, partial input, memory, and the cost of one request.

Each test attacks a real brokerd over real TCP and checks the promise of
protocol.md §9: idle and slowloris connections are closed, connections past
max_connections are refused politely, a consumer that never reads is cut off
where its deliveries are queued, partial frames across connections are
bounded and their memory goes back to the OS, a memory watermark refuses
publishes while consumers drain, and no request is quadratic.
"""

from __future__ import annotations

import socket
import time

import pytest

from client import wire
from tests.support.wireclient import Raw
from tests.support.waiting import wait_for

MiB = 1024 * 1024


def closing(frames):
    return [f for f in frames if f[0] == wire.OP_CLOSING]


def recv_all(sock: socket.socket, timeout: float) -> tuple[bytes, bool]:
    """Everything until the server closes (True) or ``timeout`` passes (False)."""
    deadline = time.monotonic() + timeout
    chunks = []
    while time.monotonic() < deadline:
        sock.settimeout(max(0.01, deadline - time.monotonic()))
        try:
            data = sock.recv(65536)
        except socket.timeout:
            break
        except ConnectionResetError:
            return b"".join(chunks), True
        if not data:
            return b"".join(chunks), True
        chunks.append(data)
    return b"".join(chunks), False


def broker_stats(port: int) -> dict:
    r = Raw(port, name="stats")
    try:
        return r.ok(wire.OP_STATS, None)["broker"]
    finally:
        r.close()




def rss(broker) -> int:
    with open(f"/proc/{broker.proc.pid}/statm") as fh:
        return int(fh.read().split()[1]) * 4096


# -- idle and handshake timeouts ---------------------------------------------

def test_an_idle_admin_connection_is_closed_after_idle_timeout(broker_factory):
    broker = broker_factory("--idle-timeout", "1")
    with socket.create_connection(("127.0.0.1", broker.port)) as s:
        s.sendall(b"STATS\n")
        t0 = time.monotonic()
        data, closed = recv_all(s, 10)
    assert closed, "an idle admin connection was kept open past idle_timeout"
    assert data.startswith(b"OK ") and data.endswith(b"ERR IDLE_TIMEOUT nothing received for 1 seconds (idle_timeout)\r\n")
    assert time.monotonic() - t0 < 5


def test_an_admin_line_trickled_byte_by_byte_is_cut_off(broker_factory):
    # Slowloris: one byte every 0.2 s keeps the connection from being idle, but
    # the line must be whole within handshake_timeout of its first byte.
    broker = broker_factory("--idle-timeout", "60", "--handshake-timeout", "1")
    with socket.create_connection(("127.0.0.1", broker.port)) as s:
        s.sendall(b"STATS\n")  # a whole line first: the bound is per line, not per connection
        t0 = time.monotonic()
        reply = b""
        try:
            for _ in range(50):  # the attack's own pace, 10 s at most
                s.sendall(b"Q")
                s.settimeout(0.2)
                try:
                    chunk = s.recv(65536)
                except socket.timeout:
                    continue
                if not chunk:
                    break
                reply += chunk
        except (BrokenPipeError, ConnectionResetError):
            pass
        elapsed = time.monotonic() - t0
        rest, _ = recv_all(s, 2)
        reply += rest
    assert b"ERR IDLE_TIMEOUT a line must arrive whole within 1 seconds of its first byte\r\n" in reply
    assert elapsed < 5, f"a trickled line held the connection {elapsed:.1f} s"


def test_an_admin_client_that_never_reads_its_replies_is_closed(broker_factory):
    broker = broker_factory("--idle-timeout", "1")
    s = socket.create_connection(("127.0.0.1", broker.port))
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    s.sendall(b"HELP\n" * 5000)  # ~5 MB of replies, never read
    wait_for(lambda: any("admin client read nothing for 1 seconds" in line for line in broker.log), 10,
             "the server to give up on a client that reads nothing")
    assert broker.admin("STATS\n").startswith("OK stats")
    s.close()


def test_a_binary_connection_without_heartbeats_is_closed_when_idle(broker_factory):
    broker = broker_factory("--idle-timeout", "1")
    r = Raw(broker.port, heartbeat=0)
    assert r.hello[2]["heartbeat"] == 0
    t0 = time.monotonic()
    (f,) = closing(r.read_until_closed(timeout=10))
    assert f[1] == "IDLE_TIMEOUT" and "heartbeats are off" in f[2]
    assert time.monotonic() - t0 < 5
    # A heartbeat longer than half of idle_timeout is cut to half of it.
    r = Raw(broker.port, heartbeat=3600)
    assert r.hello[2]["heartbeat"] == 0.5
    r.close()


# -- max_connections -----------------------------------------------------------

def test_connections_past_max_connections_are_refused_politely_and_slots_free_on_close(broker_factory):
    broker = broker_factory("--max-connections", "3")
    held = [Raw(broker.port, name=f"held-{i}") for i in range(3)]
    # binary: the refusal is a CLOSING frame in the binary protocol
    r = Raw(broker.port, hello=False)
    r.send_raw(wire.PREAMBLE)
    r.send([wire.OP_HELLO, 1, {"version": 1, "client": "late"}])
    (f,) = closing(r.read_until_closed(timeout=5))
    assert f[1] == "TOO_MANY_CONNECTIONS" and "max_connections" in f[2]
    # admin text: an ERR line
    out = broker.admin("STATS\n")
    assert out.startswith("ERR TOO_MANY_CONNECTIONS ") and "--max-connections" in out
    for _ in range(5):  # a burst
        s = socket.create_connection(("127.0.0.1", broker.port))
        s.sendall(b"QUEUES\n")
        assert recv_all(s, 5)[0].startswith(b"ERR TOO_MANY_CONNECTIONS")
        s.close()
    # the connections being served are not disturbed
    for h in held:
        assert h.ok(wire.OP_PING) is None
    # a slot is free again once one closes
    held.pop().close()

    def accepted():
        try:
            c = Raw(broker.port, name="again")
        except (ConnectionError, OSError):
            return None
        return c if c.hello[0] == wire.OP_OK else None

    again = wait_for(accepted, 5, "a slot to free up after a close")
    assert again.ok(wire.OP_PING) is None
    # logged once per burst, not per connection
    assert sum("refusing new connections" in line for line in broker.log) == 1
    assert broker_stats_via(again)["connections_refused"] >= 7  # and any refused while the slot freed


def broker_stats_via(r: Raw) -> dict:
    return r.ok(wire.OP_STATS, None)["broker"]


# -- output bounds on deliveries -------------------------------------------------

def test_a_consumer_that_never_reads_is_closed_when_its_deliveries_pass_the_hard_limit(broker_factory):
    # Before: the SLOW_CONSUMER limit was checked only after reading from that
    # connection, so a consumer that sends nothing more had 100 MB buffered.
    broker = broker_factory("--output-buffer", "65536", "--fsync", "never")  # hard limit 256 KiB
    hog = Raw(broker.port, name="hog")
    hog.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    hog.ok(wire.OP_CONSUME, ["big"], 1000)
    p = Raw(broker.port, name="producer")
    body = b"x" * 65536
    rids = [p.request(wire.OP_PUBLISH, "big", body, None, 0, None) for _ in range(300)]  # ~19 MiB
    for rid in rids:
        assert p.reply(rid)[0] == wire.OP_OK

    def hog_gone():
        st = p.ok(wire.OP_STATS, "big")
        return st["consumers"] == 0 and st["inflight"] == 0

    wait_for(hog_gone, 10, "the non-reading consumer to be closed (SLOW_CONSUMER)")
    assert p.ok(wire.OP_STATS, "big")["ready"] == 300, "its deliveries went back to the queue"
    # The log line is written as the connection's task ends, and read by another thread: wait for it.
    wait_for(lambda: any("SLOW_CONSUMER" in line for line in broker.log), 10, "the SLOW_CONSUMER log line")
    hog.close()


# -- partial input across connections ----------------------------------------------

def partial_publish(port: int, size: int, keep: int = 16) -> tuple[Raw, bytes]:
    """A connection that sent all but ``keep`` bytes of a PUBLISH of ``size`` bytes."""
    r = Raw(port, name=f"partial-{size}")
    frame = wire.encode([wire.OP_PUBLISH, 99, "uploads", b"u" * size, None, 0, None])
    r.send_raw(frame[:-keep])
    return r, frame[-keep:]


def test_partial_frames_past_max_input_buffer_close_the_largest_holder(broker_factory):
    broker = broker_factory("--max-frame", str(2 * MiB), "--max-input-buffer", str(4 * MiB))
    a, a_rest = partial_publish(broker.port, 1_200_000)
    wait_for(lambda: broker_stats(broker.port)["input_buffered"] >= 1_100_000, 5, "a's bytes to be read")
    b, b_rest = partial_publish(broker.port, 1_200_000)
    wait_for(lambda: broker_stats(broker.port)["input_buffered"] >= 2_300_000, 5, "b's bytes to be read")
    # 4.3 MB in all: past 4 MiB once c holds ~1.8 MB, by then the largest partial frame
    c, _ = partial_publish(broker.port, 1_900_000)
    (f,) = closing(c.read_until_closed(timeout=5))
    assert f[1] == "INPUT_LIMIT" and "max_input_buffer" in f[2]
    # the others keep working: a finishes its frame and it is stored
    a.send_raw(a_rest)
    assert a.reply(99)[0] == wire.OP_OK
    b.send_raw(b_rest)
    assert b.reply(99)[0] == wire.OP_OK
    assert broker_stats(broker.port)["input_buffered"] < 2_000_000


def test_memory_of_partial_frames_returns_to_the_os_after_they_close(broker_factory):
    # Red team: 40 x 15 MiB partial frames took RSS 33 -> 639 MB and it stayed
    # there.  glibc's dynamic mmap threshold: once a big block is freed, the
    # next big buffers come from the heap and may stay resident after free.
    # A few rounds, since where each buffer lands in the heap varies.
    broker = broker_factory("--max-input-buffer", str(512 * MiB))
    size = 15 * MiB
    first, _ = partial_publish(broker.port, size)  # one big buffer freed first raises the threshold
    wait_for(lambda: broker_stats(broker.port)["input_buffered"] >= size - MiB, 20, "the first partial frame")
    first.close()
    wait_for(lambda: broker_stats(broker.port)["input_buffered"] == 0, 5, "the first to be dropped")
    before = rss(broker)
    for _ in range(3):
        held = []
        for i in range(5):
            held.append(partial_publish(broker.port, size)[0])
            wait_for(lambda: broker_stats(broker.port)["input_buffered"] >= (i + 1) * (size - MiB), 20, "partial frames")
        peak = rss(broker)
        assert peak > before + 50 * MiB, (before, peak)  # the measurement sees the buffers
        for r in held:
            r.close()
        wait_for(lambda: broker_stats(broker.port)["input_buffered"] == 0, 5, "the partial frames to be dropped")
        try:
            wait_for(lambda: rss(broker) < before + 20 * MiB, 10, "memory to go back to the OS")
        except AssertionError:
            raise AssertionError(f"RSS {before} -> {peak} -> {rss(broker)} bytes: freed buffers stayed resident") from None


# -- the memory watermark ------------------------------------------------------------

def test_past_max_memory_publishes_get_memory_limit_while_consumers_drain(broker_factory):
    probe = broker_factory()
    baseline = broker_stats(probe.port)["memory_rss"]
    probe.terminate()
    assert baseline > 0
    # Past max_memory bodies spill to the log; these carry headers, which keeps each one an
    # object with its body in memory (what spilling cannot take out), so memory reaches the
    # hard limit (max_memory x 1.25) and publishes are refused.
    broker = broker_factory("--max-memory", str(baseline + 40 * MiB), "--fsync", "never")
    p = Raw(broker.port, name="producer")
    body = b"m" * MiB
    refused = None
    deadline = time.monotonic() + 30
    published = 0
    while time.monotonic() < deadline and published < 400:
        f = p.call(wire.OP_PUBLISH, "bulk", body, None, 0, {"headers": {"n": published}})
        if f[0] == wire.OP_ERROR:
            refused = f
            break
        published += 1
    assert refused is not None, f"{published} MiB published past max_memory without an error"
    assert refused[2] == "MEMORY_LIMIT" and "max_memory_hard" in refused[3] and "--max-memory" in refused[3]
    # the connection stays open; reads, STATS and admin go on
    assert p.ok(wire.OP_PING) is None
    st = broker_stats_via(p)
    assert st["memory_alarm"] is True and st["memory_rss"] > st["memory_hard_limit"] == int((baseline + 40 * MiB) * 1.25)
    assert st["memory_limit"] == baseline + 40 * MiB and st["memory_spilling"] is True
    assert "memory_alarm" in broker.admin("STATS\n")
    # results and schedules that grow memory are refused too; a settling RESULT_SET is not
    f = p.call(wire.OP_RESULT_SET, "t-1", "SUCCESS", 1, None, None)
    assert f[0] == wire.OP_ERROR and f[2] == "MEMORY_LIMIT"
    # consumers and acks keep working, so the backlog drains ...
    c = Raw(broker.port, name="drain")
    c.ok(wire.OP_CONSUME, ["bulk"], 8)
    for _ in range(published):
        (d,) = c.deliveries(1, timeout=10)
        assert c.ok(wire.OP_ACK, d[2]) == 1
    # ... and the alarm clears by itself: publishing works again
    def publish_ok():
        return p.call(wire.OP_PUBLISH, "bulk", b"small", None, 0, None)[0] == wire.OP_OK

    wait_for(publish_ok, 15, "the memory alarm to clear after draining")
    assert broker_stats_via(p)["memory_alarm"] is False


# -- no request is quadratic -----------------------------------------------------------

def test_a_consume_naming_40000_queues_is_refused_fast_and_others_stay_fast(broker):
    other = Raw(broker.port, name="other")
    r = Raw(broker.port, name="many")
    names = [f"q{i}" for i in range(40_000)]
    rid = r.request(wire.OP_CONSUME, names, 1)
    t0 = time.monotonic()
    assert other.ok(wire.OP_PING) is None
    ping = time.monotonic() - t0
    f = r.reply(rid)
    assert f[0] == wire.OP_ERROR and f[2] == "BAD_REQUEST" and "at most 1000" in f[3]
    assert ping < 1.0, f"a PING waited {ping:.2f} s behind one CONSUME"
    # the most allowed is quick, and duplicates are still named
    t0 = time.monotonic()
    assert type(r.ok(wire.OP_CONSUME, names[:1000], 1)) is int
    assert time.monotonic() - t0 < 1.0
    f = r.call(wire.OP_CONSUME, ["a", "b", "a"], 1)
    assert f[0] == wire.OP_ERROR and "'a' is listed twice" in f[3]


def test_bad_bound_settings_are_named():
    import subprocess
    import sys

    def run(*args):
        return subprocess.run([sys.executable, "-m", "broker", *args], capture_output=True, text=True, timeout=30)

    r = run("--max-input-buffer", "1000", "--max-frame", "2048")
    assert r.returncode == 2 and r.stderr.strip() == (
        "brokerd: max_input_buffer: must be a number of bytes >= max_frame (2048) (got 1000)"
    )
    r = run("--idle-timeout", "0")
    assert r.returncode == 2 and "idle_timeout: must be a number of seconds > 0" in r.stderr
    r = run("--max-connections", "-1")
    assert r.returncode == 2 and "max_connections: must be a whole number >= 0" in r.stderr
    r = run("--max-memory", "lots")
    assert r.returncode == 2 and r.stderr.strip() == (
        "brokerd: --max-memory: 'lots' is not a number of bytes (write e.g. 1048576, 512M or 2G)"
    )
    r = run("--max-memory", "2G", "--max-memory-hard", "1G")
    assert r.returncode == 2 and "max_memory_hard: must be at least max_memory (2147483648)" in r.stderr


def test_the_automatic_max_connections_stays_below_the_descriptor_limit():
    from broker.config import FD_RESERVE, MAX_CONNECTIONS_AUTO, Config, max_connections_for

    assert max_connections_for(1024) == 1024 - FD_RESERVE
    assert max_connections_for(1 << 20) == MAX_CONNECTIONS_AUTO
    assert Config(max_connections=5).connection_limit() == 5
    assert Config(max_memory=0).memory_limit() == 0
    assert Config(max_memory=1000).memory_hard_limit() == 1250
    assert Config(max_memory=1000, max_memory_hard=3000).memory_hard_limit() == 3000
    assert Config().memory_limit() > 0  # 40 % of this machine's memory


def test_one_list_ack_dispatches_each_consumer_once():
    # Before: a list ACK of n tags redispatched the consumer n times, each
    # walking all its queues (20,000 tags on 1,000 queues: 3.4 s of loop).
    from broker.errors import RequestError
    from broker.state import BrokerState

    s = BrokerState(boot_id="t")
    s.connect(1)
    s.connect(2)
    s.consume(1, [f"q{i}" for i in range(1000)], 20_000, 0.0)
    for _ in range(20_000):
        s.publish(2, "q999", b"x", None, 0, 0.0)
    tags = [f[2] for f in s.take_outbox()[1] if f[0] == wire.OP_DELIVER]
    assert len(tags) == 20_000
    calls = []
    real = s._dispatch_consumer
    s._dispatch_consumer = lambda c, now: (calls.append(c), real(c, now))
    assert s.ack(1, tags, 0.0) == 20_000
    assert len(calls) == 1, f"the consumer was dispatched {len(calls)} times for one ACK frame"
    # and one connection holds a bounded number of consumers
    for i in range(BrokerState.MAX_CONSUMERS_PER_CONN - 1):
        s.consume(1, [f"c{i}"], 1, 0.0)
    with pytest.raises(RequestError, match="the most one connection may hold"):
        s.consume(1, ["one-more"], 1, 0.0)
