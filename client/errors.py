"""Exceptions of the brokerd client SDK, built from the wire's error codes.

Every exception carries ``code`` (a code from ``client.wire.ERROR_CODES``, or
one of the client-side codes below) and ``message`` (the broker's sentence,
which says what to do about it).  They are named by whose fault it is, the
way trio and h11 name theirs:

* ``LocalProtocolError``: *we* sent something the broker will not take (a bad
  field, an unknown op).  Fix the call.  ``BadRequest`` is the common one.
* ``RemoteProtocolError``: the *broker* sent bytes we cannot read.  A bug on
  the other side (or not a brokerd at all); the connection is dropped.
* ``ConnectionClosed``: *you* closed the client and then used it.
* ``ConnectionLost``: the network or the broker ended the connection (killed,
  shut down, heartbeat timeout, slow consumer).  Also a builtin
  ``ConnectionError``, so ``except ConnectionError`` catches it.
* ``RequestRefused``: the broker understood the request and refused it; the
  connection stays open.  Subclasses name each reason: ``QueueFull``,
  ``MessageTooLarge``, ``StaleDelivery``, ``NotFound``, ``PreconditionFailed``,
  ``LogFailed``.
* ``PublishError``: raised by ``wait_for_confirms``; names every message id
  the broker refused since the last call, each with its own exception.
* ``Timeout``: no reply within the client's ``timeout``.  Also a builtin
  ``TimeoutError``.  The connection stays usable; a late reply is dropped.

``error_from_wire(code, message)`` turns an ERROR (or CLOSING) frame into the
right instance.  Imports nothing but ``client.wire``.
"""

from __future__ import annotations

from client.wire import ERROR_CODES

# Client-side codes: conditions the client detects itself, not sent on the wire.
CONNECTION_CLOSED = "CONNECTION_CLOSED"
CONNECTION_LOST = "CONNECTION_LOST"
TIMEOUT = "TIMEOUT"
PUBLISH_REFUSED = "PUBLISH_REFUSED"


class BrokerdError(Exception):
    """Base of every SDK error: ``code`` (wire or client-side) and ``message``."""

    code: str = "INTERNAL"

    def __init__(self, code: str | None = None, message: str = ""):
        if code is not None:
            self.code = code
        self.message = message
        super().__init__(message)

    def __str__(self) -> str:
        return f"{self.code}: {self.message}" if self.message else self.code

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.code!r}, {self.message!r})"

    def __reduce__(self):
        return (type(self), (self.code, self.message))

    @property
    def keeps_connection(self) -> bool:
        """Whether the broker keeps the connection open after this error (protocol.md §4)."""
        entry = ERROR_CODES.get(self.code)
        return bool(entry and entry[1])


# --- protocol errors: whose fault ----------------------------------------------------
class ProtocolError(BrokerdError):
    """A frame broke the protocol.  See the two subclasses for whose fault it was."""


class LocalProtocolError(ProtocolError):
    """We sent something wrong (bad frame, unknown op, bad field).  Fix the call."""


class RemoteProtocolError(ProtocolError):
    """The broker sent bytes this client cannot read.  The connection is dropped."""


# --- connection state ----------------------------------------------------------------
class Disconnected(BrokerdError):
    """The connection is gone; see ConnectionClosed and ConnectionLost."""


class ConnectionClosed(Disconnected):
    """You closed this client (``close()``/``with`` exit) and then used it."""

    code = CONNECTION_CLOSED


class ConnectionLost(Disconnected, ConnectionError):
    """The network or the broker ended the connection.

    ``code`` is the broker's reason when it said one in a CLOSING frame
    (``SHUTTING_DOWN``, ``HEARTBEAT_TIMEOUT``, ``SLOW_CONSUMER``...), else
    ``CONNECTION_LOST``.  Requests in flight may or may not have been applied;
    unconfirmed publishes must be re-sent (at-least-once).
    """

    code = CONNECTION_LOST


class Timeout(BrokerdError, TimeoutError):
    """No reply within the timeout.  The connection stays usable."""

    code = TIMEOUT


# --- refusals: the broker said no, the connection stays open ----------------------------
class RequestRefused(BrokerdError):
    """The broker understood the request and refused it; the connection stays open."""


class BadRequest(LocalProtocolError, RequestRefused):
    """A field is missing or has the wrong type or value (BAD_REQUEST, UNKNOWN_COMMAND)."""

    code = "BAD_REQUEST"


class NotFound(RequestRefused):
    """The named queue or consumer does not exist (NOT_FOUND)."""

    code = "NOT_FOUND"


class PreconditionFailed(RequestRefused):
    """The queue exists with other options, or has consumers / in-flight messages (PRECONDITION_FAILED)."""

    code = "PRECONDITION_FAILED"


class QueueFull(RequestRefused):
    """The queue is at max_length with overflow=reject (QUEUE_FULL).  Retry later."""

    code = "QUEUE_FULL"


class MessageTooLarge(RequestRefused):
    """The body is larger than the broker allows (MESSAGE_TOO_LARGE)."""

    code = "MESSAGE_TOO_LARGE"


class StaleDelivery(RequestRefused):
    """The delivery is no longer in flight on this connection (STALE_DELIVERY).

    It was settled already, or the broker took it back (reservation timeout)
    and will deliver it again: the ack did *not* apply.
    """

    code = "STALE_DELIVERY"


class LogFailed(RequestRefused):
    """The broker's write-ahead log cannot write; nothing new is accepted (LOG_FAILED)."""

    code = "LOG_FAILED"


class MemoryLimit(RequestRefused):
    """The broker's memory is past its max_memory watermark (MEMORY_LIMIT).

    Nothing was stored.  Retry later with backoff: the alarm clears by itself
    once consumers have drained enough.
    """

    code = "MEMORY_LIMIT"


