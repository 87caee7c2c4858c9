"""Results, kept by brokerd and looked up by task id: ``AsyncResult``, ``GroupResult``.

brokerd stores each task's state and result (RESULT_SET); ``get()`` asks with
RESULT_GET and a wait, so brokerd holds the request until the result is ready
and there is no polling loop.  A stored FAILURE comes back as an exception:
a Python builtin as itself, the task layer's own as themselves, anything else
as ``RemoteError`` naming the remote type and message.
"""

from __future__ import annotations

import builtins
import datetime
import importlib
import logging
import re
import sys
import time

from client._current import current_app, current_request
from client.exceptions import (LOCAL_FAILURES, ChainError, ChordError, Reject, TaskRevokedError, TimeoutError,
                               remote_error_class)

log = logging.getLogger("brokerd.client")

READY_STATES = frozenset(("SUCCESS", "FAILURE", "REVOKED", "REJECTED"))
WAIT_CHUNK = 600.0  # seconds per RESULT_GET when waiting without a timeout
SLOW_GET_WARNING = 60.0  # get() without a timeout logs why it may be waiting, once, after this long


class AsyncResult:
    """A task's result, kept by brokerd, looked up by id."""

    def __init__(self, id: str, app=None, parent: "AsyncResult | None" = None, queue: str | None = None,
                 name: str | None = None, **_):
        self.id = id
        self._name = name  # the task's name, when this process sent it
        self.app = app or current_app()
        self.parent = parent
        self.queue = queue  # where it was published, when this process published it
        self._cache: dict | None = None
        self._on_ready: list = []  # then() callbacks, called once when this process first sees it ready
        # True when it was sent with ignore_result (app.publish_task sets it): no result will ever be
        # stored, so get() returns None at once instead of waiting for ever (Celery's ``ignored``)
        self.ignored = False

    def __repr__(self):
        return f"<AsyncResult: {self.id}>"

    @property
    def task_id(self) -> str:
        return self.id

    @property
    def backend(self) -> "ResultBackend":
        """Celery's ``result.backend``: here brokerd itself (RESULT_GET/SET/FORGET)."""
        return ResultBackend(self.app)

    @property
    def date_done(self):
        """When the result was stored (a UTC datetime), or None while it is not ready."""
        meta = self._fetch()
        if meta["state"] not in READY_STATES or meta.get("updated") is None:
            return None
        return datetime.datetime.fromtimestamp(meta["updated"], datetime.timezone.utc)

    def _extended(self, key):
        """``name``/``args``/``kwargs``: kept in the result's meta when the worker's app sets
        ``result_extended`` (Celery's setting); the name also from brokerd's task history."""
        meta = self._fetch().get("meta")
        if isinstance(meta, dict) and key in meta:
            return meta[key]
        if key == "name":
            if self._name is not None:
                return self._name
            info = self.app.client.task_info(self.id)
            return (info or {}).get("name")
        return None

    @property
    def name(self):
        return self._extended("name")

    @property
    def args(self):
        return self._extended("args")

    @property
    def kwargs(self):
        return self._extended("kwargs")

    def then(self, callback, on_error=None, weak=False):
        """Call ``callback(self)`` once this process sees the result ready (at once if it is; else when
        ``get()``, ``ready()`` or ``state`` first finds it ready).  A failed task calls ``on_error(exc)``
        instead, when given.  brokerd pushes nothing: there is no background thread."""
        self._on_ready.append((callback, on_error))
        if self._cache is not None:
            self._fire()
        return self

    def _fire(self):
        pending, self._on_ready = self._on_ready, []
        for callback, on_error in pending:
            try:
                if on_error is not None and self._cache["state"] != "SUCCESS":
                    on_error(exception_from(self._cache.get("meta") or {}, self.app))
                else:
                    callback(self)
            except Exception:  # noqa: BLE001 - a callback must not break get()
                log.exception("then() callback %r of task %s raised", callback, self.id)

    def __eq__(self, other):
        """Equal to a result with the same id, or to the id itself (Celery's: ``task_id in group.results``)."""
        if isinstance(other, AsyncResult):
            return other.id == self.id
        if isinstance(other, str):
            return other == self.id
        return NotImplemented

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
            if self._on_ready:
                self._fire()
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
            return exception_from(meta.get("meta") or {}, self.app)
        return meta.get("result") if meta["state"] == "SUCCESS" else (meta.get("meta") or None)

    info = result

    @property
    def traceback(self) -> str | None:
        return (self._fetch().get("meta") or {}).get("traceback")

    def get(self, timeout: float | None = None, propagate: bool = True, interval: float | None = None,
            no_ack=True, follow_parents=True, callback=None, on_message=None, on_interval=None,
            disable_sync_subtasks: bool = True, EXCEPTION_STATES=None, PROPAGATE_STATES=None):
        """Wait for the result (brokerd holds the request; no polling loop).

        Inside a running task this raises RuntimeError unless ``disable_sync_subtasks=False``, as
        Celery does: a task that waits for another can deadlock a pool whose slots all wait.

        Returns the task's return value.  A failed task re-raises its exception:
        a Python builtin as itself, anything else as ``RemoteError`` naming the
        remote type and message.  ``timeout`` runs out → ``TimeoutError``.
        """
        if self.ignored and self._fetch()["state"] not in READY_STATES:
            return None  # no result will come (Celery's); a FAILURE brokerd already stores is still raised
        if disable_sync_subtasks:
            assert_will_not_block()
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
            value = meta.get("result")
            if callback is not None:
                callback(self.id, value)
            return value
        if meta["state"] == "FAILURE":
            exc = exception_from(meta.get("meta") or {}, self.app)
            if isinstance(exc, (ChordError, ChainError)):
                exc = self._first_failure(exc)
        elif meta["state"] == "REJECTED":  # the task raised Reject(requeue=False): Celery's REJECTED
            exc = Reject(f"task {self.id} was rejected: {(meta.get('meta') or {}).get('exc_message', '')}")
        else:
            exc = TaskRevokedError(f"task {self.id} was revoked")
        if propagate:
            raise exc
        return exc

    wait = get

    def _first_failure(self, exc):
        """The exception of the task whose failure a ChordError/ChainError reports (Celery raises the failed
        member's own exception from a chord, and the failed step's from a chain), found by the task id in the
        documented message (protocol.md §5.27, §8); that task may itself report another.  ``exc`` itself when
        the failed task's result cannot be read (forgotten, expired, not a FAILURE)."""
        found = exc
        for _ in range(FAILURE_HOPS_MAX):
            m = _FAILED_ID.match(getattr(found, "exc_message", "") or "")
            if m is None:
                break
            try:
                cause = self.app.client.get_result(m.group(1) or m.group(2))
            except Exception:  # noqa: BLE001 - only a better error was being looked for
                break
            if cause.get("state") != "FAILURE":
                break
            found = exception_from(cause.get("meta") or {}, self.app)
            if not isinstance(found, (ChordError, ChainError)):
                found.__cause__ = exc
                return found
        return exc

    def forget(self) -> None:
        self._cache = None
        self.app.client.forget_result(self.id)

    def revoke(self, terminate: bool = False) -> None:
        """Never run this task; with ``terminate``, kill it where it runs.  Kept by
        brokerd across restarts (for a day)."""
        self._cache = None
        self.app.control.revoke(self.id, terminate=terminate)

    def revoke_by_stamped_headers(self, headers: dict, terminate: bool = False, **kwargs) -> None:
        """Celery's: ``app.control.revoke_by_stamped_headers`` (any task carrying these stamp values)."""
        self._cache = None
        self.app.control.revoke_by_stamped_headers(headers, terminate=terminate, **kwargs)

    @property
    def children(self) -> list:
        """AsyncResults of the tasks this task sent while it ran (kept in its result's meta by the
        worker); [] until it is ready, or when it sent none."""
        meta = (self._cache or {}).get("meta") if self._cache is not None else None
        if meta is None and self._cache is None:
            meta = self._fetch().get("meta")
        ids = meta.get("children") if isinstance(meta, dict) else None
        if not isinstance(ids, list):
            return []
        return [AsyncResult(i, app=self.app, parent=self) for i in ids if isinstance(i, str)]

    def collect(self, intermediate: bool = False, **kwargs):
        """Yield ``(result, value)`` for this task and then, depth first, the tasks it sent (Celery's
        order).  Each is waited for (``kwargs`` go to its ``get``)."""
        stack = [self]
        while stack:
            node = stack.pop()
            yield node, node.get(**kwargs)
            stack.extend(reversed(node.children))

    def iterdeps(self, intermediate: bool = False):
        stack = [(None, self)]
        while stack:
            parent, node = stack.pop()
            yield parent, node
            stack.extend((node, c) for c in reversed(node.children))

    def as_tuple(self):
        """Celery's serialized form: ``((id, parent's as_tuple or None), None)``; ``result_from_tuple`` reads it."""
        return (self.id, self.parent.as_tuple() if self.parent is not None else None), None

    def as_list(self) -> list:
        """This id, then its parents' ids."""
        return [self.id, *(self.parent.as_list() if self.parent is not None else ())]


