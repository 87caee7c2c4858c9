"""Flow control the broker enforces at delivery (issue 15): rate limits, concurrency caps, tenants.

Three small pieces, pure like the rest of broker/state/ (``now`` is passed in):

* ``RateGate`` — a token bucket for one task name or one queue.  Burst 1 up to
  100/s, as Celery's own bucket (kombu's TokenBucket capacity=1): "10/s" hands
  out one delivery every 0.1 s and at most one at once after an idle spell, so
  four workers together see 10/s, not 40/s.  Faster rates hold 10 ms of tokens.
* ``CapGate`` — at most ``limit`` deliveries in flight (delivered, not yet
  acked/nacked/taken back) for one task name or concurrency key.
* ``TenantRing`` — the ready messages of one priority of one queue, round-robin
  across tenants (weighted: a tenant of weight w gets w deliveries per turn),
  FIFO within a tenant.  It has the deque methods ``Queue`` uses, so a queue
  swaps it in only once a tenant shows up; untenanted queues keep plain deques.

A message that a gate holds back is *parked* on that gate (``PARKED``), not
left in its queue: the dispatcher skips it in O(1) and delivers what is behind
it.  A gate keeps one FIFO of parked messages per queue, so what it holds for a
queue nobody consumes never stands in front of another queue's.  A rate gate
releases parked messages when its next tokens are due (a timer,
``BrokerState._flow_due``); a cap gate releases one when a slot frees.  A
release puts the message back at the front of its queue, and only into a queue
with a consumer.  Parking is not logged: in the log a parked message is ready.

What a message asks for travels in its headers (protocol.md §5.2.1), read once
at publish into a shared, interned ``FlowTag``.
"""

from __future__ import annotations

import math
from collections import deque

from broker.errors import BadRequest

# Header names a publish may carry (protocol.md §5.2.1).
H_TASK = "x-task"
H_TENANT = "x-tenant"
H_WEIGHT = "x-tenant-weight"
H_RATE = "x-rate-limit"
H_CAP = "x-max-concurrency"
H_CAP_KEY = "x-concurrency-key"
FLOW_HEADERS = (H_TASK, H_TENANT, H_WEIGHT, H_RATE, H_CAP, H_CAP_KEY)

RATE_UNITS = {"s": 1.0, "m": 60.0, "h": 3600.0}  # Celery's: per second, minute, hour
# Deliveries per second: above this a limit cannot be told apart from none (the
# ticker wakes ~1,000 times a second at best), and 1/rate stays a sane float.
MAX_RATE = 100_000.0
MAX_NAME = 200  # bytes of UTF-8 for a task name, tenant or concurrency key; as a queue name
MAX_WEIGHT = 1000  # deliveries per turn; a bound so one tenant cannot take a whole turn forever
MAX_CONCURRENCY = 1_000_000  # in-flight deliveries; far above any prefetch total
# Seconds of tokens a rate bucket holds (at least one token): the burst is max(1, rate x this).
# 10/s and slower get a burst of 1, as Celery's bucket; a fast rate must be able to hand out a
# whole batch at one ``now`` (the server reads the clock once per batch of frames), or a
# limit far above the traffic would still hold messages back.
BURST_SECONDS = 0.01
# Task names with a rate limit that brokerd keeps (each ~300 B with its timer entry): far above
# any real app's task count, and a bound on what publishes naming ever new tasks can cost.
MAX_TASK_RATES = 10_000
# Distinct flow tags kept interned.  Each is ~100 B; past this the cache starts
# over (tags already on messages stay valid), so hostile tenant names cost memory
# only through the messages that carry them.
TAG_CACHE_SIZE = 10_000

PARKED = 4  # Message.state: held back by a gate (see broker.state.queue)


