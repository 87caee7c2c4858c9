"""Results, kept by brokerd and looked up by task id: ``AsyncResult``, ``GroupResult``.

brokerd stores each task's state and result (RESULT_SET); ``get()`` asks with
RESULT_GET and a wait, so brokerd holds the request until the result is ready
and there is no polling loop.  A stored FAILURE comes back as an exception:
a Python builtin as itself, the task layer's own as themselves, anything else
as ``RemoteError`` naming the remote type and message.
"""

from __future__ import annotations

import builtins
import logging
import time

from client._current import current_app
from client.exceptions import LOCAL_FAILURES, Reject, RemoteError, TaskRevokedError, TimeoutError

log = logging.getLogger("brokerd.client")

READY_STATES = frozenset(("SUCCESS", "FAILURE", "REVOKED", "REJECTED"))
WAIT_CHUNK = 600.0  # seconds per RESULT_GET when waiting without a timeout
SLOW_GET_WARNING = 60.0  # get() without a timeout logs why it may be waiting, once, after this long


class AsyncResult:
    """A task's result, kept by brokerd, looked up by id."""

    def __init__(self, id: str, app=None, parent: "AsyncResult | None" = None, queue: str | None = None):
        self.id = id
        self.app = app or current_app()
        self.parent = parent
        self.queue = queue  # where it was published, when this process published it
        self._cache: dict | None = None

    def __repr__(self):
        return f"<AsyncResult: {self.id}>"

    def __eq__(self, other):
        return isinstance(other, AsyncResult) and other.id == self.id

    def __hash__(self):
        return hash(self.id)

    def _why_waiting(self, state: str) -> str:
        """A hint for a task that is not done: its queue has no consumer, or nothing known."""
        if state != "PENDING" or not self.queue:
            return ""
        try:
            st = self.app.client.stats(self.queue)
        except Exception:  # noqa: BLE001 - a hint must never hide the timeout itself
            return ""
        if st.get("consumers", 0) == 0:
            return (f"; it is queued in {self.queue!r}, which has no consumer: start a worker that reads it "
                    f"(brokerd-worker MODULE:APP -Q {self.queue})")
        return f"; queue {self.queue!r} has {st['consumers']} consumer(s) and {st.get('ready', 0)} message(s) waiting"

    def _fetch(self, wait=None) -> dict:
        if self._cache is not None:
            return self._cache
        meta = self.app.client.get_result(self.id, wait)
        if meta["state"] in READY_STATES:
            self._cache = meta
        return meta

    @property
    def state(self) -> str:
        return self._fetch()["state"]

    status = state

    def ready(self) -> bool:
        return self.state in READY_STATES

    def successful(self) -> bool:
        return self.state == "SUCCESS"

    def failed(self) -> bool:
        return self.state == "FAILURE"

    @property
    def result(self):
        """The return value, or the exception for a failure (not raised)."""
        meta = self._fetch()
        if meta["state"] == "FAILURE":
            return exception_from(meta.get("meta") or {})
        return meta.get("result") if meta["state"] == "SUCCESS" else (meta.get("meta") or None)

    info = result

    @property
    def traceback(self) -> str | None:
        return (self._fetch().get("meta") or {}).get("traceback")

    def get(self, timeout: float | None = None, propagate: bool = True, interval: float | None = None):
        """Wait for the result (brokerd holds the request; no polling loop).

        Returns the task's return value.  A failed task re-raises its exception:
        a Python builtin as itself, anything else as ``RemoteError`` naming the
        remote type and message.  ``timeout`` runs out → ``TimeoutError``.
        """
        start = time.monotonic()
        deadline = None if timeout is None else start + timeout
        warned = False
        while True:
            left = WAIT_CHUNK if deadline is None else max(0.0, deadline - time.monotonic())
            if deadline is None and not warned:
                left = min(left, SLOW_GET_WARNING)
            meta = self._fetch(wait=left)
            if meta["state"] in READY_STATES:
                break
            if deadline is not None and time.monotonic() >= deadline:
                raise TimeoutError(f"task {self.id} did not finish within {timeout:g}s (state {meta['state']})"
                                   + self._why_waiting(meta["state"]))
            if deadline is None and not warned and time.monotonic() - start >= SLOW_GET_WARNING:
                warned = True  # get() without a timeout: say once why it may be waiting for ever
                log.warning("still waiting for task %s after %gs (state %s)%s", self.id,
                            time.monotonic() - start, meta["state"], self._why_waiting(meta["state"]))
        if meta["state"] == "SUCCESS":
            return meta.get("result")
        if meta["state"] == "FAILURE":
            exc = exception_from(meta.get("meta") or {})
        elif meta["state"] == "REJECTED":  # the task raised Reject(requeue=False): Celery's REJECTED
            exc = Reject(f"task {self.id} was rejected: {(meta.get('meta') or {}).get('exc_message', '')}")
        else:
            exc = TaskRevokedError(f"task {self.id} was revoked")
        if propagate:
            raise exc
        return exc

    wait = get

    def forget(self) -> None:
        self._cache = None
        self.app.client.forget_result(self.id)

    def revoke(self, terminate: bool = False) -> None:
        """Never run this task; with ``terminate``, kill it where it runs.  Kept by
        brokerd across restarts (for a day)."""
        self._cache = None
        self.app.control.revoke(self.id, terminate=terminate)

    @property
    def children(self) -> list:
        return []


