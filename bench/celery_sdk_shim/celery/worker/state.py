"""celery.worker.state: the worker's in-process registries.  revoked_stamps is the SDK's own (every worker
of this process reads it); the others have no counterpart and stay empty."""
from celery._compat import missing, sdk

revoked = set()
active_requests = set()
reserved_requests = set()
total_count = {}
successful_requests = set()
revoked_stamps = sdk("worker.control", "revoked_stamps", "worker.state.revoked_stamps")
Request = missing("worker.state.Request")
