"""Every request verb of the client, described once; both shells are built from it.

A verb is a small function written as if it were a method (``client`` is the
shell) that turns its arguments into a ``Call``: the op, the fields in wire
order (``client.wire.request_frame`` lays them out), how the reply becomes the
return value, and the timeout when it is not the client's own.  It does no
I/O.  ``sync_verbs`` and ``async_verbs`` are class decorators that give a
shell one method per verb, with the verb's name, signature and docstring:

    Client.declare(...)              ->  self._run(verbs.declare(self, ...))
    await AsyncClient.declare(...)   ->  await self._run(verbs.declare(self, ...))

so a verb added here appears in both shells, and ``tests/client/test_client_parity.py``
checks that they agree.  Every verb here is *confirmed*: it waits for the
broker's reply.  The pipelined paths (``publish(confirm=False)``, batched
acks) are the shells' own, because they must not allocate a ``Call``.

Deliveries settle through ``ack_delivery``, ``nack_delivery`` and
``touch_delivery``, installed as the shells' ``_ack_now``, ``_nack`` and
``_touch`` (what ``Delivery.ack(wait=True)``, ``nack()`` and ``touch()`` call).
A blocking caller that must not wait (the worker) hands any ``Call`` to
``Client.submit(call, waiter)`` and flushes once per batch.
"""

from __future__ import annotations

import functools

from client.options import admin_reply, publish_options, queue_options
from client.wire import (
    OP_ADMIN,
    OP_BIND,
    OP_EMIT,
    OP_UNBIND,
    OP_CHORD,
    OP_CHORD_ADD,
    OP_CONTROL_REQUEST,
    OP_DECLARE,
    OP_DELETE,
    OP_EMIT_EVENTS,
    OP_PAUSE,
    OP_PING,
    OP_PUBLISH,
    OP_PURGE,
    OP_RATE_LIMIT,
    OP_RESULT_FORGET,
    OP_RESULT_GET,
    OP_RESUME,
    OP_REVOKE,
    OP_SCHEDULE_LIST,
    OP_SCHEDULE_PAUSE,
    OP_SCHEDULE_PUT,
    OP_SCHEDULE_REMOVE,
    OP_STATS,
    OP_SUBSCRIBE,
    OP_TASK_INFO,
    OP_WORKERS,
)

# A control request waits this long past its own ``timeout`` for the broker's
# collected answer when the client has no timeout (seconds): the broker answers
# at ``timeout`` at the latest, so this only covers the round trip.
CONTROL_SLACK = 10.0


class Call:
    """What one verb asks of the session.

    ``op`` and ``fields``: the request (``session.request(op, fields)``), or
    ``start(session, waiter) -> Pending`` when the session has a method of its
    own for it (settling a delivery).  ``timeout``: seconds to wait for the
    reply (None: the client's).  ``reply(result)``: the return value (None:
    the result as is).  ``timed``: return the round trip's duration instead.
    """

    __slots__ = ("op", "fields", "timeout", "reply", "start", "timed")

    def __init__(self, op=None, fields=(), *, timeout=None, reply=None, start=None, timed=False):
        self.op = op
        self.fields = list(fields)
        self.timeout = timeout
        self.reply = reply
        self.start = start
        self.timed = timed

    def finish(self, result, elapsed: float):
        """The verb's return value, from the reply's result and the round trip's duration."""
        if self.timed:
            return elapsed
        return result if self.reply is None else self.reply(result)

    def begin(self, session, waiter):
        """Buffer the request in ``session``; return its ``Pending``."""
        if self.start is not None:
            return self.start(session, waiter)
        return session.request(self.op, self.fields, waiter=waiter)

    def __repr__(self):
        return f"<Call op={self.op} fields={self.fields!r}>"


VERBS: list = []  # the public verbs, in the order the shells list them


def verb(fn):
    VERBS.append(fn)
    return fn


def _plus_client_timeout(client, seconds_: float, default: float | None):
    """``seconds_`` plus the client's timeout (``default`` when it has none; None: wait forever)."""
    base = client.timeout if client.timeout is not None else default
    return None if base is None else seconds_ + base


