"""A kombu transport for ``brokerd://`` and ``brokerds://`` URLs, over the public blocking client.

It keeps kombu's virtual-transport bookkeeping (channels, declared exchanges, message objects) and
replaces everything that moves or settles a message by brokerd's own operations:

* publish: PUBLISH with the Celery task id, priority, and ``eta`` held by brokerd (``message.py``);
* consume: one brokerd consumer (CONSUME) per ``basic_consume``, its prefetch credit = ``basic_qos``'s
  ``prefetch_count``; deliveries are pushed: the client's reader thread writes a byte to a pipe
  (``Consumer.on_wake``), and the worker's event loop waits on that pipe
  (``register_with_event_loop``), so there is no polling interval;
* ``basic_ack`` / ``basic_reject(requeue)``: ACK / NACK; unacked deliveries go back on disconnect by
  brokerd itself (no visibility timeout, nothing restored by the client);
* ``queue_purge``: PURGE, ``queue_declare``: DECLARE (passive: STATS);
* a pidbox ``revoke`` broadcast also sends brokerd's durable REVOKE.

Exchanges are brokerd's own (protocol.md §5.36-5.38, §13), through ``ExchangeRouter``: a binding is a
BIND (temporary for a temporary queue), a publish to a fanout/topic exchange is an EMIT that brokerd
copies to every bound queue of every process, and direct routing keeps its fast path (PUBLISH to the
queue a binding names).  Queues kombu declares ``exclusive``/``auto_delete``/with ``x-expires`` (Celery's
pidbox, reply and event queues) are brokerd's temporary queues: they and their bindings go with the
connection that declared them.
"""

from __future__ import annotations

import contextlib
import logging
import os
import select
import socket
import threading
from time import monotonic as _monotonic
from time import time as _time

from kombu.transport import virtual
from kombu.utils.objects import cached_property

from client import verbs
from client.celery import message as M
from client.errors import BrokerdError, ConnectionClosed, ConnectionLost, NotFound, PreconditionFailed, Timeout
from client.producer import Client

log = logging.getLogger("brokerd.celery")

DEFAULT_PORT = 7700
# kombu's prefetch_count 0 means "no limit"; brokerd's credit is 1..65535 per consumer.  This bounds
# what one worker may hold unacked (memory) while being "unlimited" for any real Celery setting.
UNLIMITED_PREFETCH = 65535
GET_WAIT = 0.5  # seconds basic_get waits for brokerd to deliver a ready message (a round trip or two)
PIDBOX_SUFFIX = ".pidbox"  # Celery's remote-control exchange is "<app>.pidbox" (fanout)
REPLY_PREFIX = "reply."  # ... and its replies go to the direct exchange "reply.<app>.pidbox"
# kombu queue arguments whose meaning is "this queue goes away on its own": such a queue is brokerd's
# temporary queue (gone with its connection).  x-message-ttl has no per-queue equivalent in brokerd;
# see Channel._temporary.
EXPIRING_ARGUMENTS = ("x-expires",)

_capture = threading.local()  # see capture_publishes(): the backend builds a chord body without sending it


class capture_publishes:
    """``with capture_publishes() as sent: body.apply_async()``: publishes made by this thread on any
    brokerd channel are collected as ``(queue, raw kombu message)`` instead of being sent."""

    def __enter__(self):
        self.sent = []
        self._outer = getattr(_capture, "sent", None)  # nested: the outer capture resumes after this one
        _capture.sent = self.sent
        return self.sent

    def __exit__(self, *exc):
        _capture.sent = self._outer


_publish_listeners = []  # called with each kombu message this process sends (see add_publish_listener)


def add_publish_listener(fn) -> None:
    """``fn(message)`` is called after every message sent by any brokerd channel of this process (not
    the captured ones): the backend learns a generator chord header's member ids this way."""
    _publish_listeners.append(fn)


def capturing() -> bool:
    """True inside ``capture_publishes`` on this thread."""
    return getattr(_capture, "sent", None) is not None


