"""RECALL and RELEASE (protocol.md §5.42-5.44) against a model of the workers.

Three consumers of one queue declare ``slots``; each is driven like a worker: it starts at most
``slots`` of the deliveries it holds, acks started ones, and answers every RECALL by releasing up
to ``n`` it has not started.  Deliveries, starts, acks, credit changes, clock ticks and recalls
interleave as hypothesis pleases.  After every step:

* a RECALL never asks for more than the consumer holds unstarted (so an honest worker never has to
  give back a started delivery), and a release never took a started one;
* no message is lost or duplicated: each published id is ready in the broker, held by exactly one
  consumer, or acked;
* a released delivery does not count as an attempt (its next DELIVER carries the same attempts);
* once RECALL_INTERVAL has passed, no consumer sits idle (a free slot, nothing ready) while
  another holds more than it can start;
* no message is handed to a consumer beyond its slots while another consumer of its queue has a
  free slot (holds fewer than its slots and its prefetch): checked after every broker call from the
  deliveries that call made (a consumer's count only grows while the broker hands out, so one
  that ends the call with a free slot had it when the other got the message).
"""

import hypothesis.strategies as st
from hypothesis import settings
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

from broker.state import BrokerState
from broker.state.core import RECALL_INTERVAL
from client.wire import OP_DELIVER, OP_RECALL

CONNS = {1: 1, 2: 2, 3: 1}  # conn -> slots


class RecallMachine(RuleBasedStateMachine):
    def __init__(self):
        super().__init__()
        self.s = BrokerState()
        self.now = 0.0
        self.n = 0
        self.held = {c: {} for c in CONNS}  # conn -> tag -> [id, started]
        self.ctag = {}
        self.acked = set()
        self.published = set()
        self.counted = {}  # id -> deliveries that counted (not released)
        self.recalls = 0
        self.pending = []  # RECALLs received, not answered yet: (conn, n)
        self.s.declare("q", {"max_attempts": None}, 0.0)  # give_back may nack a message any number of times
        for conn, slots in CONNS.items():
            self.s.connect(conn)
            self.ctag[conn] = self.s.consume(conn, ["q"], slots * 3, 0.0, {"slots": slots})
        self.absorb()

    def absorb(self, before=None):
        """Take the broker's frames as the workers would, until it has nothing more to say.
        ``before``: the counts just before the broker call that made them (``snapshot``)."""
        box = self.s.take_outbox()
        frames = [(conn, f) for conn, fs in box.items() for f in fs]
        if before is not None:
            self.no_surplus_beside_a_free_slot(before, frames)
        for conn, f in frames:
            if f[0] == OP_DELIVER:
                tag, mid, attempts = f[2], f[4], f[7]
                assert all(mid not in {v[0] for v in h.values()} for h in self.held.values()), f"{mid} held twice"
                assert mid not in self.acked, f"{mid} delivered after its ack"
                assert attempts == self.counted.get(mid, 0) + 1, (mid, attempts, self.counted.get(mid))
                self.counted[mid] = attempts
                self.held[conn][tag] = [mid, False]
            elif f[0] == OP_RECALL:
                _, ctag, n, queue = f
                assert ctag == self.ctag[conn] and queue == "q" and n >= 1
                unstarted = [t for t, (_, started) in self.held[conn].items() if not started]
                assert n <= len(unstarted), f"RECALL of {n} to a consumer with {len(unstarted)} not started"
                self.recalls += 1
                self.pending.append((conn, n))  # answered by the rule `answer`, as a worker would, later

    @rule()
    def answer(self):
        """The oldest RECALL not answered yet: release up to n deliveries not started (the worker may
        have started some meanwhile; none left: it sends nothing)."""
        if not self.pending:
            return
        conn, n = self.pending.pop(0)
        give = [t for t, (_, started) in self.held[conn].items() if not started][-n:]
        if not give:
            return
        for t in give:
            mid = self.held[conn].pop(t)[0]
            self.counted[mid] -= 1  # a release is not an attempt
        before = self.snapshot()
        assert self.s.release(conn, give, self.now) == len(give)
        self.absorb(before)

    def snapshot(self):
        """What each consumer holds, and its prefetch, just before a broker call."""
        pre = {c.conn: c.prefetch for c in self.s.queues["q"].consumers}
        return {conn: (len(self.held[conn]), pre.get(conn, 0)) for conn in CONNS}

    def no_surplus_beside_a_free_slot(self, before, frames):
        got = dict.fromkeys(CONNS, 0)
        for conn, f in frames:
            if f[0] == OP_DELIVER:
                got[conn] += 1
        pre = {c.conn: c.prefetch for c in self.s.queues["q"].consumers}
        for x in CONNS:
            if got[x] and before[x][0] + got[x] > CONNS[x]:
                for y in CONNS:
                    end = before[y][0] + got[y]
                    if y != x and y in pre and end < min(CONNS[y], pre[y]):
                        raise AssertionError(
                            f"conn {x} got {got[x]} (held {before[x][0]}, {CONNS[x]} slots) while conn {y} had a "
                            f"free slot (holds {end} of {CONNS[y]} slots, prefetch {pre[y]})")

    @rule(k=st.integers(1, 6))
    def publish(self, k):
        before = self.snapshot()
        for _ in range(k):
            self.n += 1
            mid = f"m{self.n}"
            self.published.add(mid)
            self.s.publish(0, "q", b"x", mid, 0, self.now)
        self.absorb(before)

    @rule(conn=st.sampled_from(sorted(CONNS)))
    def start(self, conn):
        running = sum(1 for v in self.held[conn].values() if v[1])
        for v in self.held[conn].values():
            if not v[1] and running < CONNS[conn]:
                v[1] = True
                return

    @rule(conn=st.sampled_from(sorted(CONNS)))
    def finish(self, conn):
        for tag, (mid, started) in list(self.held[conn].items()):
            if started:
                del self.held[conn][tag]
                self.acked.add(mid)
                before = self.snapshot()
                self.s.ack(conn, tag, self.now)
                self.absorb(before)
                return
        self.absorb()

    @rule(conn=st.sampled_from(sorted(CONNS)))
    def give_back(self, conn):
        """A started task NACKed with requeue (a worker's Reject(requeue=True)): it counts, and
        goes back to the queue."""
        for tag, (mid, started) in list(self.held[conn].items()):
            if started:
                del self.held[conn][tag]
                before = self.snapshot()
                self.s.nack(conn, tag, self.now)
                self.absorb(before)
                return

    @rule(conn=st.sampled_from(sorted(CONNS)), mult=st.integers(1, 8))
    def credit(self, conn, mult):
        before = self.snapshot()
        self.s.set_prefetch(conn, self.ctag[conn], CONNS[conn] * mult, self.now)
        self.absorb(before)

    @rule(dt=st.sampled_from([0.01, RECALL_INTERVAL / 2, RECALL_INTERVAL]))
    def wait(self, dt):
        self.now += dt
        before = self.snapshot()
        self.s.tick(self.now)
        self.absorb(before)

    @rule()
    def settle(self):
        """Let RECALL_INTERVAL pass twice: nobody may then be idle beside a holder of surplus."""
        for _ in range(2):
            while self.pending:
                self.answer()
            self.now += RECALL_INTERVAL
            before = self.snapshot()
            self.s.tick(self.now)
            self.absorb(before)
        while self.pending:
            self.answer()
        q = self.s.queues["q"]
        if q.ready_count:
            return
        idle = [c for c in CONNS if len(self.held[c]) < CONNS[c]]
        surplus = [c for c in CONNS if len(self.held[c]) > CONNS[c]]
        assert not (idle and surplus), (idle, surplus, {c: len(h) for c, h in self.held.items()})

    @invariant()
    def nothing_lost_or_doubled(self):
        q = self.s.queues["q"]
        ready = [m.id for m in q.iter_ready()]
        held = [v[0] for h in self.held.values() for v in h.values()]
        everything = ready + held + list(self.acked)
        assert len(everything) == len(set(everything)), "a message is in two places"
        assert set(everything) == self.published, self.published ^ set(everything)
        self.s.check_invariants()