class EagerResult(AsyncResult):
    """The result of ``Task.apply``: already known, nothing to ask brokerd."""

    def __init__(self, id, value, state, exc=None):
        self.id = id
        self.app = None
        self.parent = None
        self._value = value
        self._exc = exc
        self._cache = {"id": id, "state": state, "result": value, "meta": None}

    def get(self, timeout=None, propagate=True, interval=None):
        if self._exc is not None:
            if propagate:
                raise self._exc
            return self._exc
        return self._value

    @property
    def result(self):
        return self._exc if self._exc is not None else self._value

    def forget(self):
        pass


def exception_from(meta: dict) -> BaseException:
    """A FAILURE's meta → the exception to raise: builtins as themselves."""
    typ = meta.get("exc_type") or "Exception"
    msg = meta.get("exc_message") or ""
    cls = getattr(builtins, typ, None)
    if isinstance(cls, type) and issubclass(cls, BaseException) and not issubclass(cls, (KeyboardInterrupt, SystemExit)):
        try:
            exc = cls(msg) if msg else cls()
        except Exception:
            exc = RemoteError(typ, msg, meta.get("traceback"))
    else:
        for local in LOCAL_FAILURES:
            if local.__name__ == typ:
                exc = local(msg)
                break
        else:
            exc = RemoteError(typ, msg, meta.get("traceback"))
    exc.remote_traceback = meta.get("traceback")
    return exc


class GroupResult:
    """The results of a group (or a chord's header), in order."""

    def __init__(self, id: str, results: list, app=None):
        self.id = id
        self.results = list(results)
        self.app = app

    def __iter__(self):
        return iter(self.results)

    def __len__(self):
        return len(self.results)

    def __getitem__(self, i):
        return self.results[i]

    def get(self, timeout: float | None = None, propagate: bool = True):
        deadline = None if timeout is None else time.monotonic() + timeout
        out = []
        for r in self.results:
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            out.append(r.get(timeout=left, propagate=propagate))
        return out

    join = get

    def ready(self) -> bool:
        return all(r.ready() for r in self.results)

    def successful(self) -> bool:
        return all(r.successful() for r in self.results)

    def failed(self) -> bool:
        return any(r.failed() for r in self.results)

    def completed_count(self) -> int:
        return sum(1 for r in self.results if r.successful())

    def revoke(self, terminate: bool = False) -> None:
        if self.results:
            self.results[0].app.client.revoke([r.id for r in self.results], terminate=terminate)

    def save(self) -> "GroupResult":
        """Keep the member ids in brokerd under the group id (``GroupResult.restore``)."""
        self.app.client.store_result(self.id, "SUCCESS", [r.id for r in self.results], {"group": True})
        return self

    @classmethod
    def restore(cls, group_id: str, app=None) -> "GroupResult | None":
        app = app or current_app()
        meta = app.client.get_result(group_id)
        if meta["state"] != "SUCCESS" or not (meta.get("meta") or {}).get("group"):
            return None
        return cls(group_id, [AsyncResult(i, app=app) for i in meta["result"]], app=app)

    def __repr__(self):
        return f"<GroupResult: {self.id} [{', '.join(r.id for r in self.results)}]>"
