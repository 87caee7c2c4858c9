"""Binary frames → BrokerState calls → reply frames.

"Commands should not have business logic" (Faktory): each handler checks the
shape of its frame (protocol.md §5 gives each signature), calls one state
method and returns the reply frame.  Deliveries the call causes are in
the state's output (``take_effects``).  Pure: no trio, no socket, no clock (``now`` comes in).
"""

from __future__ import annotations

import math

import cbor2

from broker.errors import BadRequest, BrokerError
from broker.state.dedupe import MAX_DEDUPE_KEY, check_dedupe_key
from broker.state.schedules import CHORD_OPTIONS
from client.wire import (
    CLIENT_OPS,
    OP_ACK,
    OP_ADMIN,
    OP_BIND,
    OP_EMIT,
    OP_UNBIND,
    OP_BYE,
    OP_CANCEL,
    OP_CONSUME,
    OP_DECLARE,
    OP_DELETE,
    OP_HEARTBEAT,
    OP_HELLO,
    OP_NACK,
    OP_PAUSE,
    OP_PING,
    OP_PUBLISH,
    OP_PURGE,
    OP_CHORD,
    OP_CHORD_ADD,
    OP_RESULT_FORGET,
    OP_RESULT_GET,
    OP_REVOKE,
    OP_SCHEDULE_LIST,
    OP_SCHEDULE_PAUSE,
    OP_SCHEDULE_PUT,
    OP_SCHEDULE_REMOVE,
    OP_RESULT_SET,
    OP_RESUME,
    OP_STATS,
    OP_TOUCH,
    OP_CONTROL_REPLY,
    OP_CONTROL_REQUEST,
    OP_EMIT_EVENTS,
    OP_RATE_LIMIT,
    OP_CREDIT,
    OP_RELEASE,
    OP_SUBSCRIBE,
    OP_TASK_INFO,
    OP_WORKERS,
    OP_PUBLISH_BATCH,
    MAX_PUBLISH_BATCH,
    RawFrame,
    error_frame,
    ok_frame,
)

_NUM = (int, float)
PUBLISH_OPTIONS = ("delay", "eta", "ttl", "headers", "unique_key", "unique_for", "unique_until", "dedupe")
EMIT_OPTIONS = ("delay", "eta", "ttl", "headers")
# protocol.md §3: every whole-number field fits in 64 bits (CBOR major types 0
# and 1).  A bignum (tag 2/3) where a count, tag or number of seconds belongs
# is refused by name rather than overflowing a float deep in the state.
INT_MIN = -(2**63)
INT_MAX = 2**64 - 1


def _check_int(v, what: str, op: str) -> None:
    if not INT_MIN <= v <= INT_MAX:
        raise BadRequest(f"{op} {what} must be a whole number that fits in 64 bits (got one of {v.bit_length()} bits)")


def _arg(frame, i, name, types, op, required=True):
    if len(frame) <= i or frame[i] is None:
        if required:
            raise BadRequest(f"{op} needs {name} (field {i})")
        return None
    v = frame[i]
    if type(v) is float and not math.isfinite(v):
        raise BadRequest(f"{op} field {i} ({name}) must be a finite number (got {v})")
    if type(v) is int:
        _check_int(v, f"field {i} ({name})", op)
    if type(v) not in types:
        want = " or ".join(t.__name__.replace("str", "text").replace("bytes", "byte string") for t in types)
        raise BadRequest(f"{op} field {i} ({name}) must be {want} (got {type(v).__name__})")
    return v


def _opt_number(opts, key, op):
    v = opts.get(key)
    if v is None:
        return None
    if type(v) not in _NUM:
        raise BadRequest(f"{op} option {key!r} must be a number of seconds (got {type(v).__name__})")
    if type(v) is int:
        _check_int(v, f"option {key!r}", op)
    if not math.isfinite(v):
        raise BadRequest(f"{op} option {key!r} must be a finite number of seconds (got {v})")
    if key != "eta" and v < 0:
        raise BadRequest(f"{op} option {key!r} must be >= 0 (got {v})")
    return v


