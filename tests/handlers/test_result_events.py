"""RESULT_SET's ``events`` option (protocol.md §5.19): a worker folds a successful task's events into
its result, and brokerd makes the task-started and task-succeeded maps itself.  What it keeps (ring,
task history, subscribers' feed, worker registry untouched) must be exactly what the same events sent
in an EMIT_EVENTS give; a bad option is refused by name before anything is stored or acked.  Pure: a
BrokerState, no sockets."""

from __future__ import annotations

import copy

import pytest

from broker.handlers.binary import handle
from broker.state import BrokerState
from client import wire

W = 1
HOST = "w1@host"


def state():
    st = BrokerState()
    st.connect(W)
    st.consume(W, ["q"], 10, 0.0)
    return st


def delivered_tag(s, msg_id):
    s.publish(W, "q", b"x", msg_id, 0, 0.0)
    return next(f[2] for f in s.take_outbox()[W] if f[0] == wire.OP_DELIVER and f[4] == msg_id)


def received(tid):
    return {"type": "task-received", "uuid": tid, "ts": 5.0, "name": "bench.noop", "args": "()", "kwargs": "{}",
            "queue": "q", "retries": 0}


def unfolded(tid, rec, started, pid, ts, runtime, result):
    """The events the worker sends in EMIT_EVENTS when it does not fold (client/worker/events.py)."""
    out = [copy.deepcopy(rec)] if rec is not None else []
    if started is not None:
        out.append({"type": "task-started", "uuid": tid, "ts": started, "pid": pid})
    out.append({"type": "task-succeeded", "uuid": tid, "ts": ts, "runtime": runtime, "result": result})
    return out


@pytest.mark.parametrize("spec_tail", [
    (5.5, 4242, 6.0, 2.5e-05, "None"),  # received, started and succeeded all folded
    (None, None, 6.0, None, "'x' * 5000"),  # started sent already (a long task); no runtime known
])
@pytest.mark.parametrize("with_received", [True, False])
@pytest.mark.parametrize("opts", [{"ttl": 3600}, {}])  # the worker's shape (tag and ttl), and a tag alone
def test_folded_events_are_kept_exactly_as_the_same_events_in_emit_events(spec_tail, with_received, opts):
    tid = "t1"
    rec = received(tid) if with_received else None
    folded, plain = state(), state()
    for s in (folded, plain):
        s.subscribe(W, True, 0, 1.0)
        s.take_outbox()
    tag = delivered_tag(folded, tid)
    spec = [HOST, copy.deepcopy(rec), *spec_tail]
    reply = handle(folded, W, [wire.OP_RESULT_SET, 3, tid, "SUCCESS", None, None, {**opts, "tag": tag, "events": spec}], 7.0)
    assert reply == [wire.OP_OK, 3, {"acked": True}]
    assert folded.results[tid].state == "SUCCESS" and folded.queues["q"].acked == 1

    tag = delivered_tag(plain, tid)
    assert handle(plain, W, [wire.OP_RESULT_SET, 3, tid, "SUCCESS", None, None, {**opts, "tag": tag}], 7.0)[0] == wire.OP_OK
    evs = unfolded(tid, rec, *spec_tail)
    assert handle(plain, W, [wire.OP_EMIT_EVENTS, 4, HOST, evs], 7.0) == [wire.OP_OK, 4, len(evs)]

    assert folded.task_history[tid] == plain.task_history[tid]
    assert list(folded.events) == list(plain.events)
    assert [list(e.keys()) for e in folded.task_history[tid]] == [list(e.keys()) for e in plain.task_history[tid]]
    assert folded.task_info(tid, 8.0) == plain.task_info(tid, 8.0)
    assert folded._pending_events == plain._pending_events  # what subscribers are sent next
    assert folded.task_graphs.series(8.0) == plain.task_graphs.series(8.0)  # the page's graphs count it alike


