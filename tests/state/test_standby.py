"""A hot standby (issue 16 item 1) and leadership terms (item 3), on BrokerState directly.

The leader is a BrokerState with its log on; its records, numbered as the log numbers them,
are fed to a standby a batch at a time.  The standby's queue depths must follow each batch
(without a replay), and promotion must leave the same state a full replay gives.
"""

from __future__ import annotations

import itertools

import cbor2
from hypothesis import given, settings, strategies as st

from broker.state import BrokerState
from broker.state import log_records as R
from broker.state.replay import epoch_end
from client.wire import OP_DELIVER

P, C = 1, 2


class Leader:
    def __init__(self):
        self.s = BrokerState()
        self.s.enable_log()
        self.s.connect(P)
        self.s.connect(C)
        self.lsn = itertools.count(1)
        self.log: list = []

    def take(self) -> list:
        """The records since the last take, as (lsn, type, payload) after a CBOR round trip."""
        out = [(next(self.lsn), t, cbor2.loads(cbor2.dumps(p))) for t, p in self.s.take_records()]
        self.log.extend(out)
        return out

    def delivered(self) -> list:
        return [f[2] for f in self.s.take_outbox().get(C, []) if f[0] == OP_DELIVER]


def depths(s: BrokerState) -> dict:
    return {q.name: (q.ready_count + q.inflight_count, q.delayed_count)
            for q in s.queues.values() if q.ready_count or q.inflight_count or q.delayed_count}


def test_standby_depths_follow_each_batch_and_promotion_equals_a_replay():
    lead = Leader()
    sb = BrokerState()
    sb.standby_begin()
    for i in range(10):
        lead.s.publish(P, "q", b"%d" % i, None, i % 3, 0.0)
    lead.s.publish(P, "later", b"x", None, 0, 0.0, delay=500)
    sb.standby_apply(lead.take(), 0.0)
    assert depths(sb) == {"q": (10, 0), "later": (0, 1)}
    assert sb.standby and not any(list(q.iter_ready()) for q in sb.queues.values())  # nothing placed yet
    lead.s.consume(C, ["q"], 4, 0.0)
    tags = lead.delivered()
    lead.s.ack(C, tags[:3], 0.0)
    lead.s.nack(C, tags[3], 0.0, requeue=True, delay=60)
    sb.standby_apply(lead.take(), 0.0)
    lead.s.result_set(P, "t-1", "SUCCESS", 42, None, 0.0)
    sb.standby_apply(lead.take(), 0.0)
    q = sb.queues["q"]  # 3 acked, 1 retried later, 4 more handed out for the freed slots
    assert (q.ready_count, q.delayed_count, q.inflight_count) == (2, 1, 4)
    replayed = BrokerState()
    replayed.replay(iter(lead.log), 0.0)
    sb.standby_finish(0.0)
    assert not sb.standby
    assert depths(sb) == depths(replayed)
    for name, q in replayed.queues.items():
        assert [m.body for m in sb.queues[name].iter_ready()] == [m.body for m in q.iter_ready()], name
    assert sb.results.keys() == replayed.results.keys() == {"t-1"}
    sb.check_invariants()


def leader_step(lead, held: list, op: str, n: int, i: int, mid) -> bool:
    """The ops both model tests share: p(ublish), d(elayed publish), a(ck), (nac)k, x (purge) on
    queue a or b by n; ``held`` the leader's consumer's unsettled tags.  False: not one of them."""
    q = "ab"[n % 2]
    if op == "p":
        lead.s.publish(P, q, b"%d" % i, mid, n, 0.0)
    elif op == "d":
        lead.s.publish(P, q, b"%d" % i, mid, n, 0.0, delay=100 + n)
    elif op == "a" and held:
        lead.s.ack(C, held.pop(0), 0.0)
    elif op == "k" and held:
        lead.s.nack(C, held.pop(0), 0.0, requeue=bool(n % 2))
    elif op == "x":
        lead.s.purge(q, 0.0)
    else:
        return False
    return True


