"""Publish de-duplication: a producer's resend after a failover is stored once.

A producer that lost its connection cannot know whether an unconfirmed publish
reached the log before the broker (or the leader) went away, so the SDK
resends it on the new connection.  Each publish then carries a ``dedupe`` key
(PUBLISH option, protocol.md §5.2) that the SDK makes unique *per publish*, not
per message or task: a Celery-style retry republishes a task under the same
task id on purpose and gets a new key, so it is never taken for a resend.

The window remembers key -> message id of the most recent keyed publishes,
bounded by count and by age (both stated below).  A publish whose key is in the
window stores nothing and is answered OK with the original message id.  The key
travels in the PUBLISH log record (an 11th payload item, log_records), so replay
rebuilds the window, and a follower promoted to leader, which applied the same
records, drops the same resends.

Pure like the rest of broker/state/: ``now`` is passed in (the broker's wall
clock, the same as a message's ``ts``).
"""

from __future__ import annotations

from collections import OrderedDict

from broker.errors import BadRequest

# Keys remembered at most: one entry is ~150 B (key, id, time, dict slot), so 100,000 is
# ~15 MiB, and it covers 100,000 publishes in flight across a failover, far more than any
# producer pipelines.  The oldest key is forgotten first.
DEDUPE_WINDOW = 100_000  # keys
# How long a key is remembered: a client resends within its reconnect budget
# (client.options.RECONNECT_TOTAL, 30 s by default); five minutes leaves room for a slow
# election and a producer that reconnects late.
DEDUPE_SECONDS = 300.0  # seconds
MAX_DEDUPE_KEY = 255  # bytes of UTF-8; the SDK's keys are ~20 ("<12 hex>-<n>")
NEVER = float("inf")


def check_dedupe_key(key) -> None:
    if type(key) is not str or not key:
        raise BadRequest(f"PUBLISH option 'dedupe' must be non-empty text (got {type(key).__name__})")
    if len(key) > MAX_DEDUPE_KEY or len(key.encode()) > MAX_DEDUPE_KEY:
        raise BadRequest(f"PUBLISH option 'dedupe' is longer than {MAX_DEDUPE_KEY} bytes of UTF-8")


# Expiry runs in batches: at most once per this many seconds of the clock ``remember`` is given,
# and then forgets every key past the window at once.  Per publish that is one comparison instead
# of a look at the oldest key (the window's cost was ~15 % of the broker's publish path, measured
# with bench/w1_profile.py).  A key may so be held up to this much past DEDUPE_SECONDS; ``seen``
# checks a key's own age, so an expired key is never answered from the window.
DEDUPE_EXPIRE_EVERY = 1.0  # seconds


class DedupeWindow:
    """key -> (message id, when), oldest first; bounded by ``limit`` keys and ``seconds``."""

    __slots__ = ("limit", "seconds", "_keys", "dropped", "_due")

    def __init__(self, limit: int = DEDUPE_WINDOW, seconds: float = DEDUPE_SECONDS):
        self.limit = limit
        self.seconds = seconds
        # An OrderedDict, not a dict: forgetting from the oldest end of a plain dict leaves
        # holes its iteration walks over (O(forgotten) per look at the first key).
        self._keys: OrderedDict[str, tuple[str, float]] = OrderedDict()
        self.dropped = 0  # resends answered from the window (STATS-worthy)
        self._due = NEVER  # when the oldest key leaves the window (then expiry runs)

    def __len__(self) -> int:
        return len(self._keys)

    def seen(self, key: str, now: float) -> str | None:
        """The message id a publish with ``key`` stored within the window, else None."""
        held = self._keys.get(key)
        if held is None:
            return None
        if held[1] + self.seconds <= now:
            self._expire(now)
            return None
        self.dropped += 1
        return held[0]

    def remember(self, key: str, msg_id: str, at: float, now: float) -> None:
        """A publish with ``key`` stored ``msg_id`` at ``at`` (replay passes the record's time)."""
        keys = self._keys
        n = len(keys)
        keys[key] = (msg_id, at)
        if len(keys) == n:  # the key was there (replay of a log that holds it twice): now newest
            keys.move_to_end(key)
        elif n >= self.limit:
            keys.popitem(last=False)
        elif not n:
            self._due = at + self.seconds
        if now >= self._due:
            self._expire(now)

    def _expire(self, now: float) -> None:
        """Forget keys older than the window: O(expired), from the oldest end; the next run is
        due when the (new) oldest key leaves, and not before DEDUPE_EXPIRE_EVERY from now."""
        keys = self._keys
        horizon = now - self.seconds
        while keys:
            k, (_, at) = next(iter(keys.items()))
            if at > horizon:
                self._due = max(at + self.seconds, now + DEDUPE_EXPIRE_EVERY)
                return
            del keys[k]
        self._due = NEVER
