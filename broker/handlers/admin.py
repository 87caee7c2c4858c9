"""The netcat admin protocol: one text line in, text lines out.

    $ printf 'QUEUES\\n' | nc -q1 127.0.0.1 7700
    OK 2 queues
    QUEUE   READY  DELAYED  INFLIGHT  CONSUMERS  DEAD  PAUSED
    emails     12        0         3          2     0  no
    sms         0        0         0          1     0  no
    END

Rules (protocol.md §7): commands are case-insensitive words separated by
spaces; ``\\n`` or ``\\r\\n`` ends a line.  Every reply's first line starts
``OK`` or ``ERR <CODE> <sentence>``; a multi-line reply ends with a lone
``END``.  Pure: no trio, no socket; ``now`` is passed in.

Every line written goes through ``clean`` (in ``multi``, ``single``, ``error``
and ``event_line``, and per cell in ``table``): values come from users (message
ids, queue and task names, headers, args, exceptions), and a CR or LF inside
one would otherwise forge lines of the reply, such as a fake ``END``.
"""

from __future__ import annotations

from broker.errors import AccessRefused, BadRequest, BrokerError, NotFound, UnknownCommand
from broker.handlers import views
from broker.state import inspection

MAX_LINE = 4096  # bytes; an admin line longer than this is refused
PEEK_DEFAULT = 10
PEEK_MAX = 1000

HELP = [
    ("HELP", "this list"),
    ("STATS", "broker-wide figures"),
    ("QUEUES", "every queue with its depth"),
    ("QUEUE <name>", "one queue: depth, counters, options"),
    ("CONSUMERS", "every consumer: connection, queues, prefetch, unacked"),
    ("PEEK <queue> [n]", "the next n ready messages, without taking them (default 10)"),
    ("PURGE <queue>", "drop every ready and delayed message of a queue"),
    ("PAUSE <queue>", "stop delivering from a queue (publishes are still accepted)"),
    ("RESUME <queue>", "start delivering again"),
    ("DEAD <queue> [n]", "the first n messages in a queue's dead-letter queue"),
    ("REQUEUE-DEAD <queue>", "move a queue's dead letters back to it, attempts reset"),
    ("RESULT <task-id>", "a task's state and result (or its error and traceback)"),
    ("REVOKE <task-id>", "never run that task (kept for a day; survives restarts)"),
    ("RATES", "every rate limit and concurrency cap brokerd enforces, with the messages each holds back"),
    ("RATE <task> <limit>", "deliver a task at most at <limit> (10/s, 100/m, 1000/h; 0 lifts it); logged"),
    ("TENANTS <queue>", "the tenants with ready messages in a queue, with their weights"),
    ("SCHEDULES", "every periodic schedule: timing, next and last firing, count, policy"),
    ("SCHEDULE <name>", "one schedule entry in full"),
    ("PAUSE-SCHEDULE <name>", "stop firing an entry (ticks while paused are skipped)"),
    ("RESUME-SCHEDULE <name>", "fire it again from its next tick"),
    ("WORKERS", "every worker brokerd has heard of: state, pool, active, processed, last heartbeat"),
    ("TASK <task-id> [queue]", "a task's state, name, args, result or traceback, and its timeline of events;"
     " with no events yet, the queue it waits in and its consumers"),
    ("UNIQUE <key>", "who holds a unique-task key: task id, policy, time left"),
    ("EXCHANGES", "every exchange: type, bindings, bound queues"),
    ("BINDINGS <exchange>", "one exchange's bindings: queue, key, temporary"),
    ("EVENTS [n]", "stream events as lines, after the last n (default 0), until QUIT or close"),
    ("PROMOTE [reason]", "a follower becomes the leader (epoch + 1); answered once that is on disk"),
    ("QUIT", "close this connection"),
]


_ESCAPES = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}


def clean(text: str) -> str:
    """``text`` with every character that is not printable (C0 and C1 controls, DEL,
    line and paragraph separators, bidi and other format characters) written as a
    Python-style escape (``\\n``, ``\\x1b``, ``\\u2028``): one admin line stays one line,
    and a terminal shows what was sent instead of obeying it.  Printable text (the
    common case) is returned as it is, checked at C speed."""
    if text.isprintable():
        return text
    out = []
    for ch in text:
        if ch.isprintable():
            out.append(ch)
        elif ch in _ESCAPES:
            out.append(_ESCAPES[ch])
        else:
            o = ord(ch)
            out.append(f"\\x{o:02x}" if o < 0x100 else f"\\u{o:04x}" if o < 0x10000 else f"\\U{o:08x}")
    return "".join(out)