@settings(max_examples=40, deadline=None)
@given(st.lists(st.tuples(st.sampled_from("pcakndx"), st.integers(0, 5)), max_size=40), st.integers(1, 7))
def test_standby_in_batches_equals_replay_whatever_the_ops_and_the_cut(ops, every):
    lead = Leader()
    lead.s.consume(C, ["a", "b"], 3, 0.0)
    sb = BrokerState()
    sb.standby_begin()
    held: list = []
    for i, (op, n) in enumerate(ops):
        held += lead.delivered()
        if leader_step(lead, held, op, n, i, None):
            pass
        elif op == "c":
            lead.s.compact(lead.s.last_lsn)
        if i % every == 0:
            sb.standby_apply(lead.take(), 0.0)
            replayed = BrokerState()
            replayed.replay(iter(lead.log), 0.0)
            # a replay holds in-flight deliveries as ready again; the standby counts them apart
            assert {k: v for k, v in depths(sb).items()} == depths(replayed)
    sb.standby_apply(lead.take(), 0.0)
    replayed = BrokerState()
    replayed.replay(iter(lead.log), 0.0)
    sb.standby_finish(0.0)
    assert depths(sb) == depths(replayed)
    sb.check_invariants()


def test_epoch_end_is_where_the_next_newer_term_began():
    terms = ((0, 1), (1, 50), (3, 80))
    assert epoch_end(terms, 0, 100) == 49
    assert epoch_end(terms, 1, 100) == 79
    assert epoch_end(terms, 2, 100) == 79  # a term this log never saw ends where the next newer began
    assert epoch_end(terms, 3, 100) == 100
    assert epoch_end(terms, 9, 100) == 100
    assert epoch_end((), 0, 7) == 7


def test_epoch_is_logged_replayed_and_kept_by_compaction():
    lead = Leader()
    lead.s.publish(P, "q", b"a", None, 0, 0.0)
    lsn = lead.s.begin_epoch(1)
    lead.s.publish(P, "q", b"b", None, 0, 0.0)
    assert lsn == 2 and lead.s.epoch == 1 and lead.s.epochs == ((1, 2),)
    recs = lead.take()
    assert (2, R.EPOCH, [1, 2]) in recs
    lead.s.begin_epoch(2)
    lead.s.compact(lead.s.last_lsn)
    recs = lead.take()
    # only the compacted records (a snapshot) still know both terms and where they began
    snap = [r for r in recs if r[0] > 3]
    again = BrokerState()
    again.replay(iter(snap), 0.0)
    assert again.epoch == 2 and again.epochs == ((1, 2), (2, 4))
    assert again.epoch_end(1) == 3


def live(s: BrokerState) -> list:
    return sorted((m.id, m.queue.name, m.body) for m in s.live_messages())


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.sampled_from("pcakndxgy"), st.integers(0, 5)), max_size=50), st.data())
def test_a_log_cut_anywhere_before_the_leaders_kept_start_replays_as_the_leaders_does(ops, data):
    """A follower deletes its segments before the first lsn its leader's log keeps, at its own
    segment boundaries: its log then starts anywhere at or before the leader's (broker/runtime/
    replication.py).  Replayed (or applied as a standby) from any such start, it must give the
    state the leader's kept log gives, and the whole log gives."""
    lead = Leader()
    lead.s.consume(C, ["a", "b"], 3, 0.0)
    kept = 1  # the first lsn the leader's log keeps
    held: list = []
    for i, (op, n) in enumerate(ops):
        held += lead.delivered()
        if leader_step(lead, held, op, n, i, f"m{i}"):
            pass
        elif op == "g":
            lead.s.result_set(P, f"t{i}", "SUCCESS", i, None, 0.0)
        elif op == "y":
            lead.s.checkpoint()
        elif op == "c" and lead.s.last_lsn >= kept:
            # compaction of the oldest segment, kept..through; it is deleted once the copies are written
            through = min(kept + n * 3, lead.s.last_lsn)
            lead.s.compact(through)
            lead.take()
            kept = through + 1
        lead.take()
    truth = BrokerState()
    truth.replay(iter(lead.log), 0.0)
    start = data.draw(st.integers(1, kept), label="the follower's log starts at")
    tail = [r for r in lead.log if r[0] >= start]
    replayed = BrokerState()
    replayed.replay(iter(tail), 0.0)
    assert live(replayed) == live(truth) and depths(replayed) == depths(truth)
    assert replayed.results.keys() == truth.results.keys()
    sb = BrokerState()
    sb.standby_begin()
    sb.standby_apply(iter(tail), 0.0)
    sb.standby_finish(0.0)
    assert live(sb) == live(truth) and depths(sb) == depths(truth)
    sb.check_invariants()
