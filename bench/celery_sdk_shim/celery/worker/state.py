"""celery.worker.state: the worker's in-process registries.  revoked_stamps and successful_requests are the
SDK's own (every worker of this process fills them); the others have no counterpart and stay empty."""
from celery._compat import missing, sdk

revoked = set()
active_requests = set()
reserved_requests = set()
total_count = {}
try:
    from client.worker.state import successful_requests
except ImportError:  # an SDK without it: a set nobody fills
    successful_requests = set()
revoked_stamps = sdk("worker.control", "revoked_stamps", "worker.state.revoked_stamps")
Request = missing("worker.state.Request")
