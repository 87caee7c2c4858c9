"""The worker's link to brokerd, through the blocking client's public pipelined calls.

The public ``Client.store_result(..., delivery=d)`` and ``Delivery.nack(...)`` wait for the
broker's reply, which would put one round trip per task on the main loop.  The worker instead
*pipelines*: ``Client.submit(call, waiter)`` buffers a request (``client.verbs`` describes
each one), one ``Client.flush()`` per main-loop turn sends them all, and the replies are
checked in the background by the waiter.  ``Consumer.on_wake`` lets the client's reader
thread wake the main loop directly when deliveries arrive.
"""

from __future__ import annotations

import os
from collections import deque

from client import verbs
from client.producer import Client
from client.wire import OP_CONTROL_REPLY, OP_EMIT_EVENTS


class Done:
    """A waiter the client's reader thread 'releases' when a pipelined request is answered.

    Called under the client's lock: it only appends to a deque.  ``p`` is set before the
    request can be answered: it is only sent by the next ``flush()``.
    """

    __slots__ = ("p", "what", "sink")

    def __init__(self, what, sink):
        self.p = None
        self.what = what
        self.sink = sink

    def release(self):
        p = self.p
        if p is not None:
            self.p = None  # p holds this waiter: no cycle left for the garbage collector
            if p.error is not None:
                self.sink.append((self.refused(), p.error))

    def refused(self):
        """What the sink is told was refused."""
        return self.what

    def acquire(self, *a, **kw):  # never waited on; present so the Client can treat it as a lock
        return True


class _Result(Done):
    """RESULT_SET as a ``Client.submit`` call that is also its own waiter: one object per task, not
    three (what ``verbs.store_result`` makes, less a closure; and its ``what`` tuple is made only
    if brokerd refuses it)."""

    __slots__ = ("task_id", "state", "value", "meta", "ttl", "d")

    def __init__(self, task_id, state, value, meta, ttl, d, sink):
        self.p = None
        self.sink = sink
        self.task_id = task_id
        self.state = state
        self.value = value
        self.meta = meta
        self.ttl = ttl
        self.d = d

    def begin(self, session, waiter):
        return session.store_result(self.task_id, self.state, self.value, self.meta, self.ttl, self.d, waiter=waiter)

    def refused(self):
        return ("result", self.task_id, self.state, self.value, self.meta)


class Channel:
    """The worker's view of one live connection: results, acks and nacks, all pipelined.

    Requests are buffered with ``Client.submit`` and go out with the next ``flush()`` (once
    per main-loop turn); replies are checked in the background.  Failed requests land in
    ``sink`` as ``(what, error)``: the worker logs refusals and stores results again after a
    reconnect.
    """

    def __init__(self, client, gen: int, sink: deque, ttl=None):
        self.client = client
        self.gen = gen
        self.sink = sink
        self.ttl = ttl

    def _submit(self, call, what) -> None:
        w = Done(what, self.sink)
        w.p = self.client.submit(call, w)

    def result(self, d, task_id, state, value=None, meta=None) -> None:
        """RESULT_SET; with ``d`` (a delivery of this connection), ack it in the same record."""
        r = _Result(task_id, state, value, meta, self.ttl, d, self.sink)
        r.p = self.client.submit(r, r)

    def ack(self, d) -> None:
        d.ack()

    def nack(self, d, requeue=True, delay=None, headers=None) -> None:
        self._submit(verbs.nack_delivery(self.client, d, requeue, delay, headers), ("nack", d.id, requeue, delay))

    def release(self, ds) -> None:
        """RELEASE deliveries not started (the answer to a RECALL): not counted as attempts."""
        self._submit(verbs.release_deliveries(self.client, ds), ("release", [d.id for d in ds]))

    def credit(self, consumer, prefetch: int) -> None:
        """CREDIT: the consumer's prefetch from now on (the adaptive prefetch)."""
        self._submit(verbs.set_credit(self.client, consumer, prefetch), ("credit", prefetch))

    def publish(self, queue, body, *, priority=0, delay=None, headers=None, id=None) -> None:
        self.client.publish(queue, body, priority=priority, delay=delay, headers=headers, id=id, confirm=False)

    def events(self, hostname, batch) -> None:
        """EMIT_EVENTS: a batch of events, pipelined like the results (one frame per loop turn)."""
        self._submit(verbs.raw_call(self.client, OP_EMIT_EVENTS, hostname, batch), ("events", len(batch)))

    def control_reply(self, reply_id, reply) -> None:
        self._submit(verbs.raw_call(self.client, OP_CONTROL_REPLY, reply_id, reply), ("control reply", reply_id))

    def flush(self) -> None:
        self.client.flush()


def open_client(broker: str, name: str) -> Client:
    """A new blocking client connected to ``broker``'s leader (raises BrokerdError or OSError).

    ``reconnect=0``: the intake thread re-establishes a lost connection itself (a new client,
    a new generation whose deliveries never mix with the old one's, consumers made again)."""
    return Client(broker, name=name, reconnect=0)


def close_quietly(client) -> None:
    try:
        client.close(timeout=1.0)
    except Exception:
        pass


def hand_deliveries_to_main_loop(client, consumer, post) -> bool:
    """Let the reader thread wake the main loop directly ("poke"): one thread hand-off per
    burst instead of two (reader -> intake -> main).  False if this consumer cannot."""
    if not hasattr(consumer, "on_wake"):
        return False
    consumer.on_wake(lambda: post(("poke",)))
    post(("poke",))  # whatever arrived before the switch
    return True


def delivery_buffer(consumer) -> deque:
    """The consumer's buffer of deliveries, which the main loop empties itself (the direct path)."""
    return consumer.buffer


def wait_until_closed(client):
    """Block until the client's connection ends; return why (None if unknown)."""
    return client.wait_closed()


def detach_in_child(client) -> None:
    """In a forked child: point the parent's broker socket at /dev/null, so nothing the child does
    (a stray write, a close at exit) can touch the parent's connection."""
    try:
        fd = client.fileno()
        if fd >= 0:
            devnull = os.open(os.devnull, os.O_RDWR)
            os.dup2(devnull, fd)
            os.close(devnull)
    except OSError:
        pass


def forget_app_connection(app) -> None:
    """In a forked child: drop the app's client (the parent's); a task that publishes makes its own."""
    app.reset_after_fork()
