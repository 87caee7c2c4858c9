"""Exchanges and bindings: one publish copied to every queue bound to it (protocol.md §5.36-5.38).

Part of ``BrokerState`` (a mixin sharing its fields); pure like the rest of
broker/state/.  The shape is AMQP's, cut to what Celery and Flower use:

* an **exchange** has a type and exists while it has bindings: ``direct``
  (the routing key equals the binding key), ``fanout`` (every bound queue,
  the key is ignored), ``topic`` (the binding key is a pattern of
  dot-separated words; ``*`` is exactly one word, ``#`` zero or more);
* a **binding** (exchange, queue, key) is logged state (BIND / UNBIND
  records) unless it is **temporary**: then it belongs to the connection that
  made it and dies with it, and is never logged;
* a **temporary queue** (DECLARE ``temporary: true``) belongs to the
  connection that declared it: when that connection closes, the queue, its
  messages and its bindings are deleted.  Its messages go through the log
  like any other (a message's seq is the LSN of its record, so a message
  cannot skip the log), and replay drops every queue that was declared
  temporary: a restart has no such queue.
* ``emit`` copies a message into every matching queue; each copy is a normal
  message of its queue (a PUBLISH record), so its confirm means what a
  PUBLISH confirm means.

Routing cost per emit: direct and fanout are one dict look-up (bindings are
indexed by exchange, then key); topic matches each distinct pattern of that
exchange once per new routing key, and remembers the answer per key until its
bindings change (Celery's events use a handful of keys).
"""

from __future__ import annotations

from broker.errors import BadRequest, NotFound, PreconditionFailed, QueueFull
from broker.state import log_records as R
from broker.state.queue import GONE, validate_queue_name

EXCHANGE_TYPES = ("direct", "fanout", "topic")
# A binding or routing key is an AMQP short string: 255 bytes of UTF-8.
MAX_ROUTING_KEY = 255
# Bindings one exchange may hold: a topic emit matches every distinct pattern
# of its exchange once per new key, so this bounds what one emit can cost.
MAX_BINDINGS_PER_EXCHANGE = 10_000
# Distinct patterns one topic exchange may hold: a routing key not seen since the
# bindings last changed is matched against each (~1 us a pattern, measured by
# bench/exchanges.py), so this bounds such an EMIT to ~1 ms of the event loop.
MAX_TOPIC_PATTERNS = 1_000
# Bindings in the whole broker (each ~300 B, logged and compacted): 100,000
# is ~30 MB, far past a Celery fleet (a few per worker) and a bound on a flood.
MAX_BINDINGS = 100_000
# Temporary bindings (and temporary queues) one connection may hold: each is
# undone when it closes, so this bounds the work of one disconnect.
MAX_TEMPORARY_PER_CONN = 1_000
# Topic answers remembered per exchange (routing key -> queues); forgotten
# whenever the exchange's bindings change, and all at once when full.
ROUTE_CACHE = 1024


def topic_match(pattern: tuple, words: tuple) -> bool:
    """Whether the routing key's ``words`` match a topic ``pattern`` (both split on dots).

    ``*`` matches one word, ``#`` zero or more.  The usual wildcard walk: go
    forward, remember the last ``#``, and on a mismatch let that ``#`` take
    one more word.  O(len(pattern) * len(words)) at worst, with no recursion
    (a regex of many ``#`` could backtrack exponentially)."""
    p = k = 0
    np, nk = len(pattern), len(words)
    star = -1
    mark = 0
    while k < nk:
        if p < np:
            w = pattern[p]
            if w == "#":
                star, mark = p, k
                p += 1
                continue
            if w == "*" or w == words[k]:
                p += 1
                k += 1
                continue
        if star < 0:
            return False
        p = star + 1
        mark += 1
        k = mark
    while p < np and pattern[p] == "#":
        p += 1
    return p == np


def _check_key(key, what: str) -> None:
    if type(key) is not str:
        raise BadRequest(f"{what} must be text (got {type(key).__name__})")
    if len(key) > MAX_ROUTING_KEY // 4 and len(key.encode()) > MAX_ROUTING_KEY:  # UTF-8: <= 4 bytes a char
        raise BadRequest(f"{what} is longer than {MAX_ROUTING_KEY} bytes of UTF-8 (got {len(key.encode())})")


