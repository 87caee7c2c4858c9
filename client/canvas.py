"""Canvas: signatures and the workflows built from them, as Celery users write them.

    add.s(2, 2)                      # a signature: call it later
    chain(add.s(2, 2), add.s(4))     # or add.s(2, 2) | add.s(4): 8
    group(add.s(i, i) for i in range(10))()       # GroupResult; .get() in order
    chord((add.s(i, i) for i in range(10)), tsum.s())()   # body gets the list of results

How each one runs on brokerd:

* **chain** — every step's task id is chosen up front; the first step is sent
  with the rest of the chain in its envelope (``chain``), and the worker that
  finishes a step sends the next one with the result as its first argument.
  A failed step stops the chain: every later step gets a FAILURE result
  (``ChainError`` naming the failed step), so ``.get()`` on the chain fails too.
* **group** — its tasks are sent at once; ``GroupResult`` keeps their ids.
* **chord** — the barrier lives in brokerd (``CHORD``): the header's task ids
  are declared first, then the header is sent; brokerd counts each member's
  final result as part of storing it, and publishes the body exactly once
  when the last one succeeds (or the error callback if one fails).
* **link / link_error** — signatures in the envelope (``link``, ``link_error``)
  that the worker sends after success (with the result prepended) or failure
  (with the failed task's id).
"""

from __future__ import annotations

import copy
import uuid

from client._current import current_app
from client.envelope import encode_envelope, make_envelope
from client.result import AsyncResult, GroupResult

# canvas never imports client.app: it works on the app it is given (or the
# current one) through its public methods, and client.app imports canvas for
# ``task.s()``, so the dependency runs one way.


class Signature(dict):
    """``task.s(*args, **kwargs)``: name, args, kwargs and call options.

    A dict underneath (as Celery's), so it travels inside a task envelope.
    ``immutable=True`` (``task.si``) ignores a parent's result when chained.
    """

    def __init__(self, task: str, args=(), kwargs=None, options=None, app=None, immutable=False):
        super().__init__(task=task, args=list(args), kwargs=dict(kwargs or {}),
                         options=dict(options or {}), immutable=immutable)
        self._app = app

    @property
    def name(self) -> str:
        return self["task"]

    @property
    def args(self) -> tuple:
        return tuple(self["args"])

    @property
    def kwargs(self) -> dict:
        return self["kwargs"]

    @property
    def options(self) -> dict:
        return self["options"]

    @property
    def immutable(self) -> bool:
        return self["immutable"]

    @property
    def id(self) -> str | None:
        return self["options"].get("task_id")

    @property
    def app(self):
        if self._app is None:
            self._app = current_app()
        return self._app

    def set(self, **options) -> "Signature":
        """Set call options (queue=, countdown=, priority=...) in place; returns self."""
        self["options"].update(options)
        return self

    def freeze(self) -> str:
        """Choose the task id now (so a workflow can name it before it runs)."""
        return self["options"].setdefault("task_id", str(uuid.uuid4()))

    def link(self, callback: "Signature") -> "Signature":
        self["options"].setdefault("link", []).append(callback)
        return callback

    def link_error(self, errback: "Signature") -> "Signature":
        self["options"].setdefault("link_error", []).append(errback)
        return errback

    on_error = link_error

    def clone(self, args=(), kwargs=None, **options) -> "Signature":
        new_args = self["args"] if self.immutable else [*args, *self["args"]]
        return Signature(self.name, new_args, {**self["kwargs"], **(kwargs or {})},
                         {**self["options"], **options}, self._app, self.immutable)

    def __copy__(self):
        return Signature(self.name, self["args"], self["kwargs"], self["options"], self._app, self.immutable)

    def __deepcopy__(self, memo):
        return Signature(self.name, copy.deepcopy(self["args"], memo), copy.deepcopy(self["kwargs"], memo),
                         copy.deepcopy(self["options"], memo), self._app, self.immutable)

    def apply_async(self, args=(), kwargs=None, _confirm=True, **options):
        """Send it; extra args are prepended (partial application), as in Celery."""
        s = self.clone(args, kwargs, **options)
        opts = dict(s.options)
        extra = {}
        for key in ("link", "link_error", "chain"):
            if opts.get(key):
                extra[key] = [dict(x) for x in opts.pop(key)]
            else:
                opts.pop(key, None)
        app = s.app
        task = app.tasks.get(s.name)
        if app.conf.task_always_eager and task is not None:
            return task.apply(s.args, s.kwargs, task_id=opts.get("task_id"))
        return app.publish_task(s.name, s.args, s.kwargs, task=task, extra=extra or None, confirm=_confirm,
                                **_send_options(opts, task))

    def delay(self, *args, **kwargs):
        return self.apply_async(args, kwargs)

    def __call__(self, *args, **kwargs):
        s = self.clone(args, kwargs)
        return s.app.tasks[s.name](*s.args, **s.kwargs)

    def __or__(self, other):
        return chain(self, other)

    def __repr__(self):
        args = ", ".join([*(repr(a) for a in self["args"]), *(f"{k}={v!r}" for k, v in self["kwargs"].items())])
        return f"{self.name}({args}){'!' if self.immutable else ''}"


