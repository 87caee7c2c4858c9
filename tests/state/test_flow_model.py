"""Hypothesis: the delivery order with priorities, tenants and rate limits, against a reference model.

Without rate limits the order is checked message for message against a plain model of the rule
(protocol.md §5.2.1): highest priority first; within a priority, tenants take turns (weight w: w in
a row) in the order they got ready messages; FIFO within a tenant.  With rate limits on some tasks,
what must hold is checked over the whole run: no task is delivered faster than its rate, nothing is
lost or delivered twice, a delivery never passes over a higher-priority message that could have gone
(its task's rate allowed it), and FIFO holds within a (priority, tenant, task).
"""

import hypothesis.strategies as st
from hypothesis import given, settings

from broker.state import BrokerState
from client.wire import OP_DELIVER

TENANTS = [None, "a", "b", "c"]
TASKS = {"free": None, "slow": 0.5, "slower": 0.25}  # per second; burst 1 at these rates


class Model:
    """Per priority a ring: the turn order of tenants with messages, how many the head had in
    this turn, and each tenant's FIFO of messages and its weight (the latest message's)."""

    def __init__(self):
        self.rings = {}

    def publish(self, m):
        r = self.rings.setdefault(m["prio"], {"order": [], "fifo": {}, "w": {}, "used": 0})
        t = m["tenant"]
        if t not in r["fifo"]:
            r["fifo"][t] = []
            r["order"].append(t)
        r["fifo"][t].append(m)
        if t is not None:
            r["w"][t] = m["weight"]

    def pop(self):
        if not self.rings:
            return None
        p = max(self.rings)
        r = self.rings[p]
        t = r["order"][0]
        m = r["fifo"][t].pop(0)
        if not r["fifo"][t]:
            del r["fifo"][t]
            r["w"].pop(t, None)
            r["order"].pop(0)
            r["used"] = 0
        else:
            r["used"] += 1
            if r["used"] >= r["w"].get(t, 1):
                r["order"].append(r["order"].pop(0))
                r["used"] = 0
        if not r["order"]:
            del self.rings[p]
        return m


message = st.fixed_dictionaries({
    "prio": st.integers(0, 2),
    "tenant": st.sampled_from(TENANTS),
    "weight": st.integers(1, 3),
    "task": st.sampled_from(sorted(TASKS)),
})
step = st.one_of(
    st.tuples(st.just("publish"), message),
    st.tuples(st.just("take"), st.integers(1, 4)),
    st.tuples(st.just("wait"), st.floats(0.05, 3.0)),
)


def headers(m, limits):
    h = {"x-task": m["task"]}
    if m["tenant"] is not None:
        h["x-tenant"] = m["tenant"]
        h["x-tenant-weight"] = m["weight"]
    if limits and TASKS[m["task"]]:
        h["x-rate-limit"] = TASKS[m["task"]]
    return h


class Run:
    """One BrokerState, one consumer (prefetch 1) that takes n messages, acking each."""

    def __init__(self, limits):
        self.s = BrokerState()
        self.s.connect(1)
        self.s.connect(2)
        self.limits = limits
        self.now = 0.0
        self.ctag = None
        self.sent = {}
        self.got = []  # (time, message)
        self.published_before = []  # per delivery: how many messages were published by then
        self.held = None  # the delivery the consumer holds

    def publish(self, m):
        mid = f"m{len(self.sent)}"
        m = dict(m, id=mid, seq=len(self.sent), at=self.now)
        self.sent[mid] = m
        self.s.publish(1, "q", b"", mid, m["prio"], self.now, headers=headers(m, self.limits))
        self.absorb()
        return m

    def absorb(self):
        frames = [f for f in self.s.take_outbox().get(2, []) if f[0] == OP_DELIVER]
        assert len(frames) <= 1  # prefetch 1
        if frames:
            assert self.held is None
            self.held = frames[0]
            self.got.append((self.now, self.sent[frames[0][4]]))
            self.published_before.append(len(self.sent))

    def start(self):
        self.ctag = self.s.consume(2, ["q"], 1, self.now)
        self.absorb()

    def ack(self):
        if self.held is not None:
            d, self.held = self.held, None
            self.s.ack(2, d[2], self.now)
            self.absorb()

    def wait(self, dt):
        """Let ``dt`` seconds pass; the consumer works through what it gets, acking each at once."""
        end = self.now + dt
        while True:
            while self.held is not None:
                self.ack()
            nxt = self.s.tick(self.now)
            self.absorb()
            if self.held is not None:
                continue  # acked at once, at this same instant: time moves only while the slot is empty
            if nxt > end:
                break
            self.now = min(max(nxt, self.now), end)
        self.now = end
        self.s.tick(self.now)
        self.absorb()


@settings(max_examples=150, deadline=None)
@given(st.lists(step, max_size=60))
def test_without_rate_limits_the_order_is_exactly_the_models(steps):
    run, model = Run(limits=False), Model()
    run.start()
    expected = []
    for kind, arg in steps:
        if kind == "publish":
            m = run.publish(arg)
            model.publish(m)
        elif kind == "take":
            for _ in range(arg):
                run.ack()
        else:
            run.wait(arg)
        # the consumer's one slot: the model says what fills it
        while len(expected) < len(run.got):
            expected.append(model.pop()["id"])
    assert [m["id"] for _, m in run.got] == expected
    run.s.check_invariants()


@settings(max_examples=150, deadline=None)
@given(st.lists(step, max_size=60))
def test_with_rate_limits_every_promise_holds(steps):
    run = Run(limits=True)
    run.start()
    for kind, arg in steps:
        if kind == "publish":
            run.publish(arg)
        elif kind == "take":
            for _ in range(arg):
                run.ack()
        else:
            run.wait(arg)
        run.s.check_invariants()
    run.ack()
    run.wait(1000.0)  # long enough for every held message to go
    got = [m for _, m in run.got]
    # nothing lost, nothing twice
    assert sorted(m["id"] for m in got) == sorted(run.sent)
    # no task faster than its rate (burst 1: one per interval)
    for task, rate in TASKS.items():
        if rate:
            times = [t for t, m in run.got if m["task"] == task]
            assert all(b - a >= 1 / rate - 1e-9 for a, b in zip(times, times[1:])), (task, times)
    # never past a higher-priority message whose rate allowed it then (by a margin: a timer due at
    # the very instant of a delivery may fire just after it)
    when = {m["id"]: (i, t) for i, (t, m) in enumerate(run.got)}
    for i, (t, m) in enumerate(run.got):
        for x in run.sent.values():
            j, tx = when[x["id"]]
            if x["prio"] <= m["prio"] or x["seq"] >= run.published_before[i] or j < i:
                continue
            rate = TASKS[x["task"]]
            last = max((tt for tt, mm in run.got[:i] if mm["task"] == x["task"]), default=None)
            could = rate is None or last is None or last + 1 / rate < t - 1e-6
            assert not could, (m, x, t)
    # FIFO within a (priority, tenant, task)
    for key in {(m["prio"], m["tenant"], m["task"]) for m in got}:
        seqs = [m["seq"] for m in got if (m["prio"], m["tenant"], m["task"]) == key]
        assert seqs == sorted(seqs), key
