"""CREDIT, RELEASE and CONSUME's slots (protocol.md §5.3, §5.42-5.44) through the binary handler,
on a plain BrokerState: what each does, and what a hostile value costs (its own request only)."""

import pytest

from broker.handlers.binary import handle
from broker.state import BrokerState
from client import wire


def frames(s, conn, op=None):
    box = s.take_outbox().get(conn, [])
    return [f for f in box if op is None or f[0] == op]


@pytest.fixture
def s():
    s = BrokerState()
    s.connect(1)
    s.connect(2)
    for i in range(6):
        s.publish(0, "q", b"x", f"m{i}", 0, 0.0)
    return s


def test_credit_raises_and_lowers_a_live_consumers_prefetch(s):
    assert handle(s, 1, [wire.OP_CONSUME, 1, ["q"], 1], 0.0) == [wire.OP_OK, 1, 1]
    assert len(frames(s, 1, wire.OP_DELIVER)) == 1
    assert handle(s, 1, [wire.OP_CREDIT, 2, 1, 4], 0.0) == [wire.OP_OK, 2, 4]
    assert len(frames(s, 1, wire.OP_DELIVER)) == 3  # filled at once up to the new credit
    assert handle(s, 1, [wire.OP_CREDIT, 3, 1, 2], 0.0) == [wire.OP_OK, 3, 2]
    tag = s.conns[1].deliveries
    s.ack(1, sorted(tag)[:2], 0.0)
    assert frames(s, 1, wire.OP_DELIVER) == []  # holds 2 of a lowered prefetch of 2: nothing more
    s.check_invariants()


def test_release_gives_deliveries_back_without_counting_an_attempt(s):
    s.declare("q", {"max_attempts": 1}, 0.0)
    handle(s, 1, [wire.OP_CONSUME, 1, ["q"], 2, {"slots": 1}], 0.0)
    tags = [f[2] for f in frames(s, 1, wire.OP_DELIVER)]
    assert handle(s, 1, [wire.OP_RELEASE, 2, tags], 0.0) == [wire.OP_OK, 2, 2]
    again = frames(s, 1, wire.OP_DELIVER)  # back to the only consumer, attempts still 1
    assert [(f[4], f[7]) for f in again] == [("m0", 1), ("m1", 1)]
    assert s.queues["q"].dead_lettered == 0 and s.queues["q"].released == 2
    # STATS, the admin QUEUE line and /metrics read it from the queue's statistics
    st = s.queue_statistics(s.queues["q"], 0.0)
    assert (st.released, st.recalled) == (2, 0)


def test_an_idle_consumer_with_slots_makes_the_holder_get_a_recall(s):
    handle(s, 1, [wire.OP_CONSUME, 1, ["q"], 6, {"slots": 1}], 0.0)
    assert len(frames(s, 1, wire.OP_DELIVER)) == 6
    handle(s, 2, [wire.OP_CONSUME, 2, ["q"], 6, {"slots": 2}], 0.0)
    assert frames(s, 1, wire.OP_RECALL) == [[wire.OP_RECALL, 1, 2, "q"]]  # min(6 - 1 held beyond, 2 free)
    assert s.queue_statistics(s.queues["q"], 0.0).recalled == 2  # deliveries asked back, in STATS


def test_a_consumer_without_slots_is_never_recalled(s):
    handle(s, 1, [wire.OP_CONSUME, 1, ["q"], 6], 0.0)  # a version-1 client
    handle(s, 2, [wire.OP_CONSUME, 2, ["q"], 6, {"slots": 2}], 0.0)
    for t in (0.0, 1.0, 2.0):
        s.tick(t)
    assert frames(s, 1, wire.OP_RECALL) == []


@pytest.mark.parametrize("frame, words", [
    ([wire.OP_CREDIT, 9, 1, 0], "prefetch must be a whole number from 1 to 65535 (got 0)"),
    ([wire.OP_CREDIT, 9, 1, 70000], "prefetch must be a whole number from 1 to 65535 (got 70000)"),
    ([wire.OP_CREDIT, 9, 1, "64"], "CREDIT field 3 (prefetch) must be int (got str)"),
    ([wire.OP_CREDIT, 9, 77, 4], "no consumer 77 on this connection"),
    ([wire.OP_CREDIT, 9], "CREDIT needs consumer (field 2)"),
    ([wire.OP_RELEASE, 9, [1, "x"]], "a delivery tag is a whole number (got 'x')"),
    ([wire.OP_RELEASE, 9, [12345]], "deliveries [12345] are not in flight on this connection"),
    ([wire.OP_CONSUME, 9, ["q"], 2, {"slots": 0}], "CONSUME option 'slots' must be a whole number from 1 to 65535 (got 0)"),
    ([wire.OP_CONSUME, 9, ["q"], 2, {"slots": True}], "CONSUME option 'slots' must be a whole number"),
    ([wire.OP_CONSUME, 9, ["q"], 2, {"speed": 1}], "CONSUME option 'speed' is not known; the options are: slots"),
    ([wire.OP_CONSUME, 9, ["q"], 2, [1]], "CONSUME field 4 (options) must be dict (got list)"),
])
def test_hostile_values_get_an_error_naming_them_and_change_nothing(s, frame, words):
    handle(s, 1, [wire.OP_CONSUME, 1, ["q"], 1], 0.0)
    before = (s.queues["q"].ready_count, len(s.inflight), s.conns[1].consumers[1].prefetch)
    reply = handle(s, 1, frame, 0.0)
    assert reply[0] == wire.OP_ERROR and words in reply[3], reply
    assert (s.queues["q"].ready_count, len(s.inflight), s.conns[1].consumers[1].prefetch) == before
    s.check_invariants()
