"""``Client``: the blocking brokerd client, for sync web apps and scripts.

    with Client("127.0.0.1:7700", name="web-1") as c:
        c.publish("emails", b"...")                      # waits for the confirm
        for i in range(10_000):
            c.publish("emails", b"...", confirm=False)   # pipelined
        c.wait_for_confirms()                            # PublishError names any refused
        for d in c.consume(["high", "low"], prefetch=10):
            handle(d.body)
            d.ack()

A thin shell: the protocol lives in the sans-I/O ``client.session.Session``,
the request verbs in ``client.verbs`` (shared with ``AsyncClient``), the socket
and the two daemon threads (reader, flusher) in ``client.blocking``; this module
adds the verbs each shell writes itself.  One ``Client`` is safe to share
between threads.  ``publish(confirm=False)`` and ``ack()`` only buffer; the
buffer goes out past ``FLUSH_BYTES``, when a call needs a reply, before a
consumer blocks, when half a prefetch is acked, or from the flusher
(``FLUSH_DELAY``, ~1 ms).
"""

from __future__ import annotations

import threading
import time

from client import verbs
from client.blocking import Connection, Consumer, new_waiter
from client.errors import BrokerdError, ConnectionLost, NotLeader, PublishError
from client.options import MAX_REDIRECTS, default_name, new_id_prefix, parse_address, publish_options
from client.session import FLUSH_BYTES, Delivery

__all__ = ["Client", "Consumer", "Delivery", "parse_address", "default_name", "new_id_prefix"]

_monotonic = time.monotonic