def _storable(value, what: str, op: str) -> None:
    """Refuse, before anything changes, a value that cannot be written to the log.

    The decoder already refuses the tags that cannot round-trip (client/wire.py),
    so this is the second line: every free-form value that a logged record or
    another client's frame will carry is encoded once here, and an operation
    whose value cannot be encoded is refused with BAD_REQUEST naming the field,
    with nothing else changed (protocol.md §4).  Only free-form maps and values
    pay for it: a plain PUBLISH (bytes body, no headers) encodes nothing here.
    """
    try:
        cbor2.dumps(value)
    except MemoryError:
        raise
    except Exception as exc:
        raise BadRequest(f"{op} {what} cannot be stored: {exc}") from None


def _plain_key(key) -> bool:
    """A ``dedupe`` key that is valid at a glance: ASCII text of 1 to MAX_DEDUPE_KEY characters
    (so as many bytes; ``isascii`` is O(1)).  Anything else goes through check_dedupe_key."""
    return type(key) is str and key.isascii() and 0 < len(key) <= MAX_DEDUPE_KEY


def h_publish(state, conn, rid, f, now):
    # [2, rid, queue, body, id|null, priority, options|null]
    n = len(f)
    queue = f[2] if n > 2 else None
    body = f[3] if n > 3 else None
    if type(queue) is not str:
        raise BadRequest("PUBLISH field 2 (queue) must be text")
    if type(body) is not bytes:
        raise BadRequest("PUBLISH field 3 (body) must be a byte string")
    msg_id = f[4] if n > 4 else None
    priority = f[5] if n > 5 and f[5] is not None else 0
    opts = f[6] if n > 6 else None
    if opts is None:
        return ok_frame(rid, state.publish(conn, queue, body, msg_id, priority, now))
    if type(opts) is not dict:
        raise BadRequest("PUBLISH field 6 (options) must be a map or null")
    if len(opts) == 1 and "dedupe" in opts:
        # What brokerd's SDK sends with every publish (its resend key, §5.2): no option to parse.
        dedupe = opts["dedupe"]
        if dedupe is not None and not _plain_key(dedupe):
            check_dedupe_key(dedupe)  # raises, naming what is wrong; passes a non-ASCII key that fits
        return ok_frame(rid, state.publish(conn, queue, body, msg_id, priority, now, dedupe=dedupe))
    for k in opts:
        if k not in PUBLISH_OPTIONS:
            raise BadRequest(f"unknown PUBLISH option {k!r}; known options: {', '.join(PUBLISH_OPTIONS)}")
    headers = opts.get("headers")
    if headers is not None:
        if type(headers) is not dict:
            raise BadRequest("PUBLISH option 'headers' must be a map")
        _storable(headers, "option 'headers'", "PUBLISH")
    dedupe = opts.get("dedupe")
    if dedupe is not None:
        check_dedupe_key(dedupe)
    if "unique_key" in opts:  # a unique task (broker/state/unique.py): the reply is {id, duplicate}
        return ok_frame(rid, state.publish_unique(
            conn, queue, body, msg_id, priority, now,
            unique_key=opts["unique_key"], unique_for=_opt_number(opts, "unique_for", "PUBLISH"),
            unique_until=opts.get("unique_until", "finished"),
            delay=_opt_number(opts, "delay", "PUBLISH"), eta=_opt_number(opts, "eta", "PUBLISH"),
            ttl=_opt_number(opts, "ttl", "PUBLISH"), headers=headers or None, dedupe=dedupe,
        ))
    if "unique_for" in opts or "unique_until" in opts:
        raise BadRequest("PUBLISH options 'unique_for' and 'unique_until' need 'unique_key'")
    msg_id = state.publish(
        conn, queue, body, msg_id, priority, now,
        delay=_opt_number(opts, "delay", "PUBLISH"),
        eta=_opt_number(opts, "eta", "PUBLISH"),
        ttl=_opt_number(opts, "ttl", "PUBLISH"),
        headers=headers or None,
        dedupe=dedupe,
    )
    return ok_frame(rid, msg_id)