# -- queues and the broker (protocol.md §5.8-5.16) ---------------------------------------
@verb
def declare(client, queue: str, *, dead_letter: str | None = None, max_attempts: int | None = 25,
            reserve_timeout: float | None = None, max_length: int | None = None, overflow: str = "reject",
            temporary: bool = False, rate_limit=None) -> dict:
    """Create ``queue`` with these options (or check an existing one has them).

    * ``dead_letter``: where failed messages go (default ``<queue>.dlq``).
    * ``max_attempts``: deliveries before dead-lettering (None: unlimited).
    * ``reserve_timeout``: seconds a delivery may stay unacked and
      untouched before the broker takes it back and redelivers it.
    * ``max_length`` and ``overflow`` (``"reject"``: publishes raise
      ``QueueFull``; ``"drop-head"``: the oldest is dead-lettered).
    * ``temporary``: the queue, its messages and bindings are deleted when
      this connection closes (AMQP's exclusive/auto-delete; a restart has none).
    * ``rate_limit``: brokerd delivers from the queue at most this fast ("10/s", "100/m").

    Returns the queue's options.  ``PreconditionFailed`` if it exists with others.
    """
    opts = queue_options(dead_letter, max_attempts, reserve_timeout, max_length, overflow)
    if temporary:
        opts["temporary"] = True
    if rate_limit is not None:
        opts["rate_limit"] = rate_limit  # sent only when set: brokerds without flow control keep working
    return Call(OP_DECLARE, [queue, opts])


@verb
def delete(client, queue: str) -> int:
    """Delete ``queue`` and its waiting messages; returns how many were dropped.

    ``PreconditionFailed`` while it has consumers or messages in flight.
    """
    return Call(OP_DELETE, [queue])


@verb
def purge(client, queue: str) -> int:
    """Drop every waiting (ready or delayed) message of ``queue``; returns how many."""
    return Call(OP_PURGE, [queue])


def _none(_result):
    return None


@verb
def pause(client, queue: str) -> None:
    """Stop deliveries from ``queue`` (publishes are still accepted)."""
    return Call(OP_PAUSE, [queue], reply=_none)


@verb
def resume(client, queue: str) -> None:
    """Start deliveries from ``queue`` again."""
    return Call(OP_RESUME, [queue], reply=_none)


@verb
def stats(client, queue: str | None = None) -> dict:
    """Counters of one queue, or ``{"broker": {...}, "queues": {name: {...}}}``."""
    return Call(OP_STATS, [queue])


@verb
def admin(client, line: str) -> str:
    """Run one admin text command (``"QUEUES"``, ``"PEEK emails 5"``...); return its reply text.

    A reply starting ``ERR <CODE>`` raises that code's exception
    (``BadRequest`` for an unknown command, ``NotFound``...).
    """
    return Call(OP_ADMIN, [line], reply=admin_reply)


@verb
def ping(client) -> float:
    """One round trip to the broker; returns its duration in seconds."""
    return Call(OP_PING, timed=True)


# -- tasks: results, revokes, schedules, chords (protocol.md §5.19-5.27) ---------------
@verb
def store_result(client, task_id: str, state: str, value=None, meta: dict | None = None, *,
                 ttl=None, delivery=None) -> dict:
    """Store a task's state and result in brokerd; returns ``{"acked": bool}``.

    With ``delivery``, brokerd acks that delivery in the same log record
    (only with a final state: SUCCESS, FAILURE, REVOKED).
    """
    return Call(start=lambda s, w: s.store_result(task_id, state, value, meta, ttl, delivery, waiter=w))


@verb
def get_result(client, task_id: str, wait: float | None = None) -> dict:
    """``{"id", "state", "result", "meta", "updated"}``; with ``wait``, brokerd holds
    the request until the result is ready or ``wait`` seconds pass."""
    return Call(OP_RESULT_GET, [task_id, wait], timeout=_plus_client_timeout(client, wait or 0, None))


@verb
def forget_result(client, task_id: str) -> bool:
    """Drop a task's stored result; True if there was one."""
    return Call(OP_RESULT_FORGET, [task_id])


@verb
def revoke(client, task_ids, *, terminate: bool = False, ttl=None) -> int:
    """Never run these tasks (remembered by brokerd, across restarts, for ``ttl``
    seconds, default a day); ``terminate`` also kills them where they run."""
    opts = {"terminate": bool(terminate)}
    if ttl is not None:
        opts["ttl"] = float(ttl)
    return Call(OP_REVOKE, [task_ids, opts])


