"""Deliveries a closed connection gives back reach a dead-letter queue's consumer best first:
every one goes back before any queue is dispatched (found by tests/state/test_state_model.py:
the first message returned went out at once, ahead of a higher-priority one returned after it)."""

from broker.state import BrokerState
from client.wire import OP_DELIVER


def delivered(s: BrokerState) -> list:
    return [(f[4], f[6]) for fs in s.take_outbox().values() for f in fs if f[0] == OP_DELIVER]


def test_a_disconnect_dead_letters_everything_before_the_dead_letter_queue_is_dispatched():
    s = BrokerState()
    s.declare("a", {"max_attempts": 1}, 0.0)
    for c in (1, 2):
        s.connect(c)
    s.consume(2, ["a.dlq"], 1, 0.0)  # one slot: it gets the best of what dies
    s.consume(1, ["a"], 5, 0.0)
    s.publish(0, "a", b"low", "low", 0, 0.0)
    assert delivered(s) == [("low", 0)]
    s.publish(0, "a", b"high", "high", 3, 0.0)
    assert delivered(s) == [("high", 3)]
    s.disconnect(1, 0.0)  # both at max_attempts: dead-lettered, "low" first
    assert delivered(s) == [("high", 3)]
    assert [m.id for m in s.queues["a.dlq"].iter_ready()] == ["low"]
    s.check_invariants()