def _is_reply_exchange(exchange: str) -> bool:
    """kombu's pidbox reply exchange (``reply.<app>.pidbox``): a reply whose caller's queue is gone is
    dropped, as AMQP drops it, never sent to a queue named after the routing key (a caller's oid)."""
    return exchange.startswith(REPLY_PREFIX) and exchange.endswith(PIDBOX_SUFFIX)


class ExchangeRouter:
    """Where a publish to an exchange goes, and what a binding means, on brokerd's native exchanges.

    * a binding on a named exchange is brokerd's BIND with kombu's exchange type, temporary when its
      queue is (it then dies with this connection); except a direct binding whose key is the queue's
      own name: PUBLISH to that name already reaches it, so nothing is bound (the fast path);
    * a publish to a fanout or topic exchange is an EMIT: brokerd copies it to every bound queue,
      whichever process bound it;
    * a publish to a direct exchange goes to the queues this process bound to that key (PUBLISH, the
      fast path); with no such binding here it is an EMIT (another process bound it, as pidbox replies
      are), and if brokerd has no binding either, a PUBLISH to the queue the key names (what a direct
      binding of the key to its own name means), except on a pidbox reply exchange (dropped).
    """

    def __init__(self, channel):
        self.channel = channel

    def publish(self, message, exchange, routing_key):
        ch = self.channel
        if not exchange:  # the default exchange: the key names the queue
            ch._put(routing_key, message)
            return
        etype = ch.typeof(exchange).type
        if etype == "direct":
            queues = ch._lookup_direct(exchange, routing_key)
            if queues:
                for q in queues:
                    ch._put(q, message)
                return
            if ch._emit(exchange, routing_key, message) == 0 and not _is_reply_exchange(exchange):
                ch._put(routing_key, message)
            return
        if etype == "fanout" and exchange.endswith(PIDBOX_SUFFIX):
            ch.connection.forward_revoke(message)
        ch._emit(exchange, routing_key, message)

    def _skip(self, queue, exchange, routing_key) -> bool:
        """True for bindings brokerd needs not know: the default exchanges, and a direct binding of
        a queue's own name (the fast path: PUBLISH reaches it by name)."""
        if not exchange or exchange.startswith("amq."):
            return True
        return self.channel.typeof(exchange).type == "direct" and routing_key == queue

    def bind(self, queue, exchange, routing_key, arguments):
        """Called after kombu recorded the binding in its own table: BIND in brokerd."""
        if self._skip(queue, exchange, routing_key):
            return
        ch = self.channel
        ch.client.bind(exchange, queue, routing_key or "", type=ch.typeof(exchange).type,
                       temporary=queue in ch.connection.temporary_queues)

    def unbind(self, queue, exchange, routing_key, arguments):
        """Called after kombu removed the binding from its table: UNBIND in brokerd."""
        if self._skip(queue, exchange, routing_key):
            return
        try:
            self.channel.client.unbind(exchange, queue, routing_key or "")
        except NotFound:
            pass


class QoS(virtual.QoS):
    """Settling is brokerd's: ack/reject go to the broker, and nothing is restored by the client
    (brokerd takes unacked deliveries back when the connection ends)."""

    restore_at_shutdown = False

    def can_consume(self):
        return True  # brokerd enforces the prefetch credit itself

    def can_consume_max_estimate(self):
        return None

    def append(self, message, delivery_tag):
        self._delivered[delivery_tag] = message

    def ack(self, delivery_tag):
        msg = self._delivered.pop(delivery_tag, None)
        if msg is not None:
            msg._brokerd.ack()

    def reject(self, delivery_tag, requeue=False):
        msg = self._delivered.pop(delivery_tag, None)
        if msg is not None:
            msg._brokerd.nack(requeue=requeue)

    def restore_unacked(self):
        self._delivered.clear()

    def restore_unacked_once(self, stderr=None):
        self._delivered.clear()

    def restore_visible(self, *args, **kwargs):
        pass


class Message(virtual.Message):
    def __init__(self, payload, channel=None, **kwargs):
        self._brokerd = payload.pop("_brokerd", None)
        super().__init__(payload, channel=channel, **kwargs)


