"""celery.app.trace: the formats of the worker's task log lines, the SDK's own (client.worker.logs), under
Celery's names; the SDK logs them on Celery's loggers, with Celery's ``record.data``."""
from celery._compat import sdk

LOG_RECEIVED = sdk("worker.logs", "LOG_RECEIVED", "app.trace.LOG_RECEIVED")
LOG_SUCCESS = sdk("worker.logs", "LOG_SUCCESS", "app.trace.LOG_SUCCESS")
LOG_FAILURE = sdk("worker.logs", "LOG_FAILURE", "app.trace.LOG_FAILURE")
LOG_RETRY = sdk("worker.logs", "LOG_RETRY", "app.trace.LOG_RETRY")
LOG_IGNORED = sdk("worker.logs", "LOG_IGNORED", "app.trace.LOG_IGNORED")
LOG_REJECTED = sdk("worker.logs", "LOG_REJECTED", "app.trace.LOG_REJECTED")
