"""Periodic tasks, kept by brokerd: ``crontab``, ``beat_schedule``, ``brokerd-beat``.

    app.conf.beat_schedule = {
        "top-papers-hourly": {"task": "proj.tasks.top10", "schedule": crontab(minute=0)},
        "cleanup": {"task": "proj.tasks.cleanup", "schedule": 300.0, "options": {"expires": 60}},
    }

    $ brokerd-beat proj.tasks:app      # pushes the schedule to brokerd and exits

There is no scheduler process to keep running: brokerd fires each entry at
its ticks, exactly once per tick across restarts.  ``brokerd-beat`` (or
``brokerd-worker --beat``) makes brokerd's entries for this app equal to the
app's declaration — adding, replacing, and removing entries the app no longer
declares — so many deploys may run it at once.
"""

from __future__ import annotations

import argparse
import datetime as dt
import sys

from client import signals
from client.options import redact
from client.envelope import make_envelope
from client.worker_cli import load_app  # the same MODULE:APP rules as the worker

CATCHUP = ("latest", "all", "skip")


class crontab:
    """Celery's ``crontab(minute='*', hour='*', day_of_week='*', day_of_month='*', month_of_year='*')``."""

    def __init__(self, minute="*", hour="*", day_of_week="*", day_of_month="*", month_of_year="*", tz=None):
        def field(v):
            if isinstance(v, (list, tuple, set, frozenset, range)):
                return ",".join(str(x) for x in sorted(v) if True) if v else "*"
            return str(v).replace(" ", "")

        self.minute, self.hour = field(minute), field(hour)
        self.day_of_week, self.day_of_month, self.month_of_year = field(day_of_week), field(day_of_month), field(month_of_year)
        self.tz = tz

    @property
    def expr(self) -> str:
        return f"{self.minute} {self.hour} {self.day_of_month} {self.month_of_year} {self.day_of_week}"

    def __repr__(self):
        return f"<crontab: {self.expr}>"


def schedule_spec(app, name: str, entry: dict) -> dict:
    """One ``beat_schedule`` entry → a brokerd SCHEDULE_PUT spec."""
    if "task" not in entry or "schedule" not in entry:
        raise ValueError(f"beat_schedule entry {name!r} needs 'task' and 'schedule'")
    sched = entry["schedule"]
    opts = dict(entry.get("options") or {})
    spec: dict = {}
    if isinstance(sched, crontab):
        spec["cron"] = sched.expr
        spec["tz"] = sched.tz or app.conf.get("timezone") or "UTC"
    elif isinstance(sched, dt.timedelta):
        spec["every"] = sched.total_seconds()
    elif isinstance(sched, (int, float)) and not isinstance(sched, bool):
        spec["every"] = float(sched)
    else:
        raise ValueError(f"beat_schedule entry {name!r}: schedule must be seconds, a timedelta or crontab(...)")
    task_name = entry["task"]
    queue, priority = app.queue_and_priority(task_name, app.tasks.get(task_name), opts.get("queue"),
                                             opts.get("priority"))
    spec["queue"] = queue
    spec["priority"] = int(priority)
    env = make_envelope(task_name, "", tuple(entry.get("args") or ()), dict(entry.get("kwargs") or {}),
                        headers=opts.get("headers"))
    if app.signer is not None:  # brokerd fills in id, root_id and expires at each tick: scope "schedule"
        app.signer.sign(env, "schedule", schedule=name)
    spec["body"] = env
    expires = opts.get("expires", entry.get("expires"))
    if expires is not None:
        spec["expires"] = float(expires.total_seconds() if isinstance(expires, dt.timedelta) else expires)
    catchup = entry.get("catchup", opts.get("catchup", "latest"))
    if catchup not in CATCHUP:
        raise ValueError(f"beat_schedule entry {name!r}: catchup must be one of latest, all, skip")
    spec["catchup"] = catchup
    spec["owner"] = app.main or "app"
    return spec


def push(app) -> dict:
    """Make brokerd's entries owned by this app equal to its declared schedule."""
    entries = app.periodic_entries()
    specs = {name: schedule_spec(app, name, e) for name, e in entries.items()}
    client = app.client
    owner = app.main or "app"
    before = {e["name"] for e in client.schedule_list(owner)}
    for name, spec in specs.items():
        client.schedule_put(name, spec)
    removed = sorted(before - set(specs))
    for name in removed:
        client.schedule_remove(name)
    return {"put": sorted(specs), "removed": removed}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="brokerd-beat", description="Push an app's periodic tasks to brokerd, then exit.")
    p.add_argument("app", metavar="MODULE:APP", help="where the App is, e.g. proj.tasks:app")
    p.add_argument("-b", "--broker", metavar="URL", help="brokerd://[user:token@]host:port, brokerds://...?ca=FILE "
                   "for TLS, or HOST:PORT (default: the app's broker_url, else $BROKERD_URL)")
    args = p.parse_args(argv)
    try:
        app = load_app(args.app)
    except SystemExit:
        raise
    except Exception as exc:
        print(f"brokerd-beat: {exc}", file=sys.stderr)
        return 2
    if args.broker:
        app.conf.broker_url = args.broker
    signals.beat_init.send(sender=app)  # Celery's hook, before the schedule goes out
    try:
        done = push(app)
    except ValueError as exc:
        print(f"brokerd-beat: {exc}", file=sys.stderr)
        return 2
    except Exception as exc:
        print(f"brokerd-beat: cannot update schedules at {redact(app.conf.broker_url)}: {exc}", file=sys.stderr)
        return 3
    print(f"brokerd-beat: {len(done['put'])} entries pushed, {len(done['removed'])} removed"
          + (f" ({', '.join(done['removed'])})" if done["removed"] else ""))
    app.close()
    return 0


if __name__ == "__main__":
    # Run as the real module, so crontab here and in the user's app is one class.
    from client.beat import main as _main

    sys.exit(_main())
