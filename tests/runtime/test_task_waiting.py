"""TASK of a task with no events yet says where it waits (issue 17: "queued in `celery`, 0 consumers").

The first-hour trap: a worker started with ``-Q high,low`` never reads ``celery``, and the task stays
PENDING without a word.  A real brokerd is fed a task message over the binary protocol and asked over
admin text, as ``nc`` would.
"""

from __future__ import annotations

import re
import time

from broker.handlers import admin
from broker.state import BrokerState
from client import wire
from tests.support.wireclient import Raw


def publish(port: int, queue: str, msg_id: str) -> None:
    c = Raw(port)
    try:
        f = c.call(wire.OP_PUBLISH, queue, b"task body", msg_id, 0, None)
        assert f[0] == wire.OP_OK, f
    finally:
        c.close()


def test_task_without_events_names_its_queue_and_that_it_has_no_consumer(broker):
    publish(broker.port, "other", "t-elsewhere")
    publish(broker.port, "celery", "t-waits")
    worker = Raw(broker.port)  # a worker reading other queues only (-Q high,low)
    try:
        worker.ok(wire.OP_CONSUME, ["high", "low"], 4)
        reply = broker.admin("TASK t-waits\n")
        assert "PENDING" in reply, reply
        assert "queued in `celery`, 0 consumers (position 1 of 1 ready)" in reply, reply
        assert "-Q celery" in reply, reply
        # Named queue: read only there; elsewhere it says it did not find it.
        assert "queued in `celery`, 0 consumers" in broker.admin("TASK t-waits celery\n")
        missing = broker.admin("TASK t-waits other\n")
        assert "not among the 1 ready, in-flight and delayed messages read in queue 'other'" in missing, missing
        # An id nobody published: still PENDING, and says it was not found.
        assert "not among the 2 ready, in-flight and delayed messages read in any queue" in broker.admin("TASK t-nobody\n")
    finally:
        worker.close()


def test_task_waiting_counts_consumers_of_its_queue(broker):
    """With a consumer on the queue the line counts it (its prefetch is 0: the message stays queued)."""
    busy = Raw(broker.port)
    try:
        publish(broker.port, "jobs", "t-1")
        publish(broker.port, "jobs", "t-2")
        busy.ok(wire.OP_CONSUME, ["jobs"], 1)  # takes t-1, t-2 waits behind it
        deadline = time.monotonic() + 5
        while "queued in `jobs`, 1 consumer " not in (reply := broker.admin("TASK t-2\n")):
            assert time.monotonic() < deadline, reply
        assert "position 1 of 1 ready" in reply and "hint" not in reply, reply
    finally:
        busy.close()


def test_scan_cost_is_bounded():
    """TASK reads at most TASK_SCAN_LIMIT messages; the time it takes at that bound (the cost
    stated by inspection.TASK_SCAN_LIMIT's comment) is printed, not asserted."""
    s = BrokerState()
    s.connect(1)
    n = admin.TASK_SCAN_LIMIT + 10
    for i in range(n):
        s.publish(1, "celery", b"x", f"m{i}", 0, 0.0)
    s.take_effects()
    t0 = time.perf_counter()
    loc = s.locate_message("not-there", 0.0)
    took = time.perf_counter() - t0
    assert loc["where"] is None and loc["read"] == admin.TASK_SCAN_LIMIT
    print(f"TASK scan of {loc['read']} messages: {took * 1000:.1f} ms")
    loc = s.locate_message("m7", 0.0)
    assert (loc["where"], loc["queue"], loc["position"]) == ("ready", "celery", 8)


