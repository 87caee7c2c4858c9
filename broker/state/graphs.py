"""The page's graphs over time: throughput, failures, runtime percentiles per task name, queue depth.

Kept in the broker (so a page opened now shows the last hour, not what it watched since it
opened), small and bounded: ``GRAPH_BUCKETS`` buckets of ``GRAPH_BUCKET_S`` seconds each (the
last hour at 10 s resolution), the oldest dropped as time moves on.  A bucket holds

* how many tasks succeeded and failed in it (counted when brokerd took the worker's
  ``task-succeeded`` / ``task-failed`` event, by brokerd's clock: workers' clocks may drift);
* per task name, a histogram of those tasks' runtimes in ``RT_BINS`` logarithmic bins
  (``RT_RATIO`` apart from ``RT_MIN`` seconds up, one ``array('I')`` per name): p50 and p95 are
  read from it as the middle of the bin they fall in, so within ±``RT_RATIO``'s square root
  (~±22 %) of the exact value; at most ``GRAPH_NAMES`` names per bucket, the rest counted under
  ``OTHER``;
* the broker-wide queue depth (ready + delayed, and in flight) sampled once when the bucket
  starts (the state's tick runs at least once a second, see broker.runtime.server.TICK_MAX_SLEEP).

Worst case: 360 buckets x 20 names x 40 bins x 4 B = ~1.2 MB; usually a few KB.  Reading the hour
(``series``) works out a closed bucket's percentiles once: ~6 ms for 360 buckets of 8 names, and the
page fetches it every 10 s (measured on the shared 2-core box; the page's SVG takes ~9 ms more).
Not logged: a restart starts the graphs empty (the task list survives, see events.py).
Pure: ``now`` is passed in.
"""

from __future__ import annotations

import math
from array import array
from collections import deque

GRAPH_BUCKET_S = 10.0  # seconds per point
GRAPH_BUCKETS = 360  # 360 x 10 s: the last hour
GRAPH_NAMES = 20  # task names with their own runtime histogram per bucket; more share OTHER
OTHER = "(other)"
# Runtime histogram: bin i holds runtimes in [RT_MIN * RT_RATIO**i, RT_MIN * RT_RATIO**(i+1)); the first
# and last bins also take what falls below / above.  1.5 apart from 0.1 ms: 40 bins reach ~0.1 days.
RT_MIN = 1e-4  # seconds
RT_RATIO = 1.5
RT_BINS = 40
_LOG_RATIO = math.log(RT_RATIO)


def rt_bin(runtime: float) -> int:
    if not runtime > RT_MIN:  # also NaN
        return 0
    return min(RT_BINS - 1, int(math.log(runtime / RT_MIN) / _LOG_RATIO))


def bin_middle(i: int) -> float:
    """The value a percentile falling in bin i is reported as: the bin's geometric middle."""
    return RT_MIN * RT_RATIO ** (i + 0.5)


def percentiles(hist, ps=(0.5, 0.95)) -> list:
    """The percentiles ``ps`` (ascending, each 0 < p < 1) of a runtime histogram in one pass;
    Nones when it is empty."""
    total = sum(hist)
    if not total:
        return [None] * len(ps)
    out = []
    ranks = [p * total for p in ps]
    seen = 0
    for i, n in enumerate(hist):
        if not n:
            continue
        seen += n
        while ranks and seen >= ranks[0]:
            ranks.pop(0)
            out.append(bin_middle(i))
        if not ranks:
            break
    return out + [bin_middle(RT_BINS - 1)] * len(ranks)


def percentile(hist, p: float) -> float | None:
    """The p-th percentile (0 < p < 1) of a runtime histogram, None when it is empty."""
    return percentiles(hist, (p,))[0]


class Bucket:
    __slots__ = ("start", "succeeded", "failed", "runtimes", "depth", "inflight", "pct")

    def __init__(self, start: float, depth: int | None, inflight: int | None):
        self.start = start
        self.succeeded = 0
        self.failed = 0
        self.runtimes: dict[str, array] = {}
        self.depth = depth
        self.inflight = inflight
        self.pct: dict | None = None  # name -> [p50, p95], worked out once the bucket is closed

    def percentiles(self, closed: bool) -> dict:
        if self.pct is not None:
            return self.pct
        pct = {k: percentiles(h) for k, h in self.runtimes.items()}
        if closed:  # nothing adds to a closed bucket any more (see TaskGraphs._bucket)
            self.pct = pct
        return pct


