"""The task envelope (protocol.md §8) and the one routing rule.

A task is a message whose body is the *task envelope*: a CBOR map with the
task's name, id, args, kwargs and options; the message id is the task id.
This module builds, encodes, decodes and validates that map, and decides which
queue and priority a task is published with.  It is pure: no sockets, no
clock (callers pass ``now``), and nothing from the rest of the task layer but
its exceptions, so the producer side (``client.app``, ``client.canvas``,
``client.beat``) and the worker share one definition of every key.
"""

from __future__ import annotations

import datetime as _dt
import re
from fnmatch import fnmatchcase

import cbor2

from client.exceptions import EncodeError
from client.cbortags import dumps_value, tag_times, untag  # naive datetimes and times of day (§8.1)

# protocol.md §8.1: key `v`.  A change to the meaning of a key bumps it.
ENVELOPE_VERSION = 1
DEFAULT_QUEUE = "celery"  # Celery's task_default_queue, so routes carry over unchanged
# An `expires` below this many seconds is relative to now (Celery's expires=60);
# at or above it, a Unix time (1e9 seconds is September 2001).
RELATIVE_EXPIRES_BELOW = 1e9


# -- times ---------------------------------------------------------------------------------
def to_epoch(value) -> float | None:
    """A datetime (naive = UTC) or Unix seconds → Unix seconds; None stays None."""
    if value is None:
        return None
    if isinstance(value, _dt.datetime):
        if value.tzinfo is None:
            value = value.replace(tzinfo=_dt.timezone.utc)
        return value.timestamp()
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    raise TypeError(f"expected a datetime or Unix time in seconds, got {type(value).__name__}")


def absolute_times(now: float, countdown=None, eta=None, expires=None) -> tuple[float | None, float | None]:
    """The call options ``countdown``/``eta``/``expires`` → (eta, expires) in Unix seconds.

    ``countdown`` (seconds from ``now``) wins over ``eta``; a small number for
    ``expires`` is seconds from ``now`` (see RELATIVE_EXPIRES_BELOW).
    """
    eta_s = now + float(countdown) if countdown is not None else to_epoch(eta)
    if isinstance(expires, (int, float)) and not isinstance(expires, bool) and expires < RELATIVE_EXPIRES_BELOW:
        expires = now + float(expires)
    return eta_s, to_epoch(expires)


# -- build, encode, decode -----------------------------------------------------------------
def check_encodable(name: str, args, kwargs) -> None:
    """Fail now, naming the argument, if CBOR cannot carry it."""
    for i, a in enumerate(args):
        try:
            dumps_value(a)
        except Exception as exc:
            raise EncodeError(
                f"argument {i} of {name} ({type(a).__name__}) cannot be sent to a worker: {exc}"
            ) from None
    for k, v in kwargs.items():
        if type(k) is not str:
            raise EncodeError(f"keyword argument names of {name} must be text (got {k!r})")
        try:
            dumps_value(v)
        except Exception as exc:
            raise EncodeError(
                f"keyword argument {k!r} of {name} ({type(v).__name__}) cannot be sent to a worker: {exc}"
            ) from None


def make_envelope(name, task_id, args, kwargs, *, eta=None, expires=None, parent_id=None,
                  root_id=None, headers=None, options=None) -> dict:
    """The envelope map of protocol.md §8.1 (``options`` only when some were given)."""
    env = {
        "v": ENVELOPE_VERSION,
        "task": name,
        "id": task_id,
        "args": list(args),
        "kwargs": dict(kwargs),
        "retries": 0,
        "eta": eta,
        "expires": expires,
        "parent_id": parent_id,
        "root_id": root_id or task_id,
        "headers": headers or {},
    }
    if options:
        env["options"] = options
    return env


def encode_envelope(env: dict) -> bytes:
    """Envelope map → the message body (protocol.md §8.2: the CBOR-encoded map)."""
    try:
        return cbor2.dumps(env)
    except Exception:  # noqa: BLE001 - a naive datetime or a time in the arguments: tag them (client.cbortags)
        return cbor2.dumps({**env, "args": tag_times(env["args"]), "kwargs": tag_times(env["kwargs"])})


