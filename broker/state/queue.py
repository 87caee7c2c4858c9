"""One queue: its options, its ready messages and its counters.

Ready messages are kept as one ``deque`` per priority plus a short list of
the priorities in use, highest first.  Priorities are 0-255 but a real queue
uses a handful, so "pop the next message" is a look at the first priority and
a ``popleft`` — O(1), against ~1.5 µs for a SortedList add+pop
(measured).  FIFO within a priority falls out of the deque; a nacked message goes
back to the *front* of its priority, near where it came from (as RabbitMQ does).

Removal from the middle (TTL expiry, revokes) is lazy: the message's ``state``
changes and ``pop_ready`` skips it.  ``ready_count`` is kept exact.

Nothing here does I/O or reads a clock.
"""

from __future__ import annotations

from bisect import insort
from collections import deque
from dataclasses import dataclass, fields

from broker.errors import BadRequest
from broker.state.flow import PARKED, TenantRing, parse_rate  # noqa: F401  (PARKED: a Message.state)

# Message.state values
READY = 0
DELAYED = 1
INFLIGHT = 2
GONE = 3

MAX_PRIORITY = 255
MAX_QUEUE_NAME = 200  # bytes of UTF-8; long enough for "app.tasks.something.dlq", short in logs
OVERFLOW_POLICIES = ("reject", "drop-head")
# A message delivered this many times and still coming back goes to the
# dead-letter queue.  Faktory's default retry count; explicit retries count.
DEFAULT_MAX_ATTEMPTS = 25
DLQ_SUFFIX = ".dlq"


class Message:
    """A stored message.  ``__slots__`` keeps it near 100 bytes (measured:
    a dict per message costs ~380 B against ~250 B with slots)."""

    __slots__ = (
        "seq",  # broker-wide publish order; FIFO within a priority
        "id",  # the producer's message id (a task id)
        "queue",  # Queue
        "body",  # bytes
        "priority",
        "headers",  # dict or None
        "attempts",  # deliveries so far
        "ready_at",  # float or None: delayed until
        "expires",  # float or None: TTL deadline
        "ts",  # publish time
        "state",
        # Log position of the record holding this message's full state (for
        # compaction); None means "= seq": a message's seq is the LSN of the record
        # that created it, so most messages never need a second int object.
        "lsn",
        "flow",  # broker.state.flow.FlowTag or None: task name, tenant, cap (from its headers)
    )

    def __init__(self, seq, id, queue, body, priority, headers, attempts, ready_at, expires, ts):
        self.seq = seq
        self.id = id
        self.queue = queue
        self.body = body
        self.priority = priority
        self.headers = headers
        self.attempts = attempts
        self.ready_at = ready_at
        self.expires = expires
        self.ts = ts
        self.state = READY
        self.lsn = None
        self.flow = None

    def __repr__(self):
        return f"<Message {self.id!r} q={self.queue.name} p={self.priority} seq={self.seq} att={self.attempts} st={self.state}>"


@dataclass(frozen=True, slots=True)
class QueueOptions:
    """What DECLARE sets.  protocol.md §5.8."""

    dead_letter: str | None = None  # None: "<name>.dlq" (a .dlq queue itself has none)
    max_attempts: int | None = DEFAULT_MAX_ATTEMPTS  # None: unlimited
    reserve_timeout: float | None = None  # seconds a delivery may stay unacked and untouched
    max_length: int | None = None  # ready + delayed
    overflow: str = "reject"
    rate_limit: str | None = None  # "10/s", "100/m", "1000/h": deliveries from the whole queue

    @classmethod
    def from_wire(cls, raw) -> "QueueOptions":
        if raw is None:
            return cls()
        if not isinstance(raw, dict):
            raise BadRequest("queue options must be a map")
        known = {f.name for f in fields(cls)}
        for key in raw:
            if key not in known:
                raise BadRequest(
                    f"unknown queue option {key!r}; known options: {', '.join(sorted(known))}"
                )
        dl = raw.get("dead_letter")
        if dl is not None:
            validate_queue_name(dl)
        ma = raw.get("max_attempts", DEFAULT_MAX_ATTEMPTS)
        if ma is not None and (type(ma) is not int or ma < 1):
            raise BadRequest(f"max_attempts must be a whole number >= 1 or null (got {ma!r})")
        rt = raw.get("reserve_timeout")
        if rt is not None and (type(rt) not in (int, float) or not 0 < rt < float("inf")):
            raise BadRequest(f"reserve_timeout must be a number of seconds > 0 or null (got {rt!r})")
        ml = raw.get("max_length")
        if ml is not None and (type(ml) is not int or ml < 1):
            raise BadRequest(f"max_length must be a whole number >= 1 or null (got {ml!r})")
        ov = raw.get("overflow", "reject")
        if ov not in OVERFLOW_POLICIES:
            raise BadRequest(f"overflow must be one of reject, drop-head (got {ov!r})")
        _, rl = parse_rate(raw.get("rate_limit"), "queue option 'rate_limit'")
        return cls(dl, ma, float(rt) if rt is not None else None, ml, ov, rl)

    def to_wire(self) -> dict:
        d = {f.name: getattr(self, f.name) for f in fields(self)}
        if d["rate_limit"] is None:
            del d["rate_limit"]  # shown only when set: replies and logs of queues without one stay as they were
        return d


