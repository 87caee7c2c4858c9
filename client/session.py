"""The client session: every protocol decision of a brokerd client, without I/O.

Both shells (``client.producer.Client`` over a blocking socket and
``client.async_client.AsyncClient`` over trio or asyncio) drive one
``Session`` so they cannot diverge (the hypercorn pattern).  The session owns:

* request ids and the table of requests waiting for a reply (rid → ``Pending``);
* pipelined publishes waiting for their confirm (rid → message id) and the
  ones the broker refused, for ``wait_for_confirms``;
* consumers by consumer tag, each with a buffer of received deliveries;
* the ack batch (tags acked locally, not yet sent) and when to send it;
* the output buffer (encoded frames not yet handed to the socket);
* heartbeat bookkeeping: when we last sent and received, with ``now`` passed in;
* the handshake (a ``client.wire.ClientHandshake``);
* what a lost connection means (``connection_lost``: closed by us, a CLOSING
  reason from the broker, or lost) and the CONTROL / EVENT handlers
  (``run_handlers``: called in the reader, an exception is logged, never
  fatal to the reader).

Like ``client.wire`` it reads no clock and touches no socket: the shell calls
``data_to_send(now)`` and writes the bytes, and calls ``receive(frames, now)``
with decoded frames and gets back the list of things to wake.  What a "waiter"
is (a lock, a Condition, a trio or asyncio Event) is the shell's business; the
session only stores it on ``Pending.waiter`` / ``ConsumerState.waiter``.

Not thread-safe by itself: the blocking shell calls it under one lock.
"""

from __future__ import annotations

import itertools
import logging
from collections import deque

from client import wire
from client.options import seconds
from client.errors import (
    BrokerdError,
    ConnectionClosed,
    ConnectionLost,
    MessageTooLarge,
    PublishError,
    RemoteProtocolError,
    StaleDelivery,
    Timeout,
    error_from_wire,
    lost_from_closing,
)
from client.wire import (
    OP_ACK,
    OP_BYE,
    OP_CANCEL,
    OP_CLOSING,
    OP_CONSUME,
    OP_DELIVER,
    OP_ERROR,
    OP_HEARTBEAT,
    OP_NACK,
    OP_RESULT_SET,
    OP_CONTROL,
    OP_CREDIT,
    OP_EVENT,
    OP_OK,
    OP_RECALL,
    OP_RELEASE,
    OP_PUBLISH,
    OP_PUBLISH_BATCH,
    OP_CONFIRM_RANGE,
    OP_DELIVER_BATCH,
    OP_TOUCH,
)

log = logging.getLogger("client")

KiB = 1024
# Buffered output is handed to the socket as soon as it passes this: big
# enough that a pipelined publisher makes one syscall per ~250 small frames,
# small enough to stay well under the broker's 4 MiB output limit and the
# kernel's socket buffer.
FLUSH_BYTES = 32 * KiB
# Shells flush anything buffered at most this long after it was buffered
# (seconds).  A Nagle-like delay that lets a burst of publishes or acks share
# one frame batch and one syscall, short enough not to matter for latency.
FLUSH_DELAY = 0.001
# Acks are sent once this fraction of the consumer's prefetch is acked
# locally, so the broker's credit never runs dry while a fast consumer works.
ACK_BATCH_FRACTION = 0.5

_encode = wire.encode
# A PUBLISH_BATCH item's CBOR beyond its body, queue, id and options (array and field heads,
# priority): an over-estimate, so a batch's estimated size bounds its real one.
BATCH_ITEM_OVERHEAD = 24
# The protocol versions a new session offers in HELLO.  A process may narrow it before connecting
# (``client.session.OFFERED_VERSIONS = (1,)``: bench/core.py --protocol 1, tests) to compare.
OFFERED_VERSIONS = wire.PROTOCOL_VERSIONS
HEARTBEAT_BYTES = wire.encode(wire.HEARTBEAT_FRAME)

# Pending.kind
K_REPLY = 0  # an ordinary request: the result goes to whoever waits
K_QUIET = 1  # fire-and-forget (batched acks, nacks on cancel): errors are only recorded
K_HELLO = 2
K_CONSUME = 3
K_CANCEL = 4
K_BYE = 5

# In the wake list returned by receive()/fail(): "the confirm picture changed".
CONFIRMS = object()
# In the wake list returned by receive(): "frames were buffered; have them sent soon".
FLUSH = object()
# In the wake list returned by receive(): "CONTROL broadcasts arrived (session.controls)".
CONTROL = object()
# In the wake list returned by receive(): "EVENT frames of a subscription arrived (session.events)".
EVENTS = object()


class Pending:
    """One request waiting for its reply.

    The shell sets ``waiter`` (whatever it blocks on) and, once the session
    puts this object in a wake list, reads ``result`` or ``error``.
    """

    __slots__ = ("rid", "kind", "done", "result", "error", "waiter", "consumer", "info")

    def __init__(self, rid, kind, waiter=None, consumer=None, info=None):
        self.rid = rid
        self.kind = kind
        self.done = False
        self.result = None
        self.error: BrokerdError | None = None
        self.waiter = waiter
        self.consumer = consumer
        self.info = info  # what a quiet request was about, for the error record

    def __repr__(self):
        return f"<Pending rid={self.rid} kind={self.kind} done={self.done}>"


