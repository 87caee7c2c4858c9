"""Canvas: signatures and the workflows built from them, as Celery users write them.

    add.s(2, 2)                      # a signature: call it later
    chain(add.s(2, 2), add.s(4))     # or add.s(2, 2) | add.s(4): 8
    group(add.s(i, i) for i in range(10))()       # GroupResult; .get() in order
    chord((add.s(i, i) for i in range(10)), tsum.s())()   # body gets the list of results
    add.s(2, 2) | group(add.s(1), add.s(2)) | tsum.s()    # 11: a group followed by a task is a chord

Every primitive is a ``Signature`` (a dict, as in Celery), so any of them nests in any other and
travels inside a task envelope; ``Signature.from_dict`` turns the map back into the right class.

The algebra is Celery's (celery/canvas.py 5.x), which ``|`` and ``chain()`` follow:

* ``sig | sig`` → chain; ``chain | chain`` → one flat chain; ``sig | group`` → chain (a group of one
  member is unrolled to the member);
* ``group | sig`` → chord(group, sig); ``group | group`` → chord whose body is the second group;
* ``chain ending in a group | sig`` → the group becomes a chord with the new task as body;
  ``chord | sig`` (and a chain ending in a chord ``| sig``) → the sig joins the chord's body.

How each one runs on brokerd:

* **chain** — before anything is sent the chain is *normalized*: nested chains are flattened, and a
  group or chord that is followed by more steps becomes a chord whose body is a chain of those steps
  (so only the last step can be a group or chord).  Every task id is then chosen up front
  (``freeze``); the first step is sent with the rest in its envelope (``chain``, protocol.md §8.1),
  and the worker that finishes a step sends the next one with the result as its first argument.  A
  failed step stops the chain: every later task id gets a FAILURE result (``ChainError`` naming the
  failed step), so ``.get()`` on the chain fails too.
* **group** — its members are sent at once (each may be a chain, chord or group); ``GroupResult``
  keeps their results.  In a chain, a group's members each get the previous result.
* **chord** — the barrier lives in brokerd (``CHORD``, §5.27): the header's task ids are declared
  first, then the header is sent; brokerd counts each member's final result as part of storing it,
  and publishes the body exactly once when the last one succeeds (or the error callback if one
  fails).  A body that is a chain is sent as its first task carrying the rest (``chain``); a body
  that is a group or chord is sent as the built-in task ``brokerd.canvas``, which applies it to the
  header's results, so every chord, however deep, is still counted in brokerd.
* **link / link_error** — signatures in the envelope (``link``, ``link_error``) that the worker
  sends after success (with the result prepended) or calls after failure: an errback whose task
  takes more than one positional argument is called in the worker as ``errback(request, exc,
  traceback)``; an older one taking only the task id is sent as a task with that id (Celery's rule).
"""

from __future__ import annotations

import copy
import functools
import inspect
import logging
import types
import uuid

from client._current import Request, current_app, current_request
from client.envelope import encode_envelope, make_envelope
from client.exceptions import ChordError, Ignore, ImproperlyConfigured
from client.result import AsyncResult, EagerResult, GroupResult

# canvas never imports client.app: it works on the app it is given (or the
# current one) through its public methods, and client.app imports canvas for
# ``task.s()``, so the dependency runs one way.

log = logging.getLogger("brokerd.worker")

# The built-in task brokerd publishes as a chord body that is itself a group or chord: it applies the
# canvas in its ``sig`` keyword to the header's results (registered by ``register_builtins``).
APPLY_TASK = "brokerd.canvas"
# The built-in task brokerd publishes when a chord fails and its body has errbacks or more task ids (``_error_spec``).
CHORD_FAILED_TASK = "brokerd.chord_failed"
# Celery's celery.accumulate (its arguments as one result), for ``replace(group)``; brokerd.* names are
# built-ins, hidden from ``inspect registered``.
ACCUMULATE_TASK = "brokerd.accumulate"
# The envelope keys a signature's options turn into (protocol.md §8.1): they are workflow, not call options.
WORKFLOW_KEYS = ("link", "link_error", "chain")


def _plain(value):
    """Signatures (dict subclasses) and tuples → plain maps and lists, so CBOR carries them as such."""
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


plain = _plain  # for the worker: a returned signature is stored as its plain map


def _sig_list(value, app=None) -> list:
    """A ``link=``/``link_error=`` value (one signature or a list of them) → a list of Signatures."""
    if value is None:
        return []
    if isinstance(value, dict):
        return [maybe_signature(value, app)]
    if isinstance(value, (list, tuple)):
        return [maybe_signature(v, app) for v in value]
    raise TypeError(f"link and link_error take a signature or a list of signatures, not {type(value).__name__}")


def _links_as_lists(options: dict) -> dict:
    """``link``/``link_error`` given as one signature (Celery allows ``sig.set(link_error=eb)``) kept as a
    list of one, the shape everything that reads or appends to them expects."""
    for key in ("link", "link_error"):
        if isinstance(options.get(key), dict):
            options[key] = [options[key]]
    return options


