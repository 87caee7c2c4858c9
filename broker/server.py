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

import itertools
import logging
import math
import time

import trio

from broker import __version__, admin, http, notify
from broker.commands import DURABLE_OPS, HANDLERS, handle
from broker.config import Config
from broker.state import BrokerState
from client.wire import (
    OP_ADMIN,
    OP_BYE,
    OP_CLOSING,
    OP_ERROR,
    OP_HEARTBEAT,
    OP_HELLO,
    OP_OK,
    PREAMBLE,
    PROTOCOL_VERSION,
    FrameReader,
    WireError,
    encode_many,
)

log = logging.getLogger("brokerd")

RECEIVE_BYTES = 64 * 1024  # one receive_some; the batch is whatever arrived
TICK_MAX_SLEEP = 1.0  # seconds; re-read the wall clock at least this often


class Conn:
    """Server-side I/O state of one connection."""

    __slots__ = (
        "id", "stream", "peer", "name", "out", "out_bytes", "wake", "drained",
        "closed", "opened", "heartbeat", "last_sent", "cancel", "handshake_deadline",
    )

    def __init__(self, id, stream, peer):
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
        self.cancel: trio.CancelScope | None = None
        self.handshake_deadline = math.inf

    def queue_bytes(self, data: bytes) -> None:
        if self.closed:
            return
        self.out.append(data)
        self.out_bytes += len(data)
        self.wake.set()


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
                self.nursery.start_soon(self._handle, stream)

    async def _ticker(self) -> None:
        state = self.state
        while True:
            now = time.time()
            nxt = state.tick(now)
            self._flush()
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
        conn = Conn(cid, stream, peer)
        conn.handshake_deadline = trio.current_time() + self.config.handshake_timeout
        self.conns[cid] = conn
        log.info("conn %d open from %s", cid, peer)
        reason = "closed by peer"
        try:
            with trio.move_on_after(self.config.handshake_timeout) as cs:
                first = await stream.receive_some(RECEIVE_BYTES)
            if cs.cancelled_caught:
                reason = "no bytes before handshake_timeout"
                return
            if not first:
                return
            if first[:1] == b"\x00":
                reason = await self._binary(conn, first)
            else:
                conn.name = "<admin>"
                reason = await self._text(conn, first)
        except _Close as exc:
            reason = exc.reason
            if exc.data:
                with trio.move_on_after(1.0):
                    try:
                        await stream.send_all(exc.data)
                    except (trio.BrokenResourceError, trio.ClosedResourceError):
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
        hard_limit = 4 * cfg.output_buffer
        outcome: BaseException | str | None = None
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._writer, conn)
            try:
                outcome = await self._read_loop(conn, reader, hard_limit)
            except (_Close, trio.BrokenResourceError, trio.ClosedResourceError, ConnectionError) as exc:
                outcome = exc  # re-raised below, outside the nursery, unwrapped
            finally:
                nursery.cancel_scope.cancel()
        if isinstance(outcome, BaseException):
            raise outcome
        return outcome

    async def _read_loop(self, conn: Conn, reader: FrameReader, hard_limit: int) -> str:
        cfg = self.config
        state = self.state
        handshaken = False
        data = b""
        while True:
            try:
                frames = reader.frames()
            except WireError as exc:
                raise _Close(f"protocol error {exc.code}", _closing(exc.code, exc.message)) from None
            if frames:
                now = time.time()
                outbox = state.outbox
                cid = conn.id
                for f in frames:
                    op = f[0]
                    if op in DURABLE_OPS and handshaken:
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
            if conn.out_bytes > cfg.output_buffer:
                if conn.out_bytes > hard_limit:
                    raise _Close(
                        "slow consumer",
                        _closing("SLOW_CONSUMER", f"more than {hard_limit} bytes unsent; read your socket"),
                    )
                conn.drained = trio.Event()
                with trio.move_on_after(self._silence_limit(conn)):
                    await conn.drained.wait()
            limit = self._silence_limit(conn)
            with trio.move_on_after(limit) as cs:
                data = await conn.stream.receive_some(RECEIVE_BYTES)
            if cs.cancelled_caught:
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
        return math.inf

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
            conn.heartbeat = float(hb)
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
        while True:
            while True:
                i = buf.find(b"\n")
                if i < 0:
                    break
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
                await stream.send_all(reply.encode())
                if line.split()[0].upper() == "QUIT":
                    return "admin QUIT"
            if len(buf) > admin.MAX_LINE:
                raise _Close(
                    "admin line too long",
                    admin.error("BAD_REQUEST", f"line longer than {admin.MAX_LINE} bytes").encode(),
                )
            data = await stream.receive_some(RECEIVE_BYTES)
            if not data:
                return "admin closed"
            buf += data

    # -- issue 7 (events): EVENTS on an admin text connection ---------------------------------
    async def _text_events(self, conn: Conn, line: str, buf: bytes):
        """Stream events as text lines (``admin.event_line``) until QUIT or the connection breaks.

        The connection subscribes like a binary client (``state.subscribe``): the state puts
        EVENT frames in its output, which this task turns into lines.  Returns None when the
        stream is over, or ``buf`` (the unread input) when EVENTS was refused (bad usage).
        """
        words = line.split()
        if len(words) > 2 or (len(words) == 2 and not words[1].isdigit()):
            await conn.stream.send_all(admin.error("BAD_REQUEST", "usage: EVENTS [n] (n: recent events to show first)").encode())
            return buf
        self.state.subscribe(conn.id, True, int(words[1]) if len(words) == 2 else 0, time.time())
        await conn.stream.send_all(admin.single("streaming events; send QUIT to stop").encode())
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
                        await conn.stream.send_all("".join(x + "\r\n" for x in out).encode())
                        conn.out_bytes -= len(data)
                    while replies:
                        await conn.stream.send_all(replies.pop(0))
            except (trio.BrokenResourceError, trio.ClosedResourceError, ConnectionError) as exc:
                failed = exc  # re-raised below, outside the nursery, unwrapped
            finally:
                nursery.cancel_scope.cancel()
        if failed is not None:
            raise failed
        return None
    # -- end of issue 7 (events) ------------------------------------------------------------

    def admin_extra(self) -> dict:
        extra = {"uptime_s": round(time.time() - self.started, 1), "version": __version__}
        if self.wal is not None:
            extra.update(self.wal.statistics())
        return extra


def _closing(code: str, message: str) -> bytes:
    return encode_many([[OP_CLOSING, code, message]])


async def serve(config: Config, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
    server = Server(config)
    await server.serve(task_status=task_status)
