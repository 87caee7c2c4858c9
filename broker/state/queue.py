"""One queue: its options, its ready messages and its counters.

Ready messages are kept as one ``deque`` per priority plus a short list of
the priorities in use, highest first.  Priorities are 0-255 but a real queue
uses a handful, so "pop the next message" is a look at the first priority and
a ``popleft`` — O(1), against ~1.5 µs for a SortedList add+pop
(measured).  FIFO within a priority falls out of the deque; a nacked message goes
back to the *front* of its priority, near where it came from (as RabbitMQ does).

Removal from the middle (TTL expiry, revokes) is lazy: the message's ``state``
changes and ``pop_ready`` skips it.  ``ready_count`` is kept exact.

A *plain* ready message (no headers, delay, TTL, flow tag, attempt; what a deep
backlog is made of) is not kept as a ``Message`` object: it is packed into the
last ``Packed`` block of its priority's deque (arrays and one byte buffer, ~30 B
of memory per message besides its body, against ~300 B as an object with its id
string and seq int; measured with bench/memory.py).  ``pop_ready`` and
``iter_ready`` hand out ``Message`` objects made from it, so nothing else sees
the difference; a message going back (nack, release) is an object again.

Nothing here does I/O or reads a clock.
"""

from __future__ import annotations

from array import array
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


# One Packed block holds at most this many messages, or this many bytes of ids and bodies
# (whichever comes first): what a drained block wastes until its last message leaves, and
# the unit a deep queue's bodies are spilled and read back in (broker/state/spill.py).
PACK_ENTRIES = 1024
# A queue packs what it is given only past this many ready messages: a short queue (consumers
# keeping up) keeps objects, so a message that leaves at once is never packed and unpacked
# (~2-4 us a message more, measured in-process on a busy 2-core machine), and what a short queue
# holds as objects is bounded by this (~300 B each, so ~75 KiB a queue).  256, not 64: a
# PUBLISH_BATCH's items are dispatched after the whole batch (BrokerState.hold_dispatch), and the
# SDK's batches are ~100 publishes, which a consumer with credit takes at once: they must not
# be packed on the way in and unpacked on the way out.
PACK_AFTER = 256
PACK_BYTES = 1 << 20
SPILL_NEVER = 1 << 62  # a body size no message reaches: spilling by size is off
PEEK_READ = 64  # entries of a spilled block read back at a time by iteration (not delivery)
_ID_DEFAULT = 0xFFFF  # id length marker: the id is "<prefix><seq>", the broker's own id


