"""Exchanges and bindings in the broker state (broker/state/exchanges.py): routing, temporary
queues and bindings, the log (replay and compaction), and hostile values.  No sockets."""

import re

import cbor2
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from broker.errors import BadRequest, PreconditionFailed, StaleDelivery
from broker.handlers.admin import execute
from broker.handlers.binary import handle
from broker.state import BrokerState
from broker.state import exchanges as X
from broker.state.exchanges import topic_match
from client.wire import OP_BIND, OP_DELIVER, OP_EMIT

P, W1, W2, W3 = 1, 2, 3, 4  # connection ids


@pytest.fixture
def s():
    st_ = BrokerState()
    for c in (P, W1, W2, W3):
        st_.connect(c)
    return st_


def ready(s, name):
    q = s.queues.get(name)
    return [m.body for m in q.iter_ready()] if q else None


def replayed(s, records=None):
    recs = s.take_records() if records is None else records
    fresh = BrokerState()
    fresh.replay([(i + 1, t, cbor2.loads(cbor2.dumps(p))) for i, (t, p) in enumerate(recs)], 100.0)
    return fresh


# -- routing -----------------------------------------------------------------------------
def test_fanout_copies_one_emit_into_every_bound_queue_once(s):
    for q in ("a.pidbox", "b.pidbox", "c.pidbox"):
        assert s.bind(W1, "celery.pidbox", q, "", "fanout") is True
    s.bind(W1, "celery.pidbox", "a.pidbox", "other-key", "fanout")  # a second binding: still one copy
    reply = s.emit(P, "celery.pidbox", "whatever", b"ping", "m1", 3, 0.0)
    assert reply == {"id": "m1", "queues": 3}
    for q in ("a.pidbox", "b.pidbox", "c.pidbox"):
        assert ready(s, q) == [b"ping"]
        assert s.queues[q].iter_ready().__next__().priority == 3


def test_direct_routes_by_exact_key_and_unroutable_is_dropped_with_zero(s):
    s.bind(W1, "reply.celery.pidbox", "r1", "r1")
    s.bind(W1, "reply.celery.pidbox", "r2", "r2")
    assert s.emit(P, "reply.celery.pidbox", "r2", b"x", None, 0, 0.0)["queues"] == 1
    assert ready(s, "r1") == [] and ready(s, "r2") == [b"x"]
    assert s.emit(P, "reply.celery.pidbox", "r3", b"y", None, 0, 0.0) == {"id": None, "queues": 0}
    assert s.emit(P, "no-such-exchange", "k", b"y", None, 0, 0.0)["queues"] == 0


def test_emit_copies_share_one_generated_id(s):
    s.bind(W1, "fan", "q1", "", "fanout")
    s.bind(W1, "fan", "q2", "", "fanout")
    mid = s.emit(P, "fan", "", b"b", None, 0, 0.0)["id"]
    assert [m.id for m in s.queues["q1"].iter_ready()] == [mid] == [m.id for m in s.queues["q2"].iter_ready()]


def test_topic_hash_gets_every_event_and_star_one_word(s):
    s.bind(W1, "celeryev", "flower", "#", "topic")
    s.bind(W1, "celeryev", "tasks", "task.*", "topic")
    s.bind(W1, "celeryev", "beats", "*.heartbeat", "topic")
    for key in ("worker.heartbeat", "task.succeeded", "task.a.b", ""):
        s.emit(P, "celeryev", key, key.encode(), None, 0, 0.0)
    assert ready(s, "flower") == [b"worker.heartbeat", b"task.succeeded", b"task.a.b", b""]
    assert ready(s, "tasks") == [b"task.succeeded"]
    assert ready(s, "beats") == [b"worker.heartbeat"]


def test_topic_answer_is_forgotten_when_bindings_change(s):
    s.bind(W1, "ev", "q1", "task.*", "topic")
    assert s.emit(P, "ev", "task.x", b"1", None, 0, 0.0)["queues"] == 1  # cached now
    s.bind(W1, "ev", "q2", "#", "topic")
    assert s.emit(P, "ev", "task.x", b"2", None, 0, 0.0)["queues"] == 2
    s.unbind(W1, "ev", "q1", "task.*")
    assert s.emit(P, "ev", "task.x", b"3", None, 0, 0.0)["queues"] == 1


