"""BrokerState: every protocol operation as a plain method, no I/O, no clock.

The runtime decodes a batch of frames, calls one method per frame with the
time it read once for the batch (``now``), and then takes the batch's effects
in one call, ``take_effects()`` (``broker.state.effects.Effects``): frames per
connection (replies and deliveries), log records, and when to wake the state
next.

Methods return the reply's result or raise a ``broker.errors`` class; the
caller turns that into an OK or ERROR frame.  Deliveries are queued by the
dispatcher (``send_to``), because one publish may wake any consumer anywhere.

Invariant kept after every method (the dispatcher's job, checked by the
stateful test): no consumer has credit while one of its un-paused queues has a
ready message.  That is what makes "a consumer of high,low takes high first"
and "never more unacked than prefetch" hold at once.

Nothing here does I/O or reads a clock (tests/test_layering.py checks it).
"""

from __future__ import annotations

import itertools

from sortedcontainers import SortedList

from broker.errors import (
    BadRequest,
    BrokerError,
    LogFailed,
    NotFound,
    QueueFull,
    StaleDelivery,
)
from broker.state import log_records as R
from broker.state.consumers import Conn, Consumer, Delivery
from broker.state.dedupe import DedupeWindow
from broker.state.effects import Effects
from broker.state.events import EventsMixin
from broker.state.exchanges import ExchangesMixin
from broker.state.unique import UniqueMixin
from broker.state.flow import PARKED, flow_tag
from broker.state.flowcontrol import FlowMixin
from broker.state.inspection import InspectionMixin
from broker.state.management import ManagementMixin
from broker.state.queue import (
    DELAYED,
    GONE,
    INFLIGHT,
    MAX_PRIORITY,
    PACK_AFTER,
    READY,
    Message,
    Queue,
    validate_queue_name,
)
from broker.state.replay import ReplayMixin
from broker.state.spill import SpillMixin
from broker.state.results import ResultsMixin
from broker.state.schedules import WorkflowMixin
from client.wire import control_frame, deliver_frame, recall_frame

MAX_PREFETCH = 65535  # per consumer; bounds what one connection can hold
MAX_MESSAGE_ID = 255  # bytes; a UUID is 36
# A PUBLISH_BATCH frame up to this size is logged as it came (publish_run's PUBLISH_FRAME): a
# follower then always gets the frame and its PUBLISH_NEXT records in one RECORDS frame, well
# under its frame limit (broker/runtime/durability.py records_from).
PUBLISH_FRAME_MAX_BYTES = 1 << 20
NEVER = float("inf")
# RECALL (protocol.md §5.44): a consumer is sent at most one RECALL per this many seconds, and an
# idle consumer asks at most that often.  It bounds the frames (10 a second per consumer) and
# gives the holder a round trip to answer before it is asked again, so nothing is asked twice.
RECALL_INTERVAL = 0.1


def _queue_name(q) -> str:
    return q.name


