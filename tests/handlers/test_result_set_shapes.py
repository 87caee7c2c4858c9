"""RESULT_SET (protocol.md §5.19) through the binary handler: the worker's shape (a plain value, no
meta, its delivery's tag) and every other shape get the same answers; hostile options are refused
by name.  Pure: a BrokerState, no sockets."""

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
    st.consume(W, ["q"], 10, 0.0)
    return st


def delivered_tag(s, msg_id):
    s.publish(W, "q", b"x", msg_id, 0, 0.0)
    return next(f[2] for f in s.take_outbox()[W] if f[0] == wire.OP_DELIVER and f[4] == msg_id)


@pytest.mark.parametrize("value", [None, "ok", b"raw", True, 7, 2**70, 1.5, {"a": [1, 2]}, [1, "x"]])
def test_a_result_with_its_tag_is_stored_and_acks_whatever_its_value(s, value):
    tag = delivered_tag(s, "t1")
    reply = handle(s, W, [wire.OP_RESULT_SET, 3, "t1", "SUCCESS", value, None, {"tag": tag}], 1.0)
    assert reply == [wire.OP_OK, 3, {"acked": True}]
    assert s.results["t1"].value == value and s.queues["q"].acked == 1
    # the same again: stored, but the delivery is no longer in flight
    assert handle(s, W, [wire.OP_RESULT_SET, 4, "t1", "SUCCESS", value, None, {"tag": tag}], 1.0)[2] == {"acked": False}


@pytest.mark.parametrize("opts, match", [
    ({"tag": "1"}, "option 'tag' must be a delivery tag"),
    ({"tag": True}, "option 'tag' must be a delivery tag"),
    ({"tag": 1.0}, "option 'tag' must be a delivery tag"),
    ({"tagg": 1}, "unknown RESULT_SET option 'tagg'"),
    ({"ttl": -1}, "must be >= 0"),
])
def test_hostile_result_options_are_refused_by_name_and_store_nothing(s, opts, match):
    reply = handle(s, W, [wire.OP_RESULT_SET, 5, "t1", "SUCCESS", None, None, opts], 1.0)
    assert reply[0] == wire.OP_ERROR and reply[2] == "BAD_REQUEST" and match in reply[3], reply
    assert "t1" not in s.results


def test_a_tag_past_64_bits_is_not_in_flight_and_the_result_is_stored(s):
    reply = handle(s, W, [wire.OP_RESULT_SET, 6, "t1", "SUCCESS", 1, None, {"tag": 2**70}], 1.0)
    assert reply == [wire.OP_OK, 6, {"acked": False}] and s.results["t1"].value == 1


@pytest.mark.parametrize("ttl", [60, 0.5, 86400, 2**63])
def test_the_workers_shape_with_a_ttl_keeps_the_result_that_long_and_acks(s, ttl):
    # What the default worker sends: its app's result_expires beside the tag.
    s.enable_log()
    tag = delivered_tag(s, "t1")
    reply = handle(s, W, [wire.OP_RESULT_SET, 3, "t1", "SUCCESS", None, None, {"ttl": ttl, "tag": tag}], 10.0)
    assert reply == [wire.OP_OK, 3, {"acked": True}]
    assert s.results["t1"].expires == 10.0 + ttl and s.queues["q"].acked == 1
    assert s.take_records()[-1][1][4] == 10.0 + ttl  # the RESULT record carries the same expiry


@pytest.mark.parametrize("ttl, match", [
    (-1, "must be >= 0"), (0, "ttl must be a number of seconds > 0"), (float("nan"), "finite"),
    (float("inf"), "finite"), (True, "must be a number of seconds"), ("60", "must be a number of seconds"),
    (2**70, "fits in 64 bits"),
])
def test_a_hostile_ttl_beside_a_tag_is_refused_by_name_and_acks_nothing(s, ttl, match):
    tag = delivered_tag(s, "t1")
    reply = handle(s, W, [wire.OP_RESULT_SET, 5, "t1", "SUCCESS", None, None, {"ttl": ttl, "tag": tag}], 1.0)
    assert reply[0] == wire.OP_ERROR and reply[2] == "BAD_REQUEST" and match in reply[3], reply
    assert "t1" not in s.results and s.queues["q"].acked == 0