# A ChordError/ChainError's message names the task whose failure it reports (protocol.md §5.27 and §8).
_FAILED_ID = re.compile(r"^(?:chord member (\S+?)|chain step [^\[\]]*\[([^\[\]]+)\]) failed: ")
FAILURE_HOPS_MAX = 8  # chords in chains in chords followed to the first failure; deeper: the error as it is


def assert_will_not_block() -> None:
    """RuntimeError when called inside a task that a worker runs (Celery's rule for result.get())."""
    req = current_request.get()
    if req is not None and not req.is_eager:
        raise RuntimeError(
            "Never call result.get() within a task: a task waiting for another can deadlock the pool when "
            "every slot waits. Use a chain, a chord or a callback (link=) instead, or, if you must, "
            "get(disable_sync_subtasks=False)"
        )


class ResultBackend:
    """``result.backend`` / ``app.backend``: the results kept by brokerd, in Celery's method names."""

    def __init__(self, app):
        self.app = app

    def get_task_meta(self, task_id: str) -> dict:
        meta = self.app.client.get_result(task_id)
        return {"task_id": task_id, "status": meta["state"], "result": meta.get("result"),
                "meta": meta.get("meta"), "date_done": meta.get("updated")}

    def get_state(self, task_id: str) -> str:
        return self.app.client.get_result(task_id)["state"]

    get_status = get_state

    def get_result(self, task_id: str):
        return self.app.client.get_result(task_id).get("result")

    def store_result(self, task_id: str, result, state: str, meta=None, **_):
        self.app.client.store_result(task_id, state, result, meta)
        return result

    def forget(self, task_id: str) -> None:
        self.app.client.forget_result(task_id)


