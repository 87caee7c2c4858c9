"""celery.app: only the submodules Celery's integration tests read (see trace.py)."""
