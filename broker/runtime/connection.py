"""One binary-protocol connection: the read loop, the writer and the connection-level ops.

Shape of the hot path (batched reading was measured at ~10x the frames per
second of awaiting frame by frame):

1. a connection's reader task takes whatever bytes have arrived (one
   ``receive_some``), decodes *every* complete frame, and runs each through
   ``broker.handlers.binary`` against the state, all with one ``now``;
2. then ``Server.flush`` moves the batch's effects out: log records to the
   write-ahead log, frames to each connection's output list;
3. each connection's writer task sends everything queued for it in one
   ``send_all``.

With a write-ahead log attached, the replies that confirm a logged change are
held until the log record of the batch is durable under the fsync policy
(group commit), so a confirm never goes out before its message is on disk.
The handshake (preamble, HELLO, version and heartbeat) is the sans-I/O
``client.wire.ServerHandshake``, fed the connection's first bytes; HEARTBEAT,
BYE, ADMIN and a second HELLO are answered here, not by the state.
"""

from __future__ import annotations

import logging
import math
import time

import trio

from broker import __version__
from broker import auth
from broker.errors import MemoryLimit, NotEnoughReplicas, NotLeader, UnknownOp
from broker.handlers import admin
from broker.handlers.binary import DURABLE_OPS, HANDLERS, handle
from broker.runtime.replication import follower_may_read
from client.wire import (
    OP_ADMIN,
    OP_PING,
    OP_REPLICATE,
    OP_PROMOTE,
    OP_BYE,
    OP_CHORD,
    OP_HEARTBEAT,
    OP_HELLO,
    OP_PUBLISH,
    OP_PUBLISH_BATCH,
    OP_CONFIRM_RANGE,
    encode_batched,
    OP_RESULT_SET,
    OP_SCHEDULE_PUT,
    HEARTBEAT_FRAME,
    FrameReader,
    HandshakeError,
    CLIENT_OPS,
    OP_CONTROL_REQUEST,
    OP_PAUSE,
    OP_PURGE,
    OP_RESUME,
    OP_REVOKE,
    OP_SCHEDULE_PAUSE,
    OP_SCHEDULE_REMOVE,
    OP_STATS,
    OP_TASK_INFO,
    OP_OK,
    OP_DELETE,
    OP_DECLARE,
    ServerHandshake,
    WireError,
    closing_frame,
    encode_many,
    error_frame,
    ok_frame,
)

log = logging.getLogger("brokerd")
# Who did what to the broker's management surface, and failed logins: one line per action,
# with the user and the peer address (issue 12 part 8).  A separate logger so it can be sent
# to its own file or level without the connection chatter.
audit = logging.getLogger("brokerd.audit")
# Binary ops that change the broker for everyone (management, revocation, schedules, control
# of workers, admin lines): each one is an audit line.  Per-message ops are not, by design.
# What a follower answers itself (reads, and the connection's own upkeep); every other op gets
# NOT_LEADER naming the leader (broker/runtime/replication.py).
FOLLOWER_OPS = frozenset((OP_HELLO, OP_HEARTBEAT, OP_PING, OP_BYE, OP_STATS, OP_ADMIN))
AUDIT_OPS = frozenset((OP_DECLARE, OP_DELETE, OP_PURGE, OP_PAUSE, OP_RESUME, OP_REVOKE, OP_SCHEDULE_PUT,
                       OP_SCHEDULE_REMOVE, OP_SCHEDULE_PAUSE, OP_CONTROL_REQUEST, OP_ADMIN))

