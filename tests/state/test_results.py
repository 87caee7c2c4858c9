"""Results kept by brokerd: by task id, long-poll waits, TTL, atomic with the ack."""

import re

import cbor2
import pytest

from broker.errors import RequestError
from broker.state import BrokerState
from client import wire
from tests.support.wireclient import Raw

W, C = 1, 2


@pytest.fixture
def s():
    st = BrokerState()
    st.connect(W)
    st.connect(C)
    return st


def test_an_unknown_id_is_pending(s):
    assert s.result_get(C, 1, "nope", 0.0) == {"id": "nope", "state": "PENDING", "result": None, "meta": None, "updated": None}


def test_a_stored_result_is_returned_by_id(s):
    s.result_set(W, "t1", "SUCCESS", {"sum": 4}, None, 10.0)
    r = s.result_get(C, 1, "t1", 11.0)
    assert (r["state"], r["result"], r["updated"]) == ("SUCCESS", {"sum": 4}, 10.0)


def test_a_waiting_get_is_answered_when_the_result_becomes_ready_not_before(s):
    assert s.result_get(C, 7, "t1", 0.0, wait=30) is None
    s.result_set(W, "t1", "STARTED", None, None, 1.0)
    assert s.take_outbox() == {}  # STARTED is not ready: still parked
    s.result_set(W, "t1", "SUCCESS", 42, None, 2.0)
    assert s.take_outbox() == {C: [[wire.OP_OK, 7, {"id": "t1", "state": "SUCCESS", "result": 42, "meta": None, "updated": 2.0}]]}


def test_a_waiting_get_times_out_with_the_current_state(s):
    assert s.result_get(C, 7, "t1", 0.0, wait=5) is None
    s.result_set(W, "t1", "STARTED", None, None, 1.0)
    s.tick(4.9)
    assert s.take_outbox() == {}
    s.tick(5.0)
    (reply,) = s.take_outbox()[C]
    assert reply[1] == 7 and reply[2]["state"] == "STARTED"


def test_a_closed_connection_drops_its_waits(s):
    s.result_get(C, 7, "t1", 0.0, wait=5)
    s.disconnect(C, 1.0)
    s.result_set(W, "t1", "SUCCESS", 1, None, 2.0)
    assert C not in s.take_outbox()


def test_results_expire_after_their_ttl(s):
    s.result_set(W, "t1", "SUCCESS", 1, None, 0.0, ttl=60)
    s.tick(59.9)
    assert s.result_get(C, 1, "t1", 59.9)["state"] == "SUCCESS"
    s.tick(60.0)
    assert s.result_get(C, 1, "t1", 60.0)["state"] == "PENDING"


def test_a_custom_state_is_stored_but_never_ready_and_cannot_ack(s):
    assert s.result_get(C, 7, "t1", 0.0, wait=30) is None
    s.result_set(W, "t1", "PROGRESS", None, {"done": 3, "total": 10}, 1.0)
    assert s.take_outbox() == {}  # still parked: PROGRESS is not a final state
    assert s.result_get(C, 8, "t1", 1.0)["meta"] == {"done": 3, "total": 10}
    with pytest.raises(RequestError, match=r"^a result in state PROGRESS cannot ack its delivery"):
        s.result_set(W, "t1", "PROGRESS", None, None, 1.0, tag=1)


def test_forget_removes_a_result(s):
    s.result_set(W, "t1", "FAILURE", None, {"exc_type": "ValueError"}, 0.0)
    assert s.result_forget("t1", 1.0) is True
    assert s.result_get(C, 1, "t1", 1.0)["state"] == "PENDING"
    assert s.result_forget("t1", 1.0) is False


def test_storing_a_result_with_its_tag_acks_the_delivery_in_the_same_step(s):
    s.publish(C, "q", b"task", "t1", 0, 0.0)
    s.consume(W, ["q"], 1, 0.0)
    (d,) = s.take_outbox()[W]
    assert s.result_set(W, "t1", "SUCCESS", 3, None, 1.0, tag=d[2]) == {"acked": True}
    q = s.queues["q"]
    assert (q.inflight_count, q.acked) == (0, 1)
    # a stale tag still stores the result (the task did run) but acks nothing
    assert s.result_set(W, "t1", "SUCCESS", 3, None, 1.0, tag=d[2]) == {"acked": False}


def test_bad_result_requests_are_refused_by_name(s):
    with pytest.raises(RequestError, match=r"^state must be one of RECEIVED, STARTED, RETRY, SUCCESS, FAILURE, REVOKED, REJECTED, or a custom state of up to 32 capital letters, digits and _ such as PROGRESS \(got 'done'\)$"):
        s.result_set(W, "t1", "done", None, None, 0.0)
    with pytest.raises(RequestError, match=r"got 'PENDING'"):
        s.result_set(W, "t1", "PENDING", None, None, 0.0)
    with pytest.raises(RequestError, match=r"^a task id must be a text string"):
        s.result_get(C, 1, "", 0.0)


