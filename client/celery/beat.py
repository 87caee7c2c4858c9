"""Let brokerd fire a Celery app's ``beat_schedule`` itself: no ``celery beat`` process.

    $ python -m client.celery.beat proj.celery:app      # pushes the schedule to brokerd and exits

Each entry becomes a brokerd schedule (SCHEDULE_PUT, protocol.md §5.22) owned by ``celery:<app name>``
whose body is the Celery message that ``celery beat`` would have sent, packed as ``message.py`` says;
brokerd fires it at each tick, exactly once across restarts, with its own task id per firing
(``"<entry>@<tick>"``).  Entries the app no longer declares are removed, so running it at every deploy
is safe.  Supported schedules: a number of seconds, a ``timedelta``, ``celery.schedules.schedule`` and
``crontab`` (minute/hour/day-of-week/day-of-month/month-of-year, in the app's timezone); ``solar`` is refused.
"""

from __future__ import annotations

import argparse
import datetime as dt
import sys

from client.celery import message as M
from client.celery.transport import capture_publishes
from client.producer import Client


def owner_of(app) -> str:
    return f"celery:{app.main or 'app'}"


def entry_spec(app, name: str, entry: dict) -> dict:
    """One ``beat_schedule`` entry -> a SCHEDULE_PUT spec; ValueError names what cannot be mapped."""
    from celery.schedules import crontab, schedule

    sched = entry.get("schedule")
    spec: dict = {"owner": owner_of(app)}
    if isinstance(sched, (int, float)) and not isinstance(sched, bool):
        spec["every"] = float(sched)
    elif isinstance(sched, dt.timedelta):
        spec["every"] = sched.total_seconds()
    elif isinstance(sched, crontab):
        fields = (sched._orig_minute, sched._orig_hour, sched._orig_day_of_month, sched._orig_month_of_year,
                  sched._orig_day_of_week)
        spec["cron"] = " ".join(str(f).replace(" ", "") for f in fields)
        spec["tz"] = str(app.conf.timezone or "UTC")
    elif isinstance(sched, schedule):
        spec["every"] = sched.run_every.total_seconds()
    else:
        raise ValueError(f"beat_schedule entry {name!r}: brokerd fires numbers of seconds, timedelta, "
                         f"schedule and crontab; not {type(sched).__name__}")
    options = dict(entry.get("options") or {})
    expires = options.pop("expires", None)
    if isinstance(expires, (int, float)) and expires > 0:
        spec["expires"] = float(expires)
    with capture_publishes() as sent:
        app.send_task(entry["task"], tuple(entry.get("args") or ()), dict(entry.get("kwargs") or {}), **options)
    (queue, raw), = sent
    spec["queue"] = queue
    spec["priority"] = M.priority_of(raw)
    spec["body"] = M.scheduled_body(raw)
    return spec


def sync(app, client: Client | None = None) -> dict:
    """Make brokerd's schedules owned by this app equal to its ``beat_schedule``; returns
    ``{"put": [names], "removed": [names]}``."""
    schedule = dict(app.conf.beat_schedule or {})
    specs = {name: entry_spec(app, name, entry) for name, entry in schedule.items()}
    own = client is None
    c = client or Client(app.conf.broker_url)
    try:
        for name, spec in specs.items():
            c.schedule_put(name, spec)
        removed = [e["name"] for e in c.schedule_list(owner_of(app)) if e["name"] not in specs]
        for name in removed:
            c.schedule_remove(name)
    finally:
        if own:
            c.close()
    return {"put": sorted(specs), "removed": removed}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m client.celery.beat",
                                 description="Push a Celery app's beat_schedule to brokerd, which then fires it.")
    ap.add_argument("app", help="MODULE:ATTRIBUTE of the Celery app, e.g. proj.celery:app")
    args = ap.parse_args(argv)
    from celery.utils.imports import symbol_by_name

    app = symbol_by_name(args.app)
    try:
        done = sync(app)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"brokerd now fires {len(done['put'])} entries ({', '.join(done['put']) or 'none'}); "
          f"removed {len(done['removed'])}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