class Packed:
    """Ready messages of one queue and priority, FIFO, with no Python object per message.

    Entry i is ``seqs[i]`` (its seq, = the LSN of its PUBLISH record), ``ts[i]`` (publish
    time), ``lsns[i]`` (only once one differs from its seq: compaction rewrote it), and
    ``data[ends[i-1]:ends[i]]``: a 2-byte id length, the UTF-8 id, then the body.  An id the
    broker made itself ("<boot>-<seq>") is stored as its length marker alone.  Entries
    before ``head`` were popped.  ``data`` is None while the bodies are spilled: they are
    then read back from the log by ``lsn`` (broker/state/spill.py).
    """

    __slots__ = ("queue", "priority", "seqs", "ts", "lsns", "ends", "data", "head", "prefix", "spilled",
                 "big", "reader")

    def __init__(self, queue, priority: int, prefix: str):
        self.queue = queue
        self.priority = priority
        self.seqs = array("q")
        self.ts = array("d")
        self.lsns = None  # array("q") once an entry's lsn is not its seq
        self.ends = array("I")
        self.data = bytearray()
        self.head = 0
        self.prefix = prefix
        self.spilled = 0  # bytes of ids and bodies that live only in the log (data is None)
        self.big = False  # holds bodies of spill_body_bytes or more: spilled once written
        # While spilled: reader(lsns) -> {lsn: (id, body)}, from the log (BrokerState.set_body_reader)
        self.reader = None

    def __len__(self) -> int:
        return len(self.seqs) - self.head

    def full(self) -> bool:
        return len(self.seqs) >= PACK_ENTRIES or (self.data is not None and len(self.data) >= PACK_BYTES) \
            or self.data is None

    def add(self, msg: "Message") -> None:
        seq = msg.seq
        data = self.data
        self._put(data, msg.id, seq, msg.body)
        self.ends.append(len(data))
        self.seqs.append(seq)
        self.ts.append(msg.ts)
        if msg.lsn is not None:
            if self.lsns is None:
                self.lsns = array("q", self.seqs[:-1])
            self.lsns.append(msg.lsn)
        elif self.lsns is not None:
            self.lsns.append(seq)

    def spill(self, reader) -> int:
        """Drop the ids and bodies from memory: from now on they are read back from the log by
        lsn.  The caller checked every entry's record is written.  Returns the bytes freed."""
        data = self.data
        start = self.ends[self.head - 1] if self.head else 0
        self.spilled = len(data) - start
        self.data = None
        self.reader = reader
        return self.spilled

    def _read(self, lo: int, hi: int) -> list:
        """(id, body) of entries lo..hi-1 of a spilled block, from the log."""
        lsns = (self.lsns if self.lsns is not None else self.seqs)[lo:hi].tolist()
        got = self.reader(lsns)
        return [got[n] for n in lsns]

    def load(self) -> int:
        """Read a spilled block's remaining ids and bodies back into memory (one read of the log
        for up to PACK_ENTRIES messages: delivery pops them in order).  Returns the bytes read."""
        lo, hi = self.head, len(self.seqs)
        entries = self._read(lo, hi)
        self.seqs = self.seqs[lo:]
        self.ts = self.ts[lo:]
        if self.lsns is not None:
            self.lsns = self.lsns[lo:]
        self.ends = array("I")
        self.data = bytearray()
        self.head = 0
        self.spilled = 0
        self.reader = None
        data = self.data
        append_end = self.ends.append
        prefix = self.prefix
        for (mid, body), seq in zip(entries, self.seqs):  # _put, written out (~1,000 a call)
            if mid == prefix + str(seq):
                data += b"\xff\xff"
            else:
                raw = mid.encode()
                data += len(raw).to_bytes(2, "big")
                data += raw
            data += body
            append_end(len(data))
        return len(data)

    def _put(self, data: bytearray, mid: str, seq: int, body: bytes) -> None:
        if mid == self.prefix + str(seq):
            data += b"\xff\xff"
        else:
            raw = mid.encode()
            data += len(raw).to_bytes(2, "big")
            data += raw
        data += body

    def lsn(self, i: int) -> int:
        return self.lsns[i] if self.lsns is not None else self.seqs[i]

    def message(self, i: int) -> "Message":
        if self.data is None:
            return self._message_from(i, *self._read(i, i + 1)[0])
        data = self.data
        start = self.ends[i - 1] if i else 0
        n = (data[start] << 8) | data[start + 1]
        seq = self.seqs[i]
        if n == _ID_DEFAULT:
            mid = self.prefix + str(seq)
            body = bytes(data[start + 2:self.ends[i]])
        else:
            mid = data[start + 2:start + 2 + n].decode()
            body = bytes(data[start + 2 + n:self.ends[i]])
        m = Message(seq, mid, self.queue, body, self.priority, None, 0, None, None, self.ts[i])
        if self.lsns is not None and self.lsns[i] != seq:
            m.lsn = self.lsns[i]
        return m

    def _message_from(self, i: int, mid: str, body: bytes) -> "Message":
        seq = self.seqs[i]
        m = Message(seq, mid, self.queue, body, self.priority, None, 0, None, None, self.ts[i])
        if self.lsns is not None and self.lsns[i] != seq:
            m.lsn = self.lsns[i]
        return m

    def popleft(self) -> "Message":
        if self.data is None:
            self.load()
        i = self.head
        data = self.data
        if not i and type(data) is bytearray and (len(self.seqs) >= PACK_ENTRIES or len(data) >= PACK_BYTES):
            # Full: nothing is added any more.  As bytes, a slice is the body itself (one copy, not two).
            self.data = data = bytes(data)
        ends = self.ends
        start = ends[i - 1] if i else 0
        end = ends[i]
        seq = self.seqs[i]
        if data[start] == 0xFF and data[start + 1] == 0xFF:
            mid = self.prefix + str(seq)
            body = bytes(data[start + 2:end])
        else:
            n = (data[start] << 8) | data[start + 1]
            mid = data[start + 2:start + 2 + n].decode()
            body = bytes(data[start + 2 + n:end])
        m = Message(seq, mid, self.queue, body, self.priority, None, 0, None, None, self.ts[i])
        if self.lsns is not None and self.lsns[i] != seq:
            m.lsn = self.lsns[i]
        self.head = i + 1
        return m

    def __iter__(self):
        n = len(self.seqs)
        if self.data is not None:
            for i in range(self.head, n):
                yield self.message(i)
            return
        # Spilled: read back a few at a time, kept nowhere (PEEK, STATS look at the first ones).
        for lo in range(self.head, n, PEEK_READ):
            hi = min(n, lo + PEEK_READ)
            for i, (mid, body) in zip(range(lo, hi), self._read(lo, hi)):
                yield self._message_from(i, mid, body)

    def set_lsn(self, i: int, lsn: int) -> None:
        if self.lsns is None:
            if lsn == self.seqs[i]:
                return
            self.lsns = array("q", self.seqs)
        self.lsns[i] = lsn


