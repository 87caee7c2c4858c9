"""Unique tasks: a publish with a ``unique_key`` is refused as a duplicate while the key is held.

Part of ``BrokerState`` (a mixin sharing its fields); pure like the rest of
broker/state/.  A key is taken by the publish that carries it and names that
message's id; a second publish with the key while it is held enqueues
nothing and is answered with the first one's id and ``duplicate: true`` (so
the caller's ``.get()`` waits for the same result).  The key is held:

* ``until: "started"``  until the message is first delivered;
* ``until: "finished"`` until it is acked, or a final result (SUCCESS,
  FAILURE, REVOKED) is stored for its id;
* ``until: "time"``     for ``unique_for`` seconds;

and never longer than ``unique_for`` seconds (default ``DEFAULT_UNIQUE_FOR``).
With "started" or "finished", a message that leaves without running (dead-lettered,
expired by its TTL, dropped as revoked) frees its key too.  Keys are
logged (UNIQUE when taken, UNIQUE_FREE when started/finished frees them; an
expiry is recomputed from its time), so they are exact across restarts.
A publish without a key pays nothing here: the handler calls this only when
the option is present, and delivery/ack check one empty dict.
"""

from __future__ import annotations

import itertools

from sortedcontainers import SortedList

from broker.errors import BadRequest
from broker.state import log_records as R

UNTIL = ("started", "finished", "time")
MAX_UNIQUE_KEY = 255  # bytes of UTF-8; "proj.tasks.rebuild_feed:<sha256 hex>" is ~90
DEFAULT_UNIQUE_FOR = 3600.0  # seconds a key holds at most when the publish names no unique_for
# The longest a key may be held: results are kept a day by default, and a key
# that outlives anything it could point at only blocks publishes.  30 days.
MAX_UNIQUE_FOR = 30 * 24 * 3600.0


class UniqueKey:
    __slots__ = ("key", "task_id", "until", "expires", "taken")

    def __init__(self, key, task_id, until, expires, taken):
        self.key = key
        self.task_id = task_id
        self.until = until
        self.expires = expires
        self.taken = taken

    def to_wire(self) -> list:
        return [self.key, self.task_id, self.until, self.expires, self.taken]


def check_unique_options(key, unique_for, until) -> None:
    if type(key) is not str or not key:
        raise BadRequest(f"PUBLISH option 'unique_key' must be non-empty text (got {key!r})")
    if len(key.encode()) > MAX_UNIQUE_KEY:
        raise BadRequest(f"PUBLISH option 'unique_key' is longer than {MAX_UNIQUE_KEY} bytes of UTF-8")
    if unique_for is not None and not 0 < unique_for <= MAX_UNIQUE_FOR:
        raise BadRequest(f"PUBLISH option 'unique_for' must be a number of seconds > 0 and at most "
                         f"{MAX_UNIQUE_FOR:g} (30 days) (got {unique_for!r})")
    if until not in UNTIL:
        raise BadRequest(f"PUBLISH option 'unique_until' must be one of {', '.join(UNTIL)} (got {until!r})")


class UniqueMixin:
    def _init_unique(self):
        self.unique: dict[str, UniqueKey] = {}
        self._unique_of: dict[str, str] = {}  # task id -> key, for keys freed by start or finish
        self._unique_ttl = SortedList()  # (expires, key)
        self._unique_ids = itertools.count(1)

    def publish_unique(self, conn_id: int, queue: str, body: bytes, msg_id, priority: int, now: float, *,
                       unique_key: str, unique_for=None, unique_until: str = "finished", **options) -> dict:
        """PUBLISH with a key: ``{"id", "duplicate"}``; a duplicate enqueues nothing."""
        self._refuse_if_log_failed()
        check_unique_options(unique_key, unique_for, unique_until)
        resent = options.get("dedupe")
        if resent is not None:  # a producer's resend after a failover (dedupe.py): the first one's answer
            first = self.dedupe.seen(resent, now)
            if first is not None:
                return {"id": first, "duplicate": False}
        held = self.unique.get(unique_key)
        if held is not None and held.expires > now:
            return {"id": held.task_id, "duplicate": True}
        if held is not None:
            self._free_unique(held, log=False)  # expired: its time is in the log already
        if msg_id is None:
            msg_id = f"{self._boot}-u{next(self._unique_ids)}"  # the key must name it before it exists
        # Taken (and logged) before the publish: the publish may deliver at once, and
        # "until started" must see the key, in memory and in the log's order.
        u = UniqueKey(unique_key, msg_id, unique_until,
                      now + (unique_for if unique_for is not None else DEFAULT_UNIQUE_FOR), now)
        self._add_unique(u)
        self._log(R.UNIQUE, u.to_wire())
        try:
            self.publish(conn_id, queue, body, msg_id, priority, now, **options)
        except Exception:
            self._free_unique(u, log=True)  # refused (full queue, bad value): the key is not held
            raise
        return {"id": msg_id, "duplicate": False}

    def _add_unique(self, u: UniqueKey) -> None:
        self.unique[u.key] = u
        self._unique_ttl.add((u.expires, u.key))
        if u.until != "time":
            self._unique_of[u.task_id] = u.key

    def _free_unique(self, u: UniqueKey, log: bool) -> None:
        del self.unique[u.key]
        self._unique_ttl.discard((u.expires, u.key))
        if self._unique_of.get(u.task_id) == u.key:
            del self._unique_of[u.task_id]
        if log:
            self._log(R.UNIQUE_FREE, u.key)

    def _unique_event(self, task_id: str, started: bool) -> None:
        """The task ``task_id`` was delivered (``started``) or finished: free its key if its policy says so."""
        key = self._unique_of.get(task_id)
        if key is None:
            return
        u = self.unique.get(key)
        if u is not None and u.task_id == task_id and (not started or u.until == "started"):
            self._free_unique(u, log=True)

    def _tick_unique(self, now: float) -> None:
        ttl = self._unique_ttl
        while ttl and ttl[0][0] <= now:
            _, key = ttl[0]
            self._free_unique(self.unique[key], log=False)

    def _unique_next_wakeup(self) -> float:
        return self._unique_ttl[0][0] if self._unique_ttl else float("inf")

    def unique_info(self, key: str, now: float) -> dict | None:
        u = self.unique.get(key)
        if u is None or u.expires <= now:
            return None
        return {"key": u.key, "task_id": u.task_id, "until": u.until, "expires_in": u.expires - now,
                "age": now - u.taken}

    # -- replay and compaction ------------------------------------------------------
    def _replay_unique_record(self, t: int, p) -> None:
        if t == R.UNIQUE:
            old = self.unique.get(p[0])
            if old is not None:
                self._free_unique(old, log=False)
            self._add_unique(UniqueKey(*p))
        else:
            u = self.unique.get(p)
            if u is not None:
                self._free_unique(u, log=False)

    def _compact_unique(self) -> None:
        for u in self.unique.values():
            self._log(R.UNIQUE, u.to_wire())