RECEIVE_BYTES = 64 * 1024  # one receive_some; the batch is whatever arrived
# What the connection log line says when the handshake refuses a connection (by CLOSING code).
HANDSHAKE_REASONS = {
    "BAD_PREAMBLE": "bad preamble",
    "BAD_REQUEST": "bad hello",
    "UNSUPPORTED_VERSION": "unsupported version",
    "HANDSHAKE_REQUIRED": "command before HELLO",
    "AUTH_FAILED": "authentication failed",
}
# Ops refused with MEMORY_LIMIT past max_memory: the ones that make the broker
# hold more.  Consumers, ACK/NACK, reads and admin go on so a backlog drains;
# a RESULT_SET that settles a delivery (option "tag") goes on too, because it
# frees the message it settles and refusing it would stall the workers.
MEMORY_OPS = frozenset((OP_PUBLISH, OP_PUBLISH_BATCH, OP_RESULT_SET, OP_SCHEDULE_PUT, OP_CHORD))
# Publishes whose OK a version-2 connection gets as a CONFIRM_RANGE when the client can predict it.
PUBLISH_OPS = (OP_PUBLISH, OP_PUBLISH_BATCH)


class Conn:
    """Server-side I/O state of one connection."""

    __slots__ = (
        "id", "stream", "peer", "name", "out", "out_bytes", "wake", "drained",
        "closed", "opened", "heartbeat", "last_sent", "cancel", "handshake_deadline",
        "hard_limit", "evicted", "partial", "encode", "user",
        "tls_subject", "counted_user", "version", "raw", "sending",
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
        # frames -> the bytes this client is sent: CBOR, or text lines on an admin EVENTS stream
        self.encode = encode_many
        # None: plaintext; "" TLS without a client certificate; else the verified
        # client certificate's subject ("CN=...,O=..."), for mapping to a user
        self.tls_subject: str | None = None
        self.counted_user: str | None = None  # the user whose per-user connection count this holds
        # the broker.auth.User this connection logged in as; None when brokerd has no users
        self.user = None
        self.version = 1  # the protocol version HELLO agreed (protocol.md §10)
        # The plaintext socket under ``stream`` once a binary connection is running, else None:
        # queue_bytes sends on it at once while nothing is queued or being sent (see there).
        self.raw = None
        self.sending = False  # the writer task is inside send_all

    def queue_bytes(self, data: bytes) -> None:
        if self.closed:
            return
        raw = self.raw
        if raw is not None and not self.out and not self.sending:
            # Nothing is queued nor being sent, so these bytes are next on the wire: hand them
            # to the socket now (non-blocking) instead of a round later through the writer task.
            # A delivery released by an ACK then leaves within that ACK's own step (issue 18:
            # each task hop of the loop cost a consumer a whole round of other connections' work).
            # What the socket does not take, or an error, is left to the writer, as before.
            try:
                sent = raw.send(data)
            except OSError:
                sent = 0
            if sent:
                self.last_sent = time.monotonic()
                if sent == len(data):
                    return
                data = data[sent:]
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


def _is_promote(f: list) -> bool:
    """An ADMIN frame whose line is PROMOTE (roles.answer_promote parses the rest)."""
    line = f[2] if len(f) > 2 else None
    return type(line) is str and line.split()[:1] == ["PROMOTE"]


class Close(Exception):
    """End this connection after sending ``data`` (a CLOSING frame or admin text)."""

    def __init__(self, reason: str, data: bytes = b""):
        self.reason = reason
        self.data = data


class BinaryConnection:
    """The binary protocol on one accepted connection (after its first byte, NUL)."""

    def __init__(self, server, conn: Conn):
        self.server = server  # a broker.runtime.server.Server: its state, log and bounds
        self.conn = conn
        self.config = server.config
        self.state = server.state

    async def run(self, first: bytes) -> str:
        conn = self.conn
        cfg = self.config
        users = getattr(self.server, "users", None)
        hs = ServerHandshake(connection=conn.id, heartbeat=cfg.heartbeat, max_frame=cfg.max_frame,
                             server=f"brokerd {__version__}", authenticate=users.authenticate if users is not None else None)
        data = first
        try:
            while True:
                hs.receive_data(data)
                hello = hs.next_event()
                if hello is not None:
                    break
                with trio.move_on_at(conn.handshake_deadline) as cs:
                    data = await conn.stream.receive_some(RECEIVE_BYTES)
                if cs.cancelled_caught:
                    raise Close("handshake timeout", closing(
                        "HANDSHAKE_REQUIRED", "the preamble and HELLO must arrive within handshake_timeout"))
                if not data:
                    return "closed during the handshake"
        except HandshakeError as exc:
            raise Close(HANDSHAKE_REASONS.get(exc.code, "bad handshake"), closing(exc.code, exc.message)) from None
        except WireError as exc:  # a frame the codec refused, before HELLO was complete
            raise Close(f"protocol error {exc.code}", closing(exc.code, exc.message)) from None
        if users is not None:
            await self._login(hs, hello)
        # Silence is bounded by idle_timeout either way: a longer heartbeat is
        # cut to half of it (the reply says so and clients follow it).
        hello = hello._replace(heartbeat=min(hello.heartbeat, cfg.idle_timeout / 2))
        conn.name = hello.client
        conn.heartbeat = hello.heartbeat
        conn.version = hello.version
        if hello.version >= 2:  # confirms by range, deliveries batched per consumer (§5.47, §5.48)
            conn.encode = encode_batched
        self.state.connect(conn.id)
        self.state.name_connection(conn.id, conn.name)
        log.info("conn %d hello: client=%r heartbeat=%gs protocol=%d", conn.id, conn.name, conn.heartbeat, conn.version)
        follower = self.server.follower
        if follower is None:
            conn.queue_bytes(hs.accept(hello))
        else:  # a follower names its leader ("" when fenced: none), so a client goes there (§3.3, §6.4)
            welcome = {**hs.welcome_map(hello), "leader": follower.address or ""}
            conn.queue_bytes(encode_many([ok_frame(hello.rid, welcome)]))
        outcome: BaseException | str | None = None
        if type(conn.stream) is trio.SocketStream:  # plaintext: queue_bytes may send directly
            conn.raw = getattr(conn.stream.socket, "_sock", None)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._writer, conn)
            try:
                outcome = await self._read_loop(hs.reader, hs.pending_frames)
            except (Close, trio.BrokenResourceError, trio.ClosedResourceError, ConnectionError) as exc:
                outcome = exc  # re-raised below, outside the nursery, unwrapped
            finally:
                nursery.cancel_scope.cancel()
        if isinstance(outcome, BaseException):
            raise outcome
        return outcome

    async def _login(self, hs: ServerHandshake, hello) -> None:
        """Check HELLO's user and token (brokerd has users); AUTH_FAILED closes, after a delay.

        The scrypt check (~50 ms) runs in a thread so other connections go on meanwhile.  A
        failure waits what ``AuthThrottle`` says for this address (doubling on repeats), bounded
        by the connection's handshake deadline, so guessing tokens is slow and costs one
        connection, never the broker.
        """
        conn = self.conn
        user = self._certificate_user(hello)
        try:
            conn.user = user or await trio.to_thread.run_sync(hs.login, hello)
        except HandshakeError as exc:
            address = peer_host(conn.peer)
            delay = self.server.auth_throttle.failed(address, time.monotonic())
            name = (hello.extra or {}).get("user")
            audit.warning("auth failed: conn %d from %s user=%r (answer delayed %.1fs)", conn.id, conn.peer,
                          name[:64] if type(name) is str else None, delay)
            with trio.move_on_at(conn.handshake_deadline):
                await trio.sleep(delay)
            raise Close("authentication failed", closing(exc.code, exc.message)) from None
        self.server.auth_throttle.succeeded(peer_host(conn.peer))
        name = conn.user.name
        limit = self.config.max_connections_per_user
        held = self.server.user_connections
        if limit and held.get(name, 0) >= limit:
            log.warning("conn %d: user %r already holds %d connections (max_connections_per_user)", conn.id, name, limit)
            raise Close("too many connections for its user", closing(
                "TOO_MANY_CONNECTIONS", f"user {name!r} already holds {limit} connections "
                "(max_connections_per_user); close some or raise the limit"))
        held[name] = held.get(name, 0) + 1
        conn.counted_user = name
        log.info("conn %d logged in as %r%s", conn.id, name, " by its client certificate" if user else "")

    def _certificate_user(self, hello):
        """Mutual TLS: the user named by the verified client certificate's CN, when HELLO
        carries no token and such a user exists; else None (the token decides)."""
        subject = self.conn.tls_subject
        users = self.server.users
        if not subject or not users or (hello.extra or {}).get("token") is not None:
            return None
        for part in subject.split(","):
            key, _, value = part.partition("=")
            if key.strip() == "commonName" or key.strip() == "CN":
                return users.by_name.get(value.strip())
        return None

    async def _read_loop(self, reader: FrameReader, pending: list) -> str:
        conn = self.conn
        srv = self.server
        cfg = self.config
        state = self.state
        data = b""
        while True:
            try:
                frames = reader.frames()
                if pending:  # frames that came in the same read as HELLO
                    frames = pending + frames
                    pending = []
            except WireError as exc:
                raise Close(f"protocol error {exc.code}", closing(exc.code, exc.message)) from None
            partial = reader.buffered
            if partial != conn.partial:  # per batch, not per frame
                srv.input_grew(conn, partial)
                if conn.closed:  # evicted (INPUT_LIMIT): its replies could not be sent anyway
                    frames = []
            if frames:
                now = time.time()
                cid = conn.id
                alarm = srv.memory_alarm
                user = conn.user
                ranges = conn.version >= 2
                settling = False  # a run of RESULT_SETs: consumers refilled once after it
                try:
                    for f in frames:
                        op = f[0]
                        if settling and op != OP_RESULT_SET:
                            settling = False
                            state.release_settles(now)
                        if user is not None and self._refused(user, f):
                            continue
                        if op == OP_REPLICATE and srv.replication is not None:
                            # This connection is a follower's from now on (broker/runtime/replication.py).
                            srv.flush()
                            return await srv.replication.serve(conn, reader, f)
                        if op == OP_PROMOTE or (op == OP_ADMIN and _is_promote(f)):
                            # A change of role (broker/runtime/roles.py), answered when the EPOCH is on disk.
                            srv.nursery.start_soon(srv.roles.answer_promote, conn, f, cid)
                            continue
                        if srv.follower is not None and op not in FOLLOWER_OPS:
                            rid = f[1] if len(f) > 1 and type(f[1]) is int else 0
                            state.send_to(cid, error_frame(rid, NotLeader.code, srv.follower.refusal()))
                            continue
                        if srv.follower is not None and op in (OP_STATS, OP_ADMIN):
                            state.send_to(cid, self._follower_read(f, now))
                            continue
                        if srv.replica_alarm is not None and op in MEMORY_OPS and not settles(f):
                            rid = f[1] if len(f) > 1 and type(f[1]) is int else 0
                            state.send_to(cid, error_frame(rid, NotEnoughReplicas.code, srv.replica_alarm))
                            continue
                        if op in AUDIT_OPS:
                            self._audit(f)
                        if alarm is not None and op in MEMORY_OPS and not settles(f):
                            rid = f[1] if len(f) > 1 and type(f[1]) is int else 0
                            state.send_to(cid, error_frame(rid, MemoryLimit.code, alarm))
                        elif op in DURABLE_OPS:
                            # Its reply confirms a logged change: held until the log
                            # has it on disk (see Server.flush).  Replies are matched by
                            # request id, so they may overtake one another.
                            if op == OP_RESULT_SET and not settling:
                                settling = True
                                state.hold_settles()
                            reply = handle(state, cid, f, now)
                            if ranges and op in PUBLISH_OPS and reply[0] == OP_OK and confirmable(f, reply):
                                # §5.47: the client knows this answer; it goes out as part of a range
                                reply = [OP_CONFIRM_RANGE, reply[1], reply[1]]
                            held = srv.held.get(cid)
                            if held is None:
                                srv.held[cid] = [reply]
                            else:
                                held.append(reply)
                        elif op in HANDLERS:
                            mark = state.output_mark(cid)
                            reply = handle(state, cid, f, now)
                            # None: deferred (a parked RESULT_GET), the state replies later
                            if user is not None and op == OP_STATS:
                                reply = only_seen(user, reply)
                            elif user is not None and op == OP_TASK_INFO:
                                reply = waiting_seen(user, reply)
                            if reply is not None:
                                state.insert_reply(cid, mark, reply)
                        else:
                            reply = self._connection_op(conn, f, now)
                            if op == OP_BYE:
                                # Everything before BYE is answered first, confirms included.
                                srv.flush()
                                if srv.wal is not None:
                                    with trio.move_on_after(5.0):
                                        await srv.wal.wait_durable(state.last_lsn)
                                conn.queue_bytes(encode_many([reply]))
                                await self._drain(conn)
                                return "client said BYE"
                            if reply is not None:
                                if op == OP_ADMIN:  # may purge, pause...: confirmed like them
                                    srv.held.setdefault(cid, []).append(reply)
                                else:
                                    state.send_to(cid, reply)
                finally:
                    if settling:
                        state.release_settles(now)
                srv.flush()
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
                if conn.heartbeat == 0:
                    raise Close(
                        "idle timeout",
                        closing("IDLE_TIMEOUT", f"nothing received for {limit:g} seconds (idle_timeout; heartbeats are off)"),
                    )
                raise Close("heartbeat timeout", closing("HEARTBEAT_TIMEOUT", f"nothing received for {limit:g} seconds"))
            if not data:
                return "closed by peer"
            reader.feed(data)

    def _follower_read(self, f: list, now: float) -> list:
        """STATS or a read-only ADMIN line on a follower, answered from its replayed log."""
        srv = self.server
        rid = f[1] if len(f) > 1 and type(f[1]) is int else 0
        view = srv.follower.view(now)
        if f[0] == OP_STATS:
            reply = handle(view, self.conn.id, f, now)
            return only_seen(self.conn.user, reply) if self.conn.user is not None else reply
        line = f[2] if len(f) > 2 else None
        if type(line) is not str:
            return error_frame(rid, "BAD_REQUEST", "ADMIN field 2 must be one admin command line (text)")
        if not follower_may_read(line):
            return error_frame(rid, NotLeader.code, srv.follower.refusal())
        return ok_frame(rid, admin.execute(view, line, now, srv.admin_extra(), user=self.conn.user))

    def _refused(self, user, f: list) -> bool:
        """Whether ``user`` lacks a grant ``f`` needs; if so it is answered ACCESS_REFUSED here
        and never reaches a handler, so nothing changes (broker.auth.check)."""
        refusal = auth.check(user, f)
        if refusal is None:
            if f[0] == OP_STATS and len(f) > 2 and type(f[2]) is str and not user.sees(f[2]):
                refusal = auth.Refusal(user.name, "publish, consume or manage", f[2])
            else:
                return False
        op = f[0]
        rid = f[1] if len(f) > 1 and type(f[1]) is int else 0
        name = CLIENT_OPS.get(op, f"send op {op!r}") if type(op) is int else f"send op {op!r}"
        self.state.send_to(self.conn.id, error_frame(rid, "ACCESS_REFUSED", refusal.message(name)))
        if op in AUDIT_OPS:
            audit.warning("refused %s: user=%r conn %d from %s", name, user.name, self.conn.id, self.conn.peer)
        return True

    def _audit(self, f: list) -> None:
        conn = self.conn
        op = f[0]
        what = f[2] if len(f) > 2 and type(f[2]) in (str, int) else ""
        audit.info("%s %s: user=%r conn %d from %s", CLIENT_OPS.get(op, op), str(what)[:200],
                   conn.user.name if conn.user is not None else None, conn.id, conn.peer)

    def _silence_limit(self, conn: Conn) -> float:
        if not conn.name:  # not handshaken: one deadline for preamble and HELLO together
            return max(0.0, conn.handshake_deadline - trio.current_time())
        if conn.heartbeat > 0:
            return 2 * conn.heartbeat
        return self.config.idle_timeout  # heartbeats off: silence is still bounded

    async def _drain(self, conn: Conn) -> None:
        with trio.move_on_after(1.0):
            while conn.out or conn.sending:  # (the writer clears out before its send_all ends)
                await trio.sleep(0)

    def _connection_op(self, conn: Conn, f: list, now: float):
        op = f[0]
        if op == OP_HEARTBEAT:
            return None
        rid = f[1] if len(f) > 1 and type(f[1]) is int else 0
        if op == OP_HELLO:
            return error_frame(rid, "BAD_REQUEST", "HELLO was already sent on this connection")
        if op == OP_BYE:
            return ok_frame(rid)
        if op == OP_ADMIN:
            line = f[2] if len(f) > 2 else None
            if type(line) is not str:
                return error_frame(rid, "BAD_REQUEST", "ADMIN field 2 must be one admin command line (text)")
            return ok_frame(rid, admin.execute(self.state, line, now, self.server.admin_extra(), user=conn.user))
        return error_frame(rid, UnknownOp.code, f"unknown op code {op!r}; see protocol.md §5 for the list")

    async def _writer(self, conn: Conn) -> None:
        stream = conn.stream
        hb_frame = encode_many([HEARTBEAT_FRAME])
        while not conn.closed:
            if not conn.out:
                conn.wake = trio.Event()
                # HEARTBEAT once the connection has been quiet for an interval (§6.1), counted
                # from the last bytes sent by this task or directly by queue_bytes
                wait = conn.last_sent + conn.heartbeat - time.monotonic() if conn.heartbeat > 0 else math.inf
                with trio.move_on_after(max(wait, 0.0)) as cs:
                    await conn.wake.wait()
                if cs.cancelled_caught and not conn.out:
                    if time.monotonic() - conn.last_sent < conn.heartbeat:
                        continue  # bytes went out directly meanwhile: not quiet yet
                    conn.out.append(hb_frame)
                    conn.out_bytes += len(hb_frame)
                if conn.closed:
                    return
            data = b"".join(conn.out) if len(conn.out) > 1 else conn.out[0]
            conn.out.clear()
            conn.sending = True  # (queue_bytes must not send around these bytes)
            try:
                await stream.send_all(data)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                conn.closed = True
                if conn.cancel is not None:
                    conn.cancel.cancel()
                return
            finally:
                conn.sending = False
            conn.last_sent = time.monotonic()
            conn.out_bytes -= len(data)
            if conn.out_bytes <= self.config.output_buffer:
                conn.drained.set()


