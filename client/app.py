"""The task layer: ``App``, ``@app.task``, ``delay``, ``AsyncResult`` — Celery's shape.

    from client import App

    app = App("proj", broker="127.0.0.1:7700")

    @app.task(queue="emails", max_retries=5, retry_backoff=True, autoretry_for=(IOError,))
    def send_welcome_email(user_id): ...

    r = send_welcome_email.delay(42)      # publish, confirmed by brokerd; returns at once
    r.get(timeout=10)                     # long-polls brokerd for the result

A task is a message whose body is the **task envelope** (protocol.md §8): a
CBOR map with the task's name, id, args, kwargs and options.  The message id
is the task id.  Results are kept by brokerd (RESULT_SET / RESULT_GET), so
there is no result backend to configure.

The task layer, one concept per module (each imports only those above it):

* ``client.exceptions`` — Celery's exception names (``Retry``, ``Reject``, ...);
* ``client._current`` — the current app and the running task's ``Request``;
* ``client.envelope`` — the envelope format and the one routing rule;
* ``client.result`` — ``AsyncResult``, ``EagerResult``, ``GroupResult``;
* ``client.canvas`` — signatures, chain, group, chord;
* ``client.app`` (here) — ``App`` and ``Task``; ``client.beat`` — periodic tasks.

The names of the first four stay importable from here.

The blocking ``Client`` underneath is created lazily, once per process (a
forked child gets its own), and shared by every thread.
"""

from __future__ import annotations

import hashlib
import functools
import inspect
import importlib
import logging
import os
import random
import socket
import sys
import threading
import time
import uuid
import weakref

import cbor2

from client.options import redact  # credentials show as ***
from client import canvas, signals
from client.control import Control, Inspect
from client._current import CHILDREN_MAX, Request, current_app, current_request, set_current_app
from client.envelope import (
    DEFAULT_QUEUE,
    ENVELOPE_VERSION,
    absolute_times,
    check_encodable,
    decode_envelope,
    encode_envelope,
    lookup_route,
    make_envelope,
    route,
    to_epoch,
)
from client.exceptions import (
    EncodeError,
    Ignore,
    MaxRetriesExceededError,
    NotRegistered,
    Reject,
    RemoteError,
    Retry,
    SoftTimeLimitExceeded,
    TaskError,
    TaskRevokedError,
    TimeLimitExceeded,
    TimeoutError,
    WorkerLostError,
)
from client.result import READY_STATES, WAIT_CHUNK, AsyncResult, EagerResult, GroupResult, exception_from
from client.signing import signer_for
from client import routing, taskopts
from client.conf import Conf, resolve
from client.errors import AccessRefused

log = logging.getLogger("brokerd.app")

# Names that live in the modules above and stay importable from here, where the
# README and existing code look for them (``from client.app import Retry``).
__all__ = [
    "App", "Task", "Conf", "Control", "Inspect", "Signal", "DEFAULTS", "shared_task", "Backend",
    "Request", "AsyncResult", "EagerResult", "GroupResult", "exception_from", "READY_STATES", "WAIT_CHUNK",
    "ENVELOPE_VERSION", "DEFAULT_QUEUE", "make_envelope", "encode_envelope", "decode_envelope",
    "check_encodable", "route", "lookup_route",
    "TaskError", "Retry", "MaxRetriesExceededError", "SoftTimeLimitExceeded", "TimeLimitExceeded", "Reject",
    "Ignore", "NotRegistered", "TaskRevokedError", "EncodeError", "RemoteError", "TimeoutError",
    "WorkerLostError",
]

# The worker reads the running task's context under its earlier name; new code
# imports ``current_request`` from ``client._current``.
_current_request = current_request

# Settings and their defaults, under Celery's names so a Celery config carries over.
DEFAULTS = {
    "broker_url": None,  # None: $BROKERD_URL, else 127.0.0.1:7700 (client.options.broker_url)
    "task_default_queue": DEFAULT_QUEUE,
    "task_default_priority": 0,
    "task_routes": {},
    "task_acks_late": True,
    "task_ignore_result": False,
    "task_track_started": False,
    "task_time_limit": None,
    "task_soft_time_limit": None,
    "task_always_eager": False,
    "task_eager_propagates": False,
    "result_expires": 24 * 3600,
    "worker_prefetch_multiplier": 1,
    "worker_concurrency": None,
    "beat_schedule": {},
    "timezone": "UTC",
    # Signed tasks (client/signing.py, protocol.md §8.4).  Producer: an Ed25519 private key (PEM text or a
    # path) signs every envelope this app sends; its key id defaults to one derived from the public key.
    # Worker: {key id: public key PEM or path}; when set, unsigned or badly signed tasks are refused.
    "task_signing_key": None,
    "task_signing_key_id": None,
    "task_signing_public_keys": None,
}


# -- tasks ---------------------------------------------------------------------------------
def unique_key_of(name: str, args, kwargs) -> str:
    """``unique=True``'s key: the task name and a SHA-256 of the canonical CBOR of its arguments
    (the same arguments give the same key in any process, any Python)."""
    digest = hashlib.sha256(cbor2.dumps([list(args), dict(kwargs)], canonical=True)).hexdigest()
    return f"{name}:{digest}"


