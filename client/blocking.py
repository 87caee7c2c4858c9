"""The blocking client's engine: one ``Session`` under a lock, a socket, a reader and a flusher thread.

``client.producer.Client`` is this ``Connection`` plus the verbs; ``Consumer`` is its
subscription handle.  One connection is safe to share between threads.  The **reader** blocks in
``recv``, hands frames to the session under ``_lock`` and wakes what the session names (one lock
per request, a ``Condition`` per consumer, ``wait_for_confirms``); it never writes, so it keeps
reading while a writer is blocked by back-pressure.  The **flusher** sends what is buffered within
``FLUSH_DELAY`` (~1 ms), sends HEARTBEAT when idle and gives up after two silent intervals.
Callers write themselves: ``_lock`` guards the session (never held during I/O), ``_send_lock`` is
held while the buffer is taken and written, so bytes reach the socket in buffer order.

Code that drives the connection itself (the worker) uses its public pipelined calls:
``submit`` (buffer a request, be woken by its reply), ``flush``, ``wait_closed``, ``fileno``, and
the consumer's ``buffer`` / ``on_wake``.
"""

from __future__ import annotations

import itertools
import logging
import random
import socket
import ssl
import threading
import time
from _thread import allocate_lock

from client import verbs
from client.errors import AuthFailed, BrokerdError, ConnectionClosed, ConnectionLost, NotLeader, Timeout
from client.options import (
    MAX_REDIRECTS,
    RECONNECT_FIRST,
    RECONNECT_MAX,
    RECONNECT_TOTAL,
    broker_url,
    default_name,
    new_id_prefix,
    parse_leader,
    redact,
)
from client.session import CONFIRMS, CONTROL, EVENTS, FLUSH, FLUSH_DELAY, ConsumerHandle, ConsumerState
from client.session import Delivery, Pending, Session, clone_error
from client.tls import TlsSocket
from client.tls import context as tls_context
from client.wire import FrameReader

log = logging.getLogger("client")

DEFAULT_ADDRESS = "127.0.0.1:7700"
RECV_BYTES = 256 * 1024  # one recv; the reader decodes every whole frame in it
_monotonic = time.monotonic


