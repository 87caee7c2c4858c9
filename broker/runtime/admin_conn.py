"""One admin text connection: the netcat-friendly command loop and its EVENTS stream.

A connection whose first byte is not NUL speaks admin text (protocol.md §7):
one command per line, each answered ``OK ...`` or ``ERR <CODE> ...``
(``broker.handlers.admin``).  ``EVENTS`` turns the connection into a stream of
event lines until QUIT.
"""

from __future__ import annotations

import time

import trio

from broker.errors import NotLeader
from broker.handlers import admin
from broker.runtime.connection import RECEIVE_BYTES, Close, Conn, audit, peer_host
from broker.runtime.replication import follower_may_read

# Before AUTH, on a broker with users, only these answer (the rest: ERR AUTH_REQUIRED).
BEFORE_AUTH = frozenset(("HELP", "PING", "QUIT", "AUTH"))


class AdminConnection:
    """The admin text protocol on one accepted connection."""

    def __init__(self, server, conn: Conn):
        self.server = server  # a broker.runtime.server.Server: its state, log and settings
        self.conn = conn
        self.config = server.config

    async def run(self, first: bytes) -> str:
        conn = self.conn
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
                word = line.split()[0].upper()
                users = getattr(self.server, "users", None)
                if users is not None and (word == "AUTH" or conn.user is None):
                    if word == "AUTH":
                        await self._auth(line, users)
                        continue
                    if word not in BEFORE_AUTH:
                        await self._send(stream, admin.error(
                            "AUTH_REQUIRED", "this broker has users: send AUTH <user> <token> first").encode())
                        continue
                if users is not None and word == "PING":  # a liveness probe that needs no token
                    await self._send(stream, admin.single("pong").encode())
                    continue
                if word == "EVENTS":  # stream events (_events)
                    buf = await self._events(line, buf)
                    if buf is None:
                        return "admin EVENTS ended"
                    continue
                if word == "PROMOTE":  # a change of role (broker/runtime/roles.py), not a state read
                    await self._send(stream, (await self.server.roles.promote_line(line, conn)).encode())
                    continue
                follower = self.server.follower
                if follower is not None:  # a standby: reads from its replayed log, no writes
                    if not follower_may_read(line):
                        await self._send(stream, admin.error(NotLeader.code, follower.refusal()).encode())
                        continue
                    reply = admin.execute(follower.view(time.time()), line, time.time(), self.server.admin_extra(),
                                          user=conn.user)
                    await self._send(stream, reply.encode())
                    continue
                reply = admin.execute(self.server.state, line, time.time(), self.server.admin_extra(), user=conn.user)
                if word in admin.CHANGING_COMMANDS:
                    audit.info("admin %s: user=%r conn %d from %s", line.strip()[:200],
                               conn.user.name if conn.user is not None else None, conn.id, conn.peer)
                self.server.flush()
                if self.server.wal is not None:  # PURGE, PAUSE...: reply once the change is on disk
                    await self.server.wal.wait_durable(self.server.state.last_lsn)
                await self._send(stream, reply.encode())
                if line.split()[0].upper() == "QUIT":
                    return "admin QUIT"
            if len(buf) > admin.MAX_LINE:
                raise Close(
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
                raise Close("idle timeout", admin.error("IDLE_TIMEOUT", why).encode())
            if not data:
                return "admin closed"
            if not buf:
                line_began = trio.current_time()
            buf += data

    async def _auth(self, line: str, users) -> None:
        """``AUTH <user> <token>``: log this connection in, or ERR AUTH_FAILED after the
        throttle's delay (bounded by handshake_timeout) and close."""
        conn = self.conn
        words = line.split()
        if len(words) != 3:
            await self._send(conn.stream, admin.error("BAD_REQUEST", "usage: AUTH <user> <token>").encode())
            return
        user = await trio.to_thread.run_sync(users.authenticate, words[1], words[2])  # scrypt: off the loop
        address = peer_host(conn.peer)
        if user is None:
            delay = self.server.auth_throttle.failed(address, time.monotonic())
            audit.warning("admin auth failed: conn %d from %s user=%r (answer delayed %.1fs)",
                          conn.id, conn.peer, words[1][:64], delay)
            with trio.move_on_after(min(delay, self.config.handshake_timeout)):
                await trio.sleep(delay)
            raise Close("admin authentication failed",
                        admin.error("AUTH_FAILED", f"user {words[1][:64]!r} with that token is not known to this broker").encode())
        self.server.auth_throttle.succeeded(address)
        conn.user = user
        await self._send(conn.stream, admin.single(f"logged in as {user.name}").encode())

    async def _send(self, stream, data: bytes) -> None:
        """Send to an admin client; one that reads nothing for idle_timeout is closed
        (it would otherwise hold its descriptor forever)."""
        with trio.move_on_after(self.config.idle_timeout) as cs:
            await stream.send_all(data)
        if cs.cancelled_caught:
            raise Close(f"admin client read nothing for {self.config.idle_timeout:g} seconds (idle_timeout)")

    # -- EVENTS on an admin text connection ---------------------------------------------------
    async def _events(self, line: str, buf: bytes):
        """Stream events as text lines (``admin.event_line``) until QUIT or the connection breaks.

        The connection subscribes like a binary client (``state.subscribe``); its
        EVENT frames are rendered to text lines where they are queued
        (``Conn.encode``), so the accounting of unsent output (back-pressure,
        dropped events, SLOW_CONSUMER) counts the bytes this client is sent.
        Returns None when the stream is over, or ``buf`` (the unread input) when
        EVENTS was refused (bad usage).
        """
        conn = self.conn
        state = self.server.state
        words = line.split()
        if len(words) > 2 or (len(words) == 2 and not words[1].isdigit()):
            await self._send(conn.stream, admin.error("BAD_REQUEST", "usage: EVENTS [n] (n: recent events to show first)").encode())
            return buf
        conn.encode = event_lines
        state.subscribe(conn.id, True, int(words[1]) if len(words) == 2 else 0, time.time())
        await self._send(conn.stream, admin.single("streaming events; send QUIT to stop").encode())
        self.server.flush()  # the replayed events
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
                        state.subscribe(conn.id, False, 0, time.time())
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
                        await self._send(conn.stream, data)
                        conn.out_bytes -= len(data)
                    while replies:
                        await self._send(conn.stream, replies.pop(0))
            except (Close, trio.BrokenResourceError, trio.ClosedResourceError, ConnectionError) as exc:
                failed = exc  # re-raised below, outside the nursery, unwrapped
            finally:
                nursery.cancel_scope.cancel()
        if failed is not None:
            raise failed
        return None


def event_lines(frames: list) -> bytes:
    """EVENT frames, as the text lines an admin EVENTS stream shows (``Conn.encode``)."""
    out = []
    for f in frames:
        if len(f) > 2 and f[2]:
            out.append(f"-- {f[2]} events dropped: this connection reads too slowly --")
        out += [admin.event_line(ev) for ev in (f[1] if len(f) > 1 else ())]
    return "".join(x + "\r\n" for x in out).encode()