class Task:
    """A task type.  ``@app.task`` makes a subclass whose ``run`` is your function.

    Subclass it and pass ``base=`` to share hooks (``on_success``, ``on_failure``,
    ``on_retry``, ``after_return``) between tasks.
    """

    name: str = ""
    app: "App" = None  # type: ignore[assignment]
    queue: str | None = None
    priority: int | None = None
    bind = False
    max_retries: int | None = 3
    default_retry_delay: float = 180
    autoretry_for: tuple = ()
    dont_autoretry_for: tuple = ()
    retry_kwargs: dict = {}
    retry_backoff: bool | float = False
    retry_backoff_max: float = 600
    retry_jitter = True
    time_limit: float | None = None
    soft_time_limit: float | None = None
    acks_late: bool | None = None
    ignore_result: bool | None = None
    track_started: bool | None = None  # store STARTED when a worker starts it (app: task_track_started)
    expires: float | None = None
    typing = True  # check the arguments against the function's signature at delay() (Celery's)
    # Celery's other task options (client/taskopts.py says what each does here)
    rate_limit = None  # "10/s", "100/m", "1000/h" or tasks per second; carried in the envelope (see apply_async)
    throws: tuple = ()  # expected exceptions: logged at INFO, without the "raised unexpected" error line
    store_errors_even_if_ignored = False  # brokerd stores every FAILURE, even of ignore_result tasks
    reject_on_worker_lost = None  # brokerd redelivers a task whose process died (up to max_retries) either way
    serializer = None  # only data serializers (json...) are accepted: bodies are CBOR
    trail = True
    pydantic = False  # validate/convert annotated arguments with pydantic before the task runs
    pydantic_strict = False
    pydantic_context = None
    pydantic_dump_kwargs = None
    exchange = None  # routing: see client.routing
    routing_key = None
    # unique tasks (issue 15 item 2; brokerd holds the key, protocol.md §5.2): unique=True keys on
    # the task name + arguments; unique_until "started" | "finished" | "time"; unique_for seconds at most
    unique: bool = False
    unique_for: float | None = None
    unique_until: str = "finished"
    # Flow control brokerd enforces across all workers (issue 15, protocol.md §5.2.1):
    max_concurrency: int | None = None  # at most this many running at once, everywhere
    concurrency_key: str | None = None  # the cap counts under this key instead of the task name

    # -- hooks (Celery's signatures) --
    def on_success(self, retval, task_id, args, kwargs):
        pass

    def on_failure(self, exc, task_id, args, kwargs, einfo):
        pass

    def on_retry(self, exc, task_id, args, kwargs, einfo):
        pass

    def after_return(self, status, retval, task_id, args, kwargs, einfo):
        pass

    def run(self, *args, **kwargs):
        raise NotImplementedError(f"task {self.name} has no run()")

    @property
    def request(self) -> Request:
        return current_request.get() or Request(task=self.name)

    def __call__(self, *args, **kwargs):
        """Run the task here and now, like a plain function call.  (A bound task's ``run`` is a
        method, as in Celery, so a base class's ``__call__`` calling ``self.run(*args)`` works.)"""
        return self.run(*args, **kwargs)

    def shadow_name(self, args, kwargs, options):
        """Override to give each call a display name (Celery's ``shadow``); None: the task's name."""
        return None

    def __repr__(self):
        return f"<@task: {self.name}>"

    # -- sending --
    def delay(self, *args, **kwargs) -> "AsyncResult":
        return self.apply_async(args, kwargs)

    def apply_async(self, args=None, kwargs=None, *, countdown=None, eta=None, expires=None,
                    priority=None, queue=None, task_id=None, headers=None, **options) -> "AsyncResult":
        """Send the task.  Every option Celery's ``apply_async`` takes is honoured or accepted as a
        no-op (client.taskopts); an option it does not have is a TypeError naming it."""
        args = tuple(args or ())
        kwargs = dict(kwargs or {})
        hard = options.get("time_limit") or self.time_limit
        soft = options.get("soft_time_limit") or self.soft_time_limit
        if (type(hard) in (int, float) and type(soft) in (int, float) and 0 < hard < soft):  # Celery's check:
            # the soft limit could never fire (other values are checked, naming them, when the call is built)
            raise ValueError(f"soft_time_limit must be less than or equal to time_limit ({self.name}: soft "
                             f"{soft:g} s, hard {hard:g} s)")
        fun = getattr(type(self), "__wrapped__", None)
        if self.typing and fun is not None:
            taskopts.check_arguments(self, fun, args, kwargs)
        if self.pydantic:
            args, kwargs = taskopts.dump_models(args, kwargs)
        if self.app.conf.task_always_eager:
            routed = ("routing_key", "exchange", "parent_id", "root_id", "link", "link_error",
                      "unique_key", "unique_for", "unique_until", "stamped_headers", "stamps")  # meaningless here
            throw = options.pop("throw", None)  # Celery's apply(throw=): only meaningful when run here
            taskopts.check_call_options(self.name, {k: v for k, v in options.items() if k not in routed})
            return self.apply(args, kwargs, task_id=task_id, throw=throw)
        # unique tasks: an explicit unique_key, or unique=True (key: name + a hash of the arguments)
        key = options.pop("unique_key", None) or (unique_key_of(self.name, args, kwargs) if self.unique else None)
        unique = None if key is None else (key, options.pop("unique_for", self.unique_for),
                                           options.pop("unique_until", self.unique_until))
        extra = canvas.callbacks_extra(options, self.app)  # link=/link_error=: sent, never dropped
        if options.get("shadow") is None:
            shadow = self.shadow_name(args, kwargs, options)
            if shadow is not None:
                options["shadow"] = shadow
        if self.rate_limit is not None:
            options.setdefault("rate_limit", taskopts.parse_rate_limit(self.rate_limit))
        return self.app.publish_task(
            self.name, args, kwargs, countdown=countdown, eta=eta,
            expires=expires if expires is not None else self.expires,
            priority=priority, queue=queue, task_id=task_id, headers=headers, task=self, options=options,
            unique=unique,
            extra=extra,
        )

    # -- Django: send once the database transaction commits (Celery's DjangoTask) --
    def delay_on_commit(self, *args, **kwargs) -> "AsyncResult":
        return self.apply_async_on_commit(args, kwargs)

    def apply_async_on_commit(self, args=None, kwargs=None, *, using=None, **options) -> "AsyncResult":
        """Send the task when the current Django transaction commits (at once outside one), so a
        worker never looks for a row that is not committed yet.  Returns the task's AsyncResult
        (its id is chosen now; Celery returns None)."""
        from django.db import transaction  # lazy import: Django projects only

        args, kwargs = tuple(args or ()), dict(kwargs or {})
        fun = getattr(type(self), "__wrapped__", None)
        if self.typing and fun is not None:
            taskopts.check_arguments(self, fun, args, kwargs)  # fail at the call, not at commit
        task_id = options.pop("task_id", None) or str(uuid.uuid4())
        transaction.on_commit(functools.partial(self.apply_async, args, kwargs, task_id=task_id, **options),
                              using=using)
        return AsyncResult(task_id, app=self.app)

    def apply(self, args=None, kwargs=None, *, task_id=None, throw=None, **_):
        """Run eagerly in this process and return an EagerResult (Celery's ``apply``).  A failure is kept in
        the result, or raised with ``throw=True`` (default: the setting ``task_eager_propagates``)."""
        task_id = task_id or str(uuid.uuid4())
        args, kwargs = tuple(args or ()), dict(kwargs or {})
        parent = current_request.get()  # applied inside another task: that one is its parent (Celery's)
        req = Request(id=task_id, args=args, kwargs=kwargs, is_eager=True, task=self.name,
                      parent_id=parent.id if parent is not None else None,
                      root_id=(parent.root_id or parent.id) if parent is not None else task_id)
        token = current_request.set(req)
        try:
            value = self(*args, **kwargs)
        except Exception as exc:
            if throw if throw is not None else self.app.conf.task_eager_propagates:
                raise
            return EagerResult(task_id, None, "FAILURE", exc)
        finally:
            current_request.reset(token)
        return EagerResult(task_id, value, "SUCCESS")

    def update_state(self, task_id=None, state=None, meta=None, **_):
        """Store a state of the task's own while it runs (e.g. ``PROGRESS`` with
        ``meta={"done": 3, "total": 10}``); ``AsyncResult.state``/``.info`` show it."""
        if not state:
            raise ValueError("update_state needs a state, e.g. update_state(state='PROGRESS', meta={...})")
        req = self.request
        tid = task_id or req.id
        if tid is None or req.is_eager:
            return
        self.app.client.store_result(tid, state, None, meta)

    def retry(self, exc=None, countdown=None, eta=None, max_retries=None, *, args=None, kwargs=None, **_):
        """Ask for this task to run again later.  Raises ``Retry`` (or, past
        max_retries, the original exception / MaxRetriesExceededError).

        ``args``/``kwargs`` (Celery's) run it again with other arguments: given alone, one keeps what
        the other does not replace (new positional ``args`` drop the kwargs they now fill; new
        ``kwargs`` take the place of the positional arguments they name)."""
        req = self.request
        limit = self.max_retries if max_retries is None else max_retries
        if req.is_eager:
            raise exc if exc is not None else Retry("retry requested in eager mode", exc)
        if limit is not None and req.retries >= limit:
            if exc is not None:
                raise exc
            raise MaxRetriesExceededError(
                f"{self.name}[{req.id}] retried {req.retries} times, max_retries is {limit}"
            )
        if eta is not None:
            when = max(0.0, to_epoch(eta) - time.time())
        elif countdown is not None:
            when = float(countdown)
        else:
            when = self.retry_delay(req.retries)
        r = Retry(f"retry in {when:g}s", exc, when)
        if args is not None or kwargs is not None:
            r.args_kwargs = self._retry_arguments(req, args, kwargs)
        raise r

    def _retry_arguments(self, req, args, kwargs) -> tuple:
        """The (args, kwargs) of the next run for ``retry(args=, kwargs=)``."""
        new_args = list(req.args) if args is None else list(args)
        new_kwargs = dict(req.kwargs) if kwargs is None else dict(kwargs)
        try:
            sig = inspect.signature(self.run)
        except (TypeError, ValueError):
            return new_args, new_kwargs
        by_name = inspect.Parameter.POSITIONAL_OR_KEYWORD
        if args is not None and kwargs is None:
            named = [p for p in sig.parameters.values() if p.kind is by_name]
            for p in named[:len(new_args)]:  # now given by position
                new_kwargs.pop(p.name, None)
        elif kwargs is not None and args is None and req.args:
            try:
                bound = sig.bind_partial(*req.args)
            except TypeError:
                return new_args, new_kwargs  # the task's own argument check will say what is wrong
            for name in list(new_kwargs):  # a keyword that names a positional argument replaces it there
                if name in bound.arguments and sig.parameters[name].kind is by_name:
                    bound.arguments[name] = new_kwargs.pop(name)
            new_args, new_kwargs = list(bound.args), {**bound.kwargs, **new_kwargs}
        return new_args, new_kwargs

    def retry_delay(self, retries: int) -> float:
        """Seconds before retry number ``retries + 1``: fixed, or exponential with jitter."""
        if self.retry_backoff:
            base = 1.0 if self.retry_backoff is True else float(self.retry_backoff)
            delay = min(base * (2 ** retries), self.retry_backoff_max)
            if self.retry_jitter:
                delay = random.uniform(0, delay)  # "full jitter", as Celery does
            return delay
        return float(self.default_retry_delay)

    def AsyncResult(self, task_id) -> "AsyncResult":
        return AsyncResult(task_id, app=self.app)

    # canvas hooks (client/canvas.py builds on these)
    def s(self, *args, **kwargs):
        return canvas.Signature(self.name, args, kwargs, app=self.app)

    def si(self, *args, **kwargs):
        return canvas.Signature(self.name, args, kwargs, app=self.app, immutable=True)

    def signature(self, args=None, kwargs=None, **options):
        return canvas.Signature(self.name, tuple(args or ()), dict(kwargs or {}), options=options, app=self.app)

    subtask = signature

    def replace(self, sig):
        """Replace this running task with ``sig`` (Celery's): see ``client.canvas.replace``."""
        return canvas.replace(self, sig)

    def add_to_chord(self, sig, lazy: bool = False):
        """Add ``sig`` to the chord this running task is a member of (Celery's): see
        ``client.canvas.add_to_chord``."""
        return canvas.add_to_chord(self, sig, lazy)

    def map(self, items):
        """One task that runs this task on each item in turn; its result is the list."""
        # immutable, as Celery's xmap: in a chain it maps its own items, never the previous result
        return canvas.Signature("brokerd.map", (self.name, list(items)), app=self.app, immutable=True)

    def starmap(self, items):
        """Like ``map``, with each item a tuple of arguments."""
        return canvas.Signature("brokerd.starmap", (self.name, [list(a) for a in items]), app=self.app,
                                immutable=True)

    def chunks(self, items, n: int):
        """Split ``items`` (argument tuples) into tasks of ``n`` calls each: a group of starmaps."""
        items = [list(a) for a in items]
        if n < 1:
            raise ValueError("chunks() needs n >= 1")
        return canvas.group(self.starmap(items[i:i + n]) for i in range(0, len(items), n))


