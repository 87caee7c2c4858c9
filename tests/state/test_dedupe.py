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


def test_expiry_runs_in_batches_yet_an_old_key_is_never_answered():
    # Forgetting is amortised (DEDUPE_EXPIRE_EVERY): a publish does not look at the oldest key
    # each time, so a key past the window may still be held for a moment; ``seen`` checks its
    # own age, so it is never answered from the window.
    from broker.state.dedupe import DEDUPE_EXPIRE_EVERY

    w = DedupeWindow(limit=100, seconds=10.0)
    w.remember("k0", "m0", 0.0, 0.0)
    w.remember("k1", "m1", 0.5, 0.5)
    w.remember("k2", "m2", 10.2, 10.2)  # k0 is due: a batch runs and forgets it
    assert len(w) == 2
    w.remember("k3", "m3", 10.6, 10.6)  # k1 is past the window too, but the next batch is not due yet
    assert len(w) == 3
    assert w.seen("k1", 10.6) is None  # ... and it is not answered: its own age says so
    assert w.seen("k2", 10.6) == "m2"
    w.remember("k4", "m4", 10.2 + DEDUPE_EXPIRE_EVERY, 10.2 + DEDUPE_EXPIRE_EVERY)  # the next batch
    assert len(w) == 3 and w.seen("k3", 11.3) == "m3"


def test_a_key_remembered_twice_by_replay_is_the_newest_and_the_count_bound_holds():
    w = DedupeWindow(limit=2, seconds=100.0)
    w.remember("a", "m1", 0.0, 0.0)
    w.remember("b", "m2", 1.0, 1.0)
    w.remember("a", "m1", 2.0, 2.0)  # a log that holds the key twice: "a" is now the newest
    w.remember("c", "m3", 3.0, 3.0)  # over the limit: the oldest ("b") goes, not "a"
    assert len(w) == 2 and w.seen("b", 3.0) is None and w.seen("a", 3.0) == "m1"


@pytest.mark.parametrize("key", ["k" * 255, "é" * 127, "клавиша-1"])
def test_a_batch_item_with_a_valid_key_of_any_text_is_stored_once(s, key):
    from client.wire import OP_PUBLISH_BATCH

    item = ["q", b"x", "m1", 0, {"dedupe": key}]
    assert handle(s, P, [OP_PUBLISH_BATCH, 1, [item, item]], 0.0)[2] is None  # both under "m1"
    assert ids(s) == ["m1"]  # the second is the resend


@pytest.mark.parametrize("key", ["", "k" * 256, "é" * 128, 7])
def test_a_batch_item_with_a_hostile_key_is_refused_alone(s, key):
    from client.wire import OP_PUBLISH_BATCH

    f = handle(s, P, [OP_PUBLISH_BATCH, 1, [["q", b"x", "m1", 0, {"dedupe": key}], ["q", b"y", "m2", 0, None]]], 0.0)
    assert f[2][0][0] == "BAD_REQUEST" and "'dedupe'" in f[2][0][1], f
    assert f[2][1] == "m2" and ids(s) == ["m2"]