class Signature(dict):
    """``task.s(*args, **kwargs)``: name, args, kwargs and call options.

    A dict underneath (as Celery's), so it travels inside a task envelope.
    ``immutable=True`` (``task.si``, ``sig.set(immutable=True)``) ignores a parent's result.
    """

    TYPES: dict = {}  # subtask_type → class, for from_dict

    def __init__(self, task=None, args=(), kwargs=None, options=None, app=None, immutable=False,
                 subtask_type=None, **ex):
        if isinstance(task, dict):  # Signature(a_signature_map), as Celery allows
            d = task
            task, args, kwargs = d["task"], d.get("args") or (), d.get("kwargs")
            options, immutable = d.get("options"), d.get("immutable", False)
            subtask_type = d.get("subtask_type")
        elif not isinstance(task, str) and isinstance(getattr(task, "name", None), str) and hasattr(task, "s"):
            app = app or getattr(task, "app", None)  # a task itself (Celery: chord([tsum, tsum], ...))
            task = task.name
        super().__init__(task=task, args=list(args or ()), kwargs=dict(kwargs or {}),
                         options=_links_as_lists({**(options or {}), **ex}), immutable=bool(immutable))
        if subtask_type:
            self["subtask_type"] = subtask_type
        self._app = app

    @classmethod
    def from_dict(cls, d: dict, app=None) -> "Signature":
        """A signature map (from an envelope, JSON, or ``dict(sig)``) → the Signature of its kind."""
        typ = d.get("subtask_type")
        if typ:
            try:
                return Signature.TYPES[typ].from_dict(d, app=app)
            except KeyError:
                raise ValueError(f"unknown signature type {typ!r} (known: chain, group, chord)") from None
        if type(d.get("task")) is not str:
            raise ValueError(f"a signature map needs a task name in 'task' (got {d.get('task')!r})")
        return Signature(d["task"], d.get("args") or (), d.get("kwargs"), d.get("options"), app,
                         d.get("immutable", False))

    @property
    def name(self) -> str:
        return self["task"]

    task = name

    @property
    def args(self) -> tuple:
        return tuple(self["args"])

    @args.setter
    def args(self, value) -> None:  # Celery's signatures let you set them: ``link_sig.args = (msg,)``
        self["args"] = list(value or ())

    @property
    def kwargs(self) -> dict:
        return self["kwargs"]

    @kwargs.setter
    def kwargs(self, value) -> None:
        self["kwargs"] = dict(value or {})

    @property
    def options(self) -> dict:
        return self["options"]

    @property
    def immutable(self) -> bool:
        return self["immutable"]

    @property
    def subtask_type(self):
        return self.get("subtask_type")

    @property
    def id(self) -> str | None:
        return self["options"].get("task_id")

    @property
    def app(self):
        if self._app is None:
            self._app = current_app()
        return self._app

    @property
    def type(self):
        """The registered Task of this signature's name (KeyError naming it when unknown)."""
        return self.app.tasks[self.name]

    def set(self, immutable=None, **options) -> "Signature":
        """Set call options (queue=, countdown=, priority=...) in place; ``immutable=True`` makes it
        ignore a parent's result, as ``.si()`` does.  Returns self."""
        if immutable is not None:
            self["immutable"] = bool(immutable)
        self["options"].update(_links_as_lists(options))
        return self

    def set_immutable(self, immutable: bool) -> None:
        self["immutable"] = bool(immutable)

    # -- stamping (Celery 5.3+): custom headers put on every task of a canvas; the worker shows them as
    # request.stamps / request.stamped_headers.  A stamp is an option of the signature, its name listed in
    # the option ``stamped_headers``; publishing moves them to the message headers (protocol.md §8.1
    # ``headers``: ``stamped_headers`` the names, ``stamps`` name -> value).
    def _stamped(self, new: dict, append: bool) -> dict:
        """This signature's stamps with ``new`` added: ``append`` keeps every value (a list), else the new
        value replaces the old."""
        opts = self.options
        names = list(opts.get("stamped_headers") or ())
        new = dict(new)
        listed = new.pop("stamped_headers", None)  # a visitor may name its stamps itself (Celery's older style)
        if listed is not None and (not isinstance(listed, (list, tuple)) or not all(isinstance(n, str) for n in listed)):
            raise ValueError(f"stamped_headers must be a list of stamp names, got {listed!r:.100}")
        out = {}
        for name, value in new.items():
            if not isinstance(name, str) or name in RESERVED_OPTIONS:
                raise ValueError(f"a stamp needs a name that is not a call option: {name!r}")
            if append and name in names:
                old = opts.get(name)
                old = old if isinstance(old, list) else [old]
                value = [*old, *(value if isinstance(value, list) else [value])]
            out[name] = value
            if name not in names:
                names.append(name)
        out["stamped_headers"] = names
        return out

    def stamp(self, visitor=None, append_stamps=False, **headers) -> "Signature":
        """Put stamps (``headers``, and what ``visitor.on_signature`` returns) on this task and its links."""
        self.stamp_links(visitor, append_stamps, **headers)
        more = dict(headers)
        if visitor is not None:
            more.update(visitor.on_signature(self, **headers) or {})
        return self.set(**self._stamped(more, append_stamps))

    def stamp_links(self, visitor, append_stamps=False, **headers) -> None:
        """Stamp this signature's callbacks and errbacks: each is stamped as a signature of its own (Celery's
        ``link.stamp(visitor, ...)``: the visitor's ``on_signature`` for it, its own links), with ``headers``
        and what ``visitor.on_callback`` (``on_errback`` for an errback) returns for it added."""
        for key, hook in (("link", "on_callback"), ("link_error", "on_errback")):
            if isinstance(self.options.get(key), dict):  # one signature (map) given as the link itself
                self.options[key] = [self.options[key]]
            for i, link in enumerate(self.options.get(key) or ()):
                link = maybe_signature(link, self._app)
                more = dict(headers)
                if visitor is not None:
                    more.update(getattr(visitor, hook)(link, **headers) or {})
                link.stamp(visitor, append_stamps, **more)
                self.options[key][i] = link

    def freeze(self, _id=None) -> AsyncResult:
        """Choose the task id now (so a workflow can name it before it runs); its AsyncResult."""
        tid = self["options"].setdefault("task_id", _id or str(uuid.uuid4()))
        return AsyncResult(tid, app=self.app)

    def link(self, callback) -> "Signature":
        """Send ``callback`` with this task's result prepended when it succeeds; returns the callback."""
        callback = maybe_signature(callback, self._app)
        self["options"].setdefault("link", []).append(callback)
        return callback

    def link_error(self, errback) -> "Signature":
        """Call ``errback`` when this task fails (module docstring: the two errback styles)."""
        errback = maybe_signature(errback, self._app)
        self["options"].setdefault("link_error", []).append(errback)
        return errback

    def on_error(self, errback) -> "Signature":
        """``link_error`` that returns this signature, for ``add.s(2, 2).on_error(eb.s()).delay()``."""
        self.link_error(errback)
        return self

    def _merged(self, args=None, kwargs=None):
        if self.immutable:
            return list(self["args"]), dict(self["kwargs"])
        return [*(args or ()), *self["args"]], {**self["kwargs"], **(kwargs or {})}

    def clone(self, args=None, kwargs=None, **options) -> "Signature":
        """A copy (options deep-copied: freezing the copy does not touch this one), with ``args``
        prepended and ``kwargs`` merged unless immutable, and ``options`` set."""
        new = Signature.from_dict(copy.deepcopy(_plain(self)), app=self._app)
        new["args"], new["kwargs"] = self._merged(args, kwargs)
        new["options"].update(options)
        return new

    def __copy__(self):
        return self.clone()

    def __deepcopy__(self, memo):
        return self.clone()

    def apply_async(self, args=None, kwargs=None, _confirm=True, link=None, link_error=None, **options):
        """Send it; ``args`` are prepended (partial application), as in Celery.  ``link=``/``link_error=``
        add callbacks (a signature or a list) to the ones it already has."""
        s = self.clone(args, kwargs, **options)
        opts = s.options
        for key, more in (("link", link), ("link_error", link_error)):
            if more is not None:
                opts[key] = [*(opts.get(key) or ()), *_sig_list(more, self._app)]
        extra = {}
        for key in WORKFLOW_KEYS:
            value = opts.pop(key, None)
            if value:
                extra[key] = _plain(value)
        if opts.get("stamped_headers"):  # the stamps, by name, go with the names (publish_task: headers)
            opts["stamps"] = {k: opts.pop(k, None) for k in opts["stamped_headers"] if isinstance(k, str)}
        app = s.app
        task = app.tasks.get(s.name)
        if app.conf.task_always_eager and task is not None:
            res = task.apply(s.args, s.kwargs, task_id=opts.get("task_id"))
            if res.successful():
                after_task(app, {"id": res.id, "task": s.name, **extra}, "SUCCESS", res.result)
            return res
        return app.publish_task(s.name, s.args, s.kwargs, task=task, extra=extra or None, confirm=_confirm,
                                **_send_options(opts, task))

    def delay(self, *args, **kwargs):
        return self.apply_async(args, kwargs)

    def apply(self, args=None, kwargs=None, throw=None, **options):
        """Run it here and now, with no message and no worker (Celery's): an EagerResult (a group's: a
        GroupResult).  ``client.canvas.apply_eager`` says how each primitive runs."""
        return apply_eager(self.clone(**options) if options else self, args, kwargs, throw)

    def __call__(self, *args, **kwargs):
        """Run the task here and now (no message), with these arguments prepended."""
        a, kw = self._merged(args, kwargs)
        return self.app.tasks[self.name](*a, **kw)

    def __invert__(self):
        """``~sig``: send it and wait for its result (``sig.delay().get()``)."""
        return self.apply_async().get()

    def __or__(self, other):
        if isinstance(other, chain):  # task | chain → chain (the chain's own callbacks stay on its tasks)
            return _mkchain([self, *_unchain_tasks(other)], self._app)
        if isinstance(other, group):  # task | group → chain (a group of one is its member)
            return _mkchain([self, _unroll(other)], self._app)
        if isinstance(other, Signature):  # task | task → chain
            return _mkchain([self, other], self._app)
        return NotImplemented

    __ior__ = __or__

    def __repr__(self):
        args = ", ".join([*(repr(a) for a in self["args"]), *(f"{k}={v!r}" for k, v in self["kwargs"].items())])
        return f"{self.name}({args}){'!' if self.immutable else ''}"


SEND_OPTIONS = ("countdown", "eta", "expires", "priority", "queue", "task_id", "headers")
# chord ids one chord object remembers having applied (to tell its re-application, a new run, from its first)
APPLIED_CHORD_IDS_KEPT = 1000
# names a stamp may not take: the signature's own call options (a stamp is kept among them)
RESERVED_OPTIONS = frozenset((*SEND_OPTIONS, "link", "link_error", "chain", "stamped_headers", "stamps",
                              "time_limit", "soft_time_limit", "ignore_result", "shadow", "routing_key",
                              "exchange", "parent_id", "root_id", "immutable", "subtask_type", "argsrepr", "kwargsrepr"))