class ConsumerState:
    """One subscription: its tag (once the broker replied), its received deliveries."""

    __slots__ = (
        "tag", "queues", "prefetch", "buffer", "waiter", "cancelled", "error",
        "ack_threshold", "received", "slots", "session",
    )

    def __init__(self, queues, prefetch):
        self.tag: int | None = None
        self.queues = list(queues)
        self.prefetch = prefetch
        self.buffer: deque[Delivery] = deque()
        self.waiter = None  # the shell's wake-up handle while someone waits for a delivery
        self.cancelled = False
        self.error: BrokerdError | None = None
        self.ack_threshold = max(1, int(prefetch * ACK_BATCH_FRACTION))
        self.received = 0
        self.slots = None  # CONSUME option (protocol.md §5.3): runs this many at once, answers RECALL
        self.session = None  # the Session (one connection) its deliveries belong to

    def __repr__(self):
        return f"<ConsumerState tag={self.tag} queues={self.queues} prefetch={self.prefetch}>"

    def ended(self) -> bool:
        """For a caller waiting for a delivery: True once cancelled; raises if the connection is over."""
        if self.error is not None:
            raise clone_error(self.error)
        return self.cancelled


class ConsumerHandle:
    """What both shells' consumers share: the read-only view of one subscription."""

    def __init__(self, client, state: ConsumerState):
        self._client = client
        self._state = state

    @property
    def tag(self) -> int | None:
        """The broker's consumer tag (None until the broker answered CONSUME)."""
        return self._state.tag

    @property
    def queues(self) -> list[str]:
        return list(self._state.queues)

    @property
    def prefetch(self) -> int:
        return self._state.prefetch

    @property
    def received(self) -> int:
        """How many deliveries this consumer has received from the broker so far."""
        return self._state.received

    def __repr__(self):
        return f"<{type(self).__name__} tag={self.tag} queues={self.queues} prefetch={self.prefetch}>"


class Delivery:
    """A message delivered to one of your consumers (protocol.md §5.4 DELIVER).

    Fields: ``body`` (bytes), ``queue``, ``id`` (the message id), ``priority``,
    ``headers`` (dict or None), ``attempts`` (1 on first delivery),
    ``redelivered`` (``attempts > 1``), ``tag`` (this delivery's tag: it names
    one delivery of the message, not the message), ``consumer`` (the consumer
    tag).

    Settle it exactly once with ``ack()`` or ``nack()``; ``touch()`` extends a
    reservation timeout.  With ``AsyncClient`` these return awaitables.

    * ``ack(wait=False)``: done with it.  Acks are batched (sent when the
      consumer is about to wait for the next delivery, when half the prefetch
      is acked, or within ~1 ms), so a refused ack is only logged.  Pass
      ``wait=True`` to send it now and wait for the broker's answer; a
      delivery the broker already took back (reservation timeout) then raises
      ``StaleDelivery``.
    * ``nack(requeue=True, delay=None)``: give it back.  ``requeue=False``
      dead-letters it; ``delay`` (seconds) holds it in the broker first.
      Waits for the broker's answer (``StaleDelivery`` if taken back).
    * ``touch()``: reset the reservation timer; returns the queue's
      ``reserve_timeout`` (None if it has none).
    """

    __slots__ = ("_owner", "_state", "_settled", "consumer", "tag", "queue", "id", "body", "priority", "attempts", "headers")

    def __init__(self, owner, state, f):
        self._owner = owner
        self._state = state
        self._settled = False
        self.consumer = f[1]
        self.tag = f[2]
        self.queue = f[3]
        self.id = f[4]
        self.body = f[5]
        self.priority = f[6]
        self.attempts = f[7]
        self.headers = f[8] if len(f) > 8 else None

    @property
    def redelivered(self) -> bool:
        """True when an earlier delivery of this message was not acked."""
        return self.attempts > 1

    @property
    def settled(self) -> bool:
        """True once ack() or nack() was called on this delivery."""
        return self._settled

    def ack(self, wait: bool = False):
        return self._owner._ack(self, wait)

    def nack(self, requeue: bool = True, delay: float | None = None, headers: dict | None = None):
        """Give it back: ``requeue=False`` → dead-letter queue; ``delay`` → the broker
        holds it that many seconds (an explicit retry); ``headers`` replaces its headers."""
        return self._owner._nack(self, requeue, delay, headers)

    def touch(self):
        return self._owner._touch(self)

    def __repr__(self):
        return (
            f"<Delivery tag={self.tag} queue={self.queue!r} id={self.id!r} priority={self.priority} "
            f"attempts={self.attempts} body={len(self.body)}B>"
        )


def _error(f: list) -> BrokerdError:
    e = wire.Error.from_frame(f)
    return error_from_wire(e.code, e.message)


def clone_error(exc: BrokerdError) -> BrokerdError:
    """A fresh instance of ``exc``, so each thread or task raises its own."""
    try:
        new = type(exc)(exc.code, exc.message)
    except TypeError:
        return exc
    new.__cause__ = exc.__cause__
    return new