# -- the app -----------------------------------------------------------------------------------
class Signal:
    """``@app.on_after_configure.connect`` handlers, called with ``sender=app``."""

    def __init__(self, name: str):
        self.name = name
        self.receivers: list = []

    def connect(self, fn=None, **_):
        if fn is None:
            return self.connect
        self.receivers.append(fn)
        return fn

    def send(self, sender=None, **kwargs) -> list:
        return [fn(sender=sender, **kwargs) for fn in list(self.receivers)]




class App:
    """A brokerd application: the task registry, settings and a shared client.

    ``App("proj", broker="127.0.0.1:7700", task_routes={...})``; more settings
    with ``app.conf.update(...)`` or ``app.config_from_object(obj_or_module)``.
    """

    def __init__(self, main: str | None = None, broker: str | None = None, *, include=None, task_cls=None,
                 backend=None, set_as_current: bool = True, config_source=None, namespace=None, **settings):
        self.main = main
        self.conf = Conf(DEFAULTS)
        if broker:
            self.conf["broker_url"] = broker
        if backend is not None:
            # accepted for Celery's sake: results always live in brokerd (RESULT_SET/GET)
            self.conf["result_backend"] = backend
        if include is not None:
            self.conf["include"] = list(include)
        self.conf.update(settings)
        if config_source is not None:
            self.conf.add_source(config_source, namespace)
        # The base class of this app's tasks (Celery's task_cls / ``app.Task = ContextTask``):
        # read at each @app.task, so assigning app.Task before defining tasks takes effect.
        self.Task = _import_object(task_cls) if isinstance(task_cls, str) else (task_cls or Task)
        self.tasks: dict[str, Task] = {}
        self.control = Control(self)
        self.on_after_configure = Signal("on_after_configure")
        self.on_after_finalize = Signal("on_after_finalize")
        self._periodic: dict = {}
        self._configured = False
        self._sent_events_refused = False  # task_send_sent_event: brokerd said this user may not emit events
        self._pending_imports: list = []  # autodiscover_tasks calls, run at finalize (lazy, as Celery)
        self.fixups: list = []
        self._worker_ready = False
        self._client = None
        self._client_pid = None
        self._client_url = None
        self._lock = threading.Lock()
        self._register_builtins()
        for fun, opts in list(_SHARED):
            self._register(fun, **opts)  # shared_task defined before this app existed
        if set_as_current:
            set_current_app(self)
        _APPS.add(self)

    @classmethod
    def current(cls) -> "App":
        """The App created last in this process."""
        return current_app()

    def __repr__(self):
        return f"<App {self.main} broker={redact(self.conf.broker_url)}>"

    # -- configuration --
    def config_from_object(self, obj, namespace: str | None = None, silent: bool = False, force: bool = False) -> None:
        """Read settings from an object, a module, or a ``"module"``/``"module:attr"`` path.

        Read lazily and live (client.conf): a path is imported at the first read of a setting, and
        the object is read at every read, so ``config_from_object("django.conf:settings",
        namespace="CELERY")`` works inside Django's settings import and sees test overrides.
        Lowercase attributes are settings; with ``namespace="CELERY"``, ``CELERY_TASK_ROUTES`` is
        ``task_routes``.  ``force=True`` imports the path now (``silent=True``: ignore an ImportError).
        """
        if isinstance(obj, str) and force:
            try:
                obj = resolve(obj)
            except ImportError:
                if silent:
                    return
                raise
        self.conf.add_source(obj, namespace)

    def config_from_envvar(self, variable_name: str, silent: bool = False, force: bool = False) -> None:
        module = os.environ.get(variable_name)
        if not module:
            if silent:
                return
            raise ImportError(f"environment variable {variable_name} is not set; it should name a config module")
        self.config_from_object(module, silent=silent, force=force)

    # -- tasks --
    def task(self, *args, **opts):
        """``@app.task`` or ``@app.task(name=..., queue=..., bind=True, ...)``."""

        def make(fun):
            return self._register(fun, **opts)

        if len(args) == 1 and callable(args[0]) and not opts:
            return make(args[0])
        return make

    shared_task = task

    def _register(self, fun, name=None, base=None, **opts) -> Task:
        name = name or f"{fun.__module__}.{fun.__name__}"  # Celery's naming
        base = base or self.Task
        known = {k for k in dir(Task) if not k.startswith("_")} | set(taskopts.DECORATOR_NOOPS)
        for key in opts:
            if key not in known:
                raise TypeError(f"@app.task got an unknown option {key!r} (for {name}); Celery's task options "
                                f"are all accepted, so check the spelling")
        taskopts.check_decorator_options(name, opts)
        bind = opts.get("bind", getattr(base, "bind", False))
        run = fun
        if opts.get("pydantic", getattr(base, "pydantic", False)):
            run = taskopts.pydantic_wrapper(
                fun, strict=opts.get("pydantic_strict", False), context=opts.get("pydantic_context"),
                dump_kwargs=opts.get("pydantic_dump_kwargs"))
        attrs = dict(opts)
        # A bound task's run is a method (self is passed), as in Celery; otherwise a static function.
        attrs.update(name=name, app=self, run=run if bind else staticmethod(run), __doc__=fun.__doc__,
                     __module__=fun.__module__, __wrapped__=staticmethod(fun))
        cls = type(fun.__name__, (base,), attrs)
        task = cls()
        self.tasks[name] = task
        return task

    def register_task(self, task):
        """Register a class-based task (a Task subclass or instance with ``name`` and ``run``)."""
        if isinstance(task, type):
            task = task()
        if not task.name:
            raise ValueError(f"{type(task).__name__} has no name: set name = 'proj.tasks.mytask'")
        task.app = self
        self.tasks[task.name] = task
        return task

    def send_task(self, name: str, args=None, kwargs=None, countdown=None, eta=None, task_id=None,
                  expires=None, priority=None, queue=None, headers=None, **options) -> AsyncResult:
        """Publish a task by name, from code that does not import it (options as ``apply_async``)."""
        return self.publish_task(name, tuple(args or ()), dict(kwargs or {}), countdown=countdown, eta=eta,
                                 task_id=task_id, expires=expires, priority=priority, queue=queue,
                                 headers=headers, task=self.tasks.get(name), options=options)

    def route(self, name: str, task: Task | None = None, args=(), kwargs=None, options=None) -> dict:
        """The route ``task_routes`` gives ``name`` (``{}`` when none): dicts, router functions and
        lists of them, first match wins (client.routing)."""
        return routing.lookup(self.conf.task_routes, name, args, kwargs, options, task)

    def queue_and_priority(self, name: str, task: Task | None = None, queue: str | None = None,
                           priority: int | None = None, *, routing_key=None, exchange=None, args=(),
                           kwargs=None, options=None) -> tuple[str, int]:
        """Where task ``name`` goes.  The first one given wins, for each of queue and priority: the
        call's, the task's own, its ``task_routes`` route, the app's default (client.envelope.route
        is the same rule for dict routes).  At each level ``routing_key`` names the queue when no
        ``queue`` is given, as AMQP's default exchange routes; another exchange is refused."""
        conf = self.conf
        dflt_exchange = conf.get("task_default_exchange") or conf.task_default_queue
        queue = routing.destination({"queue": queue, "routing_key": routing_key, "exchange": exchange},
                                    dflt_exchange, f"the call of {name}")
        if task is not None:
            queue = queue or routing.destination(
                {"queue": task.queue, "routing_key": task.routing_key, "exchange": task.exchange},
                dflt_exchange, f"the task {name}")
            if priority is None:
                priority = task.priority
        if not queue or priority is None:
            r = self.route(name, task, args, kwargs, options)
            if not queue:
                queue = routing.destination(r, dflt_exchange, f"the task_routes route of {name}")
            if priority is None:
                priority = r.get("priority")
        queue = queue or conf.task_default_queue
        if priority is None:
            priority = conf.task_default_priority
        return queue, priority or 0

    def publish_task(self, name, args, kwargs, *, countdown=None, eta=None, expires=None, priority=None,
                     queue=None, task_id=None, headers=None, task=None, options=None, parent_id=None,
                     root_id=None, extra=None, confirm=True, routing_key=None, exchange=None,
                     unique=None) -> AsyncResult:
        """Build the envelope of one task call, route it, and publish it.

        ``task`` is the registered Task when known (its queue and priority
        then count in the routing rule); ``extra`` adds keys to the envelope
        (the canvas's ``link``, ``link_error``, ``chain``); ``confirm=False``
        pipelines the publish and the caller (a group) waits for all confirms at once.
        ``options`` are the other per-call options: checked by client.taskopts (an unknown one is
        a TypeError naming it), the honoured ones carried in the envelope's ``options``.
        """
        options = dict(options or {})
        routing_key = options.pop("routing_key", routing_key)
        exchange = options.pop("exchange", exchange)
        parent_id = options.pop("parent_id", None) or parent_id
        root_id = options.pop("root_id", None) or root_id
        headers = stamped_headers(name, headers, options.pop("stamped_headers", None), options.pop("stamps", None))
        # Flow control, in headers brokerd reads without the body (protocol.md §5.2.1): the task
        # name always; the task's rate and cap; apply_async's tenant= and concurrency_key=.
        flow = {"x-task": name}
        for key, header in (("rate_limit", "x-rate-limit"), ("max_concurrency", "x-max-concurrency"),
                            ("concurrency_key", "x-concurrency-key"), ("tenant", "x-tenant"),
                            ("tenant_weight", "x-tenant-weight")):
            if key in options:  # the call's own (apply_async puts the task's parsed rate here; None: none)
                value = options.pop(key)
            else:
                value = getattr(task, key, None) if task is not None else None
            if value is not None:
                flow[header] = value
        env_options = taskopts.check_call_options(name, options)
        taskopts.check_serializer(self.conf.get("task_serializer"), "the setting task_serializer")
        if task is not None and task.pydantic:  # every call path (delay, a signature, a canvas step)
            args, kwargs = taskopts.dump_models(args, kwargs)
        check_encodable(name, args, kwargs)
        queue, priority = self.queue_and_priority(name, task, queue, priority, routing_key=routing_key,
                                                  exchange=exchange, args=args, kwargs=kwargs, options=env_options)
        task_id = task_id or str(uuid.uuid4())
        eta_s, exp = absolute_times(time.time(), countdown, eta, expires)
        parent = current_request.get()
        if parent is not None and parent_id is None and not parent.is_eager:
            parent_id, root_id = parent.id, parent.root_id
        env = make_envelope(name, task_id, args, kwargs, eta=eta_s, expires=exp, parent_id=parent_id,
                            root_id=root_id, headers=headers, options=env_options or None)
        if extra:
            env.update(extra)
        if signals.before_task_publish.receivers:  # Celery's hook: receivers may edit the envelope
            # the headers as Celery's message protocol 2 shows them (id, task, ... and the application's
            # own); what a receiver adds or changes among the application's is sent
            shown = {"lang": "py", "task": name, "id": task_id, "root_id": root_id or task_id,
                     "parent_id": parent_id, "eta": env.get("eta"), "expires": env.get("expires"),
                     "retries": 0, **env["headers"]}
            signals.before_task_publish.send(sender=name, body=env, exchange="", routing_key=queue,
                                             headers=shown, properties={"priority": priority},
                                             declare=[], retry_policy=None)
            env["headers"].update({k: v for k, v in shown.items() if k not in PROTOCOL_HEADERS})
        signer = self.signer
        if signer is not None:
            signer.sign(env)
        if unique is not None:  # (key, for, until): a duplicate names the task that holds the key
            held = self.client.publish_unique(queue, encode_envelope(env), unique[0], unique_for=unique[1],
                                              unique_until=unique[2], id=task_id, priority=priority,
                                              eta=eta_s, headers=flow)["id"]
            if held == task_id and self.conf.get("task_send_sent_event"):
                self._send_sent_event(env, queue, routing_key, exchange)
            return self._result_for(held, queue, task, env_options)
        self.client.publish(queue, encode_envelope(env), priority=priority, eta=eta_s, id=task_id, confirm=confirm,
                            headers=flow)
        if self.conf.get("task_send_sent_event"):
            self._send_sent_event(env, queue, routing_key, exchange)
        if parent is not None and not parent.is_eager and len(parent.children) < CHILDREN_MAX:
            parent.children.append(task_id)  # the running task's AsyncResult.children
        if signals.after_task_publish.receivers:
            signals.after_task_publish.send(sender=name, body=env, exchange="", routing_key=queue)
        return self._result_for(task_id, queue, task, env_options)

    def _send_sent_event(self, env: dict, queue: str, routing_key, exchange) -> None:
        """Celery's ``task_send_sent_event``: a ``task-sent`` event for the task just published, sent
        as this process (``gen<pid>@<host>``, Celery's name for a producer) with EMIT_EVENTS, so
        event consumers (Flower, brokerd's page and TASK history) see the task PENDING before a
        worker receives it.  EMIT_EVENTS needs the ``consume`` grant: a user without it is told once
        in the log that no task-sent events go out, and publishing goes on."""
        if self._sent_events_refused:
            return
        args, kwargs = taskopts.args_shown(env.get("args"), env.get("kwargs"), env.get("options"))
        event = {"type": "task-sent", "uuid": env["id"], "name": env["task"], "root_id": env.get("root_id"),
                 "parent_id": env.get("parent_id"), "args": args, "kwargs": kwargs, "retries": 0,
                 "eta": env.get("eta"), "expires": env.get("expires"), "queue": queue,
                 "exchange": exchange or "", "routing_key": routing_key or queue}
        try:
            self.client.emit_events(f"gen{os.getpid()}@{socket.gethostname()}", [event])
        except AccessRefused as exc:
            self._sent_events_refused = True
            log.warning("task_send_sent_event is on but brokerd refused the task-sent event (%s); no task-sent "
                        "events are sent from this process (give its user the 'consume' grant, or turn the "
                        "setting off)", exc)

    def _result_for(self, task_id, queue, task, env_options) -> AsyncResult:
        """The caller's AsyncResult, marked ``ignored`` when no result will be stored (the call's
        ``ignore_result=``, else the task's, else ``task_ignore_result``): its ``get()`` then returns
        None at once, as Celery's does, instead of waiting for a result that never comes."""
        ignored = (env_options or {}).get("ignore_result")
        if ignored is None and task is not None:
            ignored = task.ignore_result
        if ignored is None:
            ignored = bool(self.conf.get("task_ignore_result", False))
        result = AsyncResult(task_id, app=self, queue=queue)
        result.ignored = bool(ignored)
        return result

    @property
    def signer(self):
        """The Signer made from ``task_signing_key``/``task_signing_key_id`` (None when unset); made once
        per setting, so each task costs one signature, not a key load.  (client.signing loads the
        cryptography package only here, so apps that do not sign never import it.)"""
        conf = self.conf
        key, kid = conf.get("task_signing_key"), conf.get("task_signing_key_id")
        if not key:
            return None
        cached = self.__dict__.get("_signer")
        if cached is None or cached[0] is not key or cached[1] != kid:
            cached = (key, kid, signer_for(conf))
            self.__dict__["_signer"] = cached
        return cached[2]

    def AsyncResult(self, task_id) -> AsyncResult:
        return AsyncResult(task_id, app=self)

    def GroupResult(self, group_id):
        return GroupResult.restore(group_id, app=self)

    # -- periodic tasks (kept by brokerd; see client/beat.py) --
    def add_periodic_task(self, schedule, sig, name: str | None = None, args=None, kwargs=None, **options):
        """Celery's ``sender.add_periodic_task(10.0, add.s(2, 2), name="add every 10")``."""
        sig = canvas.signature(sig)
        self._periodic[name or repr(sig)] = {
            "task": sig.name, "schedule": schedule, "args": tuple(args if args is not None else sig.args),
            "kwargs": dict(kwargs if kwargs is not None else sig.kwargs), "options": {**sig.options, **options},
        }

    def finalize(self) -> None:
        """Once: import the modules named by ``include``/``imports`` and ``autodiscover_tasks``, then
        run the on_after_configure and on_after_finalize handlers (they may add periodic tasks).
        The worker and beat call it at start; nothing is imported earlier (Django's app registry
        may not be ready while the project's modules import)."""
        if self._configured:
            return
        self._configured = True
        self.import_default_modules()
        self.on_after_configure.send(sender=self)
        self.on_after_finalize.send(sender=self)

    def import_default_modules(self) -> list:
        """Import ``include`` and ``imports`` modules and the pending ``autodiscover_tasks`` ones."""
        done = []
        for name in [*(self.conf.get("imports") or ()), *(self.conf.get("include") or ())]:
            done.append(importlib.import_module(name))
        pending, self._pending_imports = self._pending_imports, []
        for packages, related_name in pending:
            done.extend(self._discover(packages, related_name))
        return done

    def autodiscover_tasks(self, packages=None, related_name: str = "tasks", force: bool = False) -> None:
        """Import ``<package>.tasks`` of each package, when the app is finalized (worker or beat
        start), or now with ``force=True``.  ``packages``: a list, a callable returning one (called
        then, not now), or None for Django's INSTALLED_APPS (when the project uses Django)."""
        if force:
            self._discover(packages, related_name)
        else:
            self._pending_imports.append((packages, related_name))

    def _discover(self, packages, related_name) -> list:
        if callable(packages):
            packages = packages()
        if packages is None:
            packages = []
            for fixup in self.fixups or _detect_fixups(self):
                packages.extend(fixup.autodiscover_packages())
        found = []
        for pkg in packages:
            module_name = f"{pkg}.{related_name}" if related_name else pkg
            try:
                found.append(importlib.import_module(module_name))
            except ModuleNotFoundError as exc:
                if exc.name != module_name:
                    raise  # the tasks module exists and imports something missing: say so
        return found

    # -- the worker's start-up --
    def init_worker(self) -> None:
        """Called by the worker once, before its pool starts: set up the frameworks the project
        uses (Django: ``django.setup()`` when DJANGO_SETTINGS_MODULE is set), import the task
        modules, and log what the tasks ask for that brokerd does not do (yet)."""
        if self._worker_ready:
            return
        self._worker_ready = True
        if not self.fixups:
            self.fixups = _detect_fixups(self)
        self.fixup_event("on_worker_init")
        self.finalize()
        self.fixup_event("on_worker_ready")
        for task in self.tasks.values():
            if task.rate_limit is not None:
                log.info("task %s has rate_limit=%s: brokerd paces its deliveries, for all workers together "
                         "(Celery's limit is per worker)", task.name, task.rate_limit)

    def fixup_event(self, event: str, *args) -> None:
        """Call ``event`` on each fixup (Django's): on_worker_init, on_worker_ready,
        on_worker_process_init, on_task_prerun, on_task_postrun.  A raising fixup is logged."""
        for fixup in self.fixups:
            fn = getattr(fixup, event, None)
            if fn is None:
                continue
            if event.startswith("on_task"):
                try:
                    fn(*args)
                except Exception:  # noqa: BLE001 - a fixup must not cost the task its outcome
                    log.exception("%s fixup %s raised", type(fixup).__name__, event)
            else:
                fn(*args)

    # -- Celery's app-level entry points --
    def set_default(self) -> None:
        """Make this the app that ``shared_task`` tasks and unbound signatures use."""
        set_current_app(self)

    def set_current(self) -> None:
        set_current_app(self)

    def worker_main(self, argv=None) -> int:
        """Run a worker for this app, with ``brokerd-worker``'s flags (``argv[0]`` may be "worker")."""
        from client import worker_cli  # lazy import: the worker's code is not loaded by producers

        argv = list(argv if argv is not None else ["worker"])
        if argv and argv[0] == "worker":
            argv = argv[1:]
        return worker_cli.main(argv, app=self)

    def start(self, argv=None) -> int:
        """Celery's ``app.start()``: ``python tasks.py worker -l info`` runs a worker for this app."""
        argv = list(argv if argv is not None else sys.argv[1:])
        if not argv or argv[0] != "worker":
            raise SystemExit(f"usage: {sys.argv[0]} worker [brokerd-worker flags]; only the worker command is "
                             f"supported here (use brokerd-beat and brokerd-ctl for the others)")
        raise SystemExit(self.worker_main(argv))

    @property
    def backend(self) -> "Backend":
        """Celery's ``app.backend``: the result calls, over brokerd's stored results."""
        return Backend(self)

    def periodic_entries(self) -> dict:
        self.finalize()
        return {**(self.conf.beat_schedule or {}), **self._periodic}

    # -- the connection --
    @property
    def client(self):
        """One blocking Client per process, shared by its threads; made on first use."""
        pid = os.getpid()
        c = self._client
        url = self.conf.broker_url
        if c is None or self._client_pid != pid or not c.is_open or self._client_url != url:
            with self._lock:
                c = self._client
                if c is None or self._client_pid != pid or not c.is_open or self._client_url != url:
                    # A lazy import, for start-up time: ``import client.app`` (a worker's
                    # children, ``brokerd-beat``) loads no sockets until a task needs them.
                    from client.producer import Client

                    if c is not None and self._client_pid == pid and c.is_open:
                        c.close()  # broker_url changed: talk to the new broker
                    c = self._client = Client(url, name=f"{self.main or 'app'}-{pid}")
                    self._client_pid = pid
                    self._client_url = url
        return c

    def reset_after_fork(self) -> None:
        """In a forked child: forget the parent's client (its socket and lock are the parent's);
        a task that publishes makes its own on first use."""
        self._client = None
        self._lock = threading.Lock()
        self.fixup_event("on_worker_process_init")

    def close(self) -> None:
        if self._client is not None and self._client_pid == os.getpid():
            self._client.close()
        self._client = None

    def _register_builtins(self) -> None:
        def _map(name, items):
            t = self.tasks[name]
            return [t(item) for item in items]

        def _starmap(name, items):
            t = self.tasks[name]
            return [t(*args) for args in items]

        self._register(_map, name="brokerd.map")
        self._register(_starmap, name="brokerd.starmap")
        canvas.register_builtins(self)  # brokerd.canvas, brokerd.chord_failed, brokerd.accumulate

    def signature(self, name, args=None, kwargs=None, **options):
        """Celery's ``app.signature("proj.tasks.add", (2, 2), countdown=10)`` (or a signature map)."""
        return canvas.signature(name, args, kwargs, app=self, **options)