def _send_options(opts: dict, task) -> dict:
    """A signature's options → ``App.publish_task`` keywords.  The task's queue
    and priority are applied there, by the routing rule; its ``expires`` here."""
    out = {k: v for k, v in opts.items() if k in SEND_OPTIONS}
    if task is not None and out.get("expires") is None and task.expires is not None:
        out["expires"] = task.expires
    rest = {k: v for k, v in opts.items() if k not in SEND_OPTIONS}
    if rest:  # the per-call options Task.apply_async passes on (time_limit=...): the same, not dropped
        out["options"] = rest
    return out


def maybe_signature(d, app=None):
    """None stays None; a Signature is returned as it is (given ``app`` if it has none); a signature
    map becomes the Signature of its kind (``Signature.from_dict``)."""
    if d is None:
        return None
    if isinstance(d, Signature):
        if d._app is None and app is not None:
            d._app = app
        return d
    if isinstance(d, dict):
        return Signature.from_dict(d, app=app)
    raise TypeError(f"expected a signature (task.s(...)) or a signature map, not {type(d).__name__}")


def signature(varies, *args, app=None, **kwargs) -> Signature:
    """``signature("proj.tasks.add", (2, 2), countdown=10)``, or a signature / signature map as it is."""
    if isinstance(varies, dict):
        return maybe_signature(varies, app)
    return Signature(varies, *args, app=app, **kwargs)


def _sigs(tasks, app=None) -> list[Signature]:
    if len(tasks) == 1 and not isinstance(tasks[0], dict) and hasattr(tasks[0], "__iter__"):
        tasks = tuple(tasks[0])
    return [maybe_signature(t, app) if isinstance(t, dict) else signature(t, app=app) for t in tasks]


def _unroll(g):
    """Celery's maybe_unroll_group: a group of one member is that member."""
    return g.tasks[0] if isinstance(g, group) and len(g.tasks) == 1 else g


def _flat_members(tasks) -> list:
    """A group's members with every member that is itself a group replaced by its members (its own
    partial arguments applied), at any depth: Celery unrolls nested groups, so they all run in parallel
    and ``get()`` gives one flat list."""
    out = []
    for t in tasks:
        if _is_empty(t):
            continue  # an empty chain or group is a no-op member (Celery's): it has no result
        if isinstance(t, group):
            inner = t if not t["args"] else [m.clone(t["args"]) for m in t.tasks] if not t.immutable else t.tasks
            out.extend(_flat_members(inner.tasks if isinstance(inner, group) else inner))
        else:
            out.append(t)
    return out


def _is_empty(sig) -> bool:
    """A chain or group with no task anywhere inside it (``chain()``, ``group([])``, ``chain(group())``)."""
    if isinstance(sig, (chain, group)):
        return all(_is_empty(maybe_signature(t, sig._app)) for t in sig.tasks)
    return False


def _is_composite(sig) -> bool:
    return isinstance(sig, (chain, group, chord))


# -- chain -------------------------------------------------------------------------------------
def _app_of(sigs, app=None):
    """The app a composite works with: the one given, else its first member's (so a canvas built from
    ``task.s()`` keeps its tasks' app even when another App was created later in the process)."""
    if app is not None:
        return app
    for s in sigs:
        if isinstance(s, Signature) and s._app is not None:
            return s._app
    return None


def _unchain_tasks(c) -> list:
    """A chain's tasks with its own ``link``/``link_error`` handed down (Celery's ``unchain_tasks``): the
    callbacks to its last task, the errbacks to every task; so a chain that joins another keeps them
    where they were meant to run.  Unchanged (not copied) when it has none."""
    tasks = list(c.tasks)
    links, errbacks = _sig_list(c.options.get("link"), c._app), _sig_list(c.options.get("link_error"), c._app)
    if not tasks or not (links or errbacks):
        return tasks
    tasks = [maybe_signature(t, c._app).clone() for t in tasks]
    for cb in links:
        tasks[-1].link(cb)
    for eb in errbacks:
        for t in tasks:
            t.link_error(eb)
    return tasks


def _without_links(options: dict) -> dict:
    return {k: v for k, v in options.items() if k not in ("link", "link_error")}


def _mkchain(tasks, app=None, options=None) -> "chain":
    app = _app_of(tasks, app)
    c = dict.__new__(chain)
    Signature.__init__(c, "celery.chain", (), {"tasks": list(tasks)}, options, app, subtask_type="chain")
    return c


class chain(Signature):
    """Run signatures one after another, each result the next one's first argument.

    ``chain(a, b, c)`` is ``a | b | c`` (so it may come out as a chord: ``chain(group(...), tsum.s())``);
    ``chain(a | b)`` is a chain holding that chain, flattened when it runs.
    """

    def __new__(cls, *tasks, app=None, **options):
        if len(tasks) == 1 and not isinstance(tasks[0], dict) and hasattr(tasks[0], "__iter__"):
            tasks = tuple(tasks[0])
        sigs = [maybe_signature(t, app) for t in tasks]
        if any(not _is_empty(s) for s in sigs):  # an empty group or chain step passes its arguments on
            sigs = [s for s in sigs if not _is_empty(s)]
        if len(sigs) <= 1:
            return _mkchain(sigs, app, options)
        out = _mkchain([], app)
        for s in sigs:
            out = out | s
        if isinstance(out, Signature):
            out.options.update(options)
        return out

    def __init__(self, *tasks, **options):
        pass  # built in __new__ (which may return a group or chord instead)

    @classmethod
    def from_dict(cls, d, app=None):
        tasks = (d.get("kwargs") or {}).get("tasks")
        if not isinstance(tasks, (list, tuple)):
            raise ValueError("a chain signature map needs kwargs.tasks, a list of signatures")
        c = _mkchain([maybe_signature(t, app) for t in tasks], app, d.get("options"))
        c["args"] = list(d.get("args") or ())
        c["immutable"] = bool(d.get("immutable", False))
        return c

    @property
    def tasks(self) -> list:
        return self["kwargs"]["tasks"]

    def clone(self, args=None, kwargs=None, **options):
        new = chain.from_dict(copy.deepcopy(_plain(self)), app=self._app)
        new["args"] = list(args or ()) + list(self["args"]) if not self.immutable else list(self["args"])
        new["options"].update(options)
        return new

    def __or__(self, other):
        if isinstance(other, group):
            other = _unroll(other)
            if not isinstance(other, group):
                return self | other
            tasks = _unchain_tasks(self)  # Celery: its own callbacks stay with its tasks
            if not tasks:
                return other
            opts = _without_links(self.options)
            if isinstance(tasks[-1], chord):  # chain ending in a chord | group: the group joins its body
                last = tasks[-1].clone()
                last.body = last.body | other
                return _mkchain([*tasks[:-1], last], self._app, opts)
            return _mkchain([*tasks, other], self._app, opts)
        if isinstance(other, chain):  # chain | chain: one chain; each side's own callbacks stay on its tasks
            out = _mkchain(_unchain_tasks(self), self._app, _without_links(self.options))
            for t in _unchain_tasks(other):
                out = out | t
            return out
        if isinstance(other, Signature):
            tasks = list(self.tasks)
            if tasks and isinstance(tasks[-1], group):  # chain ending in a group | task → chord
                tasks[-1] = chord(tasks[-1], other, app=self._app)
                if len(tasks) > 1 and isinstance(tasks[-2], chord):  # two chords in a row: the second
                    prev = tasks[-2].clone()                         # joins the first one's body
                    prev.body = prev.body | tasks[-1]
                    tasks = [*tasks[:-2], prev]
                return _mkchain(tasks, self._app, self.options)
            if tasks and isinstance(tasks[-1], chord) and not isinstance(other, chord):
                last = tasks[-1].clone()
                last.body = last.body | other
                return _mkchain([*tasks[:-1], last], self._app, self.options)
            # chain | task: Celery hands the chain's own callbacks to its tasks first (they run where the
            # chain ended, not after the new task)
            return _mkchain([*_unchain_tasks(self), other], self._app, _without_links(self.options))
        return NotImplemented

    __ior__ = __or__

    def link(self, callback):
        """Celery: called with the chain's final result (linked to its last task when it runs)."""
        return Signature.link(self, callback)

    def steps(self) -> list:
        """The normalized steps (module docstring): nested chains flattened, links and error links
        handed to the tasks, and a group or chord that has steps after it turned into a chord whose
        body carries them, so that only the last step can be a group or a chord."""
        flat: list = []

        def add(t):
            if isinstance(t, chain):
                if t.options.get("link") or t.options.get("link_error"):
                    t = _mkchain(t.steps(), t._app)  # an inner chain's own callbacks go to its tasks
                for x in t.tasks:
                    add(x)
            else:
                flat.append(t)

        for t in self.tasks:
            t = maybe_signature(t, self._app)
            if not _is_empty(t):  # an empty group or chain step passes its arguments on (Celery's)
                add(t)
        if not flat:
            raise ValueError("chain() needs at least one signature")
        for i, t in enumerate(flat):
            if i < len(flat) - 1 and isinstance(t, (group, chord)):
                rest = flat[i + 1:]
                after = rest[0] if len(rest) == 1 else _mkchain(rest, self._app)
                if isinstance(t, group):
                    up = chord(t, after, app=self._app)
                    up.options.update(t.options)  # its task_id (the group id) names the chord
                else:
                    up = t.clone()
                    up.body = _mkchain([up.body, after], self._app)
                flat = [*flat[:i], up]
                break
        for cb in self.options.get("link") or ():
            flat[-1].link(cb)
        for eb in self.options.get("link_error") or ():
            for t in flat:
                t.link_error(eb)
        if self.options.get("task_id") and not isinstance(flat[-1], chord) and not flat[-1].id:
            flat[-1].set(task_id=self.options["task_id"])  # Celery: a chain's id is its last task's
            # (a chord's: its body's, given to chord.freeze by chain.freeze)
        return flat

    def stamp(self, visitor=None, append_stamps=False, **headers):
        return _stamp_composite(self, visitor, append_stamps, headers, "on_chain_start", "on_chain_end",
                                self.tasks)

    def freeze(self, _id=None):
        """Normalize, choose every task id, and return the result of the last step (``.parent`` leads
        back through the earlier ones)."""
        if _id is not None:
            self["options"]["task_id"] = _id
        steps = self.steps()
        self["kwargs"]["tasks"] = steps
        for k in ("link", "link_error"):
            self["options"].pop(k, None)  # now on the steps
        parent = None
        res = None
        for i, s in enumerate(steps):
            last_chord = i == len(steps) - 1 and isinstance(s, chord) and self["options"].get("task_id")
            res = s.freeze(self["options"]["task_id"]) if last_chord else s.freeze()
            _root(res).parent = parent
            parent = res
        return res

    def apply_async(self, args=None, kwargs=None, **options):
        if _always_eager(self):
            return self.apply(args, kwargs, **options)
        c = self.clone()
        task_id = options.pop("task_id", None)
        if task_id:
            c["options"]["task_id"] = task_id
        link, link_error = options.pop("link", None), options.pop("link_error", None)
        for cb in _sig_list(link, self._app):
            c.link(cb)
        for eb in _sig_list(link_error, self._app):
            c.link_error(eb)
        result = c.freeze()
        steps = c.tasks
        a = [*(args or ()), *c["args"]] if not c.immutable else list(c["args"])
        _apply_steps(steps, a, kwargs, options)
        return result

    def delay(self, *args, **kwargs):
        return self.apply_async(args, kwargs)

    def __call__(self, *args, **kwargs):
        return self.apply_async(args, kwargs)

    def __repr__(self):
        return " | ".join(repr(s) for s in self.tasks) if self.tasks else "chain()"


