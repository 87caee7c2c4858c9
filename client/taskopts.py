"""Celery's task options: which ones ``@app.task`` and ``apply_async`` take, and what each does here.

Every option Celery documents is accepted.  Each is either honoured, or accepted as the no-op it
is for brokerd (the table below says why); an option Celery does not have is refused with a
TypeError naming it, so a typo never turns into a silently lost setting.
"""

from __future__ import annotations

import functools
import inspect
import typing
import re

# -- @app.task(...) ------------------------------------------------------------------------------
# Options of the decorator that are no-ops for brokerd, with the reason.
DECORATOR_NOOPS = {
    "trail": "results keep no list of children; trail=True/False changes nothing",
    "send_events": "the worker's -E/--no-task-events decides",
    "autoregister": "every decorated task is registered",
    "lazy": "tasks are made at decoration time; shared_task binds to the current app lazily",
    "abstract": "only meaningful on Task subclasses",
    "compression": "brokerd does not compress bodies; CBOR is compact already",
    "delivery_mode": "brokerd logs every task to its write-ahead log: always persistent",
    "resultrepr_maxsize": "the worker's log line shortens results itself",
    "acks_on_failure_or_timeout": "a failed or timed-out task is acked, its FAILURE stored",
    "from_config": "settings are read from app.conf directly",
    "request_stack": "the current request is a context variable",
    "backend": "results always live in brokerd",
    "filter": "not used",
    "exchange": None,  # honoured by the routing rule (client.routing), not a no-op
    "routing_key": None,
}

# Celery's serializers whose values CBOR carries (it carries all of JSON's and more: bytes,
# big integers, Decimal, UUID, dates).  pickle carries arbitrary objects, which a worker should
# never unpickle from a queue; there is no equivalent here, by design.
DATA_SERIALIZERS = ("json", "cbor", "msgpack", "yaml")


def check_serializer(value, where: str) -> None:
    """Accept a serializer name whose values CBOR carries; refuse the rest saying what we do."""
    if value is None:
        return
    if isinstance(value, str) and value.lower().split("/")[-1].replace("x-", "") in DATA_SERIALIZERS:
        return
    raise ValueError(
        f"{where} is {value!r}: brokerd sends every task as CBOR, which carries everything JSON does and more "
        f"(bytes, big integers, Decimal, UUID, dates, sets); it does not unpickle arbitrary objects. "
        f"Drop the option (or use 'json'), and pass plain data as arguments")


_RATE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(?:/\s*([smh]))?\s*$")
_PER_SECOND = {"s": 1.0, "m": 1 / 60, "h": 1 / 3600, None: 1.0}


def parse_rate_limit(value, where: str = "rate_limit") -> float | None:
    """Celery's rate syntax → tasks per second (None: no limit).  ``"10/s"``, ``"100/m"``,
    ``"1000/h"``, or a number (per second).  0 means no limit, as in Celery."""
    if value is None:
        return None
    if isinstance(value, bool):
        raise ValueError(f"{where} must be a rate such as '10/s', '100/m', '1000/h' or a number, not {value!r}")
    if isinstance(value, (int, float)):
        rate = float(value)
    elif isinstance(value, str):
        m = _RATE.match(value)
        if m is None:
            raise ValueError(f"{where} {value!r} is not a rate: write N/s, N/m or N/h (e.g. '10/s', '100/m'), "
                             f"or a number of tasks per second")
        rate = float(m.group(1)) * _PER_SECOND[m.group(2)]
    else:
        raise ValueError(f"{where} must be a rate such as '10/s' or a number, not {type(value).__name__}")
    if rate != rate or rate < 0 or rate == float("inf"):
        raise ValueError(f"{where} must be a finite rate >= 0 (got {value!r})")
    return rate or None


def check_decorator_options(name: str, opts: dict) -> None:
    """Validate the values of the decorator options that have a syntax; TypeError/ValueError naming them."""
    if "rate_limit" in opts:
        parse_rate_limit(opts["rate_limit"], f"@task {name}: rate_limit")
    if "serializer" in opts:
        check_serializer(opts["serializer"], f"@task {name}: serializer")
    throws = opts.get("throws")
    if throws is not None:
        items = throws if isinstance(throws, tuple) else (throws,) if isinstance(throws, type) else tuple(throws)
        for t in items:
            if not (isinstance(t, type) and issubclass(t, BaseException)):
                raise TypeError(f"@task {name}: throws must be exception classes (got {t!r})")
        opts["throws"] = items