def test_delayed_and_in_flight_messages_are_found_too():
    s = BrokerState()
    s.connect(1, "producer")
    s.connect(2, "worker@box")
    s.publish(1, "later", b"x", "t-delayed", 0, 100.0, delay=30.0)
    s.publish(1, "jobs", b"x", "t-running", 0, 100.0)
    s.consume(2, ["jobs"], 1, 100.0)  # takes t-running
    s.take_effects()
    loc = s.locate_message("t-delayed", 110.0)
    assert (loc["where"], loc["queue"], loc["ready_at"], loc["consumers"]) == ("delayed", "later", 130.0, 0)
    assert loc["text"] == "delayed in `later`, due in 20.0s, 0 consumers" and "-Q later" in loc["hint"]
    loc = s.locate_message("t-running", 110.0)
    assert (loc["where"], loc["queue"], loc["attempts"], loc["connection"]) == ("in flight", "jobs", 1, "worker@box")
    assert "in flight from `jobs` to worker@box (attempt 1)" in loc["text"] and loc["hint"] is None
    # TASK_INFO's map carries it, for a task with no events yet (PENDING) and one still running
    info = s.task_info("t-delayed", 110.0)
    assert info["state"] == "PENDING" and info["waiting"]["where"] == "delayed" and info["events"] == []
    s.emit_events(2, "worker@box", [{"type": "task-received", "uuid": "t-running", "name": "n"}], 110.0)
    info = s.task_info("t-running", 110.0)
    assert info["state"] == "RECEIVED" and info["waiting"]["where"] == "in flight"
    # a queue it is not in, or one the user may not see: not found there
    assert s.locate_message("t-delayed", 110.0, queue="jobs")["where"] is None
    assert s.locate_message("t-delayed", 110.0, sees=lambda q: q != "later")["where"] is None
    assert s.task_info("t-delayed", 110.0, sees=lambda q: q != "later") is None
    # once it is finished nothing is looked up
    s.emit_events(2, "worker@box", [{"type": "task-succeeded", "uuid": "t-running", "runtime": 0.1}], 111.0)
    assert s.task_info("t-running", 111.0)["waiting"] is None


def test_task_info_op_and_admin_task_say_where_it_waits(broker):
    """Over the wire: TASK_INFO's map has "waiting" (a delayed message, no events yet); the admin
    TASK finds the delayed one too."""
    c = Raw(broker.port)
    try:
        f = c.call(wire.OP_PUBLISH, "slowq", b"task body", "t-later", 0, {"delay": 3600})
        assert f[0] == wire.OP_OK, f
        info = c.ok(wire.OP_TASK_INFO, "t-later")
        w = info["waiting"]
        assert info["state"] == "PENDING" and (w["where"], w["queue"]) == ("delayed", "slowq")
        assert w["text"].startswith("delayed in `slowq`, due in 3") and "-Q slowq" in w["hint"]
        assert c.ok(wire.OP_TASK_INFO, "t-nobody") is None  # nothing known, nothing found: still null
    finally:
        c.close()
    reply = broker.admin("TASK t-later\n")
    assert "delayed in `slowq`, due in" in reply and re.search(r"\nqueue +slowq\r\n", reply), reply


def test_task_info_hides_where_a_task_waits_in_a_queue_the_user_has_no_grant_on(broker_factory, tmp_path):
    """'web' (results-read, publish on emails) sees where its own task waits, not a task waiting in
    'secret': that reply is null, as for a task brokerd knows nothing of."""
    from client.userfile import hash_token, user_entry

    path = tmp_path / "users.toml"
    path.write_text(user_entry("root", hash_token("r"), {"admin": ["*"], "publish": ["*"], "results-read": ["*"]})
                    + user_entry("web", hash_token("w"), {"publish": ["emails"], "results-read": ["*"]}))
    b = broker_factory("--users-file", str(path))
    admin_ = Raw(b.port, name="root", extra={"user": "root", "token": "r"})
    web = Raw(b.port, name="web", extra={"user": "web", "token": "w"})
    try:
        admin_.ok(wire.OP_PUBLISH, "emails", b"x", "t-mine", 0, None)
        admin_.ok(wire.OP_PUBLISH, "secret", b"x", "t-theirs", 0, None)
        assert web.ok(wire.OP_TASK_INFO, "t-mine")["waiting"]["queue"] == "emails"
        assert web.ok(wire.OP_TASK_INFO, "t-theirs") is None
        assert admin_.ok(wire.OP_TASK_INFO, "t-theirs")["waiting"]["queue"] == "secret"
        # hostile ids are refused by name, the connection stays usable
        reply = web.call(wire.OP_TASK_INFO, "x" * 256)
        assert reply[0] == wire.OP_ERROR and "1 to 255 characters" in reply[3], reply
        assert web.ok(wire.OP_TASK_INFO, "t-mine")["state"] == "PENDING"
    finally:
        admin_.close()
        web.close()