def packable(msg: "Message") -> bool:
    """A message that is only its seq, id, body, priority and time: it can live in a Packed block."""
    return (msg.headers is None and msg.attempts == 0 and msg.ready_at is None and msg.expires is None
            and msg.flow is None and len(msg.id) < 10000)


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
        # bodies of at least this many bytes are left in the log once written (spill_body_bytes);
        # a class default of "never" until BrokerState.configure_spill sets the instance's
        "spill_body_bytes",
        "new_blocks",  # None, or the Packed blocks made since the last spill pass (broker/state/spill.py)
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
        self.spill_body_bytes = SPILL_NEVER
        self.new_blocks = None

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
        msg.state = READY
        self.ready_count += 1
        if front:
            dq.appendleft(msg)
        elif self.tenanted or self.ready_count <= PACK_AFTER or not packable(msg):
            dq.append(msg)
        else:
            last = dq[-1] if dq else None
            big = self.spill_body_bytes <= len(msg.body)
            if type(last) is not Packed or last.full() or last.big is not big:
                mid = msg.id
                tail = str(msg.seq)
                last = Packed(self, p, mid[:-len(tail)] if mid.endswith("-" + tail) else "\0")
                last.big = big
                dq.append(last)
                if self.new_blocks is not None:
                    self.new_blocks.append(last)
            last.add(msg)

    def push_spilled(self, msg: Message, reader) -> None:
        """Queue a plain ready message whose id and body are only in the log (replay): it joins
        a spilled Packed block, read back by ``reader`` when delivery reaches it."""
        if self.tenanted:  # ready messages are kept per tenant, as objects
            msg.id, msg.body = reader([msg.lsn or msg.seq])[msg.lsn or msg.seq]
            self.push_ready(msg)
            return
        p = msg.priority
        dq = self._ready.get(p)
        if dq is None:
            dq = self._ready[p] = deque()
            insort(self._prios, p)
        last = dq[-1] if dq else None
        if type(last) is not Packed or last.data is not None or len(last.seqs) >= PACK_ENTRIES:
            last = Packed(self, p, "\0")
            last.data = None
            last.reader = reader
            dq.append(last)
        seq = msg.seq
        last.seqs.append(seq)
        last.ts.append(msg.ts)
        if msg.lsn is not None:
            if last.lsns is None:
                last.lsns = array("q", last.seqs[:-1])
            last.lsns.append(msg.lsn)
        elif last.lsns is not None:
            last.lsns.append(seq)
        msg.state = READY
        self.ready_count += 1

    def push_plain(self, seq: int, mid: str, own_id: bool, body: bytes, p: int, ts: float, prefix: str) -> None:
        """``push_ready`` of a plain message (no headers, delay, TTL or attempt) that has no
        ``Message`` object: PUBLISH's path, which makes none (``own_id``: ``mid`` is
        ``prefix + str(seq)``, the broker's own)."""
        dq = self._ready.get(p)
        if dq is None:
            dq = self._ready[p] = TenantRing() if self.tenanted else deque()
            insort(self._prios, p)
        self.ready_count += 1
        if self.tenanted:
            m = Message(seq, mid, self, body, p, None, 0, None, None, ts)
            dq.append(m)
            return
        big = self.spill_body_bytes <= len(body)
        last = dq[-1] if dq else None
        if (type(last) is not Packed or last.big is not big or (data := last.data) is None
                or len(last.seqs) >= PACK_ENTRIES or len(data) >= PACK_BYTES):
            last = Packed(self, p, prefix)
            last.big = big
            dq.append(last)
            if self.new_blocks is not None:
                self.new_blocks.append(last)
            data = last.data
        if own_id and last.prefix is prefix:
            data += b"\xff\xff"
        else:
            raw = mid.encode()
            data += len(raw).to_bytes(2, "big") + raw
        data += body
        last.ends.append(len(data))
        last.seqs.append(seq)
        last.ts.append(ts)
        if last.lsns is not None:
            last.lsns.append(seq)

    def push_plain_many(self, p: int, seqs: list, mids: list, bodies: list, ts: float, prefix: str) -> None:
        """``push_plain`` of each ``(seqs[i], mids[i], bodies[i])`` in order, all of priority ``p``
        published at ``ts`` under ids of their own (not the broker's): a PUBLISH_BATCH's plain items
        behind a backlog (``BrokerState.publish_run``), the deque and block looked up once."""
        if self.tenanted:
            for seq, mid, body in zip(seqs, mids, bodies):
                self.push_plain(seq, mid, False, body, p, ts, prefix)
            return
        dq = self._ready.get(p)
        if dq is None:
            dq = self._ready[p] = deque()
            insort(self._prios, p)
        self.ready_count += len(seqs)
        spill_at = self.spill_body_bytes
        last = dq[-1] if dq else None
        if type(last) is not Packed or (data := last.data) is None:
            last = data = None
        else:
            ends, bseqs, bts, lsns = last.ends, last.seqs, last.ts, last.lsns
        for seq, mid, body in zip(seqs, mids, bodies):
            big = spill_at <= len(body)
            if last is None or last.big is not big or len(bseqs) >= PACK_ENTRIES or len(data) >= PACK_BYTES:
                last = Packed(self, p, prefix)
                last.big = big
                dq.append(last)
                if self.new_blocks is not None:
                    self.new_blocks.append(last)
                data = last.data
                ends, bseqs, bts, lsns = last.ends, last.seqs, last.ts, last.lsns
            raw = mid.encode()
            data += len(raw).to_bytes(2, "big")
            data += raw
            data += body
            ends.append(len(data))
            bseqs.append(seq)
            bts.append(ts)
            if lsns is not None:
                lsns.append(seq)

    def pop_ready(self) -> Message | None:
        """The next ready message (highest priority, then oldest), or None."""
        prios = self._prios
        ready = self._ready
        while prios:
            p = prios[-1]
            dq = ready[p]
            if not self.tenanted:
                while dq:
                    msg = dq[0]
                    if type(msg) is Packed:
                        block = msg
                        msg = block.popleft()  # a log read error leaves the block as it was
                        if block.head >= len(block.seqs):  # drained (len(block) without the call)
                            dq.popleft()
                            if not dq:
                                del ready[p]
                                prios.pop()
                        self.ready_count -= 1
                        return msg
                    dq.popleft()
                    if msg.state == READY:
                        if not dq:
                            del ready[p]
                            prios.pop()
                        self.ready_count -= 1
                        return msg
                del ready[p]
                prios.pop()
                continue
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
            self._ready[p] = TenantRing(m for m in _unpacked(dq) if m.state == READY)

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

    def iter_ready(self, unpacked: bool = True):
        """Ready messages in delivery order, without removing them (``unpacked=False``: only
        those kept as objects, not those in Packed blocks)."""
        for p in reversed(self._prios):
            dq = self._ready[p]
            for msg in (_unpacked(dq) if unpacked else dq):
                if type(msg) is not Packed and msg.state == READY:
                    yield msg

    def packed_blocks(self):
        """The Packed blocks of ready messages (compaction and spilling work on them in place)."""
        for dq in self._ready.values():
            if not self.tenanted:
                for item in dq:
                    if type(item) is Packed:
                        yield item

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


