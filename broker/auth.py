"""Users, their credentials and their grants: who may do what, decided without I/O.

The shape (RabbitMQ's users with per-vhost configure/write/read patterns and
Redis's ACL users with key patterns and command categories, made simpler):

* A **user** has a name, a token stored only as a salted, slow hash, and
  **grants**: for each kind of operation, a list of queue-name globs
  (``"emails"``, ``"sms.*"``, ``"*"``).
* The **kinds** (``GRANT_KINDS``) follow who does what: a web app publishes
  and reads results; a worker consumes, writes results and reports events;
  an operator manages queues; only an admin types netcat commands or manages
  users.  ``REQUIRED`` says, for every op of protocol.md §5, which kind it
  needs and for which queues; ``required(frame)`` applies it to one frame.
* Users live in a TOML **users file** (``USERS_FILE_EXAMPLE``), one table per
  user; ``brokerd-ctl user add NAME`` writes one and prints its token once.

Nothing here reads a socket or a clock: the handshake asks
``Users.authenticate`` and the handlers ask ``User.may``; failed logins from
one address are slowed by ``AuthThrottle``, with ``now`` passed in.
"""

from __future__ import annotations

import math
import tomllib
from dataclasses import dataclass, field
from fnmatch import fnmatchcase

from client.userfile import (  # noqa: F401  (re-exported: the hashing and the entry writer live client-side)
    GRANT_KINDS,
    SALT_BYTES,
    SCRYPT_N,
    SCRYPT_P,
    SCRYPT_R,
    TOKEN_BYTES,
    USER_NAME,
    AuthError,
    add_user,
    check_token,
    hash_token,
    new_token,
    parse_grant_args,
    user_entry,
)
from client.wire import (
    OP_ACK,
    OP_ADMIN,
    OP_BIND,
    OP_EMIT,
    OP_UNBIND,
    OP_BYE,
    OP_CANCEL,
    OP_CHORD,
    OP_CHORD_ADD,
    OP_CONSUME,
    OP_CONTROL_REPLY,
    OP_CONTROL_REQUEST,
    OP_DECLARE,
    OP_DELETE,
    OP_EMIT_EVENTS,
    OP_HEARTBEAT,
    OP_HELLO,
    OP_NACK,
    OP_PAUSE,
    OP_PING,
    OP_PUBLISH,
    OP_PUBLISH_BATCH,
    MAX_PUBLISH_BATCH,
    OP_PURGE,
    OP_RATE_LIMIT,
    OP_CREDIT,
    OP_RELEASE,
    OP_PROMOTE,
    OP_REPLICA_ACK,
    OP_REPLICATE,
    OP_RESULT_FORGET,
    OP_RESULT_GET,
    OP_RESULT_SET,
    OP_RESUME,
    OP_REVOKE,
    OP_SCHEDULE_LIST,
    OP_SCHEDULE_PAUSE,
    OP_SCHEDULE_PUT,
    OP_SCHEDULE_REMOVE,
    OP_STATS,
    OP_SUBSCRIBE,
    OP_TASK_INFO,
    OP_TOUCH,
    OP_WORKERS,
)

# -- the kinds of grant: GRANT_KINDS (client/userfile.py, shared with brokerd-ctl) -------------
MAY_MEMO = 4096  # remembered (kind, queue) answers per user
SETTLE_OPS = frozenset((OP_ACK, OP_NACK, OP_TOUCH))  # settling a delivery: any consume grant
ANY_QUEUE = None  # "the kind on any queue at all" (ops that name no queue)
QUEUE_KINDS = ("publish", "consume", "manage", "admin")  # the kinds whose globs name queues

# op -> (kind, how to find the queues it touches: a field index, "queues" for a list, or None)
REQUIRED: dict[int, tuple[str, object] | None] = {
    OP_HELLO: None, OP_HEARTBEAT: None, OP_PING: None, OP_BYE: None,
    OP_PUBLISH: ("publish", 2),
    OP_PUBLISH_BATCH: ("publish", "items"),  # publish on every item's queue (required() lists them)
    OP_CONSUME: ("consume", "queues"),
    OP_CANCEL: ("consume", None), OP_ACK: ("consume", None), OP_NACK: ("consume", None), OP_TOUCH: ("consume", None),
    OP_EMIT_EVENTS: ("consume", None), OP_CONTROL_REPLY: ("consume", None),
    OP_CREDIT: ("consume", None), OP_RELEASE: ("consume", None),  # adaptive prefetch, RECALL answers
    OP_DECLARE: ("manage", 2), OP_DELETE: ("manage", 2), OP_PURGE: ("manage", 2),
    OP_PAUSE: ("manage", 2), OP_RESUME: ("manage", 2),
    OP_STATS: None,  # answered for the queues the user has any grant on (the handler filters)
    OP_RESULT_GET: ("results-read", None), OP_TASK_INFO: ("results-read", None),
    OP_RESULT_SET: ("results-write", None), OP_RESULT_FORGET: ("results-write", None),
    OP_SCHEDULE_PUT: ("schedules", None), OP_SCHEDULE_REMOVE: ("schedules", None),
    OP_SCHEDULE_PAUSE: ("schedules", None), OP_SCHEDULE_LIST: ("schedules", None),
    OP_CHORD: ("publish", None),  # checked per target queue by required(): the body's and the error's
    OP_CHORD_ADD: ("publish", None),  # as CHORD; it adds members only, the body's queue was checked at CHORD
    OP_REVOKE: ("control", None), OP_CONTROL_REQUEST: ("control", None),
    OP_SUBSCRIBE: ("control", None), OP_WORKERS: ("control", None),
    OP_RATE_LIMIT: ("control", None),  # Celery's app.control.rate_limit; a queue's rate too
    OP_ADMIN: ("admin", None),
    # Exchange names share the queue globs.  EMIT needs publish on the exchange; BIND and UNBIND
    # need manage on the queue and consume on the exchange (a binding reads what is emitted to it).
    OP_EMIT: ("publish", 2), OP_BIND: ("manage", 3), OP_UNBIND: ("manage", 3),
    # A follower reads the whole log (every queue's messages): its own kind, given to replication users only.
    OP_REPLICATE: ("replicate", None), OP_REPLICA_ACK: ("replicate", None),
    OP_PROMOTE: ("admin", None),  # a follower takes over as leader (a change of role for the whole group)
}

