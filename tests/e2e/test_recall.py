"""Adaptive prefetch and RECALL end to end (protocol.md §5.42-5.44): a real brokerd, real
``brokerd-worker`` processes with their defaults (no --prefetch-multiplier), real TCP.

The case Celery users know: a worker holds tasks it prefetched while one long task runs, and
another worker sits idle.  Here the credit first grows on fast tasks (so each worker holds many),
then one long task and many 10 ms tasks arrive: the worker running the long one must give back
what it has not started, and no 10 ms task may wait for the long one to end.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

from client import Client
from tests.e2e import recall_app
from tests.support.broker import ROOT, broker_for_app

APP = "tests.e2e.recall_app:app"
WAIT = 30.0  # seconds a batch of results may take on a loaded 2-core CI box
LONG = 5.0  # seconds: the "30-second task", shortened for CI
SHORTS = 200


@pytest.fixture(scope="module")
def broker(tmp_path_factory):
    yield from broker_for_app(tmp_path_factory.mktemp("recall-broker"), recall_app.app)


@pytest.fixture
def workers(tmp_path):
    started = []

    def start(broker, queue, *args):
        log = open(tmp_path / f"w{len(started)}.log", "w")
        cmd = [sys.executable, "-m", "client.worker_cli", APP, "-b", broker.address, "-Q", queue,
               "-n", f"w{len(started)}-{queue}@test", "-l", "warning", *args]
        p = subprocess.Popen(cmd, cwd=ROOT, env=dict(os.environ, PYTHONPATH=str(ROOT)), stdin=subprocess.DEVNULL,
                             stdout=log, stderr=subprocess.STDOUT)
        started.append((p, log))
        return p

    yield start
    for p, log in started:
        if p.poll() is None:
            p.send_signal(signal.SIGTERM)
            try:
                p.wait(15)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait(5)
        log.close()


def consumers_of(broker, queue):
    """CONSUMERS rows of ``queue``: [(prefetch, unacked)]."""
    rows = []
    for line in broker.admin("CONSUMERS\n").splitlines():
        f = line.split()  # a client name may hold spaces: read the last three columns from the end
        if len(f) >= 6 and f[0].isdigit() and queue in f[-3].split(","):
            rows.append((int(f[-2]), int(f[-1])))
    return rows


def wait_for(pred, timeout, what):
    deadline = time.monotonic() + timeout
    while not pred():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)  # polling the admin port: no event to await from outside the broker


def run_all(results):
    return [r.get(timeout=WAIT) for r in results]


def grow_credit(broker, queue, at_least):
    """Run no-op tasks until every worker's adaptive credit is ``at_least``.  The credit follows
    the last ~5 run times (client/worker/credit.py), so a few tasks slowed by a busy box at the end
    of a batch leave it lower until more tasks run: feed more rather than wait for nothing."""
    deadline = time.monotonic() + 3 * WAIT
    run_all([recall_app.noop.apply_async(queue=queue) for _ in range(1500)])
    while not all(p >= at_least for p, _ in consumers_of(broker, queue)):
        assert time.monotonic() < deadline, f"the credit did not grow on fast tasks: {consumers_of(broker, queue)}"
        run_all([recall_app.noop.apply_async(queue=queue) for _ in range(300)])


def test_no_short_task_waits_for_the_long_one_while_a_worker_is_idle(broker, workers):
    q = "recall-mix"
    app = recall_app.app
    for _ in range(2):
        workers(broker, q, "-c", "1")  # one slot each, so a held task can only wait or move
    wait_for(lambda: len(consumers_of(broker, q)) == 2, WAIT, "two workers consuming")
    # Fast tasks first: the adaptive credit grows past the one slot (no multiplier given).
    grow_credit(broker, q, 8)
    # Then the mix: the long task first, so a worker takes it and holds short ones behind it.
    long = recall_app.long.apply_async((LONG,), queue=q)
    # While the long task runs, the worker running it lowers its credit to its one slot (its run
    # counts before it ends: client/worker/credit.py), so brokerd sends it nothing to wait behind it.
    wait_for(lambda: (1, 1) in consumers_of(broker, q), LONG - 1, "the long task's worker to hold only its slot")
    shorts = [recall_app.short.apply_async(queue=q) for _ in range(SHORTS)]
    starts = run_all(shorts)
    t0, t1 = long.get(timeout=WAIT + LONG)
    late = [s for s in starts if s >= t1]
    assert not late, f"{len(late)} of {SHORTS} short tasks started after the long one ended (held behind it)"
    # Nor was any handed to the long task's worker to wait there for a RECALL: each would carry the
    # worker's "handed back unstarted (recalled ...)" event (client/worker/runtime.py _on_recall),
    # sent long before the last short's result.  (The other worker may give back some itself when
    # its first 10 ms task counts as long after the no-op ones: that is not this.)
    recalled = [w for w in reasons(broker, shorts) if "recalled" in w]
    assert not recalled, f"{len(recalled)} of {SHORTS} short tasks were handed to the worker running the long one"


def reasons(broker, results):
    """The "handed back unstarted (...)" reasons in these tasks' events, one per hand-back."""
    with Client(broker.address) as c:
        return [str(e.get("reason")) for r in results for e in (c.task_info(r.id) or {}).get("events", ())
                if "handed back" in str(e.get("reason"))]