@verbs.sync_verbs
class Client(Connection, verbs.ShellInfo):
    """A blocking connection to brokerd, safe to share between threads.

    ``Client(address="127.0.0.1:7700", *, name=None, heartbeat=30.0, timeout=10.0, reconnect=30.0)``

    * ``address``: ``"host:port"`` (or a ``(host, port)`` tuple).
    * ``name``: shown by the broker's admin ``CONSUMERS`` (default host:pid).
    * ``heartbeat``: seconds; each side sends a HEARTBEAT after this long
      without sending, and gives the connection up after two intervals of
      silence.  0 turns heartbeats off.
    * ``timeout``: seconds to wait for a reply (and to connect) before
      raising ``Timeout``.  None waits forever.
    * ``reconnect``: seconds a lost connection is re-established for before a
      call raises ``ConnectionLost`` (default 30; 0: never).  ``address`` may
      list a replica group (``"brokerd://h1:7700,h2:7700"``): the client finds
      the leader, follows ``NOT_LEADER`` and resends unconfirmed publishes
      (protocol.md §6.4).

    Connects (and completes HELLO) in the constructor; use it as a context
    manager or call ``close()``.  Create clients after forking (gunicorn's
    ``post_fork``): a forked child has the socket but not the threads.
    """

    # -- the verbs each shell writes itself -------------------------------------------------------
    @verbs.described_by(verbs.publish)
    def publish(self, queue: str, body: bytes, *, priority: int = 0, delay=None, eta=None, ttl=None,
                headers: dict | None = None, confirm: bool = True, id: str | None = None) -> str:
        opts = None if (delay is None and eta is None and ttl is None and headers is None) else publish_options(delay, eta, ttl, headers)
        if confirm:
            return self._publish_confirmed(queue, body, id, priority, opts)
        while True:
            with self._lock:
                session = self._session
                lost = session.error is not None and self._lost(session)  # (the call only when it may be)
                if not lost:
                    _, mid = session.publish(queue, body, id, priority, opts, confirm=False)
                    flush = session.out_bytes >= FLUSH_BYTES
                    if not flush and not self._dirty.is_set():
                        self._dirty.set()
                    break
            # Lost: reconnect (resending the pipelined publishes the lost connection never
            # confirmed), then buffer this one on the new connection.
            if not self._recover(session):
                session.check_open()
        if flush:
            try:
                self.flush()
            except ConnectionLost:
                if not self.reconnect:
                    raise  # else: resent by the next call's reconnect (or wait_for_confirms)
        return mid

    def _publish_confirmed(self, queue, body, msg_id, priority, opts) -> str:
        """PUBLISH and wait for its confirm.  If the connection is lost first, or the broker
        is a follower (NOT_LEADER), reconnect to the leader and send it again with the same
        message id and dedupe key: brokerd stores it once (protocol.md §5.2, §6.4)."""
        entry = None
        for _ in range(MAX_REDIRECTS + 1):
            w = new_waiter()
            with self._lock:
                session = self._session
                lost = self._lost(session)
                if not lost:
                    if entry is None:
                        p, msg_id = session.publish(queue, body, msg_id, priority, opts, waiter=w)
                        entry = session.sent.get(p.rid)
                    else:
                        p, msg_id = session.publish(*entry, waiter=w)
            if lost:
                if self._recover(session):
                    continue
                session.check_open()
            try:
                self.flush()
                self._wait(p, self.timeout)
                return msg_id
            except NotLeader as exc:
                if not self._recover(session, exc.message):
                    raise
            except ConnectionLost:
                if entry is None or not self._recover(session):
                    raise
        raise NotLeader(None, f"still no leader after {MAX_REDIRECTS} redirects from {self.address}")

    @verbs.described_by(verbs.wait_for_confirms)
    def wait_for_confirms(self, timeout: float | None = None) -> None:
        deadline = None if timeout is None else _monotonic() + timeout
        refused = []
        while True:
            with self._lock:
                session = self._session
                mark = session.confirm_mark()
            try:
                self.flush()
            except BrokerdError:
                pass  # reported below with the unconfirmed ids
            try:
                with self._lock:
                    while True:
                        done, remaining = session.confirms_wait(mark, deadline, _monotonic(), timeout)
                        if done:
                            break
                        self._confirm_cond.wait(remaining)
                    refused += session.take_refused()
                    redirect = session.leader_hint if session.redirected else None
            except ConnectionLost:
                # Reconnect and resend what the lost connection never confirmed (same ids and
                # dedupe keys: stored once), then wait for those confirms on the new one.
                if not self._recover(session):
                    raise
                continue
            if redirect is not None and self._recover(session, redirect):
                continue  # NOT_LEADER: resent to the leader it named
            break
        if refused:
            raise PublishError(refused)

    @verbs.described_by(verbs.consume)
    def consume(self, queues, prefetch: int = 10, *, slots: int | None = None) -> "Consumer":
        # As every other call (Connection._run): on a connection already lost, reconnect first
        # (to whoever leads now), and a NOT_LEADER refusal goes to the leader it names; so a
        # consumer that ended with its connection consumes again with this same call.
        for _ in range(MAX_REDIRECTS + 1):
            w = new_waiter()
            with self._lock:
                session = self._session
                lost = self._lost(session)
                if not lost:
                    p = session.consume(queues, prefetch, waiter=w, slots=slots)
                    p.consumer.waiter = threading.Condition(self._lock)
            if lost:
                if self._recover(session):
                    continue
                session.check_open()
            self.flush()
            try:
                self._wait(p, self.timeout)
            except NotLeader as exc:
                if self._recover(session, exc.message):
                    continue
                raise
            return Consumer(self, p.consumer)
        raise NotLeader(None, f"still no leader after {MAX_REDIRECTS} redirects from {self.address}")

    def _ack(self, d: Delivery, wait: bool = False) -> None:
        """``Delivery.ack``: batched (the other settling verbs come from ``client.verbs``)."""
        if wait:
            return self._ack_now(d)
        with self._lock:
            now = self._session.ack(d)
            if not now and not self._dirty.is_set():
                self._dirty.set()
        if now:
            self.flush()

    @verbs.described_by(verbs.close)
    def close(self, timeout: float | None = None) -> None:
        if self._closed:
            return
        timeout = self.timeout if timeout is None else timeout
        session = self._session
        try:
            if session.unconfirmed:
                # Collect outstanding confirms first, so refusals can be logged
                # (the broker answers nothing after BYE's reply).
                try:
                    self.wait_for_confirms(timeout)
                except PublishError as exc:
                    session.refused.extend(exc.failures)
            with self._lock:
                p = session.bye(waiter=new_waiter()) if session.is_open else None
            if p is not None:
                self.flush()
                self._wait(p, timeout)
        except BrokerdError:
            pass
        finally:
            self._closed = True
            with self._lock:
                session.log_uncollected()
            self._abort(None)
            self._stop_io(join_timeout=5)