USERS_FILE_EXAMPLE = '''\
# brokerd users: one table per user.  "token" is a salted scrypt hash, never the token itself
# (brokerd-ctl user add NAME writes a table and prints the token once).  Each other key is a
# kind of grant with the queue-name globs it covers.
[users.webapp]
token = "scrypt$16384$8$1$<salt>$<hash>"
publish = ["emails", "sms.*"]
results-read = ["*"]

[users.worker]
token = "scrypt$16384$8$1$<salt>$<hash>"
consume = ["emails", "sms.*"]
results-write = ["*"]
'''


# -- users and grants ------------------------------------------------------------------------------
@dataclass(frozen=True)
class User:
    name: str
    token_hash: str = field(repr=False)
    grants: dict  # kind -> tuple of queue globs
    # (kind, queue) -> the answer: a connection asks the same few questions for every message;
    # matching globs each time cost ~2-5 us a frame.  Cleared when it reaches MAY_MEMO entries.
    _memo: dict = field(default_factory=dict, repr=False, compare=False)

    def may(self, kind: str, queue: str | None = ANY_QUEUE) -> bool:
        """Whether this user may do ``kind`` on ``queue`` (None: on some queue at all)."""
        key = (kind, queue)
        memo = self._memo
        answer = memo.get(key)
        if answer is None:
            if len(memo) >= MAY_MEMO:
                memo.clear()
            answer = memo[key] = self._may(kind, queue)
        return answer

    def _may(self, kind: str, queue: str | None) -> bool:
        patterns = self.grants.get(kind)
        if not patterns:
            return False
        if queue is None:
            return True
        return any(p == "*" or p == queue or fnmatchcase(queue, p) for p in patterns)

    def sees(self, queue: str) -> bool:
        """Whether a queue grant (publish, consume, manage; or admin) covers ``queue``: listings
        show the user only those.  Results, schedules and control are not about queues."""
        return any(self.may(kind, queue) for kind in QUEUE_KINDS)


@dataclass(frozen=True)
class Refusal:
    """What ``check`` found missing: enough for ACCESS_REFUSED's sentence."""

    user: str
    kind: str
    queue: str | None

    def message(self, op_name: str) -> str:
        on = f" on queue {self.queue!r}" if self.queue is not None else ""
        return f"user {self.user!r} may not {op_name}{on}: it needs the {self.kind!r} grant{on}"


def required(frame: list) -> list[tuple[str, str | None]]:
    """The (kind, queue) pairs one request frame needs; [] for ops anyone connected may send.

    A malformed frame needs what its op needs on "some queue": the handler then refuses its
    shape with BAD_REQUEST, and a user without the kind learns nothing about queues.
    """
    op = frame[0]
    rule = REQUIRED.get(op, ("admin", None))  # an op this table does not know: admins only
    if rule is None:
        return []
    kind, where = rule
    if where == "items":  # PUBLISH_BATCH [46, rid, [[queue, body, ...], ...]]: each distinct queue once
        items = frame[2] if len(frame) > 2 and type(frame[2]) is list else []
        if len(items) > MAX_PUBLISH_BATCH:  # refused by its handler; not worth reading here
            return [(kind, None)]
        names = {(item[0] if type(item[0]) is str else None) for item in items if type(item) is list and item}
        return [(kind, q) for q in sorted(names, key=lambda q: (q is None, q or ""))] or [(kind, None)]
    if where == "queues":
        names = frame[2] if len(frame) > 2 and type(frame[2]) is list else []
        return [(kind, q if type(q) is str else None) for q in names] or [(kind, None)]
    if type(where) is int:
        q = frame[where] if len(frame) > where else None
        if op == OP_BIND or op == OP_UNBIND:  # [33, rid, exchange, queue, key, ...]
            ex = frame[2] if len(frame) > 2 and type(frame[2]) is str else None
            return [(kind, q if type(q) is str else None), ("consume", ex)]
        return [(kind, q if type(q) is str else None)]
    if op == OP_CHORD:  # [26, rid, chord_id, members, body spec, error spec]
        out = [(kind, spec.get("queue") if type(spec.get("queue")) is str else None)
               for spec in frame[4:6] if type(spec) is dict]
        return out or [(kind, None)]
    if op == OP_SCHEDULE_PUT:  # the entry publishes into its queue: that needs publish there too
        spec = frame[3] if len(frame) > 3 and type(frame[3]) is dict else {}
        target = spec.get("queue")
        return [(kind, None), ("publish", target if type(target) is str else None)]
    return [(kind, None)]


