"""A worker survives any message (and pool_grow is capped).

Real brokerd, real ``brokerd-worker`` processes (``tests/worker/test_worker.py``'s helpers).  Poison
envelopes are published raw (the SDK refuses to build them); every test then checks the worker
is the same process, still serving, and the poison task has a final result that names the fault.
"""

from __future__ import annotations

import math
import uuid

import cbor2
import pytest

from client.app import EncodeError, RemoteError, WorkerLostError, make_envelope
from tests.worker.test_worker import WAIT, fresh_queue, ready, shared_broker, workers  # noqa: F401 - fixtures
from tests.worker_apps import tasks

ADD = "tests.worker_apps.tasks.add"


def _env(**changes):
    """An ``add(1, 2)`` envelope with ``changes`` applied (``options`` merged in as given)."""
    tid = f"poison-{uuid.uuid4().hex}"
    env = make_envelope(ADD, tid, [1, 2], {})
    env.update(changes)
    return tid, env


# (field named in the error, envelope changes): each crashed the worker's main process or would
# raise later in it ("expires": "tomorrow" or a text time_limit once crashed every worker start).
POISON = [
    ("expires", {"expires": "tomorrow"}),
    ("expires", {"expires": 10**400}),
    ("eta", {"eta": "now"}),
    ("options.time_limit", {"options": {"time_limit": "10"}}),
    ("options.time_limit", {"options": {"time_limit": math.nan}}),
    ("options.soft_time_limit", {"options": {"soft_time_limit": -1}}),
    ("options", {"options": "fast"}),
    ("options.ignore_result", {"options": {"ignore_result": "yes"}}),
    ("options.shadow", {"options": {"shadow": ["a"]}}),
    ("options.app_id", {"options": {"app_id": {"name": "x"}}}),
    ("options.group_id", {"options": {"group_id": ["not", "text"]}}),
    ("options.argsrepr", {"options": {"argsrepr": {"secret": 1}}}),
    ("options.kwargsrepr", {"options": {"kwargsrepr": b"bytes"}}),
    ("options.rate_limit", {"options": {"rate_limit": "10/s"}}),
    ("retries", {"retries": "3"}),
    ("retries", {"retries": -1}),
    ("args", {"args": "not a list"}),
    ("kwargs", {"kwargs": ["not", "a", "map"]}),
    ("kwargs", {"kwargs": {1: 2}}),
    ("parent_id", {"parent_id": 5}),
    ("headers", {"headers": [1]}),
    ("link", {"link": "x"}),
]


@pytest.mark.parametrize("pool", ["processes", "threads", "trio"])
def test_poison_envelopes_fail_their_task_and_the_worker_lives_on(shared_broker, workers, pool):
    q = fresh_queue()
    w = workers(shared_broker, q, "--pool", pool, "-c", "2")
    ready(w, q)
    client = tasks.app.client
    sent = []
    for field, changes in POISON:
        tid, env = _env(**changes)
        client.publish(q, cbor2.dumps(env), id=tid)
        sent.append((field, tid))
    good = tasks.add.apply_async((20, 22), queue=q)
    assert good.get(timeout=WAIT) == 42
    for field, tid in sent:
        with pytest.raises(RemoteError) as info:
            tasks.app.AsyncResult(tid).get(timeout=WAIT)
        assert info.value.exc_type == "DecodeError"
        assert f"field {field!r}" in info.value.exc_message, (field, info.value.exc_message)
    assert w.proc.poll() is None, w.log()  # the same worker process: it never crashed
    assert tasks.app.client.stats(f"{q}.dlq")["ready"] == len(POISON)
    assert tasks.add.apply_async((1, 1), queue=q).get(timeout=WAIT) == 2
    assert w.terminate() == 0, w.log()


BAD_RESULTS = [
    (tasks.huge_int, r"\(int\) cannot be stored as a result: repr\(\) of it raised ValueError"),
    (tasks.unreprable, r"\(_NoRepr\) cannot be stored as a result: repr\(\) of it raised RuntimeError"),
    (tasks.cyclic, r"\(list\) cannot be stored as a result: cyclic data structure"),
]