class StampingVisitor:
    """Celery's visitor for ``canvas.stamp(visitor=...)``: each hook returns the stamps (a dict) to put on
    what it visits; ``on_signature`` is called for every task, the others around chains, groups, chords
    and for links.  Subclass it and override what you need."""

    def on_signature(self, sig, **headers) -> dict:
        return {}

    def on_group_start(self, group, **headers) -> dict:
        return {}

    def on_group_end(self, group, **headers) -> None:
        pass

    def on_chain_start(self, chain, **headers) -> dict:
        return {}

    def on_chain_end(self, chain, **headers) -> None:
        pass

    def on_chord_header_start(self, sig, **header) -> dict:
        return self.on_group_start(sig, **header)

    def on_chord_header_end(self, sig, **header) -> None:
        self.on_group_end(sig, **header)

    def on_chord_body(self, sig, **header) -> dict:
        return {}

    def on_callback(self, callback, **header) -> dict:
        return {}

    def on_errback(self, errback, **header) -> dict:
        return {}


def _stamp_composite(sig, visitor, append_stamps, headers, start, end, members, body=None):
    """Stamp a chain/group/chord: its own stamps from ``start``, then its links, each member, the body."""
    headers = dict(headers)
    if visitor is not None and start:
        headers.update(getattr(visitor, start)(sig, **headers) or {})
    sig.set(**sig._stamped(headers, append_stamps))
    sig.stamp_links(visitor, append_stamps, **headers)
    for i, t in enumerate(members):
        t = maybe_signature(t, sig._app)
        t.stamp(visitor, append_stamps, **headers)
        members[i] = t
    if visitor is not None and end:
        getattr(visitor, end)(sig, **headers)
    if body is not None:
        more = dict(headers)
        if visitor is not None:
            more.update(visitor.on_chord_body(sig, **headers) or {})
        body.stamp(visitor, append_stamps, **more)
    return sig


def _root(res):
    """The first result up a result's ``.parent`` links: where the step before it hangs."""
    while getattr(res, "parent", None) is not None:
        res = res.parent
    return res


def _apply_steps(steps, args=None, kwargs=None, options=None):
    """Send the first of a normalized chain's steps with ``args`` prepended, carrying the rest
    (``chain``); only a plain task can carry them (normalization makes sure that is the case)."""
    first, rest = steps[0], list(steps[1:])
    options = dict(options or {})
    if rest:
        if _is_composite(first):  # not normalized (a hand-made envelope): normalize what is left
            again = _mkchain(steps, first._app)
            again.freeze()
            first, rest = again.tasks[0], list(again.tasks[1:])
        if rest:
            options["chain"] = [_plain(r) for r in rest]
    return first.apply_async(args, kwargs, **options)