def test_a_worker_whose_slot_turns_busy_for_long_gives_back_at_once_what_waits_behind_it(broker, workers):
    """Both workers' grown credit is filled at once (a paused queue resumed) and one of them starts a
    long task with many shorts behind it: it gives them back as soon as the task counts as long (its
    credit drops), not one at a time by RECALLs each time the other worker runs dry."""
    q = "recall-burst"
    for _ in range(2):
        workers(broker, q, "-c", "1")
    wait_for(lambda: len(consumers_of(broker, q)) == 2, WAIT, "two workers consuming")
    grow_credit(broker, q, 16)
    with Client(broker.address) as c:
        c.pause(q)
        long = recall_app.long.apply_async((LONG,), queue=q)  # first out: to a free slot
        shorts = [recall_app.short.apply_async(queue=q) for _ in range(SHORTS)]
        c.resume(q)  # one dispatch: each worker's credit takes its share, the long one's behind it
    starts = run_all(shorts)
    t0, t1 = long.get(timeout=WAIT + LONG)
    assert not [s for s in starts if s >= t1], "a short task waited for the long one to end"
    why = reasons(broker, shorts)
    # given back by that worker itself, not only one at a time by RECALLs as the other one ran dry
    assert sum("busy with a long task" in w for w in why) >= 10, why


def test_a_worker_with_a_fixed_multiplier_and_a_plain_consumer_that_ignores_recall_keep_working(broker, workers):
    """A version-1 consumer (no slots) holds tasks beside an idle worker: it is never sent RECALL,
    keeps what it holds, and the worker (fixed credit, as before) does all the rest."""
    q = "recall-v1"
    workers(broker, q, "-c", "1", "--prefetch-multiplier", "4")  # today's fixed credit, kept
    wait_for(lambda: len(consumers_of(broker, q)) == 1, WAIT, "the worker consuming")
    assert consumers_of(broker, q) == [(4, 0)]
    with Client(broker.address) as c:
        controls = []
        c.control_handlers.append(controls.append)
        cons = c.consume([q], prefetch=5)  # a version-1 client: no slots
        results = [recall_app.short.apply_async(queue=q) for _ in range(30)]
        held = [cons.get(timeout=WAIT) for _ in range(5)]
        cons.cancel()  # what else it received goes back; the 5 stay in flight, held
        ids = {d.id for d in held}
        done = [r.get(timeout=WAIT) for r in results if r.id not in ids]
        assert len(done) == 25 and len(ids) == 5
        assert [p for p in controls if "recall" in p] == []
        for d in held:
            d.ack(wait=True)  # still ours: nothing took them back
    assert consumers_of(broker, q) == [(4, 0)]
