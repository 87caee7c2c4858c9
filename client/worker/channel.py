"""The worker's link to brokerd: the only module here that touches the blocking client's internals.

The public ``Client.store_result(..., delivery=d)`` and ``Delivery.nack(...)`` wait for the
broker's reply, which would put one round trip per task on the main loop.  The worker needs
*pipelined* calls (frames buffered in the client's session, sent by one ``flush()`` per main-loop
turn, replies checked in the background) and a way to be woken when deliveries arrive.  The
blocking client has no public API for either yet, so every private access is isolated here,
behind named functions, and nothing else in ``client/worker/`` reaches into the client:

* ``Channel``: ``client._session`` (``store_result``, ``nack``, ``request``, ``has_output``),
  ``client._lock``, ``client._flush()``;
* ``hand_deliveries_to_main_loop`` / ``delivery_buffer``: ``consumer._state`` (``buffer``,
  ``waiter``), ``client._lock``, ``client._reader``;
* ``wait_until_closed``: ``client._reader``, ``client._lock``, ``client._session.error``;
* ``detach_in_child``: ``client._sock``;

When the client offers public pipelined calls, this file is the one to change.
"""

from __future__ import annotations

import os
import threading
from collections import deque

from client.producer import Client
from client.wire import OP_CONTROL_REPLY, OP_EMIT_EVENTS


class Done:
    """A waiter the client's reader thread 'releases' when a pipelined request is answered.

    Called under the client's lock: it only appends to a deque.
    """

    __slots__ = ("p", "what", "sink")

    def __init__(self, what, sink):
        self.p = None
        self.what = what
        self.sink = sink

    def release(self):
        p = self.p
        if p is not None and p.error is not None:
            self.sink.append((self.what, p.error))

    def acquire(self, *a, **kw):  # never waited on; present so the Client can treat it as a lock
        return True


class Channel:
    """The worker's view of one live connection: results, acks and nacks, all pipelined.

    Drives the client's ``Session`` the way the public calls do (``session.store_result`` /
    ``session.nack`` under ``client._lock``) but does not wait: frames go out with the next
    ``flush()`` (once per main-loop turn) and replies are checked in the background.  Failed
    requests land in ``sink`` as ``(what, error)``: the worker logs refusals and stores
    results again after a reconnect.
    """

    def __init__(self, client, gen: int, sink: deque, ttl=None):
        self.client = client
        self.gen = gen
        self.sink = sink
        self.ttl = ttl
        self.session = client._session
        self.lock = client._lock

    def result(self, d, task_id, state, value=None, meta=None) -> None:
        """RESULT_SET; with ``d`` (a delivery of this connection), ack it in the same record."""
        w = Done(("result", task_id, state, value, meta), self.sink)
        with self.lock:
            w.p = self.session.store_result(task_id, state, value, meta, self.ttl, d, waiter=w)

    def ack(self, d) -> None:
        d.ack()

    def nack(self, d, requeue=True, delay=None, headers=None) -> None:
        w = Done(("nack", d.id, requeue, delay), self.sink)
        with self.lock:
            w.p = self.session.nack(d, requeue, delay, headers, waiter=w)

    def publish(self, queue, body, *, priority=0, delay=None, headers=None, id=None) -> None:
        self.client.publish(queue, body, priority=priority, delay=delay, headers=headers, id=id, confirm=False)

    def events(self, hostname, batch) -> None:
        """EMIT_EVENTS: a batch of events, pipelined like the results (one frame per loop turn)."""
        w = Done(("events", len(batch)), self.sink)
        with self.lock:
            w.p = self.session.request(OP_EMIT_EVENTS, [hostname, batch], waiter=w)

    def control_reply(self, reply_id, reply) -> None:
        w = Done(("control reply", reply_id), self.sink)
        with self.lock:
            w.p = self.session.request(OP_CONTROL_REPLY, [reply_id, reply], waiter=w)

    def flush(self) -> None:
        if self.session.has_output:
            self.client._flush()


def open_client(broker: str, name: str) -> Client:
    """A new blocking client connected to ``broker`` (raises BrokerdError or OSError)."""
    return Client(broker, name=name)


def close_quietly(client) -> None:
    try:
        client.close(timeout=1.0)
    except Exception:
        pass


class PokingCondition(threading.Condition):
    """Stands in for a consumer's wake-up Condition: the client's reader thread calls
    ``notify_all()`` (holding the client's lock) when deliveries arrive; this also posts a
    "poke" to the worker's main loop, which then takes them from the consumer's buffer.
    One thread hand-off per burst instead of two (reader -> intake -> main)."""

    def __init__(self, lock, post):
        super().__init__(lock)
        self.post_poke = post

    def notify_all(self):
        super().notify_all()
        self.post_poke(("poke",))

    notifyAll = notify_all


def hand_deliveries_to_main_loop(client, consumer, post) -> bool:
    """Let the reader thread wake the main loop directly; False if this client cannot."""
    state = getattr(consumer, "_state", None)
    if state is None or not hasattr(state, "buffer") or not hasattr(client, "_reader") or not hasattr(client, "_lock"):
        return False
    with client._lock:
        state.waiter = PokingCondition(client._lock, post)
    post(("poke",))  # whatever arrived before the switch
    return True


def delivery_buffer(consumer) -> deque:
    """The consumer's buffer of deliveries, which the main loop empties itself (the direct path)."""
    return consumer._state.buffer


def wait_until_closed(client):
    """Block until the client's connection ends; return why (its session's error, None if unknown)."""
    client._reader.join()
    with client._lock:
        return client._session.error


def detach_in_child(client) -> None:
    """In a forked child: point the parent's broker socket at /dev/null, so nothing the child does
    (a stray write, a close at exit) can touch the parent's connection."""
    try:
        fd = client._sock.fileno()
        if fd >= 0:
            devnull = os.open(os.devnull, os.O_RDWR)
            os.dup2(devnull, fd)
            os.close(devnull)
    except OSError:
        pass


def forget_app_connection(app) -> None:
    """In a forked child: drop the app's client (the parent's); a task that publishes makes its own."""
    app.reset_after_fork()