@verb
def rate_limit(client, name: str, limit, *, queue: bool = False) -> dict:
    """Set the rate brokerd delivers task ``name`` (or with ``queue=True``, queue ``name``)
    at, live and kept across restarts: "10/s", "100/m", "1000/h"; 0 or None lifts it.
    Returns ``{"kind", "name", "limit", "previous"}``."""
    return Call(OP_RATE_LIMIT, [name, limit, "queue" if queue else "task"])


@verb
def schedule_put(client, name: str, spec: dict) -> dict:
    """Create or replace the periodic schedule ``name``."""
    return Call(OP_SCHEDULE_PUT, [name, spec])


@verb
def schedule_remove(client, name: str) -> bool:
    """Remove the schedule ``name``; True if it existed."""
    return Call(OP_SCHEDULE_REMOVE, [name])


@verb
def schedule_list(client, owner: str | None = None) -> list:
    """Every schedule (of ``owner`` only, if given)."""
    return Call(OP_SCHEDULE_LIST, [owner])


@verb
def schedule_pause(client, name: str, paused: bool = True) -> dict:
    """Pause (or with ``paused=False`` resume) the schedule ``name``."""
    return Call(OP_SCHEDULE_PAUSE, [name, bool(paused)])


@verb
def chord(client, chord_id: str, members: list, body: dict, error: dict | None = None, *,
          run: str | None = None) -> dict:
    """Register a chord: ``body`` is published once every task of ``members`` has a result.  Idempotent per
    ``chord_id``, unless ``run`` names a run the chord is not at: that starts a new run of it, which waits
    for results its members store from then on (protocol.md §5.27, "Runs")."""
    if run is None:
        return Call(OP_CHORD, [chord_id, list(members), body, error])
    return Call(OP_CHORD, [chord_id, list(members), body, error, {"run": run}])


@verb
def chord_add(client, chord_id: str, members: list) -> dict:
    """Add ``members`` (task ids) to the waiting chord ``chord_id`` (Celery's ``add_to_chord``)."""
    return Call(OP_CHORD_ADD, [chord_id, list(members)])


# -- events, workers and remote control (protocol.md §5.29-5.35) ------------------------
@verb
def emit_events(client, hostname: str, events: list) -> int:
    """Send a batch of event maps (``{"type": "task-received", "uuid": ..., ...}``) as ``hostname``."""
    return Call(OP_EMIT_EVENTS, [hostname, list(events)])


@verb
def subscribe_events(client, handler=None, replay: int = 0) -> dict:
    """Receive every event brokerd gets from now on (after the last ``replay`` ones).

    ``handler(events, dropped)`` is called in the client's reader (thread or
    task) for each batch (``dropped``: events brokerd left out because this
    connection read too slowly); an exception it raises is logged.
    Returns ``{"subscribed", "replayed", "dropped"}``.
    """
    if handler is not None:
        client.event_handlers.append(handler)
    return Call(OP_SUBSCRIBE, [True, int(replay)])


@verb
def unsubscribe_events(client) -> dict:
    """Stop the event stream started by ``subscribe_events``."""
    return Call(OP_SUBSCRIBE, [False])


@verb
def task_info(client, task_id: str) -> dict | None:
    """A task's history (events), what they say (name, args, worker, state...) and its
    stored result; None when brokerd knows nothing of it."""
    return Call(OP_TASK_INFO, [task_id])


@verb
def workers(client) -> list:
    """Every worker brokerd has heard of: state (online, lost, offline), pool, counts."""
    return Call(OP_WORKERS)


@verb
def control(client, command: str, args: dict | None = None, *, timeout: float = 1.0,
            destination: list | None = None) -> dict:
    """Ask the live workers (or those named in ``destination``); returns
    ``{hostname: reply}`` once all answered or after ``timeout`` seconds."""
    opts = {"timeout": float(timeout)}
    if destination is not None:
        opts["destination"] = [destination] if isinstance(destination, str) else list(destination)
    return Call(OP_CONTROL_REQUEST, [command, args, opts], timeout=_plus_client_timeout(client, timeout, CONTROL_SLACK))