# What before_task_publish receivers see besides the application's headers (Celery's protocol 2 names);
# they are shown, not sent as headers: the envelope carries them in its own fields (protocol.md §8.1).
PROTOCOL_HEADERS = frozenset(("lang", "task", "id", "root_id", "parent_id", "eta", "expires", "retries"))
STAMPS_MAX = 100  # stamps on one task: names travel in every message of a canvas


def stamped_headers(name, headers, names, stamps) -> dict | None:
    """Celery's stamps (``sig.stamp(...)``, or ``apply_async(stamped_headers=[...], stamps={...})``) as
    message headers: ``stamped_headers`` the names, ``stamps`` name -> value (the worker's
    request.stamped_headers / request.stamps).  TypeError naming what is wrong."""
    if not names and not stamps:
        return headers
    stamps = dict(stamps or {})
    if not isinstance(stamps, dict) or not all(isinstance(k, str) for k in stamps):
        raise TypeError(f"apply_async() of {name}: stamps must be a map of stamp name to value")
    names = list(names if names is not None else stamps)
    if not all(isinstance(n, str) for n in names) or len(names) > STAMPS_MAX:
        raise TypeError(f"apply_async() of {name}: stamped_headers must be a list of at most {STAMPS_MAX} "
                        f"stamp names (text), got {names!r:.200}")
    return {**(headers or {}), "stamped_headers": names, "stamps": {n: stamps.get(n) for n in names}}


