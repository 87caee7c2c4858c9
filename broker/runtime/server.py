"""The trio server: lifecycle, accepting, the ticker and the state's effects.

Every connection gets a task (``_handle``) that sniffs its first byte: 0x16 is
a TLS ClientHello (with ``--tls-cert``: the stream is wrapped in TLS and the
sniffing starts again inside it), NUL opens the binary protocol
(``client.wire.PREAMBLE``; ``connection``), anything else is an admin text
line (``admin_conn``).  After each batch a connection
runs, ``flush`` moves the state's effects out: log records to the write-ahead
log (``durability``), frames to each connection's output.  The ticker wakes the
state for timers (delays, visibility timeouts, schedules) and samples memory.
The bounds (max_connections, max_input_buffer, max_memory) are enforced here.
"""

from __future__ import annotations

import ctypes
import functools
import itertools
import logging
import math
import os
import platform
import ssl
import time

import trio

from broker import __version__
from broker.config import MEMORY_CLEAR_RATIO, MEMORY_HARD_RATIO, Config
from broker.handlers import admin
from broker.runtime import history, http, notify
from broker.runtime.admin_conn import AdminConnection
from broker.runtime.connection import (
    RECEIVE_BYTES,
    BinaryConnection,
    Close,
    Conn,
    closing,
)
from broker.runtime.roles import Roles
from broker.state import BrokerState

log = logging.getLogger("brokerd")

TICK_MAX_SLEEP = 1.0  # seconds; re-read the wall clock at least this often

# -- bounds: connections, partial input, memory --------------------------------------------
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
# glibc raises its mmap threshold to the size of each big block freed (up to
# 32 MiB), after which big buffers come from the heap and stay resident once
# freed (measured: 40 x 15 MiB partial frames took RSS from 33 to 639 MB, and it stayed).
# Fixing the threshold keeps buffers from this size up mmapped: returned to the
# OS when freed.  Below it, per-message objects stay on the fast heap.
MMAP_THRESHOLD = 256 * 1024
_M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter number (malloc.h)


# -- TLS on the protocol port -------------------------------------------------------------
TLS_RECORD_HANDSHAKE = 0x16  # the first byte of every TLS ClientHello (a handshake record)


def server_tls_context(config: Config) -> ssl.SSLContext | None:
    """The protocol port's (and HTTPS's) TLS context, or None without --tls-cert.

    TLS 1.2 at least (1.0/1.1 are deprecated, RFC 8996).  With --tls-client-ca a
    client must present a certificate that CA signed (mutual TLS).  Raises
    ``ssl.SSLError``/``OSError`` for a certificate or key that cannot be loaded.
    """
    if not config.tls:
        return None
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_cert_chain(config.tls_cert, config.tls_key)
    if config.tls_client_ca:
        ctx.load_verify_locations(cafile=config.tls_client_ca)
        ctx.verify_mode = ssl.CERT_REQUIRED
    return ctx


class ReplayStream(trio.abc.Stream):
    """A stream whose first ``receive_some`` returns bytes already read from it.

    The sniffer reads the first bytes to tell TLS from plaintext; the TLS layer
    must still see them (they are the start of the ClientHello).
    """

    def __init__(self, stream, head: bytes):
        self.stream = stream
        self.socket = stream.socket
        self._head = head

    async def receive_some(self, max_bytes=None):
        if self._head:
            head, self._head = self._head, b""
            return head
        return await self.stream.receive_some(max_bytes)

    async def send_all(self, data):
        await self.stream.send_all(data)

    async def wait_send_all_might_not_block(self):
        await self.stream.wait_send_all_might_not_block()

    async def aclose(self):
        await self.stream.aclose()


def peer_subject(tls) -> str | None:
    """The verified client certificate's subject as ``CN=name,O=org``, or None (no certificate).
    Kept on the connection (``Conn.tls_subject``) for user mapping."""
    cert = tls.getpeercert()
    if not cert:
        return None
    parts = [f"{k}={v}" for rdn in cert.get("subject", ()) for k, v in rdn]
    return ",".join(parts) or None


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


