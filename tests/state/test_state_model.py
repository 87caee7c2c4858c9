"""Hypothesis state machine: BrokerState against a simple reference model.

The model keeps, per queue, a plain list of waiting message ids and picks the
next one the slow obvious way (highest priority, then list order).  Every
delivery the real state makes is checked against the model's pick, in tag
order (tags increase with every delivery).  After every step the promises are
checked: prefetch never exceeded, no consumer idle while its queue has work,
no message lost or duplicated.
"""

import hypothesis.strategies as st
from hypothesis import settings
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from broker.errors import BrokerError
from broker.state import BrokerState
from broker.state.queue import DEFAULT_MAX_ATTEMPTS
from client.wire import OP_DELIVER

QUEUES = ["a", "b"]
CONNS = [1, 2, 3]
MAX_ATTEMPTS = 3


class Model:
    def __init__(self):
        self.ready = {q: [] for q in QUEUES + [q + ".dlq" for q in QUEUES]}
        self.delayed = []  # (ready_at, seq, id)
        self.msgs = {}  # id -> dict(queue, prio, attempts, seq)
        self.inflight = {}  # tag -> (id, conn, ctag)
        self.acked = set()
        self.purged = set()

    def best(self, q):
        ids = self.ready[q]
        if not ids:
            return None
        top = max(self.msgs[i]["prio"] for i in ids)
        return next(i for i in ids if self.msgs[i]["prio"] == top)


