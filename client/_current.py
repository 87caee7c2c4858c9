"""What is "current" in this process: the last App created, and the task running now.

``current_app()`` is what ``AsyncResult(id)`` and an unbound signature use when
no ``app=`` is given.  ``current_request`` holds the ``Request`` of the task
this thread (or trio/asyncio task) is running: ``self.request`` inside a bound
task, and the parent of any task it sends.  The worker sets it around each
task; ``Task.apply`` sets it for an eager run.

This module imports nothing from the rest of the task layer, so ``client.app``,
``client.canvas`` and ``client.result`` can all read it without importing each other.
"""

from __future__ import annotations

import contextvars


# Task ids a running task's result keeps of the tasks it sent (AsyncResult.children): bounded, because
# the ids travel in its result's meta, one frame; 10,000 ids are about 400 KB.
CHILDREN_MAX = 10_000


class Request:
    """What ``self.request`` shows inside a bound task."""

    def __init__(self, id=None, args=(), kwargs=None, retries=0, delivery_info=None, eta=None,
                 expires=None, parent_id=None, root_id=None, headers=None, hostname=None, is_eager=False,
                 task=None, group=None, chord=None, reply_to=None, origin=None, time_limit=None,
                 callbacks=None, errbacks=None, properties=None, replaced_task_nesting=0, stamped_headers=None,
                 stamps=None, argsrepr=None, kwargsrepr=None):
        self.id = id
        self.args = list(args)
        self.kwargs = dict(kwargs or {})
        self.retries = retries
        self.delivery_info = delivery_info or {}
        self.eta = eta
        self.expires = expires
        self.parent_id = parent_id
        self.root_id = root_id
        self.headers = headers or {}
        self.hostname = hostname
        self.is_eager = is_eager
        self.task = task
        # Celery's other request fields: present always, None when this task has no such thing.
        self.group = group  # the id of the group this task is a member of
        self.chord = chord  # the chord (its body's signature) this task is a header member of
        self.correlation_id = id  # Celery: the task id
        self.reply_to = reply_to  # brokerd keeps results itself: no reply queue, so None
        self.origin = origin  # who sent the task, when the producer said
        # Celery 5.7's fields: time_limit the hard limit, soft_time_limit the soft one (seconds, None when
        # unlimited); timelimit the (hard, soft) pair, as in Celery's message headers
        hard, soft = time_limit if isinstance(time_limit, (tuple, list)) else (time_limit, None)
        self.time_limit = hard
        self.soft_time_limit = soft
        self.timelimit = (hard, soft)
        # how many times this task's id was handed on by self.replace() (Celery's; 0: never replaced)
        self.replaced_task_nesting = replaced_task_nesting
        # Celery's stamps (canvas.stamp): the names, and name -> value
        self.stamped_headers = list(stamped_headers or ())
        self.stamps = dict(stamps or {})
        self.callbacks = callbacks  # the link= signatures, run on success
        self.errbacks = errbacks  # the link_error= signatures, run on failure
        self.properties = properties if properties is not None else {"correlation_id": id, "reply_to": reply_to}
        self.children: list = []  # AsyncResults of the tasks this task sent (AsyncResult.children)
        self._argsrepr, self._kwargsrepr = argsrepr, kwargsrepr

    # Celery's argsrepr/kwargsrepr: how the args and kwargs are shown in logs, the call's own text when it
    # gave one (apply_async(argsrepr=)), else their repr (made only when asked for)
    @property
    def argsrepr(self) -> str:
        return self._argsrepr if type(self._argsrepr) is str else repr(tuple(self.args))

    @property
    def kwargsrepr(self) -> str:
        return self._kwargsrepr if type(self._kwargsrepr) is str else repr(self.kwargs)

    def __repr__(self):
        return f"<Request {self.task} id={self.id} retries={self.retries}>"


current_request: contextvars.ContextVar[Request | None] = contextvars.ContextVar("brokerd_request", default=None)

# The App created last in this process (a list cell, so setting it needs no `global`).
_app: list = [None]


def set_current_app(app) -> None:
    _app[0] = app


def current_app():
    """The App created last in this process, or RuntimeError when there is none."""
    app = _app[0]
    if app is None:
        raise RuntimeError("no App has been created: create one, or pass app= to AsyncResult")
    return app