# -- group -------------------------------------------------------------------------------------
class group(Signature):
    """Run signatures in parallel; ``GroupResult.get()`` returns their results in order."""

    def __init__(self, *tasks, app=None, **options):
        sigs = _sigs(tasks, app)
        super().__init__("celery.group", (), {"tasks": sigs}, options, _app_of(sigs, app), subtask_type="group")

    @classmethod
    def from_dict(cls, d, app=None):
        tasks = (d.get("kwargs") or {}).get("tasks")
        if not isinstance(tasks, (list, tuple)):
            raise ValueError("a group signature map needs kwargs.tasks, a list of signatures")
        g = group([maybe_signature(t, app) for t in tasks], app=app, **(d.get("options") or {}))
        g["args"] = list(d.get("args") or ())
        g["immutable"] = bool(d.get("immutable", False))
        return g

    @property
    def tasks(self) -> list:
        return self["kwargs"]["tasks"]

    def clone(self, args=None, kwargs=None, **options):
        new = group.from_dict(copy.deepcopy(_plain(self)), app=self._app)
        new["args"] = list(args or ()) + list(self["args"]) if not self.immutable else list(self["args"])
        new["options"].update(options)
        return new

    def link(self, sig):
        """Celery: linked to the first member only, made immutable (it cannot get every result)."""
        sig = maybe_signature(sig, self._app).clone().set(immutable=True)
        return self.tasks[0].link(sig)

    def link_error(self, sig):
        """Celery 5.7: every member gets a copy of the errback (mutable as given: an old-style one gets
        the failed member's id), so any failure calls it."""
        sig = maybe_signature(sig, self._app)
        if self.options.get("link_error") is not None:
            # the group has errbacks of its own (``group(...).set(link_error=eb)``), which replace its
            # members' when it runs (Celery): this one joins them, so both run (Celery's chord does so)
            self.options["link_error"] = [*_sig_list(self.options["link_error"], self._app), sig.clone()]
            return (sig,)
        return tuple(t.link_error(sig.clone()) for t in self.tasks)

    def stamp(self, visitor=None, append_stamps=False, **headers):
        return _stamp_composite(self, visitor, append_stamps, headers, "on_group_start", "on_group_end",
                                self.tasks)

    def freeze(self, _id=None):
        gid = self["options"].setdefault("task_id", _id or str(uuid.uuid4()))
        self["kwargs"]["tasks"] = _flat_members(self.tasks)
        results = [t.freeze() for t in self.tasks]
        app = self.tasks[0].app if self.tasks else self._app
        return GroupResult(gid, results, app=app)

    def apply_async(self, args=None, kwargs=None, **options):
        if _always_eager(self):
            return self.apply(args, kwargs, **options)
        g = self.clone(args)
        link, link_error = options.pop("link", None), options.pop("link_error", None)
        for cb in _sig_list(link, self._app):
            g.link(cb)
        for eb in _sig_list(link_error, self._app):
            g.link_error(eb)
        gid = options.pop("task_id", None)
        result = g.freeze(gid)
        app = None
        own = g.options.get("link_error")  # the group's own errbacks: each member runs with them instead of its own
        own = None if own is None else _sig_list(own, self._app)
        for t in g.tasks:
            app = t.app
            if own is not None:
                t = t.clone()
                if _is_composite(t):  # a chain's steps, a group's members, a chord's body get them
                    for eb in own:
                        t.link_error(eb.clone())
                else:
                    t["options"]["link_error"] = [eb.clone() for eb in own]
            if _is_composite(t):
                t.apply_async(g["args"], kwargs, **options)
            else:
                t.apply_async(g["args"], kwargs, _confirm=False, **options)  # pipelined ...
        if app is not None and not app.conf.task_always_eager:
            app.client.wait_for_confirms()  # ... and confirmed together: one round trip
        if len(result.results) == 1 and isinstance(result.results[0], GroupResult):
            return result.results[0]  # Celery's group(a | group(b, c)): the inner group's results, not [[...]]
        return result

    def delay(self, *args, **kwargs):
        return self.apply_async(args, kwargs)

    def __call__(self, *args, **kwargs):
        return self.apply_async(args, kwargs)

    def __or__(self, other):
        if isinstance(other, group) and not other.tasks:
            return self
        return chord(self, other, app=self._app)  # group | anything → chord

    __ior__ = __or__

    def __len__(self):
        return len(self.tasks)

    def __iter__(self):
        return iter(self.tasks)

    def __repr__(self):
        return f"group([{', '.join(repr(t) for t in self.tasks)}])"


# -- chord -------------------------------------------------------------------------------------
class chord(Signature):
    """``chord(header, body)``: run the header as a group; when every member has
    succeeded, brokerd sends the body with the list of their results."""

    def __init__(self, header, body=None, app=None, **options):
        if isinstance(header, group):
            tasks = list(header.tasks)
            options = {**{k: v for k, v in header.options.items() if k == "task_id"}, **options}
        elif isinstance(header, dict):  # one signature (or a chain) as the whole header
            tasks = [maybe_signature(header, app)]
        elif isinstance(header, types.GeneratorType):
            tasks = []  # taken one by one as they are sent (apply_async), unless something reads them first
        else:  # a list of signatures: copies (Celery's _maybe_group), so linking to chord.tasks or freezing
            # them leaves the caller's signatures as they were
            tasks = [t.clone() if isinstance(t, Signature) else t for t in _sigs((header,), app)]
        body = maybe_signature(body, app)
        super().__init__("celery.chord", (), {"header": tasks, "body": body}, options,
                         _app_of([*tasks, body], app), subtask_type="chord")
        # a generator header (Celery #3021): its tasks are sent as it makes them, and the CHORD declared
        # after the last one (brokerd counts members that finished before it), so a long or slow generator
        # has its first tasks running while it makes the rest
        self._lazy = header if isinstance(header, types.GeneratorType) else None

    @classmethod
    def from_dict(cls, d, app=None):
        kw = d.get("kwargs") or {}
        header = kw.get("header")
        if isinstance(header, dict):  # Celery writes the header as a group map
            header = maybe_signature(header, app)
        if not isinstance(header, (list, tuple, group)):
            raise ValueError("a chord signature map needs kwargs.header, a list of signatures")
        c = chord([maybe_signature(t, app) for t in header], maybe_signature(kw.get("body"), app), app=app,
                  **(d.get("options") or {}))
        c["args"] = list(d.get("args") or ())
        c["immutable"] = bool(d.get("immutable", False))
        return c

    @property
    def tasks(self) -> list:
        lazy = getattr(self, "_lazy", None)
        if lazy is not None:  # read before it was sent: made whole now (copies, as a list header's)
            self._lazy = None
            self["kwargs"]["header"] = [t.clone() if isinstance(t, Signature) else t
                                        for t in _sigs((list(lazy),), self._app)]
        return self["kwargs"]["header"]

    header = tasks

    @property
    def body(self):
        return self["kwargs"]["body"]

    @body.setter
    def body(self, value):
        self["kwargs"]["body"] = maybe_signature(value, self._app)

    def clone(self, args=None, kwargs=None, **options):
        new = chord.from_dict(copy.deepcopy(_plain(self)), app=self._app)
        new["args"] = list(args or ()) + list(self["args"]) if not self.immutable else list(self["args"])
        new["options"].update(options)
        return new

    def link(self, callback):
        """Celery: linked to the body only."""
        return self.body.link(callback)

    def link_error(self, errback):
        """Celery's: linked to the body (whose errbacks run when a header member fails, ``_error_spec``);
        with the setting ``task_allow_error_cb_on_chord_header`` on (read now, as Celery does), also to
        every header task, made immutable, so each failing member calls it too."""
        errback = maybe_signature(errback, self._app)
        try:
            on_header = bool(self.app.conf.get("task_allow_error_cb_on_chord_header"))
        except RuntimeError:  # no app anywhere yet: the default, off
            on_header = False
        if on_header:
            for t in self.tasks:
                maybe_signature(t, self._app).link_error(errback.clone().set(immutable=True))
        return self.body.link_error(errback)

    def __call__(self, body=None, **options):
        c = self
        if body is not None:
            c = self.clone()
            c.body = body
        return c.apply_async(**options)

    def __or__(self, other):
        if isinstance(other, Signature) and not isinstance(other, (group, chain)):
            c = self.clone()  # chord | task → the task joins the body
            c.body = c.body | other
            return c
        if isinstance(other, group) and len(other.tasks) == 1:
            c = self.clone()
            c.body = c.body | _unroll(other)
            return c
        return Signature.__or__(self, other)

    __ior__ = __or__

    def _members(self, tasks=None) -> list:
        """The header, with groups in it flattened into their members (one result each); a chain in it that
        ends in a group gives that group's list as its one result (Celery: the chain prevents unrolling)."""
        out = []
        for m in _flat_members([maybe_signature(t, self._app) for t in (self.tasks if tasks is None else tasks)]):
            if isinstance(m, chain) and m.tasks and isinstance(maybe_signature(m.tasks[-1], self._app), group):
                m = m | Signature(ACCUMULATE_TASK, (), {"index": 0}, app=m._app or self._app)
            out.append(m)
        return out

    def stamp(self, visitor=None, append_stamps=False, **headers):
        return _stamp_composite(self, visitor, append_stamps, headers, "on_chord_header_start",
                                "on_chord_header_end", self.tasks, self.body)

    def freeze(self, _id=None):
        if self.body is None:
            raise ValueError("chord() needs a body: chord(header, body) or chord(header)(body)")
        cid = self["options"].setdefault("task_id", str(uuid.uuid4()))  # the header's group id, the CHORD's
        members = self._members()
        self["kwargs"]["header"] = members
        header = GroupResult(cid, [m.freeze() for m in members], app=self.body.app)
        body = self.body.freeze(_id) if _id is not None else self.body.freeze()  # an id given names the result
        _root(body).parent = header
        return body

    def apply_async(self, args=None, kwargs=None, **options):
        if self.body is None:
            raise ValueError("chord() needs a body: chord(header, body) or chord(header)(body)")
        if _always_eager(self):
            return self.apply(args, kwargs, **options)
        lazy, self._lazy = getattr(self, "_lazy", None), None  # a generator header: sent as it yields (once)
        c = self.clone(args)
        link, link_error = options.pop("link", None), options.pop("link_error", None)
        body_id = options.pop("task_id", None)  # names the result: the body's id (Celery's)
        # countdown/eta delay the header (Celery #7851): the body runs when the header is done anyway
        delay = {k: options.pop(k) for k in ("countdown", "eta") if options.get(k) is not None}
        if options:
            c.body = c.body.clone(**options)
        for cb in _sig_list(link, self._app):
            c.link(cb)
        for eb in _sig_list(link_error, self._app):
            c.link_error(eb)
        if lazy is not None:
            return c._apply_as_made(lazy, body_id, kwargs, delay)
        result = c.freeze(body_id)
        app = c.body.app
        members = c.tasks
        if not members:  # an empty header (or only empty chains): Celery runs the body at once, with []
            c.body.apply_async(([],), kwargs)
            return result
        ids = [i for m in members for i in _final_ids(m)]
        spec = body_spec(app, c.body)
        error = _error_spec(app, c.body, spec, result.id)
        # brokerd's CHORD is idempotent per chord id (a redelivered workflow step must not fire the body
        # twice), but this object applied again under the id it had (Celery's frozen chord applied twice)
        # is a new run: it names one, so brokerd waits for the header's new results and fires the body again
        applied = self.__dict__.setdefault("_applied_chord_ids", set())
        run = str(uuid.uuid4()) if c.id in applied else None
        app.client.chord(c.id, ids, spec, error, run=run)
        if len(applied) < APPLIED_CHORD_IDS_KEPT:
            applied.add(c.id)
        for m in members:
            if _is_composite(m):
                m.apply_async(c["args"], kwargs, **delay)
            else:  # a plain member knows its chord (request.group): Task.add_to_chord grows it
                m.apply_async(c["args"], kwargs, _confirm=False, group_id=c.id, **delay)
        app.client.wait_for_confirms()
        return result

    def _apply_as_made(self, made, body_id, kwargs, delay):
        """A generator header: each member is sent as the generator makes it; then the CHORD is declared
        with all their ids (brokerd counts those already finished, §5.27).  The chord's result as usual."""
        cid = self["options"].setdefault("task_id", str(uuid.uuid4()))
        body = self.body.freeze(body_id) if body_id is not None else self.body.freeze()
        app = self.body.app
        members, results, ids = [], [], []
        for t in made:
            for m in self._members([maybe_signature(t, self._app)]):
                results.append(m.freeze())
                ids.extend(_final_ids(m))
                members.append(m)
                member_of = {} if _is_composite(m) else {"group_id": cid}  # request.group, for add_to_chord
                m.apply_async(self["args"], kwargs, **member_of, **delay)  # confirmed one by one: it runs while more are made
        self["kwargs"]["header"] = members
        _root(body).parent = GroupResult(cid, results, app=app)
        if not members:  # an empty header: Celery runs the body at once, with []
            self.body.apply_async(([],), kwargs)
            return body
        spec = body_spec(app, self.body)
        app.client.chord(cid, ids, spec, _error_spec(app, self.body, spec, body.id))
        app.client.wait_for_confirms()
        return body

    def __repr__(self):
        return f"chord([{', '.join(repr(t) for t in self.tasks)}], {self.body!r})"