# -- unique tasks (protocol.md §5.2, unique_key) ---------------------------------------------
@verb
def publish_unique(client, queue: str, body: bytes, unique_key: str, *, unique_for: float | None = None,
                   unique_until: str = "finished", id: str | None = None, priority: int = 0,
                   headers: dict | None = None, delay=None, eta=None, ttl=None) -> dict:
    """Publish unless a message holding ``unique_key`` is still around; returns
    ``{"id", "duplicate"}`` (a duplicate enqueues nothing and names the holder's id).

    The key is held ``unique_until`` ``"started"`` (first delivery), ``"finished"``
    (acked or a final result stored) or ``"time"``; never longer than ``unique_for``
    seconds (brokerd's default: an hour).
    """
    opts = publish_options(delay, eta, ttl, headers) or {}
    opts["unique_key"] = unique_key
    opts["unique_until"] = unique_until
    if unique_for is not None:
        opts["unique_for"] = float(unique_for)
    return Call(OP_PUBLISH, [queue, body, id, priority, opts])


# -- exchanges: one publish copied to every bound queue (protocol.md §5.36-5.38) ------------
@verb
def bind(client, exchange: str, queue: str, key: str = "", *, type: str = "direct",
         temporary: bool = False) -> bool:
    """Bind ``queue`` to ``exchange`` so that ``emit(exchange, key, ...)`` copies into it.

    ``type`` is the exchange's: ``"direct"`` (the routing key equals ``key``),
    ``"fanout"`` (every bound queue; ``key`` ignored) or ``"topic"`` (``key``
    is a pattern of dot-separated words, ``*`` one word, ``#`` zero or more).
    A missing queue is created.  ``temporary``: the binding dies with this
    connection (else it is logged and survives restarts).  Returns True if
    the binding is new; ``PreconditionFailed`` if the exchange has another type.
    """
    return Call(OP_BIND, [exchange, queue, key, {"type": type, "temporary": bool(temporary)}])


@verb
def unbind(client, exchange: str, queue: str, key: str = "") -> bool:
    """Remove the binding of ``queue`` to ``exchange`` with ``key``; True if it existed."""
    return Call(OP_UNBIND, [exchange, queue, key])


@verb
def emit(client, exchange: str, key: str, body: bytes, *, id: str | None = None, priority: int = 0,
         headers: dict | None = None, delay=None, eta=None, ttl=None) -> dict:
    """Publish ``body`` to ``exchange`` with routing key ``key``: a copy goes to every
    bound queue that matches, each a normal message of its queue (same ``id``).

    Returns ``{"id": id, "queues": n}``; ``n == 0``: nothing was bound, the message is
    dropped.  A full queue (overflow reject) gets no copy and is listed in ``"full"``.
    Confirmed like ``publish``: every copy is durable when this returns.
    """
    return Call(OP_EMIT, [exchange, key, body, id, priority, publish_options(delay, eta, ttl, headers)])


# -- settling a delivery (Delivery.ack(wait=True) / nack / touch land here) -----------------
def ack_delivery(client, d) -> None:
    """ACK ``d`` alone and wait for the answer (``StaleDelivery`` if the broker took it back)."""
    return Call(start=lambda s, w: s.ack_now(d, waiter=w), reply=_none)


def nack_delivery(client, d, requeue: bool = True, delay=None, headers=None) -> None:
    """NACK ``d``: requeue (after ``delay`` seconds) or dead-letter it."""
    return Call(start=lambda s, w: s.nack(d, requeue, delay, headers, waiter=w), reply=_none)


def release_deliveries(client, ds):
    """RELEASE ``ds`` (protocol.md §5.41): deliveries not started go back, not counted as attempts."""
    return Call(start=lambda s, w: s.release(ds, waiter=w))


def set_credit(client, consumer, prefetch: int):
    """CREDIT (protocol.md §5.40): ``consumer``'s prefetch from now on (a shell's consumer)."""
    state = consumer._state
    return Call(start=lambda s, w: s.credit(state, prefetch, waiter=w))


def touch_delivery(client, d):
    """TOUCH ``d``: restart its reservation timer; returns the queue's reserve_timeout."""
    return Call(start=lambda s, w: s.touch(d, waiter=w))


# shell method name -> verb; the session's Delivery calls owner._ack_now / _nack / _touch
PRIVATE_VERBS = {"_ack_now": ack_delivery, "_nack": nack_delivery, "_touch": touch_delivery}