def confirmable(f: list, reply: list) -> bool:
    """Whether a publish's OK tells the client nothing it does not know: a PUBLISH stored under
    the id it gave (not a unique-key map), a PUBLISH_BATCH whose every item was (result null)."""
    result = reply[2]
    if f[0] == OP_PUBLISH:
        return type(result) is str and len(f) > 4 and result == f[4]
    return result is None


def settles(f: list) -> bool:
    """A RESULT_SET that also settles a delivery (option "tag"): allowed past max_memory."""
    return f[0] == OP_RESULT_SET and len(f) > 6 and type(f[6]) is dict and "tag" in f[6]


def peer_host(peer: str) -> str:
    """The address part of ``host:port`` (what AuthThrottle counts failures by)."""
    return peer.rpartition(":")[0] or peer


def only_seen(user, reply: list) -> list:
    """A broker-wide STATS reply with only the queues ``user`` has a queue grant on."""
    if reply[0] == OP_OK and len(reply) > 2 and type(reply[2]) is dict and type(reply[2].get("queues")) is dict:
        result = dict(reply[2])
        result["queues"] = {name: s for name, s in result["queues"].items() if user.sees(name)}
        return [reply[0], reply[1], result]
    return reply


def waiting_seen(user, reply: list) -> list:
    """A TASK_INFO reply without ``waiting`` when it names a queue ``user`` has no grant on (and
    null when that was all brokerd knew of the task): a queue's name is the user's to see."""
    info = reply[2] if reply[0] == OP_OK and len(reply) > 2 else None
    w = info.get("waiting") if type(info) is dict else None
    if type(w) is not dict or user.sees(w.get("queue")):
        return reply
    if not info.get("events") and info.get("result_state") is None:
        return [reply[0], reply[1], None]
    return [reply[0], reply[1], {**info, "waiting": None}]


def closing(code: str, message: str) -> bytes:
    return encode_many([closing_frame(code, message)])