# -- apply_async(...) ----------------------------------------------------------------------------
# Per-call options carried to the worker in the envelope's `options` map (protocol.md §8.1).
ENVELOPE_OPTIONS = ("time_limit", "soft_time_limit", "ignore_result", "shadow", "link", "link_error", "app_id",
                    "group_id", "argsrepr", "kwargsrepr")
# Celery's app_id (an AMQP message property): the sending application's name, shown to the task as
# request.properties["app_id"]; bounded like a queue name, since it travels in every message that has it.
APP_ID_MAX = 255  # characters
# Celery's group_id: the group or chord a task is a member of (request.group); a task id's bound.
GROUP_ID_MAX = 255  # characters
# Celery's argsrepr/kwargsrepr: the text the worker shows in place of the call's args/kwargs (log lines,
# events, inspect replies), so secrets passed as arguments stay out of logs.  Celery cuts the repr it makes
# itself at 1024 characters (its argsrepr_maxsize); a caller's own text is held to the same bound.
ARGSREPR_MAX = 1024  # characters
EVENT_REPR_MAX = 200  # characters of args, kwargs and result reprs in events and control replies


def short_text(text: str, limit: int = EVENT_REPR_MAX) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."


def event_repr(value, limit: int = EVENT_REPR_MAX) -> str:
    try:
        return short_text(repr(value), limit)
    except Exception:  # a broken __repr__ must not cost the task
        return f"<{type(value).__name__}>"


def args_shown(args, kwargs, options) -> tuple[str, str]:
    """How a task's args and kwargs are shown wherever the worker reports them (log lines, events, inspect
    replies): the call's ``argsrepr``/``kwargsrepr`` when it gave them (Celery's: arguments that carry
    secrets stay out of logs), each cut at ARGSREPR_MAX characters (a producer other than ours), else a
    short repr of the real ones.  ``check_envelope`` has refused one that is not text."""
    if type(options) is dict:
        a, k = options.get("argsrepr"), options.get("kwargsrepr")
    else:
        a = k = None
    return (short_text(a, ARGSREPR_MAX) if type(a) is str else ("()" if not args else event_repr(tuple(args))),
            short_text(k, ARGSREPR_MAX) if type(k) is str else ("{}" if not kwargs else event_repr(kwargs)))


# Per-call options that are no-ops for brokerd, with the reason.
CALL_NOOPS = {
    "retry": "the publish is confirmed by brokerd; the client reconnects by itself",
    "retry_policy": "the publish is confirmed by brokerd; the client reconnects by itself",
    "compression": "brokerd does not compress bodies",
    "delivery_mode": "brokerd logs every task: always persistent",
    "producer": "the app's one client publishes",
    "publisher": "the app's one client publishes",
    "connection": "the app's one client publishes",
    "add_to_parent": "results keep no list of children",
    "mandatory": "an unroutable task cannot happen: the queue is made on first publish",
    "immediate": "not in AMQP 0-9-1 either",
    "declare": "queues are made on first publish",
    "exchange_type": "brokerd has no exchanges (see routing)",
    "reply_to": "results are kept by brokerd, not replied to",
    "correlation_id": "the task id is the correlation id",
    "router": "task_routes decides",
}


def check_arguments(task, fun, args, kwargs) -> None:
    """Celery's ``typing=True``: the call's arguments must fit the function's signature, checked
    at ``delay()`` so a wrong call fails in the caller, not later in a worker."""
    try:
        sig = inspect.signature(fun)
    except (TypeError, ValueError):
        return  # a builtin or C function: nothing to check against
    try:
        if task.bind:
            sig.bind(None, *args, **kwargs)  # the bound task's `self`
        else:
            sig.bind(*args, **kwargs)
    except TypeError as exc:
        raise TypeError(f"{fun.__name__}() {exc}") from None