# -- verbs each shell writes itself (how they wait differs), described here once ------------
# The shells take these docstrings (``described_by``); tests/client/test_client_parity.py
# checks their signatures against these.
def publish(client, queue: str, body: bytes, *, priority: int = 0, delay=None, eta=None, ttl=None,
            headers: dict | None = None, confirm: bool = True, id: str | None = None) -> str:
    """Publish ``body`` to ``queue``; return the message id.

    * ``priority``: 0-255, higher first; FIFO within one priority.
    * ``delay`` (seconds or timedelta) or ``eta`` (UNIX time or datetime):
      the broker holds the message until then.
    * ``ttl`` (seconds): dropped if not delivered by then.
    * ``headers``: a dict delivered with the message.
    * ``id``: the message id; by default the client makes a unique one
      (a random per-client prefix and a counter).
    * ``confirm=True`` (default) waits for the broker's confirm and raises
      ``QueueFull``, ``MessageTooLarge``, ``BadRequest``... if refused.
      ``confirm=False`` buffers the frame (without yielding to an event loop)
      and returns at once; it is sent within ~1 ms; call
      ``wait_for_confirms()`` to learn the outcome.
    """


def wait_for_confirms(client, timeout: float | None = None) -> None:
    """Wait until every publish made before this call is confirmed.

    Raises ``PublishError`` naming each message id the broker refused
    since the last call (the others were confirmed), ``Timeout`` after
    ``timeout`` seconds (None: no limit), or ``ConnectionLost`` if the
    connection dropped first (its ``unconfirmed`` attribute lists the
    message ids whose fate is unknown: publish them again).
    """


def consume(client, queues, prefetch: int = 10, *, slots: int | None = None):
    """Subscribe to ``queues`` (a name or a list, in preference order).

    Returns a consumer: iterate it for deliveries (``for`` / ``async for``),
    or call ``get(timeout)``.  The broker never has more than ``prefetch``
    unacked deliveries out to this consumer.  ``slots`` (for workers): it runs
    that many at once and answers RECALL (protocol.md §5.42) through a CONTROL
    handler, ``{"recall": [consumer, n, queue]}``, with ``release_deliveries``.
    """


def close(client, timeout: float | None = None) -> None:
    """Send what is buffered, say BYE, wait for the broker's answer, close.

    Unacked deliveries (including ones received but not yet handed out)
    go back to their queues on the broker, marked redelivered.  Publishes
    made with ``confirm=False`` are sent and their confirms awaited first
    (up to ``timeout``, default the client's); refusals not collected by
    ``wait_for_confirms`` are logged, not raised.  Idempotent.
    """


SHELL_VERBS = [publish, wait_for_confirms, consume, close]


def described_by(spec):
    """Give a shell's own method the docstring of its description here."""

    def take(fn):
        fn.__doc__ = spec.__doc__
        return fn

    return take


# -- building the shells --------------------------------------------------------------------
def _sync_method(fn):
    def method(self, *args, **kwargs):
        return self._run(fn(self, *args, **kwargs))

    return functools.wraps(fn)(method)


def _async_method(fn):
    async def method(self, *args, **kwargs):
        return await self._run(fn(self, *args, **kwargs))

    return functools.wraps(fn)(method)


def raw_call(client, op: int, *args, timeout=None):
    """One request ``[op, rid, *args]``, waited for: for callers that name an op
    themselves (tests, the task layer).  Installed as the shells' ``_call``."""
    return Call(op, args, timeout=timeout)


PRIVATE_VERBS["_call"] = raw_call


class ShellInfo:
    """The read-only properties both shells share (``_session`` is None before connecting)."""

    @property
    def server_info(self) -> dict:
        """The broker's HELLO reply: server version, heartbeat, max_frame, connection id."""
        session = self._session
        return dict(session.server or {}) if session is not None else {}

    @property
    def is_open(self) -> bool:
        """True until the connection is closed or lost."""
        return self._session is not None and self._session.is_open


def _install(cls, make):
    names = [(fn.__name__, fn) for fn in VERBS] + list(PRIVATE_VERBS.items())
    for name, fn in names:
        if name in cls.__dict__:
            raise TypeError(f"{cls.__name__} defines {name} itself; it is a verb of client.verbs")
        m = make(fn)
        m.__name__ = name
        m.__qualname__ = f"{cls.__name__}.{name}"
        setattr(cls, name, m)
    return cls


def sync_verbs(cls):
    """Class decorator: one blocking method per verb, each ``self._run(call)``."""
    return _install(cls, _sync_method)


def async_verbs(cls):
    """Class decorator: one coroutine method per verb, each ``await self._run(call)``."""
    return _install(cls, _async_method)
