"""The event-loop adapters under ``AsyncClient``: the only code that differs between trio and asyncio.

``AsyncClient`` (``client.async_client``) is written once against this small
interface; ``for_current_loop()`` picks the adapter for the running library
with ``sniffio.current_async_library()`` (sniffio ships with trio).  The
interface uses one-shot events only (trio events cannot be cleared).

* ``TrioIO``: ``trio.open_tcp_stream`` (TCP_NODELAY is trio's default), a
  ``trio.Lock`` around ``send_all`` (trio forbids concurrent sends), the
  background tasks in a nursery opened by ``start`` and closed by ``stop``,
  ``trio.Event`` and ``move_on_after``.
* ``AsyncioIO``: ``asyncio.open_connection`` streams (``write`` is
  synchronous, so no send lock; ``drain`` applies back-pressure), background
  tasks from ``asyncio.create_task``, cancelled and awaited by ``stop``,
  ``asyncio.Event`` and ``asyncio.timeout``.

Each library is imported only when a client is entered under it.
"""

from __future__ import annotations

import math
import socket
import time

import sniffio

from client.session import Session

RECV_BYTES = 256 * 1024  # one read; the reader decodes every whole frame in it
_monotonic = time.monotonic


class TrioIO:
    library = "trio"

    def __init__(self):
        import trio

        self.trio = trio
        self.stream = None
        self._send_lock = trio.Lock()
        self._nursery_cm = None
        self.nursery = None
        self.Event = trio.Event
        self.sleep = trio.sleep

    async def connect(self, host, port, timeout, ssl_context=None):
        trio = self.trio
        with trio.fail_after(timeout if timeout is not None else math.inf):
            self.stream = await trio.open_tcp_stream(host, port)
            if ssl_context is not None:  # brokerds://: TLS before the preamble
                self.stream = trio.SSLStream(self.stream, ssl_context, server_hostname=host)
                try:
                    await self.stream.do_handshake()
                except trio.BrokenResourceError as exc:
                    raise ConnectionResetError(f"TLS handshake failed: {exc.__cause__ or exc}") from exc

    async def send_all(self, session: Session) -> None:
        """Take the session's buffered bytes and send them, in buffer order."""
        async with self._send_lock:
            data = session.data_to_send(_monotonic())
            if data:
                await self.stream.send_all(data)

    async def receive_some(self) -> bytes:
        return await self.stream.receive_some(RECV_BYTES)

    async def wait(self, event, timeout) -> bool:
        if timeout is None:
            await event.wait()
            return True
        with self.trio.move_on_after(max(timeout, 0)):
            await event.wait()
        return event.is_set()

    async def start(self, *fns) -> None:
        self._nursery_cm = self.trio.open_nursery()
        self.nursery = await self._nursery_cm.__aenter__()
        for fn in fns:
            self.nursery.start_soon(fn)

    async def stop(self) -> None:
        if self.nursery is not None:
            # Our tasks end quietly when cancelled; an exception from the body of
            # ``async with AsyncClient`` is not passed in, so it propagates as
            # itself rather than wrapped in the nursery's ExceptionGroup.
            self.nursery.cancel_scope.cancel()
            cm, self._nursery_cm, self.nursery = self._nursery_cm, None, None
            await cm.__aexit__(None, None, None)

    async def aclose(self) -> None:
        if self.stream is not None:
            with self.trio.CancelScope(shield=True):
                try:
                    await self.stream.aclose()
                except Exception:
                    pass

    def io_errors(self):
        trio = self.trio
        return (OSError, trio.BrokenResourceError, trio.ClosedResourceError)


class AsyncioIO:
    library = "asyncio"

    def __init__(self):
        import asyncio

        self.asyncio = asyncio
        self.reader = None
        self.writer = None
        self.tasks: list = []
        self.Event = asyncio.Event
        self.sleep = asyncio.sleep

    async def connect(self, host, port, timeout, ssl_context=None):
        asyncio = self.asyncio
        async with asyncio.timeout(timeout):
            self.reader, self.writer = await asyncio.open_connection(
                host, port, limit=RECV_BYTES, ssl=ssl_context, server_hostname=host if ssl_context else None,
            )
        sock = self.writer.get_extra_info("socket")
        if sock is not None:
            try:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            except OSError:
                pass

    async def send_all(self, session: Session) -> None:
        data = session.data_to_send(_monotonic())
        if data:
            writer = self.writer
            if writer.is_closing():
                raise ConnectionResetError("the connection is closed")
            writer.write(data)
            await writer.drain()

    async def receive_some(self) -> bytes:
        return await self.reader.read(RECV_BYTES)

    async def wait(self, event, timeout) -> bool:
        if timeout is None:
            await event.wait()
            return True
        try:
            async with self.asyncio.timeout(max(timeout, 0)):
                await event.wait()
        except TimeoutError:
            pass
        return event.is_set()

    async def start(self, *fns) -> None:
        for fn in fns:
            self.tasks.append(self.asyncio.create_task(fn()))

    async def stop(self) -> None:
        tasks, self.tasks = self.tasks, []
        for t in tasks:
            t.cancel()
        if tasks:
            # asyncio.wait does not re-raise the tasks' CancelledError, so only a
            # cancellation of *this* task propagates from here.
            await self.asyncio.wait(tasks)

    async def aclose(self) -> None:
        if self.writer is not None:
            self.writer.close()
            try:
                await self.writer.wait_closed()
            except Exception:
                pass

    def io_errors(self):
        return (OSError, EOFError)


def for_current_loop():
    lib = sniffio.current_async_library()
    if lib == "trio":
        return TrioIO()
    if lib == "asyncio":
        return AsyncioIO()
    raise RuntimeError(f"AsyncClient supports trio and asyncio, not {lib!r}")