class Channel(virtual.Channel):
    QoS = QoS
    Message = Message
    body_encoding = None  # bodies travel as the bytes kombu serialized; no base64
    do_restore = False
    supports_fanout = False
    min_priority = 0
    max_priority = M.MAX_PRIORITY

    def __init__(self, connection, **kwargs):
        super().__init__(connection, **kwargs)
        self.router = ExchangeRouter(self)
        self._prefetch = 0
        self._brokerd_consumers = {}  # consumer tag -> (queue, brokerd Consumer)
        self._no_ack = set()  # consumer tags kombu will never ack (pidbox, events): acked on hand-off

    @property
    def client(self) -> Client:
        return self.connection.brokerd

    # -- publishing ----------------------------------------------------------------------
    def basic_publish(self, message, exchange, routing_key, **kwargs):
        self._inplace_augment_message(message, exchange, routing_key)
        self.router.publish(message, exchange, routing_key)
        if not capturing():
            for fn in _publish_listeners:
                fn(message)

    def _lookup_direct(self, exchange, routing_key):
        try:
            table = self.state.exchanges[exchange]["table"]
        except KeyError:
            return None
        return [q for rkey, _pattern, q in table if rkey == routing_key] or None

    def _put(self, queue, message, **kwargs):
        sent = getattr(_capture, "sent", None)
        if sent is not None:
            sent.append((queue, message))
            return
        p = M.to_brokerd(message)
        with self.connection.errors_mapped():
            self.client.publish(queue, p["body"], priority=p["priority"], eta=p["eta"], headers=p["headers"], id=p["id"])

    def _emit(self, exchange, routing_key, message) -> int:
        """EMIT to a brokerd exchange; how many queues got a copy (0: nothing bound, dropped)."""
        p = M.to_brokerd(message)
        # A pidbox message carries Celery's own deadline (header ``expires``, epoch seconds; 0 = none):
        # as brokerd's ttl, a copy nobody reads by then is dropped by brokerd too.  It is relative to
        # this clock, so hosts' clocks need not agree.
        expires = (message.get("headers") or {}).get("expires")
        ttl = None
        if isinstance(expires, (int, float)) and not isinstance(expires, bool) and expires > 0:
            ttl = max(0.0, float(expires) - _time())
        with self.connection.errors_mapped():
            res = self.client.emit(exchange, routing_key or "", p["body"], id=p["id"], priority=p["priority"],
                                   headers=p["headers"], eta=p["eta"], ttl=ttl)
        n = int(res.get("queues", 0)) if isinstance(res, dict) else 0
        log.debug("EMIT to %s exchange %s, key %r: %d queue(s)", self.typeof(exchange).type, exchange, routing_key, n)
        return n

    # -- queues ----------------------------------------------------------------------------
    @staticmethod
    def _temporary(kwargs) -> bool:
        """A queue kombu means to vanish on its own (``exclusive``, ``auto_delete``, ``x-expires``: Celery's
        pidbox, reply and event queues) is brokerd's temporary queue: deleted with its bindings when this
        connection closes.  ``x-message-ttl`` is not mapped: brokerd has no per-queue ttl, these queues
        are read live by their owner, and pidbox messages get brokerd's ttl from Celery's own ``expires``
        header at EMIT (see ``_emit``)."""
        args = kwargs.get("arguments") or {}
        return bool(kwargs.get("exclusive") or kwargs.get("auto_delete")
                    or any(a in args for a in EXPIRING_ARGUMENTS))

    def queue_declare(self, queue=None, passive=False, **kwargs):
        from kombu.transport.virtual.base import queue_declare_ok_t
        queue = queue or "amq.gen-" + os.urandom(8).hex()
        temporary = not passive and self._temporary(kwargs)
        with self.connection.errors_mapped():
            if passive:
                try:
                    st = self.client.stats(queue)
                except NotFound:
                    from amqp import ChannelError
                    raise ChannelError(f"NOT_FOUND - no queue {queue!r} in brokerd", (50, 10), (50, 10)) from None
            else:
                try:
                    self.client.declare(queue, temporary=temporary)
                    if temporary:
                        self.connection.temporary_queues.add(queue)
                except PreconditionFailed as exc:
                    # it exists with options set by its owner (DECLARE, brokerd-ctl), or lasting, or as
                    # another connection's temporary queue: use it as it is
                    if temporary:
                        log.warning("queue %r is used as it is, not as this connection's temporary "
                                    "queue: %s", queue, exc)
                st = self.client.stats(queue)
        return queue_declare_ok_t(queue, _count(st), len(self._consumers_of(queue)))

    def _consumers_of(self, queue):
        return [t for t, (q, _) in self._brokerd_consumers.items() if q == queue]

    def _size(self, queue):
        with self.connection.errors_mapped():
            return _count(self.client.stats(queue))

    def _purge(self, queue):
        with self.connection.errors_mapped():
            return self.client.purge(queue)

    def _delete(self, queue, *args, **kwargs):
        temporary = queue in self.connection.temporary_queues
        self.connection.temporary_queues.discard(queue)
        with self.connection.errors_mapped():
            try:
                self.client.delete(queue)
            except NotFound:
                pass
            except PreconditionFailed:
                if not temporary:
                    raise
                # still consumed or holding deliveries: it goes with this connection anyway

    def _has_queue(self, queue, **kwargs):
        try:
            self.client.stats(queue)
            return True
        except NotFound:
            return False

    def _new_queue(self, queue, **kwargs):
        pass  # brokerd creates queues on first use; queue_declare sends DECLARE

    def queue_bind(self, queue, exchange=None, routing_key="", arguments=None, **kwargs):
        super().queue_bind(queue, exchange, routing_key, arguments, **kwargs)
        self.router.bind(queue, exchange, routing_key, arguments)

    def queue_unbind(self, queue, exchange=None, routing_key="", arguments=None, **kwargs):
        super().queue_unbind(queue, exchange, routing_key, arguments, **kwargs)
        self.router.unbind(queue, exchange, routing_key, arguments)

    # -- consuming -------------------------------------------------------------------------
    def basic_qos(self, prefetch_size=0, prefetch_count=0, apply_global=False):
        prefetch_count = int(prefetch_count or 0)
        if prefetch_count == self._prefetch:
            return
        self._prefetch = prefetch_count
        self.qos.prefetch_count = prefetch_count
        # brokerd's CREDIT (§5.40) changes a live consumer's prefetch in place: nothing buffered goes
        # back.  Celery changes it often (+1 for each eta task its timer holds, -1 when it runs).
        for _tag, (_queue, consumer) in list(self._brokerd_consumers.items()):
            with self.connection.errors_mapped():
                # the worker's verb (client/worker/channel.py), run blocking on this connection
                self.client._run(verbs.set_credit(self.client, consumer, prefetch_count or UNLIMITED_PREFETCH))

    def _consume(self, queue):
        c = self.client.consume([queue], prefetch=self._prefetch or UNLIMITED_PREFETCH)
        c.on_wake(self.connection.wake)
        return c

    def basic_consume(self, queue, no_ack, callback, consumer_tag, **kwargs):
        super().basic_consume(queue, no_ack, callback, consumer_tag, **kwargs)
        if no_ack:
            self._no_ack.add(consumer_tag)
        with self.connection.errors_mapped():
            self._brokerd_consumers[consumer_tag] = (queue, self._consume(queue))
        self.connection.wake()  # deliveries may already be buffered

    def basic_cancel(self, consumer_tag):
        entry = self._brokerd_consumers.pop(consumer_tag, None)
        self._no_ack.discard(consumer_tag)
        super().basic_cancel(consumer_tag)
        if entry is not None:
            try:
                entry[1].cancel()
            except BrokerdError:
                pass

    def basic_get(self, queue, no_ack=False, **kwargs):
        """One message if one is ready now (a short-lived consumer with credit 1), else None."""
        with self.connection.errors_mapped():
            c = self.client.consume([queue], prefetch=1)
            try:
                d = c.get(timeout=GET_WAIT)
            finally:
                c.cancel()
        if d is None:
            return None
        message = self.Message(self._raw(d), channel=self)
        if no_ack:
            d.ack()
        else:
            self.qos.append(message, message.delivery_tag)
        return message

    def _raw(self, d):
        raw = M.from_delivery(d)
        raw["_brokerd"] = d
        return raw

    def deliver_ready(self) -> int:
        """Hand every buffered delivery of this channel's consumers to kombu; how many."""
        n = 0
        for tag, (queue, consumer) in list(self._brokerd_consumers.items()):
            while tag in self._brokerd_consumers:
                d = consumer.get(timeout=0)
                if d is None:
                    break
                cb = self.connection._callbacks.get(queue)
                if cb is None:
                    d.nack(requeue=True)
                    break
                n += 1
                try:
                    raw = self._raw(d)
                except Exception as exc:  # a message we cannot rebuild costs only itself
                    log.error("brokerd message %s in %r cannot be read as a Celery message (%s: %s); "
                              "dead-lettered (dropped for a temporary queue)", d.id, queue,
                              type(exc).__name__, exc)
                    d.nack(requeue=False)
                    continue
                if tag in self._no_ack:
                    d.ack()  # kombu's no_ack (pidbox, events): settled on hand-off; brokerd has no auto-ack
                cb(raw)
        return n

    def close(self):
        if self.connection is not None and self.connection.forked():
            self._brokerd_consumers.clear()  # the parent's consumers: not this process's to cancel
        for tag in list(self._brokerd_consumers):
            self.basic_cancel(tag)
        super().close()



