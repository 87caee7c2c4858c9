"""Unique tasks in the broker state (broker/state/unique.py): duplicates, each policy freeing its key,
the time bound, the log (replay, compaction), hostile values.  No sockets; the clock is passed in."""

import re

import cbor2
import pytest

from broker.errors import BadRequest, QueueFull
from broker.handlers.admin import execute
from broker.handlers.binary import handle
from broker.state import BrokerState
from client.wire import OP_DELIVER, OP_PUBLISH

P, P2, W = 1, 2, 3


@pytest.fixture
def s():
    st = BrokerState()
    for c in (P, P2, W):
        st.connect(c)
    st.enable_log()
    return st


def pub(s, task_id, t, key="feed:42", until="finished", for_=600, conn=P, queue="q"):
    return s.publish_unique(conn, queue, b"body-" + task_id.encode(), task_id, 0, t,
                            unique_key=key, unique_for=for_, unique_until=until)


def delivered(s):
    return [f for f in s.take_outbox().get(W, []) if f[0] == OP_DELIVER]


def replayed(s, now):
    fresh = BrokerState()
    fresh.replay([(i + 1, t, cbor2.loads(cbor2.dumps(p))) for i, (t, p) in enumerate(s.take_records())], now)
    fresh.tick(now)
    return fresh


def test_a_duplicate_names_the_holder_and_enqueues_nothing(s):
    assert pub(s, "t1", 0.0) == {"id": "t1", "duplicate": False}
    assert pub(s, "t2", 1.0, conn=P2) == {"id": "t1", "duplicate": True}
    assert [m.id for m in s.queues["q"].iter_ready()] == ["t1"]
    assert s.queues["q"].published == 1


def test_until_started_frees_the_key_at_the_first_delivery(s):
    pub(s, "t1", 0.0, until="started")
    assert pub(s, "t2", 0.5, until="started")["duplicate"] is True
    s.consume(W, ["q"], 1, 1.0)
    assert [d[4] for d in delivered(s)] == ["t1"]
    assert pub(s, "t3", 1.5, until="started") == {"id": "t3", "duplicate": False}


def test_until_started_sees_a_delivery_made_by_the_publish_itself(s):
    s.consume(W, ["q"], 1, 0.0)  # a waiting consumer: the publish delivers at once
    pub(s, "t1", 0.0, until="started")
    assert [d[4] for d in delivered(s)] == ["t1"]
    assert s.unique_info("feed:42", 0.0) is None
    assert replayed(s, 1.0).unique_info("feed:42", 1.0) is None  # and the log agrees


def test_until_finished_holds_through_delivery_and_frees_at_ack(s):
    pub(s, "t1", 0.0)
    s.consume(W, ["q"], 1, 0.0)
    (d,) = delivered(s)
    assert pub(s, "t2", 1.0)["duplicate"] is True  # running: still held
    s.ack(W, d[2], 2.0)
    assert pub(s, "t3", 2.0) == {"id": "t3", "duplicate": False}


def test_until_finished_frees_when_a_final_result_is_stored_with_the_ack(s):
    pub(s, "t1", 0.0)
    s.consume(W, ["q"], 1, 0.0)
    (d,) = delivered(s)
    s.result_set(W, "t1", "STARTED", None, None, 1.0)
    assert pub(s, "t2", 1.0)["duplicate"] is True  # STARTED is not finished
    s.result_set(W, "t1", "SUCCESS", 7, None, 2.0, tag=d[2])
    assert pub(s, "t3", 2.0)["duplicate"] is False


def test_until_time_holds_after_the_task_finished_and_frees_at_unique_for(s):
    pub(s, "t1", 0.0, until="time", for_=10)
    s.consume(W, ["q"], 1, 0.0)
    (d,) = delivered(s)
    s.ack(W, d[2], 1.0)
    assert pub(s, "t2", 9.9, until="time")["duplicate"] is True
    assert s.next_wakeup() == 10.0  # the broker wakes for the expiry
    s.tick(10.0)
    assert s.unique_info("feed:42", 10.0) is None
    assert pub(s, "t3", 10.0, until="time")["duplicate"] is False


def test_unique_for_bounds_the_other_policies(s):
    pub(s, "t1", 0.0, until="finished", for_=5)  # never delivered: the key still frees
    assert pub(s, "t2", 4.0)["duplicate"] is True
    assert pub(s, "t3", 5.0) == {"id": "t3", "duplicate": False}


@pytest.mark.parametrize("until", ["started", "finished"])
def test_a_message_that_leaves_without_running_frees_its_key(s, until):
    s.publish_unique(P, "q", b"x", "ttl-1", 0, 0.0, unique_key="a", unique_until=until, ttl=5)
    s.tick(5.0)  # expired before anyone took it
    assert s.unique_info("a", 5.0) is None
    s.publish_unique(P, "q", b"x", "rev-1", 0, 5.0, unique_key="b", unique_until=until)
    s.revoke("rev-1", 5.0)
    s.consume(W, ["q"], 1, 5.0)  # the revoked message is dropped instead of delivered
    assert s.unique_info("b", 5.0) is None and not delivered(s)
    s.declare("dl", {"max_attempts": 1}, 5.0)
    s.publish_unique(P, "dl", b"x", "dead-1", 0, 5.0, unique_key="c", unique_until=until)
    s.consume(W, ["dl"], 1, 5.0)
    (d,) = delivered(s)
    s.nack(W, d[2], 5.0, requeue=False)  # dead-lettered
    assert s.unique_info("c", 5.0) is None
    assert replayed(s, 6.0).unique == {}