def test_results_and_their_acks_are_replayed_from_the_log(s):
    s.enable_log()
    s.publish(C, "q", b"task", "t1", 0, 0.0)
    s.consume(W, ["q"], 1, 0.0)
    (d,) = s.take_outbox()[W]
    s.result_set(W, "t1", "SUCCESS", [1, 2], None, 1.0, tag=d[2])
    s.result_set(W, "t2", "FAILURE", None, {"exc_type": "KeyError", "traceback": "tb"}, 1.0)
    s.result_set(W, "old", "SUCCESS", 0, None, 1.0, ttl=5)
    s.result_forget("t2", 2.0)
    recs = [(i + 1, t, cbor2.loads(cbor2.dumps(p))) for i, (t, p) in enumerate(s.take_records())]
    fresh = BrokerState()
    fresh.replay(recs, 10.0)
    fresh.tick(10.0)
    assert fresh.result_get(C, 1, "t1", 10.0)["result"] == [1, 2]
    assert fresh.result_get(C, 1, "t2", 10.0)["state"] == "PENDING"
    assert fresh.result_get(C, 1, "old", 10.0)["state"] == "PENDING"  # expired
    assert fresh.queues["q"].ready_count == 0  # acked with the result


def test_result_ops_end_to_end_survive_a_restart(broker):
    w = Raw(broker.port, name="worker")
    c = Raw(broker.port, name="web")
    w.ok(wire.OP_PUBLISH, "q", b"task", "t9", 0, None)
    w.ok(wire.OP_CONSUME, ["q"], 1)
    (d,) = w.deliveries(1)
    rid = c.request(wire.OP_RESULT_GET, "t9", 10)  # parks: no reply yet
    assert w.ok(wire.OP_RESULT_SET, "t9", "SUCCESS", {"ok": True}, {"runtime": 0.5}, {"tag": d[2]}) == {"acked": True}
    reply = c.reply(rid)
    assert reply[2]["state"] == "SUCCESS" and reply[2]["result"] == {"ok": True}
    out = broker.admin("RESULT t9\n")
    assert out.startswith("OK result t9\r\n") and re.search(r"^state\s+SUCCESS\r$", out, re.M)
    assert re.search(r"^meta\.runtime\s+0\.5\r$", out, re.M)
    w.ok(wire.OP_RESULT_SET, "t10", "FAILURE", None, {"exc_type": "ZeroDivisionError", "exc_message": "division by zero",
                                                      "traceback": "Traceback (most recent call last):\n  boom"}, None)
    out = broker.admin("RESULT t10\n")
    assert "meta.exc_type" in out and "traceback:\r\n  Traceback (most recent call last):\r\n    boom\r\n" in out
    broker.kill()
    broker.restart()
    c = Raw(broker.port)
    assert c.ok(wire.OP_RESULT_GET, "t9", None)["result"] == {"ok": True}
    assert c.ok(wire.OP_RESULT_GET, "t10", None)["meta"]["exc_type"] == "ZeroDivisionError"
    assert c.ok(wire.OP_STATS, "q")["ready"] == 0



def test_a_rejected_result_is_final_and_wakes_its_waiters(s):
    """Reject(requeue=False) stores REJECTED (Celery's state): a waiting RESULT_GET must be answered."""
    assert s.result_get(C, 7, "t-rej", 0.0, wait=30) is None  # parked
    meta = {"exc_type": "Reject", "exc_message": "no"}
    s.result_set(W, "t-rej", "REJECTED", None, meta, 1.0)
    assert s.take_outbox() == {C: [[wire.OP_OK, 7, {"id": "t-rej", "state": "REJECTED", "result": None, "meta": meta,
                                                     "updated": 1.0}]]}


def test_results_expire_in_time_order_whether_their_ttls_come_in_order_or_not(s):
    # Default-TTL results go to a FIFO (their expiries come in order), the others to a sorted
    # list; a replaced or forgotten result's old entry is skipped at its time.
    day = s.default_result_ttl
    s.result_set(W, "a", "STARTED", None, None, 0.0)  # expires at day (replaced below)
    s.result_set(W, "b", "SUCCESS", 1, None, 1.0, ttl=10)  # expires at 11: before a's
    s.result_set(W, "a", "SUCCESS", 2, None, 5.0)  # expires at day + 5
    s.result_set(W, "c", "SUCCESS", 3, None, 6.0)
    s.result_forget("c", 7.0)
    s.result_set(W, "c", "SUCCESS", 4, None, 8.0, ttl=day)  # c again, at day + 8 (the old entry is at day + 6)
    assert s.next_wakeup() == 11.0
    s.tick(12.0)
    assert s.result_get(C, 1, "b", 12.0)["state"] == "PENDING"
    s.tick(day + 1)  # a's first entry is due: a was replaced since, so it stays
    assert s.result_get(C, 1, "a", day + 1)["result"] == 2
    s.tick(day + 6.5)  # a's second entry and c's stale one
    assert s.result_get(C, 1, "a", day + 6.5)["state"] == "PENDING"
    assert s.result_get(C, 1, "c", day + 6.5)["result"] == 4
    s.tick(day + 9)
    assert s.result_get(C, 1, "c", day + 9)["state"] == "PENDING" and not s.results
