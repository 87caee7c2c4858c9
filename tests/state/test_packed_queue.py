"""The compact ready index (Packed blocks, broker/state/queue.py) against the per-message model
it replaced: one deque of Message objects per priority, highest priority first, FIFO within
one, a message given back goes to the front, a removed one is skipped.  Spilling a block
(its ids and bodies left in the log, read back by lsn) changes nothing a reader can see.
"""

from collections import deque

import hypothesis.strategies as st
from hypothesis import settings
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from broker.state.queue import GONE, INFLIGHT, PACK_AFTER, PACK_ENTRIES, READY, Message, Packed, Queue


class Log:
    """What the WAL would hand back: lsn -> (id, body) of every message ever packed."""

    def __init__(self):
        self.records = {}
        self.reads = 0

    def read(self, lsns):
        self.reads += 1
        return {n: self.records[n] for n in lsns}


class PackedQueueMachine(RuleBasedStateMachine):
    def __init__(self):
        super().__init__()
        self.q = Queue("q")
        self.q.spill_body_bytes = 40  # bodies of 40 bytes or more go to "big" blocks
        self.model = {}  # priority -> deque of (id, body), the old per-message queue
        self.objects = {}  # id -> Message kept as an object (discard_ready needs it)
        self.seq = 0
        self.log = Log()

    def _new(self, prio, size, own_id, headers):
        self.seq += 1
        mid = f"job-{self.seq}" if own_id else f"b-{self.seq}"
        body = bytes([self.seq % 251]) * size
        m = Message(self.seq, mid, self.q, body, prio, headers, 0, None, None, float(self.seq))
        self.log.records[self.seq] = (mid, body)
        return m

    @rule(prio=st.integers(0, 2), size=st.sampled_from([0, 3, 39, 40, 300]), own_id=st.booleans(),
          plain=st.booleans())
    def publish(self, prio, size, own_id, plain):
        m = self._new(prio, size, own_id, None if plain else {"h": 1})
        self.q.push_ready(m)
        if not plain:
            self.objects[m.id] = m
        self.model.setdefault(prio, deque()).append((m.id, m.body))

    @rule(n=st.sampled_from([1, 7, PACK_ENTRIES + 3]), prio=st.integers(0, 2))
    def publish_many(self, n, prio):
        for _ in range(n):
            m = self._new(prio, 10, False, None)
            self.q.push_ready(m)
            self.model.setdefault(prio, deque()).append((m.id, m.body))

    def _model_pop(self):
        for p in sorted(self.model, reverse=True):
            dq = self.model[p]
            if dq:
                return p, dq.popleft()
        return None, None

    @rule()
    def pop(self):
        m = self.q.pop_ready()
        p, want = self._model_pop()
        if want is None:
            assert m is None
            return
        assert (m.id, m.body, m.priority) == (want[0], want[1], p)
        assert m.ts == float(m.seq) and m.state == READY
        m.state = INFLIGHT  # what delivery does with it
        self.popped = m

    @precondition(lambda self: getattr(self, "popped", None) is not None)
    @rule()
    def give_back(self):
        """A nack or release: the popped message returns to the front of its priority."""
        m, self.popped = self.popped, None
        m.attempts += 1
        self.q.push_ready(m, front=True)
        self.objects[m.id] = m
        self.model.setdefault(m.priority, deque()).appendleft((m.id, m.body))

    @rule(data=st.data())
    def discard(self, data):
        """TTL or revoke: only objects are removed from the middle."""
        live = [m for m in self.objects.values() if m.state == READY]
        if not live:
            return
        m = data.draw(st.sampled_from(sorted(live, key=lambda m: m.seq)))
        self.q.discard_ready(m)
        self.model[m.priority].remove((m.id, m.body))

    @rule(everything=st.booleans())
    def spill(self, everything):
        for block in self.q.packed_blocks():
            if block.data is not None and len(block) and (everything or block.big):
                block.spill(self.log.read)

    @invariant()
    def same_as_the_model(self):
        want = [e for p in sorted(self.model, reverse=True) for e in self.model[p]]
        assert self.q.ready_count == len(want)
        got = [(m.id, m.body) for m in self.q.iter_ready()]
        assert got == want

    def teardown(self):
        for m in self.objects.values():
            if m.state == READY:
                m.state = GONE


TestPackedQueue = PackedQueueMachine.TestCase
TestPackedQueue.settings = settings(max_examples=40, stateful_step_count=25, deadline=None)


def test_a_plain_message_costs_no_object_and_big_bodies_get_blocks_of_their_own():
    q = Queue("q")
    q.spill_body_bytes = 1000
    for i in range(1, 2001):
        q.push_ready(Message(i, f"b-{i}", q, b"x" * (2000 if 500 < i <= 600 else 10), 0, None, 0, None, None, 1.0))
    blocks = list(q.packed_blocks())
    # the first PACK_AFTER stay objects (a short queue); behind them no Message object is kept
    assert [type(x) for x in q._ready[0]] == [Message] * PACK_AFTER + [Packed] * 4
    assert [len(b) for b in blocks] == [500 - PACK_AFTER, 100, 1024, 376]
    assert [b.big for b in blocks] == [False, True, False, False]
    # the broker's own ids ("<boot>-<seq>") are not stored at all: 2 bytes of marker each
    assert len(blocks[0].data) == len(blocks[0]) * (2 + 10)
