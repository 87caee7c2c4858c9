"""The trio server: the only module of brokerd that does network I/O.

Shape of the hot path (peers/RESULTS.md W4: ~29k frames/s awaiting frame by
frame against ~280k/s batched):

1. a connection's reader task takes whatever bytes have arrived (one
   ``receive_some``), decodes *every* complete frame, and runs each through
   ``broker.commands`` against the state, all with one ``now``;
2. then ``_flush`` moves the batch's effects out: log records to the
   write-ahead log, frames to each connection's output list;
3. each connection's writer task sends everything queued for it in one
   ``send_all``.

With a write-ahead log attached, the batch's frames are held until the log
record of the batch is durable under the fsync policy (group commit: one
write and one fsync for every batch that arrived meanwhile), so a confirm
never goes out before its message is on disk.

Connections are sniffed on their first byte: NUL opens the binary protocol
(``client.wire.PREAMBLE``), anything else is an admin text line (``broker.admin``).
"""

from __future__ import annotations

import ctypes
import itertools
import logging
import math
import os
import platform
import time

import trio

from broker import __version__, admin, http, notify
from broker.commands import DURABLE_OPS, HANDLERS, handle
from broker.config import MEMORY_CLEAR_RATIO, Config
from broker.state import BrokerState
from client.wire import (
    OP_ADMIN,
    OP_BYE,
    OP_CHORD,
    OP_CLOSING,
    OP_ERROR,
    OP_HEARTBEAT,
    OP_HELLO,
    OP_OK,
    OP_PUBLISH,
    OP_RESULT_SET,
    OP_SCHEDULE_PUT,
    PREAMBLE,
    PROTOCOL_VERSION,
    FrameReader,
    WireError,
    encode_many,
)

log = logging.getLogger("brokerd")

RECEIVE_BYTES = 64 * 1024  # one receive_some; the batch is whatever arrived
TICK_MAX_SLEEP = 1.0  # seconds; re-read the wall clock at least this often

# -- bounds (issue 10, findings 5 and 6) -------------------------------------------------
# A connection refused at max_connections gets this long to show its first
# byte (so it can be told TOO_MANY_CONNECTIONS in its own protocol), and this
# long again for the refusal to be sent and the socket drained.
REFUSE_SNIFF_S = 1.0
# At most this many refusals are in progress at once (each holds an fd);
# past that a new connection is closed without a word.
REFUSING_MAX = 32
# RSS is sampled (from /proc/self/statm) at most this often, by the ticker.
MEMORY_SAMPLE_S = 0.5
# While over max_memory, freed heap is handed back to the OS (malloc_trim) at
# most this often: a trim walks the heap, so not at every sample.
MEMORY_TRIM_S = 5.0
# Ops refused with MEMORY_LIMIT past max_memory: the ones that make the broker
# hold more.  Consumers, ACK/NACK, reads and admin go on so a backlog drains;
# a RESULT_SET that settles a delivery (option "tag") goes on too, because it
# frees the message it settles and refusing it would stall the workers.
MEMORY_OPS = frozenset((OP_PUBLISH, OP_RESULT_SET, OP_SCHEDULE_PUT, OP_CHORD))
# glibc raises its mmap threshold to the size of each big block freed (up to
# 32 MiB), after which big buffers come from the heap and stay resident once
# freed (red team: 40 x 15 MiB partial frames, RSS 33 -> 639 MB and held).
# Fixing the threshold keeps buffers from this size up mmapped: returned to the
# OS when freed.  Below it, per-message objects stay on the fast heap.
MMAP_THRESHOLD = 256 * 1024
_M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter number (malloc.h)


def _glibc():
    if platform.libc_ver()[0] != "glibc":
        return None
    try:
        return ctypes.CDLL(None)
    except OSError:
        return None


def tune_malloc() -> None:
    """Fix glibc's mmap threshold (see MMAP_THRESHOLD); a no-op elsewhere."""
    libc = _glibc()
    if libc is not None and not libc.mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD):
        log.warning("mallopt(M_MMAP_THRESHOLD) failed: freed buffers may stay resident")


def _trim_malloc() -> None:
    libc = _glibc()
    if libc is not None:
        libc.malloc_trim(0)