def decode_envelope(body: bytes) -> dict:
    """Body bytes → envelope map, or ValueError naming what is wrong (protocol.md §8.3)."""
    try:
        env = cbor2.loads(body, tag_hook=untag)
    except Exception as exc:
        why = f"{exc}: {exc.__cause__}" if exc.__cause__ is not None else str(exc)  # e.g. a bad tag 50001
        raise ValueError(f"task body is not CBOR: {why}") from None
    if type(env) is not dict:
        raise ValueError("task body must be a CBOR map (the task envelope)")
    get = env.get
    if not (type(get("task")) is str and type(get("id")) is str and type(get("args")) is list
            and type(get("kwargs")) is dict):  # (one test for the common case; the loop names the field)
        for key, typ in (("task", str), ("id", str), ("args", list), ("kwargs", dict)):
            if type(env.get(key)) is not typ:
                raise ValueError(f"task envelope field {key!r} is missing or not a {typ.__name__}")
    if get("v", 1) != ENVELOPE_VERSION:
        raise ValueError(f"task envelope version {env.get('v')!r} is not supported (this worker reads {ENVELOPE_VERSION})")
    return env


# -- routing -------------------------------------------------------------------------------
_GLOB_CHARS = frozenset("*?[")


def _route_value(pattern, target) -> dict:
    if isinstance(target, dict):
        return dict(target)
    if isinstance(target, str):
        return {"queue": target}  # Celery's short form: {"proj.tasks.add": "hipri"}
    raise TypeError(f"task_routes entry {pattern!r} must be a dict such as {{'queue': 'high'}} "
                    f"or a queue name, not {type(target).__name__}")


def lookup_route(routes, name: str) -> dict:
    """The ``task_routes`` entry for task ``name`` as a dict, ``{}`` when none matches.

    ``routes`` is a dict, or a list/tuple of dicts tried in order.  In each
    dict an exact name wins; else the first key (in insertion order) that
    matches: a glob (``"proj.email.*"``, ``"*.send_?"``; ``*`` also crosses
    dots) or a compiled ``re`` pattern.  A value is a dict of options
    (``{"queue": "high", "priority": 5}``) or a queue name.
    """
    if not routes:
        return {}
    if isinstance(routes, dict):
        tables = (routes,)
    elif isinstance(routes, (list, tuple)):
        tables = routes
    else:
        raise TypeError(f"task_routes must be a dict (or a list of dicts), not {type(routes).__name__}")
    for table in tables:
        if not isinstance(table, dict):
            raise TypeError(f"task_routes must be a dict (or a list of dicts); found a {type(table).__name__} in the list")
        target = table.get(name)
        if target is not None:
            return _route_value(name, target)
        for pattern, target in table.items():
            if target is None:
                continue
            if isinstance(pattern, re.Pattern):
                if pattern.match(name):
                    return _route_value(pattern.pattern, target)
            elif isinstance(pattern, str) and not _GLOB_CHARS.isdisjoint(pattern):
                # "proj.email.*", the common shape, is a prefix test; fnmatch (a regex) for the rest
                head = pattern[:-1]
                if name.startswith(head) if pattern[-1] == "*" and _GLOB_CHARS.isdisjoint(head) else fnmatchcase(name, pattern):
                    return _route_value(pattern, target)
    return {}


def route(name: str, routes, *, default_queue: str = DEFAULT_QUEUE, default_priority=0, task=None,
          queue: str | None = None, priority: int | None = None) -> tuple[str, int]:
    """Which queue and which priority task ``name`` is published with.

    The first one given wins, in this order (Celery's: call options, then the
    task's own, then ``task_routes``, then the defaults):

    - queue: the call's ``queue=``, the task's ``queue``, its ``task_routes``
      entry, ``task_default_queue``;
    - priority: the call's ``priority=``, the task's ``priority``, its
      ``task_routes`` entry, ``task_default_priority``, 0.

    ``None`` (and, for a queue, ``""``) means "not given".  ``task`` is the
    registered Task, or None when sending by name (``send_task``).
    """
    if task is not None:
        queue = queue or task.queue
        if priority is None:
            priority = task.priority
    if not queue or priority is None:
        r = lookup_route(routes, name)
        queue = queue or r.get("queue") or default_queue
        if priority is None:
            priority = r.get("priority")
            if priority is None:
                priority = default_priority
    return queue, priority or 0
