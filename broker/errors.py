"""Errors the broker raises: one class per wire error code (``client.wire.ERROR_CODES``).

Named by whose fault it is (trio's ClosedResourceError vs BrokenResourceError):
``BadRequest``, ``NotFound``, ``PreconditionFailed``, ``StaleDelivery`` and the
like mean the client asked for something wrong and can fix its request;
``QueueFull``, ``LogFailed``, ``MemoryLimit`` mean the broker cannot take it right
now and a retry later may succeed.  Each class carries its code as a class
attribute, so callers catch the class instead of comparing code strings, and a
handler turns any of them into ``[ERROR, rid, code, message]`` or ``ERR code
message``.  The codes that close a connection (timeouts, bounds, bad frames)
are classes too, so every code the broker sends has one home here.
"""

from __future__ import annotations

from typing import ClassVar

from client.wire import ERROR_CODES


class BrokerError(Exception):
    """Base class: a failure the broker reports to its client with ``code`` and ``message``."""

    code: ClassVar[str] = "INTERNAL"

    def __init__(self, message: str):
        super().__init__(message)
        self.message = message

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        assert cls.code in ERROR_CODES, f"{cls.__name__}.code {cls.code!r} is not a wire error code"


# -- the request is wrong: fix it and send it again ------------------------------------------
class BadRequest(BrokerError):
    """A field is missing or has the wrong type or value."""

    code = "BAD_REQUEST"


RequestError = BadRequest  # the older name, still imported by tests and callers


class NotFound(BrokerError):
    """The named queue, consumer or schedule does not exist."""

    code = "NOT_FOUND"


class PreconditionFailed(BrokerError):
    """The queue exists with other options, or cannot be deleted in its present state."""

    code = "PRECONDITION_FAILED"


class StaleDelivery(BrokerError):
    """The delivery tag is no longer in flight on this connection."""

    code = "STALE_DELIVERY"


class MessageTooLarge(BrokerError):
    code = "MESSAGE_TOO_LARGE"


class UnknownOp(BrokerError):
    code = "UNKNOWN_OP"


class UnknownCommand(BrokerError):
    """An admin text line names no known command."""

    code = "UNKNOWN_COMMAND"


class AccessRefused(BrokerError):
    """The user lacks the grant the operation needs (broker.auth); nothing changed."""

    code = "ACCESS_REFUSED"


class AuthRequired(BrokerError):
    """An admin text command before AUTH, on a broker with users."""

    code = "AUTH_REQUIRED"


# -- the broker cannot take it now: retry later ------------------------------------------------
class QueueFull(BrokerError):
    """The queue is at max_length with overflow=reject."""

    code = "QUEUE_FULL"


class LogFailed(BrokerError):
    """The write-ahead log cannot write; nothing new is accepted."""

    code = "LOG_FAILED"


class MemoryLimit(BrokerError):
    """The broker's memory is past max_memory; the request was not stored."""

    code = "MEMORY_LIMIT"


class NotLeader(BrokerError):
    """This brokerd is a follower (--follow); the message names the leader."""

    code = "NOT_LEADER"


class NotEnoughReplicas(BrokerError):
    """Fewer followers than --sync-replicas are in sync; nothing was confirmed."""

    code = "NOT_ENOUGH_REPLICAS"


class StaleEpoch(BrokerError):
    """Replication between brokerds of different leadership terms: the older one was deposed."""

    code = "STALE_EPOCH"


# -- codes that close the connection (sent in a CLOSING frame or a last ERR line) -------------
class BadFrame(BrokerError):
    code = "BAD_FRAME"


class FrameTooLarge(BrokerError):
    code = "FRAME_TOO_LARGE"


class BadPreamble(BrokerError):
    code = "BAD_PREAMBLE"


class HandshakeRequired(BrokerError):
    code = "HANDSHAKE_REQUIRED"


class UnsupportedVersion(BrokerError):
    code = "UNSUPPORTED_VERSION"


class SlowConsumer(BrokerError):
    code = "SLOW_CONSUMER"


class HeartbeatTimeout(BrokerError):
    code = "HEARTBEAT_TIMEOUT"


class IdleTimeout(BrokerError):
    code = "IDLE_TIMEOUT"


class TooManyConnections(BrokerError):
    code = "TOO_MANY_CONNECTIONS"


class InputLimit(BrokerError):
    code = "INPUT_LIMIT"


class ShuttingDown(BrokerError):
    code = "SHUTTING_DOWN"


class TlsRequired(BrokerError):
    """Plaintext on a port that takes only TLS (--tls-required)."""

    code = "TLS_REQUIRED"


class AuthFailed(BrokerError):
    """The user name or token is missing or wrong (brokerd has users)."""

    code = "AUTH_FAILED"


class Internal(BrokerError):
    code = "INTERNAL"


def _leaves(cls) -> list[type[BrokerError]]:
    out = []
    for sub in cls.__subclasses__():
        out.append(sub)
        out += _leaves(sub)
    return out


# code -> its one class (the base BrokerError is abstract and stands for none)
BY_CODE: dict[str, type[BrokerError]] = {c.code: c for c in _leaves(BrokerError)}