Signature.TYPES.update(chain=chain, group=group, chord=chord)


def add_to_chord(task, sig, lazy: bool = False):
    """Celery's ``self.add_to_chord(sig)``: the running chord member ``task`` adds ``sig`` to its chord.
    brokerd grows the chord first (CHORD_ADD, one atomic change, protocol.md §5.49), then ``sig`` is
    sent, so the body waits for it too; the body gets its result after the others'.  Returns the
    result of ``sig`` (``lazy``: ``sig`` itself, frozen, for the caller to send)."""
    cid = task.request.group
    if not cid:
        raise ValueError(f"add_to_chord from {task.name}: this task is not a member of a chord (request.group is "
                         f"unset); only a task sent as a chord's header member can grow its chord")
    sig = maybe_signature(sig, task.app).clone()
    if not _is_composite(sig):
        sig.set(group_id=cid)  # it can grow the chord in turn
    sig.freeze()
    task.app.client.chord_add(cid, _final_ids(sig))
    return sig if lazy else sig.apply_async()


def _final_ids(sig) -> list[str]:
    """The task ids whose results are a frozen canvas's results: what a chord header counts."""
    if isinstance(sig, chain):
        return _final_ids(sig.tasks[-1])
    if isinstance(sig, group):
        return [i for t in sig.tasks for i in _final_ids(t)]
    if isinstance(sig, chord):
        return _final_ids(sig.body)
    return [sig.id]


def _all_ids(step) -> list[str]:
    """Every task id inside a frozen step map (a signature, chain, group or chord)."""
    if not isinstance(step, dict):
        return []
    out = []
    tid = (step.get("options") or {}).get("task_id")
    kw = step.get("kwargs") or {}
    if step.get("subtask_type") in ("chain", "group"):
        for t in kw.get("tasks") or ():
            out.extend(_all_ids(t))
    elif step.get("subtask_type") == "chord":
        for t in kw.get("header") or ():
            out.extend(_all_ids(t))
        out.extend(_all_ids(kw.get("body")))
    elif type(tid) is str:
        out.append(tid)
    return out


def body_spec(app, body) -> dict:
    """A chord body as a message spec: a task as itself; a chain as its first task carrying the rest;
    a group or chord (or a chain that starts with one) as ``brokerd.canvas`` carrying it."""
    if isinstance(body, chain):
        steps = body.tasks  # frozen, so normalized
        if not _is_composite(steps[0]) and not steps[0].immutable:
            first = steps[0].clone()
            if len(steps) > 1:
                first["options"]["chain"] = [_plain(s) for s in steps[1:]]
            return message_spec(app, first, "chord-body")
        if not _is_composite(steps[0]):  # an immutable first step: brokerd would prepend the results
            return message_spec(app, Signature(APPLY_TASK, (), {"sig": _plain(body)}, app=app), "chord-body")
        body = steps[0]
    # brokerd prepends the header's results to the body it publishes (§5.27); an immutable body (task.si)
    # must not get them, so it goes through brokerd.canvas too, whose apply_async honours immutable
    if _is_composite(body) or body.immutable:
        return message_spec(app, Signature(APPLY_TASK, (), {"sig": _plain(body)}, app=app), "chord-body")
    return message_spec(app, body, "chord-body")


def _first_sig(sig):
    if isinstance(sig, (chain, group)):
        return _first_sig(sig.tasks[0])
    if isinstance(sig, chord):
        return _first_sig(sig.tasks[0])
    return sig


def _errbacks_of(sig) -> list:
    """The errbacks linked to ``sig``'s result, as plain maps without repeats (Celery's
    ``_result_errbacks``): a chord's are its body's (``chord.link_error`` puts them there), a chain's
    its last step's (a frozen chain keeps them on its steps), a group's its members' and its own."""
    out: list = []

    def add(opts):
        for e in _sig_list((opts or {}).get("link_error")):
            p = _plain(e)
            if p not in out:
                out.append(p)

    add(sig.options)
    if isinstance(sig, chord):
        out.extend(e for e in _errbacks_of(sig.body) if e not in out)
    elif isinstance(sig, chain) and sig.tasks:
        out.extend(e for e in _errbacks_of(sig.tasks[-1]) if e not in out)
    elif isinstance(sig, group):
        for t in sig.tasks:
            out.extend(e for e in _errbacks_of(t) if e not in out)
    return out


def _result_id(sig) -> str | None:
    """The id of a frozen signature's result: a chord's is its body's, a chain's its last step's."""
    if isinstance(sig, chain):
        return _result_id(sig.tasks[-1]) if sig.tasks else sig.id
    if isinstance(sig, chord):
        return _result_id(sig.body)
    return sig.id