class Session:
    """Protocol state of one client connection.  See the module docstring.

    ``owner`` is the shell object; deliveries call ``owner._ack(d, wait)``,
    ``owner._nack(d, requeue, delay)`` and ``owner._touch(d)``.
    ``id_prefix`` makes client-generated message ids unique: ids are
    ``f"{id_prefix}-{n}"`` for n = 1, 2, 3...
    """

    def __init__(self, owner, *, name: str, heartbeat: float, now: float, id_prefix: str,
                 control_handlers: list | None = None, event_handlers: list | None = None,
                 hello_extra: dict | None = None, versions: tuple | None = None, ids=None):
        self.owner = owner
        self.name = name
        self.heartbeat = float(heartbeat)
        # Called with each CONTROL payload / each EVENT frame's (events, dropped); the
        # shells pass their public lists, so handlers added later are seen too.
        self.control_handlers = control_handlers if control_handlers is not None else []
        self.event_handlers = event_handlers if event_handlers is not None else []
        # HELLO options beyond version, client and heartbeat (room for credentials).
        self.hello_extra = hello_extra
        self.handshake: wire.ClientHandshake | None = None
        self.id_prefix = id_prefix
        # ``ids``: a counter the shell keeps across reconnects.  Given, every publish also
        # carries a ``dedupe`` key (protocol.md §5.2) and is kept in ``sent`` until its
        # reply, so that a resend after a failover is stored once (``take_resends``).
        self.dedupe = ids is not None
        self._next_id = (ids if ids is not None else itertools.count(1)).__next__
        self.sent: dict[int, tuple] = {}  # rid -> (queue, body, id, priority, options) until answered
        self.redirected: list[tuple] = []  # pipelined publishes refused with NOT_LEADER, to resend
        self.leader_hint: str | None = None  # the last NOT_LEADER message (it names the leader)
        self.last_rid = 0
        self.pending: dict[int, Pending] = {}
        self.unconfirmed: dict[int, str] = {}  # rid -> message id, in rid order
        self.refused: list[tuple[str, BrokerdError]] = []
        self.consumers: dict[int, ConsumerState] = {}
        self.acks: list[int] = []
        self.quiet_errors: deque[tuple[object, BrokerdError]] = deque(maxlen=100)
        # CONTROL broadcasts from the broker (e.g. revoke with terminate), for the shell
        self.controls: deque = deque(maxlen=1000)
        # EVENT frames of a subscription (SUBSCRIBE), as (events, dropped), for the shell
        self.events: deque = deque(maxlen=1000)
        self.out: list[bytes] = []
        self.out_bytes = 0
        self.last_sent = now
        self.last_received = now
        self.error: BrokerdError | None = None  # set once the connection is over
        self.closing: BrokerdError | None = None  # the broker's CLOSING reason, if it sent one
        self.bye_sent = False
        self.server: dict | None = None  # the HELLO reply
        self.returned = 0  # deliveries for no live consumer, given back with NACK(requeue)
        # Largest encoded frame we may send, header included (the broker's max_frame, from HELLO).
        self.max_frame = wire.DEFAULT_MAX_FRAME + wire.HEADER_SIZE
        # Protocol versions HELLO offers (protocol.md §10) and the one the broker picked.  On
        # version 2 pipelined publishes go out as PUBLISH_BATCH frames (§5.46) and come back
        # confirmed by CONFIRM_RANGE (§5.47); deliveries may come as DELIVER_BATCH (§5.48).
        self.versions = tuple(versions or OFFERED_VERSIONS)
        self.version = 1
        # The PUBLISH_BATCH being filled: its items, their message ids, its estimated size.
        # Closed into one frame before any other frame is buffered, so requests keep their order.
        self.batch: list = []
        self.batch_ids: list = []
        self.batch_bytes = 0
        self.publish_waiters: dict[int, Pending] = {}  # rid -> a waiting publish (version 2)

    # -- state -----------------------------------------------------------------------
    @property
    def is_open(self) -> bool:
        return self.error is None and not self.bye_sent

    def check_open(self) -> None:
        if self.error is not None:
            raise clone_error(self.error)
        if self.bye_sent:
            raise ConnectionClosed(None, "the client is closing; no new requests")

    def new_message_id(self) -> str:
        return f"{self.id_prefix}-{self._next_id()}"

    # -- output ------------------------------------------------------------------------
    def _queue(self, frame) -> None:
        if self.batch:
            self._close_batch()
        data = _encode(frame)
        self.out.append(data)
        self.out_bytes += len(data)

    def data_to_send(self, now: float) -> bytes:
        """Everything buffered (batched acks included), as one bytes object; b"" if nothing."""
        if self.acks:
            self._queue_acks()
        if self.batch:
            self._close_batch()
        if not self.out:
            return b""
        out = self.out
        data = out[0] if len(out) == 1 else b"".join(out)
        self.out = []
        self.out_bytes = 0
        self.last_sent = now
        return data

    @property
    def wants_flush(self) -> bool:
        return self.out_bytes >= FLUSH_BYTES

    @property
    def has_output(self) -> bool:
        return bool(self.out) or bool(self.acks) or bool(self.batch)

    # -- requests ----------------------------------------------------------------------
    def request(self, op: int, args: list, *, kind: int = K_REPLY, waiter=None, consumer=None, info=None) -> Pending:
        """Buffer ``[op, rid, *args]`` and return its ``Pending``."""
        self.check_open()
        if self.batch:  # publishes buffered before this request go first, under a lower rid
            self._close_batch()
        if self.acks:  # settle before anything else, in the order the user did it
            self._queue_acks()
        self.last_rid = rid = self.last_rid + 1
        p = Pending(rid, kind, waiter, consumer, info)
        self.pending[rid] = p
        self._queue([op, rid, *args])
        return p

    def hello(self, *, waiter=None) -> Pending:
        """Buffer the preamble and HELLO (the connection's first bytes)."""
        self.check_open()
        self.last_rid = rid = self.last_rid + 1
        versions = self.versions
        hs = self.handshake = wire.ClientHandshake(
            wire.Hello(version=versions[0] if len(versions) == 1 else list(versions), client=self.name, heartbeat=self.heartbeat, extra=self.hello_extra, rid=rid)
        )
        p = self.pending[rid] = Pending(rid, K_HELLO, waiter)
        data = hs.initiate()
        self.out.insert(0, data)  # before anything buffered early: the preamble comes first
        self.out_bytes += len(data)
        return p

    def publish(self, queue, body, msg_id, priority, options, *, waiter=None, confirm=True):
        """Buffer a PUBLISH.  Returns ``(pending, message_id)``.

        With ``confirm=False`` there is no Pending (None): the confirm is
        tracked in ``unconfirmed`` for ``wait_for_confirms``.
        """
        if self.error is not None or self.bye_sent:
            self.check_open()
        if type(queue) is not str:
            raise TypeError(f"queue must be a str (got {type(queue).__name__})")
        if type(body) is not bytes:
            if isinstance(body, (bytearray, memoryview)):
                body = bytes(body)
            else:
                raise TypeError(f"body must be bytes (got {type(body).__name__}); encode text first")
        opt_bytes = None  # the options' CBOR size, when known without encoding them
        if self.dedupe:
            # One key per publish (never per message: a retry of a task republishes its id
            # on purpose and must be stored); a resend passes its options, key included.
            if options is None or "dedupe" not in options:
                key = f"{self.id_prefix}-{self._next_id()}"
                if msg_id is None:
                    msg_id = key
                if options:
                    options = {**options, "dedupe": key}
                else:
                    options = {"dedupe": key}
                    # {"dedupe": key}: map head 1, "dedupe" 7, the key's head (at most 3) and bytes
                    opt_bytes = 11 + len(key.encode())
        elif msg_id is None:
            msg_id = f"{self.id_prefix}-{self._next_id()}"
        if self.acks:
            self._queue_acks()
        if not confirm and self.version >= 2:
            # Version 2: into the PUBLISH_BATCH being filled (one frame, one rid for many).
            est = len(body) + len(queue) + len(msg_id) + BATCH_ITEM_OVERHEAD
            if opt_bytes is not None:
                est += opt_bytes
            elif options is not None:
                est += len(wire._dumps(options))
            if est + BATCH_ITEM_OVERHEAD < self.max_frame:
                if self.batch_bytes + est + BATCH_ITEM_OVERHEAD > min(FLUSH_BYTES, self.max_frame):
                    self._close_batch()
                self.batch.append([queue, body, msg_id, priority, options])
                self.batch_ids.append(msg_id)
                self.batch_bytes += est
                self.out_bytes += est
                return None, msg_id
            # Larger than a frame may be: a PUBLISH of its own, refused below with the exact size.
        if self.batch:
            self._close_batch()
        self.last_rid = rid = self.last_rid + 1
        # The hot path: the frame of wire.publish_frame, built inline (a call per publish costs ~2%).
        data = _encode([OP_PUBLISH, rid, queue, body, msg_id, priority, options])
        if len(data) > self.max_frame:
            # The broker would close the connection (FRAME_TOO_LARGE); refuse it here instead.
            raise MessageTooLarge(
                None,
                f"a PUBLISH frame of {len(data) - wire.HEADER_SIZE} bytes is larger than the broker's "
                f"max_frame of {self.max_frame - wire.HEADER_SIZE} bytes; send a smaller body",
            )
        self.out.append(data)
        self.out_bytes += len(data)
        if self.dedupe:
            self.sent[rid] = (queue, body, msg_id, priority, options)
        if confirm:
            p = self.pending[rid] = Pending(rid, K_REPLY, waiter, info=msg_id)
            if self.version >= 2:  # its OK may come as part of a CONFIRM_RANGE (§5.47)
                self.publish_waiters[rid] = p
            return p, msg_id
        self.unconfirmed[rid] = msg_id
        return None, msg_id

    def _close_batch(self) -> None:
        """Buffer the PUBLISH_BATCH being filled as one frame (§5.46) under one new rid."""
        items, ids = self.batch, self.batch_ids
        self.batch = []
        self.batch_ids = []
        self.out_bytes -= self.batch_bytes
        self.batch_bytes = 0
        self.last_rid = rid = self.last_rid + 1
        data = _encode([OP_PUBLISH_BATCH, rid, items])
        if len(data) > self.max_frame:
            # The size estimate counts characters, not UTF-8 bytes: only a tiny max_frame and long
            # non-ASCII ids get here.  Each item goes alone; one too large for any frame is refused
            # here (the broker would close the connection) and reported by wait_for_confirms.
            self.last_rid -= 1
            for item, mid in zip(items, ids):
                self.last_rid = rid = self.last_rid + 1
                data = _encode([OP_PUBLISH, rid, *item])
                if len(data) > self.max_frame:
                    self.refused.append((mid, MessageTooLarge(None, (
                        f"a PUBLISH frame of {len(data) - wire.HEADER_SIZE} bytes is larger than the broker's "
                        f"max_frame of {self.max_frame - wire.HEADER_SIZE} bytes; send a smaller body"))))
                    continue
                self.out.append(data)
                self.out_bytes += len(data)
                self.unconfirmed[rid] = mid
                if self.dedupe:
                    self.sent[rid] = tuple(item)
            return
        self.out.append(data)
        self.out_bytes += len(data)
        self.unconfirmed[rid] = ids
        if self.dedupe:  # resent item by item after a reconnect (each carries its dedupe key)
            self.sent[rid] = items

    def consume(self, queues, prefetch: int, *, waiter=None, state: ConsumerState | None = None,
                slots: int | None = None) -> Pending:
        """CONSUME; ``state`` is a ``ConsumerState`` the shell made earlier (else a new one).
        ``slots``: the consumer runs that many at once and answers RECALL (protocol.md §5.42)."""
        if isinstance(queues, str):
            queues = [queues]
        cs = state if state is not None else ConsumerState(queues, prefetch)
        if slots is None:
            slots = cs.slots
        cs.slots = slots
        cs.session = self
        args = [list(queues), prefetch] if slots is None else [list(queues), prefetch, {"slots": slots}]
        return self.request(OP_CONSUME, args, kind=K_CONSUME, waiter=waiter, consumer=cs)

    def credit(self, cs: ConsumerState, prefetch: int, *, waiter=None) -> Pending:
        """CREDIT (protocol.md §5.40): the consumer's prefetch from now on (acks batch by it too)."""
        cs.prefetch = prefetch
        cs.ack_threshold = max(1, int(prefetch * ACK_BATCH_FRACTION))
        return self.request(OP_CREDIT, [cs.tag, prefetch], waiter=waiter)

    def release(self, ds, *, waiter=None) -> Pending:
        """RELEASE (protocol.md §5.41): give back deliveries not started; not an attempt."""
        for d in ds:
            self._settle(d, "release")
        return self.request(OP_RELEASE, [[d.tag for d in ds]], waiter=waiter)

    def give_back(self, cs: ConsumerState) -> bool:
        """After CANCEL's reply: NACK (requeue) what ``cs`` received but never handed
        out, without waiting.  True when frames were buffered (flush them)."""
        leftovers = list(cs.buffer)
        cs.buffer.clear()
        for d in leftovers:
            self.nack(d, True, None, quiet=True)
        return bool(leftovers)

    def cancel(self, cs: ConsumerState, *, waiter=None) -> Pending:
        return self.request(OP_CANCEL, [cs.tag], kind=K_CANCEL, waiter=waiter, consumer=cs)

    def bye(self, *, waiter=None) -> Pending:
        p = self.request(OP_BYE, [], kind=K_BYE, waiter=waiter)
        self.bye_sent = True
        return p

    def heartbeat_frame(self) -> None:
        self.out.append(HEARTBEAT_BYTES)
        self.out_bytes += len(HEARTBEAT_BYTES)

    # -- settling deliveries -------------------------------------------------------------
    def _settle(self, d: Delivery, what: str) -> None:
        if self.error is not None:
            raise clone_error(self.error)
        if d._settled:
            raise StaleDelivery(None, f"delivery {d.tag} of message {d.id!r} was already settled; cannot {what} it")
        if d._state.session is not self:
            # Its tag names a delivery of a connection that is gone (a reconnect, a failover):
            # sent on this one it could settle another delivery.  The broker redelivers it.
            raise StaleDelivery(None, f"delivery {d.tag} of message {d.id!r} came on an earlier connection; "
                                      f"cannot {what} it on this one (brokerd redelivers it)")
        d._settled = True

    def ack(self, d: Delivery) -> bool:
        """Add ``d`` to the ack batch.  True when the batch should be sent now."""
        self._settle(d, "ack")
        acks = self.acks
        acks.append(d.tag)
        return len(acks) >= d._state.ack_threshold

    def ack_now(self, d: Delivery, *, waiter=None) -> Pending:
        """An ACK of ``d`` alone, waited for (the batch goes out first)."""
        self._settle(d, "ack")
        return self.request(OP_ACK, [d.tag], waiter=waiter)

    def nack(self, d: Delivery, requeue: bool = True, delay=None, headers=None, *, waiter=None, quiet=False) -> Pending:
        self._settle(d, "nack")
        args = [d.tag, bool(requeue), seconds(delay, "delay")]
        if headers is not None:
            args.append(dict(headers))
        return self.request(OP_NACK, args, kind=K_QUIET if quiet else K_REPLY, waiter=waiter, info=d.tag)

    def store_result(self, task_id, state, value, meta, ttl=None, d: Delivery | None = None, *, waiter=None) -> Pending:
        """RESULT_SET; with ``d``, brokerd acks that delivery in the same log record."""
        opts = {}
        if ttl is not None:
            opts["ttl"] = ttl if type(ttl) is int or type(ttl) is float else seconds(ttl, "ttl")
        if d is not None:
            self._settle(d, "store a result for")
            opts["tag"] = d.tag
        return self.request(OP_RESULT_SET, [task_id, state, value, meta, opts or None], waiter=waiter)

    def touch(self, d: Delivery, *, waiter=None) -> Pending:
        if d._settled:
            raise StaleDelivery(None, f"delivery {d.tag} of message {d.id!r} was already settled; cannot touch it")
        return self.request(OP_TOUCH, [d.tag], waiter=waiter)

    def _queue_acks(self) -> None:
        if self.batch:  # request ids rise in the order frames are sent (CONFIRM_RANGE needs it)
            self._close_batch()
        tags = self.acks
        self.acks = []
        self.last_rid = rid = self.last_rid + 1
        self.pending[rid] = Pending(rid, K_QUIET, info=tags)
        self._queue(wire.ack_frame(rid, tags))

    # -- confirms ---------------------------------------------------------------------------
    def confirm_mark(self) -> int:
        """The request id that every publish so far is at or below."""
        if self.batch:  # the batch being filled gets its rid now, so the mark covers it
            self._close_batch()
        return self.last_rid

    def confirmed_through(self, mark: int) -> bool:
        """True when no pipelined publish with rid <= mark awaits its confirm."""
        for rid in self.unconfirmed:  # insertion order is rid order: look at the oldest only
            return rid > mark
        return True

    def take_resends(self) -> list[tuple]:
        """What a reconnect must resend: the pipelined publishes never answered (in the order
        they were sent) and those refused with NOT_LEADER; emptied here."""
        sent = self.sent
        out = list(self.redirected)
        for rid in self.unconfirmed:
            entry = sent.get(rid)
            if type(entry) is list:  # a PUBLISH_BATCH: its items
                out.extend(tuple(item) for item in entry)
            elif entry is not None:
                out.append(entry)
        self.redirected = []
        for rid in list(self.unconfirmed):
            sent.pop(rid, None)
        self.unconfirmed.clear()
        return out

    def unconfirmed_ids(self, mark: int | None = None) -> list[str]:
        out = []
        for rid, mid in self.unconfirmed.items():  # mid: one message id, or a batch's list of them
            if mark is None or rid <= mark:
                if type(mid) is list:
                    out.extend(mid)
                else:
                    out.append(mid)
        return out

    def take_refused(self) -> list[tuple[str, BrokerdError]]:
        refused = self.refused
        self.refused = []
        return refused

    def confirms_wait(self, mark: int, deadline: float | None, now: float, timeout) -> tuple[bool, float | None]:
        """One step of ``wait_for_confirms``: ``(True, _)`` once every publish up to
        ``mark`` is answered, else ``(False, seconds to wait)`` (None: no limit).
        Raises the connection's error (``unconfirmed`` set to the ids whose fate is
        unknown) or ``Timeout`` once ``deadline`` passed."""
        if self.confirmed_through(mark):
            return True, None
        if self.error is not None:
            err = clone_error(self.error)
            err.unconfirmed = self.unconfirmed_ids(mark)
            raise err
        if deadline is None:
            return False, None
        remaining = deadline - now
        if remaining <= 0:
            raise Timeout(None, f"{len(self.unconfirmed_ids(mark))} publishes still unconfirmed after {timeout:g} s")
        return False, remaining

    def raise_refused(self) -> None:
        """End of ``wait_for_confirms``: ``PublishError`` naming the refused publishes, if any."""
        refused = self.take_refused()
        if refused:
            raise PublishError(refused)

    def log_uncollected(self) -> None:
        """At close: log refusals nobody collected with ``wait_for_confirms``, and quiet errors."""
        for mid, exc in self.refused:
            log.warning("publish of %r was refused and never collected by wait_for_confirms: %s", mid, exc)
        self.log_quiet_errors()

    # -- input -------------------------------------------------------------------------------
    def receive(self, frames: list, now: float) -> list:
        """Apply decoded frames from the broker.  Returns what to wake.

        The list holds ``Pending`` objects (now done), ``ConsumerState``
        objects (new deliveries or cancelled; may repeat), ``CONFIRMS`` when
        pipelined confirms arrived and ``FLUSH`` when the session buffered
        frames of its own (a NACK giving back a delivery for a consumer that
        is gone) that the shell should send soon.
        """
        self.last_received = now
        wake = []
        unconfirmed = self.unconfirmed
        pending = self.pending
        consumers = self.consumers
        last_cs = None
        confirms = False
        owner = self.owner
        for f in frames:
            op = f[0]
            if op == OP_DELIVER:
                if len(f) < 8:
                    raise RemoteProtocolError("BAD_FRAME", f"DELIVER frame with {len(f)} fields, expected 9")
                cs = consumers.get(f[1])
                if cs is None:
                    # A delivery for a consumer we cancelled (it was on its way when the
                    # CANCEL's reply came) or never had: give it straight back, so it
                    # is not held until the connection closes.
                    self._give_back(f)
                    if FLUSH not in wake:
                        wake.append(FLUSH)
                    continue
                cs.buffer.append(Delivery(owner, cs, f))
                cs.received += 1
                if cs is not last_cs:
                    wake.append(cs)
                    last_cs = cs
            elif op == OP_OK or op == OP_ERROR:
                rid = f[1] if len(f) > 1 else None
                entry = self.sent.pop(rid, None) if self.sent else None
                mid = unconfirmed.pop(rid, None)
                if mid is not None:
                    if op == OP_ERROR:
                        err = _error(f)
                        if entry is not None and err.code == "NOT_LEADER":
                            # resent to the leader by the shell (a batch: each of its items)
                            if type(entry) is list:
                                self.redirected.extend(tuple(item) for item in entry)
                            else:
                                self.redirected.append(entry)
                            self.leader_hint = err.message
                        elif type(mid) is list:  # a PUBLISH_BATCH refused whole
                            self._batch_answered(mid, f)
                        else:
                            self.refused.append((mid, err))
                    elif type(mid) is list:  # a PUBLISH_BATCH's answer
                        self._batch_answered(mid, f)
                    confirms = True
                    continue
                p = pending.pop(rid, None)
                if self.publish_waiters:
                    self.publish_waiters.pop(rid, None)
                if p is None:
                    if op == OP_ERROR:  # e.g. rid 0: the broker could not read our request id
                        self.quiet_errors.append((rid, _error(f)))
                    continue
                p.done = True
                if op == OP_OK:
                    result = f[2] if len(f) > 2 else None
                    kind = p.kind
                    if kind == K_REPLY:
                        p.result = result
                    else:
                        self._on_ok(p, result, wake)
                else:
                    p.error = _error(f)
                    if p.kind == K_QUIET:
                        self.quiet_errors.append((p.info, p.error))
                if p.kind != K_QUIET:
                    wake.append(p)
            elif op == OP_CONFIRM_RANGE:
                if self._confirm_range(f, wake):
                    confirms = True
            elif op == OP_DELIVER_BATCH:
                try:
                    batch = wire.deliveries_of_batch(f)
                except wire.WireError as exc:
                    raise RemoteProtocolError(exc.code, exc.message) from None
                cs = consumers.get(f[1])
                if cs is None:  # for a consumer we cancelled: each given back, as a DELIVER would be
                    for d in batch:
                        self._give_back(d)
                    if FLUSH not in wake:
                        wake.append(FLUSH)
                    continue
                buffer = cs.buffer
                for d in batch:
                    buffer.append(Delivery(owner, cs, d))
                cs.received += len(batch)
                if cs is not last_cs:
                    wake.append(cs)
                    last_cs = cs
            elif op == OP_HEARTBEAT:
                pass
            elif op == OP_CONTROL:
                self.controls.append(wire.Control.from_frame(f).payload)
                if CONTROL not in wake:
                    wake.append(CONTROL)
            elif op == OP_RECALL:
                # Sent only to a consumer that gave slots (a worker); it reaches the CONTROL
                # handlers as {"recall": [consumer, n, queue]}, beside revoke and commands.
                self.controls.append({"recall": list(wire.Recall.from_frame(f))})
                if CONTROL not in wake:
                    wake.append(CONTROL)
            elif op == OP_EVENT:
                ev = wire.Event.from_frame(f)
                self.events.append((ev.events, ev.dropped))
                if EVENTS not in wake:
                    wake.append(EVENTS)
            elif op == OP_CLOSING:
                c = wire.Closing.from_frame(f)
                self.closing = lost_from_closing(c.code, c.message)
            else:
                raise RemoteProtocolError("BAD_FRAME", f"the broker sent op code {op!r}, which a client does not expect")
        if confirms:
            wake.append(CONFIRMS)
        return wake

    def _batch_answered(self, ids: list, f: list) -> None:
        """A PUBLISH_BATCH's OK (null: all stored; else one result per item, ``[code, message]``
        for a refused one) or ERROR (the whole batch refused): note the refused ids."""
        if f[0] == OP_ERROR:
            err = _error(f)
            self.refused.extend((mid, err) for mid in ids)
            return
        results = f[2] if len(f) > 2 else None
        if results is None:
            return
        if type(results) is not list or len(results) != len(ids):
            raise RemoteProtocolError("BAD_FRAME", "a PUBLISH_BATCH reply must be null or one result per item")
        for mid, r in zip(ids, results):
            if type(r) is list:
                code = r[0] if r and type(r[0]) is str else "BAD_FRAME"
                self.refused.append((mid, _error(wire.error_frame(None, code, r[1] if len(r) > 1 else ""))))

    def _confirm_range(self, f: list, wake: list) -> bool:
        """§5.47 CONFIRM_RANGE [72, first, last]: every publish with a rid in the range that had
        no other answer is confirmed (a waiting ``publish()`` gets the id it sent)."""
        try:
            first, last = wire.ConfirmRange.from_frame(f)
        except wire.WireError as exc:
            raise RemoteProtocolError(exc.code, exc.message) from None
        unconfirmed = self.unconfirmed
        sent = self.sent  # what a reconnect would resend: confirmed now, so forgotten
        done = False
        # rids are handed out in rising order and the dict keeps that order: pop from the front
        older = False
        while unconfirmed:
            rid = next(iter(unconfirmed))
            if rid > last:
                break
            if rid < first:
                older = True
                break
            del unconfirmed[rid]
            if sent:
                sent.pop(rid, None)
            done = True
        if older:  # an older publish still waits its own answer: look through them all
            for rid in [r for r in unconfirmed if first <= r <= last]:
                del unconfirmed[rid]
                if sent:
                    sent.pop(rid, None)
                done = True
        waiting = self.publish_waiters
        if waiting:
            for rid in [r for r in waiting if first <= r <= last]:
                p = waiting.pop(rid)
                if sent:
                    sent.pop(rid, None)
                if self.pending.pop(rid, None) is not None:
                    p.done = True
                    p.result = p.info
                    wake.append(p)
        return done

    def _give_back(self, f: list) -> None:
        tag = f[2] if len(f) > 2 else None
        if type(tag) is not int or self.error is not None or self.bye_sent:
            return
        if self.batch:
            self._close_batch()
        self.last_rid = rid = self.last_rid + 1
        self.pending[rid] = Pending(rid, K_QUIET, info=tag)
        self._queue(wire.nack_frame(rid, tag, True, None))
        self.returned += 1

    def _on_ok(self, p: Pending, result, wake: list) -> None:
        kind = p.kind
        p.result = result
        if kind == K_CONSUME:
            cs = p.consumer
            if type(result) is not int:
                p.error = RemoteProtocolError("BAD_FRAME", f"CONSUME reply must carry an integer consumer tag, got {result!r}")
                return
            cs.tag = result
            self.consumers[result] = cs
        elif kind == K_CANCEL:
            cs = p.consumer
            self.consumers.pop(cs.tag, None)
            cs.cancelled = True
            wake.append(cs)
        elif kind == K_HELLO:
            welcome = wire.Welcome.from_result(result)
            self.server = welcome.info
            if type(welcome.version) is int and welcome.version in self.versions:
                self.version = welcome.version
            if welcome.heartbeat is not None:
                self.heartbeat = welcome.heartbeat
            if welcome.max_frame is not None:
                self.max_frame = welcome.max_frame + wire.HEADER_SIZE

    def connection_lost(self, exc, *, address, closed: bool = False) -> list:
        """The connection is over; say why in one error and fail everything with it.

        ``exc``: what the shell's reader or writer saw (None: a clean EOF or
        our own close).  ``closed``: the shell was closed by its user.  In
        order: closed by us (or after BYE) → ``ConnectionClosed``; the broker
        said CLOSING → that reason; a ``BrokerdError`` → itself; anything
        else → ``ConnectionLost`` naming ``address`` and the cause.  Returns
        what to wake (as ``fail``); a second call changes nothing.
        """
        if self.error is not None:
            return []
        if closed or self.bye_sent:
            err = ConnectionClosed(None, "the client was closed")
        elif self.closing is not None:
            err = self.closing
        elif isinstance(exc, BrokerdError):
            err = exc
        else:
            why = f"{type(exc).__name__}: {exc}" if exc is not None else "the broker closed the connection"
            err = ConnectionLost(None, f"connection to brokerd at {address} lost ({why})")
        if exc is not None and err is not exc and isinstance(exc, BaseException):
            err.__cause__ = exc
        return self.fail(err)

    def reader_failed(self, exc: BaseException, io_errors: tuple = (OSError,)) -> BaseException:
        """What the exception that stopped a shell's reader means, to hand to ``connection_lost``.

        An unreadable frame is the broker's fault (``RemoteProtocolError``); a
        ``BrokerdError`` or one of the shell's ``io_errors`` is the connection
        ending; anything else is a bug in the client, logged with its traceback
        (every waiter is then failed rather than left hanging).
        """
        if isinstance(exc, wire.WireError):
            return RemoteProtocolError(exc.code, f"the broker sent an unreadable frame: {exc.message}")
        if not isinstance(exc, (BrokerdError, *io_errors)):
            log.error("brokerd client reader crashed", exc_info=exc)
        return exc

    def run_handlers(self) -> None:
        """Hand queued CONTROL payloads and EVENT batches to their handlers.

        Called by the shell's reader when ``receive`` returned ``CONTROL`` or
        ``EVENTS``.  A handler that raises is logged and the others still run:
        one bad handler must not cost the connection its reader.
        """
        controls = self.controls
        while controls:
            payload = controls.popleft()
            for fn in list(self.control_handlers):
                try:
                    fn(payload)
                except Exception:
                    log.exception("a CONTROL handler failed")
        frames = self.events
        while frames:
            events, dropped = frames.popleft()
            for fn in list(self.event_handlers):
                try:
                    fn(events, dropped)
                except Exception:
                    log.exception("an event handler failed")

    def log_quiet_errors(self) -> None:
        """Log the refusals of background requests (batched acks, give-backs) once each."""
        errs = self.quiet_errors
        while errs:
            what, exc = errs.popleft()
            log.warning("brokerd refused a background request (%s): %s", what, exc)

    def fail(self, exc: BrokerdError) -> list:
        """The connection is over (lost, or closed by us).  Fail everything; return what to wake.

        ``exc`` is kept as ``error``; a CLOSING reason the broker sent wins
        over a bare "connection lost".
        """
        if self.error is None:
            self.error = exc
        err = self.error
        wake = []
        for p in self.pending.values():
            if not p.done:
                p.done = True
                p.error = clone_error(err)
                if p.kind != K_QUIET:
                    wake.append(p)
        self.pending.clear()
        for cs in self.consumers.values():
            cs.error = err
            wake.append(cs)
        wake.append(CONFIRMS)
        self.acks = []
        self.out = []
        self.out_bytes = 0
        self.batch = []
        self.batch_ids = []
        self.batch_bytes = 0
        self.publish_waiters.clear()
        return wake

    # -- heartbeats -------------------------------------------------------------------
    def heartbeat_due(self, now: float) -> bool:
        """We have sent nothing for a heartbeat interval: send HEARTBEAT."""
        hb = self.heartbeat
        return hb > 0 and now - self.last_sent >= hb

    def peer_silent(self, now: float) -> bool:
        """The broker has sent nothing for two intervals: treat the connection as dead."""
        hb = self.heartbeat
        return hb > 0 and now - self.last_received > 2 * hb

    def timers(self, now: float) -> tuple[bool, BrokerdError | None, float]:
        """The flusher's look at the clock, for both shells.

        Logs background refusals, buffers a HEARTBEAT when one is due, and
        returns ``(flush now, the error if the broker went silent, seconds until
        the next look)``; the wait is clamped to [1 ms, 1 s] so a flusher also
        notices a close promptly.
        """
        self.log_quiet_errors()
        beat = self.heartbeat_due(now)
        if beat:
            self.heartbeat_frame()
        lost = None
        if self.peer_silent(now):
            lost = ConnectionLost("HEARTBEAT_TIMEOUT", f"nothing heard from brokerd for {2 * self.heartbeat:g} s")
        return beat, lost, min(max(self.next_timer() - now, 0.001), 1.0)

    def next_timer(self) -> float:
        """When heartbeat_due or peer_silent next needs a look (absolute; inf when off)."""
        hb = self.heartbeat
        if hb <= 0:
            return float("inf")
        return min(self.last_sent + hb, self.last_received + 2 * hb)