def h_publish_batch(state, conn, rid, f, now):
    """§5.46 PUBLISH_BATCH ``[46, rid, [[queue, body, id, priority, options], ...]]``.

    Each item is PUBLISH's fields 2-6 and is handled exactly as that PUBLISH would be, one after
    the other: a refused item stores nothing and the others go on.  The result is null when every
    item was stored under the id it gave (what a pipelining client sends: nothing to tell it), else
    one entry per item: the PUBLISH result (the id, or the unique-key map), or ``[code, message]``.
    A frame whose field 2 is not a list of 1 to MAX_PUBLISH_BATCH lists is refused whole.
    """
    items = f[2] if len(f) > 2 else None
    if type(items) is not list or not items:
        raise BadRequest("PUBLISH_BATCH field 2 must be a non-empty list of publishes, "
                         "each [queue, body, id, priority, options]")
    if len(items) > MAX_PUBLISH_BATCH:
        raise BadRequest(f"PUBLISH_BATCH carries {len(items)} publishes; at most {MAX_PUBLISH_BATCH} "
                         "in one frame (send several)")
    for i, item in enumerate(items):
        if type(item) is not list:
            raise BadRequest(f"PUBLISH_BATCH item {i} must be a list [queue, body, id, priority, options] "
                             f"(got {type(item).__name__}); nothing was stored")
    results = None  # stays None while every item is stored under the id it gave
    publish_run = state.publish_run
    n_items = len(items)
    # the bytes the frame came in as (FrameReader keep_raw): logged as they came when every item is plain
    raw = f[-1] if type(f[-1]) is RawFrame else None
    state.hold_dispatch()  # each queue dispatched once after the plain items, not once per item
    try:
        i = 0
        while True:
            # the hot path: runs of plain publishes with their own ids and at most their resend
            # keys (the SDK's), stored by the state in one call per run
            i, results = publish_run(conn, items, i, now, results, MAX_DEDUPE_KEY, raw if i == 0 else None)
            if i >= n_items:
                break
            item = items[i]
            try:
                # An item with options (a unique key freed when started, a delay...) sees the
                # deliveries of the items before it made, as one PUBLISH after another would.
                state.release_dispatch(now)
                result = h_publish(state, conn, rid, [OP_PUBLISH, rid, *item], now)[2]
                state.hold_dispatch()
            except BrokerError as exc:
                result = [exc.code, f"item {i}: {exc.message}"]
            i += 1
            if results is None:
                if type(result) is str and len(item) > 2 and result == item[2]:
                    continue
                results = [it[2] for it in items[:i - 1]]  # every earlier item was stored under its id
            results.append(result)
    finally:
        state.release_dispatch(now)
    return ok_frame(rid, results)


def h_consume(state, conn, rid, f, now):
    # [3, rid, [queue, ...], prefetch, options|null]
    queues = _arg(f, 2, "queues", (list,), "CONSUME")
    prefetch = _arg(f, 3, "prefetch", (int,), "CONSUME")
    options = _arg(f, 4, "options", (dict,), "CONSUME", required=False)
    return ok_frame(rid, state.consume(conn, queues, prefetch, now, options))


def h_credit(state, conn, rid, f, now):
    # [41, rid, consumer, prefetch]
    ctag = _arg(f, 2, "consumer", (int,), "CREDIT")
    prefetch = _arg(f, 3, "prefetch", (int,), "CREDIT")
    return ok_frame(rid, state.set_prefetch(conn, ctag, prefetch, now))


