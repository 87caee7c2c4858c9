"""Clients follow the leader (issue 16 item 5): a list of addresses finds the leader, a lost
connection is re-established and unconfirmed publishes are resent once (dedupe), workers consume
again, a delivery of the old connection is never settled on the new one.

Real brokerd processes (and a worker process) on loopback with real data dirs, stopped by pid.
The one in-test helper is a TCP relay that can swallow the broker's replies and cut connections:
it makes "stored but the confirm never arrived" happen on purpose instead of by luck.
"""

from __future__ import annotations

import asyncio
import collections
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid

import pytest
import trio

from client import AsyncClient, Client, beat, ctl, wire
from client.errors import ConnectionLost, NotEnoughReplicas, NotLeader, StaleDelivery
from client.options import parse_leader
from tests.support.broker import ROOT, BrokerProcess
from tests.support.wireclient import Raw
from tests.worker_apps import tasks

WAIT = 20.0  # seconds any wait here may take at most


def wait_for(pred, what: str):
    deadline = time.monotonic() + WAIT
    while time.monotonic() < deadline:
        got = pred()
        if got:
            return got
        time.sleep(0.02)
    raise AssertionError(f"timed out after {WAIT}s waiting for {what}")


def free_port() -> int:
    """A loopback port nothing listens on (bound, then closed)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def stored(broker: BrokerProcess, queue: str) -> int:
    """Messages the broker holds for ``queue``: ready + delayed + in flight."""
    for line in broker.admin("QUEUES\n").splitlines():
        parts = line.split()
        if parts and parts[0] == queue:
            return int(parts[1]) + int(parts[2]) + int(parts[3])
    return 0


def drain(address: str, queue: str, n: int) -> list[bytes]:
    """The bodies of the first ``n`` deliveries of ``queue`` (acked), then whatever else is
    there within a short look (a doubled message must show up)."""
    bodies = []
    with Client(address, timeout=5) as c:
        with c.consume(queue, prefetch=200) as cons:
            while len(bodies) < n:
                d = cons.get(WAIT)
                assert d is not None, f"only {len(bodies)} of {n} messages came back"
                bodies.append(d.body)
                d.ack()
            while (d := cons.get(0.3)) is not None:
                bodies.append(d.body)
                d.ack()
    return bodies


@pytest.fixture
def group(tmp_path):
    started = []

    def start(name, *args):
        b = BrokerProcess(tmp_path / name, *args).start()
        started.append(b)
        return b

    yield start
    for b in started:
        if b.proc is not None and b.proc.poll() is None:
            b.kill()


class Relay:
    """127.0.0.1:port -> the broker; ``swallow`` drops the broker's bytes, ``cut()`` closes
    every relayed connection (both ends), as a failing network would."""

    def __init__(self, target_port: int):
        self.target = target_port
        self.swallow = False
        self.pairs: list[tuple[socket.socket, socket.socket]] = []
        self.lock = threading.Lock()
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.threads = [threading.Thread(target=self._accept, daemon=True)]
        self.threads[0].start()

    def _accept(self):
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            try:
                upstream = socket.create_connection(("127.0.0.1", self.target))
            except OSError:  # the broker behind is gone: so is this connection
                client.close()
                continue
            with self.lock:
                self.pairs.append((client, upstream))
            for a, b, replies in ((client, upstream, False), (upstream, client, True)):
                t = threading.Thread(target=self._pump, args=(a, b, replies), daemon=True)
                t.start()
                self.threads.append(t)

    def _pump(self, src, dst, replies):
        try:
            while data := src.recv(65536):
                if not (replies and self.swallow):
                    dst.sendall(data)
        except OSError:
            pass
        for s in (src, dst):
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def cut(self):
        with self.lock:
            pairs, self.pairs = self.pairs, []
        for pair in pairs:
            for s in pair:
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def close(self):
        try:
            self.listener.shutdown(socket.SHUT_RDWR)  # wakes accept() (close alone does not)
        except OSError:
            pass
        self.listener.close()
        self.cut()
        for t in self.threads:
            t.join(timeout=5)
        with self.lock:
            for pair in self.pairs:
                for s in pair:
                    s.close()


# -- finding the leader --------------------------------------------------------------------------
def test_a_list_whose_first_address_is_down_or_a_follower_reaches_the_leader(group, capsys):
    leader = group("leader")
    follower = group("follower", "--follow", leader.address)
    dead = free_port()
    # a follower's HELLO reply names its leader (protocol.md §3.3), and so does its NOT_LEADER
    raw = Raw(follower.port)
    assert raw.hello[2]["leader"] == leader.address
    refused = raw.call(wire.OP_PUBLISH, "q", b"x", None, 0, None)
    assert refused[2] == "NOT_LEADER" and parse_leader(refused[3]) == ("127.0.0.1", leader.port)
    raw.close()
    for url in (f"brokerd://127.0.0.1:{dead},{follower.address}",  # down, then a follower
                f"{follower.address},127.0.0.1:{dead}"):  # a follower first: it names the leader
        with Client(url, timeout=5) as c:
            assert c.connected_to == ("127.0.0.1", leader.port)
            assert "leader" not in c.server_info
            c.publish("q", b"x")
    # one address names that brokerd, whatever its role: reads are the follower's, and a write it
    # refuses with NOT_LEADER goes to the leader it names
    with Client(follower.address, timeout=5) as c:
        assert c.connected_to == ("127.0.0.1", follower.port) and c.server_info["leader"] == leader.address
        c.publish("q", b"z")
        assert c.connected_to == ("127.0.0.1", leader.port) and c.reconnects == 1
    with Client(follower.address, timeout=5, reconnect=0) as c:  # not following: the refusal, as it was
        with pytest.raises(NotLeader, match=leader.address):
            c.publish("q", b"z")

    async def async_publish():  # the async shell finds the leader the same way
        async with AsyncClient(f"{follower.address},127.0.0.1:{dead},{leader.address}", timeout=5) as ac:
            assert (ac._host, ac._port) == ("127.0.0.1", leader.port)
            await ac.publish("q", b"y")

    trio.run(async_publish)
    asyncio.run(async_publish())
    wait_for(lambda: stored(leader, "q") == 5, "every publish on the leader")
    # brokerd-ctl and brokerd-beat take the list too (they reach the leader through the SDK)
    url = f"brokerd://{follower.address},{leader.address}"
    assert ctl.main(["-b", url, "queues"]) == 0
    assert "q" in capsys.readouterr().out.split()
    assert beat.main(["tests.beat_apps.periodic:app", "-b", url]) == 0
    assert "entries pushed" in capsys.readouterr().out
    assert "top-papers-hourly" in leader.admin("SCHEDULES\n")  # pushed to the leader
    # Celery's transport (kombu hands it the URL whole) publishes on the leader too
    import client.celery  # noqa: F401  registers brokerd://
    from kombu import Connection, Exchange, Producer, Queue

    kq = Queue("kq", Exchange("kq", type="direct"), routing_key="kq")
    with Connection(f"brokerd://127.0.0.1:{dead},{follower.address}") as conn:
        Producer(conn).publish({"n": 1}, exchange=kq.exchange, routing_key="kq", declare=[kq])
    wait_for(lambda: stored(leader, "kq") == 1, "the kombu publish on the leader")
    # nobody answers as leader: one error naming every address and why
    with pytest.raises(ConnectionLost) as err:
        Client(f"brokerd://127.0.0.1:{dead},127.0.0.1:{free_port()}", timeout=5)
    assert err.value.message.count("cannot connect") == 2 and f"127.0.0.1:{dead}" in err.value.message


def test_reconnecting_gives_up_with_a_clear_error_after_the_stated_time(group):
    b = group("b")
    c = Client(f"brokerd://{b.address},127.0.0.1:{free_port()}", timeout=5, reconnect=0.5)
    c.publish("q", b"x")
    b.kill()  # and never restarted
    for _ in range(2):  # each call tries again for the stated time, and says so
        t0 = time.monotonic()
        with pytest.raises(ConnectionLost, match=r"no leader brokerd reachable at .*gave up after reconnecting for 0.5 s"):
            c.publish("q", b"y")
        assert 0.5 <= time.monotonic() - t0 < WAIT
    assert c.reconnects == 0
    c.close()


# -- resends are stored once ---------------------------------------------------------------------
def test_publishes_whose_confirms_were_lost_are_resent_and_stored_once(group):
    b = group("b")
    relay = Relay(b.port)
    try:
        c = Client(f"127.0.0.1:{relay.port}", timeout=5)
        c.publish("warm", b"x")
        relay.swallow = True  # the broker stores what follows, but no confirm reaches the client
        sent = [c.publish("q", b"m%d" % i, confirm=False) for i in range(50)]
        c.flush()
        wait_for(lambda: stored(b, "q") == 50, "the broker to store all 50")
        relay.swallow = False
        relay.cut()  # the connection dies with 50 publishes unconfirmed
        c.wait_for_confirms(timeout=WAIT)  # reconnects and resends them (same ids and keys)
        assert c.reconnects == 1
        assert stored(b, "q") == 50  # not 100: each resend was a duplicate key
        bodies = drain(b.address, "q", 50)
        assert sorted(bodies) == sorted(b"m%d" % i for i in range(50))
        assert len(set(sent)) == 50
        c.close()
    finally:
        relay.close()


@pytest.mark.parametrize("pipelined, threads", [(False, 1), (True, 1), (True, 3)],
                         ids=["confirm-each", "pipelined", "pipelined-3-threads-one-client"])
def test_kill_9_under_publishing_loses_no_confirmed_publish_and_doubles_none(group, pipelined, threads):
    b = group("b")
    confirmed: list[bytes] = []
    failed: list[BaseException] = []
    stop = threading.Event()
    shared = Client(b.address, timeout=5)  # one client, shared by the producing threads

    def produce(t):
        i = 0
        try:
            while not stop.is_set():
                if pipelined:
                    batch = [b"t%dm%d" % (t, n) for n in range(i, i + 20)]
                    for body in batch:
                        shared.publish("q", body, confirm=False)
                    shared.wait_for_confirms(timeout=WAIT)
                    confirmed.extend(batch)
                    i += 20
                else:
                    body = b"t%dm%d" % (t, i)
                    shared.publish("q", body)
                    confirmed.append(body)
                    i += 1
        except BaseException as exc:  # noqa: BLE001 - reported by the test
            failed.append(exc)

    producers = [threading.Thread(target=produce, args=(t,)) for t in range(threads)]
    for t in producers:
        t.start()
    try:
        for _ in range(2):  # two kills: the second reconnect starts from a reconnected client
            mark = len(confirmed)
            wait_for(lambda: len(confirmed) >= mark + 40 or failed, "confirmed publishes")
            b.kill()
            b.restart()
        mark = len(confirmed)
        wait_for(lambda: len(confirmed) >= mark + 40 or failed, "publishes confirmed after the restarts")
    finally:
        stop.set()
        for t in producers:
            t.join(WAIT)
        shared.close()
    assert not failed, failed
    assert shared.reconnects == 2  # one reconnect per kill, however many threads met it
    n = len(confirmed)
    bodies = drain(b.address, "q", n)
    doubled = [body for body, k in collections.Counter(bodies).items() if k > 1]
    assert not doubled, f"stored twice: {doubled[:5]}"
    assert not set(confirmed) - set(bodies), "a confirmed publish was lost"


@pytest.mark.parametrize("how", ["promote", "restart"])
def test_failover_to_the_follower_loses_no_confirmed_publish_and_doubles_none(group, how):
    """kill -9 the leader, then make its follower the leader: PROMOTE (a hot standby: no replay)
    or a restart without --follow on its data dir.  A client given both addresses follows it,
    resends what was unconfirmed, and the new leader, which applied the same log (the keys
    with it), drops the resends it already holds."""
    leader = group("leader", "--sync-replicas", "1")  # a confirm means on both disks
    follower = group("follower", "--follow", leader.address)
    relay = Relay(leader.port)  # the client reaches the leader through it
    try:
        c = Client(f"brokerd://127.0.0.1:{relay.port},{follower.address}", timeout=5)
        wait_for(lambda: _published(c), "the follower to be in sync (a publish confirmed)")
        confirmed = [b"c%d" % i for i in range(30)]
        for body in confirmed:
            c.publish("q", body, confirm=False)
        c.wait_for_confirms(timeout=WAIT)
        relay.swallow = True  # stored on both disks, but these confirms never arrive
        unconfirmed = [b"u%d" % i for i in range(50)]
        for body in unconfirmed:
            c.publish("q", body, confirm=False)
        c.flush()
        wait_for(lambda: stored(follower, "q") == 80, "the follower to hold all 80")
        leader.kill()
        relay.swallow = False
        if how == "promote":  # brokerd-ctl promote's op (protocol.md §5.45)
            raw = Raw(follower.port)
            assert raw.call(wire.OP_PROMOTE, "the leader was killed")[0] == wire.OP_OK
            raw.close()
        else:
            follower.terminate()
            follower.args = []  # the same data dir and port, without --follow
            follower.restart()
        c.wait_for_confirms(timeout=WAIT)  # the relay leads nowhere now: on to the new leader, resend
        assert c.connected_to == ("127.0.0.1", follower.port) and c.reconnects == 1
        c.publish("q", b"after")
        assert stored(follower, "q") == 81  # the 50 resends were dropped as duplicates
        c.close()
    finally:
        relay.close()
    bodies = drain(follower.address, "q", 81)
    assert sorted(bodies) == sorted(confirmed + unconfirmed + [b"after"])


def _published(c: Client) -> bool:
    try:
        c.publish("warm", b"x")
        return True
    except NotEnoughReplicas:
        return False


# -- consumers ---------------------------------------------------------------------------------
def test_a_delivery_from_before_a_reconnect_is_not_settled_on_the_new_connection(group):
    b = group("b")
    with Client(b.address, timeout=5) as c:
        c.publish("q", b"one")
        cons = c.consume("q", prefetch=1)
        d = cons.get(WAIT)
        assert d is not None and not d.redelivered
        b.kill()
        b.restart()
        c.publish("other", b"x")  # the next call reconnects
        assert c.reconnects == 1
        with pytest.raises(StaleDelivery, match="earlier connection"):
            d.ack()
        with pytest.raises(ConnectionLost):
            cons.get(1)  # the consumer ended with its connection
        again = c.consume("q", prefetch=1).get(WAIT)
        assert again is not None and again.body == b"one" and again.redelivered
        again.ack(wait=True)


class Worker:
    """``python -m client.worker_cli tests.worker_apps.tasks:app -b URL -Q queue``, stopped by pid."""

    def __init__(self, url: str, queue: str, log_path):
        self.log_path = log_path
        self.log_file = open(log_path, "w")
        env = dict(os.environ, PYTHONPATH=str(ROOT), PYTHONUNBUFFERED="1")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "client.worker_cli", "tests.worker_apps.tasks:app", "-b", url, "-Q", queue,
             "-c", "2", "-n", f"w-{uuid.uuid4().hex[:6]}@failover"],
            cwd=ROOT, env=env, stdin=subprocess.DEVNULL, stdout=self.log_file, stderr=subprocess.STDOUT)

    def stop(self):
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self.log_file.close()
        return self.log_path.read_text()


def test_a_worker_and_an_app_given_a_list_keep_going_after_kill_9_and_a_retry_still_runs(group, tmp_path):
    b = group("b")
    url = f"brokerd://127.0.0.1:{free_port()},{b.address}"  # the first member is down
    tasks.app.conf.broker_url = url
    tasks.app.close()
    q = f"t.{uuid.uuid4().hex[:8]}"
    w = Worker(url, q, tmp_path / "worker.log")
    try:
        assert tasks.add.apply_async((1, 2), queue=q).get(timeout=WAIT) == 3
        b.kill()
        b.restart()
        # the app's client reconnects by itself; the worker's intake consumes again
        assert tasks.add.apply_async((2, 3), queue=q).get(timeout=WAIT) == 5
        # a retry republishes the task under the same id: a new dedupe key, so it is stored and runs
        r = tasks.early_ack.apply_async((str(tmp_path / "calls"),), queue=q)
        assert r.get(timeout=WAIT) == 2
    finally:
        tasks.app.close()
        log = w.stop()
    assert "reconnected to brokerd" in log, log[-2000:]
