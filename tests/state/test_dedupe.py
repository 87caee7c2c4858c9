"""Publish de-duplication (broker/state/dedupe.py): a producer's resend after a failover is stored
once, a retry under the same task id is not a resend, the window is bounded and rebuilt by replay.
No sockets; the clock is passed in."""

import re

import cbor2
import pytest

from broker.handlers.binary import handle
from broker.state import BrokerState
from broker.state.dedupe import DEDUPE_SECONDS, DEDUPE_WINDOW, DedupeWindow
from client.wire import OP_PUBLISH

P = 1


@pytest.fixture
def s():
    st = BrokerState()
    st.connect(P)
    st.enable_log()
    return st


def publish(s, msg_id, key, t=0.0, queue="q", **opts):
    options = dict(opts)
    if key is not None:
        options["dedupe"] = key
    f = handle(s, P, [OP_PUBLISH, 1, queue, b"body", msg_id, 0, options or None], t)
    assert f[0] == 64, f  # OK
    return f[2]


def ids(s, queue="q"):
    return [m.id for m in s.queues[queue].iter_ready()]


def replayed(s, now):
    fresh = BrokerState()
    fresh.replay([(i + 1, t, cbor2.loads(cbor2.dumps(p))) for i, (t, p) in enumerate(s.take_records())], now)
    return fresh


def test_a_resend_with_the_same_key_is_answered_with_the_first_id_and_stores_nothing(s):
    assert publish(s, "m1", "p-1") == "m1"
    records = len(s.records)
    # the resend (same key) after a lost confirm: OK with the original id, nothing stored or logged
    assert publish(s, "m1", "p-1", t=1.0) == "m1"
    assert ids(s) == ["m1"]
    assert s.queues["q"].published == 1
    assert len(s.records) == records
    # a broker-made id is answered too
    first = publish(s, None, "p-2")
    assert publish(s, None, "p-2") == first
    assert ids(s) == ["m1", first]


def test_a_retry_under_the_same_task_id_with_a_new_key_is_stored(s):
    # Celery-style retry: the task id is the same on purpose; the SDK gives each publish its own key
    publish(s, "task-1", "p-1")
    publish(s, "task-1", "p-2", t=1.0)
    assert ids(s) == ["task-1", "task-1"]
    # and without keys at all nothing is ever dropped
    publish(s, "task-1", None)
    assert len(ids(s)) == 3


def test_the_window_is_bounded_by_count_and_by_seconds():
    w = DedupeWindow(limit=3, seconds=10.0)
    for i in range(4):
        w.remember(f"k{i}", f"m{i}", float(i), float(i))
    assert len(w) == 3
    assert w.seen("k0", 4.0) is None  # pushed out by count: the oldest goes first
    assert w.seen("k3", 4.0) == "m3"
    assert w.seen("k1", 11.0) is None  # older than the window: forgotten
    assert len(w) == 2  # k2 (at 2.0) still inside (11 - 10 = 1 < 2)
    assert w.seen("k2", 12.5) is None and len(w) == 1  # only k3 (at 3.0) is left
    assert w.seen("k3", 13.0) is None and len(w) == 0
    # the stated defaults
    assert DedupeWindow().limit == DEDUPE_WINDOW == 100_000 and DEDUPE_SECONDS == 300.0


def test_past_the_window_the_same_key_is_a_new_publish(s):
    publish(s, "m1", "p-1", t=0.0)
    publish(s, "m1", "p-1", t=DEDUPE_SECONDS + 1)
    assert ids(s) == ["m1", "m1"]


def test_replay_rebuilds_the_window_so_a_new_leader_drops_the_resend_too(s):
    publish(s, "m1", "p-1", t=0.0)
    publish(s, "m2", None, t=0.0)
    fresh = replayed(s, now=5.0)  # a restart, or a follower that applied the same records
    fresh.connect(P)
    fresh.enable_log()
    assert publish(fresh, "m1", "p-1", t=6.0) == "m1"
    assert ids(fresh) == ["m1", "m2"]
    # a key whose publish is older than the window when the log is replayed is not held
    late = replayed(fresh, now=DEDUPE_SECONDS + 1)
    assert len(late.dedupe) == 0


def test_a_keyed_unique_publish_resent_gets_its_own_answer_not_duplicate(s):
    f = handle(s, P, [OP_PUBLISH, 1, "q", b"x", "u1", 0, {"unique_key": "k", "dedupe": "p-1"}], 0.0)
    assert f[2] == {"id": "u1", "duplicate": False}
    f = handle(s, P, [OP_PUBLISH, 2, "q", b"x", "u1", 0, {"unique_key": "k", "dedupe": "p-1"}], 1.0)
    assert f[2] == {"id": "u1", "duplicate": False}  # the resend: the first publish's answer
    assert ids(s) == ["u1"]


@pytest.mark.parametrize("key, match", [
    ("", r"'dedupe' must be non-empty text"),
    (7, r"'dedupe' must be non-empty text \(got int\)"),
    (["a"], r"'dedupe' must be non-empty text \(got list\)"),
    ("k" * 256, r"'dedupe' is longer than 255 bytes"),
    ("é" * 128, r"'dedupe' is longer than 255 bytes"),
])
def test_hostile_dedupe_keys_get_bad_request_and_store_nothing(s, key, match):
    f = handle(s, P, [OP_PUBLISH, 1, "q", b"x", None, 0, {"dedupe": key}], 0.0)
    assert f[2] == "BAD_REQUEST", f
    assert re.search(match, f[3]), f[3]
    assert "q" not in s.queues or s.queues["q"].published == 0
    assert len(s.dedupe) == 0


def test_a_publish_packed_behind_a_backlog_keeps_its_key_live_and_after_replay(s):
    # Behind PACK_AFTER ready messages a plain publish is packed without an object
    # (broker/state/queue.py); its key must be remembered and logged all the same.
    from broker.state.queue import PACK_AFTER

    for i in range(PACK_AFTER):
        publish(s, f"b{i}", None)
    assert publish(s, "m1", "p-1") == "m1"
    assert publish(s, "m1", "p-1", t=1.0) == "m1"
    assert s.queues["q"].published == PACK_AFTER + 1
    fresh = replayed(s, now=2.0)
    fresh.connect(P)
    fresh.enable_log()
    assert publish(fresh, "m1", "p-1", t=3.0) == "m1"
    assert fresh.queues["q"].published == PACK_AFTER + 1