def test_the_events_come_after_those_emitted_before_and_in_order():
    s = state()
    tag = delivered_tag(s, "t1")
    handle(s, W, [wire.OP_EMIT_EVENTS, 2, HOST, [received("t1")]], 6.0)
    spec = [HOST, None, 5.5, 7, 6.5, 0.5, "3"]
    handle(s, W, [wire.OP_RESULT_SET, 3, "t1", "SUCCESS", 3, None, {"tag": tag, "events": spec}], 7.0)
    assert [e["type"] for e in s.task_history["t1"]] == ["task-received", "task-started", "task-succeeded"]
    info = s.task_info("t1", 8.0)
    assert info["state"] == "SUCCESS" and info["worker"] == HOST and info["name"] == "bench.noop"
    assert info["started"] == 5.5 and info["runtime"] == 0.5 and s.task_history["t1"][-1]["result"] == "3"


GOOD = [HOST, None, 5.5, 7, 6.5, 0.5, "None"]


@pytest.mark.parametrize("spec, match", [
    ({"hostname": HOST}, "option 'events' must be [hostname"),
    (GOOD[:6], "option 'events' must be [hostname"),
    (GOOD + [1], "option 'events' must be [hostname"),
    (["", *GOOD[1:]], "hostname must be text of 1 to 255"),
    ([7, *GOOD[1:]], "hostname must be text of 1 to 255"),
    ([HOST, {"type": "task-started", "uuid": "t1"}, *GOOD[2:]], "'received' must be the task's task-received"),
    ([HOST, received("t2"), *GOOD[2:]], "'received' must be the task's task-received"),
    ([HOST, "task-received", *GOOD[2:]], "'received' must be the task's task-received"),
    ([HOST, {**received("t1"), "blob": {"a": 1}}, *GOOD[2:]], "event value 'blob'"),
    ([*GOOD[:2], "5.5", *GOOD[3:]], "'started' must be a number"),
    ([*GOOD[:3], 7.5, *GOOD[4:]], "'pid' a whole number"),
    ([*GOOD[:4], None, *GOOD[5:]], "'ts' (when it succeeded) must be a number"),
    ([*GOOD[:5], "0.5", GOOD[6]], "'runtime' must be a number"),
    ([*GOOD[:6], None], "'result' must be text"),
])
@pytest.mark.parametrize("opts", [{"ttl": 60}, {}])
def test_a_bad_events_option_is_refused_by_name_and_stores_acks_and_emits_nothing(spec, match, opts):
    s = state()
    tag = delivered_tag(s, "t1")
    reply = handle(s, W, [wire.OP_RESULT_SET, 5, "t1", "SUCCESS", None, None, {**opts, "tag": tag, "events": spec}], 1.0)
    assert reply[0] == wire.OP_ERROR and reply[2] == "BAD_REQUEST" and match in reply[3], reply
    assert "t1" not in s.results and s.queues["q"].acked == 0 and "t1" not in s.task_history and not s.events


@pytest.mark.parametrize("st", ["FAILURE", "RETRY", "STARTED", "PROGRESS"])
def test_events_go_with_a_success_only(st):
    s = state()
    reply = handle(s, W, [wire.OP_RESULT_SET, 5, "t1", st, None, None, {"events": GOOD}], 1.0)
    assert reply[0] == wire.OP_ERROR and reply[2] == "BAD_REQUEST" and "goes with a SUCCESS only" in reply[3], reply
    assert "t1" not in s.results and not s.events


def test_a_result_the_state_refuses_takes_none_of_its_events():
    s = state()
    reply = handle(s, W, [wire.OP_RESULT_SET, 5, "x" * 300, "SUCCESS", None, None, {"events": GOOD}], 1.0)
    assert reply[0] == wire.OP_ERROR and reply[2] == "BAD_REQUEST", reply
    assert not s.events and not s.task_history


def test_without_a_tag_the_long_way_takes_them_too():
    s = state()
    reply = handle(s, W, [wire.OP_RESULT_SET, 5, "t1", "SUCCESS", {"a": [1]}, {"k": 1}, {"events": GOOD}], 1.0)
    assert reply == [wire.OP_OK, 5, {"acked": False}]
    assert [e["type"] for e in s.task_history["t1"]] == ["task-started", "task-succeeded"]


def test_the_hello_reply_lists_the_feature_and_a_client_reads_it():
    hs = wire.ServerHandshake(connection=3, heartbeat=30.0)
    hello = wire.Hello(version=2, client="w", heartbeat=30.0, extra={}, rid=1)
    reply = hs.welcome_map(hello)
    assert "result_events" in reply["features"]
    assert "result_events" in wire.Welcome.from_result(reply).info["features"]