class BrokerMachine(RuleBasedStateMachine):
    def __init__(self):
        super().__init__()
        self.s = BrokerState()
        self.m = Model()
        self.now = 0.0
        self.n = 0
        self.consumers = {}  # ctag -> (conn, queues, prefetch)
        for q in QUEUES:
            self.s.declare(q, {"max_attempts": MAX_ATTEMPTS}, 0.0)
        for c in CONNS:
            self.s.connect(c)

    # -- helpers -------------------------------------------------------------
    def absorb(self):
        """Check every delivery the last step caused against the model."""
        box = self.s.take_outbox()
        frames = sorted((f for fs in box.values() for f in fs if f[0] == OP_DELIVER), key=lambda f: f[2])
        conn_of = {}
        for conn, fs in box.items():
            for f in fs:
                if f[0] == OP_DELIVER:
                    conn_of[f[2]] = conn
        for f in frames:
            _, ctag, tag, queue, mid, body, prio, attempts, headers = f
            want = self.m.best(queue)
            assert mid == want, f"delivered {mid} from {queue}, model expected {want}"
            self.m.ready[queue].remove(mid)
            msg = self.m.msgs[mid]
            msg["attempts"] += 1
            assert attempts == msg["attempts"]
            assert prio == msg["prio"]
            self.m.inflight[tag] = (mid, conn_of[tag], ctag)

    def give_back(self, mid, front=True):
        msg = self.m.msgs[mid]
        # declared queues have MAX_ATTEMPTS; their dead-letter queues the default
        limit = DEFAULT_MAX_ATTEMPTS if msg["queue"].endswith(".dlq") else MAX_ATTEMPTS
        if msg["attempts"] >= limit:
            self.dead(mid)
        elif front:
            self.m.ready[msg["queue"]].insert(0, mid)

    def dead(self, mid):
        msg = self.m.msgs[mid]
        if msg["queue"].endswith(".dlq"):  # a dead-letter queue has none of its own
            self.m.purged.add(mid)
            return
        dlq = msg["queue"] + ".dlq"
        msg["queue"] = dlq
        msg["attempts"] = 0
        self.m.ready[dlq].append(mid)

    # -- rules -----------------------------------------------------------------
    @rule(q=st.sampled_from(QUEUES), prio=st.integers(0, 3), delay=st.sampled_from([None, None, 1.0, 2.5]))
    def publish(self, q, prio, delay):
        self.n += 1
        mid = f"m{self.n}"
        self.s.publish(0, q, mid.encode(), mid, prio, self.now, delay=delay)
        self.m.msgs[mid] = {"queue": q, "prio": prio, "attempts": 0}
        if delay:
            seq = next(e[1] for e in self.s._delayed if e[2].id == mid)  # dead-lettering takes seqs too
            self.m.delayed.append((self.now + delay, seq, mid))
        else:
            self.m.ready[q].append(mid)
        self.absorb()

    @rule(
        conn=st.sampled_from(CONNS),
        queues=st.lists(st.sampled_from(QUEUES + ["a.dlq"]), min_size=1, max_size=3, unique=True),
        prefetch=st.integers(1, 3),
    )
    def consume(self, conn, queues, prefetch):
        ctag = self.s.consume(conn, queues, prefetch, self.now)
        self.consumers[ctag] = (conn, queues, prefetch)
        # The model cannot know which queue a fresh consumer drains first other
        # than by preference order: absorb checks each pick per queue.
        self.absorb()

    @precondition(lambda self: self.m.inflight)
    @rule(data=st.data())
    def ack(self, data):
        tag = data.draw(st.sampled_from(sorted(self.m.inflight)))
        mid, conn, _ = self.m.inflight.pop(tag)
        self.s.ack(conn, tag, self.now)
        self.m.acked.add(mid)
        self.absorb()

    @precondition(lambda self: self.m.inflight)
    @rule(data=st.data(), how=st.sampled_from(["requeue", "dead", "delay"]))
    def nack(self, data, how):
        tag = data.draw(st.sampled_from(sorted(self.m.inflight)))
        mid, conn, _ = self.m.inflight.pop(tag)
        if how == "dead":
            self.s.nack(conn, tag, self.now, requeue=False)
            self.dead(mid)
        elif how == "requeue":
            self.s.nack(conn, tag, self.now, requeue=True)
            self.give_back(mid)
        else:
            # an explicit retry: held by the broker, not counted toward max_attempts
            self.s.nack(conn, tag, self.now, delay=1.5)
            # its seq breaks a tie of due times (the entry of this message, not the last one)
            seq = next(e[1] for e in self.s._delayed if e[2].id == mid)
            self.m.delayed.append((self.now + 1.5, seq, mid))
        self.absorb()

    @rule(conn=st.sampled_from(CONNS))
    def disconnect(self, conn):
        mine = sorted(t for t, v in self.m.inflight.items() if v[1] == conn)
        self.s.disconnect(conn, self.now)
        self.s.connect(conn)
        for ctag in [c for c, v in self.consumers.items() if v[0] == conn]:
            del self.consumers[ctag]
        for tag in mine:
            mid, _, _ = self.m.inflight.pop(tag)
            self.give_back(mid)
        self.absorb()

    @precondition(lambda self: self.m.inflight)
    @rule(data=st.data())
    def stale_ack_changes_nothing(self, data):
        tag = data.draw(st.sampled_from(sorted(self.m.inflight)))
        _, conn, _ = self.m.inflight[tag]
        other = next(c for c in CONNS if c != conn)
        try:
            self.s.ack(other, tag, self.now)
        except BrokerError as e:
            assert e.code == "STALE_DELIVERY"
        else:
            raise AssertionError("an ack from another connection was applied")
        self.absorb()

    @rule(dt=st.sampled_from([0.5, 1.0, 3.0]))
    def tick(self, dt):
        self.now += dt
        due = sorted(d for d in self.m.delayed if d[0] <= self.now)
        self.m.delayed = [d for d in self.m.delayed if d[0] > self.now]
        for _, _, mid in due:
            self.m.ready[self.m.msgs[mid]["queue"]].append(mid)
        self.s.tick(self.now)
        self.absorb()

    @rule(q=st.sampled_from(QUEUES))
    def purge(self, q):
        n = self.s.purge(q, self.now)
        gone = list(self.m.ready[q]) + [d[2] for d in self.m.delayed if self.m.msgs[d[2]]["queue"] == q]
        assert n == len(gone)
        self.m.ready[q] = []
        self.m.delayed = [d for d in self.m.delayed if self.m.msgs[d[2]]["queue"] != q]
        self.m.purged.update(gone)

    # -- promises ----------------------------------------------------------------
    @invariant()
    def dispatcher_invariants_hold(self):
        self.s.check_invariants()

    @invariant()
    def no_message_is_lost_or_duplicated(self):
        waiting = [i for ids in self.m.ready.values() for i in ids] + [d[2] for d in self.m.delayed]
        flying = [v[0] for v in self.m.inflight.values()]
        everything = waiting + flying + list(self.m.acked) + list(self.m.purged)
        assert sorted(everything) == sorted(self.m.msgs), "a message was lost or duplicated"
        for q, ids in self.m.ready.items():
            real = self.s.queues.get(q)
            assert (real.ready_count if real else 0) == len(ids), q

    @invariant()
    def prefetch_is_never_exceeded(self):
        per = {}
        for _, _, ctag in self.m.inflight.values():
            per[ctag] = per.get(ctag, 0) + 1
        for ctag, n in per.items():
            if ctag in self.consumers:
                assert n <= self.consumers[ctag][2]


TestBrokerState = BrokerMachine.TestCase
TestBrokerState.settings = settings(max_examples=100, stateful_step_count=40, deadline=None)
