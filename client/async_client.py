"""``AsyncClient``: the brokerd client for async code, under trio *or* asyncio.

    async with AsyncClient("127.0.0.1:7700", name="api") as c:
        await c.publish("emails", b"...")
        async for d in c.consume(["high", "low"], prefetch=10):
            await handle(d.body)
            await d.ack()

One client, a thin shell per event loop: every protocol decision lives in the
sans-I/O ``client.session.Session`` and every request verb in ``client.verbs``
(shared with the blocking ``Client``); this module adds only what differs per
library, the adapters of ``client.loops``, picked at ``__aenter__``.  A
**reader** task decodes frames and wakes the tasks waiting for each reply,
the consumers and ``wait_for_confirms``; it never sends.  A **flusher** task
sends what is buffered within ``FLUSH_DELAY`` (~1 ms), sends HEARTBEAT when
idle and gives the connection up after two silent intervals.  Flush policy as
in ``client.producer``: ``publish(confirm=False)`` and ``await d.ack()`` only
buffer, without yielding to the event loop.

The client must be used from the event loop (and task tree, under trio) that
entered it; it is not thread-safe (use ``client.producer.Client`` for threads).
"""

from __future__ import annotations

import time

from client import loops, verbs
from client.errors import BrokerdError, ConnectionClosed, ConnectionLost, PublishError, Timeout
from client.options import MAX_REDIRECTS, broker_url, default_name, new_id_prefix, parse_leader, publish_options, redact
from client.tls import context as tls_context
from client.session import (
    CONFIRMS,
    CONTROL,
    EVENTS,
    FLUSH,
    FLUSH_BYTES,
    FLUSH_DELAY,
    ConsumerHandle,
    ConsumerState,
    Delivery,
    Pending,
    Session,
    clone_error,
)
from client.wire import FrameReader

__all__ = ["AsyncClient", "AsyncConsumer", "Delivery"]

_monotonic = time.monotonic