def parse_rate(value, what: str = "rate limit") -> tuple[float | None, str | None]:
    """Celery's rate syntax → (deliveries per second, canonical text); (None, None) = no limit.

    "10/s", "100/m", "1000/h"; a bare number is per second; 0, "0" and null mean no limit.
    """
    if value is None:
        return None, None
    if type(value) in (int, float):
        n, unit = value, "s"
    elif type(value) is str:
        text = value.strip()
        num, sep, unit = text.partition("/")
        unit = unit.strip() if sep else "s"
        try:
            n = float(num)
        except ValueError:
            n = None
        if n is None or unit not in RATE_UNITS:
            raise BadRequest(
                f"{what} {value[:40]!r} is not a rate: write N/s, N/m or N/h (e.g. '10/s'), or 0 for none")
    else:
        raise BadRequest(f"{what} must be text like '10/s' or a number per second (got {type(value).__name__})")
    if not math.isfinite(n) or n < 0:
        raise BadRequest(f"{what} must be a finite number >= 0 (got {value!r})")
    if n == 0:
        return None, None
    per_second = n / RATE_UNITS[unit]
    if per_second > MAX_RATE:
        raise BadRequest(f"{what} {value!r} is above {int(MAX_RATE)}/s, the most brokerd can pace")
    if per_second < 1 / (366 * 86400.0):
        raise BadRequest(f"{what} {value!r} is below one a year; use 0 for no limit, or pause the queue")
    shown = int(n) if n == int(n) else n
    return per_second, f"{shown}/{unit}"


def _name(value, header: str) -> str:
    if type(value) is not str or not value:
        raise BadRequest(f"header {header!r} must be non-empty text (got {type(value).__name__})")
    if len(value.encode()) > MAX_NAME:
        raise BadRequest(f"header {header!r} is longer than {MAX_NAME} bytes")
    return value


class FlowTag:
    """What one message asks of flow control; shared by every message with the same headers."""

    __slots__ = ("task", "tenant", "weight", "rate", "rate_text", "cap", "cap_key")

    def __init__(self, task, tenant, weight, rate, rate_text, cap, cap_key):
        self.task = task
        self.tenant = tenant
        self.weight = weight
        self.rate = rate
        self.rate_text = rate_text
        self.cap = cap
        self.cap_key = cap_key


_tags: dict = {}


def flow_tag(headers: dict) -> FlowTag | None:
    """The FlowTag of a publish's headers, or None when they ask nothing; BadRequest names a bad one."""
    task = headers.get(H_TASK)
    tenant = headers.get(H_TENANT)
    weight = headers.get(H_WEIGHT)
    rate = headers.get(H_RATE)
    cap = headers.get(H_CAP)
    ckey = headers.get(H_CAP_KEY)
    if task is None and tenant is None and weight is None and rate is None and cap is None and ckey is None:
        return None
    raw = (task, tenant, weight, rate, cap, ckey)
    try:
        tag = _tags.get(raw)
    except TypeError:  # an unhashable value (a list, a map): refused below
        tag = None
    if tag is not None:
        return tag
    if task is not None:
        _name(task, H_TASK)
    if tenant is not None:
        _name(tenant, H_TENANT)
    if weight is None:
        weight = 1
    elif type(weight) is not int or not 1 <= weight <= MAX_WEIGHT:
        raise BadRequest(f"header {H_WEIGHT!r} must be a whole number from 1 to {MAX_WEIGHT} (got {weight!r})")
    per_second, text = parse_rate(rate, f"header {H_RATE!r}")
    if text is not None and task is None:
        raise BadRequest(f"header {H_RATE!r} limits a task: it needs the task name in header {H_TASK!r}")
    if cap is not None and (type(cap) is not int or not 1 <= cap <= MAX_CONCURRENCY):
        raise BadRequest(f"header {H_CAP!r} must be a whole number from 1 to {MAX_CONCURRENCY} (got {cap!r})")
    if ckey is not None:
        _name(ckey, H_CAP_KEY)
        if cap is None:
            raise BadRequest(f"header {H_CAP_KEY!r} needs header {H_CAP!r} (how many may run at once)")
    cap_key = None
    if cap is not None:
        if ckey is None and task is None:
            raise BadRequest(f"header {H_CAP!r} caps a task or a key: it needs {H_TASK!r} or {H_CAP_KEY!r}")
        cap_key = ckey if ckey is not None else "task:" + task
    tag = FlowTag(task, tenant, weight, per_second, text, cap, cap_key)
    if len(_tags) >= TAG_CACHE_SIZE:
        _tags.clear()
    _tags[raw] = tag
    return tag


