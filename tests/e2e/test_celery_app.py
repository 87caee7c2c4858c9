"""Celery itself on brokerd: an unchanged Celery app (tests/celery_apps/capp.py) run by a real
``celery -A ... worker`` subprocess against a real brokerd, through client/celery's kombu transport
and result backend (issue 13 items 1-3)."""

from __future__ import annotations

import importlib
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytest.importorskip("celery", reason="Celery is not installed (pip install 'brokerd[celery]')")

from tests.support.broker import ROOT, BrokerProcess  # noqa: E402

CELERY = [sys.executable, "-m", "celery", "-A", "tests.celery_apps.capp"]
WAIT = 20.0  # seconds: the bound of every wait for a worker, a result or a mark


def wait_for(predicate, what: str, timeout: float = WAIT):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out after {timeout:g} s waiting for {what}")


class Env:
    def __init__(self, broker, marks, logs):
        self.broker, self.marks, self.logs = broker, marks, logs
        self.url = f"brokerd://{broker.address}"
        self.env = dict(os.environ, CAPP_BROKER=self.url, CAPP_MARKS=str(marks),
                        PYTHONPATH=str(ROOT), PYTHONUNBUFFERED="1")
        self.procs = []

    def run(self, *args, name="celery"):
        log = open(self.logs / f"{name}-{len(self.procs)}.log", "w")
        p = subprocess.Popen([*CELERY, *args], env=self.env, cwd=ROOT, stdin=subprocess.DEVNULL,
                             stdout=log, stderr=subprocess.STDOUT)
        p.log_path = log.name
        self.procs.append(p)
        return p

    def worker(self, *args, name="worker"):
        p = self.run("worker", "--pool", "threads", "-l", "info", "--without-mingle", "--without-gossip",
                     "-n", f"{name}@%h", *args, name=name)
        wait_for(lambda: "ready." in Path(p.log_path).read_text() or p.poll() is not None, f"{name} to start")
        assert p.poll() is None, Path(p.log_path).read_text()[-3000:]
        return p

    def stop(self, p, sig=signal.SIGTERM):
        if p.poll() is None:
            p.send_signal(sig)
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait(5)

    def lines(self, name):
        f = self.marks / name
        return f.read_text().splitlines() if f.exists() else []


def celery_env(tmp, *worker_args, name=None):
    """brokerd + the Celery app module pointed at it (env vars set, restored after) + one
    ``celery worker`` started with ``worker_args``; a generator for module fixtures: yields the Env
    (its first worker as ``e.first``), then stops every process it started."""
    b = BrokerProcess(tmp / "data").start()
    e = Env(b, tmp / "marks", tmp)
    old = {k: os.environ.get(k) for k in ("CAPP_BROKER", "CAPP_MARKS")}
    os.environ.update(CAPP_BROKER=e.url, CAPP_MARKS=str(e.marks))
    import tests.celery_apps.capp as capp
    e.capp = importlib.reload(capp)
    try:
        e.first = e.worker(*worker_args, **({"name": name} if name else {}))
        yield e
    finally:
        for p in e.procs:
            e.stop(p)
        e.capp.app.close()
        b.terminate()
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    for e in celery_env(tmp_path_factory.mktemp("celery"), "-c", "2"):
        e.default_worker = e.first
        yield e


def test_tasks_retry_failures_and_canvas_give_celerys_results(env):
    from celery import chain, chord, group

    capp = env.capp
    assert capp.add.delay(2, 3).get(timeout=WAIT) == 5
    assert chain(capp.add.s(1, 2), capp.add.s(3)).apply_async().get(timeout=WAIT) == 6
    assert group(capp.add.s(i, i) for i in range(4)).apply_async().get(timeout=WAIT) == [0, 2, 4, 6]
    assert capp.flaky.delay(2).get(timeout=WAIT) == 2  # self.retry twice, then success
    with pytest.raises(ValueError, match="^bad input$"):
        capp.boom.delay("bad input").get(timeout=WAIT)
    r = chord([capp.add.s(i, 1) for i in range(3)], capp.tsum.s()).apply_async()
    assert r.get(timeout=WAIT) == 6
    assert env.lines("tsum") == ["[1, 2, 3]"]  # the body ran once, with the results in member order
    # no chord_unlock task ran: the barrier is brokerd's (Celery's fallback would log it as received)
    assert "celery.chord_unlock" not in Path(env.default_worker.log_path).read_text()


def test_a_generator_chord_header_with_a_chain_member_is_counted_by_brokerd(env):
    """A chord header given as a generator is published as it is read (Celery's test_generator), its
    members collected as they are published; a chain member's first task names no group, so it is
    counted by the chain's last task (the result the chord waits for).  Before, the chord was
    never declared and get() waited for ever."""
    from celery import chain, chord

    capp = env.capp

    def header():
        yield capp.add.s(1, 1)
        yield chain(capp.add.s(2, 2), capp.add.s(10))
        yield capp.add.s(3, 3)

    assert chord(header(), capp.tsum.s()).apply_async().get(timeout=WAIT) == 2 + 14 + 6
    assert env.lines("tsum")[-1] == "[2, 14, 6]"  # in the header's order
    assert "celery.chord_unlock" not in Path(env.default_worker.log_path).read_text()