def validate_queue_name(name) -> str:
    if type(name) is not str or not name:
        raise BadRequest(f"a queue name must be a non-empty text string (got {name!r})")
    if len(name.encode()) > MAX_QUEUE_NAME:
        raise BadRequest(f"queue name is longer than {MAX_QUEUE_NAME} bytes")
    if any(c.isspace() or not c.isprintable() for c in name):
        raise BadRequest(f"queue name {name!r} contains spaces or control characters")
    return name


class Queue:
    __slots__ = (
        "name",
        "options",
        "declared",
        "paused",
        "owner",  # None, or the connection id a temporary queue dies with (broker/state/exchanges.py)
        "_ready",  # priority -> deque[Message]
        "_prios",  # priorities with a deque, descending
        "ready_count",
        "delayed_count",
        "inflight_count",
        "consumers",  # list[Consumer], round-robin order
        "rr",  # round-robin cursor
        "tenanted",  # a message with a tenant came: ready messages are kept in TenantRings
        "rate_gate",  # broker.state.flow.RateGate or None: the queue's rate limit
        "waiting_count",  # messages parked on a rate or concurrency gate (broker.state.flow)
        # counters since start (rebuilt from the log on restart)
        "published",
        "delivered",
        "acked",
        "slotted",  # a consumer declared slots (RECALL): those with a free slot get work first
        "released",
        "recalled",
        "nacked",
        "redelivered",
        "expired",
        "dead_lettered",
        "rejected",
    )

    def __init__(self, name: str, options: QueueOptions | None = None, declared: bool = False):
        self.name = name
        self.options = options or QueueOptions()
        self.declared = declared
        self.paused = False
        self.owner = None
        self._ready: dict[int, deque] = {}
        self._prios: list[int] = []  # kept sorted ascending; we read from the end
        self.ready_count = 0
        self.delayed_count = 0
        self.inflight_count = 0
        self.consumers: list = []
        self.rr = 0
        self.tenanted = False
        self.rate_gate = None
        self.waiting_count = 0
        self.published = self.delivered = self.acked = self.nacked = 0
        self.slotted = False
        self.released = self.recalled = 0  # RELEASE / RECALL (protocol.md §5.41-5.42)
        self.redelivered = self.expired = self.dead_lettered = self.rejected = 0

    @property
    def dead_letter_name(self) -> str | None:
        if self.options.dead_letter is not None:
            return self.options.dead_letter
        if self.name.endswith(DLQ_SUFFIX):
            return None
        return self.name + DLQ_SUFFIX

    # -- ready messages ---------------------------------------------------------
    def push_ready(self, msg: Message, front: bool = False) -> None:
        p = msg.priority
        dq = self._ready.get(p)
        if dq is None:
            dq = self._ready[p] = TenantRing() if self.tenanted else deque()
            insort(self._prios, p)
        if front:
            dq.appendleft(msg)
        else:
            dq.append(msg)
        msg.state = READY
        self.ready_count += 1

    def pop_ready(self) -> Message | None:
        """The next ready message (highest priority, then oldest), or None."""
        prios = self._prios
        ready = self._ready
        while prios:
            p = prios[-1]
            dq = ready[p]
            while dq:
                msg = dq.popleft()
                if msg.state == READY:
                    if not dq:
                        del ready[p]
                        prios.pop()
                    self.ready_count -= 1
                    return msg
            del ready[p]
            prios.pop()
        return None

    def make_tenanted(self) -> None:
        """Deliver round-robin across tenants from now on; what is ready keeps its order
        (it belongs to the tenant None, or to the tenants its messages name)."""
        self.tenanted = True
        for p, dq in self._ready.items():
            self._ready[p] = TenantRing(dq)

    def tenants(self) -> dict:
        """tenant -> [ready messages, weight] over all priorities (the TENANTS admin line)."""
        out: dict = {}
        if self.tenanted:
            for ring in self._ready.values():
                for t, n, w in ring.tenants():
                    e = out.setdefault(t, [0, w])
                    e[0] += n
        return out

    def discard_ready(self, msg: Message) -> None:
        """Lazily remove a ready message (TTL, revoke): pop_ready will skip it."""
        msg.state = GONE
        self.ready_count -= 1

    def iter_ready(self):
        """Ready messages in delivery order, without removing them."""
        for p in reversed(self._prios):
            for msg in self._ready[p]:
                if msg.state == READY:
                    yield msg

    def take_all_ready(self) -> list[Message]:
        out = list(self.iter_ready())
        self._ready.clear()
        self._prios.clear()
        self.ready_count = 0
        return out

    @property
    def length(self) -> int:
        """What max_length counts: messages waiting, ready, delayed or held by a rate or cap."""
        return self.ready_count + self.delayed_count + self.waiting_count

    def __repr__(self):
        return f"<Queue {self.name} ready={self.ready_count} delayed={self.delayed_count} inflight={self.inflight_count}>"