class Server:
    def __init__(self, config: Config, state: BrokerState | None = None, wal=None):
        self.config = config
        self.state = state or BrokerState(boot_id=format(int(time.time() * 1000) % 0xFFFFFFFF, "x"))
        self.wal = wal  # a broker.runtime.durability.Durability, or None (no durability)
        self.history = None  # a broker.runtime.history.HistoryFile (boot sets it with a data dir)
        self.conns: dict[int, Conn] = {}
        self.user_connections: dict[str, int] = {}  # user name -> open connections (max_connections_per_user)
        self.users = None  # broker.auth.Users when a users file is configured (boot sets it)
        self.held: dict[int, list] = {}  # replies waiting for the log (DURABLE_OPS)
        self._ids = itertools.count(1)
        self._tick_wake = trio.Event()
        self._next_tick = math.inf
        self.started = time.time()
        self.listeners: list = []
        self.nursery: trio.Nursery | None = None
        self.ready = False
        self.stopping = False
        self.http_address: tuple[str, int] | None = None  # (host, port) of /metrics and the probes
        # the state drops events for a subscriber with this much unsent
        self.state.set_backlog_probe(lambda cid: c.out_bytes if (c := self.conns.get(cid)) is not None else 0)
        # bounds: connections, partial input, memory
        self.max_connections = config.connection_limit()
        self.open_count = 0  # connections being served (refusals not counted)
        self._refusing = 0  # refusals in progress
        self._refused_burst = 0  # refused since the last time there was room
        self.refused_total = 0
        self.partial_total = 0  # sum of Conn.partial
        self.memory_limit = config.memory_limit()  # the watermark: past it, queued bodies spill to the log
        self.memory_hard_limit = config.memory_hard_limit()  # past it, publishes are refused
        self.memory_alarm: str | None = None  # the MEMORY_LIMIT message while over the watermark
        self.rss = 0
        self._statm_fd: int | None = None
        self._next_memory_sample = 0.0
        self._next_trim = 0.0
        self.state.set_server_stats(self.limit_statistics)  # STATS (broker.handlers.binary.h_stats)
        self.tls_context = server_tls_context(config)  # None: plaintext only
        # Replication (broker/runtime/replication.py): boot sets one of them.  A follower
        # answers admin reads from its replayed log and refuses writes with NOT_LEADER.
        self.follower = None  # a replication.Follower when --follow is set
        self.replication = None  # a replication.LeaderReplication otherwise (with a log)
        self.replica_alarm: str | None = None  # NOT_ENOUGH_REPLICAS's message while too few are in sync
        self.roles = Roles(self)  # leader or follower, the epoch, promotion and step-down (broker/runtime/roles.py)

    # -- effects -------------------------------------------------------------------
    def flush(self) -> None:
        """Move the state's effects out after a batch.

        Deliveries and replies that confirm nothing go out at once.  Replies
        to requests that changed logged state (``DURABLE_OPS``) go to the log
        with the batch's records and are released when those are durable under
        the fsync policy: a confirm never precedes its fsync.  A delivery may
        reach a consumer before its publish is fsynced; if brokerd then crashes
        the message was never confirmed, and at-least-once delivery holds.
        """
        effects = self.state.take_effects()
        box = effects.frames
        held = self.held
        if held:
            self.held = {}
        if effects.records and self.wal is not None:  # records come only with a log (state.enable_log)
            self.wal.submit(effects.records, held, self._release, box)
            held = box = None
        if box:
            self._release(box)
        if held:
            self._release(held)
        if effects.next_wakeup < self._next_tick:
            self._tick_wake.set()

    def _release(self, box: dict) -> None:
        conns = self.conns
        for cid, frames in box.items():
            conn = conns.get(cid)
            if conn is not None and not conn.closed:
                conn.queue_bytes(conn.encode(frames))

    # -- lifecycle -------------------------------------------------------------------
    async def serve(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        cfg = self.config
        tune_malloc()
        self._sample_memory()
        self.listeners = await trio.open_tcp_listeners(cfg.port, host=cfg.host)
        try:  # the HTTP port is bound up front too, so a busy one fails the start
            http_sock = http.bind(cfg.host, cfg.http_port)
        except OSError:
            for listener in self.listeners:
                await listener.aclose()
            raise
        self.http_address = http_sock.getsockname()[:2]
        async with trio.open_nursery() as nursery:
            self.nursery = nursery
            nursery.start_soon(self._ticker)
            if self.follower is not None:
                # The follower writes only what the leader sends (no writer task, no
                # compaction of its own): its log stays the leader's, lsn for lsn.
                nursery.start_soon(self.follower.run)
            elif self.wal is not None:
                await nursery.start(self.roles.writer)
            if self.history is not None:  # the page's task list, kept across restarts
                nursery.start_soon(history.writer, self.state, self.history)
            for listener in self.listeners:
                nursery.start_soon(self._accept_loop, listener)
            # HTTP (metrics, probes) and the systemd watchdog
            # trio's thread pool and sleep for the web logins (scrypt off the loop; the auth throttle)
            await nursery.start(functools.partial(http.serve, run_sync=trio.to_thread.run_sync, sleep=trio.sleep),
                                self, http_sock)
            scheme = "https" if cfg.tls else "http"
            h_host, h_port = self.http_address
            # The page's URL, ready to paste: a wildcard address is not one a browser can open.
            shown = {"0.0.0.0": "127.0.0.1", "::": "[::1]"}.get(h_host, f"[{h_host}]" if ":" in h_host else h_host)
            log.info("http: listening on %s:%d (%s: /metrics /api/queues /healthz /readyz); the page: %s://%s:%d/",
                     h_host, h_port, scheme, scheme, shown, h_port)
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
                "brokerd %s ready: listening on %s:%d (binary protocol and admin text%s)",
                __version__, addr[0], addr[1],
                "" if not cfg.tls else (", TLS only" if cfg.tls_required else ", plaintext or TLS")
                + (", client certificates required" if cfg.tls_client_ca else ""),
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
        if self.history is not None:
            history.final_flush(self.state, self.history)
        if self.wal is not None:  # a leader's clean stop writes a checkpoint (not a follower's or fenced one's)
            await self.wal.close(checkpoint=self.follower is None)
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

    # -- bounds ------------------------------------------------------------------------
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
                        data = closing("TOO_MANY_CONNECTIONS", message)
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

    def input_grew(self, conn: Conn, partial: int) -> None:
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
        if not self.memory_limit:
            return
        # Past the watermark every queued body is left in the log once written (broker/state/spill.py).
        spill = self.rss > self.memory_limit
        if spill != self.state.spill_all:
            self.state.spill_all = spill
            if spill and self.wal is not None:
                freed = self.state.spill(self.wal.wal.written_lsn, everything=True)
                log.warning("memory: %d bytes resident, past max_memory %d; queued bodies are left in the log "
                            "from now on (%d bytes spilled)", self.rss, self.memory_limit, freed)
                _trim_malloc()
        limit = self.memory_hard_limit
        if self.memory_alarm is None and self.rss > limit:
            self.memory_alarm = (
                f"brokerd's memory ({self.rss} bytes resident) is past max_memory_hard ({limit} bytes; "
                f"--max-memory-hard, by default --max-memory x {MEMORY_HARD_RATIO:g}); "
                "publishes are refused until consumers drain the queues below "
                f"{int(limit * MEMORY_CLEAR_RATIO)} bytes. Retry later with backoff, add consumers, "
                "or raise --max-memory"
            )
            log.warning("memory alarm: %d bytes resident, past max_memory_hard %d; refusing publishes", self.rss, limit)
        elif self.memory_alarm is not None and self.rss < limit * MEMORY_CLEAR_RATIO:
            self.memory_alarm = None
            log.warning("memory alarm cleared: %d bytes resident; accepting publishes again", self.rss)

    def limit_statistics(self) -> dict:
        """The bounds and how close the broker is to them (STATS, admin STATS)."""
        return {
            "memory_rss": self.rss,
            "memory_limit": self.memory_limit,
            "memory_hard_limit": self.memory_hard_limit,
            "memory_spilling": self.state.spill_all,
            **self.state.spill_statistics(),
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
            # A follower (or a fenced leader) decides nothing on its own: no timers, no schedules.
            nxt = state.tick(now) if self.follower is None else now + TICK_MAX_SLEEP
            self.flush()
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
                data = admin.error(code, message).encode() if conn.name == "<admin>" else closing(code, message)
                raise Close(f"{code}: {message}", data)
            if conn.cancel.cancelled_caught:
                reason = "connection lost while sending"
        except Close as exc:
            reason = exc.reason
            stream = conn.stream  # the TLS stream, once the connection turned to TLS
            if exc.data:
                with trio.move_on_after(1.0):
                    try:
                        await stream.send_all(exc.data)
                        # Read (and drop) what the client is still sending for a
                        # moment: closing with unread input resets the connection,
                        # and a reset can destroy the CLOSING frame before it is read.
                        if isinstance(stream, trio.SocketStream):  # TLS has no half-close
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
                    await conn.stream.send_all(closing("INTERNAL", "internal error in brokerd; see its log"))
                except Exception:
                    pass
        finally:
            conn.closed = True
            conn.wake.set()
            del self.conns[cid]
            self.open_count -= 1
            if conn.counted_user is not None:
                left = self.user_connections.get(conn.counted_user, 1) - 1
                if left > 0:
                    self.user_connections[conn.counted_user] = left
                else:
                    self.user_connections.pop(conn.counted_user, None)
            self.partial_total -= conn.partial
            conn.partial = 0
            self._room_again()
            returned = self.state.disconnect(cid, time.time())
            self.flush()
            with trio.move_on_after(0.5) as cs:
                cs.shield = True
                try:
                    await conn.stream.aclose()
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
        if first[0] == TLS_RECORD_HANDSHAKE and self.tls_context is not None and conn.tls_subject is None:
            return await self._start_tls(conn, stream, first)
        if self.config.tls_required and conn.tls_subject is None:
            message = (
                "brokerd requires TLS on this port: connect with a brokerds:// URL, or "
                f"openssl s_client -connect {self.config.host}:{self.port} for admin text"
            )
            if first[:1] == b"\x00":
                raise Close("TLS_REQUIRED: plaintext refused", closing("TLS_REQUIRED", message))
            conn.name = "<admin>"
            raise Close("TLS_REQUIRED: plaintext refused", admin.error("TLS_REQUIRED", message).encode())
        if first[:1] == b"\x00":
            return await BinaryConnection(self, conn).run(first)
        conn.name = "<admin>"
        return await AdminConnection(self, conn).run(first)

    async def _start_tls(self, conn: Conn, stream, first: bytes) -> str:
        """Wrap the connection in TLS (the ClientHello's first bytes are replayed into it),
        finish the handshake within what is left of handshake_timeout, then sniff again."""
        tls = trio.SSLStream(ReplayStream(stream, first), self.tls_context, server_side=True)
        with trio.move_on_at(conn.handshake_deadline) as cs:
            try:
                await tls.do_handshake()
            except trio.BrokenResourceError as exc:
                cause = exc.__cause__
                why = getattr(cause, "reason", None) or getattr(cause, "strerror", None) or cause or exc
                return f"TLS handshake failed: {why}"
        if cs.cancelled_caught:
            return "TLS handshake not finished before handshake_timeout"
        conn.stream = tls
        # "" when the client sent no certificate: marks the connection as TLS either way
        conn.tls_subject = peer_subject(tls) or ""
        return await self._sniff(conn, tls)

    # -- binary protocol ------------------------------------------------------------------
    def admin_extra(self) -> dict:
        extra = {"uptime_s": round(time.time() - self.started, 1), "version": __version__,
                 "security": self.config.security(), "tls": self.tls_context is not None}
        extra.update(self.limit_statistics())
        if self.wal is not None:
            extra.update(self.wal.statistics())
        extra.update({f"replication_{k}": v for k, v in self.roles.statistics().items()})
        return extra


async def serve(config: Config, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
    server = Server(config)
    await server.serve(task_status=task_status)