def validate_exchange_name(name) -> str:
    """The same rules as queue names (exchange names share the grant globs)."""
    if type(name) is not str or not name:
        raise BadRequest(f"an exchange name must be a non-empty text string (got {name!r})")
    try:
        return validate_queue_name(name)
    except BadRequest as exc:
        raise BadRequest(exc.message.replace("queue name", "exchange name")) from None


def check_topic_pattern(key: str) -> tuple:
    words = tuple(key.split(".")) if key else ()
    for w in words:
        if not w:
            raise BadRequest(f"topic pattern {key!r} has an empty word; words are separated by single dots, "
                             "e.g. 'task.*' or 'worker.#'")
        if ("*" in w or "#" in w) and w not in ("*", "#"):
            raise BadRequest(f"topic pattern {key!r}: '*' and '#' stand for whole words (got {w!r}); "
                             "e.g. 'task.*', not 'task*'")
    return words


class Exchange:
    __slots__ = ("name", "kind", "bindings", "index", "cache", "patterns")

    def __init__(self, name: str, kind: str):
        self.name = name
        self.kind = kind
        self.bindings: dict[tuple, object] = {}  # (queue, key) -> owner conn id, or None (lasting)
        # direct: key -> {queue: n bindings}; fanout: "" -> {queue: n}; topic: pattern -> {queue: n}
        self.index: dict[str, dict[str, int]] = {}
        self.patterns: dict[str, tuple] = {}  # topic: pattern -> its words
        self.cache: dict[str, tuple] = {}  # topic: routing key -> queue names

    def _slot(self, key: str) -> str:
        return "" if self.kind == "fanout" else key

    def add(self, queue: str, key: str, owner) -> None:
        self.bindings[(queue, key)] = owner
        slot = self._slot(key)
        bucket = self.index.get(slot)
        if bucket is None:
            bucket = self.index[slot] = {}
            if self.kind == "topic":
                self.patterns[slot] = check_topic_pattern(slot)
        bucket[queue] = bucket.get(queue, 0) + 1
        self.cache.clear()

    def remove(self, queue: str, key: str) -> None:
        del self.bindings[(queue, key)]
        slot = self._slot(key)
        bucket = self.index[slot]
        if bucket[queue] > 1:
            bucket[queue] -= 1
        else:
            del bucket[queue]
            if not bucket:
                del self.index[slot]
                self.patterns.pop(slot, None)
        self.cache.clear()

    def route(self, key: str):
        """The names of the queues a message with routing key ``key`` goes to, each once."""
        kind = self.kind
        if kind == "direct":
            return self.index.get(key, ())
        if kind == "fanout":
            return self.index.get("", ())
        hit = self.cache.get(key)
        if hit is not None:
            return hit
        words = tuple(key.split(".")) if key else ()
        out: dict[str, None] = {}
        for pattern, bucket in self.index.items():
            if topic_match(self.patterns[pattern], words):
                out.update(dict.fromkeys(bucket))
        hit = tuple(out)
        if len(self.cache) >= ROUTE_CACHE:
            self.cache.clear()
        self.cache[key] = hit
        return hit