class Backend:
    """``app.backend``: Celery's result-backend calls, answered by brokerd (RESULT_GET/SET)."""

    def __init__(self, app: App):
        self.app = app

    def get_task_meta(self, task_id) -> dict:
        r = self.app.client.get_result(task_id)
        return {"task_id": task_id, "status": r.get("state", "PENDING"), "result": r.get("result"),
                "meta": r.get("meta"), "date_done": r.get("updated")}

    def get_state(self, task_id) -> str:
        return self.get_task_meta(task_id)["status"]

    get_status = get_state

    def get_result(self, task_id):
        return AsyncResult(task_id, app=self.app).result

    def store_result(self, task_id, result, state, traceback=None, request=None, **_):
        meta = {"traceback": traceback} if traceback else None
        self.app.client.store_result(task_id, state, result, meta)
        return result

    def mark_as_started(self, task_id, **meta):
        return self.store_result(task_id, meta or None, "STARTED")

    def mark_as_done(self, task_id, result, request=None, **_):
        return self.store_result(task_id, result, "SUCCESS")

    def forget(self, task_id) -> None:
        AsyncResult(task_id, app=self.app).forget()

    def ensure_chords_allowed(self) -> None:
        """Celery's check before a chord is sent (some of its backends cannot count a chord's members).
        brokerd counts every chord itself (CHORD), so chords are always allowed: nothing to raise."""
        return None

    def wait_for(self, task_id, timeout=None, **_):
        AsyncResult(task_id, app=self.app).get(timeout=timeout, propagate=False)
        return self.get_task_meta(task_id)