class RateGate:
    """A token bucket for one task name or queue (burst: see BURST_SECONDS), with the messages it holds back."""

    __slots__ = ("kind", "name", "rate", "text", "interval", "burst", "slack", "next_free", "parked", "due",
                 "source")

    def __init__(self, kind: str, name: str, rate: float | None, text: str | None, source: str):
        self.kind = kind  # "task" or "queue"
        self.name = name
        self.parked: dict = {}  # Queue -> deque of the messages held back, oldest first
        self.next_free = 0.0  # the next token's time
        self.due = False  # a release is on the timer
        self.source = source  # "live": RATE_LIMIT; "declare": the queue's option; "task": x-rate-limit
        self.set(rate, text)

    def set(self, rate, text) -> None:
        self.rate = rate  # per second; None: no limit (a live "0" over a task's own limit)
        self.text = text
        self.interval = 1.0 / rate if rate else 0.0
        self.burst = max(1, int(rate * BURST_SECONDS)) if rate else 1
        self.slack = (self.burst - 1) * self.interval  # how far ahead of now next_free may run

    def opens_at(self) -> float:
        return self.next_free - self.slack

    def is_open(self, now: float) -> bool:
        return self.rate is None or now >= self.next_free - self.slack

    def take(self, now: float) -> None:
        if self.rate is not None:
            self.next_free = (self.next_free if self.next_free > now else now) + self.interval


class CapGate:
    """At most ``limit`` deliveries in flight for one key, with the messages it holds back."""

    __slots__ = ("key", "limit", "inflight", "parked")

    def __init__(self, key: str, limit: int):
        self.key = key
        self.limit = limit
        self.inflight = 0
        self.parked: dict = {}  # Queue -> deque of the messages held back, oldest first

    def is_open(self, now: float) -> bool:
        return self.inflight < self.limit

    def take(self, now: float) -> None:
        self.inflight += 1


class TenantRing:
    """One priority's ready messages, round-robin across tenants, FIFO within each.

    ``_tenants`` maps a tenant with ready messages to ``[deque, weight]``; ``_order``
    is the turn order of those tenants.  An idle tenant (no ready message) is in
    neither: it costs nothing.  Messages without a tenant share the tenant None.
    """

    __slots__ = ("_tenants", "_order", "_used", "_n")

    def __init__(self, msgs=()):
        self._tenants: dict = {}
        self._order: deque = deque()
        self._used = 0  # deliveries the tenant at the head of _order had in this turn
        self._n = 0
        for m in msgs:
            self.append(m)

    def __len__(self) -> int:
        return self._n

    def _entry(self, msg, left: bool):
        f = msg.flow
        t = f.tenant if f is not None else None
        e = self._tenants.get(t)
        if e is None:
            e = self._tenants[t] = [deque(), 1]
            if left:  # a message going back to the front: its tenant is next
                self._order.appendleft(t)
                self._used = 0
            else:
                self._order.append(t)
        if f is not None and f.tenant is not None:
            e[1] = f.weight  # the latest publish says the tenant's weight
        return e

    def append(self, msg) -> None:
        self._entry(msg, False)[0].append(msg)
        self._n += 1

    def appendleft(self, msg) -> None:
        self._entry(msg, True)[0].appendleft(msg)
        self._n += 1

    def popleft(self):
        order = self._order
        t = order[0]
        e = self._tenants[t]
        dq = e[0]
        msg = dq.popleft()
        self._n -= 1
        if not dq:
            del self._tenants[t]
            order.popleft()
            self._used = 0
        else:
            self._used += 1
            if self._used >= e[1]:
                order.rotate(-1)
                self._used = 0
        return msg

    def __iter__(self):
        """In turn order, tenant by tenant (good enough for listings; not the exact interleaving)."""
        for t in self._order:
            yield from self._tenants[t][0]

    def tenants(self):
        """(tenant, messages, weight) for each tenant with ready messages of this priority."""
        for t in self._order:
            dq, w = self._tenants[t]
            yield t, len(dq), w
