"""The frozen views the HTTP side and the page read (broker.handlers.views).

A view is a copy: it cannot be changed, and it does not change when the state does."""

import dataclasses

import pytest

from broker.errors import BrokerError
from broker.handlers import views
from broker.state import BrokerState
from client.wire import OP_DELIVER

P, C = 1, 2  # connection ids


@pytest.fixture
def s():
    st = BrokerState()
    for c in (P, C):
        st.connect(c)
    return st


def test_queue_views_are_frozen_snapshots(s):
    s.publish(P, "a", b"x", None, 0, 0.0)
    (stats,) = views.queue_statistics(s, views.queue_names(s), 1.0)
    view = views.queue_view(s, "a", 1.0)
    totals = views.queue_totals(s)
    s.publish(P, "a", b"y", None, 0, 0.0)
    assert (stats.ready, view.stats.ready, totals.ready, totals.published) == (1, 1, 1, 1)
    assert views.queue_view(s, "a", 1.0).stats.ready == 2
    with pytest.raises(dataclasses.FrozenInstanceError):
        view.dead_letter_queue = "elsewhere"


def test_a_piece_of_names_leaves_out_a_queue_deleted_since_the_names_were_taken(s):
    for name in ("a", "b", "c"):
        s.publish(P, name, b"x", None, 0, 0.0)
    names = views.queue_names(s)
    s.delete("b", 0.0)
    assert [st.name for st in views.queue_statistics(s, names, 0.0)] == ["a", "c"]
    assert views.queue_view(s, "b", 0.0) is None
    assert views.queue_count(s) == 2


def test_backlogs_and_counters_are_plain_copies(s):
    s.publish(P, "emails", b"x", None, 0, 0.0)
    s.publish(P, "sms", b"x", None, 0, 0.0)
    s.consume(C, ["emails"], 1, 0.0)
    assert sorted(views.queue_backlogs(s)) == [(1, "emails"), (1, "sms")]
    assert views.queue_backlogs(s, "mail") == [(1, "emails")]
    counters = views.queue_counters(s)
    assert counters == {"emails": (1, 0), "sms": (1, 0)}
    assert views.queue_counters(s, ["sms", "gone"]) == {"sms": (1, 0)}
    s.publish(P, "sms", b"y", None, 0, 0.0)
    assert counters["sms"] == (1, 0)


def test_dead_letters_are_copied_out_of_the_dead_letter_queue(s):
    s.publish(P, "q", b"bad", None, 0, 0.0)
    s.consume(C, ["q"], 1, 0.0)
    (d,) = [f for f in s.take_outbox()[C] if f[0] == OP_DELIVER]
    s.nack(C, d[2], 0.0, requeue=False)
    view = views.dead_letters(s, "q", 10, 100)
    assert (view.queue, view.dead_letter_queue, view.total) == ("q", "q.dlq", 1)
    (m,) = view.messages
    assert m.body == b"bad" and m.headers["x-dead-from"] == "q"
    m.headers["x-dead-from"] = "changed"  # the view's headers are its own copy
    assert s.peek("q.dlq")[0].headers["x-dead-from"] == "q"
    assert views.dead_letters(s, "q", 0, 100).messages == ()
    with pytest.raises(BrokerError, match="does not exist"):
        views.dead_letters(s, "nope", 10, 100)


def test_results_are_read_as_views_and_expired_ones_are_not_shown(s):
    s.result_set(P, "t1", "SUCCESS", 1, None, 0.0, ttl=10)
    s.result_set(P, "t2", "FAILURE", 2, None, 1.0, ttl=100)
    r = views.result(s, "t1", 5.0)
    assert (r.id, r.state, r.value, r.updated) == ("t1", "SUCCESS", 1, 0.0)
    assert views.result(s, "t1", 50.0) is None  # expired
    assert [v.id for v in views.results_without_events(s, 5.0, None, set(), 10)] == ["t2", "t1"]
    assert [v.id for v in views.results_without_events(s, 5.0, "SUCCESS", set(), 10)] == ["t1"]
    assert [v.id for v in views.results_without_events(s, 5.0, None, {"t2"}, 10)] == ["t1"]
    assert views.results_without_events(s, 5.0, None, set(), 0) == []
    with pytest.raises(dataclasses.FrozenInstanceError):
        r.value = 3