# --- the client ----------------------------------------------------------------------------
@verbs.async_verbs
class AsyncClient(verbs.ShellInfo):
    """An async connection to brokerd, for trio or asyncio.

    ``AsyncClient(address="127.0.0.1:7700", *, name=None, heartbeat=30.0, timeout=10.0)``
    takes the same arguments as ``Client``; it connects in ``async with``
    (``__aenter__``) and closes on exit (``aclose``).  Every verb of
    ``Client`` is here as a coroutine (both are built from ``client.verbs``);
    ``consume`` returns an ``AsyncConsumer`` (``async for``,
    ``await consumer.get(timeout)``, ``await consumer.cancel()``), and a
    delivery's ``ack``/``nack``/``touch`` are awaited.
    """

    def __init__(self, address=None, *, name: str | None = None, heartbeat: float = 30.0, timeout: float | None = 10.0):
        self._url = url = broker_url(address)  # None: $BROKERD_URL, else 127.0.0.1:7700
        self.address = redact(address)  # as shown in reprs and errors: credentials are ***
        self.timeout = timeout
        self._host, self._port = url.host, url.port
        self._name = name or default_name()
        self._heartbeat = heartbeat
        self._io = None
        self._session: Session | None = None
        self.control_handlers: list = []  # called with each CONTROL payload (e.g. revoke+terminate)
        self.event_handlers: list = []  # called with (events, dropped) for each EVENT frame (SUBSCRIBE)
        self._closed = False
        self._dirty = None
        self._confirm_event = None

    def __repr__(self):
        state = "new" if self._session is None else "closed" if self._closed else "lost" if self._session.error else "open"
        return f"<AsyncClient {self.address} {state}>"

    @property
    def library(self) -> str | None:
        """``"trio"`` or ``"asyncio"`` once connected."""
        return self._io.library if self._io else None

    # -- lifecycle --------------------------------------------------------------------------
    async def __aenter__(self) -> "AsyncClient":
        if self._session is not None:
            raise RuntimeError("an AsyncClient can be entered only once")
        # A replica group (protocol.md §6.4): the addresses in turn; a follower's HELLO names
        # its leader, tried next.  (This shell finds the leader when it connects; a lost
        # connection ends it with ConnectionLost: enter a new AsyncClient.)
        order = list(self._url.addresses)
        tried: list[str] = []
        redirects = 0
        i = 0
        while i < len(order):
            host, port = order[i]
            i += 1
            try:
                leader = await self._open(host, port)
            except ConnectionLost as exc:
                tried.append(f"{host}:{port}: {exc.message}")
                continue
            if leader is None or len(order) == 1:  # one address names that brokerd, whatever its role
                return self
            await self._shut()
            self._closed = False
            if leader == "":
                tried.append(f"{host}:{port}: takes no writes and knows no leader (fenced)")
                continue
            redirects += 1
            try:
                target = parse_leader(leader)
            except ValueError:
                tried.append(f"{host}:{port}: a follower naming an unusable leader {leader!r}")
                continue
            tried.append(f"{host}:{port}: a follower of {leader}")
            if redirects > MAX_REDIRECTS:
                break
            order.insert(i, target)
        raise ConnectionLost(None, f"no leader brokerd reachable at {self.address}: " + "; ".join(tried))

    async def _open(self, host: str, port: int):
        """One connection and HELLO; None for a leader, else the address its follower named."""
        self._host, self._port = host, port
        self._closed = False
        io = self._io = loops.for_current_loop()
        self._session = Session(
            self, name=self._name, heartbeat=self._heartbeat, now=_monotonic(), id_prefix=new_id_prefix(),
            control_handlers=self.control_handlers, event_handlers=self.event_handlers,
            hello_extra=self._url.hello_options(),
        )
        self._dirty = io.Event()
        self._confirm_event = io.Event()
        try:
            await io.connect(self._host, self._port, self.timeout, tls_context(self._url) if self._url.tls else None)
        except (OSError, TimeoutError) as exc:
            raise ConnectionLost(None, f"cannot connect to brokerd at {self._host}:{self._port}: {exc!r}") from exc
        except BaseException as exc:
            if type(exc).__name__ == "TooSlowError":
                raise ConnectionLost(None, f"cannot connect to brokerd at {self._host}:{self._port}: timed out") from exc
            raise
        await io.start(self._read_loop, self._flush_loop)
        try:
            await self._run(verbs.Call(start=lambda s, w: s.hello(waiter=w)))
        except BaseException:
            await self._shut()
            raise
        leader = (self._session.server or {}).get("leader")
        return None if leader is None else (leader if isinstance(leader, str) else "?")  # "": fenced

    async def __aexit__(self, *exc_info) -> None:
        await self.aclose()

    @verbs.described_by(verbs.close)
    async def aclose(self, timeout: float | None = None) -> None:
        if self._closed or self._session is None:
            return
        session = self._session
        timeout = self.timeout if timeout is None else timeout
        try:
            if session.unconfirmed and session.error is None:
                # Collect outstanding confirms first, so refusals can be logged
                # (the broker answers nothing after BYE's reply).
                try:
                    await self.wait_for_confirms(timeout)
                except PublishError as exc:
                    session.refused.extend(exc.failures)
            if session.is_open:
                p = session.bye(waiter=self._io.Event())
                await self._flush()
                await self._wait(p, timeout)
        except BrokerdError:
            pass
        except BaseException:
            await self._shut()
            raise
        session.log_uncollected()
        await self._shut()

    async def _shut(self) -> None:
        self._closed = True
        self._abort(None)
        await self._io.stop()
        await self._io.aclose()

    # -- I/O -------------------------------------------------------------------------------------
    async def _flush(self) -> None:
        session = self._session
        try:
            await self._io.send_all(session)
        except self._io.io_errors() as exc:
            self._abort(exc)
            raise clone_error(session.error) from exc

    async def _wait(self, p: Pending, timeout):
        if not p.done:
            if not await self._io.wait(p.waiter, timeout) and not p.done:
                raise Timeout(None, f"no reply from brokerd within {timeout:g} s (request {p.rid})")
        if p.error is not None:
            raise p.error
        return p.result

    async def _run(self, call: verbs.Call):
        """The one call path of every verb: buffer, flush, wait, shape the reply."""
        self._check()
        t0 = _monotonic()
        p = call.begin(self._session, self._io.Event())
        await self._flush()
        result = await self._wait(p, self.timeout if call.timeout is None else call.timeout)
        return call.finish(result, _monotonic() - t0)

    def _mark_dirty(self) -> None:
        d = self._dirty
        if not d.is_set():
            d.set()

    def _wake(self, wake: list) -> None:
        for obj in wake:
            if obj is CONFIRMS:
                ev = self._confirm_event
                if not ev.is_set():
                    ev.set()
            elif obj is FLUSH:
                self._mark_dirty()
            elif obj is CONTROL or obj is EVENTS:
                self._session.run_handlers()
            elif type(obj) is ConsumerState:
                ev = obj.waiter
                if ev is not None:
                    obj.waiter = None
                    ev.set()
            elif obj.waiter is not None:
                obj.waiter.set()

    async def _read_loop(self) -> None:
        io = self._io
        session = self._session
        reader = FrameReader(strict=False)  # brokerd's own frames
        exc = None
        try:
            while True:
                data = await io.receive_some()
                if not data:
                    break
                reader.feed(data)
                frames = reader.frames()
                now = _monotonic()
                if frames:
                    self._wake(session.receive(frames, now))
                else:
                    session.last_received = now
        except Exception as e:  # not BaseException: a cancellation ends the task as itself
            exc = session.reader_failed(e, io.io_errors())
        finally:
            self._abort(exc)

    async def _flush_loop(self) -> None:
        io = self._io
        session = self._session
        try:
            while session.error is None:
                beat, lost, wait = session.timers(_monotonic())
                if lost is not None:
                    return self._abort(lost)
                if beat:
                    await self._flush()
                elif await io.wait(self._dirty, wait):
                    await io.sleep(FLUSH_DELAY)
                    self._dirty = io.Event()
                    await self._flush()
        except BrokerdError:
            return

    def _abort(self, exc) -> None:
        self._wake(self._session.connection_lost(exc, address=self.address, closed=self._closed))
        self._mark_dirty()

    def _check(self) -> None:
        if self._session is None:
            raise ConnectionClosed(None, "use AsyncClient in 'async with' (it connects in __aenter__)")
        if self._session.error is not None:
            raise clone_error(self._session.error)

    # -- the verbs each shell writes itself -------------------------------------------------------
    @verbs.described_by(verbs.publish)
    async def publish(self, queue: str, body: bytes, *, priority: int = 0, delay=None, eta=None, ttl=None,
                      headers: dict | None = None, confirm: bool = True, id: str | None = None) -> str:
        self._check()
        opts = None if (delay is None and eta is None and ttl is None and headers is None) else publish_options(delay, eta, ttl, headers)
        session = self._session
        if confirm:
            p, mid = session.publish(queue, body, id, priority, opts, waiter=self._io.Event())
            await self._flush()
            await self._wait(p, self.timeout)
            return mid
        _, mid = session.publish(queue, body, id, priority, opts, confirm=False)
        if session.out_bytes >= FLUSH_BYTES:
            await self._flush()
        else:
            self._mark_dirty()
        return mid

    @verbs.described_by(verbs.wait_for_confirms)
    async def wait_for_confirms(self, timeout: float | None = None) -> None:
        self._check()
        session = self._session
        mark = session.confirm_mark()
        try:
            await self._flush()
        except BrokerdError:
            pass  # reported below with the unconfirmed ids
        deadline = None if timeout is None else _monotonic() + timeout
        while True:
            done, remaining = session.confirms_wait(mark, deadline, _monotonic(), timeout)
            if done:
                break
            ev = self._confirm_event
            if ev.is_set():
                ev = self._confirm_event = self._io.Event()
            await self._io.wait(ev, remaining)
        session.raise_refused()

    @verbs.described_by(verbs.consume)
    def consume(self, queues, prefetch: int = 10, *, slots: int | None = None) -> "AsyncConsumer":
        # Not a coroutine: the subscription is made on first use (``async for``,
        # ``get``, ``async with``) or by ``await consumer.start()``.
        self._check()
        cs = ConsumerState([queues] if isinstance(queues, str) else queues, prefetch)
        cs.slots = slots
        return AsyncConsumer(self, cs)

    async def _ack(self, d: Delivery, wait: bool = False) -> None:
        """``Delivery.ack``: batched (the other settling verbs come from ``client.verbs``)."""
        if wait:
            return await self._ack_now(d)
        if self._session.ack(d):
            await self._flush()
        else:
            self._mark_dirty()