def reference_match(pattern: str, key: str) -> bool:
    """A second, obviously-right matcher: a regex built word by word (fine for tests)."""
    parts = pattern.split(".") if pattern else []
    rx = ""
    for w in parts:
        if w == "#":
            rx += r"(?:\.[^.]*)*"  # zero or more words
        elif w == "*":
            rx += r"\.[^.]*"
        else:
            rx += r"\." + re.escape(w)
    return re.fullmatch(rx, "." + key if key else "") is not None


words = st.sampled_from(["a", "b", "task", "*", "#"])
keys = st.lists(st.sampled_from(["a", "b", "task", "c"]), max_size=6).map(".".join)


@settings(max_examples=400, deadline=None)
@given(st.lists(words, max_size=6), keys)
def test_topic_matching_agrees_with_a_reference_matcher(pattern_words, key):
    pattern = ".".join(pattern_words)
    got = topic_match(tuple(pattern_words), tuple(key.split(".")) if key else ())
    assert got == reference_match(pattern, key), (pattern, key)


def reference_route(kind: str, bindings: set, key: str) -> set:
    """Which queues get a copy, straight from the definition: scan every binding."""
    if kind == "fanout":
        return {q for q, _ in bindings}
    if kind == "direct":
        return {q for q, k in bindings if k == key}
    return {q for q, k in bindings if reference_match(k, key)}


ops = st.lists(st.tuples(st.booleans(), st.sampled_from(["q1", "q2", "q3"]),
                         st.lists(words, min_size=1, max_size=3).map(".".join)), max_size=25)


@settings(max_examples=150, deadline=None)
@given(st.sampled_from(["direct", "fanout", "topic"]), ops, st.lists(keys, min_size=1, max_size=5))
def test_routing_after_any_binds_and_unbinds_agrees_with_scanning_every_binding(kind, steps, emit_keys):
    s = BrokerState()
    s.connect(W1)
    model: set = set()
    for is_bind, queue, key in steps:
        if kind != "topic":
            key = key.replace("*", "star").replace("#", "hash")  # plain keys outside topic
        if is_bind:
            s.bind(W1, "ex", queue, key, kind)
            model.add((queue, key))
        else:
            assert s.unbind(W1, "ex", queue, key) == ((queue, key) in model)
            model.discard((queue, key))
        for k in emit_keys:  # interleaved, so a stale cached answer would show
            assert set(s.route("ex", k)) == reference_route(kind, model, k), (kind, model, k)
    assert ("ex" in s.exchanges) == bool(model)
    assert s.binding_count == len(model)


def test_reference_matcher_sanity():
    assert reference_match("#", "") and reference_match("#", "a.b") and reference_match("a.#", "a")
    assert not reference_match("*", "") and not reference_match("a.*", "a") and reference_match("#.b", "b")


def test_type_clash_is_refused_by_name_and_changes_nothing(s):
    s.bind(W1, "celeryev", "q", "#", "topic")
    with pytest.raises(PreconditionFailed, match=r"exchange 'celeryev' exists with type 'topic'; bind with type 'topic'"):
        s.bind(W1, "celeryev", "q2", "", "fanout")
    assert "q2" not in s.queues and len(s.exchanges["celeryev"].bindings) == 1


def test_exchange_lives_while_it_has_bindings_and_unbind_answers_whether_it_existed(s):
    s.bind(W1, "ex", "q", "k")
    assert s.bind(W1, "ex", "q", "k") is False  # idempotent
    assert s.unbind(W1, "ex", "q", "k") is True
    assert "ex" not in s.exchanges and "q" in s.queues
    assert s.unbind(W1, "ex", "q", "k") is False


def test_deleting_a_queue_removes_its_bindings(s):
    s.bind(W1, "fan", "q1", "", "fanout")
    s.bind(W1, "fan", "q2", "", "fanout")
    s.delete("q1", 0.0)
    assert s.emit(P, "fan", "", b"x", None, 0, 0.0)["queues"] == 1


def test_a_full_queue_gets_no_copy_and_the_others_still_do(s):
    s.declare("small", {"max_length": 1}, 0.0)
    s.bind(W1, "fan", "small", "", "fanout")
    s.bind(W1, "fan", "big", "", "fanout")
    s.emit(P, "fan", "", b"1", None, 0, 0.0)
    assert s.emit(P, "fan", "", b"2", "m2", 0, 0.0) == {"id": "m2", "queues": 1, "full": ["small"]}
    assert ready(s, "big") == [b"1", b"2"] and ready(s, "small") == [b"1"]


