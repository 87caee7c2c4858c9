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
  another holds more than it can start.
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
        self.s.declare("q", {}, 0.0)
        for conn, slots in CONNS.items():
            self.s.connect(conn)
            self.ctag[conn] = self.s.consume(conn, ["q"], slots * 3, 0.0, {"slots": slots})
        self.absorb()

    def absorb(self):
        """Take the broker's frames as the workers would, until it has nothing more to say."""
        while True:
            box = self.s.take_outbox()
            frames = [(conn, f) for conn, fs in box.items() for f in fs]
            if not frames:
                return
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
                    give = unstarted[-n:]
                    for t in give:
                        mid = self.held[conn].pop(t)[0]
                        self.counted[mid] -= 1  # a release is not an attempt
                    assert self.s.release(conn, give, self.now) == len(give)

    @rule(k=st.integers(1, 6))
    def publish(self, k):
        for _ in range(k):
            self.n += 1
            mid = f"m{self.n}"
            self.published.add(mid)
            self.s.publish(0, "q", b"x", mid, 0, self.now)
        self.absorb()

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
                self.s.ack(conn, tag, self.now)
                break
        self.absorb()

    @rule(conn=st.sampled_from(sorted(CONNS)), mult=st.integers(1, 8))
    def credit(self, conn, mult):
        self.s.set_prefetch(conn, self.ctag[conn], CONNS[conn] * mult, self.now)
        self.absorb()

    @rule(dt=st.sampled_from([0.01, RECALL_INTERVAL / 2, RECALL_INTERVAL]))
    def wait(self, dt):
        self.now += dt
        self.s.tick(self.now)
        self.absorb()

    @rule()
    def settle(self):
        """Let RECALL_INTERVAL pass twice: nobody may then be idle beside a holder of surplus."""
        for _ in range(2):
            self.now += RECALL_INTERVAL
            self.s.tick(self.now)
            self.absorb()
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
