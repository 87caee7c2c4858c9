"""The app the session worker (brokerd-worker) imports: Celery's test tasks bound to our App."""
import os

from celery import Celery, bind_shared_tasks

app = Celery("celery.tests", broker=os.environ["TEST_BROKER"])
app.set_current()
import t.integration.tasks  # noqa: E402,F401  (Celery's own task module, unchanged)

bind_shared_tasks(app)
