"""Adaptive prefetch: how much credit the worker asks brokerd for, from what it observes.

A slot that finishes a task waits about one round trip (the result goes out, brokerd hands out
the freed credit, the delivery comes back) unless a delivery is already waiting here.  So each
slot wants ``round trip / task run time`` deliveries waiting besides the one it runs: many for
no-op tasks, none for tasks that run longer than a round trip.  The credit is

    concurrency x clamp(1 + ROUND_TRIP_SAFETY x round trip / run time, 1, CREDIT_MAX_FACTOR)

with the run time a moving average of finished tasks (``RUNTIME_WEIGHT``) and the round trip
measured at CONSUME (at least ``ROUND_TRIP_FLOOR``).  It starts at ``concurrency`` (nothing is
known yet: hold no more than can start) and is sent with CREDIT (protocol.md §5.40) when it moved
by a quarter or more, at most every ``CREDIT_INTERVAL``.  Long tasks bring it back to
``concurrency``, so a worker busy with them holds nothing another could run; what it still holds
beyond its slots, brokerd can take back with RECALL (§5.44).

The average learns from finished tasks only, so a task that runs long would leave the credit high
until it ends, and brokerd would keep handing this worker deliveries that wait behind it.  So a
slot whose task has run longer than ``long_after()`` (``LONG_RUN_FACTOR`` x the average run time,
and at least ``LONG_RUN_FLOOR``) counts as *busy for long*: it wants no delivery waiting for it,
and the credit is ``busy + (concurrency - busy) x per-slot factor``.  With one slot (``-c 1``) that
is the slots alone: brokerd sends such a worker nothing more while its long task runs, and hands
the work to a worker that can start it.  The main loop wakes when a running task crosses the
threshold (``Worker.credit_wait``) and sends the lowered credit at once; what the worker already
holds beyond it (deliveries not started) it gives back with RELEASE in the same flush
(``Worker._shed``), so they go to a free slot now rather than one per RECALL later.

``--prefetch-multiplier M`` (or ``worker_prefetch_multiplier`` in the app's config) given
explicitly keeps the fixed credit ``concurrency x M`` and no controller runs.
"""

from __future__ import annotations

MAX_PREFETCH = 65535  # brokerd's limit per consumer
# The most credit per slot: 64 is the hand-tuned best for no-op tasks (issue 18: 10,000 no-op
# tasks through one worker, --prefetch-multiplier 64); more only costs memory and recall work.
CREDIT_MAX_FACTOR = 64
# The round trip is at least this (seconds): a loop turn, a flush, brokerd's turn, the reader
# thread's hand-off; a loopback CONSUME alone can measure well under it.
ROUND_TRIP_FLOOR = 0.002
ROUND_TRIP_SAFETY = 2  # waiting deliveries cover twice the round trip: bursts and jitter
RUNTIME_WEIGHT = 0.2  # weight of the newest run time in the moving average (about the last 5 tasks)
CREDIT_INTERVAL = 0.05  # seconds between CREDIT frames at most: 20 a second
CREDIT_STEP = 0.25  # a change smaller than this fraction of the current credit is not sent
# The process pool queues jobs in one process behind a job only when that job's task is known to
# run shorter than this (seconds): jobs queued behind a long one could not be given back by RECALL.
BATCH_RUNTIME_MAX = 0.001
# A running task counts its slot as busy for long (no delivery should wait for that slot) once it
# ran this many times the average run time ...
LONG_RUN_FACTOR = 4
# ... and at least this (seconds).  Past 10 ms a slot would earn at most 1 + 2 x 2 ms / 10 ms = 1.4
# deliveries from the formula anyway, and a no-op average (microseconds) would otherwise call any
# scheduling hiccup long.
LONG_RUN_FLOOR = 0.01


class AdaptiveCredit:
    """The credit a worker of ``concurrency`` slots wants; ``observe`` finished tasks, ask ``due``."""

    def __init__(self, concurrency: int):
        self.lo = max(1, concurrency)
        self.hi = min(MAX_PREFETCH, self.lo * CREDIT_MAX_FACTOR)
        self.current = self.lo
        self.runtime: float | None = None  # moving average, seconds
        self.round_trip = ROUND_TRIP_FLOOR
        self.next_at = 0.0

    def measured_round_trip(self, seconds: float) -> None:
        self.round_trip = max(ROUND_TRIP_FLOOR, seconds)

    def observe(self, runtime: float) -> None:
        r = self.runtime
        self.runtime = runtime if r is None else r + RUNTIME_WEIGHT * (runtime - r)

    def long_after(self) -> float:
        """Seconds after which a running task makes its slot busy for long."""
        r = self.runtime
        return LONG_RUN_FLOOR if r is None else max(LONG_RUN_FLOOR, LONG_RUN_FACTOR * r)

    def target(self, busy_long: int = 0) -> int:
        """The credit for ``busy_long`` slots running a task past ``long_after()``: 1 each (what
        they run), the others their per-slot factor."""
        r = self.runtime
        if r is None:
            return self.lo if busy_long else self.current
        per_slot = min(1 + ROUND_TRIP_SAFETY * self.round_trip / max(r, 1e-6), CREDIT_MAX_FACTOR)
        busy_long = min(busy_long, self.lo)
        return max(self.lo, min(self.hi, busy_long + int((self.lo - busy_long) * per_slot)))

    def due(self, now: float, busy_long: int = 0) -> int | None:
        """The new credit to send now, or None (unchanged, too small a change, or too soon)."""
        if now < self.next_at:
            return None
        t = self._change(busy_long)
        if t is None:
            return None
        self.current = t
        self.next_at = now + CREDIT_INTERVAL
        return t

    def wait(self, now: float, busy_long: int = 0) -> float | None:
        """Seconds until ``due`` would send a change it holds back now (CREDIT_INTERVAL), or None."""
        return None if self._change(busy_long) is None else max(0.0, self.next_at - now)

    def _change(self, busy_long: int) -> int | None:
        t = self.target(busy_long)
        cur = self.current
        if t == cur or (abs(t - cur) < CREDIT_STEP * cur and t not in (self.lo, self.hi)):
            return None
        return t