class EagerResult(AsyncResult):
    """The result of ``Task.apply``: already known, nothing to ask brokerd."""

    def __init__(self, id, value, state, exc=None):
        self.id = id
        self._name = None
        self.app = None
        self.parent = None
        self._value = value
        self._exc = exc
        self._cache = {"id": id, "state": state, "result": value, "meta": None}
        self._on_ready = []
        self.ignored = False

    def get(self, timeout=None, propagate=True, interval=None, callback=None, **_):
        """The known outcome (an eager run never blocks, so ``disable_sync_subtasks`` has nothing to refuse)."""
        if self._exc is not None:
            if propagate:
                raise self._exc
            return self._exc
        if callback is not None:
            callback(self.id, self._value)
        return self._value

    @property
    def result(self):
        return self._exc if self._exc is not None else self._value

    def forget(self):
        pass


# Rebuilding a task's own exception class (protocol.md §8.2).  The worker stores the class's module and
# qualified name (``exc_module``, ``exc_qualname``) and, when CBOR can carry them, its args (``exc_args``).
# The rule for which classes a caller may rebuild, because a result is data anyone with the results grant
# may write: the module must already be imported in this process (``sys.modules``), or be one of the
# app's own task modules (the module of a registered task, or named in ``include``/``imports``), which
# the app would import anyway.  No other module is ever imported on a result's say-so.  The class must
# be an ``Exception`` subclass (never ``SystemExit``, ``KeyboardInterrupt`` or other ``BaseException``).
# Anything else becomes a ``RemoteError`` subclass named after the remote type.
EXC_QUALNAME_PARTS_MAX = 8  # nesting levels followed in exc_qualname ("Outer.Inner.Error")


def _app_modules(app) -> set:
    if app is None:
        return set()
    mods = {getattr(t, "__module__", None) for t in list(getattr(app, "tasks", {}).values())}
    conf = getattr(app, "conf", None) or {}
    for key in ("include", "imports"):
        names = conf.get(key) if hasattr(conf, "get") else None
        if isinstance(names, str):
            names = [names]
        if isinstance(names, (list, tuple, set)):
            mods.update(n for n in names if isinstance(n, str))
    return mods