@pytest.mark.parametrize("pool", ["processes", "threads", "trio"])
def test_results_that_cannot_be_stored_or_shown_are_a_failure_on_the_first_run(shared_broker, workers, pool):
    q = fresh_queue()
    w = workers(shared_broker, q, "--pool", pool, "-c", "1")
    before = tasks.pid.apply_async(queue=q).get(timeout=WAIT)
    for task, why in BAD_RESULTS:
        r = task.apply_async(queue=q)
        with pytest.raises(EncodeError, match=why):
            r.get(timeout=WAIT)
    with pytest.raises(tasks._Unprintable):  # re-raised as its own class (the caller imports its module)
        tasks.raises_unprintable.apply_async(queue=q).get(timeout=WAIT)
    assert tasks.pid.apply_async(queue=q).get(timeout=WAIT) == before  # the same pool process, alive
    assert tasks.app.client.stats(q)["ready"] == 0  # acked on the first run, not redelivered
    assert "while running" not in w.log()  # no pool process died
    assert w.terminate() == 0, w.log()


def test_a_task_whose_process_dies_backs_off_then_fails_with_worker_lost(shared_broker, workers, tmp_path):
    q = fresh_queue()
    w = workers(shared_broker, q, "-c", "1")
    stamps = tmp_path / "runs"
    r = tasks.aborts.apply_async((str(stamps),), queue=q)
    with pytest.raises(WorkerLostError, match=r"killed by SIGABRT .*died 3 times; max_retries is 2"):
        r.get(timeout=WAIT)
    runs = [float(x) for x in stamps.read_text().split()]
    assert len(runs) == 3  # the first run and max_retries (2) more
    gaps = [b - a for a, b in zip(runs, runs[1:])]
    assert gaps[0] >= 0.9 and gaps[1] >= 1.9, gaps  # backoff 1 s, then 2 s
    assert tasks.app.client.stats(f"{q}.dlq")["ready"] == 1  # dead-lettered, not left in the queue
    assert tasks.add.apply_async((3, 4), queue=q).get(timeout=WAIT) == 7
    assert w.proc.poll() is None


def test_a_task_acked_on_receipt_whose_process_dies_fails_at_once(shared_broker, workers, tmp_path):
    q = fresh_queue()
    workers(shared_broker, q, "-c", "1")
    stamps = tmp_path / "runs"
    r = tasks.aborts_acked_early.apply_async((str(stamps),), queue=q)
    with pytest.raises(WorkerLostError, match="acked on receipt"):
        r.get(timeout=WAIT)
    assert len(stamps.read_text().split()) == 1
    assert tasks.add.apply_async((3, 4), queue=q).get(timeout=WAIT) == 7


def _pool(w):
    return tasks.app.control.inspect(destination=[w.name], timeout=WAIT).stats()[w.name]["pool"]


def test_pool_grow_is_capped_at_the_concurrency_and_refuses_a_bad_n(shared_broker, workers):
    q = fresh_queue()
    w = workers(shared_broker, q, "-c", "2")
    ready(w, q)
    ctl = tasks.app.control

    def grow(n):
        return ctl.broadcast("pool_grow", {"n": n}, destination=[w.name], reply=True, timeout=WAIT)[0][w.name]

    reply = grow(20)
    assert reply["size"] == 2 and "unchanged at 2: already at its maximum" in reply["ok"]
    assert len(_pool(w)["processes"]) == 2  # not 22
    assert ctl.pool_shrink(1, destination=[w.name], reply=True, timeout=WAIT)[0][w.name]["size"] == 1
    reply = grow(20)
    assert reply == {"ok": "pool grown to 2 (capped at the worker's concurrency (-c) of 2; 20 more were asked for)",
                     "size": 2}
    for bad in (0, -3, "20", 2.5, None):
        reply = grow(bad)
        assert "pool_grow needs n, a whole number of pool slots >= 1" in reply["error"], (bad, reply)
    assert _pool(w)["size"] == 2
    assert tasks.add.apply_async((2, 2), queue=q).get(timeout=WAIT) == 4


def test_pool_grow_with_autoscale_stops_at_the_autoscale_maximum(shared_broker, workers):
    q = fresh_queue()
    w = workers(shared_broker, q, "--autoscale", "3,1")
    ready(w, q)
    reply = tasks.app.control.pool_grow(20, destination=[w.name], reply=True, timeout=WAIT)[0][w.name]
    assert reply["size"] == 3 and "capped at the autoscale maximum of 3" in reply["ok"]
    assert len(_pool(w)["processes"]) <= 3
    assert tasks.add.apply_async((2, 2), queue=q).get(timeout=WAIT) == 4