def h_release(state, conn, rid, f, now):
    # [42, rid, tag | [tag, ...]]
    tags = _arg(f, 2, "tag", (int, list), "RELEASE")
    return ok_frame(rid, state.release(conn, tags, now))


def h_cancel(state, conn, rid, f, now):
    state.cancel(conn, _arg(f, 2, "consumer", (int,), "CANCEL"))
    return ok_frame(rid)


def h_ack(state, conn, rid, f, now):
    # [5, rid, tag | [tag, ...]]
    tags = _arg(f, 2, "tag", (int, list), "ACK")
    return ok_frame(rid, state.ack(conn, tags, now))


def h_nack(state, conn, rid, f, now):
    # [6, rid, tag, requeue, delay|null, headers|null]
    tag = _arg(f, 2, "tag", (int,), "NACK")
    requeue = _arg(f, 3, "requeue", (bool,), "NACK", required=False)
    delay = _arg(f, 4, "delay", _NUM, "NACK", required=False)
    headers = _arg(f, 5, "headers", (dict,), "NACK", required=False)
    if headers is not None:
        _storable(headers, "field 5 (headers)", "NACK")
    state.nack(conn, tag, now, requeue=True if requeue is None else requeue, delay=delay, headers=headers)
    return ok_frame(rid)


def h_touch(state, conn, rid, f, now):
    return ok_frame(rid, state.touch(conn, _arg(f, 2, "tag", (int,), "TOUCH"), now))


def h_declare(state, conn, rid, f, now):
    # [8, rid, queue, options|null]
    name = _arg(f, 2, "queue", (str,), "DECLARE")
    opts = _arg(f, 3, "options", (dict,), "DECLARE", required=False)
    temporary = None
    if opts:
        _storable(opts, "field 3 (options)", "DECLARE")
        if "temporary" in opts:  # not a queue option: who the queue belongs to
            opts = dict(opts)
            temporary = opts.pop("temporary")
            if type(temporary) is not bool:
                raise BadRequest("DECLARE option 'temporary' must be true or false")
    return ok_frame(rid, state.declare(name, opts, now, temporary_owner=conn if temporary else None))


def h_delete(state, conn, rid, f, now):
    return ok_frame(rid, state.delete(_arg(f, 2, "queue", (str,), "DELETE"), now))


def h_stats(state, conn, rid, f, now):
    # [10, rid, queue|null]
    name = _arg(f, 2, "queue", (str,), "STATS", required=False)
    if name is not None:
        return ok_frame(rid, stats_map(state.queue_statistics(state.existing_queue(name), now)))
    b = state.statistics()
    broker = {k: getattr(b, k) for k in b.__slots__}
    broker.update(state.server_statistics())  # the runtime's bounds: memory, connections, input
    queues = {q.name: stats_map(state.queue_statistics(q, now)) for q in state.queues.values()}
    return ok_frame(rid, {"broker": broker, "queues": queues})


def stats_map(qs) -> dict:
    return {k: getattr(qs, k) for k in qs.__slots__}


def h_purge(state, conn, rid, f, now):
    return ok_frame(rid, state.purge(_arg(f, 2, "queue", (str,), "PURGE"), now))


def h_pause(state, conn, rid, f, now):
    state.pause(_arg(f, 2, "queue", (str,), "PAUSE"), True, now)
    return ok_frame(rid)


def h_resume(state, conn, rid, f, now):
    state.pause(_arg(f, 2, "queue", (str,), "RESUME"), False, now)
    return ok_frame(rid)


# Values that always encode (no map or list inside to look at): RESULT_SET skips _storable for them.
_SCALARS = (type(None), str, bytes, bool, int, float)