def test_a_time_key_outlives_its_message(s):
    s.publish_unique(P, "q", b"x", "t1", 0, 0.0, unique_key="k", unique_until="time", unique_for=100, ttl=1)
    s.tick(1.0)
    assert s.unique_info("k", 1.0)["task_id"] == "t1"


def test_keys_are_exact_across_a_restart(s):
    pub(s, "held", 0.0, key="a")
    pub(s, "freed", 0.0, key="b", until="started")
    pub(s, "timed", 0.0, key="c", until="time", for_=50)
    s.consume(W, ["q"], 2, 1.0)  # delivers held and freed: b frees, a stays
    fresh = replayed(s, 20.0)
    assert fresh.unique_info("a", 20.0)["task_id"] == "held"
    assert fresh.unique_info("b", 20.0) is None
    assert fresh.unique_info("c", 20.0)["expires_in"] == 30.0  # counted from when it was taken
    fresh.connect(P)
    assert fresh.publish_unique(P, "q", b"x", "again", 0, 20.0, unique_key="a")["id"] == "held"
    fresh.tick(50.0)
    assert fresh.unique_info("c", 50.0) is None


def test_compaction_carries_held_keys(s):
    pub(s, "t1", 0.0, key="k")
    s.take_records()
    s.compact(s.last_lsn)
    assert replayed(s, 1.0).unique_info("k", 1.0)["task_id"] == "t1"


def test_a_refused_publish_does_not_hold_the_key(s):
    s.declare("tiny", {"max_length": 1}, 0.0)
    s.publish(P, "tiny", b"x", None, 0, 0.0)
    with pytest.raises(QueueFull):
        pub(s, "t1", 0.0, queue="tiny")
    assert s.unique_info("feed:42", 0.0) is None
    assert replayed(s, 1.0).unique_info("feed:42", 1.0) is None


@pytest.mark.parametrize("opts, match", [
    ({"unique_key": ""}, r"'unique_key' must be non-empty text"),
    ({"unique_key": 42}, r"'unique_key' must be non-empty text"),
    ({"unique_key": "k" * 256}, r"'unique_key' is longer than 255 bytes"),
    ({"unique_key": "k", "unique_for": 0}, r"'unique_for' must be a number of seconds > 0 and at most"),
    ({"unique_key": "k", "unique_for": 1e12}, r"'unique_for' must be a number of seconds > 0"),
    ({"unique_key": "k", "unique_until": "forever"}, r"'unique_until' must be one of started, finished, time"),
    ({"unique_for": 5}, r"'unique_for' and 'unique_until' need 'unique_key'"),
])
def test_hostile_unique_options_get_bad_request_and_store_nothing(s, opts, match):
    f = handle(s, P, [OP_PUBLISH, 1, "q", b"x", None, 0, opts], 0.0)
    assert f[2] == "BAD_REQUEST", f
    assert re.search(match, f[3]), f[3]
    assert "q" not in s.queues or s.queues["q"].published == 0
    assert not s.unique


def test_the_wire_reply_is_a_map_only_with_a_key(s):
    assert handle(s, P, [OP_PUBLISH, 1, "q", b"x", "plain", 0, None], 0.0)[2] == "plain"
    f = handle(s, P, [OP_PUBLISH, 2, "q", b"x", "u1", 0, {"unique_key": "k"}], 0.0)
    assert f[2] == {"id": "u1", "duplicate": False}
    f = handle(s, P, [OP_PUBLISH, 3, "q", b"x", None, 0, {"unique_key": "k"}], 0.0)
    assert f[2] == {"id": "u1", "duplicate": True}
    assert s.unique_info("k", 0.0)["expires_in"] == 3600.0  # the default bound


def test_unique_admin_line(s):
    pub(s, "t1", 0.0)
    out = execute(s, "UNIQUE feed:42", 10.0).splitlines()
    assert out[0] == "OK unique feed:42" and out[-1] == "END"
    assert out[2].split() == ["task_id", "t1"] and out[3].split() == ["until", "finished"]
    assert out[4].split() == ["expires_in_s", "590"]
    assert execute(s, "UNIQUE nope", 0.0).startswith("ERR NOT_FOUND no task holds unique key 'nope'")


def test_bad_value_in_the_publish_itself_frees_the_key(s):
    with pytest.raises(BadRequest, match="priority must be a whole number"):
        s.publish_unique(P, "q", b"x", "t1", 300, 0.0, unique_key="k")
    assert not s.unique
