"""Flow control in the delivery path: rate limits, concurrency caps and tenants (issue 15).

Part of ``BrokerState`` (a mixin sharing its fields); the pieces it uses are in
``broker.state.flow``.  The dispatcher asks ``_flow_hold`` about a popped message
only while some gate exists (``_gated``): with no limit or cap anywhere the
delivery path pays one attribute check per message.
"""

from __future__ import annotations

import heapq
import itertools
from collections import deque

from broker.errors import BadRequest, NotFound
from broker.state import log_records as R
from broker.state.flow import MAX_NAME, MAX_TASK_RATES, PARKED, CapGate, RateGate, flow_tag, parse_rate
from broker.state.queue import GONE, validate_queue_name

RATE_KINDS = ("task", "queue")


class FlowMixin:
    def _init_flow(self) -> None:
        self._gated = False  # any rate gate or cap gate exists: the dispatcher asks _flow_hold
        self._task_rates: dict[str, RateGate] = {}  # task name -> its gate
        self._caps: dict[str, CapGate] = {}  # cap key -> its gate; dropped when idle
        self._flow_due: list = []  # heap of (time, n, RateGate): a parked message to release
        self._flow_n = itertools.count()
        self._flow_woke: set = set()  # queues that got a released message; the caller dispatches them

    def _regate(self) -> None:
        self._gated = bool(self._task_rates or self._caps or any(
            q.rate_gate is not None for q in self.queues.values()))

    # -- what a publish brings -------------------------------------------------------------
    def _flow_check(self, f) -> None:
        """Refuse, before anything changes, a publish that would need one task rate too many."""
        if f.rate_text is not None and f.task not in self._task_rates and len(self._task_rates) >= MAX_TASK_RATES:
            raise BadRequest(f"brokerd keeps rate limits for at most {MAX_TASK_RATES} task names; "
                             f"lift some (RATE_LIMIT with 0) or drop header 'x-rate-limit'")

    def _flow_publish(self, q, f) -> None:
        """A message with a FlowTag is about to be stored in ``q``."""
        if f.tenant is not None and not q.tenanted:
            q.make_tenanted()
        if f.rate_text is not None:
            g = self._task_rates.get(f.task)
            if g is None:
                self._task_rates[f.task] = RateGate("task", f.task, f.rate, f.rate_text, "task")
                self._gated = True
            elif g.source == "task" and g.text != f.rate_text:
                g.set(f.rate, f.rate_text)  # the task's code changed its limit; a live one stays
        if f.cap is not None:
            g = self._caps.get(f.cap_key)
            if g is not None:
                g.limit = f.cap
            self._gated = True  # the gate itself is made at the first delivery

    # -- the dispatcher's question ---------------------------------------------------------
    def _flow_hold(self, q, msg, now: float) -> bool:
        """True if a gate holds ``msg`` back (it is parked on that gate); else take its
        tokens and cap slot (the caller delivers it) and return False.

        Written out rather than looping over gate objects: this runs once per delivery
        whenever any gate exists (measured: ~1 us less per message than the loop)."""
        g1 = q.rate_gate
        if g1 is not None and (g1.rate is None or now >= g1.next_free - g1.slack):
            pass
        elif g1 is not None:
            self._park(g1, q, msg, now)
            return True
        g2 = g3 = None
        f = msg.flow
        if f is not None:
            if f.task is not None and self._task_rates:
                g2 = self._task_rates.get(f.task)
                if g2 is not None:
                    if g2.rate is None:
                        g2 = None
                    elif now < g2.next_free - g2.slack:
                        self._park(g2, q, msg, now)
                        return True
            if f.cap_key is not None:
                g3 = self._caps.get(f.cap_key)
                if g3 is None:
                    g3 = self._caps[f.cap_key] = CapGate(f.cap_key, f.cap)
                elif g3.inflight >= g3.limit:
                    self._park(g3, q, msg, now)
                    return True
                g3.inflight += 1
        if g1 is not None and g1.rate is not None:
            nf = g1.next_free
            g1.next_free = (nf if nf > now else now) + g1.interval
            if g1.parked and not g1.due:
                self._schedule_release(g1)  # the next token is for what it holds
        if g2 is not None:
            nf = g2.next_free
            g2.next_free = (nf if nf > now else now) + g2.interval
            if g2.parked and not g2.due:
                self._schedule_release(g2)
        return False

    def _park(self, g, q, msg, now: float) -> None:
        msg.state = PARKED
        q.waiting_count += 1
        dq = g.parked.get(q)
        if dq is None:
            dq = g.parked[q] = deque()
        dq.append(msg)
        if type(g) is RateGate and not g.due:
            self._schedule_release(g)

    def _schedule_release(self, g: RateGate) -> None:
        g.due = True
        heapq.heappush(self._flow_due, (g.opens_at(), next(self._flow_n), g))

    def _release(self, g, n: int = 1, only_consumed: bool = True) -> int:
        """Put up to ``n`` of the oldest live messages parked on ``g`` back at the front of their
        queues, one queue after the other; only into queues someone consumes (unless told
        otherwise), so a held message of an idle queue never uses another queue's turn."""
        done = 0
        for q in list(g.parked):
            if done >= n:
                break
            if only_consumed and (not q.consumers or q.paused):
                continue
            dq = g.parked[q]
            while dq and done < n:
                msg = dq.popleft()
                if msg.state != PARKED:
                    continue  # expired or purged while parked
                q.waiting_count -= 1
                q.push_ready(msg, front=True)
                self._flow_woke.add(q)
                done += 1
            if not dq:
                del g.parked[q]
        return done

    def _flow_settled(self, msg) -> None:
        """A delivery ended (ack, nack, taken back): free its cap slot."""
        g = self._caps.get(msg.flow.cap_key)
        if g is None:
            return
        g.inflight -= 1
        if g.parked:
            self._release(g)
        elif g.inflight <= 0:
            del self._caps[g.key]  # idle keys cost nothing
            if not self._caps:
                self._regate()

    def _flow_consumer_came(self, queues) -> None:
        """A consumer subscribed or a queue resumed: what gates hold for these queues may go now."""
        for g in list(self._flow_gates()):
            if not g.parked or not any(q in g.parked for q in queues):
                continue
            if type(g) is RateGate:
                if not g.due:
                    self._schedule_release(g)
            else:
                self._release(g, max(0, g.limit - g.inflight))

    def _flow_take_woke(self) -> set:
        woke = self._flow_woke
        if woke:
            self._flow_woke = set()
        return woke

    def _tick_flow(self, now: float) -> None:
        due = self._flow_due
        while due and due[0][0] <= now:
            _, _, g = heapq.heappop(due)
            if not g.due:
                continue  # released already by a newer entry
            g.due = False
            self._release(g, g.burst)

    def _flow_next_wakeup(self) -> float:
        return self._flow_due[0][0] if self._flow_due else float("inf")

    def _flow_gates(self):
        yield from self._task_rates.values()
        yield from self._caps.values()
        for q in self.queues.values():
            if q.rate_gate is not None:
                yield q.rate_gate

    def parked_messages(self):
        """Every message held back by a gate (for compaction: they are live)."""
        for g in self._flow_gates():
            for dq in g.parked.values():
                for m in dq:
                    if m.state == PARKED:
                        yield m

    def _drop_parked(self, q) -> int:
        """Purge or delete of ``q``: forget its parked messages; returns how many."""
        n = 0
        if q.waiting_count:
            for g in list(self._flow_gates()):
                for m in g.parked.pop(q, ()):
                    if m.state == PARKED:
                        m.state = GONE
                        n += 1
            q.waiting_count = 0
        return n

    # -- setting limits ----------------------------------------------------------------------
    def set_queue_rate(self, q, text: str | None, source: str = "declare") -> None:
        """The queue's rate (from DECLARE options or RATE_LIMIT); None removes it."""
        rate, text = parse_rate(text, "queue rate limit")
        if rate is None:
            g = q.rate_gate
            q.rate_gate = None
            if g is not None:
                self._release(g, q.waiting_count, only_consumed=False)
            self._regate()
        elif q.rate_gate is None:
            q.rate_gate = RateGate("queue", q.name, rate, text, source)
            self._gated = True
        else:
            q.rate_gate.source = source
            q.rate_gate.set(rate, text)

    def rate_limit(self, name, limit, kind, now: float) -> dict:
        """RATE_LIMIT: set (or with 0/null lift) the rate of a task name or a queue, live and logged.

        A task's limit set here wins over the one its messages carry (``x-rate-limit``),
        as Celery's ``app.control.rate_limit`` does over the decorator."""
        self._refuse_if_log_failed()
        if kind is None:
            kind = "task"
        if kind not in RATE_KINDS:
            raise BadRequest(f"rate limit kind must be 'task' or 'queue' (got {kind!r})")
        if type(name) is not str or not name:
            raise BadRequest(f"a rate limit needs a task or queue name (got {name!r})")
        rate, text = parse_rate(limit)
        if kind == "queue":
            validate_queue_name(name)
            q = self.queues.get(name)
            if q is None:
                raise NotFound(f"queue {name!r} does not exist")
            prev = q.rate_gate.text if q.rate_gate is not None else None
            self.set_queue_rate(q, text, "live")
            g = q.rate_gate
        else:
            if len(name.encode()) > MAX_NAME:
                raise BadRequest(f"a task name is at most {MAX_NAME} bytes")
            g = self._task_rates.get(name)
            prev = g.text if g is not None else None
            if g is None and len(self._task_rates) >= MAX_TASK_RATES:
                raise BadRequest(f"brokerd keeps rate limits for at most {MAX_TASK_RATES} task names")
            if g is None:
                g = self._task_rates[name] = RateGate("task", name, rate, text, "live")
                self._gated = True
            else:
                g.source = "live"
                g.set(rate, text)
            if rate is None:  # no limit now: everything it held goes back
                self._release(g, sum(len(dq) for dq in g.parked.values()), only_consumed=False)
        self._log(R.RATE, [kind, name, text])
        if g is not None and rate is not None:
            # The new pace starts now: a token due later than one new interval comes sooner.
            if g.next_free > now + g.interval:
                g.next_free = now + g.interval
            if g.parked:
                self._schedule_release(g)  # an earlier entry may be on the heap too: harmless
        for q in sorted(self._flow_take_woke(), key=lambda q: q.name):  # by name: the same order every run
            self._dispatch_queue(q, now)
        return {"kind": kind, "name": name, "limit": text, "previous": prev}

    def rate_table(self, now: float) -> list[dict]:
        """Every rate and cap gate: what RATES, the page and STATS show."""
        rows = []
        for g in self._task_rates.values():
            rows.append({"kind": "task", "name": g.name, "limit": g.text, "source": g.source,
                         "waiting": _held(g), "inflight": None})
        for q in sorted(self.queues.values(), key=lambda q: q.name):
            g = q.rate_gate
            if g is not None:
                rows.append({"kind": "queue", "name": g.name, "limit": g.text, "source": g.source,
                             "waiting": _held(g), "inflight": None})
        for g in self._caps.values():
            rows.append({"kind": "concurrency", "name": g.key, "limit": str(g.limit), "source": "task",
                         "waiting": _held(g), "inflight": g.inflight})
        rows.sort(key=lambda r: (r["kind"], r["name"]))
        return rows

    def tenant_table(self, queues_max: int = 50, tenants_max: int = 20) -> list[dict]:
        """Queues delivering in tenant turns, each with its busiest tenants (ready messages,
        weight) — the page's view of TENANTS.  Bounded: ``queues_max`` queues (most ready first)
        and ``tenants_max`` tenants each, so a broker with 10^5 tenants renders in bounded time;
        ``tenants`` counts them all."""
        qs = sorted((q for q in self.queues.values() if q.tenanted), key=lambda q: (-q.ready_count, q.name))
        rows = []
        for q in qs[:queues_max]:
            t = q.tenants()
            top = sorted(t.items(), key=lambda kv: (-kv[1][0], "" if kv[0] is None else kv[0]))[:tenants_max]
            rows.append({"queue": q.name, "tenants": len(t),
                         "top": [{"tenant": k, "ready": n, "weight": w} for k, (n, w) in top]})
        return rows

    # -- durability ----------------------------------------------------------------------------
    def _replay_rate(self, p) -> None:
        kind, name, text = p
        if kind == "queue":
            q = self.queues.get(name)
            if q is not None:
                self.set_queue_rate(q, text, "live")
            return
        rate, text = parse_rate(text)
        g = self._task_rates.get(name)
        if g is None:
            self._task_rates[name] = RateGate("task", name, rate, text, "live")
            self._gated = True
        else:
            g.source = "live"
            g.set(rate, text)

    def _replay_flow_tag(self, m) -> None:
        """A replayed message gets back the FlowTag its headers asked for (accepted once, so valid)."""
        try:
            f = flow_tag(m.headers)
        except BadRequest:
            return
        if f is not None:
            m.flow = f
            self._flow_publish(m.queue, f)

    def _compact_flow(self) -> None:
        """Rewrite forward the limits set live (after the DECLAREs, which they override)."""
        for g in self._task_rates.values():
            if g.source == "live":
                self._log(R.RATE, ["task", g.name, g.text])
        for q in self.queues.values():
            text = q.rate_gate.text if q.rate_gate is not None else None
            if text != q.options.rate_limit:
                self._log(R.RATE, ["queue", q.name, text])


def _held(g) -> int:
    return sum(1 for dq in g.parked.values() for m in dq if m.state == PARKED)
