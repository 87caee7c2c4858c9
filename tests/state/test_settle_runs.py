"""A run of RESULT_SETs read together (hold_settles / release_settles, what a connection does for
a worker's results): each consumer is refilled once after the run, with the messages it would have
got one result at a time, in one DELIVER record; a consumer left idle still asks for a RECALL.
Pure: a BrokerState."""

from __future__ import annotations

from broker.state import BrokerState
from broker.state import log_records as R
from client import wire

W, V = 1, 2


def deliveries(s, conn):
    return [f for f in s.take_outbox().get(conn, ()) if f[0] == wire.OP_DELIVER]


def setup(prefetch=2, n=6):
    s = BrokerState()
    s.connect(W)
    s.enable_log()
    s.consume(W, ["q"], prefetch, 0.0, {"slots": prefetch})
    for i in range(n):
        s.publish(W, "q", b"x", f"m{i}", 0, 0.0)
    got = deliveries(s, W)
    s.take_records()
    return s, got


def test_a_run_of_results_refills_once_after_it_with_the_same_messages_in_one_record():
    s, got = setup()
    assert [f[4] for f in got] == ["m0", "m1"]
    s.hold_settles()
    for f in got:
        assert s.result_set(W, f[4], "SUCCESS", None, None, 1.0, tag=f[2]) == {"acked": True}
    assert deliveries(s, W) == []  # nothing refilled inside the run
    s.release_settles(1.0)
    assert [f[4] for f in deliveries(s, W)] == ["m2", "m3"]  # what one result at a time would give
    records = s.take_records()
    assert [t for t, _ in records] == [R.RESULT, R.RESULT, R.DELIVER]
    assert type(records[-1][1]) is list and len(records[-1][1]) == 2  # both seqs in one DELIVER


def test_without_a_run_each_result_refills_at_once():
    s, got = setup()
    s.result_set(W, got[0][4], "SUCCESS", None, None, 1.0, tag=got[0][2])
    assert [f[4] for f in deliveries(s, W)] == ["m2"]
    assert [t for t, _ in s.take_records()] == [R.RESULT, R.DELIVER]


def test_a_consumer_left_idle_after_the_run_asks_the_busy_one_to_give_back():
    s = BrokerState()
    s.connect(W)
    s.connect(V)
    s.consume(V, ["q"], 4, 0.0, {"slots": 1})  # holds 4, runs 1: a surplus a RECALL can take back
    s.consume(W, ["q"], 1, 0.0, {"slots": 1})
    for i in range(5):
        s.publish(W, "q", b"x", f"m{i}", 0, 0.0)
    mine = deliveries(s, W)
    assert len(mine) == 1
    s.take_outbox()
    s.hold_settles()
    s.result_set(W, mine[0][4], "SUCCESS", None, None, 5.0, tag=mine[0][2])
    assert s.take_outbox().get(V) is None  # no RECALL inside the run
    s.release_settles(5.0)
    out = s.take_outbox()
    assert [f[0] for f in out.get(V, ())] == [wire.OP_RECALL]


def test_a_consumer_cancelled_in_the_run_is_not_refilled():
    s, got = setup()
    ctag = next(iter(s.conns[W].consumers))
    s.hold_settles()
    s.result_set(W, got[0][4], "SUCCESS", None, None, 1.0, tag=got[0][2])
    s.cancel(W, ctag)
    s.release_settles(1.0)
    assert deliveries(s, W) == [] and s.queues["q"].inflight_count == 1  # only m1, still held
