"""celery.contrib.testing.worker: the SDK's in-process worker for tests."""
from celery._compat import sdk

start_worker = sdk("worker.testing", "start_worker", "contrib.testing.worker.start_worker")
TestWorkController = sdk("worker.runtime", "Worker", "contrib.testing.worker.TestWorkController")