def test_a_generator_chord_header_with_a_chord_member_is_counted_by_brokerd(env):
    """A member that is itself a chord is counted by its body (what Celery's result for it is)."""
    from celery import chord

    capp = env.capp

    def header():
        yield capp.add.s(1, 1)
        yield chord([capp.add.s(2, 2), capp.add.s(3, 3)], capp.tsum.s())
        yield capp.add.s(4, 4)

    assert chord(header(), capp.tsum.s()).apply_async().get(timeout=WAIT) == 2 + 10 + 8


def test_results_are_stored_natively_so_brokerds_own_views_show_them(env):
    capp = env.capp
    ok = capp.add.delay(20, 22)
    assert ok.get(timeout=WAIT) == 42
    bad = capp.boom.delay("no such user")
    with pytest.raises(ValueError):
        bad.get(timeout=WAIT)
    from client.producer import Client

    with Client(env.url) as c:
        assert c.get_result(ok.id)["result"] == 42
        failed = c.get_result(bad.id)
        assert failed["state"] == "FAILURE"
        assert failed["meta"]["exc_type"] == "ValueError" and failed["meta"]["exc_message"] == "no such user"
        assert "Traceback" in failed["meta"]["traceback"]
    again = capp.app.AsyncResult(ok.id)  # Celery's own meta comes back, result_extended fields too
    assert again.name == "tests.celery_apps.capp.add" and list(again.args) == [20, 22]
    assert again.date_done is not None
    ok.forget()
    assert capp.app.AsyncResult(ok.id).state == "PENDING"


def test_group_results_save_and_restore(env):
    from celery import group
    from celery.result import GroupResult

    capp = env.capp
    g = group(capp.add.s(i, 10) for i in range(3)).apply_async()
    g.save()
    again = GroupResult.restore(g.id, app=capp.app)
    assert [r.id for r in again.results] == [r.id for r in g.results]
    assert again.get(timeout=WAIT) == [10, 11, 12]


def test_priority_is_brokerds_priority_and_higher_is_more_urgent(env):
    capp = env.capp
    for p in (1, 9, 5):
        capp.add.apply_async((p, 0), priority=p, queue="parked-prio")
    peek = env.broker.admin("PEEK parked-prio 5\n")
    rows = [line.split() for line in peek.splitlines()[2:] if line != "END"]
    prios = [int(row[1]) for row in rows]  # ID PRIORITY ATTEMPTS ...
    assert prios == [9, 5, 1], peek


def test_an_eta_task_is_held_by_brokerd_not_by_the_worker(env):
    capp = env.capp
    r = capp.add.apply_async((1, 1), countdown=3600)
    from client.producer import Client

    with Client(env.url) as c:
        st = wait_for(lambda: (s := c.stats("celery")) and s.get("delayed") == 1 and s, "the eta task to be delayed in brokerd")
        # the worker never received it: a worker holding an eta task keeps it in flight, unacked
        assert st["ready"] == 0 and st["inflight"] == 0, st
        c.revoke(r.id)  # leave nothing behind for other tests


def test_celery_purge_empties_a_queue_in_brokerd(env):
    capp = env.capp
    for i in range(3):
        capp.add.apply_async((i, i), queue="parked-purge")
    p = env.run("purge", "-f", "-Q", "parked-purge", name="purge")
    assert p.wait(WAIT) == 0, Path(p.log_path).read_text()
    assert "Purged 3 messages" in Path(p.log_path).read_text()
    from client.producer import Client

    with Client(env.url) as c:
        assert c.stats("parked-purge")["ready"] == 0


def test_a_worker_killed_mid_task_redelivers_and_a_chord_body_still_runs_once(env):
    """kill -9 of the Celery worker with acks_late: brokerd takes its deliveries back, a second worker
    finishes them (redelivered=True), and a chord whose header was cut in the middle fires its body once."""
    from celery import chord

    capp = env.capp
    first = env.worker("-Q", "kill", "-c", "2", name="doomed")
    lone = capp.slow.apply_async(("k1", 2), queue="kill")
    c = chord([capp.slow.s("h1", 2).set(queue="kill"), capp.slow.s("h2", 0.1).set(queue="kill")],
              capp.collect.s().set(queue="kill")).apply_async()
    wait_for(lambda: env.lines("k1") and env.lines("h1"), "both long tasks to start on the first worker")
    os.kill(first.pid, signal.SIGKILL)
    first.wait(5)
    env.worker("-Q", "kill", "-c", "3", name="second")
    assert lone.get(timeout=WAIT) == {"name": "k1", "redelivered": True}
    results = c.get(timeout=WAIT)
    assert sorted(r["name"] for r in results) == ["h1", "h2"]
    assert len(env.lines("k1")) == 2  # ran twice: killed once, finished once
    assert len(env.lines("collect")) == 1