# -- temporary bindings and queues -----------------------------------------------------------
def test_a_temporary_binding_dies_with_its_connection_and_the_queue_stays(s):
    s.declare("celeryev.flower", None, 0.0)
    s.bind(W1, "celeryev", "celeryev.flower", "#", "topic", temporary=True)
    assert s.emit(P, "celeryev", "task.sent", b"e", None, 0, 0.0)["queues"] == 1
    s.disconnect(W1, 1.0)
    assert "celeryev" not in s.exchanges
    assert s.emit(P, "celeryev", "task.sent", b"e", None, 0, 1.0)["queues"] == 0
    assert ready(s, "celeryev.flower") == [b"e"]


def test_a_temporary_queue_goes_with_its_messages_and_bindings_when_its_owner_closes(s):
    s.declare("w1.celery.pidbox", None, 0.0, temporary_owner=W1)
    s.bind(W1, "celery.pidbox", "w1.celery.pidbox", "", "fanout")
    s.bind(W2, "celery.pidbox", "w2.celery.pidbox", "", "fanout", temporary=True)  # created temporary
    assert s.queues["w2.celery.pidbox"].owner == W2
    s.emit(P, "celery.pidbox", "", b"ping", None, 0, 0.0)
    s.disconnect(W1, 1.0)
    assert "w1.celery.pidbox" not in s.queues
    assert [q for q, _ in s.exchanges["celery.pidbox"].bindings] == ["w2.celery.pidbox"]
    s.disconnect(W2, 1.0)
    assert "w2.celery.pidbox" not in s.queues and not s.exchanges
    s.check_invariants()


def test_a_consumer_on_another_connection_is_cancelled_and_its_delivery_withdrawn(s):
    s.declare("tmp", None, 0.0, temporary_owner=W1)
    s.publish(P, "tmp", b"m1", None, 0, 0.0)
    s.publish(P, "tmp", b"m2", None, 0, 0.0)
    s.publish(P, "other", b"o", None, 0, 0.0)
    s.consume(W2, ["tmp"], 1, 0.0)
    ctag3 = s.consume(W3, ["tmp", "other"], 1, 0.0)
    frames = s.take_outbox()
    (d2,) = [f for f in frames[W2] if f[0] == OP_DELIVER]
    (d3,) = [f for f in frames[W3] if f[0] == OP_DELIVER]
    assert (d2[5], d3[5]) == (b"m1", b"m2")
    s.disconnect(W1, 1.0)
    assert not s.conns[W2].consumers  # consumed only tmp: cancelled
    with pytest.raises(StaleDelivery):
        s.ack(W2, d2[2], 1.0)
    c3 = s.conns[W3].consumers[ctag3]
    assert [q.name for q in c3.queues] == ["other"]  # keeps its other queue
    # its tmp delivery was withdrawn, so its credit went to the other queue at once
    assert [f[5] for f in s.take_outbox().get(W3, []) if f[0] == OP_DELIVER] == [b"o"]
    s.check_invariants()


def test_a_temporary_queue_leaves_no_lasting_dead_letter_queue_behind(s):
    s.declare("r.reply", {"max_attempts": 1}, 0.0, temporary_owner=W1)
    s.publish(P, "r.reply", b"m", None, 0, 0.0)
    s.consume(W2, ["r.reply"], 1, 0.0)
    (d,) = [f for f in s.take_outbox()[W2] if f[0] == OP_DELIVER]
    s.nack(W2, d[2], 0.0, requeue=False)
    assert "r.reply.dlq" not in s.queues and s.queues["r.reply"].dead_lettered == 1


def test_declaring_temporary_over_a_lasting_queue_or_anothers_is_refused(s):
    s.declare("lasting", None, 0.0)
    with pytest.raises(PreconditionFailed, match=r"already exists as a lasting queue"):
        s.declare("lasting", None, 0.0, temporary_owner=W1)
    s.declare("mine", None, 0.0, temporary_owner=W1)
    s.declare("mine", None, 0.0, temporary_owner=W1)  # again, same owner: fine
    with pytest.raises(PreconditionFailed, match=r"temporary queue of another connection"):
        s.declare("mine", None, 0.0, temporary_owner=W2)
    with pytest.raises(PreconditionFailed):
        s.declare("mine", None, 0.0)