class TaskGraphs:
    """The last hour in GRAPH_BUCKET_S buckets; fed by the events mixin, read by the page."""

    def __init__(self):
        self.buckets: deque[Bucket] = deque(maxlen=GRAPH_BUCKETS)
        self._current: Bucket | None = None  # the newest bucket

    def _bucket(self, now: float, depth=None, inflight=None) -> Bucket:
        b = self._current
        if b is not None and b.start <= now < b.start + GRAPH_BUCKET_S:
            return b
        start = math.floor(now / GRAPH_BUCKET_S) * GRAPH_BUCKET_S
        if b is None or start > b.start:
            b = self._current = Bucket(start, depth, inflight)
            self.buckets.append(b)
        return b  # (a clock stepping back adds to the newest bucket)

    def needs_depth(self, now: float) -> bool:
        """Whether the bucket of ``now`` has no queue depth yet (the tick then samples it)."""
        b = self._current
        return b is None or b.depth is None or now >= b.start + GRAPH_BUCKET_S

    def sample_depth(self, now: float, depth: int, inflight: int) -> None:
        b = self._bucket(now, depth, inflight)
        if b.depth is None:
            b.depth, b.inflight = depth, inflight

    def task_done(self, now: float, name, ok: bool, runtime) -> None:
        """One task finished (called per task-succeeded / task-failed event: kept to a few steps)."""
        b = self._current
        if b is None or not b.start <= now < b.start + GRAPH_BUCKET_S:
            b = self._bucket(now)
        if ok:
            b.succeeded += 1
        else:
            b.failed += 1
        tr = type(runtime)
        if (tr is not float and tr is not int) or runtime < 0:
            return
        hist = b.runtimes.get(name)
        if hist is None:
            if type(name) is not str or not name or len(b.runtimes) >= GRAPH_NAMES:
                name = OTHER
                hist = b.runtimes.get(name)
            if hist is None:
                hist = b.runtimes[name] = array("I", bytes(4 * RT_BINS))
        hist[rt_bin(runtime)] += 1

    def series(self, now: float, names: int = 5) -> dict:
        """The last hour as lists, one point per bucket, oldest first (a bucket nothing happened in
        is 0 for the counts and null for depth and runtimes).  ``names``: how many task names get
        their runtime p50/p95 series (the ones run most often over the hour)."""
        end = math.floor(now / GRAPH_BUCKET_S) * GRAPH_BUCKET_S
        first = end - GRAPH_BUCKET_S * (GRAPH_BUCKETS - 1)
        by_start = {b.start: b for b in self.buckets if b.start >= first}
        counts: dict[str, int] = {}
        for b in by_start.values():
            for k, h in b.runtimes.items():
                counts[k] = counts.get(k, 0) + sum(h)
        top = sorted(counts, key=lambda k: (-counts[k], k))[:max(0, names)]
        times, ok, failed, depth, inflight = [], [], [], [], []
        rts = {k: {"p50": [], "p95": []} for k in top}
        for i in range(GRAPH_BUCKETS):
            t = first + i * GRAPH_BUCKET_S
            b = by_start.get(t)
            times.append(t)
            ok.append(round(b.succeeded / GRAPH_BUCKET_S, 3) if b else 0)
            failed.append(round(b.failed / GRAPH_BUCKET_S, 3) if b else 0)
            depth.append(b.depth if b else None)
            inflight.append(b.inflight if b else None)
            pct = b.percentiles(b is not self._current) if b else {}
            for k in top:
                p50, p95 = pct.get(k) or (None, None)
                rts[k]["p50"].append(p50)
                rts[k]["p95"].append(p95)
        return {"bucket_s": GRAPH_BUCKET_S, "buckets": GRAPH_BUCKETS, "start": times, "succeeded_per_s": ok,
                "failed_per_s": failed, "queue_depth": depth, "inflight": inflight, "runtime_s": rts,
                "runtime_accuracy": f"±{(math.sqrt(RT_RATIO) - 1) * 100:.0f}% (histogram bins {RT_RATIO:g}x apart)"}