def _drop_inherited(client: Client) -> None:
    """Close a forked child's copy of its parent's brokerd socket without a BYE and without
    ``shutdown`` (either would end the parent's connection): the parent's stays open."""
    sock = getattr(client, "_sock", None)
    if sock is not None:
        try:
            sock.close()
        except OSError:
            pass


def _count(stats) -> int:
    if not isinstance(stats, dict):
        return 0
    return int(stats.get("ready", 0) or 0) + int(stats.get("delayed", 0) or 0)


class Transport(virtual.Transport):
    Channel = Channel
    default_port = DEFAULT_PORT
    driver_type = "brokerd"
    driver_name = "brokerd"
    polling_interval = None  # deliveries are pushed; nothing polls

    implements = virtual.Transport.implements.extend(
        asynchronous=True,
        exchange_type=frozenset(["direct", "topic", "fanout"]),
        heartbeats=False,
    )

    connection_errors = virtual.Transport.connection_errors + (ConnectionLost, ConnectionClosed, Timeout, OSError)
    channel_errors = virtual.Transport.channel_errors + (BrokerdError,)
    recoverable_connection_errors = (ConnectionLost, ConnectionClosed, Timeout, OSError)

    def __init__(self, client, **kwargs):
        super().__init__(client, **kwargs)
        self.brokerd = None
        self._pid = os.getpid()  # the process whose brokerd connection this is (see forked())
        self.temporary_queues = set()  # queues this brokerd connection declared temporary
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_r, False)
        os.set_blocking(self._wake_w, False)

    # -- the connection ------------------------------------------------------------------------
    can_parse_url = True  # kombu hands us the URL whole; client.options parses it (credentials, TLS)

    def _url(self) -> str:
        host = self.client.hostname or "127.0.0.1"
        if "://" in host:
            return host
        return f"brokerd://{host}:{self.client.port or DEFAULT_PORT}"

    def establish_connection(self):
        try:
            # reconnect=0: kombu re-establishes a lost connection (ensure_connection), and its
            # event loop must learn the new socket; the client still finds the leader of a list.
            self.brokerd = Client(self._url(), name=f"celery-{socket.gethostname()}-{os.getpid()}", reconnect=0)
        except BrokerdError as exc:
            raise ConnectionLost(None, str(exc)) from exc
        self._pid = os.getpid()
        self.temporary_queues = set()  # a new connection owns none yet
        self.brokerd.control_handlers.append(self._on_control)
        return super().establish_connection()

    def verify_connection(self, connection) -> bool:
        """kombu's ``Connection.connected`` asks this before it reuses a connection (a pooled
        producer's ``revive``, ``default_channel``).  The base class says always True, so after a
        broker restart Celery's callback publishes retried on the dead connection until they gave
        up: False once brokerd's connection is closed or lost, and kombu makes a new one."""
        b = self.brokerd
        if b is None or b._closed:
            return False
        session = b._session
        return session is not None and session.error is None

    def forked(self) -> bool:
        """True in a child forked after this connection was made (Celery's prefork pool processes,
        started at boot, by ``pool_grow`` or after ``max_tasks_per_child``).  The child shares the
        parent's socket: it must not say a word on it (a BYE there answers one of the parent's
        requests and ends the parent's connection)."""
        return os.getpid() != self._pid

    def close_connection(self, connection):
        forked = self.forked()
        try:
            super().close_connection(connection)
        finally:
            b, self.brokerd = self.brokerd, None
            if b is not None and forked:
                _drop_inherited(b)
            elif b is not None:
                try:
                    b.close(timeout=2)
                except BrokerdError:
                    pass
            for fd in (self._wake_r, self._wake_w):
                try:
                    os.close(fd)
                except OSError:
                    pass
            self._wake_r = self._wake_w = -1

    def errors_mapped(self):
        """Around every brokerd call: brokerd's connection errors are already kombu's
        recoverable ones (``recoverable_connection_errors``), so they pass through unchanged."""
        return contextlib.nullcontext()

    def forward_revoke(self, message) -> None:
        """A pidbox ``revoke`` broadcast: also brokerd's durable REVOKE (survives restarts)."""
        try:
            from kombu import serialization
            body = serialization.loads(M.body_bytes(message), message.get("content-type"),
                                       message.get("content-encoding"), accept=None)
        except Exception:  # not ours to judge a control message we cannot read
            return
        if not isinstance(body, dict) or body.get("method") != "revoke":
            return
        args = body.get("arguments") or {}
        ids = args.get("task_id")
        ids = [ids] if isinstance(ids, str) else list(ids or [])
        if ids:
            with self.errors_mapped():
                self.brokerd.revoke(ids, terminate=bool(args.get("terminate")))

    def _on_control(self, payload) -> None:
        """brokerd's CONTROL push: a REVOKE made elsewhere reaches this worker's revoked set."""
        if isinstance(payload, dict) and payload.get("revoke"):
            try:
                from celery.worker import state as worker_state
            except ImportError:
                return
            worker_state.revoked.update(payload["revoke"])

    # -- push delivery ------------------------------------------------------------------------------
    def wake(self) -> None:
        """Called in the client's reader thread (never blocks): the event loop has work."""
        try:
            os.write(self._wake_w, b"!")
        except (BlockingIOError, OSError):
            pass  # the pipe is full (a wake-up is pending anyway) or closed

    def _drain_pipe(self) -> None:
        try:
            while os.read(self._wake_r, 4096):
                pass
        except (BlockingIOError, OSError):
            pass

    def _deliver_all(self) -> int:
        self._drain_pipe()
        n = 0
        with self.errors_mapped():
            for channel in list(self.channels):
                n += channel.deliver_ready()
        return n

    def register_with_event_loop(self, connection, loop):
        loop.add_reader(self._wake_r, self.on_readable, connection)

    def on_readable(self, connection, *args):
        self._deliver_all()

    def drain_events(self, connection, timeout=None):
        deadline = None if timeout is None else _monotonic() + timeout
        while True:
            if self._deliver_all():
                return
            remaining = None if deadline is None else deadline - _monotonic()
            if remaining is not None and remaining <= 0:
                raise socket.timeout()
            select.select([self._wake_r], [], [], remaining)

    @cached_property
    def default_connection_params(self):
        return {"port": self.default_port, "hostname": "127.0.0.1"}

    def driver_version(self):
        return "1"


__all__ = ["Transport", "Channel", "ExchangeRouter", "capture_publishes", "capturing"]
