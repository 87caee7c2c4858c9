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

import cbor2

# --- protocol.md §2 "Connection and first byte" --------------------------------
# A binary client opens with these 4 bytes.  The first byte is NUL, which no
# admin text line can start with, so the server tells the two modes apart by
# the first byte it receives (RESP-style sniffing).
PREAMBLE = b"\x00BRK"
PROTOCOL_VERSION = 1

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

# server → client
OP_OK = 64
OP_ERROR = 65
OP_DELIVER = 66
OP_CLOSING = 67  # the server is about to close the connection: [67, code, message]
OP_CONTROL = 68  # a broadcast to consumers, e.g. [68, {"revoke": [ids], "terminate": true}]
OP_EVENT = 69  # events for a subscriber: [69, [event, ...], dropped]

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
}
SERVER_OPS = {OP_OK: "OK", OP_ERROR: "ERROR", OP_DELIVER: "DELIVER", OP_CLOSING: "CLOSING", OP_CONTROL: "CONTROL",
              OP_EVENT: "EVENT"}

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
    "UNKNOWN_COMMAND": ("an admin text line names no known command (send HELP)", True),
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
class FrameReader:
    """Accumulates bytes and yields whole frames (as Python lists).

    ``feed(data)`` then ``frames()``; a malformed or oversized frame raises
    ``WireError``.  After an error the reader is poisoned: the stream cannot
    be resynchronised, so the connection must close.
    """

    __slots__ = ("_buf", "_pos", "max_frame")

    def __init__(self, max_frame: int = DEFAULT_MAX_FRAME):
        self._buf = bytearray()
        self._pos = 0
        self.max_frame = max_frame

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
                out.append(decode_payload(mv[start:pos]))
        finally:
            mv.release()
            self._pos = pos
        return out


def decode_payload(payload) -> list:
    """CBOR bytes → frame list, or WireError(BAD_FRAME)."""
    if len(payload) == 0:
        raise WireError("BAD_FRAME", "empty frame: a frame holds one CBOR array")
    try:
        value = _loads(payload, **_DECODE_OPTIONS)
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