def h_result_set(state, conn, rid, f, now):
    # [18, rid, task_id, state, value, meta|null, {ttl, tag}|null]
    if len(f) == 7 and f[5] is None and type(f[2]) is str and type(f[3]) is str and type(f[4]) in _SCALARS:
        # What the worker sends for a task's outcome: a plain value, no meta, maybe its delivery's tag.
        opts = f[6]
        if opts is None:
            return ok_frame(rid, state.result_set(conn, f[2], f[3], f[4], None, now))
        if type(opts) is dict and type(tag := opts.get("tag")) is int and INT_MIN <= tag <= INT_MAX:
            if len(opts) == 1:
                return ok_frame(rid, state.result_set(conn, f[2], f[3], f[4], None, now, tag=tag))
            # the worker's default: its app's result_expires as the ttl, beside the tag
            if len(opts) == 2 and (type(ttl := opts.get("ttl")) is int or type(ttl) is float) \
                    and 0 < ttl <= INT_MAX:
                return ok_frame(rid, state.result_set(conn, f[2], f[3], f[4], None, now, ttl=ttl, tag=tag))
    task_id = _arg(f, 2, "task id", (str,), "RESULT_SET")
    st = _arg(f, 3, "state", (str,), "RESULT_SET")
    value = f[4] if len(f) > 4 else None
    meta = _arg(f, 5, "meta", (dict,), "RESULT_SET", required=False)
    opts = _arg(f, 6, "options", (dict,), "RESULT_SET", required=False) or {}
    for k in opts:
        if k not in ("ttl", "tag"):
            raise BadRequest(f"unknown RESULT_SET option {k!r}; known options: ttl, tag")
    tag = opts.get("tag")
    if tag is not None and type(tag) is not int:
        raise BadRequest("RESULT_SET option 'tag' must be a delivery tag (a whole number)")
    _storable(value, "field 4 (value)", "RESULT_SET")
    if meta:
        _storable(meta, "field 5 (meta)", "RESULT_SET")
    if opts.get("ttl") is not None:
        _opt_number(opts, "ttl", "RESULT_SET")
    return ok_frame(rid, state.result_set(conn, task_id, st, value, meta, now, ttl=opts.get("ttl"), tag=tag))


def h_result_get(state, conn, rid, f, now):
    # [19, rid, task_id, wait|null] -> OK {id, state, result, meta, updated}, maybe after a wait
    task_id = _arg(f, 2, "task id", (str,), "RESULT_GET")
    wait = _arg(f, 3, "wait", _NUM, "RESULT_GET", required=False)
    reply = state.result_get(conn, rid, task_id, now, wait)
    return None if reply is None else ok_frame(rid, reply)


def h_result_forget(state, conn, rid, f, now):
    return ok_frame(rid, state.result_forget(_arg(f, 2, "task id", (str,), "RESULT_FORGET"), now))


def h_schedule_put(state, conn, rid, f, now):
    # [21, rid, name, spec]
    name = _arg(f, 2, "name", (str,), "SCHEDULE_PUT")
    spec = _arg(f, 3, "spec", (dict,), "SCHEDULE_PUT")
    _storable(spec, "field 3 (spec)", "SCHEDULE_PUT")
    return ok_frame(rid, state.schedule_put(name, spec, now))


def h_schedule_remove(state, conn, rid, f, now):
    return ok_frame(rid, state.schedule_remove(_arg(f, 2, "name", (str,), "SCHEDULE_REMOVE"), now))


def h_schedule_list(state, conn, rid, f, now):
    return ok_frame(rid, state.schedule_list(_arg(f, 2, "owner", (str,), "SCHEDULE_LIST", required=False)))


def h_schedule_pause(state, conn, rid, f, now):
    name = _arg(f, 2, "name", (str,), "SCHEDULE_PAUSE")
    paused = _arg(f, 3, "paused", (bool,), "SCHEDULE_PAUSE")
    return ok_frame(rid, state.schedule_pause(name, paused, now))