def _unpacked(dq):
    """A priority's ready messages as Message objects, Packed blocks opened in order."""
    for item in dq:
        if type(item) is Packed:
            yield from item
        else:
            yield item


# --------------------------------------------------------------------------- bulk: checkpoints
# A checkpoint (broker/state/replay.py, log record type 33) writes each Packed block's index
# (seqs, times, log positions) as three byte strings, and start-up turns them back into a
# spilled block in a few C calls, with no Python object per message.  Little-endian on disk
# whatever the machine, so a data directory moves between machines.

_SWAP = __import__("sys").byteorder != "little"  # arrays are in the machine's order


def _le(a: array) -> bytes:
    if _SWAP:
        a = array(a.typecode, a)
        a.byteswap()
    return a.tobytes()


def _from_le(typecode: str, raw) -> array:
    a = array(typecode)
    a.frombytes(raw)
    if _SWAP:
        a.byteswap()
    return a


def packed_index(block: Packed) -> tuple[bytes, bytes, bytes | None]:
    """A block's entries from its head on, as (seqs, ts, lsns or None): 8 bytes each per entry."""
    h = block.head
    return (_le(block.seqs[h:]), _le(block.ts[h:]),
            _le(block.lsns[h:]) if block.lsns is not None else None)


def packed_from_index(queue: "Queue", priority: int, seqs, ts, lsns, reader) -> Packed:
    """A spilled Packed block (ids and bodies read back from the log by ``reader``) from
    ``packed_index``'s bytes.  ``ValueError`` if the three do not describe the same entries."""
    if len(seqs) % 8 or len(ts) != len(seqs) or (lsns is not None and len(lsns) != len(seqs)):
        raise ValueError(
            f"a checkpoint block of queue {queue.name!r} is inconsistent: {len(seqs)} bytes of seqs, "
            f"{len(ts)} of times, {None if lsns is None else len(lsns)} of log positions (8 bytes each per message)")
    block = Packed(queue, priority, "\0")
    block.seqs = _from_le("q", seqs)
    block.ts = _from_le("d", ts)
    block.lsns = _from_le("q", lsns) if lsns is not None else None
    block.data = None
    block.reader = reader
    return block


