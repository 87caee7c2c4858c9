"""What this process's worker remembers of the tasks it ran (Celery's ``celery.worker.state``).

``successful_requests``: the ids of the tasks that ended in SUCCESS here, newest last.  Celery's own
integration tests, and code written against Celery's worker, wait on it ("has the worker finished
this task?") where the result alone cannot say (``ignore_result``: no result is ever stored).  It is
per process: an in-process worker (``client.worker.testing.start_worker``) fills the test's own.
"""

from __future__ import annotations

import os
import threading
from collections import OrderedDict

# How many successful task ids to keep (Celery's SUCCESSFUL_MAX, and its environment variable): the
# oldest goes first; 1000 ids are ~100 KB, and a caller asks about a task that finished moments ago.
SUCCESSFUL_MAX = int(os.environ.get("CELERY_WORKER_SUCCESSFUL_MAX", "1000"))


class RecentIds:
    """A set of at most ``maxlen`` ids that forgets the oldest first (Celery's LimitedSet, without
    expiry); safe to add to from the worker's thread while another thread reads it."""

    def __init__(self, maxlen: int):
        self.maxlen = max(1, maxlen)
        self._ids: OrderedDict[str, None] = OrderedDict()
        self._lock = threading.Lock()

    def add(self, task_id: str) -> None:
        ids = self._ids
        with self._lock:
            if task_id in ids:
                ids.move_to_end(task_id)
            else:
                ids[task_id] = None  # a new key goes last already
                if len(ids) > self.maxlen:
                    ids.popitem(last=False)

    def discard(self, task_id: str) -> None:
        with self._lock:
            self._ids.pop(task_id, None)

    def clear(self) -> None:
        with self._lock:
            self._ids.clear()

    def __contains__(self, task_id) -> bool:
        return task_id in self._ids

    def __len__(self) -> int:
        return len(self._ids)

    def __iter__(self):
        with self._lock:
            return iter(list(self._ids))


successful_requests = RecentIds(SUCCESSFUL_MAX)