def h_revoke(state, conn, rid, f, now):
    # [25, rid, task_id | [task_id...], {terminate, ttl}|null]
    ids = _arg(f, 2, "task ids", (str, list), "REVOKE")
    opts = _arg(f, 3, "options", (dict,), "REVOKE", required=False) or {}
    for k in opts:
        if k not in ("terminate", "ttl"):
            raise BadRequest(f"unknown REVOKE option {k!r}; known options: terminate, ttl")
    ttl = _opt_number(opts, "ttl", "REVOKE")
    terminate = opts.get("terminate", False)
    if type(terminate) is not bool:
        raise BadRequest("REVOKE option 'terminate' must be true or false")
    n = state.revoke(ids, now, terminate=terminate, ttl=ttl)
    if terminate:
        state.broadcast_control({"revoke": [ids] if type(ids) is str else ids, "terminate": True})
    return ok_frame(rid, n)


def h_chord(state, conn, rid, f, now):
    # [26, rid, chord_id, [member ids], body spec, error spec|null, {run}|null]
    cid = _arg(f, 2, "chord id", (str,), "CHORD")
    members = _arg(f, 3, "members", (list,), "CHORD")
    body = _arg(f, 4, "body", (dict,), "CHORD")
    error = _arg(f, 5, "error", (dict,), "CHORD", required=False)
    opts = _arg(f, 6, "options", (dict,), "CHORD", required=False) or {}
    for k in opts:
        if k not in CHORD_OPTIONS:
            raise BadRequest(f"unknown CHORD option {k!r}; known options: {', '.join(CHORD_OPTIONS)}")
    _storable(f[3:6], "fields 3-5 (members, body, error)", "CHORD")
    return ok_frame(rid, state.chord_declare(cid, members, body, error, now, run=opts.get("run")))


def h_chord_add(state, conn, rid, f, now):
    # [47, rid, chord_id, [member ids]]
    cid = _arg(f, 2, "chord id", (str,), "CHORD_ADD")
    members = _arg(f, 3, "members", (list,), "CHORD_ADD")
    _storable(f[3:4], "field 3 (members)", "CHORD_ADD")
    return ok_frame(rid, state.chord_add(cid, members, now))


def h_ping(state, conn, rid, f, now):
    return ok_frame(rid)


# -- events and remote control (protocol.md §5.29-5.35; broker/state/events.py) ----------
def _storable_events(events: list) -> None:
    # kept and sent to subscribers: the events the state found not plain must encode
    _storable(events, "field 3 (events)", "EMIT_EVENTS")


def h_emit_events(state, conn, rid, f, now):
    # [27, rid, hostname, [event, ...]]
    hostname = _arg(f, 2, "hostname", (str,), "EMIT_EVENTS")
    events = _arg(f, 3, "events", (list,), "EMIT_EVENTS")
    return ok_frame(rid, state.emit_events(conn, hostname, events, now, check=_storable_events))


def h_subscribe(state, conn, rid, f, now):
    # [28, rid, on, replay|null]
    on = _arg(f, 2, "on", (bool,), "SUBSCRIBE")
    replay = _arg(f, 3, "replay", (int,), "SUBSCRIBE", required=False) or 0
    return ok_frame(rid, state.subscribe(conn, on, replay, now))


def h_task_info(state, conn, rid, f, now):
    return ok_frame(rid, state.task_info(_arg(f, 2, "task id", (str,), "TASK_INFO"), now))


def h_workers(state, conn, rid, f, now):
    return ok_frame(rid, state.workers_list(now))


def h_control_request(state, conn, rid, f, now):
    # [31, rid, command, args|null, {timeout, destination}|null] -> OK {hostname: reply}, deferred
    command = _arg(f, 2, "command", (str,), "CONTROL_REQUEST")
    args = _arg(f, 3, "args", (dict,), "CONTROL_REQUEST", required=False)
    if args:
        _storable(args, "field 3 (args)", "CONTROL_REQUEST")  # sent on to every worker
    opts = _arg(f, 4, "options", (dict,), "CONTROL_REQUEST", required=False) or {}
    for k in opts:
        if k not in ("timeout", "destination"):
            raise BadRequest(f"unknown CONTROL_REQUEST option {k!r}; known options: timeout, destination")
    timeout = _opt_number(opts, "timeout", "CONTROL_REQUEST")
    reply = state.control_request(conn, rid, command, args, now, timeout=timeout, destination=opts.get("destination"))
    return None if reply is None else ok_frame(rid, reply)


