"""EMIT_EVENTS (protocol.md §5.29) through the binary handler: a worker's plain events (text keys,
scalar values) are taken without being encoded first, and every other shape still goes through
the encoding check (the state hands those to it before anything changes) and the state's own
checks.  Pure: a BrokerState, no sockets."""

from __future__ import annotations

import pytest

from broker.handlers.binary import handle
from broker.state import BrokerState
from client import wire

W = 1


@pytest.fixture
def s():
    st = BrokerState()
    st.connect(W)
    return st


def received(tid, **extra):
    return {"type": "task-received", "uuid": tid, "ts": 5.0, "name": "bench.noop", "args": "()", "kwargs": "{}",
            "retries": 0, "eta": None, "ok": True, **extra}


def odd_ones(s, events) -> list:
    """What the state hands its encoding check for these events (a copy of the state is used)."""
    seen = []
    try:
        BrokerState().emit_events(W, "w@h", [dict(e) for e in events], 7.0, check=lambda odd: seen.extend(odd))
    except Exception:
        pass
    return seen


def test_a_workers_events_are_plain_and_taken(s):
    events = [received("t1"), {"type": "task-succeeded", "uuid": "t1", "ts": 6.0, "runtime": 1e-05, "result": "None"}]
    assert odd_ones(s, events) == []
    assert handle(s, W, [wire.OP_EMIT_EVENTS, 3, "w@h", events], 7.0) == [wire.OP_OK, 3, 2]
    assert [e["type"] for e in s.task_history["t1"]] == ["task-received", "task-succeeded"]


@pytest.mark.parametrize("event, taken", [
    (received("t1", loadavg=[0.5, 1.0]), True),  # a list value
    ({**received("t1"), 7: "x"}, True),  # a key that is not text
    (received("t1", blob=b"\x00"), False),  # a byte string: the state refuses it
])
def test_events_that_are_not_plain_go_the_long_way_with_the_same_answers(s, event, taken):
    assert len(odd_ones(s, [received("t0"), event])) == (1 if taken else 0)  # refused before the check
    reply = handle(s, W, [wire.OP_EMIT_EVENTS, 3, "w@h", [event]], 7.0)
    if taken:
        assert reply == [wire.OP_OK, 3, 1] and s.task_history["t1"] == [event]
    else:
        assert reply[0] == wire.OP_ERROR and reply[2] == "BAD_REQUEST" and "'blob'" in reply[3], reply
        assert "t1" not in s.task_history


def test_a_frame_whose_events_are_not_maps_is_refused(s):
    reply = handle(s, W, [wire.OP_EMIT_EVENTS, 3, "w@h", ["not a map"]], 7.0)
    assert reply[0] == wire.OP_ERROR and reply[2] == "BAD_REQUEST" and "an event is a map" in reply[3], reply


def test_a_map_value_is_still_refused_by_name_and_nothing_is_taken(s):
    reply = handle(s, W, [wire.OP_EMIT_EVENTS, 3, "w@h", [received("t1"), received("t2", nested={"a": 1})]], 7.0)
    assert reply[0] == wire.OP_ERROR and reply[2] == "BAD_REQUEST" and "'nested'" in reply[3], reply
    assert "t1" not in s.task_history and "t2" not in s.task_history


def test_a_refusal_by_the_check_leaves_everything_unchanged(s):
    from broker.errors import BadRequest
    from broker.state.events import MAX_EVENT_TEXT

    def refuse(odd):
        assert [e["uuid"] for e in odd] == ["t2"] and odd[0]["args"].endswith("…")  # cut first
        raise BadRequest("no")

    with pytest.raises(BadRequest):
        s.emit_events(W, "w@h", [received("t1"), received("t2", args="x" * (MAX_EVENT_TEXT + 5))], 7.0, check=refuse)
    assert "t1" not in s.task_history and not s.events