def _error_units(body, result_id) -> list[dict]:
    """Whose errbacks a failed chord calls, and as which task (Celery 5.7's ``chord_error_from_stack``):
    a group body, each of its members (a nested group's members too) with its own errbacks, as that
    member; any other body, once, as the body (the chord's result id)."""
    if not isinstance(body, group):
        return [{"id": result_id, "errbacks": _errbacks_of(body)}]
    units = []
    for t in body.tasks:
        if isinstance(t, group):
            units.extend(_error_units(t, None))
        else:
            units.append({"id": _result_id(t), "errbacks": _errbacks_of(t)})
    return [u for u in units if u["errbacks"] and isinstance(u["id"], str)]


def _error_spec(app, body, spec: dict, result_id: str | None = None) -> dict | None:
    """What brokerd publishes when a header member fails: ``brokerd.chord_failed``, when there is anything
    to do beyond what brokerd does itself (it fails the body spec's task id).  It fails the body's other
    task ids (a chain, group or chord body), so nothing waits for ever, and calls the body's errbacks as
    Celery does for a failed chord (``_error_units``): new-style ones with ``(request, exc, None)``,
    old-style ones sent with the request's id; ``exc`` is a ChordError naming the member that failed, or,
    for the members of a group body, that member's own exception."""
    units = [u for u in _error_units(body, result_id or spec["body"]["id"]) if u["errbacks"]]
    others = [i for i in _all_ids(_plain(body)) if i != spec["body"]["id"]]
    if not (others or units):
        return None
    kwargs = {"ids": others, "errbacks": units, "own_exc": isinstance(body, group)}
    return message_spec(app, Signature(CHORD_FAILED_TASK, (), kwargs, app=app), "chord-error")


def message_spec(app, sig: Signature, scope: str = "task") -> dict:
    """What brokerd needs to publish a signature later: queue, priority, envelope (signed in ``scope``
    when the app signs tasks: brokerd prepends arguments to chord bodies and errbacks, client/signing.py)."""
    opts = sig.options
    queue, priority = app.queue_and_priority(sig.name, app.tasks.get(sig.name), opts.get("queue"),
                                             opts.get("priority"))
    tid = sig.freeze().id
    # sent later by brokerd on behalf of the task running now (a chord declared inside a task, or by the
    # worker that continues a chain): that task's root is its root, as for any task it sends (Celery's)
    parent = current_request.get()
    parent_id, root_id = (parent.id, parent.root_id or parent.id) if parent is not None and not parent.is_eager \
        else (None, None)
    env = make_envelope(sig.name, tid, sig.args, sig.kwargs, parent_id=parent_id, root_id=root_id,
                        headers=opts.get("headers"))
    for key in WORKFLOW_KEYS:
        if opts.get(key):
            env[key] = _plain(opts[key])
    encode_envelope(env)  # fail now if it cannot travel
    if app.signer is not None:
        app.signer.sign(env, scope)
    return {"queue": queue, "priority": priority, "body": env}


def callbacks_extra(options: dict, app=None) -> dict | None:
    """``Task.apply_async(link=..., link_error=...)``: pops them from the call's options and returns the
    envelope keys they become (None when neither was given), so they are sent, never dropped."""
    extra = {}
    for key in ("link", "link_error"):
        sigs = _sig_list(options.pop(key, None), app)
        if sigs:
            extra[key] = _plain(sigs)
    return extra or None


# -- eager: a canvas run here and now (Celery's sig.apply(), and every primitive under task_always_eager) --
def apply_eager(sig, args=None, kwargs=None, throw=None):
    """Run ``sig`` in this process, each step as ``Task.apply`` runs a task: a task's EagerResult (a chain's
    is its last step's, ``.parent`` leading back), a group's GroupResult of them, a chord's body's, after
    its header's.  ``link`` callbacks run with the value; on a failure the ``link_error`` errbacks run
    (Celery's two styles) and the rest of a chain, or a chord's body, does not.  ``throw=True`` (or the
    setting ``task_eager_propagates``) raises a task's exception instead of keeping it in the result."""
    sig = maybe_signature(sig)
    args, kwargs = list(args or ()), dict(kwargs or {})
    if isinstance(sig, chain):
        res = None
        step_args = [*args, *sig["args"]] if not sig.immutable else list(sig["args"])
        for step in sig.tasks:
            if _is_empty(maybe_signature(step, sig._app)):
                continue  # passes its arguments on
            prev = res
            res = apply_eager(step, step_args, kwargs if prev is None else None, throw)
            _root(res).parent = prev
            if not res.successful():
                break
            step_args = [res.get(disable_sync_subtasks=False)]
        return res if res is not None else EagerResult(str(uuid.uuid4()), None, "SUCCESS")
    if isinstance(sig, chord):
        header = apply_eager(group(sig.tasks, app=sig._app, task_id=sig.options.get("task_id")),
                             [*args, *sig["args"]], kwargs, throw)
        failed = next((r for r in header.results if not r.successful()), None)
        if failed is not None:  # the body never runs: its result is the failed member's exception
            body = EagerResult(str(uuid.uuid4()), None, "FAILURE", failed.result)
        else:
            body = apply_eager(sig.body, [header.get(disable_sync_subtasks=False)], None, throw)
        _root(body).parent = header
        return body
    if isinstance(sig, group):
        gid = sig.options.get("task_id") or str(uuid.uuid4())
        g_args = [*args, *sig["args"]] if not sig.immutable else list(sig["args"])
        res = GroupResult(gid, [apply_eager(t, g_args, kwargs, throw) for t in _flat_members(sig.tasks)],
                          app=sig._app)
        return res.results[0] if len(res.results) == 1 and isinstance(res.results[0], GroupResult) else res
    app = sig.app
    task = app.tasks.get(sig.name)
    if task is None:
        raise KeyError(f"task {sig.name!r} is not registered in this process: it cannot run eagerly here")
    a, kw = sig._merged(args, kwargs)
    res = task.apply(a, kw, task_id=sig.options.get("task_id"), throw=throw)
    if res.successful():
        for cb in sig.options.get("link") or ():
            apply_eager(maybe_signature(cb, app), [res.result], None, throw)
    else:
        for eb in sig.options.get("link_error") or ():
            eb = maybe_signature(eb, app)
            if errback_takes_request(app, eb):
                req = _current_request_for(res.id, sig.name, a, kw)
                app.tasks[eb.name](*eb._merged((req, res.result, None), None)[0], **eb["kwargs"])
            else:
                apply_eager(eb, [res.id], None, throw)
    return res


def _always_eager(sig) -> bool:
    """True when the canvas's app runs everything here and now (task_always_eager)."""
    try:
        return bool(sig.app.conf.task_always_eager)
    except Exception:  # noqa: BLE001 - no app anywhere in the canvas: it is sent, and that says so
        return False


def _current_request_for(tid, name, args, kwargs):
    return Request(id=tid, args=args, kwargs=kwargs, is_eager=True, task=name, root_id=tid)


# -- built-ins and replace: called by client.app ------------------------------------------------
def register_builtins(app) -> None:
    def _apply_canvas(*args, sig=None):
        """A chord body that is a group or chord: apply it to the header's results (args)."""
        maybe_signature(sig, app).apply_async(args)
        return None

    def _chord_failed(member, exc_type, exc_message, *args, ids=(), errbacks=(), own_exc=False, errback=None):
        """A chord failed: every task id of its body fails with ChordError; then the body's errbacks run as
        Celery runs them for a failed chord (``_error_spec``).  ``errback``: the one errback of an error spec
        from an earlier client, sent with brokerd's arguments as it was then."""
        why = {"exc_type": "ChordError", "exc_message": f"chord member {member} failed: {exc_type}: {exc_message}"}
        for tid in ids:
            app.client.store_result(tid, "FAILURE", None, why)
        if errback:
            maybe_signature(errback, app).apply_async((member, exc_type, exc_message, *args))
        exc = ChordError("ChordError", f"Dependency {member} raised {exc_type}: {exc_message}")
        if own_exc and errbacks:
            try:  # the member's own exception, as its stored FAILURE rebuilds it
                stored = AsyncResult(member, app=app).result
                if isinstance(stored, BaseException):
                    exc = stored
            except Exception:  # noqa: BLE001 - unreadable: the ChordError says the same
                pass
        for unit in errbacks or ():
            if not isinstance(unit, dict) or type(unit.get("id")) is not str:
                continue  # a forged unit: nothing to call it as
            req = Request(id=unit["id"], root_id=unit["id"], errbacks=list(unit.get("errbacks") or ()),
                          task=CHORD_FAILED_TASK)
            run_errbacks(app, req, exc, None)

    def _accumulate(*args, index=None):
        """Celery's celery.accumulate: its arguments (or the one at ``index``), for ``replace(group)``."""
        return args[index] if index is not None else list(args)

    app.task(name=APPLY_TASK)(_apply_canvas)
    app.task(name=CHORD_FAILED_TASK)(_chord_failed)
    app.task(name=ACCUMULATE_TASK)(_accumulate)


