"""Flow control end to end (issue 15): a real brokerd, the SDK, real consumers and a real worker.

Rate limits are global (all consumers together), never delay other tasks, change live and survive a
restart; a concurrency cap holds across a worker's slots; tenants take turns.  Counts over generous
windows, no speed asserts."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
import uuid

import pytest

from client import Client
from client.errors import BrokerdError
from tests.support.broker import ROOT, broker_for_app
from tests.support.wireclient import Raw
from tests.worker_apps import flow_tasks as ft
from client import wire

WAIT = 20.0  # seconds any single wait may take on a loaded box


@pytest.fixture(scope="module")
def b(tmp_path_factory):
    yield from broker_for_app(tmp_path_factory.mktemp("flow-broker"), ft.app)


def fresh() -> str:
    return f"flow.{uuid.uuid4().hex[:8]}"


def collect(address, queue, consumers, seconds, stop_after=None):
    """``consumers`` connections consume ``queue`` (prefetch 10), ack at once; [(monotonic, body)]
    of every delivery in ``seconds`` from the first one."""
    got: list = []
    lock = threading.Lock()
    first = threading.Event()
    t_first = [None]
    done = threading.Event()

    def run():
        with Client(address, name="flow-test") as c:
            cons = c.consume([queue], prefetch=10)
            while not done.is_set():
                d = cons.get(timeout=0.05)
                if d is None:
                    continue
                t = time.monotonic()
                with lock:
                    if t_first[0] is None:
                        t_first[0] = t
                        first.set()
                    got.append((t, d.body, d.headers))
                d.ack()
            cons.cancel()

    threads = [threading.Thread(target=run) for _ in range(consumers)]
    for t in threads:
        t.start()
    try:
        assert first.wait(WAIT), "nothing was delivered"
        time.sleep(seconds)  # the measuring window itself, not a synchronisation
    finally:
        done.set()
        for t in threads:
            t.join(WAIT)
    with lock:
        return [g for g in got if g[0] < t_first[0] + seconds], t_first[0]


def test_rate_limit_10_per_second_holds_across_four_consumers(b):
    q = fresh()
    with Client(b.address) as c:
        for i in range(100):
            ft.limited.apply_async((i,), queue=q)
        got, _ = collect(b.address, q, 4, 3.0)
        # burst 1: one at once, then one per 0.1 s, whichever consumer asks: 31 in 3 s, give or take jitter
        assert 25 <= len(got) <= 35, len(got)
        stats = c.stats(q)
        assert stats["waiting"] + stats["ready"] + stats["inflight"] + stats["acked"] == 100  # held, not dropped


def test_an_unlimited_task_is_not_delayed_behind_a_limited_one(b):
    q, slow = fresh(), f"proj.slow.{uuid.uuid4().hex[:6]}"
    with Client(b.address) as c:
        for i in range(20):  # a raw publish names its task and rate in headers (protocol.md §5.2.1)
            c.publish(q, b"slow", headers={"x-task": slow, "x-rate-limit": "1/m"})
        for i in range(5):
            ft.free.apply_async((i,), queue=q)
        cons = c.consume([q], prefetch=1)
        names = []
        deadline = time.monotonic() + WAIT
        while len(names) < 6 and time.monotonic() < deadline:
            d = cons.get(timeout=1.0)
            if d is not None:
                names.append(d.headers["x-task"])
                d.ack()
        assert names == [slow] + [ft.free.name] * 5
        assert c.stats(q)["waiting"] == 19


def test_a_limit_changed_live_takes_effect_within_a_second(b):
    q, task = fresh(), f"proj.sms.{uuid.uuid4().hex[:6]}"
    with Client(b.address) as c:
        for i in range(50):
            c.publish(q, b"sms", headers={"x-task": task, "x-rate-limit": "1/h"})
        cons = c.consume([q], prefetch=50)
        assert cons.get(timeout=WAIT) is not None  # the one token an idle bucket holds
        assert cons.get(timeout=0.5) is None  # 1/h: nothing more
        ft.app.control.rate_limit(task, "20/s")  # Celery's call
        t0 = time.monotonic()
        d = cons.get(timeout=WAIT)
        assert d is not None and time.monotonic() - t0 < 1.0


def test_limits_survive_a_restart(tmp_path):
    from tests.support.broker import BrokerProcess

    br = BrokerProcess(tmp_path / "data").start()
    try:
        with Client(br.address) as c:
            c.declare("paced", rate_limit="5/s")
            c.rate_limit("proj.tasks.send_sms", "7/m")
        br.terminate()
        br.restart()
        rates = br.admin("RATES\n")
        assert "proj.tasks.send_sms" in rates and "7/m" in rates and "live" in rates, rates
        assert "paced" in rates and "5/s" in rates, rates
        with Client(br.address) as c:
            assert c.rate_limit("proj.tasks.send_sms", "8/m")["previous"] == "7/m"
    finally:
        br.terminate()


def test_rate_limit_needs_the_control_grant_and_refuses_a_bad_rate(tmp_path):
    from client.userfile import hash_token, new_token, user_entry
    from tests.support.broker import BrokerProcess

    tok_w, tok_a = new_token(), new_token()
    users = tmp_path / "users.toml"
    users.write_text(user_entry("web", hash_token(tok_w), {"publish": ["*"], "consume": ["*"]})
                     + user_entry("ops", hash_token(tok_a), {"control": ["*"]}))
    br = BrokerProcess(tmp_path / "data", "--users-file", str(users)).start()
    try:
        with Client(f"brokerd://web:{tok_w}@{br.address}") as c:
            with pytest.raises(BrokerdError) as e:
                c.rate_limit("t", "5/s")
            assert e.value.code == "ACCESS_REFUSED" and "control" in e.value.message
        with Client(f"brokerd://ops:{tok_a}@{br.address}") as c:
            for bad, words in [("fast", "not a rate"), ("1e9/s", "above"), (float("nan"), "finite")]:
                with pytest.raises(BrokerdError) as e:
                    c.rate_limit("t", bad)
                assert e.value.code == "BAD_REQUEST" and words in e.value.message, e.value.message
            with pytest.raises(BrokerdError) as e:
                c.rate_limit("nosuch", "5/s", queue=True)
            assert e.value.code == "NOT_FOUND"
            assert c.rate_limit("t", "5/s")["limit"] == "5/s"  # the connection is still good
    finally:
        br.terminate()


def test_hostile_flow_values_cost_only_their_own_request(b):
    r = Raw(b.port)
    try:
        for headers in ({"x-tenant": 7}, {"x-tenant-weight": 10**6, "x-tenant": "a"}, {"x-rate-limit": "9/s"},
                        {"x-task": "t", "x-max-concurrency": 0}, {"x-tenant": "é" * 300}):
            f = r.call(wire.OP_PUBLISH, "hostile", b"x", None, 0, {"headers": headers})
            assert f[0] == wire.OP_ERROR and f[2] == "BAD_REQUEST", f
        for frame in (["t", [1]], ["t", "5/s", "worker"], [{"a": 1}, "5/s"]):
            f = r.call(wire.OP_RATE_LIMIT, *frame)
            assert f[0] == wire.OP_ERROR and f[2] == "BAD_REQUEST", f
        assert r.call(wire.OP_PING)[0] == wire.OP_OK
    finally:
        r.close()


def test_a_concurrency_cap_of_3_holds_with_8_worker_slots(b, tmp_path):
    q = fresh()
    env = dict(os.environ, PYTHONPATH=str(ROOT), PYTHONUNBUFFERED="1")
    log = open(tmp_path / "worker.log", "w")
    w = subprocess.Popen([sys.executable, "-m", "client.worker_cli", "tests.worker_apps.flow_tasks:app",
                          "-b", b.address, "-Q", q, "-P", "threads", "-c", "8", "-n", "capped@test"],
                         cwd=ROOT, env=env, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT)
    try:
        results = [ft.capped.apply_async((0.3,), queue=q) for _ in range(12)]
        spans = [r.get(timeout=WAIT) for r in results]
        events = sorted([(s, 1) for s, _ in spans] + [(e, -1) for _, e in spans])
        running = peak = 0
        for _, step in events:
            running += step
            peak = max(peak, running)
        assert peak == 3, spans  # never more than 3 (and the cap, not the pool, was the bound)
    finally:
        w.send_signal(signal.SIGTERM)
        try:
            w.wait(15)
        except subprocess.TimeoutExpired:
            w.kill()
            w.wait(5)
        log.close()


def test_tenants_take_turns_through_the_sdk(b):
    q = fresh()
    with Client(b.address) as c:
        for i in range(300):
            ft.free.apply_async((i,), queue=q, tenant="big")
        for i in range(10):
            ft.free.apply_async((i,), queue=q, tenant="small")
        assert "small" in b.admin(f"TENANTS {q}\n")
        cons = c.consume([q], prefetch=20)
        tenants = []
        while len(tenants) < 20:
            d = cons.get(timeout=WAIT)
            assert d is not None
            tenants.append(d.headers["x-tenant"])
            d.ack()
        assert tenants.count("small") == 10
