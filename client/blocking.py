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

import socket
import ssl
import threading
import time
from _thread import allocate_lock

from client import verbs
from client.errors import BrokerdError, ConnectionClosed, ConnectionLost, Timeout
from client.options import broker_url, default_name, redact, new_id_prefix
from client.session import CONFIRMS, CONTROL, EVENTS, FLUSH, FLUSH_DELAY, ConsumerHandle, ConsumerState
from client.session import Delivery, Pending, Session, clone_error
from client.tls import TlsSocket
from client.tls import context as tls_context
from client.wire import FrameReader

DEFAULT_ADDRESS = "127.0.0.1:7700"
RECV_BYTES = 256 * 1024  # one recv; the reader decodes every whole frame in it
_monotonic = time.monotonic


class Connection:
    """A blocking connection to brokerd: connects and completes HELLO in the constructor.

    The verbs are ``client.producer.Client``'s; see its docstring for the arguments.
    """

    def __init__(self, address=None, *, name: str | None = None, heartbeat: float = 30.0, timeout: float | None = 10.0):
        url = broker_url(address)  # None: $BROKERD_URL, else DEFAULT_ADDRESS
        self.address = redact(address)  # as shown in reprs and errors: credentials are ***
        self.timeout = timeout
        host, port = url.host, url.port
        self._lock = threading.Lock()
        self._send_lock = threading.Lock()
        self._confirm_cond = threading.Condition(self._lock)
        self._dirty = threading.Event()
        self._closed = False
        self.control_handlers: list = []  # called (in the reader thread) with each CONTROL payload
        self.event_handlers: list = []  # called (in the reader thread) with (events, dropped) per EVENT frame
        self._session = Session(
            self, name=name or default_name(), heartbeat=heartbeat, now=_monotonic(), id_prefix=new_id_prefix(),
            control_handlers=self.control_handlers, event_handlers=self.event_handlers,
            hello_extra=url.hello_options(),
        )
        try:
            sock = socket.create_connection((host, port), timeout=timeout)
        except OSError as exc:
            raise ConnectionLost(None, f"cannot connect to brokerd at {host}:{port}: {exc}") from exc
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if url.tls:
            try:
                tls = TlsSocket(sock, tls_context(url), host)
                tls.handshake()
            except (OSError, ssl.SSLError) as exc:
                sock.close()
                raise ConnectionLost(None, f"TLS with brokerd at {host}:{port} failed: {exc}") from exc
            sock = tls
        sock.settimeout(None)
        self._sock = sock
        self._reader = threading.Thread(target=self._read_loop, name=f"brokerd-reader-{host}:{port}", daemon=True)
        self._flusher = threading.Thread(target=self._flush_loop, name=f"brokerd-flusher-{host}:{port}", daemon=True)
        self._reader.start()
        try:
            self._run(verbs.Call(start=lambda s, w: s.hello(waiter=w)))
        except BaseException:
            self._closed = True
            self._abort(None)
            self._reader.join(timeout=1)
            sock.close()
            raise
        self._flusher.start()

    def __enter__(self) -> "Connection":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self):
        state = "closed" if self._closed else ("lost" if self._session.error else "open")
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
                data = self._session.data_to_send(_monotonic())
            if data:
                try:
                    self._sock.sendall(data)
                except OSError as exc:
                    self._abort(exc)
                    with self._lock:
                        err = self._session.error
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

    def _run(self, call: verbs.Call):
        """The one call path of every verb: buffer, flush, wait, shape the reply."""
        t0 = _monotonic()
        w = new_waiter()
        with self._lock:
            p = call.begin(self._session, w)
        self.flush()
        result = self._wait(p, self.timeout if call.timeout is None else call.timeout)
        return call.finish(result, _monotonic() - t0)

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

    def _read_loop(self) -> None:
        sock = self._sock
        reader = FrameReader(strict=False)  # brokerd's own frames
        session = self._session
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
            self._abort(exc)

    def _flush_loop(self) -> None:
        session = self._session
        dirty = self._dirty
        while True:
            with self._lock:
                if session.error is not None:
                    return
                beat, lost, wait = session.timers(_monotonic())
            if lost is not None:
                return self._abort(lost)
            try:
                if beat:
                    self.flush()
                    continue
                if dirty.wait(wait):
                    if self._closed or session.error is not None:
                        return
                    time.sleep(FLUSH_DELAY)
                    dirty.clear()
                    self.flush()
            except BrokerdError:
                return

    def _abort(self, exc) -> None:
        """The connection is over: fail every waiter, close the socket."""
        with self._lock:
            self._wake(self._session.connection_lost(exc, address=self.address, closed=self._closed))
        self._dirty.set()
        try:
            self._sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass


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