def test_temporary_and_lasting_binding_of_the_same_key_clash(s):
    s.bind(W1, "ex", "q", "k")
    with pytest.raises(PreconditionFailed, match=r"already bound to 'ex' with key 'k' as a lasting binding"):
        s.bind(W1, "ex", "q", "k", temporary=True)


# -- the log ---------------------------------------------------------------------------------
def test_lasting_bindings_survive_replay_and_temporary_ones_and_queues_do_not(s):
    s.enable_log()
    s.bind(W1, "celeryev", "events", "task.*", "topic")
    s.bind(W1, "fan", "a", "", "fanout")
    s.bind(W1, "fan", "b", "", "fanout")
    s.unbind(W1, "fan", "b", "")
    s.bind(W2, "fan", "tmpq", "", "fanout", temporary=True)  # a temporary queue with a message in it
    s.bind(W2, "fan", "a", "x", "fanout", temporary=True)
    s.emit(P, "fan", "", b"m", None, 0, 0.0)
    fresh = replayed(s)  # a crash: W2 never closed, yet the restart has no temporary anything
    assert "tmpq" not in fresh.queues
    assert {k: dict(v.bindings) for k, v in fresh.exchanges.items()} == {
        "celeryev": {("events", "task.*"): None}, "fan": {("a", ""): None}}
    assert fresh.emit(P, "celeryev", "task.ok", b"e", None, 0, 100.0)["queues"] == 1
    assert ready(fresh, "a") == [b"m"]


def test_compaction_carries_bindings_and_drops_nothing_needed(s):
    s.enable_log()
    s.bind(W1, "celeryev", "events", "#", "topic")
    s.declare("tmp", None, 0.0, temporary_owner=W1)
    s.take_records()  # these segments are about to be deleted
    through = s.last_lsn
    s.compact(through)
    fresh = replayed(s)
    assert dict(fresh.exchanges["celeryev"].bindings) == {("events", "#"): None}
    assert fresh.exchanges["celeryev"].kind == "topic" and "tmp" not in fresh.queues


def test_a_queue_deleted_while_temporary_was_open_is_gone_after_replay_and_redeclaring_lasting_keeps_it(s):
    s.enable_log()
    s.declare("q", None, 0.0, temporary_owner=W1)
    s.disconnect(W1, 1.0)
    s.declare("q", None, 1.0)  # a lasting queue of the same name afterwards
    s.publish(P, "q", b"keep", None, 0, 1.0)
    fresh = replayed(s)
    assert ready(fresh, "q") == [b"keep"]


# -- hostile values and bounds -------------------------------------------------------------
@pytest.mark.parametrize("key, match", [
    ("a..b", r"topic pattern 'a..b' has an empty word"),
    (".a", r"has an empty word"),
    ("task*", r"'\*' and '#' stand for whole words"),
    ("x" * 256, r"a binding key is longer than 255 bytes"),
])
def test_bad_topic_patterns_are_refused_by_name(s, key, match):
    with pytest.raises(BadRequest, match=match):
        s.bind(W1, "ev", "q", key, "topic")
    assert "ev" not in s.exchanges and "q" not in s.queues


def test_bad_type_and_names_are_refused_by_name(s):
    with pytest.raises(BadRequest, match=r"exchange type must be one of direct, fanout, topic \(got 'headers'\)"):
        s.bind(W1, "ex", "q", "", "headers")
    with pytest.raises(BadRequest, match=r"an exchange name must be a non-empty text string"):
        s.bind(W1, "", "q", "", "direct")
    with pytest.raises(BadRequest, match=r"exchange name 'a b' contains spaces"):
        s.emit(P, "a b", "", b"", None, 0, 0.0)
    with pytest.raises(BadRequest, match=r"a routing key is longer than 255 bytes"):
        s.emit(P, "ex", "k" * 300, b"", None, 0, 0.0)


def test_one_connection_cannot_hold_more_than_the_temporary_bound(s, monkeypatch):
    monkeypatch.setattr(X, "MAX_TEMPORARY_PER_CONN", 50)
    for i in range(25):
        s.bind(W1, "fan", f"q{i}", "", "fanout", temporary=True)
    # 25 bindings + 25 temporary queues they created: the bound is reached
    with pytest.raises(BadRequest, match=r"this connection holds 50 temporary bindings and queues"):
        s.bind(W1, "fan", "one-more", "", "fanout", temporary=True)
    s.disconnect(W1, 1.0)  # undone in one go
    assert not s.exchanges and not any(n.startswith("q") for n in s.queues)