def h_control_reply(state, conn, rid, f, now):
    # [32, rid, reply_id, reply]
    reply_id = _arg(f, 2, "reply id", (int,), "CONTROL_REPLY")
    if len(f) > 3:
        _storable(f[3], "field 3 (reply)", "CONTROL_REPLY")  # sent on to the requester
    return ok_frame(rid, state.control_reply(conn, reply_id, f[3] if len(f) > 3 else None, now))


# -- exchanges (protocol.md §5.36-5.38; broker/state/exchanges.py) ----------------------
def h_bind(state, conn, rid, f, now):
    # [33, rid, exchange, queue, key, {type, temporary}|null]
    exchange = _arg(f, 2, "exchange", (str,), "BIND")
    queue = _arg(f, 3, "queue", (str,), "BIND")
    key = _arg(f, 4, "key", (str,), "BIND")
    opts = _arg(f, 5, "options", (dict,), "BIND", required=False) or {}
    for k in opts:
        if k not in ("type", "temporary"):
            raise BadRequest(f"unknown BIND option {k!r}; known options: type, temporary")
    kind = opts.get("type", "direct")
    temporary = opts.get("temporary", False)
    if type(temporary) is not bool:
        raise BadRequest("BIND option 'temporary' must be true or false")
    return ok_frame(rid, state.bind(conn, exchange, queue, key, kind, temporary, now))


def h_unbind(state, conn, rid, f, now):
    # [34, rid, exchange, queue, key]
    exchange = _arg(f, 2, "exchange", (str,), "UNBIND")
    queue = _arg(f, 3, "queue", (str,), "UNBIND")
    key = _arg(f, 4, "key", (str,), "UNBIND")
    return ok_frame(rid, state.unbind(conn, exchange, queue, key, now))


def h_emit(state, conn, rid, f, now):
    # [35, rid, exchange, routing_key, body, id|null, priority, options|null]
    exchange = _arg(f, 2, "exchange", (str,), "EMIT")
    key = _arg(f, 3, "routing key", (str,), "EMIT")
    body = _arg(f, 4, "body", (bytes,), "EMIT")
    msg_id = f[5] if len(f) > 5 else None
    priority = f[6] if len(f) > 6 and f[6] is not None else 0
    if type(priority) is not int or not 0 <= priority <= 255:
        raise BadRequest(f"EMIT field 6 (priority) must be a whole number from 0 to 255 (got {priority!r})")
    opts = _arg(f, 7, "options", (dict,), "EMIT", required=False) or {}
    for k in opts:
        if k not in EMIT_OPTIONS:
            raise BadRequest(f"unknown EMIT option {k!r}; known options: {', '.join(EMIT_OPTIONS)}")
    headers = opts.get("headers")
    if headers is not None:
        if type(headers) is not dict:
            raise BadRequest("EMIT option 'headers' must be a map")
        _storable(headers, "option 'headers'", "EMIT")
    return ok_frame(rid, state.emit(
        conn, exchange, key, body, msg_id, priority, now,
        delay=_opt_number(opts, "delay", "EMIT"),
        eta=_opt_number(opts, "eta", "EMIT"),
        ttl=_opt_number(opts, "ttl", "EMIT"),
        headers=headers or None,
    ))
def h_rate_limit(state, conn, rid, f, now):
    # [40, rid, name, limit|null, kind|null] -> OK {kind, name, limit, previous}
    name = _arg(f, 2, "name", (str,), "RATE_LIMIT")
    limit = _arg(f, 3, "limit", (str, int, float), "RATE_LIMIT", required=False)
    kind = _arg(f, 4, "kind", (str,), "RATE_LIMIT", required=False)
    return ok_frame(rid, state.rate_limit(name, limit, kind, now))


