"""celery.worker.state: the worker's in-process registries; ours live in another process (brokerd-worker)."""
from celery._compat import missing

revoked = set()
active_requests = set()
reserved_requests = set()
total_count = {}
successful_requests = set()
Request = missing("worker.state.Request")