def place_block(queue: "Queue", block: Packed) -> None:
    """Append a block replay loaded (entries before its head already gone) to its queue's
    ready messages, after those already there."""
    h = block.head
    if h:
        block.seqs = block.seqs[h:]
        block.ts = block.ts[h:]
        if block.lsns is not None:
            block.lsns = block.lsns[h:]
        block.head = 0
    n = len(block.seqs)
    if not n:
        return
    p = block.priority
    if queue.tenanted:  # ready messages are kept per tenant, as objects
        for i in range(n):
            m = Message(block.seqs[i], None, queue, None, p, None, 0, None, None, block.ts[i])
            if block.lsns is not None and block.lsns[i] != m.seq:
                m.lsn = block.lsns[i]
            queue.push_spilled(m, block.reader)
        return
    dq = queue._ready.get(p)
    if dq is None:
        dq = queue._ready[p] = deque()
        insort(queue._prios, p)
    dq.append(block)
    queue.ready_count += n


def split_block(block: Packed, k: int) -> Packed:
    """Cut a spilled block in two: returns a block of its first ``k`` entries, and ``block``
    keeps the rest, from head 0 (replay puts a message with a seq between them in its place,
    or drops the entries before the head)."""
    block.head = 0
    front = Packed(block.queue, block.priority, block.prefix)
    front.seqs, block.seqs = block.seqs[:k], block.seqs[k:]
    front.ts, block.ts = block.ts[:k], block.ts[k:]
    if block.lsns is not None:
        front.lsns, block.lsns = block.lsns[:k], block.lsns[k:]
    front.data = None
    front.reader = block.reader
    return front