def exception_class(module, qualname, app=None):
    """The local class ``module.qualname`` when the rule above allows it, else None."""
    if not isinstance(module, str) or not isinstance(qualname, str) or not module or not qualname:
        return None
    mod = sys.modules.get(module)
    if mod is None:
        if module not in _app_modules(app):
            return None
        try:
            mod = importlib.import_module(module)
        except Exception:  # noqa: BLE001 - a module that fails to import here: fall back to RemoteError
            return None
    parts = qualname.split(".")
    if len(parts) > EXC_QUALNAME_PARTS_MAX or not all(p.isidentifier() for p in parts):
        return None
    obj = mod
    for part in parts:
        obj = getattr(obj, part, None)
        if obj is None:
            return None
    if isinstance(obj, type) and issubclass(obj, Exception):
        return obj
    return None


def _build(cls, meta, msg):
    """``cls(*exc_args)``, else ``cls(message)``; None when the class will not be built from them."""
    args = meta.get("exc_args")
    tries = []
    if type(args) is list:
        tries.append(tuple(args))
    tries.append((msg,) if msg else ())
    for a in tries:
        try:
            exc = cls(*a)
        except Exception:  # noqa: BLE001 - a constructor with other arguments: try the next way
            continue
        if isinstance(exc, cls):
            return exc
    return None


def exception_from(meta: dict, app=None) -> BaseException:
    """A FAILURE's meta → the exception to raise: builtins as themselves, the task's own class when it
    can be imported here (the rule above), else a ``RemoteError`` subclass named after the remote type."""
    if not isinstance(meta, dict):
        meta = {}
    typ = meta.get("exc_type")
    typ = typ if isinstance(typ, str) and typ else "Exception"
    msg = meta.get("exc_message")
    msg = msg if isinstance(msg, str) else ("" if msg is None else str(msg))
    module = meta.get("exc_module")
    exc = None
    cls = getattr(builtins, typ, None)
    if module in (None, "builtins") and isinstance(cls, type) and issubclass(cls, Exception):
        exc = _build(cls, meta, msg)
    if exc is None:
        cls = exception_class(module, meta.get("exc_qualname") or typ, app)
        if cls is not None:
            exc = _build(cls, meta, msg)
    if exc is None and module is None and typ in ("ChordError", "ChainError"):
        exc = (ChordError if typ == "ChordError" else ChainError)(typ, msg, meta.get("traceback"))
    if exc is None and module is None:
        for local in LOCAL_FAILURES:
            if local.__name__ == typ:
                exc = local(msg)
                break
    if exc is None:
        exc = remote_error_class(typ, module)(typ, msg, meta.get("traceback"))
    exc.remote_traceback = meta.get("traceback")
    return exc