TestRecall = RecallMachine.TestCase
TestRecall.settings = settings(max_examples=150, stateful_step_count=40, deadline=None)


def test_the_model_sees_recalls():
    """The machine above must exercise RECALL, or its checks prove nothing: one plain run."""
    m = RecallMachine()
    m.publish(6)  # prefetch 3 + 6 + 3: each gets its slots (1, 2, 1) and a surplus
    m.publish(6)
    m.wait(RECALL_INTERVAL)  # past the scans each consumer made when it started (nothing to ask then)
    m.start(1)
    for _ in range(6):  # conn 2 runs all it holds: then it is idle beside conn 1's surplus
        m.start(2)
        m.finish(2)
    assert m.recalls >= 1
    m.settle()  # asked again once RECALL_INTERVAL passed: conn 1 keeps only what it started
    assert list(m.held[1].values()) == [["m1", True]], m.held[1]
    m.nothing_lost_or_doubled()


def test_released_messages_go_to_free_slots_not_past_the_first_idle_consumers_slots():
    """Found by reading release(): an idle consumer that did not ask (conn 1, one slot, credit 3)
    came first in the queue's list and took both messages conn 3 released for the one that asked
    (conn 2, two free slots): one past its slot, while conn 2 stayed idle."""
    m = RecallMachine()
    m.wait(RECALL_INTERVAL)  # past the scans each consumer made when it started
    m.credit(1, 1)  # prefetch 1: it takes no more than its slot while the queue fills
    m.credit(2, 1)  # prefetch 2
    m.credit(3, 3)  # prefetch 3: one running, two held beyond its slot
    m.publish(6)
    assert [len(m.held[c]) for c in CONNS] == [1, 2, 3]
    m.credit(1, 3)  # conn 1 may hold 3 from now on (nothing ready: nothing moves)
    for _ in range(2):
        m.start(2)
    tags = list(m.held[2])
    m.acked.update(m.held[2].pop(t)[0] for t in tags)
    before = m.snapshot()
    m.s.ack(2, tags, m.now)  # both in one ACK: conn 2 idle, asks conn 3 for both it holds past its slot
    m.absorb(before)
    assert m.pending == [(3, 2)]
    m.start(1)
    m.finish(1)  # conn 1 idle too; conn 3 was asked a moment ago, so it waits
    m.answer()  # conn 3 releases 2: one to each free slot, none past a slot
    assert [len(m.held[c]) for c in CONNS] == [1, 1, 1]


def test_a_message_given_back_goes_to_a_free_slot_not_back_behind_the_busy_consumer():
    """Found by the machine above: NACK with requeue gave the message back to the consumer that
    nacked it, past its slot (it holds another it has not started), while another sat idle."""
    m = RecallMachine()
    m.wait(RECALL_INTERVAL)
    m.publish(6)
    while m.held[1]:
        m.start(1)
        m.finish(1)  # conn 1 idle (what it asks for is not answered here)
    held3 = len(m.held[3])
    assert held3 >= 2, m.held  # conn 3: one to run, one or more held past its slot
    m.start(3)
    m.give_back(3)  # the started one, requeued: to conn 1's free slot
    assert len(m.held[1]) == 1 and len(m.held[3]) == held3 - 1, m.held
