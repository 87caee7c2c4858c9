"""PUBLISH_BATCH (protocol.md §5.46) through the binary handler on a plain BrokerState, and its
grant (broker/auth.py): each item is a PUBLISH stored or refused on its own; a malformed frame is
refused whole; a user needs ``publish`` on every queue the batch names."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from broker import auth
from broker.handlers.binary import DURABLE_OPS, handle
from broker.state import BrokerState
from client import wire


@pytest.fixture
def s():
    s = BrokerState()
    s.connect(1)
    return s


def batch(rid, *items):
    return [wire.OP_PUBLISH_BATCH, rid, list(items)]


def ready_ids(s, queue):
    q = s.queues.get(queue)
    out = []
    if q is None:
        return out
    while (m := q.pop_ready()) is not None:
        out.append(m.id)
    return out


def test_a_batch_of_publishes_with_their_own_ids_is_stored_in_order_and_answered_null(s):
    reply = handle(s, 1, batch(7, ["q", b"a", "m1", 0, None], ["q", b"b", "m2"], ["r", b"c", "m3", 3, {"ttl": 60}]), 0.0)
    assert reply == [wire.OP_OK, 7, None]
    assert ready_ids(s, "q") == ["m1", "m2"]
    assert ready_ids(s, "r") == ["m3"]
    assert wire.OP_PUBLISH_BATCH in DURABLE_OPS  # its reply is a confirm: held for the log


def test_one_refused_item_gets_its_error_and_the_others_are_stored(s):
    s.declare("full", {"max_length": 1, "overflow": "reject"}, 0.0)
    reply = handle(s, 1, batch(3, ["full", b"a", "m1"], ["full", b"b", "m2"], ["q", 5, "m3"], ["full2", b"d", "m4"],
                               ["q", b"e", "m5", 256]), 0.0)
    assert reply[:2] == [wire.OP_OK, 3]
    results = reply[2]
    assert results[0] == "m1" and results[3] == "m4"
    assert results[1][0] == "QUEUE_FULL" and results[1][1].startswith("item 1: queue 'full' is full")
    assert results[2] == ["BAD_REQUEST", "item 2: PUBLISH field 3 (body) must be a byte string"]
    assert results[4] == ["BAD_REQUEST", "item 4: priority must be a whole number from 0 to 255 (got 256)"]
    assert ready_ids(s, "full") == ["m1"] and ready_ids(s, "full2") == ["m4"] and ready_ids(s, "q") == []


def test_items_without_an_id_or_with_a_unique_key_get_their_results_listed(s):
    reply = handle(s, 1, batch(4, ["q", b"a", "m1"], ["q", b"b"], ["q", b"c", "m3", 0, {"unique_key": "k"}],
                               ["q", b"d", "m4", 0, {"unique_key": "k"}]), 0.0)
    m1, made, unique, dup = reply[2]
    assert m1 == "m1" and type(made) is str and made != "m1"
    assert unique == {"id": "m3", "duplicate": False}
    assert dup == {"id": "m3", "duplicate": True}
    assert ready_ids(s, "q") == ["m1", made, "m3"]


@pytest.mark.parametrize("field, message", [
    (None, "PUBLISH_BATCH field 2 must be a non-empty list of publishes, each [queue, body, id, priority, options]"),
    ([], "PUBLISH_BATCH field 2 must be a non-empty list of publishes, each [queue, body, id, priority, options]"),
    ({"q": b"x"}, "PUBLISH_BATCH field 2 must be a non-empty list of publishes, each [queue, body, id, priority, options]"),
    ([["q", b"a", "m1"], "q"], "PUBLISH_BATCH item 1 must be a list [queue, body, id, priority, options] (got str); nothing was stored"),
    ([["q", b"a", "m1"]] * (wire.MAX_PUBLISH_BATCH + 1),
     f"PUBLISH_BATCH carries {wire.MAX_PUBLISH_BATCH + 1} publishes; at most {wire.MAX_PUBLISH_BATCH} in one frame (send several)"),
])
def test_a_malformed_batch_is_refused_whole_and_stores_nothing(s, field, message):
    frame = [wire.OP_PUBLISH_BATCH, 9] + ([] if field is None else [field])
    assert handle(s, 1, frame, 0.0) == [wire.OP_ERROR, 9, "BAD_REQUEST", message]
    assert ready_ids(s, "q") == []
    assert s.take_records() == ()  # nothing for the log either


def test_a_failed_log_refuses_the_whole_batch(s):
    s.fail_log("disk full")
    assert handle(s, 1, batch(2, ["q", b"a", "m1"]), 0.0) == [wire.OP_ERROR, 2, "LOG_FAILED", "disk full"]
    assert ready_ids(s, "q") == []


good = st.tuples(st.sampled_from(["a", "b"]), st.binary(max_size=8)).map(lambda t: [t[0], t[1]])
bad = st.sampled_from([["a", "not bytes"], [7, b"x"], ["a", b"x", "", 0], ["a", b"x", None, -1],
                       ["a", b"x", None, 0, {"nope": 1}], [], ["a", b"x", None, 0, {"headers": 5}]])


@settings(max_examples=200)
@given(items=st.lists(st.tuples(st.booleans(), good, bad), min_size=1, max_size=30))
def test_exactly_the_good_items_are_stored_each_bad_one_answered_by_its_error(items):
    s = BrokerState()
    s.connect(1)
    s.enable_log()
    frame_items, want = [], []
    for i, (ok, g, b) in enumerate(items):
        if ok:
            frame_items.append(g + [f"id-{i}"])
        else:
            frame_items.append(b)
        want.append(ok)
    reply = handle(s, 1, [wire.OP_PUBLISH_BATCH, 1, frame_items], 0.0)
    results = reply[2] if reply[2] is not None else [item[2] for item in frame_items]
    assert len(results) == len(items)
    stored = [f"id-{i}" for i, ok in enumerate(want) if ok]
    for i, (ok, r) in enumerate(zip(want, results)):
        if ok:
            assert r == f"id-{i}"
        else:
            assert type(r) is list and r[0] == "BAD_REQUEST" and r[1].startswith(f"item {i}: "), r
    assert sorted(ready_ids(s, "a") + ready_ids(s, "b")) == sorted(stored)
    # one PUBLISH record per stored item, none for a refused one
    assert len(s.take_records()) == len(stored)


# --- grants --------------------------------------------------------------------------------------
def user(**grants):
    return auth.User("u", "x", {k: tuple(v) for k, v in grants.items()})


def test_a_batch_needs_publish_on_every_queue_it_names():
    f = batch(1, ["emails", b"a", "m1"], ["sms.1", b"b", "m2"], ["emails", b"c", "m3"])
    assert auth.required(f) == [("publish", "emails"), ("publish", "sms.1")]
    assert auth.check(user(publish=["emails", "sms.*"]), f) is None
    refusal = auth.check(user(publish=["emails"]), f)
    assert (refusal.kind, refusal.queue) == ("publish", "sms.1")
    assert auth.check(user(consume=["*"]), f).kind == "publish"


@pytest.mark.parametrize("field", [None, "x", [], [[1, b"x"]], [["q"] * 3] * (wire.MAX_PUBLISH_BATCH + 1)])
def test_a_malformed_batch_needs_publish_on_some_queue_and_reveals_nothing(field):
    f = [wire.OP_PUBLISH_BATCH, 1] + ([] if field is None else [field])
    assert ("publish", None) in auth.required(f)
    assert auth.check(user(consume=["*"]), f).kind == "publish"


def _log_of(s, rtype):
    from broker.state import log_records as R

    return [p for t, p in s.take_records() if t == getattr(R, rtype)]


def test_a_batch_is_dispatched_once_after_its_plain_items_in_order_with_one_deliver_record(s):
    # A consumer with credit waits: the batch's messages all reach it, in order, and the log
    # gets one DELIVER record for the batch, not one per message (hold_dispatch).
    s.connect(2)
    s.enable_log()
    s.consume(2, ["q"], 1000, 0.0)
    items = [["q", b"%d" % i, f"m{i}", 0, {"dedupe": f"k{i}"} if i % 2 else None] for i in range(100)]
    assert handle(s, 1, batch(3, *items), 1.0) == [wire.OP_OK, 3, None]
    got = [f[4] for f in s.take_outbox()[2] if f[0] == wire.OP_DELIVER]
    assert got == [f"m{i}" for i in range(100)]
    delivers = _log_of(s, "DELIVER")
    assert len(delivers) == 1 and len(delivers[0]) == 100


def test_a_batch_into_a_bounded_queue_with_a_waiting_consumer_refuses_nothing(s):
    # max_length counts what waits: with a consumer taking each message at once, a batch
    # larger than the bound is stored whole, as the same publishes one by one would be.
    s.connect(2)
    s.declare("tiny", {"max_length": 2}, 0.0)
    s.consume(2, ["tiny"], 1000, 0.0)
    items = [["tiny", b"x", f"m{i}", 0, None] for i in range(10)]
    assert handle(s, 1, batch(4, *items), 1.0) == [wire.OP_OK, 4, None]
    assert s.queues["tiny"].ready_count == 0 and s.queues["tiny"].rejected == 0


def test_an_item_with_options_sees_the_deliveries_of_the_items_before_it(s):
    # "until started" frees a unique key at the first delivery: the unique item after a plain
    # one in the same batch finds the earlier unique message delivered, as one by one.
    s.connect(2)
    s.consume(2, ["q"], 1000, 0.0)
    reply = handle(s, 1, batch(5, ["q", b"a", "u1", 0, {"unique_key": "k", "unique_until": "started"}],
                              ["q", b"b", "m2", 0, None],
                              ["q", b"c", "u3", 0, {"unique_key": "k", "unique_until": "started"}]), 1.0)
    assert reply[2][2] == {"id": "u3", "duplicate": False}, reply
    assert [f[4] for f in s.take_outbox()[2] if f[0] == wire.OP_DELIVER] == ["u1", "m2", "u3"]


# --- the plain items' run (BrokerState.publish_run) is PUBLISH one by one ----------------------
# Items a producer might send in one batch: plain ones (with and without a resend key, resends of
# an earlier key, priorities in and out of range), into a new queue, a bounded one, a packed
# backlog, and items that leave the run (options, no id, malformed).
run_item = st.one_of(
    st.builds(lambda q, b, i, p: [q, b, f"id-{i}", p, None],
              st.sampled_from(["a", "b", "new", "bounded"]), st.binary(max_size=4), st.integers(0, 40),
              st.sampled_from([0, 3, None, 255, 256, -1, "7"])),
    st.builds(lambda q, i, k: [q, b"k", f"id-{i}", 0, {"dedupe": f"key-{k}"}],
              st.sampled_from(["a", "b", "new", "bounded"]), st.integers(0, 40), st.integers(0, 5)),
    st.sampled_from([["a", b"x", "x-1", 0, {"dedupe": ""}], ["a", b"x", "x-2", 0, {"dedupe": "k", "ttl": 5}],
                     ["a", b"x", "x-3", 0, {"dedupe": "é"}], ["a", b"x", "", 0, None], ["a", b"x", "x" * 256, 0, None],
                     ["a", b"x"], ["a", b"x", "x-4", 0, {"ttl": 9}], ["a", "str", "x-5", 0, None], [],
                     ["bounded", b"x", "x-6", 1, {"dedupe": "key-1"}], ["a", b"x", "x-7", 0, {"dedupe": 5}]]),
)


QUEUES = ("a", "b", "new", "bounded")


def _fresh(backlog: int) -> BrokerState:
    s = BrokerState(boot_id="t")
    s.connect(1)
    s.enable_log()
    s.declare("bounded", {"max_length": 3, "overflow": "reject"}, 0.0)
    for i in range(backlog):  # past PACK_AFTER: "b" is packed
        s.publish(1, "b", b"old", f"old-{i}", 0, 0.0)
    s.take_records()
    return s


@settings(max_examples=100, deadline=None)
@given(items=st.lists(run_item, min_size=1, max_size=25), backlog=st.sampled_from([0, 300]))
def test_a_batch_stores_logs_and_answers_exactly_as_its_items_published_one_by_one(items, backlog):
    one, many = _fresh(backlog), _fresh(backlog)
    want = []
    for i, item in enumerate(items):
        reply = handle(one, 1, [wire.OP_PUBLISH, 100 + i, *item], 1.0)
        want.append(reply[2] if reply[0] == wire.OP_OK else [reply[2], f"item {i}: {reply[3]}"])
    reply = handle(many, 1, [wire.OP_PUBLISH_BATCH, 1, items], 1.0)
    assert reply[0] == wire.OP_OK
    got = reply[2] if reply[2] is not None else [item[2] for item in items]
    assert got == want
    if reply[2] is None:
        assert all(type(w) is str and w == item[2] for w, item in zip(want, items))
    assert many.take_records() == one.take_records()
    for name in QUEUES:
        assert ready_ids(many, name) == ready_ids(one, name)
    assert list(many.dedupe._keys.items()) == list(one.dedupe._keys.items())


@settings(max_examples=40, deadline=None)
@given(items=st.lists(run_item, min_size=1, max_size=25), backlog=st.sampled_from([0, 300]))
def test_a_batch_delivers_what_its_items_one_by_one_would_in_the_same_order(items, backlog):
    outs = []
    for batched in (False, True):
        s = _fresh(backlog)
        s.connect(2)
        s.consume(2, list(QUEUES), 1000, 0.0)  # credit for all: the order, not who waits, is compared
        s.take_outbox()
        if batched:
            handle(s, 1, [wire.OP_PUBLISH_BATCH, 1, items], 1.0)
        else:
            for i, item in enumerate(items):
                handle(s, 1, [wire.OP_PUBLISH, 100 + i, *item], 1.0)
        # the same messages, in order within each queue and priority (a bounded queue is dispatched
        # at once, the others after the batch's plain items, so a higher priority may go first:
        # hold_dispatch)
        by = {}
        for f in s.take_outbox().get(2, ()):
            if f[0] == wire.OP_DELIVER:
                # (an id the broker made holds its seq, which the DELIVER records between one-by-one
                # publishes move on)
                by.setdefault((f[3], f[6]), []).append("made" if f[4].startswith("t-") else f[4])
        outs.append((by, {n: sorted(ready_ids(s, n)) for n in QUEUES}))
        s.check_invariants()
    assert outs[0] == outs[1]
