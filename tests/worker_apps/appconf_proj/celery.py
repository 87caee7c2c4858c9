"""A project laid out as Celery's docs lay one out, run by ``brokerd-worker -A tests.worker_apps.appconf_proj``
(the worker finds this module, ``proj.celery``, as Celery does).  Used by tests/worker/test_worker_appconf.py."""

import contextvars
import os

from client import App

# What Flask's app_context stands for: a context the app's Task base class enters around every task.
CONTEXT = contextvars.ContextVar("appconf_context", default="no context")

app = App("appconf_proj", broker=os.environ.get("BROKERD_TEST_BROKER", "127.0.0.1:7700"))


class ContextTask(app.Task):
    def __call__(self, *args, **kwargs):
        token = CONTEXT.set("in the app's context")
        try:
            return self.run(*args, **kwargs)
        finally:
            CONTEXT.reset(token)


app.Task = ContextTask  # Flask's documented pattern
app.autodiscover_tasks(["tests.worker_apps.appconf_proj"])  # imports .tasks when the worker starts


@app.on_after_configure.connect
def setup_periodic_tasks(sender, **kwargs):
    # pushed by -B; an hour apart, so it never fires during a test
    sender.add_periodic_task(3600.0, {"task": "tests.worker_apps.appconf_proj.tasks.add", "args": (1, 1)},
                             name="appconf-hourly-add")
