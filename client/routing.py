"""``task_routes`` in every shape Celery takes, and ``routing_key``/``exchange`` mapped to queues.

Celery's router rules (celery/app/routes.py), learnt and written again:

- ``task_routes`` is a dict, a router function, a ``"module.function"`` path to one, or a list or
  tuple of these tried in order: **the first one that gives a route wins**;
- a dict maps a task name, a glob (``"proj.email.*"``) or a compiled ``re`` pattern to a route
  (``client.envelope.lookup_route``: an exact name first, then the patterns in order);
- a router function is called as ``router(name, args, kwargs, options, task=task)`` and returns a
  route, a queue name, or None to pass;
- a route is a dict of options (``{"queue": "high", "priority": 5}``) or a queue name.

brokerd has queues and no exchanges, so routing keys and exchanges are mapped as AMQP's *default
exchange* does: a message goes to the queue its ``routing_key`` names.  ``routing_key`` therefore
names the queue when no ``queue`` is given at the same level (call, task, route).  An exchange can
only be honoured if it is the default one (``""``, ``task_default_exchange``, or the queue's own
name, which is what Celery declares for each queue); any other exchange is refused naming it,
because a topic or fanout exchange's fan-out would be lost silently.
"""

from __future__ import annotations

import importlib

from client.envelope import lookup_route


class RoutingError(ValueError):
    """A route or a call option brokerd cannot honour; the message says what to do instead."""


def _import_router(path: str):
    module, _, attr = path.rpartition(".")
    if not module:
        raise RoutingError(f"task_routes entry {path!r} is not a dotted path to a router function")
    try:
        fn = getattr(importlib.import_module(module), attr)
    except (ImportError, AttributeError) as exc:
        raise RoutingError(f"task_routes names the router {path!r}, which cannot be imported: {exc}") from None
    if not callable(fn):
        raise RoutingError(f"task_routes entry {path!r} is not callable")
    return fn


def _normal(route, where) -> dict:
    if route is None:
        return {}
    if isinstance(route, str):
        return {"queue": route}
    if isinstance(route, dict):
        route = dict(route)
        q = route.get("queue")
        if q is not None and not isinstance(q, str):
            name = getattr(q, "name", None)  # a kombu Queue object: its name is the queue
            if not isinstance(name, str):
                raise RoutingError(f"{where} gave a queue that is neither a name nor a Queue: {q!r}")
            route["queue"] = name
        return route
    raise RoutingError(f"{where} must give a dict such as {{'queue': 'high'}}, a queue name or None, "
                       f"not {type(route).__name__}")


def lookup(routes, name: str, args=(), kwargs=None, options=None, task=None) -> dict:
    """The route ``task_routes`` gives task ``name`` with these arguments, ``{}`` when none."""
    if not routes:
        return {}
    items = routes if isinstance(routes, (list, tuple)) else (routes,)
    for item in items:
        if isinstance(item, str):
            item = _import_router(item)
        if isinstance(item, dict):
            found = lookup_route(item, name)
        elif callable(item):
            found = _normal(item(name, tuple(args or ()), dict(kwargs or {}), dict(options or {}), task=task),
                            f"the router {getattr(item, '__name__', item)!r}")
        else:
            raise RoutingError(f"task_routes entries must be dicts, router functions or 'module.function' "
                               f"paths; found a {type(item).__name__}")
        if found:
            return _normal(found, f"the task_routes entry for {name!r}")
    return {}


def _exchange_name(exchange):
    if exchange is None or isinstance(exchange, str):
        return exchange
    name = getattr(exchange, "name", None)  # a kombu Exchange object
    if isinstance(name, str):
        return name
    raise RoutingError(f"exchange must be a name, not {type(exchange).__name__}")


def destination(level: dict, default_exchange, where: str) -> str | None:
    """The queue one level (call options, task attributes or a route) names: ``queue``, else its
    ``routing_key``; RoutingError for an exchange that is not the default one."""
    queue = level.get("queue") or None
    key = level.get("routing_key") or None
    exchange = _exchange_name(level.get("exchange"))
    if queue is not None and not isinstance(queue, str):
        queue = getattr(queue, "name", queue)
    target = queue or key
    if exchange and exchange != default_exchange and exchange != target:
        raise RoutingError(
            f"{where} sends to exchange {exchange!r}, which brokerd cannot honour: brokerd has queues, "
            f"no exchanges, so nothing would fan out or match topics. Name the queue instead "
            f"(queue='...' or routing_key='...'), one queue per consumer group")
    return target