# -- shared_task: tasks of reusable apps (Django apps), bound to whichever app is current ---------
_SHARED: list = []  # (function, options) of every shared_task, registered in each App made later
_APPS = weakref.WeakSet()  # every App alive in this process, for shared_task defined after them


class _SharedTaskProxy:
    """What ``@shared_task`` returns: the task of that name in the *current* app (the App created
    last, or the one given ``set_default()``), looked up at each use, so a module of tasks imports
    before any App exists, and uses the project's app once there is one (Celery's semantics)."""

    _name = ""  # the task's name (set through object.__setattr__: this class forwards setattr)

    def __init__(self, name: str, fun):
        object.__setattr__(self, "_name", name)
        object.__setattr__(self, "__wrapped__", fun)
        object.__setattr__(self, "__doc__", fun.__doc__)
        object.__setattr__(self, "__name__", fun.__name__)
        object.__setattr__(self, "__module__", fun.__module__)

    def _get_current_object(self) -> Task:
        try:
            app = current_app()
        except RuntimeError:
            app = App()  # Celery makes a default app too: its broker is $BROKERD_URL or 127.0.0.1:7700
        task = app.tasks.get(self._name)
        if task is None:
            raise NotRegistered(f"shared task {self._name!r} is not registered in the current app {app!r}")
        return task

    def __getattr__(self, attr):
        return getattr(self._get_current_object(), attr)

    def __setattr__(self, attr, value):
        setattr(self._get_current_object(), attr, value)

    def __call__(self, *args, **kwargs):
        return self._get_current_object()(*args, **kwargs)

    def __repr__(self):
        return f"<@task: {self._name} of the current app>"

    def __reduce__(self):
        return (_shared_by_name, (self._name,))