class ResultSet:
    """Several results at once (Celery's ``ResultSet``): wait for all, count, revoke."""

    def __init__(self, results, app=None, **_):
        self.results = list(results)
        self.app = app

    def __iter__(self):
        return iter(self.results)

    def __len__(self):
        return len(self.results)

    def __getitem__(self, i):
        return self.results[i]

    def __eq__(self, other):
        return isinstance(other, ResultSet) and other.results == self.results

    __hash__ = None

    def add(self, result) -> None:
        if result not in self.results:
            self.results.append(result)

    def remove(self, result) -> None:
        if isinstance(result, str):
            result = AsyncResult(result, app=self._app())
        self.results.remove(result)  # KeyError-like: ValueError when it is not there, as list.remove

    def discard(self, result) -> None:
        try:
            self.remove(result)
        except ValueError:
            pass

    def update(self, results) -> None:
        for r in results:
            self.add(r)

    def clear(self) -> None:
        self.results.clear()

    def _app(self):
        if self.app is not None:
            return self.app
        return self.results[0].app if self.results else current_app()

    def get(self, timeout: float | None = None, propagate: bool = True, interval: float = 0.5, callback=None,
            no_ack=True, on_message=None, disable_sync_subtasks: bool = True, on_interval=None):
        """Every result's value, in order; ``timeout`` bounds the whole wait."""
        return self.join(timeout=timeout, propagate=propagate, callback=callback,
                         disable_sync_subtasks=disable_sync_subtasks)

    def join(self, timeout: float | None = None, propagate: bool = True, interval: float = 0.5, callback=None,
             no_ack=True, on_message=None, disable_sync_subtasks: bool = True, on_interval=None):
        if disable_sync_subtasks:
            assert_will_not_block()
        deadline = None if timeout is None else time.monotonic() + timeout
        out = []
        for r in self.results:
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            value = r.get(timeout=left, propagate=propagate, disable_sync_subtasks=False)
            if callback is not None:
                callback(r.id, value)
            else:
                out.append(value)
        return out

    join_native = join  # brokerd answers each RESULT_GET when its result is stored: join is already native

    def ready(self) -> bool:
        return all(r.ready() for r in self.results)

    def successful(self) -> bool:
        return all(r.successful() for r in self.results)

    def failed(self) -> bool:
        return any(r.failed() for r in self.results)

    def waiting(self) -> bool:
        """True while any result is not ready."""
        return any(not r.ready() for r in self.results)

    def completed_count(self) -> int:
        return sum(1 for r in self.results if r.successful())

    def revoke(self, terminate: bool = False, **_) -> None:
        if self.results:
            self._app().client.revoke([r.id for r in self.results], terminate=terminate)

    def forget(self) -> None:
        for r in self.results:
            r.forget()

    def __repr__(self):
        return f"<ResultSet: [{', '.join(r.id for r in self.results)}]>"


class GroupResult(ResultSet):
    """The results of a group (or a chord's header), in order."""

    def __init__(self, id: str = None, results: list = None, app=None, parent=None, **_):
        super().__init__(results or [], app=app)
        self.id = id
        self.parent = parent

    @property
    def children(self) -> list:
        return self.results

    def as_tuple(self):
        """Celery's serialized form: ``((id, parent's as_tuple or None), [each member's as_tuple])``."""
        return (self.id, self.parent.as_tuple() if self.parent is not None else None), [r.as_tuple() for r in self.results]

    def __eq__(self, other):
        return isinstance(other, GroupResult) and other.id == self.id and other.results == self.results

    __hash__ = None

    def save(self, backend=None) -> "GroupResult":
        """Keep the member ids in brokerd under the group id (``GroupResult.restore``)."""
        self._app().client.store_result(self.id, "SUCCESS", [r.id for r in self.results], {"group": True})
        return self

    def delete(self, backend=None) -> None:
        self._app().client.forget_result(self.id)

    @classmethod
    def restore(cls, group_id: str, app=None, backend=None) -> "GroupResult | None":
        app = app or current_app()
        meta = app.client.get_result(group_id)
        if meta["state"] != "SUCCESS" or not (meta.get("meta") or {}).get("group"):
            return None
        return cls(group_id, [AsyncResult(i, app=app) for i in meta["result"]], app=app)

    def __repr__(self):
        return f"<GroupResult: {self.id} [{', '.join(r.id for r in self.results)}]>"


RESULT_TUPLE_DEPTH_MAX = 100  # parents and members followed by result_from_tuple; a deeper value is refused


def result_from_tuple(r, app=None, _depth=0):
    """An ``as_tuple()`` value (as a task that returned a result object stored it) -> the AsyncResult or
    GroupResult again, with its parents.  ValueError naming what is wrong for anything else."""
    if isinstance(r, AsyncResult) or isinstance(r, ResultSet):
        return r
    if _depth > RESULT_TUPLE_DEPTH_MAX:
        raise ValueError(f"result_from_tuple: nested deeper than {RESULT_TUPLE_DEPTH_MAX} levels")
    try:
        head, nodes = r
        tid, parent = head if isinstance(head, (list, tuple)) else (head, None)
    except (TypeError, ValueError):
        raise ValueError(f"result_from_tuple: not a result tuple ((id, parent), nodes): {r!r:.200}") from None
    if not isinstance(tid, str):
        raise ValueError(f"result_from_tuple: a task id must be text, got {type(tid).__name__}")
    app = app or current_app()
    parent = result_from_tuple(parent, app, _depth + 1) if parent else None
    if nodes is not None:
        return GroupResult(tid, [result_from_tuple(n, app, _depth + 1) for n in nodes], app=app, parent=parent)
    return AsyncResult(tid, app=app, parent=parent)
