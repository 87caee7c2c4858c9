"""Celery's remote control, inspect and events on brokerd's native exchanges (issue 13 item 1, the
fanout/topic part): a real brokerd and a real ``celery worker -E`` (prefork, so that terminate works)
through client/celery's transport.  ``celery.pidbox`` (fanout) and ``celeryev`` (topic) are brokerd
exchanges (BIND/EMIT); pidbox replies go through the direct exchange ``reply.celery.pidbox``; the
worker's and callers' queues are brokerd temporary queues, gone with their connection."""

from __future__ import annotations

import concurrent.futures
import os
import socket
import threading
import time
from pathlib import Path

import pytest

pytest.importorskip("celery", reason="Celery is not installed (pip install 'brokerd[celery]')")

from tests.e2e.test_celery_app import WAIT, celery_env, wait_for  # noqa: E402

HOST = socket.gethostname()
NAME = f"ctl@{HOST}"
# seconds an inspect call may wait for its replies; every call names its destination, so it returns
# as soon as that worker answered (milliseconds), and this is only the bound
INSPECT = WAIT


def admin_rows(broker, command: str) -> list[list[str]]:
    text = broker.admin(command + "\n")
    return [line.split() for line in text.splitlines()[2:] if line and line != "END"]


def queue_names(broker) -> set[str]:
    return {row[0] for row in admin_rows(broker, "QUEUES")}


def bound_queues(broker, exchange: str) -> set[str]:
    text = broker.admin(f"BINDINGS {exchange}\n")
    if text.startswith("ERR NOT_FOUND"):
        return set()
    return {row[0] for row in admin_rows(broker, f"BINDINGS {exchange}")}


def celery_prefetch(broker) -> int:
    """The prefetch credit of the (one) brokerd consumer of queue ``celery``: CONSUMERS' PREFETCH."""
    (credit,) = [int(row[4]) for row in admin_rows(broker, "CONSUMERS") if row[3] == "celery"]
    return credit


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    for e in celery_env(tmp_path_factory.mktemp("celeryctl"), "--pool", "prefork", "-c", "2", "-E", name="ctl"):
        e.ctl = e.first
        yield e


def test_celery_inspect_ping_answers_through_brokerds_pidbox_exchange(env):
    p = env.run("inspect", "ping", "-d", NAME, "-t", str(INSPECT), name="inspect-ping")
    assert p.wait(WAIT + INSPECT) == 0, Path(p.log_path).read_text()
    out = Path(p.log_path).read_text()
    assert NAME in out and "pong" in out, out
    # the worker's pidbox queue is a temporary queue bound to brokerd's fanout exchange
    rows = {row[0]: row for row in admin_rows(env.broker, "EXCHANGES")}
    assert rows["celery.pidbox"][1] == "fanout", rows
    assert f"{NAME}.celery.pidbox" in bound_queues(env.broker, "celery.pidbox")


def test_inspect_active_registered_and_stats(env):
    capp = env.capp
    r = capp.slow.apply_async(("inspect-active", 3))
    wait_for(lambda: env.lines("inspect-active"), "the slow task to start")
    i = capp.app.control.inspect(destination=[NAME], timeout=INSPECT)
    active = i.active()
    assert [t["id"] for t in active[NAME]] == [r.id], active
    registered = i.registered()
    assert "tests.celery_apps.capp.add" in registered[NAME], registered
    stats = i.stats()[NAME]
    assert stats["broker"]["transport"] == "brokerd" and stats["pool"]["max-concurrency"] == 2, stats
    assert r.get(timeout=WAIT)["name"] == "inspect-active"


def test_broadcast_pool_grow_and_rate_limit_reach_the_worker(env):
    control = env.capp.app.control
    replies = control.broadcast("pool_grow", arguments={"n": 1}, destination=[NAME], reply=True, timeout=INSPECT)
    assert replies == [{NAME: {"ok": "pool will grow"}}], replies
    # the worker took one more task at a time: its brokerd consumer's prefetch credit went from 2 to 3
    # (billiard starts the process itself on its own schedule)
    wait_for(lambda: celery_prefetch(env.broker) == 3, "the worker's prefetch credit to grow")
    replies = control.broadcast("pool_shrink", arguments={"n": 1}, destination=[NAME], reply=True, timeout=INSPECT)
    assert replies == [{NAME: {"ok": "pool will shrink"}}], replies
    wait_for(lambda: celery_prefetch(env.broker) == 2, "the worker's prefetch credit to shrink back")
    replies = control.rate_limit("tests.celery_apps.capp.add", "100/m", destination=[NAME], reply=True, timeout=INSPECT)
    assert replies == [{NAME: {"ok": "new rate limit set successfully"}}], replies
    # the worker now holds that limit: its registered tasks, shown with that attribute, say so
    got = control.inspect(destination=[NAME], timeout=INSPECT).registered("rate_limit")[NAME]
    assert "tests.celery_apps.capp.add [rate_limit=100/m]" in got, got
    control.rate_limit("tests.celery_apps.capp.add", None, destination=[NAME], reply=True, timeout=INSPECT)