def _shared_by_name(name):
    return current_app().tasks[name]


def shared_task(*args, **opts):
    """``@shared_task`` / ``@shared_task(bind=True, ...)``: a task for every app, without importing one.

    The task is registered in every App that exists and every App made later; the value returned
    uses the current app at each call (see _SharedTaskProxy)."""

    def make(fun):
        name = opts.get("name") or f"{fun.__module__}.{fun.__name__}"
        _SHARED.append((fun, dict(opts)))
        for app in list(_APPS):
            app._register(fun, **opts)
        return _SharedTaskProxy(name, fun)

    if len(args) == 1 and callable(args[0]) and not opts:
        return make(args[0])
    return make


def _import_object(path: str):
    module, _, attr = path.partition(":")
    if not attr:
        module, _, attr = path.rpartition(".")
    obj = importlib.import_module(module)
    for part in attr.split("."):
        obj = getattr(obj, part)
    return obj


def _detect_fixups(app) -> list:
    """Django's fixup when the project is a Django project (DJANGO_SETTINGS_MODULE set), as Celery."""
    if os.environ.get("DJANGO_SETTINGS_MODULE"):
        try:
            import django  # noqa: F401 - lazy import: only Django projects, and only when the worker starts
        except ImportError:
            return []
        from client.django import DjangoFixup  # lazy import: it is only for Django projects

        return [DjangoFixup(app)]
    return []