class Conn:
    """Server-side I/O state of one connection."""

    __slots__ = (
        "id", "stream", "peer", "name", "out", "out_bytes", "wake", "drained",
        "closed", "opened", "heartbeat", "last_sent", "cancel", "handshake_deadline",
        "hard_limit", "evicted", "partial",
    )

    def __init__(self, id, stream, peer, hard_limit: int = 1 << 62):
        self.id = id
        self.stream = stream
        self.peer = peer
        self.name = ""
        self.out: list[bytes] = []
        self.out_bytes = 0
        self.wake = trio.Event()
        self.drained = trio.Event()
        self.closed = False
        self.opened = time.monotonic()
        self.heartbeat = 0.0
        self.last_sent = time.monotonic()
        self.cancel: trio.CancelScope | None = None  # everything this connection's task does
        self.handshake_deadline = math.inf
        self.hard_limit = hard_limit  # unsent bytes past which it is closed (SLOW_CONSUMER)
        self.evicted: tuple[str, str] | None = None  # (code, message) it was closed with
        self.partial = 0  # bytes of an incomplete input frame held for it

    def queue_bytes(self, data: bytes) -> None:
        if self.closed:
            return
        self.out.append(data)
        self.out_bytes += len(data)
        self.wake.set()
        if self.out_bytes > self.hard_limit:
            # Checked where bytes are queued (replies, deliveries, events,
            # control), not after reading this connection: a client that
            # never reads nor sends must not make brokerd hold more for it.
            self.evict("SLOW_CONSUMER", f"more than {self.hard_limit} bytes unsent; read your socket")

    def evict(self, code: str, message: str) -> None:
        """Close this connection from outside its task, with ``code``.

        Its unsent output is dropped at once (that is the memory being
        bounded); its task is cancelled and sends the CLOSING frame (or
        admin ``ERR`` line) on its way out.
        """
        if self.evicted is None:
            self.evicted = (code, message)
        self.closed = True
        self.out.clear()
        self.out_bytes = 0
        self.wake.set()
        if self.cancel is not None:
            self.cancel.cancel()


class _Close(Exception):
    """End this connection after sending ``frame`` (a CLOSING frame or admin text)."""

    def __init__(self, reason: str, data: bytes = b""):
        self.reason = reason
        self.data = data


