"""Task events, task history, the worker registry (broker/state/events.py, protocol.md §5.29-5.33).

The rules are checked on the pure state with an explicit clock; what crosses processes is checked
against a real brokerd and real ``python -m client.worker_cli`` processes.  Tests wait for events
(a subscription's handler) or results, never for time to pass.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import threading
import time
import uuid

import pytest

from broker.handlers import admin, binary as commands
from broker.state import BrokerState
from broker.state import events as E
from client.producer import Client
from client.wire import OP_CONTROL, OP_EVENT, OP_OK
from tests.support.broker import broker_for_app
from tests.worker.test_worker import WAIT, WorkerProcess, fresh_queue
from tests.worker_apps import tasks

HB = 0.3  # seconds: the workers' heartbeat interval in these tests


# =============================================================================================
# The state, with an explicit clock
# =============================================================================================
def emit(s, conn, host, events, now):
    return commands.handle(s, conn, [27, 1, host, events], now)


def task_events(tid, n, ts=100.0):
    return [{"type": "task-received", "uuid": tid, "ts": ts + i, "name": "t"} for i in range(n)]


def test_the_event_ring_and_the_histories_stay_bounded():
    s = BrokerState()
    s.connect(1, "w")
    for i in range(E.MAX_TASKS + 2000):  # 12,000 tasks of two events each: 24,000 events
        tid = f"task-{i}"
        emit(s, 1, "w1", [{"type": "task-received", "uuid": tid, "name": "t"},
                          {"type": "task-succeeded", "uuid": tid, "runtime": 0.1}], 100.0 + i)
    assert len(s.events) == E.MAX_EVENTS
    assert s.events[-1]["uuid"] == f"task-{E.MAX_TASKS + 1999}"  # the newest are kept
    assert len(s.task_history) <= E.MAX_TASKS
    assert "task-0" not in s.task_history and f"task-{E.MAX_TASKS + 1999}" in s.task_history
    assert s._history_events == sum(len(evs) for evs in s.task_history.values()) <= E.MAX_HISTORY_EVENTS
    # one task with many events keeps only its latest
    emit(s, 1, "w1", task_events("busy", E.MAX_TASK_EVENTS + 10), 200.0)
    busy = s.task_info("busy", 200.0)["events"]
    assert len(busy) == E.MAX_TASK_EVENTS and busy[-1]["ts"] == 100.0 + E.MAX_TASK_EVENTS + 9
    # many events per task: the overall cap evicts whole tasks, oldest first
    for i in range(E.MAX_HISTORY_EVENTS // E.MAX_TASK_EVENTS + 50):
        emit(s, 1, "w1", task_events(f"long-{i}", E.MAX_TASK_EVENTS), 300.0 + i)
    assert s._history_events <= E.MAX_HISTORY_EVENTS
    assert s._history_events == sum(len(evs) for evs in s.task_history.values())
    assert "long-0" not in s.task_history and f"long-{E.MAX_HISTORY_EVENTS // E.MAX_TASK_EVENTS + 49}" in s.task_history


def test_heartbeats_reach_subscribers_but_not_the_ring():
    s = BrokerState()
    s.connect(1, "w")
    s.connect(2, "watcher")
    s.subscribe(2, True, 0, 100.0)
    emit(s, 1, "w1", [{"type": "worker-online", "freq": 1.0, "queues": ["a", "b"]},
                      {"type": "worker-heartbeat", "freq": 1.0, "loadavg": [0.5, 0.25, 0.25]}], 100.0)
    assert [e["type"] for e in s.events] == ["worker-online"]
    box = s.take_outbox()
    assert [e["type"] for e in box[2][0][1]] == ["worker-online", "worker-heartbeat"]


def test_a_worker_that_misses_three_heartbeats_is_lost_and_comes_back_with_the_next():
    s = BrokerState()
    s.connect(1, "w")
    emit(s, 1, "w1", [{"type": "worker-online", "freq": 2.0}], 100.0)
    emit(s, 1, "w1", [{"type": "worker-heartbeat", "freq": 2.0}], 102.0)
    s.tick(106.0)  # three intervals after worker-online, but it beat at 102
    assert s.workers["w1"].state == "online"
    assert s.next_wakeup() <= 108.0  # the ticker looks when the third interval after the last beat ends
    s.tick(107.9)
    assert s.workers["w1"].state == "online"
    s.tick(108.0)
    w = s.workers["w1"]
    assert w.state == "lost" and w.reason == "no heartbeat for 6.0s (3 intervals of 2s)"
    assert s.events[-1]["type"] == "worker-lost" and s.events[-1]["hostname"] == "w1"
    assert "lost" in admin.execute(s, "WORKERS", 108.0).splitlines()[2]
    emit(s, 1, "w1", [{"type": "worker-heartbeat", "freq": 2.0}], 109.0)
    assert s.workers["w1"].state == "online"
    emit(s, 1, "w1", [{"type": "worker-offline"}], 110.0)
    assert s.workers["w1"].state == "offline"
    s.tick(200.0)
    assert s.workers["w1"].state == "offline"  # a worker that said goodbye is not lost


def test_a_worker_whose_connection_closes_without_goodbye_is_lost_at_once():
    s = BrokerState()
    s.connect(1, "w")
    emit(s, 1, "w1", [{"type": "worker-online", "freq": 30.0}], 100.0)
    s.disconnect(1, 100.5)
    assert s.workers["w1"].state == "lost"
    assert "connection closed" in s.workers["w1"].reason


def test_a_slow_subscriber_loses_events_with_a_count_and_others_are_not_affected():
    s = BrokerState()
    s.connect(1, "w")
    s.connect(2, "slow")
    s.connect(3, "fast")
    s.subscribe(2, True, 0, 100.0)
    s.subscribe(3, True, 0, 100.0)
    backlog = {2: E.SUBSCRIBER_BACKLOG + 1, 3: 0}
    s.output_backlog = backlog.__getitem__
    emit(s, 1, "w1", task_events("a", 3), 100.0)
    box = s.take_outbox()
    assert 2 not in box and len(box[3][0][1]) == 3
    backlog[2] = 0
    emit(s, 1, "w1", task_events("b", 2), 101.0)
    box = s.take_outbox()
    assert box[2] == [[OP_EVENT, box[2][0][1], 3]] and len(box[2][0][1]) == 2
    assert box[3][0][2] == 0
    assert s.events_dropped == 3
    assert s.subscribe(2, True, 0, 102.0)["dropped"] == 3


def test_subscribe_replays_the_ring_without_repeating_events_of_the_same_batch():
    s = BrokerState()
    s.connect(1, "w")
    s.connect(2, "watcher")
    emit(s, 1, "w1", task_events("a", 2), 100.0)
    s.take_outbox()
    s.subscribe(9, True, 0, 100.0)  # someone else subscribed: events of this batch are pending
    emit(s, 1, "w1", task_events("b", 1), 101.0)
    reply = commands.handle(s, 2, [28, 5, True, 10], 101.0)
    assert reply == [OP_OK, 5, {"subscribed": True, "replayed": 3, "dropped": 0}]
    box = s.take_outbox()
    frames = box[2]
    assert [len(f[1]) for f in frames] == [3]  # the replay only; "b" is not sent twice


def test_a_bad_event_refuses_the_whole_batch():
    s = BrokerState()
    s.connect(1, "w")
    reply = emit(s, 1, "w1", [{"type": "task-received", "uuid": "a"}, {"type": "task-started"}], 100.0)
    assert reply[0] == 65 and reply[2] == "BAD_REQUEST" and "uuid" in reply[3]
    assert not s.events and not s.task_history
    reply = emit(s, 1, "w1", [{"type": "x", "nested": {"a": 1}}], 100.0)
    assert reply[2] == "BAD_REQUEST"
    emit(s, 1, "w1", [{"type": "x", "long": "y" * 10_000}], 100.0)
    assert len(s.events[-1]["long"]) == E.MAX_EVENT_TEXT


def test_task_info_combines_the_history_and_the_stored_result():
    s = BrokerState()
    s.connect(1, "w")
    emit(s, 1, "w1", [
        {"type": "task-received", "uuid": "p", "name": "parent", "args": "()", "ts": 100.0},
        {"type": "task-received", "uuid": "c", "name": "child", "args": "(1,)", "parent_id": "p", "root_id": "p",
         "ts": 100.1},
        {"type": "task-started", "uuid": "c", "ts": 100.2},
        {"type": "task-failed", "uuid": "c", "ts": 100.3, "exception": "KeyError('k')", "traceback": "Traceback…"},
    ], 100.0)
    s.result_set(1, "c", "FAILURE", None, {"exc_type": "KeyError", "exc_message": "'k'", "traceback": "TB"}, 100.3)
    info = s.task_info("c", 101.0)
    assert info["state"] == "FAILURE" and info["name"] == "child" and info["parent_id"] == "p"
    assert [e["type"] for e in info["events"]] == ["task-received", "task-started", "task-failed"]
    assert info["meta"]["traceback"] == "TB"
    assert s.task_info("p", 101.0)["children"] == ["c"]
    assert s.task_info("nobody", 101.0) is None
    text = admin.execute(s, "TASK c", 101.0)
    assert "exception  KeyError: 'k'" in text and "traceback:\r\n  TB" in text


def test_a_control_request_is_answered_when_every_worker_replied_or_at_its_timeout():
    s = BrokerState()
    for c in (1, 2, 3):
        s.connect(c, f"c{c}")
    emit(s, 1, "w1", [{"type": "worker-online"}], 100.0)
    emit(s, 2, "w2", [{"type": "worker-online"}], 100.0)
    assert commands.handle(s, 3, [31, 7, "ping", None, {"timeout": 5}], 100.0) is None
    box = s.take_outbox()
    rid = box[1][0][1]["reply_id"]
    assert box[1] == [[OP_CONTROL, {"control": "ping", "args": {}, "reply_id": rid}]] and 2 in box
    commands.handle(s, 1, [32, 1, rid, {"ok": "pong"}], 100.1)
    assert 3 not in s.take_outbox()  # w2 has not answered yet
    commands.handle(s, 2, [32, 1, rid, {"ok": "pong"}], 100.2)
    assert s.take_outbox()[3] == [[OP_OK, 7, {"w1": {"ok": "pong"}, "w2": {"ok": "pong"}}]]
    # a worker that does not answer: the timeout answers with what came in
    commands.handle(s, 3, [31, 8, "stats", None, {"timeout": 2}], 101.0)
    rid = s.take_outbox()[1][0][1]["reply_id"]
    commands.handle(s, 1, [32, 1, rid, {"n": 1}], 101.5)
    s.tick(102.9)
    assert 3 not in s.take_outbox()
    s.tick(103.0)
    assert s.take_outbox()[3] == [[OP_OK, 8, {"w1": {"n": 1}}]]
    # a worker that goes away is not waited for; nobody to ask: answered at once
    commands.handle(s, 3, [31, 9, "ping", None, {"destination": ["w2"]}], 104.0)
    s.disconnect(2, 104.1)
    assert s.take_outbox()[3] == [[OP_OK, 9, {}]]
    assert commands.handle(s, 3, [31, 10, "ping", None, {"destination": ["w2"]}], 105.0) == [OP_OK, 10, {}]


# =============================================================================================
# Real brokerd and worker processes
# =============================================================================================
class Watcher:
    """A subscription (Client.subscribe_events) collecting every event it receives."""

    def __init__(self, address: str, replay: int = 0):
        self.events: list[dict] = []
        self.batches: list[list] = []
        self.dropped = 0
        self.cond = threading.Condition()
        self.client = Client(address, name="test-watcher")
        self.client.subscribe_events(self._on, replay=replay)

    def _on(self, events, dropped):
        with self.cond:
            self.batches.append(events)
            self.events.extend(events)
            self.dropped += dropped
            self.cond.notify_all()

    def wait_for(self, pred, timeout: float = WAIT) -> dict:
        deadline = time.monotonic() + timeout
        with self.cond:
            while True:
                for e in self.events:
                    if pred(e):
                        return e
                left = deadline - time.monotonic()
                if left <= 0:
                    raise AssertionError(f"no such event within {timeout}s; got {self.events[-20:]}")
                self.cond.wait(left)

    def of_task(self, tid: str) -> list[str]:
        with self.cond:
            return [e["type"] for e in self.events if e.get("uuid") == tid]

    def close(self):
        self.client.close()


@pytest.fixture(scope="module")
def ev_broker(tmp_path_factory):
    yield from broker_for_app(tmp_path_factory.mktemp("events-broker"), tasks.app)


@pytest.fixture
def watcher(ev_broker):
    w = Watcher(ev_broker.address)
    yield w
    w.close()


@pytest.fixture
def start_worker(ev_broker, tmp_path):
    started: list[WorkerProcess] = []

    def start(queue, *args, name=None) -> WorkerProcess:
        tasks.app.conf.broker_url = ev_broker.address
        w = WorkerProcess(ev_broker.address, queue, "--heartbeat-interval", str(HB), *args, log_dir=tmp_path,
                          name=name)
        started.append(w)
        return w

    yield start
    for w in started:
        if w.proc.poll() is None:
            try:
                os.kill(w.pid, signal.SIGCONT)
            except ProcessLookupError:
                pass
            w.terminate(15)
        w.log_file.close()


@pytest.fixture(scope="module")
def ev_worker(ev_broker, tmp_path_factory):
    q = fresh_queue()
    w = WorkerProcess(ev_broker.address, q, "-c", "2", "--heartbeat-interval", str(HB),
                      log_dir=tmp_path_factory.mktemp("events-worker"), name=f"ev-{uuid.uuid4().hex[:6]}@test")
    tasks.app.conf.broker_url = ev_broker.address
    assert tasks.add.apply_async((1, 1), queue=q).get(timeout=WAIT) == 2
    yield q, w
    assert w.terminate() == 0, w.log()
    w.log_file.close()


def test_events_reach_a_subscriber_in_order_for_a_task_that_retries_then_succeeds(ev_worker, watcher, tmp_path):
    q, w = ev_worker
    r = tasks.flaky.apply_async((str(tmp_path / "calls"), 1), queue=q)
    assert r.get(timeout=WAIT) == {"calls": 2, "retries": 1}
    watcher.wait_for(lambda e: e.get("uuid") == r.id and e["type"] == "task-succeeded")
    assert watcher.of_task(r.id) == [
        "task-received", "task-started", "task-retried", "task-received", "task-started", "task-succeeded",
    ]
    evs = [e for e in watcher.events if e.get("uuid") == r.id]
    assert all(e["hostname"] == w.name for e in evs)
    assert evs[0]["name"] == "tests.worker_apps.tasks.flaky" and evs[0]["retries"] == 0 and evs[3]["retries"] == 1
    assert "ValueError" in evs[2]["exception"]
    assert evs[5]["runtime"] >= 0 and evs[5]["result"] == "{'calls': 2, 'retries': 1}"


def test_task_over_netcat_shows_state_args_result_and_the_timeline(ev_broker, ev_worker, watcher, tmp_path):
    q, w = ev_worker
    ok = tasks.flaky.apply_async((str(tmp_path / "calls"), 1), queue=q)
    bad = tasks.always_fails.apply_async((str(tmp_path / "fails"),), queue=q)
    ok.get(timeout=WAIT)
    with pytest.raises(Exception):
        bad.get(timeout=WAIT)
    for r, last in ((ok, "task-succeeded"), (bad, "task-failed")):
        watcher.wait_for(lambda e, r=r, last=last: e.get("uuid") == r.id and e["type"] == last)
    text = ev_broker.admin(f"TASK {ok.id}\nTASK {bad.id}\nQUIT\n")
    first, second = text.split(f"OK task {bad.id}")
    lines = first.splitlines()
    assert lines[0] == f"OK task {ok.id}"
    kv = dict(line.split(None, 1) for line in lines[1:] if line and not line.startswith(" ") and "  " in line)
    assert kv["state"] == "SUCCESS" and kv["name"] == "tests.worker_apps.tasks.flaky"
    assert kv["result"] == "{'calls': 2, 'retries': 1}" and kv["worker"] == w.name
    assert "args" in kv and "calls" in kv["args"]
    timeline = [line.split()[2] for line in lines[lines.index("timeline:") + 1:] if line.startswith("  ")]
    assert timeline == ["task-received", "task-started", "task-retried", "task-received", "task-started",
                        "task-succeeded"]
    assert "state      FAILURE" in second and "exception  KeyError: 'still broken'" in second
    assert "task-failed" in second and "traceback:" in second and "KeyError" in second.split("traceback:")[1]


def test_workers_over_netcat_shows_online_workers(ev_broker, ev_worker, watcher):
    q, w = ev_worker
    watcher.wait_for(lambda e: e["type"] == "worker-heartbeat" and e["hostname"] == w.name and e["processed"] >= 1)
    text = ev_broker.admin("WORKERS\nQUIT\n")
    row = next(line for line in text.splitlines() if line.startswith(w.name))
    cells = row.split()
    assert cells[1] == "online" and cells[2] == "processes" and cells[3] == "2"
    assert q in cells[-1]
    with Client(ev_broker.address) as c:
        me = next(x for x in c.workers() if x["hostname"] == w.name)
    assert me["state"] == "online" and me["freq"] == HB and me["pool"] == "processes"
    assert me["queues"] == [q] and me["processed"] >= 1


def test_a_killed_worker_shows_as_lost(ev_broker, start_worker, watcher):
    q = fresh_queue()
    w = start_worker(q, "-c", "1")
    assert tasks.add.apply_async((2, 2), queue=q).get(timeout=WAIT) == 4
    watcher.wait_for(lambda e: e["type"] == "worker-online" and e["hostname"] == w.name)
    os.kill(w.pid, signal.SIGKILL)
    w.proc.wait(10)
    lost = watcher.wait_for(lambda e: e["type"] == "worker-lost" and e["hostname"] == w.name)
    assert "connection closed" in lost["reason"]
    row = next(line for line in ev_broker.admin("WORKERS\n").splitlines() if line.startswith(w.name))
    assert row.split()[1] == "lost"


def test_a_frozen_worker_is_lost_after_three_missed_heartbeats_and_back_when_it_beats_again(
        ev_broker, start_worker, watcher):
    q = fresh_queue()
    w = start_worker(q, "-c", "1")
    assert tasks.add.apply_async((2, 2), queue=q).get(timeout=WAIT) == 4
    watcher.wait_for(lambda e: e["type"] == "worker-heartbeat" and e["hostname"] == w.name)
    os.kill(w.pid, signal.SIGSTOP)  # its connection stays open: only the missing heartbeats tell
    try:
        lost = watcher.wait_for(lambda e: e["type"] == "worker-lost" and e["hostname"] == w.name)
    finally:
        os.kill(w.pid, signal.SIGCONT)
    assert f"3 intervals of {HB:g}s" in lost["reason"]
    n = len(watcher.events)
    watcher.wait_for(lambda e: e["type"] == "worker-heartbeat" and e["hostname"] == w.name
                     and watcher.events.index(e) >= n)
    with Client(ev_broker.address) as c:
        assert next(x for x in c.workers() if x["hostname"] == w.name)["state"] == "online"
    assert w.terminate() == 0
    watcher.wait_for(lambda e: e["type"] == "worker-offline" and e["hostname"] == w.name)


def test_events_over_netcat_stream_lines_until_quit(ev_broker, ev_worker):
    q, w = ev_worker
    with socket.create_connection(("127.0.0.1", ev_broker.port), timeout=WAIT) as s:
        f = s.makefile("rb")
        s.sendall(b"EVENTS\n")
        assert f.readline() == b"OK streaming events; send QUIT to stop\r\n"
        r = tasks.add.apply_async((3, 4), queue=q)
        assert r.get(timeout=WAIT) == 7
        seen = []
        while not any("task-succeeded" in line for line in seen):
            line = f.readline().decode()
            assert line.endswith("\r\n"), line
            if r.id in line:
                seen.append(line)
        assert [line.split()[1] for line in seen] == ["task-received", "task-started", "task-succeeded"]
        assert all(line.split()[2] == w.name for line in seen)
        assert "result=7" in seen[-1]
        s.sendall(b"PEEK x\nQUIT\n")
        rest = b""
        while not rest.endswith(b"OK bye\r\n"):
            chunk = s.recv(65536)
            assert chunk, rest
            rest += chunk
        assert b"ERR BAD_REQUEST streaming events: only QUIT is accepted\r\n" in rest
        assert s.recv(65536) == b""  # closed after QUIT
    # over ADMIN, EVENTS cannot stream
    with Client(ev_broker.address) as c:
        with pytest.raises(Exception, match="SUBSCRIBE"):
            c.admin("EVENTS")


def test_a_late_subscriber_can_replay_recent_events(ev_broker, ev_worker, watcher):
    q, w = ev_worker
    r = tasks.add.apply_async((5, 5), queue=q)
    assert r.get(timeout=WAIT) == 10
    watcher.wait_for(lambda e: e.get("uuid") == r.id and e["type"] == "task-succeeded")
    late = Watcher(ev_broker.address, replay=E.MAX_EVENTS)
    try:
        late.wait_for(lambda e: e.get("uuid") == r.id and e["type"] == "task-succeeded")
        replay = late.batches[0]
        assert [e["type"] for e in replay if e.get("uuid") == r.id] == [
            "task-received", "task-started", "task-succeeded"]
        assert not any(e["type"] == "worker-heartbeat" for e in replay)  # live-only
        assert any(e["type"] == "worker-online" and e["hostname"] == w.name for e in replay)
    finally:
        late.close()


def test_max_memory_per_child_replacements_show_in_events_and_stats(ev_broker, start_worker, watcher):
    q = fresh_queue()
    w = start_worker(q, "-c", "1", "--max-memory-per-child", "1")  # 1 KiB: every child is over it
    first = tasks.pid.apply_async(queue=q).get(timeout=WAIT)
    ev = watcher.wait_for(lambda e: e["type"] == "worker-process-replaced" and e["hostname"] == w.name)
    assert ev["reason"] == "max-memory-per-child" and ev["pid"] == first and ev["rss_kb"] > 1
    assert tasks.pid.apply_async(queue=q).get(timeout=WAIT) != first  # a new process ran it
    stats = tasks.app.control.inspect(destination=[w.name], timeout=WAIT).stats()[w.name]
    assert stats["replaced"]["max-memory-per-child"] >= 1
    assert stats["pool"]["max-memory-per-child"] == 1
    hb = watcher.wait_for(lambda e: e["type"] == "worker-heartbeat" and e["hostname"] == w.name
                          and e["replaced_max_memory"] >= 1)
    assert hb["pool_size"] == 1


def test_autoscale_shows_in_events(ev_broker, start_worker, watcher):
    q = fresh_queue()
    w = start_worker(q, "--autoscale", "3,1")
    marker = f"m-{uuid.uuid4().hex}"
    rs = [tasks.slow.apply_async((0.5,), {"marker": marker if i == 0 else None}, queue=q) for i in range(3)]
    ev = watcher.wait_for(lambda e: e["type"] == "worker-pool-resized" and e["hostname"] == w.name)
    assert ev["reason"] == "autoscale" and ev["size"] == ev["old"] + 1
    for r in rs:
        r.get(timeout=WAIT)


def test_a_worker_without_task_events_still_registers_and_beats(ev_broker, start_worker, watcher):
    q = fresh_queue()
    w = start_worker(q, "-c", "1", "--no-task-events")
    r = tasks.add.apply_async((1, 2), queue=q)
    assert r.get(timeout=WAIT) == 3
    online = watcher.wait_for(lambda e: e["type"] == "worker-online" and e["hostname"] == w.name)
    assert online["task_events"] is False
    watcher.wait_for(lambda e: e["type"] == "worker-heartbeat" and e["hostname"] == w.name and e["processed"] >= 1)
    assert watcher.of_task(r.id) == []
    text = ev_broker.admin(f"TASK {r.id}\n")
    assert re.search(r"^state +SUCCESS\r$", text, re.M) and "(no events)" in text  # the stored result shows