def replace(task, sig):
    """``self.replace(sig)`` (Celery): ``sig`` takes over the running task: it gets the task's id (its
    result is the task's result), the rest of the task's chain, its callbacks and errbacks.  Ends the
    running task (raises ``Ignore``)."""
    req = task.request
    if req.id is None:
        raise ValueError("replace() can only be called from inside a running task")
    sig = maybe_signature(sig, task.app).clone()
    if isinstance(sig, chain) and _is_empty(sig):  # (an empty group is fine: its result is [])
        raise ImproperlyConfigured("Cannot replace with an empty chain")  # Celery's words
    last = sig.tasks[-1] if isinstance(sig, chain) and sig.tasks else sig
    if isinstance(last, group):  # Celery: one result, as the replaced task had: the list of the group's
        sig = sig | Signature(ACCUMULATE_TASK, (), {"index": 0}, app=task.app)
    rest = [maybe_signature(s, task.app) for s in (getattr(req, "chain", None) or ())]
    steps = sig.steps() if isinstance(sig, chain) else [sig]
    _final_sig(steps[-1]).set(task_id=req.id)
    nesting = (getattr(req, "replaced_task_nesting", 0) or 0) + 1  # Celery's request.replaced_task_nesting
    for step in steps:
        for s in _plain_sigs(step):
            s.set(headers={**(s.options.get("headers") or {}), "replaced_task_nesting": nesting})
    # The replaced task's callbacks and errbacks go to the replacement only, as in Celery: the rest of
    # its chain carries its own (a chain's link_error is on every step already), so linking them there
    # too would call an errback twice
    for cb in getattr(req, "callbacks", None) or ():
        _final_sig(steps[-1]).link(cb)
    for eb in getattr(req, "errbacks", None) or ():
        for s in steps:
            s.link_error(eb)
    full = _mkchain([*steps, *rest], task.app)
    full.apply_async()
    raise Ignore(f"replaced by {sig!r}")


def _plain_sigs(sig):
    """Every task signature inside ``sig`` (a chain's steps, a group's members, a chord's header and body)."""
    if isinstance(sig, chain):
        for t in sig.tasks:
            yield from _plain_sigs(t)
    elif isinstance(sig, chord):
        for t in sig.tasks:
            yield from _plain_sigs(t)
        yield from _plain_sigs(sig.body)
    elif isinstance(sig, group):
        for t in sig.tasks:
            yield from _plain_sigs(t)
    elif isinstance(sig, Signature):
        yield sig


def _final_sig(sig):
    if isinstance(sig, chain):
        return _final_sig(sig.tasks[-1])
    if isinstance(sig, chord):
        return _final_sig(sig.body)
    return sig


# -- what a worker does after a task: called by client.worker ----------------------------------
def errback_takes_request(app, eb: Signature) -> bool:
    """Celery's rule (5.7, ``_call_task_errbacks``): an errback whose task (registered here, not bound)
    still takes more than one positional argument is called as ``errback(request, exc, traceback)`` in
    the worker; any other is sent as a task with the failed task's id.  A mutable errback's stored
    arguments are bound first (from the left, as ``functools.partial`` binds them), so
    ``eb(request_id, label).s('x')`` leaves one open argument and is sent with the id, while
    ``eb(request, exc, tb, label).s('x')`` leaves three and is called with the request."""
    task = app.tasks.get(eb.name)
    if task is None or getattr(task, "bind", False):
        return False
    fun = task.run
    if not eb.immutable and (eb.args or eb.kwargs):
        try:
            return _open_arity(functools.partial(fun, *eb.args, **eb.kwargs)) > 1
        except (TypeError, ValueError):  # stored arguments that cannot bind: classified as Celery does, unbound
            pass
    try:
        return _open_arity(fun) > 1
    except (TypeError, ValueError):
        return False


def _open_arity(fun) -> float:
    """How many positional arguments ``fun`` still takes (infinite with ``*args``)."""
    spec = inspect.getfullargspec(fun)
    return float("inf") if spec.varargs else len(spec.args)


def run_errbacks(app, request, exc, tb) -> None:
    """Every errback of ``request``, as Celery's backend calls them: new-style ones here
    (``call_errbacks``), the others sent as tasks with ``request.id``."""
    call_errbacks(app, request, exc, tb)
    for eb in getattr(request, "errbacks", None) or ():
        try:
            s = maybe_signature(eb, app)
            if not errback_takes_request(app, s):
                s.apply_async((request.id,))
        except Exception:  # noqa: BLE001 - one errback that cannot be sent must not stop the others
            log.exception("errback %r of task %s could not be sent", eb.get("task") if isinstance(eb, dict) else eb,
                          request.id)


def call_errbacks(app, request, exc, tb) -> None:
    """In the process that ran a failed task: call its new-style errbacks (``errback_takes_request``)
    with ``(request, exc, traceback)``.  An errback that raises is logged and costs nothing else."""
    for eb in getattr(request, "errbacks", None) or ():
        try:
            s = maybe_signature(eb, app)
            if errback_takes_request(app, s):
                s(request, exc, tb)
        except Exception:  # noqa: BLE001 - user code: its failure must not change the task's outcome
            log.exception("errback %r of task %s raised", eb.get("task") if isinstance(eb, dict) else eb, request.id)


def after_task(app, env: dict, state: str, value=None, meta: dict | None = None) -> None:
    """Continue the workflow a finished task belongs to.

    SUCCESS: send every ``link`` callback with the result prepended, and the
    next ``chain`` step (carrying the rest of the chain).  FAILURE: send every
    old-style ``link_error`` errback with the failed task's id prepended (new-style
    ones were called where the task ran), and store a FAILURE naming the failed step
    for every task id later in the chain.

    What it sends has the finished task as its parent (``parent_id``) and the task's root as its
    root (``root_id``), as in Celery, although the task itself is over (this runs in the worker's
    main process): the finished task stands as the current request while it sends.
    """
    tid = env.get("id")
    if not isinstance(tid, str):
        return _after_task(app, env, state, value, meta)
    root = env.get("root_id")
    token = current_request.set(Request(id=tid, root_id=root if isinstance(root, str) else tid, task=env.get("task")))
    try:
        return _after_task(app, env, state, value, meta)
    finally:
        current_request.reset(token)


def _after_task(app, env: dict, state: str, value=None, meta: dict | None = None) -> None:
    if state == "SUCCESS":
        for cb in env.get("link") or ():
            maybe_signature(cb, app).apply_async((value,))
        steps = env.get("chain") or []
        if steps:
            _apply_steps([maybe_signature(s, app) for s in steps], (value,))
    elif state == "FAILURE":
        for eb in env.get("link_error") or ():
            s = maybe_signature(eb, app)
            if not errback_takes_request(app, s):
                s.apply_async((env.get("id"),))
        meta = meta or {}
        why = f"chain step {env.get('task')}[{env.get('id')}] failed: {meta.get('exc_type')}: {meta.get('exc_message')}"
        for step in env.get("chain") or ():
            for sid in _all_ids(step):
                app.client.store_result(sid, "FAILURE", None, {"exc_type": "ChainError", "exc_message": why})
