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

    def target(self) -> int:
        r = self.runtime
        if r is None:
            return self.current
        per_slot = 1 + ROUND_TRIP_SAFETY * self.round_trip / max(r, 1e-6)
        return max(self.lo, min(self.hi, int(self.lo * min(per_slot, CREDIT_MAX_FACTOR))))

    def due(self, now: float) -> int | None:
        """The new credit to send now, or None (unchanged, too small a change, or too soon)."""
        if now < self.next_at:
            return None
        t = self.target()
        cur = self.current
        if t == cur or (abs(t - cur) < CREDIT_STEP * cur and t not in (self.lo, self.hi)):
            return None
        self.current = t
        self.next_at = now + CREDIT_INTERVAL
        return t
