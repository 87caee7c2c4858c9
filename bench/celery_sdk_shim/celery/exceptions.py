from client.exceptions import (Ignore, MaxRetriesExceededError, Reject, Retry,  # noqa: F401
                               SoftTimeLimitExceeded, TimeLimitExceeded, TimeoutError, WorkerLostError)

from celery._compat import sdk

ChordError = sdk("exceptions", "ChordError", "exceptions.ChordError")
ImproperlyConfigured = sdk("exceptions", "ImproperlyConfigured", "exceptions.ImproperlyConfigured")