class BrokerState(ManagementMixin, ResultsMixin, WorkflowMixin, EventsMixin, ReplayMixin, InspectionMixin,
                  ExchangesMixin, UniqueMixin, FlowMixin, SpillMixin):
    def __init__(self, *, boot_id: str = "b"):
        self.queues: dict[str, Queue] = {}
        self.conns: dict[int, Conn] = {}
        self.outbox: dict[int, list] = {}
        self.records: list = []
        self.log_enabled = False  # the server turns this on when a WAL is attached
        # LSN of the last record emitted; the log assigns the same numbers in the
        # same order (the server checks), so a message can remember where its
        # full state was last written: that is what compaction needs to know.
        self.last_lsn = 0
        self.log_failed: str | None = None  # set when the log cannot write: refuse changes
        # While a disconnect returns its deliveries: the dead-letter queues they went to, to be
        # dispatched with the rest (None: a dead letter is dispatched at once).
        self._defer_dead_letter_dispatch: set | None = None
        self._seq = itertools.count(1)
        self._tags = itertools.count(1)
        self._ctags = itertools.count(1)
        self._boot = boot_id
        self._id_prefix = f"{boot_id}-"  # the ids the broker makes: "<boot>-<seq>"
        # (ready_at, seq, msg) for delayed messages, broker-wide: one place to
        # ask "when is the next one due".
        self._delayed = SortedList()
        # (expires, seq, msg) for messages with a TTL
        self._ttl = SortedList()
        # (deadline, tag) for deliveries on queues with a reserve_timeout
        self._deadlines = SortedList()
        self.inflight: dict[int, Delivery] = {}
        self._delivered_seqs: list[int] = []
        self._init_results()
        self._init_workflow()
        self._init_events()
        self._init_exchanges()
        self._init_unique()
        self._init_flow()
        self._init_spill()
        self.dedupe = DedupeWindow()  # producers' resends after a failover (dedupe.py)
        # Idle consumers (free slots, nothing ready) to look at again when RECALL_INTERVAL has
        # passed; empty unless some queue has an idle consumer and a holder with surplus.
        self._recall_idle: dict = {}
        self._recall_due = NEVER
        self._replaying = False
        self._held = None  # queues whose dispatch waits for release_dispatch (PUBLISH_BATCH)
        self._settled = None  # consumers whose refill waits for release_settles (a run of RESULT_SETs)
        self._server_stats = dict  # no runtime attached: no bounds to report

    # -- plumbing ------------------------------------------------------------
    def send_to(self, conn_id: int, frame) -> None:
        """Queue ``frame`` for connection ``conn_id``; it leaves with the next ``take_effects``."""
        box = self.outbox.get(conn_id)
        if box is None:
            self.outbox[conn_id] = [frame]
        else:
            box.append(frame)

    _send = send_to

    def output_mark(self, conn_id: int) -> int:
        """How many frames are queued for ``conn_id``: where its next reply goes (``insert_reply``)."""
        box = self.outbox.get(conn_id)
        return len(box) if box else 0

    def insert_reply(self, conn_id: int, mark: int, reply) -> None:
        """Queue a reply ahead of the frames its request caused (deliveries to the same
        connection), at the ``output_mark`` taken before the request ran."""
        box = self.outbox.get(conn_id)
        if box is None:
            self.outbox[conn_id] = [reply]
        elif len(box) == mark:
            box.append(reply)
        else:
            box.insert(mark, reply)

    def _next_seq(self) -> int:
        """The seq of a message about to be created.

        With the log on it is the LSN that the record creating the message will
        get, so the caller must log that record next; Message.lsn then stays
        None (= seq) until compaction rewrites the message, which saves one
        int object (~32 B) per queued message."""
        if self.log_enabled:
            return self.last_lsn + 1
        return next(self._seq)

    def _log_created(self, msg: Message, rtype: int, payload) -> None:
        lsn = self._log(rtype, payload)
        if lsn != msg.seq:
            msg.lsn = lsn

    def _log(self, rtype: int, payload) -> int:
        """Queue one log record; return the LSN the log will give it."""
        if self.log_enabled:
            self.last_lsn += 1
            self.records.append((rtype, payload))
        return self.last_lsn

    def broadcast_control(self, payload: dict) -> int:
        """Send a CONTROL frame to every connection that consumes; returns how many."""
        n = 0
        for conn in self.conns.values():
            if conn.consumers:
                self._send(conn.id, control_frame(payload))
                n += 1
        return n

    def take_effects(self) -> Effects:
        """Everything the last calls produced for the outside world, handed over once.

        The runtime applies it: frames to connections, records to the log (with
        a WAL attached), and it sleeps until ``next_wakeup`` at most."""
        return Effects(self.take_outbox(), self.take_records(), self.next_wakeup())

    # -- the outside world's few handles on the state ------------------------------
    def enable_log(self) -> None:
        """A write-ahead log is attached: changes produce records from now on."""
        self.log_enabled = True

    def fail_log(self, message: str) -> None:
        """The log cannot write: refuse changes with LOG_FAILED (``message``) and drop unlogged records."""
        self.log_failed = message
        self.log_enabled = False
        self.records = []

    def align_lsn(self, log_last_lsn: int) -> None:
        """After replay: number new records after the log's last one (a repair can leave gaps)."""
        self.last_lsn = max(self.last_lsn, log_last_lsn + len(self.records))

    def name_connection(self, conn_id: int, name: str) -> None:
        """The name a client gave in HELLO (shown by CONSUMERS, the web page, events)."""
        self.conns[conn_id].name = name

    def set_backlog_probe(self, probe) -> None:
        """``probe(conn_id) -> bytes`` unsent to that connection: events to a subscriber
        that reads too slowly are dropped past a bound."""
        self.output_backlog = probe

    def set_server_stats(self, probe) -> None:
        """``probe() -> dict`` of the runtime's bounds (memory, connections, input), for STATS."""
        self._server_stats = probe

    def server_statistics(self) -> dict:
        return self._server_stats()

    def take_outbox(self) -> dict[int, list]:
        if self._pending_events:
            self._push_events()  # one EVENT frame per subscriber for this batch
        box = self.outbox
        self.outbox = {}
        return box

    def take_records(self) -> list | tuple:
        recs = self.records
        if not recs:
            return ()  # most batches without a log: no new list each time
        self.records = []
        return recs

    def queue(self, name: str) -> Queue:
        """The named queue, created with default options on first use."""
        q = self.queues.get(name)
        if q is None:
            validate_queue_name(name)
            q = self.queues[name] = Queue(name)
            if self._body_reader is not None:
                self._spill_setup(q)
        return q

    def existing_queue(self, name) -> Queue:
        q = self.queues.get(name)
        if q is None:
            validate_queue_name(name)
            raise NotFound(f"queue {name!r} does not exist")
        return q

    # -- connections -----------------------------------------------------------
    def connect(self, conn_id: int, name: str = "") -> None:
        self.conns[conn_id] = Conn(conn_id, name)

    def disconnect(self, conn_id: int, now: float) -> int:
        """Forget a connection: cancel its consumers, return its deliveries,
        drop its temporary bindings and queues.

        Returns how many deliveries went back.  Every one is marked redelivered
        by its raised attempt count (or dead-lettered at max_attempts).
        """
        n = self._disconnect(conn_id, now)
        if conn_id in self._temp_bindings or conn_id in self._temp_queues:
            self._exchanges_disconnect(conn_id, now)
        return n

    def _disconnect(self, conn_id: int, now: float) -> int:
        self._events_disconnect(conn_id, now)  # before the conn is forgotten: its worker, subscription
        conn = self.conns.pop(conn_id, None)
        self.outbox.pop(conn_id, None)
        if conn is None:
            return 0
        if self._waiters:
            self._drop_waiters_of(conn_id)
        for c in list(conn.consumers.values()):
            self._remove_consumer(c)
        touched = set()
        n = 0
        # Every delivery goes back before any queue is dispatched, dead-letter queues included,
        # so the next consumer gets the best of them all (priority, then age), not the first
        # one returned.
        self._defer_dead_letter_dispatch = touched
        try:
            for d in list(conn.deliveries.values()):
                self._take_back(d, now)
                touched.add(d.msg.queue)
                n += 1
        finally:
            self._defer_dead_letter_dispatch = None
        conn.deliveries.clear()
        if self._flow_woke:
            touched |= self._flow_take_woke()
        if touched:
            self._dispatch_many(touched, now)
        return n

    # -- publish ---------------------------------------------------------------
    def publish(
        self,
        conn_id: int,
        queue: str,
        body: bytes,
        msg_id: str | None,
        priority: int,
        now: float,
        *,
        delay: float | None = None,
        eta: float | None = None,
        ttl: float | None = None,
        headers: dict | None = None,
        dedupe: str | None = None,
    ) -> str:
        if self.log_failed:
            raise LogFailed(self.log_failed)
        if dedupe is not None:
            # A producer's resend after a failover (broker/state/dedupe.py): stored once.
            held = self.dedupe.seen(dedupe, now)
            if held is not None:
                return held
        if type(priority) is not int or not 0 <= priority <= MAX_PRIORITY:
            raise BadRequest(f"priority must be a whole number from 0 to 255 (got {priority!r})")
        if msg_id is not None and (type(msg_id) is not str or not msg_id or len(msg_id) > MAX_MESSAGE_ID):
            raise BadRequest(f"a message id must be a text string of 1 to {MAX_MESSAGE_ID} characters")
        q = self.queues.get(queue) or self.queue(queue)
        plain = headers is None and delay is None and ttl is None and (eta is None or eta <= now)
        if plain:
            flow = ready_at = expires = None  # what most publishes are: nothing more to look at
        else:
            # What the headers ask of flow control (protocol.md §5.2.1), checked before anything changes.
            flow = flow_tag(headers) if headers is not None else None
            if flow is not None:
                self._flow_check(flow)
            ready_at = None
            if delay is not None:
                if delay > 0:
                    ready_at = now + delay
            elif eta is not None and eta > now:
                ready_at = eta
            expires = now + ttl if ttl is not None else None
        max_length = q.options.max_length
        if max_length is not None and q.length >= max_length:
            if q.options.overflow == "reject":
                q.rejected += 1
                raise QueueFull(
                    f"queue {q.name!r} is full ({max_length} messages, overflow=reject); "
                    "retry later or raise max_length")
            self._drop_head(q, now)
        log = self.log_enabled
        # The seq is the LSN of the PUBLISH record logged below (_next_seq says why).
        seq = self.last_lsn + 1 if log else next(self._seq)
        own_id = msg_id is None
        if own_id:
            msg_id = self._id_prefix + str(seq)
        if plain and q.ready_count >= PACK_AFTER:
            # A plain message behind a backlog: packed into its queue's arrays, no object made.
            q.published += 1
            if log:
                self.last_lsn = seq
                if dedupe is None:
                    self.records.append((R.PUBLISH, [seq, q.name, msg_id, body, priority, None, 0, None, None, now]))
                else:  # the 11th item: replay rebuilds the window from it
                    self.records.append(
                        (R.PUBLISH, [seq, q.name, msg_id, body, priority, None, 0, None, None, now, dedupe]))
            if dedupe is not None:
                self.dedupe.remember(dedupe, msg_id, now, now)
            q.push_plain(seq, msg_id, own_id, body, priority, now, self._id_prefix)
            if q.consumers and not q.paused:
                held = self._held  # _dispatch_or_hold, written out
                if held is None or max_length is not None:
                    self._dispatch_queue(q, now)
                else:
                    held[q] = None
            return msg_id
        msg = Message(seq, msg_id, q, body, priority, headers, 0, ready_at, expires, now)
        if flow is not None:
            msg.flow = flow
            self._flow_publish(q, flow)
        q.published += 1
        if log:
            self.last_lsn = seq
            if dedupe is None:
                self.records.append((R.PUBLISH, [seq, q.name, msg_id, body, priority, headers, 0, ready_at, expires, now]))
            else:  # the 11th item: replay rebuilds the window from it
                self.records.append(
                    (R.PUBLISH, [seq, q.name, msg_id, body, priority, headers, 0, ready_at, expires, now, dedupe]))
            # (R.message_payload(msg) in full, written out: one call fewer per publish)
        if dedupe is not None:
            self.dedupe.remember(dedupe, msg_id, now, now)
        if expires is not None:
            self._ttl.add((expires, seq, msg))
        if ready_at is not None:
            msg.state = DELAYED
            q.delayed_count += 1
            self._delayed.add((ready_at, seq, msg))
        else:
            q.push_ready(msg)
            if q.consumers and not q.paused:
                self._dispatch_or_hold(q, now)
        return msg_id

    def publish_run(self, conn_id: int, items: list, start: int, now: float, results: list | None,
                    key_limit: int, frame: bytes | None = None) -> tuple[int, list | None]:
        """PUBLISH_BATCH's plain items (protocol.md §5.46), from ``items[start]`` on, inside
        ``hold_dispatch``: each stored exactly as ``publish`` would store it, one after the other,
        in one call for the run instead of one call each (W1's hot path, issue 18).

        An item is plain when it is ``[queue, body, id, priority, options]`` with a text queue
        name, a bytes body, a text id and ``options`` null or ``{"dedupe": key}`` with an ASCII
        key of 1 to ``key_limit`` characters.  Returns ``(i, results)``: ``i`` is the index of the
        first item that is not plain (``len(items)`` when all were), which the caller handles
        with its full option parsing.  ``results`` follows PUBLISH_BATCH's rule: it stays None
        while every item was stored under the id it gave; otherwise it holds one entry per item
        so far (the id, or ``[code, "item i: message"]`` for a refused one).

        Anything off the common path (the log failed, a queue not yet made or with
        ``max_length``, a priority or id ``publish`` refuses, a resend the dedupe window holds)
        goes through ``publish`` itself, so errors and edge cases are publish's own.

        ``frame``: the bytes the PUBLISH_BATCH frame came in as (``items`` is what they decode
        to), given with ``start`` 0.  When every item of the frame is plain and stored, the log
        gets those bytes as they came, one PUBLISH_FRAME record, and one PUBLISH_NEXT record
        per further item, instead of a PUBLISH record encoded for each (issue 18: no
        re-encoding).  Otherwise, from the first item that is not, each item gets its PUBLISH
        record as without ``frame``, in the same order and lsns."""
        held = self._held
        queues = self.queues
        log = self.log_enabled
        failed = self.log_failed  # (only the runtime fails the log: not during this call)
        records = self.records
        publish_rec = R.PUBLISH
        window = self.dedupe
        keys = window._keys
        remember = window.remember
        key_room = window.limit - 1  # a new key may go in directly while the window holds fewer
        prefix = self._id_prefix
        n = len(items)
        q = None
        qname = None
        # Items packed behind a backlog wait here, for one queue and priority, and go into the
        # queue's blocks together (Queue.push_plain_many) before anything else looks at a queue.
        pend_q = pend_p = None
        pseqs, pmids, pbodies = [], [], []
        # frame mode: items[0..framed) are stored and not yet logged, at seqs first_seq.. on
        # (inside hold_dispatch only: no record of another kind may come between the items')
        if frame is not None and (start != 0 or not log or held is None or len(frame) > PUBLISH_FRAME_MAX_BYTES):
            frame = None
        framed = 0
        first_seq = self.last_lsn + 1
        for i in range(start, n):
            item = items[i]
            if type(item) is not list or len(item) != 5:
                break
            name, body, msg_id, priority, opts = item
            if type(name) is not str or type(body) is not bytes or type(msg_id) is not str:
                break
            if opts is None:
                key = None
            elif (type(opts) is dict and len(opts) == 1 and type(key := opts.get("dedupe")) is str
                    and key.isascii() and 0 < len(key) <= key_limit):
                pass
            else:
                break
            if priority is None:
                priority = 0
            if name != qname:
                q = queues.get(name)
                qname = name
                if q is not None and q.options.max_length is not None:
                    q = None  # publish drops the head or refuses: its own path
            if (q is None or failed
                    or type(priority) is not int or not 0 <= priority <= MAX_PRIORITY
                    or not 0 < len(msg_id) <= MAX_MESSAGE_ID or (key is not None and key in keys)):
                # the general path: its own checks, errors and edge cases
                if frame is not None:  # not the whole frame after all: log the ones before as PUBLISH
                    self._log_unframed(items, framed, first_seq, now)
                    frame = None
                if pseqs:
                    pend_q.push_plain_many(pend_p, pseqs, pmids, pbodies, now, prefix)
                    pseqs, pmids, pbodies = [], [], []
                try:
                    result = self.publish(conn_id, name, body, msg_id, priority, now, dedupe=key)
                except BrokerError as exc:
                    result = [exc.code, f"item {i}: {exc.message}"]
                qname = None  # publish may have made the queue: look it up again
                if results is None:
                    if type(result) is str and result == msg_id:
                        continue
                    results = [it[2] for it in items[:i]]  # every earlier item was stored under its id
                results.append(result)
                continue
            if log:
                seq = self.last_lsn + 1
                self.last_lsn = seq
                if frame is not None:
                    framed += 1  # logged at the end, with the frame's bytes
                elif key is None:
                    records.append((publish_rec, [seq, name, msg_id, body, priority, None, 0, None, None, now]))
                else:  # the 11th item: replay rebuilds the window from it
                    records.append((publish_rec, [seq, name, msg_id, body, priority, None, 0, None, None, now, key]))
            else:
                seq = next(self._seq)
            q.published += 1
            if key is not None:
                if 0 < len(keys) <= key_room and now < window._due:
                    keys[key] = (msg_id, now)  # DedupeWindow.remember's common case: a new key, no expiry due
                else:
                    remember(key, msg_id, now, now)
            if held is None:  # (not inside hold_dispatch: stored and dispatched one by one)
                if q.ready_count >= PACK_AFTER:
                    q.push_plain(seq, msg_id, False, body, priority, now, prefix)
                else:
                    q.push_ready(Message(seq, msg_id, q, body, priority, None, 0, None, None, now))
                if q.consumers and not q.paused:
                    self._dispatch_queue(q, now)
            else:
                if q is pend_q and priority == pend_p:
                    # behind a backlog: packed into the queue's arrays, no object made
                    pseqs.append(seq)
                    pmids.append(msg_id)
                    pbodies.append(body)
                elif q.ready_count >= PACK_AFTER:
                    if pseqs:
                        pend_q.push_plain_many(pend_p, pseqs, pmids, pbodies, now, prefix)
                        pseqs, pmids, pbodies = [], [], []
                    pend_q, pend_p = q, priority
                    pseqs.append(seq)
                    pmids.append(msg_id)
                    pbodies.append(body)
                else:
                    q.push_ready(Message(seq, msg_id, q, body, priority, None, 0, None, None, now))
                if q.consumers and not q.paused:
                    held[q] = None
            if results is not None:
                results.append(msg_id)
        else:
            i = n  # every item from start on was plain
        if frame is not None and framed:
            if i == n:  # the whole frame: its bytes as they came, and one lsn per further item
                records.append((R.PUBLISH_FRAME, [first_seq, now, frame]))
                nxt = R.PUBLISH_NEXT
                records.extend([(nxt, k) for k in range(1, framed)])
            else:  # stopped at an item the caller handles: the ones before as PUBLISH records
                self._log_unframed(items, framed, first_seq, now)
        if pseqs:
            pend_q.push_plain_many(pend_p, pseqs, pmids, pbodies, now, prefix)
        return i, results

    def _log_unframed(self, items: list, count: int, first_seq: int, now: float) -> None:
        """PUBLISH records for ``items[:count]``, stored by ``publish_run`` at seqs ``first_seq``..
        as plain items (so their fields are plain), when their frame is not logged whole."""
        records = self.records
        publish_rec = R.PUBLISH
        for k in range(count):
            name, body, msg_id, priority, opts = items[k]
            p = [first_seq + k, name, msg_id, body, priority or 0, None, 0, None, None, now]
            if opts is not None:
                p.append(opts["dedupe"])
            records.append((publish_rec, p))

    def _dispatch_or_hold(self, q: Queue, now: float) -> None:
        """Dispatch ``q`` after a publish, or, inside ``hold_dispatch``, once at its end."""
        held = self._held
        if held is None or q.options.max_length is not None:
            # (a queue with max_length is dispatched at once, as one PUBLISH would: a consumer
            # with credit drains it, so a batch is never refused where single publishes were not)
            self._dispatch_queue(q, now)
        else:
            held[q] = None

    def hold_dispatch(self) -> None:
        """PUBLISH_BATCH's plain items: dispatch each queue once after them (``release_dispatch``),
        not once per publish.  The same messages go to the same consumers in the same order
        (FIFO within a priority) as one by one, logged as one DELIVER record per queue instead of
        one per message."""
        self._held = {}

    def release_dispatch(self, now: float) -> None:
        """End ``hold_dispatch``: dispatch the queues published to since, in the order of their
        first publish."""
        held = self._held
        self._held = None
        if held:
            for q in held:
                if q.consumers and not q.paused:
                    self._dispatch_queue(q, now)

    def hold_settles(self) -> None:
        """A run of RESULT_SETs that settle deliveries (a worker's results, read together): refill
        each consumer once after them (``release_settles``), not once per result.  The same
        messages go to the same consumers in the same order, logged as one DELIVER record per
        consumer instead of one per message, and out in the same flush."""
        self._settled = {}

    def release_settles(self, now: float) -> None:
        """End ``hold_settles``: refill the consumers settled since, in the order of their first
        result, and ask for a recall for any left idle, as each result would have."""
        held = self._settled
        self._settled = None
        if held:
            for c in held:
                if c.unacked < c.prefetch:  # (a cancelled consumer's prefetch is 0)
                    self._dispatch_consumer(c, now)
                    if c.unacked < c.slots:  # a free slot and nothing came: idle (RECALL)
                        self._maybe_recall(c, now)

    def _drop_head(self, q: Queue, now: float) -> None:
        msg = q.pop_ready()
        if msg is None:
            # Everything waiting is delayed: drop the one due first.
            for entry in self._delayed:
                if entry[2].queue is q:
                    self._delayed.remove(entry)
                    msg = entry[2]
                    q.delayed_count -= 1
                    break
        if msg is not None:
            self._dead_letter(msg, "maxlen", now)

    # -- consume ---------------------------------------------------------------
    # Queues one CONSUME may name: dispatch walks a consumer's queues in order,
    # so each name costs every delivery to it; 1000 is far past any worker's -Q.
    MAX_CONSUME_QUEUES = 1000
    # Consumers one connection may hold: each closes in O(consumers of its
    # queues), so an unbounded number would make one disconnect quadratic.
    MAX_CONSUMERS_PER_CONN = 1000

    def consume(self, conn_id: int, queues: list, prefetch: int, now: float, options: dict | None = None) -> int:
        conn = self.conns[conn_id]
        if not isinstance(queues, list) or not queues:
            raise BadRequest("consume needs a non-empty list of queue names")
        if len(queues) > self.MAX_CONSUME_QUEUES:
            raise BadRequest(
                f"consume names {len(queues)} queues; at most {self.MAX_CONSUME_QUEUES} per CONSUME "
                "(use several CONSUMEs, or fewer queues)"
            )
        if len(conn.consumers) >= self.MAX_CONSUMERS_PER_CONN:
            raise BadRequest(
                f"this connection has {len(conn.consumers)} consumers, the most one connection may hold; "
                "CANCEL some or open another connection"
            )
        if type(prefetch) is not int or not 1 <= prefetch <= MAX_PREFETCH:
            raise BadRequest(f"prefetch must be a whole number from 1 to {MAX_PREFETCH} (got {prefetch!r})")
        slots = 0
        if options is not None:
            if type(options) is not dict:
                raise BadRequest("CONSUME field 4 (options) must be a map or null")
            unknown = set(options) - {"slots"}
            if unknown:
                raise BadRequest(f"CONSUME option {sorted(unknown, key=repr)[0]!r} is not known; the options are: slots")
            slots = options.get("slots", 0)
            if type(slots) is not int or not 1 <= slots <= MAX_PREFETCH:
                raise BadRequest(f"CONSUME option 'slots' must be a whole number from 1 to {MAX_PREFETCH} (got {slots!r})")
        seen = set()  # a set: `in list` made 40,000 names take 7.5 s (measured)
        for name in queues:
            validate_queue_name(name)
            if name in seen:
                raise BadRequest(f"queue {name!r} is listed twice")
            seen.add(name)
        qs = [self.queue(n) for n in queues]
        c = Consumer(next(self._ctags), conn_id, qs, prefetch, slots)
        conn.consumers[c.tag] = c
        for q in qs:
            q.consumers.append(c)
            if slots:
                q.slotted = True
        if self._gated:
            self._flow_consumer_came(qs)  # what a gate held for these queues may go to it now
        self._dispatch_consumer(c, now)
        if self._flow_woke:
            self._dispatch_many(self._flow_take_woke(), now)
        if slots and c.unacked < slots:
            self._maybe_recall(c, now)
        return c.tag

    def set_prefetch(self, conn_id: int, ctag, prefetch, now: float) -> int:
        """CREDIT (protocol.md §5.42): the consumer's prefetch from now on.  Raised: filled at once.
        Lowered under what it holds: nothing is taken back, it gets no more until it holds fewer."""
        if type(ctag) is not int:
            raise BadRequest(f"a consumer tag is a whole number (got {ctag!r})")
        if type(prefetch) is not int or not 1 <= prefetch <= MAX_PREFETCH:
            raise BadRequest(f"prefetch must be a whole number from 1 to {MAX_PREFETCH} (got {prefetch!r})")
        c = self.conns[conn_id].consumers.get(ctag)
        if c is None:
            raise NotFound(f"no consumer {ctag!r} on this connection")
        old = c.prefetch
        c.prefetch = prefetch
        if prefetch > old and c.unacked < prefetch:
            self._dispatch_consumer(c, now)
            if self._flow_woke:
                self._dispatch_many(self._flow_take_woke(), now)
        return prefetch

    # -- recall (protocol.md §5.43-5.44) -------------------------------------------
    # The policy, in full: a consumer that declared ``slots`` is *idle* when it holds fewer
    # deliveries than its slots and none of its un-paused queues has a ready message.  Then it
    # asks: each other consumer of those queues that declared slots and holds more than its
    # slots (surplus = unacked - slots, which cannot all have started) gets a RECALL for at most
    # min(its surplus, the idle consumer's free slots still wanted).  How often: a holder has at
    # most one RECALL unanswered, and is asked again before RECALL_INTERVAL only once it answered
    # with RELEASE; an idle consumer asks again before RECALL_INTERVAL only once its last ask
    # brought it something.  Released deliveries go to idle consumers first.  A recall never
    # moves more than the receiver can start at once and never leaves the holder under its slots,
    # so two busy consumers never pass work back and forth: work only moves from one holding
    # more than it can run to one holding less.
    def _maybe_recall(self, c: Consumer, now: float) -> None:
        if c.prefetch == 0:
            return  # cancelled
        want = c.slots - c.unacked
        if want <= 0:
            return
        if not c.fed and now - c.asked_at < RECALL_INTERVAL:
            self._recall_later(c, c.asked_at + RECALL_INTERVAL)
            return
        for q in c.queues:
            if q.ready_count and not q.paused:
                return  # not idle: gated or about to be filled
        asked = waiting = False
        for q in c.queues:
            if q.paused:
                continue
            for h in q.consumers:
                if h is c or not h.slots or h.unacked <= h.slots:
                    continue
                if h.recall_pending and now - h.recalled_at < RECALL_INTERVAL:
                    waiting = True
                    continue
                n = min(want, h.unacked - h.slots)
                h.recalled_at = now
                h.recall_pending = True
                self._send(h.conn, recall_frame(h.tag, n, q.name))
                q.recalled += n
                asked = True
                want -= n
                if want <= 0:
                    break
            if want <= 0:
                break
        # Scanned: the next scan waits RECALL_INTERVAL unless this one brings something (fed),
        # so an idle consumer beside many others costs at most 10 scans a second.
        c.asked_at = now
        c.fed = False
        if asked or waiting:
            # Look again in RECALL_INTERVAL if it is still idle then (nothing came back, or a
            # holder was asked a moment ago): bookkeeping only while a queue has an idle consumer.
            self._recall_later(c, now + RECALL_INTERVAL)

    def _recall_later(self, c: Consumer, due: float) -> None:
        self._recall_idle[c] = None
        if due < self._recall_due:
            self._recall_due = due

    def _tick_recall(self, now: float) -> None:
        idle, self._recall_idle = self._recall_idle, {}
        self._recall_due = NEVER
        for c in idle:
            if c.prefetch and c.slots and c.unacked < c.slots:
                self._maybe_recall(c, now)

    def release(self, conn_id: int, tags, now: float) -> int:
        """RELEASE (protocol.md §5.41): deliveries this consumer has not started go back to the
        front of their queues, their attempt not counted, and go to idle consumers first."""
        tags = _tag_list(tags)
        self._refuse_if_log_failed()
        stale = []
        touched = {}
        released = []
        for tag in tags:
            try:
                d = self._settle(conn_id, tag)
            except StaleDelivery:
                stale.append(tag)
                continue
            released.append(d)
        for d in reversed(released):  # pushed to the front one by one: the first tag ends first
            d.consumer.recall_pending = False  # answered: it may be asked again
            msg = d.msg
            msg.attempts -= 1  # this delivery does not count: the consumer never started it
            q = msg.queue
            q.released += 1
            self._requeue(msg, now)
            touched[q] = None
        for q in touched:
            if q.paused:
                continue
            # Free slots first (what the release was for), at most one message per free slot, so
            # one idle consumer does not take past its slots what another idle one asked for;
            # _dispatch_queue's first pass does that.  An idle one fed here may ask again at once.
            idle = [(c, c.unacked) for c in q.consumers if c.unacked < c.slots]
            self._dispatch_queue(q, now)
            for c, held in idle:
                if c.unacked > held:
                    c.fed = True
        if self._flow_woke:
            self._dispatch_many(self._flow_take_woke(), now)
        if stale:
            raise StaleDelivery(
                f"deliveries {stale} are not in flight on this connection (acked already, timed out "
                "or their connection closed); the others were released")
        return len(released)

    def cancel(self, conn_id: int, ctag: int) -> None:
        conn = self.conns[conn_id]
        c = conn.consumers.get(ctag)
        if c is None:
            raise NotFound(f"no consumer {ctag!r} on this connection")
        self._remove_consumer(c)

    def _remove_consumer(self, c: Consumer) -> None:
        conn = self.conns.get(c.conn)
        if conn is not None:
            conn.consumers.pop(c.tag, None)
        for q in c.queues:
            try:
                q.consumers.remove(c)
            except ValueError:
                pass
        c.prefetch = 0  # no new deliveries; its unacked ones stay in flight

    # -- dispatch ----------------------------------------------------------------
    def _deliver(self, c: Consumer, q: Queue, msg: Message, now: float) -> None:
        tag = next(self._tags)
        attempts = msg.attempts = msg.attempts + 1
        msg.state = INFLIGHT
        timeout = q.options.reserve_timeout
        cid = c.conn
        if timeout is None:
            d = Delivery(tag, msg, c, cid, None)
        else:
            deadline = now + timeout
            d = Delivery(tag, msg, c, cid, deadline)
            self._deadlines.add((deadline, tag))
        self.inflight[tag] = d
        self.conns[cid].deliveries[tag] = d
        c.unacked += 1
        q.inflight_count += 1
        q.delivered += 1
        if attempts > 1:
            q.redelivered += 1
        if self.log_enabled:
            self._delivered_seqs.append(msg.seq)  # one DELIVER record per dispatch round
        if self._unique_of and attempts == 1:
            self._unique_event(msg.id, started=True)  # "until started": the first delivery frees it
        frame = deliver_frame(c.tag, tag, q.name, msg.id, msg.body, msg.priority, attempts, msg.headers)
        box = self.outbox.get(cid)  # send_to, written out: once per delivery
        if box is None:
            self.outbox[cid] = [frame]
        else:
            box.append(frame)

    def _log_deliveries(self) -> None:
        """Log the deliveries of a dispatch round as one DELIVER record.

        Called at the end of every dispatch function; nothing else is logged
        about these messages in between, so replay sees the same order."""
        seqs = self._delivered_seqs
        if seqs:
            self._delivered_seqs = []
            self.last_lsn += 1
            self.records.append((R.DELIVER, seqs[0] if len(seqs) == 1 else seqs))

    def _next_live(self, q: Queue, now: float) -> Message | None:
        """Pop the next ready message, expiring any whose TTL has passed and
        dropping any whose task was revoked."""
        while True:
            msg = q.pop_ready()
            if msg is None:
                return None
            if msg.expires is not None and msg.expires <= now:
                self._expire(msg)
                continue
            if self.revoked and msg.id in self.revoked:
                self._drop_revoked(msg, now)
                continue
            if self._gated and (msg.flow is not None or q.rate_gate is not None) and self._flow_hold(q, msg, now):
                continue  # parked on its rate or cap gate; what is behind it goes on
            return msg

    def _dispatch_queue(self, q: Queue, now: float) -> None:
        """Give q's ready messages to its consumers with credit, round-robin."""
        if q.paused:
            return
        cons = q.consumers
        n = len(cons)
        if not n:
            return
        if n == 1 and not q.slotted:
            c = cons[0]  # one consumer: the round-robin below is "fill its credit"
            if c.unacked < c.prefetch and self._fill_applies(q):
                self._fill(c, q, now)
                q.rr = 0
                if self._delivered_seqs:
                    self._log_deliveries()
                return
        i = q.rr
        idle = 0
        if q.slotted:
            # First to consumers with a free slot, so none sits idle while another holds work it
            # cannot start yet (what RECALL would otherwise have to take back).
            while q.ready_count and idle < n:
                c = cons[i % n]
                i += 1
                if c.unacked < c.slots and c.unacked < c.prefetch:
                    msg = self._next_live(q, now)
                    if msg is None:
                        break
                    self._deliver(c, q, msg, now)
                    idle = 0
                else:
                    idle += 1
            idle = 0
        while q.ready_count and idle < n:
            c = cons[i % n]
            i += 1
            if c.unacked < c.prefetch:
                msg = self._next_live(q, now)
                if msg is None:
                    break
                self._deliver(c, q, msg, now)
                idle = 0
            else:
                idle += 1
        q.rr = i % n if n else 0
        if self._delivered_seqs:
            self._log_deliveries()

    def _dispatch_many(self, queues, now: float) -> None:
        """Several queues got ready messages at once (tick, disconnect): hand them
        out one at a time, consumer by consumer, each from its most preferred
        queue with work — so neither preference nor fairness depends on which
        queue happened to be woken first."""
        consumers = []
        seen = set()
        # the queues come as a set (ordered by object address): go by name, so the
        # same steps hand out the same messages in every run and on every replica
        for q in sorted(queues, key=_queue_name) if len(queues) > 1 else queues:
            for c in q.consumers:
                if id(c) not in seen:
                    seen.add(id(c))
                    consumers.append(c)
        slotted = any(c.slots for c in consumers)
        progress = True
        while progress:
            progress = False
            for c in consumers:
                if c.unacked >= c.prefetch or (slotted and c.unacked >= c.slots):
                    continue
                for q in c.queues:
                    if q.ready_count and not q.paused:
                        msg = self._next_live(q, now)
                        if msg is not None:
                            self._deliver(c, q, msg, now)
                            progress = True
                            break
            if not progress and slotted:
                slotted = False  # free slots filled (RECALL's consumers first): now by credit, as before
                progress = True
        if self._delivered_seqs:
            self._log_deliveries()

    def _dispatch_consumer(self, c: Consumer, now: float) -> None:
        """Fill c's credit from its queues in preference order."""
        for q in c.queues:
            if c.unacked >= c.prefetch:
                break
            if q.paused:
                continue
            if q.ready_count and self._fill_applies(q):
                self._fill(c, q, now)
                continue
            while q.ready_count and c.unacked < c.prefetch:
                msg = self._next_live(q, now)
                if msg is None:
                    break
                self._deliver(c, q, msg, now)
        if self._delivered_seqs:
            self._log_deliveries()

    def _fill_applies(self, q: Queue) -> bool:
        """Whether ``_fill`` may deliver q's messages: nothing needs a check per message (no rate
        or cap gate, no revoked task, no unique key freed by a start, no reserve_timeout)."""
        return not (self._gated or self.revoked or self._unique_of or q.options.reserve_timeout is not None)

    def _fill(self, c: Consumer, q: Queue, now: float) -> None:
        """``_next_live`` and ``_deliver`` for as many of q's ready messages as c has credit for, in
        one loop: the common case (no rate or cap gate, no revoked task, no unique key freed by
        its start, no reserve_timeout on q), where a delivery is the message popped, its attempt
        counted and one DELIVER frame (W1's hot path, issue 18).  The caller checks ``_fill_applies``."""
        pop = q.pop_ready
        inflight = self.inflight
        deliveries = self.conns[c.conn].deliveries
        cid = c.conn
        box = self.outbox.get(cid)
        if box is None:
            box = self.outbox[cid] = []
        tags = self._tags
        frame = deliver_frame
        seqs = self._delivered_seqs if self.log_enabled else None
        ctag = c.tag
        qname = q.name
        want = c.prefetch - c.unacked
        n = redelivered = 0
        while n < want:
            msg = pop()
            if msg is None:
                break
            if msg.expires is not None and msg.expires <= now:
                self._expire(msg)
                continue
            n += 1
            tag = next(tags)
            attempts = msg.attempts = msg.attempts + 1
            msg.state = INFLIGHT
            inflight[tag] = deliveries[tag] = Delivery(tag, msg, c, cid, None)
            if attempts > 1:
                redelivered += 1
            if seqs is not None:
                seqs.append(msg.seq)  # one DELIVER record per dispatch round
            box.append(frame(ctag, tag, qname, msg.id, msg.body, msg.priority, attempts, msg.headers))
        c.unacked += n
        q.inflight_count += n
        q.delivered += n
        if redelivered:
            q.redelivered += redelivered
        if not box:
            del self.outbox[cid]

    # -- settle ----------------------------------------------------------------
    def _settle(self, conn_id: int, tag) -> Delivery:
        d = self.inflight.get(tag)
        if d is None or d.conn != conn_id:
            if type(tag) is not int:
                raise BadRequest(f"a delivery tag is a whole number (got {tag!r})")
            raise StaleDelivery(
                f"delivery {tag} is not in flight on this connection (it was acked, timed out "
                "or its connection closed; the message may have been redelivered)")
        del self.inflight[tag]
        del self.conns[conn_id].deliveries[tag]
        d.consumer.unacked -= 1
        msg = d.msg
        msg.queue.inflight_count -= 1
        if self._gated and msg.flow is not None and msg.flow.cap_key is not None:
            self._flow_settled(msg)
        return d

    def ack(self, conn_id: int, tags, now: float) -> int:
        """Ack one tag or a list of tags.  Stale ones are refused, the rest applied."""
        tags = _tag_list(tags)
        stale = []
        consumers = {}  # once each, in order: a list ACK of n tags is not n dispatches
        acked_seqs = []
        unique = self._unique_of
        gated = self._gated
        inflight = self.inflight
        conn = self.conns.get(conn_id)  # (none: nothing of its is in flight, every tag is stale)
        deliveries = conn.deliveries if conn is not None else None
        last = None
        for tag in tags:
            # _settle, written out: one pass over the list (W1's hot path)
            d = inflight.get(tag)
            if d is None or d.conn != conn_id:
                stale.append(tag)
                continue
            del inflight[tag]
            del deliveries[tag]
            c = d.consumer
            c.unacked -= 1
            msg = d.msg
            q = msg.queue
            q.inflight_count -= 1
            if gated and msg.flow is not None and msg.flow.cap_key is not None:
                self._flow_settled(msg)
            msg.state = GONE
            q.acked += 1
            acked_seqs.append(msg.seq)
            if c is not last:
                consumers[c] = None
                last = c
            if unique:
                self._unique_event(msg.id, started=False)
        if acked_seqs and self.log_enabled:
            self.last_lsn += 1
            self.records.append((R.ACK, acked_seqs[0] if len(acked_seqs) == 1 else acked_seqs))
        for c in consumers:
            if c.unacked < c.prefetch:
                self._dispatch_consumer(c, now)
                if c.unacked < c.slots:  # it has a free slot and nothing came: idle (recall)
                    self._maybe_recall(c, now)
        if self._flow_woke:  # a freed concurrency slot released a parked message
            self._dispatch_many(self._flow_take_woke(), now)
        if stale and len(tags) == 1:
            raise StaleDelivery(
                f"delivery {stale[0]} is not in flight on this connection (it was acked, timed out "
                "or its connection closed; the message may have been redelivered)")
        if stale:
            raise StaleDelivery(
                f"deliveries {stale} are not in flight on this connection (acked already, timed out "
                "or their connection closed); the others were acked")
        return len(tags)

    def nack(
        self, conn_id: int, tag, now: float, requeue: bool = True, delay: float | None = None,
        headers: dict | None = None,
    ) -> None:
        """Give a delivery back.

        ``requeue=False``: to the dead-letter queue.  ``delay``: ready again
        after that many seconds, held by the broker — an explicit retry, which
        does not count toward max_attempts (the consumer decided it; crashes
        and timeouts are what max_attempts guards against).  ``headers``
        replaces the message's headers (e.g. a retry count) in the same step.
        """
        if delay is not None and (type(delay) not in (int, float) or delay < 0):
            raise BadRequest(f"delay must be a number of seconds >= 0 (got {delay!r})")
        if headers is not None and type(headers) is not dict:
            raise BadRequest("headers must be a map")
        d = self._settle(conn_id, tag)
        msg = d.msg
        q = msg.queue
        q.nacked += 1
        if headers is not None:
            msg.headers = headers or None
        if not requeue:
            self._dead_letter(msg, "rejected", now)
        elif delay:
            self._requeue(msg, now, delay, headers is not None)
        elif not self._over_attempts(msg, now):
            self._requeue(msg, now, None, headers is not None)
        c = d.consumer
        if q.slotted and msg.state == READY:
            # To a free slot first (the nacker's own, or another consumer's): not back behind
            # what the nacker still runs while another consumer of q sits idle.
            self._dispatch_queue(q, now)
        if c.unacked < c.prefetch:
            self._dispatch_consumer(c, now)
        if msg.state == READY:
            self._dispatch_queue(q, now)
        if c.unacked < c.slots:
            self._maybe_recall(c, now)
        if self._flow_woke:
            self._dispatch_many(self._flow_take_woke(), now)

    def touch(self, conn_id: int, tag, now: float) -> float | None:
        d = self.inflight.get(tag)
        if d is None or d.conn != conn_id:
            if type(tag) is not int:
                raise BadRequest(f"a delivery tag is a whole number (got {tag!r})")
            raise StaleDelivery(
                f"delivery {tag} is not in flight on this connection; it cannot be extended")
        timeout = d.msg.queue.options.reserve_timeout
        if timeout is None:
            return None
        d.deadline = now + timeout  # the old entry in _deadlines is re-filed lazily by tick()
        return timeout

    def _over_attempts(self, msg: Message, now: float) -> bool:
        """Dead-letter msg if it has used its attempts.  True if it did."""
        limit = msg.queue.options.max_attempts
        if limit is not None and msg.attempts >= limit:
            self._dead_letter(msg, "max_attempts", now)
            return True
        return False

    def _requeue(self, msg: Message, now: float, delay: float | None = None, new_headers: bool = False) -> None:
        q = msg.queue
        if delay:
            msg.ready_at = now + delay
            msg.state = DELAYED
            q.delayed_count += 1
            self._delayed.add((msg.ready_at, msg.seq, msg))
        else:
            msg.ready_at = None
            q.push_ready(msg, front=True)
        if new_headers:
            self._log(R.REQUEUE, [msg.seq, msg.attempts, msg.ready_at, msg.headers])
        else:
            self._log(R.REQUEUE, [msg.seq, msg.attempts, msg.ready_at])

    def _take_back(self, d: Delivery, now: float) -> None:
        """A delivery's connection closed or its reservation ran out."""
        del self.inflight[d.tag]
        msg = d.msg
        q = msg.queue
        d.consumer.unacked -= 1
        q.inflight_count -= 1
        if self._gated and msg.flow is not None and msg.flow.cap_key is not None:
            self._flow_settled(msg)
        if not self._over_attempts(msg, now):
            self._requeue(msg, now)

    def _dead_letter(self, msg: Message, reason: str, now: float) -> None:
        src = msg.queue
        src.dead_lettered += 1
        msg.state = GONE
        if self._unique_of:
            self._unique_event(msg.id, started=False)  # it will not run from here: its unique key frees
        dl_name = src.dead_letter_name
        if src.owner is not None and src.options.dead_letter is None:
            dl_name = None  # a temporary queue gets no lasting "<name>.dlq" unless it asked for one
        if dl_name is None:
            self._log(R.DROP, [msg.seq, reason])
            return
        dlq = self.queue(dl_name)
        headers = dict(msg.headers) if msg.headers else {}
        headers["x-dead-reason"] = reason
        headers["x-dead-from"] = src.name
        headers["x-dead-attempts"] = msg.attempts
        # Attempts start again in the dead-letter queue, so its own consumers
        # get its own max_attempts; the count it died with stays in a header.
        new = Message(self._next_seq(), msg.id, dlq, msg.body, msg.priority, headers, 0, None, None, now)
        new.flow = msg.flow
        if new.flow is not None and new.flow.tenant is not None and not dlq.tenanted:
            dlq.make_tenanted()
        self._log_created(new, R.DEAD, [msg.seq, R.message_payload(new)])
        dlq.push_ready(new)
        if self._defer_dead_letter_dispatch is not None:
            self._defer_dead_letter_dispatch.add(dlq)  # dispatched by the caller once all are back
        elif dlq.consumers and not dlq.paused:
            self._dispatch_queue(dlq, now)

    def _expire(self, msg: Message) -> None:
        msg.state = GONE
        msg.queue.expired += 1
        self._log(R.EXPIRE, msg.seq)
        if self._unique_of:
            self._unique_event(msg.id, started=False)

    # -- timers ----------------------------------------------------------------
    def tick(self, now: float) -> float:
        """Do what is due at ``now``; return the time of the next thing due."""
        delayed = self._delayed
        woke = set()
        while delayed and delayed[0][0] <= now:
            _, _, msg = delayed.pop(0)
            if msg.state != DELAYED:
                continue
            q = msg.queue
            q.delayed_count -= 1
            msg.ready_at = None
            q.push_ready(msg)
            woke.add(q)
        deadlines = self._deadlines
        while deadlines and deadlines[0][0] <= now:
            _, tag = deadlines.pop(0)
            d = self.inflight.get(tag)
            if d is None:
                continue
            if d.deadline > now:  # touched since: file it again
                deadlines.add((d.deadline, tag))
                continue
            del self.conns[d.conn].deliveries[tag]
            self._take_back(d, now)
            c = d.consumer
            woke.add(d.msg.queue)
            for cq in c.queues:
                woke.add(cq)
        ttl = self._ttl
        while ttl and ttl[0][0] <= now:
            _, _, msg = ttl.pop(0)
            if msg.state == READY:
                msg.queue.discard_ready(msg)
                self._expire(msg)
            elif msg.state == DELAYED:
                msg.queue.delayed_count -= 1
                self._expire(msg)
            elif msg.state == PARKED:  # left in its gate's deque; the release skips it
                msg.queue.waiting_count -= 1
                self._expire(msg)
        if self._flow_due and self._flow_due[0][0] <= now:
            self._tick_flow(now)
        if self._flow_woke:
            woke |= self._flow_take_woke()
        if woke:
            self._dispatch_many(woke, now)
        self._tick_results(now)
        self._tick_schedules(now)
        self._tick_revokes(now)
        self._tick_events(now)
        if self._unique_ttl:
            self._tick_unique(now)
        if self._recall_idle and self._recall_due <= now:
            self._tick_recall(now)
        return self.next_wakeup()

    def next_wakeup(self) -> float:
        t = NEVER
        if self._delayed:
            t = self._delayed[0][0]
        if self._deadlines and self._deadlines[0][0] < t:
            t = self._deadlines[0][0]
        if self._ttl and self._ttl[0][0] < t:
            t = self._ttl[0][0]
        if self._sched_due and self._sched_due[0][0] < t:
            t = self._sched_due[0][0]
        if self._revoke_ttl and self._revoke_ttl[0][0] < t:
            t = self._revoke_ttl[0][0]
        if self._flow_due and self._flow_due[0][0] < t:
            t = self._flow_due[0][0]
        if self._recall_idle and self._recall_due < t:
            t = self._recall_due
        return min(t, self._results_next_wakeup(), self._events_next_wakeup(), self._unique_next_wakeup())

    def _refuse_if_log_failed(self) -> None:
        if self.log_failed:
            raise LogFailed(self.log_failed)

    def check_invariants(self) -> None:
        """For tests: the promises the dispatcher keeps, checked from scratch."""
        for conn in self.conns.values():
            for c in conn.consumers.values():
                assert 0 <= c.unacked, (c.tag, c.unacked)  # may exceed a prefetch lowered by CREDIT
                if c.unacked < c.prefetch:
                    for q in c.queues:
                        assert q.paused or q.ready_count == 0, (c.tag, q)
        for q in self.queues.values():
            assert q.ready_count == sum(1 for _ in q.iter_ready()), q
            assert q.ready_count >= 0 and q.delayed_count >= 0 and q.inflight_count >= 0
        assert sum(q.inflight_count for q in self.queues.values()) == len(self.inflight)
        parked: dict = {}
        for m in self.parked_messages():
            parked[m.queue] = parked.get(m.queue, 0) + 1
        for q in self.queues.values():
            assert q.waiting_count == parked.get(q, 0), (q, q.waiting_count, parked.get(q, 0))


def _tag_list(tags) -> list:
    """ACK's and RELEASE's tag field (one tag or a list) as a list, checked all or nothing: one
    malformed tag refuses the whole request before anything is settled."""
    if type(tags) is not list:
        tags = [tags]
    for tag in tags:
        if type(tag) is not int:
            raise BadRequest(f"a delivery tag is a whole number (got {tag!r})")
    return tags