SEND_OPTIONS = ("countdown", "eta", "expires", "priority", "queue", "task_id", "headers")


def _send_options(opts: dict, task) -> dict:
    """A signature's options → ``App.publish_task`` keywords.  The task's queue
    and priority are applied there, by the routing rule; its ``expires`` here."""
    out = {k: v for k, v in opts.items() if k in SEND_OPTIONS}
    if task is not None and out.get("expires") is None and task.expires is not None:
        out["expires"] = task.expires
    return out


def signature(varies, *args, **kwargs) -> Signature:
    if isinstance(varies, Signature):
        return varies
    if isinstance(varies, dict) and "task" in varies:
        return Signature(varies["task"], varies.get("args", ()), varies.get("kwargs"), varies.get("options"),
                         immutable=varies.get("immutable", False))
    return Signature(varies, *args, **kwargs)


def _sigs(tasks) -> list[Signature]:
    if len(tasks) == 1 and not isinstance(tasks[0], dict) and hasattr(tasks[0], "__iter__"):
        tasks = tuple(tasks[0])
    return [signature(t) for t in tasks]


class chain:
    """Run signatures one after another, each result the next one's first argument."""

    def __init__(self, *tasks):
        self.tasks = _sigs(tasks)
        if not self.tasks:
            raise ValueError("chain() needs at least one signature")

    def __or__(self, other):
        if isinstance(other, chain):
            return chain(*self.tasks, *other.tasks)
        return chain(*self.tasks, other)

    def apply_async(self, args=(), kwargs=None, **options):
        steps = [s.clone() for s in self.tasks]
        for s in steps:
            s.freeze()
        first, rest = steps[0], steps[1:]
        if options:
            first = first.clone(**options)
        first["options"]["chain"] = [dict(s) for s in rest]
        res = first.apply_async(args, kwargs)
        parent = res
        for s in rest:
            parent = AsyncResult(s.id, app=s.app, parent=parent)
        return parent

    def delay(self, *args, **kwargs):
        return self.apply_async(args, kwargs)

    def __call__(self, *args, **kwargs):
        return self.apply_async(args, kwargs)

    def __repr__(self):
        return " | ".join(repr(s) for s in self.tasks)


class group:
    """Run signatures in parallel; ``GroupResult.get()`` returns their results in order."""

    def __init__(self, *tasks):
        self.tasks = _sigs(tasks)

    def apply_async(self, args=(), kwargs=None, **options):
        results = []
        app = None
        for s in self.tasks:
            s = s.clone(args, kwargs, **options)
            s.freeze()
            app = s.app
            results.append(s.apply_async(_confirm=False))  # pipelined ...
        if app is not None and not app.conf.task_always_eager:
            app.client.wait_for_confirms()  # ... and confirmed together: one round trip
        return GroupResult(str(uuid.uuid4()), results, app=app)

    def delay(self, *args, **kwargs):
        return self.apply_async(args, kwargs)

    def __call__(self, *args, **kwargs):
        return self.apply_async(args, kwargs)

    def __or__(self, other):
        return chord(self.tasks, other)

    def __len__(self):
        return len(self.tasks)