def test_revoke_terminate_kills_the_running_task_and_brokerd_keeps_the_revoke(env):
    from celery.exceptions import TaskRevokedError

    capp = env.capp
    r = capp.slow.apply_async(("doomed-task", 60))
    (pid,) = wait_for(lambda: env.lines("doomed-task"), "the long task to start")
    capp.app.control.revoke(r.id, terminate=True, signal="SIGKILL")
    with pytest.raises(TaskRevokedError):
        r.get(timeout=WAIT)

    def gone():
        try:
            os.kill(int(pid), 0)
        except ProcessLookupError:
            return True
        return False

    wait_for(gone, "the pool process running the task to be killed")
    # brokerd holds the revoke itself (REVOKE, logged): a message with that id is never delivered again
    from client.producer import Client

    with Client(env.url) as c:
        c.publish("parked-revoke", b"revoked", id=r.id)
        c.publish("parked-revoke", b"marker", id="marker-after-revoke")
        d = c.consume(["parked-revoke"], prefetch=1).get(timeout=WAIT)
        assert d is not None and d.id == "marker-after-revoke", d
        d.ack()


def test_an_events_receiver_sees_task_and_heartbeat_events_on_a_temporary_topic_binding(env):
    capp = env.capp
    seen: dict[str, dict] = {}
    done = threading.Event()
    want = capp.add.delay(40, 2)

    def on_event(event):
        kind = event["type"]
        if kind == "task-succeeded" and event["uuid"] != want.id:
            return
        seen.setdefault(kind, event)
        if {"task-succeeded", "worker-heartbeat"} <= seen.keys():
            done.set()

    with capp.app.connection_for_read() as conn:
        recv = capp.app.events.Receiver(conn, handlers={"*": on_event})
        queue = recv.queue.name
        # itercapture consumes on a connection of its own (kombu's ConsumerMixin), open while it runs
        it = recv.itercapture(limit=None, timeout=WAIT, wakeup=True)
        try:
            next(it)  # consuming: the queue is declared and bound
            assert queue in bound_queues(env.broker, "celeryev")
            rows = {row[0]: row for row in admin_rows(env.broker, "EXCHANGES")}
            assert rows["celeryev"][1] == "topic" and int(rows["celeryev"][3]) >= 1, rows  # temporary
            # the task may have finished before the receiver bound: run one more to see its success
            assert want.get(timeout=WAIT) == 42
            want = capp.add.delay(40, 2)
            deadline = time.monotonic() + WAIT
            while not done.is_set() and time.monotonic() < deadline:
                next(it)
        finally:
            it.close()
    assert done.is_set(), f"events seen: {sorted(seen)}"
    assert seen["task-succeeded"]["result"] == "42"
    assert seen["worker-heartbeat"]["hostname"] == NAME
    wait_for(lambda: queue not in queue_names(env.broker), "the receiver's queue to go with its connection")
    assert queue not in bound_queues(env.broker, "celeryev")


def test_concurrent_inspect_callers_each_get_their_own_replies(env):
    """Each caller has its own reply queue (``<oid>.reply.celery.pidbox``) bound by its ticket's key to
    the direct exchange ``reply.celery.pidbox``: eight at once all get the worker's answer."""
    control = env.capp.app.control

    def call(n):
        return control.inspect(destination=[NAME], timeout=INSPECT).ping()

    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(call, range(8)))
    assert answers == [{NAME: {"ok": "pong"}}] * 8, answers
    # and a caller in another process at the same time
    procs = [env.run("inspect", "ping", "-d", NAME, "-t", str(INSPECT), name=f"ping-{i}") for i in range(2)]
    for p in procs:
        assert p.wait(WAIT + INSPECT) == 0, Path(p.log_path).read_text()
        assert "pong" in Path(p.log_path).read_text()
    # the callers' reply queues are gone (each call deletes its own; the rest go with the connection)
    assert not [q for q in queue_names(env.broker) if q.endswith(".reply.celery.pidbox")]


def test_a_hostile_control_message_costs_only_itself(env):
    from client.producer import Client

    with Client(env.url) as c:
        assert c.emit("celery.pidbox", "", b"\xff not kombu", id="hostile-ctl")["queues"] >= 1
        c.emit("celery.pidbox", "", b"{}", headers={"kombu": {"content-type": "application/json"}})
    assert env.capp.app.control.inspect(destination=[NAME], timeout=INSPECT).ping() == {NAME: {"ok": "pong"}}
    assert env.ctl.poll() is None


def test_the_workers_temporary_queues_and_bindings_are_gone_after_it_stops(env):
    other = env.worker("--pool", "solo", "-E", name="brief")
    mine = f"brief@{HOST}.celery.pidbox"
    assert mine in bound_queues(env.broker, "celery.pidbox")
    assert mine in queue_names(env.broker)
    assert env.capp.app.control.inspect(destination=[f"brief@{HOST}"], timeout=INSPECT).ping()
    env.stop(other)
    assert other.returncode == 0, Path(other.log_path).read_text()[-3000:]
    wait_for(lambda: mine not in queue_names(env.broker), "the stopped worker's pidbox queue to go")
    assert mine not in bound_queues(env.broker, "celery.pidbox")
    assert f"{NAME}.celery.pidbox" in bound_queues(env.broker, "celery.pidbox")  # the other stays