class ExchangesMixin:
    def _init_exchanges(self):
        self.exchanges: dict[str, Exchange] = {}
        self.binding_count = 0
        # conn id -> {(exchange, queue, key)} temporary bindings, and -> {queue} temporary queues
        self._temp_bindings: dict[int, set] = {}
        self._temp_queues: dict[int, set] = {}

    # -- bind / unbind ---------------------------------------------------------------
    def bind(self, conn_id: int, exchange: str, queue: str, key: str, kind: str = "direct",
             temporary: bool = False, now: float = 0.0) -> bool:
        """Bind ``queue`` to ``exchange`` with ``key``; True if the binding is new.

        A missing queue is created (temporary with a temporary binding, else as
        DECLARE would).  A binding to a temporary queue is temporary (it dies
        with the queue)."""
        self._refuse_if_log_failed()
        validate_exchange_name(exchange)
        validate_queue_name(queue)
        _check_key(key, "a binding key")
        if kind not in EXCHANGE_TYPES:
            raise BadRequest(f"exchange type must be one of {', '.join(EXCHANGE_TYPES)} (got {kind!r})")
        if kind == "topic":
            check_topic_pattern(key)
        ex = self.exchanges.get(exchange)
        if ex is not None and ex.kind != kind:
            raise PreconditionFailed(
                f"exchange {exchange!r} exists with type {ex.kind!r}; bind with type {ex.kind!r}, "
                f"or unbind its {len(ex.bindings)} bindings first")
        q = self.queues.get(queue)
        owner = conn_id if temporary else None
        if q is not None and q.owner is not None:
            owner = q.owner  # a temporary queue's bindings go with it
        if ex is not None and (queue, key) in ex.bindings:
            had = ex.bindings[(queue, key)]
            if had == owner:
                return False
            raise PreconditionFailed(
                f"queue {queue!r} is already bound to {exchange!r} with key {key!r} as a "
                f"{'lasting' if had is None else 'temporary'} binding; unbind it first")
        if self.binding_count >= MAX_BINDINGS:
            raise BadRequest(f"brokerd holds {MAX_BINDINGS} bindings, the most it keeps; unbind some first")
        if (kind == "topic" and ex is not None and key not in ex.index
                and len(ex.index) >= MAX_TOPIC_PATTERNS):
            raise BadRequest(f"topic exchange {exchange!r} has {MAX_TOPIC_PATTERNS} distinct patterns, the most one "
                             "topic exchange may hold (each new routing key is matched against every one); "
                             "bind with a pattern it has, or use another exchange")
        if ex is not None and len(ex.bindings) >= MAX_BINDINGS_PER_EXCHANGE:
            raise BadRequest(f"exchange {exchange!r} has {MAX_BINDINGS_PER_EXCHANGE} bindings, the most one "
                             "exchange may hold; unbind some or use another exchange")
        if owner is not None and owner == conn_id:
            held = len(self._temp_bindings.get(conn_id, ())) + len(self._temp_queues.get(conn_id, ()))
            if held >= MAX_TEMPORARY_PER_CONN:
                raise BadRequest(f"this connection holds {MAX_TEMPORARY_PER_CONN} temporary bindings and queues, "
                                 "the most one connection may; unbind some or open another connection")
        if q is None:
            self.declare(queue, None, now, temporary_owner=conn_id if temporary else None)
        if ex is None:
            ex = self.exchanges[exchange] = Exchange(exchange, kind)
        ex.add(queue, key, owner)
        self.binding_count += 1
        if owner is None:
            self._log(R.BIND, [exchange, kind, queue, key])
        else:
            self._temp_bindings.setdefault(owner, set()).add((exchange, queue, key))
        return True

    def unbind(self, conn_id: int, exchange: str, queue: str, key: str, now: float = 0.0) -> bool:
        """Remove one binding; True if it existed.  The exchange goes with its last binding."""
        self._refuse_if_log_failed()
        validate_exchange_name(exchange)
        validate_queue_name(queue)
        _check_key(key, "a binding key")
        ex = self.exchanges.get(exchange)
        if ex is None or (queue, key) not in ex.bindings:
            return False
        self._drop_binding(ex, queue, key, log=True)
        return True

    def _drop_binding(self, ex: Exchange, queue: str, key: str, log: bool) -> None:
        owner = ex.bindings[(queue, key)]
        ex.remove(queue, key)
        self.binding_count -= 1
        if owner is None:
            if log:
                self._log(R.UNBIND, [ex.name, queue, key])
        else:
            mine = self._temp_bindings.get(owner)
            if mine is not None:
                mine.discard((ex.name, queue, key))
                if not mine:
                    del self._temp_bindings[owner]
        if not ex.bindings:
            del self.exchanges[ex.name]

    def _unbind_queue(self, name: str) -> None:
        """A queue was deleted: its bindings go with it (the DELETE record says so)."""
        for ex in list(self.exchanges.values()):
            for (queue, key) in [b for b in ex.bindings if b[0] == name]:
                self._drop_binding(ex, queue, key, log=False)

    # -- emit --------------------------------------------------------------------------
    def route(self, exchange: str, key: str):
        ex = self.exchanges.get(exchange)
        return ex.route(key) if ex is not None else ()

    def emit(self, conn_id: int, exchange: str, key: str, body: bytes, msg_id, priority: int, now: float,
             **options) -> dict:
        """Copy a message into every queue bound to ``exchange`` that ``key`` matches.

        Returns ``{"id", "queues"}``: the message id every copy carries and
        how many queues got one (0: unroutable, dropped).  A full queue
        (overflow=reject) gets no copy and is named in ``"full"``."""
        self._refuse_if_log_failed()
        _check_key(key, "a routing key")
        ex = self.exchanges.get(exchange)
        if ex is None:  # a bound exchange's name was checked when it was bound
            validate_exchange_name(exchange)
            return {"id": msg_id, "queues": 0}
        names = ex.route(key)
        n = 0
        full = []
        for name in tuple(names):  # publishing can create a dead-letter queue, never a binding
            try:
                msg_id = self.publish(conn_id, name, body, msg_id, priority, now, **options)
            except QueueFull:
                full.append(name)
                continue
            n += 1
        reply = {"id": msg_id, "queues": n}
        if full:
            reply["full"] = full
        return reply

    # -- temporary queues ------------------------------------------------------------------
    def _own_temporary_queue(self, conn_id: int, name: str) -> None:
        mine = self._temp_queues.setdefault(conn_id, set())
        if len(mine) + len(self._temp_bindings.get(conn_id, ())) >= MAX_TEMPORARY_PER_CONN:
            raise BadRequest(f"this connection holds {MAX_TEMPORARY_PER_CONN} temporary queues and bindings, "
                             "the most one connection may; delete some or open another connection")
        mine.add(name)

    def _exchanges_disconnect(self, conn_id: int, now: float) -> None:
        """A connection closed: its temporary bindings and queues go."""
        for exchange, queue, key in list(self._temp_bindings.get(conn_id, ())):
            ex = self.exchanges.get(exchange)
            if ex is not None and (queue, key) in ex.bindings:
                self._drop_binding(ex, queue, key, log=False)
        self._temp_bindings.pop(conn_id, None)
        for name in sorted(self._temp_queues.pop(conn_id, ())):
            q = self.queues.get(name)
            if q is not None and q.owner == conn_id:
                self._drop_temporary_queue(q, now)

    def _drop_temporary_queue(self, q, now: float) -> None:
        """Delete a temporary queue whatever it holds.

        Consumers of it on other connections stop getting anything from it (a
        consumer of it alone is cancelled); deliveries of its messages still
        held elsewhere are withdrawn, so their ACK answers STALE_DELIVERY."""
        name = q.name
        self._unbind_queue(name)
        for c in list(q.consumers):
            c.queues = [x for x in c.queues if x is not q]
            if not c.queues:
                self._remove_consumer(c)
        q.consumers.clear()
        freed = []
        if q.inflight_count:
            for tag, d in [(t, d) for t, d in self.inflight.items() if d.msg.queue is q]:
                del self.inflight[tag]
                conn = self.conns.get(d.conn)
                if conn is not None:
                    conn.deliveries.pop(tag, None)
                d.consumer.unacked -= 1
                d.msg.state = GONE
                q.inflight_count -= 1
                freed.append(d.consumer)
        self._purge(q)
        del self.queues[name]
        self._log(R.DELETE, name)
        for c in dict.fromkeys(freed):
            if c.queues and c.unacked < c.prefetch and c.conn in self.conns:
                self._dispatch_consumer(c, now)

    # -- replay and compaction --------------------------------------------------------------
    def _replay_exchange_record(self, t: int, p) -> None:
        if t == R.BIND:
            exchange, kind, queue, key = p
            ex = self.exchanges.get(exchange)
            if ex is None:
                ex = self.exchanges[exchange] = Exchange(exchange, kind)
            if (queue, key) not in ex.bindings:
                self.queue(queue)
                ex.add(queue, key, None)
                self.binding_count += 1
        elif t == R.UNBIND:
            exchange, queue, key = p
            ex = self.exchanges.get(exchange)
            if ex is not None and (queue, key) in ex.bindings:
                self._drop_binding(ex, queue, key, log=False)

    def _replay_drop_temporary(self, msgs: dict, temporary: set) -> None:
        """After the records: no connection survives a restart, so no temporary queue does."""
        if not temporary:
            return
        for seq in [s for s, m in msgs.items() if m.queue.name in temporary]:
            del msgs[seq]
        for name in temporary:
            if self.queues.pop(name, None) is not None:
                self._unbind_queue(name)
                self._log(R.DELETE, name)

    def _compact_exchanges(self) -> None:
        for ex in self.exchanges.values():
            for (queue, key), owner in ex.bindings.items():
                if owner is None:
                    self._log(R.BIND, [ex.name, ex.kind, queue, key])

    def exchange_bindings(self, exchange: str) -> list[tuple]:
        """[(queue, key, temporary)] of one exchange, for BINDINGS."""
        validate_exchange_name(exchange)
        ex = self.exchanges.get(exchange)
        if ex is None:
            raise NotFound(f"no exchange named {exchange!r}; EXCHANGES lists them")
        return [(q, k, owner is not None) for (q, k), owner in ex.bindings.items()]