def check(user: User, frame: list) -> Refusal | None:
    """None if ``user`` may send ``frame``; else the first grant it lacks."""
    op = frame[0]
    if op == OP_PUBLISH and len(frame) > 2 and type(frame[2]) is str:  # the hot path: one memo look-up
        return None if user.may("publish", frame[2]) else Refusal(user.name, "publish", frame[2])
    if op in SETTLE_OPS:
        return None if user.may("consume") else Refusal(user.name, "consume", None)
    for kind, queue in required(frame):
        if not user.may(kind, queue):
            return Refusal(user.name, kind, queue)
    return None


class Users:
    """Every configured user, by name."""

    def __init__(self, users: dict[str, User] | None = None):
        self.by_name = dict(users or {})

    def __bool__(self) -> bool:
        return bool(self.by_name)

    def __len__(self) -> int:
        return len(self.by_name)

    def authenticate(self, name, token) -> User | None:
        """The user if ``token`` is theirs; None otherwise (unknown name included: the caller
        says AUTH_FAILED either way, so a stranger cannot learn which names exist)."""
        if type(name) is not str or type(token) is not str:
            return None
        user = self.by_name.get(name)
        if user is None:
            check_token(_DUMMY_HASH, token)  # the same ~50 ms whether or not the name exists
            return None
        return user if check_token(user.token_hash, token) else None


_DUMMY_HASH = hash_token("no such user", b"\x00" * SALT_BYTES)


def parse_users(text: str, source: str = "users file") -> Users:
    """A users file's TOML text -> Users, or AuthError naming the user and the key."""
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise AuthError(f"{source} is not valid TOML: {exc}") from None
    extra = set(data) - {"users"}
    if extra:
        raise AuthError(f"{source}: unknown top-level key(s) {sorted(extra)}; users go in [users.NAME] tables")
    table = data.get("users", {})
    if type(table) is not dict:
        raise AuthError(f"{source}: 'users' must be a table of [users.NAME] tables")
    users = {}
    for name, entry in table.items():
        if not USER_NAME.match(name):
            raise AuthError(f"{source}: user name {name!r} must be 1-64 letters, digits, '_', '.', '@' or '-'")
        if type(entry) is not dict:
            raise AuthError(f"{source}: [users.{name}] must be a table")
        token = entry.get("token")
        if type(token) is not str or not token.startswith("scrypt$") or token.count("$") != 5:
            raise AuthError(f"{source}: [users.{name}] needs token = \"scrypt$...\" (a hash from brokerd-ctl user add, "
                            "never the token itself)")
        grants = {}
        for key, patterns in entry.items():
            if key == "token":
                continue
            if key not in GRANT_KINDS:
                raise AuthError(f"{source}: [users.{name}] has unknown grant {key!r}; known: {', '.join(GRANT_KINDS)}")
            if type(patterns) is not list or not all(type(p) is str and p for p in patterns):
                raise AuthError(f"{source}: [users.{name}] {key} must be a list of queue-name globs, "
                                f"e.g. {key} = [\"emails\", \"sms.*\"]")
            grants[key] = tuple(patterns)
        users[name] = User(name, token, grants)
    return Users(users)


# -- slowing down guessing --------------------------------------------------------------------------
class AuthThrottle:
    """How long to wait before answering AUTH_FAILED to an address.

    Every failure waits at least ``base`` seconds; each further failure from the same address
    within ``window`` doubles it, up to ``cap``.  Pure: ``now`` is passed in.  Remembers at most
    ``max_addresses`` addresses (the oldest are forgotten), so a flood of sources cannot grow it.
    """

    def __init__(self, base: float = 0.5, cap: float = 30.0, window: float = 600.0, max_addresses: int = 10_000):
        self.base, self.cap, self.window, self.max_addresses = base, cap, window, max_addresses
        self._failures: dict[str, tuple[int, float]] = {}  # address -> (count, last failure)

    def failed(self, address: str, now: float) -> float:
        """Record a failure; return the seconds to wait before answering it."""
        count, last = self._failures.pop(address, (0, now))
        count = count + 1 if now - last <= self.window else 1
        if len(self._failures) >= self.max_addresses:
            self._failures.pop(next(iter(self._failures)))
        self._failures[address] = (count, now)
        return min(self.cap, self.base * math.pow(2, count - 1))

    def succeeded(self, address: str) -> None:
        self._failures.pop(address, None)
