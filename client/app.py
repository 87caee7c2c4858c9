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
import importlib
import os
import random
import threading
import time
import uuid

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

# Names that live in the modules above and stay importable from here, where the
# README and existing code look for them (``from client.app import Retry``).
__all__ = [
    "App", "Task", "Conf", "Control", "Inspect", "Signal", "DEFAULTS",
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
    typing = True
    # unique tasks (issue 15 item 2; brokerd holds the key, protocol.md §5.2): unique=True keys on
    # the task name + arguments; unique_until "started" | "finished" | "time"; unique_for seconds at most
    unique: bool = False
    unique_for: float | None = None
    unique_until: str = "finished"

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
        """Run the task here and now, like a plain function call."""
        if self.bind:
            return self.run(self, *args, **kwargs)
        return self.run(*args, **kwargs)

    def __repr__(self):
        return f"<@task: {self.name}>"

    # -- sending --
    def delay(self, *args, **kwargs) -> "AsyncResult":
        return self.apply_async(args, kwargs)

    def apply_async(self, args=None, kwargs=None, *, countdown=None, eta=None, expires=None,
                    priority=None, queue=None, task_id=None, headers=None, **options) -> "AsyncResult":
        args = tuple(args or ())
        kwargs = dict(kwargs or {})
        if self.app.conf.task_always_eager:
            return self.apply(args, kwargs, task_id=task_id)
        # unique tasks: an explicit unique_key, or unique=True (key: name + a hash of the arguments)
        key = options.pop("unique_key", None) or (unique_key_of(self.name, args, kwargs) if self.unique else None)
        unique = None if key is None else (key, options.pop("unique_for", self.unique_for),
                                           options.pop("unique_until", self.unique_until))
        return self.app.publish_task(
            self.name, args, kwargs, countdown=countdown, eta=eta,
            expires=expires if expires is not None else self.expires,
            priority=priority, queue=queue, task_id=task_id, headers=headers, task=self, options=options,
            unique=unique,
        )

    def apply(self, args=None, kwargs=None, *, task_id=None, **_):
        """Run eagerly in this process and return an EagerResult (Celery's ``apply``)."""
        task_id = task_id or str(uuid.uuid4())
        args, kwargs = tuple(args or ()), dict(kwargs or {})
        req = Request(id=task_id, args=args, kwargs=kwargs, is_eager=True, task=self.name, root_id=task_id)
        token = current_request.set(req)
        try:
            value = self(*args, **kwargs)
        except Exception as exc:
            if self.app.conf.task_eager_propagates:
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

    def retry(self, exc=None, countdown=None, eta=None, max_retries=None, **_):
        """Ask for this task to run again later.  Raises ``Retry`` (or, past
        max_retries, the original exception / MaxRetriesExceededError)."""
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
        raise Retry(f"retry in {when:g}s", exc, when)

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

    def map(self, items):
        """One task that runs this task on each item in turn; its result is the list."""
        return canvas.Signature("brokerd.map", (self.name, list(items)), app=self.app)

    def starmap(self, items):
        """Like ``map``, with each item a tuple of arguments."""
        return canvas.Signature("brokerd.starmap", (self.name, [list(a) for a in items]), app=self.app)

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


class Conf(dict):
    """Settings: a dict with attribute access (``app.conf.task_routes``)."""

    def __getattr__(self, key):
        try:
            return self[key]
        except KeyError:
            raise AttributeError(f"no setting {key!r}") from None

    def __setattr__(self, key, value):
        self[key] = value


class App:
    """A brokerd application: the task registry, settings and a shared client.

    ``App("proj", broker="127.0.0.1:7700", task_routes={...})``; more settings
    with ``app.conf.update(...)`` or ``app.config_from_object(obj_or_module)``.
    """

    def __init__(self, main: str | None = None, broker: str | None = None, **settings):
        self.main = main
        self.conf = Conf(DEFAULTS)
        self.conf["task_routes"] = {}
        self.conf["beat_schedule"] = {}
        if broker:
            self.conf["broker_url"] = broker
        self.conf.update(settings)
        self.tasks: dict[str, Task] = {}
        self.control = Control(self)
        self.on_after_configure = Signal("on_after_configure")
        self._periodic: dict = {}
        self._configured = False
        self._client = None
        self._client_pid = None
        self._client_url = None
        self._lock = threading.Lock()
        self._register_builtins()
        set_current_app(self)

    @classmethod
    def current(cls) -> "App":
        """The App created last in this process."""
        return current_app()

    def __repr__(self):
        return f"<App {self.main} broker={redact(self.conf.broker_url)}>"

    # -- configuration --
    def config_from_object(self, obj, namespace: str | None = None) -> None:
        """Read settings from an object or an importable module path.

        Lowercase attributes are settings; with ``namespace="CELERY"``,
        ``CELERY_TASK_ROUTES`` becomes ``task_routes`` (Django style).
        """
        if isinstance(obj, str):
            obj = importlib.import_module(obj)
        prefix = (namespace + "_") if namespace else None
        for key in dir(obj):
            if key.startswith("_"):
                continue
            value = getattr(obj, key)
            if prefix:
                if key.startswith(prefix):
                    self.conf[key[len(prefix):].lower()] = value
            elif key.islower() and not callable(value) and not isinstance(value, type(os)):
                self.conf[key] = value

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
        base = base or Task
        known = {k for k in dir(Task) if not k.startswith("_")}
        for key in opts:
            if key not in known:
                raise TypeError(f"@app.task got an unknown option {key!r}")
        attrs = dict(opts)
        attrs.update(name=name, app=self, run=staticmethod(fun), __doc__=fun.__doc__,
                     __module__=fun.__module__, __wrapped__=fun)
        cls = type(fun.__name__, (base,), attrs)
        task = cls()
        self.tasks[name] = task
        return task

    def send_task(self, name: str, args=None, kwargs=None, **options) -> AsyncResult:
        """Publish a task by name, from code that does not import it."""
        return self.publish_task(name, tuple(args or ()), dict(kwargs or {}), **options)

    def route(self, name: str, task: Task | None = None) -> dict:
        """The ``task_routes`` entry for ``name`` (``{}`` when none): see ``client.envelope.lookup_route``."""
        return lookup_route(self.conf.task_routes, name)

    def queue_and_priority(self, name: str, task: Task | None = None, queue: str | None = None,
                           priority: int | None = None) -> tuple[str, int]:
        """Where task ``name`` goes: the one routing rule (``client.envelope.route``) with this app's settings."""
        conf = self.conf
        return route(name, conf.task_routes, default_queue=conf.task_default_queue,
                     default_priority=conf.task_default_priority, task=task, queue=queue, priority=priority)

    def publish_task(self, name, args, kwargs, *, countdown=None, eta=None, expires=None, priority=None,
                     queue=None, task_id=None, headers=None, task=None, options=None, parent_id=None,
                     root_id=None, extra=None, confirm=True, unique=None) -> AsyncResult:
        """Build the envelope of one task call, route it, and publish it.

        ``task`` is the registered Task when known (its queue and priority
        then count in the routing rule); ``extra`` adds keys to the envelope
        (the canvas's ``link``, ``link_error``, ``chain``); ``confirm=False``
        pipelines the publish and the caller (a group) waits for all confirms at once.
        """
        check_encodable(name, args, kwargs)
        queue, priority = self.queue_and_priority(name, task, queue, priority)
        task_id = task_id or str(uuid.uuid4())
        eta_s, exp = absolute_times(time.time(), countdown, eta, expires)
        parent = current_request.get()
        if parent is not None and parent_id is None and not parent.is_eager:
            parent_id, root_id = parent.id, parent.root_id
        env = make_envelope(name, task_id, args, kwargs, eta=eta_s, expires=exp, parent_id=parent_id,
                            root_id=root_id, headers=headers, options=options or None)
        if extra:
            env.update(extra)
        if signals.before_task_publish.receivers:  # Celery's hook: receivers may edit the envelope
            signals.before_task_publish.send(sender=name, body=env, exchange="", routing_key=queue,
                                             headers=env["headers"], properties={"priority": priority},
                                             declare=[], retry_policy=None)
        signer = self.signer
        if signer is not None:
            signer.sign(env)
        if unique is not None:  # (key, for, until): a duplicate names the task that holds the key
            task_id = self.client.publish_unique(queue, encode_envelope(env), unique[0], unique_for=unique[1],
                                                 unique_until=unique[2], id=task_id, priority=priority,
                                                 eta=eta_s)["id"]
            return AsyncResult(task_id, app=self, queue=queue)
        self.client.publish(queue, encode_envelope(env), priority=priority, eta=eta_s, id=task_id, confirm=confirm)
        if parent is not None and not parent.is_eager and len(parent.children) < CHILDREN_MAX:
            parent.children.append(task_id)  # the running task's AsyncResult.children
        if signals.after_task_publish.receivers:
            signals.after_task_publish.send(sender=name, body=env, exchange="", routing_key=queue)
        return AsyncResult(task_id, app=self, queue=queue)

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
        """Run on_after_configure handlers once (they may add periodic tasks)."""
        if not self._configured:
            self._configured = True
            self.on_after_configure.send(sender=self)

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

    def autodiscover_tasks(self, packages, related_name="tasks") -> None:
        for pkg in packages:
            try:
                importlib.import_module(f"{pkg}.{related_name}")
            except ModuleNotFoundError as exc:
                if exc.name != f"{pkg}.{related_name}":
                    raise