class chord:
    """``chord(header, body)``: run the header as a group; when every member has
    succeeded, brokerd sends the body with the list of their results."""

    def __init__(self, header, body=None):
        self.header = _sigs((header,)) if not isinstance(header, (list, tuple)) else [signature(s) for s in header]
        if isinstance(header, group):
            self.header = header.tasks
        self.body = signature(body) if body is not None else None

    def __call__(self, body=None, **options):
        if body is not None:
            self.body = signature(body)
        return self.apply_async(**options)

    def apply_async(self, args=(), kwargs=None, **options):
        if self.body is None:
            raise ValueError("chord() needs a body: chord(header, body) or chord(header)(body)")
        members = [s.clone() for s in self.header]
        ids = [m.freeze() for m in members]
        body = self.body.clone(args, kwargs, **options)
        body_id = body.freeze()
        app = body.app
        chord_id = str(uuid.uuid4())
        spec = message_spec(app, body, "chord-body")
        errbacks = body.options.get("link_error") or []
        error = message_spec(app, signature(errbacks[0]), "chord-error") if errbacks else None
        app.client.chord(chord_id, ids, spec, error)
        results = [m.apply_async(_confirm=False) for m in members]
        app.client.wait_for_confirms()
        gr = GroupResult(chord_id, results, app=app)
        return AsyncResult(body_id, app=app, parent=gr)


def message_spec(app, sig: Signature, scope: str = "task") -> dict:
    """What brokerd needs to publish a signature later: queue, priority, envelope (signed in ``scope``
    when the app signs tasks: brokerd prepends arguments to chord bodies and errbacks, client/signing.py)."""
    opts = sig.options
    queue, priority = app.queue_and_priority(sig.name, app.tasks.get(sig.name), opts.get("queue"),
                                             opts.get("priority"))
    tid = sig.freeze()
    env = make_envelope(sig.name, tid, sig.args, sig.kwargs, headers=opts.get("headers"))
    for key in ("link", "link_error", "chain"):
        if opts.get(key):
            env[key] = [dict(x) for x in opts[key]]
    encode_envelope(env)  # fail now if it cannot travel
    if app.signer is not None:
        app.signer.sign(env, scope)
    return {"queue": queue, "priority": priority, "body": env}


# -- what a worker does after a task: called by client.worker ----------------------------------
def after_task(app, env: dict, state: str, value=None, meta: dict | None = None) -> None:
    """Continue the workflow a finished task belongs to.

    SUCCESS: send every ``link`` callback with the result prepended, and the
    next ``chain`` step (carrying the rest of the chain).  FAILURE: send every
    ``link_error`` errback with the failed task's id prepended, and store a
    FAILURE naming the failed step for every later chain step.
    """
    if state == "SUCCESS":
        for cb in env.get("link") or ():
            signature(cb).apply_async((value,))
        steps = env.get("chain") or []
        if steps:
            nxt = signature(steps[0])
            nxt._app = app
            nxt["options"]["chain"] = steps[1:]
            nxt.apply_async((value,))
    elif state == "FAILURE":
        for eb in env.get("link_error") or ():
            s = signature(eb)
            s._app = app
            s.apply_async((env.get("id"),))
        meta = meta or {}
        why = f"chain step {env.get('task')}[{env.get('id')}] failed: {meta.get('exc_type')}: {meta.get('exc_message')}"
        for step in env.get("chain") or ():
            sid = (step.get("options") or {}).get("task_id")
            if sid:
                app.client.store_result(sid, "FAILURE", None, {"exc_type": "ChainError", "exc_message": why})