HANDLERS = {
    OP_PUBLISH: h_publish,
    OP_PUBLISH_BATCH: h_publish_batch,
    OP_CONSUME: h_consume,
    OP_CANCEL: h_cancel,
    OP_ACK: h_ack,
    OP_NACK: h_nack,
    OP_TOUCH: h_touch,
    OP_DECLARE: h_declare,
    OP_DELETE: h_delete,
    OP_STATS: h_stats,
    OP_PURGE: h_purge,
    OP_PAUSE: h_pause,
    OP_RESUME: h_resume,
    OP_PING: h_ping,
    OP_RESULT_SET: h_result_set,
    OP_RESULT_GET: h_result_get,
    OP_RESULT_FORGET: h_result_forget,
    OP_SCHEDULE_PUT: h_schedule_put,
    OP_SCHEDULE_REMOVE: h_schedule_remove,
    OP_SCHEDULE_LIST: h_schedule_list,
    OP_SCHEDULE_PAUSE: h_schedule_pause,
    OP_REVOKE: h_revoke,
    OP_CHORD: h_chord,
    OP_CHORD_ADD: h_chord_add,
    OP_EMIT_EVENTS: h_emit_events,
    OP_SUBSCRIBE: h_subscribe,
    OP_TASK_INFO: h_task_info,
    OP_WORKERS: h_workers,
    OP_CONTROL_REQUEST: h_control_request,
    OP_CONTROL_REPLY: h_control_reply,
    OP_BIND: h_bind,
    OP_UNBIND: h_unbind,
    OP_EMIT: h_emit,
    OP_RATE_LIMIT: h_rate_limit,
    OP_CREDIT: h_credit,
    OP_RELEASE: h_release,
}
# Requests whose reply confirms a change to logged state: the server sends
# their reply only once the change is durable under the fsync policy.
DURABLE_OPS = frozenset((
    OP_PUBLISH, OP_ACK, OP_NACK, OP_DECLARE, OP_DELETE, OP_PURGE, OP_PAUSE, OP_RESUME,
    OP_RESULT_SET, OP_RESULT_FORGET, OP_SCHEDULE_PUT, OP_SCHEDULE_REMOVE, OP_SCHEDULE_PAUSE,
    OP_REVOKE, OP_CHORD, OP_BIND, OP_UNBIND, OP_EMIT, OP_RATE_LIMIT, OP_RELEASE, OP_PUBLISH_BATCH,
    OP_CHORD_ADD,
))
# Handled by the server itself, because they touch the connection, not the state.
CONNECTION_OPS = (OP_HELLO, OP_HEARTBEAT, OP_BYE, OP_ADMIN)


def handle(state, conn: int, frame: list, now: float):
    """One request frame → its reply frame (OK or ERROR), or None when the
    reply is deferred (a parked RESULT_GET or CONTROL_REQUEST: the state sends it later)."""
    op = frame[0]
    rid = frame[1] if len(frame) > 1 else None
    if type(rid) is not int:
        return error_frame(0, "BAD_REQUEST", f"field 1 (request id) must be a whole number in {CLIENT_OPS.get(op, op)}")
    handler = HANDLERS.get(op)
    if handler is None:
        return error_frame(rid, "UNKNOWN_OP", f"unknown op code {op}; see protocol.md §5 for the list")
    if state.log_failed and op in DURABLE_OPS:
        # The log can no longer write: a change answered OK now would be
        # forgotten at the next start (an ACK would come back as a delivery).
        return error_frame(rid, "LOG_FAILED", state.log_failed)
    try:
        return handler(state, conn, rid, frame, now)
    except BrokerError as exc:
        return error_frame(rid, exc.code, exc.message)