class NotLeader(RequestRefused):
    """This brokerd is a follower and takes no writes (NOT_LEADER); the message names the leader."""

    code = "NOT_LEADER"


class NotEnoughReplicas(RequestRefused):
    """Fewer followers than the leader's --sync-replicas are in sync (NOT_ENOUGH_REPLICAS).

    The write was not confirmed; a confirm that was held when the followers dropped
    may still be in the leader's log, so a retry may store it twice.
    """

    code = "NOT_ENOUGH_REPLICAS"


class StaleEpoch(RequestRefused):
    """Replication between brokerds of different leadership terms (STALE_EPOCH): the older one
    was deposed.  Only a replication connection (REPLICATE, a follower brokerd) gets it."""

    code = "STALE_EPOCH"


class AccessRefused(RequestRefused):
    """The user this client logged in as lacks the grant for this operation (ACCESS_REFUSED).

    Nothing changed; the message names the user, the operation, the queue and the grant
    needed.  Ask the broker's admin for the grant (its users file), not a retry.
    """

    code = "ACCESS_REFUSED"


class AuthFailed(ConnectionLost):
    """brokerd has users and refused this client's user name or token (AUTH_FAILED).

    Pass them in the broker URL (``brokerd://user:token@host:port``) or the HELLO options
    ``user`` and ``token``; ``brokerd-ctl user add`` prints a new user's token once.
    """

    code = "AUTH_FAILED"


class BrokerInternalError(BrokerdError):
    """A bug in the broker (INTERNAL).  The broker closes the connection; nothing stored is lost."""

    code = "INTERNAL"


class PublishError(BrokerdError):
    """Some pipelined publishes were refused; raised by ``wait_for_confirms``.

    ``failures`` is a list of ``(message_id, exception)`` in publish order;
    ``ids`` is just the message ids.  The other publishes were confirmed.
    """

    code = PUBLISH_REFUSED

    def __init__(self, failures):
        self.failures = list(failures)
        shown = ", ".join(f"{mid!r} ({exc.code}: {exc.message})" for mid, exc in self.failures[:5])
        more = f" and {len(self.failures) - 5} more" if len(self.failures) > 5 else ""
        n = len(self.failures)
        super().__init__(
            PUBLISH_REFUSED,
            f"{n} publish{'es were' if n != 1 else ' was'} refused: {shown}{more}",
        )

    @property
    def ids(self) -> list[str]:
        return [mid for mid, _ in self.failures]

    def __reduce__(self):
        return (type(self), (self.failures,))


# code -> class.  Codes that close the connection map to what the caller should catch.
_BY_CODE: dict[str, type[BrokerdError]] = {
    "BAD_FRAME": LocalProtocolError,
    "FRAME_TOO_LARGE": LocalProtocolError,
    "BAD_PREAMBLE": LocalProtocolError,
    "HANDSHAKE_REQUIRED": LocalProtocolError,
    "UNSUPPORTED_VERSION": LocalProtocolError,
    "UNKNOWN_OP": LocalProtocolError,
    "BAD_REQUEST": BadRequest,
    "UNKNOWN_COMMAND": BadRequest,
    "NOT_FOUND": NotFound,
    "PRECONDITION_FAILED": PreconditionFailed,
    "QUEUE_FULL": QueueFull,
    "STALE_DELIVERY": StaleDelivery,
    "MESSAGE_TOO_LARGE": MessageTooLarge,
    "LOG_FAILED": LogFailed,
    "MEMORY_LIMIT": MemoryLimit,
    "NOT_LEADER": NotLeader,
    "NOT_ENOUGH_REPLICAS": NotEnoughReplicas,
    "STALE_EPOCH": StaleEpoch,
    "ACCESS_REFUSED": AccessRefused,
    "AUTH_REQUIRED": AccessRefused,
    "AUTH_FAILED": AuthFailed,
    "SLOW_CONSUMER": ConnectionLost,
    "IDLE_TIMEOUT": ConnectionLost,
    "TOO_MANY_CONNECTIONS": ConnectionLost,
    "INPUT_LIMIT": ConnectionLost,
    "HEARTBEAT_TIMEOUT": ConnectionLost,
    "SHUTTING_DOWN": ConnectionLost,
    "TLS_REQUIRED": ConnectionLost,
    "INTERNAL": BrokerInternalError,
    CONNECTION_CLOSED: ConnectionClosed,
    CONNECTION_LOST: ConnectionLost,
    TIMEOUT: Timeout,
}


def error_from_wire(code, message) -> BrokerdError:
    """The exception for an ERROR frame's ``code`` and ``message``.

    An unknown code (a newer broker) gives a plain ``BrokerdError`` carrying it.
    """
    if type(code) is not str:
        return RemoteProtocolError("BAD_FRAME", f"the broker sent an error with a non-text code {code!r}: {message!r}")
    if type(message) is not str:
        message = str(message)
    return _BY_CODE.get(code, BrokerdError)(code, message)


def lost_from_closing(code, message) -> ConnectionLost:
    """The exception for a CLOSING frame: the broker is about to close the connection.

    Always a ``ConnectionLost`` (every request in flight fails with it; ``AuthFailed``, a
    kind of it, when the broker refused the login), carrying
    the broker's code, so ``exc.code`` still says why: ``SHUTTING_DOWN``,
    ``HEARTBEAT_TIMEOUT``, ``SLOW_CONSUMER``, or ``BAD_FRAME`` and friends when
    it was our bytes.
    """
    if type(code) is not str:
        code = CONNECTION_LOST
    cls = AuthFailed if code == AuthFailed.code else ConnectionLost
    return cls(code, f"the broker closed the connection: {message}")