def test_ten_to_the_five_bindings_from_one_connection_stop_at_the_exchange_bound(s):
    s.declare("target", None, 0.0)
    n = 0
    with pytest.raises(BadRequest, match=r"exchange 'ev' has 10000 bindings, the most one exchange may hold"):
        for n in range(100_000):
            s.bind(W1, "ev", "target", f"k{n}", "direct")
    assert n == X.MAX_BINDINGS_PER_EXCHANGE
    assert s.emit(P, "ev", "k5", b"x", None, 0, 0.0)["queues"] == 1  # still routes in one look-up


def test_distinct_topic_patterns_are_bounded_but_more_queues_on_one_pattern_are_not(s, monkeypatch):
    monkeypatch.setattr(X, "MAX_TOPIC_PATTERNS", 5)
    for i in range(5):
        s.bind(W1, "ev", f"q{i}", f"app.{i}.#", "topic")
    with pytest.raises(BadRequest, match=r"topic exchange 'ev' has 5 distinct patterns"):
        s.bind(W1, "ev", "q9", "app.9.#", "topic")
    s.bind(W1, "ev", "q9", "app.1.#", "topic")  # a pattern it has: fine
    assert s.emit(P, "ev", "app.1.x", b"e", None, 0, 0.0)["queues"] == 2


def test_broker_wide_binding_bound(s, monkeypatch):
    monkeypatch.setattr(X, "MAX_BINDINGS", 3)
    for i in range(3):
        s.bind(W1, f"ex{i}", "q", "", "fanout")
    with pytest.raises(BadRequest, match=r"brokerd holds 3 bindings, the most it keeps"):
        s.bind(W1, "ex9", "q", "", "fanout")


# -- handlers and admin lines -----------------------------------------------------------------
def test_frames_with_hostile_values_get_bad_request_naming_the_field(s):
    f = handle(s, W1, [OP_BIND, 1, "ex", "q", "", {"type": "fanout", "durable": True}], 0.0)
    assert f[2:] == ["BAD_REQUEST", "unknown BIND option 'durable'; known options: type, temporary"]
    f = handle(s, W1, [OP_BIND, 2, "ex", "q", 7], 0.0)
    assert f[2] == "BAD_REQUEST" and "BIND field 4 (key) must be text" in f[3]
    f = handle(s, W1, [OP_BIND, 3, "ex", "q", "", {"temporary": "yes"}], 0.0)
    assert f[3] == "BIND option 'temporary' must be true or false"
    f = handle(s, P, [OP_EMIT, 4, "ex", "k", "not bytes"], 0.0)
    assert f[2] == "BAD_REQUEST" and "EMIT field 4 (body) must be byte string" in f[3]
    f = handle(s, P, [OP_EMIT, 5, "ex", "k", b"b", None, 999], 0.0)
    assert f[3] == "EMIT field 6 (priority) must be a whole number from 0 to 255 (got 999)"
    assert not s.exchanges and "q" not in s.queues


def test_exchanges_and_bindings_admin_lines(s):
    s.bind(W1, "celery.pidbox", "w1.pidbox", "", "fanout", temporary=True)
    s.bind(W1, "celeryev", "ev", "#", "topic")
    out = execute(s, "EXCHANGES", 0.0).splitlines()
    assert out[0] == "OK 2 exchanges" and out[-1] == "END"
    assert out[2].split() == ["celery.pidbox", "fanout", "1", "1", "1"]
    assert out[3].split() == ["celeryev", "topic", "1", "0", "1"]
    out = execute(s, "BINDINGS celery.pidbox", 0.0).splitlines()
    assert out[0] == "OK 1 binding of fanout exchange celery.pidbox"
    assert out[2].split() == ["w1.pidbox", "-", "yes"]
    assert execute(s, "BINDINGS nope", 0.0).startswith("ERR NOT_FOUND no exchange named 'nope'")
    assert execute(s, "BINDINGS", 0.0).startswith("ERR BAD_REQUEST usage: BINDINGS <exchange>")
