"""The brokerd wire codec, shared by the broker and every client.

Sans-I/O in the h11 manner: bytes go in with ``receive_data``, decoded frames
come out of ``next_frame``; frames go in with ``encode``, bytes come out.  No
sockets, no trio, no clock here, so the broker and the clients can never
disagree about a byte.  ``protocol.md`` is the contract; each block below
quotes the section it implements.

Imports nothing but cbor2 and the standard library, so ``import client.wire``
is cheap for a web process that only publishes.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import NamedTuple

import cbor2

# --- protocol.md §2 "Connection and first byte" --------------------------------
# A binary client opens with these 4 bytes.  The first byte is NUL, which no
# admin text line can start with, so the server tells the two modes apart by
# the first byte it receives (RESP-style sniffing).
PREAMBLE = b"\x00BRK"
PROTOCOL_VERSION = 1  # what a HELLO says when it names one version (Hello's default)
# --- protocol.md §10 "Versioning": the versions this codec speaks, oldest first.  A HELLO names
# one version (an int) or every version the client speaks (a list); the server picks the highest
# it shares and says which in its reply.  Version 2 adds the server frames CONFIRM_RANGE and
# DELIVER_BATCH (§5.47, §5.48), sent only on connections that picked it.
PROTOCOL_VERSIONS = (1, 2)
# The most versions a HELLO may list: a bound on the work of reading it (the protocol has two).
MAX_HELLO_VERSIONS = 16

# --- protocol.md §3 "Framing" --------------------------------------------------
# frame = length:u32 big-endian ‖ CBOR array
HEADER = struct.Struct(">I")
HEADER_SIZE = HEADER.size
KiB = 1024
MiB = 1024 * KiB
# The default largest frame, body included.  Large enough for any sane task
# payload (Celery's own default message limit on SQS is 256 KiB; RabbitMQ's
# default frame_max is 128 KiB and it splits bodies); small enough that one
# bad client cannot make the broker allocate gigabytes.  Configurable.
DEFAULT_MAX_FRAME = 16 * MiB

# --- protocol.md §5 "Operations": client → server op codes ----------------------
OP_HELLO = 1
OP_PUBLISH = 2
OP_CONSUME = 3
OP_CANCEL = 4
OP_ACK = 5
OP_NACK = 6
OP_TOUCH = 7
OP_DECLARE = 8
OP_DELETE = 9
OP_STATS = 10
OP_PURGE = 11
OP_PAUSE = 12
OP_RESUME = 13
OP_PING = 14
OP_HEARTBEAT = 15
OP_ADMIN = 16
OP_BYE = 17
OP_RESULT_SET = 18
OP_RESULT_GET = 19
OP_RESULT_FORGET = 20
OP_SCHEDULE_PUT = 21
OP_SCHEDULE_REMOVE = 22
OP_SCHEDULE_LIST = 23
OP_SCHEDULE_PAUSE = 24
OP_REVOKE = 25
OP_CHORD = 26
# observability and remote control (protocol.md §5.29-5.35)
OP_EMIT_EVENTS = 27  # a worker's batch of events: [27, rid, hostname, [event, ...]]
OP_SUBSCRIBE = 28  # start or stop the live event stream: [28, rid, on, replay]
OP_TASK_INFO = 29  # a task's history and result: [29, rid, task_id]
OP_WORKERS = 30  # the worker registry: [30, rid]
OP_CONTROL_REQUEST = 31  # ask the workers something: [31, rid, command, args, {timeout, destination}]
OP_CONTROL_REPLY = 32  # a worker's answer to a CONTROL with a reply_id: [32, rid, reply_id, reply]
# exchanges: one publish copied to every bound queue (protocol.md §5.36-5.38)
OP_BIND = 33  # [33, rid, exchange, queue, key, {type, temporary}|null]
OP_UNBIND = 34  # [34, rid, exchange, queue, key]
OP_EMIT = 35  # [35, rid, exchange, routing_key, body, id|null, priority, options|null]
OP_RATE_LIMIT = 40  # set a task's or queue's rate live: [40, rid, name, limit, kind]
# replication (protocol.md §5.40-5.41, §5.45): a follower asks for the log from an lsn, then reports its durable lsn
OP_REPLICATE = 41  # [41, rid, from_lsn, epoch?]
OP_REPLICA_ACK = 42  # [42, rid, durable_lsn]; never answered
# adaptive prefetch and recall (protocol.md §5.42-5.44)
OP_CREDIT = 43  # set a consumer's prefetch live: [43, rid, consumer, prefetch]
OP_RELEASE = 44  # give back deliveries not started, not counted as attempts: [44, rid, [tag, ...]]
OP_PROMOTE = 45  # a follower becomes the leader, epoch + 1 (protocol.md §5.45): [45, rid, reason?]

# server → client
OP_OK = 64
OP_ERROR = 65
OP_DELIVER = 66
OP_CLOSING = 67  # the server is about to close the connection: [67, code, message]
OP_CONTROL = 68  # a broadcast to consumers, e.g. [68, {"revoke": [ids], "terminate": true}]
OP_EVENT = 69  # events for a subscriber: [69, [event, ...], dropped]
OP_RECORDS = 70  # log records for a follower: [70, leader_lsn, [[lsn, type, payload], ...], epoch, kept_from?]
OP_RECALL = 71  # to a consumer that asked for it: release up to n not-started deliveries of queue: [71, consumer, n, queue]

CLIENT_OPS = {
    OP_HELLO: "HELLO",
    OP_PUBLISH: "PUBLISH",
    OP_CONSUME: "CONSUME",
    OP_CANCEL: "CANCEL",
    OP_ACK: "ACK",
    OP_NACK: "NACK",
    OP_TOUCH: "TOUCH",
    OP_DECLARE: "DECLARE",
    OP_DELETE: "DELETE",
    OP_STATS: "STATS",
    OP_PURGE: "PURGE",
    OP_PAUSE: "PAUSE",
    OP_RESUME: "RESUME",
    OP_PING: "PING",
    OP_HEARTBEAT: "HEARTBEAT",
    OP_ADMIN: "ADMIN",
    OP_BYE: "BYE",
    OP_RESULT_SET: "RESULT_SET",
    OP_RESULT_GET: "RESULT_GET",
    OP_RESULT_FORGET: "RESULT_FORGET",
    OP_SCHEDULE_PUT: "SCHEDULE_PUT",
    OP_SCHEDULE_REMOVE: "SCHEDULE_REMOVE",
    OP_SCHEDULE_LIST: "SCHEDULE_LIST",
    OP_SCHEDULE_PAUSE: "SCHEDULE_PAUSE",
    OP_REVOKE: "REVOKE",
    OP_CHORD: "CHORD",
    OP_EMIT_EVENTS: "EMIT_EVENTS",
    OP_SUBSCRIBE: "SUBSCRIBE",
    OP_TASK_INFO: "TASK_INFO",
    OP_WORKERS: "WORKERS",
    OP_CONTROL_REQUEST: "CONTROL_REQUEST",
    OP_CONTROL_REPLY: "CONTROL_REPLY",
    OP_BIND: "BIND",
    OP_UNBIND: "UNBIND",
    OP_EMIT: "EMIT",
    OP_RATE_LIMIT: "RATE_LIMIT",
    OP_REPLICATE: "REPLICATE",
    OP_REPLICA_ACK: "REPLICA_ACK",
    OP_CREDIT: "CREDIT",
    OP_RELEASE: "RELEASE",
    OP_PROMOTE: "PROMOTE",
}
SERVER_OPS = {OP_OK: "OK", OP_ERROR: "ERROR", OP_DELIVER: "DELIVER", OP_CLOSING: "CLOSING", OP_CONTROL: "CONTROL",
              OP_EVENT: "EVENT", OP_RECORDS: "RECORDS", OP_RECALL: "RECALL"}

# --- batched frames (protocol.md §5.46-5.48, issue 18): fewer frames per message ------------------
# PUBLISH_BATCH is an op any connection may send (an old server answers UNKNOWN_OP: that is the
# probe); CONFIRM_RANGE and DELIVER_BATCH are server frames sent only on a version-2 connection.
OP_PUBLISH_BATCH = 46  # many publishes in one frame: [46, rid, [[queue, body, id, priority, options], ...]]
OP_CONFIRM_RANGE = 72  # [72, first_rid, last_rid]: every publish request in the range not answered otherwise is confirmed
OP_DELIVER_BATCH = 73  # [73, consumer, [[tag, queue, id, body, priority, attempts, headers], ...]]
CLIENT_OPS[OP_PUBLISH_BATCH] = "PUBLISH_BATCH"
# a waiting chord grows (protocol.md §5.49): Celery's add_to_chord
OP_CHORD_ADD = 47  # [47, rid, chord_id, [task_id, ...]]
CLIENT_OPS[OP_CHORD_ADD] = "CHORD_ADD"
SERVER_OPS[OP_CONFIRM_RANGE] = "CONFIRM_RANGE"
SERVER_OPS[OP_DELIVER_BATCH] = "DELIVER_BATCH"
# The most items one PUBLISH_BATCH may carry.  max_frame bounds its bytes, this bounds the work one
# frame costs the event loop (~5 us a publish: about 50 ms), so one client's batch never holds the
# others up for long.  The SDK's batches close at FLUSH_BYTES (32 KiB), ~250 small messages.
MAX_PUBLISH_BATCH = 10_000

# --- protocol.md §4 "Errors" ----------------------------------------------------
# code → (meaning, does the connection stay open)
ERROR_CODES: dict[str, tuple[str, bool]] = {
    "BAD_FRAME": ("the bytes are not a valid frame (bad CBOR, not an array, bad length)", False),
    "FRAME_TOO_LARGE": ("a frame is larger than the server's max_frame", False),
    "BAD_PREAMBLE": ("the connection did not open with the 4-byte preamble", False),
    "HANDSHAKE_REQUIRED": ("a command was sent before HELLO", False),
    "UNSUPPORTED_VERSION": ("the server does not speak the requested protocol version", False),
    "UNKNOWN_OP": ("the op code is not one the server knows", True),
    "BAD_REQUEST": ("a field is missing or has the wrong type or value", True),
    "NOT_FOUND": ("the named queue or consumer does not exist", True),
    "PRECONDITION_FAILED": ("the queue exists with other options", True),
    "QUEUE_FULL": ("the queue is at max_length with overflow=reject", True),
    "STALE_DELIVERY": ("the delivery tag is no longer in flight on this connection", True),
    "MESSAGE_TOO_LARGE": ("the body is larger than the server allows", True),
    "LOG_FAILED": ("the write-ahead log cannot write; nothing new is accepted", True),
    "SLOW_CONSUMER": ("the connection's output buffer overflowed; it is closed", False),
    "HEARTBEAT_TIMEOUT": ("nothing was received for two heartbeat intervals", False),
    "IDLE_TIMEOUT": ("nothing was received for idle_timeout (admin text, or heartbeats off)", False),
    "TOO_MANY_CONNECTIONS": ("the server is at max_connections; the new connection is closed", False),
    "INPUT_LIMIT": ("partial frames across connections passed max_input_buffer; the largest is closed", False),
    "MEMORY_LIMIT": ("the broker's memory is past max_memory; the publish was not stored", True),
    "SHUTTING_DOWN": ("the server is stopping", False),
    "TLS_REQUIRED": ("the server takes only TLS on this port (--tls-required); plaintext is closed", False),
    "UNKNOWN_COMMAND": ("an admin text line names no known command (send HELP)", True),
    "AUTH_FAILED": ("brokerd has users and the user name or token is missing or wrong; the connection is closed", False),
    "AUTH_REQUIRED": ("an admin text connection must send AUTH <user> <token> before this command", True),
    "ACCESS_REFUSED": ("the user lacks the grant this operation needs on this queue; nothing changed", True),
    "NOT_LEADER": ("this brokerd is a follower and takes no writes; the message names the leader's address", True),
    "NOT_ENOUGH_REPLICAS": ("fewer followers than --sync-replicas are in sync; the write was not confirmed", True),
    "STALE_EPOCH": ("replication between brokerds of different leadership terms: the older one was deposed", False),
    "INTERNAL": ("a bug in the server; the connection is closed, nothing stored is lost", False),
}


class WireError(Exception):
    """The peer sent bytes that are not a valid frame.  Carries a wire error code."""

    def __init__(self, code: str, message: str):
        super().__init__(message)
        self.code = code
        self.message = message


# --- encoding -------------------------------------------------------------------
_dumps = cbor2.dumps
_loads = cbor2.loads
_pack = HEADER.pack


def encode(frame: list | tuple) -> bytes:
    """One frame: length prefix plus the CBOR array."""
    payload = _dumps(frame)
    return _pack(len(payload)) + payload


def encode_many(frames) -> bytes:
    """Several frames joined, for one write per batch."""
    out = []
    for frame in frames:
        payload = _dumps(frame)
        out.append(_pack(len(payload)))
        out.append(payload)
    return b"".join(out)


def encode_batched(frames: list) -> bytes:
    """A version-2 connection's frames (the server side) → bytes, in fewer frames (§5.47, §5.48).

    Held publish confirms come in as one-rid CONFIRM_RANGE markers ``[72, rid, rid]``, in request
    order; a run of them with rising request ids and nothing else between is joined into one
    CONFIRM_RANGE (an ERROR for a publish between them ends the run, so it always comes before
    any range that spans its rid).  A run of DELIVERs to one consumer becomes one DELIVER_BATCH,
    in the same order.  Every other frame is encoded as ``encode_many`` does.
    """
    out = []
    i = 0
    n = len(frames)
    while i < n:
        f = frames[i]
        op = f[0]
        j = i + 1
        if op == OP_CONFIRM_RANGE:
            last = f[2]
            while j < n and (g := frames[j])[0] == OP_CONFIRM_RANGE and g[1] > last:
                last = g[2]
                j += 1
            if j > i + 1:
                f = [OP_CONFIRM_RANGE, f[1], last]
        elif op == OP_DELIVER:
            consumer = f[1]
            while j < n and (g := frames[j])[0] == OP_DELIVER and g[1] == consumer:
                j += 1
            if j > i + 1:
                f = [OP_DELIVER_BATCH, consumer, [g[2:] for g in frames[i:j]]]
        payload = _dumps(f)
        out.append(_pack(len(payload)))
        out.append(payload)
        i = j
    return b"".join(out)


# --- decoding ---------------------------------------------------------------
# protocol.md §3 "Framing": a frame is a tree of values.  Every value the broker
# accepts must encode back to CBOR unchanged, because it goes into the log,
# into deliveries and into other clients' replies.  Three tags cannot promise
# that, so the decoder refuses them (BAD_FRAME) instead of building the value:
# value sharing (28 shareable, 29 shared reference) can make a cycle, which no
# encoder without value sharing can write back (one 35-byte frame once broke
# the log that way), and a MIME message (36) decodes to an object cbor2 cannot
# encode.  Every other tag either decodes to a value that encodes back, or is
# kept as an opaque CBORTag.
_REFUSED_TAGS = {
    28: "value-sharing tag 28 (shareable)",
    29: "value-sharing tag 29 (shared reference)",
    36: "MIME message tag 36",
}


def _refuser(what: str):
    def refuse(*_args):
        raise cbor2.CBORDecodeError(f"{what} is not accepted: a frame must be a tree of plain values")

    return refuse


_DECODE_OPTIONS = {"semantic_decoders": {tag: _refuser(what) for tag, what in _REFUSED_TAGS.items()}}


class RawFrame(bytes):
    """The bytes a frame was decoded from (``FrameReader(keep_raw=True)``): a type of its own,
    so that no value a client sends can pass for it."""

    __slots__ = ()


class FrameReader:
    """Accumulates bytes and yields whole frames (as Python lists).

    ``feed(data)`` then ``frames()``; a malformed or oversized frame raises
    ``WireError``.  After an error the reader is poisoned: the stream cannot
    be resynchronised, so the connection must close.

    ``strict`` (the default, and what the broker uses) refuses the tags that
    cannot be written back (``_REFUSED_TAGS``), at ~0.6 us per frame; a client
    reading brokerd's own frames, which never carry them, passes
    ``strict=False``.

    ``keep_raw`` (the broker's): a PUBLISH_BATCH frame comes with the bytes it was decoded
    from appended as its last item, a ``RawFrame`` (no CBOR value decodes to one), so the
    broker can log them as they came (broker/state/log_records.py PUBLISH_FRAME).
    """

    __slots__ = ("_buf", "_pos", "max_frame", "_options", "_keep_raw")

    def __init__(self, max_frame: int = DEFAULT_MAX_FRAME, *, strict: bool = True, keep_raw: bool = False):
        self._buf = bytearray()
        self._pos = 0
        self.max_frame = max_frame
        self._options = _DECODE_OPTIONS if strict else {}
        self._keep_raw = keep_raw

    def feed(self, data: bytes) -> None:
        if self._pos:
            # Drop consumed bytes before growing; amortised O(n).
            del self._buf[: self._pos]
            self._pos = 0
        self._buf += data

    @property
    def buffered(self) -> int:
        return len(self._buf) - self._pos

    def frames(self) -> list:
        """Every complete frame now buffered, decoded, in order."""
        buf = self._buf
        pos = self._pos
        end = len(buf)
        out = []
        max_frame = self.max_frame
        options = self._options
        keep_raw = self._keep_raw
        mv = memoryview(buf)
        try:
            while end - pos >= HEADER_SIZE:
                (n,) = HEADER.unpack_from(buf, pos)
                if n > max_frame:
                    raise WireError(
                        "FRAME_TOO_LARGE",
                        f"frame of {n} bytes is larger than the limit of {max_frame} bytes",
                    )
                if end - pos - HEADER_SIZE < n:
                    break
                start = pos + HEADER_SIZE
                pos = start + n
                f = decode_payload(mv[start:pos], options)
                if keep_raw and f[0] == OP_PUBLISH_BATCH:
                    f.append(RawFrame(mv[start:pos]))
                out.append(f)
        finally:
            mv.release()
            self._pos = pos
        return out


def decode_payload(payload, options: dict = _DECODE_OPTIONS) -> list:
    """CBOR bytes → frame list, or WireError(BAD_FRAME)."""
    if len(payload) == 0:
        raise WireError("BAD_FRAME", "empty frame: a frame holds one CBOR array")
    try:
        value = _loads(payload, **options)
    except Exception as exc:  # cbor2 raises several types on garbage
        raise WireError("BAD_FRAME", f"frame is not valid CBOR: {exc}") from None
    if type(value) is not list or not value or type(value[0]) is not int:
        raise WireError(
            "BAD_FRAME", "a frame must be a CBOR array whose first item is an integer op code"
        )
    return value


# --- typed views, for clients and tests ----------------------------------------
@dataclass(frozen=True, slots=True)
class Delivery:
    """protocol.md §5.4 DELIVER: [66, consumer, tag, queue, id, body, priority, attempts, headers]"""

    consumer: int
    tag: int
    queue: str
    id: str
    body: bytes
    priority: int
    attempts: int
    headers: dict | None

    @property
    def redelivered(self) -> bool:
        return self.attempts > 1

    @classmethod
    def from_frame(cls, f: list) -> "Delivery":
        return cls(f[1], f[2], f[3], f[4], f[5], f[6], f[7], f[8] if len(f) > 8 else None)


def deliver_frame(consumer, tag, queue, msg_id, body, priority, attempts, headers) -> list:
    return [OP_DELIVER, consumer, tag, queue, msg_id, body, priority, attempts, headers]


def ok_frame(rid: int, result=None) -> list:
    return [OP_OK, rid, result]


def error_frame(rid: int, code: str, message: str) -> list:
    return [OP_ERROR, rid, code, message]


def closing_frame(code: str, message: str) -> list:
    return [OP_CLOSING, code, message]


# --- request frames: one constructor per op (protocol.md §5) ------------------------
# Every client request is ``[op, rid, field 2, field 3, ...]`` (§3.2).  The
# verbs of ``client.verbs`` name their op and fields; these helpers are the
# one place that lays the fields out, so a frame has one definition to find.
HEARTBEAT_FRAME = [OP_HEARTBEAT]  # §6.1: no request id, no reply


def request_frame(op: int, rid: int, fields) -> list:
    """``[op, rid, *fields]``: any request whose fields are already in wire order."""
    return [op, rid, *fields]


def publish_frame(rid: int, queue: str, body: bytes, msg_id, priority: int, options) -> list:
    """§5.2 PUBLISH: ``[2, rid, queue, body, id|null, priority, options|null]``."""
    return [OP_PUBLISH, rid, queue, body, msg_id, priority, options]


def consume_frame(rid: int, queues: list, prefetch: int) -> list:
    """§5.3 CONSUME: ``[3, rid, [queue, ...], prefetch]``."""
    return [OP_CONSUME, rid, queues, prefetch]


def cancel_frame(rid: int, consumer_tag: int) -> list:
    """§5.6 CANCEL: ``[4, rid, consumer_tag]``."""
    return [OP_CANCEL, rid, consumer_tag]


def ack_frame(rid: int, tags) -> list:
    """§5.5 ACK: ``[5, rid, tag | [tag, ...]]``."""
    return [OP_ACK, rid, tags]


def nack_frame(rid: int, tag: int, requeue: bool, delay, headers=None) -> list:
    """§5.5 NACK: ``[6, rid, tag, requeue, delay|null(, headers)]``."""
    if headers is None:
        return [OP_NACK, rid, tag, requeue, delay]
    return [OP_NACK, rid, tag, requeue, delay, headers]


def touch_frame(rid: int, tag: int) -> list:
    """§5.7 TOUCH: ``[7, rid, tag]``."""
    return [OP_TOUCH, rid, tag]


def result_set_frame(rid: int, task_id, state, value, meta, options) -> list:
    """§5.19 RESULT_SET: ``[18, rid, task_id, state, value, meta, options|null]``."""
    return [OP_RESULT_SET, rid, task_id, state, value, meta, options]


def bye_frame(rid: int) -> list:
    """§5.17 BYE: ``[17, rid]``."""
    return [OP_BYE, rid]


# --- server frames: one typed view per op -------------------------------------------
# The client's hot paths (OK confirms, DELIVER) index the list directly; these
# views are for the rarer frames, for tests and for tools.  NamedTuples, not
# dataclasses: immutable all the same, and ~20x cheaper to define at import.  A missing trailing
# field reads as its "when omitted" value, as the session always did.
class Ok(NamedTuple):
    """§3.2 OK: ``[64, rid, result]``."""

    rid: int | None
    result: object = None

    @classmethod
    def from_frame(cls, f: list) -> "Ok":
        return cls(f[1] if len(f) > 1 else None, f[2] if len(f) > 2 else None)


class Error(NamedTuple):
    """§4 ERROR: ``[65, rid, code, message]``; rid 0 when the request id was unreadable."""

    rid: int | None
    code: str | None
    message: str

    @classmethod
    def from_frame(cls, f: list) -> "Error":
        return cls(f[1] if len(f) > 1 else None, f[2] if len(f) > 2 else None, f[3] if len(f) > 3 else "")


class Closing(NamedTuple):
    """§4 CLOSING: ``[67, code, message]``: the server closes the connection after it."""

    code: str | None
    message: str

    @classmethod
    def from_frame(cls, f: list) -> "Closing":
        return cls(f[1] if len(f) > 1 else None, f[2] if len(f) > 2 else "")


class Control(NamedTuple):
    """§5.33 CONTROL: ``[68, payload]``, a broadcast to consumers (revoke+terminate, commands)."""

    payload: object

    @classmethod
    def from_frame(cls, f: list) -> "Control":
        return cls(f[1] if len(f) > 1 else None)


class Recall(NamedTuple):
    """§5.44 RECALL: ``[71, consumer, n, queue]``: release up to ``n`` deliveries of ``queue`` not started."""

    consumer: int
    n: int
    queue: str

    @classmethod
    def from_frame(cls, f: list) -> "Recall":
        return cls(f[1] if len(f) > 1 else None, f[2] if len(f) > 2 else 0, f[3] if len(f) > 3 else None)


class ConfirmRange(NamedTuple):
    """§5.47 CONFIRM_RANGE: ``[72, first_rid, last_rid]``, version 2 only."""

    first: int
    last: int

    @classmethod
    def from_frame(cls, f: list) -> "ConfirmRange":
        first = f[1] if len(f) > 1 else None
        last = f[2] if len(f) > 2 else None
        if type(first) is not int or type(last) is not int:
            raise WireError("BAD_FRAME", "CONFIRM_RANGE must carry two request ids")
        return cls(first, last)


def deliveries_of_batch(f: list) -> list:
    """§5.48 DELIVER_BATCH ``[73, consumer, [[tag, queue, id, body, priority, attempts, headers], ...]]``
    as the DELIVER frames it stands for, in order; WireError(BAD_FRAME) when it is malformed."""
    items = f[2] if len(f) > 2 else None
    if type(items) is not list:
        raise WireError("BAD_FRAME", "DELIVER_BATCH field 2 must be a list of deliveries")
    consumer = f[1]
    out = []
    for item in items:
        if type(item) is not list or len(item) < 6:
            raise WireError("BAD_FRAME", "a DELIVER_BATCH item must be a DELIVER's fields 2-8")
        out.append([OP_DELIVER, consumer, *item])
    return out


def recall_frame(consumer: int, n: int, queue: str) -> list:
    """§5.44 RECALL, server to client."""
    return [OP_RECALL, consumer, n, queue]


class Event(NamedTuple):
    """§5.30 EVENT: ``[69, [event, ...], dropped]`` to a subscriber."""

    events: list
    dropped: int = 0

    @classmethod
    def from_frame(cls, f: list) -> "Event":
        return cls(f[1] if len(f) > 1 else [], f[2] if len(f) > 2 else 0)


def records_frame(leader_lsn: int, records, epoch: int = 0, kept_from: int | None = None) -> list:
    """§5.40: log records for a follower, ``[[lsn, type, payload], ...]`` oldest first, the
    sender's epoch (its leadership term; a follower refuses an older one) and, when given, the
    first lsn the sender's log still keeps (a follower fsynced through ``leader_lsn`` may delete
    its segments wholly before it: the sender's compaction rewrote what they held forward)."""
    frame = [OP_RECORDS, leader_lsn, [list(r) for r in records], epoch]
    if kept_from is not None:
        frame.append(kept_from)
    return frame


def control_frame(payload) -> list:
    return [OP_CONTROL, payload]


def event_frame(events: list, dropped: int = 0) -> list:
    return [OP_EVENT, events, dropped]


# --- protocol.md §2 and §5.1: the handshake, without I/O ----------------------------
# connect ──▶ preamble ──▶ AWAITING HELLO ──HELLO ok──▶ OPEN
#                │               │ any other frame: CLOSING HANDSHAKE_REQUIRED
#                │ not \0BRK     │ bad HELLO map: CLOSING BAD_REQUEST
#                ▼               │ wrong version: CLOSING UNSUPPORTED_VERSION
#        CLOSING BAD_PREAMBLE
# Both ends live here, so client and server share one reading of every HELLO
# key.  HELLO options are a map and unknown keys are carried in
# ``Hello.extra`` untouched: room for credentials (an ``auth`` key, say)
# without a new frame or a new protocol version.  Timeouts are the caller's
# business (no clock here): the server closes after ``handshake_timeout``.


class HandshakeError(WireError):
    """The handshake failed; ``code`` is the CLOSING code (§4) and the connection ends."""


def pick_version(asked, speaks: tuple = PROTOCOL_VERSIONS) -> int:
    """§5.1/§10: HELLO's ``version`` (one int, or a list of the versions the client speaks) →
    the highest version both speak; ``HandshakeError(UNSUPPORTED_VERSION)`` when there is none."""
    if type(asked) is int:
        offered = (asked,)
    elif type(asked) is list and 0 < len(asked) <= MAX_HELLO_VERSIONS and all(type(v) is int for v in asked):
        offered = asked
    else:
        offered = ()
    shared = [v for v in offered if v in speaks]
    if shared:
        return max(shared)
    shown = repr(asked) if type(asked) in (int, list) and len(repr(asked)) <= 80 else f"a {type(asked).__name__}"
    names = ", ".join(str(v) for v in speaks)
    raise HandshakeError(
        "UNSUPPORTED_VERSION",
        f"this server speaks protocol versions {names}, not {shown}: send 'version' as one of them, "
        "or as a list of the versions the client speaks",
    )


class Hello(NamedTuple):
    """§5.1 HELLO options (field 2).  ``extra``: any other keys, sent and received as they are."""

    version: int = PROTOCOL_VERSION
    client: str | None = None
    heartbeat: float | None = None
    extra: dict | None = None
    rid: int = 1

    def to_map(self) -> dict:
        m = {"version": self.version, "client": self.client, "heartbeat": self.heartbeat}
        if self.extra:
            m.update(self.extra)
        return m

    def frame(self) -> list:
        return [OP_HELLO, self.rid, self.to_map()]


_HELLO_KEYS = ("version", "client", "heartbeat")


class Welcome(NamedTuple):
    """§5.1 HELLO reply (OK result): what the server agreed to.

    ``heartbeat`` and ``max_frame`` are None when the reply leaves them out
    (or sends nonsense); the client then keeps its own value.  ``info`` is the
    whole reply map as received.
    """

    server: str | None
    version: int | None
    heartbeat: float | None
    max_frame: int | None
    connection: int | None
    info: dict

    @classmethod
    def from_result(cls, result) -> "Welcome":
        info = result if isinstance(result, dict) else {}
        hb = info.get("heartbeat")
        mf = info.get("max_frame")
        return cls(
            info.get("server"),
            info.get("version"),
            float(hb) if type(hb) in (int, float) and hb >= 0 else None,
            mf if type(mf) is int and mf > 0 else None,
            info.get("connection"),
            info,
        )


class ClientHandshake:
    """The client's side: ``initiate()`` gives the preamble and HELLO as bytes;
    ``receive(frame)`` reads the server's answer and returns a ``Welcome`` or
    raises ``HandshakeError`` (an ERROR or CLOSING instead of OK)."""

    def __init__(self, hello: Hello):
        self.hello = hello
        self.welcome: Welcome | None = None

    def initiate(self) -> bytes:
        return PREAMBLE + encode(self.hello.frame())

    def receive(self, frame: list) -> Welcome:
        op = frame[0]
        if op == OP_OK and len(frame) > 1 and frame[1] == self.hello.rid:
            self.welcome = Welcome.from_result(frame[2] if len(frame) > 2 else None)
            return self.welcome
        if op == OP_ERROR:
            e = Error.from_frame(frame)
            raise HandshakeError(e.code or "BAD_FRAME", e.message)
        if op == OP_CLOSING:
            c = Closing.from_frame(frame)
            raise HandshakeError(c.code or "BAD_FRAME", c.message)
        raise HandshakeError("BAD_FRAME", f"expected the reply to HELLO, got a frame with op code {op!r}")


class ServerHandshake:
    """The server's side, fed bytes: ``receive_data(data)`` then ``next_event()``.

    ``next_event()`` returns None while it needs more bytes, then the
    client's ``Hello`` (with ``client`` and ``heartbeat`` already resolved to
    what this connection will use); it raises ``HandshakeError`` for a bad
    preamble, a frame before HELLO, a bad HELLO map or another version.  Send
    ``closing(err)`` then close.  ``accept(hello, **info)`` is the OK reply's
    bytes.  Bytes after HELLO stay in ``reader`` for the main loop.
    """

    def __init__(self, *, connection: int, heartbeat: float, max_frame: int = DEFAULT_MAX_FRAME,
                 server: str = "brokerd", versions: tuple = PROTOCOL_VERSIONS, authenticate=None):
        self.connection = connection
        # authenticate(user, token) -> a user object, or None when they are wrong; None here:
        # the server has no users and HELLO needs no credentials (login() returns None).
        self.authenticate = authenticate
        self.heartbeat = heartbeat  # the server's setting, used when HELLO leaves it out
        self.max_frame = max_frame
        self.server = server
        self.versions = tuple(versions)  # what this server speaks; HELLO's pick is Hello.version
        self.reader = FrameReader(max_frame, keep_raw=True)  # PUBLISH_BATCH is logged as it came
        self._head = b""  # bytes before the whole preamble arrived
        self._frames: list = []
        self.preamble_seen = False
        self.hello: Hello | None = None

    def receive_data(self, data: bytes) -> None:
        if self.preamble_seen:
            self.reader.feed(data)
            return
        self._head += data
        if len(self._head) < len(PREAMBLE):
            return
        if self._head[: len(PREAMBLE)] != PREAMBLE:
            raise HandshakeError("BAD_PREAMBLE", f"a binary connection must open with the 4 bytes {PREAMBLE!r}")
        self.preamble_seen = True
        self.reader.feed(self._head[len(PREAMBLE):])
        self._head = b""

    def next_event(self) -> Hello | None:
        if self.hello is not None or not self.preamble_seen:
            return self.hello
        if not self._frames:
            self._frames = self.reader.frames()
        while self._frames:
            f = self._frames.pop(0)
            op = f[0]
            if op == OP_HEARTBEAT:  # allowed before HELLO, ignored (§2)
                continue
            if op != OP_HELLO:
                raise HandshakeError("HANDSHAKE_REQUIRED", "the first frame must be HELLO")
            self.hello = self._read_hello(f)
            return self.hello
        return None

    @property
    def pending_frames(self) -> list:
        """Frames that arrived in the same read after HELLO, for the main loop."""
        frames, self._frames = self._frames, []
        return frames

    def _read_hello(self, f: list) -> Hello:
        rid = f[1] if len(f) > 1 and type(f[1]) is int else 0
        opts = f[2] if len(f) > 2 else None
        if type(opts) is not dict:
            raise HandshakeError("BAD_REQUEST", "HELLO field 2 must be a map with at least 'version'")
        version = pick_version(opts.get("version"), self.versions)
        name = opts.get("client")
        hb = opts.get("heartbeat", self.heartbeat)
        if type(hb) not in (int, float) or hb != hb or hb in (float("inf"), float("-inf")) or hb < 0:
            hb = self.heartbeat
        extra = {k: v for k, v in opts.items() if k not in _HELLO_KEYS} or None
        return Hello(
            version,
            name if isinstance(name, str) and name else f"conn-{self.connection}",
            float(hb),
            extra,
            rid,
        )

    def login(self, hello: Hello):
        """Check HELLO's ``user`` and ``token`` with the ``authenticate`` callback.

        Returns what the callback returned (None when the server has no users); raises
        ``HandshakeError("AUTH_FAILED")`` when they are missing or wrong.  The callback may be
        slow (a salted scrypt hash): a server calls this off its event loop.  The message never
        says which of the two was wrong, so a stranger cannot learn which user names exist.
        """
        if self.authenticate is None:
            return None
        extra = hello.extra or {}
        name, token = extra.get("user"), extra.get("token")
        if type(name) is not str or type(token) is not str:
            raise HandshakeError("AUTH_FAILED", "this broker has users: HELLO must carry 'user' and 'token' "
                                                "(brokerd://USER:TOKEN@host:port)")
        user = self.authenticate(name, token)
        if user is None:
            shown = name if len(name) <= 64 else name[:64] + "..."  # a hostile name is not echoed whole
            raise HandshakeError("AUTH_FAILED", f"user {shown!r} with that token is not known to this broker")
        return user

    def welcome_map(self, hello: Hello) -> dict:
        return {
            "server": self.server,
            "version": hello.version,
            "heartbeat": hello.heartbeat,
            "max_frame": self.max_frame,
            "connection": self.connection,
        }

    def accept(self, hello: Hello) -> bytes:
        return encode([OP_OK, hello.rid, self.welcome_map(hello)])

    @staticmethod
    def closing(err: WireError) -> bytes:
        return encode([OP_CLOSING, err.code, err.message])