class AsyncConsumer(ConsumerHandle):
    """A subscription made by ``AsyncClient.consume``.

    ``async for d in consumer`` until cancelled or the client closes;
    ``await consumer.get(timeout)`` returns a delivery or None after
    ``timeout`` seconds; ``await consumer.cancel()`` (also on leaving
    ``async with consumer``) stops it and gives back deliveries received but
    not handed out.  ``ConnectionLost`` ends iteration with an error.
    """

    _started = False

    async def start(self) -> "AsyncConsumer":
        """Send CONSUME and wait for the broker's consumer tag (done once)."""
        if not self._started:
            self._started = True
            client = self._client
            cs = self._state
            call = verbs.Call(start=lambda s, w: s.consume(cs.queues, cs.prefetch, waiter=w, state=cs))
            await client._run(call)
        return self

    def __await__(self):
        return self.start().__await__()

    async def __aenter__(self) -> "AsyncConsumer":
        return await self.start()

    async def __aexit__(self, *exc) -> None:
        await self.cancel()

    def __aiter__(self):
        return self

    async def __anext__(self) -> Delivery:
        try:
            d = await self.get(None)
        except ConnectionClosed:
            raise StopAsyncIteration from None
        if d is None:
            raise StopAsyncIteration
        return d

    async def get(self, timeout: float | None = None) -> Delivery | None:
        """The next delivery; None after ``timeout`` seconds (None: wait) or once cancelled."""
        if not self._started:
            await self.start()
        cs = self._state
        buf = cs.buffer
        if buf:
            return buf.popleft()
        client = self._client
        session = client._session
        if session.acks and session.error is None:
            try:
                await client._flush()
            except BrokerdError:
                pass  # raised below from the session's error
        io = client._io
        deadline = None if timeout is None else _monotonic() + timeout
        while not buf:
            if cs.ended():
                return None
            ev = cs.waiter
            if ev is None:
                ev = cs.waiter = io.Event()
            if deadline is None:
                await ev.wait()
            else:
                remaining = deadline - _monotonic()
                if remaining <= 0:
                    return None
                await io.wait(ev, remaining)
        return buf.popleft()

    async def cancel(self) -> None:
        """Stop this consumer; give back deliveries received but not handed out.  Idempotent."""
        cs = self._state
        client = self._client
        session = client._session
        if not self._started or cs.tag is None or cs.cancelled or cs.error is not None or not session.is_open:
            return
        p = session.cancel(cs, waiter=client._io.Event())
        await client._flush()
        try:
            await client._wait(p, client.timeout)
        except (ConnectionClosed, ConnectionLost):
            return
        if session.give_back(cs):
            await client._flush()
