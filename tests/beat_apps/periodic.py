"""An app whose periodic tasks the beat tests push (BEAT_VARIANT picks a schedule)."""

import datetime as dt
import os

from client import App
from client.beat import crontab

app = App("periodic", broker=os.environ.get("BROKERD_URL", "127.0.0.1:7700"))


@app.task
def top10():
    return "top"


@app.task
def cleanup(days):
    return days


if os.environ.get("BEAT_VARIANT") == "small":
    app.conf.beat_schedule = {"top-papers-hourly": {"task": "tests.beat_apps.periodic.top10", "schedule": crontab(minute=0)}}
elif os.environ.get("BEAT_VARIANT") == "bad":
    app.conf.beat_schedule = {"broken": {"task": "tests.beat_apps.periodic.top10", "schedule": crontab(hour=25)}}
else:
    app.conf.beat_schedule = {
        "top-papers-hourly": {"task": "tests.beat_apps.periodic.top10", "schedule": crontab(minute=0)},
        "cleanup": {"task": "tests.beat_apps.periodic.cleanup", "schedule": dt.timedelta(minutes=5), "args": (30,),
                    "options": {"expires": 60, "queue": "maintenance"}},
    }

    @app.on_after_configure.connect
    def setup(sender, **kwargs):
        sender.add_periodic_task(1.0, cleanup.s(1), name="every-second")