def test_celery_beat_runs_unchanged(env):
    beat = env.run("beat", "-s", str(env.logs / "beat-schedule"), "-l", "info", name="beat")
    try:
        wait_for(lambda: env.lines("order").count("beat") >= 2, "celery beat's entry to run twice")
    finally:
        env.stop(beat)


def test_a_chord_with_a_failed_member_fails_its_body_and_runs_the_errback_once(env):
    from celery import chord
    from celery.exceptions import ChordError

    capp = env.capp
    body = capp.tsum.s().on_error(capp.record.si("chord-errback"))
    bodies_before = env.lines("tsum")
    r = chord([capp.add.s(1, 1), capp.boom.s("member broke"), capp.boom.s("so did I")], body).apply_async()
    with pytest.raises(ValueError, match="member broke|so did I"):  # as Celery does: the header's error first
        r.get(timeout=WAIT)
    body_result = capp.app.AsyncResult(r.id)
    wait_for(lambda: body_result.state == "FAILURE", "the body to be failed")
    assert isinstance(body_result.result, ChordError)
    wait_for(lambda: "chord-errback" in env.lines("order"), "the body's errback to run")
    capp.add.delay(0, 0).get(timeout=WAIT)  # both failed members have been handled by now
    assert env.lines("order").count("chord-errback") == 1
    assert env.lines("tsum") == bodies_before  # the body never ran


def test_a_message_that_is_not_celerys_costs_only_itself(env):
    from client.producer import Client

    with Client(env.url) as c:
        c.publish("celery", b"\xff not a celery message", id="hostile-1")
        c.publish("celery", b"[]", id="hostile-2", headers={"kombu": {"content-type": "application/json",
                                                                      "headers": {"task": "no.such.task"}}})
    assert env.capp.add.delay(4, 4).get(timeout=WAIT) == 8
    assert env.default_worker.poll() is None


def test_revoke_is_brokerds_durable_revoke_and_the_worker_reconnects_after_a_broker_restart(env):
    """AsyncResult.revoke also sends brokerd's REVOKE: the task stays revoked across a broker restart;
    the Celery worker and the producer reconnect by themselves (kombu's recoverable errors)."""
    capp = env.capp
    r = capp.add.apply_async((5, 5), countdown=3600)
    r.revoke()
    from client.producer import Client

    with Client(env.url) as c:
        wait_for(lambda: c.get_result(r.id)["state"] == "REVOKED", "brokerd to record the revoke")
    env.broker.terminate()
    env.broker.restart()
    with Client(env.url) as c:
        assert c.get_result(r.id)["state"] == "REVOKED"
        assert "REVOKED" in c.admin(f"RESULT {r.id}")
    assert capp.app.AsyncResult(r.id).state == "REVOKED"
    assert capp.add.delay(6, 7).get(timeout=WAIT) == 13


def test_brokerd_fires_the_apps_beat_schedule_itself_with_one_task_id_per_firing(env):
    """client.celery.beat pushes beat_schedule into brokerd; no beat process runs, the worker gets each
    firing as an ordinary Celery task whose id is brokerd's '<entry>@<tick>'."""
    from client.celery import beat

    capp = env.capp
    before = env.lines("order").count("beat")
    from client.producer import Client

    with Client(env.url) as c:
        assert beat.sync(capp.app, c) == {"put": ["tick"], "removed": []}
        try:
            wait_for(lambda: env.lines("order").count("beat") >= before + 2, "brokerd's firings to run")
            (entry,) = c.schedule_list("celery:capp")
            assert entry["fired"] >= 2
            log_text = Path(env.default_worker.log_path).read_text()
            fired_id = re.search(r"capp\.record\[(tick@[\d.]+)\] succeeded", log_text).group(1)
            assert capp.app.AsyncResult(fired_id).get(timeout=WAIT) == "beat"
        finally:
            c.schedule_remove("tick")



def test_after_a_broker_restart_the_app_publishes_canvases_again_without_help(env):
    """A broker restart costs the caller nothing but a reconnect: kombu's producer pool keeps
    channels of the old connection, and every publish path (a plain task, a group with a chain
    member) must come back by kombu's own retry, not raise AttributeError or SHUTTING_DOWN."""
    from celery import chain, group

    capp = env.capp
    assert capp.add.delay(1, 1).get(timeout=WAIT) == 2  # the pool holds a producer of this connection
    env.broker.terminate()
    env.broker.restart()
    g = group(capp.add.s(1, 2), chain(capp.add.s(2, 2), capp.add.s(10)))
    assert g.apply_async().get(timeout=WAIT) == [3, 14]
    assert capp.add.delay(6, 7).get(timeout=WAIT) == 13