def table(header: list[str], rows: list[list]) -> list[str]:
    """Aligned columns: text left, numbers right; two spaces between."""
    cells = [[str(c) for c in header]] + [[_cell(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    numeric = [all(_is_num(r[i]) for r in rows) and rows for i in range(len(header))]
    out = []
    for r in cells:
        parts = []
        for i, c in enumerate(r):
            parts.append(c.rjust(widths[i]) if numeric[i] else c.ljust(widths[i]))
        out.append("  ".join(parts).rstrip())
    return out


def _is_num(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _cell(v) -> str:
    if isinstance(v, bool):
        return "yes" if v else "no"
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.3f}".rstrip("0").rstrip(".") if v != int(v) else str(int(v))
    return clean(str(v))  # escaped here too, so the columns line up


def keyvalues(pairs) -> list[str]:
    pairs = list(pairs)
    w = max((len(k) for k, _ in pairs), default=0)
    return [f"{k.ljust(w)}  {_cell(v)}" for k, v in pairs]


def multi(summary: str, lines: list[str]) -> str:
    return "\r\n".join([f"OK {clean(summary)}", *map(clean, lines), "END"]) + "\r\n"


def single(text: str) -> str:
    return f"OK {clean(text)}\r\n"


def error(code: str, message: str) -> str:
    return f"ERR {code} {clean(message)}\r\n"


def _need(args, n, usage):
    if len(args) < n:
        raise BadRequest(f"usage: {usage}")


def _count(arg, usage) -> int:
    try:
        n = int(arg)
    except ValueError:
        raise BadRequest(f"{arg!r} is not a whole number; usage: {usage}") from None
    if not 1 <= n <= PEEK_MAX:
        raise BadRequest(f"n must be from 1 to {PEEK_MAX}")
    return n


def _preview(body: bytes, width=40) -> str:
    try:
        text = body.decode()
        if text.isprintable():
            return text if len(text) <= width else text[: width - 1] + "…"
    except UnicodeDecodeError:
        pass
    hexed = body[: width // 2].hex()
    return "0x" + hexed + ("…" if len(body) > width // 2 else "")


def _messages(msgs, now) -> list[str]:
    rows = [
        [m.id, m.priority, m.attempts, round(max(0.0, now - m.ts), 3), len(m.body), _preview(m.body)]
        for m in msgs
    ]
    return table(["ID", "PRIORITY", "ATTEMPTS", "AGE_S", "BYTES", "BODY"], rows)


# Commands whose first argument is a queue: with users, the admin grant must cover that queue.
QUEUE_COMMANDS = frozenset(("QUEUE", "PEEK", "DEAD", "PURGE", "PAUSE", "RESUME", "REQUEUE-DEAD", "TENANTS"))
# Admin lines that change the broker: each is an audit line (broker.runtime.admin_conn).
CHANGING_COMMANDS = frozenset(("PURGE", "PAUSE", "RESUME", "REQUEUE-DEAD", "REVOKE", "PAUSE-SCHEDULE",
                               "RESUME-SCHEDULE", "RATE"))


def execute(state, line: str, now: float, extra: dict | None = None, user=None) -> str:
    """Run one admin line against the state; return the whole reply text.

    ``extra`` carries figures only the server knows (uptime, WAL state), shown by STATS.
    ``user``: the broker.auth.User of the connection when brokerd has users (None: no users).
    It needs the ``admin`` grant, on the named queue for a queue command; QUEUES lists
    only the queues it ``sees``.
    """
    words = line.split()
    if not words:
        return error("BAD_REQUEST", "empty line; send HELP for the list of commands")
    cmd = words[0].upper()
    args = words[1:]
    try:
        fn = COMMANDS.get(cmd)
        if fn is None:
            raise UnknownCommand(f"unknown command {words[0][:40]!r}; send HELP for the list of commands"
            )
        if user is not None and cmd not in ("HELP", "QUIT"):
            queue = args[0] if cmd in QUEUE_COMMANDS and args else None
            if not user.may("admin", queue):
                on = f" on queue {queue!r}" if queue is not None else ""
                raise AccessRefused(f"user {user.name!r} may not run {cmd}{on}: it needs the 'admin' grant{on}")
            if cmd == "QUEUES":
                return c_queues(state, args, now, extra or {}, sees=user.sees)
            if cmd == "TASK":  # where a task waits names a queue: only the ones this user may see
                if len(args) > 1 and not user.may("admin", args[1]):
                    raise AccessRefused(f"user {user.name!r} may not run TASK on queue {args[1]!r}: "
                                        f"it needs the 'admin' grant on queue {args[1]!r}")
                return c_task(state, args, now, extra or {}, sees=user.sees)
        return fn(state, args, now, extra or {})
    except BrokerError as exc:
        return error(exc.code, exc.message)


def c_help(state, args, now, extra):
    return multi("commands", table(["COMMAND", "WHAT IT DOES"], [list(h) for h in HELP]))


def c_stats(state, args, now, extra):
    b = state.statistics()
    pairs = [(k, getattr(b, k)) for k in b.__slots__]
    pairs += list(extra.items())
    return multi("stats", keyvalues(pairs))


def c_queues(state, args, now, extra, sees=None):
    rows = []
    for q in sorted(state.queues.values(), key=lambda q: q.name):
        if sees is not None and not sees(q.name):
            continue
        s = state.queue_statistics(q, now)
        rows.append([s.name, s.ready, s.delayed, s.inflight, s.consumers, s.dead, s.paused])
    n = len(rows)
    return multi(
        f"{n} queue{'s' if n != 1 else ''}",
        table(["QUEUE", "READY", "DELAYED", "INFLIGHT", "CONSUMERS", "DEAD", "PAUSED"], rows),
    )


def c_queue(state, args, now, extra):
    _need(args, 1, "QUEUE <name>")
    s = state.queue_statistics(state.existing_queue(args[0]), now)
    pairs = [(k, getattr(s, k)) for k in s.__slots__ if k != "options"]
    pairs += [("option." + k, v) for k, v in s.options.items()]
    return multi(f"queue {s.name}", keyvalues(pairs))


def c_consumers(state, args, now, extra):
    rows = []
    for c in views.consumers(state):
        rows.append([c.tag, c.conn, c.client, ",".join(c.queues), c.prefetch, c.unacked])
    n = len(rows)
    return multi(
        f"{n} consumer{'s' if n != 1 else ''}",
        table(["CONSUMER", "CONN", "CLIENT", "QUEUES", "PREFETCH", "UNACKED"], rows),
    )


def c_peek(state, args, now, extra):
    _need(args, 1, "PEEK <queue> [n]")
    n = _count(args[1], "PEEK <queue> [n]") if len(args) > 1 else PEEK_DEFAULT
    msgs = state.peek(args[0], n)
    return multi(f"{len(msgs)} of {state.queues[args[0]].ready_count} ready in {args[0]}", _messages(msgs, now))


def c_dead(state, args, now, extra):
    _need(args, 1, "DEAD <queue> [n]")
    n = _count(args[1], "DEAD <queue> [n]") if len(args) > 1 else PEEK_DEFAULT
    q = state.existing_queue(args[0])
    dl = q.dead_letter_name
    if dl is None or dl not in state.queues:
        return multi(f"0 dead letters for {q.name}", _messages([], now))
    msgs = state.peek(dl, n)
    rows = _messages(msgs, now)
    return multi(f"{len(msgs)} of {state.queues[dl].ready_count} in {dl}", rows)


def c_purge(state, args, now, extra):
    _need(args, 1, "PURGE <queue>")
    n = state.purge(args[0], now)
    return single(f"purged {n} message{'s' if n != 1 else ''} from {args[0]}")


def c_pause(state, args, now, extra):
    _need(args, 1, "PAUSE <queue>")
    state.pause(args[0], True, now)
    return single(f"paused {args[0]}")


def c_resume(state, args, now, extra):
    _need(args, 1, "RESUME <queue>")
    state.pause(args[0], False, now)
    return single(f"resumed {args[0]}")


def c_requeue_dead(state, args, now, extra):
    _need(args, 1, "REQUEUE-DEAD <queue>")
    n = state.requeue_dead(args[0], now)
    return single(f"requeued {n} dead letter{'s' if n != 1 else ''} to {args[0]}")


def c_rates(state, args, now, extra):
    rows = [[r["kind"], r["name"], r["limit"], r["source"], r["waiting"], r["inflight"]]
            for r in state.rate_table(now)]
    n = len(rows)
    return multi(f"{n} limit{'s' if n != 1 else ''}",
                 table(["KIND", "NAME", "LIMIT", "SET BY", "WAITING", "INFLIGHT"], rows))


def c_rate(state, args, now, extra):
    _need(args, 2, "RATE <task> <limit>")
    out = state.rate_limit(args[0], args[1], "task", now)
    return single(f"rate of {clean(args[0])} is {out['limit'] or 'unlimited'} (was {out['previous'] or 'unlimited'})")


def c_tenants(state, args, now, extra):
    _need(args, 1, "TENANTS <queue>")
    q = state.existing_queue(args[0])
    rows = [["-" if t is None else t, n, w] for t, (n, w) in q.tenants().items()]
    rows.sort(key=lambda r: (-r[1], str(r[0])))
    n = len(rows)
    return multi(f"{n} tenant{'s' if n != 1 else ''} with ready messages in {clean(q.name)}",
                 table(["TENANT", "READY", "WEIGHT"], rows))


def c_result(state, args, now, extra):
    _need(args, 1, "RESULT <task-id>")
    task_id = args[0]
    r = state.results.get(task_id)
    if r is None or r.expires <= now:
        return multi(f"result {task_id}", keyvalues([("id", task_id), ("state", "PENDING")]))
    pairs = [("id", r.id), ("state", r.state), ("result", _short(repr(r.value), 200))]
    meta = r.meta or {}
    tb = meta.get("traceback")
    for k, v in meta.items():
        if k != "traceback":
            pairs.append(("meta." + str(k), _short(str(v), 200)))
    pairs += [("updated_s_ago", round(now - r.updated, 3)), ("expires_in_s", round(r.expires - now, 1))]
    lines = keyvalues(pairs)
    if tb:
        lines.append("traceback:")
        lines += ["  " + line for line in str(tb).rstrip().splitlines()]
    return multi(f"result {task_id}", lines)


def _short(text: str, n: int) -> str:
    return text if len(text) <= n else text[: n - 1] + "…"


def _when(t, now) -> str:
    if t is None:
        return "-"
    import datetime as _dt  # formatting only; the time itself is passed in

    iso = _dt.datetime.fromtimestamp(t, _dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
    delta = t - now
    rel = f"in {delta:.1f}s" if delta >= 0 else f"{-delta:.1f}s ago"
    return f"{iso} ({rel})"


def c_schedules(state, args, now, extra):
    rows = []
    for e in sorted(state.schedules.values(), key=lambda e: e.name):
        rows.append([e.name, e.timing.describe(), e.queue, _when(e.next if not e.paused else None, now),
                     _when(e.last_tick, now), e.fired, e.catchup, e.paused])
    n = len(rows)
    return multi(f"{n} schedule{'s' if n != 1 else ''}",
                 table(["NAME", "TIMING", "QUEUE", "NEXT", "LAST", "FIRED", "CATCHUP", "PAUSED"], rows))


def c_schedule(state, args, now, extra):
    _need(args, 1, "SCHEDULE <name>")
    e = state.schedules.get(args[0])
    if e is None:
        raise NotFound(f"no schedule named {args[0]!r}; SCHEDULES lists them")
    body = e.body
    task = body.get("task") if isinstance(body, dict) else None
    pairs = [("name", e.name), ("timing", e.timing.describe()), ("task", task), ("queue", e.queue),
             ("priority", e.priority), ("next", _when(e.next if not e.paused else None, now)),
             ("last", _when(e.last_tick, now)), ("fired", e.fired), ("catchup", e.catchup),
             ("expires_s", e.expires), ("paused", e.paused), ("owner", e.owner)]
    return multi(f"schedule {e.name}", keyvalues(pairs))


def c_pause_schedule(state, args, now, extra):
    _need(args, 1, "PAUSE-SCHEDULE <name>")
    state.schedule_pause(args[0], True, now)
    return single(f"paused schedule {args[0]}")


def c_resume_schedule(state, args, now, extra):
    _need(args, 1, "RESUME-SCHEDULE <name>")
    state.schedule_pause(args[0], False, now)
    return single(f"resumed schedule {args[0]}")


def c_revoke(state, args, now, extra):
    _need(args, 1, "REVOKE <task-id>")
    state.revoke(args[0], now)
    return single(f"revoked {args[0]}")


def _iso_ms(t) -> str:
    import datetime as _dt  # formatting only; the time itself is passed in

    if type(t) not in (int, float):
        return "-"
    return _dt.datetime.fromtimestamp(t, _dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"


def _value(v) -> str:
    if isinstance(v, float):
        return f"{v:.6g}"
    if isinstance(v, list):
        return ",".join(_value(x) for x in v) or "-"
    text = _cell(v)
    return text.replace("\r", " ").replace("\n", " ")


EVENT_LINE_SKIP = ("type", "ts", "hostname", "uuid", "traceback")


def event_line(ev: dict, skip=EVENT_LINE_SKIP) -> str:
    """One event as one text line: time, type, worker, task id, then key=value pairs."""
    head = [_iso_ms(ev.get("ts")), f"{ev.get('type', '?')!s:<14}", str(ev.get("hostname", "-"))]
    if "uuid" in ev:
        head.append(str(ev["uuid"]))
    rest = [f"{k}={_short(_value(v), 200)}" for k, v in ev.items() if k not in skip]
    return clean("  ".join(head + ([" ".join(rest)] if rest else [])))


def _ago(t, now) -> str:
    return "-" if type(t) not in (int, float) else f"{max(0.0, now - t):.1f}s ago"


def c_workers(state, args, now, extra):
    rows = []
    for w in state.workers_list(now):
        pool = w.get("pool")
        size = w.get("pool_size")
        load = w.get("loadavg")
        rows.append([
            w["hostname"], w["state"], pool, size,
            w.get("active", 0) if w["state"] == "online" else "-", w.get("processed", 0),
            ",".join(f"{x:.2f}" for x in load) if isinstance(load, list) and load else "-",
            _ago(w["last_heartbeat"], now), ",".join(w.get("queues") or []) or "-",
        ])
    n = len(rows)
    return multi(
        f"{n} worker{'s' if n != 1 else ''}",
        table(["WORKER", "STATE", "POOL", "SIZE", "ACTIVE", "PROCESSED", "LOADAVG", "HEARTBEAT", "QUEUES"], rows),
    )


# Where a task waits (ready, in flight or delayed) is looked up by the state (``locate_message``),
# reading at most this many messages: there is no index by message id.
TASK_SCAN_LIMIT = inspection.TASK_SCAN_LIMIT


def _waiting(loc: dict | None) -> list[tuple]:
    if loc is None:
        return []
    pairs = [("queue", loc["queue"])] if loc["where"] is not None else []
    pairs.append(("waiting", loc["text"]))
    if loc["hint"]:
        pairs.append(("hint", loc["hint"]))
    return pairs


def c_task(state, args, now, extra, sees=None):
    _need(args, 1, "TASK <task-id> [queue]")
    task_id = args[0]
    queue = args[1] if len(args) > 1 else None
    info = state.task_info(task_id, now, sees=sees)
    if info is None or (not info["events"] and info["result_state"] is None):  # only its message is known
        loc = info["waiting"] if info is not None and queue is None else None
        if loc is None:  # in the named queue; or not found: where it looked
            loc = state.locate_message(task_id, now, queue, sees)
        pairs = [("id", task_id), ("state", "PENDING")] + _waiting(loc)
        return multi(f"task {task_id}", keyvalues(pairs) + ["timeline:", "  (no events)"])
    pairs = [("id", info["id"]), ("name", info["name"]), ("state", info["state"]), ("args", info["args"]),
             ("kwargs", info["kwargs"]), ("queue", info["queue"]), ("worker", info["worker"]),
             ("retries", info["retries"]), ("parent", info["parent_id"]), ("root", info["root_id"]),
             ("children", ",".join(info["children"]) or None)]
    meta = info["meta"] or {}
    if info["result_state"] == "SUCCESS" or (info["result_state"] is None and info["state"] == "SUCCESS"):
        pairs.append(("result", _short(repr(info["result"]) if info["result_state"] else str(info["result"]), 200)))
    exc = info["exception"]
    if meta.get("exc_type"):
        exc = f"{meta.get('exc_type')}: {meta.get('exc_message')}"
    if exc:
        pairs.append(("exception", _short(str(exc), 200)))
    if type(info["runtime"]) in (int, float):
        pairs.append(("runtime_s", f"{info['runtime']:.6g}"))
    pairs += [p for p in _waiting(info.get("waiting")) if p[0] != "queue"]  # its queue is shown above
    lines = keyvalues([(k, v) for k, v in pairs])
    lines.append("timeline:")
    events = info["events"]
    t0 = events[0].get("ts") if events else None
    for ev in events:
        ts = ev.get("ts")
        rel = f"+{ts - t0:.3f}s" if type(ts) in (int, float) and type(t0) in (int, float) else "-"
        kv = " ".join(f"{k}={_short(_value(v), 200)}" for k, v in ev.items() if k not in EVENT_LINE_SKIP)
        lines.append(f"  {_iso_ms(ts)}  {rel:>9}  {str(ev.get('type')):<14}  {ev.get('hostname', '-')}  {kv}".rstrip())
    if not events:
        lines.append("  (no events)")
    tb = meta.get("traceback") or info["traceback"]
    if tb:
        lines.append("traceback:")
        lines += ["  " + line for line in str(tb).rstrip().splitlines()]
    return multi(f"task {task_id}", lines)


def c_events(state, args, now, extra):
    # A text connection streams (broker/runtime/admin_conn.py handles EVENTS before it gets here); a binary
    # ADMIN request cannot stream.
    raise BadRequest("EVENTS streams on an admin text connection only; "
                                    "a binary client sends SUBSCRIBE (protocol.md §5.30)")


def c_promote(state, args, now, extra):
    # A change of role, not of the state: broker/runtime/roles.py answers PROMOTE (on admin text
    # connections and in binary ADMIN frames) before a line gets here.
    raise BadRequest("PROMOTE is answered by a running brokerd (broker/runtime/roles.py), not by a state")


def c_unique(state, args, now, extra):
    _need(args, 1, "UNIQUE <key>")
    info = state.unique_info(args[0], now)
    if info is None:
        raise NotFound(f"no task holds unique key {args[0]!r} (never taken, freed or expired)")
    pairs = [("key", info["key"]), ("task_id", info["task_id"]), ("until", info["until"]),
             ("expires_in_s", round(info["expires_in"], 3)), ("held_s", round(info["age"], 3))]
    return multi(f"unique {info['key']}", keyvalues(pairs))


def c_exchanges(state, args, now, extra):
    rows = []
    for ex in sorted(state.exchanges.values(), key=lambda e: e.name):
        queues = {q for q, _ in ex.bindings}
        temp = sum(1 for owner in ex.bindings.values() if owner is not None)
        rows.append([ex.name, ex.kind, len(ex.bindings), temp, len(queues)])
    n = len(rows)
    return multi(f"{n} exchange{'s' if n != 1 else ''}",
                 table(["EXCHANGE", "TYPE", "BINDINGS", "TEMPORARY", "QUEUES"], rows))


def c_bindings(state, args, now, extra):
    _need(args, 1, "BINDINGS <exchange>")
    rows = [[q, k or "-", temp] for q, k, temp in sorted(state.exchange_bindings(args[0]))]
    n = len(rows)
    kind = state.exchanges[args[0]].kind
    return multi(f"{n} binding{'s' if n != 1 else ''} of {kind} exchange {args[0]}",
                 table(["QUEUE", "KEY", "TEMPORARY"], rows))


def c_quit(state, args, now, extra):
    return single("bye")


COMMANDS = {
    "HELP": c_help,
    "STATS": c_stats,
    "QUEUES": c_queues,
    "QUEUE": c_queue,
    "CONSUMERS": c_consumers,
    "PEEK": c_peek,
    "DEAD": c_dead,
    "PURGE": c_purge,
    "PAUSE": c_pause,
    "RESUME": c_resume,
    "REQUEUE-DEAD": c_requeue_dead,
    "RESULT": c_result,
    "REVOKE": c_revoke,
    "RATES": c_rates,
    "RATE": c_rate,
    "TENANTS": c_tenants,
    "SCHEDULES": c_schedules,
    "SCHEDULE": c_schedule,
    "PAUSE-SCHEDULE": c_pause_schedule,
    "RESUME-SCHEDULE": c_resume_schedule,
    "WORKERS": c_workers,
    "TASK": c_task,
    "EVENTS": c_events,
    "UNIQUE": c_unique,
    "EXCHANGES": c_exchanges,
    "BINDINGS": c_bindings,
    "PROMOTE": c_promote,
    "QUIT": c_quit,
}