class Server:
    def __init__(self, config: Config, state: BrokerState | None = None, wal=None):
        self.config = config
        self.state = state or BrokerState(boot_id=format(int(time.time() * 1000) % 0xFFFFFFFF, "x"))
        self.wal = wal  # a broker.durability.Durability, or None (no durability)
        self.conns: dict[int, Conn] = {}
        self._held: dict[int, list] = {}  # replies waiting for the log (DURABLE_OPS)
        self._ids = itertools.count(1)
        self._tick_wake = trio.Event()
        self._next_tick = math.inf
        self.started = time.time()
        self.listeners: list = []
        self.nursery: trio.Nursery | None = None
        self.ready = False
        self.stopping = False
        self.http_address: tuple[str, int] | None = None  # (host, port) of /metrics and the probes
        # issue 7 (events): the state drops events for a subscriber with this much unsent
        self.state.output_backlog = lambda cid: c.out_bytes if (c := self.conns.get(cid)) is not None else 0
        # issue 10 (bounds): connections, partial input, memory
        self.max_connections = config.connection_limit()
        self.open_count = 0  # connections being served (refusals not counted)
        self._refusing = 0  # refusals in progress
        self._refused_burst = 0  # refused since the last time there was room
        self.refused_total = 0
        self.partial_total = 0  # sum of Conn.partial
        self.memory_limit = config.memory_limit()
        self.memory_alarm: str | None = None  # the MEMORY_LIMIT message while over the watermark
        self.rss = 0
        self._statm_fd: int | None = None
        self._next_memory_sample = 0.0
        self._next_trim = 0.0
        self.state.server_stats = self.limit_statistics  # STATS (broker.commands.h_stats)

    # -- effects -------------------------------------------------------------------
    def _flush(self) -> None:
        """Move the state's effects out after a batch.

        Deliveries and replies that confirm nothing go out at once.  Replies
        to requests that changed logged state (``DURABLE_OPS``) go to the log
        with the batch's records and are released when those are durable under
        the fsync policy: a confirm never precedes its fsync.  A delivery may
        reach a consumer before its publish is fsynced; if brokerd then crashes
        the message was never confirmed, and at-least-once delivery holds.
        """
        state = self.state
        box = state.take_outbox()
        held = self._held
        if held:
            self._held = {}
        if self.wal is not None:
            records = state.take_records()
            if records:
                self.wal.submit(records, held, self._release, box)
                held = box = None
        if box:
            self._release(box)
        if held:
            self._release(held)
        nxt = state.next_wakeup()
        if nxt < self._next_tick:
            self._tick_wake.set()

    def _release(self, box: dict) -> None:
        conns = self.conns
        for cid, frames in box.items():
            conn = conns.get(cid)
            if conn is not None and not conn.closed:
                conn.queue_bytes(encode_many(frames))

    # -- lifecycle -------------------------------------------------------------------
    async def serve(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        cfg = self.config
        tune_malloc()
        self._sample_memory()
        self.listeners = await trio.open_tcp_listeners(cfg.port, host=cfg.host)
        try:  # issue 7: the HTTP port is bound up front too, so a busy one fails the start
            http_sock = http.bind(cfg.host, cfg.http_port)
        except OSError:
            for listener in self.listeners:
                await listener.aclose()
            raise
        self.http_address = http_sock.getsockname()[:2]
        async with trio.open_nursery() as nursery:
            self.nursery = nursery
            nursery.start_soon(self._ticker)
            if self.wal is not None:
                await nursery.start(self.wal.run)
            for listener in self.listeners:
                nursery.start_soon(self._accept_loop, listener)
            # issue 7: HTTP (metrics, probes) and the systemd watchdog
            await nursery.start(http.serve, self, http_sock)
            log.info("http: listening on %s:%d (/metrics /api/queues /healthz /readyz)", *self.http_address)
            interval = notify.watchdog_interval()
            if interval is not None:
                nursery.start_soon(self._watchdog, interval)
            addr = self.listeners[0].socket.getsockname()
            self.ready = True
            notify.notify(
                "READY=1",
                f"STATUS=serving on {addr[0]}:{addr[1]}, http on {self.http_address[0]}:{self.http_address[1]}",
            )
            log.info(
                "limits: max_connections=%d, max_input_buffer=%d bytes, max_memory=%s, idle_timeout=%gs",
                self.max_connections, cfg.max_input_buffer,
                f"{self.memory_limit} bytes" if self.memory_limit else "off", cfg.idle_timeout,
            )
            log.info(
                "brokerd %s ready: listening on %s:%d (binary protocol and admin text)",
                __version__, addr[0], addr[1],
            )
            task_status.started(addr[1])

    @property
    def port(self) -> int:
        return self.listeners[0].socket.getsockname()[1]

    async def stop(self) -> None:
        """Graceful stop: close listeners, tell clients, flush the log."""
        self.ready = False
        self.stopping = True  # /readyz answers 503 from here on
        notify.notify("STOPPING=1", "STATUS=stopping: closing connections and flushing the log")
        log.info("brokerd stopping: closing %d connections", len(self.conns))
        for listener in self.listeners:
            await listener.aclose()
        from client.wire import closing_frame, encode

        for conn in list(self.conns.values()):
            if conn.heartbeat >= 0 and not conn.closed and conn.name != "<admin>":
                conn.queue_bytes(encode(closing_frame("SHUTTING_DOWN", "brokerd is stopping; reconnect later")))
        # Let writers drain briefly, then cancel everything.
        with trio.move_on_after(1.0):
            for conn in list(self.conns.values()):
                while conn.out and not conn.closed:
                    await trio.sleep(0.01)
        if self.wal is not None:
            await self.wal.close()
        if self.nursery is not None:
            self.nursery.cancel_scope.cancel()

    async def _watchdog(self, interval: float) -> None:
        """Feed systemd's watchdog (WATCHDOG=1) while the event loop runs this
        task and the log writer is not wedged (``http.health``, as /healthz)."""
        withheld = False
        while True:
            ok, body = http.health(self)
            if ok:
                notify.notify("WATCHDOG=1")
                withheld = False
            elif not withheld:
                log.error("withholding WATCHDOG=1 from systemd: %s", body.get("reason"))
                notify.notify(f"STATUS=unhealthy: {body.get('reason')}")
                withheld = True
            await trio.sleep(interval)

    async def _accept_loop(self, listener) -> None:
        async with listener:
            while True:
                try:
                    stream = await listener.accept()
                except (trio.ClosedResourceError, trio.BrokenResourceError):
                    return
                except OSError as exc:  # EMFILE and friends: log, back off, go on
                    log.warning("accept failed: %s", exc)
                    await trio.sleep(0.1)
                    continue
                if self.open_count >= self.max_connections:
                    self._refuse(stream)
                    continue
                self.open_count += 1  # counted here, not in _handle: a burst of accepts runs first
                self.nursery.start_soon(self._handle, stream)

    # -- issue 10: bounds --------------------------------------------------------------
    def _refuse(self, stream) -> None:
        """At max_connections: refuse politely, in the client's own protocol."""
        self.refused_total += 1
        self._refused_burst += 1
        if self._refused_burst == 1:  # once per burst, not per connection
            log.warning(
                "at max_connections (%d open): refusing new connections with TOO_MANY_CONNECTIONS until one closes",
                self.open_count,
            )
        if self._refusing >= REFUSING_MAX:
            stream.socket.close()  # no fd to spare for a polite answer
            return
        self._refusing += 1
        self.nursery.start_soon(self._refuse_one, stream)

    async def _refuse_one(self, stream) -> None:
        message = (
            f"brokerd has {self.open_count} connections open, its max_connections; "
            "retry later with backoff, or raise --max-connections"
        )
        try:
            with trio.move_on_after(REFUSE_SNIFF_S):
                first = await stream.receive_some(RECEIVE_BYTES)
                if first:
                    if first[:1] == b"\x00":
                        data = _closing("TOO_MANY_CONNECTIONS", message)
                    else:
                        data = admin.error("TOO_MANY_CONNECTIONS", message).encode()
                    await stream.send_all(data)
                    await stream.send_eof()
                    # Drain what the client still sends, so closing does not
                    # reset the connection before it has read the refusal.
                    while await stream.receive_some(RECEIVE_BYTES):
                        pass
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            pass
        finally:
            self._refusing -= 1
            with trio.move_on_after(0.5) as cs:
                cs.shield = True
                try:
                    await stream.aclose()
                except Exception:
                    pass

    def _room_again(self) -> None:
        if self._refused_burst and self.open_count < self.max_connections:
            log.warning("refused %d connections at max_connections (%d); accepting again",
                        self._refused_burst, self.max_connections)
            self._refused_burst = 0

    def _input_grew(self, conn: Conn, partial: int) -> None:
        """``conn`` now holds ``partial`` bytes of an incomplete frame.

        Past max_input_buffer across all connections, the connections holding
        the largest partial frames are closed (INPUT_LIMIT) until the sum fits:
        the one that costs the most goes first, and the rest keep working.
        """
        self.partial_total += partial - conn.partial
        conn.partial = partial
        limit = self.config.max_input_buffer
        while self.partial_total > limit:
            victim = max(self.conns.values(), key=lambda c: c.partial)
            if victim.partial == 0:
                break
            log.warning(
                "conn %d: closing it, it holds the largest partial frame (%d bytes) and partial frames "
                "across connections passed max_input_buffer (%d bytes)", victim.id, victim.partial, limit,
            )
            victim.evict(
                "INPUT_LIMIT",
                f"brokerd holds more than max_input_buffer ({limit} bytes) of partial frames across "
                f"connections, and this connection held the largest ({victim.partial} bytes); "
                "send large bodies more slowly or store them elsewhere",
            )
            self.partial_total -= victim.partial
            victim.partial = 0

    def _sample_memory(self) -> None:
        """RSS from /proc/self/statm (one pread); raise or clear the MEMORY_LIMIT alarm."""
        try:
            if self._statm_fd is None:
                self._statm_fd = os.open("/proc/self/statm", os.O_RDONLY)
            self.rss = int(os.pread(self._statm_fd, 128, 0).split()[1]) * os.sysconf("SC_PAGE_SIZE")
        except (OSError, ValueError, IndexError):
            return  # no /proc (or no fd to spare): keep the last figure
        limit = self.memory_limit
        if not limit:
            return
        if self.memory_alarm is None and self.rss > limit:
            self.memory_alarm = (
                f"brokerd's memory ({self.rss} bytes resident) is past max_memory ({limit} bytes); "
                "publishes are refused until consumers drain the queues below "
                f"{int(limit * MEMORY_CLEAR_RATIO)} bytes. Retry later with backoff, add consumers, "
                "or raise --max-memory"
            )
            log.warning("memory alarm: %d bytes resident, past max_memory %d; refusing publishes", self.rss, limit)
        elif self.memory_alarm is not None and self.rss < limit * MEMORY_CLEAR_RATIO:
            self.memory_alarm = None
            log.warning("memory alarm cleared: %d bytes resident; accepting publishes again", self.rss)

    def limit_statistics(self) -> dict:
        """The bounds and how close the broker is to them (STATS, admin STATS)."""
        return {
            "memory_rss": self.rss,
            "memory_limit": self.memory_limit,
            "memory_alarm": self.memory_alarm is not None,
            "connections_max": self.max_connections,
            "connections_refused": self.refused_total,
            "input_buffered": self.partial_total,
            "input_buffer_max": self.config.max_input_buffer,
        }

    async def _ticker(self) -> None:
        state = self.state
        while True:
            now = time.time()
            nxt = state.tick(now)
            self._flush()
            mono = time.monotonic()
            if mono >= self._next_memory_sample:
                self._next_memory_sample = mono + MEMORY_SAMPLE_S
                self._sample_memory()
                if self.memory_alarm is not None and mono >= self._next_trim:
                    self._next_trim = mono + MEMORY_TRIM_S
                    _trim_malloc()  # hand freed heap back, so RSS can fall below the mark
            self._next_tick = nxt
            self._tick_wake = trio.Event()
            delay = min(max(nxt - time.time(), 0.0), TICK_MAX_SLEEP)
            with trio.move_on_after(delay):
                await self._tick_wake.wait()

    # -- one connection -------------------------------------------------------------
    async def _handle(self, stream) -> None:
        cid = next(self._ids)
        try:
            peer = stream.socket.getpeername()
            peer = f"{peer[0]}:{peer[1]}"
        except OSError:
            peer = "?"
        conn = Conn(cid, stream, peer, 4 * self.config.output_buffer)
        conn.handshake_deadline = trio.current_time() + self.config.handshake_timeout
        self.conns[cid] = conn
        log.info("conn %d open from %s", cid, peer)
        reason = "closed by peer"
        try:
            # conn.cancel: Conn.evict (a bound hit from elsewhere) and a broken
            # writer end everything this connection is doing.
            with trio.CancelScope() as conn.cancel:
                reason = await self._sniff(conn, stream)
            if conn.evicted is not None:
                code, message = conn.evicted
                data = admin.error(code, message).encode() if conn.name == "<admin>" else _closing(code, message)
                raise _Close(f"{code}: {message}", data)
            if conn.cancel.cancelled_caught:
                reason = "connection lost while sending"
        except _Close as exc:
            reason = exc.reason
            if exc.data:
                with trio.move_on_after(1.0):
                    try:
                        await stream.send_all(exc.data)
                        # Read (and drop) what the client is still sending for a
                        # moment: closing with unread input resets the connection,
                        # and a reset can destroy the CLOSING frame before it is read.
                        await stream.send_eof()
                        with trio.move_on_after(0.5):
                            while await stream.receive_some(RECEIVE_BYTES):
                                pass
                    except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
                        pass
        except (trio.BrokenResourceError, trio.ClosedResourceError, ConnectionError) as exc:
            reason = f"connection lost ({exc.__class__.__name__})"
        except Exception:
            # A bug must cost one connection, never the broker or another client.
            log.exception("conn %d: internal error; closing this connection only", cid)
            reason = "internal error"
            with trio.move_on_after(0.5):
                try:
                    await stream.send_all(_closing("INTERNAL", "internal error in brokerd; see its log"))
                except Exception:
                    pass
        finally:
            conn.closed = True
            conn.wake.set()
            del self.conns[cid]
            self.open_count -= 1
            self.partial_total -= conn.partial
            conn.partial = 0
            self._room_again()
            returned = self.state.disconnect(cid, time.time())
            self._flush()
            with trio.move_on_after(0.5) as cs:
                cs.shield = True
                try:
                    await stream.aclose()
                except Exception:
                    pass
            extra = f", {returned} deliveries returned to their queues" if returned else ""
            log.info("conn %d closed: %s after %.1fs%s", cid, reason, time.monotonic() - conn.opened, extra)

    async def _sniff(self, conn: Conn, stream) -> str:
        with trio.move_on_after(self.config.handshake_timeout) as cs:
            first = await stream.receive_some(RECEIVE_BYTES)
        if cs.cancelled_caught:
            return "no bytes before handshake_timeout"
        if not first:
            return "closed by peer"
        if first[:1] == b"\x00":
            return await self._binary(conn, first)
        conn.name = "<admin>"
        return await self._text(conn, first)

    # -- binary protocol ------------------------------------------------------------------
    async def _binary(self, conn: Conn, first: bytes) -> str:
        cfg = self.config
        buf = first
        while len(buf) < len(PREAMBLE):
            with trio.move_on_at(conn.handshake_deadline) as cs:
                more = await conn.stream.receive_some(RECEIVE_BYTES)
            if cs.cancelled_caught:
                raise _Close("handshake timeout", _closing("HANDSHAKE_REQUIRED", "the preamble and HELLO must arrive within handshake_timeout"))
            if not more:
                return "closed during preamble"
            buf += more
        if buf[: len(PREAMBLE)] != PREAMBLE:
            raise _Close("bad preamble", _closing("BAD_PREAMBLE", f"a binary connection must open with the 4 bytes {PREAMBLE!r}"))
        reader = FrameReader(cfg.max_frame)
        reader.feed(buf[len(PREAMBLE):])
        self.state.connect(conn.id)
        outcome: BaseException | str | None = None
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._writer, conn)
            try:
                outcome = await self._read_loop(conn, reader)
            except (_Close, trio.BrokenResourceError, trio.ClosedResourceError, ConnectionError) as exc:
                outcome = exc  # re-raised below, outside the nursery, unwrapped
            finally:
                nursery.cancel_scope.cancel()
        if isinstance(outcome, BaseException):
            raise outcome
        return outcome

    async def _read_loop(self, conn: Conn, reader: FrameReader) -> str:
        cfg = self.config
        state = self.state
        handshaken = False
        data = b""
        while True:
            try:
                frames = reader.frames()
            except WireError as exc:
                raise _Close(f"protocol error {exc.code}", _closing(exc.code, exc.message)) from None
            partial = reader.buffered
            if partial != conn.partial:  # per batch, not per frame
                self._input_grew(conn, partial)
                if conn.closed:  # evicted (INPUT_LIMIT): its replies could not be sent anyway
                    frames = []
            if frames:
                now = time.time()
                outbox = state.outbox
                cid = conn.id
                alarm = self.memory_alarm
                for f in frames:
                    op = f[0]
                    if alarm is not None and op in MEMORY_OPS and handshaken and not _settles(f):
                        rid = f[1] if len(f) > 1 and type(f[1]) is int else 0
                        state._send(cid, [OP_ERROR, rid, "MEMORY_LIMIT", alarm])
                        outbox = state.outbox
                    elif op in DURABLE_OPS and handshaken:
                        # Its reply confirms a logged change: held until the log
                        # has it on disk (see _flush).  Replies are matched by
                        # request id, so they may overtake one another.
                        reply = handle(state, cid, f, now)
                        outbox = state.outbox
                        held = self._held.get(cid)
                        if held is None:
                            self._held[cid] = [reply]
                        else:
                            held.append(reply)
                    elif op in HANDLERS and handshaken:
                        box = outbox.get(cid)
                        before = len(box) if box else 0
                        reply = handle(state, cid, f, now)
                        outbox = state.outbox
                        box = outbox.get(cid)
                        if reply is None:
                            pass  # deferred (a parked RESULT_GET): the state replies later
                        elif box is None:
                            outbox[cid] = [reply]
                        elif len(box) == before:
                            box.append(reply)
                        else:
                            box.insert(before, reply)
                    else:
                        reply = self._connection_op(conn, f, handshaken, now)
                        if op == OP_HELLO and reply[0] == OP_OK:
                            handshaken = True
                        if op == OP_BYE:
                            # Everything before BYE is answered first, confirms included.
                            self._flush()
                            if self.wal is not None:
                                with trio.move_on_after(5.0):
                                    await self.wal.wait_durable(state.last_lsn)
                            conn.queue_bytes(encode_many([reply]))
                            await self._drain(conn)
                            return "client said BYE"
                        if reply is not None:
                            if op == OP_ADMIN:  # may purge, pause...: confirmed like them
                                self._held.setdefault(cid, []).append(reply)
                            else:
                                state._send(cid, reply)
                self._flush()
            # Back-pressure: stop reading while this connection's output is large.
            # (Past 4 x output_buffer, Conn.queue_bytes closes it: SLOW_CONSUMER.)
            if conn.out_bytes > cfg.output_buffer:
                conn.drained = trio.Event()
                with trio.move_on_after(self._silence_limit(conn)):
                    await conn.drained.wait()
            limit = self._silence_limit(conn)
            with trio.move_on_after(limit) as cs:
                data = await conn.stream.receive_some(RECEIVE_BYTES)
            if cs.cancelled_caught:
                if handshaken and conn.heartbeat == 0:
                    raise _Close(
                        "idle timeout",
                        _closing("IDLE_TIMEOUT", f"nothing received for {limit:g} seconds (idle_timeout; heartbeats are off)"),
                    )
                raise _Close(
                    "heartbeat timeout" if handshaken else "handshake timeout",
                    _closing(
                        "HEARTBEAT_TIMEOUT" if handshaken else "HANDSHAKE_REQUIRED",
                        f"nothing received for {limit:g} seconds",
                    ),
                )
            if not data:
                return "closed by peer"
            reader.feed(data)

    def _silence_limit(self, conn: Conn) -> float:
        if not conn.name:  # not handshaken: one deadline for preamble and HELLO together
            return max(0.0, conn.handshake_deadline - trio.current_time())
        if conn.heartbeat > 0:
            return 2 * conn.heartbeat
        return self.config.idle_timeout  # heartbeats off: silence is still bounded

    async def _drain(self, conn: Conn) -> None:
        with trio.move_on_after(1.0):
            while conn.out:
                await trio.sleep(0)

    def _connection_op(self, conn: Conn, f: list, handshaken: bool, now: float):
        op = f[0]
        if op == OP_HEARTBEAT:
            return None
        rid = f[1] if len(f) > 1 and type(f[1]) is int else 0
        if op == OP_HELLO:
            if handshaken:
                return [OP_ERROR, rid, "BAD_REQUEST", "HELLO was already sent on this connection"]
            opts = f[2] if len(f) > 2 else None
            if type(opts) is not dict:
                raise _Close("bad hello", _closing("BAD_REQUEST", "HELLO field 2 must be a map with at least 'version'"))
            version = opts.get("version")
            if type(version) is not int or version != PROTOCOL_VERSION:
                raise _Close(
                    "unsupported version",
                    _closing("UNSUPPORTED_VERSION", f"this server speaks protocol version {PROTOCOL_VERSION}, not {version!r}"),
                )
            name = opts.get("client")
            conn.name = name if isinstance(name, str) and name else f"conn-{conn.id}"
            hb = opts.get("heartbeat", self.config.heartbeat)
            if type(hb) not in (int, float) or not math.isfinite(hb) or hb < 0:
                hb = self.config.heartbeat
            # Silence is bounded by idle_timeout either way: a longer heartbeat
            # is cut to half of it (the reply says so and clients follow it).
            conn.heartbeat = min(float(hb), self.config.idle_timeout / 2)
            self.state.conns[conn.id].name = conn.name
            log.info("conn %d hello: client=%r heartbeat=%gs", conn.id, conn.name, conn.heartbeat)
            return [
                OP_OK,
                rid,
                {
                    "server": f"brokerd {__version__}",
                    "version": PROTOCOL_VERSION,
                    "heartbeat": conn.heartbeat,
                    "max_frame": self.config.max_frame,
                    "connection": conn.id,
                },
            ]
        if not handshaken:
            raise _Close("command before HELLO", _closing("HANDSHAKE_REQUIRED", "the first frame must be HELLO"))
        if op == OP_BYE:
            return [OP_OK, rid, None]
        if op == OP_ADMIN:
            line = f[2] if len(f) > 2 else None
            if type(line) is not str:
                return [OP_ERROR, rid, "BAD_REQUEST", "ADMIN field 2 must be one admin command line (text)"]
            return [OP_OK, rid, admin.execute(self.state, line, now, self.admin_extra())]
        return [OP_ERROR, rid, "UNKNOWN_OP", f"unknown op code {op!r}; see protocol.md §5 for the list"]

    async def _writer(self, conn: Conn) -> None:
        stream = conn.stream
        hb_frame = encode_many([[OP_HEARTBEAT]])
        while not conn.closed:
            if not conn.out:
                conn.wake = trio.Event()
                wait = conn.heartbeat if conn.heartbeat > 0 else math.inf
                with trio.move_on_after(wait) as cs:
                    await conn.wake.wait()
                if cs.cancelled_caught and not conn.out:
                    conn.out.append(hb_frame)
                    conn.out_bytes += len(hb_frame)
                if conn.closed:
                    return
            data = b"".join(conn.out) if len(conn.out) > 1 else conn.out[0]
            conn.out.clear()
            try:
                await stream.send_all(data)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                conn.closed = True
                if conn.cancel is not None:
                    conn.cancel.cancel()
                return
            conn.out_bytes -= len(data)
            if conn.out_bytes <= self.config.output_buffer:
                conn.drained.set()

    # -- admin text ---------------------------------------------------------------------
    async def _text(self, conn: Conn, first: bytes) -> str:
        buf = first
        stream = conn.stream
        cfg = self.config
        line_began = trio.current_time()  # when the first byte of the unfinished line came
        while True:
            while True:
                i = buf.find(b"\n")
                if i < 0:
                    break
                line_began = trio.current_time()
                raw, buf = buf[:i], buf[i + 1 :]
                line = raw.rstrip(b"\r").decode("utf-8", "replace")
                if not line.strip():
                    continue
                if line.split()[0].upper() == "EVENTS":  # issue 7: stream events (_text_events)
                    buf = await self._text_events(conn, line, buf)
                    if buf is None:
                        return "admin EVENTS ended"
                    continue
                reply = admin.execute(self.state, line, time.time(), self.admin_extra())
                self._flush()
                if self.wal is not None:  # PURGE, PAUSE...: reply once the change is on disk
                    await self.wal.wait_durable(self.state.last_lsn)
                await self._text_send(stream, reply.encode())
                if line.split()[0].upper() == "QUIT":
                    return "admin QUIT"
            if len(buf) > admin.MAX_LINE:
                raise _Close(
                    "admin line too long",
                    admin.error("BAD_REQUEST", f"line longer than {admin.MAX_LINE} bytes").encode(),
                )
            # Idle: nothing for idle_timeout.  Slowloris: a line begun must be
            # whole within handshake_timeout of its first byte.
            if buf:
                deadline = line_began + cfg.handshake_timeout
                why = f"a line must arrive whole within {cfg.handshake_timeout:g} seconds of its first byte"
            else:
                deadline = trio.current_time() + cfg.idle_timeout
                why = f"nothing received for {cfg.idle_timeout:g} seconds (idle_timeout)"
            with trio.move_on_at(deadline) as cs:
                data = await stream.receive_some(RECEIVE_BYTES)
            if cs.cancelled_caught:
                raise _Close("idle timeout", admin.error("IDLE_TIMEOUT", why).encode())
            if not data:
                return "admin closed"
            if not buf:
                line_began = trio.current_time()
            buf += data

    async def _text_send(self, stream, data: bytes) -> None:
        """Send to an admin client; one that reads nothing for idle_timeout is closed
        (it would otherwise hold its descriptor forever)."""
        with trio.move_on_after(self.config.idle_timeout) as cs:
            await stream.send_all(data)
        if cs.cancelled_caught:
            raise _Close(f"admin client read nothing for {self.config.idle_timeout:g} seconds (idle_timeout)")

    # -- issue 7 (events): EVENTS on an admin text connection ---------------------------------
    async def _text_events(self, conn: Conn, line: str, buf: bytes):
        """Stream events as text lines (``admin.event_line``) until QUIT or the connection breaks.

        The connection subscribes like a binary client (``state.subscribe``): the state puts
        EVENT frames in its output, which this task turns into lines.  Returns None when the
        stream is over, or ``buf`` (the unread input) when EVENTS was refused (bad usage).
        """
        words = line.split()
        if len(words) > 2 or (len(words) == 2 and not words[1].isdigit()):
            await self._text_send(conn.stream, admin.error("BAD_REQUEST", "usage: EVENTS [n] (n: recent events to show first)").encode())
            return buf
        self.state.subscribe(conn.id, True, int(words[1]) if len(words) == 2 else 0, time.time())
        await self._text_send(conn.stream, admin.single("streaming events; send QUIT to stop").encode())
        self._flush()  # the replayed events
        replies: list[bytes] = []
        flags = {"quit": False}

        async def read_commands(buf=buf):
            while True:
                while (i := buf.find(b"\n")) >= 0:
                    raw, buf = buf[:i], buf[i + 1:]
                    words = raw.decode("utf-8", "replace").split()
                    if not words:
                        continue
                    if words[0].upper() == "QUIT":
                        self.state.subscribe(conn.id, False, 0, time.time())
                        replies.append(admin.single("bye").encode())
                        flags["quit"] = True
                    else:
                        replies.append(admin.error("BAD_REQUEST", "streaming events: only QUIT is accepted").encode())
                    conn.wake.set()
                    if flags["quit"]:
                        return
                if len(buf) > admin.MAX_LINE:
                    buf = b""
                data = await conn.stream.receive_some(RECEIVE_BYTES)
                if not data:  # the client sent all it will; keep streaming until it stops reading
                    return
                buf += data

        frames = FrameReader(1 << 30)
        failed: BaseException | None = None
        async with trio.open_nursery() as nursery:
            nursery.start_soon(read_commands)
            try:
                while not flags["quit"] or conn.out or replies:
                    if not conn.out and not replies:
                        conn.wake = trio.Event()
                        await conn.wake.wait()
                    taken = len(conn.out)
                    if taken:
                        data = b"".join(conn.out)
                        del conn.out[:taken]
                        frames.feed(data)
                        out = []
                        for f in frames.frames():
                            if len(f) > 2 and f[2]:
                                out.append(f"-- {f[2]} events dropped: this connection reads too slowly --")
                            out += [admin.event_line(ev) for ev in (f[1] if len(f) > 1 else ())]
                        await self._text_send(conn.stream, "".join(x + "\r\n" for x in out).encode())
                        conn.out_bytes -= len(data)
                    while replies:
                        await self._text_send(conn.stream, replies.pop(0))
            except (_Close, trio.BrokenResourceError, trio.ClosedResourceError, ConnectionError) as exc:
                failed = exc  # re-raised below, outside the nursery, unwrapped
            finally:
                nursery.cancel_scope.cancel()
        if failed is not None:
            raise failed
        return None
    # -- end of issue 7 (events) ------------------------------------------------------------

    def admin_extra(self) -> dict:
        extra = {"uptime_s": round(time.time() - self.started, 1), "version": __version__}
        extra.update(self.limit_statistics())
        if self.wal is not None:
            extra.update(self.wal.statistics())
        return extra


def _settles(f: list) -> bool:
    """A RESULT_SET that also settles a delivery (option "tag"): allowed past max_memory."""
    return f[0] == OP_RESULT_SET and len(f) > 6 and type(f[6]) is dict and "tag" in f[6]


def _closing(code: str, message: str) -> bytes:
    return encode_many([[OP_CLOSING, code, message]])


async def serve(config: Config, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
    server = Server(config)
    await server.serve(task_status=task_status)
