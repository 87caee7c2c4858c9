"""Celery's signals: the SDK's ``client.signals`` when it exists, else signals nobody sends."""
import importlib

from client.app import Signal

try:
    _sdk = importlib.import_module("client.signals")
except ImportError:
    _sdk = None

_NAMES = ("before_task_publish", "after_task_publish", "task_received", "task_prerun", "task_postrun",
          "task_success", "task_failure", "task_retry", "task_revoked", "task_rejected", "task_unknown",
          "worker_process_init", "worker_ready", "worker_shutdown", "after_setup_logger")
for _n in _NAMES:
    globals()[_n] = getattr(_sdk, _n, None) or Signal(_n)