def pydantic_wrapper(fun, strict: bool = False, context=None, dump_kwargs=None):
    """Celery's ``pydantic=True``: arguments annotated with a pydantic model (or any type pydantic
    validates) are validated and converted before the task runs; a model returned is dumped to
    plain data so it can be stored as the result.  Needs pydantic installed (ImportError otherwise)."""
    import pydantic  # noqa: F401 - fail at decoration time when it is missing

    from pydantic import BaseModel, TypeAdapter

    sig = inspect.signature(fun)
    adapters: dict = {}
    resolved = []  # made at the first run, so string annotations may name what the module defines later

    def adapters_for():
        if resolved:
            return adapters
        try:  # string annotations (``data: "Model"``, ``from __future__ import annotations``) resolved
            hints = typing.get_type_hints(fun)
        except Exception:  # noqa: BLE001 - a name that is not defined: those arguments are left as given
            hints = {}
        for pname, param in sig.parameters.items():
            if param.annotation is not inspect.Parameter.empty and param.kind not in (
                    inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD):
                ann = hints.get(pname, param.annotation)
                if isinstance(ann, str):
                    continue  # a postponed annotation that cannot be resolved: leave as given
                adapters[pname] = TypeAdapter(ann)
        resolved.append(True)
        return adapters

    dump = {"mode": "json", **(dump_kwargs or {})}

    @functools.wraps(fun)
    def run(*args, **kwargs):
        bound = sig.bind(*args, **kwargs)
        for pname, value in list(bound.arguments.items()):
            ad = adapters_for().get(pname)
            if ad is not None:
                bound.arguments[pname] = ad.validate_python(value, strict=strict, context=context)
        value = fun(*bound.args, **bound.kwargs)
        if isinstance(value, BaseModel):
            return value.model_dump(**dump)
        return value

    return run


def dump_models(args, kwargs):
    """pydantic models given to ``delay()`` → plain data (what the worker validates back)."""
    try:
        from pydantic import BaseModel
    except ImportError:
        return args, kwargs

    def conv(v):
        return v.model_dump(mode="json") if isinstance(v, BaseModel) else v

    return tuple(conv(a) for a in args), {k: conv(v) for k, v in kwargs.items()}


def check_call_options(name: str, options: dict) -> dict:
    """The per-call options of one ``apply_async``/``send_task`` → the envelope's ``options`` map.

    Honoured ones are checked and kept, no-ops dropped, anything else refused naming it (it used
    to be stored in the envelope where nothing read it: a silent loss).  ``routing_key``,
    ``exchange``, ``queue`` and the times are taken out by the caller before this.
    """
    out = {}
    for key, value in options.items():
        if key in ENVELOPE_OPTIONS or key == "rate_limit":
            if value is None:
                continue
            if key == "ignore_result" and not isinstance(value, bool):
                raise TypeError(f"apply_async() of {name}: ignore_result must be True or False (got {value!r})")
            if key == "app_id" and (not isinstance(value, str) or len(value) > APP_ID_MAX):
                raise TypeError(f"apply_async() of {name}: app_id must be text of at most {APP_ID_MAX} characters "
                                f"(the sending application's name), got {value!r:.100}")
            if key == "group_id" and (not isinstance(value, str) or not 0 < len(value) <= GROUP_ID_MAX):
                raise TypeError(f"apply_async() of {name}: group_id must be the id of a group or chord (text of 1 to "
                                f"{GROUP_ID_MAX} characters), got {value!r:.100}")
            if key in ("argsrepr", "kwargsrepr") and (not isinstance(value, str) or len(value) > ARGSREPR_MAX):
                what = f"text of {len(value)} characters" if isinstance(value, str) else type(value).__name__
                raise TypeError(f"apply_async() of {name}: {key} must be text of at most {ARGSREPR_MAX} characters (what "
                                f"the worker logs in place of the real {key[:-4]}), got {what}")
            if key == "shadow" and not isinstance(value, str):
                raise TypeError(f"apply_async() of {name}: shadow must be a display name (text), got {value!r}")
            if key == "rate_limit":
                value = parse_rate_limit(value, f"rate_limit of {name}")
                if value is None:
                    continue
            out[key] = value
        elif key == "serializer":
            check_serializer(value, f"apply_async() of {name}: serializer")
        elif key in CALL_NOOPS:
            continue
        else:
            raise TypeError(
                f"apply_async() of {name} got an option brokerd does not know: {key!r}. Known options: countdown, "
                f"eta, expires, priority, queue, routing_key, exchange, task_id, headers, link, link_error, "
                f"time_limit, soft_time_limit, ignore_result, shadow, app_id, group_id, argsrepr, kwargsrepr, parent_id, "
                f"root_id, unique_key, "
                f"unique_for, "
                f"unique_until (and Celery's no-ops: "
                f"{', '.join(sorted(CALL_NOOPS))})")
    return out
