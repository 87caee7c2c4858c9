"""``celery`` for Celery's integration tests, mapped onto brokerd's SDK (see ../README.md)."""

from __future__ import annotations

import uuid as _uuid

from client.app import App as _App
from client.app import Task
from client.canvas import Signature, chain, chord, group, signature

from celery import states  # noqa: F401
from celery._compat import UNBOUND, missing, sdk

__version__ = "5.7.0"  # the version whose tests are run; the package is brokerd's SDK


class _Amqp:
    """Glue for the integration conftest's check that tests use only the default queue."""

    def __init__(self, app):
        self.app = app

    @property
    def queues(self):
        return {self.app.conf.task_default_queue}


class _Backend:
    """Glue: Celery's tests ask the backend whether chords are allowed; brokerd counts chords itself."""

    def ensure_chords_allowed(self):
        return None

    def __getattr__(self, name):
        raise NotImplementedError(f"celery app.backend.{name}: no counterpart in brokerd's SDK")


class Celery(_App):
    """``Celery(main, broker=, backend=, **settings)`` -> ``client.app.App``; only glue added."""

    def __init__(self, main=None, broker=None, backend=None, **settings):
        settings.pop("set_as_current", None)
        settings.pop("log", None)
        settings.setdefault("task_default_queue", "celery")  # Celery's default queue name
        super().__init__(main, broker=broker, **settings)

    def set_current(self):  # glue: App.current() is the App made last; make it this one
        from client._current import set_current_app
        set_current_app(self)

    set_default = set_current

    @property
    def amqp(self):
        return _Amqp(self)

    if not hasattr(_App, "backend"):
        backend = _Backend()


def uuid():
    return str(_uuid.uuid4())


import client.app as _client_app

_sdk_shared_task = getattr(_client_app, "shared_task", None)  # the SDK's own, once it has one


class _LazyTask:
    """Glue while the SDK has no module-level ``shared_task``: the task is registered on the
    current app when first used (Celery binds shared tasks the same way, lazily)."""

    def __init__(self, fun, opts):
        self._fun, self._opts, self._bound = fun, opts, {}
        self.__name__ = fun.__name__
        self.__doc__ = fun.__doc__
        self.__wrapped__ = fun
        self.name = opts.get("name") or f"{fun.__module__}.{fun.__name__}"

    def _task(self, app=None):
        from client._current import current_app
        app = app or current_app()
        key = id(app)
        if key not in self._bound:
            try:
                self._bound[key] = app._register(self._fun, **self._opts)
            except Exception as e:
                UNBOUND[self.name] = f"{type(e).__name__}: {e}"
                raise
        return self._bound[key]

    def __getattr__(self, name):
        return getattr(self._task(), name)

    def __call__(self, *args, **kwargs):
        return self._task()(*args, **kwargs)


_LAZY: list[_LazyTask] = []


def shared_task(*args, **opts):
    if _sdk_shared_task is not None:
        return _sdk_shared_task(*args, **opts)

    def make(fun):
        t = _LazyTask(fun, opts)
        _LAZY.append(t)
        return t

    if len(args) == 1 and callable(args[0]) and not opts:
        return make(args[0])
    return make


def bind_shared_tasks(app) -> None:
    """Register every shared task on ``app`` now (the worker must know them before it consumes)."""
    for t in _LAZY:
        try:
            t._task(app)
        except Exception:
            pass  # recorded in UNBOUND; the tests that use this task fail with the reason


current_app = sdk("_current", "current_app")

import celery.app.trace  # noqa: E402,F401 - Celery's tests read celery.app.trace.LOG_* after a bare `import celery`