class Connection:
    """A blocking connection to brokerd: connects and completes HELLO in the constructor.

    The verbs are ``client.producer.Client``'s; see its docstring for the arguments.
    """

    def __init__(self, address=None, *, name: str | None = None, heartbeat: float = 30.0, timeout: float | None = 10.0,
                 reconnect: float | None = RECONNECT_TOTAL):
        url = broker_url(address)  # None: $BROKERD_URL, else DEFAULT_ADDRESS
        self._url = url
        self.address = redact(address)  # as shown in reprs and errors: credentials are ***
        self.timeout = timeout
        # Seconds a lost connection is re-established for (protocol.md §6.4) before calls raise
        # ConnectionLost; 0/None: never (the worker's intake and kombu reconnect themselves).
        self.reconnect = reconnect or 0.0
        self._name = name or default_name()
        self._heartbeat = heartbeat
        # One id prefix and counter for the client's life: message ids and dedupe keys stay
        # unique across reconnects (a resend must not collide with a newer publish).
        self._id_prefix = new_id_prefix()
        self._ids = itertools.count(1)
        self._lock = threading.Lock()
        self._send_lock = threading.Lock()
        self._recover_lock = threading.Lock()
        self._confirm_cond = threading.Condition(self._lock)
        self._dirty = threading.Event()
        self._closed = False
        self.reconnects = 0  # how many times a lost connection was re-established
        self.control_handlers: list = []  # called (in the reader thread) with each CONTROL payload
        self.event_handlers: list = []  # called (in the reader thread) with (events, dropped) per EVENT frame
        self._session = self._sock = None  # the connection in use, set by _dial
        self._dial()

    def _dial(self, first: tuple | None = None, resend: list = ()) -> None:
        """Connect to the replica group's leader (protocol.md §6.4): try the addresses in
        turn (``first`` before them), follow a HELLO reply's ``leader``; ConnectionLost
        naming every address and why once none answered as leader.

        The new connection becomes the client's only once its HELLO named no other leader,
        and ``resend`` (publishes of a lost connection) is buffered on it in the same step,
        so no other thread's request lands on a follower or before them."""
        order = list(self._url.addresses)
        # A list names a group: find its leader.  One address names that brokerd, whatever its
        # role (brokerd-ctl reads a follower's STATS, promotes it); a write it refuses with
        # NOT_LEADER still goes to the leader it names (``first``).
        follow = len(order) > 1 or first is not None
        if first is not None:
            order.insert(0, first)
        tried: list[str] = []
        redirects = 0
        i = 0
        while i < len(order):
            host, port = order[i]
            i += 1
            try:
                session, sock, reader = self._open(host, port)
            except AuthFailed:
                raise  # the same users everywhere in a group: trying on would only add delay
            except (ConnectionLost, Timeout) as exc:
                if len(order) == 1:
                    raise  # one address: its own error, as it was
                tried.append(f"{_hp(host, port)}: {exc.message}")
                continue
            leader = (session.server or {}).get("leader") if follow else None
            if leader is None:
                with self._lock:
                    self._session, self._sock, self._reader = session, sock, reader
                    self.connected_to = (host, port)
                    for queue, body, mid, priority, opts in resend:
                        session.publish(queue, body, mid, priority, opts, confirm=False)
                self._flusher = threading.Thread(target=self._flush_loop, args=(session,),
                                                 name=f"brokerd-flusher-{host}:{port}", daemon=True)
                self._flusher.start()
                if resend:
                    self._dirty.set()
                return
            self._close_private(session, sock, reader)  # a follower: go to the leader it names
            if leader == "":
                tried.append(f"{_hp(host, port)}: takes no writes and knows no leader (fenced)")
                continue
            redirects += 1
            try:
                target = parse_leader(leader if isinstance(leader, str) else "")
            except ValueError:
                tried.append(f"{_hp(host, port)}: a follower naming an unusable leader {leader!r}")
                continue
            tried.append(f"{_hp(host, port)}: a follower of {leader}")
            if redirects > MAX_REDIRECTS:
                tried.append(f"{MAX_REDIRECTS} redirects followed: a loop?")
                break
            order.insert(i, target)
        raise ConnectionLost(None, f"no leader brokerd reachable at {self.address}: " + "; ".join(tried))

    def _open(self, host: str, port: int):
        """Open one connection and complete HELLO on it, privately: ``(session, sock, reader)``."""
        url = self._url
        timeout = self.timeout
        session = Session(
            self, name=self._name, heartbeat=self._heartbeat, now=_monotonic(), id_prefix=self._id_prefix,
            control_handlers=self.control_handlers, event_handlers=self.event_handlers,
            hello_extra=url.hello_options(), ids=self._ids,
        )
        try:
            sock = socket.create_connection((host, port), timeout=timeout)
        except OSError as exc:
            raise ConnectionLost(None, f"cannot connect to brokerd at {_hp(host, port)}: {exc}") from exc
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if url.tls:
            try:
                tls = TlsSocket(sock, tls_context(url), host)
                tls.handshake()
            except (OSError, ssl.SSLError) as exc:
                sock.close()
                raise ConnectionLost(None, f"TLS with brokerd at {_hp(host, port)} failed: {exc}") from exc
            sock = tls
        sock.settimeout(None)
        reader = threading.Thread(target=self._read_loop, args=(session, sock),
                                  name=f"brokerd-reader-{host}:{port}", daemon=True)
        reader.start()
        try:
            w = new_waiter()
            with self._lock:
                p = session.hello(waiter=w)
                data = session.data_to_send(_monotonic())
            sock.sendall(data)
            self._wait(p, timeout)
        except BaseException as exc:
            with self._lock:
                self._wake(session.connection_lost(exc if isinstance(exc, BrokerdError) else None, address=self.address))
            self._close_private(session, sock, reader)
            if isinstance(exc, OSError) and not isinstance(exc, BrokerdError):  # a socket error
                raise ConnectionLost(None, f"connection to brokerd at {_hp(host, port)} lost during HELLO: {exc}") from exc
            raise
        return session, sock, reader

    def _close_private(self, session: Session, sock, reader) -> None:
        """Close a connection that never became the client's (a follower, a failed HELLO)."""
        with self._lock:
            self._wake(session.connection_lost(None, address=self.address))
        try:
            sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        reader.join(timeout=1)
        sock.close()

    def _stop_io(self, join_timeout: float) -> None:
        """Wait for the reader and flusher threads (not the calling one) and close the socket."""
        for t in (self._reader, self._flusher):
            if t.is_alive() and t is not threading.current_thread():
                t.join(timeout=join_timeout)
        try:
            self._sock.close()
        except OSError:
            pass

    def _recover(self, failed: Session, leader: str | None = None) -> bool:
        """After ``failed`` (a session) lost its connection or met NOT_LEADER: reconnect to
        whoever leads, with bounded back-off, and resend its unconfirmed pipelined publishes
        (same message id and dedupe key: brokerd stores each once).  True once connected
        (also when another thread already did it); False if this client does not reconnect.
        ConnectionLost after ``self.reconnect`` seconds."""
        if not self.reconnect or self._closed:
            return False
        with self._recover_lock:
            if self._session is not failed:
                return True  # another thread reconnected already
            self._abort(None, failed)  # a NOT_LEADER connection is still open: leave it
            with self._lock:
                resend = failed.take_resends()
            self._stop_io(join_timeout=2)
            hint = None
            if leader:
                try:
                    hint = parse_leader(leader)
                except ValueError:
                    hint = None
            deadline = _monotonic() + self.reconnect
            delay = RECONNECT_FIRST
            while True:
                try:
                    self._dial(hint, resend)
                    break
                except ConnectionLost as exc:
                    hint = None
                    wait = delay * random.uniform(0.5, 1.0)
                    remaining = deadline - _monotonic()
                    if isinstance(exc, AuthFailed) or self._closed or remaining <= 0:
                        with self._lock:  # kept for a later call's reconnect
                            failed.redirected[:0] = resend
                        if isinstance(exc, AuthFailed):
                            raise
                        raise ConnectionLost(None, f"{exc.message}; gave up after reconnecting for {self.reconnect:g} s") from exc
                    wait = min(wait, remaining)  # the last try is at the deadline
                    log.warning("brokerd connection lost; reconnecting in %.2f s (%s)", wait, exc.message)
                    time.sleep(wait)
                    delay = min(delay * 2, RECONNECT_MAX)
            self.reconnects += 1
            log.info("reconnected to brokerd at %s; resent %d unconfirmed publishes", _hp(*self.connected_to), len(resend))
            return True

    def __enter__(self) -> "Connection":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _lost(self, session) -> bool:
        """``session`` (read under the lock) lost its connection while this Connection is still
        meant to be open: the call reconnects (to whoever leads now) before it is sent."""
        return session.error is not None and not self._closed and not session.bye_sent

    def __repr__(self):
        state = "closed" if self._closed else ("lost" if self._session is None or self._session.error else "open")
        return f"<{type(self).__name__} {self.address} {state}>"

    # -- for code that drives the connection itself (the worker) -----------------------------
    def submit(self, call: verbs.Call, waiter) -> Pending:
        """Buffer ``call`` without flushing or waiting; ``waiter.release()`` is called
        (in the reader thread) once ``Pending.result`` or ``.error`` is set.  Send with
        ``flush()``: a caller that pipelines many requests flushes once per batch."""
        with self._lock:
            return call.begin(self._session, waiter)

    def wait_closed(self, timeout: float | None = None) -> BrokerdError | None:
        """Block until the connection is over (its reader stopped); return why, or
        None if it is still open after ``timeout`` seconds."""
        self._reader.join(timeout)
        with self._lock:
            return self._session.error

    def fileno(self) -> int:
        """The socket's file descriptor (-1 once closed)."""
        return self._sock.fileno()

    # -- I/O -------------------------------------------------------------------------------
    def flush(self) -> None:
        """Hand everything buffered to the socket (in buffer order)."""
        with self._send_lock:
            with self._lock:
                session = self._session
                sock = self._sock
                data = session.data_to_send(_monotonic())
            if data:
                try:
                    sock.sendall(data)
                except OSError as exc:
                    self._abort(exc, session)
                    with self._lock:
                        err = session.error
                    raise clone_error(err) from exc

    _flush = flush  # the name the worker and older callers use

    def _wait(self, p: Pending, timeout):
        """Block until ``p``'s reply; return its result or raise its error."""
        if timeout is None:
            p.waiter.acquire()
        elif not p.waiter.acquire(timeout=timeout):
            with self._lock:
                done = p.done
            if not done:
                raise Timeout(None, f"no reply from brokerd within {timeout:g} s (request {p.rid})")
        if p.error is not None:
            raise p.error
        return p.result

    def _run(self, call: verbs.Call, recover: bool = True):
        """The one call path of every verb: buffer, flush, wait, shape the reply.

        With ``reconnect`` on (protocol.md §6.4): a call on a connection already lost
        reconnects first; a NOT_LEADER refusal (nothing was applied) reconnects to the
        leader it names and sends the call again, at most MAX_REDIRECTS times.  A call
        whose connection drops while it waits raises ConnectionLost (it may have been
        applied); the next call reconnects."""
        t0 = _monotonic()
        for _ in range(MAX_REDIRECTS + 1):
            w = new_waiter()
            with self._lock:
                session = self._session
                lost = self._lost(session)
                if not lost:
                    p = call.begin(session, w)
            if lost:
                if recover and self._recover(session):
                    continue
                session.check_open()
            try:
                self.flush()
                result = self._wait(p, self.timeout if call.timeout is None else call.timeout)
            except NotLeader as exc:
                if recover and self._recover(session, exc.message):
                    continue
                raise
            return call.finish(result, _monotonic() - t0)
        raise NotLeader(None, f"still no leader after {MAX_REDIRECTS} redirects from {self.address}")

    def _wake(self, wake: list) -> None:
        """Wake what the session named.  Called with ``_lock`` held."""
        for obj in wake:
            if obj is CONFIRMS:
                self._confirm_cond.notify_all()
            elif obj is FLUSH:
                self._dirty.set()
            elif obj is CONTROL or obj is EVENTS:
                self._session.run_handlers()
            elif type(obj) is ConsumerState:
                obj.waiter.notify_all()
            elif obj.waiter is not None:
                obj.waiter.release()

    def _read_loop(self, session: Session, sock) -> None:
        reader = FrameReader(strict=False)  # brokerd's own frames
        exc: BaseException | None = None
        try:
            while True:
                data = sock.recv(RECV_BYTES)
                if not data:
                    break
                reader.feed(data)
                frames = reader.frames()
                now = _monotonic()
                with self._lock:
                    if frames:
                        self._wake(session.receive(frames, now))
                    else:
                        session.last_received = now
        except BaseException as e:
            exc = session.reader_failed(e)
        finally:
            self._abort(exc, session)

    def _flush_loop(self, session: Session) -> None:
        dirty = self._dirty
        while True:
            with self._lock:
                if session.error is not None:
                    return
                beat, lost, wait = session.timers(_monotonic())
            if lost is not None:
                return self._abort(lost, session)
            try:
                if beat:
                    self.flush()
                    continue
                if dirty.wait(wait):
                    if self._closed or session.error is not None or session is not self._session:
                        return
                    time.sleep(FLUSH_DELAY)
                    dirty.clear()
                    self.flush()
            except BrokerdError:
                return

    def _abort(self, exc, session: Session | None = None) -> None:
        """The connection is over: fail every waiter, close the socket (``session``'s own, when
        given: a reader or flusher of a connection already replaced touches only its own)."""
        with self._lock:
            current = self._session
            session = session or current
            self._wake(session.connection_lost(exc, address=self.address, closed=self._closed))
            sock = self._sock if session is current else None
        self._dirty.set()
        if sock is None:
            return
        try:
            sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass


def _hp(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


class Consumer(ConsumerHandle):
    """A subscription made by ``Client.consume``.

    Iterate it (``for d in consumer``) to receive deliveries until it is
    cancelled or the client is closed; ``get(timeout)`` returns the next
    delivery or None after ``timeout`` seconds.  ``ConnectionLost`` ends
    either with an error.  ``cancel()`` (also on leaving a ``with`` block)
    stops deliveries and gives back the ones received but not handed out.
    """

    @property
    def buffer(self):
        """The deque of deliveries received and not yet handed out (guarded by the
        client's lock): a caller woken by ``on_wake`` pops from it directly."""
        return self._state.buffer

    def on_wake(self, fn) -> None:
        """Also call ``fn()`` (in the reader thread, under the client's lock: keep it
        short, never block) whenever deliveries arrive or the consumer ends."""
        client = self._client
        with client._lock:
            self._state.waiter = _CallingCondition(client._lock, fn)

    def __enter__(self) -> "Consumer":
        return self

    def __exit__(self, *exc) -> None:
        self.cancel()

    def __iter__(self):
        return self

    def __next__(self) -> Delivery:
        try:
            d = self.get(None)
        except ConnectionClosed:
            raise StopIteration from None
        if d is None:
            raise StopIteration
        return d

    def get(self, timeout: float | None = None) -> Delivery | None:
        """The next delivery; None after ``timeout`` seconds (None: wait), or once cancelled.

        Raises ``ConnectionLost`` if the connection dropped, ``ConnectionClosed``
        if the client was closed.  Before blocking it sends the acks batched so far.
        """
        cs = self._state
        buf = cs.buffer
        try:
            return buf.popleft()
        except IndexError:
            pass
        client = self._client
        if client._session.acks:
            try:
                client.flush()
            except BrokerdError:
                pass  # raised below from the session's error
        deadline = None if timeout is None else _monotonic() + timeout
        with client._lock:
            while not buf:
                if cs.ended():
                    return None
                if deadline is None:
                    cs.waiter.wait()
                else:
                    remaining = deadline - _monotonic()
                    if remaining <= 0:
                        return None
                    cs.waiter.wait(remaining)
            return buf.popleft()

    def cancel(self) -> None:
        """Stop this consumer.  Deliveries received but not yet handed out are
        given back to the broker (nack with requeue); ones already handed out
        stay yours to ack or nack.  Idempotent; a no-op once the client is closed."""
        client = self._client
        cs = self._state
        with client._lock:
            if cs.cancelled or cs.error is not None or not client._session.is_open:
                return
            p = client._session.cancel(cs, waiter=new_waiter())
        client.flush()
        try:
            client._wait(p, client.timeout)
        except (ConnectionClosed, ConnectionLost):
            return
        with client._lock:
            flush = client._session.give_back(cs)
        if flush:
            client.flush()


class _CallingCondition(threading.Condition):
    """A consumer's Condition that also calls a function when notified (``Consumer.on_wake``)."""

    def __init__(self, lock, fn):
        super().__init__(lock)
        self._fn = fn

    def notify_all(self):
        super().notify_all()
        self._fn()


def new_waiter():
    """A lock that is already held: the reader releases it when the reply arrives."""
    lock = allocate_lock()
    lock.acquire()
    return lock
