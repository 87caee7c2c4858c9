"""Timings for schedules: every N seconds, or a crontab in a named time zone.

Crontab fields are read as Celery's ``crontab()`` reads them: ``minute hour
day-of-month month day-of-week``; ``*``, ``*/n``, ``a-b``, ``a-b/n`` and comma
lists; months ``jan``-``dec`` or 1-12; days of week ``sun``-``sat`` or 0-6
(0 and 7 are Sunday).  Like Celery (and unlike Vixie cron), a time must match
*both* the day of month and the day of week.

Time zones are IANA names (``zoneinfo``); a tick is an absolute instant.
Across a DST change: a wall-clock time that happens twice (autumn) fires
once, at its first occurrence; one that does not exist (spring) fires at the
first instant after the gap, so no tick is silently lost.

Pure: no clock.  ``next_after(t)`` is given the time.
"""

from __future__ import annotations

import datetime as dt
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from broker.errors import BadRequest

MONTHS = {m: i for i, m in enumerate(
    ["jan", "feb", "mar", "apr", "may", "jun", "jul", "aug", "sep", "oct", "nov", "dec"], start=1)}
DAYS = {d: i for i, d in enumerate(["sun", "mon", "tue", "wed", "thu", "fri", "sat"])}
FIELDS = (  # name, low, high, names
    ("minute", 0, 59, None),
    ("hour", 0, 23, None),
    ("day_of_month", 1, 31, None),
    ("month_of_year", 1, 12, MONTHS),
    ("day_of_week", 0, 7, DAYS),
)
SEARCH_DAYS = 366 * 8  # a crontab that matches nothing in 8 years (Feb 30) matches never
MIN_EVERY = 0.001  # seconds


def _value(text: str, name: str, low: int, high: int, names) -> int:
    t = text.strip().lower()
    if names and t in names:
        return names[t]
    try:
        v = int(t)
    except ValueError:
        raise BadRequest(f"crontab field {name}: {text!r} is not a number{' or a name' if names else ''}") from None
    if not low <= v <= high:
        raise BadRequest(f"crontab field {name}: {v} is out of range {low}-{high}")
    return v


def parse_field(spec: str, name: str, low: int, high: int, names=None) -> frozenset[int]:
    out: set[int] = set()
    for part in str(spec).split(","):
        part = part.strip()
        if not part:
            raise BadRequest(f"crontab field {name}: empty item in {spec!r}")
        step = 1
        if "/" in part:
            part, _, s = part.partition("/")
            try:
                step = int(s)
            except ValueError:
                raise BadRequest(f"crontab field {name}: step {s!r} is not a number") from None
            if step < 1:
                raise BadRequest(f"crontab field {name}: step must be >= 1")
        if part == "*":
            a, b = low, high
        elif "-" in part:
            x, _, y = part.partition("-")
            a, b = _value(x, name, low, high, names), _value(y, name, low, high, names)
            if a > b:
                raise BadRequest(f"crontab field {name}: range {part!r} runs backwards")
        else:
            a = _value(part, name, low, high, names)
            b = high if step > 1 else a
        out.update(range(a, b + 1, step))
    return frozenset(out)


class Crontab:
    def __init__(self, expr: str, tz: str = "UTC"):
        if not isinstance(tz, str) or not tz:
            raise BadRequest(f"tz must be an IANA time zone name such as UTC or Europe/Paris (got {tz!r})")
        if not isinstance(expr, str):
            raise BadRequest(f"a crontab is a text string of 5 fields (got {expr!r})")
        parts = expr.split()
        if len(parts) != 5:
            raise BadRequest(
                f"a crontab has 5 fields (minute hour day-of-month month day-of-week), got {len(parts)} in {expr!r}"
            )
        sets = [parse_field(p, *f) for p, f in zip(parts, FIELDS)]
        self.minutes, self.hours, self.doms, self.months, dows = sets
        self.dows = frozenset(d % 7 for d in dows)
        self.expr = expr
        try:
            self.zone = ZoneInfo(tz)
        except (ZoneInfoNotFoundError, ValueError, TypeError):
            raise BadRequest(f"unknown time zone {tz!r}; use an IANA name such as UTC or Europe/Paris") from None
        self.tz = tz
        self._hours = sorted(self.hours)
        self._minutes = sorted(self.minutes)

    def _instant(self, day: dt.date, hour: int, minute: int) -> float:
        """The instant a local wall-clock time names (first occurrence; after a gap if missing)."""
        naive = dt.datetime(day.year, day.month, day.day, hour, minute)
        ts = naive.replace(tzinfo=self.zone, fold=0).timestamp()
        if dt.datetime.fromtimestamp(ts, self.zone).replace(tzinfo=None) == naive:
            return ts
        # In a spring-forward gap: the wall clock never shows ``naive``.  Fire at
        # the first instant whose wall-clock time is past it: the end of the gap.
        lo = naive.replace(tzinfo=self.zone, fold=1).timestamp()  # wall clock before the gap
        hi = ts  # wall clock after the gap
        while hi - lo > 1:
            mid = (lo + hi) // 2
            if dt.datetime.fromtimestamp(mid, self.zone).replace(tzinfo=None) >= naive:
                hi = mid
            else:
                lo = mid
        return float(hi)

    def next_after(self, t: float) -> float | None:
        """The first tick strictly after instant ``t``."""
        start = dt.datetime.fromtimestamp(t, self.zone)
        day = start.date()
        for _ in range(SEARCH_DAYS):
            if day.month in self.months and day.day in self.doms and (day.isoweekday() % 7) in self.dows:
                for h in self._hours:
                    for m in self._minutes:
                        ts = self._instant(day, h, m)
                        if ts > t:
                            return ts
            day += dt.timedelta(days=1)
        return None

    def describe(self) -> str:
        return f"cron {self.expr} {self.tz}"


class Every:
    """Ticks at anchor + k × seconds."""

    def __init__(self, seconds, anchor):
        if type(seconds) not in (int, float) or not MIN_EVERY <= seconds < float("inf"):
            raise BadRequest(f"every must be a number of seconds >= {MIN_EVERY} (got {seconds!r})")
        if type(anchor) not in (int, float) or not abs(anchor) < float("inf"):
            raise BadRequest(f"anchor must be a Unix time in seconds (got {anchor!r})")
        self.seconds = float(seconds)
        self.anchor = float(anchor)

    def next_after(self, t: float) -> float:
        if t < self.anchor:
            return self.anchor  # a future anchor is the first tick
        k = int((t - self.anchor) // self.seconds) + 1
        nxt = self.anchor + k * self.seconds
        while nxt <= t:  # float rounding
            k += 1
            nxt = self.anchor + k * self.seconds
        return nxt

    def describe(self) -> str:
        return f"every {self.seconds:g}s"


def timing_from(spec: dict, anchor: float):
    if "every" in spec and "cron" in spec:
        raise BadRequest("a schedule has either 'every' or 'cron', not both")
    if "every" in spec:
        return Every(spec["every"], spec.get("anchor", anchor))
    if "cron" in spec:
        return Crontab(spec["cron"], spec.get("tz") or "UTC")
    raise BadRequest("a schedule needs a timing: 'every' (seconds) or 'cron' (5 fields)")
